/* SPDX-License-Identifier: MIT */
/*
 * A hand-written raw liburing echo server: the floor for an io_uring echo server without an
 * executor. One ring per thread (--threads N, default 1; SINGLE_ISSUER | DEFER_TASKRUN where the
 * kernel has them, like concur's loops), each with its own SO_REUSEPORT listener and a multishot
 * accept; per connection a state machine of one-shot RECV -> SEND (until all of it is out) ->
 * RECV ..., with one io_uring_submit_and_wait per turn of the loop. Stops on SIGINT/SIGTERM
 * (peer_main: the main thread waits for them, then exits).
 */
#include "http_common.h" /* peer_main, peer_listener: nothing HTTP is used here */

#include <liburing.h>

#define ECHO_BUF 65536

enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3, OP_CLOSE = 0 };

struct conn {
	int fd;
	size_t out_len, out_off;
	char buf[ECHO_BUF];
} __attribute__((aligned(8)));

static struct io_uring_sqe *sqe_get(struct io_uring *ring)
{
	struct io_uring_sqe *sqe;
	while (!(sqe = io_uring_get_sqe(ring)))
		io_uring_submit(ring);
	return sqe;
}

static void set_data(struct io_uring_sqe *sqe, struct conn *c, unsigned op)
{
	io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)c | op);
}

static void arm_accept(struct io_uring *ring, int lfd)
{
	struct io_uring_sqe *sqe = sqe_get(ring);
	io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, SOCK_CLOEXEC);
	set_data(sqe, NULL, OP_ACCEPT);
}

static void arm_recv(struct io_uring *ring, struct conn *c)
{
	struct io_uring_sqe *sqe = sqe_get(ring);
	io_uring_prep_recv(sqe, c->fd, c->buf, ECHO_BUF, 0);
	set_data(sqe, c, OP_RECV);
}

static void arm_send(struct io_uring *ring, struct conn *c)
{
	struct io_uring_sqe *sqe = sqe_get(ring);
	io_uring_prep_send(sqe, c->fd, c->buf + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
	set_data(sqe, c, OP_SEND);
}

static void conn_close(struct io_uring *ring, struct conn *c)
{
	struct io_uring_sqe *sqe = sqe_get(ring);
	io_uring_prep_close(sqe, c->fd);
	set_data(sqe, NULL, OP_CLOSE);
	free(c);
}

static void on_accept(struct io_uring *ring, int fd)
{
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	struct conn *c = malloc(sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->fd = fd;
	c->out_len = c->out_off = 0;
	arm_recv(ring, c);
}

static void on_recv(struct io_uring *ring, struct conn *c, int res)
{
	if (res <= 0) {
		conn_close(ring, c);
		return;
	}
	c->out_len = (size_t)res;
	c->out_off = 0;
	arm_send(ring, c);
}

static void on_send(struct io_uring *ring, struct conn *c, int res)
{
	if (res <= 0) {
		conn_close(ring, c);
		return;
	}
	c->out_off += (size_t)res;
	if (c->out_off < c->out_len)
		arm_send(ring, c);
	else
		arm_recv(ring, c);
}

static void *loop(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	struct io_uring ring;
	struct io_uring_params p;
	static const unsigned tries[] = {
	    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
	    IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	    0,
	};
	int err = -1;
	for (unsigned i = 0; i < sizeof(tries) / sizeof(tries[0]) && err; i++) {
		memset(&p, 0, sizeof(p));
		p.flags = tries[i];
		err = io_uring_queue_init_params(4096, &ring, &p);
	}
	if (err) {
		fprintf(stderr, "uring_echo: io_uring_queue_init: %s\n", strerror(-err));
		exit(1);
	}
	arm_accept(&ring, lfd);
	for (;;) {
		io_uring_submit_and_wait(&ring, 1);
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&ring, head, cqe)
		{
			uint64_t ud = io_uring_cqe_get_data64(cqe);
			struct conn *c = (struct conn *)(uintptr_t)(ud & ~(uint64_t)7);
			seen++;
			switch (ud & 7) {
			case OP_ACCEPT:
				if (cqe->res >= 0)
					on_accept(&ring, cqe->res);
				if (!(cqe->flags & IORING_CQE_F_MORE))
					arm_accept(&ring, lfd);
				break;
			case OP_RECV:
				on_recv(&ring, c, cqe->res);
				break;
			case OP_SEND:
				on_send(&ring, c, cqe->res);
				break;
			default:
				break;
			}
		}
		io_uring_cq_advance(&ring, seen);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	return peer_main(argc, argv, "uring_echo", loop, 0);
}

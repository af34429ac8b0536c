/* SPDX-License-Identifier: MIT */
/* I/O as futures: file and socket operations, deadlines, cancellation (streams: test_stream.c). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "helpers.h"
#include "internal.h" /* the waiters word: an awaiter in the slot leaves it empty */

static concur_exec *ex;

static int64_t nothing_task(void *arg)
{
	return 0;
}

static int setup(void **state)
{
	struct concur_exec_opts o = {.loops = 2, .stack_size = 64 * 1024};
	return concur_exec_new(&ex, &o);
}

static int teardown(void **state)
{
	concur_exec_free(ex);
	ex = NULL;
	return 0;
}

/* Wait for f from this (foreign) thread, release it, return its result. */
static int64_t wait_res(concur_future *f)
{
	int64_t r = concur_result(f, MS(10000));
	concur_release(f);
	return r;
}

static int64_t run_task(concur_task_fn fn, void *arg)
{
	return wait_res(concur_spawn(ex, fn, arg));
}

static void temp_path(char *buf, size_t n, const char *what)
{
	snprintf(buf, n, "/tmp/concur-test-io-%d-%s", (int)getpid(), what);
}

static int listener(uint16_t *port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	int one = 1;
	assert_true(fd >= 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(fd, 4096), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	*port = ntohs(a.sin_port);
	return fd;
}

static struct sockaddr_in loopback(uint16_t port)
{
	struct sockaddr_in a = {.sin_family = AF_INET,
	                        .sin_port = htons(port),
	                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	return a;
}

/* ---- files -------------------------------------------------------------------------------- */

static void test_file_futures(void **state)
{
	char path[128], buf[64] = {0};
	struct statx stx;
	temp_path(path, sizeof(path), "futures");
	int fd = (int)wait_res(
	    concur_openat(ex, AT_FDCWD, path, O_RDWR | O_CREAT | O_TRUNC, 0600, CONCUR_NO_TIMEOUT));
	assert_true(fd >= 0);
	assert_int_equal(wait_res(concur_write(ex, fd, "hello world", 11, 0, CONCUR_NO_TIMEOUT)),
	                 11);
	/* offsets */
	assert_int_equal(wait_res(concur_read(ex, fd, buf, 5, 6, CONCUR_NO_TIMEOUT)), 5);
	assert_memory_equal(buf, "world", 5);
	/* short read, then EOF */
	assert_int_equal(wait_res(concur_read(ex, fd, buf, sizeof(buf), 3, CONCUR_NO_TIMEOUT)), 8);
	assert_memory_equal(buf, "lo world", 8);
	assert_int_equal(wait_res(concur_read(ex, fd, buf, sizeof(buf), 11, CONCUR_NO_TIMEOUT)), 0);
	/* -1: the current position (0 after open, the pwrites did not move it) */
	struct iovec iov[2] = {{buf, 3}, {buf + 3, 2}};
	assert_int_equal(wait_res(concur_readv(ex, fd, iov, 2, -1, CONCUR_NO_TIMEOUT)), 5);
	assert_memory_equal(buf, "hello", 5);
	assert_int_equal(lseek(fd, 0, SEEK_CUR), 5);
	struct iovec wv[2] = {{"AB", 2}, {"CD", 2}};
	assert_int_equal(wait_res(concur_writev(ex, fd, wv, 2, -1, CONCUR_NO_TIMEOUT)), 4);
	assert_int_equal(lseek(fd, 0, SEEK_CUR), 9);
	assert_int_equal(pread(fd, buf, 11, 0), 11);
	assert_memory_equal(buf, "helloABCDld", 11);
	assert_int_equal(wait_res(concur_fsync(ex, fd, false, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(wait_res(concur_fsync(ex, fd, true, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(wait_res(concur_fallocate(ex, fd, 0, 0, 4096, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(
	    wait_res(concur_statx(ex, fd, "", AT_EMPTY_PATH, STATX_SIZE, &stx, CONCUR_NO_TIMEOUT)),
	    0);
	assert_int_equal(stx.stx_size, 4096);
	assert_int_equal(wait_res(concur_close(ex, fd, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(wait_res(concur_unlinkat(ex, AT_FDCWD, path, 0, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(access(path, F_OK), -1);
}

static int64_t file_task(void *arg)
{
	char path[128], path2[128], dir[128], buf[32];
	struct statx stx;
	temp_path(path, sizeof(path), "direct");
	temp_path(path2, sizeof(path2), "direct2");
	temp_path(dir, sizeof(dir), "dir");
	int fd = (int)concur_await_openat(AT_FDCWD, path, O_RDWR | O_CREAT | O_TRUNC, 0600,
	                                  CONCUR_NO_TIMEOUT);
	if (fd < 0)
		return fd;
	if (concur_await_write(fd, "0123456789", 10, -1, CONCUR_NO_TIMEOUT) != 10)
		return -100;
	if (concur_await_read(fd, buf, sizeof(buf), 4, CONCUR_NO_TIMEOUT) != 6 ||
	    memcmp(buf, "456789", 6))
		return -101;
	if (concur_await_read(fd, buf, sizeof(buf), -1, CONCUR_NO_TIMEOUT) != 0) /* at EOF */
		return -102;
	if (concur_await_fsync(fd, true, CONCUR_NO_TIMEOUT) != 0)
		return -103;
	if (concur_await_close(fd, CONCUR_NO_TIMEOUT) != 0)
		return -104;
	if (concur_await_renameat(AT_FDCWD, path, AT_FDCWD, path2, 0, CONCUR_NO_TIMEOUT) != 0)
		return -105;
	if (concur_await_statx(AT_FDCWD, path2, 0, STATX_SIZE, &stx, CONCUR_NO_TIMEOUT) != 0 ||
	    stx.stx_size != 10)
		return -106;
	if (concur_await_statx(AT_FDCWD, path, 0, STATX_SIZE, &stx, CONCUR_NO_TIMEOUT) != -ENOENT)
		return -107;
	if (concur_await_unlinkat(AT_FDCWD, path2, 0, CONCUR_NO_TIMEOUT) != 0)
		return -108;
	if (concur_await_mkdirat(AT_FDCWD, dir, 0700, CONCUR_NO_TIMEOUT) != 0)
		return -109;
	if (concur_await_mkdirat(AT_FDCWD, dir, 0700, CONCUR_NO_TIMEOUT) != -EEXIST)
		return -110;
	if (concur_await_unlinkat(AT_FDCWD, dir, AT_REMOVEDIR, CONCUR_NO_TIMEOUT) != 0)
		return -111;
	return 0;
}

static void test_file_direct(void **state)
{
	assert_int_equal(run_task(file_task, NULL), 0);
}

static void test_ebadf(void **state)
{
	int fds[2];
	char c;
	assert_int_equal(pipe(fds), 0);
	close(fds[0]);
	close(fds[1]);
	assert_int_equal(wait_res(concur_read(ex, fds[0], &c, 1, -1, CONCUR_NO_TIMEOUT)), -EBADF);
	assert_int_equal(wait_res(concur_write(ex, fds[1], "x", 1, -1, MS(100))), -EBADF);
	assert_int_equal(wait_res(concur_close(ex, fds[0], CONCUR_NO_TIMEOUT)), -EBADF);
}

static int64_t ebadf_task(void *arg)
{
	char c;
	return concur_await_recv(*(int *)arg, &c, 1, 0, CONCUR_NO_TIMEOUT);
}

static void test_ebadf_direct(void **state)
{
	int fds[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
	close(fds[0]);
	close(fds[1]);
	assert_int_equal(run_task(ebadf_task, &fds[0]), -EBADF);
}

static void test_bad_input(void **state)
{
	char c;
	struct iovec iov = {&c, 1};
	assert_int_equal(wait_res(concur_read(NULL, 0, &c, 1, 0, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_read(ex, 0, NULL, 1, 0, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_read(ex, 0, &c, 1, -2, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_readv(ex, 0, &iov, 0, 0, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_writev(ex, 0, NULL, 1, 0, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_openat(ex, AT_FDCWD, NULL, 0, 0, CONCUR_NO_TIMEOUT)),
	                 -EINVAL);
	assert_int_equal(wait_res(concur_connect(ex, 0, NULL, 0, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_sendmsg(ex, 0, NULL, 0, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_fallocate(ex, 0, 0, -1, 1, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_splice(ex, 0, -2, 1, -1, 1, 0, CONCUR_NO_TIMEOUT)),
	                 -EINVAL);
	assert_int_equal(wait_res(concur_timeout(ex, -1)), -EINVAL);
	assert_int_equal(wait_res(concur_nop(NULL)), -EINVAL);
	/* direct forms outside a task */
	assert_int_equal(concur_await_nop(), -EPERM);
	assert_int_equal(concur_await_read(0, &c, 1, 0, CONCUR_NO_TIMEOUT), -EPERM);
	assert_int_equal(concur_await_read(0, NULL, 1, 0, CONCUR_NO_TIMEOUT), -EINVAL);
}

/* ---- nop and timeout ---------------------------------------------------------------------- */

static int64_t nop_task(void *arg)
{
	for (int i = 0; i < 1000; i++)
		if (concur_await_nop() != 0)
			return -1;
	return concur_await_timeout(MS(1));
}

static void test_nop_timeout(void **state)
{
	assert_int_equal(wait_res(concur_nop(ex)), 0);
	assert_int_equal(run_task(nop_task, NULL), 0);
	assert_int_equal(wait_res(concur_timeout(ex, MS(2))), 0);
	concur_future *f = concur_timeout(ex, MS(10000));
	int c = concur_cancel(f);
	assert_true(c == 1 || c == -EINPROGRESS);
	assert_int_equal(concur_result(f, MS(5000)), -ECANCELED);
	assert_true(concur_cancelled(f));
	concur_release(f);
}

/*
 * Future ops made and released on a loop: their records are reused from the loop's cache, so
 * each round must start clean (its SQE, its deadline, its state): a write, a read of what it
 * wrote, and a read with a deadline that must expire on the empty pipe.
 */
static int64_t reuse_task(void *arg)
{
	int *fds = arg;
	for (int i = 0; i < 200; i++) {
		char out[8], in[8] = {0};
		snprintf(out, sizeof(out), "r%05d", i);
		concur_future *w =
		    concur_write(ex, fds[1], out, sizeof(out), -1, CONCUR_NO_TIMEOUT);
		if (concur_result(w, -1) != (int64_t)sizeof(out))
			return -EIO;
		concur_release(w);
		concur_future *r = concur_read(ex, fds[0], in, sizeof(in), -1, MS(10000));
		if (concur_result(r, -1) != (int64_t)sizeof(in) || memcmp(in, out, sizeof(in)))
			return -EILSEQ;
		concur_release(r);
		if (i % 50 == 0) {
			concur_future *t = concur_read(ex, fds[0], in, sizeof(in), -1, MS(1));
			int64_t res = concur_result(t, -1);
			concur_release(t);
			if (res != -ETIMEDOUT)
				return res < 0 ? res : -EPROTO;
		}
	}
	return 0;
}

static void test_future_records_reused(void **state)
{
	int fds[2];
	assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
	assert_int_equal(run_task(reuse_task, fds), 0);
	close(fds[0]);
	close(fds[1]);
}

/* A future op started by a task that ends at once is still the executor's work (counted on
 * the loop): join returns only after its CQE, and the op is done by then. */
static int64_t start_op_task(void *arg)
{
	concur_future **out = arg;
	*out = concur_timeout(ex, MS(20));
	return 0;
}

static void test_future_op_outlives_task(void **state)
{
	concur_future *op = NULL;
	assert_int_equal(run_task(start_op_task, &op), 0);
	assert_non_null(op);
	assert_int_equal(concur_exec_join(ex, MS(10000)), 0);
	assert_true(concur_done(op));
	assert_int_equal(concur_result(op, 0), 0);
	concur_release(op); /* off the loops: the record goes back to malloc */
}

/*
 * A task of the loop an op was started on awaits it in a slot of the op's record, not on the
 * waiter list, and only while the list is empty: the slot's task is woken first. Order forced:
 * A waits in the slot; B, started while A waits, finds the list empty and goes on it (the slot
 * is A's); a cancel breaks A's wait, which gives the slot back; A (shielded) waits again,
 * behind B on the list -- taking the slot again would wake it before B. Both are woken, B
 * first. A slot left behind by the broken wait would resume A twice.
 */
struct here {
	int fd;
	concur_future *op;
	atomic_int a_waiting, b_waiting; /* set just before a wait: no CQE is reaped until then */
	int slot_used, list_used;        /* A in the slot (B's view); B on the list (A's) */
	int order[2], n;
	int64_t res[3];
};

static int64_t here_b_task(void *arg)
{
	struct here *h = arg;
	h->slot_used = concur__waiters_none(h->op);
	atomic_store(&h->b_waiting, 1);
	h->res[1] = concur_result(h->op, -1);
	h->order[h->n++] = 'B';
	return 0;
}

static int64_t here_a_task(void *arg)
{
	struct here *h = arg;
	char c = 0;
	h->op = concur_recv(ex, h->fd, &c, 1, 0, CONCUR_NO_TIMEOUT);
	/* B waits in the ready queue: it runs once A waits */
	concur_future *b = concur_spawn_on(ex, (unsigned)concur_current_loop(), here_b_task, h);
	h->res[2] = concur_result(h->op, -1); /* broken by the test's cancel */
	concur_shield_push();
	h->list_used = !concur__waiters_none(h->op);
	atomic_store(&h->a_waiting, 1);
	h->res[0] = concur_result(h->op, -1);
	h->order[h->n++] = 'A';
	int64_t rb = concur_result(b, -1);
	concur_shield_pop();
	concur_release(b);
	concur_release(h->op);
	return rb < 0 ? rb : c;
}

static void test_await_op_on_its_loop(void **state)
{
	int sv[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	struct here h = {.fd = sv[0]};
	concur_future *a = concur_spawn(ex, here_a_task, &h);
	EVENTUALLY(atomic_load(&h.b_waiting));
	assert_int_equal(concur_cancel(a), -EINPROGRESS);
	EVENTUALLY(atomic_load(&h.a_waiting)); /* (h.op is A's: A releases it) */
	assert_int_equal(write(sv[1], "x", 1), 1);
	assert_int_equal(wait_res(a), 'x');
	assert_int_equal(h.res[2], -ECANCELED);
	assert_true(h.slot_used);
	assert_true(h.list_used);
	assert_int_equal(h.res[0], 1);
	assert_int_equal(h.res[1], 1);
	assert_int_equal(h.n, 2);
	assert_int_equal(h.order[0], 'B');
	assert_int_equal(h.order[1], 'A');
	close(sv[0]);
	close(sv[1]);
}

/* ---- sockets ------------------------------------------------------------------------------ */

struct pair {
	int fd;
	size_t n;
};

static int64_t sender_task(void *arg)
{
	struct pair *p = arg;
	char buf[1000];
	for (size_t i = 0; i < p->n; i += sizeof(buf)) {
		for (size_t j = 0; j < sizeof(buf); j++)
			buf[j] = (char)((i + j) * 7);
		size_t off = 0;
		while (off < sizeof(buf)) {
			int64_t r = concur_await_send(p->fd, buf + off, sizeof(buf) - off,
			                              MSG_NOSIGNAL, CONCUR_NO_TIMEOUT);
			if (r <= 0)
				return r ? r : -EIO;
			off += (size_t)r;
		}
	}
	return concur_await_shutdown(p->fd, SHUT_WR, CONCUR_NO_TIMEOUT);
}

static int64_t receiver_task(void *arg)
{
	struct pair *p = arg;
	char buf[777];
	size_t got = 0;
	for (;;) {
		int64_t r = concur_await_recv(p->fd, buf, sizeof(buf), 0, CONCUR_NO_TIMEOUT);
		if (r < 0)
			return r;
		if (r == 0)
			break;
		for (int64_t j = 0; j < r; j++)
			if (buf[j] != (char)((got + (size_t)j) * 7))
				return -EILSEQ;
		got += (size_t)r;
	}
	return (int64_t)got;
}

static void test_socketpair_tasks(void **state)
{
	int fds[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
	struct pair a = {fds[0], 200000}, b = {fds[1], 0};
	concur_future *fs = concur_spawn(ex, sender_task, &a);
	concur_future *fr = concur_spawn(ex, receiver_task, &b);
	assert_int_equal(wait_res(fs), 0);
	assert_int_equal(wait_res(fr), 200000);
	close(fds[0]);
	close(fds[1]);
}

static int64_t tcp_client_task(void *arg)
{
	uint16_t port = *(uint16_t *)arg;
	struct sockaddr_in a = loopback(port);
	int fd =
	    (int)concur_await_socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0, CONCUR_NO_TIMEOUT);
	if (fd < 0)
		return fd;
	int64_t r = concur_await_connect(fd, (struct sockaddr *)&a, sizeof(a), MS(1000));
	if (r == 0) {
		struct pair p = {fd, 100000};
		r = sender_task(&p);
	}
	concur_await_close(fd, CONCUR_NO_TIMEOUT);
	return r;
}

static int64_t tcp_server_task(void *arg)
{
	int lfd = *(int *)arg;
	struct sockaddr_in peer;
	socklen_t plen = sizeof(peer);
	int fd =
	    (int)concur_await_accept(lfd, (struct sockaddr *)&peer, &plen, SOCK_CLOEXEC, MS(2000));
	if (fd < 0)
		return fd;
	if (peer.sin_family != AF_INET)
		return -EPROTO;
	struct pair p = {fd, 0};
	int64_t r = receiver_task(&p);
	close(fd);
	return r;
}

static void test_tcp_loopback(void **state)
{
	uint16_t port;
	int lfd = listener(&port);
	concur_future *fsrv = concur_spawn(ex, tcp_server_task, &lfd);
	concur_future *fcli = concur_spawn(ex, tcp_client_task, &port);
	assert_int_equal(wait_res(fcli), 0);
	assert_int_equal(wait_res(fsrv), 100000);
	close(lfd);
}

static void test_sendmsg_poll_splice(void **state)
{
	int sp[2], pp[2];
	char a[4] = "abc", b[4] = "de", out[8] = {0};
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sp), 0);
	assert_int_equal(pipe(pp), 0);
	/* poll waits for data */
	concur_future *fp = concur_poll(ex, sp[1], POLLIN, CONCUR_NO_TIMEOUT);
	assert_false(concur_done(fp));
	struct iovec iov[2] = {{a, 3}, {b, 2}};
	struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
	assert_int_equal(wait_res(concur_sendmsg(ex, sp[0], &m, 0, CONCUR_NO_TIMEOUT)), 5);
	assert_true(wait_res(fp) & POLLIN);
	/* splice socket -> pipe, then recvmsg the rest */
	assert_int_equal(wait_res(concur_splice(ex, sp[1], -1, pp[1], -1, 3, 0, CONCUR_NO_TIMEOUT)),
	                 3);
	assert_int_equal(read(pp[0], out, sizeof(out)), 3);
	assert_memory_equal(out, "abc", 3);
	struct iovec riov = {out, sizeof(out)};
	struct msghdr rm = {.msg_iov = &riov, .msg_iovlen = 1};
	assert_int_equal(wait_res(concur_recvmsg(ex, sp[1], &rm, 0, CONCUR_NO_TIMEOUT)), 2);
	assert_memory_equal(out, "de", 2);
	/* poll with a deadline that expires */
	assert_int_equal(wait_res(concur_poll(ex, sp[1], POLLIN, MS(20))), -ETIMEDOUT);
	close(sp[0]);
	close(sp[1]);
	close(pp[0]);
	close(pp[1]);
}

/* ---- cancellation and deadlines ------------------------------------------------------------- */

static void test_cancel_recv(void **state)
{
	int fds[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
	for (int i = 0; i < 50; i++) {
		char *buf = malloc(64);
		concur_future *f = concur_recv(ex, fds[1], buf, 64, 0, CONCUR_NO_TIMEOUT);
		if (i & 1)
			usleep(1000); /* sometimes in flight for sure, sometimes maybe not yet */
		int c = concur_cancel(f);
		assert_true(c == 1 || c == -EINPROGRESS);
		assert_int_equal(concur_result(f, MS(5000)), -ECANCELED);
		assert_true(concur_cancelled(f));
		assert_int_equal(concur_cancel(f), 1);
		concur_release(f);
		free(buf); /* the kernel is done with it: the future said so */
	}
	/* the data goes to the next reader, not into a freed buffer */
	char got[8] = {0};
	assert_int_equal(write(fds[0], "data", 4), 4);
	assert_int_equal(wait_res(concur_recv(ex, fds[1], got, sizeof(got), 0, CONCUR_NO_TIMEOUT)),
	                 4);
	assert_memory_equal(got, "data", 4);
	/* too late to cancel a finished op */
	concur_future *f = concur_nop(ex);
	assert_int_equal(concur_result(f, -1), 0);
	assert_int_equal(concur_cancel(f), 0);
	concur_release(f);
	close(fds[0]);
	close(fds[1]);
}

static void test_deadline_recv(void **state)
{
	int fds[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
	char *buf = malloc(64);
	int64_t t0 = 0;
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	t0 = ts.tv_sec * MS(1000) + ts.tv_nsec;
	concur_future *f = concur_recv(ex, fds[1], buf, 64, 0, MS(30));
	assert_int_equal(concur_result(f, MS(5000)), -ETIMEDOUT);
	clock_gettime(CLOCK_MONOTONIC, &ts);
	assert_true(ts.tv_sec * MS(1000) + ts.tv_nsec - t0 >= MS(29));
	assert_false(concur_cancelled(f));
	concur_release(f);
	free(buf);
	/* a deadline that does not expire leaves the result alone */
	char got[8];
	assert_int_equal(write(fds[0], "x", 1), 1);
	assert_int_equal(wait_res(concur_recv(ex, fds[1], got, sizeof(got), 0, MS(5000))), 1);
	close(fds[0]);
	close(fds[1]);
}

static int64_t deadline_task(void *arg)
{
	char buf[16];
	return concur_await_recv(*(int *)arg, buf, sizeof(buf), 0, MS(20));
}

static void test_deadline_direct(void **state)
{
	int fds[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
	assert_int_equal(run_task(deadline_task, &fds[1]), -ETIMEDOUT);
	close(fds[0]);
	close(fds[1]);
}

static int64_t reset_task(void *arg)
{
	int fd = *(int *)arg;
	char buf[16];
	return concur_await_recv(fd, buf, sizeof(buf), 0, MS(5000));
}

static void test_econnreset(void **state)
{
	uint16_t port;
	int lfd = listener(&port);
	int cfd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = loopback(port);
	assert_int_equal(connect(cfd, (struct sockaddr *)&a, sizeof(a)), 0);
	int sfd = (int)wait_res(concur_accept(ex, lfd, NULL, NULL, 0, MS(1000)));
	assert_true(sfd >= 0);
	concur_future *f = concur_spawn(ex, reset_task, &sfd);
	usleep(10000);
	struct linger lg = {1, 0};
	setsockopt(cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close(cfd); /* RST */
	assert_int_equal(wait_res(f), -ECONNRESET);
	close(sfd);
	close(lfd);
}

/* ---- many connections ----------------------------------------------------------------------- */

#define NCONN      1000
#define CONN_BYTES 3000

static uint16_t many_port;
static int many_lfd;

static int64_t echo_conn_task(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[1024];
	int64_t r;
	while ((r = concur_await_recv(fd, buf, sizeof(buf), 0, CONCUR_NO_TIMEOUT)) > 0) {
		int64_t off = 0;
		while (off < r) {
			int64_t w = concur_await_send(fd, buf + off, (size_t)(r - off),
			                              MSG_NOSIGNAL, CONCUR_NO_TIMEOUT);
			if (w <= 0)
				goto out;
			off += w;
		}
	}
out:
	concur_await_close(fd, CONCUR_NO_TIMEOUT);
	return r;
}

static int64_t many_acceptor(void *arg)
{
	for (int i = 0; i < NCONN; i++) {
		int fd = (int)concur_await_accept(many_lfd, NULL, NULL, SOCK_CLOEXEC, MS(20000));
		if (fd < 0)
			return fd;
		concur_release(concur_spawn(ex, echo_conn_task, (void *)(intptr_t)fd));
	}
	return 0;
}

static int64_t many_client(void *arg)
{
	unsigned id = (unsigned)(uintptr_t)arg;
	struct sockaddr_in a = loopback(many_port);
	char out[CONN_BYTES], in[CONN_BYTES];
	for (int i = 0; i < CONN_BYTES; i++)
		out[i] = (char)(id * 31 + (unsigned)i * 13);
	int fd =
	    (int)concur_await_socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0, CONCUR_NO_TIMEOUT);
	if (fd < 0)
		return fd;
	int64_t r = concur_await_connect(fd, (struct sockaddr *)&a, sizeof(a), CONCUR_NO_TIMEOUT);
	size_t sent = 0, got = 0;
	/* interleave: send a slice, read what came back */
	while (r == 0 && got < CONN_BYTES) {
		if (sent < CONN_BYTES) {
			size_t n = CONN_BYTES - sent < 500 ? CONN_BYTES - sent : 500;
			int64_t w =
			    concur_await_send(fd, out + sent, n, MSG_NOSIGNAL, CONCUR_NO_TIMEOUT);
			if (w <= 0) {
				r = w ? w : -EIO;
				break;
			}
			sent += (size_t)w;
		}
		int64_t g = concur_await_recv(fd, in + got, CONN_BYTES - got, 0, CONCUR_NO_TIMEOUT);
		if (g <= 0) {
			r = g ? g : -EPIPE;
			break;
		}
		got += (size_t)g;
	}
	concur_await_close(fd, CONCUR_NO_TIMEOUT);
	if (r)
		return r;
	return memcmp(in, out, CONN_BYTES) ? -EILSEQ : 0;
}

static void test_many_connections(void **state)
{
	static concur_future *fs[NCONN];
	many_lfd = listener(&many_port);
	concur_future *acc = concur_spawn(ex, many_acceptor, NULL);
	for (unsigned i = 0; i < NCONN; i++)
		fs[i] = concur_spawn(ex, many_client, (void *)(uintptr_t)i);
	int bad = 0;
	for (unsigned i = 0; i < NCONN; i++) {
		int64_t r = wait_res(fs[i]);
		if (r != 0 && bad++ < 5)
			fprintf(stderr, "client %u: %s\n", i, concur_strerror(r));
	}
	assert_int_equal(bad, 0);
	assert_int_equal(wait_res(acc), 0);
	assert_int_equal(concur_exec_join(ex, MS(10000)), 0);
	close(many_lfd);
}

/* ---- the operations not covered above ---------------------------------------------------------
 */

/* A temp file opened O_RDWR | O_CREAT | O_TRUNC by the test thread. */
static int temp_file(char *path, size_t n, const char *what)
{
	temp_path(path, n, what);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	assert_true(fd >= 0);
	return fd;
}

/* A descriptor number that is not open: high, so that files opened later do not take it. */
static int closed_fd(void)
{
	struct rlimit rl;
	assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
	int low = rl.rlim_cur > 100000 ? 100000 : (int)rl.rlim_cur - 16;
	int fd = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, low);
	assert_true(fd >= low);
	close(fd);
	return fd;
}

struct vec_args {
	int fd, bad_fd;
	char got[64];
};

static int64_t vectored_task(void *arg)
{
	struct vec_args *a = arg;
	char x[8] = {0}, y[8] = {0}, z[16] = {0};
	/* writev at offset 4 (a hole before it), three pieces */
	struct iovec wv[3] = {{"alpha-", 6}, {"beta-", 5}, {"gamma", 5}};
	if (concur_await_writev(a->fd, wv, 3, 4, CONCUR_NO_TIMEOUT) != 16)
		return -100;
	/* a positioned write leaves the file position at 0: -1 writes there and moves it */
	struct iovec hv[2] = {{"H", 1}, {"h", 1}};
	if (concur_await_writev(a->fd, hv, 2, -1, CONCUR_NO_TIMEOUT) != 2)
		return -101;
	if (lseek(a->fd, 0, SEEK_CUR) != 2)
		return -102;
	/* readv at offset 7 ("ha-beta-gamma"), split across three buffers of 3 + 6 + rest */
	struct iovec rv[3] = {{x, 3}, {y, 6}, {z, sizeof(z)}};
	if (concur_await_readv(a->fd, rv, 3, 7, CONCUR_NO_TIMEOUT) != 13)
		return -103;
	if (memcmp(x, "ha-", 3) || memcmp(y, "beta-g", 6) || memcmp(z, "amma", 4))
		return -104;
	/* readv at -1 reads from the position (2): the rest of the hole, then the data */
	struct iovec cv[2] = {{a->got, 2}, {a->got + 2, sizeof(a->got) - 2}};
	if (concur_await_readv(a->fd, cv, 2, -1, CONCUR_NO_TIMEOUT) != 18)
		return -105;
	if (lseek(a->fd, 0, SEEK_CUR) != 20)
		return -106;
	/* at end of file: 0 */
	if (concur_await_readv(a->fd, rv, 3, 100, CONCUR_NO_TIMEOUT) != 0)
		return -107;
	/* bad input */
	if (concur_await_readv(a->fd, NULL, 1, 0, CONCUR_NO_TIMEOUT) != -EINVAL)
		return -108;
	if (concur_await_writev(a->fd, wv, 0, 0, CONCUR_NO_TIMEOUT) != -EINVAL)
		return -109;
	if (concur_await_readv(a->fd, rv, 1, -2, CONCUR_NO_TIMEOUT) != -EINVAL)
		return -110;
	if (concur_await_writev(a->bad_fd, wv, 3, 0, CONCUR_NO_TIMEOUT) != -EBADF)
		return -111;
	if (concur_await_readv(a->bad_fd, rv, 3, 0, CONCUR_NO_TIMEOUT) != -EBADF)
		return -112;
	return 0;
}

static void test_vectored_direct(void **state)
{
	char path[128], buf[32];
	struct vec_args a = {.bad_fd = closed_fd()};
	a.fd = temp_file(path, sizeof(path), "vectored");
	assert_int_equal(run_task(vectored_task, &a), 0);
	assert_memory_equal(a.got, "\0\0alpha-beta-gamma", 18);
	assert_int_equal(pread(a.fd, buf, sizeof(buf), 0), 20);
	assert_memory_equal(buf, "Hh\0\0alpha-beta-gamma", 20);
	/* outside a task */
	struct iovec iov = {buf, 1};
	assert_int_equal(concur_await_readv(a.fd, &iov, 1, 0, CONCUR_NO_TIMEOUT), -EPERM);
	assert_int_equal(concur_await_writev(a.fd, &iov, 1, 0, CONCUR_NO_TIMEOUT), -EPERM);
	close(a.fd);
	unlink(path);
}

static int64_t fallocate_task(void *arg)
{
	int *fds = arg;
	if (concur_await_fallocate(fds[0], 0, 0, 8192, CONCUR_NO_TIMEOUT) != 0)
		return -100;
	/* beyond the end: the file grows to off + len */
	if (concur_await_fallocate(fds[0], 0, 16384, 4096, MS(1000)) != 0)
		return -101;
	/* KEEP_SIZE reserves blocks without changing the size */
	if (concur_await_fallocate(fds[0], FALLOC_FL_KEEP_SIZE, 0, 65536, CONCUR_NO_TIMEOUT) != 0)
		return -102;
	if (concur_await_fallocate(fds[0], 0, -1, 4096, CONCUR_NO_TIMEOUT) != -EINVAL)
		return -103;
	if (concur_await_fallocate(fds[0], 0, 0, -4096, CONCUR_NO_TIMEOUT) != -EINVAL)
		return -104;
	if (concur_await_fallocate(fds[1], 0, 0, 4096, CONCUR_NO_TIMEOUT) != -EBADF)
		return -105;
	return 0;
}

static void test_fallocate_direct(void **state)
{
	char path[128], buf[64];
	struct stat st;
	int fds[2] = {temp_file(path, sizeof(path), "fallocate"), closed_fd()};
	assert_int_equal(write(fds[0], "keep", 4), 4);
	assert_int_equal(run_task(fallocate_task, fds), 0);
	assert_int_equal(fstat(fds[0], &st), 0);
	assert_int_equal(st.st_size, 16384 + 4096);
	assert_true(st.st_blocks * 512 >= 65536); /* the KEEP_SIZE reservation is allocated */
	/* the data written before is untouched; the allocated range reads as zeros */
	assert_int_equal(pread(fds[0], buf, sizeof(buf), 0), (ssize_t)sizeof(buf));
	assert_memory_equal(buf, "keep", 4);
	for (size_t i = 4; i < sizeof(buf); i++)
		assert_int_equal(buf[i], 0);
	assert_int_equal(concur_await_fallocate(fds[0], 0, 0, 1, CONCUR_NO_TIMEOUT), -EPERM);
	close(fds[0]);
	unlink(path);
}

static void test_mkdirat_renameat(void **state)
{
	char dir[128], dir2[128];
	struct stat st;
	temp_path(dir, sizeof(dir), "mkdir");
	temp_path(dir2, sizeof(dir2), "mkdir-renamed");
	assert_int_equal(wait_res(concur_mkdirat(ex, AT_FDCWD, dir, 0750, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(stat(dir, &st), 0);
	assert_true(S_ISDIR(st.st_mode));
	assert_int_equal(st.st_mode & 0700, 0700); /* the umask may only clear group/other bits */
	assert_int_equal(st.st_mode & 0027, 0);
	assert_int_equal(wait_res(concur_mkdirat(ex, AT_FDCWD, dir, 0700, MS(1000))), -EEXIST);
	/* relative to a directory descriptor */
	int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	assert_true(dfd >= 0);
	assert_int_equal(wait_res(concur_mkdirat(ex, dfd, "a", 0700, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(wait_res(concur_mkdirat(ex, dfd, "b", 0700, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(fstatat(dfd, "a", &st, 0), 0);
	assert_true(S_ISDIR(st.st_mode));
	/* renameat2 flags reach the kernel: NOREPLACE refuses an existing target */
	assert_int_equal(
	    wait_res(concur_renameat(ex, dfd, "a", dfd, "b", RENAME_NOREPLACE, CONCUR_NO_TIMEOUT)),
	    -EEXIST);
	assert_int_equal(wait_res(concur_renameat(ex, dfd, "a", dfd, "c", 0, CONCUR_NO_TIMEOUT)),
	                 0);
	assert_int_equal(fstatat(dfd, "a", &st, 0), -1);
	assert_int_equal(errno, ENOENT);
	assert_int_equal(fstatat(dfd, "c", &st, 0), 0);
	assert_true(S_ISDIR(st.st_mode));
	assert_int_equal(wait_res(concur_renameat(ex, dfd, "a", dfd, "d", 0, CONCUR_NO_TIMEOUT)),
	                 -ENOENT);
	/* across directory descriptors: dfd's "c" becomes AT_FDCWD's dir2 */
	assert_int_equal(wait_res(concur_renameat(ex, dfd, "c", AT_FDCWD, dir2, 0, MS(1000))), 0);
	assert_int_equal(stat(dir2, &st), 0);
	assert_true(S_ISDIR(st.st_mode));
	assert_int_equal(fstatat(dfd, "c", &st, 0), -1);
	/* bad input */
	assert_int_equal(wait_res(concur_mkdirat(ex, AT_FDCWD, NULL, 0700, CONCUR_NO_TIMEOUT)),
	                 -EINVAL);
	assert_int_equal(
	    wait_res(concur_renameat(ex, AT_FDCWD, NULL, AT_FDCWD, dir2, 0, CONCUR_NO_TIMEOUT)),
	    -EINVAL);
	assert_int_equal(
	    wait_res(concur_renameat(ex, AT_FDCWD, dir2, AT_FDCWD, NULL, 0, CONCUR_NO_TIMEOUT)),
	    -EINVAL);
	assert_int_equal(wait_res(concur_mkdirat(ex, closed_fd(), "x", 0700, CONCUR_NO_TIMEOUT)),
	                 -EBADF);
	assert_int_equal(wait_res(concur_mkdirat(NULL, AT_FDCWD, dir, 0700, CONCUR_NO_TIMEOUT)),
	                 -EINVAL);
	/* cleanup */
	close(dfd);
	assert_int_equal(unlinkat(AT_FDCWD, dir2, AT_REMOVEDIR), 0);
	char sub[160];
	snprintf(sub, sizeof(sub), "%s/b", dir);
	assert_int_equal(rmdir(sub), 0);
	assert_int_equal(rmdir(dir), 0);
}

static void test_socket_future(void **state)
{
	int type = 0, domain = 0;
	socklen_t len = sizeof(type);
	int fd = (int)wait_res(
	    concur_socket(ex, AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0, CONCUR_NO_TIMEOUT));
	assert_true(fd >= 0);
	assert_int_equal(getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len), 0);
	assert_int_equal(type, SOCK_STREAM);
	len = sizeof(domain);
	assert_int_equal(getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len), 0);
	assert_int_equal(domain, AF_INET);
	assert_true(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	/* a usable socket: it connects to a listener */
	uint16_t port;
	int lfd = listener(&port);
	struct sockaddr_in a = loopback(port);
	assert_int_equal(
	    wait_res(concur_connect(ex, fd, (struct sockaddr *)&a, sizeof(a), MS(1000))), 0);
	close(fd);
	close(lfd);
	/* a datagram socket, with a deadline that does not expire */
	fd = (int)wait_res(concur_socket(ex, AF_UNIX, SOCK_DGRAM, 0, MS(1000)));
	assert_true(fd >= 0);
	len = sizeof(type);
	assert_int_equal(getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len), 0);
	assert_int_equal(type, SOCK_DGRAM);
	assert_false(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	close(fd);
	/* the kernel's errors */
	assert_int_equal(wait_res(concur_socket(ex, 4095, SOCK_STREAM, 0, CONCUR_NO_TIMEOUT)),
	                 -EAFNOSUPPORT);
	assert_int_equal(
	    wait_res(concur_socket(ex, AF_INET, SOCK_STREAM, IPPROTO_UDP, CONCUR_NO_TIMEOUT)),
	    -EPROTONOSUPPORT);
	assert_int_equal(wait_res(concur_socket(NULL, AF_INET, SOCK_STREAM, 0, CONCUR_NO_TIMEOUT)),
	                 -EINVAL);
}

static void test_send_shutdown_futures(void **state)
{
	int sp[2], pp[2];
	char buf[16] = {0};
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), 0);
	assert_int_equal(
	    wait_res(concur_send(ex, sp[0], "ping", 4, MSG_NOSIGNAL, CONCUR_NO_TIMEOUT)), 4);
	assert_int_equal(wait_res(concur_send(ex, sp[0], "pong", 4, MSG_NOSIGNAL, MS(1000))), 4);
	assert_int_equal(recv(sp[1], buf, sizeof(buf), MSG_WAITALL | MSG_DONTWAIT), 8);
	assert_memory_equal(buf, "pingpong", 8);
	/* a zero-length send is fine */
	assert_int_equal(wait_res(concur_send(ex, sp[0], NULL, 0, MSG_NOSIGNAL, CONCUR_NO_TIMEOUT)),
	                 0);
	/* the peer is waiting for data when the write side shuts down: it reads EOF */
	concur_future *r = concur_recv(ex, sp[1], buf, sizeof(buf), 0, CONCUR_NO_TIMEOUT);
	assert_int_equal(concur_result(r, MS(20)), -ETIMEDOUT); /* nothing to read yet */
	assert_int_equal(wait_res(concur_shutdown(ex, sp[0], SHUT_WR, CONCUR_NO_TIMEOUT)), 0);
	assert_int_equal(wait_res(r), 0);
	assert_int_equal(recv(sp[1], buf, sizeof(buf), MSG_DONTWAIT), 0); /* and stays at EOF */
	/* no more sending on the shut side; the other direction still works (half close) */
	assert_int_equal(
	    wait_res(concur_send(ex, sp[0], "late", 4, MSG_NOSIGNAL, CONCUR_NO_TIMEOUT)), -EPIPE);
	assert_int_equal(
	    wait_res(concur_send(ex, sp[1], "back", 4, MSG_NOSIGNAL, CONCUR_NO_TIMEOUT)), 4);
	assert_int_equal(recv(sp[0], buf, sizeof(buf), 0), 4);
	assert_memory_equal(buf, "back", 4);
	/* bad input */
	assert_int_equal(wait_res(concur_send(ex, sp[0], NULL, 1, 0, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_send(NULL, sp[0], "x", 1, 0, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(wait_res(concur_shutdown(ex, sp[0], 42, CONCUR_NO_TIMEOUT)), -EINVAL);
	assert_int_equal(pipe(pp), 0);
	assert_int_equal(wait_res(concur_shutdown(ex, pp[0], SHUT_RDWR, CONCUR_NO_TIMEOUT)),
	                 -ENOTSOCK);
	int bad = closed_fd();
	assert_int_equal(wait_res(concur_send(ex, bad, "x", 1, MSG_NOSIGNAL, CONCUR_NO_TIMEOUT)),
	                 -EBADF);
	assert_int_equal(wait_res(concur_shutdown(ex, bad, SHUT_WR, CONCUR_NO_TIMEOUT)), -EBADF);
	close(pp[0]);
	close(pp[1]);
	close(sp[0]);
	close(sp[1]);
}

struct msg_args {
	int sp[2];
	int pp[2]; /* a pipe whose write end travels over the socket */
	int got_fd;
};

static int64_t msg_task(void *arg)
{
	struct msg_args *a = arg;
	/* sendmsg: three pieces and an SCM_RIGHTS control message */
	struct iovec wv[3] = {{"one,", 4}, {"two,", 4}, {"three", 5}};
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl, rctl;
	memset(&ctl, 0, sizeof(ctl));
	memset(&rctl, 0, sizeof(rctl));
	struct msghdr m = {.msg_iov = wv,
	                   .msg_iovlen = 3,
	                   .msg_control = ctl.buf,
	                   .msg_controllen = sizeof(ctl.buf)};
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &a->pp[1], sizeof(int));
	if (concur_await_sendmsg(a->sp[0], &m, MSG_NOSIGNAL, CONCUR_NO_TIMEOUT) != 13)
		return -100;
	/* recvmsg: the bytes spread over iovecs cut elsewhere, and the descriptor */
	char x[6] = {0}, y[16] = {0};
	struct iovec rv[2] = {{x, sizeof(x)}, {y, sizeof(y)}};
	struct msghdr rm = {.msg_iov = rv,
	                    .msg_iovlen = 2,
	                    .msg_control = rctl.buf,
	                    .msg_controllen = sizeof(rctl.buf)};
	if (concur_await_recvmsg(a->sp[1], &rm, MSG_CMSG_CLOEXEC, MS(1000)) != 13)
		return -101;
	if (memcmp(x, "one,tw", 6) || memcmp(y, "o,three", 7))
		return -102;
	if (rm.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
		return -103;
	c = CMSG_FIRSTHDR(&rm);
	if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
	    c->cmsg_len != CMSG_LEN(sizeof(int)))
		return -104;
	memcpy(&a->got_fd, CMSG_DATA(c), sizeof(int));
	/* bad input */
	if (concur_await_recvmsg(a->sp[1], NULL, 0, CONCUR_NO_TIMEOUT) != -EINVAL)
		return -105;
	if (concur_await_sendmsg(a->sp[0], NULL, 0, CONCUR_NO_TIMEOUT) != -EINVAL)
		return -106;
	/* with a deadline that expires: nothing comes */
	if (concur_await_recvmsg(a->sp[1], &rm, 0, MS(20)) != -ETIMEDOUT)
		return -107;
	return 0;
}

static void test_msg_direct(void **state)
{
	struct msg_args a = {.got_fd = -1};
	char c = 0;
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a.sp), 0);
	assert_int_equal(pipe(a.pp), 0);
	assert_int_equal(run_task(msg_task, &a), 0);
	/* the received descriptor is a working copy of the pipe's write end */
	assert_true(a.got_fd >= 0);
	assert_true(a.got_fd != a.pp[1]);
	assert_true(fcntl(a.got_fd, F_GETFD) & FD_CLOEXEC);
	assert_int_equal(write(a.got_fd, "!", 1), 1);
	assert_int_equal(read(a.pp[0], &c, 1), 1);
	assert_int_equal(c, '!');
	/* EBADF, and outside a task */
	struct msghdr m = {0};
	int bad = closed_fd();
	assert_int_equal(wait_res(concur_recvmsg(ex, bad, &m, 0, CONCUR_NO_TIMEOUT)), -EBADF);
	assert_int_equal(concur_await_recvmsg(a.sp[1], &m, 0, CONCUR_NO_TIMEOUT), -EPERM);
	assert_int_equal(concur_await_sendmsg(a.sp[0], &m, 0, CONCUR_NO_TIMEOUT), -EPERM);
	close(a.got_fd);
	close(a.pp[0]);
	close(a.pp[1]);
	close(a.sp[0]);
	close(a.sp[1]);
}

static int64_t poll_task(void *arg)
{
	return concur_await_poll(*(int *)arg, POLLIN, CONCUR_NO_TIMEOUT);
}

static int64_t poll_checks_task(void *arg)
{
	int *sp = arg;
	/* a socket with room to write is writable at once, not readable */
	int64_t r = concur_await_poll(sp[0], POLLOUT, CONCUR_NO_TIMEOUT);
	if (r < 0 || !(r & POLLOUT) || (r & POLLIN))
		return -100;
	/* nothing to read: the deadline ends the poll */
	if (concur_await_poll(sp[0], POLLIN, MS(20)) != -ETIMEDOUT)
		return -101;
	/* a closed descriptor */
	if (concur_await_poll(sp[2], POLLIN, CONCUR_NO_TIMEOUT) != -EBADF)
		return -102;
	return 0;
}

static void test_poll_direct(void **state)
{
	int sp[3];
	char buf[4];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), 0);
	sp[2] = closed_fd();
	assert_int_equal(run_task(poll_checks_task, sp), 0);
	/* a task polls an empty socket: it waits until the peer writes */
	concur_future *f = concur_spawn(ex, poll_task, &sp[1]);
	assert_int_equal(concur_result(f, MS(20)), -ETIMEDOUT); /* not readable yet */
	assert_int_equal(write(sp[0], "abc", 3), 3);
	int64_t r = wait_res(f);
	assert_true(r > 0);
	assert_true(r & POLLIN);
	/* one-shot, and poll consumes nothing: the data is still there */
	assert_int_equal(read(sp[1], buf, sizeof(buf)), 3);
	assert_memory_equal(buf, "abc", 3);
	/* the peer shutting down its write side makes it readable too (EOF) */
	f = concur_spawn(ex, poll_task, &sp[1]);
	assert_int_equal(shutdown(sp[0], SHUT_WR), 0);
	r = wait_res(f);
	assert_true(r > 0);
	assert_true(r & POLLIN);
	assert_int_equal(concur_await_poll(sp[1], POLLIN, CONCUR_NO_TIMEOUT), -EPERM);
	close(sp[0]);
	close(sp[1]);
}

struct splice_args {
	int in, out, bad;
};

static int64_t splice_task(void *arg)
{
	struct splice_args *a = arg;
	int pp[2];
	int64_t r = 0;
	if (pipe(pp))
		return -errno;
	/* file (at offset 6) -> pipe -> file (at offset 3) */
	if (concur_await_splice(a->in, 6, pp[1], -1, 5, 0, CONCUR_NO_TIMEOUT) != 5)
		r = -100;
	else if (concur_await_splice(pp[0], -1, a->out, 3, 100, 0, MS(1000)) != 5)
		r = -101;
	/* -1 on the file: its current position (0), which moves */
	else if (concur_await_splice(a->in, -1, pp[1], -1, 4, 0, CONCUR_NO_TIMEOUT) != 4)
		r = -102;
	else if (lseek(a->in, 0, SEEK_CUR) != 4)
		r = -103;
	else if (concur_await_splice(pp[0], -1, a->out, 8, 4, 0, CONCUR_NO_TIMEOUT) != 4)
		r = -104;
	/* an empty pipe with SPLICE_F_NONBLOCK does not wait */
	else if (concur_await_splice(pp[0], -1, a->out, 0, 4, SPLICE_F_NONBLOCK,
	                             CONCUR_NO_TIMEOUT) != -EAGAIN)
		r = -105;
	/* neither side a pipe */
	else if (concur_await_splice(a->in, 0, a->out, 0, 4, 0, CONCUR_NO_TIMEOUT) != -EINVAL)
		r = -106;
	else if (concur_await_splice(a->in, -2, pp[1], -1, 4, 0, CONCUR_NO_TIMEOUT) != -EINVAL)
		r = -107;
	else if (concur_await_splice(a->bad, 0, pp[1], -1, 4, 0, CONCUR_NO_TIMEOUT) != -EBADF)
		r = -108;
	close(pp[0]);
	close(pp[1]);
	return r;
}

static void test_splice_direct(void **state)
{
	char in_path[128], out_path[128], buf[32] = {0};
	struct splice_args a;
	a.in = temp_file(in_path, sizeof(in_path), "splice-in");
	a.out = temp_file(out_path, sizeof(out_path), "splice-out");
	a.bad = closed_fd();
	assert_int_equal(write(a.in, "0123456789abcdef", 16), 16);
	assert_int_equal(lseek(a.in, 0, SEEK_SET), 0);
	assert_int_equal(run_task(splice_task, &a), 0);
	assert_int_equal(pread(a.out, buf, sizeof(buf), 0), 12);
	assert_memory_equal(buf,
	                    "\0\0\0"
	                    "6789a"
	                    "0123",
	                    12);
	assert_int_equal(lseek(a.out, 0, SEEK_CUR), 0); /* offsets given: position untouched */
	assert_int_equal(concur_await_splice(a.in, 0, a.out, 0, 1, 0, CONCUR_NO_TIMEOUT), -EPERM);
	close(a.in);
	close(a.out);
	unlink(in_path);
	unlink(out_path);
}

/*
 * A splice from an empty pipe blocks in a kernel worker; stopped there, the kernel says so with
 * its own restart code (ERESTARTSYS, -512), which once came back to the caller as the result.
 * Its deadline ends it -ETIMEDOUT, a cancel -ECANCELED (CANCELLED), as for any op.
 */
static int64_t splice_blocked_task(void *arg)
{
	int *fds = arg; /* {pipe read end, /dev/null} */
	return concur_await_splice(fds[0], -1, fds[1], -1, 4096, 0, MS(50));
}

static void test_splice_stopped_in_worker(void **state)
{
	int p[2];
	assert_int_equal(pipe(p), 0); /* the write end stays open: the read waits */
	int fds[2] = {p[0], open("/dev/null", O_WRONLY | O_CLOEXEC)};
	assert_true(fds[1] >= 0);
	assert_int_equal(run_task(splice_blocked_task, fds), -ETIMEDOUT);
	concur_future *f = concur_splice(ex, p[0], -1, fds[1], -1, 4096, 0, CONCUR_NO_TIMEOUT);
	assert_int_equal(concur_result(f, MS(20)), -ETIMEDOUT); /* (in the worker by now) */
	assert_int_equal(concur_cancel(f), -EINPROGRESS);
	assert_int_equal(concur_result(f, MS(10000)), -ECANCELED);
	assert_true(concur_cancelled(f));
	concur_release(f);
	close(p[0]);
	close(p[1]);
	close(fds[1]);
}

/*
 * The future form's deadline stops an op blocked in a kernel worker too: it rides the loop's
 * timer, whose firing cancels the op. It was a linked timeout, which the kernel does not fire
 * for such an op: the future waited for the op (for ever, for a pipe nobody writes).
 */
/* Release an op, stopped first if it is still in the worker (it would hold the teardown). */
static void stop_op(concur_future *f)
{
	if (!concur_done(f)) {
		concur_cancel(f);
		concur_result(f, -1);
	}
	concur_release(f);
}

static int64_t splice_future_timed_task(void *arg)
{
	int *fds = arg;
	concur_future *f = concur_splice(ex, fds[0], -1, fds[1], -1, 4096, 0, MS(50));
	int64_t r = concur_result(f, MS(5000));
	bool done = concur_done(f), cancelled = concur_cancelled(f);
	stop_op(f);
	return done && !cancelled ? r : -EPROTO;
}

static int64_t splice_then_timer_left(void *arg)
{
	int *fds = arg; /* {pipe read end, /dev/null}; the pipe's write end is fds[2] */
	char c = 'x';
	if (write(fds[2], &c, 1) != 1)
		return -EIO;
	concur_future *f = concur_splice(ex, fds[0], -1, fds[1], -1, 4096, 0, MS(5000));
	int64_t r = concur_result(f, -1);
	concur_release(f);
	if (r != 1)
		return r < 0 ? r : -EPROTO;
	if (concur__tl_loop->timers.n != 0)
		return -1000; /* the op that ended first is still on the timer */
	f = concur_splice(ex, fds[0], -1, fds[1], -1, 4096, 0, MS(20));
	r = concur_result(f, -1);
	concur_release(f);
	if (r != -ETIMEDOUT)
		return r < 0 ? r : -EPROTO;
	return concur__tl_loop->timers.n != 0 ? -1001 : 0;
}

static void test_splice_future_deadline_in_worker(void **state)
{
	int p[2];
	assert_int_equal(pipe(p), 0); /* the write end stays open: the read waits */
	int fds[3] = {p[0], open("/dev/null", O_WRONLY | O_CLOEXEC), p[1]};
	assert_true(fds[1] >= 0);
	/* made on the loop (submitted at once), and from a thread outside (posted to a loop) */
	assert_int_equal(run_task(splice_future_timed_task, fds), -ETIMEDOUT);
	concur_future *f = concur_splice(ex, p[0], -1, fds[1], -1, 4096, 0, MS(50));
	int64_t r = concur_result(f, MS(5000));
	bool done = concur_done(f), cancelled = concur_cancelled(f);
	stop_op(f);
	assert_true(done); /* the op's own end, not this wait's */
	assert_int_equal(r, -ETIMEDOUT);
	assert_false(cancelled);
	/* an op that ends before its deadline takes it off the loop's timer, and one that timed out
	 * is off it too: nothing is left to fire at a record that is gone or reused */
	assert_int_equal(run_task(splice_then_timer_left, fds), 0);
	close(p[0]);
	close(p[1]);
	close(fds[1]);
}

/*
 * A cancel from a thread outside the executor is a message to the op's loop; the op may end by
 * itself before it arrives, and the executor go idle and be freed. The message was no work: the
 * free went ahead while the canceller was on its way, which then posted into the freed loop
 * (ASan: heap-use-after-free in the inbox push) or into a ring no longer reaped (the op's record
 * leaked). The canceller is held where it takes its reference, just before it posts
 * (concur_retain, wrapped at link time for this test), while the op ends and another thread
 * frees the executor: the free must wait for the message.
 */
static _Atomic int retain_hold, retain_held, retain_go;
static pthread_t retain_holder;

concur_future *__real_concur_retain(concur_future *f);
concur_future *__wrap_concur_retain(concur_future *f);
concur_future *__wrap_concur_retain(concur_future *f)
{
	if (atomic_load(&retain_hold) && pthread_equal(pthread_self(), retain_holder) &&
	    atomic_exchange(&retain_hold, 0)) {
		atomic_store(&retain_held, 1);
		while (!atomic_load(&retain_go))
			usleep(100);
	}
	return __real_concur_retain(f);
}

static void *cancel_held_at_retain(void *arg)
{
	retain_holder = pthread_self();
	atomic_store(&retain_hold, 1);
	return (void *)(intptr_t)concur_cancel(arg);
}

static _Atomic int freed;

static void *free_exec(void *arg)
{
	concur_exec_free(arg);
	atomic_store(&freed, 1);
	return NULL;
}

static void test_cancel_message_outlives_op(void **state)
{
	concur_exec *e;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&e, &o), 0);
	int p[2];
	assert_int_equal(pipe(p), 0);
	char c;
	concur_future *f = concur_read(e, p[0], &c, 1, -1, CONCUR_NO_TIMEOUT);
	assert_true(flag_set(&e->loops[0]->sleeping)); /* the read is in the kernel */
	atomic_store(&retain_held, 0);
	atomic_store(&retain_go, 0);
	atomic_store(&freed, 0);
	pthread_t canceller, freer;
	assert_int_equal(pthread_create(&canceller, NULL, cancel_held_at_retain, f), 0);
	while (!atomic_load(&retain_held))
		usleep(100);
	assert_int_equal(write(p[1], "x", 1), 1); /* the op ends by itself */
	assert_int_equal(concur_result(f, -1), 1);
	assert_int_equal(pthread_create(&freer, NULL, free_exec, e), 0);
	usleep(200000); /* a free that does not wait for the message is done by now */
	int freed_early = atomic_load(&freed);
	atomic_store(&retain_go, 1);
	void *said;
	pthread_join(canceller, &said);
	pthread_join(freer, NULL);
	assert_int_equal(freed_early, 0);
	assert_int_equal((intptr_t)said, -EINPROGRESS);
	assert_int_equal(concur_result(f, 0), 1); /* it ended with its own result */
	concur_release(f);
	close(p[0]);
	close(p[1]);
}

/*
 * A stop spares the future ops of a shielded cleanup (it runs to its end, its ops too), until
 * the cleanup is unshielded or ends: then nobody's cleanup waits for them, and they are
 * cancelled as the stop cancels every other op (else its join waits for them for ever). Each
 * case: a 1-loop executor, a pipe whose read is the op, a task that says when the stop arrived
 * (its wait broken with -ECANCELED), the cleanup, and the stop from a thread. Should the stop
 * hang, the case gives the read its byte after a bound and fails rather than hangs.
 */
struct stop_case {
	concur_exec *e;
	concur_future *never, *noter, *cleanup;
	pthread_t th;
};
static int stop_pipe[2];
static _Atomic int stop_seen, cleanup_left;

static int64_t note_stop(void *arg)
{
	int64_t r = concur_result(arg, -1);
	atomic_store(&stop_seen, r == -ECANCELED);
	return r;
}

static void *stop_thread(void *arg)
{
	return (void *)(intptr_t)concur_exec_stop(arg, 0);
}

static void stop_case_start(struct stop_case *c, concur_task_fn cleanup, void *arg)
{
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&c->e, &o), 0);
	assert_int_equal(pipe(stop_pipe), 0);
	atomic_store(&stop_seen, 0);
	atomic_store(&cleanup_left, 0);
	c->never = concur_promise_new(c->e);
	c->noter = concur_spawn(c->e, note_stop, c->never);
	c->cleanup = concur_spawn(c->e, cleanup, arg);
}

static void stop_case_stop(struct stop_case *c)
{
	assert_int_equal(pthread_create(&c->th, NULL, stop_thread, c->e), 0);
}

/* The stop's end, bounded: true if it hung (then the read got its byte to let it end). */
static bool stop_case_hung(struct stop_case *c, int64_t bound_ns)
{
	bool hung = concur_exec_join(c->e, bound_ns) == -ETIMEDOUT;
	if (hung)
		assert_int_equal(write(stop_pipe[1], "k", 1), 1);
	void *r;
	assert_int_equal(pthread_join(c->th, &r), 0);
	assert_int_equal((intptr_t)r, -ETIMEDOUT); /* a stop with no drain time left */
	return hung;
}

static void stop_case_end(struct stop_case *c)
{
	assert_int_equal(concur_result(c->cleanup, 0), 0);
	assert_int_equal(concur_result(c->noter, 0), -ECANCELED);
	concur_release(c->cleanup);
	concur_release(c->noter);
	concur_release(c->never);
	concur_exec_free(c->e);
	close(stop_pipe[0]);
	close(stop_pipe[1]);
}

/* The cleanup's read, shielded; it waits in ways of its own (its arg), then pops the shield. */
static concur_future *cleanup_read(void)
{
	static char c;
	concur_shield_push();
	return concur_read(concur_current_exec(), stop_pipe[0], &c, 1, -1, CONCUR_NO_TIMEOUT);
}

static void cleanup_done(concur_future *f)
{
	concur_release(f); /* fire and forget: the op stays the executor's work until its CQE */
	concur_shield_pop();
	atomic_store(&cleanup_left, 1);
}

/*
 * The cleanup leaves its wait for the op at its deadline (2 s, under the shield) and returns.
 * Order: the cleanup waits in the op's slot (its loop then sleeps); the stop is made and seen
 * to have run on the loop long before the 2 s end -- checked, not assumed (stop_arrived when
 * it leaves).
 */
static int spared_stop_arrived;
static int64_t spared_wait;

static int64_t spared_cleanup(void *arg)
{
	concur_future *f = cleanup_read();
	spared_wait = concur_result(f, MS(2000)); /* in the op's slot, shielded */
	spared_stop_arrived = concur__tl_loop->stop_arrived;
	cleanup_done(f);
	return 0;
}

static void test_stop_cancels_op_its_cleanup_left(void **state)
{
	struct stop_case c;
	stop_case_start(&c, spared_cleanup, NULL);
	assert_true(flag_set(&c.e->loops[0]->sleeping)); /* both in their waits */
	stop_case_stop(&c);
	EVENTUALLY(atomic_load(&stop_seen));
	EVENTUALLY(atomic_load(&cleanup_left));
	bool hung = stop_case_hung(&c, MS(5000));
	assert_int_equal(spared_wait, -ETIMEDOUT);
	assert_int_equal(spared_stop_arrived, 1); /* the order held */
	assert_false(hung);
	stop_case_end(&c);
}

/*
 * A cleanup that waits for its op in timed slices (a progress log) keeps it: it gets its byte
 * after the stop arrived and three more slices passed. (A first fix cancelled the op when the
 * first slice ended.)
 */
static int64_t sliced_res;
static _Atomic int sliced_slices;

static int64_t sliced_cleanup(void *arg)
{
	concur_future *f = cleanup_read();
	int64_t r;
	while ((r = concur_result(f, MS(50))) == -ETIMEDOUT && atomic_load(&sliced_slices) < 200)
		atomic_fetch_add(&sliced_slices, 1);
	sliced_res = r;
	cleanup_done(f);
	return 0;
}

static void test_stop_spares_sliced_cleanup_op(void **state)
{
	struct stop_case c;
	stop_case_start(&c, sliced_cleanup, NULL);
	EVENTUALLY(atomic_load(&sliced_slices) >= 1); /* in its sliced wait */
	stop_case_stop(&c);
	int slices0 = atomic_load(&sliced_slices);
	EVENTUALLY((atomic_load(&stop_seen) && atomic_load(&sliced_slices) >= slices0 + 3) ||
	           atomic_load(&cleanup_left));
	assert_int_equal(write(stop_pipe[1], "k", 1), 1);
	EVENTUALLY(atomic_load(&cleanup_left));
	assert_false(stop_case_hung(&c, MS(5000)));
	assert_int_equal(sliced_res, 1); /* the byte: the op ran to its end */
	stop_case_end(&c);
}

/*
 * An op the cleanup starts after the stop arrived is spared too: its timed wait for it ends,
 * it pops its shield and returns. Order: the cleanup waits (shielded) on a gate, set once the
 * stop is seen to have arrived.
 */
static int64_t late_wait;

static int64_t late_cleanup(void *gate)
{
	concur_shield_push();
	concur_result(gate, -1); /* shielded: the stop does not break it */
	concur_future *f = cleanup_read();
	late_wait = concur_result(f, MS(200));
	cleanup_done(f);
	concur_shield_pop();
	return 0;
}

static void test_stop_cancels_late_cleanup_op(void **state)
{
	struct stop_case c;
	concur_future *gate = concur_promise_new(NULL);
	stop_case_start(&c, late_cleanup, gate);
	assert_true(flag_set(&c.e->loops[0]->sleeping)); /* both in their waits */
	stop_case_stop(&c);
	EVENTUALLY(atomic_load(&stop_seen));
	assert_int_equal(concur_promise_set(gate, 0), 0);
	EVENTUALLY(atomic_load(&cleanup_left));
	bool hung = stop_case_hung(&c, MS(3000));
	assert_int_equal(late_wait, -ETIMEDOUT);
	assert_false(hung);
	stop_case_end(&c);
	concur_release(gate);
}

/* After concur_exec_shutdown, an op from a thread outside the executor fails with -ESHUTDOWN, as a
 * spawn does (and a blocking job): a join that returned 0 after the shutdown has no op left to
 * land behind it in a loop that concur_exec_free goes on to stop. */
static void test_op_after_shutdown(void **state)
{
	concur_exec_shutdown(ex, false);
	concur_future *s = concur_spawn(ex, nothing_task, NULL);
	assert_int_equal(concur_result(s, -1), -ESHUTDOWN);
	concur_release(s);
	concur_future *f = concur_nop(ex);
	assert_int_equal(concur_result(f, -1), -ESHUTDOWN); /* was 0: the op went ahead */
	concur_release(f);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_file_futures, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_file_direct, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_ebadf, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_op_after_shutdown, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_ebadf_direct, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_bad_input, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_nop_timeout, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_future_records_reused, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_future_op_outlives_task, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_await_op_on_its_loop, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_socketpair_tasks, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_tcp_loopback, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_sendmsg_poll_splice, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_cancel_recv, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_deadline_recv, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_deadline_direct, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_econnreset, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_many_connections, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_vectored_direct, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_fallocate_direct, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_mkdirat_renameat, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_socket_future, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_send_shutdown_futures, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_msg_direct, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_poll_direct, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_splice_direct, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_splice_stopped_in_worker, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_splice_future_deadline_in_worker, setup, teardown),
	    cmocka_unit_test(test_cancel_message_outlives_op),
	    cmocka_unit_test(test_stop_cancels_op_its_cleanup_left),
	    cmocka_unit_test(test_stop_spares_sliced_cleanup_op),
	    cmocka_unit_test(test_stop_cancels_late_cleanup_op),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, NULL, NULL));
}

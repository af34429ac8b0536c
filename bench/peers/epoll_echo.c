/* SPDX-License-Identifier: MIT */
/*
 * A hand-written epoll echo server: the peer a C programmer writes without an executor. One
 * event loop per thread (--threads N, default 1), each with its own SO_REUSEPORT listener and
 * epoll set (level-triggered); non-blocking sockets with TCP_NODELAY; per readable connection one
 * recv, then send it all back (what does not fit waits for EPOLLOUT, and reading pauses until it
 * is out). Stops on SIGINT/SIGTERM (peer_main: the main thread waits for them, then exits).
 */
#include "http_common.h" /* peer_main, peer_listener: nothing HTTP is used here */

#include <sys/epoll.h>

#define ECHO_BUF 65536

struct conn {
	int fd;
	size_t out_len, out_off; /* the part of buf still to send back */
	char buf[ECHO_BUF];
};

static void conn_close(int ep, struct conn *c)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	free(c);
}

static void want(int ep, struct conn *c, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.ptr = c};
	epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Send what is pending; false when the connection is gone. */
static bool conn_flush(int ep, struct conn *c)
{
	while (c->out_off < c->out_len) {
		ssize_t w = send(c->fd, c->buf + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
		if (w < 0 && errno == EAGAIN) {
			want(ep, c, EPOLLOUT);
			return true;
		}
		if (w <= 0)
			return false;
		c->out_off += (size_t)w;
	}
	c->out_len = c->out_off = 0;
	return true;
}

static void accept_all(int ep, int lfd)
{
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		struct conn *c = malloc(sizeof(*c));
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->out_len = c->out_off = 0;
		struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) {
			close(fd);
			free(c);
		}
	}
}

static void *loop(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[256];
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev)) {
		perror("epoll_echo: epoll");
		exit(1);
	}
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			if (!c) {
				accept_all(ep, lfd);
				continue;
			}
			if (c->out_len) { /* EPOLLOUT: finish the send, then read again */
				if (!conn_flush(ep, c))
					conn_close(ep, c);
				else if (!c->out_len)
					want(ep, c, EPOLLIN);
				continue;
			}
			ssize_t r = recv(c->fd, c->buf, ECHO_BUF, 0);
			if (r < 0 && errno == EAGAIN)
				continue;
			if (r <= 0) {
				conn_close(ep, c);
				continue;
			}
			c->out_len = (size_t)r;
			if (!conn_flush(ep, c))
				conn_close(ep, c);
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	return peer_main(argc, argv, "epoll_echo", loop, SOCK_NONBLOCK);
}

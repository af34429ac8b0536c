/* SPDX-License-Identifier: MIT */
/*
 * A hand-written epoll HTTP/1.1 plaintext server: the peer a C programmer writes without an
 * executor. One event loop per thread (--threads N), each with its own SO_REUSEPORT listener and
 * its own epoll set (level-triggered); non-blocking sockets; per connection: read until EAGAIN,
 * answer every complete request in one write, keep what is unsent and wait for EPOLLOUT. Stops on
 * SIGINT/SIGTERM (the main thread waits for them with sigwait, then exits).
 */
#include "http_common.h"

#include <sys/epoll.h>

struct conn {
	int fd;
	size_t in_len, out_len, out_off;
	char in[PEER_IN_CAP];
	char out[PEER_OUT_CAP];
};

static void conn_close(int ep, struct conn *c)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	free(c);
}

/* Send what is pending; false when the connection is gone. */
static bool conn_flush(int ep, struct conn *c)
{
	while (c->out_off < c->out_len) {
		ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN) {
				struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT,
				                         .data.ptr = c};
				epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
				return true;
			}
			return false;
		}
		c->out_off += (size_t)w;
	}
	c->out_len = c->out_off = 0;
	return true;
}

static void conn_event(int ep, struct conn *c, uint32_t events)
{
	bool close_it = false;
	if (events & EPOLLOUT) {
		if (!conn_flush(ep, c))
			goto out;
		if (c->out_len == 0) {
			struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
			epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
		}
	}
	if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)) || c->out_len)
		return; /* answers still pending: read more once they are out */
	for (;;) {
		ssize_t r = recv(c->fd, c->in + c->in_len, PEER_IN_CAP - c->in_len, 0);
		if (r < 0 && errno == EAGAIN)
			break;
		if (r <= 0)
			goto out;
		c->in_len += (size_t)r;
		size_t used =
		    peer_process(c->in, c->in_len, c->out, &c->out_len, PEER_OUT_CAP, &close_it);
		memmove(c->in, c->in + used, c->in_len - used);
		c->in_len -= used;
		if (!conn_flush(ep, c) || (close_it && c->out_len == 0))
			goto out;
		if (c->out_len || close_it)
			return;
		if ((size_t)r < PEER_IN_CAP / 2)
			break; /* a short read: the socket is most likely drained */
	}
	return;
out:
	conn_close(ep, c);
}

static void *loop(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[256];
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			if (c) {
				conn_event(ep, c, evs[i].events);
				continue;
			}
			for (;;) {
				int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
				if (fd < 0)
					break;
				int one = 1;
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				c = malloc(sizeof(*c));
				if (!c) {
					close(fd);
					continue;
				}
				c->fd = fd;
				c->in_len = c->out_len = c->out_off = 0;
				struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
				epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
			}
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	return peer_main(argc, argv, "epoll_http", loop, SOCK_NONBLOCK);
}

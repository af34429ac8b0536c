/* SPDX-License-Identifier: MIT */
/*
 * A TCP reverse proxy on concur's public API only: every connection accepted on --bind:--port is
 * joined to a new connection to --upstream, and bytes are copied both ways until both sides are
 * done.
 *
 * Tasks. Each loop has its own SO_REUSEPORT listener and an accepting task pinned to it
 * (concur_spawn_on, a multishot accept stream). A connection gets one task that connects to the
 * upstream and then spawns two pumps, one per direction (read one socket, write the other), the
 * way a Go proxy runs two io.Copy: a direction blocked on a slow peer never holds up the other.
 * The connection task waits for them with CONCUR_FIRST_EXCEPTION: a clean end of one direction
 * (EOF, passed on as a half-close with shutdown(SHUT_WR)) lets the other go on; a failure
 * (reset, idle timeout) cancels the other pump (concur_cancel on a running task: its recv or
 * send fails -ECANCELED at once), and the sockets are closed once both pumps have ended. A reset
 * of one side is passed on as a reset of the other (SO_LINGER 0), so a client can tell an answer
 * the upstream cut short from a whole one; an idle timeout and a stop close both cleanly.
 *
 * Idle deadline. Every recv, send and the upstream connect runs inside its own deadline scope of
 * --idle-ms (concur_deadline_push/pop): a scope that does not fire costs no SQE and no CQE, which
 * is what the `proxy` benchmark measures against --idle-ms 0 (no scopes at all). The connection
 * is idle only if neither direction moved a byte: when one pump's scope fires while the other
 * pump moved data during that window (a long download with nothing to upload), it opens a new
 * scope and waits again, so only a connection silent both ways for idle-ms is closed.
 *
 * Stop. SIGINT/SIGTERM arrive as a concur_signal future (blocked in every thread first); the main
 * thread then shuts the listeners down (no new connection) and calls concur_exec_stop(): open
 * connections get up to 2 s to end on their own, then every task is cancelled. Exit status 0.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "concur.h"

#define BUF_SIZE  16384 /* per direction, as nginx's proxy_buffer_size */
#define MAX_LOOPS 1024
#define DRAIN_NS  (2 * (int64_t)1000000000)

static struct sockaddr_in upstream;
static int64_t idle_ns; /* 0: no deadline scopes */

struct conn {
	int fd[2]; /* [0] the client, [1] the upstream */
	/* per direction, how many receives moved data: what the other pump reads to tell an idle
	 * connection from a one-way one (a relaxed counter; each is written by its pump only) */
	_Atomic uint64_t moved[2];
	char buf[2][BUF_SIZE];
};

struct pump {
	struct conn *c;
	int dir;       /* 0: client -> upstream, 1: upstream -> client */
	uint64_t seen; /* the other direction's counter when the current scope opened */
};

/* Open the idle window of one operation: a deadline scope, and what the other way had moved. */
static void idle_open(struct pump *p)
{
	if (!idle_ns)
		return;
	p->seen = atomic_load_explicit(&p->c->moved[!p->dir], memory_order_relaxed);
	if (concur_deadline_push(idle_ns))
		p->seen = UINT64_MAX; /* no scope (cannot happen at depth 1): never retry */
}

/* Close it. True when the operation timed out while the other direction moved data: the
 * connection is not idle, so wait again in a fresh scope. */
static bool idle_close_retry(struct pump *p, int64_t r)
{
	if (!idle_ns || p->seen == UINT64_MAX)
		return false;
	bool expired = concur_deadline_pop() == 1;
	return r == -ETIMEDOUT && expired &&
	       atomic_load_explicit(&p->c->moved[!p->dir], memory_order_relaxed) != p->seen;
}

/* Copy one direction until EOF (passed on as a half-close: returns 0) or an error. */
static int64_t pump_task(void *arg)
{
	struct pump *p = arg;
	int src = p->c->fd[p->dir], dst = p->c->fd[!p->dir];
	char *buf = p->c->buf[p->dir];
	uint64_t moved = 0;
	for (;;) {
		int64_t n;
		do {
			idle_open(p);
			n = concur_await_recv(src, buf, BUF_SIZE, 0, CONCUR_NO_TIMEOUT);
		} while (idle_close_retry(p, n));
		if (n <= 0) {
			if (n == 0)
				shutdown(dst, SHUT_WR);
			return n;
		}
		atomic_store_explicit(&p->c->moved[p->dir], ++moved, memory_order_relaxed);
		for (int64_t off = 0; off < n;) {
			int64_t w;
			do {
				idle_open(p);
				w = concur_await_send(dst, buf + off, (size_t)(n - off),
				                      MSG_NOSIGNAL, CONCUR_NO_TIMEOUT);
			} while (idle_close_retry(p, w));
			if (w <= 0)
				return w ? w : -EPIPE;
			off += w;
		}
	}
}

static int connect_upstream(void)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (idle_ns)
		concur_deadline_push(idle_ns);
	int64_t r = concur_await_connect(fd, (const struct sockaddr *)&upstream, sizeof(upstream),
	                                 CONCUR_NO_TIMEOUT);
	if (idle_ns)
		concur_deadline_pop();
	if (r < 0) {
		close(fd);
		return (int)r;
	}
	return fd;
}

/* One client connection: connect, run the two pumps, close. */
static int64_t conn_task(void *arg)
{
	int client = (int)(intptr_t)arg;
	struct conn *c = malloc(sizeof(*c));
	int up = c ? connect_upstream() : -ENOMEM;
	if (up < 0) {
		free(c);
		close(client);
		return 0; /* never an error: conn_unrun tells a task that never ran by its error */
	}
	int one = 1;
	setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c->fd[0] = client;
	c->fd[1] = up;
	atomic_init(&c->moved[0], 0);
	atomic_init(&c->moved[1], 0);
	struct pump p[2] = {{.c = c, .dir = 0}, {.c = c, .dir = 1}};
	concur_exec *ex = concur_current_exec();
	concur_future *f[2] = {concur_spawn(ex, pump_task, &p[0]),
	                       concur_spawn(ex, pump_task, &p[1])};
	/* returns when both ended, or at the first failure (or at once if this task is cancelled:
	 * the executor is stopping) */
	concur_wait(f, 2, CONCUR_FIRST_EXCEPTION, CONCUR_NO_TIMEOUT, NULL);
	for (int i = 0; i < 2; i++)
		if (!concur_done(f[i]))
			concur_cancel(f[i]);
	/* the pumps use c and p: wait for both even if this task is cancelled (they end promptly)
	 */
	concur_shield_push();
	concur_wait(f, 2, CONCUR_ALL_COMPLETED, CONCUR_NO_TIMEOUT, NULL);
	concur_shield_pop();
	/* a side that reset (or failed) is passed on as a reset: a clean close would let the other
	 * side take a stream cut short for a whole one; an idle timeout or a stop closes cleanly */
	bool aborted = false;
	for (int i = 0; i < 2; i++) {
		int64_t r = concur_result(f[i], 0);
		aborted = aborted || (r < 0 && r != -ECANCELED && r != -ETIMEDOUT);
		concur_release(f[i]);
	}
	if (aborted) {
		struct linger reset = {.l_onoff = 1, .l_linger = 0};
		setsockopt(client, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
		setsockopt(up, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
	}
	close(client);
	close(up);
	free(c);
	return 0; /* the pumps' errors end the connection, not the task (see conn_unrun) */
}

/* A connection task that never ran (no stack could be had when it started: -ENOMEM; refused or
 * cancelled unstarted by a stop) still owns the client's fd: close it, or it leaks and its client
 * waits for good. */
static void conn_unrun(concur_future *f, void *arg)
{
	if (concur_result(f, 0) < 0)
		close((int)(intptr_t)arg);
}

static int64_t accept_task(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	concur_stream *s;
	int err = concur_accept_stream(&s, lfd, SOCK_CLOEXEC);
	if (err) {
		fprintf(stderr, "proxy: accept stream: %s\n", concur_strerror(err));
		return err;
	}
	concur_exec *ex = concur_current_exec();
	for (;;) {
		int64_t fd = concur_stream_next(s, NULL);
		if (fd == -EMFILE || fd == -ENFILE || fd == -ENOMEM || fd == -ENOBUFS)
			continue; /* out of fds or memory: the stream backs off and goes on */
		if (fd < 0)
			break; /* the listener was shut down (or the task cancelled) */
		concur_future *f = concur_spawn(ex, conn_task, (void *)(intptr_t)fd);
		concur_on_done(f, conn_unrun, (void *)(intptr_t)fd);
		concur_release(f);
	}
	concur_stream_close(s);
	return 0;
}

static int make_listener(const struct sockaddr_in *bind_addr, uint16_t *port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;
	struct sockaddr_in a = *bind_addr;
	socklen_t len = sizeof(a);
	if (fd < 0)
		return -errno;
	a.sin_port = htons(*port);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 4096) ||
	    getsockname(fd, (struct sockaddr *)&a, &len)) {
		int err = -errno;
		close(fd);
		return err;
	}
	*port = ntohs(a.sin_port);
	return fd;
}

static int usage(void)
{
	fprintf(stderr,
	        "usage: concur_proxy_server [--bind ADDR (default 127.0.0.1)] [--port N (default "
	        "8000, 0: any)]\n"
	        "       [--upstream ADDR:PORT (default 127.0.0.1:8080)] [--idle-ms N (default "
	        "30000, 0: none)]\n"
	        "       [--loops N (default: CPUs)]\n");
	return 2;
}

static bool parse_num(const char *s, unsigned long max, unsigned long *out)
{
	char *end;
	errno = 0;
	*out = strtoul(s, &end, 10);
	return !errno && *s && !*end && *out <= max;
}

static bool parse_ipv4(const char *s, struct sockaddr_in *a)
{
	memset(a, 0, sizeof(*a));
	a->sin_family = AF_INET;
	return inet_pton(AF_INET, s, &a->sin_addr) == 1;
}

static bool parse_hostport(const char *s, struct sockaddr_in *a)
{
	const char *colon = strrchr(s, ':');
	unsigned long port;
	char host[64];
	if (!colon || (size_t)(colon - s) >= sizeof(host) || !parse_num(colon + 1, 65535, &port) ||
	    !port)
		return false;
	memcpy(host, s, (size_t)(colon - s));
	host[colon - s] = 0;
	if (!parse_ipv4(host, a))
		return false;
	a->sin_port = htons((uint16_t)port);
	return true;
}

int main(int argc, char **argv)
{
	struct sockaddr_in bind_addr;
	unsigned long port = 8000, loops = 0, idle_ms = 30000;
	parse_ipv4("127.0.0.1", &bind_addr);
	parse_hostport("127.0.0.1:8080", &upstream);
	for (int i = 1; i < argc; i++) {
		const char *o = argv[i], *v = i + 1 < argc ? argv[++i] : NULL;
		bool ok = v && (!strcmp(o, "--bind")       ? parse_ipv4(v, &bind_addr)
		                : !strcmp(o, "--upstream") ? parse_hostport(v, &upstream)
		                : !strcmp(o, "--port")     ? parse_num(v, 65535, &port)
		                : !strcmp(o, "--loops")    ? parse_num(v, MAX_LOOPS, &loops)
		                : !strcmp(o, "--idle-ms")  ? parse_num(v, 86400000, &idle_ms)
		                                           : false);
		if (!ok)
			return usage();
	}
	idle_ns = (int64_t)idle_ms * 1000000;

	/* the signals come through the ring: block them before any thread exists */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	concur_exec *ex;
	struct concur_exec_opts o = {.loops = (unsigned)loops};
	int err = concur_exec_new(&ex, &o);
	if (err) {
		fprintf(stderr, "proxy: cannot start: %s %s\n", concur_strerror(err),
		        concur_last_error());
		return 1;
	}
	concur_future *sig = concur_signal(ex, &set);
	unsigned n = (unsigned)concur_exec_loops(ex);
	int lfd[MAX_LOOPS];
	uint16_t p = (uint16_t)port;
	for (unsigned i = 0; i < n; i++) {
		lfd[i] = make_listener(&bind_addr, &p); /* the first may pick the port */
		if (lfd[i] < 0) {
			fprintf(stderr, "proxy: listen on port %u: %s\n", p,
			        concur_strerror(lfd[i]));
			return 1;
		}
	}
	char host[INET_ADDRSTRLEN], uhost[INET_ADDRSTRLEN];
	inet_ntop(AF_INET, &bind_addr.sin_addr, host, sizeof(host));
	inet_ntop(AF_INET, &upstream.sin_addr, uhost, sizeof(uhost));
	printf("proxy: listening on %s:%u with %u loops, upstream %s:%u, idle %lu ms\n", host, p, n,
	       uhost, ntohs(upstream.sin_port), idle_ms);
	fflush(stdout);
	for (unsigned i = 0; i < n; i++)
		concur_release(concur_spawn_on(ex, i, accept_task, (void *)(intptr_t)lfd[i]));

	int64_t signo = concur_result(sig, -1);
	concur_release(sig);
	fprintf(stderr, "proxy: signal %lld: stopping\n", (long long)signo);
	for (unsigned i = 0; i < n; i++)
		shutdown(lfd[i], SHUT_RDWR); /* the accept streams end */
	err = concur_exec_stop(ex, DRAIN_NS);
	concur_exec_free(ex);
	for (unsigned i = 0; i < n; i++)
		close(lfd[i]);
	printf("proxy: stopped (%s)\n", err ? "open connections cancelled" : "drained");
	return 0;
}

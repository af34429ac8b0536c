/* SPDX-License-Identifier: MIT */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "server.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_LOOPS        1024
#define DEFAULT_DRAIN_MS 5000

static _Atomic bool stopping;
/* --idle-ms (an idle keep-alive wait), --request-ms (a request from its first byte to its last:
 * slowloris), --send-ms (one send that makes no progress: a client that does not read); 0: none */
static int64_t idle_ns = 60 * (int64_t)1000000000, request_ns = 30 * (int64_t)1000000000,
               send_ns = 30 * (int64_t)1000000000;
static int64_t (*conn_fn)(int fd);

bool server_stopping(void)
{
	return atomic_load(&stopping);
}

void server_conn_done(int fd)
{
	concur_shield_push(); /* a task cancelled at the end of the drain still closes its fd */
	concur_await_close(fd, CONCUR_NO_TIMEOUT);
	concur_shield_pop();
}

/*
 * The connections of this loop waiting idle in server_next, so that the stop's sweep (a task on
 * the same loop: no lock, no race with the waiter, which is suspended in next while it is listed)
 * can cancel their streams. A waiter is listed only for the length of its wait, from its stack.
 */
struct idle_wait {
	struct idle_wait *next, **pprev; /* pprev NULL: not listed */
	concur_stream *s;
};

static __thread struct idle_wait *idle_list;

static void idle_unlink(struct idle_wait *w)
{
	if (!w->pprev)
		return;
	*w->pprev = w->next;
	if (w->next)
		w->next->pprev = w->pprev;
	w->pprev = NULL;
}

int64_t server_next(concur_stream *s, struct concur_chunk *ch, bool idle)
{
	if (!idle)
		return concur_stream_next(s, ch);
	/* the stop is set before the sweep is spawned: a waiter either sees it here or is listed
	 * when its loop runs the sweep */
	if (server_stopping())
		return 0;
	struct idle_wait w = {.next = idle_list, .pprev = &idle_list, .s = s};
	if (idle_list)
		idle_list->pprev = &w.next;
	idle_list = &w;
	bool timed = idle_ns && !concur_deadline_push(idle_ns);
	int64_t r = concur_stream_next(s, ch);
	if (timed && concur_deadline_pop() == 1 && r == -ETIMEDOUT)
		r = 0; /* idle too long: close as at EOF */
	idle_unlink(&w);
	return r == -ECANCELED && server_stopping() ? 0 : r;
}

/* The stop, on each loop: wake every idle waiter of this loop (its next() ends -ECANCELED, after
 * what had already arrived). */
static int64_t sweep_task(void *arg)
{
	(void)arg;
	while (idle_list) {
		struct idle_wait *w = idle_list;
		idle_unlink(w);
		concur_stream_cancel(w->s);
	}
	return 0;
}

int server_send_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		int64_t r = concur_await_send(fd, p, len, MSG_NOSIGNAL,
		                              send_ns ? send_ns : CONCUR_NO_TIMEOUT);
		if (r <= 0)
			return r ? (int)r : -EPIPE;
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

int server_send_chunk(int fd, concur_stream *s, struct concur_chunk *ch)
{
	const char *p = ch->data;
	size_t len = ch->len;
	/* at once if the socket takes it all: the common case, with no copy */
	int64_t r = concur_await_send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT, CONCUR_NO_TIMEOUT);
	if (r == -EAGAIN)
		r = 0;
	if (r < 0 || (size_t)r == len || (!r && !len)) {
		concur_stream_give(s, ch);
		return r < 0 ? (int)r : 0;
	}
	/* the client reads slower than we send: the rest from a copy, the chunk given back first.
	 * A send that waits for a client must not hold one of the loop's receive buffers (256
	 * clients that never read would dry the loop's ring and starve every connection of it). */
	size_t rest = len - (size_t)r;
	char *copy = malloc(rest);
	if (copy)
		memcpy(copy, p + r, rest);
	concur_stream_give(s, ch);
	if (!copy)
		return -ENOMEM;
	int err = server_send_all(fd, copy, rest);
	free(copy);
	return err;
}

int server_out_reserve(struct server_conn *c, size_t need)
{
	if (c->out_len + need <= c->out_cap)
		return 0;
	int err = server_send_all(c->fd, c->out, c->out_len);
	c->out_len = 0;
	if (!err && need > c->out_cap)
		return -E2BIG;
	return err;
}

void server_out_add(struct server_conn *c, const void *p, size_t n)
{
	memcpy(c->out + c->out_len, p, n);
	c->out_len += n;
}

/*
 * Answer buffers are lent per burst of work, from a small per-thread pool (a task stays on its
 * loop's thread, so it gives the buffer back where it took it): an idle connection holds none.
 * They are mapped, not malloc'ed, and the pool keeps at most OUT_POOL_MAX of them, so memory
 * goes back to the kernel after a flood (glibc kept ~290 MB of its arenas after one).
 */
#define OUT_POOL_MAX 128
#define IN_COPY      4096 /* a received chunk (a ring buffer, or the stream's own: 4 KiB) */

struct out_free {
	struct out_free *next;
};

static __thread struct out_free *out_pool;
static __thread unsigned out_pool_len;

static char *out_get(size_t cap)
{
	struct out_free *b = out_pool;
	if (b) {
		out_pool = b->next;
		out_pool_len--;
		return (char *)b;
	}
	void *p = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static void out_put(char *p, size_t cap)
{
	if (out_pool_len >= OUT_POOL_MAX) {
		munmap(p, cap);
		return;
	}
	struct out_free *b = (struct out_free *)(void *)p;
	b->next = out_pool;
	out_pool = b;
	out_pool_len++;
}

/*
 * Feed in[0..len) to process, keeping what it did not take (an incomplete request) in the
 * connection's own pending bytes, which exist only while a request is incomplete. Most chunks
 * hold whole requests and are processed where they are (the copy of the received chunk, see
 * server_serve), with no further copy. *answered: process took a request.
 */
struct pending {
	char *buf;
	size_t len, cap, max;
};

static int pending_add(struct pending *pd, const char *p, size_t k)
{
	if (pd->len + k > pd->cap) {
		size_t ncap = pd->cap ? pd->cap : 256;
		while (ncap < pd->len + k)
			ncap *= 2;
		if (ncap > pd->max)
			ncap = pd->max;
		char *nb = realloc(pd->buf, ncap);
		if (!nb)
			return -ENOMEM;
		pd->buf = nb;
		pd->cap = ncap;
	}
	memcpy(pd->buf + pd->len, p, k);
	pd->len += k;
	return 0;
}

static int feed(struct server_conn *c, struct pending *pd, char *p, size_t n,
                server_process_fn process, bool *close_it, bool *answered)
{
	while (n && !*close_it) {
		if (!pd->len) { /* in place */
			size_t used = process(c, p, n, n >= pd->max, close_it);
			*answered = *answered || used;
			p += used;
			n -= used;
			if (!n || *close_it || (!used && n >= pd->max))
				break;
			if (n >= pd->max)
				continue;
			return pending_add(pd, p, n); /* the start of a request: keep it */
		}
		size_t room = pd->max - pd->len, k = n < room ? n : room;
		if (pending_add(pd, p, k))
			return -ENOMEM;
		p += k;
		n -= k;
		size_t used = process(c, pd->buf, pd->len, pd->len >= pd->max, close_it);
		*answered = *answered || used;
		memmove(pd->buf, pd->buf + used, pd->len - used);
		pd->len -= used;
		if (!pd->len) { /* nothing pending: the connection holds no input buffer */
			free(pd->buf);
			*pd = (struct pending){.max = pd->max};
		} else if (!used && pd->len >= pd->max) {
			break; /* process answered "too large" and closes */
		}
	}
	return 0;
}

int64_t server_serve(int fd, size_t in_cap, size_t out_cap, server_process_fn process)
{
	struct server_conn c = {.fd = fd, .out_cap = out_cap};
	struct pending pd = {.max = in_cap};
	concur_stream *s = NULL;
	bool close_it = concur_recv_stream_on_demand(&s, fd, 0) != 0, timed = false;
	while (!close_it) {
		struct concur_chunk ch;
		/* idle unless a request is incomplete: a stop ends an idle wait, not a request */
		bool idle = !pd.len && !c.state;
		if (!idle && !timed && request_ns) /* a request began: it has request_ns to end */
			timed = !concur_deadline_push(request_ns);
		else if (idle && timed) {
			concur_deadline_pop();
			timed = false;
		}
		int64_t r = server_next(s, &ch, idle);
		if (r <= 0)
			break; /* EOF (maybe in the middle of a request), an error or a stop: close
			        */
		/* (a chunk is a 4 KiB buffer at most, the header says: a larger one closes) */
		if (ch.len > IN_COPY || !(c.out = out_get(out_cap + IN_COPY))) {
			concur_stream_give(s, &ch);
			break;
		}
		/* process a copy: a send inside process (answers past out_cap) may wait for good on
		 * a client that does not read, and must not hold the loop's ring buffer meanwhile
		 * (256 such clients would dry the ring and starve every connection of the loop) */
		char *in = c.out + out_cap;
		size_t in_len = ch.len;
		memcpy(in, ch.data, in_len);
		concur_stream_give(s, &ch);
		bool answered = false;
		if (feed(&c, &pd, in, in_len, process, &close_it, &answered))
			close_it = true;
		if (timed && answered) { /* a request is whole: the next one gets request_ns anew */
			concur_deadline_pop();
			timed = false;
		}
		if (c.out_len && server_send_all(fd, c.out, c.out_len))
			close_it = true;
		c.out_len = 0;
		out_put(c.out, out_cap + IN_COPY);
		c.out = NULL;
	}
	if (timed)
		concur_deadline_pop();
	concur_stream_close(s);
	free(pd.buf);
	server_conn_done(fd);
	return 0;
}

static int64_t conn_task(void *arg)
{
	int fd = (int)(intptr_t)arg;
	if (server_stopping()) { /* accepted before the stop, started after it */
		server_conn_done(fd);
		return 0;
	}
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	conn_fn(fd);
	return 0; /* never an error: conn_unrun tells a task that never ran by its error */
}

/* A connection task that never ran (no stack could be had when it started: -ENOMEM; refused or
 * cancelled unstarted by a stop) still owns its fd: close it, or it leaks and its client waits
 * for good. */
static void conn_unrun(concur_future *f, void *arg)
{
	if (concur_result(f, 0) < 0)
		close((int)(intptr_t)arg);
}

/* The errors an accept stream reports and survives (see concur_stream_next). */
static bool accept_transient(int64_t err)
{
	return err == -EMFILE || err == -ENFILE || err == -ENOMEM || err == -ENOBUFS;
}

static int64_t accept_task(void *arg)
{
	int lfd = (int)(intptr_t)arg;
	concur_stream *s;
	int err = concur_accept_stream(&s, lfd, SOCK_CLOEXEC);
	if (err) {
		fprintf(stderr, "accept stream: %s\n", concur_strerror(err));
		return err;
	}
	concur_exec *ex = concur_current_exec();
	time_t last_report = 0;
	for (;;) {
		int64_t fd = concur_stream_next(s, NULL);
		if (fd < 0 && accept_transient(fd)) {
			/* out of fds or memory: the stream backs off and goes on by itself */
			time_t now = time(NULL);
			if (now != last_report)
				fprintf(stderr, "accept: %s (going on)\n", concur_strerror(fd));
			last_report = now;
			continue;
		}
		if (fd < 0)
			break; /* the listener was shut down (or failed) */
		if (server_stopping()) {
			close((int)fd);
			continue;
		}
		concur_future *f = concur_spawn(ex, conn_task, (void *)(intptr_t)fd);
		concur_on_done(f, conn_unrun, (void *)(intptr_t)fd);
		concur_release(f);
	}
	concur_stream_close(s);
	return 0;
}

/* The address to listen on (--bind, numeric IPv4 or IPv6), its port set by make_listener. */
static struct sockaddr_storage bind_addr;
static socklen_t bind_len;

static int parse_bind(const char *host)
{
	struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_PASSIVE,
	                         .ai_socktype = SOCK_STREAM};
	struct addrinfo *res;
	if (getaddrinfo(host, NULL, &hints, &res))
		return -EINVAL;
	memcpy(&bind_addr, res->ai_addr, res->ai_addrlen);
	bind_len = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

static uint16_t *bind_port(struct sockaddr_storage *a)
{
	return a->ss_family == AF_INET6 ? &((struct sockaddr_in6 *)a)->sin6_port
	                                : &((struct sockaddr_in *)a)->sin_port;
}

static int make_listener(uint16_t *port)
{
	struct sockaddr_storage a = bind_addr;
	socklen_t len = bind_len;
	int fd = socket(a.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;
	if (fd < 0)
		return -errno;
	*bind_port(&a) = htons(*port);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a, len) || listen(fd, 4096) ||
	    getsockname(fd, (struct sockaddr *)&a, &len)) {
		int err = -errno;
		close(fd);
		return err;
	}
	*port = ntohs(*bind_port(&a));
	return fd;
}

static void usage(const char *name, uint16_t port)
{
	fprintf(stderr,
	        "usage: %s [--bind ADDR (default 127.0.0.1)] [--port N (default %u, 0: any)]\n"
	        "       [--loops N (default: CPUs)] [--drain-ms N (default %u: how long a stop "
	        "waits for open requests; a second signal cancels them at once)]\n"
	        "       [--idle-poll-us N (default 0, at most 1000000: "
	        "concur_exec_opts.idle_poll_ns)]\n"
	        "       [--idle-ms N (default %lld: a keep-alive connection idle that long is "
	        "closed)]\n"
	        "       [--request-ms N (default %lld: a request must arrive whole within it)]\n"
	        "       [--send-ms N (default %lld: a send making no progress that long closes "
	        "the connection)] (0: no limit)\n",
	        name, port, DEFAULT_DRAIN_MS, (long long)(idle_ns / 1000000),
	        (long long)(request_ns / 1000000), (long long)(send_ns / 1000000));
}

/*
 * A second SIGINT or SIGTERM during the drain ends it at once: what is still open is cancelled
 * as at --drain-ms, as a second ^C does in most servers. A thread of its own waits for it: the
 * signals are blocked in every thread, and a concur_signal() future would be work the drain
 * waits for. A stop already under way in another thread may overlap this one.
 */
struct second_signal {
	const char *name;
	sigset_t set;
	concur_exec *ex;
	_Atomic bool done, forced;
};

static void *second_signal_wait(void *arg)
{
	struct second_signal *s = arg;
	int signo;
	if (sigwait(&s->set, &signo) || atomic_load(&s->done)) /* done: main's own wake-up */
		return NULL;
	fprintf(stderr, "%s: signal %d again: cancelling what is open\n", s->name, signo);
	atomic_store(&s->forced, true);
	concur_exec_stop(s->ex, 0);
	return NULL;
}

int server_main(int argc, char **argv, const char *name, uint16_t default_port,
                int64_t (*conn)(int fd))
{
	unsigned long port = default_port, loops = 0, drain_ms = DEFAULT_DRAIN_MS, idle_poll_us = 0;
	unsigned long idle_ms = (unsigned long)(idle_ns / 1000000),
	              request_ms = (unsigned long)(request_ns / 1000000),
	              send_ms = (unsigned long)(send_ns / 1000000);
	const char *host = "127.0.0.1";
	for (int i = 1; i < argc; i++) {
		char *end;
		if (!strcmp(argv[i], "--bind") && i + 1 < argc) {
			host = argv[++i];
			continue;
		}
		unsigned long *dst = !strcmp(argv[i], "--port")           ? &port
		                     : !strcmp(argv[i], "--loops")        ? &loops
		                     : !strcmp(argv[i], "--drain-ms")     ? &drain_ms
		                     : !strcmp(argv[i], "--idle-poll-us") ? &idle_poll_us
		                     : !strcmp(argv[i], "--idle-ms")      ? &idle_ms
		                     : !strcmp(argv[i], "--request-ms")   ? &request_ms
		                     : !strcmp(argv[i], "--send-ms")      ? &send_ms
		                                                          : NULL;
		if (!dst || i + 1 >= argc) {
			usage(name, default_port);
			return 2;
		}
		errno = 0;
		*dst = strtoul(argv[++i], &end, 10);
		if (*end || errno || !*argv[i] || (dst == &port && port > 65535) ||
		    (dst == &loops && loops > MAX_LOOPS) ||
		    ((dst == &drain_ms || dst == &idle_ms || dst == &request_ms ||
		      dst == &send_ms) &&
		     *dst > 86400000) ||
		    (dst == &idle_poll_us && idle_poll_us > 1000000)) {
			usage(name, default_port);
			return 2;
		}
	}
	if (parse_bind(host)) {
		fprintf(stderr, "%s: --bind %s: not a numeric IPv4 or IPv6 address\n", name, host);
		usage(name, default_port);
		return 2;
	}
	conn_fn = conn;
	idle_ns = (int64_t)idle_ms * 1000000;
	request_ns = (int64_t)request_ms * 1000000;
	send_ns = (int64_t)send_ms * 1000000;
	/* the signals come through the ring (concur_signal): block them in every thread, that is
	 * here, before the loops exist (they inherit the mask) */
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	concur_exec *ex;
	struct concur_exec_opts o = {.loops = (unsigned)loops,
	                             .idle_poll_ns = (unsigned)(idle_poll_us * 1000)};
	int err = concur_exec_new(&ex, &o);
	if (err) {
		fprintf(stderr, "%s: cannot start: %s %s\n", name, concur_strerror(err),
		        concur_last_error());
		return 1;
	}
	concur_future *sig = concur_signal(ex, &set);
	unsigned n = (unsigned)concur_exec_loops(ex);
	int lfd[MAX_LOOPS];
	uint16_t p = (uint16_t)port;
	for (unsigned i = 0; i < n; i++) {
		lfd[i] = make_listener(&p); /* the first may pick the port; the rest share it */
		if (lfd[i] < 0) {
			fprintf(stderr, "%s: listen on port %u: %s\n", name, p,
			        concur_strerror(lfd[i]));
			return 1;
		}
	}
	printf("%s: listening on %s%s%s:%u with %u loops\n", name,
	       bind_addr.ss_family == AF_INET6 ? "[" : "", host,
	       bind_addr.ss_family == AF_INET6 ? "]" : "", p, n);
	fflush(stdout);
	for (unsigned i = 0; i < n; i++)
		concur_release(concur_spawn_on(ex, i, accept_task, (void *)(intptr_t)lfd[i]));

	int64_t signo = concur_result(sig, -1);
	concur_release(sig);
	if (signo < 0)
		fprintf(stderr, "%s: cannot take signals: %s\n", name, concur_strerror((int)signo));
	else
		fprintf(stderr, "%s: signal %lld: stopping\n", name, (long long)signo);
	atomic_store(&stopping, true);
	struct second_signal again = {.name = name, .set = set, .ex = ex};
	pthread_t watcher;
	bool watching = pthread_create(&watcher, NULL, second_signal_wait, &again) == 0;
	for (unsigned i = 0; i < n; i++)
		shutdown(lfd[i], SHUT_RDWR); /* the accept streams end: no new connection */
	concur_future *sweep[MAX_LOOPS];
	for (unsigned i = 0; i < n; i++)
		sweep[i] = concur_spawn_on(ex, i, sweep_task, NULL);
	concur_wait(sweep, n, CONCUR_ALL_COMPLETED, CONCUR_NO_TIMEOUT, NULL);
	for (unsigned i = 0; i < n; i++)
		concur_release(sweep[i]);
	/* the requests under way end (a task still running at the bound is cancelled) */
	err = concur_exec_stop(ex, (int64_t)drain_ms * 1000000);
	if (watching) { /* wake the watcher if no second signal came; it may be stopping still */
		atomic_store(&again.done, true);
		pthread_kill(watcher, SIGTERM);
		pthread_join(watcher, NULL);
	}
	if (atomic_load(&again.forced))
		err = -ETIMEDOUT; /* this stop saw the work end, but the watcher's cancelled it */
	concur_exec_free(ex);
	for (unsigned i = 0; i < n; i++)
		close(lfd[i]);
	printf("%s: stopped (%s)\n", name, err ? "open requests cancelled" : "drained");
	return signo < 0;
}

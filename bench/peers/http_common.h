/* SPDX-License-Identifier: MIT */
/*
 * What the two hand-written peer HTTP servers share (the epoll one and the raw liburing one):
 * options (--port, --threads), a SO_REUSEPORT listener per thread, the Date header and the
 * plaintext answer. GET /plaintext answers "Hello, World!" with Date and Server headers, as
 * bench/servers/http.c does; keep-alive (HTTP/1.1) and pipelining: every complete request in what
 * was received is answered, the answers leave in one send. Anything else gets 404 (a method other
 * than GET) or 400 (no request line) and the connection closes. Not a full parser: it is the
 * least a fair peer must do for `wrk` on /plaintext.
 */
#ifndef BENCH_PEER_HTTP_COMMON_H
#define BENCH_PEER_HTTP_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PEER_IN_CAP      8192
#define PEER_OUT_CAP     65536
#define PEER_MAX_THREADS 64

struct peer_opts {
	unsigned port, threads;
};

static inline struct peer_opts peer_parse(int argc, char **argv, const char *name)
{
	struct peer_opts o = {8080, 1};
	for (int i = 1; i < argc; i++) {
		char *end;
		unsigned *dst = !strcmp(argv[i], "--port")      ? &o.port
		                : !strcmp(argv[i], "--threads") ? &o.threads
		                                                : NULL;
		if (!dst || i + 1 >= argc)
			goto usage;
		unsigned long v = strtoul(argv[++i], &end, 10);
		if (*end || (dst == &o.port && v > 65535) ||
		    (dst == &o.threads && (v < 1 || v > PEER_MAX_THREADS)))
			goto usage;
		*dst = (unsigned)v;
	}
	return o;
usage:
	fprintf(stderr, "usage: %s [--port N (0: any)] [--threads N]\n", name);
	exit(2);
}

/* A SO_REUSEPORT listener on 127.0.0.1 (*port 0: pick one and say which). -errno on failure. */
static inline int peer_listener(unsigned *port, int flags)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);
	int one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)*port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	socklen_t len = sizeof(a);
	if (fd < 0)
		return -errno;
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

/* The whole 200 answer with a fresh Date (re-built once a second per thread). */
static inline const char *peer_plaintext(size_t *len)
{
	static __thread char buf[256];
	static __thread time_t last;
	static __thread size_t n;
	time_t now = time(NULL);
	if (now != last) {
		struct tm tm;
		char date[64];
		gmtime_r(&now, &tm);
		strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
		n = (size_t)snprintf(
		    buf, sizeof(buf),
		    "HTTP/1.1 200 OK\r\nServer: peer\r\nContent-Type: text/plain\r\n"
		    "Content-Length: 13\r\nDate: %s\r\n\r\nHello, World!",
		    date);
		last = now;
	}
	*len = n;
	return buf;
}

/*
 * Answer the complete requests at the start of in[0..len) into out (room: out_cap - *out_len).
 * Returns the bytes consumed; *close is set on a bad request (answered, then close).
 */
static inline size_t peer_process(const char *in, size_t len, char *out, size_t *out_len,
                                  size_t out_cap, bool *close)
{
	static const char e400[] = "HTTP/1.1 400 Bad Request\r\nServer: peer\r\nContent-Length: "
	                           "0\r\nConnection: close\r\n\r\n";
	static const char e404[] = "HTTP/1.1 404 Not Found\r\nServer: peer\r\nContent-Length: "
	                           "9\r\n\r\nNot Found";
	size_t pos = 0;
	while (pos < len && *out_len + 256 <= out_cap) {
		const char *start = in + pos;
		const char *eoh = memmem(start, len - pos, "\r\n\r\n", 4);
		if (!eoh) {
			if (len - pos == PEER_IN_CAP) { /* header block too large */
				memcpy(out + *out_len, e400, sizeof(e400) - 1);
				*out_len += sizeof(e400) - 1;
				*close = true;
			}
			break;
		}
		size_t n = (size_t)(eoh + 4 - start);
		pos += n;
		if (n > 4 && !memcmp(start, "GET /plaintext ", 15)) {
			size_t rl;
			const char *r = peer_plaintext(&rl);
			memcpy(out + *out_len, r, rl);
			*out_len += rl;
		} else if (n > 4 && memchr(start, ' ', n)) {
			memcpy(out + *out_len, e404, sizeof(e404) - 1);
			*out_len += sizeof(e404) - 1;
		} else {
			memcpy(out + *out_len, e400, sizeof(e400) - 1);
			*out_len += sizeof(e400) - 1;
			*close = true;
			break;
		}
	}
	return pos;
}

/*
 * main() of a peer: --threads listeners (listen_flags: e.g. SOCK_NONBLOCK) each served by
 * loop(listener fd) in its own thread; print the port, wait for SIGINT/SIGTERM, exit (the
 * kernel closes every socket and ring).
 */
static inline int peer_main(int argc, char **argv, const char *name, void *(*loop)(void *),
                            int listen_flags)
{
	struct peer_opts o = peer_parse(argc, argv, name);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &set, NULL); /* the threads inherit the mask */
	signal(SIGPIPE, SIG_IGN);
	unsigned port = o.port;
	for (unsigned i = 0; i < o.threads; i++) {
		int fd = peer_listener(&port, listen_flags);
		pthread_t t;
		if (fd < 0) {
			fprintf(stderr, "%s: listen on port %u: %s\n", name, port, strerror(-fd));
			return 1;
		}
		if (pthread_create(&t, NULL, loop, (void *)(intptr_t)fd)) {
			fprintf(stderr, "%s: pthread_create failed\n", name);
			return 1;
		}
	}
	printf("%s: listening on 127.0.0.1:%u with %u threads\n", name, port, o.threads);
	fflush(stdout);
	int sig;
	sigwait(&set, &sig);
	printf("%s: signal %d: stopped\n", name, sig);
	fflush(stdout);
	_exit(0);
}

#endif

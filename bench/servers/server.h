/* SPDX-License-Identifier: MIT */
/*
 * What the example servers share, on concur's public API only: options (--bind, default 127.0.0.1;
 * --port, --loops, --drain-ms, --idle-ms, --request-ms, --send-ms), one SO_REUSEPORT listener and
 * one accepting task (a multishot accept stream, which goes on through transient errors such as
 * EMFILE) per loop, a task per connection, and a graceful stop on SIGINT/SIGTERM.
 *
 * Stop. The signals come as a concur_signal future (blocked in every thread first). Then: no new
 * connection (the listeners are shut down, so the accept streams end); every connection waiting
 * idle for its next request (in server_next with idle set) is woken by a sweep task on its loop
 * (concur_stream_cancel of its recv stream) and closes; a connection in the middle of a request
 * finishes it, answers and closes (server_stopping() says not to wait for another). That drain
 * is bounded by concur_exec_stop(ex, --drain-ms, default 5000): the tasks still running then are
 * cancelled (their waits fail with -ECANCELED, so they close). The process exits 0.
 *
 * Slow clients. Every wait of a connection is bounded, with deadline scopes that cost nothing
 * until they fire (concur_deadline_push): --idle-ms (default 60 s) for a keep-alive connection
 * waiting for its next request, --request-ms (30 s) for a request from its first byte to its
 * last (slowloris: a byte now and then resets no timer), --send-ms (30 s) for a send that makes
 * no progress (a client that does not read). And no wait holds one of the loop's receive buffers
 * (a chunk is processed from a copy, or sent by server_send_chunk), so clients that never read
 * cannot dry the loop's buffer ring and starve the others.
 */
#ifndef CONCUR_BENCH_SERVER_H
#define CONCUR_BENCH_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "concur.h"

/* Serve connections with conn(fd), which must call server_conn_done(fd) before it returns (it
 * closes fd). Returns the process exit status. */
int server_main(int argc, char **argv, const char *name, uint16_t default_port,
                int64_t (*conn)(int fd));

/* True once a stop was requested: a connection task should wind down. */
bool server_stopping(void);

/* Close a connection's fd (even in a cancelled task). */
void server_conn_done(int fd);

/*
 * The next chunk of a connection's recv stream (concur_stream_next). idle: the connection holds
 * no part of a request, so a stop may end the wait: then it returns 0 as at EOF (at once if the
 * stop came first; a chunk that arrived before the stop's cancel is still returned). A wait that
 * is not idle goes on through a stop until its request completes or the drain ends.
 */
int64_t server_next(concur_stream *s, struct concur_chunk *ch, bool idle);

/* Send all of buf (the direct form: call it from the connection's task), each send bounded by
 * --send-ms (a client that does not read). 0 or -errno. */
int server_send_all(int fd, const void *buf, size_t len);

/* Send a received chunk's bytes and give the chunk back to s: at once if the socket takes them
 * all, else from a copy, with the chunk given back before the wait (a wait for a client that does
 * not read must not hold one of the loop's receive buffers). 0 or -errno. */
int server_send_chunk(int fd, concur_stream *s, struct concur_chunk *ch);

/* A request/response connection: what server_serve() gives the protocol. */
struct server_conn {
	int fd;
	char *out; /* answers gathered for one send */
	size_t out_len, out_cap;
	uint64_t state; /* the protocol's own, per connection (starts at 0) */
};

/* Make room for need more bytes of answer, sending what is gathered if it must. 0, -E2BIG if
 * need is larger than the whole buffer (send it with server_send_all after this), -errno. */
int server_out_reserve(struct server_conn *c, size_t need);
/* Append n bytes of answer (after server_out_reserve). */
void server_out_add(struct server_conn *c, const void *p, size_t n);

/*
 * The protocol: handle the complete requests at the start of in[0..len) and return how many
 * bytes they took; set *close to end the connection after the answers went out. full: the
 * buffer is full, so an incomplete request will never complete (answer that it is too large).
 */
typedef size_t (*server_process_fn)(struct server_conn *c, char *in, size_t len, bool full,
                                    bool *close);

/* Receive (through an on-demand recv stream: an idle connection holds no buffer) and let process
 * answer, until EOF, an error, close or a stop; then server_conn_done(fd). A request may take up
 * to in_cap bytes (pieced together from the received chunks only while it is incomplete);
 * answers gather in an out_cap buffer lent from a per-thread pool while there is work. Use it as
 * (or in) server_main's conn. */
int64_t server_serve(int fd, size_t in_cap, size_t out_cap, server_process_fn process);

/*
 * The decimal at p[0..end) (an optional '-' when neg_ok, then digits up to end or the first
 * non-digit) into *v: the bytes it took, or -1 if there is no digit or it overflows. Never reads
 * past end: request bytes are not NUL-terminated, so strtoll() could.
 */
static inline long server_parse_dec(const char *p, const char *end, bool neg_ok, long long *v)
{
	const char *q = p;
	bool neg = neg_ok && q < end && *q == '-';
	unsigned long long acc = 0, lim = neg ? (unsigned long long)INT64_MAX + 1 : INT64_MAX;
	q += neg;
	const char *digits = q;
	for (; q < end && *q >= '0' && *q <= '9'; q++) {
		unsigned d = (unsigned)(*q - '0');
		if (acc > (lim - d) / 10)
			return -1;
		acc = acc * 10 + d;
	}
	if (q == digits)
		return -1;
	*v = neg ? (long long)(0 - acc) : (long long)acc;
	return (long)(q - p);
}

#endif

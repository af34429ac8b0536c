/* SPDX-License-Identifier: MIT */
/*
 * An HTTP/1.1 server: GET /plaintext answers "Hello, World!" (with Date and Server headers).
 * Keep-alive (HTTP/1.1 by default, HTTP/1.0 with "Connection: keep-alive") and pipelining: every
 * complete request in what was received is answered, the answers leave in one send. A malformed
 * request gets 400, a header block larger than the buffer 431, and the connection closes; so
 * does it on EOF (a half request and a hang-up just ends the connection). While the server stops,
 * a request under way is answered with "Connection: close" and the connection closes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "server.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define IN_CAP  8192  /* the largest header block we take */
#define OUT_CAP 16384 /* answers gathered before a send */

static const char body[] = "Hello, World!";

static __thread unsigned date_gen; /* bumped whenever the Date header changes */
static __thread time_t date_now;   /* read once per batch of requests (http_process) */

/* "Date: ...\r\n", refreshed once a second per thread. */
static const char *date_header(size_t *len)
{
	static __thread char buf[64];
	static __thread time_t last;
	static __thread size_t n;
	time_t now = date_now;
	if (now != last) {
		struct tm tm;
		gmtime_r(&now, &tm);
		n = strftime(buf, sizeof(buf), "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
		last = now;
		date_gen++;
	}
	*len = n;
	return buf;
}

static void respond(struct server_conn *o, const char *status, const char *ctype, const char *b,
                    size_t blen, bool keep_alive, bool head)
{
	char hdr[256];
	size_t dlen;
	const char *date = date_header(&dlen);
	int n = snprintf(hdr, sizeof(hdr),
	                 "HTTP/1.1 %s\r\nServer: concur\r\nContent-Type: %s\r\n"
	                 "Content-Length: %zu\r\n%s",
	                 status, ctype, blen, keep_alive ? "" : "Connection: close\r\n");
	server_out_add(o, hdr, (size_t)n);
	server_out_add(o, date, dlen);
	server_out_add(o, "\r\n", 2);
	if (!head)
		server_out_add(o, b, blen);
}

/* The whole keep-alive 200 answer to GET /plaintext, re-built once a second per thread: the hot
 * path of a benchmark copies it instead of formatting the same headers for every request. */
static const char *plaintext_answer(size_t *len)
{
	static __thread char buf[256];
	static __thread unsigned gen;
	static __thread size_t n;
	size_t dlen;
	const char *date = date_header(&dlen);
	if (!n || gen != date_gen) {
		n = (size_t)snprintf(
		    buf, sizeof(buf),
		    "HTTP/1.1 200 OK\r\nServer: concur\r\nContent-Type: text/plain\r\n"
		    "Content-Length: %zu\r\n%.*s\r\n%s",
		    sizeof(body) - 1, (int)dlen, date, body);
		gen = date_gen;
	}
	*len = n;
	return buf;
}

static void respond_error(struct server_conn *o, const char *status)
{
	respond(o, status, "text/plain", status, strlen(status), false, false);
}

/* RFC 9110 token characters, as a table (the parser asks for every byte of a name). */
static bool tchar[256];

__attribute__((constructor)) static void tchar_init(void)
{
	for (int c = 0; c < 256; c++)
		tchar[c] = isalnum(c) || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static inline bool is_tchar(char c)
{
	return tchar[(unsigned char)c];
}

enum { INCOMPLETE = 2 };

/* The CR ending the line that starts at p: NULL with *st INCOMPLETE when the line is not all
 * in yet, or -1 (malformed) when its CR is not followed by LF. */
static inline char *line_end_at(char *p, char *end, int *st)
{
	char *cr = memchr(p, '\r', (size_t)(end - p));
	if (!cr || cr + 1 == end) {
		*st = INCOMPLETE;
		return NULL;
	}
	if (cr[1] != '\n') {
		*st = -1;
		return NULL;
	}
	return cr;
}

/*
 * Parse the request at the start of in[0..len) and answer it, in one pass over its lines (the
 * blank line that ends the head is found by the same walk, not by a search of its own first).
 * Returns INCOMPLETE when the head is not all in yet (nothing answered), else the answer status:
 * 0 keep going, 1 close after answering, -1 malformed (400). *head_len: the head's bytes up to
 * and with the blank line; *body_len: bytes of body that follow it.
 */
static int handle(struct server_conn *o, char *in, size_t len, size_t *head_len, size_t *body_len)
{
	char *end = in + len, *p = in, *line_end;
	int st = 0;
	*body_len = 0;
	/* request line: METHOD SP TARGET SP HTTP/1.x CRLF */
	if (!(line_end = line_end_at(p, end, &st)))
		return st;
	char *m = p;
	while (p < line_end && is_tchar(*p))
		p++;
	if (p == m || p >= line_end || *p != ' ')
		return -1;
	size_t mlen = (size_t)(p - m);
	char *target = ++p;
	while (p < line_end && (unsigned char)*p > ' ' && *p != 127)
		p++;
	if (p == target || p >= line_end || *p != ' ' || *target != '/')
		return -1;
	size_t tlen = (size_t)(p - target);
	p++;
	if (line_end - p != 8 || memcmp(p, "HTTP/1.", 7) || (p[7] != '0' && p[7] != '1'))
		return -1;
	bool http10 = p[7] == '0';
	bool keep_alive = !http10, have_length = false;
	/* headers: NAME ":" value CRLF, up to the blank line */
	for (p = line_end + 2;; p = line_end + 2) {
		if (end - p < 2)
			return INCOMPLETE;
		if (p[0] == '\r') { /* the blank line (or a stray CR: malformed) */
			if (p[1] != '\n')
				return -1;
			*head_len = (size_t)(p + 2 - in);
			break;
		}
		if (!(line_end = line_end_at(p, end, &st)))
			return st;
		char *colon = p;
		while (colon < line_end && is_tchar(*colon))
			colon++;
		if (colon == p || colon >= line_end || *colon != ':')
			return -1;
		size_t nlen = (size_t)(colon - p);
		char *v = colon + 1;
		while (v < line_end && (*v == ' ' || *v == '\t'))
			v++;
		size_t vlen = (size_t)(line_end - v);
		if (nlen == 10 && !strncasecmp(p, "connection", 10)) {
			if (vlen >= 5 && !strncasecmp(v, "close", 5))
				keep_alive = false;
			else if (vlen >= 10 && !strncasecmp(v, "keep-alive", 10))
				keep_alive = true;
		} else if (nlen == 14 && !strncasecmp(p, "content-length", 14)) {
			long long cl;
			long took = server_parse_dec(v, line_end, false, &cl);
			if (took < 0 || (v + took != line_end && v[took] != ' ' && v[took] != '\t'))
				return -1;
			/* two that differ: which one frames the body is anyone's guess (a proxy in
			 * front may take the other: request smuggling), so 400 (RFC 9112, 6.3) */
			if (have_length && *body_len != (size_t)cl)
				return -1;
			have_length = true;
			*body_len = (size_t)cl;
		} else if (nlen == 17 && !strncasecmp(p, "transfer-encoding", 17)) {
			return -1; /* no chunked bodies here */
		}
	}
	if (keep_alive && server_stopping())
		keep_alive = false; /* draining: answer this one, then close */
	bool get = mlen == 3 && !memcmp(m, "GET", 3), head_req = mlen == 4 && !memcmp(m, "HEAD", 4);
	if (!get && !head_req)
		respond(o, "405 Method Not Allowed", "text/plain", "405 Method Not Allowed", 22,
		        keep_alive, false);
	else if (tlen == 10 && !memcmp(target, "/plaintext", 10) && get && keep_alive) {
		size_t alen;
		const char *a = plaintext_answer(&alen);
		server_out_add(o, a, alen);
	} else if (tlen == 10 && !memcmp(target, "/plaintext", 10))
		respond(o, "200 OK", "text/plain", body, sizeof(body) - 1, keep_alive, head_req);
	else
		respond(o, "404 Not Found", "text/plain", "404 Not Found", 13, keep_alive,
		        head_req);
	return keep_alive ? 0 : 1;
}

/* Answer every complete request in in[0..len); c->state: body bytes still to drop. */
static size_t http_process(struct server_conn *c, char *in, size_t len, bool full, bool *close)
{
	size_t pos = 0;
	date_now = time(NULL); /* one clock read for the answers made from these bytes */
	for (;;) {
		size_t k = c->state < len - pos ? (size_t)c->state : len - pos;
		pos += k;
		c->state -= k;
		if (c->state || pos == len)
			return pos;
		if (server_out_reserve(c, 512)) { /* the largest answer is well under that */
			*close = true;
			return pos;
		}
		size_t n = 0, blen;
		int st = handle(c, in + pos, len - pos, &n, &blen);
		if (st == INCOMPLETE) {
			if (pos == 0 && full) { /* no room for the rest of the header block */
				respond_error(c, "431 Request Header Fields Too Large");
				*close = true;
			}
			return pos;
		}
		pos += n;
		c->state = blen;
		if (st < 0)
			respond_error(c, "400 Bad Request");
		if (st != 0) {
			*close = true;
			return pos;
		}
	}
}

static int64_t http_conn(int fd)
{
	return server_serve(fd, IN_CAP, OUT_CAP, http_process);
}

int main(int argc, char **argv)
{
	return server_main(argc, argv, "http", 8080, http_conn);
}

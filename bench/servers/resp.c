/* SPDX-License-Identifier: MIT */
/*
 * A RESP (Redis protocol) server answering PING, ECHO, SET, GET, DEL (and an empty CONFIG GET,
 * which redis-benchmark asks first): enough for `redis-benchmark -t ping,set,get`. Requests may
 * be pipelined; they come as RESP arrays of bulk strings or as inline commands. The store is one
 * hash table behind striped locks.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "server.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define IN_CAP   (64 * 1024)
#define OUT_CAP  (16 * 1024)
#define MAX_ARGS 64
#define NBUCKETS (1 << 16)
#define NLOCKS   64

struct entry {
	struct entry *next;
	size_t klen, vlen;
	char *val;
	char key[];
};

static struct entry *table[NBUCKETS];
static pthread_mutex_t locks[NLOCKS];

static uint64_t hash(const char *s, size_t n)
{
	uint64_t h = 1469598103934665603ull;
	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
	return h;
}

static struct entry **find(struct entry **b, const char *k, size_t klen)
{
	while (*b && ((*b)->klen != klen || memcmp((*b)->key, k, klen)))
		b = &(*b)->next;
	return b;
}

static int out_bulk(struct server_conn *o, const char *s, size_t n)
{
	char hdr[32];
	int h = snprintf(hdr, sizeof(hdr), "$%zu\r\n", n);
	int err = server_out_reserve(o, (size_t)h + n + 2);
	if (err == -E2BIG) { /* larger than the buffer: send it straight */
		err = server_send_all(o->fd, hdr, (size_t)h);
		if (!err)
			err = server_send_all(o->fd, s, n);
		if (!err)
			err = server_send_all(o->fd, "\r\n", 2);
		return err;
	}
	if (err)
		return err;
	server_out_add(o, hdr, (size_t)h);
	server_out_add(o, s, n);
	server_out_add(o, "\r\n", 2);
	return 0;
}

static int out_simple(struct server_conn *o, const char *s)
{
	size_t n = strlen(s);
	int err = server_out_reserve(o, n);
	if (!err)
		server_out_add(o, s, n);
	return err;
}

static bool cmd_is(const char *a, size_t n, const char *name)
{
	return n == strlen(name) && !strncasecmp(a, name, n);
}

static int execute(struct server_conn *o, int argc, char **argv, size_t *alen)
{
	if (cmd_is(argv[0], alen[0], "PING")) {
		if (argc == 1)
			return out_simple(o, "+PONG\r\n");
		return argc == 2 ? out_bulk(o, argv[1], alen[1])
		                 : out_simple(o, "-ERR wrong number of arguments for 'ping'\r\n");
	}
	if (cmd_is(argv[0], alen[0], "ECHO") && argc == 2)
		return out_bulk(o, argv[1], alen[1]);
	if (cmd_is(argv[0], alen[0], "SET") && argc == 3) {
		struct entry *e = malloc(sizeof(*e) + alen[1]);
		char *v = malloc(alen[2] ? alen[2] : 1);
		if (!e || !v) {
			free(e);
			free(v);
			return out_simple(o, "-ERR out of memory\r\n");
		}
		memcpy(e->key, argv[1], alen[1]);
		memcpy(v, argv[2], alen[2]);
		e->klen = alen[1];
		e->vlen = alen[2];
		e->val = v;
		uint64_t h = hash(argv[1], alen[1]);
		pthread_mutex_t *l = &locks[h % NLOCKS];
		pthread_mutex_lock(l);
		struct entry **b = find(&table[h % NBUCKETS], argv[1], alen[1]);
		struct entry *old = *b;
		e->next = old ? old->next : NULL;
		*b = e;
		pthread_mutex_unlock(l);
		if (old) {
			free(old->val);
			free(old);
		}
		return out_simple(o, "+OK\r\n");
	}
	if (cmd_is(argv[0], alen[0], "GET") && argc == 2) {
		uint64_t h = hash(argv[1], alen[1]);
		pthread_mutex_t *l = &locks[h % NLOCKS];
		pthread_mutex_lock(l);
		struct entry *e = *find(&table[h % NBUCKETS], argv[1], alen[1]);
		int err;
		if (!e) {
			err = out_simple(o, "$-1\r\n");
		} else if (o->out_len + e->vlen + 32 <= o->out_cap) {
			err = out_bulk(o, e->val, e->vlen); /* no send under the lock */
		} else {
			size_t n = e->vlen;
			char *copy = malloc(n ? n : 1);
			if (copy)
				memcpy(copy, e->val, n);
			pthread_mutex_unlock(l);
			err = copy ? out_bulk(o, copy, n) : out_simple(o, "-ERR oom\r\n");
			free(copy);
			return err;
		}
		pthread_mutex_unlock(l);
		return err;
	}
	if (cmd_is(argv[0], alen[0], "DEL") && argc >= 2) {
		long n = 0;
		for (int i = 1; i < argc; i++) {
			uint64_t h = hash(argv[i], alen[i]);
			pthread_mutex_t *l = &locks[h % NLOCKS];
			pthread_mutex_lock(l);
			struct entry **b = find(&table[h % NBUCKETS], argv[i], alen[i]);
			struct entry *e = *b;
			if (e)
				*b = e->next;
			pthread_mutex_unlock(l);
			if (e) {
				free(e->val);
				free(e);
				n++;
			}
		}
		char r[32];
		snprintf(r, sizeof(r), ":%ld\r\n", n);
		return out_simple(o, r);
	}
	if (cmd_is(argv[0], alen[0], "CONFIG"))
		return out_simple(o, "*0\r\n");
	return out_simple(o, "-ERR unknown command\r\n");
}

/* What parse_num() found: the status is apart from the number, which may be any value. */
enum num_status { NUM_OK, NUM_INCOMPLETE, NUM_MALFORMED };

/* A decimal after a type byte up to CRLF, into *v. */
static enum num_status parse_num(const char *p, const char *end, const char **next, long long *v)
{
	const char *cr = memchr(p, '\r', (size_t)(end - p));
	if (!cr || cr + 1 >= end)
		return NUM_INCOMPLETE;
	if (cr[1] != '\n')
		return NUM_MALFORMED;
	if (server_parse_dec(p, cr, true, v) != cr - p)
		return NUM_MALFORMED;
	*next = cr + 2;
	return NUM_OK;
}

/*
 * Parse one command at p: its length (> 0), 0 if incomplete, -1 if malformed. argv point into
 * the buffer.
 */
static long parse(char *p, char *end, int *argc, char **argv, size_t *alen)
{
	const char *q = p;
	*argc = 0;
	if (*p != '*') { /* inline: words up to LF */
		char *lf = memchr(p, '\n', (size_t)(end - p));
		if (!lf)
			return 0;
		for (char *w = p; w < lf && *argc < MAX_ARGS;) {
			while (w < lf && (*w == ' ' || *w == '\r'))
				w++;
			char *s = w;
			while (w < lf && *w != ' ' && *w != '\r')
				w++;
			if (w > s) {
				argv[*argc] = s;
				alen[(*argc)++] = (size_t)(w - s);
			}
		}
		/* more than MAX_ARGS words: refused, as a longer multibulk is (the rest was
		 * dropped: DEL k0 .. k69 deleted 64 keys and said so) */
		for (char *w = *argc ? argv[*argc - 1] + alen[*argc - 1] : p; w < lf; w++)
			if (*w != ' ' && *w != '\r')
				return -1;
		return lf + 1 - p;
	}
	long long n, l;
	enum num_status st = parse_num(p + 1, end, &q, &n);
	if (st != NUM_OK)
		return st == NUM_INCOMPLETE ? 0 : -1;
	if (n < 1 || n > MAX_ARGS) /* a negative count (even -2) is malformed, not "incomplete" */
		return -1;
	for (long long i = 0; i < n; i++) {
		if (q >= end)
			return 0;
		if (*q != '$')
			return -1;
		st = parse_num(q + 1, end, &q, &l);
		if (st != NUM_OK)
			return st == NUM_INCOMPLETE ? 0 : -1;
		if (l < 0 || l > IN_CAP)
			return -1;
		if (end - q < l + 2)
			return 0;
		if (q[l] != '\r' || q[l + 1] != '\n')
			return -1;
		argv[*argc] = (char *)q;
		alen[(*argc)++] = (size_t)l;
		q += l + 2;
	}
	return q - p;
}

/* Execute every complete command in in[0..len). */
static size_t resp_process(struct server_conn *c, char *in, size_t len, bool full, bool *close)
{
	size_t pos = 0;
	while (pos < len) {
		char *argv[MAX_ARGS];
		size_t alen[MAX_ARGS];
		int argc;
		long n = parse(in + pos, in + len, &argc, argv, alen);
		if (n == 0) {
			if (pos == 0 && full) {
				out_simple(c, "-ERR request too large\r\n");
				*close = true;
			}
			break;
		}
		if (n < 0) {
			out_simple(c, "-ERR Protocol error\r\n");
			*close = true;
			break;
		}
		pos += (size_t)n;
		if (argc && execute(c, argc, argv, alen)) {
			*close = true;
			break;
		}
	}
	return pos;
}

static int64_t resp_conn(int fd)
{
	return server_serve(fd, IN_CAP, OUT_CAP, resp_process);
}

int main(int argc, char **argv)
{
	for (int i = 0; i < NLOCKS; i++)
		pthread_mutex_init(&locks[i], NULL);
	return server_main(argc, argv, "resp", 6379, resp_conn);
}

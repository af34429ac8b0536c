/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness core for the example servers' protocol parsers: the server file is included
 * whole (its main renamed), server.c's functions are replaced by stubs that gather answers into
 * a buffer and drop them, and the input is fed to the protocol's process function the way
 * server_serve() does: in chunks (the first byte picks their size, so requests split at every
 * place), keeping an incomplete request's bytes, with `full` when it reaches the request cap.
 * No socket, no executor: the parser alone, under ASan+UBSan.
 */
#ifndef CONCUR_FUZZ_SERVER_H
#define CONCUR_FUZZ_SERVER_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server.h"

static size_t fuzz_sent; /* answer bytes "sent" (dropped) */

bool server_stopping(void)
{
	return false;
}

void server_conn_done(int fd)
{
	(void)fd;
}

int server_send_all(int fd, const void *buf, size_t len)
{
	(void)fd;
	(void)buf;
	fuzz_sent += len;
	return 0;
}

int server_out_reserve(struct server_conn *c, size_t need)
{
	if (c->out_len + need <= c->out_cap)
		return 0;
	server_send_all(c->fd, c->out, c->out_len);
	c->out_len = 0;
	return need > c->out_cap ? -E2BIG : 0;
}

void server_out_add(struct server_conn *c, const void *p, size_t n)
{
	if (c->out_len + n > c->out_cap)
		abort(); /* the protocol wrote past what it reserved */
	memcpy(c->out + c->out_len, p, n);
	c->out_len += n;
}

int64_t server_serve(int fd, size_t in_cap, size_t out_cap, server_process_fn process)
{
	(void)fd, (void)in_cap, (void)out_cap, (void)process;
	return 0;
}

int server_main(int argc, char **argv, const char *name, uint16_t default_port,
                int64_t (*conn)(int fd))
{
	(void)argc, (void)argv, (void)name, (void)default_port, (void)conn;
	return 0;
}

/* Feed data to process as a connection would receive it. */
static void fuzz_feed(const uint8_t *data, size_t size, size_t in_cap, size_t out_cap,
                      server_process_fn process)
{
	static const size_t chunk_sizes[] = {4096, 1, 2, 3, 7, 16, 100, 1000};
	size_t chunk = size ? chunk_sizes[data[0] % 8] : 1;
	char *in = malloc(in_cap); /* exactly in_cap: ASan sees a read past it */
	struct server_conn c = {.fd = -1, .out = malloc(out_cap), .out_cap = out_cap};
	size_t len = 0, pos = size ? 1 : 0;
	bool close_it = false;
	while (pos < size && !close_it) {
		size_t k = size - pos < chunk ? size - pos : chunk;
		if (k > in_cap - len)
			k = in_cap - len;
		memcpy(in + len, data + pos, k);
		len += k;
		pos += k;
		size_t used = process(&c, in, len, len == in_cap, &close_it);
		if (used > len)
			abort(); /* took more than it was given */
		if (!close_it && len == in_cap && used == 0)
			abort(); /* a full buffer must be answered, or nothing ever moves */
		memmove(in, in + used, len - used);
		len -= used;
		if (c.out_len)
			server_send_all(c.fd, c.out, c.out_len);
		c.out_len = 0;
	}
	free(in);
	free(c.out);
}

#endif

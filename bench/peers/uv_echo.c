/* SPDX-License-Identifier: MIT */
/*
 * A libuv echo server, written the way libuv's own examples write one: one uv_loop (libuv runs
 * a loop on one thread; --threads accepts only 1), uv_listen on 127.0.0.1, uv_read_start per
 * connection with a per-connection read buffer, and each chunk read written back at once with
 * uv_try_write (no request, no copy: the usual case in a ping-pong); what the socket does not
 * take goes into a uv_write request with its own copy. TCP_NODELAY on every connection. Stops on
 * SIGINT/SIGTERM (a uv_signal handle exits the process).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define ECHO_BUF 65536

struct conn {
	uv_tcp_t tcp;
	char buf[ECHO_BUF];
};

struct wreq {
	uv_write_t req;
	char data[];
};

static void die(const char *what, int err)
{
	fprintf(stderr, "uv_echo: %s: %s\n", what, uv_strerror(err));
	exit(1);
}

static void on_close(uv_handle_t *h)
{
	free(h); /* the uv_tcp_t is the first member of struct conn */
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
	struct conn *c = (struct conn *)h;
	(void)hint;
	*buf = uv_buf_init(c->buf, ECHO_BUF);
}

static void on_write(uv_write_t *req, int status)
{
	(void)status; /* a failed write shows up as a read error next */
	free(req);
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
	if (n < 0) {
		uv_close((uv_handle_t *)s, on_close);
		return;
	}
	if (n == 0)
		return;
	uv_buf_t b = uv_buf_init(buf->base, (unsigned)n);
	int w = uv_try_write(s, &b, 1);
	if (w == n)
		return;
	size_t off = w > 0 ? (size_t)w : 0;
	if (w < 0 && w != UV_EAGAIN) {
		uv_close((uv_handle_t *)s, on_close);
		return;
	}
	struct wreq *r = malloc(sizeof(*r) + (size_t)n - off);
	if (!r) {
		uv_close((uv_handle_t *)s, on_close);
		return;
	}
	memcpy(r->data, buf->base + off, (size_t)n - off);
	b = uv_buf_init(r->data, (unsigned)((size_t)n - off));
	if (uv_write(&r->req, s, &b, 1, on_write) < 0) {
		free(r);
		uv_close((uv_handle_t *)s, on_close);
	}
}

static void on_connection(uv_stream_t *server, int status)
{
	if (status < 0)
		return;
	struct conn *c = malloc(sizeof(*c));
	if (!c)
		return;
	uv_tcp_init(server->loop, &c->tcp);
	if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
		uv_close((uv_handle_t *)&c->tcp, on_close);
		return;
	}
	uv_tcp_nodelay(&c->tcp, 1);
	uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_signal(uv_signal_t *h, int sig)
{
	(void)h;
	printf("uv_echo: signal %d: stopped\n", sig);
	fflush(stdout);
	exit(0);
}

int main(int argc, char **argv)
{
	unsigned long port = 0;
	for (int i = 1; i < argc; i++) {
		char *end;
		unsigned long v = i + 1 < argc ? strtoul(argv[i + 1], &end, 10) : 0;
		if (i + 1 >= argc || *end)
			goto usage;
		if (!strcmp(argv[i], "--port") && v <= 65535)
			port = v;
		else if (strcmp(argv[i], "--threads") || v != 1)
			goto usage;
		i++;
	}
	signal(SIGPIPE, SIG_IGN);
	uv_loop_t *loop = uv_default_loop();
	uv_tcp_t server;
	uv_signal_t sigterm, sigint;
	struct sockaddr_in a;
	uv_ip4_addr("127.0.0.1", (int)port, &a);
	int rc;
	uv_tcp_init(loop, &server);
	if ((rc = uv_tcp_bind(&server, (const struct sockaddr *)&a, 0)) < 0)
		die("bind", rc);
	if ((rc = uv_listen((uv_stream_t *)&server, 4096, on_connection)) < 0)
		die("listen", rc);
	int len = sizeof(a);
	uv_tcp_getsockname(&server, (struct sockaddr *)&a, &len);
	uv_signal_init(loop, &sigterm);
	uv_signal_start(&sigterm, on_signal, SIGTERM);
	uv_signal_init(loop, &sigint);
	uv_signal_start(&sigint, on_signal, SIGINT);
	printf("uv_echo: listening on 127.0.0.1:%u with 1 threads (libuv %s)\n", ntohs(a.sin_port),
	       uv_version_string());
	fflush(stdout);
	return uv_run(loop, UV_RUN_DEFAULT);
usage:
	fprintf(stderr, "usage: %s [--port N (0: any)] [--threads 1]\n", argv[0]);
	return 2;
}

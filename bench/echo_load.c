/* SPDX-License-Identifier: MIT */
/*
 * The load generator of the echo workload: --conns connections to 127.0.0.1:--port, each a
 * request/response ping-pong of --size byte messages (send one, wait until all of it came back,
 * check it, send the next). One thread, one level-triggered epoll set, non-blocking sockets with
 * TCP_NODELAY: the client is as light as the servers, so on a 2-CPU machine each gets about one.
 *
 * The run: connect, --warmup seconds of load not counted, then --seconds counted. The server's
 * CPU time (utime + stime of every thread of --pid, from /proc/PID/stat) is read at the two ends
 * of the counted window, so connecting and warming up are not in it. Prints one JSON line in the
 * format of the bench binaries (value = server µs CPU per message; extra: msgs/s, latency p50 /
 * p99, CPU seconds). A short read, a wrong byte, a closed connection or the time running out
 * (alarm at warm-up + seconds + 10) fails the run with a non-zero exit status.
 */
#define _GNU_SOURCE
#include "common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#define MAX_CONNS 1024
#define HIST_US   20000 /* latency histogram: 1 µs buckets up to 20 ms, then one overflow */

struct conn {
	int fd;
	uint64_t seq;    /* the message number, in its first 8 bytes */
	size_t got;      /* bytes of the echo received so far */
	int64_t sent_ns; /* when the message went out */
	unsigned char *in;
};

static size_t msg_size;
static unsigned char *pattern; /* every message: seq (8 bytes) then these bytes */
static uint64_t hist[HIST_US + 1];

static void on_alarm(int sig)
{
	static const char m[] = "echo_load: time limit reached (a server stopped answering?)\n";
	(void)sig;
	if (write(2, m, sizeof(m) - 1) < 0) {
	}
	_exit(3);
}

/* utime + stime of the whole process pid, in clock ticks. */
static long long proc_cpu_ticks(int pid)
{
	char path[64], buf[1024];
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		bench_die("echo_load: open %s: %s", path, strerror(errno));
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		bench_die("echo_load: read %s failed", path);
	buf[n] = 0;
	char *p = strrchr(buf, ')'); /* the command name may hold spaces */
	unsigned long long ut, st;
	/* after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
	 * stime */
	if (!p ||
	    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
		bench_die("echo_load: cannot parse %s", path);
	return (long long)(ut + st);
}

static void send_msg(struct conn *c)
{
	memcpy(pattern, &c->seq, sizeof(c->seq));
	size_t off = 0;
	c->sent_ns = bench_now_ns();
	while (off < msg_size) {
		ssize_t w = send(c->fd, pattern + off, msg_size - off, MSG_NOSIGNAL);
		if (w > 0) {
			off += (size_t)w;
		} else if (w < 0 &&
		           errno == EAGAIN) { /* a full socket buffer: not in a ping-pong */
			struct pollfd p = {.fd = c->fd, .events = POLLOUT};
			poll(&p, 1, 1000);
		} else {
			bench_die("echo_load: send: %s", w < 0 ? strerror(errno) : "0 bytes");
		}
	}
	c->got = 0;
}

/* Receive what is there; true when the whole echo arrived (and was checked). */
static bool recv_some(struct conn *c)
{
	ssize_t r = recv(c->fd, c->in + c->got, msg_size - c->got, 0);
	if (r < 0 && errno == EAGAIN)
		return false;
	if (r <= 0)
		bench_die("echo_load: recv: %s", r < 0 ? strerror(errno) : "the server closed");
	c->got += (size_t)r;
	if (c->got < msg_size)
		return false;
	uint64_t seq;
	memcpy(&seq, c->in, sizeof(seq));
	if (seq != c->seq || memcmp(c->in + 8, pattern + 8, msg_size - 8))
		bench_die("echo_load: the echo of message %llu differs from what was sent",
		          (unsigned long long)c->seq);
	return true;
}

static int connect_one(int port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	int one = 1;
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)))
		bench_die("echo_load: connect 127.0.0.1:%d: %s", port, strerror(errno));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	return fd;
}

static double percentile_us(uint64_t total, double q)
{
	uint64_t want = (uint64_t)(q * (double)total), seen = 0;
	for (int i = 0; i <= HIST_US; i++) {
		seen += hist[i];
		if (seen > want)
			return i + 0.5;
	}
	return HIST_US;
}

static void usage(void)
{
	fprintf(stderr, "usage: echo_load --port P --pid SERVER_PID [--conns 64] [--size 64] "
	                "[--seconds 2] [--warmup 0.5]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	long port = -1, pid = -1, nconns = 64, size = 64;
	double seconds = 2, warmup = 0.5;
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		const char *o = argv[i], *v = argv[++i];
		char *end;
		double x = strtod(v, &end);
		if (*end || x < 0)
			usage();
		if (!strcmp(o, "--port"))
			port = (long)x;
		else if (!strcmp(o, "--pid"))
			pid = (long)x;
		else if (!strcmp(o, "--conns"))
			nconns = (long)x;
		else if (!strcmp(o, "--size"))
			size = (long)x;
		else if (!strcmp(o, "--seconds"))
			seconds = x;
		else if (!strcmp(o, "--warmup"))
			warmup = x;
		else
			usage();
	}
	if (port <= 0 || port > 65535 || pid <= 0 || nconns < 1 || nconns > MAX_CONNS || size < 8 ||
	    size > (1 << 20) || seconds <= 0)
		usage();
	signal(SIGALRM, on_alarm);
	alarm((unsigned)(warmup + seconds) + 10);
	signal(SIGPIPE, SIG_IGN);

	msg_size = (size_t)size;
	pattern = malloc(msg_size);
	struct conn *conns = calloc((size_t)nconns, sizeof(*conns));
	if (!pattern || !conns)
		bench_die("echo_load: out of memory");
	for (size_t i = 0; i < msg_size; i++)
		pattern[i] = (unsigned char)('a' + i % 26);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		bench_die("echo_load: epoll_create1: %s", strerror(errno));
	for (long i = 0; i < nconns; i++) {
		struct conn *c = &conns[i];
		c->fd = connect_one((int)port);
		c->in = malloc(msg_size);
		if (!c->in)
			bench_die("echo_load: out of memory");
		struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev))
			bench_die("echo_load: epoll_ctl: %s", strerror(errno));
	}

	int64_t start = bench_now_ns();
	int64_t t0 = start + (int64_t)(warmup * 1e9), t1 = t0 + (int64_t)(seconds * 1e9);
	long long cpu0 = -1, cpu1 = -1;
	uint64_t msgs = 0;
	int64_t w0 = 0, w1 = 0;
	if (!warmup) {
		cpu0 = proc_cpu_ticks((int)pid);
		w0 = bench_now_ns();
	}
	for (long i = 0; i < nconns; i++)
		send_msg(&conns[i]);
	struct epoll_event evs[256];
	for (;;) {
		int n = epoll_wait(ep, evs, 256, 1000);
		if (n < 0 && errno != EINTR)
			bench_die("echo_load: epoll_wait: %s", strerror(errno));
		int64_t now = bench_now_ns();
		if (cpu0 < 0 && now >= t0) { /* the counted window opens */
			cpu0 = proc_cpu_ticks((int)pid);
			w0 = bench_now_ns();
		} else if (cpu0 >= 0 && now >= t1) { /* and closes */
			cpu1 = proc_cpu_ticks((int)pid);
			w1 = bench_now_ns();
			break;
		}
		for (int k = 0; k < n; k++) {
			struct conn *c = evs[k].data.ptr;
			if (!recv_some(c))
				continue;
			if (cpu0 >= 0) {
				int64_t us = (now - c->sent_ns) / 1000;
				hist[us < HIST_US ? us : HIST_US]++;
				msgs++;
			}
			c->seq++;
			send_msg(c);
		}
	}
	if (!msgs)
		bench_die("echo_load: no message came back in the counted window");
	double wall = (double)(w1 - w0) / 1e9;
	double cpu = (double)(cpu1 - cpu0) / (double)sysconf(_SC_CLK_TCK);
	double cpu_us = cpu * 1e6 / (double)msgs;
	if (cpu_us <= 0) /* below the clock tick: report one tick rather than zero */
		cpu_us = 1e6 / (double)sysconf(_SC_CLK_TCK) / (double)msgs;
	char params[200];
	snprintf(params, sizeof(params),
	         "\"conns\": %ld, \"size\": %ld, \"seconds\": %g, \"warmup\": %g", nconns, size,
	         seconds, warmup);
	bench_begin(cpu_us, "µs CPU/msg", "lower", params);
	printf("}, \"extra\": {\"msgs\": %llu, \"wall_s\": %.4f, \"msg_s\": %.6g, "
	       "\"cpu_s\": %.3f, \"cpu_us_per_msg\": %.6g, \"p50_us\": %.1f, \"p99_us\": %.1f",
	       (unsigned long long)msgs, wall, (double)msgs / wall, cpu, cpu_us,
	       percentile_us(msgs, 0.50), percentile_us(msgs, 0.99));
	bench_end();
	return 0;
}

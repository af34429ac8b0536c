/* SPDX-License-Identifier: MIT */
/*
 * The load generator of the conns workload: --conns TCP connections to 127.0.0.1:--port, all
 * opened, held idle, then each echoes one --size byte message. It measures the server (--pid):
 *
 *  - RSS per connection: VmRSS (/proc/PID/status) with every connection open and idle, minus
 *    VmRSS before the first connection, divided by the connections;
 *  - connect rate: connections / the time from the first connect() until every connection is
 *    established and the server has accepted all of them (its listener's accept queue is empty);
 *  - CPU per message of the echo round: utime + stime of every thread of the server
 *    (/proc/PID/stat) across the round, divided by the messages.
 *
 * One thread, one epoll set, non-blocking sockets, loopback only: the server is 127.0.0.1, the
 * client sockets are bound to 127.0.0.2, 127.0.0.3, ... in turn (port 0 with
 * IP_BIND_ADDRESS_NO_PORT: the port is chosen at connect time), at least 4 of them and
 * --per-source connections each at most, so 100,000 connections fit in the ephemeral port range.
 * Connects go out in batches: at most --batch are in the handshake at once, and none is started
 * while the listener's accept queue (read by sock_diag: a netlink dump of the listening sockets)
 * holds more than min(1024, net.core.somaxconn / 2), so a slow server is never flooded into
 * dropped SYNs (which would cost a 1 s retransmission and measure the kernel's timer, not the
 * server). Without sock_diag (or with --sock-diag 0) the connect phase ends when the server
 * holds --conns more fds (/proc/PID/fd).
 *
 * Before the idle RSS is read, the server must have finished with the connections it accepted:
 * the client waits until its CPU time stops moving (3 samples 50 ms apart, at most 3 s), then
 * holds the connections idle for --idle seconds (the server's CPU time meanwhile is reported: an
 * idle server should use none). The echo round keeps at most --window messages outstanding.
 * Every connection ends with an RST (SO_LINGER 0, also when the run dies), so no TIME_WAIT is
 * left behind for the next run.
 *
 * A failed connect, a connection the server closes, a wrong echo, a round making no progress
 * for 10 s, or the --time-limit alarm fail the run with a message and a non-zero exit status.
 * Prints one JSON line in the format of the bench binaries: value = KiB of server RSS per
 * connection; extra: the connect rate, the CPU per message and the figures behind them.
 */
#define _GNU_SOURCE
#include "common.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define TCP_LISTEN_STATE 10 /* TCP_LISTEN in the kernel's enum */
#define STALL_NS         (10 * 1000000000LL)

enum { CONNECTING, IDLE, SENT, DONE };

struct conn {
	int fd;
	unsigned char state;
	unsigned char got; /* bytes of the echo received (size <= 255) */
};

static struct conn *conns;
static long nconns, msg_size, nsrc;
static int server_pid, port, diag_fd = -1;
static unsigned char pattern[256];

static void on_alarm(int sig)
{
	static const char m[] = "conns_load: time limit reached (a server stopped answering?)\n";
	(void)sig;
	if (write(2, m, sizeof(m) - 1) < 0) {
	}
	_exit(3);
}

static int read_proc(const char *what, char *buf, size_t cap)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/%s", server_pid, what);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		bench_die("conns_load: open %s: %s (did the server die?)", path, strerror(errno));
	ssize_t n = read(fd, buf, cap - 1);
	close(fd);
	if (n <= 0)
		bench_die("conns_load: read %s failed", path);
	buf[n] = 0;
	return (int)n;
}

/* utime + stime of the whole server process, in clock ticks. */
static long long server_cpu_ticks(void)
{
	char buf[1024];
	read_proc("stat", buf, sizeof(buf));
	char *p = strrchr(buf, ')'); /* the command name may hold spaces */
	unsigned long long ut, st;
	if (!p ||
	    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
		bench_die("conns_load: cannot parse /proc/%d/stat", server_pid);
	return (long long)(ut + st);
}

static long server_rss_kib(void)
{
	char buf[4096];
	read_proc("status", buf, sizeof(buf));
	char *p = strstr(buf, "\nVmRSS:");
	long kib;
	if (!p || sscanf(p + 7, "%ld", &kib) != 1)
		bench_die("conns_load: no VmRSS in /proc/%d/status", server_pid);
	return kib;
}

static long server_fds(void)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/%d/fd", server_pid);
	DIR *d = opendir(path);
	if (!d)
		bench_die("conns_load: opendir %s: %s", path, strerror(errno));
	long n = 0;
	for (struct dirent *e; (e = readdir(d));)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

/* Wait until the server's CPU time stops moving (it finished what it was doing), at most 3 s. */
static void server_settle(void)
{
	long long last = server_cpu_ticks();
	int still = 0;
	for (int i = 0; i < 60 && still < 3; i++) {
		usleep(50000);
		long long now = server_cpu_ticks();
		still = now == last ? still + 1 : 0;
		last = now;
	}
}

/* The listener's accept queue (connections established, not yet accepted), or -1 if sock_diag
 * cannot tell. */
static long accept_queue(void)
{
	if (diag_fd < 0)
		return -1;
	struct {
		struct nlmsghdr nlh;
		struct inet_diag_req_v2 r;
	} req = {
	    .nlh = {.nlmsg_len = sizeof(req),
	            .nlmsg_type = SOCK_DIAG_BY_FAMILY,
	            .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP},
	    .r = {.sdiag_family = AF_INET,
	          .sdiag_protocol = IPPROTO_TCP,
	          .idiag_states = 1u << TCP_LISTEN_STATE},
	};
	if (send(diag_fd, &req, sizeof(req), 0) != (ssize_t)sizeof(req))
		return -1;
	long q = 0;
	bool found = false;
	static char buf[32768] __attribute__((aligned(8)));
	for (;;) {
		ssize_t n = recv(diag_fd, buf, sizeof(buf), 0);
		if (n <= 0)
			return -1;
		for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n);
		     h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type == NLMSG_DONE)
				return found ? q : -1;
			if (h->nlmsg_type == NLMSG_ERROR)
				return -1;
			struct inet_diag_msg *m = NLMSG_DATA(h);
			if (ntohs(m->id.idiag_sport) == port) {
				q += (long)m->idiag_rqueue;
				found = true;
			}
		}
	}
}

static void connect_one(int ep, long i)
{
	struct conn *c = &conns[i];
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		bench_die("conns_load: socket (connection %ld): %s", i, strerror(errno));
	int one = 1;
	struct sockaddr_in src = {.sin_family = AF_INET};
	src.sin_addr.s_addr = htonl(INADDR_LOOPBACK + 1 + (uint32_t)(i % nsrc)); /* 127.0.0.2 ... */
	setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	/* closed with an RST (at the end, or when the run dies): no TIME_WAIT for the next run */
	struct linger lg = {1, 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	if (bind(fd, (struct sockaddr *)&src, sizeof(src)))
		bench_die("conns_load: bind %s: %s", inet_ntoa(src.sin_addr), strerror(errno));
	struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) && errno != EINPROGRESS)
		bench_die("conns_load: connect %s -> 127.0.0.1:%d (connection %ld): %s",
		          inet_ntoa(src.sin_addr), port, i, strerror(errno));
	c->fd = fd;
	c->state = CONNECTING;
	/* edge-triggered: one EPOLLOUT when the handshake is done, EPOLLIN when data or EOF come */
	struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
	                         .data.u64 = i};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev))
		bench_die("conns_load: epoll_ctl: %s", strerror(errno));
}

static long closed_idle; /* connections the server closed before their message */

/* One connection's event. Returns 1 when a connection got established or its echo completed. */
static int on_event(struct epoll_event *e)
{
	struct conn *c = &conns[e->data.u64];
	if (c->state == CONNECTING) {
		int err = 0;
		socklen_t len = sizeof(err);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err)
			bench_die("conns_load: connect (connection %llu): %s",
			          (unsigned long long)e->data.u64, strerror(err));
		if (!(e->events & (EPOLLOUT | EPOLLIN)))
			return 0;
		c->state = IDLE;
		if (e->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))
			closed_idle++; /* established and already closed: counted, reported */
		return 1;
	}
	if (c->state == IDLE) {
		if (e->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
			closed_idle++;
			c->state = DONE; /* never echoes: reported as closed by the server */
		}
		return 0;
	}
	if (c->state != SENT || !(e->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
		return 0;
	/* the message is the connection's number, then the pattern: each piece is checked as it
	 * comes, so a connection keeps no buffer */
	uint64_t id = e->data.u64;
	memcpy(pattern, &id, sizeof(id));
	unsigned char in[256];
	while (c->got < msg_size) {
		ssize_t r = recv(c->fd, in, (size_t)msg_size - c->got, 0);
		if (r < 0 && errno == EAGAIN)
			return 0;
		if (r <= 0)
			bench_die("conns_load: recv (connection %llu): %s", (unsigned long long)id,
			          r < 0 ? strerror(errno) : "the server closed it before the echo");
		if (memcmp(in, pattern + c->got, (size_t)r))
			bench_die(
			    "conns_load: the echo on connection %llu differs from what was sent",
			    (unsigned long long)id);
		c->got = (unsigned char)(c->got + r);
	}
	c->state = DONE;
	return 1;
}

static void send_msg(long i)
{
	struct conn *c = &conns[i];
	uint64_t id = (uint64_t)i;
	memcpy(pattern, &id, sizeof(id));
	ssize_t w = send(c->fd, pattern, (size_t)msg_size, MSG_NOSIGNAL);
	if (w != msg_size) /* an empty socket buffer takes a small message whole */
		bench_die("conns_load: send (connection %ld): %s", i,
		          w < 0 ? strerror(errno) : "short send");
	c->state = SENT;
	c->got = 0;
}

/* Raise RLIMIT_NOFILE to what the connections need (root may raise the hard limit up to
 * fs.nr_open); exits with the reason when it cannot. */
static void raise_nofile(long need)
{
	struct rlimit rl;
	getrlimit(RLIMIT_NOFILE, &rl);
	if (rl.rlim_cur >= (rlim_t)need)
		return;
	struct rlimit want = {(rlim_t)need,
	                      rl.rlim_max > (rlim_t)need ? rl.rlim_max : (rlim_t)need};
	if (setrlimit(RLIMIT_NOFILE, &want))
		bench_die(
		    "conns_load: %ld connections need RLIMIT_NOFILE >= %ld, the hard limit is "
		    "%llu and cannot be raised here (%s)",
		    nconns, need, (unsigned long long)rl.rlim_max, strerror(errno));
}

static void usage(void)
{
	fprintf(stderr, "usage: conns_load --port P --pid SERVER_PID --conns N [--size 64] "
	                "[--batch 256] [--window 1024] [--idle 1] [--per-source 10000] "
	                "[--time-limit 120] [--sock-diag 1]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	long batch = 256, window = 1024, per_source = 10000, limit = 120, use_diag = 1;
	double idle = 1;
	msg_size = 64;
	nconns = -1;
	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		const char *o = argv[i], *v = argv[++i];
		char *end;
		double x = strtod(v, &end);
		if (*end || x < 0)
			usage();
		if (!strcmp(o, "--port"))
			port = (int)x;
		else if (!strcmp(o, "--pid"))
			server_pid = (int)x;
		else if (!strcmp(o, "--conns"))
			nconns = (long)x;
		else if (!strcmp(o, "--size"))
			msg_size = (long)x;
		else if (!strcmp(o, "--batch"))
			batch = (long)x;
		else if (!strcmp(o, "--window"))
			window = (long)x;
		else if (!strcmp(o, "--idle"))
			idle = x;
		else if (!strcmp(o, "--per-source"))
			per_source = (long)x;
		else if (!strcmp(o, "--sock-diag")) /* 0: count the server's fds instead */
			use_diag = (long)x;
		else if (!strcmp(o, "--time-limit"))
			limit = (long)x;
		else
			usage();
	}
	if (port <= 0 || port > 65535 || server_pid <= 0 || nconns < 1 || nconns > 10000000 ||
	    msg_size < 8 || msg_size > 255 || batch < 1 || window < 1 || per_source < 1 ||
	    per_source > 30000 || limit < 1 || (nconns + per_source - 1) / per_source > 250)
		usage();
	signal(SIGALRM, on_alarm);
	alarm((unsigned)limit);
	signal(SIGPIPE, SIG_IGN);
	raise_nofile(nconns + 64);
	/* at least 4 source addresses, so even a small run goes through the spreading */
	nsrc = (nconns + per_source - 1) / per_source;
	nsrc = nsrc > 4 ? nsrc : nconns < 4 ? nconns : 4;
	for (size_t i = 8; i < sizeof(pattern); i++)
		pattern[i] = (unsigned char)('a' + i % 26);
	conns = calloc((size_t)nconns, sizeof(*conns));
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (!conns || ep < 0)
		bench_die("conns_load: out of memory or epoll_create1 failed");
	if (use_diag)
		diag_fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
	long q = accept_queue();
	if (q < 0) { /* no sock_diag here, or the listener is not seen: count fds instead */
		if (diag_fd >= 0)
			close(diag_fd);
		diag_fd = -1;
	}
	long qmax = 1024;
	FILE *f = fopen("/proc/sys/net/core/somaxconn", "r");
	long somax;
	if (f && fscanf(f, "%ld", &somax) == 1 && somax / 2 < qmax)
		qmax = somax / 2 > 1 ? somax / 2 : 1;
	if (f)
		fclose(f);

	/* before the first connection */
	server_settle();
	long rss0 = server_rss_kib(), fds0 = server_fds();

	/* the connect phase */
	static struct epoll_event evs[1024];
	long long cpu_c0 = server_cpu_ticks();
	int64_t t_c0 = bench_now_ns();
	long next = 0, established = 0;
	int64_t progress_at = t_c0;
	while (established < nconns) {
		q = diag_fd >= 0 && next < nconns ? accept_queue() : 0;
		while (next < nconns && next - established < batch && q < qmax)
			connect_one(ep, next++);
		int n = epoll_wait(ep, evs, 1024, 10);
		if (n < 0 && errno != EINTR)
			bench_die("conns_load: epoll_wait: %s", strerror(errno));
		int64_t now = bench_now_ns();
		for (int k = 0; k < n; k++) {
			int got = on_event(&evs[k]);
			established += got;
			if (got)
				progress_at = now;
		}
		if (now - progress_at > STALL_NS)
			bench_die(
			    "conns_load: no connection got established for %lld s (%ld of %ld "
			    "are; accept queue %ld)",
			    STALL_NS / 1000000000LL, established, nconns, accept_queue());
	}
	/* ... ends when the server has accepted every connection */
	for (long last = -1;;) {
		long left = diag_fd >= 0 ? accept_queue() : nconns - (server_fds() - fds0);
		if (left <= 0)
			break;
		int64_t now = bench_now_ns();
		if (left != last)
			progress_at = now;
		else if (now - progress_at > STALL_NS)
			bench_die(
			    "conns_load: the server accepted no connection for %lld s, %ld of %ld "
			    "are not accepted (out of fds?)",
			    STALL_NS / 1000000000LL, left, nconns);
		last = left;
		usleep(diag_fd >= 0 ? 200 : 2000);
	}
	int64_t t_c1 = bench_now_ns();
	long long cpu_c1 = server_cpu_ticks();

	/* idle: settle, then hold every connection idle and read the RSS */
	server_settle();
	long long cpu_i0 = server_cpu_ticks();
	int64_t t_i0 = bench_now_ns(), t_i1 = t_i0 + (int64_t)(idle * 1e9);
	for (int64_t now = t_i0; now < t_i1; now = bench_now_ns()) {
		int n = epoll_wait(ep, evs, 1024, (int)((t_i1 - now) / 1000000) + 1);
		for (int k = 0; k < n; k++)
			on_event(&evs[k]);
	}
	long long cpu_i1 = server_cpu_ticks();
	long rss1 = server_rss_kib();
	if (closed_idle)
		bench_die(
		    "conns_load: the server closed %ld of %ld connections while they were idle",
		    closed_idle, nconns);

	/* the echo round: every connection sends one message, at most `window` outstanding */
	long long cpu_e0 = server_cpu_ticks();
	int64_t t_e0 = bench_now_ns();
	progress_at = t_e0;
	long sent = 0, done = 0;
	while (done < nconns) {
		while (sent < nconns && sent - done < window)
			send_msg(sent++);
		int n = epoll_wait(ep, evs, 1024, 100);
		if (n < 0 && errno != EINTR)
			bench_die("conns_load: epoll_wait: %s", strerror(errno));
		int64_t now = bench_now_ns();
		for (int k = 0; k < n; k++) {
			int got = on_event(&evs[k]);
			done += got;
			if (got)
				progress_at = now;
		}
		if (closed_idle)
			bench_die("conns_load: the server closed %ld connection(s) during the echo "
			          "round",
			          closed_idle);
		if (now - progress_at > STALL_NS)
			bench_die("conns_load: %ld of %ld connections got no echo within %lld s",
			          sent - done, nconns, STALL_NS / 1000000000LL);
	}
	int64_t t_e1 = bench_now_ns();
	long long cpu_e1 = server_cpu_ticks();

	for (long i = 0; i < nconns; i++) /* an RST each (SO_LINGER 0) */
		close(conns[i].fd);

	double tick = 1.0 / (double)sysconf(_SC_CLK_TCK);
	double connect_s = (double)(t_c1 - t_c0) / 1e9, echo_s = (double)(t_e1 - t_e0) / 1e9;
	double echo_cpu = (double)(cpu_e1 - cpu_e0) * tick;
	double cpu_us = echo_cpu * 1e6 / (double)nconns;
	if (cpu_us <= 0) /* below the clock tick: report one tick rather than zero */
		cpu_us = tick * 1e6 / (double)nconns;
	double per_conn = (double)(rss1 - rss0) / (double)nconns;
	char params[300];
	snprintf(params, sizeof(params),
	         "\"conns\": %ld, \"size\": %ld, \"batch\": %ld, \"window\": %ld, \"idle_s\": %g, "
	         "\"sources\": %ld, \"accept_queue_by\": \"%s\"",
	         nconns, msg_size, batch, window, idle, nsrc,
	         diag_fd >= 0 ? "sock_diag" : "/proc/PID/fd");
	/* RSS can only fall if the server returned memory: report a floor rather than <= 0 */
	bench_begin(per_conn > 0.001 ? per_conn : 0.001, "KiB RSS/conn", "lower", params);
	printf("}, \"extra\": {\"conns\": %ld, \"rss0_kib\": %ld, \"rss_idle_kib\": %ld, "
	       "\"rss_kib_per_conn\": %.4g, \"connect_s\": %.4f, \"conn_s\": %.6g, "
	       "\"connect_cpu_s\": %.3f, \"cpu_us_per_conn\": %.4g, \"idle_cpu_s\": %.3f, "
	       "\"idle_wall_s\": %.3f, \"msgs\": %ld, \"wall_s\": %.4f, \"msg_s\": %.6g, "
	       "\"cpu_s\": %.3f, \"cpu_us_per_msg\": %.6g",
	       nconns, rss0, rss1, per_conn, connect_s, (double)nconns / connect_s,
	       (double)(cpu_c1 - cpu_c0) * tick, (double)(cpu_c1 - cpu_c0) * tick * 1e6 / nconns,
	       (double)(cpu_i1 - cpu_i0) * tick, (double)(t_i1 - t_i0) / 1e9, nconns, echo_s,
	       (double)nconns / echo_s, echo_cpu, cpu_us);
	bench_end();
	return 0;
}

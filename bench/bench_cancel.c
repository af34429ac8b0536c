/* SPDX-License-Identifier: MIT */
/*
 * cancel: n tasks (10^4), spread over the loops, each blocked in concur_await_recv() on its own
 * TCP connection over 127.0.0.1 that never gets data: a task per connection, as in a server. The
 * other ends are accepted and held open by a child process (forked before the executor exists),
 * so each process needs about n fds, not 2n. Once every task is parked in its recv, the main
 * thread (outside the executor) stops
 * them all; the time is from the first stop request to the return of one concur_wait() over
 * every future (CONCUR_ALL_COMPLETED). Unit: ns per task. Set-up and tear-down are not timed.
 *   cancel:   concur_cancel() on each task's future (-EINPROGRESS: the loop cancels the recv in
 *             the kernel; the task returns what its recv returned, -ECANCELED, and its future
 *             ends CANCELLED).
 *   shutdown: what a user does without cancellation: shutdown(fd, SHUT_RD) on each task's
 *             socket, so the recv returns 0 (EOF) and the task returns.
 *   stop_promise: the other do-it-yourself way, Go's select on ctx.Done(): each task starts its
 *             recv as a future and waits for it or for one shared stop promise
 *             (CONCUR_FIRST_COMPLETED); main sets the promise, and each task then cancels its
 *             recv future and waits for it (the buffer rule).
 * Every task's result is checked.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define VARIANTS "cancel|shutdown|stop_promise"

enum { V_CANCEL, V_SHUTDOWN, V_PROMISE };

struct slot {
	int fd;
	char buf[16];
};

static _Atomic long parked; /* tasks about to wait: the stop starts once all are */
static concur_future *stop; /* stop_promise: the shared stop signal */

static int64_t recv_task(void *arg)
{
	struct slot *s = arg;
	atomic_fetch_add(&parked, 1);
	return concur_await_recv(s->fd, s->buf, sizeof(s->buf), 0, CONCUR_NO_TIMEOUT);
}

static int64_t select_task(void *arg)
{
	struct slot *s = arg;
	concur_future *f[2] = {
	    concur_recv(concur_current_exec(), s->fd, s->buf, sizeof(s->buf), 0, CONCUR_NO_TIMEOUT),
	    stop};
	atomic_fetch_add(&parked, 1);
	concur_wait(f, 2, CONCUR_FIRST_COMPLETED, CONCUR_NO_TIMEOUT, NULL);
	concur_cancel(f[0]);
	int64_t r = concur_result(f[0], CONCUR_NO_TIMEOUT); /* after its last CQE */
	concur_release(f[0]);
	return r;
}

/* Room for n sockets: raise the soft limit (and the hard one when allowed). */
static void need_fds(long n)
{
	struct rlimit rl;
	rlim_t need = (rlim_t)(n + 256);
	if (getrlimit(RLIMIT_NOFILE, &rl) || rl.rlim_cur >= need)
		return;
	rl.rlim_cur = need;
	if (rl.rlim_max < need)
		rl.rlim_max = need;
	if (setrlimit(RLIMIT_NOFILE, &rl)) {
		char why[160];
		getrlimit(RLIMIT_NOFILE, &rl);
		snprintf(why, sizeof(why),
		         "needs %llu fds, RLIMIT_NOFILE is %llu (hard) and cannot be raised",
		         (unsigned long long)need, (unsigned long long)rl.rlim_max);
		bench_skip(why);
	}
}

/* The child: accept n connections and hold them until the parent closes the pipe. */
static __attribute__((noreturn)) void hold_peers(int lfd, long n, int pipe_rd)
{
	for (long i = 0; i < n; i++)
		if (accept4(lfd, NULL, NULL, SOCK_CLOEXEC) < 0)
			_exit(1);
	char c;
	while (read(pipe_rd, &c, 1) < 0 && errno == EINTR)
		;
	_exit(0);
}

/* Connect s[0..n) to a child that holds the other ends. Returns the child's pid; closing
 * *done_pipe tells it to exit. */
static pid_t connect_all(struct slot *s, long n, int *done_pipe)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	int pfd[2], lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, len) || listen(lfd, 4096) ||
	    getsockname(lfd, (struct sockaddr *)&a, &len) || pipe2(pfd, O_CLOEXEC))
		bench_die("listen on 127.0.0.1: %s", strerror(errno));
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		bench_die("fork: %s", strerror(errno));
	if (pid == 0) {
		close(pfd[1]);
		hold_peers(lfd, n, pfd[0]);
	}
	close(pfd[0]);
	for (long i = 0; i < n; i++) {
		s[i].fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (s[i].fd < 0 || connect(s[i].fd, (struct sockaddr *)&a, sizeof(a)))
			bench_die("connection %ld to 127.0.0.1: %s", i, strerror(errno));
	}
	close(lfd);
	*done_pipe = pfd[1];
	return pid;
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	int v = !strcmp(a.variant, "cancel")         ? V_CANCEL
	        : !strcmp(a.variant, "shutdown")     ? V_SHUTDOWN
	        : !strcmp(a.variant, "stop_promise") ? V_PROMISE
	                                             : -1;
	if (v < 0)
		bench_usage(argv[0], VARIANTS);
	long n = a.n ? a.n : 10000;
	need_fds(n);
	struct slot *s = calloc((size_t)n, sizeof(*s));
	concur_future **f = calloc((size_t)n, sizeof(*f));
	if (!s || !f)
		bench_die("calloc");
	int done_pipe;
	pid_t child = connect_all(s, n, &done_pipe);
	concur_exec *ex = bench_exec(a.loops, 0);
	if (v == V_PROMISE && !(stop = concur_promise_new(ex)))
		bench_die("concur_promise_new: out of memory");
	for (long i = 0; i < n; i++)
		f[i] = concur_spawn(ex, v == V_PROMISE ? select_task : recv_task, &s[i]);
	/* every task has started and reached its wait; then give the loops time to submit the
	 * recvs and go to sleep (not timed) */
	while (atomic_load(&parked) < n)
		concur_sleep(1000000);
	concur_sleep(50000000);
	for (long i = 0; i < n; i++)
		if (concur_done(f[i]))
			bench_die("task %ld ended before the stop: %s", i,
			          concur_strerror(concur_result(f[i], 0)));

	struct concur_stats before;
	concur_exec_stats(ex, &before);
	int64_t t0 = bench_now_ns();
	if (v == V_CANCEL) {
		for (long i = 0; i < n; i++) {
			int r = concur_cancel(f[i]);
			if (r != -EINPROGRESS)
				bench_die("concur_cancel %ld: %d, not -EINPROGRESS", i, r);
		}
	} else if (v == V_SHUTDOWN) {
		for (long i = 0; i < n; i++)
			shutdown(s[i].fd, SHUT_RD);
	} else {
		concur_promise_set(stop, 1);
	}
	int w = concur_wait(f, (size_t)n, CONCUR_ALL_COMPLETED, CONCUR_NO_TIMEOUT, NULL);
	int64_t ns = bench_now_ns() - t0;
	if (w != n)
		bench_die("concur_wait: %s", concur_strerror(w));

	int64_t expect = v == V_SHUTDOWN ? 0 : -ECANCELED;
	for (long i = 0; i < n; i++) {
		int64_t r = concur_result(f[i], 0);
		if (r != expect)
			bench_die("task %ld: %s, expected %s", i, concur_strerror(r),
			          concur_strerror(expect));
		if (v == V_CANCEL && !concur_cancelled(f[i]))
			bench_die("task %ld: not CANCELLED", i);
	}
	char params[96];
	snprintf(params, sizeof(params), "\"n\": %ld, \"loops\": %d", n, concur_exec_loops(ex));
	bench_begin((double)ns / (double)n, "ns/task", "lower", params);
	bench_stats_concur(ex, &before);
	bench_end();

	struct linger abort_close = {.l_onoff = 1, .l_linger = 0}; /* RST: no TIME_WAIT left */
	for (long i = 0; i < n; i++) {
		concur_release(f[i]);
		setsockopt(s[i].fd, SOL_SOCKET, SO_LINGER, &abort_close, sizeof(abort_close));
		close(s[i].fd);
	}
	concur_release(stop);
	concur_exec_free(ex);
	close(done_pipe); /* the child's read returns 0: it exits */
	waitpid(child, NULL, 0);
	free(f);
	free(s);
	return 0;
}

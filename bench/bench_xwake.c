/* SPDX-License-Identifier: MIT */
/*
 * xwake: a thread outside the executor that blocks on a future a loop completes.
 *   concur_spawn:   main (a foreign thread) spawns a task that returns at once and blocks in
 *                   concur_result(f, -1) until the loop completes it; n round trips.
 *   concur_promise: ping-pong through promises: main sets a promise a task (on the 1 loop) is
 *                   awaiting, the task sets one main is blocked on; n round trips.
 *   futex:          two threads ping-pong on a futex word (FUTEX_WAIT / FUTEX_WAKE, no spin):
 *                   the floor for "wake a sleeping thread and be woken back".
 * Unit: ns per round trip.
 */
#include "common.h"

#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/syscall.h>

#define VARIANTS "concur_spawn|concur_promise|futex"

static long iters;

static int64_t trivial(void *arg)
{
	return 1;
}

static void emit_concur(int64_t ns, concur_exec *ex, const struct concur_stats *before)
{
	char params[64];
	snprintf(params, sizeof(params), "\"n\": %ld, \"loops\": 1", iters);
	bench_begin((double)ns / (double)iters, "ns/rtt", "lower", params);
	bench_stats_concur(ex, before);
	bench_end();
}

static void run_spawn(void)
{
	concur_exec *ex = bench_exec(1, 0);
	struct concur_stats before;
	concur_exec_stats(ex, &before);
	int64_t t0 = bench_now_ns();
	for (long i = 0; i < iters; i++) {
		concur_future *f = concur_spawn(ex, trivial, NULL);
		int64_t r = concur_result(f, -1);
		concur_release(f);
		if (r < 0)
			bench_die("task: %s", concur_strerror(r));
	}
	emit_concur(bench_now_ns() - t0, ex, &before);
	concur_exec_free(ex);
}

/* The next round's promises, handed from main to the task (each with a reference for it). */
static concur_future *_Atomic next_req, *_Atomic next_resp;

static int64_t ponger(void *arg)
{
	concur_future *req = arg;
	while (req) {
		int64_t r = concur_result(req, -1);
		concur_release(req);
		if (r < 0)
			return r;
		req = atomic_load(&next_req);
		concur_future *resp = atomic_load(&next_resp);
		concur_promise_set(resp, 1);
		concur_release(resp);
	}
	return 0;
}

static void run_promise(void)
{
	concur_exec *ex = bench_exec(1, 0);
	struct concur_stats before;
	concur_exec_stats(ex, &before);
	concur_future *req = concur_promise_new(ex);
	if (!req)
		bench_die("concur_promise_new: out of memory");
	concur_future *task = concur_spawn(ex, ponger, concur_retain(req));
	int64_t t0 = bench_now_ns();
	for (long i = 0; i < iters; i++) {
		concur_future *nreq = i + 1 < iters ? concur_promise_new(ex) : NULL;
		concur_future *resp = concur_promise_new(ex);
		if ((i + 1 < iters && !nreq) || !resp)
			bench_die("concur_promise_new: out of memory");
		atomic_store(&next_req, nreq ? concur_retain(nreq) : NULL);
		atomic_store(&next_resp, concur_retain(resp));
		concur_promise_set(req, 1);
		concur_release(req);
		int64_t r = concur_result(resp, -1);
		concur_release(resp);
		if (r < 0)
			bench_die("resp: %s", concur_strerror(r));
		req = nreq;
	}
	int64_t t1 = bench_now_ns();
	int64_t r = concur_result(task, -1);
	concur_release(task);
	if (r < 0)
		bench_die("ponger: %s", concur_strerror(r));
	emit_concur(t1 - t0, ex, &before);
	concur_exec_free(ex);
}

static _Atomic uint32_t word;

static void fwait(uint32_t val)
{
	while (atomic_load(&word) == val)
		syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void fwake(uint32_t val)
{
	atomic_store(&word, val);
	syscall(SYS_futex, &word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void *futex_peer(void *arg)
{
	for (long i = 0; i < iters; i++) {
		fwait(0);
		fwake(0);
	}
	return NULL;
}

static void run_futex(void)
{
	pthread_t th;
	if (pthread_create(&th, NULL, futex_peer, NULL))
		bench_die("pthread_create failed");
	int64_t t0 = bench_now_ns();
	for (long i = 0; i < iters; i++) {
		fwake(1);
		fwait(1);
	}
	int64_t t1 = bench_now_ns();
	pthread_join(th, NULL);
	char params[32];
	snprintf(params, sizeof(params), "\"n\": %ld", iters);
	bench_begin((double)(t1 - t0) / (double)iters, "ns/rtt", "lower", params);
	bench_end();
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	iters = a.n ? a.n : 20000;
	if (!strcmp(a.variant, "concur_spawn"))
		run_spawn();
	else if (!strcmp(a.variant, "concur_promise"))
		run_promise();
	else if (!strcmp(a.variant, "futex"))
		run_futex();
	else
		bench_usage(argv[0], VARIANTS);
	return 0;
}

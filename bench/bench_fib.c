/* SPDX-License-Identifier: MIT */
/*
 * fib: recursive fib(n) (default 27) with nested waits: every call with n >= 2 spawns fib(n-1)
 * and fib(n-2) as tasks and waits for both with concur_result() (a fiber suspends, the loop
 * goes on); below 2 it returns n. Loops = -l (0 = CPUs). The peer is the same tree with OpenMP
 * tasks and taskwait (bench_omp --variant fib). Unit: ms per fib(n).
 */
#include "common.h"

#define VARIANTS "concur"

static concur_exec *ex;

static int64_t fib_task(void *arg)
{
	long n = (long)(intptr_t)arg;
	if (n < 2)
		return n;
	concur_future *a = concur_spawn(ex, fib_task, (void *)(intptr_t)(n - 1));
	concur_future *b = concur_spawn(ex, fib_task, (void *)(intptr_t)(n - 2));
	int64_t ra = concur_result(a, -1), rb = concur_result(b, -1);
	concur_release(a);
	concur_release(b);
	if (ra < 0)
		return ra;
	if (rb < 0)
		return rb;
	return ra + rb;
}

static int64_t fib_plain(long n)
{
	return n < 2 ? n : fib_plain(n - 1) + fib_plain(n - 2);
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	if (strcmp(a.variant, "concur"))
		bench_usage(argv[0], VARIANTS);
	long n = a.n ? a.n : 27;
	ex = bench_exec(a.loops, 64 * 1024);
	struct concur_stats before;
	concur_exec_stats(ex, &before);
	int64_t t0 = bench_now_ns();
	concur_future *f = concur_spawn(ex, fib_task, (void *)(intptr_t)n);
	int64_t r = concur_result(f, -1);
	int64_t t1 = bench_now_ns();
	concur_release(f);
	if (r < 0)
		bench_die("fib: %s", concur_strerror(r));
	if (r != fib_plain(n))
		bench_die("fib(%ld) = %lld: wrong", n, (long long)r);
	char params[64];
	snprintf(params, sizeof(params), "\"n\": %ld, \"loops\": %d", n, concur_exec_loops(ex));
	bench_begin((double)(t1 - t0) / 1e6, "ms", "lower", params);
	bench_stats_concur(ex, &before);
	bench_end();
	concur_exec_free(ex);
	return 0;
}

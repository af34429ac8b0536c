/* SPDX-License-Identifier: MIT */
/*
 * The OpenMP (libgomp) peers: tasks created with `#pragma omp task`, waited with `taskwait`,
 * on omp_get_max_threads() threads (OMP_NUM_THREADS, default: CPUs; -l overrides).
 *   spawn_one:  one thread creates a trivial task and waits for it (taskwait), n times.
 *   spawn_bulk: one thread creates n trivial tasks, then one taskwait.  Unit: ns/task.
 *   fib:        fib(n) (default 27), each call with n >= 2 creating two tasks and a taskwait,
 *               the same cut-off as concur's fib.  Unit: ms per fib(n).
 */
#include "common.h"

#include <omp.h>

#define VARIANTS "spawn_one|spawn_bulk|fib"

static __attribute__((noinline)) int64_t trivial(long i)
{
	return i & 1;
}

static int64_t fib(int n)
{
	if (n < 2)
		return n;
	int64_t a, b;
#pragma omp task shared(a)
	a = fib(n - 1);
#pragma omp task shared(b)
	b = fib(n - 2);
#pragma omp taskwait
	return a + b;
}

static int64_t fib_plain(int n)
{
	return n < 2 ? n : fib_plain(n - 1) + fib_plain(n - 2);
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	if (a.loops)
		omp_set_num_threads((int)a.loops);
	int threads = omp_get_max_threads();
	const char *v = a.variant;
	char params[128];
	if (!strcmp(v, "fib")) {
		int n = a.n ? (int)a.n : 27;
		int64_t r = 0, t0 = bench_now_ns();
#pragma omp parallel
#pragma omp single
		r = fib(n);
		int64_t t1 = bench_now_ns();
		if (r != fib_plain(n))
			bench_die("fib(%d) = %lld: wrong", n, (long long)r);
		snprintf(params, sizeof(params), "\"n\": %d, \"threads\": %d", n, threads);
		bench_begin((double)(t1 - t0) / 1e6, "ms", "lower", params);
		bench_end();
		return 0;
	}
	int one = !strcmp(v, "spawn_one");
	if (!one && strcmp(v, "spawn_bulk"))
		bench_usage(argv[0], VARIANTS);
	long n = a.n ? a.n : (one ? 200000 : 1000000);
	int64_t t0 = bench_now_ns();
#pragma omp parallel
#pragma omp single
	{
		for (long i = 0; i < n; i++) {
#pragma omp task
			bench_sink(trivial(i));
			if (one) {
#pragma omp taskwait
			}
		}
#pragma omp taskwait
	}
	int64_t t1 = bench_now_ns();
	snprintf(params, sizeof(params), "\"n\": %ld, \"threads\": %d", n, threads);
	bench_begin((double)(t1 - t0) / (double)n, "ns/task", "lower", params);
	bench_end();
	return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * Shared by the benchmark binaries: argument parsing, a monotonic clock, and the one JSON line
 * each invocation prints on stdout:
 *   {"value": <float>, "unit": "ns/op", "better": "lower", "params": {...}, "stats": {...}}
 * or, when the variant cannot run here, {"skip": "<reason>"} (exit status 0).
 * Errors go to stderr with a non-zero exit status.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifdef BENCH_WITH_CONCUR
#include "concur.h"
#endif

/* Command line of every bench binary: --variant NAME [-n ITERATIONS] [-l LOOPS] [-b BATCH]. */
struct bench_args {
	const char *variant;
	long n;     /* iterations (meaning depends on the workload); 0 = the binary's default */
	long loops; /* concur loops / threads; 0 = online CPUs */
	long batch; /* tasks or batch size, where the workload has one */
};

static inline void bench_usage(const char *prog, const char *variants)
{
	fprintf(stderr, "usage: %s --variant {%s} [-n N] [-l LOOPS] [-b BATCH]\n", prog, variants);
	exit(2);
}

static inline long bench_num(const char *s, const char *prog, const char *variants)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end); /* accepts 1e6 */
	if (errno || *end || v < 0)
		bench_usage(prog, variants);
	return (long)v;
}

static inline struct bench_args bench_parse(int argc, char **argv, const char *variants)
{
	struct bench_args a = {0};
	for (int i = 1; i < argc; i++) {
		const char *o = argv[i];
		if (i + 1 >= argc)
			bench_usage(argv[0], variants);
		const char *v = argv[++i];
		if (!strcmp(o, "--variant"))
			a.variant = v;
		else if (!strcmp(o, "-n"))
			a.n = bench_num(v, argv[0], variants);
		else if (!strcmp(o, "-l"))
			a.loops = bench_num(v, argv[0], variants);
		else if (!strcmp(o, "-b"))
			a.batch = bench_num(v, argv[0], variants);
		else
			bench_usage(argv[0], variants);
	}
	if (!a.variant)
		bench_usage(argv[0], variants);
	return a;
}

/* The CPUs this process may run on (taskset, a cpuset), as concur counts them for its default
 * number of loops: a peer's threads match concur's loops. */
static inline long bench_cpus(void)
{
	unsigned long mask[1024 / (8 * sizeof(unsigned long))];
	long got = syscall(SYS_sched_getaffinity, 0, sizeof(mask), mask), n = 0;
	for (long i = 0; got > 0 && i < got / (long)sizeof(mask[0]); i++)
		n += __builtin_popcountl(mask[i]);
	if (n <= 0)
		n = sysconf(_SC_NPROCESSORS_ONLN);
	return n > 0 ? n : 1;
}

static inline int64_t bench_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Keeps a value alive without letting the compiler drop the work that made it. */
static inline void bench_sink(int64_t v)
{
	__asm__ volatile("" : : "r"(v) : "memory");
}

static inline __attribute__((noreturn)) void bench_die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static inline void bench_skip(const char *reason)
{
	printf("{\"skip\": \"%s\"}\n", reason);
	exit(0);
}

/*
 * Prints the start of the JSON line; params is a JSON object body (may be ""). The caller then
 * optionally calls bench_stats_concur() or bench_stats_raw() and finally bench_end().
 */
static inline void bench_begin(double value, const char *unit, const char *better,
                               const char *params)
{
	printf("{\"value\": %.6g, \"unit\": \"%s\", \"better\": \"%s\", \"params\": {%s}, "
	       "\"stats\": {",
	       value, unit, better, params);
}

static inline void bench_end(void)
{
	printf("}}\n");
	fflush(stdout);
}

#ifdef BENCH_WITH_CONCUR
/* Every concur variant reports the executor's counters (a delta since `before` if non-NULL). */
static inline void bench_stats_concur(const concur_exec *ex, const struct concur_stats *before)
{
	struct concur_stats s, z = {0};
	int rc = concur_exec_stats(ex, &s);
	if (rc < 0) {
		printf("\"error\": \"%s\"", concur_strerror(rc));
		return;
	}
	if (!before)
		before = &z;
#define F(name) (unsigned long long)(s.name - before->name)
	printf("\"tasks_spawned\": %llu, \"tasks_run\": %llu, \"fibers_parked\": %llu, "
	       "\"cqes\": %llu, \"enters\": %llu, \"sleeps\": %llu, \"cqes_per_enter\": %.3g, "
	       "\"msg_ring\": %llu, \"doorbells\": %llu, \"inbox_items\": %llu, \"steals\": %llu, "
	       "\"futex_wakes\": %llu, \"futex_ring_wakes\": %llu, \"stacks_mapped\": %llu, "
	       "\"loops\": %d, \"ring_flags\": %u",
	       F(tasks_spawned), F(tasks_run), F(fibers_parked), F(cqes), F(enters), F(sleeps),
	       F(enters) ? (double)F(cqes) / (double)F(enters) : 0.0, F(msg_ring), F(doorbells),
	       F(inbox_items), F(steals), F(futex_wakes), F(futex_ring_wakes), F(stacks_mapped),
	       concur_exec_loops(ex), concur_exec_ring_flags(ex));
#undef F
}

/* An executor with the given loops (0 = CPUs) and stack size (0 = default), or die. */
static inline concur_exec *bench_exec(long loops, size_t stack_size)
{
	struct concur_exec_opts o = {.loops = (unsigned)loops, .stack_size = stack_size};
	concur_exec *ex = NULL;
	int rc = concur_exec_new(&ex, &o);
	if (rc < 0)
		bench_die("concur_exec_new: %s (%s)", concur_strerror(rc), concur_last_error());
	return ex;
}
#endif

#endif /* BENCH_COMMON_H */

/* SPDX-License-Identifier: MIT */
/*
 * Shared by the composition benchmarks (bench_channel, bench_gather, bench_pipeline):
 * the command line `--variant NAME [--quick] [-n N]` and the one JSON line they print:
 *   {"value": <float>, "unit": "ns/op", "better": "lower", "params": {...}, "stats": {...}}
 * with the executor's counters over the timed part for a concur variant (common.h).
 */
#ifndef COMP_BENCH_H
#define COMP_BENCH_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "concur.h"

struct comp_args {
	const char *variant;
	int quick;
	long n; /* 0: the binary's default (smaller with --quick) */
};

static inline struct comp_args comp_parse(int argc, char **argv, const char *variants)
{
	struct comp_args a = {0};
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--quick"))
			a.quick = 1;
		else if (!strcmp(argv[i], "--variant") && i + 1 < argc)
			a.variant = argv[++i];
		else if (!strcmp(argv[i], "-n") && i + 1 < argc)
			a.n = (long)strtod(argv[++i], NULL);
		else
			a.variant = NULL, i = argc;
	}
	if (!a.variant || !strstr(variants, a.variant)) {
		fprintf(stderr, "usage: %s --variant {%s} [--quick] [-n N]\n", argv[0], variants);
		exit(2);
	}
	return a;
}

static inline int64_t comp_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline __attribute__((noreturn)) void comp_die(const char *what, int64_t err)
{
	fprintf(stderr, "%s: %s\n", what, concur_strerror(err));
	exit(1);
}

static inline concur_exec *comp_exec(unsigned loops)
{
	struct concur_exec_opts o = {.loops = loops};
	concur_exec *ex;
	int rc = concur_exec_new(&ex, &o);
	if (rc < 0)
		comp_die("concur_exec_new", rc);
	return ex;
}

/* The executor's counters now, to pass to comp_emit() as the start of the timed part. */
static inline struct concur_stats comp_stats(const concur_exec *ex)
{
	struct concur_stats s = {0};
	concur_exec_stats(ex, &s);
	return s;
}

/* The one line: ns per op over n ops; with ex (still alive), its counters since `before`. */
static inline void comp_emit(int64_t ns, long n, const char *variant, int loops,
                             const concur_exec *ex, const struct concur_stats *before)
{
	char params[160];
	snprintf(params, sizeof(params), "\"variant\": \"%s\", \"n\": %ld, \"loops\": %d", variant,
	         n, loops);
	bench_begin((double)ns / (double)n, "ns/op", "lower", params);
	if (ex)
		bench_stats_concur(ex, before);
	bench_end();
}

#endif /* COMP_BENCH_H */

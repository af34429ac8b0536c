/* SPDX-License-Identifier: MIT */
/*
 * tasks: the memory of a suspended task, at a million of them.
 *   concur: n tasks (concur_spawn_ex from main, stack size -b bytes, 0 = the executor's default
 *           256 KiB) each await their own promise; once all are parked, main sets every
 *           promise (promise i gets i), joins, and checks every result.
 * The peers are bench/peers/tasks.go (goroutines blocked on a channel each) and
 * bench/peers/tasks_boost.cpp (Boost.Fiber), printing the same JSON.
 *
 * Value: peak RSS per suspended task in KiB, (VmHWM at park - VmRSS before) / n: everything the
 * tasks hold (record, stack, promise, the array of futures), as Go's figure holds its channel.
 * Params: park_ms (first spawn to the last task suspended), wake_ms (first set to join
 * returning), pte_kb (page tables at park, not in RSS), rss_after_kb (RSS above the start once
 * joined: memory that did not fall back; rss_after_trim_kb the same after malloc_trim), maps
 * (mappings at park). extra: park_ms and wake_ms again, for the table.
 */
#include "common.h"

#include <malloc.h>
#include <stdatomic.h>

#define VARIANTS "concur"

static long status_kb(const char *field)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long v = -1;
	size_t n = strlen(field);
	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, field, n) && line[n] == ':')
			v = strtol(line + n + 1, NULL, 10);
	if (f)
		fclose(f);
	return v;
}

static long count_maps(void)
{
	FILE *f = fopen("/proc/self/maps", "r");
	long n = 0;
	int c;
	while (f && (c = fgetc(f)) != EOF)
		n += c == '\n';
	if (f)
		fclose(f);
	return n;
}

static int64_t park(void *arg)
{
	return concur_result(arg, -1);
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	if (strcmp(a.variant, "concur"))
		bench_usage(argv[0], VARIANTS);
	long n = a.n ? a.n : 1000000;
	concur_exec *ex = bench_exec(a.loops, 0);
	concur_future **p = calloc((size_t)n, sizeof(*p));
	concur_future **f = calloc((size_t)n, sizeof(*f));
	if (!p || !f)
		bench_die("out of memory");
	struct concur_stats before, parked;
	concur_exec_stats(ex, &before);
	long base_kb = status_kb("VmRSS");
	struct concur_spawn_opts o = {.stack_size = (size_t)a.batch};

	int64_t t0 = bench_now_ns();
	for (long i = 0; i < n; i++) {
		p[i] = concur_promise_new(ex);
		if (!p[i])
			bench_die("concur_promise_new: out of memory at %ld", i);
		f[i] = concur_spawn_ex(ex, park, p[i], &o);
	}
	uint64_t seen = 0;
	int64_t progress = bench_now_ns();
	for (;;) { /* every task has suspended once: on its promise */
		concur_exec_stats(ex, &parked);
		uint64_t now_parked = parked.fibers_parked - before.fibers_parked;
		if (now_parked >= (uint64_t)n)
			break;
		if (now_parked != seen) {
			seen = now_parked;
			progress = bench_now_ns();
		} else if (bench_now_ns() - progress > 2000000000) { /* stuck: say why */
			for (long i = 0; i < n; i++)
				if (concur_done(f[i]))
					bench_die("task %ld ended before its promise was set: %s",
					          i, concur_strerror((int)concur_result(f[i], 0)));
			bench_die("only %llu of %ld tasks parked", (unsigned long long)seen, n);
		}
		struct timespec ts = {0, 200000};
		nanosleep(&ts, NULL);
	}
	int64_t t1 = bench_now_ns();
	long hwm_kb = status_kb("VmHWM"), pte_kb = status_kb("VmPTE"), maps = count_maps();

	for (long i = 0; i < n; i++)
		concur_promise_set(p[i], i);
	if (concur_exec_join(ex, -1))
		bench_die("join failed");
	int64_t t2 = bench_now_ns();
	for (long i = 0; i < n; i++) {
		int64_t r = concur_result(f[i], 0);
		if (r != i)
			bench_die("task %ld returned %lld", i, (long long)r);
		concur_release(f[i]);
		concur_release(p[i]);
	}
	free(f);
	free(p);
	long after_kb = status_kb("VmRSS") - base_kb;
	malloc_trim(0); /* what glibc keeps of the freed records is not the stacks' doing */
	long after_trim_kb = status_kb("VmRSS") - base_kb;

	char params[320];
	snprintf(params, sizeof(params),
	         "\"n\": %ld, \"loops\": %d, \"stack_size\": %ld, \"park_ms\": %.1f, "
	         "\"wake_ms\": %.1f, \"pte_kb\": %ld, \"rss_after_kb\": %ld, "
	         "\"rss_after_trim_kb\": %ld, \"maps\": %ld, \"stack_guard\": %llu",
	         n, concur_exec_loops(ex), a.batch, (double)(t1 - t0) / 1e6,
	         (double)(t2 - t1) / 1e6, pte_kb, after_kb, after_trim_kb, maps,
	         (unsigned long long)parked.stack_guard);
	bench_begin((double)(hwm_kb - base_kb) / (double)n, "KiB/task", "lower", params);
	bench_stats_concur(ex, &before);
	printf("}, \"extra\": {\"park_ms\": %.1f, \"wake_ms\": %.1f}}\n", (double)(t1 - t0) / 1e6,
	       (double)(t2 - t1) / 1e6);
	fflush(stdout);
	concur_exec_free(ex);
	return 0;
}

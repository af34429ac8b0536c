/* SPDX-License-Identifier: MIT */
/*
 * The libuv peer: uv_queue_work(), libuv's way to run a CPU task off the loop (a mutex +
 * condvar work queue feeding UV_THREADPOOL_SIZE threads, set to -l, default CPUs; the
 * completion comes back to the loop thread through an async handle).
 *   spawn_one:  queue one trivial work item, run the loop until its after-work callback, n times.
 *   spawn_bulk: queue n trivial work items, then run the loop until all are done.
 * Unit: ns per task.
 */
#include "common.h"

#include <uv.h>

#define VARIANTS "spawn_one|spawn_bulk"

static long done;
static int64_t sum;

static void work_cb(uv_work_t *w)
{
	w->data = (void *)(intptr_t)((intptr_t)w->data & 1);
}

static void after_cb(uv_work_t *w, int status)
{
	if (status < 0)
		bench_die("uv_queue_work: %s", uv_strerror(status));
	sum += (intptr_t)w->data;
	done++;
	free(w);
}

static void queue(uv_loop_t *loop, long i)
{
	uv_work_t *w = malloc(sizeof(*w));
	if (!w)
		bench_die("out of memory");
	w->data = (void *)(intptr_t)i;
	int rc = uv_queue_work(loop, w, work_cb, after_cb);
	if (rc < 0)
		bench_die("uv_queue_work: %s", uv_strerror(rc));
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	int one = !strcmp(a.variant, "spawn_one");
	if (!one && strcmp(a.variant, "spawn_bulk"))
		bench_usage(argv[0], VARIANTS);
	long threads = a.loops ? a.loops : bench_cpus();
	char env[32];
	snprintf(env, sizeof(env), "%ld", threads);
	setenv("UV_THREADPOOL_SIZE", env, 1); /* read when the pool first starts */
	long n = a.n ? a.n : (one ? 200000 : 1000000);
	uv_loop_t *loop = uv_default_loop();
	queue(loop, 0); /* start the pool's threads outside the timed part */
	uv_run(loop, UV_RUN_DEFAULT);
	done = 0;
	int64_t t0 = bench_now_ns();
	if (one) {
		for (long i = 0; i < n; i++) {
			queue(loop, i);
			uv_run(loop, UV_RUN_DEFAULT);
		}
	} else {
		for (long i = 0; i < n; i++)
			queue(loop, i);
		uv_run(loop, UV_RUN_DEFAULT);
	}
	int64_t t1 = bench_now_ns();
	if (done != n)
		bench_die("%ld of %ld work items done", done, n);
	bench_sink(sum);
	uv_loop_close(loop);
	char params[96];
	snprintf(params, sizeof(params), "\"n\": %ld, \"threads\": %ld, \"libuv\": \"%s\"", n,
	         threads, uv_version_string());
	bench_begin((double)(t1 - t0) / (double)n, "ns/task", "lower", params);
	bench_end();
	return 0;
}

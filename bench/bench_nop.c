/* SPDX-License-Identifier: MIT */
/*
 * await_nop: the cost of one io_uring round trip as a task sees it.
 *   concur:        -b tasks on a 1-loop executor, each awaiting IORING_OP_NOP in a loop
 *                  (concur_await_nop(), the in-task direct form), n NOPs in all.
 *   concur_future: the same with the heap-future form, concur_result(concur_nop(ex), -1).
 *   concur_deadline: as concur, each task inside a deadline scope (concur_deadline_push of a
 *                  minute) that never fires: what a deadline costs while it does not fire.
 *   concur_op_deadline: as concur, each NOP with its own deadline (timeout_ns of a minute is
 *                  not available for NOP: a deadline scope pushed and popped around each one,
 *                  as a server does per request).
 *   raw:           one thread, one ring (same setup flags as concur's loops, where the kernel
 *                  takes them): queue -b NOP SQEs, io_uring_submit_and_wait for -b CQEs, reap,
 *                  repeat; n NOPs in all. The floor for a batch of that size.
 * Unit: ns per NOP.
 */
#include "common.h"

#include <liburing.h>

#define VARIANTS "concur|concur_future|concur_deadline|concur_op_deadline|raw"

static long iters, batch;

#ifdef CONCUR_HAVE_NOP
static concur_exec *ex;

static int64_t nop_task(void *arg)
{
	long n = (long)(intptr_t)arg;
	for (long i = 0; i < n; i++) {
		int64_t r = concur_await_nop();
		if (r < 0)
			return r;
	}
	return 0;
}

static int64_t nop_deadline_task(void *arg)
{
	if (concur_deadline_push(60ll * 1000000000) < 0)
		return -1;
	int64_t r = nop_task(arg);
	concur_deadline_pop();
	return r;
}

static int64_t nop_op_deadline_task(void *arg)
{
	long n = (long)(intptr_t)arg;
	for (long i = 0; i < n; i++) {
		if (concur_deadline_push(60ll * 1000000000) < 0)
			return -1;
		int64_t r = concur_await_nop();
		concur_deadline_pop();
		if (r < 0)
			return r;
	}
	return 0;
}

static int64_t nop_future_task(void *arg)
{
	long n = (long)(intptr_t)arg;
	for (long i = 0; i < n; i++) {
		concur_future *f = concur_nop(ex);
		int64_t r = concur_result(f, -1);
		concur_release(f);
		if (r < 0)
			return r;
	}
	return 0;
}

static void run_concur(concur_task_fn fn)
{
	ex = bench_exec(1, 0);
	struct concur_stats before;
	concur_exec_stats(ex, &before);
	long per = iters / batch;
	concur_future **fs = calloc((size_t)batch, sizeof(*fs));
	int64_t t0 = bench_now_ns();
	for (long i = 0; i < batch; i++)
		fs[i] = concur_spawn(ex, fn, (void *)(intptr_t)per);
	for (long i = 0; i < batch; i++) {
		int64_t r = concur_result(fs[i], -1);
		if (r < 0)
			bench_die("nop task: %s", concur_strerror(r));
		concur_release(fs[i]);
	}
	int64_t t1 = bench_now_ns();
	free(fs);
	char params[96];
	snprintf(params, sizeof(params), "\"n\": %ld, \"tasks\": %ld, \"loops\": 1", per * batch,
	         batch);
	bench_begin((double)(t1 - t0) / (double)(per * batch), "ns/op", "lower", params);
	bench_stats_concur(ex, &before);
	bench_end();
	concur_exec_free(ex);
}
#endif

static void run_raw(void)
{
	struct io_uring ring;
	static const unsigned tries[] = {
	    IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
	    IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	    0,
	};
	unsigned entries = batch < 8 ? 8 : (unsigned)batch, flags = 0;
	int rc = -EINVAL;
	for (size_t i = 0; i < sizeof(tries) / sizeof(tries[0]); i++) {
		struct io_uring_params p = {.flags = tries[i]};
		rc = io_uring_queue_init_params(entries, &ring, &p);
		if (rc == 0) {
			flags = tries[i];
			break;
		}
	}
	if (rc < 0)
		bench_die("io_uring_queue_init: %s", strerror(-rc));
	long rounds = iters / batch, cqes = 0, enters = 0;
	int64_t t0 = bench_now_ns();
	for (long r = 0; r < rounds; r++) {
		for (long j = 0; j < batch; j++)
			io_uring_prep_nop(io_uring_get_sqe(&ring));
		rc = io_uring_submit_and_wait(&ring, (unsigned)batch);
		enters++;
		if (rc < 0)
			bench_die("io_uring_submit_and_wait: %s", strerror(-rc));
		long got = 0;
		while (got < batch) {
			struct io_uring_cqe *cqe;
			unsigned head, seen = 0;
			io_uring_for_each_cqe(&ring, head, cqe)
			{
				if (cqe->res < 0)
					bench_die("nop: %s", strerror(-cqe->res));
				seen++;
			}
			io_uring_cq_advance(&ring, seen);
			got += seen;
			if (got < batch) {
				rc = io_uring_wait_cqe(&ring, &cqe);
				enters++;
				if (rc < 0)
					bench_die("io_uring_wait_cqe: %s", strerror(-rc));
			}
		}
		cqes += got;
	}
	int64_t t1 = bench_now_ns();
	io_uring_queue_exit(&ring);
	char params[96];
	snprintf(params, sizeof(params), "\"n\": %ld, \"batch\": %ld", rounds * batch, batch);
	bench_begin((double)(t1 - t0) / (double)(rounds * batch), "ns/op", "lower", params);
	printf("\"cqes\": %ld, \"enters\": %ld, \"cqes_per_enter\": %.3g, \"ring_flags\": %u", cqes,
	       enters, (double)cqes / (double)enters, flags);
	bench_end();
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	batch = a.batch ? a.batch : 1;
	iters = a.n ? a.n : 1000000;
	if (iters < batch)
		iters = batch;
	if (!strcmp(a.variant, "raw")) {
		run_raw();
	} else if (!strncmp(a.variant, "concur", 6)) {
#ifdef CONCUR_HAVE_NOP
		static const struct {
			const char *name;
			concur_task_fn fn;
		} kinds[] = {{"concur", nop_task},
		             {"concur_future", nop_future_task},
		             {"concur_deadline", nop_deadline_task},
		             {"concur_op_deadline", nop_op_deadline_task}};
		for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
			if (!strcmp(a.variant, kinds[i].name)) {
				run_concur(kinds[i].fn);
				return 0;
			}
		bench_usage(argv[0], VARIANTS);
#else
		bench_skip("concur_await_nop not available");
#endif
	} else {
		bench_usage(argv[0], VARIANTS);
	}
	return 0;
}

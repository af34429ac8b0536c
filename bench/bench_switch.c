/* SPDX-License-Identifier: MIT */
/*
 * switch: the cost of one context switch.
 *   concur:     two tasks on a 1-loop executor, both started, each calling concur_yield() n times;
 *               value = elapsed / (2n) (everything a yield costs: park, run queue, resume).
 *   asm:        two bare contexts switching to each other with bare_switch (the floor).
 *   ucontext:   the same with swapcontext (what a naive C coroutine library does).
 */
#include "bare_ctx.h"
#include "common.h"

#include <sched.h>
#include <stdatomic.h>
#include <ucontext.h>

#define VARIANTS "concur|asm|ucontext"

static long iters;
static _Atomic int started;

/* Both yielders wait at a gate first: a yield lets *ready* fibers run, and a task that has not
 * started yet is not one, so without the gate the first task would yield to itself n times
 * before the second even started. Released together, they are both ready and ping-pong. */
static int64_t yielder(void *arg)
{
	concur_future *gate = arg;
	atomic_fetch_add(&started, 1);
	int64_t r = concur_result(gate, -1);
	if (r < 0)
		return r;
	for (long i = 0; i < iters; i++)
		concur_yield();
	return 0;
}

static void run_concur(void)
{
	concur_exec *ex = bench_exec(1, 0);
	struct concur_stats before;
	concur_exec_stats(ex, &before);
	concur_future *gate = concur_promise_new(ex);
	if (!gate)
		bench_die("concur_promise_new: out of memory");
	concur_future *a = concur_spawn(ex, yielder, gate);
	concur_future *b = concur_spawn(ex, yielder, gate);
	while (atomic_load(&started) < 2)
		sched_yield();
	int64_t t0 = bench_now_ns();
	concur_promise_set(gate, 1);
	int64_t ra = concur_result(a, -1), rb = concur_result(b, -1);
	int64_t t1 = bench_now_ns();
	if (ra < 0 || rb < 0)
		bench_die("yielder failed: %s", concur_strerror(ra < 0 ? ra : rb));
	concur_release(a);
	concur_release(b);
	concur_release(gate);
	bench_begin((double)(t1 - t0) / (2.0 * (double)iters), "ns/switch", "lower",
	            "\"loops\": 1");
	bench_stats_concur(ex, &before);
	bench_end();
	concur_exec_free(ex);
}

static struct bare_ctx main_ctx, co_ctx;

static void co_body(void *arg)
{
	for (;;)
		bare_switch(&co_ctx, &main_ctx);
}

static void run_asm(void)
{
	struct bare_stack_pool pool;
	bare_pool_init(&pool, 64 * 1024);
	void *stack = bare_pool_get(&pool);
	bare_ctx_make(&co_ctx, stack, pool.size, co_body, NULL);
	bare_switch(&main_ctx, &co_ctx); /* warm */
	int64_t t0 = bench_now_ns();
	for (long i = 0; i < iters; i++)
		bare_switch(&main_ctx, &co_ctx);
	int64_t t1 = bench_now_ns();
	bench_begin((double)(t1 - t0) / (2.0 * (double)iters), "ns/switch", "lower",
	            "\"impl\": \"" BARE_CTX_IMPL "\"");
	bench_end();
	bare_pool_put(&pool, stack);
	bare_pool_destroy(&pool);
}

static ucontext_t uc_main, uc_co;

static void uc_body(void)
{
	for (;;)
		swapcontext(&uc_co, &uc_main);
}

static void run_ucontext(void)
{
	static char stack[64 * 1024] __attribute__((aligned(16)));
	getcontext(&uc_co);
	uc_co.uc_stack.ss_sp = stack;
	uc_co.uc_stack.ss_size = sizeof(stack);
	uc_co.uc_link = NULL;
	makecontext(&uc_co, uc_body, 0);
	swapcontext(&uc_main, &uc_co);
	int64_t t0 = bench_now_ns();
	for (long i = 0; i < iters; i++)
		swapcontext(&uc_main, &uc_co);
	int64_t t1 = bench_now_ns();
	bench_begin((double)(t1 - t0) / (2.0 * (double)iters), "ns/switch", "lower", "");
	bench_end();
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	iters = a.n ? a.n : 1000000;
	if (!strcmp(a.variant, "concur"))
		run_concur();
	else if (!strcmp(a.variant, "asm"))
		run_asm();
	else if (!strcmp(a.variant, "ucontext"))
		run_ucontext();
	else
		bench_usage(argv[0], VARIANTS);
	return 0;
}

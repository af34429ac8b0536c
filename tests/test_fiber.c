/* SPDX-License-Identifier: MIT */
/* Fibers: stacks only while running, the guard page, yield order, deep recursion, sleep. */
#include "helpers.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <unistd.h>

static concur_exec *ex;

static int64_t trivial(void *arg)
{
	return 0;
}

static int64_t spawn_many(void *arg)
{
	intptr_t n = (intptr_t)arg;
	for (intptr_t i = 0; i < n; i++)
		concur_release(concur_spawn(ex, trivial, NULL));
	return 0;
}

/* 10^6 queued tasks cost small records, not stacks: peak RSS stays under 512 MB, and only a
 * handful of stacks are ever mapped (each task takes one when it runs and gives it back). */
static void test_stacks_only_while_running(void **state)
{
	const intptr_t n = BULK(1000000);
	ex = new_exec(1);
	concur_release(concur_spawn(ex, spawn_many, (void *)n));
	assert_int_equal(concur_exec_join(ex, -1), 0);
	struct concur_stats st;
	concur_exec_stats(ex, &st);
	assert_int_equal(st.tasks_run, (uint64_t)n + 1);
	assert_true(st.stacks_mapped <= 4);
	long hwm_kb = proc_status_kb("VmHWM");
	assert_true(hwm_kb > 0);
	if (!SANITIZED) /* sanitizers add their own shadow memory and quarantine */
		assert_true(hwm_kb < 512 * 1024);
	concur_exec_free(ex);
}

/* Yield lets the other tasks of the loop run: two tasks interleave strictly. */
static char trace[64];
static atomic_int trace_len;
static int64_t yielder(void *arg)
{
	for (int i = 0; i < 5; i++) {
		trace[atomic_fetch_add(&trace_len, 1)] = (char)(intptr_t)arg;
		concur_yield();
	}
	return 0;
}

/* spawns both before either runs, so the order does not depend on another thread */
static int64_t spawn_two_yielders(void *arg)
{
	concur_future *a = concur_spawn(ex, yielder, (void *)'a');
	concur_future *b = concur_spawn(ex, yielder, (void *)'b');
	int64_t r = concur_result(a, -1) | concur_result(b, -1);
	concur_release(a);
	concur_release(b);
	return r;
}

static void test_yield_interleaves(void **state)
{
	ex = new_exec(1);
	atomic_store(&trace_len, 0);
	memset(trace, 0, sizeof(trace));
	concur_future *f = concur_spawn(ex, spawn_two_yielders, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	assert_int_equal(atomic_load(&trace_len), 10);
	for (int i = 1; i < 10; i++) /* strictly alternating */
		assert_true(trace[i] != trace[i - 1]);
	concur_yield(); /* outside a task: returns at once */
	assert_false(concur_in_task());
	concur_release(f);
	concur_exec_free(ex);
}

/* Deep recursion inside a fiber uses its whole stack without touching a neighbour. */
static int64_t recurse(int depth)
{
	volatile char pad[512];
	pad[0] = (char)depth;
	if (depth == 0)
		return pad[0];
	return recurse(depth - 1) + 1 + pad[0] - (char)depth;
}
static int64_t deep(void *arg)
{
	return recurse((int)(intptr_t)arg);
}

static void test_deep_stack(void **state)
{
	struct concur_exec_opts o = {.loops = 1, .stack_size = 1 << 20};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	concur_future *f = concur_spawn(ex, deep, (void *)1000); /* ~600 KiB of frames */
	assert_int_equal(concur_result(f, -1), 1000);
	concur_release(f);
	concur_exec_free(ex);
}

/* An overflow hits the guard page and faults: it never corrupts a neighbour. */
static int64_t overflow(void *arg)
{
	return recurse(1 << 20);
}

static void test_guard_page(void **state)
{
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		/* the child overflows a 64 KiB fiber stack; it must die of SIGSEGV */
		signal(SIGSEGV, SIG_DFL);
		struct concur_exec_opts o = {.loops = 1, .stack_size = 64 * 1024};
		concur_exec *cex;
		if (concur_exec_new(&cex, &o))
			_exit(3);
		concur_future *f = concur_spawn(cex, overflow, NULL);
		concur_result(f, -1);
		_exit(0); /* reached only if the overflow went unnoticed */
	}
	int status = 0;
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0));
	if (WIFSIGNALED(status))
		assert_int_equal(WTERMSIG(status), SIGSEGV);
}

/* concur_in_task and concur_current_exec */
static atomic_int in_task_seen;
static concur_exec *seen_exec;
static int64_t where_am_i(void *arg)
{
	atomic_store(&in_task_seen, concur_in_task());
	seen_exec = concur_current_exec();
	return 0;
}

static void test_context_queries(void **state)
{
	ex = new_exec(1);
	assert_null(concur_current_exec());
	concur_future *f = concur_spawn(ex, where_am_i, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	assert_int_equal(atomic_load(&in_task_seen), 1);
	assert_ptr_equal(seen_exec, ex);
	concur_release(f);
	concur_exec_free(ex);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_stacks_only_while_running),
	    cmocka_unit_test(test_yield_interleaves),
	    cmocka_unit_test(test_deep_stack),
	    cmocka_unit_test(test_guard_page),
	    cmocka_unit_test(test_context_queries),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* SPDX-License-Identifier: MIT */
/* Timers: concur_sleep in and out of tasks, timed awaits (the timer or the future wins). */
#include "helpers.h"

#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>

static concur_exec *ex;

static atomic_llong slept_ns;
static int64_t sleeper(void *arg)
{
	int64_t t0 = now_ns();
	int r = concur_sleep((int64_t)(intptr_t)arg);
	atomic_store(&slept_ns, now_ns() - t0);
	return r;
}

static atomic_int others_ran;
static int64_t other(void *arg)
{
	atomic_fetch_add(&others_ran, 1);
	return 0;
}

/* A sleeping task suspends: its loop runs other tasks meanwhile. */
static void test_sleep_in_task(void **state)
{
	ex = new_exec(1);
	atomic_store(&others_ran, 0);
	concur_future *s = concur_spawn(ex, sleeper, (void *)(intptr_t)MS(30));
	concur_future *o[10];
	for (int i = 0; i < 10; i++)
		o[i] = concur_spawn(ex, other, NULL);
	for (int i = 0; i < 10; i++) {
		assert_int_equal(concur_result(o[i], -1), 0);
		concur_release(o[i]);
	}
	assert_false(concur_done(s)); /* the others finished while it slept */
	assert_int_equal(concur_result(s, -1), 0);
	assert_true(atomic_load(&slept_ns) >= MS(30)); /* a timer never fires early */
	assert_int_equal(atomic_load(&others_ran), 10);
	concur_release(s);

	s = concur_spawn(ex, sleeper, (void *)(intptr_t)-1);
	assert_int_equal(concur_result(s, -1), -EINVAL);
	concur_release(s);
	s = concur_spawn(ex, sleeper, (void *)0); /* 0: a yield */
	assert_int_equal(concur_result(s, -1), 0);
	concur_release(s);
	concur_exec_free(ex);
}

/*
 * The heap keeps a task where an earlier deadline placed it (timer.c): when that place comes
 * due, the task is dropped or moved to its deadline now, never timed out early, and its later
 * deadline still fires. Two sleepers (400 and 600 ms) share the heap, so a move goes down it.
 */
static concur_future *late_promise;

static int64_t moved_deadlines(void *arg)
{
	int64_t *out = arg;
	/* popped: the place (80 ms, under the coarse clock's margin) comes while the task awaits
	 * a promise set at 150 ms with no deadline: dropped, the await not broken */
	concur_deadline_push(MS(80));
	out[0] = concur_deadline_pop(); /* near now: the precise clock says not passed */
	out[1] = concur_result(late_promise, -1);
	/* popped: the place comes while the task sleeps 80 ms: moved to the sleep's own end */
	concur_deadline_push(MS(20));
	concur_deadline_pop();
	out[8] = concur_sleep(MS(80));
	/* popped, and a later one pushed: it fires at 100 ms, not at the place */
	int64_t t0 = now_ns();
	concur_deadline_push(MS(20));
	concur_deadline_pop();
	concur_deadline_push(MS(100));
	out[2] = concur_sleep(MS(60000));
	out[3] = now_ns() - t0;
	out[4] = concur_deadline_pop();
	/* an earlier one than the place: moved up, it fires at its time */
	t0 = now_ns();
	concur_deadline_push(MS(60000));
	concur_deadline_push(MS(30));
	out[5] = concur_sleep(MS(60000));
	out[6] = now_ns() - t0;
	concur_deadline_pop();
	out[7] = concur_deadline_pop(); /* far ahead: not passed */
	return 0;
}

static void test_moved_deadlines(void **state)
{
	ex = new_exec(1);
	concur_future *bg[2] = {concur_spawn(ex, sleeper, (void *)(intptr_t)MS(400)),
	                        concur_spawn(ex, sleeper, (void *)(intptr_t)MS(600))};
	late_promise = concur_promise_new(ex);
	int64_t out[9];
	concur_future *f = concur_spawn(ex, moved_deadlines, out);
	concur_sleep(MS(150));
	assert_int_equal(concur_promise_set(late_promise, 7), 0);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	concur_release(late_promise);
	assert_int_equal(out[0], 0);
	assert_int_equal(out[1], 7);
	assert_int_equal(out[8], 0);
	assert_int_equal(out[2], -ETIMEDOUT);
	assert_true(out[3] >= MS(100));
	assert_int_equal(out[4], 1);
	assert_int_equal(out[5], -ETIMEDOUT);
	assert_true(out[6] >= MS(30) && out[6] < MS(10000));
	assert_int_equal(out[7], 0);
	for (int i = 0; i < 2; i++) {
		assert_int_equal(concur_result(bg[i], -1), 0); /* their own ends, not broken */
		concur_release(bg[i]);
	}
	concur_exec_free(ex);
}

static void test_sleep_outside_task(void **state)
{
	int64_t t0 = now_ns();
	assert_int_equal(concur_sleep(MS(10)), 0);
	assert_true(now_ns() - t0 >= MS(10));
	assert_int_equal(concur_sleep(-5), -EINVAL);
}

/* A timed await: the timer wins against a promise nobody sets, the future wins otherwise. */
static concur_future *promise;
static int64_t timed_await(void *arg)
{
	return concur_result(promise, (int64_t)(intptr_t)arg);
}

static void test_timed_await(void **state)
{
	unsigned loops[] = {1, 2};
	for (int k = 0; k < 2; k++) {
		ex = new_exec(loops[k]);
		promise = concur_promise_new(ex);
		concur_future *f = concur_spawn(ex, timed_await, (void *)(intptr_t)MS(20));
		assert_int_equal(concur_result(f, -1), -ETIMEDOUT);
		assert_false(concur_done(promise)); /* a timeout changes nothing */
		concur_release(f);

		/* the future wins: the await returns its value, the timer is taken down */
		f = concur_spawn(ex, timed_await, (void *)(intptr_t)MS(10000));
		concur_sleep(MS(10));
		assert_int_equal(concur_promise_set(promise, 31), 0);
		assert_int_equal(concur_result(f, -1), 31);
		concur_release(f);

		/* already done: no wait at all */
		f = concur_spawn(ex, timed_await, (void *)(intptr_t)MS(1));
		assert_int_equal(concur_result(f, -1), 31);
		concur_release(f);
		/* a poll (0) of a pending future */
		concur_future *p2 = promise;
		promise = concur_promise_new(ex);
		f = concur_spawn(ex, timed_await, (void *)0);
		assert_int_equal(concur_result(f, -1), -ETIMEDOUT);
		concur_release(f);
		concur_release(p2);
		concur_release(promise);
		/* join returns: no timer lingers as work */
		assert_int_equal(concur_exec_join(ex, MS(5000)), 0);
		concur_exec_free(ex);
	}
}

/* Many timed awaits racing their futures: each resumes exactly once, with either outcome. */
#define RACERS 200
static concur_future *racer_promises[RACERS];
static atomic_int outcomes_value, outcomes_timeout;
static int64_t racer(void *arg)
{
	intptr_t i = (intptr_t)arg;
	int64_t v = concur_result(racer_promises[i], MS(1));
	if (v == 5)
		atomic_fetch_add(&outcomes_value, 1);
	else if (v == -ETIMEDOUT)
		atomic_fetch_add(&outcomes_timeout, 1);
	return 0;
}

static void test_timed_await_races(void **state)
{
	ex = new_exec(2);
	atomic_store(&outcomes_value, 0);
	atomic_store(&outcomes_timeout, 0);
	concur_future *tasks[RACERS];
	for (intptr_t i = 0; i < RACERS; i++) {
		racer_promises[i] = concur_promise_new(ex);
		tasks[i] = concur_spawn(ex, racer, (void *)i);
	}
	concur_sleep(MS(1));
	for (int i = 0; i < RACERS; i++)
		concur_promise_set(racer_promises[i], 5);
	for (int i = 0; i < RACERS; i++) {
		assert_int_equal(concur_result(tasks[i], -1), 0);
		concur_release(tasks[i]);
		concur_release(racer_promises[i]);
	}
	assert_int_equal(atomic_load(&outcomes_value) + atomic_load(&outcomes_timeout), RACERS);
	concur_exec_free(ex);
}

/* Live heap bytes, all arenas (glibc). Sanitized builds check leaks with their own tools. */
static long live_heap(void)
{
	struct mallinfo2 mi = mallinfo2();
	return (long)mi.uordblks;
}

/* Defect 3: a timed await that times out takes its node off the future's waiter list, so a
 * promise dropped unset afterwards leaves nothing behind (LeakSanitizer checks it too). */
static int64_t time_out_on_fresh_promises(void *arg)
{
	long n = (long)(intptr_t)arg;
	for (long i = 0; i < n; i++) {
		concur_future *p = concur_promise_new(NULL);
		if (concur_result(p, 1000) != -ETIMEDOUT)
			return -1;
		concur_release(p);
	}
	return 0;
}

static void test_timed_out_await_leaves_nothing(void **state)
{
	ex = new_exec(1);
	concur_future *f = concur_spawn(ex, time_out_on_fresh_promises, (void *)1000);
	assert_int_equal(concur_result(f, -1), 0); /* warm the caches */
	concur_release(f);
	long before = live_heap();
	f = concur_spawn(ex, time_out_on_fresh_promises, (void *)(intptr_t)BULK(20000));
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	if (!SANITIZED) /* 96 bytes a timeout before the fix: 1.9 MB */
		assert_true(live_heap() - before < 256 * 1024);
	concur_exec_free(ex);
}

/* Defect 9: a kernel timer of INT64_MAX ns does not overflow, and cancelling it works. */
static void test_huge_kernel_timeout(void **state)
{
	ex = new_exec(1);
	concur_future *t = concur_timeout(ex, INT64_MAX);
	concur_sleep(MS(5));
	assert_false(concur_done(t));
	assert_int_equal(concur_cancel(t), -EINPROGRESS);
	assert_int_equal(concur_result(t, INT64_MAX), -ECANCELED);
	concur_release(t);
	concur_exec_free(ex);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_sleep_in_task),
	    cmocka_unit_test(test_moved_deadlines),
	    cmocka_unit_test(test_sleep_outside_task),
	    cmocka_unit_test(test_timed_await),
	    cmocka_unit_test(test_timed_await_races),
	    cmocka_unit_test(test_timed_out_await_leaves_nothing),
	    cmocka_unit_test(test_huge_kernel_timeout),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, NULL, NULL));
}

/* SPDX-License-Identifier: MIT */
/* Loops: idle means idle, messages between loops ride MSG_RING, blocked threads are woken
 * through the ring, the ring flags the kernel gave us. */
#include "helpers.h"

#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>

static concur_exec *ex;

/* An executor with 2 idle loops uses under 10 ms of CPU in 1 s. */
static int64_t nothing(void *arg)
{
	return 0;
}

static void test_idle_is_idle(void **state)
{
	ex = new_exec(2);
	/* some work first, so the loops have been through their whole circle */
	for (int i = 0; i < 100; i++)
		concur_release(concur_spawn(ex, nothing, NULL));
	assert_int_equal(concur_exec_join(ex, -1), 0);
	concur_sleep(MS(50)); /* let any post-activity watch end */
	int64_t cpu0 = process_cpu_ns();
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	concur_sleep(MS(1000));
	concur_exec_stats(ex, &after);
	int64_t used = process_cpu_ns() - cpu0;
	if (used >= MS(10))
		fail_msg("2 idle loops used %lld ns of CPU in 1 s", (long long)used);
	assert_int_equal(after.enters, before.enters); /* asleep in io_uring_enter throughout */
	concur_exec_free(ex);
}

/* Ring flags: SINGLE_ISSUER | DEFER_TASKRUN on this kernel (6.1+), else a fallback. */
static void test_ring_flags(void **state)
{
	ex = new_exec(1);
	unsigned flags = concur_exec_ring_flags(ex);
	assert_true(flags & IORING_SETUP_CQSIZE);
	if (flags & IORING_SETUP_DEFER_TASKRUN)
		assert_true(flags & IORING_SETUP_SINGLE_ISSUER);
	concur_exec_free(ex);

	struct concur_exec_opts o = {.loops = 1, .flags = CONCUR_EXEC_PIN, .ring_entries = 8};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	concur_future *f = concur_spawn(ex, nothing, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	concur_exec_free(ex);
}

/* A fiber on loop A awaits a future completed on loop B: the resume travels by MSG_RING. */
static concur_future *gate_promise;
static pthread_t awaiter_thread, setter_thread;
static int64_t awaiter(void *arg)
{
	awaiter_thread = pthread_self();
	return concur_result(gate_promise, -1);
}
static int64_t setter(void *arg)
{
	setter_thread = pthread_self();
	concur_sleep(MS(10));
	return concur_promise_set(gate_promise, 11);
}

static void test_cross_loop_resume(void **state)
{
	ex = new_exec(2);
	gate_promise = concur_promise_new(ex);
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	concur_future *a = concur_spawn(ex, awaiter, NULL); /* round-robin: loop 0 */
	concur_future *s = concur_spawn(ex, setter, NULL);  /* loop 1 */
	assert_int_equal(concur_result(a, -1), 11);
	assert_int_equal(concur_result(s, -1), 0);
	assert_false(pthread_equal(awaiter_thread, setter_thread));
	concur_exec_stats(ex, &after);
	assert_true(after.msg_ring > before.msg_ring);
	concur_release(a);
	concur_release(s);
	concur_release(gate_promise);
	concur_exec_free(ex);
}

/* A thread outside the executor parked on a future is woken by the loop that completes it
 * (with the futex syscall). */
static int64_t slow_value(void *arg)
{
	concur_sleep(MS(30)); /* far longer than the waiter's spin */
	return 99;
}

static void test_parked_thread_woken_by_loop(void **state)
{
	ex = new_exec(1);
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	for (int i = 0; i < 3; i++) {
		concur_future *f = concur_spawn(ex, slow_value, NULL);
		assert_int_equal(concur_result(f, -1), 99); /* parks */
		concur_release(f);
	}
	concur_exec_stats(ex, &after);
	assert_true(after.futex_wakes - before.futex_wakes >= 3);
	/* nothing else queued on the loop: each wake was the futex syscall */
	assert_int_equal(after.futex_ring_wakes, before.futex_ring_wakes);
	concur_exec_free(ex);
}

/* When the loop has SQEs queued anyway, the wake rides that submit (IORING_OP_FUTEX_WAKE). */
static _Atomic(concur_future *) spinner_future;
static int64_t spin_then_value(void *arg)
{
	int64_t t0 = now_ns();
	while (now_ns() - t0 < MS(50)) /* long past the waiter's spin: it parks */
		;
	return 77;
}
static int64_t short_sleep(void *arg)
{
	return concur_sleep(MS(1)); /* queues a timeout SQE, submitted at the turn's end */
}
static int64_t arrange_turn(void *arg)
{
	/* local spawns run depth first: the sleeper queues its SQE, then the spinner completes */
	concur_future *spinner = concur_spawn(ex, spin_then_value, NULL);
	concur_release(concur_spawn(ex, short_sleep, NULL));
	atomic_store(&spinner_future, spinner);
	return 0;
}

static bool kernel_has_futex_wake(void)
{
	struct io_uring ring;
	if (io_uring_queue_init(2, &ring, 0))
		return false;
	struct io_uring_probe *p = io_uring_get_probe_ring(&ring);
	bool has = p && io_uring_opcode_supported(p, 52 /* IORING_OP_FUTEX_WAKE */);
	io_uring_free_probe(p);
	io_uring_queue_exit(&ring);
	return has;
}

static void test_parked_thread_woken_through_ring(void **state)
{
	ex = new_exec(1);
	atomic_store(&spinner_future, NULL);
	struct concur_stats before, after;
	concur_exec_stats(ex, &before);
	concur_release(concur_spawn(ex, arrange_turn, NULL));
	concur_future *f;
	while (!(f = atomic_load(&spinner_future)))
		;
	assert_int_equal(concur_result(f, -1), 77);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	concur_exec_stats(ex, &after);
	assert_int_equal(after.futex_wakes - before.futex_wakes, 1);
	assert_int_equal(after.futex_ring_wakes - before.futex_ring_wakes,
	                 kernel_has_futex_wake() ? 1 : 0);
	concur_release(f);
	concur_exec_free(ex);
}

/* A timed blocking wait from a foreign thread times out and leaves the future alone. */
static void test_blocking_timeout(void **state)
{
	concur_future *p = concur_promise_new(NULL);
	int64_t t0 = now_ns();
	assert_int_equal(concur_result(p, MS(20)), -ETIMEDOUT);
	assert_true(now_ns() - t0 >= MS(20));
	assert_false(concur_done(p));
	concur_release(p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_idle_is_idle),
	    cmocka_unit_test(test_ring_flags),
	    cmocka_unit_test(test_cross_loop_resume),
	    cmocka_unit_test(test_parked_thread_woken_by_loop),
	    cmocka_unit_test(test_parked_thread_woken_through_ring),
	    cmocka_unit_test(test_blocking_timeout),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

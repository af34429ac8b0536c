/* SPDX-License-Identifier: MIT */
/* The stall detector (stall.c): a fiber run longer than the threshold is counted and reported. */
#include "comp_test.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>

/*
 * Linked with -Wl,--wrap=clock_gettime (tests/CMakeLists.txt): a hog arms the hold as it returns,
 * and the next thread-CPU clock read on its loop thread -- the detector's, after it found the
 * executor's slot and before it reads the slot's fn -- waits there until the test lets it go.
 */
int __real_clock_gettime(clockid_t clk, struct timespec *ts);
static atomic_long cpu_clock_reads; /* test_detector_costs_only_its_executor */
static atomic_bool hold_armed;
static pthread_t hold_thread;
static atomic_int hold_state; /* 1: a loop is held, 2: let it go */

int __wrap_clock_gettime(clockid_t clk, struct timespec *ts)
{
	if (clk == CLOCK_THREAD_CPUTIME_ID)
		atomic_fetch_add(&cpu_clock_reads, 1);
	if (clk == CLOCK_THREAD_CPUTIME_ID && atomic_load(&hold_armed) &&
	    pthread_equal(pthread_self(), hold_thread)) {
		atomic_store(&hold_armed, false);
		atomic_store(&hold_state, 1);
		while (atomic_load(&hold_state) != 2)
			sched_yield();
	}
	return __real_clock_gettime(clk, ts);
}

/* ---- the detector ------------------------------------------------------------------------- */

static atomic_int reports;
static _Atomic int64_t reported_ns;

static void on_stall(concur_exec *e, unsigned loop_idx, int64_t ran_ns, void *arg)
{
	assert_ptr_equal(e, ex);
	assert_true(loop_idx < 2);
	atomic_store(&reported_ns, ran_ns);
	atomic_fetch_add(&reports, 1);
}

static int64_t hog(void *arg)
{
	spin_ns(MS(60));
	return 0;
}

static int64_t polite(void *arg)
{
	for (int i = 0; i < 30; i++) {
		spin_ns(MS(1));
		concur_yield();
	}
	return 0;
}

static void test_stall_detector(void **state)
{
	assert_int_equal(concur_stall_detector(NULL, 1, NULL, NULL), -EINVAL);
	assert_int_equal(concur_stall_detector(ex, MS(20), on_stall, NULL), 0);
	concur_future *f = concur_spawn(ex, polite, NULL); /* yields often: no stall */
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(concur_stall_count(ex), 0);
	f = concur_spawn(ex, hog, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(concur_stall_count(ex), 1);
	assert_int_equal(atomic_load(&reports), 1);
	assert_true(atomic_load(&reported_ns) >= MS(60));
	assert_int_equal(concur_stall_detector(ex, 0, NULL, NULL), 0); /* off */
	f = concur_spawn(ex, hog, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(concur_stall_count(ex), 0);
	assert_int_equal(atomic_load(&reports), 1);
}

/*
 * A report is made with one setting of one executor's detector. The loop found ex's slot, then
 * (held here) ex's detector was turned off and another executor took the slot: it called the
 * other's fn with ex, and counted the stall on the other executor.
 */
static concur_exec *ex_b;
static atomic_int wrong_reports;

static void on_stall_b(concur_exec *e, unsigned loop_idx, int64_t ran_ns, void *arg)
{
	atomic_fetch_add(&wrong_reports, 1); /* ex_b runs nothing: any report is wrong */
}

static int64_t hog_held(void *arg)
{
	spin_ns(MS(30));
	hold_thread = pthread_self();
	atomic_store(&hold_armed, true);
	return 0;
}

static void test_report_of_one_setting(void **state)
{
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex_b, &o), 0);
	atomic_store(&reports, 0);
	atomic_store(&hold_state, 0);
	assert_int_equal(concur_stall_detector(ex, MS(10), on_stall, NULL), 0);
	concur_future *f = concur_spawn(ex, hog_held, NULL);
	while (atomic_load(&hold_state) != 1)
		usleep(100);
	assert_int_equal(concur_stall_detector(ex, 0, NULL, NULL), 0); /* off */
	assert_int_equal(concur_stall_detector(ex_b, 1, on_stall_b, NULL), 0);
	atomic_store(&hold_state, 2);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(concur_exec_join(ex, -1), 0); /* the loop is past its report */
	assert_int_equal(atomic_load(&wrong_reports), 0);
	assert_int_equal(atomic_load(&reports), 0); /* off before the report: none */
	assert_int_equal(concur_stall_count(ex_b), 0);
	concur_exec_free(ex_b);
}

/*
 * Turning the detector off waits for a report running on a loop, so the caller may free what fn
 * uses once it returns (it returned while fn still ran). Forced: fn waits for a gate; the off
 * call, made from a thread, must not return before the gate opens (checked 50 ms later).
 */
static atomic_int in_slow_fn, slow_gate, off_returned;

static void on_stall_slow(concur_exec *e, unsigned loop_idx, int64_t ran_ns, void *arg)
{
	atomic_store(&in_slow_fn, 1);
	while (!atomic_load(&slow_gate))
		usleep(100);
	atomic_store(&in_slow_fn, 0);
}

static void *turn_off(void *arg)
{
	concur_stall_detector(ex, 0, NULL, NULL);
	atomic_store(&off_returned, 1);
	return NULL;
}

static void test_off_waits_for_report(void **state)
{
	assert_int_equal(concur_stall_detector(ex, MS(10), on_stall_slow, NULL), 0);
	concur_future *f = concur_spawn(ex, hog, NULL);
	while (!atomic_load(&in_slow_fn))
		usleep(100);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, turn_off, NULL), 0);
	usleep(50000);
	bool early = atomic_load(&off_returned);
	atomic_store(&slow_gate, 1);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_false(early);
	assert_int_equal(atomic_load(&in_slow_fn), 0); /* fn was over when off returned */
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
}

/* A detector costs only its own executor: another one's fiber runs read no thread CPU clock (a
 * syscall: that clock has no vDSO path) and keep their direct switches. It was one count for the
 * process, so one executor's detector made every loop time every run (2002 reads for the 2000
 * yields below). The same once a detector is turned off, or its executor freed. */

static int64_t yielder(void *arg)
{
	for (int i = 0; i < 1000; i++)
		concur_yield();
	return 0;
}

/* The CPU-clock reads of two tasks yielding 1,000 times each on e. */
static long yielders_clock_reads(concur_exec *e)
{
	atomic_store(&cpu_clock_reads, 0);
	concur_future *f[2] = {concur_spawn(e, yielder, NULL), concur_spawn(e, yielder, NULL)};
	for (int i = 0; i < 2; i++) {
		assert_int_equal(concur_result(f[i], -1), 0);
		concur_release(f[i]);
	}
	return atomic_load(&cpu_clock_reads);
}

static void test_detector_costs_only_its_executor(void **state)
{
	struct concur_exec_opts o = {.loops = 1};
	concur_exec *a, *b;
	assert_int_equal(concur_exec_new(&a, &o), 0);
	assert_int_equal(concur_exec_new(&b, &o), 0);
	assert_int_equal(concur_stall_detector(a, MS(100), NULL, NULL), 0);
	assert_int_equal(yielders_clock_reads(b), 0);
	assert_true(yielders_clock_reads(a) >= 2000); /* a's own runs are timed */
	assert_int_equal(concur_stall_detector(a, 0, NULL, NULL), 0);
	assert_int_equal(yielders_clock_reads(a), 0);
	assert_int_equal(concur_stall_detector(a, MS(100), NULL, NULL), 0);
	concur_exec_free(a); /* its detector goes with it */
	concur_exec *c;
	assert_int_equal(concur_exec_new(&c, &o), 0);
	assert_int_equal(yielders_clock_reads(c), 0);
	assert_int_equal(yielders_clock_reads(b), 0);
	concur_exec_free(c);
	concur_exec_free(b);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_stall_detector),
	    cmocka_unit_test(test_report_of_one_setting),
	    cmocka_unit_test(test_off_waits_for_report),
	    cmocka_unit_test(test_detector_costs_only_its_executor),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, setup_ex2, teardown_ex));
}

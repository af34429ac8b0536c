/* SPDX-License-Identifier: MIT */
/* The stall detector (stall.c): a fiber run longer than the threshold is counted and reported. */
#include "comp_test.h"

#include <errno.h>
#include <stdatomic.h>

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

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_stall_detector),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, setup_ex2, teardown_ex));
}

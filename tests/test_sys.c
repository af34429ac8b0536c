/* SPDX-License-Identifier: MIT */
/* The syscall layer (sys.c): the clock, deadlines, the futex, prefaulting, error messages. */
#include "helpers.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

static void test_clock_and_deadlines(void **state)
{
	int64_t a = concur__now_ns(), b = concur__now_ns();
	assert_true(a > 0 && b >= a);
	/* a timeout near INT64_MAX saturates: "practically forever", never an overflow */
	assert_int_equal(concur__after_ns(INT64_MAX), INT64_MAX);
	assert_int_equal(concur__after_ns(INT64_MAX - 1), INT64_MAX);
	int64_t due = concur__after_ns(MS(100));
	assert_true(due >= b + MS(100));
	struct timespec ts;
	concur__deadline(&ts, MS(100));
	int64_t at = CONCUR__TS_TO_NS(&ts);
	assert_true(at >= due && ts.tv_nsec >= 0 && ts.tv_nsec < 1000000000);
	concur__deadline(&ts, INT64_MAX);
	assert_int_equal(CONCUR__TS_TO_NS(&ts), INT64_MAX);
}

/* Prefaulted pages are resident before anything touches them (this kernel has
 * MADV_POPULATE_WRITE: Linux 5.14+), and only those. */
static void test_prefault(void **state)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE), len = 16 * page;
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(p != MAP_FAILED);
	unsigned char in[16];
	assert_int_equal(mincore(p, len, in), 0);
	for (int i = 0; i < 16; i++)
		assert_int_equal(in[i] & 1, 0); /* untouched: not there yet */
	concur__prefault(p, len / 2);
	assert_int_equal(mincore(p, len, in), 0);
	for (int i = 0; i < 16; i++)
		assert_int_equal(in[i] & 1, i < 8);
	assert_int_equal(p[0], 0); /* zero-filled, as a fault would have made them */
	concur__prefault(p + len / 2, len / 2);
	assert_int_equal(mincore(p, len, in), 0);
	for (int i = 0; i < 16; i++)
		assert_int_equal(in[i] & 1, 1);
	munmap(p, len);
}

static void test_futex(void **state)
{
	_Atomic uint32_t word = 1;
	/* the word is not the value: returns at once */
	assert_int_equal(concur__futex_wait(&word, 0, NULL), -EAGAIN);
	/* a deadline already passed: returns at once */
	struct timespec past;
	concur__deadline(&past, 0);
	assert_int_equal(concur__futex_wait(&word, 1, &past), -ETIMEDOUT);
	concur__futex_wake(&word, 1); /* nobody parked: harmless */
}

static void *set_error_thread(void *arg)
{
	/* a thread with no error yet reads "" (its buffer is made at its first error, and freed
	 * when it exits: the sanitizer build's leak check sees it go) */
	if (strcmp(concur_last_error(), "") != 0)
		return NULL;
	concur__set_error("other thread %d", 2);
	return (void *)(intptr_t)(strcmp(concur_last_error(), "other thread 2") == 0);
}

static void test_errors(void **state)
{
	concur__set_error("this thread %d", 1);
	pthread_t th;
	void *ok;
	assert_int_equal(pthread_create(&th, NULL, set_error_thread, NULL), 0);
	assert_int_equal(pthread_join(th, &ok), 0);
	assert_true((intptr_t)ok);
	assert_string_equal(concur_last_error(), "this thread 1"); /* per thread */
	assert_string_equal(concur_strerror(-ENOENT), "No such file or directory");
	assert_string_equal(concur_strerror(5), "Success");
	assert_string_equal(concur_strerror(-4096), "Unknown error");
	assert_string_equal(concur_strerror(INT64_MIN), "Unknown error");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_clock_and_deadlines),
	    cmocka_unit_test(test_futex),
	    cmocka_unit_test(test_prefault),
	    cmocka_unit_test(test_errors),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, NULL, NULL));
}

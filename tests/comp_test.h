/* SPDX-License-Identifier: MIT */
/* Helpers shared by the composition tests (test_wait, test_sync, test_blocking). */
#ifndef COMP_TEST_H
#define COMP_TEST_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <time.h>

#include "concur.h"

#define MS 1000000ll

/* Poll a condition from the test thread (only the test polls, never the library). */
#define EVENTUALLY(cond)                                                                           \
	do {                                                                                       \
		int tries_ = 0;                                                                    \
		while (!(cond) && tries_++ < 5000)                                                 \
			concur_sleep(1 * MS);                                                      \
		assert_true(cond);                                                                 \
	} while (0)

/* Run for ns without yielding (holds a loop when called in a task). */
/* Burn ns of this thread's CPU time (what the stall detector counts). */
static inline void spin_ns(int64_t ns)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
	do
		clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	while ((t.tv_sec - t0.tv_sec) * 1000000000ll + (t.tv_nsec - t0.tv_nsec) < ns);
}

/* A 2-loop executor for the whole test group. */
static concur_exec *ex;

static inline int setup_ex2(void **state)
{
	struct concur_exec_opts o = {.loops = 2};
	return concur_exec_new(&ex, &o);
}

static inline int teardown_ex(void **state)
{
	concur_exec_free(ex);
	return 0;
}

#endif /* COMP_TEST_H */

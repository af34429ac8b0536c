/* SPDX-License-Identifier: MIT */
/* Small helpers shared by the cmocka tests. */
#ifndef CONCUR_TEST_HELPERS_H
#define CONCUR_TEST_HELPERS_H

#include <setjmp.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "concur.h"

/* x milliseconds in ns: the one time unit of the tests. */
#define MS(x) ((int64_t)(x)*1000000)

/* Sanitized builds run 10x to 50x slower: bulk counts shrink there (the assertions do not). */
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#define BULK(n)   ((n) / 10)
#else
#define SANITIZED 0
#define BULK(n)   (n)
#endif

static inline int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline int64_t process_cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Wait (bounded: 10 s) for a loop's flag (sleeping, watching) to be raised: true if it is. */
static inline bool flag_set(_Atomic int *flag)
{
	for (int tries = 0; tries < 100000 && !atomic_load(flag); tries++)
		usleep(100);
	return atomic_load(flag) == 1;
}

/* A field of /proc/self/status in kB (VmHWM, VmRSS), or -1. */
static inline long proc_status_kb(const char *field)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long v = -1;
	size_t n = strlen(field);
	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, field, n) && line[n] == ':')
			v = strtol(line + n + 1, NULL, 10);
	if (f)
		fclose(f);
	return v;
}

/* Poll a condition from the test thread (only the test polls, never the library). */
#define EVENTUALLY(cond)                                                                           \
	do {                                                                                       \
		int tries_ = 0;                                                                    \
		while (!(cond) && tries_++ < 5000)                                                 \
			concur_sleep(MS(1));                                                       \
		assert_true(cond);                                                                 \
	} while (0)

/* Burn ns of this thread's CPU time without yielding (holds a loop when called in a task;
 * what the stall detector counts). */
static inline void spin_ns(int64_t ns)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
	do
		clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	while ((t.tv_sec - t0.tv_sec) * 1000000000ll + (t.tv_nsec - t0.tv_nsec) < ns);
}

/*
 * A test that needs a kernel feature the kernel lacks calls SKIP_NO_KERNEL(why): the test is
 * skipped, and main's TESTS_EXIT(failed) makes the binary exit 77 when nothing failed, which
 * ctest reports as skipped (SKIP_RETURN_CODE in tests/CMakeLists.txt), as liburing's tests do.
 * Skips for other reasons (a sanitizer build) stay plain cmocka skip()s.
 */
static int tests_kernel_skips __attribute__((unused));
#define SKIP_NO_KERNEL(why)                                                                        \
	do {                                                                                       \
		tests_kernel_skips++;                                                              \
		print_message("[  SKIP    ] the kernel lacks %s\n", why);                          \
		skip();                                                                            \
	} while (0)
/* A function, not a macro over its argument: TESTS_EXIT(cmocka_run_group_tests(...)) must run
 * the suite once (a macro naming `failed` twice ran every failing suite a second time). */
static inline int tests_exit_code(int failed)
{
	return failed ? failed : tests_kernel_skips ? 77 : 0;
}
#define TESTS_EXIT(failed) tests_exit_code(failed)

static inline concur_exec *new_exec(unsigned loops)
{
	struct concur_exec_opts o = {.loops = loops};
	concur_exec *ex = NULL;
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	assert_non_null(ex);
	return ex;
}

/* run(arg) in a forked child, which must end within 30 s (a hang fails, and a process that
 * cannot free its executor does not hold the test up): its wait status, -1 if fork failed. */
static inline int child_status(int (*run)(int), int arg)
{
	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		alarm(30);
		_exit(run(arg));
	}
	int status = 0;
	return waitpid(pid, &status, 0) == pid ? status : -1;
}

/* run(arg) in a forked child, which must exit 0 within 30 s. */
static inline void expect_child_ok(int (*run)(int), int arg)
{
	int status = child_status(run, arg);
	assert_true(status >= 0 && WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
}

#endif

/* SPDX-License-Identifier: MIT */
/*
 * The syscall layer: the clock, the futex, and the thread's error message. Everything above
 * (futures, loops, compositions) sleeps, wakes and tells time through these few functions, and
 * they call nothing of concur's.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "internal.h"

#include <linux/futex.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- time and futex helpers --------------------------------------------------------------- */

int64_t concur__now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return CONCUR__TS_TO_NS(&ts);
}

/* Saturates: a timeout near INT64_MAX means "practically forever", never an overflow. */
int64_t concur__after_ns(int64_t timeout_ns)
{
	int64_t now = concur__now_ns();
	return timeout_ns > INT64_MAX - now ? INT64_MAX : now + timeout_ns;
}

void concur__deadline(struct timespec *abs, int64_t timeout_ns)
{
	CONCUR__NS_TO_TS(abs, concur__after_ns(timeout_ns));
}

/* Sleep while *word == val, until abs_mono (CLOCK_MONOTONIC; NULL: forever). 0 or -errno. */
int concur__futex_wait(_Atomic uint32_t *word, uint32_t val, const struct timespec *abs_mono)
{
	long r = syscall(SYS_futex, word, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, val, abs_mono,
	                 NULL, FUTEX_BITSET_MATCH_ANY);
	return r < 0 ? -errno : 0;
}

void concur__futex_wake(_Atomic uint32_t *word, int n)
{
	syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

/* ---- errors -------------------------------------------------------------------------------- */

static __thread char concur__errbuf[256];

void concur__set_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(concur__errbuf, sizeof(concur__errbuf), fmt, ap);
	va_end(ap);
}

const char *concur_last_error(void)
{
	return concur__errbuf;
}

const char *concur_strerror(int64_t err)
{
	if (err >= 0)
		return "Success";
	if (err < -4095)
		return "Unknown error";
	const char *s = strerrordesc_np((int)-err);
	return s ? s : "Unknown error";
}

/* SPDX-License-Identifier: MIT */
/*
 * Holding a loop: a task that spins (never yields) until released, so the tasks queued behind
 * it on a 1-loop executor stay PENDING meanwhile. Include after cmocka.h.
 */
#ifndef CONCUR_TEST_HOLD_LOOP_H
#define CONCUR_TEST_HOLD_LOOP_H

#include <stdatomic.h>

#include "concur.h"

static atomic_int hold_gate, hold_running;

static inline int64_t hold_loop_task(void *arg)
{
	atomic_store(&hold_running, 1);
	while (!atomic_load(&hold_gate))
		;
	return 1;
}

/* Wait until the spinner s (spawned with hold_loop_task after hold_loop_arm()) runs. */
static inline concur_future *hold_loop_running(concur_future *s)
{
	while (!atomic_load(&hold_running))
		;
	return s;
}

static inline void hold_loop_arm(void)
{
	atomic_store(&hold_gate, 0);
	atomic_store(&hold_running, 0);
}

/* Occupy the only loop of the executor `on` until release_loop(). */
static inline concur_future *hold_loop(concur_exec *on)
{
	hold_loop_arm();
	return hold_loop_running(concur_spawn(on, hold_loop_task, NULL));
}

/* Let the spinner finish and drop it. */
static inline void release_loop(concur_future *s)
{
	atomic_store(&hold_gate, 1);
	assert_int_equal(concur_result(s, -1), 1);
	concur_release(s);
}

#endif

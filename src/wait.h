/* SPDX-License-Identifier: MIT */
/*
 * Internals shared by the composition parts (wait.c, group.c, sync.c, blocking.c).
 *
 * Every wait here is one promise completed by hand: the waiter makes (or joins) a promise and
 * calls concur_result() on it, which blocks a foreign thread or suspends a task's fiber; whoever
 * makes the condition true sets the promise. So there is one completion path and no polling.
 */
#ifndef CONCUR_WAIT_H
#define CONCUR_WAIT_H

#include "internal.h"

#include <time.h>

/* An absolute deadline on concur__now_ns()'s clock for timeout_ns (< 0: none, returned as -1). */
static inline int64_t concur__deadline_after(int64_t timeout_ns)
{
	return timeout_ns < 0 ? -1 : concur__after_ns(timeout_ns); /* saturates: INT64_MAX */
}

/* The timeout left until deadline, for concur_result(): -1 forever, 0 once passed. */
static inline int64_t concur__remaining(int64_t deadline)
{
	if (deadline < 0)
		return -1;
	int64_t left = deadline - concur__now_ns();
	return left > 0 ? left : 0;
}

/*
 * A wake slot: a pointer to a pending promise that waiters sleep on and a notifier sets.
 * Both sides hold the mutex that protects the waiters' condition while they look at the slot.
 *
 * concur__wake_sleep: called with *lock held and the condition false. Joins the promise in
 * *slot (making it if the slot is empty), drops the lock, waits up to concur__remaining(deadline)
 * and returns concur_result()'s answer: 0 when woken, -ETIMEDOUT, -EDEADLK, or -ENOMEM. The
 * lock is not held on return. A waiter that gives up leaves the promise armed: the next fire
 * sets it harmlessly, and the slot's owner releases whatever is left when it is destroyed.
 *
 * concur__wake_fire: wakes every waiter of the slot (locks, empties the slot, sets the promise
 * outside the lock).
 */
int64_t concur__wake_sleep(pthread_mutex_t *lock, concur_future **slot, int64_t deadline);
void concur__wake_fire(pthread_mutex_t *lock, concur_future **slot);

/* True if f ended FINISHED with an error (a cancellation is not a failure). f must be done. */
static inline bool concur__failed(const concur_future *f)
{
	return concur__state(f) == CONCUR__FINISHED && concur__future_value(f) < 0;
}

/* Check an array argument: -EINVAL for NULL with n > 0, too many, or a NULL/invalid future. */
int concur__check_futures(concur_future *const *futures, size_t n);

#endif /* CONCUR_WAIT_H */

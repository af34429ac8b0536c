/* SPDX-License-Identifier: MIT */
/*
 * The stall detector: the loop times each run of a fiber (concur__stall_begin/end in internal.h)
 * while at least one executor has a detector, and a run longer than the executor's threshold
 * is counted and reported. A small fixed table keeps the per-executor settings, so the core's
 * structures need no field for it; an entry is matched by executor pointer and id, so a freed
 * executor's entry never matches a new one at the same address.
 */
#include "wait.h"

#define STALL_SLOTS 16

_Atomic unsigned concur__stall_detectors;

static struct stall_slot {
	_Atomic(concur_exec *) ex; /* NULL: free */
	_Atomic uint64_t ex_id;
	_Atomic int64_t threshold_ns;
	_Atomic(concur_stall_fn) fn;
	_Atomic(void *) arg;
	_Atomic uint64_t count;
} slots[STALL_SLOTS];
static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;

static struct stall_slot *stall_slot_of(const concur_exec *ex)
{
	for (unsigned i = 0; i < STALL_SLOTS; i++)
		if (atomic_load(&slots[i].ex) == ex && atomic_load(&slots[i].ex_id) == ex->id)
			return &slots[i];
	return NULL;
}

int concur_stall_detector(concur_exec *ex, int64_t threshold_ns, concur_stall_fn fn, void *arg)
{
	if (!concur__exec_valid(ex))
		return -EINVAL;
	int err = 0;
	pthread_mutex_lock(&slots_lock);
	struct stall_slot *s = stall_slot_of(ex);
	if (threshold_ns <= 0) {
		if (s) {
			atomic_store(&s->ex, NULL);
			atomic_fetch_sub(&concur__stall_detectors, 1);
		}
	} else if (s) {
		atomic_store(&s->fn, fn);
		atomic_store(&s->arg, arg);
		atomic_store(&s->threshold_ns, threshold_ns);
	} else {
		/* take a free slot, or one left by an executor that is gone */
		for (unsigned i = 0; i < STALL_SLOTS && !s; i++) {
			concur_exec *old = atomic_load(&slots[i].ex);
			if (!old || !concur__exec_alive(old, atomic_load(&slots[i].ex_id)))
				s = &slots[i];
		}
		if (s) {
			if (!atomic_load(&s->ex))
				atomic_fetch_add(&concur__stall_detectors, 1);
			atomic_store(&s->ex, NULL);
			atomic_store(&s->ex_id, ex->id);
			atomic_store(&s->fn, fn);
			atomic_store(&s->arg, arg);
			atomic_store(&s->threshold_ns, threshold_ns);
			atomic_store(&s->count, 0);
			atomic_store(&s->ex, ex);
		} else {
			err = -ENOSPC;
		}
	}
	pthread_mutex_unlock(&slots_lock);
	return err;
}

uint64_t concur_stall_count(const concur_exec *ex)
{
	if (!concur__exec_valid(ex))
		return 0;
	struct stall_slot *s = stall_slot_of(ex);
	return s ? atomic_load(&s->count) : 0;
}

void concur__stall_end(struct concur__loop *loop, int64_t t0)
{
	struct stall_slot *s = stall_slot_of(loop->ex);
	if (!s)
		return;
	int64_t ran = concur__thread_cpu_ns() - t0;
	if (ran <= atomic_load_explicit(&s->threshold_ns, memory_order_relaxed))
		return;
	atomic_fetch_add(&s->count, 1);
	concur_stall_fn fn = atomic_load(&s->fn);
	if (fn)
		fn(loop->ex, loop->idx, ran, atomic_load(&s->arg));
}

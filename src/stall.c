/* SPDX-License-Identifier: MIT */
/*
 * The stall detector: a loop times each run of a fiber (concur__stall_begin/end in internal.h)
 * while its executor has a detector (the loop's stall_on flag, set here), and a run longer than
 * the executor's threshold is counted and reported. Timing costs two reads of the thread's CPU
 * clock (syscalls) per run, and the loop gives up its direct fiber-to-fiber switches, so only
 * the loops of an executor with a detector pay it. A small fixed table keeps the per-executor
 * settings; an entry is matched by executor pointer and id, so a freed executor's entry never
 * matches a new one at the same address.
 */
#include "wait.h"

#include <sched.h>

#define STALL_SLOTS 16

/* Written under slots_lock; a loop looks without it (stall_slot_of) and takes it only for a
 * run over the threshold, to report from a consistent copy. */
static struct stall_slot {
	_Atomic(concur_exec *) ex; /* NULL: free */
	_Atomic uint64_t ex_id;
	_Atomic int64_t threshold_ns;
	_Atomic(concur_stall_fn) fn;
	_Atomic(void *) arg;
	_Atomic uint64_t count;
	/* The setting's generation, bumped by each change or free; fn calls begun and not
	 * returned, by the parity of the generation they were made with: a change waits for its
	 * old setting's calls only, not for the new one's, nor for those of another executor
	 * that took the slot meanwhile (a later change again may share the parity: a longer
	 * wait, never a shorter one). */
	_Atomic unsigned gen;
	_Atomic unsigned reporting[2];
} slots[STALL_SLOTS];
static pthread_mutex_t slots_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread bool stall_in_report; /* this thread runs a fn */

static struct stall_slot *stall_slot_of(const concur_exec *ex)
{
	for (unsigned i = 0; i < STALL_SLOTS; i++)
		if (atomic_load(&slots[i].ex) == ex && atomic_load(&slots[i].ex_id) == ex->id)
			return &slots[i];
	return NULL;
}

/* Tell ex's loops whether to time their runs (under slots_lock). */
static void stall_loops_set(concur_exec *ex, bool on)
{
	for (unsigned i = 0; i < ex->nloops; i++)
		atomic_store_explicit(&ex->loops[i]->stall_on, on, memory_order_relaxed);
}

/* Free ex's slot (under slots_lock). */
static void stall_slot_free(struct stall_slot *s)
{
	atomic_fetch_add(&s->gen, 1);
	stall_loops_set(atomic_load(&s->ex), false);
	atomic_store(&s->ex, NULL);
}

/* The old fn of a slot just changed or freed may still be running on a loop: wait for it, so
 * that its arg can go once we return. Not on ex's own loops (the other loop's report may wait
 * for a lock our task holds), nor inside a report (it may be the one we would wait for, or
 * two reports could wait for each other). */
static void stall_wait_reports(const concur_exec *ex, struct stall_slot *s, unsigned old_gen)
{
	struct concur__loop *me = concur__tl_loop;
	if ((me && me->ex == ex) || stall_in_report)
		return;
	while (atomic_load_explicit(&s->reporting[old_gen & 1], memory_order_acquire))
		sched_yield();
}

static pthread_once_t slots_once = PTHREAD_ONCE_INIT;

/* fork(): reports under way in the parent's other threads never end in the child */
static void slots_forked(void)
{
	for (unsigned i = 0; i < STALL_SLOTS; i++)
		for (unsigned k = 0; k < 2; k++)
			atomic_store(&slots[i].reporting[k], 0);
}

static void slots_init(void)
{
	concur__fork_guard(&slots_lock, slots_forked);
}

void concur__stall_forget(concur_exec *ex)
{
	pthread_once(&slots_once, slots_init);
	pthread_mutex_lock(&slots_lock);
	struct stall_slot *s = stall_slot_of(ex);
	if (s)
		stall_slot_free(s);
	pthread_mutex_unlock(&slots_lock);
}

int concur_stall_detector(concur_exec *ex, int64_t threshold_ns, concur_stall_fn fn, void *arg)
{
	if (!concur__exec_valid(ex))
		return -EINVAL;
	pthread_once(&slots_once, slots_init);
	int err = 0;
	pthread_mutex_lock(&slots_lock);
	struct stall_slot *s = stall_slot_of(ex), *changed = s;
	unsigned old_gen = s ? atomic_load(&s->gen) : 0;
	if (threshold_ns <= 0) {
		if (s)
			stall_slot_free(s);
	} else if (s) {
		atomic_fetch_add(&s->gen, 1);
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
			atomic_fetch_add(&s->gen, 1);
			atomic_store(&s->ex, NULL);
			atomic_store(&s->ex_id, ex->id);
			atomic_store(&s->fn, fn);
			atomic_store(&s->arg, arg);
			atomic_store(&s->threshold_ns, threshold_ns);
			atomic_store(&s->count, 0);
			atomic_store(&s->ex, ex);
			stall_loops_set(ex, true);
		} else {
			err = -ENOSPC;
		}
	}
	pthread_mutex_unlock(&slots_lock);
	if (changed)
		stall_wait_reports(ex, changed, old_gen);
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
	/* A stall is rare: the lock makes the report one setting's (the slot may have been turned
	 * off, or taken by another executor, since the look above), and counts the call, so that
	 * turning the detector off or changing fn waits for it (stall_wait_reports). */
	pthread_mutex_lock(&slots_lock);
	if (stall_slot_of(loop->ex) != s ||
	    ran <= atomic_load_explicit(&s->threshold_ns, memory_order_relaxed)) {
		pthread_mutex_unlock(&slots_lock);
		return;
	}
	atomic_fetch_add(&s->count, 1);
	concur_stall_fn fn = atomic_load(&s->fn);
	void *arg = atomic_load(&s->arg);
	unsigned parity = atomic_load(&s->gen) & 1;
	if (fn)
		atomic_fetch_add_explicit(&s->reporting[parity], 1, memory_order_relaxed);
	pthread_mutex_unlock(&slots_lock);
	if (fn) {
		stall_in_report = true;
		fn(loop->ex, loop->idx, ran, arg);
		stall_in_report = false;
		atomic_fetch_sub_explicit(&s->reporting[parity], 1, memory_order_release);
	}
}

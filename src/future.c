/* SPDX-License-Identifier: MIT */
/*
 * Futures: the state word, the waiter list, and concur__complete(), the function every
 * future's completion goes through (the first of the two funnels: see internal.h).
 *
 * A future's waiters are of three kinds, all on one list:
 *   - threads outside the executor park on the state word itself (a futex) after setting
 *     CONCUR__WAITERS_PARKED in the waiters word, so a blocked thread costs no node and no
 *     allocation;
 *   - callbacks and awaiting fibers are nodes pushed on a doubly linked list whose head word
 *     carries a lock bit: a push is one CAS and one store, a removal (a timed-out or abandoned
 *     wait taking its node back) relinks in O(1) under the bit. Completing swaps the list for
 *     a closed word (CONCUR__WAITERS_CLOSED: later pushes fail and run at once), and wakes
 *     each node in registration order. No lock is held while a callback runs.
 *   - compositions (as_completed, wait/gather, groups, then/after) hang their own nodes
 *     (CONCUR__WAIT_CALL) on the same list. Their record hooks run before the state flips, so
 *     nobody can see a future done before every composition has it in its books: that is what
 *     makes "observed first, recorded first" hold (see concur.h). When a future dies unset (its
 *     last reference released), the nodes still on its list are told (drop), so nothing that
 *     waited on it leaks.
 *
 * Who frees a future: the last of its holders. Its users hold counted references (refs). A task
 * or an I/O op (class held) is also held by its executor until it has done with it, and that hold
 * is not counted: the executor lets go in the close of its completion (concur__complete_unhold),
 * so completing an op or a task that nobody waits on is one atomic write, the close, where a
 * counted reference cost a second one. The last two holders meet on the waiters word:
 *   - the last user to release a future its executor has let go of (the list closed, not HELD)
 *     frees it, once the state is final (the close precedes the state's store): a release after
 *     the result, the common case, writes nothing but the free;
 *   - a last user that finds the executor still holding it marks the word ORPHAN and leaves it:
 *     the executor's letting go (its close, or concur__unhold) sees the mark, and frees it.
 * The executor drops any counted reference it takes of its own (a cancel's) before it lets go;
 * callbacks, which may take references after every user released f, are the one case where the
 * executor's hold turns into a counted reference (concur__complete_unhold_slow).
 */
#include "internal.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- lifecycle ----------------------------------------------------------------------------- */

void concur__future_init(concur_future *f, const struct concur__future_class *cls, concur_exec *ex,
                         uint32_t refs)
{
	atomic_init(&f->state, CONCUR__PENDING);
	f->magic = CONCUR__FUTURE_MAGIC;
	atomic_init(&f->refs, refs);
	f->flags = 0;
	f->res = 0;
	atomic_init(&f->waiters, 0);
	f->cls = cls;
	f->ex = ex;
	f->ex_id = ex ? ex->id : 0;
}

concur_future *concur_retain(concur_future *f)
{
	if (!concur__valid(f))
		return NULL;
	atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
	return f;
}

/* The first node of a waiters word (NULL: none, or closed). */
static inline struct concur__waiter *concur__waiters_head(uintptr_t word)
{
	return (struct concur__waiter *)(word & ~CONCUR__WAITERS_FLAGS);
}

/* Take the open list for good, leaving it closed (CONCUR__WAITERS_CLOSED, maybe HELD; an ORPHAN
 * mark stays): the word as it was. Waits out a push or removal. */
static __attribute__((noinline)) uintptr_t concur__waiters_close(concur_future *f, uintptr_t closed)
{
	uintptr_t old = atomic_load_explicit(&f->waiters, memory_order_relaxed);
	unsigned spins = 0;
	for (;;) {
		if (old & CONCUR__WAITERS_LOCKED) {
			concur__backoff(&spins);
			old = atomic_load_explicit(&f->waiters, memory_order_relaxed);
			continue;
		}
		if (atomic_compare_exchange_weak_explicit(
		        &f->waiters, &old, closed | (old & CONCUR__WAITERS_ORPHAN),
		        memory_order_acq_rel, memory_order_relaxed))
			return old;
	}
}

/* A future dies unset with nodes on its list: free callbacks, tell compositions. */
static void concur__drop_waiters(concur_future *f)
{
	struct concur__waiter *w =
	    concur__waiters_head(concur__waiters_close(f, CONCUR__WAITERS_CLOSED));
	while (w) {
		struct concur__waiter *next = w->next;
		if (w->kind == CONCUR__WAIT_CALLBACK)
			free(w);
		else if (w->kind == CONCUR__WAIT_CALL && w->ops->drop)
			w->ops->drop(w, f);
		/* AWAIT nodes belong to a task that holds a reference while it waits, and so
		 * cannot be here */
		w = next;
	}
}

/* Nobody holds f any more, nor will: its memory goes. */
static void concur__destroy(concur_future *f)
{
	f->magic = CONCUR__FUTURE_DEAD;
	f->cls->destroy(f);
}

/* The same, once whoever completed f is done with its state. */
static void concur__free(concur_future *f)
{
	concur__future_wait_final(f);
	concur__destroy(f);
}

/*
 * The last user reference went, and the list was not simply closed: unset and unheld (free it
 * and tell whoever is on its list), or held by its executor (mark it ORPHAN for the executor to
 * free, unless it let go meanwhile). wrote: the count was written down to 0; else it read 1.
 *
 * A count read as 1 is trusted while the list is open: a reference the executor takes of its
 * own meanwhile (a cancel's, on its thread) is counted, and dropped before it lets go, so only
 * one release finds itself the last (the one that read 1, or took the count from 1 to 0). Not
 * once the list is closed and HELD: the completion may be about to run callbacks, whose hold
 * takes the count up (concur__complete_unhold_slow), so the release writes it down first.
 */
static __attribute__((noinline)) void concur__release_last(concur_future *f, uintptr_t word,
                                                           bool wrote)
{
	if (!(word & CONCUR__WAITERS_CLOSED) && !f->cls->held) {
		concur__drop_waiters(f);
		concur__destroy(f);
		return;
	}
	unsigned spins = 0;
	for (;;) {
		if (word & CONCUR__WAITERS_CLOSED) {
			if (!(word & CONCUR__WAITERS_HELD)) {
				/* the executor let go before; or its hold became a counted
				 * reference (COUNTED), and the count decides */
				if ((word & CONCUR__WAITERS_COUNTED) && !wrote &&
				    atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) !=
				        1)
					return;
				concur__free(f);
				return;
			}
			if (!wrote) {
				wrote = true;
				/* another holder left (a callback's reference, a canceller's
				 * hold across its callbacks): its release is the last */
				if (atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) !=
				    1)
					return;
				word = atomic_load_explicit(&f->waiters, memory_order_acquire);
				continue;
			}
		} else if (word & CONCUR__WAITERS_LOCKED) {
			concur__backoff(&spins); /* a push or a removal, a few stores away */
			word = atomic_load_explicit(&f->waiters, memory_order_acquire);
			continue;
		}
		if (atomic_compare_exchange_weak_explicit(
		        &f->waiters, &word, word | CONCUR__WAITERS_ORPHAN, memory_order_acq_rel,
		        memory_order_acquire))
			return; /* the executor frees it when it lets go */
	}
}

/* Every call out of the common cases is a tail call, so they save no register (the hot paths
 * of concur_release and concur__waiter_push are a handful of instructions). */
void concur_release(concur_future *f)
{
	if (!concur__valid(f))
		return;
	/* The last reference needs no atomic write when nobody else holds f: holding it, no user
	 * can take one, and the executor let go (the list closed, not HELD). */
	bool wrote = false;
	if (atomic_load_explicit(&f->refs, memory_order_acquire) != 1) {
		if (atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) != 1)
			return;
		wrote = true;
	}
	uintptr_t word = atomic_load_explicit(&f->waiters, memory_order_acquire);
	if (CONCUR__UNLIKELY(word != CONCUR__WAITERS_CLOSED)) {
		concur__release_last(f, word, wrote);
		return;
	}
	concur__free(f);
}

/* ---- deferred calls ------------------------------------------------------------------------ */

/*
 * What a completion makes ready on this thread (a then whose inputs are all done: wait.c) is
 * called by the outermost caller, not recursively: starting one can complete a future that makes
 * another ready (a failed input propagating down a 10 000-long then chain), and the queue keeps
 * the stack flat. A callback runs with a queue of its own (concur__call_back), and a thread about
 * to block runs what is queued first: a callback that waits for a then it just made would
 * otherwise wait behind itself, for ever, and one that waits for anything else starts nothing
 * but its own (a chain's next stage, queued before it, is not run inside its wait).
 */
static CONCUR__TLS_HOT struct concur__node *tl_defer_head, *tl_defer_tail;
static CONCUR__TLS_HOT bool tl_deferring;

void concur__defer_run(void)
{
	struct concur__node *n;
	while ((n = CONCUR__FIFO_POP(tl_defer_head, tl_defer_tail))) {
		void (*call)(struct concur__loop *, struct concur__node *) = n->call;
		n->call = NULL; /* free again: a task's node must have none */
		call(NULL, n);
	}
}

void concur__defer(struct concur__node *n)
{
	CONCUR__FIFO_PUSH(tl_defer_head, tl_defer_tail, n);
	if (tl_deferring)
		return; /* an outer call on this thread runs it */
	tl_deferring = true;
	concur__defer_run();
	tl_deferring = false;
}

/* ---- waiters ------------------------------------------------------------------------------- */

void concur__future_wait_final(const concur_future *f)
{
	unsigned spins = 0;
	while (!concur__is_done(f))
		concur__backoff(&spins);
}

/* Lock the list: its word (LOCKED clear), or a closed word (then not locked). */
static uintptr_t concur__waiters_lock(concur_future *f)
{
	uintptr_t old = atomic_load_explicit(&f->waiters, memory_order_relaxed);
	unsigned spins = 0;
	for (;;) {
		if (old & CONCUR__WAITERS_CLOSED)
			return old;
		if (old & CONCUR__WAITERS_LOCKED) {
			concur__backoff(&spins);
			old = atomic_load_explicit(&f->waiters, memory_order_relaxed);
			continue;
		}
		if (atomic_compare_exchange_weak_explicit(
		        &f->waiters, &old, old | CONCUR__WAITERS_LOCKED, memory_order_acquire,
		        memory_order_relaxed))
			return old;
	}
}

/*
 * A thread outside the executor is about to sleep on f's state word: say so in the waiters word,
 * which the completion closes before it makes the state final. False if the list was closed:
 * then the state is final on return, and there is nothing to sleep for.
 */
static bool concur__waiters_park(concur_future *f)
{
	uintptr_t old = atomic_load_explicit(&f->waiters, memory_order_relaxed);
	unsigned spins = 0;
	for (;;) {
		if (old & CONCUR__WAITERS_CLOSED) {
			concur__future_wait_final(f);
			return false;
		}
		if (old & CONCUR__WAITERS_PARKED)
			return true;
		if (old & CONCUR__WAITERS_LOCKED) {
			concur__backoff(&spins);
			old = atomic_load_explicit(&f->waiters, memory_order_relaxed);
			continue;
		}
		if (atomic_compare_exchange_weak_explicit(
		        &f->waiters, &old, old | CONCUR__WAITERS_PARKED, memory_order_acq_rel,
		        memory_order_relaxed))
			return true;
	}
}

/* Put w first on f's list, locked by us as word, and unlock. */
static inline void concur__waiters_link(concur_future *f, struct concur__waiter *w, uintptr_t word)
{
	struct concur__waiter *old = concur__waiters_head(word);
	w->prev = NULL;
	w->next = old;
	if (old)
		old->prev = w;
	atomic_store_explicit(
	    &f->waiters, (uintptr_t)w | (word & (CONCUR__WAITERS_PARKED | CONCUR__WAITERS_ORPHAN)),
	    memory_order_release); /* unlocks */
}

/* concur__waiter_push when the list was not free to lock at the first try. */
static __attribute__((noinline)) bool concur__waiter_push_slow(concur_future *f,
                                                               struct concur__waiter *w)
{
	uintptr_t word = concur__waiters_lock(f);
	if (word & CONCUR__WAITERS_CLOSED) {
		/* closed before the state flips (record hooks run in between): wait for it, so
		 * that whoever is told "done" finds f done */
		concur__future_wait_final(f);
		return false;
	}
	concur__waiters_link(f, w, word);
	return true;
}

bool concur__waiter_push(concur_future *f, struct concur__waiter *w)
{
	uintptr_t word = atomic_load_explicit(&f->waiters, memory_order_relaxed);
	if (CONCUR__UNLIKELY((word & (CONCUR__WAITERS_CLOSED | CONCUR__WAITERS_LOCKED)) ||
	                     !atomic_compare_exchange_strong_explicit(
	                         &f->waiters, &word, word | CONCUR__WAITERS_LOCKED,
	                         memory_order_acquire, memory_order_relaxed)))
		return concur__waiter_push_slow(f, w);
	concur__waiters_link(f, w, word);
	return true;
}

bool concur__waiter_remove(concur_future *f, struct concur__waiter *w)
{
	if (concur__waiter_take_back(f, w))
		return true;
	concur__future_wait_final(f);
	return false;
}

bool concur__waiter_take_back(concur_future *f, struct concur__waiter *w)
{
	uintptr_t word = concur__waiters_lock(f);
	if (word & CONCUR__WAITERS_CLOSED)
		return false;
	if (w->prev)
		w->prev->next = w->next;
	else
		word =
		    (uintptr_t)w->next | (word & (CONCUR__WAITERS_PARKED | CONCUR__WAITERS_ORPHAN));
	if (w->next)
		w->next->prev = w->prev;
	atomic_store_explicit(&f->waiters, word, memory_order_release); /* unlocks */
	return true;
}

bool concur__waiter_find(concur_future *f, const struct concur__waiter_ops *ops,
                         bool (*match)(const struct concur__waiter *w, const void *arg),
                         const void *arg)
{
	uintptr_t word = concur__waiters_lock(f);
	if (word & CONCUR__WAITERS_CLOSED)
		return false;
	bool found = false;
	for (struct concur__waiter *w = concur__waiters_head(word); w && !found; w = w->next)
		found = w->kind == CONCUR__WAIT_CALL && w->ops == ops && match(w, arg);
	atomic_store_explicit(&f->waiters, word, memory_order_release); /* unlocks */
	return found;
}

/*
 * Wake a thread parked on f's state word: through the loop's ring when it enters the kernel
 * anyway (concur__loop_futex_wake), else the futex syscall at once.
 */
static void concur__wake_parked(concur_future *f)
{
	struct concur__loop *loop = concur__tl_loop;
	if (loop && concur__loop_futex_wake(loop, f))
		return;
	if (loop) /* counted first: the woken thread may read the stats at once */
		concur__stat_inc(&loop->st.futex_wakes, 1);
	concur__futex_wake(&f->state, INT_MAX);
}

/*
 * Run a callback outside any task, as the header promises: a task that completes f (a promise it
 * sets, a then it fails) runs f's callbacks on its own fiber, and a callback that could suspend
 * that fiber would do so in the middle of the completion (a then's start queue, which is the
 * thread's, waiting behind it for good). A wait in a callback gets -EDEADLK instead. It runs with
 * a start queue of its own (see deferred calls), put back in front once it returns.
 */
static void concur__call_back_here(concur_done_fn fn, concur_future *f, void *arg)
{
	struct concur__task *t = concur__tl_task;
	struct concur__node *head = tl_defer_head, *tail = tl_defer_tail;
	tl_defer_head = tl_defer_tail = NULL; /* the callback's own queue (see above) */
	concur__tl_task = NULL;
	fn(f, arg);
	concur__tl_task = t;
	if (head) { /* queued before the call: started before what the callback queued */
		tail->next = tl_defer_head;
		if (!tl_defer_tail)
			tl_defer_tail = tail;
		tl_defer_head = head;
	}
}

struct concur__call_back_args {
	concur_done_fn fn;
	concur_future *f;
	void *arg;
};

static void concur__call_back_on_loop(void *p)
{
	struct concur__call_back_args *a = p;
	concur__call_back_here(a->fn, a->f, a->arg);
}

/* From a task with a small stack, on the loop's stack: a callback is anyone's code, sized for
 * none of that task's stack (concur__fiber_call_on_loop). */
static void concur__call_back(concur_done_fn fn, concur_future *f, void *arg)
{
	struct concur__task *t = concur__tl_task;
	if (CONCUR__UNLIKELY(t && !concur__task_stack_big(t))) {
		struct concur__call_back_args a = {fn, f, arg};
		concur__fiber_call_on_loop(t, concur__call_back_on_loop, &a);
		return;
	}
	concur__call_back_here(fn, f, arg);
}

/* Run the nodes of a completion that are not compositions', in registration order. */
static void concur__wake_nodes(concur_future *f, struct concur__waiter *w)
{
	while (w) {
		/* read next first: waking a node may let its owner reuse or free it */
		struct concur__waiter *next = w->next;
		switch (w->kind) {
		case CONCUR__WAIT_CALLBACK: {
			concur_done_fn fn = w->cb.fn;
			void *arg = w->cb.arg;
			free(w);
			concur__call_back(fn, f, arg);
			break;
		}
		case CONCUR__WAIT_AWAIT:
			concur__resume(w->task);
			break;
		case CONCUR__WAIT_CALL: /* not on this list */
			break;
		}
		w = next;
	}
}

/*
 * The state is made final with a store, not an exchange: the close before it is the completion's
 * one read-modify-write. Nobody else writes the state of a future being completed but a
 * concur_cancel() of a RUNNING task (CONCUR__CANCEL_REQ, a compare-exchange that fails once the
 * state is final, and is overwritten if it lands first: the task finished anyway) and an
 * executor's stop (the same bit, on the task's own loop thread, which is the one completing
 * it: never at the same time; every reader masks the state anyway), and a thread
 * parking on it said so in the waiters word before it read the state it sleeps on: the close
 * saw CONCUR__WAITERS_PARKED, or the thread finds the list closed and does not sleep.
 *
 * concur__complete_closed: the completion once the list is closed (word: what it held), for
 * all but the common cases concur__complete (below) handles itself. held: the caller keeps f
 * alive across it (its executor, see concur__complete_unhold_slow), so it needs no reference.
 */
static __attribute__((noinline)) void concur__complete_closed(concur_future *f, uintptr_t word,
                                                              int64_t res, uint32_t final_state,
                                                              bool held)
{
	struct concur__waiter *w = concur__waiters_head(word);
	bool parked = word & CONCUR__WAITERS_PARKED;
	if (CONCUR__LIKELY(!w || (!w->next && w->kind == CONCUR__WAIT_AWAIT))) {
		/* nobody, one awaiting fiber, maybe parked threads: no reference needed, no order
		 * to keep between nodes */
		atomic_store_explicit(&f->state, final_state, memory_order_release);
		if (parked)
			concur__wake_parked(f);
		if (w)
			concur__resume(w->task);
		return;
	}
	if (!w->next && w->kind == CONCUR__WAIT_CALL && !parked) {
		/* one composition (a then, a gather's count) and nothing else: its done hook is the
		 * last thing to touch f, so f needs no hold (two read-modify-writes of its count,
		 * on a line the thread that made the composition may be releasing f on) */
		if (w->ops->record)
			w->ops->record(w, f, res, final_state);
		atomic_store_explicit(&f->state, final_state, memory_order_release);
		w->ops->done(w, f);
		return;
	}
	/* the list is newest first: split it into compositions and the rest, both oldest first */
	struct concur__waiter *calls = NULL, *rest = NULL;
	bool hold = false;
	while (w) {
		struct concur__waiter *next = w->next;
		struct concur__waiter **to = w->kind == CONCUR__WAIT_CALL ? &calls : &rest;
		hold = hold || w->kind == CONCUR__WAIT_CALL || w->kind == CONCUR__WAIT_CALLBACK;
		w->next = *to;
		*to = w;
		w = next;
	}
	/* A callback or a composition may release the caller's last reference: hold f across
	 * them. (Resuming fibers needs no hold: f is not touched after the last node.) */
	hold = hold && !held;
	if (hold)
		concur_retain(f);
	for (w = calls; w; w = w->next)
		if (w->ops->record)
			w->ops->record(w, f, res, final_state);
	atomic_store_explicit(&f->state, final_state, memory_order_release);
	/* What the done hooks make ready (a then whose input this was) starts once the blocked
	 * threads are woken: a then ending unrun runs its callbacks, anyone's code, which may
	 * wait, even for one of those threads. Still before f's own callbacks (they may wait for
	 * it). */
	bool defer = !tl_deferring;
	tl_deferring = true;
	for (w = calls; w;) {
		struct concur__waiter *next = w->next; /* done may free w */
		w->ops->done(w, f);
		w = next;
	}
	if (parked)
		concur__wake_parked(f);
	if (defer) {
		concur__defer_run();
		tl_deferring = false;
	}
	concur__wake_nodes(f, rest);
	if (hold)
		concur_release(f);
}

/* The list was locked (a push or a removal under way) or changed under the first close. */
static __attribute__((noinline)) void
concur__complete_locked(concur_future *f, int64_t res, uint32_t final_state, uintptr_t closed)
{
	concur__complete_closed(f, concur__waiters_close(f, closed), res, final_state, false);
}

/* The common cases (nobody waits, or one awaiting fiber) inline, with no register saved: the
 * close at the first try, the state made final, the fiber resumed as a tail call. closed: the
 * word the list is left with (HELD: a cancel completes a future its executor holds). */
static inline void concur__complete_to(concur_future *f, int64_t res, uint32_t final_state,
                                       uintptr_t closed)
{
	f->res = res;
	uintptr_t word = atomic_load_explicit(&f->waiters, memory_order_relaxed);
	if (CONCUR__UNLIKELY((word & CONCUR__WAITERS_LOCKED) ||
	                     !atomic_compare_exchange_strong_explicit(
	                         &f->waiters, &word, closed | (word & CONCUR__WAITERS_ORPHAN),
	                         memory_order_acq_rel, memory_order_relaxed))) {
		concur__complete_locked(f, res, final_state, closed);
		return;
	}
	struct concur__waiter *w = concur__waiters_head(word);
	if (CONCUR__UNLIKELY((word & CONCUR__WAITERS_PARKED) ||
	                     (w && (w->next || w->kind != CONCUR__WAIT_AWAIT)))) {
		concur__complete_closed(f, word, res, final_state, false);
		return;
	}
	atomic_store_explicit(&f->state, final_state, memory_order_release);
	if (w)
		concur__resume(w->task);
}

void concur__complete(concur_future *f, int64_t res, uint32_t final_state)
{
	concur__complete_to(f, res, final_state, CONCUR__WAITERS_CLOSED);
}

void concur__unhold(concur_future *f)
{
	/* a cancel that won the state may not have closed the list yet: it is a few stores away */
	unsigned spins = 0;
	while (!(atomic_load_explicit(&f->waiters, memory_order_relaxed) & CONCUR__WAITERS_CLOSED))
		concur__backoff(&spins);
	if (atomic_fetch_and_explicit(&f->waiters, ~CONCUR__WAITERS_HELD, memory_order_acq_rel) &
	    CONCUR__WAITERS_ORPHAN)
		concur__free(f); /* every user released it */
}

/* Does the (closed) list run a callback, user code that may take a reference of its own? */
static bool concur__waiters_call_back(uintptr_t word)
{
	for (struct concur__waiter *w = concur__waiters_head(word); w; w = w->next)
		if (w->kind == CONCUR__WAIT_CALLBACK)
			return true;
	return false;
}

/*
 * concur__complete_unhold with someone on the list (or the list locked): the executor keeps
 * holding f across the wake-ups (the list closed HELD: a user's last release marks it ORPHAN,
 * with the count written down to 0) and lets go after.
 *
 * Callbacks are user code, and may take references of their own (f is theirs for the call), even
 * after every user released it: with one on the list, the hold becomes a counted reference before
 * they run, and from then on the count alone decides (the word closed, not HELD). While users
 * hold f, the count goes up with a compare-exchange that fails if the last one took it to 0, as
 * that one's ORPHAN mark would come after the conversion.
 */
static __attribute__((noinline)) void concur__complete_unhold_slow(concur_future *f, int64_t res,
                                                                   uint32_t final_state)
{
	uintptr_t word = concur__waiters_close(f, CONCUR__WAITERS_CLOSED | CONCUR__WAITERS_HELD);
	if (!concur__waiters_call_back(word)) {
		concur__complete_closed(f, word, res, final_state, true);
		/* no user since the close (and no callback to take a reference): ours to free */
		if (word & CONCUR__WAITERS_ORPHAN) {
			concur__destroy(f);
			return;
		}
		concur__unhold(f);
		return;
	}
	/* COUNTED, not a bare CLOSED: a user that read the count as 1 before it went up must not
	 * take the word for the executor's letting go (it writes the count down instead) */
	const uintptr_t counted = CONCUR__WAITERS_CLOSED | CONCUR__WAITERS_COUNTED;
	uint32_t users = atomic_load_explicit(&f->refs, memory_order_relaxed);
	while (!(word & CONCUR__WAITERS_ORPHAN)) {
		if (users == 0) { /* the last user let go since the close: await its mark */
			unsigned spins = 0;
			while (!(atomic_load_explicit(&f->waiters, memory_order_acquire) &
			         CONCUR__WAITERS_ORPHAN))
				concur__backoff(&spins);
			break;
		}
		if (atomic_compare_exchange_weak_explicit(
		        &f->refs, &users, users + 1, memory_order_acq_rel, memory_order_relaxed)) {
			/* no user can write the word now: none can take the count to 0 */
			atomic_store_explicit(&f->waiters, counted, memory_order_release);
			goto convert;
		}
	}
	/* no user: nobody else writes either word (a count left at 1 by a release that read it
	 * so, before the close, is stale) */
	atomic_store_explicit(&f->refs, 1, memory_order_relaxed);
	atomic_store_explicit(&f->waiters, counted, memory_order_release);
convert:
	concur__complete_closed(f, word, res, final_state, true);
	concur_release(f);
}

void concur__complete_unhold(concur_future *f, int64_t res, uint32_t final_state)
{
	f->res = res;
	uintptr_t word = atomic_load_explicit(&f->waiters, memory_order_relaxed);
	if (CONCUR__UNLIKELY((word & ~CONCUR__WAITERS_ORPHAN) ||
	                     !atomic_compare_exchange_strong_explicit(
	                         &f->waiters, &word, CONCUR__WAITERS_CLOSED, memory_order_acq_rel,
	                         memory_order_relaxed))) {
		concur__complete_unhold_slow(f, res, final_state);
		return;
	}
	/* nobody waits, and the executor let go in the close: f's users may free it from the
	 * moment its state is final -- or they all released it before, and nobody else will */
	atomic_store_explicit(&f->state, final_state, memory_order_release);
	if (CONCUR__UNLIKELY(word & CONCUR__WAITERS_ORPHAN))
		concur__destroy(f);
}

/* A PENDING future no cancel has won becomes to (a claim's, or a cancel's own) */
static inline bool concur__future_claim_as(concur_future *f, uint32_t to)
{
	uint32_t s = atomic_load_explicit(&f->state, memory_order_relaxed);
	for (;;) {
		if ((s & (CONCUR__STATE_MASK | CONCUR__COMPLETING)) != CONCUR__PENDING)
			return false;
		if (atomic_compare_exchange_weak_explicit(&f->state, &s, to, memory_order_acq_rel,
		                                          memory_order_relaxed))
			return true;
	}
}

bool concur__future_claim(concur_future *f)
{
	return concur__future_claim_as(f, CONCUR__RUNNING);
}

void concur__future_mark_queued(concur_future *f)
{
	uint32_t s = atomic_load_explicit(&f->state, memory_order_relaxed);
	while ((s & (CONCUR__STATE_MASK | CONCUR__COMPLETING)) == CONCUR__PENDING &&
	       !atomic_compare_exchange_weak_explicit(&f->state, &s, s | CONCUR__QUEUED_WORK,
	                                              memory_order_release, memory_order_relaxed))
		;
}

bool concur__future_claim_unrun(concur_future *f)
{
	/* not final yet: done must not show before the compositions recorded it */
	return concur__future_claim_as(f, CONCUR__PENDING | CONCUR__COMPLETING);
}

/* ---- promises and failed futures ----------------------------------------------------------- */

static void concur__heap_destroy(concur_future *f)
{
	free(f);
}

static const struct concur__future_class concur__promise_class = {
    .name = "promise",
    .cancel_running = NULL,
    .destroy = concur__heap_destroy,
};

concur_future *concur_promise_new(concur_exec *ex)
{
	if (ex && !concur__exec_valid(ex))
		return NULL;
	concur_future *f = malloc(sizeof(*f));
	if (!f)
		return NULL;
	concur__future_init(f, &concur__promise_class, ex, 1);
	return f;
}

int concur_promise_set(concur_future *f, int64_t res)
{
	if (!concur__valid(f) || f->cls != &concur__promise_class)
		return -EINVAL;
	bool cancel = res == -ECANCELED;
	uint32_t s = atomic_load_explicit(&f->state, memory_order_relaxed);
	for (;;) {
		if ((s & (CONCUR__STATE_MASK | CONCUR__COMPLETING)) != CONCUR__PENDING) {
			/* lost to a set or a cancel that is completing it now: once we say so, the
			 * caller must find it done */
			concur__future_wait_final(f);
			return -EALREADY;
		}
		/* RUNNING marks "being completed" so a concurrent set or cancel loses */
		if (atomic_compare_exchange_weak_explicit(
		        &f->state, &s, CONCUR__RUNNING, memory_order_acq_rel, memory_order_relaxed))
			break;
	}
	concur__complete(f, res, cancel ? CONCUR__CANCELLED : CONCUR__FINISHED);
	return 0;
}

/* When even a failed future cannot be allocated, spawn returns this one: never freed. */
static concur_future concur__enomem_future = {
    .state = CONCUR__FINISHED,
    .magic = CONCUR__FUTURE_MAGIC,
    .refs = 1u << 30,
    .res = -ENOMEM,
    .waiters = CONCUR__WAITERS_CLOSED,
    .cls = &concur__promise_class,
};

concur_future *concur__failed_future(concur_exec *ex, int64_t err)
{
	concur_future *f = concur_promise_new(concur__exec_valid(ex) ? ex : NULL);
	if (!f) {
		atomic_fetch_add(&concur__enomem_future.refs, 1);
		return &concur__enomem_future;
	}
	concur_promise_set(f, err);
	return f;
}

/* ---- the public calls ---------------------------------------------------------------------- */

bool concur_done(const concur_future *f)
{
	return concur__valid(f) && concur__is_done(f);
}

bool concur_cancelled(const concur_future *f)
{
	return concur__valid(f) && concur__state(f) == CONCUR__CANCELLED;
}

bool concur_running(const concur_future *f)
{
	return concur__valid(f) && concur__state(f) == CONCUR__RUNNING;
}

concur_exec *concur_future_exec(const concur_future *f)
{
	if (!concur__valid(f) || !f->ex)
		return NULL;
	return concur__exec_alive(f->ex, f->ex_id) ? f->ex : NULL;
}

__thread struct concur__cancel_frame *concur__tl_cancels;

int concur_cancel(concur_future *f)
{
	if (!concur__valid(f))
		return -EINVAL;
	uint32_t s = atomic_load_explicit(&f->state, memory_order_acquire);
	for (;;) {
		if (s &
		    CONCUR__COMPLETING) { /* a cancel won, or it ends unrun: a few stores away */
			concur__future_wait_final(f);
			return concur__state(f) == CONCUR__CANCELLED;
		}
		switch (s & CONCUR__STATE_MASK) {
		case CONCUR__CANCELLED:
			return 1;
		case CONCUR__FINISHED:
			return 0;
		case CONCUR__RUNNING:
			return f->cls->cancel_running ? f->cls->cancel_running(f) : 0;
		}
		/* not CANCELLED yet: done must not show before the compositions recorded it */
		if (atomic_compare_exchange_weak_explicit(
		        &f->state, &s, CONCUR__PENDING | CONCUR__COMPLETING, memory_order_acq_rel,
		        memory_order_acquire))
			break;
	}
	uint32_t closed = CONCUR__WAITERS_CLOSED | (f->cls->held ? CONCUR__WAITERS_HELD : 0);
	concur_exec *ex = f->cls->counted || (s & CONCUR__QUEUED_WORK) ? f->ex : NULL;
	if (!ex) {
		/* unhang runs after the callbacks, one of which may release the caller's reference
		 * (concur_on_done): a reference of our own keeps f across it */
		bool unhang = f->cls->unhang;
		if (unhang)
			concur_retain(f);
		concur__complete_to(f, -ECANCELED, CONCUR__CANCELLED, closed);
		if (unhang) {
			f->cls->unhang(f);
			concur_release(f);
		}
		return 1;
	}
	/* A queued task or op: its executor still holds it, and lets go when it dequeues it --
	 * as soon as the list is closed, while the callbacks may still run here. They are work
	 * of ex, as those of a task's end are: counted, or a join could return (and a free free
	 * ex) under a callback that goes on to spawn. This thread's join or free of ex would
	 * wait for itself meanwhile: they get -EDEADLK, as in a blocking job of ex. (ex is alive:
	 * f is its counted work until the drop, which waits for the close below. A then or
	 * spawn_after task waiting for its inputs is no work of ex yet, which may be gone; one
	 * queued since is, and says so in its state: CONCUR__QUEUED_WORK, set as it becomes
	 * that work (just before it is counted: its enqueuer holds ex alive meanwhile), read by
	 * the exchange above; so does a blocking job's future.) */
	struct concur__cancel_frame frame = {ex, concur__tl_cancels};
	bool dequeue = f->cls->dequeue && (s & CONCUR__QUEUED_WORK);
	concur__work_begin(ex);
	concur__tl_cancels = &frame;
	if (dequeue)
		concur_retain(f); /* across the callbacks, as for unhang above */
	concur__complete_to(f, -ECANCELED, CONCUR__CANCELLED, closed);
	if (dequeue) {
		f->cls->dequeue(f);
		concur_release(f);
	}
	concur__tl_cancels = frame.up;
	concur__work_end(ex);
	return 1;
}

int concur_on_done(concur_future *f, concur_done_fn fn, void *arg)
{
	if (!concur__valid(f) || !fn)
		return -EINVAL;
	struct concur__waiter *w = malloc(sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->kind = CONCUR__WAIT_CALLBACK;
	w->cb.fn = fn;
	w->cb.arg = arg;
	if (!concur__waiter_push(f, w)) {
		free(w);
		concur_retain(f); /* fn may release the caller's last reference */
		concur__call_back(fn, f, arg);
		concur_release(f);
	}
	return 0;
}

/* A thread outside the executor: spin briefly (a wake-up costs tens of µs here), then park. */
/* Out of line, so that concur_result's other cases save no register. */
static __attribute__((noinline)) int64_t concur__block(concur_future *f, int64_t timeout_ns)
{
	struct timespec abs;
	if (timeout_ns > 0)
		concur__deadline(&abs, timeout_ns);
	concur__defer_run(); /* what f may be waiting for, made ready on this thread */
	for (int i = 0; i < 2000; i++) {
		if (concur__is_done(f))
			return concur__future_value(f);
		concur__cpu_relax();
	}
	/* parked first, the state read after: a completion that closed the list before we parked
	 * has its state final by then, one that closes it after wakes us once it is final */
	if (!concur__waiters_park(f))
		return concur__future_value(f);
	for (;;) {
		uint32_t s = atomic_load_explicit(&f->state, memory_order_acquire);
		if ((s & CONCUR__STATE_MASK) >= CONCUR__FINISHED)
			return concur__future_value(f);
		int r = concur__futex_wait(&f->state, s, timeout_ns > 0 ? &abs : NULL);
		if (r == -ETIMEDOUT)
			return concur__is_done(f) ? concur__future_value(f) : -ETIMEDOUT;
	}
}

int64_t concur_result(concur_future *f, int64_t timeout_ns)
{
	if (!concur__valid(f))
		return -EINVAL;
	if (concur__is_done(f))
		return concur__future_value(f);
	if (f == concur__self()) /* a task or a blocking job waiting for itself: for good */
		return -EDEADLK;
	if (timeout_ns == 0)
		return -ETIMEDOUT;
	if (concur__tl_task)
		return concur__await(f, timeout_ns);
	if (concur__tl_loop)
		return -EDEADLK; /* a callback on a loop thread: blocking would stop the loop */
	return concur__block(f, timeout_ns);
}

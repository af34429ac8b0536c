/* SPDX-License-Identifier: MIT */
/*
 * A loop: one thread, one io_uring. It goes round a circle:
 *
 *   1. run the fibers on its run queues, with a budget so I/O is never starved;
 *   2. take what other threads left in its inbox, and hand spare unstarted tasks to idle loops;
 *   3. submit and reap in one io_uring_enter -- sleeping in it when there is nothing to run
 *      (concur__loop_sleep, the only place a loop ever sleeps);
 *   4. hand each CQE to its owner (an op's handler, which completes its future with
 *      concur__complete_unhold(); a task awaiting its own op, resumed with concur__resume();
 *      or a message: a task to run, a chain of tasks, a future to release).
 *
 * Crossing threads: a loop reaches another loop with IORING_OP_MSG_RING: the message is a CQE
 * in the target's ring and the SQE rides the sender's next submit. A thread outside the executor
 * pushes onto the loop's inbox (a lock-free LIFO, reversed when drained) and rings the loop only
 * if it is asleep, with a MSG_RING from the executor's doorbell ring (one per executor, made
 * before the loops start, shared under a lock): no thread needs a ring of its own, so a post
 * cannot fail for want of an fd or memory.
 *
 * No wake-up is lost: whoever exchanges a loop's `sleeping` flag from 1 to 0 sends the wake, and
 * a wake that fails for a transient reason (no memory, a full CQ pushing back) is sent again.
 * A MSG_RING whose target CQ overflowed is fine as it is: that target is awake.
 *
 * Back-pressure: every submit's result is looked at. When the kernel takes nothing (a full CQ,
 * no memory for a request), the loop moves CQEs out of its CQ into a stash that the next reap
 * dispatches first, or waits for one in io_uring_enter: it neither spins nor loses an SQE.
 */
#include "internal.h"

#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* Runnables per turn before looking at I/O again: each turn ends in an io_uring_enter, a
 * syscall costing as much as ~10 awaited NOPs' user time here, so a turn of 128 (a submit of up
 * to 128 SQEs, as the raw liburing peer batches) took 5 % off await_nop/128 against 64, and
 * still looks at I/O after at most 128 runs (tokio 61, Seastar after 0.5 ms). */
#define CONCUR__RUN_BUDGET 128
#define CONCUR__REAP_BATCH 64
/*
 * A fed loop watches its inbox before sleeping: CONCUR__INBOX_SPIN pauses (~1 µs), enough for a
 * thread that waits for each answer before it posts again, then sched_yield()s until
 * CONCUR__INBOX_WATCH_NS have passed (~20 yields on a CPU nobody else wants). A pause keeps the
 * CPU from whoever else is runnable there -- with one loop per CPU, that is the very thread
 * feeding the loops, which then ran about half the time (a pipeline of then()s from main took
 * 1.5x as long as with the yields, 10^6 spawns from main 2x) -- while a yield hands it over,
 * and is a cheap syscall when nobody wants it. The watch is bounded in time, not in yields: a
 * yield may give the CPU away for a whole time slice, and a loop that yielded is not woken by
 * its completions as a sleeping one is; it also ends as soon as completions are waiting.
 *
 * A loop that has just handled completions watches the same way for the executor's
 * idle_poll_ns, if set (concur_exec_opts): a connection's next request often comes within
 * microseconds of its reply, and caught there it costs no sleep and no wake-up -- a context
 * switch here, and a wake-up on the sender's CPU, which over loopback is the client's (RESP
 * under redis-benchmark, one loop, medians against redis-server in the same runs: 20 µs took
 * concur from 0.95x its requests per second to 1.12x, and its CPU time from 0.95x to 1.16x;
 * bench/README). Off by default: the CPU is the user's call.
 */
#define CONCUR__INBOX_SPIN     32
#define CONCUR__INBOX_WATCH_NS 10000

static void concur__ignore_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                               uint32_t cqe_flags)
{
}

struct concur__op concur__ignore_op = {.cqe = concur__ignore_cqe};

int (*concur__submit_fault)(struct concur__loop *loop);

/* The kernel may succeed later: no memory for now, a full CQ pushing back, a signal. */
static bool concur__transient(int r)
{
	return r == -EINTR || r == -EAGAIN || r == -EBUSY || r == -ENOMEM;
}

/* ---- submitting (loop thread only) ---------------------------------------------------------- */

enum concur__submit_how { CONCUR__SUBMIT, CONCUR__SUBMIT_GET_EVENTS, CONCUR__SUBMIT_WAIT };

/* Every submit of a loop's ring goes through here. A failed submit leaves its SQEs queued
 * (liburing has published them): the next submit takes them again. */
static int concur__submit(struct concur__loop *loop, enum concur__submit_how how)
{
	int r;
	if (CONCUR__UNLIKELY(concur__submit_fault != NULL) && (r = concur__submit_fault(loop)))
		return r;
	if (how == CONCUR__SUBMIT_WAIT)
		r = io_uring_submit_and_wait(&loop->ring, 1);
	else if (how == CONCUR__SUBMIT_GET_EVENTS)
		r = io_uring_submit_and_get_events(&loop->ring);
	else
		r = io_uring_submit(&loop->ring);
	concur__stat_inc(&loop->st.enters, 1);
	if (!io_uring_sq_ready(&loop->ring))
		loop->sq_emptied++;
	return r;
}

/* Room for n more CQEs in the stash; false if memory ran out (the caller waits and retries). */
static bool concur__stash_room(struct concur__loop *loop, unsigned n)
{
	if (loop->stash_cap - loop->stash_len >= n)
		return true;
	unsigned cap = loop->stash_cap ? loop->stash_cap : 64;
	while (cap - loop->stash_len < n)
		cap *= 2;
	struct concur__cqe *p = realloc(loop->stash, cap * sizeof(*p));
	if (!p)
		return false;
	loop->stash = p;
	loop->stash_cap = cap;
	return true;
}

/*
 * Move the CQEs out of the CQ (and the kernel's overflow list) into the stash, in order. This
 * may run on a task's stack, as small as 1 KiB (an op whose SQE finds the SQ full): it copies
 * straight from the ring, with no array of its own, and the stash is made at setup with room
 * for a whole CQ, so only a second fill before the loop's reap grows it.
 */
static unsigned concur__stash_cqes(struct concur__loop *loop)
{
	struct io_uring *ring = &loop->ring;
	unsigned moved = 0;
	for (;;) {
		unsigned ready = io_uring_cq_ready(ring);
		if (!ready && (IO_URING_READ_ONCE(*ring->sq.kflags) & IORING_SQ_CQ_OVERFLOW)) {
			(void)io_uring_get_events(ring); /* the overflowed ones into the CQ */
			ready = io_uring_cq_ready(ring);
		}
		if (ready && !concur__stash_room(loop, ready))
			ready = loop->stash_cap - loop->stash_len;
		if (!ready)
			return moved;
		unsigned head, n = 0;
		struct io_uring_cqe *cqe;
		io_uring_for_each_cqe(ring, head, cqe)
		{
			if (n == ready)
				break;
			loop->stash[loop->stash_len++] =
			    (struct concur__cqe){cqe->user_data, cqe->res, cqe->flags};
			n++;
		}
		io_uring_cq_advance(ring, n);
		moved += n;
	}
}

/*
 * A submit took nothing because the kernel pushes back. Make room for its completions: move
 * the CQEs into the stash; with none to move (or no memory for the stash), wait in
 * io_uring_enter for a new CQE -- at most 1 ms, as nothing may be coming.
 */
static void concur__relieve(struct concur__loop *loop)
{
	if (concur__stash_cqes(loop))
		return;
	struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 1000000};
	struct io_uring_cqe *cqe;
	io_uring_wait_cqes(&loop->ring, &cqe, io_uring_cq_ready(&loop->ring) + 1, &ts, NULL);
	concur__stash_cqes(loop);
}

void concur__sq_reserve(struct concur__loop *loop, unsigned n)
{
	while (io_uring_sq_space_left(&loop->ring) < n) {
		int r = concur__submit(loop, CONCUR__SUBMIT);
		if (io_uring_sq_space_left(&loop->ring) >= n)
			break;
		if (loop->ring.flags & IORING_SETUP_SQPOLL) /* the kernel thread takes them */
			io_uring_sqring_wait(&loop->ring);
		else if (r <= 0 || concur__transient(r))
			concur__relieve(loop);
	}
}

void concur__loop_flush(struct concur__loop *loop)
{
	while (io_uring_sq_ready(&loop->ring)) {
		int r = concur__submit(loop, CONCUR__SUBMIT);
		if (!io_uring_sq_ready(&loop->ring))
			break;
		if (loop->ring.flags & IORING_SETUP_SQPOLL) /* the kernel thread takes them */
			sched_yield();
		else if (r <= 0 || concur__transient(r))
			concur__relieve(loop);
	}
}

struct io_uring_sqe *concur__sqe_slow(struct concur__loop *loop)
{
	concur__sq_reserve(loop, 1);
	return io_uring_get_sqe(&loop->ring);
}

/* ---- run queues (loop thread only) ---------------------------------------------------------- */

/* Unstarted tasks: a deque. Local spawns go to the front (depth first, so a task waiting on
 * its children finds them next and few fibers are suspended at once); tasks from elsewhere go
 * to the back; idle loops are handed the oldest, from the back. */
void concur__loop_push_fresh(struct concur__loop *loop, struct concur__task *t, bool front)
{
	struct concur__node *n = &t->node;
	if (front) {
		n->prev = NULL;
		n->next = loop->fresh_head;
		if (loop->fresh_head)
			loop->fresh_head->prev = n;
		else
			loop->fresh_tail = n;
		loop->fresh_head = n;
	} else {
		CONCUR__DQ_PUSH_BACK(loop->fresh_head, loop->fresh_tail, n);
		loop->fresh_behind_mark++;
	}
	loop->nfresh++;
}

static struct concur__task *concur__pop_fresh(struct concur__loop *loop)
{
	struct concur__node *n = loop->fresh_head;
	if (!n)
		return NULL;
	if (n == loop->fresh_mark)
		loop->fresh_mark = NULL;
	loop->fresh_head = n->next;
	if (n->next)
		n->next->prev = NULL;
	else
		loop->fresh_tail = NULL;
	loop->nfresh--;
	return concur__task_of_node(n);
}

static struct concur__task *concur__pop_runnable(struct concur__loop *loop)
{
	struct concur__node *n = CONCUR__FIFO_POP(loop->ready_head, loop->ready_tail);
	if (n)
		return concur__task_of_node(n);
	return concur__pop_fresh(loop);
}

/* A task that will not run (a cancel completed it while queued): the executor lets go of it,
 * and it no longer counts as work. On the task's loop, which belongs to its executor: the end
 * is counted there (concur__work_end's own case, without the call). */
static void concur__task_drop(struct concur__loop *loop, struct concur__task *t)
{
	concur__unhold(&t->f);
	concur__work_end_local(loop);
}

/* Give an unstarted task the fiber fib (NULL: no stack could be had), shutdown(ex, true) not
 * seen. False if it is not to run (cancelled, no memory). */
static bool concur__task_begin(struct concur__loop *loop, struct concur__task *t,
                               struct concur__fiber *fib)
{
	t->loop = loop; /* before the claim: a concurrent concur_cancel reads it once RUNNING */
	if (!fib) { /* it never runs: never RUNNING either (a cancel meanwhile waits for the end) */
		concur__task_end_unrun(t, -ENOMEM, CONCUR__FINISHED);
		concur__work_end_local(loop);
		return false;
	}
	if (!concur__future_claim(&t->f)) {
		concur__fiber_put(loop, fib);
		concur__task_drop(loop, t); /* cancelled while queued: its waiters know already */
		return false;
	}
	t->fib = fib;
	concur__fiber_prepare(fib, t);
	concur__ctl_start(fib);
	concur__stat_inc(&loop->st.tasks_run, 1);
	return true;
}

/* Give an unstarted task its fiber. False if it is not to run (cancelled, no memory). */
static bool concur__task_start(struct concur__loop *loop, struct concur__task *t)
{
	if (CONCUR__UNLIKELY(
	        atomic_load_explicit(&loop->ex->cancel_pending, memory_order_relaxed))) {
		/* shutdown(ex, true): end it CANCELLED without running (or a cancel did) */
		concur__task_end_unrun(t, -ECANCELED, CONCUR__CANCELLED);
		concur__work_end_local(loop);
		return false;
	}
	return concur__task_begin(loop, t, concur__fiber_get(loop, t));
}

void concur__loop_task_end(struct concur__loop *loop, struct concur__task *t, bool put)
{
	struct concur__task *awaiter = t->fib->awaiter;
	concur__ctl_end(loop, t);
	if (put) /* first: callbacks run on the loop's stack, and a task they spawn can reuse it */
		concur__fiber_put(loop, t->fib);
	t->fib = NULL;
	if (awaiter) /* queued first: the list was empty when it began to wait */
		concur__loop_push_ready(loop, awaiter);
	concur__complete_unhold(&t->f, t->f.res,
	                        t->f.res == -ECANCELED ? CONCUR__CANCELLED : CONCUR__FINISHED);
	concur__work_end_local(loop);
}

struct concur__task *concur__loop_start_direct(struct concur__loop *loop)
{
	concur__tl_task = NULL; /* a failed start completes the task: its callbacks see the loop */
	/* A start that ends the task unrun -- cancelled by shutdown(ex, true), or no stack to be
	 * had -- runs its callbacks, which would run here, on a fiber that may be suspending
	 * mid-function: such starts are left to the loop's context. */
	if (CONCUR__UNLIKELY(atomic_load_explicit(&loop->ex->cancel_pending, memory_order_relaxed)))
		return NULL;
	struct concur__task *t;
	while (loop->budget > 1 && loop->fresh_head &&
	       concur__task_stack_big(t = concur__task_of_node(loop->fresh_head))) {
		concur__pop_fresh(loop);
		struct concur__fiber *fib = concur__fiber_get(loop, t);
		if (CONCUR__UNLIKELY(!fib)) {
			concur__loop_push_fresh(loop, t, true); /* back where it was */
			return NULL;
		}
		loop->budget--;
		if (concur__task_begin(loop, t, fib)) {
			concur__stat_inc(&loop->st.direct_starts, 1);
			return t;
		}
	}
	return NULL;
}

bool concur__loop_start_awaited(struct concur__loop *loop, struct concur__task *w,
                                struct concur__task *t)
{
	/* the conditions of the start concur__loop_pop_direct would make at w's suspend; the
	 * switch to t is charged there */
	if (loop->fresh_head != &t->node || loop->ready_head || loop->budget <= 1 ||
	    !concur__task_stack_big(t) || !concur__task_stack_big(w) ||
	    !concur__fiber_room_to_start(w->fib) ||
	    atomic_load_explicit(&loop->stall_on, memory_order_relaxed) ||
	    atomic_load_explicit(&loop->ex->cancel_pending, memory_order_relaxed))
		return false;
	concur__pop_fresh(loop);
	struct concur__fiber *fib = concur__fiber_get(loop, t);
	if (CONCUR__UNLIKELY(!fib)) {
		concur__loop_push_fresh(loop, t, true); /* back where it was */
		return false;
	}
	if (!concur__task_begin(loop, t, fib))
		return false; /* cancelled while queued, and dropped */
	concur__stat_inc(&loop->st.direct_starts, 1);
	concur__loop_push_ready(loop, t);
	return true;
}

static void concur__run_queues(struct concur__loop *loop)
{
	for (loop->budget = CONCUR__RUN_BUDGET; loop->budget; loop->budget--) {
		struct concur__task *t = concur__pop_runnable(loop);
		if (!t)
			break;
		if (!t->fib && !concur__task_start(loop, t))
			continue;
		int64_t t0 = concur__stall_begin(loop); /* 0 unless a stall detector is set */
		/* the fiber back here, after direct switches; NULL if it finished on its own */
		t = concur__fiber_run(loop, t);
		if (t0)
			concur__stall_end(loop, t0);
		if (t && (t->f.flags & CONCUR__TASK_RETURNED))
			concur__loop_task_end(loop, t, true);
	}
	if (loop->yielded_head) { /* the tasks that yielded this turn are ready for the next */
		if (loop->ready_tail)
			loop->ready_tail->next = loop->yielded_head;
		else
			loop->ready_head = loop->yielded_head;
		loop->ready_tail = loop->yielded_tail;
		loop->yielded_head = loop->yielded_tail = NULL;
	}
}

/* ---- messages ------------------------------------------------------------------------------- */

/* Post a CQE into another loop's ring. It rides our next submit; success posts no CQE here. */
static void concur__msg_ring(struct concur__loop *from, struct concur__loop *to, uint64_t payload,
                             uint32_t len, uint64_t on_failure)
{
	struct io_uring_sqe *sqe = concur__sqe(from);
	CONCUR__TSAN_RELEASE(payload & ~(uint64_t)CONCUR__TAG_MASK);
	io_uring_prep_msg_ring(sqe, to->ring_fd, len, payload, 0);
	sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
	io_uring_sqe_set_data64(sqe, on_failure);
	concur__stat_inc(&from->st.msg_ring, 1);
}

/*
 * When the loop has SQEs queued, it enters the kernel for them at the end of its turn anyway:
 * an IORING_OP_FUTEX_WAKE rides that submit and costs no syscall of its own. Otherwise the
 * caller makes the futex syscall, at once: a ring wake would need an enter just for itself and
 * was measured slower (xwake with the waiter forced to park, 2-core VM, kernel 6.18: 2.0-3.3 us
 * a round trip through the ring, 1.7-2.1 us with the syscall), and the parked thread is waiting
 * for exactly this.
 *
 * The SQE holds no reference to f. A thread parked on f holds one while it sleeps, so f outlives
 * every wake somebody waits for; a wake issued after f was freed (its waiter timed out and let go)
 * names a private futex, an address, and at worst wakes whoever sleeps on that word now, which
 * every futex waiter takes as spurious. A reference held by the SQE would leave f owned by the
 * ring alone after a join returned, a leak to LeakSanitizer until the loop reaped the CQE.
 */
bool concur__loop_futex_wake(struct concur__loop *loop, concur_future *f)
{
	/* Not from a task (or a task's end): the loop's next submit may be a whole task away --
	 * one that runs for seconds, or waits on the parked thread by other means. */
	if (!loop->reaping || !loop->ex->has_futex_wake || !io_uring_sq_ready(&loop->ring))
		return false;
	loop->futex_wake_queued = true;
	struct io_uring_sqe *sqe = concur__sqe(loop);
	io_uring_prep_rw(CONCUR__OP_FUTEX_WAKE, sqe,
	                 CONCUR__FUTEX2_SIZE_U32 | CONCUR__FUTEX2_PRIVATE, &f->state, 0, INT_MAX);
	sqe->addr3 = FUTEX_BITSET_MATCH_ANY;
	sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
	concur__sqe_set_uncounted(sqe, &concur__ignore_op);
	concur__stat_inc(&loop->st.futex_ring_wakes, 1);
	concur__stat_inc(&loop->st.futex_wakes, 1);
	return true;
}

/* Wake loop `to` from loop `from`, of the same executor. If the message fails, the CQE says so
 * and it goes again (concur__dispatch). */
static void concur__wake(struct concur__loop *from, struct concur__loop *to)
{
	concur__msg_ring(from, to, CONCUR__TAG_DOORBELL, 0,
	                 (uint64_t)(uintptr_t)to | CONCUR__TAG_DOORBELL);
}

/* A node has reached its loop's thread. */
static void concur__node_arrived(struct concur__loop *loop, struct concur__node *n)
{
	if (n->call) {
		n->call(loop, n);
		return;
	}
	struct concur__task *t = concur__task_of_node(n);
	if (t->fib || (t->f.flags & CONCUR__TASK_PINNED)) /* pinned: out of the handoff's reach */
		concur__loop_push_ready(loop, t);
	else
		concur__loop_push_fresh(loop, t, false);
}

/*
 * A post into an inbox from a thread outside the target's executor touches the loop (its
 * sleeping flag, the doorbell) after the node is visible, and by then the node may have run, the
 * executor's last work ended, a join returned and the executor been freed. So such a poster
 * names the loop in a slot of its own while it posts (thread-local: two plain stores, no shared
 * line written), and concur_exec_free waits until no slot names one of its loops
 * (concur__loop_quiesce). The slots are listed once per thread and unlisted when it exits; a
 * thread that cannot be listed (no memory for its key, or posting from a destructor after ours
 * ran) counts itself in concur__posters_unlisted instead.
 */
struct concur__poster {
	_Atomic(struct concur__loop *) loop; /* posting into it now; NULL between posts */
	struct concur__poster *prev, *next;
	int state; /* 0: not listed yet; 1: listed; 2: unlisted for good (its thread exits) */
};
static CONCUR__TLS_HOT struct concur__poster concur__tl_poster;
static struct concur__poster concur__posters = {.prev = &concur__posters, .next = &concur__posters};
static pthread_mutex_t concur__posters_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic long concur__posters_unlisted;
static pthread_key_t concur__poster_key;
static pthread_once_t concur__poster_once = PTHREAD_ONCE_INIT;
static bool concur__poster_key_ok;

static void concur__poster_unlist(void *slot)
{
	struct concur__poster *p = slot;
	pthread_mutex_lock(&concur__posters_lock);
	p->prev->next = p->next;
	p->next->prev = p->prev;
	pthread_mutex_unlock(&concur__posters_lock);
	p->state = 2;
}

/* fork(): the child has one thread. The other threads' slots (on their stacks, which the child
 * may unmap) leave the list, and none of them is posting there. */
static void concur__posters_forked(void)
{
	struct concur__poster *p = &concur__tl_poster;
	concur__posters.prev = concur__posters.next = &concur__posters;
	atomic_store_explicit(&concur__posters_unlisted, 0, memory_order_relaxed);
	if (p->state == 1) {
		p->prev = p->next = &concur__posters;
		concur__posters.prev = concur__posters.next = p;
	}
}

static void concur__poster_key_init(void)
{
	concur__fork_guard(&concur__posters_lock, concur__posters_forked);
	concur__poster_key_ok = !pthread_key_create(&concur__poster_key, concur__poster_unlist);
}

/* This thread's slot, listed; NULL if it cannot be (then it counts itself unlisted). */
static struct concur__poster *concur__poster_slot(void)
{
	struct concur__poster *p = &concur__tl_poster;
	if (CONCUR__LIKELY(p->state == 1))
		return p;
	if (p->state == 2)
		return NULL;
	pthread_once(&concur__poster_once, concur__poster_key_init);
	/* a non-NULL value, so the key's destructor unlists the slot when the thread exits */
	if (!concur__poster_key_ok || pthread_setspecific(concur__poster_key, p))
		return NULL;
	pthread_mutex_lock(&concur__posters_lock);
	p->next = &concur__posters;
	p->prev = concur__posters.prev;
	p->prev->next = p;
	concur__posters.prev = p;
	pthread_mutex_unlock(&concur__posters_lock);
	p->state = 1;
	return p;
}

struct concur__poster *concur__loop_pin(struct concur__loop *loop)
{
	struct concur__poster *slot = concur__poster_slot();
	if (slot)
		atomic_store_explicit(&slot->loop, loop, memory_order_seq_cst);
	else
		atomic_fetch_add_explicit(&concur__posters_unlisted, 1, memory_order_seq_cst);
	return slot;
}

void concur__loop_unpin(struct concur__poster *slot)
{
	if (slot)
		atomic_store_explicit(&slot->loop, NULL, memory_order_release);
	else
		atomic_fetch_sub_explicit(&concur__posters_unlisted, 1, memory_order_release);
}

static void concur__inbox_push(struct concur__loop *loop, struct concur__node *n)
{
	struct concur__loop *me = concur__tl_loop;
	/* a loop of the same executor is stopped (joined) before the executor is freed; another
	 * pins the loop, made visible with the node by the push's exchange (and the join after) */
	bool outside = !me || me->ex != loop->ex;
	struct concur__poster *slot = outside ? concur__loop_pin(loop) : NULL;
	struct concur__node *old = atomic_load_explicit(&loop->inbox, memory_order_relaxed);
	do
		n->next = old;
	while (!atomic_compare_exchange_weak_explicit(&loop->inbox, &old, n, memory_order_seq_cst,
	                                              memory_order_relaxed));
	/* Ring only a sleeping loop, once per sleep: the exchange makes us the one who rings. A
	 * busy loop drains its inbox every turn, so a burst of posts costs no syscall. */
	if (atomic_load_explicit(&loop->sleeping, memory_order_seq_cst) &&
	    atomic_exchange_explicit(&loop->sleeping, 0, memory_order_seq_cst)) {
		/* Another executor's loop is rung while pinned, through its doorbell ring: a
		 * message from our ring could fail after the pin is gone, and its retry (at our
		 * CQE) would name a loop that may be freed by then. */
		if (!outside)
			concur__wake(me, loop);
		else
			concur__loop_ring_doorbell(loop);
	}
	if (outside) /* done with the loop: from here it may be freed */
		concur__loop_unpin(slot);
}

void concur__loop_quiesce(concur_exec *ex)
{
	for (;;) {
		bool busy = atomic_load_explicit(&concur__posters_unlisted, memory_order_acquire);
		pthread_mutex_lock(&concur__posters_lock);
		for (struct concur__poster *p = concur__posters.next;
		     !busy && p != &concur__posters; p = p->next) {
			struct concur__loop *l =
			    atomic_load_explicit(&p->loop, memory_order_acquire);
			for (unsigned i = 0; l && i < ex->nloops; i++)
				busy = busy || l == ex->loops[i];
		}
		pthread_mutex_unlock(&concur__posters_lock);
		if (!busy)
			break;
		sched_yield(); /* a poster a few instructions from done, or ringing */
	}
	for (unsigned i = 0; i < ex->nloops; i++) {
		struct concur__loop *loop = ex->loops[i];
		struct concur__node *n =
		    atomic_exchange_explicit(&loop->inbox, NULL, memory_order_acquire);
		for (n = CONCUR__LIST_REVERSE(n); n;) {
			struct concur__node *next = n->next;
			/* only messages can come after the last turn (every task is counted work,
			 * and the join waited for it): each is about something that is over, and
			 * lets go */
			if (n->call)
				n->call(loop, n);
			n = next;
		}
	}
}

void concur__loop_post(struct concur__loop *loop, struct concur__node *n)
{
	struct concur__loop *me = concur__tl_loop;
	if (me == loop)
		concur__node_arrived(loop, n);
	else if (me) {
		/* in flight, no list holds it: its link keeps the target, should the MSG_RING fail
		 */
		n->next = (struct concur__node *)(void *)loop;
		concur__msg_ring(me, loop, (uint64_t)(uintptr_t)n | CONCUR__TAG_NODE, 0,
		                 (uint64_t)(uintptr_t)n | CONCUR__TAG_NODE_FAILED);
	} else
		concur__inbox_push(loop, n);
}

static bool concur__drain_inbox(struct concur__loop *loop)
{
	if (!atomic_load_explicit(&loop->inbox, memory_order_relaxed))
		return false;
	struct concur__node *n = atomic_exchange_explicit(&loop->inbox, NULL, memory_order_acquire);
	struct concur__node *fifo = CONCUR__LIST_REVERSE(n); /* newest first: reverse */
	uint64_t count = 0;
	while (fifo) {
		struct concur__node *next = fifo->next;
		concur__node_arrived(loop, fifo);
		fifo = next;
		count++;
	}
	concur__stat_inc(&loop->st.inbox_items, count);
	return true;
}

/* Claim an idle loop for a message: asleep (its `sleeping` flag; the message is its wake) or
 * watching before a sleep (`watching`: the message's CQE ends the watch). The first looks are
 * seq_cst, as an inbox push's is (concur__inbox_push): after the caller's own seq_cst store (a
 * stop's `stopping`), either it sees the flag or the loop, which stores the flag before it looks,
 * sees the caller's store. (A plain load on x86; a relaxed one could pass the store on arm64.) */
static bool concur__claim_idle(struct concur__loop *idle)
{
	return (atomic_load_explicit(&idle->sleeping, memory_order_seq_cst) &&
	        atomic_exchange_explicit(&idle->sleeping, 0, memory_order_seq_cst)) ||
	       (atomic_load_explicit(&idle->watching, memory_order_seq_cst) &&
	        atomic_exchange_explicit(&idle->watching, 0, memory_order_seq_cst));
}

/* The first of the fresh tasks to hand off: about the older half. */
static struct concur__node *concur__handoff_cut(struct concur__loop *loop, size_t *k)
{
	/* A task spawning many (concur__loop_share) hands off, spawns as many again while the
	 * other loop runs them, hands off again: the tasks behind the last handoff's front are
	 * the older part, found without a walk (a walk over a fan-out's queue was 10-17 % of the
	 * spawning loop's time). Unless they are too few to be worth a message, or nearly all. */
	size_t behind = loop->fresh_behind_mark;
	if (loop->fresh_mark && behind >= loop->nfresh / 4 &&
	    behind <= loop->nfresh - loop->nfresh / 4 && behind < loop->nfresh) {
		*k = behind;
		return loop->fresh_mark;
	}
	/* Else the half, found from the front: the newer half was written last, so it is still
	 * in this CPU's cache, where the older may not be (and its receiver reads that anyway). */
	*k = loop->nfresh / 2;
	struct concur__node *first = loop->fresh_head;
	for (size_t j = *k; j < loop->nfresh; j++)
		first = first->next;
	return first;
}

/* The loop with spare unstarted tasks hands the older half to one idle loop. The busy side
 * starts it, so an idle loop never has to poll for work; the tasks travel as one MSG_RING. */
static bool concur__handoff(struct concur__loop *loop)
{
	concur_exec *ex = loop->ex;
	for (unsigned i = 1; i < ex->nloops; i++) {
		struct concur__loop *idle = ex->loops[(loop->idx + i) % ex->nloops];
		if (!concur__claim_idle(idle))
			continue;
		concur__work_publish(loop); /* a task may end on the other loop */
		size_t k;
		struct concur__node *first = concur__handoff_cut(loop, &k);
		/* detach first..tail; the chain is linked by next, oldest last */
		if (first->prev)
			first->prev->next = NULL;
		else
			loop->fresh_head = NULL;
		struct concur__node *last = loop->fresh_tail;
		loop->fresh_tail = first->prev;
		loop->nfresh -= k;
		loop->fresh_mark = loop->fresh_head;
		loop->fresh_behind_mark = loop->nfresh;
		/* the chain's last node, for the receiver to splice it in whole */
		first->prev = last;
		concur__msg_ring(loop, idle, (uint64_t)(uintptr_t)first | CONCUR__TAG_HANDOFF,
		                 (uint32_t)k,
		                 (uint64_t)(uintptr_t)first | CONCUR__TAG_HANDOFF_FAILED);
		concur__stat_inc(&loop->st.steals, k);
		loop->share_backoff = 0;
		return true;
	}
	return false;
}

/*
 * A task spawning many without yielding (a fan-out in one go) would keep all it spawns to its
 * loop until it yields, with the other loops asleep: past CONCUR__SHARE_AT unstarted tasks a
 * sleeping loop is handed half at once, as the loop's next turn would, and the message goes out
 * now (as Go wakes an idle P on `go`). Loop thread, inside a task.
 */
void concur__loop_share(struct concur__loop *loop)
{
	if (!atomic_load_explicit(&loop->ex->nsleeping, memory_order_relaxed))
		return;
	if (!concur__handoff(loop)) {
		loop->share_backoff = loop->nfresh; /* the next try, CONCUR__SHARE_AT spawns on */
		return;
	}
	/* If this submit fails, the message waits for the turn's flush, as it did when handoffs
	 * came only between turns (the loop claimed sleeps on until then). */
	(void)concur__submit(loop, CONCUR__SUBMIT);
}

/*
 * A chain of k unstarted tasks handed off (concur__handoff), or given back to the sender by a
 * failed MSG_RING (k unknown: 0, counted here), goes behind our fresh tasks in one splice: the
 * sender left the chain's last node in first->prev, so no task record is touched but the first
 * (records handed off in bulk are cold: walking them cost a miss each).
 */
static void concur__take_chain(struct concur__loop *loop, struct concur__node *first, size_t k)
{
	struct concur__node *last = first->prev;
	if (!k)
		for (struct concur__node *n = first; n; n = n->next)
			k++;
	first->prev = loop->fresh_tail;
	if (loop->fresh_tail)
		loop->fresh_tail->next = first;
	else
		loop->fresh_head = first;
	loop->fresh_tail = last;
	loop->nfresh += k;
	loop->fresh_behind_mark += k;
}

/* ---- CQEs ------------------------------------------------------------------------------------ */

/* Does this CQE retire an SQE counted in flight (concur__sqe_count)? Its last CQE does. */
static bool concur__retires(uint64_t ud, uint32_t flags)
{
	uint64_t tag = ud & CONCUR__TAG_MASK;
	return (tag == CONCUR__TAG_OP || tag == CONCUR__TAG_TASK) && !(flags & IORING_CQE_F_MORE);
}

static void concur__dispatch(struct concur__loop *loop, uint64_t ud, int32_t res, uint32_t flags)
{
	void *p = (void *)(uintptr_t)(ud & ~(uint64_t)CONCUR__TAG_MASK);
	CONCUR__TSAN_ACQUIRE(p);
	if (concur__retires(ud, flags))
		loop->inflight--; /* the one place the count goes down */
	switch (ud & CONCUR__TAG_MASK) {
	case CONCUR__TAG_OP:
	case CONCUR__TAG_UNCOUNTED: {
		struct concur__op *op = p;
		op->cqe(loop, op, res, flags);
		break;
	}
	case CONCUR__TAG_TASK: {
		/* a task's own op: the result waits in the task's f.res (its own result only once
		 * it returns), so the CQE touches the task's record and not its cold stack */
		struct concur__task *t = p;
		t->f.res = res;
		concur__resume(t);
		break;
	}
	case CONCUR__TAG_NODE:
		concur__node_arrived(loop, p);
		break;
	case CONCUR__TAG_HANDOFF:
		concur__take_chain(loop, p, (size_t)(uint32_t)res); /* MSG_RING's len: k */
		break;
	case CONCUR__TAG_DOORBELL:
		/* NULL: a wake, and the inbox is drained every turn. A loop (of our executor,
		 * alive until we stop): our doorbell to it failed, and it sleeps with nobody left
		 * to wake it. -EOVERFLOW: its CQ is full, so it is awake. No memory for the
		 * message: ring again. Refused for good: through the executor's doorbell ring,
		 * which tries on, and says the loop sleeps again if it cannot. */
		if (p && concur__transient(res))
			concur__wake(loop, p);
		else if (p && res != -EOVERFLOW)
			concur__loop_ring_doorbell(p);
		break;
	case CONCUR__TAG_NODE_FAILED: {
		/* The MSG_RING could not post (the target's CQ overflowed): through the target's
		 * inbox, never here. A call may only run there (a cancel breaks a wait of that
		 * loop's), and a task may be another executor's, which counts its end. */
		struct concur__node *n = p;
		concur__inbox_push((struct concur__loop *)(void *)n->next, n);
		break;
	}
	case CONCUR__TAG_HANDOFF_FAILED:
		concur__take_chain(loop, p, 0); /* keep them */
		/* the idle loop's `sleeping` or `watching` was cleared for this message: wake it
		 * (we do not know which one it was, and a spare wake is harmless) */
		for (unsigned i = 0; i < loop->ex->nloops; i++)
			if (loop->ex->loops[i] != loop)
				concur__wake(loop, loop->ex->loops[i]);
		break;
	}
}

/* The stashed CQEs come before those still in the CQ. A handler may stash more (through
 * concur__sqe): they are newer, and go in this same pass. */
static unsigned concur__reap_stash(struct concur__loop *loop)
{
	unsigned i;
	for (i = 0; i < loop->stash_len; i++) {
		struct concur__cqe c = loop->stash[i];
		concur__dispatch(loop, c.ud, c.res, c.flags);
	}
	loop->stash_len = 0;
	return i;
}

static unsigned concur__reap(struct concur__loop *loop)
{
	struct io_uring_cqe *cqes[CONCUR__REAP_BATCH];
	struct concur__cqe batch[CONCUR__REAP_BATCH];
	unsigned total = 0, n;
	loop->reaping = true;
	do {
		if (CONCUR__UNLIKELY(loop->stash_len))
			total += concur__reap_stash(loop);
		n = io_uring_peek_batch_cqe(&loop->ring, cqes, CONCUR__REAP_BATCH);
		/* copy out and free the CQ slots first: handlers may submit (and even flush) */
		for (unsigned i = 0; i < n; i++) {
			batch[i].ud = cqes[i]->user_data;
			batch[i].res = cqes[i]->res;
			batch[i].flags = cqes[i]->flags;
		}
		io_uring_cq_advance(&loop->ring, n);
		for (unsigned i = 0; i < n; i++)
			concur__dispatch(loop, batch[i].ud, batch[i].res, batch[i].flags);
		total += n;
	} while (n == CONCUR__REAP_BATCH || loop->stash_len);
	loop->reaping = false;
	if (loop->futex_wake_queued) { /* before the tasks the reap made ready run */
		loop->futex_wake_queued = false;
		/* all of the SQ out, the wake with it, through a pushback (as for a full SQ): a
		 * submit the kernel refused for a moment left the wake behind for a whole turn of
		 * tasks, one of which may wait for the thread it wakes */
		if (loop->ring.flags & IORING_SETUP_SQPOLL) /* its kernel thread takes it anyway */
			(void)concur__submit(loop, CONCUR__SUBMIT);
		else
			concur__sq_reserve(loop, loop->ring.sq.ring_entries);
	}
	concur__stat_inc(&loop->st.cqes, total);
	return total;
}

/* ---- the circle --------------------------------------------------------------------------------
 */

static bool concur__has_runnable(const struct concur__loop *loop)
{
	return loop->ready_head || loop->fresh_head || loop->stash_len;
}

/* With runnables waiting, enter the kernel only if there is something to submit or the kernel
 * has completions for us (IORING_SQ_TASKRUN): a loop busy with CPU tasks makes no syscall. */
static void concur__flush(struct concur__loop *loop)
{
	unsigned kflags = IO_URING_READ_ONCE(*loop->ring.sq.kflags);
	/* a failed submit keeps its SQEs for the next one; the reap that follows drains the CQ,
	 * which is what a kernel pushing back waits for */
	if (io_uring_sq_ready(&loop->ring) ||
	    (kflags & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)))
		(void)concur__submit(loop, CONCUR__SUBMIT_GET_EVENTS);
}

/* Submit what is queued and wait for a CQE. When the kernel takes nothing and so does not wait
 * (pushing back), the loop makes room rather than coming straight back (a spin). */
static void concur__submit_wait(struct concur__loop *loop)
{
	int r = concur__submit(loop, CONCUR__SUBMIT_WAIT);
	if (r != -EINTR && concur__transient(r))
		concur__relieve(loop);
}

/*
 * Before a sleep: what is queued goes out (replies, MSG_RINGs waking tasks of other loops), then
 * the inbox and the ring are watched for up to ns (see CONCUR__INBOX_SPIN). True: work came (an
 * inbox item, or CQEs to reap: completions the kernel holds back, IORING_SQ_TASKRUN, or an
 * overflowed CQ, are fetched by an enter that does not wait). False: sleep -- the time is up, or
 * the submit did not take everything (the sleep's submit deals with that).
 *
 * An idle poll (poll: its window is the user's, up to 1 s) announces itself in `watching` and
 * ex->nsleeping, as a sleep does in `sleeping`: a loop with unstarted tasks to spare hands them
 * over (concur__handoff) and a stop rings (concur__loop_stop), both by a claim of the flag and
 * a message whose CQE ends the watch. The fed watch (10 µs) does not: its every write of the
 * executor's line would cost the thread feeding it, which writes that line on each post. So the
 * loop reads nothing of the executor's while it watches.
 */
static bool concur__loop_watch(struct concur__loop *loop, int64_t ns, bool poll)
{
	concur_exec *ex = loop->ex;
	/* (with SQPOLL the kernel's thread takes the SQEs when it gets to them) */
	if (io_uring_sq_ready(&loop->ring) &&
	    (concur__submit(loop, CONCUR__SUBMIT) < 0 ||
	     (!(loop->ring.flags & IORING_SETUP_SQPOLL) && io_uring_sq_ready(&loop->ring))))
		return false;
	if (poll) {
		atomic_store_explicit(&loop->watching, 1, memory_order_seq_cst);
		atomic_fetch_add_explicit(&ex->nsleeping, 1, memory_order_relaxed);
	}
	/* a stop before the announcement rang nobody: look (a stop after it claims the flag) */
	bool work = false, stop = poll && atomic_load_explicit(&ex->stopping, memory_order_seq_cst);
	int64_t until = 0;
	for (int i = 0; !stop; i++) {
		if (atomic_load_explicit(&loop->inbox, memory_order_relaxed) ||
		    io_uring_cq_ready(&loop->ring)) {
			work = true;
			break;
		}
		if (IO_URING_READ_ONCE(*loop->ring.sq.kflags) &
		    (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) {
			(void)concur__submit(loop, CONCUR__SUBMIT_GET_EVENTS);
			work = true;
			break;
		}
		if (i < CONCUR__INBOX_SPIN) {
			concur__cpu_relax();
			continue;
		}
		int64_t now = concur__now_ns();
		if (!until)
			until = now + ns;
		else if (now >= until)
			break;
		sched_yield();
	}
	if (poll) {
		atomic_fetch_sub_explicit(&ex->nsleeping, 1, memory_order_relaxed);
		atomic_store_explicit(&loop->watching, 0, memory_order_relaxed);
	}
	return work;
}

/* THE one place a loop sleeps: submitting whatever is queued and waiting for one CQE. Anyone
 * who wants the loop awake posts a CQE into its ring (MSG_RING). fed: the inbox had items since
 * the loop last slept; reaped: the last turn handled completions (the watches before a sleep). */
static void concur__loop_sleep(struct concur__loop *loop, bool fed, bool reaped)
{
	concur_exec *ex = loop->ex;
	int64_t watch = fed ? CONCUR__INBOX_WATCH_NS : 0;
	bool poll = reaped && ex->opts.idle_poll_ns > watch;
	if (poll)
		watch = ex->opts.idle_poll_ns;
	if (watch && concur__loop_watch(loop, watch, poll))
		return;
	if (loop->stacks.idle_trim) /* a burst's stacks, given back before a sleep */
		concur__fiber_trim_idle(loop);
	atomic_store_explicit(&loop->sleeping, 1, memory_order_seq_cst);
	/* re-check after announcing the sleep: a poster that saw sleeping == 0 did not ring */
	if (atomic_load_explicit(&loop->inbox, memory_order_seq_cst) ||
	    (atomic_load_explicit(&ex->stopping, memory_order_seq_cst) && !loop->inflight)) {
		atomic_store_explicit(&loop->sleeping, 0, memory_order_relaxed);
		return;
	}
	atomic_fetch_add_explicit(&ex->nsleeping, 1, memory_order_relaxed);
	concur__submit_wait(loop);
	atomic_fetch_sub_explicit(&ex->nsleeping, 1, memory_order_relaxed);
	atomic_store_explicit(&loop->sleeping, 0, memory_order_relaxed);
	concur__stat_inc(&loop->st.sleeps, 1);
}

/* ---- rings: setup, probe, teardown ----------------------------------------------------------- */

#ifdef CONCUR__TSAN
/*
 * ThreadSanitizer does not see liburing's mmap and munmap (raw syscalls). A ring mapped where an
 * earlier ring was (rings of executors created and freed on different threads) inherited the
 * old ring's accesses, and TSan reported races between rings that never coexisted. So in TSan
 * builds a ring is unmapped through libc, which TSan intercepts and which clears its record of
 * the memory -- of whole pages only, so the lengths are rounded up to pages as the kernel does.
 * (Mapping the ring again through libc at setup is not possible: the kernel refuses to map a
 * ring at an address of the caller's choosing.)
 */
static void concur__ring_exit(struct io_uring *ring)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t sqe_size = (ring->flags & IORING_SETUP_SQE128) ? 128 : 64;
	struct {
		void *p;
		size_t size;
	} r[3] = {{ring->sq.ring_ptr, ring->sq.ring_sz},
	          {ring->sq.sqes, sqe_size * ring->sq.ring_entries},
	          {ring->cq.ring_ptr, ring->cq.ring_sz}};
	int n = ring->cq.ring_ptr != ring->sq.ring_ptr ? 3 : 2; /* no IORING_FEAT_SINGLE_MMAP */
	if (ring->enter_ring_fd != ring->ring_fd) /* registered (io_uring_register_ring_fd) */
		io_uring_unregister_ring_fd(ring);
	for (int i = 0; i < n; i++)
		munmap(r[i].p, (r[i].size + page - 1) & ~(page - 1));
	close(ring->ring_fd); /* the rest of io_uring_queue_exit */
}
#else
static void concur__ring_exit(struct io_uring *ring)
{
	io_uring_queue_exit(ring);
}
#endif

static void concur__setup_error(const char *what, int r)
{
	concur__set_error("concur: %s failed: %s%s", what, concur_strerror(r),
	                  r == -EPERM || r == -ENOSYS
	                      ? " (io_uring disabled? check sysctl kernel.io_uring_disabled, "
	                        "seccomp filters of containers, and the kernel config)"
	                      : "");
}

/* The operations the kernel has: one probe for the executor (rings of one kernel agree). */
static int concur__probe(concur_exec *ex, struct io_uring *ring)
{
	size_t len = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
	struct io_uring_probe *probe = calloc(1, len);
	if (!probe) {
		concur__set_error("concur: out of memory probing io_uring");
		return -ENOMEM;
	}
	int r = io_uring_register_probe(ring, probe, 256);
	if (r == 0)
		for (unsigned op = 0; op <= probe->last_op && op < 256; op++)
			ex->op_supported[op] = io_uring_opcode_supported(probe, (int)op);
	free(probe);
	if (r < 0 && r != -EINVAL) { /* EINVAL: a kernel before 5.6, which lacks MSG_RING too */
		concur__setup_error("io_uring_register (IORING_REGISTER_PROBE)", r);
		return r;
	}
	ex->has_futex_wake = ex->op_supported[CONCUR__OP_FUTEX_WAKE];
	if (!ex->op_supported[IORING_OP_MSG_RING]) {
		concur__set_error("concur: the kernel lacks IORING_OP_MSG_RING (Linux 5.18+)");
		return -EOPNOTSUPP;
	}
	return 0;
}

static int concur__ring_setup(struct concur__loop *loop)
{
	concur_exec *ex = loop->ex;
	unsigned entries = ex->opts.ring_entries;
	/* CLAMP: a 4x CQ past the kernel's maximum (65536: ring_entries > 16384) is clamped
	 * rather than refused with EINVAL, which fell back to a ring with no flags at all */
	const unsigned base = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP | IORING_SETUP_SUBMIT_ALL;
	unsigned tries[5];
	int ntries = 0;
	if (ex->opts.flags & CONCUR_EXEC_SQPOLL)
		tries[ntries++] = base | IORING_SETUP_SQPOLL | IORING_SETUP_SINGLE_ISSUER;
	tries[ntries++] = base | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
	                  IORING_SETUP_TASKRUN_FLAG;
	tries[ntries++] = base | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
	tries[ntries++] = base;
	tries[ntries++] = 0;
	int r = -EINVAL;
	for (int i = 0; i < ntries; i++) {
		struct io_uring_params p;
		memset(&p, 0, sizeof(p));
		p.flags = tries[i];
		p.cq_entries = entries * 4;
		if (p.flags & IORING_SETUP_SQPOLL)
			p.sq_thread_idle = 50;
		r = io_uring_queue_init_params(entries, &loop->ring, &p);
		if (r == 0) {
			if (loop->idx == 0)
				ex->ring_flags = tries[i];
			break;
		}
		if (r != -EINVAL)
			break; /* EPERM, ENOSYS, ENOMEM: falling back will not help */
	}
	if (r < 0) {
		concur__setup_error("io_uring_setup", r);
		return r;
	}
	loop->ring_fd = loop->ring.ring_fd;
	io_uring_register_ring_fd(&loop->ring); /* saves an fd lookup per enter; optional */
	if (loop->idx == 0 && (r = concur__probe(ex, &loop->ring)) < 0) {
		concur__ring_exit(&loop->ring);
		return r;
	}
	return 0;
}

static void concur__loop_cleanup(struct concur__loop *loop)
{
	/* SQEs of the last turn that no enter took yet: a MSG_RING carrying a node to another
	 * executor's loop (a cancel, a spawn: counted there as work, so its join would wait for
	 * ever), a doorbell. Out they go; one refused comes back as a CQE, which the reap sends to
	 * its target's inbox. Bounded: a ring that keeps refusing cannot hold the stop. */
	for (int tries = 0; tries < 64 && io_uring_sq_ready(&loop->ring); tries++) {
		concur__flush(loop);
		/* with SQPOLL the submit only wakes the kernel's thread: let it take them */
		for (int spins = 0; (loop->ring.flags & IORING_SETUP_SQPOLL) && spins < 1000 &&
		                    io_uring_sq_ready(&loop->ring);
		     spins++)
			sched_yield();
		concur__reap(loop);
	}
	/* Ops still in the kernel (none after a join, but be safe): cancel and reap them, so
	 * no CQE handler is left pointing at freed memory. */
	if (loop->inflight) {
		struct io_uring_sqe *sqe = concur__sqe(loop);
		io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY);
		concur__sqe_set_uncounted(sqe, &concur__ignore_op);
	}
	concur__timers_stop(loop);
	while (loop->inflight || loop->timers.armed) {
		concur__submit_wait(loop);
		concur__reap(loop);
	}
	concur__fiber_pool_free(loop);
	concur__task_cache_free(loop);
	concur__ring_exit(&loop->ring);
	free(loop->stash);
	loop->stash = NULL;
}

static void *concur__loop_main(void *arg)
{
	struct concur__loop *loop = arg;
	concur_exec *ex = loop->ex;
	char name[16];
	snprintf(name, sizeof(name), "concur-%u", loop->idx);
	pthread_setname_np(pthread_self(), name);
	/* pinned to the (idx mod n)-th of the n CPUs this thread may use (inherited from the
	 * creator: taskset, a cpuset), not to CPU number idx, which may be outside them; a loop
	 * the kernel will not pin runs unpinned */
	if (ex->opts.flags & CONCUR_EXEC_PIN)
		(void)concur__pin_to_allowed(loop->idx);
	loop->setup_err = concur__ring_setup(loop);
	if (!loop->setup_err && (loop->setup_err = concur__fiber_pool_init(loop)))
		concur__ring_exit(&loop->ring);
	if (loop->setup_err) /* the message is this thread's: hand it to concur_exec_new's caller */
		snprintf(loop->setup_msg, sizeof(loop->setup_msg), "%s", concur_last_error());
	/* room for a CQ's worth of stashed CQEs up front (see concur__stash_cqes); optional */
	if (!loop->setup_err &&
	    (loop->stash = malloc(loop->ring.cq.ring_entries * sizeof(*loop->stash))))
		loop->stash_cap = loop->ring.cq.ring_entries;
	atomic_store_explicit(&loop->started, 1, memory_order_release);
	concur__futex_wake(&loop->started, 1);
	if (loop->setup_err)
		return NULL;
	concur__tl_loop = loop;

	/* The inbox had items since the loop last slept. Not just this turn: a task from the
	 * inbox runs the turn after it arrives, and its foreign waiter posts again only once it
	 * has the result, so "this turn" would always be false by then. */
	bool fed = false, reaped = false;
	for (;;) {
		loop->share_backoff = 0; /* a new turn: the claimed loop is up by now */
		concur__run_queues(loop);
		if (concur__drain_inbox(loop))
			fed = true;
		concur__work_publish(loop);
		if (loop->nfresh >= 2 && atomic_load_explicit(&ex->nsleeping, memory_order_relaxed))
			concur__handoff(loop);
		if (concur__has_runnable(loop)) {
			concur__flush(loop);
		} else {
			if (atomic_load_explicit(&ex->stopping, memory_order_acquire) &&
			    !loop->inflight && !atomic_load(&loop->inbox))
				break;
			concur__loop_sleep(loop, fed, reaped);
			fed = false;
		}
		reaped = concur__reap(loop) > 0;
	}
	concur__loop_cleanup(loop);
	concur__tl_loop = NULL;
	return NULL;
}

int concur__loop_start(struct concur__loop *loop)
{
	int r = pthread_create(&loop->thread, NULL, concur__loop_main, loop);
	if (r) {
		concur__set_error("pthread_create (loop %u): %s", loop->idx, strerror(r));
		return -r;
	}
	while (!atomic_load_explicit(&loop->started, memory_order_acquire))
		concur__futex_wait(&loop->started, 0, NULL);
	if (loop->setup_err) {
		pthread_join(loop->thread, NULL);
		concur__set_error("%s", loop->setup_msg);
		return loop->setup_err;
	}
	return 0;
}

void concur__loop_stop(struct concur__loop *loop)
{
	/* ex->stopping is set: wake the loop if it sleeps or polls, it will see the flag */
	if (concur__claim_idle(loop))
		concur__loop_ring_doorbell(loop);
	pthread_join(loop->thread, NULL);
}

/* ---- the doorbell: threads outside the executor wake a sleeping loop ----------------------- */

int concur__bell_init(concur_exec *ex)
{
	int r = io_uring_queue_init(8, &ex->bell, 0);
	if (r < 0) {
		concur__setup_error("io_uring_setup (the executor's doorbell ring)", r);
		return r;
	}
	pthread_mutex_init(&ex->bell_lock, NULL);
	ex->bell_pid = (int)getpid();
	ex->bell_ready = true;
	return 0;
}

void concur__bell_exit(concur_exec *ex)
{
	if (!ex->bell_ready)
		return;
	ex->bell_ready = false;
	concur__ring_exit(&ex->bell);
	pthread_mutex_destroy(&ex->bell_lock);
}

/* Between tries after a transient failure: the kernel is short of memory, give it time. */
static void concur__bell_backoff(unsigned tries)
{
	if (tries < 4) {
		sched_yield();
		return;
	}
	struct timespec ts = {0, 50000L << (tries < 8 ? tries - 4 : 4)}; /* 50 us .. 0.8 ms */
	nanosleep(&ts, NULL);
}

/* One try: submit our MSG_RING (queued already if the last try's submit failed). Its failure,
 * if any, comes back as a CQE at once (success posts none). Returns the submit's or the
 * message's error, or 0. */
static int concur__bell_try(struct io_uring *bell, struct concur__loop *loop, bool *queued)
{
	if (!*queued) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(bell);
		if (!sqe) /* left behind by a submit that failed for good: out they go */
			io_uring_submit(bell);
		if (!sqe && !(sqe = io_uring_get_sqe(bell)))
			return -EBUSY;
		io_uring_prep_msg_ring(sqe, loop->ring_fd, 0, CONCUR__TAG_DOORBELL, 0);
		sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
		io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)loop);
		*queued = true;
	}
	int r = io_uring_submit(bell);
	if (r > 0)
		*queued = false;
	struct io_uring_cqe *cqe;
	while (io_uring_peek_cqe(bell, &cqe) == 0) {
		if (cqe->user_data == (uint64_t)(uintptr_t)loop && r >= 0)
			r = cqe->res;
		io_uring_cqe_seen(bell, cqe);
	}
	return r < 0 ? r : 0;
}

void concur__loop_ring_doorbell(struct concur__loop *loop)
{
	concur_exec *ex = loop->ex;
	pthread_mutex_lock(&ex->bell_lock);
	/* in a forked child the loops do not exist, and the ring's memory is the parent's */
	if (!ex->bell_ready || ex->bell_pid != (int)getpid()) {
		pthread_mutex_unlock(&ex->bell_lock);
		return;
	}
	bool queued = false;
	int r;
	for (unsigned tries = 0;; tries++) {
		r = concur__bell_try(&ex->bell, loop, &queued);
		/* sent; or -EOVERFLOW: the target's CQ is full, so it is awake. A loop thread (its
		 * own doorbell refused for good, or another executor's loop) tries for as long as
		 * any thread: it alone owes this wake (it cleared the target's sleeping flag), and
		 * one given up is lost for good, while its own tasks only wait for the kernel's
		 * shortage to pass. */
		if (!concur__transient(r))
			break;
		concur__bell_backoff(tries);
	}
	pthread_mutex_unlock(&ex->bell_lock);
	if (r < 0 && r != -EOVERFLOW) {
		/* refused for good (the ring's fd closed behind our back?): say the loop sleeps
		 * again, so the next post rings rather than nobody ever */
		atomic_store_explicit(&loop->sleeping, 1, memory_order_seq_cst);
		concur__set_error("concur: cannot wake a loop: %s", concur_strerror(r));
	}
	atomic_fetch_add_explicit(&ex->doorbells, 1, memory_order_relaxed);
}

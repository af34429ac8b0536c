/* SPDX-License-Identifier: MIT */
/*
 * concur internals shared by the parts in src/. Nothing here is public.
 *
 * Names: public functions and types are concur_name (include/concur.h); what one file of src/
 * shares with another is concur__name (declared here, or in wait.h for the composition parts);
 * a file's own statics (functions and types) are concur__name in the core files (future, loop,
 * exec, fiber, timer, control, signal, sys: their statics sit beside the shared functions they
 * serve) and <file>_name in every other file: io_, stream_, wait_, sync_, group_, blocking_,
 * stall_. So a name says where it is defined: concur_recv and concur_await_recv in io.c (grep
 * the comment "concur_recv, concur_await_recv" above each generated operation), stream_arm in
 * stream.c.
 *
 * Two funnels. Every future ends in concur__complete() (future.c): a task's return, a future
 * I/O op's CQE, a cancel, a promise, a timeout; its waiters (parked threads, callbacks, awaiting
 * fibers, compositions) are all woken there. (A task's return and an op's CQE call it as
 * concur__complete_unhold(), the same completion by the executor that holds the future, which
 * lets go of it in the same close.) A task that waits without a future -- a direct
 * I/O form (concur_recv, ...), concur_sleep, concur_stream_next -- is woken by concur__resume()
 * (fiber.c), which an awaited future's completion also ends in. Those waits never reach
 * concur__complete(): giving them a future would cost the allocation the direct forms exist
 * to avoid.
 *
 * The map:
 *   future.c   futures, waiters, who frees them, and concur__complete(): the futures' funnel.
 *   loop.c     one loop thread and its io_uring: the run queues, the inbox, MSG_RING messages,
 *              the in-flight count, CQE dispatch, and concur__loop_sleep(): the one place a
 *              loop sleeps. The only file that works a loop's ring itself (getting SQEs,
 *              submitting, reaping); the others fill SQEs they take with concur__sqe and
 *              count them with concur__sqe_set_op (or concur__sqe_count, for a task's own
 *              op: CONCUR__TAG_TASK).
 *   exec.c     the executor: loops, spawn, join (the work count), shutdown, stats.
 *   fiber.c    stacks, suspend/resume, the switch between fibers.
 *   timer.c    the loop's one kernel timer: deadline scopes, timed awaits, concur_sleep.
 *   control.c  cancelling a running task, shields, breaking a suspended wait, exec_stop.
 *   fiber_x86_64.S, fiber_aarch64.S  the context switch (concur__ctx_switch, and a fiber's
 *              first entry and last switch: ctx_enter/ctx_jump on x86-64, ctx_start on aarch64).
 *   io.c       one-shot I/O operations: the future form, the direct form, deadlines, cancel.
 *   stream.c   multishot streams (accept, recv) and the per-loop provided-buffer ring.
 *   signal.c   signals as futures (a signalfd polled through io.c, then read).
 *   wait.c     compositions: wait, gather, as_completed, then, spawn_after.
 *   group.c    task groups.
 *   sync.c     fiber-aware mutex, semaphore, event, channel.
 *   blocking.c the blocking pool (spawn_blocking).
 *   stall.c    the stall detector.
 *   wait.h     what the composition parts (wait.c, group.c, sync.c, blocking.c) share.
 *   sys.c      the syscall layer: the clock, the futex, prefaulting and aligned mappings, the
 *              error message. It calls nothing of concur's; every other file may call it.
 *   internal.h this: what every part shares.
 *
 * Who calls whom in the core (a completion resumes a fiber on a loop and a loop runs fibers and
 * completes futures, so the calls cannot all run one way; each crossing is a few named
 * functions declared here, and nobody reaches into another file's structures). Every file
 * calls sys.c, which calls nobody; only loop.c touches a ring's SQ, CQ and run queues.
 *   exec.c    -> loop.c (start/stop, post, push_fresh, the doorbell), future.c (init, claim,
 *                complete, defer_run), fiber.c (stack flags), control.c (cancel of a running
 *                task), stall.c (stall_forget)
 *   loop.c    -> fiber.c (fiber_get/prepare/run/put), future.c (complete, claim), control.c
 *                (ctl_start/end), timer.c (timers_stop), exec.c (work_end/publish), stall.c
 *   fiber.c   -> loop.c (push_ready/yielded, post, pop_direct/start_direct, task_end: a task
 *                finished on its own stack), future.c (waiter push/remove),
 *                timer.c (wait deadline), control.c (ctl_check)
 *   timer.c   -> loop.c (concur__sqe), fiber.c (suspend, resume), control.c (interrupt)
 *   control.c -> loop.c (post), timer.c (retime, timer_del), io.c (io_cancel_all), exec.c
 *                (join, shutdown: exec_stop)
 *   future.c  -> fiber.c (concur__resume, concur__await: the AWAIT waiter), loop.c
 *                (concur__loop_futex_wake), exec.c (exec_alive)
 */
#ifndef CONCUR_INTERNAL_H
#define CONCUR_INTERNAL_H

#include "concur.h"

#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define CONCUR__LIKELY(x)   __builtin_expect(!!(x), 1)
#define CONCUR__UNLIKELY(x) __builtin_expect(!!(x), 0)
#define CONCUR__CACHELINE   64

/*
 * The sanitizers a build runs under, whichever compiler: gcc says so with __SANITIZE_ADDRESS__ /
 * __SANITIZE_THREAD__, clang (the fuzz build) only through __has_feature. Without this, a clang
 * ASan build neither poisoned the record caches nor told ASan about fiber switches.
 */
#if defined(__SANITIZE_ADDRESS__)
#define CONCUR__ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define CONCUR__TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) && !defined(CONCUR__ASAN)
#define CONCUR__ASAN 1
#endif
#if __has_feature(thread_sanitizer) && !defined(CONCUR__TSAN)
#define CONCUR__TSAN 1
#endif
#endif

/*
 * ThreadSanitizer cannot see the ordering the kernel gives a MSG_RING message (the sender's
 * writes happen before the receiver reads the CQE), so the two ends say it explicitly.
 */
#ifdef CONCUR__TSAN
#include <sanitizer/tsan_interface.h>
#define CONCUR__TSAN_RELEASE(p) __tsan_release((void *)(p))
#define CONCUR__TSAN_ACQUIRE(p) __tsan_acquire((void *)(p))
/* A task leaves a few frames on its TSan fiber's shadow stack: a fiber is made anew after this
 * many tasks (concur__fiber_prepare), far below that stack's 64 Ki frames. */
#define CONCUR__TSAN_TASKS 256
#else
#define CONCUR__TSAN_RELEASE(p) ((void)(p))
#define CONCUR__TSAN_ACQUIRE(p) ((void)(p))
#endif

/* ASan: memory kept for reuse (a cache of freed records) is poisoned while it sits there. */
#ifdef CONCUR__ASAN
#include <sanitizer/asan_interface.h>
#define CONCUR__ASAN_POISON(p, n)   ASAN_POISON_MEMORY_REGION(p, n)
#define CONCUR__ASAN_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define CONCUR__ASAN_POISON(p, n)   ((void)(p), (void)(n))
#define CONCUR__ASAN_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* The struct holding member m at p. */
#define concur__container_of(p, type, m) ((type *)(void *)((char *)(p)-offsetof(type, m)))

/* ns (>= 0) as a struct timespec or struct __kernel_timespec. */
#define CONCUR__NS_TO_TS(ts, ns)                                                                   \
	({                                                                                         \
		int64_t ns_ = (ns);                                                                \
		(ts)->tv_sec = ns_ / 1000000000;                                                   \
		(ts)->tv_nsec = ns_ % 1000000000;                                                  \
	})
/* A struct timespec or struct __kernel_timespec as ns. */
#define CONCUR__TS_TO_NS(ts) ((int64_t)(ts)->tv_sec * 1000000000 + (ts)->tv_nsec)

/*
 * An intrusive singly linked FIFO: head and tail are lvalues of a pointer to any struct with a
 * `next` field. PUSH appends n; POP takes the oldest (NULL if empty).
 */
#define CONCUR__FIFO_PUSH(head, tail, n)                                                           \
	do {                                                                                       \
		__typeof__(n) n_ = (n);                                                            \
		n_->next = NULL;                                                                   \
		if (tail)                                                                          \
			(tail)->next = n_;                                                         \
		else                                                                               \
			(head) = n_;                                                               \
		(tail) = n_;                                                                       \
	} while (0)
#define CONCUR__FIFO_POP(head, tail)                                                               \
	({                                                                                         \
		__typeof__(head) h_ = (head);                                                      \
		if (h_ && !((head) = h_->next))                                                    \
			(tail) = NULL;                                                             \
		h_;                                                                                \
	})
/* A doubly linked deque (a `prev` field too): append n at the back. */
#define CONCUR__DQ_PUSH_BACK(head, tail, n)                                                        \
	do {                                                                                       \
		__typeof__(n) n_ = (n);                                                            \
		n_->next = NULL;                                                                   \
		n_->prev = (tail);                                                                 \
		if (tail)                                                                          \
			(tail)->next = n_;                                                         \
		else                                                                               \
			(head) = n_;                                                               \
		(tail) = n_;                                                                       \
	} while (0)
/* Reverse a singly linked list (a LIFO taken whole, made oldest first); returns the new head. */
#define CONCUR__LIST_REVERSE(list)                                                                 \
	({                                                                                         \
		__typeof__(list) l_ = (list), r_ = NULL;                                           \
		while (l_) {                                                                       \
			__typeof__(list) next_ = l_->next;                                         \
			l_->next = r_;                                                             \
			r_ = l_;                                                                   \
			l_ = next_;                                                                \
		}                                                                                  \
		r_;                                                                                \
	})

static inline void concur__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ volatile("yield" ::: "memory");
#else
	__asm__ volatile("" ::: "memory");
#endif
}

/* Short waits for a holder that is a few instructions away from letting go. */
static inline void concur__backoff(unsigned *spins)
{
	if (++*spins < 64)
		concur__cpu_relax();
	else
		sched_yield(); /* the holder was preempted: let it run */
}

/* Opcodes newer than liburing 2.3's header; used only where the ring's probe reports them. */
#define CONCUR__OP_FUTEX_WAKE   52
#define CONCUR__FUTEX2_SIZE_U32 0x02
#define CONCUR__FUTEX2_PRIVATE  128

struct concur__loop;
struct concur__task;

/* ---- futures (future.c) ------------------------------------------------------------------ */

/*
 * state word: the low bits are the state (a futex word: foreign threads sleep on it, and say
 * so in the waiters word, CONCUR__WAITERS_PARKED), COMPLETING (with PENDING) says a cancel won
 * the future, or its executor ends it unrun, and is completing it: not done yet (compositions
 * are still recording it), but nobody else may claim, set or cancel it.
 */
enum {
	CONCUR__PENDING = 0,
	CONCUR__RUNNING = 1,
	CONCUR__FINISHED = 2,
	CONCUR__CANCELLED = 3,
	CONCUR__STATE_MASK = 3,
	CONCUR__QUEUED_WORK = 4, /* PENDING, queued: work of its ex (a then task, a blocking job) */
	CONCUR__COMPLETING = 8,  /* ending unrun: final once the compositions recorded it */
	CONCUR__CANCEL_REQ = 16, /* a RUNNING task was asked to stop (concur_cancel): control.c */
};

#define CONCUR__FUTURE_MAGIC 0x46757475u /* "Futu" */
#define CONCUR__FUTURE_DEAD  0xdeadf00du

/* What differs between kinds of future (task, I/O op, promise). */
struct concur__future_class {
	const char *name;
	/* Called by concur_cancel() on a RUNNING future; NULL if it cannot be cancelled then.
	 * Returns -EINPROGRESS once cancellation was requested. */
	int (*cancel_running)(concur_future *f);
	/* Frees the memory once the last reference is gone. */
	void (*destroy)(concur_future *f);
	/* Optional, for a class whose future, once started, only its loop's thread completes:
	 * await_here takes task t (running on the current loop) as f's one awaiter kept in f's
	 * record, read by the completion on this same thread: no node on the waiter list, so no
	 * atomic write (a task's may start f first, when f is next to start here). The slot's
	 * task is woken before the list's, so it is taken only while the list is empty
	 * (concur__waiters_none). False: not so here (not started, another loop's, the slot
	 * taken, a waiter on the list); use the list. await_undo takes t back (an interrupt):
	 * false if the completion took it first. */
	bool (*await_here)(concur_future *f, struct concur__task *t);
	bool (*await_undo)(concur_future *f, struct concur__task *t);
	/* Optional. concur_cancel() made f CANCELLED while it was PENDING and nobody's work yet (a
	 * then or spawn_after task waiting for its inputs): take back what f hung on other futures,
	 * so that a cancelled dependent holds nothing until they complete. Called after f's
	 * callbacks ran, with a reference concur_cancel() took for it. */
	void (*unhang)(concur_future *f);
	/* Optional. concur_cancel() made f CANCELLED while it was queued work of its executor
	 * (CONCUR__QUEUED_WORK): take it out of its queue now, rather than when a worker reaches
	 * it, which may be long after (it counts as work till then). Called after f's callbacks
	 * ran, with a reference concur_cancel() took for it, inside the cancel's count of f->ex's
	 * work. */
	void (*dequeue)(concur_future *f);
	/* Its executor holds a new future until it has done with it (a task until it ends, an op
	 * until its last CQE): a hold, not a counted reference. refs counts its users alone, and
	 * the holder lets go with concur__complete_unhold or concur__unhold (see future.c). */
	bool held;
	/* Held, and its executor's counted work from its creation until it lets go: a spawned
	 * task, an op. Not a then or spawn_after task, counted only once its inputs are done and
	 * it is queued (its executor may be gone before), which its state then says
	 * (CONCUR__QUEUED_WORK). */
	bool counted;
};

enum concur__waiter_kind {
	CONCUR__WAIT_CALLBACK, /* concur_on_done(): run cb.fn(f, cb.arg), then free the node */
	CONCUR__WAIT_CALL,     /* a composition's own node (embedded in it): ops */
	CONCUR__WAIT_AWAIT,    /* resume a fiber (the node lives on its stack) */
};

struct concur__waiter;

/*
 * A composition's node (as_completed, wait/gather countdowns, group members, then/after).
 * concur__complete() runs every CALL node's record, then makes f's state final, then every
 * CALL node's done, and only then wakes parked threads, callbacks and fibers: so anything that
 * can see f done sees it after every composition recorded it (the order rule in concur.h).
 */
struct concur__waiter_ops {
	/* Optional. Before f's state is final (nobody can see f done yet): record the outcome
	 * where the order of completions matters. Must not block nor look at f's state. */
	void (*record)(struct concur__waiter *w, concur_future *f, int64_t res,
	               uint32_t final_state);
	/* f is done. The owner may free w from here on. It takes no reference to f unless its
	 * owner holds one (a held future whose users all left is freed right after the hooks:
	 * only callbacks, user code, may keep it, see concur__complete_unhold_slow). */
	void (*done)(struct concur__waiter *w, concur_future *f);
	/* Optional. f's last reference went while w was on its list: f will never complete. f
	 * must not be touched beyond reading it. */
	void (*drop)(struct concur__waiter *w, concur_future *f);
};

struct concur__waiter {
	/* 16-aligned: the waiters word keeps 4 flag bits */
	_Alignas(16) struct concur__waiter *next;
	struct concur__waiter *prev;
	enum concur__waiter_kind kind;
	uint32_t tag; /* its owner's to use (a then keeps its input's index here) */
	union {
		struct {
			concur_done_fn fn;
			void *arg;
		} cb;
		struct concur__task *task;
		struct {
			const struct concur__waiter_ops *ops;
			/* its owner's to use (a then's slot: its input) */
			_Atomic uintptr_t word;
		};
	};
};

/*
 * The waiters word: the newest node's address (nodes are 16-aligned), LOCKED while a push or
 * a removal relinks the list (a few stores), PARKED once a thread outside the executor sleeps
 * (or is about to) on the state word, CLOSED once the completion (or the last release) took the
 * list. PARKED lives here, not in the state word, so that the one atomic read-modify-write of a
 * completion is the close: whoever parks after it finds the list closed and only waits for the
 * state to be final, so the state itself is made final with a store.
 *
 * ORPHAN: every user released the future while its executor still held it (class held, see
 * future.c): the executor frees it when it lets go. It stays when the list is closed. A closed
 * word has no node and is never locked nor parked on, so its other bits say who holds it:
 * HELD (the LOCKED bit), the executor still does (a cancel closed the list of a queued one, or
 * the executor is waking the list's nodes); COUNTED (the ORPHAN bit, without HELD), the
 * executor's hold became a counted reference (callbacks were to run), and the count alone
 * decides; neither, the executor let go.
 */
#define CONCUR__WAITERS_CLOSED  ((uintptr_t)1)
#define CONCUR__WAITERS_LOCKED  ((uintptr_t)2)
#define CONCUR__WAITERS_PARKED  ((uintptr_t)4)
#define CONCUR__WAITERS_ORPHAN  ((uintptr_t)8)
#define CONCUR__WAITERS_FLAGS   ((uintptr_t)15)
#define CONCUR__WAITERS_HELD    CONCUR__WAITERS_LOCKED /* with CLOSED */
#define CONCUR__WAITERS_COUNTED CONCUR__WAITERS_ORPHAN /* with CLOSED, without HELD */
/* Nodes from malloc (callbacks, compositions) must be aligned enough for the flag bits. */
_Static_assert(_Alignof(max_align_t) >= 16, "malloc'd waiter nodes keep 4 flag bits free");

struct concur_future {
	_Atomic uint32_t state; /* CONCUR__PENDING..CANCELLED and flags; a futex word */
	uint32_t magic;
	_Atomic uint32_t refs;
	uint32_t flags;
	int64_t res;               /* written before the state becomes FINISHED/CANCELLED */
	_Atomic uintptr_t waiters; /* newest first, doubly linked; see CONCUR__WAITERS_* */
	const struct concur__future_class *cls;
	concur_exec *ex; /* weak: check with concur__exec_alive() */
	uint64_t ex_id;
};

void concur__future_init(concur_future *f, const struct concur__future_class *cls, concur_exec *ex,
                         uint32_t refs);
/*
 * THE completion path. Stores res, closes the waiter list, runs the composition nodes' record
 * hooks, makes f FINISHED or CANCELLED (final_state), runs their done hooks, wakes parked
 * threads (futex), then runs callbacks and resumes fibers in registration order. The caller
 * must own the right to complete f (it won the state CAS or reaped the op's CQE). f is held
 * across the callbacks (a callback may drop the caller's last reference).
 */
void concur__complete(concur_future *f, int64_t res, uint32_t final_state);
/*
 * The same, by the executor that holds f (class held), which lets go of it at once: f may be
 * freed before this returns (its users may all have released it), so the caller must not touch
 * it afterwards. In the common case (nobody on the list) the close is the one atomic write: no
 * reference count is written.
 */
void concur__complete_unhold(concur_future *f, int64_t res, uint32_t final_state);
/* The executor lets go of a held future a cancel completed (it was queued): frees it if its
 * users all released it. Not to be touched afterwards. */
void concur__unhold(concur_future *f);
/* Claim a PENDING future for running (PENDING -> RUNNING). False if it was cancelled. */
bool concur__future_claim(concur_future *f);
/* Claim a PENDING future to end it unrun (PENDING -> PENDING|COMPLETING, as concur_cancel()
 * does), for its executor to complete it with concur__complete_unhold(). Never RUNNING: a cancel
 * meanwhile waits for the end, and asks no loop to stop it. False if it was cancelled already. */
bool concur__future_claim_unrun(concur_future *f);
/* A PENDING future of an uncounted class is its executor's counted work from now on (a then or
 * spawn_after task queued, a blocking job): mark it CONCUR__QUEUED_WORK, for concur_cancel to
 * count its callbacks. Not if a cancel won first. Whoever drops it unrun waits for the cancel's
 * close (or final state) before its own end of that work. */
void concur__future_mark_queued(concur_future *f);
/* Add a waiter; false if f is done (the waiter was not added; f's state is final by then). */
bool concur__waiter_push(concur_future *f, struct concur__waiter *w);
/*
 * Take back a waiter pushed on f (the caller holds a reference on f). True: w is off the list
 * and nothing will ever run it. False: f's completion took it (its hook runs or ran, in the
 * completing thread); f's state is final by then.
 */
bool concur__waiter_remove(concur_future *f, struct concur__waiter *w);
/*
 * The same without a reference on f, by an owner that keeps f from being freed otherwise (its
 * hook waits while the owner is here): false as soon as the list is closed, with no wait for a
 * final state (a future dying unset never gets one).
 */
bool concur__waiter_take_back(concur_future *f, struct concur__waiter *w);
/* True if f's list, still open, holds a composition's node (CONCUR__WAIT_CALL) with these ops
 * for which match(w, arg) is true. match runs with the list locked: it must not touch f. */
bool concur__waiter_find(concur_future *f, const struct concur__waiter_ops *ops,
                         bool (*match)(const struct concur__waiter *w, const void *arg),
                         const void *arg);
/* Wait (briefly: it is imminent) until the state of f, whose completion began, is final. */
void concur__future_wait_final(const concur_future *f);
/* A future already failed with err (never NULL: a static one if memory runs out). */
concur_future *concur__failed_future(concur_exec *ex, int64_t err);
static inline bool concur__valid(const concur_future *f)
{
	return f && !((uintptr_t)f & 7) && f->magic == CONCUR__FUTURE_MAGIC;
}
static inline uint32_t concur__state(const concur_future *f)
{
	return atomic_load_explicit(&f->state, memory_order_acquire) & CONCUR__STATE_MASK;
}
/* The result of a done future. */
static inline int64_t concur__future_value(const concur_future *f)
{
	return concur__state(f) == CONCUR__CANCELLED ? -ECANCELED : f->res;
}
static inline bool concur__is_done(const concur_future *f)
{
	return concur__state(f) >= CONCUR__FINISHED;
}
/* Nobody on f's waiter list, no thread parked on it, no push or removal under way (a hint:
 * another thread may push the next moment). */
static inline bool concur__waiters_none(const concur_future *f)
{
	return atomic_load_explicit(&f->waiters, memory_order_relaxed) == 0;
}

/* ---- kernel operations and CQE dispatch (loop.c) ------------------------------------------ */

/*
 * A CQE's user_data is a pointer with a tag in its low 3 bits (all objects are 8-aligned).
 * OP: an in-kernel operation; its handler gets the CQE. The others are messages.
 */
enum concur__tag {
	CONCUR__TAG_OP = 0,       /* struct concur__op *, counted in flight until its last CQE */
	CONCUR__TAG_NODE = 1,     /* struct concur__node *: run, resume or call it on this loop */
	CONCUR__TAG_HANDOFF = 2,  /* chain of unstarted tasks given by a busy loop (res = count) */
	CONCUR__TAG_DOORBELL = 3, /* NULL: wake up and drain the inbox; a loop: our doorbell to
	                           * that loop failed (res), ring it again */
	CONCUR__TAG_NODE_FAILED = 4, /* our MSG_RING carrying a node failed: deliver it by inbox */
	CONCUR__TAG_HANDOFF_FAILED = 5,
	CONCUR__TAG_TASK = 6,      /* struct concur__task * awaiting its op's one CQE (io.c's direct
	                            * form), counted in flight: res goes to t->f.res, t is resumed */
	CONCUR__TAG_UNCOUNTED = 7, /* struct concur__op * not counted in flight: fire-and-forget
	                            * SQEs (CQE_SKIP_SUCCESS) and the loop's timer (timers.armed) */
	CONCUR__TAG_MASK = 7,
};

struct concur__op;
typedef void (*concur__cqe_fn)(struct concur__loop *loop, struct concur__op *op, int32_t res,
                               uint32_t cqe_flags);
struct concur__op {
	concur__cqe_fn cqe; /* called on the loop thread for each CQE of the operation */
};

/* An op whose CQEs mean nothing (an ASYNC_CANCEL's, or failures expected and harmless). */
extern struct concur__op concur__ignore_op;

/* ---- inbox items (loop.c) ----------------------------------------------------------------- */

/* A task's node (call NULL: run or resume the task), or a message: call(loop, node) on the
 * loop thread. */
struct concur__node {
	struct concur__node *next;
	struct concur__node *prev; /* used by the loop's fresh-task deque only */
	void (*call)(struct concur__loop *loop, struct concur__node *node);
};

/*
 * Call n->call(NULL, n) on this thread, now, or after the call under way on this thread if there
 * is one (future.c): what completions make ready runs without recursion. call is cleared before
 * it runs. A thread about to block runs the queue first (concur__defer_run).
 */
void concur__defer(struct concur__node *n);
void concur__defer_run(void);

/* ---- tasks and fibers (fiber.c) ----------------------------------------------------------- */

/*
 * What a started task carries for control (control.c): how to break the wait it is suspended
 * in, its shields and deadline scopes. It lives in the fiber (only started tasks need it), is
 * touched by the loop thread only, and is set up afresh for each task (concur__ctl_start).
 */
typedef bool (*concur__interrupt_fn)(struct concur__loop *loop, struct concur__task *t, void *arg);

/* A task's deadline scopes, allocated on its first concur_deadline_push (timer.c). */
struct concur__scopes {
	unsigned n, cap;
	struct {
		int64_t at;
		unsigned shield; /* the shield depth it was pushed at */
	} at[];
};

/*
 * An entry of a loop's timer heap (timer.c): a task's deadlines (in its ctl) or a future I/O
 * op's (io.c). Loop thread only.
 */
struct concur__timer {
	int64_t key;  /* when it comes due (CLOCK_MONOTONIC ns) */
	uint32_t idx; /* its place in loop->timers.heap, or UINT32_MAX: not in it */
	/* called on the loop once key passed (now: the time the loop read), the entry at the top
	 * of the heap: it takes it out (concur__timer_del) or moves its key past now */
	void (*due)(struct concur__loop *loop, struct concur__timer *tmr, int64_t now);
};

/* Kept small: it sits at the top of every stack, 1 KiB stacks included. */
struct concur__ctl {
	/* what every wait touches (concur__ctl_check, concur__suspend_interruptible) first: the
	 * fiber record's first cache line */
	concur__interrupt_fn interrupt; /* the wait the task is suspended in, or NULL */
	void *interrupt_arg;
	int64_t due; /* the earliest deadline in force (CLOCK_MONOTONIC ns), INT64_MAX: none */
	int16_t interrupted; /* the error an interrupt ended the wait with, or 0 */
	uint16_t shield;     /* concur_shield_push depth */
	int64_t wait_due;    /* the current timed wait's deadline, INT64_MAX: none */
	int64_t seen_now;    /* a time the loop's timer saw pass for this task */
	/* its place in the loop's timer heap: key never later than due (timer.c) */
	struct concur__timer tmr;
	struct concur__task *task; /* whose it is, for the timer (set with tmr) */
	/* the loop's tasks that have suspended (CONCUR__TASK_LIVE): what a stop cancels */
	struct concur__task *live_prev, *live_next;
	struct concur__scopes *scopes; /* NULL until the first push */
};

/*
 * A fiber's record lives at the top of its own stack slot (a slab allocator, in fiber.c):
 * a slot is carved from a reservation, one mapping holding many slots of one size class.
 */
struct concur__stack_res;
struct concur__fiber {
	struct concur__ctl ctl; /* first: the hot fields share the fiber's first line */
	void *uctx;             /* ucontext_t while switched out (fallback switch only) */
	void *stack_lo;         /* lowest usable byte, just above the guard page */
	size_t stack_size;
	struct concur__stack_res *res; /* the reservation the slot belongs to */
	uint32_t slot;                 /* its index there */
	uint32_t canary;  /* nonzero: no guard page below, a canary at stack_lo instead */
	void *tsan_fiber; /* ThreadSanitizer's fiber handle (TSan builds only) */
#ifdef CONCUR__TSAN
	uint32_t tsan_tasks; /* tasks run on tsan_fiber: it is made anew every CONCUR__TSAN_TASKS */
#endif
	/* a task of the same loop awaiting this fiber's task (concur__task_await_here): only this
	 * loop's thread reads or writes it, and the task's end resumes it */
	struct concur__task *awaiter;
};

/* A loop's stacks: size class 0 is the executor's default, class k (10..30) is 2^k bytes. */
#define CONCUR__STACK_CLASSES 32
struct concur__stack_class;
struct concur__stacks {
	struct concur__stack_class *cls[CONCUR__STACK_CLASSES];
	bool idle_trim; /* a reservation went empty with others left: look at the next sleep */
	int64_t idle_trim_next; /* no idle trim before (coarse monotonic ns): one a second */
};

/*
 * A queued task is only this record, so it is kept small: 120 bytes, a 128-byte malloc chunk
 * (a million queued tasks are 128 MB of fresh pages, and their page faults were much of
 * spawn/bulk). What a task needs only while it runs or waits (its await node, its sleep's
 * timeout) lives on its fiber's stack; fn's return value goes straight into f.res, which
 * nobody reads before the state says FINISHED.
 */
struct concur__task {
	/* first: a task is its future. f.flags: CONCUR__TASK_*; f.res: until the task returns,
	 * the result of its own op's CQE (CONCUR__TAG_TASK) */
	struct concur_future f;
	struct concur__node node;
	concur_task_fn fn;
	void *arg;
	struct concur__fiber *fib; /* NULL until the task first runs */
	struct concur__loop *loop; /* the loop it runs on, once started */
	/* its saved stack pointer while switched out (assembly switch; NULL before it starts):
	 * here, not in fib, so switching to a ready task is one dependent load fewer */
	void *sp;
};

/* in f.flags: fn returned on a stack that does not finish the task itself (tiny, or a stall
 * detector is set): the loop's context completes it */
#define CONCUR__TASK_RETURNED 1u
/* in f.flags: the started task is on its loop's live list (concur__ctl_live), which it joins
 * when it first suspends: one that runs to its end without suspending never needs finding */
#define CONCUR__TASK_LIVE 2u
/* in f.flags: live, and with a full stack (concur__task_stack_big): its suspends may take the
 * inline path, which tests just this bit */
#define CONCUR__TASK_QUICK_SUSPEND 4u
/* in f.flags: a deferred task's record is malloc'd (too big for the cache of then records) */
#define CONCUR__TASK_MALLOCED 8u
/* in f.flags: concur_spawn_on: t->loop is set from the spawn on, and the unstarted task waits
 * in that loop's ready queue (never in the fresh deque, which idle loops are handed from) */
#define CONCUR__TASK_PINNED (1u << 7)
/* in f.flags: the task's stack size class (0: the executor's default), from concur_spawn_ex */
#define CONCUR__TASK_STACK_SHIFT 8
#define CONCUR__TASK_STACK_MASK  (31u << CONCUR__TASK_STACK_SHIFT)
/*
 * A task whose stack is at least 16 KiB (the executor's smallest default; spawn_ex may ask for
 * as little as 1 KiB) may run the loop's own work on it: start the next task, complete itself
 * (its waiters' callbacks), give back a stack. Smaller ones leave that to the loop's context.
 */
#define CONCUR__TASK_STACK_BIG_LG 14

_Static_assert(offsetof(struct concur__task, f) == 0, "a task starts with its future");
_Static_assert(sizeof(void *) != 8 || sizeof(struct concur__task) <= 120,
               "a task record fits a 128-byte malloc chunk");

static inline struct concur__task *concur__task_of_node(struct concur__node *n)
{
	return concur__container_of(n, struct concur__task, node);
}

static inline bool concur__task_stack_big(const struct concur__task *t)
{
	unsigned lg = (t->f.flags & CONCUR__TASK_STACK_MASK) >> CONCUR__TASK_STACK_SHIFT;
	return lg == 0 || lg >= CONCUR__TASK_STACK_BIG_LG;
}

/*
 * The thread-locals on the hot paths use the initial-exec model: one %fs-relative load. The
 * library is built position-independent, whose default (global-dynamic) makes every access a
 * call of __tls_get_addr as far as the compiler knows -- the linker relaxes it away in an
 * executable, but only after the compiler kept values in callee-saved registers around the
 * "call", so a yield pushed and popped four registers for nothing. Every thread-local of the
 * library is one of these. The cost: the shared library's TLS block (~220 bytes; the error
 * text is on the heap, sys.c) is static TLS, as glibc's own libraries and jemalloc have it: a
 * dlopen() takes it from glibc's surplus (2.32 on: rtld.optional_static_tls, 512 bytes by
 * default, shared with every other library loaded so). musl's loader refuses to dlopen a
 * library with initial-exec TLS; linked, or loaded at start-up, it works there too.
 */
#define CONCUR__TLS_HOT __thread __attribute__((tls_model("initial-exec")))
extern CONCUR__TLS_HOT struct concur__loop *concur__tl_loop; /* this thread's loop, or NULL */
extern CONCUR__TLS_HOT struct concur__task *concur__tl_task; /* the task running, or NULL */
/* The executor whose blocking job (and its future's callbacks) this helper thread runs, or NULL
 * (exec.c; set by blocking.c): work of that executor, as a loop thread's is. */
extern __thread concur_exec *concur__tl_job_ex;
extern __thread concur_future *concur__tl_job_f; /* that job's future (blocking.c sets it) */
/* The future of what this thread runs now, its task's or its blocking job's, or NULL: a wait
 * for it here would wait for itself for good (-EDEADLK). */
static inline const concur_future *concur__self(void)
{
	return concur__tl_task ? &concur__tl_task->f : concur__tl_job_f;
}
/* Set by the blocking pool (blocking.c) once it exists: concur_exec_shutdown(ex, true) calls it
 * to end the jobs of ex no helper has picked yet, at once (the helpers may all be busy for
 * long). A hook, so that exec.c does not call up into the pool. */
extern _Atomic(void (*)(concur_exec *ex)) concur__cancel_queued_jobs;

/* A stack for task t (of its size class), or NULL (-ENOMEM: memory, map budget, RLIMIT_AS). */
struct concur__fiber *concur__fiber_get(struct concur__loop *loop, struct concur__task *t);
/* The task flags for a per-spawn stack size (0: the default), or -EINVAL. */
int concur__stack_flags(size_t stack_size);
/* The size class (log2 of its bytes) of a per-spawn stack of stack_size bytes on pages of page
 * bytes: the power of two that holds it, and a page at least for one of 16 KiB or more. */
unsigned concur__stack_lg(size_t stack_size, size_t page);
/* How guard pages are made (CONCUR_STACK_GUARD_*), probed once per process. */
int concur__stack_guard_mode(void);
/* Tests: force a guard mechanism for reservations made from now on (0: back to the probe). */
void concur__stack_guard_force(int mode);
/* Tests: set the budget of mappings stacks may hold (process-wide) if budget >= 0; returns
 * the previous one. The default leaves room under vm.max_map_count for everything else. */
long concur__stack_map_budget(long budget);
/* Tests: the mappings stacks hold now, process-wide. */
long concur__stack_maps_used(void);
/* The context switch in assembly (fiber_x86_64.S, fiber_aarch64.S), for fiber.c only. */
void concur__ctx_switch(void **save_sp, void *load_sp);
void concur__ctx_start(void); /* aarch64 */
void concur__ctx_enter(void **save_sp, void *top, struct concur__task *t,
                       void (*entry)(struct concur__task *t)); /* x86-64 */
void concur__fiber_put(struct concur__loop *loop, struct concur__fiber *fib);
/* Loop thread, about to sleep, loop->stacks.idle_trim set: give back the stack reservations a
 * burst left empty, where the others have room for twice the live stacks (see fiber.c). */
void concur__fiber_trim_idle(struct concur__loop *loop);
/* A loop's fiber state before its first task (the ucontext build's loop context): 0 or
 * -ENOMEM. concur__fiber_pool_free undoes it with the stacks, at the loop's end. */
int concur__fiber_pool_init(struct concur__loop *loop);
void concur__fiber_pool_free(struct concur__loop *loop);
void concur__fiber_prepare(struct concur__fiber *fib, struct concur__task *t);
/*
 * Loop side: run t until a fiber switches back to the loop; returns that fiber's task, which is
 * not t if t passed the thread on (concur__suspend) -- it has finished or suspended.
 */
struct concur__task *concur__fiber_run(struct concur__loop *loop, struct concur__task *t);
/* Task side: run fn(arg) on the loop's own stack (its context runs it between two switches and
 * goes straight back to t): for code of anyone's, a callback, called from a small stack. */
void concur__fiber_call_on_loop(struct concur__task *t, void (*fn)(void *), void *arg);
/*
 * Task side: switch to the next ready fiber of the loop (within the turn's budget) or back to
 * the loop. Whoever arranged the suspension calls concur__resume() later (from any thread); the
 * call returns then.
 */
void concur__suspend(void);
/* Make a suspended task runnable again on its own loop, from any thread. */
void concur__resume(struct concur__task *t);
/* In a task: wait for f (timeout_ns < 0: forever). Returns f's value, -ETIMEDOUT, or
 * -ECANCELED if the task was cancelled (see control.c). */
int64_t concur__await(concur_future *f, int64_t timeout_ns);
/*
 * A task made now and queued later (by concur__task_enqueue, from any thread): a dependent task
 * waiting for its inputs holds no stack and is not counted as work yet. extra bytes follow the
 * record for the caller, and are the task's arg (t + 1; records are 16-aligned). Its future has the
 * caller's reference and the executor's hold, let go when the task completes -- or by the caller
 * with concur__task_end_unrun() if it ends the task itself instead of queueing it. NULL on
 * -ENOMEM.
 */
struct concur__task *concur__task_new_deferred(concur_exec *ex,
                                               const struct concur__future_class *cls,
                                               concur_task_fn fn, size_t extra);
/*
 * The class of a deferred task, made by its owner (wait.c) with its own unhang hook: a task's
 * cancel and await hooks, and a destroy that gives the record back where it came from.
 */
bool concur__task_await_here(concur_future *f, struct concur__task *w);
bool concur__task_await_undo(concur_future *f, struct concur__task *w);
void concur__deferred_task_destroy(concur_future *f);
#define CONCUR__DEFERRED_TASK_CLASS(unhang_fn)                                                     \
	{                                                                                          \
		.name = "task", .cancel_running = concur__task_cancel_running,                     \
		.destroy = concur__deferred_task_destroy, .await_here = concur__task_await_here,   \
		.await_undo = concur__task_await_undo, .unhang = (unhang_fn),                      \
		.held = true, /* by its executor, until it ends */                                 \
	}
/* A task for fn(arg) with the record of a plain spawn, queued later (as a deferred one is),
 * once its caller has registered on it (a group's member). NULL on -ENOMEM. */
struct concur__task *concur__task_new(concur_exec *ex, concur_task_fn fn, void *arg);
/* Queue a task as concur_spawn() does; after a shutdown it ends -ESHUTDOWN instead. */
void concur__task_enqueue(struct concur__task *t);
/* End a held task unrun with err in final_state (unless a cancel won first): its executor lets
 * go of it. Not to be touched afterwards. */
void concur__task_end_unrun(struct concur__task *t, int64_t err, uint32_t final_state);
/*
 * Future records come in three sizes that are cached (exec.c): a spawned task's, a deferred
 * task's with up to CONCUR__DEFERRED_CACHED_EXTRA bytes after it (a then: one input's state,
 * wait.c), and a future I/O op's (io.c). Larger deferred records are malloc'd and freed.
 */
enum { CONCUR__REC_TASK, CONCUR__REC_THEN, CONCUR__REC_IO, CONCUR__REC_SIZES };
#define CONCUR__DEFERRED_CACHED_EXTRA 80
#define CONCUR__REC_IO_BYTES          288 /* io.c's future op record (asserted there) */
/*
 * A record of size class k (CONCUR__REC_*) for a new future, from this thread's cache (loop: the
 * thread's loop, or NULL outside the executor), a chain a loop gave back, or a slab; NULL on
 * -ENOMEM. concur__rec_free gives it back when its last reference goes, on any thread.
 */
void *concur__rec_alloc(concur_exec *ex, struct concur__loop *loop, int k);
void concur__rec_free(void *p, int k);
/* The chunks of slabs mapped now, by every thread (exec.c; tests check that they all go back). */
long concur__chunks_live(void);
/* A thread's freed records of one size: a LIFO list for its next allocations; a loop's, a chain
 * being filled for its executor's recycle slots once the list is full; how many records to
 * make before it looks at the slots again; the slab new records are carved from (exec.c). */
struct concur__rec_cache {
	void *head;
	unsigned len;
	unsigned out_len;
	void *out;
	unsigned skip;
	unsigned carve_left; /* records still to carve from slab, from carve on */
	char *carve;
	struct concur__slab *slab;
	struct concur__slab *chunk; /* the chunk slabs are cut from, once arena_slabs is reached */
	unsigned chunk_left;        /* its slabs still to cut */
	unsigned arena_slabs;       /* slabs taken from the malloc arena, up to a bound (exec.c) */
};
/* A loop keeps this many freed records of each size for its own next tasks. */
#define CONCUR__TASK_CACHE_MAX 1024
/* Each size has this many slots in its executor, each empty or holding a chain of exactly
 * CONCUR__RECYCLE_CHAIN records a loop gave back, for any cache that runs dry to take. */
#define CONCUR__RECYCLE_SLOTS 16
#define CONCUR__RECYCLE_CHAIN 128
struct concur__recycle {
	_Atomic(void *) slot[CONCUR__RECYCLE_SLOTS]; /* a chain's first record, or NULL */
};
/* A cache that found every slot of a size empty makes this many of it before it looks
 * again. */
#define CONCUR__RECYCLE_SKIP 32

/* ---- loops (loop.c) ----------------------------------------------------------------------- */

/* The loop's one kernel timer, armed for the earliest of a heap of deadlines (timer.c). */
struct concur__timers {
	struct concur__timer **heap; /* min-heap on key */
	size_t n, cap;
	struct concur__op op;             /* the armed IORING_OP_TIMEOUT's CQE */
	struct __kernel_timespec ts, upd; /* its expiry, and an update's (absolute) */
	int64_t armed_at;                 /* when the armed timer fires */
	bool armed;
	bool stopped; /* concur__timers_stop: no new entry that is no task's */
};

struct concur__loop_stats {
	_Atomic uint64_t tasks_spawned, tasks_run, fibers_parked, cqes, enters, sleeps, msg_ring,
	    inbox_items, steals, futex_wakes, futex_ring_wakes, stacks_mapped, stack_maps,
	    stacks_released;
	/* not in concur_stats: tasks a fiber started itself (concur__loop_start_direct), which
	 * tests read to tell the start paths apart */
	_Atomic uint64_t direct_starts;
};

/* A CQE copied out of the ring (see concur__sqe: the kernel pushing back on a full CQ). */
struct concur__cqe {
	uint64_t ud;
	int32_t res;
	uint32_t flags;
};

struct concur__loop {
	/* owned by the loop thread */
	struct io_uring ring;
	concur_exec *ex;
	unsigned idx;
	int ring_fd;               /* the real fd, for MSG_RING senders */
	void *sched_sp;            /* the loop's own context while a fiber runs (assembly switch) */
	void *sched_uctx;          /* the same for the ucontext fallback */
	void *tsan_fiber;          /* the loop thread's own fiber handle (TSan builds only) */
	const void *asan_stack_lo; /* the loop thread's stack, for ASan's fiber annotations */
	size_t asan_stack_size;
	_Atomic uint32_t started; /* futex word: 1 once the ring is set up (or setup failed) */
	struct concur__node *fresh_head,
	    *fresh_tail; /* unstarted tasks: local spawns at the front */
	size_t nfresh;
	/* a fresh task and how many are from it to the back (it included): where the last
	 * handoff left the front, so the next can cut there without a walk; NULL once popped */
	struct concur__node *fresh_mark;
	size_t fresh_behind_mark;
	/* added to CONCUR__SHARE_AT after a share found no idle loop to claim (one counted in
	 * nsleeping, woken but not up yet): the next try waits for CONCUR__SHARE_AT more spawns */
	size_t share_backoff;
	struct concur__node *ready_head, *ready_tail;     /* resumed fibers, FIFO */
	struct concur__node *yielded_head, *yielded_tail; /* yielded this turn: ready next turn */
	unsigned budget;     /* runnables the turn may still run, direct fiber switches included */
	uint32_t sq_emptied; /* submits that left the SQ empty: an SQE queued before one is in */
	_Atomic bool stall_on; /* this loop's executor has a stall detector (stall.c) */
	/* a finished fiber that passed the thread on: its stack goes back to the pool as soon as
	 * we are off it, by whoever it switched to (concur__fiber_reap) */
	struct concur__fiber *dead_fib;
	/* a call a task asked its loop's context to make for it (concur__fiber_call_on_loop) */
	void (*call_fn)(void *);
	void *call_arg;
	unsigned inflight;                                /* our SQEs whose CQE is still to come */
	struct concur__stacks stacks;                     /* fiber.c's stack pools */
	struct concur__rec_cache recs[CONCUR__REC_SIZES]; /* freed future records (exec.c) */
	int64_t work_ended; /* work ends minus local begins not yet applied to ex->outstanding */
	struct concur__cqe *stash; /* CQEs moved out of a full CQ, dispatched first by the reap */
	unsigned stash_len, stash_cap;
	bool reaping;           /* in concur__reap's dispatch: no task runs before its end */
	bool futex_wake_queued; /* an IORING_OP_FUTEX_WAKE, submitted as the reap ends */
	pthread_t thread;
	int setup_err;
	char setup_msg[256]; /* why setup failed, for the thread that called concur_exec_new */
	struct concur__loop_stats st;
	struct concur__timers timers;  /* deadlines and timed waits (timer.c) */
	struct concur__task *live;     /* started tasks, for concur_exec_stop (control.c) */
	struct concur__node *io_live;  /* future I/O ops in flight, for the same (io.c) */
	struct concur__node stop_node; /* concur_exec_stop's message (control.c) */
	_Atomic bool stop_posted;
	bool
	    stop_arrived; /* it ran here: future I/O started after it is cancelled at once (io.c) */
	/* a cancel with no memory for its message asks for a look at the cancel requests of the
	 * loop's started tasks instead (control.c): one such message, in flight at most once */
	struct concur__node cancel_scan_node;
	_Atomic bool cancel_scan_posted;

	/* touched by other threads */
	_Alignas(CONCUR__CACHELINE) _Atomic(struct concur__node *) inbox;
	_Atomic int sleeping; /* 1 while in (or about to enter) the sleeping io_uring_enter */
	_Atomic int watching; /* 1 while it watches before a sleep (a handoff may claim it) */
};

static inline void concur__stat_inc(_Atomic uint64_t *c, uint64_t n)
{
	/* single writer: a plain load+store is enough, readers only need untorn values */
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
	                      memory_order_relaxed);
}

/*
 * Get an SQE on the current loop's ring. Loop thread only. When the SQ is full it submits to
 * make room; if the kernel pushes back (a full CQ, no memory for a request), it moves CQEs out
 * of the CQ into the loop's stash (dispatched by the next reap, never from here) or waits in
 * io_uring_enter, so it neither spins nor loses an SQE or a CQE.
 */
/* Submit what the SQ holds now rather than at the turn's end, until the kernel took it all: an
 * SQE names its fd by number, resolved only when submitted, so one left queued after its owner
 * let go of the fd (concur_stream_close) could act on a new file given the same number. An owner
 * that noted loop->sq_emptied when it queued its SQE needs this only while it is unchanged. */
void concur__loop_flush(struct concur__loop *loop);
struct io_uring_sqe *concur__sqe_slow(struct concur__loop *loop);
static inline struct io_uring_sqe *concur__sqe(struct concur__loop *loop)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&loop->ring);
	return CONCUR__LIKELY(sqe != NULL) ? sqe : concur__sqe_slow(loop);
}
/* Make sure the SQ has n free entries (a linked pair must not be split across submits). */
void concur__sq_reserve(struct concur__loop *loop, unsigned n);
/* Tests only (fault injection): when set, called before each submit of a loop's ring; a
 * nonzero return is taken as the submit's result and nothing is submitted. */
extern int (*concur__submit_fault)(struct concur__loop *loop);
/*
 * The in-flight count (loop->inflight) is kept in two places only: concur__sqe_count() adds an
 * SQE whose CQE is to come, and concur__dispatch() (loop.c) retires it on its last CQE (no
 * IORING_CQE_F_MORE). The loop does not stop while the count is nonzero.
 */
/* The user_data of an op's SQE, for an ASYNC_CANCEL or a timeout update aimed at it. */
static inline uint64_t concur__op_ud(struct concur__op *op)
{
	return (uint64_t)(uintptr_t)op | CONCUR__TAG_OP;
}
/* The user_data of a task's own op (CONCUR__TAG_TASK). */
static inline uint64_t concur__task_ud(struct concur__task *t)
{
	return (uint64_t)(uintptr_t)t | CONCUR__TAG_TASK;
}
static inline uint64_t concur__uncounted_ud(struct concur__op *op)
{
	return (uint64_t)(uintptr_t)op | CONCUR__TAG_UNCOUNTED;
}
static inline void concur__sqe_count(struct concur__loop *loop, struct io_uring_sqe *sqe,
                                     uint64_t ud)
{
	io_uring_sqe_set_data64(sqe, ud);
	loop->inflight++;
}
/* Queue an op (the SQE prepared): its CQEs go to op->cqe; in flight until its last CQE. */
static inline void concur__sqe_set_op(struct concur__loop *loop, struct io_uring_sqe *sqe,
                                      struct concur__op *op)
{
	concur__sqe_count(loop, sqe, concur__op_ud(op));
}
/* Queue an op whose CQE is not counted in flight: a CQE_SKIP_SUCCESS fire-and-forget SQE (a
 * CQE only if it fails), or one tracked otherwise (the loop's timer: timers.armed). */
static inline void concur__sqe_set_uncounted(struct io_uring_sqe *sqe, struct concur__op *op)
{
	io_uring_sqe_set_data64(sqe, concur__uncounted_ud(op));
}
/* Hand a node to loop from any thread: local queue, MSG_RING or inbox + doorbell. Needs no
 * memory: whatever the path, the node reaches the loop and a sleeping loop is woken. */
void concur__loop_post(struct concur__loop *loop, struct concur__node *node);
/*
 * The run queues, inline: they are the switch's hot path (a yield is push + pop + switch, a few
 * ns), and a call into loop.c for each measured as much again. Loop thread only.
 */
/* Queue a runnable task on the current loop. */
static inline void concur__loop_push_ready(struct concur__loop *loop, struct concur__task *t)
{
	CONCUR__FIFO_PUSH(loop->ready_head, loop->ready_tail, &t->node);
}
/* Task side: start the next unstarted task (a full stack) from a fiber; NULL if none, or if
 * the start would end it unrun (shutdown(ex, true), no stack): the loop's context ends those,
 * their callbacks run there. loop.c */
struct concur__task *concur__loop_start_direct(struct concur__loop *loop);
/*
 * Task w, on this loop, is about to wait for t, the next unstarted task here (the head of the
 * fresh deque, nothing resumed ahead of it): start t now, the start w's suspend would make, and
 * queue it to be switched to first. Then t is RUNNING on this loop, which alone completes it.
 * False if t is not so placed, the turn's budget is spent, w's stack cannot start a task, or t
 * did not start (cancelled while queued: it is done then).
 */
bool concur__loop_start_awaited(struct concur__loop *loop, struct concur__task *w,
                                struct concur__task *t);
/*
 * Stack a fiber must have left below the current frame to start the next task itself: getting
 * it a stack may map a reservation and install its guard pages, ~2 KiB of frames (more under
 * the sanitizers). A task deeper in its stack than that suspends to the loop, which starts the
 * next task on its own stack.
 */
#if defined(CONCUR__ASAN) || defined(CONCUR__TSAN)
#define CONCUR__DIRECT_START_ROOM 16384
#else
#define CONCUR__DIRECT_START_ROOM 4096
#endif
static inline bool concur__fiber_room_to_start(const struct concur__fiber *fib)
{
	uintptr_t sp; /* read directly: __builtin_frame_address would make callers keep a frame */
#if defined(__x86_64__)
	__asm__ volatile("movq %%rsp, %0" : "=r"(sp));
#elif defined(__aarch64__)
	__asm__ volatile("mov %0, sp" : "=r"(sp));
#else
	sp = (uintptr_t)__builtin_frame_address(0);
#endif
	return sp - (uintptr_t)fib->stack_lo > CONCUR__DIRECT_START_ROOM;
}
/*
 * Task side (concur__suspend, a finished fiber): the next fiber to switch straight to, taken off
 * the ready queue and charged to the turn's budget; NULL if the fiber should switch back to the
 * loop instead (the budget is spent, or a stall detector times each run from the loop). May
 * return the caller's own task (a yield with nobody else ready). With nothing resumed, a caller
 * on a full stack (host: its fiber, NULL if its stack is small) starts the next unstarted task
 * itself, on its new fiber, instead of going through the loop to start it -- if host has room
 * left for that (concur__fiber_room_to_start). only_big: only a fiber with a full stack will do
 * (the caller is finished and the next one gives its stack back, concur__fiber_reap).
 */
static inline struct concur__task *
concur__loop_pop_direct(struct concur__loop *loop, const struct concur__fiber *host, bool only_big)
{
	if (loop->budget <= 1 || atomic_load_explicit(&loop->stall_on, memory_order_relaxed))
		return NULL;
	struct concur__node *n = loop->ready_head;
	if (!n)
		return host && loop->fresh_head && concur__fiber_room_to_start(host)
		           ? concur__loop_start_direct(loop)
		           : NULL;
	struct concur__task *t = concur__task_of_node(n);
	/* (a pinned task not started yet waits there too: the loop starts it) */
	if (!t->fib || (only_big && !concur__task_stack_big(t)))
		return NULL;
	loop->budget--;
	CONCUR__FIFO_POP(loop->ready_head, loop->ready_tail);
	return t;
}
/*
 * Queue a task that yielded. A yield goes behind everything runnable now. With no unstarted
 * task and nobody else yielded this turn, that is just the ready queue's tail: concur__suspend()
 * then switches straight to the next fiber (or goes on, if alone), charged to the turn's budget
 * so I/O still gets its look. Otherwise it waits for the turn's end, so yielders cannot starve
 * the tasks that have not started.
 */
static inline void concur__loop_push_yielded(struct concur__loop *loop, struct concur__task *t)
{
	if (loop->fresh_head || loop->yielded_head)
		CONCUR__FIFO_PUSH(loop->yielded_head, loop->yielded_tail, &t->node);
	else
		concur__loop_push_ready(loop, t);
}
/*
 * Wake threads parked on f's state word with an IORING_OP_FUTEX_WAKE on the current loop's
 * ring: when the kernel has the op, the loop is reaping (the submit at the reap's end carries the
 * wake, before any task runs) and SQEs are queued anyway (the wake adds no enter). True then (the
 * SQE holds no reference to f). False: the caller makes the futex syscall.
 */
bool concur__loop_futex_wake(struct concur__loop *loop, concur_future *f);
void concur__loop_push_fresh(struct concur__loop *loop, struct concur__task *t, bool front);
/* Unstarted tasks on a loop past which a task spawning more hands half to a sleeping loop at
 * once (concur__loop_share) rather than at its loop's next turn. */
#define CONCUR__SHARE_AT 64
void concur__loop_share(struct concur__loop *loop);
/* A task's fn returned: its control state goes, its stack too if put (else the caller gives it
 * back), its future completes and the executor lets go of it (t may be freed). */
void concur__loop_task_end(struct concur__loop *loop, struct concur__task *t, bool put);
int concur__loop_start(struct concur__loop *loop);
void concur__loop_stop(struct concur__loop *loop);
/*
 * After ex's loops stopped, before it is freed: wait until no thread is still inside a post
 * into one of their inboxes (the last work may end while the poster is still ringing), then run
 * the messages posted after a loop's last turn (a cancel of a task that ended meanwhile: it
 * holds a reference). On the freeing thread.
 */
void concur__loop_quiesce(concur_exec *ex);
/* Keep a loop of another executor (and that executor) allocated while this thread touches it:
 * concur_exec_free waits in concur__loop_quiesce until it is unpinned. One pin per thread at a
 * time; returns the token for the unpin. */
struct concur__poster;
struct concur__poster *concur__loop_pin(struct concur__loop *loop);
void concur__loop_unpin(struct concur__poster *pin);
/*
 * Wake a sleeping loop from a thread outside the executor: a MSG_RING through the executor's
 * doorbell ring. The caller has cleared loop->sleeping: the wake is sent (transient errors are
 * retried); only if the kernel refuses it for good is sleeping set again (a later post rings).
 */
void concur__loop_ring_doorbell(struct concur__loop *loop);
/* The executor's doorbell ring: made before its loops start, freed after they stopped. */
int concur__bell_init(concur_exec *ex);
void concur__bell_exit(concur_exec *ex);
/* Pick the loop for work created outside the executor (round-robin). */
struct concur__loop *concur__exec_pick_loop(concur_exec *ex);

/* ---- executor (exec.c) -------------------------------------------------------------------- */

#define CONCUR__EXEC_MAGIC 0x45786563u /* "Exec" */

struct concur_exec {
	uint32_t magic;
	uint64_t id;
	unsigned nloops;
	struct concur__loop **loops;
	struct concur_exec_opts opts;
	unsigned ring_flags;
	uint8_t op_supported[256]; /* from io_uring_get_probe_ring, filled once */
	bool has_futex_wake;       /* IORING_OP_FUTEX_WAKE (Linux 6.7+) */

	_Atomic bool shutdown;
	_Atomic bool cancel_pending;
	_Atomic bool stopping;
	_Atomic unsigned nsleeping; /* loops asleep or watching before a sleep: handoff's hint */
	_Atomic uint64_t
	    tasks_spawned; /* from threads outside the executor; loops count their own */
	_Atomic uint64_t doorbells;

	/* The doorbell: threads outside the executor wake a sleeping loop with a MSG_RING from
	 * this ring, under the lock. It exists from concur_exec_new on, so a wake cannot fail
	 * for want of a ring (one io_uring fd per executor, none per thread). */
	pthread_mutex_t bell_lock;
	struct io_uring bell;
	int bell_pid; /* a forked child must not ring through its parent's ring */
	bool bell_ready;

	/* Freed records travelling from the loops to any cache that runs dry: threads outside the
	 * executor, whose own frees of them would otherwise all land in one malloc arena,
	 * contended, and loops that spawn more than they free (exec.c). */
	_Alignas(CONCUR__CACHELINE) struct concur__recycle recycle[CONCUR__REC_SIZES];

	_Alignas(CONCUR__CACHELINE) _Atomic unsigned rr;
	/* join accounting: work begun and not yet ended (tasks, ops) */
	_Alignas(CONCUR__CACHELINE) _Atomic int64_t outstanding;
	_Atomic uint32_t join_seq; /* futex word: bumped when outstanding reaches 0 */
	_Atomic uint32_t joiners;
	_Atomic uint32_t foreign_ends; /* threads outside the loops inside concur__work_end */
};

static inline bool concur__exec_valid(const concur_exec *ex)
{
	/* a foreign pointer may not even be aligned like an executor: check before reading */
	return ex && !((uintptr_t)ex & (CONCUR__CACHELINE - 1)) && ex->magic == CONCUR__EXEC_MAGIC;
}
/* The executors whose queued tasks' or ops' cancel callbacks this thread runs (concur_cancel:
 * that work is theirs), innermost first: frames on the cancelling calls' stacks. */
struct concur__cancel_frame {
	concur_exec *ex;
	struct concur__cancel_frame *up;
};
extern __thread struct concur__cancel_frame *concur__tl_cancels;
/* True where this thread runs ex's own work off its loops: a blocking job of ex, or the
 * callbacks of a cancel of ex's queued work (a join waits for it anyway). */
static inline bool concur__exec_work_here(const concur_exec *ex)
{
	if (concur__tl_job_ex == ex)
		return true;
	for (const struct concur__cancel_frame *fr = concur__tl_cancels; fr; fr = fr->up)
		if (fr->ex == ex)
			return true;
	return false;
}
/* True where a join, a free or a stop of ex must not wait: a loop thread (of any executor: it
 * would hold that loop, whose own messages -- spawns, cancels, stops, resumes bound for ex --
 * sit unsubmitted in its ring meanwhile), or ex's own work (concur__exec_work_here). */
static inline bool concur__exec_no_wait_here(const concur_exec *ex)
{
	return concur__tl_loop || concur__exec_work_here(ex);
}
void concur__work_begin(concur_exec *ex);
void concur__work_end(concur_exec *ex);
/* The begin of a task spawned on its own loop (loop thread): published with the loop's ends. */
void concur__work_begin_local(struct concur__loop *loop);
/* The end of work on a loop of its executor (loop thread): counted with the loop's ends. */
static inline void concur__work_end_local(struct concur__loop *loop)
{
	loop->work_ended++;
}
/* Take the loop's batched work_end()s off the executor's count. Loop thread, every turn. */
void concur__work_publish(struct concur__loop *loop);
void concur__task_cache_free(struct concur__loop *loop);
/* True if the executor with this id is still alive (not freed). */
bool concur__exec_alive(const concur_exec *ex, uint64_t id);
/* Inline: the direct-form I/O calls ask on every operation. */
static inline bool concur__op_supported(const concur_exec *ex, unsigned opcode)
{
	return opcode < 256 && ex->op_supported[opcode];
}

/* ---- control of running tasks (control.c) -------------------------------------------------- */

/* A task starts on the fiber, or ends on its loop: set up and tear down its control state. */
void concur__ctl_start(struct concur__fiber *fib);
void concur__ctl_end(struct concur__loop *loop, struct concur__task *t);
/*
 * t suspends for the first time: onto the loop's live list, which a stop walks to cancel the
 * started tasks. A stop runs on the loop's context, when every started task there has
 * suspended, so the ones that never do (most short tasks) are spared the list.
 */
void concur__ctl_live(struct concur__loop *loop, struct concur__task *t);
/* The class hook of concur_cancel() on a RUNNING task. */
int concur__task_cancel_running(concur_future *f);
int concur__ctl_check_slow(struct concur__task *t); /* cancel requested: shielded? */
/* More than the coarse clock ever lags CLOCK_MONOTONIC (a tick: 1-10 ms): a time later than
 * coarse + this has not come yet. */
#define CONCUR__COARSE_LAG_NS ((int64_t)100000000)
static inline int64_t concur__coarse_now_ns(void); /* the syscall layer, below */
int64_t concur__now_ns(void);                      /* CLOCK_MONOTONIC in ns (sys.c) */
/*
 * A deadline in force has passed. The coarse clock says so for one long past; one that passed
 * less than a tick ago (while the task computed: the loop has not reaped its timer) it does not
 * see, so near the deadline the precise clock decides, as concur_deadline_pop's does.
 */
static inline bool concur__ctl_past_due(const struct concur__ctl *c)
{
	if (c->due == INT64_MAX)
		return false;
	if (c->due <= c->seen_now)
		return true;
	int64_t coarse = concur__coarse_now_ns();
	return c->due <= coarse ||
	       (c->due <= coarse + CONCUR__COARSE_LAG_NS && c->due <= concur__now_ns());
}
/* A deadline in force, not passed, that is in no timer heap: its place was refused (no memory
 * to grow the heap), so it cannot break a wait until it has one. */
static inline bool concur__ctl_unplaced(const struct concur__ctl *c)
{
	return c->tmr.idx == UINT32_MAX && c->due != INT64_MAX && c->due > c->seen_now;
}
/* A task's deadlines changed: put it where it belongs in its loop's timer heap (timer.c).
 * 0, or -ENOMEM: the deadline is still checked when a wait begins, and placed again there (a
 * wait that begins while it cannot be placed is one it cannot break). */
int concur__ctl_retime(struct concur__task *t);
/*
 * In a task, before a wait: 0, or the error the wait ends with at once (-ECANCELED: the task was
 * cancelled and is not shielded; -ETIMEDOUT: a deadline in force has passed). Two loads when
 * neither applies; a deadline in force adds the coarse clock's read, inline (every wait of a
 * task under a deadline scope pays it), and the precise clock's within CONCUR__COARSE_LAG_NS of
 * the deadline. A deadline whose place in the timer heap was refused is placed again here.
 */
static inline int concur__ctl_check_due(struct concur__task *t)
{
	struct concur__ctl *c = &t->fib->ctl;
	if (CONCUR__UNLIKELY(concur__ctl_past_due(c)))
		return -ETIMEDOUT;
	if (CONCUR__UNLIKELY(concur__ctl_unplaced(c))) /* try again: memory may be back */
		(void)concur__ctl_retime(t);
	return 0;
}
static inline int concur__ctl_check(struct concur__task *t)
{
	uint32_t s = atomic_load_explicit(&t->f.state, memory_order_relaxed);
	if (CONCUR__UNLIKELY(s & CONCUR__CANCEL_REQ))
		return concur__ctl_check_slow(t);
	return concur__ctl_check_due(t);
}
/*
 * In a task: suspend in a wait that a cancel or a deadline may break. If one does (on the loop
 * thread), fn(loop, t, arg) must end the wait -- resume t now or later, exactly once -- and
 * return true; false if the wait was over already (t is being resumed). Returns 0, or the
 * error of the interrupt that ended the wait (-ECANCELED, -ETIMEDOUT).
 */
static inline int concur__suspend_interruptible(struct concur__task *t, concur__interrupt_fn fn,
                                                void *arg)
{
	struct concur__ctl *c = &t->fib->ctl;
	c->interrupt = fn;
	c->interrupt_arg = arg;
	c->interrupted = 0;
	concur__suspend();
	c->interrupt = NULL;
	return c->interrupted;
}
/* Loop thread: break the wait t is suspended in (if any) with err. */
void concur__interrupt(struct concur__loop *loop, struct concur__task *t, int err);
/* The earliest deadline in force for a task (timer.c). */
int64_t concur__ctl_due(const struct concur__ctl *c);
/* A deadline that is no task's (key and due set) onto the loop's timer: 0, or -ENOMEM, or
 * -ESHUTDOWN once the loop cleans up. */
int concur__timer_add(struct concur__loop *loop, struct concur__timer *tmr);
/* Take an entry out of the loop's timer heap (loop thread; idx != UINT32_MAX). */
void concur__timer_del(struct concur__loop *loop, struct concur__timer *tmr);
/* Set (or, with INT64_MAX, clear) the deadline of the task's current wait. 0 or -ENOMEM. */
int concur__ctl_wait_deadline(struct concur__task *t, int64_t due);
/* Loop thread: cancel every future I/O op of the loop in flight (io.c). */
void concur__io_cancel_all(struct concur__loop *loop);
/* Loop thread, after a stop: cancel the ops it spared for shielded task t, which is unshielded
 * or ends (io.c). */
void concur__io_spared_end(struct concur__loop *loop, struct concur__task *t);
/* Loop teardown: the timer is disarmed (its CQE reaped by the caller) and the heap freed. */
bool concur__timers_stop(struct concur__loop *loop);

/* ---- the stall detector (stall.c) ---------------------------------------------------------- */

/*
 * Stall detector hook (stall.c), for the loop (loop.c; fiber.c does not switch fibers directly
 * while a detector is set, concur__loop_pop_direct): around each time it runs a fiber,
 *
 *	int64_t t0 = concur__stall_begin(loop);
 *	concur__fiber_run(loop, t);
 *	if (t0)
 *		concur__stall_end(loop, t0);
 *
 * concur__stall_begin() is one relaxed load of the loop's own flag and returns 0 while the
 * loop's executor has no detector: a detector on one executor costs the others nothing.
 */
/* The loop thread's CPU time: what a task consumed, not counting the times the thread was
 * preempted (wall time would blame a task for a busy machine). Never 0. */
static inline int64_t concur__thread_cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return CONCUR__TS_TO_NS(&ts) + 1;
}
static inline int64_t concur__stall_begin(const struct concur__loop *loop)
{
	if (CONCUR__LIKELY(!atomic_load_explicit(&loop->stall_on, memory_order_relaxed)))
		return 0;
	return concur__thread_cpu_ns();
}
void concur__stall_end(struct concur__loop *loop, int64_t t0);
/* concur_exec_free: the executor's detector goes with it (the loops time no run for it). */
void concur__stall_forget(concur_exec *ex);

/* ---- the syscall layer (sys.c) ------------------------------------------------------------- */

/* fork(): m, a process-wide lock, is held across every fork (pthread_atfork: taken before,
 * let go after, in the parent and in the child), so a child never inherits it held by a thread
 * it does not have; then child(), if not NULL, runs in the child, to drop what named the
 * parent's other threads. Call from the owner's one-time set-up (a second call is ignored). */
void concur__fork_guard(pthread_mutex_t *m, void (*child)(void));

/* How many CPUs the calling thread may run on (taskset, a cpuset, systemd's CPUAffinity=),
 * however many the machine has; -1 if the kernel does not say. */
int concur__cpus_allowed_count(void);
/* Pin the calling thread to the (k mod n)-th of the n CPUs it may run on. 0 or -errno. */
int concur__pin_to_allowed(unsigned k);
/* This thread's error message (concur_last_error). */
void concur__set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Sleep while *word == val, until abs_mono (CLOCK_MONOTONIC; NULL: forever). 0 or -errno. */
int concur__futex_wait(_Atomic uint32_t *word, uint32_t val, const struct timespec *abs_mono);
void concur__futex_wake(_Atomic uint32_t *word, int n);
/* concur__now_ns(): CLOCK_MONOTONIC in ns (declared with the deadline checks above). */
/* The last tick's time (a few ns, no syscall): never ahead of concur__now_ns(), so a time
 * "passed" by it has really passed. Inline: every wait under a deadline reads it. */
static inline int64_t concur__coarse_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return CONCUR__TS_TO_NS(&ts);
}
/* Saturating: the CLOCK_MONOTONIC time timeout_ns from now. */
int64_t concur__after_ns(int64_t timeout_ns);
/* The same as an absolute timespec, for futex and condvar waits. */
void concur__deadline(struct timespec *abs, int64_t timeout_ns);
/* Fault in the pages of [p, p + len) (page-aligned) for writing, in one call rather than one
 * fault each; without the kernel's support (Linux 5.14+) nothing, and it is not asked again. */
void concur__prefault(void *p, size_t len);
/* len bytes of fresh anonymous memory aligned to align (a power of two, a multiple of the page),
 * faulted in for writing as concur__prefault does; NULL if the kernel refuses a mapping. */
void *concur__map_aligned(size_t len, size_t align);
/* Unmap [p, p + len); true if done. Refused (splitting a mapping at the map count's limit), the
 * range stays mapped and its pages are given back (MADV_DONTNEED): false. */
bool concur__unmap(void *p, size_t len);

#endif /* CONCUR_INTERNAL_H */

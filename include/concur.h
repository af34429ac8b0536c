/* SPDX-License-Identifier: MIT */
/*
 * concur: an io_uring-based async executor for Linux.
 *
 * One future type for everything (a CPU task, an I/O operation, a timer, a promise). Every
 * future ends through one completion path, and it can be waited on three ways, all woken by
 * that path:
 *   - blocking:  concur_result(f, timeout) from a thread outside the executor parks the thread;
 *   - callback:  concur_on_done(f, fn, arg) runs fn on the completing thread;
 *   - await:     concur_result(f, timeout) inside a task suspends the task's fiber, never the
 *                loop thread, so a task may wait for its own subtasks however deep.
 *
 * Conventions (as in liburing): a function that can fail returns a negative errno value
 * (-EINVAL for bad arguments), never aborts on a caller's mistake. A future's outcome is one
 * int64_t like a CQE's res: >= 0 is the value, < 0 an error (-errno or the task's own negative
 * code). A pointer result travels as (int64_t)(intptr_t)p.
 *
 * Threads: every function may be called from any thread unless it says otherwise. "In a task"
 * means inside a function run by concur_spawn(); "on a loop thread" means on one of the
 * executor's own threads (a callback runs there).
 *
 * Order of completions: if one future A's completion can be observed by anyone (a result
 * returned, concur_done() true, a callback ran) before a second future B's completion begins,
 * every composition sees A first: concur_as_completed_next() yields A before B, and a group
 * whose members A and B both fail reports A's error as its first failure. (Compositions record
 * a completion before the future's state becomes visible as done.) Completions that overlap
 * may be seen in either order: B's may begin while A's is under way and be seen done first
 * (a few stores' window, in which A's compositions have recorded it and its state is not yet
 * final). Within one future, waiters are woken in this order:
 * compositions, blocked threads, then what the compositions made ready (a concur_then of it
 * that ends at once, its input having failed, runs its callbacks there), then callbacks and
 * awaiting tasks in registration order -- so a callback may still be running, or not yet
 * started, when a thread woken by the same completion has already returned from
 * concur_result().
 */
#ifndef CONCUR_H
#define CONCUR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library is built with hidden visibility: what this header declares is its whole ABI. */
#pragma GCC visibility push(default)

#define CONCUR_VERSION_MAJOR 0
#define CONCUR_VERSION_MINOR 1

typedef struct concur_exec concur_exec;
typedef struct concur_future concur_future;

/* A CPU task: its return value (>= 0) or negative error becomes the future's result. */
typedef int64_t (*concur_task_fn)(void *arg);
/* A completion callback: runs once, when f is done (finished or cancelled). */
typedef void (*concur_done_fn)(concur_future *f, void *arg);

/* ------------------------------------------------------------------------------------------ */
/* Executor                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* concur_exec_opts.flags */
enum {
	/* pin loop i to the (i mod n)-th of the n CPUs the creating thread may run on */
	CONCUR_EXEC_PIN = 1u << 0,
	CONCUR_EXEC_SQPOLL =
	    1u << 1, /* kernel SQ polling thread per loop (burns a CPU when busy) */
};

struct concur_exec_opts {      /* zeroed = defaults */
	unsigned loops;        /* loop threads; 0 = the CPUs the caller may run on; at most 1024 */
	unsigned ring_entries; /* SQ size per loop; 0 = 256; 1 is taken as 2; at most 32768 */
	size_t stack_size;     /* fiber stack; 0 = 256 KiB; 16 KiB .. 1 GiB, rounded up to pages */
	unsigned flags;        /* CONCUR_EXEC_* */
	/*
	 * Idle polling, off by default (0: a loop with nothing to run sleeps at once). Otherwise,
	 * after a turn that reaped completions (of I/O, timers, or wake-ups from other threads), a
	 * loop about to sleep first submits what is queued and watches its ring and inbox for up to
	 * idle_poll_ns (a few pauses, then sched_yield(), so a thread waiting for the CPU gets it):
	 * the next request of a busy connection is then often caught without a sleep and a
	 * wake-up, for lower latency and more requests per second in request/response traffic,
	 * paid in CPU time that sleeping would have saved. Idle stays idle: the watch follows
	 * activity and ends when the time is up. At most 1000000000 (1 s). Tens of microseconds
	 * is the useful range (bench/README, "resp/idle-poll").
	 */
	unsigned idle_poll_ns;
};

/*
 * Start an executor: opts->loops loop threads, each owning one io_uring. opts may be NULL.
 * Returns 0 and sets *out, or a negative errno: -EINVAL for bad options, the kernel's error if
 * io_uring is unavailable (ENOSYS: kernel without io_uring; EPERM: kernel.io_uring_disabled
 * or a seccomp filter on io_uring_setup or io_uring_register; see concur_last_error(), which
 * names the call), -EOPNOTSUPP if the kernel lacks IORING_OP_MSG_RING (Linux < 5.18), -EMFILE
 * or -ENFILE at the fd limit, -EAGAIN if a loop thread could not be made (pthread_create: the
 * thread limit), -ENOMEM (including: 4096 executors alive at once already).
 * Nothing is left behind on failure.
 *
 * File descriptors: an executor holds opts->loops + 1 io_uring fds for its whole life: one per
 * loop, and its doorbell, through which threads outside the executor (yours, the blocking
 * pool's helpers) wake a sleeping loop. Those threads hold no fd of their own, so posting from
 * a new thread works at the fd limit too.
 *
 * The loop threads inherit the calling thread's signal mask (as any pthread does): block the
 * signals you handle elsewhere (sigwait, a signalfd, concur_signal) before calling it, or loop
 * threads may take them. Helper threads of the blocking pool likewise inherit the mask of the
 * thread whose concur_spawn_blocking() started them.
 *
 * fork(): a child has none of its parent's loop threads, so it must not use, join or free an
 * executor made before the fork (its rings are the parent's). It may make executors of its own:
 * concur's process-wide locks are held across a fork (pthread_atfork), so none is left held in
 * the child by a thread it does not have, and the blocking pool starts anew in it. Fork from a
 * thread of your own or a blocking job, not from a task or a callback on a loop thread (the child
 * would go on as that loop, on the parent's ring). The parent's executors go on unaffected.
 */
int concur_exec_new(concur_exec **out, const struct concur_exec_opts *opts);

/*
 * Wait until the executor has no work left: no task (nor any task they spawned, however the
 * work keeps unfolding), no I/O operation in flight, no callback of theirs running.
 * timeout_ns < 0 waits forever, 0 polls. Returns 0, -ETIMEDOUT, -EINVAL for a NULL executor,
 * or -EDEADLK when called on a loop thread (in a task or a callback, of any executor: the wait
 * would hold that loop, and whatever it has to send on, for the whole join) or in a blocking job
 * of this executor (concur_spawn_blocking, or a callback of that job's future: the caller's own
 * work would never end), or in a callback that a concur_cancel() of a queued task or operation
 * of this executor runs, or the end of a then, spawn_after or group task refused by a shutdown
 * (-ESHUTDOWN) runs (such a callback is the executor's work too). Join from a thread of your
 * own, or from a blocking job.
 */
int concur_exec_join(concur_exec *ex, int64_t timeout_ns);

/*
 * Stop the work from unfolding: later concur_spawn() calls (from anywhere, tasks included) return a
 * future failed with -ESHUTDOWN, and so do later I/O futures (concur_read() etc.) started off ex's
 * loops, except by ex's own blocking jobs and cancel callbacks (ex's tasks and callbacks on its
 * loops may still do I/O: their cleanup). Queued tasks still run, unless cancel_pending: then each
 * task that has not started ends CANCELLED without running (its waiters learn it when its loop
 * reaches it, which is promptly), and so does each blocking job of ex no helper has picked yet
 * (concur_spawn_blocking), at once, in this call: its callbacks run in the calling thread, as with
 * concur_cancel(). Running tasks finish. Calling it again is harmless.
 */
void concur_exec_shutdown(concur_exec *ex, bool cancel_pending);

/*
 * Shut down (without cancelling), join, stop the loops and release the executor. Futures the
 * caller still holds stay valid (release them as usual); concur_future_exec() on them gives
 * NULL from now on. Must not be called where concur_exec_join() returns -EDEADLK (a loop
 * thread, a blocking job of ex, a callback that is work of ex: see there): there it does
 * nothing. NULL is ignored. A concur_exec_join() or concur_exec_stop() of ex under way in
 * another thread returns before ex is released (this call waits for it); no other call on ex
 * may be under way, or begin once this one has.
 */
void concur_exec_free(concur_exec *ex);

/*
 * Stop an executor gracefully: stop new work as concur_exec_shutdown(ex, false) does, wait up to
 * drain_ns (< 0: forever) for the work to end, then cancel: tasks that have not started end
 * CANCELLED unrun (and blocking jobs no helper picked yet, whose callbacks run in this call's
 * thread, as concur_exec_shutdown's), and every running task is cancelled (concur_cancel: its waits
 * fail with -ECANCELED, its I/O in flight is cancelled in the kernel), and so is future I/O in
 * flight (concur_read() etc.) but the op a shielded cleanup of its loop awaits alone, and join.
 * Future I/O started after that on ex's loops (by a callback, a task that ignored its cancel, a
 * blocking job of ex) is cancelled as it starts (from any other thread it fails with -ESHUTDOWN, as
 * after any shutdown), but a shielded task's (which it must await: an op it leaves running keeps
 * the join waiting). Tasks decide how fast they end (a shielded cleanup runs to its end, its op
 * too; what it awaits through another future, a concur_signal() one or a then of an op, is
 * cancelled like the rest). An idle future that only an outside event ends (a signal future, a read
 * of a quiet socket) is work, so it keeps the drain waiting its whole drain_ns: cancel it first if
 * the drain should end with the tasks. Returns 0 if the work drained in time, -ETIMEDOUT if it had
 * to cancel, -EINVAL for a bad ex, -EDEADLK where concur_exec_join() returns it. The executor stays
 * allocated: concur_exec_free() it afterwards.
 */
int concur_exec_stop(concur_exec *ex, int64_t drain_ns);

/* Number of loops of the executor, or -EINVAL. */
int concur_exec_loops(const concur_exec *ex);

/* Counters of an executor, summed over its loops (monotonic since concur_exec_new). */
struct concur_stats {
	uint64_t tasks_spawned;    /* tasks created by concur_spawn and friends */
	uint64_t tasks_run;        /* tasks that started running */
	uint64_t fibers_parked;    /* times a fiber suspended to wait (await, sleep, yield) */
	uint64_t cqes;             /* CQEs reaped by the loops */
	uint64_t enters;           /* io_uring_enter calls made by the loops */
	uint64_t sleeps;           /* of those, the ones that waited for a CQE (loop idle) */
	uint64_t msg_ring;         /* MSG_RING messages sent between loops */
	uint64_t doorbells;        /* loops woken by threads outside the executor (doorbell ring) */
	uint64_t inbox_items;      /* items taken from the loops' inboxes */
	uint64_t steals;           /* unstarted tasks moved from a busy loop to an idle one */
	uint64_t futex_wakes;      /* blocked foreign threads woken (by ring or by syscall) */
	uint64_t futex_ring_wakes; /* of those, sent as IORING_OP_FUTEX_WAKE riding a submit */
	uint64_t stacks_mapped;   /* fiber stacks carved from reservations (the pools reuse them) */
	uint64_t stack_maps;      /* now, not monotonic: mappings (reservations) holding stacks */
	uint64_t stacks_released; /* free stacks whose memory went back to the kernel */
	uint64_t stack_guard;     /* how guard pages are made: CONCUR_STACK_GUARD_* */
};

/*
 * concur_stats.stack_guard. Stacks are carved from large reservations (one mapping holds many
 * stacks), each stack of a page or more with a guard page below it. MADVISE: guard regions
 * installed with madvise(MADV_GUARD_INSTALL) (Linux 6.13+), which do not split the mapping, so
 * a million stacks need a few thousand mappings. MPROTECT (older kernels): a PROT_NONE page,
 * which splits the mapping: two mappings a stack, so vm.max_map_count (65530 by default) caps
 * the live tasks near 28,000 there (spawns past it fail with -ENOMEM).
 */
enum {
	CONCUR_STACK_GUARD_MADVISE = 1,
	CONCUR_STACK_GUARD_MPROTECT = 2,
};

/*
 * Fill *out with the executor's counters. Values are read without stopping the loops, so each
 * is exact but they are not one snapshot. Returns 0 or -EINVAL.
 */
int concur_exec_stats(const concur_exec *ex, struct concur_stats *out);

/* The ring setup flags the loops got (IORING_SETUP_*), after falling back on older kernels. */
unsigned concur_exec_ring_flags(const concur_exec *ex);

/* ------------------------------------------------------------------------------------------ */
/* Tasks and futures                                                                           */
/* ------------------------------------------------------------------------------------------ */

/*
 * Spawn fn(arg) as a task. Inside a task of the same executor it goes to the local loop;
 * elsewhere round-robin over the loops; an idle loop takes unstarted tasks from a busy one.
 * The task gets a fiber stack only when it starts. Never returns NULL: on failure the future
 * is already failed (-EINVAL for a NULL ex or fn, -ESHUTDOWN after concur_exec_shutdown,
 * -ENOMEM). The caller owns one reference (concur_release); releasing it does not cancel the
 * task (fire and forget): the executor keeps its own reference until the task completes.
 */
concur_future *concur_spawn(concur_exec *ex, concur_task_fn fn, void *arg);

#define CONCUR_STACK_MIN ((size_t)1024)    /* smallest per-spawn stack */
#define CONCUR_STACK_MAX ((size_t)1 << 30) /* largest per-spawn stack */

struct concur_spawn_opts { /* zeroed = as concur_spawn */
	/*
	 * The task's fiber stack in bytes; 0 = the executor's (concur_exec_opts.stack_size).
	 * CONCUR_STACK_MIN .. CONCUR_STACK_MAX, rounded up to a power of two; the fiber's own
	 * record (192 bytes on 64-bit CPUs: its context, its cancellation and deadline state, its
	 * awaiter) is at its top, so a 1 KiB stack leaves 832 bytes for the task's frames.
	 * A stack never grows: size it for the deepest call chain the task makes, signal
	 * handlers included (see below).
	 *
	 * A stack of a page (4 KiB on most systems) or more has a guard page below it, and so does
	 * every stack of 16 KiB or more (rounded up to a page where pages are larger, as on some
	 * aarch64 and ppc64le kernels): an overflow faults (SIGSEGV) at the instruction that
	 * overflows. A stack SMALLER THAN A PAGE shares its page with its neighbours and has NO
	 * guard page of its own: an overflow silently writes into the neighbour below. concur
	 * writes a canary at the bottom of such a stack and checks it each time the task suspends
	 * or returns; a clobbered canary aborts the process with a message, but a frame that jumps
	 * over it goes unseen, and the damage happens before the check. Use them only for tasks
	 * whose depth you know: awaiting futures, promises, timers and concur's I/O calls fits in
	 * 1 KiB (250-400 bytes over such a task's life, record included, in an optimized build; -O0
	 * and the sanitizers need several times more). These do not fit: printf and much of libc;
	 * deep recursion; a signal handler running on the task's stack (the kernel pushes a 1-3 KiB
	 * frame: give handlers SA_ONSTACK and a sigaltstack); and the FIRST call of any function
	 * from a shared library, which the dynamic linker resolves on the caller's stack, saving
	 * the vector registers there (1-3 KiB): link with -Wl,-z,now or make that first call
	 * elsewhere.
	 * The callbacks a task with a stack under 16 KiB runs by completing a future (a promise
	 * it sets, a task it cancels, concur_on_done of a done future) run on its loop's stack,
	 * not on the task's: they are anyone's code.
	 * What they buy: a suspended task costs its stack plus its 128-byte record, 1.2 KiB with
	 * 1 KiB stacks where a stack of a page or more costs at least 4 KiB. A build without
	 * concur's assembly switch (CPUs other than x86-64 and aarch64, or -DCONCUR_UCONTEXT=ON)
	 * has no stacks below a page: the ucontext record alone is most of a kilobyte, so a
	 * smaller size is rounded up to a page, with its guard page.
	 */
	size_t stack_size;
	unsigned flags; /* none yet: must be 0 */
};

/*
 * concur_spawn with options (opts may be NULL: then exactly concur_spawn). Never returns NULL;
 * bad options (a stack_size out of range, unknown flags) give a future failed with -EINVAL.
 * A task whose stack cannot be had when it starts (memory, RLIMIT_AS, the mappings left under
 * vm.max_map_count) ends with -ENOMEM without running; the others are unaffected.
 */
concur_future *concur_spawn_ex(concur_exec *ex, concur_task_fn fn, void *arg,
                               const struct concur_spawn_opts *opts);

/*
 * Spawn fn(arg) as a task on loop loop_idx (0 .. concur_exec_loops(ex) - 1) and only there, for
 * thread-per-core designs (Seastar's submit_to): the task starts, runs and ends on that loop's
 * thread, and an idle loop is never handed it, however busy its loop is. Tasks it spawns with
 * concur_spawn() are not pinned (they go to its loop first, and may be handed to idle loops);
 * use concur_spawn_on() for them too. Tasks pinned to one loop start in the order they reach
 * it (FIFO), not depth first like concur_spawn() in a task. Otherwise as concur_spawn(): never
 * NULL; on failure the future is already failed with -EINVAL (NULL or invalid ex, NULL fn, loop_idx
 * >= the number of loops), -ESHUTDOWN, -ENOMEM.
 */
concur_future *concur_spawn_on(concur_exec *ex, unsigned loop_idx, concur_task_fn fn, void *arg);

/*
 * The result of f, waiting up to timeout_ns (< 0: forever, 0: do not wait; any value up to
 * INT64_MAX is fine: deadlines saturate). Returns the value (>= 0), the task's or operation's
 * error, -ECANCELED if it was cancelled, -ETIMEDOUT if not done in time (f is unchanged, and the
 * wait leaves nothing behind on it), -EINVAL for a NULL or invalid future. f's callbacks may
 * still be running on the completing thread when this returns (see "Order" at the top).
 * In a task it suspends the task's fiber; on a thread outside the executor it blocks the
 * thread; on a loop thread outside any task (a callback) it returns -EDEADLK unless f is
 * already done, since blocking there would stop the loop that must complete f. A task or a
 * blocking job asking for its own result gets -EDEADLK too, whatever timeout_ns (it would wait
 * for itself for good).
 */
int64_t concur_result(concur_future *f, int64_t timeout_ns);

/* True once f is FINISHED or CANCELLED (false for NULL). Never waits. */
bool concur_done(const concur_future *f);

/* True if f ended CANCELLED. */
bool concur_cancelled(const concur_future *f);

/* True while f is RUNNING: a task that started, or an I/O operation in flight (and a promise for
 * the instant concur_promise_set() completes it: RUNNING is how a completion claims it). */
bool concur_running(const concur_future *f);

/*
 * Cancel f. Returns 1 if f is now CANCELLED (it was PENDING, or already cancelled): it will
 * never run, its result is -ECANCELED, waiters are woken (callbacks run in the calling thread,
 * once). Returns 0 when it is too late (finished, or a running future that cannot be stopped).
 * -EINVAL for a NULL or invalid future.
 *
 * A RUNNING task: returns -EINPROGRESS, cancellation requested (from any thread, for a task on
 * any loop). From then on the task is cancelled, for good: the wait it is suspended in and every
 * later wait of the task return -ECANCELED promptly -- concur_result() and every composition
 * waiting in it (wait, gather, as_completed, groups), every concur_await_* I/O form, concur_sleep,
 * the mutex/semaphore/event/channel waits. An I/O operation in flight in that wait is cancelled
 * in the kernel, and the wait returns only after the operation's last completion (the buffer rule
 * holds; an operation that completed first keeps its own result). A call that does not have to
 * wait (a done future, a free mutex, a buffered item) still succeeds. The task itself decides what
 * to do: its future ends with whatever it returns, and returning -ECANCELED ends it CANCELLED.
 * concur_shield_push() hides the cancellation from cleanup waits. Children are not cancelled.
 *
 * An I/O operation in flight (a future of concur_read() etc.; one made on a loop of its executor
 * is in flight from the call, its SQE already in that loop's ring): the kernel is asked to cancel
 * it, returns -EINPROGRESS: the future ends -ECANCELED, or with the operation's own result if it
 * completed first, or -ETIMEDOUT if its deadline fired before it ended. One made elsewhere and
 * not yet submitted by its loop is PENDING: 1.
 */
int concur_cancel(concur_future *f);

/*
 * Call fn(f, arg) once when f is done, in registration order, on the thread that completes f
 * (a loop thread, outside any task: concur_in_task() is false in fn; or the thread that
 * cancels). A task that returns completes itself: fn may then run on that task's own stack,
 * once its function has returned, a stack of at least 16 KiB (a task spawned with a smaller
 * stack is completed on the loop's), so a callback should stay small and hand heavy work to a
 * task. If f is already done,
 * fn runs before concur_on_done returns, in the caller's thread. No lock is held while fn runs:
 * it may release f, spawn, or add callbacks. f stays valid during fn even if fn releases the
 * last reference (either way it is run). Callbacks run after blocked threads are woken: a
 * thread may return from concur_result(f) before (or while) fn runs.
 * The callback does not keep f alive: if f's last reference is released before f completes
 * (a promise never set), fn is never called and its registration is freed.
 * Returns 0, -EINVAL (NULL f or fn), -ENOMEM. On error fn is never called.
 */
int concur_on_done(concur_future *f, concur_done_fn fn, void *arg);

/* Take another reference on f; returns f (NULL if f is NULL or invalid). */
concur_future *concur_retain(concur_future *f);

/* Drop a reference; the last one frees f. NULL is ignored. Does not cancel anything. */
void concur_release(concur_future *f);

/* The executor f belongs to, or NULL once that executor has been freed (or f is a promise
 * made without one). */
concur_exec *concur_future_exec(const concur_future *f);

/*
 * A promise: a future completed by hand (Python's Future.set_result). ex may be NULL.
 * Returns a PENDING future (the caller owns one reference) or NULL on -ENOMEM.
 */
concur_future *concur_promise_new(concur_exec *ex);

/*
 * Complete promise f with res (>= 0 a value, < 0 an error; -ECANCELED completes it CANCELLED).
 * Wakes every waiter, from the calling thread. Returns 0, -EALREADY if f was already done,
 * -EINVAL if f is NULL or not a promise.
 */
int concur_promise_set(concur_future *f, int64_t res);

/* ------------------------------------------------------------------------------------------ */
/* Inside a task                                                                               */
/* ------------------------------------------------------------------------------------------ */

/*
 * Sleep ns nanoseconds. In a task it suspends the fiber (on the loop's one timer, see deadlines
 * below); elsewhere it sleeps the thread. Returns 0, -EINVAL for ns < 0, and in a task
 * -ECANCELED if the task was cancelled or -ETIMEDOUT if a deadline scope of the task passed
 * before the sleep ended.
 */
int concur_sleep(int64_t ns);

/* In a task: let the loop run its other tasks and I/O first. Elsewhere: returns at once. */
void concur_yield(void);

/*
 * Deadline scopes (in a task). concur_deadline_push(timeout_ns) puts a deadline timeout_ns from
 * now over everything the task does until the matching concur_deadline_pop(). Once a pushed
 * deadline has passed, the wait the task is in and every later wait return -ETIMEDOUT (sticky
 * until popped), exactly as a cancel does with -ECANCELED (concur_cancel): an I/O operation in
 * flight is cancelled in the kernel and the wait returns after its last completion. A deadline
 * that passed while the task ran CPU work fails its next wait at once. Nested scopes: the
 * earliest deadline in force wins. Timed waits (concur_result with a timeout, the sync
 * primitives' timeouts) are deadlines on the same machinery.
 * Cost: a deadline that does not fire takes no SQE and no CQE of its own -- each loop keeps its
 * tasks' (and its future I/O ops') deadlines in a heap and arms one kernel timer for the
 * earliest, moved earlier only by a new earliest one.
 * push returns 0, -EINVAL for timeout_ns < 0, -ENOMEM;
 * pop returns 1 if the popped deadline had passed, 0 if not, -EINVAL if none is pushed.
 * Both return -EPERM outside a task.
 */
int concur_deadline_push(int64_t timeout_ns);
int concur_deadline_pop(void);

/*
 * Shields (in a task): between concur_shield_push() and concur_shield_pop() a cancellation of the
 * task is not seen (its waits go on) and the deadline scopes pushed outside the shield do not
 * apply; deadlines pushed inside it do -- bound cleanup with one. When the last shield is popped,
 * a cancellation requested meanwhile applies again (the next wait fails). Nest freely.
 * Both return 0, -EPERM outside a task; pop returns -EINVAL without a shield, push -EOVERFLOW
 * past 65535 nested shields (the task stays shielded).
 */
int concur_shield_push(void);
int concur_shield_pop(void);

/* True in a task whose cancellation was requested (concur_cancel), shielded or not. */
bool concur_cancel_requested(void);

/* True when called inside a task. */
bool concur_in_task(void);

/* The executor whose task or loop thread calls this, or NULL elsewhere. */
concur_exec *concur_current_exec(void);

/*
 * The index (0 .. loops - 1) of the loop whose thread calls this, within its executor, or -1 on
 * a thread that is no executor's loop. In a task: the loop it runs on, the same from its start
 * to its return (a started task never moves; concur_spawn_on() chooses it).
 */
int concur_current_loop(void);

/* ------------------------------------------------------------------------------------------ */
/* Errors                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* A description of any code concur returns (a negative errno); never NULL. */
const char *concur_strerror(int64_t err);

/*
 * The last detailed error message of this thread (for example why io_uring could not be set
 * up), or "" when there is none. Valid until the thread's next concur call.
 */
const char *concur_last_error(void);

/* ---- Composition: wait, gather, as_completed, then, spawn_after, groups, sync, blocking pool
 * (src/wait.c, src/group.c, src/sync.c, src/blocking.c) ---- */

/*
 * Everything in this section waits the same way as concur_result(): in a task it suspends the
 * task's fiber (the loop goes on), on a thread outside the executor it blocks the thread, and on
 * a loop thread outside any task (in a callback) it returns -EDEADLK instead of waiting (when
 * it would have to wait). Nothing here polls: every wait is one future completed through the
 * one completion path. timeout_ns < 0 waits forever, 0 does not wait. A wait that returns
 * (done, timed out or abandoned) takes back everything it hung on its futures: waiting on a
 * future that is then released unset leaks nothing. The futures a call is given must stay
 * referenced by the caller until it returns (it reads them to the end).
 */

/* The most futures one call accepts (more gives -EINVAL). */
#define CONCUR_MAX_FUTURES (1u << 24)

/* concur_wait() modes (Python's concurrent.futures.wait). */
enum concur_wait_mode {
	CONCUR_ALL_COMPLETED = 0, /* return when every future is done */
	CONCUR_FIRST_COMPLETED =
	    1, /* return when at least one is done (at once if one already is) */
	CONCUR_FIRST_EXCEPTION = 2, /* return when one has failed (a failure that happened earlier
	                             * counts; a cancellation is not a failure), else as ALL */
};

/*
 * Wait until the condition of mode holds for futures[0..n) or timeout_ns passes, then report the
 * split (Python's (done, not_done)): done_out[i] (if done_out is not NULL) is set to whether
 * futures[i] is done. A cancelled future counts as done, so a wait never hangs on one. Duplicates
 * are fine; n == 0 returns 0 at once. A timeout is not an error: the split is the answer. Returns
 * the number of indices i whose future is done (>= 0), -EINVAL (NULL array with n > 0, a NULL or
 * invalid future, n > CONCUR_MAX_FUTURES, bad mode), -ENOMEM, or -EDEADLK on a loop thread outside
 * any task when it would have to wait, or when a task or a blocking job would wait for its own
 * future (in ALL_COMPLETED: among them; else: as the only one still pending, at the call or, in
 * FIRST_EXCEPTION, once the others all ended without a failure). In a task, -ECANCELED
 * or -ETIMEDOUT when the task is cancelled or its deadline scope passes while it waits (as every
 * wait does).
 */
int concur_wait(concur_future *const *futures, size_t n, int mode, int64_t timeout_ns,
                bool *done_out);

/* concur_gather_opts.flags */
enum {
	/* Return every item's own result (value or error) in values_out, and 0 once all are done,
	 * instead of the first failure (Python's return_exceptions=True). */
	CONCUR_GATHER_RETURN_ERRORS = 1u << 0,
};

/* Gather progress: completed of total done after elapsed_ns. Runs in the gathering thread/task. */
typedef void (*concur_progress_fn)(size_t completed, size_t total, int64_t elapsed_ns, void *arg);

struct concur_gather_opts { /* zeroed (or a NULL pointer) = defaults */
	unsigned flags;     /* CONCUR_GATHER_* */
	/* NULL: none. Called at most about 100 times per gather (each time another ~1% completed),
	 * and once at the end, whatever gather returns, unless it refused the call (-EINVAL;
	 * -EDEADLK for the caller's own future) or had no memory to begin (-ENOMEM). */
	concur_progress_fn progress;
	void *progress_arg;
};

/*
 * Wait for every future of futures[0..n) (at most timeout_ns in total) and store their results
 * in input order: values_out[i] is futures[i]'s value or error, or -ETIMEDOUT for one not done at
 * the deadline. values_out may be NULL. Returns 0 when every future succeeded; otherwise, after
 * all are done, the first failure (an error, -ECANCELED for a cancelled one) in the order the
 * futures completed (as asyncio.gather raises the first exception; among those done by the time
 * gather has registered on every future -- done before it began or completing meanwhile -- in
 * input order, as concur_as_completed_next() yields them);
 * with CONCUR_GATHER_RETURN_ERRORS, 0 once all are done whatever their results. -ETIMEDOUT when
 * the deadline passed first, -EINVAL, -ENOMEM, -EDEADLK as concur_wait().
 */
int64_t concur_gather(concur_future *const *futures, size_t n, int64_t timeout_ns,
                      int64_t *values_out, const struct concur_gather_opts *opts);

/* An iterator over futures as they complete (Python's as_completed). */
typedef struct concur_as_completed concur_as_completed;

/*
 * Start iterating over futures[0..n) (duplicates are yielded once) with a total deadline of
 * timeout_ns from now (< 0: none). The iterator holds a reference on each future until it
 * yields it. Returns 0 and sets *out, -EINVAL or -ENOMEM.
 */
int concur_as_completed_new(concur_as_completed **out, concur_future *const *futures, size_t n,
                            int64_t timeout_ns);

/*
 * The next done future: those done by the time concur_as_completed_new() returned first (in
 * input order, whenever during the call they completed), then in completion order (a future anyone
 * could see done before another completed comes first; see "Order" at the top). The future yielded
 * is done. Returns 1 and sets *f (the caller now owns that reference; the iterator keeps none), 0
 * when every future was yielded, -ETIMEDOUT when the deadline passed
 * (concur_as_completed_unfinished() and concur_last_error() tell how many of how many are
 * unfinished; calling again keeps returning -ETIMEDOUT unless one completed meanwhile), -EINVAL,
 * -ENOMEM (no memory to wait with), -EDEADLK on a loop thread outside any task or when the one
 * future left is the caller's own and the deadline has not passed (a task or blocking job
 * iterating over its own future waits while another could still come first); in a task also
 * -ECANCELED when it was cancelled, -ETIMEDOUT when a deadline scope of it passed. Use from one
 * thread or task at a time.
 */
int concur_as_completed_next(concur_as_completed *it, concur_future **f);

/* How many futures were not yielded yet; *total (if not NULL) gets the number of distinct
 * futures. 0 for NULL. */
size_t concur_as_completed_unfinished(const concur_as_completed *it, size_t *total);

/* Free the iterator and drop its references on the futures not yielded (nothing of it stays on
 * them). NULL is ignored. */
void concur_as_completed_free(concur_as_completed *it);

/* A continuation: receives the value (>= 0) of the future it follows. */
typedef int64_t (*concur_then_fn)(void *arg, int64_t value);
/* A task with inputs: receives the inputs' values, in input order (values is NULL if n is 0). */
typedef int64_t (*concur_after_fn)(void *arg, const int64_t *values, size_t n);

/*
 * Spawn fn(arg, values, n) on ex as a task once every input is done. Returns at once a pending
 * future (never NULL) that ends with fn's result. If an input failed or was cancelled, fn never
 * runs and the future ends with the first such input's error in input order (-ECANCELED for a
 * cancelled one, and then CANCELLED, as a task that returns -ECANCELED). Waiting holds no
 * thread and no fiber stack: a small record counts the inputs down with completion callbacks
 * and spawns the task when the last one is done. The inputs need not stay referenced by the
 * caller (a task's executor keeps it alive until it completes; a promise must be kept alive by
 * whoever will set it: a promise whose last reference is released unset can never complete, and
 * the returned future then ends CANCELLED, -ECANCELED, fn never run). Cancelling the returned
 * future before the task starts means fn never runs; cancelled while inputs are still pending,
 * it takes its record off them at once (a dependent per connection hung on a long-lived promise
 * and cancelled when the connection closes leaves nothing behind). On bad input the future
 * is already failed: -EINVAL (NULL ex or fn, NULL inputs with n > 0, a NULL or invalid input,
 * n > CONCUR_MAX_FUTURES), -ENOMEM; -ESHUTDOWN if the executor was shut down (or freed) before the
 * task could be spawned. (Freeing the executor while another thread sets an input is a race the
 * caller must avoid, as for any use of a freed executor.)
 *
 * The pipeline "A computes, B processes A's result, C stores B's", with no glue code (every
 * stage is a task; nothing waits in between; the first failure skips the later stages):
 *
 *	// int64_t compute(void *arg), process(void *arg, int64_t value),
 *	//         store(void *arg, const int64_t *values, size_t n)
 *	concur_future *a = concur_spawn(ex, compute, input);
 *	concur_future *b = concur_then(a, process, NULL);
 *	concur_future *c = concur_spawn_after(ex, store, db, &b, 1);
 *	concur_release(a);
 *	concur_release(b);
 *	... concur_result(c, -1) or concur_gather() over many c's ...
 */
concur_future *concur_spawn_after(concur_exec *ex, concur_after_fn fn, void *arg,
                                  concur_future *const *inputs, size_t n);

/*
 * Run fn(arg, value of f) as a task when f completes; same rules as concur_spawn_after() with
 * the single input f (never NULL; if f failed or was cancelled fn never runs and the future ends
 * with f's error). It runs on f's executor (the future fails with -ESHUTDOWN if that one was
 * freed), or the calling thread's one if f has none (a promise made with NULL); with neither,
 * the future fails with -EINVAL. Chains of any length are fine (no recursion).
 */
concur_future *concur_then(concur_future *f, concur_then_fn fn, void *arg);

/* A task group (structured concurrency): spawn into it, then wait for all of it. */
typedef struct concur_group concur_group;

/* concur_group_new() flags */
enum {
	/* On the first failure, cancel the group (concur_group_cancel: members that have not
	 * started never run, running ones are cancelled and their waits fail with -ECANCELED),
	 * and refuse later spawns (they return a future already ended -ECANCELED). Running
	 * members can check concur_group_cancelled() / concur_cancel_requested(). */
	CONCUR_GROUP_CANCEL_ON_FAILURE = 1u << 0,
};

/* Make a group spawning on ex. Returns 0 and sets *out, -EINVAL (NULL ex or out, unknown
 * flags) or -ENOMEM. */
int concur_group_new(concur_group **out, concur_exec *ex, unsigned flags);

/*
 * Spawn fn(arg) as a member of g (a member may spawn more members). Returns the task's future
 * (the caller owns one reference; releasing it is fine) and never NULL: on failure, a future
 * already failed (-EINVAL, -ENOMEM, -ESHUTDOWN after a shutdown of its executor or once that
 * was freed, -ECANCELED after the group was cancelled). A spawn refused so is not a member: the
 * failure is the caller's to handle, and neither concur_group_wait() nor
 * CONCUR_GROUP_CANCEL_ON_FAILURE sees it (a graceful stop refusing a member's new sibling does
 * not cancel the members it lets finish).
 */
concur_future *concur_group_spawn(concur_group *g, concur_task_fn fn, void *arg);

/*
 * Wait until no member is left (members spawned meanwhile included). Returns 0 if every member
 * succeeded, else the error of the first member that failed (in completion order, as observable:
 * see "Order" at the top; -ECANCELED if members were only cancelled), -ETIMEDOUT, -EINVAL, -EDEADLK
 * (see the top of this section; also for a member of g, which would wait for itself), -ENOMEM. A
 * task waiting here that is cancelled cancels the group (concur_group_cancel) and still waits,
 * shielded (timeout_ns still holds), for its members to end, then returns -ECANCELED. When it
 * returns 0 or an error other than -ETIMEDOUT, -EINVAL, -EDEADLK or -ENOMEM, every member is done.
 */
int64_t concur_group_wait(concur_group *g, int64_t timeout_ns);

/* Cancel every member and refuse later spawns: a member that has not started ends CANCELLED
 * without running; a running one is cancelled as concur_cancel() does (its waits fail with
 * -ECANCELED from now on; what it returns ends it). Returns how many members were cancelled or
 * told to stop, or -EINVAL. Needs no memory (without it, members are taken one at a time). */
int concur_group_cancel(concur_group *g);

/* True once g was cancelled (by concur_group_cancel or a failure with CANCEL_ON_FAILURE). */
bool concur_group_cancelled(const concur_group *g);

/* Drop the group. Members still running go on (fire and forget); their futures stay valid.
 * NULL is ignored. */
void concur_group_free(concur_group *g);

/*
 * Fiber-aware synchronisation. Each works across loops and with threads outside the executor:
 * a waiter in a task suspends its fiber, a foreign thread blocks. Waiters queue in FIFO order.
 * Objects are made with *_new (0, -EINVAL, -ENOMEM) and freed with *_free (NULL is ignored;
 * nobody may be waiting then; a waiter may free it as soon as its own wait returned, even while
 * the call that woke it is still returning). A wait that times out takes itself off the object
 * and leaves nothing behind, however many time out. Besides the errors listed with each, every
 * wait may fail with -ENOMEM (no memory to wait: nothing was taken) and, in a task, -ECANCELED
 * or -ETIMEDOUT (the task cancelled, its deadline scope passed).
 */
typedef struct concur_mutex concur_mutex;
typedef struct concur_sem concur_sem;
typedef struct concur_event concur_event;
typedef struct concur_chan concur_chan;

int concur_mutex_new(concur_mutex **out);
void concur_mutex_free(concur_mutex *m);
/*
 * Lock m, waiting up to timeout_ns. Fair: unlock hands the mutex directly to the longest waiter
 * (FIFO handoff), so no one can barge in ahead of the queue. Not recursive: owners are not
 * tracked (a task may migrate between threads only by being resumed, so ownership is by
 * convention). Returns 0, -ETIMEDOUT, -EINVAL, -EDEADLK (loop thread outside a task, locked).
 */
int concur_mutex_lock(concur_mutex *m, int64_t timeout_ns);
/* Lock m if it is free and nobody queues for it: 0, -EBUSY or -EINVAL. */
int concur_mutex_trylock(concur_mutex *m);
/* Unlock m (handing it to the first waiter if any): 0, -EPERM if it was not locked, -EINVAL. */
int concur_mutex_unlock(concur_mutex *m);
/* How many wait for m now (a snapshot; 0 for NULL). */
size_t concur_mutex_waiters(const concur_mutex *m);

/* A counting semaphore with initial count value (at most INT64_MAX). */
int concur_sem_new(concur_sem **out, int64_t value);
void concur_sem_free(concur_sem *s);
/* Take one unit, waiting up to timeout_ns (FIFO): 0, -ETIMEDOUT, -EINVAL, -EDEADLK. */
int concur_sem_acquire(concur_sem *s, int64_t timeout_ns);
/* Give n units back (n >= 1), waking up to n waiters in FIFO order: 0, -EINVAL, -EOVERFLOW. */
int concur_sem_release(concur_sem *s, int64_t n);
/* The number of units available now (a snapshot), or -EINVAL. */
int64_t concur_sem_value(const concur_sem *s);

/* An event (Python's threading.Event), initially clear. */
int concur_event_new(concur_event **out);
void concur_event_free(concur_event *e);
/* Set the flag and wake every waiter: 0 or -EINVAL. */
int concur_event_set(concur_event *e);
/* Clear the flag: 0 or -EINVAL. */
int concur_event_clear(concur_event *e);
/* True if set (false for NULL). */
bool concur_event_is_set(const concur_event *e);
/* Wait until the flag is set: 0 (at once if set), -ETIMEDOUT, -EINVAL, -EDEADLK. */
int concur_event_wait(concur_event *e, int64_t timeout_ns);

/*
 * A bounded multi-producer multi-consumer channel of int64_t items (a pointer travels as
 * (int64_t)(intptr_t)p), holding up to capacity items (1 .. 2^30). Senders and receivers each
 * queue FIFO; an item goes straight to a waiting receiver when there is one.
 */
int concur_chan_new(concur_chan **out, size_t capacity);
void concur_chan_free(concur_chan *c);
/* Send v, waiting up to timeout_ns for room: 0, -EPIPE if the channel is (or gets) closed,
 * -ETIMEDOUT, -EINVAL, -EDEADLK. */
int concur_chan_send(concur_chan *c, int64_t v, int64_t timeout_ns);
/* Receive into *v, waiting up to timeout_ns: 0, -EPIPE once the channel is closed and drained
 * (items sent before close are still received), -ETIMEDOUT, -EINVAL, -EDEADLK. */
int concur_chan_recv(concur_chan *c, int64_t *v, int64_t timeout_ns);
/* Close c: later sends fail with -EPIPE, and every waiting sender and receiver is woken with
 * -EPIPE. Returns 0, -EALREADY if already closed, -EINVAL. */
int concur_chan_close(concur_chan *c);
/* Items buffered now (a snapshot), or 0 for NULL. */
size_t concur_chan_len(const concur_chan *c);

/*
 * Run fn(arg) on a helper thread of the blocking pool, for blocking syscalls and long CPU work
 * that would stall a loop. Helpers are started lazily, at most concur_blocking_config()'s max
 * at a time (jobs queue beyond that), and an idle one exits after the idle time. The returned
 * future (never NULL; on failure already failed with -EINVAL, -ESHUTDOWN, -ENOMEM, or -EAGAIN
 * when no helper thread exists and none can be made) completes
 * through the one completion path: a task awaiting it is resumed on its own loop (the helper
 * posts it there with MSG_RING). The job counts as the executor's work for concur_exec_join().
 * Cancelling the future before a helper picks the job means fn never runs (concur_cancel()
 * returns 1) and the job leaves the queue at once (no longer work for a join). Once a helper has
 * picked it the job is RUNNING (concur_running() is true) and runs to its end: concur_cancel()
 * returns 0 and the future ends with fn's result (-ECANCELED ends it CANCELLED, as a task's). After
 * concur_exec_shutdown(ex, true) (or a concur_exec_stop() past its drain time), a job not
 * picked yet never runs: it ends CANCELLED in that call, however busy the helpers are.
 */
concur_future *concur_spawn_blocking(concur_exec *ex, concur_task_fn fn, void *arg);

/*
 * Configure the process-wide blocking pool: at most max_threads helpers (0 keeps the current
 * value; default 64, at most 4096) and idle_ns before an idle helper exits (0 keeps the
 * current value; default 10 s). Returns 0 or -EINVAL.
 */
int concur_blocking_config(unsigned max_threads, int64_t idle_ns);

/* The number of helper threads alive now (a snapshot). */
unsigned concur_blocking_threads(void);

/* A stall report: a task ran ran_ns on loop loop_idx without suspending. On the loop thread. */
typedef void (*concur_stall_fn)(concur_exec *ex, unsigned loop_idx, int64_t ran_ns, void *arg);

/*
 * Count (and report through fn, if not NULL) every time a task of ex runs for more than
 * threshold_ns of CPU time without suspending (yield, await, sleep or return). CPU time, not wall
 * time: a loop thread preempted by a busy machine is not the task's fault. threshold_ns <= 0 turns
 * the detector off. fn runs on the loop thread right after the task gives the loop back; keep it
 * short. Each report is made with one setting: fn with its own arg, for ex only. Once a call
 * that turns the detector off or changes fn/arg returns, the old fn is neither running nor
 * called again (so its arg may be freed) -- except when that call is made on one of ex's own
 * loop threads or inside a report, where it does not wait for reports running on other loops.
 * concur_exec_free() turns the detector off. Returns 0, -EINVAL, or -ENOSPC if too many
 * executors have a detector (16).
 * Cost: while it is on, ex's loops read the thread's CPU clock (a syscall, no vDSO) twice per
 * task run and switch between fibers through the loop rather than directly: a monitoring aid
 * for ex only; other executors pay nothing.
 */
int concur_stall_detector(concur_exec *ex, int64_t threshold_ns, concur_stall_fn fn, void *arg);

/* How many stalls were counted on ex since its detector was set (0 if none). */
uint64_t concur_stall_count(const concur_exec *ex);
/* ---- I/O (src/io.c) ---- */
/*
 * Every kernel operation comes in two forms:
 *   - concur_OP(ex, ...) returns a future, from any thread. The operation is submitted on one of
 *     ex's loops (the caller's own loop when called there) and its result is the future's
 *     result: the kernel's res (>= 0) or a negative errno. Never NULL: on a bad argument or a
 *     missing kernel feature the future is already failed (-EINVAL, -EOPNOTSUPP, -ENOMEM; and
 *     -ESHUTDOWN when started off ex's loops after a shutdown, see concur_exec_shutdown()).
 *   - concur_await_OP(...) is the direct form, for inside a task: it submits on the task's loop,
 *     suspends the task until the completion arrives and returns the result, with no heap
 *     allocation. Outside a task it returns -EPERM at once.
 *
 * The buffer rule: a future of an I/O operation is done only once the kernel has posted the
 * operation's completion (even when it was cancelled or timed out), so every buffer, path,
 * iovec, msghdr or address passed in must stay valid until the future is done (or the direct
 * form returns), and may be freed or reused as soon as it is. The same holds for the fd: an
 * operation is submitted with its loop's next batch and the kernel finds the file by the fd's
 * number only then, so closing the fd (close(2)) before the future is done may let the
 * operation act on a new file given the same number.
 *
 * Deadlines: operations taking timeout_ns carry a deadline when timeout_ns >= 0: if the
 * operation has not completed timeout_ns nanoseconds after the call, it is cancelled and the
 * result is -ETIMEDOUT (the kernel's -ECANCELED, or -EINTR for an interrupted worker, mapped);
 * the future ends FINISHED, not CANCELLED. An operation that completed anyway keeps its own
 * result. timeout_ns < 0: no deadline (CONCUR_NO_TIMEOUT). Both forms put the deadline on the
 * loop's one timer (see the deadline scopes above: no SQE and no CQE of its own unless it
 * fires), whose firing cancels the operation (IORING_OP_ASYNC_CANCEL): that stops one blocked
 * in a kernel worker too, such as a splice or tee from an empty pipe, for which the kernel does
 * not fire a linked timeout. Without memory to grow the timer's heap, or on a loop that is
 * stopping, the operation takes a linked IORING_OP_LINK_TIMEOUT instead, with that limit, and
 * counted from its submission on the loop rather than from the call.
 *
 * Cancellation: concur_cancel() on an I/O future returns 1 if the operation was not submitted
 * yet (it never will be), or -EINPROGRESS once the kernel was asked to cancel it
 * (IORING_OP_ASYNC_CANCEL): the future then ends CANCELLED with -ECANCELED, or FINISHED with the
 * operation's own result if it completed first, or with -ETIMEDOUT if its deadline fired before
 * it ended. Join accounting: an operation in flight counts as work for concur_exec_join().
 *
 * Offsets: an offset of -1 means the file's current position (read, write, readv, writev);
 * below -1 is -EINVAL. Lengths are capped at 0x7ffff000 bytes per call, like read(2). A NULL
 * buffer with a nonzero length, a NULL path, address or msghdr give -EINVAL; descriptors are
 * checked by the kernel (-EBADF). An operation the running kernel lacks (probed once per
 * executor) gives -EOPNOTSUPP at once, never a hang.
 */
#define CONCUR_NO_TIMEOUT ((int64_t)-1)

#include <sys/socket.h> /* socklen_t, struct sockaddr, struct msghdr */
#include <sys/types.h>  /* mode_t */
#include <sys/uio.h>    /* struct iovec */
struct statx;

/* A no-op through the ring (res 0): a round trip to the kernel, for benchmarks. */
#define CONCUR_HAVE_NOP 1
concur_future *concur_nop(concur_exec *ex);
/* In a task: a no-op through the task's loop's ring; 0, or -EPERM outside a task. */
int64_t concur_await_nop(void);

/* read(2)/pread(2) at off (-1: current position): bytes read, 0 at end of file, -errno. */
concur_future *concur_read(concur_exec *ex, int fd, void *buf, size_t len, int64_t off,
                           int64_t timeout_ns);
int64_t concur_await_read(int fd, void *buf, size_t len, int64_t off, int64_t timeout_ns);

/* write(2)/pwrite(2) at off (-1: current position): bytes written (maybe short), -errno. */
concur_future *concur_write(concur_exec *ex, int fd, const void *buf, size_t len, int64_t off,
                            int64_t timeout_ns);
int64_t concur_await_write(int fd, const void *buf, size_t len, int64_t off, int64_t timeout_ns);

/* preadv(2) (iovcnt 1..IOV_MAX, off -1: current position): bytes read, -errno. */
concur_future *concur_readv(concur_exec *ex, int fd, const struct iovec *iov, int iovcnt,
                            int64_t off, int64_t timeout_ns);
int64_t concur_await_readv(int fd, const struct iovec *iov, int iovcnt, int64_t off,
                           int64_t timeout_ns);

/* pwritev(2) (iovcnt 1..IOV_MAX, off -1: current position): bytes written, -errno. */
concur_future *concur_writev(concur_exec *ex, int fd, const struct iovec *iov, int iovcnt,
                             int64_t off, int64_t timeout_ns);
int64_t concur_await_writev(int fd, const struct iovec *iov, int iovcnt, int64_t off,
                            int64_t timeout_ns);

/* fsync(2), or fdatasync(2) when datasync: 0 or -errno. */
concur_future *concur_fsync(concur_exec *ex, int fd, bool datasync, int64_t timeout_ns);
int64_t concur_await_fsync(int fd, bool datasync, int64_t timeout_ns);

/* openat(2): the new fd, or -errno. path must stay valid until done. */
concur_future *concur_openat(concur_exec *ex, int dfd, const char *path, int flags, mode_t mode,
                             int64_t timeout_ns);
int64_t concur_await_openat(int dfd, const char *path, int flags, mode_t mode, int64_t timeout_ns);

/* close(2): 0 or -errno (-EBADF for a descriptor that is not open). */
concur_future *concur_close(concur_exec *ex, int fd, int64_t timeout_ns);
int64_t concur_await_close(int fd, int64_t timeout_ns);

/* statx(2) into *out: 0 or -errno. */
concur_future *concur_statx(concur_exec *ex, int dfd, const char *path, int flags, unsigned mask,
                            struct statx *out, int64_t timeout_ns);
int64_t concur_await_statx(int dfd, const char *path, int flags, unsigned mask, struct statx *out,
                           int64_t timeout_ns);

/* fallocate(2): 0 or -errno (-EINVAL for a negative off or len). */
concur_future *concur_fallocate(concur_exec *ex, int fd, int mode, int64_t off, int64_t len,
                                int64_t timeout_ns);
int64_t concur_await_fallocate(int fd, int mode, int64_t off, int64_t len, int64_t timeout_ns);

/* unlinkat(2) (flags 0 or AT_REMOVEDIR): 0 or -errno. */
concur_future *concur_unlinkat(concur_exec *ex, int dfd, const char *path, int flags,
                               int64_t timeout_ns);
int64_t concur_await_unlinkat(int dfd, const char *path, int flags, int64_t timeout_ns);

/* renameat2(2): 0 or -errno. */
concur_future *concur_renameat(concur_exec *ex, int olddfd, const char *oldpath, int newdfd,
                               const char *newpath, unsigned flags, int64_t timeout_ns);
int64_t concur_await_renameat(int olddfd, const char *oldpath, int newdfd, const char *newpath,
                              unsigned flags, int64_t timeout_ns);

/* mkdirat(2): 0 or -errno. */
concur_future *concur_mkdirat(concur_exec *ex, int dfd, const char *path, mode_t mode,
                              int64_t timeout_ns);
int64_t concur_await_mkdirat(int dfd, const char *path, mode_t mode, int64_t timeout_ns);

/* socket(2): the new fd, or -errno. */
concur_future *concur_socket(concur_exec *ex, int domain, int type, int protocol,
                             int64_t timeout_ns);
int64_t concur_await_socket(int domain, int type, int protocol, int64_t timeout_ns);

/* accept4(2) (addr and addrlen may be NULL): the new fd, or -errno. */
concur_future *concur_accept(concur_exec *ex, int fd, struct sockaddr *addr, socklen_t *addrlen,
                             int flags, int64_t timeout_ns);
int64_t concur_await_accept(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags,
                            int64_t timeout_ns);

/* connect(2): 0 or -errno (-ECONNREFUSED, ...). */
concur_future *concur_connect(concur_exec *ex, int fd, const struct sockaddr *addr,
                              socklen_t addrlen, int64_t timeout_ns);
int64_t concur_await_connect(int fd, const struct sockaddr *addr, socklen_t addrlen,
                             int64_t timeout_ns);

/* recv(2): bytes received, 0 when the peer has shut down, -errno (-ECONNRESET, ...). */
concur_future *concur_recv(concur_exec *ex, int fd, void *buf, size_t len, int flags,
                           int64_t timeout_ns);
int64_t concur_await_recv(int fd, void *buf, size_t len, int flags, int64_t timeout_ns);

/* send(2): bytes sent (maybe short), -errno (-EPIPE, -ECONNRESET, ...). Pass MSG_NOSIGNAL to
 * avoid SIGPIPE. */
concur_future *concur_send(concur_exec *ex, int fd, const void *buf, size_t len, int flags,
                           int64_t timeout_ns);
int64_t concur_await_send(int fd, const void *buf, size_t len, int flags, int64_t timeout_ns);

/* recvmsg(2): bytes received, -errno. msg and everything it points to stays valid until done. */
concur_future *concur_recvmsg(concur_exec *ex, int fd, struct msghdr *msg, int flags,
                              int64_t timeout_ns);
int64_t concur_await_recvmsg(int fd, struct msghdr *msg, int flags, int64_t timeout_ns);

/* sendmsg(2): bytes sent, -errno. */
concur_future *concur_sendmsg(concur_exec *ex, int fd, const struct msghdr *msg, int flags,
                              int64_t timeout_ns);
int64_t concur_await_sendmsg(int fd, const struct msghdr *msg, int flags, int64_t timeout_ns);

/* shutdown(2) (how: SHUT_RD, SHUT_WR, SHUT_RDWR): 0 or -errno. */
concur_future *concur_shutdown(concur_exec *ex, int fd, int how, int64_t timeout_ns);
int64_t concur_await_shutdown(int fd, int how, int64_t timeout_ns);

/* One-shot poll for events (POLLIN, POLLOUT, ...): the events that are ready, or -errno. */
concur_future *concur_poll(concur_exec *ex, int fd, unsigned events, int64_t timeout_ns);
int64_t concur_await_poll(int fd, unsigned events, int64_t timeout_ns);

/* splice(2) of up to len bytes (one side must be a pipe; offsets -1 for a pipe or the current
 * position): bytes moved, -errno. */
concur_future *concur_splice(concur_exec *ex, int fd_in, int64_t off_in, int fd_out,
                             int64_t off_out, size_t len, unsigned flags, int64_t timeout_ns);
int64_t concur_await_splice(int fd_in, int64_t off_in, int fd_out, int64_t off_out, size_t len,
                            unsigned flags, int64_t timeout_ns);

/* A kernel timer (IORING_OP_TIMEOUT) of ns nanoseconds: 0 when it expires, -ECANCELED if
 * cancelled, -EINVAL for ns < 0. */
concur_future *concur_timeout(concur_exec *ex, int64_t ns);
int64_t concur_await_timeout(int64_t ns);

/* ---- Signals (src/signal.c) ---- */
#include <signal.h> /* sigset_t */

/*
 * A future that completes with the number of the next signal of set delivered to the process
 * (SIGTERM, SIGINT, SIGHUP, ...): a signalfd for set, read through the ring. Waiting for it costs
 * no thread and no CPU (the loops keep sleeping). Never NULL: on failure the future is already
 * failed with -EINVAL (ex NULL or invalid; set NULL or holding no signal but SIGKILL/SIGSTOP,
 * which no signalfd can take), -ENOMEM, signalfd(2)'s error (-EMFILE, -ENFILE, ...), or
 * -ESHUTDOWN (called off ex's loops after a shutdown, as an I/O future).
 *
 * The signal mask is the caller's job. Every signal of set must be blocked in EVERY thread of
 * the process, or the kernel may deliver it the ordinary way first -- its default action (SIGTERM
 * kills the process) or a handler -- in any thread that has it unblocked. Block them with
 * pthread_sigmask(SIG_BLOCK, set, NULL) in main before concur_exec_new() and before creating
 * any other thread: new threads inherit the mask (the loop threads from the thread calling
 * concur_exec_new, the blocking pool's helpers from the thread that first needs one). A signal
 * blocked everywhere waits, pending, until a concur_signal future reads it: one sent before the
 * call completes the future at once.
 *
 * Which signals it sees: those sent to the process (kill(getpid(), sig), kill(1) from a shell,
 * a terminal's ^C) and those sent to the loop thread that reads. Not one aimed at another thread
 * with raise() (in a threaded program raise() signals the calling thread only) or
 * pthread_kill(): use kill(getpid(), sig).
 *
 * Several futures for the same signal: each delivered signal is taken by exactly one of them
 * (which one is unspecified); the others keep waiting for the next one. A standard signal sent
 * several times before it is read is delivered once (POSIX); realtime signals queue, one each.
 *
 * The signalfd is closed when the future is done (before it is seen done). The future is
 * RUNNING while it waits (a poll of the signalfd in the ring, read when it fires: no kernel
 * worker thread, however many other signals the process gets meanwhile); concur_cancel()
 * cancels the poll in the kernel and returns -EINPROGRESS (or 1 if the poll was not yet
 * submitted, once the future is CANCELLED): the future then ends CANCELLED with -ECANCELED, or
 * FINISHED with the signal's number if one was read first. Its poll counts as work for
 * concur_exec_join() until then, so cancel a future that may never fire before
 * concur_exec_free().
 */
concur_future *concur_signal(concur_exec *ex, const sigset_t *set);

/*
 * Streams: one armed operation, many completions, consumed one item at a time. A stream lives on
 * the loop of the task that opened it; next(), give() and close() are called from tasks on that
 * loop (which is where the opening task stays), elsewhere they return -EPERM (close() does
 * nothing). cancel() works from any thread. An open stream counts as work for
 * concur_exec_join() until it is closed and the kernel is done with it, idle or not, and
 * concur_exec_stop() does not close it: close every stream before its task returns, on every
 * path, or join, stop and free wait for ever.
 *
 * concur_stream_next() suspends the task until the next item: for an accept stream a new fd
 * (>= 0); for a recv stream the number of bytes (> 0), with *chunk set to a buffer borrowed from
 * the loop's provided-buffer ring (4 KiB buffers), to be given back with concur_stream_give()
 * (soon: the ring is shared by the loop's streams; when it runs dry, recv streams pause and
 * re-arm when buffers come back). The end of a stream is reported exactly once: 0 for a recv
 * stream whose peer shut down, otherwise the error that ended it (-ECANCELED after
 * concur_stream_cancel(), -ECONNRESET, ...); after that next() returns -ENODATA. A kernel that
 * stops a multishot on its own (CQ overflow, buffers running out) is re-armed transparently.
 *
 * Transient accept errors do not end an accept stream: -EMFILE, -ENFILE, -ENOMEM and -ENOBUFS
 * are returned by next() once (so the caller can log them; the connection that hit them stays
 * in the listen backlog where the kernel left it), and the stream re-arms by itself after a
 * back-off: a kernel timeout on the loop, 4 ms doubling up to 512 ms, back to 4 ms after the
 * next accepted connection. A server at its fd limit so resumes accepting as soon as fds are
 * free again. A connection aborted by its peer before it was accepted (-ECONNABORTED) is
 * skipped: the stream accepts the next at once (as Go's and libuv's accept loops do), so
 * clients that abort cannot slow the others down; only 16 in a row with none accepted between
 * are taken for a failing socket, and from then -ECONNABORTED is transient as above until a
 * connection is accepted. Any other negative value from an accept stream is its end.
 */
typedef struct concur_stream concur_stream;

struct concur_chunk {
	void *data;   /* the received bytes, borrowed */
	size_t len;   /* how many */
	uint32_t bid; /* which buffer, and which lending of it: for concur_stream_give */
};

/* In a task: open a multishot accept stream on listening socket fd (flags as accept4). It
 * stops accepting once 64 connections wait unconsumed and goes on when no more than 32 do; one
 * wake-up of the kernel's accept takes all the listen backlog holds, so a stalled consumer holds
 * at most 64 and one backlog's worth of accepted fds: size listen()'s backlog to the fds you can
 * spare. Returns 0 and *out, -EPERM outside a task, -EINVAL, -ENOMEM, -EOPNOTSUPP. */
int concur_accept_stream(concur_stream **out, int fd, int flags);
/* In a task: open a multishot recv stream on stream socket fd (flags as recv). Returns as
 * above, -EOPNOTSUPP for a socket not of SOCK_STREAM (a datagram of no bytes would read as the
 * end), getsockopt(2)'s error for an fd that is no socket (-ENOTSOCK, -EBADF), or the error
 * setting up the loop's buffer ring. The kernel receives ahead of the consumer: items queue in
 * the stream, each holding a buffer of the ring. */
int concur_recv_stream(concur_stream **out, int fd, int flags);
/*
 * In a task: open an on-demand recv stream on socket fd: the same items, but one single-shot
 * recv is armed only while a consumer waits (in next() or a next-future) and nothing is queued.
 * A connection whose task is idle in next() holds no buffer until bytes arrive, and one whose
 * task is busy elsewhere (say blocked sending to a client that never reads) holds none at all,
 * so no client can dry the loop's ring for the others. A next() ended by a deadline or a cancel
 * stops the recv. Bytes that come with no consumer waiting any more (that next() racing them, a
 * next-future cancelled or released) are moved to a buffer of the stream's own (4 KiB of heap,
 * lent by the next next() as any chunk, with its own bid), and the ring's buffer goes back at
 * once -- unless that buffer of the stream's own is still lent (or cannot be had): then those
 * bytes keep their ring buffer until consumed, so give a chunk back before leaving a wait.
 * Servers want this one; the multishot form suits a consumer that keeps up with a bulk
 * transfer. Returns as concur_recv_stream().
 */
int concur_recv_stream_on_demand(concur_stream **out, int fd, int flags);
/* In a task on the stream's loop: the next item (see above), waiting for it. chunk may be NULL
 * for accept streams. -EBUSY if another task is in next() on s (waiting, or woken and not yet
 * back) or a next-future is pending, -EINVAL for bad arguments, -EPERM from elsewhere. */
int64_t concur_stream_next(concur_stream *s, struct concur_chunk *chunk);
/*
 * In a task on the stream's loop: next() as a future, so that "the next item or something else"
 * is one concur_wait(FIRST_COMPLETED). The future completes with what next() would return, and
 * *chunk (which must stay valid until then; NULL allowed for accept streams) is filled just
 * before it completes. Never NULL; it fails at once with -EBUSY if a task or another pending
 * next-future waits on s, -EINVAL, -EPERM or -ENOMEM.
 * An item is taken from the stream only when it is handed to the future: if the future is
 * cancelled (concur_cancel returns 1) or released by every holder before it completes, no item
 * is lost -- it stays in the stream for the next call, and *chunk is not written. Once the
 * future has completed, the item (an fd, a borrowed chunk) is the caller's, even if it releases
 * the future without looking: so after a FIRST_COMPLETED wait, either take the result of a done
 * next-future or cancel it (cancel returns 0 when it was done: take it then). A pending
 * next-future ends CANCELLED when the stream is closed. Release it from the stream's loop (a
 * release from another thread racing with the item's arrival may hand the item to nobody).
 */
concur_future *concur_stream_next_future(concur_stream *s, struct concur_chunk *chunk);
/* Give a borrowed buffer back, to the stream that lent it (the ring is the loop's, so a ring
 * buffer is taken back by any stream of the loop; a buffer of a stream's own only by that one).
 * Returns 0, or -EINVAL (also for one given back already, even when its buffer has been lent
 * again since: the bid tells the lendings apart, up to 65,535 lendings of that buffer later; a
 * check against a bug, not a promise; and for the zeroed chunk of a next() that returned no
 * bytes). */
int concur_stream_give(concur_stream *s, const struct concur_chunk *chunk);
/* Ask the kernel to stop the stream early; next() then drains what came and reports the end
 * (-ECANCELED unless the stream ended on its own first). Callable from any thread, loops of
 * other executors included: off the stream's loop the request is posted to it and takes effect
 * there shortly after the call returns. It must not race with (or follow) concur_stream_close().
 * Returns 0, or -EINVAL for NULL. */
int concur_stream_cancel(concur_stream *s);
/* Close the stream: cancels it if still armed, closes accepted fds and gives back buffers not
 * yet consumed; the memory goes once the kernel's last completion arrived (at once if none is
 * to come): as a future after its last release, s is not to be used after this call, by any
 * of the functions above. No other task may be in its next() (waiting, or woken and not yet
 * back). Borrowed chunks must have been given back. Keep the stream's fd open until this call;
 * once it returns, the fd may be closed at once (what the stream had queued was submitted, so
 * a new file given the same number is not touched). NULL and a call off the stream's loop are
 * ignored. */
void concur_stream_close(concur_stream *s);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif

#endif /* CONCUR_H */

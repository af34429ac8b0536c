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
 */
#ifndef CONCUR_H
#define CONCUR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

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
	CONCUR_EXEC_PIN = 1u << 0, /* pin loop i to online CPU i (mod CPUs) */
	CONCUR_EXEC_SQPOLL =
	    1u << 1, /* kernel SQ polling thread per loop (burns a CPU when busy) */
};

struct concur_exec_opts {      /* zeroed = defaults */
	unsigned loops;        /* loop threads; 0 = online CPUs; at most 1024 */
	unsigned ring_entries; /* SQ size per loop; 0 = 256; at most 32768 */
	size_t stack_size;     /* fiber stack; 0 = 256 KiB; 16 KiB .. 1 GiB, rounded up to pages */
	unsigned flags;        /* CONCUR_EXEC_* */
};

/*
 * Start an executor: opts->loops loop threads, each owning one io_uring. opts may be NULL.
 * Returns 0 and sets *out, or a negative errno: -EINVAL for bad options, the kernel's error if
 * io_uring is unavailable (ENOSYS: kernel without io_uring; EPERM: kernel.io_uring_disabled
 * or a seccomp filter; see concur_last_error()), -EOPNOTSUPP if the kernel lacks
 * IORING_OP_MSG_RING (Linux < 5.18).
 */
int concur_exec_new(concur_exec **out, const struct concur_exec_opts *opts);

/*
 * Wait until the executor has no work left: no task (nor any task they spawned, however the
 * work keeps unfolding), no I/O operation in flight, no callback of theirs running.
 * timeout_ns < 0 waits forever, 0 polls. Returns 0, -ETIMEDOUT, -EINVAL for a NULL executor,
 * or -EDEADLK when called on one of the executor's own threads (in a task or a callback):
 * the caller's own work would never end.
 */
int concur_exec_join(concur_exec *ex, int64_t timeout_ns);

/*
 * Stop the work from unfolding: later concur_spawn() calls (from anywhere, tasks included)
 * return a future failed with -ESHUTDOWN. Queued tasks still run, unless cancel_pending: then
 * each task that has not started ends CANCELLED without running (its waiters learn it when its
 * loop reaches it, which is promptly). Running tasks finish. Calling it again is harmless.
 */
void concur_exec_shutdown(concur_exec *ex, bool cancel_pending);

/*
 * Shut down (without cancelling), join, stop the loops and release the executor. Futures the
 * caller still holds stay valid (release them as usual); concur_future_exec() on them gives
 * NULL from now on. Must not be called from the executor's own threads (it would join itself):
 * there it does nothing. NULL is ignored.
 */
void concur_exec_free(concur_exec *ex);

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
	uint64_t doorbells;        /* MSG_RING doorbells rung by threads outside the executor */
	uint64_t inbox_items;      /* items taken from the loops' inboxes */
	uint64_t steals;           /* unstarted tasks moved from a busy loop to an idle one */
	uint64_t futex_wakes;      /* blocked foreign threads woken (by ring or by syscall) */
	uint64_t futex_ring_wakes; /* of those, wakes sent as IORING_OP_FUTEX_WAKE */
	uint64_t stacks_mapped;    /* fiber stacks mmap()ed (the pool reuses them) */
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

/*
 * The result of f, waiting up to timeout_ns (< 0: forever, 0: do not wait).
 * Returns the value (>= 0), the task's or operation's error, -ECANCELED if it was cancelled,
 * -ETIMEDOUT if not done in time (f is unchanged), -EINVAL for a NULL or invalid future.
 * In a task it suspends the task's fiber; on a thread outside the executor it blocks the
 * thread; on a loop thread outside any task (a callback) it returns -EDEADLK unless f is
 * already done, since blocking there would stop the loop that must complete f.
 */
int64_t concur_result(concur_future *f, int64_t timeout_ns);

/* True once f is FINISHED or CANCELLED (false for NULL). Never waits. */
bool concur_done(const concur_future *f);

/* True if f ended CANCELLED. */
bool concur_cancelled(const concur_future *f);

/* True while f is RUNNING: a task that started, or an I/O operation in flight. */
bool concur_running(const concur_future *f);

/*
 * Cancel f. Returns 1 if f is now CANCELLED (it was PENDING, or already cancelled): it will
 * never run, its result is -ECANCELED, waiters are woken (callbacks run in the calling thread,
 * once). Returns 0 when it is too late (running or finished). For an I/O operation in flight
 * it asks the kernel to cancel it and returns -EINPROGRESS: the future ends -ECANCELED, or with
 * the operation's own result if it completed first. -EINVAL for a NULL or invalid future.
 */
int concur_cancel(concur_future *f);

/*
 * Call fn(f, arg) once when f is done, in registration order, on the thread that completes f
 * (a loop thread, outside any task's fiber; or the thread that cancels). If f is already done,
 * fn runs before concur_on_done returns, in the caller's thread. No lock is held while fn runs:
 * it may release f, spawn, or add callbacks. f stays valid during fn even if fn releases it.
 * The callback does not keep f alive: hold a reference if you need f after releasing yours.
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
 * Sleep ns nanoseconds. In a task it suspends the fiber (an IORING_OP_TIMEOUT on its loop);
 * elsewhere it sleeps the thread. Returns 0, or -EINVAL for ns < 0.
 */
int concur_sleep(int64_t ns);

/* In a task: let the loop run its other tasks and I/O first. Elsewhere: returns at once. */
void concur_yield(void);

/* True when called inside a task. */
bool concur_in_task(void);

/* The executor whose task or loop thread calls this, or NULL elsewhere. */
concur_exec *concur_current_exec(void);

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

#ifdef __cplusplus
}
#endif

#endif /* CONCUR_H */

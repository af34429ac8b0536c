/* SPDX-License-Identifier: MIT */
/*
 * Timers: concur_sleep() and awaits with a timeout, both IORING_OP_TIMEOUT on the fiber's own
 * loop. Nothing polls: a timed await is woken by whichever comes first, the future's completion
 * or the timer's CQE.
 *
 * A timed await needs a node that outlives the await itself (the in-flight timer points at it
 * until its CQE, which comes after the await returned when the future won), so it is a small
 * refcounted allocation: one reference for the future's waiter list, one for the timer, one for
 * the fiber that reads it once resumed. Whoever flips `fired` first resumes the fiber. A fiber
 * resumed by its timer takes the node back off the future's list (the list's reference is then
 * its to drop), so a timed-out await leaves nothing behind, even on a future that then dies
 * unset (a sync primitive's waiter promise, on every timeout).
 *
 * Timeouts are relative kernel timespecs: tv_sec = ns / 10^9 cannot overflow, and the kernel
 * saturates a huge one, so INT64_MAX means "practically never" without any care here.
 */
#include "internal.h"

#include <stdlib.h>
#include <time.h>

struct concur__timed_wait {
	struct concur__waiter w; /* first: complete() hands us this */
	struct concur__op op;    /* the timer's CQE */
	struct __kernel_timespec ts;
	struct concur__task *task;
	_Atomic uint32_t fired;
	_Atomic uint32_t refs;
	bool timed_out;
};

static void concur__ts_set(struct __kernel_timespec *ts, int64_t ns)
{
	ts->tv_sec = ns / 1000000000;
	ts->tv_nsec = ns % 1000000000;
}

static void concur__timed_wait_put(struct concur__timed_wait *tw)
{
	if (atomic_fetch_sub_explicit(&tw->refs, 1, memory_order_acq_rel) == 1)
		free(tw);
}

/* Called by concur__complete() (by_completion) and by the timer's CQE. */
void concur__timed_wait_fire(struct concur__waiter *w, bool by_completion)
{
	struct concur__timed_wait *tw = (struct concur__timed_wait *)w;
	uint32_t expected = 0;
	if (atomic_compare_exchange_strong_explicit(&tw->fired, &expected, 1, memory_order_acq_rel,
	                                            memory_order_acquire)) {
		tw->timed_out = !by_completion;
		concur__resume(tw->task);
	}
	concur__timed_wait_put(tw);
}

static void concur__timed_wait_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                                   uint32_t cqe_flags)
{
	struct concur__timed_wait *tw =
	    (struct concur__timed_wait *)((char *)op - offsetof(struct concur__timed_wait, op));
	loop->inflight--;
	concur__timed_wait_fire(&tw->w, false);
}

int64_t concur__await_timed(struct concur__task *t, concur_future *f, int64_t timeout_ns)
{
	struct concur__timed_wait *tw = malloc(sizeof(*tw));
	if (!tw)
		return -ENOMEM;
	tw->w.kind = CONCUR__WAIT_AWAIT_TIMED;
	tw->op.cqe = concur__timed_wait_cqe;
	tw->task = t;
	tw->timed_out = false;
	atomic_init(&tw->fired, 0);
	atomic_init(&tw->refs, 3); /* the waiter list's, the timer's, and ours */
	concur__ts_set(&tw->ts, timeout_ns);
	if (!concur__waiter_push(f, &tw->w)) {
		free(tw);
		return concur__future_value(f);
	}
	struct concur__loop *loop = t->loop;
	struct io_uring_sqe *sqe = concur__sqe(loop);
	io_uring_prep_timeout(sqe, &tw->ts, 0, 0);
	concur__sqe_set_op(sqe, &tw->op);
	loop->inflight++;

	concur__suspend();

	int64_t r;
	if (tw->timed_out) {
		/* take our node back; if the completion has it already, it drops the list's
		 * reference itself (and f is done: we return its value) */
		if (concur__waiter_remove(f, &tw->w))
			concur__timed_wait_put(tw);
		r = concur__is_done(f) ? concur__future_value(f) : -ETIMEDOUT;
	} else {
		r = concur__future_value(f);
		/* the future won: take the timer down now rather than let it linger */
		sqe = concur__sqe(loop);
		io_uring_prep_timeout_remove(sqe, (uint64_t)(uintptr_t)&tw->op | CONCUR__TAG_OP, 0);
		sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
		concur__sqe_set_op(sqe, &concur__ignore_op);
	}
	concur__timed_wait_put(tw);
	return r;
}

/* concur_sleep's timeout, on the sleeping fiber's stack: its CQE is what resumes the fiber. */
struct concur__sleep {
	struct concur__op op;
	struct __kernel_timespec ts;
	struct concur__task *task;
};

static void concur__sleep_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                              uint32_t cqe_flags)
{
	struct concur__sleep *s = (struct concur__sleep *)op;
	loop->inflight--;
	concur__loop_push_ready(loop, s->task);
}

int concur_sleep(int64_t ns)
{
	if (ns < 0)
		return -EINVAL;
	struct concur__task *t = concur__tl_task;
	if (!t) {
		struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
		return 0;
	}
	if (ns == 0) {
		concur_yield();
		return 0;
	}
	struct concur__loop *loop = t->loop;
	struct concur__sleep s = {.op.cqe = concur__sleep_cqe, .task = t};
	concur__ts_set(&s.ts, ns);
	struct io_uring_sqe *sqe = concur__sqe(loop);
	io_uring_prep_timeout(sqe, &s.ts, 0, 0);
	concur__sqe_set_op(sqe, &s.op);
	loop->inflight++;
	concur__suspend();
	return 0;
}

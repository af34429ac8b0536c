/* SPDX-License-Identifier: MIT */
/*
 * The loop's timer: one kernel timer per loop drives every deadline scope, timed wait and
 * in-task sleep.
 *
 * Each started task with a deadline in force (a concur_deadline_push scope, or the deadline of
 * the wait it is in: concur_result with a timeout, a timed sync wait, concur_sleep) sits in its
 * loop's min-heap, keyed by its earliest deadline, and a single IORING_OP_TIMEOUT (absolute,
 * CLOCK_MONOTONIC) is armed for the top of the heap. Its CQE breaks the waits of the tasks whose
 * deadline passed (concur__interrupt, control.c) with -ETIMEDOUT.
 *
 * A deadline that does not fire costs no SQE and no CQE: pushing one that is not the earliest
 * only touches the heap, and the armed timer is moved earlier (IORING_TIMEOUT_UPDATE) only when
 * a new deadline is the earliest. Deadlines that are popped leave the timer armed: it fires
 * once, early, finds nothing due and is re-armed for what is then the earliest.
 *
 * The heap is lazy the same way. A task's key may be earlier than its deadline, never later: a
 * deadline that moves later (a scope popped, a wait over, the next request's scope pushed)
 * leaves the task where it is, and a task whose key comes due is then timed out, re-keyed or
 * dropped, whichever its deadline says. So a server that pushes and pops a scope around every
 * operation touches the heap once per deadline period per task, not twice per operation (the
 * proxy's deadline row: heap deletions were a third of what its deadlines cost).
 *
 * The heap also holds the deadlines of future I/O ops (io.c), entries of the same kind with a
 * due hook of their own: one that comes due cancels its op (IORING_OP_ASYNC_CANCEL), which
 * stops an op blocked in a kernel worker too, where a linked timeout does not fire.
 */
#include "internal.h"

#include <stdlib.h>
#include <time.h>

/* ---- clocks -------------------------------------------------------------------------------- */

/* ---- the heap ------------------------------------------------------------------------------ */

static void concur__heap_set(struct concur__timers *tm, size_t i, struct concur__timer *e)
{
	tm->heap[i] = e;
	e->idx = (uint32_t)i;
}

static void concur__heap_up(struct concur__timers *tm, size_t i)
{
	struct concur__timer *e = tm->heap[i];
	while (i && tm->heap[(i - 1) / 2]->key > e->key) {
		concur__heap_set(tm, i, tm->heap[(i - 1) / 2]);
		i = (i - 1) / 2;
	}
	concur__heap_set(tm, i, e);
}

static void concur__heap_down(struct concur__timers *tm, size_t i)
{
	struct concur__timer *e = tm->heap[i];
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= tm->n)
			break;
		if (c + 1 < tm->n && tm->heap[c + 1]->key < tm->heap[c]->key)
			c++;
		if (tm->heap[c]->key >= e->key)
			break;
		concur__heap_set(tm, i, tm->heap[c]);
		i = c;
	}
	concur__heap_set(tm, i, e);
}

static int concur__heap_add(struct concur__timers *tm, struct concur__timer *e)
{
	if (tm->n == tm->cap) {
		size_t cap = tm->cap ? tm->cap * 2 : 64;
		struct concur__timer **h = realloc(tm->heap, cap * sizeof(*h));
		if (!h)
			return -ENOMEM;
		tm->heap = h;
		tm->cap = cap;
	}
	tm->heap[tm->n++] = e;
	concur__heap_up(tm, tm->n - 1);
	return 0;
}

static void concur__heap_del(struct concur__timers *tm, struct concur__timer *e)
{
	size_t i = e->idx;
	e->idx = UINT32_MAX;
	struct concur__timer *last = tm->heap[--tm->n];
	if (last == e)
		return;
	concur__heap_set(tm, i, last);
	concur__heap_up(tm, i);
	concur__heap_down(tm, last->idx);
}

/* ---- the loop's timer ---------------------------------------------------------------------- */

static void concur__timers_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                               uint32_t cqe_flags);

/* Make the kernel timer fire no later than the heap's earliest deadline. */
static void concur__timers_arm(struct concur__loop *loop)
{
	struct concur__timers *tm = &loop->timers;
	if (!tm->n)
		return;
	int64_t first = tm->heap[0]->key;
	if (tm->armed && first >= tm->armed_at)
		return; /* it fires early enough; then it is re-armed for what is due next */
	struct io_uring_sqe *sqe = concur__sqe(loop);
	tm->op.cqe = concur__timers_cqe;
	if (tm->armed) {
		CONCUR__NS_TO_TS(&tm->upd, first);
		io_uring_prep_timeout_update(sqe, &tm->upd, concur__uncounted_ud(&tm->op),
		                             IORING_TIMEOUT_ABS);
		sqe->flags |= IOSQE_CQE_SKIP_SUCCESS; /* a failure: it fired meanwhile, fine */
		concur__sqe_set_uncounted(sqe, &concur__ignore_op);
	} else {
		CONCUR__NS_TO_TS(&tm->ts, first);
		io_uring_prep_timeout(sqe, &tm->ts, 0, IORING_TIMEOUT_ABS);
		concur__sqe_set_uncounted(sqe, &tm->op);
		tm->armed = true;
	}
	tm->armed_at = first;
}

static void concur__timers_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                               uint32_t cqe_flags)
{
	struct concur__timers *tm = &loop->timers;
	tm->armed = false;
	tm->armed_at = INT64_MAX;
	int64_t now = concur__now_ns();
	while (tm->n && tm->heap[0]->key <= now)
		tm->heap[0]->due(loop, tm->heap[0], now);
	concur__timers_arm(loop);
}

/* A task's entry came due: time its wait out, or re-key it, or drop it (see the top). */
static void concur__ctl_timer_due(struct concur__loop *loop, struct concur__timer *tmr, int64_t now)
{
	struct concur__ctl *c = concur__container_of(tmr, struct concur__ctl, tmr);
	if (c->due == INT64_MAX || c->due <= c->seen_now) {
		concur__heap_del(&loop->timers, tmr); /* none now, or known to have passed */
	} else if (c->due > now) {
		tmr->key = c->due; /* it moved later since it was placed */
		concur__heap_down(&loop->timers, tmr->idx);
	} else {
		concur__heap_del(&loop->timers, tmr);
		c->seen_now = now;
		concur__interrupt(loop, c->task, -ETIMEDOUT);
	}
}

int concur__timer_add(struct concur__loop *loop, struct concur__timer *tmr)
{
	/* a loop cleaning up waits for its armed timer: an op started there (by a callback of the
	 * last CQEs) takes a linked timeout, which its cancel ends */
	if (loop->timers.stopped)
		return -ESHUTDOWN;
	int err = concur__heap_add(&loop->timers, tmr);
	if (!err)
		concur__timers_arm(loop);
	return err;
}

void concur__timer_del(struct concur__loop *loop, struct concur__timer *tmr)
{
	concur__heap_del(&loop->timers, tmr);
}

bool concur__timers_stop(struct concur__loop *loop)
{
	struct concur__timers *tm = &loop->timers;
	for (size_t i = 0; i < tm->n; i++) /* an op reaped after this must not look for it */
		tm->heap[i]->idx = UINT32_MAX;
	free(tm->heap);
	tm->heap = NULL;
	tm->n = tm->cap = 0;
	tm->stopped = true;
	if (!tm->armed)
		return false;
	struct io_uring_sqe *sqe = concur__sqe(loop);
	io_uring_prep_timeout_remove(sqe, concur__uncounted_ud(&tm->op), 0);
	sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
	concur__sqe_set_uncounted(sqe, &concur__ignore_op);
	return true; /* the caller reaps until tm->armed is false */
}

/* ---- deadlines of a task -------------------------------------------------------------------- */

/* The earliest deadline in force: the scopes pushed at the current shield depth or deeper (a
 * shield hides the deadlines outside it), and the current timed wait. */
int64_t concur__ctl_due(const struct concur__ctl *c)
{
	int64_t due = c->wait_due;
	const struct concur__scopes *sc = c->scopes;
	for (unsigned i = sc ? sc->n : 0; i-- > 0;) {
		if (sc->at[i].shield < c->shield)
			break;
		if (sc->at[i].at < due)
			due = sc->at[i].at;
	}
	return due;
}

int concur__ctl_retime(struct concur__task *t)
{
	struct concur__loop *loop = t->loop;
	struct concur__ctl *c = &t->fib->ctl;
	int64_t due = concur__ctl_due(c);
	if (due == c->due && !concur__ctl_unplaced(c))
		return 0;
	c->due = due;
	/* none, or known to have passed (the next wait fails at once): a place in the heap is
	 * left for the timer to drop */
	if (due == INT64_MAX || due <= c->seen_now)
		return 0;
	if (c->tmr.idx != UINT32_MAX) {
		if (due >= c->tmr.key)
			return 0; /* its place comes due first: re-keyed then */
		c->tmr.key = due;
		concur__heap_up(&loop->timers, c->tmr.idx);
	} else {
		c->tmr.key = due;
		c->tmr.due = concur__ctl_timer_due;
		c->task = t;
		if (concur__heap_add(&loop->timers, &c->tmr) < 0)
			return -ENOMEM; /* still checked when a wait begins; it cannot break one */
	}
	concur__timers_arm(loop);
	return 0;
}

int concur__ctl_wait_deadline(struct concur__task *t, int64_t due)
{
	t->fib->ctl.wait_due = due;
	int err = concur__ctl_retime(t);
	if (err) {
		/* no room in the heap: the wait fails, or goes without this deadline (an op's takes
		 * a linked timeout instead); a later wait must not inherit it */
		t->fib->ctl.wait_due = INT64_MAX;
		concur__ctl_retime(t);
	}
	return err;
}

/* Room for one more scope: 0 or -ENOMEM. */
static int concur__scopes_grow(struct concur__ctl *c)
{
	struct concur__scopes *sc = c->scopes;
	if (sc && sc->n < sc->cap)
		return 0;
	unsigned cap = sc ? sc->cap * 2 : 4;
	sc = realloc(sc, sizeof(*sc) + cap * sizeof(sc->at[0]));
	if (!sc)
		return -ENOMEM;
	if (!c->scopes)
		sc->n = 0;
	sc->cap = cap;
	c->scopes = sc;
	return 0;
}

int concur_deadline_push(int64_t timeout_ns)
{
	struct concur__task *t = concur__tl_task;
	if (!t)
		return -EPERM;
	if (timeout_ns < 0)
		return -EINVAL;
	struct concur__ctl *c = &t->fib->ctl;
	if (concur__scopes_grow(c) < 0)
		return -ENOMEM;
	struct concur__scopes *sc = c->scopes;
	sc->at[sc->n].at = concur__after_ns(timeout_ns);
	sc->at[sc->n].shield = c->shield;
	sc->n++;
	int err = concur__ctl_retime(t);
	if (err) {
		sc->n--;
		concur__ctl_retime(t); /* back to the previous one: the heap has room for it */
	}
	return err;
}

int concur_deadline_pop(void)
{
	struct concur__task *t = concur__tl_task;
	if (!t)
		return -EPERM;
	struct concur__ctl *c = &t->fib->ctl;
	if (!c->scopes || !c->scopes->n)
		return -EINVAL;
	int64_t at = c->scopes->at[--c->scopes->n].at;
	bool passed = at <= c->seen_now;
	/* The coarse clock (~3 ns, never ahead) tells a deadline far ahead, as a server's idle
	 * scope popped after its operation is: only one near now needs the precise clock. */
	int64_t now = concur__coarse_now_ns();
	if (!passed && at <= now + CONCUR__COARSE_LAG_NS) {
		if (at > now)
			now = concur__now_ns();
		passed = at <= now;
		if (passed && now > c->seen_now)
			c->seen_now = now;
	}
	/* a later deadline only: no memory needed, unless the timer took the task out of the
	 * heap and others filled its room since; then the deadline is still checked when a wait
	 * begins (-ENOMEM: it cannot break one) */
	concur__ctl_retime(t);
	return passed;
}

/* ---- sleeping -------------------------------------------------------------------------------- */

/* The sleep's own deadline or a scope's fired, or a cancel came: nothing to undo but wake. */
static bool concur__sleep_interrupt(struct concur__loop *loop, struct concur__task *t, void *arg)
{
	concur__resume(t); /* the fibers' funnel (on t's loop: its ready queue) */
	return true;
}

int concur_sleep(int64_t ns)
{
	if (ns < 0)
		return -EINVAL;
	struct concur__task *t = concur__tl_task;
	if (!t) {
		struct timespec ts;
		CONCUR__NS_TO_TS(&ts, ns);
		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
		return 0;
	}
	int err = concur__ctl_check(t);
	if (err)
		return err;
	if (ns == 0) {
		concur_yield();
		return 0;
	}
	err = concur__ctl_wait_deadline(t, concur__after_ns(ns));
	if (CONCUR__UNLIKELY(err)) {
		/* no room in the heap for the sleep's end: a kernel timer of its own instead, as an
		 * op's deadline takes a linked timeout (a cancel or a scope still breaks it) */
		int64_t r = concur_await_timeout(ns); /* 0 when it expires */
		return r < 0 ? (int)r : 0;
	}
	int r = concur__suspend_interruptible(t, concur__sleep_interrupt, NULL);
	concur__ctl_wait_deadline(t, INT64_MAX); /* a later deadline only: as in a pop */
	if (r == -ETIMEDOUT)
		r = concur__ctl_check(t); /* a scope's deadline, or just the sleep's own: 0 */
	return r;
}

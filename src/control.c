/* SPDX-License-Identifier: MIT */
/*
 * Control of running tasks: cancelling a running task, shields, breaking a suspended wait, and
 * stopping an executor.
 *
 * A wait inside a task (an await of a future, a direct I/O operation, a sleep, a stream's next)
 * suspends through concur__suspend_interruptible(), naming how to break it. Two things break a
 * wait, both on the task's own loop thread (concur__interrupt):
 *   - a cancel: concur_cancel() on a RUNNING task sets CONCUR__CANCEL_REQ in its state word
 *     (sticky) and posts a message to the task's loop, which breaks the wait with -ECANCELED;
 *   - a deadline: the loop's timer (timer.c) breaks it with -ETIMEDOUT.
 * Every wait also checks at its start (concur__ctl_check): a task cancelled, or past a deadline,
 * fails the wait at once instead of suspending -- even if it ran CPU work all along and no CQE
 * could be reaped meanwhile (a coarse clock read, ~3 ns, only while a deadline is in force).
 * A shield hides cancellation and the deadlines pushed outside it, for cleanup that must run.
 */
#include "internal.h"

#include <stdlib.h>

/* ---- a task's control state ---------------------------------------------------------------- */

void concur__ctl_start(struct concur__fiber *fib)
{
	struct concur__ctl *c = &fib->ctl;
	c->interrupt = NULL;
	c->shield = 0;
	c->scopes = NULL;
	c->wait_due = INT64_MAX;
	c->due = INT64_MAX;
	c->seen_now = 0;
	c->tmr.idx = UINT32_MAX; /* the rest is set when it joins the heap (concur__ctl_retime) */
	/* the live list waits for the task's first suspend (concur__ctl_live) */
}

void concur__ctl_live(struct concur__loop *loop, struct concur__task *t)
{
	struct concur__ctl *c = &t->fib->ctl;
	t->f.flags |=
	    CONCUR__TASK_LIVE | (concur__task_stack_big(t) ? CONCUR__TASK_QUICK_SUSPEND : 0);
	c->live_prev = NULL;
	c->live_next = loop->live;
	if (loop->live)
		loop->live->fib->ctl.live_prev = t;
	loop->live = t;
}

void concur__ctl_end(struct concur__loop *loop, struct concur__task *t)
{
	struct concur__ctl *c = &t->fib->ctl;
	if (CONCUR__UNLIKELY(c->shield) && loop->stop_arrived)
		concur__io_spared_end(loop, t); /* ended shielded: its spared ops are nobody's */
	if (c->tmr.idx != UINT32_MAX)
		concur__timer_del(loop, &c->tmr);
	if (c->scopes)
		free(c->scopes);
	if (!(t->f.flags & CONCUR__TASK_LIVE))
		return;
	t->f.flags &= ~(CONCUR__TASK_LIVE | CONCUR__TASK_QUICK_SUSPEND);
	if (c->live_prev)
		c->live_prev->fib->ctl.live_next = c->live_next;
	else
		loop->live = c->live_next;
	if (c->live_next)
		c->live_next->fib->ctl.live_prev = c->live_prev;
}

int concur__ctl_check_slow(struct concur__task *t)
{
	uint32_t s = atomic_load_explicit(&t->f.state, memory_order_relaxed);
	if ((s & CONCUR__CANCEL_REQ) && !t->fib->ctl.shield)
		return -ECANCELED;
	return concur__ctl_check_due(t); /* a shielded cleanup's deadlines, as concur__ctl_check */
}

/* Loop thread: break the wait t is suspended in, if it is in one. */
void concur__interrupt(struct concur__loop *loop, struct concur__task *t, int err)
{
	struct concur__ctl *c = &t->fib->ctl;
	concur__interrupt_fn fn = c->interrupt;
	if (!fn)
		return;      /* running, runnable, or not in a wait that can be broken */
	c->interrupt = NULL; /* once per wait */
	c->interrupted = err;
	if (!fn(loop, t, c->interrupt_arg))
		c->interrupted = 0; /* the wait was over already: it keeps its own outcome */
}

/* ---- cancelling a running task ------------------------------------------------------------- */

struct concur__cancel_msg {
	struct concur__node node;
	struct concur__task *task; /* a reference */
};

static void concur__cancel_arrived(struct concur__loop *loop, struct concur__node *node)
{
	struct concur__cancel_msg *m = (struct concur__cancel_msg *)node;
	struct concur__task *t = m->task;
	if (t->fib && !t->fib->ctl.shield)
		concur__interrupt(loop, t, -ECANCELED);
	concur_release(&t->f);
	free(m);
	concur__work_end(loop->ex);
}

/* Break the wait of every started task of the loop that has a cancel request and no shield
 * (a cancel that had no memory for its own message). A request made after the flag is cleared
 * posts the look again; one made before it is seen here. */
static void concur__cancel_scan(struct concur__loop *loop, struct concur__node *node)
{
	(void)node;
	atomic_exchange_explicit(&loop->cancel_scan_posted, false, memory_order_acq_rel);
	for (struct concur__task *t = loop->live, *next; t; t = next) {
		next = t->fib->ctl.live_next;
		if ((atomic_load_explicit(&t->f.state, memory_order_relaxed) &
		     CONCUR__CANCEL_REQ) &&
		    !t->fib->ctl.shield)
			concur__interrupt(loop, t, -ECANCELED);
	}
	concur__work_end(loop->ex);
}

int concur__task_cancel_running(concur_future *f)
{
	struct concur__task *t = (struct concur__task *)f;
	uint32_t s = atomic_load_explicit(&f->state, memory_order_acquire);
	if ((s & CONCUR__STATE_MASK) != CONCUR__RUNNING)
		return (s & CONCUR__STATE_MASK) == CONCUR__CANCELLED;
	if (s & CONCUR__CANCEL_REQ)
		return -EINPROGRESS; /* asked already */
	/*
	 * The request goes in the state word: the task's next wait fails at once. A wait it is in
	 * now is broken on its loop, by a message; without memory for one, by the loop's look over
	 * its tasks' requests (a message of its own, needing none). Either message is work of the
	 * task's executor until it ran, begun before the request is made, while the task, running,
	 * is work too: a join cannot end, nor the executor be freed, while a message is on its way
	 * (a MSG_RING the kernel refused comes back to the sender, which pushes it into the
	 * target's inbox). The task may end by itself any time before the request: the loop is
	 * pinned meanwhile, so that its executor, idle and freed, is not touched after the free.
	 */
	struct concur__loop *loop = t->loop;
	struct concur__poster *pin = concur__loop_pin(loop);
	concur_exec *ex = NULL;
	int r = -EINPROGRESS;
	s = atomic_load_explicit(&f->state, memory_order_seq_cst); /* after the pin */
	for (;;) {
		if ((s & CONCUR__STATE_MASK) != CONCUR__RUNNING || (s & CONCUR__CANCEL_REQ)) {
			if ((s & CONCUR__STATE_MASK) != CONCUR__RUNNING)
				r = (s & CONCUR__STATE_MASK) == CONCUR__CANCELLED;
			if (ex)
				concur__work_end(ex);
			concur__loop_unpin(pin);
			return r;
		}
		if (!ex)
			concur__work_begin(ex = loop->ex);
		if (atomic_compare_exchange_weak_explicit(&f->state, &s, s | CONCUR__CANCEL_REQ,
		                                          memory_order_acq_rel,
		                                          memory_order_acquire))
			break;
	}
	concur__loop_unpin(pin); /* the message's work keeps the executor from here */
	struct concur__cancel_msg *m = malloc(sizeof(*m));
	if (!m) {
		/* the exchange orders our request before the look that clears it (acq_rel) */
		if (!atomic_exchange_explicit(&loop->cancel_scan_posted, true,
		                              memory_order_acq_rel)) {
			loop->cancel_scan_node.call = concur__cancel_scan;
			concur__loop_post(loop, &loop->cancel_scan_node);
		} else {
			concur__work_end(ex); /* a look is on its way already */
		}
		return -EINPROGRESS;
	}
	m->node.call = concur__cancel_arrived;
	m->task = t;
	concur_retain(f);
	concur__loop_post(loop, &m->node);
	return -EINPROGRESS;
}

/* ---- the public calls ---------------------------------------------------------------------- */

int concur_shield_push(void)
{
	struct concur__task *t = concur__tl_task;
	if (!t)
		return -EPERM;
	if (t->fib->ctl.shield == UINT16_MAX)
		return -EOVERFLOW; /* the depth's bound: wrapping to 0 would unshield the task */
	t->fib->ctl.shield++;
	concur__ctl_retime(t); /* hides deadlines: never an earlier one */
	return 0;
}

int concur_shield_pop(void)
{
	struct concur__task *t = concur__tl_task;
	if (!t)
		return -EPERM;
	struct concur__ctl *c = &t->fib->ctl;
	if (!c->shield)
		return -EINVAL;
	c->shield--;
	if (!c->shield && CONCUR__UNLIKELY(t->loop->stop_arrived))
		concur__io_spared_end(t->loop, t); /* its ops the stop spared are nobody's now */
	/* Without memory for the heap the outer deadlines are still checked when a wait begins;
	 * they just cannot break a wait already begun. */
	concur__ctl_retime(t);
	return 0;
}

bool concur_cancel_requested(void)
{
	struct concur__task *t = concur__tl_task;
	return t && (atomic_load_explicit(&t->f.state, memory_order_relaxed) & CONCUR__CANCEL_REQ);
}

/* ---- stopping an executor ------------------------------------------------------------------ */

/* On each loop: request cancellation of every started task and break their waits; cancel the
 * future I/O ops in flight. */
static void concur__stop_arrived(struct concur__loop *loop, struct concur__node *node)
{
	loop->stop_arrived = true;
	concur__io_cancel_all(loop);
	for (struct concur__task *t = loop->live, *next; t; t = next) {
		next = t->fib->ctl.live_next;
		atomic_fetch_or_explicit(&t->f.state, CONCUR__CANCEL_REQ, memory_order_acq_rel);
		if (!t->fib->ctl.shield)
			concur__interrupt(loop, t, -ECANCELED);
	}
}

int concur_exec_stop(concur_exec *ex, int64_t drain_ns)
{
	if (!concur__exec_valid(ex))
		return -EINVAL;
	if (concur__exec_no_wait_here(ex))
		return -EDEADLK;
	/* counted as a joiner for the whole call: a concurrent concur_exec_free waits for it */
	atomic_fetch_add_explicit(&ex->joiners, 1, memory_order_seq_cst);
	concur_exec_shutdown(ex, false);
	int r = concur_exec_join(ex, drain_ns);
	if (r != -ETIMEDOUT) {
		atomic_fetch_sub_explicit(&ex->joiners, 1, memory_order_seq_cst);
		return r;
	}
	concur_exec_shutdown(ex, true); /* what has not started ends CANCELLED unrun */
	for (unsigned i = 0; i < ex->nloops; i++) {
		struct concur__loop *loop = ex->loops[i];
		if (atomic_exchange(&loop->stop_posted, true))
			continue; /* a stop is on its way there already */
		loop->stop_node.call = concur__stop_arrived;
		concur__loop_post(loop, &loop->stop_node);
	}
	concur_exec_join(ex, -1);
	atomic_fetch_sub_explicit(&ex->joiners, 1, memory_order_seq_cst);
	return -ETIMEDOUT;
}

/* SPDX-License-Identifier: MIT */
/*
 * I/O as futures: every kernel operation is an SQE whose CQE completes a future (or resumes the
 * task that awaits it directly), with optional deadlines (on the loop's timer, a linked timeout
 * when it has no room), in-flight cancellation (IORING_OP_ASYNC_CANCEL). Multishot streams and the
 * provided-buffer ring are apart, in stream.c.
 *
 * An operation is described by a struct io_req. A future op's SQE is prepared at the call, into
 * its record, and copied into the ring on the loop thread that owns the ring; the direct form
 * prepares it straight into the ring. The request is done when every CQE it expects has arrived
 * (the operation's, and its linked timeout's when it has one): only then is the future completed
 * or the task resumed, so the caller's buffers (and, for the direct form, the request on the
 * fiber's stack) are never touched by the kernel after that.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "internal.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define IO_MAX_LEN 0x7ffff000u /* MAX_RW_COUNT, as read(2) caps it */

/* ---- one operation ------------------------------------------------------------------------ */

struct io_req {
	/* what the CQE handler and the awaiting task touch: the first cache line (the direct
	 * form's request is on a fiber's stack, cold by the time its CQE is dispatched: it is
	 * read then only with a linked timeout; one CQE goes to the task itself) */
	struct concur__op op;      /* the operation's CQE */
	struct concur__loop *loop; /* the loop whose ring carries it */
	struct concur__task *task; /* direct form: the task to resume; NULL for a future */
	int32_t res;               /* the operation's CQE res */
	int32_t lt_res; /* the linked timeout's, or -ETIME when a future's timer deadline fired (set
	                 * only then and by io_req_init: the direct form's stays unset) */
	uint8_t cqes_left;
	uint8_t opcode;
	bool has_deadline;
	bool timer_deadline;     /* the deadline rides the loop's timer instead */
	_Atomic bool cancel_req; /* concur_cancel asked the kernel to cancel it */
	/* with a deadline or a time only */
	struct concur__op lt_op;           /* its linked timeout's CQE (with a deadline) */
	struct __kernel_timespec deadline; /* the linked timeout's */
	struct __kernel_timespec ts;       /* IORING_OP_TIMEOUT's own time */
};

/* The future form: the request plus what it takes to reach the loop from another thread. */
struct concur__io {
	struct concur_future f;   /* first: the I/O op is its future */
	struct concur__node node; /* submit on the loop */
	struct io_req r;
	struct concur__task *awaiter; /* a task of r.loop awaiting the started op (io_await_here) */
	struct concur__timer tmr;     /* its deadline on r.loop's timer (key set at the call) */
	/* the lines above are what an op made and awaited on its loop touches */
	struct concur__node cancel_node; /* cancel on the loop */
	/* the shielded task a stop spared it for (awaiting it, or starting it after the stop):
	 * cancelled once that task is unshielded or ends (concur__io_spared_end) */
	struct concur__task *spared_for;
	struct io_uring_sqe sqe; /* prepared at the call, copied into the ring on the loop */
};

_Static_assert(offsetof(struct concur__io, f) == 0, "an I/O op starts with its future");

static void io_op_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                      uint32_t flags);
static void io_lt_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                      uint32_t flags);

static void io_req_init(struct io_req *r, unsigned opcode, int64_t timeout_ns)
{
	memset(r, 0, sizeof(*r));
	r->opcode = (uint8_t)opcode;
	r->op.cqe = io_op_cqe;
	r->lt_op.cqe = io_lt_cqe;
	r->cqes_left = 1;
	if (timeout_ns >= 0) {
		r->has_deadline = true;
		r->cqes_left = 2;
		CONCUR__NS_TO_TS(&r->deadline, timeout_ns);
	}
}

/* -EOPNOTSUPP if the kernel lacks the operation (or the linked timeout a deadline needs). */
static int io_check_supported(const concur_exec *ex, unsigned opcode, int64_t timeout_ns)
{
	if (!concur__op_supported(ex, opcode))
		return -EOPNOTSUPP;
	if (timeout_ns >= 0 && !concur__op_supported(ex, IORING_OP_LINK_TIMEOUT))
		return -EOPNOTSUPP;
	return 0;
}

/* The request's SQE, prepared in the ring, is marked ours; with a deadline, its linked timeout
 * follows (the room for both was made before the first was taken). */
static void io_link(struct concur__loop *loop, struct io_req *r, struct io_uring_sqe *sqe)
{
	concur__sqe_set_op(loop, sqe, &r->op);
	if (r->has_deadline) {
		sqe->flags |= IOSQE_IO_LINK;
		sqe = concur__sqe(loop);
		io_uring_prep_link_timeout(sqe, &r->deadline, 0);
		concur__sqe_set_op(loop, sqe, &r->lt_op);
	}
}

/* A ring's SQE for r (and room for its linked timeout: a link must not be split across two
 * submits). */
static struct io_uring_sqe *io_ring_sqe(struct concur__loop *loop, struct io_req *r)
{
	if (r->has_deadline)
		concur__sq_reserve(loop, 2);
	return concur__sqe(loop);
}

/* Loop thread: ask the kernel to cancel a future op in flight; its CQE still ends it. */
static void io_cancel_in_kernel(struct concur__loop *loop, struct concur__io *io)
{
	struct io_uring_sqe *sqe = concur__sqe(loop);

	io_uring_prep_cancel64(sqe, concur__op_ud(&io->r.op), 0);
	concur__sqe_set_op(loop, sqe, &concur__ignore_op);
}

/*
 * A future op's deadline came due on its loop's timer: cancel the op. Its CQE ends it, stopped
 * (-ETIMEDOUT) or with its own result if it won the race.
 */
static void io_deadline_due(struct concur__loop *loop, struct concur__timer *tmr, int64_t now)
{
	struct concur__io *io = concur__container_of(tmr, struct concur__io, tmr);

	(void)now;
	concur__timer_del(loop, tmr);
	io->r.lt_res = -ETIME;
	io_cancel_in_kernel(loop, io);
}

/*
 * Loop thread: a future op's SQE, prepared at sqe, is marked ours; its deadline goes on the
 * loop's timer, which costs no SQE and no CQE unless it fires, and stops an op blocked in a
 * kernel worker, where a linked timeout does not fire. Without room in the timer's heap, a
 * linked timeout (the room for its SQE was made with the op's).
 */
static void io_future_link(struct concur__loop *loop, struct concur__io *io,
                           struct io_uring_sqe *sqe)
{
	struct io_req *r = &io->r;

	if (r->has_deadline && concur__timer_add(loop, &io->tmr) == 0) {
		r->has_deadline = false;
		r->timer_deadline = true;
		r->cqes_left = 1;
	}
	io_link(loop, r, sqe);
}

/* Loop thread: put the SQE prepared in the op's record (and its deadline) into the ring. */
static void io_submit(struct concur__loop *loop, struct concur__io *io)
{
	struct io_uring_sqe *sqe = io_ring_sqe(loop, &io->r);

	*sqe = io->sqe;
	io_future_link(loop, io, sqe);
}

/*
 * How the kernel says an op was stopped before its end: -ECANCELED, or from an io-wq worker
 * blocked in the op (a splice on an empty pipe) the signal's -EINTR or one of the kernel's own
 * restart codes (ERESTARTSYS 512, ERESTARTNOINTR 513, ERESTARTNOHAND 514, ERESTART_RESTARTBLOCK
 * 516), which are no errno of user space.
 */
static inline bool io_stopped(int64_t res)
{
	return res == -ECANCELED || res == -EINTR || res == -512 || res == -513 || res == -514 ||
	       res == -516;
}

/*
 * The request's outcome, the kernel's codes mapped: a timeout op's expiry (-ETIME) is 0; an op
 * stopped (io_stopped) by its deadline is -ETIMEDOUT; one stopped by our cancel is -ECANCELED
 * and *cancelled; a kernel restart code with neither is -EINTR. Anything else is the kernel's
 * own result.
 */
static int64_t io_outcome(struct io_req *r, bool *cancelled)
{
	int64_t res = r->res;

	*cancelled = false;
	if (r->opcode == IORING_OP_TIMEOUT && res == -ETIME)
		return 0;
	if (io_stopped(res)) {
		/* (the direct form's timer deadline ends its wait instead, and leaves lt_res unset)
		 */
		if ((r->has_deadline || (r->timer_deadline && !r->task)) && r->lt_res == -ETIME)
			return -ETIMEDOUT;
		if (atomic_load_explicit(&r->cancel_req, memory_order_relaxed)) {
			*cancelled = true;
			return -ECANCELED;
		}
		if (res != -ECANCELED)
			return -EINTR;
	}
	return res;
}

/* A future op cancelled before it was submitted: the executor lets go of it, then accounts it
 * (last: a join may return once it is counted). */
static void io_drop(struct concur__io *io)
{
	concur_exec *ex = io->f.ex;
	concur__unhold(&io->f);
	concur__work_end(ex);
}

/*
 * A loop's future ops in flight, linked through their (then unused) submit node, so that
 * concur_exec_stop can cancel them all (concur__io_cancel_all). One started after the stop's
 * pass (by a callback, a foreign thread, a task that ignored its cancel) is cancelled at once:
 * the stop's join would wait for it for ever. But a shielded task's: its cleanup's.
 */
static void io_live_add(struct concur__loop *loop, struct concur__io *io)
{
	struct concur__task *t = concur__tl_task;

	io->node.prev = NULL;
	io->node.next = loop->io_live;
	if (loop->io_live)
		loop->io_live->prev = &io->node;
	loop->io_live = &io->node;
	if (loop->stop_arrived) {
		if (t && t->fib->ctl.shield)
			io->spared_for = t; /* its cleanup's: until it is unshielded or ends */
		else
			concur_cancel(&io->f);
	}
}

static void io_live_del(struct concur__loop *loop, struct concur__io *io)
{
	if (io->node.prev)
		io->node.prev->next = io->node.next;
	else
		loop->io_live = io->node.next;
	if (io->node.next)
		io->node.next->prev = io->node.prev;
}

void concur__io_cancel_all(struct concur__loop *loop)
{
	for (struct concur__node *n = loop->io_live, *next; n; n = next) {
		next = n->next;
		struct concur__io *io = concur__container_of(n, struct concur__io, node);
		/* the op a shielded cleanup of this loop awaits runs to its end, as the cleanup
		 * does */
		if (io->awaiter && io->awaiter->fib->ctl.shield) {
			io->spared_for = io->awaiter; /* until it is unshielded or ends */
			continue;
		}
		concur_cancel(&io->f);
	}
}

/* Loop thread, after a stop: t, a shielded task, is unshielded or ends. The ops the stop spared
 * for it are nobody's cleanup now (t may have left their wait at a deadline, or never awaited
 * one it started): cancelled, or the stop's join would wait for them for ever. */
void concur__io_spared_end(struct concur__loop *loop, struct concur__task *t)
{
	for (struct concur__node *n = loop->io_live, *next; n; n = next) {
		next = n->next;
		struct concur__io *io = concur__container_of(n, struct concur__io, node);
		if (io->spared_for != t)
			continue;
		io->spared_for = NULL;
		concur_cancel(&io->f);
	}
}

static void io_req_cqe(struct concur__loop *loop, struct io_req *r)
{
	struct concur__io *io;
	concur_exec *ex;
	bool cancelled;
	int64_t res;

	if (--r->cqes_left)
		return;
	if (r->task) {
		concur__resume(r->task); /* the direct form: the fibers' funnel */
		return;
	}
	io = concur__container_of(r, struct concur__io, r);
	io_live_del(loop, io);
	if (io->tmr.idx != UINT32_MAX)
		concur__timer_del(loop, &io->tmr);
	res = io_outcome(r, &cancelled);
	if (io->awaiter) { /* queued first: the list was empty when it began to wait */
		concur__resume(io->awaiter);
		io->awaiter = NULL;
	}
	ex = io->f.ex;
	/* the executor lets go of the op: it is not to be touched after */
	concur__complete_unhold(&io->f, res, cancelled ? CONCUR__CANCELLED : CONCUR__FINISHED);
	concur__work_end(ex);
}

static void io_op_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res, uint32_t flags)
{
	struct io_req *r = concur__container_of(op, struct io_req, op);

	r->res = res;
	io_req_cqe(loop, r);
}

static void io_lt_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res, uint32_t flags)
{
	struct io_req *r = concur__container_of(op, struct io_req, lt_op);

	r->lt_res = res;
	io_req_cqe(loop, r);
}

/* ---- the future form ---------------------------------------------------------------------- */

/* Op records are cached like task records (exec.c): an op made and released on a loop costs no
 * malloc/free, and one a loop frees goes back to the thread outside the executor that made it. */
_Static_assert(sizeof(struct concur__io) <= CONCUR__REC_IO_BYTES, "CONCUR__REC_IO_BYTES");

static void io_destroy(concur_future *f)
{
	concur__rec_free(f, CONCUR__REC_IO);
}

/* Loop thread: a cancel's message (io_cancel_running) arrived: ask the kernel to cancel the op
 * (unless it is already over). */
static void io_cancel_call(struct concur__loop *loop, struct concur__node *node)
{
	struct concur__io *io = concur__container_of(node, struct concur__io, cancel_node);
	concur_exec *ex = io->f.ex;

	if (loop != io->r.loop) { /* a failed MSG_RING delivered it elsewhere: forward it */
		concur__loop_post(io->r.loop, node);
		return;
	}
	if (!concur__is_done(&io->f))
		io_cancel_in_kernel(loop, io);
	concur_release(&io->f); /* taken by io_cancel_running */
	concur__work_end(ex);   /* the message's, last: a join may return once it is counted */
}

/* Is the op still RUNNING? If not, *r is concur_cancel's answer for how it ended. */
static bool io_still_running(concur_future *f, int *r)
{
	uint32_t s = atomic_load_explicit(&f->state, memory_order_seq_cst);

	if ((s & CONCUR__STATE_MASK) == CONCUR__RUNNING)
		return true;
	*r = (s & CONCUR__STATE_MASK) == CONCUR__CANCELLED;
	return false;
}

/*
 * On the op's loop, nothing can end the op meanwhile: the kernel is asked at once. Elsewhere the
 * request is a message to that loop, and it is work of the op's executor until it ran, begun
 * before the request is made, while the op, in flight, is work too: a join cannot end, nor the
 * executor be stopped and freed, while the message is on its way (it would land in a freed
 * inbox, or in a ring its loop no longer reaps, and its reference would leak). The op may end by
 * itself any time before that: the loop is pinned meanwhile, so that its executor, idle and
 * freed, is not touched after the free. (As a running task's cancel does, control.c.)
 */
static int io_cancel_running(concur_future *f)
{
	struct concur__io *io = (struct concur__io *)f;
	struct concur__loop *loop = io->r.loop;

	if (concur__tl_loop == loop) {
		if (!atomic_exchange(&io->r.cancel_req, true))
			io_cancel_in_kernel(loop, io); /* (RUNNING: its CQE has not been reaped) */
		return -EINPROGRESS;
	}
	struct concur__poster *pin = concur__loop_pin(loop);
	concur_exec *ex = NULL;
	int r = -EINPROGRESS;
	/* the state after the pin, and again after the begin: an op seen running then ends after
	 * the begin, so the count does not reach 0 in between */
	if (!io_still_running(f, &r))
		goto out;
	concur__work_begin(ex = io->f.ex);
	if (!io_still_running(f, &r) || atomic_exchange(&io->r.cancel_req, true))
		goto out;        /* ended meanwhile, or asked already */
	concur__loop_unpin(pin); /* the message's work keeps the executor from here */
	concur_retain(f);
	io->cancel_node.call = io_cancel_call;
	concur__loop_post(loop, &io->cancel_node);
	return -EINPROGRESS;
out:
	if (ex)
		concur__work_end(ex);
	concur__loop_unpin(pin);
	return r;
}

/*
 * A started op's CQE is reaped on its loop, r.loop, and nothing else completes it (a cancel asks
 * the kernel, and the CQE still ends it): a task of that loop awaiting it needs no node on the
 * list, just this slot, which only that thread reads and writes. Read r.loop only once the
 * state says started: it is set before (io_start, or io_submit_call before its claim). Only
 * while the list is empty: the slot's task is woken first, so nobody may be waiting before it.
 */
static bool io_await_here(concur_future *f, struct concur__task *t)
{
	struct concur__io *io = (struct concur__io *)f;

	if ((atomic_load_explicit(&f->state, memory_order_acquire) & CONCUR__STATE_MASK) !=
	        CONCUR__RUNNING ||
	    io->r.loop != concur__tl_loop || io->awaiter || !concur__waiters_none(f))
		return false;
	io->awaiter = t;
	return true;
}

static bool io_await_undo(concur_future *f, struct concur__task *t)
{
	struct concur__io *io = (struct concur__io *)f;

	if (io->awaiter != t)
		return false;
	io->awaiter = NULL;
	return true;
}

static const struct concur__future_class io_class = {
    .name = "io",
    .cancel_running = io_cancel_running,
    .destroy = io_destroy,
    .await_here = io_await_here,
    .await_undo = io_await_undo,
    .held = true, /* by its loop, until its last CQE */
    .counted = true,
};

/* Loop thread: submit, unless the op was cancelled before it got here. */
static void io_submit_call(struct concur__loop *loop, struct concur__node *node)
{
	struct concur__io *io = concur__container_of(node, struct concur__io, node);

	io->r.loop = loop; /* where it runs (a failed MSG_RING may bring it to another loop) */
	if (!concur__future_claim(&io->f)) {
		io_drop(io); /* CANCELLED while queued: never submitted */
		return;
	}
	io_submit(loop, io);
	io_live_add(loop, io);
}

/* A new future op (the caller's reference, and the executor's hold), or an error. */
static int io_new(concur_exec *ex, unsigned opcode, int64_t timeout_ns, struct concur__io **out)
{
	struct concur__io *io;
	int err;

	if (!concur__exec_valid(ex))
		return -EINVAL;
	err = io_check_supported(ex, opcode, timeout_ns);
	if (err)
		return err;
	io = concur__rec_alloc(ex, concur__tl_loop, CONCUR__REC_IO);
	if (!io)
		return -ENOMEM;
	memset(&io->node, 0, sizeof(io->node));
	memset(&io->cancel_node, 0, sizeof(io->cancel_node));
	io->awaiter = NULL;
	io->spared_for = NULL;
	io_req_init(&io->r, opcode, timeout_ns);
	io->tmr.idx = UINT32_MAX;
	if (timeout_ns >= 0) { /* from the call, wherever the op is submitted */
		io->tmr.key = concur__after_ns(timeout_ns);
		io->tmr.due = io_deadline_due;
	}
	concur__future_init(&io->f, &io_class, ex, 1);
	*out = io;
	return 0;
}

static concur_future *io_fail(concur_exec *ex, int err)
{
	return concur__failed_future(concur__exec_valid(ex) ? ex : NULL, err);
}

/*
 * Where a new op's SQE is prepared: straight into the ring when the caller is a loop of the op's
 * executor (it is submitted from there: no copy), else into the record, which the loop it is
 * posted to copies into its ring.
 */
static struct io_uring_sqe *io_sqe(struct concur__io *io)
{
	struct concur__loop *cur = concur__tl_loop;

	return cur && cur->ex == io->f.ex ? io_ring_sqe(cur, &io->r) : &io->sqe;
}

/* Submit on the caller's loop when it is one of ex's (sqe is its ring's), else post it to one. */
static concur_future *io_start(struct concur__io *io, struct io_uring_sqe *sqe)
{
	concur_exec *ex = io->f.ex;
	struct concur__loop *cur = concur__tl_loop;

	if (sqe != &io->sqe) {
		/* counted on the loop, as a local spawn is: the op ends on this loop's ring */
		concur__work_begin_local(cur);
		io->r.loop = cur;
		/* claimed: nobody else has seen it yet, so no exchange is needed */
		atomic_store_explicit(&io->f.state, CONCUR__RUNNING, memory_order_relaxed);
		io_future_link(cur, io, sqe);
		io_live_add(cur, io);
	} else {
		concur__work_begin(ex);
		/* As a spawn after a shutdown (concur__task_enqueue): counted first, then the flag
		 * looked at, so a concurrent join (concur_exec_free's) either waits for this op or
		 * the op sees the flag -- else it could land in the inbox of a loop that has
		 * stopped, and concur_exec_free's quiesce submitted it to a ring gone. The
		 * executor's own work (a blocking job of ex, a cancel's callbacks) may still start
		 * I/O: a join waits for it anyway. */
		if (CONCUR__UNLIKELY(atomic_load_explicit(&ex->shutdown, memory_order_seq_cst)) &&
		    !concur__exec_work_here(ex)) {
			/* never seen by anyone: ends failed, the caller's reference kept */
			concur__complete_unhold(&io->f, -ESHUTDOWN, CONCUR__FINISHED);
			concur__work_end(ex);
			return &io->f;
		}
		io->r.loop = concur__exec_pick_loop(ex);
		io->node.call = io_submit_call;
		concur__loop_post(io->r.loop, &io->node);
	}
	return &io->f;
}

/* ---- the direct form ---------------------------------------------------------------------- */

/* A cancel or a deadline broke the wait: ask the kernel to cancel the op; its CQE (with its
 * own result if it won the race) resumes the task as usual. */
static bool io_await_interrupt(struct concur__loop *loop, struct concur__task *t, void *arg)
{
	struct io_req *r = arg;
	struct io_uring_sqe *sqe = concur__sqe(loop);

	io_uring_prep_cancel64(sqe, r->has_deadline ? concur__op_ud(&r->op) : concur__task_ud(t),
	                       0);
	concur__sqe_set_op(loop, sqe, &concur__ignore_op);
	return true;
}

/*
 * The direct form, in a task: the request lives on the fiber's stack and its SQE is prepared
 * straight into the ring (no copy, no memset: this is the hot path of every awaited op). Only
 * the fields the completion reads are set.
 *
 * A deadline on the operation is a deadline on this wait, on the loop's one timer (timer.c),
 * rather than a linked timeout: no SQE and no CQE unless it fires (then the op is cancelled like
 * on any interrupt). Without memory for the timer's heap, the linked timeout.
 *
 * Returns 0 and the SQE to prepare, or the error that ends the call at once (nothing taken).
 */
static int io_await_begin(struct io_req *r, unsigned opcode, int64_t timeout_ns,
                          struct io_uring_sqe **sqe)
{
	struct concur__task *t = concur__tl_task;
	struct concur__loop *loop;
	int err;

	if (!t)
		return -EPERM;
	loop = concur__tl_loop;
	err = io_check_supported(loop->ex, opcode, timeout_ns);
	if (!err)
		err = concur__ctl_check(t); /* cancelled or past a deadline: not even started */
	if (err)
		return err;
	r->op.cqe = io_op_cqe;
	r->loop = loop;
	r->task = t;
	r->opcode = (uint8_t)opcode;
	r->cqes_left = 1;
	r->has_deadline = false;
	r->timer_deadline = false;
	atomic_init(&r->cancel_req, false);
	if (timeout_ns >= 0) {
		if (concur__ctl_wait_deadline(t, concur__after_ns(timeout_ns)) == 0) {
			r->timer_deadline = true;
		} else {
			r->has_deadline = true;
			r->cqes_left = 2;
			r->lt_op.cqe = io_lt_cqe;
			r->lt_res = 0;
			CONCUR__NS_TO_TS(&r->deadline, timeout_ns);
		}
	}
	*sqe = io_ring_sqe(loop, r);
	return 0;
}

/* The SQE is prepared: mark it ours, suspend until every CQE is in, map the outcome. */
static int64_t io_await_end(struct io_req *r, struct io_uring_sqe *sqe)
{
	struct concur__loop *loop = r->loop;
	bool cancelled;
	int64_t res;
	int intr;

	if (r->has_deadline) /* resumed by io_req_cqe once both CQEs are in */
		io_link(loop, r, sqe);
	else /* one CQE: it resumes the task itself (CONCUR__TAG_TASK), its result in t->f.res */
		concur__sqe_count(loop, sqe, concur__task_ud(r->task));
	intr = concur__suspend_interruptible(r->task, io_await_interrupt, r);
	if (!r->has_deadline)
		r->res = (int32_t)r->task->f.res;
	if (r->timer_deadline)
		concur__ctl_wait_deadline(r->task, INT64_MAX);
	res = io_outcome(r, &cancelled);
	if (intr && io_stopped(r->res))
		return intr; /* ended by the interrupt (a cancel, its deadline, a scope's) */
	return res;
}

/* ---- the operations ----------------------------------------------------------------------- */

/*
 * Both forms of an operation from one description: its opcode, its parameters, a check of the
 * arguments (0 or a negative errno) and the statement preparing `sqe` (the request is `r_`).
 */
#define IO_ARGS(...) __VA_ARGS__

#define IO_FUTURE_BODY(opcode, check, prep, timeout)                                               \
	{                                                                                          \
		struct concur__io *io_ = NULL;                                                     \
		int err_ = (check);                                                                \
		if (!err_)                                                                         \
			err_ = io_new(ex, opcode, timeout, &io_);                                  \
		if (err_)                                                                          \
			return io_fail(ex, err_);                                                  \
		struct io_req *r_ = &io_->r;                                                       \
		struct io_uring_sqe *sqe = io_sqe(io_);                                            \
		(void)r_;                                                                          \
		prep;                                                                              \
		return io_start(io_, sqe);                                                         \
	}

#define IO_AWAIT_BODY(opcode, check, prep, timeout)                                                \
	{                                                                                          \
		struct io_req req_, *r_ = &req_;                                                   \
		struct io_uring_sqe *sqe;                                                          \
		int err_ = (check);                                                                \
		if (!err_)                                                                         \
			err_ = io_await_begin(r_, opcode, timeout, &sqe);                          \
		if (err_)                                                                          \
			return err_;                                                               \
		prep;                                                                              \
		return io_await_end(r_, sqe);                                                      \
	}

/* clang-format off */
#define IO_OP(name, opcode, params, check, prep)                                                   \
	concur_future *concur_##name(concur_exec *ex, IO_ARGS params, int64_t timeout_ns)          \
		IO_FUTURE_BODY(opcode, check, prep, timeout_ns)                                    \
	int64_t concur_await_##name(IO_ARGS params, int64_t timeout_ns)                            \
		IO_AWAIT_BODY(opcode, check, prep, timeout_ns)
/* clang-format on */

static inline unsigned io_len(size_t len)
{
	return len > IO_MAX_LEN ? IO_MAX_LEN : (unsigned)len;
}

static inline int io_check_buf(const void *buf, size_t len, int64_t off)
{
	return (!buf && len) || off < -1 ? -EINVAL : 0;
}

static inline int io_check_iov(const struct iovec *iov, int iovcnt, int64_t off)
{
	return !iov || iovcnt < 1 || iovcnt > IOV_MAX || off < -1 ? -EINVAL : 0;
}

static inline int io_check_ptr(const void *p)
{
	return p ? 0 : -EINVAL;
}

/* clang-format off */
concur_future *concur_nop(concur_exec *ex)
	IO_FUTURE_BODY(IORING_OP_NOP, 0, io_uring_prep_nop(sqe), CONCUR_NO_TIMEOUT)
int64_t concur_await_nop(void)
	IO_AWAIT_BODY(IORING_OP_NOP, 0, io_uring_prep_nop(sqe), CONCUR_NO_TIMEOUT)

concur_future *concur_timeout(concur_exec *ex, int64_t ns)
	IO_FUTURE_BODY(IORING_OP_TIMEOUT, ns < 0 ? -EINVAL : 0,
		       (CONCUR__NS_TO_TS(&r_->ts, ns), io_uring_prep_timeout(sqe, &r_->ts, 0, 0)),
		       CONCUR_NO_TIMEOUT)
int64_t concur_await_timeout(int64_t ns)
	IO_AWAIT_BODY(IORING_OP_TIMEOUT, ns < 0 ? -EINVAL : 0,
		      (CONCUR__NS_TO_TS(&r_->ts, ns), io_uring_prep_timeout(sqe, &r_->ts, 0, 0)),
		      CONCUR_NO_TIMEOUT)

/* concur_read, concur_await_read */
IO_OP(read, IORING_OP_READ, (int fd, void *buf, size_t len, int64_t off),
      io_check_buf(buf, len, off), io_uring_prep_read(sqe, fd, buf, io_len(len), (uint64_t)off))
/* concur_write, concur_await_write */
IO_OP(write, IORING_OP_WRITE, (int fd, const void *buf, size_t len, int64_t off),
      io_check_buf(buf, len, off),
      io_uring_prep_write(sqe, fd, buf, io_len(len), (uint64_t)off))
/* concur_readv, concur_await_readv */
IO_OP(readv, IORING_OP_READV, (int fd, const struct iovec *iov, int iovcnt, int64_t off),
      io_check_iov(iov, iovcnt, off),
      io_uring_prep_readv(sqe, fd, iov, (unsigned)iovcnt, (uint64_t)off))
/* concur_writev, concur_await_writev */
IO_OP(writev, IORING_OP_WRITEV, (int fd, const struct iovec *iov, int iovcnt, int64_t off),
      io_check_iov(iov, iovcnt, off),
      io_uring_prep_writev(sqe, fd, iov, (unsigned)iovcnt, (uint64_t)off))
/* concur_fsync, concur_await_fsync */
IO_OP(fsync, IORING_OP_FSYNC, (int fd, bool datasync), 0,
      io_uring_prep_fsync(sqe, fd, datasync ? IORING_FSYNC_DATASYNC : 0))
/* concur_openat, concur_await_openat */
IO_OP(openat, IORING_OP_OPENAT, (int dfd, const char *path, int flags, mode_t mode),
      io_check_ptr(path), io_uring_prep_openat(sqe, dfd, path, flags, mode))
/* concur_close, concur_await_close */
IO_OP(close, IORING_OP_CLOSE, (int fd), 0, io_uring_prep_close(sqe, fd))
/* concur_statx, concur_await_statx */
IO_OP(statx, IORING_OP_STATX,
      (int dfd, const char *path, int flags, unsigned mask, struct statx *out),
      io_check_ptr(path) ?: io_check_ptr(out),
      io_uring_prep_statx(sqe, dfd, path, flags, mask, out))
/* concur_fallocate, concur_await_fallocate */
IO_OP(fallocate, IORING_OP_FALLOCATE, (int fd, int mode, int64_t off, int64_t len),
      off < 0 || len < 0 ? -EINVAL : 0, io_uring_prep_fallocate(sqe, fd, mode, off, len))
/* concur_unlinkat, concur_await_unlinkat */
IO_OP(unlinkat, IORING_OP_UNLINKAT, (int dfd, const char *path, int flags), io_check_ptr(path),
      io_uring_prep_unlinkat(sqe, dfd, path, flags))
/* concur_renameat, concur_await_renameat */
IO_OP(renameat, IORING_OP_RENAMEAT,
      (int olddfd, const char *oldpath, int newdfd, const char *newpath, unsigned flags),
      io_check_ptr(oldpath) ?: io_check_ptr(newpath),
      io_uring_prep_renameat(sqe, olddfd, oldpath, newdfd, newpath, flags))
/* concur_mkdirat, concur_await_mkdirat */
IO_OP(mkdirat, IORING_OP_MKDIRAT, (int dfd, const char *path, mode_t mode), io_check_ptr(path),
      io_uring_prep_mkdirat(sqe, dfd, path, mode))
/* concur_socket, concur_await_socket */
IO_OP(socket, IORING_OP_SOCKET, (int domain, int type, int protocol), 0,
      io_uring_prep_socket(sqe, domain, type, protocol, 0))
/* concur_accept, concur_await_accept */
IO_OP(accept, IORING_OP_ACCEPT, (int fd, struct sockaddr *addr, socklen_t *addrlen, int flags),
      !addr != !addrlen ? -EINVAL : 0, io_uring_prep_accept(sqe, fd, addr, addrlen, flags))
/* concur_connect, concur_await_connect */
IO_OP(connect, IORING_OP_CONNECT, (int fd, const struct sockaddr *addr, socklen_t addrlen),
      io_check_ptr(addr), io_uring_prep_connect(sqe, fd, addr, addrlen))
/* concur_recv, concur_await_recv */
IO_OP(recv, IORING_OP_RECV, (int fd, void *buf, size_t len, int flags),
      io_check_buf(buf, len, 0), io_uring_prep_recv(sqe, fd, buf, io_len(len), flags))
/* concur_send, concur_await_send */
IO_OP(send, IORING_OP_SEND, (int fd, const void *buf, size_t len, int flags),
      io_check_buf(buf, len, 0), io_uring_prep_send(sqe, fd, buf, io_len(len), flags))
/* concur_recvmsg, concur_await_recvmsg */
IO_OP(recvmsg, IORING_OP_RECVMSG, (int fd, struct msghdr *msg, int flags), io_check_ptr(msg),
      io_uring_prep_recvmsg(sqe, fd, msg, (unsigned)flags))
/* concur_sendmsg, concur_await_sendmsg */
IO_OP(sendmsg, IORING_OP_SENDMSG, (int fd, const struct msghdr *msg, int flags),
      io_check_ptr(msg), io_uring_prep_sendmsg(sqe, fd, msg, (unsigned)flags))
/* concur_shutdown, concur_await_shutdown */
IO_OP(shutdown, IORING_OP_SHUTDOWN, (int fd, int how), 0, io_uring_prep_shutdown(sqe, fd, how))
/* concur_poll, concur_await_poll */
IO_OP(poll, IORING_OP_POLL_ADD, (int fd, unsigned events), 0,
      io_uring_prep_poll_add(sqe, fd, events))
/* concur_splice, concur_await_splice */
IO_OP(splice, IORING_OP_SPLICE,
      (int fd_in, int64_t off_in, int fd_out, int64_t off_out, size_t len, unsigned flags),
      off_in < -1 || off_out < -1 ? -EINVAL : 0,
      io_uring_prep_splice(sqe, fd_in, off_in, fd_out, off_out, io_len(len), flags))
    /* clang-format on */

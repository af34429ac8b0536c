/* SPDX-License-Identifier: MIT */
/*
 * Signals as futures. concur_signal() opens a signalfd for the set and reads one
 * struct signalfd_siginfo from it through the ring, with the public I/O future (concur_read).
 * The descriptor stays blocking: io_uring then arms a poll for the read and retries it when a
 * signal arrives, so a pending signal future costs no thread and no CPU and the loops keep
 * sleeping in io_uring_enter (with O_NONBLOCK the read would just fail with -EAGAIN).
 *
 * When the read is done, a waiter node embedded in the signal's future (no allocation on that
 * path, so nothing there can fail and leave the descriptor open) closes the descriptor, then
 * completes the future with the signal's number through concur__complete(). Cancelling the
 * future cancels the read (concur_cancel on it: IORING_OP_ASYNC_CANCEL), and the same path
 * closes the descriptor and ends the future CANCELLED.
 *
 * The read runs in a loop thread's context (io_uring retries it there when the poll fires), and
 * a signalfd yields the signals pending for the whole process and for the reading thread only:
 * kill(getpid(), sig) and signals from other processes are seen; raise() or pthread_kill() aimed
 * at a thread outside the executor are not (they stay pending on that thread). The signals must
 * be blocked in every thread, or their default action (or a handler) takes them first: that is
 * the caller's job (see include/concur.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "internal.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/signalfd.h>
#include <unistd.h>

struct concur__signal {
	struct concur_future f;        /* first: the signal is its future */
	int fd;                        /* the signalfd, -1 once closed */
	concur_future *read;           /* the read; our reference, dropped with the signal */
	struct concur__waiter on_read; /* WAIT_CALL on the read: embedded, cannot fail */
	struct signalfd_siginfo info;  /* the read's buffer: lives until the read is done */
};

_Static_assert(offsetof(struct concur__signal, f) == 0, "a signal starts with its future");

/* True if set holds no signal a signalfd can take (SIGKILL and SIGSTOP are ignored by it). */
static bool concur__sigset_empty(const sigset_t *set)
{
	for (int sig = 1; sig < NSIG; sig++)
		if (sig != SIGKILL && sig != SIGSTOP && sigismember(set, sig) == 1)
			return false;
	return true;
}

/* The read is done (on the loop that reaped it, or in the thread that cancelled it unsent). */
static void concur__signal_read_done(struct concur__waiter *w, concur_future *rf)
{
	struct concur__signal *s = concur__container_of(w, struct concur__signal, on_read);
	bool cancelled = concur__state(rf) == CONCUR__CANCELLED;
	int64_t res = concur__future_value(rf);

	if (res == (int64_t)sizeof(s->info))
		res = s->info.ssi_signo;
	else if (res >= 0)
		res = -EIO; /* a short read: cannot happen with a whole siginfo asked for */
	/* closed before completing: whoever sees the future done sees the descriptor gone */
	close(s->fd);
	s->fd = -1;
	concur__complete(&s->f, res, cancelled ? CONCUR__CANCELLED : CONCUR__FINISHED);
	concur_release(&s->f); /* the read's reference */
}

/* The signal holds a reference on its read, so the read never dies unset: no drop hook. */
static const struct concur__waiter_ops concur__signal_read_ops = {
    .done = concur__signal_read_done,
};

static int concur__signal_cancel_running(concur_future *f)
{
	struct concur__signal *s = (struct concur__signal *)f;
	int r = concur_cancel(s->read);

	/* 1: the read was not sent yet and is CANCELLED; its waiter has completed us already */
	return r == 1 ? 1 : r == 0 ? 0 : -EINPROGRESS;
}

static void concur__signal_destroy(concur_future *f)
{
	struct concur__signal *s = (struct concur__signal *)f;

	concur_release(s->read);
	free(s);
}

static const struct concur__future_class concur__signal_class = {
    .name = "signal",
    .cancel_running = concur__signal_cancel_running,
    .destroy = concur__signal_destroy,
};

concur_future *concur_signal(concur_exec *ex, const sigset_t *set)
{
	if (!concur__exec_valid(ex))
		return concur__failed_future(NULL, -EINVAL);
	if (!set || concur__sigset_empty(set))
		return concur__failed_future(ex, -EINVAL);
	struct concur__signal *s = malloc(sizeof(*s));
	if (!s)
		return concur__failed_future(ex, -ENOMEM);
	s->fd = signalfd(-1, set, SFD_CLOEXEC); /* blocking on purpose: see the top of the file */
	if (s->fd < 0) {
		int err = -errno;
		free(s);
		return concur__failed_future(ex, err);
	}
	concur__future_init(&s->f, &concur__signal_class, ex, 2); /* the caller's, the read's */
	concur__future_claim(&s->f); /* RUNNING from the start: a cancel cancels the read */
	s->read = concur_read(ex, s->fd, &s->info, sizeof(s->info), -1, CONCUR_NO_TIMEOUT);
	s->on_read.kind = CONCUR__WAIT_CALL;
	s->on_read.ops = &concur__signal_read_ops;
	if (!concur__waiter_push(s->read, &s->on_read)) /* done already (failed, or a signal) */
		concur__signal_read_done(&s->on_read, s->read);
	return &s->f;
}

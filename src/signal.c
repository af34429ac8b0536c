/* SPDX-License-Identifier: MIT */
/*
 * Signals as futures. concur_signal() opens a non-blocking signalfd for the set and waits for it
 * to be readable with the public I/O future (concur_poll, IORING_OP_POLL_ADD), then reads one
 * struct signalfd_siginfo from it on the loop thread that reaped the poll. A pending signal
 * future costs no thread and no CPU, and the loops keep sleeping in io_uring_enter.
 *
 * Not a read of a blocking descriptor through the ring: io_uring arms an internal poll for such
 * a read and retries it on every wake-up, and a signalfd is woken by every signal sent to the
 * process, those outside its set too; after 128 retries that found nothing (APOLL_MAX_RETRY)
 * the kernel hands the read to an io-wq worker thread, which then blocks in it for as long as
 * the future waits. A poll has no such cap: the kernel re-checks the set on each wake-up and
 * completes it only when a signal of the set is pending. Its read can still find nothing
 * (another future for the same signal took it): then a new poll is armed.
 *
 * When the poll is done, a waiter node embedded in the signal's future (no allocation on that
 * path but the next poll's) reads, and either arms the next poll or closes the descriptor and
 * completes the future through concur__complete(). Cancelling the future cancels the poll in
 * flight (concur_cancel on it: IORING_OP_ASYNC_CANCEL), and the same path closes the descriptor
 * and ends the future CANCELLED. The poll in flight changes under a lock, which a cancel from
 * another thread takes to find it (and to ask that no next one be armed).
 *
 * The read runs on a loop thread, and a signalfd yields the signals pending for the whole process
 * and for the reading thread only: kill(getpid(), sig) and signals from other processes are
 * seen; raise() or pthread_kill() aimed at a thread outside the executor are not (they stay
 * pending on that thread). The signals must be blocked in every thread, or their default action
 * (or a handler) takes them first: that is the caller's job (see include/concur.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "internal.h"

#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/signalfd.h>
#include <unistd.h>

struct concur__signal {
	struct concur_future f;        /* first: the signal is its future */
	int fd;                        /* the signalfd, -1 once closed */
	pthread_mutex_t lock;          /* poll and cancel_req */
	concur_future *poll;           /* the poll in flight, or the last; our reference */
	bool cancel_req;               /* cancelled: arm no next poll */
	struct concur__waiter on_poll; /* WAIT_CALL on the poll: embedded, cannot fail */
	struct signalfd_siginfo info;
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

/* The end: closed before completing, so whoever sees the future done sees the descriptor gone. */
static void concur__signal_end(struct concur__signal *s, int64_t res, uint32_t state)
{
	close(s->fd);
	s->fd = -1;
	concur__complete(&s->f, res, state);
	concur_release(&s->f); /* the polls' reference */
}

static void concur__signal_poll_done(struct concur__waiter *w, concur_future *pf);

/* The read found nothing: wait for the next signal, unless the future was cancelled meanwhile. */
static void concur__signal_rearm(struct concur__signal *s)
{
	pthread_mutex_lock(&s->lock);
	if (s->cancel_req) {
		pthread_mutex_unlock(&s->lock);
		concur__signal_end(s, -ECANCELED, CONCUR__CANCELLED);
		return;
	}
	concur_future *old = s->poll;
	concur_future *pf = concur_poll(s->f.ex, s->fd, POLLIN, CONCUR_NO_TIMEOUT);
	s->poll = pf;
	pthread_mutex_unlock(&s->lock);
	concur_release(old); /* done: nothing touches it after its waiters' hooks */
	if (!concur__waiter_push(pf, &s->on_poll)) /* failed (-ENOMEM), or cancelled already */
		concur__signal_poll_done(&s->on_poll, pf);
}

/* The poll is done (on the loop that reaped it, or in the thread that cancelled it unsent). */
static void concur__signal_poll_done(struct concur__waiter *w, concur_future *pf)
{
	struct concur__signal *s = concur__container_of(w, struct concur__signal, on_poll);
	int64_t res = concur__future_value(pf);

	if (concur__state(pf) == CONCUR__CANCELLED) {
		concur__signal_end(s, -ECANCELED, CONCUR__CANCELLED);
		return;
	}
	if (res < 0) {
		concur__signal_end(s, res, CONCUR__FINISHED);
		return;
	}
	ssize_t n = read(s->fd, &s->info, sizeof(s->info));
	if (n == (ssize_t)sizeof(s->info))
		concur__signal_end(s, s->info.ssi_signo, CONCUR__FINISHED);
	else if (n < 0 && errno == EAGAIN) /* another future for the signal took it */
		concur__signal_rearm(s);
	else /* a short read cannot happen with a whole siginfo asked for */
		concur__signal_end(s, n < 0 ? -errno : -EIO, CONCUR__FINISHED);
}

/* The signal holds a reference on its poll, so the poll never dies unset: no drop hook. */
static const struct concur__waiter_ops concur__signal_poll_ops = {
    .done = concur__signal_poll_done,
};

static int concur__signal_cancel_running(concur_future *f)
{
	struct concur__signal *s = (struct concur__signal *)f;

	pthread_mutex_lock(&s->lock);
	s->cancel_req = true;
	concur_future *pf = s->poll;
	concur_retain(pf);
	pthread_mutex_unlock(&s->lock);
	int r = concur_cancel(pf);
	concur_release(pf);
	if (r != 1)
		return -EINPROGRESS; /* in flight: cancelled in the kernel; or done and being read
		                      */
	/* CANCELLED (unsent, by us or a cancel before us): its hook ends us, in the thread that
	 * cancelled it; a cancel before ours may be in that hook still */
	concur__future_wait_final(f);
	return 1;
}

static void concur__signal_destroy(concur_future *f)
{
	struct concur__signal *s = (struct concur__signal *)f;

	concur_release(s->poll);
	pthread_mutex_destroy(&s->lock);
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
	s->fd = signalfd(-1, set, SFD_CLOEXEC | SFD_NONBLOCK); /* see the top of the file */
	if (s->fd < 0) {
		int err = -errno;
		free(s);
		return concur__failed_future(ex, err);
	}
	pthread_mutex_init(&s->lock, NULL);
	s->cancel_req = false;
	concur__future_init(&s->f, &concur__signal_class, ex, 2); /* the caller's, the polls' */
	concur__future_claim(&s->f); /* RUNNING from the start: a cancel cancels the poll */
	s->poll = concur_poll(ex, s->fd, POLLIN, CONCUR_NO_TIMEOUT);
	s->on_poll.kind = CONCUR__WAIT_CALL;
	s->on_poll.ops = &concur__signal_poll_ops;
	if (!concur__waiter_push(s->poll, &s->on_poll)) /* done already (failed) */
		concur__signal_poll_done(&s->on_poll, s->poll);
	return &s->f;
}

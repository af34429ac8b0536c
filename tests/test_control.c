/* SPDX-License-Identifier: MIT */
/*
 * Control of running tasks (src/control.c, with the loop's timer in src/timer.c): cancelling a
 * task suspended in each kind of wait, stickiness, shields, deadline scopes, concur_exec_stop.
 * Orders are forced with promises, never by racing.
 */
#include "helpers.h"
#include "internal.h" /* a loop's sleeping flag */

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

/* A task that records what its waits returned, step by step. */
struct probe {
	concur_future *p;  /* what it first awaits */
	concur_future *p2; /* what it awaits next */
	atomic_int stage;  /* 1: about to wait, 2: first wait returned */
	int64_t r1, r2;
	int fd;
	bool forced; /* the order a test is about was forced */
	concur_mutex *m;
	concur_chan *ch;
};

static void wait_stage(struct probe *pr, int stage)
{
	while (atomic_load(&pr->stage) < stage)
		usleep(100);
}

static int64_t await_twice(void *arg)
{
	struct probe *pr = arg;
	atomic_store(&pr->stage, 1);
	pr->r1 = concur_result(pr->p, -1);
	atomic_store(&pr->stage, 2);
	pr->r2 = concur_result(pr->p2, -1); /* sticky: fails at once */
	return pr->r1 == -ECANCELED ? -ECANCELED : 5;
}

/* Give the task time to suspend after announcing it is about to (it cannot be observed). */
static void let_it_suspend(void)
{
	usleep(20000);
}

static void test_cancel_await_from_thread(void **state)
{
	concur_exec *ex = new_exec(2);
	struct probe pr = {.p = concur_promise_new(ex), .p2 = concur_promise_new(ex)};
	concur_future *t = concur_spawn(ex, await_twice, &pr);
	wait_stage(&pr, 1);
	let_it_suspend();
	assert_true(concur_running(t));
	assert_int_equal(concur_cancel(t), -EINPROGRESS);
	assert_int_equal(concur_result(t, -1), -ECANCELED);
	assert_true(concur_cancelled(t));
	assert_int_equal(pr.r1, -ECANCELED);
	assert_int_equal(pr.r2, -ECANCELED);
	assert_int_equal(concur_cancel(t), 1); /* CANCELLED now */
	/* the awaits took their nodes off the promises: nothing is left to wake or leak */
	assert_int_equal(concur_promise_set(pr.p, 1), 0);
	concur_release(t);
	concur_release(pr.p);
	concur_release(pr.p2);
	concur_exec_free(ex);
}

/* Another task of the executor cancels, on its own loop or the other. */
static int64_t cancel_it(void *arg)
{
	return concur_cancel(arg);
}

static void test_cancel_await_from_task(void **state)
{
	concur_exec *ex = new_exec(2);
	for (int i = 0; i < 4; i++) { /* round-robin: both the same loop and the other */
		struct probe pr = {.p = concur_promise_new(ex), .p2 = concur_promise_new(ex)};
		concur_future *t = concur_spawn(ex, await_twice, &pr);
		wait_stage(&pr, 1);
		let_it_suspend();
		concur_future *c = concur_spawn(ex, cancel_it, t);
		assert_int_equal(concur_result(c, -1), -EINPROGRESS);
		assert_int_equal(concur_result(t, -1), -ECANCELED);
		assert_int_equal(pr.r1, -ECANCELED);
		concur_release(c);
		concur_release(t);
		concur_release(pr.p);
		concur_release(pr.p2);
	}
	concur_exec_free(ex);
}

/* The completion and the cancel both come: exactly one outcome for the wait. */
static void test_cancel_after_completion(void **state)
{
	concur_exec *ex = new_exec(1);
	struct probe pr = {.p = concur_promise_new(ex), .p2 = concur_promise_new(ex)};
	concur_future *t = concur_spawn(ex, await_twice, &pr);
	wait_stage(&pr, 1);
	let_it_suspend();
	assert_int_equal(concur_promise_set(pr.p, 42), 0); /* resumes it (or will) */
	int c = concur_cancel(t);
	assert_true(c == -EINPROGRESS || c == 0);
	int64_t r = concur_result(t, -1);
	if (c == 0) { /* it had finished already: impossible, it waits on p2 */
		fail_msg("cancel found the task done: %lld", (long long)r);
	}
	/* the first wait was over before the cancel: it keeps the value; the next one fails */
	assert_true(pr.r1 == 42 || pr.r1 == -ECANCELED);
	assert_int_equal(pr.r2, -ECANCELED);
	assert_int_equal(r, pr.r1 == 42 ? 5 : -ECANCELED);
	concur_release(t);
	concur_release(pr.p);
	concur_release(pr.p2);
	concur_exec_free(ex);
}

static int64_t recv_task(void *arg)
{
	struct probe *pr = arg;
	char buf[64];
	atomic_store(&pr->stage, 1);
	pr->r1 = concur_await_recv(pr->fd, buf, sizeof(buf), 0, CONCUR_NO_TIMEOUT);
	pr->r2 = concur_await_nop(); /* sticky */
	return pr->r1;
}

static void test_cancel_recv(void **state)
{
	concur_exec *ex = new_exec(2);
	int sv[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	struct probe pr = {.fd = sv[0]};
	concur_future *t = concur_spawn(ex, recv_task, &pr);
	wait_stage(&pr, 1);
	let_it_suspend();
	assert_int_equal(concur_cancel(t), -EINPROGRESS);
	assert_int_equal(concur_result(t, -1), -ECANCELED);
	assert_int_equal(pr.r1, -ECANCELED);
	assert_int_equal(pr.r2, -ECANCELED);
	/* the recv is gone from the kernel: data sent now stays in the socket */
	assert_int_equal(write(sv[1], "x", 1), 1);
	char c;
	assert_int_equal(read(sv[0], &c, 1), 1);
	close(sv[0]);
	close(sv[1]);
	concur_release(t);
	concur_exec_free(ex);
}

static int64_t sleep_task(void *arg)
{
	struct probe *pr = arg;
	atomic_store(&pr->stage, 1);
	pr->r1 = concur_sleep(MS(60000));
	return pr->r1;
}

static void test_cancel_sleep(void **state)
{
	concur_exec *ex = new_exec(1);
	struct probe pr = {0};
	concur_future *t = concur_spawn(ex, sleep_task, &pr);
	wait_stage(&pr, 1);
	let_it_suspend();
	assert_int_equal(concur_cancel(t), -EINPROGRESS);
	assert_int_equal(concur_result(t, MS(10000)), -ECANCELED);
	concur_release(t);
	concur_exec_free(ex);
}

static int64_t mutex_task(void *arg)
{
	struct probe *pr = arg;
	atomic_store(&pr->stage, 1);
	pr->r1 = concur_mutex_lock(pr->m, -1);
	atomic_store(&pr->stage, 2);
	pr->r2 = concur_chan_recv(pr->ch, &pr->r2, -1);
	return 0;
}

static void test_cancel_sync_waits(void **state)
{
	concur_exec *ex = new_exec(2);
	struct probe pr = {0};
	assert_int_equal(concur_mutex_new(&pr.m), 0);
	assert_int_equal(concur_chan_new(&pr.ch, 1), 0);
	assert_int_equal(concur_mutex_lock(pr.m, -1), 0); /* held here: the task queues */
	concur_future *t = concur_spawn(ex, mutex_task, &pr);
	wait_stage(&pr, 1);
	while (concur_mutex_waiters(pr.m) != 1) /* queued behind us */
		usleep(100);
	assert_int_equal(concur_cancel(t), -EINPROGRESS);
	assert_int_equal(concur_result(t, -1), 0);
	assert_int_equal(pr.r1, -ECANCELED);
	assert_int_equal(pr.r2, -ECANCELED);             /* the channel wait fails at once */
	assert_int_equal(concur_mutex_waiters(pr.m), 0); /* it left the queue */
	assert_int_equal(concur_mutex_unlock(pr.m), 0);
	assert_int_equal(concur_mutex_trylock(pr.m), 0); /* nobody was handed the mutex */
	concur_release(t);
	concur_mutex_free(pr.m);
	concur_chan_free(pr.ch);
	concur_exec_free(ex);
}

/* A stream's next() and a concur_wait() break too; what the stream receives later stays. */
static int64_t stream_task(void *arg)
{
	struct probe *pr = arg;
	concur_stream *st;
	assert_int_equal(concur_accept_stream(&st, pr->fd, SOCK_CLOEXEC), 0);
	assert_int_equal(concur_deadline_push(MS(20)), 0);
	int64_t r0 = concur_stream_next(st, NULL); /* nobody connects: the deadline */
	concur_deadline_pop();
	atomic_store(&pr->stage, 1);
	pr->r1 = concur_stream_next(st, NULL); /* then the cancel */
	concur_future *fs[] = {pr->p};
	pr->r2 = concur_wait(fs, 1, CONCUR_ALL_COMPLETED, -1, NULL); /* sticky */
	assert_int_equal(concur_shield_push(), 0);
	int64_t fd = concur_stream_next(st, NULL); /* shielded: the connection comes */
	concur_shield_pop();
	if (fd >= 0)
		close((int)fd);
	concur_stream_close(st);
	return r0 == -ETIMEDOUT && fd >= 0 ? 0 : -1;
}

static void test_cancel_stream_and_wait(void **state)
{
	concur_exec *ex = new_exec(1);
	int ls = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof(a);
	assert_int_equal(bind(ls, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(ls, 8), 0);
	assert_int_equal(getsockname(ls, (struct sockaddr *)&a, &alen), 0);
	struct probe pr = {.fd = ls, .p = concur_promise_new(ex)};
	concur_future *t = concur_spawn(ex, stream_task, &pr);
	wait_stage(&pr, 1);
	let_it_suspend();
	assert_int_equal(concur_cancel(t), -EINPROGRESS);
	let_it_suspend();
	int c = socket(AF_INET, SOCK_STREAM, 0);
	assert_int_equal(connect(c, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(concur_result(t, -1), 0);
	assert_int_equal(pr.r1, -ECANCELED);
	assert_int_equal(pr.r2, -ECANCELED);
	close(c);
	close(ls);
	concur_release(t);
	concur_release(pr.p);
	concur_exec_free(ex);
}

/* A group's cancel reaches its running members: the one waiting breaks out. */
static int64_t member_waits(void *arg)
{
	struct probe *pr = arg;
	atomic_fetch_add(&pr->stage, 1);
	return concur_result(pr->p, -1); /* -ECANCELED: it ends CANCELLED */
}

static int64_t member_fails(void *arg)
{
	struct probe *pr = arg;
	while (atomic_load(&pr->stage) < 1)
		concur_yield();
	let_it_suspend();
	return -EIO;
}

static void test_group_cancels_running(void **state)
{
	concur_exec *ex = new_exec(2);
	struct probe pr = {.p = concur_promise_new(ex)};
	concur_group *g;
	assert_int_equal(concur_group_new(&g, ex, CONCUR_GROUP_CANCEL_ON_FAILURE), 0);
	concur_future *w = concur_group_spawn(g, member_waits, &pr);
	concur_future *f = concur_group_spawn(g, member_fails, &pr);
	assert_int_equal(concur_group_wait(g, -1), -EIO); /* the failure cancelled the waiter */
	assert_int_equal(concur_result(w, 0), -ECANCELED);
	assert_true(concur_cancelled(w));
	assert_true(concur_group_cancelled(g));
	concur_release(w);
	concur_release(f);
	concur_group_free(g);
	/* by hand: a running member is told to stop, and counted */
	assert_int_equal(concur_group_new(&g, ex, 0), 0);
	atomic_store(&pr.stage, 0);
	w = concur_group_spawn(g, member_waits, &pr);
	wait_stage(&pr, 1);
	let_it_suspend();
	assert_int_equal(concur_group_cancel(g), 1);
	assert_int_equal(concur_group_wait(g, -1), -ECANCELED);
	concur_release(w);
	concur_group_free(g);
	concur_release(pr.p);
	concur_exec_free(ex);
}

/* Cleanup that must not be cancelled runs under a shield; the cancel applies after it. */
static int64_t shielded_task(void *arg)
{
	struct probe *pr = arg;
	assert_int_equal(concur_shield_push(), 0);
	atomic_store(&pr->stage, 1);
	pr->r1 = concur_result(pr->p, -1); /* the cancel comes meanwhile: not seen */
	int64_t in_shield = concur_await_nop();
	assert_true(concur_cancel_requested());
	assert_int_equal(concur_shield_pop(), 0);
	pr->r2 = concur_await_nop(); /* unshielded: the cancel applies */
	return in_shield == 0 ? 9 : -1;
}

static void test_shield(void **state)
{
	concur_exec *ex = new_exec(1);
	struct probe pr = {.p = concur_promise_new(ex)};
	concur_future *t = concur_spawn(ex, shielded_task, &pr);
	wait_stage(&pr, 1);
	let_it_suspend();
	assert_int_equal(concur_cancel(t), -EINPROGRESS);
	assert_int_equal(concur_result(t, MS(50)), -ETIMEDOUT); /* still waiting, shielded */
	assert_int_equal(concur_cancel(t), -EINPROGRESS);       /* asked already */
	assert_int_equal(concur_promise_set(pr.p, 3), 0);
	assert_int_equal(concur_result(t, -1), 9);
	assert_int_equal(pr.r1, 3);
	assert_int_equal(pr.r2, -ECANCELED);
	assert_int_equal(concur_shield_pop(), -EPERM);
	concur_release(t);
	concur_release(pr.p);
	concur_exec_free(ex);
}

/*
 * Shields nest freely, but the depth has a bound: a push past it must fail, not wrap the depth
 * back to 0 (which unshields the cleanup, and makes every later pop fail). The task cancels
 * itself (its own future handed over through a gate), so no order is left to chance.
 */
struct deep_shield {
	concur_future *gate; /* set once self is written */
	concur_future *self; /* the task's own future */
	concur_future *p;    /* what the shielded cleanup awaits */
	int pushed;          /* pushes that returned 0 */
	int push_err;        /* the push that failed, or 0 */
	int cancel;          /* concur_cancel(self) */
	int64_t r1, r2;
	int pops_ok; /* pops that returned 0 */
};

static int64_t deep_shield_task(void *arg)
{
	struct deep_shield *d = arg;
	concur_result(d->gate, -1);
	for (int i = 0; i < 65536; i++) {
		int r = concur_shield_push();
		if (r) {
			d->push_err = r;
			break;
		}
		d->pushed++;
	}
	d->cancel = concur_cancel(d->self);
	d->r1 = concur_result(d->p, MS(20)); /* shielded: waits for p, never set */
	for (int i = 0; i < d->pushed; i++)
		d->pops_ok += concur_shield_pop() == 0;
	d->r2 = concur_await_nop(); /* unshielded: the cancel applies */
	return 0;
}

static void test_shield_depth_bounded(void **state)
{
	concur_exec *ex = new_exec(1);
	struct deep_shield d = {.gate = concur_promise_new(ex), .p = concur_promise_new(ex)};
	d.self = concur_spawn(ex, deep_shield_task, &d);
	assert_int_equal(concur_promise_set(d.gate, 0), 0);
	assert_int_equal(concur_result(d.self, -1), 0);
	assert_int_equal(d.cancel, -EINPROGRESS);
	assert_int_equal(d.r1, -ETIMEDOUT); /* shielded at every depth that was accepted */
	assert_int_equal(d.push_err, -EOVERFLOW);
	assert_int_equal(d.pushed, 65535);
	assert_int_equal(d.pops_ok, d.pushed); /* every accepted push pops */
	assert_int_equal(d.r2, -ECANCELED);
	concur_release(d.self);
	concur_release(d.gate);
	concur_release(d.p);
	concur_exec_free(ex);
}

static int64_t deadline_task(void *arg)
{
	struct probe *pr = arg;
	assert_int_equal(concur_deadline_push(MS(60000)), 0);
	assert_int_equal(concur_deadline_push(MS(30)), 0); /* nested: the earliest wins */
	pr->r1 = concur_result(pr->p, -1);
	assert_int_equal(concur_await_nop(), -ETIMEDOUT); /* sticky until popped */
	assert_int_equal(concur_deadline_pop(), 1);       /* it had passed */
	pr->r2 = concur_await_nop();                      /* the outer one has not */
	assert_int_equal(concur_deadline_pop(), 0);
	assert_int_equal(concur_deadline_pop(), -EINVAL);
	assert_int_equal(concur_deadline_push(-1), -EINVAL);
	return 0;
}

static void test_deadline_scopes(void **state)
{
	concur_exec *ex = new_exec(1);
	struct probe pr = {.p = concur_promise_new(ex)};
	concur_future *t = concur_spawn(ex, deadline_task, &pr);
	assert_int_equal(concur_result(t, -1), 0);
	assert_int_equal(pr.r1, -ETIMEDOUT);
	assert_int_equal(pr.r2, 0);
	assert_false(concur_done(pr.p)); /* the future itself is untouched */
	concur_release(t);
	concur_release(pr.p);
	assert_int_equal(concur_deadline_push(0), -EPERM);
	assert_int_equal(concur_deadline_pop(), -EPERM);
	assert_int_equal(concur_shield_push(), -EPERM);
	concur_exec_free(ex);
}

/* A deadline that passed while the task computed fails its next wait at once, without
 * starting the operation. */
static int64_t busy_then_recv(void *arg)
{
	struct probe *pr = arg;
	assert_int_equal(concur_deadline_push(MS(2)), 0);
	int64_t until = now_ns() + MS(30);
	while (now_ns() < until)
		; /* CPU work: the loop reaps nothing meanwhile */
	char c;
	pr->r1 = concur_await_recv(pr->fd, &c, 1, 0, CONCUR_NO_TIMEOUT);
	pr->r2 = concur_deadline_pop(); /* passed, though the loop's timer has not said so */
	return 0;
}

/* fn passes its deadline computing, then recvs from a socket with a byte waiting: the recv fails
 * -ETIMEDOUT without taking the byte, and the pop says the deadline had passed. */
static void expect_recv_refused(concur_task_fn fn, bool forced)
{
	concur_exec *ex = new_exec(1);
	int sv[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	assert_int_equal(write(sv[1], "y", 1), 1); /* the recv would succeed if it started */
	struct probe pr = {.fd = sv[0]};
	concur_future *t = concur_spawn(ex, fn, &pr);
	assert_int_equal(concur_result(t, -1), 0);
	assert_true(pr.forced || !forced);   /* the order under test was forced */
	assert_int_equal(pr.r2, 1);          /* the pop says the deadline had passed */
	assert_int_equal(pr.r1, -ETIMEDOUT); /* header: "fails its next wait at once" */
	char c;
	assert_int_equal(read(sv[0], &c, 1), 1); /* the byte was never taken */
	close(sv[0]);
	close(sv[1]);
	concur_release(t);
	concur_exec_free(ex);
}

static void test_deadline_during_cpu_work(void **state)
{
	expect_recv_refused(busy_then_recv, false);
}

/*
 * A deadline that passed less than a tick ago (while the task computed) fails the next wait at
 * once, as one long past does. The check read only the coarse clock, a tick (4 ms here) behind:
 * the wait began, its recv took the byte waiting for it, and the deadline's interrupt came too
 * late -- while concur_deadline_pop (the precise clock) said the deadline had passed. Forced:
 * the task starts just after a tick of the coarse clock, and passes the deadline within it.
 */
static int64_t coarse_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t busy_past_deadline_then_recv(void *arg)
{
	struct probe *pr = arg;
	struct timespec res;
	clock_getres(CLOCK_MONOTONIC_COARSE, &res);
	int64_t d = ((int64_t)res.tv_sec * 1000000000 + res.tv_nsec) / 4; /* a quarter tick */
	/* a try preempted long enough for the coarse clock to catch up does not count */
	for (int tries = 0; tries < 20 && !pr->forced; tries++) {
		if (tries)
			concur_deadline_pop();
		int64_t c0 = coarse_ns();
		while (coarse_ns() == c0) /* just after a tick: the coarse clock stays put */
			;
		if (concur_deadline_push(d) != 0)
			return -1;
		int64_t until = now_ns() + d + d / 2;
		while (now_ns() < until)
			; /* CPU work: the deadline passes, the loop reaps nothing */
		pr->forced = coarse_ns() < until - d / 2; /* coarse still behind the deadline */
	}
	char c;
	pr->r1 = concur_await_recv(pr->fd, &c, 1, 0, CONCUR_NO_TIMEOUT);
	pr->r2 = concur_deadline_pop();
	return 0;
}

static void test_deadline_passed_within_a_tick(void **state)
{
	(void)state;
	expect_recv_refused(busy_past_deadline_then_recv, true);
}

/* A deadline that does not fire costs no SQE and no CQE per awaited operation. */
#define NOPS 1000
static int64_t nops_under_deadline(void *arg)
{
	assert_int_equal(concur_deadline_push(MS(60000)), 0);
	for (int i = 0; i < NOPS; i++)
		assert_int_equal(concur_await_nop(), 0);
	/* and pushing a later one each time (a request's idle deadline) costs none either */
	for (int i = 0; i < NOPS; i++) {
		assert_int_equal(concur_deadline_push(MS(60000)), 0);
		assert_int_equal(concur_await_nop(), 0);
		assert_int_equal(concur_deadline_pop(), 0);
	}
	return concur_deadline_pop();
}

static void test_deadline_costs_no_cqe(void **state)
{
	concur_exec *ex = new_exec(1);
	struct concur_stats before, after;
	assert_int_equal(concur_exec_stats(ex, &before), 0);
	concur_future *t = concur_spawn(ex, nops_under_deadline, NULL);
	assert_int_equal(concur_result(t, -1), 0);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(concur_exec_stats(ex, &after), 0);
	/* 2 * NOPS nops; the timer armed once (its CQE comes only when it fires, a minute on) */
	assert_true(after.cqes - before.cqes <= 2 * NOPS + 2);
	concur_release(t);
	concur_exec_free(ex);
}

static int64_t sleep_in_scope(void *arg)
{
	assert_int_equal(concur_deadline_push(MS(20)), 0);
	int r = concur_sleep(MS(60000));
	concur_deadline_pop();
	int r2 = concur_sleep(MS(1)); /* its own end: 0 */
	return r == -ETIMEDOUT && r2 == 0 ? 0 : -1;
}

static int64_t timed_result(void *arg)
{
	return concur_result(arg, MS(20));
}

static void test_timed_waits(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *t = concur_spawn(ex, sleep_in_scope, NULL);
	assert_int_equal(concur_result(t, -1), 0);
	concur_release(t);
	concur_future *p = concur_promise_new(ex);
	for (int i = 0; i < 100; i++) { /* each timed-out await removes its node */
		t = concur_spawn(ex, timed_result, p);
		assert_int_equal(concur_result(t, -1), -ETIMEDOUT);
		concur_release(t);
	}
	assert_int_equal(concur_promise_set(p, 1), 0);
	concur_release(p);
	concur_exec_free(ex);
}

/* concur_exec_stop: drain, then cancel; a shielded cleanup runs to its end. */
static int64_t ignores_cancel_once(void *arg)
{
	struct probe *pr = arg;
	atomic_fetch_add(&pr->stage, 1);
	int64_t r = concur_result(pr->p, -1);
	if (r != -ECANCELED)
		return -1;
	assert_int_equal(concur_shield_push(), 0);
	assert_int_equal(concur_deadline_push(MS(5000)), 0); /* cleanup, bounded */
	int s = concur_sleep(MS(30));                        /* not cancelled */
	concur_deadline_pop();
	concur_shield_pop();
	return s == 0 ? 7 : -2;
}

static int64_t stop_from_task(void *arg)
{
	return concur_exec_stop(arg, 0);
}

static void test_exec_stop(void **state)
{
	concur_exec *ex = new_exec(2);
	concur_future *s = concur_spawn(ex, stop_from_task, ex);
	assert_int_equal(concur_result(s, -1), -EDEADLK);
	concur_release(s);
	assert_int_equal(concur_exec_stop(NULL, 0), -EINVAL);

	struct probe pr = {.p = concur_promise_new(ex)};
	concur_future *t[4];
	for (int i = 0; i < 4; i++)
		t[i] = concur_spawn(ex, ignores_cancel_once, &pr);
	wait_stage(&pr, 4);
	let_it_suspend();
	assert_int_equal(concur_exec_stop(ex, MS(30)), -ETIMEDOUT);
	for (int i = 0; i < 4; i++) {
		assert_true(concur_done(t[i]));
		assert_int_equal(concur_result(t[i], 0), 7);
		concur_release(t[i]);
	}
	/* after a stop, spawns fail; a second stop has nothing to drain */
	s = concur_spawn(ex, stop_from_task, ex);
	assert_int_equal(concur_result(s, -1), -ESHUTDOWN);
	concur_release(s);
	assert_int_equal(concur_exec_stop(ex, 0), 0);
	concur_release(pr.p);
	concur_exec_free(ex);
}

/*
 * A stop cancels every task suspended at the time, whatever ran and ended around them without
 * ever suspending (such tasks never join the list a stop walks), and after a suspended one in
 * the middle of that list ended.
 */
static int64_t return_arg(void *arg)
{
	return (intptr_t)arg;
}

static int64_t await_after_stage(void *arg)
{
	struct probe *pr = arg;
	atomic_fetch_add(&pr->stage, 1);
	return concur_result(pr->p, -1);
}

static void test_exec_stop_mixed(void **state)
{
	concur_exec *ex = new_exec(1);
	struct probe pr = {.p = concur_promise_new(ex)}, mid = {.p = concur_promise_new(ex)};
	concur_future *w[3], *q[300];
	for (int i = 0; i < 3; i++) {
		w[i] = concur_spawn(ex, await_after_stage, i == 1 ? &mid : &pr);
		for (int j = 0; j < 100; j++)
			q[i * 100 + j] = concur_spawn(ex, return_arg, (void *)(intptr_t)j);
	}
	for (int i = 0; i < 300; i++) {
		assert_int_equal(concur_result(q[i], -1), i % 100);
		concur_release(q[i]);
	}
	wait_stage(&pr, 2);
	wait_stage(&mid, 1);
	assert_int_equal(concur_promise_set(mid.p, 5), 0); /* the middle one ends first */
	assert_int_equal(concur_result(w[1], -1), 5);
	assert_int_equal(concur_exec_stop(ex, 0), -ETIMEDOUT);
	for (int i = 0; i < 3; i += 2) {
		assert_true(concur_done(w[i]));
		assert_int_equal(concur_result(w[i], 0), -ECANCELED);
	}
	for (int i = 0; i < 3; i++)
		concur_release(w[i]);
	concur_release(pr.p);
	concur_release(mid.p);
	concur_exec_free(ex);
}

/* Future I/O in flight (no task waits for it) is cancelled by a stop too. */
static void test_exec_stop_cancels_io(void **state)
{
	concur_exec *ex = new_exec(2);
	int sv[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	char buf[8];
	concur_future *f = concur_recv(ex, sv[0], buf, sizeof(buf), 0, CONCUR_NO_TIMEOUT);
	assert_int_equal(concur_result(f, MS(20)), -ETIMEDOUT); /* in flight */
	assert_int_equal(concur_exec_stop(ex, MS(20)), -ETIMEDOUT);
	assert_true(concur_done(f));
	assert_int_equal(concur_result(f, 0), -ECANCELED);
	concur_release(f);
	close(sv[0]);
	close(sv[1]);
	concur_exec_free(ex);
}

/*
 * A stop cancels future I/O nobody waits for, not the op a shielded cleanup awaits: the cleanup
 * runs to its end, its op too. (Both used to be cancelled.) The order is forced: a task U that is
 * not shielded learns of the stop after the stop's pass over the loop's I/O (the same message,
 * on the same loop), and only then is the shielded read given its byte.
 */
static int shield_pipe[2];
static atomic_bool stop_seen;

static int64_t shielded_read(void *arg)
{
	(void)arg;
	char c = 0;
	assert_int_equal(concur_shield_push(), 0);
	concur_future *f =
	    concur_read(concur_current_exec(), shield_pipe[0], &c, 1, -1, CONCUR_NO_TIMEOUT);
	int64_t r = concur_result(f, -1);
	concur_release(f);
	concur_shield_pop();
	return r == 1 ? c : r;
}

static int64_t note_stop(void *arg)
{
	int64_t r = concur_result(arg, -1);
	atomic_store(&stop_seen, r == -ECANCELED);
	return r;
}

static void *stop_in_thread(void *arg)
{
	return (void *)(intptr_t)concur_exec_stop(arg, 0);
}

static void test_exec_stop_spares_shielded_io(void **state)
{
	concur_exec *ex = new_exec(1);
	assert_int_equal(pipe(shield_pipe), 0);
	atomic_store(&stop_seen, false);
	concur_future *gate = concur_promise_new(ex);
	concur_future *s = concur_spawn(ex, shielded_read, NULL);
	concur_future *u = concur_spawn(ex, note_stop, gate);
	assert_true(flag_set(&ex->loops[0]->sleeping)); /* both in their waits */
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, stop_in_thread, ex), 0);
	while (!atomic_load(&stop_seen))
		usleep(100);
	assert_int_equal(write(shield_pipe[1], "k", 1), 1);
	void *stop_r;
	assert_int_equal(pthread_join(th, &stop_r), 0);
	assert_int_equal((intptr_t)stop_r, -ETIMEDOUT);
	assert_int_equal(concur_result(s, 0), 'k');
	assert_int_equal(concur_result(u, 0), -ECANCELED);
	concur_release(s);
	concur_release(u);
	concur_release(gate);
	close(shield_pipe[0]);
	close(shield_pipe[1]);
	concur_exec_free(ex);
}

/*
 * Future I/O started after a stop's pass over its loop (here by a callback of a task the stop
 * cancelled) is cancelled too: the stop's join waited for it for ever. Forced: the callback runs
 * only once the stop's message cancelled the task. Should the stop hang, the test gives the op
 * its byte after 5 s and fails rather than hangs.
 */
static int late_sv[2];
static concur_future *_Atomic late_io;
static char late_buf[4];

static void start_late_io(concur_future *f, void *arg)
{
	atomic_store(&late_io, concur_recv(arg, late_sv[0], late_buf, sizeof(late_buf), 0,
	                                   CONCUR_NO_TIMEOUT));
}

static void test_exec_stop_cancels_later_io(void **state)
{
	concur_exec *ex = new_exec(1);
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, late_sv), 0);
	atomic_store(&late_io, NULL);
	concur_future *gate = concur_promise_new(ex);
	concur_future *u = concur_spawn(ex, note_stop, gate);
	assert_int_equal(concur_on_done(u, start_late_io, ex), 0);
	assert_true(flag_set(&ex->loops[0]->sleeping)); /* u in its wait */
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, stop_in_thread, ex), 0);
	int64_t until = now_ns() + MS(5000);
	while (now_ns() < until && !(late_io && concur_done(late_io)))
		usleep(1000);
	bool hung = !(late_io && concur_done(late_io));
	if (hung) /* unblock it */
		assert_int_equal(write(late_sv[1], "x", 1), 1);
	void *stop_r;
	assert_int_equal(pthread_join(th, &stop_r), 0);
	assert_false(hung);
	assert_int_equal((intptr_t)stop_r, -ETIMEDOUT);
	assert_int_equal(concur_result(u, 0), -ECANCELED);
	assert_int_equal(concur_result(late_io, 0), -ECANCELED);
	concur_release(late_io);
	concur_release(u);
	concur_release(gate);
	close(late_sv[0]);
	close(late_sv[1]);
	concur_exec_free(ex);
}

static void test_exec_stop_drains(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *t = concur_spawn(ex, sleep_in_scope, NULL);
	assert_int_equal(concur_exec_stop(ex, MS(10000)), 0); /* it ends by itself */
	assert_int_equal(concur_result(t, 0), 0);
	concur_release(t);
	concur_exec_free(ex);
}

/*
 * concur_exec_free while another thread is in concur_exec_stop of the same executor: the stop,
 * its drain timed out, goes on with ex (a shutdown, its loops, a second join), which the free
 * had freed (a use after free under ASan). Forced: a wrap of concur_exec_shutdown holds the
 * stopper at its cancelling shutdown until the free has returned, or for 300 ms, which a free
 * that waits for the stop (as it must) spends waiting.
 */
static _Thread_local bool is_stopper;
static atomic_int stopper_held, stopped_ex_freed;

void __real_concur_exec_shutdown(concur_exec *ex, bool cancel_pending);
void __wrap_concur_exec_shutdown(concur_exec *ex, bool cancel_pending)
{
	if (is_stopper && cancel_pending) {
		atomic_store(&stopper_held, 1);
		for (int i = 0; i < 300 && !atomic_load(&stopped_ex_freed); i++)
			usleep(1000);
	}
	__real_concur_exec_shutdown(ex, cancel_pending);
}

static concur_exec *stopped_ex;
static void *stopper_main(void *arg)
{
	is_stopper = true;
	*(int *)arg = concur_exec_stop(stopped_ex, MS(10)); /* the gate is shut: it times out */
	return NULL;
}

static int64_t wait_gate(void *arg)
{
	return concur_result(arg, -1);
}

static void test_free_while_another_thread_stops(void **state)
{
	stopped_ex = new_exec(1);
	concur_future *gate = concur_promise_new(NULL);
	concur_future *t = concur_spawn(stopped_ex, wait_gate, gate);
	int sr = 0;
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, stopper_main, &sr), 0);
	while (!atomic_load(&stopper_held))
		usleep(1000);
	assert_int_equal(concur_promise_set(gate, 1), 0); /* the work ends */
	concur_exec_free(stopped_ex);                     /* waits for the stop to be over */
	atomic_store(&stopped_ex_freed, 1);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(sr, -ETIMEDOUT);
	assert_int_equal(concur_result(t, 0), 1);
	concur_release(t);
	concur_release(gate);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_cancel_await_from_thread),
	    cmocka_unit_test(test_cancel_await_from_task),
	    cmocka_unit_test(test_cancel_after_completion),
	    cmocka_unit_test(test_cancel_recv),
	    cmocka_unit_test(test_cancel_sleep),
	    cmocka_unit_test(test_cancel_sync_waits),
	    cmocka_unit_test(test_cancel_stream_and_wait),
	    cmocka_unit_test(test_group_cancels_running),
	    cmocka_unit_test(test_shield),
	    cmocka_unit_test(test_shield_depth_bounded),
	    cmocka_unit_test(test_deadline_scopes),
	    cmocka_unit_test(test_deadline_during_cpu_work),
	    cmocka_unit_test(test_deadline_passed_within_a_tick),
	    cmocka_unit_test(test_deadline_costs_no_cqe),
	    cmocka_unit_test(test_timed_waits),
	    cmocka_unit_test(test_exec_stop),
	    cmocka_unit_test(test_exec_stop_mixed),
	    cmocka_unit_test(test_exec_stop_cancels_io),
	    cmocka_unit_test(test_exec_stop_spares_shielded_io),
	    cmocka_unit_test(test_exec_stop_cancels_later_io),
	    cmocka_unit_test(test_exec_stop_drains),
	    cmocka_unit_test(test_free_while_another_thread_stops),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, NULL, NULL));
}

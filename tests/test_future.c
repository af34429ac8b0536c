/* SPDX-License-Identifier: MIT */
/* Futures: states, results, cancel, callbacks, waking every kind of waiter, promises. */
#include "helpers.h"
#include "hold_loop.h"
#include "internal.h" /* the waiters word: test_parked_flag */

#include <errno.h>
#include <pthread.h>
#include <sys/wait.h>
#include <stdatomic.h>

static int64_t return_arg(void *arg)
{
	return (int64_t)(intptr_t)arg;
}

static atomic_int ran;
static int64_t mark_ran(void *arg)
{
	atomic_fetch_add(&ran, 1);
	return 5;
}

/* 1. spawn never returns NULL */
static void test_spawn_never_null(void **state)
{
	concur_future *f = concur_spawn(NULL, return_arg, NULL);
	assert_non_null(f);
	assert_true(concur_done(f));
	assert_int_equal(concur_result(f, 0), -EINVAL);
	concur_release(f);

	concur_exec *ex = new_exec(1);
	f = concur_spawn(ex, NULL, NULL);
	assert_non_null(f);
	assert_int_equal(concur_result(f, -1), -EINVAL);
	concur_release(f);

	f = concur_spawn(ex, return_arg, (void *)42);
	assert_int_equal(concur_result(f, -1), 42);
	concur_release(f);

	concur_exec_shutdown(ex, false);
	f = concur_spawn(ex, return_arg, (void *)1);
	assert_non_null(f);
	assert_int_equal(concur_result(f, -1), -ESHUTDOWN);
	concur_release(f);
	concur_exec_free(ex);
}

static atomic_int cb_count;
static void count_cb(concur_future *f, void *arg)
{
	atomic_fetch_add(&cb_count, 1);
}

/* 2. cancel */
static void test_cancel_pending(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *s = hold_loop(ex);
	atomic_store(&ran, 0);
	atomic_store(&cb_count, 0);
	concur_future *f = concur_spawn(ex, mark_ran, NULL);
	assert_int_equal(concur_on_done(f, count_cb, NULL), 0);
	assert_false(concur_done(f));
	assert_int_equal(concur_cancel(f), 1);
	assert_true(concur_done(f));
	assert_true(concur_cancelled(f));
	assert_int_equal(concur_result(f, 0), -ECANCELED);
	assert_int_equal(atomic_load(&cb_count), 1);
	assert_int_equal(concur_cancel(f), 1); /* again: still 1, no callback again */
	assert_int_equal(atomic_load(&cb_count), 1);

	/* the spinner is RUNNING: cancellation is requested, it runs on (it never waits) */
	assert_true(concur_running(s));
	assert_int_equal(concur_cancel(s), -EINPROGRESS);
	release_loop(s);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&ran), 0); /* the cancelled task never ran */
	assert_int_equal(atomic_load(&cb_count), 1);

	/* FINISHED: too late, nothing changes */
	concur_future *g = concur_spawn(ex, return_arg, (void *)3);
	assert_int_equal(concur_result(g, -1), 3);
	assert_int_equal(concur_cancel(g), 0);
	assert_false(concur_cancelled(g));
	assert_int_equal(concur_result(g, 0), 3);
	concur_release(g);
	concur_release(f);
	concur_exec_free(ex);
}

/*
 * The callbacks a cancel of a queued task runs in the cancelling thread are the executor's work:
 * join waits for them, and a join or free in them gets -EDEADLK (not a wait for itself). Order
 * forced: the callback runs in a thread of ours, blocked on a gate; the loop meanwhile drops the
 * cancelled task. Join used to return 0 there, and a free to free the executor under the
 * callback, which then spawned into it (ASan: heap-use-after-free).
 */
struct cancel_cb {
	concur_exec *ex;
	concur_future *f;
	atomic_int in, gate;
	int joined, spawned;
	int cancelled;
};

static void cancel_cb_slow(concur_future *f, void *arg)
{
	struct cancel_cb *c = arg;
	c->joined = concur_exec_join(c->ex, 0);
	atomic_store(&c->in, 1);
	while (!atomic_load(&c->gate))
		usleep(100);
	concur_future *g = concur_spawn(c->ex, mark_ran, NULL); /* work that unfolds */
	c->spawned = concur_result(g, 0) == -ESHUTDOWN ? -ESHUTDOWN : 0;
	concur_release(g);
}

static void *cancel_cb_thread(void *arg)
{
	struct cancel_cb *c = arg;
	c->cancelled = concur_cancel(c->f);
	return NULL;
}

static int64_t after_mark_ran(void *arg, const int64_t *values, size_t n)
{
	return mark_ran(arg);
}

static void cancel_callbacks_are_work(bool after)
{
	struct cancel_cb c = {.ex = new_exec(1)};
	concur_future *s = hold_loop(c.ex);
	concur_future *p = concur_promise_new(NULL);
	atomic_store(&ran, 0);
	if (after) { /* queued since its input came: work of ex, as a spawned task is */
		c.f = concur_spawn_after(c.ex, after_mark_ran, NULL, &p, 1);
		assert_int_equal(concur_promise_set(p, 1), 0);
	} else {
		c.f = concur_spawn(c.ex, mark_ran, NULL);
	}
	assert_false(concur_done(c.f));
	assert_int_equal(concur_on_done(c.f, cancel_cb_slow, &c), 0);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, cancel_cb_thread, &c), 0);
	while (!atomic_load(&c.in))
		usleep(100);
	release_loop(s); /* the loop reaches the cancelled task and lets go of it */
	assert_int_equal(concur_exec_join(c.ex, MS(200)), -ETIMEDOUT); /* the callback runs */
	atomic_store(&c.gate, 1);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(c.cancelled, 1);
	assert_int_equal(c.joined, -EDEADLK);
	assert_int_equal(c.spawned, 0);
	assert_int_equal(concur_exec_join(c.ex, -1), 0);
	assert_int_equal(atomic_load(&ran), 1); /* the callback's spawn, not the cancelled task */
	concur_release(c.f);
	concur_release(p);
	concur_exec_free(c.ex);
}

static void test_cancel_callbacks_are_work(void **state)
{
	cancel_callbacks_are_work(false);
	/* A then or spawn_after task queued since its inputs came: its cancel's callbacks were
	 * not counted (nothing told it from one still waiting): join returned 0 under them. */
	cancel_callbacks_are_work(true);
}

/*
 * The callbacks a task with a small stack runs by completing a future (setting a promise,
 * cancelling a queued task, on_done of a done future) run on its loop's stack, not on that task's:
 * a callback is anyone's code. Here each one uses 8 KiB of stack, from a task whose stack is 1 KiB
 * (4 KiB under the sanitizers). It used to run on the task's stack: a SIGSEGV (or, below a page,
 * silent damage to the neighbouring stack). In a child, which a SIGSEGV must not take the test
 * runner down with.
 */
static atomic_int deep_cb_ran;
static void deep_cb(concur_future *f, void *arg)
{
	volatile char buf[8192];
	for (size_t i = 0; i < sizeof(buf); i += 64)
		buf[i] = (char)i;
	/* outside any task still: a wait is refused */
	if (buf[64] == 64 && concur_result((concur_future *)arg, -1) == -EDEADLK)
		atomic_fetch_add(&deep_cb_ran, 1);
}

static int64_t small_completer(void *arg)
{
	concur_future **fs = arg; /* a promise, a queued task, a done future; one never done */
	int64_t r = concur_promise_set(fs[0], 5);
	if (r == 0 && concur_cancel(fs[1]) != 1)
		r = -1;
	if (r == 0)
		r = concur_on_done(fs[2], deep_cb, fs[3]);
	return r;
}

static void test_small_stack_callbacks_on_loop(void **state)
{
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		concur_exec *ex = new_exec(1);
		concur_future *fs[4] = {concur_promise_new(ex), NULL,
		                        concur_spawn(ex, return_arg, (void *)1),
		                        concur_promise_new(ex)};
		concur_future *s = hold_loop(ex);
		struct concur_spawn_opts o = {.stack_size = SANITIZED ? 4096 : 1024};
		concur_future *t = concur_spawn_ex(ex, small_completer, fs, &o);
		fs[1] = concur_spawn(ex, return_arg, (void *)2); /* queued behind t */
		if (concur_on_done(fs[0], deep_cb, fs[3]) || concur_on_done(fs[1], deep_cb, fs[3]))
			_exit(2);
		release_loop(s);
		int64_t r = concur_result(t, -1);
		if (r != 0 || atomic_load(&deep_cb_ran) != 3)
			_exit(3);
		concur_release(t);
		for (int i = 0; i < 4; i++)
			concur_release(fs[i]);
		concur_exec_free(ex);
		_exit(0);
	}
	int st;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	if (WIFSIGNALED(st))
		fail_msg("the child died of signal %d", WTERMSIG(st));
	assert_true(WIFEXITED(st));
	assert_int_equal(WEXITSTATUS(st), 0);
}

/*
 * A cancel counts its callbacks as the executor's work only for work the executor counts: a
 * spawn_after task still waiting for its input is none (its executor may be freed meanwhile);
 * cancelling it then touched the freed executor (ASan: heap-use-after-free).
 */
static int64_t after_sum(void *arg, const int64_t *values, size_t n)
{
	return n ? values[0] : 0;
}

static void test_cancel_waiting_after_task_of_freed_exec(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *p = concur_promise_new(NULL);
	concur_future *t = concur_spawn_after(ex, after_sum, NULL, &p, 1);
	concur_exec_free(ex); /* t waits for p: no work of ex's */
	assert_int_equal(concur_cancel(t), 1);
	assert_int_equal(concur_result(t, 0), -ECANCELED);
	assert_int_equal(concur_promise_set(p, 1), 0);
	concur_release(t);
	concur_release(p);
}

/*
 * A blocking job of A that cancels a queued task of B runs that task's callbacks: a join there
 * of A (the job's own executor) or of B (whose work the callbacks are) gets -EDEADLK. The
 * cancel used to take A's place as the job's executor for the callbacks' time: the join of A
 * waited for the job itself (timed out).
 */
static concur_exec *job_a, *job_b;
static int64_t job_joined_a, job_joined_b;

static void join_both_cb(concur_future *f, void *arg)
{
	job_joined_a = concur_exec_join(job_a, MS(500));
	job_joined_b = concur_exec_join(job_b, MS(500));
}

static int64_t cancel_job(void *arg)
{
	return concur_cancel(arg);
}

static void test_cancel_in_blocking_job(void **state)
{
	job_a = new_exec(1);
	job_b = new_exec(1);
	concur_future *s = hold_loop(job_b);
	concur_future *q = concur_spawn(job_b, return_arg, NULL); /* queued behind the spinner */
	assert_int_equal(concur_on_done(q, join_both_cb, NULL), 0);
	concur_future *j = concur_spawn_blocking(job_a, cancel_job, q);
	assert_int_equal(concur_result(j, -1), 1);
	assert_int_equal(job_joined_a, -EDEADLK);
	assert_int_equal(job_joined_b, -EDEADLK);
	release_loop(s);
	concur_release(q);
	concur_release(j);
	concur_exec_free(job_a);
	concur_exec_free(job_b);
}

static int64_t fail_with(void *arg)
{
	return -(int64_t)(intptr_t)arg;
}

struct blocked_arg {
	concur_future *f;
	int64_t timeout;
	int64_t got;
};

static void *blocked_thread(void *p)
{
	struct blocked_arg *a = p;
	a->got = concur_result(a->f, a->timeout);
	return NULL;
}

/* 3. result: poll, wait, errors, and a blocked thread woken by a cancel */
static void test_result(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *s = hold_loop(ex);
	concur_future *f = concur_spawn(ex, return_arg, (void *)9);
	assert_int_equal(concur_result(f, 0), -ETIMEDOUT);
	assert_false(concur_done(f));
	assert_false(concur_running(f));
	assert_int_equal(concur_result(f, MS(5)), -ETIMEDOUT);
	assert_false(concur_done(f));

	/* another thread blocks on a pending task; we cancel it */
	concur_future *g = concur_spawn(ex, return_arg, (void *)10);
	struct blocked_arg a = {.f = g, .timeout = -1};
	pthread_t th;
	pthread_create(&th, NULL, blocked_thread, &a);
	concur_sleep(MS(20)); /* give it time to park (correct either way) */
	assert_int_equal(concur_cancel(g), 1);
	pthread_join(th, NULL);
	assert_int_equal(a.got, -ECANCELED);

	release_loop(s);
	assert_int_equal(concur_result(f, -1), 9);
	concur_future *e = concur_spawn(ex, fail_with, (void *)EIO);
	assert_int_equal(concur_result(e, -1), -EIO);
	assert_true(concur_done(e));
	assert_false(concur_cancelled(e));
	concur_release(e);
	concur_release(f);
	concur_release(g);
	concur_exec_free(ex);
}

/* 4. callbacks: order, thread, immediate on done futures, and what a callback may do */
#define NCB 5
static int order[NCB];
static atomic_int order_len;
static atomic_int cb_on_loop, cb_in_task;
static void order_cb(concur_future *f, void *arg)
{
	order[atomic_fetch_add(&order_len, 1)] = (int)(intptr_t)arg;
	if (concur_current_exec())
		atomic_fetch_add(&cb_on_loop, 1);
	if (concur_in_task())
		atomic_fetch_add(&cb_in_task, 1);
}

static concur_future *spawned_by_cb;
static void release_and_spawn_cb(concur_future *f, void *arg)
{
	concur_exec *ex = arg;
	concur_release(f); /* f stays valid during the callback */
	spawned_by_cb = concur_spawn(ex, return_arg, (void *)77);
	assert_int_equal(concur_on_done(f, count_cb, NULL), 0); /* f is done: runs now */
}

static void test_on_done(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *s = hold_loop(ex);
	concur_future *f = concur_spawn(ex, return_arg, (void *)1);
	atomic_store(&order_len, 0);
	atomic_store(&cb_on_loop, 0);
	atomic_store(&cb_in_task, 0);
	for (int i = 0; i < NCB; i++)
		assert_int_equal(concur_on_done(f, order_cb, (void *)(intptr_t)i), 0);
	assert_int_equal(atomic_load(&order_len), 0);
	release_loop(s);
	assert_int_equal(concur_result(f, -1), 1);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&order_len), NCB);
	for (int i = 0; i < NCB; i++)
		assert_int_equal(order[i], i);
	assert_int_equal(atomic_load(&cb_on_loop), NCB); /* ran on the completing loop... */
	assert_int_equal(atomic_load(&cb_in_task), 0);   /* ...outside the task's fiber */

	/* on a done future: runs before concur_on_done returns, in this thread */
	atomic_store(&order_len, 0);
	atomic_store(&cb_on_loop, 0);
	assert_int_equal(concur_on_done(f, order_cb, (void *)(intptr_t)7), 0);
	assert_int_equal(atomic_load(&order_len), 1);
	assert_int_equal(order[0], 7);
	assert_int_equal(atomic_load(&cb_on_loop), 0);

	/* a callback may release the future, spawn and add callbacks */
	atomic_store(&cb_count, 0);
	concur_future *g = concur_spawn(ex, return_arg, (void *)2);
	concur_retain(g); /* the callback drops this one */
	assert_int_equal(concur_on_done(g, release_and_spawn_cb, ex), 0);
	assert_int_equal(concur_result(g, -1), 2);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_non_null(spawned_by_cb);
	assert_int_equal(concur_result(spawned_by_cb, -1), 77);
	assert_int_equal(atomic_load(&cb_count), 1);
	concur_release(spawned_by_cb);
	concur_release(g);
	concur_release(f);
	concur_exec_free(ex);
}

/* 5. one completion wakes blocked threads, awaiting fibers on both loops and callbacks */
static concur_future *shared_promise;
static atomic_int fibers_woken;
static int64_t await_shared(void *arg)
{
	int64_t v = concur_result(shared_promise, -1);
	if (v == 1234)
		atomic_fetch_add(&fibers_woken, 1);
	return v;
}

static void test_one_completion_wakes_all(void **state)
{
	enum { N = 4, M = 8, K = 3 };
	concur_exec *ex = new_exec(2);
	shared_promise = concur_promise_new(ex);
	assert_non_null(shared_promise);
	atomic_store(&fibers_woken, 0);
	atomic_store(&cb_count, 0);
	struct blocked_arg a[N];
	pthread_t th[N];
	for (int i = 0; i < N; i++) {
		a[i] = (struct blocked_arg){.f = shared_promise, .timeout = -1};
		pthread_create(&th[i], NULL, blocked_thread, &a[i]);
	}
	concur_future *tasks[M];
	for (int i = 0; i < M; i++)
		tasks[i] = concur_spawn(ex, await_shared, NULL); /* round-robin: both loops */
	for (int i = 0; i < K; i++)
		assert_int_equal(concur_on_done(shared_promise, count_cb, NULL), 0);
	concur_sleep(MS(20));
	assert_int_equal(concur_promise_set(shared_promise, 1234), 0);
	assert_int_equal(concur_promise_set(shared_promise, 1), -EALREADY);
	for (int i = 0; i < N; i++) {
		pthread_join(th[i], NULL);
		assert_int_equal(a[i].got, 1234);
	}
	for (int i = 0; i < M; i++) {
		assert_int_equal(concur_result(tasks[i], -1), 1234);
		concur_release(tasks[i]);
	}
	assert_int_equal(atomic_load(&fibers_woken), M);
	assert_int_equal(atomic_load(&cb_count), K);
	struct concur_stats st;
	assert_int_equal(concur_exec_stats(ex, &st), 0);
	assert_true(st.fibers_parked >= 1);
	concur_release(shared_promise);
	concur_exec_free(ex);
}

/* 6. futures know their executor, weakly */
static void test_future_exec(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *f = concur_spawn(ex, return_arg, NULL);
	concur_future *p = concur_promise_new(NULL);
	assert_ptr_equal(concur_future_exec(f), ex);
	assert_null(concur_future_exec(p));
	assert_int_equal(concur_result(f, -1), 0);
	concur_exec_free(ex);
	assert_null(concur_future_exec(f));
	assert_true(concur_done(f)); /* the future itself outlives the executor */
	assert_int_equal(concur_result(f, 0), 0);
	concur_release(f);
	concur_release(p);
}

/* 7. releasing a pending future does not cancel it */
static void test_fire_and_forget(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *s = hold_loop(ex);
	atomic_store(&ran, 0);
	for (int i = 0; i < 10; i++)
		concur_release(concur_spawn(ex, mark_ran, NULL));
	release_loop(s);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&ran), 10);
	concur_exec_free(ex);
}

static void test_promise(void **state)
{
	concur_future *p = concur_promise_new(NULL);
	assert_false(concur_done(p));
	assert_int_equal(concur_result(p, 0), -ETIMEDOUT);
	assert_int_equal(concur_promise_set(p, -ECANCELED), 0);
	assert_true(concur_cancelled(p));
	assert_int_equal(concur_result(p, -1), -ECANCELED);
	concur_release(p);

	p = concur_promise_new(NULL);
	assert_int_equal(concur_cancel(p), 1);
	assert_int_equal(concur_promise_set(p, 3), -EALREADY);
	concur_release(p);

	p = concur_promise_new(NULL);
	assert_int_equal(concur_promise_set(p, -EPIPE), 0);
	assert_false(concur_cancelled(p));
	assert_int_equal(concur_result(p, -1), -EPIPE);
	concur_release(p);

	/* a promise dropped with callbacks pending frees them (LeakSanitizer checks) */
	p = concur_promise_new(NULL);
	atomic_store(&cb_count, 0);
	assert_int_equal(concur_on_done(p, count_cb, NULL), 0);
	concur_release(p);
	assert_int_equal(atomic_load(&cb_count), 0);
}

/* Bad input: NULL and foreign objects get -EINVAL, never a crash. */
static void test_bad_input(void **state)
{
	struct {
		uint64_t junk[16];
	} foreign;
	memset(&foreign, 0xab, sizeof(foreign));
	concur_future *bogus = (concur_future *)&foreign;

	assert_int_equal(concur_result(NULL, 0), -EINVAL);
	assert_int_equal(concur_result(bogus, -1), -EINVAL);
	assert_false(concur_done(NULL));
	assert_false(concur_done(bogus));
	assert_false(concur_cancelled(NULL));
	assert_false(concur_running(bogus));
	assert_int_equal(concur_cancel(NULL), -EINVAL);
	assert_int_equal(concur_cancel(bogus), -EINVAL);
	assert_int_equal(concur_on_done(NULL, count_cb, NULL), -EINVAL);
	assert_int_equal(concur_on_done(bogus, count_cb, NULL), -EINVAL);
	concur_future *p = concur_promise_new(NULL);
	assert_int_equal(concur_on_done(p, NULL, NULL), -EINVAL);
	assert_null(concur_retain(NULL));
	assert_null(concur_retain(bogus));
	concur_release(NULL);
	concur_release(bogus);
	assert_null(concur_future_exec(NULL));
	assert_null(concur_future_exec(bogus));
	assert_int_equal(concur_promise_set(NULL, 1), -EINVAL);
	assert_int_equal(concur_promise_set(bogus, 1), -EINVAL);
	assert_null(concur_promise_new((concur_exec *)&foreign));

	concur_exec *ex = new_exec(1);
	concur_future *t = concur_spawn(ex, return_arg, NULL);
	assert_int_equal(concur_promise_set(t, 1), -EINVAL); /* not a promise */
	assert_int_equal(concur_result(t, -1), 0);
	concur_release(t);
	concur_exec_free(ex);
	concur_release(p);

	assert_string_equal(concur_strerror(-ETIMEDOUT), "Connection timed out");
	assert_string_equal(concur_strerror(0), "Success");
	assert_non_null(concur_strerror(-99999));
	assert_non_null(concur_strerror(INT64_MIN));
}

/* Defect 4: a callback that drops the last reference still has f for its whole run, both when
 * the completion runs it and when concur_on_done() runs it at once on a done future. */
static atomic_llong cb_seen;
static void release_then_read_cb(concur_future *f, void *arg)
{
	concur_release(f); /* the caller's only reference */
	atomic_store(&cb_seen, concur_result(f, 0));
}

static void test_callback_releases_last_reference(void **state)
{
	concur_future *p = concur_promise_new(NULL);
	atomic_store(&cb_seen, 0);
	assert_int_equal(concur_on_done(p, release_then_read_cb, NULL), 0);
	concur_retain(p); /* ours for the set: the callback's release leaves us this one */
	assert_int_equal(concur_promise_set(p, 8), 0);
	assert_int_equal(atomic_load(&cb_seen), 8);
	concur_release(p);

	/* the same reference pattern, but the set's caller holds none beyond the callback's */
	p = concur_promise_new(NULL);
	atomic_store(&cb_seen, 0);
	assert_int_equal(concur_on_done(p, release_then_read_cb, NULL), 0);
	assert_int_equal(concur_promise_set(p, 9), 0); /* the callback drops the last reference */
	assert_int_equal(atomic_load(&cb_seen), 9);

	/* on a done future: the callback runs at once and drops the caller's last reference */
	p = concur_promise_new(NULL);
	assert_int_equal(concur_promise_set(p, 10), 0);
	atomic_store(&cb_seen, 0);
	assert_int_equal(concur_on_done(p, release_then_read_cb, NULL), 0);
	assert_int_equal(atomic_load(&cb_seen), 10);
}

/* Defect 9: timeouts near INT64_MAX saturate: a thread waits asleep (no CPU, no overflow),
 * a task's timed await works, concur_exec_join takes it. */
struct late_set {
	concur_future *p;
	int64_t after_ns;
};
static void *set_later(void *arg)
{
	struct late_set *ls = arg;
	concur_sleep(ls->after_ns);
	concur_promise_set(ls->p, 42);
	return NULL;
}

static int64_t thread_cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t await_huge_timeout(void *arg)
{
	return concur_result(arg, INT64_MAX);
}

static int64_t sleep_briefly(void *arg)
{
	return concur_sleep(MS(30));
}

static void test_huge_timeouts(void **state)
{
	int64_t timeouts[] = {INT64_MAX, INT64_MAX - 1, INT64_MAX / 2 + 1};
	for (size_t i = 0; i < sizeof(timeouts) / sizeof(timeouts[0]); i++) {
		struct late_set ls = {concur_promise_new(NULL), MS(100)};
		pthread_t th;
		pthread_create(&th, NULL, set_later, &ls);
		int64_t cpu0 = thread_cpu_ns();
		assert_int_equal(concur_result(ls.p, timeouts[i]), 42);
		/* parked, not spinning: a busy wait would burn the whole 100 ms */
		assert_true(thread_cpu_ns() - cpu0 < MS(50));
		pthread_join(th, NULL);
		concur_release(ls.p);
	}

	concur_exec *ex = new_exec(1);
	struct late_set ls = {concur_promise_new(ex), MS(20)};
	concur_future *t = concur_spawn(ex, await_huge_timeout, ls.p);
	pthread_t th;
	pthread_create(&th, NULL, set_later, &ls);
	assert_int_equal(concur_result(t, -1), 42);
	pthread_join(th, NULL);
	concur_release(t);
	concur_release(ls.p);

	concur_future *s = concur_spawn(ex, sleep_briefly, NULL);
	int64_t cpu0 = thread_cpu_ns();
	assert_int_equal(concur_exec_join(ex, INT64_MAX), 0);
	assert_true(concur_done(s));
	assert_true(thread_cpu_ns() - cpu0 < MS(20));
	concur_release(s);
	concur_exec_free(ex);
}

/*
 * A thread outside the executor that parks says so in the waiters word, not the state word
 * (whose completion is then a plain store): the flag stays after a timed-out wait, survives a
 * fiber's node pushed after it, and the completion wakes both the parked thread and that one
 * awaiting fiber (its own fast path: one node, nothing else on the list).
 */
static int64_t await_arg(void *arg)
{
	return concur_result(arg, -1);
}

static void test_parked_flag(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *p = concur_promise_new(ex);
	assert_int_equal(concur_result(p, MS(1)), -ETIMEDOUT); /* spins, parks, times out */
	assert_int_equal(atomic_load(&p->waiters), CONCUR__WAITERS_PARKED);
	assert_int_equal(atomic_load(&p->state), CONCUR__PENDING);

	concur_future *t = concur_spawn(ex, await_arg, p);
	struct blocked_arg a = {.f = p, .timeout = -1};
	pthread_t th;
	pthread_create(&th, NULL, blocked_thread, &a);
	concur_sleep(MS(20)); /* both get to their wait (correct either way) */
	assert_int_equal(concur_promise_set(p, 77), 0);
	pthread_join(th, NULL);
	assert_int_equal(a.got, 77);
	assert_int_equal(concur_result(t, -1), 77);
	assert_int_equal(atomic_load(&p->waiters), CONCUR__WAITERS_CLOSED);
	assert_int_equal(atomic_load(&p->state), CONCUR__FINISHED);
	concur_release(t);
	concur_release(p);
	concur_exec_free(ex);
}

/*
 * A completion whose only waiter is one composition (a then) runs it without holding the
 * future; with a parked thread too, the general path runs it. Both give the then its input.
 */
static int64_t plus_one(void *arg, int64_t v)
{
	return v + 1;
}

static void then_on_promise(concur_exec *ex, bool park_first)
{
	concur_future *p = concur_promise_new(ex);
	if (park_first) /* a timed-out blocking wait leaves the parked flag set */
		assert_int_equal(concur_result(p, MS(1)), -ETIMEDOUT);
	concur_future *c = concur_then(p, plus_one, NULL);
	assert_int_equal(atomic_load(&p->waiters) & CONCUR__WAITERS_PARKED,
	                 park_first ? CONCUR__WAITERS_PARKED : 0);
	assert_int_equal(concur_promise_set(p, 41), 0);
	assert_int_equal(atomic_load(&p->waiters), CONCUR__WAITERS_CLOSED);
	concur_release(p);
	assert_int_equal(concur_result(c, -1), 42);
	concur_release(c);
}

static void test_one_composition(void **state)
{
	concur_exec *ex = new_exec(1);
	then_on_promise(ex, false);
	then_on_promise(ex, true);
	concur_exec_free(ex);
}

/*
 * Who frees a held future (a task's, an op's: see future.c), on a class of the test's own whose
 * destroy counts: every order of the executor letting go and the users releasing, forced by
 * calling the executor's side by hand, frees it exactly once, and never while someone may still
 * use it (ASan would see the use after free).
 */
static int held_destroyed;
static void held_destroy(concur_future *f)
{
	held_destroyed++;
	free(f);
}
static const struct concur__future_class held_class = {
    .name = "held", .destroy = held_destroy, .held = true};

static concur_future *held_new(void)
{
	concur_future *f = malloc(sizeof(*f));
	assert_non_null(f);
	concur__future_init(f, &held_class, NULL, 1);
	atomic_store(&f->state, CONCUR__RUNNING); /* started, as the executor's claim leaves it */
	held_destroyed = 0;
	return f;
}

static void test_held_release_after_completion(void **state)
{
	concur_future *f = held_new();
	concur__complete_unhold(f, 7, CONCUR__FINISHED);
	assert_int_equal(held_destroyed, 0); /* ours still */
	assert_int_equal(atomic_load(&f->waiters), CONCUR__WAITERS_CLOSED);
	assert_int_equal(atomic_load(&f->refs), 1); /* the close wrote no count */
	assert_int_equal(concur_result(f, 0), 7);
	concur_release(f);
	assert_int_equal(held_destroyed, 1);
}

static void test_held_release_before_completion(void **state)
{
	concur_future *f = held_new();
	concur_future *extra = concur_retain(f);
	concur_release(extra); /* not the last */
	concur_release(f);     /* the last: marked, left to the executor */
	assert_int_equal(held_destroyed, 0);
	assert_int_equal(atomic_load(&f->waiters), CONCUR__WAITERS_ORPHAN);
	concur__complete_unhold(f, 7, CONCUR__FINISHED);
	assert_int_equal(held_destroyed, 1);
}

/* Cancelled while queued: the cancel completes it, the executor lets go when it dequeues it. */
static void test_held_cancelled_queued(void **state)
{
	for (int release_first = 0; release_first < 2; release_first++) {
		concur_future *f = held_new();
		atomic_store(&f->state, CONCUR__PENDING);
		assert_int_equal(concur_cancel(f), 1);
		assert_true(concur_cancelled(f));
		assert_int_equal(atomic_load(&f->waiters),
		                 CONCUR__WAITERS_CLOSED | CONCUR__WAITERS_HELD);
		if (release_first) {
			concur_release(f);
			assert_int_equal(held_destroyed, 0);
			concur__unhold(f);
		} else {
			concur__unhold(f);
			assert_int_equal(held_destroyed, 0);
			concur_release(f);
		}
		assert_int_equal(held_destroyed, 1);
	}
}

/* The executor ends one it has not started (shutdown): never RUNNING, completed and let go at
 * once. */
static void test_held_claim_unrun(void **state)
{
	concur_future *f = held_new();
	atomic_store(&f->state, CONCUR__PENDING);
	assert_true(concur__future_claim_unrun(f));
	assert_false(concur__future_claim_unrun(f)); /* once */
	assert_false(concur_running(f));
	assert_false(concur_done(f));
	concur__complete_unhold(f, -ECANCELED, CONCUR__CANCELLED);
	assert_int_equal(held_destroyed, 0);
	assert_true(concur_cancelled(f));
	concur_release(f);
	assert_int_equal(held_destroyed, 1);
}

/* A composition's node whose done hook releases the last user reference: f stays whole until the
 * executor lets go, after the hook. */
struct release_node {
	struct concur__waiter w;
	concur_future *release; /* the reference the hook drops */
	int done;
};
static void release_node_done(struct concur__waiter *w, concur_future *f)
{
	struct release_node *n = (struct release_node *)w;
	n->done++;
	concur_release(n->release);
	assert_int_equal(held_destroyed, 0); /* the executor still holds it */
	assert_true(concur__is_done(f));
}
static const struct concur__waiter_ops release_node_ops = {.done = release_node_done};

static void test_held_hook_releases_last(void **state)
{
	concur_future *f = held_new();
	struct release_node n = {.w = {.kind = CONCUR__WAIT_CALL, .ops = &release_node_ops},
	                         .release = f};
	assert_true(concur__waiter_push(f, &n.w));
	concur__complete_unhold(f, 3, CONCUR__FINISHED);
	assert_int_equal(n.done, 1);
	assert_int_equal(held_destroyed, 1);
}

/* Every user released it before it completed, and a callback keeps it (f is the callback's for
 * the call: it may take a reference): the callback's reference is the one that frees it. */
static concur_future *kept;
static void keep_future(concur_future *f, void *arg)
{
	kept = concur_retain(f);
}
static void release_future(concur_future *f, void *arg)
{
	concur_release(f); /* the user's reference, handed to the callback */
}

static void test_held_callback_takes_reference(void **state)
{
	for (int user_first = 0; user_first < 2; user_first++) {
		concur_future *f = held_new();
		kept = NULL;
		assert_int_equal(concur_on_done(f, keep_future, NULL), 0);
		if (user_first)
			concur_release(f); /* gone before the completion: marked ORPHAN */
		concur__complete_unhold(f, 4, CONCUR__FINISHED);
		assert_ptr_equal(kept, f);
		assert_int_equal(held_destroyed, 0);
		assert_int_equal(concur_result(kept, 0), 4);
		if (!user_first)
			concur_release(f);
		assert_int_equal(held_destroyed, 0);
		concur_release(kept);
		assert_int_equal(held_destroyed, 1);
	}
	/* and a callback that drops the last user reference frees it once, after the callbacks */
	concur_future *f = held_new();
	assert_int_equal(concur_on_done(f, release_future, NULL), 0);
	concur__complete_unhold(f, 4, CONCUR__FINISHED);
	assert_int_equal(held_destroyed, 1);
}

/* A reference the executor takes while it holds f (a cancel's), around a user's last release:
 * whichever release is the last marks it, neither frees it, the executor's letting go does. */
static void test_held_executor_reference(void **state)
{
	for (int k = 0; k < 2; k++) {
		concur_future *f = held_new();
		if (k == 0) {
			concur_retain(f);  /* the executor's */
			concur_release(f); /* the user's: not the last */
			concur_release(f); /* the executor's: the last user's count */
		} else {
			concur_release(f); /* the user's: marked */
			concur_retain(f);  /* the executor's, from a stale 1 */
			concur_release(f);
		}
		assert_int_equal(held_destroyed, 0);
		assert_true(atomic_load(&f->waiters) & CONCUR__WAITERS_ORPHAN);
		concur__complete_unhold(f, 0, CONCUR__FINISHED);
		assert_int_equal(held_destroyed, 1);
	}
}

/*
 * The executor lets go of a task while its last user releases it, on two threads, with a then()
 * and a callback on its list (the slow completion, where the hold becomes a counted reference
 * for the callback). The windows are a few instructions inside the completion, with no point to
 * force an order from: this one is exercised many times with the release spread across the
 * task's end. Each then must run (no node lost), each callback once, and the sanitizer builds
 * check the frees (a release freeing it under the completion, or a leak).
 */
static atomic_int race_started;
static atomic_long race_callbacks;
static int64_t race_task(void *arg)
{
	atomic_store(&race_started, 1);
	spin_ns((int64_t)(intptr_t)arg);
	return 1;
}
static int64_t race_plus_one(void *arg, int64_t v)
{
	return v + 1;
}
static void race_callback(concur_future *f, void *arg)
{
	assert_int_equal(concur_result(f, 0), 1); /* f is whole, whoever released it */
	atomic_fetch_add(&race_callbacks, 1);
}

static void test_held_release_races_completion(void **state)
{
	enum { ROUNDS = 3000 };
	concur_exec *ex = new_exec(1);
	atomic_store(&race_callbacks, 0);
	for (int i = 0; i < ROUNDS; i++) {
		atomic_store(&race_started, 0);
		int64_t work = 200 + (i * 37) % 400; /* ns */
		concur_future *f = concur_spawn(ex, race_task, (void *)(intptr_t)work);
		concur_future *g = concur_then(f, race_plus_one, NULL);
		assert_int_equal(concur_on_done(f, race_callback, NULL), 0);
		while (!atomic_load(&race_started))
			;
		spin_ns(work - 100 + (i * 53) % 200); /* about when the task ends */
		concur_release(f);
		assert_int_equal(concur_result(g, MS(10000)), 2);
		concur_release(g);
	}
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&race_callbacks), ROUNDS);
	concur_exec_free(ex);
}

/*
 * A callback runs outside any task, even when a task completes the future: a task that fails a
 * then (by setting its input) runs the then's callbacks on its own fiber. A callback that waited
 * there used to suspend the task in the middle of the then's start queue, which is the thread's:
 * a then made ready meanwhile waited behind it for good.
 */
struct cb_in_task {
	concur_future *p, *q, *g;
	int in_task;
	int64_t waited;
};
static void cb_waits(concur_future *f, void *arg)
{
	struct cb_in_task *c = arg;
	c->in_task = concur_in_task();
	c->waited = concur_result(c->g, MS(500));
}
static int64_t set_q(void *arg)
{
	struct cb_in_task *c = arg;
	return concur_promise_set(c->q, 1);
}
static int64_t fail_then_input(void *arg)
{
	struct cb_in_task *c = arg;
	concur_exec *ex = concur_current_exec();
	concur_future *f1 = concur_then(c->p, plus_one, NULL);
	if (concur_on_done(f1, cb_waits, c))
		return -1;
	concur_release(concur_spawn(ex, set_q, c));
	concur_promise_set(c->p, -EIO); /* f1 fails here, its callback runs in this task */
	concur_release(f1);
	return 0;
}

static void test_callback_outside_task(void **state)
{
	concur_exec *ex = new_exec(1);
	struct cb_in_task c = {
	    .p = concur_promise_new(ex), .q = concur_promise_new(ex), .in_task = -1};
	c.g = concur_then(c.q, plus_one, NULL);
	concur_future *t = concur_spawn(ex, fail_then_input, &c);
	assert_int_equal(concur_result(t, MS(5000)), 0);
	assert_int_equal(c.in_task, 0);
	assert_int_equal(c.waited, -EDEADLK); /* a loop thread outside a task does not wait */
	assert_int_equal(concur_result(c.g, MS(5000)), 2);
	concur_release(t);
	concur_release(c.g);
	concur_release(c.p);
	concur_release(c.q);
	concur_exec_free(ex);
}

/* A task (or a then's function) asking for its own result: -EDEADLK, not a wait for good. The
 * task learns its future from a promise, set once the spawn returned it. */
static int64_t await_self(void *arg)
{
	concur_future *self = (concur_future *)(intptr_t)concur_result(arg, -1);
	if (concur_result(self, 0) != -EDEADLK) /* not -ETIMEDOUT: a poll would never succeed */
		return -EPROTO;
	return concur_result(self, MS(200)); /* the bound only turns a failure into -ETIMEDOUT */
}

static int64_t then_awaits_self(void *arg, int64_t v)
{
	return concur_result(*(concur_future **)arg, MS(200));
}

static void test_task_awaiting_itself(void **state)
{
	concur_exec *ex = new_exec(1);
	concur_future *p = concur_promise_new(ex);
	concur_future *t = concur_spawn(ex, await_self, p);
	assert_int_equal(concur_promise_set(p, (int64_t)(intptr_t)t), 0);
	assert_int_equal(concur_result(t, MS(5000)), -EDEADLK);

	concur_future *q = concur_promise_new(ex), *self = NULL;
	concur_future *g = concur_then(q, then_awaits_self, &self);
	self = g;
	assert_int_equal(concur_promise_set(q, 1), 0);
	assert_int_equal(concur_result(g, MS(5000)), -EDEADLK);
	concur_release(g);
	concur_release(q);
	concur_release(t);
	concur_release(p);
	concur_exec_free(ex);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    /* first: it forks, and a TSan child of a multi-threaded parent cannot start threads */
	    cmocka_unit_test(test_small_stack_callbacks_on_loop),
	    cmocka_unit_test(test_spawn_never_null),
	    cmocka_unit_test(test_cancel_pending),
	    cmocka_unit_test(test_cancel_callbacks_are_work),
	    cmocka_unit_test(test_cancel_waiting_after_task_of_freed_exec),
	    cmocka_unit_test(test_cancel_in_blocking_job),
	    cmocka_unit_test(test_result),
	    cmocka_unit_test(test_on_done),
	    cmocka_unit_test(test_one_completion_wakes_all),
	    cmocka_unit_test(test_future_exec),
	    cmocka_unit_test(test_fire_and_forget),
	    cmocka_unit_test(test_promise),
	    cmocka_unit_test(test_bad_input),
	    cmocka_unit_test(test_callback_releases_last_reference),
	    cmocka_unit_test(test_huge_timeouts),
	    cmocka_unit_test(test_parked_flag),
	    cmocka_unit_test(test_one_composition),
	    cmocka_unit_test(test_held_release_after_completion),
	    cmocka_unit_test(test_held_release_before_completion),
	    cmocka_unit_test(test_held_cancelled_queued),
	    cmocka_unit_test(test_held_claim_unrun),
	    cmocka_unit_test(test_held_hook_releases_last),
	    cmocka_unit_test(test_held_callback_takes_reference),
	    cmocka_unit_test(test_held_executor_reference),
	    cmocka_unit_test(test_held_release_races_completion),
	    cmocka_unit_test(test_callback_outside_task),
	    cmocka_unit_test(test_task_awaiting_itself),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, NULL, NULL));
}

/* SPDX-License-Identifier: MIT */
/* wait, gather, as_completed, then and spawn_after (task groups: test_group.c). */
#include "internal.h" /* (first: comp_test.h has a global ex) a future's refs */
#include "comp_test.h"

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>

static concur_exec *ex1; /* 1 loop (ex, from comp_test.h, has 2) */

static int setup(void **state)
{
	struct concur_exec_opts o = {.loops = 1};
	return concur_exec_new(&ex1, &o) ? -1 : setup_ex2(state);
}

static int teardown(void **state)
{
	concur_exec_free(ex1);
	return teardown_ex(state);
}

static concur_future *done_with(int64_t res)
{
	concur_future *p = concur_promise_new(NULL);
	concur_promise_set(p, res);
	return p;
}

static concur_future *cancelled(void)
{
	concur_future *p = concur_promise_new(NULL);
	assert_int_equal(concur_cancel(p), 1);
	return p;
}

static void release_all(concur_future **fs, size_t n)
{
	for (size_t i = 0; i < n; i++)
		concur_release(fs[i]);
}

/* ---- wait ----------------------------------------------------------------------------------- */

static void test_wait_empty_and_bad_input(void **state)
{
	assert_int_equal(concur_wait(NULL, 0, CONCUR_ALL_COMPLETED, -1, NULL), 0);
	assert_int_equal(concur_wait(NULL, 0, CONCUR_FIRST_COMPLETED, -1, NULL), 0);
	assert_int_equal(concur_wait(NULL, 3, CONCUR_ALL_COMPLETED, -1, NULL), -EINVAL);
	concur_future *fs[2] = {done_with(1), NULL};
	assert_int_equal(concur_wait(fs, 2, CONCUR_ALL_COMPLETED, -1, NULL), -EINVAL);
	assert_int_equal(concur_wait(fs, 1, 7, -1, NULL), -EINVAL);
	assert_int_equal(
	    concur_wait(fs, (size_t)CONCUR_MAX_FUTURES + 1, CONCUR_ALL_COMPLETED, -1, NULL),
	    -EINVAL);
	int64_t v;
	assert_int_equal(concur_gather(NULL, 2, -1, &v, NULL), -EINVAL);
	concur_as_completed *it;
	assert_int_equal(concur_as_completed_new(&it, NULL, 1, -1), -EINVAL);
	concur_future *f = concur_spawn_after(ex1, NULL, NULL, fs, 1);
	assert_int_equal(concur_result(f, -1), -EINVAL);
	concur_release(f);
	f = concur_spawn_after(ex1, (concur_after_fn)1, NULL, NULL, 1);
	assert_int_equal(concur_result(f, -1), -EINVAL);
	concur_release(f);
	release_all(fs, 1);
}

static void test_wait_all_completed(void **state)
{
	/* some already done (one failed, one cancelled), a duplicate, one set later */
	concur_future *late = concur_promise_new(NULL);
	concur_future *fs[5] = {done_with(1), done_with(-EIO), cancelled(), late, late};
	bool done[5];
	/* timeout: not an error, the split is the answer */
	assert_int_equal(concur_wait(fs, 5, CONCUR_ALL_COMPLETED, MS(20), done), 3);
	assert_true(done[0] && done[1] && done[2]);
	assert_false(done[3] || done[4]);
	concur_promise_set(late, 5);
	assert_int_equal(concur_wait(fs, 5, CONCUR_ALL_COMPLETED, -1, done), 5);
	for (int i = 0; i < 5; i++)
		assert_true(done[i]);
	release_all(fs, 4);
}

static int64_t sleep_then(void *arg)
{
	concur_sleep(MS(30));
	return (int64_t)(intptr_t)arg;
}

static void test_wait_all_completed_tasks(void **state)
{
	concur_future *fs[4];
	for (int i = 0; i < 4; i++)
		fs[i] = concur_spawn(ex, sleep_then, (void *)(intptr_t)i);
	bool done[4];
	assert_int_equal(concur_wait(fs, 4, CONCUR_ALL_COMPLETED, -1, done), 4);
	for (int i = 0; i < 4; i++) {
		assert_true(done[i]);
		assert_int_equal(concur_result(fs[i], 0), i);
	}
	release_all(fs, 4);
}

static void test_wait_first_completed(void **state)
{
	concur_future *a = concur_promise_new(NULL), *b = concur_promise_new(NULL);
	concur_future *fs[3] = {a, b, a};
	bool done[3];
	assert_int_equal(concur_wait(fs, 3, CONCUR_FIRST_COMPLETED, MS(10), done), 0);
	assert_false(done[0] || done[1] || done[2]);
	/* already one done: returns at once even with an infinite timeout */
	concur_promise_set(b, 2);
	assert_int_equal(concur_wait(fs, 3, CONCUR_FIRST_COMPLETED, -1, done), 1);
	assert_true(done[1]);
	assert_false(done[0] || done[2]);
	/* a cancelled one counts as done */
	concur_future *c = cancelled(), *d = concur_promise_new(NULL);
	concur_future *gs[2] = {d, c};
	assert_int_equal(concur_wait(gs, 2, CONCUR_FIRST_COMPLETED, -1, done), 1);
	assert_true(done[1]);
	/* woken by a completion on a loop */
	concur_future *t = concur_spawn(ex1, sleep_then, (void *)7);
	concur_future *hs[2] = {d, t};
	assert_int_equal(concur_wait(hs, 2, CONCUR_FIRST_COMPLETED, -1, done), 1);
	assert_false(done[0]);
	assert_true(done[1]);
	concur_promise_set(d, 0);
	concur_promise_set(a, 0);
	concur_release(t);
	concur_release(a);
	concur_release(b);
	concur_release(c);
	concur_release(d);
}

static int64_t fail_later(void *arg)
{
	concur_sleep(MS(20));
	return -EIO;
}

static void test_wait_first_exception(void **state)
{
	bool done[3];
	/* a cancellation is not a failure: behaves like ALL_COMPLETED */
	concur_future *p = concur_promise_new(NULL);
	concur_future *fs[3] = {cancelled(), p, done_with(3)};
	assert_int_equal(concur_wait(fs, 3, CONCUR_FIRST_EXCEPTION, MS(20), done), 2);
	assert_true(done[0] && done[2]);
	assert_false(done[1]);
	/* a failure that happened earlier counts */
	concur_future *failed = done_with(-EBADF);
	concur_future *gs[2] = {p, failed};
	assert_int_equal(concur_wait(gs, 2, CONCUR_FIRST_EXCEPTION, -1, done), 1);
	assert_true(done[1]);
	/* a failure that happens while waiting wakes it */
	concur_future *t = concur_spawn(ex, fail_later, NULL);
	concur_future *hs[2] = {p, t};
	assert_int_equal(concur_wait(hs, 2, CONCUR_FIRST_EXCEPTION, -1, done), 1);
	assert_false(done[0]);
	assert_true(done[1]);
	/* successes only: waits for all */
	concur_future *ok = concur_spawn(ex, sleep_then, (void *)1);
	concur_future *ks[2] = {ok, fs[2]};
	assert_int_equal(concur_wait(ks, 2, CONCUR_FIRST_EXCEPTION, -1, done), 2);
	concur_promise_set(p, 0);
	release_all(fs, 3);
	concur_release(failed);
	concur_release(t);
	concur_release(ok);
}

/* inside a task, wait suspends the fiber instead of blocking the loop (1 loop) */
static int64_t waiter_task(void *arg)
{
	concur_future *fs[2] = {concur_spawn(ex1, sleep_then, (void *)1),
	                        concur_spawn(ex1, sleep_then, (void *)2)};
	bool done[2];
	int n = concur_wait(fs, 2, CONCUR_ALL_COMPLETED, -1, done);
	int64_t sum = concur_result(fs[0], 0) + concur_result(fs[1], 0);
	release_all(fs, 2);
	return n == 2 ? sum : -1;
}

static void test_wait_in_task(void **state)
{
	concur_future *f = concur_spawn(ex1, waiter_task, NULL);
	assert_int_equal(concur_result(f, -1), 3);
	concur_release(f);
}

/* ---- gather --------------------------------------------------------------------------------- */

struct progress {
	int calls;
	size_t last;
};

static void on_progress(size_t completed, size_t total, int64_t elapsed_ns, void *arg)
{
	struct progress *p = arg;
	assert_true(completed >= p->last && completed <= total);
	assert_true(elapsed_ns >= 0);
	p->last = completed;
	p->calls++;
}

static int64_t value_task(void *arg)
{
	intptr_t i = (intptr_t)arg;
	if (i % 3 == 0)
		concur_yield();
	return i == 5 ? -EIO : i == 7 ? -ENOENT : i;
}

static void test_gather_failing_middle(void **state)
{
	concur_future *fs[10];
	for (int i = 0; i < 10; i++)
		fs[i] = concur_spawn(ex, value_task, (void *)(intptr_t)i);
	int64_t v[10];
	/* first failure in input order, after waiting for all */
	assert_int_equal(concur_gather(fs, 10, -1, v, NULL), -EIO);
	for (int i = 0; i < 10; i++) {
		assert_true(concur_done(fs[i]));
		assert_int_equal(v[i], i == 5 ? -EIO : i == 7 ? -ENOENT : i);
	}
	/* every item's own result */
	struct concur_gather_opts o = {.flags = CONCUR_GATHER_RETURN_ERRORS};
	assert_int_equal(concur_gather(fs, 10, -1, v, &o), 0);
	assert_int_equal(v[5], -EIO);
	assert_int_equal(v[7], -ENOENT);
	assert_int_equal(v[9], 9);
	release_all(fs, 10);
}

static void test_gather_progress(void **state)
{
	enum { N = 5000 };
	concur_future **fs = calloc(N, sizeof(*fs));
	for (int i = 0; i < N; i++)
		fs[i] = concur_spawn(ex, value_task, (void *)(intptr_t)(i == 5 ? 4 : i));
	int64_t *v = calloc(N, sizeof(*v));
	struct progress p = {0};
	struct concur_gather_opts o = {.progress = on_progress, .progress_arg = &p};
	assert_int_equal(concur_gather(fs, N, -1, v, &o), -ENOENT); /* item 7 */
	assert_true(p.calls >= 1 && p.calls <= 102);
	assert_int_equal(p.last, N);
	assert_int_equal(v[N - 1], N - 1);
	release_all(fs, N);
	free(fs);
	free(v);
}

static void test_gather_timeout(void **state)
{
	concur_future *p = concur_promise_new(NULL);
	concur_future *fs[3] = {done_with(1), p, done_with(-EIO)};
	int64_t v[3];
	assert_int_equal(concur_gather(fs, 3, MS(20), v, NULL), -ETIMEDOUT);
	assert_int_equal(v[0], 1);
	assert_int_equal(v[1], -ETIMEDOUT);
	assert_int_equal(v[2], -EIO);
	concur_promise_set(p, 2);
	assert_int_equal(concur_gather(fs, 3, MS(20), v, NULL), -EIO);
	assert_int_equal(v[1], 2);
	assert_int_equal(concur_gather(fs, 2, 0, v, NULL), 0);
	release_all(fs, 3);
}

/* ---- as_completed --------------------------------------------------------------------------- */

static void test_as_completed_order(void **state)
{
	concur_future *a = concur_promise_new(NULL), *b = concur_promise_new(NULL);
	concur_future *c = concur_promise_new(NULL);
	concur_future *d1 = done_with(1), *d2 = cancelled();
	concur_future *fs[7] = {a, d1, b, a, c, d2, d1};
	concur_as_completed *it;
	assert_int_equal(concur_as_completed_new(&it, fs, 7, -1), 0);
	size_t total;
	assert_int_equal(concur_as_completed_unfinished(it, &total), 5);
	assert_int_equal(total, 5);
	concur_future *f;
	/* the already done first, in input order */
	assert_int_equal(concur_as_completed_next(it, &f), 1);
	assert_ptr_equal(f, d1);
	concur_release(f);
	assert_int_equal(concur_as_completed_next(it, &f), 1);
	assert_ptr_equal(f, d2);
	concur_release(f);
	/* then in completion order */
	concur_promise_set(c, 3);
	concur_promise_set(a, 1);
	assert_int_equal(concur_as_completed_next(it, &f), 1);
	assert_ptr_equal(f, c);
	concur_release(f);
	assert_int_equal(concur_as_completed_next(it, &f), 1);
	assert_ptr_equal(f, a);
	concur_release(f);
	concur_promise_set(b, 2);
	assert_int_equal(concur_as_completed_next(it, &f), 1);
	assert_ptr_equal(f, b);
	concur_release(f);
	assert_int_equal(concur_as_completed_next(it, &f), 0);
	assert_int_equal(concur_as_completed_unfinished(it, NULL), 0);
	concur_as_completed_free(it);
	concur_release(a);
	concur_release(b);
	concur_release(c);
	concur_release(d1);
	concur_release(d2);
}

static void test_as_completed_tasks_and_deadline(void **state)
{
	concur_future *fs[4];
	for (int i = 0; i < 3; i++)
		fs[i] = concur_spawn(ex, sleep_then, (void *)(intptr_t)i);
	fs[3] = concur_promise_new(NULL); /* never done in time */
	concur_as_completed *it;
	assert_int_equal(concur_as_completed_new(&it, fs, 4, MS(2000)), 0);
	concur_future *f;
	int seen = 0;
	int r;
	while ((r = concur_as_completed_next(it, &f)) == 1) {
		assert_true(f != fs[3]);
		concur_release(f);
		seen++;
		if (seen == 3)
			break;
	}
	assert_int_equal(seen, 3);
	concur_as_completed_free(it);

	/* a short deadline: the error tells how many of how many are unfinished */
	assert_int_equal(concur_as_completed_new(&it, fs, 4, MS(20)), 0);
	for (int i = 0; i < 3; i++) {
		assert_int_equal(concur_as_completed_next(it, &f), 1);
		concur_release(f);
	}
	assert_int_equal(concur_as_completed_next(it, &f), -ETIMEDOUT);
	size_t total;
	assert_int_equal(concur_as_completed_unfinished(it, &total), 1);
	assert_int_equal(total, 4);
	assert_string_equal(concur_last_error(),
	                    "as_completed: 1 of 4 futures unfinished at the deadline");
	concur_as_completed_free(it);
	concur_promise_set(fs[3], 0); /* lets the freed iterator's callback run and go */
	release_all(fs, 4);
}

/* concur_wait in a task whose deadline scope passes: -ETIMEDOUT, not a count (a count let a
 * caller waiting again spin: every later wait fails at once). */
static int64_t wait_under_scope(void *arg)
{
	concur_future **fs = arg;
	concur_deadline_push(MS(20));
	int first = concur_wait(fs, 2, CONCUR_ALL_COMPLETED, -1, NULL);
	int again = concur_wait(fs, 2, CONCUR_ALL_COMPLETED, -1, NULL);
	int own = concur_wait(fs, 2, CONCUR_ALL_COMPLETED, 0, NULL); /* no waiting: the split */
	concur_deadline_pop();
	return first == -ETIMEDOUT && again == -ETIMEDOUT && own == 1 ? 42 : first;
}

static void test_wait_deadline_scope(void **state)
{
	concur_future *fs[2] = {done_with(7), concur_promise_new(NULL)}; /* the second never */
	concur_future *t = concur_spawn(ex1, wait_under_scope, fs);
	assert_int_equal(concur_result(t, MS(5000)), 42);
	concur_release(t);
	concur_promise_set(fs[1], 0);
	release_all(fs, 2);
}

/* In a task whose deadline scope passes: the next wait fails with -ETIMEDOUT, not a spin. */
static int64_t as_completed_under_scope(void *arg)
{
	concur_future **fs = arg;
	concur_as_completed *it;
	if (concur_as_completed_new(&it, fs, 2, -1))
		return -100;
	concur_deadline_push(MS(20));
	concur_future *f = NULL;
	int first = concur_as_completed_next(it, &f); /* the done one, though the scope passes */
	int second = concur_as_completed_next(it, &f);
	concur_deadline_pop();
	concur_as_completed_free(it);
	if (first != 1 || f != fs[0])
		return -101;
	concur_release(f);
	return second == -ETIMEDOUT ? 42 : second;
}

static void test_as_completed_deadline_scope(void **state)
{
	concur_future *fs[2] = {done_with(7),
	                        concur_promise_new(NULL)}; /* the second never in time */
	concur_future *t = concur_spawn(ex1, as_completed_under_scope, fs);
	int64_t r = concur_result(t, MS(5000));
	bool done = concur_done(t);
	concur_promise_set(fs[1], 0); /* (before the fix: ends the spinning wait) */
	assert_true(done);
	assert_int_equal(r, 42);
	assert_int_equal(concur_result(t, -1), 42);
	concur_release(t);
	release_all(fs, 2);
}

/*
 * Futures that complete while the iterator is being made are "done when made": yielded first,
 * in input order. A, first in input order, completed (observably) before B, last: A must not
 * come after B. It did when A was looked at (not done) before it completed and B after (done),
 * and A's node was hung only in a second pass, which found A done and queued it behind B.
 * Forced: a thread waits until the iterator's setup has taken its reference on the middle input,
 * then completes A, then B.
 */
#define AC_N 200000
static concur_future *ac_a, *ac_b, *ac_mid;
static void *complete_a_then_b(void *arg)
{
	while (atomic_load(&ac_mid->refs) < 2)
		;
	concur_promise_set(ac_a, 1);
	concur_promise_set(ac_b, 2);
	return NULL;
}

static void test_as_completed_done_while_made(void **state)
{
	concur_future **fs = calloc(AC_N + 2, sizeof(*fs));
	assert_non_null(fs);
	for (int i = 1; i <= AC_N; i++)
		fs[i] = concur_promise_new(NULL);
	ac_mid = fs[AC_N / 2];
	fs[0] = ac_a = concur_promise_new(NULL);
	fs[AC_N + 1] = ac_b = concur_promise_new(NULL);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, complete_a_then_b, NULL), 0);
	concur_as_completed *it;
	assert_int_equal(concur_as_completed_new(&it, fs, AC_N + 2, -1), 0);
	assert_int_equal(pthread_join(th, NULL), 0);
	concur_future *f1, *f2;
	assert_int_equal(concur_as_completed_next(it, &f1), 1);
	assert_int_equal(concur_as_completed_next(it, &f2), 1);
	assert_ptr_equal(f1, ac_a);
	assert_ptr_equal(f2, ac_b);
	concur_release(f1);
	concur_release(f2);
	concur_as_completed_free(it);
	for (int i = 1; i <= AC_N; i++)
		concur_promise_set(fs[i], 0); /* lets the freed iterator's nodes go */
	release_all(fs, AC_N + 2);
	free(fs);
}

/* ---- then and spawn_after ------------------------------------------------------------------- */

static int64_t add_one(void *arg, int64_t v)
{
	return v + 1;
}

static int64_t compute(void *arg)
{
	return 20;
}

static void test_then_chain_10000(void **state)
{
	enum { N = 10000 };
	concur_exec *exs[2] = {ex1, ex};
	for (int e = 0; e < 2; e++) {
		concur_future *f = concur_spawn(exs[e], compute, NULL);
		for (int i = 0; i < N; i++) {
			concur_future *g = concur_then(f, add_one, NULL);
			concur_release(f); /* no glue: the chain keeps itself alive */
			f = g;
		}
		assert_int_equal(concur_result(f, -1), 20 + N);
		concur_release(f);
	}
	/* a failure at the head runs nothing and reaches the tail (no recursion) */
	concur_future *head = concur_promise_new(ex);
	concur_future *f = concur_retain(head);
	for (int i = 0; i < N; i++) {
		concur_future *g = concur_then(f, add_one, NULL);
		concur_release(f);
		f = g;
	}
	concur_promise_set(head, -EBADMSG);
	assert_int_equal(concur_result(f, -1), -EBADMSG);
	concur_release(f);
	concur_release(head);
}

static atomic_int dependent_runs;

static int64_t sum_inputs(void *arg, const int64_t *values, size_t n)
{
	atomic_fetch_add(&dependent_runs, 1);
	int64_t s = 0;
	for (size_t i = 0; i < n; i++)
		s += values[i];
	return s;
}

static void test_spawn_after_failed_input(void **state)
{
	atomic_store(&dependent_runs, 0);
	concur_future *a = concur_promise_new(ex), *b = concur_promise_new(ex);
	concur_future *c = concur_promise_new(ex);
	concur_future *in[3] = {a, b, c};
	concur_future *f = concur_spawn_after(ex, sum_inputs, NULL, in, 3);
	/* it waits without a thread: nothing ran yet */
	assert_int_equal(concur_result(f, MS(20)), -ETIMEDOUT);
	concur_promise_set(c, -EIO);   /* fails last in input order... */
	concur_promise_set(b, -EPERM); /* ...this one is first in input order */
	concur_promise_set(a, 1);
	assert_int_equal(concur_result(f, -1), -EPERM);
	assert_int_equal(atomic_load(&dependent_runs), 0);
	concur_release(f);
	/* a cancelled input: -ECANCELED, fn never runs */
	concur_future *x = cancelled();
	concur_future *in2[2] = {a, x};
	f = concur_spawn_after(ex, sum_inputs, NULL, in2, 2);
	assert_int_equal(concur_result(f, -1), -ECANCELED);
	assert_true(concur_cancelled(f)); /* CANCELLED, as a task returning -ECANCELED */
	assert_int_equal(atomic_load(&dependent_runs), 0);
	concur_release(f);
	concur_future *y = concur_promise_new(ex); /* (then runs on its input's executor) */
	assert_int_equal(concur_cancel(y), 1);
	f = concur_then(y, add_one, NULL);
	assert_int_equal(concur_result(f, -1), -ECANCELED);
	assert_true(concur_cancelled(f));
	concur_release(f);
	concur_release(y);
	/* then on a failed future */
	f = concur_then(b, add_one, NULL);
	assert_int_equal(concur_result(f, -1), -EPERM);
	concur_release(f);
	/* no inputs: runs at once; all good: gets the values in order */
	f = concur_spawn_after(ex, sum_inputs, NULL, NULL, 0);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	concur_future *d = done_with(41);
	concur_future *in3[2] = {a, d};
	f = concur_spawn_after(ex, sum_inputs, NULL, in3, 2);
	assert_int_equal(concur_result(f, -1), 42);
	assert_int_equal(atomic_load(&dependent_runs), 2);
	concur_release(f);
	/* cancelling the dependent before its inputs are done: it never runs */
	concur_future *p = concur_promise_new(ex);
	f = concur_spawn_after(ex, sum_inputs, NULL, &p, 1);
	assert_int_equal(concur_cancel(f), 1);
	concur_promise_set(p, 1);
	assert_int_equal(concur_result(f, -1), -ECANCELED);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&dependent_runs), 2);
	concur_release(f);
	concur_release(p);
	concur_release(a);
	concur_release(b);
	concur_release(c);
	concur_release(d);
	concur_release(x);
}

/* The seed's pipeline: A computes, B processes A's future, C stores B's. No glue code. */
static int64_t stage_a(void *arg)
{
	return (intptr_t)arg * 10;
}

static int64_t stage_b(void *arg, int64_t a)
{
	return a + 1;
}

static int64_t stage_c(void *arg, const int64_t *in, size_t n)
{
	int64_t *store = arg;
	*store = in[0];
	return 0;
}

static void test_pipeline(void **state)
{
	concur_exec *exs[2] = {ex1, ex};
	for (int e = 0; e < 2; e++) {
		enum { N = 200 };
		int64_t store[N] = {0};
		concur_future *cs[N];
		for (int i = 0; i < N; i++) {
			concur_future *a = concur_spawn(exs[e], stage_a, (void *)(intptr_t)i);
			concur_future *b = concur_then(a, stage_b, NULL);
			cs[i] = concur_spawn_after(exs[e], stage_c, &store[i], &b, 1);
			concur_release(a);
			concur_release(b);
		}
		assert_int_equal(concur_gather(cs, N, -1, NULL, NULL), 0);
		for (int i = 0; i < N; i++)
			assert_int_equal(store[i], i * 10 + 1);
		release_all(cs, N);
	}
}

static atomic_int tail_ran;

static int64_t count_tail(void *arg, int64_t v)
{
	atomic_fetch_add(&tail_ran, 1);
	return v;
}

static void test_then_fire_and_forget_join(void **state)
{
	/* join waits for dependents spawned by completion callbacks, even with no reference held */
	atomic_store(&tail_ran, 0);
	for (int i = 0; i < 100; i++) {
		concur_future *a = concur_spawn(ex, compute, NULL);
		concur_future *b = concur_then(a, add_one, NULL);
		concur_release(concur_then(b, count_tail, NULL));
		concur_release(a);
		concur_release(b);
	}
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&tail_ran), 100);
}

/* On a loop thread outside any task (a callback), waiting would stop the loop: -EDEADLK. */
static atomic_int in_callback_rc = 1;

static void waits_in_callback(concur_future *f, void *arg)
{
	concur_future *pending = arg;
	atomic_store(&in_callback_rc,
	             concur_wait(&pending, 1, CONCUR_ALL_COMPLETED, MS(5000), NULL));
}

static void test_wait_in_callback_edeadlk(void **state)
{
	concur_future *pending = concur_promise_new(NULL);
	concur_future *t = concur_spawn(ex1, sleep_then, NULL); /* still running when we register */
	assert_int_equal(concur_on_done(t, waits_in_callback, pending), 0);
	assert_int_equal(concur_exec_join(ex1, -1), 0);
	assert_int_equal(atomic_load(&in_callback_rc), -EDEADLK);
	concur_promise_set(pending, 0);
	concur_release(pending);
	concur_release(t);
}

/* ---- reliability: abandoned waits, dead executors, completion order -------------------------- */

/* Live heap bytes, all arenas (glibc). */
static long live_heap(void)
{
	struct mallinfo2 mi = mallinfo2();
	return (long)mi.uordblks;
}

/* Wait on a promise in every way, time out or walk away, then drop the promise unset. */
static void abandon_waits_once(concur_exec *on)
{
	concur_future *p = concur_promise_new(on);
	bool done;
	assert_int_equal(concur_wait(&p, 1, CONCUR_ALL_COMPLETED, 1000, &done), 0);
	assert_int_equal(concur_gather(&p, 1, 1000, NULL, NULL), -ETIMEDOUT);
	concur_as_completed *it;
	assert_int_equal(concur_as_completed_new(&it, &p, 1, 1000), 0);
	concur_future *f;
	assert_int_equal(concur_as_completed_next(it, &f), -ETIMEDOUT);
	concur_as_completed_free(it);
	concur_release(concur_then(p, add_one, NULL));
	concur_future *in[2] = {p, p};
	concur_release(concur_spawn_after(on, sum_inputs, NULL, in, 2));
	concur_release(p);
}

static int64_t abandon_waits_task(void *arg)
{
	for (long i = 0; i < (long)(intptr_t)arg; i++)
		abandon_waits_once(concur_current_exec());
	return 0;
}

/* Defect 3: a timed-out or abandoned wait removes what it added; a then/spawn_after whose input
 * dies unset ends CANCELLED instead of keeping its record forever. */
static void test_abandoned_waits_leave_nothing(void **state)
{
	abandon_waits_once(ex1); /* warm the caches */
	long before = live_heap();
	for (int i = 0; i < BULK(2000); i++)
		abandon_waits_once(ex1);
	concur_future *t = concur_spawn(ex1, abandon_waits_task, (void *)(intptr_t)BULK(2000));
	assert_int_equal(concur_result(t, -1), 0);
	concur_release(t);
	assert_int_equal(concur_exec_join(ex1, -1), 0);
	if (!SANITIZED) /* 70 to 240 bytes a wait before the fix: over 1 MB */
		assert_true(live_heap() - before < 256 * 1024);

	concur_future *p = concur_promise_new(ex1);
	concur_future *c = concur_then(p, add_one, NULL);
	concur_future *in[2] = {p, p};
	concur_future *d = concur_spawn_after(ex1, sum_inputs, NULL, in, 2);
	concur_release(p); /* dies unset: the dependents can never run */
	assert_int_equal(concur_result(c, MS(1000)), -ECANCELED);
	assert_true(concur_cancelled(c));
	assert_int_equal(concur_result(d, MS(1000)), -ECANCELED);
	assert_true(concur_cancelled(d));
	concur_release(c);
	concur_release(d);
}

/* Defect 5: a continuation whose executor is gone fails with -ESHUTDOWN. */
static void test_then_after_executor_freed(void **state)
{
	struct concur_exec_opts o = {.loops = 1};
	concur_exec *gone;
	assert_int_equal(concur_exec_new(&gone, &o), 0);
	concur_future *p = concur_promise_new(gone);
	concur_future *c = concur_then(p, add_one, NULL);
	concur_future *d = concur_spawn_after(gone, sum_inputs, NULL, &p, 1);
	concur_exec_free(gone);
	assert_int_equal(concur_promise_set(p, 1), 0);
	assert_int_equal(concur_result(c, MS(1000)), -ESHUTDOWN);
	assert_int_equal(concur_result(d, MS(1000)), -ESHUTDOWN);
	concur_release(c);
	concur_release(d);
	/* made after the free: -ESHUTDOWN too (it was -EINVAL, as for a future of no executor) */
	concur_future *e = concur_then(p, add_one, NULL);
	assert_int_equal(concur_result(e, MS(1000)), -ESHUTDOWN);
	concur_release(e);
	concur_release(p);
}

/* A callback that holds its future's completion until told to go on. */
static atomic_bool slow_entered, slow_go;
static void slow_cb(concur_future *f, void *arg)
{
	atomic_store(&slow_entered, true);
	while (!atomic_load(&slow_go))
		;
}

static void *complete_a_thread(void *arg)
{
	concur_future **fs = arg; /* {A, how}: how NULL sets A, else cancels it */
	if (fs[1])
		concur_cancel(fs[0]);
	else
		concur_promise_set(fs[0], 1);
	return NULL;
}

/* Defect 6: A's completion is observed (a thread returned from concur_result(A)) before B is
 * set, so as_completed yields A first, even while a slow callback on A still runs. Both for a
 * set and for a cancel of A. */
static void test_as_completed_observed_order(void **state)
{
	for (int cancel = 0; cancel < 2; cancel++) {
		concur_future *a = concur_promise_new(NULL), *b = concur_promise_new(NULL);
		atomic_store(&slow_entered, false);
		atomic_store(&slow_go, false);
		assert_int_equal(concur_on_done(a, slow_cb, NULL), 0); /* before the iterator's */
		concur_future *fs[2] = {b, a};
		concur_as_completed *it;
		assert_int_equal(concur_as_completed_new(&it, fs, 2, -1), 0);
		pthread_t th;
		concur_future *how[2] = {a, cancel ? a : NULL};
		pthread_create(&th, NULL, complete_a_thread, how);
		assert_int_equal(concur_result(a, -1),
		                 cancel ? -ECANCELED : 1); /* we know A is done */
		while (!atomic_load(&slow_entered))
			; /* A's completion is stuck in the slow callback */
		concur_promise_set(b, 2);
		atomic_store(&slow_go, true);
		pthread_join(th, NULL);
		concur_future *f;
		assert_int_equal(concur_as_completed_next(it, &f), 1);
		assert_ptr_equal(f, a);
		concur_release(f);
		assert_int_equal(concur_as_completed_next(it, &f), 1);
		assert_ptr_equal(f, b);
		concur_release(f);
		concur_as_completed_free(it);
		concur_release(a);
		concur_release(b);
	}
}

/*
 * A continuation ended unrun (its input failed, or its executor was shut down) is never RUNNING:
 * a concur_cancel in that window once found it RUNNING with no loop, and crashed asking that
 * loop to stop it. The end is held (a link-time wrap of concur__complete_unhold, from
 * tests/CMakeLists.txt) while another thread cancels: the cancel waits for the end and says it
 * was too late.
 */
static concur_future *_Atomic hold_end_of;
static atomic_bool held_running, canceller_in;
static atomic_int cancel_said;

void __real_concur__complete_unhold(concur_future *f, int64_t res, uint32_t final_state);
void __wrap_concur__complete_unhold(concur_future *f, int64_t res, uint32_t final_state);

static void *cancel_held(void *arg)
{
	atomic_store(&canceller_in, true);
	atomic_store(&cancel_said, concur_cancel(arg));
	return NULL;
}

void __wrap_concur__complete_unhold(concur_future *f, int64_t res, uint32_t final_state)
{
	if (f == atomic_load(&hold_end_of)) {
		atomic_store(&hold_end_of, NULL);
		atomic_store(&held_running, concur_running(f) || concur_done(f));
		pthread_t th;
		assert_int_equal(pthread_create(&th, NULL, cancel_held, f), 0);
		while (!atomic_load(&canceller_in))
			sched_yield();
		usleep(
		    20000); /* the cancel reads the state meanwhile (it has to wait for us now) */
		__real_concur__complete_unhold(f, res, final_state);
		pthread_join(th, NULL);
		return;
	}
	__real_concur__complete_unhold(f, res, final_state);
}

static void test_cancel_while_ending_unrun(void **state)
{
	for (int shut = 0; shut < 2; shut++) {
		struct concur_exec_opts o = {.loops = 1};
		concur_exec *e;
		assert_int_equal(concur_exec_new(&e, &o), 0);
		concur_future *p = concur_promise_new(e);
		concur_future *c = concur_then(p, add_one, NULL);
		atomic_store(&canceller_in, false);
		atomic_store(&cancel_said, -1000);
		atomic_store(&hold_end_of, c);
		if (shut)
			concur_exec_shutdown(e, false);
		assert_int_equal(concur_promise_set(p, shut ? 1 : -EIO), 0); /* ends c unrun */
		assert_null(atomic_load(&hold_end_of));                      /* it was held */
		assert_false(atomic_load(&held_running));       /* neither RUNNING nor done there */
		assert_int_equal(atomic_load(&cancel_said), 0); /* too late: it ended as it was */
		assert_int_equal(concur_result(c, 0), shut ? -ESHUTDOWN : -EIO);
		assert_false(concur_cancelled(c));
		concur_release(c);
		concur_release(p);
		concur_exec_free(e);
	}
}

/*
 * A callback that runs while its thread starts continuations (a then whose input failed ends
 * unrun there, and its callbacks run) may make a then of a done future and wait for it, on a
 * thread outside the executor. The new then waited in the thread's queue of starts, behind the
 * callback, for ever: the wait must start it first. (In a task, a callback's wait is -EDEADLK.)
 */
struct then_in_cb {
	concur_future *input; /* done, 41 */
	int64_t got;
};

static void then_in_callback(concur_future *f, void *arg)
{
	struct then_in_cb *c = arg;
	concur_future *t = concur_then(c->input, add_one, NULL);
	c->got = concur_result(t, MS(2000));
	concur_release(t);
}

static int64_t then_in_callback_of_unrun_end(void *arg)
{
	struct then_in_cb *c = arg;
	concur_future *p = concur_promise_new(ex1);
	concur_future *b = concur_then(p, add_one, NULL);
	int64_t r = concur_on_done(b, then_in_callback, c);
	if (!r)
		r = concur_promise_set(p, -EIO); /* b ends unrun: its callback runs */
	if (!r && concur_result(b, 0) != -EIO)
		r = -EPROTO;
	concur_release(b);
	concur_release(p);
	return r; /* (no assertion here: it may run in a task) */
}

static void test_then_waited_in_callback_of_unrun_end(void **state)
{
	for (int in_task = 0; in_task < 2; in_task++) {
		struct then_in_cb c = {.input = concur_promise_new(ex1), .got = -1000};
		concur_promise_set(c.input, 41);
		if (in_task) {
			concur_future *t = concur_spawn(ex1, then_in_callback_of_unrun_end, &c);
			assert_int_equal(concur_result(t, -1), 0);
			concur_release(t);
		} else {
			assert_int_equal(then_in_callback_of_unrun_end(&c), 0);
		}
		assert_int_equal(c.got, in_task ? -EDEADLK : 42);
		concur_release(c.input);
	}
}

/*
 * A callback's wait starts only what the callback made: the next stage of a failing chain,
 * queued before the callback ran, ends after it returns, not inside its wait (a chain of
 * callbacks that each wait would otherwise nest one wait per stage on the stack). And a join in
 * a callback counts the then the callback made (its start is not left for after the join).
 */
struct chain_cb {
	concur_future *next; /* the stage after the one whose callback this is */
	int next_done_in_wait;
	int64_t joined;
	int made_done_after_join;
};

static void waits_then_looks(concur_future *f, void *arg)
{
	struct chain_cb *c = arg;
	concur_future *never = concur_promise_new(ex1);
	concur_result(never, MS(1)); /* a wait for something else entirely */
	c->next_done_in_wait = concur_done(c->next);
	concur_release(never);
	concur_future *in = concur_promise_new(ex1);
	concur_promise_set(in, 1);
	concur_future *made = concur_then(in, add_one, NULL);
	c->joined = concur_exec_join(ex1, MS(5000));
	c->made_done_after_join = concur_done(made);
	concur_release(made);
	concur_release(in);
}

static void test_callback_wait_starts_only_its_own(void **state)
{
	concur_future *p = concur_promise_new(ex1);
	concur_future *b = concur_then(p, add_one, NULL);
	concur_future *next = concur_then(b, add_one, NULL);
	struct chain_cb c = {.next = next, .next_done_in_wait = -1, .joined = -1000};
	assert_int_equal(concur_on_done(b, waits_then_looks, &c), 0);
	assert_int_equal(concur_promise_set(p, -EIO), 0); /* b, then next, end unrun */
	assert_int_equal(c.next_done_in_wait, 0);
	assert_int_equal(c.joined, 0);
	assert_int_equal(c.made_done_after_join, 1);
	assert_int_equal(concur_result(next, 0), -EIO);
	concur_release(next);
	concur_release(b);
	concur_release(p);
}

/* A node (a waiter of any kind) is on f's list. */
static bool has_waiter(concur_future *f)
{
	return (atomic_load(&f->waiters) & ~(uintptr_t)15) != 0;
}

/*
 * gather's first failure is the first to complete, as every composition sees completions (and
 * as asyncio.gather raises the first exception). Order forced: the gather (a thread of ours)
 * has hung its nodes on both inputs; input 1 fails, then input 0. It used to return the first
 * failure in input order: input 0's.
 */
struct gather_order {
	concur_future *fs[2];
	int64_t r;
};

static void *gather_thread(void *arg)
{
	struct gather_order *g = arg;
	g->r = concur_gather(g->fs, 2, -1, NULL, NULL);
	return NULL;
}

static void test_gather_first_failure_order(void **state)
{
	struct gather_order g = {.fs = {concur_promise_new(NULL), concur_promise_new(NULL)}};
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, gather_thread, &g), 0);
	while (!has_waiter(g.fs[0]) || !has_waiter(g.fs[1]))
		usleep(100);
	assert_int_equal(concur_promise_set(g.fs[1], -EIO), 0);
	assert_int_equal(concur_promise_set(g.fs[0], -EBADF), 0);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(g.r, -EIO);
	concur_release(g.fs[0]);
	concur_release(g.fs[1]);
}

/*
 * gather's first failure when inputs complete while gather registers on them. Input 0 (A) is
 * registered on and fails, then input 1 (B) fails, both before gather reaches B (forced: a wrap
 * of concur__waiter_push, from tests/CMakeLists.txt, sets both just before B's registration).
 * A's failure could be seen before B completed, and as_completed, in the same schedule, yields A
 * before B: gather must report A's error too. It reported B's: a failure found at registration
 * beat every failure recorded meanwhile.
 */
bool __real_concur__waiter_push(concur_future *f, struct concur__waiter *w);
bool __wrap_concur__waiter_push(concur_future *f, struct concur__waiter *w);
static concur_future *_Atomic push_hold_on; /* before registering on this one... */
static concur_future *push_first[2];        /* ...set these, in this order */
static int64_t push_first_res[2];

bool __wrap_concur__waiter_push(concur_future *f, struct concur__waiter *w)
{
	concur_future *expected = f;
	if (f && atomic_compare_exchange_strong(&push_hold_on, &expected, NULL))
		for (int i = 0; i < 2; i++)
			concur_promise_set(push_first[i], push_first_res[i]);
	return __real_concur__waiter_push(f, w);
}

static void test_gather_failures_during_registration(void **state)
{
	for (int as_completed = 0; as_completed < 2; as_completed++) {
		concur_future *a = concur_promise_new(NULL), *b = concur_promise_new(NULL);
		concur_future *fs[2] = {a, b};
		push_first[0] = a;
		push_first_res[0] = -EIO;
		push_first[1] = b;
		push_first_res[1] = -EBADF;
		atomic_store(&push_hold_on, b);
		if (as_completed) {
			concur_as_completed *it;
			concur_future *f1 = NULL, *f2 = NULL;
			assert_int_equal(concur_as_completed_new(&it, fs, 2, -1), 0);
			assert_null(atomic_load(&push_hold_on)); /* the order was forced */
			assert_int_equal(concur_as_completed_next(it, &f1), 1);
			assert_int_equal(concur_as_completed_next(it, &f2), 1);
			concur_as_completed_free(it);
			bool a_first = f1 == a && f2 == b;
			concur_release(f1);
			concur_release(f2);
			assert_true(a_first);
		} else {
			int64_t r = concur_gather(fs, 2, -1, NULL, NULL);
			assert_null(atomic_load(&push_hold_on)); /* the order was forced */
			assert_int_equal(r, -EIO);
		}
		release_all(fs, 2);
	}
}

/*
 * A then of F that ends unrun because F failed (its start runs in F's completion) runs its own
 * callbacks there: they must not hold the threads blocked on F, which are woken before any
 * callback (see "Order" in concur.h). A callback on a thread outside the executor may wait (as
 * test_then_waited_in_callback_of_unrun_end does); here it waits for the thread blocked on F,
 * which was woken only after the callback returned: each waited for the other (5 s bound here).
 * Forced: the thread is asleep in the futex on F (its syscall read from /proc) before F fails.
 */
static concur_future *blocked_on;
static _Atomic long blocked_tid;
static atomic_bool blocked_returned;
static atomic_int cb_saw_return = -1;

static void *block_on_future(void *arg)
{
	atomic_store(&blocked_tid, (long)syscall(SYS_gettid));
	concur_result(blocked_on, -1);
	atomic_store(&blocked_returned, true);
	return NULL;
}

/* The thread of tid is asleep in futex(2) on word (its /proc syscall file: number, args). */
static bool asleep_in_futex(long tid, const void *word)
{
	char path[64], buf[256] = {0};
	snprintf(path, sizeof(path), "/proc/self/task/%ld/syscall", tid);
	FILE *fp = fopen(path, "r");
	if (!fp)
		return false;
	char *end = buf;
	bool in = fgets(buf, sizeof(buf), fp) && strtol(buf, &end, 10) == SYS_futex &&
	          strtoull(end, NULL, 16) == (uintptr_t)word;
	fclose(fp);
	return in;
}

static void waits_for_blocked(concur_future *f, void *arg)
{
	for (int i = 0; i < 50000 && !atomic_load(&blocked_returned); i++)
		usleep(100);
	atomic_store(&cb_saw_return, atomic_load(&blocked_returned));
}

static void *fail_input(void *arg)
{
	concur_promise_set(arg, -EIO);
	return NULL;
}

static void test_then_unrun_end_holds_no_blocked_thread(void **state)
{
	blocked_on = concur_promise_new(ex1);
	atomic_store(&blocked_tid, 0);
	atomic_store(&blocked_returned, false);
	atomic_store(&cb_saw_return, -1);
	concur_future *t = concur_then(blocked_on, add_one, NULL);
	assert_int_equal(concur_on_done(t, waits_for_blocked, NULL), 0);
	pthread_t w, m;
	assert_int_equal(pthread_create(&w, NULL, block_on_future, NULL), 0);
	/* bounded (10 s): a /proc that cannot tell fails the test rather than hang it */
	for (int i = 0; !atomic_load(&blocked_tid) ||
	                !(atomic_load(&blocked_on->waiters) & CONCUR__WAITERS_PARKED) ||
	                !asleep_in_futex(atomic_load(&blocked_tid), &blocked_on->state);
	     i++) {
		assert_true(i < 100000);
		usleep(100);
	}
	assert_int_equal(pthread_create(&m, NULL, fail_input, blocked_on), 0);
	assert_int_equal(pthread_join(m, NULL), 0);
	assert_int_equal(pthread_join(w, NULL), 0);
	assert_int_equal(atomic_load(&cb_saw_return), 1);
	assert_int_equal(concur_result(t, 0), -EIO);
	concur_release(t);
	concur_release(blocked_on);
}

/*
 * A then or spawn_after cancelled while it waits for its inputs takes its nodes back off them at
 * once: a server that hangs a then per connection on a long-lived promise (a "stop" signal) and
 * cancels it when the connection closes must not grow until that promise is set. Before, every
 * cancelled dependent stayed on the promise's list (its ~200-byte record with it) until then.
 */
static atomic_int dependents_run;

static int64_t count_then(void *arg, int64_t v)
{
	atomic_fetch_add(&dependents_run, 1);
	return v;
}

static int64_t count_after(void *arg, const int64_t *values, size_t n)
{
	atomic_fetch_add(&dependents_run, 1);
	return 0;
}

static atomic_int cancelled_callbacks;

static void count_callback(concur_future *f, void *arg)
{
	if (concur_cancelled(f))
		atomic_fetch_add(&cancelled_callbacks, 1);
}

static void test_cancelled_dependents_let_go_of_inputs(void **state)
{
	atomic_store(&dependents_run, 0);
	atomic_store(&cancelled_callbacks, 0);
	concur_future *stop = concur_promise_new(ex1);
	concur_future *done = done_with(5);
	enum { N = 1000 };
	for (int i = 0; i < N; i++) {
		concur_future *in[3] = {stop, done, stop};
		concur_future *d = i % 2 ? concur_then(stop, count_then, NULL)
		                         : concur_spawn_after(ex1, count_after, NULL, in, 3);
		assert_int_equal(concur_on_done(d, count_callback, NULL), 0);
		assert_false(concur_done(d));
		assert_int_equal(concur_cancel(d), 1);
		assert_true(concur_cancelled(d));
		assert_int_equal(concur_result(d, 0), -ECANCELED);
		concur_release(d);
	}
	/* nothing of theirs is left on the promise (1000 nodes before) */
	assert_int_equal(atomic_load(&stop->waiters), 0);
	assert_int_equal(atomic_load(&cancelled_callbacks), N);
	/* still a future like any: a dependent made now runs when it is set */
	concur_future *d = concur_then(stop, count_then, NULL);
	assert_int_equal(concur_promise_set(stop, 7), 0);
	assert_int_equal(concur_result(d, MS(5000)), 7);
	assert_int_equal(atomic_load(&dependents_run), 1); /* that one alone */
	concur_release(d);
	concur_release(stop);
	concur_release(done);
	assert_int_equal(concur_exec_join(ex1, -1), 0);
}

/*
 * The same when a callback of the dependent owns its last reference (concur_on_done allows
 * it): the take-back runs after the callbacks, and its last tell lets the executor go of the
 * record. It read the record after that (a use after free, which ASan reports), as the cancel
 * held no reference of its own.
 */
static void release_in_callback(concur_future *f, void *arg)
{
	atomic_fetch_add(&cancelled_callbacks, concur_cancelled(f));
	concur_release(f);
}

static void test_cancelled_dependent_owned_by_its_callback(void **state)
{
	atomic_store(&cancelled_callbacks, 0);
	concur_future *p = concur_promise_new(ex1);
	concur_future *in[8] = {p, p, p, p, p, p, p, p};
	for (int big = 0; big < 2; big++) { /* a then's cached record, a malloc'd one */
		concur_future *d = big ? concur_spawn_after(ex1, count_after, NULL, in, 8)
		                       : concur_then(p, count_then, NULL);
		assert_int_equal(concur_on_done(d, release_in_callback, NULL), 0);
		assert_int_equal(concur_cancel(d), 1);
	}
	assert_int_equal(atomic_load(&cancelled_callbacks), 2);
	assert_int_equal(atomic_load(&p->waiters), 0);
	concur_release(p);
	assert_int_equal(concur_exec_join(ex1, -1), 0);
}

/*
 * The cancel's take-back against the input's own end, forced: a wrap of
 * concur__waiter_take_back (tests/CMakeLists.txt) lets another thread complete the input (or
 * release it unset, its last reference) until the input's list is closed, and only then looks.
 * The input's hook waits for the look to end (the input must outlive it), the take-back finds
 * the list closed, and the hook tells the dependent: it ends once, CANCELLED, never run. The
 * unset case also checks that the take-back does not wait for a final state, which an input
 * dying unset never gets (the take-back and the hook would wait for each other).
 */
bool __real_concur__waiter_take_back(concur_future *f, struct concur__waiter *w);
bool __wrap_concur__waiter_take_back(concur_future *f, struct concur__waiter *w);
static concur_future *_Atomic take_back_hold_on;
static bool take_back_by_release; /* release the input unset (our reference), not set it */
static pthread_t take_back_ender;
static atomic_int take_back_result = -1;

static void *end_input(void *arg)
{
	if (take_back_by_release)
		concur_release(arg);
	else
		concur_promise_set(arg, 3);
	return NULL;
}

bool __wrap_concur__waiter_take_back(concur_future *f, struct concur__waiter *w)
{
	concur_future *expected = f;
	if (!f || !atomic_compare_exchange_strong(&take_back_hold_on, &expected, NULL))
		return __real_concur__waiter_take_back(f, w);
	assert_int_equal(pthread_create(&take_back_ender, NULL, end_input, f), 0);
	for (int i = 0; !(atomic_load(&f->waiters) & CONCUR__WAITERS_CLOSED); i++) {
		assert_true(i < 100000); /* 10 s */
		usleep(100);
	}
	bool r = __real_concur__waiter_take_back(f, w);
	atomic_store(&take_back_result, r);
	return r;
}

static void test_cancel_takes_back_while_input_ends(void **state)
{
	for (int by_release = 0; by_release < 2; by_release++) {
		atomic_store(&dependents_run, 0);
		atomic_store(&cancelled_callbacks, 0);
		atomic_store(&take_back_result, -1);
		take_back_by_release = by_release;
		concur_future *in = concur_promise_new(ex1);
		concur_future *d = concur_then(in, count_then, NULL);
		assert_int_equal(concur_on_done(d, count_callback, NULL), 0);
		atomic_store(&take_back_hold_on, in);
		assert_int_equal(concur_cancel(d), 1);
		assert_null(atomic_load(&take_back_hold_on)); /* the order was forced */
		assert_int_equal(pthread_join(take_back_ender, NULL), 0);
		assert_int_equal(atomic_load(&take_back_result), 0); /* the list was closed */
		assert_true(concur_cancelled(d));
		assert_int_equal(concur_result(d, 0), -ECANCELED);
		assert_int_equal(atomic_load(&cancelled_callbacks), 1);
		concur_release(d);
		if (!by_release) {
			assert_int_equal(concur_result(in, 0), 3);
			concur_release(in);
		}
		assert_int_equal(concur_exec_join(ex1, -1), 0);
		assert_int_equal(atomic_load(&dependents_run), 0);
	}
}

/* A task waiting for its own future through concur_wait / concur_gather: -EDEADLK, as
 * concur_result gives (it waited for itself for good; the bounds only turn that into the
 * timeouts it was). FIRST_COMPLETED and FIRST_EXCEPTION wait while another input may end
 * them. */
static int64_t waits_self(void *arg)
{
	concur_future *self = (concur_future *)(intptr_t)concur_result(arg, -1);
	concur_future *other = concur_promise_new(NULL), *both[2] = {self, other};
	int w = concur_wait(&self, 1, CONCUR_ALL_COMPLETED, MS(200), NULL);
	int e = concur_wait(&self, 1, CONCUR_FIRST_EXCEPTION, MS(200), NULL);
	int fail = concur_wait(both, 2, CONCUR_FIRST_EXCEPTION, MS(10), NULL); /* other may fail */
	int one = concur_wait(&self, 1, CONCUR_FIRST_COMPLETED, MS(200), NULL);
	int any = concur_wait(both, 2, CONCUR_FIRST_COMPLETED, MS(10), NULL); /* other may end */
	int64_t v, g = concur_gather(&self, 1, MS(200), &v, NULL);
	concur_release(other);
	/* FIRST_EXCEPTION over itself and one that succeeds once the wait has begun (set as the
	 * wait registers on it): itself is left alone (it waited out its timeout, and for good
	 * without one) */
	concur_future *ok = concur_promise_new(NULL), *spare = concur_promise_new(NULL);
	concur_future *self_ok[2] = {self, ok};
	push_first[0] = ok;
	push_first_res[0] = 1;
	push_first[1] = spare;
	push_first_res[1] = 2;
	atomic_store(&push_hold_on, ok);
	int alone = concur_wait(self_ok, 2, CONCUR_FIRST_EXCEPTION, MS(200), NULL);
	bool forced = !atomic_load(&push_hold_on);
	concur_release(ok);
	concur_release(spare);
	return w == -EDEADLK && e == -EDEADLK && fail == 0 && one == -EDEADLK && any == 0 &&
	               g == -EDEADLK && alone == -EDEADLK && forced
	           ? 0
	           : -EPROTO; /* before: 0, 0, 0 (nothing done at the timeouts), -ETIMEDOUT, 1 */
}

/* Run fn as a task told its own future (through a promise, its argument); it must return 0. */
static void run_told_itself(concur_task_fn fn)
{
	concur_future *p = concur_promise_new(ex);
	concur_future *t = concur_spawn(ex, fn, p);
	assert_int_equal(concur_promise_set(p, (int64_t)(intptr_t)t), 0);
	assert_int_equal(concur_result(t, MS(5000)), 0);
	concur_release(t);
	concur_release(p);
}

static void test_task_waits_for_itself(void **state)
{
	run_told_itself(waits_self);
}

/* A task iterating with concur_as_completed over a set holding its own future: -EDEADLK once
 * its own is the one left (its last next() waited for good); while another may come first, it
 * waits. */
static int64_t iterates_self(void *arg)
{
	concur_future *self = (concur_future *)(intptr_t)concur_result(arg, -1);
	concur_future *other = concur_promise_new(NULL), *both[2] = {self, other}, *f = NULL;
	concur_as_completed *it = NULL;
	if (concur_as_completed_new(&it, both, 2, MS(200)) != 0)
		return -ENOMEM;
	concur_as_completed *early = NULL;
	int pending = -1; /* both left: it waits (until its 10 ms) */
	if (concur_as_completed_new(&early, both, 2, MS(10)) == 0)
		pending = concur_as_completed_next(early, &f);
	concur_as_completed_free(early);
	concur_promise_set(other, 7);
	int first = concur_as_completed_next(it, &f);
	bool got_other = first == 1 && f == other;
	if (first == 1)
		concur_release(f);
	int last = concur_as_completed_next(it, &f);
	size_t left = concur_as_completed_unfinished(it, NULL);
	concur_as_completed_free(it);
	int expired = 1; /* a deadline passed already says so first, as concur_wait's timeout 0 */
	if (concur_as_completed_new(&it, &self, 1, 0) == 0)
		expired = concur_as_completed_next(it, &f);
	concur_as_completed_free(it);
	concur_release(other);
	return pending == -ETIMEDOUT && got_other && last == -EDEADLK && left == 1 &&
	               expired == -ETIMEDOUT
	           ? 0
	           : -EPROTO; /* before: last was -ETIMEDOUT (-1 as the timeout: never returned) */
}

static void test_task_iterates_over_itself(void **state)
{
	run_told_itself(iterates_self);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_wait_empty_and_bad_input),
	    cmocka_unit_test(test_wait_all_completed),
	    cmocka_unit_test(test_wait_all_completed_tasks),
	    cmocka_unit_test(test_wait_first_completed),
	    cmocka_unit_test(test_wait_first_exception),
	    cmocka_unit_test(test_wait_in_task),
	    cmocka_unit_test(test_gather_failing_middle),
	    cmocka_unit_test(test_gather_progress),
	    cmocka_unit_test(test_gather_timeout),
	    cmocka_unit_test(test_as_completed_order),
	    cmocka_unit_test(test_as_completed_tasks_and_deadline),
	    cmocka_unit_test(test_as_completed_deadline_scope),
	    cmocka_unit_test(test_wait_deadline_scope),
	    cmocka_unit_test(test_as_completed_done_while_made),
	    cmocka_unit_test(test_then_chain_10000),
	    cmocka_unit_test(test_spawn_after_failed_input),
	    cmocka_unit_test(test_pipeline),
	    cmocka_unit_test(test_then_fire_and_forget_join),
	    cmocka_unit_test(test_wait_in_callback_edeadlk),
	    cmocka_unit_test(test_then_waited_in_callback_of_unrun_end),
	    cmocka_unit_test(test_callback_wait_starts_only_its_own),
	    cmocka_unit_test(test_abandoned_waits_leave_nothing),
	    cmocka_unit_test(test_then_after_executor_freed),
	    cmocka_unit_test(test_as_completed_observed_order),
	    cmocka_unit_test(test_cancel_while_ending_unrun),
	    cmocka_unit_test(test_gather_first_failure_order),
	    cmocka_unit_test(test_gather_failures_during_registration),
	    cmocka_unit_test(test_then_unrun_end_holds_no_blocked_thread),
	    cmocka_unit_test(test_cancelled_dependents_let_go_of_inputs),
	    cmocka_unit_test(test_cancelled_dependent_owned_by_its_callback),
	    cmocka_unit_test(test_cancel_takes_back_while_input_ends),
	    cmocka_unit_test(test_task_waits_for_itself),
	    cmocka_unit_test(test_task_iterates_over_itself),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, setup, teardown));
}

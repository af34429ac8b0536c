/* SPDX-License-Identifier: MIT */
/* Task groups (group.c): waiting for every member, cancelling, the first failure. */
#include "helpers.h"
#include "internal.h" /* a loop's sleeping flag */
#include "comp_test.h"
#include "hold_loop.h"

#include <errno.h>
#include <stdatomic.h>
#include <unistd.h>

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

static void release_all(concur_future **fs, size_t n)
{
	for (size_t i = 0; i < n; i++)
		concur_release(fs[i]);
}

/* ---- waiting and cancelling
 * --------------------------------------------------------------------------------- */

static atomic_int group_ran;

static int64_t member_ok(void *arg)
{
	atomic_fetch_add(&group_ran, 1);
	concur_sleep(MS(5));
	return 0;
}

/* Holds its loop (no yield) for a while, then fails. */
static int64_t member_fail(void *arg)
{
	spin_ns(MS(50));
	return -EIO;
}

static int64_t member_spawner(void *arg)
{
	concur_group *g = arg;
	for (int i = 0; i < 5; i++)
		concur_release(concur_group_spawn(g, member_ok, NULL));
	return 0;
}

static void test_group_wait(void **state)
{
	concur_group *g;
	assert_int_equal(concur_group_new(&g, ex, 0), 0);
	atomic_store(&group_ran, 0);
	for (int i = 0; i < 3; i++)
		concur_release(concur_group_spawn(g, member_spawner, g));
	assert_int_equal(concur_group_wait(g, -1), 0);
	assert_int_equal(atomic_load(&group_ran), 15);
	assert_false(concur_group_cancelled(g));
	concur_group_free(g);
	assert_int_equal(concur_group_new(&g, NULL, 0), -EINVAL);
}

static int64_t group_waiter_task(void *arg)
{
	concur_group *g;
	if (concur_group_new(&g, ex1, 0))
		return -1;
	for (int i = 0; i < 4; i++)
		concur_release(concur_group_spawn(g, member_ok, NULL));
	int64_t r = concur_group_wait(g, -1); /* suspends: the members run on this same loop */
	concur_group_free(g);
	return r;
}

static void test_group_wait_in_task(void **state)
{
	atomic_store(&group_ran, 0);
	concur_future *f = concur_spawn(ex1, group_waiter_task, NULL);
	assert_int_equal(concur_result(f, -1), 0);
	assert_int_equal(atomic_load(&group_ran), 4);
	concur_release(f);
}

/*
 * A task cancelled while it waits for its group: the members are cancelled and waited for, and
 * only then does the wait return -ECANCELED. It returned at once, a member still running after
 * a result that promises every member done. Forced: the member waits on a gate the test never
 * opens before the check; the waiter is cancelled once the loop sleeps (both in their waits).
 */
static concur_group *cg;
static concur_future *cg_member;
static atomic_int member_done_at_return = -1;

static int64_t wait_gate(void *arg)
{
	return concur_result(arg, -1);
}

static int64_t group_waiter_cancelled(void *arg)
{
	int64_t r = concur_group_wait(cg, -1);
	atomic_store(&member_done_at_return, concur_done(cg_member));
	return r;
}

static void test_group_wait_cancelled(void **state)
{
	assert_int_equal(concur_group_new(&cg, ex1, 0), 0);
	concur_future *gate = concur_promise_new(ex1);
	cg_member = concur_group_spawn(cg, wait_gate, gate);
	concur_future *w = concur_spawn(ex1, group_waiter_cancelled, NULL);
	assert_true(flag_set(&ex1->loops[0]->sleeping)); /* both waiting: the loop sleeps */
	concur_cancel(w);
	int64_t r = concur_result(w, MS(5000));
	int done = atomic_load(&member_done_at_return);
	concur_promise_set(gate, 0); /* (lets a member the cancel missed end) */
	assert_int_equal(r, -ECANCELED);
	assert_int_equal(done, 1);
	assert_true(concur_cancelled(cg_member)); /* the group's cancel reached it */
	assert_int_equal(concur_group_wait(cg, -1), -ECANCELED);
	concur_release(w);
	concur_release(cg_member);
	concur_release(gate);
	concur_group_free(cg);
}

static void test_group_cancel_on_failure(void **state)
{
	/* 1 loop: the failing member holds it, so the others are still queued when it fails */
	concur_group *g;
	assert_int_equal(concur_group_new(&g, ex1, CONCUR_GROUP_CANCEL_ON_FAILURE), 0);
	atomic_store(&group_ran, 0);
	concur_future *first = concur_group_spawn(g, member_fail, NULL);
	concur_future *fs[20];
	for (int i = 0; i < 20; i++)
		fs[i] = concur_group_spawn(g, member_ok, NULL);
	assert_int_equal(concur_group_wait(g, -1), -EIO);
	assert_true(concur_group_cancelled(g));
	int cancelled_n = 0;
	for (int i = 0; i < 20; i++)
		cancelled_n += concur_cancelled(fs[i]);
	assert_int_equal(cancelled_n + atomic_load(&group_ran), 20);
	assert_true(cancelled_n > 0);
	/* later spawns are refused */
	concur_future *late = concur_group_spawn(g, member_ok, NULL);
	assert_int_equal(concur_result(late, -1), -ECANCELED);
	concur_release(late);
	concur_release(first);
	release_all(fs, 20);
	concur_group_free(g);
}

/* Occupy the only loop of ex1 (by spawning into g, or outside any group when g is NULL) so the
 * members spawned next stay PENDING. */
static concur_future *hold_loop_in(concur_group *g)
{
	hold_loop_arm();
	return hold_loop_running(g ? concur_group_spawn(g, hold_loop_task, NULL)
	                           : concur_spawn(ex1, hold_loop_task, NULL));
}

static atomic_int cancel_cb_count;

static void count_cancelled(concur_future *f, void *arg)
{
	if (concur_cancelled(f))
		atomic_fetch_add(&cancel_cb_count, 1);
}

static void test_group_cancel(void **state)
{
	concur_group *g;
	assert_int_equal(concur_group_cancel(NULL), -EINVAL);
	assert_false(concur_group_cancelled(NULL));
	/* cancelling a group with no member: nothing to cancel, but later spawns are refused */
	assert_int_equal(concur_group_new(&g, ex1, 0), 0);
	assert_int_equal(concur_group_cancel(g), 0);
	assert_true(concur_group_cancelled(g));
	concur_future *late = concur_group_spawn(g, member_ok, NULL);
	assert_int_equal(concur_result(late, 0), -ECANCELED);
	concur_release(late);
	assert_int_equal(concur_group_wait(g, 0), 0); /* no member ever: nothing failed */
	concur_group_free(g);

	/* members queued behind a spinner (outside the group) on the only loop never start */
	assert_int_equal(concur_group_new(&g, ex1, 0), 0);
	atomic_store(&group_ran, 0);
	atomic_store(&cancel_cb_count, 0);
	concur_future *s = hold_loop_in(NULL);
	concur_future *fs[10];
	for (int i = 0; i < 10; i++) {
		fs[i] = concur_group_spawn(g, member_ok, NULL);
		assert_int_equal(concur_on_done(fs[i], count_cancelled, NULL), 0);
		assert_false(concur_done(fs[i]));
	}
	assert_false(concur_group_cancelled(g));
	assert_int_equal(concur_group_wait(g, 0), -ETIMEDOUT); /* members pending */
	assert_int_equal(concur_group_cancel(g), 10);
	assert_true(concur_group_cancelled(g));
	/* done at once: the callbacks ran in this thread, the wait needs no loop */
	assert_int_equal(atomic_load(&cancel_cb_count), 10);
	for (int i = 0; i < 10; i++) {
		assert_true(concur_cancelled(fs[i]));
		assert_int_equal(concur_result(fs[i], 0), -ECANCELED);
	}
	assert_int_equal(concur_group_wait(g, 0), -ECANCELED);
	assert_int_equal(concur_group_cancel(g), 0); /* again: nobody left */
	late = concur_group_spawn(g, member_ok, NULL);
	assert_true(concur_done(late));
	assert_int_equal(concur_result(late, 0), -ECANCELED);
	concur_release(late);
	release_loop(s);
	assert_int_equal(concur_exec_join(ex1, -1), 0);
	assert_int_equal(atomic_load(&group_ran), 0); /* none of them ever ran */
	release_all(fs, 10);
	concur_group_free(g);

	/* a running member is told to stop (and counted); this one never waits, so it runs to
	 * its end, and the group waits for it */
	assert_int_equal(concur_group_new(&g, ex1, 0), 0);
	s = hold_loop_in(g);
	for (int i = 0; i < 5; i++)
		fs[i] = concur_group_spawn(g, member_ok, NULL);
	assert_int_equal(concur_group_cancel(g), 6);
	assert_true(concur_running(s));
	assert_false(concur_cancelled(s));
	assert_int_equal(concur_group_wait(g, 0), -ETIMEDOUT); /* the spinner is still a member */
	atomic_store(&hold_gate, 1);
	assert_int_equal(concur_group_wait(g, -1), -ECANCELED);
	assert_int_equal(concur_result(s, 0), 1); /* it ran to the end */
	concur_release(s);
	for (int i = 0; i < 5; i++)
		assert_true(concur_cancelled(fs[i]));
	release_all(fs, 5);
	concur_group_free(g);
}

static int64_t cancel_from_member(void *arg)
{
	concur_group *g = arg;
	/* on the only loop, which this task holds: the members it spawns cannot start yet */
	for (int i = 0; i < 3; i++)
		concur_release(concur_group_spawn(g, member_ok, NULL));
	int n = concur_group_cancel(g); /* the three queued, and this running member itself */
	return n == 4 && concur_group_cancelled(g) && concur_cancel_requested() ? 0 : -1000 - n;
}

static void test_group_cancel_in_member(void **state)
{
	/* a member cancels its own group: its siblings (queued) never run; it is told to stop
	 * too, and it ends with what it returns */
	concur_group *g;
	assert_int_equal(concur_group_new(&g, ex1, 0), 0);
	atomic_store(&group_ran, 0);
	concur_future *f = concur_group_spawn(g, cancel_from_member, g);
	assert_int_equal(concur_group_wait(g, -1), -ECANCELED);
	assert_int_equal(concur_result(f, -1), 0);
	assert_int_equal(atomic_load(&group_ran), 0);
	concur_release(f);
	concur_group_free(g);
}

/* ---- completion order ----------------------------------------------------------------------- */

static int64_t fail_with(void *arg)
{
	return (int64_t)(intptr_t)arg;
}

static int64_t await_then_fail(void *arg)
{
	concur_result(arg, -1);
	return -EPIPE;
}

/* Defect 6 for groups: A's failure was observed before B failed, so A's error is the group's
 * first failure. */
static void test_group_observed_order(void **state)
{
	concur_group *g;
	assert_int_equal(concur_group_new(&g, ex, 0), 0);
	concur_future *p = concur_promise_new(ex);
	concur_future *b = concur_group_spawn(g, await_then_fail, p);
	concur_future *a = concur_group_spawn(g, fail_with, (void *)(intptr_t)-EIO);
	assert_int_equal(concur_result(a, -1), -EIO);
	concur_promise_set(p, 0);
	assert_int_equal(concur_result(b, -1), -EPIPE);
	assert_int_equal(concur_group_wait(g, -1), -EIO);
	concur_group_free(g);
	concur_release(a);
	concur_release(b);
	concur_release(p);
}

/*
 * A group may outlive its executor (freed once the group's work is done): a later spawn fails
 * with -ESHUTDOWN, as after a shutdown. It read the freed executor (a use after free, which
 * ASan reports), as the group kept a plain pointer to it.
 */
static void test_group_spawn_after_executor_freed(void **state)
{
	concur_exec *e;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&e, &o), 0);
	concur_group *g;
	assert_int_equal(concur_group_new(&g, e, 0), 0);
	concur_release(concur_group_spawn(g, member_ok, NULL));
	assert_int_equal(concur_group_wait(g, -1), 0);
	concur_exec_free(e);
	concur_future *f = concur_group_spawn(g, member_ok, NULL);
	assert_true(concur_done(f));
	assert_int_equal(concur_result(f, 0), -ESHUTDOWN);
	assert_null(concur_future_exec(f));
	concur_release(f);
	concur_future *bad = concur_group_spawn(g, NULL, NULL);
	assert_int_equal(concur_result(bad, 0), -EINVAL);
	concur_release(bad);
	concur_group_free(g);
}

/* A member waiting for its own group would wait for itself: -EDEADLK (it waited for good, as in
 * Go's errgroup). It may still wait for another group, and a task outside g for g. The bound on
 * the self-wait only turns the failure it would be into -ETIMEDOUT. */
static concur_group *outer_g, *inner_g;

static int64_t member_waits_groups(void *arg)
{
	int64_t self = concur_group_wait(outer_g, MS(200));
	concur_release(concur_group_spawn(inner_g, member_ok, NULL));
	int64_t other = concur_group_wait(inner_g, MS(5000));
	return self == -EDEADLK && other == 0 ? 0 : -EPROTO;
}

static void test_group_member_waits_for_itself(void **state)
{
	assert_int_equal(concur_group_new(&outer_g, ex, 0), 0);
	assert_int_equal(concur_group_new(&inner_g, ex, 0), 0);
	concur_future *m = concur_group_spawn(outer_g, member_waits_groups, NULL);
	assert_int_equal(concur_group_wait(outer_g, MS(5000)), 0);
	assert_int_equal(concur_result(m, 0), 0);
	concur_release(m);
	concur_group_free(inner_g);
	concur_group_free(outer_g);
}

/* A spawn refused by a shutdown is not the group's failure: with CANCEL_ON_FAILURE a graceful
 * stop refusing a member's new sibling cancelled the running member it lets finish (and the
 * wait returned -ESHUTDOWN for work that all succeeded). */
static int64_t member_waits_gate(void *arg)
{
	return concur_result(arg, -1) == 0 ? 0 : -EPROTO; /* -ECANCELED if the group cancelled it */
}

static void test_group_spawn_refused_is_not_a_failure(void **state)
{
	concur_exec *e;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&e, &o), 0);
	concur_group *g;
	assert_int_equal(concur_group_new(&g, e, CONCUR_GROUP_CANCEL_ON_FAILURE), 0);
	concur_future *gate = concur_promise_new(NULL);
	concur_future *running = concur_group_spawn(g, member_waits_gate, gate);
	concur_exec_shutdown(e, false); /* graceful: running members finish */
	concur_future *refused = concur_group_spawn(g, member_ok, NULL);
	assert_int_equal(concur_result(refused, 0), -ESHUTDOWN);
	assert_false(concur_group_cancelled(g));
	assert_int_equal(concur_promise_set(gate, 0), 0);
	assert_int_equal(concur_group_wait(g, MS(5000)), 0);
	assert_int_equal(concur_result(running, 0), 0);
	concur_release(refused);
	concur_release(running);
	concur_release(gate);
	concur_group_free(g);
	concur_exec_free(e);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_group_wait),
	    cmocka_unit_test(test_group_wait_in_task),
	    cmocka_unit_test(test_group_wait_cancelled),
	    cmocka_unit_test(test_group_cancel_on_failure),
	    cmocka_unit_test(test_group_cancel),
	    cmocka_unit_test(test_group_cancel_in_member),
	    cmocka_unit_test(test_group_observed_order),
	    cmocka_unit_test(test_group_spawn_after_executor_freed),
	    cmocka_unit_test(test_group_member_waits_for_itself),
	    cmocka_unit_test(test_group_spawn_refused_is_not_a_failure),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, setup, teardown));
}

/* SPDX-License-Identifier: MIT */
/* The blocking pool (the stall detector: test_stall.c). */
#include "internal.h" /* before comp_test.h: its executor is a global named ex */
#include "wait.h"

#include "comp_test.h"
#include "wrap.h" /* the live-block count and a hook in free: test_job_gone_when_join_returns */

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <unistd.h>

/* A blocking job: a real blocking syscall on a helper thread, never on a loop. */
static int64_t blocking_job(void *arg)
{
	if (concur_in_task() || concur_current_exec())
		return -EPERM; /* ran on a loop thread */
	usleep(20000);
	return (int64_t)(intptr_t)arg;
}

struct resume {
	struct concur__loop *before, *after;
	int64_t value;
};

static int64_t awaiting_task(void *arg)
{
	struct resume *r = arg;
	r->before = concur__tl_loop;
	concur_future *f = concur_spawn_blocking(concur_current_exec(), blocking_job, (void *)77);
	r->value =
	    concur_result(f, -1); /* suspends this fiber; the helper's completion resumes it */
	r->after = concur__tl_loop;
	concur_release(f);
	return 0;
}

static void test_blocking_resumes_fiber_on_its_own_loop(void **state)
{
	enum { N = 8 };
	struct resume r[N] = {0};
	concur_future *fs[N];
	for (int i = 0; i < N; i++)
		fs[i] = concur_spawn(ex, awaiting_task, &r[i]);
	assert_int_equal(concur_gather(fs, N, -1, NULL, NULL), 0);
	bool loops_seen[2] = {false, false};
	for (int i = 0; i < N; i++) {
		assert_int_equal(r[i].value, 77);
		assert_non_null(r[i].before);
		assert_ptr_equal(r[i].before, r[i].after);
		loops_seen[r[i].before->idx] = true;
		concur_release(fs[i]);
	}
	assert_true(loops_seen[0] && loops_seen[1]); /* both loops took part */
	struct concur_stats st;
	assert_int_equal(concur_exec_stats(ex, &st), 0);
	assert_true(st.doorbells + st.inbox_items > 0); /* the helpers posted to the loops */
}

static void test_blocking_from_foreign_thread_and_bad_input(void **state)
{
	concur_future *f = concur_spawn_blocking(ex, blocking_job, (void *)5);
	assert_int_equal(concur_result(f, -1), 5);
	concur_release(f);
	f = concur_spawn_blocking(NULL, blocking_job, NULL);
	assert_int_equal(concur_result(f, -1), -EINVAL);
	concur_release(f);
	f = concur_spawn_blocking(ex, NULL, NULL);
	assert_int_equal(concur_result(f, -1), -EINVAL);
	concur_release(f);
	assert_int_equal(concur_blocking_config(5000, 0), -EINVAL);
	assert_int_equal(concur_blocking_config(0, -1), -EINVAL);
}

static atomic_int inside, max_inside;
static atomic_bool release_gate;

static int64_t gated_job(void *arg)
{
	int now = atomic_fetch_add(&inside, 1) + 1;
	int max = atomic_load(&max_inside);
	while (now > max && !atomic_compare_exchange_weak(&max_inside, &max, now))
		;
	while (!atomic_load(&release_gate))
		usleep(1000);
	atomic_fetch_sub(&inside, 1);
	return 1;
}

static atomic_int never_ran;

static int64_t must_not_run(void *arg)
{
	atomic_fetch_add(&never_ran, 1);
	return 0;
}

static void test_blocking_bounded_cancel_and_idle_exit(void **state)
{
	assert_int_equal(concur_blocking_config(2, MS(50)), 0);
	EVENTUALLY(concur_blocking_threads() == 0); /* earlier helpers idle out */
	atomic_store(&release_gate, false);
	concur_future *fs[6];
	for (int i = 0; i < 6; i++)
		fs[i] = concur_spawn_blocking(ex, gated_job, NULL);
	concur_future *queued = concur_spawn_blocking(ex, must_not_run, NULL);
	EVENTUALLY(atomic_load(&inside) == 2);
	assert_true(concur_blocking_threads() <= 2);
	assert_int_equal(concur_cancel(queued), 1); /* not picked yet: it never runs */
	atomic_store(&release_gate, true);
	assert_int_equal(concur_gather(fs, 6, -1, NULL, NULL), 0);
	assert_int_equal(atomic_load(&max_inside), 2);
	assert_int_equal(concur_result(queued, -1), -ECANCELED);
	assert_int_equal(concur_exec_join(ex, -1), 0); /* the cancelled job's work ended too */
	assert_int_equal(atomic_load(&never_ran), 0);
	for (int i = 0; i < 6; i++)
		concur_release(fs[i]);
	concur_release(queued);
	EVENTUALLY(concur_blocking_threads() == 0); /* idle helpers exit */
	assert_int_equal(concur_blocking_config(64, MS(10000)), 0);
}

/*
 * Jobs spawned back to back while one helper is idle: the first wakes it, the second gets a
 * helper of its own (the pool may grow), so a job that waits for the next one is not queued
 * behind it. The idle helper used to be counted free until it woke, so both went to it: the
 * first waited for the second, which waited behind the first.
 */
static concur_event *handoff_ev;
static int64_t wait_for_next(void *arg)
{
	return concur_event_wait(handoff_ev, MS(5000));
}
static int64_t set_for_previous(void *arg)
{
	return concur_event_set(handoff_ev);
}
static int64_t nop_job(void *arg)
{
	return 0;
}

static void test_blocking_idle_helper_taken_once(void **state)
{
	assert_int_equal(concur_blocking_config(64, MS(50)), 0);
	EVENTUALLY(concur_blocking_threads() == 0);
	assert_int_equal(concur_blocking_config(64, MS(10000)), 0);
	concur_future *f = concur_spawn_blocking(ex, nop_job, NULL); /* one helper, idle after */
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	usleep(20000); /* (it goes back to wait for a job) */
	assert_int_equal(concur_event_new(&handoff_ev), 0);
	concur_future *a = concur_spawn_blocking(ex, wait_for_next, NULL);
	concur_future *b = concur_spawn_blocking(ex, set_for_previous, NULL);
	assert_int_equal(concur_result(a, -1), 0);
	assert_int_equal(concur_result(b, -1), 0);
	concur_release(a);
	concur_release(b);
	concur_event_free(handoff_ev);
}

static int64_t slow_job(void *arg)
{
	usleep(50000);
	atomic_store((atomic_bool *)arg, true);
	return 0;
}

static void test_blocking_counts_for_join(void **state)
{
	atomic_bool finished = false;
	concur_future *f = concur_spawn_blocking(ex, slow_job, &finished);
	concur_release(f); /* fire and forget */
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_true(atomic_load(&finished));
}

/* Defect 8: a job a helper has picked up is RUNNING: cancel is too late and says so (0), and
 * the job runs to its end with its own result. */
static atomic_bool job_started, job_gate;
static int64_t gated_once(void *arg)
{
	atomic_store(&job_started, true);
	while (!atomic_load(&job_gate))
		usleep(1000);
	return 7;
}

static void test_blocking_running_job_cannot_be_cancelled(void **state)
{
	atomic_store(&job_started, false);
	atomic_store(&job_gate, false);
	concur_future *f = concur_spawn_blocking(ex, gated_once, NULL);
	EVENTUALLY(atomic_load(&job_started));
	bool running = concur_running(f), done = concur_done(f);
	int cancelled = concur_cancel(f);
	bool ended_cancelled = concur_cancelled(f);
	atomic_store(&job_gate, true); /* before asserting: a failure must not leave it stuck */
	assert_true(running);
	assert_false(done);
	assert_int_equal(cancelled, 0); /* too late: it runs */
	assert_false(ended_cancelled);
	assert_int_equal(concur_result(f, -1), 7);
	assert_false(concur_cancelled(f));
	assert_false(concur_running(f));
	concur_release(f);
	assert_int_equal(concur_exec_join(ex, -1), 0);
}

/*
 * Nothing of a job is left once a join returns but the future its caller still holds: the job's
 * record is its future's allocation, and a helper lets go of it before the job's work ends. (A
 * separate record used to be freed after: a join returned with it still allocated, which the
 * fuzzer's leak check caught.) Released by its caller first, the job is freed by its helper,
 * which is held inside that free until the join has had its chance to return: the order is
 * forced, not raced.
 */
static sem_t free_gate;
static void *_Atomic hold_free_of; /* a helper's free of this waits at the gate */
static int64_t return_arg(void *arg)
{
	return (int64_t)(intptr_t)arg;
}
static void hold_helper_free(void *p)
{
	void *expected = p;
	if (p && !concur__tl_loop && atomic_compare_exchange_strong(&hold_free_of, &expected, NULL))
		sem_wait(&free_gate);
}

static int64_t waits_for_gate(void *gate)
{
	return concur_result(gate, -1);
}

static void test_job_gone_when_join_returns(void **state)
{
	long live0 = atomic_load(&wrap_live);
	concur_future *f = concur_spawn_blocking(ex, return_arg, (void *)3);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&wrap_live) - live0, 1); /* the future, ours */
	assert_int_equal(concur_result(f, 0), 3);
	concur_release(f);
	assert_int_equal(atomic_load(&wrap_live) - live0, 0);

	sem_init(&free_gate, 0, 0);
	concur_future *gate = concur_promise_new(NULL);
	f = concur_spawn_blocking(ex, waits_for_gate, gate);
	atomic_store(&hold_free_of, f);
	atomic_store(&wrap_free_hook, hold_helper_free);
	concur_release(f); /* the helper's reference is the last: it frees the job */
	assert_int_equal(concur_promise_set(gate, 4), 0);
	int early = concur_exec_join(ex, MS(100));
	sem_post(&free_gate);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	atomic_store(&wrap_free_hook, NULL);
	concur_release(gate);
	sem_destroy(&free_gate);
	assert_null(atomic_load(&hold_free_of)); /* the helper was held in the job's free */
	assert_int_equal(early, -ETIMEDOUT);     /* no join while the job is still there */
	assert_int_equal(atomic_load(&wrap_live) - live0, 0);
}

/*
 * A blocking job is work of its executor, and so are its future's callbacks (they run on the
 * helper before the job's end): a join there is -EDEADLK, as in a task, and a free does nothing.
 * The join waited for itself (-ETIMEDOUT here; with no timeout, or a free, for ever).
 */
static int64_t join_in_job(void *arg)
{
	while (!atomic_load(&release_gate)) /* the test adds its callback first */
		usleep(1000);
	int r = concur_exec_join(ex, MS(100));
	if (r == -EDEADLK)
		concur_exec_free(ex); /* refused too: returns at once (it hung: not tried before) */
	return r;
}

static atomic_int join_in_callback = 1;

static void join_from_callback(concur_future *f, void *arg)
{
	atomic_store(&join_in_callback, concur_exec_join(ex, MS(100)));
}

static void test_blocking_job_cannot_join_its_executor(void **state)
{
	atomic_store(&release_gate, false);
	concur_future *f = concur_spawn_blocking(ex, join_in_job, NULL);
	assert_int_equal(concur_on_done(f, join_from_callback, NULL), 0);
	atomic_store(&release_gate, true);
	assert_int_equal(concur_result(f, -1), -EDEADLK);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	assert_int_equal(atomic_load(&join_in_callback), -EDEADLK);
	assert_int_equal(concur_exec_loops(ex), 2); /* not freed */
	concur_release(f);
}

/*
 * A spawn racing a shutdown and a join: the join may not report the executor idle while the
 * spawn, past its shutdown check, still goes on to queue a job. The job was counted only after
 * the check, so join(0) returned 0 and the job ran afterwards. Forced: the spawner is held in
 * its calloc (tests/wrap.h) while the test shuts down and joins.
 */
static atomic_int spawner_state; /* 1: held in calloc, 2: go on */
static pthread_t spawner;

static void hold_spawner_calloc(void)
{
	if (!pthread_equal(pthread_self(), spawner) || atomic_load(&spawner_state) != 0)
		return;
	atomic_store(&spawner_state, 1);
	while (atomic_load(&spawner_state) != 2)
		usleep(100);
}

static void *spawn_42(void *arg)
{
	return concur_spawn_blocking(arg, return_arg, (void *)42);
}

/* Spawn on e from a thread held in the spawn's calloc while meanwhile(e, arg) runs; the future
 * the spawn returned once let go. */
static concur_future *spawn_held_while(concur_exec *e, void (*meanwhile)(concur_exec *, void *),
                                       void *arg)
{
	atomic_store(&spawner_state, 0);
	atomic_store(&wrap_calloc_hook, hold_spawner_calloc);
	assert_int_equal(pthread_create(&spawner, NULL, spawn_42, e), 0);
	while (atomic_load(&spawner_state) != 1)
		usleep(100);
	meanwhile(e, arg);
	atomic_store(&spawner_state, 2);
	void *f;
	assert_int_equal(pthread_join(spawner, &f), 0);
	atomic_store(&wrap_calloc_hook, NULL);
	return f;
}

static void shut_down_and_join(concur_exec *e, void *join_out)
{
	concur_exec_shutdown(e, false);
	*(int *)join_out = concur_exec_join(e, 0);
}

static void test_spawn_counted_before_shutdown_check(void **state)
{
	concur_exec *e;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&e, &o), 0);
	int j;
	concur_future *f = spawn_held_while(e, shut_down_and_join, &j);
	assert_int_equal(j, -ETIMEDOUT); /* the spawn in progress is work */
	assert_int_equal(concur_result(f, -1), 42);
	concur_release(f);
	assert_int_equal(concur_exec_join(e, -1), 0);
	concur_exec_free(e);
}

/*
 * A blocking job cancelled while queued runs its future's callbacks in the cancelling
 * thread. They are work of the job's executor, as a cancelled queued task's are (concur_cancel
 * counts those): a join must not return 0 while one still runs. Forced: one helper at most, held
 * by a gated job; a job queued behind it is cancelled from a thread whose callback is held at a
 * gate; the first job is released (the helper then drops the cancelled one) and the test joins.
 */
static sem_t sem_job_gate, cb_entered, cb_gate;
static atomic_int cb_join = 1;
static concur_exec *cb_ex;

static int64_t sem_job(void *arg)
{
	sem_wait(&sem_job_gate);
	return 0;
}

static void held_cb(concur_future *f, void *arg)
{
	atomic_store(&cb_join, concur_exec_join(cb_ex, 0)); /* -EDEADLK: its own work */
	sem_post(&cb_entered);
	sem_wait(&cb_gate);
	/* goes on to use its executor: spawn a follow-up */
	concur_future *g = concur_spawn(cb_ex, return_arg, (void *)1);
	concur_release(g);
}

static void *cancel_thread(void *arg)
{
	concur_future *f = arg;
	return (void *)(intptr_t)concur_cancel(f);
}

/* A pool of one helper, held by a job at a gate (sem_job_gate), and a job of e queued behind
 * it that must not run (never_ran). */
static void one_helper_held(concur_exec *e, concur_future **busy, concur_future **queued)
{
	assert_int_equal(concur_blocking_config(1, MS(50)), 0);
	EVENTUALLY(concur_blocking_threads() == 0);
	assert_int_equal(concur_blocking_config(1, MS(10000)), 0);
	atomic_store(&never_ran, 0);
	sem_init(&sem_job_gate, 0, 0);
	*busy = concur_spawn_blocking(e, sem_job, NULL);
	*queued = concur_spawn_blocking(e, must_not_run, NULL);
}

/* The pool as the other tests expect it. */
static void one_helper_done(void)
{
	assert_int_equal(concur_blocking_config(64, MS(10000)), 0);
	sem_destroy(&sem_job_gate);
}

static void test_blocking_cancelled_job_callbacks_are_work(void **state)
{
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&cb_ex, &o), 0);
	sem_init(&cb_entered, 0, 0);
	sem_init(&cb_gate, 0, 0);
	concur_future *busy, *queued;
	one_helper_held(cb_ex, &busy, &queued);
	assert_int_equal(concur_on_done(queued, held_cb, NULL), 0);
	pthread_t t;
	assert_int_equal(pthread_create(&t, NULL, cancel_thread, queued), 0);
	sem_wait(&cb_entered);   /* the callback runs, held */
	sem_post(&sem_job_gate); /* the helper ends busy and drops the cancelled job */
	assert_int_equal(concur_result(busy, -1), 0);
	int j = concur_exec_join(cb_ex, MS(500));
	sem_post(&cb_gate);
	void *cancelled;
	pthread_join(t, &cancelled);
	assert_int_equal(concur_exec_join(cb_ex, -1), 0);
	concur_release(busy);
	concur_release(queued);
	concur_exec_free(cb_ex);
	one_helper_done();
	sem_destroy(&cb_entered);
	sem_destroy(&cb_gate);
	assert_int_equal((intptr_t)cancelled, 1);
	assert_int_equal(j, -ETIMEDOUT);                   /* the callback is still running */
	assert_int_equal(atomic_load(&cb_join), -EDEADLK); /* as in a cancelled task's callback */
}

/*
 * A blocking job's future is no promise of the caller's: concur_promise_set() on it must
 * say -EINVAL (as on a task's future), not end the job's future with the caller's value (the
 * job then never runs) nor, on a running job, wait for the job to end.
 */
static void test_blocking_job_future_no_promise(void **state)
{
	concur_future *busy, *queued;
	one_helper_held(ex, &busy, &queued);
	int r = concur_promise_set(queued, 5);
	sem_post(&sem_job_gate);
	assert_int_equal(concur_result(busy, -1), 0);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	concur_release(busy);
	concur_release(queued);
	one_helper_done();
	assert_int_equal(r, -EINVAL);
	assert_int_equal(atomic_load(&never_ran), 1); /* it ran: the set was refused */
}

/*
 * shutdown(ex, true) cancels the blocking jobs of ex no helper has picked yet, as it does the
 * tasks that have not started: the job queued behind a gated one never runs. It used to run
 * after the shutdown (and a stop past its drain time ran it too, and waited for it). And it is
 * cancelled by the shutdown itself, while the one helper is still busy: it used to end only
 * when a helper reached it (the busy job's whole run later).
 */
static void test_blocking_shutdown_cancels_queued_jobs(void **state)
{
	concur_exec *e;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&e, &o), 0);
	concur_future *busy, *queued;
	one_helper_held(e, &busy, &queued);
	EVENTUALLY(concur_running(busy));
	concur_exec_shutdown(e, true);
	assert_true(concur_done(queued)); /* the helper is still busy */
	assert_true(concur_cancelled(queued));
	assert_int_equal(concur_result(queued, 0), -ECANCELED);
	assert_false(concur_done(busy));
	sem_post(&sem_job_gate);
	assert_int_equal(concur_result(busy, -1), 0); /* a running job runs to its end */
	assert_int_equal(concur_exec_join(e, -1), 0);
	assert_int_equal(atomic_load(&never_ran), 0);
	concur_release(busy);
	concur_release(queued);
	concur_exec_free(e);
	one_helper_done();
}

/*
 * A cancelled job no helper picked yet leaves the queue at once: it stayed there, counted as
 * its executor's work until a helper reached it, so a join of that executor timed out (and a
 * free waited) while the helpers ran another executor's long job. The queue keeps its order
 * around the job taken out.
 */
static void test_blocking_cancelled_job_leaves_queue(void **state)
{
	concur_exec *other;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&other, &o), 0);
	concur_future *busy, *queued;
	one_helper_held(other, &busy, &queued); /* the one helper held by other's job */
	concur_future *mine = concur_spawn_blocking(ex, must_not_run, NULL);
	concur_future *last = concur_spawn_blocking(other, return_arg, (void *)7);
	int cancelled = concur_cancel(mine);
	int joined = concur_exec_join(ex, MS(200));
	sem_post(&sem_job_gate);
	assert_int_equal(concur_result(busy, -1), 0);
	assert_int_equal(concur_result(queued, -1), 0);
	assert_int_equal(concur_result(last, -1), 7);
	assert_int_equal(concur_exec_join(other, -1), 0);
	concur_release(busy);
	concur_release(queued);
	concur_release(last);
	concur_release(mine);
	concur_exec_free(other);
	one_helper_done();
	assert_int_equal(cancelled, 1);
	assert_int_equal(joined, 0); /* -ETIMEDOUT before: ex's cancelled job still counted */
	assert_int_equal(atomic_load(&never_ran), 1); /* queued ran; mine did not */
}

/* A job returning -ECANCELED ends CANCELLED, as a task doing so does (it ended FINISHED with
 * -ECANCELED: concur_cancelled() false, and FIRST_EXCEPTION took it for a failure). */
static void test_blocking_job_returning_ecanceled(void **state)
{
	concur_future *f = concur_spawn_blocking(ex, return_arg, (void *)(intptr_t)-ECANCELED);
	assert_int_equal(concur_result(f, MS(5000)), -ECANCELED);
	assert_true(concur_cancelled(f));
	concur_release(f);
}

/*
 * A spawn racing shutdown(ex, true): past its first look at the flag (held in its calloc, as
 * above) when the shutdown swept the queue, it must not queue a job the sweep missed (that job
 * waited for a helper to reach it, behind whatever the helpers were busy with). It looks again
 * under the pool's lock, which the sweep takes after setting the flag, and is refused.
 */
static void shut_down_cancelling(concur_exec *e, void *unused)
{
	concur_exec_shutdown(e, true); /* its sweep finds nothing yet */
}

static void test_blocking_spawn_racing_cancelling_shutdown(void **state)
{
	concur_exec *e;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&e, &o), 0);
	concur_future *f = spawn_held_while(e, shut_down_cancelling, NULL);
	assert_true(concur_done(f)); /* refused, not queued */
	assert_int_equal(concur_result(f, 0), -ESHUTDOWN);
	concur_release(f);
	assert_int_equal(concur_exec_join(e, -1), 0);
	concur_exec_free(e);
}

/*
 * The jobs a shutdown(ex1, true) cancels run their callbacks in its caller's thread, as ex1's
 * work: there a join of ex1 gets -EDEADLK. When that caller is a blocking job of ex2, the
 * callbacks are still inside ex2's job, and a join of ex2 must get -EDEADLK too (it waited for
 * its own job: the cancel had taken the job's thread for ex1's alone). Forced: one helper, busy
 * with ex2's job, which shuts ex1 down while ex1's job is queued behind it.
 */
static concur_exec *nest_ex1, *nest_ex2;
static sem_t nest_gate;
static atomic_int nest_join1 = 1, nest_join2 = 1;

static int64_t nest_shutdown_job(void *arg)
{
	sem_wait(&nest_gate);
	concur_exec_shutdown(nest_ex1, true);
	return 0;
}

static void nest_joins(concur_future *f, void *arg)
{
	atomic_store(&nest_join1, concur_exec_join(nest_ex1, 0));
	atomic_store(&nest_join2, concur_exec_join(nest_ex2, 0));
}

static void test_blocking_shutdown_from_another_executors_job(void **state)
{
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&nest_ex1, &o), 0);
	assert_int_equal(concur_exec_new(&nest_ex2, &o), 0);
	assert_int_equal(concur_blocking_config(1, MS(50)), 0);
	EVENTUALLY(concur_blocking_threads() == 0);
	assert_int_equal(concur_blocking_config(1, MS(10000)), 0);
	sem_init(&nest_gate, 0, 0);
	atomic_store(&never_ran, 0);
	concur_future *outer = concur_spawn_blocking(nest_ex2, nest_shutdown_job, NULL);
	EVENTUALLY(concur_running(outer));
	concur_future *queued = concur_spawn_blocking(nest_ex1, must_not_run, NULL);
	assert_int_equal(concur_on_done(queued, nest_joins, NULL), 0);
	sem_post(&nest_gate);
	assert_int_equal(concur_result(outer, -1), 0);
	assert_true(concur_cancelled(queued));
	assert_int_equal(atomic_load(&nest_join1), -EDEADLK);
	assert_int_equal(atomic_load(&nest_join2), -EDEADLK);
	assert_int_equal(atomic_load(&never_ran), 0);
	concur_release(outer);
	concur_release(queued);
	concur_exec_free(nest_ex1);
	concur_exec_free(nest_ex2);
	assert_int_equal(concur_blocking_config(64, MS(10000)), 0);
	sem_destroy(&nest_gate);
}

/*
 * fork(): the child's pool starts with no helper. Its copy counted the parent's helpers (which
 * a child does not have), so a job it spawned was queued for an idle helper that was not
 * there and never ran (its result timed out, and freeing its executor hung). A TSan child of a
 * multi-threaded parent may not start threads, so there the child checks the pool it starts
 * with and runs no job.
 */
static int blocking_child(int unused)
{
	if (concur_blocking_threads() != 0)
		return 1; /* the parent's helpers, counted */
#if !defined(__SANITIZE_THREAD__)
	struct concur_exec_opts o = {.loops = 1};
	concur_exec *c;
	if (concur_exec_new(&c, &o))
		return 2;
	concur_future *f = concur_spawn_blocking(c, return_arg, (void *)31);
	int64_t r = concur_result(f, MS(5000));
	concur_release(f);
	concur_exec_free(c);
	if (r != 31)
		return 3;
#endif
	return 0;
}

static void test_blocking_in_forked_child(void **state)
{
	concur_future *f = concur_spawn_blocking(ex, return_arg, (void *)30);
	assert_int_equal(concur_result(f, -1), 30);
	concur_release(f);
	assert_true(concur_blocking_threads() >= 1); /* an idle helper, in the parent */
	expect_child_ok(blocking_child, 0);
	f = concur_spawn_blocking(ex, return_arg, (void *)32); /* the parent's pool goes on */
	assert_int_equal(concur_result(f, -1), 32);
	concur_release(f);
}

/* A blocking job asking for its own result gets -EDEADLK, as a task does: its future completes
 * only once fn returns (it waited for good, and concur_exec_free after it; the bound turns that
 * into -ETIMEDOUT). */
static int64_t job_awaits_self(void *arg)
{
	concur_future *self = (concur_future *)(intptr_t)concur_result(arg, -1);
	return concur_result(self, MS(200));
}

static void test_job_awaiting_itself(void **state)
{
	concur_future *p = concur_promise_new(ex);
	concur_future *j = concur_spawn_blocking(ex, job_awaits_self, p);
	assert_int_equal(concur_promise_set(p, (int64_t)(intptr_t)j), 0);
	assert_int_equal(concur_result(j, MS(5000)), -EDEADLK); /* -ETIMEDOUT before */
	concur_release(j);
	concur_release(p);
}

/* A blocking job's callbacks run in its helper thread once its future is done: a gather or a
 * wait there over that future is no wait for itself (it gave -EDEADLK). */
static _Atomic int64_t cb_gather = 1, cb_wait = -1;
static void gather_own_done(concur_future *f, void *arg)
{
	int64_t v = 0;
	atomic_store(&cb_gather, concur_gather(&f, 1, 0, &v, NULL) == 0 ? v : -EPROTO);
	atomic_store(&cb_wait, concur_wait(&f, 1, CONCUR_ALL_COMPLETED, MS(10), NULL));
}

static int64_t job_waits_gate(void *arg)
{
	return concur_result(arg, -1);
}

static void test_job_callback_gathers_its_done_future(void **state)
{
	concur_future *gate = concur_promise_new(NULL);
	concur_future *j = concur_spawn_blocking(ex, job_waits_gate, gate);
	assert_int_equal(concur_on_done(j, gather_own_done, NULL), 0);
	assert_int_equal(concur_promise_set(gate, 42), 0);
	assert_int_equal(concur_result(j, MS(5000)), 42);
	assert_int_equal(concur_exec_join(ex, MS(5000)), 0); /* the callback ran: ex's work */
	assert_int_equal(atomic_load(&cb_gather), 42);
	assert_int_equal(atomic_load(&cb_wait), 1);
	concur_release(j);
	concur_release(gate);
}

/*
 * fork() during the first concur_blocking_config(): the config took the pool's lock, then set
 * the pool up, which guards that lock against fork() (and waits for the fork's lock to do so).
 * A fork in between, the lock not guarded yet, left the child's copy held: its first use of the
 * pool hung. A wrap of pthread_once holds the config thread at the set-up while this one forks.
 * First in the list: the pool must not be set up yet.
 */
static _Thread_local bool hold_at_once;
static sem_t at_once, forked;
int __real_pthread_once(pthread_once_t *once, void (*init)(void));
int __wrap_pthread_once(pthread_once_t *once, void (*init)(void))
{
	if (hold_at_once) {
		hold_at_once = false;
		sem_post(&at_once);
		sem_wait(&forked);
	}
	return __real_pthread_once(once, init);
}

static void *configures_pool(void *arg)
{
	hold_at_once = true;
	return (void *)(intptr_t)concur_blocking_config(64, MS(10000));
}

static int pool_usable_child(int unused)
{
	alarm(5);
	return concur_blocking_threads() == 0 ? 0 : 1; /* it hung on the pool's lock */
}

/* concur_blocking_threads() takes no lock: it took the pool's, which before the pool's set-up
 * is not guarded against fork(), so a fork from another thread while it held it left the
 * child's copy held (as above). A wrap of pthread_mutex_lock counts this thread's locks. */
static _Thread_local int locks_taken;
int __real_pthread_mutex_lock(pthread_mutex_t *m);
int __wrap_pthread_mutex_lock(pthread_mutex_t *m)
{
	locks_taken++;
	return __real_pthread_mutex_lock(m);
}

static void test_threads_count_takes_no_lock(void **state)
{
	locks_taken = 0;
	unsigned n = concur_blocking_threads();
	assert_true(n <= 64);
	assert_int_equal(locks_taken, 0); /* 1 before */
}

static void test_fork_during_first_config(void **state)
{
	sem_init(&at_once, 0, 0);
	sem_init(&forked, 0, 0);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, configures_pool, NULL), 0);
	sem_wait(&at_once);
	int status = child_status(pool_usable_child, 0);
	sem_post(&forked);
	void *r;
	pthread_join(th, &r);
	sem_destroy(&at_once);
	sem_destroy(&forked);
	assert_int_equal((intptr_t)r, 0);
	assert_true(status >= 0 && WIFEXITED(status)); /* killed by its alarm before */
	assert_int_equal(WEXITSTATUS(status), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_fork_during_first_config), /* first: see there */
	    cmocka_unit_test(test_threads_count_takes_no_lock),
	    cmocka_unit_test(test_blocking_resumes_fiber_on_its_own_loop),
	    cmocka_unit_test(test_blocking_from_foreign_thread_and_bad_input),
	    cmocka_unit_test(test_blocking_bounded_cancel_and_idle_exit),
	    cmocka_unit_test(test_blocking_idle_helper_taken_once),
	    cmocka_unit_test(test_blocking_counts_for_join),
	    cmocka_unit_test(test_blocking_running_job_cannot_be_cancelled),
	    cmocka_unit_test(test_job_gone_when_join_returns),
	    cmocka_unit_test(test_blocking_job_cannot_join_its_executor),
	    cmocka_unit_test(test_spawn_counted_before_shutdown_check),
	    cmocka_unit_test(test_blocking_cancelled_job_callbacks_are_work),
	    cmocka_unit_test(test_blocking_job_future_no_promise),
	    cmocka_unit_test(test_blocking_shutdown_cancels_queued_jobs),
	    cmocka_unit_test(test_blocking_cancelled_job_leaves_queue),
	    cmocka_unit_test(test_blocking_job_returning_ecanceled),
	    cmocka_unit_test(test_blocking_spawn_racing_cancelling_shutdown),
	    cmocka_unit_test(test_blocking_shutdown_from_another_executors_job),
	    cmocka_unit_test(test_blocking_in_forked_child),
	    cmocka_unit_test(test_job_awaiting_itself),
	    cmocka_unit_test(test_job_callback_gathers_its_done_future),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, setup_ex2, teardown_ex));
}

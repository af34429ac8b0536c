/* SPDX-License-Identifier: MIT */
/* Fiber-aware mutex, semaphore, event and channel: from tasks on 2 loops and foreign threads. */
#include "comp_test.h"

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

/* ---- mutex ---------------------------------------------------------------------------------- */

static void test_mutex_basic(void **state)
{
	concur_mutex *m;
	assert_int_equal(concur_mutex_new(NULL), -EINVAL);
	assert_int_equal(concur_mutex_new(&m), 0);
	assert_int_equal(concur_mutex_unlock(m), -EPERM);
	assert_int_equal(concur_mutex_trylock(m), 0);
	assert_int_equal(concur_mutex_trylock(m), -EBUSY);
	assert_int_equal(concur_mutex_lock(m, 0), -ETIMEDOUT);
	assert_int_equal(concur_mutex_lock(m, MS(10)), -ETIMEDOUT);
	assert_int_equal(concur_mutex_waiters(m), 0); /* the timed-out waiter left the queue */
	assert_int_equal(concur_mutex_unlock(m), 0);
	assert_int_equal(concur_mutex_lock(m, -1), 0);
	assert_int_equal(concur_mutex_unlock(m), 0);
	assert_int_equal(concur_mutex_lock(NULL, -1), -EINVAL);
	concur_mutex_free(m);
}

struct fair {
	concur_mutex *m;
	int order[16];
	atomic_int n;
};

struct fair_arg {
	struct fair *f;
	int id;
};

static int64_t fair_task(void *arg)
{
	struct fair_arg *a = arg;
	if (concur_mutex_lock(a->f->m, -1))
		return -1;
	a->f->order[atomic_fetch_add(&a->f->n, 1)] = a->id;
	concur_sleep(MS(1)); /* hold it across a suspension */
	return concur_mutex_unlock(a->f->m);
}

static void test_mutex_fairness_two_loops(void **state)
{
	/* Waiters queue in a known order (spawned one at a time, round-robin over the 2 loops);
	 * FIFO handoff means they get the mutex in exactly that order, and nobody barges in. */
	enum { K = 12 };
	struct fair f = {0};
	struct fair_arg args[K];
	concur_future *fs[K];
	assert_int_equal(concur_mutex_new(&f.m), 0);
	assert_int_equal(concur_mutex_lock(f.m, -1), 0);
	for (int i = 0; i < K; i++) {
		args[i] = (struct fair_arg){&f, i};
		fs[i] = concur_spawn(ex, fair_task, &args[i]);
		EVENTUALLY(concur_mutex_waiters(f.m) == (size_t)i + 1);
	}
	assert_int_equal(concur_mutex_unlock(f.m), 0);
	assert_int_equal(concur_mutex_trylock(f.m), -EBUSY); /* handed off, not free */
	for (int i = 0; i < K; i++) {
		assert_int_equal(concur_result(fs[i], -1), 0);
		concur_release(fs[i]);
	}
	assert_int_equal(atomic_load(&f.n), K);
	for (int i = 0; i < K; i++)
		assert_int_equal(f.order[i], i);
	concur_mutex_free(f.m);
}

struct counter {
	concur_mutex *m;
	long value;
};

static int64_t count_task(void *arg)
{
	struct counter *c = arg;
	for (int i = 0; i < 200; i++) {
		if (concur_mutex_lock(c->m, -1))
			return -1;
		long v = c->value;
		if (i % 16 == 0)
			concur_yield(); /* let others contend while we hold it */
		c->value = v + 1;
		concur_mutex_unlock(c->m);
	}
	return 0;
}

static void *count_thread(void *arg)
{
	count_task(arg);
	return NULL;
}

static void test_mutex_exclusion_tasks_and_threads(void **state)
{
	struct counter c = {0};
	assert_int_equal(concur_mutex_new(&c.m), 0);
	concur_future *fs[8];
	pthread_t th[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, count_thread, &c);
	for (int i = 0; i < 8; i++)
		fs[i] = concur_spawn(ex, count_task, &c);
	for (int i = 0; i < 8; i++) {
		assert_int_equal(concur_result(fs[i], -1), 0);
		concur_release(fs[i]);
	}
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	assert_int_equal(c.value, 10 * 200);
	concur_mutex_free(c.m);
}

/* ---- semaphore ------------------------------------------------------------------------------ */

struct semtest {
	concur_sem *s;
	atomic_int inside, max_inside;
};

static int64_t sem_task(void *arg)
{
	struct semtest *t = arg;
	if (concur_sem_acquire(t->s, -1))
		return -1;
	int now = atomic_fetch_add(&t->inside, 1) + 1;
	int max = atomic_load(&t->max_inside);
	while (now > max && !atomic_compare_exchange_weak(&t->max_inside, &max, now))
		;
	concur_sleep(MS(2));
	atomic_fetch_sub(&t->inside, 1);
	return concur_sem_release(t->s, 1);
}

static void test_semaphore(void **state)
{
	struct semtest t = {0};
	assert_int_equal(concur_sem_new(&t.s, -1), -EINVAL);
	assert_int_equal(concur_sem_new(&t.s, 3), 0);
	concur_future *fs[30];
	for (int i = 0; i < 30; i++)
		fs[i] = concur_spawn(ex, sem_task, &t);
	for (int i = 0; i < 30; i++) {
		assert_int_equal(concur_result(fs[i], -1), 0);
		concur_release(fs[i]);
	}
	assert_true(atomic_load(&t.max_inside) >= 1 && atomic_load(&t.max_inside) <= 3);
	assert_int_equal(concur_sem_value(t.s), 3);
	for (int i = 0; i < 3; i++)
		assert_int_equal(concur_sem_acquire(t.s, 0), 0);
	assert_int_equal(concur_sem_acquire(t.s, MS(10)), -ETIMEDOUT);
	assert_int_equal(concur_sem_release(t.s, 0), -EINVAL);
	assert_int_equal(concur_sem_release(t.s, INT64_MAX), 0);
	assert_int_equal(concur_sem_release(t.s, 1), -EOVERFLOW);
	concur_sem_free(t.s);
}

/* A release by n wakes up to n waiters however many wait (more than the 16 a wake once took at a
 * time), and what is left of n becomes units only once nobody waits. */
static int64_t acquire_task(void *arg)
{
	return concur_sem_acquire(arg, -1);
}

static int count_done(concur_future **fs, int n)
{
	int k = 0;
	for (int i = 0; i < n; i++)
		k += concur_done(fs[i]);
	return k;
}

static void test_semaphore_release_many(void **state)
{
	enum { K = 40 };
	concur_sem *s;
	assert_int_equal(concur_sem_new(&s, 0), 0);
	concur_future *fs[K];
	for (int i = 0; i < K; i++)
		fs[i] = concur_spawn(ex, acquire_task, s);
	assert_int_equal(concur_wait(fs, K, CONCUR_FIRST_COMPLETED, MS(20), NULL), 0);
	assert_int_equal(concur_sem_release(s, 25), 0);
	EVENTUALLY(count_done(fs, K) == 25);
	assert_int_equal(concur_sem_value(s), 0);
	assert_int_equal(concur_sem_release(s, 20), 0);
	for (int i = 0; i < K; i++) {
		assert_int_equal(concur_result(fs[i], -1), 0);
		concur_release(fs[i]);
	}
	assert_int_equal(concur_sem_value(s), 5);
	concur_sem_free(s);
}

/* ---- event ---------------------------------------------------------------------------------- */

static int64_t event_task(void *arg)
{
	return concur_event_wait(arg, -1) == 0 ? 1 : -1;
}

static void test_event(void **state)
{
	concur_event *e;
	assert_int_equal(concur_event_new(&e), 0);
	assert_false(concur_event_is_set(e));
	assert_int_equal(concur_event_wait(e, MS(10)), -ETIMEDOUT);
	concur_future *fs[10];
	for (int i = 0; i < 10; i++)
		fs[i] = concur_spawn(ex, event_task, e);
	assert_int_equal(concur_wait(fs, 10, CONCUR_FIRST_COMPLETED, MS(20), NULL), 0);
	assert_int_equal(concur_event_set(e), 0);
	assert_true(concur_event_is_set(e));
	for (int i = 0; i < 10; i++) {
		assert_int_equal(concur_result(fs[i], -1), 1);
		concur_release(fs[i]);
	}
	assert_int_equal(concur_event_wait(e, 0), 0);
	assert_int_equal(concur_event_clear(e), 0);
	assert_int_equal(concur_event_wait(e, 0), -ETIMEDOUT);
	concur_event_free(e);
}

/* ---- channel -------------------------------------------------------------------------------- */

static void test_chan_basic(void **state)
{
	concur_chan *c;
	int64_t v;
	assert_int_equal(concur_chan_new(&c, 0), -EINVAL);
	assert_int_equal(concur_chan_new(&c, 2), 0);
	assert_int_equal(concur_chan_recv(c, &v, 0), -ETIMEDOUT);
	assert_int_equal(concur_chan_send(c, 1, 0), 0);
	assert_int_equal(concur_chan_send(c, 2, 0), 0);
	assert_int_equal(concur_chan_send(c, 3, MS(10)), -ETIMEDOUT); /* full */
	assert_int_equal(concur_chan_len(c), 2);
	assert_int_equal(concur_chan_close(c), 0);
	assert_int_equal(concur_chan_close(c), -EALREADY);
	assert_int_equal(concur_chan_send(c, 4, -1), -EPIPE);
	/* items sent before close are still received, then it says closed */
	assert_int_equal(concur_chan_recv(c, &v, -1), 0);
	assert_int_equal(v, 1);
	assert_int_equal(concur_chan_recv(c, &v, -1), 0);
	assert_int_equal(v, 2);
	assert_int_equal(concur_chan_recv(c, &v, -1), -EPIPE);
	assert_int_equal(concur_chan_recv(c, NULL, -1), -EINVAL);
	concur_chan_free(c);
}

static int64_t recv_task(void *arg)
{
	int64_t v;
	return concur_chan_recv(arg, &v, -1);
}

static void *recv_thread(void *arg)
{
	int64_t v;
	return (void *)(intptr_t)concur_chan_recv(arg, &v, -1);
}

static void test_chan_close_wakes_all_receivers(void **state)
{
	concur_chan *c;
	assert_int_equal(concur_chan_new(&c, 4), 0);
	concur_future *fs[10];
	for (int i = 0; i < 10; i++)
		fs[i] = concur_spawn(ex, recv_task, c);
	pthread_t th[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, recv_thread, c);
	assert_int_equal(concur_wait(fs, 10, CONCUR_FIRST_COMPLETED, MS(30), NULL), 0);
	assert_int_equal(concur_chan_close(c), 0);
	for (int i = 0; i < 10; i++) {
		assert_int_equal(concur_result(fs[i], -1), -EPIPE);
		concur_release(fs[i]);
	}
	for (int i = 0; i < 2; i++) {
		void *r;
		pthread_join(th[i], &r);
		assert_int_equal((intptr_t)r, -EPIPE);
	}
	concur_chan_free(c);
}

enum { ITEMS = 2000 };

struct mpmc {
	concur_chan *c;
	atomic_llong sum;
	atomic_int received;
};

static int64_t producer(void *arg)
{
	struct mpmc *m = arg;
	for (int i = 1; i <= ITEMS; i++)
		if (concur_chan_send(m->c, i, -1))
			return -1;
	return 0;
}

static int64_t consumer(void *arg)
{
	struct mpmc *m = arg;
	int64_t v;
	int r;
	while ((r = concur_chan_recv(m->c, &v, -1)) == 0) {
		atomic_fetch_add(&m->sum, v);
		atomic_fetch_add(&m->received, 1);
	}
	return r == -EPIPE ? 0 : r;
}

static void *producer_thread(void *arg)
{
	return (void *)(intptr_t)producer(arg);
}

static void test_chan_mpmc_tasks_and_threads(void **state)
{
	struct mpmc m = {0};
	assert_int_equal(concur_chan_new(&m.c, 8), 0);
	concur_future *prod[3], *cons[3];
	for (int i = 0; i < 3; i++) {
		prod[i] = concur_spawn(ex, producer, &m);
		cons[i] = concur_spawn(ex, consumer, &m);
	}
	pthread_t th;
	pthread_create(&th, NULL, producer_thread, &m);
	assert_int_equal(concur_gather(prod, 3, -1, NULL, NULL), 0);
	void *r;
	pthread_join(th, &r);
	assert_null(r);
	assert_int_equal(concur_chan_close(m.c), 0);
	assert_int_equal(concur_gather(cons, 3, -1, NULL, NULL), 0);
	assert_int_equal(atomic_load(&m.received), 4 * ITEMS);
	assert_int_equal(atomic_load(&m.sum), 4ll * ITEMS * (ITEMS + 1) / 2);
	for (int i = 0; i < 3; i++) {
		concur_release(prod[i]);
		concur_release(cons[i]);
	}
	concur_chan_free(m.c);
}

static int64_t fifo_consumer(void *arg)
{
	int64_t v, expect = 0;
	while (concur_chan_recv(arg, &v, -1) == 0)
		if (v != expect++)
			return -1;
	return expect;
}

static void test_chan_order_single_producer(void **state)
{
	concur_chan *c;
	assert_int_equal(concur_chan_new(&c, 1), 0);
	concur_future *f = concur_spawn(ex, fifo_consumer, c);
	for (int i = 0; i < 1000; i++)
		assert_int_equal(concur_chan_send(c, i, -1), 0);
	concur_chan_close(c);
	assert_int_equal(concur_result(f, -1), 1000);
	concur_release(f);
	concur_chan_free(c);
}

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1 /* bulk counts shrink; LeakSanitizer checks leaks there */
#define BULK(n)   ((n) / 10)
#else
#define SANITIZED 0
#define BULK(n)   (n)
#endif

/* Live heap bytes, all arenas (glibc). Sanitized builds check leaks with their own tools. */
static long live_heap(void)
{
	struct mallinfo2 mi = mallinfo2();
	return (long)mi.uordblks;
}

/* Defect 3: every timed-out wait of a task gives back what it took. */
struct timeouts {
	concur_chan *full, *empty;
	concur_mutex *m;
	concur_sem *s;
	concur_event *e;
	long n;
};

static int64_t time_out_everywhere(void *arg)
{
	struct timeouts *t = arg;
	int64_t v;
	for (long i = 0; i < t->n; i++)
		if (concur_chan_recv(t->empty, &v, 1000) != -ETIMEDOUT)
			return -1;
	for (long i = 0; i < t->n / 8; i++) {
		if (concur_chan_send(t->full, 1, 1000) != -ETIMEDOUT ||
		    concur_mutex_lock(t->m, 1000) != -ETIMEDOUT ||
		    concur_sem_acquire(t->s, 1000) != -ETIMEDOUT ||
		    concur_event_wait(t->e, 1000) != -ETIMEDOUT)
			return -2;
	}
	return 0;
}

static void test_timed_out_waits_leave_nothing(void **state)
{
	struct timeouts t = {.n = 500};
	assert_int_equal(concur_chan_new(&t.full, 1), 0);
	assert_int_equal(concur_chan_new(&t.empty, 1), 0);
	assert_int_equal(concur_chan_send(t.full, 0, 0), 0);
	assert_int_equal(concur_mutex_new(&t.m), 0);
	assert_int_equal(concur_mutex_lock(t.m, 0), 0);
	assert_int_equal(concur_sem_new(&t.s, 0), 0);
	assert_int_equal(concur_event_new(&t.e), 0);
	concur_future *f = concur_spawn(ex, time_out_everywhere, &t);
	assert_int_equal(concur_result(f, -1), 0); /* warm the caches */
	concur_release(f);
	long before = live_heap();
	t.n = BULK(20000);
	f = concur_spawn(ex, time_out_everywhere, &t);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(concur_exec_join(ex, -1), 0);
	if (!SANITIZED) /* ~96 bytes a timeout before the fix: 2.4 MB */
		assert_true(live_heap() - before < 256 * 1024);
	assert_int_equal(concur_mutex_waiters(t.m), 0);
	concur_chan_free(t.full);
	concur_chan_free(t.empty);
	concur_mutex_free(t.m);
	concur_sem_free(t.s);
	concur_event_free(t.e);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_mutex_basic),
	    cmocka_unit_test(test_mutex_fairness_two_loops),
	    cmocka_unit_test(test_mutex_exclusion_tasks_and_threads),
	    cmocka_unit_test(test_semaphore),
	    cmocka_unit_test(test_semaphore_release_many),
	    cmocka_unit_test(test_event),
	    cmocka_unit_test(test_chan_basic),
	    cmocka_unit_test(test_chan_close_wakes_all_receivers),
	    cmocka_unit_test(test_chan_mpmc_tasks_and_threads),
	    cmocka_unit_test(test_chan_order_single_producer),
	    cmocka_unit_test(test_timed_out_waits_leave_nothing),
	};
	return TESTS_EXIT(cmocka_run_group_tests(tests, setup_ex2, teardown_ex));
}

/* SPDX-License-Identifier: MIT */
/*
 * spawn: the cost of a task, from spawn to its result.
 *   concur_one:  inside a task (1 loop), spawn a trivial task, concur_result() it, repeat n times.
 *   concur_bulk: one task spawns n trivial tasks (fire and forget), then concur_exec_join()
 *                from main; loops = -l (0 = CPUs).
 *   concur_foreign: main, a thread outside the executor, spawns n trivial tasks in a burst,
 *                keeping each future, then takes each result (concur_result) and releases it:
 *                pool_bulk's work, through concur; loops = -l (0 = CPUs).
 *   bare_one / bare_bulk: the floor: a malloc'ed record, a stack from a pool of mmap()ed stacks,
 *                bare_switch into it, run to completion, switch back (one thread, no scheduler).
 *   pool_one / pool_bulk: the concurrent.futures design: submit() allocates a future with its own
 *                mutex + condvar and queues a work item on a mutex + condvar queue; -l workers
 *                (0 = CPUs) run them; result() waits on the future's condvar.
 * Unit: ns per task (elapsed / n).
 */
#include "bare_ctx.h"
#include "common.h"

#include <pthread.h>
#include <stdbool.h>
#include <sys/resource.h>

#define VARIANTS "concur_one|concur_bulk|concur_foreign|bare_one|bare_bulk|pool_one|pool_bulk"

static long iters;

static int64_t trivial(void *arg)
{
	return (int64_t)(intptr_t)arg & 1;
}

static long maxrss_kb(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_maxrss;
}

static void emit(double ns, long loops, const concur_exec *ex, const struct concur_stats *before)
{
	char params[160];
	snprintf(params, sizeof(params), "\"n\": %ld, \"loops\": %ld, \"maxrss_kb\": %ld", iters,
	         loops, maxrss_kb());
	bench_begin(ns / (double)iters, "ns/task", "lower", params);
	if (ex)
		bench_stats_concur(ex, before);
	bench_end();
}

/* ---- concur --------------------------------------------------------------------------------- */

static concur_exec *ex;

static int64_t one_parent(void *arg)
{
	int64_t sum = 0, t0 = bench_now_ns();
	for (long i = 0; i < iters; i++) {
		concur_future *f = concur_spawn(ex, trivial, (void *)(intptr_t)i);
		int64_t r = concur_result(f, -1);
		concur_release(f);
		if (r < 0)
			return r;
		sum += r;
	}
	bench_sink(sum);
	return bench_now_ns() - t0;
}

static int64_t bulk_parent(void *arg)
{
	for (long i = 0; i < iters; i++) {
		concur_future *f = concur_spawn(ex, trivial, (void *)(intptr_t)i);
		int64_t r = concur_done(f) ? concur_result(f, 0) : 0; /* a failed spawn is done */
		concur_release(f);
		if (r < 0)
			return r;
	}
	return 0;
}

static void run_concur(bool bulk, long loops)
{
	ex = bench_exec(bulk ? loops : 1, 0);
	struct concur_stats before;
	concur_exec_stats(ex, &before);
	int64_t t0 = bench_now_ns();
	concur_future *p = concur_spawn(ex, bulk ? bulk_parent : one_parent, NULL);
	int64_t r = concur_result(p, -1);
	concur_release(p);
	if (r < 0)
		bench_die("spawn parent: %s", concur_strerror(r));
	if (bulk) {
		int rc = concur_exec_join(ex, -1);
		if (rc < 0)
			bench_die("join: %s", concur_strerror(rc));
		r = bench_now_ns() - t0;
	}
	emit((double)r, bulk ? concur_exec_loops(ex) : 1, ex, &before);
	concur_exec_free(ex);
}

static void run_concur_foreign(long loops)
{
	ex = bench_exec(loops, 0);
	concur_future **fs = malloc((size_t)iters * sizeof(*fs));
	if (!fs)
		bench_die("out of memory");
	struct concur_stats before;
	concur_exec_stats(ex, &before);
	int64_t sum = 0, t0 = bench_now_ns();
	for (long i = 0; i < iters; i++)
		fs[i] = concur_spawn(ex, trivial, (void *)(intptr_t)i);
	for (long i = 0; i < iters; i++) {
		int64_t r = concur_result(fs[i], -1);
		concur_release(fs[i]);
		if (r < 0)
			bench_die("spawn: %s", concur_strerror(r));
		sum += r;
	}
	int64_t t1 = bench_now_ns();
	bench_sink(sum);
	free(fs);
	emit((double)(t1 - t0), concur_exec_loops(ex), ex, &before);
	concur_exec_free(ex);
}

/* ---- bare pooled-stack spawn ---------------------------------------------------------------- */

struct btask {
	concur_task_fn fn;
	void *arg;
	int64_t res;
	struct btask *next;
};

static struct bare_stack_pool pool;
static struct bare_ctx sched_ctx, task_ctx;

static void btask_entry(void *arg)
{
	struct btask *t = arg;
	t->res = t->fn(t->arg);
	bare_switch(&task_ctx, &sched_ctx);
}

static struct btask *bspawn(concur_task_fn fn, void *arg)
{
	struct btask *t = malloc(sizeof(*t));
	if (!t)
		bench_die("out of memory");
	t->fn = fn;
	t->arg = arg;
	t->next = NULL;
	return t;
}

static void brun(struct btask *t)
{
	void *stack = bare_pool_get(&pool);
	bare_ctx_make(&task_ctx, stack, pool.size, btask_entry, t);
	bare_switch(&sched_ctx, &task_ctx);
	bare_pool_put(&pool, stack);
}

static void run_bare(bool bulk)
{
	bare_pool_init(&pool, 64 * 1024);
	int64_t sum = 0, t0 = bench_now_ns();
	if (!bulk) {
		for (long i = 0; i < iters; i++) {
			struct btask *t = bspawn(trivial, (void *)(intptr_t)i);
			brun(t);
			sum += t->res;
			free(t);
		}
	} else {
		struct btask *head = NULL, **tail = &head;
		for (long i = 0; i < iters; i++) {
			*tail = bspawn(trivial, (void *)(intptr_t)i);
			tail = &(*tail)->next;
		}
		while (head) {
			struct btask *t = head;
			head = t->next;
			brun(t);
			sum += t->res;
			free(t);
		}
	}
	int64_t t1 = bench_now_ns();
	bench_sink(sum);
	emit((double)(t1 - t0), 1, NULL, NULL);
	bare_pool_destroy(&pool);
}

/* ---- mutex + condvar thread pool (concurrent.futures) --------------------------------------- */

struct pfuture {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool done;
	int64_t res;
	concur_task_fn fn;
	void *arg;
	struct pfuture *next;
};

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct pfuture *head, **tail;
	bool stop;
} q = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, &q.head, false};

static void *pool_worker(void *arg)
{
	for (;;) {
		pthread_mutex_lock(&q.mu);
		while (!q.head && !q.stop)
			pthread_cond_wait(&q.cv, &q.mu);
		struct pfuture *f = q.head;
		if (!f) {
			pthread_mutex_unlock(&q.mu);
			return NULL;
		}
		q.head = f->next;
		if (!q.head)
			q.tail = &q.head;
		pthread_mutex_unlock(&q.mu);
		int64_t r = f->fn(f->arg);
		pthread_mutex_lock(&f->mu);
		f->res = r;
		f->done = true;
		pthread_cond_broadcast(&f->cv);
		pthread_mutex_unlock(&f->mu);
	}
}

static struct pfuture *pool_submit(concur_task_fn fn, void *arg)
{
	struct pfuture *f = malloc(sizeof(*f));
	if (!f)
		bench_die("out of memory");
	pthread_mutex_init(&f->mu, NULL);
	pthread_cond_init(&f->cv, NULL);
	f->done = false;
	f->fn = fn;
	f->arg = arg;
	f->next = NULL;
	pthread_mutex_lock(&q.mu);
	*q.tail = f;
	q.tail = &f->next;
	pthread_cond_signal(&q.cv);
	pthread_mutex_unlock(&q.mu);
	return f;
}

static int64_t pool_result(struct pfuture *f)
{
	pthread_mutex_lock(&f->mu);
	while (!f->done)
		pthread_cond_wait(&f->cv, &f->mu);
	int64_t r = f->res;
	pthread_mutex_unlock(&f->mu);
	pthread_mutex_destroy(&f->mu);
	pthread_cond_destroy(&f->cv);
	free(f);
	return r;
}

static void run_pool(bool bulk, long workers)
{
	pthread_t *th = calloc((size_t)workers, sizeof(*th));
	for (long i = 0; i < workers; i++)
		if (pthread_create(&th[i], NULL, pool_worker, NULL))
			bench_die("pthread_create failed");
	int64_t sum = 0, t0 = bench_now_ns();
	if (!bulk) {
		for (long i = 0; i < iters; i++)
			sum += pool_result(pool_submit(trivial, (void *)(intptr_t)i));
	} else {
		struct pfuture **fs = malloc((size_t)iters * sizeof(*fs));
		if (!fs)
			bench_die("out of memory");
		for (long i = 0; i < iters; i++)
			fs[i] = pool_submit(trivial, (void *)(intptr_t)i);
		for (long i = 0; i < iters; i++)
			sum += pool_result(fs[i]);
		free(fs);
	}
	int64_t t1 = bench_now_ns();
	bench_sink(sum);
	pthread_mutex_lock(&q.mu);
	q.stop = true;
	pthread_cond_broadcast(&q.cv);
	pthread_mutex_unlock(&q.mu);
	for (long i = 0; i < workers; i++)
		pthread_join(th[i], NULL);
	free(th);
	emit((double)(t1 - t0), workers, NULL, NULL);
}

int main(int argc, char **argv)
{
	struct bench_args a = bench_parse(argc, argv, VARIANTS);
	long loops = a.loops ? a.loops : bench_cpus();
	const char *v = a.variant;
	bool bulk = strstr(v, "_bulk") != NULL || !strcmp(v, "concur_foreign");
	iters = a.n ? a.n : (bulk ? 1000000 : 200000);
	if (!strcmp(v, "concur_foreign"))
		run_concur_foreign(loops);
	else if (!strncmp(v, "concur_", 7))
		run_concur(bulk, loops);
	else if (!strncmp(v, "bare_", 5))
		run_bare(bulk);
	else if (!strncmp(v, "pool_", 5))
		run_pool(bulk, loops);
	else
		bench_usage(argv[0], VARIANTS);
	return 0;
}

/* SPDX-License-Identifier: MIT */
/*
 * pipeline: n items (10^5) through 3 stages A -> B -> C, each a small computation.
 *   unwrapped:    per item, A is spawned, B = concur_then(A), C = concur_then(B); the C futures
 *                 are gathered. No glue code, no thread or stack held while a stage waits.
 *   condvar_pool: the same continuation passing through a classic thread pool (one thread per
 *                 CPU, a mutex + condvar job queue): a finished stage enqueues the next one.
 * Unit: ns per item through all 3 stages.
 */
#include "comp_bench.h"

#include <pthread.h>
#include <unistd.h>

#define VARIANTS "unwrapped|condvar_pool"

static int64_t stage(int k, int64_t v)
{
	return k == 0 ? v * 3 : k == 1 ? v + 7 : v ^ 0x55;
}

static int64_t stage_a(void *arg)
{
	return stage(0, (intptr_t)arg);
}

static int64_t stage_b(void *arg, int64_t v)
{
	return stage(1, v);
}

static int64_t stage_c(void *arg, int64_t v)
{
	return stage(2, v);
}

static void run_unwrapped(long n)
{
	concur_exec *ex = comp_exec(0);
	concur_future **cs = calloc((size_t)n, sizeof(*cs));
	int64_t *vals = calloc((size_t)n, sizeof(*vals));
	if (!cs || !vals)
		comp_die("calloc", -ENOMEM);
	struct concur_stats before = comp_stats(ex);
	int64_t t0 = comp_now_ns();
	for (long i = 0; i < n; i++) {
		concur_future *a = concur_spawn(ex, stage_a, (void *)(intptr_t)i);
		concur_future *b = concur_then(a, stage_b, NULL);
		cs[i] = concur_then(b, stage_c, NULL);
		concur_release(a);
		concur_release(b);
	}
	int64_t r = concur_gather(cs, (size_t)n, -1, vals, NULL);
	int64_t ns = comp_now_ns() - t0;
	if (r < 0)
		comp_die("concur_gather", r);
	for (long i = 0; i < n; i++) {
		if (vals[i] != stage(2, stage(1, stage(0, i))))
			comp_die("pipeline: wrong value", -EPROTO);
		concur_release(cs[i]);
	}
	comp_emit(ns, n, "unwrapped", concur_exec_loops(ex), ex, &before);
	free(cs);
	free(vals);
	concur_exec_free(ex);
}

/* The peer: a thread pool whose jobs are (stage, value, item). */
struct job {
	struct job *next;
	int k;
	int64_t v;
	long i;
};

static struct {
	pthread_mutex_t lock;
	pthread_cond_t work, done;
	struct job *head, *tail;
	long remaining;
	int stop;
	int64_t *out;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER,
          .work = PTHREAD_COND_INITIALIZER,
          .done = PTHREAD_COND_INITIALIZER};

static void pool_push(struct job *j)
{
	pthread_mutex_lock(&pool.lock);
	j->next = NULL;
	if (pool.tail)
		pool.tail->next = j;
	else
		pool.head = j;
	pool.tail = j;
	pthread_cond_signal(&pool.work);
	pthread_mutex_unlock(&pool.lock);
}

static void *pool_worker(void *arg)
{
	for (;;) {
		pthread_mutex_lock(&pool.lock);
		while (!pool.head && !pool.stop)
			pthread_cond_wait(&pool.work, &pool.lock);
		struct job *j = pool.head;
		if (!j) {
			pthread_mutex_unlock(&pool.lock);
			return NULL;
		}
		pool.head = j->next;
		if (!pool.head)
			pool.tail = NULL;
		pthread_mutex_unlock(&pool.lock);
		j->v = stage(j->k, j->v);
		if (++j->k < 3) {
			pool_push(j); /* the next stage */
			continue;
		}
		pool.out[j->i] = j->v;
		free(j);
		pthread_mutex_lock(&pool.lock);
		if (--pool.remaining == 0)
			pthread_cond_signal(&pool.done);
		pthread_mutex_unlock(&pool.lock);
	}
}

static void run_condvar_pool(long n)
{
	long nt = bench_cpus();
	pthread_t *th = calloc((size_t)nt, sizeof(*th));
	pool.out = calloc((size_t)n, sizeof(*pool.out));
	if (!th || !pool.out)
		comp_die("calloc", -ENOMEM);
	pool.remaining = n;
	int64_t t0 = comp_now_ns();
	for (long t = 0; t < nt; t++)
		pthread_create(&th[t], NULL, pool_worker, NULL);
	for (long i = 0; i < n; i++) {
		struct job *j = malloc(sizeof(*j));
		if (!j)
			comp_die("malloc", -ENOMEM);
		*j = (struct job){.k = 0, .v = i, .i = i};
		pool_push(j);
	}
	pthread_mutex_lock(&pool.lock);
	while (pool.remaining)
		pthread_cond_wait(&pool.done, &pool.lock);
	pool.stop = 1;
	pthread_cond_broadcast(&pool.work);
	pthread_mutex_unlock(&pool.lock);
	int64_t ns = comp_now_ns() - t0;
	for (long t = 0; t < nt; t++)
		pthread_join(th[t], NULL);
	for (long i = 0; i < n; i++)
		if (pool.out[i] != stage(2, stage(1, stage(0, i))))
			comp_die("pipeline: wrong value", -EPROTO);
	free(th);
	free(pool.out);
	comp_emit(ns, n, "condvar_pool", (int)nt, NULL, NULL);
}

int main(int argc, char **argv)
{
	struct comp_args a = comp_parse(argc, argv, VARIANTS);
	long n = a.n ? a.n : a.quick ? 10000 : 100000;
	if (!strcmp(a.variant, "unwrapped"))
		run_unwrapped(n);
	else
		run_condvar_pool(n);
	return 0;
}

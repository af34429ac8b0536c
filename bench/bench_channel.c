/* SPDX-License-Identifier: MIT */
/*
 * channel: ping-pong of one item between two parties through two capacity-1 channels.
 *   same_loop:  two tasks on a 1-loop executor (concur_chan);
 *   cross_loop: two tasks on different loops of a 2-loop executor (concur_chan);
 *   condvar:    two threads through a mutex + condvar queue of capacity 1 (the peer).
 * Unit: ns per round trip.
 */
#include "comp_bench.h"

#include <pthread.h>

#define VARIANTS "same_loop|cross_loop|condvar"

static long iters;
static concur_chan *ping, *pong;

static int64_t pinger(void *arg)
{
	int64_t v;
	for (long i = 0; i < iters; i++) {
		if (concur_chan_send(ping, i, -1) || concur_chan_recv(pong, &v, -1) || v != i)
			return -EPROTO;
	}
	return 0;
}

static int64_t ponger(void *arg)
{
	int64_t v;
	for (long i = 0; i < iters; i++) {
		if (concur_chan_recv(ping, &v, -1) || concur_chan_send(pong, v, -1))
			return -EPROTO;
	}
	return 0;
}

static void run_chan(unsigned loops, const char *variant)
{
	concur_exec *ex = comp_exec(loops);
	if (concur_chan_new(&ping, 1) || concur_chan_new(&pong, 1))
		comp_die("concur_chan_new", -ENOMEM);
	struct concur_stats before = comp_stats(ex);
	int64_t t0 = comp_now_ns();
	/* spawned from outside: round-robin, so with 2 loops each task gets its own loop */
	concur_future *b = concur_spawn(ex, ponger, NULL);
	concur_future *a = concur_spawn(ex, pinger, NULL);
	int64_t ra = concur_result(a, -1), rb = concur_result(b, -1);
	int64_t ns = comp_now_ns() - t0;
	if (ra < 0 || rb < 0)
		comp_die("ping-pong", ra < 0 ? ra : rb);
	comp_emit(ns, iters, variant, (int)loops, ex, &before);
	concur_release(a);
	concur_release(b);
	concur_chan_free(ping);
	concur_chan_free(pong);
	concur_exec_free(ex);
}

/* The peer: a capacity-1 queue guarded by a mutex and two condvars. */
struct cvq {
	pthread_mutex_t lock;
	pthread_cond_t not_empty, not_full;
	int full;
	long item;
};

static struct cvq q1 = {.lock = PTHREAD_MUTEX_INITIALIZER,
                        .not_empty = PTHREAD_COND_INITIALIZER,
                        .not_full = PTHREAD_COND_INITIALIZER},
                  q2 = {.lock = PTHREAD_MUTEX_INITIALIZER,
                        .not_empty = PTHREAD_COND_INITIALIZER,
                        .not_full = PTHREAD_COND_INITIALIZER};

static void cvq_send(struct cvq *q, long v)
{
	pthread_mutex_lock(&q->lock);
	while (q->full)
		pthread_cond_wait(&q->not_full, &q->lock);
	q->item = v;
	q->full = 1;
	pthread_cond_signal(&q->not_empty);
	pthread_mutex_unlock(&q->lock);
}

static long cvq_recv(struct cvq *q)
{
	pthread_mutex_lock(&q->lock);
	while (!q->full)
		pthread_cond_wait(&q->not_empty, &q->lock);
	long v = q->item;
	q->full = 0;
	pthread_cond_signal(&q->not_full);
	pthread_mutex_unlock(&q->lock);
	return v;
}

static void *cv_ponger(void *arg)
{
	for (long i = 0; i < iters; i++)
		cvq_send(&q2, cvq_recv(&q1));
	return NULL;
}

static void run_condvar(void)
{
	pthread_t t;
	int64_t t0 = comp_now_ns();
	pthread_create(&t, NULL, cv_ponger, NULL);
	for (long i = 0; i < iters; i++) {
		cvq_send(&q1, i);
		if (cvq_recv(&q2) != i)
			comp_die("condvar ping-pong", -EPROTO);
	}
	pthread_join(t, NULL);
	comp_emit(comp_now_ns() - t0, iters, "condvar", 2, NULL, NULL);
}

int main(int argc, char **argv)
{
	struct comp_args a = comp_parse(argc, argv, VARIANTS);
	iters = a.n ? a.n : a.quick ? 20000 : 200000;
	if (!strcmp(a.variant, "same_loop"))
		run_chan(1, a.variant);
	else if (!strcmp(a.variant, "cross_loop"))
		run_chan(2, a.variant);
	else
		run_condvar();
	return 0;
}

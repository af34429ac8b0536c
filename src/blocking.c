/* SPDX-License-Identifier: MIT */
/*
 * The blocking pool: process-wide helper threads for blocking syscalls and long CPU work.
 *
 * Helpers are ordinary threads, not loops, so they wait for jobs on a condition variable (the
 * loops never touch it). A job's future is of its own class (no promise its caller could set),
 * and is its executor's counted work while queued (CONCUR__QUEUED_WORK). The helper that
 * picks a job claims it (PENDING -> RUNNING, as a task starting) before calling fn, so a cancel
 * either wins before that (fn never runs) or finds it RUNNING and is too late (0): never both
 * "cancelled" and run. A cancel that wins takes the job out of the queue at once (the class's
 * dequeue hook): it is no work of its executor from then on, however long the queue. When fn
 * returns the helper completes it through the one completion path, which wakes a blocked thread
 * with a futex and posts an awaiting fiber back to its own loop (inbox + MSG_RING doorbell). Each
 * job counts as the executor's work from spawn to completion, so concur_exec_join() waits for it.
 */
#include "wait.h"

#include <stdlib.h>
#include <time.h>

#define POOL_DEFAULT_MAX  64
#define POOL_MAX_MAX      4096
#define POOL_DEFAULT_IDLE (10 * 1000000000ll)

/* A job and its future in one allocation: a cancel finds the job from the future. The memory
 * goes with the future's last reference; the job holds one until it is over. */
struct job {
	concur_future out;       /* first: the future is the allocation */
	struct job *next, *prev; /* in the queue, while queued */
	bool queued;             /* under the pool's lock */
	concur_exec *ex;
	concur_task_fn fn;
	void *arg;
};

static struct {
	pthread_once_t once;
	pthread_mutex_t lock;
	pthread_cond_t cond; /* CLOCK_MONOTONIC */
	struct job *head, *tail;
	/* idle: helpers waiting for a job; woken: of those, signalled for one and not up yet (a
	 * spawn counts only the others as free, or jobs spawned back to back would all be handed
	 * to one helper and queue behind each other while the pool may still grow) */
	unsigned idle, woken, max;
	/* helpers alive; written under the lock, read without it by concur_blocking_threads */
	_Atomic unsigned threads;
	int64_t idle_ns;
} pool = {
    .once = PTHREAD_ONCE_INIT,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .max = POOL_DEFAULT_MAX,
    .idle_ns = POOL_DEFAULT_IDLE,
};

static void blocking_cancel_queued(concur_exec *ex);

/* The queue, FIFO, doubly linked so a cancelled job leaves it at once. Under the pool's lock. */
static void blocking_queue_push(struct job *j)
{
	j->next = NULL;
	j->prev = pool.tail;
	if (pool.tail)
		pool.tail->next = j;
	else
		pool.head = j;
	pool.tail = j;
	j->queued = true;
}

static void blocking_queue_unlink(struct job *j)
{
	if (j->prev)
		j->prev->next = j->next;
	else
		pool.head = j->next;
	if (j->next)
		j->next->prev = j->prev;
	else
		pool.tail = j->prev;
	j->next = j->prev = NULL;
	j->queued = false;
}

static void blocking_cond_init(void)
{
	pthread_condattr_t attr;
	pthread_condattr_init(&attr);
	pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
	pthread_cond_init(&pool.cond, &attr);
	pthread_condattr_destroy(&attr);
}

/*
 * fork(): the child has none of the helpers, yet its copy of the pool counted them, so its jobs
 * were queued for helpers it did not have, for good. The child's pool starts empty: its first
 * job starts a helper of its own. The jobs queued are for the parent's executors, which the
 * child cannot use: left to the parent. The lock is held across the fork (concur__fork_guard),
 * so the child's copy is whole; its condition variable is made again (its waiters are not there).
 */
static void blocking_forked(void)
{
	pool.head = pool.tail = NULL;
	atomic_store_explicit(&pool.threads, 0, memory_order_relaxed);
	pool.idle = pool.woken = 0;
	blocking_cond_init();
}

static void blocking_pool_init(void)
{
	blocking_cond_init();
	concur__fork_guard(&pool.lock, blocking_forked);
	atomic_store_explicit(&concur__cancel_queued_jobs, blocking_cancel_queued,
	                      memory_order_release);
}

/* The job is over (run, or never to run): it no longer counts as work. The work ends last: a
 * join may return the moment it does, and nothing of the job may outlive that. */
static void blocking_job_free(struct job *j)
{
	concur_exec *ex = j->ex;
	concur_release(&j->out);
	concur__work_end(ex);
}

static void blocking_job_destroy(concur_future *f)
{
	free((struct job *)f);
}

/* concur_cancel() won while the job was queued: out of the queue now, unless a helper or a
 * shutdown's sweep took it first (they find it CANCELLED, and end it). */
static void blocking_job_dequeue(concur_future *f)
{
	struct job *j = (struct job *)f;
	pthread_mutex_lock(&pool.lock);
	bool mine = j->queued;
	if (mine)
		blocking_queue_unlink(j);
	pthread_mutex_unlock(&pool.lock);
	if (mine)
		blocking_job_free(j);
}

/* A job's future: a promise only its helper completes, so concur_promise_set() refuses it
 * (-EINVAL), as it does a task's future. */
static const struct concur__future_class blocking_job_class = {
    .name = "blocking job",
    .cancel_running = NULL,
    .destroy = blocking_job_destroy,
    .dequeue = blocking_job_dequeue,
};

/* shutdown(ex, true), or a stop past its drain: a job not started never runs, as an unstarted
 * task of ex: it ends CANCELLED (unless a cancel won, see blocking_job_run). */
static void blocking_job_end_unrun(struct job *j)
{
	if (concur__future_claim_unrun(&j->out))
		concur__complete(&j->out, -ECANCELED, CONCUR__CANCELLED);
	else
		concur__future_wait_final(&j->out);
}

static void blocking_job_run(struct job *j)
{
	/* A job cancelled while queued never runs (its future is CANCELLED already). While it
	 * and its future's callbacks run, this thread's work is ex's: no join or free of ex here.
	 */
	concur__tl_job_ex = j->ex;
	concur__tl_job_f = &j->out;
	if (CONCUR__UNLIKELY(atomic_load_explicit(&j->ex->cancel_pending, memory_order_relaxed))) {
		blocking_job_end_unrun(j);
	} else if (concur__future_claim(&j->out)) {
		int64_t r = j->fn(j->arg); /* -ECANCELED ends it CANCELLED, as a task's */
		concur__complete(&j->out, r,
		                 r == -ECANCELED ? CONCUR__CANCELLED : CONCUR__FINISHED);
	} else { /* a cancel won: it counts its callbacks as ex's work before the state is final,
		  * so the job's end below cannot let a join return (and ex go) under that count */
		concur__future_wait_final(&j->out);
	}
	concur__tl_job_ex = NULL;
	concur__tl_job_f = NULL;
	blocking_job_free(j);
}

/* concur_exec_shutdown(ex, true): the jobs of ex no helper has picked yet end CANCELLED now, in
 * the calling thread, rather than when a helper reaches them, which may be long after. Their
 * callbacks are ex's work there, as a cancel's are (a frame, so that a job of another executor
 * calling this is still that one's too). A spawn racing the shutdown looks at its flag under
 * the pool's lock: its job is either refused or in this sweep. */
static void blocking_cancel_queued(concur_exec *ex)
{
	struct job *mine = NULL, **mine_end = &mine;
	pthread_mutex_lock(&pool.lock);
	for (struct job *j = pool.head, *next; j; j = next) {
		next = j->next;
		if (j->ex != ex)
			continue;
		blocking_queue_unlink(j);
		*mine_end = j;
		mine_end = &j->next;
	}
	pthread_mutex_unlock(&pool.lock);
	struct concur__cancel_frame frame = {ex, concur__tl_cancels};
	concur__tl_cancels = &frame;
	while (mine) {
		struct job *j = mine;
		mine = j->next;
		blocking_job_end_unrun(j);
		blocking_job_free(j);
	}
	concur__tl_cancels = frame.up;
}

static void *blocking_helper_main(void *unused)
{
	pthread_mutex_lock(&pool.lock);
	for (;;) {
		struct job *j = pool.head;
		if (!j) {
			struct timespec abs;
			concur__deadline(&abs, pool.idle_ns);
			pool.idle++;
			int rc = pthread_cond_timedwait(&pool.cond, &pool.lock, &abs);
			pool.idle--;
			if (pool.woken)
				pool.woken--;
			if (rc == ETIMEDOUT && !pool.head)
				break;
			continue;
		}
		blocking_queue_unlink(j);
		pthread_mutex_unlock(&pool.lock);
		blocking_job_run(j);
		pthread_mutex_lock(&pool.lock);
	}
	atomic_fetch_sub_explicit(&pool.threads, 1, memory_order_relaxed);
	pthread_mutex_unlock(&pool.lock);
	return NULL;
}

concur_future *concur_spawn_blocking(concur_exec *ex, concur_task_fn fn, void *arg)
{
	if (!concur__exec_valid(ex) || !fn)
		return concur__failed_future(NULL, -EINVAL);
	/* Counted before the shutdown is looked at, as a task is (concur__task_enqueue): a join
	 * that returned 0 after a shutdown has no job left to start behind it. */
	concur__work_begin(ex);
	if (atomic_load(&ex->shutdown)) {
		concur__work_end(ex);
		return concur__failed_future(ex, -ESHUTDOWN);
	}
	pthread_once(&pool.once, blocking_pool_init);
	struct job *j = calloc(1, sizeof(*j));
	if (!j) {
		concur__work_end(ex);
		return concur__failed_future(ex, -ENOMEM);
	}
	concur_future *out = &j->out; /* one reference for the caller, one for the job */
	concur__future_init(out, &blocking_job_class, ex, 2);
	/* counted work from here to the job's end: a cancel's callbacks are ex's work too */
	concur__future_mark_queued(out);
	j->ex = ex;
	j->fn = fn;
	j->arg = arg;

	pthread_mutex_lock(&pool.lock);
	int err = 0;
	if (atomic_load_explicit(&ex->cancel_pending, memory_order_relaxed)) {
		/* shutdown(ex, true) since the check above: its sweep of the queue may be over (it
		 * takes this lock after setting the flag), so refuse, as a spawn after it */
		err = -ESHUTDOWN;
	} else {
		blocking_queue_push(j);
		if (pool.idle > pool.woken) {
			pool.woken++;
			pthread_cond_signal(&pool.cond);
		} else if (atomic_load_explicit(&pool.threads, memory_order_relaxed) < pool.max) {
			pthread_t t;
			pthread_attr_t attr;
			pthread_attr_init(&attr);
			pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
			err = -pthread_create(&t, &attr, blocking_helper_main, NULL);
			pthread_attr_destroy(&attr);
			if (!err)
				atomic_fetch_add_explicit(&pool.threads, 1, memory_order_relaxed);
		}
		/* nobody would ever run it (nor anything queued) */
		if (err && !atomic_load_explicit(&pool.threads, memory_order_relaxed))
			blocking_queue_unlink(j);
		else
			err = 0;
	}
	pthread_mutex_unlock(&pool.lock);
	if (err) {
		if (concur__future_claim(out)) /* not returned yet: nobody else has it */
			concur__complete(out, err, CONCUR__FINISHED);
		blocking_job_free(j);
	}
	return out;
}

int concur_blocking_config(unsigned max_threads, int64_t idle_ns)
{
	if (max_threads > POOL_MAX_MAX || idle_ns < 0)
		return -EINVAL;
	/* set up first: the set-up guards the lock against fork(), and takes the fork's lock to do
	 * so; holding ours meanwhile, a fork in between left the child's copy held */
	pthread_once(&pool.once, blocking_pool_init);
	pthread_mutex_lock(&pool.lock);
	if (max_threads)
		pool.max = max_threads;
	if (idle_ns)
		pool.idle_ns = idle_ns;
	pthread_cond_broadcast(&pool.cond); /* idle helpers take the new idle time */
	pthread_mutex_unlock(&pool.lock);
	return 0;
}

/* A snapshot, with no lock: the pool's lock is guarded against fork() only once the pool is set
 * up, and a fork while this held it before that left the child's copy held. */
unsigned concur_blocking_threads(void)
{
	return atomic_load_explicit(&pool.threads, memory_order_relaxed);
}

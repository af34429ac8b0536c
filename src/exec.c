/* SPDX-License-Identifier: MIT */
/*
 * The executor: its loops, spawning, join and shutdown.
 *
 * Join counts work: every task (and every I/O op, see io.c) calls concur__work_begin() when
 * created and concur__work_end() after its completion -- callbacks included -- is over. Join
 * waits for the count to reach zero, on a futex word bumped when it does. One begin and one end
 * per kind of work:
 *   task            concur__task_enqueue (here)   concur__task_drop (loop.c), or the enqueue's
 *                                                 own refusal after a shutdown
 *   future I/O op   io_start (io.c)               io_drop (io.c)
 *   stream          stream_open (stream.c)        stream_maybe_free (stream.c)
 *   blocking job    concur_spawn_blocking         blocking_job_free (blocking.c)
 */
#include "internal.h"

#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- live executors, so futures can tell whether theirs is gone ---------------------------- */

/*
 * A fixed table of slots; an executor's id is (generation << 12 | slot), so "is it alive" is
 * one atomic load of its slot -- no lock on the path of concur_future_exec() and concur_then().
 * Only creating and freeing an executor take the lock.
 */
#define CONCUR__REGISTRY_BITS  12
#define CONCUR__REGISTRY_SLOTS (1u << CONCUR__REGISTRY_BITS) /* executors alive at once */

static pthread_mutex_t concur__registry_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic uint64_t concur__registry[CONCUR__REGISTRY_SLOTS]; /* id of the slot's exec, or 0 */
static uint64_t concur__registry_gen = 1;

static int concur__registry_add(concur_exec *ex)
{
	int r = -ENOMEM; /* CONCUR__REGISTRY_SLOTS executors alive already */
	pthread_mutex_lock(&concur__registry_lock);
	for (uint64_t slot = 0; slot < CONCUR__REGISTRY_SLOTS; slot++) {
		if (atomic_load_explicit(&concur__registry[slot], memory_order_relaxed))
			continue;
		ex->id = (concur__registry_gen++ << CONCUR__REGISTRY_BITS) | slot;
		atomic_store_explicit(&concur__registry[slot], ex->id, memory_order_release);
		r = 0;
		break;
	}
	pthread_mutex_unlock(&concur__registry_lock);
	return r;
}

static void concur__registry_remove(concur_exec *ex)
{
	pthread_mutex_lock(&concur__registry_lock);
	atomic_store_explicit(&concur__registry[ex->id & (CONCUR__REGISTRY_SLOTS - 1)], 0,
	                      memory_order_release);
	pthread_mutex_unlock(&concur__registry_lock);
}

bool concur__exec_alive(const concur_exec *ex, uint64_t id)
{
	(void)ex; /* the id names the executor: never dereference a pointer that may be freed */
	return id && atomic_load_explicit(&concur__registry[id & (CONCUR__REGISTRY_SLOTS - 1)],
	                                  memory_order_acquire) == id;
}

/* ---- work accounting ----------------------------------------------------------------------- */

void concur__work_begin(concur_exec *ex)
{
	atomic_fetch_add_explicit(&ex->outstanding, 1, memory_order_seq_cst);
}

static void concur__work_sub(concur_exec *ex, int64_t n)
{
	if (atomic_fetch_sub_explicit(&ex->outstanding, n, memory_order_seq_cst) == n &&
	    atomic_load_explicit(&ex->joiners, memory_order_seq_cst)) {
		atomic_fetch_add_explicit(&ex->join_seq, 1, memory_order_seq_cst);
		concur__futex_wake(&ex->join_seq, INT_MAX);
	}
}

/*
 * On a loop of ex, the end is only noted, and the loop takes its ends off the count once a
 * turn (concur__work_publish, before it can sleep): with several loops, one shared counter
 * written for every task ending would bounce between them. The count may lag behind the
 * work, never run ahead of it (begins are counted at once), so join never returns early; it
 * returns at most a turn late.
 */
void concur__work_end(concur_exec *ex)
{
	struct concur__loop *loop = concur__tl_loop;
	if (loop && loop->ex == ex) {
		loop->work_ended++;
		return;
	}
	/* Once the count reaches 0 a join may return and the executor be freed while this thread
	 * still looks at joiners and wakes them: concur_exec_free waits for foreign_ends to drop
	 * to 0 first. (A loop's ends need no such care: its thread is joined before the free.) */
	atomic_fetch_add_explicit(&ex->foreign_ends, 1, memory_order_seq_cst);
	concur__work_sub(ex, 1);
	atomic_fetch_sub_explicit(&ex->foreign_ends, 1, memory_order_release);
}

/*
 * A task spawned on its own loop is counted on the loop too, with the ends, and the net goes
 * to ex->outstanding at the same publish: every spawn would otherwise write the shared line.
 * Join still cannot return early: the spawner is work counted already (its own end is not
 * published before this begin), and the new task ends on a loop of ex -- this one, or another
 * only after a handoff, which comes after the publish. Anything that may end off the loops
 * (spawn_blocking, streams, future I/O from other threads) uses concur__work_begin().
 */
void concur__work_begin_local(struct concur__loop *loop)
{
	loop->work_ended--;
}

void concur__work_publish(struct concur__loop *loop)
{
	if (loop->work_ended) {
		int64_t n = loop->work_ended;
		loop->work_ended = 0;
		concur__work_sub(loop->ex, n);
	}
}

/* ---- executor lifecycle -------------------------------------------------------------------- */

/* After the loops stopped (or never started). The doorbell goes last: stopping wakes with it. */
static void concur__exec_destroy(concur_exec *ex)
{
	concur__bell_exit(ex);
	for (unsigned i = 0; i < ex->nloops; i++)
		free(ex->loops[i]);
	free(ex->loops);
	ex->magic = 0;
	free(ex);
}

static void concur__stop_loops(concur_exec *ex, unsigned n)
{
	atomic_store_explicit(&ex->stopping, true, memory_order_seq_cst);
	for (unsigned i = 0; i < n; i++)
		concur__loop_stop(ex->loops[i]);
}

int concur_exec_new(concur_exec **out, const struct concur_exec_opts *opts)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	struct concur_exec_opts o = {0};
	if (opts)
		o = *opts;
	if (o.loops > 1024 || o.ring_entries > 32768 ||
	    (o.stack_size && (o.stack_size < 16384 || o.stack_size > ((size_t)1 << 30))) ||
	    (o.flags & ~(unsigned)(CONCUR_EXEC_PIN | CONCUR_EXEC_SQPOLL)))
		return -EINVAL;
	if (!o.loops) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		o.loops = n > 0 ? (unsigned)(n > 1024 ? 1024 : n) : 1;
	}
	if (!o.ring_entries)
		o.ring_entries = 256;
	else if (o.ring_entries < 2)
		o.ring_entries = 2; /* an op and its linked deadline go in one submit */
	if (!o.stack_size)
		o.stack_size = 256 * 1024;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	o.stack_size = (o.stack_size + page - 1) & ~(page - 1);

	concur_exec *ex = aligned_alloc(CONCUR__CACHELINE, sizeof(*ex));
	if (!ex)
		return -ENOMEM;
	memset(ex, 0, sizeof(*ex));
	ex->magic = CONCUR__EXEC_MAGIC;
	ex->opts = o;
	ex->nloops = o.loops;
	ex->loops = calloc(o.loops, sizeof(*ex->loops));
	if (!ex->loops) {
		free(ex);
		return -ENOMEM;
	}
	for (unsigned i = 0; i < o.loops; i++) {
		struct concur__loop *loop = aligned_alloc(CONCUR__CACHELINE, sizeof(*loop));
		if (!loop) {
			concur__exec_destroy(ex);
			return -ENOMEM;
		}
		memset(loop, 0, sizeof(*loop));
		loop->ex = ex;
		loop->idx = i;
		ex->loops[i] = loop;
	}
	/* the doorbell first: a loop that started can always be woken, even to stop it when a
	 * later loop fails to start */
	int r = concur__bell_init(ex);
	if (!r)
		r = concur__registry_add(ex);
	if (r) {
		concur__exec_destroy(ex);
		return r;
	}
	for (unsigned i = 0; i < o.loops; i++) {
		r = concur__loop_start(ex->loops[i]);
		if (r) {
			concur__stop_loops(ex, i);
			concur__registry_remove(ex);
			concur__exec_destroy(ex);
			return r;
		}
	}
	*out = ex;
	return 0;
}

int concur_exec_join(concur_exec *ex, int64_t timeout_ns)
{
	if (!concur__exec_valid(ex))
		return -EINVAL;
	if (concur__tl_loop)
		return -EDEADLK; /* joining from a loop thread would stop that loop's own work */
	struct timespec abs;
	if (timeout_ns > 0)
		concur__deadline(&abs, timeout_ns);
	int r = 0;
	atomic_fetch_add_explicit(&ex->joiners, 1, memory_order_seq_cst);
	for (;;) {
		/* read the word before the count: a wake after the read changes the word */
		uint32_t seq = atomic_load_explicit(&ex->join_seq, memory_order_seq_cst);
		if (atomic_load_explicit(&ex->outstanding, memory_order_seq_cst) == 0)
			break;
		if (timeout_ns == 0 ||
		    concur__futex_wait(&ex->join_seq, seq, timeout_ns > 0 ? &abs : NULL) ==
		        -ETIMEDOUT) {
			r = atomic_load(&ex->outstanding) == 0 ? 0 : -ETIMEDOUT;
			break;
		}
	}
	atomic_fetch_sub_explicit(&ex->joiners, 1, memory_order_seq_cst);
	return r;
}

void concur_exec_shutdown(concur_exec *ex, bool cancel_pending)
{
	if (!concur__exec_valid(ex))
		return;
	if (cancel_pending)
		atomic_store_explicit(&ex->cancel_pending, true, memory_order_seq_cst);
	atomic_store_explicit(&ex->shutdown, true, memory_order_seq_cst);
}

void concur_exec_free(concur_exec *ex)
{
	if (!concur__exec_valid(ex) || concur__tl_loop)
		return;
	concur_exec_shutdown(ex, false);
	concur_exec_join(ex, -1);
	concur__stop_loops(ex, ex->nloops);
	while (atomic_load_explicit(&ex->foreign_ends, memory_order_acquire))
		sched_yield(); /* a blocking helper's last end: a few instructions, a futex wake */
	concur__registry_remove(ex);
	concur__exec_destroy(ex);
}

int concur_exec_loops(const concur_exec *ex)
{
	return concur__exec_valid(ex) ? (int)ex->nloops : -EINVAL;
}

unsigned concur_exec_ring_flags(const concur_exec *ex)
{
	return concur__exec_valid(ex) ? ex->ring_flags : 0;
}

concur_exec *concur_current_exec(void)
{
	return concur__tl_loop ? concur__tl_loop->ex : NULL;
}

int concur_exec_stats(const concur_exec *ex, struct concur_stats *out)
{
	if (!concur__exec_valid(ex) || !out)
		return -EINVAL;
	memset(out, 0, sizeof(*out));
	out->tasks_spawned = atomic_load_explicit(&ex->tasks_spawned, memory_order_relaxed);
	out->doorbells = atomic_load_explicit(&ex->doorbells, memory_order_relaxed);
	for (unsigned i = 0; i < ex->nloops; i++) {
		const struct concur__loop_stats *s = &ex->loops[i]->st;
#define CONCUR__SUM(field) out->field += atomic_load_explicit(&s->field, memory_order_relaxed)
		CONCUR__SUM(tasks_spawned);
		CONCUR__SUM(tasks_run);
		CONCUR__SUM(fibers_parked);
		CONCUR__SUM(cqes);
		CONCUR__SUM(enters);
		CONCUR__SUM(sleeps);
		CONCUR__SUM(msg_ring);
		CONCUR__SUM(inbox_items);
		CONCUR__SUM(steals);
		CONCUR__SUM(futex_wakes);
		CONCUR__SUM(futex_ring_wakes);
		CONCUR__SUM(stacks_mapped);
		CONCUR__SUM(stack_maps);
		CONCUR__SUM(stacks_released);
#undef CONCUR__SUM
	}
	out->stack_guard = (uint64_t)concur__stack_guard_mode();
	return 0;
}

/* ---- spawning ------------------------------------------------------------------------------- */

/*
 * Task records: each loop thread keeps a few freed ones for its next spawns, so a task's life
 * on a loop costs no malloc/free. A record may be freed on any thread; off a loop it goes back
 * to malloc. Any loop may cache any record (they are all alike), until the loop stops.
 */
#define CONCUR__TASK_CACHE_MAX 1024

struct concur__free_task {
	struct concur__free_task *next;
};

static struct concur__task *concur__task_alloc(struct concur__loop *loop)
{
	struct concur__free_task *ft = loop ? loop->task_cache : NULL;
	if (!ft)
		return malloc(sizeof(struct concur__task));
	CONCUR__ASAN_UNPOISON(ft, sizeof(struct concur__task));
	loop->task_cache = ft->next;
	loop->task_cache_len--;
	return (struct concur__task *)ft;
}

static void concur__task_destroy(concur_future *f)
{
	struct concur__loop *loop = concur__tl_loop;
	if (!loop || loop->task_cache_len >= CONCUR__TASK_CACHE_MAX) {
		free(f);
		return;
	}
	struct concur__free_task *ft = (struct concur__free_task *)f;
	ft->next = loop->task_cache;
	loop->task_cache = ft;
	loop->task_cache_len++;
	CONCUR__ASAN_POISON(ft, sizeof(struct concur__task)); /* a use after release still trips */
}

void concur__task_cache_free(struct concur__loop *loop)
{
	struct concur__free_task *ft = loop->task_cache;
	while (ft) {
		CONCUR__ASAN_UNPOISON(ft, sizeof(struct concur__task));
		struct concur__free_task *next = ft->next;
		free(ft);
		ft = next;
	}
	loop->task_cache = NULL;
	loop->task_cache_len = 0;
}

static const struct concur__future_class concur__task_class = {
    .name = "task",
    .cancel_running = concur__task_cancel_running,
    .destroy = concur__task_destroy,
};

struct concur__loop *concur__exec_pick_loop(concur_exec *ex)
{
	unsigned i = atomic_fetch_add_explicit(&ex->rr, 1, memory_order_relaxed);
	return ex->loops[i % ex->nloops];
}

/* Deferred tasks carry their creator's data after the record: never cached, always freed. */
static void concur__deferred_task_destroy(concur_future *f)
{
	free(f);
}

static const struct concur__future_class concur__deferred_task_class = {
    .name = "task",
    .cancel_running = concur__task_cancel_running,
    .destroy = concur__deferred_task_destroy,
};

static void concur__task_init(struct concur__task *t, const struct concur__future_class *cls,
                              concur_exec *ex, concur_task_fn fn, void *arg)
{
	concur__future_init(&t->f, cls, ex, 2); /* the caller's reference and the executor's */
	t->node.kind = CONCUR__NODE_RUN;
	t->fn = fn;
	t->arg = arg;
	t->fib = NULL;
	t->loop = NULL;
}

struct concur__task *concur__task_new_deferred(concur_exec *ex, concur_task_fn fn, size_t extra)
{
	struct concur__task *t = malloc(sizeof(*t) + extra);
	if (t)
		concur__task_init(t, &concur__deferred_task_class, ex, fn, t + 1);
	return t;
}

void concur__task_enqueue(struct concur__task *t)
{
	concur_exec *ex = t->f.ex;
	struct concur__loop *me = concur__tl_loop;
	struct concur__loop *pin = (t->f.flags & CONCUR__TASK_PINNED) ? t->loop : NULL;
	bool local = me && me->ex == ex && (!pin || pin == me);
	/* count the work before checking the flag: a join racing a shutdown sees one or the
	 * other, never neither */
	if (local)
		concur__work_begin_local(me);
	else
		concur__work_begin(ex);
	if (atomic_load_explicit(&ex->shutdown, memory_order_seq_cst)) {
		concur__work_end(ex);
		if (concur__future_claim(&t->f))
			concur__complete(&t->f, -ESHUTDOWN, CONCUR__FINISHED);
		concur_release(&t->f); /* the executor's reference: it will never run */
		return;
	}
	if (pin) { /* concur_spawn_on: to its loop's ready queue, however it gets there */
		if (me && me->ex == ex)
			concur__stat_inc(&me->st.tasks_spawned, 1);
		else
			atomic_fetch_add_explicit(&ex->tasks_spawned, 1, memory_order_relaxed);
		concur__loop_post(pin, &t->node);
	} else if (local) {
		concur__stat_inc(&me->st.tasks_spawned, 1);
		concur__loop_push_fresh(me, t, true); /* local, depth first */
	} else {
		atomic_fetch_add_explicit(&ex->tasks_spawned, 1, memory_order_relaxed);
		concur__loop_post(concur__exec_pick_loop(ex), &t->node);
	}
}

concur_future *concur_spawn(concur_exec *ex, concur_task_fn fn, void *arg)
{
	return concur_spawn_ex(ex, fn, arg, NULL);
}

concur_future *concur_spawn_ex(concur_exec *ex, concur_task_fn fn, void *arg,
                               const struct concur_spawn_opts *opts)
{
	if (!concur__exec_valid(ex))
		return concur__failed_future(NULL, -EINVAL);
	int stack = opts ? concur__stack_flags(opts->stack_size) : 0;
	if (!fn || stack < 0 || (opts && opts->flags))
		return concur__failed_future(ex, -EINVAL);
	struct concur__task *t = concur__task_alloc(concur__tl_loop);
	if (!t)
		return concur__failed_future(ex, -ENOMEM);
	concur__task_init(t, &concur__task_class, ex, fn, arg);
	t->f.flags = (uint32_t)stack; /* the stack size class, read when the task starts */
	concur__task_enqueue(t);
	return &t->f;
}

/*
 * Pinned: the task is marked and queued in its loop's ready queue, where the idle-loop handoff
 * (which takes only from the fresh deque) never looks; a failed MSG_RING forwards it to t->loop.
 * It runs after the fibers ready before it (FIFO), not depth first like a local concur_spawn.
 */
concur_future *concur_spawn_on(concur_exec *ex, unsigned loop_idx, concur_task_fn fn, void *arg)
{
	if (!concur__exec_valid(ex))
		return concur__failed_future(NULL, -EINVAL);
	if (!fn || loop_idx >= ex->nloops)
		return concur__failed_future(ex, -EINVAL);
	struct concur__task *t = concur__task_alloc(concur__tl_loop);
	if (!t)
		return concur__failed_future(ex, -ENOMEM);
	concur__task_init(t, &concur__task_class, ex, fn, arg);
	t->f.flags |= CONCUR__TASK_PINNED;
	t->loop = ex->loops[loop_idx];
	concur__task_enqueue(t);
	return &t->f;
}

int concur_current_loop(void)
{
	return concur__tl_loop ? (int)concur__tl_loop->idx : -1;
}

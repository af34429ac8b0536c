/* SPDX-License-Identifier: MIT */
/*
 * The executor: its loops, spawning, join and shutdown.
 *
 * Join counts work: every task (and every I/O op, see io.c) calls concur__work_begin() when
 * created and concur__work_end() after its completion -- callbacks included -- is over. Join
 * waits for the count to reach zero, on a futex word bumped when it does. One begin and one end
 * per kind of work:
 *   task            concur__task_enqueue (here)   concur__loop_task_end, concur__task_drop,
 *                                                 or a start that ends it unrun (no stack, or
 *                                                 shutdown(ex, true)) (loop.c); or the
 *                                                 enqueue's own refusal after a shutdown
 *   future I/O op   io_start (io.c)               io_req_cqe or io_drop (io.c)
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

static pthread_once_t concur__registry_once = PTHREAD_ONCE_INIT;

static void concur__registry_init(void)
{
	concur__fork_guard(&concur__registry_lock, NULL);
}

static int concur__registry_add(concur_exec *ex)
{
	int r = -ENOMEM; /* CONCUR__REGISTRY_SLOTS executors alive already */
	pthread_once(&concur__registry_once, concur__registry_init);
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
		concur__work_end_local(loop);
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

static void concur__recycle_free(concur_exec *ex);

/* After the loops stopped (or never started). The doorbell goes last: stopping wakes with it. */
static void concur__exec_destroy(concur_exec *ex)
{
	concur__bell_exit(ex);
	concur__recycle_free(ex);
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

/* idle_poll_ns came after flags, in what was padding: the options keep their size, and a caller
 * built against the older header that zeroes them, as the header asks, passes 0 there */
_Static_assert(sizeof(void *) != 8 || sizeof(struct concur_exec_opts) == 24,
               "concur_exec_opts is 24 bytes on LP64");

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
	    (o.flags & ~(unsigned)(CONCUR_EXEC_PIN | CONCUR_EXEC_SQPOLL)) ||
	    o.idle_poll_ns > 1000000000u)
		return -EINVAL;
	if (!o.loops) {
		/* the CPUs this thread may run on (taskset, a cpuset, systemd's CPUAffinity=; the
		 * loop threads inherit them), as Go's GOMAXPROCS counts them: a loop per online CPU
		 * under `taskset -c 0` on 64 CPUs would be 64 loops sharing one */
		long n = concur__cpus_allowed_count();
		if (n <= 0)
			n = sysconf(_SC_NPROCESSORS_ONLN);
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

__thread concur_exec *concur__tl_job_ex;
__thread concur_future *concur__tl_job_f;
_Atomic(void (*)(concur_exec *ex)) concur__cancel_queued_jobs;

int concur_exec_join(concur_exec *ex, int64_t timeout_ns)
{
	if (!concur__exec_valid(ex))
		return -EINVAL;
	if (concur__exec_no_wait_here(ex))
		return -EDEADLK; /* see concur__exec_no_wait_here */
	concur__defer_run();     /* thens this thread made ready are work to wait for too */
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
	void (*cancel_jobs)(concur_exec *) =
	    atomic_load_explicit(&concur__cancel_queued_jobs, memory_order_acquire);
	if (cancel_pending && cancel_jobs)
		cancel_jobs(ex); /* a job queued after it is cancelled by the helper reaching it */
}

void concur_exec_free(concur_exec *ex)
{
	if (!concur__exec_valid(ex) || concur__exec_no_wait_here(ex))
		return;
	concur_exec_shutdown(ex, false);
	concur_exec_join(ex, -1);
	/* a join of another thread, woken with ours, still reads ex on its way out */
	while (atomic_load_explicit(&ex->joiners, memory_order_acquire))
		sched_yield();
	concur__stop_loops(ex, ex->nloops);
	concur__stall_forget(ex); /* no loop runs a task for it now */
	concur__loop_quiesce(ex);
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
 * Task records. Each loop keeps freed ones for its next spawns, so a task's life on a loop costs
 * no allocation; any loop may cache any record of a size (they are all alike), until it stops.
 *
 * Records made by a thread outside the executor mostly end on a loop. Given back there one by
 * one, each would cost a count on its slab's line, shared with the thread carving the slab
 * (when records were malloc'd, a free into that thread's arena, under its lock: a quarter of
 * the samples of a pipeline of then()s from main), and the thread would carve new ones, cold,
 * without end. So a loop whose cache is full fills a chain
 * of CONCUR__RECYCLE_CHAIN records and parks it in an empty slot of its executor; a thread
 * outside the executor takes a whole chain from a slot when its own cache (thread-local, freed
 * when the thread exits) runs dry, and so does a loop: one task spawning many on loop 0 while
 * loop 1 runs them (concur__loop_share) would otherwise carve, fault in and unmap records
 * without end on both sides (spawn/bulk 0.71x). A slot is a pointer exchanged whole, so there
 * is no ABA; the slots bound what an executor holds (and it frees them); with every slot full,
 * a loop frees.
 */
#define CONCUR__FOREIGN_CACHE_MAX (2 * CONCUR__RECYCLE_CHAIN) /* a thread outside keeps */

/*
 * Record memory: slabs of CONCUR__SLAB_BYTES, aligned to their size, each carved in order by
 * the thread whose cache ran dry. Malloc'd one by one, records made glibc grow the malloc arena
 * of a thread (every thread but main has its own) a page at a time, one mprotect() per page: a
 * loop spawning 10^6 tasks made 31k of them, about a third of spawn/bulk. A slab counts its
 * records out (handed out and not given back to it) plus one while it is carved; the last to
 * go frees it, on whichever thread. So memory goes back in whole slabs, and a record kept long
 * keeps its slab. Its pages are faulted in at once, as its records will all be written soon
 * (one madvise() instead of 8 page faults: spawn/bulk 0.89x). 32 KiB, as glibc serves an
 * aligned_alloc of that from the arena (64 KiB took an mmap() each, and every slab given back a
 * munmap(), whose TLB shootdowns and mmap lock cost the other loop more than the mprotect()s
 * had). ASan builds malloc each record, so that LeakSanitizer still names a leaked future and
 * ASan a use after free.
 */
#define CONCUR__SLAB_BYTES ((size_t)32 * 1024)
#define CONCUR__SLAB_HEAD  CONCUR__CACHELINE /* the counts, on a line of their own */
/*
 * A cache that took CONCUR__ARENA_SLABS slabs from the arena (some 2000 task records) makes
 * many: its next slabs are cut from chunks of CONCUR__CHUNK_SLABS, each one mmap() faulted in
 * whole, where a slab from the arena cost an mprotect() (the arena growing) and a madvise() of
 * its own, most of spawn/bulk's system time (spawn/bulk 0.80x, spawn/foreign 0.68x). A chunk's
 * slabs are not reused once given back: it is unmapped when its last one is (a record kept long
 * keeps its chunk, 1 MiB), one munmap() for 32 slabs where 64 KiB slabs took one each. Refused
 * a mapping (the map count, memory), a cache takes its next 8 slabs from the arena again.
 */
#define CONCUR__ARENA_SLABS 8
#define CONCUR__CHUNK_SLABS 32
#define CONCUR__CHUNK_BYTES (CONCUR__CHUNK_SLABS * CONCUR__SLAB_BYTES)

struct concur__slab {
	_Atomic uint32_t out;
	/* in a chunk's first slab: the chunk's slabs not given back, or not cut yet */
	_Atomic uint32_t chunk_out;
	/* the first slab of the chunk it was cut from; NULL: malloc'd */
	struct concur__slab *chunk;
};

static _Atomic long concur__chunks; /* mapped now (concur__chunks_live) */

long concur__chunks_live(void)
{
	return atomic_load_explicit(&concur__chunks, memory_order_relaxed);
}

static void concur__chunk_put(struct concur__slab *chunk, uint32_t n)
{
	if (atomic_fetch_sub_explicit(&chunk->chunk_out, n, memory_order_acq_rel) != n)
		return;
	/* unmapping it from between two others splits their mapping, which the map count may
	 * refuse: then it stays mapped (its pages given back), and counted */
	if (concur__unmap(chunk, CONCUR__CHUNK_BYTES))
		atomic_fetch_sub_explicit(&concur__chunks, 1, memory_order_relaxed);
}

static void concur__slab_put(struct concur__slab *s, uint32_t n)
{
	if (atomic_fetch_sub_explicit(&s->out, n, memory_order_acq_rel) != n)
		return;
	if (s->chunk)
		concur__chunk_put(s->chunk, 1);
	else
		free(s);
}

/* The cache's carving slab is done with: its last records were carved, or the cache goes. */
static void concur__slab_retire(struct concur__rec_cache *c)
{
	if (c->slab)
		concur__slab_put(c->slab, c->carve_left + 1);
	c->slab = NULL;
	c->carve = NULL;
	c->carve_left = 0;
}

/* The cache goes: its slab, and its chunk's slabs not cut yet. */
static void concur__rec_cache_retire(struct concur__rec_cache *c)
{
	concur__slab_retire(c);
	if (c->chunk_left)
		concur__chunk_put(c->chunk, c->chunk_left);
	c->chunk = NULL;
	c->chunk_left = 0;
}

#ifndef CONCUR__ASAN /* (ASan builds malloc each record) */
/* A new slab (its counts not set), from the cache's chunk or the arena; NULL on -ENOMEM. */
static struct concur__slab *concur__slab_new(struct concur__rec_cache *c)
{
	struct concur__slab *s;
	if (c && c->arena_slabs == CONCUR__ARENA_SLABS) {
		if (!c->chunk_left &&
		    (s = concur__map_aligned(CONCUR__CHUNK_BYTES, CONCUR__SLAB_BYTES))) {
			atomic_init(&s->chunk_out, CONCUR__CHUNK_SLABS);
			atomic_fetch_add_explicit(&concur__chunks, 1, memory_order_relaxed);
			c->chunk = s;
			c->chunk_left = CONCUR__CHUNK_SLABS;
		}
		if (!c->chunk_left)
			c->arena_slabs = 0; /* refused: the arena's next 8 before asking again */
		if (c->chunk_left) {
			s = (void *)((char *)c->chunk +
			             (CONCUR__CHUNK_SLABS - c->chunk_left) * CONCUR__SLAB_BYTES);
			c->chunk_left--;
			s->chunk = c->chunk;
			return s;
		}
	}
	s = aligned_alloc(CONCUR__SLAB_BYTES, CONCUR__SLAB_BYTES);
	if (!s)
		return NULL;
	concur__prefault(s, CONCUR__SLAB_BYTES);
	s->chunk = NULL;
	if (c && c->arena_slabs < CONCUR__ARENA_SLABS)
		c->arena_slabs++;
	return s;
}
#endif

/* New memory for a record of `bytes` (c: the thread's cache; NULL: a slab of one). */
static void *concur__rec_mem_new(struct concur__rec_cache *c, size_t bytes)
{
#ifdef CONCUR__ASAN
	(void)c;
	return malloc(bytes);
#else
	/* 16 bytes apart at least, as malloc would: a task's 120 bytes take two whole lines */
	size_t stride = (bytes + 15) & ~(size_t)15;
	if (!c || !c->carve_left) {
		struct concur__slab *s = concur__slab_new(c);
		if (!s)
			return NULL;
		char *first = (char *)s + CONCUR__SLAB_HEAD;
		if (!c) {
			atomic_init(&s->out, 1);
			return first;
		}
		concur__slab_retire(c);
		c->carve_left = (unsigned)((CONCUR__SLAB_BYTES - CONCUR__SLAB_HEAD) / stride);
		atomic_init(&s->out, c->carve_left + 1);
		c->slab = s;
		c->carve = first;
	}
	void *p = c->carve;
	c->carve += stride;
	c->carve_left--;
	return p;
#endif
}

/* A record's memory goes back to its slab (it is in no cache). */
static void concur__rec_mem_free(void *p)
{
#ifdef CONCUR__ASAN
	free(p);
#else
	concur__slab_put((void *)((uintptr_t)p & ~(uintptr_t)(CONCUR__SLAB_BYTES - 1)), 1);
#endif
}

/*
 * A freed record, linked through its second word. ASan: the rest is poisoned, so a use after
 * release still trips (concur__valid reads the magic in the first word); the link is not, as
 * LeakSanitizer ignores pointers in poisoned memory and would call every record past a list's
 * head leaked while a thread's cache holds them at exit.
 */
struct concur__free_task {
	uint64_t future_head; /* the future's state and magic: left as they were */
	struct concur__free_task *next;
};

static void concur__rec_poison(struct concur__free_task *ft, size_t bytes)
{
	CONCUR__ASAN_POISON(ft, bytes);
	CONCUR__ASAN_UNPOISON(&ft->next, sizeof(ft->next));
}

static const size_t concur__rec_bytes[CONCUR__REC_SIZES] = {
    [CONCUR__REC_TASK] = sizeof(struct concur__task),
    [CONCUR__REC_THEN] = sizeof(struct concur__task) + CONCUR__DEFERRED_CACHED_EXTRA,
    [CONCUR__REC_IO] = CONCUR__REC_IO_BYTES,
};

/* A thread outside the executors: its caches, freed by a key's destructor when it exits. */
static CONCUR__TLS_HOT struct concur__rec_cache concur__tl_recs[CONCUR__REC_SIZES];
static CONCUR__TLS_HOT int concur__tl_recs_state; /* 0: unused, 1: key set, 2: thread exiting */
static pthread_key_t concur__recs_key;
static pthread_once_t concur__recs_once = PTHREAD_ONCE_INIT;

static void concur__rec_list_free(struct concur__free_task *ft, size_t bytes)
{
	while (ft) {
		CONCUR__ASAN_UNPOISON(ft, bytes);
		struct concur__free_task *next = ft->next;
		concur__rec_mem_free(ft);
		ft = next;
	}
}

static void concur__tl_recs_free(void *unused)
{
	(void)unused;
	for (int k = 0; k < CONCUR__REC_SIZES; k++) {
		concur__rec_list_free(concur__tl_recs[k].head, concur__rec_bytes[k]);
		concur__tl_recs[k].head = NULL;
		concur__tl_recs[k].len = 0;
		concur__rec_cache_retire(&concur__tl_recs[k]);
	}
	concur__tl_recs_state = 2; /* a later destructor's release frees at once */
}

static void concur__recs_key_init(void)
{
	pthread_key_create(&concur__recs_key, concur__tl_recs_free);
}

/* The thread's caches outside a loop, NULL once it is exiting (or without a key). */
static struct concur__rec_cache *concur__tl_cache(int k)
{
	if (CONCUR__LIKELY(concur__tl_recs_state == 1))
		return &concur__tl_recs[k];
	if (concur__tl_recs_state == 2)
		return NULL;
	pthread_once(&concur__recs_once, concur__recs_key_init);
	/* a non-NULL value, so the destructor runs when the thread exits */
	if (pthread_setspecific(concur__recs_key, concur__tl_recs))
		return NULL;
	concur__tl_recs_state = 1;
	return &concur__tl_recs[k];
}

static void *concur__rec_pop(struct concur__rec_cache *c, size_t bytes)
{
	struct concur__free_task *ft = c->head;
	CONCUR__ASAN_UNPOISON(ft, bytes);
	c->head = ft->next;
	c->len--;
	return ft;
}

/*
 * A thread outside the executor allocates mostly records a loop freed: cold here, each line a
 * miss taken on the first write, which the spawn's next locked instruction then waits for. So
 * the next record's lines are fetched, for writing, as one is handed out: they arrive while the
 * caller uses this one. (A loop's own records are warm: it freed them.)
 */
static inline void concur__rec_prefetch(const char *p, size_t bytes)
{
	if (!p)
		return;
	for (size_t off = 0; off < bytes; off += CONCUR__CACHELINE)
		__builtin_prefetch(p + off, 1, 3);
	__builtin_prefetch(p + bytes - 1, 1, 3); /* a record need not start on a line */
}

static void concur__rec_push(struct concur__rec_cache *c, void *p, size_t bytes)
{
	struct concur__free_task *ft = p;
	ft->next = c->head;
	c->head = ft;
	c->len++;
	concur__rec_poison(ft, bytes);
}

/* A chain a loop parked, into the empty cache c (of a thread outside, or of a loop). */
static bool concur__recycle_take(concur_exec *ex, int k, struct concur__rec_cache *c)
{
	if (c->skip) {
		c->skip--;
		return false;
	}
	for (unsigned i = 0; i < CONCUR__RECYCLE_SLOTS; i++) {
		_Atomic(void *) *slot = &ex->recycle[k].slot[i];
		if (!atomic_load_explicit(slot, memory_order_relaxed))
			continue;
		void *chain = atomic_exchange_explicit(slot, NULL, memory_order_acquire);
		if (chain) {
			c->head = chain;
			c->len = CONCUR__RECYCLE_CHAIN;
			return true;
		}
	}
	c->skip = CONCUR__RECYCLE_SKIP; /* per size: a then's may run dry while a task's are full */
	return false;
}

/* A loop: park the full outgoing chain in an empty slot of its executor, or free it. */
static void concur__recycle_park(concur_exec *ex, int k, struct concur__rec_cache *c)
{
	void *chain = c->out;
	c->out = NULL;
	c->out_len = 0;
	for (unsigned i = 0; i < CONCUR__RECYCLE_SLOTS; i++) {
		void *empty = NULL;
		if (!atomic_load_explicit(&ex->recycle[k].slot[i], memory_order_relaxed) &&
		    atomic_compare_exchange_strong_explicit(&ex->recycle[k].slot[i], &empty, chain,
		                                            memory_order_release,
		                                            memory_order_relaxed))
			return;
	}
	concur__rec_list_free(chain, concur__rec_bytes[k]); /* nobody outside takes them */
}

/* concur__rec_alloc past its common case (its cache empty, or a thread's first use). */
static __attribute__((noinline)) void *concur__rec_alloc_slow(concur_exec *ex,
                                                              struct concur__loop *loop, int k)
{
	size_t bytes = concur__rec_bytes[k];
	struct concur__rec_cache *c = loop ? &loop->recs[k] : concur__tl_cache(k);
	if (c && c->head)
		return concur__rec_pop(c, bytes);
	if (loop && c->out) { /* the chain meant for the executor: ours again */
		c->head = c->out;
		c->len = c->out_len;
		c->out = NULL;
		c->out_len = 0;
		return concur__rec_pop(c, bytes);
	}
	if (c && concur__recycle_take(ex, k, c))
		return concur__rec_pop(c, bytes);
	return concur__rec_mem_new(c, bytes);
}

/* This thread's cache of size k if it is set up (always on a loop), else NULL. */
static inline struct concur__rec_cache *concur__rec_cache_ready(struct concur__loop *loop, int k)
{
	if (loop)
		return &loop->recs[k];
	return concur__tl_recs_state == 1 ? &concur__tl_recs[k] : NULL;
}

/*
 * A record of size k for a new future, on this thread (loop is this thread's loop, or NULL).
 * The common case -- a record from this thread's cache -- needs no callee-saved register: all
 * else is a tail call. So is concur__rec_free's.
 */
void *concur__rec_alloc(concur_exec *ex, struct concur__loop *loop, int k)
{
	struct concur__rec_cache *c = concur__rec_cache_ready(loop, k);
	if (CONCUR__LIKELY(c && c->head)) {
		void *p = concur__rec_pop(c, concur__rec_bytes[k]);
		if (!loop)
			concur__rec_prefetch(c->head, concur__rec_bytes[k]);
		return p;
	}
	return concur__rec_alloc_slow(ex, loop, k);
}

/* concur__rec_free past its common case (its cache full, or a thread's first use). */
static __attribute__((noinline)) void concur__rec_free_slow(void *p, int k)
{
	size_t bytes = concur__rec_bytes[k];
	struct concur__loop *loop = concur__tl_loop;
	struct concur__rec_cache *c = loop ? &loop->recs[k] : concur__tl_cache(k);
	if (!c) {
		concur__rec_mem_free(p);
	} else if (loop && c->len >= CONCUR__TASK_CACHE_MAX) {
		struct concur__free_task *ft = p;
		ft->next = c->out;
		c->out = ft;
		concur__rec_poison(ft, bytes);
		if (++c->out_len == CONCUR__RECYCLE_CHAIN)
			concur__recycle_park(loop->ex, k, c);
	} else if (!loop && c->len >= CONCUR__FOREIGN_CACHE_MAX) {
		concur__rec_mem_free(p);
	} else {
		concur__rec_push(c, p, bytes);
	}
}

/* The last reference to a record of size k went, on this thread. */
void concur__rec_free(void *p, int k)
{
	struct concur__loop *loop = concur__tl_loop;
	struct concur__rec_cache *c = concur__rec_cache_ready(loop, k);
	if (CONCUR__LIKELY(c &&
	                   c->len < (loop ? CONCUR__TASK_CACHE_MAX : CONCUR__FOREIGN_CACHE_MAX))) {
		concur__rec_push(c, p, concur__rec_bytes[k]);
		return;
	}
	concur__rec_free_slow(p, k);
}

static void concur__task_destroy(concur_future *f)
{
	concur__rec_free(f, CONCUR__REC_TASK);
}

void concur__task_cache_free(struct concur__loop *loop)
{
	for (int k = 0; k < CONCUR__REC_SIZES; k++) {
		struct concur__rec_cache *c = &loop->recs[k];
		concur__rec_list_free(c->head, concur__rec_bytes[k]);
		concur__rec_list_free(c->out, concur__rec_bytes[k]);
		concur__rec_cache_retire(c);
		*c = (struct concur__rec_cache){0};
	}
}

/* The executor's parked chains, once its loops stopped. */
static void concur__recycle_free(concur_exec *ex)
{
	for (int k = 0; k < CONCUR__REC_SIZES; k++)
		for (unsigned i = 0; i < CONCUR__RECYCLE_SLOTS; i++)
			concur__rec_list_free(atomic_exchange(&ex->recycle[k].slot[i], NULL),
			                      concur__rec_bytes[k]);
}

/*
 * A task of this loop waits for t: a started task here is completed only here (its end, on this
 * thread, resumes the one awaiter kept in its fiber record); an unstarted one at the head of
 * this loop's fresh deque is started first (the start the waiter's suspend would make). t->loop
 * and t->fib are read only once the state says started: they are set before the claim.
 */
bool concur__task_await_here(concur_future *f, struct concur__task *w)
{
	struct concur__task *t = (struct concur__task *)f;
	struct concur__loop *loop = concur__tl_loop;
	uint32_t s = atomic_load_explicit(&f->state, memory_order_acquire);

	if ((s & (CONCUR__STATE_MASK | CONCUR__COMPLETING)) == CONCUR__PENDING) {
		if (!concur__loop_start_awaited(loop, w, t))
			return false;
	} else if ((s & CONCUR__STATE_MASK) != CONCUR__RUNNING || t->loop != loop) {
		return false;
	}
	if (!t->fib || t->fib->awaiter || !concur__waiters_none(f))
		return false; /* the slot's task is woken first: nobody may wait before it */
	t->fib->awaiter = w;
	return true;
}

bool concur__task_await_undo(concur_future *f, struct concur__task *w)
{
	struct concur__task *t = (struct concur__task *)f;

	if (!t->fib || t->fib->awaiter != w)
		return false; /* ended: its end resumed w */
	t->fib->awaiter = NULL;
	return true;
}

static const struct concur__future_class concur__task_class = {
    .name = "task",
    .cancel_running = concur__task_cancel_running,
    .destroy = concur__task_destroy,
    .await_here = concur__task_await_here,
    .await_undo = concur__task_await_undo,
    .held = true,    /* by its executor, until it ends */
    .counted = true, /* from its spawn */
};

struct concur__loop *concur__exec_pick_loop(concur_exec *ex)
{
	unsigned i = atomic_fetch_add_explicit(&ex->rr, 1, memory_order_relaxed);
	return ex->loops[i % ex->nloops];
}

/* Deferred tasks carry their creator's data after the record: cached if small, else freed. */
void concur__deferred_task_destroy(concur_future *f)
{
	if (f->flags & CONCUR__TASK_MALLOCED)
		free(f);
	else
		concur__rec_free(f, CONCUR__REC_THEN);
}

static void concur__task_init(struct concur__task *t, const struct concur__future_class *cls,
                              concur_exec *ex, concur_task_fn fn, void *arg)
{
	/* the caller's reference (the executor's hold is not counted) */
	concur__future_init(&t->f, cls, ex, 1);
	t->node.call = NULL; /* a task's node */
	t->fn = fn;
	t->arg = arg;
	t->fib = NULL;
	t->loop = NULL;
	t->sp = NULL;
}

struct concur__task *concur__task_new(concur_exec *ex, concur_task_fn fn, void *arg)
{
	struct concur__task *t = concur__rec_alloc(ex, concur__tl_loop, CONCUR__REC_TASK);
	if (t)
		concur__task_init(t, &concur__task_class, ex, fn, arg);
	return t;
}

struct concur__task *concur__task_new_deferred(concur_exec *ex,
                                               const struct concur__future_class *cls,
                                               concur_task_fn fn, size_t extra)
{
	bool cached = extra <= CONCUR__DEFERRED_CACHED_EXTRA;
	struct concur__task *t = cached ? concur__rec_alloc(ex, concur__tl_loop, CONCUR__REC_THEN)
	                                : malloc(sizeof(*t) + extra);
	if (t) {
		concur__task_init(t, cls, ex, fn, t + 1);
		t->f.flags = cached ? 0 : CONCUR__TASK_MALLOCED;
	}
	return t;
}

void concur__task_end_unrun(struct concur__task *t, int64_t err, uint32_t final_state)
{
	if (concur__future_claim_unrun(&t->f))
		concur__complete_unhold(&t->f, err, final_state);
	else
		concur__unhold(&t->f); /* a cancel won: it completed it */
}

void concur__task_enqueue(struct concur__task *t)
{
	concur_exec *ex = t->f.ex;
	struct concur__loop *me = concur__tl_loop;
	struct concur__loop *pin = (t->f.flags & CONCUR__TASK_PINNED) ? t->loop : NULL;
	bool local = me && me->ex == ex && (!pin || pin == me);
	/* A then or spawn_after task is work of ex from here on, until its loop dequeues it (or
	 * the shutdown below ends it): its state says so to a concurrent concur_cancel, which
	 * counts its callbacks only then (ex may be gone before: this caller checked it is not).
	 * Marked before it is counted, so that no cancel finds it counted and unmarked; a cancel
	 * that won first leaves it unmarked, and its loop drops it. */
	if (CONCUR__UNLIKELY(!t->f.cls->counted))
		concur__future_mark_queued(&t->f);
	/* count the work before checking the flag: a join racing a shutdown sees one or the
	 * other, never neither */
	if (local)
		concur__work_begin_local(me);
	else
		concur__work_begin(ex);
	if (atomic_load_explicit(&ex->shutdown, memory_order_seq_cst)) {
		/* its callbacks (a then's, a group's) are work of ex, as a task's end's are: the
		 * work ends after them, or a join could return (and a free free ex) under one
		 * that goes on to spawn; a join or free of ex from one gets -EDEADLK, as under
		 * concur_cancel */
		struct concur__cancel_frame frame = {ex, concur__tl_cancels};
		concur__tl_cancels = &frame;
		concur__task_end_unrun(t, -ESHUTDOWN, CONCUR__FINISHED);
		concur__tl_cancels = frame.up;
		concur__work_end(ex);
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
		/* a tiny stack leaves loop work (a submit) to the loop */
		if (me->nfresh >= CONCUR__SHARE_AT + me->share_backoff && concur__tl_task &&
		    concur__task_stack_big(concur__tl_task))
			concur__loop_share(me);
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
	struct concur__task *t = concur__task_new(ex, fn, arg);
	if (!t)
		return concur__failed_future(ex, -ENOMEM);
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
	struct concur__task *t = concur__rec_alloc(ex, concur__tl_loop, CONCUR__REC_TASK);
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

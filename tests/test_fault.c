/* SPDX-License-Identifier: MIT */
/*
 * Fault injection: resource exhaustion must fail the operation that hit it, with an error, and
 * nothing else -- never a crash, a hang or a leak.
 *
 * A representative workload (concur_exec_new with 2 loops; tasks doing nested spawns, awaits,
 * sleeps, pipe and socket I/O, a recv stream on the provided-buffer ring, sync objects and a
 * blocking job; from outside: promises, then, spawn_after, callbacks, gather, wait,
 * as_completed, a group, join and free) runs in a forked child for each case, with one kind of
 * call failing (tests/wrap.h: malloc/calloc/aligned_alloc, mmap, pthread_create, ring setup,
 * submit): only the Nth call (WRAP_ONE) or every call from the Nth on (WRAP_FROM), N swept over
 * the calls the workload makes (every N in the first 64, then sampled; CONCUR_FAULT_FULL=1 for
 * all of them). The child checks every result is the expected value or a negative errno, every
 * registered callback ran once, no heap block is left once the executor is freed, and an alarm
 * turns a hang into a failure. The same workload runs under RLIMIT_NOFILE from 4 upward and
 * under RLIMIT_MEMLOCK 0. The parent lists every failing case (kind, N, mode, how it failed).
 */
#define _GNU_SOURCE
#include "helpers.h"
#include "wrap.h"
#include "internal.h"

#include <elf.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILD_ALARM_S (SANITIZED ? 15 : 4) /* a case that takes longer hangs */

static inline int legal(int64_t res, int64_t want)
{
	return res == want || (res < 0 && res >= -4095);
}

/* In the child: a failed check exits with a code the parent names. */
#define CHECK(cond)                                                                                \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "fault: check failed at line %d: %s\n", __LINE__, #cond);  \
			_exit(3);                                                                  \
		}                                                                                  \
	} while (0)
#define LEGAL(res, want)                                                                           \
	do {                                                                                       \
		int64_t r_ = (res);                                                                \
		if (!legal(r_, (want))) {                                                          \
			fprintf(stderr, "fault: line %d: %s gave %" PRId64 "\n", __LINE__, #res,   \
			        r_);                                                               \
			_exit(3);                                                                  \
		}                                                                                  \
	} while (0)

/* ---- the workload ------------------------------------------------------------------------- */

static concur_mutex *wl_mx;
static concur_chan *wl_ch;
static atomic_long cb_added, cb_fired;

static int64_t wl_leaf(void *arg)
{
	return (int64_t)(intptr_t)arg;
}

static int64_t wl_add1(void *arg, int64_t v)
{
	(void)arg;
	return v + 1;
}

static int64_t wl_sum(void *arg, const int64_t *v, size_t n)
{
	(void)arg;
	int64_t s = 0;
	for (size_t i = 0; i < n; i++)
		s += v[i];
	return s;
}

static void wl_cb(concur_future *f, void *arg)
{
	(void)arg;
	CHECK(concur_done(f));
	atomic_fetch_add(&cb_fired, 1);
}

static void wl_on_done(concur_future *f)
{
	int e = concur_on_done(f, wl_cb, NULL);
	LEGAL(e, 0);
	if (e == 0)
		atomic_fetch_add(&cb_added, 1);
}

/* In a task: pipe I/O, a socket pair with a recv stream on the provided-buffer ring. */
static void wl_io(void)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) == 0) {
		char b[8] = "abcdefg", rb[8];
		int64_t w = concur_await_write(p[1], b, sizeof(b), -1, -1);
		LEGAL(w, 8);
		if (w == 8)
			LEGAL(concur_await_read(p[0], rb, sizeof(rb), -1, MS(2000)), 8);
		close(p[0]);
		close(p[1]);
	}
	int fd = (int)concur_await_openat(AT_FDCWD, "/dev/null", O_RDONLY | O_CLOEXEC, 0, -1);
	LEGAL(fd, fd >= 0 ? fd : 0);
	if (fd >= 0)
		LEGAL(concur_await_close(fd, -1), 0);
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0) {
		concur_stream *s;
		int e = concur_recv_stream(&s, sv[0], 0);
		LEGAL(e, 0);
		if (e == 0) {
			if (write(sv[1], "hello", 5) == 5) {
				struct concur_chunk c;
				int64_t n = concur_stream_next(s, &c);
				LEGAL(n, n > 0 ? n : 0);
				if (n > 0)
					CHECK(concur_stream_give(s, &c) == 0);
			}
			concur_stream_close(s);
		}
		close(sv[0]);
		close(sv[1]);
	}
}

static int64_t wl_task(void *arg)
{
	concur_exec *ex = concur_current_exec();
	concur_future *c[3];
	for (int k = 0; k < 3; k++)
		c[k] = concur_spawn(ex, wl_leaf, (void *)(intptr_t)(k + 1));
	for (int k = 0; k < 3; k++) {
		LEGAL(concur_result(c[k], -1), k + 1);
		concur_release(c[k]);
	}
	LEGAL(concur_sleep(10000), 0);
	LEGAL(concur_await_nop(), 0);
	if ((intptr_t)arg % 3 == 0)
		wl_io();
	int e = concur_mutex_lock(wl_mx, -1);
	LEGAL(e, 0);
	if (e == 0) {
		concur_yield();
		CHECK(concur_mutex_unlock(wl_mx) == 0);
	}
	LEGAL(concur_chan_send(wl_ch, 5, 0), 0);
	concur_future *b = concur_spawn_blocking(ex, wl_leaf, (void *)7);
	LEGAL(concur_result(b, -1), 7);
	concur_release(b);
	return 100 + (intptr_t)arg;
}

/* TSan runs a case ~50x slower than the normal build: a smaller workload and sample there */
#if defined(__SANITIZE_THREAD__)
enum { WL_TASKS = 6, WL_ROUNDS = 4, SWEEP_FIRST = 16, SWEEP_DIV = 20 };
#elif defined(__SANITIZE_ADDRESS__)
enum { WL_TASKS = 6, WL_ROUNDS = 16, SWEEP_FIRST = 64, SWEEP_DIV = 10 };
#else
enum { WL_TASKS = 6, WL_ROUNDS = 16, SWEEP_FIRST = 64, SWEEP_DIV = 1 };
#endif

/* One round of work from outside: tasks, a promise and what hangs off it, a blocking job, a
 * group, and the compositions over them. */
static void workload_round(concur_exec *ex)
{
	concur_future *fs[WL_TASKS];
	for (int i = 0; i < WL_TASKS; i++) {
		fs[i] = concur_spawn(ex, wl_task, (void *)(intptr_t)i);
		wl_on_done(fs[i]);
	}
	concur_future *p = concur_promise_new(ex);
	concur_future *th = NULL, *af = NULL;
	if (p) {
		wl_on_done(p);
		th = concur_then(p, wl_add1, NULL);
		concur_future *in[2] = {fs[0], p};
		af = concur_spawn_after(ex, wl_sum, NULL, in, 2);
	}
	concur_future *bl = concur_spawn_blocking(ex, wl_leaf, (void *)9);
	concur_group *g = NULL;
	int e = concur_group_new(&g, ex, 0);
	LEGAL(e, 0);
	if (!e)
		for (int i = 0; i < 3; i++)
			concur_release(concur_group_spawn(g, wl_leaf, (void *)(intptr_t)i));
	concur_as_completed *it = NULL;
	e = concur_as_completed_new(&it, fs, WL_TASKS, -1);
	LEGAL(e, 0);
	if (p)
		CHECK(concur_promise_set(p, 5) == 0);

	int64_t vals[WL_TASKS];
	int64_t gr = concur_gather(fs, WL_TASKS, -1, vals, NULL);
	LEGAL(gr, 0);
	for (int i = 0; i < WL_TASKS; i++)
		LEGAL(vals[i], gr == 0 ? 100 + i : vals[i]);
	bool done[WL_TASKS];
	int w = concur_wait(fs, WL_TASKS, CONCUR_ALL_COMPLETED, -1, done);
	LEGAL(w, WL_TASKS);
	if (it) {
		concur_future *f;
		int k, n = 0;
		while ((k = concur_as_completed_next(it, &f)) == 1) {
			CHECK(concur_done(f));
			concur_release(f);
			n++;
		}
		LEGAL(k, 0);
		concur_as_completed_free(it);
	}
	if (g) {
		LEGAL(concur_group_wait(g, -1), 0);
		concur_group_free(g);
	}
	if (th) {
		LEGAL(concur_result(th, -1), 6);
		concur_release(th);
	}
	if (af) {
		LEGAL(concur_result(af, -1), 105);
		concur_release(af);
	}
	LEGAL(concur_result(bl, -1), 9);
	concur_release(bl);
	for (int i = 0; i < WL_TASKS; i++) {
		LEGAL(concur_result(fs[i], -1), 100 + i);
		concur_release(fs[i]);
	}
	concur_release(p);
}

/* Runs on a thread of its own (its doorbell ring goes when it exits). */
static void *workload(void *arg)
{
	(void)arg;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 2};
	int e = concur_exec_new(&ex, &o);
	LEGAL(e, 0);
	if (e)
		return NULL;
	e = concur_mutex_new(&wl_mx);
	LEGAL(e, 0);
	int e2 = concur_chan_new(&wl_ch, 16);
	LEGAL(e2, 0);
	if (e || e2) {
		concur_mutex_free(wl_mx);
		concur_chan_free(wl_ch);
		concur_exec_free(ex);
		return NULL;
	}

	for (int round = 0; round < WL_ROUNDS; round++)
		workload_round(ex);
	LEGAL(concur_exec_join(ex, -1), 0);
	int64_t v;
	while (concur_chan_recv(wl_ch, &v, 0) == 0)
		;
	concur_chan_free(wl_ch);
	concur_mutex_free(wl_mx);
	concur_exec_free(ex);
	return NULL;
}

/* ---- one case in a child ------------------------------------------------------------------ */

struct counts {
	long calls[WRAP_KINDS];
	long failed[WRAP_KINDS];
};
static struct counts *shared; /* MAP_SHARED: the child's counts, for the parent */

enum { LIMIT_NONE, LIMIT_NOFILE, LIMIT_MEMLOCK };

/* The child's body: returns its exit code (0: the case passed). */
static int child(int kind, long n, int mode, int limit, long lim)
{
	alarm(CHILD_ALARM_S);
	concur_blocking_config(0, MS(1)); /* idle helpers go at once, for the leak count */
	if (limit) {
		struct rlimit rl = {(rlim_t)lim, (rlim_t)lim};
		if (setrlimit(limit == LIMIT_NOFILE ? RLIMIT_NOFILE : RLIMIT_MEMLOCK, &rl))
			return 4;
	}
	long live0 = atomic_load(&wrap_live);
	if (kind >= 0)
		wrap_arm(kind, n, mode);
	else
		wrap_arm(0, LONG_MAX, WRAP_ONE); /* count only */
	pthread_t t;
	int e = __real_pthread_create(&t, NULL, workload, NULL);
	if (e)
		return 4;
	pthread_join(t, NULL);
	wrap_disarm();
	for (int k = 0; k < WRAP_KINDS; k++) {
		shared->calls[k] = atomic_load(&wrap_calls[k]);
		shared->failed[k] = atomic_load(&wrap_failed[k]);
	}
	for (int w = 0; w < 2000 && concur_blocking_threads(); w++)
		usleep(1000);
	long live = atomic_load(&wrap_live) - live0;
	for (int w = 0; w < 1000 && live; w++) { /* exiting threads free their doorbell rings */
		usleep(1000);
		live = atomic_load(&wrap_live) - live0;
	}
	if (live) {
		fprintf(stderr, "fault: %ld heap blocks left\n", live);
		return 5;
	}
	if (atomic_load(&cb_fired) != atomic_load(&cb_added)) {
		fprintf(stderr, "fault: %ld of %ld callbacks ran\n", atomic_load(&cb_fired),
		        atomic_load(&cb_added));
		return 6;
	}
	return 0;
}

static int failures;

/* Run a case in a child; returns the child's exit code, or 128 + the signal that ended it. */
static int run_case(int kind, long n, int mode, int limit, long lim)
{
	fflush(stdout);
	fflush(stderr);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0)
		_exit(child(kind, n, mode, limit, lim));
	int st;
	assert_int_equal(waitpid(pid, &st, 0), pid);
	int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	if (code) {
		failures++;
		const char *why = code == 128 + SIGALRM ? "HANG"
		                  : code == 3           ? "illegal result"
		                  : code == 5           ? "leak"
		                  : code == 6           ? "callbacks lost"
		                  : code > 128          ? "crash"
		                                        : "error";
		if (limit)
			printf("fault FAILED: %s %ld: %s (exit %d)\n",
			       limit == LIMIT_NOFILE ? "RLIMIT_NOFILE" : "RLIMIT_MEMLOCK", lim, why,
			       code);
		else
			printf("fault FAILED: %s call %ld fails (%s): %s (exit %d)\n",
			       kind >= 0 ? wrap_kind_name[kind] : "nothing", n,
			       mode == WRAP_ONE ? "that one" : "and on", why, code);
	}
	return code;
}

/* ---- the sweeps ----------------------------------------------------------------------------- */

static bool full_sweep(void)
{
	const char *s = getenv("CONCUR_FAULT_FULL");
	return s && *s && *s != '0';
}

/* The Ns to try for `calls` calls: all of the first SWEEP_FIRST, then about `budget` spread
 * evenly. */
static long next_n(long n, long calls, long budget)
{
	if (full_sweep() || n < SWEEP_FIRST)
		return n + 1;
	long step = (calls - SWEEP_FIRST) / (budget > 0 ? budget : 1);
	return n + (step > 1 ? step : 1);
}

/* A submit that keeps failing forever can only stall the loop: for submits the "from N on"
 * sweep is a burst of WRAP_BURST_LEN failures (the kernel's transient -EBUSY/-EAGAIN). */
static void sweep_kind(int kind, long budget)
{
	int last = kind == WRAP_SUBMIT ? WRAP_BURST : WRAP_FROM;
	/* how many calls of this kind the workload makes, untouched */
	assert_int_equal(run_case(-1, 0, 0, 0, 0), 0);
	long calls = shared->calls[kind];
	int64_t t0 = now_ns();
	long cases = 0;
	for (int mode = WRAP_ONE; mode <= last; mode++) {
		if (mode == WRAP_FROM && last == WRAP_BURST)
			continue;
		for (long n = 0; n <= calls; n = next_n(n, calls, budget)) {
			run_case(kind, n, mode, 0, 0);
			cases++;
		}
	}
	printf("fault: %-14s %5ld calls in the workload, %4ld cases (both modes), %.1f s\n",
	       wrap_kind_name[kind], calls, cases, (now_ns() - t0) / 1e9);
}

/* Sanitized builds are slow: a sample there, the full sweep is for the normal build. */
#define BUDGET(n) ((n) / SWEEP_DIV)

static void test_fault_malloc(void **state)
{
	(void)state;
	sweep_kind(WRAP_MALLOC, BUDGET(250));
	assert_int_equal(failures, 0);
}

static void test_fault_mmap(void **state)
{
	(void)state;
	sweep_kind(WRAP_MMAP, BUDGET(100));
	assert_int_equal(failures, 0);
}

static void test_fault_thread(void **state)
{
	(void)state;
	sweep_kind(WRAP_THREAD, BUDGET(100));
	assert_int_equal(failures, 0);
}

static void test_fault_ring_setup(void **state)
{
	(void)state;
	sweep_kind(WRAP_RING_SETUP, BUDGET(100));
	assert_int_equal(failures, 0);
}

static void test_fault_submit(void **state)
{
	(void)state;
	sweep_kind(WRAP_SUBMIT, BUDGET(150));
	assert_int_equal(failures, 0);
}

static void test_fault_nofile(void **state)
{
	(void)state;
	/* from 4 fds on: no thread outside the executor needs an fd to wake a loop (defect 2) */
	for (long lim = 4; lim <= 64; lim += (SANITIZED && lim >= 16) ? 8 : 1)
		run_case(-1, 0, 0, LIMIT_NOFILE, lim);
	assert_int_equal(failures, 0);
}

static void test_fault_memlock(void **state)
{
	(void)state;
	run_case(-1, 0, 0, LIMIT_MEMLOCK, 0);
	assert_int_equal(failures, 0);
}

/*
 * Without a mapping for a chunk (the map count reached, say), a burst's records past the first
 * slabs come from the malloc arena: no spawn fails, and nothing is left behind. In this
 * process: only the spawning task runs while mmap fails. ASan builds malloc each record.
 */
#define CHUNK_BURST 20000
static atomic_long chunk_burst_ran;

static int64_t chunk_burst_leaf(void *arg)
{
	(void)arg;
	atomic_fetch_add(&chunk_burst_ran, 1);
	return 0;
}

/* A burst on the loop; with mmap failing throughout (WRAP_MMAP), or munmap failing from its end
 * on, while its tasks run and drain their chunks (WRAP_MUNMAP). */
struct chunk_burst {
	concur_exec *ex;
	int fail;
	long mapped;  /* chunks mapped at the burst's end */
	long refused; /* calls of `fail` refused */
	long ran;     /* chunks mapped once its tasks ran */
	long freed;   /* chunks mapped once the executor is freed */
};

static int64_t chunk_burst_task(void *arg)
{
	struct chunk_burst *b = arg;
	int64_t r = 0;
	if (b->fail == WRAP_MMAP)
		wrap_arm(WRAP_MMAP, 0, WRAP_FROM);
	for (int i = 0; i < CHUNK_BURST && r == 0; i++) {
		concur_future *f = concur_spawn(b->ex, chunk_burst_leaf, NULL);
		r = concur_done(f) ? concur_result(f, 0) : 0; /* a failed spawn is done */
		concur_release(f);
	}
	b->mapped = concur__chunks_live();
	if (b->fail == WRAP_MMAP) {
		b->refused = atomic_load(&wrap_failed[WRAP_MMAP]);
		wrap_disarm();
	} else {
		wrap_arm(WRAP_MUNMAP, 0, WRAP_FROM); /* disarmed once the tasks ran */
	}
	return r;
}

/* On a thread of its own, whose record cache goes when it exits (for the leak count). */
static void *chunk_burst_run(void *arg)
{
	struct chunk_burst *b = arg;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	if (concur_exec_new(&ex, &o))
		return NULL;
	b->ex = ex;
	concur_future *f = concur_spawn(ex, chunk_burst_task, b);
	int64_t r = concur_result(f, -1);
	concur_release(f);
	if (r < 0 || concur_exec_join(ex, -1))
		b->refused = -EPROTO;
	if (b->fail == WRAP_MUNMAP) {
		b->refused = atomic_load(&wrap_failed[WRAP_MUNMAP]);
		wrap_disarm();
	}
	b->ran = concur__chunks_live();
	concur_exec_free(ex);
	b->freed = concur__chunks_live();
	return NULL;
}

/* Runs the burst with `fail` failing; b as chunk_burst_run leaves it. */
static void chunk_burst_case(int fail, struct chunk_burst *b)
{
	b->fail = fail;
	b->refused = -1;
	atomic_store(&chunk_burst_ran, 0);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, chunk_burst_run, b), 0);
	assert_int_equal(pthread_join(th, NULL), 0);
	assert_int_equal(atomic_load(&chunk_burst_ran), CHUNK_BURST);
}

static void test_fault_chunk_mmap(void **state)
{
	(void)state;
	long live0 = atomic_load(&wrap_live);
	assert_int_equal(concur__chunks_live(), 0); /* no test before made one */
	struct chunk_burst b = {0};
	chunk_burst_case(WRAP_MMAP, &b);
#ifdef CONCUR__ASAN
	assert_int_equal(b.refused, 0);
#else
	assert_true(b.refused > 0); /* a chunk was asked for, and refused */
#endif
	assert_int_equal(b.mapped, 0);
	assert_int_equal(b.ran, 0);
	assert_int_equal(b.freed, 0);
	assert_int_equal(atomic_load(&wrap_live), live0);
}

/*
 * A timed wait whose deadline finds no room in the loop's timer heap fails with -ENOMEM (an op's
 * falls back to a linked timeout): the deadline must not outlive that wait. It used to stay in
 * the task's books, so that once it had passed, every later wait of the task failed at once
 * with -ETIMEDOUT.
 */
struct deadline_refused {
	concur_future *gate;
	int64_t timed, after;
	long refused;
};

static int64_t deadline_refused_task(void *arg)
{
	struct deadline_refused *d = arg;
	wrap_arm(WRAP_MALLOC, 0, WRAP_ONE); /* the heap's first growth: a new loop's is empty */
	d->timed = concur_result(d->gate, MS(1));
	d->refused = atomic_load(&wrap_failed[WRAP_MALLOC]);
	wrap_disarm();
	spin_ns(MS(20)); /* well past the refused deadline, on the coarse clock too */
	d->after = concur_await_nop();
	return 0;
}

static void test_fault_wait_deadline_refused(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	struct deadline_refused d = {.gate = concur_promise_new(ex)};
	concur_future *f = concur_spawn(ex, deadline_refused_task, &d);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(d.refused, 1);
	assert_int_equal(d.timed, -ENOMEM);
	assert_int_equal(d.after, 0);
	concur_release(d.gate);
	concur_exec_free(ex);
}

/*
 * A scope's deadline whose place in the timer heap was refused once is placed again when memory
 * is back: it breaks the next wait, untimed or timed later than it. Order forced: the task's
 * entry leaves the heap as an inner scope fires; 64 reads with deadlines fill the heap's room;
 * the pop that puts the outer scope back in force finds no memory to grow it. The deadline was
 * then in no heap for good (its due unchanged, every later placement skipped): the untimed wait
 * hung, and a 1 s sleep under the 300 ms scope slept its whole second.
 */
#define POP_FILL 64 /* the room of a loop's timer heap after its first growth */

struct pop_refused {
	int fd;
	concur_future *gate;
	bool sleep; /* the later wait: a sleep of 1 s (else an untimed wait on gate) */
	/* all of it in a cancelled task's shielded cleanup, whose waits take the slow check */
	bool cancelled;
	concur_future *go;
	atomic_int started;
	int64_t slept, popped, waited, elapsed;
	long refused;
};

static int64_t pop_refused_task(void *arg)
{
	struct pop_refused *d = arg;
	concur_exec *ex = concur_current_exec();
	char c[POP_FILL];
	concur_future *fill[POP_FILL];
	if (d->cancelled) {
		concur_shield_push();
		atomic_store(&d->started, 1);
		concur_result(d->go, -1); /* the test cancels the task meanwhile */
		if (!concur_cancel_requested())
			return -2;
	}
	if (concur_deadline_push(MS(300)) || concur_deadline_push(MS(1)))
		return -1;
	d->slept = concur_sleep(MS(1000)); /* the 1 ms scope fires: the task leaves the heap */
	for (int i = 0; i < POP_FILL; i++)
		fill[i] = concur_read(ex, d->fd, &c[i], 1, -1, MS(10000));
	wrap_arm(WRAP_MALLOC, 0, WRAP_ONE);
	d->popped = concur_deadline_pop(); /* the 300 ms scope again: no room for it */
	d->refused = atomic_load(&wrap_failed[WRAP_MALLOC]);
	wrap_disarm();
	for (int i = 0; i < POP_FILL; i++) { /* the heap empties */
		concur_cancel(fill[i]);
		concur_result(fill[i], -1);
		concur_release(fill[i]);
	}
	int64_t t0 = now_ns();
	d->waited = d->sleep ? concur_sleep(MS(1000)) : concur_result(d->gate, -1);
	d->elapsed = now_ns() - t0;
	concur_deadline_pop();
	if (d->cancelled)
		concur_shield_pop();
	return 0;
}

static void pop_refused_case(bool sleep, bool cancelled)
{
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	int p[2];
	assert_int_equal(pipe(p), 0); /* nobody writes: the reads wait */
	struct pop_refused d = {.fd = p[0],
	                        .gate = concur_promise_new(ex),
	                        .sleep = sleep,
	                        .cancelled = cancelled,
	                        .go = concur_promise_new(ex)};
	concur_future *f = concur_spawn(ex, pop_refused_task, &d);
	if (cancelled) {
		while (!atomic_load(&d.started))
			usleep(100);
		assert_int_equal(concur_cancel(f), -EINPROGRESS);
		assert_int_equal(concur_promise_set(d.go, 0), 0);
	}
	if (concur_result(f, MS(5000)) == -ETIMEDOUT) /* stuck in the untimed wait: let it go */
		concur_promise_set(d.gate, 7);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(d.slept, -ETIMEDOUT);
	assert_int_equal(d.popped, 1);
	assert_int_equal(d.refused, 1);
	assert_int_equal(d.waited, -ETIMEDOUT);
	assert_true(d.elapsed <
	            MS(900)); /* the scope's end (300 ms from its push), not the sleep's */
	concur_release(d.gate);
	concur_release(d.go);
	concur_exec_free(ex);
	close(p[0]);
	close(p[1]);
}

static void test_fault_scope_placed_again(void **state)
{
	(void)state;
	pop_refused_case(false, false);
	pop_refused_case(true, false);
	pop_refused_case(false, true);
}

/*
 * A sleep whose end finds no room in the loop's timer heap sleeps on a kernel timer of its own.
 * It used to return -ENOMEM at once (a retry loop around it spun).
 */
struct sleep_refused {
	int64_t r, slept;
	long refused;
};

static int64_t sleep_refused_task(void *arg)
{
	struct sleep_refused *d = arg;
	int64_t t0 = now_ns();
	wrap_arm(WRAP_MALLOC, 0, WRAP_ONE); /* the heap's first growth: a new loop's is empty */
	d->r = concur_sleep(MS(50));
	d->refused = atomic_load(&wrap_failed[WRAP_MALLOC]);
	wrap_disarm();
	d->slept = now_ns() - t0;
	return 0;
}

static void test_fault_sleep_refused(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	struct sleep_refused d = {0};
	concur_future *f = concur_spawn(ex, sleep_refused_task, &d);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(d.refused, 1);
	assert_int_equal(d.r, 0);
	assert_true(d.slept >= MS(50));
	concur_exec_free(ex);
}

/*
 * A future op's deadline that finds no room in the loop's timer heap takes a linked timeout
 * instead: the op still times out, and the heap's refusal costs nothing else.
 */
struct op_deadline_refused {
	int fd;
	int64_t timed;
	bool done; /* by the op's own deadline, not the wait's */
	long refused;
};

static int64_t op_deadline_refused_task(void *arg)
{
	struct op_deadline_refused *d = arg;
	char c;
	/* an op record in the loop's cache first: the heap's growth is then the one allocation */
	concur_future *warm = concur_nop(concur_current_exec());
	concur_result(warm, -1);
	concur_release(warm);
	wrap_arm(WRAP_MALLOC, 0, WRAP_ONE); /* the heap's first growth: a new loop's is empty */
	concur_future *f = concur_read(concur_current_exec(), d->fd, &c, 1, -1, MS(20));
	d->refused = atomic_load(&wrap_failed[WRAP_MALLOC]);
	wrap_disarm();
	d->timed = concur_result(f, MS(10000));
	d->done = concur_done(f);
	if (!d->done) {
		concur_cancel(f);
		concur_result(f, -1);
	}
	concur_release(f);
	return 0;
}

static void test_fault_op_deadline_refused(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	int p[2];
	assert_int_equal(pipe(p), 0); /* nobody writes: the read waits */
	struct op_deadline_refused d = {.fd = p[0]};
	concur_future *f = concur_spawn(ex, op_deadline_refused_task, &d);
	assert_int_equal(concur_result(f, -1), 0);
	concur_release(f);
	assert_int_equal(d.refused, 1);
	assert_true(d.done);
	assert_int_equal(d.timed, -ETIMEDOUT);
	concur_exec_free(ex);
	close(p[0]);
	close(p[1]);
}

/*
 * A cancel of a running task with no memory for its message still breaks the wait the task is
 * in (the loop looks over its tasks' requests instead). It used to leave the request in the
 * state word only: the wait ran on, for good (a later cancel finds the request made already).
 */
static int cancel_pipe[2];

static int64_t read_cancel_pipe(void *arg)
{
	(void)arg;
	char c;
	return concur_await_read(cancel_pipe[0], &c, 1, -1, -1);
}

/* A 1-loop executor (*exp) with a task in its read of cancel_pipe: the loop asleep, the task in
 * its read with nothing else to run. */
static concur_future *reader_in_its_read(concur_exec **exp)
{
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(pipe(cancel_pipe), 0);
	assert_int_equal(concur_exec_new(exp, &o), 0);
	concur_future *t = concur_spawn(*exp, read_cancel_pipe, NULL);
	assert_true(flag_set(&(*exp)->loops[0]->sleeping));
	return t;
}

static void test_fault_cancel_message_refused(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	concur_future *t = reader_in_its_read(&ex);
	wrap_arm(WRAP_MALLOC, 0, WRAP_ONE); /* the cancel's message */
	int c = concur_cancel(t);
	long refused = atomic_load(&wrap_failed[WRAP_MALLOC]);
	wrap_disarm();
	assert_int_equal(c, -EINPROGRESS);
	assert_int_equal(refused, 1);
	int64_t r = concur_result(t, MS(2000));
	assert_int_equal(write(cancel_pipe[1], "x", 1), 1); /* (a lost cancel: lets the read end) */
	assert_int_equal(r, -ECANCELED);
	concur_release(t);
	concur_exec_free(ex);
	close(cancel_pipe[0]);
	close(cancel_pipe[1]);
}

/*
 * A cancel from a thread outside the executor, made while the task runs, whose task then ends by
 * itself: the executor, idle, could be freed under the canceller, still on its way to post the
 * message (ASan: a use after free of the loop and the executor). The message is the executor's
 * work from before the request: the free waits for it. Forced: the canceller is held in the
 * malloc of its message while the task ends and another thread frees the executor.
 */
static pthread_t canceller;
static atomic_int canceller_state; /* 1: held in malloc, 2: go on */
static atomic_int freed;

static void hold_canceller_malloc(void)
{
	if (!pthread_equal(pthread_self(), canceller) || atomic_load(&canceller_state) != 0)
		return;
	atomic_store(&canceller_state, 1);
	while (atomic_load(&canceller_state) != 2)
		usleep(100);
}

static void *cancel_it(void *arg)
{
	return (void *)(intptr_t)concur_cancel(arg);
}

static void *free_it(void *arg)
{
	concur_exec_free(arg);
	atomic_store(&freed, 1);
	return NULL;
}

static void test_fault_cancel_racing_free(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	concur_future *t = reader_in_its_read(&ex);
	atomic_store(&canceller_state, 0);
	atomic_store(&freed, 0);
	atomic_store(&wrap_malloc_hook, hold_canceller_malloc);
	assert_int_equal(pthread_create(&canceller, NULL, cancel_it, t), 0);
	while (atomic_load(&canceller_state) != 1)
		usleep(100);
	assert_int_equal(write(cancel_pipe[1], "x", 1), 1); /* t ends by itself */
	assert_int_equal(concur_result(t, -1), 1);
	pthread_t fr;
	assert_int_equal(pthread_create(&fr, NULL, free_it, ex), 0);
	usleep(200000);
	int early = atomic_load(&freed);
	atomic_store(&canceller_state, 2);
	void *c;
	assert_int_equal(pthread_join(canceller, &c), 0);
	atomic_store(&wrap_malloc_hook, NULL);
	assert_int_equal(pthread_join(fr, NULL), 0);
	assert_int_equal(early, 0); /* the free waited for the message */
	assert_int_equal((intptr_t)c, -EINPROGRESS);
	concur_release(t);
	close(cancel_pipe[0]);
	close(cancel_pipe[1]);
}

/*
 * A group's cancel with no memory for its list of members still tells every member (a failure's
 * cancel, CONCUR_GROUP_CANCEL_ON_FAILURE, has nobody to report -ENOMEM to). It used to return
 * -ENOMEM having told nobody, with the group marked cancelled: its wait hung on the members.
 */
static void test_fault_group_cancel_refused(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(pipe(cancel_pipe), 0);
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	concur_group *g = NULL;
	assert_int_equal(concur_group_new(&g, ex, 0), 0);
	concur_future *a = concur_group_spawn(g, read_cancel_pipe, NULL);
	concur_future *b = concur_group_spawn(g, read_cancel_pipe, NULL);
	assert_true(flag_set(&ex->loops[0]->sleeping)); /* both in their reads */
	wrap_arm(WRAP_MALLOC, 0, WRAP_ONE);             /* the cancel's list */
	int n = concur_group_cancel(g);
	long refused = atomic_load(&wrap_failed[WRAP_MALLOC]);
	wrap_disarm();
	assert_int_equal(refused, 1);
	assert_int_equal(n, 2);
	int64_t r = concur_group_wait(g, MS(2000));
	assert_int_equal(write(cancel_pipe[1], "xx", 2), 2); /* (lost cancels: let the reads end) */
	assert_int_equal(r, -ECANCELED);
	assert_int_equal(concur_result(a, -1), -ECANCELED);
	assert_int_equal(concur_result(b, -1), -ECANCELED);
	concur_release(a);
	concur_release(b);
	concur_group_free(g);
	concur_exec_free(ex);
	close(cancel_pipe[0]);
	close(cancel_pipe[1]);
}

/*
 * A thread outside the executor that completes what a task awaits posts the task to its loop and
 * rings it; the task may run, the last work end and a join return while that thread is still
 * in the post. concur_exec_free must wait for it: it used to free the executor under it (the
 * poster then counted its doorbell in freed memory). Forced: the poster is held just after it
 * let go of the doorbell's lock, and let go 300 ms later by another thread.
 */
static concur_exec *post_ex;
static concur_future *post_gate;
static pthread_t poster_thread;
static __thread bool is_poster;
static sem_t poster_held, poster_go;
static atomic_bool poster_done;

static void hold_poster(pthread_mutex_t *m)
{
	if (is_poster && m == &post_ex->bell_lock) {
		atomic_store(&wrap_unlocked_hook, NULL);
		sem_post(&poster_held);
		while (sem_wait(&poster_go))
			;
	}
}

static void *post_and_ring(void *arg)
{
	(void)arg;
	is_poster = true;
	concur_promise_set(post_gate, 7);
	atomic_store(&poster_done, true);
	return NULL;
}

static void *let_poster_go(void *arg)
{
	(void)arg;
	usleep(300 * 1000);
	sem_post(&poster_go);
	return NULL;
}

static int64_t await_gate(void *arg)
{
	(void)arg;
	return concur_result(post_gate, -1);
}

static int free_waits_for_poster_child(int unused)
{
	(void)unused;
	struct concur_exec_opts o = {.loops = 1};
	if (sem_init(&poster_held, 0, 0) || sem_init(&poster_go, 0, 0) ||
	    concur_exec_new(&post_ex, &o))
		return 1;
	post_gate = concur_promise_new(post_ex);
	concur_future *t = concur_spawn(post_ex, await_gate, NULL);
	if (!flag_set(&post_ex->loops[0]->sleeping))
		return 2; /* the task in its wait, the loop asleep: the post rings */
	atomic_store(&wrap_unlocked_hook, hold_poster);
	pthread_t go;
	if (pthread_create(&poster_thread, NULL, post_and_ring, NULL))
		return 3;
	while (sem_wait(&poster_held))
		;
	if (concur_result(t, -1) != 7)
		return 4;
	concur_release(t);
	concur_release(post_gate);
	if (pthread_create(&go, NULL, let_poster_go, NULL))
		return 5;
	concur_exec_free(post_ex);
	bool done = atomic_load(&poster_done);
	pthread_join(poster_thread, NULL);
	pthread_join(go, NULL);
	return done ? 0 : 6; /* 6: freed while the poster was still in its post */
}

static void test_fault_free_waits_for_poster(void **state)
{
	(void)state;
	expect_child_ok(free_waits_for_poster_child, 0);
}

/*
 * A stack reservation whose munmap is refused (it splits a mapping the neighbours merged into,
 * at the map count's limit) gives its pages back all the same. It used to stay mapped with the
 * task's stack in memory, its record freed: up to 64 MiB a reservation, lost for good.
 */
static uintptr_t stack_seen;
static int64_t note_stack(void *arg)
{
	(void)arg;
	volatile char buf[256];
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (char)i;
	stack_seen = (uintptr_t)buf;
	return buf[7];
}

static void test_fault_stack_munmap(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	concur_future *t = concur_spawn(ex, note_stack, NULL);
	assert_int_equal(concur_result(t, -1), 7);
	concur_release(t);
	long page = sysconf(_SC_PAGESIZE);
	void *p = (void *)(stack_seen & ~(uintptr_t)(page - 1));
	unsigned char in = 0;
	assert_int_equal(mincore(p, (size_t)page, &in), 0);
	assert_true(in & 1); /* the stack's page, resident */
	wrap_arm(WRAP_MUNMAP, 0, WRAP_FROM);
	concur_exec_free(ex);
	long refused = atomic_load(&wrap_failed[WRAP_MUNMAP]);
	wrap_disarm();
	assert_true(refused > 0);
	in = 0;
	assert_int_equal(mincore(p, (size_t)page, &in), 0); /* still mapped: refused */
	assert_false(in & 1);                               /* but given back */
}

/*
 * A group's first failure is the first in completion order, as far as anyone could observe: a
 * member must be registered before it can run. It was queued first, so a member could fail,
 * and be seen done, before the group heard of it; a member failing later was then recorded
 * first. Forced: right after the group's lock is let go in concur_group_spawn (member A on the
 * list, its node not on A yet), the test waits (up to 200 ms) to see A done, then makes B fail.
 */
static concur_group *order_g;
static concur_future *order_p, *order_b;
static _Atomic(concur_future *) order_a;
static bool order_a_first;
static __thread bool order_armed;

static void fail_b_in_window(pthread_mutex_t *m)
{
	if (!order_armed || (char *)m < (char *)order_g || (char *)m >= (char *)order_g + 256)
		return;
	order_armed = false;
	int64_t t0 = now_ns();
	concur_future *a;
	while (!((a = atomic_load(&order_a)) && concur_done(a)) && now_ns() - t0 < MS(200))
		usleep(100);
	order_a_first = a && concur_done(a);
	concur_promise_set(order_p, 1);
	concur_result(order_b, -1);
}

static int64_t member_b(void *arg)
{
	(void)arg;
	concur_result(order_p, -1);
	return -EPERM;
}

static int64_t member_a(void *arg)
{
	(void)arg;
	atomic_store(&order_a, concur_retain(&concur__tl_task->f));
	return -EIO;
}

static void test_fault_group_first_failure_order(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 2};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	assert_int_equal(concur_group_new(&order_g, ex, 0), 0);
	order_p = concur_promise_new(ex);
	order_b = concur_group_spawn(order_g, member_b, NULL);
	atomic_store(&wrap_unlocked_hook, fail_b_in_window);
	order_armed = true;
	concur_future *a = concur_group_spawn(order_g, member_a, NULL);
	atomic_store(&wrap_unlocked_hook, NULL);
	int64_t r = concur_group_wait(order_g, -1);
	assert_int_equal(r, order_a_first ? -EIO : -EPERM);
	assert_int_equal(concur_result(a, -1), -EIO);
	concur_release(a);
	concur_release(atomic_load(&order_a));
	concur_release(order_b);
	concur_release(order_p);
	concur_group_free(order_g);
	concur_exec_free(ex);
}

/*
 * A group cancelled while a member is being added (on the list, its node not on it yet) ends
 * that member at once; the member must still be recorded, or the group's count never reaches 0
 * and its wait hangs. Forced: the cancel runs right after the group's lock is let go in
 * concur_group_spawn.
 */
static concur_group *late_g;
static __thread bool late_armed;
static void cancel_group_in_window(pthread_mutex_t *m)
{
	if (!late_armed || (char *)m < (char *)late_g || (char *)m >= (char *)late_g + 256)
		return;
	late_armed = false;
	concur_group_cancel(late_g);
}
static int64_t late_member(void *arg)
{
	(void)arg;
	return 0;
}

static void test_fault_group_cancel_while_adding(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	assert_int_equal(concur_group_new(&late_g, ex, 0), 0);
	atomic_store(&wrap_unlocked_hook, cancel_group_in_window);
	late_armed = true;
	concur_future *f = concur_group_spawn(late_g, late_member, NULL);
	atomic_store(&wrap_unlocked_hook, NULL);
	assert_int_equal(concur_group_wait(late_g, MS(2000)), -ECANCELED);
	assert_true(concur_cancelled(f));
	concur_release(f);
	concur_group_free(late_g);
	concur_exec_free(ex);
}

/*
 * A waiter may free a sync object as soon as its own wait returned. An event's set (and a
 * semaphore's release by n, a channel's close) used to wake the waiters with the object's lock
 * held, and go on using the object after: the waiter freed it under the waker. Forced: the setter
 * is held 100 ms just after it woke the waiter, which frees the event meanwhile (ASan reports
 * the use after free the setter then made).
 */
static concur_event *freed_ev;
static __thread bool hold_after_set;
static void hold_setter(void)
{
	if (hold_after_set) {
		hold_after_set = false;
		usleep(100 * 1000);
	}
}
static int64_t set_then_held(void *arg)
{
	(void)arg;
	concur_sleep(MS(50)); /* (the waiter queues meanwhile) */
	hold_after_set = true;
	return concur_event_set(freed_ev);
}

static void test_fault_waiter_frees_event(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	assert_int_equal(concur_event_new(&freed_ev), 0);
	atomic_store(&wrap_promise_set_hook, hold_setter);
	concur_future *t = concur_spawn(ex, set_then_held, NULL);
	assert_int_equal(concur_event_wait(freed_ev, MS(5000)), 0);
	concur_event_free(freed_ev); /* its wait returned: ours to free */
	assert_int_equal(concur_result(t, -1), 0);
	atomic_store(&wrap_promise_set_hook, NULL);
	concur_release(t);
	concur_exec_free(ex);
}

/*
 * A waiter may free a sync object as soon as its own wait returned, even while the call that
 * woke it is still returning. A semaphore's release by n, an event's set and a channel's close
 * granted 16 waiters at a time, set their promises with the lock dropped, and took the lock again
 * for the next 16 if others were queued: by then those could have timed out and gone, and a
 * woken waiter freed the object -- the waker then locked and read freed memory. Forced: 17 tasks
 * wait, the last with a timeout; the waker is held after its 16th wake until that timeout has
 * passed and the first waiter, once the last one returned, frees the object (a bounded wait: the
 * last one, granted with the others, now returns only once woken, and takes the grant). That free
 * is held until the waker returns, so that the waker's touch (a concur unlock of the object's
 * lock) is seen in every build, not only as ASan's report. The same with the last waiter's task
 * cancelled instead: granted, it must not return before it is woken either (its node is on the
 * waker's list), though its cancel ends every other wait at once.
 */
enum { MANY_SEM, MANY_EVENT, MANY_CHAN };
#define MANY_WAITERS 17
#define MANY_LAST_MS (SANITIZED ? 1000 : 200) /* the last waiter's timeout */
static int many_kind;
static bool many_cancel; /* the last waiter waits for good, and is cancelled */
static void *many_obj;
static concur_future *many_last;    /* the last waiter's task */
static concur_future *many_freeing; /* set when the object's free begins */
static pthread_t many_waker;
static int64_t many_deadline; /* the last waiter's timeout has passed by then */
static atomic_int many_sets;
static atomic_bool many_waker_out, many_touched, many_freed_early;

static int many_wait(int64_t timeout_ns)
{
	int64_t v;
	switch (many_kind) {
	case MANY_SEM:
		return concur_sem_acquire(many_obj, timeout_ns);
	case MANY_EVENT:
		return concur_event_wait(many_obj, timeout_ns);
	default:
		return concur_chan_recv(many_obj, &v, timeout_ns);
	}
}

static int64_t many_middle(void *arg)
{
	(void)arg;
	return many_wait(-1);
}

static int64_t many_timed(void *arg)
{
	(void)arg;
	return many_wait(many_cancel ? -1 : MS(MANY_LAST_MS));
}

/* The first waiter: woken, it frees the object once the last waiter returned. */
static int64_t many_first(void *arg)
{
	(void)arg;
	int r = many_wait(-1);
	concur_result(many_last, -1);
	switch (many_kind) {
	case MANY_SEM:
		concur_sem_free(many_obj);
		break;
	case MANY_EVENT:
		concur_event_free(many_obj);
		break;
	default:
		concur_chan_free(many_obj);
	}
	return r;
}

/* After the waker's 16th wake: until the last waiter timed out (or is cancelled) and the object
 * is being freed. */
static void many_hold_waker(void)
{
	if (!pthread_equal(pthread_self(), many_waker) || atomic_fetch_add(&many_sets, 1) != 15)
		return;
	if (many_cancel)
		concur_cancel(many_last);
	int64_t left = many_deadline - now_ns();
	concur_result(many_freeing, (left > 0 ? left : 0) + MS(SANITIZED ? 1000 : 300));
	atomic_store(&many_freed_early, concur_done(many_freeing));
}

/* The object's free: seen, and held (its memory kept) until the waker returned. */
static void many_hold_free(void *p)
{
	if (p != many_obj)
		return;
	concur_promise_set(many_freeing, 0);
	for (int i = 0; i < 50000 && !atomic_load(&many_waker_out); i++)
		usleep(100);
}

static void many_seen_unlock(pthread_mutex_t *m)
{
	if ((void *)m == many_obj && concur_done(many_freeing))
		atomic_store(&many_touched, true);
}

static void many_waiters_free_under_waker(int kind, bool cancel)
{
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	many_kind = kind;
	many_cancel = cancel;
	switch (kind) {
	case MANY_SEM:
		assert_int_equal(concur_sem_new((concur_sem **)&many_obj, 0), 0);
		break;
	case MANY_EVENT:
		assert_int_equal(concur_event_new((concur_event **)&many_obj), 0);
		break;
	default:
		assert_int_equal(concur_chan_new((concur_chan **)&many_obj, 1), 0);
	}
	many_freeing = concur_promise_new(NULL);
	many_waker = pthread_self();
	atomic_store(&many_sets, 0);
	atomic_store(&many_waker_out, false);
	atomic_store(&many_touched, false);
	atomic_store(&many_freed_early, false);
	concur_future *t[MANY_WAITERS];
	for (int i = 0; i < MANY_WAITERS; i++) /* one loop: they queue in this order */
		t[i] = concur_spawn_on(ex, 0,
		                       i == 0                 ? many_first
		                       : i < MANY_WAITERS - 1 ? many_middle
		                                              : many_timed,
		                       NULL);
	many_last = t[MANY_WAITERS - 1];
	assert_true(flag_set(&ex->loops[0]->sleeping)); /* all 17 queued */
	many_deadline = now_ns() + (cancel ? 0 : MS(MANY_LAST_MS));
	atomic_store(&wrap_free_hook, many_hold_free);
	atomic_store(&wrap_unlocked_hook, many_seen_unlock);
	atomic_store(&wrap_promise_set_hook, many_hold_waker);
	int r = kind == MANY_SEM     ? concur_sem_release(many_obj, MANY_WAITERS)
	        : kind == MANY_EVENT ? concur_event_set(many_obj)
	                             : concur_chan_close(many_obj);
	atomic_store(&many_waker_out, true);
	int64_t res[MANY_WAITERS];
	for (int i = 0; i < MANY_WAITERS; i++) {
		res[i] = concur_result(t[i], MS(10000));
		concur_release(t[i]);
	}
	atomic_store(&wrap_promise_set_hook, NULL);
	atomic_store(&wrap_unlocked_hook, NULL);
	atomic_store(&wrap_free_hook, NULL);
	bool was_freed = concur_done(many_freeing);
	concur_release(many_freeing);
	concur_exec_free(ex);
	assert_int_equal(r, 0);
	assert_true(was_freed); /* the first waiter freed it */
	/* with the waker done with it: once every waiter was woken */
	assert_false(atomic_load(&many_touched));
	assert_false(atomic_load(&many_freed_early));
	/* the last one timed out (was cancelled) after it was granted: it takes the grant */
	for (int i = 0; i < MANY_WAITERS; i++)
		assert_int_equal(res[i], kind == MANY_CHAN ? -EPIPE : 0);
}

static void test_fault_waiter_frees_sem_under_release(void **state)
{
	(void)state;
	many_waiters_free_under_waker(MANY_SEM, false);
}

static void test_fault_waiter_frees_event_under_set(void **state)
{
	(void)state;
	many_waiters_free_under_waker(MANY_EVENT, false);
}

static void test_fault_waiter_frees_chan_under_close(void **state)
{
	(void)state;
	many_waiters_free_under_waker(MANY_CHAN, false);
}

static void test_fault_granted_waiter_cancelled(void **state)
{
	(void)state;
	many_waiters_free_under_waker(MANY_SEM, true);
}

/*
 * An event's set wakes the waiters queued before it, and only those: a clear and a new wait
 * coming while it wakes them (it used to between two batches of 16, the lock dropped in between)
 * must not be woken by that set. Forced: the setter is held after its 16th wake while the event
 * is cleared and a thread queues a new wait (100 ms, it is never set again).
 */
#define LATE_WAITERS 20
static concur_event *batch_ev;
static __thread int sets_seen;
static __thread bool count_sets;
static atomic_int late_wait_r = 1;
static void *late_wait(void *arg)
{
	(void)arg;
	atomic_store(&late_wait_r, concur_event_wait(batch_ev, MS(100)));
	return NULL;
}
static pthread_t late_thread;
static void clear_and_wait_between_batches(void)
{
	if (!count_sets || ++sets_seen != 16)
		return;
	count_sets = false;
	concur_event_clear(batch_ev);
	pthread_create(&late_thread, NULL, late_wait, NULL);
	usleep(50 * 1000); /* (it queues meanwhile) */
}
static int64_t wait_batch_ev(void *arg)
{
	(void)arg;
	return concur_event_wait(batch_ev, -1);
}

static void test_fault_event_set_wakes_its_waiters_only(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	assert_int_equal(concur_event_new(&batch_ev), 0);
	concur_future *t[LATE_WAITERS];
	for (int i = 0; i < LATE_WAITERS; i++)
		t[i] = concur_spawn(ex, wait_batch_ev, NULL);
	assert_true(flag_set(&ex->loops[0]->sleeping)); /* all 20 queued */
	atomic_store(&wrap_promise_set_hook, clear_and_wait_between_batches);
	count_sets = true;
	assert_int_equal(concur_event_set(batch_ev), 0);
	atomic_store(&wrap_promise_set_hook, NULL);
	for (int i = 0; i < LATE_WAITERS; i++) {
		assert_int_equal(concur_result(t[i], -1), 0);
		concur_release(t[i]);
	}
	assert_int_equal(pthread_join(late_thread, NULL), 0);
	assert_int_equal(atomic_load(&late_wait_r), -ETIMEDOUT); /* cleared: not its set */
	concur_event_free(batch_ev);
	concur_exec_free(ex);
}

/*
 * A drained chunk whose munmap is refused (unmapping it from the middle of a mapping splits it,
 * which the map count may refuse) stays mapped, and counted: its pages go back (MADV_DONTNEED).
 * Every chunk the burst made is still counted once its tasks ran; freeing the executor unmaps
 * the rest. Runs last: the chunks refused stay mapped in this process.
 */
static void test_fault_chunk_munmap(void **state)
{
	(void)state;
	assert_int_equal(concur__chunks_live(), 0);
	struct chunk_burst b = {0};
	chunk_burst_case(WRAP_MUNMAP, &b);
#ifdef CONCUR__ASAN
	assert_int_equal(b.mapped, 0);
	assert_int_equal(b.ran, 0);
	assert_int_equal(b.freed, 0);
#else
	assert_true(b.mapped > 0);
	assert_true(b.refused > 0); /* drained chunks were given back, and refused */
	assert_int_equal(b.ran, b.mapped);
	assert_int_equal(b.freed, b.refused);
#endif
}

/*
 * CONCUR_GROUP_CANCEL_ON_FAILURE: once the first failure can be seen (the group's wait returned
 * it), the group is cancelled and later spawns are refused. Forced: the failing member's loop is
 * held just after its done hook let go of the group's lock (no member left, the cancel not made
 * yet). The group used to be marked cancelled only by that cancel: a spawn in between ran.
 */
static concur_group *cof_g;
static _Atomic(concur_future *) cof_a;
static atomic_bool cof_armed, cof_go, cof_held;

static void cof_hold_after_done(pthread_mutex_t *m)
{
	concur_future *a = atomic_load(&cof_a);
	if (!atomic_load(&cof_armed) || concur_current_loop() < 0 || !a || !concur_done(a) ||
	    (char *)m < (char *)cof_g || (char *)m >= (char *)cof_g + 256)
		return; /* (the group's lock is in its first 256 bytes) */
	atomic_store(&cof_armed, false);
	atomic_store(&cof_held, true);
	int64_t t0 = now_ns();
	while (!atomic_load(&cof_go) && now_ns() - t0 < MS(2000))
		usleep(100);
}

static int64_t cof_fail_after_gate(void *arg)
{
	concur_result(arg, -1);
	return -EIO;
}

static int64_t cof_late(void *arg)
{
	(void)arg;
	return 7;
}

static void test_fault_group_cancel_on_failure_seen(void **state)
{
	(void)state;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	assert_int_equal(concur_exec_new(&ex, &o), 0);
	assert_int_equal(concur_group_new(&cof_g, ex, CONCUR_GROUP_CANCEL_ON_FAILURE), 0);
	concur_future *gate = concur_promise_new(ex);
	atomic_store(&cof_go, false);
	atomic_store(&cof_held, false);
	concur_future *a = concur_group_spawn(cof_g, cof_fail_after_gate, gate);
	atomic_store(&cof_a, a);
	atomic_store(&cof_armed, true);
	atomic_store(&wrap_unlocked_hook, cof_hold_after_done);
	concur_promise_set(gate, 0);
	/* the failing member's loop is held in its done hook, the member off the list */
	int64_t t0 = now_ns();
	while (!atomic_load(&cof_held) && now_ns() - t0 < MS(2000))
		usleep(100);
	bool held = atomic_load(&cof_held);
	int64_t r = concur_group_wait(cof_g, 0); /* the failure, seen: every member is done */
	bool cancelled = concur_group_cancelled(cof_g);
	concur_future *late = concur_group_spawn(cof_g, cof_late, NULL);
	bool refused = concur_done(late) && concur_result(late, 0) == -ECANCELED;
	atomic_store(&cof_go, true);
	atomic_store(&wrap_unlocked_hook, NULL);
	concur_result(late, MS(5000));
	concur_release(late);
	concur_release(a);
	concur_release(gate);
	concur_group_free(cof_g);
	concur_exec_free(ex);
	assert_true(held); /* the order under test was forced */
	assert_int_equal(r, -EIO);
	assert_true(cancelled); /* header: cancelled by a failure with CANCEL_ON_FAILURE */
	assert_true(refused);   /* header: later spawns return a future already ended -ECANCELED */
}

/*
 * A loop's message to another loop that the kernel refuses for good still arrives. Loop 0 wakes
 * a task on sleeping loop 1: the MSG_RING carrying it is refused (its SQE is rewritten to name
 * an eventfd, which the kernel refuses with -EBADFD), so the node goes through loop 1's inbox
 * and loop 0 rings loop 1's doorbell -- refused the same way. That refusal used to be dropped:
 * loop 1 slept on with the task in its inbox, and nobody would ring again. (Across executors
 * the doorbell went the same way, and a retry could name a loop freed meanwhile.)
 */
static struct io_uring *refuse_ring;
static int refuse_target_fd, refuse_bad_fd;
static atomic_int refuse_left, refused;

static void refuse_msgs(struct io_uring *ring)
{
	if (ring != refuse_ring)
		return;
	for (unsigned h = ring->sq.sqe_head; h != ring->sq.sqe_tail; h++) {
		struct io_uring_sqe *sqe = &ring->sq.sqes[h & ring->sq.ring_mask];
		if (sqe->opcode == IORING_OP_MSG_RING && sqe->fd == refuse_target_fd &&
		    atomic_load(&refuse_left) > 0) {
			sqe->fd = refuse_bad_fd;
			atomic_fetch_sub(&refuse_left, 1);
			atomic_fetch_add(&refused, 1);
		}
	}
}

static int64_t await_gate_arg(void *arg)
{
	return concur_result(arg, -1);
}

static int64_t set_promise(void *arg)
{
	return concur_promise_set(arg, 7);
}

/* cross: the task waits on another executor's loop, which is rung through its executor's
 * doorbell ring, as a thread outside would: only the node's message is refused. */
static int doorbell_refused_child(int cross)
{
	concur_exec *ex = NULL, *other = NULL;
	struct concur_exec_opts o = {.loops = cross ? 1 : 2};
	if (concur_exec_new(&ex, &o) || (cross && concur_exec_new(&other, &o)))
		return 1;
	struct concur__loop *waiting = cross ? other->loops[0] : ex->loops[1];
	concur_future *gate = concur_promise_new(ex);
	concur_future *w = concur_spawn_on(cross ? other : ex, cross ? 0 : 1, await_gate_arg, gate);
	if (!w || !flag_set(&waiting->sleeping))
		return 2; /* the task in its wait, its loop asleep */
	refuse_ring = &ex->loops[0]->ring;
	refuse_target_fd = waiting->ring_fd;
	refuse_bad_fd = eventfd(0, EFD_CLOEXEC);
	if (refuse_bad_fd < 0)
		return 3;
	atomic_store(&refuse_left, 2); /* the node's message, then a doorbell from our ring */
	atomic_store(&wrap_submit_hook, refuse_msgs);
	concur_future *s = concur_spawn_on(ex, 0, set_promise, gate);
	int64_t r = concur_result(w, 5000000000LL);
	atomic_store(&wrap_submit_hook, NULL);
	if (r == -ETIMEDOUT)
		return 4; /* the task never woke: the refused doorbell was dropped */
	if (r != 7 || concur_result(s, -1) != 0)
		return 5;
	if (atomic_load(&refused) != (cross ? 1 : 2))
		return 6; /* not the path under test */
	concur_release(s);
	concur_release(w);
	concur_release(gate);
	concur_exec_free(ex);
	if (other)
		concur_exec_free(other);
	close(refuse_bad_fd);
	return 0;
}

static void test_fault_loop_doorbell_refused(void **state)
{
	(void)state;
	expect_child_ok(doorbell_refused_child, false);
	expect_child_ok(doorbell_refused_child, true);
}

/* A loop thread that cannot be made: concur_exec_new fails with -EAGAIN (documented now) and
 * says which call failed (the message was empty), nothing left behind (the count is taken after
 * a first failure: the thread's error message is a block of its own, until the thread ends). */
static void test_fault_loop_thread_refused(void **state)
{
	(void)state;
	long base = -1;
	for (long i = 0; i < 3; i++) {
		concur_exec *e = NULL;
		struct concur_exec_opts o = {.loops = 2};
		wrap_arm(WRAP_THREAD, i % 2,
		         WRAP_ONE); /* the first loop's thread, or the second's */
		int r = concur_exec_new(&e, &o);
		wrap_disarm();
		assert_int_equal(r, -EAGAIN);
		assert_null(e);
		assert_non_null(strstr(concur_last_error(), "pthread_create"));
		if (base < 0)
			base = atomic_load(&wrap_live);
		assert_int_equal(atomic_load(&wrap_live), base);
	}
}

/*
 * A loop thread that owes another executor's sleeping loop a wake (its MSG_RING was refused, so
 * the task went into that loop's inbox) rings it through that executor's doorbell ring for as
 * long as the kernel refuses it for a moment. Forced: the MSG_RING is made to fail (its fd an
 * eventfd), then the bell's first 20 submits fail with -EAGAIN. The loop thread used to give
 * up after 8 tries (~1 ms): the other loop slept on with the task in its inbox, for good.
 */
static concur_exec *bell_other;
static atomic_int bell_fail_left;
static struct io_uring *bell_msg_ring; /* the sender loop's ring: its MSG_RING is refused */
static int bell_target_fd, bell_bad_fd;

static void fail_bell_submits(struct io_uring *ring)
{
	if (ring == bell_msg_ring) {
		for (unsigned h = ring->sq.sqe_head; h != ring->sq.sqe_tail; h++) {
			struct io_uring_sqe *sqe = &ring->sq.sqes[h & ring->sq.ring_mask];
			if (sqe->opcode == IORING_OP_MSG_RING && sqe->fd == bell_target_fd) {
				sqe->fd = bell_bad_fd; /* -EBADFD: not a ring */
				bell_msg_ring = NULL;
			}
		}
		wrap_disarm();
	} else if (bell_other && ring == &bell_other->bell && atomic_load(&bell_fail_left) > 0) {
		atomic_fetch_sub(&bell_fail_left, 1);
		wrap_arm(WRAP_SUBMIT, 0, WRAP_ONE); /* this very submit fails with -EAGAIN */
	} else {
		wrap_disarm();
	}
}

static int64_t return_seven(void *arg)
{
	(void)arg;
	return 7;
}

static int64_t spawn_on_other(void *arg)
{
	(void)arg;
	return (int64_t)(intptr_t)concur_spawn(bell_other, return_seven, NULL);
}

static int bell_shortage_child(int unused)
{
	(void)unused;
	concur_exec *ex = NULL;
	struct concur_exec_opts o = {.loops = 1};
	if (concur_exec_new(&ex, &o) || concur_exec_new(&bell_other, &o))
		return 1;
	if (!flag_set(&bell_other->loops[0]->sleeping))
		return 2;
	bell_msg_ring = &ex->loops[0]->ring;
	bell_target_fd = bell_other->loops[0]->ring_fd;
	bell_bad_fd = eventfd(0, EFD_CLOEXEC);
	atomic_store(&bell_fail_left, 20);
	atomic_store(&wrap_submit_hook, fail_bell_submits);
	concur_future *t = concur_spawn(ex, spawn_on_other, NULL);
	concur_future *f = (concur_future *)(intptr_t)concur_result(t, -1);
	int64_t r = concur_result(f, MS(3000));
	atomic_store(&wrap_submit_hook, NULL);
	wrap_disarm();
	if (r == -ETIMEDOUT)
		return 3; /* the wake was lost */
	if (r != 7 || atomic_load(&bell_fail_left) != 0)
		return 4;
	concur_release(f);
	concur_release(t);
	concur_exec_free(ex);
	concur_exec_free(bell_other);
	close(bell_bad_fd);
	return 0;
}

static void test_fault_loop_bell_shortage(void **state)
{
	(void)state;
	expect_child_ok(bell_shortage_child, 0);
}

static int setup(void **state)
{
	(void)state;
	shared = __real_mmap(NULL, sizeof(*shared), PROT_READ | PROT_WRITE,
	                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	return shared == MAP_FAILED ? -1 : 0;
}

static int reset(void **state)
{
	(void)state;
	failures = 0;
	return 0;
}

/*
 * An accept stream whose queue cannot grow (no memory) while its multishot is still armed (each
 * CQE with F_MORE) backs off before it accepts again, however many of those come before its stop
 * does. The second one's stop (stream_transient -> stream_stop) cancelled the back-off timer the
 * first had armed, whose completion re-armed the accept at once: no back-off at all. Forced:
 * two clients wait in the backlog when the accept is first submitted (it takes both inline, two
 * CQEs with F_MORE, dispatched in one reap), and every malloc fails until the task is back.
 */
static int64_t backoff_task(void *arg)
{
	int lfd = *(int *)arg;
	struct sockaddr_in a;
	socklen_t len = sizeof(a);
	concur_stream *s;
	if (getsockname(lfd, (struct sockaddr *)&a, &len))
		return -errno;
	int c[3] = {-1, -1, -1};
	for (int i = 0; i < 2; i++) { /* in the backlog before the accept is submitted */
		c[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (c[i] < 0 || connect(c[i], (struct sockaddr *)&a, sizeof(a)))
			return -1000 - errno;
	}
	int64_t r = concur_accept_stream(&s, lfd, SOCK_CLOEXEC);
	if (r)
		return r;
	wrap_arm(WRAP_MALLOC, 0, WRAP_FROM); /* the queue's first growth, for both */
	concur_await_nop(); /* the accept and the NOP go in; both connections' CQEs come first */
	wrap_disarm();
	long failed = atomic_load(&wrap_failed[WRAP_MALLOC]);
	int64_t t0 = now_ns();
	r = concur_stream_next(s, NULL); /* the shortage, reported once */
	if (r != -ENOMEM || failed < 2) {
		r = -2000 + r - 100 * failed;
		goto out;
	}
	c[2] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c[2] < 0 || connect(c[2], (struct sockaddr *)&a, sizeof(a))) {
		r = -3000;
		goto out;
	}
	r = concur_stream_next(s, NULL); /* accepted once the back-off (4 ms) is over */
	int64_t waited = now_ns() - t0;
	if (r >= 0) {
		close((int)r);
		r = waited >= MS(3) ? 0 : -4000 - waited / 1000; /* -4000 - microseconds */
	}
out:
	concur_stream_close(s);
	for (int i = 0; i < 3; i++)
		if (c[i] >= 0)
			close(c[i]);
	return r;
}

static void test_fault_accept_backoff_kept(void **state)
{
	(void)state;
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(lfd >= 0);
	assert_int_equal(bind(lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(lfd, 64), 0);
	struct concur_exec_opts o = {.loops = 1, .stack_size = 64 * 1024};
	concur_exec *x;
	assert_int_equal(concur_exec_new(&x, &o), 0);
	concur_future *f = concur_spawn(x, backoff_task, &lfd);
	int64_t r = concur_result(f, MS(10000));
	concur_release(f);
	wrap_disarm();
	concur_exec_free(x);
	close(lfd);
	assert_int_equal(r, 0);
}

#define T(fn) cmocka_unit_test_setup(fn, reset)

/* CONCUR_FAULT_CASE=<kind>:<n>:<one|from|burst> (or nofile:<limit>:- / memlock:<limit>:-) runs one
 * case in this process (for a debugger). */
static int single_case(const char *spec)
{
	char name[32];
	long n;
	char mode[8];
	if (sscanf(spec, "%31[^:]:%ld:%7s", name, &n, mode) != 3)
		return 2;
	if (!strcmp(name, "nofile") || !strcmp(name, "memlock"))
		return setup(NULL)
		           ? 2
		           : child(-1, 0, 0, *name == 'n' ? LIMIT_NOFILE : LIMIT_MEMLOCK, n);
	for (int k = 0; k < WRAP_KINDS; k++)
		if (!strcmp(name, wrap_kind_name[k]))
			return setup(NULL)
			           ? 2
			           : child(k, n, strcmp(mode, "one") ? WRAP_FROM : WRAP_ONE, 0, 0);
	return 2;
}

int main(void)
{
	if (getenv("CONCUR_FAULT_CASE"))
		return single_case(getenv("CONCUR_FAULT_CASE"));
	const struct CMUnitTest tests[] = {
	    T(test_fault_accept_backoff_kept),
	    T(test_fault_malloc),
	    T(test_fault_mmap),
	    T(test_fault_thread),
	    T(test_fault_loop_thread_refused),
	    T(test_fault_loop_doorbell_refused),
	    T(test_fault_loop_bell_shortage),
	    T(test_fault_group_cancel_on_failure_seen),
	    T(test_fault_cancel_racing_free),
	    T(test_fault_ring_setup),
	    T(test_fault_submit),
	    T(test_fault_nofile),
	    T(test_fault_memlock),
	    T(test_fault_chunk_mmap),
	    T(test_fault_wait_deadline_refused),
	    T(test_fault_op_deadline_refused),
	    T(test_fault_scope_placed_again),
	    T(test_fault_sleep_refused),
	    T(test_fault_cancel_message_refused),
	    T(test_fault_group_cancel_refused),
	    T(test_fault_free_waits_for_poster),
	    T(test_fault_group_first_failure_order),
	    T(test_fault_group_cancel_while_adding),
	    T(test_fault_waiter_frees_event),
	    T(test_fault_waiter_frees_sem_under_release),
	    T(test_fault_waiter_frees_event_under_set),
	    T(test_fault_waiter_frees_chan_under_close),
	    T(test_fault_granted_waiter_cancelled),
	    T(test_fault_event_set_wakes_its_waiters_only),
	    T(test_fault_chunk_munmap),
	    T(test_fault_stack_munmap), /* last too: its refused reservation stays mapped */
	};
	return cmocka_run_group_tests(tests, setup, NULL);
}

/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: random sequences of API calls. The input is a little program, one
 * operation per few bytes, over 8 future slots and a set of sync objects on a persistent
 * 2-loop executor: spawn tasks of a small menu (return, await a child, sleep, yield, nop I/O,
 * lock the mutex), promises made, set (with any value, also on non-promises), cancelled,
 * retained, released, results and waits with short timeouts, callbacks, then/spawn_after,
 * wait/gather/as_completed over slot subsets, groups, mutex/semaphore/event/channel calls in
 * any order (unlocking an unlocked mutex, overflowing the semaphore, using a closed channel),
 * blocking jobs, kernel timers and no-ops, and short-lived executors made with random options.
 * Every call's return value must be one the header documents for it; at the end of each input
 * every promise is set, every slot released, the executor joins, and every callback registered
 * ran exactly once. ASan/UBSan (and LeakSanitizer) watch the rest.
 *
 * The harness only passes valid objects or NULL (a freed object is the caller's bug, not
 * something the library can detect), and never waits without a bound on something that may
 * never complete: every blocking call has a timeout of at most 2 ms or targets done work.
 */
#include "concur.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NSLOTS 8
#define NKEEP  64

static concur_exec *ex;
static concur_mutex *mx;
static concur_sem *sem;
static concur_event *ev;
static concur_chan *ch;
static atomic_long cb_added, cb_fired;

#define FAIL(...)                                                                                  \
	do {                                                                                       \
		fprintf(stderr, "fuzz_api: " __VA_ARGS__);                                         \
		fprintf(stderr, " (line %d)\n", __LINE__);                                         \
		abort();                                                                           \
	} while (0)
#define EXPECT(cond, ...)                                                                          \
	do {                                                                                       \
		if (!(cond))                                                                       \
			FAIL(#cond ": " __VA_ARGS__);                                              \
	} while (0)

/* ---- input reading ------------------------------------------------------------------------- */

struct in {
	const uint8_t *p;
	size_t n;
};

static uint8_t byte(struct in *in)
{
	if (!in->n)
		return 0;
	in->n--;
	return *in->p++;
}

static uint32_t u16(struct in *in)
{
	return byte(in) | (uint32_t)byte(in) << 8;
}

/* A timeout of at most 2 ms: 0, tiny, or a little longer. */
static int64_t small_timeout(struct in *in)
{
	uint8_t b = byte(in);
	switch (b & 3) {
	case 0:
		return 0;
	case 1:
		return b * 100;
	case 2:
		return 100000 + b * 4000;
	default:
		return b & 4 ? 1 : 50000;
	}
}

/* A result value: small positive, zero, an errno, -ECANCELED, or extreme. */
static int64_t any_value(struct in *in)
{
	uint8_t b = byte(in);
	switch (b >> 5) {
	case 0:
		return -ECANCELED;
	case 1:
		return -(int64_t)(1 + (b & 31));
	case 2:
		return INT64_MAX;
	case 3:
		return INT64_MIN;
	default:
		return b;
	}
}

/* ---- tasks ----------------------------------------------------------------------------------- */

static int64_t t_return(void *arg)
{
	return (int64_t)(intptr_t)arg;
}

static int64_t t_child(void *arg)
{
	concur_future *f = concur_spawn(ex, t_return, arg);
	int64_t r = concur_result(f, -1);
	/* -ECANCELED: this task was cancelled while it waited (a cancel of a running task) */
	EXPECT(r == (int64_t)(intptr_t)arg || r == -ENOMEM || r == -ECANCELED, "child %lld",
	       (long long)r);
	concur_release(f);
	return r;
}

static int64_t t_sleep(void *arg)
{
	int e = concur_sleep((intptr_t)arg * 1000);
	EXPECT(e == 0 || e == -ECANCELED, "sleep %d", e); /* cancelled while it slept */
	return 0;
}

static int64_t t_yield(void *arg)
{
	for (intptr_t i = 0; i < (intptr_t)arg % 8; i++)
		concur_yield();
	return 1;
}

static int64_t t_nop(void *arg)
{
	(void)arg;
	return concur_await_nop();
}

static int64_t t_lock(void *arg)
{
	(void)arg;
	/* timeout 0 or -1 only (known defect 3: a timed-out wait in a task leaks) */
	int e = concur_mutex_lock(mx, 0);
	EXPECT(e == 0 || e == -ETIMEDOUT, "task lock %d", e);
	if (!e) {
		concur_yield();
		EXPECT(concur_mutex_unlock(mx) == 0, "task unlock");
	}
	return e;
}

static int64_t t_chan(void *arg)
{
	int64_t v;
	int e = (intptr_t)arg & 1 ? concur_chan_send(ch, 7, 0) : concur_chan_recv(ch, &v, 0);
	EXPECT(e == 0 || e == -ETIMEDOUT || e == -EPIPE, "task chan %d", e);
	return e;
}

static const concur_task_fn menu[] = {t_return, t_child, t_sleep, t_yield, t_nop, t_lock, t_chan};
#define NMENU (sizeof(menu) / sizeof(menu[0]))

static int64_t then_fn(void *arg, int64_t v)
{
	(void)arg;
	return v & 0xffff;
}

static int64_t after_fn(void *arg, const int64_t *v, size_t n)
{
	(void)arg;
	EXPECT(n == 0 || v, "after values");
	return (int64_t)n;
}

static void on_cb(concur_future *f, void *arg)
{
	EXPECT(concur_done(f), "callback on a future not done");
	EXPECT(arg == (void *)f, "callback arg");
	atomic_fetch_add(&cb_fired, 1);
}

/* ---- one input ------------------------------------------------------------------------------ */

struct state {
	concur_future *slot[NSLOTS];
	concur_future *keep[NKEEP]; /* promises kept until the end (set there) */
	size_t nkeep;
	int locked; /* the fuzzer thread holds the mutex */
	concur_group *g;
};

static concur_future **pick(struct state *s, struct in *in)
{
	return &s->slot[byte(in) % NSLOTS];
}

static void put(struct state *s, concur_future **slot, concur_future *f)
{
	EXPECT(f, "a call that never returns NULL returned NULL");
	concur_release(*slot);
	*slot = f;
	(void)s;
}

/* Collect up to 6 non-NULL slots (with a possible duplicate). */
static size_t subset(struct state *s, struct in *in, concur_future **fs)
{
	uint8_t mask = byte(in);
	size_t n = 0;
	for (int i = 0; i < NSLOTS && n < 5; i++)
		if ((mask >> i & 1) && s->slot[i])
			fs[n++] = s->slot[i];
	if (n && (mask & 1))
		fs[n++] = fs[0];
	return n;
}

static void op(struct state *s, struct in *in)
{
	uint8_t code = byte(in);
	concur_future **sl = pick(s, in);
	concur_future *f = *sl;
	switch (code % 26) {
	case 0:
	case 1: /* spawn */
		put(s, sl, concur_spawn(ex, menu[byte(in) % NMENU], (void *)(intptr_t)byte(in)));
		break;
	case 2: { /* promise */
		concur_future *p = concur_promise_new(byte(in) & 1 ? ex : NULL);
		if (!p)
			break;
		/* kept until the end and set there: a promise released unset drops its callbacks
		 * unrun (documented), which would break the every-callback-once check */
		{
			if (s->nkeep == NKEEP) {
				concur_release(p);
				break;
			}
			s->keep[s->nkeep++] = concur_retain(p);
		}
		put(s, sl, p);
		break;
	}
	case 3: { /* set: a task future or NULL gives -EINVAL */
		int e = concur_promise_set(f, any_value(in));
		EXPECT(e == 0 || e == -EALREADY || e == -EINVAL, "promise_set %d", e);
		EXPECT(f || e == -EINVAL, "promise_set(NULL) %d", e);
		break;
	}
	case 4: {
		int e = concur_cancel(f);
		EXPECT(e == 0 || e == 1 || e == -EINPROGRESS || (!f && e == -EINVAL), "cancel %d",
		       e);
		if (e == 1)
			EXPECT(concur_cancelled(f) && concur_result(f, 0) == -ECANCELED,
			       "cancelled");
		break;
	}
	case 5: {
		int64_t r = concur_result(f, small_timeout(in));
		EXPECT(f || r == -EINVAL, "result(NULL) %lld", (long long)r);
		if (f && r != -ETIMEDOUT)
			EXPECT(concur_done(f), "a result without done");
		break;
	}
	case 6:
		if (f) {
			int e = concur_on_done(f, on_cb, f);
			EXPECT(e == 0 || e == -ENOMEM, "on_done %d", e);
			if (!e)
				atomic_fetch_add(&cb_added, 1);
		} else {
			EXPECT(concur_on_done(NULL, on_cb, NULL) == -EINVAL, "on_done NULL");
		}
		break;
	case 7:
		concur_release(f);
		*sl = NULL;
		break;
	case 8: {
		concur_future **to = pick(s, in);
		if (to != sl && f)
			put(s, to, concur_retain(f));
		else
			EXPECT(concur_retain(f) == f, "retain");
		if (to == sl && f)
			concur_release(f);
		break;
	}
	case 9:
		if (f)
			put(s, sl, concur_then(f, then_fn, NULL));
		else
			put(s, sl, concur_then(NULL, then_fn, NULL)); /* failed -EINVAL */
		break;
	case 10: {
		concur_future *fs[6];
		size_t n = subset(s, in, fs);
		put(s, sl, concur_spawn_after(ex, after_fn, NULL, fs, n));
		break;
	}
	case 11: {
		concur_future *fs[6];
		bool done[6];
		size_t n = subset(s, in, fs);
		int mode = byte(in) % 4; /* 3 is invalid */
		int w = concur_wait(fs, n, mode, small_timeout(in), done);
		EXPECT(mode == 3 ? (w == -EINVAL || n == 0) : (w >= 0 && (size_t)w <= n), "wait %d",
		       w);
		break;
	}
	case 12: {
		concur_future *fs[6];
		int64_t vals[6];
		size_t n = subset(s, in, fs);
		struct concur_gather_opts o = {.flags = byte(in) & 1};
		int64_t g = concur_gather(fs, n, small_timeout(in), vals, &o);
		EXPECT(!o.flags || g == 0 || g == -ETIMEDOUT || g == -ENOMEM, "gather %lld",
		       (long long)g);
		break;
	}
	case 13: {
		concur_future *fs[6];
		size_t n = subset(s, in, fs);
		concur_as_completed *it;
		int e = concur_as_completed_new(&it, fs, n, small_timeout(in));
		EXPECT(e == 0 || e == -ENOMEM, "as_completed_new %d", e);
		if (e)
			break;
		concur_future *d;
		for (int k = byte(in) % 8; k; k--) {
			int r = concur_as_completed_next(it, &d);
			EXPECT(r == 1 || r == 0 || r == -ETIMEDOUT, "as_completed_next %d", r);
			if (r != 1)
				break;
			EXPECT(concur_done(d), "yielded not done");
			concur_release(d);
		}
		concur_as_completed_free(it);
		break;
	}
	case 14: { /* the fuzzer thread's mutex calls */
		int e;
		switch (byte(in) % 3) {
		case 0:
			e = concur_mutex_lock(mx, s->locked ? 0 : small_timeout(in));
			EXPECT(e == 0 || e == -ETIMEDOUT, "lock %d", e);
			EXPECT(!(e == 0 && s->locked), "locked twice");
			s->locked |= e == 0;
			break;
		case 1:
			e = concur_mutex_trylock(mx);
			EXPECT(e == 0 || e == -EBUSY, "trylock %d", e);
			s->locked |= e == 0;
			break;
		default:
			/* only our own lock: an unlock by another holder would take a task's */
			if (!s->locked)
				break;
			e = concur_mutex_unlock(mx);
			EXPECT(e == 0, "unlock %d", e);
			s->locked = 0;
		}
		break;
	}
	case 15: {
		int e = byte(in) & 1 ? concur_sem_acquire(sem, small_timeout(in))
		                     : concur_sem_release(sem, (int64_t)u16(in) << (byte(in) % 48));
		EXPECT(e == 0 || e == -ETIMEDOUT || e == -EINVAL || e == -EOVERFLOW, "sem %d", e);
		break;
	}
	case 16: {
		int e;
		switch (byte(in) % 3) {
		case 0:
			e = concur_event_set(ev);
			break;
		case 1:
			e = concur_event_clear(ev);
			break;
		default:
			e = concur_event_wait(ev, small_timeout(in));
		}
		EXPECT(e == 0 || e == -ETIMEDOUT, "event %d", e);
		break;
	}
	case 17: {
		int64_t v = 0;
		int e;
		switch (byte(in) % 4) {
		case 0:
			e = concur_chan_send(ch, any_value(in), small_timeout(in));
			break;
		case 1:
			e = concur_chan_recv(ch, &v, small_timeout(in));
			break;
		case 2:
			e = byte(in) == 0x42 ? concur_chan_close(ch) : 0;
			EXPECT(e == 0 || e == -EALREADY, "close %d", e);
			break;
		default:
			e = (int)concur_chan_len(ch) < 0;
		}
		EXPECT(e == 0 || e == -ETIMEDOUT || e == -EPIPE || e == -EALREADY, "chan %d", e);
		break;
	}
	case 18:
		put(s, sl, concur_spawn_blocking(ex, t_return, (void *)(intptr_t)byte(in)));
		break;
	case 19: { /* groups */
		uint8_t b = byte(in);
		if (!s->g) {
			int e = concur_group_new(&s->g, ex, b & 1);
			EXPECT(e == 0 || e == -ENOMEM, "group_new %d", e);
		} else if (b % 4 == 0) {
			put(s, sl,
			    concur_group_spawn(s->g, menu[b / 4 % NMENU], (void *)(intptr_t)b));
		} else if (b % 4 == 1) {
			EXPECT(concur_group_cancel(s->g) >= 0, "group_cancel");
		} else if (b % 4 == 2) {
			(void)concur_group_wait(s->g, small_timeout(in)); /* any member's result */
		} else {
			concur_group_free(s->g);
			s->g = NULL;
		}
		break;
	}
	case 20: { /* kernel ops */
		uint8_t b = byte(in);
		put(s, sl, b & 1 ? concur_nop(ex) : concur_timeout(ex, (int64_t)(b >> 1) * 1000));
		break;
	}
	case 21: /* queries on anything */
		(void)concur_done(f);
		(void)concur_running(f);
		(void)concur_cancelled(f);
		EXPECT(!f || !concur_future_exec(f) || concur_future_exec(f) == ex, "future_exec");
		break;
	case 22: { /* a short-lived executor with random options */
		struct concur_exec_opts o = {
		    .loops = byte(in) % 4,
		    .ring_entries = byte(in) % 2 ? 0 : (1u << (byte(in) % 17)) + byte(in) % 3,
		    .stack_size = byte(in) % 2 ? 0 : (size_t)u16(in) << (byte(in) % 16),
		    .flags = byte(in) % 8 == 0 ? 1u << (byte(in) % 4) : 0,
		};
		if (o.loops == 0)
			o.loops = 1; /* 0 = online CPUs: fine, but slow to make */
		concur_exec *e2 = NULL;
		int e = concur_exec_new(&e2, &o);
		EXPECT(e == 0 || e == -EINVAL || e == -ENOMEM || e == -EPERM, "exec_new %d", e);
		if (e)
			break;
		concur_future *t = concur_spawn(e2, menu[byte(in) % 5], (void *)(intptr_t)3);
		if (byte(in) & 1)
			concur_exec_shutdown(e2, byte(in) & 1);
		EXPECT(concur_exec_join(e2, 2000000000) == 0, "join of a short-lived executor");
		concur_exec_free(e2);
		EXPECT(concur_done(t) && concur_future_exec(t) == NULL, "after free");
		concur_release(t);
		break;
	}
	case 23: /* bad arguments */
	{
		concur_future *bad = concur_spawn(NULL, t_return, NULL);
		EXPECT(bad && concur_result(bad, 0) == -EINVAL, "spawn NULL");
		concur_release(bad);
	}
		EXPECT(concur_wait(NULL, 1, 0, 0, NULL) == -EINVAL, "wait NULL");
		EXPECT(concur_result(NULL, 0) == -EINVAL, "result NULL");
		EXPECT(concur_exec_join(NULL, 0) == -EINVAL, "join NULL");
		break;
	case 24: { /* yield-free sleep of the fuzzer thread, letting work happen */
		EXPECT(concur_sleep(byte(in) * 1000) == 0, "sleep");
		break;
	}
	default: /* a task on the channel */
		put(s, sl, concur_spawn(ex, t_chan, (void *)(intptr_t)byte(in)));
		break;
	}
}

static void sync_new(void)
{
	if (concur_mutex_new(&mx) || concur_sem_new(&sem, 2) || concur_event_new(&ev) ||
	    concur_chan_new(&ch, 4))
		FAIL("sync objects");
}

static void sync_free(void)
{
	concur_mutex_free(mx);
	concur_sem_free(sem);
	concur_event_free(ev);
	concur_chan_free(ch);
}

static void finish(struct state *s)
{
	if (s->locked)
		EXPECT(concur_mutex_unlock(mx) == 0, "final unlock");
	for (size_t i = 0; i < s->nkeep; i++) {
		int e = concur_promise_set(s->keep[i], 0);
		EXPECT(e == 0 || e == -EALREADY, "final set %d", e);
		concur_release(s->keep[i]);
	}
	for (int i = 0; i < NSLOTS; i++)
		concur_release(s->slot[i]);
	if (s->g) {
		(void)concur_group_wait(s->g, -1);
		concur_group_free(s->g);
	}
	int j = concur_exec_join(ex, 10000000000ll);
	EXPECT(j == 0, "join %d: work left at the end of an input", j);
	EXPECT(atomic_load(&cb_fired) == atomic_load(&cb_added), "callbacks %ld of %ld",
	       atomic_load(&cb_fired), atomic_load(&cb_added));
	/* nobody waits on the sync objects now: fresh ones for the next input */
	sync_free();
	sync_new();
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * At exit, before LeakSanitizer looks: let the blocking pool's idle helpers exit, so that their
 * thread-exit destructors free the task records they cache. A helper still alive then holds
 * them in its thread-local cache only, and clang 14's LSan can skip such a thread once thread
 * ids have wrapped (a minute of fuzzing makes and joins tens of thousands of threads: the short
 * executors' loops): the cached records were reported as leaked.
 */
static void helpers_gone(void)
{
	concur_blocking_config(0, 1);
	for (int i = 0; i < 400 && concur_blocking_threads(); i++)
		usleep(5000);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	atexit(helpers_gone);
	(void)argc;
	(void)argv;
	struct concur_exec_opts o = {.loops = 2};
	if (concur_exec_new(&ex, &o))
		FAIL("setup");
	sync_new();
	concur_blocking_config(8, 100000000);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct in in = {data, size > 4096 ? 4096 : size};
	struct state s = {0};
	while (in.n)
		op(&s, &in);
	finish(&s);
	return 0;
}

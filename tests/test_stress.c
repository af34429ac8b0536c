/* SPDX-License-Identifier: MIT */
/*
 * Seeded random stress of the core semantics. Foreign threads and driver tasks on a 2-loop
 * executor draw random operations from one seeded stream each: nested spawns, cancels at
 * random moments, results with random timeouts, callbacks, early releases (fire and forget),
 * then/spawn_after chains (a stage cancelled at random), promises set by a setter thread after
 * a random delay, wait/gather/as_completed, groups, timed mutex/semaphore/event/channel waits,
 * blocking jobs, kernel timers and no-ops. Each operation checks its own outcome against the
 * set of outcomes the header allows. At the end: every callback ran exactly once, every
 * fire-and-forget task ran, join returns, and once the executor is freed no heap block the run
 * allocated is left (tests/wrap.h counts every malloc/free made by concur and by this test;
 * LeakSanitizer checks the same in the ASan build).
 *
 * The seed is printed; CONCUR_STRESS_SEED=<n> replays a seed's operation streams (the thread
 * interleaving differs, the mix of operations does not), CONCUR_STRESS_OPS=<n> sets the number
 * of operations per seed, CONCUR_STRESS_SEEDS=<n> runs n consecutive seeds (the long run:
 * tests/run.sh --long, or by hand). A check that fails prints the seed and aborts.
 */
#include "helpers.h"
#include "wrap.h"
#include "internal.h" /* concur__chunks_live */

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <unistd.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#endif

/* A few seconds per build: TSan runs this mix ~30x slower, ASan ~2x. */
#if defined(__SANITIZE_THREAD__)
#define STRESS_DEFAULT_OPS 4000
#elif defined(__SANITIZE_ADDRESS__)
#define STRESS_DEFAULT_OPS 40000
#else
#define STRESS_DEFAULT_OPS 100000
#endif

#define NLOOPS    2
#define NTHREADS  3 /* foreign driver threads */
#define NDRIVERS  4 /* driver tasks */
#define SEM_UNITS 3
#define CHAN_CAP  4

static uint64_t g_seed;
static long g_ops;
static concur_exec *g_ex;
static atomic_long g_next_op;  /* operations handed out */
static atomic_long g_cb_added; /* callbacks registered */
static atomic_long g_cb_fired;
static atomic_long g_ff_spawned; /* fire-and-forget tasks */
static atomic_long g_ff_ran;
static atomic_long g_tasks_ran;
static atomic_long g_op_count[16];

/* ---- failing from any thread --------------------------------------------------------------- */

#define CHECK(cond, ...)                                                                           \
	do {                                                                                       \
		if (!(cond))                                                                       \
			stress_fail(__LINE__, #cond, __VA_ARGS__);                                 \
	} while (0)

static void __attribute__((noreturn, format(printf, 3, 4)))
stress_fail(int line, const char *cond, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fprintf(stderr, "stress FAILED (seed %" PRIu64 ", line %d): %s: %s\n", g_seed, line, cond,
	        msg);
	fflush(stderr);
	abort();
}

static void on_alarm(int sig)
{
	static const char m[] = "stress: HANG (alarm): see the seed printed above\n";
	(void)sig;
	if (write(2, m, sizeof(m) - 1) < 0) {
	}
	abort();
}

/* ---- random numbers: one stream per driver ------------------------------------------------- */

struct rng {
	uint64_t s;
};

static uint64_t rnd(struct rng *r)
{
	uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static unsigned rndn(struct rng *r, unsigned n)
{
	return (unsigned)(rnd(r) % n);
}

/* A timeout for a result or a wait: poll, short, a bit longer, or forever. */
static int64_t rnd_timeout(struct rng *r)
{
	switch (rndn(r, 8)) {
	case 0:
		return 0;
	case 1:
	case 2:
		return 1000 + rndn(r, 50000);
	case 3:
		return 100000 + rndn(r, 2000000);
	case 4:
		return INT64_MAX - rndn(r, 1000);
	default:
		return -1;
	}
}

/* A short random pause: nothing, a yield, a spin, or a sleep. */
static void rnd_pause(struct rng *r)
{
	switch (rndn(r, 6)) {
	case 0:
		concur_yield();
		break;
	case 1:
		for (unsigned i = rndn(r, 2000); i; i--)
			__asm__ volatile("" ::: "memory");
		break;
	case 2:
		concur_sleep(rndn(r, 30000));
		break;
	default:
		break;
	}
}

/* ---- leaf tasks: maybe spawn children, await them, return a known value --------------------- */

struct leaf {
	atomic_int ran;
	bool self_free; /* fire and forget: the task frees its record */
	int depth;
	int64_t value; /* >= 0: returned; < 0: returned as the task's error */
	uint64_t seed;
};

static struct leaf *leaf_new(struct rng *r, int depth)
{
	struct leaf *l = calloc(1, sizeof(*l));
	CHECK(l, "calloc");
	l->depth = depth;
	l->value =
	    rndn(r, 10) == 0 ? -(int64_t)(1 + rndn(r, 100)) - 1000 : (int64_t)rndn(r, 1 << 20);
	l->seed = rnd(r);
	return l;
}

static int64_t leaf_task(void *arg);

/* In a task: spawn a few children, poke at them, check their results. */
static void leaf_children(struct leaf *l, struct rng *r)
{
	unsigned n = rndn(r, 4);
	concur_future *f[4];
	struct leaf *c[4];
	int cancelled[4] = {0};
	for (unsigned i = 0; i < n; i++) {
		c[i] = leaf_new(r, l->depth - 1);
		f[i] = concur_spawn(g_ex, leaf_task, c[i]);
	}
	for (unsigned i = 0; i < n; i++) {
		if (rndn(r, 5) == 0) {
			int cr = concur_cancel(f[i]);
			/* -EINPROGRESS: it runs; a leaf never waits, so it ends with its value */
			CHECK(cr == 0 || cr == 1 || cr == -EINPROGRESS, "child cancel %d", cr);
			cancelled[i] = cr == 1;
		}
		int64_t res = concur_result(f[i], rnd_timeout(r));
		if (res == -ETIMEDOUT)
			res = concur_result(f[i], -1);
		if (res == -ECANCELED && !cancelled[i] && concur_cancel_requested()) {
			/* this task was cancelled while it waited (a running-task cancel): its
			 * waits fail from now on, so wait the child out under a shield */
			CHECK(concur_shield_push() == 0, "shield");
			res = concur_result(f[i], -1);
			CHECK(concur_shield_pop() == 0, "unshield");
		}
		if (cancelled[i]) {
			CHECK(res == -ECANCELED, "cancelled child gave %" PRId64, res);
			CHECK(!atomic_load(&c[i]->ran), "a cancelled child ran");
		} else {
			CHECK(res == c[i]->value, "child gave %" PRId64 " not %" PRId64, res,
			      c[i]->value);
		}
		concur_release(f[i]);
		free(c[i]);
	}
}

static int64_t leaf_task(void *arg)
{
	struct leaf *l = arg;
	CHECK(!atomic_exchange(&l->ran, 1), "a task ran twice");
	atomic_fetch_add(&g_tasks_ran, 1);
	struct rng r = {l->seed};
	rnd_pause(&r);
	if (l->depth > 0)
		leaf_children(l, &r);
	int64_t v = l->value;
	if (l->self_free) {
		free(l);
		atomic_fetch_add(&g_ff_ran, 1);
	}
	return v;
}

/* ---- promises set by the setter thread ------------------------------------------------------ */

static pthread_mutex_t setter_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t setter_cond = PTHREAD_COND_INITIALIZER;
static struct pending {
	struct pending *next;
	concur_future *p;
	int64_t res;
	unsigned delay_us;
} * setter_head;
static bool setter_stop;

/* A promise that the setter thread completes with res after a random delay. */
static concur_future *promise_to_set(struct rng *r, int64_t res)
{
	concur_future *p = concur_promise_new(g_ex);
	CHECK(p, "promise_new");
	struct pending *q = malloc(sizeof(*q));
	CHECK(q, "malloc");
	q->p = concur_retain(p);
	q->res = res;
	q->delay_us = rndn(r, 4) ? 0 : rndn(r, 300);
	pthread_mutex_lock(&setter_lock);
	q->next = setter_head;
	setter_head = q;
	pthread_cond_signal(&setter_cond);
	pthread_mutex_unlock(&setter_lock);
	return p;
}

static void *setter_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&setter_lock);
	for (;;) {
		while (!setter_head && !setter_stop)
			pthread_cond_wait(&setter_cond, &setter_lock);
		struct pending *q = setter_head;
		if (!q)
			break;
		setter_head = q->next;
		pthread_mutex_unlock(&setter_lock);
		if (q->delay_us)
			usleep(q->delay_us);
		int r = concur_promise_set(q->p, q->res);
		/* -EALREADY: a driver cancelled it first */
		CHECK(r == 0 || (r == -EALREADY && concur_cancelled(q->p)), "promise_set %d", r);
		concur_release(q->p);
		free(q);
		pthread_mutex_lock(&setter_lock);
	}
	pthread_mutex_unlock(&setter_lock);
	return NULL;
}

/* ---- a future of a random kind with its expected result ------------------------------------- */

struct item {
	concur_future *f;
	int64_t want;      /* the result it must end with, unless cancelled */
	bool cancellable;  /* a promise: a driver may cancel it */
	struct leaf *leaf; /* a task's record, freed once the task is done */
};

static void item_new(struct item *it, struct rng *r)
{
	memset(it, 0, sizeof(*it));
	if (rndn(r, 2)) {
		it->leaf = leaf_new(r, (int)rndn(r, 2));
		it->want = it->leaf->value;
		it->f = concur_spawn(g_ex, leaf_task, it->leaf);
	} else {
		it->want =
		    rndn(r, 8) == 0 ? -(int64_t)(2000 + rndn(r, 100)) : (int64_t)rndn(r, 1000);
		it->f = promise_to_set(r, it->want);
		it->cancellable = true;
	}
}

/* Its final result must be legal; then drop it. */
static void item_finish(struct item *it)
{
	int64_t res = concur_result(it->f, -1);
	if (res == -ECANCELED && it->cancellable)
		CHECK(concur_cancelled(it->f), "-ECANCELED but not cancelled");
	else
		CHECK(res == it->want, "item gave %" PRId64 " not %" PRId64, res, it->want);
	concur_release(it->f);
	free(it->leaf);
}

/* ---- callbacks ----------------------------------------------------------------------------- */

struct cb {
	atomic_int fired;
	int64_t want;
	bool cancellable;
	concur_future *hold; /* a reference the callback drops (its last act) */
};

static void on_done_cb(concur_future *f, void *arg)
{
	struct cb *c = arg;
	CHECK(!atomic_exchange(&c->fired, 1), "a callback ran twice");
	CHECK(concur_done(f), "callback on a future not done");
	int64_t res = concur_result(f, 0);
	CHECK(res == c->want || (c->cancellable && res == -ECANCELED), "callback saw %" PRId64,
	      res);
	atomic_fetch_add(&g_cb_fired, 1);
	concur_future *h = c->hold;
	free(c);
	/* known defect 4 (release then touch f) is not exercised: nothing reads f after this */
	concur_release(h);
}

static void add_callbacks(struct rng *r, concur_future *f, int64_t want, bool cancellable)
{
	for (unsigned k = rndn(r, 3); k; k--) {
		struct cb *c = calloc(1, sizeof(*c));
		CHECK(c, "calloc");
		c->want = want;
		c->cancellable = cancellable;
		c->hold = concur_retain(f);
		atomic_fetch_add(&g_cb_added, 1);
		CHECK(concur_on_done(f, on_done_cb, c) == 0, "on_done");
	}
}

/* ---- the operations ----------------------------------------------------------------------- */

static void op_spawn_nested(struct rng *r)
{
	struct item it = {0};
	it.leaf = leaf_new(r, (int)rndn(r, 4));
	it.want = it.leaf->value;
	it.f = concur_spawn(g_ex, leaf_task, it.leaf);
	add_callbacks(r, it.f, it.want, false);
	int64_t res = concur_result(it.f, rnd_timeout(r));
	CHECK(res == it.want || res == -ETIMEDOUT, "result %" PRId64, res);
	if (res == -ETIMEDOUT)
		CHECK(!concur_done(it.f) || concur_result(it.f, 0) == it.want, "late result");
	item_finish(&it);
}

static void op_cancel(struct rng *r)
{
	struct leaf *l = leaf_new(r, (int)rndn(r, 2));
	concur_future *f = concur_spawn(g_ex, leaf_task, l);
	struct cb *c = NULL;
	if (rndn(r, 2)) { /* a callback that must see either outcome */
		c = calloc(1, sizeof(*c));
		CHECK(c, "calloc");
		c->want = l->value;
		c->cancellable = true;
		c->hold = concur_retain(f);
		atomic_fetch_add(&g_cb_added, 1);
		CHECK(concur_on_done(f, on_done_cb, c) == 0, "on_done");
	}
	rnd_pause(r);
	int cr = concur_cancel(f);
	CHECK(cr == 0 || cr == 1 || cr == -EINPROGRESS, "cancel gave %d", cr);
	int64_t res = concur_result(f, -1);
	if (cr == 1) {
		CHECK(res == -ECANCELED && concur_cancelled(f), "cancelled task gave %" PRId64,
		      res);
		CHECK(concur_cancel(f) == 1, "cancel twice");
		CHECK(!atomic_load(&l->ran), "a cancelled task ran");
	} else {
		CHECK(res == l->value, "uncancelled task gave %" PRId64, res);
		CHECK(concur_cancel(f) == 0, "cancel after done");
	}
	concur_release(f);
	free(l); /* a cancelled task that still ran would touch freed memory: ASan sees it */
}

static void op_fire_and_forget(struct rng *r)
{
	struct leaf *l = leaf_new(r, (int)rndn(r, 3));
	l->self_free = true;
	atomic_fetch_add(&g_ff_spawned, 1);
	concur_release(concur_spawn(g_ex, leaf_task, l));
}

static int64_t then_add1(void *arg, int64_t v)
{
	(void)arg;
	return v + 1;
}

static int64_t after_sum1(void *arg, const int64_t *values, size_t n)
{
	(void)arg;
	int64_t s = 1;
	for (size_t i = 0; i < n; i++)
		s += values[i];
	return s;
}

static void op_chain(struct rng *r)
{
	struct item base;
	item_new(&base, r);
	concur_future *cur = concur_retain(base.f);
	int64_t want = base.want;
	bool may_cancel = base.cancellable;
	if (base.cancellable && rndn(r, 4) == 0)
		concur_cancel(base.f); /* 1 or -EALREADY-for-the-setter: both legal */
	for (unsigned k = 1 + rndn(r, 4); k; k--) {
		concur_future *next;
		if (rndn(r, 2)) {
			next = concur_then(cur, then_add1, NULL);
			if (want >= 0)
				want += 1;
		} else {
			struct item side;
			item_new(&side, r);
			concur_future *in[2] = {cur, side.f};
			next = concur_spawn_after(g_ex, after_sum1, NULL, in, 2);
			if (want >= 0 && side.want < 0)
				want = side.want; /* the first failure in input order */
			else if (want >= 0)
				want = want + side.want + 1;
			if (rndn(r, 2))
				add_callbacks(r, side.f, side.want, true);
			/* the side input may also be cancelled: any -ECANCELED is then legal */
			if (side.cancellable && rndn(r, 6) == 0 && concur_cancel(side.f) == 1)
				may_cancel = true;
			item_finish(&side);
		}
		/* a dependent cancelled while it may still wait for its inputs: it takes its
		 * nodes back as they complete or die (1), or was too late (0, -EINPROGRESS) */
		if (rndn(r, 8) == 0 && concur_cancel(next) == 1)
			may_cancel = true;
		concur_release(cur);
		cur = next;
	}
	add_callbacks(r, cur, want, true);
	if (rndn(r, 3) == 0) { /* release early: the chain finishes on its own */
		concur_release(cur);
		item_finish(&base);
		return;
	}
	int64_t res = concur_result(cur, rnd_timeout(r));
	if (res == -ETIMEDOUT)
		res = concur_result(cur, -1);
	CHECK(res == want || (may_cancel && res == -ECANCELED) ||
	          (concur_cancelled(base.f) && res == -ECANCELED),
	      "chain gave %" PRId64 " not %" PRId64, res, want);
	concur_release(cur);
	item_finish(&base);
}

static void op_promise(struct rng *r)
{
	struct item it = {.want = rndn(r, 8) == 0 ? -5000 : (int64_t)rndn(r, 1000),
	                  .cancellable = true};
	it.f = promise_to_set(r, it.want);
	add_callbacks(r, it.f, it.want, true);
	concur_future *t = rndn(r, 2) ? concur_then(it.f, then_add1, NULL) : NULL;
	int64_t res = concur_result(it.f, rnd_timeout(r));
	CHECK(res == it.want || res == -ETIMEDOUT || res == -ECANCELED, "promise %" PRId64, res);
	if (res == -ETIMEDOUT && rndn(r, 3) == 0)
		concur_cancel(it.f);
	if (t) {
		int64_t tr = concur_result(t, -1);
		CHECK(tr == (it.want >= 0 ? it.want + 1 : it.want) ||
		          (tr == -ECANCELED && concur_cancelled(it.f)),
		      "then gave %" PRId64, tr);
		concur_release(t);
	}
	item_finish(&it);
}

static void op_compose(struct rng *r)
{
	struct item its[6];
	concur_future *fs[7];
	unsigned n = 1 + rndn(r, 6);
	for (unsigned i = 0; i < n; i++) {
		item_new(&its[i], r);
		fs[i] = its[i].f;
	}
	bool done[7];
	int64_t vals[7];
	switch (rndn(r, 3)) {
	case 0: {
		int mode = (int)rndn(r, 3);
		int64_t to = rnd_timeout(r);
		int w = concur_wait(fs, n, mode, to, done);
		CHECK(w >= 0 && (unsigned)w <= n, "wait gave %d", w);
		int cnt = 0;
		for (unsigned i = 0; i < n; i++) {
			cnt += done[i];
			CHECK(!done[i] || concur_done(fs[i]), "wait: done but not done");
		}
		CHECK(cnt == w, "wait count %d vs %d", cnt, w);
		if (to < 0 && mode == CONCUR_ALL_COMPLETED)
			CHECK(w == (int)n, "ALL_COMPLETED gave %d of %u", w, n);
		if (to < 0 && mode == CONCUR_FIRST_COMPLETED)
			CHECK(w >= 1, "FIRST_COMPLETED gave 0");
		break;
	}
	case 1: {
		int64_t to = rnd_timeout(r);
		unsigned flags = rndn(r, 2) ? CONCUR_GATHER_RETURN_ERRORS : 0;
		struct concur_gather_opts o = {.flags = flags};
		int64_t g = concur_gather(fs, n, to, vals, &o);
		if (g == -ETIMEDOUT) {
			CHECK(to >= 0, "gather timed out without a timeout");
			break;
		}
		bool failed = false, g_is_one = false; /* the first to fail: any of them here */
		for (unsigned i = 0; i < n; i++) {
			CHECK(vals[i] == its[i].want || vals[i] == -ECANCELED,
			      "gather value %" PRId64 " not %" PRId64, vals[i], its[i].want);
			failed = failed || vals[i] < 0;
			g_is_one = g_is_one || (vals[i] < 0 && g == vals[i]);
		}
		if (flags || !failed)
			CHECK(g == 0, "gather gave %" PRId64 " not 0", g);
		else
			CHECK(g_is_one, "gather gave %" PRId64 ", no input's failure", g);
		break;
	}
	default: {
		unsigned m = n;
		if (rndn(r, 2))
			fs[m++] = fs[0]; /* a duplicate is yielded once */
		concur_as_completed *ac;
		CHECK(concur_as_completed_new(&ac, fs, m, rnd_timeout(r)) == 0, "as_completed_new");
		unsigned got = 0;
		concur_future *f;
		int k;
		while ((k = concur_as_completed_next(ac, &f)) == 1) {
			CHECK(concur_done(f), "as_completed yielded a future not done");
			got++;
			concur_release(f);
			if (rndn(r, 8) == 0)
				break; /* abandon the rest */
		}
		CHECK(k == 1 || k == 0 || k == -ETIMEDOUT, "as_completed_next %d", k);
		size_t total;
		size_t left = concur_as_completed_unfinished(ac, &total);
		CHECK(got + left == total, "as_completed %u + %zu != %zu", got, left, total);
		if (k == 0)
			CHECK(left == 0, "as_completed ended with %zu left", left);
		CHECK(total == n, "as_completed counts %zu distinct of %u", total, n);
		concur_as_completed_free(ac);
		break;
	}
	}
	for (unsigned i = 0; i < n; i++)
		item_finish(&its[i]);
}

static int64_t member_task(void *arg)
{
	atomic_fetch_add(&g_tasks_ran, 1);
	return (int64_t)(intptr_t)arg;
}

static void op_group(struct rng *r)
{
	concur_group *g;
	unsigned flags = rndn(r, 2) ? CONCUR_GROUP_CANCEL_ON_FAILURE : 0;
	CHECK(concur_group_new(&g, g_ex, flags) == 0, "group_new");
	unsigned n = 1 + rndn(r, 5);
	int64_t errs[6];
	unsigned nerr = 0;
	for (unsigned i = 0; i < n; i++) {
		int64_t v = rndn(r, 6) == 0 ? -(int64_t)(3000 + i) : (int64_t)i;
		if (v < 0)
			errs[nerr++] = v;
		concur_future *f = concur_group_spawn(g, member_task, (void *)(intptr_t)v);
		int64_t res = concur_result(f, 0);
		CHECK(res == v || res == -ETIMEDOUT || res == -ECANCELED, "member %" PRId64, res);
		concur_release(f);
	}
	if (rndn(r, 5) == 0)
		CHECK(concur_group_cancel(g) >= 0, "group_cancel");
	int64_t w = concur_group_wait(g, -1);
	bool legal = w == 0 || w == -ECANCELED;
	for (unsigned i = 0; i < nerr; i++)
		legal = legal || w == errs[i];
	CHECK(legal, "group_wait gave %" PRId64, w);
	concur_group_free(g);
}

/* shared synchronisation objects and what they must guarantee */
static concur_mutex *g_mx;
static atomic_int mx_owned;
static concur_sem *g_sem;
static atomic_int sem_in;
static concur_event *g_ev;
static concur_chan *g_ch;
static atomic_long ch_sent, ch_recvd, ch_sent_sum, ch_recvd_sum;

/* A timeout for a sync wait (a huge one is a wait forever). */
static int64_t sync_timeout(struct rng *r)
{
	int64_t t = rnd_timeout(r);
	if (t > MS(10000))
		t = -1; /* a huge timeout is forever: the callers bound what may never come */
	return t;
}

static void op_sync(struct rng *r)
{
	switch (rndn(r, 4)) {
	case 0: {
		int64_t to = sync_timeout(r);
		int e = rndn(r, 3) == 0 ? concur_mutex_trylock(g_mx) : concur_mutex_lock(g_mx, to);
		CHECK(e == 0 || e == -ETIMEDOUT || e == -EBUSY, "mutex_lock %d", e);
		if (e)
			break;
		CHECK(!atomic_exchange(&mx_owned, 1), "two owners of the mutex");
		rnd_pause(r);
		atomic_store(&mx_owned, 0);
		CHECK(concur_mutex_unlock(g_mx) == 0, "unlock");
		break;
	}
	case 1: {
		int e = concur_sem_acquire(g_sem, sync_timeout(r));
		CHECK(e == 0 || e == -ETIMEDOUT, "sem_acquire %d", e);
		if (e)
			break;
		CHECK(atomic_fetch_add(&sem_in, 1) < SEM_UNITS, "semaphore over-granted");
		rnd_pause(r);
		atomic_fetch_sub(&sem_in, 1);
		CHECK(concur_sem_release(g_sem, 1) == 0, "sem_release");
		break;
	}
	case 2: {
		unsigned what = rndn(r, 4);
		if (what == 0) {
			CHECK(concur_event_set(g_ev) == 0, "event_set");
		} else if (what == 1) {
			CHECK(concur_event_clear(g_ev) == 0, "event_clear");
		} else {
			int64_t to = sync_timeout(r);
			if (to < 0)
				to = concur_in_task() ? 0 : MS(1); /* nobody may ever set it */
			int e = concur_event_wait(g_ev, to);
			CHECK(e == 0 || e == -ETIMEDOUT, "event_wait %d", e);
		}
		break;
	}
	default: {
		int64_t to = sync_timeout(r);
		if (to < 0)
			to = concur_in_task() ? 0 : MS(1); /* the other side may never come */
		if (rndn(r, 2)) {
			int64_t v = 1 + rndn(r, 1000);
			int e = concur_chan_send(g_ch, v, to);
			CHECK(e == 0 || e == -ETIMEDOUT, "chan_send %d", e);
			if (!e) {
				atomic_fetch_add(&ch_sent, 1);
				atomic_fetch_add(&ch_sent_sum, v);
			}
		} else {
			int64_t v = 0;
			int e = concur_chan_recv(g_ch, &v, to);
			CHECK(e == 0 || e == -ETIMEDOUT, "chan_recv %d", e);
			if (!e) {
				CHECK(v >= 1 && v <= 1000, "chan item %" PRId64, v);
				atomic_fetch_add(&ch_recvd, 1);
				atomic_fetch_add(&ch_recvd_sum, v);
			}
		}
		break;
	}
	}
}

static int64_t blocking_job(void *arg)
{
	struct leaf *l = arg;
	CHECK(!atomic_exchange(&l->ran, 1), "a blocking job ran twice");
	struct rng r = {l->seed};
	if (rndn(&r, 2))
		usleep(rndn(&r, 200));
	return l->value;
}

static void op_blocking(struct rng *r)
{
	struct leaf *l = leaf_new(r, 0);
	concur_future *f = concur_spawn_blocking(g_ex, blocking_job, l);
	add_callbacks(r, f, l->value, true);
	int cr = 0;
	if (rndn(r, 3) == 0) {
		rnd_pause(r);
		cr = concur_cancel(f);
		CHECK(cr == 0 || cr == 1 || cr == -EINPROGRESS, "blocking cancel %d", cr);
	}
	int64_t res = concur_result(f, rnd_timeout(r));
	if (res == -ETIMEDOUT)
		res = concur_result(f, -1);
	if (cr == 1)
		CHECK(res == -ECANCELED && !atomic_load(&l->ran), "cancelled job gave %" PRId64,
		      res);
	else
		CHECK(res == l->value || (cr && res == -ECANCELED), "blocking gave %" PRId64, res);
	concur_release(f);
	free(l);
}

static void op_io(struct rng *r)
{
	if (concur_in_task() && rndn(r, 2)) {
		if (rndn(r, 2))
			CHECK(concur_await_nop() == 0, "await_nop");
		else
			CHECK(concur_sleep(rndn(r, 50000)) == 0, "sleep");
		return;
	}
	concur_future *f = rndn(r, 3) ? concur_timeout(g_ex, rndn(r, 2) ? rndn(r, 100000) : MS(5))
	                              : concur_nop(g_ex);
	int cr = 0;
	if (rndn(r, 2)) {
		rnd_pause(r);
		cr = concur_cancel(f);
		CHECK(cr == 0 || cr == 1 || cr == -EINPROGRESS, "I/O cancel %d", cr);
	}
	int64_t res = concur_result(f, -1);
	CHECK(res == 0 || (cr && res == -ECANCELED), "I/O gave %" PRId64 " (cancel %d)", res, cr);
	concur_release(f);
}

enum {
	OP_NESTED,
	OP_CANCEL,
	OP_FF,
	OP_CHAIN,
	OP_PROMISE,
	OP_COMPOSE,
	OP_GROUP,
	OP_SYNC,
	OP_BLOCKING,
	OP_IO,
	OP_KINDS
};
static const char *const op_name[OP_KINDS] = {"nested",  "cancel", "forget", "chain",    "promise",
                                              "compose", "group",  "sync",   "blocking", "io"};

static void run_ops(struct rng *r)
{
	while (atomic_fetch_add(&g_next_op, 1) < g_ops) {
		unsigned k = rndn(r, OP_KINDS);
		atomic_fetch_add(&g_op_count[k], 1);
		switch (k) {
		case OP_NESTED:
			op_spawn_nested(r);
			break;
		case OP_CANCEL:
			op_cancel(r);
			break;
		case OP_FF:
			op_fire_and_forget(r);
			break;
		case OP_CHAIN:
			op_chain(r);
			break;
		case OP_PROMISE:
			op_promise(r);
			break;
		case OP_COMPOSE:
			op_compose(r);
			break;
		case OP_GROUP:
			op_group(r);
			break;
		case OP_SYNC:
			op_sync(r);
			break;
		case OP_BLOCKING:
			op_blocking(r);
			break;
		default:
			op_io(r);
			break;
		}
	}
}

static int64_t driver_task(void *arg)
{
	struct rng r = {(uint64_t)(uintptr_t)arg};
	run_ops(&r);
	return 0;
}

static void *driver_thread(void *arg)
{
	struct rng r = {(uint64_t)(uintptr_t)arg};
	run_ops(&r);
	return NULL;
}

/* ---- one seed ------------------------------------------------------------------------------ */

/* Runs on a thread of its own, which exits before the leak check: a thread outside the
 * executor keeps its doorbell ring until it exits. */
static void *stress_seed(void *arg)
{
	uint64_t seed = g_seed;
	long ops = g_ops;
	(void)arg;
	atomic_store(&g_next_op, 0);
	atomic_store(&g_cb_added, 0);
	atomic_store(&g_cb_fired, 0);
	atomic_store(&g_ff_spawned, 0);
	atomic_store(&g_ff_ran, 0);
	atomic_store(&g_tasks_ran, 0);
	for (int k = 0; k < OP_KINDS; k++)
		atomic_store(&g_op_count[k], 0);
	atomic_store(&ch_sent, 0);
	atomic_store(&ch_recvd, 0);
	atomic_store(&ch_sent_sum, 0);
	atomic_store(&ch_recvd_sum, 0);
	int64_t t0 = now_ns();
	printf("stress: seed %" PRIu64 ", %ld ops (CONCUR_STRESS_SEED=%" PRIu64
	       " CONCUR_STRESS_OPS=%ld to replay)\n",
	       seed, ops, seed, ops);
	fflush(stdout);

	struct concur_exec_opts o = {.loops = NLOOPS};
	CHECK(concur_exec_new(&g_ex, &o) == 0, "concur_exec_new");
	CHECK(concur_mutex_new(&g_mx) == 0, "concur_mutex_new");
	CHECK(concur_sem_new(&g_sem, SEM_UNITS) == 0, "concur_sem_new");
	CHECK(concur_event_new(&g_ev) == 0, "concur_event_new");
	CHECK(concur_chan_new(&g_ch, CHAN_CAP) == 0, "concur_chan_new");
	setter_stop = false;
	pthread_t setter, th[NTHREADS];
	CHECK(pthread_create(&setter, NULL, setter_main, NULL) == 0, "pthread_create");

	struct rng root = {seed};
	concur_future *drivers[NDRIVERS];
	for (int i = 0; i < NDRIVERS; i++)
		drivers[i] = concur_spawn(g_ex, driver_task, (void *)(uintptr_t)rnd(&root));
	for (int i = 0; i < NTHREADS; i++)
		CHECK(pthread_create(&th[i], NULL, driver_thread, (void *)(uintptr_t)rnd(&root)) ==
		          0,
		      "pthread_create");
	struct rng mine = {rnd(&root)};
	run_ops(&mine); /* the test thread drives too */

	for (int i = 0; i < NTHREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < NDRIVERS; i++) {
		CHECK(concur_result(drivers[i], -1) == 0, "concur_result");
		concur_release(drivers[i]);
	}
	pthread_mutex_lock(&setter_lock);
	setter_stop = true;
	pthread_cond_signal(&setter_cond);
	pthread_mutex_unlock(&setter_lock);
	pthread_join(setter, NULL);

	/* fire-and-forget tasks and chains released early finish on their own */
	CHECK(concur_exec_join(g_ex, -1) == 0, "concur_exec_join");
	CHECK(atomic_load(&g_ff_ran) == atomic_load(&g_ff_spawned), "fire and forget: %ld of %ld",
	      atomic_load(&g_ff_ran), atomic_load(&g_ff_spawned));
	CHECK(atomic_load(&g_cb_fired) == atomic_load(&g_cb_added), "callbacks: %ld of %ld ran",
	      atomic_load(&g_cb_fired), atomic_load(&g_cb_added));
	int64_t v;
	while (concur_chan_recv(g_ch, &v, 0) == 0) {
		atomic_fetch_add(&ch_recvd, 1);
		atomic_fetch_add(&ch_recvd_sum, v);
	}
	CHECK(atomic_load(&ch_sent) == atomic_load(&ch_recvd) &&
	          atomic_load(&ch_sent_sum) == atomic_load(&ch_recvd_sum),
	      "channel lost or made items");
	CHECK(concur_mutex_waiters(g_mx) == 0 && concur_sem_value(g_sem) == SEM_UNITS,
	      "sync objects not back to rest");
	concur_chan_free(g_ch);
	concur_event_free(g_ev);
	concur_sem_free(g_sem);
	concur_mutex_free(g_mx);
	struct concur_stats st;
	concur_exec_stats(g_ex, &st);
	concur_exec_free(g_ex);
	g_ex = NULL;

	printf("stress: seed %" PRIu64 " ok: %ld ops in %.2f s; %" PRIu64 " tasks spawned, %ld run "
	       "by the suite, %ld callbacks, %ld channel items; ops:",
	       seed, ops, (now_ns() - t0) / 1e9, st.tasks_spawned, atomic_load(&g_tasks_ran),
	       atomic_load(&g_cb_fired), atomic_load(&ch_recvd));
	for (int k = 0; k < OP_KINDS; k++)
		printf(" %s %ld", op_name[k], atomic_load(&g_op_count[k]));
	printf("\n");
	fflush(stdout);
	return NULL;
}

/* LeakSanitizer names the blocks still unreachable (and where they were allocated). */
static void show_leaks(void)
{
#if defined(__SANITIZE_ADDRESS__)
	__lsan_do_recoverable_leak_check();
#endif
}

static long env_long(const char *name, long dflt)
{
	const char *s = getenv(name);
	return s && *s ? strtol(s, NULL, 0) : dflt;
}

static void test_stress(void **state)
{
	(void)state;
	uint64_t seed = (uint64_t)env_long("CONCUR_STRESS_SEED", 0);
	if (!seed) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		seed = (uint64_t)ts.tv_sec * 1000003u ^ (uint64_t)ts.tv_nsec ^ (uint64_t)getpid();
	}
	long ops = env_long("CONCUR_STRESS_OPS", STRESS_DEFAULT_OPS);
	long seeds = env_long("CONCUR_STRESS_SEEDS", 1);
	/* a hang is a failure: a generous guard per seed (a sanitized build is 10-50x slower) */
	signal(SIGALRM, on_alarm);
	concur_blocking_config(0, MS(5)); /* idle helpers exit soon, for the leak check */
	for (long i = 0; i < seeds; i++) {
		alarm((unsigned)(60 + ops / (SANITIZED ? 20 : 200)));
		long live0 = atomic_load(&wrap_live);
		g_seed = seed + (uint64_t)i;
		g_ops = ops;
		pthread_t t;
		assert_int_equal(pthread_create(&t, NULL, stress_seed, NULL), 0);
		pthread_join(t, NULL);
		/* the blocking pool's idle helpers go away; then nothing allocated may be left */
		for (int w = 0; w < 2000 && concur_blocking_threads(); w++)
			usleep(1000);
		CHECK(concur_blocking_threads() == 0, "blocking helpers did not exit");
		/* a helper frees its doorbell ring in a thread-exit destructor, after it left the
		 * count above: give exiting threads a moment */
		long live = atomic_load(&wrap_live) - live0;
		for (int w = 0; w < 1000 && (live || concur__chunks_live()); w++) {
			usleep(1000);
			live = atomic_load(&wrap_live) - live0;
		}
		if (live)
			show_leaks();
		CHECK(live == 0, "%ld heap blocks left after concur_exec_free", live);
		/* nor a chunk of record slabs (mapped, not malloc'd: exec.c) */
		CHECK(concur__chunks_live() == 0, "%ld chunks left after concur_exec_free",
		      concur__chunks_live());
	}
	alarm(0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_stress),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

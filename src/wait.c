/* SPDX-License-Identifier: MIT */
/*
 * wait, gather, as_completed, then and spawn_after: all built on waiter nodes of their own
 * (CONCUR__WAIT_CALL, embedded in the composition's record) that count inputs down and set a
 * promise, which the caller awaits with concur_result(): a foreign thread blocks on it, a task
 * suspends. Nothing polls, and nothing that waits for inputs holds a thread or a fiber stack.
 *
 * Lifetimes: a node's hook may be running in the completing thread just as the wait that
 * hung it returns (on a timeout), so what the hooks touch is a small refcounted record: one
 * reference for the waiter, one per node on an input's list. A wait that ends takes its nodes
 * back (concur__waiter_remove), dropping their references: a timed-out or abandoned wait
 * leaves nothing on a future, however long that future lives (or if it dies unset).
 *
 * Order: as_completed records a completion in its record hook, before the input's state is
 * final, so an input anyone could see done earlier is always yielded earlier.
 */
#include "wait.h"

#include <stdlib.h>
#include <string.h>

/* ---- wake slots ----------------------------------------------------------------------------- */

int64_t concur__wake_sleep(pthread_mutex_t *lock, concur_future **slot, int64_t deadline)
{
	int64_t left = concur__remaining(deadline);
	if (left == 0) {
		pthread_mutex_unlock(lock);
		return -ETIMEDOUT;
	}
	if (!*slot)
		*slot = concur_promise_new(NULL);
	concur_future *p = concur_retain(*slot);
	pthread_mutex_unlock(lock);
	if (!p)
		return -ENOMEM;
	int64_t r = concur_result(p, left);
	concur_release(p);
	return r;
}

void concur__wake_fire(pthread_mutex_t *lock, concur_future **slot)
{
	pthread_mutex_lock(lock);
	concur_future *p = *slot;
	*slot = NULL;
	pthread_mutex_unlock(lock);
	if (p) {
		concur_promise_set(p, 0);
		concur_release(p);
	}
}

int concur__check_futures(concur_future *const *futures, size_t n)
{
	if ((n && !futures) || n > CONCUR_MAX_FUTURES)
		return -EINVAL;
	for (size_t i = 0; i < n; i++)
		if (!concur__valid(futures[i]))
			return -EINVAL;
	return 0;
}

/* ---- countdown: wait and gather ------------------------------------------------------------- */

struct countdown;
struct cd_node {
	struct concur__waiter w; /* on f's list while f is set */
	struct countdown *c;
	concur_future *f; /* NULL: not hung (f was done at once) */
};

struct countdown {
	_Atomic uint32_t refs;
	_Atomic size_t done;   /* inputs done (an index counts once per occurrence) */
	_Atomic size_t target; /* wake the waiter when done reaches it */
	_Atomic bool failed;   /* an input failed (FIRST_EXCEPTION only) */
	/* the first failure (an error, -ECANCELED) in the order the inputs completed, as the
	 * record hooks see it; 0: none. Those done by the time the countdown had its nodes on
	 * every input come first, in input order, as concur_as_completed_new() takes them
	 * (start_err, of input start_idx, under lock until set_up): one found done when its node
	 * was refused may have completed before or after a failure another node recorded
	 * meanwhile, and nothing tells which */
	_Atomic int64_t first_err;
	int64_t start_err;
	size_t start_idx;
	_Atomic bool set_up; /* set under lock once a node is on every input not done */
	bool stop_on_failure;
	pthread_mutex_t lock; /* orders the waiter's check against the nodes' fire */
	concur_future *wake;
	size_t n;
	struct cd_node node[];
};

static void wait_countdown_put(struct countdown *c)
{
	if (atomic_fetch_sub(&c->refs, 1) != 1)
		return;
	concur_release(c->wake);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

/* One more input done (f is): count it, wake the waiter if that was the target. */
static void wait_countdown_count(struct countdown *c, concur_future *f)
{
	size_t d = atomic_fetch_add(&c->done, 1) + 1;
	bool failed = c->stop_on_failure && concur__failed(f);
	if (failed)
		atomic_store(&c->failed, true);
	if (failed || d >= atomic_load(&c->target))
		concur__wake_fire(&c->lock, &c->wake);
}

/* Input i failed with err (< 0): while the nodes are being hung, the lowest such input wins;
 * after, the first to complete. */
static void wait_countdown_failed(struct countdown *c, size_t i, int64_t err)
{
	if (!atomic_load(&c->set_up)) {
		pthread_mutex_lock(&c->lock);
		bool during = !atomic_load(&c->set_up);
		if (during && (!c->start_err || i < c->start_idx)) {
			c->start_err = err;
			c->start_idx = i;
		}
		pthread_mutex_unlock(&c->lock);
		if (during)
			return;
	}
	int64_t none = 0;
	atomic_compare_exchange_strong(&c->first_err, &none, err);
}

/* Before the input's completion can be seen: the first failure is the first to complete. */
static void wait_cd_record(struct concur__waiter *w, concur_future *f, int64_t res,
                           uint32_t final_state)
{
	struct cd_node *node = (struct cd_node *)w;
	int64_t err = final_state == CONCUR__CANCELLED ? -ECANCELED : res;
	if (err < 0)
		wait_countdown_failed(node->c, (size_t)(node - node->c->node), err);
}

static void wait_cd_done(struct concur__waiter *w, concur_future *f)
{
	struct countdown *c = ((struct cd_node *)w)->c;
	wait_countdown_count(c, f);
	wait_countdown_put(c);
}

/* The input died unset. Not while the caller holds its reference, as it must for the whole
 * call (the wait reads its inputs after the countdown): only the count is given back. */
static void wait_cd_drop(struct concur__waiter *w, concur_future *f)
{
	wait_countdown_put(((struct cd_node *)w)->c);
}

static const struct concur__waiter_ops cd_ops = {
    .record = wait_cd_record, .done = wait_cd_done, .drop = wait_cd_drop};

/*
 * Count futures[0..n) down: each done now is counted at once (and marks the record failed if it
 * failed, with stop_on_failure), a node is hung on each of the others. Returns the record (the
 * caller holds one reference; its target is SIZE_MAX until wait_countdown_wait; wait_countdown_end
 * takes the nodes back) or NULL with *err set.
 */
static struct countdown *wait_countdown_start(concur_future *const *futures, size_t n,
                                              bool stop_on_failure, int *err)
{
	struct countdown *c = calloc(1, sizeof(*c) + n * sizeof(c->node[0]));
	if (!c) {
		*err = -ENOMEM;
		return NULL;
	}
	atomic_init(&c->refs, 1);
	atomic_init(&c->target, SIZE_MAX);
	c->stop_on_failure = stop_on_failure;
	c->n = n;
	pthread_mutex_init(&c->lock, NULL);
	*err = 0;
	for (size_t i = 0; i < n; i++) {
		struct cd_node *node = &c->node[i];
		node->w.kind = CONCUR__WAIT_CALL;
		node->w.ops = &cd_ops;
		node->c = c;
		atomic_fetch_add(&c->refs, 1);
		if (concur__waiter_push(futures[i], &node->w)) {
			node->f = futures[i];
		} else { /* done already */
			atomic_fetch_sub(&c->refs, 1);
			int64_t v = concur__future_value(futures[i]);
			if (v < 0)
				wait_countdown_failed(c, i, v);
			wait_countdown_count(c, futures[i]);
		}
	}
	pthread_mutex_lock(&c->lock);
	atomic_store(&c->set_up, true);
	pthread_mutex_unlock(&c->lock);
	return c;
}

/* The wait is over: take back the nodes still hung, and drop the caller's reference. */
static void wait_countdown_end(struct countdown *c)
{
	size_t taken = 0;
	for (size_t i = 0; i < c->n; i++)
		if (c->node[i].f && concur__waiter_remove(c->node[i].f, &c->node[i].w))
			taken++;
	/* never the last while ours is still held: one subtraction for the nodes taken back */
	if (taken)
		atomic_fetch_sub(&c->refs, taken);
	wait_countdown_put(c);
}

/* Wait until target inputs are done (or one failed, with stop_on_failure): 0 or an error. */
static int64_t wait_countdown_wait(struct countdown *c, size_t target, int64_t deadline)
{
	pthread_mutex_lock(&c->lock);
	atomic_store(&c->target, target);
	if (atomic_load(&c->done) >= target || atomic_load(&c->failed)) {
		pthread_mutex_unlock(&c->lock);
		return 0;
	}
	return concur__wake_sleep(&c->lock, &c->wake, deadline);
}

/* How many of futures[0..n) are the caller's own future (concur__self) not done yet, which
 * cannot be done while it waits. (A blocking job's callbacks run in its thread once its future
 * is done: that one is not waited for.) */
static size_t wait_self_count(concur_future *const *futures, size_t n)
{
	const concur_future *self = concur__self();
	if (!self || concur_done(self))
		return 0;
	size_t k = 0;
	for (size_t i = 0; i < n; i++)
		k += futures[i] == self;
	return k;
}

static bool wait_satisfied(int mode, size_t ndone, size_t n, bool failed)
{
	if (mode == CONCUR_FIRST_COMPLETED)
		return ndone > 0 || n == 0;
	return ndone == n || (mode == CONCUR_FIRST_EXCEPTION && failed);
}

int concur_wait(concur_future *const *futures, size_t n, int mode, int64_t timeout_ns,
                bool *done_out)
{
	int err = concur__check_futures(futures, n);
	if (err)
		return err;
	if (mode != CONCUR_ALL_COMPLETED && mode != CONCUR_FIRST_COMPLETED &&
	    mode != CONCUR_FIRST_EXCEPTION)
		return -EINVAL;
	int64_t deadline = concur__deadline_after(timeout_ns);
	size_t ndone = 0;
	bool failed = false;
	for (size_t i = 0; i < n; i++) {
		if (concur_done(futures[i])) {
			ndone++;
			failed = failed || concur__failed(futures[i]);
		}
	}
	if (!wait_satisfied(mode, ndone, n, failed) && timeout_ns != 0) {
		/* it would wait for its own end: in ALL_COMPLETED whenever it is an input; else
		 * when every input still pending is it (nothing else could end the wait) */
		size_t selves = wait_self_count(futures, n);
		if (mode == CONCUR_ALL_COMPLETED ? selves > 0 : selves && selves == n - ndone)
			return -EDEADLK;
		struct countdown *c =
		    wait_countdown_start(futures, n, mode == CONCUR_FIRST_EXCEPTION, &err);
		if (!c)
			return err;
		/* FIRST_EXCEPTION with itself among the inputs: a failure ends it, or the others
		 * all succeeding leave it waiting for itself alone */
		int64_t r = wait_countdown_wait(c, mode == CONCUR_FIRST_COMPLETED ? 1 : n - selves,
		                                deadline);
		bool self_left =
		    mode == CONCUR_FIRST_EXCEPTION && r == 0 && selves && !atomic_load(&c->failed);
		wait_countdown_end(c);
		if (self_left)
			return -EDEADLK;
		if (r < 0 && r != -ETIMEDOUT)
			return (int)r;
		/* not the caller's timeout: a task's deadline scope that passed (a count would let
		 * a caller that waits again spin, every later wait failing at once) */
		if (r == -ETIMEDOUT && concur__tl_task && concur__remaining(deadline) != 0 &&
		    (r = concur__ctl_check(concur__tl_task)))
			return (int)r;
	}
	int count = 0;
	for (size_t i = 0; i < n; i++) {
		bool d = concur_done(futures[i]);
		count += d;
		if (done_out)
			done_out[i] = d;
	}
	return count;
}

int64_t concur_gather(concur_future *const *futures, size_t n, int64_t timeout_ns,
                      int64_t *values_out, const struct concur_gather_opts *opts)
{
	static const struct concur_gather_opts defaults;
	if (!opts)
		opts = &defaults;
	int err = concur__check_futures(futures, n);
	if (err)
		return err;
	if (opts->flags & ~(unsigned)CONCUR_GATHER_RETURN_ERRORS)
		return -EINVAL;
	if (wait_self_count(futures, n)) /* it would wait for its own end */
		return -EDEADLK;
	int64_t t0 = concur__now_ns();
	int64_t deadline = concur__deadline_after(timeout_ns);
	int64_t r = 0;
	struct countdown *c = wait_countdown_start(futures, n, false, &err);
	if (!c)
		return err;
	/* With a progress callback, wake up each time another 1% is done (at most ~100 times). */
	size_t step = opts->progress ? (n + 99) / 100 : n;
	size_t done, reported = 0; /* the last step reported: a wake-up may come early */
	while ((done = atomic_load(&c->done)) < n) {
		size_t target = (done / step + 1) * step;
		r = wait_countdown_wait(c, target < n ? target : n, deadline);
		if (r < 0)
			break;
		done = atomic_load(&c->done);
		if (opts->progress && done < n && done / step > reported) {
			reported = done / step;
			opts->progress(done, n, concur__now_ns() - t0, opts->progress_arg);
		}
	}
	if (opts->progress)
		opts->progress(atomic_load(&c->done), n, concur__now_ns() - t0, opts->progress_arg);
	if (r < 0 && r != -ETIMEDOUT) {
		wait_countdown_end(c);
		return r;
	}
	bool unfinished = false;
	for (size_t i = 0; i < n; i++) {
		int64_t v = -ETIMEDOUT;
		if (concur_done(futures[i]))
			v = concur__future_value(futures[i]);
		else
			unfinished = true;
		if (values_out)
			values_out[i] = v;
	}
	/* every input done: each failure is recorded (before it could be seen done) */
	int64_t first_err = c->start_err ? c->start_err : atomic_load(&c->first_err);
	wait_countdown_end(c);
	if (unfinished)
		return -ETIMEDOUT;
	return (opts->flags & CONCUR_GATHER_RETURN_ERRORS) ? 0 : first_err;
}

/* ---- as_completed --------------------------------------------------------------------------- */

struct ac_shared;
struct ac_slot {
	struct concur__waiter w; /* on futs[k]'s list until it completes or the iterator ends */
	struct ac_shared *s;
	size_t k;  /* index among the distinct futures */
	bool hung; /* w was pushed */
};

/* What the nodes touch: the queue of done indices, in the order they became done. */
struct ac_shared {
	_Atomic uint32_t refs;
	pthread_mutex_t lock;
	size_t head, tail;     /* ready[head..tail) not yielded yet; each index is queued once */
	concur_future *wake;   /* the consumer's wake slot */
	size_t *ready;         /* n entries */
	struct ac_slot slot[]; /* n entries */
};

struct concur_as_completed {
	struct ac_shared *s;
	concur_future **futs; /* distinct futures; the iterator's reference, NULL once yielded */
	size_t n, yielded;
	int64_t deadline;
};

static void wait_ac_put(struct ac_shared *s)
{
	if (atomic_fetch_sub(&s->refs, 1) != 1)
		return;
	concur_release(s->wake);
	pthread_mutex_destroy(&s->lock);
	free(s->ready);
	free(s);
}

static void wait_ac_queue(struct ac_shared *s, size_t k)
{
	pthread_mutex_lock(&s->lock);
	s->ready[s->tail++] = k;
	pthread_mutex_unlock(&s->lock);
}

/* Before f's state is final: take f's place in the completion order. */
static void wait_ac_record(struct concur__waiter *w, concur_future *f, int64_t res,
                           uint32_t final_state)
{
	struct ac_slot *slot = (struct ac_slot *)w;
	wait_ac_queue(slot->s, slot->k);
}

static void wait_ac_done(struct concur__waiter *w, concur_future *f)
{
	struct ac_shared *s = ((struct ac_slot *)w)->s;
	concur__wake_fire(&s->lock, &s->wake);
	wait_ac_put(s);
}

/* Cannot happen while the iterator holds f; gives the reference back all the same. */
static void wait_ac_drop(struct concur__waiter *w, concur_future *f)
{
	wait_ac_put(((struct ac_slot *)w)->s);
}

static const struct concur__waiter_ops ac_ops = {
    .record = wait_ac_record, .done = wait_ac_done, .drop = wait_ac_drop};

/* Keep the first occurrence of each future, in input order, in out; returns how many. */
static size_t wait_dedupe(concur_future *const *futures, size_t n, concur_future **out, int *err)
{
	size_t cap = 16;
	while (cap < 2 * n)
		cap *= 2;
	concur_future **set = calloc(cap, sizeof(*set));
	if (!set) {
		*err = -ENOMEM;
		return 0;
	}
	size_t m = 0;
	/* Fibonacci hashing: the product's top bits, which every bit of the address feeds (its
	 * low bits see only the address's low bits, alike for records a fixed stride apart) */
	unsigned shift = 64 - (unsigned)__builtin_ctzll(cap);
	for (size_t i = 0; i < n; i++) {
		size_t h =
		    (size_t)(((uint64_t)(uintptr_t)futures[i] * 0x9e3779b97f4a7c15ull) >> shift);
		for (; set[h] && set[h] != futures[i]; h = (h + 1) & (cap - 1))
			;
		if (!set[h])
			set[h] = out[m++] = futures[i];
	}
	free(set);
	*err = 0;
	return m;
}

static int wait_index_cmp(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;
	return (x > y) - (x < y);
}

int concur_as_completed_new(concur_as_completed **out, concur_future *const *futures, size_t n,
                            int64_t timeout_ns)
{
	int err = concur__check_futures(futures, n);
	if (!out || err)
		return -EINVAL;
	concur_as_completed *it = calloc(1, sizeof(*it));
	struct ac_shared *s = calloc(1, sizeof(*s) + n * sizeof(s->slot[0]));
	concur_future **futs = calloc(n ? n : 1, sizeof(*futs));
	size_t *ready = calloc(n ? n : 1, sizeof(*ready));
	size_t m = 0;
	if (it && s && futs && ready)
		m = wait_dedupe(futures, n, futs, &err);
	if (!it || !s || !futs || !ready || err) {
		free(it);
		free(s);
		free(futs);
		free(ready);
		return -ENOMEM;
	}
	atomic_init(&s->refs, 1);
	pthread_mutex_init(&s->lock, NULL);
	s->ready = ready;
	it->s = s;
	it->futs = futs;
	it->n = m;
	it->deadline = concur__deadline_after(timeout_ns);
	/*
	 * A node on every future, then what is done by now (the pushes refused, and those whose
	 * node took their completion meanwhile) sorted into input order: "done when made". Later
	 * completions queue themselves in completion order. (Looking at which were done before
	 * hanging the others' nodes let a future that completed between the two passes come after
	 * one that completed later, but was done at the first look.)
	 */
	for (size_t k = 0; k < m; k++)
		concur_retain(futs[k]);
	for (size_t k = 0; k < m; k++) {
		struct ac_slot *slot = &s->slot[k];
		*slot = (struct ac_slot){.s = s, .k = k};
		slot->w.kind = CONCUR__WAIT_CALL;
		slot->w.ops = &ac_ops;
		atomic_fetch_add(&s->refs, 1);
		slot->hung = concur__waiter_push(futs[k], &slot->w);
		if (!slot->hung) { /* done already */
			atomic_fetch_sub(&s->refs, 1);
			wait_ac_queue(s, k);
		}
	}
	pthread_mutex_lock(&s->lock);
	qsort(s->ready, s->tail, sizeof(s->ready[0]), wait_index_cmp);
	pthread_mutex_unlock(&s->lock);
	*out = it;
	return 0;
}

/* Whether the one future left to yield is the caller's own (concur__self) not done yet: as
 * concur_wait's FIRST_COMPLETED, it waits while another could still come first. */
static bool wait_ac_self_left(const concur_as_completed *it)
{
	const concur_future *self = concur__self();
	if (!self || it->n - it->yielded != 1 || concur_done(self) ||
	    concur__remaining(it->deadline) == 0) /* past its deadline: -ETIMEDOUT, as a wait's */
		return false;
	for (size_t k = 0; k < it->n; k++)
		if (it->futs[k])
			return it->futs[k] == self;
	return false;
}

int concur_as_completed_next(concur_as_completed *it, concur_future **f)
{
	if (!it || !f)
		return -EINVAL;
	struct ac_shared *s = it->s;
	while (it->yielded < it->n) {
		pthread_mutex_lock(&s->lock);
		if (s->head < s->tail) {
			size_t k = s->ready[s->head++];
			pthread_mutex_unlock(&s->lock);
			/* queued before its state turned final: that is imminent */
			concur__future_wait_final(it->futs[k]);
			*f = it->futs[k]; /* the iterator's reference goes to the caller */
			it->futs[k] = NULL;
			it->yielded++;
			return 1;
		}
		if (wait_ac_self_left(it)) { /* it would wait for its own end */
			pthread_mutex_unlock(&s->lock);
			return -EDEADLK;
		}
		int64_t r = concur__wake_sleep(&s->lock, &s->wake, it->deadline);
		if (r == -ETIMEDOUT && concur__remaining(it->deadline) == 0) {
			pthread_mutex_lock(&s->lock);
			bool empty = s->head == s->tail;
			pthread_mutex_unlock(&s->lock);
			if (!empty)
				continue;
			concur__set_error(
			    "as_completed: %zu of %zu futures unfinished at the deadline",
			    it->n - it->yielded, it->n);
			return -ETIMEDOUT;
		}
		if (r < 0 && r != -ETIMEDOUT)
			return (int)r;
		/* not the iterator's deadline: a task's deadline scope that passed, which fails
		 * every later wait at once (looping would spin on the loop's thread for good) */
		if (r == -ETIMEDOUT && concur__tl_task && (r = concur__ctl_check(concur__tl_task)))
			return (int)r;
	}
	return 0;
}

size_t concur_as_completed_unfinished(const concur_as_completed *it, size_t *total)
{
	if (total)
		*total = it ? it->n : 0;
	return it ? it->n - it->yielded : 0;
}

void concur_as_completed_free(concur_as_completed *it)
{
	if (!it)
		return;
	struct ac_shared *s = it->s;
	for (size_t k = 0; k < it->n; k++) {
		if (!it->futs[k])
			continue;
		if (s->slot[k].hung && concur__waiter_remove(it->futs[k], &s->slot[k].w))
			wait_ac_put(s); /* never the last: ours is still held */
		concur_release(it->futs[k]);
	}
	free(it->futs);
	wait_ac_put(s);
	free(it);
}

/* ---- then and spawn_after ------------------------------------------------------------------- */

/*
 * A dependent task is a task record made at once but queued only when its inputs are done: no
 * stack, no thread and no work count while it waits. Its unwrapping state lives right after the
 * record, in the same allocation, and so do the waiter nodes it hangs on its inputs. The future
 * handed out is the task's own. The record lives until every input is done or dead, or the
 * task is cancelled (it takes its nodes back): an input released without ever completing
 * counts as cancelled (it can never run fn), so the record does not wait forever, and the
 * dependent ends CANCELLED.
 */
/*
 * Its tag: the input's index, and AFTER_DROPPED once the input died unset.
 *
 * A slot is told once: by its input's hook (done, or dropped unset), or by a cancel of the task
 * that takes w back off the input's list first (wait_after_unhang), so that a dependent
 * cancelled early holds nothing of its inputs'. The list's lock decides which: a take-back
 * succeeds only while the list is open, and the hooks run only once it is closed. What the slot
 * word adds is the input's lifetime: the task holds no reference to it, so the cancel marks the
 * slot AFTER_TAKING while it looks at the input, and the hook waits that out before it lets the
 * input go on to be freed.
 */
struct after_slot {
	/* on input i's waiter list. Its word: input i while the slot is not told, with
	 * AFTER_TAKING while a cancel looks at it; AFTER_TOLD once told (futures are 8-aligned:
	 * the low bits are free) */
	struct concur__waiter w;
};
#define AFTER_DROPPED (1u << 31) /* above every index (< CONCUR_MAX_FUTURES) */
#define AFTER_TOLD    ((uintptr_t)1)
#define AFTER_TAKING  ((uintptr_t)2)

/*
 * Kept small: a then's record (the task, this, one slot, one value) is what a pipeline allocates
 * for each stage, and every line of it travels from the thread that made it to the loop that
 * runs it. So what can be found is not stored: the task is just before (t->arg == t + 1), the
 * slots start at the next 16-byte boundary (waiter nodes are 16-aligned, and so is the task's
 * record: no gap after the task's 120 bytes and these 24), the values follow the slots, the kind
 * of call is the task's fn (wait_then_task or wait_after_task), and the thread's start queue
 * (concur__defer) links the task's node (free until it is queued).
 */
struct after {
	union {
		concur_after_fn fn;
		concur_then_fn then_fn;
	};
	void *arg;
	_Atomic uint32_t remaining;
	uint32_t n;
};

/* Where the slots start, from the struct after (just after its task's record). */
#define AFTER_SLOTS_AT                                                                             \
	(((sizeof(struct concur__task) + sizeof(struct after) + 15) & ~(size_t)15) -               \
	 sizeof(struct concur__task))

_Static_assert(AFTER_SLOTS_AT + sizeof(struct after_slot) + sizeof(int64_t) <=
                   CONCUR__DEFERRED_CACHED_EXTRA,
               "a then's record is of the cached size");

static inline struct concur__task *wait_after_task_of(struct after *a)
{
	return (struct concur__task *)(void *)a - 1;
}

static inline struct after_slot *wait_after_slots(struct after *a)
{
	return (struct after_slot *)(void *)((char *)a + AFTER_SLOTS_AT);
}

static inline int64_t *wait_after_values(struct after *a)
{
	return (int64_t *)(void *)&wait_after_slots(a)[a->n];
}

static inline uint32_t wait_after_slot_index(const struct after_slot *slot)
{
	return slot->w.tag & ~AFTER_DROPPED;
}

static inline struct after *wait_after_of_slot(struct after_slot *slot)
{
	return (struct after *)(void *)((char *)(slot - wait_after_slot_index(slot)) -
	                                AFTER_SLOTS_AT);
}

static int64_t wait_after_task(void *arg)
{
	struct after *a = arg;
	return a->fn(a->arg, a->n ? wait_after_values(a) : NULL, a->n);
}

static int64_t wait_then_task(void *arg)
{
	struct after *a = arg;
	return a->then_fn(a->arg, wait_after_values(a)[0]);
}

/* Every input is done: queue the task, or end it with the first input's error. */
static void wait_after_start(struct concur__task *t)
{
	struct after *a = t->arg;
	int64_t *values = wait_after_values(a);
	for (size_t i = 0; i < a->n; i++) {
		if (values[i] < 0) {
			/* a cancelled input (or one dropped unset) cancels it, as a task returning
			 * -ECANCELED ends CANCELLED */
			concur__task_end_unrun(t, values[i],
			                       ((wait_after_slots(a)[i].w.tag & AFTER_DROPPED) ||
			                        values[i] == -ECANCELED)
			                           ? CONCUR__CANCELLED
			                           : CONCUR__FINISHED);
			return;
		}
	}
	/* a freed executor cannot take it: never touch it (its memory may be gone) */
	if (!concur__exec_alive(t->f.ex, t->f.ex_id)) {
		concur__task_end_unrun(t, -ESHUTDOWN, CONCUR__FINISHED);
		return;
	}
	concur__task_enqueue(t); /* cancelled meanwhile: its loop drops it unrun */
}

static void wait_after_start_call(struct concur__loop *loop, struct concur__node *n)
{
	(void)loop;
	wait_after_start(concur__task_of_node(n));
}

/* Every input is done: start it, after what this thread is starting already (concur__defer). */
static void wait_after_ready(struct after *a)
{
	struct concur__node *n = &wait_after_task_of(a)->node;
	n->call = wait_after_start_call;
	concur__defer(n);
}

static void wait_after_input_value(struct after_slot *slot, int64_t v)
{
	struct after *a = wait_after_of_slot(slot);
	wait_after_values(a)[wait_after_slot_index(slot)] = v;
	/* one input (a then, a spawn_after of one): its one slot is told once (done, dropped, or
	 * taken back), so it is the last; no count to take down (a second locked instruction per
	 * stage of a pipeline, on the loop, after the slot's claim) */
	if (a->n == 1 || atomic_fetch_sub(&a->remaining, 1) == 1)
		wait_after_ready(a);
}

/* The input tells the slot (its hook, or a push refused: done already). A cancel looking at
 * the input meanwhile finds its list closed and gives the slot back; the input lives until
 * then. */
static void wait_after_claim(struct after_slot *slot)
{
	uintptr_t v = atomic_load_explicit(&slot->w.word, memory_order_acquire);
	unsigned spins = 0;
	for (;;) {
		if (v & AFTER_TAKING) { /* a few instructions away */
			concur__backoff(&spins);
			v = atomic_load_explicit(&slot->w.word, memory_order_acquire);
		} else if (atomic_compare_exchange_weak_explicit(&slot->w.word, &v, AFTER_TOLD,
		                                                 memory_order_acq_rel,
		                                                 memory_order_acquire)) {
			return;
		}
	}
}

static void wait_after_input_done(struct concur__waiter *w, concur_future *f)
{
	struct after_slot *slot = (struct after_slot *)w;
	wait_after_claim(slot);
	wait_after_input_value(slot, concur__future_value(f));
}

static void wait_after_input_drop(struct concur__waiter *w, concur_future *f)
{
	struct after_slot *slot = (struct after_slot *)w;
	wait_after_claim(slot);
	slot->w.tag |= AFTER_DROPPED;
	wait_after_input_value(slot, -ECANCELED);
}

/* The task was cancelled while it waited for its inputs (concur_cancel, which holds a reference
 * to it across this: a tell here or in another thread may let the executor go of it): take its
 * nodes back from the inputs not done, each told -ECANCELED, so that its record
 * goes now (with the last one, wait_after_start lets go of it) and not when they complete. */
static void wait_after_unhang(concur_future *f)
{
	struct after *a = ((struct concur__task *)f)->arg;
	for (uint32_t i = 0; i < a->n; i++) {
		struct after_slot *slot = &wait_after_slots(a)[i];
		uintptr_t v = atomic_load_explicit(&slot->w.word, memory_order_acquire);
		if (v == AFTER_TOLD || !atomic_compare_exchange_strong_explicit(
		                           &slot->w.word, &v, v | AFTER_TAKING,
		                           memory_order_acq_rel, memory_order_acquire))
			continue; /* told, or being told */
		if (concur__waiter_take_back((concur_future *)v, &slot->w)) {
			atomic_store_explicit(&slot->w.word, AFTER_TOLD, memory_order_release);
			wait_after_input_value(slot, -ECANCELED);
		} else { /* the input's completion took the list: its hook tells the slot */
			atomic_store_explicit(&slot->w.word, v, memory_order_release);
		}
	}
}

static const struct concur__future_class wait_after_class =
    CONCUR__DEFERRED_TASK_CLASS(wait_after_unhang);

static const struct concur__waiter_ops after_ops = {.done = wait_after_input_done,
                                                    .drop = wait_after_input_drop};

static concur_future *wait_after_new(concur_exec *ex, concur_after_fn fn, concur_then_fn then_fn,
                                     void *arg, concur_future *const *inputs, size_t n)
{
	if (!concur__exec_valid(ex))
		return concur__failed_future(NULL, -EINVAL);
	int err = concur__check_futures(inputs, n);
	if (err)
		return concur__failed_future(ex, err);
	struct concur__task *t = concur__task_new_deferred(
	    ex, &wait_after_class, then_fn ? wait_then_task : wait_after_task,
	    AFTER_SLOTS_AT + n * (sizeof(struct after_slot) + sizeof(int64_t)));
	if (!t)
		return concur__failed_future(ex, -ENOMEM);
	struct after *a = t->arg;
	if (then_fn)
		a->then_fn = then_fn;
	else
		a->fn = fn;
	a->arg = arg;
	a->n = (uint32_t)n;
	/* With several inputs (or none), one extra count, dropped below, so the task cannot start
	 * while waiters are still added; one input takes no count (wait_after_input_value). */
	bool guard = n != 1;
	if (guard)
		atomic_init(&a->remaining, (uint32_t)n + 1);
	for (size_t i = 0; i < n; i++) {
		struct after_slot *slot = &wait_after_slots(a)[i];
		*slot = (struct after_slot){
		    .w = {.kind = CONCUR__WAIT_CALL, .tag = (uint32_t)i, .ops = &after_ops}};
		atomic_init(&slot->w.word, (uintptr_t)inputs[i]);
		if (!concur__waiter_push(inputs[i], &slot->w))
			wait_after_input_done(&slot->w, inputs[i]); /* already done */
	}
	if (guard && atomic_fetch_sub(&a->remaining, 1) == 1)
		wait_after_ready(a);
	return &t->f;
}

concur_future *concur_spawn_after(concur_exec *ex, concur_after_fn fn, void *arg,
                                  concur_future *const *inputs, size_t n)
{
	if (!fn)
		return concur__failed_future(NULL, -EINVAL);
	return wait_after_new(ex, fn, NULL, arg, inputs, n);
}

concur_future *concur_then(concur_future *f, concur_then_fn fn, void *arg)
{
	if (!fn || !concur__valid(f))
		return concur__failed_future(NULL, -EINVAL);
	concur_exec *ex = concur_future_exec(f);
	if (!ex && f->ex) /* f's executor is gone: it cannot take the task */
		return concur__failed_future(NULL, -ESHUTDOWN);
	if (!ex)
		ex = concur_current_exec();
	return wait_after_new(ex, NULL, fn, arg, &f, 1);
}

/* SPDX-License-Identifier: MIT */
/*
 * Fiber-aware mutex, semaphore, event and bounded MPMC channel.
 *
 * Each object has a pthread mutex held only to look at its state and its FIFO waiter queues,
 * never while anyone sleeps. A waiter is a node on the waiter's own stack (a suspended fiber's
 * stack stays put) with its own promise: it queues itself, drops the lock and sleeps in
 * concur_result() on the promise, which blocks a foreign thread or suspends a task; whoever
 * hands it what it waits for (the mutex, a unit, an item, the news of a close) takes it off the
 * queue, writes its status under the lock and sets the promise. A waiter that gives up (a
 * timeout, a cancel) takes the lock and removes itself if it is still queued; if it is not, it
 * was granted meanwhile and takes the grant, once its promise is set (the granter may still need
 * its node). So a wake-up is never lost and never doubled.
 */
#include "wait.h"

#include <stdlib.h>

struct sync_waiter {
	struct sync_waiter *prev, *next;
	concur_future *wake; /* the waiter's promise */
	bool queued;
	int status;    /* written by the granter, under the lock */
	int64_t value; /* a channel item, either way */
};

struct sync_waitq {
	struct sync_waiter *head, *tail;
};

static void sync_wq_remove(struct sync_waitq *q, struct sync_waiter *w)
{
	if (w->prev)
		w->prev->next = w->next;
	else
		q->head = w->next;
	if (w->next)
		w->next->prev = w->prev;
	else
		q->tail = w->prev;
	w->queued = false;
}

/*
 * A granted waiter whose own wait failed: its granter is between its unlock and the set of this
 * promise, with the node on its list, so the node must stay until then (a few stores away).
 * Shielded: a cancel or a deadline must not end this wait. A loop thread outside a task cannot
 * sleep, so it spins: its granter is another thread (it granted between the queueing and the
 * look, which a callback makes without letting its thread go).
 */
static void sync_await_set(concur_future *p)
{
	bool shielded = concur_shield_push() == 0;
	if (concur_result(p, -1) == -EDEADLK)
		concur__future_wait_final(p);
	if (shielded)
		concur_shield_pop();
}

/*
 * Called with *lock held and w's status not yet decided: queue w at the tail of q, drop the
 * lock, and sleep until granted or timeout_ns passes. Returns the status the granter wrote,
 * or -ETIMEDOUT / -EDEADLK / -ENOMEM if the waiter gave up while still queued.
 */
static int sync_park(pthread_mutex_t *lock, struct sync_waitq *q, struct sync_waiter *w,
                     int64_t timeout_ns)
{
	if (timeout_ns == 0) {
		pthread_mutex_unlock(lock);
		return -ETIMEDOUT;
	}
	w->wake = concur_promise_new(NULL);
	if (!w->wake) {
		pthread_mutex_unlock(lock);
		return -ENOMEM;
	}
	CONCUR__DQ_PUSH_BACK(q->head, q->tail, w);
	w->queued = true;
	pthread_mutex_unlock(lock);
	int64_t r = concur_result(w->wake, timeout_ns);
	if (r != 0) {
		pthread_mutex_lock(lock);
		bool gave_up = w->queued;
		if (gave_up)
			sync_wq_remove(q, w);
		pthread_mutex_unlock(lock);
		if (gave_up) {
			concur_release(w->wake);
			return (int)r;
		}
		sync_await_set(w->wake);
	}
	concur_release(w->wake);
	return w->status;
}

/*
 * Waking: the waker takes every waiter it grants off the queue in one hold of the lock (one for
 * a handoff or an item; all of them for an event's set, a semaphore's release by n, a channel's
 * close), onto a list of its own made of their nodes, and sets their promises once it let go.
 * From then on it touches neither the object (a woken waiter may free it at once: it waited for
 * this, and nobody else waits) nor a node whose promise it set (gone when its wait returns). A
 * granted node stays until its promise is set: the waker reads its link first, and a granted
 * waiter whose wait failed waits for the set (sync_await_set). Waking many used to take the lock
 * again for each batch of 16, their promises kept on the waker's stack: by then the rest could
 * have timed out and the object been freed. The list needs no room, so nothing bounds a grant;
 * its hold is a few stores a waiter, each of whom held the lock to queue.
 *
 * With the lock held: give status to up to max waiters at the head of q, in order, and move them
 * to the tail of woken. Returns how many.
 */
static uint64_t sync_grant(struct sync_waitq *q, int status, uint64_t max, struct sync_waitq *woken)
{
	uint64_t k = 0;
	for (struct sync_waiter *w; k < max && (w = q->head); k++) {
		sync_wq_remove(q, w);
		w->status = status;
		CONCUR__DQ_PUSH_BACK(woken->head, woken->tail, w);
	}
	return k;
}

/* With the lock dropped: set the promises of the waiters sync_grant() moved to woken. */
static void sync_wake(struct sync_waitq *woken)
{
	for (struct sync_waiter *w = woken->head, *next; w; w = next) {
		next = w->next; /* first: once its promise is set, the node may be gone */
		/* held: the waiter may release it while the set is still waking it */
		concur_future *p = concur_retain(w->wake);
		concur_promise_set(p, 0);
		concur_release(p);
	}
}

/* Every object starts with its lock: made and freed the same way. */
static void *sync_new(size_t size)
{
	pthread_mutex_t *lock = calloc(1, size);
	if (lock)
		pthread_mutex_init(lock, NULL);
	return lock;
}

static void sync_free(void *obj)
{
	if (!obj)
		return;
	pthread_mutex_destroy(obj);
	free(obj);
}

/* ---- mutex ---------------------------------------------------------------------------------- */

struct concur_mutex {
	pthread_mutex_t lock;
	bool locked; /* stays true across a handoff */
	struct sync_waitq q;
};

int concur_mutex_new(concur_mutex **out)
{
	if (!out)
		return -EINVAL;
	*out = sync_new(sizeof(**out));
	return *out ? 0 : -ENOMEM;
}

void concur_mutex_free(concur_mutex *m)
{
	sync_free(m);
}

int concur_mutex_lock(concur_mutex *m, int64_t timeout_ns)
{
	if (!m)
		return -EINVAL;
	pthread_mutex_lock(&m->lock);
	if (!m->locked) {
		m->locked = true;
		pthread_mutex_unlock(&m->lock);
		return 0;
	}
	struct sync_waiter w;
	return sync_park(&m->lock, &m->q, &w, timeout_ns);
}

int concur_mutex_trylock(concur_mutex *m)
{
	if (!m)
		return -EINVAL;
	pthread_mutex_lock(&m->lock);
	bool got = !m->locked; /* a free mutex has no queue: unlock hands it over otherwise */
	m->locked = true;
	pthread_mutex_unlock(&m->lock);
	return got ? 0 : -EBUSY;
}

int concur_mutex_unlock(concur_mutex *m)
{
	if (!m)
		return -EINVAL;
	pthread_mutex_lock(&m->lock);
	if (!m->locked) {
		pthread_mutex_unlock(&m->lock);
		return -EPERM;
	}
	struct sync_waitq woken = {0};
	m->locked = sync_grant(&m->q, 0, 1, &woken) > 0; /* FIFO handoff: the mutex stays locked */
	pthread_mutex_unlock(&m->lock);
	sync_wake(&woken);
	return 0;
}

size_t concur_mutex_waiters(const concur_mutex *m)
{
	if (!m)
		return 0;
	pthread_mutex_lock((pthread_mutex_t *)&m->lock);
	size_t n = 0;
	for (struct sync_waiter *w = m->q.head; w; w = w->next)
		n++;
	pthread_mutex_unlock((pthread_mutex_t *)&m->lock);
	return n;
}

/* ---- semaphore ------------------------------------------------------------------------------ */

struct concur_sem {
	pthread_mutex_t lock;
	int64_t value; /* > 0 only while nobody waits */
	struct sync_waitq q;
};

int concur_sem_new(concur_sem **out, int64_t value)
{
	if (!out || value < 0)
		return -EINVAL;
	concur_sem *s = sync_new(sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->value = value;
	*out = s;
	return 0;
}

void concur_sem_free(concur_sem *s)
{
	sync_free(s);
}

int concur_sem_acquire(concur_sem *s, int64_t timeout_ns)
{
	if (!s)
		return -EINVAL;
	pthread_mutex_lock(&s->lock);
	if (s->value > 0) {
		s->value--;
		pthread_mutex_unlock(&s->lock);
		return 0;
	}
	struct sync_waiter w;
	return sync_park(&s->lock, &s->q, &w, timeout_ns);
}

int concur_sem_release(concur_sem *s, int64_t n)
{
	if (!s || n < 1)
		return -EINVAL;
	struct sync_waitq woken = {0};
	int err = 0;
	pthread_mutex_lock(&s->lock);
	n -= (int64_t)sync_grant(&s->q, 0, (uint64_t)n, &woken);
	if (n > 0) { /* nobody waits now */
		if (n > INT64_MAX - s->value)
			err = -EOVERFLOW;
		else
			s->value += n;
	}
	pthread_mutex_unlock(&s->lock);
	sync_wake(&woken);
	return err;
}

int64_t concur_sem_value(const concur_sem *s)
{
	if (!s)
		return -EINVAL;
	pthread_mutex_lock((pthread_mutex_t *)&s->lock);
	int64_t v = s->value;
	pthread_mutex_unlock((pthread_mutex_t *)&s->lock);
	return v;
}

/* ---- event ---------------------------------------------------------------------------------- */

struct concur_event {
	pthread_mutex_t lock;
	_Atomic bool set;
	struct sync_waitq q;
};

int concur_event_new(concur_event **out)
{
	if (!out)
		return -EINVAL;
	*out = sync_new(sizeof(**out));
	return *out ? 0 : -ENOMEM;
}

void concur_event_free(concur_event *e)
{
	sync_free(e);
}

int concur_event_set(concur_event *e)
{
	if (!e)
		return -EINVAL;
	struct sync_waitq woken = {0};
	pthread_mutex_lock(&e->lock);
	atomic_store(&e->set, true);
	/* every waiter queued before this set, and only those: a clear and a new wait come after
	 * this hold */
	sync_grant(&e->q, 0, UINT64_MAX, &woken);
	pthread_mutex_unlock(&e->lock);
	sync_wake(&woken);
	return 0;
}

int concur_event_clear(concur_event *e)
{
	if (!e)
		return -EINVAL;
	atomic_store(&e->set, false);
	return 0;
}

/* Under the lock, as the wait's check: a set seen before the setter let go of the lock would
 * let the caller free the event under it. */
bool concur_event_is_set(const concur_event *e)
{
	if (!e)
		return false;
	pthread_mutex_lock((pthread_mutex_t *)&e->lock);
	bool set = atomic_load(&e->set);
	pthread_mutex_unlock((pthread_mutex_t *)&e->lock);
	return set;
}

int concur_event_wait(concur_event *e, int64_t timeout_ns)
{
	if (!e)
		return -EINVAL;
	pthread_mutex_lock(&e->lock);
	if (atomic_load(&e->set)) {
		pthread_mutex_unlock(&e->lock);
		return 0;
	}
	struct sync_waiter w;
	return sync_park(&e->lock, &e->q, &w, timeout_ns);
}

/* ---- channel -------------------------------------------------------------------------------- */

#define CHAN_MAX_CAPACITY (1u << 30)

struct concur_chan {
	pthread_mutex_t lock;
	bool closed;
	size_t cap, head, len;       /* items[head .. head+len) mod cap */
	struct sync_waitq senders;   /* only while the buffer is full */
	struct sync_waitq receivers; /* only while the buffer is empty */
	int64_t items[];
};

int concur_chan_new(concur_chan **out, size_t capacity)
{
	if (!out || capacity < 1 || capacity > CHAN_MAX_CAPACITY)
		return -EINVAL;
	concur_chan *c = sync_new(sizeof(*c) + capacity * sizeof(c->items[0]));
	if (!c)
		return -ENOMEM;
	c->cap = capacity;
	*out = c;
	return 0;
}

void concur_chan_free(concur_chan *c)
{
	sync_free(c);
}

int concur_chan_send(concur_chan *c, int64_t v, int64_t timeout_ns)
{
	if (!c)
		return -EINVAL;
	pthread_mutex_lock(&c->lock);
	if (c->closed) {
		pthread_mutex_unlock(&c->lock);
		return -EPIPE;
	}
	if (c->receivers.head) { /* the buffer is empty: hand the item over */
		struct sync_waitq woken = {0};
		c->receivers.head->value = v;
		sync_grant(&c->receivers, 0, 1, &woken);
		pthread_mutex_unlock(&c->lock);
		sync_wake(&woken);
		return 0;
	}
	if (c->len < c->cap) {
		c->items[(c->head + c->len++) % c->cap] = v;
		pthread_mutex_unlock(&c->lock);
		return 0;
	}
	struct sync_waiter w = {.value = v};
	return sync_park(&c->lock, &c->senders, &w, timeout_ns);
}

int concur_chan_recv(concur_chan *c, int64_t *v, int64_t timeout_ns)
{
	if (!c || !v)
		return -EINVAL;
	pthread_mutex_lock(&c->lock);
	if (c->len > 0) {
		*v = c->items[c->head];
		c->head = (c->head + 1) % c->cap;
		c->len--;
		struct sync_waitq woken = {0};
		if (c->senders.head) { /* the buffer was full: take the first sender's item */
			c->items[(c->head + c->len++) % c->cap] = c->senders.head->value;
			sync_grant(&c->senders, 0, 1, &woken);
		}
		pthread_mutex_unlock(&c->lock);
		sync_wake(&woken);
		return 0;
	}
	if (c->closed) {
		pthread_mutex_unlock(&c->lock);
		return -EPIPE;
	}
	struct sync_waiter w;
	int r = sync_park(&c->lock, &c->receivers, &w, timeout_ns);
	if (r == 0)
		*v = w.value;
	return r;
}

int concur_chan_close(concur_chan *c)
{
	if (!c)
		return -EINVAL;
	struct sync_waitq woken = {0};
	pthread_mutex_lock(&c->lock);
	int err = c->closed ? -EALREADY : 0;
	c->closed = true;
	sync_grant(&c->senders, -EPIPE, UINT64_MAX, &woken);
	sync_grant(&c->receivers, -EPIPE, UINT64_MAX, &woken);
	pthread_mutex_unlock(&c->lock);
	sync_wake(&woken);
	return err;
}

size_t concur_chan_len(const concur_chan *c)
{
	if (!c)
		return 0;
	pthread_mutex_lock((pthread_mutex_t *)&c->lock);
	size_t n = c->len;
	pthread_mutex_unlock((pthread_mutex_t *)&c->lock);
	return n;
}

/* SPDX-License-Identifier: MIT */
/*
 * Fiber-aware mutex, semaphore, event and bounded MPMC channel.
 *
 * Each object has a pthread mutex held only to look at its state and its FIFO waiter queues,
 * never while anyone sleeps. A waiter is a node on the waiter's own stack (a suspended fiber's
 * stack stays put) with its own promise: it queues itself, drops the lock and sleeps in
 * concur_result() on the promise, which blocks a foreign thread or suspends a task; whoever
 * hands it what it waits for (the mutex, a unit, an item, the news of a close) takes it off the
 * queue, writes its status under the lock and sets the promise. A waiter that times out takes
 * the lock and removes itself if it is still queued; if it is not, it was granted meanwhile and
 * takes the grant. So a wake-up is never lost and never doubled.
 */
#include "wait.h"

#include <stdlib.h>

struct sync_waiter {
	struct sync_waiter *prev, *next;
	concur_future *wake; /* the waiter's promise */
	bool queued;
	int status;    /* written by the granter, under the lock */
	int64_t value; /* a channel item, either way */
	uint64_t gen;  /* an event's: the sets it has seen (only a later set wakes it) */
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
	}
	concur_release(w->wake);
	return w->status;
}

/*
 * With the lock held: take the first waiter of q off the queue and give it status. Returns its
 * promise (retained) for sync_wake(), or NULL if nobody waits. The waiter may be gone as soon as
 * the lock is dropped: only the promise may be touched after that.
 */
static concur_future *sync_grant(struct sync_waitq *q, int status)
{
	struct sync_waiter *w = q->head;
	if (!w)
		return NULL;
	sync_wq_remove(q, w);
	w->status = status;
	return concur_retain(w->wake);
}

static void sync_wake(concur_future *p)
{
	if (p) {
		concur_promise_set(p, 0);
		concur_release(p);
	}
}

/*
 * Waking many (an event set, a semaphore released by n, a channel closed): waiters are granted
 * under the lock a batch at a time, their promises kept here, and set only once the lock is
 * dropped. A woken waiter may free the object at once (it waited for this, and nobody else
 * waits), so nothing touches it after the unlock but the next batch's lock, taken only while
 * others still wait; and setting a promise may suspend the setter (a small stack yields when the
 * ring pushes back), which must not happen with the lock held.
 */
#define SYNC_WAKE_BATCH 16

/* With the lock held: grant status to up to max waiters of q, their promises into out. */
static unsigned sync_grant_batch(struct sync_waitq *q, int status, unsigned max,
                                 concur_future **out)
{
	unsigned k = 0;
	concur_future *p;
	while (k < max && (p = sync_grant(q, status)))
		out[k++] = p;
	return k;
}

static void sync_wake_batch(concur_future **ps, unsigned k)
{
	for (unsigned i = 0; i < k; i++)
		sync_wake(ps[i]);
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
	concur_future *p = sync_grant(&m->q, 0); /* FIFO handoff: the mutex stays locked */
	m->locked = p != NULL;
	pthread_mutex_unlock(&m->lock);
	sync_wake(p);
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
	concur_future *ps[SYNC_WAKE_BATCH];
	pthread_mutex_lock(&s->lock);
	for (;;) {
		unsigned k = sync_grant_batch(
		    &s->q, 0, n < SYNC_WAKE_BATCH ? (unsigned)n : SYNC_WAKE_BATCH, ps);
		n -= k;
		bool more = n > 0 && s->q.head;
		int err = 0;
		if (!more && n > 0) {
			if (n > INT64_MAX - s->value)
				err = -EOVERFLOW;
			else
				s->value += n;
		}
		pthread_mutex_unlock(&s->lock);
		sync_wake_batch(ps, k);
		if (!more)
			return err;
		pthread_mutex_lock(&s->lock);
	}
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
	uint64_t sets; /* under the lock */
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
	concur_future *ps[SYNC_WAKE_BATCH];
	pthread_mutex_lock(&e->lock);
	atomic_store(&e->set, true);
	/* the waiters queued before this set: between its batches, a clear and a new wait may
	 * queue one this set is not to wake (the queue is FIFO: they are at its tail) */
	uint64_t set = ++e->sets;
	for (;;) {
		unsigned k = 0;
		while (k < SYNC_WAKE_BATCH && e->q.head && e->q.head->gen < set)
			ps[k++] = sync_grant(&e->q, 0);
		bool more = e->q.head && e->q.head->gen < set;
		pthread_mutex_unlock(&e->lock);
		sync_wake_batch(ps, k);
		if (!more)
			return 0;
		pthread_mutex_lock(&e->lock);
	}
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
	struct sync_waiter w = {.gen = e->sets};
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
		c->receivers.head->value = v;
		concur_future *p = sync_grant(&c->receivers, 0);
		pthread_mutex_unlock(&c->lock);
		sync_wake(p);
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
		concur_future *p = NULL;
		if (c->senders.head) { /* the buffer was full: take the first sender's item */
			c->items[(c->head + c->len++) % c->cap] = c->senders.head->value;
			p = sync_grant(&c->senders, 0);
		}
		pthread_mutex_unlock(&c->lock);
		sync_wake(p);
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
	concur_future *ps[SYNC_WAKE_BATCH];
	pthread_mutex_lock(&c->lock);
	int err = c->closed ? -EALREADY : 0;
	c->closed = true;
	for (;;) {
		unsigned k = sync_grant_batch(&c->senders, -EPIPE, SYNC_WAKE_BATCH, ps);
		k += sync_grant_batch(&c->receivers, -EPIPE, SYNC_WAKE_BATCH - k, ps + k);
		bool more = c->senders.head || c->receivers.head;
		pthread_mutex_unlock(&c->lock);
		sync_wake_batch(ps, k);
		if (!more)
			return err;
		pthread_mutex_lock(&c->lock);
	}
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

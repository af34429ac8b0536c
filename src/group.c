/* SPDX-License-Identifier: MIT */
/*
 * Task groups: each member is a task with a completion callback that takes it off the group's
 * list of live members; a waiter sleeps on the group's wake slot until that list is empty.
 * Members and the group's owner each hold a reference on the group, so a member finishing
 * after concur_group_free() is fine.
 */
#include "wait.h"

#include <stdlib.h>

struct member {
	struct member *prev, *next;
	concur_future *f; /* our reference, to cancel it */
	concur_group *g;
};

struct concur_group {
	_Atomic uint32_t refs;
	concur_exec *ex;
	unsigned flags;
	_Atomic bool cancelled;
	pthread_mutex_t lock; /* protects the list, first_err, wake */
	struct member head;   /* circular list of live members */
	size_t live;
	int64_t first_err;  /* of the first member that failed */
	bool any_cancelled; /* a member ended cancelled */
	concur_future *wake;
};

static void group_put(concur_group *g)
{
	if (atomic_fetch_sub(&g->refs, 1) != 1)
		return;
	concur_release(g->wake);
	pthread_mutex_destroy(&g->lock);
	free(g);
}

int concur_group_new(concur_group **out, concur_exec *ex, unsigned flags)
{
	if (!out || !concur__exec_valid(ex) || (flags & ~(unsigned)CONCUR_GROUP_CANCEL_ON_FAILURE))
		return -EINVAL;
	concur_group *g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	atomic_init(&g->refs, 1);
	g->ex = ex;
	g->flags = flags;
	pthread_mutex_init(&g->lock, NULL);
	g->head.prev = g->head.next = &g->head;
	*out = g;
	return 0;
}

int concur_group_cancel(concur_group *g)
{
	if (!g)
		return -EINVAL;
	atomic_store(&g->cancelled, true);
	/* Take the live members under the lock, cancel them outside it: a cancel runs their
	 * callbacks (member_done, which takes the lock) in this thread. */
	pthread_mutex_lock(&g->lock);
	size_t n = g->live, k = 0;
	concur_future **fs = malloc((n ? n : 1) * sizeof(*fs));
	for (struct member *m = g->head.next; fs && m != &g->head; m = m->next)
		fs[k++] = concur_retain(m->f);
	pthread_mutex_unlock(&g->lock);
	if (!fs)
		return -ENOMEM;
	int cancelled = 0;
	for (size_t i = 0; i < k; i++) {
		cancelled += concur_cancel(fs[i]) == 1;
		concur_release(fs[i]);
	}
	free(fs);
	return cancelled;
}

bool concur_group_cancelled(const concur_group *g)
{
	return g && atomic_load(&g->cancelled);
}

/* Take m off g's list (done: f's outcome counts for the group) and free it. */
static void member_remove(struct member *m, bool done)
{
	concur_group *g = m->g;
	bool failed = done && concur__failed(m->f);
	pthread_mutex_lock(&g->lock);
	m->prev->next = m->next;
	m->next->prev = m->prev;
	bool first_failure = failed && g->first_err == 0;
	if (first_failure)
		g->first_err = concur__future_value(m->f);
	g->any_cancelled = g->any_cancelled || (done && concur_cancelled(m->f));
	bool idle = --g->live == 0;
	pthread_mutex_unlock(&g->lock);
	if (first_failure && (g->flags & CONCUR_GROUP_CANCEL_ON_FAILURE))
		concur_group_cancel(g);
	if (idle)
		concur__wake_fire(&g->lock, &g->wake);
	concur_release(m->f);
	free(m);
	group_put(g);
}

static void member_done(concur_future *f, void *arg)
{
	member_remove(arg, true);
}

concur_future *concur_group_spawn(concur_group *g, concur_task_fn fn, void *arg)
{
	if (!g || !fn)
		return concur__failed_future(g ? g->ex : NULL, -EINVAL);
	if (atomic_load(&g->cancelled))
		return concur__failed_future(g->ex, -ECANCELED);
	struct member *m = calloc(1, sizeof(*m));
	if (!m)
		return concur__failed_future(g->ex, -ENOMEM);
	concur_future *f = concur_spawn(g->ex, fn, arg);
	m->f = concur_retain(f);
	m->g = g;
	atomic_fetch_add(&g->refs, 1);
	pthread_mutex_lock(&g->lock);
	m->next = &g->head;
	m->prev = g->head.prev;
	m->prev->next = m;
	g->head.prev = m;
	g->live++;
	pthread_mutex_unlock(&g->lock);
	if (concur_on_done(f, member_done, m) < 0)
		member_remove(m, false); /* -ENOMEM: the task runs, untracked */
	if (atomic_load(&g->cancelled))
		concur_cancel(f); /* the group was cancelled while we added it */
	return f;
}

int64_t concur_group_wait(concur_group *g, int64_t timeout_ns)
{
	if (!g)
		return -EINVAL;
	int64_t deadline = concur__deadline_after(timeout_ns);
	for (;;) {
		pthread_mutex_lock(&g->lock);
		if (g->live == 0) {
			int64_t err = g->first_err       ? g->first_err
			              : g->any_cancelled ? -ECANCELED
			                                 : 0;
			pthread_mutex_unlock(&g->lock);
			return err;
		}
		int64_t r = concur__wake_sleep(&g->lock, &g->wake, deadline);
		if (r < 0)
			return r;
	}
}

void concur_group_free(concur_group *g)
{
	if (g)
		group_put(g);
}

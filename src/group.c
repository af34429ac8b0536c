/* SPDX-License-Identifier: MIT */
/*
 * Task groups: each member is a task with a waiter node of the group's (embedded in the member
 * record) that takes it off the group's list of live members; a waiter sleeps on the group's
 * wake slot until that list is empty. Members and the group's owner each hold a reference on
 * the group, so a member finishing after concur_group_free() is fine.
 *
 * Order: a member's failure is recorded (first_err) in the node's record hook, before the
 * member's state is final, so a failure anyone could see first is the group's first failure.
 * It leaves the live list only once its state is final, so concur_group_wait never returns
 * before every member is done.
 */
#include "wait.h"

#include <stdlib.h>

struct member {
	struct concur__waiter w; /* on f's waiter list */
	struct member *prev, *next;
	concur_future *f; /* our reference, to cancel it */
	concur_group *g;
	bool first_failure; /* f's failure was the group's first */
	bool cancel_taken;  /* taken by a cancel that had no memory for its list */
};

struct concur_group {
	_Atomic uint32_t refs;
	concur_exec *ex; /* weak: a group may outlive it (group_ex) */
	uint64_t ex_id;
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
	g->ex_id = ex->id;
	g->flags = flags;
	pthread_mutex_init(&g->lock, NULL);
	g->head.prev = g->head.next = &g->head;
	*out = g;
	return 0;
}

/* concur_group_cancel with no memory for its list: one member at a time, each marked as taken
 * (a cancel may end a member, which leaves the list, so no place in it is kept across). Members
 * only leave now (spawns are refused), so this ends; it walks the list once per member. */
static int group_cancel_each(concur_group *g)
{
	int cancelled = 0;
	for (;;) {
		concur_future *f = NULL;
		pthread_mutex_lock(&g->lock);
		for (struct member *m = g->head.next; m != &g->head; m = m->next) {
			if (!m->cancel_taken) {
				m->cancel_taken = true;
				f = concur_retain(m->f);
				break;
			}
		}
		pthread_mutex_unlock(&g->lock);
		if (!f)
			return cancelled;
		int r = concur_cancel(f);
		cancelled += r == 1 || r == -EINPROGRESS;
		concur_release(f);
	}
}

int concur_group_cancel(concur_group *g)
{
	if (!g)
		return -EINVAL;
	atomic_store(&g->cancelled, true);
	/* Take the live members under the lock, cancel them outside it: a cancel runs their
	 * callbacks (group_member_done, which takes the lock) in this thread. */
	pthread_mutex_lock(&g->lock);
	size_t n = g->live, k = 0;
	concur_future **fs = malloc((n ? n : 1) * sizeof(*fs));
	for (struct member *m = g->head.next; fs && m != &g->head; m = m->next)
		fs[k++] = concur_retain(m->f);
	pthread_mutex_unlock(&g->lock);
	if (!fs) /* a failure's cancel (CANCEL_ON_FAILURE) has nobody to tell: it must not fail */
		return group_cancel_each(g);
	int cancelled = 0;
	for (size_t i = 0; i < k; i++) {
		int r =
		    concur_cancel(fs[i]); /* 1: it never runs; -EINPROGRESS: it is told to stop */
		cancelled += r == 1 || r == -EINPROGRESS;
		concur_release(fs[i]);
	}
	free(fs);
	return cancelled;
}

bool concur_group_cancelled(const concur_group *g)
{
	return g && atomic_load(&g->cancelled);
}

/* The member concur_group_spawn of this thread is queueing: if the queueing refuses it (a
 * shutdown), it ends in this thread, inside the call. */
static __thread const struct member *group_queueing;

/* Before f's state is final: note its failure or cancellation in completion order. A spawn a
 * shutdown refused is not a failure of the group: its caller has the failed future, as for a
 * spawn refused for memory or after a cancel (else, with CANCEL_ON_FAILURE, a graceful stop
 * that refuses a member's spawn of a sibling cancelled the members it lets finish). */
static void group_member_record(struct concur__waiter *w, concur_future *f, int64_t res,
                                uint32_t final_state)
{
	struct member *m = (struct member *)w;
	concur_group *g = m->g;
	bool refused = group_queueing == m && res == -ESHUTDOWN;
	pthread_mutex_lock(&g->lock);
	m->first_failure =
	    !refused && final_state == CONCUR__FINISHED && res < 0 && g->first_err == 0;
	if (m->first_failure) {
		g->first_err = res;
		/* refused from the moment the failure can be seen (the member done, a wait
		 * returning it), not from its done hook's cancel, a moment later */
		if (g->flags & CONCUR_GROUP_CANCEL_ON_FAILURE)
			atomic_store(&g->cancelled, true);
	}
	g->any_cancelled = g->any_cancelled || final_state == CONCUR__CANCELLED;
	pthread_mutex_unlock(&g->lock);
}

/* f is done: take m off g's list and free it. */
static void group_member_done(struct concur__waiter *w, concur_future *f)
{
	struct member *m = (struct member *)w;
	concur_group *g = m->g;
	pthread_mutex_lock(&g->lock);
	m->prev->next = m->next;
	m->next->prev = m->prev;
	bool idle = --g->live == 0;
	pthread_mutex_unlock(&g->lock);
	if (m->first_failure && (g->flags & CONCUR_GROUP_CANCEL_ON_FAILURE))
		concur_group_cancel(g);
	if (idle)
		concur__wake_fire(&g->lock, &g->wake);
	concur_release(m->f);
	free(m);
	group_put(g);
}

static const struct concur__waiter_ops member_ops = {.record = group_member_record,
                                                     .done = group_member_done};

/* The group's executor, or NULL once it was freed (never dereference a pointer that may be). */
static concur_exec *group_ex(const concur_group *g)
{
	return g && concur__exec_alive(g->ex, g->ex_id) ? g->ex : NULL;
}

concur_future *concur_group_spawn(concur_group *g, concur_task_fn fn, void *arg)
{
	if (!g || !fn)
		return concur__failed_future(group_ex(g), -EINVAL);
	if (!group_ex(g)) /* freed: it takes no task, as after a shutdown */
		return concur__failed_future(NULL, -ESHUTDOWN);
	if (atomic_load(&g->cancelled))
		return concur__failed_future(g->ex, -ECANCELED);
	struct member *m = calloc(1, sizeof(*m));
	/* made, registered on, then queued: a member that ends at once is recorded in the order
	 * it ended (queued first, it could end before its node was on it, and be recorded after
	 * members that ended later: the group's first failure would not be the first) */
	struct concur__task *t = m ? concur__task_new(g->ex, fn, arg) : NULL;
	if (!t) {
		free(m);
		return concur__failed_future(g->ex, -ENOMEM);
	}
	concur_future *f = &t->f;
	m->w.kind = CONCUR__WAIT_CALL;
	m->w.ops = &member_ops;
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
	/* Unqueued, it is not done -- unless a cancel of the group found it on the list since the
	 * lock was let go (it ends CANCELLED at once): then it is recorded now. */
	if (!concur__waiter_push(f, &m->w)) {
		group_member_record(&m->w, f, concur__future_value(f), concur__state(f));
		group_member_done(&m->w, f);
	}
	const struct member *outer = group_queueing; /* a spawn from the refusal's callbacks */
	group_queueing = m;
	concur__task_enqueue(t); /* after a shutdown it ends -ESHUTDOWN here (not recorded: see
	                          * group_member_record); cancelled, its loop drops it unrun */
	group_queueing = outer;
	if (atomic_load(&g->cancelled))
		concur_cancel(f); /* the group was cancelled while we added it */
	return f;
}

/*
 * The waiting task was cancelled: its members are cancelled too, and waited for (shielded: the
 * task's own cancel does not break that wait, nor does a scope's deadline; the caller's timeout
 * still does), so that -ECANCELED, like
 * every other result but -ETIMEDOUT, means no member runs any more -- what a task group in
 * asyncio or a Trio nursery does. It returned at once, the members running on.
 */
static int64_t group_wait_cancelled(concur_group *g, int64_t deadline)
{
	int64_t r = 0;
	concur_group_cancel(g);
	/* refused at the nesting limit, the task is shielded all the same: no pop then, or it
	 * would take one of the caller's */
	bool shielded = concur_shield_push() == 0;
	for (;;) {
		pthread_mutex_lock(&g->lock);
		if (g->live == 0) {
			pthread_mutex_unlock(&g->lock);
			break;
		}
		r = concur__wake_sleep(&g->lock, &g->wake, deadline);
		if (r < 0)
			break; /* the caller's timeout (members may run on), or -ENOMEM */
	}
	if (shielded)
		concur_shield_pop();
	return r < 0 ? r : -ECANCELED;
}

static bool group_member_of(const struct concur__waiter *w, const void *g)
{
	return ((const struct member *)w)->g == g;
}

/* The task running here is a live member of g: waiting for g, it would wait for itself. Its
 * member node stays on its own future's list until it ends. */
static bool group_waits_for_itself(concur_group *g)
{
	struct concur__task *t = concur__tl_task;
	return t && concur__waiter_find(&t->f, &member_ops, group_member_of, g);
}

int64_t concur_group_wait(concur_group *g, int64_t timeout_ns)
{
	if (!g)
		return -EINVAL;
	if (group_waits_for_itself(g))
		return -EDEADLK;
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
		if (r == -ECANCELED && concur_in_task())
			return group_wait_cancelled(g, deadline);
		if (r < 0)
			return r;
	}
}

void concur_group_free(concur_group *g)
{
	if (g)
		group_put(g);
}

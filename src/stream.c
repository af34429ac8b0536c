/* SPDX-License-Identifier: MIT */
/*
 * Streams: one armed operation, many completions, consumed one item at a time (accept, recv
 * with a provided-buffer ring per loop). Apart from io.c, whose operations complete once.
 *
 * A stream lives on one loop and is driven by its CQEs there. Items the kernel produced and
 * nobody consumed yet wait in a queue (a recv's hold buffers of the loop's ring; an accept
 * stream stops at STREAM_ACCEPT_AHEAD); a task takes them with concur_stream_next() (it
 * suspends until one is there) or with a future (concur_stream_next_future), so that "the next
 * connection or stop" is one concur_wait. An item is taken out of the queue only at the moment
 * it is handed to a consumer, so a future cancelled or released before it completes never
 * loses one.
 *
 * The stream re-arms itself whenever the kernel stops it on its own and the reason passes:
 *  - an accept that hit a shortage (EMFILE, ENFILE, ENOMEM, ENOBUFS) reports it once to the
 *    consumer and re-arms after a back-off (a kernel timeout on the loop, doubling from
 *    STREAM_BACKOFF_MIN_MS to STREAM_BACKOFF_MAX_MS, reset by the next success), as nginx and
 *    libuv do: a server at its fd limit must not stop accepting for good; one that found its
 *    connection aborted (ECONNABORTED) re-arms at once and reports nothing;
 *  - a recv whose buffer ring ran dry (ENOBUFS) waits in the ring's starved queue, and as buffers
 *    are given back, that many of the queue's oldest re-arm, each with a buffer kept for it (a
 *    claim). One with bytes waiting takes its buffer in the submit that issues it; one without
 *    (a recv armed while the ring was empty fails at once, bytes or not) waits for bytes with no
 *    buffer, and a NOP submitted after it ends its claim, so the next in the queue re-arms.
 *    Re-arming the whole queue for each buffer had all but one fail again: with thousands of
 *    connections starved, each give-back cost thousands of SQEs and CQEs;
 *  - a CQ overflow (a multishot CQE without F_MORE) re-arms at once.
 * An on-demand recv stream arms a single (not multishot) recv only while a consumer waits and
 * nothing is queued: an idle connection, or one whose task is busy elsewhere (blocked in a send
 * to a client that never reads), holds no buffer of the ring, so no client can dry it for the
 * others.
 *
 * Cancel works from any thread: off the stream's loop it posts a node there (one per stream,
 * cancel being idempotent). The memory goes when the owner closed the stream, the kernel
 * returned everything (the multishot's last CQE, the back-off timer's) and a posted cancel ran.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "internal.h"

#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

/*
 * Each loop thread gets, on first use, a provided-buffer ring shared by its recv streams. It
 * lives as long as the thread (freed by a thread-exit destructor, after the loop has closed its
 * ring). Buffers are handed out by the kernel (a CQE with F_BUFFER), lent to the consumer, and
 * put back into the ring by concur_stream_give() on the same thread.
 */
#define STREAM_BGID     0x4355 /* our buffer group id */
#define STREAM_NBUFS    256u
#define STREAM_BUF_SIZE 4096u

/* An on-demand stream's item copied out of the ring (see stream_keep_unwanted): a recv item
 * without IORING_CQE_F_BUFFER (every other one has it: the recv selects a buffer), and the chunk
 * lent for it carries this buffer index. */
#define STREAM_SPILL_IDX 0xffffu
/* A lent chunk's bid: the buffer's index in the low 16 bits (STREAM_SPILL_IDX: the stream's own),
 * and above them the buffer's generation, which every give-back bumps: a chunk given back twice
 * is refused even after its buffer was lent again meanwhile. */
#define STREAM_BID(idx, gen) ((uint32_t)(idx) | (uint32_t)(gen) << 16)

/* Aborted connections skipped in a row before the accept is treated as failing (reported, backed
 * off): a peer's abort is routine, a socket that aborts every accept is not. */
#define STREAM_ABORTS_MAX 16u
/* An accept stream stops its multishot once this many connections wait unconsumed, and re-arms
 * when no more than half of that wait. One wake-up of the kernel's multishot takes all the
 * listen backlog holds (before a stop can land, and again at a re-arm), so a stalled consumer
 * pulls at most this many and one backlog's worth of fds out of it, not every connection that
 * comes (to EMFILE, failing everything else that opens one). The rest wait in the backlog. */
#define STREAM_ACCEPT_AHEAD 64u

#define STREAM_BACKOFF_MIN_MS 4u
#define STREAM_BACKOFF_MAX_MS 512u

struct stream_bufs {
	struct io_uring_buf_ring *br;
	char *mem;
	size_t ring_bytes;
	unsigned free;                 /* buffers in the ring */
	unsigned claimed;              /* of those, one for each stream re-armed off the queue */
	struct concur_stream *starved; /* recv streams stopped by ENOBUFS, oldest first */
	struct concur_stream *starved_tail;
	struct concur_stream *claimers; /* the streams with a claim, oldest first */
	struct concur_stream *claimers_tail;
	struct concur__op sweep_op; /* the NOPs, one after each claimed recv */
	uint64_t sweeps_prepped, sweeps_done;
	uint64_t out[STREAM_NBUFS / 64]; /* taken by the kernel, not back in the ring */
	uint16_t gen[STREAM_NBUFS];      /* bumped each time a buffer goes back (STREAM_BID) */
};

struct stream_item {
	int32_t res;
	uint32_t flags;
};

/* concur_stream_next_future's future: filled and completed when an item is handed over. */
struct stream_next {
	struct concur_future f; /* first */
	struct concur_chunk *chunk;
};

enum { STREAM_CANCEL_NONE, STREAM_CANCEL_POSTED, STREAM_CANCEL_RAN };
enum { STREAM_SPILL_FREE, STREAM_SPILL_QUEUED, STREAM_SPILL_LENT };

struct concur_stream {
	struct concur__op op;       /* the armed operation's CQEs */
	struct concur__op timer_op; /* the back-off timer's */
	struct concur__node cancel_node;
	_Atomic int cancel_post; /* STREAM_CANCEL_*: a cancel posted from another thread */
	struct concur__loop *loop;
	concur_exec *ex;
	struct stream_bufs *bufs; /* recv streams */
	struct concur__task *waiter;
	struct stream_next *fwaiter; /* a pending next-future (the stream holds a reference) */
	struct concur_stream *next_starved, *prev_starved;
	struct concur_stream *next_claimer, *prev_claimer;
	int fd, flags;
	bool recv;
	bool on_demand;       /* recv: one single-shot recv at a time, only while someone waits */
	bool armed;           /* an operation is in the kernel */
	bool stop_sent;       /* an ASYNC_CANCEL for the armed operation is on its way */
	bool timer_armed;     /* the back-off timer is in the kernel */
	bool starved;         /* on bufs->starved, waiting for buffers */
	bool claims;          /* re-armed off the starved queue: on bufs->claimers (see the top) */
	bool cancel_req;      /* concur_stream_cancel */
	bool ended;           /* the end is known: end_res */
	bool end_reported;    /* a consumer was told */
	bool closed;          /* concur_stream_close: free when the kernel is done */
	bool in_next;         /* a task is inside concur_stream_next (woken or not) */
	uint32_t armed_at;    /* loop->sq_emptied when it was armed: unchanged, its SQE is queued */
	uint64_t claim_sweep; /* the NOP after its claimed recv (bufs->sweeps_prepped) */
	int32_t end_res;
	int32_t pending_err;   /* a transient accept error not reported yet */
	uint32_t backoff_ms;   /* the last back-off; 0 after a success */
	unsigned aborts;       /* ECONNABORTED in a row, none accepted between */
	char *spill;           /* on-demand: a buffer's worth for bytes nobody waited for */
	int spill_state;       /* STREAM_SPILL_* */
	uint16_t spill_gen;    /* as a ring buffer's (STREAM_BID) */
	struct stream_item *q; /* items not consumed yet, a ring of qcap */
	unsigned qhead, qlen, qcap;
	struct __kernel_timespec ts; /* the back-off timer's */
};

/* ---- the buffer ring ---------------------------------------------------------------------- */

static CONCUR__TLS_HOT struct stream_bufs *stream_tl_bufs;
static pthread_key_t stream_bufs_key;
static pthread_once_t stream_bufs_once = PTHREAD_ONCE_INIT;

static void stream_bufs_free(void *p)
{
	struct stream_bufs *b = p;
	concur__unmap(b->br, b->ring_bytes); /* refused (a split mapping): its pages go back */
	free(b->mem);
	free(b);
}

static void stream_bufs_key_init(void)
{
	pthread_key_create(&stream_bufs_key, stream_bufs_free);
}

static void stream_bufs_put(struct stream_bufs *b, unsigned bid)
{
	b->out[bid / 64] &= ~((uint64_t)1 << (bid % 64));
	/* never 0: the bid of a chunk that holds no buffer (an error, the end) is 0 */
	if (!++b->gen[bid])
		b->gen[bid] = 1;
	io_uring_buf_ring_add(b->br, b->mem + (size_t)bid * STREAM_BUF_SIZE, STREAM_BUF_SIZE,
	                      (unsigned short)bid, io_uring_buf_ring_mask(STREAM_NBUFS), 0);
	io_uring_buf_ring_advance(b->br, 1);
	b->free++;
}

/* This loop thread's buffer ring, registered on first use. */
static int stream_bufs_get(struct concur__loop *loop, struct stream_bufs **out)
{
	struct stream_bufs *b = stream_tl_bufs;
	struct io_uring_buf_reg reg;
	int err;

	if (b) {
		*out = b;
		return 0;
	}
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	b->ring_bytes = STREAM_NBUFS * sizeof(struct io_uring_buf);
	b->br =
	    mmap(NULL, b->ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	b->mem = aligned_alloc(4096, (size_t)STREAM_NBUFS * STREAM_BUF_SIZE);
	if (b->br == MAP_FAILED || !b->mem) {
		if (b->br != MAP_FAILED)
			munmap(b->br, b->ring_bytes);
		free(b->mem);
		free(b);
		return -ENOMEM;
	}
	memset(&reg, 0, sizeof(reg));
	reg.ring_addr = (uint64_t)(uintptr_t)b->br;
	reg.ring_entries = STREAM_NBUFS;
	reg.bgid = STREAM_BGID;
	err = io_uring_register_buf_ring(&loop->ring, &reg, 0);
	if (err < 0) {
		stream_bufs_free(b);
		return err;
	}
	io_uring_buf_ring_init(b->br);
	for (unsigned i = 0; i < STREAM_NBUFS; i++)
		stream_bufs_put(b, i);
	pthread_once(&stream_bufs_once, stream_bufs_key_init);
	pthread_setspecific(stream_bufs_key, b);
	stream_tl_bufs = b;
	*out = b;
	return 0;
}

/* ---- arming, the queue, the end ------------------------------------------------------------- */

static void stream_arm(struct concur_stream *s)
{
	struct io_uring_sqe *sqe = concur__sqe(s->loop);

	if (s->recv) {
		if (s->on_demand)
			io_uring_prep_recv(sqe, s->fd, NULL, 0, s->flags);
		else
			io_uring_prep_recv_multishot(sqe, s->fd, NULL, 0, s->flags);
		sqe->flags |= IOSQE_BUFFER_SELECT;
		sqe->buf_group = STREAM_BGID;
	} else {
		io_uring_prep_multishot_accept(sqe, s->fd, NULL, NULL, s->flags);
	}
	concur__sqe_set_op(s->loop, sqe, &s->op);
	s->armed = true;
	s->armed_at = s->loop->sq_emptied;
}

/* Arm the stream if nothing keeps it from it (the one place that decides). */
static void stream_rearm(struct concur_stream *s)
{
	if (s->armed || s->timer_armed || s->starved || s->ended || s->closed || s->cancel_req)
		return;
	if (s->on_demand && (s->qlen || (!s->waiter && !s->fwaiter)))
		return;
	if (!s->recv && s->qlen > STREAM_ACCEPT_AHEAD / 2)
		return;
	stream_arm(s);
}

/* Ask the kernel to cancel the op behind user_data (its own last CQE comes later). */
static void stream_cancel_op(struct concur_stream *s, struct concur__op *op)
{
	struct io_uring_sqe *sqe = concur__sqe(s->loop);

	io_uring_prep_cancel64(sqe, concur__op_ud(op), 0);
	concur__sqe_set_op(s->loop, sqe, &concur__ignore_op);
}

/* Stop whatever the stream has in the kernel. */
static void stream_stop(struct concur_stream *s)
{
	if (s->armed && !s->stop_sent) {
		s->stop_sent = true;
		stream_cancel_op(s, &s->op);
	}
	if (s->timer_armed)
		stream_cancel_op(s, &s->timer_op);
}

/* Into the starved queue: at its back, or at its front for one that lost the buffer it was
 * re-armed for (to a recv armed meanwhile, not from the queue). */
static void stream_starve(struct concur_stream *s, bool front)
{
	struct stream_bufs *b = s->bufs;

	s->starved = true;
	if (front) {
		s->prev_starved = NULL;
		s->next_starved = b->starved;
		*(b->starved ? &b->starved->prev_starved : &b->starved_tail) = s;
		b->starved = s;
	} else {
		s->next_starved = NULL;
		s->prev_starved = b->starved_tail;
		*(b->starved_tail ? &b->starved_tail->next_starved : &b->starved) = s;
		b->starved_tail = s;
	}
}

static void stream_unstarve(struct concur_stream *s)
{
	struct stream_bufs *b = s->bufs;

	*(s->prev_starved ? &s->prev_starved->next_starved : &b->starved) = s->next_starved;
	*(s->next_starved ? &s->next_starved->prev_starved : &b->starved_tail) = s->prev_starved;
	s->starved = false;
}

static void stream_maybe_free(struct concur_stream *s)
{
	concur_exec *ex = s->ex;

	if (!s->closed || s->armed || s->timer_armed ||
	    atomic_load_explicit(&s->cancel_post, memory_order_acquire) == STREAM_CANCEL_POSTED)
		return;
	free(s->spill);
	free(s->q);
	free(s);
	concur__work_end(ex);
}

static void stream_bufs_back(struct stream_bufs *b);

static void stream_claim_end(struct concur_stream *s)
{
	struct stream_bufs *b = s->bufs;

	*(s->prev_claimer ? &s->prev_claimer->next_claimer : &b->claimers) = s->next_claimer;
	*(s->next_claimer ? &s->next_claimer->prev_claimer : &b->claimers_tail) = s->prev_claimer;
	s->claims = false;
	b->claimed--;
}

/* A NOP submitted after a claimed recv: that recv, and every one claimed before it, has had its
 * CQE by now if it had bytes (a NOP completes as it is issued, in SQ order); those still
 * claiming wait for bytes, holding no buffer: their claims end. */
static void stream_sweep_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                             uint32_t flags)
{
	struct stream_bufs *b = concur__container_of(op, struct stream_bufs, sweep_op);

	b->sweeps_done++; /* NOPs complete in the order they were queued */
	while (b->claimers && b->claimers->claim_sweep <= b->sweeps_done)
		stream_claim_end(b->claimers);
	stream_bufs_back(b);
}

/* Re-arm a recv for one of the buffers no other is re-armed for, and keep that buffer for it
 * until its CQE, or until the NOP that follows it says it had no bytes waiting. */
static void stream_rearm_claiming(struct concur_stream *s)
{
	struct stream_bufs *b = s->bufs;

	stream_rearm(s);
	if (!s->armed || s->claims)
		return;
	s->claims = true;
	b->claimed++;
	s->claim_sweep = ++b->sweeps_prepped; /* the NOP below (numbered before concur__sqe) */
	s->next_claimer = NULL;
	s->prev_claimer = b->claimers_tail;
	*(b->claimers_tail ? &b->claimers_tail->next_claimer : &b->claimers) = s;
	b->claimers_tail = s;
	/* a NOP after this recv: one queued before it (earlier in this same submit) would end
	 * this claim before the recv was even issued */
	struct io_uring_sqe *sqe = concur__sqe(s->loop);
	io_uring_prep_nop(sqe);
	b->sweep_op.cqe = stream_sweep_cqe;
	concur__sqe_set_op(s->loop, sqe, &b->sweep_op);
}

/* An item nobody will consume: close the fd or give the buffer back. */
static void stream_discard(struct concur_stream *s, struct stream_item it)
{
	if (it.flags & IORING_CQE_F_BUFFER) {
		stream_bufs_put(s->bufs, it.flags >> IORING_CQE_BUFFER_SHIFT);
		stream_bufs_back(s->bufs);
	} else if (s->recv) { /* (an item of the stream's own buffer) */
		s->spill_state = STREAM_SPILL_FREE;
	} else if (!s->recv && it.res >= 0) {
		close(it.res);
	}
}

static void stream_end(struct concur_stream *s, int32_t res)
{
	if (!s->ended) {
		s->ended = true;
		s->end_res = res;
	}
	stream_stop(s);
}

static bool stream_push(struct concur_stream *s, int32_t res, uint32_t flags)
{
	if (s->qlen == s->qcap) {
		unsigned ncap = s->qcap ? s->qcap * 2 : 4;
		struct stream_item *nq = malloc(ncap * sizeof(*nq));
		if (!nq)
			return false;
		for (unsigned i = 0; i < s->qlen; i++)
			nq[i] = s->q[(s->qhead + i) % s->qcap];
		free(s->q);
		s->q = nq;
		s->qcap = ncap;
		s->qhead = 0;
	}
	s->q[(s->qhead + s->qlen++) % s->qcap] = (struct stream_item){res, flags};
	return true;
}

/* True if a consumer would get something now: an item, an error to report, or the end. */
static bool stream_ready(const struct concur_stream *s)
{
	return s->qlen || s->pending_err || s->ended;
}

/*
 * Hand the next thing to a consumer (stream_ready() is true): queued items first (they came
 * before a transient error that stopped the stream), then the error, then the end, once; after
 * that -ENODATA.
 */
static int64_t stream_take(struct concur_stream *s, struct concur_chunk *chunk)
{
	struct stream_item it;

	if (chunk) {
		chunk->data = NULL;
		chunk->len = 0;
		chunk->bid = 0;
	}
	if (!s->qlen) {
		int32_t err = s->pending_err;
		if (err) {
			s->pending_err = 0;
			return err;
		}
		if (s->end_reported)
			return -ENODATA;
		s->end_reported = true;
		return s->end_res;
	}
	it = s->q[s->qhead];
	s->qhead = (s->qhead + 1) % s->qcap;
	s->qlen--;
	if (s->recv && !(it.flags & IORING_CQE_F_BUFFER)) { /* the stream's own buffer */
		s->spill_state = STREAM_SPILL_LENT;
		chunk->bid = STREAM_BID(STREAM_SPILL_IDX, s->spill_gen);
		chunk->data = s->spill;
		chunk->len = (size_t)it.res;
	} else if (s->recv) {
		unsigned bid = it.flags >> IORING_CQE_BUFFER_SHIFT;
		chunk->bid = STREAM_BID(bid, s->bufs->gen[bid]);
		chunk->data = s->bufs->mem + (size_t)bid * STREAM_BUF_SIZE;
		chunk->len = (size_t)it.res;
	}
	return it.res;
}

/* ---- next as a future --------------------------------------------------------------------- */

static void stream_next_destroy(concur_future *f)
{
	free(f);
}

static const struct concur__future_class stream_next_class = {
    .name = "stream_next",
    .cancel_running = NULL, /* claimed and completed in one go on the loop: never seen RUNNING */
    .destroy = stream_next_destroy,
};

/*
 * Hand an item to the pending future, unless its consumer is gone: cancelled, or released by
 * everyone but the stream. Then the item stays queued for the next consumer.
 */
static void stream_feed_future(struct concur_stream *s)
{
	struct stream_next *n = s->fwaiter;

	if (!n)
		return;
	s->fwaiter = NULL;
	if (atomic_load_explicit(&n->f.refs, memory_order_acquire) == 1 ||
	    !concur__future_claim(&n->f)) {
		concur_release(&n->f);
		return;
	}
	int64_t res = stream_take(s, n->chunk);
	stream_rearm(s);
	/* last: the completion runs the future's callbacks, and one may close (free) the stream */
	concur__complete(&n->f, res, CONCUR__FINISHED);
	concur_release(&n->f);
}

/* Something arrived: wake the consumer. Last thing the caller does with s: a next-future's
 * callback may close the stream. */
static void stream_wake(struct concur_stream *s)
{
	struct concur__task *t = s->waiter;

	if (t) {
		s->waiter = NULL;
		concur__resume(t);
	} else if (s->fwaiter && stream_ready(s)) {
		stream_feed_future(s); /* s may be gone after it */
	}
}

/* An on-demand recv armed for a consumer that left: stop it, so that it takes no buffer of the
 * ring for nobody (the bytes wait in the socket). Its -ECANCELED is ours, and ends nothing. */
static void stream_disarm_unwanted(struct concur_stream *s)
{
	if (s->on_demand && s->armed && !s->stop_sent && !s->waiter && !s->fwaiter) {
		s->stop_sent = true;
		stream_cancel_op(s, &s->op);
	}
}

/* A cancel or a deadline breaks a task's wait in next(): nothing is in flight for it alone
 * (the stream's multishot goes on, its items stay queued for a later next; an on-demand recv
 * is stopped). */
static bool stream_interrupt(struct concur__loop *loop, struct concur__task *t, void *arg)
{
	struct concur_stream *s = arg;

	if (s->waiter != t)
		return false; /* woken already: the item is there */
	s->waiter = NULL;
	stream_disarm_unwanted(s);
	concur__resume(t); /* the fibers' funnel (on t's loop: its ready queue) */
	return true;
}

/* A next-future cancelled or released while pending is forgotten here. */
static void stream_drop_stale_future(struct concur_stream *s)
{
	struct stream_next *n = s->fwaiter;

	if (n && (concur__is_done(&n->f) ||
	          atomic_load_explicit(&n->f.refs, memory_order_acquire) == 1)) {
		s->fwaiter = NULL;
		concur_release(&n->f);
	}
}

/* ---- completions -------------------------------------------------------------------------- */

static bool stream_accept_transient(int32_t res)
{
	return res == -EMFILE || res == -ENFILE || res == -ENOMEM || res == -ENOBUFS ||
	       res == -ECONNABORTED;
}

/* Re-arm the accept after a back-off (a kernel timeout on the loop). */
static void stream_backoff(struct concur_stream *s)
{
	struct io_uring_sqe *sqe;

	if (s->timer_armed || s->ended || s->cancel_req)
		return;
	s->backoff_ms = s->backoff_ms ? s->backoff_ms * 2 : STREAM_BACKOFF_MIN_MS;
	if (s->backoff_ms > STREAM_BACKOFF_MAX_MS)
		s->backoff_ms = STREAM_BACKOFF_MAX_MS;
	CONCUR__NS_TO_TS(&s->ts, (int64_t)s->backoff_ms * 1000000);
	sqe = concur__sqe(s->loop);
	io_uring_prep_timeout(sqe, &s->ts, 0, 0);
	concur__sqe_set_op(s->loop, sqe, &s->timer_op);
	s->timer_armed = true;
}

static void stream_timer_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                             uint32_t flags)
{
	struct concur_stream *s = concur__container_of(op, struct concur_stream, timer_op);

	s->timer_armed = false;
	if (s->closed) {
		stream_maybe_free(s);
		return;
	}
	stream_rearm(s);
}

/* An accept's transient error: report it, and go on after a back-off. */
static void stream_transient(struct concur_stream *s, int32_t err, bool more)
{
	s->pending_err = err;
	/* still armed (not seen from the kernel, but harmless): stop the op first -- the op only,
	 * a back-off an earlier failure of the same reap armed goes on (its cancel re-armed the
	 * accept at once: no back-off at all) */
	if (more && s->armed && !s->stop_sent) {
		s->stop_sent = true;
		stream_cancel_op(s, &s->op);
	}
	stream_backoff(s);
}

/*
 * An on-demand recv's bytes came with nobody left to consume them (a next-future cancelled or
 * released, a next() broken by a deadline or a cancel, before they came): they go from the ring's
 * buffer to the stream's own, and the buffer back to the ring at once. Otherwise each such
 * connection would hold a buffer of the loop's ring until its task came back, and a few hundred
 * of them would dry it for every stream of the loop. Returns the item's flags; with no memory
 * (or the stream's buffer lent still), the item keeps its ring buffer, as a multishot's does.
 */
static uint32_t stream_keep_unwanted(struct concur_stream *s, int32_t res, uint32_t flags)
{
	stream_drop_stale_future(s);
	if (s->waiter || s->fwaiter || s->spill_state != STREAM_SPILL_FREE)
		return flags;
	if (!s->spill && !(s->spill = malloc(STREAM_BUF_SIZE)))
		return flags;
	unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
	memcpy(s->spill, s->bufs->mem + (size_t)bid * STREAM_BUF_SIZE, (size_t)res);
	stream_bufs_put(s->bufs, bid);
	stream_bufs_back(s->bufs);
	s->spill_state = STREAM_SPILL_QUEUED;
	return 0; /* no F_BUFFER: the stream's own */
}

/* The armed op's CQE; claimed: a recv re-armed for a buffer kept for it (stream_bufs_back). */
static void stream_cqe_handle(struct concur_stream *s, int32_t res, uint32_t flags, bool claimed)
{
	bool more = flags & IORING_CQE_F_MORE;
	bool item = res > 0 || (!s->recv && res == 0);
	bool our_stop = s->stop_sent;

	if (flags & IORING_CQE_F_BUFFER) {
		unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
		s->bufs->out[bid / 64] |= (uint64_t)1 << (bid % 64);
		s->bufs->free--;
		if (!item) { /* a buffer with no bytes in it (the end, an error): back at once. 6.18
			      * keeps such a one itself, but the flag says ours: no item will */
			stream_bufs_put(s->bufs, bid);
			stream_bufs_back(s->bufs);
			flags &= ~(uint32_t)IORING_CQE_F_BUFFER;
		}
	}
	if (!more) {
		s->armed = false;
		s->stop_sent = false;
	}
	if (s->closed || (s->ended && item)) { /* nobody will consume it */
		stream_discard(s, (struct stream_item){res, flags});
		stream_maybe_free(s);
		return;
	}
	if (s->recv && res == -ENOBUFS && !s->cancel_req && !s->ended) {
		/* out of buffers: wait for one (or take one kept for no starved stream) */
		if (s->bufs->free > s->bufs->claimed)
			stream_rearm_claiming(s);
		else if (!s->starved)
			stream_starve(s, claimed);
		return;
	}
	if (item && s->on_demand && (flags & IORING_CQE_F_BUFFER))
		flags = stream_keep_unwanted(s, res, flags);
	if (!item && !s->recv && res == -ECONNABORTED && !s->cancel_req &&
	    ++s->aborts < STREAM_ABORTS_MAX) {
		/* a connection its peer gave up on before we took it: nothing is short and nobody
		 * needs telling, the next is accepted at once (the re-arm below), as Go and libuv
		 * do. A back-off would let aborting clients slow every accept down. (Only a socket
		 * that aborts every accept, with none taken between, is told and backed off.) */
	} else if (!item) {
		/* the cancel is why it ended, not a shortage met before the kernel saw the cancel
		 * (out of buffers, an accept's EMFILE: what would not end the stream by itself);
		 * an error that would (a reset) is reported as it is */
		if (s->cancel_req && (s->recv ? res == -ENOBUFS : stream_accept_transient(res)))
			res = -ECANCELED;
		if (!s->recv && stream_accept_transient(res) && !s->cancel_req)
			stream_transient(s, res, more);
		else if (!s->ended && (res != -ECANCELED || !our_stop || s->cancel_req))
			stream_end(s, res); /* EOF (0), an error, -ECANCELED after a cancel */
		/* else: the back-off's own stop of a multishot that was still armed */
	} else if (!stream_push(s, res, flags)) {
		stream_discard(s, (struct stream_item){res, flags});
		if (s->recv) /* a hole in the byte stream: it cannot go on */
			stream_end(s, -ENOMEM);
		else /* a connection lost: transient, as the kernel's own ENOMEM */
			stream_transient(s, -ENOMEM, more);
	} else {
		if (!s->recv) {
			s->backoff_ms = 0;
			s->aborts = 0;
			if (more && s->qlen >= STREAM_ACCEPT_AHEAD && !s->stop_sent) {
				/* far enough ahead: its last CQE re-arms no more. The op only: a
				 * back-off armed meanwhile goes on (see stream_transient) */
				s->stop_sent = true;
				stream_cancel_op(s, &s->op);
			}
		}
		if (!more && s->cancel_req)
			stream_end(s, -ECANCELED);
	}
	if (!more)
		stream_rearm(s); /* the kernel stopped on its own (CQ overflow, ...): go on */
	stream_wake(s);
}

static void stream_cqe(struct concur__loop *loop, struct concur__op *op, int32_t res,
                       uint32_t flags)
{
	struct concur_stream *s = concur__container_of(op, struct concur_stream, op);
	struct stream_bufs *b = s->bufs; /* the thread's: outlives s, which the CQE may free */
	bool claimed = s->claims;

	if (claimed) /* the recv is over: it took the buffer kept for it, or failed */
		stream_claim_end(s);
	stream_cqe_handle(s, res, flags, claimed);
	/* it ended without taking that buffer (EOF, an error, a cancel): the next one's turn */
	if (claimed && !(flags & IORING_CQE_F_BUFFER))
		stream_bufs_back(b);
}

/* ---- the public calls --------------------------------------------------------------------- */

static int stream_open(concur_stream **out, int fd, int flags, bool recv, bool on_demand)
{
	struct concur__loop *loop = concur__tl_loop;
	struct concur_stream *s;
	int err;

	if (!out)
		return -EINVAL;
	*out = NULL;
	if (!concur__tl_task)
		return -EPERM;
	if (!concur__op_supported(loop->ex, recv ? IORING_OP_RECV : IORING_OP_ACCEPT))
		return -EOPNOTSUPP;
	/* a stream socket's only: a datagram of none (UDP, SEQPACKET) reads as 0, the end */
	int type = 0;
	socklen_t len = sizeof(type);
	if (recv && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len))
		return -errno;
	if (recv && type != SOCK_STREAM)
		return -EOPNOTSUPP;
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	if (recv) {
		err = stream_bufs_get(loop, &s->bufs);
		if (err) {
			free(s);
			return err;
		}
	}
	s->op.cqe = stream_cqe;
	s->timer_op.cqe = stream_timer_cqe;
	s->loop = loop;
	s->ex = loop->ex;
	s->fd = fd;
	s->flags = flags;
	s->recv = recv;
	s->on_demand = on_demand;
	atomic_init(&s->cancel_post, STREAM_CANCEL_NONE);
	concur__work_begin(s->ex);
	stream_rearm(s);
	*out = s;
	return 0;
}

int concur_accept_stream(concur_stream **out, int fd, int flags)
{
	return stream_open(out, fd, flags, false, false);
}

int concur_recv_stream(concur_stream **out, int fd, int flags)
{
	return stream_open(out, fd, flags, true, false);
}

int concur_recv_stream_on_demand(concur_stream **out, int fd, int flags)
{
	return stream_open(out, fd, flags, true, true);
}

static int stream_check(const concur_stream *s)
{
	if (!s)
		return -EINVAL;
	if (!concur__tl_task) /* before touching s: outside a task it may be anything */
		return -EPERM;
	if (concur__tl_loop != s->loop) /* set once: closed is the loop's to write */
		return -EPERM;
	return s->closed ? -EINVAL : 0; /* a check against a bug: closed, it may be gone */
}

int64_t concur_stream_next(concur_stream *s, struct concur_chunk *chunk)
{
	int err = stream_check(s);

	if (err)
		return err;
	if (s->recv && !chunk)
		return -EINVAL;
	stream_drop_stale_future(s);
	if (s->waiter || s->fwaiter || s->in_next)
		return -EBUSY;
	s->in_next = true;
	while (!stream_ready(s)) {
		struct concur__task *t = concur__tl_task;
		err = concur__ctl_check(t);
		if (err) { /* cancelled or past a deadline: what comes stays queued */
			/* a wake with nothing ready (an earlier stop's completion re-armed the recv
			 * for us) can come first, and its interrupt then found us woken already */
			stream_disarm_unwanted(s);
			s->in_next = false;
			return err;
		}
		s->waiter = t;
		stream_rearm(s); /* an on-demand stream arms now */
		/* stream_wake resumes us, or a cancel/deadline does */
		err = concur__suspend_interruptible(t, stream_interrupt, s);
		if (err) {
			s->in_next = false;
			return err;
		}
	}
	s->in_next = false;
	int64_t res = stream_take(s, chunk);
	stream_rearm(s);
	return res;
}

concur_future *concur_stream_next_future(concur_stream *s, struct concur_chunk *chunk)
{
	int err = stream_check(s);
	struct stream_next *n;

	if (!err && s->recv && !chunk)
		err = -EINVAL;
	if (err)
		return concur__failed_future(concur__tl_loop ? concur__tl_loop->ex : NULL, err);
	stream_drop_stale_future(s);
	if (s->waiter || s->fwaiter || s->in_next)
		return concur__failed_future(s->ex, -EBUSY);
	n = malloc(sizeof(*n));
	if (!n)
		return concur__failed_future(s->ex, -ENOMEM);
	concur__future_init(&n->f, &stream_next_class, s->ex, 2); /* the caller's, the stream's */
	n->chunk = chunk;
	if (stream_ready(s)) {
		concur__future_claim(&n->f);
		concur__complete(&n->f, stream_take(s, chunk), CONCUR__FINISHED);
		concur_release(&n->f);
	} else {
		s->fwaiter = n;
	}
	stream_rearm(s);
	return &n->f;
}

int concur_stream_give(concur_stream *s, const struct concur_chunk *chunk)
{
	int err = stream_check(s);
	struct stream_bufs *b;

	if (err)
		return err;
	if (!s->recv || !chunk)
		return -EINVAL;
	unsigned idx = chunk->bid & 0xffffu, gen = chunk->bid >> 16;
	/* given back already (twice, the ring would hand one buffer to two recvs): not out, or
	 * out again for another chunk since (a newer generation) */
	if (idx == STREAM_SPILL_IDX) {
		/* and this stream's: another's spill has the same index, maybe the same gen */
		if (s->spill_state != STREAM_SPILL_LENT || gen != s->spill_gen ||
		    chunk->data != s->spill)
			return -EINVAL;
		s->spill_state = STREAM_SPILL_FREE;
		s->spill_gen++;
		return 0;
	}
	b = s->bufs;
	if (idx >= STREAM_NBUFS || !(b->out[idx / 64] & ((uint64_t)1 << (idx % 64))) ||
	    gen != b->gen[idx])
		return -EINVAL;
	stream_bufs_put(b, idx);
	stream_bufs_back(b);
	return 0;
}

/* Buffers are back in the ring (given back, discarded by a close, or not taken by a recv re-armed
 * for one): re-arm as many of the streams that ran dry, oldest first, whoever gave them back (a
 * starved stream waited for a give() that may never come). One that stays unarmed (an on-demand
 * stream nobody waits on now) re-arms when a consumer comes, like any other. */
static void stream_bufs_back(struct stream_bufs *b)
{
	while (b->starved && b->free > b->claimed) {
		struct concur_stream *t = b->starved;
		stream_unstarve(t);
		stream_rearm_claiming(t);
	}
}

/* On the stream's loop. */
static void stream_cancel_here(struct concur_stream *s)
{
	if (s->ended || s->cancel_req)
		return;
	s->cancel_req = true;
	if (s->armed) { /* the armed op's last CQE ends it */
		stream_stop(s);
		return;
	}
	/* paused (for buffers, a back-off or a consumer): nothing armed, end it here */
	if (s->starved)
		stream_unstarve(s);
	stream_end(s, -ECANCELED);
	stream_wake(s);
}

static void stream_cancel_call(struct concur__loop *loop, struct concur__node *node)
{
	struct concur_stream *s = concur__container_of(node, struct concur_stream, cancel_node);

	if (loop != s->loop) { /* a failed MSG_RING delivered it elsewhere: forward it */
		concur__loop_post(s->loop, node);
		return;
	}
	atomic_store_explicit(&s->cancel_post, STREAM_CANCEL_RAN, memory_order_release);
	if (s->closed)
		stream_maybe_free(s);
	else
		stream_cancel_here(s);
}

int concur_stream_cancel(concur_stream *s)
{
	int expected = STREAM_CANCEL_NONE;

	if (!s)
		return -EINVAL;
	if (concur__tl_loop == s->loop) {
		if (s->closed) /* a check against a bug: closed, it may be gone */
			return -EINVAL;
		stream_cancel_here(s);
		return 0;
	}
	/* another thread: the loop does it; one post is enough, cancel is idempotent */
	if (atomic_compare_exchange_strong(&s->cancel_post, &expected, STREAM_CANCEL_POSTED)) {
		s->cancel_node.call = stream_cancel_call;
		concur__loop_post(s->loop, &s->cancel_node);
	}
	return 0;
}

void concur_stream_close(concur_stream *s)
{
	if (!s || concur__tl_loop != s->loop || s->closed) /* closed: the loop's to read */
		return;
	struct concur__loop *loop = s->loop;
	bool queued = s->armed && s->armed_at == loop->sq_emptied; /* its SQE not submitted yet */
	stream_stop(s);
	s->closed = true;
	while (s->qlen) {
		stream_discard(s, s->q[s->qhead]);
		s->qhead = (s->qhead + 1) % s->qcap;
		s->qlen--;
	}
	if (s->starved)
		stream_unstarve(s);
	if (s->fwaiter) { /* a pending next-future ends cancelled */
		struct stream_next *n = s->fwaiter;
		s->fwaiter = NULL;
		if (concur__future_claim(&n->f))
			concur__complete(&n->f, -ECANCELED, CONCUR__CANCELLED);
		concur_release(&n->f);
	}
	stream_maybe_free(s);
	/* its arm (which names fd by number) to the kernel now: the caller may close fd next,
	 * and a new file may take its number before the turn's end */
	if (queued)
		concur__loop_flush(loop);
}

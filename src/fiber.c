/* SPDX-License-Identifier: MIT */
/*
 * Fibers: pooled stacks, the context switch, and suspend/resume.
 *
 * A task has no stack while queued. When its loop first runs it, the task takes a stack from
 * the loop's pool (mmap()ed with a guard page below it, so an overflow faults instead of
 * corrupting a neighbour; pages are touched lazily), and gives it back when it returns. A fiber
 * is started and finished by its loop's own context; in between, a fiber that suspends while
 * another is ready switches straight to it (one switch instead of two through the loop). A
 * suspended task is just a saved stack pointer until something calls concur__resume().
 *
 * The switch is assembly (fiber_x86_64.S, fiber_aarch64.S); ucontext is a slow fallback for
 * other CPUs (swapcontext makes a sigprocmask syscall per switch). ASan and TSan builds annotate
 * every switch so the sanitizers follow the stacks.
 */
#include "internal.h"
#include "wait.h" /* the stall detector's hook */

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if CONCUR__USE_UCONTEXT
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CONCUR__ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#define CONCUR__TSAN 1
#include <sanitizer/tsan_interface.h>
#endif

__thread struct concur__loop *concur__tl_loop;
__thread struct concur__task *concur__tl_task;

#define CONCUR__POOL_MAX 256 /* stacks kept per loop; more are unmapped when returned */

void concur__ctx_switch(void **save_sp, void *load_sp);
void concur__ctx_start(void);

static void concur__fiber_main(struct concur__task *t) __attribute__((noreturn));

/* ---- the switch, with the sanitizers' annotations ----------------------------------------- */

/* Into fiber to, saving the current context (the loop's, or a suspending fiber's) in save_*. */
static inline void concur__switch_to(void **save_sp, void *save_uctx, struct concur__fiber *to)
{
#ifdef CONCUR__ASAN
	void *fake = NULL;
	__sanitizer_start_switch_fiber(&fake, to->stack_lo, to->stack_size);
#endif
#ifdef CONCUR__TSAN
	__tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
#if CONCUR__USE_UCONTEXT
	swapcontext(save_uctx, to->uctx);
	(void)save_sp;
#else
	concur__ctx_switch(save_sp, to->sp);
	(void)save_uctx;
#endif
#ifdef CONCUR__ASAN
	__sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
}

static inline void concur__switch_in(struct concur__loop *loop, struct concur__fiber *fib)
{
	concur__switch_to(&loop->sched_sp, loop->sched_uctx, fib);
}

/* final: the fiber will never run again (its fake stack can go). */
static inline void concur__switch_out(struct concur__loop *loop, struct concur__fiber *fib,
                                      bool final)
{
#ifdef CONCUR__ASAN
	void *fake = NULL;
	__sanitizer_start_switch_fiber(final ? NULL : &fake, loop->asan_stack_lo,
	                               loop->asan_stack_size);
#endif
#ifdef CONCUR__TSAN
	__tsan_switch_to_fiber(loop->tsan_fiber, 0);
#endif
#if CONCUR__USE_UCONTEXT
	swapcontext(fib->uctx, loop->sched_uctx);
#else
	concur__ctx_switch(&fib->sp, loop->sched_sp);
#endif
#ifdef CONCUR__ASAN
	/* whoever resumed us may be another fiber: the loop's stack bounds are recorded once, on
	 * a fiber's first entry (concur__fiber_main), which always comes from the loop */
	__sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
	(void) final;
}

/* Fiber to fiber, from a suspending one to a ready one on the same loop. */
static inline void concur__switch_direct(struct concur__fiber *from, struct concur__fiber *to)
{
	concur__switch_to(&from->sp, from->uctx, to);
}

/* ---- stacks --------------------------------------------------------------------------------- */

struct concur__fiber *concur__fiber_get(struct concur__loop *loop)
{
	struct concur__fiber *fib = loop->stack_pool;
	if (fib) {
		loop->stack_pool = fib->next_free;
		loop->stack_pool_len--;
		return fib;
	}
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t map_size = loop->ex->opts.stack_size + page;
	void *map = mmap(NULL, map_size, PROT_READ | PROT_WRITE,
	                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
	if (map == MAP_FAILED)
		return NULL;
	if (mprotect(map, page, PROT_NONE) != 0) { /* the guard page */
		munmap(map, map_size);
		return NULL;
	}
	/* the fiber's record (and ucontext) live at the top of its own stack mapping */
	size_t head = sizeof(struct concur__fiber);
#if CONCUR__USE_UCONTEXT
	head += sizeof(ucontext_t);
#endif
	head = (head + 63) & ~(size_t)63;
	char *top = (char *)map + map_size - head;
	fib = (struct concur__fiber *)top;
	memset(fib, 0, sizeof(*fib));
	fib->map = map;
	fib->map_size = map_size;
	fib->stack_lo = (char *)map + page;
	fib->stack_size = (size_t)(top - (char *)fib->stack_lo);
#if CONCUR__USE_UCONTEXT
	fib->uctx = top + sizeof(struct concur__fiber);
#endif
	concur__stat_inc(&loop->st.stacks_mapped, 1);
	return fib;
}

static void concur__fiber_unmap(struct concur__fiber *fib)
{
#ifdef CONCUR__TSAN
	if (fib->tsan_fiber)
		__tsan_destroy_fiber(fib->tsan_fiber);
#endif
#ifdef CONCUR__ASAN
	/* ASan keeps the poison of dead frames: clear it, or whatever the kernel maps here next
	 * (an io_uring ring, say) looks like a stack to it */
	__asan_unpoison_memory_region(fib->stack_lo, fib->stack_size);
#endif
	munmap(fib->map, fib->map_size);
}

void concur__fiber_put(struct concur__loop *loop, struct concur__fiber *fib)
{
	if (loop->stack_pool_len >= CONCUR__POOL_MAX) {
		concur__fiber_unmap(fib);
		return;
	}
	fib->next_free = loop->stack_pool;
	loop->stack_pool = fib;
	loop->stack_pool_len++;
}

void concur__fiber_pool_free(struct concur__loop *loop)
{
	while (loop->stack_pool) {
		struct concur__fiber *fib = loop->stack_pool;
		loop->stack_pool = fib->next_free;
		concur__fiber_unmap(fib);
	}
	loop->stack_pool_len = 0;
#if CONCUR__USE_UCONTEXT
	free(loop->sched_uctx);
	loop->sched_uctx = NULL;
#endif
}

/* ---- running and suspending ----------------------------------------------------------------- */

#if CONCUR__USE_UCONTEXT
static void concur__uctx_entry(unsigned hi, unsigned lo)
{
	concur__fiber_main((struct concur__task *)(((uintptr_t)hi << 32) | lo));
}
#endif

void concur__fiber_prepare(struct concur__fiber *fib, struct concur__task *t)
{
#ifdef CONCUR__ASAN
	__asan_unpoison_memory_region(fib->stack_lo, fib->stack_size); /* frames of the last task */
#endif
#ifdef CONCUR__TSAN
	/* a fiber's entry never returns, so TSan's shadow call stack for a reused stack would
	 * grow with every task: give each task a fresh TSan fiber */
	if (fib->tsan_fiber)
		__tsan_destroy_fiber(fib->tsan_fiber);
	fib->tsan_fiber = __tsan_create_fiber(0);
#endif
#if CONCUR__USE_UCONTEXT
	ucontext_t *uc = fib->uctx;
	getcontext(uc);
	uc->uc_stack.ss_sp = fib->stack_lo;
	uc->uc_stack.ss_size = fib->stack_size;
	uc->uc_link = NULL;
	uintptr_t p = (uintptr_t)t;
	makecontext(uc, (void (*)(void))concur__uctx_entry, 2, (unsigned)(p >> 32), (unsigned)p);
#else
	uintptr_t top = ((uintptr_t)fib->stack_lo + fib->stack_size) & ~(uintptr_t)15;
#if defined(__x86_64__)
	/* popped by concur__ctx_switch: r15 r14 r13 r12 rbx rbp, then the jump target */
	uintptr_t *sp = (uintptr_t *)(top - 72);
	memset(sp, 0, 72);
	sp[2] = (uintptr_t)concur__fiber_main; /* r13 */
	sp[3] = (uintptr_t)t;                  /* r12 */
	sp[6] = (uintptr_t)concur__ctx_start;
#elif defined(__aarch64__)
	/* x19..x30 at 0..95, d8..d15 at 96..159 */
	uintptr_t *sp = (uintptr_t *)(top - 176);
	memset(sp, 0, 176);
	sp[0] = (uintptr_t)t;                  /* x19 */
	sp[1] = (uintptr_t)concur__fiber_main; /* x20 */
	sp[11] = (uintptr_t)concur__ctx_start; /* x30 */
#else
#error "no assembly context switch for this CPU: build with CONCUR_UCONTEXT"
#endif
	fib->sp = sp;
#endif
}

static void concur__fiber_main(struct concur__task *t)
{
	struct concur__loop *loop = t->loop;
#ifdef CONCUR__ASAN
	__sanitizer_finish_switch_fiber(NULL, &loop->asan_stack_lo, &loop->asan_stack_size);
#endif
	t->f.res = t->fn(t->arg);
	t->f.flags |= CONCUR__TASK_RETURNED;
	concur__switch_out(loop, t->fib, true);
	__builtin_unreachable();
}

struct concur__task *concur__fiber_run(struct concur__loop *loop, struct concur__task *t)
{
#if CONCUR__USE_UCONTEXT
	if (!loop->sched_uctx) {
		loop->sched_uctx = malloc(sizeof(ucontext_t));
		if (!loop->sched_uctx)
			abort(); /* cannot happen after the first task: allocated once per loop */
	}
#endif
#ifdef CONCUR__TSAN
	if (!loop->tsan_fiber)
		loop->tsan_fiber = __tsan_get_current_fiber();
#endif
	concur__tl_task = t;
	concur__switch_in(loop, t->fib);
	t = concur__tl_task; /* not the one we switched to if it passed the thread on */
	concur__tl_task = NULL;
	return t;
}

/*
 * Many ready fibers (a batch of I/O completions) are each a few cold cache lines of stack:
 * loading them one after another is a chain of misses at every switch, which was most of the
 * cost of await_nop with 128 tasks. The fiber after the next one gets its top frames fetched
 * while the next one runs.
 */
static inline void concur__fiber_prefetch(struct concur__task *t)
{
	struct concur__fiber *fib = t->fib;
	if (!fib)
		return; /* not started: nothing saved on a stack yet */
	const char *sp = fib->sp;
	if (!sp)
		return; /* the ucontext fallback keeps no stack pointer */
	for (int i = 0; i < 4; i++)
		__builtin_prefetch(sp + i * CONCUR__CACHELINE, 1);
}

void concur__suspend(void)
{
	struct concur__task *t = concur__tl_task;
	struct concur__loop *loop = t->loop;
	/* Another fiber is ready: switch straight to it instead of through the loop's context.
	 * Each direct switch is charged to the loop's turn budget, so the loop still gets back to
	 * its inbox and I/O as often as before. With a stall detector set, every fiber runs from
	 * the loop, so each run is timed on its own. */
	concur__stat_inc(&loop->st.fibers_parked, 1);
	struct concur__node *n = loop->ready_head;
	/* (a pinned task not started yet waits there too: the loop starts it) */
	if (n && concur__task_of_node(n)->fib && loop->budget > 1 &&
	    !atomic_load_explicit(&concur__stall_detectors, memory_order_relaxed)) {
		loop->budget--;
		loop->ready_head = n->next;
		if (!n->next)
			loop->ready_tail = NULL;
		struct concur__task *next = concur__task_of_node(n);
		if (next == t)
			return; /* a yield with nobody else ready: go on */
		if (n->next)
			concur__fiber_prefetch(concur__task_of_node(n->next));
		concur__tl_task = next;
		concur__switch_direct(t->fib, next->fib);
		return; /* concur__tl_task is t again: whoever switched here set it */
	}
	concur__switch_out(loop, t->fib, false);
}

void concur__resume(struct concur__task *t)
{
	struct concur__loop *loop = t->loop;
	if (concur__tl_loop == loop)
		concur__loop_push_ready(loop, t);
	else
		concur__loop_post(loop, &t->node);
}

bool concur_in_task(void)
{
	return concur__tl_task != NULL;
}

void concur_yield(void)
{
	struct concur__task *t = concur__tl_task;
	if (!t)
		return;
	/* A yield goes behind everything runnable now. With no unstarted task and nobody else
	 * yielded this turn, that is just the ready queue's tail: concur__suspend() then switches
	 * straight to the next fiber (or goes on, if alone), charged to the turn's budget so I/O
	 * still gets its look. Otherwise wait for the turn's end, so yielders cannot starve the
	 * tasks that have not started. */
	struct concur__loop *loop = t->loop;
	if (loop->fresh_head || loop->yielded_head)
		concur__loop_push_yielded(loop, t);
	else
		concur__loop_push_ready(loop, t);
	concur__suspend();
}

/* An await in progress: its node on the future, and the future, for an interrupt to undo. */
struct concur__await {
	struct concur__waiter w;
	concur_future *f;
};

static bool concur__await_interrupt(struct concur__loop *loop, struct concur__task *t, void *arg)
{
	struct concur__await *a = arg;
	if (!concur__waiter_remove(a->f, &a->w))
		return false; /* completed first: the completion resumes us */
	concur__loop_push_ready(loop, t);
	return true;
}

int64_t concur__await(concur_future *f, int64_t timeout_ns)
{
	struct concur__task *t = concur__tl_task;
	int err = concur__ctl_check(t);
	if (err)
		return err;
	/* a timed await is a deadline on this wait, on the loop's one timer */
	if (timeout_ns >= 0 && (err = concur__ctl_wait_deadline(t, concur__after_ns(timeout_ns))))
		return err;
	/* on the fiber's stack: complete() is done with the node once it has resumed us */
	struct concur__await a = {.w = {.kind = CONCUR__WAIT_AWAIT, .task = t}, .f = f};
	if (concur__waiter_push(f, &a.w))
		err = concur__suspend_interruptible(t, concur__await_interrupt, &a);
	if (timeout_ns >= 0)
		concur__ctl_wait_deadline(t, INT64_MAX);
	return err ? err : concur__future_value(f);
}

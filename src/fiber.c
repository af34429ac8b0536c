/* SPDX-License-Identifier: MIT */
/*
 * Fibers: pooled stacks, the context switch, and suspend/resume.
 *
 * A task has no stack while queued. When its loop first runs it, the task takes a stack from
 * the loop's pool of its size class (carved from a large reservation, with a guard page below
 * it so an overflow faults instead of corrupting a neighbour; pages are touched lazily; see
 * "stacks" below), and gives it back when it returns. A fiber that suspends while another is
 * ready switches straight to it (one switch instead of two through the loop); with nothing
 * resumed it starts the next unstarted task itself. A task that returns on a full stack
 * completes itself there and passes the thread straight on the same way; the fiber it switched
 * to gives its stack back (loop->dead_fib). Tiny stacks leave starting and finishing to the
 * loop's own context, as does a stall detector. A suspended task is just a saved stack pointer
 * until something calls concur__resume().
 *
 * The switch is assembly (fiber_x86_64.S, fiber_aarch64.S); ucontext is a slow fallback for
 * other CPUs (swapcontext makes a sigprocmask syscall per switch). ASan and TSan builds annotate
 * every switch so the sanitizers follow the stacks.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#if CONCUR__USE_UCONTEXT
#include <ucontext.h>
#endif

#ifdef CONCUR__ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

CONCUR__TLS_HOT struct concur__loop *concur__tl_loop;
CONCUR__TLS_HOT struct concur__task *concur__tl_task;

static void concur__fiber_main(struct concur__task *t) __attribute__((noreturn));

/* ---- the switch, with the sanitizers' annotations ----------------------------------------- */

/*
 * x86-64: a fiber not entered yet has its stack's top as its saved stack pointer, tagged with
 * CONCUR__SP_FRESH (concur__fiber_prepare). It is entered with a jump (concur__ctx_enter), and a
 * finished fiber leaves with one (concur__ctx_jump), so the return stack buffer stays paired with
 * the switches: a child that starts and ends between its parent's suspend and resume leaves the
 * parent's own return address on top, and the parent's returns are predicted.
 */
#if !CONCUR__USE_UCONTEXT && defined(__x86_64__)
#define CONCUR__CTX_JUMPS 1
#define CONCUR__SP_FRESH  ((uintptr_t)1)
#endif

/* The assembly switch to the context saved in sp (task to's, or the loop's: to NULL). final:
 * the current context never runs again, nothing is saved. */
static inline void concur__ctx_to(void **save_sp, void *sp, struct concur__task *to, bool final)
{
#if CONCUR__CTX_JUMPS
	if (to && ((uintptr_t)sp & CONCUR__SP_FRESH)) {
		concur__ctx_enter(save_sp, (char *)sp - CONCUR__SP_FRESH, to, concur__fiber_main);
		return;
	}
	if (final) {
		__asm__ volatile("jmp concur__ctx_jump" : : "D"(sp) : "memory");
		__builtin_unreachable();
	}
#endif
	concur__ctx_switch(save_sp, sp);
	(void)to;
	(void) final;
}

/* Into task to's fiber, saving the current context (the loop's, or a suspending fiber's) in
 * save_*. final: the current fiber will never run again (its fake stack can go). */
static inline void concur__switch_to(void **save_sp, void *save_uctx, struct concur__task *to,
                                     bool final)
{
#ifdef CONCUR__ASAN
	void *fake = NULL;
	__sanitizer_start_switch_fiber(final ? NULL : &fake, to->fib->stack_lo,
	                               to->fib->stack_size);
#endif
#ifdef CONCUR__TSAN
	__tsan_switch_to_fiber(to->fib->tsan_fiber, 0);
#endif
#if CONCUR__USE_UCONTEXT
	swapcontext(save_uctx, to->fib->uctx);
	(void)save_sp;
#else
	concur__ctx_to(save_sp, to->sp, to, final);
	(void)save_uctx;
#endif
#ifdef CONCUR__ASAN
	__sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
	(void) final;
}

static inline void concur__switch_in(struct concur__loop *loop, struct concur__task *t)
{
	concur__switch_to(&loop->sched_sp, loop->sched_uctx, t, false);
}

/* final: the fiber will never run again (its fake stack can go). */
static inline void concur__switch_out(struct concur__loop *loop, void **save_sp, void *save_uctx,
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
	swapcontext(save_uctx, loop->sched_uctx);
	(void)save_sp;
#else
	concur__ctx_to(save_sp, loop->sched_sp, NULL, final);
	(void)save_uctx;
#endif
#ifdef CONCUR__ASAN
	/* whoever resumed us may be another fiber: the loop's stack bounds are recorded once, on
	 * a fiber's first entry (concur__fiber_main), which always comes from the loop */
	__sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
	(void) final;
}

/* Fiber to fiber, from a suspending one to a ready one on the same loop. */
static inline void concur__switch_direct(struct concur__task *from, struct concur__task *to)
{
	concur__switch_to(&from->sp, from->fib->uctx, to, false);
}

/* ---- stacks --------------------------------------------------------------------------------- */

/*
 * A slab allocator of stacks. A size class (one per loop and stack size) carves its stacks
 * from reservations: one mmap (MAP_NORESERVE: untouched pages cost nothing) holds up to 4096
 * slots, so a million stacks are a few thousand mappings, under vm.max_map_count. A slot of a
 * page or more is [guard page][stack], the guard a guard region (MADV_GUARD_INSTALL, Linux
 * 6.13+, which keeps the mapping whole; installed for all slots at once, batched with
 * process_madvise where it can) or, on older kernels, a PROT_NONE page made when the slot is
 * first carved (each splits the mapping: those count against a budget of mappings). A slot
 * smaller than a page ("tiny", asked for with concur_spawn_ex) shares its page with its
 * neighbours: only the reservation's lowest slot sits above a guard page, the others get a
 * canary at their bottom, checked when the task suspends or returns.
 *
 * Each reservation keeps its free slots on a LIFO stack of indices held outside the slots, so
 * a slot's memory can go back to the kernel while free. The newest free slots are reused first
 * (their pages are warm). Entries below `cold` were released since they were freed; the ones
 * above are "warm", maybe resident. When a class holds more warm free stacks than
 * CONCUR__STACK_WARM_MAX and than half its live ones, it trims: every warm free stack goes back
 * with MADV_DONTNEED (a tiny slot's page only once every slot of the page is free), in batches, and
 * a reservation left empty is unmapped unless it is the class's last. So RSS follows the live
 * tasks, and a loop that runs tasks one after another never trims. Only the loop thread touches its
 * classes: no lock.
 */

#define CONCUR__MADV_GUARD_INSTALL 102      /* Linux 6.13 */
#define CONCUR__PIDFD_SELF         (-10000) /* Linux 6.15: process_madvise() on ourselves */
#define CONCUR__STACK_WARM_MAX     256u     /* warm free stacks a class keeps before trimming */
#define CONCUR__RES_MAX_BYTES      ((size_t)64 << 20)
#define CONCUR__RES_MAX_SLOTS      4096u /* free indices are uint16_t */
#define CONCUR__RES_MIN_SLOTS      16u   /* the first reservation; each next one doubles */
#define CONCUR__IOV_BATCH          64
#define CONCUR__IDLE_TRIM_GAP_NS   1000000000ll /* between two idle trims of a loop */
#define CONCUR__CANARY             0x7375636e6f632121ull

struct concur__stack_class {
	size_t stride;     /* bytes per slot, guard page included */
	size_t guard;      /* 0 for tiny slots, else the page below each slot */
	unsigned per_page; /* tiny: slots per page */
	unsigned nres;     /* reservations alive */
	unsigned warm;     /* free stacks that may be resident, over all reservations */
	unsigned live;     /* stacks in use */
	struct concur__stack_res *avail; /* reservations with a free or uncarved slot */
	struct concur__stack_res *full;  /* the others */
	struct concur__stack_res *dirty; /* reservations with warm free slots */
};

struct concur__stack_res {
	struct concur__stack_res *next, *prev; /* in the class's avail or full list */
	struct concur__stack_res *dirty_next;
	struct concur__stack_class *cls;
	char *map;   /* the mapping */
	size_t size; /* its length */
	char *slots; /* slot 0 */
	long maps;   /* mappings it accounts for in the budget */
	unsigned nslots, carved, used, nfree, cold;
	bool full, dirty, mprotect;
	uint8_t *page_used; /* tiny: slots in use per page */
	uint16_t free[];    /* free slot indices, newest on top; page_used follows */
};

static pthread_once_t concur__stack_once = PTHREAD_ONCE_INIT;
static size_t concur__page;
static _Atomic int concur__guard_probed; /* CONCUR_STACK_GUARD_* the kernel offers; 0: unknown */
static _Atomic int concur__guard_forced; /* tests: 0 or a CONCUR_STACK_GUARD_* */
static _Atomic bool concur__pm_self;     /* process_madvise(PIDFD_SELF, ...) works */
static _Atomic long concur__maps_used;   /* mappings our stacks hold, process-wide */
static _Atomic long concur__maps_budget;

/*
 * What the kernel offers for guard pages: MADV_GUARD_INSTALL (no mapping of its own per guard),
 * else mprotect. Only a definite answer is kept: a probe that could not map its two pages, or
 * whose madvise ran out of memory, says nothing of the kernel, and a later reservation probes
 * again (kept, one transient failure made every stack of the process cost two mappings).
 */
static int concur__guard_probe(void)
{
	int mode = atomic_load_explicit(&concur__guard_probed, memory_order_acquire);
	if (mode)
		return mode;
	char *p = mmap(NULL, 2 * concur__page, PROT_READ | PROT_WRITE,
	               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return CONCUR_STACK_GUARD_MPROTECT; /* for this reservation only */
	if (madvise(p, concur__page, CONCUR__MADV_GUARD_INSTALL) == 0) {
		mode = CONCUR_STACK_GUARD_MADVISE;
		struct iovec iov = {p + concur__page, concur__page};
		atomic_store(&concur__pm_self,
		             syscall(SYS_process_madvise, CONCUR__PIDFD_SELF, &iov, 1,
		                     CONCUR__MADV_GUARD_INSTALL, 0) == (long)concur__page);
	} else {
		mode = CONCUR_STACK_GUARD_MPROTECT;
	}
	bool known = mode == CONCUR_STACK_GUARD_MADVISE || (errno != ENOMEM && errno != EAGAIN);
	munmap(p, 2 * concur__page);
	if (known)
		atomic_store_explicit(&concur__guard_probed, mode, memory_order_release);
	return mode;
}

static void concur__stack_probe(void)
{
	concur__page = (size_t)sysconf(_SC_PAGESIZE);
	/* leave room under vm.max_map_count for everything else: libraries, malloc arenas,
	 * rings, thread stacks, and the program's own mappings */
	long max = 65530;
	FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
	if (f) {
		if (fscanf(f, "%ld", &max) != 1)
			max = 65530;
		fclose(f);
	}
	long spare = max / 8 > 4096 ? max / 8 : 4096;
	atomic_store(&concur__maps_budget, max > 2 * spare ? max - spare : max / 2);
}

static int concur__guard_now(void)
{
	pthread_once(&concur__stack_once, concur__stack_probe);
	int forced = atomic_load_explicit(&concur__guard_forced, memory_order_relaxed);
	return forced ? forced : concur__guard_probe();
}

int concur__stack_guard_mode(void)
{
	return concur__guard_now();
}

void concur__stack_guard_force(int mode)
{
	atomic_store(&concur__guard_forced, mode);
}

long concur__stack_map_budget(long budget)
{
	pthread_once(&concur__stack_once, concur__stack_probe);
	return budget >= 0 ? atomic_exchange(&concur__maps_budget, budget)
	                   : atomic_load(&concur__maps_budget);
}

long concur__stack_maps_used(void)
{
	return atomic_load(&concur__maps_used);
}

static bool concur__maps_take(long n)
{
	long used = atomic_fetch_add(&concur__maps_used, n) + n;
	if (used <= atomic_load_explicit(&concur__maps_budget, memory_order_relaxed))
		return true;
	atomic_fetch_sub(&concur__maps_used, n);
	return false;
}

unsigned concur__stack_lg(size_t stack_size, size_t page)
{
	unsigned lg = 10;
	while (((size_t)1 << lg) < stack_size)
		lg++;
	/* A stack the loop's own work may run on (concur__task_stack_big: 16 KiB or more) is not
	 * canary-checked, so it must have a guard page: with pages over 16 KiB (aarch64 and
	 * ppc64le kernels with 64 KiB pages) it is a page at least. With the ucontext switch no
	 * stack is below a page: the ucontext_t alone is most of a kilobyte. */
	if (CONCUR__USE_UCONTEXT || lg >= CONCUR__TASK_STACK_BIG_LG)
		while (((size_t)1 << lg) < page)
			lg++;
	return lg;
}

int concur__stack_flags(size_t stack_size)
{
	if (!stack_size)
		return 0;
	if (stack_size < CONCUR_STACK_MIN || stack_size > CONCUR_STACK_MAX)
		return -EINVAL;
	pthread_once(&concur__stack_once, concur__stack_probe);
	return (int)(concur__stack_lg(stack_size, concur__page) << CONCUR__TASK_STACK_SHIFT);
}

/* The fiber's record and (fallback switch) its ucontext, at the top of each slot. */
_Static_assert(sizeof(void *) != 8 || sizeof(struct concur__fiber) <= 192,
               "concur_spawn_opts.stack_size's header says the record takes 192 bytes");
static size_t concur__fiber_head(void)
{
	size_t head = sizeof(struct concur__fiber);
#if CONCUR__USE_UCONTEXT
	head += sizeof(ucontext_t);
#endif
	return (head + 63) & ~(size_t)63;
}

/* One process_madvise() over n ranges; true if the kernel advised them all (it may stop part
 * way, out of memory for page tables, and return the bytes done: the rest is not advised). */
static bool concur__pm_advise(struct iovec *iov, size_t n, int advice)
{
	if (!atomic_load_explicit(&concur__pm_self, memory_order_relaxed))
		return false;
	long total = 0;
	for (size_t i = 0; i < n; i++)
		total += (long)iov[i].iov_len;
	return syscall(SYS_process_madvise, CONCUR__PIDFD_SELF, iov, n, advice, 0) == total;
}

/* madvise() over many ranges: one process_madvise() where the kernel takes it. */
static void concur__madvise_many(struct iovec *iov, size_t n, int advice)
{
	if (!n || concur__pm_advise(iov, n, advice))
		return;
	for (size_t i = 0; i < n; i++) /* again from the first: advising twice is harmless */
		madvise(iov[i].iov_base, iov[i].iov_len, advice);
}

static void concur__list_push(struct concur__stack_res **head, struct concur__stack_res *r)
{
	r->prev = NULL;
	r->next = *head;
	if (*head)
		(*head)->prev = r;
	*head = r;
}

static void concur__list_unlink(struct concur__stack_res **head, struct concur__stack_res *r)
{
	if (r->prev)
		r->prev->next = r->next;
	else
		*head = r->next;
	if (r->next)
		r->next->prev = r->prev;
}

/* The first stack of a size class on this loop. */
static struct concur__stack_class *concur__class_new(struct concur__loop *loop, unsigned idx)
{
	pthread_once(&concur__stack_once, concur__stack_probe);
	size_t size = idx ? (size_t)1 << idx : loop->ex->opts.stack_size;
	if (idx && size == loop->ex->opts.stack_size) { /* the default size, asked for by name */
		if (!loop->stacks.cls[0] && !concur__class_new(loop, 0))
			return NULL;
		return loop->stacks.cls[idx] = loop->stacks.cls[0];
	}
	struct concur__stack_class *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	size_t page = concur__page;
	if (size < page) {
		c->stride = size;
		c->per_page = (unsigned)(page / size);
	} else {
		c->guard = page;
		c->stride = size + page;
	}
	return loop->stacks.cls[idx] = c;
}

static struct concur__stack_res *concur__res_new(struct concur__loop *loop,
                                                 struct concur__stack_class *c)
{
	size_t page = concur__page;
	unsigned n = CONCUR__RES_MIN_SLOTS << (c->nres < 8 ? c->nres : 8);
	size_t fit = CONCUR__RES_MAX_BYTES / c->stride;
	if (n > fit)
		n = fit ? (unsigned)fit : 1;
	if (n > CONCUR__RES_MAX_SLOTS)
		n = CONCUR__RES_MAX_SLOTS;
	size_t npages = c->per_page ? (n + c->per_page - 1) / c->per_page : 0;
	struct concur__stack_res *r = calloc(1, sizeof(*r) + n * sizeof(uint16_t) + npages);
	if (!r)
		return NULL;
	bool mprot = concur__guard_now() == CONCUR_STACK_GUARD_MPROTECT;
	/* tiny slots: one guard page below the lowest; it splits the mapping in mprotect mode */
	r->maps = c->per_page && mprot ? 2 : 1;
	if (!concur__maps_take(r->maps)) {
		free(r);
		return NULL;
	}
	r->size = (c->per_page ? page : 0) + n * c->stride;
	r->map = mmap(NULL, r->size, PROT_READ | PROT_WRITE,
	              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
	if (r->map == MAP_FAILED)
		goto fail;
	madvise(r->map, r->size, MADV_NOHUGEPAGE); /* MAP_STACK implies it only since 6.7 */
	r->slots = r->map + (c->per_page ? page : 0);
	if (c->per_page) {
		int e = mprot ? mprotect(r->map, page, PROT_NONE)
		              : madvise(r->map, page, CONCUR__MADV_GUARD_INSTALL);
		if (e)
			goto fail_unmap;
	} else if (!mprot) { /* every slot's guard now, in one call where the kernel allows */
		struct iovec iov[CONCUR__IOV_BATCH];
		for (unsigned i = 0; i < n;) {
			size_t k = 0;
			for (; k < CONCUR__IOV_BATCH && i < n; k++, i++)
				iov[k] = (struct iovec){r->slots + i * c->stride, page};
			if (concur__pm_advise(iov, k, CONCUR__MADV_GUARD_INSTALL))
				continue;
			/* one by one (a partial call left slots without a guard: each gets
			 * one here, or the reservation fails) */
			for (size_t j = 0; j < k; j++)
				if (madvise(iov[j].iov_base, page, CONCUR__MADV_GUARD_INSTALL))
					goto fail_unmap;
		}
	}
	r->mprotect = mprot;
	r->cls = c;
	r->nslots = n;
	r->page_used = (uint8_t *)&r->free[n];
	c->nres++;
	concur__list_push(&c->avail, r);
	concur__stat_inc(&loop->st.stack_maps, 1);
	return r;
fail_unmap:
	if (!concur__unmap(r->map, r->size)) {
		free(r); /* still mapped (the map count refused the split), and counted */
		return NULL;
	}
fail:
	atomic_fetch_sub(&concur__maps_used, r->maps);
	free(r);
	return NULL;
}

static void concur__res_unmap(struct concur__loop *loop, struct concur__stack_res *r)
{
	struct concur__stack_class *c = r->cls;
#ifdef CONCUR__ASAN
	/* ASan keeps the poison of dead frames: clear it, or whatever the kernel maps here next
	 * (an io_uring ring, say) looks like a stack to it */
	__asan_unpoison_memory_region(r->slots, (size_t)r->carved * c->stride);
#endif
	/* unmapping it from between two others splits their mapping, which the map count may
	 * refuse: then it stays mapped, its pages given back, and counted (as a record chunk) */
	if (concur__unmap(r->map, r->size))
		atomic_fetch_sub(&concur__maps_used, r->maps);
	concur__list_unlink(r->full ? &c->full : &c->avail, r);
	c->nres--;
	concur__stat_inc(&loop->st.stack_maps, (uint64_t)-1);
	free(r);
}

/* Carve slot i of r for the first time: in mprotect mode, make its guard page now. */
static bool concur__slot_carve(struct concur__stack_res *r, unsigned i)
{
	struct concur__stack_class *c = r->cls;
	if (!r->mprotect || !c->guard)
		return true;
	if (!concur__maps_take(2)) /* the guard splits one mapping into three */
		return false;
	if (mprotect(r->slots + (size_t)i * c->stride, c->guard, PROT_NONE)) {
		atomic_fetch_sub(&concur__maps_used, 2);
		return false;
	}
	r->maps += 2;
	return true;
}

/* The newest free slot of r. */
static unsigned concur__slot_pop(struct concur__stack_class *c, struct concur__stack_res *r)
{
	unsigned i = r->free[--r->nfree];
	if (r->nfree < r->cold)
		r->cold = r->nfree; /* a released slot: fresh zero pages */
	else
		c->warm--;
	return i;
}

/*
 * A fiber that finished and passed the thread straight on (concur__fiber_main) cannot give its
 * stack back while still on it: it leaves it in loop->dead_fib. The next stack taken, the next
 * fiber to finish that way, or the loop's context once back, takes it from there -- never a
 * context on a tiny stack (those neither start nor finish tasks themselves).
 */
static void concur__fiber_reap(struct concur__loop *loop)
{
	struct concur__fiber *dead = loop->dead_fib;
	if (dead) {
		loop->dead_fib = NULL;
		concur__fiber_put(loop, dead);
	}
}

struct concur__fiber *concur__fiber_get(struct concur__loop *loop, struct concur__task *t)
{
	unsigned idx = (t->f.flags & CONCUR__TASK_STACK_MASK) >> CONCUR__TASK_STACK_SHIFT;
	struct concur__stack_class *c = loop->stacks.cls[idx];
	struct concur__fiber *dead = loop->dead_fib;
	if (dead) { /* still accounted as in use: of the same class, it is simply handed over */
		if (CONCUR__LIKELY(c && dead->res->cls == c)) {
			loop->dead_fib = NULL;
			return dead; /* concur__fiber_prepare and concur__ctl_start reset it */
		}
		concur__fiber_reap(loop);
	}
	if (CONCUR__UNLIKELY(!c) && !(c = concur__class_new(loop, idx)))
		return NULL;
	struct concur__stack_res *r = c->avail;
	if (!r && !(r = concur__res_new(loop, c)))
		return NULL;
	unsigned i;
	if (r->nfree) {
		i = concur__slot_pop(c, r);
	} else if (concur__slot_carve(r, r->carved)) {
		i = r->carved++;
		concur__stat_inc(&loop->st.stacks_mapped, 1);
	} else { /* out of mappings: a slot freed in another reservation will still do */
		while ((r = r->next) && !r->nfree)
			;
		if (!r)
			return NULL;
		i = concur__slot_pop(c, r);
	}
	r->used++;
	c->live++;
	if (c->per_page)
		r->page_used[i / c->per_page]++;
	if (!r->nfree && r->carved == r->nslots) {
		concur__list_unlink(&c->avail, r);
		concur__list_push(&c->full, r);
		r->full = true;
	}
	char *lo = r->slots + (size_t)i * c->stride + c->guard;
	char *top = r->slots + (size_t)(i + 1) * c->stride - concur__fiber_head();
	struct concur__fiber *fib = (struct concur__fiber *)top;
	/* the rest is set before the task runs (concur__fiber_prepare, concur__ctl_start), as for a
	 * stack handed over from loop->dead_fib */
	fib->res = r;
	fib->slot = i;
	fib->stack_lo = lo;
	fib->stack_size = (size_t)(top - lo);
	fib->canary = !c->guard;
	fib->tsan_fiber = NULL;
#if CONCUR__USE_UCONTEXT
	fib->uctx = top + sizeof(struct concur__fiber);
#else
	fib->uctx = NULL;
#endif
	return fib;
}

/* Give every warm free stack of the class back to the kernel; unmap empty reservations. */
static void concur__class_trim(struct concur__loop *loop, struct concur__stack_class *c)
{
	struct iovec iov[CONCUR__IOV_BATCH];
	size_t n = 0;
	uint64_t released = 0;
	struct concur__stack_res *r;
	while ((r = c->dirty)) {
		c->dirty = r->dirty_next;
		r->dirty = false;
		if (!r->used && c->nres > 1) {
			concur__res_unmap(loop, r);
			continue;
		}
		for (unsigned k = r->cold; k < r->nfree; k++) {
			unsigned i = r->free[k];
			char *lo;
			size_t len;
			if (c->per_page) { /* the page, once no slot of it is in use (then mark it)
				            */
				unsigned p = i / c->per_page;
				if (r->page_used[p])
					continue;
				r->page_used[p] = UINT8_MAX;
				lo = r->slots + (size_t)p * concur__page;
				len = concur__page;
			} else {
				lo = r->slots + (size_t)i * c->stride + c->guard;
				len = c->stride - c->guard;
			}
			released++;
			iov[n++] = (struct iovec){lo, len};
			if (n == CONCUR__IOV_BATCH) {
				concur__madvise_many(iov, n, MADV_DONTNEED);
				n = 0;
			}
		}
		if (c->per_page) /* unmark */
			for (unsigned k = r->cold; k < r->nfree; k++)
				if (r->page_used[r->free[k] / c->per_page] == UINT8_MAX)
					r->page_used[r->free[k] / c->per_page] = 0;
		r->cold = r->nfree;
	}
	concur__madvise_many(iov, n, MADV_DONTNEED);
	c->warm = 0;
	concur__stat_inc(&loop->st.stacks_released, released);
}

void concur__fiber_put(struct concur__loop *loop, struct concur__fiber *fib)
{
#ifdef CONCUR__TSAN
	if (fib->tsan_fiber) /* the record is rewritten when the slot is next used */
		__tsan_destroy_fiber(fib->tsan_fiber);
#endif
	struct concur__stack_res *r = fib->res;
	struct concur__stack_class *c = r->cls;
	unsigned i = fib->slot;
	if (r->full) {
		concur__list_unlink(&c->full, r);
		concur__list_push(&c->avail, r);
		r->full = false;
	}
	r->free[r->nfree++] = (uint16_t)i;
	if (!--r->used && c->nres > 1)
		loop->stacks.idle_trim = true;
	c->live--;
	if (c->per_page)
		r->page_used[i / c->per_page]--;
	if (!r->dirty) {
		r->dirty = true;
		r->dirty_next = c->dirty;
		c->dirty = r;
	}
	/* the mark follows the live stacks: a loop serving thousands of tasks that come and go
	 * reuses its warm stacks instead of faulting them in again after every trim */
	if (++c->warm > CONCUR__STACK_WARM_MAX && c->warm > c->live / 2)
		concur__class_trim(loop, c);
}

/* Room in the class's reservations that hold a live stack; *empty: is one of them empty? */
static size_t concur__class_room(const struct concur__stack_class *c, bool *empty)
{
	size_t room = 0;
	*empty = false;
	for (const struct concur__stack_res *r = c->avail; r; r = r->next) {
		room += r->used ? r->nslots : 0;
		*empty = *empty || !r->used;
	}
	for (const struct concur__stack_res *r = c->full; r; r = r->next)
		room += r->nslots;
	return room;
}

/*
 * A burst of tasks grows a class to several reservations, and the warm trim (concur__fiber_put)
 * leaves them mapped while at most CONCUR__STACK_WARM_MAX stacks are free: their address space
 * (and, with strict overcommit, their commit charge) stayed with this loop for good, where
 * another loop, or a later burst under RLIMIT_AS, could not have it. So when the loop goes to
 * sleep, a class that has an empty reservation gives it back (with its warm stacks, as the trim
 * does) once its other reservations have room for twice its live stacks: the margin keeps a loop
 * whose tasks come and go around a reservation's edge from mapping and unmapping it each time.
 * Once per sleep, and only after a reservation went empty: nothing when the loop is busy. And
 * once a second at most: a server idle between waves of requests (its listener parked, few live
 * stacks at each sleep) would otherwise map, carve, fault in and unmap a reservation for every
 * wave. A trim not due yet waits for a sleep after it is due (no wake of its own: an idle loop
 * stays idle, and a loop that bursts that often sleeps again soon).
 */
void concur__fiber_trim_idle(struct concur__loop *loop)
{
	int64_t now = concur__coarse_now_ns();
	if (now < loop->stacks.idle_trim_next)
		return; /* the flag stays set */
	loop->stacks.idle_trim = false;
	for (unsigned idx = 0; idx < CONCUR__STACK_CLASSES; idx++) {
		struct concur__stack_class *c = loop->stacks.cls[idx];
		if (!c || c->nres < 2 || (idx && c == loop->stacks.cls[0]))
			continue; /* (the default class may have two names) */
		bool empty;
		size_t room = concur__class_room(c, &empty);
		if (!empty)
			continue;
		if (2 * (size_t)c->live <= room) {
			concur__class_trim(loop, c); /* unmaps the empty ones, keeping one */
			loop->stacks.idle_trim_next = now + CONCUR__IDLE_TRIM_GAP_NS;
		} else {
			loop->stacks.idle_trim = true; /* still needed: look again later */
		}
	}
}

int concur__fiber_pool_init(struct concur__loop *loop)
{
#if CONCUR__USE_UCONTEXT
	/* the loop's own context, which every fiber switches back to: made before any task runs,
	 * so that no start can be left without it */
	loop->sched_uctx = malloc(sizeof(ucontext_t));
	if (!loop->sched_uctx) {
		concur__set_error("no memory for the loop's context");
		return -ENOMEM;
	}
#else
	(void)loop;
#endif
	return 0;
}

void concur__fiber_pool_free(struct concur__loop *loop)
{
	for (unsigned idx = 0; idx < CONCUR__STACK_CLASSES; idx++) {
		struct concur__stack_class *c = loop->stacks.cls[idx];
		if (!c)
			continue;
		for (unsigned j = idx; j < CONCUR__STACK_CLASSES; j++)
			if (loop->stacks.cls[j] == c) /* the default class may have two names */
				loop->stacks.cls[j] = NULL;
		while (c->avail)
			concur__res_unmap(loop, c->avail);
		while (c->full)
			concur__res_unmap(loop, c->full);
		free(c);
	}
#if CONCUR__USE_UCONTEXT
	free(loop->sched_uctx);
	loop->sched_uctx = NULL;
#endif
}

/* A tiny stack's canary was overwritten: memory is corrupt, stop before it spreads. Runs on
 * the overflowed stack itself, so no stdio: one write(2). */
static void __attribute__((noreturn, cold)) concur__stack_overflow(void)
{
	static const char msg[] = "concur: a task overflowed its stack (smaller than a page, no "
	                          "guard page): give it a larger concur_spawn_opts.stack_size\n";
	ssize_t r = write(2, msg, sizeof(msg) - 1);
	(void)r;
	abort();
}

/* Only a stack smaller than 16 KiB can have a canary: a full one is not even looked at (its
 * fiber record is a cache line the suspend would not touch otherwise). */
static inline void concur__stack_check(struct concur__task *t)
{
	if (CONCUR__UNLIKELY(!concur__task_stack_big(t)) && t->fib->canary &&
	    *(uint64_t *)t->fib->stack_lo != CONCUR__CANARY)
		concur__stack_overflow();
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
	fib->awaiter = NULL;
#ifdef CONCUR__ASAN
	__asan_unpoison_memory_region(fib->stack_lo, fib->stack_size); /* frames of the last task */
#endif
	if (fib->canary)
		*(uint64_t *)fib->stack_lo = CONCUR__CANARY;
#ifdef CONCUR__TSAN
	/* a fiber's entry never returns, so TSan's shadow call stack (64 Ki frames, not grown) for
	 * a reused stack gains the few frames a task leaves with every task: the TSan fiber is made
	 * anew every CONCUR__TSAN_TASKS tasks. Not for each task: making one clears a few hundred
	 * KB, which was most of the TSan tests' time. Reuse adds no ordering TSan would not see
	 * anyway: a switch (flags 0) orders the fiber with the loop thread. */
	if (!fib->tsan_fiber || ++fib->tsan_tasks == CONCUR__TSAN_TASKS) {
		if (fib->tsan_fiber)
			__tsan_destroy_fiber(fib->tsan_fiber);
		fib->tsan_fiber = __tsan_create_fiber(0);
		fib->tsan_tasks = 0;
	}
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
#if CONCUR__CTX_JUMPS
	void *sp = (void *)(top | CONCUR__SP_FRESH); /* entered by concur__ctx_enter */
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
	t->sp = sp;
#endif
}

/* Off a finished fiber, straight to the next one; the dying fiber's fake stack can go. */
static void __attribute__((noreturn))
concur__switch_final(struct concur__fiber *from, struct concur__task *to)
{
	void *gone; /* the saved stack pointer of a fiber that never runs again */
	concur__switch_to(&gone, from->uctx, to, true);
	__builtin_unreachable();
}

static void concur__fiber_main(struct concur__task *t)
{
	struct concur__loop *loop = t->loop;
#ifdef CONCUR__ASAN
	/* the loop's stack bounds, recorded on the first fiber entry of the loop: that one always
	 * comes from the loop's context (later ones may come from another fiber) */
	__sanitizer_finish_switch_fiber(NULL, loop->asan_stack_size ? NULL : &loop->asan_stack_lo,
	                                loop->asan_stack_size ? NULL : &loop->asan_stack_size);
#endif
	t->f.res = t->fn(t->arg);
	struct concur__fiber *fib = t->fib;
	concur__stack_check(t);
	if (!concur__task_stack_big(t) ||
	    atomic_load_explicit(&loop->stall_on, memory_order_relaxed)) {
		/* the loop's context finishes it: a tiny stack has no room for the callbacks, and a
		 * stall detector times each run on its own */
		t->f.flags |= CONCUR__TASK_RETURNED;
		concur__switch_out(loop, &t->sp, fib->uctx, true);
	}
	/* A full stack finishes the task here (its callbacks see the loop: no task runs) and
	 * hands the thread straight to the next fiber: one switch per finished task instead of
	 * two through the loop. The stack waits in loop->dead_fib until we are off it. */
	concur__tl_task = NULL;
	concur__loop_task_end(loop, t, false);
	struct concur__task *next = concur__loop_pop_direct(loop, fib, true);
	concur__fiber_reap(loop); /* an earlier dead one the start of next did not reuse */
	loop->dead_fib = fib;
	if (next) {
		concur__tl_task = next;
		concur__switch_final(fib, next);
	}
	void *gone;
	concur__switch_out(loop, &gone, fib->uctx, true);
	__builtin_unreachable();
}

struct concur__task *concur__fiber_run(struct concur__loop *loop, struct concur__task *t)
{
#ifdef CONCUR__TSAN
	if (!loop->tsan_fiber)
		loop->tsan_fiber = __tsan_get_current_fiber();
#endif
	concur__tl_task = t;
	concur__switch_in(loop, t);
	while (CONCUR__UNLIKELY(loop->call_fn)) { /* a task's call, then straight back to it */
		struct concur__task *caller = concur__tl_task;
		void (*fn)(void *) = loop->call_fn;
		loop->call_fn = NULL;
		concur__tl_task = NULL;
		fn(loop->call_arg);
		concur__tl_task = caller;
		concur__switch_in(loop, caller);
	}
	concur__fiber_reap(loop); /* a fiber that finished and passed the thread on */
	t = concur__tl_task;      /* not the one we switched to if it passed the thread on */
	concur__tl_task = NULL;
	return t;
}

/*
 * A task with a small stack (under 16 KiB, concur_spawn_ex) that completes a future (a promise
 * it sets, a cancel) would run the future's callbacks, anyone's code, on a stack sized for its
 * own calls only: below a page, with no guard. The loop's context runs them instead, on the
 * loop thread's stack, as it does those of a small stack's own end: t switches out (not
 * queued: nothing else runs meanwhile) and concur__fiber_run switches straight back to it.
 */
void concur__fiber_call_on_loop(struct concur__task *t, void (*fn)(void *), void *arg)
{
	struct concur__loop *loop = t->loop;
	loop->call_fn = fn;
	loop->call_arg = arg;
	concur__switch_out(loop, &t->sp, t->fib->uctx, false);
}

/*
 * Many ready fibers (a batch of I/O completions) are each a few cold cache lines of stack:
 * loading them one after another is a chain of misses at every switch, which was most of the
 * cost of await_nop with 128 tasks. The fiber after the next one gets its top frames fetched
 * while the next one runs.
 */
static inline void concur__fiber_prefetch(struct concur__task *t)
{
	const char *sp = t->sp;
	if (!sp)
		return; /* not started, or the ucontext fallback (which keeps no stack pointer) */
	for (int i = 0; i < 4; i++)
		__builtin_prefetch(sp + i * CONCUR__CACHELINE, 1);
}

/* t gives the thread to next, just taken off the ready queue (t itself: a yield with nobody
 * else ready, which goes on). Back here when t is resumed (whoever switched set tl_task). */
static inline void concur__suspend_to(struct concur__loop *loop, struct concur__task *t,
                                      struct concur__task *next)
{
	if (next == t)
		return;
	struct concur__node *after = loop->ready_head;
	if (after && after != &t->node) /* the one after: its stack is touched next */
		concur__fiber_prefetch(concur__task_of_node(after));
	concur__tl_task = next;
	concur__switch_direct(t, next);
}

/* t, running on the current thread's loop, gives the thread up: the general case. */
static __attribute__((noinline)) void concur__suspend_slow(struct concur__loop *loop,
                                                           struct concur__task *t)
{
	struct concur__fiber *fib = t->fib;
	concur__stack_check(t);
	if (!(t->f.flags & CONCUR__TASK_LIVE))
		concur__ctl_live(loop, t);
	/* Another fiber is ready: switch straight to it instead of through the loop's context.
	 * Each direct switch is charged to the loop's turn budget, so the loop still gets back to
	 * its inbox and I/O as often as before. With a stall detector set, every fiber runs from
	 * the loop, so each run is timed on its own. */
	concur__stat_inc(&loop->st.fibers_parked, 1);
	struct concur__task *next =
	    concur__loop_pop_direct(loop, concur__task_stack_big(t) ? t->fib : NULL, false);
	if (next) {
		concur__suspend_to(loop, t, next);
		return;
	}
	concur__switch_out(loop, &t->sp, fib->uctx, false);
}

/*
 * The common case inline, kept to what needs no callee-saved register (every call is a tail
 * call): t is CONCUR__TASK_QUICK_SUSPEND (it suspended before, so it is on the live list, and
 * has a full stack: no canary to check) and a started fiber is ready, within the turn's budget
 * (concur__loop_pop_direct with no host never starts a task). So a yield or an await costs the
 * switch's own saves and little more.
 */
static inline void concur__suspend_on(struct concur__loop *loop, struct concur__task *t)
{
	struct concur__task *next = NULL;
	if (CONCUR__LIKELY(loop->ready_head && (t->f.flags & CONCUR__TASK_QUICK_SUSPEND)))
		next = concur__loop_pop_direct(loop, NULL, false);
	if (CONCUR__UNLIKELY(!next)) {
		concur__suspend_slow(loop, t);
		return;
	}
	concur__stat_inc(&loop->st.fibers_parked, 1);
	concur__suspend_to(loop, t, next);
}

void concur__suspend(void)
{
	concur__suspend_on(concur__tl_loop, concur__tl_task);
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
	struct concur__loop *loop = concur__tl_loop; /* t's: not a load that waits for t */
	concur__loop_push_yielded(loop, t);          /* behind everything runnable now */
	concur__suspend_on(loop, t);
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
	concur__resume(t);    /* the fibers' funnel (on t's loop: its ready queue) */
	return true;
}

static bool concur__await_here_interrupt(struct concur__loop *loop, struct concur__task *t,
                                         void *arg)
{
	concur_future *f = arg;
	if (!f->cls->await_undo(f, t))
		return false; /* completed first: the completion resumes us */
	concur__resume(t);
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
	if (f->cls->await_here && f->cls->await_here(f, t)) {
		err = concur__suspend_interruptible(t, concur__await_here_interrupt, f);
	} else {
		/* on the fiber's stack: complete() is done with the node once it has resumed us */
		struct concur__await a = {.w = {.kind = CONCUR__WAIT_AWAIT, .task = t}, .f = f};
		if (concur__waiter_push(f, &a.w))
			err = concur__suspend_interruptible(t, concur__await_interrupt, &a);
	}
	if (timeout_ns >= 0)
		concur__ctl_wait_deadline(t, INT64_MAX);
	return err ? err : concur__future_value(f);
}

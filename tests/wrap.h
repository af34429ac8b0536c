/* SPDX-License-Identifier: MIT */
/*
 * Link-time wrappers for the reliability tests (test_stress, test_fault): a live-allocation
 * counter and fault injection, with no change to src/. tests/CMakeLists.txt links those tests
 * against the static libconcur with -Wl,--wrap=SYM for each symbol below, so every call the
 * library's objects (and the test's own) make to SYM lands in __wrap_SYM, which may fail it and
 * otherwise calls the real one. Calls made inside shared libraries (libc's own, liburing's
 * internal ones, cmocka) are not redirected: only what concur itself calls is counted or failed.
 *
 * Counting: wrap_live is the number of malloc/calloc/aligned_alloc blocks not yet freed, so a
 * test can check that everything concur allocated for a workload is gone once the executor is
 * freed -- in every build, not only under LeakSanitizer.
 *
 * Faults: while armed, the Nth call (counting from 0 since arming) of one kind fails, or every
 * call from the Nth on (WRAP_FROM); a failed call returns what the real one returns when it runs
 * out (NULL + ENOMEM, MAP_FAILED, EAGAIN, -ENOMEM, ...). Include in exactly one file.
 */
#ifndef CONCUR_TEST_WRAP_H
#define CONCUR_TEST_WRAP_H

#include <errno.h>
#include "concur.h"
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/mman.h>

enum wrap_kind {
	WRAP_MALLOC, /* malloc, calloc, aligned_alloc: one kind, memory */
	WRAP_MMAP,
	WRAP_THREAD,     /* pthread_create */
	WRAP_RING_SETUP, /* io_uring_queue_init(_params), io_uring_register_buf_ring */
	WRAP_SUBMIT,     /* io_uring_submit, io_uring_submit_and_wait, _and_get_events */
	WRAP_MUNMAP,     /* (a split mapping at the map count's limit) */
	WRAP_KINDS,
};

static const char *const wrap_kind_name[WRAP_KINDS] = {"malloc",     "mmap",   "pthread_create",
                                                       "ring_setup", "submit", "munmap"};

enum wrap_mode {
	WRAP_ONE,   /* only the Nth call fails */
	WRAP_FROM,  /* the Nth call and every later one fail */
	WRAP_BURST, /* calls N .. N+WRAP_BURST_LEN-1 fail (a transient shortage) */
};
#define WRAP_BURST_LEN 64

static atomic_long wrap_live;                  /* live heap blocks */
static atomic_long wrap_calls[WRAP_KINDS];     /* calls of each kind since the last arm */
static atomic_long wrap_failed[WRAP_KINDS];    /* calls failed since the last arm */
static atomic_int wrap_armed_kind = -1;        /* -1: nothing fails */
static uintptr_t wrap_spare_lo, wrap_spare_hi; /* calls from code in [lo, hi) never fail */
static long wrap_at;                           /* N */
/* Called with each block concur frees, before it is freed: a test holds a thread there to force
 * an order (test_blocking). */
static void (*_Atomic wrap_free_hook)(void *p);
/* Called after each pthread_mutex_unlock concur makes: a test holds a thread there (test_fault:
 * a poster that has rung a loop and let go of the doorbell's lock). */
static void (*_Atomic wrap_unlocked_hook)(pthread_mutex_t *m);
/* Called after each concur_promise_set concur makes (test_fault: a waker held just after it
 * woke a waiter). */
static void (*_Atomic wrap_promise_set_hook)(void);
/* Called at each calloc concur makes, before it allocates (test_blocking: a spawner held
 * between its checks and its work). */
static void (*_Atomic wrap_calloc_hook)(void);
/* Called at each malloc concur makes, before it allocates (test_fault: a canceller held between
 * its request and its message). */
static void (*_Atomic wrap_malloc_hook)(void);
/* Called at each submit concur makes, before it submits (test_fault: a message's SQE rewritten
 * so that the kernel refuses it). */
static void (*_Atomic wrap_submit_hook)(struct io_uring *ring);
static int wrap_mode;

/* Arm kind to fail at call n (counted from now) in mode; counters restart. */
static inline void wrap_arm(int kind, long n, int mode)
{
	for (int k = 0; k < WRAP_KINDS; k++) {
		atomic_store(&wrap_calls[k], 0);
		atomic_store(&wrap_failed[k], 0);
	}
	wrap_at = n;
	wrap_mode = mode;
	atomic_store(&wrap_armed_kind, kind);
}

/* Stop failing (the counters keep counting). */
static inline void wrap_disarm(void)
{
	atomic_store(&wrap_armed_kind, -1);
}

/* Called at each injected failure: a place for a debugger's breakpoint. */
__attribute__((noinline)) void wrap_injected(int kind);
__attribute__((noinline)) void wrap_injected(int kind)
{
	__asm__ volatile("" ::"r"(kind) : "memory");
}

#define wrap_fail(kind) wrap_fail_from(kind, (uintptr_t)__builtin_return_address(0))

static inline int wrap_fail_from(int kind, uintptr_t caller)
{
	long n = atomic_fetch_add_explicit(&wrap_calls[kind], 1, memory_order_relaxed);
	if (atomic_load_explicit(&wrap_armed_kind, memory_order_acquire) != kind)
		return 0;
	if (n < wrap_at || (wrap_mode == WRAP_ONE && n != wrap_at) ||
	    (wrap_mode == WRAP_BURST && n >= wrap_at + WRAP_BURST_LEN))
		return 0;
	if (caller - wrap_spare_lo < wrap_spare_hi - wrap_spare_lo)
		return 0;
	atomic_fetch_add_explicit(&wrap_failed[kind], 1, memory_order_relaxed);
	wrap_injected(kind);
	return 1;
}

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_aligned_alloc(size_t align, size_t n);
void *__real_realloc(void *p, size_t n);
void __real_free(void *p);
void *__real_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
int __real_munmap(void *addr, size_t len);
int __real_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg);
int __real_io_uring_queue_init_params(unsigned entries, struct io_uring *ring,
                                      struct io_uring_params *p);
int __real_io_uring_queue_init(unsigned entries, struct io_uring *ring, unsigned flags);
int __real_io_uring_register_buf_ring(struct io_uring *ring, struct io_uring_buf_reg *reg,
                                      unsigned flags);
int __real_io_uring_submit(struct io_uring *ring);
int __real_io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
int __real_io_uring_submit_and_get_events(struct io_uring *ring);
int __real_pthread_mutex_unlock(pthread_mutex_t *m);
int __wrap_pthread_mutex_unlock(pthread_mutex_t *m);
int __real_concur_promise_set(concur_future *f, int64_t res);
int __wrap_concur_promise_set(concur_future *f, int64_t res);

void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t n, size_t size);
void *__wrap_aligned_alloc(size_t align, size_t n);
void *__wrap_realloc(void *p, size_t n);
void __wrap_free(void *p);
void *__wrap_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
int __wrap_munmap(void *addr, size_t len);
int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg);
int __wrap_io_uring_queue_init_params(unsigned entries, struct io_uring *ring,
                                      struct io_uring_params *p);
int __wrap_io_uring_queue_init(unsigned entries, struct io_uring *ring, unsigned flags);
int __wrap_io_uring_register_buf_ring(struct io_uring *ring, struct io_uring_buf_reg *reg,
                                      unsigned flags);
int __wrap_io_uring_submit(struct io_uring *ring);
int __wrap_io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr);
int __wrap_io_uring_submit_and_get_events(struct io_uring *ring);

static inline void *wrap_counted(void *p)
{
	if (p)
		atomic_fetch_add_explicit(&wrap_live, 1, memory_order_relaxed);
	return p;
}

void *__wrap_malloc(size_t n)
{
	void (*hook)(void) = atomic_load(&wrap_malloc_hook);
	if (hook)
		hook();
	if (wrap_fail(WRAP_MALLOC)) {
		errno = ENOMEM;
		return NULL;
	}
	return wrap_counted(__real_malloc(n));
}

void *__wrap_calloc(size_t n, size_t size)
{
	void (*hook)(void) = atomic_load(&wrap_calloc_hook);
	if (hook)
		hook();
	if (wrap_fail(WRAP_MALLOC)) {
		errno = ENOMEM;
		return NULL;
	}
	return wrap_counted(__real_calloc(n, size));
}

void *__wrap_aligned_alloc(size_t align, size_t n)
{
	if (wrap_fail(WRAP_MALLOC)) {
		errno = ENOMEM;
		return NULL;
	}
	return wrap_counted(__real_aligned_alloc(align, n));
}

/* realloc(NULL, n) is an allocation, realloc(p, 0) a free; a failed one keeps p. */
void *__wrap_realloc(void *p, size_t n)
{
	if (wrap_fail(WRAP_MALLOC)) {
		errno = ENOMEM;
		return NULL;
	}
	void *q = __real_realloc(p, n);
	if (!p)
		return wrap_counted(q);
	if (!q && !n)
		atomic_fetch_sub_explicit(&wrap_live, 1, memory_order_relaxed);
	return q;
}

void __wrap_free(void *p)
{
	void (*hook)(void *) = atomic_load(&wrap_free_hook);
	if (hook && p)
		hook(p);
	if (p)
		atomic_fetch_sub_explicit(&wrap_live, 1, memory_order_relaxed);
	__real_free(p);
}

int __wrap_concur_promise_set(concur_future *f, int64_t res)
{
	int r = __real_concur_promise_set(f, res);
	void (*hook)(void) = atomic_load(&wrap_promise_set_hook);
	if (hook)
		hook();
	return r;
}

int __wrap_pthread_mutex_unlock(pthread_mutex_t *m)
{
	int r = __real_pthread_mutex_unlock(m);
	void (*hook)(pthread_mutex_t *) = atomic_load(&wrap_unlocked_hook);
	if (hook)
		hook(m);
	return r;
}

void *__wrap_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	if (wrap_fail(WRAP_MMAP)) {
		errno = ENOMEM;
		return MAP_FAILED;
	}
	return __real_mmap(addr, len, prot, flags, fd, off);
}

int __wrap_munmap(void *addr, size_t len)
{
	if (wrap_fail(WRAP_MUNMAP)) {
		errno = ENOMEM;
		return -1;
	}
	return __real_munmap(addr, len);
}

int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg)
{
	return wrap_fail(WRAP_THREAD) ? EAGAIN : __real_pthread_create(t, a, fn, arg);
}

int __wrap_io_uring_queue_init_params(unsigned entries, struct io_uring *ring,
                                      struct io_uring_params *p)
{
	return wrap_fail(WRAP_RING_SETUP) ? -ENOMEM
	                                  : __real_io_uring_queue_init_params(entries, ring, p);
}

int __wrap_io_uring_queue_init(unsigned entries, struct io_uring *ring, unsigned flags)
{
	return wrap_fail(WRAP_RING_SETUP) ? -EMFILE
	                                  : __real_io_uring_queue_init(entries, ring, flags);
}

int __wrap_io_uring_register_buf_ring(struct io_uring *ring, struct io_uring_buf_reg *reg,
                                      unsigned flags)
{
	return wrap_fail(WRAP_RING_SETUP) ? -ENOMEM
	                                  : __real_io_uring_register_buf_ring(ring, reg, flags);
}

static inline void wrap_before_submit(struct io_uring *ring)
{
	void (*hook)(struct io_uring *) = atomic_load(&wrap_submit_hook);
	if (hook)
		hook(ring);
}

/* A failed submit submits nothing (its SQEs stay queued), as -EAGAIN/-EBUSY from the kernel. */
int __wrap_io_uring_submit(struct io_uring *ring)
{
	wrap_before_submit(ring);
	return wrap_fail(WRAP_SUBMIT) ? -EAGAIN : __real_io_uring_submit(ring);
}

int __wrap_io_uring_submit_and_wait(struct io_uring *ring, unsigned wait_nr)
{
	wrap_before_submit(ring);
	return wrap_fail(WRAP_SUBMIT) ? -EBUSY : __real_io_uring_submit_and_wait(ring, wait_nr);
}

int __wrap_io_uring_submit_and_get_events(struct io_uring *ring)
{
	wrap_before_submit(ring);
	return wrap_fail(WRAP_SUBMIT) ? -EAGAIN : __real_io_uring_submit_and_get_events(ring);
}

#endif

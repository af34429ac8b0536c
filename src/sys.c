/* SPDX-License-Identifier: MIT */
/*
 * The syscall layer: the clock, the futex, memory (prefaulting, aligned mappings), the CPUs a
 * thread may run on, the locks held across fork(), and the thread's error message. Everything
 * above (futures, loops, compositions) sleeps, wakes and tells time through these few functions,
 * and they call nothing of concur's.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "internal.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* ---- time and futex helpers --------------------------------------------------------------- */

int64_t concur__now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return CONCUR__TS_TO_NS(&ts);
}

/* Saturates: a timeout near INT64_MAX means "practically forever", never an overflow. */
int64_t concur__after_ns(int64_t timeout_ns)
{
	int64_t now = concur__now_ns();
	return timeout_ns > INT64_MAX - now ? INT64_MAX : now + timeout_ns;
}

void concur__deadline(struct timespec *abs, int64_t timeout_ns)
{
	CONCUR__NS_TO_TS(abs, concur__after_ns(timeout_ns));
}

/* Sleep while *word == val, until abs_mono (CLOCK_MONOTONIC; NULL: forever). 0 or -errno. */
int concur__futex_wait(_Atomic uint32_t *word, uint32_t val, const struct timespec *abs_mono)
{
	long r = syscall(SYS_futex, word, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, val, abs_mono,
	                 NULL, FUTEX_BITSET_MATCH_ANY);
	return r < 0 ? -errno : 0;
}

void concur__futex_wake(_Atomic uint32_t *word, int n)
{
	syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

/* ---- memory -------------------------------------------------------------------------------- */

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14; liburing's and older libc headers lack it */
#endif

void concur__prefault(void *p, size_t len)
{
	static _Atomic bool unsupported;
	if (atomic_load_explicit(&unsupported, memory_order_relaxed))
		return;
	/* EINVAL: a kernel without it. ENOMEM and the like: the faults will say so, one by one */
	if (madvise(p, len, MADV_POPULATE_WRITE) && errno == EINVAL)
		atomic_store_explicit(&unsupported, true, memory_order_relaxed);
}

void *concur__map_aligned(size_t len, size_t align)
{
	/* Mappings tend to be placed right below the last one: after an aligned one of a length
	 * that is a multiple of align, the next is aligned too, and joins it in one VMA. */
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	if ((uintptr_t)p & (align - 1)) {
		munmap(p, len);
		/* room to align the start, and the ends past the aligned part back (a failed
		 * munmap only leaves them mapped) */
		size_t span = len + align;
		p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			return NULL;
		char *start = (char *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
		if (start > p)
			munmap(p, (size_t)(start - p));
		if (p + span > start + len)
			munmap(start + len, (size_t)(p + span - (start + len)));
		p = start;
	}
	concur__prefault(p, len);
	return p;
}

bool concur__unmap(void *p, size_t len)
{
	if (munmap(p, len) == 0)
		return true;
	madvise(p, len, MADV_DONTNEED); /* still mapped: its pages go back all the same */
	return false;
}

/* ---- errors -------------------------------------------------------------------------------- */

/*
 * This thread's message lives on the heap from its first error on: the library's thread-locals
 * are static TLS (initial-exec, internal.h), which a dlopen() takes from glibc's small surplus,
 * so a 256-byte buffer there would be most of what the library asks for. A key's destructor
 * frees it when the thread exits. Without memory for it the message is dropped, nothing else.
 */
#define CONCUR__ERRBUF_SIZE 256
static CONCUR__TLS_HOT char *concur__errbuf;
static pthread_key_t concur__errbuf_key;
static pthread_once_t concur__errbuf_once = PTHREAD_ONCE_INIT;

static void concur__errbuf_free(void *buf)
{
	concur__errbuf = NULL; /* a later destructor's error gets a new one (freed by a re-run) */
	free(buf);
}

static void concur__errbuf_key_init(void)
{
	pthread_key_create(&concur__errbuf_key, concur__errbuf_free);
}

void concur__set_error(const char *fmt, ...)
{
	if (!concur__errbuf) {
		pthread_once(&concur__errbuf_once, concur__errbuf_key_init);
		char *buf = malloc(CONCUR__ERRBUF_SIZE);
		if (!buf)
			return;
		if (pthread_setspecific(concur__errbuf_key, buf)) {
			free(buf);
			return;
		}
		concur__errbuf = buf;
	}
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(concur__errbuf, CONCUR__ERRBUF_SIZE, fmt, ap);
	va_end(ap);
}

const char *concur_last_error(void)
{
	return concur__errbuf ? concur__errbuf : "";
}

const char *concur_strerror(int64_t err)
{
	if (err >= 0)
		return "Success";
	if (err < -4095)
		return "Unknown error";
	const char *s = strerrordesc_np((int)-err);
	return s ? s : "Unknown error";
}

/* ---- fork(): the process-wide locks --------------------------------------------------------- */

/* The executors' registry, the posters' list, the stall detectors' table, the blocking pool:
 * each taken briefly, never two at once, by user threads and loop threads alike. A fork while
 * one was held left it held for good in the child, whose first concur_exec_new (or post, or
 * detector) then hung; and what they guard may name threads the child does not have. */
#define CONCUR__FORK_LOCKS 8
static struct {
	pthread_mutex_t *lock;
	void (*child)(void);
} concur__fork_locks[CONCUR__FORK_LOCKS];
static unsigned concur__fork_nlocks;
static pthread_mutex_t concur__fork_lock = PTHREAD_MUTEX_INITIALIZER; /* the table */
static pthread_once_t concur__fork_once = PTHREAD_ONCE_INIT;

static void concur__fork_prepare(void)
{
	pthread_mutex_lock(&concur__fork_lock);
	for (unsigned i = 0; i < concur__fork_nlocks; i++)
		pthread_mutex_lock(concur__fork_locks[i].lock);
}

static void concur__fork_parent(void)
{
	for (unsigned i = concur__fork_nlocks; i-- > 0;)
		pthread_mutex_unlock(concur__fork_locks[i].lock);
	pthread_mutex_unlock(&concur__fork_lock);
}

/* The child's one thread is the one that took them: it lets them go, as the parent does, then
 * each owner puts right what named the threads the child does not have. */
static void concur__fork_child(void)
{
	concur__fork_parent();
	for (unsigned i = 0; i < concur__fork_nlocks; i++)
		if (concur__fork_locks[i].child)
			concur__fork_locks[i].child();
}

static void concur__fork_init(void)
{
	pthread_atfork(concur__fork_prepare, concur__fork_parent, concur__fork_child);
}

void concur__fork_guard(pthread_mutex_t *m, void (*child)(void))
{
	pthread_once(&concur__fork_once, concur__fork_init);
	pthread_mutex_lock(&concur__fork_lock);
	bool listed = false;
	for (unsigned i = 0; i < concur__fork_nlocks; i++)
		listed = listed || concur__fork_locks[i].lock == m;
	if (!listed && concur__fork_nlocks < CONCUR__FORK_LOCKS) /* 4 owners: room to spare */
		concur__fork_locks[concur__fork_nlocks++] =
		    (typeof(concur__fork_locks[0])){m, child};
	pthread_mutex_unlock(&concur__fork_lock);
}

/* ---- CPUs --------------------------------------------------------------------------------- */

/* The kernel refuses a mask shorter than its CPU ids (EINVAL): a cpu_set_t's 1024 fall short on
 * a machine with more, so the set grows until the kernel takes it. */
static cpu_set_t *concur__cpus_allowed(size_t *size)
{
	for (size_t ncpus = CPU_SETSIZE; ncpus <= ((size_t)1 << 22); ncpus *= 2) {
		cpu_set_t *set = CPU_ALLOC(ncpus);
		if (!set)
			return NULL;
		*size = CPU_ALLOC_SIZE(ncpus);
		if (sched_getaffinity(0, *size, set) == 0)
			return set;
		int err = errno;
		CPU_FREE(set);
		if (err != EINVAL)
			return NULL;
	}
	return NULL;
}

int concur__cpus_allowed_count(void)
{
	size_t size;
	cpu_set_t *set = concur__cpus_allowed(&size);
	if (!set)
		return -1;
	int n = CPU_COUNT_S(size, set);
	CPU_FREE(set);
	return n;
}

int concur__pin_to_allowed(unsigned k)
{
	size_t size;
	cpu_set_t *set = concur__cpus_allowed(&size);
	if (!set)
		return -errno;
	int n = CPU_COUNT_S(size, set), err = -EINVAL;
	k %= (unsigned)(n > 0 ? n : 1);
	for (size_t c = 0; n > 0 && c < size * 8; c++) {
		if (!CPU_ISSET_S(c, size, set) || k--)
			continue;
		CPU_ZERO_S(size, set);
		CPU_SET_S(c, size, set);
		err = sched_setaffinity(0, size, set) ? -errno : 0;
		break;
	}
	CPU_FREE(set);
	return err;
}

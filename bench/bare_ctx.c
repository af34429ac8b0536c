/* SPDX-License-Identifier: MIT */
#include "bare_ctx.h"
#include "common.h"

#include <stdint.h>
#include <sys/mman.h>

#if defined(__x86_64__)
void bare_ctx_entry(void);

void bare_ctx_make(struct bare_ctx *c, void *stack, size_t size, void (*fn)(void *), void *arg)
{
	/* The top is 16-byte aligned, so fn is entered with rsp + 8 aligned, as the ABI wants. */
	uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
	void **sp = (void **)top;
	*--sp = NULL;                   /* padding: keeps the entry's stack aligned */
	*--sp = (void *)bare_ctx_entry; /* popped into rcx, then jumped to */
	*--sp = NULL;                   /* rbp */
	*--sp = NULL;                   /* rbx */
	*--sp = (void *)fn;             /* r12 */
	*--sp = arg;                    /* r13 */
	*--sp = NULL;                   /* r14 */
	*--sp = NULL;                   /* r15 */
	c->sp = sp;
}
#else
void bare_ctx_make(struct bare_ctx *c, void *stack, size_t size, void (*fn)(void *), void *arg)
{
	getcontext(&c->uc);
	c->uc.uc_stack.ss_sp = stack;
	c->uc.uc_stack.ss_size = size;
	c->uc.uc_link = NULL;
	makecontext(&c->uc, (void (*)(void))fn, 1, arg); /* pointer in an int: fine on LP64 glibc */
}
#endif

void bare_pool_init(struct bare_stack_pool *p, size_t stack_size)
{
	long page = sysconf(_SC_PAGESIZE);
	p->size = (stack_size + (size_t)page - 1) & ~((size_t)page - 1);
	p->free = NULL;
	p->nfree = p->cap = 0;
}

void *bare_pool_get(struct bare_stack_pool *p)
{
	if (p->nfree)
		return p->free[--p->nfree];
	long page = sysconf(_SC_PAGESIZE);
	char *m = mmap(NULL, p->size + (size_t)page, PROT_READ | PROT_WRITE,
	               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (m == MAP_FAILED)
		bench_die("mmap stack: %s", strerror(errno));
	if (mprotect(m, (size_t)page, PROT_NONE) < 0)
		bench_die("mprotect guard: %s", strerror(errno));
	return m + page;
}

void bare_pool_put(struct bare_stack_pool *p, void *stack)
{
	if (p->nfree == p->cap) {
		p->cap = p->cap ? 2 * p->cap : 16;
		p->free = realloc(p->free, p->cap * sizeof(*p->free));
		if (!p->free)
			bench_die("out of memory");
	}
	p->free[p->nfree++] = stack;
}

void bare_pool_destroy(struct bare_stack_pool *p)
{
	long page = sysconf(_SC_PAGESIZE);
	for (size_t i = 0; i < p->nfree; i++)
		munmap((char *)p->free[i] - page, p->size + (size_t)page);
	free(p->free);
	p->free = NULL;
	p->nfree = p->cap = 0;
}

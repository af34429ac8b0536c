/* SPDX-License-Identifier: MIT */
/*
 * The floor the fiber benchmarks are measured against: a minimal context switch and a pooled
 * mmap()ed stack, with nothing else (no scheduler, no futures, no queue).
 *
 * x86-64: bare_switch_x86_64.S saves the six callee-saved registers, swaps stack pointers and
 * ends with an indirect jmp (not ret). Elsewhere the same calls fall back to ucontext (slow:
 * swapcontext makes a sigprocmask syscall), and the results say so ("impl": "ucontext").
 */
#ifndef BENCH_BARE_CTX_H
#define BENCH_BARE_CTX_H

#include <stddef.h>

#if defined(__x86_64__)
#define BARE_CTX_IMPL "asm-x86_64"
struct bare_ctx {
	void *sp;
};
/* Save the current context in *from and resume *to. */
void bare_switch(struct bare_ctx *from, struct bare_ctx *to);
#else
#include <ucontext.h>
#define BARE_CTX_IMPL "ucontext"
struct bare_ctx {
	ucontext_t uc;
};
static inline void bare_switch(struct bare_ctx *from, struct bare_ctx *to)
{
	swapcontext(&from->uc, &to->uc);
}
#endif

/* Prepare *c to run fn(arg) on [stack, stack + size). fn must never return: it switches away. */
void bare_ctx_make(struct bare_ctx *c, void *stack, size_t size, void (*fn)(void *), void *arg);

/* A pool of mmap()ed stacks, each with a guard page below it. */
struct bare_stack_pool {
	void **free;
	size_t nfree, cap, size;
};
void bare_pool_init(struct bare_stack_pool *p, size_t stack_size);
void *bare_pool_get(struct bare_stack_pool *p); /* the stack's lowest usable address */
void bare_pool_put(struct bare_stack_pool *p, void *stack);
void bare_pool_destroy(struct bare_stack_pool *p);

#endif /* BENCH_BARE_CTX_H */

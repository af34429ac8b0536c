/* SPDX-License-Identifier: MIT */
/*
 * Standalone check of the assembly context switch (src/fiber_<cpu>.S) and of the initial frame
 * concur__fiber_prepare() builds, without the rest of the library (no liburing): compiled
 * together with the .S only, so it also runs under qemu-user for another CPU. Not a ctest test;
 * tests/cross_check.sh builds and runs it.
 *
 * Three contexts: the main one and two fibers A and B, each round main -> A -> B -> main (A to B
 * is a direct fiber-to-fiber switch, as in concur__suspend()). Checked:
 *  - each fiber's entry gets its task pointer, with a 16-byte aligned stack, a terminated frame
 *    chain and concur__ctx_start as its return address (aarch64), or a null one (x86-64, where
 *    concur__ctx_enter starts a fiber: each is entered once, and comes back, before the rounds);
 *  - a finished fiber's last switch: concur__ctx_jump on x86-64;
 *  - every callee-saved register (x19-x30 and d8-d15 on aarch64; rbx rbp r12-r15 on x86-64) is
 *    set to a per-context pattern right before a switch and read back right after it, in asm;
 *  - many integers and doubles the compiler keeps live across an opaque switch call;
 *  - aligned locals (long double, a 16-byte vector) and deep recursion on the fiber stack.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

void concur__ctx_switch(void **save_sp, void *load_sp);
#if defined(__x86_64__)
struct task;
void concur__ctx_enter(void **save_sp, void *top, struct task *t, void (*entry)(struct task *));
#else
void concur__ctx_start(void);
#endif

#define ROUNDS     20000
#define STACK_SIZE (256 * 1024)
#define TASK_MAGIC 0x7461736b5f6f6bULL

struct fiber {
	void *sp;
	void *map;
	size_t map_size;
	void *stack_lo;
	size_t stack_size;
};

struct task {
	uint64_t magic;
	struct task *self;
	int id;
	struct fiber *fib;
	int entered;
};

static void *main_sp;
static struct fiber fib_a, fib_b;
static struct task task_a, task_b;
static int failures;
static unsigned long switches;
static int trace[4], trace_len; /* who ran this round, in order */

#define CHECK(cond, ...)                                                                           \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			if (failures++ < 20) {                                                     \
				fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);    \
				fprintf(stderr, __VA_ARGS__);                                      \
				fputc('\n', stderr);                                               \
			}                                                                          \
		}                                                                                  \
	} while (0)

/* ---- the stack and the initial frame, as src/fiber.c builds them --------------------------- */

static void fiber_map(struct fiber *fib)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t map_size = STACK_SIZE + page;
	void *map = mmap(NULL, map_size, PROT_READ | PROT_WRITE,
	                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
	if (map == MAP_FAILED || mprotect(map, page, PROT_NONE) != 0) {
		perror("mmap");
		exit(2);
	}
	fib->map = map;
	fib->map_size = map_size;
	fib->stack_lo = (char *)map + page;
	/* fiber.c keeps its record at the top of the mapping: leave 64 bytes there too */
	fib->stack_size = map_size - page - 64;
}

/* Keep in step with concur__fiber_prepare(); entry stands for concur__fiber_main. */
static void fiber_prepare(struct fiber *fib, struct task *t, void (*entry)(struct task *))
{
	uintptr_t top = ((uintptr_t)fib->stack_lo + fib->stack_size) & ~(uintptr_t)15;
#if defined(__x86_64__)
	/* the top, entered by concur__ctx_enter (main, before the rounds) */
	void *sp = (void *)top;
	(void)t;
	(void)entry;
#elif defined(__aarch64__)
	/* x19..x30 at 0..95, d8..d15 at 96..159 */
	uintptr_t *sp = (uintptr_t *)(top - 176);
	memset(sp, 0, 176);
	sp[0] = (uintptr_t)t;                  /* x19 */
	sp[1] = (uintptr_t)entry;              /* x20 */
	sp[11] = (uintptr_t)concur__ctx_start; /* x30 */
#else
#error "no assembly context switch for this CPU"
#endif
	fib->sp = sp;
}

/* ---- a switch with every callee-saved register set to a pattern, checked in asm ------------- */

#if defined(__aarch64__)
#define NREGS 19 /* x19..x29 and d8..d15; x30 is the return address the switch uses */
#elif defined(__x86_64__)
#define NREGS 6 /* rbx rbp r12 r13 r14 r15 */
#endif

struct regcheck {
	uint64_t seed;
	uint64_t got[NREGS];
};

static uint64_t pattern(uint64_t seed, int i)
{
#if defined(__aarch64__)
	return seed + 19 + (uint64_t)i; /* x19+i, then d8.. as bit patterns */
#else
	return seed + 1 + (uint64_t)i;
#endif
}

__attribute__((noinline)) static void switch_regs(void **save, void *load, uint64_t seed)
{
	struct regcheck rc = {.seed = seed};
#if defined(__aarch64__)
	register void **x0 asm("x0") = save;
	register void *x1 asm("x1") = load;
	register struct regcheck *x2 asm("x2") = &rc;
	/* x29 (the frame pointer) cannot be a clobber: saved and restored around the call */
	__asm__ volatile("stp	x29, x2, [sp, #-16]!\n\t"
	                 "ldr	x9, [x2]\n\t"
	                 "add	x19, x9, #19\n\t"
	                 "add	x20, x9, #20\n\t"
	                 "add	x21, x9, #21\n\t"
	                 "add	x22, x9, #22\n\t"
	                 "add	x23, x9, #23\n\t"
	                 "add	x24, x9, #24\n\t"
	                 "add	x25, x9, #25\n\t"
	                 "add	x26, x9, #26\n\t"
	                 "add	x27, x9, #27\n\t"
	                 "add	x28, x9, #28\n\t"
	                 "add	x29, x9, #29\n\t"
	                 "add	x10, x9, #30\n\tfmov	d8, x10\n\t"
	                 "add	x10, x9, #31\n\tfmov	d9, x10\n\t"
	                 "add	x10, x9, #32\n\tfmov	d10, x10\n\t"
	                 "add	x10, x9, #33\n\tfmov	d11, x10\n\t"
	                 "add	x10, x9, #34\n\tfmov	d12, x10\n\t"
	                 "add	x10, x9, #35\n\tfmov	d13, x10\n\t"
	                 "add	x10, x9, #36\n\tfmov	d14, x10\n\t"
	                 "add	x10, x9, #37\n\tfmov	d15, x10\n\t"
	                 "bl	concur__ctx_switch\n\t"
	                 "ldr	x9, [sp, #8]\n\t"
	                 "stp	x19, x20, [x9, #8]\n\t"
	                 "stp	x21, x22, [x9, #24]\n\t"
	                 "stp	x23, x24, [x9, #40]\n\t"
	                 "stp	x25, x26, [x9, #56]\n\t"
	                 "stp	x27, x28, [x9, #72]\n\t"
	                 "str	x29, [x9, #88]\n\t"
	                 "stp	d8, d9, [x9, #96]\n\t"
	                 "stp	d10, d11, [x9, #112]\n\t"
	                 "stp	d12, d13, [x9, #128]\n\t"
	                 "stp	d14, d15, [x9, #144]\n\t"
	                 "ldp	x29, x2, [sp], #16"
	                 : "+r"(x0), "+r"(x1), "+r"(x2)
	                 :
	                 : "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12", "x13",
	                   "x14", "x15", "x16", "x17", "x18", "x19", "x20", "x21", "x22", "x23",
	                   "x24", "x25", "x26", "x27", "x28", "x30", "v0", "v1", "v2", "v3", "v4",
	                   "v5", "v6", "v7", "v8", "v9", "v10", "v11", "v12", "v13", "v14", "v15",
	                   "v16", "v17", "v18", "v19", "v20", "v21", "v22", "v23", "v24", "v25",
	                   "v26", "v27", "v28", "v29", "v30", "v31", "memory", "cc");
#elif defined(__x86_64__)
	void **rdi = save;
	void *rsi = load;
	struct regcheck *rdx = &rc;
	/* rbp cannot be a clobber: saved and restored around the call. The stack is moved below
	 * the red zone and aligned to 16 for the call. */
	__asm__ volatile("leaq	-256(%%rsp), %%rax\n\t"
	                 "andq	$-16, %%rax\n\t"
	                 "movq	%%rsp, 8(%%rax)\n\t"
	                 "movq	%%rbp, 16(%%rax)\n\t"
	                 "movq	%%rdx, 24(%%rax)\n\t"
	                 "movq	%%rax, %%rsp\n\t"
	                 "movq	(%%rdx), %%rax\n\t"
	                 "leaq	1(%%rax), %%rbx\n\t"
	                 "leaq	2(%%rax), %%rbp\n\t"
	                 "leaq	3(%%rax), %%r12\n\t"
	                 "leaq	4(%%rax), %%r13\n\t"
	                 "leaq	5(%%rax), %%r14\n\t"
	                 "leaq	6(%%rax), %%r15\n\t"
	                 "callq	concur__ctx_switch\n\t"
	                 "movq	24(%%rsp), %%rax\n\t"
	                 "movq	%%rbx, 8(%%rax)\n\t"
	                 "movq	%%rbp, 16(%%rax)\n\t"
	                 "movq	%%r12, 24(%%rax)\n\t"
	                 "movq	%%r13, 32(%%rax)\n\t"
	                 "movq	%%r14, 40(%%rax)\n\t"
	                 "movq	%%r15, 48(%%rax)\n\t"
	                 "movq	%%rax, %%rdx\n\t"
	                 "movq	16(%%rsp), %%rbp\n\t"
	                 "movq	8(%%rsp), %%rsp"
	                 : "+D"(rdi), "+S"(rsi), "+d"(rdx)
	                 :
	                 : "rax", "rbx", "rcx", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
	                   "r15", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
	                   "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",
	                   "memory", "cc");
#endif
	switches++;
	for (int i = 0; i < NREGS; i++)
		CHECK(rc.got[i] == pattern(seed, i), "callee-saved register %d: %#llx, want %#llx",
		      i, (unsigned long long)rc.got[i], (unsigned long long)pattern(seed, i));
}

/* ---- a switch the compiler has to keep many values live across --------------------------- */

__attribute__((noinline)) static void switch_plain(void **save, void *load)
{
	concur__ctx_switch(save, load);
	switches++;
	__asm__ volatile("" ::: "memory");
}

/* Values live across the switch: the compiler keeps them in callee-saved registers. They are
 * loaded from volatile memory so that it cannot fold or rematerialize them. */
__attribute__((noinline)) static void switch_live(void **save, void *load, uint64_t seed)
{
	volatile uint64_t vi[10];
	volatile double vd[8];
	for (int k = 0; k < 10; k++)
		vi[k] = seed * (uint64_t)(k + 3) + (uint64_t)k;
	for (int k = 0; k < 8; k++)
		vd[k] = (double)(seed & 0xffffff) * (k + 0.5) + k;
	uint64_t i0 = vi[0], i1 = vi[1], i2 = vi[2], i3 = vi[3], i4 = vi[4], i5 = vi[5];
	uint64_t i6 = vi[6], i7 = vi[7], i8 = vi[8], i9 = vi[9];
	double f0 = vd[0], f1 = vd[1], f2 = vd[2], f3 = vd[3], f4 = vd[4], f5 = vd[5];
	double f6 = vd[6], f7 = vd[7];
	switch_plain(save, load);
	uint64_t isum = i0 + i1 * 3 + i2 * 5 + i3 * 7 + i4 * 11 + i5 * 13 + i6 * 17 + i7 * 19 +
	                i8 * 23 + i9 * 29;
	double fsum = f0 + f1 * 3 + f2 * 5 + f3 * 7 + f4 * 11 + f5 * 13 + f6 * 17 + f7 * 19;
	uint64_t iwant = vi[0] + vi[1] * 3 + vi[2] * 5 + vi[3] * 7 + vi[4] * 11 + vi[5] * 13 +
	                 vi[6] * 17 + vi[7] * 19 + vi[8] * 23 + vi[9] * 29;
	double fwant = vd[0] + vd[1] * 3 + vd[2] * 5 + vd[3] * 7 + vd[4] * 11 + vd[5] * 13 +
	               vd[6] * 17 + vd[7] * 19;
	CHECK(isum == iwant, "integers live across a switch: %llu, want %llu",
	      (unsigned long long)isum, (unsigned long long)iwant);
	CHECK(fsum == fwant, "doubles live across a switch: %g, want %g", fsum, fwant);
}

/* ---- the fibers --------------------------------------------------------------------------- */

typedef float v4f __attribute__((vector_size(16)));

__attribute__((noinline)) static void check_alignment(const char *where)
{
	CHECK(((uintptr_t)__builtin_frame_address(0) & 15) == 0, "%s: frame address %p", where,
	      __builtin_frame_address(0));
	volatile long double ld = 1.0L;
	volatile v4f v = {1, 2, 3, 4};
	_Alignas(16) char buf[32];
	__asm__ volatile("" : : "r"(buf) : "memory");
	CHECK(((uintptr_t)&ld & 15) == 0, "%s: long double at %p", where, (void *)&ld);
	CHECK(((uintptr_t)&v & 15) == 0, "%s: vector at %p", where, (void *)&v);
	CHECK(((uintptr_t)buf & 15) == 0, "%s: aligned buffer at %p", where, (void *)buf);
	ld = ld * 3.0L + 0.5L;
	v = v * v;
	CHECK(ld == 3.5L, "%s: long double arithmetic", where);
	CHECK(v[3] == 16.0f, "%s: vector arithmetic", where);
}

__attribute__((noinline)) static unsigned long recurse(int depth)
{
	volatile char pad[512];
	pad[0] = (char)depth;
	pad[511] = (char)depth;
	if (depth == 0)
		return pad[0];
	return recurse(depth - 1) + (unsigned char)pad[511];
}

static void run_rounds(struct task *t)
{
	struct fiber *self = t->fib;
	for (int r = 0; r < ROUNDS; r++) {
		trace[trace_len++] = t->id;
		if (r % 1000 == 0)
			check_alignment(t->id == 1 ? "fiber A" : "fiber B");
		/* A passes straight to B, B back to main */
		void *to = t->id == 1 ? fib_b.sp : main_sp;
		void **save = &self->sp;
		uint64_t seed = ((uint64_t)t->id << 40) + ((uint64_t)r << 8);
		if (t->id == 1) {
			if (r & 1)
				switch_regs(save, to, seed);
			else
				switch_live(save, to, seed);
		} else {
			if (r & 2)
				switch_regs(save, to, seed);
			else
				switch_live(save, to, seed);
		}
	}
	/* the last round: nobody resumes this fiber again */
	trace[trace_len++] = t->id;
#if defined(__x86_64__)
	__asm__ volatile("jmp concur__ctx_jump" : : "D"(t->id == 1 ? fib_b.sp : main_sp) : "memory");
#else
	concur__ctx_switch(&self->sp, t->id == 1 ? fib_b.sp : main_sp);
#endif
	fprintf(stderr, "FAIL: finished fiber %d resumed\n", t->id);
	abort();
}

__attribute__((noinline)) static void fiber_entry(struct task *t)
{
	void **frame = __builtin_frame_address(0);
	uintptr_t ret = (uintptr_t)__builtin_return_address(0);
	CHECK(t == &task_a || t == &task_b, "entry got task %p, want %p or %p", (void *)t,
	      (void *)&task_a, (void *)&task_b);
	if (t != &task_a && t != &task_b)
		abort();
	CHECK(t->magic == TASK_MAGIC && t->self == t, "entry: task record");
	CHECK(!t->entered, "fiber %d entered twice", t->id);
	t->entered = 1;
	CHECK(((uintptr_t)frame & 15) == 0, "entry: frame address %p", (void *)frame);
	CHECK(frame[0] == NULL, "entry: frame chain not terminated: %p", frame[0]);
#if defined(__x86_64__)
	CHECK(ret == 0, "entry: return address %#lx, want none", (unsigned long)ret);
#else
	uintptr_t start = (uintptr_t)concur__ctx_start;
	CHECK(ret > start && ret <= start + 16, "entry: return address %#lx, ctx_start at %#lx",
	      (unsigned long)ret, (unsigned long)start);
#endif
	uintptr_t lo = (uintptr_t)t->fib->stack_lo;
	CHECK((uintptr_t)frame > lo && (uintptr_t)frame < lo + t->fib->stack_size,
	      "entry: not on the fiber's stack");
	check_alignment("entry");
	CHECK(recurse(200) == 200 * 201 / 2, "deep recursion on the fiber stack");
#if defined(__x86_64__)
	concur__ctx_switch(&t->fib->sp, main_sp); /* back to main, which enters the other one */
#endif
	run_rounds(t);
}

int main(void)
{
	fiber_map(&fib_a);
	fiber_map(&fib_b);
	task_a = (struct task){.magic = TASK_MAGIC, .self = &task_a, .id = 1, .fib = &fib_a};
	task_b = (struct task){.magic = TASK_MAGIC, .self = &task_b, .id = 2, .fib = &fib_b};
	fiber_prepare(&fib_a, &task_a, fiber_entry);
	fiber_prepare(&fib_b, &task_b, fiber_entry);
	check_alignment("main");
#if defined(__x86_64__)
	concur__ctx_enter(&main_sp, fib_a.sp, &task_a, fiber_entry);
	concur__ctx_enter(&main_sp, fib_b.sp, &task_b, fiber_entry);
#endif

	for (int r = 0; r <= ROUNDS; r++) {
		trace_len = 0;
		trace[trace_len++] = 0;
		uint64_t seed = (3ULL << 40) + ((uint64_t)r << 8);
		if (r == ROUNDS)
			switch_plain(&main_sp, fib_a.sp);
		else if (r & 1)
			switch_regs(&main_sp, fib_a.sp, seed);
		else
			switch_live(&main_sp, fib_a.sp, seed);
		CHECK(trace_len == 3 && trace[0] == 0 && trace[1] == 1 && trace[2] == 2,
		      "round %d: order %d %d %d (%d)", r, trace[0], trace[1], trace[2], trace_len);
		if (failures > 20)
			break;
	}
	CHECK(task_a.entered && task_b.entered, "both fibers ran");
	if (failures) {
		printf("FAIL: %d check(s) failed after %lu switches\n", failures, switches);
		return 1;
	}
	printf("PASS: %d rounds, %lu switches checked\n", ROUNDS, switches);
	return 0;
}

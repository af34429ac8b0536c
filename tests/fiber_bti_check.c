/* SPDX-License-Identifier: MIT */
/*
 * aarch64 only: src/fiber_aarch64.S under enforced BTI (branch target identification). Built
 * with -mbranch-protection=standard -nostdlib -static, so that every object of the link carries
 * the BTI note (Debian's static libc and crt files do not) and the program's code is mapped
 * guarded: an indirect branch to anything but a bti landing pad then raises SIGILL. Switches
 * main -> fiber A -> fiber B -> main, with the initial frame of concur__fiber_prepare(). Run by
 * tests/cross_check.sh under qemu-aarch64 -cpu max, which enforces BTI like the kernel does.
 */
#include <stdint.h>

void concur__ctx_switch(void **save_sp, void *load_sp);
void concur__ctx_start(void);

#define ROUNDS 1000

static void *main_sp, *sp_a, *sp_b;
static char stack_a[16384] __attribute__((aligned(16)));
static char stack_b[16384] __attribute__((aligned(16)));
static long count_a, count_b;

static void sys_write(const char *s, long n)
{
	register long x0 asm("x0") = 1;
	register const char *x1 asm("x1") = s;
	register long x2 asm("x2") = n;
	register long x8 asm("x8") = 64; /* write */
	__asm__ volatile("svc	0" : "+r"(x0) : "r"(x1), "r"(x2), "r"(x8) : "memory");
}

__attribute__((noreturn)) static void sys_exit(int code)
{
	register long x0 asm("x0") = code;
	register long x8 asm("x8") = 93; /* exit */
	__asm__ volatile("svc	0" : : "r"(x0), "r"(x8));
	__builtin_unreachable();
}

/* as concur__fiber_prepare() */
static void *prepare(char *stack, unsigned long size, long *t, void (*entry)(long *))
{
	uintptr_t top = ((uintptr_t)stack + size) & ~(uintptr_t)15;
	uintptr_t *sp = (uintptr_t *)(top - 176);
	for (int i = 0; i < 22; i++)
		sp[i] = 0;
	sp[0] = (uintptr_t)t;                  /* x19 */
	sp[1] = (uintptr_t)entry;              /* x20 */
	sp[11] = (uintptr_t)concur__ctx_start; /* x30 */
	return sp;
}

__attribute__((noinline)) static void entry_a(long *t)
{
	for (;;) {
		(*t)++;
		concur__ctx_switch(&sp_a, sp_b); /* fiber to fiber */
	}
}

__attribute__((noinline)) static void entry_b(long *t)
{
	for (;;) {
		(*t)++;
		concur__ctx_switch(&sp_b, main_sp);
	}
}

void fiber_bti_main(void)
{
	sp_a = prepare(stack_a, sizeof stack_a, &count_a, entry_a);
	sp_b = prepare(stack_b, sizeof stack_b, &count_b, entry_b);
	for (int i = 0; i < ROUNDS; i++)
		concur__ctx_switch(&main_sp, sp_a);
	if (count_a != ROUNDS || count_b != ROUNDS) {
		sys_write("FAIL: wrong switch count\n", 25);
		sys_exit(1);
	}
	sys_write("PASS: switches under enforced BTI\n", 34);
	sys_exit(0);
}

/* entered from the kernel with sp aligned */
__asm__(".text\n"
        ".globl _start\n"
        ".type _start, %function\n"
        "_start:\n"
        "\thint	#34\n" /* bti c */
        "\tmov	x29, #0\n"
        "\tmov	x30, #0\n"
        "\tbl	fiber_bti_main\n"
        "\tbrk	#0\n");

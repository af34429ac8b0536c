/* SPDX-License-Identifier: MIT */
/*
 * void concur__ctx_switch(void **save_sp, void *load_sp)
 *
 * Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp,
 * loads load_sp and restores the registers saved there, and returns on the new stack. A ret,
 * not a pop and an indirect jmp: fibers suspend from a few call sites, so the return stack
 * buffer's top (this call's return address) is most often right for the fiber switched to, and
 * the buffer stays paired with the returns that follow. A jmp left it one entry off, and every
 * return up the resumed fiber's call chain missed: await_nop/128 (128 fibers, one switch per
 * op) spent 42 ns of user time per op with the jmp, 34 with the ret; a yield ping-pong of two
 * fibers measured the same either way (13.2 and 13.9 ns, within the noise).
 * MXCSR and the x87 control word are not switched: fibers of one thread share them.
 */
	.text
	.globl	concur__ctx_switch
	.hidden	concur__ctx_switch
	.type	concur__ctx_switch, @function
	.p2align 4
concur__ctx_switch:
	.cfi_startproc
	endbr64
	pushq	%rbp
	pushq	%rbx
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, (%rdi)
	movq	%rsi, %rsp
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbx
	popq	%rbp
	ret
	.cfi_endproc
	.size	concur__ctx_switch, .-concur__ctx_switch

/*
 * void concur__ctx_enter(void **save_sp, void *top, struct concur__task *t,
 *                        void (*entry)(struct concur__task *t))
 *
 * Saves the current context as concur__ctx_switch does, then starts entry(t) on a new stack
 * whose (16-aligned) top is top, behind a null return address (the ABI's alignment at entry;
 * unwinders stop there) with a null frame pointer (the frame chain ends there). entry never
 * returns. A jump, not a return into a frame made for it
 * nor a call: the return stack buffer keeps this call's return address, which is where the
 * new fiber's final switch back (concur__ctx_jump) goes when it ends and its starter is next,
 * so that return and every return up the starter's chain are predicted. (Returning into a
 * made frame missed once, and a call pushed an entry no ret takes, so that every return up the
 * starter's chain missed after it: spawn/one, the parent's returns from concur_result.)
 */
	.globl	concur__ctx_enter
	.hidden	concur__ctx_enter
	.type	concur__ctx_enter, @function
	.p2align 4
concur__ctx_enter:
	.cfi_startproc
	endbr64
	pushq	%rbp
	pushq	%rbx
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, (%rdi)
	movq	%rsi, %rsp
	movq	%rdx, %rdi
	xorl	%ebp, %ebp
	pushq	$0
	jmpq	*%rcx
	.cfi_endproc
	.size	concur__ctx_enter, .-concur__ctx_enter

/*
 * concur__ctx_jump: load_sp in %rdi. The second half of concur__ctx_switch, for a context that
 * never runs again (a finished fiber): jumped to (concur__switch_final), not called, so its ret
 * takes the return address the resumed context's own switch pushed on the return stack buffer.
 */
	.globl	concur__ctx_jump
	.hidden	concur__ctx_jump
	.type	concur__ctx_jump, @function
	.p2align 4
concur__ctx_jump:
	.cfi_startproc
	.cfi_undefined rip
	endbr64
	movq	%rdi, %rsp
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbx
	popq	%rbp
	ret
	.cfi_endproc
	.size	concur__ctx_jump, .-concur__ctx_jump

	.section .note.GNU-stack, "", @progbits

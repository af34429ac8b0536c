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
 * First entry of a fiber: concur__fiber_prepare() leaves the task in %r12 and the entry
 * function in %r13; the entry never returns. Jumped to, not called, behind a null return
 * address (the ABI's alignment at entry; unwinders stop there): a call would push a return
 * address on the return stack buffer that no ret ever takes, and the fiber's final switch
 * back to the one that started it would leave that entry on top, so every return up the
 * resumed fiber's call chain would miss (spawn/one: the parent's returns from concur_result).
 */
	.globl	concur__ctx_start
	.hidden	concur__ctx_start
	.type	concur__ctx_start, @function
	.p2align 4
concur__ctx_start:
	.cfi_startproc
	.cfi_undefined rip
	endbr64
	movq	%r12, %rdi
	pushq	$0
	jmpq	*%r13
	.cfi_endproc
	.size	concur__ctx_start, .-concur__ctx_start

	.section .note.GNU-stack, "", @progbits

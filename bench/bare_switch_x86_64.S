/* SPDX-License-Identifier: MIT */
/* void bare_switch(struct bare_ctx *from, struct bare_ctx *to): the bench's floor switch.
 * Deliberately its own copy, not src/fiber_x86_64.S: the floor must not move when the
 * library's switch changes. */
	.text
	.globl	bare_switch
	.type	bare_switch, @function
bare_switch:
	pushq	%rbp
	pushq	%rbx
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, (%rdi)
	movq	(%rsi), %rsp
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%rbx
	popq	%rbp
	popq	%rcx
	jmp	*%rcx
	.size	bare_switch, .-bare_switch

/* First entry of a new context: r12 = fn, r13 = arg (set by bare_ctx_make). */
	.globl	bare_ctx_entry
	.type	bare_ctx_entry, @function
bare_ctx_entry:
	movq	%r13, %rdi
	callq	*%r12
	ud2
	.size	bare_ctx_entry, .-bare_ctx_entry

	.section .note.GNU-stack,"",@progbits

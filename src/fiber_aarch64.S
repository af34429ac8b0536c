/* SPDX-License-Identifier: MIT */
/*
 * void concur__ctx_switch(void **save_sp, void *load_sp)
 *
 * AAPCS64 callee-saved state: x19-x30 and d8-d15, 176 bytes on the stack. Ends with an
 * indirect branch (br x30) rather than ret, for the same reason as the x86-64 version: the
 * return address belongs to another stack, so the return predictor would always miss. Except
 * when built for BTI (-mbranch-protection=bti or standard): there a br must land on a bti
 * instruction and a return address is none, so it faults (SIGILL); ret is not checked.
 */
	.text
	.globl	concur__ctx_switch
	.hidden	concur__ctx_switch
	.type	concur__ctx_switch, %function
	.p2align 4
concur__ctx_switch:
	hint	#34			/* bti c */
	sub	sp, sp, #176
	stp	x19, x20, [sp, #0]
	stp	x21, x22, [sp, #16]
	stp	x23, x24, [sp, #32]
	stp	x25, x26, [sp, #48]
	stp	x27, x28, [sp, #64]
	stp	x29, x30, [sp, #80]
	stp	d8, d9, [sp, #96]
	stp	d10, d11, [sp, #112]
	stp	d12, d13, [sp, #128]
	stp	d14, d15, [sp, #144]
	mov	x2, sp
	str	x2, [x0]
	mov	sp, x1
	ldp	x19, x20, [sp, #0]
	ldp	x21, x22, [sp, #16]
	ldp	x23, x24, [sp, #32]
	ldp	x25, x26, [sp, #48]
	ldp	x27, x28, [sp, #64]
	ldp	x29, x30, [sp, #80]
	ldp	d8, d9, [sp, #96]
	ldp	d10, d11, [sp, #112]
	ldp	d12, d13, [sp, #128]
	ldp	d14, d15, [sp, #144]
	add	sp, sp, #176
#if defined(__ARM_FEATURE_BTI_DEFAULT)
	ret
#else
	br	x30
#endif
	.size	concur__ctx_switch, .-concur__ctx_switch

/* First entry of a fiber: the task in x19, the entry function in x20; it never returns. */
	.globl	concur__ctx_start
	.hidden	concur__ctx_start
	.type	concur__ctx_start, %function
	.p2align 4
concur__ctx_start:
	hint	#38			/* bti jc */
	mov	x0, x19
	blr	x20
	brk	#0
	.size	concur__ctx_start, .-concur__ctx_start

	.section .note.GNU-stack, "", %progbits

#if defined(__ARM_FEATURE_BTI_DEFAULT)
/* Mark the object BTI-compatible: without this note the linker drops BTI for the whole program. */
	.section .note.gnu.property, "a"
	.p2align 3
	.word	4			/* name size */
	.word	16			/* descriptor size */
	.word	5			/* NT_GNU_PROPERTY_TYPE_0 */
	.asciz	"GNU"
	.word	0xc0000000		/* GNU_PROPERTY_AARCH64_FEATURE_1_AND */
	.word	4
	.word	1			/* GNU_PROPERTY_AARCH64_FEATURE_1_BTI */
	.word	0
#endif

/* multiboot2 — a Multiboot2 ELF32 kernel (no PVH note, no Multiboot 1 header): its header asks for the
 * memory map and gives an entry address tag. It checks %eax = 0x36D76289 and finds a memory map tag (type
 * 6, 24-byte entries, at least one) among the tags at %ebx, then prints PORTHOLE-MB2-OK;
 * PORTHOLE-MB2-BAD-MAGIC or PORTHOLE-MB2-NO-MMAP otherwise. (QEMU has no Multiboot2 loader.) */
    .include "common32.inc"
    .set MB2_MAGIC, 0xE85250D6

    .section .multiboot, "a"
    .p2align 3
mb2_header:
    .long MB2_MAGIC
    .long 0                         /* i386 */
    .long mb2_header_end - mb2_header
    .long 0x100000000 - MB2_MAGIC - (mb2_header_end - mb2_header)
    .p2align 3
    .word 1, 0                      /* information request, required: memory map, command line */
    .long 16
    .long 6, 1
    .p2align 3
    .word 3, 0                      /* entry address */
    .long 12
    .long _start
    .p2align 3
    .word 0, 0
    .long 8
mb2_header_end:

    .text
    .code32
    .globl _start
_start:
    cli
    cmpl $0x36D76289, %eax
    jne 8f
    movl (%ebx), %edi               /* total_size */
    addl %ebx, %edi                 /* end of the information */
    leal 8(%ebx), %esi              /* first tag */
1:  cmpl %edi, %esi
    jae 9f
    movl (%esi), %eax               /* tag type; 0 ends the list */
    testl %eax, %eax
    jz 9f
    cmpl $6, %eax
    jne 2f
    cmpl $24, 8(%esi)               /* entry_size */
    jne 9f
    cmpl $16 + 24, 4(%esi)          /* at least one entry */
    jb 9f
    PUTS ok
    POWEROFF
2:  movl 4(%esi), %eax              /* tag size, padded to 8 */
    addl $7, %eax
    andl $~7, %eax
    jz 9f
    addl %eax, %esi
    jmp 1b
8:  PUTS bad_magic
    POWEROFF
9:  PUTS no_mmap
    POWEROFF

    .section .rodata
ok: .asciz "PORTHOLE-MB2-OK\n"
bad_magic: .asciz "PORTHOLE-MB2-BAD-MAGIC\n"
no_mmap: .asciz "PORTHOLE-MB2-NO-MMAP\n"

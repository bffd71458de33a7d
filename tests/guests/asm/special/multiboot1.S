/* multiboot1 — a Multiboot 1 ELF32 kernel (no PVH note): checks %eax = 0x2BADB002 and that the information
 * at %ebx has a memory map (flag 6, a non-empty mmap whose first entry has the 20-byte size), then prints
 * PORTHOLE-MB1-OK; PORTHOLE-MB1-BAD-MAGIC or PORTHOLE-MB1-NO-MMAP otherwise. */
    .include "common32.inc"
    .set MB1_MAGIC, 0x1BADB002
    .set MB1_FLAGS, 0x3             /* page-aligned modules, memory information */

    .section .multiboot, "a"
    .p2align 2
    .long MB1_MAGIC, MB1_FLAGS, -(MB1_MAGIC + MB1_FLAGS)

    .text
    .code32
    .globl _start
_start:
    cli
    cmpl $0x2BADB002, %eax
    jne 8f
    testl $0x40, (%ebx)             /* flags: mmap_length/mmap_addr valid */
    jz 9f
    cmpl $20, 44(%ebx)              /* mmap_length: at least one entry */
    jb 9f
    movl 48(%ebx), %ecx             /* mmap_addr */
    cmpl $20, (%ecx)                /* the first entry's size field */
    jb 9f
    PUTS ok
    POWEROFF
8:  PUTS bad_magic
    POWEROFF
9:  PUTS no_mmap
    POWEROFF

    .section .rodata
ok: .asciz "PORTHOLE-MB1-OK\n"
bad_magic: .asciz "PORTHOLE-MB1-BAD-MAGIC\n"
no_mmap: .asciz "PORTHOLE-MB1-NO-MMAP\n"

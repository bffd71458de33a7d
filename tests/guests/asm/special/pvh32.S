/* pvh32 — a 32-bit ELF PVH kernel: checks that %ebx points at an hvm_start_info (its magic) and prints
 * PORTHOLE-PVH32-OK, or PORTHOLE-PVH32-BAD-START-INFO. */
    .include "common32.inc"
    PVH_NOTE _start

    .text
    .code32
    .globl _start
_start:
    cli
    cmpl $0x336EC578, (%ebx)        /* XEN_HVM_START_MAGIC_VALUE */
    jne 1f
    PUTS ok
    POWEROFF
1:  PUTS bad
    POWEROFF

    .section .rodata
ok: .asciz "PORTHOLE-PVH32-OK\n"
bad: .asciz "PORTHOLE-PVH32-BAD-START-INFO\n"

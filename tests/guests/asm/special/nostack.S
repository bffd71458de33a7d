/* nostack — a 32-bit PVH kernel whose first instruction is a `call`, before it has any stack of its own:
 * it prints PORTHOLE-NOSTACK-OK only once the call has returned, which needs the loader's %esp to point
 * at RAM (with %esp = 0 the return address would go to 0xfffffffc, outside RAM, and `ret` would jump
 * to garbage). */
    .include "common32.inc"
    PVH_NOTE _start

    .text
    .code32
    .globl _start
_start:
    call 1f
    PUTS ok
    POWEROFF
1:  ret

    .section .rodata
ok: .asciz "PORTHOLE-NOSTACK-OK\n"

/* hello — prints the marker on COM1 and powers off. The first proof that a guest boots. */
    .text
    .globl guest_main
guest_main:
    leaq msg(%rip), %rdi
    call serial_puts
    ret

    .section .rodata
msg:
    .asciz "PORTHOLE-GUEST-OK\n"

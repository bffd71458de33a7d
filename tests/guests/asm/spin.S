/* spin — prints PORTHOLE-SPIN on COM1, then keeps its vCPU busy forever (a CPU-bound guest for the CPU cap
 * tests: the host sees its vCPU thread use all the CPU it is given). */
    .text
    .globl guest_main
guest_main:
    leaq msg(%rip), %rdi
    call serial_puts
1:  pause
    jmp 1b

    .section .rodata
msg:
    .asciz "PORTHOLE-SPIN\n"

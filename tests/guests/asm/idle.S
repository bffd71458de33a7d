/* idle — prints its marker, then halts with interrupts off forever: an idle VM for memory and start-up
   measurements. It never powers off; the host stops it. */
    .text
    .globl guest_main
guest_main:
    leaq msg(%rip), %rdi
    call serial_puts
    cli
1:  hlt
    jmp 1b

    .section .rodata
msg:
    .asciz "PORTHOLE-IDLE\n"

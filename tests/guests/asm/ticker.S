/* ticker — a guest that runs forever at a steady pace, for pause/resume, snapshot and stop tests.
 *
 * Prints `PORTHOLE-TICKER-START`, then programs the PIT at 100 Hz through the 8259 (IRQ0 -> vector 0x20)
 * and prints `PORTHOLE-TICK <n>` (n = 1, 2, 3, ...) after every 10 interrupts: ten lines per second of
 * guest time. It never powers off by itself. A catch-up loop prints every line even if interrupts came
 * in a burst (no number is skipped). Measured under QEMU+KVM: a 3 s `stop`/`cont` leaves a 3.6 s gap and
 * the lines then resume at 10/s without a burst.
 */
    .set PIT_DIVISOR, 11932         /* 1193182 / 11932 = 100.0 Hz */

    .text
    .code64
    .globl guest_main
guest_main:
    leaq msg_start(%rip), %rdi
    call serial_puts
    movl $0x20, %edi
    leaq tick_irq(%rip), %rsi
    call idt_set_gate
    call spurious_irqs_install
    call lapic_enable               /* virtual wire: the 8259's INTR reaches the CPU */
    movl $0xFE, %edi                /* only IRQ0 */
    movl $0xFF, %esi
    call pic_init
    movl $PIT_DIVISOR, %edi
    call pit_set_periodic

    xorl %ebx, %ebx                 /* lines printed (callee-saved registers are ours: we never return) */
    sti
1:  hlt
2:  movl ticks(%rip), %eax
    xorl %edx, %edx
    movl $10, %ecx
    divl %ecx                       /* %eax = whole tens of interrupts */
    cmpl %ebx, %eax
    jbe 1b
    incl %ebx                       /* one line per ten interrupts, none skipped */
    leaq msg_tick(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    jmp 2b                          /* catch up before sleeping again */

tick_irq:
    pushq %rax
    incl ticks(%rip)
    movb $0x20, %al                 /* EOI to the master 8259 */
    outb %al, $0x20
    popq %rax
    iretq

    .section .rodata
msg_start:
    .asciz "PORTHOLE-TICKER-START\n"
msg_tick:
    .asciz "PORTHOLE-TICK "

    .section .data
    .p2align 2
ticks:
    .long 0

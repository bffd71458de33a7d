/* timer — proves that both interrupt timers reach the CPU: the i8254 PIT through the 8259 PIC
 * (LAPIC LINT0 in ExtINT / virtual-wire mode) and the local APIC timer.
 *
 * Phase 1: PICs remapped to 0x20/0x28, all but IRQ0 masked, PIT channel 0 at ~100 Hz (mode 2); ten IRQ0
 *          interrupts are counted with sti; hlt. Watchdog: a 2 s one-shot LAPIC timer (vector 0x31,
 *          2 s assuming KVM's 1 GHz APIC bus; longer on a slower bus).
 * Phase 2: LAPIC timer periodic, vector 0x30, divide by 16, initial count 312500 (200 Hz on KVM's 1 GHz
 *          bus); ten interrupts counted. Watchdog: the PIT, still ticking, 200 ticks (~2 s).
 * Prints `PORTHOLE-TIMER-OK pit=10 lapic=10`, or `PORTHOLE-TIMER-FAIL phase=<pit|lapic> pit=<n> lapic=<m>`
 * when a phase's watchdog fires first; then powers off.
 */
    .set LAPIC, 0xFEE00000
    .set PIT_DIVISOR, 11932         /* 1193182 / 11932 = 100.0 Hz */
    .set WANTED, 10

    .text
    .code64
    .globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13

    movl $0x20, %edi
    leaq pit_irq(%rip), %rsi
    call idt_set_gate
    call spurious_irqs_install
    movl $0x30, %edi
    leaq lapic_timer_irq(%rip), %rsi
    call idt_set_gate
    movl $0x31, %edi
    leaq watchdog_irq(%rip), %rsi
    call idt_set_gate

    call lapic_enable
    movl $0xFE, %edi                /* master: only IRQ0 */
    movl $0xFF, %esi                /* slave: all masked */
    call pic_init

    /* Phase 1: the PIT, guarded by a one-shot LAPIC timer. */
    movl $LAPIC, %ebx
    movl $0x31, 0x320(%rbx)         /* LVT timer: one-shot, vector 0x31 */
    movl $0xA, 0x3E0(%rbx)          /* divide by 128 */
    movl $15625000, 0x380(%rbx)     /* 2 s at 1 GHz / 128 */
    movl $PIT_DIVISOR, %edi
    call pit_set_periodic
    sti
1:  hlt
    movl pit_count(%rip), %eax
    cmpl $WANTED, %eax
    jae 2f
    cmpl $0, watchdog_fired(%rip)
    je 1b
    cli
    leaq msg_phase_pit(%rip), %r13
    jmp fail
2:  cli
    movl %eax, %r12d                /* PIT interrupts counted in phase 1 */
    movl $0, 0x380(%rbx)            /* stop the watchdog */
    movl $0x10031, 0x320(%rbx)      /* and mask it */

    /* Phase 2: the LAPIC timer, guarded by the PIT. */
    movl pit_count(%rip), %r13d     /* PIT count at the start of phase 2 */
    movl $0x3, 0x3E0(%rbx)          /* divide by 16 */
    movl $0x20030, 0x320(%rbx)      /* LVT timer: periodic, vector 0x30 */
    movl $312500, 0x380(%rbx)       /* 200 Hz at 1 GHz / 16 */
    sti
3:  hlt
    movl lapic_count(%rip), %eax
    cmpl $WANTED, %eax
    jae 4f
    movl pit_count(%rip), %eax
    subl %r13d, %eax
    cmpl $200, %eax
    jb 3b
    cli
    leaq msg_phase_lapic(%rip), %r13
    jmp fail
4:  cli
    movl %eax, %r13d                /* LAPIC interrupts counted in phase 2 */
    call timers_off
    leaq msg_ok_pit(%rip), %rdi
    call serial_puts
    movl %r12d, %edi
    call serial_putdec
    leaq msg_lapic(%rip), %rdi
    call serial_puts
    movl %r13d, %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    jmp 9f

fail:                               /* %r13 = phase name */
    call timers_off
    leaq msg_fail(%rip), %rdi
    call serial_puts
    movq %r13, %rdi
    call serial_puts
    leaq msg_pit(%rip), %rdi
    call serial_puts
    movl pit_count(%rip), %edi
    call serial_putdec
    leaq msg_lapic(%rip), %rdi
    call serial_puts
    movl lapic_count(%rip), %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
9:  popq %r13
    popq %r12
    popq %rbx
    ret

/* timers_off(): LAPIC timer stopped and masked, every 8259 line masked (interrupts are disabled) */
timers_off:
    movl $LAPIC, %eax
    movl $0, 0x380(%rax)
    movl $0x10030, 0x320(%rax)
    movb $0xFF, %al
    outb %al, $0x21
    outb %al, $0xA1
    ret

pit_irq:
    pushq %rax
    lock incl pit_count(%rip)
    movb $0x20, %al                 /* non-specific EOI to the master 8259 */
    outb %al, $0x20
    popq %rax
    iretq

lapic_timer_irq:
    pushq %rax
    lock incl lapic_count(%rip)
    movl $LAPIC, %eax
    movl $0, 0xB0(%rax)             /* LAPIC EOI */
    popq %rax
    iretq

watchdog_irq:
    pushq %rax
    movl $1, watchdog_fired(%rip)
    movl $LAPIC, %eax
    movl $0, 0xB0(%rax)
    popq %rax
    iretq

    .section .rodata
msg_ok_pit:
    .asciz "PORTHOLE-TIMER-OK pit="
msg_fail:
    .asciz "PORTHOLE-TIMER-FAIL phase="
msg_phase_pit:
    .asciz "pit"
msg_phase_lapic:
    .asciz "lapic"
msg_pit:
    .asciz " pit="
msg_lapic:
    .asciz " lapic="

    .section .data
    .p2align 2
pit_count:
    .long 0
lapic_count:
    .long 0
watchdog_fired:
    .long 0

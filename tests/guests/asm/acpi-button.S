/* acpi-button — a guest that honours the ACPI power button, as an ACPI-aware OS does.
 *
 * It enables the power-button event in PM1a_EN (port 0x602), routes the SCI (ISA IRQ 9, slave 8259 line 1
 * -> vector 0x29) and prints `PORTHOLE-ACPI-READY`. When the host presses the button (porthole-vmm's
 * graceful `stop`), the SCI handler reads PM1a_STS (port 0x600), clears the PWRBTN status by writing it
 * back, and the guest prints `PORTHOLE-ACPI-POWER-BUTTON` and powers off through S5. Proves the graceful
 * stop path end to end: host request -> PM1 status -> SCI -> guest -> SLP_EN.
 */
    .set PM1A_STS, 0x600
    .set PM1A_EN, 0x602
    .set PWRBTN, 0x0100

    .text
    .code64
    .globl guest_main
guest_main:
    movl $0x29, %edi
    leaq sci_irq(%rip), %rsi
    call idt_set_gate
    call spurious_irqs_install
    call lapic_enable               /* virtual wire: the 8259's INTR reaches the CPU */
    movl $0xFB, %edi                /* master: only the cascade (IRQ 2) */
    movl $0xFD, %esi                /* slave: only IRQ 9 */
    call pic_init
    movw $PM1A_EN, %dx
    movw $PWRBTN, %ax
    outw %ax, %dx
    leaq msg_ready(%rip), %rdi
    call serial_puts
    sti
1:  hlt
    cmpl $0, pressed(%rip)
    je 1b
    cli
    leaq msg_pressed(%rip), %rdi
    call serial_puts
    ret                             /* to the stub, which powers off */

sci_irq:
    pushq %rax
    pushq %rdx
    movw $PM1A_STS, %dx
    inw %dx, %ax
    testw $PWRBTN, %ax
    jz 2f
    outw %ax, %dx                   /* write one to clear */
    movl $1, pressed(%rip)
2:  movb $0x20, %al                 /* EOI: slave, then master */
    outb %al, $0xA0
    outb %al, $0x20
    popq %rdx
    popq %rax
    iretq

    .section .rodata
msg_ready:
    .asciz "PORTHOLE-ACPI-READY\n"
msg_pressed:
    .asciz "PORTHOLE-ACPI-POWER-BUTTON\n"

    .section .data
    .p2align 2
pressed:
    .long 0

/* kbd-echo — proves the i8042 keyboard controller, the PS/2 keyboard and mouse, their interrupts through
 * the 8259 pair (IRQ1 -> vector 0x21; IRQ12 -> slave line 4 -> vector 0x2C, through the cascade on IRQ2),
 * and text-mode output driven by input.
 *
 * Set-up, polled with interrupts off: output buffer drained; configuration byte read (0x20), IRQ bits 0/1
 * and clock-disable bits 4/5 cleared, written (0x60); aux port enabled (0xA8); 0xD4 0xF4 (enable data
 * reporting) sent to the mouse and its ACK awaited; configuration byte written again with bits 0
 * (keyboard IRQ1) and 1 (mouse IRQ12) set. Bit 6 (translation to scancode set 1) is kept as found. Then
 * the 8259s: master mask 0xF9 (IRQ1, cascade), slave mask 0xEF (IRQ12); LAPIC in virtual-wire mode.
 * The text screen is cleared (vga_text_clear) and the cursor put at row 0, column 0.
 *
 * Serial (COM1):
 *   `PORTHOLE-KBD-MOUSE-ACK xx`   the byte the mouse answered to 0xF4 (expected fa), or `none` if no byte
 *                                 came within the poll budget (set-up goes on either way)
 *   `PORTHOLE-KBD-READY`          interrupts are on; input is reported from here
 *   `PORTHOLE-KEY xx`             one per byte read from port 0x60 while status (port 0x64) bit 5 was clear:
 *                                 keyboard bytes, two lower-case hex digits (e.g. `sendkey a` gives
 *                                 `PORTHOLE-KEY 1e` then `PORTHOLE-KEY 9e`)
 *   `PORTHOLE-MOUSE b=<b> dx=<dx> dy=<dy>`
 *                                 one per complete 3-byte mouse packet (bytes with status bit 5 set):
 *                                 b = byte0 & 7 (bit 0 left, 1 right, 2 middle), dx = byte1 as a 9-bit
 *                                 signed value with sign byte0 bit 4, dy = byte2 with sign byte0 bit 5, in
 *                                 signed decimal; dy is the raw PS/2 value (positive = up), so QEMU's
 *                                 `mouse_move 10 5` gives dx=10 dy=-5. A first byte without bit 3 (always 1
 *                                 in a packet) is dropped to re-synchronise.
 * Screen: each keyboard byte is also written at the text cursor as two lower-case hex digits and a space,
 * attribute 0x0F, 3 cells per byte from cell 0 on (`1e 9e ...`); after 666 bytes (cell 1998) it wraps to
 * cell 0 and overwrites. The CRTC cursor follows (cell after the last byte).
 * Caps Lock (scan code 3a, its press in set 1) toggles the guest's Caps Lock light as an OS does: with
 * interrupts off, 0xED then the LED byte (bit 0 Scroll, bit 1 Num, bit 2 Caps) written to the keyboard,
 * each answer (fa) read by polling and not reported as a key; then
 *   `PORTHOLE-LEDS x`             the LED byte sent, one hex digit (4: Caps Lock on, 0: off)
 * It never powers off by itself: it runs until the host stops it.
 */
    .set KBC_DATA, 0x60
    .set KBC_STATUS, 0x64           /* read: status; write: command */
    .set VGA_TEXT, 0xB8000
    .set POLLS, 20000               /* poll budget per wait (each poll is a port read) */
    .set RING, 256                  /* entries of the interrupt -> main loop queue (power of two) */

    .text
    .code64
    .globl guest_main
guest_main:
    call vga_text_clear
    xorl %edi, %edi
    call vga_set_cursor

    /* i8042 set-up, polled (interrupts are off since the PVH entry). */
    movl $32, %ebx                  /* drain stale bytes */
1:  inb $KBC_STATUS, %al
    testb $1, %al
    jz 2f
    inb $KBC_DATA, %al
    decl %ebx
    jnz 1b
2:  movb $0x20, %dil                /* read configuration byte */
    call kbc_command
    call kbc_read
    movl %eax, %r12d
    testl %eax, %eax
    jns 3f
    movl $0x47, %r12d               /* no answer: assume the usual default */
3:  andl $0xCC, %r12d               /* IRQs off, both clocks on; translation (bit 6) kept */
    movb $0x60, %dil
    call kbc_command
    movl %r12d, %edi
    call kbc_write_data
    movb $0xA8, %dil                /* enable the aux (mouse) port */
    call kbc_command
    movb $0xD4, %dil                /* next data byte goes to the mouse */
    call kbc_command
    movb $0xF4, %dil                /* mouse: enable data reporting */
    call kbc_write_data
    call kbc_read
    movl %eax, %ebx                 /* the ACK, or -1 */
    orl $0x03, %r12d                /* IRQ1 and IRQ12 on */
    movb $0x60, %dil
    call kbc_command
    movl %r12d, %edi
    call kbc_write_data

    leaq msg_ack(%rip), %rdi
    call serial_puts
    testl %ebx, %ebx
    js 4f
    movl %ebx, %edi
    movl $2, %esi
    call serial_puthex
    jmp 5f
4:  leaq msg_none(%rip), %rdi
    call serial_puts
5:  movl $'\n', %edi
    call serial_putc

    /* Interrupts. */
    movl $0x21, %edi
    leaq kbd_irq(%rip), %rsi
    call idt_set_gate
    movl $0x2C, %edi
    leaq mouse_irq(%rip), %rsi
    call idt_set_gate
    call spurious_irqs_install
    call lapic_enable
    movl $0xF9, %edi                /* master: IRQ1 and the cascade (IRQ2) */
    movl $0xEF, %esi                /* slave: IRQ12 */
    call pic_init

    leaq msg_ready(%rip), %rdi
    call serial_puts

    /* Main loop: callee-saved registers are ours (we never return).
       %r12 mouse packet index 0..2, %r13 packet byte 0, %r14 packet byte 1, %r15 screen cell. */
    xorl %r12d, %r12d
    xorl %r15d, %r15d
    /* The IRQ handlers queue bytes; this loop takes one at a time with interrupts off, then prints it
       with interrupts on. When the queue is empty it sleeps with sti; hlt (no interrupt slips between). */
6:  cli
    movl ring_tail(%rip), %eax
    cmpl ring_head(%rip), %eax
    jne 7f
    sti
    hlt
    jmp 6b
7:  movl %eax, %ecx
    andl $RING - 1, %ecx
    leaq ring(%rip), %rdx
    movzwl (%rdx,%rcx,2), %ebx      /* entry: data byte, bit 8 set for the mouse */
    incl %eax
    movl %eax, ring_tail(%rip)
    sti
    testl $0x100, %ebx
    jnz mouse_byte

    /* Keyboard byte. */
    leaq msg_key(%rip), %rdi
    call serial_puts
    movzbl %bl, %edi
    movl $2, %esi
    call serial_puthex
    movl $'\n', %edi
    call serial_putc
    leaq (VGA_TEXT)(,%r15,2), %rdi  /* screen echo */
    movzbl %bl, %eax
    shrl $4, %eax
    call hex_cell
    movzbl %bl, %eax
    andl $0xF, %eax
    call hex_cell
    movw $0x0F20, (%rdi)
    addl $3, %r15d
    cmpl $1998, %r15d
    jb 8f
    xorl %r15d, %r15d
8:  movl %r15d, %edi
    call vga_set_cursor
    cmpb $0x3A, %bl                 /* Caps Lock pressed: toggle its light */
    jne 6b
    call toggle_caps_light
    jmp 6b

/* toggle_caps_light(): flips bit 2 of the LED byte and sends it to the keyboard (0xED, byte), reading
   both answers by polling with interrupts off; reports the byte on serial. */
toggle_caps_light:
    xorb $4, leds(%rip)
    cli
    movb $0xED, %dil
    call kbc_write_data
    call kbc_read
    movzbl leds(%rip), %edi
    call kbc_write_data
    call kbc_read
    sti
    leaq msg_leds(%rip), %rdi
    call serial_puts
    movzbl leds(%rip), %edi
    movl $1, %esi
    call serial_puthex
    movl $'\n', %edi
    call serial_putc
    ret

mouse_byte:
    movzbl %bl, %ebx
    cmpl $1, %r12d
    je 1f
    cmpl $2, %r12d
    je 2f
    testl $0x08, %ebx               /* byte 0: bit 3 is always set */
    jz 6b
    movl %ebx, %r13d
    movl $1, %r12d
    jmp 6b
1:  movl %ebx, %r14d
    movl $2, %r12d
    jmp 6b
2:  xorl %r12d, %r12d
    leaq msg_mouse(%rip), %rdi
    call serial_puts
    movl %r13d, %edi
    andl $7, %edi
    call serial_putdec
    leaq msg_dx(%rip), %rdi
    call serial_puts
    movl %r14d, %edi
    testl $0x10, %r13d
    jz 3f
    subl $256, %edi
3:  movslq %edi, %rdi
    call serial_putsdec
    leaq msg_dy(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    testl $0x20, %r13d
    jz 4f
    subl $256, %edi
4:  movslq %edi, %rdi
    call serial_putsdec
    movl $'\n', %edi
    call serial_putc
    jmp 6b

/* hex_cell(%eax = 0..15, %rdi = cell address): writes the digit with attribute 0x0F, %rdi += 2 */
hex_cell:
    cmpb $10, %al
    jb 1f
    addb $'a' - 10 - '0', %al
1:  addb $'0', %al
    movb $0x0F, %ah
    stosw
    ret


/* kbc_drain: called by both IRQ handlers with %rax, %rcx, %rdx saved. Queues every byte the controller
   holds (at most 16): entry = byte | 0x100 when status bit 5 (aux) was set. A full queue drops the byte. */
kbc_drain:
    movl $16, %ecx
1:  inb $KBC_STATUS, %al
    testb $1, %al
    jz 3f
    movb %al, %dl
    inb $KBC_DATA, %al
    movzbl %al, %eax
    testb $0x20, %dl
    jz 2f
    orl $0x100, %eax
2:  pushq %rcx
    movl ring_head(%rip), %ecx
    movl %ecx, %edx
    subl ring_tail(%rip), %edx
    cmpl $RING, %edx
    jae 4f                          /* full */
    movl %ecx, %edx
    andl $RING - 1, %edx
    pushq %rsi
    leaq ring(%rip), %rsi
    movw %ax, (%rsi,%rdx,2)
    popq %rsi
    incl %ecx
    movl %ecx, ring_head(%rip)
4:  popq %rcx
    decl %ecx
    jnz 1b
3:  ret

kbd_irq:
    pushq %rax
    pushq %rcx
    pushq %rdx
    call kbc_drain
    movb $0x20, %al                 /* EOI: master */
    outb %al, $0x20
    popq %rdx
    popq %rcx
    popq %rax
    iretq

mouse_irq:
    pushq %rax
    pushq %rcx
    pushq %rdx
    call kbc_drain
    movb $0x20, %al                 /* EOI: slave, then master */
    outb %al, $0xA0
    outb %al, $0x20
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    .section .rodata
msg_ack:
    .asciz "PORTHOLE-KBD-MOUSE-ACK "
msg_none:
    .asciz "none"
msg_ready:
    .asciz "PORTHOLE-KBD-READY\n"
msg_key:
    .asciz "PORTHOLE-KEY "
msg_mouse:
    .asciz "PORTHOLE-MOUSE b="
msg_dx:
    .asciz " dx="
msg_dy:
    .asciz " dy="
msg_leds:
    .asciz "PORTHOLE-LEDS "

    .section .data
    .p2align 2
ring_head:
    .long 0
ring_tail:
    .long 0
leds:
    .byte 0

    .section .bss
    .p2align 4
ring:
    .skip RING * 2

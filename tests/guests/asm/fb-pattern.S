/* fb-pattern — proves the linear framebuffer and the Bochs VBE (DISPI) mode set: a deterministic picture
 * that a test recomputes exactly from a screen capture.
 *
 * Sets 1280x800x32 through DISPI (ID <- 0xB0C5, ENABLE <- 0, XRES, YRES, BPP <- 32, ENABLE <- 0x41), finds
 * the framebuffer with fb_base() (PCI 1234:1111 BAR0, else 0xE0000000) and draws, with x in 0..1279 and
 * y in 0..799, pixels 0x00RRGGBB (32-bit little-endian, stride 5120 bytes):
 *   y <  400: eight vertical bars of 160 pixels, bar = x / 160:
 *             0xFFFFFF white, 0xFFFF00 yellow, 0x00FFFF cyan, 0x00FF00 green,
 *             0xFF00FF magenta, 0xFF0000 red, 0x0000FF blue, 0x000000 black
 *   y >= 400: R = ((x * 7) ^ (y * 3)) & 0xFF
 *             G = ((x * 3) ^ (y * 7)) & 0xFF
 *             B = ( x      ^  y     ) & 0xFF
 *             (y is the screen row, 400..799, not y - 400)
 * The bottom half is A(x) ^ C(y) with A(x) = (7x&255)<<16 | (3x&255)<<8 | (x&255) and C(y) likewise, so
 * each row is one `rep movsq` of a precomputed A row followed by 640 qword XORs with C(y)|C(y)<<32.
 *
 * Serial (COM1), in order:
 *   `PORTHOLE-FB-INFO id=0x<DISPI ID read back, 4 hex digits> base=0x<framebuffer address, 8 hex digits>`
 *                                        printed after the mode set, before drawing starts;
 *   `PORTHOLE-FB-PATTERN-READY <W>x<H>`  W and H are XRES/YRES read back from DISPI (expected 1280x800),
 *                                        printed after the whole picture is in memory.
 * Then it halts forever with interrupts off (cli; hlt): the test captures the screen and powers the VM off.
 */
    .set XRES, 1280
    .set YRES, 800
    .set STRIDE, XRES * 4
    .set SPLIT, 400                 /* first row of the bottom half */

    .text
    .code64
    .globl guest_main
guest_main:
    movl $XRES, %edi
    movl $YRES, %esi
    call vbe_set_mode
    movl %eax, %r14d                /* DISPI ID */
    call fb_base
    movq %rax, %r15                 /* framebuffer */
    leaq msg_info(%rip), %rdi
    call serial_puts
    movl %r14d, %edi
    movl $4, %esi
    call serial_puthex
    leaq msg_base(%rip), %rdi
    call serial_puts
    movq %r15, %rdi
    movl $8, %esi
    call serial_puthex
    movl $'\n', %edi
    call serial_putc

    /* Top half: one row of bars in `row`, copied 400 times. */
    leaq row(%rip), %rdi
    leaq bar_colours(%rip), %rsi
    movl $8, %edx
1:  lodsl
    movl $XRES / 8, %ecx
    rep stosl
    decl %edx
    jnz 1b
    movq %r15, %rbx                 /* destination row */
    movl $SPLIT, %edx
2:  leaq row(%rip), %rsi
    movq %rbx, %rdi
    movl $STRIDE / 8, %ecx
    rep movsq
    addq $STRIDE, %rbx
    decl %edx
    jnz 2b

    /* Bottom half: A(x) in `row`. */
    leaq row(%rip), %rdi
    xorl %ecx, %ecx                 /* x */
3:  leal (%rcx,%rcx,2), %eax        /* 3x */
    movzbl %al, %eax
    shll $8, %eax
    leal (,%rcx,8), %edx
    subl %ecx, %edx                 /* 7x */
    movzbl %dl, %edx
    shll $16, %edx
    orl %edx, %eax
    movzbl %cl, %edx
    orl %edx, %eax
    stosl
    incl %ecx
    cmpl $XRES, %ecx
    jb 3b

    movl $SPLIT, %r12d              /* y; %rbx is still the first bottom row */
4:  leaq row(%rip), %rsi
    movq %rbx, %rdi
    movl $STRIDE / 8, %ecx
    rep movsq
    leal (%r12,%r12,2), %eax        /* C(y) = (3y&255)<<16 | (7y&255)<<8 | (y&255) */
    movzbl %al, %eax
    shll $16, %eax
    leal (,%r12,8), %edx
    subl %r12d, %edx
    movzbl %dl, %edx
    shll $8, %edx
    orl %edx, %eax
    movzbl %r12b, %edx
    orl %edx, %eax
    movq %rax, %rdx
    shlq $32, %rdx
    orq %rax, %rdx                  /* two pixels' worth */
    movq %rbx, %rdi
    movl $STRIDE / 64, %ecx
5:  xorq %rdx, (%rdi)
    xorq %rdx, 8(%rdi)
    xorq %rdx, 16(%rdi)
    xorq %rdx, 24(%rdi)
    xorq %rdx, 32(%rdi)
    xorq %rdx, 40(%rdi)
    xorq %rdx, 48(%rdi)
    xorq %rdx, 56(%rdi)
    addq $64, %rdi
    decl %ecx
    jnz 5b
    addq $STRIDE, %rbx
    incl %r12d
    cmpl $YRES, %r12d
    jb 4b

    /* Report. */
    leaq msg_ready(%rip), %rdi
    call serial_puts
    movl $1, %edi                   /* XRES read back */
    call vbe_read
    movl %eax, %edi
    call serial_putdec
    movl $'x', %edi
    call serial_putc
    movl $2, %edi                   /* YRES read back */
    call vbe_read
    movl %eax, %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    cli
6:  hlt
    jmp 6b

    .section .rodata
    .p2align 2
bar_colours:
    .long 0xFFFFFF, 0xFFFF00, 0x00FFFF, 0x00FF00, 0xFF00FF, 0xFF0000, 0x0000FF, 0x000000
msg_info:
    .asciz "PORTHOLE-FB-INFO id=0x"
msg_base:
    .asciz " base=0x"
msg_ready:
    .asciz "PORTHOLE-FB-PATTERN-READY "

    .section .bss
    .p2align 12
row:
    .skip STRIDE

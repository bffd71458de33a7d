/* fb-anim — the framebuffer stress guest and real-guest-speed benchmark: every frame rewrites every pixel.
 *
 * Sets 1280x800x32 through DISPI (vbe_set_mode), finds the framebuffer with fb_base(), prints
 * `PORTHOLE-FB-ANIM-START` (its first line), then draws frames n = 1, 2, 3, ... forever: frame n fills the
 * whole screen (one `rep stosq` of 512000 qwords, 4000 KiB) with the colour 0x00RRGGBB where
 *   R = (n * 3) & 0xFF,  G = (n * 5) & 0xFF,  B = (n * 7) & 0xFF
 * and after every frame n that is a multiple of 16 it prints `PORTHOLE-FB-FRAME <n>` (decimal: 16, 32, ...),
 * at which moment the whole screen holds colour(n). A capture taken at another time may show the boundary
 * between colour(n) above and colour(n - 1) below.
 * It never powers off by itself. Speed: ~0.3 s a frame where KVM emulates guest code; on hardware
 * virtualization the frame rate is bounded by memory bandwidth and the VMM's dirty tracking.
 */
    .set XRES, 1280
    .set YRES, 800

    .text
    .code64
    .globl guest_main
guest_main:
    movl $XRES, %edi
    movl $YRES, %esi
    call vbe_set_mode
    call fb_base
    movq %rax, %r15                 /* framebuffer (callee-saved registers are ours: we never return) */
    leaq msg_start(%rip), %rdi
    call serial_puts
    xorl %ebx, %ebx                 /* frame number */
1:  incl %ebx
    leal (%rbx,%rbx,2), %eax        /* R = 3n */
    movzbl %al, %eax
    shll $16, %eax
    leal (%rbx,%rbx,4), %edx        /* G = 5n */
    movzbl %dl, %edx
    shll $8, %edx
    orl %edx, %eax
    leal (,%rbx,8), %edx            /* B = 7n */
    subl %ebx, %edx
    movzbl %dl, %edx
    orl %edx, %eax
    movq %rax, %rdx
    shlq $32, %rdx
    orq %rdx, %rax                  /* two pixels */
    movq %r15, %rdi
    movl $XRES * YRES / 2, %ecx
    rep stosq
    testl $15, %ebx
    jnz 1b
    leaq msg_frame(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    jmp 1b

    .section .rodata
msg_start:
    .asciz "PORTHOLE-FB-ANIM-START\n"
msg_frame:
    .asciz "PORTHOLE-FB-FRAME "

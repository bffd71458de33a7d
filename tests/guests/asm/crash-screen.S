/* crash-screen — proves that a crashed guest keeps its last screen: draws a picture, then crashes.
 *
 * Sets 640x480x32 through DISPI (vbe_set_mode), finds the framebuffer with fb_base() and fills it with eight
 * horizontal bands of 60 rows each, band = y / 60, pixels 0x00RRGGBB:
 *     0xFFFFFF white, 0xFFFF00 yellow, 0x00FFFF cyan, 0x00FF00 green,
 *     0xFF00FF magenta, 0xFF0000 red, 0x0000FF blue, 0x000000 black
 * then prints `PORTHOLE-CRASH-SCREEN-READY` on COM1 and executes ud2. start.S's exception handler prints
 * `PORTHOLE-GUEST-EXCEPTION vector=0x06 ...` and triple-faults on purpose, so the VMM sees a shutdown
 * (triple fault) with the picture still in video memory. Under QEMU, -no-reboot turns it into an exit.
 */
    .set XRES, 640
    .set YRES, 480
    .set BAND_PIXELS, XRES * YRES / 8

    .text
    .code64
    .globl guest_main
guest_main:
    movl $XRES, %edi
    movl $YRES, %esi
    call vbe_set_mode
    call fb_base
    movq %rax, %rdi                 /* destination: the framebuffer */
    leaq band_colours(%rip), %rsi
    movl $8, %edx
1:  lodsl                           /* %eax = this band's colour */
    movl $BAND_PIXELS, %ecx
    rep stosl
    decl %edx
    jnz 1b
    leaq msg_ready(%rip), %rdi
    call serial_puts
    ud2
    ret                             /* not reached */

    .section .rodata
    .p2align 2
band_colours:
    .long 0xFFFFFF, 0xFFFF00, 0x00FFFF, 0x00FF00, 0xFF00FF, 0xFF0000, 0x0000FF, 0x000000
msg_ready:
    .asciz "PORTHOLE-CRASH-SCREEN-READY\n"

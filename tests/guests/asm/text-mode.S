/* text-mode — proves the VGA text screen: the 80x25 cell buffer at 0xB8000 (character, attribute) and the
 * CRTC cursor registers, which porthole-vmm renders into its console with an 8x16 font.
 *
 * Screen contents (row r, column c is cell r * 80 + c, at 0xB8000 + 2 * cell):
 *   every cell first cleared to 0x20 ' ' with attribute 0x07 (vga_text_clear: also display start
 *   address 0 and cursor shape scan lines 13-14, enabled, as the BIOS sets mode 3), then
 *   row 0, columns 0-17:   "PORTHOLE TEXT MODE", attribute 0x1F (white on blue)
 *   rows 1-4:              character codes 0..255 in order, attribute 0x07 (light grey on black):
 *                          code k is at cell 80 + k (codes 0-79 on row 1, 80-159 row 2, 160-239 row 3,
 *                          240-255 on row 4, columns 0-15)
 *   row 24, columns 0-10:  "bottom line", attribute 0x4E (yellow on red)
 *   everything else:       ' ' with attribute 0x07
 *   cursor (CRTC 0x0E/0x0F): row 10, column 5 (cell 805 = 0x325)
 * No display mode is set: the guest relies on the text mode the VMM (or SeaBIOS under QEMU) starts in.
 *
 * Serial (COM1): `PORTHOLE-TEXT-READY` once the screen is written. Then it halts forever with interrupts
 * off (cli; hlt); the test captures the screen and powers the VM off.
 */
    .set VGA_TEXT, 0xB8000

    .text
    .code64
    .globl guest_main
guest_main:
    call vga_text_clear

    movl $VGA_TEXT, %edi            /* row 0 */
    leaq msg_title(%rip), %rsi
    movl $0x1F, %edx
    call put_text

    movl $VGA_TEXT + 2 * 80, %edi   /* rows 1-4: codes 0..255 */
    xorl %eax, %eax
    movb $0x07, %ah
1:  stosw
    incb %al
    jnz 1b

    movl $VGA_TEXT + 2 * 80 * 24, %edi  /* row 24 */
    leaq msg_bottom(%rip), %rsi
    movl $0x4E, %edx
    call put_text

    movl $10 * 80 + 5, %edi
    call vga_set_cursor

    leaq msg_ready(%rip), %rdi
    call serial_puts
    cli
2:  hlt
    jmp 2b

/* put_text(%rdi = cell address, %rsi = NUL-terminated string, %dl = attribute) */
put_text:
    movb %dl, %ah
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    stosw
    incq %rsi
    jmp 1b
2:  ret

    .section .rodata
msg_title:
    .asciz "PORTHOLE TEXT MODE"
msg_bottom:
    .asciz "bottom line"
msg_ready:
    .asciz "PORTHOLE-TEXT-READY\n"

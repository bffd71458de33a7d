/* demo — the demo VM a newcomer sees in the Porthole window: a title, a moving porthole, and typed keys.
 *
 * Screen (640x480x32 through DISPI, vbe_set_mode; framebuffer from fb_base), drawn once: a dark blue
 * background, "PORTHOLE" in an 8x8 font scaled 6x (with a drop shadow) centred near the top, a subtitle,
 * a "TYPE ON THE KEYBOARD" label over a text box, and a one-line footer. Then, paced by the PIT (IRQ0 at
 * 30 Hz, vector 0x20), one animation frame per tick (or one per wake-up when the guest is slower than
 * that): a porthole (brass ring, outer radius 40, 8 rivets; through the glass a sea whose horizon bobs
 * and rolls) moves 3 pixels a frame left and right across a band below the title, and its rim pulses.
 * A frame only repaints the porthole's 81 rows (~5500 pixels: the ring at its new place plus the strip it
 * left), so it stays cheap when KVM emulates guest code. The text cursor blinks every 16 frames.
 *
 * Keyboard: the i8042 is set up polled with interrupts off (aux port disabled, translation to scan-code
 * set 1 forced on, the keyboard sent 0xF4 enable-scanning), then IRQ1 (vector 0x21) queues the keyboard
 * bytes and the main loop handles them between frames. Every byte is reported on COM1; make codes (set 1)
 * of A-Z, 0-9, space, '-' and '.' draw the character (8x8 scaled 3x, upper case) at the cursor of the
 * text box (23 characters; typing a 24th clears the line first); Backspace (0x0E) erases the previous
 * character; Enter (0x1C, or keypad Enter E0 1C) clears the line. Other E0-prefixed keys draw nothing.
 * When nothing is pending it sleeps with sti; hlt, so an idle demo VM costs the host next to nothing.
 *
 * Serial (COM1):
 *   `PORTHOLE-DEMO-READY`       the screen is drawn and the keyboard interrupt is on (printed once)
 *   `PORTHOLE-KEY xx`           one per keyboard byte read from port 0x60 (status bit 5 clear), two
 *                               lower-case hex digits, exactly as kbd-echo (`sendkey a`: 1e then 9e)
 *   `PORTHOLE-DEMO-FRAME <n>`   after every 32nd animation frame (decimal: 32, 64, ...)
 * Bytes received on COM1 are echoed back on COM1 (CR as CR LF, DEL as BS SP BS), like a terminal.
 * It never powers off by itself: it runs until the host stops it.
 */
    .set XRES, 640
    .set YRES, 480
    .set STRIDE, XRES * 4
    .set PIT_DIVISOR, 39773         /* 1193182 / 39773 = 30.0 Hz */
    .set COM1, 0x3f8
    .set KBC_DATA, 0x60
    .set KBC_STATUS, 0x64           /* read: status; write: command */
    .set POLLS, 20000               /* poll budget per i8042 wait (each poll is a port read) */
    .set RING, 64                   /* entries of the IRQ1 -> main loop queue (power of two) */

    /* Colours, 0x00RRGGBB. Bit 31 set in a glyph background means "transparent". */
    .set BG, 0x1E2A3A
    .set TITLE_FG, 0xF2E8D5
    .set SHADOW, 0x0E151E
    .set SUB_FG, 0x8FA3B8
    .set FOOT_FG, 0x5F738A
    .set BOX_BG, 0x2A3A50
    .set TEXT_FG, 0xE8F0F8
    .set CURSOR_FG, 0xF0C040
    .set SKY, 0xA8D8F0
    .set SEA, 0x2070B0
    .set RIVET, 0x6B4E1C
    .set RIVET_SIZE, 4              /* rivets are RIVET_SIZE x RIVET_SIZE squares */
    .set TRANSPARENT, 0x80000000

    /* Layout. */
    .set TITLE_Y, 40                /* "PORTHOLE": 8 glyphs x 48 px, centred */
    .set SUB_Y, 104
    .set R_OUT, 40                  /* porthole: outer and inner (glass) radius */
    .set R_IN, 30
    .set CY, 220                    /* porthole centre row */
    .set BAND_X0, 24                /* the porthole stays within these columns */
    .set BAND_X1, 616
    .set SPEED, 3                   /* pixels per frame */
    .set LABEL_Y, 308
    .set BOX_X, 20
    .set BOX_Y, 336
    .set BOX_W, 600
    .set BOX_H, 48
    .set TEXT_X, 36                 /* text line: 23 cells of 24x24 px (8x8 glyphs scaled 3x) */
    .set TEXT_Y, 348
    .set TEXT_SCALE, 3
    .set CELL, 8 * TEXT_SCALE
    .set TEXT_COLS, 23
    .set CURSOR_W, 7 * TEXT_SCALE
    .set CURSOR_H, TEXT_SCALE       /* the glyph's blank bottom row */
    .set FOOT_Y, 448

    .text
    .code64
    .globl guest_main
guest_main:
    /* Graphics mode, then the static screen. */
    movl $XRES, %edi
    movl $YRES, %esi
    call vbe_set_mode
    call fb_base
    movq %rax, fb(%rip)
    xorl %edi, %edi
    xorl %esi, %esi
    movl $XRES, %edx
    movl $YRES, %ecx
    movl $BG, %r8d
    call fill_rect

    leaq str_title(%rip), %rdi      /* shadow first, then the title over it (transparent background) */
    movl $(XRES - 8 * 8 * 6) / 2 + 4, %esi
    movl $TITLE_Y + 4, %edx
    movl $6, %ecx
    movl $SHADOW, %r8d
    movl $TRANSPARENT, %r9d
    call draw_string
    leaq str_title(%rip), %rdi
    movl $(XRES - 8 * 8 * 6) / 2, %esi
    movl $TITLE_Y, %edx
    movl $6, %ecx
    movl $TITLE_FG, %r8d
    movl $TRANSPARENT, %r9d
    call draw_string

    leaq str_sub(%rip), %rdi
    movl $(XRES - (str_sub_end - str_sub) * 16) / 2, %esi
    movl $SUB_Y, %edx
    movl $2, %ecx
    movl $SUB_FG, %r8d
    movl $BG, %r9d
    call draw_string

    leaq str_label(%rip), %rdi
    movl $(XRES - (str_label_end - str_label) * 16) / 2, %esi
    movl $LABEL_Y, %edx
    movl $2, %ecx
    movl $SUB_FG, %r8d
    movl $BG, %r9d
    call draw_string

    movl $BOX_X, %edi
    movl $BOX_Y, %esi
    movl $BOX_W, %edx
    movl $BOX_H, %ecx
    movl $BOX_BG, %r8d
    call fill_rect

    leaq str_foot(%rip), %rdi
    movl $(XRES - (str_foot_end - str_foot) * 8) / 2, %esi
    movl $FOOT_Y, %edx
    movl $1, %ecx
    movl $FOOT_FG, %r8d
    movl $BG, %r9d
    call draw_string

    call porthole_init
    xorl %edi, %edi                 /* frame 0: the porthole in its first place */
    call draw_porthole
    movl $CURSOR_FG, %edi
    call draw_cursor

    call kbd_init

    /* Interrupts: IRQ0 (PIT, the frame clock) and IRQ1 (keyboard). */
    movl $0x20, %edi
    leaq pit_irq(%rip), %rsi
    call idt_set_gate
    movl $0x21, %edi
    leaq kbd_irq(%rip), %rsi
    call idt_set_gate
    call spurious_irqs_install
    call lapic_enable
    movl $0xFC, %edi                /* master: IRQ0 and IRQ1 */
    movl $0xFF, %esi                /* slave: all masked */
    call pic_init
    movl $PIT_DIVISOR, %edi
    call pit_set_periodic
    sti

    leaq msg_ready(%rip), %rdi
    call serial_puts

    /* Main loop: callee-saved registers are ours (we never return).
       %r12 frames drawn, %r13 the tick count of the last frame, %r14 1 after an 0xE0 prefix byte.
       Keys first, then a frame when the tick count moved; with nothing to do, sti; hlt (no interrupt can
       slip in between the check and the hlt). */
    xorl %r12d, %r12d
    movl ticks(%rip), %r13d
    xorl %r14d, %r14d
main_loop:
    movw $COM1 + 5, %dx             /* serial input: echoed back as typed (polled; the PIT tick wakes us) */
    inb %dx, %al
    testb $1, %al
    jz 0f
    movw $COM1, %dx
    inb %dx, %al
    movzbl %al, %edi
    call serial_echo
    jmp main_loop
0:  cli
    movl ring_tail(%rip), %eax
    cmpl ring_head(%rip), %eax
    jne 1f
    movl ticks(%rip), %eax
    cmpl %r13d, %eax
    jne 2f
    sti
    hlt
    jmp main_loop
1:  movl %eax, %ecx                 /* a key byte */
    andl $RING - 1, %ecx
    leaq ring(%rip), %rdx
    movzbl (%rdx,%rcx), %ebx
    incl %eax
    movl %eax, ring_tail(%rip)
    sti
    movl %ebx, %edi
    call handle_key
    jmp main_loop
2:  movl %eax, %r13d                /* a frame */
    sti
    incl %r12d
    movl %r12d, %edi
    call draw_porthole
    movl $CURSOR_FG, %edi           /* the cursor blinks: 16 frames on, 16 off */
    testl $16, %r12d
    jz 3f
    movl $BOX_BG, %edi
3:  call draw_cursor
    testl $31, %r12d
    jnz main_loop
    leaq msg_frame(%rip), %rdi
    call serial_puts
    movl %r12d, %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    jmp main_loop

/* serial_echo(%edi = byte from COM1): writes it back; a carriage return becomes CR LF, DEL (0x7f) erases the
   previous character on a terminal (BS, space, BS). */
serial_echo:
    cmpl $'\r', %edi
    jne 1f
    call serial_putc
    movl $'\n', %edi
    jmp serial_putc
1:  cmpl $0x7f, %edi
    jne 2f
    movl $8, %edi
    call serial_putc
    movl $' ', %edi
    call serial_putc
    movl $8, %edi
2:  jmp serial_putc

/* handle_key(%edi = byte from port 0x60): reports it on COM1, then acts on it (%r14 is the 0xE0 flag). */
handle_key:
    pushq %rbx
    movl %edi, %ebx
    leaq msg_key(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    movl $2, %esi
    call serial_puthex
    movl $'\n', %edi
    call serial_putc
    cmpl $0xE0, %ebx
    jne 1f
    movl $1, %r14d                  /* prefix: the next byte is an extended key */
    jmp 9f
1:  testl $0x80, %ebx
    jnz 8f                          /* break code (or another prefix): nothing to draw */
    cmpl $0x1C, %ebx
    je 3f                           /* Enter, main or keypad (E0 1C) */
    testl %r14d, %r14d
    jnz 8f                          /* other extended keys draw nothing */
    cmpl $0x0E, %ebx
    je 2f
    cmpl $keymap_end - keymap, %ebx
    jae 8f
    leaq keymap(%rip), %rax
    movzbl (%rax,%rbx), %ebx
    testl %ebx, %ebx
    jz 8f
    movl %ebx, %edi
    call text_type
    jmp 8f
2:  call text_backspace
    jmp 8f
3:  call text_clear
8:  xorl %r14d, %r14d
9:  popq %rbx
    ret

/* ---- The text line ---- */

/* text_type(%edi = character): draws it at the cursor and advances; a full line is cleared first. */
text_type:
    pushq %rbx
    movl %edi, %ebx
    cmpl $TEXT_COLS, text_col(%rip)
    jb 1f
    call text_clear
1:  movl $BOX_BG, %edi              /* the cursor bar sits under the next cell: remove it */
    call draw_cursor
    movl %ebx, %edi
    call text_draw_at_cursor
    incl text_col(%rip)
    movl $CURSOR_FG, %edi
    call draw_cursor
    popq %rbx
    ret

/* text_backspace(): erases the character before the cursor, which moves back onto it. */
text_backspace:
    cmpl $0, text_col(%rip)
    je 1f
    movl $BOX_BG, %edi
    call draw_cursor
    decl text_col(%rip)
    movl $' ', %edi
    call text_draw_at_cursor
    movl $CURSOR_FG, %edi
    call draw_cursor
1:  ret

/* text_clear(): empties the line; the cursor goes back to cell 0. */
text_clear:
    movl $TEXT_X, %edi
    movl $TEXT_Y, %esi
    movl $TEXT_COLS * CELL + CURSOR_W, %edx
    movl $CELL, %ecx
    movl $BOX_BG, %r8d
    call fill_rect
    movl $0, text_col(%rip)
    movl $CURSOR_FG, %edi
    jmp draw_cursor

/* text_draw_at_cursor(%edi = character): the glyph, opaque on the box colour, in the cursor's cell. */
text_draw_at_cursor:
    movl %edi, %edx
    imull $CELL, text_col(%rip), %edi
    addl $TEXT_X, %edi
    movl $TEXT_Y, %esi
    movl $TEXT_SCALE, %ecx
    movl $TEXT_FG, %r8d
    movl $BOX_BG, %r9d
    jmp draw_char

/* draw_cursor(%edi = colour): the cursor bar, in the bottom (blank) glyph row of the cursor's cell. */
draw_cursor:
    movl %edi, %r8d
    imull $CELL, text_col(%rip), %edi
    addl $TEXT_X, %edi
    movl $TEXT_Y + CELL - CURSOR_H, %esi
    movl $CURSOR_W, %edx
    movl $CURSOR_H, %ecx
    jmp fill_rect

/* ---- The porthole ---- */

/* porthole_init(): its tables, one entry per row (dy = -R_OUT..R_OUT): outer[] the ring's and inner[] the
   glass's half-width (-1 on rows the glass does not reach), both max x >= 0 with x*x + dy*dy <= r*r + r
   (the + r rounds the circle), and rivet_dx[] the column offset of the rivets on that row (-1: none);
   and its starting place and direction. */
porthole_init:
    pushq %rbx
    pushq %r12
    movl $-R_OUT, %ebx
    leaq outer+R_OUT*4(%rip), %r12  /* outer[dy] = (%r12,dy,4); likewise inner[] and rivet_dx[] */
1:  movl %ebx, %edi
    imull %edi, %edi
    movl $R_OUT * R_OUT + R_OUT, %esi
    call half_width
    movslq %ebx, %rcx
    movl %eax, (%r12,%rcx,4)
    movl $-1, %eax
    cmpl $-R_IN, %ebx
    jl 2f
    cmpl $R_IN, %ebx
    jg 2f
    movl %ebx, %edi
    imull %edi, %edi
    movl $R_IN * R_IN + R_IN, %esi
    call half_width
2:  movslq %ebx, %rcx
    movl %eax, inner - outer(%r12,%rcx,4)
    movl $-1, rivet_dx - outer(%r12,%rcx,4)
    incl %ebx
    cmpl $R_OUT, %ebx
    jle 1b
    leaq rivets(%rip), %rsi         /* rivet_dx[] rows dy - RIVET_SIZE/2 .. dy + RIVET_SIZE/2 - 1 */
    movl $(rivets_end - rivets) / 2, %ecx
3:  movsbq (%rsi), %rax             /* dx */
    movsbq 1(%rsi), %rdx            /* dy */
    leaq -RIVET_SIZE / 2(%rdx), %rdx
    movl $RIVET_SIZE, %edi
4:  movl %eax, rivet_dx - outer(%r12,%rdx,4)
    incq %rdx
    decl %edi
    jnz 4b
    addq $2, %rsi
    decl %ecx
    jnz 3b
    movl $BAND_X0 + R_OUT + 100, ph_cx(%rip)
    movl $SPEED, ph_vx(%rip)
    popq %r12
    popq %rbx
    ret

/* half_width(%edi = dy*dy, %esi = limit >= dy*dy) -> %eax: the largest x >= 0 with x*x + dy*dy <= limit */
half_width:
    xorl %eax, %eax
1:  leal 1(%rax), %ecx
    imull %ecx, %ecx
    addl %edi, %ecx
    cmpl %esi, %ecx
    jg 2f
    incl %eax
    jmp 1b
2:  ret

/* draw_porthole(%edi = frame number n): moves the porthole SPEED pixels (bouncing off the band's ends)
   and repaints its rows: on each row the strip it left (background), the rim, the glass split at the
   horizon into sky and sea, and the rivets; row by row, so a capture taken mid-frame shows at worst
   a SPEED-pixel step. Sine table phases: rim brightness n, roll (tilt) n/2, bob (level) 3n/4. */
draw_porthole:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movl %edi, %ebx
    leaq sine(%rip), %r8

    /* New centre column %r12d; delta = new - old %r13d. */
    movl ph_cx(%rip), %eax
    movl ph_vx(%rip), %ecx
    leal (%rax,%rcx), %edx
    cmpl $BAND_X0 + R_OUT, %edx
    jl 1f
    cmpl $BAND_X1 - R_OUT - 1, %edx
    jle 2f
1:  negl %ecx                       /* bounce */
    movl %ecx, ph_vx(%rip)
    leal (%rax,%rcx), %edx
2:  movl %edx, %r12d
    subl %eax, %edx
    movl %edx, %r13d
    movl %r12d, ph_cx(%rip)

    /* Rim: brass, brightness +-16 with sine[n]. */
    movl %ebx, %eax
    andl $63, %eax
    movsbl (%r8,%rax), %eax
    sarl $3, %eax
    leal 0xC8(%rax), %edx           /* red */
    shll $16, %edx
    leal 0x98(%rax), %ecx           /* green */
    shll $8, %ecx
    orl %ecx, %edx
    sarl $1, %eax
    leal 0x40(%rax), %ecx           /* blue */
    orl %ecx, %edx
    movl %edx, ph_rim(%rip)

    /* Horizon through (x, level) with slope t/256: a glass pixel (x, dy) is sea when
       (dy - level) * 256 > x * t. t = +-71 with sine[n/2], made odd so that it is never 0;
       level = +-7 px with sine[3n/4]. */
    movl %ebx, %eax
    shrl $1, %eax
    andl $63, %eax
    movsbl (%r8,%rax), %eax
    imull $9, %eax
    sarl $4, %eax
    orl $1, %eax
    movl $SEA, %ecx                 /* t > 0: sea left of the split, sky right of it */
    movl $SKY, %edx
    movl $0, ph_neg(%rip)
    testl %eax, %eax
    jns 3f
    negl %eax                       /* t < 0: the mirror image */
    xchgl %ecx, %edx
    movl $1, ph_neg(%rip)
3:  movl %eax, ph_tilt(%rip)        /* |t| */
    movl %ecx, ph_left(%rip)
    movl %edx, ph_right(%rip)
    leal (%rbx,%rbx,2), %eax
    shrl $2, %eax
    andl $63, %eax
    movsbl (%r8,%rax), %eax
    sarl $4, %eax
    movl %eax, ph_level(%rip)

    /* Rows: %rbx dy (-R_OUT..R_OUT), %rbp the row's address, %r14d outer, %r15d inner half-width. */
    movq $-R_OUT, %rbx
    movq fb(%rip), %rbp
    addq $(CY - R_OUT) * STRIDE, %rbp
row:
    leaq outer+R_OUT*4(%rip), %rax
    movl (%rax,%rbx,4), %r14d
    movl inner - outer(%rax,%rbx,4), %r15d

    /* The strip left behind: moving right [old - xo, new - xo), moving left [new + xo + 1, old + xo + 1). */
    testl %r13d, %r13d
    jz 6f
    js 4f
    movl %r12d, %esi
    subl %r13d, %esi
    subl %r14d, %esi
    movl %r12d, %edx
    subl %r14d, %edx
    jmp 5f
4:  leal 1(%r12,%r14), %esi
    movl %esi, %edx
    subl %r13d, %edx
5:  movq %rbp, %rdi
    movl $BG, %ecx
    call span

6:  testl %r15d, %r15d
    jns 7f
    movl %r12d, %esi                /* no glass on this row: rim [cx - xo, cx + xo] */
    subl %r14d, %esi
    leal 1(%r12,%r14), %edx
    movq %rbp, %rdi
    movl ph_rim(%rip), %ecx
    call span
    jmp 10f

7:  movl %r12d, %esi                /* rim [cx - xo, cx - xi) and (cx + xi, cx + xo] */
    subl %r14d, %esi
    movl %r12d, %edx
    subl %r15d, %edx
    movq %rbp, %rdi
    movl ph_rim(%rip), %ecx
    call span
    leal 1(%r12,%r15), %esi
    leal 1(%r12,%r14), %edx
    movq %rbp, %rdi
    movl ph_rim(%rip), %ecx
    call span

    /* Glass [cx - xi, cx + xi]: split at s = +-(dy - level) * 256 / |t|, clamped to [-xi, xi + 1]. */
    movl %ebx, %eax
    subl ph_level(%rip), %eax
    shll $8, %eax
    cltd
    idivl ph_tilt(%rip)
    cmpl $0, ph_neg(%rip)
    je 8f
    negl %eax
8:  movl %r15d, %ecx
    negl %ecx
    cmpl %ecx, %eax
    jge 9f
    movl %ecx, %eax
9:  leal 1(%r15), %ecx
    cmpl %ecx, %eax
    jle 11f
    movl %ecx, %eax
11: leal (%r12,%rax), %r8d          /* the split column (span leaves %r8 alone) */
    movl %r12d, %esi
    subl %r15d, %esi
    movl %r8d, %edx
    movq %rbp, %rdi
    movl ph_left(%rip), %ecx
    call span
    movl %r8d, %esi
    leal 1(%r12,%r15), %edx
    movq %rbp, %rdi
    movl ph_right(%rip), %ecx
    call span

10: leaq rivet_dx+R_OUT*4(%rip), %rax  /* rivets: RIVET_SIZE pixels at cx - dx and cx + dx */
    movl (%rax,%rbx,4), %r14d
    testl %r14d, %r14d
    js 13f
    movl %r12d, %esi
    subl %r14d, %esi
    subl $RIVET_SIZE / 2, %esi
    leal RIVET_SIZE(%rsi), %edx
    movq %rbp, %rdi
    movl $RIVET, %ecx
    call span
    leal -RIVET_SIZE / 2(%r12,%r14), %esi
    leal RIVET_SIZE(%rsi), %edx
    movq %rbp, %rdi
    movl $RIVET, %ecx
    call span
13: addq $STRIDE, %rbp
    incq %rbx
    cmpq $R_OUT, %rbx
    jle row

    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* ---- Drawing primitives (the framebuffer address is in fb) ---- */

/* span(%rdi = row address, %esi = x0, %edx = x1, %ecx = colour): pixels x0 <= x < x1 of that row; nothing
   when x1 <= x0. Clobbers only %rax, %rcx, %rdx, %rsi, %rdi. */
span:
    subl %esi, %edx
    jle 1f
    movslq %esi, %rsi
    leaq (%rdi,%rsi,4), %rdi
    movl %ecx, %eax
    movl %edx, %ecx
    rep stosl
1:  ret

/* fill_rect(%edi = x, %esi = y, %edx = width, %ecx = height, %r8d = colour) */
fill_rect:
    testl %edx, %edx
    jle 2f
    testl %ecx, %ecx
    jle 2f
    imull $STRIDE, %esi, %eax
    leal (%eax,%edi,4), %eax
    addq fb(%rip), %rax
    movq %rax, %r9                  /* row address */
    movl %ecx, %r10d                /* rows left */
    movl %edx, %r11d
1:  movq %r9, %rdi
    movl %r11d, %ecx
    movl %r8d, %eax
    rep stosl
    addq $STRIDE, %r9
    decl %r10d
    jnz 1b
2:  ret

/* draw_char(%edi = x, %esi = y, %edx = character, %ecx = scale, %r8d = foreground, %r9d = background, or
   TRANSPARENT to leave unset pixels alone): an 8x8 glyph from font (bit 7 of a row byte is the left
   pixel) as an (8 * scale)-pixel square. Characters outside 0x20..0x5A draw as a space. */
draw_char:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movzbl %dl, %eax
    subl $0x20, %eax
    cmpl $(font_end - font) / 8, %eax
    jb 1f
    xorl %eax, %eax
1:  leaq font(%rip), %rbx
    leaq (%rbx,%rax,8), %rbx        /* the glyph's first row */
    imull $STRIDE, %esi, %eax
    leal (%eax,%edi,4), %eax
    addq fb(%rip), %rax
    movq %rax, %r12                 /* pixel row address */
    movl %ecx, %r13d                /* scale */
    movl $8, %r14d                  /* glyph rows left */
2:  movzbl (%rbx), %r15d
    movl %r13d, %ebp                /* pixel rows left in this glyph row */
3:  movq %r12, %rdi
    movl %r15d, %r10d
    movl $8, %r11d                  /* glyph columns left */
4:  movl %r8d, %eax
    testb $0x80, %r10b
    jnz 5f
    movl %r9d, %eax
    testl %eax, %eax
    jns 5f
    leaq (%rdi,%r13,4), %rdi        /* transparent: skip */
    jmp 6f
5:  movl %r13d, %ecx
    rep stosl
6:  shll $1, %r10d
    decl %r11d
    jnz 4b
    addq $STRIDE, %r12
    decl %ebp
    jnz 3b
    incq %rbx
    decl %r14d
    jnz 2b
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* draw_string(%rdi = NUL-terminated string, %esi = x, %edx = y, %ecx = scale, %r8d = foreground,
   %r9d = background or TRANSPARENT): draw_char for each character, 8 * scale pixels apart. */
draw_string:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rdi, %rbx
    movl %esi, %ebp
    movl %edx, %r12d
    movl %ecx, %r13d
    movl %r8d, %r14d
    movl %r9d, %r15d
1:  movzbl (%rbx), %edx
    testl %edx, %edx
    jz 2f
    movl %ebp, %edi
    movl %r12d, %esi
    movl %r13d, %ecx
    movl %r14d, %r8d
    movl %r15d, %r9d
    call draw_char
    leal (,%r13d,8), %eax
    addl %eax, %ebp
    incq %rbx
    jmp 1b
2:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* ---- i8042 keyboard ---- */

/* kbd_init(): polled, interrupts off. Drains stale bytes, disables the aux (mouse) port (0xA7), writes the
   configuration byte with the keyboard IRQ off, keyboard clock on, aux clock off and translation on
   (bit 6: the keyboard's set 2 arrives as set 1), sends 0xF4 (enable scanning) to the keyboard and eats
   its ACK, drains again, then turns the keyboard IRQ (bit 0) on. */
kbd_init:
    pushq %rbx
    call kbc_drain_polled
    movb $0xA7, %dil
    call kbc_command
    movb $0x20, %dil                /* read the configuration byte */
    call kbc_command
    call kbc_read
    movl %eax, %ebx
    testl %eax, %eax
    jns 1f
    movl $0x47, %ebx                /* no answer: assume the usual default */
1:  andl $~0x13, %ebx               /* IRQ1, IRQ12 off; keyboard clock on */
    orl $0x60, %ebx                 /* aux clock off; translation on */
    movb $0x60, %dil
    call kbc_command
    movl %ebx, %edi
    call kbc_write_data
    movb $0xF4, %dil                /* keyboard: enable scanning */
    call kbc_write_data
    call kbc_read                   /* its ACK (0xfa), or nothing */
    call kbc_drain_polled
    orl $0x01, %ebx                 /* IRQ1 on */
    movb $0x60, %dil
    call kbc_command
    movl %ebx, %edi
    call kbc_write_data
    popq %rbx
    ret

/* kbc_drain_polled(): reads and drops up to 32 bytes the controller holds */
kbc_drain_polled:
    movl $32, %ecx
1:  inb $KBC_STATUS, %al
    testb $1, %al
    jz 2f
    inb $KBC_DATA, %al
    decl %ecx
    jnz 1b
2:  ret


/* ---- Interrupt handlers ---- */

/* IRQ0: one more tick of the 30 Hz frame clock. */
pit_irq:
    pushq %rax
    incl ticks(%rip)
    movb $0x20, %al                 /* EOI: master */
    outb %al, $0x20
    popq %rax
    iretq

/* IRQ1: queues every keyboard byte the controller holds (at most 16); bytes with status bit 5 (aux) set
   are dropped, and so is a byte that finds the queue full. */
kbd_irq:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    movl $16, %ecx
1:  inb $KBC_STATUS, %al
    testb $1, %al
    jz 3f
    movb %al, %dl
    inb $KBC_DATA, %al
    testb $0x20, %dl
    jnz 2f
    movl ring_head(%rip), %edx
    movl %edx, %esi
    subl ring_tail(%rip), %esi
    cmpl $RING, %esi
    jae 2f                          /* full */
    movl %edx, %esi
    andl $RING - 1, %esi
    pushq %rdi
    leaq ring(%rip), %rdi
    movb %al, (%rdi,%rsi)
    popq %rdi
    incl %edx
    movl %edx, ring_head(%rip)
2:  decl %ecx
    jnz 1b
3:  movb $0x20, %al                 /* EOI: master */
    outb %al, $0x20
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    .section .rodata
msg_ready:
    .asciz "PORTHOLE-DEMO-READY\n"
msg_key:
    .asciz "PORTHOLE-KEY "
msg_frame:
    .asciz "PORTHOLE-DEMO-FRAME "
str_title:
    .asciz "PORTHOLE"
str_sub:
    .ascii "A KVM DEMO GUEST"
str_sub_end:
    .byte 0
str_label:
    .ascii "TYPE ON THE KEYBOARD:"
str_label_end:
    .byte 0
str_foot:
    .ascii "EVERY SCAN CODE IS ALSO LOGGED ON COM1"
str_foot_end:
    .byte 0

/* Scan-code set 1 make code -> character drawn (0: none), for codes 0x00..0x39. */
keymap:
    .byte 0, 0                      /* 0x00, 0x01 Esc */
    .ascii "1234567890-"            /* 0x02..0x0C */
    .byte 0, 0, 0                   /* 0x0D =, 0x0E Backspace, 0x0F Tab */
    .ascii "QWERTYUIOP"             /* 0x10..0x19 */
    .byte 0, 0, 0, 0                /* 0x1A [, 0x1B ], 0x1C Enter, 0x1D Ctrl */
    .ascii "ASDFGHJKL"              /* 0x1E..0x26 */
    .byte 0, 0, 0, 0, 0             /* 0x27 ;, 0x28 ', 0x29 `, 0x2A left Shift, 0x2B \ */
    .ascii "ZXCVBNM"                /* 0x2C..0x32 */
    .byte 0                         /* 0x33 , */
    .ascii "."                      /* 0x34 */
    .byte 0, 0, 0, 0                /* 0x35 /, 0x36 right Shift, 0x37 keypad *, 0x38 Alt */
    .ascii " "                      /* 0x39 */
keymap_end:
    .if keymap_end - keymap - 0x3A
    .error "keymap must cover 0x00..0x39"
    .endif

/* Rivet centres, (dx, dy) from the porthole's centre, on the middle of the rim (radius 35): each stands
   for itself and its mirror image (-dx, dy), so these five make eight rivets. Rows must not overlap. */
rivets:
    .byte 0, -35, 25, -25, 35, 0, 25, 25, 0, 35
rivets_end:

/* round(127 * sin(2 * pi * i / 64)), i = 0..63 */
sine:
    .byte 0, 12, 25, 37, 49, 60, 71, 81, 90, 98, 106, 112, 117, 122, 125, 126, 127, 126, 125, 122, 117, 112, 106, 98, 90, 81, 71, 60, 49, 37, 25, 12
    .byte 0, -12, -25, -37, -49, -60, -71, -81, -90, -98, -106, -112, -117, -122, -125, -126, -127, -126, -125, -122, -117, -112, -106, -98, -90, -81, -71, -60, -49, -37, -25, -12

/* The font: 8x8 glyphs for ASCII 0x20..0x5A, 8 bytes each (top row first, bit 7 the left pixel); the
   columns 7 and the row 7 are blank, so glyphs drawn side by side are spaced. */
font:
    .byte 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00  /* space */
    .byte 0x18, 0x18, 0x18, 0x18, 0x18, 0x00, 0x18, 0x00  /* '!' */
    .quad 0                                            /* 0x22: no glyph */
    .quad 0                                            /* 0x23: no glyph */
    .quad 0                                            /* 0x24: no glyph */
    .quad 0                                            /* 0x25: no glyph */
    .quad 0                                            /* 0x26: no glyph */
    .quad 0                                            /* 0x27: no glyph */
    .quad 0                                            /* 0x28: no glyph */
    .quad 0                                            /* 0x29: no glyph */
    .quad 0                                            /* 0x2a: no glyph */
    .quad 0                                            /* 0x2b: no glyph */
    .quad 0                                            /* 0x2c: no glyph */
    .byte 0x00, 0x00, 0x00, 0x7c, 0x00, 0x00, 0x00, 0x00  /* '-' */
    .byte 0x00, 0x00, 0x00, 0x00, 0x00, 0x18, 0x18, 0x00  /* '.' */
    .quad 0                                            /* 0x2f: no glyph */
    .byte 0x7c, 0xc6, 0xce, 0xde, 0xf6, 0xe6, 0x7c, 0x00  /* '0' */
    .byte 0x18, 0x38, 0x78, 0x18, 0x18, 0x18, 0x7e, 0x00  /* '1' */
    .byte 0x7c, 0xc6, 0x06, 0x1c, 0x70, 0xc0, 0xfe, 0x00  /* '2' */
    .byte 0x7c, 0xc6, 0x06, 0x3c, 0x06, 0xc6, 0x7c, 0x00  /* '3' */
    .byte 0x0e, 0x1e, 0x36, 0x66, 0xfe, 0x06, 0x06, 0x00  /* '4' */
    .byte 0xfe, 0xc0, 0xfc, 0x06, 0x06, 0xc6, 0x7c, 0x00  /* '5' */
    .byte 0x3c, 0x60, 0xc0, 0xfc, 0xc6, 0xc6, 0x7c, 0x00  /* '6' */
    .byte 0xfe, 0xc6, 0x0c, 0x18, 0x30, 0x30, 0x30, 0x00  /* '7' */
    .byte 0x7c, 0xc6, 0xc6, 0x7c, 0xc6, 0xc6, 0x7c, 0x00  /* '8' */
    .byte 0x7c, 0xc6, 0xc6, 0x7e, 0x06, 0x0c, 0x78, 0x00  /* '9' */
    .byte 0x00, 0x18, 0x18, 0x00, 0x18, 0x18, 0x00, 0x00  /* ':' */
    .quad 0                                            /* 0x3b: no glyph */
    .quad 0                                            /* 0x3c: no glyph */
    .quad 0                                            /* 0x3d: no glyph */
    .quad 0                                            /* 0x3e: no glyph */
    .quad 0                                            /* 0x3f: no glyph */
    .quad 0                                            /* 0x40: no glyph */
    .byte 0x38, 0x6c, 0xc6, 0xc6, 0xfe, 0xc6, 0xc6, 0x00  /* 'A' */
    .byte 0xfc, 0xc6, 0xc6, 0xfc, 0xc6, 0xc6, 0xfc, 0x00  /* 'B' */
    .byte 0x7c, 0xc6, 0xc0, 0xc0, 0xc0, 0xc6, 0x7c, 0x00  /* 'C' */
    .byte 0xf8, 0xcc, 0xc6, 0xc6, 0xc6, 0xcc, 0xf8, 0x00  /* 'D' */
    .byte 0xfe, 0xc0, 0xc0, 0xf8, 0xc0, 0xc0, 0xfe, 0x00  /* 'E' */
    .byte 0xfe, 0xc0, 0xc0, 0xf8, 0xc0, 0xc0, 0xc0, 0x00  /* 'F' */
    .byte 0x7c, 0xc6, 0xc0, 0xde, 0xc6, 0xc6, 0x7e, 0x00  /* 'G' */
    .byte 0xc6, 0xc6, 0xc6, 0xfe, 0xc6, 0xc6, 0xc6, 0x00  /* 'H' */
    .byte 0x7e, 0x18, 0x18, 0x18, 0x18, 0x18, 0x7e, 0x00  /* 'I' */
    .byte 0x1e, 0x06, 0x06, 0x06, 0xc6, 0xc6, 0x7c, 0x00  /* 'J' */
    .byte 0xc6, 0xcc, 0xd8, 0xf0, 0xd8, 0xcc, 0xc6, 0x00  /* 'K' */
    .byte 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xc0, 0xfe, 0x00  /* 'L' */
    .byte 0xc6, 0xee, 0xfe, 0xd6, 0xc6, 0xc6, 0xc6, 0x00  /* 'M' */
    .byte 0xc6, 0xe6, 0xf6, 0xde, 0xce, 0xc6, 0xc6, 0x00  /* 'N' */
    .byte 0x7c, 0xc6, 0xc6, 0xc6, 0xc6, 0xc6, 0x7c, 0x00  /* 'O' */
    .byte 0xfc, 0xc6, 0xc6, 0xfc, 0xc0, 0xc0, 0xc0, 0x00  /* 'P' */
    .byte 0x7c, 0xc6, 0xc6, 0xc6, 0xd6, 0xcc, 0x76, 0x00  /* 'Q' */
    .byte 0xfc, 0xc6, 0xc6, 0xfc, 0xd8, 0xcc, 0xc6, 0x00  /* 'R' */
    .byte 0x7c, 0xc6, 0xc0, 0x7c, 0x06, 0xc6, 0x7c, 0x00  /* 'S' */
    .byte 0x7e, 0x18, 0x18, 0x18, 0x18, 0x18, 0x18, 0x00  /* 'T' */
    .byte 0xc6, 0xc6, 0xc6, 0xc6, 0xc6, 0xc6, 0x7c, 0x00  /* 'U' */
    .byte 0xc6, 0xc6, 0xc6, 0xc6, 0x6c, 0x38, 0x10, 0x00  /* 'V' */
    .byte 0xc6, 0xc6, 0xc6, 0xd6, 0xfe, 0xee, 0xc6, 0x00  /* 'W' */
    .byte 0xc6, 0xc6, 0x6c, 0x38, 0x6c, 0xc6, 0xc6, 0x00  /* 'X' */
    .byte 0xc6, 0xc6, 0x6c, 0x38, 0x38, 0x38, 0x38, 0x00  /* 'Y' */
    .byte 0xfe, 0x06, 0x0c, 0x18, 0x30, 0x60, 0xfe, 0x00  /* 'Z' */
font_end:

    .section .data
    .p2align 2
ring_head:
    .long 0
ring_tail:
    .long 0
ticks:
    .long 0

    .section .bss
    .p2align 3
fb:
    .skip 8
text_col:                           /* the cursor's cell, 0..TEXT_COLS */
    .skip 4
ph_cx:                              /* the porthole: centre column, velocity, and this frame's parameters */
    .skip 4
ph_vx:
    .skip 4
ph_rim:
    .skip 4
ph_level:
    .skip 4
ph_tilt:
    .skip 4
ph_neg:
    .skip 4
ph_left:
    .skip 4
ph_right:
    .skip 4
outer:
    .skip (2 * R_OUT + 1) * 4
inner:
    .skip (2 * R_OUT + 1) * 4
rivet_dx:
    .skip (2 * R_OUT + 1) * 4
ring:
    .skip RING

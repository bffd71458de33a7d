/* counter — counts forever, on COM1 and on the VGA text screen, for machine-state (save/restore) tests.
 *
 * At start: clears the text screen, hides the cursor, writes `PORTHOLE COUNTER` on row 1 (white on blue; drawn once, never
 * again, so a restored VM shows it only if its screen memory came back), then, if the command line is
 * a decimal number N, writes one non-zero quadword into every 4 KiB page of N MiB from 16 MiB on (memory
 * a state file must carry), and prints `PORTHOLE-COUNTER-START` (after `PORTHOLE-TOUCHED <N>` when it
 * touched memory).
 * Then forever: n = 1, 2, 3, ...: prints `PORTHOLE-COUNT <n>` and a newline, and writes n as ten digits
 * (zero-padded, yellow on black) at row 0, columns 0-9; then spins about 30000 loop iterations. No
 * interrupts are used: the count only advances while the vCPU runs, so a save/restore may neither skip
 * nor repeat a number (the serial lines of the saved and the restored process concatenate to 1, 2, 3, ...).
 */
    .set VGA_TEXT, 0xB8000
    .set TOUCH_BASE, 16 << 20

    .text
    .code64
    .globl guest_main
guest_main:
    call vga_text_clear
    movl $0x0A, %edi                /* no cursor (it would cover the count's first digit) */
    movl $0x20, %esi
    call crtc_write
    movl $VGA_TEXT + 2 * 80, %edi   /* row 1: the banner */
    leaq msg_banner(%rip), %rsi
    movb $0x1F, %ah
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    stosw
    incq %rsi
    jmp 1b

2:  call touch_memory               /* %rax = MiB touched */
    testq %rax, %rax
    jz 3f
    pushq %rax
    leaq msg_touched(%rip), %rdi
    call serial_puts
    popq %rdi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
3:  leaq msg_start(%rip), %rdi
    call serial_puts

    xorl %ebx, %ebx                 /* the count (callee-saved: ours, we never return) */
4:  incq %rbx
    leaq msg_count(%rip), %rdi
    call serial_puts
    movq %rbx, %rdi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    /* ten digits at row 0, right to left */
    movq %rbx, %rax
    movl $VGA_TEXT + 2 * 9, %edi
    movl $10, %ecx
    movq $10, %rsi
5:  xorl %edx, %edx
    divq %rsi
    addb $'0', %dl
    movb %dl, (%rdi)
    movb $0x0E, 1(%rdi)
    subl $2, %edi
    decl %ecx
    jnz 5b
    movl $30000, %ecx
6:  decl %ecx
    jnz 6b
    jmp 4b

/* touch_memory() -> %rax = MiB touched: the command line as a decimal number N (none, or not a number: 0),
   then one store per 4 KiB page of [16 MiB, 16 MiB + N MiB) (capped at 3 GiB - 16 MiB: below the PCI hole). */
touch_memory:
    xorl %eax, %eax
    movq pvh_start_info(%rip), %rdx
    testq %rdx, %rdx
    jz 9f
    movq 24(%rdx), %rdx             /* hvm_start_info.cmdline_paddr */
    testq %rdx, %rdx
    jz 9f
1:  movzbl (%rdx), %ecx
    subl $'0', %ecx
    cmpl $9, %ecx
    ja 2f
    imulq $10, %rax
    addq %rcx, %rax
    incq %rdx
    cmpq $3056, %rax
    jb 1b
    movq $3056, %rax
2:  testq %rax, %rax
    jz 9f
    movq %rax, %rcx
    shlq $8, %rcx                   /* pages */
    movl $TOUCH_BASE, %edx
3:  movq %rdx, (%rdx)               /* its own address: never zero */
    addq $4096, %rdx
    decq %rcx
    jnz 3b
9:  ret

    .section .rodata
msg_banner:
    .asciz "PORTHOLE COUNTER"
msg_touched:
    .asciz "PORTHOLE-TOUCHED "
msg_start:
    .asciz "PORTHOLE-COUNTER-START\n"
msg_count:
    .asciz "PORTHOLE-COUNT "

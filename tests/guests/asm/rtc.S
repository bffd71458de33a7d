/* rtc — proves the CMOS real-time clock at ports 0x70/0x71 reads as a sane wall-clock date.
 *
 * Waits while Update-In-Progress (register A bit 7) is set, reads seconds/minutes/hours/day/month/year
 * and the century (register 0x32) twice until two reads agree, honours status register B (bit 2: binary
 * instead of BCD, bit 1: 24-hour instead of 12-hour with bit 7 of the hour = PM) and prints
 *     PORTHOLE-RTC YYYY-MM-DD hh:mm:ss
 * zero-padded, in the RTC's own time zone (QEMU and Porthole: UTC). A century register of 0 (or not a
 * number) counts as 20. When a field is out of range it also prints `PORTHOLE-RTC-INVALID`; when the
 * clock never settles it prints `PORTHOLE-RTC-UNSTABLE` and uses the last read; when Update-In-Progress
 * never clears (no RTC at all: the ports read 0xFF) it prints `PORTHOLE-RTC-FAIL ...`. Then powers off.
 */
    .set SEC, 0
    .set MIN, 1
    .set HOUR, 2
    .set DAY, 3
    .set MON, 4
    .set YEAR, 5
    .set CENT, 6
    .set REGB, 7

    .text
    .code64
    .globl guest_main
guest_main:
    pushq %rbx
    pushq %r12

    /* Two reads that agree, at most 10 tries. */
    movl $10, %r12d
1:  leaq now(%rip), %rdi
    call read_clock
    leaq again(%rip), %rdi
    call read_clock
    movq now(%rip), %rax
    cmpq again(%rip), %rax
    je 2f
    decl %r12d
    jnz 1b
    leaq msg_unstable(%rip), %rdi
    call serial_puts
2:  leaq again(%rip), %rbx          /* the later read */

    /* BCD -> binary unless register B says binary (bit 2). The hour's PM flag (bit 7) goes first. */
    movzbl HOUR(%rbx), %eax
    movl %eax, %r12d
    andl $0x80, %r12d               /* PM flag (12-hour mode only) */
    andb $0x7f, HOUR(%rbx)
    testb $0x04, REGB(%rbx)
    jnz 4f
    xorl %ecx, %ecx
3:  movzbl (%rbx,%rcx), %eax        /* bytes 0..6: sec, min, hour, day, month, year, century */
    movl %eax, %edx
    shrl $4, %edx
    andl $0xf, %eax
    imull $10, %edx
    addl %edx, %eax
    movb %al, (%rbx,%rcx)
    incl %ecx
    cmpl $7, %ecx
    jb 3b
4:  /* 12-hour mode (register B bit 1 clear): 12 AM = 0, PM adds 12. */
    testb $0x02, REGB(%rbx)
    jnz 5f
    cmpb $12, HOUR(%rbx)
    jne 6f
    movb $0, HOUR(%rbx)
6:  testl %r12d, %r12d
    jz 5f
    addb $12, HOUR(%rbx)
5:  /* A century register of 0 or more than 99 means "not kept": assume 20xx. */
    movzbl CENT(%rbx), %eax
    testl %eax, %eax
    jz 7f
    cmpl $99, %eax
    jbe 8f
7:  movb $20, CENT(%rbx)
8:
    leaq msg_rtc(%rip), %rdi
    call serial_puts
    movzbl CENT(%rbx), %edi
    call put2
    movzbl YEAR(%rbx), %edi
    call put2
    movl $'-', %edi
    call serial_putc
    movzbl MON(%rbx), %edi
    call put2
    movl $'-', %edi
    call serial_putc
    movzbl DAY(%rbx), %edi
    call put2
    movl $' ', %edi
    call serial_putc
    movzbl HOUR(%rbx), %edi
    call put2
    movl $':', %edi
    call serial_putc
    movzbl MIN(%rbx), %edi
    call put2
    movl $':', %edi
    call serial_putc
    movzbl SEC(%rbx), %edi
    call put2
    movl $'\n', %edi
    call serial_putc

    /* Range check. */
    cmpb $59, SEC(%rbx)
    ja 9f
    cmpb $59, MIN(%rbx)
    ja 9f
    cmpb $23, HOUR(%rbx)
    ja 9f
    movb DAY(%rbx), %al
    subb $1, %al
    cmpb $30, %al                   /* day 1..31 */
    ja 9f
    movb MON(%rbx), %al
    subb $1, %al
    cmpb $11, %al                   /* month 1..12 */
    ja 9f
    cmpb $99, YEAR(%rbx)
    ja 9f
    jmp 10f
9:  leaq msg_invalid(%rip), %rdi
    call serial_puts
10: popq %r12
    popq %rbx
    ret

/* read_clock(%rdi = 8-byte buffer): waits (bounded) for UIP to clear, then reads the raw registers.
   When UIP never clears (no RTC: the port reads 0xFF) it reports PORTHOLE-RTC-FAIL and powers off. */
read_clock:
    pushq %rbx
    pushq %r12
    movq %rdi, %rbx
    movl $20000, %r12d              /* UIP stays set < 2 ms; 20000 port reads take far longer */
1:  movl $0x0A, %edi
    call cmos_read
    testb $0x80, %al
    jz 2f
    decl %r12d
    jnz 1b
    leaq msg_stuck(%rip), %rdi
    call serial_puts
    call poweroff
2:  movl $0x00, %edi
    call cmos_read
    movb %al, SEC(%rbx)
    movl $0x02, %edi
    call cmos_read
    movb %al, MIN(%rbx)
    movl $0x04, %edi
    call cmos_read
    movb %al, HOUR(%rbx)
    movl $0x07, %edi
    call cmos_read
    movb %al, DAY(%rbx)
    movl $0x08, %edi
    call cmos_read
    movb %al, MON(%rbx)
    movl $0x09, %edi
    call cmos_read
    movb %al, YEAR(%rbx)
    movl $0x32, %edi
    call cmos_read
    movb %al, CENT(%rbx)
    movl $0x0B, %edi
    call cmos_read
    movb %al, REGB(%rbx)
    popq %r12
    popq %rbx
    ret

/* put2(%edi = 0..99): two decimal digits */
put2:
    pushq %rbx
    movl %edi, %eax
    xorl %edx, %edx
    movl $10, %ecx
    divl %ecx
    movl %edx, %ebx
    leal '0'(%rax), %edi
    call serial_putc
    leal '0'(%rbx), %edi
    call serial_putc
    popq %rbx
    ret

    .section .rodata
msg_rtc:
    .asciz "PORTHOLE-RTC "
msg_invalid:
    .asciz "PORTHOLE-RTC-INVALID\n"
msg_unstable:
    .asciz "PORTHOLE-RTC-UNSTABLE\n"
msg_stuck:
    .asciz "PORTHOLE-RTC-FAIL update-in-progress never clears\n"

    .section .bss
    .p2align 3
now:
    .skip 8
again:
    .skip 8

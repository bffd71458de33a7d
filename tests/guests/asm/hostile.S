/* hostile — proves that a guest writing garbage everywhere cannot crash or wedge the VMM: port I/O and MMIO
 * to unknown or misused devices must be absorbed, and the VM must still power off cleanly afterwards.
 *
 * With interrupts disabled, and pseudo-random data from a fixed-seed LCG (so every run is identical):
 *   1. outb to every I/O port 0x0000-0xFFFF,
 *   2. outw and outl to every 7th port (multiples of 7),
 *   3. inb from every port 0x0000-0xFFFF,
 *   4. 4096 dword writes, then 4096 dword reads, at 0xD0000000 (an unmapped part of the MMIO hole),
 * then COM1 is put back to a sane state (the storm may have set DLAB, loopback or a divisor: divisor 1,
 * LCR 0x03 = 8N1, IER 0, MCR 0x03, FCR 0), `PORTHOLE-HOSTILE-OK` is printed and the guest powers off.
 * It prints `PORTHOLE-HOSTILE-START` first; garbage bytes may appear on COM1 in between (the storm also
 * writes the UART's transmit register).
 *
 * Ports never written (a write there legitimately resets or powers off the machine); a wider access is
 * skipped when any of its bytes falls in one of these:
 *   0x0064         i8042 command register (0xFE pulses reset, 0xD1 writes the output port: A20 / reset)
 *   0x0092         System Control Port A (bit 0: fast reset, bit 1: A20 gate)
 *   0x00F4-0x00F7  QEMU isa-debug-exit (exits QEMU when present; iosize 4)
 *   0x0604-0x0605  ACPI PM1a control (SLP_EN: power-off)
 *   0x0CF8-0x0CFF  PCI configuration mechanism #1, including 0xCF9 (reset control). 0xCF8 is set to 0
 *                  first so that config data cycles are off: on QEMU -M pc a random config write could
 *                  move the ACPI PM base (and so break the power-off) or disable devices.
 * Reads are done everywhere (no port resets the machine on a read).
 *
 * Cost: about 150 000 port exits and 8192 MMIO exits. Measured under QEMU 7.2 -M pc on this machine's
 * nested KVM (PVM): 1.8-2.6 s from START to OK (outb ~0.45 s, outw + outl ~0.35 s, inb ~1.0 s, MMIO ~0.1 s).
 * Under QEMU -M pc the write to 0xB2 (APM) raises an SMI that PVM cannot inject: QEMU prints "KVM: injection
 * failed, SMI lost" and the guest carries on.
 */
    .set SEED, 0x50544831           /* "PTH1" */
    .set MMIO_BASE, 0xD0000000
    .set MMIO_DWORDS, 4096
    .set COM1, 0x3f8

    .text
    .code64
    .globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
    leaq msg_start(%rip), %rdi
    call serial_puts
    cli

    movl $0xCF8, %edx               /* PCI config address: enable bit off */
    xorl %eax, %eax
    outl %eax, %dx

    movl $SEED, %r12d               /* LCG state, used by storm() */
    movl $1, %edi
    movl $1, %esi
    call storm                      /* outb everywhere */
    movl $2, %edi
    movl $7, %esi
    call storm                      /* outw every 7th port */
    movl $4, %edi
    movl $7, %esi
    call storm                      /* outl every 7th port */

    xorl %edx, %edx                 /* inb everywhere */
1:  inb %dx, %al
    incl %edx
    cmpl $0x10000, %edx
    jb 1b

    movl $MMIO_BASE, %edi           /* MMIO writes */
    movl $MMIO_DWORDS, %ecx
2:  imull $1664525, %r12d, %r12d
    addl $1013904223, %r12d
    movl %r12d, (%rdi)
    addq $4, %rdi
    decl %ecx
    jnz 2b
    movl $MMIO_BASE, %edi           /* MMIO reads */
    movl $MMIO_DWORDS, %ecx
3:  movl (%rdi), %eax
    addq $4, %rdi
    decl %ecx
    jnz 3b

    /* COM1 back to 115200 8N1, no interrupts, no loopback, no FIFO. */
    movw $COM1 + 3, %dx
    movb $0x80, %al                 /* LCR: DLAB */
    outb %al, %dx
    movw $COM1 + 0, %dx
    movb $0x01, %al                 /* divisor latch low */
    outb %al, %dx
    movw $COM1 + 1, %dx
    xorl %eax, %eax                 /* divisor latch high */
    outb %al, %dx
    movw $COM1 + 3, %dx
    movb $0x03, %al                 /* LCR: 8N1, DLAB off */
    outb %al, %dx
    movw $COM1 + 1, %dx
    xorl %eax, %eax                 /* IER: no interrupts */
    outb %al, %dx
    movw $COM1 + 4, %dx
    movb $0x03, %al                 /* MCR: DTR | RTS, loopback off */
    outb %al, %dx
    movw $COM1 + 2, %dx
    xorl %eax, %eax                 /* FCR: FIFOs off */
    outb %al, %dx

    leaq msg_ok(%rip), %rdi
    call serial_puts
    popq %r13
    popq %r12
    popq %rbx
    ret

/* storm(%edi = access size 1/2/4, %esi = stride): for every segment of allowed ports, writes LCG data to
   each port p with p % stride == 0 whose whole access [p, p + size) stays inside the segment. The LCG
   state lives in %r12d (the caller's, on purpose). The inner loops are kept short: every instruction is
   emulated on this machine. */
storm:
    pushq %rbx
    pushq %r13
    pushq %r14
    pushq %r15
    movl %edi, %r13d                /* size */
    movl %esi, %r14d                /* stride */
    leaq allowed(%rip), %rbx
1:  movl (%rbx), %eax               /* segment start */
    cmpl $-1, %eax
    je 9f
    addl %r14d, %eax                /* first port: start rounded up to the stride */
    decl %eax
    xorl %edx, %edx
    divl %r14d
    imull %r14d, %eax
    movl %eax, %edx
    movl 4(%rbx), %r15d             /* last allowed port for this size: end - size */
    subl %r13d, %r15d
    addq $8, %rbx
    cmpl %r15d, %edx
    jg 1b
    cmpl $1, %r13d
    je 2f
    cmpl $2, %r13d
    je 3f
4:  imull $1664525, %r12d, %r12d    /* outl loop */
    addl $1013904223, %r12d
    movl %r12d, %eax
    outl %eax, %dx
    addl %r14d, %edx
    cmpl %r15d, %edx
    jle 4b
    jmp 1b
3:  imull $1664525, %r12d, %r12d    /* outw loop */
    addl $1013904223, %r12d
    movl %r12d, %eax
    shrl $16, %eax
    outw %ax, %dx
    addl %r14d, %edx
    cmpl %r15d, %edx
    jle 3b
    jmp 1b
2:  imull $1664525, %r12d, %r12d    /* outb loop */
    addl $1013904223, %r12d
    movl %r12d, %eax
    shrl $24, %eax
    outb %al, %dx
    addl %r14d, %edx
    cmpl %r15d, %edx
    jle 2b
    jmp 1b
9:  popq %r15
    popq %r14
    popq %r13
    popq %rbx
    ret

    .section .rodata
    .p2align 2
/* [start, end) ranges of ports that may be written: the complement of the list at the top. */
allowed:
    .long 0x0000, 0x0064
    .long 0x0065, 0x0092
    .long 0x0093, 0x00F4
    .long 0x00F8, 0x0604
    .long 0x0606, 0x0CF8
    .long 0x0D00, 0x10000
    .long -1, -1
msg_start:
    .asciz "PORTHOLE-HOSTILE-START\n"
msg_ok:
    .asciz "\nPORTHOLE-HOSTILE-OK\n"

/* smp — proves that every vCPU the ACPI MADT announces can be started and runs guest code.
 *
 * The BSP counts the enabled Processor Local APIC entries (type 0, flags bit 0) of the MADT, prints
 * `PORTHOLE-CPU apic=<id>` for itself, then wakes the application processors with INIT / SIPI / SIPI
 * (all-excluding-self shorthand). Each AP runs a real-mode trampoline copied to 0x8000 (SIPI vector 0x08),
 * goes protected -> long mode on start.S's GDT and page tables, takes its own stack from ap_stacks by an
 * atomic counter, prints `PORTHOLE-CPU apic=<id>` under a spinlock, does its share of the work below,
 * checks in and parks (cli; hlt).
 *
 * The work, done by every CPU k (0 = the BSP, then the APs in the order they took their stacks):
 *   - a sum: i*i for i = k*1000+1 .. (k+1)*1000 into its own slot work_sums[k];
 *   - a contest: a barrier (each CPU counts itself in and spins until all the MADT announced are in, at
 *     most 1 000 000 polls, so that the CPUs run the contest together), then 5000 `lock xadd` increments
 *     of one shared counter; each CPU checks that the values xadd hands it strictly increase.
 * The BSP waits (at most 2 s, timed with the PIT) until all of them checked in, waits 100 ms more to catch
 * CPUs the MADT did not announce, checks every slot against n(n+1)(2n+1)/6 differences and the counter
 * against 5000 * CPUs, and prints one of
 *     PORTHOLE-SMP-WORK sums=<n> counter=<5000 n>  then  PORTHOLE-SMP-OK cpus=<n>
 *     PORTHOLE-SMP-FAIL expected=<n> seen=<m>      (n from the MADT, m = CPUs that checked in, BSP included)
 *     PORTHOLE-SMP-FAIL sum cpu=<k> got=<s> want=<t>
 *     PORTHOLE-SMP-FAIL counter=<c> want=<5000 n> xadd-order-errors=<e>
 *     PORTHOLE-SMP-FAIL no-madt
 * then powers off. The work is small (about 30 000 instructions per CPU) so that an instruction-emulating
 * KVM gets through it quickly too.
 */
    .set LAPIC, 0xFEE00000
    .set TRAMPOLINE, 0x8000         /* below 1 MiB, 4 KiB aligned: SIPI vector 0x08 */
    .set MAX_APS, 255
    .set AP_STACK_SIZE, 2048
    .set PIT_HZ, 1193182
    .set SUM_RANGE, 1000            /* CPU k sums i*i over k*SUM_RANGE+1 .. (k+1)*SUM_RANGE */
    .set INCREMENTS, 5000           /* lock xadd increments per CPU */
    .set BARRIER_POLLS, 1000000

    .text
    .code64
    .globl guest_main
guest_main:
    pushq %rbx
    pushq %r12

    /* Enabled CPUs according to the MADT. */
    movl $0x43495041, %edi          /* "APIC" */
    call acpi_find_table
    testq %rax, %rax
    jz no_madt
    movl 4(%rax), %ecx              /* MADT length */
    leaq (%rax,%rcx), %rdx          /* end */
    leaq 44(%rax), %rsi             /* first interrupt controller structure */
    xorl %r12d, %r12d               /* enabled CPUs */
1:  leaq 2(%rsi), %rax
    cmpq %rdx, %rax
    ja 3f
    movzbl 1(%rsi), %ecx            /* structure length */
    cmpl $2, %ecx
    jb 3f                           /* malformed: stop rather than loop forever */
    cmpb $0, (%rsi)                 /* type 0: Processor Local APIC */
    jne 2f
    testb $1, 4(%rsi)               /* flags bit 0: enabled */
    jz 2f
    incl %r12d
2:  addq %rcx, %rsi
    jmp 1b
3:  testl %r12d, %r12d
    jz no_madt

    /* The BSP reports itself. */
    movl %r12d, cpus_expected(%rip)
    call print_cpu

    /* The trampoline goes below 1 MiB. */
    leaq ap_trampoline(%rip), %rsi
    movl $TRAMPOLINE, %edi
    movl $ap_trampoline_end - ap_trampoline, %ecx
4:  movb (%rsi), %al
    movb %al, (%rdi)
    incq %rsi
    incq %rdi
    decl %ecx
    jnz 4b

    /* INIT, 10 ms, SIPI, 200 us, SIPI to all but ourselves. */
    call pit_ticks_start
    movl $0x000C4500, %edi          /* all excluding self, level assert, INIT */
    call send_ipi
    movl $10000, %edi
    call delay_us
    movl $0x000C4600 | (TRAMPOLINE >> 12), %edi   /* all excluding self, Start-up, vector 0x08 */
    call send_ipi
    movl $200, %edi
    call delay_us
    movl $0x000C4600 | (TRAMPOLINE >> 12), %edi
    call send_ipi

    /* The BSP's share of the work, with the APs. */
    xorl %edi, %edi
    call cpu_work
    lock incl cpus_seen(%rip)

    /* Wait for the APs: at most 2 s by the PIT, and at most 2 000 000 polls should the PIT be dead. */
    pushq %r13
    movl $2000000, %r13d
    call pit_ticks
    movq %rax, %rbx
5:  movl cpus_seen(%rip), %eax
    cmpl %r12d, %eax
    jae 6f
    call pit_ticks
    subq %rbx, %rax
    cmpq $2 * PIT_HZ, %rax
    jae 6f
    decl %r13d
    jnz 5b
6:  popq %r13
    /* 100 ms more: a CPU the MADT did not count would show up as seen > expected. */
    movl $100000, %edi
    call delay_us

    movl cpus_seen(%rip), %ebx
    call lock_console
    cmpl %r12d, %ebx
    jne 7f
    movl %ebx, %edi
    call check_work
    testl %eax, %eax
    jnz 8f                          /* check_work printed the failure */
    leaq msg_ok(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    call serial_putdec
    jmp 8f
7:  leaq msg_fail(%rip), %rdi
    call serial_puts
    movl %r12d, %edi
    call serial_putdec
    leaq msg_seen(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    call serial_putdec
8:  movl $'\n', %edi
    call serial_putc
    call unlock_console
    popq %r12
    popq %rbx
    ret

no_madt:
    leaq msg_no_madt(%rip), %rdi
    call serial_puts
    popq %r12
    popq %rbx
    ret

/* cpu_work(%edi = k): CPU k's sum into work_sums[k], then the barrier and its share of the contest. */
cpu_work:
    movl %edi, %esi
    imull $SUM_RANGE, %esi, %ecx    /* i = k * SUM_RANGE + 1 .. (k + 1) * SUM_RANGE */
    leal SUM_RANGE(%ecx), %edx
    incl %ecx
    xorl %eax, %eax
1:  movq %rcx, %r8
    imulq %rcx, %r8
    addq %r8, %rax
    incl %ecx
    cmpl %edx, %ecx
    jbe 1b
    leaq work_sums(%rip), %rdx
    movq %rax, (%rdx,%rsi,8)

    lock incl contest_ready(%rip)   /* the barrier: bounded, the contest is correct without it too */
    movl $BARRIER_POLLS, %ecx
2:  movl contest_ready(%rip), %eax
    cmpl cpus_expected(%rip), %eax
    jae 3f
    pause
    decl %ecx
    jnz 2b
3:  movl $INCREMENTS, %ecx
    movq $-1, %rdx                  /* the last value xadd handed us */
4:  movl $1, %eax
    lock xaddq %rax, contest_counter(%rip)
    cmpq %rdx, %rax
    jg 5f
    lock incl xadd_order_errors(%rip)
5:  movq %rax, %rdx
    decl %ecx
    jnz 4b
    ret

/* check_work(%edi = CPUs) -> %eax = 0 when every sum and the counter are right (PORTHOLE-SMP-WORK printed);
   else prints PORTHOLE-SMP-FAIL without the line's end and returns 1. The caller holds the console lock. */
check_work:
    pushq %rbx
    pushq %r12
    pushq %r13
    movl %edi, %r12d
    xorl %ebx, %ebx                 /* k */
1:  cmpl %r12d, %ebx
    jae 3f
    leal 1(%ebx), %edi              /* want = S((k+1) * SUM_RANGE) - S(k * SUM_RANGE) */
    imull $SUM_RANGE, %edi
    call sum_of_squares
    movq %rax, %r13
    imull $SUM_RANGE, %ebx, %edi
    call sum_of_squares
    subq %rax, %r13
    leaq work_sums(%rip), %rax
    cmpq %r13, (%rax,%rbx,8)
    jne 2f
    incl %ebx
    jmp 1b
2:  leaq msg_fail_sum(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    call serial_putdec
    leaq msg_got(%rip), %rdi
    call serial_puts
    leaq work_sums(%rip), %rax
    movq (%rax,%rbx,8), %rdi
    call serial_putdec
    leaq msg_want(%rip), %rdi
    call serial_puts
    movq %r13, %rdi
    call serial_putdec
    jmp 5f
3:  imull $INCREMENTS, %r12d, %r13d
    cmpq %r13, contest_counter(%rip)
    jne 4f
    cmpl $0, xadd_order_errors(%rip)
    jne 4f
    leaq msg_work(%rip), %rdi
    call serial_puts
    movl %r12d, %edi
    call serial_putdec
    leaq msg_counter(%rip), %rdi
    call serial_puts
    movq contest_counter(%rip), %rdi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    xorl %eax, %eax
    jmp 6f
4:  leaq msg_fail_counter(%rip), %rdi
    call serial_puts
    movq contest_counter(%rip), %rdi
    call serial_putdec
    leaq msg_want(%rip), %rdi
    call serial_puts
    movq %r13, %rdi
    call serial_putdec
    leaq msg_order(%rip), %rdi
    call serial_puts
    movl xadd_order_errors(%rip), %edi
    call serial_putdec
5:  movl $1, %eax                   /* the caller ends the line */
6:  popq %r13
    popq %r12
    popq %rbx
    ret

/* sum_of_squares(%edi = n) -> %rax = n(n+1)(2n+1)/6 */
sum_of_squares:
    movl %edi, %eax
    leaq 1(%rax), %rcx
    imulq %rcx, %rax
    leaq 1(%rdi,%rdi), %rcx
    imulq %rcx, %rax
    xorl %edx, %edx
    movl $6, %ecx
    divq %rcx
    ret

/* send_ipi(%edi = ICR low word): destination field 0 (the shorthand in %edi picks the targets), then
   waits (bounded) for the delivery status bit to clear. */
send_ipi:
    movl $LAPIC, %edx
    movl $0, 0x310(%rdx)            /* ICR high: destination 0 */
    movl %edi, 0x300(%rdx)          /* ICR low: sends */
    movl $100000, %ecx
1:  testl $0x1000, 0x300(%rdx)      /* delivery status: pending */
    jz 2f
    pause
    decl %ecx
    jnz 1b
2:  ret

/* print_cpu(): `PORTHOLE-CPU apic=<id>` under the console lock */
print_cpu:
    pushq %rbx
    call lapic_id
    movl %eax, %ebx
    call lock_console
    leaq msg_cpu(%rip), %rdi
    call serial_puts
    movl %ebx, %edi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc
    call unlock_console
    popq %rbx
    ret

/* lock_console() / unlock_console(): a test-and-test-and-set spinlock on console_lock */
lock_console:
    movl $1, %eax
1:  xchgl %eax, console_lock(%rip)  /* xchg with memory is locked implicitly */
    testl %eax, %eax
    jz 3f
2:  pause
    cmpl $0, console_lock(%rip)
    jne 2b
    movl $1, %eax
    jmp 1b
3:  ret

unlock_console:
    movl $0, console_lock(%rip)     /* a plain store releases on x86 */
    ret

/* ---- AP start-up. The SIPI starts the AP at 0x0800:0000 in real mode. ---- */
    .code16
ap_trampoline:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_pointer - ap_trampoline    /* DS-relative: the copy's own GDT pointer */
    movl %cr0, %eax
    orl $1, %eax                    /* CR0.PE */
    movl %eax, %cr0
    ljmpl $0x18, $ap_protected      /* 32-bit code segment, into the image above 1 MiB */
    .p2align 2
ap_gdt_pointer:
    .word 31                        /* start.S's GDT: 4 descriptors */
    .long gdt
ap_trampoline_end:

    .code32
ap_protected:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmp $0x08, $ap_long

    .code64
ap_long:
    movl $1, %eax
    lock xaddl %eax, ap_next(%rip)  /* this AP's stack slot */
    cmpl $MAX_APS, %eax
    jae ap_park                     /* no stack left: park without reporting */
    incl %eax
    movl %eax, %r12d                /* k: this AP's work slot (the BSP has 0) */
    imull $AP_STACK_SIZE, %eax
    leaq ap_stacks(%rip), %rsp
    addq %rax, %rsp                 /* top of slot n = ap_stacks + (n + 1) * size */
    lidt idt_pointer(%rip)          /* exceptions on APs report themselves too */
    call print_cpu
    movl %r12d, %edi
    call cpu_work
    lock incl cpus_seen(%rip)
ap_park:
    cli
1:  hlt
    jmp 1b

    .section .rodata
msg_cpu:
    .asciz "PORTHOLE-CPU apic="
msg_ok:
    .asciz "PORTHOLE-SMP-OK cpus="
msg_fail:
    .asciz "PORTHOLE-SMP-FAIL expected="
msg_seen:
    .asciz " seen="
msg_no_madt:
    .asciz "PORTHOLE-SMP-FAIL no-madt\n"
msg_work:
    .asciz "PORTHOLE-SMP-WORK sums="
msg_counter:
    .asciz " counter="
msg_fail_sum:
    .asciz "PORTHOLE-SMP-FAIL sum cpu="
msg_got:
    .asciz " got="
msg_want:
    .asciz " want="
msg_fail_counter:
    .asciz "PORTHOLE-SMP-FAIL counter="
msg_order:
    .asciz " xadd-order-errors="

    .section .data
    .p2align 6
console_lock:
    .long 0
    .p2align 6
cpus_seen:
    .long 0
ap_next:
    .long 0
cpus_expected:
    .long 0
xadd_order_errors:
    .long 0
    .p2align 6
contest_ready:
    .long 0
    .p2align 6
contest_counter:
    .quad 0

    .section .bss
    .p2align 6
work_sums:                          /* one slot per CPU, k = 0 .. MAX_APS */
    .skip (MAX_APS + 1) * 8
    .p2align 4
ap_stacks:
    .skip MAX_APS * AP_STACK_SIZE

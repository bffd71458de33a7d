/* smp — proves that every vCPU the ACPI MADT announces can be started and runs guest code.
 *
 * The BSP counts the enabled Processor Local APIC entries (type 0, flags bit 0) of the MADT, prints
 * `PORTHOLE-CPU apic=<id>` for itself, then wakes the application processors with INIT / SIPI / SIPI
 * (all-excluding-self shorthand). Each AP runs a real-mode trampoline copied to 0x8000 (SIPI vector 0x08),
 * goes protected -> long mode on start.S's GDT and page tables, takes its own stack from ap_stacks by an
 * atomic counter, prints `PORTHOLE-CPU apic=<id>` under a spinlock and parks (cli; hlt).
 * The BSP waits (at most 2 s, timed with the PIT) until all of them checked in, waits 100 ms more to catch
 * CPUs the MADT did not announce, and prints one of
 *     PORTHOLE-SMP-OK cpus=<n>
 *     PORTHOLE-SMP-FAIL expected=<n> seen=<m>      (n from the MADT, m = CPUs that printed, BSP included)
 *     PORTHOLE-SMP-FAIL no-madt
 * then powers off.
 */
    .set LAPIC, 0xFEE00000
    .set TRAMPOLINE, 0x8000         /* below 1 MiB, 4 KiB aligned: SIPI vector 0x08 */
    .set MAX_APS, 255
    .set AP_STACK_SIZE, 2048
    .set PIT_HZ, 1193182

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
    call print_cpu
    movl $1, cpus_seen(%rip)

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
    imull $AP_STACK_SIZE, %eax
    leaq ap_stacks(%rip), %rsp
    addq %rax, %rsp                 /* top of slot n = ap_stacks + (n + 1) * size */
    lidt idt_pointer(%rip)          /* exceptions on APs report themselves too */
    call print_cpu
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

    .section .data
    .p2align 6
console_lock:
    .long 0
    .p2align 6
cpus_seen:
    .long 0
ap_next:
    .long 0

    .section .bss
    .p2align 4
ap_stacks:
    .skip MAX_APS * AP_STACK_SIZE

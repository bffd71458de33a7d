/* ring3 — proves that the CPU runs user code in ring 3 and takes it back to ring 0 through SYSCALL/SYSRET,
 * a DPL-3 interrupt gate and an exception. Needs hardware virtualization (or QEMU TCG): this machine's PVM
 * KVM cannot emulate `int n` or an iretq to ring 3, so no test runs it there.
 *
 * Set-up (ring 0, interrupts off throughout): a GDT of its own (start.S's three ring-0 descriptors, then
 * user data 0x20 and user 64-bit code 0x28, both DPL 3, and a 64-bit TSS at 0x30 whose RSP0 is a ring-0
 * trap stack); the first 2 MiB of start.S's identity map split into 4 KiB pages, of which only the user
 * code page (read-only), the user data page and the user stack page carry the user bit (PML4[0] and
 * PDPT[0] get it too: it is checked at every level); EFER.SCE, STAR (kernel CS 0x08, user base 0x18, so
 * SYSRET loads CS 0x2B / SS 0x23), LSTAR, SFMASK (TF, IF, DF, AC); IDT vector 0x80 a DPL-3 interrupt
 * gate. Every other exception prints `PORTHOLE-RING3-FAIL vector=0xVV error=0x... rip=0x... cs=0x..`
 * (lib.S's exception_fail_prefix) and powers off.
 *
 * Then an iretq enters ring 3 (CS 0x2B, SS 0x23, RFLAGS 0x2). The user code
 *   1. reads its CPL from CS;
 *   2. sums i*i for i = 1..1000 through its own stack (push/add/pop) into user data;
 *   3. sets DF and AC and makes `syscall` (rax 1, rdi the sum): the handler runs on the trap stack,
 *      records its own CPL (CS & 3), checks CS/SS 0x08/0x10, RCX = the instruction after the syscall, R11
 *      with DF and AC set and its own RFLAGS without them (SFMASK), returns sum + 1 with sysretq; the user
 *      checks the answer and that DF and AC came back set (QEMU TCG clears DF on SYSCALL whatever SFMASK
 *      says, so there only AC tells SFMASK's work apart);
 *   4. makes `int $0x80` (rax 2, rdi the sum): the handler checks the frame (CS 0x2B, SS 0x23, RIP after
 *      the int, the user stack pointer, and that the CPU switched to RSP0), records its own CPL and the
 *      caller's (saved CS & 3), returns 2 * sum with iretq; the user checks the answer;
 *   5. reads a supervisor-only word: the #PF handler expects exactly that (error code 5 = present | user,
 *      CR2 the word's address, from ring 3) and resumes the user code past it;
 *   6. makes `int $0x80` with rax 3: the handler returns to ring 0 (guest_main's saved stack).
 * Ring 0 then checks the sum against n(n+1)(2n+1)/6, the handlers' records and the user's own check bits,
 * and prints
 *     PORTHOLE-RING3-OK user-cpl=3 syscall-cpl=0 int80-cpl=0 int80-from=3 sum=333833500 pf=ok
 *     PORTHOLE-RING3-FAIL <check> <check> ... sum=<n>        (the names of the checks that failed)
 *     PORTHOLE-RING3-FAIL no-syscall                       (CPUID 0x80000001 EDX bit 11 clear)
 *     PORTHOLE-RING3-FAIL layout                           (user pages not in the first 2 MiB)
 * then powers off.
 */
    .set SEL_KCODE, 0x08
    .set SEL_KDATA, 0x10
    .set SEL_UDATA, 0x23            /* 0x20 | RPL 3 */
    .set SEL_UCODE, 0x2B            /* 0x28 | RPL 3 */
    .set SEL_TSS, 0x30
    .set MSR_EFER, 0xC0000080
    .set MSR_STAR, 0xC0000081
    .set MSR_LSTAR, 0xC0000082
    .set MSR_SFMASK, 0xC0000084
    .set RFLAGS_DF, 0x400
    .set RFLAGS_AC, 0x40000
    .set SFMASK_BITS, 0x40700       /* AC | DF | IF | TF */
    .set N, 1000

/* Check bits: set in `failed` by ring 0, in user_status by ring 3; the names are in check_names. */
    .set F_USER_CPL, 1 << 0         /* CS & 3 read in ring 3 was not 3 */
    .set F_SYSCALL_ANSWER, 1 << 1   /* syscall did not return sum + 1 */
    .set F_SYSRET_DF, 1 << 2        /* DF and AC (in R11) did not come back from sysretq */
    .set F_INT80_ANSWER, 1 << 3     /* int $0x80 did not return 2 * sum */
    .set F_PF_MISSING, 1 << 4       /* the supervisor-only word was readable from ring 3 */
    .set F_SYSCALL_CPL, 1 << 5      /* the syscall handler did not run with CS 0x08, SS 0x10 */
    .set F_SYSCALL_RCX, 1 << 6      /* RCX was not the user's return address */
    .set F_SFMASK, 1 << 7           /* the handler ran with DF or AC set, or R11 lacked them */
    .set F_INT80_FRAME, 1 << 8      /* the int $0x80 frame (CS, SS, RIP, RSP) was not the user's */
    .set F_INT80_CPL, 1 << 9        /* the int $0x80 handler did not run in ring 0 on RSP0 */
    .set F_PF, 1 << 10              /* the #PF was not taken (or not as expected) */
    .set F_SUM, 1 << 11             /* the user's sum is not n(n+1)(2n+1)/6 */
    .set F_COUNTS, 1 << 12          /* not exactly one syscall and two int $0x80 calls */
    .set NCHECKS, 13

    .text
    .code64
    .globl guest_main
guest_main:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    leaq msg_fail(%rip), %rax
    movq %rax, exception_fail_prefix(%rip)

    /* SYSCALL must exist in 64-bit mode. */
    movl $0x80000001, %eax
    cpuid
    testl $1 << 11, %edx
    jnz 1f
    leaq msg_no_syscall(%rip), %rdi
    call serial_puts
    jmp done
1:
    /* ---- GDT with user segments and the TSS ---- */
    leaq tss(%rip), %rax
    leaq trap_stack_top(%rip), %rcx
    movq %rcx, 4(%rax)              /* TSS.RSP0 */
    movw $104, 102(%rax)            /* I/O map base past the limit: no I/O bitmap */
    /* 64-bit TSS descriptor: limit 103, base = tss, type 9 (available), present, DPL 0. */
    movq %rax, %rdx
    andq $0xFFFFFF, %rdx
    shlq $16, %rdx
    orq $103, %rdx
    movabsq $0x0000890000000000, %rcx
    orq %rcx, %rdx
    movq %rax, %rcx
    shrq $24, %rcx
    andq $0xFF, %rcx
    shlq $56, %rcx
    orq %rcx, %rdx
    movq %rdx, gdt3 + SEL_TSS(%rip)
    movq %rax, %rcx
    shrq $32, %rcx
    movq %rcx, gdt3 + SEL_TSS + 8(%rip)
    lgdt gdt3_pointer(%rip)
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $SEL_TSS, %ax
    ltr %ax

    /* ---- 4 KiB pages for the first 2 MiB; user bit on the user pages only ---- */
    leaq user_text_begin(%rip), %rax
    leaq user_data_end(%rip), %rcx
    cmpq $0x200000, %rcx            /* every user page must lie in the split 2 MiB page */
    jbe 2f
    leaq msg_layout(%rip), %rdi
    call serial_puts
    jmp done
2:  leaq pt(%rip), %rdi
    xorl %ecx, %ecx
3:  movq %rcx, %rax
    shlq $12, %rax
    orq $0x3, %rax                  /* present, writable, supervisor */
    movq %rax, (%rdi,%rcx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 3b
    leaq user_text_begin(%rip), %rsi
    leaq user_text_end(%rip), %rdx
    movq $~0x2, %r8                 /* user code: read-only */
    movl $0x4, %r9d
    call pt_mark
    leaq user_data_begin(%rip), %rsi
    leaq user_data_end(%rip), %rdx
    movq $~0, %r8
    movl $0x4, %r9d
    call pt_mark
    movq pml4(%rip), %rax           /* PML4[0] -> PDPT */
    andq $~0xFFF, %rax
    orq $0x4, pml4(%rip)
    orq $0x4, (%rax)                /* PDPT[0] -> PD0 */
    movq (%rax), %rax
    andq $~0xFFF, %rax
    leaq pt(%rip), %rcx
    orq $0x7, %rcx                  /* PD0[0] -> pt: present, writable, user (the leaves decide) */
    movq %rcx, (%rax)
    movq %cr3, %rax
    movq %rax, %cr3

    /* ---- SYSCALL / SYSRET ---- */
    movl $MSR_EFER, %ecx
    rdmsr
    orl $1, %eax                    /* EFER.SCE */
    wrmsr
    movl $MSR_STAR, %ecx
    xorl %eax, %eax
    movl $(0x18 << 16) | SEL_KCODE, %edx
    wrmsr
    movl $MSR_LSTAR, %ecx
    leaq syscall_entry(%rip), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    movl $MSR_SFMASK, %ecx
    movl $SFMASK_BITS, %eax
    xorl %edx, %edx
    wrmsr

    /* ---- IDT: int $0x80 from ring 3, and the expected #PF ---- */
    movl $0x80, %edi
    leaq int80_entry(%rip), %rsi
    call idt_set_gate
    movb $0xEE, idt + 0x80 * 16 + 5(%rip)   /* present, DPL 3, interrupt gate */
    movl $14, %edi
    leaq pf_entry(%rip), %rsi
    call idt_set_gate

    /* ---- Into ring 3; int $0x80 function 3 comes back to back_in_ring0 ---- */
    movq %rsp, kernel_rsp(%rip)
    pushq $SEL_UDATA
    leaq user_stack_top(%rip), %rax
    pushq %rax
    pushq $0x2                      /* RFLAGS: interrupts stay off in ring 3 */
    pushq $SEL_UCODE
    leaq user_entry(%rip), %rax
    pushq %rax
    iretq

back_in_ring0:
    movq kernel_rsp(%rip), %rsp
    movw $SEL_KDATA, %ax            /* an interrupt from ring 3 left SS null; DS/ES were nulled on entry */
    movw %ax, %ss
    movw %ax, %ds
    movw %ax, %es

    /* ---- Checks ---- */
    movl user_status(%rip), %ebx    /* the user's own check bits */
    orl failed(%rip), %ebx          /* the handlers' */
    movl $N, %eax                   /* n(n+1)(2n+1)/6 */
    leaq 1(%rax), %rcx
    imulq %rcx, %rax
    movl $2 * N + 1, %ecx
    imulq %rcx, %rax
    xorl %edx, %edx
    movl $6, %ecx
    divq %rcx
    cmpq %rax, user_sum(%rip)
    je 4f
    orl $F_SUM, %ebx
4:  cmpl $1, syscall_count(%rip)
    jne 5f
    cmpl $2, int80_count(%rip)      /* function 2, then 3 */
    je 6f
5:  orl $F_COUNTS, %ebx
6:  cmpl $1, pf_taken(%rip)
    je 7f
    orl $F_PF, %ebx
7:  testl %ebx, %ebx
    jnz report_fail

    leaq msg_ok(%rip), %rdi
    call serial_puts
    movl user_cpl(%rip), %edi
    call serial_putdec
    leaq msg_syscall_cpl(%rip), %rdi
    call serial_puts
    movl syscall_cpl(%rip), %edi
    call serial_putdec
    leaq msg_int80_cpl(%rip), %rdi
    call serial_puts
    movl int80_cpl(%rip), %edi
    call serial_putdec
    leaq msg_int80_from(%rip), %rdi
    call serial_puts
    movl int80_from(%rip), %edi
    call serial_putdec
    leaq msg_sum(%rip), %rdi
    call serial_puts
    movq user_sum(%rip), %rdi
    call serial_putdec
    leaq msg_pf_ok(%rip), %rdi
    call serial_puts
    jmp done

report_fail:                        /* %ebx = failed checks */
    movq $0, exception_fail_prefix(%rip)
    leaq msg_fail(%rip), %rdi
    call serial_puts
    xorl %r12d, %r12d
1:  btl %r12d, %ebx
    jnc 2f
    movl $' ', %edi
    call serial_putc
    leaq check_names(%rip), %rax
    movq (%rax,%r12,8), %rdi
    call serial_puts
2:  incl %r12d
    cmpl $NCHECKS, %r12d
    jb 1b
    leaq msg_sum(%rip), %rdi
    call serial_puts
    movq user_sum(%rip), %rdi
    call serial_putdec
    movl $'\n', %edi
    call serial_putc

done:
    movq $0, exception_fail_prefix(%rip)
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* pt_mark(%rsi = begin, %rdx = end (exclusive), %r8 = AND mask, %r9 = OR bits): the 4 KiB entries of pt
   that cover [begin, end) get (entry & mask) | bits. Addresses are below 2 MiB (checked by the caller). */
pt_mark:
    leaq pt(%rip), %rdi
    shrq $12, %rsi
    addq $0xFFF, %rdx
    shrq $12, %rdx
1:  cmpq %rdx, %rsi
    jae 2f
    movq (%rdi,%rsi,8), %rax
    andq %r8, %rax
    orq %r9, %rax
    movq %rax, (%rdi,%rsi,8)
    incq %rsi
    jmp 1b
2:  ret

/* ---- SYSCALL entry (ring 0, RSP still the user's, RCX = user RIP, R11 = user RFLAGS) ---- */
syscall_entry:
    movq %rsp, user_rsp(%rip)
    leaq trap_stack_top(%rip), %rsp
    pushq %rcx
    pushq %r11
    pushq %rbx
    incl syscall_count(%rip)
    xorl %ebx, %ebx
    movw %cs, %ax
    movzwl %ax, %eax
    movl %eax, %ecx
    andl $3, %ecx
    movl %ecx, syscall_cpl(%rip)
    cmpl $SEL_KCODE, %eax
    jne 1f
    movw %ss, %ax
    cmpw $SEL_KDATA, %ax
    je 2f
1:  orl $F_SYSCALL_CPL, %ebx
2:  leaq user_after_syscall(%rip), %rax
    cmpq %rax, 16(%rsp)             /* saved RCX */
    je 3f
    orl $F_SYSCALL_RCX, %ebx
3:  pushfq
    popq %rax
    testl $RFLAGS_DF | RFLAGS_AC, %eax      /* SFMASK cleared DF and AC for the handler */
    jnz 4f
    movq 8(%rsp), %rax              /* saved R11: the user's RFLAGS, DF and AC set */
    andl $RFLAGS_DF | RFLAGS_AC, %eax
    cmpl $RFLAGS_DF | RFLAGS_AC, %eax
    je 5f
4:  orl $F_SFMASK, %ebx
5:  orl %ebx, failed(%rip)
    popq %rbx
    popq %r11
    popq %rcx
    leaq 1(%rdi), %rax              /* the answer: sum + 1 */
    movq user_rsp(%rip), %rsp
    sysretq

/* ---- int $0x80 (DPL 3 interrupt gate). Frame: rip, cs, rflags, rsp, ss. rax = function. ---- */
int80_entry:
    incl int80_count(%rip)
    cmpq $3, %rax
    je back_in_ring0                /* function 3: leave ring 3 for good */
    pushq %rbx
    pushq %rcx
    xorl %ebx, %ebx
    movq 24(%rsp), %rcx             /* saved CS */
    movl %ecx, %eax
    andl $3, %eax
    movl %eax, int80_from(%rip)
    cmpq $SEL_UCODE, %rcx
    jne 1f
    cmpq $SEL_UDATA, 48(%rsp)       /* saved SS */
    jne 1f
    leaq user_after_int(%rip), %rax
    cmpq %rax, 16(%rsp)             /* saved RIP */
    jne 1f
    movq 40(%rsp), %rax             /* saved RSP: inside the user stack page */
    leaq user_stack(%rip), %rcx
    cmpq %rcx, %rax
    jb 1f
    leaq user_stack_top(%rip), %rcx
    cmpq %rcx, %rax
    jbe 2f
1:  orl $F_INT80_FRAME, %ebx
2:  movw %cs, %ax
    movzwl %ax, %eax
    movl %eax, %ecx
    andl $3, %ecx
    movl %ecx, int80_cpl(%rip)
    cmpl $SEL_KCODE, %eax
    jne 3f
    leaq trap_stack_top - 56(%rip), %rax    /* the 5-word frame and our 2 pushes on RSP0 */
    cmpq %rax, %rsp
    je 4f
3:  orl $F_INT80_CPL, %ebx
4:  orl %ebx, failed(%rip)
    popq %rcx
    popq %rbx
    leaq (%rdi,%rdi), %rax          /* the answer: 2 * sum */
    iretq

/* ---- #PF: expected once, from user_pf_load; anything else is a failure ---- */
pf_entry:                           /* frame: error code, rip, cs, rflags, rsp, ss */
    pushq %rax
    cmpl $0, pf_expected(%rip)
    je pf_unexpected
    leaq user_pf_load(%rip), %rax
    cmpq %rax, 16(%rsp)
    jne pf_unexpected
    cmpq $SEL_UCODE, 24(%rsp)
    jne pf_unexpected
    cmpq $5, 8(%rsp)                /* present | user, a read */
    jne pf_unexpected
    movq %cr2, %rax
    pushq %rcx
    leaq kernel_only_word(%rip), %rcx
    cmpq %rcx, %rax
    popq %rcx
    jne pf_unexpected
    movl $0, pf_expected(%rip)
    movl $1, pf_taken(%rip)
    leaq user_pf_resume(%rip), %rax
    movq %rax, 16(%rsp)             /* resume past the load */
    popq %rax
    addq $8, %rsp                   /* the error code */
    iretq
pf_unexpected:
    popq %rax
    pushq $14
    jmp exception_common            /* prints the FAIL marker with vector 0e and the RIP */

/* ---- Ring 3 code: its own page, user bit, read-only ---- */
    .section .text.user, "ax"
    .p2align 12
user_text_begin:
user_entry:
    xorl %r15d, %r15d               /* check bits */
    movw %cs, %ax
    movzwl %ax, %eax
    andl $3, %eax
    movl %eax, user_cpl(%rip)
    cmpl $3, %eax
    je 1f
    orl $F_USER_CPL, %r15d
1:  xorl %ebx, %ebx                 /* sum of i*i, i = 1..N, through the user stack */
    movl $1, %ecx
2:  movq %rcx, %rax
    imulq %rcx, %rax
    pushq %rax
    addq (%rsp), %rbx
    popq %rax
    incq %rcx
    cmpq $N, %rcx
    jbe 2b
    movq %rbx, user_sum(%rip)

    movl $1, %eax
    movq %rbx, %rdi
    pushfq                          /* AC and DF set: SFMASK clears them for the handler (checked */
    orl $RFLAGS_AC, (%rsp)          /* there), sysretq brings them back from R11 */
    popfq
    std
    syscall
user_after_syscall:
    pushfq
    popq %rdx
    cld
    pushq $0x2
    popfq
    andl $RFLAGS_DF | RFLAGS_AC, %edx
    cmpl $RFLAGS_DF | RFLAGS_AC, %edx
    je 3f
    orl $F_SYSRET_DF, %r15d
3:  leaq 1(%rbx), %rcx
    cmpq %rcx, %rax
    je 4f
    orl $F_SYSCALL_ANSWER, %r15d
4:  movl $2, %eax
    movq %rbx, %rdi
    int $0x80
user_after_int:
    leaq (%rbx,%rbx), %rcx
    cmpq %rcx, %rax
    je 5f
    orl $F_INT80_ANSWER, %r15d
5:
user_pf_load:
    movq kernel_only_word(%rip), %rax
    orl $F_PF_MISSING, %r15d        /* skipped by the #PF handler */
user_pf_resume:
    movl %r15d, user_status(%rip)
    movl $3, %eax
    int $0x80
    ud2                             /* not reached */
    .p2align 12
user_text_end:

/* ---- Ring 3 data and stack: one page each, user bit ---- */
    .section .data.user, "aw"
    .p2align 12
user_data_begin:
user_sum:
    .quad 0
user_status:
    .long 0
user_cpl:
    .long 0xFF
    .p2align 12
user_stack:
    .skip 4096 - 64
user_stack_top:
    .skip 64
user_data_end:

    .section .rodata
msg_ok:
    .asciz "PORTHOLE-RING3-OK user-cpl="
msg_syscall_cpl:
    .asciz " syscall-cpl="
msg_int80_cpl:
    .asciz " int80-cpl="
msg_int80_from:
    .asciz " int80-from="
msg_sum:
    .asciz " sum="
msg_pf_ok:
    .asciz " pf=ok\n"
msg_fail:
    .asciz "PORTHOLE-RING3-FAIL"
msg_no_syscall:
    .asciz "PORTHOLE-RING3-FAIL no-syscall\n"
msg_layout:
    .asciz "PORTHOLE-RING3-FAIL layout\n"
name_user_cpl: .asciz "user-cpl"
name_syscall_answer: .asciz "syscall-answer"
name_sysret_df: .asciz "sysret-flags"
name_int80_answer: .asciz "int80-answer"
name_pf_missing: .asciz "pf-missing"
name_syscall_cpl: .asciz "syscall-cpl"
name_syscall_rcx: .asciz "syscall-rcx"
name_sfmask: .asciz "sfmask"
name_int80_frame: .asciz "int80-frame"
name_int80_cpl: .asciz "int80-cpl"
name_pf: .asciz "pf"
name_sum: .asciz "sum"
name_counts: .asciz "counts"
    .p2align 3
check_names:
    .quad name_user_cpl, name_syscall_answer, name_sysret_df, name_int80_answer, name_pf_missing
    .quad name_syscall_cpl, name_syscall_rcx, name_sfmask, name_int80_frame, name_int80_cpl
    .quad name_pf, name_sum, name_counts

    .section .data
    .p2align 3
/* 0x08/0x10/0x18 as in start.S; 0x20 user data, 0x28 user 64-bit code (DPL 3); 0x30 the TSS (16 bytes).
   Writable: ltr marks the TSS descriptor busy. */
gdt3:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08: 64-bit ring-0 code */
    .quad 0x00CF92000000FFFF        /* 0x10: flat ring-0 data */
    .quad 0x00CF9A000000FFFF        /* 0x18: flat 32-bit ring-0 code (and STAR's SYSRET base) */
    .quad 0x00CFF2000000FFFF        /* 0x20: flat ring-3 data */
    .quad 0x00AFFA000000FFFF        /* 0x28: 64-bit ring-3 code */
    .quad 0, 0                      /* 0x30: TSS, filled at run time */
gdt3_end:
gdt3_pointer:
    .word gdt3_end - gdt3 - 1
    .quad gdt3
kernel_rsp:
    .quad 0
user_rsp:
    .quad 0
kernel_only_word:                   /* supervisor page: ring 3 must not read it */
    .quad 0x5EC2E7
failed:
    .long 0
syscall_count:
    .long 0
int80_count:
    .long 0
syscall_cpl:
    .long 0xFF
int80_cpl:
    .long 0xFF
int80_from:
    .long 0xFF
pf_expected:
    .long 1
pf_taken:
    .long 0

    .section .bss
    .p2align 12
pt:
    .skip 4096
    .p2align 4
tss:
    .skip 104
    .p2align 4
trap_stack:
    .skip 4096
trap_stack_top:

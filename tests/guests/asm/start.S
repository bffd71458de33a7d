/* start.S — the start-up stub shared by every micro-guest.
 *
 * Entered through the Xen PVH entry point (32-bit protected mode, paging off, %ebx = hvm_start_info).
 * It loads its own GDT, identity-maps the first 4 GiB with 2 MiB pages (tables are static data, so the
 * loader fills them, not emulated guest code), enters long mode, installs an IDT whose exception handlers
 * print the vector on COM1, and calls guest_main. When guest_main returns the guest powers off.
 *
 * Guests run in ring 0 only: this machine's KVM cannot emulate `int n` or an iretq to ring 3.
 */
    .set PVH_ELFNOTE_PHYS32_ENTRY, 18

    .section .note.Xen, "a"
    .p2align 2
    .long 4                         /* name size: "Xen\0" */
    .long 4                         /* descriptor size */
    .long PVH_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_start32

    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, pvh_start_info       /* kept for guests: hvm_start_info physical address */
    lgdt gdt_pointer
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
    ljmp $0x08, $long_mode_entry

    .code64
long_mode_entry:
    movq $stack_top, %rsp
    call idt_init
    call guest_main
    call poweroff

/* The GDT is also used by application processors (see smp guests): 0x08 64-bit code, 0x10 flat data,
   0x18 32-bit code. */
    .section .rodata
    .p2align 3
    .globl gdt, gdt_pointer
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08: 64-bit ring-0 code */
    .quad 0x00CF92000000FFFF        /* 0x10: flat ring-0 data */
    .quad 0x00CF9A000000FFFF        /* 0x18: flat 32-bit ring-0 code */
gdt_end:
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt

/* Identity map of 0..4 GiB: PML4[0] -> PDPT, PDPT[0..3] -> four page directories of 2 MiB pages. */
    .section .data.pagetables, "aw"
    .p2align 12
    .globl pml4
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 0x3
    .quad pd0 + 0x1000 + 0x3
    .quad pd0 + 0x2000 + 0x3
    .quad pd0 + 0x3000 + 0x3
    .fill 508, 8, 0
pd0:
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x83       /* present, writable, 2 MiB page */
    .set page, page + 1
    .endr

    .section .data
    .p2align 3
    .globl pvh_start_info
pvh_start_info:
    .quad 0

    .section .bss
    .p2align 12
    .globl stack_bottom, stack_top
stack_bottom:
    .skip 16384
stack_top:

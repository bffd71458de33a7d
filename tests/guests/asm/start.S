/* start.S — the start-up stub shared by every micro-guest.
 *
 * Entered through the Xen PVH entry point (32-bit protected mode, paging off, %ebx = hvm_start_info).
 * It loads its own GDT, identity-maps the first 4 GiB with 2 MiB pages (tables are static data, so the
 * loader fills them, not emulated guest code), enters long mode, installs an IDT whose exception handlers
 * print the vector on COM1, and calls guest_main. When guest_main returns the guest powers off.
 *
 * The same file is also a Multiboot2 kernel (GRUB's `multiboot2 FILE [ARGS]`): the header's entry address
 * tag enters mb2_start32 (32-bit protected mode, paging off, flat segments, %eax = 0x36D76289,
 * %ebx = Multiboot2 information), which fills an hvm_start_info of its own from the Multiboot2 tags (the
 * command line, the ACPI RSDP copy; no modules and no memory map) and goes on through the PVH entry, so
 * guests see pvh_start_info either way (the command line and RSDP copy stay in GRUB's information block,
 * which GRUB places above the image: a guest must not overwrite memory past its .bss before reading them).
 * It is Multiboot2, not Multiboot 1, on purpose: QEMU's -kernel
 * tries Multiboot 1 before PVH, and on an ELF64 file with a Multiboot 1 header it exits ("Cannot load
 * x86-64 image, give a 32bit one"); QEMU has no Multiboot2 loader, so it still boots the PVH note.
 *
 * Guests run in ring 0 only: this machine's KVM cannot emulate `int n` or an iretq to ring 3. The one
 * exception, ring3.S, builds its own GDT, TSS and user pages, and runs on hardware virtualization or QEMU's
 * TCG only.
 */
    .set PVH_ELFNOTE_PHYS32_ENTRY, 18

    .section .note.Xen, "a"
    .p2align 2
    .long 4                         /* name size: "Xen\0" */
    .long 4                         /* descriptor size */
    .long PVH_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_start32

/* The Multiboot2 header: 8-byte aligned within the file's first 32 KiB (guest.ld puts it first). */
    .set MB2_HEADER_MAGIC, 0xE85250D6
    .set MB2_BOOTLOADER_MAGIC, 0x36D76289
    .set MB2_TAG_CMDLINE, 1
    .set MB2_TAG_ACPI_OLD, 14       /* a copy of the ACPI 1.0 RSDP */
    .set MB2_TAG_ACPI_NEW, 15       /* a copy of the ACPI 2.0+ RSDP */

    .section .multiboot2, "a"
    .p2align 3
mb2_header:
    .long MB2_HEADER_MAGIC
    .long 0                         /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long 0x100000000 - MB2_HEADER_MAGIC - (mb2_header_end - mb2_header)
    .p2align 3
    .word 3, 0                      /* entry address tag, required */
    .long 12
    .long mb2_start32
    .p2align 3
    .word 0, 0                      /* end tag */
    .long 8
mb2_header_end:

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

/* Multiboot2 entry: translates the Multiboot2 information into mb2_start_info, then takes the PVH path
   with it. Entered by anything else (no Multiboot2 magic in %eax), it goes on without start info. */
    .globl mb2_start32
mb2_start32:
    cli
    cld
    cmpl $MB2_BOOTLOADER_MAGIC, %eax
    jne 6f
    leal 8(%ebx), %esi              /* first tag: after total_size and reserved */
1:  movl (%esi), %eax               /* tag type; 0 ends the list */
    testl %eax, %eax
    jz 5f
    leal 8(%esi), %edx              /* the tag's contents */
    cmpl $MB2_TAG_CMDLINE, %eax
    jne 2f
    movl %edx, mb2_start_info + 24  /* cmdline_paddr: GRUB passes the arguments after the file name */
    jmp 4f
2:  cmpl $MB2_TAG_ACPI_NEW, %eax
    jne 3f
    movl %edx, mb2_start_info + 32  /* rsdp_paddr: the 2.0+ copy wins */
    jmp 4f
3:  cmpl $MB2_TAG_ACPI_OLD, %eax
    jne 4f
    cmpl $0, mb2_start_info + 32
    jne 4f
    movl %edx, mb2_start_info + 32
4:  movl 4(%esi), %eax              /* tag size, padded to 8 bytes */
    addl $7, %eax
    andl $~7, %eax
    addl %eax, %esi
    jmp 1b
5:  movl $mb2_start_info, %ebx
    jmp pvh_start32
6:  xorl %ebx, %ebx                 /* unknown loader: pvh_start_info stays 0 */
    jmp pvh_start32

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

/* The hvm_start_info that mb2_start32 fills: magic, version 1, no modules, no memory map. */
    .p2align 3
mb2_start_info:
    .long 0x336EC578                /* XEN_HVM_START_MAGIC_VALUE */
    .long 1                         /* version */
    .long 0                         /* flags */
    .long 0                         /* nr_modules */
    .quad 0                         /* modlist_paddr */
    .quad 0                         /* cmdline_paddr (offset 24) */
    .quad 0                         /* rsdp_paddr (offset 32) */
    .quad 0                         /* memmap_paddr */
    .long 0                         /* memmap_entries */
    .long 0                         /* reserved */

    .section .bss
    .p2align 12
    .globl stack_bottom, stack_top
stack_bottom:
    .skip 16384
stack_top:

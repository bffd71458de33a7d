/* lib.S — routines shared by the micro-guests (64-bit, ring 0).
 *
 * Calling convention: System V (arguments in %rdi, %rsi, %rdx; %rax, %rcx, %rdx, %rsi, %rdi and %r8–%r11
 * may be clobbered; %rbx, %rbp and %r12–%r15 are preserved).
 *
 * Contents: COM1 output (serial_*), poweroff, the IDT (idt_set_gate, idt_init, idt_pointer for other CPUs),
 * CMOS access (cmos_read/cmos_write), 8259 set-up (pic_init), the PIT (pit_set_periodic, and a polled time
 * base: pit_ticks_start/pit_ticks/delay_us), the local APIC (lapic_id, lapic_enable, lapic_eoi) and ACPI
 * table look-up (acpi_find_rsdp, acpi_find_table), the display (fb_base, vbe_read/vbe_write, vbe_set_mode)
 * and the VGA text screen (vga_text_clear, vga_set_cursor, crtc_write); serial_putsdec for signed values.
 * For the device drivers (virtio-blk, virtio-net, virtio-gpu; their shared definitions are in virtio.inc):
 * command-line words (run_words, the command-handler epilogue cmd_ok/cmd_bad, table_find, match,
 * parse_args), put_kv, newline, put_case, put_devstatus, driver_start, hang, wait_idx (a used ring's idx,
 * timed), fnv1a, ioapic_write,
 * PCI configuration access (pci_read, pci_write, pci_find), the virtio 1.x modern PCI transport
 * (virtio_pci_caps, virtio_reset, virtio_features, virtio_queue_setup) and one interrupt-driven completion
 * (virtio_irq_arm, irq_wait_idx, virtio_irq_disarm; the handler virtio_irq counts irq_count and irq_spurious).
 * Exceptions either crash the guest on purpose after printing PORTHOLE-GUEST-EXCEPTION, or, once a guest
 * points exception_fail_prefix at its FAIL marker, print that marker with the vector and power off.
 */
    .set COM1, 0x3f8
    .set ACPI_PM1A_CNT, 0x604       /* PIIX4-style PM1a control, as SeaBIOS programs it in QEMU -M pc */
    .set ISA_DEBUG_EXIT, 0xf4       /* QEMU's isa-debug-exit device, when present */
    .set VIRTIO_IRQ_VECTOR, 0x40    /* virtio_irq_arm */

    .text
    .code64

/* serial_putc(%dil = byte): waits for the transmitter holding register, then writes the byte. */
    .globl serial_putc
serial_putc:
    movw $COM1 + 5, %dx
1:  inb %dx, %al
    testb $0x20, %al
    jz 1b
    movw $COM1, %dx
    movb %dil, %al
    outb %al, %dx
    ret

/* serial_puts(%rdi = NUL-terminated string) */
    .globl serial_puts
serial_puts:
    pushq %rbx
    movq %rdi, %rbx
1:  movzbl (%rbx), %edi
    testb %dil, %dil
    jz 2f
    call serial_putc
    incq %rbx
    jmp 1b
2:  popq %rbx
    ret

/* serial_puthex(%rdi = value, %rsi = number of hex digits, 1..16), most significant digit first. */
    .globl serial_puthex
serial_puthex:
    pushq %rbx
    pushq %r12
    movq %rdi, %rbx
    movq %rsi, %r12
1:  decq %r12
    js 2f
    leal (,%r12d,4), %ecx
    movq %rbx, %rdi
    shrq %cl, %rdi
    andl $0xf, %edi
    movzbl hex_digits(%rdi), %edi
    call serial_putc
    jmp 1b
2:  popq %r12
    popq %rbx
    ret

/* serial_putdec(%rdi = unsigned value) */
    .globl serial_putdec
serial_putdec:
    pushq %rbx
    subq $32, %rsp
    movq %rdi, %rax
    leaq 31(%rsp), %rbx
    movb $0, (%rbx)
    movq $10, %rcx
1:  xorl %edx, %edx
    divq %rcx
    addb $'0', %dl
    decq %rbx
    movb %dl, (%rbx)
    testq %rax, %rax
    jnz 1b
    movq %rbx, %rdi
    call serial_puts
    addq $32, %rsp
    popq %rbx
    ret

/* poweroff(): ACPI S5 through PM1a control, then QEMU's debug-exit port; never returns. */
    .globl poweroff
poweroff:
    movw $ACPI_PM1A_CNT, %dx
    movw $0x2000, %ax               /* SLP_EN, SLP_TYP 0 (the _S5 type Porthole and QEMU declare) */
    outw %ax, %dx
    /* QEMU acts on S5 asynchronously: give it time (~50000 port reads, tens of ms) before the debug-exit
       fallback, which would otherwise win the race and exit with status 1. */
    movl $50000, %ecx
2:  inb $0x80, %al
    decl %ecx
    jnz 2b
    movw $ISA_DEBUG_EXIT, %dx
    xorl %eax, %eax
    outb %al, %dx
    cli
1:  hlt
    jmp 1b

/* idt_set_gate(%rdi = vector, %rsi = handler): a present 64-bit interrupt gate, ring 0. */
    .globl idt_set_gate
idt_set_gate:
    shlq $4, %rdi
    leaq idt(%rdi), %rdi
    movw %si, (%rdi)                /* offset 15:0 */
    movw $0x08, 2(%rdi)             /* code selector */
    movw $0x8E00, 4(%rdi)           /* present, DPL 0, interrupt gate */
    movq %rsi, %rax
    shrq $16, %rax
    movw %ax, 6(%rdi)               /* offset 31:16 */
    shrq $16, %rax
    movl %eax, 8(%rdi)              /* offset 63:32 */
    movl $0, 12(%rdi)
    ret

/* idt_init(): every exception vector (0–31) reports itself on COM1; loads the IDT. */
    .globl idt_init
idt_init:
    pushq %rbx
    xorl %ebx, %ebx
1:  movq %rbx, %rdi
    movq %rbx, %rsi
    shlq $4, %rsi
    addq $exception_stubs, %rsi
    call idt_set_gate
    incl %ebx
    cmpl $32, %ebx
    jb 1b
    lidt idt_pointer
    popq %rbx
    ret

/* One 16-byte stub per exception vector; vectors without an error code push a 0 in its place. */
    .p2align 4
exception_stubs:
    .set vector, 0
    .rept 32
    .p2align 4
    .if (vector == 8) || (vector >= 10 && vector <= 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp exception_common
    .set vector, vector + 1
    .endr

/* Stack: vector, error code, rip, cs, rflags, rsp, ss. Prints them, then triple-faults on purpose so
   the VMM (or QEMU with -no-reboot) reports a crashed guest instead of a clean power-off. A guest that set
   exception_fail_prefix (a NUL-terminated marker such as "PORTHOLE-RING3-FAIL") gets
   `<prefix> vector=0xVV error=0xEEEEEEEE rip=0x... cs=0x..` instead, and a clean power-off, so that its
   own FAIL marker says what went wrong. */
    .globl exception_common
exception_common:
    movq %rsp, %rbx
    movq exception_fail_prefix(%rip), %rdi
    testq %rdi, %rdi
    jnz exception_fail
    leaq msg_exception(%rip), %rdi
    call serial_puts
    movq (%rbx), %rdi
    movl $2, %esi
    call serial_puthex
    leaq msg_error(%rip), %rdi
    call serial_puts
    movq 8(%rbx), %rdi
    movl $8, %esi
    call serial_puthex
    leaq msg_rip(%rip), %rdi
    call serial_puts
    movq 16(%rbx), %rdi
    movl $16, %esi
    call serial_puthex
    movl $'\n', %edi
    call serial_putc
    lidt null_idt_pointer
    ud2

exception_fail:                     /* %rdi = prefix, %rbx = the frame as above */
    movq $0, exception_fail_prefix(%rip)    /* a fault while printing ends in the plain handler */
    pushq %rdi
    movl $'\n', %edi
    call serial_putc
    popq %rdi
    call serial_puts
    leaq msg_vector(%rip), %rdi
    call serial_puts
    movq (%rbx), %rdi
    movl $2, %esi
    call serial_puthex
    leaq msg_error(%rip), %rdi
    call serial_puts
    movq 8(%rbx), %rdi
    movl $8, %esi
    call serial_puthex
    leaq msg_rip(%rip), %rdi
    call serial_puts
    movq 16(%rbx), %rdi
    movl $16, %esi
    call serial_puthex
    leaq msg_cs(%rip), %rdi
    call serial_puts
    movq 24(%rbx), %rdi
    movl $2, %esi
    call serial_puthex
    movl $'\n', %edi
    call serial_putc
    jmp poweroff

/* ---- CMOS / RTC (index port 0x70, data port 0x71; bit 7 of the index, the NMI mask, is left clear) ---- */

/* cmos_read(%dil = register) -> %al (zero-extended into %eax) */
    .globl cmos_read
cmos_read:
    movl %edi, %eax
    andb $0x7f, %al
    outb %al, $0x70
    xorl %eax, %eax
    inb $0x71, %al
    ret

/* cmos_write(%dil = register, %sil = value) */
    .globl cmos_write
cmos_write:
    movl %edi, %eax
    andb $0x7f, %al
    outb %al, $0x70
    movl %esi, %eax
    outb %al, $0x71
    ret

/* ---- Legacy interrupt controllers and the PIT ---- */

/* spurious_irqs_install(): gates for the interrupts nobody asked for: the 8259s' spurious IRQ 7 (no EOI)
   and IRQ 15 (EOI to the master only) and the local APIC's spurious vector 0xFF (no EOI). */
    .globl spurious_irqs_install
spurious_irqs_install:
    movl $0x27, %edi
    leaq spurious_irq(%rip), %rsi
    call idt_set_gate
    movl $0x2F, %edi
    leaq spurious_slave_irq(%rip), %rsi
    call idt_set_gate
    movl $0xFF, %edi
    leaq spurious_irq(%rip), %rsi
    jmp idt_set_gate

spurious_slave_irq:
    pushq %rax
    movb $0x20, %al
    outb %al, $0x20
    popq %rax
spurious_irq:
    iretq

/* pic_init(%dil = master mask, %sil = slave mask): both 8259s re-initialised, IRQ 0-7 -> vectors
   0x20-0x27, IRQ 8-15 -> 0x28-0x2F, cascade on IRQ 2, 8086 mode, then the given masks (1 = masked). */
    .globl pic_init
pic_init:
    movb $0x11, %al                 /* ICW1: edge, cascade, ICW4 follows */
    outb %al, $0x20
    outb %al, $0xA0
    movb $0x20, %al                 /* ICW2: vector base */
    outb %al, $0x21
    movb $0x28, %al
    outb %al, $0xA1
    movb $0x04, %al                 /* ICW3: slave on IRQ 2 / slave id 2 */
    outb %al, $0x21
    movb $0x02, %al
    outb %al, $0xA1
    movb $0x01, %al                 /* ICW4: 8086 mode, normal EOI */
    outb %al, $0x21
    outb %al, $0xA1
    movl %edi, %eax                 /* OCW1: masks */
    outb %al, $0x21
    movl %esi, %eax
    outb %al, $0xA1
    ret

/* pit_set_periodic(%edi = divisor, 1..65536 where 65536 is passed as 0): PIT channel 0 in mode 2
   (rate generator), binary, low byte then high byte. IRQ0 fires at 1193182 / divisor Hz. */
    .globl pit_set_periodic
pit_set_periodic:
    movb $0x34, %al                 /* channel 0, lobyte/hibyte, mode 2, binary */
    outb %al, $0x43
    movl %edi, %eax
    outb %al, $0x40
    movb %ah, %al
    outb %al, $0x40
    ret

/* pit_ticks_start(): makes PIT channel 0 a free-running time base (mode 2, reload 65536, one wrap per
   ~54.9 ms) for pit_ticks(). Its IRQ0 must stay masked or interrupts disabled while it is used. */
    .globl pit_ticks_start
pit_ticks_start:
    xorl %edi, %edi
    call pit_set_periodic
    call pit_read_counter
    movw %ax, pit_last(%rip)
    movq $0, pit_total(%rip)
    ret

/* pit_ticks() -> %rax: PIT input-clock ticks (1193182 per second) since pit_ticks_start(). Must be called
   at least once every ~50 ms, or wraps of the 16-bit counter are missed. Not for concurrent callers. */
    .globl pit_ticks
pit_ticks:
    call pit_read_counter
    movzwl pit_last(%rip), %ecx
    movw %ax, pit_last(%rip)
    subl %eax, %ecx                 /* the counter counts down: elapsed = last - now (mod 65536) */
    movzwl %cx, %ecx
    addq %rcx, pit_total(%rip)
    movq pit_total(%rip), %rax
    ret

/* pit_read_counter() -> %eax: channel 0's current count, latched */
pit_read_counter:
    xorl %eax, %eax                 /* counter latch command, channel 0 */
    outb %al, $0x43
    inb $0x40, %al
    movb %al, %cl
    inb $0x40, %al
    movb %al, %ah
    movb %cl, %al
    movzwl %ax, %eax
    ret

/* delay_us(%rdi = microseconds): busy-waits on pit_ticks(); needs pit_ticks_start() first. So that a dead
   PIT cannot hang a guest, it also gives up after %rdi + 1000 polls (a poll is three port accesses, which
   take well over 1 us each even with hardware virtualization). */
    .globl delay_us
delay_us:
    pushq %rbx
    pushq %r12
    pushq %r13
    leaq 1000(%rdi), %r13           /* poll budget */
    imulq $1193182, %rdi, %rax
    movl $1000000, %ecx
    xorl %edx, %edx
    divq %rcx
    movq %rax, %r12                 /* ticks to wait */
    call pit_ticks
    movq %rax, %rbx                 /* start */
1:  call pit_ticks
    subq %rbx, %rax
    cmpq %r12, %rax
    jae 2f
    decq %r13
    jnz 1b
2:  popq %r13
    popq %r12
    popq %rbx
    ret

/* ---- Local APIC (xAPIC MMIO at 0xFEE00000) ---- */
    .set LAPIC, 0xFEE00000

/* lapic_id() -> %eax: this CPU's APIC id (ID register bits 31:24) */
    .globl lapic_id
lapic_id:
    movl $LAPIC, %eax               /* above 2 GiB: no 32-bit absolute addressing, use a base register */
    movl 0x20(%rax), %eax
    shrl $24, %eax
    ret

/* lapic_enable(): software-enables this CPU's local APIC (spurious vector 0xFF), TPR 0, and puts it in
   virtual-wire mode: LINT0 ExtINT (so the 8259's INTR still reaches the CPU), LINT1 NMI. The LVTs are
   written after the enable because a software-disabled APIC forces their mask bits. */
    .globl lapic_enable
lapic_enable:
    movl $LAPIC, %eax
    movl $0x1FF, 0xF0(%rax)         /* spurious interrupt vector register: enable | vector 0xFF */
    movl $0, 0x80(%rax)             /* task priority 0 */
    movl $0x700, 0x350(%rax)        /* LVT LINT0: ExtINT, unmasked, edge */
    movl $0x400, 0x360(%rax)        /* LVT LINT1: NMI */
    ret

/* lapic_eoi() */
    .globl lapic_eoi
lapic_eoi:
    movl $LAPIC, %eax
    movl $0, 0xB0(%rax)
    ret

/* ---- ACPI ---- */

/* acpi_find_rsdp() -> %rax: physical address of a valid RSDP (signature and 20-byte checksum), or 0.
   Tries hvm_start_info.rsdp_paddr (offset 32) first, then scans 0xE0000-0xFFFFF on 16-byte boundaries. */
    .globl acpi_find_rsdp
acpi_find_rsdp:
    pushq %rbx
    movq pvh_start_info(%rip), %rax
    testq %rax, %rax
    jz 1f
    movq 32(%rax), %rbx             /* hvm_start_info.rsdp_paddr */
    testq %rbx, %rbx
    jz 1f
    movq %rbx, %rdi
    call rsdp_valid
    testl %eax, %eax
    jnz 3f
1:  movl $0xE0000, %ebx
2:  movq %rbx, %rdi
    call rsdp_valid
    testl %eax, %eax
    jnz 3f
    addq $16, %rbx
    cmpq $0x100000, %rbx
    jb 2b
    xorl %ebx, %ebx
3:  movq %rbx, %rax
    popq %rbx
    ret

/* rsdp_valid(%rdi = address) -> %eax = 1 when "RSD PTR " with a zero checksum over 20 bytes is there */
rsdp_valid:
    movabsq $0x2052545020445352, %rax  /* "RSD PTR " */
    cmpq %rax, (%rdi)
    jne 1f
    movl $20, %esi
    call acpi_checksum
    testb %al, %al
    jnz 1f
    movl $1, %eax
    ret
1:  xorl %eax, %eax
    ret

/* acpi_checksum(%rdi = address, %rsi = length) -> %al = byte sum (0 when valid) */
acpi_checksum:
    xorl %eax, %eax
1:  testq %rsi, %rsi
    jz 2f
    addb (%rdi), %al
    incq %rdi
    decq %rsi
    jmp 1b
2:  ret

/* acpi_find_table(%edi = 4-byte signature, e.g. 0x43495041 for "APIC") -> %rax: physical address of the
   first table with that signature in the XSDT (when the RSDP has revision >= 2 and an XSDT address) or
   the RSDT, or 0. Table checksums are not checked; the caller reads the header's length itself. */
    .globl acpi_find_table
acpi_find_table:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    movl %edi, %r12d                /* signature */
    call acpi_find_rsdp
    testq %rax, %rax
    jz 9f
    movl $4, %r14d                  /* entry size: RSDT 4 */
    movl 16(%rax), %ebx             /* RSDT address */
    cmpb $2, 15(%rax)               /* revision */
    jb 1f
    movq 24(%rax), %rcx             /* XSDT address */
    testq %rcx, %rcx
    jz 1f
    movq %rcx, %rbx
    movl $8, %r14d
1:  testq %rbx, %rbx
    jz 9f
    movl 4(%rbx), %r13d             /* length of the RSDT/XSDT */
    addq %rbx, %r13                 /* end */
    addq $36, %rbx                  /* first entry, after the header */
2:  leaq (%rbx,%r14), %rax
    cmpq %r13, %rax
    ja 9f
    movl (%rbx), %eax
    cmpl $8, %r14d
    jne 3f
    movq (%rbx), %rax
3:  testq %rax, %rax
    jz 4f
    cmpl %r12d, (%rax)
    je 8f
4:  addq %r14, %rbx
    jmp 2b
9:  xorl %eax, %eax
8:  popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* serial_putsdec(%rdi = signed value): "-" then the magnitude for negative values. */
    .globl serial_putsdec
serial_putsdec:
    pushq %rbx
    movq %rdi, %rbx
    testq %rbx, %rbx
    jns 1f
    movl $'-', %edi
    call serial_putc
    negq %rbx
1:  movq %rbx, %rdi
    call serial_putdec
    popq %rbx
    ret

/* ---- Display: Bochs VBE "DISPI" registers and the linear framebuffer ---- */
    .set VBE_INDEX, 0x1CE
    .set VBE_DATA, 0x1CF
    .set FB_FALLBACK, 0xE0000000    /* the fixed Bochs LFB address, used when no PCI display answers */

/* vbe_write(%edi = register index, %esi = 16-bit value) */
    .globl vbe_write
vbe_write:
    movw $VBE_INDEX, %dx
    movl %edi, %eax
    outw %ax, %dx
    movw $VBE_DATA, %dx
    movl %esi, %eax
    outw %ax, %dx
    ret

/* vbe_read(%edi = register index) -> %eax (16 bits, zero-extended) */
    .globl vbe_read
vbe_read:
    movw $VBE_INDEX, %dx
    movl %edi, %eax
    outw %ax, %dx
    movw $VBE_DATA, %dx
    inw %dx, %ax
    movzwl %ax, %eax
    ret

/* vbe_set_mode(%edi = XRES, %esi = YRES): ID <- 0xB0C5 (newest interface), ENABLE <- 0, XRES, YRES,
   BPP <- 32, then ENABLE <- 0x41 (enabled | LFB; memory cleared). Pixels are then 0x00RRGGBB, 32-bit
   little-endian, stride XRES * 4, at fb_base(). The ENABLE write is the one on which porthole-vmm's
   console leaves VGA text mode. Returns the ID register as read back after the ID write in %eax. */
    .globl vbe_set_mode
vbe_set_mode:
    pushq %rbx
    pushq %r12
    pushq %r13
    movl %edi, %r12d
    movl %esi, %r13d
    xorl %edi, %edi                 /* 0: ID */
    movl $0xB0C5, %esi
    call vbe_write
    xorl %edi, %edi
    call vbe_read
    movl %eax, %ebx
    movl $4, %edi                   /* ENABLE <- 0 while the mode changes */
    xorl %esi, %esi
    call vbe_write
    movl $1, %edi                   /* XRES */
    movl %r12d, %esi
    call vbe_write
    movl $2, %edi                   /* YRES */
    movl %r13d, %esi
    call vbe_write
    movl $3, %edi                   /* BPP */
    movl $32, %esi
    call vbe_write
    movl $4, %edi                   /* ENABLE <- enabled | LFB */
    movl $0x41, %esi
    call vbe_write
    movl %ebx, %eax
    popq %r13
    popq %r12
    popq %rbx
    ret

/* fb_base() -> %rax: physical (= virtual, identity map) address of the linear framebuffer. Scans PCI bus 0
   devices 0-31, function 0, through configuration mechanism #1 (0xCF8/0xCFC) for the Bochs/QEMU display
   (vendor 0x1234, device 0x1111) and returns its BAR0 with the low 4 bits masked; it also sets the
   device's memory-space enable bit, and if BAR0 is unassigned (0) it assigns 0xE0000000 first. With no
   such device (no PCI at all: reads give 0xFFFFFFFF) it returns the fixed Bochs address 0xE0000000. */
    .globl fb_base
fb_base:
    xorl %ecx, %ecx                 /* device number */
1:  movl %ecx, %eax
    shll $11, %eax
    orl $0x80000000, %eax           /* enable | bus 0 | device | function 0 | register 0 */
    movl %eax, %r8d
    movw $0xCF8, %dx
    outl %eax, %dx
    movw $0xCFC, %dx
    inl %dx, %eax
    cmpl $0x11111234, %eax          /* device 0x1111 << 16 | vendor 0x1234 */
    je 2f
    incl %ecx
    cmpl $32, %ecx
    jb 1b
    movl $FB_FALLBACK, %eax
    ret
2:  leal 0x10(%r8), %eax            /* BAR0 */
    movw $0xCF8, %dx
    outl %eax, %dx
    movw $0xCFC, %dx
    inl %dx, %eax
    andl $0xFFFFFFF0, %eax
    jnz 3f
    movl $FB_FALLBACK, %eax         /* unassigned: give it the Bochs address */
    outl %eax, %dx
3:  movl %eax, %r9d
    leal 0x04(%r8), %eax            /* command register (low 16 bits; status above is write-1-to-clear) */
    movw $0xCF8, %dx
    outl %eax, %dx
    movw $0xCFC, %dx
    inl %dx, %eax
    movzwl %ax, %eax
    orl $0x2, %eax                  /* memory space enable */
    outl %eax, %dx
    movl %r9d, %eax                 /* zero-extended into %rax */
    ret

/* ---- i8042 keyboard controller (ports 0x60 data, 0x64 status/command), polled with a budget ---- */
    .set KBC_DATA, 0x60
    .set KBC_STATUS, 0x64
    .set POLLS, 20000               /* poll budget per wait (each poll is a port read) */

/* kbc_command(%dil = command): waits for the input buffer to empty (status bit 1), writes port 0x64 */
    .globl kbc_command
kbc_command:
    call kbc_wait_write
    movl %edi, %eax
    outb %al, $KBC_STATUS
    ret

/* kbc_write_data(%dil = byte): waits for the input buffer to empty, writes port 0x60 */
    .globl kbc_write_data
kbc_write_data:
    call kbc_wait_write
    movl %edi, %eax
    outb %al, $KBC_DATA
    ret

/* kbc_wait_write(): polls status bit 1 clear, at most POLLS times; preserves %rdi */
    .globl kbc_wait_write
kbc_wait_write:
    movl $POLLS, %ecx
1:  inb $KBC_STATUS, %al
    testb $2, %al
    jz 2f
    decl %ecx
    jnz 1b
2:  ret

/* kbc_read() -> %eax: the next byte from port 0x60 once status bit 0 is set, or -1 after POLLS polls */
    .globl kbc_read
kbc_read:
    movl $POLLS, %ecx
1:  inb $KBC_STATUS, %al
    testb $1, %al
    jnz 2f
    decl %ecx
    jnz 1b
    movl $-1, %eax
    ret
2:  xorl %eax, %eax
    inb $KBC_DATA, %al
    ret

/* ---- VGA text screen: 80x25 cells at 0xB8000, CRTC at 0x3D4/0x3D5 ---- */
    .set VGA_TEXT, 0xB8000
    .set CRTC_INDEX, 0x3D4

/* vga_text_clear(): every one of the 2000 cells <- 0x0720 (space, light grey on black), display start
   address (CRTC 0x0C/0x0D) <- 0, cursor shape (CRTC 0x0A/0x0B) <- scan lines 13-14, enabled. */
    .globl vga_text_clear
vga_text_clear:
    movl $VGA_TEXT, %edi
    movl $2000, %ecx
    movw $0x0720, %ax
    rep stosw
    movl $0x0C, %edi                /* display start address high <- 0 */
    xorl %esi, %esi
    call crtc_write
    movl $0x0D, %edi                /* display start address low <- 0 */
    xorl %esi, %esi
    call crtc_write
    movl $0x0A, %edi                /* cursor start <- scan line 13, bit 5 clear: cursor shown */
    movl $0x0D, %esi
    call crtc_write
    movl $0x0B, %edi                /* cursor end <- scan line 14 (the BIOS's mode-3 underline) */
    movl $0x0E, %esi
    jmp crtc_write

/* crtc_write(%dil = CRTC register index, %sil = value): two byte writes, index to 0x3D4, value to 0x3D5 */
    .globl crtc_write
crtc_write:
    movw $CRTC_INDEX, %dx
    movl %edi, %eax
    outb %al, %dx
    incw %dx
    movl %esi, %eax
    outb %al, %dx
    ret

/* vga_set_cursor(%edi = cell index, row * 80 + column): CRTC 0x0E (high byte), 0x0F (low byte) */
    .globl vga_set_cursor
vga_set_cursor:
    pushq %rbx
    movl %edi, %ebx
    movl $0x0E, %edi
    movl %ebx, %esi
    shrl $8, %esi
    call crtc_write
    movl $0x0F, %edi
    movl %ebx, %esi
    call crtc_write
    popq %rbx
    ret

/* ---- Command-line words and output helpers shared by the device drivers (virtio-blk, -net, -gpu) ---- */

/* match(%rdi = word, %rsi = word end, %rdx = command name) -> %rax = its arguments (after a name ending in
   '=': prefix match) or the word end (other names: whole-word match), or 0 */
    .globl match
match:
1:  movzbl (%rdx), %eax
    testb %al, %al
    jz 2f
    cmpq %rsi, %rdi
    jae 3f
    cmpb (%rdi), %al
    jne 3f
    incq %rdi
    incq %rdx
    cmpb $'=', %al
    jne 1b
    movq %rdi, %rax
    ret
2:  cmpq %rsi, %rdi
    jne 3f
    movq %rdi, %rax
    ret
3:  xorl %eax, %eax
    ret

/* parse_args(%rdi = text, %rsi = end, %edx = count, %rcx = u64 output array) -> %eax = 0, or 1 when the
   text is not exactly count comma-separated decimal numbers (each at most 18 digits) */
    .globl parse_args
parse_args:
    pushq %r12
    pushq %r13
    pushq %r14
    movq %rsi, %r12
    movl %edx, %r13d
    movq %rcx, %r14
1:  xorl %eax, %eax                 /* one number: value in %rax, digits in %ecx */
    xorl %ecx, %ecx
2:  movzbl (%rdi), %edx
    subl $'0', %edx
    cmpl $9, %edx
    ja 3f
    imulq $10, %rax
    addq %rdx, %rax
    incq %rdi
    incl %ecx
    cmpl $18, %ecx                  /* no overflow */
    ja 9f
    jmp 2b
3:  testl %ecx, %ecx
    jz 9f
    movq %rax, (%r14)
    addq $8, %r14
    decl %r13d
    jz 4f
    cmpq %r12, %rdi
    jae 9f
    cmpb $',', (%rdi)
    jne 9f
    incq %rdi
    jmp 1b
4:  cmpq %r12, %rdi
    jne 9f
    xorl %eax, %eax
    jmp 8f
9:  movl $1, %eax
8:  popq %r14
    popq %r13
    popq %r12
    ret

/* put_kv(%rdi = text, %rsi = value): the text, then the value in decimal */
    .globl put_kv
put_kv:
    pushq %rsi
    call serial_puts
    popq %rdi
    jmp serial_putdec

/* newline(): '\n' on COM1 */
    .globl newline
newline:
    movl $'\n', %edi
    jmp serial_putc

/* run_words(%rdi = command table, %rsi = bad-word text, %rdx = final text): the kernel command line's words
   (hvm_start_info.cmdline_paddr, offset 24; separated by spaces or control characters; none without a
   start info or command line), left to right. The table is entries {u64 name, u64 handler}, ended by a 0
   name; the first entry whose name matches the word (see match) is called with (%rdi = its arguments, %rsi
   = word end) and returns %eax = 0, or 1 for a bad word. A bad word, or one no entry matches, prints the
   text, the word and '\n'. After the last word the final text is printed. */
    .globl run_words
run_words:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rdx
    movq %rdi, %r15                 /* %r12 word start, %r13 word end */
    movq %rsi, %rbx
    movq pvh_start_info(%rip), %rax
    testq %rax, %rax
    jz 9f
    movq 24(%rax), %r12             /* hvm_start_info.cmdline_paddr */
    testq %r12, %r12
    jz 9f
1:  movzbl (%r12), %eax
    testb %al, %al
    jz 9f
    cmpb $' ', %al
    ja 3f
    incq %r12                       /* separator */
    jmp 1b
3:  movq %r12, %r13
4:  incq %r13
    cmpb $' ', (%r13)               /* NUL, space and control characters end a word */
    ja 4b
    movq %r15, %rdi
    movq %r12, %rsi
    movq %r13, %rdx
    call table_find
    testq %rax, %rax
    jz 7f
    movq %rdx, %rdi                 /* arguments */
    movq %r13, %rsi                 /* word end */
    call *8(%rax)
    testl %eax, %eax
    jz 8f
7:  movq %rbx, %rdi                 /* bad word */
    call serial_puts
2:  movzbl (%r12), %edi
    call serial_putc
    incq %r12
    cmpq %r13, %r12
    jb 2b
    call newline
8:  movq %r13, %r12
    jmp 1b
9:  popq %rdi
    call serial_puts
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* table_find(%rdi = table of {u64 name, u64 value} entries ended by a 0 name, %rsi = word, %rdx = word end)
   -> %rax = the first entry whose name matches the word (see match) with %rdx = match's result (the
   arguments), or %rax = 0 */
    .globl table_find
table_find:
    pushq %rbx
    pushq %r12
    pushq %r13
    movq %rdi, %rbx
    movq %rsi, %r12
    movq %rdx, %r13
1:  movq (%rbx), %rdx
    testq %rdx, %rdx
    jz 3f
    movq %r12, %rdi
    movq %r13, %rsi
    call match
    testq %rax, %rax
    jnz 2f
    addq $16, %rbx
    jmp 1b
2:  movq %rax, %rdx
    movq %rbx, %rax
    jmp 4f
3:  xorl %eax, %eax
4:  popq %r13
    popq %r12
    popq %rbx
    ret

/* cmd_ok, cmd_bad: jumped to (not called) by a command handler that pushed %rbx, %r12, %r13, %r14, %r15 in
   that order on entry (virtio.inc: SAVE): restores them and returns %eax = 0 (cmd_ok) or 1 (cmd_bad, a bad
   word) to the handler's caller. */
    .globl cmd_ok, cmd_bad
cmd_ok:
    xorl %eax, %eax
    jmp 1f
cmd_bad:
    movl $1, %eax
1:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* wait_idx(%rdi = address of a used ring's idx, %rsi = address of the driver's last-seen u16, %rdx =
   timeout in PIT ticks) -> %eax = 1 as soon as they differ (then %edx = the idx seen), 0 on timeout. The
   idx is checked 64 times (with pause) between PIT reads; needs pit_ticks_start() first. */
    .globl wait_idx
wait_idx:
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rdi, %r14
    movq %rsi, %r15
    movq %rdx, %r12
    call pit_ticks
    movq %rax, %r13
1:  movl $64, %ecx
2:  movzwl (%r14), %eax
    cmpw (%r15), %ax
    jne 3f
    pause
    decl %ecx
    jnz 2b
    call pit_ticks
    subq %r13, %rax
    cmpq %r12, %rax
    jb 1b
    xorl %eax, %eax
    jmp 4f
3:  lfence                          /* used idx before the used entries and the buffers */
    movl %eax, %edx
    movl $1, %eax
4:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    ret

/* put_case(%rdi = text, %rsi = case name, %edx = used flag): the text, the name, " used=" and the flag
   (the start of a driver's `hostile case=` line) */
    .globl put_case
put_case:
    pushq %rsi
    pushq %rdx
    call serial_puts
    movq 8(%rsp), %rdi
    call serial_puts
    leaq msg_case_used(%rip), %rdi
    popq %rsi
    addq $8, %rsp
    jmp put_kv

/* put_devstatus(%rdi = virtio common configuration): " devstatus=", device_status in 2 hex digits, '\n' */
    .globl put_devstatus
put_devstatus:
    pushq %rdi
    leaq msg_case_devstatus(%rip), %rdi
    call serial_puts
    popq %rax
    movzbl 0x14(%rax), %edi         /* device_status */
    movl $2, %esi
    call serial_puthex
    jmp newline

/* driver_start(): the start-up of the device drivers: the PIT as the time base (pit_ticks_start), the
   spurious interrupt gates, both 8259s remapped to 0x20-0x2F and fully masked */
    .globl driver_start
driver_start:
    call pit_ticks_start
    call spurious_irqs_install
    movl $0xFF, %edi
    movl $0xFF, %esi
    jmp pic_init

/* hang(%rdi = text): prints the text, then cli; hlt forever (so that a test can inspect the VMM) */
    .globl hang
hang:
    call serial_puts
    cli
1:  hlt
    jmp 1b

/* fnv1a(%rdi = data, %rsi = length) -> %eax: 32-bit FNV-1a. Instructions are expensive here (emulated), so
   8 bytes are loaded at a time and each byte costs an xor and a multiply: h ^= byte only touches h's low
   byte, so `xorb` of %cl/%ch/%dl/%dh into %al does it. The last length % 8 bytes go one at a time. */
    .globl fnv1a
fnv1a:
    movl $0x811c9dc5, %eax
    movq %rsi, %r8
    andl $7, %r8d
    shrq $3, %rsi
    jz 2f
1:  movl (%rdi), %ecx
    movl 4(%rdi), %edx
    xorb %cl, %al
    imull $0x01000193, %eax, %eax
    xorb %ch, %al
    imull $0x01000193, %eax, %eax
    shrl $16, %ecx
    xorb %cl, %al
    imull $0x01000193, %eax, %eax
    xorb %ch, %al
    imull $0x01000193, %eax, %eax
    xorb %dl, %al
    imull $0x01000193, %eax, %eax
    xorb %dh, %al
    imull $0x01000193, %eax, %eax
    shrl $16, %edx
    xorb %dl, %al
    imull $0x01000193, %eax, %eax
    xorb %dh, %al
    imull $0x01000193, %eax, %eax
    addq $8, %rdi
    decq %rsi
    jnz 1b
2:  testl %r8d, %r8d
    jz 4f
3:  xorb (%rdi), %al
    imull $0x01000193, %eax, %eax
    incq %rdi
    decl %r8d
    jnz 3b
4:  ret

/* ioapic_write(%edi = register, %esi = value): the IOAPIC at 0xFEC00000 */
    .globl ioapic_write
ioapic_write:
    movl $0xFEC00000, %eax
    movl %edi, (%rax)
    movl %esi, 0x10(%rax)
    ret

/* ---- PCI configuration mechanism #1 and the virtio 1.x modern PCI transport ---- */

/* pci_read(%edi = config address, dword aligned) -> %eax; only %eax and %edx are touched */
    .globl pci_read
pci_read:
    movl %edi, %eax
    movw $0xCF8, %dx
    outl %eax, %dx
    movw $0xCFC, %dx
    inl %dx, %eax
    ret

/* pci_write(%edi = config address, %esi = dword); only %eax and %edx are touched */
    .globl pci_write
pci_write:
    movl %edi, %eax
    movw $0xCF8, %dx
    outl %eax, %dx
    movw $0xCFC, %dx
    movl %esi, %eax
    outl %eax, %dx
    ret

/* pci_find(%edi = device << 16 | vendor, %esi = first device number) -> %eax = the config address of
   register 0 (0x80000000 | slot << 11) of the first function 0 on bus 0 from that slot on with that id, or 0 */
    .globl pci_find
pci_find:
    movl %edi, %r8d
    movl %esi, %ecx
1:  cmpl $32, %ecx
    jae 2f
    movl %ecx, %edi
    shll $11, %edi
    orl $0x80000000, %edi
    call pci_read
    cmpl %r8d, %eax
    je 3f
    incl %ecx
    jmp 1b
2:  xorl %edi, %edi
3:  movl %edi, %eax
    ret

/* vpci_bar(%edi = BAR index, %esi = config address base) -> %rax = memory base, or 0 with %rcx = error text.
   A 64-bit BAR must have its upper dword 0 (the guests identity-map only the first 4 GiB). */
vpci_bar:
    pushq %r12
    pushq %r13
    movl %edi, %r12d
    movl %esi, %r13d
    leaq err_badbar(%rip), %rcx
    cmpl $5, %r12d
    ja 9f
    leal 0x10(%r13,%r12,4), %edi
    call pci_read
    movl %eax, %r8d
    leaq err_iobar(%rip), %rcx
    testb $1, %al
    jnz 9f
    andl $6, %eax
    cmpl $4, %eax                   /* type 2: 64-bit */
    jne 1f
    leaq err_badbar(%rip), %rcx
    cmpl $5, %r12d
    je 9f
    leal 0x14(%r13,%r12,4), %edi
    call pci_read
    leaq err_above4g(%rip), %rcx
    testl %eax, %eax
    jnz 9f
1:  movl %r8d, %eax
    andl $0xFFFFFFF0, %eax
    leaq err_unassigned(%rip), %rcx
    jz 9f
    popq %r13
    popq %r12
    ret
9:  xorl %eax, %eax
    popq %r13
    popq %r12
    ret

/* virtio_pci_caps(%edi = config address of register 0, %rsi = output {u64 common, notify, isr, device
   config addresses; u32 notify_off_multiplier}) -> %rax = 0, or an error text (no-capabilities, bad-bar,
   io-bar, bar-above-4g, bar-unassigned, missing-virtio-cap). Sets command |= memory space | bus master,
   then walks the capability list (at most 48 entries) for the first vendor-specific capability (id 0x09)
   of each cfg_type 1 common / 2 notify / 3 ISR / 4 device config. */
    .globl virtio_pci_caps
virtio_pci_caps:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movl %edi, %r12d
    movq %rsi, %rbx
    xorl %eax, %eax
    movq %rax, 0(%rbx)
    movq %rax, 8(%rbx)
    movq %rax, 16(%rbx)
    movq %rax, 24(%rbx)
    movl %eax, 32(%rbx)
    leal 0x04(%r12), %edi           /* command | status << 16 */
    call pci_read
    movl %eax, %r13d
    movzwl %ax, %esi
    orl $0x6, %esi                  /* memory space, bus master; status (W1C) written as 0 */
    call pci_write
    leaq err_nocaps(%rip), %rax
    testl $0x100000, %r13d          /* status bit 4: capabilities list */
    jz 9f
    leal 0x34(%r12), %edi
    call pci_read
    movzbl %al, %r13d
    andl $0xFC, %r13d               /* capability pointer */
    movl $48, %r14d                 /* a looping list cannot hang us */
1:  testl %r13d, %r13d
    jz 3f
    decl %r14d
    jz 3f
    leal (%r12,%r13), %edi
    call pci_read                   /* id, next, length, cfg_type */
    movl %eax, %r15d
    shrl $8, %r15d
    andl $0xFC, %r15d               /* next */
    cmpb $0x09, %al                 /* vendor-specific */
    jne 2f
    shrl $24, %eax
    cmpl $1, %eax
    jb 2f
    cmpl $4, %eax
    ja 2f
    movl %eax, %ebp                 /* cfg_type 1..4 -> output + (type - 1) * 8 */
    cmpq $0, -8(%rbx,%rbp,8)
    jne 2f                          /* only the first of each type */
    leal 4(%r12,%r13), %edi
    call pci_read
    movzbl %al, %edi                /* bar */
    movl %r12d, %esi
    call vpci_bar
    testq %rax, %rax
    jz 8f
    movq %rax, -8(%rbx,%rbp,8)
    leal 8(%r12,%r13), %edi
    call pci_read                   /* offset within the BAR */
    addq %rax, -8(%rbx,%rbp,8)
    cmpl $2, %ebp
    jne 2f
    leal 16(%r12,%r13), %edi
    call pci_read
    movl %eax, 32(%rbx)
2:  movl %r15d, %r13d
    jmp 1b
3:  leaq err_missingcap(%rip), %rax
    cmpq $0, 0(%rbx)
    je 9f
    cmpq $0, 8(%rbx)
    je 9f
    cmpq $0, 16(%rbx)
    je 9f
    cmpq $0, 24(%rbx)
    je 9f
    xorl %eax, %eax
    jmp 9f
8:  movq %rcx, %rax
9:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* virtio_reset(%rdi = common configuration) -> %eax = 0 when device_status read back 0 after the reset
   write (at most 100000 polls), 1 otherwise; then ACKNOWLEDGE | DRIVER is set (only on success). */
    .globl virtio_reset
virtio_reset:
    movb $0, 0x14(%rdi)
    movl $100000, %ecx
1:  movb 0x14(%rdi), %al
    testb %al, %al
    jz 2f
    pause
    decl %ecx
    jnz 1b
    movl $1, %eax
    ret
2:  movb $0x01, 0x14(%rdi)          /* ACKNOWLEDGE */
    movb $0x03, 0x14(%rdi)          /* | DRIVER */
    xorl %eax, %eax
    ret

/* virtio_features(%rdi = common configuration, %esi = driver feature bits 0-31 wanted) -> %rax = 0 with %edx
   = the bits 0-31 negotiated (wanted & offered) and %ecx = the device's bits 0-31, or an error text:
   no-version-1 (VIRTIO_F_VERSION_1, bit 32, not offered), features-rejected (FEATURES_OK did not stay set).
   VERSION_1 is always accepted (the only bit above 31); FEATURES_OK is set on top of ACKNOWLEDGE | DRIVER. */
    .globl virtio_features
virtio_features:
    movl $0, 0x00(%rdi)             /* device_feature_select */
    movl 0x04(%rdi), %ecx           /* device features 0-31 */
    movl $1, 0x00(%rdi)
    movl 0x04(%rdi), %eax           /* 32-63 */
    testl $1, %eax                  /* VIRTIO_F_VERSION_1 */
    jz 8f
    andl %ecx, %esi
    movl $0, 0x08(%rdi)             /* driver_feature_select */
    movl %esi, 0x0C(%rdi)
    movl $1, 0x08(%rdi)
    movl $1, 0x0C(%rdi)
    movb $0x0B, 0x14(%rdi)          /* | FEATURES_OK */
    movb 0x14(%rdi), %al
    testb $0x08, %al
    jz 9f
    movl %esi, %edx
    xorl %eax, %eax
    ret
8:  leaq err_version(%rip), %rax
    ret
9:  leaq err_features(%rip), %rax
    ret

/* ---- One interrupt-driven completion (INTx through the IOAPIC, vector VIRTIO_IRQ_VECTOR) ---- */

/* virtio_irq_arm(%edi = IOAPIC pin (the device's INTERRUPT_LINE, <= 23), %rsi = its ISR register): irq_count
   and irq_spurious <- 0, the gate for virtio_irq, the local APIC enabled, the pin -> the vector, fixed,
   physical destination APIC 0, active high, level, unmasked. Interrupts stay disabled (see irq_wait_idx). */
    .globl virtio_irq_arm
virtio_irq_arm:
    pushq %rbx
    movl %edi, %ebx
    movq %rsi, irq_isr(%rip)
    movl $0, irq_count(%rip)
    movl $0, irq_spurious(%rip)
    movl $VIRTIO_IRQ_VECTOR, %edi
    leaq virtio_irq(%rip), %rsi
    call idt_set_gate
    call lapic_enable
    leal 0x11(,%rbx,2), %edi        /* redirection entry, high: destination APIC id 0 */
    xorl %esi, %esi
    call ioapic_write
    leal 0x10(,%rbx,2), %edi        /* low: vector, fixed, physical, active high, level, unmasked */
    movl $0x8000 | VIRTIO_IRQ_VECTOR, %esi
    popq %rbx
    jmp ioapic_write

/* virtio_irq_disarm(%edi = IOAPIC pin): the pin's redirection entry masked again */
    .globl virtio_irq_disarm
virtio_irq_disarm:
    leal 0x10(,%rdi,2), %edi
    movl $0x18000 | VIRTIO_IRQ_VECTOR, %esi
    jmp ioapic_write

/* irq_wait_idx(%rdi = address of a used ring's idx, %rsi = address of the driver's last-seen u16, %rdx =
   timeout in PIT ticks): with interrupts enabled, waits until the idx differs and an interrupt has come
   (irq_count != 0), or the timeout; returns with interrupts disabled. The caller looks at both itself. */
    .globl irq_wait_idx
irq_wait_idx:
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rdi, %r14
    movq %rsi, %r15
    movq %rdx, %r12
    call pit_ticks
    movq %rax, %r13
    sti
2:  movzwl (%r14), %eax
    cmpw (%r15), %ax
    je 3f
    cmpl $0, irq_count(%rip)
    jne 4f
3:  pause
    call pit_ticks
    subq %r13, %rax
    cmpq %r12, %rax
    jb 2b
4:  cli
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    ret

/* virtio_irq, vector VIRTIO_IRQ_VECTOR: reads the ISR (which deasserts the INTx line), counts it in irq_count
   when it had bits set, else in irq_spurious (a level-triggered line may bring an interrupt whose work an
   earlier one already took), EOI. */
virtio_irq:
    pushq %rax
    movq irq_isr(%rip), %rax
    movzbl (%rax), %eax
    testl %eax, %eax
    jz 1f
    incl irq_count(%rip)
    jmp 2f
1:  incl irq_spurious(%rip)
2:  movl $0xFEE00000, %eax          /* local APIC EOI */
    movl $0, 0xB0(%rax)
    popq %rax
    iretq

/* virtio_queue_setup(%rdi = the structures as virtio_pci_caps wrote them, %esi = queue index, %edx = most
   entries wanted, %rcx = 4 KiB ring page, laid out as descriptors at 0x000 (up to 16), avail ring at 0x100,
   used ring at 0x200) -> %eax = the queue size used (min(device size, wanted); 0: the device has no such
   queue, nothing done), %rdx = the queue's notification address (notify structure + queue_notify_off *
   notify_off_multiplier). The page is cleared, the queue's addresses written (64-bit fields as two 32-bit
   writes, low first) and queue_enable set. */
    .globl virtio_queue_setup
virtio_queue_setup:
    movq %rdi, %r11
    movq (%rdi), %rdi               /* common configuration */
    movq %rcx, %r8
    movw %si, 0x16(%rdi)            /* queue_select */
    movzwl 0x18(%rdi), %eax         /* queue_size */
    testl %eax, %eax
    jz 2f
    cmpl %edx, %eax
    jbe 1f
    movl %edx, %eax
1:  movw %ax, 0x18(%rdi)
    movl %eax, %r9d
    movq %rdi, %r10
    movq %r8, %rdi                  /* ring page cleared */
    xorl %eax, %eax
    movl $512, %ecx
    rep stosq
    movq %r8, %rax                  /* descriptor table */
    movl %eax, 0x20(%r10)
    shrq $32, %rax
    movl %eax, 0x24(%r10)
    leaq 0x100(%r8), %rax           /* driver area: the avail ring */
    movl %eax, 0x28(%r10)
    shrq $32, %rax
    movl %eax, 0x2C(%r10)
    leaq 0x200(%r8), %rax           /* device area: the used ring */
    movl %eax, 0x30(%r10)
    shrq $32, %rax
    movl %eax, 0x34(%r10)
    movzwl 0x1E(%r10), %edx         /* queue_notify_off */
    imull 32(%r11), %edx            /* * notify_off_multiplier */
    addq 8(%r11), %rdx              /* + notify structure */
    movw $1, 0x1C(%r10)             /* queue_enable */
    movl %r9d, %eax
2:  ret

    .section .bss
    .p2align 3
    .globl exception_fail_prefix
exception_fail_prefix:              /* see exception_common; 0: crash on purpose */
    .skip 8
pit_total:
    .skip 8
    .globl irq_isr, irq_count, irq_spurious
irq_isr:                            /* virtio_irq: the ISR register read */
    .skip 8
irq_count:                          /* virtio_irq: interrupts since virtio_irq_arm whose ISR had bits set */
    .skip 4
irq_spurious:                       /* virtio_irq: those whose ISR read 0 */
    .skip 4
    .p2align 3
pit_last:
    .skip 8

    .section .rodata
hex_digits:
    .ascii "0123456789abcdef"
msg_exception:
    .asciz "\nPORTHOLE-GUEST-EXCEPTION vector=0x"
msg_error:
    .asciz " error=0x"
msg_rip:
    .asciz " rip=0x"
msg_vector:
    .asciz " vector=0x"
msg_cs:
    .asciz " cs=0x"
msg_case_used:
    .asciz " used="
msg_case_devstatus:
    .asciz " devstatus="
    .globl err_nocaps, err_badbar, err_iobar, err_above4g, err_unassigned, err_missingcap
    .globl err_version, err_features
err_version:        .asciz "no-version-1"
err_features:       .asciz "features-rejected"
err_nocaps:         .asciz "no-capabilities"
err_badbar:         .asciz "bad-bar"
err_iobar:          .asciz "io-bar"
err_above4g:        .asciz "bar-above-4g"
err_unassigned:     .asciz "bar-unassigned"
err_missingcap:     .asciz "missing-virtio-cap"
    .p2align 3
    .globl idt_pointer
idt_pointer:
    .word 256 * 16 - 1
    .quad idt
null_idt_pointer:
    .word 0
    .quad 0

    .section .bss
    .p2align 12
    .globl idt
idt:
    .skip 256 * 16

/* virtio-blk — a minimal virtio 1.x modern-PCI block driver (spec 1.x §4.1 PCI transport, §5.2 block
 * device, split virtqueues), polled, driven by words on the kernel command line.
 *
 * Start-up: PIT started as the time base (pit_ticks), 8259s remapped and fully masked, spurious gates set.
 * PCI bus 0, devices 0-31, function 0 are scanned for 1AF4:1042 (modern virtio-blk); up to 4 disks, numbered
 * 0.. in slot order. Per disk (the transport part is lib.S's virtio_pci_caps, virtio_reset, virtio_features
 * and virtio_queue_setup, shared with virtio-net.S): command |= memory space | bus master; the capability list
 * is walked for the first vendor-specific capability (id 0x09) of cfg_type 1 common / 2 notify / 3 ISR / 4
 * device config; BARs
 * are read from config space (32-bit or 64-bit memory BARs; a 64-bit BAR with a non-zero upper dword, an
 * I/O BAR or an unassigned BAR is refused). Device init: reset (status <- 0, read back until 0), ACKNOWLEDGE,
 * DRIVER, features: VIRTIO_F_VERSION_1 (bit 32), and VIRTIO_BLK_F_DISCARD (13) and VIRTIO_BLK_F_WRITE_ZEROES
 * (14) when the device offers them, FEATURES_OK (checked), queue 0 with
 * min(queue_size, 16) entries in a static 4 KiB page per disk, queue_enable, DRIVER_OK. On a failure after
 * the reset, FAILED (0x80) is set. ro = device feature bit 5 (VIRTIO_BLK_F_RO); capacity = device config u64
 * at 0, read as two dwords inside a config_generation retry loop.
 * The avail ring's flags are VIRTQ_AVAIL_F_NO_INTERRUPT while polling (the ISR is then left alone and the
 * INTx line quiet); irq-read clears the flag for its one request.
 *
 * A request is descriptors 0-2: header {u32 type, u32 0, u64 sector} (device-readable, 16 bytes), data
 * (omitted for FLUSH), status byte (device-writable, prefilled with 0xFF so "never written" reads 255). One
 * request at a time; the used ring's idx is polled, timed with the PIT (5 s). On a timeout `BLK timeout
 * disk=<i>` is printed, the disk is reset and re-initialised silently (dropping the request), and the
 * command's own result line is not printed.
 *
 * Serial (COM1), lines:
 *   BLK found=<n>
 *   BLK disk=<i> slot=<pci device> irq=<INTERRUPT_LINE> capacity=<sectors> ro=<0|1> qsize=<n>
 *   BLK disk=<i> slot=<pci device> error=<reason>     (initialisation refused; reasons below)
 * then the command-line words (hvm_start_info.cmdline_paddr, offset 24; separated by spaces or control
 * characters), left to right, all acting on the selected disk (default 0), numbers decimal:
 *   disk=N          select disk N (N < found, else bad-word)
 *   init            reset and re-initialise the disk; prints its `BLK disk=` line again
 *   id              GET_ID (type 8, 20-byte buffer): `BLK id disk=<i> status=<s> id=<string>` (up to the
 *                   first NUL, at most 20 characters; bytes outside 0x20-0x7E shown as `?`)
 *   read=S,N        1 <= N <= 2048 sectors from S in one request; the buffer is first filled with 0xA5:
 *                   `BLK read disk=<i> sector=<S> count=<N> status=<s> sum=<8 hex digits>`, sum = FNV-1a
 *                   (32-bit) over the N*512 bytes of the buffer
 *   write=S,N,SEED  1 <= N <= 2048; byte j of absolute sector s is (s*7 + j + SEED) & 0xFF:
 *                   `BLK write disk=<i> sector=<S> count=<N> status=<s>`
 *   flush           `BLK flush disk=<i> status=<s>`
 *   discard=S,N     DISCARD (type 11) of N sectors from S, one segment {u64 S, u32 N, u32 flags 0}:
 *                   `BLK discard disk=<i> sector=<S> count=<N> status=<s>` (UNSUPP when not negotiated)
 *   zeroes=S,N,F    WRITE_ZEROES (type 13) the same way with flags F (1: UNMAP, the device may free the
 *                   space): `BLK zeroes disk=<i> sector=<S> count=<N> status=<s>`
 *   hang            `BLK hang`, then cli; hlt forever
 *   wait-media      polls the ISR register (pause, no timeout) until bit 1 (config change); re-reads the
 *                   capacity: `BLK media disk=<i> capacity=<sectors>`
 *   hostile         malformed requests, each on a freshly re-initialised disk (no disk line), 300 ms wait:
 *                   `BLK hostile case=<name> used=<0|1> status=<s> devstatus=<device_status, 2 hex>`
 *                   for loop huge outside badhead badnext rostatus shortheader indirect availjump writeread,
 *                   then a last re-init and `BLK hostile-done` (see the hc_* routines)
 *   bench-seq=N     `BLK bench-start seq n=<N>`, N reads of 2048 sectors, sequential from 0 (back to 0
 *                   before passing the capacity), `BLK bench-end seq n=<N> errors=<e>`
 *   bench-rand=N    the same with N 8-sector reads at 4 KiB-aligned xorshift64 offsets (seed fixed per
 *                   command), kind `rand`. errors = requests with status != 0; after a timeout the bench
 *                   stops and every request not completed counts as an error.
 *   irq-read=S      one-sector read completed by interrupt: IOAPIC pin INTERRUPT_LINE -> vector 0x40, level,
 *                   active high, physical destination 0; handler reads the ISR (deasserting the line),
 *                   counts, EOIs. `BLK irq disk=<i> status=<s> interrupts=<count> spurious=<count>
 *                   sum=<8 hex digits>` (interrupts: those whose ISR read had bits set; spurious: read 0);
 *                   `BLK irq disk=<i> error=bad-irq-line` when INTERRUPT_LINE > 23
 *   anything else   `BLK bad-word <word>` (also for malformed numbers or out-of-range arguments)
 * A command on a disk that does not exist or failed initialisation prints `BLK no-disk disk=<i>`.
 * Finally `BLK done`, and guest_main returns (power-off).
 * Status values are decimal: 0 OK, 1 IOERR, 2 UNSUPP, 255 never written by the device.
 * Error reasons: no-capabilities, bad-bar, io-bar, bar-above-4g, bar-unassigned, missing-virtio-cap,
 * reset-timeout, no-version-1, features-rejected, no-queue.
 * irq-read waits up to 5 s for both the used idx and the interrupt; if the request completed but no
 * interrupt came, the line still appears, with interrupts=0.
 *
 * Measured under QEMU 7.2 -M pc -enable-kvm on this machine (SeaBIOS assigns the BARs; the modern BAR 4 is
 * 64-bit, below 4 GiB): ~5 ms per disk from `BLK found` to its disk line; FNV-1a costs ~2.8 s per MiB here
 * (instructions are emulated); bench-seq=50 ~15 ms, bench-rand=500 ~90 ms. hostile: QEMU marks the device
 * broken (devstatus 4f, NEEDS_RESET) without completing for loop, huge, badhead, badnext, rostatus,
 * shortheader, indirect, availjump (for availjump it first pops 16 copies of the read, which write status 0,
 * then fails "Virtqueue size exceeded"); it completes outside with status 0 (the data goes to a bounce
 * buffer and is dropped) and writeread with status 0 (a 0-byte write; 1 on a read-only disk).
 */
    .include "virtio.inc"
    .set VIRTIO_BLK_ID, 0x10421AF4  /* device 0x1042 << 16 | vendor 0x1AF4 */
    .set MAX_DISKS, 4
    .set QMAX, 16                   /* queue entries used at most */
    .set BUF_SIZE, 0x100000
    .set MAX_SECTORS, BUF_SIZE / 512
    .set TICKS_5S, 5 * 1193182      /* PIT input-clock ticks */
    .set TICKS_300MS, 357955
    .set FILL, 0xA5                 /* read buffer fill */
    /* Per-disk ring page (4 KiB): the queue (virtio.inc: R_DESC, R_AVAIL, R_USED), request header, status byte */
    .set R_HDR, 0x300
    .set R_STATUS, 0x310

    /* Request types */
    .set T_IN, 0
    .set T_OUT, 1
    .set T_FLUSH, 4
    .set T_GET_ID, 8
    .set T_DISCARD, 11
    .set T_WRITE_ZEROES, 13

    /* Per-disk state */
    .set D_CFG, 0                   /* u32: 0x80000000 | slot << 11 (config address of register 0); 0 = none */
    .set D_SLOT, 4                  /* u8 */
    .set D_IRQ, 5                   /* u8: INTERRUPT_LINE */
    .set D_RO, 6                    /* u8 */
    .set D_READY, 7                 /* u8: initialised and usable */
    .set D_QSIZE, 8                 /* u16 */
    .set D_AVAIL, 10                /* u16: next avail idx */
    .set D_USED, 12                 /* u16: last used idx seen */
    .set D_INDEX, 14                /* u16: disk number */
    .set D_COMMON, 16               /* u64 addresses of the four structures, in cfg_type order 1..4 */
    .set D_NOTIFY, 24
    .set D_ISR, 32
    .set D_DEVCFG, 40
    .set D_NOTMUL, 48               /* u32: notify_off_multiplier */
    .set D_QNOTIFY, 56              /* u64: queue 0's notification address */
    .set D_CAP, 64                  /* u64: capacity in sectors */
    .set D_RING, 72                 /* u64: ring page */
    .set D_ERR, 80                  /* u64: error text, 0 when fine */
    .set DISK_SIZE, 128


    .text
    .code64
    .globl guest_main
guest_main:
    SAVE
    call driver_start

    call pci_scan
    leaq msg_found(%rip), %rdi
    movl disk_count(%rip), %esi
    call put_kv
    call newline
    leaq disks(%rip), %rbx
    movl disk_count(%rip), %r12d
1:  testl %r12d, %r12d
    jz 2f
    call disk_init
    call disk_print
    addq $DISK_SIZE, %rbx
    decl %r12d
    jmp 1b

2:  leaq cmd_table(%rip), %rdi      /* the command-line words */
    leaq msg_badword(%rip), %rsi
    leaq msg_done(%rip), %rdx
    call run_words
    jmp cmd_ok                      /* restores the callee-saved registers and returns: power-off */

/* ---- Output helpers ---- */

/* put_disk(%rdi = text ending in "disk="): the text and %rbx's disk number */
put_disk:
    movzwl D_INDEX(%rbx), %esi
    jmp put_kv

/* put_status(%esi = status) */
put_status:
    leaq msg_status(%rip), %rdi
    jmp put_kv

/* put_sum(%esi = 32-bit value): " sum=" and 8 hex digits */
put_sum:
    pushq %rsi
    leaq msg_sum(%rip), %rdi
    call serial_puts
    popq %rdi
    movl $8, %esi
    jmp serial_puthex

/* pci_scan(): fills disks[] with the first MAX_DISKS 1AF4:1042 functions 0 on bus 0, sets disk_count */
pci_scan:
    pushq %rbx
    pushq %r12
    pushq %r13
    leaq disks(%rip), %rbx
    xorl %r12d, %r12d               /* device number */
    xorl %r13d, %r13d               /* disks found */
1:  movl %r12d, %edi
    shll $11, %edi
    orl $0x80000000, %edi
    call pci_read
    cmpl $VIRTIO_BLK_ID, %eax
    jne 2f
    movl %edi, D_CFG(%rbx)
    movb %r12b, D_SLOT(%rbx)
    movw %r13w, D_INDEX(%rbx)
    movl %r13d, %eax
    shll $12, %eax
    leaq rings(%rip), %rcx
    addq %rcx, %rax
    movq %rax, D_RING(%rbx)
    addq $DISK_SIZE, %rbx
    incl %r13d
    cmpl $MAX_DISKS, %r13d
    je 3f
2:  incl %r12d
    cmpl $32, %r12d
    jb 1b
3:  movl %r13d, disk_count(%rip)
    popq %r13
    popq %r12
    popq %rbx
    ret

/* ---- Device set-up ---- */

/* disk_init(%rbx = disk): capabilities, reset and full initialisation (see the top of the file).
   -> %eax = 0 and D_READY = 1, or %eax = 1 with D_ERR set. Prints nothing. */
disk_init:
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movb $0, D_READY(%rbx)
    movq $0, D_ERR(%rbx)
    movq $0, D_COMMON(%rbx)
    movq $0, D_NOTIFY(%rbx)
    movq $0, D_ISR(%rbx)
    movq $0, D_DEVCFG(%rbx)
    movl D_CFG(%rbx), %r12d
    leal 0x3C(%r12), %edi           /* INTERRUPT_LINE */
    call pci_read
    movb %al, D_IRQ(%rbx)
    movl %r12d, %edi
    leaq D_COMMON(%rbx), %rsi       /* D_COMMON, D_NOTIFY, D_ISR, D_DEVCFG, D_NOTMUL */
    call virtio_pci_caps
    testq %rax, %rax
    jnz init_fail
    movq D_COMMON(%rbx), %r12
    movq %r12, %rdi
    call virtio_reset               /* reset, ACKNOWLEDGE, DRIVER */
    testl %eax, %eax
    leaq err_reset(%rip), %rax
    jnz init_fail
    movq %r12, %rdi
    movl $0x6000, %esi              /* driver features: VERSION_1, DISCARD and WRITE_ZEROES if offered */
    call virtio_features
    testq %rax, %rax
    jnz init_failed_device
    shrl $5, %ecx                   /* VIRTIO_BLK_F_RO */
    andl $1, %ecx
    movb %cl, D_RO(%rbx)
    leaq D_COMMON(%rbx), %rdi       /* D_COMMON, D_NOTIFY, D_ISR, D_DEVCFG, D_NOTMUL */
    xorl %esi, %esi                 /* queue 0 */
    movl $QMAX, %edx
    movq D_RING(%rbx), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    leaq err_noqueue(%rip), %rcx
    jz 3f
    movw %ax, D_QSIZE(%rbx)
    movq D_RING(%rbx), %r13
    movw $1, R_AVAIL(%r13)          /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
    movq %rdx, D_QNOTIFY(%rbx)
    movb $0x0F, C_STATUS(%r12)      /* | DRIVER_OK */
    movw $0, D_AVAIL(%rbx)
    movw $0, D_USED(%rbx)
    call read_capacity
    movb $1, D_READY(%rbx)
    xorl %eax, %eax
    jmp init_out
3:  movq %rcx, %rax
init_failed_device:
    orb $0x80, C_STATUS(%r12)       /* FAILED */
init_fail:
    movq %rax, D_ERR(%rbx)
    movl $1, %eax
init_out:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    ret

/* read_capacity(%rbx): D_CAP <- device config u64 at 0, two dword reads inside a config_generation loop */
read_capacity:
    movq D_COMMON(%rbx), %rcx
    movq D_DEVCFG(%rbx), %rdx
1:  movzbl C_GENERATION(%rcx), %r8d
    movl (%rdx), %eax
    movl 4(%rdx), %esi
    movzbl C_GENERATION(%rcx), %r9d
    cmpl %r8d, %r9d
    jne 1b
    shlq $32, %rsi
    orq %rsi, %rax
    movq %rax, D_CAP(%rbx)
    ret

/* disk_print(%rbx): the `BLK disk=` line */
disk_print:
    leaq msg_disk(%rip), %rdi
    call put_disk
    leaq msg_slot(%rip), %rdi
    movzbl D_SLOT(%rbx), %esi
    call put_kv
    movq D_ERR(%rbx), %rax
    testq %rax, %rax
    jz 1f
    leaq msg_error(%rip), %rdi
    call serial_puts
    movq D_ERR(%rbx), %rdi
    call serial_puts
    jmp newline
1:  leaq msg_irq(%rip), %rdi
    movzbl D_IRQ(%rbx), %esi
    call put_kv
    leaq msg_capacity(%rip), %rdi
    movq D_CAP(%rbx), %rsi
    call put_kv
    leaq msg_ro(%rip), %rdi
    movzbl D_RO(%rbx), %esi
    call put_kv
    leaq msg_qsize(%rip), %rdi
    movzwl D_QSIZE(%rbx), %esi
    call put_kv
    jmp newline

/* cur_disk() -> %rbx = the selected disk */
cur_disk:
    movl disk_sel(%rip), %eax
    imull $DISK_SIZE, %eax, %eax
    leaq disks(%rip), %rbx
    addq %rax, %rbx
    ret

/* cur_ready() -> %rbx = the selected disk, %eax = 1; or prints `BLK no-disk disk=<i>` and %eax = 0 */
cur_ready:
    call cur_disk
    movl $1, %eax
    cmpb $0, D_READY(%rbx)
    jne 1f
no_disk:
    leaq msg_nodisk(%rip), %rdi
    movl disk_sel(%rip), %esi
    call put_kv
    call newline
    xorl %eax, %eax
1:  ret

/* ---- Requests ---- */

/* req_build(%rbx, %edi = type, %rsi = sector, %rdx = data, %ecx = data length (0: no data descriptor),
   %r8d = data flags (F_WRITE or 0)): header, status byte <- 0xFF and descriptors 0.. chained */
req_build:
    movq D_RING(%rbx), %r9
    movl %edi, R_HDR(%r9)
    movl $0, R_HDR + 4(%r9)
    movq %rsi, R_HDR + 8(%r9)
    movb $0xFF, R_STATUS(%r9)
    leaq R_HDR(%r9), %rax
    movq %rax, 0(%r9)               /* desc 0: header, 16 bytes, NEXT -> 1 */
    movl $16, 8(%r9)
    movw $F_NEXT, 12(%r9)
    movw $1, 14(%r9)
    leaq 16(%r9), %r10
    testl %ecx, %ecx
    jz 1f
    movq %rdx, (%r10)               /* desc 1: data, NEXT -> 2 */
    movl %ecx, 8(%r10)
    orl $F_NEXT, %r8d
    movw %r8w, 12(%r10)
    movw $2, 14(%r10)
    addq $16, %r10
1:  leaq R_STATUS(%r9), %rax        /* last: status byte, device-writable */
    movq %rax, (%r10)
    movl $1, 8(%r10)
    movw $F_WRITE, 12(%r10)
    movw $0, 14(%r10)
    ret

/* publish(%rbx, %edi = head descriptor, %esi = avail idx increment, normally 1): avail ring entry, barrier,
   avail idx, barrier, notification (queue index 0 written to the queue's notify address) */
publish:
    movq D_RING(%rbx), %r9
    movzwl D_AVAIL(%rbx), %eax
    movl %eax, %r10d
    movzwl D_QSIZE(%rbx), %ecx
    xorl %edx, %edx
    divl %ecx                       /* %edx = idx % queue size */
    movw %di, R_AVAIL + 4(%r9,%rdx,2)
    addl %esi, %r10d
    sfence                          /* ring entry and descriptors before the idx */
    movw %r10w, R_AVAIL + 2(%r9)
    movw %r10w, D_AVAIL(%rbx)
    mfence                          /* idx before the notification */
    movq D_QNOTIFY(%rbx), %rax
    movw $0, (%rax)
    ret

/* wait_used(%rbx, %rdi = timeout in PIT ticks) -> %eax = 1 when the used idx moved (D_USED updated), 0 on
   timeout. The used idx is checked 64 times (with pause) between PIT reads. */
wait_used:
    movq %rdi, %rdx
    movq D_RING(%rbx), %rdi
    addq $R_USED + 2, %rdi
    leaq D_USED(%rbx), %rsi
    call wait_idx
    testl %eax, %eax
    jz 1f
    movw %dx, D_USED(%rbx)
1:  ret

/* request(%rbx, same arguments as req_build) -> %eax = status byte, or -1 after a 5 s timeout (then
   `BLK timeout disk=<i>` is printed and the disk re-initialised) */
request:
    call req_build
    xorl %edi, %edi
    movl $1, %esi
    call publish
    movl $TICKS_5S, %edi
    call wait_used
    testl %eax, %eax
    jz 1f
    movq D_RING(%rbx), %rax
    movzbl R_STATUS(%rax), %eax
    ret
1:  leaq msg_timeout(%rip), %rdi
    call put_disk
    call newline
    call disk_init
    testl %eax, %eax
    jz 2f
    call disk_print
2:  movl $-1, %eax
    ret

/* ---- Commands: (%rdi = arguments, %rsi = word end) -> %eax = 0, or 1 for a bad word ---- */

cmd_disk:
    SAVE
    ARGS 1
    movq args(%rip), %rax
    movl disk_count(%rip), %ecx
    cmpq %rcx, %rax
    jae cmd_bad
    movl %eax, disk_sel(%rip)
    jmp cmd_ok

cmd_init:
    SAVE
    call cur_disk
    cmpl $0, D_CFG(%rbx)
    jne 1f
    call no_disk
    jmp cmd_ok
1:  call disk_init
    call disk_print
    jmp cmd_ok

cmd_id:
    SAVE
    call cur_ready
    testl %eax, %eax
    jz cmd_ok
    leaq data_buf(%rip), %rdx
    movq $0, (%rdx)                 /* 24 bytes cleared: the id is NUL-terminated even at 20 chars */
    movq $0, 8(%rdx)
    movq $0, 16(%rdx)
    movl $T_GET_ID, %edi
    xorl %esi, %esi
    movl $20, %ecx
    movl $F_WRITE, %r8d
    call request
    testl %eax, %eax
    js cmd_ok
    movl %eax, %r12d
    leaq msg_id(%rip), %rdi
    call put_disk
    movl %r12d, %esi
    call put_status
    leaq msg_idv(%rip), %rdi
    call serial_puts
    leaq data_buf(%rip), %r12
    movl $20, %r13d
1:  movzbl (%r12), %edi
    testb %dil, %dil
    jz 3f
    cmpb $0x20, %dil
    jb 2f
    cmpb $0x7E, %dil
    jbe 4f
2:  movl $'?', %edi
4:  call serial_putc
    incq %r12
    decl %r13d
    jnz 1b
3:  call newline
    jmp cmd_ok

cmd_read:
    SAVE
    ARGS 2
    movq args + 8(%rip), %r13       /* N */
    leaq -1(%r13), %rax
    cmpq $MAX_SECTORS, %rax
    jae cmd_bad                     /* N = 0 or N > 2048 */
    movq args(%rip), %r12           /* S */
    call cur_ready
    testl %eax, %eax
    jz cmd_ok
    leaq data_buf(%rip), %rdi       /* buffer <- FILL */
    movq %r13, %rcx
    shlq $6, %rcx
    movabsq $0xA5A5A5A5A5A5A5A5, %rax /* FILL in every byte */
    rep stosq
    movl $T_IN, %edi
    movq %r12, %rsi
    leaq data_buf(%rip), %rdx
    movl %r13d, %ecx
    shll $9, %ecx
    movl $F_WRITE, %r8d
    call request
    testl %eax, %eax
    js cmd_ok
    movl %eax, %r14d
    leaq data_buf(%rip), %rdi
    movq %r13, %rsi
    shlq $9, %rsi
    call fnv1a
    movl %eax, %r15d
    leaq msg_read(%rip), %rdi
    call put_disk
    call put_sector_count
    movl %r14d, %esi
    call put_status
    movl %r15d, %esi
    call put_sum
    call newline
    jmp cmd_ok

/* put_sector_count(%r12 = sector, %r13 = count) */
put_sector_count:
    leaq msg_sector(%rip), %rdi
    movq %r12, %rsi
    call put_kv
    leaq msg_count(%rip), %rdi
    movq %r13, %rsi
    jmp put_kv

cmd_write:
    SAVE
    ARGS 3
    movq args + 8(%rip), %r13       /* N */
    leaq -1(%r13), %rax
    cmpq $MAX_SECTORS, %rax
    jae cmd_bad
    movq args(%rip), %r12           /* S */
    call cur_ready
    testl %eax, %eax
    jz cmd_ok
    /* Sector s gets bytes (s*7 + SEED + j) & 0xFF, j = 0..511: 512 bytes of `ramp` from its offset
       (s*7 + SEED) & 0xFF. */
    leaq data_buf(%rip), %rdi
    movq %r12, %r8                  /* s */
    movq %r13, %r9                  /* sectors left */
1:  imulq $7, %r8, %rax
    addq args + 16(%rip), %rax
    movzbl %al, %eax
    leaq ramp(%rip), %rsi
    addq %rax, %rsi
    movl $64, %ecx
    rep movsq
    incq %r8
    decq %r9
    jnz 1b
    movl $T_OUT, %edi
    movq %r12, %rsi
    leaq data_buf(%rip), %rdx
    movl %r13d, %ecx
    shll $9, %ecx
    xorl %r8d, %r8d                 /* device-readable */
    call request
    testl %eax, %eax
    js cmd_ok
    movl %eax, %r14d
    leaq msg_write(%rip), %rdi
    call put_disk
    call put_sector_count
    movl %r14d, %esi
    call put_status
    call newline
    jmp cmd_ok

cmd_flush:
    SAVE
    call cur_ready
    testl %eax, %eax
    jz cmd_ok
    movl $T_FLUSH, %edi
    xorl %esi, %esi
    xorl %ecx, %ecx                 /* no data descriptor */
    call request
    testl %eax, %eax
    js cmd_ok
    movl %eax, %r12d
    leaq msg_flush(%rip), %rdi
    call put_disk
    movl %r12d, %esi
    call put_status
    call newline
    jmp cmd_ok

cmd_discard:
    SAVE
    movl $T_DISCARD, %r15d          /* request type */
    leaq msg_discard(%rip), %r14    /* its message */
    ARGS 2
    movq $0, args + 16(%rip)        /* flags */
    jmp 1f
cmd_zeroes:
    SAVE
    movl $T_WRITE_ZEROES, %r15d
    leaq msg_zeroes(%rip), %r14
    ARGS 3
1:    movq args(%rip), %r12           /* S */
    movq args + 8(%rip), %r13       /* N, a u32 in the segment */
    movq %r13, %rax
    shrq $32, %rax
    jnz cmd_bad
    call cur_ready
    testl %eax, %eax
    jz cmd_ok
    leaq data_buf(%rip), %rdx       /* the one segment */
    movq %r12, (%rdx)
    movl %r13d, 8(%rdx)
    movq args + 16(%rip), %rax
    movl %eax, 12(%rdx)
    movl %r15d, %edi
    xorl %esi, %esi                 /* the header's sector is unused */
    movl $16, %ecx
    xorl %r8d, %r8d                 /* device-readable */
    call request
    testl %eax, %eax
    js cmd_ok
    movl %eax, %r15d
    movq %r14, %rdi
    call put_disk
    call put_sector_count
    movl %r15d, %esi
    call put_status
    call newline
    jmp cmd_ok

cmd_hang:
    leaq msg_hang(%rip), %rdi
    jmp hang

cmd_wait_media:
    SAVE
    call cur_ready
    testl %eax, %eax
    jz cmd_ok
    movq D_ISR(%rbx), %r12
1:  movzbl (%r12), %eax             /* reading clears it */
    testb $0x02, %al                /* configuration change */
    jnz 2f
    pause
    jmp 1b
2:  call read_capacity
    leaq msg_media(%rip), %rdi
    call put_disk
    leaq msg_capacity(%rip), %rdi
    movq D_CAP(%rbx), %rsi
    call put_kv
    call newline
    jmp cmd_ok

/* bench-seq=N / bench-rand=N: %r12 requests left, %r13 errors, %r14 sector (seq) or xorshift state (rand),
   %r15 N; bench_mode 0 = sequential 1 MiB reads, 1 = random 4 KiB reads */
cmd_bench_seq:
    SAVE
    movl $0, bench_mode(%rip)
    jmp bench_common
cmd_bench_rand:
    SAVE
    movl $1, bench_mode(%rip)
bench_common:
    ARGS 1
    call cur_ready
    testl %eax, %eax
    jz cmd_ok
    movq args(%rip), %r15
    leaq msg_bench_start_seq(%rip), %rdi
    leaq msg_bench_start_rand(%rip), %rax
    cmpl $0, bench_mode(%rip)
    cmovne %rax, %rdi
    movq %r15, %rsi
    call put_kv
    call newline
    movq %r15, %r12
    xorl %r13d, %r13d
    xorl %r14d, %r14d
    movabsq $0x9E3779B97F4A7C15, %rax
    cmpl $0, bench_mode(%rip)
    cmovne %rax, %r14
1:  testq %r12, %r12
    jz 3f
    cmpl $0, bench_mode(%rip)
    jne 6f
    leaq MAX_SECTORS(%r14), %rax    /* sequential: 1 MiB at %r14, wrapping before the capacity */
    cmpq D_CAP(%rbx), %rax
    jbe 7f
    xorl %r14d, %r14d
7:  movq %r14, %rsi
    addq $MAX_SECTORS, %r14
    movl $BUF_SIZE, %ecx
    jmp 2f
6:  movq %r14, %rax                 /* random: xorshift64: x ^= x << 13; x ^= x >> 7; x ^= x << 17 */
    shlq $13, %rax
    xorq %rax, %r14
    movq %r14, %rax
    shrq $7, %rax
    xorq %rax, %r14
    movq %r14, %rax
    shlq $17, %rax
    xorq %rax, %r14
    movq D_CAP(%rbx), %rcx
    shrq $3, %rcx                   /* 4 KiB blocks */
    xorl %esi, %esi
    testq %rcx, %rcx
    jz 8f
    movq %r14, %rax
    xorl %edx, %edx
    divq %rcx
    leaq (,%rdx,8), %rsi            /* block * 8 sectors */
8:  movl $4096, %ecx
2:  movl $T_IN, %edi
    leaq data_buf(%rip), %rdx
    movl $F_WRITE, %r8d
    call request
    testl %eax, %eax
    js 4f
    jz 5f
    incq %r13
5:  decq %r12
    jmp 1b
4:  addq %r12, %r13                 /* timeout: this and the rest failed */
3:  leaq msg_bench_end_seq(%rip), %rdi
    leaq msg_bench_end_rand(%rip), %rax
    cmpl $0, bench_mode(%rip)
    cmovne %rax, %rdi
bench_end:
    movq %r15, %rsi
    call put_kv
    leaq msg_errors(%rip), %rdi
    movq %r13, %rsi
    call put_kv
    call newline
    jmp cmd_ok

/* irq-read=S: %r12 sector, %r13 IOAPIC pin, %r14 start tick */
cmd_irq_read:
    SAVE
    ARGS 1
    movq args(%rip), %r12
    call cur_ready
    testl %eax, %eax
    jz cmd_ok
    movzbl D_IRQ(%rbx), %r13d
    cmpl $23, %r13d
    jbe 1f
    leaq msg_irq_line(%rip), %rdi
    call put_disk
    leaq msg_badline(%rip), %rdi
    call serial_puts
    jmp cmd_ok
1:  movl %r13d, %edi
    movq D_ISR(%rbx), %rsi
    call virtio_irq_arm
    leaq data_buf(%rip), %rdi
    movl $64, %ecx
    movabsq $0xA5A5A5A5A5A5A5A5, %rax /* FILL in every byte */
    rep stosq
    movq D_RING(%rbx), %rax
    movw $0, R_AVAIL(%rax)          /* interrupts wanted for this request */
    movl $T_IN, %edi
    movq %r12, %rsi
    leaq data_buf(%rip), %rdx
    movl $512, %ecx
    movl $F_WRITE, %r8d
    call req_build
    xorl %edi, %edi
    movl $1, %esi
    call publish                    /* (its mfence also orders the flags write) */
    movq D_RING(%rbx), %rdi
    addq $R_USED + 2, %rdi
    leaq D_USED(%rbx), %rsi
    movl $TICKS_5S, %edx
    call irq_wait_idx
    movl %r13d, %edi
    call virtio_irq_disarm
    movq D_RING(%rbx), %rax
    movw $1, R_AVAIL(%rax)          /* back to polling */
    movzwl R_USED + 2(%rax), %eax
    cmpw D_USED(%rbx), %ax
    jne 5f
    leaq msg_timeout(%rip), %rdi    /* the request never completed */
    call put_disk
    call newline
    call disk_init
    testl %eax, %eax
    jz cmd_ok
    call disk_print
    jmp cmd_ok
5:  lfence
    movw %ax, D_USED(%rbx)
    movq D_RING(%rbx), %rax
    movzbl R_STATUS(%rax), %r12d
    leaq data_buf(%rip), %rdi
    movl $512, %esi
    call fnv1a
    movl %eax, %r14d
    leaq msg_irq_line(%rip), %rdi
    call put_disk
    movl %r12d, %esi
    call put_status
    leaq msg_interrupts(%rip), %rdi
    movl irq_count(%rip), %esi
    call put_kv
    leaq msg_spurious(%rip), %rdi
    movl irq_spurious(%rip), %esi
    call put_kv
    movl %r14d, %esi
    call put_sum
    call newline
    jmp cmd_ok

/* hostile: %r12 ring page (for the hc_* routines), %r13 used flag, %r14 table entry, %r15 case name */
cmd_hostile:
    SAVE
    call cur_disk
    cmpl $0, D_CFG(%rbx)
    jne 1f
    call no_disk
    jmp cmd_ok
1:  leaq hostile_table(%rip), %r14
2:  movq (%r14), %r15
    testq %r15, %r15
    jz 3f
    call disk_init
    testl %eax, %eax
    jnz 4f
    movq D_RING(%rbx), %r12
    movb $0xFF, R_STATUS(%r12)      /* for the cases that do not build a standard request */
    call *8(%r14)                   /* builds and publishes the case */
    movl $TICKS_300MS, %edi
    call wait_used
    movl %eax, %r13d
    leaq msg_hostile(%rip), %rdi
    movq %r15, %rsi
    movl %r13d, %edx
    call put_case
    movzbl R_STATUS(%r12), %esi
    call put_status
    movq D_COMMON(%rbx), %rdi
    call put_devstatus
    addq $16, %r14
    jmp 2b
3:  call disk_init
    testl %eax, %eax
    jnz 4f
    leaq msg_hostile_done(%rip), %rdi
    call serial_puts
    jmp cmd_ok
4:  call disk_print                 /* re-initialisation failed: the disk line says why */
    jmp cmd_ok

/* Hostile cases: %rbx disk (freshly initialised), %r12 its ring page. Unless said otherwise the request
   is a well-formed one-sector read of sector 0 into the data buffer (header R, data W, status W) that one
   field then spoils, published as avail entry 0 with idx + 1. */
hc_read:                            /* the well-formed read, not published */
    movl $T_IN, %edi
    xorl %esi, %esi
    leaq data_buf(%rip), %rdx
    movl $512, %ecx
    movl $F_WRITE, %r8d
    jmp req_build
hc_publish:
    xorl %edi, %edi
    movl $1, %esi
    jmp publish

hc_loop:                            /* desc 0 (header) -> 1 (512 device-readable bytes) -> 0 -> ... */
    call hc_read
    movw $F_NEXT, 16 + 12(%r12)
    movw $0, 16 + 14(%r12)
    jmp hc_publish
hc_huge:                            /* data length 0xFFFFFE00 */
    call hc_read
    movl $0xFFFFFE00, 16 + 8(%r12)
    jmp hc_publish
hc_outside:                         /* data at 256 GiB, beyond guest memory */
    call hc_read
    movabsq $0x4000000000, %rax
    movq %rax, 16(%r12)
    jmp hc_publish
hc_badhead:                         /* avail entry = queue size + 5 */
    call hc_read
    movzwl D_QSIZE(%rbx), %edi
    addl $5, %edi
    movl $1, %esi
    jmp publish
hc_badnext:                         /* header with NEXT -> 0xFFFF */
    call hc_read
    movw $0xFFFF, 14(%r12)
    jmp hc_publish
hc_rostatus:                        /* status descriptor without WRITE */
    call hc_read
    movw $0, 32 + 12(%r12)
    jmp hc_publish
hc_shortheader:                     /* header descriptor 8 bytes long */
    call hc_read
    movl $8, 8(%r12)
    jmp hc_publish
hc_indirect:                        /* INDIRECT (not negotiated), table = data buffer (zeroed 4 KiB), length 256 MiB */
    leaq data_buf(%rip), %rdi
    xorl %eax, %eax
    movl $512, %ecx
    rep stosq
    leaq data_buf(%rip), %rax
    movq %rax, 0(%r12)
    movl $0x10000000, 8(%r12)
    movw $F_INDIRECT, 12(%r12)
    movw $0, 14(%r12)
    jmp hc_publish
hc_availjump:                       /* avail idx advanced by 1000 (every ring entry is 0) */
    call hc_read
    xorl %edi, %edi
    movl $1000, %esi
    jmp publish
hc_writeread:                       /* OUT with a device-writable data descriptor. Sector 0 is read into the
                                       buffer first (300 ms wait), so a device that writes it back anyway
                                       writes the same bytes. */
    call hc_read
    call hc_publish
    movl $TICKS_300MS, %edi
    call wait_used
    movl $T_OUT, %edi
    xorl %esi, %esi
    leaq data_buf(%rip), %rdx
    movl $512, %ecx
    movl $F_WRITE, %r8d
    call req_build
    jmp hc_publish

    .section .rodata
    .p2align 3
cmd_table:
    .quad cmdn_disk, cmd_disk
    .quad cmdn_init, cmd_init
    .quad cmdn_id, cmd_id
    .quad cmdn_read, cmd_read
    .quad cmdn_write, cmd_write
    .quad cmdn_flush, cmd_flush
    .quad cmdn_discard, cmd_discard
    .quad cmdn_zeroes, cmd_zeroes
    .quad cmdn_hang, cmd_hang
    .quad cmdn_wait_media, cmd_wait_media
    .quad cmdn_hostile, cmd_hostile
    .quad cmdn_bench_seq, cmd_bench_seq
    .quad cmdn_bench_rand, cmd_bench_rand
    .quad cmdn_irq_read, cmd_irq_read
    .quad 0, 0
hostile_table:
    .quad hn_loop, hc_loop
    .quad hn_huge, hc_huge
    .quad hn_outside, hc_outside
    .quad hn_badhead, hc_badhead
    .quad hn_badnext, hc_badnext
    .quad hn_rostatus, hc_rostatus
    .quad hn_shortheader, hc_shortheader
    .quad hn_indirect, hc_indirect
    .quad hn_availjump, hc_availjump
    .quad hn_writeread, hc_writeread
    .quad 0, 0

cmdn_disk:          .asciz "disk="
cmdn_init:          .asciz "init"
cmdn_id:            .asciz "id"
cmdn_read:          .asciz "read="
cmdn_write:         .asciz "write="
cmdn_flush:         .asciz "flush"
cmdn_hang:          .asciz "hang"
cmdn_discard:       .asciz "discard="
cmdn_zeroes:        .asciz "zeroes="
cmdn_wait_media:    .asciz "wait-media"
cmdn_hostile:       .asciz "hostile"
cmdn_bench_seq:     .asciz "bench-seq="
cmdn_bench_rand:    .asciz "bench-rand="
cmdn_irq_read:      .asciz "irq-read="
hn_loop:            .asciz "loop"
hn_huge:            .asciz "huge"
hn_outside:         .asciz "outside"
hn_badhead:         .asciz "badhead"
hn_badnext:         .asciz "badnext"
hn_rostatus:        .asciz "rostatus"
hn_shortheader:     .asciz "shortheader"
hn_indirect:        .asciz "indirect"
hn_availjump:       .asciz "availjump"
hn_writeread:       .asciz "writeread"

msg_found:          .asciz "BLK found="
msg_disk:           .asciz "BLK disk="
msg_slot:           .asciz " slot="
msg_error:          .asciz " error="
msg_irq:            .asciz " irq="
msg_capacity:       .asciz " capacity="
msg_ro:             .asciz " ro="
msg_qsize:          .asciz " qsize="
msg_status:         .asciz " status="
msg_sum:            .asciz " sum="
msg_sector:         .asciz " sector="
msg_count:          .asciz " count="
msg_nodisk:         .asciz "BLK no-disk disk="
msg_badword:        .asciz "BLK bad-word "
msg_done:           .asciz "BLK done\n"
msg_timeout:        .asciz "BLK timeout disk="
msg_id:             .asciz "BLK id disk="
msg_idv:            .asciz " id="
msg_read:           .asciz "BLK read disk="
msg_write:          .asciz "BLK write disk="
msg_flush:          .asciz "BLK flush disk="
msg_hang:           .asciz "BLK hang\n"
msg_discard:        .asciz "BLK discard disk="
msg_zeroes:         .asciz "BLK zeroes disk="
msg_media:          .asciz "BLK media disk="
msg_bench_start_seq:  .asciz "BLK bench-start seq n="
msg_bench_end_seq:    .asciz "BLK bench-end seq n="
msg_bench_start_rand: .asciz "BLK bench-start rand n="
msg_bench_end_rand:   .asciz "BLK bench-end rand n="
msg_errors:         .asciz " errors="
msg_irq_line:       .asciz "BLK irq disk="
msg_badline:        .asciz " error=bad-irq-line\n"
msg_interrupts:     .asciz " interrupts="
msg_spurious:       .asciz " spurious="
msg_hostile:        .asciz "BLK hostile case="
msg_hostile_done:   .asciz "BLK hostile-done\n"
err_reset:          .asciz "reset-timeout"
err_noqueue:        .asciz "no-queue"

/* 0, 1, ..., 255 three times: any 512-byte window is one sector of the write pattern */
ramp:
    .set v, 0
    .rept 768
    .byte v & 0xFF
    .set v, v + 1
    .endr

    .section .data
    .p2align 2
disk_sel:
    .long 0
bench_mode:
    .long 0

    .section .bss
    .p2align 3
disk_count:
    .skip 4
    .p2align 3
args:
    .skip 3 * 8
    .p2align 6
disks:
    .skip MAX_DISKS * DISK_SIZE
    .p2align 12
rings:
    .skip MAX_DISKS * 4096
data_buf:                           /* last, so that a device writing past it hits free memory */
    .skip BUF_SIZE

/* virtio-net — a minimal virtio 1.x modern-PCI network driver (spec 1.x §4.1 PCI transport, §5.1 network
 * device, split virtqueues), polled (plus one interrupt-driven receive), driven by words on the kernel
 * command line, with just enough IPv4 (DHCP, ARP, ICMP echo, UDP) to talk to a user-mode back end such as
 * passt.
 *
 * Start-up: PIT started as the time base (pit_ticks), 8259s remapped and fully masked, spurious gates set.
 * PCI bus 0, devices 0-31, function 0 are scanned for the first 1AF4:1041 (modern virtio-net). Capabilities
 * and BARs as in virtio-blk.S (lib.S: virtio_pci_caps). Device init: reset, ACKNOWLEDGE, DRIVER, features:
 * VIRTIO_F_VERSION_1 (bit 32, required) and, when offered, VIRTIO_NET_F_MTU (3), VIRTIO_NET_F_MAC (5),
 * VIRTIO_NET_F_MRG_RXBUF (15, unless `nomrg`), VIRTIO_NET_F_STATUS (16); FEATURES_OK (checked); receive
 * queue 0 and transmit queue 1 with min(queue_size, 16) entries each, in one static 4 KiB page per queue;
 * DRIVER_OK; then every receive descriptor is posted. Descriptor i of the receive queue is always the
 * 2048-byte buffer i (device-writable). On a failure after the reset, FAILED (0x80) is set.
 * Device configuration (read byte/word-wise inside a config_generation retry loop): mac (when MAC was
 * negotiated, else 02:00:00:00:00:01 is used), status (when STATUS, else 1 = link up), mtu (when MTU, else
 * 1500). The avail rings' flags are VIRTQ_AVAIL_F_NO_INTERRUPT (we poll); `irq` clears it for one receive.
 *
 * Every frame has the 12-byte struct virtio_net_hdr in front (VERSION_1: num_buffers is always present).
 * Transmit: header (all zero) and frame in one device-readable descriptor (descriptor 0 of queue 1, one frame
 * at a time, the used idx polled for 5 s: `NET tx-timeout` when it does not move). Receive: with MRG_RXBUF
 * a frame is num_buffers used buffers (the header only in the first), without it one buffer; the pieces are
 * copied into one frame buffer (32 KiB at most) and each buffer is posted again at once. Frames that are
 * not the one awaited (IPv6, other traffic) are skipped.
 *
 * Serial (COM1), lines:
 *   NET found=<0|1> [slot=<pci device> irq=<INTERRUPT_LINE>]
 *   NET dev mac=<xx:..> mtu=<n> status=<n> features=<negotiated bits 0-31, 8 hex digits> mrg=<0|1> qsize=<n>
 *   NET dev error=<reason>        (reasons: those of virtio_pci_caps, reset-timeout, no-version-1,
 *                                  features-rejected, no-queue)
 * then the command-line words (hvm_start_info.cmdline_paddr, offset 24; separated by spaces or control
 * characters), left to right, numbers decimal. Addresses print as a.b.c.d, MACs as 6 two-digit hex bytes:
 *   init          reset and re-initialise the device; prints the `NET dev` line again
 *   nomrg         from now on decline MRG_RXBUF; re-initialises and prints the `NET dev` line
 *   dhcp          DHCPDISCOVER (broadcast, from the device's MAC, options 1 3 6 26 requested), waits for
 *                 the OFFER: `NET dhcp ip=<yiaddr> server=<option 54> [mask=<1>] [router=<3>] [dns=<6>]
 *                 [mtu=<26>]` (the first address of each list), then DHCPREQUEST for it, waits for the ACK:
 *                 `NET dhcp ack ip=<yiaddr>` (then the address is ours and the router the gateway), or
 *                 `NET dhcp nak`; `NET dhcp timeout` when an answer does not come
 *   arp           ARP who-has the router: `NET arp router=<ip> mac=<mac>` or `NET arp timeout`
 *   ping          ICMP echo request (id 0x5048, 56 bytes 0..55) to the router: `NET ping from=<ip> seq=<n>
 *                 bytes=<echoed payload bytes>` or `NET ping timeout`
 *   udp=PORT,N    1 <= N <= 32000: one UDP datagram (from port 49152 + k, the k-th udp word) of N bytes,
 *                 byte j = (j + (j >> 8)) & 0xFF, to the router's PORT, IP DF set (no fragments); waits for
 *                 the datagram back from that port: `NET udp port=<P> sent=<N> reply=<bytes>
 *                 buffers=<receive buffers the frame took> sum=<FNV-1a of the reply, 8 hex digits>`, or
 *                 `NET udp port=<P> sent=<N> timeout`
 *                 (dhcp, arp, ping and udp wait 5 s for each answer, or what `wait=` set)
 *   link          `NET link status=<config status> up=<bit 0>`
 *   wait-link     `NET wait-link status=<s>`, then polls the ISR (reading clears it) and the config status
 *                 until the status changes (30 s at most): `NET link-changed status=<s> up=<0|1>
 *                 config-irq=<1 when ISR bit 1 was seen>`, or `NET wait-link timeout`
 *   hostile       malformed transmit chains, each on a freshly re-initialised device (no dev line); each
 *                 waits until the device either completes it (the used idx moves) or sets NEEDS_RESET (0x40)
 *                 in device_status (5 s at most), then 50 ms more so that what follows either settles:
 *                 `NET hostile case=<name> used=<0|1> devstatus=<device_status, 2 hex>` for
 *                 loop outside writable huge short zero badhead badnext indirect availjump (see hc_*), then
 *                 a last re-initialisation and `NET hostile-done`
 *   hostile=NAME  the same for the one case NAME (QEMU 7.2 aborts on `short`: an assertion in iov_copy)
 *   flood-wait=MS MS <= 60000: re-initialises the device without posting receive buffers, prints
 *                 `NET flood-wait start ms=<MS>`, waits MS ms (the host floods meanwhile), posts the buffers
 *                 and counts the frames that arrive within 1 s: `NET flood-wait ms=<MS> received=<n>`
 *   irq           one receive completed by interrupt: IOAPIC pin INTERRUPT_LINE -> vector 0x40, level,
 *                 active high, destination APIC 0; the receive queue's NO_INTERRUPT flag cleared; ARP
 *                 who-has the router sent; waits 5 s for a used receive buffer and the interrupt:
 *                 `NET irq interrupted=<0|1: both came> interrupts=<count> arp=<0|1: the ARP reply arrived>`;
 *                 `NET irq error=bad-irq-line` when INTERRUPT_LINE > 23
 *   ip=A.B.C.D,R.R.R.R  a static address and router instead of a lease: `NET ip=<A> router=<R>`
 *   wait=MS       1 <= MS <= 60000: from now on dhcp, arp, ping and udp wait MS ms for each answer (5000
 *                 at first), e.g. shorter before answers that are not to come
 *   hang          `NET hang`, then cli; hlt forever (so that a test can inspect the VMM meanwhile)
 *   anything else `NET bad-word <word>` (also malformed numbers or out-of-range arguments)
 * A command that needs the device when there is none or it failed prints `NET no-device`; arp, ping, udp
 * and irq need a DHCP lease first (`NET no-ip`) and ping and udp the router's MAC (ARP first, silently; a
 * failure prints `NET arp timeout`). Finally `NET done`, and guest_main returns (power-off).
 */
    .include "virtio.inc"
    .set VIRTIO_NET_ID, 0x10411AF4  /* device 0x1041 << 16 | vendor 0x1AF4 */
    .set QMAX, 16
    .set RXBUF, 2048
    .set HDR, 12                    /* struct virtio_net_hdr with VERSION_1 */
    .set FRAME_MAX, QMAX * RXBUF
    .set UDP_MAX, 32000
    .set TICKS_5S, 5 * 1193182
    .set TICKS_30S, 30 * 1193182
    .set TICKS_1S, 1193182

    .set NF_MTU, 1 << 3
    .set NF_MAC, 1 << 5
    .set NF_MRG, 1 << 15
    .set NF_STATUS, 1 << 16
    .set WANT, NF_MTU | NF_MAC | NF_MRG | NF_STATUS

    /* DHCP option fields seen (dh_have) */
    .set H_ROUTER, 1
    .set H_DNS, 2
    .set H_MTU, 4
    .set H_SERVER, 8
    .set H_MASK, 16


    .text
    .code64
    .globl guest_main
guest_main:
    SAVE
    call driver_start
    movl $VIRTIO_NET_ID, %edi
    xorl %esi, %esi
    call pci_find
    movl %eax, cfg_addr(%rip)
    testl %eax, %eax
    jnz 1f
    leaq msg_found0(%rip), %rdi
    call serial_puts
    jmp 2f
1:  call net_init
    leaq msg_found1(%rip), %rdi
    movl cfg_addr(%rip), %esi
    shrl $11, %esi
    andl $31, %esi
    call put_kv
    leaq msg_irq(%rip), %rdi
    movzbl irq_line(%rip), %esi
    call put_kv
    call newline
    call net_print

2:  leaq cmd_table(%rip), %rdi      /* the command-line words */
    leaq msg_badword(%rip), %rsi
    leaq msg_done(%rip), %rdx
    call run_words
    jmp cmd_ok                      /* restores the callee-saved registers and returns: power-off */

/* ---- Output helpers ---- */

/* put_ip(%rdi = text, %rsi = address of 4 bytes in network order): the text, then a.b.c.d */
put_ip:
    pushq %rbx
    pushq %r12
    movq %rsi, %rbx
    call serial_puts
    movl $4, %r12d
1:  movzbl (%rbx), %edi
    call serial_putdec
    incq %rbx
    decl %r12d
    jz 2f
    movl $'.', %edi
    call serial_putc
    jmp 1b
2:  popq %r12
    popq %rbx
    ret

/* put_mac(%rdi = text, %rsi = address of 6 bytes): the text, then xx:xx:xx:xx:xx:xx */
put_mac:
    pushq %rbx
    pushq %r12
    movq %rsi, %rbx
    call serial_puts
    movl $6, %r12d
1:  movzbl (%rbx), %edi
    movl $2, %esi
    call serial_puthex
    incq %rbx
    decl %r12d
    jz 2f
    movl $':', %edi
    call serial_putc
    jmp 1b
2:  popq %r12
    popq %rbx
    ret

/* ---- Device set-up ---- */

/* net_init(): capabilities, reset, full initialisation, receive buffers posted unless no_rx_post.
   -> %eax = 0 and ready = 1, or %eax = 1 with net_err set. Prints nothing. */
net_init:
    pushq %rbx
    pushq %r12
    movb $0, ready(%rip)
    movq $0, net_err(%rip)
    movl cfg_addr(%rip), %r12d
    leal 0x3C(%r12), %edi           /* INTERRUPT_LINE */
    call pci_read
    movb %al, irq_line(%rip)
    movl %r12d, %edi
    leaq vio(%rip), %rsi            /* common, notify, isr, device config, notify_off_multiplier */
    call virtio_pci_caps
    testq %rax, %rax
    jnz 8f
    movq vio(%rip), %r12
    movq %r12, %rdi
    call virtio_reset
    testl %eax, %eax
    leaq err_reset(%rip), %rax
    jnz 8f
    movq %r12, %rdi
    movl $WANT, %esi
    cmpb $0, nomrg(%rip)
    je 1f
    movl $WANT & ~NF_MRG, %esi
1:  call virtio_features
    testq %rax, %rax
    jnz 7f
    movl %edx, features(%rip)
    leaq vio(%rip), %rdi            /* receive queue 0 */
    xorl %esi, %esi
    movl $QMAX, %edx
    leaq rxq(%rip), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    jz 6f
    movw %ax, rx_size(%rip)
    movq %rdx, rx_notify(%rip)
    leaq vio(%rip), %rdi            /* transmit queue 1 */
    movl $1, %esi
    movl $QMAX, %edx
    leaq txq(%rip), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    jz 6f
    movw %ax, tx_size(%rip)
    movq %rdx, tx_notify(%rip)
    movw $1, rxq + R_AVAIL(%rip)    /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
    movw $1, txq + R_AVAIL(%rip)
    leaq rxq(%rip), %rdi            /* receive descriptor i: buffer i, device-writable */
    leaq rx_bufs(%rip), %rax
    movzwl rx_size(%rip), %ecx
2:  movq %rax, (%rdi)
    movl $RXBUF, 8(%rdi)
    movl $F_WRITE, 12(%rdi)         /* flags, next 0 */
    addq $16, %rdi
    addq $RXBUF, %rax
    decl %ecx
    jnz 2b
    movw $0, rx_avail(%rip)
    movw $0, rx_used(%rip)
    movw $0, tx_avail(%rip)
    movw $0, tx_used(%rip)
    movb $0x0F, C_STATUS(%r12)      /* | DRIVER_OK */
    call read_config
    cmpb $0, no_rx_post(%rip)
    jne 3f
    call rx_post_all
3:  movb $1, ready(%rip)
    xorl %eax, %eax
    jmp 9f
6:  leaq err_noqueue(%rip), %rax
7:  orb $0x80, C_STATUS(%r12)       /* FAILED */
8:  movq %rax, net_err(%rip)
    movl $1, %eax
9:  popq %r12
    popq %rbx
    ret

/* read_config(): mac, status, mtu from the device configuration (defaults for features not negotiated) */
read_config:
    movq vio(%rip), %rcx
    movq vio + 24(%rip), %rdx
1:  movzbl C_GENERATION(%rcx), %r8d
    movl $0x00000002, mac(%rip)     /* 02:00:00:00:00:01 */
    movw $0x0100, mac + 4(%rip)
    testl $NF_MAC, features(%rip)
    jz 2f
    xorl %esi, %esi
3:  movb (%rdx,%rsi), %al
    movb %al, mac(%rsi)
    incl %esi
    cmpl $6, %esi
    jb 3b
2:  movw $1, link_status(%rip)
    testl $NF_STATUS, features(%rip)
    jz 4f
    movw 6(%rdx), %ax
    movw %ax, link_status(%rip)
4:  movw $1500, mtu(%rip)
    testl $NF_MTU, features(%rip)
    jz 5f
    movw 10(%rdx), %ax
    movw %ax, mtu(%rip)
5:  movzbl C_GENERATION(%rcx), %r9d
    cmpl %r8d, %r9d
    jne 1b
    ret

/* net_print(): the `NET dev` line */
net_print:
    movq net_err(%rip), %rax
    testq %rax, %rax
    jz 1f
    leaq msg_dev_error(%rip), %rdi
    call serial_puts
    movq net_err(%rip), %rdi
    call serial_puts
    jmp newline
1:  leaq msg_dev_mac(%rip), %rdi
    leaq mac(%rip), %rsi
    call put_mac
    leaq msg_mtu(%rip), %rdi
    movzwl mtu(%rip), %esi
    call put_kv
    leaq msg_status(%rip), %rdi
    movzwl link_status(%rip), %esi
    call put_kv
    leaq msg_features(%rip), %rdi
    call serial_puts
    movl features(%rip), %edi
    movl $8, %esi
    call serial_puthex
    leaq msg_mrg(%rip), %rdi
    movl features(%rip), %esi
    shrl $15, %esi
    andl $1, %esi
    call put_kv
    leaq msg_qsize(%rip), %rdi
    movzwl rx_size(%rip), %esi
    call put_kv
    jmp newline

/* need_ready() -> %eax = 1, or prints `NET no-device` and %eax = 0 */
need_ready:
    movl $1, %eax
    cmpb $0, ready(%rip)
    jne 1f
    leaq msg_nodev(%rip), %rdi
    call serial_puts
    xorl %eax, %eax
1:  ret

/* need_ip() -> %eax = 1 (device ready and a lease), or prints why not and %eax = 0 */
need_ip:
    call need_ready
    testl %eax, %eax
    jz 1f
    cmpb $0, have_ip(%rip)
    jne 1f
    leaq msg_noip(%rip), %rdi
    call serial_puts
    xorl %eax, %eax
1:  ret

/* need_router_mac() -> %eax = 1 (as need_ip, and the router's MAC known, by ARP if need be) or 0 */
need_router_mac:
    call need_ip
    testl %eax, %eax
    jz 1f
    cmpb $0, have_router_mac(%rip)
    jne 1f
    call arp_resolve
    testl %eax, %eax
    jns 1f
    leaq msg_arp_timeout(%rip), %rdi
    call serial_puts
    xorl %eax, %eax
    ret
1:  ret

/* ---- Queues ---- */

/* rx_post(%edi = descriptor id): into the receive avail ring (not yet published) */
rx_post:
    movzwl rx_avail(%rip), %eax
    movzwl rx_size(%rip), %ecx
    xorl %edx, %edx
    divl %ecx
    leaq rxq + R_AVAIL + 4(%rip), %rax
    movw %di, (%rax,%rdx,2)
    incw rx_avail(%rip)
    ret

/* rx_kick(): publishes the receive avail idx and notifies queue 0 */
rx_kick:
    sfence
    movzwl rx_avail(%rip), %eax
    movw %ax, rxq + R_AVAIL + 2(%rip)
    mfence
    movq rx_notify(%rip), %rax
    movw $0, (%rax)
    ret

/* rx_post_all(): every receive descriptor posted, one notification */
rx_post_all:
    pushq %rbx
    xorl %ebx, %ebx
1:  movl %ebx, %edi
    call rx_post
    incl %ebx
    cmpw rx_size(%rip), %bx
    jb 1b
    popq %rbx
    jmp rx_kick

/* tx_publish(%edi = head descriptor, %esi = avail idx increment): avail entry, barrier, idx, barrier,
   notification of queue 1 */
tx_publish:
    movzwl tx_avail(%rip), %eax
    movzwl tx_size(%rip), %ecx
    xorl %edx, %edx
    divl %ecx
    leaq txq + R_AVAIL + 4(%rip), %rax
    movw %di, (%rax,%rdx,2)
    movzwl tx_avail(%rip), %eax
    addl %esi, %eax
    movw %ax, tx_avail(%rip)
    sfence
    movw %ax, txq + R_AVAIL + 2(%rip)
    mfence
    movq tx_notify(%rip), %rax
    movw $1, (%rax)
    ret

/* tx_wait(%rdi = timeout ticks) -> %eax = 1 when the transmit used idx moved (tx_used catches up), 0 */
tx_wait:
    movq %rdi, %rdx
    leaq txq + R_USED + 2(%rip), %rdi
    leaq tx_used(%rip), %rsi
    call wait_idx
    testl %eax, %eax
    jz 1f
    movzwl txq + R_USED + 2(%rip), %ecx
    movw %cx, tx_used(%rip)
1:  ret

/* tx_send(%edi = frame length, the frame at tx_frame): header zeroed, descriptor 0, published, 5 s wait
   -> %eax = 1, or 0 after printing `NET tx-timeout` */
tx_send:
    leaq tx_buf(%rip), %rax
    movq $0, (%rax)
    movl $0, 8(%rax)
    movq %rax, txq(%rip)
    addl $HDR, %edi
    movl %edi, txq + 8(%rip)
    movl $0, txq + 12(%rip)         /* flags 0 (device-readable), next 0 */
    xorl %edi, %edi
    movl $1, %esi
    call tx_publish
    movl $TICKS_5S, %edi
    call tx_wait
    testl %eax, %eax
    jnz 1f
    leaq msg_tx_timeout(%rip), %rdi
    call serial_puts
    xorl %eax, %eax
1:  ret

/* rx_recv(%rdi = timeout ticks) -> %eax = length of the next frame, copied to `frame`, or -1 on timeout.
   last_nbuf = the buffers it took. */
rx_recv:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rdi, %r12
    xorl %r13d, %r13d               /* bytes copied */
    movl $1, %r14d                  /* buffers left */
    xorl %r15d, %r15d               /* buffers taken */
1:  leaq rxq + R_USED + 2(%rip), %rdi
    leaq rx_used(%rip), %rsi
    movq %r12, %rdx
    call wait_idx
    testl %eax, %eax
    jz 8f
    movzwl rx_used(%rip), %eax
    movzwl rx_size(%rip), %ecx
    xorl %edx, %edx
    divl %ecx
    leaq rxq + R_USED + 4(%rip), %rax
    movl (%rax,%rdx,8), %ebx        /* id */
    movl 4(%rax,%rdx,8), %ecx       /* len */
    incw rx_used(%rip)
    movzwl rx_size(%rip), %eax
    cmpl %eax, %ebx
    jae 1b                          /* not one of ours: ignored */
    cmpl $RXBUF, %ecx
    jbe 2f
    movl $RXBUF, %ecx
2:  movl %ebx, %esi
    shll $11, %esi
    leaq rx_bufs(%rip), %rax
    addq %rax, %rsi
    testl %r15d, %r15d
    jnz 4f
    cmpl $HDR, %ecx                 /* first buffer: the header, then data */
    jae 3f
    movl $HDR, %ecx
3:  subl $HDR, %ecx
    movl $1, %r14d
    testl $NF_MRG, features(%rip)
    jz 5f
    movzwl 10(%rsi), %r14d          /* num_buffers */
    testl %r14d, %r14d
    jnz 6f
    movl $1, %r14d
6:  movzwl rx_size(%rip), %eax
    cmpl %eax, %r14d
    jbe 5f
    movl %eax, %r14d
5:  addq $HDR, %rsi
4:  leaq frame(%rip), %rdi
    addq %r13, %rdi
    movl $FRAME_MAX, %eax
    subl %r13d, %eax
    cmpl %eax, %ecx
    jbe 7f
    movl %eax, %ecx
7:  addl %ecx, %r13d
    rep movsb
    movl %ebx, %edi                 /* the buffer goes back at once */
    call rx_post
    call rx_kick
    incl %r15d
    decl %r14d
    jnz 1b
    movl %r15d, last_nbuf(%rip)
    incl rx_frames(%rip)
    movl %r13d, %eax
    jmp 9f
8:  movl $-1, %eax
9:  popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* recv_match(%rdi = matcher, %rsi = timeout ticks) -> %eax = length of the first frame (in `frame`) for
   which matcher(%rdi = frame, %esi = length) returns non-zero, or -1 on timeout */
recv_match:
    pushq %rbx
    pushq %r12
    pushq %r13
    movq %rdi, %rbx
    movq %rsi, %r12
    call pit_ticks
    movq %rax, %r13
1:  call pit_ticks
    subq %r13, %rax
    cmpq %r12, %rax
    jae 8f
    movq %r12, %rdi
    subq %rax, %rdi
    call rx_recv
    testl %eax, %eax
    js 8f
    movl %eax, rx_len(%rip)
    leaq frame(%rip), %rdi
    movl %eax, %esi
    call *%rbx
    testl %eax, %eax
    jz 1b
    movl rx_len(%rip), %eax
    jmp 9f
8:  movl $-1, %eax
9:  popq %r13
    popq %r12
    popq %rbx
    ret

/* ---- Frames ---- */

/* ip_parse(%rdi = frame, %esi = length) -> %eax = the IP protocol of a well-formed IPv4 frame (total length
   within the frame), or -1; l4 = its transport header, l4_len = its length per the IP header */
ip_parse:
    cmpl $34, %esi
    jb 9f
    cmpw $0x0008, 12(%rdi)          /* ethertype 0x0800 */
    jne 9f
    movzbl 14(%rdi), %eax
    movl %eax, %ecx
    shrl $4, %ecx
    cmpl $4, %ecx
    jne 9f
    andl $0xF, %eax
    cmpl $5, %eax
    jb 9f
    shll $2, %eax                   /* header length */
    movzwl 16(%rdi), %ecx
    rolw $8, %cx                    /* total length */
    cmpl %eax, %ecx
    jb 9f
    leal 14(%rcx), %edx
    cmpl %esi, %edx
    ja 9f
    subl %eax, %ecx
    movl %ecx, l4_len(%rip)
    leaq 14(%rdi,%rax), %rdx
    movq %rdx, l4(%rip)
    movzbl 23(%rdi), %eax
    ret
9:  movl $-1, %eax
    ret

/* ip_csum(%rdi = data, %esi = length) -> %eax = the Internet checksum, to be stored as loaded (words are
   summed as little-endian loads; the one's-complement sum is byte-order independent) */
ip_csum:
    xorl %eax, %eax
    movl %esi, %ecx
    shrl $1, %ecx
    jz 2f
1:  movzwl (%rdi), %edx
    addl %edx, %eax
    addq $2, %rdi
    decl %ecx
    jnz 1b
2:  testl $1, %esi
    jz 3f
    movzbl (%rdi), %edx
    addl %edx, %eax
3:  movl %eax, %edx
    shrl $16, %edx
    andl $0xFFFF, %eax
    addl %edx, %eax
    movl %eax, %edx
    shrl $16, %edx
    addl %edx, %eax
    notl %eax
    movzwl %ax, %eax
    ret

/* frame_eth(%rdi = destination MAC address, %esi = ethertype as a little-endian load of its bytes) */
frame_eth:
    leaq tx_frame(%rip), %rax
    movl (%rdi), %ecx
    movl %ecx, (%rax)
    movzwl 4(%rdi), %ecx
    movw %cx, 4(%rax)
    movl mac(%rip), %ecx
    movl %ecx, 6(%rax)
    movzwl mac + 4(%rip), %ecx
    movw %cx, 10(%rax)
    movw %si, 12(%rax)
    ret

/* frame_ip(%edi = protocol, %esi = transport length, %edx = destination, %ecx = source, addresses as
   loaded from memory): the IPv4 header at tx_frame + 14, DF, TTL 64, checksum */
frame_ip:
    leaq tx_frame + 14(%rip), %r8
    movb $0x45, (%r8)
    movb $0, 1(%r8)
    leal 20(%rsi), %eax
    rolw $8, %ax
    movw %ax, 2(%r8)
    incw ip_id(%rip)
    movzwl ip_id(%rip), %eax
    rolw $8, %ax
    movw %ax, 4(%r8)
    movw $0x0040, 6(%r8)            /* DF */
    movb $64, 8(%r8)
    movb %dil, 9(%r8)
    movw $0, 10(%r8)
    movl %ecx, 12(%r8)
    movl %edx, 16(%r8)
    movq %r8, %rdi
    movl $20, %esi
    call ip_csum
    movw %ax, tx_frame + 24(%rip)
    ret

/* frame_udp(%edi = source port, %esi = destination port, both as loads of network-order bytes, %edx =
   payload length): the UDP header at tx_frame + 34, checksum 0 (none) */
frame_udp:
    leaq tx_frame + 34(%rip), %r8
    movw %di, (%r8)
    movw %si, 2(%r8)
    leal 8(%rdx), %eax
    rolw $8, %ax
    movw %ax, 4(%r8)
    movw $0, 6(%r8)
    ret

/* ---- DHCP ---- */

/* dh_exchange(%edi = DHCP message type to send (as dh_send), %esi = the type awaited (dh_want)) -> %eax =
   1 when the answer came (in `frame`, parsed by m_dhcp), 0 when sending failed (`NET tx-timeout` printed),
   -1 when no answer came within rx_wait */
dh_exchange:
    pushq %rsi
    call dh_send
    popq %rsi
    testl %eax, %eax
    jz 1f
    movb %sil, dh_want(%rip)
    leaq m_dhcp(%rip), %rdi
    movq rx_wait(%rip), %rsi
    call recv_match
    testl %eax, %eax
    js 2f
    movl $1, %eax
1:  ret
2:  movl $-1, %eax
    ret

/* dh_send(%edi = DHCP message type, 1 DISCOVER or 3 REQUEST of offer_ip from offer_server) -> %eax as
   tx_send. A 300-byte BOOTP message, broadcast from 0.0.0.0:68 to 255.255.255.255:67. */
dh_send:
    pushq %rbx
    movl %edi, %ebx
    leaq tx_frame + 42(%rip), %rdi
    xorl %eax, %eax
    movl $300, %ecx
    rep stosb
    leaq tx_frame + 42(%rip), %r8
    movl $0x00060101, (%r8)         /* op 1, htype 1, hlen 6, hops 0 */
    movl dh_xid(%rip), %eax
    movl %eax, 4(%r8)
    movw $0x0080, 10(%r8)           /* flags: broadcast */
    movl mac(%rip), %eax
    movl %eax, 28(%r8)              /* chaddr */
    movzwl mac + 4(%rip), %eax
    movw %ax, 32(%r8)
    movl $0x63538263, 236(%r8)      /* magic cookie 99.130.83.99 */
    leaq 240(%r8), %rdi
    movb $53, (%rdi)
    movb $1, 1(%rdi)
    movb %bl, 2(%rdi)
    addq $3, %rdi
    cmpl $3, %ebx
    jne 1f
    movw $0x0432, (%rdi)            /* 50, 4: requested address */
    movl offer_ip(%rip), %eax
    movl %eax, 2(%rdi)
    movw $0x0436, 6(%rdi)           /* 54, 4: server identifier */
    movl offer_server(%rip), %eax
    movl %eax, 8(%rdi)
    addq $12, %rdi
1:  movl $0x01030437, (%rdi)        /* 55, 4, 1 (mask), 3 (router) */
    movw $0x1A06, 4(%rdi)           /* 6 (DNS), 26 (MTU) */
    movb $255, 6(%rdi)
    movl $0x4400, %edi              /* 68 */
    movl $0x4300, %esi              /* 67 */
    movl $300, %edx
    call frame_udp
    movl $17, %edi
    movl $308, %esi
    movl $0xFFFFFFFF, %edx
    xorl %ecx, %ecx
    call frame_ip
    leaq bcast_mac(%rip), %rdi
    movl $0x0008, %esi
    call frame_eth
    movl $342, %edi
    popq %rbx
    jmp tx_send

/* m_dhcp(%rdi = frame, %esi = length): a BOOTP reply to port 68 with our xid and the magic cookie whose
   option 53 is dh_want (5 also accepts 6, NAK); its options are parsed into the dh_* fields */
m_dhcp:
    pushq %rbx
    call ip_parse
    cmpl $17, %eax
    jne 9f
    movq l4(%rip), %rdx
    movl l4_len(%rip), %esi
    cmpl $8 + 240, %esi
    jb 9f
    cmpw $0x4400, 2(%rdx)           /* destination port 68 */
    jne 9f
    leaq 8(%rdx), %rdi
    cmpb $2, (%rdi)                 /* BOOTREPLY */
    jne 9f
    movl 4(%rdi), %eax
    cmpl dh_xid(%rip), %eax
    jne 9f
    cmpl $0x63538263, 236(%rdi)
    jne 9f
    movq %rdi, dh_bootp(%rip)
    subl $8, %esi
    call dhcp_options
    movzbl dh_type(%rip), %eax
    cmpb dh_want(%rip), %al
    je 8f
    cmpb $5, dh_want(%rip)
    jne 9f
    cmpb $6, %al
    jne 9f
8:  movl $1, %eax
    popq %rbx
    ret
9:  xorl %eax, %eax
    popq %rbx
    ret

/* dhcp_options(%rdi = BOOTP message, %esi = its length): options 53, 54, 1, 3, 6, 26 into dh_type,
   dh_server, dh_mask, dh_router, dh_dns, dh_mtu (the first address of a list), dh_have says which */
dhcp_options:
    leaq 240(%rdi), %r8
    movl %esi, %r9d
    addq %rdi, %r9                  /* end */
    movb $0, dh_type(%rip)
    movl $0, dh_have(%rip)
1:  cmpq %r9, %r8
    jae 9f
    movzbl (%r8), %eax
    cmpl $255, %eax
    je 9f
    testl %eax, %eax
    jnz 2f
    incq %r8                        /* pad */
    jmp 1b
2:  leaq 2(%r8), %r10
    cmpq %r9, %r10
    ja 9f
    movzbl 1(%r8), %ecx
    addq %rcx, %r10                 /* next option */
    cmpq %r9, %r10
    ja 9f
    cmpl $53, %eax
    jne 3f
    testl %ecx, %ecx
    jz 7f
    movb 2(%r8), %dl
    movb %dl, dh_type(%rip)
    jmp 7f
3:  cmpl $26, %eax
    jne 4f
    cmpl $2, %ecx
    jb 7f
    movzwl 2(%r8), %edx
    rolw $8, %dx
    movw %dx, dh_mtu(%rip)
    orl $H_MTU, dh_have(%rip)
    jmp 7f
4:  cmpl $4, %ecx                   /* the rest are addresses */
    jb 7f
    movl 2(%r8), %edx
    cmpl $54, %eax
    jne 5f
    movl %edx, dh_server(%rip)
    orl $H_SERVER, dh_have(%rip)
    jmp 7f
5:  cmpl $3, %eax
    jne 6f
    movl %edx, dh_router(%rip)
    orl $H_ROUTER, dh_have(%rip)
    jmp 7f
6:  cmpl $6, %eax
    jne 10f
    movl %edx, dh_dns(%rip)
    orl $H_DNS, dh_have(%rip)
    jmp 7f
10: cmpl $1, %eax
    jne 7f
    movl %edx, dh_mask(%rip)
    orl $H_MASK, dh_have(%rip)
7:  movq %r10, %r8
    jmp 1b
9:  ret

/* ---- ARP ---- */

/* arp_build(%edi = target address): a who-has from our MAC and address (0 without a lease), broadcast,
   padded to 60 bytes */
arp_build:
    pushq %rdi
    movl %edi, arp_target(%rip)
    leaq bcast_mac(%rip), %rdi
    movl $0x0608, %esi
    call frame_eth
    popq %rdx
    leaq tx_frame + 14(%rip), %r8
    movl $0x00080100, (%r8)         /* htype 1, ptype 0x0800 */
    movl $0x01000406, 4(%r8)        /* hlen 6, plen 4, op 1 */
    movl mac(%rip), %eax
    movl %eax, 8(%r8)
    movzwl mac + 4(%rip), %eax
    movw %ax, 12(%r8)
    movl my_ip(%rip), %eax
    movl %eax, 14(%r8)
    leaq 18(%r8), %rdi              /* target MAC and padding: 0 */
    xorl %eax, %eax
    movl $28, %ecx
    rep stosb
    movl %edx, 24(%r8)
    ret

/* m_arp(%rdi = frame, %esi = length): an ARP reply from arp_target; its MAC goes to router_mac */
m_arp:
    xorl %eax, %eax
    cmpl $42, %esi
    jb 1f
    cmpw $0x0608, 12(%rdi)
    jne 1f
    cmpw $0x0200, 20(%rdi)          /* op 2 */
    jne 1f
    movl 28(%rdi), %ecx
    cmpl arp_target(%rip), %ecx
    jne 1f
    movl 22(%rdi), %ecx
    movl %ecx, router_mac(%rip)
    movzwl 26(%rdi), %ecx
    movw %cx, router_mac + 4(%rip)
    movb $1, have_router_mac(%rip)
    movl $1, %eax
1:  ret

/* arp_resolve() -> %eax >= 0 when the router answered (router_mac set), -1 */
arp_resolve:
    movl router_ip(%rip), %edi
    call arp_build
    movl $60, %edi
    call tx_send
    testl %eax, %eax
    jz 1f
    leaq m_arp(%rip), %rdi
    movq rx_wait(%rip), %rsi
    jmp recv_match
1:  movl $-1, %eax
    ret

/* ---- ICMP ---- */

/* from_router(%rdi = frame, %esi = length, %edx = IP protocol) -> %rax = its transport header (l4, at
   least 8 bytes per the IP header) when the frame is well-formed IPv4 of that protocol from router_ip, else 0 */
from_router:
    pushq %rbx
    pushq %rdx
    movq %rdi, %rbx
    call ip_parse
    popq %rdx
    cmpl %edx, %eax
    jne 9f
    movl 26(%rbx), %eax
    cmpl router_ip(%rip), %eax
    jne 9f
    cmpl $8, l4_len(%rip)
    jb 9f
    movq l4(%rip), %rax
    popq %rbx
    ret
9:  xorl %eax, %eax
    popq %rbx
    ret

/* m_icmp(%rdi = frame, %esi = length): an echo reply from the router with our id and sequence */
m_icmp:
    movl $1, %edx
    call from_router
    testq %rax, %rax
    jz 9f
    movq %rax, %rdx
    cmpb $0, (%rdx)                 /* echo reply */
    jne 9f
    cmpw $0x4850, 4(%rdx)           /* id 0x5048 */
    jne 9f
    movzwl ping_seq(%rip), %eax
    rolw $8, %ax
    cmpw %ax, 6(%rdx)
    jne 9f
    movl $1, %eax
    ret
9:  xorl %eax, %eax
    ret

/* tx_to_router(%edi = IP protocol, %esi = IP payload length; the payload already in tx_frame + 34): the
   IPv4 header (my_ip -> router_ip) and the Ethernet header (to router_mac), then tx_send of the frame ->
   tx_send's %eax */
tx_to_router:
    pushq %rbx
    leal 34(%rsi), %ebx             /* Ethernet 14 + IP 20 + payload */
    movl router_ip(%rip), %edx
    movl my_ip(%rip), %ecx
    call frame_ip
    leaq router_mac(%rip), %rdi
    movl $0x0008, %esi
    call frame_eth
    movl %ebx, %edi
    popq %rbx
    jmp tx_send

/* ---- Commands: (%rdi = arguments, %rsi = word end) -> %eax = 0, or 1 for a bad word ---- */

cmd_init:
    SAVE
    cmpl $0, cfg_addr(%rip)
    je 1f
    call net_init
    call net_print
    jmp cmd_ok
1:  call need_ready
    jmp cmd_ok

cmd_nomrg:
    movb $1, nomrg(%rip)
    jmp cmd_init

cmd_dhcp:
    SAVE
    call need_ready
    testl %eax, %eax
    jz cmd_ok
    incl dh_count(%rip)
    movl dh_count(%rip), %eax
    orl $0x4C485000, %eax           /* xid */
    movl %eax, dh_xid(%rip)
    movl $1, %edi                   /* DISCOVER */
    movl $2, %esi                   /* OFFER */
    call dh_exchange
    testl %eax, %eax
    jz cmd_ok
    js 9f
    movq dh_bootp(%rip), %rax
    movl 16(%rax), %ecx             /* yiaddr */
    movl %ecx, offer_ip(%rip)
    movl 20(%rax), %ecx             /* siaddr, unless option 54 says otherwise */
    testl $H_SERVER, dh_have(%rip)
    jz 1f
    movl dh_server(%rip), %ecx
1:  movl %ecx, offer_server(%rip)
    movl dh_have(%rip), %r12d
    movl dh_router(%rip), %eax
    movl %eax, offer_router(%rip)
    leaq msg_dhcp_ip(%rip), %rdi
    leaq offer_ip(%rip), %rsi
    call put_ip
    leaq msg_server(%rip), %rdi
    leaq offer_server(%rip), %rsi
    call put_ip
    testl $H_MASK, %r12d
    jz 2f
    leaq msg_mask(%rip), %rdi
    leaq dh_mask(%rip), %rsi
    call put_ip
2:  testl $H_ROUTER, %r12d
    jz 3f
    leaq msg_router(%rip), %rdi
    leaq dh_router(%rip), %rsi
    call put_ip
3:  testl $H_DNS, %r12d
    jz 4f
    leaq msg_dns(%rip), %rdi
    leaq dh_dns(%rip), %rsi
    call put_ip
4:  testl $H_MTU, %r12d
    jz 5f
    leaq msg_mtu(%rip), %rdi
    movzwl dh_mtu(%rip), %esi
    call put_kv
5:  call newline
    movl $3, %edi                   /* REQUEST */
    movl $5, %esi                   /* ACK (or NAK) */
    call dh_exchange
    testl %eax, %eax
    jz cmd_ok
    js 9f
    cmpb $6, dh_type(%rip)
    jne 6f
    leaq msg_dhcp_nak(%rip), %rdi
    call serial_puts
    jmp cmd_ok
6:  movq dh_bootp(%rip), %rax
    movl 16(%rax), %ecx
    movl %ecx, my_ip(%rip)
    movl offer_router(%rip), %ecx   /* the router: the ACK's option 3, else the OFFER's, else the server */
    testl $H_ROUTER, %r12d
    jnz 7f
    movl offer_server(%rip), %ecx
7:  testl $H_ROUTER, dh_have(%rip)
    jz 8f
    movl dh_router(%rip), %ecx
8:  movl %ecx, router_ip(%rip)
    movb $1, have_ip(%rip)
    movb $0, have_router_mac(%rip)
    leaq msg_dhcp_ack(%rip), %rdi
    leaq my_ip(%rip), %rsi
    call put_ip
    call newline
    jmp cmd_ok
9:  leaq msg_dhcp_timeout(%rip), %rdi
    call serial_puts
    jmp cmd_ok

cmd_arp:
    SAVE
    call need_ip
    testl %eax, %eax
    jz cmd_ok
    call arp_resolve
    testl %eax, %eax
    js 1f
    leaq msg_arp_router(%rip), %rdi
    leaq router_ip(%rip), %rsi
    call put_ip
    leaq msg_macv(%rip), %rdi
    leaq router_mac(%rip), %rsi
    call put_mac
    call newline
    jmp cmd_ok
1:  leaq msg_arp_timeout(%rip), %rdi
    call serial_puts
    jmp cmd_ok

cmd_ping:
    SAVE
    call need_router_mac
    testl %eax, %eax
    jz cmd_ok
    incw ping_seq(%rip)
    leaq tx_frame + 34(%rip), %r8   /* ICMP echo request: type 8, code 0, id, seq, 56 bytes 0..55 */
    movl $8, (%r8)
    movw $0x4850, 4(%r8)
    movzwl ping_seq(%rip), %eax
    rolw $8, %ax
    movw %ax, 6(%r8)
    xorl %ecx, %ecx
1:  movb %cl, 8(%r8,%rcx)
    incl %ecx
    cmpl $56, %ecx
    jb 1b
    movq %r8, %rdi
    movl $64, %esi
    call ip_csum
    movw %ax, tx_frame + 36(%rip)
    movl $1, %edi
    movl $64, %esi
    call tx_to_router
    testl %eax, %eax
    jz cmd_ok
    leaq m_icmp(%rip), %rdi
    movq rx_wait(%rip), %rsi
    call recv_match
    testl %eax, %eax
    js 2f
    leaq msg_ping_from(%rip), %rdi
    leaq router_ip(%rip), %rsi
    call put_ip
    leaq msg_seq(%rip), %rdi
    movzwl ping_seq(%rip), %esi
    call put_kv
    leaq msg_bytes(%rip), %rdi
    movl l4_len(%rip), %esi
    subl $8, %esi
    call put_kv
    call newline
    jmp cmd_ok
2:  leaq msg_ping_timeout(%rip), %rdi
    call serial_puts
    jmp cmd_ok

/* m_udp(%rdi = frame, %esi = length): UDP from the router's udp_dport to our udp_sport */
m_udp:
    movl $17, %edx
    call from_router
    testq %rax, %rax
    jz 9f
    movq %rax, %rdx
    movzwl (%rdx), %eax
    cmpw udp_dport(%rip), %ax
    jne 9f
    movzwl 2(%rdx), %eax
    cmpw udp_sport(%rip), %ax
    jne 9f
    movl $1, %eax
    ret
9:  xorl %eax, %eax
    ret

/* udp=PORT,N: %r12 port, %r13 N */
cmd_udp:
    SAVE
    ARGS 2
    movq args(%rip), %r12
    leaq -1(%r12), %rax
    cmpq $65535, %rax
    jae cmd_bad
    movq args + 8(%rip), %r13
    leaq -1(%r13), %rax
    cmpq $UDP_MAX, %rax
    jae cmd_bad
    call need_router_mac
    testl %eax, %eax
    jz cmd_ok
    movl %r12d, %eax
    rolw $8, %ax
    movw %ax, udp_dport(%rip)
    incl udp_count(%rip)
    movl udp_count(%rip), %eax
    andl $0x3FFF, %eax
    addl $49152, %eax
    rolw $8, %ax
    movw %ax, udp_sport(%rip)
    leaq tx_frame + 42(%rip), %rdi  /* payload: byte j = (j + (j >> 8)) & 0xFF */
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shrl $8, %eax
    addl %ecx, %eax
    movb %al, (%rdi,%rcx)
    incl %ecx
    cmpl %r13d, %ecx
    jb 1b
    movzwl udp_sport(%rip), %edi
    movzwl udp_dport(%rip), %esi
    movl %r13d, %edx
    call frame_udp
    movl $17, %edi
    leal 8(%r13), %esi
    call tx_to_router
    testl %eax, %eax
    jz cmd_ok
    leaq m_udp(%rip), %rdi
    movq rx_wait(%rip), %rsi
    call recv_match
    movl %eax, %r14d
    leaq msg_udp_port(%rip), %rdi
    movq %r12, %rsi
    call put_kv
    leaq msg_sent(%rip), %rdi
    movq %r13, %rsi
    call put_kv
    testl %r14d, %r14d
    jns 2f
    leaq msg_timeout(%rip), %rdi
    call serial_puts
    jmp cmd_ok
2:  movq l4(%rip), %rdx
    movzwl 4(%rdx), %r14d           /* UDP length, within the IP payload */
    rolw $8, %r14w
    cmpl l4_len(%rip), %r14d
    jbe 3f
    movl l4_len(%rip), %r14d
3:  subl $8, %r14d
    jae 4f
    xorl %r14d, %r14d
4:  leaq 8(%rdx), %rdi
    movl %r14d, %esi
    call fnv1a
    movl %eax, %r15d
    leaq msg_reply(%rip), %rdi
    movl %r14d, %esi
    call put_kv
    leaq msg_buffers(%rip), %rdi
    movl last_nbuf(%rip), %esi
    call put_kv
    leaq msg_sum(%rip), %rdi
    call serial_puts
    movl %r15d, %edi
    movl $8, %esi
    call serial_puthex
    call newline
    jmp cmd_ok

cmd_link:
    SAVE
    call need_ready
    testl %eax, %eax
    jz cmd_ok
    call read_config
    leaq msg_link(%rip), %rdi
    call put_link
    call newline
    jmp cmd_ok

/* put_link(%rdi = text): the text, `status=<s> up=<bit 0>` */
put_link:
    movzwl link_status(%rip), %esi
    call put_kv
    leaq msg_up(%rip), %rdi
    movzwl link_status(%rip), %esi
    andl $1, %esi
    jmp put_kv

/* wait-link: %r12 status at the start, %r13 ISR bits seen, %r14 start tick */
cmd_wait_link:
    SAVE
    call need_ready
    testl %eax, %eax
    jz cmd_ok
    call read_config
    movzwl link_status(%rip), %r12d
    leaq msg_wait_link(%rip), %rdi
    movl %r12d, %esi
    call put_kv
    call newline
    xorl %r13d, %r13d
    call pit_ticks
    movq %rax, %r14
1:  movl $64, %r15d
2:  movq vio + 16(%rip), %rax
    orb (%rax), %r13b               /* reading clears it */
    call read_config
    movzwl link_status(%rip), %eax
    cmpl %r12d, %eax
    jne 3f
    pause
    decl %r15d
    jnz 2b
    call pit_ticks
    subq %r14, %rax
    cmpq $TICKS_30S, %rax
    jb 1b
    leaq msg_wait_timeout(%rip), %rdi
    call serial_puts
    jmp cmd_ok
3:  movq vio + 16(%rip), %rax
    orb (%rax), %r13b
    leaq msg_link_changed(%rip), %rdi
    call put_link
    leaq msg_config_irq(%rip), %rdi
    movl %r13d, %esi
    shrl $1, %esi
    andl $1, %esi
    call put_kv
    call newline
    jmp cmd_ok

/* flood-wait=MS: %r12 MS, %r13 start tick, %r14 frames */
cmd_flood_wait:
    SAVE
    ARGS 1
    movq args(%rip), %r12
    cmpq $60000, %r12
    ja cmd_bad
    call need_ready
    testl %eax, %eax
    jz cmd_ok
    movb $1, no_rx_post(%rip)
    call net_init
    movb $0, no_rx_post(%rip)
    testl %eax, %eax
    jz 1f
    call net_print
    jmp cmd_ok
1:  leaq msg_flood_start(%rip), %rdi
    movq %r12, %rsi
    call put_kv
    call newline
    imulq $1000, %r12, %rdi
    call delay_us
    call rx_post_all
    xorl %r14d, %r14d
    call pit_ticks
    movq %rax, %r13
2:  call pit_ticks
    subq %r13, %rax
    cmpq $TICKS_1S, %rax
    jae 3f
    movl $TICKS_1S, %edi
    subq %rax, %rdi
    call rx_recv
    testl %eax, %eax
    js 3f
    incl %r14d
    jmp 2b
3:  leaq msg_flood_ms(%rip), %rdi
    movq %r12, %rsi
    call put_kv
    leaq msg_received(%rip), %rdi
    movl %r14d, %esi
    call put_kv
    call newline
    jmp cmd_ok

/* irq: %r12 IOAPIC pin, %r13 start tick */
cmd_irq:
    SAVE
    call need_ip
    testl %eax, %eax
    jz cmd_ok
    movzbl irq_line(%rip), %r12d
    cmpl $23, %r12d
    jbe 1f
    leaq msg_irq_badline(%rip), %rdi
    call serial_puts
    jmp cmd_ok
1:  movq vio + 16(%rip), %rsi
    movzbl (%rsi), %eax             /* stale ISR bits cleared (the line deasserted) */
    movl %r12d, %edi
    call virtio_irq_arm
    movw $0, rxq + R_AVAIL(%rip)    /* interrupts wanted for receives */
    mfence
    movl router_ip(%rip), %edi
    call arp_build
    movl $60, %edi
    call tx_send
    leaq rxq + R_USED + 2(%rip), %rdi
    leaq rx_used(%rip), %rsi
    movl $TICKS_5S, %edx
    call irq_wait_idx
    movl %r12d, %edi
    call virtio_irq_disarm
    movw $1, rxq + R_AVAIL(%rip)    /* back to polling */
    xorl %r14d, %r14d
    movzwl rxq + R_USED + 2(%rip), %eax
    cmpw rx_used(%rip), %ax
    je 5f
    cmpl $0, irq_count(%rip)
    je 5f
    movl $1, %r14d
5:  leaq m_arp(%rip), %rdi
    movl $TICKS_1S, %esi
    call recv_match
    xorl %r15d, %r15d
    testl %eax, %eax
    js 6f
    movl $1, %r15d
6:  leaq msg_irq_interrupted(%rip), %rdi
    movl %r14d, %esi
    call put_kv
    leaq msg_interrupts(%rip), %rdi
    movl irq_count(%rip), %esi
    call put_kv
    leaq msg_arpv(%rip), %rdi
    movl %r15d, %esi
    call put_kv
    call newline
    jmp cmd_ok

/* hostile / hostile=NAME: %r14 table entry, %r13 used flag, %r12 cases left to run (-1: every case) */
cmd_hostile_one:
    SAVE
    movq %rsi, %rdx
    movq %rdi, %rsi
    leaq hostile_table(%rip), %rdi  /* a known case name? */
    call table_find
    testq %rax, %rax
    jz cmd_bad
    movq %rax, %r14
    movl $1, %r12d
    jmp hostile_go
cmd_hostile:
    SAVE
    leaq hostile_table(%rip), %r14
    movl $-1, %r12d                 /* every case */
hostile_go:
    call need_ready
    testl %eax, %eax
    jz cmd_ok
1:  movq (%r14), %r15
    testq %r15, %r15
    jz 3f
    testl %r12d, %r12d
    jz 3f
    decl %r12d
    call net_init
    testl %eax, %eax
    jnz 4f
    movl router_ip(%rip), %edi      /* a harmless frame to spoil: a 60-byte ARP who-has */
    call arp_build
    leaq tx_buf(%rip), %rax         /* descriptor 0: header and frame, device-readable */
    movq $0, (%rax)
    movl $0, 8(%rax)
    movq %rax, txq(%rip)
    movl $HDR + 60, txq + 8(%rip)
    movl $0, txq + 12(%rip)
    call *8(%r14)                   /* spoils and publishes */
    call hostile_wait
    xorl %r13d, %r13d
    movzwl txq + R_USED + 2(%rip), %eax
    cmpw tx_used(%rip), %ax
    setne %r13b
    leaq msg_hostile(%rip), %rdi
    movq %r15, %rsi
    movl %r13d, %edx
    call put_case
    movq vio(%rip), %rdi
    call put_devstatus
    addq $16, %r14
    jmp 1b
3:  call net_init
    testl %eax, %eax
    jnz 4f
    leaq msg_hostile_done(%rip), %rdi
    call serial_puts
    jmp cmd_ok
4:  call net_print
    jmp cmd_ok

/* hostile_wait(): until the transmit used idx moves or device_status has NEEDS_RESET, 5 s at most (the
   idx and status are checked 64 times between PIT reads), then 50 ms more */
hostile_wait:
    pushq %rbx
    pushq %r12
    call pit_ticks
    movq %rax, %rbx
1:  movl $64, %r12d
2:  movzwl txq + R_USED + 2(%rip), %eax
    cmpw tx_used(%rip), %ax
    jne 3f
    movq vio(%rip), %rax
    testb $0x40, C_STATUS(%rax)
    jnz 3f
    pause
    decl %r12d
    jnz 2b
    call pit_ticks
    subq %rbx, %rax
    cmpq $TICKS_5S, %rax
    jb 1b
3:  movl $50000, %edi
    call delay_us
    popq %r12
    popq %rbx
    ret

/* Hostile cases: descriptor 0 of the transmit queue is a well-formed 72-byte frame (header + ARP) that
   one field then spoils; published as avail entry 0 with idx + 1 unless said otherwise. */
hc_publish:
    xorl %edi, %edi
    movl $1, %esi
    jmp tx_publish
hc_loop:                            /* 0 -> 1 -> 0 -> ... */
    movl $HDR + 30, txq + 8(%rip)
    movw $F_NEXT, txq + 12(%rip)
    movw $1, txq + 14(%rip)
    leaq tx_buf + HDR + 30(%rip), %rax
    movq %rax, txq + 16(%rip)
    movl $30, txq + 24(%rip)
    movw $F_NEXT, txq + 28(%rip)
    movw $0, txq + 30(%rip)
    jmp hc_publish
hc_outside:                         /* at 256 GiB, beyond guest memory */
    movabsq $0x4000000000, %rax
    movq %rax, txq(%rip)
    jmp hc_publish
hc_writable:                        /* a device-writable descriptor in the transmit queue */
    movw $F_WRITE, txq + 12(%rip)
    jmp hc_publish
hc_huge:                            /* length 0xFFFFFFF0 */
    movl $0xFFFFFFF0, txq + 8(%rip)
    jmp hc_publish
hc_short:                           /* 4 bytes: shorter than the header */
    movl $4, txq + 8(%rip)
    jmp hc_publish
hc_zero:                            /* 0 bytes */
    movl $0, txq + 8(%rip)
    jmp hc_publish
hc_badhead:                         /* avail entry = queue size + 5 */
    movzwl tx_size(%rip), %edi
    addl $5, %edi
    movl $1, %esi
    jmp tx_publish
hc_badnext:                         /* NEXT -> 0xFFFF */
    movw $F_NEXT, txq + 12(%rip)
    movw $0xFFFF, txq + 14(%rip)
    jmp hc_publish
hc_indirect:                        /* INDIRECT (not negotiated), table = 4 KiB of zeroes, length 256 MiB */
    leaq frame(%rip), %rdi
    xorl %eax, %eax
    movl $512, %ecx
    rep stosq
    leaq frame(%rip), %rax
    movq %rax, txq(%rip)
    movl $0x10000000, txq + 8(%rip)
    movw $F_INDIRECT, txq + 12(%rip)
    jmp hc_publish
hc_availjump:                       /* avail idx advanced by 1000 (every ring entry is 0) */
    xorl %edi, %edi
    movl $1000, %esi
    jmp tx_publish

/* ip=A.B.C.D,R.R.R.R: the word's dots become commas in word_copy, then 8 numbers of at most 255 */
cmd_ip:
    SAVE
    movq %rsi, %rcx
    subq %rdi, %rcx
    cmpq $63, %rcx
    ja cmd_bad
    leaq word_copy(%rip), %rdx
    xorl %r8d, %r8d
1:  cmpq %rcx, %r8
    jae 2f
    movb (%rdi,%r8), %al
    cmpb $'.', %al
    jne 3f
    movb $',', %al
3:  movb %al, (%rdx,%r8)
    incq %r8
    jmp 1b
2:  leaq word_copy(%rip), %rdi
    leaq (%rdi,%rcx), %rsi
    ARGS 8
    xorl %ecx, %ecx
4:  movq args(,%rcx,8), %rax
    cmpq $255, %rax
    ja cmd_bad
    movb %al, my_ip(%rcx)           /* my_ip and router_ip are adjacent */
    incl %ecx
    cmpl $8, %ecx
    jb 4b
    call need_ready
    testl %eax, %eax
    jz cmd_ok
    movb $1, have_ip(%rip)
    movb $0, have_router_mac(%rip)
    leaq msg_ip(%rip), %rdi
    leaq my_ip(%rip), %rsi
    call put_ip
    leaq msg_router(%rip), %rdi
    leaq router_ip(%rip), %rsi
    call put_ip
    call newline
    jmp cmd_ok

/* wait=MS: 1 <= MS <= 60000 */
cmd_wait:
    SAVE
    ARGS 1
    movq args(%rip), %rax
    leaq -1(%rax), %rcx
    cmpq $60000, %rcx
    jae cmd_bad
    imulq $1193, %rax, %rax         /* PIT ticks per ms (1193.182) */
    movq %rax, rx_wait(%rip)
    jmp cmd_ok

cmd_hang:
    leaq msg_hang(%rip), %rdi
    jmp hang

    .section .rodata
    .p2align 3
cmd_table:
    .quad cmdn_init, cmd_init
    .quad cmdn_nomrg, cmd_nomrg
    .quad cmdn_dhcp, cmd_dhcp
    .quad cmdn_arp, cmd_arp
    .quad cmdn_ping, cmd_ping
    .quad cmdn_udp, cmd_udp
    .quad cmdn_link, cmd_link
    .quad cmdn_wait_link, cmd_wait_link
    .quad cmdn_hostile, cmd_hostile
    .quad cmdn_hostile_one, cmd_hostile_one
    .quad cmdn_flood_wait, cmd_flood_wait
    .quad cmdn_irq, cmd_irq
    .quad cmdn_hang, cmd_hang
    .quad cmdn_wait, cmd_wait
    .quad cmdn_ip, cmd_ip
    .quad 0, 0
hostile_table:
    .quad hn_loop, hc_loop
    .quad hn_outside, hc_outside
    .quad hn_writable, hc_writable
    .quad hn_huge, hc_huge
    .quad hn_short, hc_short
    .quad hn_zero, hc_zero
    .quad hn_badhead, hc_badhead
    .quad hn_badnext, hc_badnext
    .quad hn_indirect, hc_indirect
    .quad hn_availjump, hc_availjump
    .quad 0, 0

bcast_mac:          .byte 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF
cmdn_init:          .asciz "init"
cmdn_nomrg:         .asciz "nomrg"
cmdn_dhcp:          .asciz "dhcp"
cmdn_arp:           .asciz "arp"
cmdn_ping:          .asciz "ping"
cmdn_udp:           .asciz "udp="
cmdn_link:          .asciz "link"
cmdn_wait_link:     .asciz "wait-link"
cmdn_hostile:       .asciz "hostile"
cmdn_hostile_one:   .asciz "hostile="
cmdn_flood_wait:    .asciz "flood-wait="
cmdn_irq:           .asciz "irq"
cmdn_hang:          .asciz "hang"
cmdn_wait:          .asciz "wait="
cmdn_ip:            .asciz "ip="
hn_loop:            .asciz "loop"
hn_outside:         .asciz "outside"
hn_writable:        .asciz "writable"
hn_huge:            .asciz "huge"
hn_short:           .asciz "short"
hn_zero:            .asciz "zero"
hn_badhead:         .asciz "badhead"
hn_badnext:         .asciz "badnext"
hn_indirect:        .asciz "indirect"
hn_availjump:       .asciz "availjump"

msg_found0:         .asciz "NET found=0\n"
msg_found1:         .asciz "NET found=1 slot="
msg_irq:            .asciz " irq="
msg_dev_error:      .asciz "NET dev error="
msg_dev_mac:        .asciz "NET dev mac="
msg_mtu:            .asciz " mtu="
msg_status:         .asciz " status="
msg_features:       .asciz " features="
msg_mrg:            .asciz " mrg="
msg_qsize:          .asciz " qsize="
msg_nodev:          .asciz "NET no-device\n"
msg_noip:           .asciz "NET no-ip\n"
msg_badword:        .asciz "NET bad-word "
msg_done:           .asciz "NET done\n"
msg_hang:           .asciz "NET hang\n"
msg_tx_timeout:     .asciz "NET tx-timeout\n"
msg_dhcp_ip:        .asciz "NET dhcp ip="
msg_server:         .asciz " server="
msg_mask:           .asciz " mask="
msg_router:         .asciz " router="
msg_dns:            .asciz " dns="
msg_dhcp_ack:       .asciz "NET dhcp ack ip="
msg_ip:             .asciz "NET ip="
msg_dhcp_nak:       .asciz "NET dhcp nak\n"
msg_dhcp_timeout:   .asciz "NET dhcp timeout\n"
msg_arp_router:     .asciz "NET arp router="
msg_macv:           .asciz " mac="
msg_arp_timeout:    .asciz "NET arp timeout\n"
msg_ping_from:      .asciz "NET ping from="
msg_seq:            .asciz " seq="
msg_bytes:          .asciz " bytes="
msg_ping_timeout:   .asciz "NET ping timeout\n"
msg_udp_port:       .asciz "NET udp port="
msg_sent:           .asciz " sent="
msg_timeout:        .asciz " timeout\n"
msg_reply:          .asciz " reply="
msg_buffers:        .asciz " buffers="
msg_sum:            .asciz " sum="
msg_link:           .asciz "NET link status="
msg_up:             .asciz " up="
msg_wait_link:      .asciz "NET wait-link status="
msg_wait_timeout:   .asciz "NET wait-link timeout\n"
msg_link_changed:   .asciz "NET link-changed status="
msg_config_irq:     .asciz " config-irq="
msg_flood_start:    .asciz "NET flood-wait start ms="
msg_flood_ms:       .asciz "NET flood-wait ms="
msg_received:       .asciz " received="
msg_irq_badline:    .asciz "NET irq error=bad-irq-line\n"
msg_irq_interrupted: .asciz "NET irq interrupted="
msg_interrupts:     .asciz " interrupts="
msg_arpv:           .asciz " arp="
msg_hostile:        .asciz "NET hostile case="
msg_hostile_done:   .asciz "NET hostile-done\n"
err_reset:          .asciz "reset-timeout"
err_noqueue:        .asciz "no-queue"

    .section .data
    .p2align 3
rx_wait:            .quad TICKS_5S  /* how long dhcp, arp, ping and udp wait for an answer */

    .section .bss
    .p2align 3
vio:                .skip 40        /* common, notify, isr, device config, notify_off_multiplier */
net_err:            .skip 8
rx_notify:          .skip 8
tx_notify:          .skip 8
dh_bootp:           .skip 8
l4:                 .skip 8
args:               .skip 8 * 8
word_copy:          .skip 64
cfg_addr:           .skip 4
features:           .skip 4
last_nbuf:          .skip 4
rx_frames:          .skip 4
rx_len:             .skip 4
l4_len:             .skip 4
dh_count:           .skip 4
dh_xid:             .skip 4
dh_have:            .skip 4
dh_server:          .skip 4
dh_router:          .skip 4
dh_dns:             .skip 4
dh_mask:            .skip 4
offer_ip:           .skip 4
offer_server:       .skip 4
offer_router:       .skip 4
my_ip:              .skip 4
router_ip:          .skip 4
arp_target:         .skip 4
udp_count:          .skip 4
mac:                .skip 8
router_mac:         .skip 8
rx_size:            .skip 2
tx_size:            .skip 2
rx_avail:           .skip 2
rx_used:            .skip 2
tx_avail:           .skip 2
tx_used:            .skip 2
link_status:        .skip 2
mtu:                .skip 2
dh_mtu:             .skip 2
ip_id:              .skip 2
ping_seq:           .skip 2
udp_sport:          .skip 2
udp_dport:          .skip 2
irq_line:           .skip 1
ready:              .skip 1
nomrg:              .skip 1
no_rx_post:         .skip 1
have_ip:            .skip 1
have_router_mac:    .skip 1
dh_type:            .skip 1
dh_want:            .skip 1
    .p2align 12
rxq:                .skip 4096
txq:                .skip 4096
rx_bufs:            .skip QMAX * RXBUF
frame:              .skip FRAME_MAX
tx_buf:             .skip HDR       /* the header, then the frame */
tx_frame:           .skip 0x10000

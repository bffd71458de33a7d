/* virtio-console — a minimal virtio 1.x modern-PCI console driver with MULTIPORT (spec 1.2 §4.1 PCI
 * transport, §5.3 console device, split virtqueues), polled, and on its one named port a minimal SPICE guest
 * agent (spice-protocol's vd_agent.h) that shares the clipboard as UTF-8 text and reports the host's
 * monitors configuration, driven by words on the kernel command line. It plays spice-vdagent's part for
 * `porthole-vmm --agent spice` and for QEMU's `-chardev qemu-vdagent,clipboard=on` behind
 * `-device virtserialport,name=com.redhat.spice.0`.
 *
 * Start-up: PIT started as the time base (pit_ticks), 8259s remapped and fully masked, spurious gates set.
 * PCI bus 0, devices 0-31, function 0 are scanned for the first 1AF4:1043 (modern virtio-console; QEMU's
 * virtio-serial-pci is that only with disable-legacy=on, else it is the transitional 1AF4:1003, not looked
 * for). Capabilities and BARs as in virtio-blk.S (lib.S: virtio_pci_caps). Device init: reset, ACKNOWLEDGE,
 * DRIVER, features: VIRTIO_F_VERSION_1 (bit 32, required) and VIRTIO_CONSOLE_F_MULTIPORT (1, required),
 * FEATURES_OK (checked); queues 2 (control receive), 3 (control transmit), 4 and 5 (port 1's receive and
 * transmit) with min(queue_size, 16) entries each in one static 4 KiB page per queue; queues 0 and 1 (port
 * 0, the legacy console) are left disabled; DRIVER_OK. On a failure after the reset, FAILED (0x80) is set.
 * The avail rings' flags are VIRTQ_AVAIL_F_NO_INTERRUPT: every queue is polled (no interrupt is used).
 *
 * Transmit queues (3, 5): one buffer at a time in descriptor 0, the used idx polled for 5 s (PIT). Receive
 * queues: control 8 buffers of 128 bytes (one control message each), port 16 buffers of 64 bytes (a byte
 * stream: the host's messages are reassembled across buffers, whatever the cut); every buffer the device
 * returns is handled and posted again. While the guest waits for something (pump_wait) it handles both
 * receive queues: control messages DEVICE_ADD (the port id), PORT_NAME (the name, up to a NUL, at most 63
 * bytes) and PORT_OPEN (the host end's state) for that id are recorded, others counted and dropped; agent
 * messages are handled as below.
 *
 * Port handshake (control messages {u32 id, u16 event, u16 value}): control receive buffers posted;
 * DEVICE_READY(0, 1); wait 5 s for DEVICE_ADD(N, 1); N must be 1 (port N's queues are 2(N+1), 2(N+1)+1 and
 * only 4 and 5 are set up); port receive buffers posted; PORT_READY(N, 1); wait 5 s for PORT_NAME(N) and
 * then up to 5 s for PORT_OPEN(N) (the host end; either order, separate buffers); PORT_OPEN(N, 1) (a guest
 * program opened the port).
 *
 * Agent protocol on the port (little-endian): chunks {u32 port 1, u32 size} + payload; the payloads form
 * messages {u32 protocol 1, u32 type, u64 opaque 0, u32 size} + data (the first 512 data bytes of each kept).
 * The guest sends each message in one chunk. Capabilities announced: CLIPBOARD_BY_DEMAND (5) and
 * MONITORS_CONFIG (1), so no selection byte (CLIPBOARD_SELECTION, 6) and no grab serial
 * (CLIPBOARD_GRAB_SERIAL, 17) is used either way. Handled from the host, at any time:
 *   ANNOUNCE_CAPABILITIES (6)  {request, caps...}: the host's caps kept; request != 0 is answered at once
 *                              with ours (request 0)
 *   CLIPBOARD_GRAB (7)         {types...}: the host owns the clipboard now (the guest's text is no longer
 *                              offered); with UTF8_TEXT (1) among the types, `paste` sees it
 *   CLIPBOARD_REQUEST (8)      {type}: answered at once with CLIPBOARD {type, the copied text} while the
 *                              guest owns the clipboard and type is UTF8_TEXT, else CLIPBOARD {type} empty
 *   CLIPBOARD (4)              {type, data}: kept for `paste`
 *   MONITORS_CONFIG (2)        {u32 count, u32 flags, then per monitor u32 height, width, depth, i32 x, y}:
 *                              the count and the first monitor's height, width and depth kept for
 *                              `monitor` (0 for a monitor the message does not hold whole; a message
 *                              shorter than 8 bytes is dropped)
 *   CLIPBOARD_RELEASE (9) and anything else: dropped
 * After the handshake the guest announces itself (request 1) and waits 5 s for the host's announcement.
 *
 * Serial (COM1), lines:
 *   AGENT none                                (no 1AF4:1043 on bus 0; then `AGENT done`)
 *   AGENT error=<reason>                      (initialisation refused: the reasons of virtio-blk.S,
 *                                              no-multiport, no-queue; then `AGENT done`)
 *   AGENT found max-ports=<device config max_nr_ports, offset 4>
 *   AGENT error=port-id id=<N>                (DEVICE_ADD named another port than 1)
 *   AGENT port id=<N> name=<PORT_NAME's text> host-open=<PORT_OPEN's value, 0 if none came>
 *   AGENT connected by-demand=<the host's CLIPBOARD_BY_DEMAND bit> host-caps=0x<its first caps word, 8 hex>
 * then the command-line words (hvm_start_info.cmdline_paddr, offset 24; separated by spaces or control
 * characters), left to right:
 *   copy=TEXT       1..256 bytes (else bad-word): the guest owns the clipboard with TEXT: sends GRAB
 *                   {UTF8_TEXT}, waits up to 20 s for the host's CLIPBOARD_REQUEST (answered with TEXT as
 *                   above; porthole-vmm asks at once, QEMU when a VNC client asks for the text):
 *                   `AGENT copy request=<the type asked for> sent=<text bytes in the answer>`
 *   paste           `AGENT paste waiting`, then waits up to 20 s for the host's GRAB with UTF8_TEXT (a VNC
 *                   client's clipboard text), sends CLIPBOARD_REQUEST {UTF8_TEXT}, waits 5 s for CLIPBOARD:
 *                   `AGENT paste-data type=<its type> bytes=<its data bytes>` and `AGENT paste text=<the
 *                   text up to a NUL; bytes outside 0x20-0x7E shown as ?>` (QEMU's text from a VNC client's
 *                   extended clipboard keeps that message's NUL: one byte more than porthole-vmm's)
 *   monitor         `AGENT monitor waiting`, then waits up to 20 s for the host's MONITORS_CONFIG (one
 *                   that came since the start or the last `monitor` counts; porthole-vmm sends one when a
 *                   VNC client's SetDesktopSize reaches the agent): `AGENT monitor count=<its count>
 *                   width=<the first monitor's width> height=<its height> depth=<its depth>`
 *   anything else   `AGENT bad-word <word>`
 * Timeouts print `AGENT timeout <what>` (device-add, port-name, announce, copy-request, paste-grab,
 * paste-data, monitor) or `AGENT timeout send queue=<index>` (a transmit buffer the device never
 * completed); after a set-up timeout the words are skipped. Finally `AGENT done`, and guest_main returns
 * (power-off).
 */
    .include "virtio.inc"
    .set CONSOLE_ID, 0x10431AF4     /* device 0x1043 << 16 | vendor 0x1AF4 */
    .set QMAX, 16                   /* queue entries used at most */
    .set F_MULTIPORT, 2             /* VIRTIO_CONSOLE_F_MULTIPORT */
    .set TICKS_5S, 5 * 1193182      /* PIT input-clock ticks */
    .set TICKS_20S, 20 * 1193182

    /* Control events */
    .set EV_DEVICE_READY, 0
    .set EV_DEVICE_ADD, 1
    .set EV_PORT_READY, 3
    .set EV_PORT_OPEN, 6
    .set EV_PORT_NAME, 7

    /* Agent messages, clipboard type, our capabilities */
    .set MSG_MONITORS, 2
    .set MSG_CLIPBOARD, 4
    .set MSG_ANNOUNCE, 6
    .set MSG_GRAB, 7
    .set MSG_REQUEST, 8
    .set MSG_RELEASE, 9
    .set UTF8_TEXT, 1
    .set OUR_CAPS, (1 << 1) | (1 << 5)  /* MONITORS_CONFIG, CLIPBOARD_BY_DEMAND */

    .set CRX_COUNT, 8               /* control receive buffers */
    .set CRX_SIZE, 128
    .set PRX_COUNT, 16              /* port receive buffers */
    .set PRX_SIZE, 64
    .set BODY_MAX, 512              /* data bytes kept of a host message */
    .set TEXT_MAX, 256              /* copy=TEXT */
    .set NAME_MAX, 63

    /* A queue: ring page, notification address, receive buffers and their size, size, next avail idx, last
       used idx seen, index */
    .set Q_RING, 0
    .set Q_NOTIFY, 8
    .set Q_BUFS, 16
    .set Q_BUFSZ, 24
    .set Q_SIZE, 28
    .set Q_AVAIL, 30
    .set Q_USED, 32
    .set Q_INDEX, 34
    .set Q_LEN, 40

    /* caps: the structures as virtio_pci_caps writes them */
    .set CAP_COMMON, 0
    .set CAP_DEVCFG, 24

    .text
    .code64
    .globl guest_main
guest_main:
    SAVE
    call driver_start
    movl $CONSOLE_ID, %edi
    xorl %esi, %esi
    call pci_find
    testl %eax, %eax
    jnz 1f
    leaq msg_none(%rip), %rdi
    call serial_puts
    jmp 9f
1:  movl %eax, dev_cfg(%rip)
    call con_init
    testq %rax, %rax
    jz 2f
    movq %rax, %rbx
    leaq msg_error(%rip), %rdi
    call serial_puts
    movq %rbx, %rdi
    call serial_puts
    call newline
    jmp 9f
2:  leaq msg_found(%rip), %rdi
    movq caps + CAP_DEVCFG(%rip), %rax
    movl 4(%rax), %esi              /* max_nr_ports */
    call put_kv
    call newline
    call port_setup
    testl %eax, %eax
    jz 9f
    leaq cmd_table(%rip), %rdi      /* the command-line words */
    leaq msg_badword(%rip), %rsi
    leaq msg_agent_done(%rip), %rdx
    call run_words
    jmp cmd_ok                      /* restores the callee-saved registers and returns: power-off */
9:  leaq msg_agent_done(%rip), %rdi
    call serial_puts
    jmp cmd_ok

/* ---- Device set-up ---- */

/* con_init() -> %rax = 0 with the device running (DRIVER_OK), or an error text */
con_init:
    pushq %r12
    movl dev_cfg(%rip), %edi
    leaq caps(%rip), %rsi
    call virtio_pci_caps
    testq %rax, %rax
    jnz 9f
    movq caps + CAP_COMMON(%rip), %r12
    movq %r12, %rdi
    call virtio_reset               /* reset, ACKNOWLEDGE, DRIVER */
    testl %eax, %eax
    leaq err_reset(%rip), %rax
    jnz 9f
    movq %r12, %rdi
    movl $F_MULTIPORT, %esi
    call virtio_features
    testq %rax, %rax
    jnz 8f
    testl $F_MULTIPORT, %edx
    leaq err_multiport(%rip), %rax
    jz 8f
    leaq q_crx(%rip), %rdi
    movl $2, %esi
    leaq ring_crx(%rip), %rdx
    call queue_init
    testl %eax, %eax
    jz 7f
    leaq q_ctx(%rip), %rdi
    movl $3, %esi
    leaq ring_ctx(%rip), %rdx
    call queue_init
    testl %eax, %eax
    jz 7f
    leaq q_prx(%rip), %rdi
    movl $4, %esi
    leaq ring_prx(%rip), %rdx
    call queue_init
    testl %eax, %eax
    jz 7f
    leaq q_ptx(%rip), %rdi
    movl $5, %esi
    leaq ring_ptx(%rip), %rdx
    call queue_init
    testl %eax, %eax
    jz 7f
    movb $0x0F, C_STATUS(%r12)      /* | DRIVER_OK */
    xorl %eax, %eax
    popq %r12
    ret
7:  leaq err_noqueue(%rip), %rax
8:  orb $0x80, C_STATUS(%r12)       /* FAILED */
9:  popq %r12
    ret

/* queue_init(%rdi = queue, %esi = index, %rdx = ring page) -> %eax = its size (0: no such queue). The avail
   ring's flags <- VIRTQ_AVAIL_F_NO_INTERRUPT. */
queue_init:
    pushq %rbx
    movq %rdi, %rbx
    movq %rdx, Q_RING(%rbx)
    movw %si, Q_INDEX(%rbx)
    movw $0, Q_AVAIL(%rbx)
    movw $0, Q_USED(%rbx)
    movq %rdx, %rcx
    leaq caps(%rip), %rdi
    movl $QMAX, %edx
    call virtio_queue_setup
    testl %eax, %eax
    jz 1f
    movw %ax, Q_SIZE(%rbx)
    movq %rdx, Q_NOTIFY(%rbx)
    movq Q_RING(%rbx), %rcx
    movw $1, R_AVAIL(%rcx)
1:  popq %rbx
    ret

/* q_notify(%rdi = queue): the queue's index written to its notification address */
q_notify:
    mfence                          /* avail idx before the notification */
    movq Q_NOTIFY(%rdi), %rax
    movzwl Q_INDEX(%rdi), %ecx
    movw %cx, (%rax)
    ret

/* rx_post_all(%rdi = queue, %rsi = buffers, %edx = buffer size, %ecx = count, at most the queue size):
   descriptor i <- buffer i (device-writable), avail ring <- 0..count-1, notified */
rx_post_all:
    movq %rsi, Q_BUFS(%rdi)
    movl %edx, Q_BUFSZ(%rdi)
    movzwl Q_SIZE(%rdi), %eax
    cmpl %eax, %ecx
    jbe 1f
    movl %eax, %ecx
1:  movq Q_RING(%rdi), %r8
    xorl %r9d, %r9d
2:  movl %r9d, %eax
    imull %edx, %eax
    addq %rsi, %rax
    movl %r9d, %r10d
    shll $4, %r10d
    movq %rax, R_DESC(%r8,%r10)
    movl %edx, R_DESC + 8(%r8,%r10)
    movw $F_WRITE, R_DESC + 12(%r8,%r10)
    movw $0, R_DESC + 14(%r8,%r10)
    movw %r9w, R_AVAIL + 4(%r8,%r9,2)
    incl %r9d
    cmpl %ecx, %r9d
    jb 2b
    sfence                          /* descriptors and ring before the idx */
    movw %cx, R_AVAIL + 2(%r8)
    movw %cx, Q_AVAIL(%rdi)
    jmp q_notify

/* tx_send(%rdi = queue, %rsi = buffer, %edx = length) -> %eax = 1 once the device completed it, 0 after
   5 s (`AGENT timeout send queue=<index>` printed) */
tx_send:
    pushq %rbx
    movq %rdi, %rbx
    movq Q_RING(%rbx), %r8
    movq %rsi, R_DESC(%r8)
    movl %edx, R_DESC + 8(%r8)
    movl $0, R_DESC + 12(%r8)       /* flags 0, next 0 */
    movzwl Q_AVAIL(%rbx), %eax
    movl %eax, %r9d
    movzwl Q_SIZE(%rbx), %ecx
    xorl %edx, %edx
    divl %ecx                       /* %edx = idx % queue size */
    movw $0, R_AVAIL + 4(%r8,%rdx,2)
    incl %r9d
    sfence
    movw %r9w, R_AVAIL + 2(%r8)
    movw %r9w, Q_AVAIL(%rbx)
    movq %rbx, %rdi
    call q_notify
    movq Q_RING(%rbx), %rdi
    addq $R_USED + 2, %rdi
    leaq Q_USED(%rbx), %rsi
    movl $TICKS_5S, %edx
    call wait_idx
    testl %eax, %eax
    jz 1f
    movw %dx, Q_USED(%rbx)
    popq %rbx
    ret
1:  leaq tmo_send(%rip), %rdi
    movzwl Q_INDEX(%rbx), %esi
    call put_kv
    call newline
    xorl %eax, %eax
    popq %rbx
    ret

/* rx_poll(%rdi = receive queue, %rsi = handler(%rdi = buffer, %esi = length)): every buffer the device
   returned is handed to the handler and posted again; the queue is notified when buffers were posted */
rx_poll:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    movq %rdi, %rbx
    movq %rsi, %r12
    xorl %r14d, %r14d               /* posted again: any */
1:  movq Q_RING(%rbx), %r8
    movzwl R_USED + 2(%r8), %eax
    cmpw Q_USED(%rbx), %ax
    je 3f
    lfence                          /* used idx before the used entries and the buffers */
    movzwl Q_USED(%rbx), %eax
    movzwl Q_SIZE(%rbx), %ecx
    xorl %edx, %edx
    divl %ecx
    movl R_USED + 4(%r8,%rdx,8), %r13d  /* id */
    movl R_USED + 8(%r8,%rdx,8), %esi   /* length written */
    incw Q_USED(%rbx)
    cmpl %ecx, %r13d                /* not one of ours: skipped */
    jae 1b
    movl Q_BUFSZ(%rbx), %eax
    cmpl %eax, %esi
    jbe 2f
    movl %eax, %esi
2:  imull %r13d, %eax
    movq Q_BUFS(%rbx), %rdi
    addq %rax, %rdi
    call *%r12
    movq Q_RING(%rbx), %r8          /* the buffer goes back */
    movzwl Q_AVAIL(%rbx), %eax
    movzwl Q_SIZE(%rbx), %ecx
    xorl %edx, %edx
    divl %ecx
    movw %r13w, R_AVAIL + 4(%r8,%rdx,2)
    incw Q_AVAIL(%rbx)
    movl $1, %r14d
    jmp 1b
3:  testl %r14d, %r14d
    jz 4f
    movq Q_RING(%rbx), %r8
    movzwl Q_AVAIL(%rbx), %eax
    sfence
    movw %ax, R_AVAIL + 2(%r8)
    movq %rbx, %rdi
    call q_notify
4:  popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* ---- Control messages ---- */

/* ctrl_send(%edi = id, %esi = event, %edx = value) -> %eax as tx_send */
ctrl_send:
    movl %edi, ctrl_out(%rip)
    movw %si, ctrl_out + 4(%rip)
    movw %dx, ctrl_out + 6(%rip)
    leaq q_ctx(%rip), %rdi
    leaq ctrl_out(%rip), %rsi
    movl $8, %edx
    jmp tx_send

/* ctrl_msg(%rdi = buffer, %esi = length): one control message from the device, recorded */
ctrl_msg:
    cmpl $8, %esi
    jb 9f
    movl (%rdi), %eax               /* id */
    movzwl 4(%rdi), %ecx            /* event */
    movzwl 6(%rdi), %edx            /* value */
    cmpl $EV_DEVICE_ADD, %ecx
    jne 1f
    cmpl $1, %edx
    jne 8f
    movl %eax, port_id(%rip)
    movb $1, port_added(%rip)
    ret
1:  cmpl port_id(%rip), %eax
    jne 8f
    cmpl $EV_PORT_NAME, %ecx
    jne 4f
    movl %esi, %r8d                 /* the name: after the header, up to a NUL */
    subl $8, %r8d
    cmpl $NAME_MAX, %r8d
    jbe 2f
    movl $NAME_MAX, %r8d
2:  leaq 8(%rdi), %rsi
    leaq port_name(%rip), %r9
3:  testl %r8d, %r8d
    jz 31f
    movb (%rsi), %al
    testb %al, %al
    jz 31f
    movb %al, (%r9)
    incq %rsi
    incq %r9
    decl %r8d
    jmp 3b
31: movb $0, (%r9)
    movb $1, name_seen(%rip)
    ret
4:  cmpl $EV_PORT_OPEN, %ecx
    jne 8f
    movl %edx, host_open(%rip)
    movb $1, host_open_seen(%rip)
    ret
8:  incl ctrl_other(%rip)
9:  ret

/* ---- The agent's byte stream ---- */

/* port_bytes(%rdi = buffer, %esi = length): bytes from the port, fed to the chunk and message parser */
port_bytes:
    pushq %rbx
    pushq %r12
    movq %rdi, %rbx
    movl %esi, %r12d
1:  testl %r12d, %r12d
    jz 9f
    movzbl (%rbx), %edi
    incq %rbx
    decl %r12d
    movl chunk_left(%rip), %eax
    testl %eax, %eax
    jnz 2f
    movl chdr_n(%rip), %ecx         /* a chunk header byte */
    leaq chdr(%rip), %rdx
    movb %dil, (%rdx,%rcx)
    incl %ecx
    movl %ecx, chdr_n(%rip)
    cmpl $8, %ecx
    jb 1b
    movl $0, chdr_n(%rip)
    movl chdr + 4(%rip), %eax       /* chunk size (the port, 1, is not checked) */
    movl %eax, chunk_left(%rip)
    jmp 1b
2:  decl %eax
    movl %eax, chunk_left(%rip)
    call msg_byte
    jmp 1b
9:  popq %r12
    popq %rbx
    ret

/* msg_byte(%edi = byte): one byte of a chunk's payload */
msg_byte:
    movl mhdr_n(%rip), %ecx
    cmpl $20, %ecx
    jae 2f
    leaq mhdr(%rip), %rdx           /* a message header byte */
    movb %dil, (%rdx,%rcx)
    incl %ecx
    movl %ecx, mhdr_n(%rip)
    cmpl $20, %ecx
    jb 9f
    movl mhdr + 16(%rip), %eax      /* size */
    movl %eax, body_left(%rip)
    movl $0, body_n(%rip)
    testl %eax, %eax
    jz msg_done
    ret
2:  movl body_n(%rip), %ecx         /* a data byte: kept while there is room */
    cmpl $BODY_MAX, %ecx
    jae 3f
    leaq body(%rip), %rdx
    movb %dil, (%rdx,%rcx)
    incl %ecx
    movl %ecx, body_n(%rip)
3:  decl body_left(%rip)
    jz msg_done
9:  ret

/* msg_done(): a whole message from the host (type mhdr + 4, size mhdr + 16, body_n bytes kept in body) */
msg_done:
    movl $0, mhdr_n(%rip)
    incl msgs_in(%rip)
    movl mhdr + 4(%rip), %eax
    movl mhdr + 16(%rip), %ecx
    movl body_n(%rip), %edx
    cmpl $MSG_ANNOUNCE, %eax
    jne 1f
    cmpl $8, %edx
    jb 9f
    movl body + 4(%rip), %eax
    movl %eax, host_caps(%rip)
    movb $1, got_announce(%rip)
    cmpl $0, body(%rip)             /* request: ours are due */
    je 9f
    movb $1, caps_due(%rip)
    ret
1:  cmpl $MSG_GRAB, %eax
    jne 2f
    movb $0, own_valid(%rip)        /* the host's clipboard now */
    shrl $2, %edx
    leaq body(%rip), %rsi
11: testl %edx, %edx
    jz 9f
    cmpl $UTF8_TEXT, (%rsi)
    je 12f
    addq $4, %rsi
    decl %edx
    jmp 11b
12: movb $1, got_grab(%rip)
    ret
2:  cmpl $MSG_REQUEST, %eax
    jne 3f
    cmpl $4, %edx
    jb 9f
    movl body(%rip), %eax
    movl %eax, req_type(%rip)
    movb $1, got_request(%rip)
    movb $1, request_due(%rip)
    ret
3:  cmpl $MSG_CLIPBOARD, %eax
    jne 4f
    cmpl $4, %edx
    jb 9f
    movl body(%rip), %eax
    movl %eax, clip_type(%rip)
    subl $4, %ecx
    movl %ecx, clip_size(%rip)      /* the data's size (more than kept when long) */
    subl $4, %edx
    movl %edx, clip_kept(%rip)
    movl %edx, %ecx                 /* kept here, before later messages reuse body */
    leaq body + 4(%rip), %rsi
    leaq clip_text(%rip), %rdi
    rep movsb
    movb $1, got_clip(%rip)
    ret
4:  cmpl $MSG_MONITORS, %eax
    jne 9f
    cmpl $8, %edx                   /* {count, flags}, then the first monitor's {height, width, depth} */
    jb 9f
    movl body(%rip), %eax
    movl %eax, mon_count(%rip)
    xorl %eax, %eax
    xorl %ecx, %ecx
    xorl %esi, %esi
    cmpl $20, %edx
    jb 41f
    movl body + 8(%rip), %eax
    movl body + 12(%rip), %ecx
    movl body + 16(%rip), %esi
41: movl %eax, mon_height(%rip)
    movl %ecx, mon_width(%rip)
    movl %esi, mon_depth(%rip)
    movb $1, got_monitor(%rip)
9:  ret

/* agent_send(%edi = type, %rsi = data, %edx = length <= TEXT_MAX + 4) -> %eax as tx_send: one chunk, one
   message */
agent_send:
    leaq tx_buf(%rip), %r8
    movl $1, 0(%r8)                 /* chunk: the client port */
    leal 20(%rdx), %eax
    movl %eax, 4(%r8)
    movl $1, 8(%r8)                 /* message: protocol 1, type, opaque 0, size */
    movl %edi, 12(%r8)
    movq $0, 16(%r8)
    movl %edx, 24(%r8)
    leaq 28(%r8), %rdi
    movl %edx, %ecx
    rep movsb
    leaq q_ptx(%rip), %rdi
    leaq tx_buf(%rip), %rsi
    addl $28, %edx
    jmp tx_send

/* send_announce(%edi = request): ANNOUNCE_CAPABILITIES {request, OUR_CAPS} */
send_announce:
    movl %edi, ann_out(%rip)
    movl $OUR_CAPS, ann_out + 4(%rip)
    movl $MSG_ANNOUNCE, %edi
    leaq ann_out(%rip), %rsi
    movl $8, %edx
    jmp agent_send

/* service_due(): the answers the host's messages asked for: our capabilities, the clipboard's data */
service_due:
    cmpb $0, caps_due(%rip)
    je 1f
    movb $0, caps_due(%rip)
    xorl %edi, %edi
    call send_announce
1:  cmpb $0, request_due(%rip)
    je 9f
    movb $0, request_due(%rip)
    movl req_type(%rip), %eax       /* CLIPBOARD {type, text}: the text is kept at clip_out + 4 */
    movl %eax, clip_out(%rip)
    xorl %edx, %edx
    cmpl $UTF8_TEXT, %eax
    jne 2f
    cmpb $0, own_valid(%rip)
    je 2f
    movl own_len(%rip), %edx
2:  movl %edx, sent_len(%rip)
    addl $4, %edx
    movl $MSG_CLIPBOARD, %edi
    leaq clip_out(%rip), %rsi
    call agent_send
9:  ret

/* pump_wait(%rdi = address of a flag byte, %esi = timeout in PIT ticks) -> %eax = 1 as soon as the flag is
   non-zero, 0 on timeout. Meanwhile both receive queues are handled (64 polls between PIT reads). */
pump_wait:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    movq %rdi, %rbx
    movl %esi, %r12d
    call pit_ticks
    movq %rax, %r13
1:  movl $64, %r14d
2:  movq q_crx + Q_RING(%rip), %rax
    movzwl R_USED + 2(%rax), %eax
    cmpw q_crx + Q_USED(%rip), %ax
    je 3f
    leaq q_crx(%rip), %rdi
    leaq ctrl_msg(%rip), %rsi
    call rx_poll
3:  movq q_prx + Q_RING(%rip), %rax
    movzwl R_USED + 2(%rax), %eax
    cmpw q_prx + Q_USED(%rip), %ax
    je 4f
    leaq q_prx(%rip), %rdi
    leaq port_bytes(%rip), %rsi
    call rx_poll
    call service_due
4:  cmpb $0, (%rbx)
    jne 8f
    pause
    decl %r14d
    jnz 2b
    call pit_ticks
    subq %r13, %rax
    cmpq %r12, %rax
    jb 1b
    xorl %eax, %eax
    jmp 9f
8:  movl $1, %eax
9:  popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* put_text(%rdi = text, %esi = most bytes): up to a NUL, bytes outside 0x20-0x7E as '?' */
put_text:
    pushq %rbx
    pushq %r12
    movq %rdi, %rbx
    movl %esi, %r12d
1:  testl %r12d, %r12d
    jle 9f
    movzbl (%rbx), %edi
    testl %edi, %edi
    jz 9f
    cmpl $0x20, %edi
    jb 2f
    cmpl $0x7E, %edi
    jbe 3f
2:  movl $'?', %edi
3:  call serial_putc
    incq %rbx
    decl %r12d
    jmp 1b
9:  popq %r12
    popq %rbx
    ret

/* port_setup() -> %eax = 1 with the port open on both ends and the agents introduced, else 0 (a timeout or
   an error line printed) */
port_setup:
    movl $-1, port_id(%rip)
    leaq q_crx(%rip), %rdi
    leaq crx_bufs(%rip), %rsi
    movl $CRX_SIZE, %edx
    movl $CRX_COUNT, %ecx
    call rx_post_all
    xorl %edi, %edi
    movl $EV_DEVICE_READY, %esi
    movl $1, %edx
    call ctrl_send
    testl %eax, %eax
    jz 8f
    leaq port_added(%rip), %rdi
    movl $TICKS_5S, %esi
    call pump_wait
    testl %eax, %eax
    leaq tmo_add(%rip), %rdi
    jz 7f
    cmpl $1, port_id(%rip)
    je 1f
    leaq msg_bad_port(%rip), %rdi
    movl port_id(%rip), %esi
    call put_kv
    call newline
    jmp 8f
1:  leaq q_prx(%rip), %rdi
    leaq prx_bufs(%rip), %rsi
    movl $PRX_SIZE, %edx
    movl $PRX_COUNT, %ecx
    call rx_post_all
    movl port_id(%rip), %edi
    movl $EV_PORT_READY, %esi
    movl $1, %edx
    call ctrl_send
    testl %eax, %eax
    jz 8f
    leaq name_seen(%rip), %rdi
    movl $TICKS_5S, %esi
    call pump_wait
    testl %eax, %eax
    leaq tmo_name(%rip), %rdi
    jz 7f
    leaq host_open_seen(%rip), %rdi
    movl $TICKS_5S, %esi
    call pump_wait
    leaq msg_port(%rip), %rdi
    movl port_id(%rip), %esi
    call put_kv
    leaq msg_name(%rip), %rdi
    call serial_puts
    leaq port_name(%rip), %rdi
    movl $NAME_MAX, %esi
    call put_text
    leaq msg_host_open(%rip), %rdi
    movl host_open(%rip), %esi
    call put_kv
    call newline
    movl port_id(%rip), %edi
    movl $EV_PORT_OPEN, %esi
    movl $1, %edx
    call ctrl_send
    testl %eax, %eax
    jz 8f
    movl $1, %edi                   /* ours, asking for the host's */
    call send_announce
    testl %eax, %eax
    jz 8f
    leaq got_announce(%rip), %rdi
    movl $TICKS_5S, %esi
    call pump_wait
    testl %eax, %eax
    leaq tmo_announce(%rip), %rdi
    jz 7f
    leaq msg_connected(%rip), %rdi
    movl host_caps(%rip), %esi
    shrl $5, %esi                   /* CLIPBOARD_BY_DEMAND */
    andl $1, %esi
    call put_kv
    leaq msg_host_caps(%rip), %rdi
    call serial_puts
    movl host_caps(%rip), %edi
    movl $8, %esi
    call serial_puthex
    call newline
    movl $1, %eax
    ret
7:  call serial_puts
8:  xorl %eax, %eax
    ret

/* ---- Commands: (%rdi = arguments, %rsi = word end) -> %eax = 0, or 1 for a bad word ---- */

cmd_copy:
    SAVE
    movq %rsi, %rcx
    subq %rdi, %rcx
    jz cmd_bad
    cmpq $TEXT_MAX, %rcx
    ja cmd_bad
    movl %ecx, own_len(%rip)
    movq %rdi, %rsi
    leaq clip_out + 4(%rip), %rdi
    rep movsb
    movb $1, own_valid(%rip)
    movb $0, got_request(%rip)
    movl $0, sent_len(%rip)
    movl $UTF8_TEXT, type_out(%rip)
    movl $MSG_GRAB, %edi
    leaq type_out(%rip), %rsi
    movl $4, %edx
    call agent_send
    leaq got_request(%rip), %rdi
    movl $TICKS_20S, %esi
    call pump_wait
    testl %eax, %eax
    jnz 1f
    leaq tmo_copy(%rip), %rdi
    call serial_puts
    jmp cmd_ok
1:  leaq msg_copy(%rip), %rdi
    movl req_type(%rip), %esi
    call put_kv
    leaq msg_sent(%rip), %rdi
    movl sent_len(%rip), %esi
    call put_kv
    call newline
    jmp cmd_ok

cmd_paste:
    SAVE
    leaq msg_paste_wait(%rip), %rdi
    call serial_puts
    leaq got_grab(%rip), %rdi
    movl $TICKS_20S, %esi
    call pump_wait
    testl %eax, %eax
    jnz 1f
    leaq tmo_grab(%rip), %rdi
    call serial_puts
    jmp cmd_ok
1:  movb $0, got_grab(%rip)
    movb $0, got_clip(%rip)
    movl $UTF8_TEXT, type_out(%rip)
    movl $MSG_REQUEST, %edi
    leaq type_out(%rip), %rsi
    movl $4, %edx
    call agent_send
    leaq got_clip(%rip), %rdi
    movl $TICKS_5S, %esi
    call pump_wait
    testl %eax, %eax
    jnz 2f
    leaq tmo_data(%rip), %rdi
    call serial_puts
    jmp cmd_ok
2:  leaq msg_paste_data(%rip), %rdi
    movl clip_type(%rip), %esi
    call put_kv
    leaq msg_bytes(%rip), %rdi
    movl clip_size(%rip), %esi
    call put_kv
    call newline
    leaq msg_paste(%rip), %rdi
    call serial_puts
    leaq clip_text(%rip), %rdi
    movl clip_kept(%rip), %esi
    call put_text
    call newline
    jmp cmd_ok

cmd_monitor:
    SAVE
    leaq msg_monitor_wait(%rip), %rdi
    call serial_puts
    leaq got_monitor(%rip), %rdi
    movl $TICKS_20S, %esi
    call pump_wait
    testl %eax, %eax
    jnz 1f
    leaq tmo_monitor(%rip), %rdi
    call serial_puts
    jmp cmd_ok
1:  movb $0, got_monitor(%rip)
    leaq msg_monitor(%rip), %rdi
    movl mon_count(%rip), %esi
    call put_kv
    leaq msg_width(%rip), %rdi
    movl mon_width(%rip), %esi
    call put_kv
    leaq msg_height(%rip), %rdi
    movl mon_height(%rip), %esi
    call put_kv
    leaq msg_depth(%rip), %rdi
    movl mon_depth(%rip), %esi
    call put_kv
    call newline
    jmp cmd_ok

    .section .rodata
    .p2align 3
cmd_table:
    .quad cmdn_copy, cmd_copy
    .quad cmdn_paste, cmd_paste
    .quad cmdn_monitor, cmd_monitor
    .quad 0, 0

cmdn_copy:          .asciz "copy="
cmdn_paste:         .asciz "paste"
cmdn_monitor:       .asciz "monitor"

msg_none:           .asciz "AGENT none\n"
msg_error:          .asciz "AGENT error="
msg_found:          .asciz "AGENT found max-ports="
msg_bad_port:       .asciz "AGENT error=port-id id="
msg_port:           .asciz "AGENT port id="
msg_name:           .asciz " name="
msg_host_open:      .asciz " host-open="
msg_connected:      .asciz "AGENT connected by-demand="
msg_host_caps:      .asciz " host-caps=0x"
msg_copy:           .asciz "AGENT copy request="
msg_sent:           .asciz " sent="
msg_paste_wait:     .asciz "AGENT paste waiting\n"
msg_paste_data:     .asciz "AGENT paste-data type="
msg_bytes:          .asciz " bytes="
msg_paste:          .asciz "AGENT paste text="
msg_monitor_wait:   .asciz "AGENT monitor waiting\n"
msg_monitor:        .asciz "AGENT monitor count="
msg_width:          .asciz " width="
msg_height:         .asciz " height="
msg_depth:          .asciz " depth="
msg_badword:        .asciz "AGENT bad-word "
msg_agent_done:     .asciz "AGENT done\n"
tmo_send:           .asciz "AGENT timeout send queue="
tmo_add:            .asciz "AGENT timeout device-add\n"
tmo_name:           .asciz "AGENT timeout port-name\n"
tmo_announce:       .asciz "AGENT timeout announce\n"
tmo_copy:           .asciz "AGENT timeout copy-request\n"
tmo_grab:           .asciz "AGENT timeout paste-grab\n"
tmo_data:           .asciz "AGENT timeout paste-data\n"
tmo_monitor:        .asciz "AGENT timeout monitor\n"
err_reset:          .asciz "reset-timeout"
err_multiport:      .asciz "no-multiport"
err_noqueue:        .asciz "no-queue"

    .section .bss
    .p2align 3
dev_cfg:                            /* config address of register 0 */
    .skip 4
port_id:                            /* from DEVICE_ADD; -1 before */
    .skip 4
host_open:                          /* the host end's PORT_OPEN value */
    .skip 4
host_caps:                          /* the host's first capability word */
    .skip 4
req_type:                           /* the type of the host's last CLIPBOARD_REQUEST */
    .skip 4
clip_type:                          /* the host's last CLIPBOARD: type, data size, bytes kept */
    .skip 4
clip_size:
    .skip 4
clip_kept:
    .skip 4
own_len:                            /* copy=TEXT's length (the text is at clip_out + 4) */
    .skip 4
sent_len:                           /* text bytes in the last CLIPBOARD answer */
    .skip 4
mon_count:                          /* the host's last MONITORS_CONFIG: count, the first monitor's size */
    .skip 4
mon_width:
    .skip 4
mon_height:
    .skip 4
mon_depth:
    .skip 4
msgs_in:                            /* whole messages from the host */
    .skip 4
ctrl_other:                         /* control messages not recorded */
    .skip 4
chdr_n:                             /* the parser: chunk header bytes so far, payload bytes left */
    .skip 4
chunk_left:
    .skip 4
mhdr_n:                             /* message header bytes so far, data bytes left, data bytes kept */
    .skip 4
body_left:
    .skip 4
body_n:
    .skip 4
type_out:                           /* one clipboard type, for GRAB and REQUEST */
    .skip 4
ctrl_out:                           /* a control message */
    .skip 8
ann_out:                            /* ANNOUNCE_CAPABILITIES data */
    .skip 8
chdr:
    .skip 8
mhdr:
    .skip 24
port_added:                         /* flags */
    .skip 1
name_seen:
    .skip 1
host_open_seen:
    .skip 1
got_announce:
    .skip 1
caps_due:
    .skip 1
got_grab:
    .skip 1
own_valid:                          /* the guest owns the clipboard (copy=) */
    .skip 1
got_request:
    .skip 1
request_due:
    .skip 1
got_clip:
    .skip 1
got_monitor:
    .skip 1
    .p2align 3
caps:                               /* common, notify, ISR, device config; notify_off_multiplier */
    .skip 40
q_crx:                              /* queues 2, 3, 4, 5 */
    .skip Q_LEN
q_ctx:
    .skip Q_LEN
q_prx:
    .skip Q_LEN
q_ptx:
    .skip Q_LEN
port_name:
    .skip NAME_MAX + 1
body:
    .skip BODY_MAX
clip_text:
    .skip BODY_MAX
clip_out:                           /* CLIPBOARD data: type, then copy=TEXT */
    .skip 4 + TEXT_MAX
tx_buf:                             /* chunk header, message header, data */
    .skip 28 + 4 + TEXT_MAX
    .p2align 6
crx_bufs:
    .skip CRX_COUNT * CRX_SIZE
prx_bufs:
    .skip PRX_COUNT * PRX_SIZE
    .p2align 12
ring_crx:
    .skip 4096
ring_ctx:
    .skip 4096
ring_prx:
    .skip 4096
ring_ptx:
    .skip 4096

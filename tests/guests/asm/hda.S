/* hda — a minimal Intel High Definition Audio driver (HDA spec 1.0a: §3 controller registers, §4.4 CORB and
 * RIRB, §4.5 stream descriptors and BDLs, §7 codec verbs), polled, that plays a 480 Hz square wave on the
 * controller's first output stream through codec 0's first output converter and an output pin fed by it.
 *
 * Start-up: PIT started as the time base (pit_ticks), 8259s remapped and fully masked, spurious gates set; an
 * exception prints `HDA FAIL exception vector=...` and powers off. The kernel command line's words:
 *   hda.periods=N   1 <= N <= 1000000: periods of 10 ms to play (default 100, one second)
 *   anything else   `HDA bad-word <word>` (also for a malformed or out-of-range N)
 *
 * The controller: PCI bus 0, devices 0-31, function 0, the first 8086:293E (ICH9 HDA; QEMU's ich9-intel-hda),
 * else the first 8086:2668 (ICH6; QEMU's intel-hda). BAR 0 must be a memory BAR below 4 GiB that the
 * firmware or the engine assigned (SeaBIOS does under QEMU's -kernel; porthole-vmm assigns its own): 0 is
 * `HDA FAIL bar-unassigned`, as lib.S's vpci_bar has it for the virtio guests. PCI command |= memory space |
 * bus master. Every register is accessed with its own width (QEMU's controller matches registers by offset
 * and size).
 *
 * Reset (§4.2): GCTL.CRST <- 0, read back 0 (100 ms), held 100 us; CRST <- 1, read back 1 (100 ms); then
 * 1 ms (>= 521 us, §4.3) before STATESTS, polled for bit 0 (codec 0) for 100 ms. STATESTS is cleared
 * (written back). INTCTL stays 0: no interrupt is ever raised; everything is polled.
 *
 * CORB and RIRB (§4.4.1, §4.4.2): 256 entries each (CORBSIZE/RIRBSIZE <- 2 after checking the capability
 * bit 6), static and 128-byte aligned; CORBRP reset (bit 15 <- 1, read back 1 for up to 1 ms, not required:
 * QEMU's reads back at once; <- 0, read back 0 for 10 ms), CORBWP <- 0, RIRBWP <- 0x8000 (reset),
 * RINTCNT <- 1, RIRBCTL <- DMA enable | RINTCTL (QEMU's CORB stops fetching once RINTCNT responses have
 * come, RINTCNT 0 at once, until RIRBSTS.RINTFL is cleared, and it sets RINTFL only with RINTCTL on: so
 * both are set and RINTFL is cleared after every response; INTCTL.GIE stays 0, so no interrupt is
 * delivered), CORBCTL <- CORBRUN
 * (read back, 10 ms). One verb at a time: the verb goes into CORB[WP + 1], CORBWP <- WP + 1; RIRBWP is
 * polled for 0.5 s until it differs from the last entry read; the entry after it is the response
 * (unsolicited responses, extended bit 4, are counted and skipped); RIRBSTS <- 0x05 (RINTFL | RIRBOIS).
 *
 * The codec (§7.3): root node 0's vendor id (parameter 0) and revision (2), its subordinate nodes (4); the
 * first function group of type 1 (audio, parameter 5) is the AFG; its subordinate nodes are the widgets.
 * For each widget: audio widget capabilities (9); with a connection list (caps bit 8) its length (0x0E, short
 * form; the long form is printed as conn=[long]) and its entries (0xF02, 4 per response, at most 8 kept);
 * for a pin, pin capabilities (0x0C) and configuration default (0xF1C); with an output amplifier (caps bit
 * 2), its capabilities (0x12; from the widget with caps bit 3, amp override, else from the AFG). The path
 * is the first audio output converter (type 0) and the first pin (type 4) that is output capable (pin caps
 * bit 4) and has the converter in its connection list. Then: power state D0 (0x705 0) on the AFG, the
 * converter and the pin; converter format (4-bit verb 0x2) 0x0011 (48 kHz, 16 bits, 2 channels);
 * converter stream/channel (0x706) 0x10 (stream 1, channel 0); the pin's connection select (0x701) when its
 * list has more than one entry; pin widget control (0x707) 0x40 (out enable); EAPD (0x70C 0x02) when the
 * pin has it (pin caps bit 16); every output amplifier on the path (converter, pin) set to 0 dB unmuted,
 * left and right (4-bit verb 0x3, payload 0xB000 | gain, gain = the caps' offset field, the step that is
 * 0 dB, at most its step count), read back (verb 0xB, payload 0xA000: output, left).
 *
 * The stream (§3.3.35-§3.3.45, §3.6.3): output stream descriptor 0, at 0x80 + 0x20 * ISS (GCAP). SRST <- 1
 * (read back 1 for up to 1 ms, not required: a descriptor may finish its reset at once; QEMU 7.2's reads
 * back 1), SRST <- 0 (read back 0, 10 ms). SDnCTL <- stream 1 (bits 23:20); BDL of TABLE_PERIODS entries
 * {address of table period k, 1920 bytes, IOC} (128-byte aligned), CBL 9600, LVI 4, FMT 0x0011; the DMA
 * position buffer (DPLBASE, 8 bytes per descriptor, input descriptors first) enabled; SDnSTS cleared; RUN
 * (IOCE off: BCIS is still set, §3.3.35; QEMU's controller starts no DMA transfer while it is set, though
 * one transfer may cross several entries and set it once). Then polled: LPIB (a decrease is a wrap of the
 * cyclic buffer), then SDnSTS (FIFOE or DESE: `HDA FAIL stream-error sts=0x..`; BCIS: counted and cleared
 * by writing 1); the periods played are (wraps * CBL + LPIB) / 1920; with no LPIB progress for 1 s,
 * `HDA FAIL stalled lpib=... sts=0x..`. Once N periods have played: RUN <- 0 (read back 0, 10 ms). The tone
 * is the one of virtio-sound.S: a square wave of 100 frames (50 at +8000, 50 at -8000, left and right, S16
 * little-endian), a static table of 5 periods of 480 frames (24 whole waves) so that the wave does not
 * break where the ring wraps.
 *
 * Serial (COM1), lines:
 *   HDA periods=<N>
 *   HDA pci slot=<device> id=8086:<device id> bar0=0x<8 hex>
 *   HDA gcap=0x<4 hex> vmaj=<n> vmin=<n> oss=<n> iss=<n> bss=<n> statests=0x<4 hex>
 *   HDA corbsize=0x<2 hex> rirbsize=0x<2 hex> corbrp-reset-seen=<0|1>
 *   HDA codec vendor=0x<8 hex> revision=0x<8 hex> nodes=<start>+<count>
 *   HDA afg node=<n> nodes=<start>+<count>
 *   HDA node <n> type=<out|in|mix|sel|pin|power|knob|beep|vendor|t<n>> caps=0x<8 hex> conn=[<n>,...]
 *       [pincaps=0x<8 hex> cfg=0x<8 hex>] [ampout=0x<8 hex>]           (one line per widget)
 *   HDA path dac=<n> pin=<n> select=<index in the pin's list>
 *   HDA dac fmt=0x<4 hex> conv=0x<2 hex> amp=0x<2 hex>                 (read back: 0xA, 0xF06, 0xB)
 *   HDA pin ctl=0x<2 hex> eapd=<0|1>                                   (read back: 0xF07)
 *   HDA stream sd=0x<3 hex> srst-seen=<0|1>
 *   HDA running
 *   HDA done periods=<N> ms=<RUN to the N-th period, PIT> lpib-wraps=<W> bcis=<BCIS seen> posbuf=<the
 *       position buffer's entry for the stream at the end> verbs=<verbs sent> unsolicited=<responses>
 * and on any failure `HDA FAIL <what>`, after which the guest powers off.
 */
    .include "virtio.inc"           /* SAVE, ARGS */
    .set HDA_ICH9, 0x293E8086       /* device 0x293E << 16 | vendor 0x8086 */
    .set HDA_ICH6, 0x26688086
    .set PIT_HZ, 1193182
    .set TICKS_MS, 1193             /* about 1 ms of PIT ticks */
    .set TICKS_VERB, PIT_HZ / 2     /* a codec's response */
    .set TICKS_STALL, PIT_HZ        /* no stream progress */

    /* Controller registers (§3.3) */
    .set GCAP, 0x00                 /* 16 */
    .set VMIN, 0x02                 /* 8 */
    .set VMAJ, 0x03                 /* 8 */
    .set GCTL, 0x08                 /* 32 */
    .set STATESTS, 0x0E             /* 16 */
    .set INTCTL, 0x20               /* 32 */
    .set CORBLBASE, 0x40            /* 32 */
    .set CORBUBASE, 0x44            /* 32 */
    .set CORBWP, 0x48               /* 16 */
    .set CORBRP, 0x4A               /* 16 */
    .set CORBCTL, 0x4C              /* 8 */
    .set CORBSIZE, 0x4E             /* 8 */
    .set RIRBLBASE, 0x50            /* 32 */
    .set RIRBUBASE, 0x54            /* 32 */
    .set RIRBWP, 0x58               /* 16 */
    .set RINTCNT, 0x5A              /* 16 */
    .set RIRBCTL, 0x5C              /* 8 */
    .set RIRBSTS, 0x5D              /* 8 */
    .set RIRBSIZE, 0x5E             /* 8 */
    .set DPLBASE, 0x70              /* 32 */
    .set DPUBASE, 0x74              /* 32 */
    /* Stream descriptor registers, from the descriptor's base */
    .set SD_CTL, 0x00               /* 32: the 24-bit SDnCTL, with SDnSTS (written 0) in the top byte */
    .set SD_STS, 0x03               /* 8 */
    .set SD_LPIB, 0x04              /* 32 */
    .set SD_CBL, 0x08               /* 32 */
    .set SD_LVI, 0x0C               /* 16 */
    .set SD_FMT, 0x12               /* 16 */
    .set SD_BDPL, 0x18              /* 32 */
    .set SD_BDPU, 0x1C              /* 32 */
    .set STS_BCIS, 0x04
    .set STS_ERRORS, 0x18           /* FIFOE, DESE */

    .set STREAM_TAG, 1
    .set FORMAT, 0x0011             /* 48 kHz, 16 bits, 2 channels */
    .set PERIOD_BYTES, 1920         /* 480 frames of 2 x S16: 10 ms at 48000 */
    .set TABLE_PERIODS, 5           /* 5 x 480 frames = 24 waves of 100 frames */
    .set CBL, PERIOD_BYTES * TABLE_PERIODS
    .set AMPLITUDE, 8000
    .set HALF_WAVE, 50              /* frames */
    .set MAX_NODES, 128             /* node ids are 7 bits */
    .set MAX_CONN, 8                /* connection entries kept per node */

    .text
    .code64
    .globl guest_main
guest_main:
    SAVE
    call driver_start
    leaq err_exception(%rip), %rax
    movq %rax, exception_fail_prefix(%rip)
    movq $100, periods(%rip)
    leaq cmd_table(%rip), %rdi
    leaq msg_badword(%rip), %rsi
    leaq msg_empty(%rip), %rdx
    call run_words
    leaq msg_periods(%rip), %rdi
    movq periods(%rip), %rsi
    call put_kv
    call newline

    call find_controller
    call controller_reset
    call rings_start
    call codec_walk
    call path_setup
    call stream_play

    /* ---- the summary ---- */
    leaq msg_done(%rip), %rdi
    movq played(%rip), %rsi
    call put_kv
    movq t_end(%rip), %rax          /* ms = ticks * 1000 / PIT_HZ */
    subq t_start(%rip), %rax
    imulq $1000, %rax
    xorl %edx, %edx
    movl $PIT_HZ, %ecx
    divq %rcx
    leaq msg_ms(%rip), %rdi
    movq %rax, %rsi
    call put_kv
    leaq msg_wraps(%rip), %rdi
    movq wraps(%rip), %rsi
    call put_kv
    leaq msg_bcis(%rip), %rdi
    movq bcis(%rip), %rsi
    call put_kv
    leaq msg_posbuf(%rip), %rdi
    movl iss(%rip), %eax
    leaq posbuf(%rip), %rcx
    movl (%rcx,%rax,8), %esi
    call put_kv
    leaq msg_verbs(%rip), %rdi
    movl verbs(%rip), %esi
    call put_kv
    leaq msg_unsol(%rip), %rdi
    movl unsolicited(%rip), %esi
    call put_kv
    call newline
    jmp cmd_ok                      /* restores the callee-saved registers and returns: power-off */

/* fail(%rdi = text): `HDA FAIL <text>`, power-off. Jumped to from anywhere (the stack is not unwound). */
fail:
    movq %rdi, %rbx
    leaq msg_fail(%rip), %rdi
    call serial_puts
    movq %rbx, %rdi
    call serial_puts
    call newline
    jmp poweroff

/* fail_hex(%rdi = text, %esi = value): `HDA FAIL <text>0x<8 hex>`, power-off */
fail_hex:
    movq %rdi, %rbx
    movl %esi, %r12d
    leaq msg_fail(%rip), %rdi
    call serial_puts
    movq %rbx, %rdi
    movl %r12d, %esi
    call put_hex8
    call newline
    jmp poweroff

/* ---- Output helpers ---- */

/* put_hexn(%rdi = text, %rsi = value, %edx = digits): the text, then 0x and that many hex digits */
put_hexn:
    pushq %rsi
    pushq %rdx
    call serial_puts
    leaq msg_0x(%rip), %rdi
    call serial_puts
    popq %rsi
    popq %rdi
    jmp serial_puthex

put_hex8:
    movl $8, %edx
    jmp put_hexn
put_hex4:
    movl $4, %edx
    jmp put_hexn
put_hex2:
    movl $2, %edx
    jmp put_hexn

/* ---- Timed polls ---- */

/* poll8(%rdi = register, %esi = mask, %edx = wanted value, %ecx = timeout in PIT ticks) -> %eax = 1 when
   (byte & mask) == wanted before the timeout, else 0. poll16 and poll32 likewise for their widths. */
poll8:
    movl $1, %eax
    jmp poll
poll16:
    movl $2, %eax
    jmp poll
poll32:
    movl $4, %eax
poll:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rbp
    movq %rdi, %rbx
    movl %esi, %r12d
    movl %edx, %r13d
    movl %ecx, %r14d
    movl %eax, %ebp
    call pit_ticks
    movq %rax, %r15
1:  cmpl $1, %ebp
    jne 2f
    movzbl (%rbx), %eax
    jmp 4f
2:  cmpl $2, %ebp
    jne 3f
    movzwl (%rbx), %eax
    jmp 4f
3:  movl (%rbx), %eax
4:  andl %r12d, %eax
    cmpl %r13d, %eax
    je 5f
    call pit_ticks
    subq %r15, %rax
    cmpq %r14, %rax
    jb 1b
    xorl %eax, %eax
    jmp 6f
5:  movl $1, %eax
6:  popq %rbp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* ---- The controller ---- */

/* find_controller(): the device, its BAR 0 (bar), PCI command |= memory space | bus master */
find_controller:
    pushq %rbx
    movl $HDA_ICH9, %edi
    xorl %esi, %esi
    call pci_find
    testl %eax, %eax
    jnz 1f
    movl $HDA_ICH6, %edi
    xorl %esi, %esi
    call pci_find
    leaq err_none(%rip), %rdi
    testl %eax, %eax
    jz fail
1:  movl %eax, %ebx                 /* config address of register 0 */
    leaq msg_pci(%rip), %rdi
    movl %ebx, %esi
    shrl $11, %esi
    andl $31, %esi
    call put_kv
    movl %ebx, %edi
    call pci_read
    shrl $16, %eax
    leaq msg_id(%rip), %rdi
    movl %eax, %esi
    movl $4, %edx
    call put_hexmin_n
    leal 0x10(%rbx), %edi           /* BAR 0 */
    call pci_read
    movl %eax, %r8d
    leaq err_iobar(%rip), %rdi
    testb $1, %al
    jnz fail
    andl $6, %eax
    cmpl $4, %eax                   /* 64-bit */
    jne 2f
    leal 0x14(%rbx), %edi
    call pci_read
    leaq err_above4g(%rip), %rdi
    testl %eax, %eax
    jnz fail
2:  andl $0xFFFFFFF0, %r8d
    leaq err_unassigned(%rip), %rdi
    jz fail
    movq %r8, bar(%rip)
    leaq msg_bar(%rip), %rdi
    movl %r8d, %esi
    call put_hex8
    call newline
    leal 0x04(%rbx), %edi           /* command (status above: write-1-to-clear, written 0) */
    call pci_read
    movzwl %ax, %esi
    orl $0x6, %esi                  /* memory space, bus master */
    leal 0x04(%rbx), %edi
    call pci_write
    popq %rbx
    ret

/* put_hexmin_n(%rdi = text, %esi = value, %edx = digits): the text and the value in that many hex digits,
   without 0x (for ids) */
put_hexmin_n:
    pushq %rsi
    pushq %rdx
    call serial_puts
    popq %rsi
    popq %rdi
    jmp serial_puthex

/* controller_reset(): GCTL.CRST 0 -> 1, codec 0 present in STATESTS; prints the gcap line; sets iss, oss */
controller_reset:
    pushq %rbx
    movq bar(%rip), %rbx
    movl $0, GCTL(%rbx)             /* enter reset */
    leaq GCTL(%rbx), %rdi
    movl $1, %esi
    xorl %edx, %edx
    movl $100 * TICKS_MS, %ecx
    call poll32
    leaq err_reset_enter(%rip), %rdi
    testl %eax, %eax
    jz fail
    movl $100, %edi                 /* the link reset is held at least 100 us */
    call delay_us
    movl $1, GCTL(%rbx)             /* leave reset */
    leaq GCTL(%rbx), %rdi
    movl $1, %esi
    movl $1, %edx
    movl $100 * TICKS_MS, %ecx
    call poll32
    leaq err_reset_exit(%rip), %rdi
    testl %eax, %eax
    jz fail
    movl $1000, %edi                /* codecs request their addresses within 521 us */
    call delay_us
    leaq STATESTS(%rbx), %rdi
    movl $1, %esi
    movl $1, %edx
    movl $100 * TICKS_MS, %ecx
    call poll16
    movzwl STATESTS(%rbx), %esi
    movl %esi, statests(%rip)
    leaq err_nocodec(%rip), %rdi
    testl %eax, %eax
    jz fail_hex
    movw %si, STATESTS(%rbx)        /* write 1 to clear */
    movl $0, INTCTL(%rbx)           /* no interrupts */
    movzwl GCAP(%rbx), %eax
    movl %eax, gcap(%rip)
    movl %eax, %ecx
    shrl $8, %ecx
    andl $15, %ecx
    movl %ecx, iss(%rip)
    movl %eax, %ecx
    shrl $12, %ecx
    movl %ecx, oss(%rip)
    leaq msg_gcap(%rip), %rdi
    movl gcap(%rip), %esi
    call put_hex4
    leaq msg_vmaj(%rip), %rdi
    movzbl VMAJ(%rbx), %esi
    call put_kv
    leaq msg_vmin(%rip), %rdi
    movzbl VMIN(%rbx), %esi
    call put_kv
    leaq msg_oss(%rip), %rdi
    movl oss(%rip), %esi
    call put_kv
    leaq msg_iss(%rip), %rdi
    movl iss(%rip), %esi
    call put_kv
    leaq msg_bss(%rip), %rdi
    movl gcap(%rip), %esi
    shrl $3, %esi
    andl $31, %esi
    call put_kv
    leaq msg_statests(%rip), %rdi
    movl statests(%rip), %esi
    call put_hex4
    call newline
    popq %rbx
    ret

/* rings_start(): CORB and RIRB set up and running (see the top of the file) */
rings_start:
    pushq %rbx
    movq bar(%rip), %rbx
    movb $0, CORBCTL(%rbx)          /* both DMA engines stopped (they are, after the reset) */
    movb $0, RIRBCTL(%rbx)
    movzbl CORBSIZE(%rbx), %eax
    leaq err_corbsize(%rip), %rdi
    testb $0x40, %al                /* 256 entries supported */
    jz fail
    movzbl RIRBSIZE(%rbx), %eax
    leaq err_rirbsize(%rip), %rdi
    testb $0x40, %al
    jz fail
    movb $2, CORBSIZE(%rbx)         /* 256 entries */
    movb $2, RIRBSIZE(%rbx)
    leaq corb(%rip), %rax
    movl %eax, CORBLBASE(%rbx)
    movl $0, CORBUBASE(%rbx)
    leaq rirb(%rip), %rax
    movl %eax, RIRBLBASE(%rbx)
    movl $0, RIRBUBASE(%rbx)
    movw $0x8000, CORBRP(%rbx)      /* CORBRPRST */
    leaq CORBRP(%rbx), %rdi
    movl $0x8000, %esi
    movl $0x8000, %edx
    movl $TICKS_MS, %ecx
    call poll16
    movl %eax, corbrp_seen(%rip)
    movw $0, CORBRP(%rbx)
    leaq CORBRP(%rbx), %rdi
    movl $0x8000, %esi
    xorl %edx, %edx
    movl $10 * TICKS_MS, %ecx
    call poll16
    leaq err_corbrp(%rip), %rdi
    testl %eax, %eax
    jz fail
    movw $0, CORBWP(%rbx)
    movw $0x8000, RIRBWP(%rbx)      /* RIRBWPRST */
    movw $1, RINTCNT(%rbx)
    movl $0, corb_wp(%rip)
    movl $0, rirb_rp(%rip)
    movb $0x03, RIRBCTL(%rbx)       /* RIRBDMAEN | RINTCTL */
    movb $0x02, CORBCTL(%rbx)       /* CORBRUN */
    leaq CORBCTL(%rbx), %rdi
    movl $2, %esi
    movl $2, %edx
    movl $10 * TICKS_MS, %ecx
    call poll8
    leaq err_corbrun(%rip), %rdi
    testl %eax, %eax
    jz fail
    leaq msg_corbsize(%rip), %rdi
    movzbl CORBSIZE(%rbx), %esi
    call put_hex2
    leaq msg_rirbsize(%rip), %rdi
    movzbl RIRBSIZE(%rbx), %esi
    call put_hex2
    leaq msg_corbrp_seen(%rip), %rdi
    movl corbrp_seen(%rip), %esi
    call put_kv
    call newline
    popq %rbx
    ret

/* cmd(%edi = node, %esi = verb and payload, bits 19:0) -> %eax = the response of codec 0. Sends one verb
   through the CORB and waits for its response in the RIRB (see the top of the file); keeps %rbx, %rbp,
   %r12-%r15. A timeout is `HDA FAIL verb-timeout cmd=0x<8 hex> corbrp=0x.. rirbwp=0x..`. */
cmd:
    pushq %rbx
    pushq %r12
    pushq %r13
    shll $20, %edi
    orl %esi, %edi
    movl %edi, %r12d                /* the command: codec 0 */
    movq bar(%rip), %rbx
    movl corb_wp(%rip), %ecx
    incl %ecx
    andl $0xFF, %ecx
    movl %ecx, corb_wp(%rip)
    leaq corb(%rip), %rax
    movl %r12d, (%rax,%rcx,4)
    sfence                          /* the entry before the write pointer */
    movw %cx, CORBWP(%rbx)
    incl verbs(%rip)
    call pit_ticks
    movq %rax, %r13
1:  movzwl RIRBWP(%rbx), %eax
    andl $0xFF, %eax
    cmpl rirb_rp(%rip), %eax
    jne 3f
    call pit_ticks
    subq %r13, %rax
    cmpq $TICKS_VERB, %rax
    jb 1b
    leaq msg_fail(%rip), %rdi       /* timeout */
    call serial_puts
    leaq msg_verb_timeout(%rip), %rdi
    movl %r12d, %esi
    call put_hex8
    leaq msg_corbrp(%rip), %rdi
    movzwl CORBRP(%rbx), %esi
    call put_hex4
    leaq msg_rirbwp(%rip), %rdi
    movzwl RIRBWP(%rbx), %esi
    call put_hex4
    call newline
    jmp poweroff
3:  lfence                          /* the write pointer before the entry */
    movl rirb_rp(%rip), %ecx
    incl %ecx
    andl $0xFF, %ecx
    movl %ecx, rirb_rp(%rip)
    leaq rirb(%rip), %rdx
    movl (%rdx,%rcx,8), %eax        /* response */
    movl 4(%rdx,%rcx,8), %edx       /* extended: bit 4 unsolicited, bits 3:0 codec */
    movb $0x05, RIRBSTS(%rbx)       /* RINTFL | RIRBOIS, write 1 to clear */
    testl $0x10, %edx
    jz 4f
    incl unsolicited(%rip)
    jmp 1b
4:  popq %r13
    popq %r12
    popq %rbx
    ret

/* param(%edi = node, %esi = parameter id) -> %eax: GET_PARAMETER (0xF00) */
param:
    orl $0xF0000, %esi
    jmp cmd

/* ---- The codec ---- */

/* codec_walk(): the root node, the AFG and a line per widget; sets afg, the node tables, dac and pin */
codec_walk:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    xorl %edi, %edi
    xorl %esi, %esi                 /* vendor id */
    call param
    movl %eax, %r12d
    xorl %edi, %edi
    movl $2, %esi                   /* revision id */
    call param
    movl %eax, %r13d
    xorl %edi, %edi
    movl $4, %esi                   /* subordinate node count */
    call param
    movl %eax, %r14d
    leaq msg_vendor(%rip), %rdi
    movl %r12d, %esi
    call put_hex8
    leaq msg_revision(%rip), %rdi
    movl %r13d, %esi
    call put_hex8
    movl %r14d, %edi
    call put_nodes
    call newline
    /* the first audio function group */
    movl %r14d, %ebx
    shrl $16, %ebx
    andl $0xFF, %ebx                /* start */
    movl %r14d, %r12d
    andl $0xFF, %r12d
    addl %ebx, %r12d                /* end */
1:  cmpl %r12d, %ebx
    jae 2f
    cmpl $MAX_NODES, %ebx
    jae 2f
    movl %ebx, %edi
    movl $5, %esi                   /* function group type */
    call param
    andl $0xFF, %eax
    cmpl $1, %eax                   /* audio */
    je 3f
    incl %ebx
    jmp 1b
2:  leaq err_noafg(%rip), %rdi
    jmp fail
3:  movl %ebx, afg(%rip)
    movl %ebx, %edi
    movl $4, %esi
    call param
    movl %eax, %r14d
    movl afg(%rip), %edi
    movl $0x12, %esi                /* the AFG's default output amplifier capabilities */
    call param
    movl %eax, afg_ampout(%rip)
    leaq msg_afg(%rip), %rdi
    movl afg(%rip), %esi
    call put_kv
    movl %r14d, %edi
    call put_nodes
    call newline
    /* the widgets */
    movl $-1, dac(%rip)
    movl $-1, pin(%rip)
    movl %r14d, %ebx
    shrl $16, %ebx
    andl $0xFF, %ebx
    movl %r14d, %r12d
    andl $0xFF, %r12d
    addl %ebx, %r12d
4:  cmpl %r12d, %ebx
    jae 5f
    cmpl $MAX_NODES, %ebx
    jae 5f
    movl %ebx, %edi
    call widget
    incl %ebx
    jmp 4b
5:  /* the path: the first output converter, the first output pin connected to it */
    movl %r14d, %ebx
    shrl $16, %ebx
    andl $0xFF, %ebx
6:  cmpl %r12d, %ebx
    jae 7f
    cmpl $MAX_NODES, %ebx
    jae 7f
    leaq node_caps(%rip), %rax
    movl (%rax,%rbx,4), %eax
    shrl $20, %eax
    andl $15, %eax
    jz 8f                           /* type 0: audio output */
    incl %ebx
    jmp 6b
7:  leaq err_nodac(%rip), %rdi
    jmp fail
8:  movl %ebx, dac(%rip)
    movl %r14d, %ebx
    shrl $16, %ebx
    andl $0xFF, %ebx
9:  cmpl %r12d, %ebx
    jae 12f
    cmpl $MAX_NODES, %ebx
    jae 12f
    leaq node_caps(%rip), %rax
    movl (%rax,%rbx,4), %eax
    shrl $20, %eax
    andl $15, %eax
    cmpl $4, %eax                   /* pin */
    jne 11f
    leaq node_pincaps(%rip), %rax
    testl $0x10, (%rax,%rbx,4)      /* output capable */
    jz 11f
    leaq node_nconn(%rip), %rax
    movzbl (%rax,%rbx), %ecx
    cmpl $MAX_CONN, %ecx
    jbe 10f
    movl $MAX_CONN, %ecx
10: leaq node_conn(%rip), %rax
    leaq (%rax,%rbx,MAX_CONN), %rax
    xorl %edx, %edx
101: cmpl %ecx, %edx
    jae 11f
    movzbl (%rax,%rdx), %esi
    cmpl dac(%rip), %esi
    je 13f
    incl %edx
    jmp 101b
11: incl %ebx
    jmp 9b
12: leaq err_nopin(%rip), %rdi
    jmp fail
13: movl %ebx, pin(%rip)
    movl %edx, pin_select(%rip)
    leaq msg_path(%rip), %rdi
    movl dac(%rip), %esi
    call put_kv
    leaq msg_pin(%rip), %rdi
    movl pin(%rip), %esi
    call put_kv
    leaq msg_select(%rip), %rdi
    movl pin_select(%rip), %esi
    call put_kv
    call newline
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* put_nodes(%edi = a subordinate node count response): ` nodes=<start>+<count>` */
put_nodes:
    pushq %rbx
    movl %edi, %ebx
    leaq msg_nodes(%rip), %rdi
    movl %ebx, %esi
    shrl $16, %esi
    andl $0xFF, %esi
    call put_kv
    movl $'+', %edi
    call serial_putc
    movl %ebx, %edi
    andl $0xFF, %edi
    call serial_putdec
    popq %rbx
    ret

/* widget(%edi = node): its parameters into the node tables and its line */
widget:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    movl %edi, %ebx
    movl $9, %esi                   /* audio widget capabilities */
    call param
    leaq node_caps(%rip), %rcx
    movl %eax, (%rcx,%rbx,4)
    movl %eax, %r12d
    leaq msg_node(%rip), %rdi
    movl %ebx, %esi
    call put_kv
    leaq msg_type(%rip), %rdi
    call serial_puts
    movl %r12d, %eax
    shrl $20, %eax
    andl $15, %eax
    leaq type_names(%rip), %rcx
    movq (%rcx,%rax,8), %rdi
    call serial_puts
    leaq msg_caps(%rip), %rdi
    movl %r12d, %esi
    call put_hex8
    /* the connection list */
    leaq msg_conn(%rip), %rdi
    call serial_puts
    testl $0x100, %r12d
    jz 5f
    movl %ebx, %edi
    movl $0x0E, %esi                /* connection list length */
    call param
    testb $0x80, %al                /* long form: not read */
    jz 1f
    leaq msg_long(%rip), %rdi
    call serial_puts
    jmp 5f
1:  andl $0x7F, %eax
    movl %eax, %r13d                /* length */
    leaq node_nconn(%rip), %rcx
    movb %al, (%rcx,%rbx)
    xorl %r14d, %r14d               /* entry index */
2:  cmpl %r13d, %r14d
    jae 5f
    testb $3, %r14b
    jnz 3f
    movl %ebx, %edi
    movl %r14d, %esi
    orl $0xF0200, %esi              /* GET_CONNECTION_LIST_ENTRY, from entry r14 */
    call cmd
    movl %eax, conn_word(%rip)
3:  movl %r14d, %ecx
    andl $3, %ecx
    shll $3, %ecx
    movl conn_word(%rip), %eax
    shrl %cl, %eax
    andl $0xFF, %eax                /* bit 7: a range (printed as it is) */
    cmpl $MAX_CONN, %r14d
    jae 4f
    leaq node_conn(%rip), %rcx
    leaq (%rcx,%rbx,MAX_CONN), %rcx
    movb %al, (%rcx,%r14)
4:  testl %r14d, %r14d
    jz 41f
    pushq %rax
    movl $',', %edi
    call serial_putc
    popq %rax
41: movl %eax, %edi
    call serial_putdec
    incl %r14d
    jmp 2b
5:  movl $']', %edi
    call serial_putc
    /* a pin */
    movl %r12d, %eax
    shrl $20, %eax
    andl $15, %eax
    cmpl $4, %eax
    jne 6f
    movl %ebx, %edi
    movl $0x0C, %esi                /* pin capabilities */
    call param
    leaq node_pincaps(%rip), %rcx
    movl %eax, (%rcx,%rbx,4)
    leaq msg_pincaps(%rip), %rdi
    movl %eax, %esi
    call put_hex8
    movl %ebx, %edi
    movl $0xF1C00, %esi             /* configuration default */
    call cmd
    leaq msg_cfg(%rip), %rdi
    movl %eax, %esi
    call put_hex8
6:  /* an output amplifier */
    testl $0x4, %r12d
    jz 8f
    movl afg_ampout(%rip), %eax
    testl $0x8, %r12d               /* amp parameter override */
    jz 7f
    movl %ebx, %edi
    movl $0x12, %esi
    call param
7:  leaq node_ampout(%rip), %rcx
    movl %eax, (%rcx,%rbx,4)
    leaq msg_ampout(%rip), %rdi
    movl %eax, %esi
    call put_hex8
8:  call newline
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* path_setup(): power, format, stream, pin control, EAPD, amplifiers; the read-back lines */
path_setup:
    pushq %rbx
    movl afg(%rip), %edi
    movl $0x70500, %esi             /* SET_POWER_STATE D0 */
    call cmd
    movl dac(%rip), %edi
    movl $0x70500, %esi
    call cmd
    movl pin(%rip), %edi
    movl $0x70500, %esi
    call cmd
    movl dac(%rip), %edi
    movl $0x20000 | FORMAT, %esi    /* SET_CONVERTER_FORMAT (4-bit verb 0x2) */
    call cmd
    movl dac(%rip), %edi
    movl $0x70600 | (STREAM_TAG << 4), %esi     /* SET_CONVERTER_STREAM_CHANNEL: stream 1, channel 0 */
    call cmd
    movl pin(%rip), %ebx
    leaq node_nconn(%rip), %rax
    cmpb $1, (%rax,%rbx)
    jbe 1f
    movl %ebx, %edi
    movl pin_select(%rip), %esi
    orl $0x70100, %esi              /* SET_CONNECTION_SELECT */
    call cmd
1:  movl %ebx, %edi
    movl $0x70740, %esi             /* SET_PIN_WIDGET_CONTROL: out enable */
    call cmd
    movl $0, eapd(%rip)
    leaq node_pincaps(%rip), %rax
    testl $0x10000, (%rax,%rbx,4)   /* EAPD capable */
    jz 2f
    movl $1, eapd(%rip)
    movl %ebx, %edi
    movl $0x70C02, %esi             /* SET_EAPD_BTLENABLE: EAPD */
    call cmd
2:  movl dac(%rip), %edi
    call amp_on
    movl pin(%rip), %edi
    call amp_on
    /* read back */
    movl dac(%rip), %edi
    movl $0xA0000, %esi             /* GET_CONVERTER_FORMAT (4-bit verb 0xA) */
    call cmd
    leaq msg_dac_fmt(%rip), %rdi
    movl %eax, %esi
    call put_hex4
    movl dac(%rip), %edi
    movl $0xF0600, %esi             /* GET_CONVERTER_STREAM_CHANNEL */
    call cmd
    leaq msg_dac_conv(%rip), %rdi
    movl %eax, %esi
    call put_hex2
    movl dac(%rip), %edi
    movl $0xBA000, %esi             /* GET_AMP_GAIN_MUTE: output, left, index 0 */
    call cmd
    leaq msg_dac_amp(%rip), %rdi
    movl %eax, %esi
    call put_hex2
    call newline
    movl pin(%rip), %edi
    movl $0xF0700, %esi             /* GET_PIN_WIDGET_CONTROL */
    call cmd
    leaq msg_pin_ctl(%rip), %rdi
    movl %eax, %esi
    call put_hex2
    leaq msg_eapd(%rip), %rdi
    movl eapd(%rip), %esi
    call put_kv
    call newline
    popq %rbx
    ret

/* amp_on(%edi = node): its output amplifier (if any) at 0 dB, unmuted, left and right */
amp_on:
    leaq node_caps(%rip), %rax
    testl $0x4, (%rax,%rdi,4)
    jz 1f
    leaq node_ampout(%rip), %rax
    movl (%rax,%rdi,4), %eax
    movl %eax, %ecx
    andl $0x7F, %eax                /* offset: the step that is 0 dB */
    shrl $8, %ecx
    andl $0x7F, %ecx                /* the number of steps - 1 */
    cmpl %ecx, %eax
    jbe 2f
    movl %ecx, %eax
2:  leal 0x3B000(%rax), %esi        /* SET_AMP_GAIN_MUTE (4-bit verb 0x3): output, left, right, unmuted */
    jmp cmd
1:  ret

/* ---- The stream ---- */

/* stream_play(): output stream descriptor 0 plays `periods` periods (see the top of the file); sets
   played, wraps, bcis, t_start, t_end */
stream_play:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    leaq err_nooutput(%rip), %rdi
    cmpl $0, oss(%rip)
    je fail
    movq bar(%rip), %rbx
    movl iss(%rip), %eax
    shll $5, %eax
    addl $0x80, %eax
    movl %eax, sd_offset(%rip)
    leaq (%rbx,%rax), %r12          /* the descriptor */
    movl $1, SD_CTL(%r12)           /* SRST */
    leaq SD_CTL(%r12), %rdi
    movl $1, %esi
    movl $1, %edx
    movl $TICKS_MS, %ecx
    call poll32
    movl %eax, srst_seen(%rip)
    movl $0, SD_CTL(%r12)
    leaq SD_CTL(%r12), %rdi
    movl $1, %esi
    xorl %edx, %edx
    movl $10 * TICKS_MS, %ecx
    call poll32
    leaq err_srst(%rip), %rdi
    testl %eax, %eax
    jz fail
    movl $STREAM_TAG << 20, SD_CTL(%r12)
    leaq bdl(%rip), %rax            /* the BDL: one entry per table period, IOC on each */
    leaq tone(%rip), %rcx
    xorl %edx, %edx
1:  movq %rcx, 0(%rax)
    movl $PERIOD_BYTES, 8(%rax)
    movl $1, 12(%rax)               /* IOC */
    addq $16, %rax
    addq $PERIOD_BYTES, %rcx
    incl %edx
    cmpl $TABLE_PERIODS, %edx
    jb 1b
    sfence
    leaq bdl(%rip), %rax
    movl %eax, SD_BDPL(%r12)
    movl $0, SD_BDPU(%r12)
    movl $CBL, SD_CBL(%r12)
    movw $TABLE_PERIODS - 1, SD_LVI(%r12)
    movw $FORMAT, SD_FMT(%r12)
    leaq posbuf(%rip), %rax
    orl $1, %eax                    /* DMA position buffer enable */
    movl %eax, DPLBASE(%rbx)
    movl $0, DPUBASE(%rbx)
    movb $0x1C, SD_STS(%r12)        /* BCIS, FIFOE, DESE: write 1 to clear */
    leaq msg_stream(%rip), %rdi
    movl sd_offset(%rip), %esi
    movl $3, %edx
    call put_hexn
    leaq msg_srst_seen(%rip), %rdi
    movl srst_seen(%rip), %esi
    call put_kv
    call newline
    leaq msg_running(%rip), %rdi
    call serial_puts
    call newline
    call pit_ticks
    movq %rax, t_start(%rip)
    movq %rax, %r15                 /* the last progress */
    movl $(STREAM_TAG << 20) | 2, SD_CTL(%r12)  /* RUN */
    xorl %r13d, %r13d               /* the last LPIB */
    xorl %r14d, %r14d               /* wraps */
    movq $0, bcis(%rip)
2:  movl SD_LPIB(%r12), %ebp      /* LPIB before SDnSTS: the BCIS of the period LPIB shows is counted */
    movzbl SD_STS(%r12), %eax
    testb $STS_ERRORS, %al
    jnz 8f
    testb $STS_BCIS, %al
    jz 3f
    movb $STS_BCIS, SD_STS(%r12)
    incq bcis(%rip)
3:  movl %ebp, %eax
    cmpl %r13d, %eax
    je 6f
    jae 4f
    incq %r14                       /* LPIB went back: the ring wrapped */
4:  movl %eax, %r13d
    call pit_ticks
    movq %rax, %r15
    movq %r14, %rax                 /* played = (wraps * CBL + LPIB) / PERIOD_BYTES */
    imulq $CBL, %rax
    addq %r13, %rax
    xorl %edx, %edx
    movl $PERIOD_BYTES, %ecx
    divq %rcx
    cmpq periods(%rip), %rax
    jb 2b
    movq %rax, played(%rip)
    movq %r15, t_end(%rip)
    jmp 7f
6:  call pit_ticks                  /* no progress */
    subq %r15, %rax
    cmpq $TICKS_STALL, %rax
    jb 2b
    leaq msg_fail(%rip), %rdi
    call serial_puts
    leaq msg_stalled(%rip), %rdi
    movl SD_LPIB(%r12), %esi
    call put_kv
    leaq msg_sts(%rip), %rdi
    movzbl SD_STS(%r12), %esi
    call put_hex2
    leaq msg_wraps(%rip), %rdi
    movq %r14, %rsi
    call put_kv
    call newline
    jmp poweroff
7:  movl $STREAM_TAG << 20, SD_CTL(%r12)    /* RUN <- 0 */
    movq %r14, wraps(%rip)
    leaq SD_CTL(%r12), %rdi
    movl $2, %esi
    xorl %edx, %edx
    movl $10 * TICKS_MS, %ecx
    call poll32
    leaq err_stop(%rip), %rdi
    testl %eax, %eax
    jz fail
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
8:  leaq err_stream(%rip), %rdi
    movzbl %al, %esi
    jmp fail_hex

/* ---- Commands: (%rdi = arguments, %rsi = word end) -> %eax = 0, or 1 for a bad word ---- */

cmd_periods:
    SAVE
    ARGS 1
    movq args(%rip), %rax
    testq %rax, %rax
    jz cmd_bad
    cmpq $1000000, %rax
    ja cmd_bad
    movq %rax, periods(%rip)
    jmp cmd_ok

    .section .rodata
    .p2align 3
cmd_table:
    .quad cmdn_periods, cmd_periods
    .quad 0, 0
type_names:
    .quad tn_out, tn_in, tn_mix, tn_sel, tn_pin, tn_power, tn_knob, tn_beep
    .quad tn_8, tn_9, tn_10, tn_11, tn_12, tn_13, tn_14, tn_vendor
cmdn_periods:       .asciz "hda.periods="
tn_out:             .asciz "out"
tn_in:              .asciz "in"
tn_mix:             .asciz "mix"
tn_sel:             .asciz "sel"
tn_pin:             .asciz "pin"
tn_power:           .asciz "power"
tn_knob:            .asciz "knob"
tn_beep:            .asciz "beep"
tn_8:               .asciz "t8"
tn_9:               .asciz "t9"
tn_10:              .asciz "t10"
tn_11:              .asciz "t11"
tn_12:              .asciz "t12"
tn_13:              .asciz "t13"
tn_14:              .asciz "t14"
tn_vendor:          .asciz "vendor"
msg_empty:          .asciz ""
msg_0x:             .asciz "0x"
msg_badword:        .asciz "HDA bad-word "
msg_periods:        .asciz "HDA periods="
msg_pci:            .asciz "HDA pci slot="
msg_id:             .asciz " id=8086:"
msg_bar:            .asciz " bar0="
msg_gcap:           .asciz "HDA gcap="
msg_vmaj:           .asciz " vmaj="
msg_vmin:           .asciz " vmin="
msg_oss:            .asciz " oss="
msg_iss:            .asciz " iss="
msg_bss:            .asciz " bss="
msg_statests:       .asciz " statests="
msg_corbsize:       .asciz "HDA corbsize="
msg_rirbsize:       .asciz " rirbsize="
msg_corbrp_seen:    .asciz " corbrp-reset-seen="
msg_vendor:         .asciz "HDA codec vendor="
msg_revision:       .asciz " revision="
msg_nodes:          .asciz " nodes="
msg_afg:            .asciz "HDA afg node="
msg_node:           .asciz "HDA node "
msg_type:           .asciz " type="
msg_caps:           .asciz " caps="
msg_conn:           .asciz " conn=["
msg_long:           .asciz "long"
msg_pincaps:        .asciz " pincaps="
msg_cfg:            .asciz " cfg="
msg_ampout:         .asciz " ampout="
msg_path:           .asciz "HDA path dac="
msg_pin:            .asciz " pin="
msg_select:         .asciz " select="
msg_dac_fmt:        .asciz "HDA dac fmt="
msg_dac_conv:       .asciz " conv="
msg_dac_amp:        .asciz " amp="
msg_pin_ctl:        .asciz "HDA pin ctl="
msg_eapd:           .asciz " eapd="
msg_stream:         .asciz "HDA stream sd="
msg_srst_seen:      .asciz " srst-seen="
msg_running:        .asciz "HDA running"
msg_done:           .asciz "HDA done periods="
msg_ms:             .asciz " ms="
msg_wraps:          .asciz " lpib-wraps="
msg_bcis:           .asciz " bcis="
msg_posbuf:         .asciz " posbuf="
msg_verbs:          .asciz " verbs="
msg_unsol:          .asciz " unsolicited="
msg_fail:           .asciz "HDA FAIL "
msg_verb_timeout:   .asciz "verb-timeout cmd="
msg_corbrp:         .asciz " corbrp="
msg_rirbwp:         .asciz " rirbwp="
msg_stalled:        .asciz "stalled lpib="
msg_sts:            .asciz " sts="
err_exception:      .asciz "HDA FAIL exception"
err_none:           .asciz "none"
err_reset_enter:    .asciz "reset-enter"
err_reset_exit:     .asciz "reset-exit"
err_nocodec:        .asciz "no-codec statests="
err_corbsize:       .asciz "corb-size"
err_rirbsize:       .asciz "rirb-size"
err_corbrp:         .asciz "corbrp-reset"
err_corbrun:        .asciz "corb-run"
err_noafg:          .asciz "no-afg"
err_nodac:          .asciz "no-dac"
err_nopin:          .asciz "no-output-pin"
err_nooutput:       .asciz "no-output-stream"
err_srst:           .asciz "srst"
err_stop:           .asciz "stop"
err_stream:         .asciz "stream-error sts="

/* The tone: TABLE_PERIODS periods of 480 frames, 24 waves of HALF_WAVE frames at +AMPLITUDE then HALF_WAVE
   at -AMPLITUDE, each frame left then right (S16 little-endian). Static, so nothing is computed at run time
   (every guest instruction is emulated here). BDL buffers are 128-byte aligned (1920 = 15 x 128). */
    .section .data
    .p2align 7
tone:
    .rept 24
    .rept HALF_WAVE
    .short AMPLITUDE, AMPLITUDE
    .endr
    .rept HALF_WAVE
    .short -AMPLITUDE, -AMPLITUDE
    .endr
    .endr
tone_end:
    .if tone_end - tone != CBL
    .error "the tone table is not TABLE_PERIODS periods"
    .endif

    .section .bss
    .p2align 3
bar:
    .skip 8
periods:
    .skip 8
played:
    .skip 8
wraps:
    .skip 8
bcis:
    .skip 8
t_start:
    .skip 8
t_end:
    .skip 8
args:
    .skip 8
gcap:
    .skip 4
iss:
    .skip 4
oss:
    .skip 4
statests:
    .skip 4
corbrp_seen:
    .skip 4
srst_seen:
    .skip 4
sd_offset:
    .skip 4
corb_wp:
    .skip 4
rirb_rp:
    .skip 4
verbs:
    .skip 4
unsolicited:
    .skip 4
conn_word:
    .skip 4
afg:
    .skip 4
afg_ampout:
    .skip 4
dac:
    .skip 4
pin:
    .skip 4
pin_select:
    .skip 4
eapd:
    .skip 4
node_caps:
    .skip MAX_NODES * 4
node_pincaps:
    .skip MAX_NODES * 4
node_ampout:
    .skip MAX_NODES * 4
node_nconn:
    .skip MAX_NODES
node_conn:
    .skip MAX_NODES * MAX_CONN
    .p2align 7
posbuf:                             /* DMA position buffer: 8 bytes per stream descriptor, at most 30 */
    .skip 256
bdl:
    .skip TABLE_PERIODS * 16
    .p2align 7
corb:
    .skip 256 * 4
rirb:
    .skip 256 * 8

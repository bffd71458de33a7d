/* virtio-sound — a minimal virtio 1.x modern-PCI sound driver (spec 1.2 §4.1 PCI transport, §5.14 sound
 * device, split virtqueues), polled, that plays a 480 Hz square wave on the device's first output stream.
 *
 * Start-up: PIT started as the time base (pit_ticks), 8259s remapped and fully masked, spurious gates set.
 * The kernel command line's words (hvm_start_info.cmdline_paddr, offset 24) are read first:
 *   sound.periods=N   1 <= N <= 1000000: periods of 10 ms to play (default 100, one second)
 *   anything else     `SOUND bad-word <word>` (also for a malformed or out-of-range N)
 * PCI bus 0, devices 0-31, function 0 are scanned for the first 1AF4:1059 (virtio-sound, modern only: 0x1040
 * + device id 25). Capabilities and BARs as in virtio-blk.S (lib.S: virtio_pci_caps). Device init: reset,
 * ACKNOWLEDGE, DRIVER, features: VIRTIO_F_VERSION_1 only (bit 32, required; the device has no feature bits
 * of its own), FEATURES_OK (checked); the device configuration {le32 jacks, streams, chmaps} is read;
 * controlq (0), eventq (1), txq (2) and rxq (3) with min(queue_size, 16) entries each in one static 4 KiB
 * page per queue; DRIVER_OK; 4 event buffers of 8 bytes (device-writable) are posted on the eventq, which
 * is not otherwise used (no event is expected: no stream feature is selected); the rxq is left empty. On a
 * failure after the reset, FAILED (0x80) is set. Every avail ring's flags are VIRTQ_AVAIL_F_NO_INTERRUPT:
 * every queue is polled (no interrupt is used).
 *
 * A control request is descriptors 0-1 of the controlq: the request (device-readable) and the response
 * (device-writable; its le32 code prefilled with 0xFFFFFFFF, so "never written" shows as 0xffffffff); one
 * at a time, the used idx polled for 5 s. Requests (all fields le32 unless said otherwise):
 *   R_PCM_INFO (0x100)       {code, start_id = i, count = 1, size = 32} for each stream i < streams (at most
 *                            16 are asked): response {code} + virtio_snd_pcm_info {hda_fn_nid, features,
 *                            le64 formats, le64 rates, u8 direction, channels_min, channels_max, 5 padding}
 *   R_PCM_SET_PARAMS (0x101) {code, stream_id, buffer_bytes 7680, period_bytes 1920, features 0,
 *                            u8 channels 2, u8 format 5 (S16), u8 rate 7 (48000), u8 padding}
 *   R_PCM_PREPARE (0x102), R_PCM_START (0x104), R_PCM_STOP (0x105), R_PCM_RELEASE (0x103)
 *                            {code, stream_id}
 * each answered by {le32 status}, VIRTIO_SND_S_OK = 0x8000 (BAD_MSG 0x8001, NOT_SUPP 0x8002, IO_ERR 0x8003).
 *
 * Playing: the stream is the first whose direction is output (0); it must offer S16 (formats bit 5), 48000
 * (rates bit 7) and 2 channels. SET_PARAMS, PREPARE, START; then N periods of 480 frames (1920 bytes: S16
 * little-endian, left then right, both the same) are sent on the txq, each as a chain of three descriptors:
 * {le32 stream_id} (readable), the period (readable), {le32 status, le32 latency_bytes} (writable, status
 * prefilled 0xFFFFFFFF). At most 4 chains (= buffer_bytes) are in flight; the used idx is polled (5 s each
 * wait). The tone is a square wave of period 100 frames: 50 frames +8000, 50 frames -8000. 480 frames are 4.8
 * of its periods, so one 10 ms period repeated would break the wave at every period boundary: the samples
 * are a static table of 5 periods (2400 frames = 24 whole waves, assembled into the image, nothing computed
 * at run time) and period k is the table's period k mod 5. Every completion's status must be 0x8000. Then
 * STOP and RELEASE.
 *
 * Serial (COM1), lines:
 *   SOUND periods=<N>
 *   SOUND pci slot=<pci device>
 *   SOUND config jacks=<jacks> streams=<streams> chmaps=<chmaps>
 *   SOUND stream id=<i> dir=<output|input|N> formats=0x<hex> rates=0x<hex> channels=<min>-<max>
 *   SOUND set-params status=0x<4 hex>         (and likewise prepare, start, stop, release)
 *   SOUND playing stream=<id>
 *   SOUND events=<eventq buffers the device used>
 *   SOUND done periods=<N> ok=<completions with status 0x8000> stream=<id> ms=<START answered to the last
 *              completion, PIT>
 * and on any failure `SOUND FAIL <what>` (none = no 1AF4:1059; the reasons of virtio-blk.S; no-queue;
 * tx-queue-small; no-streams; no-output-stream; stream-caps; timeout-<request> or timeout-tx; <request>
 * status=0x<hex> for a control request not answered 0x8000; tx-status=0x<first bad status> or tx-id=<id>
 * after the done line), after which nothing more is sent. guest_main then returns (power-off).
 */
    .include "virtio.inc"
    .set SOUND_ID, 0x10591AF4       /* device 0x1059 << 16 | vendor 0x1AF4 */
    .set QMAX, 16                   /* queue entries used at most */
    .set TICKS_5S, 5 * 1193182      /* PIT input-clock ticks */
    .set PIT_HZ, 1193182
    .set MAX_STREAMS, 16            /* PCM_INFO asked for at most */

    .set R_PCM_INFO, 0x100
    .set R_PCM_SET_PARAMS, 0x101
    .set R_PCM_PREPARE, 0x102
    .set R_PCM_RELEASE, 0x103
    .set R_PCM_START, 0x104
    .set R_PCM_STOP, 0x105
    .set S_OK, 0x8000
    .set FMT_S16, 5
    .set RATE_48000, 7
    .set PCM_INFO_SIZE, 32

    .set PERIOD_BYTES, 1920         /* 480 frames of 2 x S16: 10 ms at 48000 */
    .set BUFFER_BYTES, 7680         /* 4 periods */
    .set INFLIGHT, 4                /* tx chains in flight at most (BUFFER_BYTES / PERIOD_BYTES) */
    .set TABLE_PERIODS, 5           /* 5 x 480 frames = 24 waves of 100 frames */
    .set AMPLITUDE, 8000
    .set HALF_WAVE, 50              /* frames */
    .set EVENT_BUFS, 4

    /* caps: the structures as virtio_pci_caps writes them */
    .set CAP_COMMON, 0
    .set CAP_DEVCFG, 24

    .text
    .code64
    .globl guest_main
guest_main:
    SAVE
    call driver_start
    movq $100, periods(%rip)
    leaq cmd_table(%rip), %rdi      /* the command-line words */
    leaq msg_badword(%rip), %rsi
    leaq msg_empty(%rip), %rdx
    call run_words
    leaq msg_periods(%rip), %rdi
    movq periods(%rip), %rsi
    call put_kv
    call newline

    /* ---- the device ---- */
    movl $SOUND_ID, %edi
    xorl %esi, %esi
    call pci_find
    leaq err_none(%rip), %rdi
    testl %eax, %eax
    jz fail
    movl %eax, snd_cfg(%rip)
    leaq msg_pci(%rip), %rdi
    movl %eax, %esi
    shrl $11, %esi
    andl $31, %esi
    call put_kv
    call newline
    call snd_init                   /* -> %rax = 0 or an error text */
    movq %rax, %rdi
    testq %rax, %rax
    jnz fail
    movq caps + CAP_DEVCFG(%rip), %rbx
    leaq msg_config(%rip), %rdi
    movl 0(%rbx), %esi              /* jacks */
    call put_kv
    leaq msg_streams(%rip), %rdi
    movl 4(%rbx), %esi              /* streams */
    movl %esi, streams(%rip)
    call put_kv
    leaq msg_chmaps(%rip), %rdi
    movl 8(%rbx), %esi              /* chmaps */
    call put_kv
    call newline
    leaq err_nostreams(%rip), %rdi
    cmpl $0, streams(%rip)
    je fail

    /* ---- PCM_INFO, one stream at a time ---- */
    movl $-1, stream_id(%rip)       /* the first output stream, once seen */
    xorl %r12d, %r12d               /* stream index */
1:  cmpl streams(%rip), %r12d
    jae 4f
    cmpl $MAX_STREAMS, %r12d
    jae 4f
    call req_clear
    movl $R_PCM_INFO, req_buf(%rip)
    movl %r12d, req_buf + 4(%rip)   /* start_id */
    movl $1, req_buf + 8(%rip)      /* count */
    movl $PCM_INFO_SIZE, req_buf + 12(%rip)
    movl $16, %edi
    movl $4 + PCM_INFO_SIZE, %esi
    call ctl_request
    leaq name_pcm_info(%rip), %rdi
    cmpl $S_OK, %eax
    jne ctl_fail
    call put_stream_line            /* %r12d = its id */
    cmpl $-1, stream_id(%rip)
    jne 3f
    cmpb $0, resp_buf + 4 + 24(%rip)    /* direction: output */
    jne 3f
    movl %r12d, stream_id(%rip)
    movl resp_buf + 4 + 8(%rip), %eax   /* formats (low dword: every format is below bit 32) */
    movl resp_buf + 4 + 16(%rip), %ecx  /* rates */
    leaq err_caps(%rip), %rdi
    btl $FMT_S16, %eax
    jnc fail
    btl $RATE_48000, %ecx
    jnc fail
    cmpb $2, resp_buf + 4 + 25(%rip)    /* channels_min <= 2 */
    ja fail
    cmpb $2, resp_buf + 4 + 26(%rip)    /* channels_max >= 2 */
    jb fail
3:  incl %r12d
    jmp 1b
4:  leaq err_nooutput(%rip), %rdi
    cmpl $-1, stream_id(%rip)
    je fail

    /* ---- SET_PARAMS, PREPARE, START ---- */
    call req_clear
    movl $R_PCM_SET_PARAMS, req_buf(%rip)
    movl stream_id(%rip), %eax
    movl %eax, req_buf + 4(%rip)
    movl $BUFFER_BYTES, req_buf + 8(%rip)
    movl $PERIOD_BYTES, req_buf + 12(%rip)
    movl $0, req_buf + 16(%rip)     /* features */
    movb $2, req_buf + 20(%rip)     /* channels */
    movb $FMT_S16, req_buf + 21(%rip)
    movb $RATE_48000, req_buf + 22(%rip)
    movl $24, %edi
    movl $4, %esi
    call ctl_request
    leaq name_set_params(%rip), %rdi
    call put_ctl_status
    cmpl $S_OK, %eax
    jne ctl_fail
    movl $R_PCM_PREPARE, %edi
    call pcm_simple
    leaq name_prepare(%rip), %rdi
    call put_ctl_status
    cmpl $S_OK, %eax
    jne ctl_fail
    movl $R_PCM_START, %edi
    call pcm_simple
    leaq name_start(%rip), %rdi
    call put_ctl_status
    cmpl $S_OK, %eax
    jne ctl_fail
    call pit_ticks
    movq %rax, t_start(%rip)
    movq %rax, t_last(%rip)
    leaq msg_playing(%rip), %rdi
    movl stream_id(%rip), %esi
    call put_kv
    call newline

    /* ---- the tone ---- */
    call play                       /* -> %rax = 0 or an error text */
    movq %rax, %rdi
    testq %rax, %rax
    jnz fail

    /* ---- STOP, RELEASE ---- */
    movl $R_PCM_STOP, %edi
    call pcm_simple
    leaq name_stop(%rip), %rdi
    call put_ctl_status
    cmpl $S_OK, %eax
    jne ctl_fail
    movl $R_PCM_RELEASE, %edi
    call pcm_simple
    leaq name_release(%rip), %rdi
    call put_ctl_status
    cmpl $S_OK, %eax
    jne ctl_fail
    leaq msg_events(%rip), %rdi
    movzwl evt_ring + R_USED + 2(%rip), %esi
    call put_kv
    call newline

    /* ---- the summary ---- */
    leaq msg_done(%rip), %rdi
    movq periods(%rip), %rsi
    call put_kv
    leaq msg_ok(%rip), %rdi
    movq ok_count(%rip), %rsi
    call put_kv
    leaq msg_stream(%rip), %rdi
    movl stream_id(%rip), %esi
    call put_kv
    movq t_last(%rip), %rax         /* ms = ticks * 1000 / PIT_HZ */
    subq t_start(%rip), %rax
    imulq $1000, %rax
    xorl %edx, %edx
    movl $PIT_HZ, %ecx
    divq %rcx
    leaq msg_ms(%rip), %rdi
    movq %rax, %rsi
    call put_kv
    call newline
    movl bad_id(%rip), %esi
    cmpl $-1, %esi
    je 5f
    leaq msg_fail_id(%rip), %rdi
    call put_kv
    call newline
    jmp cmd_ok
5:  movl bad_status(%rip), %esi
    cmpl $S_OK, %esi
    je cmd_ok
    leaq msg_fail_status(%rip), %rdi
    call put_hex
    call newline
    jmp cmd_ok                      /* restores the callee-saved registers and returns: power-off */

/* A control request answered otherwise than S_OK (%eax = the answer, %rdi = the request's name):
   `SOUND FAIL <name> status=0x<hex>` (0xffffffff: timeout) */
ctl_fail:
    movl %eax, %ebx
    movq %rdi, %r12
    leaq msg_fail(%rip), %rdi
    call serial_puts
    movq %r12, %rdi
    call serial_puts
    leaq msg_status(%rip), %rdi
    movl %ebx, %esi
    call put_hex
    call newline
    jmp fail_device

/* `SOUND FAIL <%rdi>`, FAILED set once the device was reset, return (power-off) */
fail:
    movq %rdi, %rbx
    leaq msg_fail(%rip), %rdi
    call serial_puts
    movq %rbx, %rdi
    call serial_puts
    call newline
fail_device:
    movq caps + CAP_COMMON(%rip), %rax
    testq %rax, %rax
    jz 1f
    orb $0x80, C_STATUS(%rax)       /* FAILED */
1:  jmp cmd_ok

/* ---- Output helpers ---- */

/* put_hex(%rdi = text, %esi = value): the text, then 0x and 4 hex digits (8 above 0xffff) */
put_hex:
    pushq %rsi
    call serial_puts
    leaq msg_0x(%rip), %rdi
    call serial_puts
    popq %rdi
    movl %edi, %edi
    movl $4, %esi
    cmpq $0xFFFF, %rdi
    jbe 1f
    movl $8, %esi
1:  jmp serial_puthex

/* put_hexmin(%rdi = text, %rsi = value): the text, then 0x and the value's hex digits, no leading zeros */
put_hexmin:
    pushq %rsi
    call serial_puts
    leaq msg_0x(%rip), %rdi
    call serial_puts
    popq %rdi
    movl $1, %esi                   /* digits: 1 + (index of the highest set bit) / 4 */
    bsrq %rdi, %rcx
    jz 1f
    shrl $2, %ecx
    leal 1(%rcx), %esi
1:  jmp serial_puthex

/* put_ctl_status(%rdi = request name, %eax = its answer): `SOUND <name> status=0x<hex>`; keeps %eax and %rdi */
put_ctl_status:
    pushq %rax
    pushq %rdi
    pushq %rdi
    leaq msg_sound(%rip), %rdi
    call serial_puts
    popq %rdi
    call serial_puts
    leaq msg_status(%rip), %rdi
    movl 8(%rsp), %esi
    call put_hex
    call newline
    popq %rdi
    popq %rax
    ret

/* put_stream_line(): `SOUND stream id=<%r12d> dir=... formats=... rates=... channels=<min>-<max>` from the
   PCM_INFO answer in resp_buf */
put_stream_line:
    leaq msg_stream_id(%rip), %rdi
    movl %r12d, %esi
    call put_kv
    movzbl resp_buf + 4 + 24(%rip), %esi    /* direction */
    leaq msg_dir_output(%rip), %rdi
    testl %esi, %esi
    jz 1f
    leaq msg_dir_input(%rip), %rdi
    cmpl $1, %esi
    je 1f
    leaq msg_dir(%rip), %rdi
    call put_kv
    jmp 2f
1:  call serial_puts
2:  leaq msg_formats(%rip), %rdi
    movq resp_buf + 4 + 8(%rip), %rsi
    call put_hexmin
    leaq msg_rates(%rip), %rdi
    movq resp_buf + 4 + 16(%rip), %rsi
    call put_hexmin
    leaq msg_channels(%rip), %rdi
    movzbl resp_buf + 4 + 25(%rip), %esi
    call put_kv
    movl $'-', %edi
    call serial_putc
    movzbl resp_buf + 4 + 26(%rip), %edi
    call serial_putdec
    jmp newline

/* ---- Device set-up ---- */

/* snd_init(): capabilities, reset and full initialisation (see the top of the file) -> %rax = 0, or an
   error text. Prints nothing. */
snd_init:
    pushq %r12
    movl snd_cfg(%rip), %edi
    leaq caps(%rip), %rsi
    call virtio_pci_caps
    testq %rax, %rax
    jnz 9f
    movq caps + CAP_COMMON(%rip), %r12
    movq %r12, %rdi
    call virtio_reset               /* reset, ACKNOWLEDGE, DRIVER */
    testl %eax, %eax
    leaq err_reset(%rip), %rax
    jnz 8f
    movq %r12, %rdi
    xorl %esi, %esi                 /* VERSION_1 only */
    call virtio_features
    testq %rax, %rax
    jnz 7f
    leaq caps(%rip), %rdi           /* controlq */
    xorl %esi, %esi
    movl $QMAX, %edx
    leaq ctl_ring(%rip), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    jz 6f
    movw %ax, ctl_qsize(%rip)
    movq %rdx, ctl_notify(%rip)
    leaq caps(%rip), %rdi           /* eventq */
    movl $1, %esi
    movl $QMAX, %edx
    leaq evt_ring(%rip), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    jz 6f
    movw %ax, evt_qsize(%rip)
    movq %rdx, evt_notify(%rip)
    leaq caps(%rip), %rdi           /* txq */
    movl $2, %esi
    movl $QMAX, %edx
    leaq tx_ring(%rip), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    jz 6f
    movw %ax, tx_qsize(%rip)
    movq %rdx, tx_notify(%rip)
    leaq caps(%rip), %rdi           /* rxq */
    movl $3, %esi
    movl $QMAX, %edx
    leaq rx_ring(%rip), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    jz 6f
    movw $1, ctl_ring + R_AVAIL(%rip)       /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
    movw $1, evt_ring + R_AVAIL(%rip)
    movw $1, tx_ring + R_AVAIL(%rip)
    movw $1, rx_ring + R_AVAIL(%rip)
    movw $0, ctl_avail(%rip)
    movw $0, ctl_used(%rip)
    movw $0, tx_avail(%rip)
    movw $0, tx_used(%rip)
    leaq err_txsmall(%rip), %rax
    cmpw $3 * INFLIGHT, tx_qsize(%rip)
    jb 7f
    movb $0x0F, C_STATUS(%r12)      /* | DRIVER_OK */
    call post_events
    xorl %eax, %eax
    popq %r12
    ret
6:  leaq err_noqueue(%rip), %rax
7:  orb $0x80, C_STATUS(%r12)       /* FAILED */
8:  movq $0, caps + CAP_COMMON(%rip)    /* fail does not set FAILED again */
9:  popq %r12
    ret

/* post_events(): EVENT_BUFS (at most the eventq's size) buffers of 8 bytes, device-writable, published at
   once on the eventq */
post_events:
    leaq evt_ring(%rip), %r9
    movzwl evt_qsize(%rip), %r8d
    cmpl $EVENT_BUFS, %r8d
    jbe 1f
    movl $EVENT_BUFS, %r8d
1:  xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $4, %eax                   /* descriptor i */
    leaq evt_bufs(%rip), %rdx
    leaq (%rdx,%rcx,8), %rdx
    movq %rdx, 0(%r9,%rax)
    movl $8, 8(%r9,%rax)
    movw $F_WRITE, 12(%r9,%rax)
    movw $0, 14(%r9,%rax)
    movw %cx, R_AVAIL + 4(%r9,%rcx,2)
    incl %ecx
    cmpl %r8d, %ecx
    jb 2b
    sfence                          /* ring entries and descriptors before the idx */
    movw %r8w, R_AVAIL + 2(%r9)
    mfence                          /* idx before the notification */
    movq evt_notify(%rip), %rax
    movw $1, (%rax)                 /* queue 1 */
    ret

/* ---- Control requests ---- */

/* req_clear(): the request buffer cleared (64 bytes) */
req_clear:
    leaq req_buf(%rip), %rdi
    xorl %eax, %eax
    movl $8, %ecx
    rep stosq
    ret

/* pcm_simple(%edi = code) -> %eax = the answer of {code, stream_id} (virtio_snd_pcm_hdr) */
pcm_simple:
    pushq %rdi
    call req_clear
    popq %rdi
    movl %edi, req_buf(%rip)
    movl stream_id(%rip), %eax
    movl %eax, req_buf + 4(%rip)
    movl $8, %edi
    movl $4, %esi
    jmp ctl_request

/* ctl_request(%edi = request length, %esi = response length) -> %eax = the response's code. Descriptor 0:
   req_buf (readable, NEXT -> 1), descriptor 1: resp_buf (writable), one avail entry, the used idx polled for
   5 s; 0xFFFFFFFF on a timeout. */
ctl_request:
    movl $0xFFFFFFFF, resp_buf(%rip)
    leaq ctl_ring(%rip), %r9
    leaq req_buf(%rip), %rax
    movq %rax, 0(%r9)
    movl %edi, 8(%r9)
    movw $F_NEXT, 12(%r9)
    movw $1, 14(%r9)
    leaq resp_buf(%rip), %rax
    movq %rax, 16(%r9)
    movl %esi, 24(%r9)
    movw $F_WRITE, 28(%r9)
    movw $0, 30(%r9)
    movzwl ctl_avail(%rip), %eax    /* publish head 0 */
    movl %eax, %r10d
    movzwl ctl_qsize(%rip), %ecx
    xorl %edx, %edx
    divl %ecx                       /* %edx = idx % queue size */
    movw $0, R_AVAIL + 4(%r9,%rdx,2)
    incl %r10d
    sfence
    movw %r10w, R_AVAIL + 2(%r9)
    movw %r10w, ctl_avail(%rip)
    mfence
    movq ctl_notify(%rip), %rax
    movw $0, (%rax)                 /* queue 0 */
    leaq R_USED + 2(%r9), %rdi
    leaq ctl_used(%rip), %rsi
    movl $TICKS_5S, %edx
    call wait_idx
    testl %eax, %eax
    jz 1f
    movw %dx, ctl_used(%rip)
    movl resp_buf(%rip), %eax
    ret
1:  movl $0xFFFFFFFF, %eax
    ret

/* ---- Playing ---- */

/* play() -> %rax = 0 (every period completed; ok_count, bad_status, bad_id, t_last set) or an error text
   (a 5 s wait for a completion ran out). Periods are submitted while fewer than INFLIGHT are in flight; each
   wait for the used idx is followed by every completion it shows. */
play:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq $0, submitted(%rip)
    movq $0, completed(%rip)
    movq $0, ok_count(%rip)
    movl $S_OK, bad_status(%rip)
    movl $-1, bad_id(%rip)
    movl $0, busy(%rip)             /* one byte per slot */
    xorl %r15d, %r15d               /* in flight */
1:  movq completed(%rip), %rax
    cmpq periods(%rip), %rax
    jae 8f
    xorl %r14d, %r14d               /* submitted in this round */
2:  cmpl $INFLIGHT, %r15d
    jae 4f
    movq submitted(%rip), %rax
    cmpq periods(%rip), %rax
    jae 4f
    xorl %ebx, %ebx                 /* a free slot (there is one: fewer than INFLIGHT in flight) */
3:  cmpb $0, busy(%rbx)
    je 31f
    incl %ebx
    jmp 3b
31: call tx_submit                  /* slot %ebx */
    incl %r15d
    incl %r14d
    jmp 2b
4:  testl %r14d, %r14d
    jz 5f
    mfence                          /* the idx before the notification */
    movq tx_notify(%rip), %rax
    movw $2, (%rax)                 /* queue 2 */
5:  leaq tx_ring + R_USED + 2(%rip), %rdi
    leaq tx_used(%rip), %rsi
    movl $TICKS_5S, %edx
    call wait_idx
    testl %eax, %eax
    jz 9f
    call pit_ticks
    movq %rax, t_last(%rip)
6:  movzwl tx_used(%rip), %eax      /* every new used entry */
    cmpw tx_ring + R_USED + 2(%rip), %ax
    je 1b
    movzwl tx_qsize(%rip), %ecx
    xorl %edx, %edx
    divl %ecx
    movl tx_ring + R_USED + 4(,%rdx,8), %eax    /* its id: a chain's head, 3 * slot */
    incw tx_used(%rip)
    incq completed(%rip)
    decl %r15d
    xorl %edx, %edx
    movl $3, %ecx
    movl %eax, %r13d
    divl %ecx
    testl %edx, %edx
    jnz 7f
    cmpl $INFLIGHT, %eax
    jae 7f
    cmpb $0, busy(%rax)
    je 7f
    movb $0, busy(%rax)
    movl tx_status(,%rax,8), %ecx
    cmpl $S_OK, %ecx
    jne 61f
    incq ok_count(%rip)
    jmp 6b
61: cmpl $S_OK, bad_status(%rip)    /* the first bad status is kept */
    jne 6b
    movl %ecx, bad_status(%rip)
    jmp 6b
7:  movl %r13d, bad_id(%rip)        /* an id that names no chain in flight */
    incl %r15d                      /* nothing was freed */
    jmp 6b
8:  xorl %eax, %eax
    jmp 10f
9:  leaq err_timeout_tx(%rip), %rax
10: popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* tx_submit(%ebx = free slot): chain 3*slot .. 3*slot+2 for period `submitted` (table period submitted mod
   TABLE_PERIODS), its head in the next avail entry; submitted += 1, the slot busy. The idx is written, the
   device not notified. Keeps %rbx, %r12-%r15. */
tx_submit:
    movb $1, busy(%rbx)
    movl stream_id(%rip), %eax
    movl %eax, tx_hdr(,%rbx,8)
    movl $0xFFFFFFFF, tx_status(,%rbx,8)
    movl $0, tx_status + 4(,%rbx,8)
    leal (%rbx,%rbx,2), %r8d        /* head = 3 * slot */
    movl %r8d, %eax
    shll $4, %eax
    leaq tx_ring(%rip), %r9
    addq %rax, %r9                  /* its descriptor */
    leaq tx_hdr(,%rbx,8), %rax
    movq %rax, 0(%r9)               /* {stream_id} */
    movl $4, 8(%r9)
    movw $F_NEXT, 12(%r9)
    leal 1(%r8), %eax
    movw %ax, 14(%r9)
    movq submitted(%rip), %rax      /* the period: tone + (submitted mod 5) * PERIOD_BYTES */
    xorl %edx, %edx
    movl $TABLE_PERIODS, %ecx
    divq %rcx
    imull $PERIOD_BYTES, %edx, %edx
    leaq tone(%rip), %rax
    addq %rdx, %rax
    movq %rax, 16(%r9)
    movl $PERIOD_BYTES, 24(%r9)
    movw $F_NEXT, 28(%r9)
    leal 2(%r8), %eax
    movw %ax, 30(%r9)
    leaq tx_status(,%rbx,8), %rax
    movq %rax, 32(%r9)              /* {status, latency_bytes} */
    movl $8, 40(%r9)
    movw $F_WRITE, 44(%r9)
    movw $0, 46(%r9)
    movzwl tx_avail(%rip), %eax
    movzwl tx_qsize(%rip), %ecx
    xorl %edx, %edx
    divl %ecx
    leaq tx_ring(%rip), %r9
    movw %r8w, R_AVAIL + 4(%r9,%rdx,2)
    incw tx_avail(%rip)
    movzwl tx_avail(%rip), %eax
    sfence                          /* ring entry and descriptors before the idx */
    movw %ax, R_AVAIL + 2(%r9)
    incq submitted(%rip)
    ret

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
cmdn_periods:       .asciz "sound.periods="
name_pcm_info:      .asciz "pcm-info"
name_set_params:    .asciz "set-params"
name_prepare:       .asciz "prepare"
name_start:         .asciz "start"
name_stop:          .asciz "stop"
name_release:       .asciz "release"
msg_empty:          .asciz ""
msg_badword:        .asciz "SOUND bad-word "
msg_periods:        .asciz "SOUND periods="
msg_pci:            .asciz "SOUND pci slot="
msg_config:         .asciz "SOUND config jacks="
msg_streams:        .asciz " streams="
msg_chmaps:         .asciz " chmaps="
msg_stream_id:      .asciz "SOUND stream id="
msg_dir_output:     .asciz " dir=output"
msg_dir_input:      .asciz " dir=input"
msg_dir:            .asciz " dir="
msg_formats:        .asciz " formats="
msg_rates:          .asciz " rates="
msg_channels:       .asciz " channels="
msg_sound:          .asciz "SOUND "
msg_status:         .asciz " status="
msg_0x:             .asciz "0x"
msg_playing:        .asciz "SOUND playing stream="
msg_events:         .asciz "SOUND events="
msg_done:           .asciz "SOUND done periods="
msg_ok:             .asciz " ok="
msg_stream:         .asciz " stream="
msg_ms:             .asciz " ms="
msg_fail:           .asciz "SOUND FAIL "
msg_fail_status:    .asciz "SOUND FAIL tx-status="
msg_fail_id:        .asciz "SOUND FAIL tx-id="
err_none:           .asciz "none"
err_reset:          .asciz "reset-timeout"
err_noqueue:        .asciz "no-queue"
err_txsmall:        .asciz "tx-queue-small"
err_nostreams:      .asciz "no-streams"
err_nooutput:       .asciz "no-output-stream"
err_caps:           .asciz "stream-caps"
err_timeout_tx:     .asciz "timeout-tx"

/* The tone: TABLE_PERIODS periods of 480 frames, 24 waves of HALF_WAVE frames at +AMPLITUDE then HALF_WAVE
   at -AMPLITUDE, each frame left then right (S16 little-endian). Static, so nothing is computed at run time
   (every guest instruction is emulated here). */
    .section .data
    .p2align 6
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
    .if tone_end - tone != TABLE_PERIODS * PERIOD_BYTES
    .error "the tone table is not TABLE_PERIODS periods"
    .endif

    .section .bss
    .p2align 3
snd_cfg:                            /* config address of register 0 */
    .skip 4
streams:
    .skip 4
stream_id:                          /* the stream played */
    .skip 4
bad_status:                         /* the first tx status other than S_OK (S_OK: none) */
    .skip 4
bad_id:                             /* a used id that named no chain in flight (-1: none) */
    .skip 4
busy:                               /* one byte per tx slot */
    .skip 4
periods:
    .skip 8
submitted:
    .skip 8
completed:
    .skip 8
ok_count:
    .skip 8
t_start:
    .skip 8
t_last:
    .skip 8
caps:                               /* common, notify, ISR, device config; notify_off_multiplier */
    .skip 40
ctl_notify:
    .skip 8
evt_notify:
    .skip 8
tx_notify:
    .skip 8
ctl_qsize:
    .skip 2
evt_qsize:
    .skip 2
tx_qsize:
    .skip 2
ctl_avail:                          /* next avail idx */
    .skip 2
ctl_used:                           /* last used idx seen */
    .skip 2
tx_avail:
    .skip 2
tx_used:
    .skip 2
    .p2align 3
args:
    .skip 8
tx_hdr:                             /* per slot: le32 stream_id, 4 unused */
    .skip INFLIGHT * 8
tx_status:                          /* per slot: le32 status, le32 latency_bytes */
    .skip INFLIGHT * 8
evt_bufs:
    .skip EVENT_BUFS * 8
    .p2align 6
req_buf:
    .skip 64
resp_buf:
    .skip 64
    .p2align 12
ctl_ring:
    .skip 4096
evt_ring:
    .skip 4096
tx_ring:
    .skip 4096
rx_ring:
    .skip 4096

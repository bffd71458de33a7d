/* virtio-gpu — a minimal virtio 1.x modern-PCI display driver (spec 1.2 §4.1 PCI transport, §5.7 GPU device,
 * 2D commands only, split virtqueues), polled, driven by words on the kernel command line.
 *
 * Start-up: PIT started as the time base (pit_ticks), 8259s remapped and fully masked, spurious gates set.
 * PCI bus 0, devices 0-31, function 0 are scanned for the first 1AF4:1050 (virtio-gpu; any class: virtio-vga
 * is 0x030000, virtio-gpu-pci 0x038000). Capabilities and BARs as in virtio-blk.S (lib.S: virtio_pci_caps;
 * virtio-vga has its video memory in BAR 0 and the virtio structures in BAR 2, at whatever offsets the
 * capabilities name). Device init: reset, ACKNOWLEDGE, DRIVER, features: VIRTIO_F_VERSION_1 (bit 32,
 * required) and VIRTIO_GPU_F_EDID (1) when offered, FEATURES_OK (checked), control queue 0 and cursor queue 1
 * with min(queue_size, 16) entries each in one static 4 KiB page per queue, DRIVER_OK. On a failure after
 * the reset, FAILED (0x80) is set. The avail rings' flags are VIRTQ_AVAIL_F_NO_INTERRUPT (we poll; the
 * configuration interrupt is not used either: wait-display polls events_read). The cursor queue is set up
 * as a driver must, and left empty.
 *
 * A control request is descriptors 0-1 of queue 0: the request (header {u32 type, u32 flags 0, u64 fence 0,
 * u32 ctx 0, u8 ring 0, 3 padding} and the command's fields; device-readable) and the response buffer
 * (device-writable, as long as the command's response; its type prefilled with 0xFFFFFFFF, so "never
 * written" prints 0xffffffff). One request at a time; the used ring's idx is polled, timed with the PIT
 * (5 s). On a timeout `GPU timeout type=<request type, hex>` is printed and every later command prints
 * `GPU no-device` (the queue's state is unknown).
 *
 * Serial (COM1), lines:
 *   GPU none                                  (no 1AF4:1050 on bus 0; then `GPU done`)
 *   GPU pci slot=<pci device> class=<class code, 6 hex digits>
 *   GPU found scanouts=<num_scanouts> capsets=<num_capsets> edid=<VIRTIO_GPU_F_EDID negotiated, 0|1>
 *   GPU error=<reason>                        (initialisation refused; the reasons of virtio-blk.S, or
 *                                              no-queue for either queue)
 * then the command-line words (hvm_start_info.cmdline_paddr, offset 24; separated by spaces or control
 * characters), left to right, numbers decimal, response types as 0x and 4 hex digits (8 when above 0xffff):
 *   info            GET_DISPLAY_INFO: `GPU info enabled=<e> width=<w> height=<h>` for scanout 0 (its
 *                   pmodes[0]: enabled and r.width, r.height), or `GPU info error=<response type>`
 *   edid            GET_EDID of scanout 0: `GPU edid size=<n> width=<w> height=<h> sum=<0|1>`: the preferred
 *                   size from the first detailed timing descriptor (byte 54 on: width = b[56] | (b[58] >> 4)
 *                   << 8, height = b[59] | (b[61] >> 4) << 8); sum = 1 when size is a non-zero multiple of
 *                   128 (at most 1024) and each 128-byte block's bytes add up to 0 mod 256 (porthole-vmm
 *                   says size=128, one base block; QEMU 7.2 size=1024, its whole buffer). `GPU edid
 *                   not-negotiated` without the feature; `GPU edid error=<response type>`
 *   draw=W,H        2 <= W, 2 <= H, W*H <= 65536 (else bad-word). If an earlier draw made resource 1, it is
 *                   first unreferenced (RESOURCE_UNREF, answer not printed). Then RESOURCE_CREATE_2D resource
 *                   1, format B8G8R8X8_UNORM (2), W x H; the pixels are written into two static buffers that
 *                   are not adjacent in memory: the first P = W*H/2 + W/2 pixels (so the split falls
 *                   mid-row, mid-buffer) in buffer A, the rest in buffer B, pixel (x, y) being the 32-bit
 *                   little-endian value 0x00RRGGBB with R = (4x) & 0xFF, G = (4y) & 0xFF, B = 0x80;
 *                   RESOURCE_ATTACH_BACKING with 2 entries {A, 4P} {B, 4(W*H - P)}; TRANSFER_TO_HOST_2D of
 *                   the whole W x H at offset 0; SET_SCANOUT 0 to the whole resource; RESOURCE_FLUSH of it:
 *                   `GPU draw create=<type> attach=<type> transfer=<type> scanout=<type> flush=<type>`
 *                   (0x1100 is OK_NODATA). A host that honours this shows the pattern as a W x H screen.
 *                   (QEMU refuses scanouts smaller than 16 x 16 with ERR_INVALID_PARAMETER.)
 *   wait-display    polls device config events_read (64 polls between PIT reads) until bit 0
 *                   (VIRTIO_GPU_EVENT_DISPLAY) is set, at most 20 s; writes the bits seen to events_clear,
 *                   reads events_read again, polls the ISR (INTx; reading clears it) for at most 1 s until
 *                   bit 1 (configuration change) has been seen (the device may set it just after
 *                   events_read), then GET_DISPLAY_INFO: `GPU display-changed width=<w> height=<h>
 *                   enabled=<e> events-after-clear=<events_read> config-irq=<ISR bit 1 seen, 0|1>`; or
 *                   `GPU wait-display timeout`
 *   hostile         requests a device must refuse with an error response, on resource 2 (32 x 32, format 2,
 *                   created first, backing 2048 bytes: half of what it needs; resource 2 is unreferenced
 *                   first if it exists): `GPU hostile case=<name> resp=<type>` for
 *                     unknown      type 0x0999                                    (want ERR_UNSPEC 0x1200)
 *                     id0          RESOURCE_CREATE_2D resource 0                  (ERR_INVALID_RESOURCE_ID 0x1203)
 *                     format       RESOURCE_CREATE_2D resource 3, format 999      (ERR_INVALID_PARAMETER 0x1205)
 *                     scanout-rect SET_SCANOUT 0,0 33x32 of resource 2            (0x1205)
 *                     scanout-id   SET_SCANOUT scanout 7                          (ERR_INVALID_SCANOUT_ID 0x1202)
 *                     flush-rect   RESOURCE_FLUSH 0,30 32x5                       (0x1205)
 *                     transfer-rect  TRANSFER_TO_HOST_2D 16,16 17x16              (0x1205)
 *                     transfer-backing  TRANSFER_TO_HOST_2D 0,0 32x32 at offset 0: past the 2048-byte backing
 *                                  (0x1205 on porthole-vmm; QEMU 7.2 copies what there is and says 0x1100)
 *                     no-resource  TRANSFER_TO_HOST_2D of resource 99             (0x1203)
 *                     short        an 8-byte request, shorter than a header       (0x1200 on porthole-vmm;
 *                                  QEMU 7.2 never completes it: `GPU timeout type=0x0000`, then no-device)
 *                   then RESOURCE_UNREF 2 and GET_DISPLAY_INFO: `GPU hostile-done unref=<type> info=<type>
 *                   devstatus=<device_status, 2 hex>` (0x1100, 0x1101 and 0f: the device still works)
 *   anything else   `GPU bad-word <word>` (also for malformed numbers or out-of-range arguments)
 * A command without a working device prints `GPU no-device`. Finally `GPU done`, and guest_main returns
 * (power-off).
 */
    .include "virtio.inc"
    .set VIRTIO_GPU_ID, 0x10501AF4  /* device 0x1050 << 16 | vendor 0x1AF4 */
    .set QMAX, 16                   /* queue entries used at most */
    .set TICKS_5S, 5 * 1193182      /* PIT input-clock ticks */
    .set TICKS_20S, 20 * 1193182
    .set TICKS_1S, 1193182
    .set F_EDID, 2                  /* VIRTIO_GPU_F_EDID */
    .set FB_BYTES, 0x40000          /* each of the two pixel buffers: 256 KiB, W*H <= 65536 */
    .set MAX_PIXELS, FB_BYTES / 4

    /* Commands and responses */
    .set GET_DISPLAY_INFO, 0x0100
    .set RESOURCE_CREATE_2D, 0x0101
    .set RESOURCE_UNREF, 0x0102
    .set SET_SCANOUT, 0x0103
    .set RESOURCE_FLUSH, 0x0104
    .set TRANSFER_TO_HOST_2D, 0x0105
    .set RESOURCE_ATTACH_BACKING, 0x0106
    .set GET_EDID, 0x010A
    .set OK_DISPLAY_INFO, 0x1101
    .set OK_EDID, 0x1104
    .set B8G8R8X8, 2

    .set HDR, 24                    /* request and response header */
    .set RESP_NODATA, HDR
    .set RESP_DISPLAY_INFO, HDR + 16 * 24
    .set RESP_EDID, HDR + 8 + 1024

    /* caps: the structures as virtio_pci_caps writes them */
    .set CAP_COMMON, 0
    .set CAP_NOTIFY, 8
    .set CAP_ISR, 16
    .set CAP_DEVCFG, 24

    .text
    .code64
    .globl guest_main
guest_main:
    SAVE
    call driver_start
    movl $VIRTIO_GPU_ID, %edi
    xorl %esi, %esi
    call pci_find
    testl %eax, %eax
    jnz 1f
    leaq msg_none(%rip), %rdi
    call serial_puts
    jmp 2f
1:  movl %eax, gpu_cfg(%rip)
    call gpu_pci_line
    call gpu_init
    call gpu_found_line
2:  leaq cmd_table(%rip), %rdi      /* the command-line words */
    leaq msg_badword(%rip), %rsi
    leaq msg_done(%rip), %rdx
    call run_words
    jmp cmd_ok                      /* restores the callee-saved registers and returns: power-off */

/* ---- Output helpers ---- */

/* put_type(%rdi = text, %esi = response type): the text, then 0x and 4 hex digits (8 above 0xffff) */
put_type:
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

/* gpu_pci_line(): `GPU pci slot=<n> class=<6 hex>` for gpu_cfg */
gpu_pci_line:
    leaq msg_pci(%rip), %rdi
    movl gpu_cfg(%rip), %esi
    shrl $11, %esi
    andl $31, %esi
    call put_kv
    leaq msg_class(%rip), %rdi
    call serial_puts
    movl gpu_cfg(%rip), %edi
    addl $8, %edi
    call pci_read                   /* class << 24 | subclass << 16 | prog-if << 8 | revision */
    shrl $8, %eax
    movl %eax, %edi
    movl $6, %esi
    call serial_puthex
    jmp newline

/* gpu_found_line(): `GPU found ...` when the device is ready, else `GPU error=<reason>` */
gpu_found_line:
    cmpb $0, gpu_ready(%rip)
    jne 1f
    leaq msg_error(%rip), %rdi
    call serial_puts
    movq gpu_err(%rip), %rdi
    call serial_puts
    jmp newline
1:  movq caps + CAP_DEVCFG(%rip), %rax
    movl 8(%rax), %esi              /* num_scanouts */
    leaq msg_found(%rip), %rdi
    call put_kv
    movq caps + CAP_DEVCFG(%rip), %rax
    movl 12(%rax), %esi             /* num_capsets */
    leaq msg_capsets(%rip), %rdi
    call put_kv
    leaq msg_edid_flag(%rip), %rdi
    movzbl gpu_edid(%rip), %esi
    call put_kv
    jmp newline

/* no_device(): `GPU no-device` */
no_device:
    leaq msg_nodevice(%rip), %rdi
    jmp serial_puts

/* ---- Device set-up ---- */

/* gpu_init(): capabilities, reset and full initialisation (see the top of the file) -> gpu_ready = 1, or
   gpu_ready = 0 with gpu_err set. Prints nothing. */
gpu_init:
    pushq %r12
    movb $0, gpu_ready(%rip)
    movb $0, gpu_edid(%rip)
    movl gpu_cfg(%rip), %edi
    leaq caps(%rip), %rsi
    call virtio_pci_caps
    testq %rax, %rax
    jnz 8f
    movq caps + CAP_COMMON(%rip), %r12
    movq %r12, %rdi
    call virtio_reset               /* reset, ACKNOWLEDGE, DRIVER */
    testl %eax, %eax
    leaq err_reset(%rip), %rax
    jnz 8f
    movq %r12, %rdi
    movl $F_EDID, %esi
    call virtio_features
    testq %rax, %rax
    jnz 7f
    shrl $1, %edx                   /* negotiated VIRTIO_GPU_F_EDID */
    andl $1, %edx
    movb %dl, gpu_edid(%rip)
    leaq caps(%rip), %rdi
    xorl %esi, %esi                 /* control queue */
    movl $QMAX, %edx
    leaq ctrl_ring(%rip), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    jz 6f
    movw %ax, ctrl_qsize(%rip)
    movq %rdx, ctrl_notify(%rip)
    leaq caps(%rip), %rdi
    movl $1, %esi                   /* cursor queue */
    movl $QMAX, %edx
    leaq cursor_ring(%rip), %rcx
    call virtio_queue_setup
    testl %eax, %eax
    jz 6f
    movw $1, ctrl_ring + R_AVAIL(%rip)      /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
    movw $1, cursor_ring + R_AVAIL(%rip)
    movw $0, ctrl_avail(%rip)
    movw $0, ctrl_used(%rip)
    movb $0x0F, C_STATUS(%r12)      /* | DRIVER_OK */
    movb $1, gpu_ready(%rip)
    popq %r12
    ret
6:  leaq err_noqueue(%rip), %rax
7:  orb $0x80, C_STATUS(%r12)       /* FAILED */
8:  movq %rax, gpu_err(%rip)
    popq %r12
    ret

/* ---- Requests ---- */

/* req_init(%edi = type): the request buffer cleared (256 bytes), its header's type set */
req_init:
    movl %edi, %r8d
    leaq req_buf(%rip), %rdi
    xorl %eax, %eax
    movl $32, %ecx
    rep stosq
    movl %r8d, req_buf(%rip)
    ret

/* gpu_cmd(%edi = request length, %esi = response length) -> %eax = the response's type. Descriptor 0: the
   request (readable, NEXT -> 1), descriptor 1: the response buffer (writable); published as one avail entry,
   the used idx polled for 5 s. On a timeout prints `GPU timeout type=<hex>`, clears gpu_ready and returns
   0xFFFFFFFF. */
gpu_cmd:
    movl $0xFFFFFFFF, resp_buf(%rip)
    leaq ctrl_ring(%rip), %r9
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
    movzwl ctrl_avail(%rip), %eax   /* publish head 0 */
    movl %eax, %r10d
    movzwl ctrl_qsize(%rip), %ecx
    xorl %edx, %edx
    divl %ecx                       /* %edx = idx % queue size */
    movw $0, R_AVAIL + 4(%r9,%rdx,2)
    incl %r10d
    sfence                          /* ring entry and descriptors before the idx */
    movw %r10w, R_AVAIL + 2(%r9)
    movw %r10w, ctrl_avail(%rip)
    mfence                          /* idx before the notification */
    movq ctrl_notify(%rip), %rax
    movw $0, (%rax)                 /* queue 0 */
    leaq R_USED + 2(%r9), %rdi
    leaq ctrl_used(%rip), %rsi
    movl $TICKS_5S, %edx
    call wait_idx
    testl %eax, %eax
    jz 1f
    movw %dx, ctrl_used(%rip)
    movl resp_buf(%rip), %eax
    ret
1:  leaq msg_timeout(%rip), %rdi
    movl req_buf(%rip), %esi
    call put_type
    call newline
    movb $0, gpu_ready(%rip)
    movl $0xFFFFFFFF, %eax
    ret

/* display_info() -> %eax = response type of GET_DISPLAY_INFO (pmodes[0] in resp_buf + 24) */
display_info:
    movl $GET_DISPLAY_INFO, %edi
    call req_init
    movl $HDR, %edi
    movl $RESP_DISPLAY_INFO, %esi
    jmp gpu_cmd

/* put_mode(): ` width=<w> height=<h>` of pmodes[0] */
put_mode:
    leaq msg_width(%rip), %rdi
    movl resp_buf + HDR + 8(%rip), %esi
    call put_kv
    leaq msg_height(%rip), %rdi
    movl resp_buf + HDR + 12(%rip), %esi
    jmp put_kv

/* ---- Commands: (%rdi = arguments, %rsi = word end) -> %eax = 0, or 1 for a bad word ---- */

cmd_info:
    SAVE
    cmpb $0, gpu_ready(%rip)
    je 9f
    call display_info
    cmpl $OK_DISPLAY_INFO, %eax
    je 1f
    movl %eax, %esi
    leaq msg_info_error(%rip), %rdi
    call put_type
    call newline
    jmp cmd_ok
1:  leaq msg_info(%rip), %rdi
    movl resp_buf + HDR + 16(%rip), %esi
    call put_kv
    call put_mode
    call newline
    jmp cmd_ok
9:  call no_device
    jmp cmd_ok

cmd_edid:
    SAVE
    cmpb $0, gpu_ready(%rip)
    je 9f
    cmpb $0, gpu_edid(%rip)
    jne 1f
    leaq msg_edid_off(%rip), %rdi
    call serial_puts
    jmp cmd_ok
1:  movl $GET_EDID, %edi
    call req_init                   /* scanout 0, padding */
    movl $HDR + 8, %edi
    movl $RESP_EDID, %esi
    call gpu_cmd
    cmpl $OK_EDID, %eax
    je 2f
    movl %eax, %esi
    leaq msg_edid_error(%rip), %rdi
    call put_type
    call newline
    jmp cmd_ok
2:  leaq resp_buf + HDR + 8(%rip), %rbx /* the EDID bytes */
    movl resp_buf + HDR(%rip), %r12d    /* size */
    movzbl 56(%rbx), %r13d          /* preferred width: b[56] | (b[58] >> 4) << 8 */
    movzbl 58(%rbx), %eax
    shrl $4, %eax
    shll $8, %eax
    orl %eax, %r13d
    movzbl 59(%rbx), %r14d          /* height: b[59] | (b[61] >> 4) << 8 */
    movzbl 61(%rbx), %eax
    shrl $4, %eax
    shll $8, %eax
    orl %eax, %r14d
    xorl %r15d, %r15d               /* checksums: size a non-zero multiple of 128, at most 1024 */
    testl %r12d, %r12d
    jz 5f
    cmpl $1024, %r12d
    ja 5f
    testl $127, %r12d
    jnz 5f
    movq %rbx, %rdi
    movl %r12d, %ecx
3:  xorl %eax, %eax                 /* one block */
    movl $128, %edx
4:  addb (%rdi), %al
    incq %rdi
    decl %edx
    jnz 4b
    testb %al, %al
    jnz 5f
    subl $128, %ecx
    jnz 3b
    movl $1, %r15d
5:  leaq msg_edid(%rip), %rdi
    movl %r12d, %esi
    call put_kv
    leaq msg_width(%rip), %rdi
    movl %r13d, %esi
    call put_kv
    leaq msg_height(%rip), %rdi
    movl %r14d, %esi
    call put_kv
    leaq msg_sum(%rip), %rdi
    movl %r15d, %esi
    call put_kv
    call newline
    jmp cmd_ok
9:  call no_device
    jmp cmd_ok

/* draw=W,H: %r12 W, %r13 H, %r14 W*H, %r15 P (pixels in buffer A); the five response types in draw_resp */
cmd_draw:
    SAVE
    ARGS 2
    movq args(%rip), %r12
    movq args + 8(%rip), %r13
    cmpq $2, %r12
    jb cmd_bad
    cmpq $2, %r13
    jb cmd_bad
    cmpq $MAX_PIXELS, %r12
    ja cmd_bad
    cmpq $MAX_PIXELS, %r13
    ja cmd_bad
    movq %r12, %r14
    imulq %r13, %r14
    cmpq $MAX_PIXELS, %r14
    ja cmd_bad
    cmpb $0, gpu_ready(%rip)
    je 9f
    movq %r14, %r15                 /* P = W*H/2 + W/2 */
    shrq $1, %r15
    movq %r12, %rax
    shrq $1, %rax
    addq %rax, %r15

    cmpb $0, drawn(%rip)            /* resource 1 from an earlier draw goes first */
    je 1f
    movl $RESOURCE_UNREF, %edi
    call req_init
    movl $1, req_buf + HDR(%rip)
    movl $HDR + 8, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movb $0, drawn(%rip)
1:  movl $RESOURCE_CREATE_2D, %edi  /* resource_id, format, width, height */
    call req_init
    movl $1, req_buf + HDR(%rip)
    movl $B8G8R8X8, req_buf + HDR + 4(%rip)
    movl %r12d, req_buf + HDR + 8(%rip)
    movl %r13d, req_buf + HDR + 12(%rip)
    movl $HDR + 16, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movl %eax, draw_resp(%rip)
    movb $1, drawn(%rip)

    leaq fb_a(%rip), %rdi           /* the pattern: %rdi where the next pixel goes, %r11 pixels left in A */
    movq %r15, %r11
    xorl %r8d, %r8d                 /* y */
2:  leal (,%r8,4), %r10d            /* G = (4y) & 0xFF, B = 0x80 */
    movzbl %r10b, %r10d
    shll $8, %r10d
    orl $0x80, %r10d
    xorl %ecx, %ecx                 /* x */
3:  leal (,%rcx,4), %eax            /* R = (4x) & 0xFF */
    movzbl %al, %eax
    shll $16, %eax
    orl %r10d, %eax
    movl %eax, (%rdi)
    addq $4, %rdi
    decq %r11
    jnz 4f
    leaq fb_b(%rip), %rdi           /* A is full: the rest goes to B */
4:  incl %ecx
    cmpl %r12d, %ecx
    jb 3b
    incl %r8d
    cmpl %r13d, %r8d
    jb 2b

    movl $RESOURCE_ATTACH_BACKING, %edi /* resource_id, nr_entries, {addr, length, padding} x 2 */
    call req_init
    movl $1, req_buf + HDR(%rip)
    movl $2, req_buf + HDR + 4(%rip)
    leaq fb_a(%rip), %rax
    movq %rax, req_buf + HDR + 8(%rip)
    leal (,%r15,4), %eax
    movl %eax, req_buf + HDR + 16(%rip)
    leaq fb_b(%rip), %rax
    movq %rax, req_buf + HDR + 24(%rip)
    movq %r14, %rax
    subq %r15, %rax
    shll $2, %eax
    movl %eax, req_buf + HDR + 32(%rip)
    movl $HDR + 8 + 32, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movl %eax, draw_resp + 4(%rip)

    movl $TRANSFER_TO_HOST_2D, %edi /* rect, offset u64, resource_id, padding */
    call req_init
    call put_whole_rect
    movl $1, req_buf + HDR + 24(%rip)
    movl $HDR + 32, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movl %eax, draw_resp + 8(%rip)

    movl $SET_SCANOUT, %edi         /* rect, scanout_id, resource_id */
    call req_init
    call put_whole_rect
    movl $1, req_buf + HDR + 20(%rip)
    movl $HDR + 24, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movl %eax, draw_resp + 12(%rip)

    movl $RESOURCE_FLUSH, %edi      /* rect, resource_id, padding */
    call req_init
    call put_whole_rect
    movl $1, req_buf + HDR + 16(%rip)
    movl $HDR + 24, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movl %eax, draw_resp + 16(%rip)

    leaq draw_names(%rip), %rbx     /* the line: five names and types */
    leaq draw_resp(%rip), %r12
    movl $5, %r13d
5:  movq (%rbx), %rdi
    movl (%r12), %esi
    call put_type
    addq $8, %rbx
    addq $4, %r12
    decl %r13d
    jnz 5b
    call newline
    jmp cmd_ok
9:  call no_device
    jmp cmd_ok

/* put_whole_rect(): the request's rect (after the header) <- 0, 0, W, H from %r12, %r13 */
put_whole_rect:
    movl $0, req_buf + HDR(%rip)
    movl $0, req_buf + HDR + 4(%rip)
    movl %r12d, req_buf + HDR + 8(%rip)
    movl %r13d, req_buf + HDR + 12(%rip)
    ret

/* wait-display: %r12 device config, %r13 start tick, %r14 events seen, %rbx polls left, then ISR bits seen */
cmd_wait_display:
    SAVE
    cmpb $0, gpu_ready(%rip)
    je 9f
    movq caps + CAP_DEVCFG(%rip), %r12
    call pit_ticks
    movq %rax, %r13
1:  movl $64, %ebx
2:  movl (%r12), %eax               /* events_read */
    testl $1, %eax
    jnz 3f
    pause
    decl %ebx
    jnz 2b
    call pit_ticks
    subq %r13, %rax
    cmpq $TICKS_20S, %rax
    jb 1b
    leaq msg_wait_timeout(%rip), %rdi
    call serial_puts
    jmp cmd_ok
3:  movl %eax, %r14d
    movl %r14d, 4(%r12)             /* events_clear */
    movl (%r12), %r14d              /* events_read again: 0 now */
    movq caps + CAP_ISR(%rip), %r15 /* the configuration interrupt: ISR bit 1, within 1 s */
    xorl %ebx, %ebx                 /* ISR bits seen (each read clears them) */
    call pit_ticks
    movq %rax, %r13
5:  movzbl (%r15), %eax
    orl %eax, %ebx
    testl $2, %ebx
    jnz 6f
    pause
    call pit_ticks
    subq %r13, %rax
    cmpq $TICKS_1S, %rax
    jb 5b
6:  shrl $1, %ebx
    andl $1, %ebx
    call display_info
    cmpl $OK_DISPLAY_INFO, %eax
    je 4f
    movl %eax, %esi
    leaq msg_info_error(%rip), %rdi
    call put_type
    call newline
    jmp cmd_ok
4:  leaq msg_changed(%rip), %rdi
    call serial_puts
    call put_mode
    leaq msg_enabled(%rip), %rdi
    movl resp_buf + HDR + 16(%rip), %esi
    call put_kv
    leaq msg_after_clear(%rip), %rdi
    movl %r14d, %esi
    call put_kv
    leaq msg_config_irq(%rip), %rdi
    movl %ebx, %esi
    call put_kv
    call newline
    jmp cmd_ok
9:  call no_device
    jmp cmd_ok

/* hostile: %rbx the table entry. Each entry: name, request type, request length, then 8 dwords of fields
   after the header (48 bytes in all). */
cmd_hostile:
    SAVE
    cmpb $0, gpu_ready(%rip)
    je 9f
    movl $RESOURCE_UNREF, %edi      /* resource 2 afresh (an error answer when it does not exist) */
    call req_init
    movl $2, req_buf + HDR(%rip)
    movl $HDR + 8, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movl $RESOURCE_CREATE_2D, %edi
    call req_init
    movl $2, req_buf + HDR(%rip)
    movl $B8G8R8X8, req_buf + HDR + 4(%rip)
    movl $32, req_buf + HDR + 8(%rip)
    movl $32, req_buf + HDR + 12(%rip)
    movl $HDR + 16, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movl $RESOURCE_ATTACH_BACKING, %edi
    call req_init
    movl $2, req_buf + HDR(%rip)
    movl $1, req_buf + HDR + 4(%rip)
    leaq hostile_buf(%rip), %rax
    movq %rax, req_buf + HDR + 8(%rip)
    movl $2048, req_buf + HDR + 16(%rip)
    movl $HDR + 8 + 16, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    leaq hostile_table(%rip), %rbx
1:  cmpq $0, (%rbx)
    je 3f
    movl 8(%rbx), %edi
    call req_init
    leaq req_buf + HDR(%rip), %rdi  /* the fields */
    leaq 16(%rbx), %rsi
    movl $8, %ecx
    rep movsl
    movl 12(%rbx), %edi
    movl $RESP_DISPLAY_INFO, %esi   /* room for any answer */
    call gpu_cmd
    movl %eax, %r12d
    leaq msg_hostile(%rip), %rdi
    call serial_puts
    movq (%rbx), %rdi
    call serial_puts
    leaq msg_resp(%rip), %rdi
    movl %r12d, %esi
    call put_type
    call newline
    cmpb $0, gpu_ready(%rip)        /* a timeout: give up */
    je 9f
    addq $48, %rbx
    jmp 1b
3:  movl $RESOURCE_UNREF, %edi
    call req_init
    movl $2, req_buf + HDR(%rip)
    movl $HDR + 8, %edi
    movl $RESP_NODATA, %esi
    call gpu_cmd
    movl %eax, %r12d
    call display_info
    movl %eax, %r13d
    leaq msg_hostile_done(%rip), %rdi
    movl %r12d, %esi
    call put_type
    leaq msg_info_type(%rip), %rdi
    movl %r13d, %esi
    call put_type
    movq caps + CAP_COMMON(%rip), %rdi
    call put_devstatus
    jmp cmd_ok
9:  call no_device
    jmp cmd_ok

    .section .rodata
    .p2align 3
cmd_table:
    .quad cmdn_info, cmd_info
    .quad cmdn_edid, cmd_edid
    .quad cmdn_draw, cmd_draw
    .quad cmdn_wait_display, cmd_wait_display
    .quad cmdn_hostile, cmd_hostile
    .quad 0, 0
draw_names:
    .quad msg_draw, msg_attach, msg_transfer, msg_scanout, msg_flush

/* The hostile cases (see cmd_hostile): name, type, request length, 8 field dwords */
    .macro HCASE name, type, len, f0=0, f1=0, f2=0, f3=0, f4=0, f5=0, f6=0, f7=0
    .quad \name
    .long \type, \len
    .long \f0, \f1, \f2, \f3, \f4, \f5, \f6, \f7
    .endm
hostile_table:
    HCASE hn_unknown, 0x0999, HDR
    HCASE hn_id0, RESOURCE_CREATE_2D, HDR + 16, 0, B8G8R8X8, 16, 16
    HCASE hn_format, RESOURCE_CREATE_2D, HDR + 16, 3, 999, 16, 16
    HCASE hn_scanout_rect, SET_SCANOUT, HDR + 24, 0, 0, 33, 32, 0, 2
    HCASE hn_scanout_id, SET_SCANOUT, HDR + 24, 0, 0, 32, 32, 7, 2
    HCASE hn_flush_rect, RESOURCE_FLUSH, HDR + 24, 0, 30, 32, 5, 2
    HCASE hn_transfer_rect, TRANSFER_TO_HOST_2D, HDR + 32, 16, 16, 17, 16, 0, 0, 2
    HCASE hn_transfer_backing, TRANSFER_TO_HOST_2D, HDR + 32, 0, 0, 32, 32, 0, 0, 2
    HCASE hn_no_resource, TRANSFER_TO_HOST_2D, HDR + 32, 0, 0, 1, 1, 0, 0, 99
    HCASE hn_short, 0, 8
    .quad 0

cmdn_info:          .asciz "info"
cmdn_edid:          .asciz "edid"
cmdn_draw:          .asciz "draw="
cmdn_wait_display:  .asciz "wait-display"
cmdn_hostile:       .asciz "hostile"
hn_unknown:         .asciz "unknown"
hn_id0:             .asciz "id0"
hn_format:          .asciz "format"
hn_scanout_rect:    .asciz "scanout-rect"
hn_scanout_id:      .asciz "scanout-id"
hn_flush_rect:      .asciz "flush-rect"
hn_transfer_rect:   .asciz "transfer-rect"
hn_transfer_backing: .asciz "transfer-backing"
hn_no_resource:     .asciz "no-resource"
hn_short:           .asciz "short"

msg_none:           .asciz "GPU none\n"
msg_pci:            .asciz "GPU pci slot="
msg_class:          .asciz " class="
msg_found:          .asciz "GPU found scanouts="
msg_capsets:        .asciz " capsets="
msg_edid_flag:      .asciz " edid="
msg_error:          .asciz "GPU error="
msg_nodevice:       .asciz "GPU no-device\n"
msg_badword:        .asciz "GPU bad-word "
msg_done:           .asciz "GPU done\n"
msg_timeout:        .asciz "GPU timeout type="
msg_0x:             .asciz "0x"
msg_info:           .asciz "GPU info enabled="
msg_info_error:     .asciz "GPU info error="
msg_width:          .asciz " width="
msg_height:         .asciz " height="
msg_edid:           .asciz "GPU edid size="
msg_edid_off:       .asciz "GPU edid not-negotiated\n"
msg_edid_error:     .asciz "GPU edid error="
msg_sum:            .asciz " sum="
msg_draw:           .asciz "GPU draw create="
msg_attach:         .asciz " attach="
msg_transfer:       .asciz " transfer="
msg_scanout:        .asciz " scanout="
msg_flush:          .asciz " flush="
msg_changed:        .asciz "GPU display-changed"
msg_enabled:        .asciz " enabled="
msg_after_clear:    .asciz " events-after-clear="
msg_config_irq:     .asciz " config-irq="
msg_wait_timeout:   .asciz "GPU wait-display timeout\n"
msg_hostile:        .asciz "GPU hostile case="
msg_resp:           .asciz " resp="
msg_hostile_done:   .asciz "GPU hostile-done unref="
msg_info_type:      .asciz " info="
err_reset:          .asciz "reset-timeout"
err_noqueue:        .asciz "no-queue"

    .section .bss
    .p2align 3
gpu_cfg:                            /* config address of register 0 */
    .skip 4
gpu_ready:
    .skip 1
gpu_edid:
    .skip 1
drawn:                              /* resource 1 exists */
    .skip 1
    .p2align 3
gpu_err:
    .skip 8
caps:                               /* common, notify, ISR, device config; notify_off_multiplier */
    .skip 40
ctrl_notify:
    .skip 8
ctrl_qsize:
    .skip 2
ctrl_avail:                         /* next avail idx */
    .skip 2
ctrl_used:                          /* last used idx seen */
    .skip 2
    .p2align 3
args:
    .skip 2 * 8
draw_resp:
    .skip 5 * 4
    .p2align 6
req_buf:
    .skip 256
resp_buf:
    .skip 2048
    .p2align 12
ctrl_ring:
    .skip 4096
cursor_ring:
    .skip 4096
hostile_buf:
    .skip 4096
fb_a:                               /* the two halves of draw's backing, a page apart */
    .skip FB_BYTES
    .skip 4096
fb_b:
    .skip FB_BYTES

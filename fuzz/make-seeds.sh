#!/usr/bin/env bash
# Writes the seed corpora of the iso and qcow2 targets (small real images made by xorriso and qemu-img).
# The RFB seeds come from `cargo run -p vmm-core --features fuzzing --example fuzz_corpus -- fuzz/corpus`.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir -p corpus/iso corpus/qcow2 "$tmp/root/boot"
# ISOs: plain, BIOS El Torito, BIOS + UEFI El Torito. The target's input starts at sector 16; everything
# after the boot catalog is cut off (the reader never looks there).
echo hello > "$tmp/root/readme.txt"
head -c 2048 /dev/zero > "$tmp/root/boot/bios.img"
head -c 2048 /dev/zero > "$tmp/root/boot/efi.img"
iso() {
    local name=$1
    shift
    xorriso -as mkisofs -quiet -sysid LINUX -V "PORTHOLE_$name" -publisher porthole -A fuzz -o "$tmp/$name.iso" "$@" "$tmp/root"
    python3 - "$tmp/$name.iso" "corpus/iso/$name" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
end = 19 * 2048
for n in range(16, 32):
    d = data[n * 2048:(n + 1) * 2048]
    if d[0] == 0 and d[7:30] == b"EL TORITO SPECIFICATION":
        end = max(end, (int.from_bytes(d[71:75], "little") + 1) * 2048)
    if d[0] == 255:
        end = max(end, (n + 1) * 2048)
        break
open(sys.argv[2], "wb").write(data[16 * 2048:end])
PY
}
iso plain
iso bios -b boot/bios.img -no-emul-boot -boot-load-size 4
iso bios-uefi -b boot/bios.img -no-emul-boot -eltorito-alt-boot -e boot/efi.img -no-emul-boot

# Disk images: qcow2 v2 and v3 with 512-byte clusters (small files), data, compressed clusters, zero
# clusters, extended L2 entries, a raw image.
python3 -c "import sys; sys.stdout.buffer.write(bytes(range(256)) * 32 + b'\0' * 8192 + b'porthole' * 512)" > "$tmp/data.raw"
qemu-img create -q -f qcow2 -o cluster_size=512 corpus/qcow2/empty-v3 1M
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 corpus/qcow2/empty-v2 64M
qemu-img convert -q -f raw -O qcow2 -o cluster_size=512 "$tmp/data.raw" corpus/qcow2/data
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512 "$tmp/data.raw" corpus/qcow2/compressed
qemu-img convert -q -f raw -O qcow2 -o cluster_size=16384,extended_l2=on "$tmp/data.raw" "$tmp/ext.qcow2"
[ "$(stat -c %s "$tmp/ext.qcow2")" -le 65536 ] && cp "$tmp/ext.qcow2" corpus/qcow2/extended-l2
head -c 4096 "$tmp/data.raw" > corpus/qcow2/raw
ls -l corpus/iso corpus/qcow2

# Device register sequences: device, 64 bytes of guest memory at 0x1000, 6-byte operations (kind: bit 0
# write, bits 1-2 log2 of the size, bit 3 host input into the i8042; offset; value, little-endian).
mkdir -p corpus/devices
python3 - <<'PY'
import struct
def op(kind, offset, value=0):
    return bytes([kind, offset]) + struct.pack("<I", value & 0xffffffff)
W1, R1, W2, R2, W4, R4, HOST = 1, 0, 3, 2, 5, 4, 8
def seed(name, device, ops, memory=b""):
    open("corpus/devices/" + name, "wb").write(bytes([device]) + memory.ljust(64, b"\0") + b"".join(ops))
# i8042: read and write the configuration byte, self-test, enable both ports, keyboard LEDs and scancode
# set, mouse reset / sample rate / enable, host keys and motion read back, reset through the controller.
seed("i8042", 0, [op(W1, 4, 0x20), op(R1, 0), op(W1, 4, 0x60), op(W1, 0, 0x47), op(W1, 4, 0xAA), op(R1, 0),
    op(W1, 4, 0xAE), op(W1, 4, 0xA8), op(W1, 0, 0xED), op(R1, 0), op(W1, 0, 0x07), op(R1, 0), op(W1, 0, 0xF0),
    op(W1, 0, 0x02), op(W1, 4, 0xD4), op(W1, 0, 0xFF), op(R1, 0), op(R1, 0), op(W1, 4, 0xD4), op(W1, 0, 0xF3),
    op(W1, 4, 0xD4), op(W1, 0, 200), op(W1, 4, 0xD4), op(W1, 0, 0xF4), op(HOST, 0, 0x01_05_fb_1c), op(R1, 4),
    op(R1, 0), op(R1, 0), op(R1, 0), op(R1, 0), op(W1, 4, 0xD0), op(R1, 0), op(W1, 4, 0xFE)])
# fw_cfg: the signature and the file directory through the data port, then a DMA read of the directory
# (descriptor at 0x1000: control, length, address, big-endian).
dma = struct.pack(">IIQ", 0x19 << 16 | 0x08 | 0x02, 64, 0x2000)
seed("fw_cfg", 1, [op(W2, 0, 0x0000), op(R1, 1), op(R1, 1), op(R1, 1), op(R1, 1), op(W2, 0, 0x0019),
    op(R4, 1), op(R1, 1), op(R1, 1), op(R4, 4), op(R4, 8), op(W4, 4, 0), op(W4, 8, 0x00100000)], dma)
# VGA: CRTC start address and cursor (0x3D4/0x3D5), the attribute controller's flip-flop (0x3DA, 0x3C0),
# the DAC (0x3C8/0x3C9), the miscellaneous output register.
seed("vga", 2, [op(W1, 0x14, 0x0C), op(W1, 0x15, 0x01), op(W1, 0x14, 0x0E), op(W1, 0x15, 0x02), op(R1, 0x15),
    op(R1, 0x1A), op(W1, 0x00, 0x10), op(W1, 0x00, 0x01), op(R1, 0x01), op(W1, 0x08, 0x05), op(W1, 0x09, 0x3F),
    op(W1, 0x09, 0x00), op(W1, 0x09, 0x20), op(W1, 0x07, 0x05), op(R1, 0x09), op(W1, 0x02, 0x67), op(R1, 0x0C)])
# DISPI: id, a 1024x768x32 mode with a virtual width and offsets, enable with LFB, capabilities.
regs = [(0, 0xB0C5), (4, 0), (1, 1024), (2, 768), (3, 32), (6, 1280), (8, 16), (9, 8), (4, 0x41), (4, 0x02)]
ops = []
for index, value in regs:
    ops += [op(W2, 0, index), op(W2, 1, value), op(R2, 1)]
seed("dispi", 3, ops)
PY

# virtio-blk requests as a driver posts them: n, n descriptors, the 16-byte header, k, k heads, the avail
# index advance (see fuzz_targets/virtio_blk.rs).
mkdir -p corpus/virtio_blk
python3 - <<'PY'
import struct
NEXT, WRITE, INDIRECT = 1, 2, 4
HDR, STATUS, DATA = 0x1_0000, 0x2_0000, 0x10_0000
def desc(addr, length, flags, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)
def seed(name, descs, kind, sector, heads, advance=1, flags=0):
    hdr = struct.pack("<IIQ", kind, 0, sector)
    d = bytes([(len(descs) - 1) | flags]) + b"".join(descs) + hdr
    d += bytes([len(heads) - 1]) + b"".join(struct.pack("<H", h) for h in heads) + struct.pack("<H", advance)
    open("corpus/virtio_blk/" + name, "wb").write(d)
three = lambda data_flags, length=512: [desc(HDR, 16, NEXT, 1), desc(DATA, length, data_flags | NEXT, 2), desc(STATUS, 1, WRITE)]
seed("read", three(WRITE), 0, 0, [0])
seed("read-last-sector", three(WRITE, 1024), 0, 126, [0])
seed("write", three(0), 1, 8, [0])
seed("write-read-only", three(0), 1, 8, [0], flags=0x80)
seed("flush", [desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE)], 4, 0, [0])
seed("get-id", three(WRITE, 20), 8, 0, [0])
seed("discard", three(0, 16), 11, 0, [0])
seed("write-zeroes", three(0, 16), 13, 0, [0])
seed("two-requests", three(WRITE) + [desc(HDR, 16, NEXT, 4), desc(STATUS + 1, 1, WRITE)], 0, 2, [0, 3], 2)
seed("segments", [desc(HDR, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 2), desc(DATA + 0x1000, 1536, WRITE | NEXT, 3), desc(STATUS, 1, WRITE)], 0, 4, [0])
seed("indirect", [desc(0x5000, 48, INDIRECT)], 0, 0, [0])
seed("loop", [desc(HDR, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 0)], 0, 0, [0])
seed("avail-jump", three(WRITE), 0, 0, [0], 1000)
PY

# Kernels for the loaders target: byte 0 picks RAM and initrd (see the target), then the file. The
# micro-guests (PVH ELF64, ELF32 PVH, Multiboot 1 and 2) as cargo built them, and two bzImages made here
# (one setup sector; the 64-bit entry flag on and off).
mkdir -p corpus/loaders
out=$(ls -td ../target/*/build/porthole-guests-*/out 2>/dev/null | head -n 1)
[ -n "$out" ] || { echo "build the workspace first (cargo build): no micro-guests in ../target" >&2; exit 1; }
pick=0
for g in hello pvh32 multiboot1 multiboot2; do
    { printf "\\x$(printf %02x $pick)"; cat "$out/$g.elf"; } > "corpus/loaders/$g"
    pick=$(( (pick + 5) % 16 ))
done
python3 - corpus/loaders <<'PY'
import struct, sys
def bzimage(xloadflags):
    v = bytearray(0x800)
    v[0x1F1] = 1                                   # setup_sects
    v[0x1FE:0x200] = b"\x55\xaa"
    v[0x202:0x206] = b"HdrS"
    v[0x206:0x208] = struct.pack("<H", 0x020C)     # boot protocol 2.12
    v[0x211] = 1                                   # loadflags: LOADED_HIGH
    v[0x214:0x218] = struct.pack("<I", 0x100000)   # code32_start
    v[0x22C:0x230] = struct.pack("<I", 0x37FFFFFF) # initrd_addr_max
    v[0x236:0x238] = struct.pack("<H", xloadflags)
    v[0x400:0x800] = b"\xf4" * 0x400               # hlt
    return bytes(v)
open(sys.argv[1] + "/bzimage64", "wb").write(b"\x05" + bzimage(1))
open(sys.argv[1] + "/bzimage32", "wb").write(b"\x0a" + bzimage(0))
PY

# The virtio_devices target: a working exchange per device, in the target's operations (see its header).
mkdir -p corpus/virtio_devices
python3 - corpus/virtio_devices <<'PY'
import struct, sys
out = sys.argv[1]
W, N = 2, 1  # VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT
def desc(q, i, addr, ln, flags, nxt=0): return bytes([0, q, i]) + struct.pack("<IIHH", addr, ln, flags, nxt)
def mem(off, b): return bytes([1]) + struct.pack("<H", off) + b.ljust(16, b"\0")[:16]
def publish(q, head): return bytes([2, q]) + struct.pack("<HH", head, 1)
def cfg_read(off, ln): return bytes([4, off, {1: 0, 2: 1, 4: 2}[ln]])
def cfg_write(off, val): return bytes([3, off, 2]) + struct.pack("<I", val)
def wait(q): return bytes([6, q])
def frame(b): return bytes([5]) + struct.pack("<H", len(b)) + b
seeds = {}
# scsi: INQUIRY to LUN 0 on the request queue (2): header at 0x10000 -> response at 0x10100 -> data 0x10200.
cdb = bytes([0x12, 0, 0, 0, 36, 0]).ljust(32, b"\0")
req = bytes([1, 0, 0x40, 0, 0, 0, 0, 0]) + struct.pack("<Q", 7) + bytes([0, 0, 0]) + cdb
ops = b"".join(mem(i, req[16 * i:16 * i + 16]) for i in range(4))
ops += desc(2, 0, 0x10000, 51, N, 1) + desc(2, 1, 0x10100, 108, W | N, 2) + desc(2, 2, 0x10200, 36, W)
ops += publish(2, 0) + wait(2) + cfg_read(0, 4) + cfg_write(32, 96)
seeds["scsi-inquiry"] = b"\x00" + ops
# input (tablet, keyboard): event buffers on queue 0, the configuration's name and bitmaps (select/subsel).
for which, name in ((1, "tablet"), (2, "keyboard")):
    ops = b"".join(desc(0, i, 0x10000 + 8 * i, 8, W) + publish(0, i) for i in range(4))
    ops += cfg_write(0, 1) + cfg_read(2, 1) + cfg_read(8, 4) + cfg_write(0, 0x11) + cfg_read(8, 4)
    ops += desc(1, 0, 0x11000, 8, 0) + mem(0x100, struct.pack("<HHI", 0x11, 1, 1)) + publish(1, 0) + wait(1)
    seeds["input-" + name] = bytes([which]) + ops
# balloon: inflate 4 pages (u32 page numbers at 0x10000), deflate them, the configuration.
pfns = struct.pack("<4I", 0x20, 0x21, 0x22, 0x23)
ops = mem(0, pfns) + desc(0, 0, 0x10000, 16, 0) + publish(0, 0) + wait(0)
ops += desc(1, 0, 0x10000, 16, 0) + publish(1, 0) + wait(1) + cfg_read(0, 4) + cfg_write(4, 1)
seeds["balloon-inflate-deflate"] = b"\x03" + ops
# net: receive buffers on queue 0, an ARP frame from the network, a frame sent on queue 1 (12-byte header).
arp = b"\xff" * 6 + b"\x02\0\0\0\0\x01" + b"\x08\x06" + bytes(28)
ops = b"".join(desc(0, i, 0x10000 + 0x800 * i, 0x800, W) + publish(0, i) for i in range(2))
ops += frame(arp) + wait(0)
hdr_and_frame = bytes(12) + arp
ops += b"".join(mem(0x200 + i, hdr_and_frame[16 * i:16 * i + 16]) for i in range(4))
ops += desc(1, 0, 0x12000, len(hdr_and_frame), 0) + publish(1, 0) + wait(1) + cfg_read(0, 4) + cfg_read(6, 2)
seeds["net-arp"] = b"\x04" + ops
for name, data in seeds.items():
    open(f"{out}/{name}", "wb").write(data)
PY

# The pci target: what firmware does (every slot's IDs, BAR sizing and placement, decoding on), then
# accesses to the BARs through the window (offsets in the window: VRAM at 0, the VGA registers at 16 MiB,
# the virtio BAR at 16 MiB + 32 KiB), a BAR moved over another, and a reset control write.
mkdir -p corpus/pci
python3 - corpus/pci <<'PY'
import struct, sys
out = sys.argv[1]
def latch(slot, reg): return b"\x00" + struct.pack("<I", 0x80000000 | slot << 11 | reg << 2)
def wr(val, size=4, off=0): return b"\x01" + bytes([off, {1: 0, 2: 1, 4: 2}[size]]) + struct.pack("<I", val)
def rd(size=4, off=0): return b"\x02" + bytes([off, {1: 0, 2: 1, 4: 2}[size]])
def wwin(off, val, size=4): return b"\x03" + struct.pack("<I", off) + bytes([{1: 0, 2: 1, 4: 2, 8: 3}[size]]) + struct.pack("<Q", val)
def rwin(off, size=4): return b"\x04" + struct.pack("<I", off) + bytes([{1: 0, 2: 1, 4: 2, 8: 3}[size]])
enum = b""
for slot in range(4):
    enum += latch(slot, 0) + rd()
    for bar in range(6):
        enum += latch(slot, 4 + bar) + rd() + wr(0xFFFFFFFF) + rd() + wr(0)
    enum += latch(slot, 1) + rd(2) + wr(0x7, 2)
place = latch(1, 4) + wr(0xC0000000) + latch(1, 6) + wr(0xC1000000) + latch(2, 4) + wr(0xC1008000)
place += latch(2, 1) + wr(0x7, 2)
virtio = rwin(0x1008000) + wwin(0x1008014, 0x3, 1) + wwin(0x1008000, 0) + rwin(0x1008004) + rwin(0x1008000 + 0x1000, 1)
vga = wwin(0x1000500, 0x4, 2) + rwin(0x1000500, 2) + wwin(0x0, 0x00FF00FF) + rwin(0x10, 8)
overlap = latch(2, 4) + wr(0xC1000000) + rwin(0x1000000) + latch(1, 1) + wr(0, 2) + rwin(0x1000000)
seeds = {"enumerate": enum, "enumerate-place-access": enum + place + virtio + vga,
         "bars-overlap": place + overlap + b"\x05\x02", "config-reads": latch(2, 0x10) + rd(1, 3) + rd(2, 2)}
for name, data in seeds.items():
    open(f"{out}/{name}", "wb").write(data)
PY

# The websocket target: byte 0 (bit 0 the serial stream, bits 1-2 the writes the rest is cut into), then the
# client's frames after the upgrade: masked as a client must, RFB inside binary frames (the 3.8 handshake,
# no security, shared ClientInit, SetEncodings, an update request, a key and a pointer event, cut text),
# a ping, a text frame, a fragmented message, 16- and 64-bit lengths, an unmasked frame, a close.
mkdir -p corpus/websocket
python3 - corpus/websocket <<'PY'
import struct, sys, os
out = sys.argv[1]
MASK = b"\x12\x34\x56\x78"
def frame(opcode, payload, fin=True, masked=True, wide=None):
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    m = 0x80 if masked else 0
    if wide == 64 or n > 0xFFFF:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    elif wide == 16 or n > 125:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | n])
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
close = frame(8, struct.pack(">H", 1000))
rfb = [b"RFB 003.008\n", b"\x01", b"\x01",
       struct.pack(">BBHiiii", 2, 0, 4, 16, 7, 1, -223),
       struct.pack(">BBHHHH", 3, 0, 0, 0, 640, 480),
       struct.pack(">BBHI", 4, 1, 0, 0x61), struct.pack(">BBHI", 4, 0, 0, 0x61),
       struct.pack(">BBHH", 5, 1, 10, 20),
       struct.pack(">BBBBI", 6, 0, 0, 0, 5) + b"hello"]
seeds = {
    "console-session": b"\x00" + b"".join(frame(2, m) for m in rfb) + close,
    "console-one-frame-in-pieces": b"\x06" + frame(2, b"".join(rfb)) + close,
    "console-fragmented": b"\x00" + frame(2, rfb[0][:4], fin=False) + frame(9, b"ping") + frame(0, rfb[0][4:]) + close,
    "console-wide-lengths": b"\x00" + frame(2, rfb[0], wide=16) + frame(2, rfb[1], wide=64) + close,
    "console-text-and-unmasked": b"\x00" + frame(1, b"RFB 003.008\n") + frame(2, rfb[0], masked=False),
    "console-no-close": b"\x02" + b"".join(frame(2, m) for m in rfb[:4]),
    "serial-text-ping-close": b"\x01" + frame(1, b"ls\n") + frame(9, b"") + frame(10, b"x") + close,
    "serial-binary-pieces": b"\x07" + frame(2, bytes(range(200))) + close,
}
for name, data in seeds.items():
    open(os.path.join(out, name), "wb").write(data)
PY

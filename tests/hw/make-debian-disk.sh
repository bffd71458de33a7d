#!/usr/bin/env bash
# Builds the installed Debian disk of the hardware tier's `disk` scenario (./x test-hw --all, or
# ./x test-hw disk): $OUT/debian.img (default <repo>/target/hw-disk), a 3 GiB sparse raw image with an MBR,
# one bootable ext4 partition and a minimal Debian 12 on it (debootstrap --variant=minbase with
# linux-image-amd64, grub-pc, systemd-sysv, udev), GRUB in the MBR gap (grub-install --target=i386-pc).
#
# The scenario (tests/hw/scenarios/disk.sh) carries the image into L1 as a virtio-blk drive (QEMU
# snapshot=on, so this file stays clean) and boots it on porthole-vmm from /dev/vda: SeaBIOS -> GRUB
# (console and serial) -> Linux (console=tty0 console=ttyS0,115200 nomodeset: the VGA console stays in
# text mode, which the harness reads glyph by glyph over RFB) -> systemd -> a getty on ttyS0 and on tty1.
# The harness (tests/tests/hw.rs) waits for "porthole-disk login:" on serial and a "login:" row on screen.
# root has no password: the test only looks for the prompts.
#
# Built once: rebuilt only when the image is missing or this script changed (its hash is in .stamp).
# Needs root (loop devices, mounts, chroot) and network access to the Debian mirror apt already uses
# (PORTHOLE_DEBIAN_MIRROR overrides it). Every loop device and mount it makes is undone on exit.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$SCRIPT_DIR/../.." && pwd)
OUT=${PORTHOLE_HW_DISK_DIR:-$REPO/target/hw-disk}
IMG=$OUT/debian.img
STAMP=$OUT/.stamp
SIZE=3G
HOST=porthole-disk

log() { printf 'hw-disk: %s\n' "$*" >&2; }
die() { printf 'hw-disk: error: %s\n' "$*" >&2; exit 1; }

HASH=$(sha256sum "$0" | cut -d' ' -f1)
if [[ -f $IMG && -f $STAMP && $(cat "$STAMP") == "$HASH" ]]; then
    log "$IMG is up to date"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "building $IMG needs root (loop devices, mounts, chroot): run this script with sudo"

missing=()
for pair in debootstrap:debootstrap sfdisk:fdisk losetup:mount mkfs.ext4:e2fsprogs; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The bookworm mirror apt uses here (deb822 .sources first, then one-line lists), as packaging/test.sh.
mirror() {
    [[ -n ${PORTHOLE_DEBIAN_MIRROR:-} ]] && { echo "$PORTHOLE_DEBIAN_MIRROR"; return; }
    local m
    m=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [[ -z $m ]] && m=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    echo "${m:-http://deb.debian.org/debian}"
}

mkdir -p "$OUT"
TMP=$IMG.tmp
MNT=$OUT/mnt
LOOP=""
MOUNTS=()
cleanup() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true
    done
    MOUNTS=()
    [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null
    [[ -n ${MADE_NODE:-} ]] && rm -f "$MADE_NODE"
    LOOP=""
    [[ ${DONE:-} == 1 ]] || rm -f "$TMP"
}
trap cleanup EXIT
mnt() { mount "$@" && MOUNTS+=("${!#}"); }

rm -f "$TMP" "$STAMP"
truncate -s "$SIZE" "$TMP"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$TMP"
LOOP=$(losetup -P -f --show "$TMP")
PART=${LOOP}p1
for _ in $(seq 20); do [[ -b $PART ]] && break; sleep 0.1; done
# In a container the kernel may not scan the table on its own: ask it to (partx), and make the node
# from sysfs where no udev or devtmpfs makes it.
[[ -b $PART ]] || partx -a "$LOOP" 2>/dev/null || true
SYS=/sys/class/block/$(basename "$PART")
if [[ ! -b $PART && -f $SYS/dev ]]; then
    mknod "$PART" b "$(cut -d: -f1 "$SYS/dev")" "$(cut -d: -f2 "$SYS/dev")"
    MADE_NODE=$PART
fi
[[ -b $PART ]] || die "no partition device $PART after losetup -P"
# No features GRUB 2.06 cannot read.
mkfs.ext4 -q -L porthole-root -O ^metadata_csum_seed,^orphan_file "$PART"
UUID=$(blkid -s UUID -o value "$PART")
mkdir -p "$MNT"
mnt "$PART" "$MNT"

MIRROR=$(mirror)
log "debootstrap bookworm from $MIRROR into $PART (log: $OUT/debootstrap.log)"
t0=$SECONDS
debootstrap --variant=minbase --include=linux-image-amd64,grub-pc,systemd-sysv,udev bookworm "$MNT" "$MIRROR" \
    >"$OUT/debootstrap.log" 2>&1 || { tail -n 30 "$OUT/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap took $((SECONDS - t0)) s"

mnt --bind /dev "$MNT/dev"
mnt --bind /proc "$MNT/proc"
mnt --bind /sys "$MNT/sys"
in_root() { chroot "$MNT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C DEBIAN_FRONTEND=noninteractive "$@"; }

echo "$HOST" > "$MNT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$HOST" > "$MNT/etc/hosts"
printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$UUID" > "$MNT/etc/fstab"
in_root passwd -d root >/dev/null
in_root systemctl enable serial-getty@ttyS0.service getty@tty1.service >/dev/null 2>&1

# A small initramfs: only what finds a virtio-blk ext4 root (TCG unpacks every byte of it).
sed -i 's/^MODULES=.*/MODULES=list/' "$MNT/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$MNT/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all >/dev/null 2>&1 || die "update-initramfs failed"

cat > "$MNT/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
# nomodeset: no bochs-drm, so the VGA console stays in text mode (the harness reads it over RFB).
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 nomodeset"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_GFXPAYLOAD_LINUX=text
GRUB_DISABLE_OS_PROBER=true
EOF
in_root grub-install --target=i386-pc "$LOOP" >"$OUT/grub.log" 2>&1 || { cat "$OUT/grub.log" >&2; die "grub-install failed"; }
in_root update-grub >>"$OUT/grub.log" 2>&1 || { cat "$OUT/grub.log" >&2; die "update-grub failed"; }
# Without udev here there is no /dev/disk/by-uuid, and grub-mkconfig then names the loop partition.
sed -i -E "s#root=/dev/loop[0-9]+p1#root=UUID=$UUID#g" "$MNT/boot/grub/grub.cfg"
grep -q "root=UUID=$UUID" "$MNT/boot/grub/grub.cfg" || die "grub.cfg boots no root=UUID=$UUID"
in_root apt-get clean

sync
DONE=1
cleanup
trap - EXIT
mv "$TMP" "$IMG"
echo "$HASH" > "$STAMP"
log "done in $((SECONDS - t0)) s: $IMG ($(du -h "$IMG" | cut -f1) used of $SIZE)"

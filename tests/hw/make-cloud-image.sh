#!/usr/bin/env bash
# Builds the cloud image of the hardware tier's `cloud` scenario (./x test-hw --all, or ./x test-hw cloud):
# $OUT/debian-cloud.qcow2 (default <repo>/target/hw-cloud), a Debian 12 cloud image the way distributions
# make theirs: an MBR disk with one ext4 partition holding debootstrap's minbase with linux-image-amd64,
# grub-pc, systemd, cloud-init and openssh-server, GRUB in the MBR gap, then `qemu-img convert -O qcow2 -c`
# (zlib-compressed clusters, which Porthole's qcow2 reader must handle).
#
# What makes it a cloud image:
# - No user, no root password, no SSH host keys, no hostname of its own: cloud-init makes all of them on the
#   first boot from the NoCloud seed (a read-only ISO 9660 drive labelled cidata that portholed attaches).
# - cloud-init's datasources are limited to NoCloud (and None), so it does not probe cloud metadata servers.
# - The network: systemd-networkd takes DHCP on every en*/eth* link (passt answers it); cloud-init's own
#   network configuration is off, so networking does not hang on a renderer cloud-init may not find.
# - ssh.service starts after cloud-init.service (which writes the host keys and the user's authorized keys);
#   should cloud-init fail, `ssh-keygen -A` still gives sshd host keys.
# - GRUB boots Linux with console=ttyS0 (porthole-vmm's serial, the daemon's serial log).
# - Small: --no-install-recommends, apt caches and lists removed, kernel modules no VM uses (GPU, sound,
#   wireless, media, InfiniBand, staging) removed, free blocks trimmed before the conversion.
#
# Built once: rebuilt only when the image is missing or this script changed (its hash is in .stamp).
# Needs root (loop devices, mounts, chroot) and network access to the Debian mirror apt already uses
# (PORTHOLE_DEBIAN_MIRROR overrides it). Every loop device and mount it makes is undone on exit.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$SCRIPT_DIR/../.." && pwd)
OUT=${PORTHOLE_HW_CLOUD_DIR:-$REPO/target/hw-cloud}
IMG=$OUT/debian-cloud.qcow2
STAMP=$OUT/.stamp
SIZE=2G

log() { printf 'hw-cloud: %s\n' "$*" >&2; }
die() { printf 'hw-cloud: error: %s\n' "$*" >&2; exit 1; }

HASH=$(sha256sum "$0" | cut -d' ' -f1)
if [[ -f $IMG && -f $STAMP && $(cat "$STAMP") == "$HASH" ]]; then
    log "$IMG is up to date"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "building $IMG needs root (loop devices, mounts, chroot): run this script with sudo"

missing=()
for pair in debootstrap:debootstrap sfdisk:fdisk losetup:mount mkfs.ext4:e2fsprogs qemu-img:qemu-utils; do
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
RAW=$OUT/debian-cloud.raw.tmp
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
    rm -f "$RAW"
    [[ ${DONE:-} == 1 ]] || rm -f "$TMP"
}
trap cleanup EXIT
mnt() { mount "$@" && MOUNTS+=("${!#}"); }

rm -f "$RAW" "$TMP" "$STAMP"
truncate -s "$SIZE" "$RAW"
echo 'label: dos
start=2048, type=83, bootable' | sfdisk -q "$RAW"
LOOP=$(losetup -P -f --show "$RAW")
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
mkfs.ext4 -q -L cloudimg-rootfs -O ^metadata_csum_seed,^orphan_file "$PART"
UUID=$(blkid -s UUID -o value "$PART")
mkdir -p "$MNT"
mnt "$PART" "$MNT"

MIRROR=$(mirror)
log "debootstrap bookworm from $MIRROR into $PART (log: $OUT/debootstrap.log)"
t0=$SECONDS
debootstrap --variant=minbase --include=linux-image-amd64,grub-pc,systemd-sysv,udev \
    bookworm "$MNT" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 ||
    { tail -n 30 "$OUT/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap took $((SECONDS - t0)) s"

mnt --bind /dev "$MNT/dev"
mnt --bind /proc "$MNT/proc"
mnt --bind /sys "$MNT/sys"
in_root() { chroot "$MNT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C DEBIAN_FRONTEND=noninteractive "$@"; }

# cloud-init and the SSH server through apt, which (unlike debootstrap's --include) resolves virtual
# dependencies such as python3-cryptography's on python3-cffi-backend.
log "apt-get install cloud-init openssh-server (log: $OUT/apt.log)"
{ in_root apt-get update && in_root apt-get install -y --no-install-recommends cloud-init openssh-server \
    isc-dhcp-client iproute2; } >"$OUT/apt.log" 2>&1 || { tail -n 30 "$OUT/apt.log" >&2; die "apt-get install failed"; }

# No identity of its own: cloud-init sets the hostname; systemd makes a machine id on the first boot.
: > "$MNT/etc/hostname"
printf '127.0.0.1\tlocalhost\n' > "$MNT/etc/hosts"
: > "$MNT/etc/machine-id"
rm -f "$MNT/var/lib/dbus/machine-id"
printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$UUID" > "$MNT/etc/fstab"
in_root passwd -l root >/dev/null
# The host keys openssh-server's installation made: cloud-init makes the instance's own.
rm -f "$MNT"/etc/ssh/ssh_host_*

cat > "$MNT/etc/cloud/cloud.cfg.d/90-porthole.cfg" <<'CFG'
# Porthole's hardware-tier cloud image: the seed is a NoCloud drive (label cidata).
datasource_list: [ NoCloud, None ]
# systemd-networkd configures DHCP itself (/etc/systemd/network/50-dhcp.network).
network: {config: disabled}
CFG
cat > "$MNT/etc/systemd/network/50-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
in_root systemctl enable systemd-networkd.service >/dev/null 2>&1
mkdir -p "$MNT/etc/systemd/system/ssh.service.d"
cat > "$MNT/etc/systemd/system/ssh.service.d/porthole-cloud.conf" <<'UNIT'
[Unit]
# cloud-init writes the host keys and the user's authorized keys first.
After=cloud-init.service
[Service]
# Host keys even should cloud-init fail (ssh-keygen -A makes only missing ones), before Debian's `sshd -t`.
ExecStartPre=
ExecStartPre=-/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
UNIT
in_root systemctl enable ssh.service serial-getty@ttyS0.service >/dev/null 2>&1

# Kernel modules no VM uses, then a small initramfs: only what finds a virtio-blk ext4 root (TCG
# unpacks every byte of it).
KVER=$(ls "$MNT/lib/modules" | head -n1)
for d in drivers/gpu drivers/net/wireless drivers/media drivers/infiniband drivers/staging drivers/net/ethernet \
    drivers/bluetooth drivers/isdn drivers/iio drivers/hid sound net/wireless net/mac80211 net/bluetooth; do
    rm -rf "$MNT/lib/modules/$KVER/kernel/$d"
done
in_root depmod "$KVER"
sed -i 's/^MODULES=.*/MODULES=list/' "$MNT/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >> "$MNT/etc/initramfs-tools/modules"
in_root update-initramfs -u -k all >/dev/null 2>&1 || die "update-initramfs failed"

cat > "$MNT/etc/default/grub" <<'GRUB'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB
in_root grub-install --target=i386-pc "$LOOP" >"$OUT/grub.log" 2>&1 || { cat "$OUT/grub.log" >&2; die "grub-install failed"; }
in_root update-grub >>"$OUT/grub.log" 2>&1 || { cat "$OUT/grub.log" >&2; die "update-grub failed"; }
# Without udev here there is no /dev/disk/by-uuid, and grub-mkconfig then names the loop partition.
sed -i -E "s#root=/dev/loop[0-9]+p1#root=UUID=$UUID#g" "$MNT/boot/grub/grub.cfg"
grep -q "root=UUID=$UUID" "$MNT/boot/grub/grub.cfg" || die "grub.cfg boots no root=UUID=$UUID"

in_root apt-get clean
rm -rf "$MNT"/var/lib/apt/lists/* "$MNT"/usr/share/doc/* "$MNT"/usr/share/man/* "$MNT"/var/log/*.log \
    "$MNT"/var/cache/debconf/*-old "$MNT"/var/lib/cloud/*
find "$MNT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
# Give the freed blocks back (the loop device punches holes), so the conversion skips them.
fstrim "$MNT" 2>/dev/null || log "fstrim failed: free blocks stay in the image"
sync
cleanup_mounts() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}"; done
    MOUNTS=()
}
cleanup_mounts
losetup -d "$LOOP"
LOOP=""

log "qemu-img convert -O qcow2 -c"
qemu-img convert -O qcow2 -c "$RAW" "$TMP"
qemu-img check -q "$TMP" || die "qemu-img check failed on $TMP"
DONE=1
mv "$TMP" "$IMG"
echo "$HASH" > "$STAMP"
log "done in $((SECONDS - t0)) s: $IMG ($(du -h "$IMG" | cut -f1); virtual $SIZE)"

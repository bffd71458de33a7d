#!/usr/bin/env bash
# Builds the images of the hardware-virtualization tier (./x test-hw; ARCHITECTURE.md "Hardware tier"):
#
#   $OUT (default <repo>/target/hw)
#     l1-vmlinuz        the L1 kernel: Debian's, the same one the L2 guests boot
#     l1-base.cpio      L1 root: busybox, /init, the L1 modules (kvm, kvm-amd, virtio-net, ...),
#                       porthole-vmm and portholed (release), socat, passt (the user-mode network back
#                       end) and dnsmasq (the net scenario's DNS server), their shared libraries (ldd),
#                       ssh and ssh-keygen (the cloud scenario logs in to its guest),
#                       the scenario scripts (tests/hw/scenarios) and the L2 guests under /hw/guests
#     l1-qemu.cpio      QEMU (the peer) with its libraries and firmware, appended for the scenarios
#                       that time it
#     l1-isos.cpio      memtest86+'s ISO and the Debian installer ISO (the --all scenarios)
#     l1-backports.cpio the backports kernel (tests/hw/fetch-backports-kernel.sh, when fetched) and its L2
#                       initramfs, for the scenarios that need a driver Debian 12's 6.1 lacks (sound-virtio)
#     guests/           what L2 boots: vmlinuz, vmlinux (PVH), l2-initramfs.cpio.gz (with blkbench, tone and
#                       evlat, static C programs, and the sound modules: snd-hda-intel, the generic codec), linux.iso
#                       (SeaBIOS -> GRUB -> the same Linux), data.iso (read as /dev/sr0), micro-guests
#     busybox           the same busybox, for direct mode's scenarios (L1 has it as /bin/busybox)
#
# The initrd QEMU gets is the concatenation of pieces (Linux unpacks every cpio archive in it), so a
# scenario carries only what it runs. Uncompressed: TCG decompresses slowly, memory is plentiful.
#
# Inputs: the real-guest cache (tests/real-guests/fetch.sh: kernel package, busybox-static, SeaBIOS,
# memtest86+, the Debian installer ISO), release binaries in target/release, micro-guest ELF files in
# the directory given with --micro-guests DIR. Everything is rebuilt when an input is newer than the
# stamp; otherwise the script touches nothing.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$SCRIPT_DIR/../.." && pwd)
CACHE=${PORTHOLE_GUEST_CACHE:-$REPO/target/real-guests}
OUT=${PORTHOLE_HW_DIR:-$REPO/target/hw}
RELEASE=${PORTHOLE_HW_BIN_DIR:-$REPO/target/release}
MICRO=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --micro-guests) MICRO=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done

log() { printf 'hw-build: %s\n' "$*" >&2; }
die() { printf 'hw-build: error: %s\n' "$*" >&2; exit 1; }

[[ -f $CACHE/manifest.txt ]] || die "no real-guest cache in $CACHE (run tests/real-guests/fetch.sh)"
KPKG=$(awk -F'\t' '$1 == "vmlinuz" {print $2}' "$CACHE/manifest.txt")
KROOT=$CACHE/root/$KPKG
MODDIR=$(find "$KROOT/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)
[[ -d $MODDIR ]] || die "$KPKG has no modules in the cache"
KVER=$(basename "$MODDIR")
# Debian's kernel package ships no modules.dep (depmod writes it on install): make it once in the cache.
if [[ ! -s $MODDIR/modules.dep ]]; then
    command -v depmod >/dev/null || die "depmod is missing (apt-get install kmod)"
    depmod -b "$KROOT" "$KVER" || die "depmod failed for $KPKG"
fi
BB=$CACHE/root/busybox-static/bin/busybox
for f in "$BB" "$CACHE/vmlinuz" "$CACHE/vmlinux" "$RELEASE/porthole-vmm" "$RELEASE/portholed"; do
    [[ -e $f ]] || die "missing input $f"
done
for tool in socat passt dnsmasq qemu-system-x86_64 qemu-img gcc cpio grub-mkrescue xorriso depmod ssh ssh-keygen xz; do
    command -v "$tool" >/dev/null ||
        die "$tool is missing (apt-get install socat passt dnsmasq-base qemu-system-x86 qemu-utils gcc cpio grub-pc-bin xorriso mtools kmod openssh-client xz-utils)"
done

BPO=${PORTHOLE_BACKPORTS_KERNEL_DIR:-$CACHE/backports-kernel}

# Rebuild only when an input changed.
INPUTS=("$SCRIPT_DIR" "$CACHE/manifest.txt" "$RELEASE/porthole-vmm" "$RELEASE/portholed" "$(command -v qemu-system-x86_64)"
    "$(command -v passt)" "$(command -v dnsmasq)" "$(command -v ssh)")
[[ -n $MICRO ]] && INPUTS+=("$MICRO")
[[ -f $BPO/version ]] && INPUTS+=("$BPO/version")
STAMP=$OUT/.stamp
if [[ -f $STAMP ]] && [[ -z $(find "${INPUTS[@]}" -newer "$STAMP" -print -quit) ]]; then
    log "images in $OUT are up to date"
    exit 0
fi

rm -rf "$OUT/guests" "$OUT/work" "$OUT"/*.cpio "$OUT/l1-vmlinuz" "$OUT/busybox"   # logs/ stays
mkdir -p "$OUT/guests"
# Direct mode's scenarios use busybox's httpd and wget (tests/src/hw.rs links it into their bin/).
cp "$BB" "$OUT/busybox"
W=$OUT/work
mkdir -p "$W"

# --- modules: every module with its dependencies, in load order, from the package's modules.dep ----
# modules_in_order NAME...: prints module paths (relative to $MODDIR), dependencies first, once each.
modules_in_order() {
    local -A seen=()
    local m
    visit() {
        local rel=$1 dep
        [[ -n ${seen[$rel]:-} ]] && return 0
        seen[$rel]=1
        # modules.dep lists the whole closure, nearest dependency last: load it in reverse.
        local deps
        deps=$(awk -F': *' -v m="$rel" '$1 == m {print $2}' "$MODDIR/modules.dep")
        for dep in $(tr ' ' '\n' <<<"$deps" | tac); do visit "$dep"; done
        echo "$rel"
    }
    for m in "$@"; do
        local rel
        rel=$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | head -n1 | cut -d: -f1)
        if [[ -z $rel ]]; then
            grep -qE "/$m\.ko" "$MODDIR/modules.builtin" || die "module $m is neither in $KPKG nor built in"
            continue
        fi
        visit "$rel"
    done
}

# install_modules ROOT NAME...: copies modules flat into ROOT/lib/modules and writes their load order.
install_modules() {
    local root=$1; shift
    mkdir -p "$root/lib/modules"
    : > "$root/lib/modules/load-order"
    local rel list
    list=$(modules_in_order "$@") || exit 1
    for rel in $list; do
        cp "$MODDIR/$rel" "$root/lib/modules/"
        basename "$rel" >> "$root/lib/modules/load-order"
    done
}

# busybox_root ROOT: busybox and its applet links.
busybox_root() {
    local root=$1 a
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root}
    cp "$BB" "$root/bin/busybox"
    while read -r a; do
        [[ -n $a && $a != bin/busybox && ! -e $root/$a ]] || continue
        mkdir -p "$root/$(dirname "$a")"
        ln -s /bin/busybox "$root/$a"
    done < <("$BB" --list-full)
    mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\nkvm:x:108:\nnogroup:x:65534:\n' > "$root/etc/group"
}

# carry ROOT FILE DEST: copies an executable to ROOT/DEST and its shared libraries (ldd) to ROOT/hw/lib.
carry() {
    local root=$1 file=$2 dest=$3 lib
    mkdir -p "$root/$(dirname "$dest")" "$root/hw/lib" "$root/lib64"
    cp -L "$file" "$root/$dest"
    while read -r lib; do
        [[ -n $lib ]] || continue
        case $lib in
            */ld-linux-x86-64.so.2) cp -Ln "$lib" "$root/lib64/" ;;
            *) cp -Ln "$lib" "$root/hw/lib/" ;;
        esac
    done < <(ldd "$file" | awk '/=> \// {print $3} /^[ \t]*\/lib64\// {print $1}')
}

# pack ROOT FILE [gzip]: a newc archive with fixed owner and times.
pack() {
    local root=$1 out=$2
    find "$root" -exec touch -h -d @0 {} +
    if [[ ${3:-} == gzip ]]; then
        (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -6 -n > "$out"
    else
        (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) > "$out"
    fi
}

# --- L2: the Linux guest's initramfs -----------------------------------------------------------------
log "L2 initramfs"
L2=$W/l2
busybox_root "$L2"
install_modules "$L2" virtio_pci virtio_blk virtio_scsi virtio_net sr_mod bochs psmouse evdev button crc32c_generic ext4 \
    virtio_input virtio_balloon virtio-gpu virtio_console \
    snd-hda-codec-generic snd-hda-intel
cp "$SCRIPT_DIR/l2-init.sh" "$L2/init"
gcc -O2 -static -Wall -Werror -o "$L2/bin/blkbench" "$SCRIPT_DIR/blkbench.c"
gcc -O2 -static -Wall -Werror -o "$L2/bin/tone" "$SCRIPT_DIR/tone.c"
gcc -O2 -static -Wall -Werror -o "$L2/bin/evlat" "$SCRIPT_DIR/evlat.c"
mkdir -p "$L2/etc/udhcpc"
cp "$SCRIPT_DIR/l2-udhcpc.sh" "$L2/etc/udhcpc/default.script"
chmod 755 "$L2/init" "$L2/etc/udhcpc/default.script"
pack "$L2" "$OUT/guests/l2-initramfs.cpio.gz" gzip

cp "$CACHE/vmlinuz" "$CACHE/vmlinux" "$OUT/guests/"

# --- L2 on the backports kernel (tests/hw/fetch-backports-kernel.sh), for drivers 6.1 lacks --------------
# vmlinuz-backports and l2-initramfs-backports.cpio.gz: the same init and tone, busybox, and that kernel's
# virtio_snd with its dependencies, decompressed (Debian ships them xz-compressed; busybox's insmod takes
# plain ones). Carried into L1 by l1-backports.cpio, for the scenarios that boot it.
if [[ -f $BPO/vmlinuz ]]; then
    log "L2 initramfs for the backports kernel ($(cat "$BPO/version"))"
    (
        MODDIR=$(find "$BPO/root/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)
        KPKG=$(cut -d' ' -f1 "$BPO/version")
        L2B=$W/l2-backports
        busybox_root "$L2B"
        install_modules "$L2B" virtio_snd
        for m in "$L2B"/lib/modules/*.ko.xz; do
            [[ -e $m ]] && xz -d "$m"
        done
        sed -i 's/\.ko\.xz$/.ko/' "$L2B/lib/modules/load-order"
        cp "$L2/init" "$L2B/init"
        cp "$L2/bin/tone" "$L2B/bin/tone"
        pack "$L2B" "$OUT/guests/l2-initramfs-backports.cpio.gz" gzip
    )
    cp "$BPO/vmlinuz" "$OUT/guests/vmlinuz-backports"
    K=$W/backports
    mkdir -p "$K/hw/guests"
    cp "$OUT"/guests/{vmlinuz-backports,l2-initramfs-backports.cpio.gz} "$K/hw/guests/"
    pack "$K" "$OUT/l1-backports.cpio"
else
    log "no backports kernel in $BPO (tests/hw/fetch-backports-kernel.sh): its scenarios cannot run"
fi

# data.iso: what the guest reads back as /dev/sr0 (a plain ISO 9660 image with known content).
log "data.iso"
DATA=$W/data
mkdir -p "$DATA"
for i in $(seq 1 64); do printf 'porthole hardware tier data block %04d\n' "$i"; done > "$DATA/blocks.txt"
head -c 1048576 "$CACHE/vmlinuz" > "$DATA/kernel-head.bin"
find "$DATA" -exec touch -h -d @0 {} +
SOURCE_DATE_EPOCH=0 xorriso -as mkisofs -quiet -o "$OUT/guests/data.iso" -V PORTHOLE_DATA -r "$DATA" 2>/dev/null

# linux.iso: SeaBIOS -> El Torito -> GRUB -> the Debian kernel with the L2 initramfs (quick mode).
log "linux.iso (grub-mkrescue)"
ISO=$W/iso
mkdir -p "$ISO/boot/grub"
cp "$CACHE/vmlinuz" "$ISO/boot/vmlinuz"
cp "$OUT/guests/l2-initramfs.cpio.gz" "$ISO/boot/initrd.gz"
cat > "$ISO/boot/grub/grub.cfg" <<'EOF'
set timeout=0
set default=0
terminal_output console
menuentry "Porthole hardware tier: Linux" {
    linux /boot/vmlinuz console=ttyS0 quiet hw.mode=quick
    initrd /boot/initrd.gz
}
EOF
find "$ISO" -exec touch -h -d @0 {} +
SOURCE_DATE_EPOCH=0 grub-mkrescue -o "$OUT/guests/linux.iso" "$ISO" -- -volid PORTHOLE_LINUX >/dev/null 2>&1 ||
    die "grub-mkrescue failed (apt-get install grub-pc-bin grub-common xorriso mtools)"

# bench.qcow2: the empty qcow2 disk (made by qemu-img, default 64 KiB clusters) that the disk-io scenario
# copies fresh for each qcow2 run.
qemu-img create -q -f qcow2 "$OUT/guests/bench.qcow2" 256M

if [[ -n $MICRO ]]; then
    mkdir -p "$OUT/guests/micro"
    cp "$MICRO"/*.elf "$OUT/guests/micro/"
fi
for f in memtest86+x64.iso debian-installer.iso; do
    [[ -f $CACHE/$f ]] && ln -sf "$CACHE/$f" "$OUT/guests/$f"
done

# --- L1: busybox, modules, the engine, the scenarios, the L2 guests ----------------------------------
log "L1 base"
L1=$W/l1
busybox_root "$L1"
install_modules "$L1" kvm-amd virtio_pci virtio_net virtio_blk
cp "$SCRIPT_DIR/l1-init.sh" "$L1/init"
chmod 755 "$L1/init"
carry "$L1" "$RELEASE/porthole-vmm" hw/bin/porthole-vmm
carry "$L1" "$RELEASE/portholed" hw/bin/portholed
carry "$L1" "$(command -v socat)" hw/bin/socat
carry "$L1" "$(command -v passt)" hw/bin/passt
carry "$L1" "$(command -v dnsmasq)" hw/bin/dnsmasq
carry "$L1" "$(command -v ssh)" hw/bin/ssh
carry "$L1" "$(command -v ssh-keygen)" hw/bin/ssh-keygen
mkdir -p "$L1/hw/scenarios" "$L1/hw/guests" "$L1/hw/share/seabios"
cp "$SCRIPT_DIR"/scenarios/*.sh "$L1/hw/scenarios/"
cp "$CACHE"/bios.bin "$CACHE"/vgabios-stdvga.bin "$CACHE"/vgabios-virtio.bin "$L1/hw/share/seabios/"
cp "$OUT"/guests/{vmlinuz,vmlinux,l2-initramfs.cpio.gz,data.iso,linux.iso,bench.qcow2} "$L1/hw/guests/"
[[ -d $OUT/guests/micro ]] && cp -r "$OUT/guests/micro" "$L1/hw/guests/"
pack "$L1" "$OUT/l1-base.cpio"
cp "$CACHE/vmlinuz" "$OUT/l1-vmlinuz"

# --- The QEMU peer --------------------------------------------------------------------------------
log "L1 QEMU piece"
Q=$W/qemu
mkdir -p "$Q"
carry "$Q" "$(command -v qemu-system-x86_64)" hw/bin/qemu-system-x86_64
mkdir -p "$Q/hw/share/qemu"
for f in /usr/share/seabios/bios-256k.bin /usr/share/seabios/vgabios-stdvga.bin /usr/share/qemu/bios-microvm.bin \
    /usr/share/qemu/kvmvapic.bin /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/pvh.bin; do
    cp -L "$f" "$Q/hw/share/qemu/" || die "QEMU's firmware $f is missing (apt-get install qemu-system-x86 seabios)"
done
cp -r /usr/share/qemu/keymaps "$Q/hw/share/qemu/"
pack "$Q" "$OUT/l1-qemu.cpio"

# --- The slow tier's ISOs (--all) ----------------------------------------------------------------
log "L1 ISO piece"
I=$W/isos
mkdir -p "$I/hw/guests"
for f in memtest86+x64.iso debian-installer.iso; do
    cp -L "$CACHE/$f" "$I/hw/guests/" || die "$f is missing from $CACHE (run tests/real-guests/fetch.sh)"
done
pack "$I" "$OUT/l1-isos.cpio"

rm -rf "$W"
touch "$STAMP"
log "done: $(du -sh "$OUT" | cut -f1) in $OUT"

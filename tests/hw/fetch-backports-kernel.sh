#!/usr/bin/env bash
# fetch-backports-kernel.sh — Debian's newer kernel from the release's backports (bookworm-backports:
# linux-image-amd64 → 6.12), for the hardware tier's guests that need a driver Debian 12's 6.1 lacks
# (`snd_virtio`, Linux 6.2+: the sound-virtio scenario). Fetched with `apt-get download` through an apt
# configuration of its own (the system's sources stay as they are), unpacked into
#
#   $OUT (default <repo>/target/real-guests/backports-kernel)
#     vmlinuz            the bzImage
#     root/lib/modules/  its modules (xz-compressed as Debian ships them), with modules.dep
#     version            the package and its version
#
# Does nothing when $OUT holds that version already. Needs apt-get, dpkg-deb and depmod (kmod).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$SCRIPT_DIR/../.." && pwd)
OUT=${PORTHOLE_BACKPORTS_KERNEL_DIR:-$REPO/target/real-guests/backports-kernel}

log() { printf 'backports-kernel: %s\n' "$*" >&2; }
die() { printf 'backports-kernel: error: %s\n' "$*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb depmod; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install apt dpkg kmod)"
done
# shellcheck disable=SC1091
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n $CODENAME ]] || die "no VERSION_CODENAME in /etc/os-release"
APT=$OUT.apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
echo "deb http://deb.debian.org/debian $CODENAME-backports main" >"$APT/sources.list"
OPTS=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$APT/lists"
    -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root")
apt-get "${OPTS[@]}" -q update >&2 || die "apt-get update for $CODENAME-backports failed"
# The metapackage names the kernel package of the moment (linux-image-6.12.N+debNN-amd64).
PKG=$(apt-cache "${OPTS[@]}" depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
[[ -n $PKG ]] || die "no kernel package behind linux-image-amd64 in $CODENAME-backports"
VER=$(apt-cache "${OPTS[@]}" policy "$PKG" | awk '$1 == "Candidate:" {print $2}')
[[ -n $VER && $VER != "(none)" ]] || die "no candidate for $PKG"
if [[ -f $OUT/version ]] && [[ $(cat "$OUT/version") == "$PKG $VER" ]] && [[ -f $OUT/vmlinuz ]]; then
    log "$PKG $VER already in $OUT"
    exit 0
fi
log "fetching $PKG $VER from $CODENAME-backports"
rm -f "$APT/debs"/*.deb
(cd "$APT/debs" && apt-get "${OPTS[@]}" -q download "$PKG=$VER" >&2) || die "apt-get download $PKG=$VER failed"
rm -rf "$OUT"
mkdir -p "$OUT/root"
dpkg-deb -x "$APT/debs"/*.deb "$OUT/root"
KVER=$(basename "$(find "$OUT/root/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
[[ -n $KVER ]] || die "$PKG has no modules"
cp "$OUT/root/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
rm -rf "$OUT/root/boot" "$OUT/root/usr"
# Debian's package ships no modules.dep (depmod writes it on install).
depmod -b "$OUT/root" "$KVER" || die "depmod failed for $PKG"
rm -f "$APT/debs"/*.deb
echo "$PKG $VER" >"$OUT/version"
log "$PKG $VER ($KVER) in $OUT"

#!/usr/bin/env bash
# Provides the QEMU that runs the hardware tier's L1 (the L0, QEMU TCG with -cpu max; ARCHITECTURE.md
# "Hardware tier"). Its nested SVM must honour the XSETBV intercept, which QEMU has done since 8.2
# ("target/i386: check intercept for XSETBV"): before that an L2 guest's XSETBV changes the emulated XCR0
# behind L1's KVM, which puts its own value (the reset value, x87 only) back on its next VMRUN, so every
# L2 guest loses its XCR0 at its first VM exit (tests/guests/asm/xsave.S: xcr0-lost). Debian 12's QEMU is
# 7.2.
#
# When the system's qemu-system-x86_64 is 8.2 or newer nothing is done. Otherwise qemu-system-x86 and
# qemu-system-data are fetched from the Debian release's backports with `apt-get download` (an apt
# configuration of its own under $OUT/apt: the system's sources and lists are left alone) and unpacked
# into $OUT (default <repo>/target/hw-l0-qemu): $OUT/usr/bin/qemu-system-x86_64, which finds its data in
# $OUT/usr/share/qemu (SeaBIOS's images are linked there from the system's seabios package). Once that
# binary runs and reports 8.2 or newer, later calls touch neither apt nor the network.
#
# Prints one line: `l0-qemu: system <version>` or `l0-qemu: <path> <version>`. Exit 1 when no suitable
# QEMU can be had (the harness then runs L1 on the system's QEMU and says so).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$SCRIPT_DIR/../.." && pwd)
OUT=${PORTHOLE_HW_L0_QEMU_DIR:-$REPO/target/hw-l0-qemu}
BIN=$OUT/usr/bin/qemu-system-x86_64
MIN_MAJOR=8
MIN_MINOR=2
case ${1:-} in
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    "") ;;
    *) echo "fetch-l0-qemu.sh: unknown argument '$1'" >&2; exit 2 ;;
esac

log() { printf 'l0-qemu: %s\n' "$*" >&2; }
die() { printf 'l0-qemu: error: %s\n' "$*" >&2; exit 1; }

# version BINARY: "MAJOR.MINOR.PATCH" from --version, or nothing when it does not run.
version() {
    "$1" --version 2>/dev/null | sed -n '1s/^QEMU emulator version \([0-9][0-9]*\.[0-9][0-9]*\(\.[0-9][0-9]*\)\{0,1\}\).*/\1/p'
}
# new_enough VERSION
new_enough() {
    local major minor
    IFS=. read -r major minor _ <<<"$1"
    [[ -n $major && -n $minor ]] || return 1
    ((major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR)))
}

SV=""
if SYS=$(command -v qemu-system-x86_64) && SV=$(version "$SYS") && new_enough "$SV"; then
    echo "l0-qemu: system $SV"
    exit 0
fi
if [[ -x $BIN ]] && v=$(version "$BIN") && new_enough "$v"; then
    echo "l0-qemu: $BIN $v"
    exit 0
fi

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "apt-get and dpkg-deb are required"
# shellcheck disable=SC1091
CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n $CODENAME ]] || die "no VERSION_CODENAME in /etc/os-release"
APT=$OUT/apt
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
echo "deb http://deb.debian.org/debian $CODENAME-backports main" >"$APT/sources.list"
OPTS=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$APT/lists"
    -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root")
log "system QEMU ${SV:-?} lacks the SVM XSETBV intercept (QEMU $MIN_MAJOR.$MIN_MINOR): fetching QEMU from $CODENAME-backports"
apt-get "${OPTS[@]}" -q update >&2 || die "apt-get update for $CODENAME-backports failed"
candidate() {
    apt-cache "${OPTS[@]}" policy "$1" | awk '$1 == "Candidate:" {print $2}'
}
QV=$(candidate qemu-system-x86)
DV=$(candidate qemu-system-data)
[[ -n $QV && $QV != "(none)" && $QV == "$DV" ]] || die "no matching qemu-system-x86/qemu-system-data in $CODENAME-backports"
rm -f "$APT/debs"/*.deb
(cd "$APT/debs" && apt-get "${OPTS[@]}" -q download "qemu-system-x86=$QV" "qemu-system-data=$DV" >&2) ||
    die "apt-get download qemu-system-x86=$QV failed"
for deb in "$APT/debs"/*.deb; do
    dpkg-deb -x "$deb" "$OUT"
done
# The firmware QEMU looks for in its data directory: Debian's qemu-system-data leaves SeaBIOS to the
# seabios package (/usr/share/seabios), which this QEMU, unpacked elsewhere, would not search.
for f in /usr/share/seabios/*.bin; do
    [[ -e $f ]] || die "no SeaBIOS images in /usr/share/seabios (apt-get install seabios)"
    [[ -e $OUT/usr/share/qemu/$(basename "$f") ]] || ln -s "$f" "$OUT/usr/share/qemu/"
done
missing=$(ldd "$BIN" | awk '/not found/ {print $1}' | tr '\n' ' ')
[[ -z $missing ]] || die "$BIN needs libraries this system lacks: $missing"
v=$(version "$BIN") || true
[[ -n $v ]] && new_enough "$v" || die "$BIN does not run or is older than $MIN_MAJOR.$MIN_MINOR (${v:-no version})"
echo "l0-qemu: $BIN $v"

#!/bin/sh
# make-iso.sh — CD images for Porthole's firmware-boot tests, built from Debian's GRUB and xorriso.
#
#   make-iso.sh grub OUT.iso GUEST.elf [CMDLINE]
#       A BIOS-bootable (El Torito, i386-pc) ISO made by grub-mkrescue. Its grub.cfg prints
#       PORTHOLE-GRUB-LOADING (VGA console and COM1), then boots GUEST.elf at once with `multiboot2`,
#       passing CMDLINE (GRUB word syntax: GRUB re-joins the words, so 'q x' reaches the guest as "q x";
#       the guest sees it, without the file name, at hvm_start_info.cmdline_paddr).
#   make-iso.sh plain OUT.iso
#       A valid ISO 9660 data image (one README file) without an El Torito boot record.
#   make-iso.sh truncated OUT.iso
#       A GRUB ISO (no guest on it) cut to its first 64 KiB: volume descriptors intact, the El Torito
#       boot catalog and boot image past the end of the file.
#
# Needs grub-mkrescue (grub-common), GRUB's i386-pc modules (grub-pc-bin), xorriso and mtools; installs
# nothing, but says which Debian packages are missing (exit status 2). Images are reproducible: fixed
# volume id and timestamps (SOURCE_DATE_EPOCH, 1700000000 unless set).
set -eu

usage() {
    echo "usage: $0 grub OUT.iso GUEST.elf [CMDLINE] | plain OUT.iso | truncated OUT.iso" >&2
    exit 1
}

GRUB_PC_DIR=${GRUB_PC_DIR:-/usr/lib/grub/i386-pc}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
export SOURCE_DATE_EPOCH

# retry LOG CMD...: runs CMD (output to LOG) up to three times. Debian 12's xorriso 1.5.4 has been seen to
# die of SIGSEGV once in hundreds of runs on identical input (CI, 2026-12); a fixture build is not what the
# tests test, so a crashed run is tried again. The last failure's output goes to standard error.
retry() {
    log=$1
    shift
    for attempt in 1 2 3; do
        if "$@" >"$log" 2>&1; then
            return 0
        fi
        echo "$0: attempt $attempt of $*: failed" >>"$log.all"
        cat "$log" >>"$log.all"
    done
    cat "$log.all" >&2
    exit 1
}

check_tools() {
    missing=
    command -v grub-mkrescue >/dev/null 2>&1 || missing="$missing grub-common"
    [ -f "$GRUB_PC_DIR/cdboot.img" ] || missing="$missing grub-pc-bin"
    command -v xorriso >/dev/null 2>&1 || missing="$missing xorriso"
    command -v mformat >/dev/null 2>&1 || missing="$missing mtools"
    if [ -n "$missing" ]; then
        echo "$0: missing Debian packages:$missing (apt-get install$missing)" >&2
        exit 2
    fi
}

# grub_iso OUT [GUEST [CMDLINE]]: the GRUB rescue ISO; without GUEST its menu entry only echoes.
grub_iso() {
    iso=$1
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/root/boot/grub"
    {
        echo 'serial --unit=0 --speed=115200'
        echo 'terminal_input serial console'
        echo 'terminal_output serial console'
        echo 'set timeout=0'
        echo 'set default=0'
        echo 'menuentry "Porthole micro-guest" {'
        echo '    echo PORTHOLE-GRUB-LOADING'
        if [ $# -ge 2 ]; then
            cp "$2" "$work/root/boot/guest.elf"
            echo "    multiboot2 /boot/guest.elf ${3:-}"
            echo '    boot'
        fi
        echo '}'
    } >"$work/root/boot/grub/grub.cfg"
    # grub-mkrescue dates the volume (--modification-date) with the current time; -volume_date uuid
    # overrides it, all_file_dates the files' times. (The i386-pc core image does not use that UUID.)
    uuid_date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d%H%M%S00)
    # Only the i386-pc platform and the modules grub.cfg needs (with their dependencies); no fonts, themes
    # or locales. Nothing is preloaded (--modules): the core image is LZMA-compressed, and under an
    # emulating (nested) KVM decompressing preloaded modules costs more than reading them from the CD.
    retry "$work/log" grub-mkrescue --directory="$GRUB_PC_DIR" --output="$iso" \
        --fonts= --locales= --themes= \
        --install-modules="normal multiboot2 serial terminal echo boot configfile" \
        "$work/root" -- -volid PORTHOLE_GRUB \
        -volume_date all_file_dates "=$SOURCE_DATE_EPOCH" -volume_date uuid "$uuid_date"
}

[ $# -ge 2 ] || usage
mode=$1
out=$2
case $mode in
grub)
    if [ $# -lt 3 ] || [ $# -gt 4 ]; then usage; fi
    [ -f "$3" ] || { echo "$0: no such guest: $3" >&2; exit 1; }
    case ${4:-} in *'
'*) echo "$0: CMDLINE must be one line" >&2; exit 1 ;; esac
    check_tools
    grub_iso "$out" "$3" "${4:-}"
    ;;
plain)
    [ $# -eq 2 ] || usage
    check_tools
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir "$work/root"
    echo "Porthole test data: an ISO 9660 image with no El Torito boot record." >"$work/root/README.TXT"
    touch -d "@$SOURCE_DATE_EPOCH" "$work/root/README.TXT" "$work/root"
    retry "$work/log" xorriso -as mkisofs -quiet -o "$out" -V PORTHOLE_PLAIN -r -J "$work/root"
    ;;
truncated)
    [ $# -eq 2 ] || usage
    check_tools
    grub_iso "$out.full"
    head -c 65536 "$out.full" >"$out"
    rm -f "$out.full"
    ;;
*)
    usage
    ;;
esac

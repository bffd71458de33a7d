#!/usr/bin/env bash
# Fetch and prepare the real guests of the slower test tier (DESIGN.md §5 tier 6):
# SeaBIOS, memtest86+, the current Debian 12 kernel (bzImage and a PVH-bootable ELF vmlinux),
# a busybox initramfs that prints PORTHOLE-LINUX-OK and powers off, and a BIOS-bootable
# Debian installer ISO (ISOLINUX starts the text-mode netboot installer at once).
#
# Everything comes from Debian packages fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` into a cache:
#
#   $PORTHOLE_GUEST_CACHE (default: <repo>/target/real-guests)
#     debs/                 downloaded .deb files
#     root/<package>/       each package unpacked
#     build/                scratch space (initramfs tree)
#     bios.bin, bios-256k.bin, bios-microvm.bin, vgabios-*.bin    (seabios)
#     memtest86+x64.bin, memtest86+x64.iso                         (memtest86+)
#     vmlinuz               bzImage                                (linux-image-6.1.*-amd64)
#     vmlinux               uncompressed ELF with the Xen PVH note (from vmlinuz)
#     initramfs.cpio.gz     busybox-static + virtio modules
#     debian-installer.iso  El Torito (no emulation) + isohybrid MBR: ISOLINUX boots the
#                           installer's kernel and initrd.gz with no prompt, on the VGA text
#                           console (debian-installer-12-netboot-amd64, isolinux,
#                           syslinux-common; assembled with xorriso)
#     manifest.txt          file, source package, version, sha256
#
# Once everything is cached and matches manifest.txt the script touches neither apt nor the
# network. Options:
#   --refresh   ignore the finished cache: re-resolve the current package versions (apt lists
#               are local; `apt-get update` runs only if they are missing) and rebuild what changed
#   --check     only verify the cache; exit 1 if it is incomplete (never downloads)
#   -h, --help  this text
# Files that are built (vmlinux, initramfs.cpio.gz, debian-installer.iso) are reproducible: fixed
# names, owners and mtimes (SOURCE_DATE_EPOCH, default 0), fixed ISO volume id.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd -- "$SCRIPT_DIR/../.." && pwd)
CACHE=${PORTHOLE_GUEST_CACHE:-$REPO_ROOT/target/real-guests}
MANIFEST_FORMAT="# porthole real-guests manifest v3"

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

REFRESH=0
CHECK_ONLY=0
for arg in "$@"; do
    case $arg in
        --refresh) REFRESH=1 ;;
        --check) CHECK_ONLY=1 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "fetch.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

# Files that must exist for the cache to count as complete (vgabios-*.bin etc. come on top).
REQUIRED_FILES=(bios.bin vgabios-stdvga.bin vgabios-virtio.bin memtest86+x64.bin memtest86+x64.iso vmlinuz vmlinux initramfs.cpio.gz
    debian-installer.iso)
# Modules for the initramfs; /init loads them in dependency order (worked out from their depends=).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
# The Debian installer ISO: the netboot images (text-mode installer) and ISOLINUX.
DI_PKG=debian-installer-12-netboot-amd64
DI_PACKAGES=("$DI_PKG" isolinux syslinux-common)
DI_VOLID=PORTHOLE_DEBIAN_INSTALLER

log()  { printf '==> %s\n' "$*" >&2; }
warn() { printf 'fetch.sh: warning: %s\n' "$*" >&2; }
die()  { printf 'fetch.sh: error: %s\n' "$*" >&2; exit 1; }

human() { numfmt --to=iec-i --suffix=B --format='%.1f' "$1" 2>/dev/null || echo "$1 bytes"; }

# ---------------------------------------------------------------------------------------------
# Cache verification (no apt, no network)
# ---------------------------------------------------------------------------------------------

# Succeeds if manifest.txt is present, in our format, lists every required file, and every file
# it lists exists with the recorded sha256.
cache_complete() {
    local m=$CACHE/manifest.txt
    [[ -f $m ]] || return 1
    [[ $(head -n1 "$m") == "$MANIFEST_FORMAT" ]] || return 1
    local f
    for f in "${REQUIRED_FILES[@]}"; do
        awk -F'\t' -v n="$f" '$1 == n {found = 1} END {exit !found}' "$m" || return 1
    done
    local name pkg ver sum
    while IFS=$'\t' read -r name pkg ver sum; do
        [[ -z $name || $name == \#* ]] && continue
        [[ -f $CACHE/$name ]] || return 1
        [[ $(sha256sum < "$CACHE/$name" | cut -d' ' -f1) == "$sum" ]] || return 1
    done < "$m"
    return 0
}

print_summary() {
    local m=$CACHE/manifest.txt name pkg ver sum size
    echo "real guests in $CACHE:"
    while IFS=$'\t' read -r name pkg ver sum; do
        [[ -z $name || $name == \#* ]] && continue
        size=$(stat -c %s "$CACHE/$name")
        printf '  %-26s %10s  %s %s\n' "$name" "$(human "$size")" "$pkg" "$ver"
    done < "$m"
}

if [[ $REFRESH == 0 ]] && cache_complete; then
    echo "real guests: cached in $CACHE"
    print_summary
    exit 0
fi
if [[ $CHECK_ONLY == 1 ]]; then
    echo "real guests: cache in $CACHE is missing or incomplete (run tests/real-guests/fetch.sh)" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# Building: from here on apt may be used
# ---------------------------------------------------------------------------------------------

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
    die "apt-get and dpkg-deb are required (this script expects a Debian 12 host)"

mkdir -p "$CACHE/debs" "$CACHE/root" "$CACHE/build"
exec 9>"$CACHE/.lock"
flock -w 600 9 || die "another fetch.sh holds $CACHE/.lock"

SUDO=()
if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null && SUDO=(sudo) || true
fi

APT_UPDATED=0
LISTS_OK=""   # memo: apt-cache takes about a second a call here
apt_lists_present() {
    # Any Packages index at all, and one that knows linux-image-amd64.
    if [[ -z $LISTS_OK ]]; then
        if compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null &&
            apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
            LISTS_OK=yes
        else
            LISTS_OK=no
        fi
    fi
    [[ $LISTS_OK == yes ]]
}
apt_update_once() {
    [[ $APT_UPDATED == 1 ]] && return 0
    log "apt lists are missing or incomplete: apt-get update"
    "${SUDO[@]}" apt-get update -q >&2 || die "apt-get update failed (offline? no root?)"
    APT_UPDATED=1
    LISTS_OK=""
}
ensure_lists() {
    apt_lists_present || apt_update_once
    apt_lists_present || die "apt lists still do not know linux-image-amd64 after apt-get update"
}

# ensure_tool <command> <debian package>
ensure_tool() {
    local cmd=$1 pkg=$2
    if command -v "$cmd" >/dev/null 2>&1 &&
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        return 0
    fi
    command -v "$cmd" >/dev/null 2>&1 && return 0   # provided some other way; good enough
    log "installing host tool $pkg (for $cmd)"
    ensure_lists
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "$pkg" >&2 ||
        die "could not install $pkg; install it by hand (apt-get install $pkg)"
    command -v "$cmd" >/dev/null 2>&1 || die "$pkg installed but $cmd still not found"
}

# field <deb> <Field>
deb_field() { dpkg-deb -f "$1" "$2" 2>/dev/null; }

# Newest cached .deb of a package (by dpkg version order), or nothing.
cached_deb() {
    local pkg=$1 f best="" bestv=""
    for f in "$CACHE/debs/${pkg}_"*.deb; do
        [[ -f $f ]] || continue
        [[ $(deb_field "$f" Package) == "$pkg" ]] || continue
        local v
        v=$(deb_field "$f" Version)
        if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$bestv"; then
            best=$f; bestv=$v
        fi
    done
    [[ -n $best ]] && printf '%s\n' "$best"
}

# Candidate version and SHA256 of packages from the local apt lists, in one apt-cache call:
# fills CAND[pkg]="version sha256".
declare -A CAND
apt_candidates() {
    local line
    while read -r line; do
        [[ -n $line ]] && CAND[${line%% *}]=${line#* }
    done < <(apt-cache show --no-all-versions "$@" 2>/dev/null |
        awk '/^Package: /{p=$2} /^Version: /{v[p]=$2} /^SHA256: /{s[p]=$2}
             END{for (p in v) print p, v[p], s[p]}')
}

# get_deb <package>: prints the path of the .deb to use, downloading it if needed.
# With apt lists: the candidate version, verified against apt's SHA256.
# Without apt lists: a cached .deb if there is one (offline), else update and download.
get_deb() {
    local pkg=$1 cand ver sum f
    if ! apt_lists_present; then
        if f=$(cached_deb "$pkg") && [[ $REFRESH == 0 ]]; then
            printf '%s\n' "$f"; return 0
        fi
        ensure_lists
    fi
    [[ -n ${CAND[$pkg]:-} ]] || apt_candidates "$pkg"
    cand=${CAND[$pkg]:-}
    [[ -n $cand ]] || die "apt knows no package '$pkg'"
    read -r ver sum <<<"$cand"
    for f in "$CACHE/debs/${pkg}_"*.deb; do
        [[ -f $f ]] || continue
        if [[ $(deb_field "$f" Package) == "$pkg" && $(deb_field "$f" Version) == "$ver" ]]; then
            if [[ -z $sum || $(sha256sum < "$f" | cut -d' ' -f1) == "$sum" ]]; then
                printf '%s\n' "$f"; return 0
            fi
            warn "cached $(basename "$f") does not match apt's sha256; downloading again"
            rm -f "$f"
        fi
    done
    log "downloading $pkg=$ver"
    local tmp=$CACHE/debs/.partial
    rm -rf "$tmp"; mkdir -p "$tmp"
    # As root apt warns that the _apt sandbox cannot write here; that is harmless.
    (cd "$tmp" && apt-get download -q "$pkg=$ver") >&2 ||
        die "apt-get download $pkg=$ver failed (network? see above)"
    local got=("$tmp"/*.deb)
    [[ -f ${got[0]} ]] || die "apt-get download $pkg=$ver produced no .deb"
    if [[ -n $sum && $(sha256sum < "${got[0]}" | cut -d' ' -f1) != "$sum" ]]; then
        die "downloaded $(basename "${got[0]}") does not match apt's sha256"
    fi
    mv -f "${got[0]}" "$CACHE/debs/"
    rm -rf "$tmp"
    printf '%s\n' "$CACHE/debs/$(basename "${got[0]}")"
}

# unpack <package> <deb>: root/<package>/ holds the deb's contents (re-unpacked if the deb changed).
unpack() {
    local pkg=$1 deb=$2 dest=$CACHE/root/$1 stamp
    stamp="$(basename "$deb") $(stat -c '%s %Y' "$deb")"
    if [[ -f $dest/.porthole-unpacked && $(cat "$dest/.porthole-unpacked") == "$stamp" ]]; then
        return 0
    fi
    log "unpacking $(basename "$deb")"
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    dpkg-deb -x "$deb" "$dest.tmp" || die "dpkg-deb -x $deb failed"
    printf '%s\n' "$stamp" > "$dest.tmp/.porthole-unpacked"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
}

# install_file <src> <name>: copy into the cache top level atomically.
install_file() {
    [[ -f $1 ]] || die "expected file $1 is missing from the package"
    cp -f "$1" "$CACHE/.$2.tmp"
    mv -f "$CACHE/.$2.tmp" "$CACHE/$2"
}

MANIFEST_LINES=()
record() {  # name package version
    local sum
    sum=$(sha256sum < "$CACHE/$1" | cut -d' ' -f1)
    MANIFEST_LINES+=("$1	$2	$3	$sum")
}

# ---------------------------------------------------------------------------------------------
# Resolve packages
# ---------------------------------------------------------------------------------------------

# Without apt lists we can still work from cached .debs (offline); otherwise the lists are needed
# (an `apt-get update`, here in the main shell so that it happens at most once).
if ! apt_lists_present; then
    for pkg in seabios memtest86+ busybox-static 'linux-image-6.1.*-amd64' "${DI_PACKAGES[@]}"; do
        if [[ $REFRESH == 1 ]] || ! compgen -G "$CACHE/debs/${pkg}_*.deb" >/dev/null; then
            ensure_lists
            break
        fi
    done
fi
[[ $LISTS_OK == yes ]] || log "apt lists unavailable: using the cached .deb files"

# The kernel: whatever linux-image-amd64 currently depends on (linux-image-6.1.0-NN-amd64).
KPKG=""
if apt_lists_present; then
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\..*-amd64$/ {print $2; exit}')
    if [[ -z $KPKG ]]; then
        KPKG=$(apt-cache show --no-all-versions linux-image-amd64 |
            sed -n 's/^Depends: .*\(linux-image-6\.1\.[^ ,]*-amd64\).*/\1/p' | head -n1)
    fi
else
    # Offline with a cached kernel .deb: take the newest one.
    best="" bestv=""
    for f in "$CACHE/debs/"linux-image-6.1.*-amd64_*.deb; do
        v=$(deb_field "$f" Version)
        if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$bestv"; then best=$f; bestv=$v; fi
    done
    KPKG=$(deb_field "$best" Package)
fi
[[ -n $KPKG ]] || die "cannot resolve the Debian 12 kernel package (linux-image-6.1.*-amd64) from linux-image-amd64"
log "kernel package: $KPKG"
apt_lists_present && apt_candidates seabios memtest86+ busybox-static "$KPKG" "${DI_PACKAGES[@]}"

declare -A DEB VER
for pkg in seabios memtest86+ busybox-static "$KPKG" "${DI_PACKAGES[@]}"; do
    DEB[$pkg]=$(get_deb "$pkg")
    VER[$pkg]=$(deb_field "${DEB[$pkg]}" Version)
    unpack "$pkg" "${DEB[$pkg]}"
done

# ---------------------------------------------------------------------------------------------
# seabios
# ---------------------------------------------------------------------------------------------

SB=$CACHE/root/seabios/usr/share/seabios
[[ -d $SB ]] || die "seabios package has no usr/share/seabios"
for f in "$SB"/bios.bin "$SB"/bios-256k.bin "$SB"/bios-microvm.bin "$SB"/vgabios-*.bin; do
    [[ -f $f ]] || { [[ $(basename "$f") == bios.bin ]] && die "seabios has no bios.bin"; continue; }
    name=$(basename "$f")
    install_file "$f" "$name"
    record "$name" seabios "${VER[seabios]}"
done

# ---------------------------------------------------------------------------------------------
# memtest86+
# ---------------------------------------------------------------------------------------------

MT=$CACHE/root/memtest86+
install_file "$MT/boot/memtest86+x64.bin" memtest86+x64.bin
record memtest86+x64.bin memtest86+ "${VER[memtest86+]}"
install_file "$MT/usr/lib/memtest86+/memtest86+x64.iso" memtest86+x64.iso
record memtest86+x64.iso memtest86+ "${VER[memtest86+]}"

# ---------------------------------------------------------------------------------------------
# kernel: vmlinuz and vmlinux
# ---------------------------------------------------------------------------------------------

KROOT=$CACHE/root/$KPKG
KREL=${KPKG#linux-image-}
[[ -f $KROOT/boot/vmlinuz-$KREL ]] || die "$KPKG has no boot/vmlinuz-$KREL"
install_file "$KROOT/boot/vmlinuz-$KREL" vmlinuz
record vmlinuz "$KPKG" "${VER[$KPKG]}"

ensure_tool readelf binutils
ensure_tool objcopy binutils

le32() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
le64() { od -An -t u8 -j "$2" -N 8 "$1" | tr -d ' '; }
le16() { od -An -t u2 -j "$2" -N 2 "$1" | tr -d ' '; }
is_elf() { [[ $(head -c 4 "$1" | od -An -t x1 | tr -d ' \n') == 7f454c46 ]]; }

# Decompress the stream at byte offset $2 of bzImage $1 with method $3 into $4.
# Like scripts/extract-vmlinux: trailing data after the stream makes the tool complain, so its
# status is ignored and the result is judged by being an ELF file.
decompress_at() {
    local img=$1 off=$2 method=$3 out=$4
    case $method in
        xz)   ensure_tool xz xz-utils;  tail -c +$((off + 1)) "$img" | xz -dc > "$out" 2>/dev/null || true ;;
        zstd) ensure_tool zstd zstd;    tail -c +$((off + 1)) "$img" | zstd -dcq > "$out" 2>/dev/null || true ;;
        gzip) tail -c +$((off + 1)) "$img" | gzip -dc > "$out" 2>/dev/null || true ;;
        lzma) ensure_tool xz xz-utils;  tail -c +$((off + 1)) "$img" | xz -dc --format=lzma > "$out" 2>/dev/null || true ;;
        *) return 1 ;;
    esac
    [[ -s $out ]] && is_elf "$out"
}

magic_method() {  # hex of the first 6 bytes -> method
    case $1 in
        fd377a585a00*) echo xz ;;
        28b52ffd*)     echo zstd ;;
        1f8b08*|1f8b09*) echo gzip ;;
        5d0000*)       echo lzma ;;
        *) return 1 ;;
    esac
}

extract_vmlinux() {
    local img=$CACHE/vmlinuz out=$CACHE/.vmlinux.tmp
    rm -f "$out"
    # 1. The boot protocol header says exactly where the payload is:
    #    setup_sects @0x1f1, "HdrS" @0x202, payload_offset @0x248 (from the protected-mode code).
    local hdrs setup_sects pm_start poff plen method=""
    hdrs=$(head -c $((0x206)) "$img" | tail -c 4)
    if [[ $hdrs == HdrS ]]; then
        setup_sects=$(od -An -t u1 -j $((0x1f1)) -N 1 "$img" | tr -d ' ')
        [[ $setup_sects == 0 ]] && setup_sects=4
        pm_start=$(( (setup_sects + 1) * 512 ))
        poff=$(le32 "$img" $((0x248)))
        plen=$(le32 "$img" $((0x24c)))
        local at=$((pm_start + poff)) magic
        magic=$(od -An -t x1 -j "$at" -N 6 "$img" | tr -d ' \n')
        if method=$(magic_method "$magic") && decompress_at "$img" "$at" "$method" "$out"; then
            # The payload ends with the uncompressed size (little endian); compare.
            local want have
            want=$(le32 "$img" $((at + plen - 4)))
            have=$(stat -c %s "$out")
            [[ $want == "$have" ]] ||
                warn "vmlinux is $have bytes, the bzImage payload trailer says $want"
            echo "$method"
            return 0
        fi
    fi
    # 2. Fall back to scanning for compression magic, as scripts/extract-vmlinux does.
    local pat m pos
    for m in xz zstd gzip; do
        case $m in
            xz)   pat='\xfd7zXZ\x00' ;;
            zstd) pat='\x28\xb5\x2f\xfd' ;;
            gzip) pat='\x1f\x8b\x08' ;;
        esac
        for pos in $(LC_ALL=C grep -aboP "$pat" "$img" 2>/dev/null | cut -d: -f1); do
            if decompress_at "$img" "$pos" "$m" "$out"; then
                echo "$m"
                return 0
            fi
        done
    done
    return 1
}

log "extracting vmlinux from the bzImage"
KCOMP=$(extract_vmlinux) || die "could not find a compressed ELF kernel inside vmlinuz"
# The decompressed payload is vmlinux.bin followed by relocation data for KASLR; trim it to the
# ELF proper (the section header table is the last part of an objcopy'd ELF).
shoff=$(le64 "$CACHE/.vmlinux.tmp" $((0x28)))
shentsize=$(le16 "$CACHE/.vmlinux.tmp" $((0x3a)))
shnum=$(le16 "$CACHE/.vmlinux.tmp" $((0x3c)))
elf_end=$((shoff + shentsize * shnum))
full=$(stat -c %s "$CACHE/.vmlinux.tmp")
if (( shoff > 0 && elf_end < full )); then
    truncate -s "$elf_end" "$CACHE/.vmlinux.tmp"
    log "vmlinux: $KCOMP payload, ELF is $elf_end bytes (dropped $((full - elf_end)) bytes of relocations)"
fi
mv -f "$CACHE/.vmlinux.tmp" "$CACHE/vmlinux"
record vmlinux "$KPKG" "${VER[$KPKG]}"

# Xen PVH entry note: owner "Xen", type XEN_ELFNOTE_PHYS32_ENTRY = 18 (0x12).
PVH_NOTE=no
if readelf -n "$CACHE/vmlinux" 2>/dev/null |
    grep -E '^\s*Xen\s' | grep -qiE '0x00000012|PHYS32'; then
    PVH_NOTE=yes
else
    warn "vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); PVH boot will not work"
fi

# ---------------------------------------------------------------------------------------------
# initramfs
# ---------------------------------------------------------------------------------------------

ensure_tool cpio cpio
BB=$CACHE/root/busybox-static/bin/busybox
[[ -x $BB ]] || die "busybox-static has no bin/busybox"

IR=$CACHE/build/initramfs
rm -rf "$IR"
mkdir -p "$IR"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,lib/modules,etc}
cp "$BB" "$IR/bin/busybox"
# Applet symlinks (busybox-static is a static x86-64 binary; it runs here to list its applets).
if applets=$("$BB" --list-full 2>/dev/null); then
    while read -r a; do
        [[ -n $a && $a != bin/busybox && ! -e $IR/$a ]] || continue
        mkdir -p "$IR/$(dirname "$a")"
        ln -s /bin/busybox "$IR/$a"
    done <<<"$applets"
else
    warn "cannot run busybox here to list applets; /init calls /bin/busybox explicitly anyway"
    ln -s busybox "$IR/bin/sh"
fi
# An initial console for the kernel to open before /init runs (needs root; /init copes without).
mknod -m 600 "$IR/dev/console" c 5 1 2>/dev/null || warn "cannot mknod dev/console (not root?)"
mknod -m 666 "$IR/dev/null" c 1 3 2>/dev/null || true

# Kernel modules, kept as packaged (.ko or .ko.xz).
MODDIR=$(find "$KROOT/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)
[[ -n $MODDIR ]] || die "$KPKG has no lib/modules/<version>/"
modinfo_depends() {  # .ko or .ko.xz -> comma list
    local f=$1 tmp=$CACHE/build/.mod.ko
    case $f in
        *.xz)  ensure_tool xz xz-utils >&2; xz -dc "$f" > "$tmp" ;;
        *.zst) ensure_tool zstd zstd >&2; zstd -dcq "$f" > "$tmp" ;;
        *.gz)  gzip -dc "$f" > "$tmp" ;;
        *)     cp "$f" "$tmp" ;;
    esac
    objcopy -O binary --only-section=.modinfo "$tmp" /dev/stdout 2>/dev/null |
        tr '\0' '\n' | sed -n 's/^depends=//p'
    rm -f "$tmp"
}
declare -A MOD_FILE MOD_DEPS
for m in "${MODULES[@]}"; do
    f=$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "$m.ko.*" \) -print -quit)
    if [[ -z $f ]]; then
        if grep -q "/$m.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "module $m is built in"
        else
            warn "module $m not found in $KPKG"
        fi
        continue
    fi
    MOD_FILE[$m]=$f
    MOD_DEPS[$m]=$(modinfo_depends "$f" || true)
    cp "$f" "$IR/lib/modules/"
done
# Load order: each module after the modules it depends on (from its .modinfo depends=).
MOD_LIST=()
while (( ${#MOD_LIST[@]} < ${#MOD_FILE[@]} )); do
    progress=0
    for m in "${MODULES[@]}"; do
        [[ -n ${MOD_FILE[$m]:-} ]] || continue
        printf '%s\n' "${MOD_LIST[@]}" | grep -qx "$m" && continue
        ready=1
        for d in ${MOD_DEPS[$m]//,/ }; do
            if [[ -n ${MOD_FILE[$d]:-} ]]; then
                printf '%s\n' "${MOD_LIST[@]}" | grep -qx "$d" || ready=0
            elif ! grep -q "/$d.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
                warn "module $m depends on $d, which the initramfs does not carry"
            fi
        done
        if (( ready )); then MOD_LIST+=("$m"); progress=1; fi
    done
    (( progress )) || die "module dependency cycle among: ${!MOD_FILE[*]}"
done
MOD_FILES=$(cd "$IR/lib/modules" && for m in "${MOD_LIST[@]}"; do ls "$m".ko*; done | tr '\n' ' ')

cat > "$IR/init" <<EOF
#!/bin/busybox sh
# Porthole real-guest init (generated by tests/real-guests/fetch.sh).
BB=/bin/busybox
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
\$BB mkdir -p /proc /sys /dev
\$BB mount -t proc proc /proc
\$BB mount -t sysfs sysfs /sys
\$BB mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1

# say: to the console, and to ttyS0 too unless the console already is ttyS0.
ALSO_SERIAL=1
case " \$(\$BB cat /sys/class/tty/console/active 2>/dev/null) " in *" ttyS0 "*) ALSO_SERIAL=0 ;; esac
say() {
    echo "\$*"
    if [ \$ALSO_SERIAL = 1 ] && [ -c /dev/ttyS0 ]; then echo "\$*" 2>/dev/null >/dev/ttyS0; fi
}

say "PORTHOLE-LINUX-OK"
say "PORTHOLE-KERNEL \$(\$BB uname -r)"

for m in $MOD_FILES; do
    if [ -f /lib/modules/\$m ]; then
        out=\$(\$BB insmod /lib/modules/\$m 2>&1) || say "PORTHOLE-INSMOD-FAILED \$m: \$out"
    fi
done
say "PORTHOLE-BLOCK \$(\$BB ls /sys/block 2>/dev/null | \$BB tr '\n' ' ')"
# Disks the test attached (virtio-blk): size, serial, a checksum of the first 4 KiB; on vda also a write
# of a marker to sector 1, flushed, which the test then finds in the image file.
for d in vda vdb; do
    [ -b /dev/\$d ] || continue
    sum=\$(\$BB dd if=/dev/\$d bs=4096 count=1 2>/dev/null | \$BB md5sum | \$BB cut -d' ' -f1)
    say "PORTHOLE-DISK \$d sectors=\$(\$BB cat /sys/block/\$d/size) serial=\$(\$BB cat /sys/block/\$d/serial 2>/dev/null) md5=\$sum"
done
if [ -b /dev/vda ] && [ "\$(\$BB cat /sys/block/vda/ro)" = 0 ]; then
    echo PORTHOLE-WROTE-THIS | \$BB dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null && say "PORTHOLE-DISK-WRITTEN vda"
fi
say "PORTHOLE-POWEROFF"
\$BB sync
\$BB poweroff -f
\$BB sleep 1
\$BB reboot -f
while :; do \$BB sleep 1000; done
EOF
chmod 755 "$IR/init"

# Reproducible archive: fixed owner, fixed mtimes, sorted names.
SDE=${SOURCE_DATE_EPOCH:-0}
find "$IR" -exec touch -h -d "@$SDE" {} +
(cd "$IR" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) |
    gzip -9 -n > "$CACHE/.initramfs.cpio.gz.tmp"
mv -f "$CACHE/.initramfs.cpio.gz.tmp" "$CACHE/initramfs.cpio.gz"
record initramfs.cpio.gz "busybox-static+$KPKG" "${VER[busybox-static]}+${VER[$KPKG]}"

# ---------------------------------------------------------------------------------------------
# Debian installer ISO
# ---------------------------------------------------------------------------------------------

ensure_tool xorriso xorriso
DI=$CACHE/root/$DI_PKG/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64
ISOLINUX_BIN=$CACHE/root/isolinux/usr/lib/ISOLINUX/isolinux.bin
ISOHDPFX=$CACHE/root/isolinux/usr/lib/ISOLINUX/isohdpfx.bin
LDLINUX=$CACHE/root/syslinux-common/usr/lib/syslinux/modules/bios/ldlinux.c32
for f in "$DI/linux" "$DI/initrd.gz" "$ISOLINUX_BIN" "$ISOHDPFX" "$LDLINUX"; do
    [[ -f $f ]] || die "expected file ${f#"$CACHE/root/"} is missing from its package"
done

DIR=$CACHE/build/debian-installer
rm -rf "$DIR"
mkdir -p "$DIR/isolinux" "$DIR/install.amd"
cp "$ISOLINUX_BIN" "$LDLINUX" "$DIR/isolinux/"
cp "$DI/linux" "$DIR/install.amd/vmlinuz"
cp "$DI/initrd.gz" "$DIR/install.amd/initrd.gz"
# No menu, no prompt: straight into the installer. `nomodeset fb=false` keep it in VGA text mode
# (no bochs-drm, no bterm with its own font), so its first screen is 80x25 text on the VGA console.
# No console=ttyS0: with it, below ~1 GiB (low memory mode) the installer runs on ttyS0 only.
cat > "$DIR/isolinux/isolinux.cfg" <<EOF
# Porthole real-guest ISO (generated by tests/real-guests/fetch.sh from $DI_PKG ${VER[$DI_PKG]})
default install
prompt 0
timeout 1
label install
    kernel /install.amd/vmlinuz
    append initrd=/install.amd/initrd.gz nomodeset fb=false --- quiet
EOF

find "$DIR" -exec touch -h -d "@$SDE" {} +
rm -f "$CACHE/.debian-installer.iso.tmp"
SOURCE_DATE_EPOCH=$SDE xorriso -as mkisofs -quiet \
    -o "$CACHE/.debian-installer.iso.tmp" \
    -V "$DI_VOLID" -r -J \
    -isohybrid-mbr "$ISOHDPFX" \
    -b isolinux/isolinux.bin -c isolinux/boot.cat \
    -no-emul-boot -boot-load-size 4 -boot-info-table \
    "$DIR" >&2 || die "xorriso could not build debian-installer.iso"
mv -f "$CACHE/.debian-installer.iso.tmp" "$CACHE/debian-installer.iso"
record debian-installer.iso "$DI_PKG+isolinux+syslinux-common" \
    "${VER[$DI_PKG]}+${VER[isolinux]}+${VER[syslinux-common]}"

# ---------------------------------------------------------------------------------------------
# manifest and summary
# ---------------------------------------------------------------------------------------------

{
    echo "$MANIFEST_FORMAT"
    echo "# file	package	version	sha256"
    printf '%s\n' "${MANIFEST_LINES[@]}"
} > "$CACHE/.manifest.txt.tmp"
mv -f "$CACHE/.manifest.txt.tmp" "$CACHE/manifest.txt"

cache_complete || die "internal: the cache does not verify against the manifest just written"

print_summary
echo "  kernel $KREL: $KCOMP-compressed bzImage; vmlinux PVH note: $PVH_NOTE"
echo "  initramfs modules: ${MOD_LIST[*]:-none}"

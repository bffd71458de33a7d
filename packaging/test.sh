#!/usr/bin/env bash
# packaging/test.sh — tests the packages that packaging/build.sh left in target/packages/:
#   - lintian on the .deb: no errors and no warnings (infos are printed);
#   - desktop-file-validate and appstreamcli validate --no-net on the packaged files; icon sizes;
#   - rpm -qpl lists the expected files; the rpm's version and hand-declared requirements;
#   - the tarball: AppRun/porthole --version on this host, install.sh into a prefix, uninstall.sh leaves
#     nothing (and the AppImage's --version, when one was built);
#   - a fresh Debian 12 root (debootstrap --variant=minbase, cached in target/debootstrap-bookworm.tar):
#     apt installs the .deb with its Depends only; each program's --version; the porthole user in kvm;
#     portholed on a temporary socket answers GET /api/v1/host; with /dev/kvm, a VM of the packaged demo
#     guest boots through that daemon; with Xvfb, the window opens from the installed package;
#     apt remove leaves only the conffile; purge + autoremove leaves the root as it was (outside
#     config and data dirs); the .rpm installs into the same root with rpm --root and erases cleanly.
# Prints PASS/FAIL lines and a closing "packaging: N passed, N failed" line; exits non-zero on failure.
#
# Environment: PORTHOLE_DEBIAN_MIRROR (default: this machine's bookworm mirror), PORTHOLE_KEEP_TEST_ROOT=1
# (keep target/packaging-test/root for a look; it is removed at the next run).
# Needs root (debootstrap, chroot, mounts) on Debian 12.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
OUT=$ROOT/target/packages
T=$ROOT/target/packaging-test
BASE_TAR=$ROOT/target/debootstrap-bookworm.tar
R=$T/root
PASSED=0
FAILED=0
START=$SECONDS

pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
# check DESCRIPTION COMMAND...: PASS when the command succeeds.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
step() { echo "== $* (at $((SECONDS - START)) s)"; }
die() {
    echo "FAIL: $*"
    FAILED=$((FAILED + 1))
    finish
}
finish() {
    echo "packaging: $PASSED passed, $FAILED failed (in $((SECONDS - START)) s)"
    [ "$FAILED" -eq 0 ] && exit 0
    exit 1
}

[ "$(id -u)" -eq 0 ] || { echo "test.sh: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }

ensure_debs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "test.sh: installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
ensure_debs lintian rpm desktop-file-utils appstream debootstrap curl file squashfs-tools xvfb x11-utils \
    imagemagick binutils man-db iproute2

VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$ROOT/Cargo.toml")
# one GLOB: the single file that matches it.
one() {
    local f=("$@")
    [ ${#f[@]} -eq 1 ] && [ -f "${f[0]}" ] || return 1
    echo "${f[0]}"
}
DEB=$(one "$OUT"/porthole_"$VERSION"-*_amd64.deb) || die "no single porthole_${VERSION}-*_amd64.deb in $OUT (run packaging/build.sh)"
RPM=$(one "$OUT"/porthole-"$VERSION"-*.x86_64.rpm) || die "no single porthole-${VERSION}-*.x86_64.rpm in $OUT"
TAR=$(one "$OUT"/porthole-"$VERSION"-x86_64.tar.gz) || die "no porthole-${VERSION}-x86_64.tar.gz in $OUT"
echo "test.sh: version $VERSION: $(basename "$DEB"), $(basename "$RPM"), $(basename "$TAR")"

mkdir -p "$T"

# --- cleanup: processes in the test root, Xvfb, mounts -------------------------------------------------

XVFB_PID=
mounted_under_root() { grep -q " $R/" /proc/mounts; }
kill_root_processes() {
    local sig p pids
    for sig in TERM KILL; do
        pids=()
        for p in /proc/[0-9]*; do
            [ "$(readlink "$p/root" 2>/dev/null)" = "$R" ] && pids+=("${p#/proc/}")
        done
        [ ${#pids[@]} -eq 0 ] && return 0
        kill -"$sig" "${pids[@]}" 2>/dev/null
        sleep 1
    done
}
cleanup() {
    kill_root_processes
    [ -n "$XVFB_PID" ] && kill "$XVFB_PID" 2>/dev/null
    for m in dev proc; do
        if grep -q " $R/$m " /proc/mounts; then umount "$R/$m" 2>/dev/null || umount -l "$R/$m"; fi
    done
    if [ "${PORTHOLE_KEEP_TEST_ROOT:-0}" != 1 ] && [ -d "$R" ]; then
        if mounted_under_root; then echo "test.sh: still mounted under $R, not removing it" >&2; else rm -rf --one-file-system "$R"; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the .deb: lintian ----------------------------------------------------------------------------------

step "lintian"
if lintian --fail-on error,warning --display-info "$DEB" >"$T/lintian.txt" 2>&1; then
    pass "lintian: no errors, no warnings ($(grep -c '^I:' "$T/lintian.txt") infos)"
else
    fail "lintian"
fi
grep -E '^[EWI]:' "$T/lintian.txt" | sed 's/^/  /'

# --- desktop file, AppStream, icons, man pages ----------------------------------------------------------

step "desktop integration files"
X=$T/deb-contents
rm -rf "$X"
dpkg-deb -x "$DEB" "$X"
DESKTOP=$X/usr/share/applications/porthole.desktop
METAINFO=$X/usr/share/metainfo/invalid.example.porthole.metainfo.xml
if out=$(desktop-file-validate "$DESKTOP" 2>&1) && [ -z "$out" ]; then pass "desktop-file-validate: clean"; else
    fail "desktop-file-validate: $out"
fi
check "desktop file opens ISO images (MimeType application/x-cd-image, Exec with %f)" \
    grep -qx 'MimeType=application/x-cd-image;' "$DESKTOP"
if appstreamcli validate --no-net "$METAINFO" >"$T/appstream.txt" 2>&1 && ! grep -qE '^(E|W):' "$T/appstream.txt"; then
    pass "appstreamcli validate --no-net: no errors, no warnings"
else
    fail "appstreamcli validate --no-net"
fi
sed 's/^/  /' "$T/appstream.txt"
metainfo_ok() {
    grep -q "<release version=\"$VERSION\"" "$METAINFO" && grep -q '<screenshot type="default">' "$METAINFO" &&
        grep -q '<launchable type="desktop-id">porthole.desktop</launchable>' "$METAINFO"
}
check "metainfo: release $VERSION, screenshots, launchable porthole.desktop" metainfo_ok
icons_ok=1
for n in 16 32 48 64 128 256 512; do
    file "$X/usr/share/icons/hicolor/${n}x${n}/apps/porthole.png" | grep -q "PNG image data, $n x $n," || icons_ok=0
done
[ -f "$X/usr/share/icons/hicolor/scalable/apps/porthole.svg" ] || icons_ok=0
check "icons: SVG and PNG 16-512 px in hicolor" [ "$icons_ok" -eq 1 ]
man_ok=1
for b in porthole portholed porthole-vmm; do
    page=$X/usr/share/man/man1/$b.1.gz
    [ -f "$page" ] && w=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l "$page" 2>&1 >/dev/null) && [ -z "$w" ] || man_ok=0
done
check "man pages of the three programs, without groff warnings" [ "$man_ok" -eq 1 ]
units_ok() {
    [ -f "$X/usr/lib/systemd/user/portholed.service" ] && [ -f "$X/lib/systemd/system/portholed-remote.service" ] &&
        [ -f "$X/etc/default/portholed-remote" ] && [ ! -e "$X/etc/systemd" ]
}
check "units: user unit, system unit (not enabled: no wants link), default config" units_ok

# --- the .rpm ----------------------------------------------------------------------------------------------

step "rpm"
EXPECTED_RPM_FILES="/etc/default/portholed-remote
/usr/bin/porthole
/usr/bin/porthole-vmm
/usr/bin/portholed
/usr/lib/porthole
/usr/lib/porthole/demo.elf
/usr/lib/porthole/porthole-libvirt
/usr/lib/systemd/system/portholed-remote.service
/usr/lib/systemd/user/portholed.service
/usr/lib/sysusers.d/porthole.conf
/usr/share/applications/porthole.desktop
/usr/share/doc/porthole
/usr/share/doc/porthole/crates.txt
/usr/share/icons/hicolor/128x128/apps/porthole.png
/usr/share/icons/hicolor/16x16/apps/porthole.png
/usr/share/icons/hicolor/256x256/apps/porthole.png
/usr/share/icons/hicolor/32x32/apps/porthole.png
/usr/share/icons/hicolor/48x48/apps/porthole.png
/usr/share/icons/hicolor/512x512/apps/porthole.png
/usr/share/icons/hicolor/64x64/apps/porthole.png
/usr/share/icons/hicolor/scalable/apps/porthole.svg
/usr/share/licenses/porthole
/usr/share/licenses/porthole/Apache-2.0
/usr/share/licenses/porthole/copyright
/usr/share/man/man1/porthole-vmm.1.gz
/usr/share/man/man1/porthole.1.gz
/usr/share/man/man1/portholed.1.gz
/usr/share/metainfo/invalid.example.porthole.metainfo.xml"
rpm -qpl "$RPM" 2>/dev/null | sort >"$T/rpm-files.txt"
if diff -u <(echo "$EXPECTED_RPM_FILES" | sort) "$T/rpm-files.txt" >"$T/rpm-files.diff"; then
    pass "rpm -qpl lists the $(wc -l <"$T/rpm-files.txt") expected files"
else
    fail "rpm -qpl: unexpected file list"
    sed 's/^/  /' "$T/rpm-files.diff"
fi
check "rpm: version $VERSION, x86_64, config(noreplace) /etc/default/portholed-remote" \
    [ "$(rpm -qp --qf '%{VERSION} %{ARCH}' "$RPM" 2>/dev/null)" = "$VERSION x86_64" ]
check "rpm: requires libc (found automatically) and libEGL/libxkbcommon-x11/libwayland-client (declared)" \
    bash -c "rpm -qpR '$RPM' 2>/dev/null | grep -q '^libc.so.6(GLIBC_2.34)(64bit)' && rpm -qpR '$RPM' 2>/dev/null | grep -q '^libEGL.so.1()(64bit)' &&
             rpm -qpR '$RPM' 2>/dev/null | grep -q '^libxkbcommon-x11.so.0()(64bit)' && rpm -qpR '$RPM' 2>/dev/null | grep -q '^libwayland-client.so.0()(64bit)'"

# --- the tarball (and the AppImage) on this host -----------------------------------------------------------

step "tarball"
TX=$T/tarball
rm -rf "$TX"
mkdir -p "$TX"
tar -C "$TX" -xzf "$TAR"
TD=$TX/porthole-$VERSION-x86_64
check "tarball: AppRun --version says porthole $VERSION" [ "$("$TD/AppRun" --version 2>&1)" = "porthole $VERSION" ]
check "tarball: portholed and porthole-vmm --version say $VERSION" \
    [ "$("$TD/usr/bin/portholed" --version 2>&1) $("$TD/usr/bin/porthole-vmm" --version 2>&1)" = "portholed $VERSION porthole-vmm $VERSION" ]
check "tarball: the demo guest next to the window (porthole-demo.elf)" [ -f "$TD/usr/bin/porthole-demo.elf" ]
P=$TX/prefix
if "$TD/install.sh" --prefix "$P" >"$T/install-sh.txt" 2>&1; then pass "install.sh --prefix"; else fail "install.sh --prefix"; sed 's/^/  /' "$T/install-sh.txt"; fi
check "installed: bin/porthole --version (a link into lib/porthole)" [ "$("$P/bin/porthole" --version 2>&1)" = "porthole $VERSION" ]
check "installed: bin/portholed --version" [ "$("$P/bin/portholed" --version 2>&1)" = "portholed $VERSION" ]
check "installed: the demo guest next to the programs" [ -f "$P/lib/porthole/porthole-demo.elf" ]
check "installed: desktop file valid and launching $P/bin/porthole" \
    bash -c "desktop-file-validate '$P/share/applications/porthole.desktop' && grep -qx 'Exec=$P/bin/porthole %f' '$P/share/applications/porthole.desktop'"
check "installed: icons, man pages, user unit running $P/bin/portholed" \
    bash -c "[ -f '$P/share/icons/hicolor/256x256/apps/porthole.png' ] && [ -f '$P/share/man/man1/portholed.1.gz' ] &&
             grep -qx 'ExecStart=$P/bin/portholed' '$P/lib/systemd/user/portholed.service'"
"$P/lib/porthole/uninstall.sh" >"$T/uninstall-sh.txt" 2>&1
left=$(find "$P" -mindepth 1 2>/dev/null)
if [ -z "$left" ]; then pass "uninstall.sh removes everything it installed"; else fail "uninstall.sh left: $left"; fi
APPIMAGE=$OUT/Porthole-$VERSION-x86_64.AppImage
if [ -f "$APPIMAGE" ]; then
    check "AppImage --version says porthole $VERSION" \
        [ "$(APPIMAGE_EXTRACT_AND_RUN=1 "$APPIMAGE" --version 2>&1)" = "porthole $VERSION" ]
else
    echo "SKIP: no AppImage built (no AppImage runtime available; see packaging/README.md)"
fi

# --- a fresh Debian 12 root -------------------------------------------------------------------------------

mirror() {
    [ -n "${PORTHOLE_DEBIAN_MIRROR:-}" ] && { echo "$PORTHOLE_DEBIAN_MIRROR"; return; }
    local m
    m=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null)
    [ -z "$m" ] && m=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null)
    echo "${m:-http://deb.debian.org/debian}"
}
in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

step "Debian 12 root"
if mounted_under_root; then die "something is still mounted under $R"; fi
rm -rf --one-file-system "$R"
if [ ! -f "$BASE_TAR" ]; then
    t0=$SECONDS
    MIRROR=$(mirror)
    echo "test.sh: debootstrap --variant=minbase bookworm from $MIRROR (once; cached in $BASE_TAR)"
    mkdir -p "$T/bootstrap"
    rm -rf --one-file-system "$T/bootstrap/root"
    if debootstrap --variant=minbase bookworm "$T/bootstrap/root" "$MIRROR" >"$T/debootstrap.log" 2>&1 &&
        cp /etc/resolv.conf "$T/bootstrap/root/etc/resolv.conf" &&
        chroot "$T/bootstrap/root" apt-get update -qq >>"$T/debootstrap.log" 2>&1 &&
        chroot "$T/bootstrap/root" apt-get clean >>"$T/debootstrap.log" 2>&1; then
        tar -C "$T/bootstrap/root" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
        rm -rf --one-file-system "$T/bootstrap/root"
        pass "debootstrap of a minimal Debian 12 root ($((SECONDS - t0)) s)"
    else
        tail -20 "$T/debootstrap.log"
        die "debootstrap (log: $T/debootstrap.log)"
    fi
fi
mkdir -p "$R"
tar -C "$R" -xf "$BASE_TAR"
cp /etc/resolv.conf "$R/etc/resolv.conf"
mount -t proc proc "$R/proc"
# The host's /dev (not recursive): /dev/null and friends, and /dev/kvm for the VM check.
mount --bind /dev "$R/dev"
mkdir -p "$R/tmp/pkg"
cp "$DEB" "$R/tmp/pkg/"
# Downloaded .debs are kept across runs (apt checks them against its lists).
mkdir -p "$T/apt-archives"
cp "$T"/apt-archives/*.deb "$R/var/cache/apt/archives/" 2>/dev/null

# snapshot FILE: every path in the root except the volatile ones and package-manager state.
snapshot() {
    (cd "$R" && find . -xdev \( -path ./proc -o -path ./dev -o -path ./tmp -o -path ./run -o -path ./var/cache \
        -o -path ./var/log -o -path ./var/lib/apt -o -path ./var/lib/dpkg \) -prune -o -print) | sort >"$1"
}
snapshot "$T/before.txt"
in_root dpkg-query -W -f '${binary:Package}\n' | sort >"$T/packages-before.txt"

step "apt-get install ./$(basename "$DEB") (Depends only)"
t0=$SECONDS
install_deb() { in_root apt-get install -y --no-install-recommends "/tmp/pkg/$(basename "$DEB")" >"$T/apt-install.log" 2>&1; }
if install_deb || { in_root apt-get update -qq >>"$T/apt-install.log" 2>&1 && install_deb; }; then
    pass "apt-get install of the .deb into a fresh Debian 12 root ($((SECONDS - t0)) s, $(grep -c '^Setting up' "$T/apt-install.log") packages set up)"
else
    tail -30 "$T/apt-install.log"
    die "apt-get install (log: $T/apt-install.log)"
fi
cp -n "$R"/var/cache/apt/archives/*.deb "$T/apt-archives/" 2>/dev/null
sed -n '/^Porthole:/,/README.Debian/p' "$T/apt-install.log" | sed 's/^/  postinst: /'
snapshot "$T/installed.txt"

for b in porthole portholed porthole-vmm; do
    got=$(in_root "/usr/bin/$b" --version 2>&1)
    if [ "$got" = "$b $VERSION" ]; then pass "in the root: $b --version says $VERSION"; else fail "in the root: $b --version: $got"; fi
done
libvirt_absent() { ! in_root dpkg -s libvirt0 >/dev/null 2>&1; }
check "in the root: libvirt0 is only recommended, so not installed, and the window starts without it" libvirt_absent
helper_says_library() { in_root /usr/lib/porthole/porthole-libvirt --version 2>&1 | grep -q 'libvirt.so.0'; }
check "in the root: the libvirt helper names the library it lacks" helper_says_library
check "in the root: system user porthole (home /var/lib/porthole) in the group kvm" \
    bash -c "chroot '$R' getent passwd porthole | grep -q ':/var/lib/porthole:' && chroot '$R' id -nG porthole | tr ' ' '\n' | grep -qx kvm"
check "in the root: the system service is not enabled" [ ! -e "$R/etc/systemd/system/multi-user.target.wants/portholed-remote.service" ]

step "portholed in the root"
mkdir -p "$R/tmp/pt"
chroot "$R" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root /usr/bin/portholed --socket /tmp/pt/portholed.sock \
    --data-dir /tmp/pt/data --runtime-dir /tmp/pt/run >"$T/portholed.log" 2>&1 &
DAEMON=$!
SOCK=$R/tmp/pt/portholed.sock
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
api() { curl -sS --max-time 10 --unix-socket "$SOCK" "$@"; }
host=$(api http://localhost/api/v1/host 2>&1)
echo "  GET /api/v1/host: $host"
if [[ "$host" == *"\"version\":\"$VERSION\""* ]]; then pass "portholed in the root answers GET /api/v1/host"; else
    fail "GET /api/v1/host"
    sed 's/^/  portholed: /' "$T/portholed.log"
fi

if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    vm=$(api -X POST http://localhost/api/v1/vms -H 'content-type: application/json' \
        -d '{"name":"pkgtest","vcpus":1,"memory_mib":64,"disk_gib":0,"boot":{"kernel":"/usr/lib/porthole/demo.elf"}}' 2>&1)
    id=$(echo "$vm" | sed -n 's/^{"id":"\([0-9a-f]*\)".*/\1/p')
    serial=
    if [ -n "$id" ] && api -X POST "http://localhost/api/v1/vms/$id/start" >/dev/null 2>&1; then
        for _ in $(seq 50); do
            serial=$(api "http://localhost/api/v1/vms/$id/serial?lines=5" 2>&1)
            [[ "$serial" == *PORTHOLE-DEMO-READY* ]] && break
            sleep 0.2
        done
        api -X POST "http://localhost/api/v1/vms/$id/poweroff" >/dev/null 2>&1
        sleep 0.5
        api -X DELETE "http://localhost/api/v1/vms/$id" >/dev/null 2>&1
    fi
    if [[ "$serial" == *PORTHOLE-DEMO-READY* ]]; then pass "the packaged demo guest boots through portholed and porthole-vmm in the root"; else
        fail "demo VM in the root: create: $vm; serial: $serial"
    fi
else
    echo "SKIP: /dev/kvm is not usable here: no VM boot in the root"
fi
kill "$DAEMON" 2>/dev/null
wait "$DAEMON" 2>/dev/null

# The window from the installed package under Xvfb: proves the libraries it loads at run time are declared.
step "the window in the root (Xvfb)"
exec 3>"$T/xvfb-display"
Xvfb -displayfd 3 -screen 0 1280x800x24 -nolisten tcp >"$T/xvfb.log" 2>&1 &
XVFB_PID=$!
exec 3>&-
for _ in $(seq 50); do [ -s "$T/xvfb-display" ] && break; sleep 0.1; done
DISP=:$(cat "$T/xvfb-display")
mkdir -p "$R/tmp/gui/home" "$R/tmp/gui/run"
chmod 0700 "$R/tmp/gui/run"
# The X server's abstract socket is reachable from the chroot (same network namespace).
chroot "$R" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/tmp/gui/home XDG_CACHE_HOME=/tmp/gui/home/.cache \
    XDG_RUNTIME_DIR=/tmp/gui/run DISPLAY="$DISP" /usr/bin/porthole >"$T/gui.log" 2>&1 &
GUI=$!
shown=0
for _ in $(seq 60); do
    if xwininfo -display "$DISP" -root -tree 2>/dev/null | grep -q '"Porthole"'; then shown=1; break; fi
    kill -0 "$GUI" 2>/dev/null || break
    sleep 0.5
done
if [ "$shown" -eq 1 ]; then
    pass "the window opens from the installed package"
    # It starts this user's daemon and keeps a connection to its socket: an established connection on
    # the socket shows that the window reached its daemon.
    talking=0
    for _ in $(seq 40); do
        if ss -x state established 2>/dev/null | grep -q ' /tmp/gui/run/porthole/portholed.sock '; then talking=1; break; fi
        sleep 0.5
    done
    sleep 1
    import -display "$DISP" -window root "$T/gui-in-root.png" 2>/dev/null
    check "the window started portholed and talks to it (screenshot: $T/gui-in-root.png)" [ "$talking" -eq 1 ]
else
    fail "the window did not open"
    sed 's/^/  porthole: /' "$T/gui.log" | tail -20
fi
kill_root_processes
kill "$XVFB_PID" 2>/dev/null
wait "$XVFB_PID" 2>/dev/null
XVFB_PID=
rm -rf "$R/tmp/pt" "$R/tmp/gui"

step "apt-get remove, purge, autoremove"
dpkg-deb -c "$DEB" | awk '$1 !~ /^d/ {sub(/^\./, "", $6); print $6}' >"$T/deb-files.txt"
if in_root apt-get remove -y porthole >"$T/apt-remove.log" 2>&1; then pass "apt-get remove porthole"; else fail "apt-get remove porthole"; fi
left=$(while read -r f; do [ -e "$R$f" ] && echo "$f"; done <"$T/deb-files.txt")
if [ "$left" = /etc/default/portholed-remote ]; then pass "after remove only the conffile /etc/default/portholed-remote is left"; else
    fail "after remove, left: $(echo "$left" | tr '\n' ' ')"
fi
if in_root apt-get purge -y porthole >"$T/apt-purge.log" 2>&1 && in_root apt-get autoremove --purge -y >>"$T/apt-purge.log" 2>&1; then
    pass "apt-get purge porthole; apt-get autoremove --purge (the dependencies)"
else
    fail "apt-get purge/autoremove"
fi
# autoremove keeps what the base system recommends (apt recommends ca-certificates): purge those too.
in_root dpkg-query -W -f '${binary:Package}\n' | sort | comm -13 "$T/packages-before.txt" - >"$T/packages-extra.txt"
if [ -s "$T/packages-extra.txt" ]; then
    echo "  kept by autoremove, purged: $(tr '\n' ' ' <"$T/packages-extra.txt")"
    # shellcheck disable=SC2046
    in_root apt-get purge -y $(cat "$T/packages-extra.txt") >>"$T/apt-purge.log" 2>&1 || fail "apt-get purge of the dependencies"
fi
snapshot "$T/after.txt"
left=$(while read -r f; do [ -e "$R$f" ] && echo "$f"; done <"$T/deb-files.txt")
if [ -z "$left" ]; then pass "after purge no file of the package is left (the conffile neither)"; else
    fail "after purge, left: $(echo "$left" | tr '\n' ' ')"
fi
# Outside config (/etc) and data dirs (/var/lib/porthole, the remote service's) the root must be as it
# was before the install, with the dependencies gone again. In /etc, the kept system user porthole
# and what dependencies' purges leave (ca-certificates keeps /etc/ssl) are listed, not failed.
diff "$T/before.txt" "$T/after.txt" | sed -n 's/^[<>] //p' >"$T/changed.txt"
grep -vE '^\./etc(/|$)|^\./var/lib/porthole(/|$)' "$T/changed.txt" >"$T/left.txt"
if [ ! -s "$T/left.txt" ]; then
    pass "after purge + autoremove the root is as before outside config and data dirs ($(wc -l <"$T/before.txt") paths compared)"
else
    fail "after purge, paths differ from before the install: $(head -20 "$T/left.txt" | tr '\n' ' ')"
fi
n_etc=$(grep -cE '^\./etc(/|$)' "$T/changed.txt")
echo "  changed in /etc (config): $n_etc paths: $(grep -E '^\./etc(/|$)' "$T/changed.txt" | cut -d/ -f1-3 | sort -u | tr '\n' ' ')"

step "the .rpm in the same root (rpm --root, without dependency checks)"
rpm --root "$R" --initdb 2>/dev/null
if rpm --root "$R" -i --nodeps "$RPM" >"$T/rpm-install.log" 2>&1; then
    got=$(in_root /usr/bin/portholed --version 2>&1)
    if [ "$got" = "portholed $VERSION" ] && rpm --root "$R" -V --nodeps porthole >"$T/rpm-verify.log" 2>&1; then
        pass "rpm installs (scriptlets run), rpm -V verifies, portholed --version says $VERSION"
    else
        fail "rpm in the root: $got $(cat "$T/rpm-verify.log")"
    fi
    rpm --root "$R" -e porthole >>"$T/rpm-install.log" 2>&1
    left=$(rpm -qpl "$RPM" 2>/dev/null | while read -r f; do [ -e "$R$f" ] && [ ! -d "$R$f" ] && echo "$f"; done)
    if [ -z "$left" ]; then pass "rpm -e removes every file"; else fail "rpm -e left: $(echo "$left" | tr '\n' ' ')"; fi
else
    fail "rpm -i into the root"
    sed 's/^/  /' "$T/rpm-install.log"
fi

finish

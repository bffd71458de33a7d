#!/bin/sh
# Installs Porthole from this unpacked tarball.
#
#   ./install.sh [--prefix DIR] [--system-service]
#
# --prefix DIR        where to install: DIR/bin, DIR/lib/porthole, DIR/share (default: /usr/local as
#                     root, ~/.local otherwise)
# --system-service    (root) also install portholed-remote.service, the system unit of a remote host,
#                     with /etc/default/portholed-remote and the system user porthole (not enabled)
#
# Every installed file is listed in DIR/lib/porthole/install-manifest.txt; DIR/lib/porthole/uninstall.sh
# (or ./uninstall.sh --prefix DIR) removes them again, keeping configuration and VM data.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" -eq 0 ]; then PREFIX=/usr/local; else PREFIX=${HOME:?}/.local; fi
SYSTEM=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        --system-service) SYSTEM=1; shift ;;
        -h | --help) sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
if [ "$SYSTEM" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: --system-service needs root" >&2; exit 1
fi

LIB=$PREFIX/lib/porthole
MANIFEST=$LIB/install-manifest.txt
mkdir -p "$LIB"
: >"$MANIFEST.new"

# put SRC DEST MODE: copies a file and records it.
put() {
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
    echo "$2" >>"$MANIFEST.new"
}

# The programs live together in lib/porthole (the window finds the daemon and the demo guest next to
# itself, the daemon the engine); bin/ has links to them.
for b in porthole portholed porthole-vmm; do
    put "$HERE/usr/bin/$b" "$LIB/$b" 0755
    mkdir -p "$PREFIX/bin"
    ln -sfn "../lib/porthole/$b" "$PREFIX/bin/$b"
    echo "$PREFIX/bin/$b" >>"$MANIFEST.new"
done
put "$HERE/usr/bin/porthole-demo.elf" "$LIB/porthole-demo.elf" 0644
put "$HERE/usr/bin/porthole-libvirt" "$LIB/porthole-libvirt" 0755
put "$HERE/uninstall.sh" "$LIB/uninstall.sh" 0755

# Desktop integration: the launcher (with this prefix's path), icons, AppStream metadata, man pages.
sed "s|^Exec=porthole |Exec=$PREFIX/bin/porthole |" "$HERE/usr/share/applications/porthole.desktop" >"$LIB/porthole.desktop.tmp"
put "$LIB/porthole.desktop.tmp" "$PREFIX/share/applications/porthole.desktop" 0644
rm -f "$LIB/porthole.desktop.tmp"
(cd "$HERE/usr/share" && find icons metainfo man -type f) | while read -r f; do
    put "$HERE/usr/share/$f" "$PREFIX/share/$f" 0644
done

# The daemon's systemd user unit, where `systemctl --user` looks for this prefix.
case "$PREFIX" in
    "${HOME:-/nonexistent}/.local") UNITDIR=$PREFIX/share/systemd/user ;;
    *) UNITDIR=$PREFIX/lib/systemd/user ;;
esac
sed "s|/usr/bin/portholed|$PREFIX/bin/portholed|" "$HERE/usr/lib/systemd/user/portholed.service" >"$LIB/unit.tmp"
put "$LIB/unit.tmp" "$UNITDIR/portholed.service" 0644
rm -f "$LIB/unit.tmp"

if [ "$SYSTEM" -eq 1 ]; then
    sed "s|/usr/bin/portholed|$PREFIX/bin/portholed|" "$HERE/usr/lib/systemd/system/portholed-remote.service" >"$LIB/unit.tmp"
    put "$LIB/unit.tmp" "$PREFIX/lib/systemd/system/portholed-remote.service" 0644
    rm -f "$LIB/unit.tmp"
    # Configuration is kept by uninstall.sh, so it is not in the manifest.
    [ -e /etc/default/portholed-remote ] || install -D -m 0644 "$HERE/etc/default/portholed-remote" /etc/default/portholed-remote
    getent group kvm >/dev/null || groupadd --system kvm
    getent passwd porthole >/dev/null || useradd --system --user-group --home-dir /var/lib/porthole \
        --no-create-home --shell /usr/sbin/nologin porthole
    id -nG porthole | tr ' ' '\n' | grep -qx kvm || usermod -a -G kvm porthole
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
mv -f "$MANIFEST.new" "$MANIFEST"

if command -v update-desktop-database >/dev/null 2>&1; then
    update-desktop-database -q "$PREFIX/share/applications" 2>/dev/null || true
fi

echo "Porthole $(cat "$HERE/VERSION") installed in $PREFIX (uninstall: $LIB/uninstall.sh)."
case ":$PATH:" in *":$PREFIX/bin:"*) ;; *) echo "Note: $PREFIX/bin is not on your PATH." ;; esac
echo "VMs need access to /dev/kvm: sudo usermod -aG kvm \$USER, then log in again."
if [ "$SYSTEM" -eq 1 ]; then
    echo "The remote-host service is installed but not enabled: systemctl enable --now portholed-remote"
fi

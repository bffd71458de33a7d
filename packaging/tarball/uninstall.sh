#!/bin/sh
# Removes what install.sh installed (the files in PREFIX/lib/porthole/install-manifest.txt).
#
#   uninstall.sh [--prefix DIR]
#
# Run from the unpacked tarball give --prefix (the default is /usr/local as root, ~/.local otherwise);
# the copy installed in PREFIX/lib/porthole knows its prefix. Kept: /etc/default/portholed-remote, the
# system user porthole, and VM data (~/.local/share/porthole, /var/lib/porthole).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
if [ -f "$HERE/install-manifest.txt" ]; then
    PREFIX=$(dirname "$(dirname "$HERE")")
elif [ "$(id -u)" -eq 0 ]; then PREFIX=/usr/local; else PREFIX=${HOME:?}/.local; fi
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        -h | --help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "uninstall.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$PREFIX" in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac

MANIFEST=$PREFIX/lib/porthole/install-manifest.txt
[ -f "$MANIFEST" ] || { echo "uninstall.sh: no Porthole installation in $PREFIX ($MANIFEST is missing)" >&2; exit 1; }

if grep -q '/systemd/system/portholed-remote.service$' "$MANIFEST" && [ -d /run/systemd/system ]; then
    systemctl disable --now portholed-remote.service 2>/dev/null || true
fi
# Remove the files, then every folder they leave empty (up to the prefix).
while read -r f; do
    case "$f" in "$PREFIX"/*) rm -f "$f" ;; esac
done <"$MANIFEST"
# update-desktop-database's cache: dropped with the last launcher, refreshed otherwise.
apps=$PREFIX/share/applications
if [ -d "$apps" ]; then
    if [ -z "$(find "$apps" -mindepth 1 ! -name mimeinfo.cache | head -n 1)" ]; then
        rm -f "$apps/mimeinfo.cache"
    elif command -v update-desktop-database >/dev/null 2>&1; then
        update-desktop-database -q "$apps" 2>/dev/null || true
    fi
fi
dirs=$(while read -r f; do d=$(dirname "$f"); while [ "${#d}" -gt "${#PREFIX}" ]; do echo "$d"; d=$(dirname "$d"); done; done <"$MANIFEST" | sort -u -r)
rm -f "$MANIFEST"
for d in $dirs "$PREFIX/lib/porthole"; do rmdir "$d" 2>/dev/null || true; done
echo "Porthole removed from $PREFIX."

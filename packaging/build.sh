#!/usr/bin/env bash
# packaging/build.sh — builds Porthole's Linux packages into target/packages/:
#   porthole_VERSION-REL_amd64.deb, porthole-VERSION-REL.x86_64.rpm, porthole-VERSION-x86_64.tar.gz
#   (a self-contained tarball whose folder is also an AppDir, with install.sh and uninstall.sh), and
#   Porthole-VERSION-x86_64.AppImage when an AppImage runtime is given (PORTHOLE_APPIMAGE_RUNTIME).
#
# Environment:
#   PORTHOLE_BIN_DIR           take porthole, portholed and porthole-vmm (and build/porthole-guests-*/out/
#                              demo.elf) from this folder instead of running
#                              `cargo build --release -p porthole -p portholed -p vmm-core`
#   PORTHOLE_DEMO_ELF          the demo guest to ship (default: the newest build/porthole-guests-*/out/demo.elf)
#   PORTHOLE_PKG_RELEASE       the packages' release number (default 1)
#   PORTHOLE_APPIMAGE_RUNTIME  an AppImage type 2 runtime (runtime-x86_64): also build the AppImage
#
# Needs Debian 12 (root or sudo to install missing tools: dpkg-dev, rpm, help2man, squashfs-tools, binutils).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PKG=$ROOT/packaging
OUT=$ROOT/target/packages
WORK=$ROOT/target/packaging
REL=${PORTHOLE_PKG_RELEASE:-1}
MAINTAINER="The Porthole developers <porthole@example.invalid>"
HOMEPAGE=https://example.invalid/porthole
METAINFO_ID=invalid.example.porthole

say() { echo "build.sh: $*"; }
die() { echo "build.sh: FAIL: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $* (install sudo or run as root)"
    fi
}

# ensure_debs PKG...: installs the Debian packages that are missing.
ensure_debs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_debs dpkg-dev rpm help2man squashfs-tools binutils gzip file libvirt-dev pkg-config libturbojpeg0-dev libasound2-dev

# --- version, binaries --------------------------------------------------------------------------------

VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$ROOT/Cargo.toml")
[ -n "$VERSION" ] || die "no [workspace.package] version in Cargo.toml"
[ "$(uname -m)" = x86_64 ] || die "Porthole's engine is x86-64 only; this is $(uname -m)"
DEB_VERSION=$VERSION-$REL

# Dates come from the last commit, so that a rebuild of the same commit gives the same files.
if SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null); then :; else SOURCE_DATE_EPOCH=$(date +%s); fi
export SOURCE_DATE_EPOCH
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)

if [ -n "${PORTHOLE_BIN_DIR:-}" ]; then
    BIN=$(cd "$PORTHOLE_BIN_DIR" && pwd)
    say "binaries from $BIN"
else
    say "cargo build --release -p porthole -p portholed -p vmm-core -p porthole-libvirt"
    (cd "$ROOT" && cargo build --release -p porthole -p portholed -p vmm-core -p porthole-libvirt)
    BIN=$ROOT/target/release
fi
for b in porthole portholed porthole-vmm porthole-libvirt; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing"
    got=$("$BIN/$b" --version)
    [ "$got" = "$b $VERSION" ] || die "$b --version says '$got', the workspace is $VERSION"
done
DEMO=${PORTHOLE_DEMO_ELF:-$(ls -t "$BIN"/build/porthole-guests-*/out/demo.elf 2>/dev/null | head -n 1 || true)}
[ -n "$DEMO" ] && [ -f "$DEMO" ] || die "no demo guest (build/porthole-guests-*/out/demo.elf in $BIN; or set PORTHOLE_DEMO_ELF)"
say "version $VERSION (package release $REL, commit $COMMIT); demo guest $DEMO"

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
rm -f "$OUT"/porthole_*.deb "$OUT"/porthole-*.rpm "$OUT"/porthole-*.tar.gz "$OUT"/Porthole-*.AppImage

# --- the common tree (FHS paths under /usr) -------------------------------------------------------------

COMMON=$WORK/common
install -d "$COMMON/usr/bin" "$COMMON/usr/lib/porthole" "$COMMON/usr/share/man/man1" \
    "$COMMON/usr/share/doc/porthole"
for b in porthole portholed porthole-vmm; do
    strip --strip-unneeded --remove-section=.comment --remove-section=.note -o "$COMMON/usr/bin/$b" "$BIN/$b"
    chmod 0755 "$COMMON/usr/bin/$b"
done
# The window's helper for libvirt hosts: the one program that links libvirt's client library, so the window
# starts without it. Not a command of its own: the window finds it in ../lib/porthole.
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    -o "$COMMON/usr/lib/porthole/porthole-libvirt" "$BIN/porthole-libvirt"
chmod 0755 "$COMMON/usr/lib/porthole/porthole-libvirt"
# The demo guest is a guest kernel (a PVH ELF), not a program of this system: read, never run, by the
# engine. Stripped of its symbols (its PVH note stays).
strip --strip-all -o "$COMMON/usr/lib/porthole/demo.elf" "$DEMO"
chmod 0644 "$COMMON/usr/lib/porthole/demo.elf"

install -D -m 0644 "$PKG/desktop/porthole.desktop" "$COMMON/usr/share/applications/porthole.desktop"
sed -e "s/@VERSION@/$VERSION/" -e "s/@DATE@/$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)/" \
    "$PKG/desktop/porthole.metainfo.xml.in" >"$WORK/metainfo.xml"
install -D -m 0644 "$WORK/metainfo.xml" "$COMMON/usr/share/metainfo/$METAINFO_ID.metainfo.xml"
install -D -m 0644 "$ROOT/assets/icons/porthole.svg" "$COMMON/usr/share/icons/hicolor/scalable/apps/porthole.svg"
for png in "$ROOT"/assets/icons/hicolor/*/apps/porthole.png; do
    size=$(basename "$(dirname "$(dirname "$png")")")
    install -D -m 0644 "$png" "$COMMON/usr/share/icons/hicolor/$size/apps/porthole.png"
done

# Man pages from the programs' --help (help2man), with the sections in packaging/man/*.h2m.
for b in porthole portholed porthole-vmm; do
    help2man --no-info --include "$PKG/man/$b.h2m" --output "$WORK/$b.1" "$COMMON/usr/bin/$b"
    gzip -9n -c "$WORK/$b.1" >"$COMMON/usr/share/man/man1/$b.1.gz"
    chmod 0644 "$COMMON/usr/share/man/man1/$b.1.gz"
done

install -D -m 0644 "$PKG/systemd/portholed.service" "$COMMON/usr/lib/systemd/user/portholed.service"
install -D -m 0644 "$PKG/systemd/porthole.sysusers" "$COMMON/usr/lib/sysusers.d/porthole.conf"
install -D -m 0644 "$PKG/systemd/portholed-remote.default" "$COMMON/etc/default/portholed-remote"

# The Rust crates inside the programs, with their licenses (from Cargo.lock, without building).
if command -v cargo >/dev/null; then
    {
        echo "Rust crates statically linked into porthole, portholed, porthole-vmm and porthole-libvirt $VERSION, with their licenses."
        echo
        (cd "$ROOT" && cargo tree --offline --locked -e normal -p porthole -p portholed -p vmm-core -p porthole-libvirt \
            --prefix none -f '{p}  {l}') | sed -e 's/ (\*)$//' -e 's/ ([^)]*\/[^)]*)//' | sort -u | grep -v '^$'
    } >"$COMMON/usr/share/doc/porthole/crates.txt" || die "cargo tree failed"
else
    say "cargo is not installed: crates.txt lists no crates"
    echo "Rust crates: see Cargo.lock of Porthole $VERSION (cargo was not available when this was built)." \
        >"$COMMON/usr/share/doc/porthole/crates.txt"
fi
chmod 0644 "$COMMON/usr/share/doc/porthole/crates.txt"
sed "s/@YEAR@/$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)/" "$PKG/debian/copyright.in" >"$WORK/copyright"

# --- .deb -----------------------------------------------------------------------------------------------

DEB=$WORK/deb
cp -a "$COMMON" "$DEB"
# Debian 12 keeps system units in /lib/systemd/system (the /usr merge moves them later).
install -D -m 0644 "$PKG/systemd/portholed-remote.service" "$DEB/lib/systemd/system/portholed-remote.service"
install -m 0644 "$WORK/copyright" "$DEB/usr/share/doc/porthole/copyright"
install -m 0644 "$PKG/debian/README.Debian" "$DEB/usr/share/doc/porthole/README.Debian"
install -D -m 0644 "$PKG/debian/lintian-overrides" "$DEB/usr/share/lintian/overrides/porthole"
{
    echo "porthole ($DEB_VERSION) unstable; urgency=medium"
    echo
    echo "  * Porthole $VERSION, packaged from commit $COMMIT."
    echo
    echo " -- $MAINTAINER  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$DEB/usr/share/doc/porthole/changelog.Debian.gz"
chmod 0644 "$DEB/usr/share/doc/porthole/changelog.Debian.gz"

# Library dependencies: dpkg-shlibdeps for what the programs link; the libraries the window loads at
# run time (dlopen: winit, glutin) by hand. The OpenGL drivers are a Recommends: not every system
# needs Mesa's (e.g. NVIDIA's own), and a remote host without a display needs none.
mkdir -p "$WORK/shlibs/debian"
printf 'Source: porthole\n\nPackage: porthole\nArchitecture: amd64\n' >"$WORK/shlibs/debian/control"
SHLIBS=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O "$DEB/usr/bin/porthole" "$DEB/usr/bin/portholed" "$DEB/usr/bin/porthole-vmm" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || die "dpkg-shlibdeps found no dependencies"
# libvirt's client library serves libvirt hosts only (through the helper): recommended, not required.
LIBVIRT_DEB=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O "$DEB/usr/lib/porthole/porthole-libvirt" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p' | tr ',' '\n' | sed 's/^ *//' | grep '^libvirt0' || true)
[ -n "$LIBVIRT_DEB" ] || die "dpkg-shlibdeps found no libvirt0 for porthole-libvirt"
DLOPEN_DEBS="libegl1, libgl1, libwayland-client0, libwayland-egl1, libxkbcommon0, libxkbcommon-x11-0, libx11-6, libx11-xcb1, libxcursor1, libxi6, libxrender1"
DEPENDS="$SHLIBS, adduser, $DLOPEN_DEBS"
# ca-certificates: only for remote hosts added without a pinned fingerprint (their certificate is then
# checked against the system's CA roots); the local daemon and pinned hosts work without it.
# seabios: firmware boot (VMs booting an ISO or a disk rather than a kernel; porthole-vmm --firmware bios).
# osinfo-db: libosinfo's database, which portholed reads to name the OS on an ISO (without it: "Unknown OS").
# libvirt0: libvirt hosts (the window starts and serves every other host without it).
RECOMMENDS="seabios, passt, ca-certificates, libgl1-mesa-dri, libdbus-1-3, osinfo-db, $LIBVIRT_DEB"

(cd "$DEB" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$WORK/md5sums"
install -d -m 0755 "$DEB/DEBIAN"
install -m 0644 "$WORK/md5sums" "$DEB/DEBIAN/md5sums"
echo /etc/default/portholed-remote >"$DEB/DEBIAN/conffiles"
chmod 0644 "$DEB/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m 0755 "$PKG/debian/$s" "$DEB/DEBIAN/$s"; done
INSTALLED_SIZE=$(du -k -s --apparent-size --exclude=DEBIAN "$DEB" | cut -f1)
cat >"$DEB/DEBIAN/control" <<EOF
Package: porthole
Version: $DEB_VERSION
Architecture: amd64
Maintainer: $MAINTAINER
Installed-Size: $INSTALLED_SIZE
Depends: $DEPENDS
Recommends: $RECOMMENDS
Section: admin
Priority: optional
Homepage: $HOMEPAGE
Description: desktop app for virtual machines, with its own KVM engine
 Porthole lists the virtual machines of this computer and of remote hosts in
 one window, creates them point-and-click, shows their screens (in a tab, a
 window of their own or full screen) and attaches ISO images by drag-and-drop.
 .
 Local VMs run on Porthole's own KVM engine (porthole-vmm), one small process
 per VM. The host daemon (portholed) owns a host's VMs; as a system service it
 serves them to remote Porthole users over HTTPS with API tokens.
EOF
chmod 0644 "$DEB/DEBIAN/control"
find "$DEB" -type d -exec chmod 0755 {} +
DEB_FILE=$OUT/porthole_${DEB_VERSION}_amd64.deb
dpkg-deb --root-owner-group -Zxz --build "$DEB" "$DEB_FILE" >/dev/null
say "built $DEB_FILE"

# --- .rpm -----------------------------------------------------------------------------------------------

RPMSTAGE=$WORK/rpm-root
cp -a "$COMMON" "$RPMSTAGE"
install -D -m 0644 "$PKG/systemd/portholed-remote.service" "$RPMSTAGE/usr/lib/systemd/system/portholed-remote.service"
install -D -m 0644 "$WORK/copyright" "$RPMSTAGE/usr/share/licenses/porthole/copyright"
install -D -m 0644 /usr/share/common-licenses/Apache-2.0 "$RPMSTAGE/usr/share/licenses/porthole/Apache-2.0"
# The same libraries as the .deb's by hand, by soname (what Fedora, openSUSE and RHEL packages provide).
REQUIRES="Recommends:     ca-certificates"$'\n'"Recommends:     seabios"$'\n'"Recommends:     passt"$'\n'"Recommends:     osinfo-db"$'\n'"Recommends:     libvirt-libs"$'\n'
for so in libEGL.so.1 libGL.so.1 libwayland-client.so.0 libwayland-egl.so.1 libxkbcommon.so.0 \
    libxkbcommon-x11.so.0 libX11.so.6 libX11-xcb.so.1 libXcursor.so.1 libXi.so.6 libXrender.so.1; do
    REQUIRES+="Requires:       $so()(64bit)"$'\n'
done
mkdir -p "$WORK/rpmbuild"
awk -v req="$REQUIRES" -v ver="$VERSION" -v rel="$REL" -v stage="$RPMSTAGE" '
    /^@REQUIRES@$/ { printf "%s", req; next }
    { gsub(/@VERSION@/, ver); gsub(/@RELEASE@/, rel); gsub(/@STAGE@/, stage); print }
' "$PKG/rpm/porthole.spec.in" >"$WORK/porthole.spec"
rpmbuild -bb --quiet --target x86_64 \
    --define "_topdir $WORK/rpmbuild" --define "_rpmdir $WORK/rpms" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "source_date_epoch_from_changelog 0" --define "use_source_date_epoch_as_buildtime 1" \
    --define "_buildhost porthole-build" \
    "$WORK/porthole.spec" >"$WORK/rpmbuild.log" 2>&1 || { cat "$WORK/rpmbuild.log" >&2; die "rpmbuild failed"; }
RPM_FILE=$OUT/porthole-$VERSION-$REL.x86_64.rpm
mv "$WORK/rpms/porthole-$VERSION-$REL.x86_64.rpm" "$RPM_FILE"
say "built $RPM_FILE"

# --- the tarball (an AppDir too) and, with a runtime, the AppImage -------------------------------------

NAME=porthole-$VERSION-x86_64
APPDIR=$WORK/$NAME
cp -a "$COMMON" "$APPDIR"
rm -rf "$APPDIR/usr/share/doc"
# The window looks for the demo guest next to itself.
mv "$APPDIR/usr/lib/porthole/demo.elf" "$APPDIR/usr/bin/porthole-demo.elf"
mv "$APPDIR/usr/lib/porthole/porthole-libvirt" "$APPDIR/usr/bin/porthole-libvirt"
rmdir "$APPDIR/usr/lib/porthole"
install -D -m 0644 "$PKG/systemd/portholed-remote.service" "$APPDIR/usr/lib/systemd/system/portholed-remote.service"
install -m 0755 "$PKG/tarball/AppRun" "$PKG/tarball/install.sh" "$PKG/tarball/uninstall.sh" "$APPDIR/"
install -m 0644 "$PKG/desktop/porthole.desktop" "$APPDIR/porthole.desktop"
install -m 0644 "$ROOT/assets/icons/porthole.svg" "$APPDIR/porthole.svg"
ln -s usr/share/icons/hicolor/256x256/apps/porthole.png "$APPDIR/.DirIcon"
install -m 0644 "$WORK/copyright" "$APPDIR/COPYRIGHT"
install -m 0644 "$COMMON/usr/share/doc/porthole/crates.txt" "$APPDIR/CRATES.txt"
echo "$VERSION" >"$APPDIR/VERSION"
cat >"$APPDIR/README.txt" <<EOF
Porthole $VERSION for x86-64 Linux (glibc 2.34 or newer)

Run it from here:     ./AppRun            (or ./usr/bin/porthole)
Install it:           ./install.sh        (/usr/local as root, ~/.local otherwise; --prefix DIR; --help)
Uninstall:            PREFIX/lib/porthole/uninstall.sh

VMs need access to /dev/kvm: sudo usermod -aG kvm \$USER, then log in again.
The window needs X11 or Wayland with EGL/OpenGL (Debian: libegl1 libgl1-mesa-dri libxkbcommon-x11-0
libwayland-egl1) and ALSA's library for the guests' sound (Debian: libasound2; Fedora: alsa-lib). libvirt hosts need libvirt's client library (Debian: libvirt0; Fedora: libvirt-libs);
everything else works without it. Licence: Apache-2.0 OR MIT (COPYRIGHT; bundled Rust crates in CRATES.txt).
EOF
find "$APPDIR" -type d -exec chmod 0755 {} +
TAR_FILE=$OUT/$NAME.tar.gz
tar -C "$WORK" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" -cf - "$NAME" |
    gzip -9n >"$TAR_FILE"
say "built $TAR_FILE"

if [ -n "${PORTHOLE_APPIMAGE_RUNTIME:-}" ]; then
    [ -f "$PORTHOLE_APPIMAGE_RUNTIME" ] || die "PORTHOLE_APPIMAGE_RUNTIME=$PORTHOLE_APPIMAGE_RUNTIME is missing"
    mksquashfs "$APPDIR" "$WORK/appdir.squashfs" -root-owned -noappend -comp gzip -quiet -no-progress
    APPIMAGE=$OUT/Porthole-$VERSION-x86_64.AppImage
    cat "$PORTHOLE_APPIMAGE_RUNTIME" "$WORK/appdir.squashfs" >"$APPIMAGE"
    chmod 0755 "$APPIMAGE"
    say "built $APPIMAGE"
else
    say "no AppImage: no AppImage runtime is packaged in Debian, PyPI or npm (see packaging/README.md);" \
        "set PORTHOLE_APPIMAGE_RUNTIME=runtime-x86_64 to build one"
fi

say "PASS: packages in $OUT:"
ls -l "$OUT" | sed 1d

#!/usr/bin/env bash
# Renders assets/icons/porthole.svg into the hicolor PNG sizes the packages install
# (assets/icons/hicolor/NxN/apps/porthole.png). The PNGs are checked in; rerun this after changing the SVG.
# Needs rsvg-convert (Debian: librsvg2-bin).
set -euo pipefail
cd "$(dirname "$0")"
command -v rsvg-convert >/dev/null || { echo "render.sh: needs rsvg-convert (apt-get install librsvg2-bin)" >&2; exit 1; }
for n in 16 32 48 64 128 256 512; do
    mkdir -p "hicolor/${n}x${n}/apps"
    rsvg-convert --width "$n" --height "$n" --keep-aspect-ratio porthole.svg -o "hicolor/${n}x${n}/apps/porthole.png"
done
echo "render.sh: rendered $(ls hicolor | tr '\n' ' ')"

# Scenario: issue 16 on a real Linux guest. portholed runs in L1 with Debian's kernel and the L2 initramfs
# in its library; the harness creates a VM (qcow2 disk, hw.mode=snapshot) through the API and drives it:
# snapshots with and without the machine state, a write, a revert, suspend and resume. Runs until the
# harness ends L1.
. "${HW:=/hw}/scenarios/_lib.sh"
export XDG_DATA_HOME="$T/data" XDG_RUNTIME_DIR="$T/run" PORTHOLE_SEABIOS_DIR="$HW/share/seabios"
mkdir -p "$T/data/porthole/images" "$T/run"
cp "$G/vmlinuz" "$G/l2-initramfs.cpio.gz" "$T/data/porthole/images/"
forward "$API_PORT" "$T/run/portholed.sock"
echo "HW-START portholed"
portholed --socket "$T/run/portholed.sock" --vmm "$HW/bin/porthole-vmm"
echo "HW-EXIT portholed rc=$?"

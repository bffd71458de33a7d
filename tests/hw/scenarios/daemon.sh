# Scenario 4: portholed inside L1. The harness talks to its API through a forwarded port: it creates a VM
# from an ISO in the library, starts it and takes screenshots of the firmware's screen. Runs until the
# harness ends L1.
. "${HW:=/hw}/scenarios/_lib.sh"
export XDG_DATA_HOME="$T/data" XDG_RUNTIME_DIR="$T/run" PORTHOLE_SEABIOS_DIR="$HW/share/seabios"
mkdir -p "$T/data/porthole/images" "$T/run"
cp "$G/linux.iso" "$T/data/porthole/images/"
forward "$API_PORT" "$T/run/portholed.sock"
echo "HW-START portholed"
portholed --socket "$T/run/portholed.sock" --vmm "$HW/bin/porthole-vmm"
echo "HW-EXIT portholed rc=$?"

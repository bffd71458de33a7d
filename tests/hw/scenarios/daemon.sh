# Scenario 4: portholed inside L1. The harness talks to its API through a forwarded port: it creates a VM
# from an ISO in the library, starts it and takes screenshots of the firmware's screen.
. "${HW:=/hw}/scenarios/_lib.sh"
export XDG_DATA_HOME=/tmp/data XDG_RUNTIME_DIR=/tmp/run PORTHOLE_SEABIOS_DIR=$HW/share/seabios
mkdir -p /tmp/data/porthole/images /tmp/run
cp "$G/linux.iso" /tmp/data/porthole/images/
forward "$API_PORT" /tmp/run/portholed.sock
echo "HW-START portholed"
portholed --socket /tmp/run/portholed.sock --vmm "$HW/bin/porthole-vmm"
echo "HW-EXIT portholed rc=$?"

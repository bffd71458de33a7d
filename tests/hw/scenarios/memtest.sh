# Scenario 3 (--all): SeaBIOS -> memtest86+'s ISO; the harness reads its screen through the RFB console.
# Runs until the harness ends L1.
. "${HW:=/hw}/scenarios/_lib.sh"
run porthole-memtest porthole-vmm --name memtest --memory 256 --firmware "$HW/share/seabios/bios.bin" \
    --cdrom "$G/memtest86+x64.iso" --vnc "$VNC_LISTEN"

# Scenario 3 (--all): SeaBIOS -> ISOLINUX -> Debian's netboot installer from a virtio-scsi CD, on the VGA
# text console; the harness reads its first question through the RFB console. Runs until the harness ends L1.
. "${HW:=/hw}/scenarios/_lib.sh"
run porthole-installer porthole-vmm --name installer --memory 1536 --firmware "$HW/share/seabios/bios.bin" \
    --cdrom "$G/debian-installer.iso" --vnc "$VNC_LISTEN"

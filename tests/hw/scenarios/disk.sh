# Scenario 3 (--all): an installed Debian (tests/hw/make-debian-disk.sh) from virtio-blk: SeaBIOS -> GRUB
# -> Linux -> systemd -> getty on serial (this console) and on the VGA text console, which the harness reads
# through the RFB console. The disk is L1's /dev/vda (QEMU snapshot=on). Runs until the harness ends L1.
. "${HW:=/hw}/scenarios/_lib.sh"
DISK=${HW_DISK:-/dev/vda}
if [ ! -b "$DISK" ] && [ ! -f "$DISK" ]; then
    echo "HW-DISK-MISSING $DISK: $(ls /dev/vd* 2>&1)"
    exit 1
fi
echo "HW-DISK-DEVICE $DISK bytes=$(blockdev --getsize64 "$DISK" 2>/dev/null || wc -c <"$DISK")"
run porthole-disk porthole-vmm --name disk --memory 1024 --firmware "$HW/share/seabios/bios.bin" \
    --disk "$DISK" --boot disk --vnc "$VNC_LISTEN"

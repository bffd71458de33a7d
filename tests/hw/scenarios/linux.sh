# Scenario 2: Debian's kernel, direct boot (bzImage), on porthole-vmm: virtio-blk read/write/flush, the
# virtio-scsi CD, bochs-drm drawing on the RFB console, PS/2 keyboard and mouse from the RFB console, the
# virtio-input tablet and keyboard (--input virtio) once the guest loads their driver, the virtio-balloon
# shrinking and growing the guest, a second vCPU hot-added (--cpus 1 --max-cpus 2) and brought online,
# `reboot -f` to a second boot, ACPI power button to power-off.
. "${HW:=/hw}/scenarios/_lib.sh"
DISK=$T/l2-disk.img
dd if=/dev/urandom of=$DISK bs=1M count=8 2>/dev/null
echo "HW-DISK-MD5 $(dd if=$DISK bs=65536 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "HW-CD-MD5 $(md5sum <"$G/data.iso" | cut -d' ' -f1) bytes=$(stat -c %s "$G/data.iso")"
forward "$CTL_PORT" "$T/l2-control.sock"
run porthole-bzimage porthole-vmm --name linux --memory 512 --cpus 1 --max-cpus 2 --kernel "$G/vmlinuz" \
    --initrd "$G/l2-initramfs.cpio.gz" --cmdline "$L2_CMDLINE hw.mode=full" \
    --disk "$DISK" --cdrom "$G/data.iso" --vnc "$VNC_LISTEN" --control "unix:$T/l2-control.sock" --input virtio --balloon
echo "HW-DISK-AFTER $(dd if=$DISK bs=512 skip=8 count=1 2>/dev/null | head -c 22)"

# Scenario 3: firmware boot. SeaBIOS -> El Torito CD (virtio-scsi) -> GRUB -> Debian's kernel on
# porthole-vmm, and the same ISO under QEMU -M pc (same bios.bin, virtio-scsi CD) in the same L1.
. "${HW:=/hw}/scenarios/_lib.sh"
for round in $(seq "$ROUNDS"); do
    run porthole-firmware porthole-vmm --name grub --memory 512 --firmware "$HW/share/seabios/bios.bin" \
        --cdrom "$G/linux.iso" --vnc "$VNC_LISTEN"
    run qemu-pc-firmware qemu_peer -M pc -m 512 -bios "$HW/share/seabios/bios.bin" -vga std \
        -device virtio-scsi-pci,id=scsi -drive file="$G/linux.iso",if=none,id=cd,media=cdrom,readonly=on \
        -device scsi-cd,drive=cd,bus=scsi.0
done

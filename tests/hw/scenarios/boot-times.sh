# Scenario 2 (PVH) and the boot benchmark: Debian's kernel to /init, direct boot, on porthole-vmm (bzImage
# and the PVH vmlinux) and on QEMU inside the same L1 (-M microvm with PVH, -M pc with the bzImage).
. "${HW:=/hw}/scenarios/_lib.sh"
Q="$L2_CMDLINE hw.mode=quick"
I=$G/l2-initramfs.cpio.gz
for round in $(seq "$ROUNDS"); do
    run porthole-pvh porthole-vmm --name pvh --memory 512 --kernel "$G/vmlinux" --initrd "$I" --cmdline "$Q"
    run qemu-microvm qemu_peer -M microvm -m 512 -kernel "$G/vmlinux" -initrd "$I" -append "$Q"
    run porthole-bzimage porthole-vmm --name bzimage --memory 512 --kernel "$G/vmlinuz" --initrd "$I" --cmdline "$Q"
    run qemu-pc qemu_peer -M pc -m 512 -kernel "$G/vmlinuz" -initrd "$I" -append "$Q"
done

# Scenario: Debian's kernel on porthole-vmm with the virtio display (--vga virtio): Linux's virtio-gpu binds to
# the virtio-vga function, the connector's preferred mode is the console's size (the EDID and display info),
# its fbdev draws on the RFB console, and an RFB client's SetDesktopSize reaches the guest as a new
# preferred mode.
. "${HW:=/hw}/scenarios/_lib.sh"
run porthole-gpu porthole-vmm --name gpu --memory 384 --cpus 1 --kernel "$G/vmlinuz" \
    --initrd "$G/l2-initramfs.cpio.gz" --cmdline "$L2_CMDLINE hw.mode=gpu" --vnc "$VNC_LISTEN" --vga virtio

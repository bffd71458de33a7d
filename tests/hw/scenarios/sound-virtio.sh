# Scenario: Debian's backports kernel (6.12: snd_virtio, which 6.1 lacks) on porthole-vmm with the virtio-sound
# card (--sound virtio): virtio_snd binds the card, and a program of the guest's (tests/hw/tone.c) plays a 480 Hz
# tone through ALSA, which an RFB client of QEMU's audio extension hears (l2-init.sh, hw.mode=sound).
. "${HW:=/hw}/scenarios/_lib.sh"
run porthole-sound porthole-vmm --name sound --memory 256 --cpus 1 --kernel "$G/vmlinuz-backports" \
    --initrd "$G/l2-initramfs-backports.cpio.gz" --cmdline "$L2_CMDLINE hw.mode=sound" --vnc "$VNC_LISTEN" \
    --sound virtio

# Scenario: Debian's kernel on porthole-vmm with the Intel HD Audio card (--sound hda): snd_hda_intel binds the
# ICH9 controller, the generic codec driver its line-out codec, and a program of the guest's (tests/hw/tone.c)
# plays a 480 Hz tone through ALSA, which an RFB client of QEMU's audio extension hears (l2-init.sh,
# hw.mode=sound).
. "${HW:=/hw}/scenarios/_lib.sh"
run porthole-sound porthole-vmm --name sound --memory 256 --cpus 1 --kernel "$G/vmlinuz" \
    --initrd "$G/l2-initramfs.cpio.gz" --cmdline "$L2_CMDLINE hw.mode=sound" --vnc "$VNC_LISTEN" --sound hda

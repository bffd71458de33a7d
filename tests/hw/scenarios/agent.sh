# Scenario: Debian's kernel on porthole-vmm with the guest agent's port (--agent spice): Linux's
# virtio_console adds the port named com.redhat.spice.0, and a shell playing spice-vdagent on it copies
# text that reaches the RFB client and pastes text the client sends (l2-init.sh, hw.mode=agent).
. "${HW:=/hw}/scenarios/_lib.sh"
run porthole-agent porthole-vmm --name agent --memory 256 --cpus 1 --kernel "$G/vmlinuz" \
    --initrd "$G/l2-initramfs.cpio.gz" --cmdline "$L2_CMDLINE hw.mode=agent" --vnc "$VNC_LISTEN" --agent spice

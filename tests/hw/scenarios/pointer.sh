# Scenario: pointer latency on a real guest, porthole-vmm against QEMU in the same L1: Debian's kernel with the
# virtio-input tablet (porthole-vmm --input virtio; QEMU's virtio-tablet-pci), tests/hw/evlat.c reporting each
# pointer move it reads from the tablet's evdev device on the serial console (l2-init.sh hw.mode=evlat); the
# harness moves the pointer over RFB (porthole-vmm's console, QEMU's VNC server) and times each move to its
# line (QEMU without its VMware mouse port, whose absolute pointer would take the moves). Both engines'
# lines take the same way out (L2's serial → the engine's stdout → L1's console).
. "${HW:=/hw}/scenarios/_lib.sh"
I=$G/l2-initramfs.cpio.gz
# QEMU's -vnc takes HOST:DISPLAY (port 5900 + DISPLAY).
ADDR=${VNC_LISTEN#tcp:}
QEMU_VNC=${ADDR%:*}:$((${ADDR##*:} - 5900))
C="$L2_CMDLINE hw.mode=evlat hw.moves=${HW_MOVES:-120}"
run porthole-pointer porthole-vmm --name pointer --memory 256 --cpus 1 --kernel "$G/vmlinuz" --initrd "$I" \
    --cmdline "$C" --vnc "$VNC_LISTEN" --input virtio
run qemu-pointer qemu_peer -M pc,vmport=off -m 256 -kernel "$G/vmlinuz" -initrd "$I" -append "$C" -vga std \
    -device virtio-tablet-pci -vnc "$QEMU_VNC"

# Issue 16: guest-driven disk I/O of a real Linux guest (virtio-blk, O_DIRECT: tests/hw/blkbench.c run by
# l2-init.sh hw.mode=blkbench) on porthole-vmm and on QEMU, each on a raw image and on a qcow2 one (a fresh
# copy of the empty bench.qcow2 that qemu-img made; cache=writeback for QEMU, as porthole-vmm writes
# through the page cache too). The harness compares the guest's timings: porthole qcow2 / QEMU qcow2 and
# porthole qcow2 / porthole raw. Each run also proves the bytes: the bench reads back and compares what it
# wrote (verify=ok), and the file size after a porthole run shows what the image allocated.
. "${HW:=/hw}/scenarios/_lib.sh"
MIB=64
L2_ARGS="$L2_CMDLINE hw.mode=blkbench hw.mib=$MIB"

# fresh FORMAT: a new image in L1's tmpfs, its path on stdout.
fresh() {
    rm -f "$T/bench.raw" "$T/bench.qcow2"
    case $1 in
        raw) dd if=/dev/zero of="$T/bench.raw" bs=1M count=0 seek=256 2>/dev/null && echo "$T/bench.raw" ;;
        qcow2) cp "$G/bench.qcow2" "$T/bench.qcow2" && echo "$T/bench.qcow2" ;;
    esac
}

# The order of DISK_IO_RUNS in tests/tests/hw.rs.
for round in 1 2 3; do
    for format in raw qcow2; do
        img=$(fresh $format)
        run "porthole-$format" porthole-vmm --name bench --memory 256 --kernel "$G/vmlinuz" \
            --initrd "$G/l2-initramfs.cpio.gz" --cmdline "$L2_ARGS" --disk "$img,format=$format" \
            --counters-file "$T/counters.json"
        echo "HW-DISKIO-FILE porthole-$format allocated=$(du -k "$img" | cut -f1)KiB"
        # The engine's own view of its slowest request: the image transfer, and the wait for an I/O thread.
        echo "HW-DISKIO-ENGINE porthole-$format $(tr -d ' \n' <"$T/counters.json" |
            grep -o '"disk_slowest_[a-z_]*":[0-9]*' | tr -d '"' | tr ':\n' '= ')"
        img=$(fresh $format)
        run "qemu-$format" qemu_peer -M pc -m 256 -kernel "$G/vmlinuz" -initrd "$G/l2-initramfs.cpio.gz" \
            -append "$L2_ARGS" -drive "file=$img,format=$format,if=none,id=d0,cache=writeback" \
            -device virtio-blk-pci,drive=d0,romfile=
    done
done
echo "HW-DISKIO-DONE"

# Experiment (issue 14): an L2 guest's serial console written to a file in L1 (--serial file:PATH) and
# read by a shell loop in L1 while L2 runs. Each line the loop finds is echoed with its age so the harness
# can tell whether the file or the loop lagged.
. "${HW:=/hw}/scenarios/_lib.sh"
LOG=$T/l2-serial.log
: >"$LOG"
(
    seen=0
    while :; do
        n=$(wc -l <"$LOG")
        if [ "$n" -gt "$seen" ]; then
            sed -n "$((seen + 1)),${n}p" "$LOG" | while read -r l; do echo "HW-POLLED $(date +%s) $l"; done
            seen=$n
        fi
        echo "HW-TICK $(date +%s) lines=$n"
        sleep 1
    done
) &
POLLER=$!
run porthole-file porthole-vmm --name file --memory 512 --kernel "$G/vmlinuz" --initrd "$G/l2-initramfs.cpio.gz" \
    --cmdline "$L2_CMDLINE hw.mode=quick" --serial "file:$LOG"
sleep 2
kill $POLLER
echo "HW-FILE-END $(date +%s) $(wc -l <"$LOG") lines: $(tr '\n' '|' <"$LOG" | head -c 300)"

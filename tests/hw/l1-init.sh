#!/bin/busybox sh
# /init of the hardware tier's L1 (tests/hw/build.sh): a Debian kernel under QEMU TCG with -cpu max, so
# AMD SVM with nested paging is emulated and kvm-amd gives a real /dev/kvm. Loads the modules, brings up
# the user-mode network (QEMU forwards host ports to it), runs the scenario the kernel command line
# names (hw.scenario=NAME -> /hw/scenarios/NAME.sh) and powers off.
#
# Everything the scenario and its L2 guest print goes to this console (ttyS0), which the harness reads:
# nothing in L1 polls a file for output, so nothing here can starve while L2 runs.
export PATH=/hw/bin:/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/hw/lib
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=75% tmpfs /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }

while read -r m; do
    out=$(insmod "/lib/modules/$m" 2>&1) || echo "HW-L1-INSMOD-FAILED $m: $out"
done </lib/modules/load-order

if [ -c /dev/kvm ] && grep -qw svm /proc/cpuinfo; then
    echo "HW-L1-KVM ok npt=$(grep -qw npt /proc/cpuinfo && echo yes || echo no) features:$(for f in xsave avx avx2 x2apic; do grep -qw $f /proc/cpuinfo && printf ' %s' $f; done)"
else
    echo "HW-L1-KVM missing: $(ls -l /dev/kvm 2>&1); flags: $(grep -m1 -o 'svm\|vmx' /proc/cpuinfo)"
fi

hostname porthole-l1
ip link set lo up
ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2

SCENARIO=$(arg hw.scenario)
# Rounds of the benchmark scenarios (boot-times, firmware): PORTHOLE_HW_ROUNDS on the harness side.
HW_ROUNDS=$(arg hw.rounds)
export HW_ROUNDS
echo "HW-L1-UP scenario=$SCENARIO cpus=$(grep -c ^processor /proc/cpuinfo) mem=$(awk '/MemTotal/ {print $2}' /proc/meminfo)kB"
# The scenario runs in a bind mount of this root moved on top of it (as switch_root does): passt (the
# engine's user-mode network) isolates itself with pivot_root(2), which refuses a caller whose root is
# the initramfs itself (rootfs has no parent mount), and with a user namespace, which the kernel refuses
# to a chrooted caller; the moved mount is the namespace's root as seen from above, so neither applies.
# /proc, /sys, /dev and /tmp come along (rbind).
mkdir -p /l1root
if [ -f "/hw/scenarios/$SCENARIO.sh" ] && mount -o rbind / /l1root && cd /l1root && mount --move /l1root /; then
    chroot . sh -c 'cd /tmp && exec sh "/hw/scenarios/$0.sh"' "$SCENARIO"
    echo "HW-L1-END rc=$?"
elif [ -f "/hw/scenarios/$SCENARIO.sh" ]; then
    echo "HW-L1-END cannot bind-mount the root for the scenario"
else
    echo "HW-L1-END no scenario '$SCENARIO'"
fi
sync
poweroff -f
sleep 5

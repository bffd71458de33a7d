# Issue 15: the network of a real Linux guest through virtio-net and passt (the user-mode back end), and
# TCP throughput guest <-> host against QEMU with the same passt. L1 plays the host: a DNS server
# (dnsmasq) and an HTTP server (busybox httpd) on its loopback, which passt maps to the guest's gateway
# address; the L2 guest (l2-init.sh hw.mode=net) takes a DHCP lease, resolves porthole.test, downloads
# an 8 MiB and a 64 MiB file (host -> guest) and serves the 64 MiB one back on a forwarded port, which L1
# fetches (guest -> host). Each engine runs at MTU 1500 and at a jumbo MTU. The harness checks the
# guest's lines against HW-NET-* lines printed here and times both directions from its console.
#
# Direct mode (PORTHOLE_HW=direct, on a real host): the scenario moves into its own network and mount
# namespaces (and a user namespace when not root) first, with a veth pair standing for L1's network, so
# that its DNS server, ports and resolv.conf are its own and the host's stay untouched.
. "${HW:=/hw}/scenarios/_lib.sh"
if [ "$HW" != /hw ] && [ -z "$HW_NET_PRIVATE" ]; then
    export HW_NET_PRIVATE=1
    if [ "$(id -u)" = 0 ]; then
        exec unshare --net --mount sh "$0"
    fi
    exec unshare --user --map-root-user --net --mount sh "$0"
fi
if [ -n "$HW_NET_PRIVATE" ]; then
    ip link set lo up
    # A link for passt to mirror: a veth pair (whatever the kernel has: dummy, TAP).
    { ip link add hwnet0 type veth peer name hwnet1 && ip link set hwnet1 up; } ||
        ip link add hwnet0 type dummy || ip tuntap add dev hwnet0 mode tap
    ip link set hwnet0 up && ip addr add 10.0.2.15/24 dev hwnet0 && ip route add default via 10.0.2.2 dev hwnet0 ||
        echo "HW-NET-DIRECT cannot make the private network"
    : >"$T/resolv.conf"
    mount --bind "$T/resolv.conf" /etc/resolv.conf || echo "HW-NET-DIRECT cannot bind-mount /etc/resolv.conf"
fi
HTTP_PORT=8080       # L1's loopback: the files (the guest's gateway address:8080)
FWD_HTTP=8081        # -> the guest's httpd, port 80
FWD_BYE=8082         # -> the guest's `nc -l -p 81`, which ends its run
READY_PORT=8083      # L1's loopback: the guest connects when it serves the file back
L2_MEM=768
MTUS="1500 9000"
ENGINES="porthole qemu"

# passt mirrors the interface of the default route.
L1_DEV=$(ip -4 route show default | awk '{print $5; exit}')
L1_GW=$(ip -4 route show default | awk '{print $3; exit}')
L1_IP=$(ip -4 -o addr show dev "$L1_DEV" scope global | awk '{print $4; exit}' | cut -d/ -f1)
echo "HW-NET-L1 ip=${L1_IP:-none} gw=${L1_GW:-none} passt=$(command -v passt || echo missing)"

# The files, served on L1's loopback only.
WWW=$T/www
mkdir -p "$WWW"
dd if=/dev/urandom of="$WWW/small.bin" bs=1M count=8 2>/dev/null
dd if=/dev/urandom of="$WWW/big.bin" bs=1M count=64 2>/dev/null
echo "HW-NET-FILES small=$(md5sum <"$WWW/small.bin" | cut -d' ' -f1) big=$(md5sum <"$WWW/big.bin" | cut -d' ' -f1)"
busybox httpd -p "127.0.0.1:$HTTP_PORT" -h "$WWW"

# DNS on L1's loopback. passt reads the host's resolv.conf: a loopback resolver is handed to the guest
# as the gateway address, whose port 53 passt maps back to this loopback.
DNS_ADDR=192.0.2.77
"$(command -v dnsmasq || echo /usr/sbin/dnsmasq)" --conf-file=/dev/null --keep-in-foreground --no-resolv --no-hosts --listen-address=127.0.0.1 \
    --bind-interfaces --user=root --group=root --pid-file="$T/dnsmasq.pid" \
    --address=/porthole.test/$DNS_ADDR >"$T/dnsmasq.log" 2>&1 &
DNS_PID=$!
echo "nameserver 127.0.0.1" >/etc/resolv.conf
echo "HW-NET-DNS name=porthole.test addr=$DNS_ADDR server=127.0.0.1"

L2_ARGS="$L2_CMDLINE hw.mode=net"

STALL_S=90

# stall_report LABEL [CONTROL]: the engine's NIC counters twice (do frames still move?), every passt's and
# engine thread's state, and L1's TCP sockets with their queues.
stall_report() {
    for i in 1 2; do
        [ -n "$2" ] && echo "HW-NET-STALL-NICS $1 $(echo '{"cmd":"nics"}' | socat -t 5 - "UNIX-CONNECT:$2")"
        sleep 3
    done
    for p in /proc/[0-9]*; do
        comm=$(cat "$p/comm" 2>/dev/null)
        case "$comm" in passt*|porthole-vmm|qemu-system*) ;; *) continue ;; esac
        for t in "$p"/task/*; do
            echo "HW-NET-STALL-TASK $1 ${p#/proc/}/${t##*/} $(cat "$t/comm" 2>/dev/null)" \
                "$(awk '/^State/ {print $2}' "$t/status" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null)"
        done
    done
    awk 'NR > 1 {print "HW-NET-STALL-TCP " $2, $3, "st=" $4, "queues=" $5}' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# guest_side LABEL PID [CONTROL]: while the engine (PID) runs: wait for the guest to say (a connection to L1's
# READY_PORT) that its httpd serves the 64 MiB file behind the forwarded port, fetch it back (guest ->
# host, timed by the harness from BEGIN to END), ask the engine's CONTROL socket (if any) for its NICs,
# then say bye, which ends the guest.
guest_side() {
    label=$1 vmm=$2
    rm -f "$T/ready"
    socat -u "TCP-LISTEN:$READY_PORT,bind=127.0.0.1,reuseaddr" "OPEN:$T/ready,creat" &
    ready=$!
    while kill -0 $ready 2>/dev/null; do
        kill -0 "$vmm" 2>/dev/null || { kill $ready; echo "HW-NET-G2H $label engine-exited"; return 1; }
        sleep 2
    done
    echo "HW-NET-G2H-BEGIN $label"
    busybox wget -q -O "$T/g2h.bin" "http://127.0.0.1:$FWD_HTTP/big.bin" &
    wget_pid=$!
    # A transfer that makes no progress for STALL_S seconds is reported with what the engine, passt and
    # L1's sockets say at that moment, and ended (the harness then sees a short file).
    last=-1 still=0
    while kill -0 $wget_pid 2>/dev/null; do
        sleep 5
        now=$(wc -c <"$T/g2h.bin" 2>/dev/null || echo 0)
        if [ "$now" = "$last" ]; then still=$((still + 5)); else still=0 last=$now; fi
        if [ $still -ge $STALL_S ]; then
            echo "HW-NET-G2H-STALL $label bytes=$now still=${still}s"
            stall_report "$label" "$3"
            kill $wget_pid 2>/dev/null
            break
        fi
    done
    wait $wget_pid
    echo "HW-NET-G2H-END $label rc=$?"
    echo "HW-NET-G2H $label md5=$(md5sum <"$T/g2h.bin" | cut -d' ' -f1) bytes=$(wc -c <"$T/g2h.bin")"
    rm -f "$T/g2h.bin"
    # The engine's view of the card while the guest still runs (porthole-vmm: its control socket).
    [ -n "$3" ] && echo "HW-NET-NICS $label $(echo '{"cmd":"nics"}' | socat -t 5 - "UNIX-CONNECT:$3")"
    echo bye | socat -u - "TCP:127.0.0.1:$FWD_BYE"
}

# porthole_net MTU: the guest on porthole-vmm with a user-mode NIC (the engine starts passt); L1 asks
# its control socket for the NIC's status after the transfers, before the guest powers off.
porthole_net() {
    mtu=$1 label=porthole-$1
    ctl=$T/net-control.sock
    rm -f "$ctl"
    echo "HW-START $label"
    porthole-vmm --name net --memory $L2_MEM --kernel "$G/vmlinuz" --initrd "$G/l2-initramfs.cpio.gz" \
        --cmdline "$L2_ARGS" --control "unix:$ctl" \
        --net "user,mtu=$mtu,fwd=tcp:$FWD_HTTP-80,fwd=tcp:$FWD_BYE-81" &
    pid=$!
    guest_side "$label" $pid "$ctl"
    wait $pid
    echo "HW-EXIT $label rc=$?"
}

# qemu_net MTU: the same guest on QEMU (virtio-net-pci) with passt started here with the options the
# engine gives it (vmm-core/src/net.rs: --foreground --quiet --stderr --one-off, the MTU, the forwards),
# over QEMU's stream netdev instead of the engine's socket pair.
qemu_net() {
    mtu=$1 label=qemu-$1
    sock=$T/passt.sock
    rm -f "$sock"
    passt -f -q -e -1 -s "$sock" --mtu "$mtu" -t "127.0.0.1/$FWD_HTTP:80" -t "127.0.0.1/$FWD_BYE:81" &
    passt_pid=$!
    i=0
    while [ ! -S "$sock" ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
    echo "HW-START $label"
    # qemu_peer's options, run without the function so that $! is QEMU itself.
    qemu-system-x86_64 -L "$HW/share/qemu" -enable-kvm -cpu host -nodefaults -no-reboot -display none \
        -serial stdio -monitor none -M pc -m $L2_MEM -kernel "$G/vmlinuz" -initrd "$G/l2-initramfs.cpio.gz" \
        -append "$L2_ARGS" -device virtio-net-pci,netdev=n0,romfile= \
        -netdev "stream,id=n0,server=off,addr.type=unix,addr.path=$sock" &
    pid=$!
    guest_side "$label" $pid
    wait $pid
    echo "HW-EXIT $label rc=$?"
    # passt -1 ends with its client; if it is still there, it is stuck.
    kill $passt_pid 2>/dev/null && echo "HW-NET-PASST $label was still running"
    wait $passt_pid 2>/dev/null
}

for mtu in $MTUS; do
    for engine in $ENGINES; do
        "${engine}_net" "$mtu"
    done
done
kill $DNS_PID 2>/dev/null

#!/bin/busybox sh
# udhcpc's event script in the hardware tier's L2 guest (/etc/udhcpc/default.script; tests/hw/build.sh).
# busybox udhcpc runs it with the event as $1 and the lease in the environment: ip, mask, router, dns,
# mtu (when the server sent option 26; l2-init.sh asks for it with -O mtu), interface. It configures the
# interface from the lease and keeps the lease in /run/dhcp.env for l2-init.sh to report.
case $1 in
    deconfig)
        ip link set "$interface" up
        ip -4 addr flush dev "$interface"
        ;;
    bound | renew)
        [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do
            ip route replace default via "$r" dev "$interface"
            break
        done
        : >/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        {
            echo "DHCP_IP=$ip"
            echo "DHCP_MASK=$mask"
            echo "DHCP_ROUTER=${router%% *}"
            echo "DHCP_DNS='$dns'"
            echo "DHCP_MTU=$mtu"
        } >/run/dhcp.env
        ;;
esac
exit 0

#!/bin/busybox sh
# /init of the hardware tier's L2 Linux guest (Debian's kernel + busybox; tests/hw/build.sh). It proves
# what Linux's own drivers do with Porthole's devices and says so on the serial console (ttyS0), one
# `PORTHOLE-...` line per fact, for the harness (tests/tests/hw.rs) to check:
#
#   hw.mode=quick   PORTHOLE-L2-INIT, then power off (boot timing; ISO and PVH boots)
#   hw.mode=full    first boot: virtio-blk read (md5) and write + flush, the virtio-scsi CD (md5 of
#                   /dev/sr0), a square drawn into /dev/fb0 through bochs-drm, a line typed on the PS/2
#                   keyboard, PS/2 mouse packets, then the virtio-input tablet's events once its driver is
#                   loaded (the pointer leaves the PS/2 mouse), the virtio-input keyboard's key events (the
#                   keys leave the PS/2 keyboard) and its Caps Lock LED set, the virtio-balloon (its MemTotal on
#                   request while the harness moves the target), a vCPU hot-added by the harness brought online,
#                   then `reboot -f`; second boot (seen on the disk, both vCPUs online from the start): waits
#                   for the ACPI power button and powers off.
#   hw.mode=gpu     virtio-gpu (porthole-vmm --vga virtio): loads virtio-gpu, says which driver bound the
#                   display and the connector's preferred mode (PORTHOLE-GPU), draws the square of
#                   hw.mode=full into /dev/fb0 (virtio-gpu's fbdev emulation flushes it to the host), then
#                   waits for the monitor to change (an RFB SetDesktopSize from the harness) and says the
#                   connector's new preferred mode (PORTHOLE-GPU-RESIZED), then powers off.
#   hw.mode=agent   the guest agent's port (porthole-vmm --agent spice): finds the virtio-serial port named
#                   com.redhat.spice.0 (Linux's virtio_console; no udev here, so by its sysfs name) and says
#                   which driver bound it (PORTHOLE-AGENT), then plays spice-vdagent on it with printf and dd:
#                   reads the host's capabilities, announces its own, grabs the clipboard, answers the host's
#                   request with "hello-from-linux" (PORTHOLE-AGENT-COPIED), then waits for the host's grab
#                   (text an RFB client sent), requests the text and says it (PORTHOLE-AGENT-PASTED).
#   hw.mode=evlat   the pointer-latency probe: loads virtio_input and runs tests/hw/evlat.c, which says EVLAT-READY
#                   and then one `EVLAT x= y=` line per pointer report of the tablet (hw.moves of them)
#   hw.mode=sound   Intel HD Audio (porthole-vmm --sound hda) or virtio-sound (--sound virtio, on the backports
#                   kernel): loads the sound modules (snd-hda-intel and the generic codec driver, or
#                   virtio_snd), says which driver bound the card and what it is (PORTHOLE-SOUND), says PORTHOLE-SOUND-READY and waits (at most 60 s) for a line typed on the
#                   console (the harness's RFB client, its audio enabled, types "play"), then plays a 480 Hz tone
#                   for 3 s through ALSA (tests/hw/tone.c: the mixer's Master to 0 dB and unmuted, then the PCM
#                   device's ioctls, no alsa-lib) and says its `TONE ...` lines and the DAC's amp (PORTHOLE-SOUND-DONE),
#                   then powers off.
#   hw.mode=blkbench  guest-driven block I/O on /dev/vda (tests/hw/blkbench.c: sequential and random, O_DIRECT,
#                   timed by the guest) over its first hw.mib MiB, one PORTHOLE-BLKBENCH line, then power off
#                   (tests/hw/scenarios/disk-io.sh runs it on raw and qcow2, porthole-vmm and QEMU).
#   hw.mode=net     the network through virtio-net (tests/hw/scenarios/net.sh, which serves the other
#                   ends in L1): which driver bound eth0, the DHCP lease (udhcpc, l2-udhcpc.sh) and the
#                   MTU, a DNS name, an 8 MiB HTTP download and a 64 MiB one from L1's loopback through
#                   the gateway address; then it serves the 64 MiB file back on port 80 (busybox httpd),
#                   tells L1 so (a connection to its port 8083) and waits for L1's "bye" on port 81 (80 and
#                   81 are forwarded from L1 ports) before powering off.
#   hw.mode=snapshot  issue 16 on a real guest (tests/hw/scenarios/snapshot.sh, portholed in L1): formats its
#                   disk (ext2), writes file A, starts a counter printing `PORTHOLE-COUNT n` every second,
#                   then obeys commands typed on its serial console: `write-b` (writes file B, appends
#                   to A), `check` (md5s of A and B read from the disk after dropping the caches, whether
#                   the counter lives, its value, the uptime), `size` (the disk's size in sectors as the
#                   kernel has it now, /sys/block/vda/size: a disk grown live shows without a reboot).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }
say() { echo "$*"; }
off() { sync; poweroff -f; sleep 5; }
MODE=$(arg hw.mode)

if [ "$MODE" = quick ]; then
    say "PORTHOLE-L2-INIT mode=quick kernel=$(uname -r)"
    off
fi

# virtio_input waits: the full mode loads it after the PS/2 mouse test (the pointer moves to the tablet then).
# The sound modules are for hw.mode=sound only.
is_sound() { case $1 in snd*.ko* | soundcore.ko* | ledtrig-audio.ko* | virtio_snd.ko*) return 0 ;; esac; return 1; }
while read -r m; do
    case $m in virtio_input.ko* | virtio-gpu.ko*) continue ;; esac
    is_sound "$m" && continue
    out=$(insmod "/lib/modules/$m" 2>&1) || say "PORTHOLE-INSMOD-FAILED $m: $out"
done </lib/modules/load-order

# wait_for PATH: devices appear asynchronously after their driver loads (at most ~60 s).
wait_for() {
    i=0
    while [ ! -e "$1" ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
    [ -e "$1" ]
}

# event_device NAME: the evdev node (/dev/input/eventN) of the input device named NAME, once it is there
# (at most ~60 s); empty if it never comes.
event_device() {
    i=0
    while [ $i -lt 300 ]; do
        for d in /sys/class/input/input*; do
            [ "$(cat "$d/name" 2>/dev/null)" = "$1" ] || continue
            for e in "$d"/event*; do [ -e "$e" ] && { echo "/dev/input/$(basename "$e")"; return; }; done
        done
        sleep 0.2
        i=$((i + 1))
    done
}

# The square of hw.mode=full: orange (ff8040) 64x64 at (64,64) in /dev/fb0, fbcon unbound so that text
# cannot cover it.
draw_square() {
    for v in /sys/class/vtconsole/vtcon*; do
        grep -q 'frame buffer' "$v/name" 2>/dev/null && echo 0 >"$v/bind"
    done
    FB=/sys/class/graphics/fb0
    STRIDE=$(cat $FB/stride)
    BPP=$(cat $FB/bits_per_pixel)
    # XRGB8888 little endian: B=0x40 G=0x80 R=0xff X=0xff (no NUL byte for printf to trip on).
    PIXEL='\100\200\377\377'
    ROW=""
    i=0
    while [ $i -lt 64 ]; do ROW="$ROW$PIXEL"; i=$((i + 1)); done
    y=64
    while [ $y -lt 128 ]; do
        printf "$ROW" | dd of=/dev/fb0 bs=256 seek=$(((y * STRIDE + 256) / 256)) count=1 conv=notrunc 2>/dev/null
        y=$((y + 1))
    done
    say "PORTHOLE-FB-DRAWN name=$(cat $FB/name | tr ' ' _) mode=$(cat $FB/virtual_size) bpp=$BPP stride=$STRIDE x=64 y=64 w=64 h=64 rgb=ff8040"
}

if [ "$MODE" = gpu ]; then
    say "PORTHOLE-L2-INIT mode=gpu kernel=$(uname -r)"
    gpu=$(grep -m1 '^virtio-gpu.ko' /lib/modules/load-order)
    out=$(insmod "/lib/modules/$gpu" 2>&1) || say "PORTHOLE-INSMOD-FAILED $gpu: $out"
    CONN=/sys/class/drm/card0-Virtual-1
    if wait_for $CONN/modes && wait_for /dev/fb0; then
        # card0's device is the PCI function (bound to virtio-pci); the DRM driver sits on its virtio device.
        driver=$(basename "$(readlink /sys/class/drm/card0/device/virtio*/driver)")
        first=$(head -n1 $CONN/modes)
        say "PORTHOLE-GPU driver=$driver status=$(cat $CONN/status) modes=$first count=$(wc -l <$CONN/modes)"
        draw_square
        # The harness asks for another size; the driver hears of it (a display-change event), asks again and
        # lists the new preferred mode first.
        i=0
        while [ "$(head -n1 $CONN/modes)" = "$first" ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i + 1)); done
        say "PORTHOLE-GPU-RESIZED modes=$(head -n1 $CONN/modes) after=$((i / 5))s"
        # The harness reads the server's answer to its SetDesktopSize: the VM stays a moment.
        sleep 10
    else
        say "PORTHOLE-FAIL no virtio-gpu connector or /dev/fb0 ($(ls /sys/class/drm 2>&1 | tr '\n' ' '))"
    fi
    off
fi

if [ "$MODE" = agent ]; then
    say "PORTHOLE-L2-INIT mode=agent kernel=$(uname -r)"
    port=""
    i=0
    while [ -z "$port" ] && [ $i -lt 300 ]; do
        for p in /sys/class/virtio-ports/vport*; do
            [ "$(cat "$p/name" 2>/dev/null)" = com.redhat.spice.0 ] && port=/dev/$(basename "$p")
        done
        [ -n "$port" ] || { sleep 0.2; i=$((i + 1)); }
    done
    if [ -z "$port" ] || ! wait_for "$port"; then
        say "PORTHOLE-FAIL no com.redhat.spice.0 port ($(ls /sys/class/virtio-ports 2>&1 | tr '\n' ' '))"
        off
    fi
    driver=$(basename "$(readlink "/sys/class/virtio-ports/$(basename "$port")/device/driver")")
    say "PORTHOLE-AGENT port=$port name=com.redhat.spice.0 driver=$driver"
    # The agent protocol: a chunk (port 1, size) holding a message (protocol 1, type, opaque 0, size, data).
    # send TYPE LEN DATA: one message whose LEN (< 236) bytes of data are DATA (printf escapes).
    send() {
        printf "\001\000\000\000\\$(printf %03o $((20 + $2)))\000\000\000\001\000\000\000\\$(printf %03o "$1")\000\000\000\000\000\000\000\000\000\000\000\\$(printf %03o "$2")\000\000\000$3" >&3
    }
    # recv N: the next N bytes from the host, as decimal bytes on one line.
    recv() { dd bs=1 count="$1" <&3 2>/dev/null | od -An -tu1 -v | tr -s ' \n' ' '; }
    # type_of BYTES: a message's type (byte 12 of its chunk).
    type_of() { set -- $1; echo "${13}"; }
    UTF8='\001\000\000\000'
    exec 3<>"$port"
    hello=$(recv 36)
    send 6 8 '\000\000\000\000\042\000\000\000'
    send 7 4 "$UTF8"
    asked=$(recv 32)
    send 4 20 "${UTF8}hello-from-linux"
    say "PORTHOLE-AGENT-COPIED host-hello=$(type_of "$hello") host-asked=$(type_of "$asked")"
    grab=$(recv 32)
    send 8 4 "$UTF8"
    # The harness sends "from-the-harness": the chunk (8), the message header (20), the type (4), 16 bytes.
    text=$(dd bs=1 count=48 <&3 2>/dev/null | dd bs=1 skip=32 2>/dev/null)
    say "PORTHOLE-AGENT-PASTED host-grab=$(type_of "$grab") text=$text"
    exec 3>&-
    off
fi

if [ "$MODE" = sound ]; then
    say "PORTHOLE-L2-INIT mode=sound kernel=$(uname -r)"
    while read -r m; do
        is_sound "$m" || continue
        out=$(insmod "/lib/modules/$m" 2>&1) || say "PORTHOLE-INSMOD-FAILED $m: $out"
    done </lib/modules/load-order
    PCM=/dev/snd/pcmC0D0p
    # devtmpfs makes the nodes; without it, from the sysfs major:minor.
    i=0
    while [ ! -e /sys/class/sound/pcmC0D0p/dev ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i + 1)); done
    if [ -e /sys/class/sound/pcmC0D0p/dev ] && [ ! -e $PCM ]; then
        mkdir -p /dev/snd
        for d in /sys/class/sound/*/dev; do
            n=$(basename "$(dirname "$d")")
            [ -e "/dev/snd/$n" ] || mknod "/dev/snd/$n" c "$(cut -d: -f1 "$d")" "$(cut -d: -f2 "$d")"
        done
    fi
    if ! wait_for $PCM; then
        say "PORTHOLE-FAIL no $PCM after $((i / 5)) s: $(ls /sys/class/sound 2>&1 | tr '\n' ' ') dmesg: $(dmesg | grep -iE 'snd|hda|sound' | tail -n 8 | tr '\n' '|')"
        off
    fi
    CODEC=/proc/asound/card0/codec#0
    ctl=$(ls -d /sys/bus/pci/drivers/snd_hda_intel/0000:* 2>/dev/null | head -n1)
    if [ -n "$ctl" ]; then
        # HD Audio: the codec driver binds a moment after the card appears; its proc file names the codec
        # and its nodes.
        wait_for $CODEC
        codec_driver=$(basename "$(readlink /sys/bus/hdaudio/devices/hdaudioC0D0/driver 2>/dev/null)")
        codec=$(sed -n 's/^Codec: //p' $CODEC | tr ' ' _)
        nodes=$(sed -n 's/^Node \(0x[0-9a-f]*\) \[\([A-Za-z ]*\)\].*/\1:\2/p' $CODEC | tr ' ' _ | tr '\n' ,)
        pci=$(basename "$ctl")
    else
        # virtio-sound: the virtio device (vendor 0x1af4, device 0x0019) under its PCI function.
        ctl=$(ls -d /sys/bus/virtio/drivers/virtio_snd/virtio* 2>/dev/null | head -n1)
        pci=$(basename "$(readlink -f "$ctl/..")")
        codec_driver=none codec=none nodes=none
    fi
    say "PORTHOLE-SOUND driver=$(basename "$(readlink "$ctl/driver" 2>/dev/null)") pci=$pci id=$(cat "$ctl/vendor" 2>/dev/null):$(cat "$ctl/device" 2>/dev/null) codec-driver=$codec_driver codec=$codec nodes=$nodes card=$(head -n1 /proc/asound/cards | sed 's/^ *//' | tr -s ' ' _)"
    # The whole codec dump (amps, pin controls, connections), or the virtio card's PCM streams, for the log.
    if [ -e $CODEC ]; then sed 's/^/codec| /' $CODEC; else cat /proc/asound/pcm /proc/asound/card0/pcm0p/info 2>&1 | sed 's/^/pcm| /'; fi
    # The VT is open before READY: what the harness types after it is not lost.
    exec 4</dev/tty1
    say "PORTHOLE-SOUND-READY $PCM"
    if read -r -t 60 line <&4; then say "PORTHOLE-SOUND-GO got=$line"; else say "PORTHOLE-SOUND-GO none"; fi
    exec 4<&-
    tone 3
    say "PORTHOLE-SOUND-DONE dac-amp=$(sed -n 's/^ *Amp-Out vals: *\[\(.*\)\]/\1/p' $CODEC 2>/dev/null | head -n1 | tr ' ' ,) irqs=$(grep -iE 'hda|virtio' /proc/interrupts | awk '{print $2 "@" $NF}' | tr '\n' ' ')"
    off
fi

if [ "$MODE" = evlat ]; then
    # The tablet's driver (left out of the loop above), then tests/hw/evlat.c reports each pointer move.
    for m in $(grep -E '^virtio_input\.ko' /lib/modules/load-order); do
        out=$(insmod "/lib/modules/$m" 2>&1) || say "PORTHOLE-INSMOD-FAILED $m: $out"
    done
    evlat "$(arg hw.moves)"
    off
fi

if [ "$MODE" = blkbench ]; then
    wait_for /dev/vda || { say "PORTHOLE-FAIL no /dev/vda"; off; }
    say "PORTHOLE-BLKBENCH-BEGIN sectors=$(cat /sys/block/vda/size)"
    blkbench /dev/vda "$(arg hw.mib)"
    off
fi

if [ "$MODE" = net ]; then
    # The files L1 serves on its loopback (net.sh), reached through the gateway address.
    HTTP_PORT=8080 READY_PORT=8083
    wait_for /sys/class/net/eth0 || { say "PORTHOLE-FAIL no eth0: $(ls /sys/class/net | tr '\n' ' ')"; off; }
    say "PORTHOLE-NET-DRIVER driver=$(basename "$(readlink /sys/class/net/eth0/device/driver)") mac=$(cat /sys/class/net/eth0/address)"
    # How the card interrupts: MSI-X vectors per queue (virtioN-input.0 / -output.0) or a shared INTx line.
    say "PORTHOLE-NET-IRQS $(grep virtio /proc/interrupts | awk '{print $NF "@" $(NF-2)}' | tr '\n' ' ')"
    ip link set lo up
    ip link set eth0 up
    if ! udhcpc -i eth0 -f -q -n -t 10 -T 3 -O mtu >/run/udhcpc.log 2>&1; then
        say "PORTHOLE-FAIL udhcpc: $(tr '\n' '|' </run/udhcpc.log)"
        off
    fi
    . /run/dhcp.env
    GW=$DHCP_ROUTER
    say "PORTHOLE-NET-DHCP ip=$DHCP_IP gw=$GW dns=$(echo $DHCP_DNS | tr ' ' ,) lease-mtu=${DHCP_MTU:-none} mtu=$(cat /sys/class/net/eth0/mtu)"
    # busybox nslookup: "Name: porthole.test" then "Address: A" (the server's own lines come first).
    addr=$(nslookup porthole.test 2>&1 | sed -n '/^Name:/,$s/^Address:[[:space:]]*\([0-9.]*\)$/\1/p' | head -n1)
    say "PORTHOLE-NET-DNS name=porthole.test addr=${addr:-none}"
    say "PORTHOLE-NET-HTTP md5=$(wget -q -O - "http://$GW:$HTTP_PORT/small.bin" | md5sum | cut -d' ' -f1)"
    # 64 MiB from L1 (host -> guest); the harness times BEGIN -> END.
    mkdir -p /run/www
    say "PORTHOLE-NET-H2G-BEGIN"
    wget -q -O /run/www/big.bin "http://$GW:$HTTP_PORT/big.bin"
    say "PORTHOLE-NET-H2G-END rc=$?"
    say "PORTHOLE-NET-H2G md5=$(md5sum </run/www/big.bin | cut -d' ' -f1) bytes=$(wc -c </run/www/big.bin)"
    # ... and back (guest -> host), fetched by L1 through the forwarded port.
    httpd -p 80 -h /run/www
    # TCP segments so far, and what the guest's TCP threw away: data it already had (DelayedACKLost: a
    # re-sent segment), or had no room for (zero window, receive queue full, out-of-order queue pruned).
    tcp=$(awk '/^Tcp: [0-9]/ {print "tcp-in-segs=" $11 " tcp-out-segs=" $12 " retrans=" $13}' /proc/net/snmp)
    ext=$(awk '$1 == "TcpExt:" { if (!n) { for (i = 2; i <= NF; i++) k[i] = $i; n = 1; next }
        for (i = 2; i <= NF; i++) v[k[i]] = $i }
        END { print "dup-segs-in=" v["DelayedACKLost"] + 0 " dropped-segs-in=" v["TCPZeroWindowDrop"] + v["TCPRcvQDrop"] + v["TCPOFODrop"] + v["PruneCalled"] }' /proc/net/netstat)
    say "PORTHOLE-NET-SERVING $tcp $ext"
    echo ready | nc "$GW" $READY_PORT
    nc -l -p 81 >/run/bye
    say "PORTHOLE-NET-BYE got=$(head -c 16 /run/bye)"
    off
fi

if [ "$MODE" = snapshot ]; then
    wait_for /dev/vda || { say "PORTHOLE-FAIL no /dev/vda"; off; }
    # ext2 on the first 64 MiB (mounted by ext4.ko); no journal: what `sync` wrote is all there is.
    mke2fs -F /dev/vda 65536 >/run/mke2fs.log 2>&1 || { say "PORTHOLE-FAIL mke2fs: $(tr '\n' '|' </run/mke2fs.log)"; off; }
    mkdir -p /mnt
    mount -t ext4 /dev/vda /mnt || { say "PORTHOLE-FAIL mount: $(dmesg | tail -n 3 | tr '\n' '|')"; off; }
    md5() { if [ -f "$1" ]; then md5sum <"$1" | cut -d' ' -f1; else echo none; fi; }
    head -c 262144 /dev/urandom >/mnt/a.bin && sync
    say "PORTHOLE-SNAP-A md5=$(md5 /mnt/a.bin)"
    # The counter: one line a second on the console, its latest value in /run/count (RAM).
    (
        n=0
        while :; do
            n=$((n + 1))
            echo $n >/run/count
            echo "PORTHOLE-COUNT $n"
            sleep 1
        done
    ) &
    COUNTER=$!
    say "PORTHOLE-SNAP-READY counter=$COUNTER"
    while :; do
        read -r cmd || { sleep 1; continue; }
        case $cmd in
            *write-b*)
                head -c 131072 /dev/urandom >/mnt/b.bin
                echo appended >>/mnt/a.bin
                sync
                say "PORTHOLE-SNAP-WROTE a=$(md5 /mnt/a.bin) b=$(md5 /mnt/b.bin)"
                ;;
            *size*)
                say "PORTHOLE-SNAP-SIZE sectors=$(cat /sys/block/vda/size)"
                ;;
            *check*)
                # Read from the disk, not from the page cache the saved RAM brought back.
                sync
                echo 3 >/proc/sys/vm/drop_caches
                alive=dead
                kill -0 $COUNTER 2>/dev/null && alive=alive
                say "PORTHOLE-SNAP-CHECK a=$(md5 /mnt/a.bin) b=$(md5 /mnt/b.bin) counter=$alive count=$(cat /run/count) uptime=$(cut -d' ' -f1 /proc/uptime)"
                ;;
        esac
    done
fi

wait_for /dev/vda || say "PORTHOLE-FAIL no /dev/vda"
BOOT=1
[ "$(dd if=/dev/vda bs=512 skip=16 count=1 2>/dev/null | head -c 5)" = BOOT1 ] && BOOT=2
say "PORTHOLE-L2-INIT boot=$BOOT kernel=$(uname -r) cpus-online=$(cat /sys/devices/system/cpu/online)"

if [ $BOOT = 2 ]; then
    # The ACPI power button (button.ko) is an input device: wait for its key, then power off. The device is
    # opened before READY is said: evdev gives events only to readers that have it open, so a press between
    # READY and the open would be lost (the harness presses as soon as it reads READY).
    ev=$(event_device "Power Button")
    wait_for "$ev" || say "PORTHOLE-FAIL no power button input device"
    exec 3<"$ev"
    say "PORTHOLE-POWER-BUTTON-READY $ev"
    dd bs=24 count=1 of=/dev/null <&3 2>/dev/null
    exec 3<&-
    say "PORTHOLE-POWER-BUTTON-PRESSED"
    off
fi

# virtio-blk: read, then write + flush (the harness finds the marker in the image afterwards).
say "PORTHOLE-DISK md5=$(dd if=/dev/vda bs=65536 count=16 2>/dev/null | md5sum | cut -d' ' -f1) sectors=$(cat /sys/block/vda/size)"
echo PORTHOLE-L2-WROTE-THIS | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync 2>/dev/null && say "PORTHOLE-DISK-WRITTEN"

# virtio-scsi CD/DVD: the whole medium.
if wait_for /dev/sr0; then
    say "PORTHOLE-CD md5=$(md5sum </dev/sr0 | cut -d' ' -f1) bytes=$(($(cat /sys/block/sr0/size) * 512))"
else
    say "PORTHOLE-FAIL no /dev/sr0"
fi

# bochs-drm's framebuffer: the square.
if wait_for /dev/fb0; then
    draw_square
else
    say "PORTHOLE-FAIL no /dev/fb0"
fi

# The PS/2 keyboard through the VT: a line typed on the console.
say "PORTHOLE-KEYS-READY"
if read -r -t 300 line </dev/tty1; then say "PORTHOLE-KEYS got=$line"; else say "PORTHOLE-KEYS none"; fi

# The PS/2 mouse (psmouse) through mousedev: four 3-byte packets.
wait_for /dev/input/mice
say "PORTHOLE-MOUSE-READY $(cat /sys/bus/serio/devices/serio1/description 2>/dev/null | tr ' ' _)"
say "PORTHOLE-MOUSE packets=$(dd if=/dev/input/mice bs=3 count=4 2>/dev/null | od -An -v -tx1 | tr -s ' \n' ' ')"

# The virtio-input tablet (porthole-vmm --tablet): its driver loaded only now, the console's pointer leaves
# the PS/2 mouse for it. Eight evdev events (24 bytes each: time, type, code, value) of pointer moves.
for m in $(grep virtio_input /lib/modules/load-order); do
    out=$(insmod "/lib/modules/$m" 2>&1) || say "PORTHOLE-INSMOD-FAILED $m: $out"
done
ev=$(event_device "Porthole tablet")
if [ -n "$ev" ] && wait_for "$ev"; then
    exec 5<"$ev" # open before READY: evdev keeps events only for readers that have the device open
    say "PORTHOLE-TABLET-READY $ev"
    say "PORTHOLE-TABLET events=$(dd bs=24 count=8 <&5 2>/dev/null | od -An -v -tx1 | tr -s ' \n' ' ')"
    exec 5<&-
else
    say "PORTHOLE-TABLET-NONE $(cat /sys/class/input/input*/name 2>/dev/null | tr ' \n' '_,')"
fi

# The virtio-input keyboard (--input virtio), loaded with the tablet: the console's keys reach it now (the
# PS/2 keyboard had them before). Four evdev events of a key typed on the console (KEY_A down and up, each
# with its report); then the Caps Lock LED switched on through evdev, which the driver sends on the status
# queue (the harness reads the LED state from the VMM's control socket); then a line typed on the console
# reaches the VT through the virtio keyboard.
ev=$(event_device "Porthole keyboard")
if [ -n "$ev" ] && wait_for "$ev"; then
    exec 5<"$ev" # open before READY, as the tablet's
    say "PORTHOLE-VKBD-READY $ev"
    say "PORTHOLE-VKBD events=$(dd bs=24 count=4 <&5 2>/dev/null | od -An -v -tx1 | tr -s ' \n' ' ')"
    exec 5<&-
    # struct input_event: 16 bytes of time (ignored on write), EV_LED (0x11), LED_CAPSL (1), value 1.
    { head -c 16 /dev/zero; printf '\021\000\001\000\001\000\000\000'; } >/tmp/caps-led
    # The VT is open before the LED line: the harness checks the LED, then types a line that goes through the
    # virtio keyboard to the VT (this boot waits for it, so the VMM is asked while the keyboard is still up).
    exec 4</dev/tty1
    if dd if=/tmp/caps-led of="$ev" bs=24 count=1 2>/dev/null; then say "PORTHOLE-VKBD-LED caps=on"; else say "PORTHOLE-VKBD-LED failed"; fi
    if read -r -t 300 line <&4; then say "PORTHOLE-VKBD-TTY got=$line"; else say "PORTHOLE-VKBD-TTY none"; fi
    exec 4<&-
else
    say "PORTHOLE-VKBD-NONE $(cat /sys/class/input/input*/name 2>/dev/null | tr ' \n' '_,')"
fi

# The memory balloon (porthole-vmm --balloon; virtio_balloon loaded at boot): the harness moves the target
# through the control socket and asks, on the serial console, for the guest's own view of its memory.
meminfo() { awk '/^MemTotal:/ {t = $2} /^MemAvailable:/ {a = $2} END {print "memtotal-kib=" t " available-kib=" a}' /proc/meminfo; }
if ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -q '^virtio'; then
    say "PORTHOLE-BALLOON-READY $(meminfo)"
    while read -r -t 900 cmd; do
        case $cmd in
            *meminfo*) say "PORTHOLE-BALLOON-MEMINFO $(meminfo)" ;;
            *balloon-done*) break ;;
        esac
    done
else
    say "PORTHOLE-BALLOON-NONE $(ls /sys/bus/virtio/drivers 2>/dev/null | tr '\n' ,)"
fi

# vCPU hot-add (porthole-vmm --cpus 1 --max-cpus 2): the harness adds one through the control socket; the
# kernel's ACPI processor driver sees it (the GPE runs \_SB.CPUS.CSCN, which notifies its device) and it appears
# in sysfs, offline; this brings it online (INIT/SIPI, as at boot) and counts its timer interrupts.
CPUS=/sys/devices/system/cpu
if [ "$(cat $CPUS/possible)" = 0-1 ]; then
    say "PORTHOLE-CPU-HOTPLUG-READY online=$(cat $CPUS/online) possible=$(cat $CPUS/possible)"
    i=0
    while [ ! -e $CPUS/cpu1/online ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
    if [ -e $CPUS/cpu1/online ] && echo 1 >$CPUS/cpu1/online; then
        sleep 2
        ticks=$(awk '/LOC:/ {print $3}' /proc/interrupts)
        say "PORTHOLE-CPU-HOTPLUG online=$(cat $CPUS/online) processors=$(grep -c ^processor /proc/cpuinfo) cpu1-timer-irqs=$ticks after=${i}s"
    else
        say "PORTHOLE-CPU-HOTPLUG failed: online=$(cat $CPUS/online) cpus=$(ls $CPUS | tr '\n' ,)"
    fi
else
    say "PORTHOLE-CPU-HOTPLUG-NONE possible=$(cat $CPUS/possible) $(dmesg | grep -iE 'smpboot|LAPIC|CPU hotplug|possible|ACPI: .*APIC|nr_cpu' | tr '\n' '|')"
fi

# Second boot next: mark it on the disk, then reboot without the init system.
printf BOOT1 | dd of=/dev/vda bs=512 seek=16 conv=sync,fsync 2>/dev/null
say "PORTHOLE-REBOOTING"
sync
reboot -f
sleep 5

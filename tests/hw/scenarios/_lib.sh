# Shared by the hardware tier's scenarios (sourced). Runs inside L1 (HW=/hw) or, with PORTHOLE_HW=direct,
# on the host itself (HW = the staging directory the harness made). Everything goes to stdout, which is
# L1's console or the harness's pipe: no file is polled.
HW=${HW:-/hw}
# Scratch space: L1's tmpfs, or the harness's scratch directory when direct.
T=${HW_TMP:-/tmp}
G=$HW/guests
# Where the L2 VM's RFB console and control socket are reachable from the harness.
VNC_LISTEN=${HW_VNC_LISTEN:-tcp:0.0.0.0:5900}
CTL_PORT=${HW_CTL_PORT:-5901}
API_PORT=${HW_API_PORT:-5902}
L2_CMDLINE="console=ttyS0 quiet"
# Rounds of a benchmark scenario's engine runs (PORTHOLE_HW_ROUNDS on the harness side; ./x test runs one).
ROUNDS=${HW_ROUNDS:-3}

# forward PORT SOCKET: TCP PORT (forwarded by QEMU's user network to the host) -> the Unix socket.
forward() {
    socat "TCP-LISTEN:$1,fork,reuseaddr" "UNIX-CONNECT:$2" >/dev/null 2>&1 &
}

# run LABEL CMD...: one engine run, bracketed by HW-START and HW-EXIT lines that the harness times.
run() {
    label=$1
    shift
    echo "HW-START $label"
    "$@"
    rc=$?
    echo "HW-EXIT $label rc=$rc"
    return $rc
}

# qemu_peer ARGS...: QEMU with KVM inside L1, nothing but what the scenario asks for.
qemu_peer() {
    qemu-system-x86_64 -L "$HW/share/qemu" -enable-kvm -cpu host -nodefaults -no-reboot -display none \
        -serial stdio -monitor none "$@"
}

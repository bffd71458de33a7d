# Scenario (--all; issue 16): a cloud image (tests/hw/make-cloud-image.sh: Debian 12 with cloud-init and
# openssh-server, qcow2 with compressed clusters) made into a VM by portholed in L1, through its API: the
# daemon writes the NoCloud seed (hostname, user, this run's SSH key), puts a qcow2 overlay on the library
# image and starts the VM with a passt network whose automatic SSH forward (127.0.0.1:2222-2299 -> guest 22)
# the VM's API record names. L1 then logs in with ssh and the key, and prints what the guest says.
#
# The image reaches L1 as its virtio-blk drive /dev/vda (read-only; its last sector padded with zeros) and is
# copied into the library folder directly: an upload through the API would push 300 MiB through the
# emulated network for nothing the upload tests do not already cover.
# The API is spoken with socat over the daemon's Unix socket (HTTP/1.1, one request per connection).
# The VM's serial log (the daemon writes it) is copied to this console with an "L2| " prefix.
. "${HW:=/hw}/scenarios/_lib.sh"
IMG_DEV=${HW_CLOUD_IMAGE:-/dev/vda}
IMAGE=debian-cloud.qcow2
export XDG_DATA_HOME="$T/data" XDG_RUNTIME_DIR="$T/run" PORTHOLE_SEABIOS_DIR="$HW/share/seabios"
LIB=$T/data/porthole/images
SOCK=$T/run/portholed.sock
mkdir -p "$LIB" "$T/run"
now() { cut -d' ' -f1 /proc/uptime; }
DAEMON="" ID="" TAILER=""
# fail WHY: says why, then stops the VM and the daemon (a VM's engine is not the daemon's child: it would
# outlive it in direct mode) and ends the scenario.
fail() {
    echo "HW-CLOUD-FAIL $*"
    [ -n "$ID" ] && api POST "/vms/$ID/poweroff" >/dev/null 2>&1
    [ -n "$TAILER" ] && kill "$TAILER" 2>/dev/null
    [ -n "$DAEMON" ] && sleep 2 && kill "$DAEMON" 2>/dev/null
    exit 1
}

if [ ! -b "$IMG_DEV" ] && [ ! -f "$IMG_DEV" ]; then
    fail "no cloud image at $IMG_DEV: $(ls /dev/vd* 2>&1)"
fi
cat "$IMG_DEV" >"$LIB/$IMAGE" || fail "cannot copy $IMG_DEV into the library"
MD5_BEFORE=$(md5sum <"$LIB/$IMAGE" | cut -d' ' -f1)
echo "HW-CLOUD-IMAGE md5=$MD5_BEFORE bytes=$(wc -c <"$LIB/$IMAGE") magic=$(head -c 4 "$LIB/$IMAGE" | od -An -c | tr -d ' ')"

command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || fail "no ssh or ssh-keygen in L1"
ssh-keygen -q -t ed25519 -N '' -C hw-cloud -f "$T/id_ed25519" || fail "ssh-keygen failed"
KEY=$(cat "$T/id_ed25519.pub")
echo "HW-CLOUD-KEY $KEY"

# api METHOD PATH [JSON]: the response's body (PATH under /api/v1); its status line goes to $T/api.status.
api() {
    if [ -n "$3" ]; then
        printf '%s /api/v1%s HTTP/1.1\r\nHost: portholed\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' \
            "$1" "$2" "${#3}" "$3"
    else
        printf '%s /api/v1%s HTTP/1.1\r\nHost: portholed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$1" "$2"
    fi | socat -t 60 - "UNIX-CONNECT:$SOCK,shut-none" >"$T/api.out" 2>"$T/api.err" || { cat "$T/api.err"; return 1; }
    # shut-none: the request's end is not a half-close, which the daemon's HTTP server would take as the
    # client leaving (and close without answering); it closes after its answer (Connection: close).
    tr -d '\r' <"$T/api.out" >"$T/api.txt"
    head -n1 "$T/api.txt" >"$T/api.status"
    sed '1,/^$/d' "$T/api.txt"
}
status_ok() { grep -q ' 20[0-9] ' "$T/api.status"; }

echo "HW-START portholed"
portholed --socket "$SOCK" --vmm "$HW/bin/porthole-vmm" >"$T/portholed.log" 2>&1 &
DAEMON=$!
i=0
until api GET /host >/dev/null 2>&1 && status_ok; do
    i=$((i + 1))
    [ $i -gt 180 ] && fail "the daemon's API never answered: $(tail -n 5 "$T/portholed.log" | tr '\n' '|')"
    kill -0 $DAEMON 2>/dev/null || fail "portholed exited: $(tail -n 5 "$T/portholed.log" | tr '\n' '|')"
    sleep 1
done
echo "HW-CLOUD-IMAGES $(api GET /images | tr -d '\n' | head -c 600)"

BODY="{\"name\":\"cloud\",\"vcpus\":1,\"memory_mib\":768,\"disk_gib\":4,\"disk_image\":\"$IMAGE\",\"cloud_init\":{\"hostname\":\"porthole-cloud\",\"user\":\"tester\",\"ssh_authorized_keys\":[\"$KEY\"]}}"
VM=$(api POST /vms "$BODY")
status_ok || fail "POST /vms: $(cat "$T/api.status") $VM"
echo "HW-CLOUD-CREATED $VM"
ID=$(echo "$VM" | sed -n 's/^{"id":"\([^"]*\)".*/\1/p')
[ -n "$ID" ] || fail "no id in the created VM"
# The automatic SSH forward the daemon chose (host_port of the forward to guest port 22).
PORT=$(echo "$VM" | sed -n 's/.*"host_port":\([0-9]*\),"guest_port":22[,}].*/\1/p')
[ -n "$PORT" ] || fail "no SSH forward in the VM's nics"
OVERLAY=$(find "$T/data" -path "*$ID*" -name '*.qcow2' | head -n1)
echo "HW-CLOUD-OVERLAY path=${OVERLAY:-none} magic=$(head -c 4 "$OVERLAY" 2>/dev/null | od -An -c | tr -d ' ') backing=$(
    head -c 65536 "$OVERLAY" 2>/dev/null | strings | grep "$IMAGE\$" | head -n1)"

T0=$(now)
api POST "/vms/$ID/start" >"$T/start.json"
status_ok || fail "start: $(cat "$T/api.status") $(cat "$T/start.json")"
echo "HW-START porthole-cloud port=$PORT"
SERIAL=$(find "$T/run" -path "*$ID*" -name serial.log 2>/dev/null | head -n1)
if [ -n "$SERIAL" ]; then
    (tail -F "$SERIAL" 2>/dev/null | while IFS= read -r l; do echo "L2| $l"; done) &
    TAILER=$!
else
    echo "HW-CLOUD-NOTE no serial.log under $T/run for $ID"
fi

SSH="ssh -F /dev/null -i $T/id_ed25519 -p $PORT -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new \
    -o UserKnownHostsFile=$T/known_hosts -o ConnectTimeout=20 -o LogLevel=ERROR tester@127.0.0.1"
# SSH answers when the guest's sshd does; a refusal or reset before that is the forward with no listener.
deadline=$(($(date +%s) + ${HW_CLOUD_LIMIT_S:-2700}))
n=0
while :; do
    n=$((n + 1))
    OUT=$($SSH 'echo "HW-GUEST hostname=$(hostname) user=$(id -un) cloud=$(cloud-id 2>&1 | tr " " _) os=$(head -n1 /etc/os-release | tr " " _)"; echo "HW-GUEST-SEED $(ls /var/lib/cloud/instance 2>&1 | tr "\n" " ")"' 2>"$T/ssh.err")
    rc=$?
    [ $rc -eq 0 ] && break
    api GET "/vms/$ID" >"$T/vm.json"
    grep -q '"state":"\(running\|starting\)"' "$T/vm.json" || fail "the VM is no longer running: $(head -c 800 "$T/vm.json")"
    [ $((n % 10)) -eq 1 ] && echo "HW-CLOUD-WAIT try=$n t=$(awk -v a="$T0" -v b="$(now)" 'BEGIN {printf "%.0f", b - a}') ssh rc=$rc: $(tr '\n' ' ' <"$T/ssh.err" | head -c 200)"
    [ "$(date +%s)" -gt "$deadline" ] && fail "no SSH login within ${HW_CLOUD_LIMIT_S:-2700} s: $(tr '\n' ' ' <"$T/ssh.err")"
    sleep 5
done
T1=$(now)
echo "$OUT"
echo "HW-CLOUD-SSH port=$PORT tries=$n boot_to_ssh_s=$(awk -v a="$T0" -v b="$T1" 'BEGIN {printf "%.1f", b - a}') host_key=$(awk '{print $2; exit}' "$T/known_hosts" 2>/dev/null)"
# The key is what lets tester in: another key is refused (no password can stand in: BatchMode).
ssh-keygen -q -t ed25519 -N '' -C other -f "$T/other_ed25519" || fail "ssh-keygen failed"
OTHER=$(ssh -F /dev/null -i "$T/other_ed25519" -p "$PORT" -o BatchMode=yes -o IdentitiesOnly=yes \
    -o UserKnownHostsFile="$T/known_hosts" -o ConnectTimeout=20 tester@127.0.0.1 'echo let-in' 2>&1)
echo "HW-CLOUD-OTHER-KEY rc=$? $(echo "$OTHER" | tr '\n' ' ' | head -c 200)"
api GET "/vms/$ID" >"$T/vm.json"
echo "HW-CLOUD-VM disk_format=$(sed -n 's/.*"disk_format":"\([a-z0-9]*\)".*/\1/p' "$T/vm.json") cloud_init=$(sed -n 's/.*"cloud_init":\({[^}]*}\).*/\1/p' "$T/vm.json")"

api POST "/vms/$ID/poweroff" >/dev/null
i=0
until api GET "/vms/$ID" | grep -q '"state":"stopped"'; do
    i=$((i + 1))
    [ $i -gt 60 ] && { echo "HW-CLOUD-NOTE the VM did not stop within 60 s"; break; }
    sleep 1
done
MD5_AFTER=$(md5sum <"$LIB/$IMAGE" | cut -d' ' -f1)
echo "HW-CLOUD-IMAGE-AFTER md5=$MD5_AFTER before=$MD5_BEFORE"
[ -n "$TAILER" ] && kill "$TAILER" 2>/dev/null
kill "$DAEMON" 2>/dev/null
wait "$DAEMON" 2>/dev/null
echo "HW-EXIT portholed rc=0"

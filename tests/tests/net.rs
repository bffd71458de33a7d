//! The virtio-net micro-guest (tests/guests/asm/virtio-net.S, a polled virtio 1.x driver with DHCP, ARP,
//! ICMP and UDP) against two virtio-net implementations behind the same user-mode back end, passt: QEMU's
//! virtio-net-pci (modern only, `-netdev stream` to a passt the test starts) and porthole-vmm's (`--net
//! user`, passt spawned by the VMM). The same ELF and command line give the same lines on both. passt
//! mirrors the host: the DHCP lease is the host's own address, mask and default gateway, and the guest's
//! UDP datagrams to the gateway reach an echo server on the host's 127.0.0.1 (passt maps the gateway to the
//! host's loopback) and come back byte for byte (FNV-1a of the reply). Then, what each side adds: QEMU's
//! monitor and porthole-vmm's control socket take the link down and up, a host flood meets a guest that
//! posts no receive buffers, and malformed transmit chains put the device in NEEDS_RESET (porthole-vmm
//! counts them and goes on). Last, the guest with a static address on porthole-vmm's bridge back end.
//!
//! Local only: every address involved is the host's own, 127.0.0.1 or a test bridge's isolated subnet
//! (10.213.78.0/24); nothing leaves the machine.
//! passt must be installed (apt-get install passt). ICMP: passt answers an echo to the gateway through a
//! ping socket, which it (dropped to nobody when started as root) may open only when
//! net.ipv4.ping_group_range includes its group; otherwise the guest's `ping` must time out.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use porthole_tests::{Scratch, TestBridge, qemu, text, wait_until, workspace_bin};
use vmm_core::control::{ControlClient, Request};
use vmm_core::vm::RunState;

const LIMIT: Duration = Duration::from_secs(240);
const MAC: &str = "52:54:00:12:34:56";
/// What the guest's `hostile` word runs, in order.
const HOSTILE: [&str; 10] =
    ["loop", "outside", "writable", "huge", "short", "zero", "badhead", "badnext", "indirect", "availjump"];

/// 32-bit FNV-1a, as the guest computes it.
fn fnv(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("{h:08x}")
}

/// The payload of the guest's `udp=PORT,N`: byte j = (j + (j >> 8)) & 0xFF.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|j| ((j + (j >> 8)) & 0xFF) as u8).collect()
}

/// The line the guest prints for an echoed `udp=PORT,N`. Both devices fill each 2048-byte receive buffer
/// before taking the next, so the frame (12-byte header, 42 bytes of Ethernet, IP and UDP headers, N bytes)
/// takes ceil((N + 54) / 2048) buffers with MRG_RXBUF.
fn udp_line(port: u16, n: usize) -> String {
    let buffers = (n + 54).div_ceil(2048);
    format!("NET udp port={port} sent={n} reply={n} buffers={buffers} sum={}\n", fnv(&pattern(n)))
}

/// A UDP echo server on 127.0.0.1 (a free port) in a thread, until dropped.
struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the UDP echo server");
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let port = socket.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Echo { port, stop, thread: Some(thread) }
    }
}

/// A UDP echo server that also records when each datagram arrived and its size.
struct TimedEcho {
    echo: Echo,
    arrivals: Arc<Mutex<Vec<(Instant, usize)>>>,
}

impl TimedEcho {
    fn start() -> TimedEcho {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the UDP echo server");
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let port = socket.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (stop.clone(), arrivals.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    log.lock().unwrap().push((Instant::now(), n));
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        TimedEcho { echo: Echo { port, stop, thread: Some(thread) }, arrivals }
    }

    fn arrivals(&self) -> Vec<(Instant, usize)> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// The rate (Ethernet bytes a second) at which datagrams `from..to` of `arrivals` came, each counted as its
/// frame on the wire (payload + UDP, IPv4 and Ethernet headers), over the time from datagram `from - 1`.
fn frame_rate(arrivals: &[(Instant, usize)], from: usize, to: usize) -> f64 {
    let bytes: usize = arrivals[from..to].iter().map(|(_, n)| n + 8 + 20 + 14).sum();
    bytes as f64 / arrivals[to - 1].0.duration_since(arrivals[from - 1].0).as_secs_f64()
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What passt mirrors from the host: its IPv4 address, mask and default gateway (`ip`), and the first
/// IPv4 name server of /etc/resolv.conf when it is not a loopback address (passt does not pass those on
/// as they are).
struct HostNet {
    address: String,
    mask: String,
    gateway: String,
    dns: Option<String>,
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    text(&out.stdout)
}

fn host_net() -> HostNet {
    let route = ip(&["-4", "route", "show", "default"]);
    let words: Vec<&str> = route.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)).copied();
    let gateway = after("via").unwrap_or_else(|| panic!("no IPv4 default route (passt needs one): {route}"));
    let dev = after("dev").expect("the default route's device");
    let addr = ip(&["-4", "-o", "addr", "show", "dev", dev]);
    let cidr = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no IPv4 address on {dev}: {addr}"));
    let (address, prefix) = cidr.split_once('/').expect("ADDR/PREFIX");
    let prefix: u32 = prefix.parse().unwrap();
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix).unwrap_or(0)).to_string();
    let dns = std::fs::read_to_string("/etc/resolv.conf").ok().and_then(|conf| {
        conf.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .find(|a| !a.is_loopback())
            .map(|a| a.to_string())
    });
    HostNet { address: address.to_owned(), mask, gateway: gateway.to_owned(), dns }
}

/// Whether passt may open ICMP echo sockets: its group (nogroup, 65534, once it dropped root) within
/// net.ipv4.ping_group_range.
fn passt_can_ping() -> bool {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    let group = if unsafe { libc::geteuid() } == 0 { 65534 } else { unsafe { libc::getegid() } };
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").unwrap_or_default();
    let bounds: Vec<u32> = range.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    matches!(bounds[..], [low, high] if low <= group && group <= high)
}

/// A running guest (QEMU or porthole-vmm) whose serial output (stdout) is collected as it comes.
struct Guest {
    child: Option<Child>,
    /// Set once the child's stdout closed (it exited).
    closed: Arc<AtomicBool>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>, closed: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        closed.store(true, Ordering::Relaxed);
    })
}

impl Guest {
    fn spawn(mut cmd: Command) -> Guest {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone(), closed.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone(), Arc::new(AtomicBool::new(false))),
        ];
        Guest { child: Some(child), closed, stdout, stderr, readers }
    }

    fn output(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn context(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.output(), self.stderr.lock().unwrap())
    }

    /// Waits until `needle` occurs `count` times in the output.
    fn wait_for_n(&self, needle: &str, count: usize) {
        wait_until(
            LIMIT,
            || self.output().matches(needle).count() >= count || self.closed.load(Ordering::Relaxed),
            || format!("{needle:?} x{count} never came\n{}", self.context()),
        );
        assert!(self.output().matches(needle).count() >= count, "{needle:?} x{count} missing\n{}", self.context());
    }

    fn wait_for(&self, needle: &str) {
        self.wait_for_n(needle, 1);
    }

    /// Waits for the guest to power off (exit status 0) and returns its output.
    fn finish(mut self) -> String {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the guest still runs after {LIMIT:?}\n{}", self.context());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        assert_eq!(status.code(), Some(0), "{}", self.context());
        let out = self.output();
        assert!(out.ends_with("NET done\n"), "{}", self.context());
        out
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// passt started by the test for QEMU (`-s SOCKET`), killed when dropped.
struct Passt {
    child: Child,
    socket: PathBuf,
}

impl Passt {
    /// `udp_forward`: a host port on 127.0.0.1 forwarded to the same port of the guest.
    fn start(dir: &Scratch, mtu: u16, udp_forward: Option<u16>) -> Passt {
        // passt started as root runs as nobody: it must be able to create its socket here.
        std::fs::set_permissions(dir.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let socket = dir.path("passt.sock");
        let mut cmd = Command::new("passt");
        cmd.args(["-f", "-q", "-s"]).arg(&socket).args(["--mtu", &mtu.to_string()]);
        if let Some(port) = udp_forward {
            cmd.args(["-u", &format!("127.0.0.1/{port}")]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start passt (apt-get install passt): {e}"));
        let mut passt = Passt { child, socket };
        let socket = passt.socket.clone();
        wait_until(
            LIMIT,
            || socket.exists() || passt.child.try_wait().ok().flatten().is_some(),
            || "passt made no socket".into(),
        );
        assert!(socket.exists(), "passt exited without making its socket");
        passt
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The virtio-net guest on QEMU (-M pc, KVM) with a modern-only virtio-net-pci (id nic0) on `passt`.
fn qemu_guest(passt: &Passt, mtu: u16, cmdline: &str, monitor: Option<&Path>) -> Guest {
    let mut cmd = qemu("pc", &porthole_guests::path("virtio-net"), 1);
    cmd.args(["-append", cmdline])
        .arg("-device")
        .arg(format!("virtio-net-pci,disable-legacy=on,netdev=n0,id=nic0,mac={MAC},host_mtu={mtu}"))
        .arg("-netdev")
        .arg(format!("stream,id=n0,server=off,addr.type=unix,addr.path={}", passt.socket.display()));
    if let Some(m) = monitor {
        cmd.arg("-monitor").arg(format!("unix:{},server=on,wait=off", m.display()));
    }
    Guest::spawn(cmd)
}

/// The virtio-net guest on porthole-vmm with `--net NET` (and a control socket when given).
fn vmm_guest(net: &str, cmdline: &str, control: Option<&Path>) -> Guest {
    let mut cmd = Command::new(workspace_bin("porthole-vmm"));
    cmd.arg("--kernel").arg(porthole_guests::path("virtio-net")).args(["--memory", "64"]);
    cmd.args(["--net", net, "--cmdline", cmdline]);
    if let Some(c) = control {
        cmd.arg("--control").arg(format!("unix:{}", c.display()));
    }
    Guest::spawn(cmd)
}

fn control(path: &Path) -> ControlClient {
    wait_until(LIMIT, || path.exists(), || "no control socket".into());
    ControlClient::connect(path).unwrap()
}

/// A QEMU monitor command (human monitor on a Unix socket).
fn monitor(path: &Path, command: &str) {
    wait_until(LIMIT, || path.exists(), || "no monitor socket".into());
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The monitor echoes the command as it reads it, and prompts again once it has run it.
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let done = |seen: &[u8]| text(seen).split_once(command).is_some_and(|(_, after)| after.contains("(qemu)"));
    while !done(&seen) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    assert!(done(&seen), "the monitor did not take {command:?}: {}", text(&seen));
}

/// Sends 256-byte datagrams to 127.0.0.1:`port` every millisecond until `until` holds; returns how many.
fn flood(port: u16, until: impl Fn() -> bool) -> u64 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    let mut sent = 0;
    while !until() && start.elapsed() < LIMIT {
        if s.send_to(&[0x5A; 256], ("127.0.0.1", port)).is_ok() {
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    sent
}

/// The lines both engines must print for `same_cmdline` at MTU 65520, in order.
fn expected_lines(host: &HostNet, echo: u16) -> Vec<String> {
    let dhcp = match &host.dns {
        Some(dns) => format!(
            "NET dhcp ip={} server={} mask={} router={} dns={dns} mtu=65520\n",
            host.address, host.gateway, host.mask, host.gateway
        ),
        None => {
            format!("NET dhcp ip={} server={} mask={} router={}", host.address, host.gateway, host.mask, host.gateway)
        }
    };
    let ping = if passt_can_ping() {
        format!("NET ping from={} seq=1 bytes=56\n", host.gateway)
    } else {
        "NET ping timeout\n".to_owned()
    };
    vec![
        format!("NET dev mac={MAC} mtu=65520 status=1 features=00018028 mrg=1 qsize=16\n"),
        dhcp,
        format!("NET dhcp ack ip={}\n", host.address),
        format!("NET arp router={} mac=", host.gateway),
        ping,
        udp_line(echo, 100),
        udp_line(echo, 1400),
        udp_line(echo, 9000),
        udp_line(echo, 20000),
        "NET link status=1 up=1\n".into(),
        "NET irq interrupted=1 interrupts=".into(),
        format!("NET dev mac={MAC} mtu=65520 status=1 features=00010028 mrg=0 qsize=16\n"),
        udp_line(echo, 1000),
        // Without MRG_RXBUF the 2054-byte frame fits no 2048-byte buffer: both devices drop it.
        format!("NET udp port={echo} sent=2000 timeout\n"),
        "NET done\n".into(),
    ]
}

/// The guest waits 5 s for an answer, and 1 s where none is to come (ping without ping sockets, the frame
/// too large for a buffer without MRG_RXBUF).
fn same_cmdline(echo: u16) -> String {
    let p = echo;
    let ping = if passt_can_ping() { "ping" } else { "wait=1000 ping wait=5000" };
    format!(
        "dhcp arp {ping} udp={p},100 udp={p},1400 udp={p},9000 udp={p},20000 link irq nomrg udp={p},1000 \
         wait=1000 udp={p},2000"
    )
}

/// Each expected piece occurs, in order.
fn assert_in_order(out: &str, expected: &[String]) {
    let mut at = 0;
    for piece in expected {
        match out[at..].find(piece.as_str()) {
            Some(i) => at += i + piece.len(),
            None => panic!("{piece:?} missing (in this order) from:\n{out}"),
        }
    }
}

/// The output without what legitimately differs between engines: the PCI slot and IRQ line, the
/// interrupt count, the MAC address of passt's side (the same passt, but compared in its own check).
fn comparable(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with("NET found="))
        .map(|l| match l.find(" interrupts=") {
            Some(i) if l.starts_with("NET irq ") => {
                let rest = &l[i + 1..];
                let arp = rest.split_whitespace().find(|w| w.starts_with("arp=")).unwrap_or("");
                format!("{} {arp}", &l[..i])
            }
            _ => l.to_owned(),
        })
        .collect()
}

/// The same guest command line on QEMU's virtio-net-pci and on porthole-vmm's virtio-net, both on passt at
/// MTU 65520: DHCP gives the host's address, mask and gateway with MTU 65520, ARP finds the gateway, UDP
/// datagrams of 100 to 20000 bytes come back intact (9000 and 20000 over several merged buffers), an
/// interrupt-driven receive works, and without MRG_RXBUF a frame larger than a buffer is dropped while a
/// smaller one still arrives. Both outputs are the same line for line.
#[test]
fn the_guest_gets_the_same_answers_from_qemu_and_porthole_vmm() {
    let host = host_net();
    let echo = Echo::start();
    let expected = expected_lines(&host, echo.port);
    let cmdline = same_cmdline(echo.port);

    let dir = Scratch::new("net-qemu");
    let passt = Passt::start(&dir, 65520, None);
    let on_qemu = qemu_guest(&passt, 65520, &cmdline, None).finish();
    assert_in_order(&on_qemu, &expected);
    assert!(on_qemu.contains("arp=1\n"), "{on_qemu}");
    drop(passt);

    let net = format!("user,mac={MAC},mtu=65520");
    let on_vmm = vmm_guest(&net, &cmdline, None).finish();
    assert_in_order(&on_vmm, &expected);
    assert_eq!(comparable(&on_qemu), comparable(&on_vmm), "QEMU:\n{on_qemu}\nporthole-vmm:\n{on_vmm}");
}

/// At passt's default MTU both engines announce 1500 by DHCP and in the device's config, and a 1400-byte
/// datagram (a 1442-byte frame, one buffer) makes the round trip.
#[test]
fn mtu_1500_on_both_engines() {
    let host = host_net();
    let echo = Echo::start();
    let cmdline = format!("dhcp udp={},1400 link", echo.port);
    let expected = [
        format!("NET dev mac={MAC} mtu=1500 status=1 features=00018028 mrg=1 qsize=16\n"),
        format!("NET dhcp ip={} server={}", host.address, host.gateway),
        " mtu=1500\n".into(),
        format!("NET dhcp ack ip={}\n", host.address),
        udp_line(echo.port, 1400),
        "NET link status=1 up=1\n".into(),
    ];
    let dir = Scratch::new("net-qemu-1500");
    let passt = Passt::start(&dir, 1500, None);
    let on_qemu = qemu_guest(&passt, 1500, &cmdline, None).finish();
    assert_in_order(&on_qemu, &expected);
    drop(passt);
    let on_vmm = vmm_guest(&format!("user,mac={MAC}"), &cmdline, None).finish();
    assert_in_order(&on_vmm, &expected);
    assert_eq!(comparable(&on_qemu), comparable(&on_vmm), "QEMU:\n{on_qemu}\nporthole-vmm:\n{on_vmm}");
}

/// The guest against QEMU alone: malformed transmit chains (all but `short`, on which QEMU 7.2 aborts
/// with an assertion in iov_copy) put QEMU's device in NEEDS_RESET except `outside` and `availjump`, which
/// QEMU completes; after them the re-initialised device works. The link goes down and up from QEMU's
/// monitor (config status and the ISR's configuration bit). A flood from the host while the guest posts
/// no buffers: QEMU holds the frames back, and frames arrive once buffers are posted.
#[test]
fn hostile_chains_link_changes_and_a_flood_on_qemu() {
    let echo = Echo::start();
    let flood_port = free_udp_port();
    let dir = Scratch::new("net-qemu-hostile");
    let passt = Passt::start(&dir, 1500, Some(flood_port));
    let mon = dir.path("monitor.sock");
    let cases: Vec<String> = HOSTILE.iter().filter(|c| **c != "short").map(|c| format!("hostile={c}")).collect();
    let cmdline = format!(
        "{} dhcp udp={},100 wait-link wait-link link flood-wait=500 udp={},200",
        cases.join(" "),
        echo.port,
        echo.port
    );
    let guest = qemu_guest(&passt, 1500, &cmdline, Some(&mon));
    guest.wait_for("NET wait-link status=1\n");
    monitor(&mon, "set_link nic0 off");
    guest.wait_for("NET wait-link status=0\n");
    monitor(&mon, "set_link nic0 on");
    guest.wait_for("NET flood-wait start ms=500\n");
    let sent = flood(flood_port, || guest.output().contains("NET flood-wait ms="));
    let out = guest.finish();

    for case in HOSTILE.iter().filter(|c| **c != "short") {
        let completed = matches!(*case, "outside" | "availjump");
        let line = if completed {
            format!("NET hostile case={case} used=1 devstatus=0f\n")
        } else {
            format!("NET hostile case={case} used=0 devstatus=4f\n")
        };
        assert!(out.contains(&line), "{line:?} missing:\n{out}");
    }
    assert_eq!(out.matches("NET hostile-done\n").count(), 9, "{out}");
    assert_in_order(
        &out,
        &[
            "NET dhcp ack ip=".into(),
            udp_line(echo.port, 100),
            "NET link-changed status=0 up=0 config-irq=1\n".into(),
            "NET link-changed status=1 up=1 config-irq=1\n".into(),
            "NET link status=1 up=1\n".into(),
            "NET flood-wait ms=500 received=".into(),
            udp_line(echo.port, 200),
        ],
    );
    let received = flood_count(&out);
    eprintln!("QEMU flood: {sent} datagrams sent, {received} frames received after the wait");
    assert!(sent > 0 && received > 0, "sent {sent}, received {received}:\n{out}");
}

/// The count of `NET flood-wait ms=.. received=N`.
fn flood_count(out: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with("NET flood-wait ms=")).expect("the flood line");
    line.rsplit_once("received=").unwrap().1.parse().unwrap()
}

/// Every malformed transmit chain puts porthole-vmm's device in NEEDS_RESET without completing it, is
/// counted as malformed (per card and in the VM's counters), and the VMM goes on: its control socket
/// answers, and the re-initialised device gets a lease and echoes a datagram.
#[test]
fn hostile_chains_are_refused_and_counted_by_porthole_vmm() {
    let echo = Echo::start();
    let dir = Scratch::new("net-vmm-hostile");
    let sock = dir.path("control.sock");
    let cmdline = format!("hostile dhcp udp={},100 hang", echo.port);
    let guest = vmm_guest(&format!("user,mac={MAC}"), &cmdline, Some(&sock));
    guest.wait_for("NET hang\n");
    let out = guest.output();
    for case in HOSTILE {
        let line = format!("NET hostile case={case} used=0 devstatus=4f\n");
        assert!(out.contains(&line), "{line:?} missing:\n{}", guest.context());
    }
    assert_in_order(&out, &["NET hostile-done\n".into(), "NET dhcp ack ip=".into(), udp_line(echo.port, 100)]);
    let mut c = control(&sock);
    let status = c.request(&Request::Status).unwrap().status.unwrap();
    assert_eq!(status.state, RunState::Running, "{status:?}");
    let nics = c.request(&Request::Nics).unwrap().nics.unwrap();
    assert_eq!(nics.len(), 1);
    let nic = &nics[0];
    assert!(nic.attached && nic.driver_ready && nic.link_up, "{nic:?}");
    eprintln!("porthole-vmm after the hostile chains: {nic:?}");
    assert!(nic.malformed >= HOSTILE.len() as u64, "{nic:?}");
    assert!(nic.tx_frames >= 4 && nic.rx_frames >= 3, "{nic:?}");
    let counters = c.request(&Request::Counters).unwrap().counters.unwrap();
    assert_eq!(counters.net_malformed, nic.malformed, "{counters:?}");
    // The guest hangs and sends nothing more; frames to it may still arrive between the two requests.
    assert_eq!((counters.net_tx_frames, counters.net_tx_bytes), (nic.tx_frames, nic.tx_bytes), "{counters:?}");
    assert!(counters.net_rx_frames >= nic.rx_frames && counters.net_rx_bytes >= nic.rx_bytes, "{counters:?}");
    assert_eq!(status.nics.len(), 1, "{status:?}");
    drop(guest);
}

/// A host flood (through a UDP forward) while the guest posts no receive buffers for 1 s: porthole-vmm
/// drops what it cannot deliver and counts it; once buffers are posted frames arrive, and afterwards a UDP
/// round trip works.
#[test]
fn porthole_vmm_drops_and_counts_a_flood_while_the_guest_posts_no_buffers() {
    let echo = Echo::start();
    let flood_port = free_udp_port();
    let dir = Scratch::new("net-vmm-flood");
    let sock = dir.path("control.sock");
    let cmdline = format!("dhcp flood-wait=1000 udp={},100 hang", echo.port);
    let net = format!("user,mac={MAC},fwd=udp:{flood_port}-{flood_port}");
    let guest = vmm_guest(&net, &cmdline, Some(&sock));
    guest.wait_for("NET flood-wait start ms=1000\n");
    let sent = flood(flood_port, || guest.output().contains("NET flood-wait ms="));
    guest.wait_for("NET hang\n");
    let out = guest.output();
    assert_in_order(&out, &["NET flood-wait ms=1000 received=".into(), udp_line(echo.port, 100)]);
    let received = flood_count(&out);
    let mut c = control(&sock);
    let nic = c.request(&Request::Nics).unwrap().nics.unwrap().remove(0);
    let counters = c.request(&Request::Counters).unwrap().counters.unwrap();
    eprintln!("porthole-vmm flood: {sent} datagrams sent, {received} frames received after the wait, {nic:?}");
    assert!(sent > 0 && received > 0, "sent {sent}, received {received}:\n{out}");
    assert!(nic.rx_dropped > 0, "nothing dropped: {nic:?}");
    // Requested after the card's status: what was still queued may have been dropped since.
    assert!(counters.net_dropped >= nic.rx_dropped + nic.tx_dropped, "{counters:?}");
    assert!(nic.rx_frames >= received, "{nic:?}");
    drop(guest);
}

/// A card's rate limit from the guest (`--net user,tx=N`) holds the rate the guest's datagrams reach the
/// host through passt within 10 % over about 20 s (counted after the full bucket's first second), a limit
/// changed live holds the new rate, and the time frames waited is counted. The guest sends as fast as the
/// echoes come back (one datagram at a time), which is faster than either limit.
#[test]
fn porthole_vmm_holds_a_cards_rate_limit_and_takes_a_new_one_live() {
    let echo = TimedEcho::start();
    let dir = Scratch::new("net-vmm-rate");
    let sock = dir.path("control.sock");
    // The least limit there is, 1514 bytes a second: about 1.05 frames of 1442 bytes, so 22 datagrams take
    // some 20 s; then four times that, 24 more.
    const FIRST: usize = 22;
    const SECOND: usize = 24;
    let words = vec![format!("udp={},1400", echo.echo.port); FIRST + SECOND].join(" ");
    let cmdline = format!("dhcp {words} hang");
    let first: u64 = vmm_core::rate_limiter::MIN_NIC_RATE;
    let guest = vmm_guest(&format!("user,mac={MAC},tx={first}"), &cmdline, Some(&sock));
    let mut c = control(&sock);
    wait_until(LIMIT, || echo.arrivals().len() >= FIRST || guest.closed.load(Ordering::Relaxed), || guest.context());
    let second: u64 = 4 * first;
    let limits = vmm_core::rate_limiter::NicLimits { rx_bps: None, tx_bps: Some(second) };
    let reply = c.request(&Request::SetNicLimits { nic: "net0".into(), limits }).unwrap();
    assert_eq!(reply.nics.unwrap()[0].limits, limits);
    guest.wait_for("NET hang\n");
    let arrivals = echo.arrivals();
    assert_eq!(arrivals.len(), FIRST + SECOND, "{}", guest.context());
    // Past the first bucket (a second's worth: 1 frame, DHCP's included) and before the change; after the
    // change (its fresh full bucket: 4 frames) to the end.
    let before = frame_rate(&arrivals, 3, FIRST);
    let after = frame_rate(&arrivals, FIRST + 6, FIRST + SECOND);
    let (want_before, want_after) = (first as f64 / 8.0, second as f64 / 8.0);
    eprintln!(
        "nic tx limit through passt: {before:.0} B/s under {want_before:.0}, then {after:.0} B/s under {want_after:.0}"
    );
    assert!((0.9 * want_before..=1.1 * want_before).contains(&before), "{before:.0} B/s under {want_before:.0}");
    assert!((0.9 * want_after..=1.1 * want_after).contains(&after), "{after:.0} B/s under {want_after:.0}");
    let nic = c.request(&Request::Nics).unwrap().nics.unwrap().remove(0);
    assert!(nic.tx_throttled_us > 10_000_000, "frames waited most of the time: {nic:?}");
    assert_eq!(nic.rx_throttled_us, 0, "nothing waited towards the guest: {nic:?}");
    let bad = vmm_core::rate_limiter::NicLimits { rx_bps: Some(5), tx_bps: None };
    let e = c.request(&Request::SetNicLimits { nic: "net0".into(), limits: bad }).unwrap_err().to_string();
    assert!(e.contains("below"), "{e}");
    drop(guest);
}

/// `--net user,link=down`: the guest sees the link down in the device config; `set-link` brings it up and
/// down and up again, each time with a configuration-change interrupt bit, and the card's status follows.
/// With the link up again, DHCP works and the card's status shows the lease.
#[test]
fn porthole_vmm_link_down_and_up_from_the_control_socket() {
    let host = host_net();
    let dir = Scratch::new("net-vmm-link");
    let sock = dir.path("control.sock");
    let cmdline = "link wait-link wait-link wait-link link dhcp hang";
    let guest = vmm_guest(&format!("user,mac={MAC},link=down"), cmdline, Some(&sock));
    guest.wait_for(&format!("NET dev mac={MAC} mtu=1500 status=0 "));
    let mut c = control(&sock);
    for (n, up) in [(1, true), (2, false), (3, true)] {
        guest.wait_for_n("NET wait-link status=", n);
        let reply = c.request(&Request::SetLink { nic: "net0".into(), up }).unwrap();
        let nic = &reply.nics.unwrap()[0];
        assert_eq!(nic.link_up, up, "{nic:?}");
    }
    guest.wait_for("NET hang\n");
    let out = guest.output();
    assert_in_order(
        &out,
        &[
            "NET link status=0 up=0\n".into(),
            "NET wait-link status=0\n".into(),
            "NET link-changed status=1 up=1 config-irq=1\n".into(),
            "NET wait-link status=1\n".into(),
            "NET link-changed status=0 up=0 config-irq=1\n".into(),
            "NET wait-link status=0\n".into(),
            "NET link-changed status=1 up=1 config-irq=1\n".into(),
            "NET link status=1 up=1\n".into(),
            format!("NET dhcp ack ip={}\n", host.address),
        ],
    );
    let nic = c.request(&Request::Nics).unwrap().nics.unwrap().remove(0);
    assert!(nic.link_up && nic.driver_ready, "{nic:?}");
    assert_eq!(nic.ipv4.as_deref(), Some(host.address.as_str()), "{nic:?}");
    let wrong = c.request(&Request::SetLink { nic: "net7".into(), up: false }).unwrap_err();
    assert!(wrong.to_string().contains("no network card \"net7\""), "{wrong}");
    drop(guest);
}

/// Without a working passt the VM still starts, without that card: the guest finds no virtio-net device,
/// and the card's status says why. `--net none` is no card at all.
#[test]
fn porthole_vmm_starts_without_the_card_when_passt_cannot_run() {
    let dir = Scratch::new("net-vmm-nopasst");
    for (passt, reason) in [(dir.path("no-passt"), "passt is not installed"), ("/bin/false".into(), "passt ended")] {
        let sock = dir.path("control.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(workspace_bin("porthole-vmm"));
        cmd.env("PORTHOLE_PASST", &passt).arg("--kernel").arg(porthole_guests::path("virtio-net"));
        cmd.args(["--memory", "64", "--net", "user", "--cmdline", "dhcp hang"]);
        cmd.arg("--control").arg(format!("unix:{}", sock.display()));
        let guest = Guest::spawn(cmd);
        guest.wait_for("NET hang\n");
        assert!(guest.output().starts_with("NET found=0\nNET no-device\n"), "{}", guest.context());
        let nic = control(&sock).request(&Request::Nics).unwrap().nics.unwrap().remove(0);
        assert!(!nic.attached, "{nic:?}");
        let error = nic.error.clone().unwrap_or_default();
        assert!(error.contains(reason), "{passt:?}: {nic:?}");
    }
    let sock = dir.path("control-none.sock");
    let guest = vmm_guest("none", "hang", Some(&sock));
    guest.wait_for("NET hang\n");
    assert!(guest.output().starts_with("NET found=0\n"), "{}", guest.context());
    let status = control(&sock).request(&Request::Status).unwrap().status.unwrap();
    assert!(status.nics.is_empty(), "{status:?}");
}

/// The same guest on porthole-vmm's bridge back end (a TAP device the VMM creates on a bridge the test
/// creates; needs CAP_NET_ADMIN, skipped with the reason otherwise): with a static address it finds the
/// host's MAC by ARP and UDP datagrams to the host's address on the bridge come back intact from an echo
/// server bound there, also by interrupt-driven receive; the card shows the address it saw.
#[test]
fn the_guest_reaches_the_host_over_a_bridge() {
    let Some(bridge) = TestBridge::create_or_skip("10.213.78.1/24") else { return };
    let socket = UdpSocket::bind("10.213.78.1:0").expect("bind the echo server on the bridge's address");
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let port = socket.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    let dir = Scratch::new("net-vmm-bridge");
    let sock = dir.path("control.sock");
    let cmdline = format!("ip=10.213.78.2,10.213.78.1 arp udp={port},100 udp={port},1400 irq hang");
    let guest = vmm_guest(&format!("bridge:{},mac={MAC}", bridge.name()), &cmdline, Some(&sock));
    guest.wait_for("NET hang\n");
    let nic = control(&sock).request(&Request::Nics).unwrap().nics.unwrap().remove(0);
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    let out = guest.output();
    assert_in_order(
        &out,
        &[
            format!("NET dev mac={MAC} mtu=1500 status=1 features=00018028 mrg=1 qsize=16\n"),
            "NET ip=10.213.78.2 router=10.213.78.1\n".into(),
            "NET arp router=10.213.78.1 mac=".into(),
            udp_line(port, 100),
            udp_line(port, 1400),
            "NET irq interrupted=1 interrupts=".into(),
        ],
    );
    assert!(out.contains(" arp=1\n"), "{}", guest.context());
    assert_eq!(nic.backend, "bridge", "{nic:?}");
    assert_eq!(nic.ipv4.as_deref(), Some("10.213.78.2"), "{nic:?}");
    let tap = nic.tap.clone().expect("the TAP device's name");
    assert!(Path::new(&format!("/sys/class/net/{}/brif/{tap}", bridge.name())).exists(), "{nic:?}");
    drop(guest);
}

//! Network cards' host side: what a VM's NIC is attached to ([`NicConfig`], the `--net` option) and the back
//! ends that carry its Ethernet frames ([`Backend`]): **passt** (user-mode NAT, no privileges: Debian's `passt`
//! spawned on a connected Unix stream socket, frames framed by a 4-byte big-endian length, its QEMU protocol)
//! and **TAP** devices (`tap:NAME`, or a new TAP device attached to a bridge, `bridge:BR`; frames carry a
//! virtio-net header, so checksum and segmentation offloads reach the guest).
//!
//! A [`Nic`] lives as long as the VM (across reboots); the virtio-net device of each boot
//! ([`crate::virtio::net`]) serves it. Everything that needs privileges or new file descriptors (spawning
//! passt, opening `/dev/net/tun`, binding the forwarded ports to check them) happens in [`Nic::open`], before
//! the VMM's seccomp filters forbid it.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;
use crate::rate_limiter::NicLimits;
use crate::virtio::VirtioInterrupt;

/// The largest Ethernet frame a back end carries (without a virtio-net header): a 64 KiB IP packet (what
/// segmentation offloads produce) and its Ethernet header, as passt and QEMU allow.
pub const MAX_FRAME: usize = 65_550;
/// The virtio-net header (virtio 1.x: with `num_buffers`), as the guest and a TAP device with
/// IFF_VNET_HDR see it.
pub const VNET_HEADER_LEN: usize = 12;
/// Most network cards a VM can have.
pub const MAX_NICS: usize = 8;
/// MTUs accepted (IPv4's minimum up to passt's largest).
pub const MIN_MTU: u16 = 68;
pub const MAX_MTU: u16 = 65_520;
/// How a card's `error` starts when its back end failed while the VM ran (a passt that ended, a TAP device
/// removed): what portholed looks for to start a new passt.
pub const BACKEND_FAILED: &str = "the back end failed";
/// How long passt may take to answer the start-up DHCP probe.
const PASST_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a network card cannot be configured (these end the start; a back end that cannot start does not,
/// see [`Nic::open`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    #[error(
        "network card {0:?} is not BACKEND[,id=NAME][,mac=MAC][,mtu=N][,fwd=PROTO:[ADDR:]HOSTPORT-GUESTPORT]…[,link=down] \
         [,rate=BIT/S][,rx=BIT/S][,tx=BIT/S] with BACKEND user, tap:NAME, bridge:BR or none"
    )]
    Spec(String),
    #[error("network back end {0:?} is unknown: use user, tap:NAME, bridge:BR or none")]
    Backend(String),
    #[error("MAC address {0:?} is invalid: six hex bytes, unicast (e.g. 02:00:00:12:34:56)")]
    Mac(String),
    #[error("MTU {0} is out of range ({MIN_MTU}-{MAX_MTU})")]
    Mtu(u32),
    #[error("port forward {0:?} is not PROTO:[ADDR:]HOSTPORT-GUESTPORT with PROTO tcp or udp and ports 1-65535")]
    Forward(String),
    #[error("port forwards need the user back end (the {0} back end has none)")]
    ForwardWithoutUser(&'static str),
    #[error("{protocol} port {port} on {address} is forwarded twice")]
    DuplicateForward { protocol: Protocol, address: IpAddr, port: u16 },
    #[error("{protocol} port {port} on {address} is in use: {reason}")]
    PortInUse { protocol: Protocol, address: IpAddr, port: u16, reason: String },
    #[error("two network cards are called {0:?}")]
    DuplicateId(String),
    #[error("{0} network cards asked for; at most {MAX_NICS} are supported")]
    TooMany(usize),
    #[error("rate limit: {0}")]
    Limits(String),
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable, locally administered unicast address for NIC `index` of the VM called `vm_name` (FNV-1a of
    /// both; prefix 02).
    pub fn derived(vm_name: &str, index: usize) -> MacAddr {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in vm_name.bytes().chain((index as u32).to_le_bytes()) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let h = hash.to_le_bytes();
        MacAddr([0x02, h[0], h[1], h[2], h[3], h[4]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl FromStr for MacAddr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(NetError::Mac(s.to_owned()));
        }
        for (byte, part) in mac.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(NetError::Mac(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| NetError::Mac(s.to_owned()))?;
        }
        // Multicast (or broadcast) addresses cannot be a card's own.
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::Mac(s.to_owned()));
        }
        Ok(MacAddr(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A host port forwarded to a guest port (user back end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub protocol: Protocol,
    /// The host address the port is bound on: loopback unless asked.
    pub host_address: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

impl FromStr for PortForward {
    type Err = NetError;

    /// `PROTO:[ADDR:]HOSTPORT-GUESTPORT`, e.g. `tcp:2222-22`, `tcp:0.0.0.0:8080-80`, `udp:[::1]:53-53`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::Forward(s.to_owned());
        let (protocol, rest) = s.split_once(':').ok_or_else(bad)?;
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(bad()),
        };
        let (address, ports) = match rest.rsplit_once(':') {
            Some((address, ports)) => {
                let address = address.trim_start_matches('[').trim_end_matches(']');
                (address.parse::<IpAddr>().map_err(|_| bad())?, ports)
            }
            None => (IpAddr::V4(Ipv4Addr::LOCALHOST), rest),
        };
        let (host, guest) = ports.split_once('-').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        Ok(PortForward { protocol, host_address: address, host_port: port(host)?, guest_port: port(guest)? })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_address {
            IpAddr::V6(a) => write!(f, "{}:[{a}]:{}-{}", self.protocol, self.host_port, self.guest_port),
            IpAddr::V4(a) => write!(f, "{}:{a}:{}-{}", self.protocol, self.host_port, self.guest_port),
        }
    }
}

/// What a network card is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum BackendConfig {
    /// User-mode NAT through passt: no privileges needed.
    User,
    /// The TAP device `name` (created if it does not exist; needs CAP_NET_ADMIN).
    Tap { name: String },
    /// A new TAP device attached to the existing bridge `bridge`, removed with the VM.
    Bridge { bridge: String },
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::User => "user",
            BackendConfig::Tap { .. } => "tap",
            BackendConfig::Bridge { .. } => "bridge",
        }
    }
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

pub(crate) fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// One network card of a VM (a virtio-net device on the PCI bus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Its name in the control socket ("net0", "net1", … by position when not given).
    #[serde(default)]
    pub id: Option<String>,
    pub backend: BackendConfig,
    /// Its MAC address; by default derived from the VM's name and the card's position.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Host ports forwarded to the guest (user back end only).
    #[serde(default)]
    pub forwards: Vec<PortForward>,
    /// Start with the link down (the cable unplugged).
    #[serde(default)]
    pub link_down: bool,
    /// Rate limits each way.
    #[serde(default, skip_serializing_if = "NicLimits::is_none")]
    pub limits: NicLimits,
}

fn default_mtu() -> u16 {
    1500
}

/// Parses a `--net` value: `None` for `none`.
pub fn parse_net(spec: &str) -> Result<Option<NicConfig>, NetError> {
    let mut parts = spec.split(',');
    let backend = parts.next().unwrap_or_default();
    let backend = match backend.split_once(':') {
        None if backend == "none" => {
            return if parts.next().is_none() { Ok(None) } else { Err(NetError::Spec(spec.to_owned())) };
        }
        None if backend == "user" => BackendConfig::User,
        Some(("tap", name)) if valid_ifname(name) => BackendConfig::Tap { name: name.to_owned() },
        Some(("bridge", bridge)) if valid_ifname(bridge) => BackendConfig::Bridge { bridge: bridge.to_owned() },
        _ => return Err(NetError::Backend(backend.to_owned())),
    };
    let mut nic = NicConfig {
        id: None,
        backend,
        mac: None,
        mtu: default_mtu(),
        forwards: Vec::new(),
        link_down: false,
        limits: NicLimits::default(),
    };
    for option in parts {
        match option.split_once('=') {
            Some(("id", id)) if valid_ifname(id) => nic.id = Some(id.to_owned()),
            Some(("mac", mac)) => nic.mac = Some(mac.parse()?),
            Some(("mtu", mtu)) => {
                let mtu: u32 = mtu.parse().map_err(|_| NetError::Spec(spec.to_owned()))?;
                nic.mtu = u16::try_from(mtu).map_err(|_| NetError::Mtu(mtu))?;
            }
            Some(("fwd", forward)) => nic.forwards.push(forward.parse()?),
            Some(("link", "down")) => nic.link_down = true,
            Some(("link", "up")) => nic.link_down = false,
            Some((name @ ("rate" | "rx" | "tx"), value)) => {
                nic.limits.set_named(name, value).map_err(NetError::Limits)?;
            }
            _ => return Err(NetError::Spec(spec.to_owned())),
        }
    }
    nic.validate()?;
    Ok(Some(nic))
}

impl NicConfig {
    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), NetError> {
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(NetError::Mtu(u32::from(self.mtu)));
        }
        self.limits.check().map_err(NetError::Limits)?;
        if !self.forwards.is_empty() && self.backend != BackendConfig::User {
            return Err(NetError::ForwardWithoutUser(self.backend.kind()));
        }
        for (i, f) in self.forwards.iter().enumerate() {
            if self.forwards[..i]
                .iter()
                .any(|g| g.protocol == f.protocol && g.host_port == f.host_port && g.host_address == f.host_address)
            {
                return Err(NetError::DuplicateForward {
                    protocol: f.protocol,
                    address: f.host_address,
                    port: f.host_port,
                });
            }
        }
        Ok(())
    }
}

/// The ids of a configuration's cards: their own, or "net<position>".
pub fn nic_ids(nics: &[NicConfig]) -> Vec<String> {
    nics.iter().enumerate().map(|(i, n)| n.id.clone().unwrap_or_else(|| format!("net{i}"))).collect()
}

/// Checks a whole VM's cards: count, ids, forwards unique across cards.
pub fn validate_nics(nics: &[NicConfig]) -> Result<(), NetError> {
    if nics.len() > MAX_NICS {
        return Err(NetError::TooMany(nics.len()));
    }
    let ids = nic_ids(nics);
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            return Err(NetError::DuplicateId(id.clone()));
        }
    }
    let mut seen: Vec<&PortForward> = Vec::new();
    for n in nics {
        n.validate()?;
        for f in &n.forwards {
            if seen.iter().any(|g| g.protocol == f.protocol && g.host_port == f.host_port) {
                return Err(NetError::DuplicateForward {
                    protocol: f.protocol,
                    address: f.host_address,
                    port: f.host_port,
                });
            }
            seen.push(f);
        }
    }
    Ok(())
}

/// Checks that a forward's host port can be bound now (the moment before passt binds it: passt itself
/// carries on silently when a port is taken).
pub fn check_port_free(f: &PortForward) -> Result<(), NetError> {
    let address = std::net::SocketAddr::new(f.host_address, f.host_port);
    let result = match f.protocol {
        Protocol::Tcp => std::net::TcpListener::bind(address).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(address).map(drop),
    };
    result.map_err(|e| NetError::PortInUse {
        protocol: f.protocol,
        address: f.host_address,
        port: f.host_port,
        reason: e.to_string(),
    })
}

/// A frame source and sink: passt or a TAP device. All calls are non-blocking.
pub trait Backend: Send {
    /// The descriptor to poll for frames to read (and, when [`Backend::wants_write`], room to write).
    fn fd(&self) -> RawFd;
    /// Bytes of virtio-net header that lead each frame in both directions (0: plain Ethernet frames).
    fn header_len(&self) -> usize;
    /// The next frame, if one has arrived; valid until the next call. Errors mean the back end is gone.
    fn recv(&mut self) -> io::Result<Option<&[u8]>>;
    /// Sends one frame (with its header when [`Backend::header_len`] is not 0), or queues it for
    /// [`Backend::flush`]. `Ok(false)`: the back end is full; the frame was not taken, try again once
    /// [`Backend::fd`] is writable.
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;
    /// Bytes accepted but not yet written (queued frames, or a frame cut short by a full socket).
    fn wants_write(&self) -> bool {
        false
    }
    /// Writes what [`Backend::send`] queued, as far as the back end takes it now.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Tells the back end which offloads the guest accepted (`VIRTIO_NET_F_GUEST_*` bits).
    fn set_guest_offloads(&mut self, _csum: bool, _tso4: bool, _tso6: bool, _ecn: bool) {}
    /// Whether the back end carries checksum and segmentation offloads (virtio-net header).
    fn offloads(&self) -> bool {
        self.header_len() != 0
    }
    /// A descriptor with log output to forward (passt's standard error), if any.
    fn log_fd(&self) -> Option<RawFd> {
        None
    }
    /// Reads and logs what [`Backend::log_fd`] has.
    fn drain_log(&mut self) {}
}

/// Most bytes of frames from the guest gathered before they are written to passt (and so the most a
/// full socket leaves waiting).
const PASST_OUT_MAX: usize = 256 << 10;

/// The passt back end: a child `passt` on one end of a Unix stream socket pair (or any peer speaking passt's
/// stream protocol on a connected socket: [`Passt::connected`]).
pub struct Passt {
    socket: UnixStream,
    child: Option<Child>,
    /// passt's standard error, logged as it comes.
    stderr: Option<std::fs::File>,
    nic: String,
    /// Whether dropping the back end shuts the socket down (not once [`Passt::into_parts`] handed it over).
    owns_socket: bool,
    /// Received bytes: frames start at `start`, `end` is where the next read goes.
    inbuf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The rest of a frame a full socket cut short.
    outbuf: Vec<u8>,
}

/// The passt binary: `$PORTHOLE_PASST`, else `passt` on the PATH.
pub fn passt_binary() -> std::path::PathBuf {
    std::env::var_os("PORTHOLE_PASST").map(Into::into).unwrap_or_else(|| "passt".into())
}

/// A port specification for passt's `-t`/`-u`: `[ADDR/]HOSTPORT:GUESTPORT`.
fn passt_port_spec(f: &PortForward) -> String {
    format!("{}/{}:{}", f.host_address, f.host_port, f.guest_port)
}

impl Passt {
    /// Spawns passt for the card `nic` (MAC `mac`) and checks that it answers: a DHCP DISCOVER must get an
    /// OFFER within [`PASST_PROBE_TIMEOUT`]. Returns the back end and the address offered.
    pub fn spawn(nic: &str, mac: MacAddr, mtu: u16, forwards: &[PortForward]) -> Result<(Passt, Ipv4Addr), String> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("cannot create a socket pair for passt: {e}"))?;
        let fd = theirs.as_raw_fd();
        // passt writes frames for the guest without waiting and drops those a full socket refuses (the guest
        // then sees a gap and TCP re-sends): give its end the large buffers passt gives the sockets QEMU
        // connects (it sets none on a socket handed over with --fd).
        grow_socket_buffers(fd);
        let binary = passt_binary();
        let mut command = Command::new(&binary);
        command
            .args(["--foreground", "--quiet", "--stderr", "--one-off", "--fd", &fd.to_string()])
            .args(["--mtu", &mtu.to_string()]);
        for f in forwards {
            command.arg(if f.protocol == Protocol::Tcp { "-t" } else { "-u" }).arg(passt_port_spec(f));
        }
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, which is
        // async-signal-safe; `fd` is open (owned by `theirs`, alive until after spawn).
        unsafe {
            command.pre_exec(move || {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                format!("passt is not installed ({} not found; apt-get install passt)", binary.display())
            }
            _ => format!("cannot start passt ({}): {e}", binary.display()),
        })?;
        drop(theirs);
        let stderr = child.stderr.take().map(|e| std::fs::File::from(OwnedFd::from(e)));
        let mut passt = Passt {
            socket: ours,
            child: Some(child),
            stderr,
            nic: nic.to_owned(),
            owns_socket: true,
            inbuf: vec![0; 2 * (MAX_FRAME + 4)].into_boxed_slice(),
            start: 0,
            end: 0,
            outbuf: Vec::new(),
        };
        match passt.probe(mac) {
            Ok(address) => {
                if let Some(e) = &passt.stderr {
                    set_nonblocking(e.as_raw_fd());
                }
                Ok((passt, address))
            }
            Err(why) => {
                if let Some(child) = passt.child.as_mut() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                let mut said = String::new();
                if let Some(mut e) = passt.stderr.take() {
                    let _ = e.read_to_string(&mut said);
                }
                let said: Vec<&str> = said
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.contains("Changing to nobody") && !l.ends_with("to syslog"))
                    .collect();
                Err(if said.is_empty() { why } else { format!("passt could not start: {}", said.join("; ")) })
            }
        }
    }

    fn probe(&mut self, mac: MacAddr) -> Result<Ipv4Addr, String> {
        const XID: u32 = 0x5054_4831;
        self.socket.set_read_timeout(Some(Duration::from_millis(100))).map_err(|e| e.to_string())?;
        let discover = crate::net::dhcp::discover(mac, XID);
        let mut framed = (discover.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&discover);
        self.socket.write_all(&framed).map_err(|e| format!("passt ended at once ({e})"))?;
        let deadline = Instant::now() + PASST_PROBE_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("passt ended at start ({status})"));
            }
            match self.recv_blocking() {
                Ok(Some(frame)) => {
                    if let Some(offer) = crate::net::dhcp::parse_reply(frame, XID) {
                        self.socket.set_read_timeout(None).map_err(|e| e.to_string())?;
                        self.socket.set_nonblocking(true).map_err(|e| e.to_string())?;
                        return Ok(offer);
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(format!("passt ended at start ({e})")),
            }
        }
        Err(format!("passt did not answer within {} s", PASST_PROBE_TIMEOUT.as_secs()))
    }

    /// One frame, or none when the read timed out (probe only: the socket is blocking then).
    fn recv_blocking(&mut self) -> io::Result<Option<&[u8]>> {
        match self.recv() {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(None),
            other => other,
        }
    }

    /// A back end on a socket already connected to a peer that speaks passt's protocol (a passt started by
    /// someone else, or a test's or benchmark's own peer).
    pub fn connected(socket: UnixStream, nic: &str) -> io::Result<Passt> {
        Passt::connected_with_log(socket, None, nic)
    }

    /// A back end on a connected socket whose passt writes its messages to `log` (the other end of its
    /// standard error): a passt another process started and handed over ([`Passt::into_parts`]).
    pub fn connected_with_log(socket: UnixStream, log: Option<OwnedFd>, nic: &str) -> io::Result<Passt> {
        socket.set_nonblocking(true)?;
        let stderr = log.map(std::fs::File::from);
        if let Some(e) = &stderr {
            set_nonblocking(e.as_raw_fd());
        }
        Ok(Passt {
            socket,
            child: None,
            stderr,
            nic: nic.to_owned(),
            owns_socket: true,
            inbuf: vec![0; 2 * (MAX_FRAME + 4)].into_boxed_slice(),
            start: 0,
            end: 0,
            outbuf: Vec::new(),
        })
    }

    /// The child's process id (0 when passt is not our child).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Hands a passt that answered over to another process: its socket, its standard error and the child
    /// (which the caller reaps). passt keeps running, and ends when the last copy of the socket closes.
    pub fn into_parts(mut self) -> io::Result<(OwnedFd, Option<OwnedFd>, Option<Child>)> {
        let socket = OwnedFd::from(self.socket.try_clone()?);
        self.owns_socket = false;
        let stderr = self.stderr.take().map(OwnedFd::from);
        Ok((socket, stderr, self.child.take()))
    }
}

/// Bytes of socket buffer passt's end of the socket pair gets (what the kernel allows of it).
const PASST_SOCKET_BUFFER: libc::c_int = 4 << 20;

fn grow_socket_buffers(fd: RawFd) {
    for (force, plain) in [(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF), (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)] {
        let size = PASST_SOCKET_BUFFER;
        let set = |option| {
            // SAFETY: setsockopt reads an int from a live local.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ) == 0
            }
        };
        // Beyond net.core.[wr]mem_max only with CAP_NET_ADMIN; else as much as that allows.
        if !set(force) {
            set(plain);
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own; no memory is involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

impl Backend for Passt {
    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn header_len(&self) -> usize {
        0
    }

    fn recv(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            let have = self.end - self.start;
            if have >= 4 {
                let head: [u8; 4] = self.inbuf[self.start..self.start + 4].try_into().unwrap_or_default();
                let len = u32::from_be_bytes(head) as usize;
                if len > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("passt sent a {len}-byte frame (at most {MAX_FRAME})"),
                    ));
                }
                if have >= 4 + len {
                    let at = self.start + 4;
                    self.start += 4 + len;
                    return Ok(Some(&self.inbuf[at..at + len]));
                }
            }
            // Room for a whole frame after `start`, else move what is left to the front.
            if self.inbuf.len() - self.start < MAX_FRAME + 4 {
                self.inbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.socket.read(&mut self.inbuf[self.end..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "passt closed the connection")),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        // Frames are gathered and written together at the end of the device's batch (`flush`): one system
        // call for many small frames.
        if self.outbuf.len() + 4 + frame.len() > PASST_OUT_MAX {
            self.flush()?;
            if self.outbuf.len() + 4 + frame.len() > PASST_OUT_MAX {
                return Ok(false);
            }
        }
        self.outbuf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.outbuf.extend_from_slice(frame);
        Ok(true)
    }

    fn wants_write(&self) -> bool {
        !self.outbuf.is_empty()
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut written = 0;
        let result = loop {
            if written == self.outbuf.len() {
                break Ok(());
            }
            match self.socket.write(&self.outbuf[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.outbuf.drain(..written);
        result
    }

    fn log_fd(&self) -> Option<RawFd> {
        self.stderr.as_ref().map(|e| e.as_raw_fd())
    }

    fn drain_log(&mut self) {
        let Some(stderr) = &mut self.stderr else { return };
        let mut buf = [0u8; 4096];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) => {
                    self.stderr = None;
                    return;
                }
                Ok(n) => {
                    for line in String::from_utf8_lossy(&buf[..n]).lines().filter(|l| !l.trim().is_empty()) {
                        log::info!("{}: passt: {line}", self.nic);
                    }
                }
                Err(_) => return,
            }
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        // passt (--one-off) ends when its socket closes. (No kill or wait here: this runs under the VMM's
        // seccomp filter, and the process reaping the child ends with the VM anyway.)
        if self.owns_socket {
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A TAP device with IFF_VNET_HDR (12-byte headers: virtio 1.x's, so frames pass unchanged).
pub struct Tap {
    file: std::fs::File,
    name: String,
    buf: Box<[u8]>,
}

// Linux's TUN/TAP interface (linux/if_tun.h).
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, b'T' as u32, 202, libc::c_int);
vmm_sys_util::ioctl_iow_nr!(TUNSETOFFLOAD, b'T' as u32, 208, libc::c_uint);
vmm_sys_util::ioctl_iow_nr!(TUNSETVNETHDRSZ, b'T' as u32, 216, libc::c_int);
/// Bridge ioctl (linux/sockios.h).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    /// ifr_flags (a short) or ifr_ifindex (an int), in a union padded to 24 bytes.
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq { name: [0; 16], data: [0; 24] };
        let n = name.len().min(IFNAME_MAX);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }
    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// An AF_INET datagram socket for interface ioctls.
fn ioctl_socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_error("cannot create a socket for interface set-up"));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Tap {
    /// Opens (or creates) the TAP device `name` (a pattern such as `phtap%d` lets the kernel pick the
    /// number), sets it up for virtio-net headers and brings it up.
    pub fn open(name: &str) -> Result<Tap, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
        let mut req = IfReq::new(name);
        req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (repr(C), 40 bytes).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF() as _, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) => {
                    format!("cannot create TAP device {name}: not permitted (needs root or CAP_NET_ADMIN)")
                }
                _ => format!("cannot create TAP device {name}: {e}"),
            });
        }
        let name = req.name();
        let size: libc::c_int = VNET_HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ() as _, &size) } < 0 {
            return Err(last_error(&format!("cannot set {name}'s virtio-net header size")));
        }
        let tap = Tap { file, name, buf: vec![0; MAX_FRAME + VNET_HEADER_LEN].into_boxed_slice() };
        tap.set_offloads(0);
        tap.set_up()?;
        Ok(tap)
    }

    /// A new TAP device attached to `bridge`.
    pub fn open_on_bridge(bridge: &str) -> Result<Tap, String> {
        if !std::path::Path::new("/sys/class/net").join(bridge).join("bridge").exists() {
            return Err(format!("bridge {bridge} does not exist (no /sys/class/net/{bridge}/bridge)"));
        }
        let tap = Tap::open("phtap%d")?;
        let socket = ioctl_socket()?;
        let index = std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", tap.name))
            .ok()
            .and_then(|s| s.trim().parse::<libc::c_int>().ok())
            .ok_or_else(|| format!("cannot find {}'s interface index", tap.name))?;
        let mut req = IfReq::new(bridge);
        req.data[..4].copy_from_slice(&index.to_ne_bytes());
        // SAFETY: SIOCBRADDIF reads an ifreq with ifr_ifindex set.
        if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDIF as _, &mut req) } < 0 {
            return Err(last_error(&format!("cannot attach {} to bridge {bridge}", tap.name)));
        }
        Ok(tap)
    }

    fn set_up(&self) -> Result<(), String> {
        let socket = ioctl_socket()?;
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq's flags.
        unsafe {
            if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) < 0 {
                return Err(last_error(&format!("cannot read {}'s flags", self.name)));
            }
            let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | libc::IFF_UP as i16;
            req.data[..2].copy_from_slice(&flags.to_ne_bytes());
            if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) < 0 {
                return Err(last_error(&format!("cannot bring {} up", self.name)));
            }
        }
        Ok(())
    }

    fn set_offloads(&self, flags: libc::c_uint) {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD() as _, flags as libc::c_ulong) } < 0 {
            log::warn!("{}: cannot set offloads {flags:#x}: {}", self.name, io::Error::last_os_error());
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's file, for handing it to a running VMM ([`Tap::from_handed`] there).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    /// A TAP device that [`Tap::open`] or [`Tap::open_on_bridge`] opened in another process (non-blocking,
    /// virtio-net headers, up), named `name`, its file passed here.
    pub fn from_handed(fd: OwnedFd, name: &str) -> Tap {
        set_nonblocking(fd.as_raw_fd());
        Tap {
            file: std::fs::File::from(fd),
            name: name.to_owned(),
            buf: vec![0; MAX_FRAME + VNET_HEADER_LEN].into_boxed_slice(),
        }
    }
}

impl Backend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn header_len(&self) -> usize {
        VNET_HEADER_LEN
    }

    fn recv(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            match self.file.read(&mut self.buf) {
                Ok(n) if n < VNET_HEADER_LEN => continue,
                Ok(n) => return Ok(Some(&self.buf[..n])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        loop {
            match self.file.write(frame) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A frame the kernel refuses (a bad header from the guest) is the guest's loss, not ours.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }

    fn set_guest_offloads(&mut self, csum: bool, tso4: bool, tso6: bool, ecn: bool) {
        let mut flags = 0;
        if csum {
            flags |= TUN_F_CSUM;
            if tso4 {
                flags |= TUN_F_TSO4;
            }
            if tso6 {
                flags |= TUN_F_TSO6;
            }
            if ecn && (tso4 || tso6) {
                flags |= TUN_F_TSO_ECN;
            }
        }
        self.set_offloads(flags);
    }
}

/// Frame and byte counters of a card (rx: towards the guest; tx: from the guest).
#[derive(Debug, Default)]
pub struct NicStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames for the guest dropped: no receive buffers for too long, link down, driver not ready.
    pub rx_dropped: AtomicU64,
    /// Frames from the guest dropped: link down, back end gone.
    pub tx_dropped: AtomicU64,
    /// Malformed descriptor chains (each put the device into NEEDS_RESET).
    pub malformed: AtomicU64,
    /// Time frames waited for the rate limits, each way, in microseconds.
    pub rx_throttled_us: AtomicU64,
    pub tx_throttled_us: AtomicU64,
}

/// What the control socket reports about a card.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStatus {
    pub id: String,
    /// "user", "tap" or "bridge".
    pub backend: String,
    pub mac: String,
    pub mtu: u16,
    /// Whether the card is on the VM's bus (false: its back end could not start, see `error`).
    pub attached: bool,
    #[serde(default)]
    pub error: Option<String>,
    pub link_up: bool,
    /// The guest's driver has set the device up.
    pub driver_ready: bool,
    /// The TAP device (tap and bridge back ends).
    #[serde(default)]
    pub tap: Option<String>,
    #[serde(default)]
    pub forwards: Vec<PortForward>,
    /// The guest's addresses when known (passt's DHCP lease, or seen on the link).
    #[serde(default)]
    pub ipv4: Option<String>,
    #[serde(default)]
    pub ipv6: Option<String>,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub malformed: u64,
    #[serde(default, skip_serializing_if = "NicLimits::is_none")]
    pub limits: NicLimits,
    #[serde(default)]
    pub rx_throttled_us: u64,
    #[serde(default)]
    pub tx_throttled_us: u64,
}

/// Whom a card tells about a link change: the device serving it in this boot.
pub struct NicListener {
    pub interrupt: Arc<VirtioInterrupt>,
    pub wake: Arc<EventFd>,
}

/// A VM's network card: its configuration, its back end (if it started) and its state.
pub struct Nic {
    pub id: String,
    pub mac: MacAddr,
    pub mtu: u16,
    pub config: NicConfig,
    backend: Mutex<Option<Box<dyn Backend>>>,
    /// Whether the back end offers virtio-net headers (offloads).
    offloads: bool,
    /// Whether the card is on the bus (its back end started).
    attached: bool,
    /// Why the card has no network: its back end did not start, or failed later.
    error: Mutex<Option<String>>,
    /// The TAP device's name (a TAP card's replacement device may get another one).
    tap: Mutex<Option<String>>,
    link_up: AtomicBool,
    pub(crate) driver_ready: AtomicBool,
    ipv4: Mutex<Option<Ipv4Addr>>,
    ipv6: Mutex<Option<Ipv6Addr>>,
    listener: Mutex<Option<NicListener>>,
    pub stats: NicStats,
    /// The rate limits; the serving device's I/O thread keeps the buckets (it alone takes from them) and
    /// reloads these when `limits_generation` moves.
    limits: Mutex<NicLimits>,
    /// Bumps on every change of the limits.
    limits_generation: AtomicU64,
    /// The forwards in effect (the configuration's, until a new passt brings others: [`Nic::replace_backend`]).
    forwards: Mutex<Vec<PortForward>>,
    /// A back end for the serving device's I/O thread to take (`Some(None)`: none, the card disconnected).
    replacement: Mutex<Option<Option<Box<dyn Backend>>>>,
    /// Whether `replacement` holds one not taken yet.
    replacing: AtomicBool,
}

/// How long a back end replacement waits for the card's I/O thread to take it.
const REPLACE_TIMEOUT: Duration = Duration::from_secs(2);

impl Nic {
    /// Opens card `index` of the VM `vm_name`. A forward whose port is taken is an error; a back end that
    /// cannot start is not: the card is then absent from the VM, and says why.
    pub fn open(config: &NicConfig, id: String, vm_name: &str, index: usize) -> Result<Nic, NetError> {
        for f in &config.forwards {
            check_port_free(f)?;
        }
        let mac = config.mac.unwrap_or_else(|| MacAddr::derived(vm_name, index));
        let mut ipv4 = None;
        let mut tap_name = None;
        let opened: Result<Box<dyn Backend>, String> = match &config.backend {
            BackendConfig::User => Passt::spawn(&id, mac, config.mtu, &config.forwards).map(|(p, offered)| {
                log::info!("{id}: passt (pid {}) offers {offered} to the guest", p.pid());
                ipv4 = Some(offered);
                Box::new(p) as Box<dyn Backend>
            }),
            BackendConfig::Tap { name } => Tap::open(name).map(|t| {
                tap_name = Some(t.name().to_owned());
                Box::new(t) as Box<dyn Backend>
            }),
            BackendConfig::Bridge { bridge } => Tap::open_on_bridge(bridge).map(|t| {
                log::info!("{id}: TAP device {} on bridge {bridge}", t.name());
                tap_name = Some(t.name().to_owned());
                Box::new(t) as Box<dyn Backend>
            }),
        };
        let (backend, error) = match opened {
            Ok(b) => (Some(b), None),
            Err(e) => {
                log::warn!("{id}: no network on this card: {e}");
                (None, Some(e))
            }
        };
        Ok(Nic {
            id,
            mac,
            mtu: config.mtu,
            config: config.clone(),
            offloads: backend.as_ref().is_some_and(|b| b.offloads()),
            attached: backend.is_some(),
            backend: Mutex::new(backend),
            error: Mutex::new(error),
            tap: Mutex::new(tap_name),
            link_up: AtomicBool::new(!config.link_down),
            driver_ready: AtomicBool::new(false),
            ipv4: Mutex::new(ipv4),
            ipv6: Mutex::new(None),
            listener: Mutex::new(None),
            stats: NicStats::default(),
            limits: Mutex::new(NicLimits::default()),
            limits_generation: AtomicU64::new(0),
            forwards: Mutex::new(config.forwards.clone()),
            replacement: Mutex::new(None),
            replacing: AtomicBool::new(false),
        }
        .with_limits(config.limits))
    }

    /// A card on a given back end (tests and benchmarks).
    pub fn with_backend(id: &str, mac: MacAddr, mtu: u16, backend: Box<dyn Backend>) -> Nic {
        Nic {
            id: id.to_owned(),
            mac,
            mtu,
            config: NicConfig {
                id: Some(id.to_owned()),
                backend: BackendConfig::User,
                mac: Some(mac),
                mtu,
                forwards: Vec::new(),
                link_down: false,
                limits: NicLimits::default(),
            },
            offloads: backend.offloads(),
            backend: Mutex::new(Some(backend)),
            attached: true,
            error: Mutex::new(None),
            tap: Mutex::new(None),
            link_up: AtomicBool::new(true),
            driver_ready: AtomicBool::new(false),
            ipv4: Mutex::new(None),
            ipv6: Mutex::new(None),
            listener: Mutex::new(None),
            stats: NicStats::default(),
            limits: Mutex::new(NicLimits::default()),
            limits_generation: AtomicU64::new(0),
            forwards: Mutex::new(Vec::new()),
            replacement: Mutex::new(None),
            replacing: AtomicBool::new(false),
        }
    }

    fn with_limits(self, limits: NicLimits) -> Self {
        self.set_limits(limits);
        self
    }

    /// Replaces the card's rate limits (the new buckets start full); a frame held back by the old ones is
    /// looked at again at once.
    pub fn set_limits(&self, limits: NicLimits) {
        *lock(&self.limits) = limits;
        self.limits_generation.fetch_add(1, Ordering::AcqRel);
        if let Some(l) = lock(&self.listener).as_ref() {
            let _ = l.wake.write(1);
        }
    }

    pub fn limits(&self) -> NicLimits {
        *lock(&self.limits)
    }

    pub(crate) fn limits_generation(&self) -> u64 {
        self.limits_generation.load(Ordering::Acquire)
    }

    /// Whether the card is on the bus (its back end started).
    pub fn attached(&self) -> bool {
        self.attached
    }

    /// Records that the back end failed while the VM ran.
    pub(crate) fn set_failed(&self, why: String) {
        *lock(&self.error) = Some(why);
    }

    pub fn offloads(&self) -> bool {
        self.offloads
    }

    /// The back end, for the device's I/O thread (one boot at a time).
    pub(crate) fn backend(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Backend>>> {
        lock(&self.backend)
    }

    /// Replaces the card's back end while the VM runs: `Some` connects it to a passt started elsewhere (with
    /// the `forwards` that passt opened and the address it offers), `None` disconnects it (the old back end
    /// closes: a passt ends and frees its ports). Frames meanwhile are dropped and counted. Only a card on
    /// the bus with the user (passt) back end can be replaced this way (a TAP card: [`Nic::replace_tap`]).
    /// Returns once the card's I/O thread took it.
    pub fn replace_backend(
        &self,
        backend: Option<Box<dyn Backend>>,
        forwards: Vec<PortForward>,
        address: Option<Ipv4Addr>,
    ) -> Result<(), String> {
        if self.config.backend != BackendConfig::User {
            return Err(format!(
                "network card {:?} is on its {} back end: only a user (passt) back end is replaced",
                self.id,
                self.config.backend.kind()
            ));
        }
        let connecting = backend.is_some();
        self.hand_over(backend)?;
        if connecting {
            *lock(&self.forwards) = forwards;
            *lock(&self.error) = None;
            if address.is_some() {
                *lock(&self.ipv4) = address;
            }
        } else {
            lock(&self.forwards).clear();
            *lock(&self.error) = Some("its back end is being replaced (new port forwards)".into());
        }
        Ok(())
    }

    /// Puts a TAP or bridge card on a new TAP device (opened by the caller, who may: creating one needs
    /// CAP_NET_ADMIN, which the VMM's filters keep it from using after start-up), e.g. after its device was
    /// deleted. Returns once the card's I/O thread took it.
    pub fn replace_tap(&self, tap: Tap) -> Result<(), String> {
        if !matches!(self.config.backend, BackendConfig::Tap { .. } | BackendConfig::Bridge { .. }) {
            return Err(format!(
                "network card {:?} is on its {} back end: only a TAP or bridge card takes a TAP device",
                self.id,
                self.config.backend.kind()
            ));
        }
        let name = tap.name().to_owned();
        self.hand_over(Some(Box::new(tap)))?;
        *lock(&self.tap) = Some(name);
        *lock(&self.error) = None;
        Ok(())
    }

    /// Gives the card's I/O thread a new back end (or none) and waits until it took it.
    fn hand_over(&self, backend: Option<Box<dyn Backend>>) -> Result<(), String> {
        if !self.attached {
            return Err(format!("network card {:?} is not attached to the VM (its back end never started)", self.id));
        }
        *lock(&self.replacement) = Some(backend);
        self.replacing.store(true, Ordering::Release);
        // Between boots no thread serves the card: take it here.
        if let Ok(mut slot) = self.backend.try_lock() {
            self.take_replacement(&mut slot);
        } else if let Some(l) = lock(&self.listener).as_ref() {
            let _ = l.wake.write(1);
        }
        let deadline = Instant::now() + REPLACE_TIMEOUT;
        while self.replacing.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                return Err(format!("network card {:?}: its I/O thread did not take the new back end", self.id));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Whether a replacement of the back end waits to be taken (one atomic load: the I/O thread's check).
    pub(crate) fn replacement_waits(&self) -> bool {
        self.replacing.load(Ordering::Acquire)
    }

    /// Puts a waiting replacement into `slot` (the card's back end, locked by the caller); the old back end
    /// is dropped. Returns whether there was one.
    pub(crate) fn take_replacement(&self, slot: &mut Option<Box<dyn Backend>>) -> bool {
        let Some(new) = lock(&self.replacement).take() else { return false };
        *slot = new;
        self.replacing.store(false, Ordering::Release);
        true
    }

    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    /// Plugs or unplugs the cable: the guest gets a configuration-change interrupt.
    pub fn set_link(&self, up: bool) {
        if self.link_up.swap(up, Ordering::AcqRel) != up
            && let Some(l) = lock(&self.listener).as_ref()
        {
            l.interrupt.signal_config();
            let _ = l.wake.write(1);
        }
    }

    pub(crate) fn set_listener(&self, listener: Option<NicListener>) {
        *lock(&self.listener) = listener;
    }

    /// Learns the guest's addresses from a frame it sent (ARP, IPv4, IPv6 sources with its MAC).
    pub(crate) fn snoop_tx(&self, frame: &[u8]) {
        if frame.len() < 14 || frame[6..12] != self.mac.0 {
            return;
        }
        match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0806 if frame.len() >= 42 && frame[22..28] == self.mac.0 => {
                self.learn_ipv4(Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]))
            }
            0x0800 if frame.len() >= 34 => self.learn_ipv4(Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29])),
            0x86DD if frame.len() >= 54 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&frame[22..38]);
                let a = Ipv6Addr::from(a);
                if a.is_unspecified() || a.is_multicast() {
                    return;
                }
                let mut known = lock(&self.ipv6);
                // A global address wins over a link-local one.
                let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
                if !link_local || known.is_none_or(|k| k.segments()[0] & 0xffc0 == 0xfe80) {
                    *known = Some(a);
                }
            }
            _ => {}
        }
    }

    /// Learns the guest's address from a DHCP ACK sent to it.
    pub(crate) fn snoop_rx(&self, frame: &[u8]) {
        if let Some(address) = dhcp::parse_ack_for(frame, self.mac) {
            self.learn_ipv4(address);
        }
    }

    fn learn_ipv4(&self, a: Ipv4Addr) {
        if !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast() {
            *lock(&self.ipv4) = Some(a);
        }
    }

    pub fn status(&self) -> NicStatus {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        NicStatus {
            id: self.id.clone(),
            backend: self.config.backend.kind().to_owned(),
            mac: self.mac.to_string(),
            mtu: self.mtu,
            attached: self.attached(),
            error: lock(&self.error).clone(),
            link_up: self.link_up(),
            driver_ready: self.driver_ready.load(Ordering::Acquire),
            tap: lock(&self.tap).clone(),
            forwards: if self.attached() { lock(&self.forwards).clone() } else { Vec::new() },
            ipv4: lock(&self.ipv4).map(|a| a.to_string()),
            ipv6: lock(&self.ipv6).map(|a| a.to_string()),
            rx_frames: l(&s.rx_frames),
            rx_bytes: l(&s.rx_bytes),
            tx_frames: l(&s.tx_frames),
            tx_bytes: l(&s.tx_bytes),
            rx_dropped: l(&s.rx_dropped),
            tx_dropped: l(&s.tx_dropped),
            malformed: l(&s.malformed),
            limits: self.limits(),
            rx_throttled_us: l(&s.rx_throttled_us),
            tx_throttled_us: l(&s.tx_throttled_us),
        }
    }
}

/// The few DHCP (RFC 2131) messages the engine reads or writes: the probe that checks passt answers, and
/// the ACKs that tell the guest's address.
pub mod dhcp {
    use std::net::Ipv4Addr;

    use super::MacAddr;

    const MAGIC: [u8; 4] = [0x63, 0x82, 0x53, 0x63];
    /// Ethernet (14) + IPv4 (20) + UDP (8): where BOOTP starts in the frames we write and accept.
    const BOOTP: usize = 42;

    fn ip_checksum(header: &[u8]) -> u16 {
        let mut sum: u32 =
            header.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A broadcast DHCPDISCOVER from `mac` (an Ethernet frame).
    pub fn discover(mac: MacAddr, xid: u32) -> Vec<u8> {
        let mut bootp = vec![0u8; 240];
        bootp[0] = 1; // BOOTREQUEST
        bootp[1] = 1; // Ethernet
        bootp[2] = 6;
        bootp[4..8].copy_from_slice(&xid.to_be_bytes());
        bootp[10] = 0x80; // broadcast reply
        bootp[28..34].copy_from_slice(&mac.0);
        bootp[236..240].copy_from_slice(&MAGIC);
        bootp.extend_from_slice(&[53, 1, 1, 55, 3, 1, 3, 6, 255]);
        let udp_len = 8 + bootp.len();
        let mut frame = Vec::with_capacity(BOOTP + bootp.len());
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&mac.0);
        frame.extend_from_slice(&[0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[16..20].copy_from_slice(&[255; 4]);
        let sum = ip_checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&68u16.to_be_bytes());
        frame.extend_from_slice(&67u16.to_be_bytes());
        frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]); // no UDP checksum
        frame.extend_from_slice(&bootp);
        frame
    }

    /// A BOOTREPLY in `frame` (IPv4/UDP 67→68, no IP options): its transaction id, client MAC, `yiaddr`
    /// and DHCP message type.
    fn reply(frame: &[u8]) -> Option<(u32, [u8; 6], Ipv4Addr, u8)> {
        if frame.len() < BOOTP + 240
            || frame[12..14] != [0x08, 0x00]
            || frame[14] != 0x45
            || frame[23] != 17
            || frame[34..36] != 67u16.to_be_bytes()
            || frame[36..38] != 68u16.to_be_bytes()
        {
            return None;
        }
        let b = &frame[BOOTP..];
        if b[0] != 2 || b[236..240] != MAGIC {
            return None;
        }
        let xid = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&b[28..34]);
        let yiaddr = Ipv4Addr::new(b[16], b[17], b[18], b[19]);
        // Options: find the message type (53); the walk is bounded by the frame.
        let mut options = &b[240..];
        let mut kind = 0;
        while let [code, rest @ ..] = options {
            match code {
                0 => options = rest,
                255 => break,
                _ => {
                    let [len, rest @ ..] = rest else { break };
                    let len = usize::from(*len);
                    if rest.len() < len {
                        break;
                    }
                    if *code == 53 && len == 1 {
                        kind = rest[0];
                    }
                    options = &rest[len..];
                }
            }
        }
        Some((xid, chaddr, yiaddr, kind))
    }

    /// The address offered in an OFFER answering transaction `xid`.
    pub fn parse_reply(frame: &[u8], xid: u32) -> Option<Ipv4Addr> {
        reply(frame).filter(|r| r.0 == xid && r.3 == 2).map(|r| r.2)
    }

    /// The address an ACK gives the card `mac`.
    pub fn parse_ack_for(frame: &[u8], mac: MacAddr) -> Option<Ipv4Addr> {
        reply(frame).filter(|r| r.1 == mac.0 && r.3 == 5).map(|r| r.2)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_discover_is_a_valid_frame_with_a_correct_ip_checksum() {
            let mac = MacAddr([2, 1, 2, 3, 4, 5]);
            let f = discover(mac, 7);
            assert_eq!(&f[6..12], &mac.0);
            assert_eq!(ip_checksum(&f[14..34]), 0);
            assert_eq!(reply(&f), None, "a request is not a reply");
        }

        #[test]
        fn replies_are_parsed_and_truncated_ones_refused() {
            let mac = MacAddr([2, 1, 2, 3, 4, 5]);
            let mut f = discover(mac, 9);
            f[34..36].copy_from_slice(&67u16.to_be_bytes());
            f[36..38].copy_from_slice(&68u16.to_be_bytes());
            f[BOOTP] = 2;
            f[BOOTP + 16..BOOTP + 20].copy_from_slice(&[10, 0, 2, 15]);
            let options = BOOTP + 240;
            f[options + 2] = 2; // OFFER
            assert_eq!(parse_reply(&f, 9), Some(Ipv4Addr::new(10, 0, 2, 15)));
            assert_eq!(parse_reply(&f, 8), None);
            assert_eq!(parse_ack_for(&f, mac), None);
            f[options + 2] = 5; // ACK
            assert_eq!(parse_ack_for(&f, mac), Some(Ipv4Addr::new(10, 0, 2, 15)));
            for len in 0..f.len() {
                let _ = reply(&f[..len]);
            }
            // An option whose length runs past the end.
            let mut g = f.clone();
            g.truncate(options + 1);
            g.extend_from_slice(&[53, 200]);
            assert_eq!(reply(&g).map(|r| r.3), Some(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_specs_parse() {
        assert_eq!(parse_net("none"), Ok(None));
        let n = parse_net("user").unwrap().unwrap();
        assert_eq!((n.backend, n.mtu, n.forwards.len(), n.link_down), (BackendConfig::User, 1500, 0, false));
        let n =
            parse_net("user,id=lan,mac=02:00:00:aa:bb:cc,mtu=9000,fwd=tcp:2222-22,fwd=udp:0.0.0.0:5353-53,link=down")
                .unwrap()
                .unwrap();
        assert_eq!(n.id.as_deref(), Some("lan"));
        assert_eq!(n.mac, Some(MacAddr([2, 0, 0, 0xaa, 0xbb, 0xcc])));
        assert_eq!(n.mtu, 9000);
        assert!(n.link_down);
        assert_eq!(n.forwards[0].to_string(), "tcp:127.0.0.1:2222-22");
        assert_eq!(n.forwards[1].to_string(), "udp:0.0.0.0:5353-53");
        assert_eq!("tcp:[::1]:80-8080".parse::<PortForward>().unwrap().to_string(), "tcp:[::1]:80-8080");
        assert_eq!(parse_net("tap:tap0").unwrap().unwrap().backend, BackendConfig::Tap { name: "tap0".into() });
        assert_eq!(parse_net("bridge:br0").unwrap().unwrap().backend, BackendConfig::Bridge { bridge: "br0".into() });
    }

    #[test]
    fn bad_net_specs_say_what_is_wrong() {
        assert_eq!(parse_net("slirp"), Err(NetError::Backend("slirp".into())));
        assert_eq!(parse_net("tap:"), Err(NetError::Backend("tap:".into())));
        assert_eq!(parse_net("tap:a/b"), Err(NetError::Backend("tap:a/b".into())));
        assert_eq!(
            parse_net("bridge:averyveryverylongname"),
            Err(NetError::Backend("bridge:averyveryverylongname".into()))
        );
        assert_eq!(parse_net("none,mtu=1500"), Err(NetError::Spec("none,mtu=1500".into())));
        assert_eq!(parse_net("user,mtu=70000"), Err(NetError::Mtu(70000)));
        assert_eq!(parse_net("user,mtu=60"), Err(NetError::Mtu(60)));
        assert_eq!(parse_net("user,mac=01:00:00:00:00:01"), Err(NetError::Mac("01:00:00:00:00:01".into())));
        assert_eq!(parse_net("user,mac=zz"), Err(NetError::Mac("zz".into())));
        assert_eq!(parse_net("user,fwd=sctp:1-2"), Err(NetError::Forward("sctp:1-2".into())));
        assert_eq!(parse_net("user,fwd=tcp:0-22"), Err(NetError::Forward("tcp:0-22".into())));
        assert_eq!(parse_net("user,fwd=tcp:2222"), Err(NetError::Forward("tcp:2222".into())));
        assert_eq!(parse_net("tap:t0,fwd=tcp:2222-22"), Err(NetError::ForwardWithoutUser("tap")));
        assert!(matches!(parse_net("user,fwd=tcp:2222-22,fwd=tcp:2222-23"), Err(NetError::DuplicateForward { .. })));
        assert_eq!(parse_net("user,colour=blue"), Err(NetError::Spec("user,colour=blue".into())));
        let two =
            [parse_net("user,fwd=tcp:2222-22").unwrap().unwrap(), parse_net("user,fwd=tcp:2222-23").unwrap().unwrap()];
        assert!(matches!(validate_nics(&two), Err(NetError::DuplicateForward { .. })));
        let same_id = [parse_net("user,id=a").unwrap().unwrap(), parse_net("user,id=a").unwrap().unwrap()];
        assert_eq!(validate_nics(&same_id), Err(NetError::DuplicateId("a".into())));
    }

    #[test]
    fn derived_macs_are_stable_unicast_and_locally_administered() {
        let a = MacAddr::derived("web", 0);
        assert_eq!(a, MacAddr::derived("web", 0));
        assert_ne!(a, MacAddr::derived("web", 1));
        assert_ne!(a, MacAddr::derived("db", 0));
        assert_eq!(a.0[0], 0x02);
        assert_eq!(a.to_string().parse::<MacAddr>(), Ok(a));
    }

    #[test]
    fn a_forward_to_a_port_in_use_is_refused() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let f: PortForward = format!("tcp:{port}-22").parse().unwrap();
        assert!(matches!(check_port_free(&f), Err(NetError::PortInUse { port: p, .. }) if p == port));
        drop(taken);
        assert_eq!(check_port_free(&f), Ok(()));
    }
}

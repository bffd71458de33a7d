//! VM networking, the daemon's side: network cards of a definition (defaults, validation, MACs, the
//! automatic SSH forward), the `--net` arguments `porthole-vmm` gets, and what the VM process reports about
//! its cards over its control socket (`nics`, `set-link`).

use std::net::IpAddr;
use std::path::Path;

use porthole_api::{
    DEFAULT_MTU, MAX_FORWARDS, MAX_MTU, MAX_NICS, MIN_MTU, NicBackend, NicBackendKind, NicDefinition, NicLimits,
    NicSpec, NicStatus, PortForward, Protocol, SSH_PORTS, is_valid_mac,
};
use vmm_core::control::{ControlClient, ControlError, Request};

/// Tries a forward's host port: Ok if it can be opened now, else why not (see [`probe_port`]).
pub type Probe<'a> = &'a dyn Fn(&PortForward) -> Result<(), String>;

/// Checks of a card against the host: where its interfaces are listed (/sys/class/net), and how ports are
/// tried.
#[derive(Clone, Copy)]
pub struct HostCheck<'a> {
    pub sysfs: &'a Path,
    pub probe: Probe<'a>,
}

/// What the other VMs of this daemon hold: their forwards and MACs, with their names for messages.
#[derive(Debug, Default, Clone)]
pub struct Others {
    pub forwards: Vec<(String, PortForward)>,
    pub macs: Vec<(String, String)>,
}

impl Others {
    /// From other VMs' definitions: (name, cards).
    pub fn of<'a>(vms: impl IntoIterator<Item = (&'a str, &'a [NicDefinition])>) -> Self {
        let mut o = Others::default();
        for (name, nics) in vms {
            for n in nics {
                o.macs.push((name.to_owned(), n.mac.clone()));
                o.forwards.extend(n.forwards.iter().map(|f| (name.to_owned(), f.clone())));
            }
        }
        o
    }
}

/// Whether two forwards need the same host socket: same protocol and port, and the same address or one of
/// them on every address.
pub fn overlaps(a: &PortForward, b: &PortForward) -> bool {
    a.protocol == b.protocol
        && a.host_port == b.host_port
        && (a.host_address == b.host_address || a.host_address.is_unspecified() || b.host_address.is_unspecified())
}

/// "tcp 127.0.0.1:2222 to guest port 22"
pub fn describe(f: &PortForward) -> String {
    let addr = match f.host_address {
        IpAddr::V6(a) => format!("[{a}]"),
        a => a.to_string(),
    };
    format!("{} {addr}:{} to guest port {}", f.protocol, f.host_port, f.guest_port)
}

/// Whether the forward's host port can be opened now (by binding it for a moment); the reason when not.
pub fn probe_port(f: &PortForward) -> Result<(), String> {
    bind_once(f).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("{} port {} on {} is in use by another program", f.protocol, f.host_port, f.host_address)
        }
        std::io::ErrorKind::AddrNotAvailable => format!("{} is not an address of this host", f.host_address),
        std::io::ErrorKind::PermissionDenied => {
            format!("{} port {} needs privileges this daemon does not have", f.protocol, f.host_port)
        }
        _ => format!("{} port {} on {} cannot be opened: {e}", f.protocol, f.host_port, f.host_address),
    })
}

/// Binds the forward's host port and lets it go at once.
fn bind_once(f: &PortForward) -> std::io::Result<()> {
    let addr = std::net::SocketAddr::new(f.host_address, f.host_port);
    match f.protocol {
        Protocol::Tcp => std::net::TcpListener::bind(addr).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind(addr).map(drop),
    }
}

/// Whether a program (a passt still ending, say) holds the forward's host port now.
pub fn port_in_use(f: &PortForward) -> bool {
    bind_once(f).is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
}

/// A new random MAC address: locally administered (`02:` first), unicast, not one in `taken`.
pub fn new_mac(taken: &[(String, String)]) -> String {
    loop {
        let mut b = [0u8; 5];
        getrandom::fill(&mut b).expect("the kernel's random source");
        let mac = format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4]);
        if !taken.iter().any(|(_, m)| m.eq_ignore_ascii_case(&mac)) {
            return mac;
        }
    }
}

/// The first port of 2222-2299 for a forward like `template` (its protocol, address and guest port) that no
/// other VM's forward uses (nor one in `also`) and that can be opened now.
pub fn pick_port(others: &Others, also: &[PortForward], template: &PortForward, probe: Probe<'_>) -> Option<u16> {
    SSH_PORTS.into_iter().find(|&p| {
        let f = PortForward { host_port: p, ..template.clone() };
        !others.forwards.iter().any(|(_, o)| overlaps(o, &f))
            && !also.iter().any(|o| overlaps(o, &f))
            && probe(&f).is_ok()
    })
}

/// A new VM's network: one `user` card with an automatic SSH forward (none if 2222-2299 are all taken).
pub fn default_nics(others: &Others, probe: Probe<'_>) -> Vec<NicDefinition> {
    let ssh = PortForward { automatic: true, ..PortForward::tcp(SSH_PORTS.start().to_owned(), 22) };
    let forwards =
        pick_port(others, &[], &ssh, probe).map(|p| PortForward { host_port: p, ..ssh.clone() }).into_iter().collect();
    vec![NicDefinition {
        id: "net0".into(),
        backend: NicBackend::User,
        mac: new_mac(&others.macs),
        mtu: DEFAULT_MTU,
        forwards,
        limits: NicLimits::default(),
    }]
}

/// Whether `name` can name a host network interface (bridge, TAP): 1-15 bytes, no '/', ',', '=', ':' or
/// white space, not `.` or `..`.
fn is_valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && !b"/,=:".contains(&b))
}

/// Whether the host has a bridge `name` (`<sysfs>/<name>/bridge` exists; `sysfs` is /sys/class/net).
pub fn bridge_exists(sysfs: &Path, name: &str) -> bool {
    is_valid_ifname(name) && sysfs.join(name).join("bridge").is_dir()
}

/// The cards `specs` ask for, with defaults filled in (a card keeps its MAC when the spec names its `id`
/// without a MAC), checked: ids, MACs, MTUs, back ends (a bridge must exist), forwards (only on `user`
/// cards, no two needing the same host port, none that another VM uses, and — for forwards not already in
/// `current` — only ports that can be opened now). `check_host` false skips the checks against the host
/// (bridges, ports), for comparing a request with the current definition.
pub fn build_nics(
    specs: &[NicSpec],
    current: &[NicDefinition],
    others: &Others,
    check_host: Option<HostCheck<'_>>,
) -> Result<Vec<NicDefinition>, String> {
    if specs.len() > MAX_NICS {
        return Err(format!("at most {MAX_NICS} network cards"));
    }
    let mut out: Vec<NicDefinition> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let id = spec.id.clone().unwrap_or_else(|| format!("net{i}"));
        if !(1..=15).contains(&id.len()) || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) {
            return Err(format!("network card id {id:?} is invalid: use 1-15 letters, digits, '-' or '_'"));
        }
        if out.iter().any(|n| n.id == id) {
            return Err(format!("two network cards are called {id:?}"));
        }
        let kept = current.iter().find(|n| n.id == id);
        let mac = match (&spec.mac, kept) {
            (Some(m), _) => m.to_ascii_lowercase(),
            (None, Some(k)) => k.mac.clone(),
            (None, None) => {
                let mut taken = others.macs.clone();
                taken.extend(out.iter().map(|n| (String::new(), n.mac.clone())));
                new_mac(&taken)
            }
        };
        if !is_valid_mac(&mac) {
            return Err(format!(
                "network card {id}: MAC {mac:?} is invalid: use six hex bytes like 02:12:34:56:78:9a (unicast: the \
                 first byte even)"
            ));
        }
        if let Some((vm, _)) = others.macs.iter().find(|(_, m)| m.eq_ignore_ascii_case(&mac)) {
            return Err(format!("network card {id}: MAC {mac} is used by VM {vm:?}"));
        }
        if out.iter().any(|n| n.mac == mac) {
            return Err(format!("network card {id}: MAC {mac} is used by another card of this VM"));
        }
        let mtu = spec.mtu.unwrap_or(DEFAULT_MTU);
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(format!("network card {id}: MTU {mtu} is not in {MIN_MTU}-{MAX_MTU}"));
        }
        match &spec.backend {
            NicBackend::User => {}
            NicBackend::Bridge { bridge } => {
                if !is_valid_ifname(bridge) {
                    return Err(format!("network card {id}: {bridge:?} is not a valid bridge name"));
                }
                if let Some(check) = check_host
                    && !bridge_exists(check.sysfs, bridge)
                {
                    return Err(format!(
                        "network card {id}: this host has no bridge {bridge:?} (see `ip -br link show type bridge`)"
                    ));
                }
            }
            NicBackend::Tap { name } => {
                if !is_valid_ifname(name) {
                    return Err(format!("network card {id}: {name:?} is not a valid TAP device name"));
                }
            }
        }
        if !spec.forwards.is_empty() && spec.backend != NicBackend::User {
            return Err(format!(
                "network card {id}: port forwards need the user (NAT) back end; a bridged or TAP card is reached \
                 directly"
            ));
        }
        if spec.forwards.len() > MAX_FORWARDS {
            return Err(format!("network card {id}: at most {MAX_FORWARDS} port forwards"));
        }
        for (k, f) in spec.forwards.iter().enumerate() {
            if f.host_port == 0 || f.guest_port == 0 {
                return Err(format!("network card {id}: {}: ports are 1-65535", describe(f)));
            }
            if out.iter().flat_map(|n| n.forwards.iter()).chain(&spec.forwards[..k]).any(|g| overlaps(g, f)) {
                return Err(format!(
                    "network card {id}: {} {}: the host port is forwarded twice",
                    f.protocol, f.host_port
                ));
            }
            if let Some((vm, _)) = others.forwards.iter().find(|(_, o)| overlaps(o, f)) {
                return Err(format!(
                    "network card {id}: {} port {} on {} is forwarded by VM {vm:?} already",
                    f.protocol, f.host_port, f.host_address
                ));
            }
            let existing = current.iter().flat_map(|n| n.forwards.iter()).any(|c| c == f);
            if let Some(check) = check_host
                && !existing
            {
                (check.probe)(f).map_err(|e| format!("network card {id}: {e}"))?;
            }
        }
        let limits = spec.limits.or(kept.map(|k| k.limits)).unwrap_or_default();
        if let Some(problem) = limits.problems().first() {
            return Err(format!("network card {id}: {}: {}", problem.field, problem.message));
        }
        out.push(NicDefinition {
            id,
            backend: spec.backend.clone(),
            mac,
            mtu,
            forwards: spec.forwards.clone(),
            limits,
        });
    }
    Ok(out)
}

/// The definition a built card's spec (see [`NicSpec::from`]) stands for: its id and MAC were chosen when
/// it was built; a spec without them (never the case for built cards) gets `netN` and no MAC.
pub fn definition_of(index: usize, spec: &NicSpec) -> NicDefinition {
    NicDefinition {
        id: spec.id.clone().unwrap_or_else(|| format!("net{index}")),
        backend: spec.backend.clone(),
        mac: spec.mac.clone().unwrap_or_default(),
        mtu: spec.mtu.unwrap_or(porthole_api::DEFAULT_MTU),
        forwards: spec.forwards.clone(),
        limits: spec.limits.unwrap_or_default(),
    }
}

/// `porthole-vmm` arguments for the cards: one `--net SPEC` each.
pub fn net_args(nics: &[NicDefinition]) -> Vec<String> {
    let mut args = Vec::new();
    for n in nics {
        let mut spec = match &n.backend {
            NicBackend::User => "user".to_owned(),
            NicBackend::Bridge { bridge } => format!("bridge:{bridge}"),
            NicBackend::Tap { name } => format!("tap:{name}"),
        };
        spec.push_str(&format!(",id={},mac={},mtu={}", n.id, n.mac, n.mtu));
        for f in &n.forwards {
            let addr = match f.host_address {
                IpAddr::V6(a) => format!("[{a}]"),
                a => a.to_string(),
            };
            spec.push_str(&format!(",fwd={}:{addr}:{}-{}", f.protocol, f.host_port, f.guest_port));
        }
        if let Some(rx) = n.limits.rx_bps {
            spec.push_str(&format!(",rx={rx}"));
        }
        if let Some(tx) = n.limits.tx_bps {
            spec.push_str(&format!(",tx={tx}"));
        }
        args.push("--net".to_owned());
        args.push(spec);
    }
    args
}

/// Why a request to the VM process failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The VM process answered with a refusal.
    #[error("{0}")]
    Refused(String),
    #[error("the VM's control socket: {0}")]
    Io(String),
}

impl From<ControlError> for EngineError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Refused(why) => EngineError::Refused(why),
            other => EngineError::Io(other.to_string()),
        }
    }
}

/// A card's state as the API shows it, from the VM process's report.
pub fn api_status(s: vmm_core::net::NicStatus) -> NicStatus {
    NicStatus {
        backend: match s.backend.as_str() {
            "tap" => NicBackendKind::Tap,
            "bridge" => NicBackendKind::Bridge,
            _ => NicBackendKind::User,
        },
        mtu: u32::from(s.mtu),
        forwards: s
            .forwards
            .into_iter()
            .map(|f| PortForward {
                protocol: match f.protocol {
                    vmm_core::net::Protocol::Tcp => Protocol::Tcp,
                    vmm_core::net::Protocol::Udp => Protocol::Udp,
                },
                host_address: f.host_address,
                host_port: f.host_port,
                guest_port: f.guest_port,
                automatic: false,
            })
            .collect(),
        id: s.id,
        mac: s.mac,
        attached: s.attached,
        error: s.error,
        link_up: s.link_up,
        driver_ready: s.driver_ready,
        tap: s.tap,
        ipv4: s.ipv4,
        ipv6: s.ipv6,
        rx_frames: s.rx_frames,
        rx_bytes: s.rx_bytes,
        tx_frames: s.tx_frames,
        limits: porthole_api::NicLimits { rx_bps: s.limits.rx_bps, tx_bps: s.limits.tx_bps },
        rx_throttled_us: s.rx_throttled_us,
        tx_throttled_us: s.tx_throttled_us,
        tx_bytes: s.tx_bytes,
        rx_dropped: s.rx_dropped,
        tx_dropped: s.tx_dropped,
        malformed: s.malformed,
    }
}

/// Plugs card `nic` in or pulls its cable; returns the card's state.
pub fn set_link(control: &Path, nic: &str, up: bool) -> Result<NicStatus, EngineError> {
    let reply = ControlClient::connect(control)?.request(&Request::SetLink { nic: nic.to_owned(), up })?;
    reply
        .nics
        .unwrap_or_default()
        .into_iter()
        .find(|n| n.id == nic)
        .map(api_status)
        .ok_or_else(|| EngineError::Io(format!("the VM process's reply has no card {nic:?}")))
}

/// The engine's form of a forward.
fn engine_forward(f: &PortForward) -> vmm_core::net::PortForward {
    vmm_core::net::PortForward {
        protocol: match f.protocol {
            Protocol::Tcp => vmm_core::net::Protocol::Tcp,
            Protocol::Udp => vmm_core::net::Protocol::Udp,
        },
        host_address: f.host_address,
        host_port: f.host_port,
        guest_port: f.guest_port,
    }
}

/// Whether `new` differs from `old` in the forwards of user cards alone (same cards in the same order,
/// every other field equal), and in at least one: what a running VM takes at once ([`replace_forwards`]).
pub fn only_forwards_differ(old: &[NicDefinition], new: &[NicDefinition]) -> bool {
    let without = |n: &NicDefinition| NicDefinition { forwards: Vec::new(), ..n.clone() };
    old.len() == new.len()
        && old
            .iter()
            .zip(new)
            .all(|(a, b)| without(a) == without(b) && (a.forwards == b.forwards || a.backend == NicBackend::User))
        && old.iter().zip(new).any(|(a, b)| a.forwards != b.forwards)
}

/// How long the ports of a passt that was told to end may take to come free.
const PORTS_FREE_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Gives the running user card `card` (its new definition) of the VM whose control socket is `control` the
/// card's forwards, replacing `old`: passt opens forwards only when it starts, so the card is disconnected
/// from its passt (which ends, freeing its ports), a new passt is started here with the new forwards, and
/// the card is connected to it (the socket passed over the control socket). Connections through the old
/// passt end; the guest keeps its address. When the new passt cannot start, one with the old forwards takes
/// its place and the error says why. Returns the passt running now, for the caller to reap.
pub fn replace_forwards(
    control: &Path,
    card: &NicDefinition,
    old: &[PortForward],
) -> Result<std::process::Child, String> {
    let engine = |e: ControlError| format!("the VM process: {e}");
    let mac: vmm_core::net::MacAddr = card.mac.parse().map_err(|e| format!("card {}: {e}", card.id))?;
    let mtu = u16::try_from(card.mtu).map_err(|_| format!("card {}: MTU {} is too large", card.id, card.mtu))?;
    ControlClient::connect(control)
        .and_then(|mut c| c.request(&Request::DisconnectNic { nic: card.id.clone() }))
        .map_err(engine)?;
    let deadline = std::time::Instant::now() + PORTS_FREE_LIMIT;
    while old.iter().any(|f| probe_port(f).is_err()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let connect = |forwards: &[PortForward]| -> Result<std::process::Child, String> {
        let engine_forwards: Vec<_> = forwards.iter().map(engine_forward).collect();
        let (passt, offered) = vmm_core::net::Passt::spawn(&card.id, mac, mtu, &engine_forwards)?;
        let (socket, log, child) = passt.into_parts().map_err(|e| format!("cannot hand passt over: {e}"))?;
        let mut child = child.ok_or("passt has no process")?;
        use std::os::fd::AsFd;
        let fds: Vec<_> = [Some(&socket), log.as_ref()].into_iter().flatten().map(|f| f.as_fd()).collect();
        let request = Request::ConnectNic {
            nic: card.id.clone(),
            forwards: engine_forwards.clone(),
            address: Some(offered),
            tap: None,
        };
        match ControlClient::connect(control).and_then(|mut c| c.request_passing(&request, &fds)) {
            Ok(_) => Ok(child),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(engine(e))
            }
        }
    };
    match connect(&card.forwards) {
        Ok(child) => Ok(child),
        Err(why) => match connect(old) {
            Ok(child) => {
                reap(child);
                Err(format!("card {}: the new forwards could not open ({why}); it keeps its old ones", card.id))
            }
            Err(again) => Err(format!(
                "card {}: the new forwards could not open ({why}), nor the old ones again ({again}): the card has \
                 no network until the VM starts again",
                card.id
            )),
        },
    }
}

/// Gives a running TAP or bridge card a new TAP device (its own was deleted, say): opened here, where the
/// daemon may create devices (root or CAP_NET_ADMIN), set up as the VMM's own start-up would (on the card's
/// bridge, or under the card's device name), and passed to the VMM. Returns the device's name.
pub fn replace_tap(control: &Path, card: &NicDefinition) -> Result<String, String> {
    let tap = match &card.backend {
        NicBackend::Bridge { bridge } => vmm_core::net::Tap::open_on_bridge(bridge)?,
        NicBackend::Tap { name } => vmm_core::net::Tap::open(name)?,
        NicBackend::User => return Err(format!("card {} is a user (NAT) card, not a TAP card", card.id)),
    };
    let name = tap.name().to_owned();
    let file = tap.into_fd();
    let request =
        Request::ConnectNic { nic: card.id.clone(), forwards: Vec::new(), address: None, tap: Some(name.clone()) };
    use std::os::fd::AsFd;
    ControlClient::connect(control)
        .and_then(|mut c| c.request_passing(&request, &[file.as_fd()]))
        .map_err(|e| format!("the VM process: {e}"))?;
    Ok(name)
}

/// Waits for a passt this daemon started (it ends with its VM) in a thread of its own, so it leaves no
/// zombie.
pub fn reap(mut child: std::process::Child) {
    let spawned = std::thread::Builder::new().name("passt-reaper".into()).spawn(move || {
        let _ = child.wait();
    });
    if let Err(e) = spawned {
        log::warn!("cannot start a thread to reap passt: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(_: &PortForward) -> Result<(), String> {
        Ok(())
    }

    fn user(forwards: Vec<PortForward>) -> NicSpec {
        NicSpec { forwards, ..NicSpec::new(NicBackend::User) }
    }

    #[test]
    fn only_new_forwards_of_user_cards_apply_to_a_running_vm() {
        let card = |backend: NicBackend, forwards: Vec<PortForward>| NicDefinition {
            forwards,
            ..definition_of(0, &NicSpec { mac: Some("02:00:00:00:00:01".into()), ..NicSpec::new(backend) })
        };
        let ssh = PortForward::tcp(2222, 22);
        let web = PortForward::tcp(8080, 80);
        let old = [card(NicBackend::User, vec![ssh.clone()])];
        assert!(only_forwards_differ(&old, &[card(NicBackend::User, vec![ssh.clone(), web.clone()])]));
        assert!(only_forwards_differ(&old, &[card(NicBackend::User, vec![])]));
        // Nothing changed, another MTU, a card more or less, another back end: not (they wait).
        assert!(!only_forwards_differ(&old, &old));
        assert!(!only_forwards_differ(
            &old,
            &[NicDefinition { mtu: 9000, ..card(NicBackend::User, vec![web.clone()]) }]
        ));
        assert!(!only_forwards_differ(&old, &[]));
        assert!(!only_forwards_differ(&old, &[old[0].clone(), old[0].clone()]));
        let bridge = NicBackend::Bridge { bridge: "br0".into() };
        assert!(!only_forwards_differ(&[card(bridge.clone(), vec![])], &[card(bridge, vec![web])]));
    }

    #[test]
    fn the_ssh_port_skips_ports_of_other_vms_and_ports_in_use() {
        let others = Others { forwards: vec![("a".into(), PortForward::tcp(2222, 22))], macs: vec![] };
        let busy = |f: &PortForward| if f.host_port == 2223 { Err("in use".to_owned()) } else { Ok(()) };
        assert_eq!(pick_port(&others, &[], &PortForward::tcp(1, 22), &busy), Some(2224));
        let also = [PortForward::tcp(2224, 80)];
        assert_eq!(pick_port(&others, &also, &PortForward::tcp(1, 22), &busy), Some(2225));
        let nics = default_nics(&others, &busy);
        assert_eq!(nics.len(), 1);
        assert_eq!(nics[0].backend, NicBackend::User);
        assert_eq!(nics[0].forwards, vec![PortForward { automatic: true, ..PortForward::tcp(2224, 22) }]);
        assert!(nics[0].mac.starts_with("02:") && is_valid_mac(&nics[0].mac), "{}", nics[0].mac);
        // Every port taken: the card comes without an SSH forward.
        let all = |_: &PortForward| Err("in use".to_owned());
        assert!(default_nics(&Others::default(), &all)[0].forwards.is_empty());
        // A UDP forward or one on another address does not take the TCP port on 127.0.0.1.
        let udp = PortForward { protocol: Protocol::Udp, ..PortForward::tcp(2222, 22) };
        let elsewhere = PortForward { host_address: "10.0.0.1".parse().unwrap(), ..PortForward::tcp(2222, 22) };
        let everywhere = PortForward { host_address: "0.0.0.0".parse().unwrap(), ..PortForward::tcp(2222, 22) };
        assert!(!overlaps(&udp, &PortForward::tcp(2222, 22)));
        assert!(!overlaps(&elsewhere, &PortForward::tcp(2222, 22)));
        assert!(overlaps(&everywhere, &PortForward::tcp(2222, 80)));
    }

    #[test]
    fn cards_are_checked_and_keep_their_macs() {
        let sysfs = std::env::temp_dir().join(format!("portholed-sysfs-{}", std::process::id()));
        std::fs::create_dir_all(sysfs.join("br0").join("bridge")).unwrap();
        std::fs::create_dir_all(sysfs.join("eth0")).unwrap();
        let host = Some(HostCheck { sysfs: &sysfs, probe: &free });
        let others = Others {
            forwards: vec![("web".into(), PortForward::tcp(8080, 80))],
            macs: vec![("web".into(), "02:00:00:00:00:01".into())],
        };
        let current = build_nics(&[user(vec![PortForward::tcp(2222, 22)])], &[], &others, host).unwrap();
        assert_eq!(current[0].id, "net0");
        // The same card again (by id, no MAC): same MAC.
        let again = build_nics(&[NicSpec { id: Some("net0".into()), ..user(vec![]) }], &current, &others, host);
        assert_eq!(again.unwrap()[0].mac, current[0].mac);
        // Limits: a card keeps its own unless the spec gives some; absurd ones are refused with the field.
        let limited = NicLimits { rx_bps: Some(50_000_000), tx_bps: None };
        let with = build_nics(&[NicSpec { limits: Some(limited), ..user(vec![]) }], &current, &others, host).unwrap();
        assert_eq!(with[0].limits, limited);
        let kept = build_nics(&[NicSpec { id: Some("net0".into()), ..user(vec![]) }], &with, &others, host).unwrap();
        assert_eq!(kept[0].limits, limited, "a spec without limits keeps the card's");
        let tiny = NicSpec { limits: Some(NicLimits { tx_bps: Some(100), rx_bps: None }), ..user(vec![]) };
        let e = build_nics(&[tiny], &current, &others, host).unwrap_err();
        assert!(e.contains("tx_bps") && e.contains("at least 12112"), "{e}");
        let bridge = |b: &str| NicSpec::new(NicBackend::Bridge { bridge: b.into() });
        assert_eq!(build_nics(&[bridge("br0")], &[], &others, host).unwrap()[0].backend.kind(), NicBackendKind::Bridge);
        let refused = |specs: &[NicSpec]| build_nics(specs, &current, &others, host).unwrap_err();
        assert!(refused(&[bridge("br9")]).contains("no bridge \"br9\""));
        assert!(refused(&[bridge("eth0")]).contains("no bridge \"eth0\""), "not a bridge");
        assert!(refused(&[bridge("../x")]).contains("not a valid bridge name"));
        assert!(refused(&[user(vec![PortForward::tcp(8080, 80)])]).contains("forwarded by VM \"web\""));
        assert!(
            refused(&[user(vec![PortForward::tcp(9000, 80), PortForward::tcp(9000, 81)])]).contains("forwarded twice")
        );
        assert!(refused(&[user(vec![PortForward::tcp(0, 80)])]).contains("ports are 1-65535"));
        assert!(refused(&[NicSpec { mtu: Some(40), ..user(vec![]) }]).contains("MTU 40"));
        assert!(refused(&[NicSpec { mac: Some("01:00:00:00:00:01".into()), ..user(vec![]) }]).contains("invalid"));
        assert!(refused(&[NicSpec { mac: Some("02:00:00:00:00:01".into()), ..user(vec![]) }]).contains("used by VM"));
        assert!(refused(&[NicSpec { id: Some("a,b".into()), ..user(vec![]) }]).contains("id \"a,b\""));
        assert!(refused(&[user(vec![]), NicSpec { id: Some("net0".into()), ..user(vec![]) }]).contains("two network"));
        let tap_fwd = NicSpec { forwards: vec![PortForward::tcp(9000, 80)], ..bridge("br0") };
        assert!(refused(&[tap_fwd]).contains("need the user (NAT) back end"));
        // A port that cannot be opened is refused when it is new, not when the card already had it.
        let busy = |f: &PortForward| if f.host_port == 2222 { Err("in use".into()) } else { Ok(()) };
        let busy_host = Some(HostCheck { sysfs: &sysfs, probe: &busy });
        let keep = build_nics(&[NicSpec::from(&current[0])], &current, &others, busy_host).unwrap();
        assert_eq!(keep, current);
        assert!(build_nics(&[user(vec![PortForward::tcp(2222, 22)])], &[], &others, busy_host).is_err());
        std::fs::remove_dir_all(sysfs).unwrap();
    }

    #[test]
    fn cards_become_net_arguments() {
        let nics = vec![
            NicDefinition {
                id: "net0".into(),
                backend: NicBackend::User,
                mac: "02:00:00:00:00:01".into(),
                mtu: 1500,
                forwards: vec![
                    PortForward::tcp(2222, 22),
                    PortForward {
                        protocol: Protocol::Udp,
                        host_address: "0.0.0.0".parse().unwrap(),
                        ..PortForward::tcp(5353, 53)
                    },
                ],
                limits: NicLimits::default(),
            },
            NicDefinition {
                id: "lan".into(),
                backend: NicBackend::Bridge { bridge: "br0".into() },
                mac: "02:00:00:00:00:02".into(),
                mtu: 9000,
                forwards: vec![],
                limits: NicLimits { rx_bps: Some(100_000_000), tx_bps: Some(8_000_000) },
            },
        ];
        assert_eq!(
            net_args(&nics),
            [
                "--net",
                "user,id=net0,mac=02:00:00:00:00:01,mtu=1500,fwd=tcp:127.0.0.1:2222-22,fwd=udp:0.0.0.0:5353-53",
                "--net",
                "bridge:br0,id=lan,mac=02:00:00:00:00:02,mtu=9000,rx=100000000,tx=8000000"
            ]
        );
        assert!(net_args(&[]).is_empty());
        for (i, n) in nics.iter().enumerate() {
            assert_eq!(definition_of(i, &NicSpec::from(n)), *n, "a built card's spec stands for it");
        }
    }

    #[test]
    fn the_vm_process_report_becomes_the_api_form() {
        // The engine's reply, as the control socket sends it.
        let wire = serde_json::json!({"id":"net0","backend":"bridge","mac":"02:8a:00:00:00:01","mtu":9000,
            "attached":false,"error":"no bridge br9","link_up":true,"driver_ready":false,"tap":"ph0",
            "forwards":[{"protocol":"udp","host_address":"0.0.0.0","host_port":5353,"guest_port":53}],
            "ipv4":"192.0.2.2","ipv6":null,"rx_frames":1,"rx_bytes":60,"tx_frames":2,"tx_bytes":120,
            "rx_dropped":3,"tx_dropped":4,"malformed":5});
        let s = api_status(serde_json::from_value(wire).unwrap());
        assert_eq!(
            (s.backend, s.mtu, s.error.as_deref(), s.tap.as_deref()),
            (NicBackendKind::Bridge, 9000, Some("no bridge br9"), Some("ph0"))
        );
        let f = &s.forwards[0];
        assert_eq!(
            (f.protocol, f.host_address.to_string(), f.host_port, f.guest_port),
            (Protocol::Udp, "0.0.0.0".into(), 5353, 53)
        );
        assert_eq!((s.rx_bytes, s.tx_bytes, s.rx_dropped, s.tx_dropped, s.malformed), (60, 120, 3, 4, 5));
        assert_eq!(s.ipv4.as_deref(), Some("192.0.2.2"));
    }

    #[test]
    fn probing_a_port_names_the_conflict() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let e = probe_port(&PortForward::tcp(port, 22)).unwrap_err();
        assert!(e.contains(&format!("tcp port {port} on 127.0.0.1 is in use")), "{e}");
        drop(l);
        let e = probe_port(&PortForward { host_address: "192.0.2.1".parse().unwrap(), ..PortForward::tcp(port, 22) });
        assert!(e.unwrap_err().contains("not an address of this host"));
    }
}

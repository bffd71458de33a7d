//! Networking through portholed: the default network card and its SSH forward, what the daemon refuses (and
//! that a refusal changes nothing), definitions from before networking, and — with a running VM — the cards'
//! state as the VM process reports it, the link switch and what may not change while the VM runs.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use porthole_api::client::Action;
use porthole_api::{Client, CreateVm, NicBackend, NicSpec, PortForward, Protocol, SSH_PORTS, UpdateVm, Vm, VmState};
use porthole_tests::daemon::Daemon;
use porthole_tests::{Scratch, wait_until, workspace_bin};

const LIMIT: Duration = Duration::from_secs(60);

fn guest(name: &str) -> String {
    porthole_guests::path(name).display().to_string()
}

/// A VM that boots micro-guest `kernel` (no disk), with `nics` (None: the default card).
fn vm_request(name: &str, kernel: &str, nics: Option<Vec<NicSpec>>) -> CreateVm {
    CreateVm {
        boot: Some(porthole_api::BootSpec { kernel: guest(kernel), initrd: None, cmdline: String::new() }),
        disk_gib: 0,
        nics,
        ..CreateVm::new(name, 1, 64)
    }
}

/// One raw HTTP request on the daemon's Unix socket (for bodies the typed client cannot send): the status
/// and the body.
fn raw(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "{method} /api/v1{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

fn ssh_port(vm: &Vm) -> u16 {
    assert_eq!(vm.nics.len(), 1, "{vm:?}");
    let f = &vm.nics[0].forwards;
    assert_eq!(f.len(), 1, "{vm:?}");
    assert_eq!((f[0].protocol, f[0].guest_port, f[0].automatic), (Protocol::Tcp, 22, true), "{vm:?}");
    assert_eq!(f[0].host_address.to_string(), "127.0.0.1");
    f[0].host_port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_vms_get_a_nat_card_with_their_own_ssh_port() {
    let dir = Scratch::new("net-default");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let a = c.create_vm(&vm_request("a", "idle", None)).await.unwrap();
    let b = c.create_vm(&vm_request("b", "idle", None)).await.unwrap();
    for vm in [&a, &b] {
        let nic = &vm.nics[0];
        assert_eq!((nic.id.as_str(), &nic.backend, nic.mtu), ("net0", &NicBackend::User, 1500), "{vm:?}");
        assert!(porthole_api::is_valid_mac(&nic.mac) && nic.mac.starts_with("02:"), "locally administered: {vm:?}");
        assert!(SSH_PORTS.contains(&ssh_port(vm)), "{vm:?}");
    }
    assert_ne!(ssh_port(&a), ssh_port(&b), "each VM its own SSH port");
    assert_ne!(a.nics[0].mac, b.nics[0].mac);
    // The definition is stored: the same after a restart of the daemon.
    let mut d = d;
    d.kill9();
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    assert_eq!(c.vm(&a.id).await.unwrap().nics, a.nics);
    // No network, on request.
    let none = c.create_vm(&vm_request("offline", "idle", Some(vec![]))).await.unwrap();
    assert!(none.nics.is_empty(), "{none:?}");
    // A bridge that does not exist is refused, and nothing is created.
    let bridged = vec![NicSpec::new(NicBackend::Bridge { bridge: "nobr0".into() })];
    let e = c.create_vm(&vm_request("bridged", "idle", Some(bridged))).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("no bridge \"nobr0\""), "{e}");
    assert_eq!(c.list_vms().await.unwrap().len(), 3);
    assert_eq!(std::fs::read_dir(d.data.join("vms")).unwrap().count(), 3, "no folder left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_network_changes_change_nothing() {
    let dir = Scratch::new("net-refused");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let a = c.create_vm(&vm_request("a", "idle", None)).await.unwrap();
    let b = c.create_vm(&vm_request("b", "idle", None)).await.unwrap();
    let file = d.data.join("vms").join(&a.id).join("vm.json");
    let stored = std::fs::read(&file).unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().port();
    let with_forwards = |vm: &Vm, extra: Vec<PortForward>| {
        let mut spec = NicSpec::from(&vm.nics[0]);
        spec.forwards.extend(extra);
        UpdateVm { nics: Some(vec![spec]), ..Default::default() }
    };
    let refusals: Vec<(UpdateVm, &str)> = vec![
        (with_forwards(&a, vec![PortForward::tcp(busy, 80)]), "is in use by another program"),
        (with_forwards(&a, vec![PortForward::tcp(ssh_port(&b), 80)]), "forwarded by VM \"b\""),
        (with_forwards(&a, vec![PortForward::tcp(40001, 80), PortForward::tcp(40001, 81)]), "forwarded twice"),
        (with_forwards(&a, vec![PortForward::tcp(ssh_port(&a), 2022)]), "forwarded twice"),
        (
            UpdateVm {
                nics: Some(vec![NicSpec { mac: Some("03:00:00:00:00:01".into()), ..NicSpec::from(&a.nics[0]) }]),
                ..Default::default()
            },
            "MAC \"03:00:00:00:00:01\" is invalid",
        ),
        (
            UpdateVm {
                nics: Some(vec![NicSpec { mtu: Some(65521), ..NicSpec::from(&a.nics[0]) }]),
                ..Default::default()
            },
            "MTU 65521",
        ),
        (
            UpdateVm {
                nics: Some(vec![NicSpec::new(NicBackend::Bridge { bridge: "nobr0".into() })]),
                ..Default::default()
            },
            "no bridge \"nobr0\"",
        ),
    ];
    for (change, why) in refusals {
        let e = c.update_vm(&a.id, &change).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{change:?}: {e}");
        assert!(e.to_string().contains(why), "{change:?}: {e}");
    }
    // An unknown back end, and a forward with an unknown protocol: the body does not parse.
    let path = format!("/vms/{}", a.id);
    let (status, body) = raw(&d.socket(), "PATCH", &path, r#"{"nics":[{"backend":{"type":"vde"}}]}"#);
    assert!(status == 400 && body.contains("unknown variant") && body.contains("vde"), "{status} {body}");
    let sctp =
        r#"{"nics":[{"backend":{"type":"user"},"forwards":[{"protocol":"sctp","host_port":1,"guest_port":1}]}]}"#;
    assert_eq!(raw(&d.socket(), "PATCH", &path, sctp).0, 400);
    assert_eq!(std::fs::read(&file).unwrap(), stored, "the definition is unchanged");
    assert_eq!(c.vm(&a.id).await.unwrap().nics, a.nics);

    // A good change: a UDP forward on all addresses and a bigger MTU; the MAC stays.
    let mut spec = NicSpec::from(&a.nics[0]);
    let dns =
        PortForward { protocol: Protocol::Udp, host_address: "0.0.0.0".parse().unwrap(), ..PortForward::tcp(0, 53) };
    let free = std::net::UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    spec.forwards.push(PortForward { host_port: free, ..dns });
    spec.mtu = Some(9000);
    spec.mac = None;
    let changed = c.update_vm(&a.id, &UpdateVm { nics: Some(vec![spec]), ..Default::default() }).await.unwrap();
    assert_eq!((changed.nics[0].mac.as_str(), changed.nics[0].mtu), (a.nics[0].mac.as_str(), 9000));
    assert_eq!(changed.nics[0].forwards.len(), 2);
    assert_eq!(c.vm(&a.id).await.unwrap().nics, changed.nics);
    // The link of a stopped VM, or of a card it does not have.
    let e = c.set_nic_link(&a.id, "net0", false).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(c.set_nic_link(&a.id, "net7", false).await.unwrap_err().status(), Some(404));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_from_before_networking_get_a_nat_card() {
    let dir = Scratch::new("net-old");
    let mut d = Daemon::start(&dir, false, &[]);
    let vm = d.local().create_vm(&vm_request("old", "idle", None)).await.unwrap();
    d.kill9();
    // The definition as an older daemon wrote it: no `nics`.
    let file = d.data.join("vms").join(&vm.id).join("vm.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("nics");
    std::fs::write(&file, serde_json::to_vec(&json).unwrap()).unwrap();
    let d = Daemon::start(&dir, false, &[]);
    let loaded = d.local().vm(&vm.id).await.unwrap();
    assert!(SSH_PORTS.contains(&ssh_port(&loaded)));
    assert_eq!(loaded.nics[0].backend, NicBackend::User);
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(stored["nics"][0]["mac"], loaded.nics[0].mac.as_str(), "the new card is saved: its MAC stays");
    assert!(d.log_text().contains("given a network card"), "{}", d.log_text());
}

async fn wait_state(c: &Client, id: &str, state: VmState) -> Vm {
    porthole_tests::daemon::wait_state(c, id, state, LIMIT).await
}

/// Needs passt (as the engine's network tests do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_reports_its_cards_and_keeps_its_forwards() {
    let dir = Scratch::new("net-running");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&vm_request("runner", "idle", None)).await.unwrap();
    let manual = c.create_vm(&vm_request("manual", "idle", Some(vec![NicSpec::new(NicBackend::User)]))).await.unwrap();
    // Another program takes the automatic SSH port before the start: the forward moves to a free port.
    let port = ssh_port(&vm);
    // (If another test's VM took it meanwhile, it is taken just the same.)
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).ok();
    let running = c.action(&vm.id, Action::Start).await.unwrap();
    assert_eq!(running.state, VmState::Running, "{running:?}");
    let moved = ssh_port(&running);
    assert_ne!(moved, port);
    assert!(d.log_text().contains("moved automatic port forwards"), "{}", d.log_text());
    // A manual forward whose port is taken: the start is refused with the reason.
    let change = UpdateVm {
        nics: Some(vec![NicSpec { forwards: vec![PortForward::tcp(40123, 8080)], ..NicSpec::from(&manual.nics[0]) }]),
        ..Default::default()
    };
    c.update_vm(&manual.id, &change).await.unwrap();
    let manual_squatter = std::net::TcpListener::bind("127.0.0.1:40123").unwrap();
    let e = c.action(&manual.id, Action::Start).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("tcp port 40123 on 127.0.0.1 is in use"), "{e}");
    assert_eq!(c.vm(&manual.id).await.unwrap().state, VmState::Stopped);
    drop((squatter, manual_squatter));

    // The card as the VM process reports it: attached (passt runs) or the reason it is not.
    let deadline = Instant::now() + LIMIT;
    let details = loop {
        let v = c.vm(&vm.id).await.unwrap();
        if !v.nic_status.is_empty() {
            break v;
        }
        assert!(Instant::now() < deadline, "no card state: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let nic = &details.nic_status[0];
    assert_eq!((nic.id.as_str(), nic.mac.as_str()), ("net0", running.nics[0].mac.as_str()), "{nic:?}");
    assert!(nic.link_up, "{nic:?}");
    // (passt must be installed, as for the engine's network tests.)
    assert!(nic.attached, "passt runs for the card: {nic:?}");
    assert_eq!(nic.forwards.iter().map(|f| f.host_port).collect::<Vec<_>>(), [moved], "{nic:?}");
    // passt holds the forwarded port.
    assert!(std::net::TcpListener::bind(("127.0.0.1", moved)).is_err(), "passt listens on {moved}");
    // The virtual cable: pulled, plugged in again.
    assert!(!c.set_nic_link(&vm.id, "net0", false).await.unwrap().link_up);
    assert!(!c.vm(&vm.id).await.unwrap().nic_status[0].link_up);
    assert!(c.set_nic_link(&vm.id, "net0", true).await.unwrap().link_up);
    assert_eq!(c.set_nic_link(&vm.id, "nope", true).await.unwrap_err().status(), Some(404));
    // New forwards of a running VM apply at once (the card moves to a new passt): the added port opens, and
    // the VM's own bound ports are no obstacle.
    let mut spec = NicSpec::from(&running.nics[0]);
    spec.forwards.push(PortForward::tcp(40124, 80));
    let live = c.update_vm(&vm.id, &UpdateVm { nics: Some(vec![spec]), ..Default::default() }).await.unwrap();
    assert!(live.pending_changes.is_empty(), "{live:?}");
    assert_eq!(live.nics[0].forwards.len(), 2, "{live:?}");
    let nic = c.vm(&vm.id).await.unwrap().nic_status.remove(0);
    let ports: Vec<u16> = nic.forwards.iter().map(|f| f.host_port).collect();
    assert_eq!(ports, [moved, 40124], "{nic:?}");
    assert!(nic.attached && nic.error.is_none(), "{nic:?}");
    for port in [moved, 40124] {
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err(), "the new passt listens on {port}");
    }
    // And taken away again: the port is free at once.
    let back = UpdateVm { nics: Some(vec![NicSpec::from(&running.nics[0])]), ..Default::default() };
    let live = c.update_vm(&vm.id, &back).await.unwrap();
    assert_eq!((live.nics.as_slice(), live.pending_changes.len()), (running.nics.as_slice(), 0));
    assert!(std::net::TcpListener::bind("127.0.0.1:40124").is_ok(), "nothing listens on 40124 any more");
    assert!(std::net::TcpListener::bind(("127.0.0.1", moved)).is_err(), "passt still listens on {moved}");
    // A forward to a port another program holds is refused before anything changes.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut spec = NicSpec::from(&running.nics[0]);
    spec.forwards.push(PortForward::tcp(squatter.local_addr().unwrap().port(), 80));
    let e = c.update_vm(&vm.id, &UpdateVm { nics: Some(vec![spec]), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert_eq!(c.vm(&vm.id).await.unwrap().nic_status[0].forwards.len(), 1);
    // Other changes of a running VM's cards wait for its next start; the same cards again drop them.
    let pending = c.update_vm(&vm.id, &UpdateVm { nics: Some(vec![]), ..Default::default() }).await.unwrap();
    assert_eq!(pending.pending.and_then(|p| p.nics), Some(vec![]), "no card at the next start");
    let same = UpdateVm { nics: Some(vec![NicSpec::from(&running.nics[0])]), ..Default::default() };
    let kept = c.update_vm(&vm.id, &same).await.unwrap();
    assert_eq!((kept.nics, kept.pending_changes), (running.nics.clone(), vec![]));
    // Network samples are part of the stats.
    let deadline = Instant::now() + LIMIT;
    while c.stats(&vm.id, 0, false).await.unwrap().samples.len() < 2 {
        assert!(Instant::now() < deadline, "no stats samples");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.action(&vm.id, Action::Poweroff).await.unwrap();
    let stopped = wait_state(&c, &vm.id, VmState::Stopped).await;
    assert!(stopped.nic_status.is_empty() && stopped.nic_status_error.is_none(), "{stopped:?}");
    // Stopped, the forward change is taken; it applies at the next start.
    let mut spec = NicSpec::from(&running.nics[0]);
    spec.forwards.push(PortForward::tcp(40124, 80));
    let changed = c.update_vm(&vm.id, &UpdateVm { nics: Some(vec![spec]), ..Default::default() }).await.unwrap();
    assert_eq!(changed.nics[0].forwards.len(), 2);
    c.action(&vm.id, Action::Start).await.unwrap();
    let nic = c.vm(&vm.id).await.unwrap().nic_status.remove(0);
    let ports: Vec<u16> = nic.forwards.iter().map(|f| f.host_port).collect();
    assert!(ports.contains(&40124) && ports.len() == 2, "the new forward is in effect: {nic:?}");
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

/// A daemon whose VM engine is `vmm` (a wrapper around the real one).
fn daemon_with_vmm(dir: &Scratch, vmm: &Path) -> Daemon {
    let (data, run, log) = (dir.path("data"), dir.path("run"), dir.path("portholed.log"));
    let child = std::process::Command::new(workspace_bin("portholed"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--runtime-dir")
        .arg(&run)
        .arg("--vmm")
        .arg(vmm)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon { data, run, log, child: Some(child), remote: None };
    wait_until(LIMIT, || d.log_text().contains("local API on"), || format!("daemon log:\n{}", d.log_text()));
    d
}

/// Another program takes the SSH port between the daemon's check and the
/// VM process's own bind (as another daemon's VM starting at the same moment would): the start is tried
/// again, and the VM runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_loses_its_port_to_a_race_is_tried_again() {
    let dir = Scratch::new("net-race");
    // The first VM process holds the forwarded port itself (bound before it execs the engine), so the
    // engine's own check fails; later ones run the engine as it is.
    let wrapper = dir.path("vmm-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/usr/bin/env python3\nimport os, re, socket, sys\nreal = {real:?}\nmarker = {marker:?}\n\
             if not os.path.exists(marker):\n    open(marker, 'w').close()\n\
             \x20   m = re.search(r'fwd=tcp:127\\.0\\.0\\.1:(\\d+)-22', ' '.join(sys.argv))\n\
             \x20   s = socket.socket()\n    try:\n        s.bind(('127.0.0.1', int(m.group(1))))\n\
             \x20       s.listen()\n        os.set_inheritable(s.fileno(), True)\n\
             \x20   except OSError:\n        pass  # taken already: just as good\n\
             os.execv(real, [real] + sys.argv[1:])\n",
            real = workspace_bin("porthole-vmm").display().to_string(),
            marker = dir.path("taken-once").display().to_string(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let d = daemon_with_vmm(&dir, &wrapper);
    let c = d.local();
    let vm = c.create_vm(&vm_request("racer", "idle", None)).await.unwrap();
    let running = c.action(&vm.id, Action::Start).await.unwrap();
    assert_eq!(running.state, VmState::Running, "{running:?}");
    assert!(dir.path("taken-once").exists(), "the first try lost its port");
    let log = d.log_text();
    assert!(log.contains("is in use") && log.contains("trying again"), "{log}");
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

/// Needs passt. The virtio-net micro-guest takes a DHCP lease through the NAT
/// card: the daemon shows the guest's address and driver, and datagrams sent to a UDP forward reach the
/// guest and show in the card's counters and in the network series of the stats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_on_the_nat_card_shows_its_address_and_traffic() {
    let dir = Scratch::new("net-guest");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nic = NicSpec {
        forwards: vec![PortForward { protocol: Protocol::Udp, ..PortForward::tcp(port, 9) }],
        ..NicSpec::new(NicBackend::User)
    };
    let mut req = vm_request("talker", "virtio-net", Some(vec![nic]));
    req.boot.as_mut().unwrap().cmdline = "dhcp hang".into();
    let vm = c.create_vm(&req).await.unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    let deadline = Instant::now() + LIMIT;
    let lease = loop {
        let lines = c.serial(&vm.id, 100).await.unwrap().lines;
        let ack = lines.iter().find_map(|l| l.split("NET dhcp ack ip=").nth(1).map(|ip| ip.trim().to_owned()));
        if let Some(ip) = ack
            && lines.iter().any(|l| l.contains("NET hang"))
        {
            break ip;
        }
        assert!(Instant::now() < deadline, "no lease: {lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let nic = c.vm(&vm.id).await.unwrap().nic_status.remove(0);
    assert!(nic.attached && nic.driver_ready, "{nic:?}");
    assert_eq!(nic.ipv4.as_deref(), Some(lease.as_str()), "{nic:?}");
    assert!(nic.tx_bytes > 0 && nic.rx_bytes > 0, "the DHCP exchange counted: {nic:?}");
    // Datagrams to the forwarded port, until a stats sample shows them arriving.
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        sender.send_to(&[0x42; 200], ("127.0.0.1", port)).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let samples = c.stats(&vm.id, 0, false).await.unwrap().samples;
        if samples.iter().any(|s| s.net_rx_bps > 0.0) {
            assert!(samples.iter().all(|s| s.net_rx_bps >= 0.0 && s.net_tx_bps >= 0.0), "{samples:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no network traffic in the stats: {samples:?}");
    }
    let after = c.vm(&vm.id).await.unwrap().nic_status.remove(0);
    assert!(after.rx_bytes > nic.rx_bytes, "{nic:?} then {after:?}");
    // The forward moves to another host port while the guest runs: datagrams sent there reach the card
    // through the new passt (received, or dropped once the halted guest's buffers are full: counted either
    // way), and the guest keeps its address.
    let moved = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut spec = NicSpec::from(&vm.nics[0]);
    spec.forwards = vec![PortForward { protocol: Protocol::Udp, ..PortForward::tcp(moved, 9) }];
    c.update_vm(&vm.id, &UpdateVm { nics: Some(vec![spec]), ..Default::default() }).await.unwrap();
    let before = c.vm(&vm.id).await.unwrap().nic_status.remove(0);
    assert_eq!(before.forwards.iter().map(|f| f.host_port).collect::<Vec<_>>(), [moved], "{before:?}");
    assert_eq!(before.ipv4.as_deref(), Some(lease.as_str()), "{before:?}");
    let arrived = |n: &porthole_api::NicStatus| n.rx_bytes + n.rx_dropped;
    let deadline = Instant::now() + LIMIT;
    loop {
        sender.send_to(&[0x42; 200], ("127.0.0.1", moved)).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = c.vm(&vm.id).await.unwrap().nic_status.remove(0);
        if arrived(&now) > arrived(&before) {
            break;
        }
        assert!(Instant::now() < deadline, "nothing arrived through the new forward: {before:?} then {now:?}");
    }
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

/// Changing a VM's cards takes the admin role, like every change of its definition; the link switch, like
/// the other run-time controls, the operator role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_changes_need_the_usual_rights() {
    let dir = Scratch::new("net-rights");
    let d = Daemon::start(&dir, true, &[]);
    let vm = d.local().create_vm(&vm_request("guarded", "idle", None)).await.unwrap();
    let change = UpdateVm { nics: Some(vec![]), ..Default::default() };
    for role in ["viewer", "operator"] {
        let c = d.remote(&d.token(role, role, &[]));
        let e = c.update_vm(&vm.id, &change).await.unwrap_err();
        assert_eq!(e.status(), Some(403), "{role}: {e}");
        let e = c.create_vm(&vm_request("more", "idle", Some(vec![]))).await.unwrap_err();
        assert_eq!(e.status(), Some(403), "{role}: {e}");
    }
    let viewer = d.remote(&d.token("v2", "viewer", &[]));
    assert_eq!(viewer.set_nic_link(&vm.id, "net0", false).await.unwrap_err().status(), Some(403));
    // An operator may use the switch (the VM is stopped: 409, past the role check).
    let operator = d.remote(&d.token("o2", "operator", &[]));
    assert_eq!(operator.set_nic_link(&vm.id, "net0", false).await.unwrap_err().status(), Some(409));
    let elsewhere = d.remote(&d.token("other", "admin", &["nothing"]));
    assert_eq!(elsewhere.update_vm(&vm.id, &change).await.unwrap_err().status(), Some(403));
    let admin = d.remote(&d.token("boss", "admin", &[]));
    assert!(admin.update_vm(&vm.id, &change).await.unwrap().nics.is_empty());
    assert_eq!(viewer.vm(&vm.id).await.unwrap().nics, vec![], "viewers see the cards");
}

/// A bridge of the host for a test (no address, no other member), removed when dropped.
struct TestBridge(String);

impl TestBridge {
    fn create() -> Result<TestBridge, String> {
        let name = format!("ptab{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        ip(&["link", "add", &name, "type", "bridge"])?;
        let bridge = TestBridge(name.clone());
        ip(&["link", "set", &name, "up"])?;
        Ok(bridge)
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// A VM on a bridge of the host through the daemon: the definition names the bridge, the running card is a
/// TAP device on it, gone when the VM stops. Needs CAP_NET_ADMIN (skipped with the reason otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_a_host_bridge() {
    let bridge = match TestBridge::create() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("SKIP: cannot create a test bridge ({e}); needs root or CAP_NET_ADMIN");
            return;
        }
    };
    let dir = Scratch::new("net-bridge");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let nics = vec![NicSpec::new(NicBackend::Bridge { bridge: bridge.0.clone() })];
    let vm = c.create_vm(&vm_request("bridged", "idle", Some(nics))).await.unwrap();
    assert_eq!(vm.nics[0].backend, NicBackend::Bridge { bridge: bridge.0.clone() });
    assert!(vm.nics[0].forwards.is_empty());
    c.action(&vm.id, Action::Start).await.unwrap();
    let nic = c.vm(&vm.id).await.unwrap().nic_status.remove(0);
    assert!(nic.attached && nic.backend == porthole_api::NicBackendKind::Bridge, "{nic:?}");
    let tap = nic.tap.clone().expect("the TAP device's name");
    let member = Path::new("/sys/class/net").join(&bridge.0).join("brif").join(&tap);
    assert!(member.exists(), "{tap} is on {}: {nic:?}", bridge.0);
    assert_eq!(nic.mac, vm.nics[0].mac);
    c.action(&vm.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &vm.id, VmState::Stopped).await;
    let deadline = Instant::now() + LIMIT;
    while Path::new("/sys/class/net").join(&tap).exists() {
        assert!(Instant::now() < deadline, "the TAP device {tap} stayed after the VM stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

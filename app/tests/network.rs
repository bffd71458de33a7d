//! The window's networking, driven through its accessibility tree (egui_kittest) against a real `portholed`:
//! the wizard's network choice, and a VM's network section (its card, the SSH command, port forwards added
//! and removed, cards added, edited and removed in the editor, and — once the VM runs — the card's state,
//! what cannot change while it runs, what waits for its next start, and rate limits set live).

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use porthole::PortholeApp;
use porthole_api::{NicBackend, Vm};
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

/// Clicks the first of the buttons labelled `name` (a VM has one in the sidebar and one in the list).
fn select(h: &mut Harness<'static, PortholeApp>, name: &str) {
    wait(h, "the VM in the list", |h| has(h, name));
    h.get_all_by_label(name).next().expect("the VM's button").click();
    h.step();
    h.step();
}

/// Creates a VM named `name` in the wizard, with network `network` (the combo box's text; None: the default).
fn create(h: &mut Harness<'static, PortholeApp>, name: &str, network: Option<&str>, bridge: Option<&str>) {
    click(h, "New VM…");
    type_into(h, "Name", name);
    type_into(h, "Kernel", &porthole_guests::path("idle").display().to_string());
    if let Some(n) = network {
        combo(h, "Network", n);
    }
    if let Some(b) = bridge {
        assert!(disabled(h, "Create"), "a bridge needs its name");
        assert!(has_contains(h, "Name the host's bridge"));
        type_into(h, "Bridge name", b);
    }
    wait(h, "a valid wizard", |h| !disabled(h, "Create"));
    click(h, "Create");
}

fn vm_named(h: &Harness<'static, PortholeApp>, name: &str) -> Option<Vm> {
    h.state().backend.model().hosts.first().and_then(|host| host.vms.iter().find(|v| v.name == name).cloned())
}

#[test]
fn the_wizard_offers_nat_bridge_or_no_network_and_the_details_show_the_card() {
    let dir = Scratch::new("gui-net");
    let d = Daemon::start(&dir, false, &[]);
    let mut h = window(&d.socket(), dir.path("settings.json"), 1200.0, 1000.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 0 VMs"));

    // NAT, the default: one card with an SSH forward.
    create(&mut h, "natvm", None, None);
    wait(&mut h, "the new VM", |h| vm_named(h, "natvm").is_some());
    let vm = vm_named(&h, "natvm").unwrap();
    assert_eq!(vm.nics.len(), 1);
    assert_eq!(vm.nics[0].backend, NicBackend::User);
    let port = vm.nics[0].forwards[0].host_port;
    // A bridge that the host does not have: the daemon's refusal is shown.
    create(&mut h, "bridged", Some("Bridge on the host"), Some("nobr0"));
    wait(&mut h, "the refusal", |h| has_contains(h, "Create bridged failed") && has_contains(h, "no bridge \"nobr0\""));
    // No network.
    create(&mut h, "offline", Some("No network"), None);
    wait(&mut h, "the VM without network", |h| vm_named(h, "offline").is_some());
    assert!(vm_named(&h, "offline").unwrap().nics.is_empty());
    select(&mut h, "offline");
    click(&mut h, "Network");
    wait(&mut h, "its empty network section", |h| has(h, "No network card."));
    // A card added in the editor: NAT, a new MAC from the host.
    assert!(disabled(&h, "Apply network changes"), "nothing changed yet");
    click(&mut h, "Add a card");
    click(&mut h, "Apply network changes");
    wait(&mut h, "the new card", |h| vm_named(h, "offline").is_some_and(|v| v.nics.len() == 1));
    let card = vm_named(&h, "offline").unwrap().nics[0].clone();
    assert_eq!((card.id.as_str(), &card.backend), ("net0", &NicBackend::User));
    // Its MAC and MTU edited: a bad MAC is explained before anything is sent.
    wait(&mut h, "the card in the editor", |h| h.query_by_label("MAC of net0").is_some());
    replace_text(&mut h, "MAC of net0", "03:00:00:00:00:01");
    assert!(has_contains(&h, "six hex bytes") && disabled(&h, "Apply network changes"), "multicast is refused");
    replace_text(&mut h, "MAC of net0", "02:AA:BB:CC:DD:EE");
    replace_text(&mut h, "MTU of net0", "9000");
    click(&mut h, "Apply network changes");
    wait(&mut h, "the edited card", |h| {
        vm_named(h, "offline").is_some_and(|v| v.nics[0].mac == "02:aa:bb:cc:dd:ee" && v.nics[0].mtu == 9000)
    });
    // A bridge the host does not have: the host's refusal is shown, the card stays as it was.
    combo(&mut h, "Back end of net0", "Bridge on the host");
    assert!(disabled(&h, "Apply network changes"), "the bridge needs its name");
    type_into(&mut h, "Bridge of net0", "nobr0");
    click(&mut h, "Apply network changes");
    wait(&mut h, "the refusal", |h| has_contains(h, "no bridge \"nobr0\""));
    assert_eq!(vm_named(&h, "offline").unwrap().nics[0].backend, NicBackend::User);
    click(&mut h, "Undo network changes");
    // Removed again.
    click(&mut h, "Remove card net0");
    click(&mut h, "Apply network changes");
    wait(&mut h, "no card", |h| vm_named(h, "offline").is_some_and(|v| v.nics.is_empty()));

    // The NAT VM's network section: MAC, back end, state, the SSH command.
    select(&mut h, "natvm");
    let ssh = format!("ssh -p {port} user@localhost");
    wait(&mut h, "the SSH command", |h| has(h, &ssh));
    if !has_contains(&h, "MTU 1500") {
        click(&mut h, "Network");
    }
    assert!(has(&h, &vm.nics[0].mac));
    assert!(has_contains(&h, "NAT (user networking, passt), MTU 1500"));
    assert!(has_contains(&h, "not running (the card is set up when the VM starts)"));
    assert!(has(&h, &format!("{port} (automatic)")));
    click(&mut h, "Copy SSH command");
    wait(&mut h, "the copy's notice", |h| has(h, &format!("Copied: {ssh}")));

    // A forward added in the form, then removed.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    type_into(&mut h, "Host port", &free.to_string());
    assert!(disabled(&h, "Add forward"), "the guest port is missing");
    type_into(&mut h, "Guest port", "80");
    assert!(!disabled(&h, "Add forward"));
    click(&mut h, "Add forward");
    let remove = format!("Remove forward tcp {free}");
    wait(&mut h, "the new forward", |h| has(h, &remove));
    let forwards = &vm_named(&h, "natvm").unwrap().nics[0].forwards;
    assert!(forwards.iter().any(|f| f.host_port == free && f.guest_port == 80), "{forwards:?}");
    // A forward the daemon refuses (the port is held by another program): its reason is shown.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().port();
    type_into(&mut h, "Host port", &busy.to_string());
    type_into(&mut h, "Guest port", "81");
    click(&mut h, "Add forward");
    wait(&mut h, "the refusal", |h| has_contains(h, &format!("tcp port {busy} on 127.0.0.1 is in use")));
    click(&mut h, &remove);
    wait(&mut h, "the forward gone", |h| !has(h, &remove));
    assert_eq!(vm_named(&h, "natvm").unwrap().nics[0].forwards.len(), 1, "the SSH forward stays");
    drop(held);
}

/// Needs passt (as the engine's network tests do).
#[test]
fn a_running_vm_shows_its_card_state_and_keeps_its_forwards() {
    let dir = Scratch::new("gui-net-run");
    let d = Daemon::start(&dir, false, &[]);
    let mut h = window(&d.socket(), dir.path("settings.json"), 1200.0, 1000.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 0 VMs"));
    create(&mut h, "runner", None, None);
    wait(&mut h, "the new VM", |h| vm_named(h, "runner").is_some());
    select(&mut h, "runner");
    click(&mut h, "Network");
    click(&mut h, "Start");
    wait(&mut h, "running", |h| has(h, "running"));
    // The card's state as the VM process reports it (passt must be installed).
    wait(&mut h, "the card's state", |h| has_contains(h, "attached, link up") || has_contains(h, "not attached"));
    assert!(!has_contains(&h, "not attached"), "passt runs for the card");
    assert!(has(&h, "Guest address") && has_contains(&h, "frames), out "), "the card's report is shown");
    // Rate limits apply to the running VM at once.
    type_into(&mut h, "download Mbit/s limit of net0", "50");
    click(&mut h, "Limit net0");
    wait(&mut h, "the limit applied", |h| has_contains(h, "at most 50 Mbit/s down"));
    let limits = porthole_api::NicLimits { rx_bps: Some(50_000_000), tx_bps: None };
    assert_eq!(vm_named(&h, "runner").unwrap().nics[0].limits, limits);
    wait(&mut h, "the engine's report", |h| {
        h.state().backend.model().details.as_ref().is_some_and(|(_, _, d)| d.nic_status[0].limits == limits)
    });
    // A forward added while the VM runs opens at once (a new passt), and the section says so.
    assert!(has_contains(&h, "forwards added or removed apply at once"));
    let port = vm_named(&h, "runner").unwrap().nics[0].forwards[0].host_port;
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    type_into(&mut h, "Host port", &free.to_string());
    type_into(&mut h, "Guest port", "8080");
    click(&mut h, "Add forward");
    wait(&mut h, "the forward in effect", |h| {
        h.state().backend.model().details.as_ref().is_some_and(|(_, _, d)| {
            d.pending_changes.is_empty() && d.nic_status[0].forwards.iter().any(|f| f.host_port == free)
        }) && has(h, &format!("Remove forward tcp {free}"))
    });
    assert!(!has_contains(&h, "as they will be at the next start"));
    assert!(std::net::TcpListener::bind(("127.0.0.1", free)).is_err(), "passt listens on {free}");
    click(&mut h, &format!("Remove forward tcp {free}"));
    wait(&mut h, "the forward gone", |h| {
        vm_named(h, "runner").is_some_and(|v| v.pending_changes.is_empty() && v.nics[0].forwards.len() == 1)
            && !has(h, &format!("Remove forward tcp {free}"))
    });
    assert!(std::net::TcpListener::bind(("127.0.0.1", free)).is_ok(), "nothing listens on {free} any more");
    h.get_by_role_and_label(Role::CheckBox, "Cable plugged in").click();
    h.step();
    wait(&mut h, "the link down", |h| has_contains(h, "link down (cable pulled)"));
    // A card edited while the VM runs waits for its next start, and the editor says so.
    replace_text(&mut h, "MTU of net0", "9000");
    click(&mut h, "Apply network changes");
    wait(&mut h, "the pending change", |h| {
        vm_named(h, "runner").is_some_and(|v| v.pending_changes.iter().any(|c| c == "nics"))
    });
    wait(&mut h, "the note", |h| has_contains(h, "wait for the VM's next start"));
    assert_eq!(vm_named(&h, "runner").unwrap().nics[0].mtu, 1500, "the running VM keeps its card");
    click(&mut h, "Force off");
    wait(&mut h, "stopped", |h| has(h, "stopped"));
    assert!(has(&h, &format!("Remove forward tcp {port}")));
    assert!(has_contains(&h, "not running (the card is set up when the VM starts)"));
    assert!(!has(&h, "Guest address") && !has(&h, "Cable plugged in"), "no stale report of the stopped VM");
}

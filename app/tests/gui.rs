//! The window driven through its accessibility tree (egui_kittest), against a real `portholed` running real
//! micro-guests: create a VM in the wizard, start it, open its console and send keys, put an ISO in its drive
//! by dropping it, eject it, delete the VM; and the error paths.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use porthole::PortholeApp;
use porthole::backend::Backend;
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

fn app(socket: &Path, settings: PathBuf) -> Harness<'static, PortholeApp> {
    let backend = Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, porthole::local_host(socket.to_owned()), Some(settings));
    Harness::builder().with_size(egui::vec2(1200.0, 800.0)).build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
}

/// The app with no local host (a plain VNC client).
fn app_without_local_host() -> Harness<'static, PortholeApp> {
    let backend = Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, || Err("no local host in this test".to_owned()), None);
    Harness::builder().with_size(egui::vec2(1200.0, 800.0)).build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
}

/// Steps the UI until `cond` holds.
fn wait(h: &mut Harness<'static, PortholeApp>, what: &str, cond: impl Fn(&Harness<'static, PortholeApp>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        h.step();
        if cond(h) {
            return;
        }
        let notice = h.state().backend.model().notices.last().cloned();
        let vms: Vec<(String, Option<String>, String)> = h
            .state()
            .backend
            .model()
            .hosts
            .iter()
            .flat_map(|host| {
                host.vms.iter().map(|v| (v.name.clone(), v.media.clone(), format!("{:?}", v.state))).collect::<Vec<_>>()
            })
            .collect();
        let present: Vec<&str> = ["Machines", "echo1", "CD/DVD", "Start", "Force off", "Performance", "Serial console"]
            .into_iter()
            .filter(|l| has(h, l))
            .collect();
        assert!(
            Instant::now() < deadline,
            "waiting for {what}; last notice: {notice:?}; VMs: {vms:?}; labels present: {present:?}; selection {:?}",
            h.state().selection()
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn serial_of(d: &Daemon) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(d.run.join("vms")).into_iter().flatten().flatten() {
        out.push_str(&std::fs::read_to_string(e.path().join("serial.log")).unwrap_or_default());
    }
    out
}

#[test]
fn create_start_console_media_and_delete_through_the_window() {
    let dir = Scratch::new("gui-flow");
    let d = Daemon::start(&dir, false, &[]);
    let mut h = app(&d.socket(), dir.path("settings.json"));
    wait(&mut h, "the local host", |h| has(h, "Local — 0 VMs"));
    assert!(has_contains(&h, "No virtual machines on this host yet"));

    // The wizard: inline validation first.
    click(&mut h, "New VM…");
    assert!(has(&h, "New virtual machine"));
    type_into(&mut h, "Name", "bad/name");
    assert!(has_contains(&h, "A name is 1-63 letters"));
    assert!(disabled(&h, "Create"), "Create is disabled while the input is wrong");
    h.get_by_role_and_label(Role::TextInput, "Name").focus();
    h.step();
    for _ in 0.."bad/name".len() {
        h.key_press(egui::Key::Backspace);
        h.step();
    }
    type_into(&mut h, "Name", "echo1");
    let kernel = porthole_guests::path("kbd-echo").display().to_string();
    type_into(&mut h, "Kernel", &kernel);
    wait(&mut h, "a valid wizard", |h| !disabled(h, "Create"));
    click(&mut h, "Create");
    wait(&mut h, "the new VM in the list", |h| has(h, "echo1"));
    assert!(has_contains(&h, "Created echo1"));

    // Select it, start it, open its console.
    click(&mut h, "echo1");
    click(&mut h, "Start");
    wait(&mut h, "running", |h| has(h, "running"));
    wait(&mut h, "the guest's marker", |_| serial_of(&d).contains("PORTHOLE-KBD-READY"));
    // Its performance graphs fill once the daemon has a few samples.
    click(&mut h, "Performance");
    wait(&mut h, "resource samples", |h| has_contains(h, "CPU ") && has_contains(h, "disk read "));
    click(&mut h, "Open console");
    wait(&mut h, "the console's screen", |h| has_contains(h, "click the screen to type"));
    click(&mut h, "Send Ctrl+Alt+Del");
    // kbd-echo prints every scan code it reads: Ctrl, Alt, then E0 53 (Delete), and their releases.
    wait(&mut h, "Ctrl+Alt+Del in the guest", |_| {
        let s = serial_of(&d);
        [
            "PORTHOLE-KEY 1d",
            "PORTHOLE-KEY 38",
            "PORTHOLE-KEY 53",
            "PORTHOLE-KEY d3",
            "PORTHOLE-KEY b8",
            "PORTHOLE-KEY 9d",
        ]
        .iter()
        .all(|k| s.contains(k))
    });
    // The guest's lock lights show in the console's toolbar: all off, then Caps Lock on once it is pressed
    // (here by a second VNC client on the VM's console socket; kbd-echo sets the LED like an OS).
    wait(&mut h, "the lock lights", |h| has(h, "Caps Lock off") && has(h, "Num Lock off"));
    let vm_dir = std::fs::read_dir(d.run.join("vms")).unwrap().flatten().next().unwrap().path();
    let mut other = porthole_api::rfb::RfbClient::connect(&vm_dir.join("vnc.sock"), None).unwrap();
    other.key(0xFFE5, true).unwrap();
    other.key(0xFFE5, false).unwrap();
    wait(&mut h, "Caps Lock lit in the toolbar", |h| has(h, "Caps Lock on") && has(h, "Scroll Lock off"));
    drop(other);

    // Back to the list; drop an ISO on the VM's row: uploaded to the library and put in its drive.
    click(&mut h, "Machines");
    let iso = dir.path("tools.iso");
    std::fs::write(&iso, vec![0x42u8; 64 * 1024]).unwrap();
    h.get_by_label("echo1 screen").hover();
    h.step();
    h.input_mut().dropped_files.push(std::sync::Arc::new(Dropped(iso.clone())));
    wait(&mut h, "the ISO in the drive", |h| has(h, "tools.iso"));
    click(&mut h, "Eject");
    wait(&mut h, "an empty drive", |h| has(h, "empty"));
    // Any other file gets a clear message.
    let text = dir.path("notes.txt");
    std::fs::write(&text, b"hi").unwrap();
    h.input_mut().dropped_files.push(std::sync::Arc::new(Dropped(text)));
    wait(&mut h, "the refusal", |h| has_contains(h, "is not an ISO image"));

    // Force off, delete with confirmation.
    click(&mut h, "Force off");
    wait(&mut h, "stopped", |h| has(h, "stopped"));
    click(&mut h, "Delete…");
    click(&mut h, "Delete VM and disk");
    wait(&mut h, "the VM gone", |h| has_contains(h, "No virtual machines on this host yet"));
}

#[test]
fn errors_name_their_cause() {
    let dir = Scratch::new("gui-errors");
    // No daemon, and none can be started (its program is missing).
    let mut h = {
        let backend = Backend::new(|| {}).unwrap();
        let socket = dir.path("nowhere/portholed.sock");
        let missing = dir.path("no-such/portholed");
        let app = PortholeApp::new(
            backend,
            move || {
                porthole::daemon::ensure_running_with(&missing, &socket, true, None).and_then(|_| {
                    porthole_api::Client::unix(&socket)
                        .map(|c| std::sync::Arc::new(c) as porthole_api::HostHandle)
                        .map_err(|e| e.to_string())
                })
            },
            Some(dir.path("settings.json")),
        );
        Harness::builder()
            .with_size(egui::vec2(1200.0, 800.0))
            .build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
    };
    wait(&mut h, "the local host's error", |h| has_contains(h, "Local — unreachable"));
    assert!(has_contains(&h, "cannot be reached"));

    // A remote host with a viewer token: creating is refused with the daemon's reason.
    let d = Daemon::start(&dir, true, &[]);
    let (address, fingerprint) = d.remote.clone().unwrap();
    let token = d.token("look", "viewer", &[]);
    click(&mut h, "Add host…");
    type_into(&mut h, "Host name", "lab");
    type_into(&mut h, "Address", &address);
    type_into(&mut h, "Token", &token);
    // The fingerprint is fetched from the host and shown for comparison with what portholed printed.
    click(&mut h, "Fetch fingerprint");
    wait(&mut h, "the fetched fingerprint", |h| {
        h.query_by_role_and_label(Role::TextInput, "Certificate fingerprint").and_then(|n| n.value()).as_deref()
            == Some(fingerprint.as_str())
    });
    click(&mut h, "Connect");
    wait(&mut h, "the remote host", |h| has(h, "lab — 0 VMs"));
    let saved = std::fs::read_to_string(dir.path("settings.json")).unwrap();
    assert!(saved.contains(&address), "the host is remembered: {saved}");
    click(&mut h, "lab — 0 VMs");
    click(&mut h, "New VM…");
    type_into(&mut h, "Name", "nope");
    type_into(&mut h, "Kernel", &porthole_guests::path("hello").display().to_string());
    click(&mut h, "Create");
    wait(&mut h, "the refusal", |h| has_contains(h, "Create nope failed") && has_contains(h, "viewer"));
    // Edit the host: a new name (the connection is made again, the settings follow).
    click(&mut h, "Edit host…");
    assert!(has(&h, "Edit host"));
    type_into(&mut h, "Host name", "2");
    click(&mut h, "Connect");
    wait(&mut h, "the renamed host", |h| has(h, "lab2 — 0 VMs") && !has(h, "lab — 0 VMs"));
    let saved = std::fs::read_to_string(dir.path("settings.json")).unwrap();
    assert!(saved.contains("\"lab2\"") && !saved.contains("\"lab\""), "{saved}");

    // A damaged settings file: reported, kept aside, defaults used.
    std::fs::write(dir.path("settings2.json"), b"{ broken").unwrap();
    let h2 = app(&d.socket(), dir.path("settings2.json"));
    let notice = h2.state().backend.model().notices.last().cloned().unwrap();
    assert!(notice.error && notice.text.contains("damaged"), "{notice:?}");
}

/// On a slow link the console asks for JPEG: a many-coloured screen through a link of about 4 Mbit/s (a
/// relay passing the server's bytes 16 KiB every 32 ms) measures the link at its first frame, the console
/// switches to Tight with JPEG at quality 6 and goes on; on the local socket it stays lossless.
#[test]
fn a_console_on_a_slow_link_switches_to_jpeg() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let dir = Scratch::new("gui-slow-link");
    let socket = dir.path("vnc.sock");
    let serial = dir.path("serial.log");
    let _vm = porthole_tests::vnc_vm("fb-pattern", &socket, &serial, &[], "PORTHOLE-FB-PATTERN-READY");
    let wait_for = |console: &porthole::console::Console, what: &str| {
        porthole_tests::wait_until(
            Duration::from_secs(60),
            || console.picture().contains(what),
            || format!("picture {:?}; status {:?}", console.picture(), console.status()),
        );
    };

    let local_socket = socket.clone();
    let local = porthole::console::Console::open(
        "local".into(),
        move || porthole_api::rfb::RfbClient::connect(&local_socket, None).map_err(|e| e.to_string()),
        || {},
    );
    wait_for(&local, "Picture: lossless, chosen for the ");

    let (near, far) = UnixStream::pair().unwrap();
    let server = UnixStream::connect(&socket).unwrap();
    let (mut server_in, mut far_out) = (server.try_clone().unwrap(), far.try_clone().unwrap());
    std::thread::spawn(move || std::io::copy(&mut far_out, &mut server_in));
    let (mut server_out, mut far_in) = (server, far);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match server_out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) if far_in.write_all(&buf[..n]).is_err() => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(32)),
            }
        }
    });
    let slow = porthole::console::Console::open(
        "slow".into(),
        move || porthole_api::rfb::RfbClient::over(near, None).map_err(|e| e.to_string()),
        || {},
    );
    wait_for(&slow, "Picture: JPEG (quality 6)");
    // The server took the new encodings (a SetEncodings mid-session) and the session goes on.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!slow.closed(), "the session ended: {}", slow.status());
    assert!(slow.status().starts_with("Connected to"), "{}", slow.status());
    assert!(local.picture().contains("lossless"), "{}", local.picture());
}

/// Porthole as a plain VNC client: a server with VncAuth; a wrong password is reported, the right one opens
/// the console, and keys typed through it reach the guest.
#[test]
fn a_plain_vnc_console_asks_for_the_password() {
    let dir = Scratch::new("gui-vnc");
    let socket = dir.path("vnc.sock");
    let password = dir.path("password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let serial = dir.path("serial.log");
    let vm = porthole_tests::vnc_vm(
        "kbd-echo",
        &socket,
        &serial,
        &["--vnc-password".as_ref(), password.as_os_str()],
        "PORTHOLE-KBD-READY",
    );
    let mut h = app_without_local_host();
    let target: porthole::app::VncTarget = format!("vnc+unix://{}", socket.display()).parse().unwrap();
    h.state_mut().open_vnc(target, None);
    let prompt =
        |h: &Harness<'static, PortholeApp>| h.query_by_role_and_label(Role::PasswordInput, "Password").is_some();
    wait(&mut h, "the password prompt", |h| has_contains(h, "needs a password") && prompt(h));
    h.get_by_role_and_label(Role::PasswordInput, "Password").focus();
    h.step();
    h.get_by_role_and_label(Role::PasswordInput, "Password").type_text("wrong");
    h.step();
    click(&mut h, "Connect");
    wait(&mut h, "the refusal", |h| has_contains(h, "authentication failed") && prompt(h));
    h.get_by_role_and_label(Role::PasswordInput, "Password").focus();
    h.step();
    for _ in 0.."wrong".len() {
        h.key_press(egui::Key::Backspace);
        h.step();
    }
    h.get_by_role_and_label(Role::PasswordInput, "Password").type_text("s3cret");
    h.step();
    click(&mut h, "Connect");
    wait(&mut h, "the console", |h| has_contains(h, "click the screen to type"));
    // The console moves into a window of its own and back into its tab.
    click(&mut h, "Open in a window");
    wait(&mut h, "the console window", |h| has_contains(h, "is shown in its own window"));
    click(&mut h, "Back to the tab");
    wait(&mut h, "the console back in its tab", |h| !has_contains(h, "is shown in its own window"));
    // Every scaling keeps the screen (and input) working.
    for mode in ["1:1", "Fit (sharp)", "Fit (smooth)"] {
        h.get_by_label_contains("Scale").click();
        h.step();
        h.step();
        h.get_all_by_label(mode).last().expect("the scale menu").click();
        h.step();
        h.step();
        assert!(has(&h, "The VM's screen") || has_contains(&h, "click the screen to type"), "{mode}");
    }
    // Click the screen to give it the keyboard, then type.
    h.get_by_label("The VM's screen").click();
    h.step();
    h.key_press(egui::Key::A);
    h.step();
    let start = Instant::now();
    while !std::fs::read_to_string(&serial).unwrap_or_default().contains("PORTHOLE-KEY 1e") {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", std::fs::read_to_string(&serial).unwrap_or_default());
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(vm);
}

/// First run: with no VMs the window offers the demo VM; it starts, its console opens, and typed keys reach it.
#[test]
fn the_demo_vm_is_one_click_away() {
    let dir = Scratch::new("gui-demo");
    let d = Daemon::start(&dir, false, &[]);
    let mut h = app(&d.socket(), dir.path("settings.json"));
    wait(&mut h, "the local host", |h| has(h, "Local — 0 VMs"));
    click(&mut h, "Create a demo VM");
    wait(&mut h, "the demo's console", |h| has_contains(h, "click the screen to type"));
    wait(&mut h, "the demo's marker", |_| serial_of(&d).contains("PORTHOLE-DEMO-READY"));
    h.get_by_label("The VM's screen").click();
    h.step();
    h.key_press(egui::Key::A);
    wait(&mut h, "the key in the demo", |_| serial_of(&d).contains("PORTHOLE-KEY 1e"));
}

/// A remote host that cannot be reached shows its error and does not hold up the local one.
#[test]
fn an_unreachable_remote_host_does_not_block_the_local_one() {
    let dir = Scratch::new("gui-unreachable");
    let d = Daemon::start(&dir, false, &[]);
    let settings = dir.path("settings.json");
    std::fs::write(
        &settings,
        format!(
            r#"{{"remotes":[{{"name":"gone","address":"127.0.0.1:1","token":"x","fingerprint":"{}"}}]}}"#,
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let mut h = app(&d.socket(), settings);
    wait(&mut h, "both hosts", |h| has(h, "Local — 0 VMs") && has(h, "gone — unreachable"));
    click(&mut h, "gone — unreachable");
    assert!(has_contains(&h, "cannot be reached"));
    click(&mut h, "Local — 0 VMs");
    assert!(has_contains(&h, "No virtual machines on this host yet"));
}

/// The list with several VMs: thumbnails of running ones, grouping by tag and by host, search by tag,
/// multi-select start and force-off, tags edited in the details, typing into the serial console, a library
/// image as a new VM's disk, and an upload cancelled half-way.
#[test]
fn the_list_groups_selects_and_shows_thumbnails() {
    let dir = Scratch::new("gui-list");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    let boot = guest_boot;
    let make = |name: &str, guest: &str, tags: &[&str]| {
        let req = porthole_api::CreateVm {
            boot: boot(guest),
            disk_gib: 0,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..porthole_api::CreateVm::new(name, 1, 64)
        };
        rt.block_on(c.create_vm(&req)).unwrap().id
    };
    let demo = make("show", "demo", &["web"]);
    make("idle1", "idle", &["web", "db"]);
    make("idle2", "idle", &[]);
    let image = dir.path("base.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    rt.block_on(c.upload_image("base.img", &image, |_, _| {})).unwrap();
    rt.block_on(c.action(&demo, porthole_api::client::Action::Start)).unwrap();

    let mut h = app(&d.socket(), dir.path("settings.json"));
    wait(&mut h, "the three VMs", |h| has(h, "Local — 3 VMs"));
    // The running VM's row gets a thumbnail of its screen (640x480 → 128x96).
    wait(&mut h, "a thumbnail", |h| h.state().thumbnail_size(0, &demo) == Some([128, 96]));
    assert!(has(&h, "show screen"));

    // Tick two stopped VMs and start both at once, then force both off.
    click(&mut h, "Select idle1");
    click(&mut h, "Select idle2");
    wait(&mut h, "the selection bar", |h| has(h, "Start selected (2)"));
    click(&mut h, "Start selected (2)");
    let states = |h: &Harness<'static, PortholeApp>| -> Vec<(String, porthole_api::VmState)> {
        h.state().backend.model().hosts[0].vms.iter().map(|v| (v.name.clone(), v.state)).collect()
    };
    let running = |h: &Harness<'static, PortholeApp>, name: &str| {
        states(h).iter().any(|(n, s)| n == name && *s == porthole_api::VmState::Running)
    };
    wait(&mut h, "both started", |h| running(h, "idle1") && running(h, "idle2") && has(h, "Force off selected (2)"));
    click(&mut h, "Force off selected (2)");
    wait(&mut h, "both stopped", |h| !running(h, "idle1") && !running(h, "idle2"));
    click(&mut h, "Clear selection");
    assert!(!has_contains(&h, "selected ("));

    // Group by tag: a VM with two tags is under both; untagged ones together.
    combo(&mut h, "Group by", "tag");
    wait(&mut h, "tag groups", |h| has(h, "web (2)") && has(h, "db (1)") && has(h, "untagged (1)"));
    combo(&mut h, "Group by", "host");
    wait(&mut h, "host groups", |h| has(h, "Local (3)"));
    combo(&mut h, "Group by", "nothing");
    // Search matches tags too.
    type_into(&mut h, "Search", "db");
    wait(&mut h, "the search", |h| has(h, "idle1") && !has(h, "idle2") && !has(h, "show"));
    h.get_by_role_and_label(Role::TextInput, "Search").focus();
    h.step();
    for _ in 0..2 {
        h.key_press(egui::Key::Backspace);
        h.step();
    }

    // The demo's details: a new tag, and a line typed into its serial console (the demo echoes it).
    click(&mut h, "show");
    type_into(&mut h, "Tags", ", blue");
    click(&mut h, "Save tags");
    wait(&mut h, "the new tag", |h| {
        h.state().backend.model().hosts[0].vms.iter().any(|v| v.name == "show" && v.tags == ["blue", "web"])
    });
    click(&mut h, "Serial console");
    type_into(&mut h, "Type into the serial console", "hello from the window");
    click(&mut h, "Send line");
    wait(&mut h, "the echo", |_| serial_of(&d).contains("hello from the window"));
    wait(&mut h, "the echo in the window", |h| has_contains(h, "hello from the window"));

    // An ISO dropped on another VM's row goes into that VM's drive (not the selected one's).
    let row_iso = dir.path("row.iso");
    std::fs::write(&row_iso, vec![0x33u8; 256 * 1024]).unwrap();
    h.get_by_label("idle2 screen").hover();
    h.step();
    h.input_mut().dropped_files.push(std::sync::Arc::new(Dropped(row_iso)));
    let media_of = |h: &Harness<'static, PortholeApp>, name: &str| {
        h.state().backend.model().hosts[0].vms.iter().find(|v| v.name == name).and_then(|v| v.media.clone())
    };
    wait(&mut h, "the ISO in idle2's drive", |h| media_of(h, "idle2").as_deref() == Some("row.iso"));
    assert_eq!(media_of(&h, "show"), None, "the selected VM's drive is untouched");
    // Dropped away from every VM (here on the hosts panel): the wizard opens with it.
    let new_iso = dir.path("fresh-install.iso");
    std::fs::write(&new_iso, vec![0x44u8; 128 * 1024]).unwrap();
    h.get_by_label("Add host…").hover();
    h.step();
    h.input_mut().dropped_files.push(std::sync::Arc::new(Dropped(new_iso)));
    wait(&mut h, "the wizard with the ISO", |h| {
        h.query_by_role_and_label(Role::TextInput, "Name").and_then(|n| n.value()).as_deref() == Some("fresh-install")
    });
    wait(&mut h, "a valid wizard", |h| !disabled(h, "Create"));
    click(&mut h, "Create");
    wait(&mut h, "the new VM with its ISO", |h| media_of(h, "fresh-install").as_deref() == Some("fresh-install.iso"));
    // It has no kernel: started, it boots its firmware, and the details say how far that got (this ISO is
    // not bootable and the new disk is empty).
    wait(&mut h, "its row", |h| has(h, "fresh-install"));
    click(&mut h, "fresh-install");
    wait(&mut h, "its details", |h| has_contains(h, "firmware (SeaBIOS)"));
    click(&mut h, "Start");
    wait(&mut h, "the firmware's verdict", |h| has_contains(h, "Firmware: No bootable device"));
    click(&mut h, "Force off");
    wait(&mut h, "stopped", |h| {
        h.state().backend.model().hosts[0]
            .vms
            .iter()
            .any(|v| v.name == "fresh-install" && v.state == porthole_api::VmState::Stopped)
    });

    // An upload cancelled half-way leaves nothing in the library.
    // (The daemon's side of an upload broken off half-way is checked in tests/tests/daemon.rs.)
    let big = dir.path("big.iso");
    std::fs::File::create(&big).unwrap().set_len(1 << 30).unwrap();
    h.get_by_label("show screen").hover();
    h.step();
    h.input_mut().dropped_files.push(std::sync::Arc::new(Dropped(big)));
    wait(&mut h, "the upload under way", |h| has(h, "Cancel upload"));
    h.get_by_label("Cancel upload").click_accesskit();
    h.step();
    wait(&mut h, "the cancellation", |h| has_contains(h, "cancelled"));
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(d.data.join("images"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("big.iso"))
            .collect()
    };
    let start = Instant::now();
    while !leftovers().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "partial upload left behind: {:?}", leftovers());
        h.step();
        std::thread::sleep(Duration::from_millis(50));
    }

    // A new VM whose disk is a copy of the library image.
    click(&mut h, "New VM…");
    type_into(&mut h, "Name", "cloned");
    type_into(&mut h, "Kernel", &porthole_guests::path("hello").display().to_string());
    combo(&mut h, "Disk", "copy of a library image");
    assert!(disabled(&h, "Create"), "no image chosen yet");
    // The picker shows each image's format and sizes.
    let base = rt.block_on(c.images()).unwrap().into_iter().find(|i| i.name == "base.img").unwrap();
    let entry = porthole::app::image_text(&base);
    assert!(entry.starts_with("base.img — raw, 1.0 MiB virtual, "), "{entry}");
    combo(&mut h, "Image", &entry);
    wait(&mut h, "a valid wizard", |h| !disabled(h, "Create"));
    click(&mut h, "Create");
    wait(&mut h, "the cloned VM", |h| {
        h.state().backend.model().hosts[0].vms.iter().any(|v| v.name == "cloned" && v.disk_bytes == 1 << 20)
    });
    rt.block_on(c.action(&demo, porthole_api::client::Action::Poweroff)).unwrap();
}

/// The console against TigerVNC's Xvnc: "Resize guest to window" makes the X screen the console's size, and
/// Unicode text crosses the extended clipboard both ways (X's side read and written with xclip).
#[test]
fn a_vnc_console_resizes_the_server_and_shares_the_clipboard() {
    let dir = Scratch::new("gui-xvnc");
    let socket = dir.path("xvnc.sock");
    let (_xvnc, display) = porthole_tests::xvnc(&socket, 230, &["-SecurityTypes", "None"]);
    let x_size = || {
        let out = Command::new("xdpyinfo").args(["-display", &display]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| {
                l.trim().strip_prefix("dimensions:").map(|d| d.split_whitespace().next().unwrap_or("").to_owned())
            })
            .unwrap_or_default()
    };
    assert_eq!(x_size(), "640x480");
    let mut h = app_without_local_host();
    let target: porthole::app::VncTarget = format!("vnc+unix://{}", socket.display()).parse().unwrap();
    h.state_mut().open_vnc(target, None);
    wait(&mut h, "the console", |h| has_contains(h, "640x480 — click the screen to type"));

    // Resize: once the console area has kept its size for a moment the X screen takes it.
    h.get_by_label_contains("Scale").click();
    h.step();
    h.step();
    h.get_all_by_label("Resize guest to window").last().expect("the scale menu").click();
    h.step();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        h.step();
        let size = x_size();
        if size != "640x480" && has_contains(&h, &format!("{size} — click the screen to type")) {
            break;
        }
        assert!(Instant::now() < deadline, "the X screen stayed {size}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // X → this computer's clipboard.
    let from_x = "grüße ✓ 日本 from X";
    let _owner = porthole_tests::set_x_clipboard(&display, from_x);
    wait(&mut h, "X's text on this computer's clipboard", |h| {
        h.output().platform_output.commands.iter().any(|c| matches!(c, egui::OutputCommand::CopyText(t) if t == from_x))
    });

    // This computer's clipboard → X: "Paste into guest", then an X program pastes it.
    let ours = "from the window ✓ ünïcode";
    click(&mut h, "Paste into guest");
    h.event(egui::Event::Paste(ours.to_owned()));
    h.step();
    let reader = porthole_tests::read_x_clipboard_until(&display, ours);
    while !reader.is_finished() {
        h.step();
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(reader.join().unwrap(), ours);
}

/// The console of one of Porthole's own VMs shares the clipboard through the guest's agent (`--agent spice`;
/// the `virtio-console` micro-guest plays spice-vdagent): what the guest copies lands on this computer's
/// clipboard, and "Paste into guest" gives the guest this computer's text, Unicode included.
#[test]
fn a_vm_console_shares_the_clipboard_with_the_guests_agent() {
    let dir = Scratch::new("gui-agent");
    let socket = dir.path("vnc.sock");
    let serial = dir.path("serial.log");
    let from_guest = "copied-in-the-guest";
    let args = [
        std::ffi::OsStr::new("--agent"),
        std::ffi::OsStr::new("spice"),
        std::ffi::OsStr::new("--cmdline"),
        std::ffi::OsStr::new("copy=copied-in-the-guest paste"),
    ];
    let _vm = porthole_tests::vnc_vm("virtio-console", &socket, &serial, &args, "AGENT paste waiting");
    let mut h = app_without_local_host();
    let target: porthole::app::VncTarget = format!("vnc+unix://{}", socket.display()).parse().unwrap();
    h.state_mut().open_vnc(target, None);
    wait(&mut h, "the guest's text on this computer's clipboard", |h| {
        h.output()
            .platform_output
            .commands
            .iter()
            .any(|c| matches!(c, egui::OutputCommand::CopyText(t) if t == from_guest))
    });
    let ours = "from the window ✓ ünïcode";
    click(&mut h, "Paste into guest");
    h.event(egui::Event::Paste(ours.to_owned()));
    h.step();
    let serial_text = || String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    // The whole line: the guest prints slowly (its code is emulated), so wait for the line after it.
    wait(&mut h, "the guest to paste", |_| serial_text().contains("AGENT done"));
    // The whole UTF-8 text arrived; the guest prints its bytes beyond ASCII as '?'.
    let printed: String = ours.bytes().map(|b| if b.is_ascii() { char::from(b) } else { '?' }).collect();
    let out = serial_text();
    assert!(out.contains(&format!("AGENT paste-data type=1 bytes={}", ours.len())), "{out}");
    assert!(out.contains(&format!("AGENT paste text={printed}")), "{out}");
}

/// A crashed VM that its process keeps: the list and the details say "crashed", the details give the
/// report, its thumbnail and console still show its last screen, and Force off ends it.
#[test]
fn a_crashed_vm_shows_its_report_and_its_console_still_opens() {
    let dir = Scratch::new("gui-crash");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    let req = porthole_api::CreateVm {
        boot: Some(porthole_api::BootSpec {
            kernel: porthole_guests::path("crash-screen").display().to_string(),
            initrd: None,
            cmdline: String::new(),
        }),
        disk_gib: 0,
        ..porthole_api::CreateVm::new("crasher", 1, 64)
    };
    let id = rt.block_on(c.create_vm(&req)).unwrap().id;
    rt.block_on(c.action(&id, porthole_api::client::Action::Start)).unwrap();

    let mut h = app(&d.socket(), dir.path("settings.json"));
    wait(&mut h, "the VM", |h| has(h, "crasher"));
    wait(&mut h, "crashed", |h| has(h, "crashed"));
    wait(&mut h, "its last screen as a thumbnail", |h| h.state().thumbnail_size(0, &id) == Some([128, 96]));
    select(&mut h, "crasher");
    wait(&mut h, "the crash report", |h| has_contains(h, "Crashed: triple fault"));
    assert!(disabled(&h, "Start"), "the crashed VM's process still holds it");
    assert!(!disabled(&h, "Open console"));
    click(&mut h, "Open console");
    wait(&mut h, "the console's screen", |h| has_contains(h, "click the screen to type"));
    click(&mut h, "Machines");
    click(&mut h, "Force off");
    wait(&mut h, "stopped", |h| has(h, "stopped"));
    assert!(has_contains(&h, "Last stop: the guest crashed: triple fault"));
}

/// Clicks the first of the buttons labelled `name` (a VM has one in the sidebar and one in the list).
fn select(h: &mut Harness<'static, PortholeApp>, name: &str) {
    h.get_all_by_label(name).next().expect("the VM's button").click();
    h.step();
    h.step();
}

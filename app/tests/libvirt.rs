//! The window with a Porthole host and a libvirt host at once (a private `libvirtd` and `portholed`, see
//! tests/src/libvirt.rs): the same flow, driven through the accessibility tree, passes on both — the wizard
//! creates a VM booting the keyboard-echo micro-guest, it starts, its console opens and takes keys (the
//! guest's screen changes), a snapshot is taken and reverted to, an ISO dropped on its row is uploaded into
//! the host's library and inserted, then ejected, and the VM is forced off and deleted. On the libvirt host
//! the features it lacks are greyed, a domain destroyed behind the window's back shows as stopped, and a
//! libvirtd killed mid-session makes the host unreachable without stopping the window, which reconnects when
//! the daemon is back.

use std::path::Path;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use porthole::PortholeApp;
use porthole_api::{HostHandle, TaskState};
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;
use porthole_tests::libvirt::Libvirt;

mod common;
use common::*;

/// TCG guests and libvirt's internal snapshots are slow here.
fn wait(h: &mut Harness<'static, PortholeApp>, what: &str, cond: impl Fn(&Harness<'static, PortholeApp>) -> bool) {
    wait_within(h, what, Duration::from_secs(180), cond)
}

/// Selects VM `name` (its row; its name is also the details' heading).
fn select(h: &mut Harness<'static, PortholeApp>, name: &str) {
    h.step();
    h.get_all_by_label(name).next().expect("the VM's row").click_accesskit();
    h.step();
    h.step();
}

fn connection(h: &Harness<'static, PortholeApp>, host: usize) -> HostHandle {
    h.state().backend.model().hosts[host].connection.clone().expect("the host is connected")
}

fn vm_id(h: &Harness<'static, PortholeApp>, host: usize, name: &str) -> Option<String> {
    h.state().backend.model().hosts[host].vms.iter().find(|v| v.name == name).map(|v| v.id.clone())
}

/// A PNG of the VM's screen as its host gives it.
fn screen(h: &Harness<'static, PortholeApp>, host: usize, id: &str) -> Vec<u8> {
    let c = connection(h, host);
    let rt = h.state().backend.runtime();
    rt.block_on(c.screenshot(id, 320)).unwrap_or_else(|e| panic!("a screenshot of the running VM: {e}"))
}

/// Whether a task of the selected VM runs.
fn busy(h: &Harness<'static, PortholeApp>) -> bool {
    let vm = h.state().selection().1;
    h.state().backend.model().tasks.iter().any(|t| Some(&t.vm) == vm.as_ref() && t.task.state == TaskState::Running)
}

/// The flow every kind of host passes: host `host` (sidebar label starting with `host_name — `) gets VM
/// `name` booting `kernel` from the wizard, runs it, types into it, snapshots and reverts it, takes an ISO,
/// and deletes it. `behind_our_back` runs while the VM runs (a libvirt host's domain destroyed with virsh).
fn flow(
    h: &mut Harness<'static, PortholeApp>,
    dir: &Scratch,
    host: usize,
    host_name: &str,
    kernel: &Path,
    name: &str,
    behind_our_back: Option<&dyn Fn()>,
) {
    press_contains(h, &format!("{host_name} — "));
    press(h, "New VM…");
    type_into(h, "Name", name);
    type_into(h, "Kernel", &kernel.display().to_string());
    wait(h, "a valid wizard", |h| !disabled(h, "Create"));
    press(h, "Create");
    wait(h, "the new VM in the list", |h| vm_id(h, host, name).is_some() && has(h, name));
    let id = vm_id(h, host, name).unwrap();

    select(h, name);
    press(h, "Start");
    wait(h, "running", |h| has(h, "running"));
    if let Some(destroy) = behind_our_back {
        destroy();
        wait(h, "the VM stopped behind the window's back", |h| has(h, "stopped"));
        press(h, "Start");
        wait(h, "running again", |h| has(h, "running"));
    }

    // The console: the guest echoes each key byte on its text screen.
    press(h, "Open console");
    let start = Instant::now();
    while !has_contains(h, "click the screen to type") {
        h.step();
        if start.elapsed() > Duration::from_secs(120) {
            use egui_kittest::kittest::NodeT;
            let labels: Vec<String> = h
                .query_all(egui_kittest::kittest::by().predicate(|_| true))
                .filter_map(|n| n.accesskit_node().label())
                .collect();
            let states = h.state().console_states();
            panic!("no console screen; the consoles: {states:?}; the window shows: {labels:?}");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let before = screen(h, host, &id);
    press(h, "Send Ctrl+Alt+Del");
    let start = Instant::now();
    loop {
        h.step();
        let now = screen(h, host, &id);
        if !now.is_empty() && now != before {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the keys never reached the guest's screen");
        std::thread::sleep(Duration::from_millis(300));
    }

    // A snapshot, and back to it.
    // Back to the list: the VM is still selected (its name is also the console tab's now).
    press(h, "Machines");
    wait(h, "the details", |h| has(h, "Snapshots"));
    // The section stays open once opened (for the next VM too).
    if !has(h, "Take snapshot…") {
        press(h, "Snapshots");
    }
    press(h, "Take snapshot…");
    wait(h, "the take dialog", |h| has(h, "Take a snapshot"));
    replace_text(h, "Snapshot name", "before");
    press(h, "Take snapshot");
    wait(h, "the snapshot in the tree", |h| has(h, "Revert to before") && !busy(h));
    press(h, "Revert to before");
    wait(h, "the revert confirmation", |h| has(h, "Revert to a snapshot"));
    press(h, "Revert now");
    wait(h, "the revert done", |h| has_contains(h, &format!("Revert {name} to before: done")));

    // An ISO dropped on the VM's row: into the host's library, then into the VM's drive.
    press(h, "Machines");
    let iso = dir.path(&format!("{name}-tools.iso"));
    std::fs::write(&iso, vec![0x42u8; 64 * 1024]).unwrap();
    let row = format!("{name} screen");
    wait(h, "the VM's thumbnail", |h| has(h, &row));
    h.get_by_label(&row).hover();
    h.step();
    h.input_mut().dropped_files.push(std::sync::Arc::new(Dropped(iso.clone())));
    let iso_name = format!("{name}-tools.iso");
    wait(h, "the ISO in the drive", |h| has(h, &iso_name));
    press(h, "Eject");
    wait(h, "an empty drive", |h| has(h, "empty"));

    press(h, "Force off");
    wait(h, "stopped", |h| has(h, "stopped"));
    press(h, "Delete…");
    press(h, "Delete VM and disk");
    wait(h, "the VM gone", |h| vm_id(h, host, name).is_none());
}

#[test]
fn a_porthole_host_and_a_libvirt_host_in_one_window_pass_the_same_flow() {
    let Some(mut lv) = Libvirt::start_or_skip("the window with a libvirt host") else { return };
    let dir = Scratch::new("gui-libvirt");
    let d = Daemon::start(&dir, false, &[]);
    let settings = dir.path("settings.json");
    let remotes = serde_json::json!({"remotes": [{"name": "virt", "kind": "libvirt", "address": lv.local_uri()}]});
    std::fs::write(&settings, remotes.to_string()).unwrap();
    let mut h = window(&d.socket(), settings, 1400.0, 1200.0);
    wait(&mut h, "both hosts", |h| has(h, "Local — 0 VMs") && has(h, "virt — 0 VMs"));
    assert_eq!(connection(&h, 1).kind(), porthole_api::HostKind::Libvirt);

    // The same flow on each host.
    let local_kernel = porthole_guests::path("kbd-echo");
    flow(&mut h, &dir, 0, "Local", &local_kernel, "echo-local", None);
    let lv_kernel = lv.guest_kernel("kbd-echo");
    let destroy = || {
        let out = lv.virsh(&["destroy", "echo-virt"]);
        assert!(out.status.success(), "virsh destroy: {}", String::from_utf8_lossy(&out.stderr));
    };
    flow(&mut h, &dir, 1, "virt", &lv_kernel, "echo-virt", Some(&destroy));

    // What libvirt hosts lack is greyed, with the reason (a VM is needed for its details).
    press_contains(&mut h, "virt — ");
    press(&mut h, "New VM…");
    type_into(&mut h, "Name", "grey");
    type_into(&mut h, "Kernel", &lv_kernel.display().to_string());
    wait(&mut h, "a valid wizard", |h| !disabled(h, "Create"));
    press(&mut h, "Create");
    wait(&mut h, "the VM", |h| vm_id(h, 1, "grey").is_some() && has(h, "grey"));
    select(&mut h, "grey");
    for label in ["Settings…", "Clone…"] {
        wait(&mut h, label, |h| has(h, label));
        assert!(disabled(&h, label), "{label} is greyed on a libvirt host");
    }

    // libvirtd killed: the host is unreachable, the window goes on (the local host still answers), and the
    // host comes back with the daemon.
    lv.kill_daemon();
    wait(&mut h, "the libvirt host unreachable", |h| has(h, "virt — unreachable"));
    assert!(has(&h, "Local — 0 VMs"), "the local host is untouched");
    let problem = h.state().backend.model().hosts[1].error.clone().unwrap_or_default();
    assert!(!problem.is_empty(), "the host says why it is unreachable");
    lv.start_daemon().unwrap();
    wait(&mut h, "the libvirt host back", |h| has(h, "virt — 1 VMs"));

    // libvirt runs in the window's helper process; that process dying (a crash in libvirt's library) costs
    // the window nothing: the next call starts another.
    let first = helpers_of(&lv.local_uri());
    assert_eq!(first.len(), 1, "one helper per libvirt host: {first:?}");
    let killed = std::process::Command::new("kill").args(["-9", &first[0].to_string()]).status().unwrap();
    assert!(killed.success());
    wait(&mut h, "a new helper", |_| {
        let now = helpers_of(&lv.local_uri());
        now.len() == 1 && now != first
    });
    wait(&mut h, "the libvirt host listed again", |h| has(h, "virt — 1 VMs"));
    assert!(has(&h, "Local — 0 VMs"));
}

/// The process ids of `porthole-libvirt` helpers serving `uri`.
fn helpers_of(uri: &str) -> Vec<u32> {
    let want = format!("porthole-libvirt\0{uri}\0");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| s.contains(") Z "));
        if cmdline.contains(&want) && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// The window links no libvirt: it starts where libvirt's client library is missing, and a libvirt host
/// there says what to install (its helper cannot start), while everything else works.
#[test]
fn without_libvirts_client_library_the_window_starts_and_a_libvirt_host_says_what_to_install() {
    let window = porthole_tests::workspace_bin("porthole");
    let helper = porthole_tests::workspace_bin("porthole-libvirt");
    let needed = |bin: &Path| {
        let out = std::process::Command::new("readelf").arg("-d").arg(bin).output().expect("readelf (binutils)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert!(needed(&window).iter().all(|l| !l.contains("libvirt")), "the window links libvirt: {:?}", needed(&window));
    assert!(needed(&helper).iter().any(|l| l.contains("libvirt.so.0")), "{:?}", needed(&helper));
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped the run without libvirt's library: hiding it needs root (a private mount namespace)");
        return;
    }
    let namespaces = std::process::Command::new("unshare").args(["-m", "true"]).status();
    if !namespaces.is_ok_and(|s| s.success()) {
        eprintln!("skipped the run without libvirt's library: this machine refuses a private mount namespace");
        return;
    }
    // Where the dynamic loader finds the library, from the helper's own view.
    let ldd = std::process::Command::new("ldd").arg(&helper).output().unwrap();
    let ldd = String::from_utf8_lossy(&ldd.stdout).into_owned();
    let library = ldd
        .lines()
        .find_map(|l| l.trim().strip_prefix("libvirt.so.0 => ").and_then(|r| r.split_whitespace().next()))
        .unwrap_or_else(|| panic!("libvirt.so.0 not in: {ldd}"))
        .to_string();
    // In a private mount namespace the library's file is empty: the loader refuses it, as if it were absent.
    let hide = format!("mount --bind /dev/null '{library}' && exec \"$@\"");
    let hidden = |program: &Path, args: &[&str]| -> Vec<String> {
        let mut all = vec!["-m".to_string(), "sh".into(), "-c".into(), hide.clone(), "sh".into()];
        all.push(program.display().to_string());
        all.extend(args.iter().map(|a| a.to_string()));
        all
    };
    let out = std::process::Command::new("unshare").args(hidden(&helper, &["--version"])).output().unwrap();
    assert!(!out.status.success(), "the helper should not start without the library");
    assert!(String::from_utf8_lossy(&out.stderr).contains("libvirt.so.0"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new("unshare").args(hidden(&window, &["--version"])).output().unwrap();
    assert!(out.status.success(), "the window starts: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("porthole "), "{}", String::from_utf8_lossy(&out.stdout));
    let e = porthole::libvirt_host_with(Path::new("unshare"), &hidden(&helper, &["qemu:///session"]))
        .err()
        .expect("no libvirt host without libvirt's library");
    assert!(e.contains("apt install libvirt0") && e.contains("Everything else works"), "{e}");
}

/// *Add host…* → libvirt over SSH: the dialog shows the server's key fingerprints, connects only once the
/// user says they trust them, then records them in the connection's known_hosts; a key that changed is shown
/// as such and cannot be accepted from the dialog.
#[test]
fn adding_a_libvirt_host_over_ssh_asks_about_its_host_key() {
    let Some(lv) = Libvirt::start_or_skip("adding a libvirt host over SSH") else { return };
    let dir = Scratch::new("gui-libvirt-ssh");
    let known_hosts = dir.path("known_hosts");
    let uri = lv.libssh_uri(&lv.client_key, &known_hosts);
    let expected = std::process::Command::new("ssh-keygen").arg("-lf").arg(&lv.host_key_pub).output().unwrap();
    let expected = String::from_utf8_lossy(&expected.stdout).split_whitespace().nth(1).unwrap().to_owned();
    assert!(expected.starts_with("SHA256:"), "{expected}");

    let backend = porthole::backend::Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, || Err("no local host in this test".to_owned()), Some(dir.path("s.json")));
    let mut h = Harness::builder()
        .with_size(egui::vec2(1400.0, 900.0))
        .build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app);
    let add = |h: &mut Harness<'static, PortholeApp>, name: &str, uri: &str| {
        press(h, "Add host…");
        wait(h, "the dialog", |h| has(h, "Add a host"));
        press(h, "libvirt (local or SSH)");
        type_into(h, "Host name", name);
        type_into(h, "Connection URI", uri);
        press(h, "Fetch host key");
    };

    add(&mut h, "far", &uri);
    wait(&mut h, "the host's key", |h| has_contains(h, &expected));
    assert!(disabled(&h, "Connect"), "no connection before the user trusts the key");
    press_contains(&mut h, "I compared these with the server's");
    assert!(!disabled(&h, "Connect"));
    press(&mut h, "Connect");
    wait(&mut h, "the host connected", |h| has(h, "far — 0 VMs"));
    let recorded = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(recorded.contains(&format!("[127.0.0.1]:{}", lv.ssh_port)), "{recorded}");
    let settings = std::fs::read_to_string(dir.path("s.json")).unwrap();
    assert!(settings.contains("\"kind\": \"libvirt\"") || settings.contains("\"kind\":\"libvirt\""), "{settings}");

    // Another key for the same host in a known_hosts file: shown as changed, and Connect stays off.
    let changed = dir.path("changed_known_hosts");
    let other_key = std::fs::read_to_string(lv.client_key.with_extension("pub")).unwrap();
    std::fs::write(&changed, format!("[127.0.0.1]:{} {}", lv.ssh_port, other_key)).unwrap();
    add(&mut h, "far2", &lv.libssh_uri(&lv.client_key, &changed));
    wait(&mut h, "the warning", |h| has_contains(h, "is not the one"));
    assert!(disabled(&h, "Connect"), "a changed key cannot be accepted from the dialog");
}

/// The same flow on a libvirt host over `qemu+ssh://` (the console through the SSH tunnel, the ISO uploaded
/// through it); a host whose key the server refuses says so and holds up nothing.
#[test]
fn over_qemu_ssh_the_flow_passes_and_a_refused_key_says_why() {
    let Some(lv) = Libvirt::start_or_skip("the window with a libvirt host over SSH") else { return };
    let dir = Scratch::new("gui-libvirt-over-ssh");
    let settings = dir.path("settings.json");
    let remotes = serde_json::json!({"remotes": [
        {"name": "far", "kind": "libvirt", "address": lv.ssh_uri(&lv.client_key, Some(&lv.ssh_wrapper))},
        {"name": "refused", "kind": "libvirt", "address": lv.ssh_uri(&lv.wrong_key, Some(&lv.ssh_wrapper))},
    ]});
    std::fs::write(&settings, remotes.to_string()).unwrap();
    let backend = porthole::backend::Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, || Err("no local host in this test".to_owned()), Some(settings));
    let mut h = Harness::builder()
        .with_size(egui::vec2(1400.0, 1200.0))
        .build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app);
    wait(&mut h, "the hosts", |h| has(h, "far — 0 VMs") && has(h, "refused — unreachable"));
    let why = h.state().backend.model().hosts[2].error.clone().unwrap_or_default();
    assert!(why.contains("Permission denied") || why.contains("authenticat"), "{why}");
    let kernel = lv.guest_kernel("kbd-echo");
    flow(&mut h, &dir, 1, "far", &kernel, "echo-ssh", None);
}

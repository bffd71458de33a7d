//! Keyboard shortcuts, preferences and what the window remembers, driven through egui_kittest against a real
//! `portholed`: each shortcut does its job (and the dialog lists it); the theme and console scaling chosen
//! in *Preferences* are saved and apply in the next window, which opens the console tabs of the last one again
//! (and releases the keyboard with the keys chosen); a daemon that Porthole starts keeps its VMs in the folder
//! chosen.

use egui::{Key, Modifiers};
use egui_kittest::kittest::Queryable;
use porthole_api::client::Action;
use porthole_api::{CreateVm, VmState};
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

fn vm_request(name: &str, guest: &str) -> CreateVm {
    CreateVm { disk_gib: 0, ..booting(name, guest) }
}

/// Clicks VM `name` in the list (through AccessKit: a dialog may lie over the list) and waits until it is
/// the selection.
fn select(h: &mut egui_kittest::Harness<'static, porthole::PortholeApp>, name: &str) {
    use egui_kittest::kittest::Queryable;
    let id = h.state().backend.model().hosts[0].vms.iter().find(|v| v.name == name).map(|v| v.id.clone());
    h.get_by_label(name).click_accesskit();
    wait(h, "the selection", |h| h.state().selection().1 == id);
}

/// The values the combo boxes show.
fn combo_values(h: &egui_kittest::Harness<'static, porthole::PortholeApp>) -> Vec<String> {
    use egui_kittest::kittest::{NodeT, Queryable};
    h.query_all_by_role(egui::accesskit::Role::ComboBox).filter_map(|n| n.accesskit_node().value()).collect()
}

fn state_of(h: &egui_kittest::Harness<'static, porthole::PortholeApp>, name: &str) -> Option<VmState> {
    h.state().backend.model().hosts.first()?.vms.iter().find(|v| v.name == name).map(|v| v.state)
}

#[test]
fn shortcuts_do_what_the_dialog_lists() {
    let dir = Scratch::new("gui-shortcuts");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    let ticking = rt.block_on(c.create_vm(&vm_request("ticking", "ticker"))).unwrap();
    rt.block_on(c.action(&ticking.id, Action::Start)).unwrap();
    rt.block_on(c.create_vm(&vm_request("quiet", "idle"))).unwrap();
    let mut h = window(&d.socket(), dir.path("settings.json"), 1200.0, 800.0);
    wait(&mut h, "the list", |h| has(h, "Local — 2 VMs") && state_of(h, "ticking") == Some(VmState::Running));

    // F1: the dialog lists every shortcut.
    h.key_press(Key::F1);
    wait(&mut h, "the shortcuts dialog", |h| has(h, "Keyboard shortcuts") && has(h, "Shut down the selected VM"));
    assert!(has(&h, "New VM…") && has(&h, "Release the keyboard and pointer (console)"));

    // Ctrl+N: the wizard.
    h.key_press_modifiers(Modifiers::COMMAND, Key::N);
    wait(&mut h, "the wizard", |h| h.state().wizard.is_some());
    h.state_mut().wizard = None;

    // Ctrl+F: the search field takes what is typed.
    h.key_press_modifiers(Modifiers::COMMAND, Key::F);
    h.step();
    h.step();
    h.event(egui::Event::Text("quiet".into()));
    wait(&mut h, "the search text", |h| h.state().search == "quiet");
    h.state_mut().search.clear();

    // Ctrl+Shift+S with nothing selected: the refusal pops up as a toast and stays in the notices bar.
    assert_eq!(h.state().notifications.showing(), 0);
    h.key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::S);
    wait(&mut h, "the toast", |h| h.state().notifications.showing() == 1);
    assert!(has_contains(&h, "Select a VM first"));

    // Ctrl+Shift+S starts the selected stopped VM.
    select(&mut h, "quiet");
    h.key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::S);
    wait(&mut h, "quiet running", |h| state_of(h, "quiet") == Some(VmState::Running));

    // Ctrl+O opens the selected running VM's console; Ctrl+H the host page.
    select(&mut h, "ticking");
    h.key_press_modifiers(Modifiers::COMMAND, Key::O);
    wait(&mut h, "the console tab", |h| h.state().console_titles() == ["ticking"]);
    h.key_press_modifiers(Modifiers::COMMAND, Key::H);
    wait(&mut h, "the host page", |h| has(h, "Host Local"));

    // Ctrl+Shift+D asks the selected VM to shut down (the ticker ignores the button: the task waits).
    click(&mut h, "Machines");
    h.key_press_modifiers(Modifiers::COMMAND | Modifiers::SHIFT, Key::D);
    let shutdown = format!("shut down {}", ticking.id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let task = loop {
        h.step();
        let tasks = rt.block_on(c.tasks()).unwrap();
        if let Some(t) = tasks.into_iter().find(|t| t.what == shutdown) {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "no shutdown task");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    rt.block_on(c.cancel_task(&task.id)).unwrap();
    for vm in rt.block_on(c.list_vms()).unwrap() {
        let _ = rt.block_on(c.action(&vm.id, Action::Poweroff));
    }
}

#[test]
fn preferences_and_console_tabs_are_kept_for_the_next_window() {
    let dir = Scratch::new("gui-preferences");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = d.local();
    let vm = rt.block_on(c.create_vm(&vm_request("ticking", "ticker"))).unwrap();
    rt.block_on(c.action(&vm.id, Action::Start)).unwrap();
    let settings = dir.path("settings.json");
    {
        let mut h = window(&d.socket(), settings.clone(), 1200.0, 800.0);
        wait(&mut h, "the list", |h| state_of(h, "ticking") == Some(VmState::Running));
        click(&mut h, "Menu");
        click(&mut h, "Preferences…");
        wait(&mut h, "the preferences", |h| has(h, "Preferences") && has(h, "Dark"));
        click(&mut h, "Dark");
        combo(&mut h, "New consoles", "1:1");
        combo(&mut h, "Release the keyboard with", "Shift+F12");
        // Another folder for this computer's VMs: used when Porthole next starts the daemon, and it says so.
        type_into(&mut h, "Local VMs live in", &dir.path("my-vms").display().to_string());
        wait(&mut h, "the note on the running daemon", |h| {
            has_contains(h, "The local daemon running now keeps its VMs in")
        });
        wait(&mut h, "the dark theme", |h| h.ctx.options(|o| o.theme_preference) == egui::ThemePreference::Dark);
        select(&mut h, "ticking");
        h.key_press_modifiers(Modifiers::COMMAND, Key::O);
        wait(&mut h, "the console tab", |h| h.state().console_titles() == ["ticking"]);
    }
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&settings).unwrap()).unwrap();
    assert_eq!(saved["theme"], "dark", "{saved}");
    assert_eq!(saved["console_scaling"], "actual", "{saved}");
    assert_eq!(saved["open_consoles"], serde_json::json!([{"vm": {"host": "Local", "vm": "ticking"}}]), "{saved}");
    assert_eq!(saved["release_keys"], "shift-f12", "{saved}");
    assert_eq!(saved["vm_dir"], dir.path("my-vms").display().to_string(), "{saved}");

    // The next window: dark, and the console open again (1:1).
    let mut h = window(&d.socket(), settings.clone(), 1200.0, 800.0);
    wait(&mut h, "the console tab again", |h| h.state().console_titles() == ["ticking"]);
    assert_eq!(h.ctx.options(|o| o.theme_preference), egui::ThemePreference::Dark);
    wait(&mut h, "the 1:1 console", |h| combo_values(h) == ["1:1"]);
    // The console takes the keyboard when its screen is clicked and gives it back on Shift+F12 (Ctrl+Alt no
    // longer does).
    wait(&mut h, "the console's screen", |h| has_contains(h, "click the screen to type"));
    h.get_by_label("The VM's screen").click();
    wait(&mut h, "the keyboard taken", |h| has_contains(h, "keyboard captured (Shift+F12 releases)"));
    h.key_press_modifiers(Modifiers::CTRL | Modifiers::ALT, Key::A);
    h.run_steps(3);
    assert!(has_contains(&h, "keyboard captured"), "Ctrl+Alt no longer releases it");
    h.key_press_modifiers(Modifiers::SHIFT, Key::F12);
    wait(&mut h, "the keyboard given back", |h| has_contains(h, "click the screen to type"));
    rt.block_on(c.action(&vm.id, Action::Poweroff)).unwrap();
}

#[test]
fn a_daemon_porthole_starts_keeps_its_vms_in_the_folder_chosen() {
    let dir = Scratch::new("gui-vm-dir");
    let socket = dir.path("run/portholed.sock");
    let vms = dir.path("elsewhere/vms");
    let program = porthole_tests::workspace_bin("portholed");
    let pid = porthole::daemon::ensure_running_with(&program, &socket, true, Some(&vms)).unwrap();
    let pid = pid.expect("no daemon ran on this socket: one was started");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let info = rt.block_on(async { porthole_api::Client::unix(&socket).unwrap().host().await });
    // A daemon is running now: asked again, nothing new starts.
    let again = porthole::daemon::ensure_running_with(&program, &socket, true, Some(&vms));
    // SAFETY: the daemon this test started, by its process id.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let info = info.unwrap();
    assert_eq!(std::path::Path::new(&info.data_dir), vms, "{info:?}");
    assert!(vms.join("vms").is_dir() || vms.join("images").is_dir(), "the daemon keeps its store there");
    assert_eq!(again, Ok(None));
}

//! What the window tests share: a window on a daemon's socket, and stepping, querying and driving it by
//! accessibility label.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use porthole::PortholeApp;
use porthole::backend::Backend;
use porthole_api::TaskState;

/// The window of `width` x `height` points on the local daemon at `socket`, with its settings at `settings`.
pub fn window(socket: &Path, settings: PathBuf, width: f32, height: f32) -> Harness<'static, PortholeApp> {
    let backend = Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, porthole::local_host(socket.to_owned()), Some(settings));
    Harness::builder().with_size(egui::vec2(width, height)).build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
}

/// Steps the UI until `cond` holds, for at most `limit`; fails at once when a task the window follows has
/// failed (then `cond` will not come true), and says the last notice and the tasks when it gives up.
pub fn wait_within(
    h: &mut Harness<'static, PortholeApp>,
    what: &str,
    limit: Duration,
    cond: impl Fn(&Harness<'static, PortholeApp>) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        h.step();
        if cond(h) {
            return;
        }
        let notice = h.state().backend.model().notices.last().cloned();
        let tasks = h.state().backend.model().tasks.clone();
        let failed = tasks.iter().find(|t| t.task.state == TaskState::Failed);
        assert!(failed.is_none(), "waiting for {what}: {failed:?}");
        assert!(Instant::now() < deadline, "waiting for {what}; last notice: {notice:?}; tasks: {tasks:?}");
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// [`wait_within`] a minute.
pub fn wait(h: &mut Harness<'static, PortholeApp>, what: &str, cond: impl Fn(&Harness<'static, PortholeApp>) -> bool) {
    wait_within(h, what, Duration::from_secs(60), cond)
}

pub fn disabled(h: &Harness<'static, PortholeApp>, label: &str) -> bool {
    use egui_kittest::kittest::NodeT;
    h.get_by_label(label).accesskit_node().is_disabled()
}

pub fn has(h: &Harness<'static, PortholeApp>, label: &str) -> bool {
    h.query_all_by_label(label).next().is_some()
}

pub fn has_contains(h: &Harness<'static, PortholeApp>, part: &str) -> bool {
    h.query_all_by_label_contains(part).next().is_some()
}

pub fn type_into(h: &mut Harness<'static, PortholeApp>, label: &str, text: &str) {
    h.get_by_role_and_label(Role::TextInput, label).focus();
    h.step();
    h.get_by_role_and_label(Role::TextInput, label).type_text(text);
    h.step();
}

/// Clicks the widget labelled `label` through AccessKit, as a screen reader would: one event in one frame.
/// A frame is drawn first, so that the widget clicked is the one drawn from what the model holds now (a
/// `wait` on the model returns before the window has drawn the change, and a task's progress line, coming or
/// going, changes the identity of the buttons after it). A pointer click is three events in three frames:
/// when the tree or the VM list refreshes in between, the widgets may move and the click is lost.
pub fn press(h: &mut Harness<'static, PortholeApp>, label: &str) {
    h.step();
    h.get_by_label(label).click_accesskit();
    h.step();
    h.step();
}

/// [`press`] on the widget whose label contains `part`.
pub fn press_contains(h: &mut Harness<'static, PortholeApp>, part: &str) {
    h.step();
    h.get_by_label_contains(part).click_accesskit();
    h.step();
    h.step();
}

pub fn click(h: &mut Harness<'static, PortholeApp>, label: &str) {
    h.get_by_label(label).click();
    h.step();
    h.step();
}

/// Opens the combo box labelled `label` and picks `choice`.
pub fn combo(h: &mut Harness<'static, PortholeApp>, label: &str, choice: &str) {
    h.get_by_role_and_label(Role::ComboBox, label).click();
    h.step();
    h.step();
    h.get_all_by_label(choice).last().expect("the choice").click();
    h.step();
    h.step();
}

/// Replaces the text of the text field labelled `label` (select all, then type).
pub fn replace_text(h: &mut Harness<'static, PortholeApp>, label: &str, text: &str) {
    h.get_by_role_and_label(Role::TextInput, label).focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.step();
    h.get_by_role_and_label(Role::TextInput, label).type_text(text);
    h.step();
}

/// A file dropped on the window, as a desktop would hand it over.
#[derive(Debug)]
pub struct Dropped(pub PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

/// Booting micro-guest `guest` (tests/guests).
pub fn guest_boot(guest: &str) -> Option<porthole_api::BootSpec> {
    Some(porthole_api::BootSpec {
        kernel: porthole_guests::path(guest).display().to_string(),
        initrd: None,
        cmdline: String::new(),
    })
}

/// A VM named `name` of 1 vCPU and 64 MiB booting micro-guest `guest`, otherwise the defaults.
pub fn booting(name: &str, guest: &str) -> porthole_api::CreateVm {
    porthole_api::CreateVm { boot: guest_boot(guest), ..porthole_api::CreateVm::new(name, 1, 64) }
}

/// The idle micro-guest with a small disk and no network card, made through the API (what the window does
/// with it does not depend on the devices; fewer devices, less state to save).
pub fn create_bare_vm(
    d: &porthole_tests::daemon::Daemon,
    rt: &tokio::runtime::Runtime,
    name: &str,
) -> porthole_api::Vm {
    let req = porthole_api::CreateVm { disk_gib: 1, nics: Some(Vec::new()), ..booting(name, "idle") };
    rt.block_on(d.local().create_vm(&req)).unwrap()
}

//! Pictures of the main screens, rendered headless (egui_kittest on wgpu: Mesa's lavapipe Vulkan here) and
//! compared with the images checked in under `tests/snapshots/` (a few differing pixels are tolerated, for
//! renderer rounding). After an intended change of the look: `UPDATE_SNAPSHOTS=1 cargo test -p porthole
//! --test snapshots`, then look at the new images before committing them (kittest writes them with fast
//! compression: `python3 app/tests/recompress_snapshots.py app/tests/snapshots/*.png` recompresses them
//! at zlib level 9, which halves them, pixels unchanged).

use std::path::Path;
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions};
use porthole::PortholeApp;
use porthole::backend::Backend;
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

fn harness(app: PortholeApp) -> Harness<'static, PortholeApp> {
    Harness::builder()
        .with_size(egui::vec2(1200.0, 800.0))
        .wgpu()
        .build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
}

fn local_app(socket: &Path, dir: &Scratch) -> Harness<'static, PortholeApp> {
    let backend = Backend::new(|| {}).unwrap();
    harness(PortholeApp::new(backend, porthole::local_host(socket.to_owned()), Some(dir.path("settings.json"))))
}

fn offline_app() -> Harness<'static, PortholeApp> {
    let backend = Backend::new(|| {}).unwrap();
    harness(PortholeApp::new(backend, || Err("the local daemon is stopped".to_owned()), None))
}

fn wait(h: &mut Harness<'static, PortholeApp>, what: &str, cond: impl Fn(&Harness<'static, PortholeApp>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond(h) {
        assert!(Instant::now() < deadline, "waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(30));
    }
    // Let animations (collapsing headers, fades) settle before the picture.
    for _ in 0..10 {
        h.step();
    }
}

fn has(h: &Harness<'static, PortholeApp>, label: &str) -> bool {
    h.query_all_by_label_contains(label).next().is_some()
}

fn snapshot(h: &mut Harness<'static, PortholeApp>, name: &str) {
    // Up to 0.1% of the pixels may differ (antialiasing rounding between CPUs), each by the default threshold.
    h.snapshot_options(name, &SnapshotOptions::new().max_failed_pixels(1200 * 800 / 1000));
}

/// Three stopped VMs with tags, booting a library image (so no host paths show).
fn three_vms(d: &Daemon, rt: &tokio::runtime::Runtime) {
    let c = d.local();
    rt.block_on(c.upload_image("hello.elf", &porthole_guests::path("hello"), |_, _| {})).unwrap();
    for (i, (name, tags)) in
        [("build-server", vec!["ci"]), ("web-1", vec!["prod", "web"]), ("web-2", vec!["web"])].into_iter().enumerate()
    {
        // A NAT card with a fixed MAC and no forwards (a new VM's MAC is random and its SSH port depends on
        // what else runs here).
        let nic = porthole_api::NicSpec {
            mac: Some(format!("02:00:00:00:00:{i:02x}")),
            ..porthole_api::NicSpec::new(porthole_api::NicBackend::User)
        };
        // No disk: what a disk takes on the host depends on the file system, and the picture must not.
        let req = porthole_api::CreateVm {
            disk_gib: 0,
            boot: Some(porthole_api::BootSpec { kernel: "hello.elf".into(), initrd: None, cmdline: String::new() }),
            tags: tags.into_iter().map(str::to_owned).collect(),
            nics: Some(vec![nic]),
            ..porthole_api::CreateVm::new(name, 2, 2048)
        };
        rt.block_on(c.create_vm(&req)).unwrap();
    }
}

/// The first run and the machine list (one harness per test: kittest collects a test's snapshots there).
#[test]
fn snapshots_of_the_host_screens() {
    let dir = Scratch::new("snapshots");
    let d = Daemon::start(&dir, false, &[]);

    // First run: no VMs, the demo offered.
    let mut h = local_app(&d.socket(), &dir);
    wait(&mut h, "the empty host", |h| has(h, "Local — 0 VMs"));
    snapshot(&mut h, "first_run");

    // The machine list: three tagged VMs (booting a library image, so no host paths show), one selected.
    let rt = tokio::runtime::Runtime::new().unwrap();
    three_vms(&d, &rt);
    wait(&mut h, "the list", |h| has(h, "Local — 3 VMs"));
    h.get_by_label("web-1").click();
    wait(&mut h, "the details", |h| has(h, "Insert ISO…"));
    snapshot(&mut h, "machine_list");
    // The selected VM's network section: its card and the port-forward form.
    h.get_by_label("Network").click();
    wait(&mut h, "the network section", |h| has(h, "Port forwards"));
    snapshot(&mut h, "network_section");
    // Its Settings view.
    h.get_by_label("Settings…").click();
    wait(&mut h, "the settings", |h| has(h, "Settings of web-1"));
    snapshot(&mut h, "vm_settings");
}

#[test]
fn snapshots_of_the_dialogs() {
    // The wizard's inline validation (a host without a daemon: no machine-specific figures in the picture).
    let mut h = offline_app();
    wait(&mut h, "the unreachable host", |h| has(h, "Local — unreachable"));
    h.get_by_label("New VM…").click();
    wait(&mut h, "the wizard", |h| has(h, "New virtual machine"));
    h.get_by_role_and_label(Role::TextInput, "Name").focus();
    h.step();
    h.get_by_role_and_label(Role::TextInput, "Name").type_text("bad/name");
    wait(&mut h, "the complaint", |h| has(h, "A name is 1-63 letters"));
    snapshot(&mut h, "wizard");
    h.get_by_label("Cancel").click();
    h.step();
    h.get_by_label("Add host…").click();
    wait(&mut h, "the add-host dialog", |h| has(h, "Add a host"));
    snapshot(&mut h, "add_host");
}

#[test]
fn snapshot_of_a_console() {
    // A console: the fb-pattern guest's colour bars, over a VNC socket.
    let dir = Scratch::new("snapshot-console");
    // (A fixed socket path: the tab's title shows it.)
    let socket = std::env::temp_dir().join("porthole-snapshot-console.sock");
    let _ = std::fs::remove_file(&socket);
    let serial = dir.path("serial.log");
    let vm = porthole_tests::vnc_vm("fb-pattern", &socket, &serial, &[], "PORTHOLE-FB-PATTERN-READY");
    let mut h = offline_app();
    let target: porthole::app::VncTarget = format!("vnc+unix://{}", socket.display()).parse().unwrap();
    h.state_mut().open_vnc(target, None);
    // The lock lights come with the first update too, but reach the toolbar a moment after its size.
    wait(&mut h, "the console and its lock lights", |h| has(h, "click the screen to type") && has(h, "Caps Lock"));
    snapshot(&mut h, "console");
    drop(vm);
}

/// The window of the app's default size (1100 × 700 points) at `ppp` pixels per point, with `theme` in its
/// settings (as *Preferences* saves it).
fn themed_app(socket: &Path, dir: &Scratch, theme: &str, ppp: f32) -> Harness<'static, PortholeApp> {
    let settings = dir.path(&format!("settings-{theme}-{ppp}.json"));
    std::fs::write(&settings, format!("{{\"theme\": \"{theme}\"}}")).unwrap();
    let backend = Backend::new(|| {}).unwrap();
    let app = PortholeApp::new(backend, porthole::local_host(socket.to_owned()), Some(settings));
    Harness::builder()
        .with_size(egui::vec2(1100.0, 700.0))
        .with_pixels_per_point(ppp)
        // (No pointer in the picture: it would lie over whatever was clicked last.)
        .with_render_cursor(false)
        .wgpu()
        .build_ui_state(|ui, app: &mut PortholeApp| app.ui(ui), app)
}

/// What the host page shows, fixed: the host's own figures (memory, disk, uptime, load) change every second
/// and differ between machines, and a picture must not.
fn fixed_host_page(h: &mut Harness<'static, PortholeApp>) {
    let info = porthole_api::HostInfo {
        hostname: "demo-host".into(),
        version: "1.0.0".into(),
        cpus: 8,
        cpu_model: "Example CPU @ 3.00GHz".into(),
        kernel: "6.1.0-28-amd64".into(),
        uptime_s: 3 * 3600 + 12 * 60,
        memory_mib: 16 << 10,
        memory_available_mib: 11 << 10,
        disk_total_bytes: 512 << 30,
        free_disk_bytes: 300 << 30,
        images_bytes: 6 << 30,
        vm_disks_bytes: 40 << 30,
        vms: 3,
        ..Default::default()
    };
    let images = vec![
        porthole_api::Image {
            name: "debian-12-netinst.iso".into(),
            size_bytes: 658 << 20,
            format: porthole_api::ImageFormat::Iso,
            used_by: vec!["web-1".into()],
            ..Default::default()
        },
        porthole_api::Image { name: "hello.elf".into(), size_bytes: 12 << 10, ..Default::default() },
    ];
    // The page fetches its data every second: set them, draw a few frames (a grid sizes its columns from
    // the frame before), and again if a fetch came in between.
    for _ in 0..100 {
        {
            let mut m = h.state().backend.model();
            if let Some(host) = m.hosts.first_mut() {
                host.info = Some(info.clone());
            }
            m.host_page = Some((0, porthole::backend::HostPageData::default()));
            m.images.insert(0, images.clone());
        }
        for _ in 0..3 {
            h.step();
        }
        let m = h.state().backend.model();
        let fixed = m.hosts.first().and_then(|h| h.info.as_ref()) == Some(&info)
            && m.host_page.as_ref().is_some_and(|(_, d)| d.stats.is_empty() && d.tasks.is_empty())
            && m.images.get(&0) == Some(&images);
        if fixed {
            return;
        }
    }
    panic!("the host page's data kept changing");
}

/// The list, a VM's settings, the grid, the host page and the shortcuts and preferences dialogs in the light
/// and dark themes (the app's preference), and in the light theme at 2 pixels per point.
#[test]
fn snapshots_in_light_and_dark_and_at_scale_2() {
    let dir = Scratch::new("snapshots-themes");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    three_vms(&d, &rt);
    // One set of results for the test (kittest wants them merged when a test has several harnesses).
    let mut results = egui_kittest::SnapshotResults::new();
    for (theme, ppp, suffix) in [("light", 1.0, "light"), ("dark", 1.0, "dark"), ("light", 2.0, "light_x2")] {
        let mut h = themed_app(&d.socket(), &dir, theme, ppp);
        let shot = |h: &mut Harness<'static, PortholeApp>, screen: &str| {
            let pixels = (1100.0 * 700.0 * ppp * ppp) as usize;
            let options = SnapshotOptions::new().max_failed_pixels(pixels / 1000);
            h.snapshot_options(format!("{screen}_{suffix}"), &options);
        };
        wait(&mut h, "the list", |h| has(h, "Local — 3 VMs"));
        let dark = h.ctx.theme() == egui::Theme::Dark;
        assert_eq!(dark, theme == "dark", "the {theme} theme from the settings");
        h.get_by_label("web-1").click();
        wait(&mut h, "the details", |h| has(h, "Insert ISO…"));
        shot(&mut h, "machine_list");
        h.get_by_label("Settings…").click();
        wait(&mut h, "the settings", |h| has(h, "Settings of web-1"));
        shot(&mut h, "vm_settings");
        h.get_by_label("Back to details").click();
        wait(&mut h, "the details again", |h| has(h, "Insert ISO…"));
        h.get_by_label("Grid").click();
        wait(&mut h, "the grid", |h| h.state().view == porthole::app::MachineView::Grid && has(h, "web-2"));
        shot(&mut h, "machine_grid");
        h.get_by_label("List").click();
        h.get_by_label("Host").click();
        wait(&mut h, "the host page", |h| has(h, "Host Local") && has(h, "Delete hello.elf"));
        fixed_host_page(&mut h);
        shot(&mut h, "host_page");
        h.get_by_label("Machines").click();
        wait(&mut h, "the list again", |h| has(h, "Insert ISO…"));
        h.key_press(egui::Key::F1);
        wait(&mut h, "the shortcuts", |h| has(h, "Shut down the selected VM"));
        shot(&mut h, "shortcuts");
        h.get_by_label("Close window").click();
        wait(&mut h, "the shortcuts closed", |h| !has(h, "Shut down the selected VM"));
        h.get_by_label("Menu").click();
        wait(&mut h, "the menu", |h| has(h, "Preferences…"));
        h.get_by_label("Preferences…").click();
        wait(&mut h, "the preferences", |h| has(h, "Host at start"));
        shot(&mut h, "preferences");
        results.extend_harness(&mut h);
    }
}

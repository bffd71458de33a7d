//! A VM's *Settings* view, driven through its accessibility tree (egui_kittest) against a real `portholed`:
//! every setting of a stopped VM edited in the window and seen in the API (and the disk grown on the host); a
//! setting that needs a stop, changed on a running VM, said to apply at next start and applied after a stop
//! and start, then a vCPU added to the running VM at once; values the host refuses shown under their own fields, with nothing changed.

use std::time::Duration;

use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use porthole::PortholeApp;
use porthole_api::client::Action;
use porthole_api::{BootDevice, DiskFormat, DisplaySpec, DriveKind, InputMode, Vm, VmState};
use porthole_tests::Scratch;
use porthole_tests::daemon::Daemon;

mod common;
use common::*;

const GIB: u64 = 1 << 30;

/// Selects the VM named `name` and opens its Settings view.
fn open_settings(h: &mut Harness<'static, PortholeApp>, name: &str) {
    wait(h, "the VM in the list", |h| has(h, name));
    h.get_all_by_label(name).next().expect("the VM's button").click();
    h.step();
    h.step();
    wait(h, "the details", |h| has(h, "Settings…"));
    press(h, "Settings…");
    wait(h, "the Settings view", |h| has(h, &format!("Settings of {name}")));
}

fn api_vm(d: &Daemon, rt: &tokio::runtime::Runtime, id: &str) -> Vm {
    rt.block_on(d.local().vm(id)).unwrap()
}

/// A small file the library takes as an ISO (the primary volume descriptor's `CD001` at byte 32 769).
fn library_iso(dir: &Scratch, d: &Daemon, rt: &tokio::runtime::Runtime, name: &str) {
    let mut bytes = vec![0u8; 36 << 10];
    bytes[32_768] = 1;
    bytes[32_769..32_774].copy_from_slice(b"CD001");
    let path = dir.path(name);
    std::fs::write(&path, bytes).unwrap();
    rt.block_on(d.local().upload_image(name, &path, |_, _| {})).unwrap();
}

#[test]
fn every_setting_of_a_stopped_vm_is_edited_in_the_window_and_seen_in_the_api() {
    let dir = Scratch::new("gui-settings-all");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm = create_bare_vm(&d, &rt, "editme");
    library_iso(&dir, &d, &rt, "install.iso");
    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 2200.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 1 VMs"));
    open_settings(&mut h, "editme");
    assert!(has_contains(&h, "virtio-blk, qcow2, 1.0 GiB"), "the disk, its bus and format");
    assert!(has_contains(&h, "SCSI CD-ROM (virtio-scsi): empty"));
    assert!(disabled(&h, "Apply") && disabled(&h, "Revert"), "nothing edited yet");

    replace_text(&mut h, "Name", "edited");
    h.get_by_role_and_label(Role::MultilineTextInput, "Description").focus();
    h.step();
    h.get_by_role_and_label(Role::MultilineTextInput, "Description").type_text("The test VM");
    h.step();
    replace_text(&mut h, "Tags", "web, db");
    press(&mut h, "Start with the host");
    replace_text(&mut h, "vCPUs", "2");
    replace_text(&mut h, "Memory (MiB)", "96");
    assert_eq!(vm.input, InputMode::Virtio, "new VMs have virtio input");
    press(&mut h, "PS/2 only");
    type_into(&mut h, "CPU cap (% of one CPU)", "50");
    type_into(&mut h, "CPU weight", "200");
    replace_text(&mut h, "Disk size (GiB)", "2");
    press(&mut h, "Firmware (SeaBIOS)");
    combo(&mut h, "Boot order", "Disk, then CD/DVD");
    press(&mut h, "Offer the boot menu (ESC at start)");
    replace_text(&mut h, "Resolution", "1024x768");
    assert!(!disabled(&h, "Apply"));
    press(&mut h, "Apply");
    wait(&mut h, "the change applied", |h| has_contains(h, "Settings of editme applied"));

    let got = api_vm(&d, &rt, &vm.id);
    assert_eq!(got.name, "edited");
    assert_eq!(got.description, "The test VM");
    assert_eq!(got.tags, ["db", "web"]);
    assert!(got.autostart);
    assert_eq!((got.vcpus, got.memory_mib, got.disk_bytes), (2, 96, 2 * GIB));
    assert!(got.boot.is_none(), "firmware boot");
    assert_eq!(got.boot_order, [BootDevice::Disk, BootDevice::Cdrom]);
    assert!(got.boot_menu);
    assert_eq!(got.display, Some(DisplaySpec { width: 1024, height: 768 }));
    assert_eq!(got.input, InputMode::Ps2, "virtio input switched off");
    assert_eq!((got.cpu_cap_percent, got.cpu_weight), (Some(50), Some(200)));
    assert!(got.pending_changes.is_empty());
    wait(&mut h, "the view follows the host", |h| has(h, "Settings of edited") && disabled(h, "Apply"));

    // Rate limits of the disk: at most 100 operations and 2 MiB written a second.
    type_into(&mut h, "IOPS limit of disk0", "100");
    type_into(&mut h, "write MiB/s limit of disk0", "2");
    press(&mut h, "Limit disk0");
    wait(&mut h, "the limits applied", |h| has_contains(h, "at most 100 IOPS, 2.0 MiB written/s"));
    let limits = api_vm(&d, &rt, &vm.id).drives[0].limits;
    assert_eq!(limits, porthole_api::DiskLimits { iops: Some(100), wbps: Some(2 << 20), ..Default::default() });

    // CD/DVD: a library ISO in, then out.
    combo(&mut h, "Library image", "install.iso");
    press(&mut h, "Insert into cdrom0");
    wait(&mut h, "the ISO in the drive", |h| has_contains(h, "SCSI CD-ROM (virtio-scsi): install.iso"));
    assert_eq!(api_vm(&d, &rt, &vm.id).media.as_deref(), Some("install.iso"));
    press(&mut h, "Eject cdrom0");
    wait(&mut h, "the drive empty", |h| has_contains(h, "SCSI CD-ROM (virtio-scsi): empty"));
    assert_eq!(api_vm(&d, &rt, &vm.id).media, None);

    // Back to a kernel; Revert drops an edit.
    press(&mut h, "Direct kernel boot");
    replace_text(&mut h, "Kernel", &porthole_guests::path("idle").display().to_string());
    replace_text(&mut h, "vCPUs", "3");
    press(&mut h, "Revert");
    assert!(disabled(&h, "Apply"), "reverted");
    assert!(has(&h, "Boot order"), "firmware boot again in the form");
    press(&mut h, "Direct kernel boot");
    replace_text(&mut h, "Kernel", &porthole_guests::path("idle").display().to_string());
    press(&mut h, "Apply");
    wait(&mut h, "the kernel back", |h| {
        h.state().backend.model().notices.iter().filter(|n| n.text.contains("applied")).count() >= 2
    });
    let got = api_vm(&d, &rt, &vm.id);
    let notices = h.state().backend.model().notices.clone();
    assert!(
        got.boot.as_ref().is_some_and(|b| b.kernel == porthole_guests::path("idle").display().to_string()),
        "a kernel again: {got:?} {notices:?}"
    );
    assert_eq!(got.vcpus, 2, "the reverted edit was not sent");
    press(&mut h, "Back to details");
    wait(&mut h, "the details again", |h| has(h, "Settings…"));
}

#[test]
fn a_setting_that_needs_a_stop_waits_for_the_next_start() {
    let dir = Scratch::new("gui-settings-pending");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm = create_bare_vm(&d, &rt, "runner");
    rt.block_on(d.local().action(&vm.id, Action::Start)).unwrap();
    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 2200.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 1 VMs"));
    open_settings(&mut h, "runner");
    wait(&mut h, "the running note", |h| has_contains(h, "The VM is running"));
    replace_text(&mut h, "vCPUs", "2");
    type_into(&mut h, "Most vCPUs", "3");
    h.get_by_role_and_label(Role::MultilineTextInput, "Description").focus();
    h.step();
    h.get_by_role_and_label(Role::MultilineTextInput, "Description").type_text("changed live");
    h.step();
    press(&mut h, "Apply");
    wait(&mut h, "the pending line", |h| has(h, "Pending, applies at next start: vCPUs, most vCPUs"));
    let got = api_vm(&d, &rt, &vm.id);
    assert_eq!(
        (got.vcpus, got.pending_changes.as_slice()),
        (1, ["vcpus".to_owned(), "max_vcpus".to_owned()].as_slice())
    );
    assert_eq!(got.description, "changed live", "what can change live changed at once");
    let shown = h.get_by_role_and_label(Role::TextInput, "vCPUs").accesskit_node().value();
    assert_eq!(shown.as_deref(), Some("2"), "the form shows what the VM will have");

    rt.block_on(d.local().action(&vm.id, Action::Poweroff)).unwrap();
    rt.block_on(porthole_tests::daemon::wait_state(&d.local(), &vm.id, VmState::Stopped, Duration::from_secs(60)));
    let started = rt.block_on(d.local().action(&vm.id, Action::Start)).unwrap();
    assert_eq!((started.vcpus, started.max_vcpus, started.pending_changes.len()), (2, Some(3), 0));
    wait(&mut h, "the pending line gone", |h| !has_contains(h, "applies at next start"));

    // With room for one more, a third vCPU is added to the running VM at once (hot-added).
    wait(&mut h, "the live note", |h| has(h, "More, up to 3, are added to the running VM at once"));
    replace_text(&mut h, "vCPUs", "3");
    press(&mut h, "Apply");
    wait(&mut h, "the change applied", |h| !has_contains(h, "applies at next start") && disabled(h, "Apply"));
    let got = api_vm(&d, &rt, &vm.id);
    assert_eq!((got.vcpus, got.pending_changes.len()), (3, 0), "added now, not at the next start: {got:?}");
    rt.block_on(d.local().action(&vm.id, Action::Poweroff)).unwrap();
}

#[test]
fn a_value_the_host_refuses_shows_under_its_field() {
    let dir = Scratch::new("gui-settings-refused");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm = create_bare_vm(&d, &rt, "strict");
    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 2200.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 1 VMs"));
    open_settings(&mut h, "strict");
    replace_text(&mut h, "Resolution", "333x100");
    replace_text(&mut h, "Memory (MiB)", "1");
    replace_text(&mut h, "Disk size (GiB)", "0.5");
    press(&mut h, "Apply");
    wait(&mut h, "the refusal", |h| has_contains(h, "333x100 is not supported"));
    for (field, part) in [
        ("Resolution", "333x100 is not supported"),
        ("Memory (MiB)", "must be at least"),
        ("Disk size (GiB)", "only grows"),
    ] {
        let input = h.get_by_role_and_label(Role::TextInput, field).rect();
        // The reason nearest below the field (the notice at the bottom of the window says it too).
        let below: Vec<egui::Rect> =
            h.get_all_by_label_contains(part).map(|n| n.rect()).filter(|r| r.top() >= input.bottom() - 1.0).collect();
        let error = *below.iter().min_by(|a, b| a.top().total_cmp(&b.top())).expect("the reason below the field");
        assert!(
            error.top() >= input.bottom() - 1.0
                && error.top() < input.bottom() + 30.0
                && error.left() >= input.left() - 1.0,
            "{field}: the error ({error:?}) is right under its field ({input:?})"
        );
    }
    assert!(!has_contains(&h, "Give WIDTHxHEIGHT"), "only the host's reasons");
    assert_eq!(api_vm(&d, &rt, &vm.id).memory_mib, 64, "nothing changed");
    assert_eq!(api_vm(&d, &rt, &vm.id).display, None);
    // The form's own check: not a resolution at all.
    replace_text(&mut h, "Resolution", "wide");
    press(&mut h, "Apply");
    assert!(has_contains(&h, "Give WIDTHxHEIGHT"));
}

/// The drives of `vm`: (id, format, size, media).
fn drives_of(vm: &Vm) -> Vec<(String, Option<DiskFormat>, u64, Option<String>)> {
    vm.drives.iter().map(|d| (d.id.clone(), d.format, d.size_bytes, d.media.clone())).collect()
}

#[test]
fn disks_and_cd_drives_are_added_grown_and_removed_in_the_window() {
    let dir = Scratch::new("gui-settings-drives");
    let d = Daemon::start(&dir, false, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vm = create_bare_vm(&d, &rt, "drives");
    library_iso(&dir, &d, &rt, "tools.iso");
    // A small raw disk image in the library, to copy.
    let raw = dir.path("data.img");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    rt.block_on(d.local().upload_image("data.img", &raw, |_, _| {})).unwrap();
    let mut h = window(&d.socket(), dir.path("settings.json"), 1400.0, 2400.0);
    wait(&mut h, "the local host", |h| has(h, "Local — 1 VMs"));
    open_settings(&mut h, "drives");

    // A new raw disk of 2 GiB.
    replace_text(&mut h, "New disk size (GiB)", "2");
    combo(&mut h, "New disk format", "raw");
    press(&mut h, "Add disk");
    wait(&mut h, "the new disk's row", |h| has(h, "Remove disk1"));
    assert!(has_contains(&h, "virtio-blk, raw, 2.0 GiB"));
    let got = api_vm(&d, &rt, &vm.id);
    assert_eq!(drives_of(&got)[1], ("disk1".into(), Some(DiskFormat::Raw), 2 * GIB, None));
    // A qcow2 copy of the library's raw image.
    press(&mut h, "Copy of a library image");
    combo(&mut h, "New disk format", "qcow2");
    combo(&mut h, "Library disk image", "data.img");
    press(&mut h, "Add disk");
    wait(&mut h, "the copy's row", |h| has(h, "Remove disk2"));
    let got = api_vm(&d, &rt, &vm.id);
    assert_eq!(drives_of(&got)[2], ("disk2".into(), Some(DiskFormat::Qcow2), 1 << 20, None));
    // disk1 grows to 3 GiB.
    replace_text(&mut h, "Size of disk1 (GiB)", "3");
    press(&mut h, "Grow disk1");
    wait(&mut h, "the grown disk", |h| has_contains(h, "virtio-blk, raw, 3.0 GiB"));
    assert_eq!(api_vm(&d, &rt, &vm.id).drives[1].size_bytes, 3 * GIB);

    // A second CD/DVD drive, an ISO inserted into it.
    press(&mut h, "Add CD/DVD drive");
    wait(&mut h, "the new drive's row", |h| has(h, "Insert into cdrom1"));
    combo(&mut h, "Library image", "tools.iso");
    press(&mut h, "Insert into cdrom1");
    wait(&mut h, "the ISO in cdrom1", |h| has_contains(h, "cdrom1, SCSI CD-ROM (virtio-scsi): tools.iso"));
    let got = api_vm(&d, &rt, &vm.id);
    let cds: Vec<_> = got.drives.iter().filter(|d| d.kind == DriveKind::Cdrom).map(|d| d.media.clone()).collect();
    assert_eq!(cds, [None, Some("tools.iso".to_owned())]);

    // Removing asks first; Cancel keeps the disk.
    press(&mut h, "Remove disk2");
    wait(&mut h, "the question", |h| has(h, "Remove disk2 and delete its data?"));
    press(&mut h, "Cancel");
    assert!(!has(&h, "Remove disk2 and delete its data?"));
    assert_eq!(api_vm(&d, &rt, &vm.id).drives.len(), 5);
    press(&mut h, "Remove disk2");
    press(&mut h, "Yes, remove disk2");
    wait(&mut h, "disk2 gone", |h| !has(h, "Remove disk2"));
    press(&mut h, "Remove cdrom1");
    press(&mut h, "Yes, remove cdrom1");
    wait(&mut h, "cdrom1 gone", |h| !has(h, "Insert into cdrom1"));
    let ids: Vec<String> = api_vm(&d, &rt, &vm.id).drives.iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids, ["disk0", "disk1", "cdrom0"]);
    assert!(disabled(&h, "Remove cdrom0"), "a VM keeps one CD/DVD drive");

    // Running: adding and removing say the VM must stop, and are not offered; a disk grows at once.
    rt.block_on(d.local().action(&vm.id, Action::Start)).unwrap();
    wait(&mut h, "the stop note", |h| has_contains(h, "Stop the VM to add or remove drives"));
    wait(&mut h, "the buttons off", |h| disabled(h, "Add disk") && disabled(h, "Remove disk1"));
    assert!(disabled(&h, "Add CD/DVD drive"));
    assert!(!disabled(&h, "Grow disk1"), "a running VM's disk grows");
    replace_text(&mut h, "Size of disk1 (GiB)", "4");
    press(&mut h, "Grow disk1");
    wait(&mut h, "disk1 grown live", |h| has_contains(h, "Grow disk1 of") && has_contains(h, ": done"));
    let engine = rt.block_on(d.local().vm(&vm.id)).unwrap();
    assert_eq!(drives_of(&engine)[1].2, 4 * GIB, "the running VM's disk1 grew");
    rt.block_on(d.local().action(&vm.id, Action::Poweroff)).unwrap();
}

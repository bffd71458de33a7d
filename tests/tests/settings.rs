//! VM settings through `PATCH /vms/{id}`, end to end with a real portholed: every setting applied and shown
//! by `GET`, passed to the engine's command line (firmware boot order, boot menu, display) and to the disk
//! files (a raw and a qcow2 disk grown, judged by `qemu-img info`); refused fields named one by one with
//! nothing changed; a running VM's hardware changes kept as pending and applied at its next start; a VM marked
//! to start with the host started by a new daemon.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use porthole_api::client::Action;
use porthole_api::{BootDevice, BootSpec, Client, CreateVm, DiskFormat, DisplaySpec, DriveKind, UpdateVm, Vm, VmState};
use porthole_tests::daemon::Daemon;
use porthole_tests::{Scratch, text};

const LIMIT: Duration = Duration::from_secs(120);
const GIB: u64 = 1 << 30;

fn idle_boot() -> BootSpec {
    BootSpec { kernel: porthole_guests::path("idle").display().to_string(), initrd: None, cmdline: String::new() }
}

/// The idle micro-guest with a 1 GiB disk of `format` and no network card.
fn idle_vm(name: &str, format: DiskFormat) -> CreateVm {
    CreateVm {
        boot: Some(idle_boot()),
        disk_gib: 1,
        disk_format: Some(format),
        nics: Some(Vec::new()),
        ..CreateVm::new(name, 1, 64)
    }
}

/// The present disk layer of VM `id` (from its definition).
fn top(d: &Daemon, id: &str) -> PathBuf {
    let dir = d.data.join("vms").join(id);
    let def: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("vm.json")).unwrap()).unwrap();
    dir.join(def["disk"]["top"].as_str().unwrap())
}

/// `qemu-img info`: (format, virtual size).
fn qemu_img_info(path: &Path) -> (String, u64) {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json", path.to_str().unwrap()])
        .output()
        .expect("qemu-img runs: apt-get install qemu-utils (./x does)");
    assert!(out.status.success(), "qemu-img info: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["format"].as_str().unwrap().to_owned(), v["virtual-size"].as_u64().unwrap())
}

fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img").args(["check", "-U", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "qemu-img check: {}{}", text(&out.stdout), text(&out.stderr));
}

/// The command line of VM `id`'s engine process, one argument a string.
fn vmm_args(d: &Daemon, id: &str) -> Vec<String> {
    let pid = std::fs::read_to_string(d.run.join("vms").join(id).join("pid")).unwrap();
    let raw = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(text).collect()
}

/// The argument after `flag` (None: the flag is absent).
fn arg_after(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1).cloned())
}

async fn wait_state(c: &Client, id: &str, state: VmState) -> Vm {
    porthole_tests::daemon::wait_state(c, id, state, LIMIT).await
}

/// The field names of a refused request.
fn refused_fields(e: &porthole_api::ClientError) -> Vec<String> {
    let mut f: Vec<String> = e.fields().iter().map(|f| f.field.clone()).collect();
    f.sort();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_setting_of_a_stopped_vm_applies_and_reaches_the_engine_and_the_disk() {
    let dir = Scratch::new("settings-stopped");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&idle_vm("plain", DiskFormat::Qcow2)).await.unwrap();
    assert_eq!(vm.boot_order, [BootDevice::Cdrom, BootDevice::Disk], "the default order");
    assert!(!vm.autostart && !vm.boot_menu && vm.description.is_empty() && vm.display.is_none());
    let disk = vm.drives.iter().find(|d| d.kind == DriveKind::Disk).expect("the disk is listed");
    assert_eq!((disk.id.as_str(), disk.bus.as_str(), disk.size_bytes), ("disk0", "virtio-blk", GIB));
    assert!(vm.drives.iter().any(|d| d.kind == DriveKind::Cdrom && d.id == "cdrom0" && d.media.is_none()));

    let change = UpdateVm {
        name: Some("renamed".into()),
        vcpus: Some(2),
        memory_mib: Some(96),
        tags: Some(vec!["web".into(), "test".into()]),
        description: Some("Serves the test site.\nSecond line.".into()),
        autostart: Some(true),
        firmware_boot: Some(true),
        boot_order: Some(vec![BootDevice::Disk, BootDevice::Cdrom]),
        boot_menu: Some(true),
        display: Some(DisplaySpec { width: 1024, height: 768 }),
        disk_bytes: Some(2 * GIB),
        ..Default::default()
    };
    let changed = c.update_vm(&vm.id, &change).await.unwrap();
    assert!(changed.pending_changes.is_empty(), "a stopped VM takes every change at once: {changed:?}");
    let got = c.vm(&vm.id).await.unwrap();
    assert_eq!(got.name, "renamed");
    assert_eq!((got.vcpus, got.memory_mib), (2, 96));
    assert_eq!(got.tags, ["test", "web"]);
    assert_eq!(got.description, "Serves the test site.\nSecond line.");
    assert!(got.autostart);
    assert!(got.boot.is_none(), "back to firmware boot");
    assert_eq!(got.boot_order, [BootDevice::Disk, BootDevice::Cdrom]);
    assert!(got.boot_menu);
    assert_eq!(got.display, Some(DisplaySpec { width: 1024, height: 768 }));
    assert_eq!(got.disk_bytes, 2 * GIB);
    assert_eq!(got.drives[0].size_bytes, 2 * GIB);
    assert_eq!(qemu_img_info(&top(&d, &vm.id)), ("qcow2".to_owned(), 2 * GIB), "qemu-img sees the grown disk");
    qemu_img_check(&top(&d, &vm.id));

    // The engine gets them: firmware boot from the disk first, the boot menu, the resolution (the empty disk
    // does not boot; the firmware keeps trying, so the process runs).
    c.action(&vm.id, Action::Start).await.unwrap();
    let args = vmm_args(&d, &vm.id);
    assert_eq!(arg_after(&args, "--boot").as_deref(), Some("disk,cdrom"), "{args:?}");
    assert!(args.iter().any(|a| a == "--boot-menu"), "{args:?}");
    assert_eq!(arg_after(&args, "--display").as_deref(), Some("1024x768"), "{args:?}");
    assert_eq!(arg_after(&args, "--cpus").as_deref(), Some("2"), "{args:?}");
    assert_eq!(arg_after(&args, "--memory").as_deref(), Some("96"), "{args:?}");
    assert!(!args.iter().any(|a| a == "--kernel"), "{args:?}");
    c.action(&vm.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &vm.id, VmState::Stopped).await;

    // Back to a kernel, the default order, no menu.
    let back = UpdateVm {
        boot: Some(idle_boot()),
        boot_order: Some(vec![BootDevice::Cdrom, BootDevice::Disk]),
        boot_menu: Some(false),
        autostart: Some(false),
        ..Default::default()
    };
    let got = c.update_vm(&vm.id, &back).await.unwrap();
    assert_eq!(got.boot, Some(idle_boot()));
    assert_eq!(got.boot_order, [BootDevice::Cdrom, BootDevice::Disk]);
    assert!(!got.boot_menu && !got.autostart);

    // A raw disk grows too (a longer sparse file); a disk never shrinks.
    let raw = c.create_vm(&idle_vm("rawdisk", DiskFormat::Raw)).await.unwrap();
    assert_eq!(raw.drives[0].format, Some(DiskFormat::Raw));
    let got = c.update_vm(&raw.id, &UpdateVm { disk_bytes: Some(3 * GIB), ..Default::default() }).await.unwrap();
    assert_eq!(got.disk_bytes, 3 * GIB);
    assert_eq!(qemu_img_info(&top(&d, &raw.id)), ("raw".to_owned(), 3 * GIB));
    assert_eq!(std::fs::metadata(top(&d, &raw.id)).unwrap().len(), 3 * GIB);
    let e = c.update_vm(&raw.id, &UpdateVm { disk_bytes: Some(GIB), ..Default::default() }).await.unwrap_err();
    assert_eq!((e.status(), refused_fields(&e)), (Some(400), vec!["disk_bytes".to_owned()]), "{e}");
    assert!(e.to_string().contains("only grows"), "{e}");
    assert_eq!(qemu_img_info(&top(&d, &raw.id)).1, 3 * GIB, "unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_fields_are_each_named_and_nothing_changes() {
    let dir = Scratch::new("settings-refused");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&idle_vm("keep", DiskFormat::Qcow2)).await.unwrap();
    c.create_vm(&idle_vm("other", DiskFormat::Qcow2)).await.unwrap();
    let bad = UpdateVm {
        name: Some("other".into()),
        vcpus: Some(0),
        memory_mib: Some(1),
        tags: Some(vec!["has space".into()]),
        description: Some("x".repeat(porthole_api::MAX_DESCRIPTION + 1)),
        autostart: Some(true),
        boot_order: Some(vec![BootDevice::Disk, BootDevice::Disk]),
        display: Some(DisplaySpec { width: 333, height: 100 }),
        disk_bytes: Some(GIB / 2),
        ..Default::default()
    };
    let e = c.update_vm(&vm.id, &bad).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(matches!(&e, porthole_api::ClientError::Api { code, .. } if code == "invalid"), "{e}");
    assert_eq!(
        refused_fields(&e),
        ["boot_order", "description", "disk_bytes", "display", "memory_mib", "name", "tags", "vcpus"],
        "{e}"
    );
    for f in e.fields() {
        assert!(!f.message.is_empty(), "{f:?}");
    }
    assert!(e.fields().iter().any(|f| f.field == "name" && f.message.contains("exists already")), "{e}");
    // Nothing changed, the valid `autostart` neither.
    let after = c.vm(&vm.id).await.unwrap();
    assert_eq!(after, vm);
    assert_eq!(qemu_img_info(&top(&d, &vm.id)).1, GIB);
    // An empty order, a kernel and firmware boot at once.
    let e = c
        .update_vm(
            &vm.id,
            &UpdateVm {
                boot_order: Some(Vec::new()),
                boot: Some(idle_boot()),
                firmware_boot: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused_fields(&e), ["boot", "boot_order"], "{e}");
    // The raw body names the fields too (old clients still get one message).
    assert!(e.to_string().contains("boot_order:"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_keeps_hardware_changes_pending_until_its_next_start() {
    let dir = Scratch::new("settings-pending");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&idle_vm("busy", DiskFormat::Qcow2)).await.unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    let change = UpdateVm {
        vcpus: Some(2),
        memory_mib: Some(80),
        disk_bytes: Some(2 * GIB),
        boot_menu: Some(true),
        display: Some(DisplaySpec { width: 800, height: 600 }),
        description: Some("now".into()),
        tags: Some(vec!["live".into()]),
        nics: Some(vec![porthole_api::NicSpec::new(porthole_api::NicBackend::User)]),
        ..Default::default()
    };
    let got = c.update_vm(&vm.id, &change).await.unwrap();
    assert!(got.nics.is_empty(), "the card comes at the next start");
    assert_eq!(got.state, VmState::Running);
    assert_eq!((got.vcpus, got.memory_mib), (1, 64), "the running VM keeps its vCPUs and memory");
    assert_eq!(got.disk_bytes, 2 * GIB, "the disk grew live (the engine grew it and told the guest)");
    assert_eq!((got.description.as_str(), got.tags.as_slice()), ("now", ["live".to_owned()].as_slice()));
    let mut pending = got.pending_changes.clone();
    pending.sort();
    assert_eq!(pending, ["boot_menu", "display", "memory_mib", "nics", "vcpus"]);
    let p = got.pending.clone().expect("the pending values");
    assert_eq!((p.vcpus, p.memory_mib, p.disk_bytes), (Some(2), Some(80), None));
    assert_eq!(qemu_img_info(&top(&d, &vm.id)).1, 2 * GIB, "the image grew");
    let control = d.run.join("vms").join(&vm.id).join("control.sock");
    let status =
        vmm_core::control::ControlClient::connect(&control).unwrap().request(&vmm_core::control::Request::Status);
    assert_eq!(status.unwrap().status.unwrap().drives[0].size_bytes, 2 * GIB, "the engine serves the new size");
    // A value equal to the present one drops out of the pending changes.
    let got = c.update_vm(&vm.id, &UpdateVm { boot_menu: Some(false), ..Default::default() }).await.unwrap();
    assert!(!got.pending_changes.contains(&"boot_menu".to_owned()), "{:?}", got.pending_changes);
    // Refused fields of a running VM are refused as for a stopped one.
    let e = c.update_vm(&vm.id, &UpdateVm { vcpus: Some(0), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["vcpus"]);

    c.action(&vm.id, Action::Poweroff).await.unwrap();
    let stopped = wait_state(&c, &vm.id, VmState::Stopped).await;
    assert_eq!(stopped.vcpus, 1, "applied at the next start, not at the stop");
    assert!(!stopped.pending_changes.is_empty());
    let started = c.action(&vm.id, Action::Start).await.unwrap();
    assert_eq!((started.vcpus, started.memory_mib, started.disk_bytes), (2, 80, 2 * GIB));
    assert_eq!(started.display, Some(DisplaySpec { width: 800, height: 600 }));
    assert!(started.pending_changes.is_empty() && started.pending.is_none(), "{started:?}");
    let args = vmm_args(&d, &vm.id);
    assert_eq!(arg_after(&args, "--cpus").as_deref(), Some("2"), "{args:?}");
    assert_eq!(arg_after(&args, "--memory").as_deref(), Some("80"), "{args:?}");
    assert_eq!(arg_after(&args, "--display").as_deref(), Some("800x600"), "{args:?}");
    assert_eq!(started.nics.len(), 1, "{started:?}");
    let net = arg_after(&args, "--net").expect("the card on the command line");
    assert!(net.starts_with("user,id=net0,mac=") && net.contains(&started.nics[0].mac), "{net}");
    assert_eq!(qemu_img_info(&top(&d, &vm.id)), ("qcow2".to_owned(), 2 * GIB));
    c.action(&vm.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &vm.id, VmState::Stopped).await;
    qemu_img_check(&top(&d, &vm.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_marked_autostart_starts_with_the_daemon() {
    let dir = Scratch::new("settings-autostart");
    let mut d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let auto = c.create_vm(&idle_vm("auto", DiskFormat::Qcow2)).await.unwrap();
    let manual = c.create_vm(&idle_vm("manual", DiskFormat::Qcow2)).await.unwrap();
    c.update_vm(&auto.id, &UpdateVm { autostart: Some(true), ..Default::default() }).await.unwrap();
    assert_eq!(c.vm(&auto.id).await.unwrap().state, VmState::Stopped, "marking does not start it");
    drop(c);
    d.kill9();
    drop(d);

    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let up = wait_state(&c, &auto.id, VmState::Running).await;
    assert!(up.autostart);
    assert_eq!(c.vm(&manual.id).await.unwrap().state, VmState::Stopped);
    assert!(d.log_text().contains("started with the host (autostart)"), "{}", d.log_text());
    c.action(&auto.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &auto.id, VmState::Stopped).await;
}

/// Waits for a task to end and returns what it made.
async fn done(c: &Client, task: porthole_api::Task) -> String {
    let t = ended(c, task).await;
    assert_eq!(t.state, porthole_api::TaskState::Done, "{t:?}");
    t.result.expect("a finished task says what it made")
}

/// A disk with snapshots grows in its present layer; reverting to a snapshot taken before brings back the
/// size it had then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_disk_with_snapshots_grows_its_present_layer_and_a_revert_brings_the_old_size_back() {
    let dir = Scratch::new("settings-grow-snap");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&idle_vm("layers", DiskFormat::Qcow2)).await.unwrap();
    let take = porthole_api::TakeSnapshot { name: "small".into(), description: String::new(), with_state: None };
    let sid = done(&c, c.take_snapshot(&vm.id, &take).await.unwrap()).await;
    let got = c.update_vm(&vm.id, &UpdateVm { disk_bytes: Some(2 * GIB), ..Default::default() }).await.unwrap();
    assert_eq!(got.disk_bytes, 2 * GIB);
    // The present layer, an overlay on the snapshot's layer, grew; the snapshot's layer keeps its size.
    let present = top(&d, &vm.id);
    assert!(!present.ends_with("disk0.qcow2"), "an overlay: {present:?}");
    assert_eq!(qemu_img_info(&present), ("qcow2".to_owned(), 2 * GIB));
    assert_eq!(qemu_img_info(&d.data.join("vms").join(&vm.id).join("disk0.qcow2")).1, GIB);
    qemu_img_check(&top(&d, &vm.id));
    done(&c, c.revert_snapshot(&vm.id, &sid, false).await.unwrap()).await;
    let back = c.vm(&vm.id).await.unwrap();
    assert_eq!(back.disk_bytes, GIB, "{back:?}");
    assert_eq!(qemu_img_info(&top(&d, &vm.id)).1, GIB);
}

// ---- several disks and CD/DVD drives ----

/// A VM of the virtio-blk micro-guest (it finds up to 4 virtio-blk disks) with a 1 GiB qcow2 disk.
fn blk_vm(name: &str) -> CreateVm {
    CreateVm {
        boot: Some(BootSpec {
            kernel: porthole_guests::path("virtio-blk").display().to_string(),
            initrd: None,
            cmdline: String::new(),
        }),
        disk_gib: 1,
        nics: Some(Vec::new()),
        ..CreateVm::new(name, 1, 64)
    }
}

/// Boots VM `id`'s virtio-blk micro-guest with `words` on its command line and waits for its end; returns
/// its serial lines.
async fn run_blk(c: &Client, id: &str, words: &str) -> Vec<String> {
    porthole_tests::daemon::run_blk_guest(c, id, words, LIMIT).await
}

use porthole_tests::daemon::line_starting as blk_line;

/// The FNV sums the guest printed for its reads of `read=0,1` on disks 0 and 1.
fn sums(lines: &[String]) -> (String, String) {
    let sum =
        |disk: u32| blk_line(lines, &format!("BLK read disk={disk} sector=0")).split("sum=").nth(1).unwrap().to_owned();
    (sum(0), sum(1))
}

/// The file of VM `id`'s disk after the boot disk number `n` (1: the first), from its definition.
fn extra_top(d: &Daemon, id: &str, n: usize) -> PathBuf {
    let dir = d.data.join("vms").join(id);
    let def: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("vm.json")).unwrap()).unwrap();
    dir.join(def["extra_disks"][n - 1]["top"].as_str().unwrap())
}

/// What the running VM's engine says about its drives (id, media file name).
fn engine_drives(d: &Daemon, id: &str) -> Vec<(String, Option<String>)> {
    let control = d.run.join("vms").join(id).join("control.sock");
    let mut client = vmm_core::control::ControlClient::connect(&control).unwrap();
    let status = client.request(&vmm_core::control::Request::Status).unwrap().status.unwrap();
    status
        .drives
        .iter()
        .map(|dr| {
            let media = dr.media.as_ref().and_then(|m| m.file_name()).map(|n| n.to_string_lossy().into_owned());
            (dr.id.clone(), media)
        })
        .collect()
}

fn drive_ids(vm: &Vm) -> Vec<String> {
    vm.drives.iter().map(|d| d.id.clone()).collect()
}

/// `curl` against the daemon's Unix socket: (HTTP status, body).
fn curl(d: &Daemon, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(d.socket())
        .args(["-X", method, "-H", "content-type: application/json", "-d", body])
        .arg(format!("http://localhost/api/v1{path}"))
        .output()
        .expect("curl runs");
    let out = text(&out.stdout);
    let (body, status) = out.trim_end().rsplit_once('\n').unwrap();
    (status.parse().unwrap(), serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_and_cd_drives_are_added_seen_by_the_guest_grown_and_removed() {
    let dir = Scratch::new("settings-drives");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    // A raw library image whose first sector the guest reads back, and an ISO-sized file for the CD drive.
    let images = d.data.join("images");
    let mut base = vec![0u8; 4 << 20];
    base[..512].iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
    std::fs::write(images.join("base.img"), &base).unwrap();
    let mut iso = vec![0u8; 64 * 2048];
    iso[32_769..32_774].copy_from_slice(b"CD001"); // an ISO 9660 volume descriptor's mark
    std::fs::write(images.join("cd.iso"), iso).unwrap();
    let vm = c.create_vm(&blk_vm("drives")).await.unwrap();
    let id = vm.id.clone();
    assert_eq!(drive_ids(&vm), ["disk0", "cdrom0"]);

    // A new empty disk (qcow2 by default) and a raw copy of the library image.
    let d1 = c.add_disk(&id, &porthole_api::AddDisk { size_gib: Some(2), ..Default::default() }).await.unwrap();
    assert_eq!((d1.id.as_str(), d1.format, d1.size_bytes), ("disk1", Some(DiskFormat::Qcow2), 2 * GIB));
    let copy = porthole_api::AddDisk { image: Some("base.img".into()), format: Some(DiskFormat::Raw), size_gib: None };
    let d2 = c.add_disk(&id, &copy).await.unwrap();
    assert_eq!((d2.id.as_str(), d2.format, d2.size_bytes), ("disk2", Some(DiskFormat::Raw), 4 << 20));
    assert_eq!(qemu_img_info(&extra_top(&d, &id, 1)), ("qcow2".to_owned(), 2 * GIB));
    assert_eq!(qemu_img_info(&extra_top(&d, &id, 2)), ("raw".to_owned(), 4 << 20));
    assert_eq!(std::fs::read(extra_top(&d, &id, 2)).unwrap(), base, "a copy of the image");
    // A second CD/DVD drive with the ISO in it.
    let cd1 = c.add_cdrom(&id, Some("cd.iso")).await.unwrap();
    assert_eq!((cd1.id.as_str(), cd1.kind, cd1.media.as_deref()), ("cdrom1", DriveKind::Cdrom, Some("cd.iso")));
    let got = c.vm(&id).await.unwrap();
    assert_eq!(drive_ids(&got), ["disk0", "disk1", "disk2", "cdrom0", "cdrom1"]);
    assert!(
        got.drives
            .iter()
            .all(|dr| dr.bus == if dr.kind == DriveKind::Disk { "virtio-blk" } else { "SCSI CD-ROM (virtio-scsi)" })
    );
    let used: Vec<_> = c.images().await.unwrap().into_iter().filter(|i| i.name == "cd.iso").collect();
    assert_eq!(used[0].used_by, ["drives"], "the second drive's ISO is in use");

    // Disk 1 grows (never shrinks).
    let grown = c.grow_disk(&id, "disk1", 3 * GIB).await.unwrap();
    assert_eq!(grown.size_bytes, 3 * GIB);
    assert_eq!(qemu_img_info(&extra_top(&d, &id, 1)).1, 3 * GIB);
    let e = c.grow_disk(&id, "disk1", GIB).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["size_bytes"], "{e}");

    // The guest finds the three disks with their sizes; it writes disk 1 and reads the copied image on disk 2.
    let lines = run_blk(&c, &id, "disk=1 write=0,1,5 flush disk=2 read=0,1").await;
    assert_eq!(blk_line(&lines, "BLK found="), "BLK found=3", "{lines:#?}");
    assert!(blk_line(&lines, "BLK disk=1 ").contains(&format!("capacity={}", 3 * GIB / 512)), "{lines:#?}");
    assert!(blk_line(&lines, "BLK disk=2 ").contains(&format!("capacity={}", (4 << 20) / 512)), "{lines:#?}");
    assert!(blk_line(&lines, "BLK write disk=1").ends_with("status=0"), "{lines:#?}");
    assert!(blk_line(&lines, "BLK read disk=2").contains("status=0"), "{lines:#?}");
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -P 5 0 1", extra_top(&d, &id, 1).to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!text(&out.stdout).contains("Pattern verification failed"), "{}", text(&out.stdout));

    // Running: the engine has every drive in order, the ISO in the second CD drive; the drive set is frozen.
    let boot = BootSpec { cmdline: "hang".into(), ..blk_vm("x").boot.unwrap() };
    c.update_vm(&id, &UpdateVm { boot: Some(boot), ..Default::default() }).await.unwrap();
    c.action(&id, Action::Start).await.unwrap();
    let args = vmm_args(&d, &id);
    assert_eq!(args.iter().filter(|a| *a == "--disk").count(), 3, "{args:?}");
    assert_eq!(args.iter().filter(|a| *a == "--cdrom").count(), 2, "{args:?}");
    let engine = engine_drives(&d, &id);
    let ids: Vec<&str> = engine.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(ids, ["disk0", "disk1", "disk2", "cdrom0", "cdrom1"]);
    assert_eq!(engine[4].1.as_deref(), Some("cd.iso"));
    let e = c.add_disk(&id, &porthole_api::AddDisk { size_gib: Some(1), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["state"], "{e}");
    assert!(e.to_string().contains("running"), "{e}");
    assert_eq!(refused_fields(&c.add_cdrom(&id, None).await.unwrap_err()), ["state"]);
    assert!(c.remove_disk(&id, "disk2").await.is_err());
    // A disk grows while the VM runs: the engine grows it and tells the guest.
    let grown = c.grow_disk(&id, "disk1", 4 * GIB).await.unwrap();
    assert_eq!(grown.size_bytes, 4 * GIB);
    let control = d.run.join("vms").join(&id).join("control.sock");
    let status =
        vmm_core::control::ControlClient::connect(&control).unwrap().request(&vmm_core::control::Request::Status);
    assert_eq!(status.unwrap().status.unwrap().drives[1].size_bytes, 4 * GIB, "the engine serves the new size");
    let e = c.grow_disk(&id, "disk1", 3 * GIB).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["size_bytes"], "{e}");
    // Media changes live, per drive.
    c.change_drive_media(&id, Some("cdrom1"), None).await.unwrap();
    c.change_drive_media(&id, Some("cdrom0"), Some("cd.iso")).await.unwrap();
    let engine = engine_drives(&d, &id);
    assert_eq!((engine[3].1.as_deref(), engine[4].1.as_deref()), (Some("cd.iso"), None));
    let got = c.vm(&id).await.unwrap();
    assert_eq!((got.drives[3].media.as_deref(), got.drives[4].media.as_deref()), (Some("cd.iso"), None));
    let e = c.change_drive_media(&id, Some("cdrom7"), None).await.unwrap_err();
    assert!(e.to_string().contains("cdrom7"), "{e}");
    c.action(&id, Action::Poweroff).await.unwrap();
    wait_state(&c, &id, VmState::Stopped).await;

    // Refused requests name their fields.
    let e = c
        .add_disk(
            &id,
            &porthole_api::AddDisk { size_gib: Some(0), image: Some("nope.img".into()), ..Default::default() },
        )
        .await
        .unwrap_err();
    assert_eq!(refused_fields(&e), ["image", "size_gib"], "{e}");
    let e = c.add_disk(&id, &porthole_api::AddDisk { image: Some("cd.iso".into()), ..Default::default() }).await;
    assert!(e.unwrap_err().to_string().contains("ISO"));
    let (status, body) = curl(&d, "POST", &format!("/vms/{id}/disks"), r#"{"size_gib":1,"format":"vmdk"}"#);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["fields"][0]["field"], "format", "{body}");
    // Up to 6 disks and 8 drives in all: three more disks fit, a fourth does not.
    for n in 3..6 {
        let dr = c.add_disk(&id, &porthole_api::AddDisk { size_gib: Some(1), ..Default::default() }).await.unwrap();
        assert_eq!(dr.id, format!("disk{n}"));
    }
    let e = c.add_disk(&id, &porthole_api::AddDisk { size_gib: Some(1), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["drives"], "{e}");
    assert_eq!(refused_fields(&c.add_cdrom(&id, None).await.unwrap_err()), ["drives"]);

    // Removing: the boot disk stays; another disk goes with its file; the later disks move up.
    let e = c.remove_disk(&id, "disk0").await.unwrap_err();
    assert!(e.to_string().contains("boot disk"), "{e}");
    let file = extra_top(&d, &id, 2);
    c.remove_disk(&id, "disk2").await.unwrap();
    assert!(!file.exists(), "its file is deleted");
    for n in (2..5).rev() {
        c.remove_disk(&id, &format!("disk{n}")).await.unwrap();
    }
    let got = c.vm(&id).await.unwrap();
    assert_eq!(drive_ids(&got), ["disk0", "disk1", "cdrom0", "cdrom1"]);
    assert_eq!(got.drives[1].size_bytes, 4 * GIB, "disk1 is the grown one");
    // The first CD drive goes: the second one (empty) moves up; the last one stays.
    c.remove_cdrom(&id, "cdrom0").await.unwrap();
    let got = c.vm(&id).await.unwrap();
    assert_eq!(drive_ids(&got), ["disk0", "disk1", "cdrom0"]);
    assert_eq!(got.drives[2].media, None);
    let e = c.remove_cdrom(&id, "cdrom0").await.unwrap_err();
    assert!(e.to_string().contains("only CD/DVD drive"), "{e}");
    // A new daemon reads the same drives from vm.json.
    drop(c);
    drop(d);
    let d = Daemon::start(&dir, false, &[]);
    assert_eq!(drive_ids(&d.local().vm(&id).await.unwrap()), ["disk0", "disk1", "cdrom0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_clones_of_a_vm_with_two_disks_cover_both_disks() {
    let dir = Scratch::new("settings-drives-snap");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&blk_vm("two")).await.unwrap();
    let id = vm.id.clone();
    c.add_disk(&id, &porthole_api::AddDisk { size_gib: Some(1), ..Default::default() }).await.unwrap();
    let before =
        sums(&run_blk(&c, &id, "write=0,1,1 flush disk=1 write=0,1,2 flush disk=0 read=0,1 disk=1 read=0,1").await);
    assert_ne!(before.0, before.1, "different bytes on each disk");

    let take = porthole_api::TakeSnapshot { name: "both".into(), description: String::new(), with_state: None };
    let sid = done(&c, c.take_snapshot(&id, &take).await.unwrap()).await;
    let tree = c.snapshots(&id).await.unwrap();
    assert_eq!(tree.snapshots.len(), 1);
    // Both disks moved onto new layers; the frozen ones are in the definition.
    let def: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.data.join("vms").join(&id).join("vm.json")).unwrap()).unwrap();
    assert_eq!(def["snapshots"][0]["extra_layers"].as_array().unwrap().len(), 1, "{def}");
    assert!(extra_top(&d, &id, 1).file_name().unwrap().to_str().unwrap().starts_with("layer-"));
    // The drive set cannot change while the VM has snapshots.
    let e = c.add_disk(&id, &porthole_api::AddDisk { size_gib: Some(1), ..Default::default() }).await.unwrap_err();
    assert!(e.to_string().contains("delete the VM's snapshots first"), "{e}");
    assert_eq!(refused_fields(&e), ["state"]);
    assert!(c.remove_disk(&id, "disk1").await.unwrap_err().to_string().contains("snapshots"));

    // Both disks change, then the revert brings both back.
    let changed =
        sums(&run_blk(&c, &id, "write=0,1,3 flush disk=1 write=0,1,4 flush disk=0 read=0,1 disk=1 read=0,1").await);
    assert!(changed.0 != before.0 && changed.1 != before.1);
    done(&c, c.revert_snapshot(&id, &sid, false).await.unwrap()).await;
    assert_eq!(sums(&run_blk(&c, &id, "read=0,1 disk=1 read=0,1").await), before, "both disks as they were");
    qemu_img_check(&extra_top(&d, &id, 1));

    // A running VM with two disks: a disk-only snapshot is refused (one disk moves at a time).
    // The ticker micro-guest, saved once it ticks (a machine is saved once its vCPUs run).
    let boot = BootSpec { kernel: porthole_guests::path("ticker").display().to_string(), ..idle_boot() };
    c.update_vm(&id, &UpdateVm { boot: Some(boot), ..Default::default() }).await.unwrap();
    c.action(&id, Action::Start).await.unwrap();
    let live = porthole_api::TakeSnapshot { name: "live".into(), description: String::new(), with_state: Some(false) };
    let e = c.take_snapshot(&id, &live).await.unwrap_err();
    assert!(e.to_string().contains("2 disks"), "{e}");
    let deadline = std::time::Instant::now() + LIMIT;
    while !c.serial(&id, 100).await.unwrap().lines.iter().any(|l| !l.trim().is_empty()) {
        assert!(std::time::Instant::now() < deadline, "the ticker never ticked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // With its machine state: both disks frozen, the VM runs on with the same drives.
    let with = porthole_api::TakeSnapshot { name: "running".into(), description: String::new(), with_state: None };
    let rid = done(&c, c.take_snapshot(&id, &with).await.unwrap()).await;
    // The engine's drives: both disks on their present layers (from the definition), the CD/DVD drive.
    let running_drives = || {
        let name = |p: PathBuf| Some(p.file_name().unwrap().to_string_lossy().into_owned());
        vec![
            ("disk0".to_owned(), name(top(&d, &id))),
            ("disk1".to_owned(), name(extra_top(&d, &id, 1))),
            ("cdrom0".to_owned(), None),
        ]
    };
    wait_state(&c, &id, VmState::Running).await;
    assert_eq!(engine_drives(&d, &id), running_drives());
    let def: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.data.join("vms").join(&id).join("vm.json")).unwrap()).unwrap();
    assert_eq!(def["snapshots"][1]["extra_layers"].as_array().unwrap().len(), 1, "{def}");
    // Suspended: the drive set stays as the saved state has it; the resumed VM has both disks.
    c.action(&id, Action::Suspend).await.unwrap();
    wait_state(&c, &id, VmState::Suspended).await;
    let e = c.add_cdrom(&id, None).await.unwrap_err();
    assert!(e.to_string().contains("suspended"), "{e}");
    c.action(&id, Action::Start).await.unwrap();
    assert_eq!(engine_drives(&d, &id), running_drives());
    c.action(&id, Action::Poweroff).await.unwrap();
    wait_state(&c, &id, VmState::Stopped).await;
    // A snapshot holding a machine state freezes the CD/DVD drives too.
    let e = c.add_cdrom(&id, None).await.unwrap_err();
    assert!(e.to_string().contains("holds a running machine"), "{e}");
    // Reverting to it resumes the machine on both disks.
    done(&c, c.revert_snapshot(&id, &rid, false).await.unwrap()).await;
    wait_state(&c, &id, VmState::Running).await;
    assert_eq!(engine_drives(&d, &id), running_drives());
    c.action(&id, Action::Poweroff).await.unwrap();
    wait_state(&c, &id, VmState::Stopped).await;
    done(&c, c.delete_snapshot(&id, &rid).await.unwrap()).await;

    // Full and linked clones get both disks with the same contents.
    for linked in [false, true] {
        let name = if linked { "linked" } else { "full" };
        let clone = porthole_api::CloneVm { name: name.into(), linked };
        let cid = done(&c, c.clone_vm(&id, &clone).await.unwrap()).await;
        let cvm = c.vm(&cid).await.unwrap();
        assert_eq!(drive_ids(&cvm), ["disk0", "disk1", "cdrom0"], "{name}");
        if !linked {
            let def: serde_json::Value =
                serde_json::from_slice(&std::fs::read(d.data.join("vms").join(&cid).join("vm.json")).unwrap()).unwrap();
            assert_eq!(def["extra_disks"][0]["top"], "disk1.qcow2", "{def}");
        }
        assert_eq!(sums(&run_blk(&c, &cid, "read=0,1 disk=1 read=0,1").await), before, "{name}");
        c.delete_vm(&cid).await.unwrap();
    }

    // Deleting the snapshot merges both disks' layers; the contents stay.
    let present = sums(&run_blk(&c, &id, "disk=1 write=0,1,9 flush disk=0 read=0,1 disk=1 read=0,1").await);
    let task = c.delete_snapshot(&id, &sid).await.unwrap();
    done(&c, task).await;
    assert!(c.snapshots(&id).await.unwrap().snapshots.is_empty());
    assert_eq!(sums(&run_blk(&c, &id, "read=0,1 disk=1 read=0,1").await), present);
    let files: Vec<String> = std::fs::read_dir(d.data.join("vms").join(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("qcow2"))
        .collect();
    assert_eq!(files.len(), 2, "one file per disk left: {files:?}");
    // Without snapshots the second disk can go again.
    c.remove_disk(&id, "disk1").await.unwrap();
}

/// Waits for a task to end and returns it.
async fn ended(c: &Client, task: porthole_api::Task) -> porthole_api::Task {
    let deadline = std::time::Instant::now() + LIMIT;
    let mut t = task;
    while t.state == porthole_api::TaskState::Running {
        assert!(std::time::Instant::now() < deadline, "task never ended: {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        t = c.task(&t.id).await.unwrap();
    }
    t
}

/// The names of the files in VM `id`'s folder, and its definition's bytes.
fn folder(d: &Daemon, id: &str) -> (Vec<String>, Vec<u8>) {
    let dir = d.data.join("vms").join(id);
    let mut files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    (files, std::fs::read(dir.join("vm.json")).unwrap())
}

/// A snapshot take or revert that fails on the second disk (its image made unreadable) leaves the VM as it
/// was: no new layer of the first disk is kept, the definition is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_fails_on_the_second_disk_changes_nothing() {
    let dir = Scratch::new("settings-drives-atomic");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let id = c.create_vm(&blk_vm("halfway")).await.unwrap().id;
    c.add_disk(&id, &porthole_api::AddDisk { size_gib: Some(1), ..Default::default() }).await.unwrap();
    let second = extra_top(&d, &id, 1);
    let good = std::fs::read(&second).unwrap();
    // A qcow2 header of version 0: no image can be read from it.
    let mut bad = b"QFI\xfb".to_vec();
    bad.resize(512, 0);
    std::fs::write(&second, &bad).unwrap();
    let before = folder(&d, &id);
    let take = porthole_api::TakeSnapshot { name: "s".into(), description: String::new(), with_state: None };
    let t = ended(&c, c.take_snapshot(&id, &take).await.unwrap()).await;
    assert_eq!(t.state, porthole_api::TaskState::Failed, "{t:?}");
    assert_eq!(folder(&d, &id), before, "no layer kept, the definition unchanged");
    assert!(c.snapshots(&id).await.unwrap().snapshots.is_empty());

    // The same for a revert: the second disk's frozen layer unreadable.
    std::fs::write(&second, &good).unwrap();
    let sid = done(&c, c.take_snapshot(&id, &take).await.unwrap()).await;
    let def: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.data.join("vms").join(&id).join("vm.json")).unwrap()).unwrap();
    let frozen = d.data.join("vms").join(&id).join(def["snapshots"][0]["extra_layers"][0].as_str().unwrap());
    assert_eq!(frozen, second, "the disk's former present layer is the snapshot's");
    std::fs::write(&frozen, &bad).unwrap();
    let before = folder(&d, &id);
    let t = ended(&c, c.revert_snapshot(&id, &sid, false).await.unwrap()).await;
    assert_eq!(t.state, porthole_api::TaskState::Failed, "{t:?}");
    assert_eq!(folder(&d, &id), before, "no layer kept, the definition unchanged");
    std::fs::write(&frozen, &good).unwrap();
    done(&c, c.revert_snapshot(&id, &sid, false).await.unwrap()).await;
    qemu_img_check(&extra_top(&d, &id, 1));
}

/// A VM booting the pci-scan micro-guest (no disk, no network), its other settings from `set`.
fn pci_scan_vm(name: &str, set: impl FnOnce(&mut CreateVm)) -> CreateVm {
    let mut req = CreateVm {
        boot: Some(BootSpec {
            kernel: porthole_guests::path("pci-scan").display().to_string(),
            initrd: None,
            cmdline: String::new(),
        }),
        disk_gib: 0,
        nics: Some(Vec::new()),
        ..CreateVm::new(name, 1, 64)
    };
    set(&mut req);
    req
}

/// Starts VM `id` (booting pci-scan), waits for it to stop and returns the `PCI slot=` lines it printed.
async fn pci_devices(c: &Client, id: &str) -> Vec<String> {
    c.action(id, Action::Start).await.unwrap();
    wait_state(c, id, VmState::Stopped).await;
    let lines = c.serial(id, 100).await.unwrap().lines;
    assert!(lines.iter().any(|l| l.contains("PCI-SCAN-DONE")), "{lines:#?}");
    lines.into_iter().filter(|l| l.starts_with("PCI slot=")).collect()
}

/// Virtio input: new VMs get it (the guest finds two virtio-input devices, the tablet and the keyboard, on
/// its PCI bus), `input: ps2` leaves them out; a running VM says whether its pointer is absolute and its
/// keys go to the virtio keyboard yet (the micro-guest has no virtio-input driver: no); switching to PS/2 on
/// a running VM waits for its next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_vms_have_virtio_input_that_the_guest_sees_and_it_can_be_switched_off() {
    use porthole_api::InputMode;
    let dir = Scratch::new("settings-input");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let request = |name: &str, input: Option<InputMode>| pci_scan_vm(name, |r| r.input = input);
    let devices = |id: String| {
        let c = c.clone();
        async move { pci_devices(&c, &id).await }
    };
    let with = c.create_vm(&request("virtio-input", None)).await.unwrap();
    assert_eq!(with.input, InputMode::Virtio, "new VMs get virtio input");
    let seen = devices(with.id.clone()).await;
    assert_eq!(seen.iter().filter(|l| l.contains("id=1af4:1052")).count(), 2, "tablet and keyboard: {seen:#?}");
    let without = c.create_vm(&request("ps2-only", Some(InputMode::Ps2))).await.unwrap();
    assert_eq!(without.input, InputMode::Ps2);
    let seen = devices(without.id.clone()).await;
    assert!(!seen.iter().any(|l| l.contains("id=1af4:1052")), "{seen:#?}");

    // A running VM: its pointer is not absolute nor its keys on the virtio keyboard until the guest loads a
    // virtio-input driver (the idle guest never does); switching to PS/2 waits for the next start.
    c.update_vm(&with.id, &UpdateVm { boot: Some(idle_boot()), ..Default::default() }).await.unwrap();
    c.action(&with.id, Action::Start).await.unwrap();
    wait_state(&c, &with.id, VmState::Running).await;
    let vm = c.vm(&with.id).await.unwrap();
    assert_eq!((vm.absolute_pointer, vm.virtio_keyboard), (Some(false), Some(false)), "{vm:?}");
    let input_arg = |id: &str| {
        let args = vmm_args(&d, id);
        args.iter().position(|a| a == "--input").and_then(|i| args.get(i + 1).cloned())
    };
    assert_eq!(input_arg(&with.id).as_deref(), Some("virtio"));
    let vm = c.update_vm(&with.id, &UpdateVm { input: Some(InputMode::Ps2), ..Default::default() }).await.unwrap();
    assert!(vm.input == InputMode::Virtio && vm.pending_changes == ["input"], "{vm:?}");
    c.action(&with.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &with.id, VmState::Stopped).await;
    c.action(&with.id, Action::Start).await.unwrap();
    wait_state(&c, &with.id, VmState::Running).await;
    assert_eq!(input_arg(&with.id).as_deref(), Some("ps2"), "applied at the next start");
    let vm = c.vm(&with.id).await.unwrap();
    assert!(vm.input == InputMode::Ps2 && vm.absolute_pointer.is_none() && vm.virtio_keyboard.is_none(), "{vm:?}");
    c.action(&with.id, Action::Poweroff).await.unwrap();
}

/// The display adapter: new VMs get virtio-vga (the guest finds 1af4:1050 where the std VGA, 1234:1111,
/// was), `vga: std` keeps the std VGA; a running VM says whether its screen follows the window yet (the
/// micro-guest has no virtio-gpu driver: no); switching on a running VM waits for its next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_vms_have_a_virtio_display_that_the_guest_sees_and_it_can_be_switched() {
    use porthole_api::VgaMode;
    let dir = Scratch::new("settings-vga");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let request = |name: &str, vga: Option<VgaMode>| pci_scan_vm(name, |r| r.vga = vga);
    let devices = |id: String| {
        let c = c.clone();
        async move { pci_devices(&c, &id).await }
    };
    let with = c.create_vm(&request("virtio-vga", None)).await.unwrap();
    assert_eq!(with.vga, VgaMode::Virtio, "new VMs get virtio-vga");
    let seen = devices(with.id.clone()).await;
    assert_eq!(seen.iter().filter(|l| l.contains("id=1af4:1050")).count(), 1, "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains("id=1234:1111")), "{seen:#?}");
    let std = c.create_vm(&request("std-vga", Some(VgaMode::Std))).await.unwrap();
    assert_eq!(std.vga, VgaMode::Std);
    let seen = devices(std.id.clone()).await;
    assert!(seen.iter().any(|l| l.contains("id=1234:1111")) && !seen.iter().any(|l| l.contains("id=1af4:1050")));

    c.update_vm(&with.id, &UpdateVm { boot: Some(idle_boot()), ..Default::default() }).await.unwrap();
    c.action(&with.id, Action::Start).await.unwrap();
    wait_state(&c, &with.id, VmState::Running).await;
    let vm = c.vm(&with.id).await.unwrap();
    assert_eq!(vm.display_follows, Some(false), "no virtio-gpu driver in the guest: {vm:?}");
    let vga_arg = |id: &str| arg_after(&vmm_args(&d, id), "--vga");
    assert_eq!(vga_arg(&with.id).as_deref(), Some("virtio"));
    let vm = c.update_vm(&with.id, &UpdateVm { vga: Some(VgaMode::Std), ..Default::default() }).await.unwrap();
    assert!(vm.vga == VgaMode::Virtio && vm.pending_changes == ["vga"], "{vm:?}");
    c.action(&with.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &with.id, VmState::Stopped).await;
    c.action(&with.id, Action::Start).await.unwrap();
    wait_state(&c, &with.id, VmState::Running).await;
    assert_eq!(vga_arg(&with.id).as_deref(), Some("std"), "applied at the next start");
    let vm = c.vm(&with.id).await.unwrap();
    assert!(vm.vga == VgaMode::Std && vm.display_follows.is_none(), "{vm:?}");
    c.action(&with.id, Action::Poweroff).await.unwrap();
}

/// The guest agent's port: new VMs get one (the guest finds a virtio-console, 1af4:1043), `agent: none`
/// has none; a running VM says whether the guest's agent is connected (the micro-guest runs none: no);
/// removing it from a running VM waits for its next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_vms_have_an_agent_port_that_the_guest_sees_and_it_can_be_removed() {
    use porthole_api::AgentMode;
    let dir = Scratch::new("settings-agent");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let request = |name: &str, agent: Option<AgentMode>| pci_scan_vm(name, |r| r.agent = agent);
    let with = c.create_vm(&request("with-agent", None)).await.unwrap();
    assert_eq!(with.agent, AgentMode::Spice, "new VMs get the agent's port");
    let seen = pci_devices(&c, &with.id).await;
    assert_eq!(seen.iter().filter(|l| l.contains("id=1af4:1043")).count(), 1, "{seen:#?}");
    let without = c.create_vm(&request("no-agent", Some(AgentMode::None))).await.unwrap();
    assert_eq!(without.agent, AgentMode::None);
    let seen = pci_devices(&c, &without.id).await;
    assert!(!seen.iter().any(|l| l.contains("id=1af4:1043")), "{seen:#?}");

    c.update_vm(&with.id, &UpdateVm { boot: Some(idle_boot()), ..Default::default() }).await.unwrap();
    c.action(&with.id, Action::Start).await.unwrap();
    wait_state(&c, &with.id, VmState::Running).await;
    let vm = c.vm(&with.id).await.unwrap();
    assert_eq!(vm.agent_connected, Some(false), "no agent in the guest: {vm:?}");
    let agent_arg = |id: &str| arg_after(&vmm_args(&d, id), "--agent");
    assert_eq!(agent_arg(&with.id).as_deref(), Some("spice"));
    let vm = c.update_vm(&with.id, &UpdateVm { agent: Some(AgentMode::None), ..Default::default() }).await.unwrap();
    assert!(vm.agent == AgentMode::Spice && vm.pending_changes == ["agent"], "{vm:?}");
    c.action(&with.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &with.id, VmState::Stopped).await;
    c.action(&with.id, Action::Start).await.unwrap();
    wait_state(&c, &with.id, VmState::Running).await;
    assert_eq!(agent_arg(&with.id).as_deref(), Some("none"), "applied at the next start");
    let vm = c.vm(&with.id).await.unwrap();
    assert!(vm.agent == AgentMode::None && vm.agent_connected.is_none(), "{vm:?}");
    c.action(&with.id, Action::Poweroff).await.unwrap();
}

/// The sound card: new VMs get Intel HD Audio (the guest finds 8086:293e), `sound: virtio` gives
/// virtio-sound (1af4:1059), `none` neither; changing it on a running VM waits for its next start, and the
/// engine's status reports the card (not playing: the micro-guest plays nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_vms_have_a_sound_card_that_the_guest_sees_and_it_can_be_changed() {
    use porthole_api::SoundMode;
    let dir = Scratch::new("settings-sound");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let request = |name: &str, sound: Option<SoundMode>| pci_scan_vm(name, |r| r.sound = sound);
    let hda = c.create_vm(&request("with-hda", None)).await.unwrap();
    assert_eq!(hda.sound, SoundMode::Hda, "new VMs get HD Audio");
    let seen = pci_devices(&c, &hda.id).await;
    assert_eq!(seen.iter().filter(|l| l.contains("id=8086:293e")).count(), 1, "{seen:#?}");
    let virtio = c.create_vm(&request("with-virtio-sound", Some(SoundMode::Virtio))).await.unwrap();
    let seen = pci_devices(&c, &virtio.id).await;
    assert!(seen.iter().any(|l| l.contains("id=1af4:1059")), "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains("id=8086:293e")), "{seen:#?}");
    let none = c.create_vm(&request("silent", Some(SoundMode::None))).await.unwrap();
    let seen = pci_devices(&c, &none.id).await;
    assert!(!seen.iter().any(|l| l.contains("id=8086:293e") || l.contains("id=1af4:1059")), "{seen:#?}");

    c.update_vm(&hda.id, &UpdateVm { boot: Some(idle_boot()), ..Default::default() }).await.unwrap();
    c.action(&hda.id, Action::Start).await.unwrap();
    wait_state(&c, &hda.id, VmState::Running).await;
    let sound_arg = |id: &str| arg_after(&vmm_args(&d, id), "--sound");
    assert_eq!(sound_arg(&hda.id).as_deref(), Some("hda"));
    let control = d.run.join("vms").join(&hda.id).join("control.sock");
    let mut client = vmm_core::control::ControlClient::connect(&control).unwrap();
    let status = client.request(&vmm_core::control::Request::Status).unwrap().status.unwrap();
    let sound = status.sound.expect("the engine reports its sound card");
    assert!(!sound.playing && sound.played_frames == 0, "{sound:?}");
    let vm = c.update_vm(&hda.id, &UpdateVm { sound: Some(SoundMode::Virtio), ..Default::default() }).await.unwrap();
    assert!(vm.sound == SoundMode::Hda && vm.pending_changes == ["sound"], "{vm:?}");
    c.action(&hda.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &hda.id, VmState::Stopped).await;
    c.action(&hda.id, Action::Start).await.unwrap();
    wait_state(&c, &hda.id, VmState::Running).await;
    assert_eq!(sound_arg(&hda.id).as_deref(), Some("virtio"), "applied at the next start");
    assert_eq!(c.vm(&hda.id).await.unwrap().sound, SoundMode::Virtio);
    c.action(&hda.id, Action::Poweroff).await.unwrap();
}

/// A disk's rate limits: set on a stopped VM (kept in its definition, given to the engine at start), changed
/// on a running one (the engine takes them at once), refused when absurd (each field named, nothing
/// changed); the guest's requests still all complete under a tight limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_rate_limits_reach_the_engine_at_start_and_live() {
    use porthole_api::DiskLimits;
    let dir = Scratch::new("settings-disk-limits");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&idle_vm("limited", DiskFormat::Qcow2)).await.unwrap();
    let limits = DiskLimits { riops: Some(20), wbps: Some(1 << 20), ..Default::default() };
    let drive = c.set_disk_limits(&vm.id, "disk0", &limits).await.unwrap();
    assert_eq!(drive.limits, limits);
    assert_eq!(c.vm(&vm.id).await.unwrap().drives[0].limits, limits, "kept in the definition");

    let bad = DiskLimits { iops: Some(0), bps: Some(u64::MAX), ..Default::default() };
    let e = c.set_disk_limits(&vm.id, "disk0", &bad).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["bps", "iops"]);
    assert!(c.set_disk_limits(&vm.id, "disk7", &limits).await.is_err(), "no such disk");
    assert_eq!(c.vm(&vm.id).await.unwrap().drives[0].limits, limits, "nothing changed");

    // The guest reads its disk 40 times under 20 reads/s: every read completes.
    let words = vec!["read=0,1"; 40].join(" ");
    let lines = run_blk(&c, &vm.id, &words).await;
    let reads = lines.iter().filter(|l| l.starts_with("BLK read disk=0") && l.contains("status=0")).count();
    assert_eq!(reads, 40, "{lines:#?}");

    // Running: the engine was given the limits, and takes new ones at once.
    c.update_vm(&vm.id, &UpdateVm { boot: Some(idle_boot()), ..Default::default() }).await.unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    wait_state(&c, &vm.id, VmState::Running).await;
    let disk = vmm_args(&d, &vm.id).into_iter().find(|a| a.contains("format=qcow2")).unwrap();
    assert!(disk.ends_with(",riops=20,wbps=1048576"), "{disk}");
    let engine_limits = || {
        let control = d.run.join("vms").join(&vm.id).join("control.sock");
        let mut client = vmm_core::control::ControlClient::connect(&control).unwrap();
        let status = client.request(&vmm_core::control::Request::Status).unwrap().status.unwrap();
        status.drives[0].limits
    };
    assert_eq!(engine_limits().riops, Some(20));
    let live = DiskLimits { iops: Some(500), ..Default::default() };
    c.set_disk_limits(&vm.id, "disk0", &live).await.unwrap();
    let now = engine_limits();
    assert_eq!((now.iops, now.riops, now.wbps), (Some(500), None, None), "{now:?}");
    c.set_disk_limits(&vm.id, "disk0", &DiskLimits::default()).await.unwrap();
    assert!(engine_limits().is_none() && c.vm(&vm.id).await.unwrap().drives[0].limits.is_none());
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

/// A network card's rate limits: set on a stopped VM (kept in its definition, given to the engine at start),
/// changed on a running one (the engine takes them at once), refused when absurd (each field named, nothing
/// changed), and kept when the cards are edited without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_rate_limits_reach_the_engine_at_start_and_live() {
    use porthole_api::{NicBackend, NicLimits, NicSpec};
    let dir = Scratch::new("settings-nic-limits");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let create = CreateVm { nics: Some(vec![NicSpec::new(NicBackend::User)]), ..idle_vm("shaped", DiskFormat::Qcow2) };
    let vm = c.create_vm(&create).await.unwrap();
    let limits = NicLimits { rx_bps: Some(100_000_000), tx_bps: Some(8_000_000) };
    let card = c.set_nic_limits(&vm.id, "net0", &limits).await.unwrap();
    assert_eq!(card.limits, limits);
    assert_eq!(c.vm(&vm.id).await.unwrap().nics[0].limits, limits, "kept in the definition");
    let bad = NicLimits { rx_bps: Some(0), tx_bps: Some(u64::MAX) };
    let e = c.set_nic_limits(&vm.id, "net0", &bad).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["rx_bps", "tx_bps"]);
    assert!(c.set_nic_limits(&vm.id, "net7", &limits).await.is_err(), "no such card");
    assert_eq!(c.vm(&vm.id).await.unwrap().nics[0].limits, limits, "nothing changed");
    // Editing the cards without limits keeps them.
    let mut spec = NicSpec::from(&c.vm(&vm.id).await.unwrap().nics[0]);
    spec.limits = None;
    spec.mtu = Some(9000);
    let got = c.update_vm(&vm.id, &UpdateVm { nics: Some(vec![spec]), ..Default::default() }).await.unwrap();
    assert_eq!((got.nics[0].mtu, got.nics[0].limits), (9000, limits));

    c.action(&vm.id, Action::Start).await.unwrap();
    wait_state(&c, &vm.id, VmState::Running).await;
    let net = arg_after(&vmm_args(&d, &vm.id), "--net").unwrap();
    assert!(net.ends_with(",rx=100000000,tx=8000000"), "{net}");
    let status = |c: &Client| {
        let (c, id) = (c.clone(), vm.id.clone());
        async move { c.vm(&id).await.unwrap().nic_status.remove(0) }
    };
    assert_eq!(status(&c).await.limits, limits, "the engine has them");
    let live = NicLimits { rx_bps: None, tx_bps: Some(20_000_000) };
    c.set_nic_limits(&vm.id, "net0", &live).await.unwrap();
    assert_eq!(status(&c).await.limits, live, "taken at once");
    c.set_nic_limits(&vm.id, "net0", &NicLimits::default()).await.unwrap();
    assert!(status(&c).await.limits.is_none() && c.vm(&vm.id).await.unwrap().nics[0].limits.is_none());
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

/// CPU seconds the process `pid` has used (all its threads), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) — utime and stime are the 14th and 15th overall.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The share of a CPU process `pid` uses over `seconds`.
fn cpu_share(pid: u32, seconds: f64) -> f64 {
    let before = cpu_seconds(pid);
    let start = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    (cpu_seconds(pid) - before) / start.elapsed().as_secs_f64()
}

/// `porthole-vmm --cpu-cap 0.5` started by hand: the VMM puts itself into a cgroup of its own under the
/// caller's and its CPU-bound guest uses 0.45-0.55 of a CPU; the next such VMM removes the cgroup of one that
/// ended. Absurd values are refused. Where the host has no writable CPU controller, the VMM warns why.
#[test]
fn a_vmm_started_by_hand_caps_itself() {
    let vmm = porthole_tests::workspace_bin("porthole-vmm");
    let spin = porthole_guests::path("spin");
    let start = |cap: &str| {
        let mut cmd = Command::new(&vmm);
        cmd.arg("--kernel").arg(&spin).args(["--memory", "64", "--cpu-cap", cap, "--cpu-weight", "50"]);
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let group = |pid: u32| {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        own.lines().find(|l| l.contains("porthole/vm-hand-")).map(str::to_owned)
    };
    let mut first = start("0.5");
    let pid = first.id();
    std::thread::sleep(Duration::from_millis(500));
    match group(pid) {
        None => {
            first.kill().unwrap();
            let out = first.wait_with_output().unwrap();
            let err = text(&out.stderr);
            assert!(err.contains("the CPU limits are not enforced"), "no cgroup and no warning: {err}");
            println!("SKIP the CPU measurement: {err}");
        }
        Some(line) => {
            assert!(line.ends_with(&format!("porthole/vm-hand-{pid}")), "{line}");
            let share = cpu_share(pid, 5.0);
            println!("CPU of a hand-started VMM under --cpu-cap 0.5: {share:.3} ({line})");
            assert!((0.45..=0.55).contains(&share), "{share:.3} of a CPU under --cpu-cap 0.5");
            first.kill().unwrap();
            first.wait().unwrap();
            let mut second = start("1");
            std::thread::sleep(Duration::from_millis(500));
            let second_line = group(second.id()).expect("the second VMM's cgroup");
            let dir = |l: &str| {
                let rel = l.splitn(3, ':').nth(2).unwrap().trim_start_matches('/').to_owned();
                ["cpu", "cpu,cpuacct", ""]
                    .iter()
                    .map(|m| Path::new("/sys/fs/cgroup").join(m).join(&rel))
                    .find(|p| p.exists())
            };
            let left = dir(&line);
            second.kill().unwrap();
            second.wait().unwrap();
            assert!(left.is_none(), "the ended VMM's cgroup {left:?} is removed by the next ({second_line})");
        }
    }
    for (cap, weight) in [("0", "100"), ("-1", "100"), ("1", "0"), ("1", "20000")] {
        let out = Command::new(&vmm)
            .arg("--kernel")
            .arg(&spin)
            .args([format!("--cpu-cap={cap}"), format!("--cpu-weight={weight}")])
            .output()
            .unwrap();
        assert!(!out.status.success() && text(&out.stderr).contains("--cpu-"), "{cap} {weight}: {out:?}");
    }
}

/// A CPU-bound guest capped at half a CPU uses 0.45-0.55 of one (the host's accounting in /proc over 5 s);
/// the cap removed while it runs, it takes a whole CPU again; absurd caps and weights are refused by field.
/// Where the host gives the daemon no cgroup CPU controller the VM says why and the measurement is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_cap_holds_a_spinning_guest_and_changes_live() {
    let dir = Scratch::new("settings-cpu-cap");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let spin =
        BootSpec { kernel: porthole_guests::path("spin").display().to_string(), initrd: None, cmdline: String::new() };
    let bad = CreateVm {
        cpu_cap_percent: Some(150),
        cpu_weight: Some(20000),
        boot: Some(spin.clone()),
        disk_gib: 0,
        ..CreateVm::new("bad", 1, 64)
    };
    let e = c.create_vm(&bad).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["cpu_cap_percent", "cpu_weight"], "one vCPU: at most 100 %");
    let req = CreateVm {
        cpu_cap_percent: Some(50),
        boot: Some(spin),
        disk_gib: 0,
        nics: Some(Vec::new()),
        ..CreateVm::new("spinner", 1, 64)
    };
    let vm = c.create_vm(&req).await.unwrap();
    assert_eq!(vm.cpu_cap_percent, Some(50));
    c.action(&vm.id, Action::Start).await.unwrap();
    wait_state(&c, &vm.id, VmState::Running).await;
    let vm = c.vm(&vm.id).await.unwrap();
    let status = vm.cpu_limits.clone().unwrap();
    let pid: u32 = std::fs::read_to_string(d.run.join("vms").join(&vm.id).join("pid")).unwrap().trim().parse().unwrap();
    if status.starts_with("not enforced") {
        println!("SKIP the CPU measurement: {status}");
    } else {
        assert!(status.starts_with("enforced"), "{status}");
        let capped = cpu_share(pid, 5.0);
        assert!((0.45..=0.55).contains(&capped), "{capped:.3} of a CPU under a 50 % cap ({status})");
        let vm = c.update_vm(&vm.id, &UpdateVm { cpu_cap_percent: Some(0), ..Default::default() }).await.unwrap();
        assert_eq!(vm.cpu_cap_percent, None);
        let free = cpu_share(pid, 2.0);
        // Well above the cap (the machine's other work may take some of the CPU meanwhile).
        assert!(free > 0.65, "{free:.3} of a CPU without a cap");
        println!("CPU of the spinning guest: {capped:.3} under a 50 % cap, {free:.3} without ({status})");
    }
    let e = c.update_vm(&vm.id, &UpdateVm { cpu_weight: Some(10001), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["cpu_weight"]);
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

/// The memory balloon: new VMs have one (the engine gets `--balloon`); `memory_target_mib` reaches a running
/// VM's engine at once; a target out of range (either bound) or for a stopped VM is refused on its field
/// with nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_target_reaches_a_running_vms_balloon_and_bad_targets_are_refused() {
    let dir = Scratch::new("settings-balloon");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&CreateVm { memory_mib: 512, ..idle_vm("ballooned", DiskFormat::Qcow2) }).await.unwrap();
    assert!(vm.balloon && vm.memory_balloon.is_none(), "{vm:?}");
    let target = |mib: u64| UpdateVm { memory_target_mib: Some(mib), ..Default::default() };
    let e = c.update_vm(&vm.id, &target(256)).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["memory_target_mib"], "{e}");
    assert!(e.fields()[0].message.contains("running VM"), "{e}");

    c.action(&vm.id, Action::Start).await.unwrap();
    wait_state(&c, &vm.id, VmState::Running).await;
    assert!(vmm_args(&d, &vm.id).iter().any(|a| a == "--balloon"));
    let b = c.vm(&vm.id).await.unwrap().memory_balloon.expect("a running VM shows its balloon");
    // The idle micro-guest has no balloon driver: the target waits for one.
    assert_eq!((b.target_mib, b.actual_mib, b.floor_mib, b.driver), (512, 512, 128, false), "{b:?}");
    for (mib, why) in [(127, "from 128 MiB"), (0, "out of range"), (513, "to 512 MiB")] {
        let bad = UpdateVm { memory_target_mib: Some(mib), description: Some("changed".into()), ..Default::default() };
        let e = c.update_vm(&vm.id, &bad).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        assert_eq!(refused_fields(&e), ["memory_target_mib"], "{mib}: {e}");
        assert!(e.fields()[0].message.contains(why), "{mib}: {e}");
    }
    let after = c.vm(&vm.id).await.unwrap();
    assert_eq!(after.description, vm.description, "nothing changed");
    assert_eq!(after.memory_balloon.unwrap().target_mib, 512);

    let changed = c.update_vm(&vm.id, &target(300)).await.unwrap();
    assert_eq!(changed.memory_balloon.map(|b| b.target_mib), Some(300));
    let control = d.run.join("vms").join(&vm.id).join("control.sock");
    let mut client = vmm_core::control::ControlClient::connect(&control).unwrap();
    let status = client.request(&vmm_core::control::Request::Status).unwrap().status.unwrap();
    let engine = status.balloon.unwrap();
    assert_eq!((engine.target_mib, engine.actual_mib), (300, 512), "{engine:?}");
    assert!(status.host_rss_kib.is_some_and(|k| k > 0));
    assert_eq!(c.vm(&vm.id).await.unwrap().memory_balloon.unwrap().target_mib, 300);
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

/// vCPUs added to a running VM (issue 19): a VM made with room for more (`max_vcpus`) starts its engine with
/// `--max-cpus`; more `vcpus` within it reach the engine at once (hot-added, kept in the definition, so the
/// next start has them); more than that, or fewer, wait for the next start; a maximum below the vCPUs is
/// refused on its field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_vcpus_within_the_maximum_are_hot_added_to_a_running_vm() {
    let dir = Scratch::new("settings-vcpus");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let bad = CreateVm { vcpus: 2, max_vcpus: Some(1), ..idle_vm("too-few", DiskFormat::Qcow2) };
    let e = c.create_vm(&bad).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["max_vcpus"], "{e}");
    let vm = c.create_vm(&CreateVm { max_vcpus: Some(3), ..idle_vm("growing", DiskFormat::Qcow2) }).await.unwrap();
    assert_eq!((vm.vcpus, vm.max_vcpus), (1, Some(3)));
    c.action(&vm.id, Action::Start).await.unwrap();
    wait_state(&c, &vm.id, VmState::Running).await;
    let args = vmm_args(&d, &vm.id);
    assert_eq!((arg_after(&args, "--cpus"), arg_after(&args, "--max-cpus")), (Some("1".into()), Some("3".into())));
    let engine_vcpus = || {
        let control = d.run.join("vms").join(&vm.id).join("control.sock");
        let mut client = vmm_core::control::ControlClient::connect(&control).unwrap();
        client.request(&vmm_core::control::Request::Status).unwrap().status.unwrap().vcpus
    };

    let vcpus = |n: u32| UpdateVm { vcpus: Some(n), ..Default::default() };
    let added = c.update_vm(&vm.id, &vcpus(2)).await.unwrap();
    assert_eq!((added.vcpus, added.pending_changes.clone()), (2, Vec::<String>::new()), "{added:?}");
    assert_eq!(engine_vcpus(), 2, "hot-added in the running engine");
    // Past the maximum: kept for the next start, the engine unchanged.
    let later = c.update_vm(&vm.id, &vcpus(4)).await.unwrap();
    assert_eq!((later.vcpus, later.pending_changes.clone()), (2, vec!["vcpus".to_owned()]), "{later:?}");
    assert_eq!(engine_vcpus(), 2);
    // Within it again: added now, and the pending 4 is superseded.
    let added = c.update_vm(&vm.id, &vcpus(3)).await.unwrap();
    assert_eq!((added.vcpus, added.pending_changes.clone()), (3, Vec::<String>::new()), "{added:?}");
    assert_eq!(engine_vcpus(), 3);
    let e = c.update_vm(&vm.id, &UpdateVm { max_vcpus: Some(100_000), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused_fields(&e), ["max_vcpus"], "{e}");
    // Fewer waits for the next start, which has them.
    let fewer = c.update_vm(&vm.id, &vcpus(1)).await.unwrap();
    assert_eq!((fewer.vcpus, fewer.pending_changes.clone()), (3, vec!["vcpus".to_owned()]));
    c.action(&vm.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &vm.id, VmState::Stopped).await;
    c.action(&vm.id, Action::Start).await.unwrap();
    wait_state(&c, &vm.id, VmState::Running).await;
    assert_eq!(arg_after(&vmm_args(&d, &vm.id), "--cpus"), Some("1".into()));
    assert_eq!(engine_vcpus(), 1);
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

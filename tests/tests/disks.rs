//! Disks end to end, through a real portholed: qcow2 disks by default, snapshots (take, revert, delete in
//! the middle of a chain) keeping every snapshot's content byte-identical, full and linked clones, templates,
//! cloud images with their NoCloud seed, library imports refused with the reason, a full disk while an
//! overlay is written. `qemu-img` is the outside judge of every image (check, compare). Guests are the
//! virtio-blk micro-guest, driven by its command line; snapshots with machine state and suspend use the
//! ticker guest (the engine's `save-state` and `--restore`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use porthole_api::client::Action;
use porthole_api::{
    BootSpec, Client, CloneVm, CloudInitSpec, CreateVm, DiskFormat, ImageFormat, TakeSnapshot, Task, TaskState,
    UpdateVm, Vm, VmState,
};
use porthole_tests::daemon::Daemon;
use porthole_tests::{Scratch, text};

const LIMIT: Duration = Duration::from_secs(120);

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().expect("qemu-img runs: apt-get install qemu-utils (./x does)")
}

/// `qemu-img check` finds the image (and its chain) clean.
fn check(path: &Path) {
    let out = qemu_img(&["check", "-U", path.to_str().unwrap()]);
    assert!(out.status.success(), "qemu-img check {}: {}{}", path.display(), text(&out.stdout), text(&out.stderr));
}

/// Whether two images (each read through its chain) hold the same bytes.
fn same(a: &Path, b: &Path) -> bool {
    let out = qemu_img(&["compare", "-U", "-q", a.to_str().unwrap(), b.to_str().unwrap()]);
    out.status.code() == Some(0)
}

/// A flattened copy of what `path` (through its chain) holds now, to compare with later.
fn freeze(path: &Path, out: &Path) {
    let r = qemu_img(&["convert", "-U", "-O", "qcow2", path.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
}

fn definition(d: &Daemon, id: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(d.data.join("vms").join(id).join("vm.json")).unwrap()).unwrap()
}

fn vm_dir(d: &Daemon, id: &str) -> PathBuf {
    d.data.join("vms").join(id)
}

/// The present disk layer of VM `id`.
fn top(d: &Daemon, id: &str) -> PathBuf {
    vm_dir(d, id).join(definition(d, id)["disk"]["top"].as_str().unwrap())
}

/// Snapshot `sid`'s layer file.
fn layer(d: &Daemon, id: &str, sid: &str) -> PathBuf {
    let def = definition(d, id);
    let s = def["snapshots"].as_array().unwrap().iter().find(|s| s["id"] == sid).expect("the snapshot is recorded");
    vm_dir(d, id).join(s["layer"].as_str().unwrap())
}

async fn wait_task(c: &Client, task: Task) -> Task {
    let deadline = Instant::now() + LIMIT;
    loop {
        let t = c.task(&task.id).await.unwrap();
        if t.state != TaskState::Running {
            return t;
        }
        assert!(Instant::now() < deadline, "task never ended: {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn done(c: &Client, task: Task) -> String {
    let t = wait_task(c, task).await;
    assert_eq!(t.state, TaskState::Done, "{t:?}");
    t.result.expect("a finished task says what it made")
}

async fn take(c: &Client, id: &str, name: &str) -> String {
    let task = c
        .take_snapshot(id, &TakeSnapshot { name: name.into(), description: format!("{name}!"), with_state: None })
        .await
        .unwrap();
    done(c, task).await
}

async fn wait_state(c: &Client, id: &str, state: VmState) -> Vm {
    porthole_tests::daemon::wait_state(c, id, state, LIMIT).await
}

async fn run(c: &Client, id: &str, words: &str) -> Vec<String> {
    porthole_tests::daemon::run_blk_guest(c, id, words, LIMIT).await
}

use porthole_tests::daemon::line_starting as line;

fn blk_vm(name: &str) -> CreateVm {
    CreateVm {
        boot: Some(BootSpec {
            kernel: porthole_guests::path("virtio-blk").display().to_string(),
            initrd: None,
            cmdline: String::new(),
        }),
        disk_gib: 1,
        ..CreateVm::new(name, 1, 64)
    }
}

async fn power_off_all(c: &Client) {
    for vm in c.list_vms().await.unwrap_or_default() {
        if matches!(vm.state, VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping) {
            let _ = c.action(&vm.id, Action::Poweroff).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_keep_every_snapshots_content_through_takes_reverts_and_merges() {
    let dir = Scratch::new("disks-snapshots");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&blk_vm("snap")).await.unwrap();
    assert_eq!(vm.disk_format, Some(DiskFormat::Qcow2), "new VMs get qcow2");
    assert_eq!(vm.disk_bytes, 1 << 30);
    let id = vm.id.clone();
    assert_eq!(top(&d, &id), vm_dir(&d, &id).join("disk0.qcow2"));
    check(&top(&d, &id));

    // The guest writes, flushes, reads back; the image is clean and reads the same outside.
    let lines = run(&c, &id, "write=0,16,1 flush read=0,16").await;
    assert!(line(&lines, "BLK write disk=0").ends_with("status=0"), "{lines:#?}");
    check(&top(&d, &id));
    assert!(c.vm(&id).await.unwrap().disk_allocated_bytes > 0);
    let sum_of = |lines: &[String]| line(lines, "BLK read disk=0").split("sum=").nth(1).unwrap().to_owned();

    // s1 <- s2 <- s3, each after a different write; each frozen as it was.
    let frozen = |n: &str| dir.path(&format!("{n}.frozen.qcow2"));
    freeze(&top(&d, &id), &frozen("s1"));
    let s1 = take(&c, &id, "s1").await;
    run(&c, &id, "write=100,8,2 flush").await;
    freeze(&top(&d, &id), &frozen("s2"));
    let s2 = take(&c, &id, "s2").await;
    run(&c, &id, "write=0,4,3 write=2000,8,3 flush").await;
    freeze(&top(&d, &id), &frozen("s3"));
    let s3 = take(&c, &id, "s3").await;
    for (s, n) in [(&s1, "s1"), (&s2, "s2"), (&s3, "s3")] {
        assert!(same(&layer(&d, &id, s), &frozen(n)), "snapshot {n} holds what the disk held");
    }
    let tree = c.snapshots(&id).await.unwrap();
    assert_eq!(tree.current.as_deref(), Some(s3.as_str()));
    assert_eq!(tree.snapshots.len(), 3);
    let s2_info = tree.snapshots.iter().find(|s| s.id == s2).unwrap();
    assert_eq!(
        (s2_info.parent.as_deref(), s2_info.name.as_str(), s2_info.with_state),
        (Some(s1.as_str()), "s2", false)
    );
    assert_eq!(s2_info.description, "s2!");
    assert!(s2_info.size_bytes > 0);

    // Names: no '/', unique.
    let e =
        c.take_snapshot(&id, &TakeSnapshot { name: "a/b".into(), description: String::new(), with_state: None }).await;
    assert_eq!(e.unwrap_err().status(), Some(400));
    let e =
        c.take_snapshot(&id, &TakeSnapshot { name: "s1".into(), description: String::new(), with_state: None }).await;
    assert_eq!(e.unwrap_err().status(), Some(409));

    // Revert to s1: Now reads as s1 did; the guest reads s1's bytes.
    let reverted = done(&c, c.revert_snapshot(&id, &s1, false).await.unwrap()).await;
    assert_eq!(reverted, s1);
    assert!(same(&top(&d, &id), &frozen("s1")));
    let s1_sum = sum_of(&lines);
    let lines = run(&c, &id, "read=0,16").await;
    assert_eq!(sum_of(&lines), s1_sum, "the guest reads what it wrote before s1");
    assert_eq!(c.snapshots(&id).await.unwrap().current.as_deref(), Some(s1.as_str()));
    // s1 now has two child layers (s2 and Now): deleting it is refused with the reason.
    let e = c.delete_snapshot(&id, &s1).await.unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("s2") && e.to_string().contains("Now"), "{e}");

    // A branch: s4 on s1.
    run(&c, &id, "write=50,8,4 flush").await;
    freeze(&top(&d, &id), &frozen("s4"));
    let s4 = take(&c, &id, "s4").await;

    // Delete s2 in the middle of s1 <- s2 <- s3: merged into s3's file; every other snapshot unchanged.
    let merged = wait_task(&c, c.delete_snapshot(&id, &s2).await.unwrap()).await;
    assert_eq!(merged.state, TaskState::Done, "{merged:?}");
    assert!(merged.total >= 1 << 30 && merged.done == merged.total, "the merge reported progress: {merged:?}");
    let tree = c.snapshots(&id).await.unwrap();
    assert!(tree.snapshots.iter().all(|s| s.id != s2));
    assert_eq!(tree.snapshots.iter().find(|s| s.id == s3).unwrap().parent.as_deref(), Some(s1.as_str()));
    for (s, n) in [(&s1, "s1"), (&s3, "s3"), (&s4, "s4")] {
        assert!(same(&layer(&d, &id, s), &frozen(n)), "snapshot {n} unchanged by the merge");
        check(&layer(&d, &id, s));
    }
    assert!(same(&top(&d, &id), &frozen("s4")), "Now unchanged");
    // A leaf goes without a merge.
    let gone = layer(&d, &id, &s3);
    done(&c, c.delete_snapshot(&id, &s3).await.unwrap()).await;
    assert!(!gone.exists(), "its layer file is deleted");
    // The root, now with one child (s4): merged into s4's layer, which becomes the bottom.
    done(&c, c.delete_snapshot(&id, &s1).await.unwrap()).await;
    let tree = c.snapshots(&id).await.unwrap();
    assert_eq!(tree.snapshots.len(), 1);
    assert_eq!(tree.snapshots[0].parent, None);
    assert!(same(&layer(&d, &id, &s4), &frozen("s4")));
    assert!(same(&top(&d, &id), &frozen("s4")));
    check(&top(&d, &id));
    let files: Vec<String> = std::fs::read_dir(vm_dir(&d, &id))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    assert_eq!(files.len(), 2, "one layer for s4 and Now, nothing left over: {files:?}");
    // And the guest boots from what is left and reads s4's bytes.
    run(&c, &id, "read=50,8").await;

    // A running VM: a revert needs confirmation; a disk-only snapshot is taken live (the engine moves the
    // running disk onto a new overlay) and the VM runs on.
    let boot = BootSpec {
        kernel: porthole_guests::path("virtio-blk").display().to_string(),
        initrd: None,
        cmdline: "read=0,1 hang".into(),
    };
    c.update_vm(&id, &UpdateVm { boot: Some(boot), ..Default::default() }).await.unwrap();
    c.action(&id, Action::Start).await.unwrap();
    let e = c.revert_snapshot(&id, &s4, false).await.unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("confirm"), "{e}");
    let take_live = TakeSnapshot { name: "disk only".into(), description: String::new(), with_state: Some(false) };
    let live = done(&c, c.take_snapshot(&id, &take_live).await.unwrap()).await;
    assert_eq!(c.vm(&id).await.unwrap().state, VmState::Running, "a disk-only snapshot leaves the VM running");
    let tree = c.snapshots(&id).await.unwrap();
    assert_eq!(tree.current.as_deref(), Some(live.as_str()));
    let info = tree.snapshots.iter().find(|s| s.id == live).unwrap();
    assert!(!info.with_state && info.parent.as_deref() == Some(s4.as_str()), "{info:?}");
    check(&layer(&d, &id, &live));
    assert!(same(&layer(&d, &id, &live), &frozen("s4")), "the live snapshot holds what the disk held");
    let e = c.delete_snapshot(&id, &s4).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    done(&c, c.revert_snapshot(&id, &s4, true).await.unwrap()).await;
    let vm = c.vm(&id).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped, "a disk-only snapshot reverts to a stopped VM: {vm:?}");
    assert!(same(&top(&d, &id), &frozen("s4")));
    power_off_all(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_copy_or_overlay_the_disk_and_templates_protect_their_clones() {
    let dir = Scratch::new("disks-clones");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let src = c.create_vm(&blk_vm("base")).await.unwrap();
    let lines = run(&c, &src.id, "write=0,64,9 write=4096,8,10 flush read=0,64").await;
    let sum = line(&lines, "BLK read disk=0").split("sum=").nth(1).unwrap().to_owned();
    take(&c, &src.id, "before clones").await;

    // A full clone: a sparse copy, its own disk.
    let full_id = done(&c, c.clone_vm(&src.id, &CloneVm { name: "full".into(), linked: false }).await.unwrap()).await;
    let full = c.vm(&full_id).await.unwrap();
    assert_eq!((full.disk_format, full.linked_to.as_deref(), full.template), (Some(DiskFormat::Qcow2), None, false));
    assert!(same(&top(&d, &full_id), &top(&d, &src.id)));
    check(&top(&d, &full_id));
    assert!(full.disk_allocated_bytes < 16 << 20, "sparse: {}", full.disk_allocated_bytes);
    assert!(c.snapshots(&full_id).await.unwrap().snapshots.is_empty(), "a clone starts without snapshots");
    let (a, b) = (&src.nics[0], &full.nics[0]);
    assert_ne!(a.mac, b.mac, "a clone gets a new MAC");
    assert!(a.forwards.iter().zip(&b.forwards).all(|(x, y)| x.host_port != y.host_port), "and a fresh SSH port");

    // The source becomes a template; a linked clone stands on its disk.
    let t = c.update_vm(&src.id, &UpdateVm { template: Some(true), ..Default::default() }).await.unwrap();
    assert!(t.template);
    let e = c.action(&src.id, Action::Start).await.unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("template"), "{e}");
    let linked_id =
        done(&c, c.clone_vm(&src.id, &CloneVm { name: "linked".into(), linked: true }).await.unwrap()).await;
    let linked = c.vm(&linked_id).await.unwrap();
    assert_eq!(linked.linked_to.as_deref(), Some(src.id.as_str()));
    assert!(linked.disk_allocated_bytes < 2 << 20, "an overlay: {}", linked.disk_allocated_bytes);
    assert!(same(&top(&d, &linked_id), &top(&d, &src.id)));
    check(&top(&d, &linked_id));
    // Both clones' guests read the source's bytes.
    for id in [&full_id, &linked_id] {
        let lines = run(&c, id, "read=0,64").await;
        assert!(line(&lines, "BLK read disk=0").ends_with(&format!("sum={sum}")), "{lines:#?}");
    }
    // The linked clone writes to its own overlay; the template's disk is untouched.
    let before = dir.path("template.frozen.qcow2");
    freeze(&top(&d, &src.id), &before);
    run(&c, &linked_id, "write=0,8,77 flush").await;
    assert!(same(&top(&d, &src.id), &before));
    assert!(!same(&top(&d, &linked_id), &before));

    // While the linked clone exists: the base cannot be deleted, un-templated, or have its snapshots changed.
    let e = c.delete_vm(&src.id).await.unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("used by: linked"), "{e}");
    let e = c.update_vm(&src.id, &UpdateVm { template: Some(false), ..Default::default() }).await.unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("linked"), "{e}");
    let e = c
        .take_snapshot(&src.id, &TakeSnapshot { name: "x".into(), description: String::new(), with_state: None })
        .await;
    assert_eq!(e.unwrap_err().status(), Some(409));
    // Once it is gone, the template can go back to being a VM, start, and be deleted.
    c.delete_vm(&linked_id).await.unwrap();
    c.update_vm(&src.id, &UpdateVm { template: Some(false), ..Default::default() }).await.unwrap();
    run(&c, &src.id, "read=0,64").await;
    c.delete_vm(&src.id).await.unwrap();
    assert!(!vm_dir(&d, &src.id).exists());
    // The full clone never depended on it.
    run(&c, &full_id, "read=0,64").await;
    power_off_all(&c).await;
}

/// A qcow2 image made by qemu-img from `content`, with `extra` arguments to `create` (then written).
fn qcow2(dir: &Scratch, name: &str, content: &[u8]) -> PathBuf {
    let raw = dir.path(&format!("{name}.raw"));
    std::fs::write(&raw, content).unwrap();
    let out = dir.path(name);
    let r = qemu_img(&["convert", "-O", "qcow2", raw.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    out
}

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2k8Lm8b3yqQyF7o8ZzXb1mY0m6mQ2F8pTqB3zD6wBv test@porthole";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_imports_are_checked_and_cloud_images_get_an_overlay_and_a_seed() {
    let dir = Scratch::new("disks-library");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let content: Vec<u8> = (0..4u32 << 20).map(|i| if i < 1 << 20 { (i % 253) as u8 } else { 0 }).collect();
    let good = qcow2(&dir, "cloud.qcow2", &content);
    let img = c.upload_image("cloud.qcow2", &good, |_, _| {}).await.unwrap();
    assert_eq!((img.format, img.virtual_bytes), (ImageFormat::Qcow2, 4 << 20));

    // A truncated qcow2, and one naming /etc/shadow as its backing file: refused with the reason, not kept.
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path("cut.qcow2");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let evil = dir.path("evil.qcow2");
    let r = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        evil.to_str().unwrap(),
        "1M",
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    // One encrypted (legacy AES: qemu-img can still write it), one with an external data file.
    let enc = dir.path("enc.qcow2");
    let r = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        enc.to_str().unwrap(),
        "1M",
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let external = dir.path("external.qcow2");
    let data_file = format!("data_file={}", dir.path("external.raw").display());
    let r = qemu_img(&["create", "-q", "-f", "qcow2", "-o", &data_file, external.to_str().unwrap(), "1M"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let mut reasons = Vec::new();
    for (name, file, why) in [
        ("cut.qcow2", &cut, "truncated"),
        ("evil.qcow2", &evil, "/etc/shadow"),
        ("enc.qcow2", &enc, ""),
        ("external.qcow2", &external, ""),
    ] {
        let e = c.upload_image(name, file, |_, _| {}).await.unwrap_err();
        assert_eq!(e.status(), Some(422), "{e}");
        assert!(e.to_string().contains(why) && e.to_string().contains("stand alone"), "{e}");
        assert!(!d.data.join("images").join(name).exists());
        let tasks = c.tasks().await.unwrap();
        let t = tasks.iter().find(|t| t.what == format!("upload {name}")).unwrap();
        assert!(t.state == TaskState::Failed && t.error.as_deref().is_some_and(|m| m.contains(why)), "{t:?}");
        reasons.push(e.to_string());
    }
    eprintln!("refused uploads: {reasons:#?}");
    assert_eq!(c.images().await.unwrap().len(), 1);

    // A VM from the cloud image: a qcow2 overlay grown to disk_gib, the image below it read-only, a seed.
    let spec = CloudInitSpec { hostname: "web1".into(), user: "alice".into(), ssh_authorized_keys: vec![KEY.into()] };
    let bad = CloudInitSpec { hostname: "web1\nruncmd: [reboot]".into(), ..spec.clone() };
    let e = c
        .create_vm(&CreateVm { disk_image: Some("cloud.qcow2".into()), cloud_init: Some(bad), ..blk_vm("bad") })
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let vm = c
        .create_vm(&CreateVm {
            disk_image: Some("cloud.qcow2".into()),
            cloud_init: Some(spec.clone()),
            ..blk_vm("cloud")
        })
        .await
        .unwrap();
    let info = vm.cloud_init.clone().expect("the seed's facts");
    assert_eq!((info.hostname.as_str(), info.user.as_str()), ("web1", "alice"));
    assert_eq!(vm.disk_bytes, 1 << 30, "grown to disk_gib");
    check(&top(&d, &vm.id));
    let seed = vm_dir(&d, &vm.id).join("seed.iso");
    let out = Command::new("blkid").args(["-p", "-o", "export"]).arg(&seed).output().unwrap();
    assert!(text(&out.stdout).contains("LABEL=cidata"), "{}", text(&out.stdout));
    let e = c.delete_image("cloud.qcow2").await.unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("used by: cloud"), "{e}");
    // The guest sees its disk (the image's bytes, then zeros up to 1 GiB) and the read-only seed.
    let lines = run(&c, &vm.id, "read=0,8 read=2097000,8 disk=1 read=16,1").await;
    assert!(lines.iter().any(|l| l.starts_with("BLK disk=0") && l.contains("capacity=2097152")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.starts_with("BLK disk=1") && l.contains("ro=1")), "{lines:#?}");
    // A clone of it gets a new instance id, so cloud-init runs again there.
    let clone = done(&c, c.clone_vm(&vm.id, &CloneVm { name: "cloud2".into(), linked: false }).await.unwrap()).await;
    let clone = c.vm(&clone).await.unwrap();
    let clone_info = clone.cloud_init.unwrap();
    assert_ne!(clone_info.instance_id, info.instance_id);
    assert!(vm_dir(&d, &clone.id).join("seed.iso").exists());
    c.delete_vm(&vm.id).await.unwrap();
    c.delete_vm(&clone.id).await.unwrap();
    c.delete_image("cloud.qcow2").await.unwrap();
    power_off_all(&c).await;
}

/// Mounts a small tmpfs at `at` (root only); unmounted when dropped.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_writing_an_overlay_changes_nothing() {
    let dir = Scratch::new("disks-full");
    let data = dir.path("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"]).arg(&data).output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("skipped: cannot mount a tmpfs for the daemon's data (needs root): {other:?}");
            return;
        }
    }
    let _tmpfs = Tmpfs(data.clone());
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&blk_vm("full")).await.unwrap();
    let s1 = take(&c, &vm.id, "one").await;
    // Fill the file system, then ask for overlays: refused with the reason, nothing changed.
    let filler = data.join("filler");
    let _ = Command::new("dd").arg("if=/dev/zero").arg(format!("of={}", filler.display())).args(["bs=64k"]).output();
    let def = std::fs::read(vm_dir(&d, &vm.id).join("vm.json")).unwrap();
    let files = |id: &str| {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(vm_dir(&d, id))
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().into_string().unwrap(), e.metadata().unwrap().len()))
            .collect();
        v.sort();
        v
    };
    let before = files(&vm.id);
    let t = wait_task(
        &c,
        c.take_snapshot(&vm.id, &TakeSnapshot { name: "two".into(), description: String::new(), with_state: None })
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert!(t.error.as_deref().is_some_and(|e| e.contains("No space left")), "{t:?}");
    let t = wait_task(&c, c.revert_snapshot(&vm.id, &s1, false).await.unwrap()).await;
    assert!(t.state == TaskState::Failed && t.error.as_deref().is_some_and(|e| e.contains("No space left")), "{t:?}");
    assert_eq!(std::fs::read(vm_dir(&d, &vm.id).join("vm.json")).unwrap(), def, "the definition is unchanged");
    assert_eq!(files(&vm.id), before, "no file added or changed");
    assert_eq!(c.snapshots(&vm.id).await.unwrap().snapshots.len(), 1);
    // With room again, the same request works.
    std::fs::remove_file(&filler).unwrap();
    take(&c, &vm.id, "two").await;
    check(&top(&d, &vm.id));
    drop(d);
}

/// Creates and starts a VM running the ticker guest (1 GiB qcow2 disk), and waits until its serial output
/// satisfies `ready`; returns its id.
async fn start_ticker(c: &Client, ready: impl Fn(&[String]) -> bool) -> String {
    let vm = c
        .create_vm(&CreateVm {
            boot: Some(BootSpec {
                kernel: porthole_guests::path("ticker").display().to_string(),
                initrd: None,
                cmdline: String::new(),
            }),
            disk_gib: 1,
            ..CreateVm::new("ticker", 1, 64)
        })
        .await
        .unwrap();
    let id = vm.id.clone();
    c.action(&id, Action::Start).await.unwrap();
    let deadline = Instant::now() + LIMIT;
    while !ready(&c.serial(&id, 1000).await.unwrap().lines) {
        assert!(Instant::now() < deadline, "the ticker never ticked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    id
}

/// The ticker guest, snapshotted with its machine state while it runs, keeps running; reverted, it
/// continues from the saved count; suspended, it resumes on start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_with_state_and_suspend_resume_the_guest() {
    let dir = Scratch::new("disks-state");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let id = start_ticker(&c, |lines| lines.iter().filter(|l| !l.trim().is_empty()).count() >= 3).await;
    // Snapshot with state: the guest keeps running (its process was restarted from the saved state).
    let task = c
        .take_snapshot(&id, &TakeSnapshot { name: "running".into(), description: String::new(), with_state: None })
        .await;
    let task = task.expect("the daemon accepts a snapshot of a running VM");
    let t = wait_task(&c, task).await;
    assert_eq!(t.state, TaskState::Done, "save-state through the engine failed (is it merged?): {t:?}");
    let sid = t.result.unwrap();
    let tree = c.snapshots(&id).await.unwrap();
    assert!(tree.snapshots.iter().find(|s| s.id == sid).unwrap().with_state);
    assert_eq!(c.vm(&id).await.unwrap().state, VmState::Running);
    // Revert (confirmed): running again, from the saved state.
    let t = wait_task(&c, c.revert_snapshot(&id, &sid, true).await.unwrap()).await;
    assert_eq!(t.state, TaskState::Done, "{t:?}");
    assert_eq!(c.vm(&id).await.unwrap().state, VmState::Running);
    // Suspend: the state survives a daemon restart; start resumes it and the state file goes.
    let vm = c.action(&id, Action::Suspend).await.unwrap();
    assert_eq!(vm.state, VmState::Suspended);
    assert!(vm_dir(&d, &id).join("suspend.state").exists());
    drop(c);
    drop(d);
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    assert_eq!(c.vm(&id).await.unwrap().state, VmState::Suspended, "kept across a daemon restart");
    assert_eq!(c.action(&id, Action::Start).await.unwrap().state, VmState::Running);
    assert!(!vm_dir(&d, &id).join("suspend.state").exists(), "a spent suspend state is deleted");
    power_off_all(&c).await;
}

/// A VM defined before qcow2 (a `vm.json` without disk fields, its raw `disk0.img`) keeps working: loaded
/// as raw, booted from its raw disk, cloned into qcow2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_from_before_qcow2_keeps_its_raw_disk() {
    let dir = Scratch::new("disks-legacy");
    let vm_dir = dir.path("data").join("vms").join("0123456789ab");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let old = serde_json::json!({
        "id": "0123456789ab", "name": "old", "vcpus": 1, "memory_mib": 64, "disk_bytes": 4194304,
        "boot": {"kernel": porthole_guests::path("virtio-blk").display().to_string(), "cmdline": "read=0,8"},
        "created_ms": 1, "nics": []
    });
    std::fs::write(vm_dir.join("vm.json"), serde_json::to_vec(&old).unwrap()).unwrap();
    let content: Vec<u8> = (0..4u32 << 20).map(|i| (i % 241) as u8).collect();
    std::fs::write(vm_dir.join("disk0.img"), &content).unwrap();
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.vm("0123456789ab").await.unwrap();
    assert_eq!((vm.disk_format, vm.disk_bytes), (Some(DiskFormat::Raw), 4 << 20));
    let lines = run(&c, &vm.id, "write=8,8,5 flush read=0,8").await;
    assert!(lines.iter().any(|l| l.starts_with("BLK disk=0") && l.contains("capacity=8192")), "{lines:#?}");
    let disk = std::fs::read(vm_dir.join("disk0.img")).unwrap();
    assert_eq!(disk.len(), content.len(), "still raw, same size");
    assert_eq!(&disk[..4096], &content[..4096]);
    assert_ne!(&disk[4096..8192], &content[4096..8192], "the guest wrote to it");
    // Snapshots need qcow2: refused with the way there; a full clone is qcow2 with the same bytes.
    let e =
        c.take_snapshot(&vm.id, &TakeSnapshot { name: "x".into(), description: String::new(), with_state: None }).await;
    let e = e.unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("full clone"), "{e}");
    let clone = done(&c, c.clone_vm(&vm.id, &CloneVm { name: "new".into(), linked: false }).await.unwrap()).await;
    assert_eq!(c.vm(&clone).await.unwrap().disk_format, Some(DiskFormat::Qcow2));
    assert!(same(&top(&d, &clone), &vm_dir.join("disk0.img")));
    power_off_all(&c).await;
}

/// `portholed --suspend-on-shutdown`: stopped with SIGTERM (as at host shutdown), the daemon suspends the
/// running ticker first and ends; started again, it resumes the VM, which goes on ticking from where it was
/// (no new `PORTHOLE-TICKER-START`, tick numbers beyond those seen before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_stops_suspends_its_vms_and_resumes_them_when_it_starts() {
    let dir = Scratch::new("disks-shutdown");
    let mut d = Daemon::start(&dir, false, &["--suspend-on-shutdown"]);
    let c = d.local();
    let last_tick = |lines: &[String]| {
        lines.iter().filter_map(|l| l.trim().strip_prefix("PORTHOLE-TICK ")?.parse::<u64>().ok()).max().unwrap_or(0)
    };
    let id = start_ticker(&c, |lines| last_tick(lines) >= 5).await;
    wait_state(&c, &id, VmState::Running).await;
    let before = last_tick(&c.serial(&id, 1000).await.unwrap().lines);
    let daemon = d.child.take().unwrap();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) }, 0);
    let status = porthole_tests::wait(daemon, LIMIT);
    assert!(status.status.success(), "the daemon ends cleanly: {}", d.log_text());
    assert!(d.log_text().contains("suspending the running VMs"), "{}", d.log_text());
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_dir(&d, &id).join("vm.json")).unwrap()).unwrap();
    assert_eq!(record["resume_on_start"], true, "{record}");
    assert!(vm_dir(&d, &id).join("suspend.state").exists());
    drop(c);
    drop(d);

    let d = Daemon::start(&dir, false, &["--suspend-on-shutdown"]);
    let c = d.local();
    wait_state(&c, &id, VmState::Running).await;
    // Ticks go on beyond those seen before the shutdown, and none of those comes again (a guest booted anew
    // would count from 1 again; the log may or may not keep the lines of before).
    let deadline = Instant::now() + LIMIT;
    loop {
        let lines = c.serial(&id, 1000).await.unwrap().lines;
        let ticks: Vec<u64> =
            lines.iter().filter_map(|l| l.trim().strip_prefix("PORTHOLE-TICK ")?.parse().ok()).collect();
        let old = ticks.iter().filter(|&&t| t <= before).count();
        assert!(old as u64 <= before, "the guest booted again instead of resuming: {lines:?}");
        if last_tick(&lines) > before + 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no tick after the resume: {lines:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!vm_dir(&d, &id).join("suspend.state").exists(), "a spent suspend state is deleted");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_dir(&d, &id).join("vm.json")).unwrap()).unwrap();
    assert!(record.get("resume_on_start").is_none(), "the mark is cleared: {record}");
    power_off_all(&c).await;
}

/// Snapshots stop where the engine would: a disk of 17 layers (16 snapshots on a new VM) takes no more,
/// with the reason and nothing changed, and the VM still starts on its disk. (The fault matrix's full-disk
/// cell found the 17th snapshot of a running VM accepted, and the VM lost: it could not start again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_takes_no_snapshot_past_the_deepest_chain_the_engine_opens() {
    let dir = Scratch::new("disks-depth");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&blk_vm("deep")).await.unwrap();
    for i in 0..16 {
        take(&c, &vm.id, &format!("s{i:02}")).await;
    }
    let refused = c
        .take_snapshot(&vm.id, &TakeSnapshot { name: "one-more".into(), description: String::new(), with_state: None })
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(409), "{refused}");
    assert!(
        refused.to_string().contains("at most 17") && refused.to_string().contains("delete a snapshot"),
        "{refused}"
    );
    assert_eq!(c.snapshots(&vm.id).await.unwrap().snapshots.len(), 16, "nothing taken");
    let lines = run(&c, &vm.id, "read=0,1").await;
    assert!(line(&lines, "BLK read").contains("status=0"), "{lines:?}");
    power_off_all(&c).await;
}

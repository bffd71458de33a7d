//! Storage on the real KVM: the `virtio-blk` micro-guest (a polling virtio 1.x PCI block driver in
//! assembly, driven by words on its command line) against porthole-vmm's virtio-blk devices.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use porthole_tests::{Scratch, text, wait, wait_until};
use vmm_core::control::{ControlClient, Request};

const VMM: &str = env!("CARGO_BIN_EXE_porthole-vmm");
const LIMIT: Duration = Duration::from_secs(60);

/// 32-bit FNV-1a, as the guest computes it.
fn fnv(bytes: &[u8]) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// What the guest's `write=S,N,SEED` puts in byte j of sector s.
fn pattern(sector: usize, seed: usize) -> Vec<u8> {
    (0..512).map(|j| ((sector * 7 + j + seed) & 0xFF) as u8).collect()
}

/// An image of `sectors` sectors whose bytes all differ from any write pattern's neighbours.
fn image(dir: &Scratch, name: &str, sectors: usize, salt: u8) -> (PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..sectors * 512).map(|i| ((i * 13 + i / 512) as u8) ^ salt).collect();
    let path = dir.path(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn vmm(args: &[&str]) -> Command {
    let mut cmd = Command::new(VMM);
    let kernel = porthole_guests::path("virtio-blk");
    cmd.arg("--kernel").arg(kernel).args(["--memory", "64"]).args(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn run(args: &[&str]) -> Output {
    wait(vmm(args).spawn().unwrap(), LIMIT)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn assert_ok(out: &Output) -> String {
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.ends_with("BLK done\n"), "{stdout}");
    stdout
}

#[test]
fn the_guest_driver_reads_identifies_writes_and_flushes() {
    let dir = Scratch::new("blk-rw");
    let (path, before) = image(&dir, "d0.img", 64, 0);
    let disk = format!("{},serial=PORTHOLE-D0", s(&path));
    let out = run(&["--disk", &disk, "--cmdline", "id read=0,1 read=5,3 write=1,4,9 flush read=1,4"]);
    let stdout = assert_ok(&out);
    assert!(stdout.contains("BLK found=1\n"), "{stdout}");
    assert!(stdout.contains("capacity=64 ro=0"), "{stdout}");
    assert!(stdout.contains("BLK id disk=0 status=0 id=PORTHOLE-D0\n"), "{stdout}");
    let read0 = format!("BLK read disk=0 sector=0 count=1 status=0 sum={}\n", fnv(&before[..512]));
    assert!(stdout.contains(&read0), "{stdout}\nexpected {read0}");
    let read5 = format!("BLK read disk=0 sector=5 count=3 status=0 sum={}\n", fnv(&before[5 * 512..8 * 512]));
    assert!(stdout.contains(&read5), "{stdout}\nexpected {read5}");
    assert!(stdout.contains("BLK write disk=0 sector=1 count=4 status=0\n"), "{stdout}");
    assert!(stdout.contains("BLK flush disk=0 status=0\n"), "{stdout}");
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), before.len(), "the image keeps its size");
    let written: Vec<u8> = (1..5).flat_map(|sector| pattern(sector, 9)).collect();
    assert_eq!(after[512..5 * 512], written[..], "sectors 1-4 hold the pattern");
    assert_eq!(after[..512], before[..512]);
    assert_eq!(after[5 * 512..], before[5 * 512..], "nothing else changed");
    let reread = format!("BLK read disk=0 sector=1 count=4 status=0 sum={}\n", fnv(&written));
    assert!(stdout.contains(&reread), "the guest reads back what it wrote: {stdout}");
}

#[test]
fn a_read_only_disk_fails_writes_with_an_error_status() {
    let dir = Scratch::new("blk-ro");
    let (path, before) = image(&dir, "ro.img", 16, 0x55);
    let disk = format!("{},readonly", s(&path));
    let out = run(&["--disk", &disk, "--cmdline", "write=0,2,1 flush read=0,1"]);
    let stdout = assert_ok(&out);
    assert!(stdout.contains("capacity=16 ro=1"), "{stdout}");
    assert!(stdout.contains("BLK write disk=0 sector=0 count=2 status=1\n"), "{stdout}");
    assert!(stdout.contains(&format!("status=0 sum={}", fnv(&before[..512]))), "{stdout}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "the image is untouched");
}

#[test]
fn requests_past_the_end_fail_and_never_grow_the_image() {
    let dir = Scratch::new("blk-end");
    let (path, before) = image(&dir, "small.img", 8, 1);
    let out = run(&["--disk", s(&path), "--cmdline", "write=7,2,3 read=8,1 write=7,1,3"]);
    let stdout = assert_ok(&out);
    assert!(stdout.contains("BLK write disk=0 sector=7 count=2 status=1\n"), "{stdout}");
    assert!(stdout.contains("BLK read disk=0 sector=8 count=1 status=1"), "{stdout}");
    assert!(stdout.contains("BLK write disk=0 sector=7 count=1 status=0\n"), "the last sector is writable: {stdout}");
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), 8 * 512);
    assert_eq!(after[..7 * 512], before[..7 * 512]);
    assert_eq!(after[7 * 512..], pattern(7, 3)[..]);
}

/// The interrupt path: INTA# through the IOAPIC (irqfd with resample) rather than polling. Each completion
/// brings exactly one interrupt that finds the queue bit in the ISR. At most one more may find the ISR empty:
/// this machine's KVM (PVM) acknowledges a level-triggered vector when it injects it, before the guest's
/// handler has read the ISR (kvm:kvm_eoi traces the vector there, and the handler's own EOI write then finds
/// nothing in service), so a resample served in between sees the bit still set and raises the line once
/// more. A line that never falls would bring many.
#[test]
fn completions_raise_the_pci_interrupt() {
    let dir = Scratch::new("blk-irq");
    let (path, before) = image(&dir, "irq.img", 8, 7);
    let out = run(&["--disk", s(&path), "--cmdline", "irq-read=3 irq-read=4"]);
    let stdout = assert_ok(&out);
    for sector in [3, 4] {
        let sum = fnv(&before[sector * 512..(sector + 1) * 512]);
        let found = ["0", "1"]
            .iter()
            .any(|spurious| stdout.contains(&format!("status=0 interrupts=1 spurious={spurious} sum={sum}\n")));
        assert!(found, "{stdout}\nexpected status=0 interrupts=1 spurious=0|1 sum={sum}");
    }
}

/// A running VM with a control socket; its serial output goes to a file.
struct Running {
    dir: Scratch,
    child: Option<Child>,
    serial: PathBuf,
    control: PathBuf,
}

impl Running {
    fn start(tag: &str, args: &[&str]) -> Running {
        let dir = Scratch::new(tag);
        let serial = dir.path("serial.log");
        let control = dir.path("control.sock");
        let mut cmd = vmm(args);
        cmd.arg("--serial").arg(format!("file:{}", serial.display()));
        cmd.arg("--control").arg(format!("unix:{}", control.display()));
        let child = cmd.spawn().unwrap();
        Running { dir, child: Some(child), serial, control }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for(&self, what: impl Fn(&str) -> bool) -> String {
        wait_until(LIMIT, || what(&self.output()), || format!("guest output so far:\n{}", self.output()));
        self.output()
    }

    fn client(&self) -> ControlClient {
        wait_until(LIMIT, || self.control.exists(), || "no control socket".into());
        ControlClient::connect(&self.control).unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The guest writes and flushes one sector at a time; the VMM is killed with SIGKILL mid-way. Every sector
/// whose flush the guest saw complete is in the file, every flush reached fdatasync (the counters say so),
/// and the file did not grow.
#[test]
fn flushed_writes_survive_kill_9() {
    let dir = Scratch::new("blk-crash");
    let (path, before) = image(&dir, "crash.img", 64, 3);
    let words: Vec<String> = (0..48).flat_map(|s| [format!("write={s},1,42"), "flush".into()]).collect();
    let cmdline = words.join(" ") + " hang";
    let vm = Running::start("blk-crash-vm", &["--disk", s(&path), "--cmdline", &cmdline]);
    let flushed = |out: &str| out.lines().filter(|l| l.starts_with("BLK flush disk=0 status=0")).count();
    vm.wait_for(|out| flushed(out) >= 12);
    let counters = vm.client().request(&Request::Counters).unwrap().counters.unwrap();
    let mut vm = vm;
    let mut child = vm.child.take().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    let out = vm.output();
    let done = flushed(&out);
    assert!(done >= 12, "{out}");
    assert!(counters.disk_flushes >= 12 && counters.disk_writes >= 12, "{counters:?}");
    assert_eq!(counters.disk_errors, 0, "{counters:?}");
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), before.len(), "nothing was written past the image's end");
    for sector in 0..done {
        assert_eq!(after[sector * 512..(sector + 1) * 512], pattern(sector, 42)[..], "flushed sector {sector}");
    }
    for sector in done + 1..64 {
        assert_eq!(
            after[sector * 512..(sector + 1) * 512],
            before[sector * 512..(sector + 1) * 512],
            "sector {sector}"
        );
    }
    drop(dir);
}

/// Malformed chains (a loop, a huge length, memory outside RAM, a head or next beyond the queue, a
/// read-only status, a bogus indirect table, an avail index jump, …): the device fails the request or
/// marks itself NEEDS_RESET, the VMM survives, the other disk keeps working and a reset revives the first.
#[test]
fn malformed_chains_break_only_their_device_until_reset() {
    let dir = Scratch::new("blk-hostile");
    let (d0, b0) = image(&dir, "d0.img", 32, 9);
    let (d1, b1) = image(&dir, "d1.img", 32, 10);
    let counters = dir.path("counters.json");
    let out = run(&[
        "--disk",
        s(&d0),
        "--disk",
        s(&d1),
        "--counters-file",
        s(&counters),
        "--cmdline",
        "hostile read=0,1 disk=1 read=0,1",
    ]);
    let stdout = assert_ok(&out);
    let case = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("BLK hostile case={name} ")))
            .unwrap_or_else(|| panic!("no {name} case in:\n{stdout}"))
            .to_owned()
    };
    // Structural errors: nothing completes and the device asks for a reset (status bit 0x40).
    for name in ["loop", "badhead", "badnext", "rostatus", "indirect", "availjump"] {
        let line = case(name);
        assert!(line.ends_with("used=0 status=255 devstatus=4f"), "{line}");
    }
    // Impossible but well-formed requests: an error status, the device keeps going.
    for name in ["huge", "outside", "shortheader", "writeread"] {
        let line = case(name);
        assert!(line.ends_with("used=1 status=1 devstatus=0f"), "{line}");
    }
    assert!(
        stdout.contains(&format!("BLK read disk=0 sector=0 count=1 status=0 sum={}\n", fnv(&b0[..512]))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("BLK read disk=1 sector=0 count=1 status=0 sum={}\n", fnv(&b1[..512]))),
        "{stdout}"
    );
    assert_eq!(std::fs::read(&d0).unwrap(), b0, "no hostile request wrote to the image");
    let c: vmm_core::counters::CountersSnapshot =
        serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    assert_eq!(c.disk_malformed, 6, "{c:?}");
    let warnings = text(&out.stderr).matches("guest driver error").count();
    assert_eq!(warnings, 1, "one warning per drive, the rest at debug level: {}", text(&out.stderr));
}

/// How many whole `BLK read` lines the guest has printed (the serial log may end mid-line).
fn complete_reads(output: &str) -> usize {
    output.split_inclusive('\n').filter(|l| l.starts_with("BLK read") && l.ends_with('\n')).count()
}

/// attach-media / eject-media on a running VM: the guest sees each change through a configuration
/// interrupt, reads the new media, gets errors while the drive is empty.
#[test]
fn media_can_be_attached_ejected_and_swapped_while_running() {
    let dir = Scratch::new("blk-media");
    let (iso_a, a) = image(&dir, "a.iso", 40, 0x21);
    let (iso_b, b) = image(&dir, "b.iso", 12, 0x42);
    let vm = Running::start(
        "blk-media-vm",
        &[
            "--disk",
            ",removable",
            "--cmdline",
            "read=0,1 wait-media read=0,1 wait-media read=0,1 wait-media read=0,1 read=39,1",
        ],
    );
    vm.wait_for(|o| o.contains("BLK read disk=0 sector=0 count=1 status=1"));
    assert!(vm.output().contains("capacity=0 ro=1"), "{}", vm.output());
    let mut c = vm.client();
    let status = c.request(&Request::Status).unwrap().status.unwrap();
    assert_eq!(status.drives.len(), 1);
    assert_eq!((status.drives[0].id.as_str(), status.drives[0].media.as_ref()), ("disk0", None));

    let attached = c.request(&Request::AttachMedia { path: iso_a.clone(), drive: None }).unwrap();
    assert_eq!(attached.drive.unwrap().media.as_deref(), Some(iso_a.as_path()));
    let out = vm.wait_for(|o| complete_reads(o) >= 2);
    assert!(out.contains("BLK media disk=0 capacity=40\n"), "{out}");
    assert!(out.contains(&format!("sector=0 count=1 status=0 sum={}\n", fnv(&a[..512]))), "{out}");

    let ejected = c.request(&Request::EjectMedia { drive: Some("disk0".into()) }).unwrap();
    assert_eq!(ejected.drive.unwrap().media, None);
    let out = vm.wait_for(|o| complete_reads(o) >= 3);
    assert!(out.contains("BLK media disk=0 capacity=0\n"), "{out}");
    assert_eq!(out.matches("count=1 status=1").count(), 2, "reads of an empty drive fail: {out}");

    c.request(&Request::AttachMedia { path: iso_b.clone(), drive: None }).unwrap();
    let out = vm.wait_for(|o| o.contains("BLK done"));
    assert!(out.contains("BLK media disk=0 capacity=12\n"), "{out}");
    let reads: Vec<&str> = out.lines().filter(|l| l.starts_with("BLK read")).collect();
    assert!(reads[3].ends_with(&format!("sector=0 count=1 status=0 sum={}", fnv(&b[..512]))), "{out}");
    // Sector 39 existed on the first ISO, not on this one.
    assert!(reads[4].starts_with("BLK read disk=0 sector=39 count=1 status=1"), "{out}");

    // Refusals come back as clear errors, and the VM is unharmed.
    let missing = c.request(&Request::AttachMedia { path: vm.dir.path("none.iso"), drive: None }).unwrap_err();
    assert!(
        missing.to_string().contains("cannot open disk image") && missing.to_string().contains("none.iso"),
        "{missing}"
    );
    let wrong = c.request(&Request::EjectMedia { drive: Some("disk7".into()) }).unwrap_err();
    assert!(wrong.to_string().contains("no drive named \"disk7\""), "{wrong}");
}

#[test]
fn fixed_disks_refuse_media_changes() {
    let dir = Scratch::new("blk-fixed");
    let (path, _) = image(&dir, "fixed.img", 8, 0);
    let vm = Running::start("blk-fixed-vm", &["--disk", s(&path), "--cmdline", "hang"]);
    vm.wait_for(|o| o.contains("BLK hang"));
    let mut c = vm.client();
    let e = c.request(&Request::EjectMedia { drive: Some("disk0".into()) }).unwrap_err();
    assert!(e.to_string().contains("drive disk0 is not removable"), "{e}");
    let e = c.request(&Request::EjectMedia { drive: None }).unwrap_err();
    assert!(e.to_string().contains("no removable drive"), "{e}");
}

#[test]
fn bad_disk_options_are_refused_with_the_reason() {
    let dir = Scratch::new("blk-options");
    let (path, _) = image(&dir, "x.img", 8, 0);
    let cases: [(&[&str], &str); 4] = [
        (&["--disk", "/nonexistent/disk.img"], "disk0: No such file"),
        (&["--disk", "x.img,fast"], "is not PATH[,readonly][,removable][,serial=S]"),
        (&["--disk", s(&path), "--cdrom", s(&path)], "is in use by another VM"),
        (&["--disk", &format!("{},serial=this-serial-is-far-too-long", s(&path))], "at most 20"),
    ];
    for (args, message) in cases {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(text(&out.stderr).contains(message), "{args:?}: {}", text(&out.stderr));
    }
}

/// A guest reset rebuilds the machine: the disk is served again by a fresh device, the old device's
/// threads are gone (no thread leak), and what was written before the reset is still there.
#[test]
fn disks_survive_a_reset_without_leaking_threads() {
    let dir = Scratch::new("blk-reset");
    let (path, _) = image(&dir, "r.img", 16, 5);
    let vm = Running::start("blk-reset-vm", &["--disk", s(&path), "--cmdline", "read=2,1 write=2,1,77 flush hang"]);
    vm.wait_for(|o| o.contains("BLK hang"));
    let pid = vm.child.as_ref().unwrap().id();
    let threads = || std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    let mut c = vm.client();
    c.request(&Request::Status).unwrap();
    let before = threads(); // the control connection's thread included
    for round in 2..=4 {
        c.request(&Request::Reset).unwrap();
        let out = vm.wait_for(|o| o.matches("BLK hang").count() >= round);
        let reads: Vec<&str> = out.lines().filter(|l| l.starts_with("BLK read disk=0 sector=2")).collect();
        let written = format!("status=0 sum={}", fnv(&pattern(2, 77)));
        assert!(reads[round - 1].ends_with(&written), "boot {round} reads what boot {} wrote: {out}", round - 1);
    }
    assert_eq!(c.request(&Request::Status).unwrap().status.unwrap().boots, 4);
    assert_eq!(threads(), before, "every boot's device threads were joined");
}

/// Runs qemu-img (Debian's qemu-utils, the outside peer of the qcow2 tests), which must succeed.
fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img cannot run ({e}): install qemu-utils (./x does)"));
    assert!(out.status.success(), "qemu-img {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// The guest's result lines (reads with their checksums, writes, flushes).
fn results(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("BLK read") || l.starts_with("BLK write") || l.starts_with("BLK flush"))
        .collect()
}

/// The same writes, reads and flushes on a raw image, on a qcow2 copy made by qemu-img (4 KiB clusters, so
/// the writes allocate many) and on a qcow2 overlay whose backing file is given on the command line: the
/// guest sees the same checksums on all three, and qemu-img finds the qcow2 images clean and equal to the raw.
#[test]
fn a_qcow2_disk_gives_the_guest_what_a_raw_one_does() {
    let dir = Scratch::new("blk-qcow2");
    let (raw, original) = image(&dir, "d.raw", 4096, 5);
    let base = dir.path("base.raw");
    std::fs::copy(&raw, &base).unwrap();
    let q = dir.path("d.qcow2");
    qemu_img(&["convert", "-O", "qcow2", "-o", "cluster_size=4096", s(&raw), s(&q)]);
    let overlay = dir.path("overlay.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "raw", s(&overlay)]);
    let cmdline = "read=0,8 write=100,300,9 flush read=100,300 write=2000,16,5 read=1990,40 write=4090,6,1 \
                   read=0,2048 read=2048,2048 flush";
    let overlay_disk = format!("{},backing={}", s(&overlay), s(&base));
    let mut seen = Vec::new();
    for disk in [s(&raw), s(&q), &overlay_disk] {
        let stdout = assert_ok(&run(&["--disk", disk, "--cmdline", cmdline]));
        assert!(stdout.contains("capacity=4096 ro=0"), "{stdout}");
        let lines: Vec<String> = results(&stdout).into_iter().map(str::to_owned).collect();
        assert_eq!(lines.len(), 10, "{stdout}");
        assert!(lines.iter().all(|l| l.contains("status=0")), "{stdout}");
        seen.push(lines);
    }
    assert_eq!(seen[0], seen[1], "qcow2 and raw give the guest the same bytes");
    assert_eq!(seen[0], seen[2], "an overlay and raw give the guest the same bytes");
    qemu_img(&["check", s(&q)]);
    qemu_img(&["check", s(&overlay)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", s(&q), s(&raw)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", s(&overlay), s(&raw)]);
    assert_eq!(std::fs::read(&base).unwrap(), original, "the backing file is never written");
    // A qcow2 image naming a backing file that is not given is refused before the guest starts.
    let out = run(&["--disk", s(&overlay), "--cmdline", "read=0,1"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("denied"), "{}", text(&out.stderr));
}

/// `qemu-img check` of an image its writer was killed under: no error (exit 0), or only leaked clusters
/// (exit 3: a cluster whose refcount was written before the table that would point at it — the order that
/// keeps a crash harmless; QEMU's qcow2 leaks the same way and `qemu-img check -r leaks` reclaims them).
/// Returns how many clusters leaked.
fn qemu_img_check_after_a_crash(image: &Path) -> usize {
    let out = Command::new("qemu-img").arg("check").arg(image).output().expect("qemu-img (qemu-utils)");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    match out.status.code() {
        Some(0) => 0,
        Some(3) => {
            assert!(!said.contains("ERROR") && !said.contains("corrupt"), "qemu-img check: {said}");
            said.lines().filter(|l| l.starts_with("Leaked cluster")).count()
        }
        _ => panic!("qemu-img check {}: {said}", image.display()),
    }
}

/// The flush/kill pattern of `flushed_writes_to_qcow2_survive_kill_9` on a fresh image: `writes` writes of
/// one sector 8 apart (a new 4 KiB cluster each), each flushed; SIGKILL once `kill_after` flushes are done.
/// Returns the image and the flushes done.
fn qcow2_killed_after_flushes(dir: &Scratch, name: &str, writes: usize, kill_after: usize) -> (PathBuf, usize) {
    let q = dir.path(&format!("{name}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", s(&q), "1M"]);
    let words: Vec<String> = (0..writes).flat_map(|i| [format!("write={},1,42", i * 8), "flush".into()]).collect();
    let cmdline = words.join(" ") + " hang";
    let vm = Running::start(&format!("blk-{name}-vm"), &["--disk", s(&q), "--cmdline", &cmdline]);
    let flushed = |out: &str| out.lines().filter(|l| l.starts_with("BLK flush disk=0 status=0")).count();
    vm.wait_for(|out| flushed(out) >= kill_after);
    let mut vm = vm;
    let mut child = vm.child.take().unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
    let out = vm.output();
    let done = flushed(&out);
    assert!(done >= kill_after, "{out}");
    (q, done)
}

/// As `flushed_writes_survive_kill_9`, on a qcow2 image whose every write allocates clusters, killed while
/// the guest still writes: every flushed sector is in the image, and `qemu-img check` finds no error (a
/// cluster the kill caught between its refcount and its table may leak: counted, harmless). Killed once the
/// guest wrote and flushed everything and waits, the image is entirely clean.
#[test]
fn flushed_writes_to_qcow2_survive_kill_9() {
    let dir = Scratch::new("blk-qcow2-crash");
    let (idle, _) = qcow2_killed_after_flushes(&dir, "idle", 16, 16);
    assert_eq!(qemu_img_check_after_a_crash(&idle), 0, "killed with every write flushed: no leak either");
    let (q, done) = qcow2_killed_after_flushes(&dir, "crash", 48, 12);
    let leaked = qemu_img_check_after_a_crash(&q);
    assert!(leaked <= 1, "at most the cluster being written when the kill came leaks: {leaked}");
    let raw = dir.path("crash.raw");
    qemu_img(&["convert", "-O", "raw", s(&q), s(&raw)]);
    let after = std::fs::read(&raw).unwrap();
    assert_eq!(after.len(), 1 << 20);
    for i in 0..done {
        let sector = i * 8;
        assert_eq!(after[sector * 512..(sector + 1) * 512], pattern(sector, 42)[..], "flushed sector {sector}");
    }
    for i in done + 1..48 {
        let sector = i * 8;
        assert!(after[sector * 512..(sector + 1) * 512].iter().all(|&b| b == 0), "sector {sector} was never written");
    }
}

/// qcow2 media attached through the control socket while the VM runs (the open happens under the control
/// threads' seccomp filter): the guest reads what qemu-img put in it; an image naming a backing file is
/// refused with the reason, and the VM carries on.
#[test]
fn qcow2_media_can_be_attached_while_running() {
    let dir = Scratch::new("blk-qcow2-media");
    let (raw, bytes) = image(&dir, "m.raw", 40, 0x33);
    let q = dir.path("m.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&raw), s(&q)]);
    let evil = dir.path("evil.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", s(&evil), "1M"]);
    let vm =
        Running::start("blk-qcow2-media-vm", &["--disk", ",removable", "--cmdline", "wait-media read=0,8 read=39,1"]);
    // The media goes in once the guest's driver is up and waiting for the change.
    vm.wait_for(|o| o.contains("BLK disk=0 slot="));
    let mut c = vm.client();
    let err = c.request(&Request::AttachMedia { path: evil.clone(), drive: None }).unwrap_err();
    assert!(err.to_string().contains("denied") && err.to_string().contains("/etc/shadow"), "{err}");
    c.request(&Request::AttachMedia { path: q.clone(), drive: None }).unwrap();
    let out = vm.wait_for(|o| o.contains("BLK done"));
    assert!(out.contains("BLK media disk=0 capacity=40\n"), "{out}");
    assert!(out.contains(&format!("sector=0 count=8 status=0 sum={}\n", fnv(&bytes[..8 * 512]))), "{out}");
    assert!(out.contains(&format!("sector=39 count=1 status=0 sum={}\n", fnv(&bytes[39 * 512..]))), "{out}");
}

/// The guest's DISCARD and WRITE_ZEROES (negotiated by the micro-guest when offered) on a raw image and on
/// a qcow2 image with 64 KiB clusters: both read back zeros where the guest discarded or zeroed, the rest
/// unchanged, the same bytes on both; the files give the space back (raw: holes punched; qcow2: clusters
/// freed, as `qemu-img map` shows), `qemu-img check` finds the qcow2 clean and `qemu-img compare` equal.
#[test]
fn discard_and_write_zeroes_give_space_back_on_raw_and_qcow2() {
    let dir = Scratch::new("blk-discard");
    let mib = 2048; // sectors per MiB
    let raw = dir.path("d.raw");
    std::fs::File::create(&raw).unwrap().set_len(8 << 20).unwrap();
    let q = dir.path("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", s(&q), "8M"]);
    // Fill 4 MiB, flush; discard MiB 1, zero MiB 2 with UNMAP (cluster-aligned, so qcow2 frees whole
    // clusters) and without it a range that is not aligned (sectors 100-299 of MiB 0: partly zeroed
    // clusters, which stay allocated), then read everything back.
    let mut words: Vec<String> = (0..4).map(|i| format!("write={},{mib},{}", i * mib, i + 1)).collect();
    words.push("flush".into());
    words.push(format!("discard={mib},{mib}"));
    words.push(format!("zeroes={},{mib},1", 2 * mib));
    words.push("zeroes=100,200,0".into());
    words.push("flush".into());
    words.extend((0..4).map(|i| format!("read={},{mib}", i * mib)));
    let cmdline = words.join(" ");
    let lines = |stdout: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|l| {
                ["BLK read", "BLK write", "BLK flush", "BLK discard", "BLK zeroes"].iter().any(|p| l.starts_with(p))
            })
            .map(str::to_owned)
            .collect()
    };
    let raw_out = assert_ok(&run(&["--disk", s(&raw), "--cmdline", &cmdline]));
    let q_out = assert_ok(&run(&["--disk", s(&q), "--cmdline", &cmdline]));
    let (raw_lines, q_lines) = (lines(&raw_out), lines(&q_out));
    assert_eq!(raw_lines.len(), 13, "{raw_out}");
    assert!(raw_lines.iter().all(|l| l.contains("status=0")), "every request succeeds: {raw_out}");
    assert_eq!(raw_lines, q_lines, "qcow2 and raw give the guest the same bytes\nraw:\n{raw_out}\nqcow2:\n{q_out}");
    // What the guest must have read: MiB 0 with sectors 100-299 zero, MiB 1 and 2 zero, MiB 3 its pattern.
    let mut expect: Vec<u8> = Vec::new();
    for i in 0..4usize {
        let mut chunk: Vec<u8> = (0..mib).flat_map(|sector| pattern(i * mib + sector, i + 1)).collect();
        if i == 0 {
            chunk[100 * 512..300 * 512].fill(0);
        }
        if i == 1 || i == 2 {
            chunk.fill(0);
        }
        let read = format!("BLK read disk=0 sector={} count={mib} status=0 sum={}", i * mib, fnv(&chunk));
        assert!(raw_lines.contains(&read), "{raw_out}\nexpected {read}");
        expect.extend(chunk);
    }
    let raw_bytes = std::fs::read(&raw).unwrap();
    assert_eq!(raw_bytes[..4 << 20], expect[..]);
    assert!(raw_bytes[4 << 20..].iter().all(|&b| b == 0));
    // Space given back: the raw file holds at most MiB 0 and MiB 3 (plus a block for the partial range).
    let allocated = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    assert!(allocated(&raw) <= (2 << 20) + 65536, "raw keeps {} bytes allocated", allocated(&raw));
    qemu_img(&["check", s(&q)]);
    qemu_img(&["compare", "-q", "-f", "qcow2", "-F", "raw", s(&q), s(&raw)]);
    // qemu-img map lists the ranges that hold data: MiB 1 and 2 are not among them.
    let map: serde_json::Value = serde_json::from_str(&qemu_img(&["map", "--output=json", s(&q)])).unwrap();
    for entry in map.as_array().unwrap() {
        let (start, length) = (entry["start"].as_u64().unwrap(), entry["length"].as_u64().unwrap());
        let data = entry["data"].as_bool().unwrap();
        let overlaps = start < (3 << 20) && start + length > (1 << 20);
        assert!(!(data && overlaps), "qcow2 still maps data in the discarded/zeroed MiBs: {entry}");
    }
}

/// A disk-only snapshot of a running VM: while the guest writes and flushes sector after sector, its
/// qcow2 disk moves onto a new overlay (`switch-drive`, vCPUs paused meanwhile). The guest notices
/// nothing (every request succeeds, it reads back everything it wrote); the old image holds exactly the
/// writes made before the switch (a prefix of the sequence, at least those flushed by then) and the overlay
/// the rest; both pass `qemu-img check`, and the chain reads as every write. A switch whose chain does not
/// start with the drive's image is refused with the reason, and the VM carries on.
#[test]
fn a_running_disk_moves_onto_an_overlay_without_the_guest_noticing() {
    let dir = Scratch::new("blk-switch");
    let base = dir.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", s(&base), "1M"]);
    let top = dir.path("top.qcow2");
    let writes = 80;
    let mut words: Vec<String> = (0..writes).flat_map(|i| [format!("write={},1,7", i * 8), "flush".into()]).collect();
    words.push(format!("read=0,{}", writes * 8));
    let vm = Running::start("blk-switch-vm", &["--disk", s(&base), "--cmdline", &words.join(" ")]);
    let flushed = |out: &str| out.lines().filter(|l| l.starts_with("BLK flush disk=0 status=0")).count();
    vm.wait_for(|out| flushed(out) >= 10);
    let mut c = vm.client();
    let switch = |backing: PathBuf| Request::SwitchDrive {
        drive: "disk0".into(),
        path: top.clone(),
        backing_name: Some("base.qcow2".into()),
        backing: vec![backing],
    };
    let err = c.request(&switch(dir.path("other.qcow2"))).unwrap_err().to_string();
    assert!(err.contains("backing chain starts with"), "{err}");
    assert!(!top.exists(), "a refused switch makes no file");
    let before = flushed(&vm.output());
    let reply = c.request(&switch(base.clone())).unwrap();
    assert_eq!(reply.drive.unwrap().media.as_deref(), Some(top.as_path()));
    eprintln!("switch-drive: the guest was paused {} us", reply.paused_after_us.unwrap());
    let out = vm.wait_for(|o| o.contains("BLK done"));
    let lines = results(&out);
    assert_eq!(lines.len(), 2 * writes + 1, "{out}");
    assert!(lines.iter().all(|l| l.contains("status=0")), "every request succeeded: {out}");
    let mut expect = vec![0u8; writes * 8 * 512];
    for i in 0..writes {
        expect[i * 8 * 512..(i * 8 + 1) * 512].copy_from_slice(&pattern(i * 8, 7));
    }
    let read = format!("BLK read disk=0 sector=0 count={} status=0 sum={}", writes * 8, fnv(&expect));
    assert!(lines.contains(&read.as_str()), "the guest reads back every write: {out}\nexpected {read}");
    drop(vm);
    qemu_img(&["check", s(&base)]);
    qemu_img(&["check", s(&top)]);
    let as_raw = |from: &Path, name: &str, unsafe_alone: bool| {
        let raw = dir.path(name);
        // The old image alone (its overlay is not read): what it held when the switch happened.
        let mut args = vec!["convert", "-O", "raw"];
        if unsafe_alone {
            args.extend(["-f", "qcow2"]);
        }
        args.extend([s(from), s(&raw)]);
        qemu_img(&args);
        std::fs::read(&raw).unwrap()
    };
    let old = as_raw(&base, "base.raw", true);
    let all = as_raw(&top, "all.raw", false);
    let written = |image: &[u8], i: usize| image[i * 8 * 512..(i * 8 + 1) * 512] == pattern(i * 8, 7)[..];
    let in_old = (0..writes).take_while(|&i| written(&old, i)).count();
    assert!(in_old >= before && in_old < writes, "the old image holds writes 0..{in_old}, flushed before: {before}");
    assert!((in_old..writes).all(|i| old[i * 8 * 512..(i * 8 + 1) * 512].iter().all(|&b| b == 0)), "nothing after");
    assert!((0..writes).all(|i| written(&all, i)), "the chain reads as every write");
}

/// A guest hammering its disk is held to the drive's limits, measured host side from the engine's
/// counters over 20 s (after the full bucket's first second): 4 KiB random reads under `iops=100` and 1 MiB
/// sequential reads under `rbps=1048576`, each within 10 %; a limit raised live holds at once (the next
/// 3 s, from a second after the change).
#[test]
fn a_guest_hammering_its_disk_is_held_to_its_limits() {
    let scratch = Scratch::new("limits-guest");
    let (small, _) = image(&scratch, "ops.img", 16 << 11, 3);
    let (big, _) = image(&scratch, "bytes.img", 64 << 11, 4);
    let ops = Running::start(
        "limits-iops",
        &["--disk", &format!("{},iops=100", s(&small)), "--cmdline", "bench-rand=1000000"],
    );
    let bytes = Running::start(
        "limits-bps",
        &["--disk", &format!("{},rbps=1048576", s(&big)), "--cmdline", "bench-seq=1000000"],
    );
    for vm in [&ops, &bytes] {
        vm.wait_for(|o| o.contains("BLK bench-start"));
    }
    let counters = |vm: &Running| {
        let c = vm.client().request(&Request::Counters).unwrap().counters.unwrap();
        (std::time::Instant::now(), c.disk_reads, c.disk_bytes_read)
    };
    std::thread::sleep(Duration::from_secs(2));
    let (a0, b0) = (counters(&ops), counters(&bytes));
    std::thread::sleep(Duration::from_secs(20));
    let (a1, b1) = (counters(&ops), counters(&bytes));
    let rate = |from: (std::time::Instant, u64, u64), to: (std::time::Instant, u64, u64), bytes: bool| {
        let n = if bytes { to.2 - from.2 } else { to.1 - from.1 };
        n as f64 / to.0.duration_since(from.0).as_secs_f64()
    };
    let (iops, bps) = (rate(a0, a1, false), rate(b0, b1, true));
    set_iops(&ops, 200);
    std::thread::sleep(Duration::from_secs(1));
    let a2 = counters(&ops);
    std::thread::sleep(Duration::from_secs(3));
    let raised = rate(a2, counters(&ops), false);
    println!(
        "guest-driven disk limits over 20 s: {iops:.1} reads/s under iops=100, {bps:.0} B/s under rbps=1048576; \
         {raised:.1} reads/s after iops=200 was set live"
    );
    assert!((90.0..=110.0).contains(&iops), "{iops:.1} reads/s under iops=100");
    assert!((0.9 * 1048576.0..=1.1 * 1048576.0).contains(&bps), "{bps:.0} B/s under rbps=1048576");
    assert!((180.0..=220.0).contains(&raised), "{raised:.1} reads/s once iops=200 was set live");
    let throttled = ops.client().request(&Request::Counters).unwrap().counters.unwrap().disk_throttled_us;
    assert!(throttled > 10_000_000, "the guest's requests waited most of the time: {throttled} us");

    fn set_iops(vm: &Running, iops: u64) {
        let limits = vmm_core::rate_limiter::DiskLimits { iops: Some(iops), ..Default::default() };
        vm.client().request(&Request::SetDiskLimits { drive: "disk0".into(), limits }).unwrap();
    }
}

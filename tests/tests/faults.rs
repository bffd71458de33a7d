//! The fault matrix (issue 20): each cell injects one fault at a random point of an operation, many times,
//! and checks what must hold afterwards — every VM definition and image the old one or the new one, whole
//! (`qemu-img check` clean), every write the guest had flushed present, the daemon restarting and
//! re-adopting its VMs, and nothing leaked (processes, temp files, sockets, mounts).
//!
//! `PORTHOLE_FAULT_ITERATIONS` sets the iterations per cell (default 2, what `cargo test` runs);
//! `./x faults [N]` runs every cell N times (200 by default) and prints one `FAULT` line per cell, which
//! README's table records. `PORTHOLE_FAULT_SEED` replays a run (each cell prints the seed it used).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use porthole_api::client::Action;
use porthole_api::{CreateVm, DiskFormat, VmState};
use porthole_tests::daemon::{Daemon, wait_state};
use porthole_tests::{Scratch, text, wait_until, workspace_bin};

const LIMIT: Duration = Duration::from_secs(60);

fn iterations() -> usize {
    std::env::var("PORTHOLE_FAULT_ITERATIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(2)
}

/// Prints a `FAULT-TIMES` line: the median and slowest of `times` (what README's tables quote).
fn print_times(what: &str, after: &str, times: &mut [Duration]) {
    times.sort();
    if let (Some(median), Some(slowest)) = (times.get(times.len() / 2), times.last()) {
        println!("FAULT-TIMES {what} {median:?} (median), {slowest:?} (slowest) {after}");
    }
}

/// A small xorshift generator: fault points are random, and a seed replays them.
struct Rng(u64);

impl Rng {
    fn for_cell(cell: &str) -> Rng {
        let seed = std::env::var("PORTHOLE_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        }) | 1;
        println!("FAULT-SEED {cell} {seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A point in `0..=limit`.
    fn upto(&mut self, limit: Duration) -> Duration {
        let ms = limit.as_millis().max(1) as u64;
        Duration::from_millis(self.next() % (ms + 1))
    }
}

/// One cell's outcome: how many iterations, and how many hit the fault before, during or after the
/// operation (so a table can say the fault landed everywhere, not only before the start).
#[derive(Default)]
struct Tally {
    runs: usize,
    before: usize,
    during: usize,
    after: usize,
}

impl Tally {
    /// Counts an iteration of a call that a fault may cut: answered (the fault came after it), not answered
    /// but done (after the work, before the reply), or neither (before or in the middle of the work).
    fn count(&mut self, answered: bool, done: bool) {
        match (answered, done) {
            (true, _) => self.after += 1,
            (false, true) => self.during += 1,
            (false, false) => self.before += 1,
        }
        self.runs += 1;
    }

    fn report(&self, cell: &str, checks: &str) {
        println!(
            "FAULT {cell}: {} iterations, all passed (fault before the operation {}, during {}, after {}); {checks}",
            self.runs, self.before, self.during, self.after
        );
    }
}

/// Files under `dir` whose names say they are half-done (temporary files of atomic writes and uploads).
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            } else if name.contains(".tmp-") || name.contains(".upload-") || name.contains(".partial") {
                found.push(path);
            }
        }
    }
    found
}

/// Processes (other than this one) whose command line names `dir`: VMMs, passt, daemons left behind.
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmdline = text(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        // A zombie's command line is empty: it has ended, only its parent has not reaped it yet.
        if cmdline.contains(&needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Unix sockets under `dir` other than a daemon's own listening socket (which the next daemon replaces):
/// a VM's control and console sockets must go with its process.
fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_socket() && entry.file_name() != "portholed.sock" {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Mounts at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(4).is_some_and(|m| m.starts_with(&needle)))
        .map(str::to_owned)
        .collect()
}

fn assert_nothing_leaked(dir: &Path, what: &str) {
    wait_until(
        Duration::from_secs(10),
        || processes_under(dir).is_empty(),
        || format!("{what}: processes left: {:?}", processes_under(dir)),
    );
    let temps = temp_files(dir);
    assert!(temps.is_empty(), "{what}: temporary files left: {temps:?}");
    let mounts = mounts_under(dir);
    assert!(mounts.is_empty(), "{what}: mounts left: {mounts:?}");
    let sockets = sockets_under(dir);
    assert!(sockets.is_empty(), "{what}: sockets left: {sockets:?}");
}

/// `qemu-img check` of an image: Ok, or what it said.
fn qemu_img_check(path: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img").arg("check").arg(path).output().map_err(|e| format!("qemu-img: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("qemu-img check {path:?}: {}{}", text(&out.stdout), text(&out.stderr)))
    }
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) of a process this test started (directly or through its daemon).
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

// ---- kill -9 of a VMM while its guest writes and flushes ----

/// The virtio-blk micro-guest's commands: 24 writes of 8 sectors, each followed by a flush, each with its
/// own seed (byte j of sector s holds (s*7 + j + seed) & 0xFF).
fn write_commands() -> (String, Vec<(u64, u64, u64)>) {
    let writes: Vec<(u64, u64, u64)> = (0..24).map(|i| (i * 8, 8, 1 + i)).collect();
    let words: Vec<String> = writes.iter().map(|(s, n, seed)| format!("write={s},{n},{seed} flush")).collect();
    (words.join(" "), writes)
}

/// The writes whose flush the guest saw complete (a write line, then its flush line, both status 0).
fn flushed_writes(serial: &str, writes: &[(u64, u64, u64)]) -> Vec<(u64, u64, u64)> {
    let mut flushed = Vec::new();
    let mut pending: Option<u64> = None;
    for line in serial.lines() {
        if let Some(rest) = line.strip_prefix("BLK write disk=0 sector=") {
            let sector = rest.split_whitespace().next().and_then(|s| s.parse().ok());
            pending = sector.filter(|_| line.ends_with("status=0"));
        } else if line.starts_with("BLK flush disk=0")
            && line.ends_with("status=0")
            && let Some(w) = pending.take().and_then(|s| writes.iter().find(|w| w.0 == s))
        {
            flushed.push(*w);
        }
    }
    flushed
}

/// The image's first `bytes` as raw data (qcow2 through `qemu-img convert`).
fn image_bytes(path: &Path, format: DiskFormat, scratch: &Path) -> Vec<u8> {
    match format {
        DiskFormat::Raw => std::fs::read(path).unwrap(),
        DiskFormat::Qcow2 => {
            let raw = scratch.join("converted.raw");
            let out = Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(path)
                .arg(&raw)
                .output()
                .unwrap();
            assert!(out.status.success(), "qemu-img convert: {}", text(&out.stderr));
            let bytes = std::fs::read(&raw).unwrap();
            let _ = std::fs::remove_file(&raw);
            bytes
        }
    }
}

#[test]
fn a_vmm_killed_while_its_guest_writes_keeps_every_flushed_write_and_a_sound_image() {
    let dir = Scratch::new("fault-vmm-writes");
    let mut rng = Rng::for_cell("vmm-kill-writes");
    let (commands, writes) = write_commands();
    let guest = porthole_guests::path("virtio-blk");
    let start = |image: &Path, format: DiskFormat, serial: &Path| {
        let disk = format!("{},format={}", image.display(), if format == DiskFormat::Qcow2 { "qcow2" } else { "raw" });
        Command::new(workspace_bin("porthole-vmm"))
            .arg("--kernel")
            .arg(&guest)
            .args(["--memory", "64", "--cmdline", &commands, "--disk", &disk])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let fresh = |format: DiskFormat| -> PathBuf {
        let image = dir.path(if format == DiskFormat::Qcow2 { "disk.qcow2" } else { "disk.raw" });
        let _ = std::fs::remove_file(&image);
        let fmt = if format == DiskFormat::Qcow2 { "qcow2" } else { "raw" };
        let out = Command::new("qemu-img").args(["create", "-q", "-f", fmt]).arg(&image).arg("1M").output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        image
    };
    // How long the whole run takes without a fault: the fault lands anywhere in 0..1.2 of it.
    let serial = dir.path("serial.log");
    let image = fresh(DiskFormat::Qcow2);
    let began = Instant::now();
    let out = porthole_tests::wait(start(&image, DiskFormat::Qcow2, &serial), LIMIT);
    let whole = began.elapsed();
    assert!(out.status.success(), "the unfaulted run");
    assert_eq!(flushed_writes(&std::fs::read_to_string(&serial).unwrap(), &writes).len(), writes.len());
    let mut tally = Tally::default();
    for i in 0..iterations() {
        let format = if i.is_multiple_of(2) { DiskFormat::Qcow2 } else { DiskFormat::Raw };
        let image = fresh(format);
        let _ = std::fs::remove_file(&serial);
        let mut child = start(&image, format, &serial);
        std::thread::sleep(rng.upto(whole.mul_f32(1.2)));
        kill9(child.id());
        let _ = child.wait();
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        let flushed = flushed_writes(&log, &writes);
        match flushed.len() {
            0 => tally.before += 1,
            n if n == writes.len() => tally.after += 1,
            _ => tally.during += 1,
        }
        if format == DiskFormat::Qcow2 {
            qemu_img_check(&image).unwrap_or_else(|e| panic!("iteration {i}: {e}"));
        }
        let bytes = image_bytes(&image, format, dir.dir());
        for (sector, count, seed) in &flushed {
            for s in *sector..sector + count {
                let at = (s * 512) as usize;
                let want: Vec<u8> = (0..512u64).map(|j| ((s * 7 + j + seed) & 0xFF) as u8).collect();
                assert!(
                    bytes.get(at..at + 512) == Some(&want[..]),
                    "iteration {i} ({format:?}): sector {s}, flushed by the guest, does not hold its data\n{log}"
                );
            }
        }
        tally.runs += 1;
    }
    assert_nothing_leaked(dir.dir(), "vmm-kill-writes");
    tally.report(
        "kill -9 of a VMM during guest writes + flushes (raw, qcow2)",
        "flushed writes present, qemu-img check clean",
    );
}

// ---- kill -9 of the daemon during an operation, then a restart ----

fn kernel(guest: &str) -> porthole_api::BootSpec {
    porthole_api::BootSpec {
        kernel: porthole_guests::path(guest).display().to_string(),
        initrd: None,
        cmdline: String::new(),
    }
}

fn idle_kernel() -> porthole_api::BootSpec {
    kernel("idle")
}

/// A VM counting on its serial port, with a 1 GiB qcow2 disk and no network: its state is worth saving.
fn ticker_vm(name: &str) -> CreateVm {
    CreateVm { boot: Some(kernel("ticker")), disk_gib: 1, nics: Some(Vec::new()), ..CreateVm::new(name, 1, 64) }
}

/// After a restart: every VM answers, its definition is whole, its disk passes `qemu-img check`.
async fn every_vm_is_whole(d: &Daemon) -> usize {
    let c = d.local();
    let vms = c.list_vms().await.unwrap();
    for vm in &vms {
        let got = c.vm(&vm.id).await.unwrap();
        assert_eq!(got.name, vm.name);
        for entry in std::fs::read_dir(d.data.join("vms").join(&vm.id)).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "qcow2") {
                qemu_img_check(&path).unwrap();
            }
        }
    }
    assert!(c.host().await.unwrap().problems.is_empty(), "{:?}", c.host().await.unwrap().problems);
    vms.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_while_creating_a_vm_restarts_with_it_whole_or_absent() {
    let dir = Scratch::new("fault-daemon-create");
    let mut rng = Rng::for_cell("daemon-kill-create");
    let request = |i: usize| CreateVm {
        boot: Some(idle_kernel()),
        disk_gib: 2,
        disk_format: Some(if i.is_multiple_of(2) { DiskFormat::Qcow2 } else { DiskFormat::Raw }),
        nics: Some(Vec::new()),
        ..CreateVm::new(format!("vm{i:03}"), 1, 64)
    };
    let d = Daemon::start(&dir, false, &[]);
    let began = Instant::now();
    d.local().create_vm(&request(0)).await.unwrap();
    let whole = began.elapsed();
    drop(d);
    let mut tally = Tally::default();
    let mut expected = 1;
    for i in 1..=iterations() {
        let mut d = Daemon::start(&dir, false, &[]);
        let c = d.local();
        let req = request(i);
        let call = tokio::spawn(async move { c.create_vm(&req).await });
        tokio::time::sleep(rng.upto(whole.mul_f32(1.5))).await;
        d.kill9();
        let answered = call.await.unwrap().is_ok();
        let d = Daemon::start(&dir, false, &[]);
        let n = every_vm_is_whole(&d).await;
        let created = n == expected + 1;
        assert!(n == expected || created, "iteration {i}: {n} VMs, expected {expected} or one more");
        assert!(!answered || created, "iteration {i}: the create was answered but the VM is gone");
        tally.count(answered, created);
        expected = n;
        drop(d);
        assert_nothing_leaked(dir.dir(), &format!("daemon-kill-create iteration {i}"));
    }
    tally.report(
        "kill -9 of the daemon during VM create (qcow2, raw)",
        "each VM whole or absent, disks check clean, nothing left",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_during_an_upload_restarts_with_the_image_whole_or_absent() {
    let dir = Scratch::new("fault-daemon-upload");
    let mut rng = Rng::for_cell("daemon-kill-upload");
    // 24 MiB: long enough to be cut in the middle.
    let iso = dir.path("big.iso");
    pattern_image(&iso, 24, true);
    let d = Daemon::start(&dir, false, &[]);
    let began = Instant::now();
    let first = d.local().upload_image("first.iso", &iso, |_, _| {}).await.unwrap();
    let whole = began.elapsed();
    drop(d);
    let mut tally = Tally::default();
    for i in 0..iterations() {
        let mut d = Daemon::start(&dir, false, &[]);
        let c = d.local();
        let name = format!("up{i:03}.iso");
        let (path, n) = (iso.clone(), name.clone());
        let call = tokio::spawn(async move { c.upload_image(&n, &path, |_, _| {}).await });
        tokio::time::sleep(rng.upto(whole.mul_f32(1.3))).await;
        d.kill9();
        let answered = call.await.unwrap().is_ok();
        let d = Daemon::start(&dir, false, &[]);
        let images = d.local().images().await.unwrap();
        let got = images.iter().find(|im| im.name == name);
        if let Some(im) = got {
            assert_eq!((im.size_bytes, &im.sha256), (first.size_bytes, &first.sha256), "iteration {i}: half an image");
        }
        assert!(!answered || got.is_some(), "iteration {i}: the upload was answered but the image is gone");
        tally.count(answered, got.is_some());
        drop(d);
        assert_nothing_leaked(dir.dir(), &format!("daemon-kill-upload iteration {i}"));
    }
    tally.report(
        "kill -9 of the daemon during an ISO upload (24 MiB)",
        "each image whole (size, SHA-256) or absent, no partial files",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_while_vms_run_re_adopts_them_once() {
    let dir = Scratch::new("fault-daemon-adopt");
    let mut rng = Rng::for_cell("daemon-kill-running");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let mut ids = Vec::new();
    for i in 0..3 {
        let req = CreateVm {
            boot: Some(idle_kernel()),
            disk_gib: 0,
            nics: Some(Vec::new()),
            ..CreateVm::new(format!("run{i}"), 1, 64)
        };
        let vm = c.create_vm(&req).await.unwrap();
        c.action(&vm.id, Action::Start).await.unwrap();
        ids.push(vm.id);
    }
    let pids = |d: &Daemon| -> Vec<String> {
        ids.iter()
            .map(|id| {
                let file = d.run.join("vms").join(id).join("pid");
                std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file:?}: {e}\n{}", d.log_text()))
            })
            .collect()
    };
    let before = pids(&d);
    drop(c);
    let mut d = d;
    let mut graveyard = Vec::new();
    let mut tally = Tally::default();
    for i in 0..iterations() {
        // The daemon dies at a random point of its life: at once, mid-start-up, or while serving reads.
        tokio::time::sleep(rng.upto(Duration::from_millis(300))).await;
        d.kill9();
        for pid in &before {
            assert!(Path::new(&format!("/proc/{}", pid.trim())).exists(), "iteration {i}: a VM died with its daemon");
        }
        // (A test daemon's drop ends the VMs it started: the killed one is kept until the end.)
        graveyard.push(std::mem::replace(&mut d, Daemon::start(&dir, false, &[])));
        let c = d.local();
        for id in &ids {
            let vm = c.vm(id).await.unwrap();
            assert_eq!(vm.state, VmState::Running, "iteration {i}: not re-adopted: {vm:?}\n{}", d.log_text());
        }
        assert_eq!(pids(&d), before, "iteration {i}: re-adopted the same processes, none started twice");
        let is_engine = |p: &&String| p.split_whitespace().nth(1).is_some_and(|exe| exe.ends_with("/porthole-vmm"));
        let vmms = processes_under(dir.dir()).iter().filter(is_engine).count();
        assert_eq!(vmms, ids.len(), "iteration {i}: one engine per VM");
        tally.during += 1;
        tally.runs += 1;
    }
    let c = d.local();
    for id in &ids {
        c.action(id, Action::Poweroff).await.unwrap();
        wait_state(&c, id, VmState::Stopped, LIMIT).await;
    }
    drop(c);
    drop(d);
    drop(graveyard);
    assert_nothing_leaked(dir.dir(), "daemon-kill-running");
    tally.report("kill -9 of the daemon while 3 VMs run", "each VM re-adopted once, running, same process");
}

// ---- a full disk under the daemon's data ----

/// A tmpfs of `mib` MiB mounted at `path` (root only), unmounted when dropped.
struct SmallFilesystem(PathBuf);

impl SmallFilesystem {
    /// The tmpfs, or None after saying why the cell is skipped (not root, or the mount refused).
    fn mount_or_skip(path: &Path, mib: u64) -> Option<SmallFilesystem> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: a full filesystem needs a tmpfs mount, which needs root here");
            return None;
        }
        Self::mount(path, mib).inspect_err(|e| println!("SKIPPED: cannot mount a tmpfs: {e}")).ok()
    }

    fn mount(path: &Path, mib: u64) -> Result<SmallFilesystem, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "porthole-fault"])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if out.status.success() { Ok(SmallFilesystem(path.to_owned())) } else { Err(text(&out.stderr)) }
    }

    /// Leaves about `free` bytes free, with a filler file.
    fn leave_free(&self, free: u64) {
        let filler = self.0.join("filler");
        let _ = std::fs::remove_file(&filler);
        // SAFETY: statvfs fills the struct; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        let available = st.f_bavail * st.f_frsize;
        let fill = available.saturating_sub(free);
        let f = std::fs::File::create(&filler).unwrap();
        // A tmpfs allocates what is written, not what a length promises.
        let chunk = vec![0x5Au8; 1 << 20];
        let mut left = fill;
        let mut w = std::io::BufWriter::new(f);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if std::io::Write::write_all(&mut w, &chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = std::io::Write::flush(&mut w);
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// A file of `mib` MiB with a pattern, for the library: a raw disk image, or with `iso` an ISO by its
/// primary volume descriptor (`CD001` at byte 32 769).
fn pattern_image(path: &Path, mib: usize, iso: bool) {
    let mut bytes: Vec<u8> = (0..mib << 20).map(|i| (i as u64).wrapping_mul(0x9E37_79B9).to_le_bytes()[2]).collect();
    if iso {
        bytes[32_768] = 1;
        bytes[32_769..32_774].copy_from_slice(b"CD001");
    }
    std::fs::write(path, bytes).unwrap();
}

/// Takes a snapshot of VM `id` and waits for its task: Ok, or the task's (or the request's) error.
async fn take_snapshot(c: &porthole_api::Client, id: &str, name: &str, with_state: bool) -> Result<(), String> {
    let take =
        porthole_api::TakeSnapshot { name: name.to_owned(), description: String::new(), with_state: Some(with_state) };
    let task = c.take_snapshot(id, &take).await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + LIMIT;
    loop {
        let t = c.task(&task.id).await.unwrap();
        if t.state != porthole_api::TaskState::Running {
            return if t.state == porthole_api::TaskState::Done { Ok(()) } else { Err(t.error.unwrap_or_default()) };
        }
        assert!(Instant::now() < deadline, "the snapshot never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_uploads_creates_snapshots_and_saves_cleanly() {
    let dir = Scratch::new("fault-disk-full");
    let Some(fs) = SmallFilesystem::mount_or_skip(&dir.path("data"), 96) else { return };
    let mut rng = Rng::for_cell("disk-full");
    let image = dir.path("base.img");
    pattern_image(&image, 8, false);
    let iso = dir.path("cd.iso");
    pattern_image(&iso, 8, true);
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    c.upload_image("base.img", &image, |_, _| {}).await.unwrap();
    // A running VM whose state the cell saves (64 MiB of RAM, mostly zeros: its state is a few MiB).
    let runner = c.create_vm(&ticker_vm("runner")).await.unwrap();
    let mut tally = Tally::default();
    let (mut refused, mut done) = (0, 0);
    for i in 0..iterations() {
        // Free space anywhere from none to more than an operation needs.
        let free = rng.next() % (12 << 20);
        if c.vm(&runner.id).await.unwrap().state != VmState::Running {
            fs.leave_free(u64::MAX); // room to start (and resume a suspended VM)
            c.action(&runner.id, Action::Start).await.unwrap();
        }
        fs.leave_free(free);
        let step = i % 5;
        let outcome: Result<(), String> = match step {
            0 => c.upload_image(&format!("cd{i}.iso"), &iso, |_, _| {}).await.map(|_| ()).map_err(|e| e.to_string()),
            1 => {
                let req = CreateVm {
                    disk_image: Some("base.img".into()),
                    disk_format: Some(DiskFormat::Raw),
                    nics: Some(Vec::new()),
                    ..CreateVm::new(format!("copy{i}"), 1, 64)
                };
                c.create_vm(&req).await.map(|_| ()).map_err(|e| e.to_string())
            }
            // With its state, and of its disks only (the running disk moves onto a new overlay).
            2 | 4 => take_snapshot(&c, &runner.id, &format!("s{i}"), step == 2).await,
            _ => c.action(&runner.id, Action::Suspend).await.map(|_| ()).map_err(|e| e.to_string()),
        };
        match &outcome {
            Ok(()) => done += 1,
            Err(why) => {
                refused += 1;
                assert!(!why.trim().is_empty(), "iteration {i}: a failure without a reason");
            }
        }
        // Whatever happened: the runner is running, or suspended after a save that succeeded.
        let state = c.vm(&runner.id).await.unwrap().state;
        let want = if step == 3 && outcome.is_ok() { VmState::Suspended } else { VmState::Running };
        assert_eq!(state, want, "iteration {i} (step {step}, {free} bytes free): {outcome:?}");
        fs.leave_free(u64::MAX);
        every_vm_is_whole(&d).await;
        for im in c.images().await.unwrap().iter().filter(|im| im.name.starts_with("cd")) {
            assert_eq!(im.size_bytes, 8 << 20, "iteration {i}: half an image in the library");
        }
        let temps = temp_files(&d.data);
        assert!(temps.is_empty(), "iteration {i} (step {step}, {free} bytes free): {outcome:?} left {temps:?}");
        match (step, outcome.is_ok()) {
            (_, true) => tally.after += 1,
            _ => tally.during += 1,
        }
        tally.runs += 1;
    }
    let _ = c.action(&runner.id, Action::Poweroff).await;
    drop(c);
    drop(d);
    drop(fs);
    assert_nothing_leaked(dir.dir(), "disk-full");
    println!("FAULT-DISK-FULL done={done} refused={refused}");
    tally.report(
        "disk full (tmpfs) during upload, create from an image, snapshot of a running VM with state and of its \
         disk only, suspend",
        "refused with a reason or done, the VM running (or suspended when saved), nothing half-written",
    );
}

// ---- a console client that vanishes in the middle of an update ----

#[test]
fn console_clients_that_vanish_mid_update_leave_the_console_serving() {
    use std::io::{Read, Write};
    let dir = Scratch::new("fault-console");
    let mut rng = Rng::for_cell("console-vanish");
    let socket = dir.path("vnc.sock");
    let serial = dir.path("serial.log");
    // An animation: every update request is answered with fresh, changing pixels.
    let vm = porthole_tests::vnc_vm("fb-anim", &socket, &serial, &[], "PORTHOLE-FB-ANIM-START");
    let mut tally = Tally::default();
    for i in 0..iterations() {
        let mut client = porthole_tests::rfb::RfbClient::connect(&socket, None)
            .unwrap_or_else(|e| panic!("iteration {i}: the handshake: {e}"));
        // Raw only: the biggest updates, so the client goes away with most of one unread.
        client.set_encodings(&[0]).unwrap();
        client.request(false).unwrap();
        let mut raw = client.input().unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Read a random part of the update (its header, a few rows, most of it), then vanish: sometimes
        // having asked for more, sometimes with the socket shut down in both directions at once.
        let want = rng.next() % (800 * 600 * 4);
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        while got < want {
            match raw.read(&mut buf[..(want - got).min(64 << 10) as usize]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        match rng.next() % 3 {
            0 => {
                let _ = raw.write_all(&[3, 1, 0, 0, 0, 0, 0x03, 0x20, 0x02, 0x58]); // another request
            }
            1 => {
                let _ = raw.shutdown(std::net::Shutdown::Both);
            }
            _ => {}
        }
        drop(raw);
        drop(client);
        tally.during += 1;
        tally.runs += 1;
    }
    // The console still serves a whole frame, the guest still runs, the VMM is alive.
    let mut client = porthole_tests::rfb::RfbClient::connect(&socket, None).expect("a client after the others");
    client.full_frame().expect("a whole frame");
    let frames = |s: &str| s.lines().filter(|l| l.starts_with("PORTHOLE-FB-FRAME")).count();
    let before = frames(&std::fs::read_to_string(&serial).unwrap_or_default());
    wait_until(
        LIMIT,
        || frames(&std::fs::read_to_string(&serial).unwrap_or_default()) > before,
        || "the guest stopped drawing".into(),
    );
    drop(client);
    drop(vm);
    // (This test's own engine was ended with SIGKILL, which leaves its socket: not part of the fault.)
    let _ = std::fs::remove_file(&socket);
    assert_nothing_leaked(dir.dir(), "console-vanish");
    tally.report(
        "console clients vanishing mid-update (raw encoding)",
        "the console serves the next client a whole frame, the guest runs on",
    );
}

// ---- the user-mode network's passt dying ----

/// The child processes of `pid` (every thread's).
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        found.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    found
}

fn exe_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_passt_dies_runs_on_and_its_card_gets_a_new_one() {
    if Command::new("passt").arg("--version").output().is_err() {
        println!("SKIPPED: passt is not installed");
        return;
    }
    let dir = Scratch::new("fault-passt");
    let mut rng = Rng::for_cell("passt-dies");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let req = CreateVm { boot: Some(idle_kernel()), disk_gib: 0, ..CreateVm::new("netted", 1, 64) };
    let vm = c.create_vm(&req).await.unwrap();
    let mut tally = Tally::default();
    // From the kill to the card working on its new passt.
    let mut repaired = Vec::new();
    for i in 0..iterations() {
        c.action(&vm.id, Action::Start).await.unwrap();
        let pid: u32 =
            std::fs::read_to_string(d.run.join("vms").join(&vm.id).join("pid")).unwrap().trim().parse().unwrap();
        let passt: Vec<u32> = children_of(pid).into_iter().filter(|p| exe_name(*p).starts_with("passt")).collect();
        assert_eq!(passt.len(), 1, "iteration {i}: the engine's passt: {:?}", children_of(pid));
        tokio::time::sleep(rng.upto(Duration::from_millis(1500))).await;
        kill9(passt[0]);
        // The engine notices (its card's back end ends) and the guest runs on; the daemon gives the card a
        // new passt, which opens the VM's forward again.
        // (The definition's: another program, such as a test beside this one, may have taken the port it had
        // when the VM last started.)
        let port = c.vm(&vm.id).await.unwrap().nics[0].forwards[0].host_port;
        let t0 = Instant::now();
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            let got = c.vm(&vm.id).await.unwrap();
            assert_eq!(got.state, VmState::Running, "iteration {i}: {got:?}");
            let fresh = children_of(d.pid()).into_iter().any(|p| exe_name(p).starts_with("passt"));
            if let Some(s) = got.nic_status.first().filter(|s| s.attached && s.error.is_none() && fresh)
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
            {
                break s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "iteration {i}: the card got no new passt (daemon has a passt child: {fresh}): {got:?}\n\
                 daemon log:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        repaired.push(t0.elapsed());
        assert_eq!(status.forwards.iter().map(|f| f.host_port).collect::<Vec<_>>(), [port], "iteration {i}");
        // (The engine cannot reap it under its seccomp filters: a zombie until the VM ends.)
        assert!(ended(passt[0]), "iteration {i}: the old passt is gone");
        c.action(&vm.id, Action::Poweroff).await.unwrap();
        wait_state(&c, &vm.id, VmState::Stopped, LIMIT).await;
        tally.during += 1;
        tally.runs += 1;
    }
    drop(c);
    drop(d);
    assert_nothing_leaked(dir.dir(), "passt-dies");
    print_times("passt-dies: the card worked again", "after the kill", &mut repaired);
    tally.report(
        "kill -9 of a VM's passt (user-mode network)",
        "the VM runs on, the daemon gives its card a new passt (its forward open again), power-off clean",
    );
}

// ---- a VM's TAP device deleted under it ----

/// A bridged VM whose TAP device is deleted (`ip link del`) at a random moment while the host sends it
/// broadcasts: the VM runs on, its card says its back end failed, and the daemon gives the card a new TAP
/// device on the same bridge, through which the broadcasts reach the card again; the device goes with the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_tap_device_is_deleted_runs_on_and_its_card_gets_a_new_one() {
    let Some(bridge) = porthole_tests::TestBridge::create_or_skip("10.213.79.1/24") else { return };
    let dir = Scratch::new("fault-tap");
    let mut rng = Rng::for_cell("tap-deleted");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let nics = vec![porthole_api::NicSpec::new(porthole_api::NicBackend::Bridge { bridge: bridge.name().into() })];
    let mut boot = kernel("virtio-net");
    boot.cmdline = "ip=10.213.79.2,10.213.79.1 arp hang".into();
    let req = CreateVm { boot: Some(boot), disk_gib: 0, nics: Some(nics), ..CreateVm::new("bridged", 1, 64) };
    let vm = c.create_vm(&req).await.unwrap();
    // Broadcasts on the bridge every 5 ms, for the whole cell.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let socket = std::net::UdpSocket::bind("10.213.79.1:0").unwrap();
        socket.set_broadcast(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = socket.send_to(&[0x5a; 200], "10.213.79.255:9");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let received = |s: &porthole_api::NicStatus| s.rx_frames + s.rx_dropped;
    let brif = |tap: &str| Path::new("/sys/class/net").join(bridge.name()).join("brif").join(tap);
    let mut tally = Tally::default();
    let mut repaired = Vec::new();
    for i in 0..iterations() {
        c.action(&vm.id, Action::Start).await.unwrap();
        let deadline = Instant::now() + LIMIT;
        let tap = loop {
            let got = c.vm(&vm.id).await.unwrap();
            if let Some(tap) =
                got.nic_status.first().filter(|s| s.attached && s.error.is_none()).and_then(|s| s.tap.clone())
            {
                break tap;
            }
            assert!(Instant::now() < deadline, "iteration {i}: the card never came up: {got:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let ifindex = |tap: &str| std::fs::read_to_string(format!("/sys/class/net/{tap}/ifindex")).unwrap_or_default();
        let old_index = ifindex(&tap);
        tokio::time::sleep(rng.upto(Duration::from_millis(1500))).await;
        let out = Command::new("ip").args(["link", "del", &tap]).output().unwrap();
        assert!(out.status.success(), "iteration {i}: ip link del {tap}: {}", text(&out.stderr));
        let t0 = Instant::now();
        let deadline = Instant::now() + LIMIT;
        // Repaired: a new device (another interface index; the kernel may reuse the name) on the bridge, and
        // broadcasts arriving through it.
        let mut since_repair: Option<u64> = None;
        let status = loop {
            let got = c.vm(&vm.id).await.unwrap();
            assert_eq!(got.state, VmState::Running, "iteration {i}: {got:?}");
            let s = got.nic_status.first().cloned().expect("the card");
            let new_device = s.tap.as_deref().is_some_and(|t| brif(t).exists() && ifindex(t) != old_index);
            if s.error.is_none() && new_device {
                match since_repair {
                    Some(n) if received(&s) > n => break s,
                    Some(_) => {}
                    None => since_repair = Some(received(&s)),
                }
            } else {
                since_repair = None;
            }
            assert!(Instant::now() < deadline, "iteration {i}: the card got no new TAP device: {got:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        repaired.push(t0.elapsed());
        assert!(status.attached, "iteration {i}: {status:?}");
        c.action(&vm.id, Action::Poweroff).await.unwrap();
        wait_state(&c, &vm.id, VmState::Stopped, LIMIT).await;
        let new_tap = status.tap.unwrap();
        let gone = Instant::now() + LIMIT;
        while Path::new("/sys/class/net").join(&new_tap).exists() {
            assert!(Instant::now() < gone, "iteration {i}: TAP device {new_tap} stayed after the VM stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tally.during += 1;
        tally.runs += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sender.join();
    drop(c);
    drop(d);
    assert_nothing_leaked(dir.dir(), "tap-deleted");
    print_times("tap-deleted: the card received again", "after the deletion", &mut repaired);
    tally.report(
        "deletion of a bridged VM's TAP device (ip link del) under broadcast traffic",
        "the VM runs on, the daemon gives its card a new TAP device on the bridge (broadcasts arrive again), \
         the device goes with the VM",
    );
}

// ---- kill -9 of a VMM while it saves its state (suspend to disk) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_killed_while_saving_its_state_is_suspended_whole_or_crashed_without_a_state() {
    let dir = Scratch::new("fault-vmm-save");
    let mut rng = Rng::for_cell("vmm-kill-save");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&ticker_vm("saver")).await.unwrap();
    let state_file = d.data.join("vms").join(&vm.id).join("suspend.state");
    let pid_of = || -> u32 {
        std::fs::read_to_string(d.run.join("vms").join(&vm.id).join("pid")).unwrap().trim().parse().unwrap()
    };
    // How long a suspend takes, unfaulted.
    c.action(&vm.id, Action::Start).await.unwrap();
    let began = Instant::now();
    c.action(&vm.id, Action::Suspend).await.unwrap();
    let whole = began.elapsed();
    c.action(&vm.id, Action::Start).await.unwrap();
    let mut tally = Tally::default();
    for i in 0..iterations() {
        if c.vm(&vm.id).await.unwrap().state != VmState::Running {
            c.action(&vm.id, Action::Start).await.unwrap();
        }
        let pid = pid_of();
        let c2 = d.local();
        let id = vm.id.clone();
        let call = tokio::spawn(async move { c2.action(&id, Action::Suspend).await });
        tokio::time::sleep(rng.upto(whole.mul_f32(1.3))).await;
        kill9(pid);
        let answered = call.await.unwrap().is_ok();
        let settled = {
            let deadline = Instant::now() + LIMIT;
            loop {
                let s = c.vm(&vm.id).await.unwrap().state;
                if matches!(s, VmState::Suspended | VmState::Crashed | VmState::Stopped) {
                    break s;
                }
                assert!(Instant::now() < deadline, "iteration {i}: the VM stays {s:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        assert!(
            !answered || settled == VmState::Suspended,
            "iteration {i}: the suspend was answered, the VM is {settled:?}"
        );
        match settled {
            VmState::Suspended => {
                assert!(state_file.exists(), "iteration {i}: suspended without its state");
                // The saved state is whole: the guest goes on counting from it.
                c.action(&vm.id, Action::Start).await.unwrap();
                assert_eq!(c.vm(&vm.id).await.unwrap().state, VmState::Running);
                tally.after += 1;
            }
            _ => {
                assert!(!state_file.exists(), "iteration {i}: {settled:?} with a state file left");
                tally.during += 1;
            }
        }
        let temps = temp_files(&d.data);
        assert!(temps.is_empty(), "iteration {i}: {temps:?}");
        tally.runs += 1;
    }
    let _ = c.action(&vm.id, Action::Poweroff).await;
    drop(c);
    drop(d);
    assert_nothing_leaked(dir.dir(), "vmm-kill-save");
    tally.report(
        "kill -9 of a VMM while it saves its state (suspend)",
        "suspended with a whole state that resumes, or crashed with no state file and no temp file",
    );
}

// ---- a client (the window) that vanishes in the middle of an upload ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_upload_leaves_no_partial_image() {
    use std::io::Write;
    let dir = Scratch::new("fault-client-upload");
    let mut rng = Rng::for_cell("client-vanish-upload");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let total: u64 = 4 << 20;
    let mut tally = Tally::default();
    for i in 0..iterations() {
        // What a window killed mid-upload leaves: a request whose body stops anywhere, then a closed socket.
        let name = format!("gone{i:03}.iso");
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        let head = format!(
            "PUT /api/v1/images/{name} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {total}\r\nx-porthole-sha256: {}\r\n\r\n",
            "0".repeat(64)
        );
        s.write_all(head.as_bytes()).unwrap();
        let send = rng.next() % total;
        let chunk = vec![0x42u8; 64 << 10];
        let mut sent = 0;
        while sent < send {
            let n = (send - sent).min(chunk.len() as u64) as usize;
            if s.write_all(&chunk[..n]).is_err() {
                break;
            }
            sent += n as u64;
        }
        drop(s);
        // The daemon notices, fails the upload's task and removes the partial file.
        wait_until(
            LIMIT,
            || temp_files(&d.data).is_empty(),
            || format!("iteration {i}: partial files left: {:?}", temp_files(&d.data)),
        );
        // Its task (when the request got that far) ends failed, saying why.
        let deadline = Instant::now() + LIMIT;
        loop {
            let tasks = c.tasks().await.unwrap();
            match tasks.iter().find(|t| t.what.contains(&name)) {
                Some(t) if t.state == porthole_api::TaskState::Running => {
                    assert!(Instant::now() < deadline, "iteration {i}: the upload's task never ended: {t:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(t) => {
                    assert_eq!(t.state, porthole_api::TaskState::Failed, "iteration {i}: {t:?}");
                    assert!(t.error.as_deref().is_some_and(|e| !e.is_empty()), "iteration {i}: {t:?}");
                    break;
                }
                None => break,
            }
        }
        assert!(
            c.images().await.unwrap().iter().all(|im| im.name != name),
            "iteration {i}: a partial image in the library"
        );
        tally.during += 1;
        tally.runs += 1;
    }
    assert!(c.host().await.unwrap().problems.is_empty());
    let failed = c.tasks().await.unwrap().iter().filter(|t| t.what.contains("gone")).count();
    println!("FAULT-UPLOAD-TASKS {failed} of {} uploads got as far as a task (failed, each)", tally.runs);
    // The last request's handler may start after its iteration looked (its partial file then comes and
    // goes later): before the daemon stops, no partial file for a whole second.
    let (mut empty_since, deadline) = (Instant::now(), Instant::now() + LIMIT);
    while empty_since.elapsed() < Duration::from_secs(1) {
        if !temp_files(&d.data).is_empty() {
            empty_since = Instant::now();
        }
        assert!(Instant::now() < deadline, "partial files left: {:?}", temp_files(&d.data));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    drop(d);
    assert_nothing_leaked(dir.dir(), "client-vanish-upload");
    tally.report("a client (the window) vanishing mid-upload", "no partial file, no image, the daemon serves on");
}

#[test]
fn guest_writes_to_a_full_disk_fail_with_an_error_and_keep_what_was_flushed() {
    let dir = Scratch::new("fault-full-writes");
    let Some(fs) = SmallFilesystem::mount_or_skip(&dir.path("small"), 4) else { return };
    let mut rng = Rng::for_cell("disk-full-writes");
    let (commands, writes) = write_commands();
    let guest = porthole_guests::path("virtio-blk");
    let mut tally = Tally::default();
    let (mut failed_writes, mut ok_writes) = (0, 0);
    for i in 0..iterations() {
        let image = dir.path("small/disk.raw");
        let _ = std::fs::remove_file(&image);
        std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap(); // sparse: blocks come with writes
        // Room for none, some or all of the 24 writes (4 KiB each).
        fs.leave_free(rng.next() % (120 << 10));
        let serial = dir.path("serial.log");
        let _ = std::fs::remove_file(&serial); // (a serial file is appended to)
        let out = porthole_tests::run(
            Command::new(workspace_bin("porthole-vmm"))
                .arg("--kernel")
                .arg(&guest)
                .args(["--memory", "64", "--cmdline", &commands, "--disk", &format!("{},format=raw", image.display())])
                .arg("--serial")
                .arg(format!("file:{}", serial.display())),
            LIMIT,
        );
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        assert!(
            out.status.success(),
            "iteration {i}: the VMM did not survive a full disk: {}\n{log}",
            text(&out.stderr)
        );
        assert!(log.contains("BLK done"), "iteration {i}: the guest did not finish\n{log}");
        let statuses: Vec<&str> =
            log.lines().filter(|l| l.starts_with("BLK write ")).filter_map(|l| l.rsplit("status=").next()).collect();
        assert!(statuses.iter().all(|s| *s == "0" || *s == "1"), "iteration {i}: writes ok or IOERR: {statuses:?}");
        failed_writes += statuses.iter().filter(|s| **s == "1").count();
        ok_writes += statuses.iter().filter(|s| **s == "0").count();
        let bytes = std::fs::read(&image).unwrap();
        for (sector, count, seed) in flushed_writes(&log, &writes) {
            for s in sector..sector + count {
                let at = (s * 512) as usize;
                let want: Vec<u8> = (0..512u64).map(|j| ((s * 7 + j + seed) & 0xFF) as u8).collect();
                assert!(bytes.get(at..at + 512) == Some(&want[..]), "iteration {i}: flushed sector {s} lost\n{log}");
            }
        }
        if statuses.contains(&"1") {
            tally.during += 1
        } else {
            tally.after += 1
        }
        tally.runs += 1;
    }
    drop(fs);
    assert_nothing_leaked(dir.dir(), "disk-full-writes");
    println!("FAULT-FULL-WRITES ok={ok_writes} ioerr={failed_writes}");
    tally.report(
        "disk full (tmpfs) under a raw disk the guest writes and flushes",
        "failed writes reach the guest as IOERR, the VMM runs on, flushed writes present",
    );
}

// ---- the host's clock jumping ----

/// libfaketime (Debian's `faketime`): the daemon's wall clock offset at run time through a file, as NTP or an
/// administrator setting the clock would move it. Its monotonic clock is left alone (a real jump leaves it).
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_stops_no_sample_request_or_vm() {
    if !Path::new(FAKETIME_LIB).exists() {
        println!("SKIPPED: libfaketime is not installed (apt-get install faketime)");
        return;
    }
    let dir = Scratch::new("fault-clock");
    let mut rng = Rng::for_cell("clock-jumps");
    let offset = dir.path("clock-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let env = [
        ("LD_PRELOAD", FAKETIME_LIB),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_CACHE_DURATION", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("DONT_FAKE_MONOTONIC", "1"),
        // The daemon alone: its engines and passts keep the real clock.
        ("FAKETIME_ONLY_CMDS", "portholed"),
    ];
    let d = Daemon::start_with_env(&dir, false, &[], &env);
    let c = d.local();
    let vm = c.create_vm(&ticker_vm("clocked")).await.unwrap();
    // The daemon's wall clock is the faked one: a task started a year ahead says so.
    std::fs::write(&offset, "+365d\n").unwrap();
    // (libfaketime reads the file again once its cache, counted in whole seconds, is a second old.)
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let take = porthole_api::TakeSnapshot { name: "ahead".into(), description: String::new(), with_state: None };
    let task = c.take_snapshot(&vm.id, &take).await.unwrap();
    let real_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(task.started_ms > real_ms + 300 * 86_400_000, "libfaketime moved the daemon's clock: {task:?}");
    std::fs::write(&offset, "+0\n").unwrap();
    let deadline = Instant::now() + LIMIT;
    while c.task(&task.id).await.unwrap().state == porthole_api::TaskState::Running {
        assert!(Instant::now() < deadline, "the snapshot never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    c.action(&vm.id, Action::Start).await.unwrap();
    let mut since = 0;
    let mut tally = Tally::default();
    for i in 0..iterations() {
        tokio::time::sleep(rng.upto(Duration::from_millis(1500))).await;
        // Up to a day either way from the real time (so the jump from the last offset is up to two days).
        let seconds = 60 + rng.next() % 86_400;
        let jump = if rng.next().is_multiple_of(2) { format!("-{seconds}") } else { format!("+{seconds}") };
        std::fs::write(&offset, format!("{jump}\n")).unwrap();
        // Afterwards: the VM runs, requests answer, and samples keep coming, each later than the one before.
        let deadline = Instant::now() + LIMIT;
        loop {
            let samples = c.stats(&vm.id, since, false).await.unwrap().samples;
            assert!(samples.iter().all(|s| s.t_ms > since), "iteration {i}: a sample not after {since}: {samples:?}");
            assert!(samples.windows(2).all(|w| w[0].t_ms < w[1].t_ms), "iteration {i}: samples out of order");
            if samples.len() >= 3 {
                since = samples[samples.len() - 1].t_ms;
                break;
            }
            assert!(Instant::now() < deadline, "iteration {i}: no new samples since the clock moved {jump} s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(c.action(&vm.id, Action::Pause).await.unwrap().state, VmState::Paused, "iteration {i}");
        assert_eq!(c.action(&vm.id, Action::Resume).await.unwrap().state, VmState::Running, "iteration {i}");
        assert_eq!(c.list_vms().await.unwrap().len(), 1, "iteration {i}");
        tally.during += 1;
        tally.runs += 1;
    }
    c.action(&vm.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &vm.id, VmState::Stopped, LIMIT).await;
    drop(c);
    drop(d);
    assert_nothing_leaked(dir.dir(), "clock-jumps");
    tally.report(
        "the daemon's wall clock jumping up to a day either way (libfaketime)",
        "the VM runs on, pause/resume and the list answer, new samples within seconds, each later than the last",
    );
}

// ---- kill -9 of the window ----

/// Every process below `pid` (children, theirs, …).
fn descendants_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for child in children_of(p) {
            found.push(child);
            stack.push(child);
        }
    }
    found
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet: it holds nothing).
fn ended(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_window_leaves_no_helper_or_tunnel_and_its_settings_whole() {
    let Some(lv) = porthole_tests::libvirt::Libvirt::start_or_skip("fault: kill -9 of the window") else { return };
    let dir = Scratch::new("fault-window");
    let mut rng = Rng::for_cell("window-kill");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.create_vm(&ticker_vm("beside")).await.unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    // The window's settings: two libvirt hosts, one local (a helper) and one over SSH (a helper and its ssh).
    let settings = dir.path("config/porthole/settings.json");
    std::fs::create_dir_all(settings.parent().unwrap()).unwrap();
    let remotes = serde_json::json!({"remotes": [
        {"name": "near", "kind": "libvirt", "address": lv.local_uri()},
        {"name": "far", "kind": "libvirt", "address": lv.ssh_uri(&lv.client_key, Some(&lv.ssh_wrapper))},
    ]});
    std::fs::write(&settings, remotes.to_string()).unwrap();
    let x = porthole_tests::Xvfb::start(1024, 768);
    let mut tally = Tally::default();
    for i in 0..iterations() {
        let mut window = porthole_tests::start_window(&x, &dir, &d.socket());
        // Both helpers up, the SSH one with its ssh below it.
        let deadline = Instant::now() + LIMIT;
        let below = loop {
            let below = descendants_of(window.id());
            let helpers = below.iter().filter(|p| exe_name(**p).starts_with("porthole-libvir")).count();
            if helpers == 2 && below.iter().any(|p| exe_name(*p) == "ssh") {
                break below;
            }
            assert!(Instant::now() < deadline, "iteration {i}: the window's helpers never started: {below:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::time::sleep(rng.upto(Duration::from_millis(1500))).await;
        let below: Vec<u32> = below.into_iter().chain(descendants_of(window.id())).collect();
        kill9(window.id());
        let _ = window.wait();
        // What the window started ends with it: its helpers see their broker socket close, ssh its pipes.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !below.iter().all(|p| ended(*p)) {
            let left: Vec<_> = below.iter().filter(|p| !ended(**p)).map(|p| (*p, exe_name(*p))).collect();
            assert!(Instant::now() < deadline, "iteration {i}: outlived the window: {left:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its settings are whole, the daemon and its VM untouched.
        let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap())
            .unwrap_or_else(|e| panic!("iteration {i}: settings.json is not whole: {e}"));
        assert_eq!(saved["remotes"].as_array().map(Vec::len), Some(2), "iteration {i}: {saved}");
        assert_eq!(c.vm(&vm.id).await.unwrap().state, VmState::Running, "iteration {i}");
        tally.during += 1;
        tally.runs += 1;
    }
    c.action(&vm.id, Action::Poweroff).await.unwrap();
    wait_state(&c, &vm.id, VmState::Stopped, LIMIT).await;
    drop(c);
    drop(d);
    assert_nothing_leaked(dir.dir(), "window-kill");
    tally.report(
        "kill -9 of the window (two libvirt hosts: a local helper, and one over SSH with its ssh)",
        "its helpers and ssh end with it, settings.json whole, the daemon and its VM untouched",
    );
}

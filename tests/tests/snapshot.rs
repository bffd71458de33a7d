//! Machine-state files on the real VMM: the `counter` micro-guest (tests/guests/asm/counter.S) counts on
//! its serial port and its text screen; it is saved with the control socket's `save-state` (then resumed,
//! or stopped: suspended) and started again with `porthole-vmm --restore`, which must continue the count
//! exactly where it was, with the saved screen. Damaged, foreign-version and mismatched states are refused
//! before the guest runs; a VM with a device whose state is not saved yet refuses to save and runs on. The
//! virtio-blk micro-guest is saved in the middle of its I/O and finishes it after the restore.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use porthole_tests::rfb::{RAW, RfbClient};
use porthole_tests::{Scratch, run, screen_text, text, wait, wait_until, workspace_bin};
use vmm_core::control::{ControlClient, Request, Response};
use vmm_core::vm::Then;

const LIMIT: Duration = Duration::from_secs(120);

/// A counter VM with its serial log, control socket, console and exit file in a scratch folder.
struct CounterVm {
    child: Option<Child>,
    serial: PathBuf,
    control: PathBuf,
    vnc: PathBuf,
    exit_file: PathBuf,
}

impl CounterVm {
    /// Starts `porthole-vmm` on the counter guest; `tag` names its files in `dir`.
    fn start(dir: &Scratch, tag: &str, extra: &[&str]) -> CounterVm {
        let serial = dir.path(&format!("{tag}.log"));
        let control = dir.path(&format!("{tag}.ctl"));
        let vnc = dir.path(&format!("{tag}.vnc"));
        let exit_file = dir.path(&format!("{tag}.exit"));
        let child = Command::new(workspace_bin("porthole-vmm"))
            .arg("--kernel")
            .arg(porthole_guests::path("counter"))
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--control")
            .arg(format!("unix:{}", control.display()))
            .arg("--vnc")
            .arg(format!("unix:{}", vnc.display()))
            .arg("--exit-file")
            .arg(&exit_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        CounterVm { child: Some(child), serial, control, vnc, exit_file }
    }

    fn output(&self) -> String {
        text(&std::fs::read(&self.serial).unwrap_or_default())
    }

    /// Waits until the serial log shows a count of at least `n`; returns the last count.
    fn wait_count(&mut self, n: u64) -> u64 {
        let start = Instant::now();
        loop {
            let log = self.output();
            let last = counts(&log).last().copied().unwrap_or(0);
            if last >= n {
                return last;
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().unwrap()
            {
                panic!("porthole-vmm ended ({status}) before count {n}; serial ends:\n{}", tail(&log));
            }
            assert!(start.elapsed() < LIMIT, "waiting for count {n}; serial ends:\n{}", tail(&log));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn request(&self, request: &Request) -> Result<Response, String> {
        wait_until(LIMIT, || self.control.exists(), || "no control socket".into());
        let mut c = ControlClient::connect(&self.control).map_err(|e| e.to_string())?;
        c.request(request).map_err(|e| e.to_string())
    }

    fn save(&self, path: &Path, then: Then) -> Result<Response, String> {
        self.request(&Request::SaveState { path: path.to_owned(), then })
    }

    /// The text screen, as an RFB client sees it.
    fn screen(&self) -> Vec<String> {
        wait_until(LIMIT, || self.vnc.exists(), || "no console socket".into());
        let mut c = RfbClient::connect(&self.vnc, None).unwrap();
        c.set_encodings(&[RAW]).unwrap();
        c.full_frame().unwrap();
        screen_text(&c.pixels, c.width, c.height)
    }

    /// Waits for the process to end; returns its output.
    fn end(&mut self) -> Output {
        wait(self.child.take().unwrap(), LIMIT)
    }
}

impl Drop for CounterVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The numbers of the complete `PORTHOLE-COUNT n` lines, in order.
fn counts(log: &str) -> Vec<u64> {
    log.lines().filter_map(|l| l.strip_prefix("PORTHOLE-COUNT ")?.trim().parse().ok()).collect()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Asserts `numbers` is 1, 2, 3, … with none missing or repeated.
fn assert_consecutive(numbers: &[u64], what: &str) {
    for (i, &n) in numbers.iter().enumerate() {
        assert_eq!(n, i as u64 + 1, "{what}: count {} follows {:?}", n, &numbers[i.saturating_sub(3)..i]);
    }
}

/// The count on the screen's row 0 (ten digits) and whether row 1 shows the banner.
fn screen_count(screen: &[String]) -> (Option<u64>, bool) {
    let count = screen.first().and_then(|row| row.get(..10)).and_then(|d| d.parse().ok());
    (count, screen.get(1).is_some_and(|row| row.starts_with("PORTHOLE COUNTER")))
}

#[test]
fn a_saved_counter_resumes_then_suspends_and_a_restored_one_continues_the_count_and_the_screen() {
    let dir = Scratch::new("state-counter");
    let mut vm = CounterVm::start(&dir, "first", &["--memory", "64"]);
    vm.wait_count(5);
    let (count, banner) = screen_count(&vm.screen());
    assert!(banner && count.is_some_and(|c| c >= 1), "the guest draws its count: {:?}", vm.screen());

    // Save and resume: the guest keeps counting.
    let snapshot = dir.path("running.state");
    let before = counts(&vm.output()).last().copied().unwrap();
    let reply = vm.save(&snapshot, Then::Resume).unwrap();
    let at_save = counts(&vm.output()).last().copied().unwrap();
    assert_eq!(reply.state_bytes, Some(std::fs::metadata(&snapshot).unwrap().len()), "the reply gives the size");
    assert!(reply.paused_ms.is_some());
    assert!(!dir.dir().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp-")));
    vm.wait_count(at_save + 5);
    assert!(at_save >= before);

    // Save and stop: the process ends as suspended.
    let suspended = dir.path("suspended.state");
    vm.save(&suspended, Then::Stop).unwrap();
    let out = vm.end();
    assert_eq!(out.status.code(), Some(5), "suspended; stderr: {}", text(&out.stderr));
    let record = std::fs::read_to_string(&vm.exit_file).unwrap();
    assert!(record.contains("\"exit_code\":5") && record.contains("suspended"), "{record}");
    let first_log = vm.output();
    let saved = counts(&first_log).last().copied().unwrap();
    assert_consecutive(&counts(&first_log), "before the save");

    // Restore: the count goes on from the saved one, and the screen is the saved one (the banner is drawn
    // only at boot).
    let mut restored =
        CounterVm::start(&dir, "restored", &["--memory", "64", "--restore", suspended.to_str().unwrap()]);
    // The first screen that is not blank (the console may not have drawn before the first frame).
    let mut first_screen = Vec::new();
    wait_until(
        LIMIT,
        || {
            first_screen = restored.screen();
            first_screen.iter().any(|row| !row.trim().is_empty())
        },
        || "the restored console stays blank".into(),
    );
    let (on_screen, banner) = screen_count(&first_screen);
    assert!(banner, "the restored screen shows what the guest drew at boot:\n{}", first_screen.join("\n"));
    let on_screen = on_screen.unwrap_or_else(|| panic!("no count on the screen:\n{}", first_screen.join("\n")));
    assert!(on_screen >= saved, "the screen continues from {saved}, not from 0: {on_screen}");
    restored.wait_count(saved + 5);
    let second_log = restored.output();
    assert!(!second_log.contains("PORTHOLE-COUNTER-START"), "the restored guest did not boot again");
    // The two logs are one count: the first number after the restore is the saved one + 1 (a line the
    // guest was printing at the pause point is finished by the restored process).
    let joined = format!("{first_log}{second_log}");
    assert_consecutive(&counts(&joined), "across the save and restore");
    let first_after = counts(&second_log)[0];
    assert!(first_after == saved + 1 || first_after == saved + 2, "{saved} then {first_after}");

    // The snapshot taken while running restores too, and continues from its own count.
    let mut again = CounterVm::start(&dir, "again", &["--memory", "64", "--restore", snapshot.to_str().unwrap()]);
    again.wait_count(1);
    let log = again.output();
    assert!(!log.contains("PORTHOLE-COUNTER-START"));
    let first = counts(&log)[0];
    assert!(
        (before..=at_save + 1).contains(&first) || first == before + 1,
        "the running snapshot continues from its count (between {before} and {at_save}): {first}"
    );
}

/// Saves a 64 MiB, one-vCPU counter and returns the state file's path.
fn saved_state(dir: &Scratch) -> PathBuf {
    let mut vm = CounterVm::start(dir, "source", &["--memory", "64"]);
    vm.wait_count(3);
    let path = dir.path("good.state");
    vm.save(&path, Then::Stop).unwrap();
    assert_eq!(vm.end().status.code(), Some(5));
    path
}

/// Runs `porthole-vmm --restore` on `state` with `extra` options; it must exit 1, with `message` in its
/// error, before the guest printed anything.
fn assert_refused(dir: &Scratch, state: &Path, extra: &[&str], message: &str) {
    let serial = dir.path("refused.log");
    let _ = std::fs::remove_file(&serial);
    let out = run(
        Command::new(workspace_bin("porthole-vmm"))
            .arg("--kernel")
            .arg(porthole_guests::path("counter"))
            .args(if extra.contains(&"--memory") { &[][..] } else { &["--memory", "64"][..] })
            .args(extra)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--restore")
            .arg(state),
        LIMIT,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{extra:?}: refused; stderr: {err}");
    assert!(err.contains(message), "{extra:?}: expected {message:?} in: {err}");
    assert!(text(&std::fs::read(&serial).unwrap_or_default()).is_empty(), "the guest never ran");
}

#[test]
fn damaged_foreign_and_mismatched_states_are_refused_before_the_guest_runs() {
    let dir = Scratch::new("state-refused");
    let good = saved_state(&dir);
    let data = std::fs::read(&good).unwrap();

    // A byte flipped inside the first section (vcpu0, right after the header): its checksum.
    let header = 16 + u32::from_le_bytes(data[12..16].try_into().unwrap()) as usize + 4;
    let mut bad = data.clone();
    bad[header + 100] ^= 0x01;
    let damaged = dir.path("damaged.state");
    std::fs::write(&damaged, &bad).unwrap();
    assert_refused(&dir, &damaged, &[], "damaged: section vcpu0 checksum");

    // A byte flipped in the last quarter (memory): named as well.
    let mut bad = data.clone();
    let at = data.len() * 3 / 4;
    bad[at] ^= 0x80;
    std::fs::write(&damaged, &bad).unwrap();
    assert_refused(&dir, &damaged, &[], "damaged: section");

    // Another format version.
    let mut bad = data.clone();
    bad[8..12].copy_from_slice(&99u32.to_le_bytes());
    let foreign = dir.path("foreign.state");
    std::fs::write(&foreign, &bad).unwrap();
    assert_refused(&dir, &foreign, &[], "made by another version: state format 99");

    // Cut short.
    let cut = dir.path("cut.state");
    std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
    assert_refused(&dir, &cut, &[], "truncated");

    // Another machine: a state for one vCPU into two, another memory size.
    assert_refused(&dir, &good, &["--cpus", "2"], "the state is for a VM with 1 vCPU, this one has 2");
    assert_refused(
        &dir,
        &good,
        &["--memory", "128"],
        "the state is for a VM with 64 MiB of memory, this one has 128 MiB",
    );

    // Not a state file at all.
    let other = dir.path("other.state");
    std::fs::write(&other, b"hello, world").unwrap();
    assert_refused(&dir, &other, &[], "not a Porthole machine-state file");
}

#[test]
fn a_state_for_two_vcpus_is_refused_by_one() {
    let dir = Scratch::new("state-smp");
    let mut vm = CounterVm::start(&dir, "two", &["--memory", "64", "--cpus", "2"]);
    vm.wait_count(3);
    let path = dir.path("two.state");
    vm.save(&path, Then::Stop).unwrap();
    assert_eq!(vm.end().status.code(), Some(5));
    assert_refused(&dir, &path, &["--cpus", "1"], "the state is for a VM with 2 vCPUs, this one has 1");
    // And two restore it: the count goes on.
    let mut back =
        CounterVm::start(&dir, "back", &["--memory", "64", "--cpus", "2", "--restore", path.to_str().unwrap()]);
    back.wait_count(5);
    assert!(!back.output().contains("PORTHOLE-COUNTER-START"));
}

#[test]
fn a_vm_with_a_cd_drive_refuses_to_save_and_runs_on() {
    let dir = Scratch::new("state-cd");
    let mut vm = CounterVm::start(&dir, "cd", &["--memory", "64", "--cdrom"]);
    let before = vm.wait_count(3);
    let path = dir.path("cd.state");
    let err = vm.save(&path, Then::Stop).unwrap_err();
    assert!(err.contains("cdrom0") && err.contains("not saved yet"), "{err}");
    assert!(!path.exists(), "no partial state is left");
    assert!(!dir.dir().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp-")));
    vm.wait_count(before + 3);
    let status = vm.request(&Request::Status).unwrap().status.unwrap();
    assert_eq!(status.state, vmm_core::vm::RunState::Running);
}

/// FNV-1a (32-bit) of what virtio-blk.S writes with `write=S,N,SEED` (byte j of sector s is
/// (s*7 + j + SEED) & 0xFF), as its `read` line reports it.
fn written_sum(sector: u64, count: u64, seed: u64) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for s in sector..sector + count {
        for j in 0..512 {
            h ^= ((s * 7 + j + seed) & 0xFF) as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    format!("{h:08x}")
}

/// The virtio-blk micro-guest is saved in the middle of a run of 1 MiB reads (its queue has requests
/// posted and completed, next_avail/next_used far from 0) and restored: the run ends without an error and
/// the disk then writes and reads back what the guest expects, so the queue state (and the driver's view
/// of it, in guest memory) survived; the restored guest did not start over.
#[test]
fn a_disk_s_queue_survives_a_save_and_restore() {
    let dir = Scratch::new("state-blk");
    let disk = dir.path("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let words = "bench-seq=5000 write=100,8,7 read=100,8";
    let guest = porthole_guests::path("virtio-blk");
    let start = |tag: &str, extra: &[&str]| {
        let serial = dir.path(&format!("{tag}.log"));
        let child = Command::new(workspace_bin("porthole-vmm"))
            .arg("--kernel")
            .arg(&guest)
            .args(["--memory", "64", "--cmdline", words, "--disk", disk.to_str().unwrap()])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, serial)
    };
    let control = dir.path("blk.ctl");
    let (child, serial) = start("first", &["--control", &format!("unix:{}", control.display())]);
    let log = || text(&std::fs::read(&serial).unwrap_or_default());
    wait_until(LIMIT, || log().contains("BLK bench-start"), || format!("no bench start:\n{}", log()));
    let state = dir.path("blk.state");
    let reply = ControlClient::connect(&control)
        .unwrap()
        .request(&Request::SaveState { path: state.clone(), then: Then::Stop })
        .unwrap();
    assert!(reply.state_bytes.is_some());
    let out = wait(child, LIMIT);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let first = log();
    assert!(!first.contains("BLK bench-end"), "the save came in the middle of the run:\n{first}");

    let (child, serial) = start("restored", &["--restore", state.to_str().unwrap()]);
    let out = wait(child, LIMIT);
    let second = text(&std::fs::read(&serial).unwrap());
    assert_eq!(out.status.code(), Some(0), "the guest finished and powered off: {}\n{second}", text(&out.stderr));
    assert!(!second.contains("BLK found"), "the restored guest did not start over:\n{second}");
    assert!(second.contains("BLK bench-end seq n=5000 errors=0"), "{second}");
    assert!(second.contains("BLK write disk=0 sector=100 count=8 status=0"), "{second}");
    let sum = written_sum(100, 8, 7);
    assert!(second.contains(&format!("BLK read disk=0 sector=100 count=8 status=0 sum={sum}")), "{second}");
    assert!(second.contains("BLK done"), "{second}");
}

/// Not a timing assertion: prints the save and restore times and file sizes for 256 MiB and 1 GiB guests,
/// idle and with 200 MiB written (see the final report of the snapshot work). The sizes are checked: an
/// idle guest's state holds only the pages it wrote.
#[test]
fn state_sizes_and_times() {
    let dir = Scratch::new("state-measure");
    for (mib, touch) in [(256, 0), (256, 200), (1024, 0), (1024, 200)] {
        let mut extra = vec!["--memory".to_owned(), mib.to_string()];
        if touch > 0 {
            extra.extend(["--cmdline".to_owned(), touch.to_string()]);
        }
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut vm = CounterVm::start(&dir, "measure", &args);
        vm.wait_count(2);
        if touch > 0 {
            assert!(vm.output().contains(&format!("PORTHOLE-TOUCHED {touch}")));
        }
        let path = dir.path("measure.state");
        let start = Instant::now();
        let reply = vm.save(&path, Then::Stop).unwrap();
        let save_wall = start.elapsed();
        assert_eq!(vm.end().status.code(), Some(5));
        let saved = counts(&vm.output()).last().copied().unwrap();
        let bytes = reply.state_bytes.unwrap();
        if touch == 0 {
            assert!(bytes < 4 << 20, "{mib} MiB idle: {bytes} bytes");
        } else {
            assert!(bytes > touch << 20 && bytes < (touch + 8) << 20, "{mib} MiB, {touch} MiB touched: {bytes}");
        }
        let _ = std::fs::remove_file(&vm.serial);
        let mut args = args.clone();
        let p = path.to_str().unwrap().to_owned();
        args.extend(["--restore", &p]);
        let start = Instant::now();
        let mut back = CounterVm::start(&dir, "measure-back", &args);
        back.wait_count(saved + 1);
        let restore_wall = start.elapsed();
        println!(
            "STATE {mib} MiB guest, {touch} MiB touched: file {:.2} MiB, guest paused {} ms (save request {} ms), \
             restore (process start to the next count on serial) {} ms",
            bytes as f64 / (1 << 20) as f64,
            reply.paused_ms.unwrap(),
            save_wall.as_millis(),
            restore_wall.as_millis()
        );
        drop(back);
        let _ = std::fs::remove_file(dir.path("measure-back.log"));
        let _ = std::fs::remove_file(&path);
    }
}

//! The engine on the real KVM: each test runs `porthole-vmm` in a child process with a micro-guest.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use porthole_tests::{Scratch, seccomp_modes, text, wait, wait_until};

use vmm_core::control::{ControlClient, Request};
use vmm_core::vm::RunState;

const VMM: &str = env!("CARGO_BIN_EXE_porthole-vmm");
const LIMIT: Duration = Duration::from_secs(60);

fn guest(name: &str) -> PathBuf {
    porthole_guests::path(name)
}

fn vmm(args: &[&str]) -> Command {
    let mut cmd = Command::new(VMM);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn run(args: &[&str]) -> Output {
    wait(vmm(args).spawn().unwrap(), LIMIT)
}

fn run_guest(name: &str, extra: &[&str]) -> Output {
    let kernel = guest(name);
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--memory", "64"];
    args.extend_from_slice(extra);
    run(&args)
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn hello_prints_its_marker_and_powers_off() {
    let out = run_guest("hello", &[]);
    assert_exit(&out, 0);
    assert_eq!(text(&out.stdout), "PORTHOLE-GUEST-OK\n");
}

/// The kernel formats beyond 64-bit PVH: an ELF32 PVH kernel, Multiboot 1 and Multiboot2 ELF32 kernels
/// (they check the magic in %eax and the memory map at %ebx), and a kernel whose first instruction is a
/// `call` (it needs the stack porthole-vmm starts PVH and Multiboot kernels with).
/// `--input virtio` adds two virtio-input devices to the PCI bus (1af4:1052, class 09 80: input, other),
/// the tablet and the keyboard, each in a slot of its own; `--tablet` (deprecated) means the same;
/// with `--input ps2` (the default) the guest sees the same devices as without them.
#[test]
fn the_tablet_and_the_keyboard_are_virtio_input_devices_on_the_pci_bus() {
    let devices = |extra: &[&str]| {
        let out = run_guest("pci-scan", extra);
        assert_exit(&out, 0);
        let serial = text(&out.stdout);
        assert!(serial.contains("PCI-SCAN-DONE"), "{serial}");
        serial.lines().filter(|l| l.starts_with("PCI slot=")).map(str::to_owned).collect::<Vec<_>>()
    };
    let without = devices(&[]);
    assert_eq!(devices(&["--input", "ps2"]), without);
    let with = devices(&["--input", "virtio"]);
    assert!(without.iter().all(|l| !l.contains("id=1af4:1052")), "{without:?}");
    let input: Vec<_> = with.iter().filter(|l| l.contains("id=1af4:1052")).collect();
    assert_eq!(input.len(), 2, "a tablet and a keyboard: {with:?}");
    assert!(input.iter().all(|l| l.ends_with("class=0980")), "{input:?}");
    let slot = |l: &str| l.split_whitespace().nth(1).map(str::to_owned);
    assert_ne!(slot(input[0]), slot(input[1]), "each in its own slot: {input:?}");
    assert_eq!(with.len(), without.len() + 2, "they are the only new devices: {without:?} / {with:?}");
    assert_eq!(devices(&["--tablet"]), with, "--tablet is --input virtio");
    let bad = run_guest("pci-scan", &["--input", "usb"]);
    assert_exit(&bad, 1);
    assert!(text(&bad.stderr).contains("ps2 or virtio"), "{}", text(&bad.stderr));
}

#[test]
fn elf32_pvh_multiboot_and_stackless_kernels_boot() {
    for (name, marker) in [
        ("pvh32", "PORTHOLE-PVH32-OK\n"),
        ("multiboot1", "PORTHOLE-MB1-OK\n"),
        ("multiboot2", "PORTHOLE-MB2-OK\n"),
        ("nostack", "PORTHOLE-NOSTACK-OK\n"),
    ] {
        let out = run_guest(name, &[]);
        assert_exit(&out, 0);
        assert_eq!(text(&out.stdout), marker, "{name}");
    }
}

#[test]
fn help_lists_the_kernel_formats() {
    let out = run(&["--help"]);
    assert_exit(&out, 0);
    let help = text(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for format in ["bzImage", "PVH ELF kernel (32- or 64-bit", "Multiboot 1 or Multiboot2"] {
        assert!(help.contains(format), "{format} missing:\n{help}");
    }
}

#[test]
fn every_vcpu_reports_its_apic_id() {
    for cpus in [1u32, 2, 4] {
        let out = run_guest("smp", &["--cpus", &cpus.to_string()]);
        assert_exit(&out, 0);
        let stdout = text(&out.stdout);
        for id in 0..cpus {
            assert!(stdout.contains(&format!("PORTHOLE-CPU apic={id}\n")), "cpus={cpus}: {stdout}");
        }
        assert!(stdout.contains(&format!("PORTHOLE-SMP-OK cpus={cpus}\n")), "cpus={cpus}: {stdout}");
    }
}

#[test]
fn pit_and_lapic_timer_interrupts_arrive() {
    let out = run_guest("timer", &[]);
    assert_exit(&out, 0);
    assert!(text(&out.stdout).contains("PORTHOLE-TIMER-OK pit=10 lapic=10"), "{}", text(&out.stdout));
}

#[test]
fn rtc_reads_the_host_date() {
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let out = run_guest("rtc", &[]);
    assert_exit(&out, 0);
    let stdout = text(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with("PORTHOLE-RTC ")).unwrap_or_else(|| panic!("{stdout}"));
    let stamp = &line["PORTHOLE-RTC ".len()..];
    let num = |range: std::ops::Range<usize>| -> u32 { stamp[range].parse().unwrap() };
    let t = vmm_core::devices::rtc::DateTime {
        year: i64::from(num(0..4)),
        month: num(5..7),
        day: num(8..10),
        hour: num(11..13),
        minute: num(14..16),
        second: num(17..19),
    };
    let skew = t.to_unix() - before;
    assert!((-2..=120).contains(&skew), "guest RTC {stamp} is {skew} s away from the host clock");
}

#[test]
fn i8042_reset_reboots_the_guest_and_nvram_survives() {
    let out = run_guest("reboot", &[]);
    assert_exit(&out, 0);
    assert_eq!(text(&out.stdout), "PORTHOLE-BOOT 1\nPORTHOLE-BOOT 2\nPORTHOLE-REBOOT-OK\n");
}

#[test]
fn no_reboot_turns_a_reset_into_exit_status_4() {
    let out = run_guest("reboot", &["--no-reboot"]);
    assert_exit(&out, 4);
    assert_eq!(text(&out.stdout), "PORTHOLE-BOOT 1\n");
    assert!(text(&out.stderr).contains("reset"), "{}", text(&out.stderr));
}

/// `--exit-on-crash`: the old behaviour, the process ends as soon as the guest crashes.
#[test]
fn a_triple_fault_is_a_crash_with_the_instruction_bytes() {
    let out = run_guest("fault", &["--exit-on-crash"]);
    assert_exit(&out, 2);
    assert!(text(&out.stdout).contains("PORTHOLE-GUEST-EXCEPTION vector=0x06"), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("triple fault") && stderr.contains("instruction bytes: 0f 0b"), "{stderr}");
}

#[test]
fn a_hostile_guest_is_survived_and_counted() {
    let dir = Scratch::new("hostile");
    let counters = dir.path("counters.json");
    let out = run_guest("hostile", &["--counters-file", counters.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(text(&out.stdout).contains("PORTHOLE-HOSTILE-OK"), "{}", text(&out.stdout));
    let c: vmm_core::counters::CountersSnapshot =
        serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    // Tens of thousands of ports nobody claims, and 4096 writes and reads each to unmapped MMIO.
    assert!(c.unhandled_pio_writes > 60_000, "{c:?}");
    assert!(c.unhandled_pio_reads > 60_000, "{c:?}");
    assert!(c.unhandled_mmio_writes >= 4096 && c.unhandled_mmio_reads >= 4096, "{c:?}");
    assert!(c.exits_io_out > c.unhandled_pio_writes, "{c:?}");
    assert_eq!(c.boots, 1);
}

/// A ticker guest behind a control socket, its serial going to a file.
struct Ticker {
    _dir: Scratch,
    child: Option<Child>,
    serial: PathBuf,
    control: PathBuf,
}

impl Ticker {
    fn start(extra: &[&str]) -> Ticker {
        let t = Self::start_guest("ticker", extra);
        t.wait_for(|s| s.contains("PORTHOLE-TICK 2\n"));
        t
    }

    fn start_guest(name: &str, extra: &[&str]) -> Ticker {
        let dir = Scratch::new(&format!("{name}-{}", extra.len()));
        let serial = dir.path("serial.log");
        let control = dir.path("control.sock");
        let kernel = guest(name);
        let serial_arg = format!("file:{}", serial.display());
        let control_arg = format!("unix:{}", control.display());
        let mut args = vec![
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--serial",
            &serial_arg,
            "--control",
            &control_arg,
        ];
        args.extend_from_slice(extra);
        let child = vmm(&args).spawn().unwrap();
        Ticker { _dir: dir, child: Some(child), serial, control }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn wait_for(&self, what: impl Fn(&str) -> bool) {
        wait_until(LIMIT, || what(&self.output()), || format!("guest output so far:\n{}", self.output()));
    }

    fn client(&self) -> ControlClient {
        ControlClient::connect(&self.control).unwrap()
    }

    /// A control connection, once the socket is up (a restored VM's output may not show it).
    fn client_when_up(&self) -> ControlClient {
        wait_until(LIMIT, || ControlClient::connect(&self.control).is_ok(), || "no control socket".into());
        self.client()
    }

    fn finish(self) -> Output {
        self.finish_with_log().0
    }

    /// Waits for the VM to end; returns its output and the serial log.
    fn finish_with_log(mut self) -> (Output, String) {
        let out = wait(self.child.take().unwrap(), LIMIT);
        (out, self.output())
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ticks(output: &str) -> usize {
    output.lines().filter(|l| l.starts_with("PORTHOLE-TICK ")).count()
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let t = Ticker::start(&[]);
    let mut c = t.client();
    let paused = c.request(&Request::Pause).unwrap();
    let took = paused.paused_after_us.unwrap();
    assert!(took < 1_000_000, "pause answered, so it took under its 1 s limit: {took} us");
    assert_eq!(c.request(&Request::Status).unwrap().status.unwrap().state, RunState::Paused);
    let frozen = t.output();
    std::thread::sleep(Duration::from_millis(400)); // 4 ticks' worth
    assert_eq!(t.output(), frozen, "no guest output while paused");
    c.request(&Request::Resume).unwrap();
    assert_eq!(c.request(&Request::Status).unwrap().status.unwrap().state, RunState::Running);
    let before = ticks(&frozen);
    t.wait_for(|s| ticks(s) >= before + 2);
    c.request(&Request::Poweroff).unwrap();
    let out = t.finish();
    assert_exit(&out, 3);
}

#[test]
fn counters_and_status_reflect_the_running_guest() {
    let t = Ticker::start(&["--name", "ticker-vm", "--cpus", "2"]);
    let mut c = t.client();
    let status = c.request(&Request::Status).unwrap().status.unwrap();
    assert_eq!((status.name.as_str(), status.vcpus, status.memory_mib, status.boots), ("ticker-vm", 2, 64, 1));
    assert_eq!(status.pid, t.child.as_ref().unwrap().id());
    let first = c.request(&Request::Counters).unwrap().counters.unwrap();
    t.wait_for(|s| ticks(s) >= 5);
    let second = c.request(&Request::Counters).unwrap().counters.unwrap();
    assert!(second.exits_io_out > first.exits_io_out, "{first:?} -> {second:?}");
    assert!(second.serial_bytes_out > first.serial_bytes_out);
    assert!(second.vcpu_run_ns > 0 && second.uptime_ms >= first.uptime_ms);
    let written = t.output().len() as u64;
    let third = c.request(&Request::Counters).unwrap().counters.unwrap();
    assert!(third.serial_bytes_out >= written, "every byte in the log was counted");
    // Unknown requests are refused with a reason, and the connection keeps working.
    let mut raw = std::os::unix::net::UnixStream::connect(&t.control).unwrap();
    use std::io::{BufRead, Write};
    raw.write_all(b"{\"cmd\":\"explode\"}\nnot json\n").unwrap();
    let mut lines = std::io::BufReader::new(raw).lines();
    for _ in 0..2 {
        let reply: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(reply["ok"], false);
        assert!(reply["error"].as_str().unwrap().contains("bad request"));
    }
    c.request(&Request::Poweroff).unwrap();
    assert_exit(&t.finish(), 3);
}

/// A disk's rate limits from `--disk`, shown by `status` and changed live (bad ones refused, nothing
/// changed).
#[test]
fn disk_limits_are_given_shown_and_changed_live() {
    use vmm_core::rate_limiter::DiskLimits;
    let dir = Scratch::new("disk-limits");
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let spec = format!("{},iops=50,rbps=1048576", image.display());
    let t = Ticker::start(&["--disk", &spec]);
    let mut c = t.client();
    let limits = |c: &mut ControlClient| c.request(&Request::Status).unwrap().status.unwrap().drives[0].limits;
    assert_eq!(limits(&mut c), DiskLimits { iops: Some(50), rbps: Some(1 << 20), ..Default::default() });
    let new = DiskLimits { wiops: Some(10), ..Default::default() };
    let reply = c.request(&Request::SetDiskLimits { drive: "disk0".into(), limits: new }).unwrap();
    assert!(reply.ok && reply.drive.unwrap().limits == new);
    assert_eq!(limits(&mut c), new);
    let bad = DiskLimits { bps: Some(0), ..Default::default() };
    let e = c.request(&Request::SetDiskLimits { drive: "disk0".into(), limits: bad }).unwrap_err().to_string();
    assert!(e.contains("stop the disk"), "{e}");
    let e = c.request(&Request::SetDiskLimits { drive: "disk9".into(), limits: new }).unwrap_err().to_string();
    assert!(e.contains("no drive"), "{e}");
    assert_eq!(limits(&mut c), new, "refused changes change nothing");
    c.request(&Request::Poweroff).unwrap();
    assert_exit(&t.finish(), 3);
}

#[test]
fn reset_over_the_control_socket_reboots() {
    let t = Ticker::start(&[]);
    let mut c = t.client();
    c.request(&Request::Reset).unwrap();
    t.wait_for(|s| s.matches("PORTHOLE-TICKER-START").count() == 2);
    assert_eq!(c.request(&Request::Status).unwrap().status.unwrap().boots, 2);
    c.request(&Request::Poweroff).unwrap();
    assert_exit(&t.finish(), 3);
}

#[test]
fn a_stop_the_guest_ignores_is_forced_after_the_timeout() {
    let t = Ticker::start(&["--stop-timeout-ms", "300"]);
    let mut c = t.client();
    let reply = c.request(&Request::Stop).unwrap();
    assert_eq!(reply.acpi_power_button_enabled, Some(false), "the ticker has no ACPI driver");
    assert_eq!(c.request(&Request::Status).unwrap().status.unwrap().state, RunState::Stopping);
    let out = t.finish();
    assert_exit(&out, 3);
    assert!(text(&out.stderr).contains("powered off by the host"), "{}", text(&out.stderr));
}

#[test]
fn a_graceful_stop_reaches_an_acpi_aware_guest_which_powers_off() {
    let t = Ticker::start_guest("acpi-button", &["--stop-timeout-ms", "30000"]);
    t.wait_for(|s| s.contains("PORTHOLE-ACPI-READY"));
    let reply = t.client().request(&Request::Stop).unwrap();
    assert_eq!(reply.acpi_power_button_enabled, Some(true));
    let (out, log) = t.finish_with_log();
    assert_exit(&out, 0);
    assert!(log.contains("PORTHOLE-ACPI-POWER-BUTTON"), "{log}");
}

#[test]
fn vcpu_and_control_threads_run_under_seccomp() {
    let t = Ticker::start(&["--cpus", "2"]);
    let _c = t.client();
    let threads = seccomp_modes(t.child.as_ref().unwrap().id());
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} is not under a seccomp filter: {threads:?}");
    }
    assert!(threads.iter().filter(|(n, _)| n.starts_with("vcpu")).count() == 2, "{threads:?}");
    assert!(threads.iter().any(|(n, _)| n == "control"), "{threads:?}");
}

/// vCPUs added to a running VM (ACPI CPU hotplug; the guest's side is proven with Linux in the hardware
/// tier): up to the maximum only, never fewer, each a seccomp-filtered thread that pauses, saves and reboots
/// with the rest.
#[test]
fn vcpus_are_added_live_up_to_the_maximum_and_stay_across_a_reboot() {
    let t = Ticker::start(&["--cpus", "1", "--max-cpus", "3"]);
    let mut c = t.client();
    let pid = t.child.as_ref().unwrap().id();
    let status = |c: &mut ControlClient| c.request(&Request::Status).unwrap().status.unwrap();
    let s = status(&mut c);
    assert_eq!((s.vcpus, s.max_vcpus), (1, Some(3)));
    let vcpu_threads = || seccomp_modes(pid).into_iter().filter(|(n, _)| n.starts_with("vcpu")).collect::<Vec<_>>();
    assert_eq!(vcpu_threads().len(), 1);
    // Past the maximum, and fewer than now: refused with the reason, nothing changes.
    let refused = c.request(&Request::SetVcpus { count: 4 }).unwrap_err().to_string();
    assert!(refused.contains("at most 3"), "{refused}");
    let refused = c.request(&Request::SetVcpus { count: 0 }).unwrap_err().to_string();
    assert!(refused.contains("cannot be removed"), "{refused}");
    assert_eq!(status(&mut c).vcpus, 1);
    // One added while running: its thread runs under the vCPU filter, and the guest goes on.
    let added = c.request(&Request::SetVcpus { count: 2 }).unwrap();
    assert_eq!((added.ok, added.vcpus), (true, Some(2)), "{added:?}");
    assert_eq!(status(&mut c).vcpus, 2);
    // (A new thread names itself and applies its filter as it starts.)
    let filtered = || {
        let threads = vcpu_threads();
        threads.len() == 2 && threads.iter().all(|(_, mode)| mode == "2")
    };
    wait_until(LIMIT, filtered, || format!("two vCPU threads, each under its seccomp filter: {:?}", vcpu_threads()));
    // A pause waits for the new vCPU too, and one added while paused parks until the resume.
    let paused = c.request(&Request::Pause).unwrap();
    assert!(paused.ok, "{paused:?}");
    let added = c.request(&Request::SetVcpus { count: 3 }).unwrap();
    assert_eq!((added.ok, added.vcpus), (true, Some(3)), "{added:?}");
    assert_eq!(status(&mut c).state, RunState::Paused);
    assert!(c.request(&Request::Resume).unwrap().ok);
    let before = ticks(&t.output());
    t.wait_for(|s| ticks(s) >= before + 2);
    // A machine-state save reads all three (each thread reads its own vCPU).
    let dir = Scratch::new("hotplug-state");
    let state = dir.path("state");
    let saved = c.request(&Request::SaveState { path: state.clone(), then: vmm_core::vm::Then::Resume }).unwrap();
    assert!(saved.ok, "{saved:?}");
    // A reset reboots with the three: they are the machine's now.
    assert!(c.request(&Request::Reset).unwrap().ok);
    wait_until(LIMIT, || status(&mut c).boots == 2, || "no second boot".into());
    let s = status(&mut c);
    assert_eq!((s.vcpus, s.max_vcpus), (3, Some(3)));
    wait_until(LIMIT, || vcpu_threads().len() == 3, || format!("vCPU threads after the reboot: {:?}", vcpu_threads()));
    c.request(&Request::Poweroff).unwrap();
    assert_exit(&t.finish(), 3);
    // The state names the three vCPUs: it restores into a VM of three, not into the one started with one.
    let state_arg = state.to_str().unwrap();
    let out = run_guest("ticker", &["--cpus", "1", "--max-cpus", "3", "--restore", state_arg]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("the state is for a VM with 3 vCPUs, this one has 1"), "{err}");
    let restored = Ticker::start_guest("ticker", &["--cpus", "3", "--restore", state_arg]);
    let mut c = restored.client_when_up();
    assert_eq!(status(&mut c).vcpus, 3);
    let before = ticks(&restored.output());
    restored.wait_for(|s| ticks(s) >= before + 2);
    c.request(&Request::Poweroff).unwrap();
    assert_exit(&restored.finish(), 3);
}

/// The threads SECURITY.md's seccomp table lists (a new thread must be added there, with its filter).
/// `kvm-nx-lpage-re…` is the kernel's KVM worker, which Linux attaches to the VM's process.
const DOCUMENTED_THREADS: &[&str] = &[
    "porthole-vmm",
    "vcpu",
    "display",
    "control",
    "control-conn",
    "rfb-listen",
    "rfb-client",
    "rfb-writer",
    "blk-queue",
    "blk-io",
    "scsi-queue",
    "net-io",
    "tablet",
    "keyboard",
    "balloon",
    "virtio-gpu",
    "serial-port",
    "sound",
    "hda",
    "kvm-nx-lpage-re",
];

/// Every thread of a VMM with every kind of device, a control connection and a VNC client runs under a
/// seccomp filter, and is one SECURITY.md lists.
#[test]
fn every_thread_of_a_vmm_with_every_device_runs_under_seccomp() {
    use std::io::{Read, Write};
    let dir = Scratch::new("seccomp-all");
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let vnc = dir.path("vnc.sock");
    let (vnc_arg, disk_arg) = (format!("unix:{}", vnc.display()), image.display().to_string());
    let mut args = vec!["--cpus", "2", "--disk", &disk_arg, "--cdrom", "--vnc", &vnc_arg, "--input", "virtio"];
    args.extend_from_slice(&["--balloon", "--vga", "virtio", "--agent", "spice", "--sound", "hda"]);
    let passt = Command::new("passt").arg("--version").output().is_ok();
    if passt {
        args.extend_from_slice(&["--net", "user"]);
    } else {
        eprintln!("SKIP (the network card part): passt is not installed (apt-get install passt)");
    }
    let t = Ticker::start(&args);
    let _control = t.client();
    // A VNC client through the handshake (RFB 3.8, no security), so its reader and writer threads run.
    let mut rfb = std::os::unix::net::UnixStream::connect(&vnc).unwrap();
    let mut version = [0u8; 12];
    rfb.read_exact(&mut version).unwrap();
    assert_eq!(&version, b"RFB 003.008\n");
    rfb.write_all(b"RFB 003.008\n").unwrap();
    let mut count = [0u8; 1];
    rfb.read_exact(&mut count).unwrap();
    let mut types = vec![0u8; count[0] as usize];
    rfb.read_exact(&mut types).unwrap();
    assert!(types.contains(&1), "security types {types:?}");
    rfb.write_all(&[1]).unwrap();
    let mut result = [0u8; 4];
    rfb.read_exact(&mut result).unwrap();
    assert_eq!(result, [0; 4], "security result");
    rfb.write_all(&[1]).unwrap(); // ClientInit: shared
    let mut init = [0u8; 24];
    rfb.read_exact(&mut init).unwrap();

    let pid = t.child.as_ref().unwrap().id();
    let mut expected = vec![
        "porthole-vmm",
        "vcpu0",
        "vcpu1",
        "display",
        "control",
        "control-conn",
        "rfb-listen",
        "rfb-client",
        "rfb-writer",
        "blk-queue",
        "scsi-queue",
        "tablet",
        "keyboard",
        "balloon",
        "virtio-gpu",
        "serial-port",
        "hda",
    ];
    if passt {
        expected.push("net-io");
    }
    wait_until(
        LIMIT,
        || {
            let threads = seccomp_modes(pid);
            expected.iter().all(|e| threads.iter().any(|(n, _)| n == e))
        },
        || format!("expected {expected:?}, the VMM has {:?}", seccomp_modes(pid)),
    );
    let threads = seccomp_modes(pid);
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} is not under a seccomp filter: {threads:?}");
        let base = name.trim_end_matches(|c: char| c.is_ascii_digit());
        assert!(
            DOCUMENTED_THREADS.contains(&base) || DOCUMENTED_THREADS.contains(&name.as_str()),
            "thread {name} is not in SECURITY.md's seccomp table (nor in DOCUMENTED_THREADS): {threads:?}"
        );
    }
    eprintln!("{} threads, all filtered: {threads:?}", threads.len());
}

/// The other sound card's thread (one VM has one card) is filtered and documented too.
#[test]
fn the_virtio_sound_thread_runs_under_seccomp() {
    let t = Ticker::start(&["--sound", "virtio"]);
    let pid = t.child.as_ref().unwrap().id();
    wait_until(
        LIMIT,
        || seccomp_modes(pid).iter().any(|(n, _)| n == "sound"),
        || format!("no sound thread: {:?}", seccomp_modes(pid)),
    );
    let threads = seccomp_modes(pid);
    let (_, mode) = threads.iter().find(|(n, _)| n == "sound").unwrap();
    assert_eq!(mode, "2", "the sound thread is not under a seccomp filter: {threads:?}");
    assert!(DOCUMENTED_THREADS.contains(&"sound"));
}

#[test]
fn bad_input_is_refused_with_a_clear_message() {
    let text_file = Scratch::new("badinput");
    let notes = text_file.path("notes.txt");
    std::fs::write(&notes, "this is not a kernel\n".repeat(50)).unwrap();
    let hello = guest("hello");
    let hello = hello.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--kernel", "/nonexistent/vmlinuz"], "No such file"),
        (
            vec!["--kernel", notes.to_str().unwrap()],
            "not a kernel: the file is text beginning \"this is not a kernel\"",
        ),
        (vec!["--kernel", hello, "--memory", "0"], "too little"),
        (vec!["--kernel", hello, "--memory", "1000000000"], "this host has only"),
        (vec!["--kernel", hello, "--cpus", "0"], "at least 1 vCPU"),
        (vec!["--kernel", hello, "--cpus", "100000"], "vCPUs asked for"),
        (vec!["--kernel", hello, "--serial", "tcp:1"], "serial sink"),
        (vec!["--kernel", hello, "--display", "5000x100"], "is not supported"),
        (vec!["--kernel", hello, "--display", "big"], "expected WIDTHxHEIGHT"),
        (vec!["--kernel", hello, "--vnc", "udp:1"], "is not unix:PATH or tcp:ADDR:PORT"),
        (vec!["--kernel", hello, "--vnc-password", "/nonexistent"], "without a VNC listen address"),
        (vec!["--kernel", hello, "--control", "/tmp/x"], "expected unix:PATH"),
        (vec![], "nothing to boot"),
        (vec!["--frobnicate"], "unexpected argument"),
    ];
    for (args, expected) in cases {
        let out = run(&args);
        assert_exit(&out, 1);
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in:\n{stderr}");
    }
}

#[test]
fn a_json_config_file_boots_too() {
    let dir = Scratch::new("config");
    let config = dir.path("vm.json");
    let serial = dir.path("serial.log");
    let json = serde_json::json!({
        "name": "from-json",
        "vcpus": 2,
        "memory_mib": 32,
        "boot": { "kernel": guest("smp") },
        "serial": { "kind": "file", "path": serial },
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let out = run(&["--config", config.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(std::fs::read_to_string(&serial).unwrap().contains("PORTHOLE-SMP-OK cpus=2"));
}

/// `--exit-file`: a supervisor that is not the VMM's parent learns why the VM ended.
#[test]
fn the_exit_file_records_why_the_vm_ended() {
    let dir = Scratch::new("exit-file");
    let file = dir.path("exit.json");
    for (guest, code, why) in [("hello", 0, "the guest powered off"), ("fault", 2, "the guest crashed: triple fault")] {
        let out = run_guest(guest, &["--exit-on-crash", "--exit-file", file.to_str().unwrap()]);
        assert_exit(&out, code);
        let record: vmm_core::vm::ExitRecord = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(record.exit_code, code);
        assert!(record.reason.starts_with(why), "{record:?}");
    }
    let out = run(&["--kernel", "/nonexistent/kernel", "--exit-file", file.to_str().unwrap()]);
    assert_exit(&out, 1);
    let record: vmm_core::vm::ExitRecord = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(record.exit_code, 1);
    assert!(record.reason.starts_with("VMM error") && record.reason.contains("/nonexistent/kernel"), "{record:?}");
}

/// A crashed guest is kept, as QEMU keeps it: status says `crashed` with the report, pause is refused, a
/// `reset` reboots it (it crashes again), and SIGTERM then ends the process with exit status 2, the crash
/// as the exit record's reason.
#[test]
fn a_crashed_guest_stays_until_sigterm_and_reset_reboots_it() {
    let dir = Scratch::new("crash-stays");
    let exit = dir.path("exit.json");
    let counters = dir.path("counters.json");
    let vm = Ticker::start_guest(
        "fault",
        &["--exit-file", exit.to_str().unwrap(), "--counters-file", counters.to_str().unwrap()],
    );
    // (None until the control socket is up, too.)
    let crashed = |vm: &Ticker| {
        let status = ControlClient::connect(&vm.control).ok()?.request(&Request::Status).ok()?.status?;
        (status.state == RunState::Crashed).then_some(status)
    };
    let mut status = None;
    wait_until(
        LIMIT,
        || {
            status = crashed(&vm);
            status.is_some()
        },
        || format!("never crashed:\n{}", vm.output()),
    );
    let status = status.unwrap();
    let report = status.crash.unwrap();
    assert!(report.contains("triple fault") && report.contains("instruction bytes: 0f 0b"), "{report}");
    assert_eq!(status.boots, 1);
    let refused = vm.client().request(&Request::Pause).unwrap_err().to_string();
    assert!(refused.contains("crashed"), "{refused}");
    // Still there, and not running the guest: the vCPU threads are gone.
    assert!(!exit.exists() || std::fs::read(&exit).unwrap().is_empty(), "no exit record yet");

    vm.client().request(&Request::Reset).unwrap();
    wait_until(
        LIMIT,
        || vm.output().matches("PORTHOLE-FAULT-START").count() == 2 && crashed(&vm).is_some_and(|s| s.boots == 2),
        || format!("no second boot and crash:\n{}", vm.output()),
    );
    let pid = vm.child.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = vm.finish();
    assert_exit(&out, 2);
    let record: vmm_core::vm::ExitRecord = serde_json::from_str(&std::fs::read_to_string(&exit).unwrap()).unwrap();
    assert_eq!(record.exit_code, 2);
    assert!(record.reason.starts_with("the guest crashed: triple fault"), "{record:?}");
    let c: vmm_core::counters::CountersSnapshot =
        serde_json::from_str(&std::fs::read_to_string(&counters).unwrap()).unwrap();
    assert_eq!((c.boots, c.exits_shutdown), (2, 2), "{c:?}");
}

/// SIGTERM to a running VM is a forced power-off: exit status 3 and an exit record (not death by signal).
#[test]
fn sigterm_powers_a_running_vm_off() {
    let dir = Scratch::new("sigterm");
    let exit = dir.path("exit.json");
    let vm = Ticker::start(&["--exit-file", exit.to_str().unwrap()]);
    let pid = vm.child.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = vm.finish();
    assert_exit(&out, 3);
    let record: vmm_core::vm::ExitRecord = serde_json::from_str(&std::fs::read_to_string(&exit).unwrap()).unwrap();
    assert_eq!(record, vmm_core::vm::ExitRecord { exit_code: 3, reason: "the VM was powered off by the host".into() });
}

/// The network cards of a running VM, from its control socket.
fn nics(t: &Ticker) -> Vec<vmm_core::net::NicStatus> {
    t.client().request(&Request::Nics).unwrap().nics.unwrap()
}

#[test]
fn a_vm_whose_passt_is_missing_starts_without_that_card_and_says_why() {
    // The environment variable reaches porthole-vmm only (it is set on the child).
    let dir = Scratch::new("no-passt");
    let serial = dir.path("serial.log");
    let control = dir.path("control.sock");
    let kernel = guest("ticker");
    let mut child = vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "64",
        "--serial",
        &format!("file:{}", serial.display()),
        "--control",
        &format!("unix:{}", control.display()),
        "--net",
        "user",
        "--net",
        "none",
    ])
    .env("PORTHOLE_PASST", "/nonexistent/passt")
    .spawn()
    .unwrap();
    wait_until(
        LIMIT,
        || std::fs::read_to_string(&serial).unwrap_or_default().contains("PORTHOLE-TICK 2"),
        || "the VM runs without its network card".into(),
    );
    let reply = ControlClient::connect(&control).unwrap().request(&Request::Nics).unwrap();
    let nics = reply.nics.unwrap();
    assert_eq!(nics.len(), 1, "`none` adds no card");
    assert!(!nics[0].attached);
    let error = nics[0].error.clone().unwrap();
    assert!(error.contains("passt is not installed"), "{error}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_host_without_a_default_route_gives_a_vm_without_network_and_the_reason() {
    // A network namespace of its own has only a loopback interface: passt refuses to start.
    let probe = Command::new("unshare").args(["-n", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP: cannot create a network namespace here (needs root: unshare -n)");
        return;
    }
    if Command::new("passt").arg("--version").output().is_err() {
        eprintln!("SKIP: passt is not installed (apt-get install passt)");
        return;
    }
    let kernel = guest("hello");
    let out = wait(
        Command::new("unshare")
            .args(["-n", VMM, "--kernel", kernel.to_str().unwrap(), "--memory", "64", "--net", "user"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        LIMIT,
    );
    assert_exit(&out, 0);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("net0: no network on this card: passt could not start"), "{stderr}");
    assert!(stderr.contains("routable interface"), "passt's own reason is passed on: {stderr}");
}

#[test]
fn a_forward_to_a_port_in_use_refuses_to_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = run_guest("hello", &["--net", &format!("user,fwd=tcp:{port}-22")]);
    assert_exit(&out, 1);
    let stderr = text(&out.stderr);
    assert!(stderr.contains(&format!("tcp port {port} on 127.0.0.1 is in use")), "{stderr}");
}

#[test]
fn bad_network_options_are_refused_with_the_reason() {
    for (spec, says) in [
        ("slirp", "network back end \"slirp\" is unknown"),
        ("user,mtu=9", "MTU 9 is out of range"),
        ("tap:t0,fwd=tcp:2222-22", "port forwards need the user back end"),
        ("user,fwd=tcp:2222", "port forward \"tcp:2222\" is not"),
    ] {
        let out = run_guest("hello", &["--net", spec]);
        assert_exit(&out, 1);
        assert!(text(&out.stderr).contains(says), "{spec}: {}", text(&out.stderr));
    }
}

#[test]
fn a_card_passt_serves_is_reported_and_its_link_can_be_pulled() {
    if Command::new("passt").arg("--version").output().is_err() {
        eprintln!("SKIP: passt is not installed (apt-get install passt)");
        return;
    }
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let fwd = format!("user,mac=02:00:00:00:00:01,fwd=tcp:{port}-22");
    let t = Ticker::start(&["--net", &fwd]);
    let n = nics(&t);
    assert_eq!(n.len(), 1);
    assert!(n[0].attached, "{:?}", n[0].error);
    assert_eq!((n[0].id.as_str(), n[0].backend.as_str(), n[0].mac.as_str()), ("net0", "user", "02:00:00:00:00:01"));
    assert!(n[0].ipv4.is_some(), "passt's DHCP offer is known");
    assert_eq!(n[0].forwards[0].host_port, port);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "passt listens on the forwarded port");
    let reply = t.client().request(&Request::SetLink { nic: "net0".into(), up: false }).unwrap();
    assert!(reply.ok && !reply.nics.unwrap()[0].link_up);
    assert!(!nics(&t)[0].link_up);
    let refused = t.client().request(&Request::SetLink { nic: "net9".into(), up: false }).unwrap_err();
    assert!(refused.to_string().contains("no network card \"net9\""), "{refused}");
    let status = t.client().request(&Request::Status).unwrap().status.unwrap();
    assert_eq!(status.nics.len(), 1);
}

/// New port forwards for a running VM: its card disconnects from its passt (which ends and frees its ports),
/// then connects to a passt started elsewhere (here by the test, as portholed does), passed over the control
/// socket with its standard error.
#[test]
fn a_running_card_moves_to_a_new_passt_with_other_forwards() {
    if Command::new("passt").arg("--version").output().is_err() {
        eprintln!("SKIP: passt is not installed (apt-get install passt)");
        return;
    }
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (old, new) = (free_port(), free_port());
    let t = Ticker::start(&["--net", &format!("user,mac=02:00:00:00:00:07,fwd=tcp:{old}-22")]);
    let before = nics(&t).remove(0);
    assert!(before.attached && before.forwards[0].host_port == old, "{before:?}");
    // Without a socket, connect-nic is refused and changes nothing.
    let request = Request::ConnectNic { nic: "net0".into(), forwards: Vec::new(), address: None, tap: None };
    let refused = t.client().request(&request).unwrap_err().to_string();
    assert!(refused.contains("needs passt's socket"), "{refused}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", old)).is_ok(), "the old passt still listens");

    let gone = t.client().request(&Request::DisconnectNic { nic: "net0".into() }).unwrap().nics.unwrap().remove(0);
    assert!(
        gone.forwards.is_empty() && gone.error.as_deref().is_some_and(|e| e.contains("being replaced")),
        "{gone:?}"
    );
    wait_until(
        LIMIT,
        || std::net::TcpListener::bind(("127.0.0.1", old)).is_ok(),
        || "the old passt still holds its port".into(),
    );
    let forward: vmm_core::net::PortForward = format!("tcp:{new}-22").parse().unwrap();
    let mac = "02:00:00:00:00:07".parse().unwrap();
    let (passt, offered) = vmm_core::net::Passt::spawn("net0", mac, 1500, &[forward]).unwrap();
    let (socket, log, child) = passt.into_parts().unwrap();
    let fds: Vec<_> = [Some(&socket), log.as_ref()].into_iter().flatten().map(|f| f.as_fd()).collect();
    let request =
        Request::ConnectNic { nic: "net0".into(), forwards: vec![forward], address: Some(offered), tap: None };
    let now = t.client().request_passing(&request, &fds).unwrap().nics.unwrap().remove(0);
    drop((socket, log));
    assert!(now.attached && now.error.is_none(), "{now:?}");
    assert_eq!(now.forwards, [forward]);
    assert_eq!(now.ipv4, Some(offered.to_string()));
    assert!(std::net::TcpStream::connect(("127.0.0.1", new)).is_ok(), "the new passt listens on {new}");
    assert!(std::net::TcpListener::bind(("127.0.0.1", old)).is_ok(), "nothing holds the old port");
    // passt ends with the VM (its socket closes), and the test reaps it.
    drop(t);
    let mut child = child.unwrap();
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "passt outlived its VM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

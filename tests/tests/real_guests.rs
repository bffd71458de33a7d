//! The real-guest tier (`./x test-real`): Debian's kernel with a busybox initramfs (PVH and bzImage) and
//! memtest86+ on porthole-vmm. Each run records the furthest serial line reached and, when the guest
//! stops, why. On hardware virtualization the Linux runs must reach `PORTHOLE-LINUX-OK`; on a nested PVM
//! host (no VT-x/AMD-V, guest code emulated) they are expected to stop early, and the test only requires
//! that the VMM itself did not fail and reported what happened.
//!
//! Inputs come from `./x fetch-guests` (tests/real-guests/fetch.sh) in target/real-guests.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use porthole_tests::{Scratch, repo_root, text, workspace_bin};

fn cache() -> PathBuf {
    std::env::var_os("PORTHOLE_GUEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/real-guests"))
}

/// Boots `kernel` with a time limit and reports what the serial console showed.
fn boot(
    label: &str,
    kernel: &str,
    initrd: Option<&str>,
    cmdline: &str,
    limit: Duration,
) -> (Option<i32>, String, String) {
    boot_with(label, kernel, initrd, cmdline, limit, &[])
}

fn boot_with(
    label: &str,
    kernel: &str,
    initrd: Option<&str>,
    cmdline: &str,
    limit: Duration,
    extra: &[&std::ffi::OsStr],
) -> (Option<i32>, String, String) {
    let dir = Scratch::new(label);
    let serial = dir.path("serial.log");
    let cache = cache();
    let kernel = cache.join(kernel);
    assert!(kernel.exists(), "{} missing: run ./x fetch-guests", kernel.display());
    let mut cmd = Command::new(workspace_bin("porthole-vmm"));
    // A crash (an instruction this KVM cannot emulate) ends the run at once, with the reason.
    cmd.arg("--kernel").arg(&kernel).args(["--memory", "512", "--cmdline", cmdline, "--exit-on-crash"]);
    cmd.arg("--serial").arg(format!("file:{}", serial.display()));
    if let Some(initrd) = initrd {
        cmd.arg("--initrd").arg(cache.join(initrd));
    }
    cmd.args(extra);
    let start = Instant::now();
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let log = text(&std::fs::read(&serial).unwrap_or_default());
    let furthest = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no serial output)").to_owned();
    println!(
        "REAL-GUEST {label}: {} after {:.1} s; {} serial bytes; furthest line: {furthest}",
        match status {
            Some(code) => format!("exit status {code}"),
            None => format!("still running at the {limit:?} limit, stopped"),
        },
        start.elapsed().as_secs_f64(),
        log.len()
    );
    if !stderr.trim().is_empty() {
        println!("REAL-GUEST {label}: porthole-vmm said: {}", stderr.trim());
    }
    (status, log, stderr)
}

fn check_linux(label: &str, kernel: &str) {
    let (status, log, _stderr) = boot(
        label,
        kernel,
        Some("initramfs.cpio.gz"),
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 reboot=k",
        Duration::from_secs(180),
    );
    assert_ne!(status, Some(1), "porthole-vmm itself failed");
    if porthole_tests::hw::host_has_hardware_virtualization() {
        assert!(log.contains("PORTHOLE-LINUX-OK"), "{label} did not reach /init on hardware virtualization");
        assert_eq!(status, Some(0), "{label}: the kernel should power the VM off");
    } else {
        println!("REAL-GUEST {label}: no VT-x/AMD-V here (nested PVM KVM): recorded, not required to pass");
    }
}

#[test]
#[ignore = "real-guest tier: run with ./x test-real"]
fn debian_kernel_pvh_with_busybox_initramfs() {
    check_linux("linux-pvh", "vmlinux");
}

#[test]
#[ignore = "real-guest tier: run with ./x test-real"]
fn debian_kernel_bzimage_with_busybox_initramfs() {
    check_linux("linux-bzimage", "vmlinuz");
}

/// Linux's virtio_pci + virtio_blk drivers on our PCI bus: a disk the test filled (read, identified, written
/// and flushed by /init) and a removable virtio-blk drive holding the memtest86+ ISO.
#[test]
#[ignore = "real-guest tier: run with ./x test-real"]
fn debian_kernel_reads_and_writes_virtio_disks() {
    let dir = Scratch::new("linux-disks");
    let image = dir.path("disk.img");
    let content: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&image, &content).unwrap();
    let iso = cache().join("memtest86+x64.iso");
    let removable = format!("{},removable", iso.display());
    let args = [std::ffi::OsStr::new("--disk"), image.as_os_str(), "--disk".as_ref(), removable.as_ref()];
    let (status, log, _) = boot_with(
        "linux-disks",
        "vmlinux",
        Some("initramfs.cpio.gz"),
        "console=ttyS0 panic=-1 reboot=k",
        Duration::from_secs(180),
        &args,
    );
    assert_ne!(status, Some(1), "porthole-vmm itself failed");
    for line in log.lines().filter(|l| l.starts_with("PORTHOLE-DISK") || l.starts_with("PORTHOLE-BLOCK")) {
        println!("REAL-GUEST linux-disks: {line}");
    }
    if !porthole_tests::hw::host_has_hardware_virtualization() {
        println!("REAL-GUEST linux-disks: no VT-x/AMD-V here (nested PVM KVM): recorded, not required to pass");
        return;
    }
    let md5 = |bytes: &[u8]| {
        let out = Command::new("md5sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(bytes)?;
                c.wait_with_output()
            })
            .unwrap();
        text(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
    };
    let iso_bytes = std::fs::read(&iso).unwrap();
    let vda = format!("PORTHOLE-DISK vda sectors=16384 serial=disk0 md5={}", md5(&content[..4096]));
    let vdb =
        format!("PORTHOLE-DISK vdb sectors={} serial=disk1 md5={}", iso_bytes.len() / 512, md5(&iso_bytes[..4096]));
    assert!(log.contains(&vda), "expected {vda:?} in:\n{log}");
    assert!(log.contains(&vdb), "expected {vdb:?} in:\n{log}");
    assert!(log.contains("PORTHOLE-DISK-WRITTEN vda"), "{log}");
    let after = std::fs::read(&image).unwrap();
    assert_eq!(after.len(), content.len(), "the image did not change size");
    assert!(after[512..].starts_with(b"PORTHOLE-WROTE-THIS\n"), "sector 1 holds the marker");
    assert_eq!(after[..512], content[..512], "sector 0 is untouched");
    assert_eq!(status, Some(0), "the kernel should power the VM off");
}

#[test]
#[ignore = "real-guest tier: run with ./x test-real"]
fn memtest86plus_as_a_linux_kernel() {
    // memtest86+ 6 carries a Linux boot header; its screen needs the console work, serial shows progress.
    let (status, log, _) =
        boot("memtest86+", "memtest86+x64.bin", None, "console=ttyS0,115200", Duration::from_secs(60));
    assert_ne!(status, Some(1), "porthole-vmm itself failed");
    if porthole_tests::hw::host_has_hardware_virtualization() {
        assert!(!log.is_empty(), "memtest86+ printed nothing on the serial console");
    }
}

/// How far an ISO got on one engine.
struct IsoRun {
    /// The firmware's last "Booting from …" line.
    firmware: String,
    /// The milestones seen on the console, in order (porthole-vmm only: read glyph by glyph).
    reached: Vec<String>,
    /// The screen at the end: its size, and (text mode) its non-blank lines.
    screen: String,
    seconds: f64,
}

fn last_boot_line(log: &std::path::Path) -> String {
    text(&std::fs::read(log).unwrap_or_default())
        .lines()
        .rev()
        .find(|l| l.starts_with("Booting from") || l.starts_with("Boot failed") || l.starts_with("No bootable"))
        .unwrap_or("(nothing yet)")
        .to_owned()
}

/// Boots `iso` from a virtio-scsi CD on porthole-vmm's SeaBIOS, watching its console for `milestones`.
fn iso_on_porthole(label: &str, iso: &std::path::Path, milestones: &[&str], limit: Duration) -> IsoRun {
    use porthole_tests::rfb::{RAW, RfbClient};
    let dir = Scratch::new(label);
    let (log, vnc) = (dir.path("bios.log"), dir.path("vnc.sock"));
    let mut child = Command::new(workspace_bin("porthole-vmm"))
        .arg("--firmware")
        .arg(cache().join("bios.bin"))
        .arg("--firmware-log")
        .arg(&log)
        .arg("--cdrom")
        .arg(iso)
        .args(["--memory", "1024", "--serial", "none", "--exit-on-crash", "--vnc"])
        .arg(format!("unix:{}", vnc.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path("vmm.err")).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let mut reached = Vec::new();
    let mut screen = String::new();
    while start.elapsed() < limit && reached.len() < milestones.len() {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        let Ok(mut c) = RfbClient::connect(&vnc, None) else { continue };
        if c.set_encodings(&[RAW]).and_then(|_| c.full_frame()).is_err() {
            continue;
        }
        let rows = porthole_tests::screen_text(&c.pixels, c.width, c.height);
        let lines: Vec<&String> = rows.iter().filter(|l| !l.trim().is_empty()).collect();
        screen =
            format!("{}x{}: {}", c.width, c.height, lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" | "));
        while let Some(next) = milestones.get(reached.len())
            && rows.iter().any(|l| l.contains(next))
        {
            reached.push((*next).to_owned());
        }
    }
    if let Ok(Some(status)) = child.try_wait() {
        let why = text(&std::fs::read(dir.path("vmm.err")).unwrap_or_default());
        screen = format!("{screen}; porthole-vmm ended ({status}): {}", why.lines().last().unwrap_or_default());
    }
    let _ = child.kill();
    let _ = child.wait();
    IsoRun { firmware: last_boot_line(&log), reached, screen, seconds: start.elapsed().as_secs_f64() }
}

/// The same ISO on QEMU (`-M pc`, the same bios.bin, a virtio-scsi CD, stdvga) for the record: the
/// firmware's progress and the screen's size at the end (QEMU's VGA font differs, so no text).
fn iso_on_qemu(label: &str, iso: &std::path::Path, limit: Duration) -> IsoRun {
    let dir = Scratch::new(label);
    let (log, monitor, dump) = (dir.path("bios.log"), dir.path("monitor.sock"), dir.path("screen.ppm"));
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "1024", "-vga", "std"])
        .args(["-display", "none", "-nodefaults", "-bios"])
        .arg(cache().join("bios.bin"))
        .args(["-device", "virtio-scsi-pci,disable-legacy=on", "-device", "scsi-cd,drive=cd0", "-drive"])
        .arg(format!("if=none,id=cd0,media=cdrom,readonly=on,file={}", iso.display()))
        .arg("-debugcon")
        .arg(format!("file:{}", log.display()))
        .args(["-global", "isa-debugcon.iobase=0x402", "-monitor"])
        .arg(format!("unix:{},server,nowait", monitor.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path("qemu.err")).unwrap())
        .spawn()
        .expect("qemu-system-x86_64");
    let start = Instant::now();
    while start.elapsed() < limit && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut screen = "(QEMU ended)".to_owned();
    if let Ok(mut m) = std::os::unix::net::UnixStream::connect(&monitor) {
        use std::io::Write;
        let _ = writeln!(m, "screendump {}", dump.display());
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(bytes) = std::fs::read(&dump) {
            let header: Vec<String> =
                String::from_utf8_lossy(&bytes[..bytes.len().min(20)]).split_whitespace().map(str::to_owned).collect();
            screen = format!(
                "{}x{} screen",
                header.get(1).cloned().unwrap_or_default(),
                header.get(2).cloned().unwrap_or_default()
            );
        }
    }
    // QEMU stops a VM whose instruction KVM cannot emulate but keeps running: say so.
    let err = text(&std::fs::read(dir.path("qemu.err")).unwrap_or_default());
    if let Some(line) = err.lines().find(|l| l.contains("KVM internal error") || l.contains("emulation failure")) {
        screen = format!("{screen}; QEMU stopped the VM: {line}");
    }
    let _ = child.kill();
    let _ = child.wait();
    IsoRun { firmware: last_boot_line(&log), reached: Vec::new(), screen, seconds: start.elapsed().as_secs_f64() }
}

fn check_iso(label: &str, file: &str, milestones: &[&str]) {
    let iso = cache().join(file);
    assert!(iso.exists(), "{} missing: run ./x fetch-guests", iso.display());
    let limit = Duration::from_secs(120);
    let ours = iso_on_porthole(label, &iso, milestones, limit);
    println!(
        "REAL-GUEST {label} porthole-vmm: after {:.0} s: firmware {:?}; reached {:?} of {milestones:?}; screen {}",
        ours.seconds, ours.firmware, ours.reached, ours.screen
    );
    let qemu = iso_on_qemu(&format!("{label}-qemu"), &iso, limit);
    println!(
        "REAL-GUEST {label} QEMU -M pc (same bios.bin, virtio-scsi CD): after {:.0} s: firmware {:?}; {}",
        qemu.seconds, qemu.firmware, qemu.screen
    );
    assert!(ours.firmware.starts_with("Booting from"), "the firmware booted the CD: {:?}", ours.firmware);
    if porthole_tests::hw::host_has_hardware_virtualization() {
        assert_eq!(
            ours.reached.len(),
            milestones.len(),
            "{label} must reach its first screen on hardware virtualization"
        );
    } else {
        println!("REAL-GUEST {label}: no VT-x/AMD-V here (nested PVM KVM): recorded, not required to pass");
    }
}

/// memtest86+'s ISO (El Torito) on SeaBIOS: its first screen.
#[test]
#[ignore = "real-guest tier: run with ./x test-real"]
fn memtest86plus_iso_reaches_its_first_screen() {
    check_iso("memtest-iso", "memtest86+x64.iso", &["Memtest86+"]);
}

/// The Debian installer (an ISO assembled from debian-installer-12-netboot-amd64 with ISOLINUX): the
/// installer's first screen.
#[test]
#[ignore = "real-guest tier: run with ./x test-real"]
fn debian_installer_iso_reaches_its_first_screen() {
    check_iso("debian-installer-iso", "debian-installer.iso", &["ISOLINUX", "Select a language"]);
}

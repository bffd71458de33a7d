//! Firmware boot on porthole-vmm: Debian's SeaBIOS at the reset vector with the stdvga display (and the
//! virtio one), fw_cfg,
//! the debug console and virtio-scsi CD/DVD drives. Checked on the RFB console (glyph by glyph) and in the
//! firmware's debug log.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use porthole_tests::rfb::RfbClient;
use porthole_tests::{Scratch, screen_text, workspace_bin};

const LIMIT: Duration = Duration::from_secs(120);

/// SeaBIOS from the system (Debian's seabios package, installed by `./x test`).
fn seabios() -> PathBuf {
    vmm_core::config::find_seabios().expect("SeaBIOS (apt-get install seabios): /usr/share/seabios/bios.bin")
}

struct FirmwareVm {
    child: Child,
    log: PathBuf,
    vnc: PathBuf,
}

impl Drop for FirmwareVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FirmwareVm {
    fn start(dir: &Scratch, name: &str, extra: &[&str]) -> FirmwareVm {
        let (log, vnc, serial) =
            (dir.path(&format!("{name}.log")), dir.path(&format!("{name}.sock")), dir.path(&format!("{name}.serial")));
        let child = Command::new(workspace_bin("porthole-vmm"))
            .arg("--firmware")
            .arg(seabios())
            .arg("--firmware-log")
            .arg(&log)
            .args(["--memory", "64", "--serial"])
            .arg(format!("file:{}", serial.display()))
            .arg("--vnc")
            .arg(format!("unix:{}", vnc.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start porthole-vmm");
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&vnc).is_err() {
            assert!(start.elapsed() < LIMIT, "porthole-vmm never served its console");
            std::thread::sleep(Duration::from_millis(20));
        }
        FirmwareVm { child, log, vnc }
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn wait_log(&mut self, marker: &str) {
        let start = Instant::now();
        while !self.log_text().contains(marker) {
            assert!(self.child.try_wait().unwrap().is_none(), "porthole-vmm exited; log:\n{}", self.log_text());
            assert!(start.elapsed() < LIMIT, "no {marker:?} in the firmware log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The text screen as an RFB client sees it.
    fn screen(&self) -> Vec<String> {
        let mut c = RfbClient::connect(&self.vnc, None).unwrap();
        c.set_encodings(&[porthole_tests::rfb::RAW]).unwrap();
        c.full_frame().unwrap();
        screen_text(&c.pixels, c.width, c.height)
    }

    fn wait_screen(&mut self, what: &str, cond: impl Fn(&[String]) -> bool) -> Vec<String> {
        let start = Instant::now();
        loop {
            let screen = self.screen();
            if cond(&screen) {
                return screen;
            }
            assert!(start.elapsed() < LIMIT, "waiting for {what} on the console:\n{}", screen.join("\n"));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn seabios_shows_its_banner_on_the_console_and_logs_its_boot() {
    let dir = Scratch::new("fw-banner");
    let mut vm = FirmwareVm::start(&dir, "empty", &[]);
    vm.wait_log("No bootable device");
    let log = vm.log_text();
    for line in [
        "SeaBIOS (version",
        "Running on QEMU (i440fx)",
        "Found QEMU fw_cfg",
        "QEMU fw_cfg DMA interface supported",
        "qemu/e820: addr 0x0000000000000000 len 0x0000000004000000 [RAM]",
        "id=1234:1111",
        "VBE DISPI: bdf",
    ] {
        assert!(log.contains(line), "{line:?} missing from the firmware log:\n{log}");
    }
    let screen = vm.wait_screen("the banner", |s| s.iter().any(|l| l.contains("No bootable device")));
    assert!(screen[0].starts_with("SeaBIOS (version 1."), "the banner on the first row:\n{}", screen.join("\n"));
}

/// The virtio display (`--vga virtio`): SeaBIOS finds the virtio-vga function (1af4:1050), runs its VGA BIOS
/// (`vgabios-virtio.bin`, from fw_cfg's `pci1af4,1050.rom`), which drives the Bochs VBE registers, and the
/// banner shows on the console as with the std VGA.
#[test]
fn seabios_shows_its_banner_on_the_virtio_display() {
    let dir = Scratch::new("fw-virtio-vga");
    let mut vm = FirmwareVm::start(&dir, "empty", &["--vga", "virtio"]);
    vm.wait_log("No bootable device");
    let log = vm.log_text();
    for line in ["id=1af4:1050", "VBE DISPI: bdf"] {
        assert!(log.contains(line), "{line:?} missing from the firmware log:\n{log}");
    }
    assert!(!log.contains("id=1234:1111"), "no std VGA beside it:\n{log}");
    let screen = vm.wait_screen("the banner", |s| s.iter().any(|l| l.contains("No bootable device")));
    assert!(screen[0].starts_with("SeaBIOS (version 1."), "the banner on the first row:\n{}", screen.join("\n"));
}

/// Builds an ISO with the repository's script: `kind` is grub (GRUB booting `guest` by multiboot), plain (no
/// El Torito boot record) or truncated (a GRUB ISO cut to its first 64 KiB).
fn make_iso(dir: &Scratch, kind: &str, guest: Option<&str>) -> PathBuf {
    let iso = dir.path(&format!("{kind}.iso"));
    let mut cmd = Command::new("bash");
    cmd.arg(porthole_tests::repo_root().join("tests/guests/iso/make-iso.sh")).arg(kind).arg(&iso);
    if let Some(g) = guest {
        cmd.arg(porthole_guests::path(g));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "make-iso.sh {kind}: {}", String::from_utf8_lossy(&out.stderr));
    iso
}

/// A truncated ISO, one without El Torito and a 0-byte file: the firmware says it cannot boot them, on the
/// console and in its log, and the VMM keeps running (the guest is not the VMM's problem).
#[test]
fn broken_isos_end_in_no_bootable_device() {
    let dir = Scratch::new("fw-broken");
    let empty = dir.path("empty.iso");
    std::fs::write(&empty, b"").unwrap();
    let isos = [make_iso(&dir, "truncated", None), make_iso(&dir, "plain", None), empty];
    let mut vms: Vec<FirmwareVm> = isos
        .iter()
        .enumerate()
        .map(|(i, iso)| FirmwareVm::start(&dir, &format!("broken{i}"), &["--cdrom", &iso.display().to_string()]))
        .collect();
    for (vm, iso) in vms.iter_mut().zip(&isos) {
        vm.wait_log("No bootable device");
        let log = vm.log_text();
        assert!(log.contains("Booting from DVD/CD..."), "{iso:?}: the CD was tried:\n{log}");
        assert!(log.contains("Boot failed: Could not read from CDROM"), "{iso:?}:\n{log}");
        let screen = vm.wait_screen("no bootable device", |s| s.iter().any(|l| l.starts_with("No bootable device.")));
        assert!(
            screen.iter().any(|l| l.starts_with("Boot failed: Could not read from CDROM")),
            "{}",
            screen.join("\n")
        );
        assert!(vm.child.try_wait().unwrap().is_none(), "porthole-vmm keeps running");
    }
}

/// With the boot menu on, Esc on the console opens it and it lists the CD/DVD drive.
#[test]
fn the_boot_menu_lists_the_cd_drive() {
    let dir = Scratch::new("fw-menu");
    let iso = make_iso(&dir, "plain", None);
    let mut vm = FirmwareVm::start(&dir, "menu", &["--boot-menu", "--cdrom", &iso.display().to_string()]);
    vm.wait_screen("the boot menu prompt", |s| s.iter().any(|l| l.contains("Press ESC for boot menu")));
    let mut c = RfbClient::connect(&vm.vnc, None).unwrap();
    c.key(0xFF1B, true).unwrap();
    c.key(0xFF1B, false).unwrap();
    // SeaBIOS prints the menu a character at a time: waiting for its title alone read a half-printed entry
    // ("1?") once. The first entry must come, whole, as the CD drive (or the wait fails with the screen).
    let screen = vm.wait_screen("the CD drive as the boot menu's first entry", |s| {
        s.iter().any(|l| l.contains("Select boot device"))
            && s.iter().any(|l| l.starts_with("1. DVD/CD [virtio-scsi") && l.contains("PORTHOLE VIRTUAL DVD-ROM"))
    });
    assert!(screen.iter().any(|l| l.contains("Select boot device")), "{}", screen.join("\n"));
}

/// The slow tier: SeaBIOS boots a GRUB ISO from the virtio-scsi CD and GRUB loads the `acpi-button`
/// micro-guest (Multiboot2), which finds the ACPI tables SeaBIOS installed from fw_cfg (through GRUB's RSDP
/// tag), enables the power button and prints its marker; the control socket's `stop` presses the button and
/// the guest powers off through the tables' PM1a control block. Real mode and GRUB's unpaged code are
/// emulated instruction by instruction on nested PVM KVM, so this takes about 30 s there.
#[test]
#[ignore = "slow tier (real mode under emulation): run with ./x test-real"]
fn grub_from_an_iso_boots_a_guest_that_powers_off_through_acpi() {
    let dir = Scratch::new("fw-grub");
    let iso = make_iso(&dir, "grub", Some("acpi-button"));
    let serial = dir.path("grub.serial");
    let control = dir.path("control.sock");
    let mut vm = FirmwareVm::start(
        &dir,
        "grub",
        &["--cdrom", &iso.display().to_string(), "--control", &format!("unix:{}", control.display())],
    );
    let start = Instant::now();
    vm.wait_log("Booting from DVD/CD...");
    let to_cd = start.elapsed();
    let serial_text = || String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !serial_text().contains("PORTHOLE-ACPI-READY") {
        assert!(Instant::now() < deadline, "no marker; screen:\n{}", vm.screen().join("\n"));
        assert!(vm.child.try_wait().unwrap().is_none(), "porthole-vmm ended; serial:\n{}", serial_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let to_marker = start.elapsed();
    let mut c = vmm_core::control::ControlClient::connect(&control).unwrap();
    let answer = c.request(&vmm_core::control::Request::Stop).unwrap();
    assert_eq!(answer.acpi_power_button_enabled, Some(true), "the guest enabled the power button: {answer:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = vm.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the guest did not power off; serial:\n{}", serial_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "powered off by the guest (ACPI S5); serial:\n{}", serial_text());
    assert!(serial_text().contains("PORTHOLE-ACPI-POWER-BUTTON"));
    println!("REAL-GUEST grub-iso: CD boot after {to_cd:?}, guest ready after {to_marker:?}, ACPI power-off");
}

//! Firmware boot on porthole-vmm: Debian's SeaBIOS at the reset vector with the stdvga display, fw_cfg,
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

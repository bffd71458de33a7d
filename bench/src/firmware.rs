//! Firmware boot: process start (the reset vector a moment later) → SeaBIOS's "Booting from DVD/CD" in its
//! debug log, and → the `hello` micro-guest's marker on COM1 after GRUB (from a BIOS-bootable ISO built
//! with grub-mkrescue) loaded it. porthole-vmm and QEMU (`-M pc`, the same bios.bin, the same ISO on a
//! virtio-scsi CD-ROM, stdvga) in the same run; medians of RUNS; ratio Porthole / QEMU.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const CD_BOOT: &str = "Booting from DVD/CD";
const MARKER: &str = "PORTHOLE-GUEST-OK";
const LIMIT: Duration = Duration::from_secs(300);

/// Builds the GRUB ISO for the `hello` guest with the repository's script.
pub fn grub_iso(dir: &Path) -> anyhow::Result<PathBuf> {
    let iso = dir.join("grub-hello.iso");
    let script = porthole_tests::repo_root().join("tests/guests/iso/make-iso.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("grub")
        .arg(&iso)
        .arg(porthole_guests::path("hello"))
        .output()
        .context("run make-iso.sh")?;
    if !out.status.success() {
        bail!("make-iso.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(iso)
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// One boot: (seconds to CD boot, seconds to the marker).
fn boot(qemu: bool, iso: &Path, dir: &Path, bios: &Path) -> anyhow::Result<(f64, f64)> {
    let (log, serial) = (dir.join("bios.log"), dir.join("serial.log"));
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&serial);
    let mut cmd = if qemu {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-M", "pc", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "64", "-vga", "std"])
            .args(["-display", "none", "-nodefaults", "-no-reboot", "-bios"])
            .arg(bios)
            .args(["-device", "virtio-scsi-pci,disable-legacy=on", "-device", "scsi-cd,drive=cd0", "-drive"])
            .arg(format!("if=none,id=cd0,media=cdrom,readonly=on,file={}", iso.display()))
            .arg("-debugcon")
            .arg(format!("file:{}", log.display()))
            .args(["-global", "isa-debugcon.iobase=0x402", "-serial"])
            .arg(format!("file:{}", serial.display()));
        c
    } else {
        let mut c = Command::new(crate::sibling("porthole-vmm")?);
        c.arg("--firmware").arg(bios).arg("--firmware-log").arg(&log).arg("--cdrom").arg(iso);
        c.args(["--memory", "64", "--serial"]).arg(format!("file:{}", serial.display()));
        c
    };
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let mut cd = None;
    let result = loop {
        if cd.is_none() && read(&log).contains(CD_BOOT) {
            cd = Some(start.elapsed().as_secs_f64());
        }
        if read(&serial).contains(MARKER) {
            break Ok((cd.unwrap_or(f64::NAN), start.elapsed().as_secs_f64()));
        }
        if start.elapsed() > LIMIT || child.try_wait()?.is_some() {
            break Err(anyhow::anyhow!(
                "{}: no {MARKER} within {LIMIT:?}; firmware log tail:\n{}",
                if qemu { "QEMU" } else { "porthole-vmm" },
                read(&log).lines().rev().take(8).collect::<Vec<_>>().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(runs: usize) -> anyhow::Result<()> {
    let bios = vmm_core::config::find_seabios().context("SeaBIOS (apt-get install seabios)")?;
    let dir = std::env::temp_dir().join(format!("porthole-bench-firmware-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let iso = grub_iso(&dir)?;
    println!("firmware: SeaBIOS {} → GRUB ISO on a virtio-scsi CD → hello (Multiboot2), 64 MiB", bios.display());
    let mut rows = Vec::new();
    for qemu in [false, true] {
        let mut cd = Vec::new();
        let mut marker = Vec::new();
        for _ in 0..runs {
            let (c, m) = boot(qemu, &iso, &dir, &bios)?;
            cd.push(c);
            marker.push(m);
        }
        rows.push((median(cd), median(marker)));
    }
    let (p, q) = (rows[0], rows[1]);
    println!("  {:<40} {:>10} {:>10} {:>7}", "", "Porthole", "QEMU", "ratio");
    println!("  {:<40} {:>9.2}s {:>9.2}s {:>7.2}", "start → \"Booting from DVD/CD\"", p.0, q.0, p.0 / q.0);
    println!("  {:<40} {:>9.2}s {:>9.2}s {:>7.2}", "start → marker (GRUB loaded the guest)", p.1, q.1, p.1 / q.1);
    println!("  (medians of {runs} runs; goal ≤ 1.0× QEMU)");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

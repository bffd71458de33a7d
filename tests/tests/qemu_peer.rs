//! The micro-guests boot under QEMU (Debian's qemu-system-x86 with KVM) exactly as under porthole-vmm:
//! proof that the guest toolchain builds correct PVH ELF files independently of our engine.

use std::time::Duration;

use porthole_tests::{qemu, qemu_tcg, run, text};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn hello_boots_under_qemu_microvm() {
    let out = run(&mut qemu("microvm", &porthole_guests::path("hello"), 1), LIMIT);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("PORTHOLE-GUEST-OK"), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    // isa-debug-exit: QEMU exits with (0 << 1) | 1.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

#[test]
fn hello_and_smp_boot_under_qemu_pc() {
    let out = run(&mut qemu("pc", &porthole_guests::path("hello"), 1), LIMIT);
    assert!(text(&out.stdout).contains("PORTHOLE-GUEST-OK"), "{}", text(&out.stderr));
    // SeaBIOS programs ACPI PM at 0x600, so the guest's S5 write powers QEMU off cleanly.
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = run(&mut qemu("pc", &porthole_guests::path("smp"), 2), LIMIT);
    let stdout = text(&out.stdout);
    for line in ["PORTHOLE-CPU apic=0", "PORTHOLE-CPU apic=1", "PORTHOLE-SMP-OK cpus=2"] {
        assert!(stdout.contains(line), "{line} missing:\n{stdout}");
    }
}

/// The virtio-blk micro-guest against QEMU's own virtio-blk-pci (modern only): the same driver, the same
/// image, the same answers as on porthole-vmm (vmm-core/tests/storage.rs) — so the guest tests a real
/// virtio implementation, not just ours.
#[test]
fn the_virtio_blk_guest_drives_qemus_virtio_blk_pci() {
    let dir = porthole_tests::Scratch::new("qemu-blk");
    let image = dir.path("d0.img");
    let bytes: Vec<u8> = (0..64 * 512).map(|i: usize| (i * 13 + i / 512) as u8).collect();
    std::fs::write(&image, &bytes).unwrap();
    let fnv = |b: &[u8]| {
        let h = b.iter().fold(0x811c_9dc5u32, |h, &x| (h ^ u32::from(x)).wrapping_mul(0x0100_0193));
        format!("{h:08x}")
    };
    let mut cmd = qemu("pc", &porthole_guests::path("virtio-blk"), 1);
    cmd.args(["-append", "id read=0,1 write=1,2,9 flush irq-read=0"])
        .arg("-drive")
        .arg(format!("if=none,id=d0,file={},format=raw", image.display()))
        .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on,serial=QEMU-D0"]);
    let out = run(&mut cmd, LIMIT);
    let stdout = text(&out.stdout);
    let sum = fnv(&bytes[..512]);
    for line in [
        "BLK found=1".to_owned(),
        "BLK id disk=0 status=0 id=QEMU-D0".into(),
        format!("BLK read disk=0 sector=0 count=1 status=0 sum={sum}"),
        "BLK write disk=0 sector=1 count=2 status=0".into(),
        "BLK flush disk=0 status=0".into(),
        format!("status=0 interrupts=1 spurious=0 sum={sum}"),
        "BLK done".into(),
    ] {
        assert!(stdout.contains(&line), "{line} missing:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    }
    let after = std::fs::read(&image).unwrap();
    let expected: Vec<u8> = (1..3).flat_map(|s: usize| (0..512).map(move |j| ((s * 7 + j + 9) & 0xFF) as u8)).collect();
    assert_eq!(after[512..3 * 512], expected[..]);
}

/// The special guests that test porthole-vmm's kernel loaders (an ELF32 PVH kernel, a Multiboot 1 ELF32
/// kernel, a kernel that `call`s before it has a stack) boot under QEMU's own loaders too, under TCG so
/// that the check does not depend on this host's KVM.
#[test]
fn loader_guests_boot_under_qemu_pc_tcg() {
    for (name, marker) in
        [("pvh32", "PORTHOLE-PVH32-OK\n"), ("multiboot1", "PORTHOLE-MB1-OK\n"), ("nostack", "PORTHOLE-NOSTACK-OK\n")]
    {
        let out = run(&mut qemu_tcg("pc", &porthole_guests::path(name), 1), LIMIT);
        assert_eq!(text(&out.stdout), marker, "{name}: {}", text(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
    }
}

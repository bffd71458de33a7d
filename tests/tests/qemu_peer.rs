//! The micro-guests boot under QEMU (Debian's qemu-system-x86 with KVM) exactly as under porthole-vmm:
//! proof that the guest toolchain builds correct PVH ELF files independently of our engine.

use std::time::Duration;

use porthole_tests::{qemu, run, text};

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

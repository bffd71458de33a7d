//! The micro-guests this machine's KVM cannot run (ring3: `int n` and an iretq to ring 3; xsave: FNINIT and
//! XRSTOR) and smp's work on four CPUs, under QEMU's software emulation (TCG, `-cpu max`), on both machine
//! types: proof that the guests themselves are right before the hardware-virtualization tier runs them on
//! porthole-vmm (nested KVM). No test boots them on this KVM.

use std::process::Output;
use std::time::Duration;

use porthole_tests::{qemu_tcg, run, text};

/// Generous: TCG on a shared two-core machine. Each guest takes well under a second when the box is idle.
const LIMIT: Duration = Duration::from_secs(180);

/// Boots `guest` on `cpus` CPUs of QEMU's `machine` with TCG; checks the clean power-off (ACPI S5 on pc,
/// the debug-exit device's status 1 on microvm) and that no FAIL marker or stray exception was printed.
fn boot(guest: &str, machine: &str, cpus: u32) -> String {
    let out: Output = run(&mut qemu_tcg(machine, &porthole_guests::path(guest), cpus), LIMIT);
    let stdout = text(&out.stdout);
    let expected_status = if machine == "microvm" { 1 } else { 0 };
    assert_eq!(
        out.status.code(),
        Some(expected_status),
        "{guest} on {machine}: exit status\nstdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(!stdout.contains("-FAIL"), "{guest} on {machine}:\n{stdout}");
    assert!(!stdout.contains(porthole_guests::EXCEPTION_MARKER), "{guest} on {machine}:\n{stdout}");
    stdout
}

#[test]
fn ring3_enters_user_mode_and_comes_back_through_syscall_int80_and_a_page_fault() {
    for machine in ["pc", "microvm"] {
        let stdout = boot("ring3", machine, 1);
        let ok = "PORTHOLE-RING3-OK user-cpl=3 syscall-cpl=0 int80-cpl=0 int80-from=3 sum=333833500 pf=ok\n";
        assert!(stdout.contains(ok), "ring3 on {machine}:\n{stdout}");
    }
}

#[test]
fn xsave_keeps_x87_sse_and_avx_state_directly_and_across_timer_switches() {
    for machine in ["pc", "microvm"] {
        let stdout = boot("xsave", machine, 1);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("PORTHOLE-XSAVE-OK x87 sse"))
            .unwrap_or_else(|| panic!("xsave on {machine}:\n{stdout}"));
        assert!(line.contains(" switches=32 "), "xsave on {machine}: {line}");
        // QEMU's TCG `-cpu max` has AVX (since 7.2): the upper YMM halves must be part of the check.
        assert!(line.contains(" avx xcr0=0x7 "), "xsave on {machine} used no AVX: {line}\n{stdout}");
    }
}

#[test]
fn smp_work_and_lock_xadd_contest_on_four_cpus() {
    for machine in ["pc", "microvm"] {
        let stdout = boot("smp", machine, 4);
        for id in 0..4 {
            assert!(stdout.contains(&format!("PORTHOLE-CPU apic={id}\n")), "smp on {machine}:\n{stdout}");
        }
        for line in ["PORTHOLE-SMP-WORK sums=4 counter=20000\n", "PORTHOLE-SMP-OK cpus=4\n"] {
            assert!(stdout.contains(line), "{line:?} missing, smp on {machine}:\n{stdout}");
        }
    }
}

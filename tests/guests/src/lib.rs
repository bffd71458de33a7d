//! Porthole's micro-guests, built from `asm/` by this crate's build script.
//!
//! Each guest is a PVH ELF file (the special guests from `asm/special/`, which test the kernel loaders, are
//! ELF32 PVH, Multiboot 1 or Multiboot2 files; QEMU has no Multiboot2 loader): `porthole-vmm --kernel FILE`
//! and `qemu-system-x86_64 -kernel FILE` boot the very same file. It is also a Multiboot2 kernel, so GRUB's `multiboot2 FILE [ARGS]` boots it too
//! (`iso/make-iso.sh grub` puts one on a BIOS-bootable CD). Guests are small and, but for `ring3`, ring-0 only,
//! because a nested (PVM) KVM emulates every guest instruction (see ARCHITECTURE.md). `ring3` and `xsave` use what
//! that KVM cannot emulate (`int n`, iretq to ring 3, FNINIT, XRSTOR): they are for hardware virtualization and
//! QEMU's TCG only, and no test boots every guest of this table on one engine.

use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// Every guest, as (name, path of its ELF file).
pub fn all() -> impl Iterator<Item = (&'static str, PathBuf)> {
    GUESTS.iter().map(|(name, path)| (*name, PathBuf::from(path)))
}

/// The ELF file of the guest `name` (the stem of `asm/NAME.S`).
///
/// # Panics
/// If there is no such guest: a test naming a missing guest is a bug in the test.
pub fn path(name: &str) -> PathBuf {
    GUESTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| PathBuf::from(p))
        .unwrap_or_else(|| panic!("no micro-guest named {name:?}; the guests are {:?}", names()))
}

/// The names of every guest.
pub fn names() -> Vec<&'static str> {
    GUESTS.iter().map(|(n, _)| *n).collect()
}

/// The marker a guest prints when an exception reaches the start-up stub's IDT.
pub const EXCEPTION_MARKER: &str = "PORTHOLE-GUEST-EXCEPTION";

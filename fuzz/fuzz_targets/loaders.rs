//! The kernel loaders (`vmm_core::boot::load`), on whatever file a user points `--kernel` at: ELF64 and ELF32
//! with or without a PVH note (program headers, segments, notes), a Linux bzImage (setup header, protocol
//! version, 64-bit entry), Multiboot 1 and Multiboot2 headers (their address fields or ELF segments), with an
//! initrd of several sizes, in guest RAM of several sizes. `data[0]` picks the RAM (bits 0-1: 4, 8, 16 or 32
//! MiB) and the initrd (bits 2-3: none, 1 byte, 4 KiB, 1 MiB + 1); `data[1..]` is the kernel file.
#![no_main]

use std::fs::File;
use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_core::boot::{self, BootFiles, LinearFramebuffer};

/// An anonymous in-memory file holding `bytes`.
fn memfd(bytes: &[u8]) -> Option<File> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"porthole-fuzz-boot".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just returned to us alone.
    let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(bytes).ok()?;
    Some(file)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, kernel)) = data.split_first() else { return };
    let mem_bytes = [4u64, 8, 16, 32][usize::from(pick & 3)] << 20;
    let initrd_len = [0usize, 1, 4096, (1 << 20) + 1][usize::from((pick >> 2) & 3)];
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_bytes as usize)]) else { return };
    let Ok(rsdp) = vmm_core::acpi::write_tables(&mem, vmm_core::acpi::Cpus::new(1, 1)) else { return };
    let Some(kernel) = memfd(kernel) else { return };
    let initrd = if initrd_len > 0 { memfd(&vec![0xa5; initrd_len]) } else { None };
    let fb = LinearFramebuffer {
        base: vmm_core::display::LFB_BASE,
        size: vmm_core::display::VRAM_BYTES,
        width: 1024,
        height: 768,
    };
    let mut files = BootFiles { kernel, initrd, cmdline: "console=ttyS0 panic=-1".into() };
    let _ = boot::load(&mem, &mut files, mem_bytes, rsdp, Some(fb));
});

//! Guest physical address map of a Porthole VM (x86-64, PC-compatible).
//!
//! ```text
//! 0x0000_0000  RAM (real-mode area; boot structures below)         usable up to 0x9_FC00
//! 0x0007_0000    boot stack (PVH and Multiboot entries; %esp = 0x8_0000)
//! 0x0009_FC00  EBDA / VGA / BIOS area                               reserved
//! 0x000E_0000    ACPI tables (RSDP and the tables it points to)
//! 0x0010_0000  RAM: the kernel is loaded here                        usable
//! 0xC000_0000  MMIO hole (PCI, framebuffer, IOAPIC, LAPIC)           not RAM
//! 0x1_0000_0000 RAM above 4 GiB, for guests larger than 3 GiB        usable
//! ```

/// Physical address of the boot GDT written for PVH and Linux 64-bit entry.
pub const BOOT_GDT: u64 = 0x500;
/// Physical address of the (empty) boot IDT.
pub const BOOT_IDT: u64 = 0x520;
/// Multiboot 1 or Multiboot2 boot information (with its memory map and strings), up to `PVH_START_INFO`.
pub const MULTIBOOT_INFO: u64 = 0x1000;
pub const MULTIBOOT_INFO_MAX: usize = 0x5000;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP: u64 = 0x6080;
/// Maximum number of memory map entries we write.
pub const MEMMAP_MAX_ENTRIES: usize = 32;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Identity page tables for the Linux 64-bit entry: PML4, PDPT and one page directory per GiB (4).
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xA000;
pub const PD: u64 = 0xB000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Largest command line we accept, including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// The stack a PVH or Multiboot kernel starts on: usable low RAM that no boot structure overlaps and no
/// kernel segment may (segments load at 1 MiB or above). The protocols leave %esp undefined; QEMU's loaders
/// leave a usable stack behind, and kernels that `call` before setting their own rely on it.
pub const BOOT_STACK_BOTTOM: u64 = 0x7_0000;
pub const BOOT_STACK_TOP: u64 = 0x8_0000;
/// End of usable low memory; the EBDA and the legacy areas above it are reserved.
pub const EBDA_START: u64 = 0x9_FC00;
/// ACPI tables region (inside the reserved BIOS area, where Linux scans for the RSDP).
pub const ACPI_START: u64 = 0xE_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where high RAM and the kernel start.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM beyond this point is placed above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Where RAM continues above the hole.
pub const RAM_ABOVE_4G: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Local APIC MMIO base.
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
/// KVM needs three pages in the hole for its TSS and one for the identity map (Intel).
pub const KVM_TSS: u64 = 0xFFFB_D000;
pub const KVM_IDENTITY_MAP: u64 = 0xFFFB_C000;
/// Where the initrd is placed: as high as possible below this address (and below the end of low RAM).
pub const INITRD_MAX_END: u64 = 0x3800_0000;

/// The RAM regions of a guest with `mem_bytes` of memory: (guest address, size).
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_HOLE_START), (RAM_ABOVE_4G, mem_bytes - MMIO_HOLE_START)]
    }
}

/// One entry of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// e820 entry types, numbered as the BIOS interface numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// The e820 map of a guest with `mem_bytes` of memory.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820Kind::Ram },
        E820Entry { addr: EBDA_START, size: HIGH_RAM_START - EBDA_START, kind: E820Kind::Reserved },
    ];
    for (start, size) in ram_regions(mem_bytes) {
        let start = start.max(HIGH_RAM_START);
        let end = if start >= RAM_ABOVE_4G { start + size } else { size.min(MMIO_HOLE_START) };
        if end > start {
            map.push(E820Entry { addr: start, size: end - start, kind: E820Kind::Ram });
        }
    }
    // The IOAPIC..top of 4 GiB range holds the APICs and KVM's private pages: tell the guest it is taken.
    map.push(E820Entry { addr: IOAPIC_BASE, size: RAM_ABOVE_4G - IOAPIC_BASE, kind: E820Kind::Reserved });
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_a_reserved_bios_area() {
        assert_eq!(ram_regions(64 << 20), vec![(0, 64 << 20)]);
        let map = e820_map(64 << 20);
        assert_eq!(map[0], E820Entry { addr: 0, size: EBDA_START, kind: E820Kind::Ram });
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(map[2], E820Entry { addr: HIGH_RAM_START, size: (64 << 20) - HIGH_RAM_START, kind: E820Kind::Ram });
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let mem = 5u64 << 30;
        assert_eq!(ram_regions(mem), vec![(0, MMIO_HOLE_START), (RAM_ABOVE_4G, mem - MMIO_HOLE_START)]);
        let map = e820_map(mem);
        let usable: u64 = map.iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
        assert_eq!(usable, mem - (HIGH_RAM_START - EBDA_START));
        assert!(map.iter().any(|e| e.addr == RAM_ABOVE_4G && e.kind == E820Kind::Ram));
        // No overlaps.
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{pair:?}");
        }
    }

    #[test]
    fn boot_structures_and_the_boot_stack_do_not_overlap() {
        let regions = [
            ("GDT", BOOT_GDT, 32),
            ("IDT", BOOT_IDT, 8),
            ("Multiboot information", MULTIBOOT_INFO, MULTIBOOT_INFO_MAX as u64),
            (
                "PVH start info, modules and memory map",
                PVH_START_INFO,
                PVH_MEMMAP + 24 * MEMMAP_MAX_ENTRIES as u64 - PVH_START_INFO,
            ),
            ("zero page", ZERO_PAGE, 0x1000),
            ("page tables", PML4, PD + 4 * 0x1000 - PML4),
            ("command line", CMDLINE, CMDLINE_MAX as u64),
            ("boot stack", BOOT_STACK_BOTTOM, BOOT_STACK_TOP - BOOT_STACK_BOTTOM),
            ("ACPI tables", ACPI_START, ACPI_END - ACPI_START),
        ];
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                assert!(a.1 + a.2 <= b.1 || b.1 + b.2 <= a.1, "{} overlaps {}", a.0, b.0);
            }
        }
        // The stack is usable RAM below where kernels load.
        let map = e820_map(64 << 20);
        assert!(
            map.iter()
                .any(|e| e.kind == E820Kind::Ram && e.addr <= BOOT_STACK_BOTTOM && BOOT_STACK_TOP <= e.addr + e.size)
        );
        assert!(BOOT_STACK_TOP <= HIGH_RAM_START && BOOT_STACK_TOP.is_multiple_of(16));
    }
}

//! Multiboot 1 (specification 0.6.96) and Multiboot2 (2.0): finding the header in a kernel file and building
//! the boot information structure the kernel finds in %ebx.

use super::BootError;
use crate::layout::{self, E820Entry};

/// %eax at a Multiboot 1 entry.
pub const MB1_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// %eax at a Multiboot2 entry.
pub const MB2_BOOTLOADER_MAGIC: u32 = 0x36D7_6289;
const MB1_HEADER_MAGIC: u32 = 0x1BAD_B002;
const MB2_HEADER_MAGIC: u32 = 0xE852_50D6;
/// Multiboot 1 looks in the first 8 KiB, 4-byte aligned; Multiboot2 in the first 32 KiB, 8-byte aligned.
const MB1_SEARCH: usize = 8192;
pub const MB2_SEARCH: usize = 32768;

/// Multiboot 1 header flags: bits 0-15 are requirements, bits 16-31 optional.
const MB1_PAGE_ALIGN: u32 = 1 << 0;
const MB1_MEMORY_INFO: u32 = 1 << 1;
const MB1_VIDEO_MODE: u32 = 1 << 2;
const MB1_AOUT_KLUDGE: u32 = 1 << 16;

/// The name the kernel is told (Multiboot `boot_loader_name`).
pub const LOADER_NAME: &str = "porthole-vmm";
/// The string of the one module, the initrd.
pub const MODULE_STRING: &str = "initrd";

/// Where a kernel without (or overriding) ELF segments is loaded from: the Multiboot 1 header's address
/// fields (flag 16, the "a.out kludge") or the Multiboot2 address tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadAddresses {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
}

/// A Multiboot header found in a kernel file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    /// File offset of the header.
    pub offset: u64,
    pub addresses: Option<LoadAddresses>,
    /// The entry address the header gives (Multiboot 1 with flag 16, or the Multiboot2 entry address tag).
    pub entry: Option<u32>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn bad(msg: impl Into<String>) -> BootError {
    BootError::BadMultiboot(msg.into())
}

/// Looks for a Multiboot 1 header, then a Multiboot2 header, in `head` (the file's first bytes).
/// Multiboot 1 wins when a file has both, as with QEMU's `-kernel`.
pub fn find(head: &[u8]) -> Result<Option<Header>, BootError> {
    if let Some(h) = find_mb1(head)? {
        return Ok(Some(h));
    }
    find_mb2(head)
}

fn find_mb1(head: &[u8]) -> Result<Option<Header>, BootError> {
    let limit = head.len().min(MB1_SEARCH);
    let mut at = 0;
    while at + 12 <= limit {
        let (magic, flags, sum) = (u32_at(head, at), u32_at(head, at + 4), u32_at(head, at + 8));
        if magic == MB1_HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0 {
            let unknown = flags & 0xFFFF & !(MB1_PAGE_ALIGN | MB1_MEMORY_INFO | MB1_VIDEO_MODE);
            if unknown != 0 {
                return Err(bad(format!("the Multiboot header requires features {unknown:#x} this loader lacks")));
            }
            // MB1_VIDEO_MODE asks for a video mode; like QEMU we boot without one (no VBE information).
            let mut header = Header { version: 1, offset: at as u64, addresses: None, entry: None };
            if flags & MB1_AOUT_KLUDGE != 0 {
                if at + 32 > head.len() {
                    return Err(bad("the Multiboot header's address fields run past the end of the file"));
                }
                header.addresses = Some(LoadAddresses {
                    header_addr: u32_at(head, at + 12),
                    load_addr: u32_at(head, at + 16),
                    load_end_addr: u32_at(head, at + 20),
                    bss_end_addr: u32_at(head, at + 24),
                });
                header.entry = Some(u32_at(head, at + 28));
            }
            return Ok(Some(header));
        }
        at += 4;
    }
    Ok(None)
}

/// Multiboot2 information request types we can neither provide nor ignore: the EFI ones.
const MB2_EFI_TAGS: [u32; 6] = [11, 12, 17, 18, 19, 20];

fn find_mb2(head: &[u8]) -> Result<Option<Header>, BootError> {
    let limit = head.len().min(MB2_SEARCH);
    let mut at = 0;
    while at + 16 <= limit {
        let (magic, arch, len, sum) =
            (u32_at(head, at), u32_at(head, at + 4), u32_at(head, at + 8), u32_at(head, at + 12));
        if magic == MB2_HEADER_MAGIC && magic.wrapping_add(arch).wrapping_add(len).wrapping_add(sum) == 0 {
            if arch != 0 {
                return Err(bad(format!("the Multiboot2 header is for architecture {arch}, not i386 (0)")));
            }
            let end = at.checked_add(len as usize).filter(|&e| e <= head.len() && len >= 16);
            let Some(end) = end else {
                return Err(bad(format!("the Multiboot2 header's length {len} runs past the file's first 32 KiB")));
            };
            let mut header = Header { version: 2, offset: at as u64, addresses: None, entry: None };
            let mut tag = at + 16;
            loop {
                if tag + 8 > end {
                    return Err(bad("the Multiboot2 header's tags run past its length without an end tag"));
                }
                let (kind, flags, size) = (u16_at(head, tag), u16_at(head, tag + 2), u32_at(head, tag + 4) as usize);
                let required = flags & 1 == 0;
                if size < 8 || tag + size > end {
                    return Err(bad(format!("Multiboot2 header tag {kind} has a bad size {size}")));
                }
                match kind {
                    0 => break,
                    1 if required => {
                        for i in (tag + 8..tag + size - 3).step_by(4) {
                            let asked = u32_at(head, i);
                            if MB2_EFI_TAGS.contains(&asked) || asked > 21 {
                                return Err(bad(format!("the kernel requires Multiboot2 information tag {asked}")));
                            }
                        }
                    }
                    2 if size >= 24 => {
                        header.addresses = Some(LoadAddresses {
                            header_addr: u32_at(head, tag + 8),
                            load_addr: u32_at(head, tag + 12),
                            load_end_addr: u32_at(head, tag + 16),
                            bss_end_addr: u32_at(head, tag + 20),
                        });
                    }
                    3 if size >= 12 => header.entry = Some(u32_at(head, tag + 8)),
                    7..=9 if required => {
                        return Err(bad("the Multiboot2 kernel requires EFI boot services or an EFI entry"));
                    }
                    _ => {} // console flags, framebuffer, module alignment, relocatable: booted as is
                }
                tag += size.next_multiple_of(8);
            }
            return Ok(Some(header));
        }
        at += 8;
    }
    Ok(None)
}

/// What goes into the boot information.
pub struct Info<'a> {
    /// Guest physical address the information is written to.
    pub base: u64,
    pub cmdline: &'a str,
    pub initrd: Option<(u64, u64)>,
    pub e820: &'a [E820Entry],
    /// RAM below the MMIO hole (for `mem_upper`).
    pub low_ram_end: u64,
    /// The ACPI RSDP bytes (20 for revision 0, 36 for 2+), for Multiboot2's ACPI tags.
    pub rsdp: Option<Vec<u8>>,
}

fn push32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn push64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn mem_lower_kib() -> u32 {
    (layout::EBDA_START / 1024) as u32
}

fn mem_upper_kib(low_ram_end: u64) -> u32 {
    (low_ram_end.saturating_sub(layout::HIGH_RAM_START) / 1024) as u32
}

/// The Multiboot 1 information structure (with memory bounds and map, command line, modules and the boot
/// loader name), to be written at `info.base`; the command line is referenced at `layout::CMDLINE`.
pub fn build_mb1(info: &Info) -> Vec<u8> {
    const FIXED: usize = 88; // up to and including the VBE fields; the framebuffer fields are not flagged
    let base = info.base as u32;
    let mut tail = Vec::new();
    let at = |tail: &Vec<u8>| base + (FIXED + tail.len()) as u32;
    let name = at(&tail);
    tail.extend_from_slice(LOADER_NAME.as_bytes());
    tail.push(0);
    let module_string = at(&tail);
    tail.extend_from_slice(MODULE_STRING.as_bytes());
    tail.push(0);
    while !tail.len().is_multiple_of(8) {
        tail.push(0);
    }
    let mods = at(&tail);
    if let Some((start, size)) = info.initrd {
        push32(&mut tail, start as u32);
        push32(&mut tail, (start + size) as u32);
        push32(&mut tail, module_string);
        push32(&mut tail, 0);
    }
    let mmap = at(&tail);
    for e in info.e820 {
        push32(&mut tail, 20); // size of the entry after this field
        push64(&mut tail, e.addr);
        push64(&mut tail, e.size);
        push32(&mut tail, e.kind as u32);
    }
    let mmap_len = at(&tail) - mmap;

    let flags: u32 = 1 | 1 << 2 | 1 << 6 | 1 << 9 | if info.initrd.is_some() { 1 << 3 } else { 0 };
    let mut v = Vec::with_capacity(FIXED + tail.len());
    push32(&mut v, flags);
    push32(&mut v, mem_lower_kib());
    push32(&mut v, mem_upper_kib(info.low_ram_end));
    push32(&mut v, 0xFFFF_FFFF); // boot_device: none (not flagged)
    push32(&mut v, layout::CMDLINE as u32);
    push32(&mut v, u32::from(info.initrd.is_some()));
    push32(&mut v, mods);
    v.resize(44, 0); // syms: not flagged
    push32(&mut v, mmap_len);
    push32(&mut v, mmap);
    push32(&mut v, 0); // drives_length
    push32(&mut v, 0); // drives_addr
    push32(&mut v, 0); // config_table
    push32(&mut v, name);
    v.resize(FIXED, 0); // apm_table and VBE: not flagged
    v.extend_from_slice(&tail);
    v
}

fn tag(v: &mut Vec<u8>, kind: u32, body: &[u8]) {
    push32(v, kind);
    push32(v, (8 + body.len()) as u32);
    v.extend_from_slice(body);
    while !v.len().is_multiple_of(8) {
        v.push(0);
    }
}

fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The Multiboot2 boot information: command line, boot loader name, the initrd module, basic memory
/// information, the memory map and a copy of the ACPI RSDP.
pub fn build_mb2(info: &Info) -> Vec<u8> {
    let mut v = vec![0u8; 8]; // total_size and reserved, filled at the end
    tag(&mut v, 1, &c_string(info.cmdline));
    tag(&mut v, 2, &c_string(LOADER_NAME));
    if let Some((start, size)) = info.initrd {
        let mut body = Vec::new();
        push32(&mut body, start as u32);
        push32(&mut body, (start + size) as u32);
        body.extend_from_slice(&c_string(MODULE_STRING));
        tag(&mut v, 3, &body);
    }
    let mut body = Vec::new();
    push32(&mut body, mem_lower_kib());
    push32(&mut body, mem_upper_kib(info.low_ram_end));
    tag(&mut v, 4, &body);
    let mut body = Vec::new();
    push32(&mut body, 24); // entry_size
    push32(&mut body, 0); // entry_version
    for e in info.e820 {
        push64(&mut body, e.addr);
        push64(&mut body, e.size);
        push32(&mut body, e.kind as u32);
        push32(&mut body, 0);
    }
    tag(&mut v, 6, &body);
    if let Some(rsdp) = &info.rsdp {
        tag(&mut v, if rsdp.len() > 20 { 15 } else { 14 }, rsdp);
    }
    tag(&mut v, 0, &[]);
    let total = v.len() as u32;
    v[..4].copy_from_slice(&total.to_le_bytes());
    v
}

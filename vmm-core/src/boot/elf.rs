//! A small, bounded ELF reader and loader for the kernels linux-loader does not take: 32-bit ELF files (PVH
//! or Multiboot) and 64-bit Multiboot ELF files. Every header field is checked against the file's size and
//! guest RAM before it is used; the only host allocations are the program header table (at most
//! [`MAX_PHDRS`] entries) and the PT_NOTE segments (at most [`MAX_NOTE_BYTES`] each).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout;

/// Most program headers we read; kernels have a handful.
pub const MAX_PHDRS: usize = 64;
/// Largest PT_NOTE segment we read.
pub const MAX_NOTE_BYTES: u64 = 64 << 10;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One program header, widened to 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phdr {
    pub kind: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// What the ELF header and program headers of a kernel file say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// 32 or 64.
    pub class: u8,
    /// `e_type`: 1 relocatable, 2 executable, 3 shared object, 4 core.
    pub kind: u16,
    pub entry: u64,
    pub phdrs: Vec<Phdr>,
    /// The physical entry of the Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY), if there is one.
    pub pvh_entry: Option<u64>,
}

impl Image {
    /// "an ELF32 executable" and the like, for messages.
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            1 => "relocatable object".to_string(),
            2 => "executable".to_string(),
            3 => "shared object".to_string(),
            4 => "core file".to_string(),
            other => format!("file of type {other}"),
        };
        format!("an ELF{} {kind}", self.class)
    }

    /// The physical address of the ELF entry point: `e_entry` translated through the PT_LOAD segment whose
    /// virtual range holds it (as GRUB does for Multiboot kernels linked at a virtual address).
    pub fn physical_entry(&self) -> u64 {
        self.phdrs
            .iter()
            .filter(|p| p.kind == PT_LOAD)
            .find(|p| self.entry >= p.vaddr && self.entry - p.vaddr < p.memsz)
            .map_or(self.entry, |p| p.paddr.wrapping_add(self.entry - p.vaddr))
    }
}

fn bad(msg: impl Into<String>) -> BootError {
    BootError::BadElf(msg.into())
}

fn io(source: std::io::Error) -> BootError {
    BootError::Read { what: "the kernel", source }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> Result<(), BootError> {
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    file.read_exact(buf).map_err(io)
}

/// Reads and checks the ELF header, the program headers and the PT_NOTE segments of `file` (`size` bytes).
pub fn parse(file: &mut File, size: u64) -> Result<Image, BootError> {
    let mut ehdr = [0u8; 64];
    let len = size.min(64) as usize;
    read_at(file, 0, &mut ehdr[..len])?;
    if len < 16 || ehdr[..4] != *b"\x7fELF" {
        return Err(bad("not an ELF file"));
    }
    let class = match ehdr[4] {
        1 => 32,
        2 => 64,
        other => return Err(bad(format!("unknown ELF class {other}"))),
    };
    if ehdr[5] != 1 {
        return Err(BootError::NotAKernel(format!("a big-endian ELF{class} file (x86 kernels are little-endian)")));
    }
    let header_size = if class == 32 { 52 } else { 64 };
    if (len as u64) < header_size {
        return Err(bad(format!("the file ends inside the ELF header ({size} bytes)")));
    }
    let kind = u16_at(&ehdr, 16);
    let machine = u16_at(&ehdr, 18);
    if machine != EM_386 && machine != EM_X86_64 {
        let name = match machine {
            8 => " (MIPS)",
            20 | 21 => " (PowerPC)",
            22 => " (s390)",
            40 => " (ARM)",
            183 => " (AArch64)",
            243 => " (RISC-V)",
            _ => "",
        };
        return Err(BootError::NotAKernel(format!("an ELF{class} file for machine {machine}{name}, not x86")));
    }
    let (entry, phoff, phentsize, phnum) = if class == 32 {
        (u64::from(u32_at(&ehdr, 24)), u64::from(u32_at(&ehdr, 28)), u16_at(&ehdr, 42), u16_at(&ehdr, 44))
    } else {
        (u64_at(&ehdr, 24), u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56))
    };
    let expected_phentsize = if class == 32 { 32 } else { 56 };
    if phnum == 0 {
        return Err(bad("no program headers"));
    }
    if usize::from(phnum) > MAX_PHDRS {
        return Err(bad(format!("{phnum} program headers (at most {MAX_PHDRS} are accepted)")));
    }
    if phentsize != expected_phentsize {
        return Err(bad(format!("program header size {phentsize}, expected {expected_phentsize} for ELF{class}")));
    }
    let table_len = u64::from(phnum) * u64::from(phentsize);
    if phoff.checked_add(table_len).is_none_or(|end| end > size) {
        return Err(bad(format!("the program header table at offset {phoff:#x} runs past the end of the file")));
    }
    let mut table = vec![0u8; table_len as usize];
    read_at(file, phoff, &mut table)?;
    let phdrs: Vec<Phdr> = table
        .chunks_exact(usize::from(phentsize))
        .map(|p| {
            if class == 32 {
                Phdr {
                    kind: u32_at(p, 0),
                    offset: u64::from(u32_at(p, 4)),
                    vaddr: u64::from(u32_at(p, 8)),
                    paddr: u64::from(u32_at(p, 12)),
                    filesz: u64::from(u32_at(p, 16)),
                    memsz: u64::from(u32_at(p, 20)),
                }
            } else {
                Phdr {
                    kind: u32_at(p, 0),
                    offset: u64_at(p, 8),
                    vaddr: u64_at(p, 16),
                    paddr: u64_at(p, 24),
                    filesz: u64_at(p, 32),
                    memsz: u64_at(p, 40),
                }
            }
        })
        .collect();
    let mut pvh_entry = None;
    for (i, p) in phdrs.iter().enumerate() {
        if p.offset.checked_add(p.filesz).is_none_or(|end| end > size) {
            return Err(bad(format!(
                "program header {i}: {} bytes at offset {:#x} run past the end of the file ({size} bytes)",
                p.filesz, p.offset
            )));
        }
        if p.kind == PT_NOTE && pvh_entry.is_none() && p.filesz <= MAX_NOTE_BYTES {
            let mut notes = vec![0u8; p.filesz as usize];
            read_at(file, p.offset, &mut notes)?;
            pvh_entry = find_pvh_note(&notes);
        }
    }
    Ok(Image { class, kind, entry, phdrs, pvh_entry })
}

/// The XEN_ELFNOTE_PHYS32_ENTRY value in a PT_NOTE segment's notes (4-byte aligned name and descriptor).
fn find_pvh_note(notes: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    while at.checked_add(12)? <= notes.len() {
        let namesz = u32_at(notes, at) as usize;
        let descsz = u32_at(notes, at + 4) as usize;
        let kind = u32_at(notes, at + 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(namesz.checked_next_multiple_of(4)?)?;
        let next = desc_at.checked_add(descsz.checked_next_multiple_of(4)?)?;
        if next > notes.len() {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && &notes[name_at..name_at + namesz] == b"Xen\0" {
            return match descsz {
                4 => Some(u64::from(u32_at(notes, desc_at))),
                8 => Some(u64_at(notes, desc_at)),
                _ => None,
            };
        }
        at = next;
    }
    None
}

/// Checks that `[start, start + len)` lies in guest RAM between 1 MiB and `ram_end` (at most the start of
/// the MMIO hole), where nothing the loader writes for the boot protocol lives.
pub fn check_range(what: &str, start: u64, len: u64, ram_end: u64) -> Result<u64, BootError> {
    let Some(end) = start.checked_add(len) else {
        return Err(bad(format!("{what}: {len:#x} bytes at {start:#x} wrap around the address space")));
    };
    if start < layout::HIGH_RAM_START {
        return Err(bad(format!(
            "{what} at {start:#x}..{end:#x} is below 1 MiB, where the boot structures and the BIOS area are"
        )));
    }
    if end > ram_end {
        let hole = if end > layout::MMIO_HOLE_START && ram_end >= layout::MMIO_HOLE_START {
            format!(" (it reaches the MMIO hole at {:#x})", layout::MMIO_HOLE_START)
        } else {
            String::new()
        };
        return Err(bad(format!("{what} at {start:#x}..{end:#x} ends beyond guest RAM below {ram_end:#x}{hole}")));
    }
    Ok(end)
}

/// Copies `filesz` bytes of `file` from `offset` to guest `paddr` and zeroes the rest up to `memsz`; the
/// caller has checked both ranges.
pub fn copy_segment(
    mem: &GuestMemoryMmap,
    file: &mut File,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
) -> Result<(), BootError> {
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    mem.read_exact_volatile_from(GuestAddress(paddr), file, filesz as usize)?;
    zero(mem, paddr + filesz, memsz - filesz)
}

/// Loads every PT_LOAD segment at its physical address; returns the end of the highest one.
pub fn load(mem: &GuestMemoryMmap, file: &mut File, image: &Image, ram_end: u64) -> Result<u64, BootError> {
    let mut kernel_end = 0;
    for (i, p) in image.phdrs.iter().enumerate().filter(|(_, p)| p.kind == PT_LOAD && p.memsz > 0) {
        if p.filesz > p.memsz {
            return Err(bad(format!("segment {i}: file size {:#x} exceeds its memory size {:#x}", p.filesz, p.memsz)));
        }
        let end = check_range(&format!("segment {i}"), p.paddr, p.memsz, ram_end)?;
        copy_segment(mem, file, p.offset, p.paddr, p.filesz, p.memsz)?;
        kernel_end = kernel_end.max(end);
    }
    if kernel_end == 0 {
        return Err(bad("no loadable segment"));
    }
    Ok(kernel_end)
}

/// Zeroes the part of every PT_LOAD segment beyond its file bytes (for segments linux-loader copied).
pub fn zero_bss(mem: &GuestMemoryMmap, image: &Image, ram_end: u64) -> Result<(), BootError> {
    for (i, p) in image.phdrs.iter().enumerate().filter(|(_, p)| p.kind == PT_LOAD && p.memsz > p.filesz) {
        check_range(&format!("segment {i}"), p.paddr, p.memsz, ram_end)?;
        zero(mem, p.paddr + p.filesz, p.memsz - p.filesz)?;
    }
    Ok(())
}

fn zero(mem: &GuestMemoryMmap, start: u64, len: u64) -> Result<(), BootError> {
    let zeros = [0u8; 4096];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64);
        mem.write_slice(&zeros[..n as usize], GuestAddress(start + at))?;
        at += n;
    }
    Ok(())
}

/// Checks that `entry` lies inside one of the loaded segments.
pub fn check_entry(image: &Image, entry: u64) -> Result<(), BootError> {
    let inside = image.phdrs.iter().any(|p| p.kind == PT_LOAD && entry >= p.paddr && entry - p.paddr < p.memsz);
    if inside { Ok(()) } else { Err(bad(format!("the entry point {entry:#x} is outside every loaded segment"))) }
}

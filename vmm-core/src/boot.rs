//! Loading what a VM boots: a PVH ELF kernel (32- or 64-bit), a Multiboot 1 or Multiboot2 kernel or a Linux
//! bzImage, its initrd and command line, and the boot structures each protocol reads (PVH `hvm_start_info`;
//! the Multiboot information; Linux `boot_params`, the "zero page").

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, E820Entry};

mod elf;
mod multiboot;

/// How the boot vCPU enters the kernel.
///
/// PVH and Multiboot leave %esp undefined, but QEMU's loaders leave a usable stack and kernels rely on it
/// (a `call` before the kernel sets its own stack): both start with %esp = [`layout::BOOT_STACK_TOP`], in
/// usable low RAM below every kernel segment and clear of every boot structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, %ebx = `hvm_start_info`.
    Pvh { rip: u64 },
    /// Multiboot 1 or 2: 32-bit protected mode, paging off, %eax = the boot loader magic, %ebx = the
    /// boot information.
    Multiboot { rip: u64, eax: u32, ebx: u32 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, %rsi = `boot_params`.
    Linux64 { rip: u64 },
    /// Linux 32-bit boot protocol (a bzImage without a 64-bit entry, such as a 32-bit kernel or memtest86+'s
    /// ia32 image): 32-bit protected mode, paging off, `__BOOT_CS` = 0x10 flat 32-bit code, %esi =
    /// `boot_params`.
    Linux32 { rip: u64 },
}

/// What the kernel file may be, for every message that refuses one.
pub const ACCEPTED: &str = "porthole-vmm boots Linux bzImage, PVH ELF (32/64-bit) and Multiboot 1/2 ELF kernels";

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what}: {source}")]
    Read { what: &'static str, source: std::io::Error },
    #[error("not a kernel: the file is {0}; {ACCEPTED}")]
    NotAKernel(String),
    #[error("cannot load the ELF kernel: {0}")]
    Elf(linux_loader::loader::Error),
    #[error("cannot load the ELF kernel: {0}")]
    BadElf(String),
    #[error("cannot load the Multiboot kernel: {0}")]
    BadMultiboot(String),
    #[error("the bzImage uses boot protocol {major}.{minor:02}; 2.10 or later is needed")]
    OldBootProtocol { major: u16, minor: u16 },
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("the kernel ends at {end:#x}, beyond guest memory")]
    KernelTooLarge { end: u64 },
    #[error("cannot write boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The kernel and initrd files, kept open so that a reboot reloads them without opening anything.
pub struct BootFiles {
    pub kernel: File,
    pub initrd: Option<File>,
    pub cmdline: String,
}

fn read_error(what: &'static str) -> impl FnOnce(std::io::Error) -> BootError {
    move |source| BootError::Read { what, source }
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const XLF_KERNEL_64: u16 = 1 << 0;
const KERNEL_LOADER_OTHER: u8 = 0xFF;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xAA55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const XEN_HVM_START_MAGIC: u32 = 0x336E_C578;

/// A linear framebuffer described to Linux through `boot_params.screen_info` (VIDEO_TYPE_VLFB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearFramebuffer {
    pub base: u64,
    pub size: u64,
    pub width: u16,
    pub height: u16,
}

const VIDEO_TYPE_VLFB: u8 = 0x23;
const VIDEO_CAPABILITY_64BIT_BASE: u32 = 1 << 1;

/// Loads the kernel, initrd and command line into `mem`, writes the boot structures of the kernel's
/// protocol, and returns the entry.
///
/// The kernel is recognised in this order: an ELF file with a Xen PVH entry note (ELF64 through linux-loader,
/// ELF32 through `boot/elf.rs`), a Linux bzImage ("HdrS" at 0x202), a Multiboot 1 header in the first 8 KiB, a
/// Multiboot2 header in the first 32 KiB (ELF segments, or the header's load addresses).
pub fn load(
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    mem_bytes: u64,
    rsdp: u64,
    fb: Option<LinearFramebuffer>,
) -> Result<Entry, BootError> {
    let size = files.kernel.seek(SeekFrom::End(0)).map_err(read_error("the kernel"))?;
    let mut head = vec![0u8; size.min(multiboot::MB2_SEARCH as u64) as usize];
    files.kernel.seek(SeekFrom::Start(0)).map_err(read_error("the kernel"))?;
    files.kernel.read_exact(&mut head).map_err(read_error("the kernel"))?;
    files.kernel.seek(SeekFrom::Start(0)).map_err(read_error("the kernel"))?;

    let low_ram_end = mem_bytes.min(layout::MMIO_HOLE_START);
    let e820 = layout::e820_map(mem_bytes);
    write_cmdline(mem, &files.cmdline)?;

    if head.starts_with(&ELF_MAGIC) {
        let image = elf::parse(&mut files.kernel, size)?;
        if let Some(entry) = image.pvh_entry {
            let kernel_end = if image.class == 64 {
                load_elf64_pvh(mem, files, &image, low_ram_end)?
            } else {
                let end = elf::load(mem, &mut files.kernel, &image, low_ram_end)?;
                elf::check_entry(&image, entry)?;
                end
            };
            let initrd = load_initrd(mem, files, kernel_end, low_ram_end.min(layout::INITRD_MAX_END))?;
            write_pvh_start_info(mem, initrd, &e820, rsdp)?;
            return Ok(Entry::Pvh { rip: entry });
        }
        let Some(header) = multiboot::find(&head)? else {
            return Err(BootError::NotAKernel(format!(
                "{} without a PVH entry note or a Multiboot header",
                image.describe()
            )));
        };
        let (kernel_end, entry) = match header.addresses {
            Some(addresses) => load_multiboot_addresses(mem, files, size, &header, addresses, low_ram_end)?,
            None => {
                if header.version == 1 && image.class == 64 {
                    return Err(BootError::BadMultiboot(
                        "a Multiboot 1 kernel must be an ELF32 file (or give load addresses in its header)".into(),
                    ));
                }
                let end = elf::load(mem, &mut files.kernel, &image, low_ram_end)?;
                let entry = header.entry.map_or_else(|| image.physical_entry(), u64::from);
                elf::check_entry(&image, entry)?;
                (end, entry)
            }
        };
        return finish_multiboot(mem, files, &header, kernel_end, entry, &e820, low_ram_end, rsdp);
    }
    if head.len() >= 0x206 && head[0x202..0x206] == KERNEL_HDR_MAGIC.to_le_bytes() {
        return load_bzimage(mem, files, low_ram_end, &e820, rsdp, fb);
    }
    match multiboot::find(&head)? {
        Some(header @ multiboot::Header { addresses: Some(addresses), .. }) => {
            let (kernel_end, entry) = load_multiboot_addresses(mem, files, size, &header, addresses, low_ram_end)?;
            finish_multiboot(mem, files, &header, kernel_end, entry, &e820, low_ram_end, rsdp)
        }
        Some(header) => Err(BootError::NotAKernel(format!(
            "not an ELF file, and its Multiboot {} header gives no load addresses",
            header.version
        ))),
        None => Err(BootError::NotAKernel(describe_bytes(&head))),
    }
}

/// The ELF64 PVH kernels linux-loader loads (as before the Multiboot and ELF32 loaders existed).
fn load_elf64_pvh(
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    image: &elf::Image,
    low_ram_end: u64,
) -> Result<u64, BootError> {
    let high = Some(GuestAddress(layout::HIGH_RAM_START));
    let loaded = Elf::load(mem, None, &mut files.kernel, high).map_err(BootError::Elf)?;
    if let PvhBootCapability::PvhEntryNotPresent = loaded.pvh_boot_cap {
        return Err(BootError::BadElf("linux-loader found no PVH entry note".into()));
    }
    if loaded.kernel_end > low_ram_end {
        return Err(BootError::KernelTooLarge { end: loaded.kernel_end });
    }
    // linux-loader copies the file bytes only; after a reboot the rest of each segment holds the last boot's
    // data, so the bss is cleared here.
    elf::zero_bss(mem, image, low_ram_end)?;
    Ok(loaded.kernel_end)
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    low_ram_end: u64,
    e820: &[E820Entry],
    rsdp: u64,
    fb: Option<LinearFramebuffer>,
) -> Result<Entry, BootError> {
    let high = Some(GuestAddress(layout::HIGH_RAM_START));
    let loaded = BzImage::load(mem, None, &mut files.kernel, high)
        .map_err(|e| BootError::NotAKernel(format!("a Linux bzImage linux-loader cannot load ({e})")))?;
    let header = loaded.setup_header.ok_or_else(|| BootError::NotAKernel("a bzImage without a setup header".into()))?;
    let version = header.version;
    if version < 0x020A {
        return Err(BootError::OldBootProtocol { major: version >> 8, minor: version & 0xFF });
    }
    let kernel_end = loaded.kernel_end;
    if kernel_end > low_ram_end {
        return Err(BootError::KernelTooLarge { end: kernel_end });
    }
    let limit = low_ram_end.min(u64::from(header.initrd_addr_max) + 1).min(layout::INITRD_MAX_END);
    let initrd = load_initrd(mem, files, kernel_end, limit)?;
    write_zero_page(mem, header, &files.cmdline, initrd, e820, rsdp, fb)?;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        // No 64-bit entry: the 32-bit one, at the start of the protected-mode code.
        return Ok(Entry::Linux32 { rip: loaded.kernel_load.raw_value() });
    }
    Ok(Entry::Linux64 { rip: loaded.kernel_load.raw_value() + 0x200 })
}

/// Loads a Multiboot kernel from its header's load addresses (Multiboot 1 flag 16, the Multiboot2 address
/// tag): the file from the offset that corresponds to `load_addr` up to `load_end_addr` (or the end of the
/// file), then zeroes up to `bss_end_addr`. Returns the kernel's end and its entry.
fn load_multiboot_addresses(
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    size: u64,
    header: &multiboot::Header,
    a: multiboot::LoadAddresses,
    low_ram_end: u64,
) -> Result<(u64, u64), BootError> {
    let bad = |m: String| BootError::BadMultiboot(m);
    let (header_addr, load_addr) = (u64::from(a.header_addr), u64::from(a.load_addr));
    let Some(entry) = header.entry else {
        return Err(bad("the Multiboot2 header gives load addresses but no entry address tag".into()));
    };
    let before = header_addr.checked_sub(load_addr).filter(|&d| d <= header.offset);
    let Some(before) = before else {
        return Err(bad(format!(
            "header_addr {header_addr:#x} and load_addr {load_addr:#x} do not match the header's file offset {:#x}",
            header.offset
        )));
    };
    let offset = header.offset - before;
    let file_len = if a.load_end_addr == 0 {
        size - offset
    } else {
        u64::from(a.load_end_addr).checked_sub(load_addr).filter(|&l| l <= size - offset).ok_or_else(|| {
            bad(format!("load_end_addr {:#x} is before load_addr or past the end of the file", a.load_end_addr))
        })?
    };
    let load_end = load_addr + file_len;
    let mem_len = if a.bss_end_addr == 0 {
        file_len
    } else {
        u64::from(a.bss_end_addr).checked_sub(load_addr).filter(|&l| l >= file_len).ok_or_else(|| {
            bad(format!("bss_end_addr {:#x} is before the loaded image's end {load_end:#x}", a.bss_end_addr))
        })?
    };
    let end = elf::check_range("the Multiboot image", load_addr, mem_len, low_ram_end)?;
    elf::copy_segment(mem, &mut files.kernel, offset, load_addr, file_len, mem_len)?;
    let entry = u64::from(entry);
    if entry < load_addr || entry >= end {
        return Err(bad(format!("the entry address {entry:#x} is outside the image at {load_addr:#x}..{end:#x}")));
    }
    Ok((end, entry))
}

#[allow(clippy::too_many_arguments)]
fn finish_multiboot(
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    header: &multiboot::Header,
    kernel_end: u64,
    entry: u64,
    e820: &[E820Entry],
    low_ram_end: u64,
    rsdp: u64,
) -> Result<Entry, BootError> {
    let initrd = load_initrd(mem, files, kernel_end, low_ram_end.min(layout::INITRD_MAX_END))?;
    let rsdp_bytes = if rsdp == 0 {
        None
    } else {
        let revision: u8 = mem.read_obj(GuestAddress(rsdp + 15))?;
        let mut bytes = vec![0u8; if revision >= 2 { 36 } else { 20 }];
        mem.read_slice(&mut bytes, GuestAddress(rsdp))?;
        Some(bytes)
    };
    let info = multiboot::Info {
        base: layout::MULTIBOOT_INFO,
        cmdline: &files.cmdline,
        initrd,
        e820: &e820[..e820.len().min(layout::MEMMAP_MAX_ENTRIES)],
        low_ram_end,
        rsdp: rsdp_bytes,
    };
    let (bytes, eax) = if header.version == 1 {
        (multiboot::build_mb1(&info), multiboot::MB1_BOOTLOADER_MAGIC)
    } else {
        (multiboot::build_mb2(&info), multiboot::MB2_BOOTLOADER_MAGIC)
    };
    if bytes.len() > layout::MULTIBOOT_INFO_MAX {
        return Err(BootError::BadMultiboot(format!("the boot information ({} bytes) is too large", bytes.len())));
    }
    mem.write_slice(&bytes, GuestAddress(layout::MULTIBOOT_INFO))?;
    Ok(Entry::Multiboot { rip: entry, eax, ebx: layout::MULTIBOOT_INFO as u32 })
}

/// What the first bytes of a file that is no kernel look like, for the message that refuses it.
fn describe_bytes(head: &[u8]) -> String {
    if head.is_empty() {
        return "empty".into();
    }
    let known: &[(&[u8], &str)] = &[
        (b"MZ", "a PE/COFF executable (\"MZ\"; an EFI or Windows program) without a Linux setup header"),
        (b"\x1f\x8b", "gzip-compressed data (decompress it first)"),
        (b"\xfd7zXZ", "xz-compressed data (decompress it first)"),
        (b"\x28\xb5\x2f\xfd", "zstd-compressed data (decompress it first)"),
        (b"BZh", "bzip2-compressed data (decompress it first)"),
        (b"#!", "a script"),
        (b"QFI\xfb", "a qcow2 disk image (give it as a disk, not as --kernel)"),
        (b"070701", "a cpio archive (an initrd? give it as --initrd)"),
    ];
    if let Some((_, what)) = known.iter().find(|(magic, _)| head.starts_with(magic)) {
        return (*what).to_string();
    }
    if head.len() >= 0x200 && head[0x1FE..0x200] == [0x55, 0xAA] {
        return "a PC boot sector (0x55 0xAA at byte 510) without a Linux setup header (\"HdrS\")".into();
    }
    let sample = &head[..head.len().min(32)];
    let printable = |b: &u8| b.is_ascii_graphic() || b" \t\r\n".contains(b);
    if head[..head.len().min(512)].iter().all(printable) {
        let line = String::from_utf8_lossy(sample);
        let line = line.lines().next().unwrap_or("");
        return format!("text beginning {line:?}");
    }
    let hex: Vec<String> = sample[..sample.len().min(16)].iter().map(|b| format!("{b:02x}")).collect();
    format!("data beginning with the bytes {} (no ELF, bzImage or Multiboot signature)", hex.join(" "))
}

use vm_memory::Address;

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE))?;
    Ok(())
}

/// Places the initrd page-aligned as high as possible below `limit` and above `kernel_end`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    kernel_end: u64,
    limit: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(initrd) = files.initrd.as_mut() else {
        return Ok(None);
    };
    let size = initrd.seek(SeekFrom::End(0)).map_err(read_error("the initrd"))?;
    initrd.seek(SeekFrom::Start(0)).map_err(read_error("the initrd"))?;
    let start = limit.checked_sub(size).map(|s| s & !0xFFF).filter(|&s| s >= kernel_end.next_multiple_of(0x1000));
    let Some(start) = start else {
        return Err(BootError::InitrdTooLarge { size, limit });
    };
    mem.read_exact_volatile_from(GuestAddress(start), initrd, size as usize)?;
    Ok(Some((start, size)))
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: u64,
) -> Result<(), BootError> {
    let entries = &e820[..e820.len().min(layout::MEMMAP_MAX_ENTRIES)];
    for (i, e) in entries.iter().enumerate() {
        let at = layout::PVH_MEMMAP + i as u64 * 24;
        mem.write_obj(e.addr, GuestAddress(at))?;
        mem.write_obj(e.size, GuestAddress(at + 8))?;
        mem.write_obj(e.kind as u32, GuestAddress(at + 16))?;
        mem.write_obj(0u32, GuestAddress(at + 20))?;
    }
    if let Some((addr, size)) = initrd {
        for (i, v) in [addr, size, 0, 0].into_iter().enumerate() {
            mem.write_obj(v, GuestAddress(layout::PVH_MODLIST + i as u64 * 8))?;
        }
    }
    let info = layout::PVH_START_INFO;
    mem.write_obj(XEN_HVM_START_MAGIC, GuestAddress(info))?;
    mem.write_obj(1u32, GuestAddress(info + 4))?; // version 1: has the memory map
    mem.write_obj(0u32, GuestAddress(info + 8))?; // flags
    mem.write_obj(u32::from(initrd.is_some()), GuestAddress(info + 12))?;
    mem.write_obj(if initrd.is_some() { layout::PVH_MODLIST } else { 0 }, GuestAddress(info + 16))?;
    mem.write_obj(layout::CMDLINE, GuestAddress(info + 24))?;
    mem.write_obj(rsdp, GuestAddress(info + 32))?;
    mem.write_obj(layout::PVH_MEMMAP, GuestAddress(info + 40))?;
    mem.write_obj(entries.len() as u32, GuestAddress(info + 48))?;
    mem.write_obj(0u32, GuestAddress(info + 52))?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mut hdr: setup_header,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: u64,
    fb: Option<LinearFramebuffer>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(fb) = fb {
        let si = &mut params.screen_info;
        si.orig_video_isVGA = VIDEO_TYPE_VLFB;
        si.lfb_width = fb.width;
        si.lfb_height = fb.height;
        si.lfb_depth = 32;
        si.lfb_linelength = fb.width * 4;
        si.lfb_base = fb.base as u32;
        si.ext_lfb_base = (fb.base >> 32) as u32;
        si.capabilities = VIDEO_CAPABILITY_64BIT_BASE;
        si.lfb_size = (fb.size >> 16) as u32; // in 64 KiB units
        (si.red_size, si.red_pos, si.green_size, si.green_pos) = (8, 16, 8, 8);
        (si.blue_size, si.blue_pos, si.rsvd_size, si.rsvd_pos) = (8, 0, 8, 24);
        si.orig_video_cols = 80;
        si.orig_video_lines = 25;
        si.orig_video_points = 16;
    }
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = layout::CMDLINE as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = rsdp;
    let n = e820.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(&e820[..n]) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind as u32;
    }
    params.e820_entries = n as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn files(kernel: &std::path::Path) -> BootFiles {
        BootFiles { kernel: File::open(kernel).unwrap(), initrd: None, cmdline: "console=ttyS0".into() }
    }

    #[test]
    fn pvh_guest_loads_with_start_info() {
        let mem = mem();
        let mut f = files(&porthole_guests::path("hello"));
        let entry = load(&mem, &mut f, 64 << 20, 0xE0000, None).unwrap();
        assert!(matches!(entry, Entry::Pvh { rip } if rip >= layout::HIGH_RAM_START));
        let magic: u32 = mem.read_obj(GuestAddress(layout::PVH_START_INFO)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let rsdp: u64 = mem.read_obj(GuestAddress(layout::PVH_START_INFO + 32)).unwrap();
        assert_eq!(rsdp, 0xE0000);
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE)).unwrap();
        assert_eq!(&cmdline, b"console=ttyS0\0");
    }

    #[test]
    fn initrd_is_placed_high_and_listed_as_a_module() {
        let mem = mem();
        let mut f = files(&porthole_guests::path("hello"));
        let initrd = std::env::temp_dir().join(format!("porthole-initrd-test-{}", std::process::id()));
        std::fs::write(&initrd, vec![0x5A; 10_000]).unwrap();
        f.initrd = Some(File::open(&initrd).unwrap());
        load(&mem, &mut f, 64 << 20, 0, None).unwrap();
        std::fs::remove_file(&initrd).unwrap();
        let modules: u32 = mem.read_obj(GuestAddress(layout::PVH_START_INFO + 12)).unwrap();
        assert_eq!(modules, 1);
        let addr: u64 = mem.read_obj(GuestAddress(layout::PVH_MODLIST)).unwrap();
        let size: u64 = mem.read_obj(GuestAddress(layout::PVH_MODLIST + 8)).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr > (32 << 20));
        let byte: u8 = mem.read_obj(GuestAddress(addr + 9_999)).unwrap();
        assert_eq!(byte, 0x5A);
    }

    #[test]
    fn linux_gets_a_vesa_framebuffer_in_screen_info() {
        let mem = mem();
        let fb = LinearFramebuffer { base: 0xE000_0000, size: 16 << 20, width: 1280, height: 800 };
        let e820 = layout::e820_map(64 << 20);
        write_zero_page(
            &mem,
            setup_header::default(),
            "console=tty0",
            Some((0x300_0000, 1000)),
            &e820,
            0xE0000,
            Some(fb),
        )
        .unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
        let si = params.screen_info;
        assert_eq!(si.orig_video_isVGA, VIDEO_TYPE_VLFB);
        assert_eq!((si.lfb_width, si.lfb_height, si.lfb_depth, si.lfb_linelength), (1280, 800, 32, 5120));
        assert_eq!((si.lfb_base, si.ext_lfb_base, si.lfb_size), (0xE000_0000, 0, 256));
        assert_eq!((si.red_pos, si.green_pos, si.blue_pos, si.red_size), (16, 8, 0, 8));
        let hdr = params.hdr;
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size, hdr.cmd_line_ptr), (0x300_0000, 1000, layout::CMDLINE as u32));
        assert_eq!(hdr.type_of_loader, KERNEL_LOADER_OTHER);
        let (rsdp, entries) = (params.acpi_rsdp_addr, params.e820_entries);
        assert_eq!(rsdp, 0xE0000);
        assert_eq!(usize::from(entries), e820.len());
    }

    #[test]
    fn text_file_is_not_a_kernel() {
        let path = std::env::temp_dir().join(format!("porthole-notakernel-{}", std::process::id()));
        std::fs::write(&path, "just some text, certainly no kernel\n".repeat(100)).unwrap();
        let err = load(&mem(), &mut files(&path), 64 << 20, 0, None).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err}");
    }

    // ---- Kernel images built byte by byte: ELF32/ELF64 PVH, Multiboot 1 and 2, and hostile headers. ----

    /// A file holding `bytes`, already unlinked.
    fn kernel_file(bytes: &[u8]) -> File {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("porthole-kernel-test-{}-{n}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    fn load_bytes(mem: &GuestMemoryMmap, bytes: &[u8], mem_bytes: u64) -> Result<Entry, BootError> {
        let mut f = BootFiles { kernel: kernel_file(bytes), initrd: None, cmdline: "console=ttyS0".into() };
        load(mem, &mut f, mem_bytes, 0, None)
    }

    fn put(image: &mut Vec<u8>, at: usize, bytes: &[u8]) {
        if image.len() < at + bytes.len() {
            image.resize(at + bytes.len(), 0);
        }
        image[at..at + bytes.len()].copy_from_slice(bytes);
    }

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    /// Where the test images put their loadable bytes in the file, and the code's first bytes.
    const BODY: usize = 0x1000;
    const CODE: [u8; 8] = [0xFA, 0xF4, 0xEB, 0xFD, 0x90, 0x90, 0x90, 0x90]; // cli; hlt; jmp .-1

    /// An ELF file of `class` with these program headers at offset 64, for x86.
    fn elf(class: u8, entry: u64, phdrs: &[elf::Phdr]) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        put(&mut v, 0, &[0x7F, b'E', b'L', b'F', if class == 32 { 1 } else { 2 }, 1, 1]);
        put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut v, 18, &(if class == 32 { 3u16 } else { 62u16 }).to_le_bytes());
        put(&mut v, 20, &1u32.to_le_bytes());
        if class == 32 {
            put(&mut v, 24, &(entry as u32).to_le_bytes());
            put(&mut v, 28, &64u32.to_le_bytes());
            put(&mut v, 40, &52u16.to_le_bytes());
            put(&mut v, 42, &32u16.to_le_bytes());
            put(&mut v, 44, &(phdrs.len() as u16).to_le_bytes());
        } else {
            put(&mut v, 24, &entry.to_le_bytes());
            put(&mut v, 32, &64u64.to_le_bytes());
            put(&mut v, 52, &64u16.to_le_bytes());
            put(&mut v, 54, &56u16.to_le_bytes());
            put(&mut v, 56, &(phdrs.len() as u16).to_le_bytes());
        }
        for (i, p) in phdrs.iter().enumerate() {
            if class == 32 {
                let at = 64 + i * 32;
                for (j, x) in [p.kind as u64, p.offset, p.vaddr, p.paddr, p.filesz, p.memsz].iter().enumerate() {
                    put(&mut v, at + j * 4, &(*x as u32).to_le_bytes());
                }
            } else {
                let at = 64 + i * 56;
                put(&mut v, at, &p.kind.to_le_bytes());
                for (j, x) in [p.offset, p.vaddr, p.paddr, p.filesz, p.memsz].iter().enumerate() {
                    put(&mut v, at + 8 + j * 8, &x.to_le_bytes());
                }
            }
        }
        v
    }

    fn segment(offset: u64, paddr: u64, filesz: u64, memsz: u64) -> elf::Phdr {
        elf::Phdr { kind: PT_LOAD, offset, vaddr: paddr, paddr, filesz, memsz }
    }

    /// A Xen PVH entry note with a `size`-byte descriptor, preceded by an unrelated note.
    fn pvh_note(entry: u64, size: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for (name, kind, desc) in
            [(&b"GNU\0"[..], 3u32, vec![1u8, 2, 3, 4]), (b"Xen\0", 18, entry.to_le_bytes()[..size].to_vec())]
        {
            v.extend_from_slice(&(name.len() as u32).to_le_bytes());
            v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            v.extend_from_slice(&kind.to_le_bytes());
            v.extend_from_slice(name);
            v.extend_from_slice(&desc);
        }
        v
    }

    /// A PVH kernel of `class`: CODE at 1 MiB, 0x2000 bytes of memory (the rest bss), entry note at 0x800.
    fn pvh_kernel(class: u8) -> Vec<u8> {
        let note = pvh_note(0x10_0000, if class == 32 { 4 } else { 8 });
        let note_hdr =
            elf::Phdr { kind: PT_NOTE, offset: 0x800, vaddr: 0, paddr: 0, filesz: note.len() as u64, memsz: 0 };
        let mut v = elf(class, 0x10_0000, &[segment(BODY as u64, 0x10_0000, 0x100, 0x2000), note_hdr]);
        put(&mut v, 0x800, &note);
        put(&mut v, BODY, &CODE);
        put(&mut v, BODY + 0xFF, &[0x77]);
        v
    }

    fn dirty_mem() -> GuestMemoryMmap {
        let mem = mem();
        mem.write_slice(&[0xAA; 0x3000], GuestAddress(0x10_0000)).unwrap();
        mem
    }

    #[test]
    fn elf32_and_elf64_pvh_kernels_load_with_their_bss_cleared() {
        for class in [32, 64] {
            let mem = dirty_mem();
            let entry = load_bytes(&mem, &pvh_kernel(class), 64 << 20).unwrap();
            assert_eq!(entry, Entry::Pvh { rip: 0x10_0000 }, "ELF{class}");
            let mut code = [0u8; 8];
            mem.read_slice(&mut code, GuestAddress(0x10_0000)).unwrap();
            assert_eq!(code, CODE, "ELF{class}");
            let last: u8 = mem.read_obj(GuestAddress(0x10_00FF)).unwrap();
            let bss: u8 = mem.read_obj(GuestAddress(0x10_0100)).unwrap();
            let bss_end: u8 = mem.read_obj(GuestAddress(0x10_1FFF)).unwrap();
            let beyond: u8 = mem.read_obj(GuestAddress(0x10_2000)).unwrap();
            assert_eq!((last, bss, bss_end, beyond), (0x77, 0, 0, 0xAA), "ELF{class}");
            let magic: u32 = mem.read_obj(GuestAddress(layout::PVH_START_INFO)).unwrap();
            assert_eq!(magic, XEN_HVM_START_MAGIC, "ELF{class}");
        }
    }

    fn mb1_header(flags: u32) -> Vec<u8> {
        let magic = 0x1BAD_B002u32;
        [magic, flags, 0u32.wrapping_sub(magic.wrapping_add(flags))].iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// An ELF32 Multiboot 1 kernel linked at virtual 0xC010_0000, physical 1 MiB; the header starts the
    /// segment and the code follows it at +12.
    fn mb1_kernel() -> Vec<u8> {
        let seg = elf::Phdr {
            kind: PT_LOAD,
            offset: BODY as u64,
            vaddr: 0xC010_0000,
            paddr: 0x10_0000,
            filesz: 0x100,
            memsz: 0x1000,
        };
        let mut v = elf(32, 0xC010_000C, &[seg]);
        put(&mut v, BODY, &mb1_header(0x3));
        put(&mut v, BODY + 12, &CODE);
        v.resize(BODY + 0x100, 0);
        v
    }

    fn read_u32(mem: &GuestMemoryMmap, at: u64) -> u32 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn read_cstr(mem: &GuestMemoryMmap, at: u64) -> String {
        let mut bytes = Vec::new();
        for i in 0..256 {
            let b: u8 = mem.read_obj(GuestAddress(at + i)).unwrap();
            if b == 0 {
                break;
            }
            bytes.push(b);
        }
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn multiboot1_elf_enters_at_the_physical_entry_with_a_full_information_structure() {
        let mem = mem();
        let initrd = std::env::temp_dir().join(format!("porthole-mb-initrd-{}", std::process::id()));
        std::fs::write(&initrd, vec![0x5A; 5000]).unwrap();
        let mut f = BootFiles {
            kernel: kernel_file(&mb1_kernel()),
            initrd: Some(File::open(&initrd).unwrap()),
            cmdline: "mb1 args".into(),
        };
        std::fs::remove_file(&initrd).unwrap();
        let entry = load(&mem, &mut f, 64 << 20, 0, None).unwrap();
        let info = layout::MULTIBOOT_INFO;
        assert_eq!(entry, Entry::Multiboot { rip: 0x10_000C, eax: 0x2BAD_B002, ebx: info as u32 });
        let flags = read_u32(&mem, info);
        assert_eq!(flags, 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9);
        assert_eq!(read_u32(&mem, info + 4), 639);
        assert_eq!(read_u32(&mem, info + 8), (63 << 10));
        assert_eq!(read_cstr(&mem, u64::from(read_u32(&mem, info + 16))), "mb1 args");
        assert_eq!(read_u32(&mem, info + 20), 1);
        let module = u64::from(read_u32(&mem, info + 24));
        let (start, end) = (read_u32(&mem, module), read_u32(&mem, module + 4));
        assert_eq!((end - start, start % 4096), (5000, 0));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(u64::from(start))).unwrap(), 0x5A);
        assert_eq!(read_cstr(&mem, u64::from(read_u32(&mem, module + 8))), "initrd");
        let e820 = layout::e820_map(64 << 20);
        assert_eq!(read_u32(&mem, info + 44) as usize, e820.len() * 24);
        let mmap = u64::from(read_u32(&mem, info + 48));
        for (i, e) in e820.iter().enumerate() {
            let at = mmap + i as u64 * 24;
            assert_eq!(read_u32(&mem, at), 20);
            assert_eq!(mem.read_obj::<u64>(GuestAddress(at + 4)).unwrap(), e.addr);
            assert_eq!(mem.read_obj::<u64>(GuestAddress(at + 12)).unwrap(), e.size);
            assert_eq!(read_u32(&mem, at + 20), e.kind as u32);
        }
        assert_eq!(read_cstr(&mem, u64::from(read_u32(&mem, info + 64))), "porthole-vmm");
        // Everything the information uses stays in its area, clear of the stack and the start info.
        assert!(mmap + e820.len() as u64 * 24 <= layout::MULTIBOOT_INFO + layout::MULTIBOOT_INFO_MAX as u64);
    }

    fn mb2_header(tags: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, flags, data) in tags.iter().chain([(0u16, 0u16, Vec::new())].iter()) {
            body.extend_from_slice(&kind.to_le_bytes());
            body.extend_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&(8 + data.len() as u32).to_le_bytes());
            body.extend_from_slice(data);
            body.resize(body.len().next_multiple_of(8), 0);
        }
        let (magic, len) = (0xE852_50D6u32, 16 + body.len() as u32);
        let mut v: Vec<u8> =
            [magic, 0, len, 0u32.wrapping_sub(magic.wrapping_add(len))].iter().flat_map(|x| x.to_le_bytes()).collect();
        v.extend_from_slice(&body);
        v
    }

    /// An ELF64 Multiboot2 kernel with an entry address tag pointing past the header.
    fn mb2_kernel(extra_tags: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
        let mut tags = vec![(3u16, 0u16, 0x10_0080u32.to_le_bytes().to_vec())];
        tags.extend_from_slice(extra_tags);
        let mut v = elf(64, 0x10_0000, &[segment(BODY as u64, 0x10_0000, 0x100, 0x100)]);
        put(&mut v, BODY, &mb2_header(&tags));
        put(&mut v, BODY + 0x80, &CODE);
        v.resize(BODY + 0x100, 0);
        v
    }

    #[test]
    fn multiboot2_elf64_gets_its_tags() {
        let mem = mem();
        // A revision 2 RSDP, as the ACPI module writes it.
        let mut rsdp = [0u8; 36];
        rsdp[..8].copy_from_slice(b"RSD PTR ");
        rsdp[15] = 2;
        mem.write_slice(&rsdp, GuestAddress(0xE_0000)).unwrap();
        let mut f = BootFiles { kernel: kernel_file(&mb2_kernel(&[])), initrd: None, cmdline: "mb2 args".into() };
        let entry = load(&mem, &mut f, 64 << 20, 0xE_0000, None).unwrap();
        let info = layout::MULTIBOOT_INFO;
        assert_eq!(entry, Entry::Multiboot { rip: 0x10_0080, eax: 0x36D7_6289, ebx: info as u32 });
        let total = u64::from(read_u32(&mem, info));
        let mut at = info + 8;
        let mut seen = Vec::new();
        while at < info + total {
            let (kind, size) = (read_u32(&mem, at), u64::from(read_u32(&mem, at + 4)));
            seen.push(kind);
            match kind {
                1 => assert_eq!(read_cstr(&mem, at + 8), "mb2 args"),
                2 => assert_eq!(read_cstr(&mem, at + 8), "porthole-vmm"),
                4 => assert_eq!((read_u32(&mem, at + 8), read_u32(&mem, at + 12)), (639, 63 << 10)),
                6 => {
                    assert_eq!(read_u32(&mem, at + 8), 24);
                    assert_eq!((size - 16) / 24, layout::e820_map(64 << 20).len() as u64);
                }
                15 => assert_eq!((size, read_u32(&mem, at + 8)), (8 + 36, u32::from_le_bytes(*b"RSD "))),
                0 => assert_eq!(size, 8),
                other => panic!("unexpected tag {other}"),
            }
            at += size.next_multiple_of(8);
        }
        assert_eq!(seen, [1, 2, 4, 6, 15, 0]);
        assert_eq!(at, info + total);
    }

    #[test]
    fn multiboot1_load_addresses_boot_a_flat_binary() {
        let mem = dirty_mem();
        // header at file offset 0x10, loaded at 1 MiB from file offset 0: header_addr = 1 MiB + 0x10.
        let mut v = vec![0u8; 0x10];
        v.extend_from_slice(&mb1_header(1 << 16 | 0x2));
        for x in [0x10_0010u32, 0x10_0000, 0, 0x10_1000, 0x10_0040] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        put(&mut v, 0x40, &CODE);
        let entry = load_bytes(&mem, &v, 64 << 20).unwrap();
        assert!(matches!(entry, Entry::Multiboot { rip: 0x10_0040, eax: 0x2BAD_B002, .. }), "{entry:?}");
        let code: [u8; 8] = mem.read_obj(GuestAddress(0x10_0040)).unwrap();
        assert_eq!(code, CODE);
        let bss: u8 = mem.read_obj(GuestAddress(0x10_0FFF)).unwrap();
        let beyond: u8 = mem.read_obj(GuestAddress(0x10_1000)).unwrap();
        assert_eq!((bss, beyond), (0, 0xAA));
    }

    #[track_caller]
    fn err_of(bytes: &[u8], mem_bytes: u64) -> String {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_bytes.min(64 << 20) as usize)]).unwrap();
        match load_bytes(&mem, bytes, mem_bytes) {
            Ok(entry) => panic!("loaded: {entry:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[track_caller]
    fn assert_err(bytes: &[u8], expected: &str) {
        let err = err_of(bytes, 64 << 20);
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
    }

    /// A bzImage: one setup sector after the boot sector, the protected-mode code at file offset 0x400.
    fn bzimage(xloadflags: u16) -> Vec<u8> {
        let mut v = vec![0u8; 0x400];
        put(&mut v, 0x1F1, &[1]); // setup_sects
        put(&mut v, 0x1FE, &0xAA55u16.to_le_bytes());
        put(&mut v, 0x202, b"HdrS");
        put(&mut v, 0x206, &0x020Cu16.to_le_bytes());
        put(&mut v, 0x211, &[1]); // loadflags: LOADED_HIGH
        put(&mut v, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(&mut v, 0x22C, &0x37FF_FFFFu32.to_le_bytes()); // initrd_addr_max
        put(&mut v, 0x236, &xloadflags.to_le_bytes());
        put(&mut v, 0x400, &CODE);
        v.resize(0x800, 0x90);
        v
    }

    #[test]
    fn bzimages_enter_through_the_64_bit_entry_or_else_the_32_bit_one() {
        for (xloadflags, expected) in [(1, Entry::Linux64 { rip: 0x10_0200 }), (0, Entry::Linux32 { rip: 0x10_0000 })] {
            let mem = mem();
            assert_eq!(load_bytes(&mem, &bzimage(xloadflags), 64 << 20).unwrap(), expected);
            let code: [u8; 8] = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
            assert_eq!(code, CODE);
            let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE)).unwrap();
            let hdr = params.hdr;
            assert_eq!(
                (hdr.header, hdr.type_of_loader, hdr.cmd_line_ptr),
                (KERNEL_HDR_MAGIC, 0xFF, layout::CMDLINE as u32)
            );
        }
        let mut old = bzimage(1);
        put(&mut old, 0x206, &0x0209u16.to_le_bytes());
        assert_err(&old, "boot protocol 2.09; 2.10 or later is needed");
    }

    #[test]
    fn hostile_elf_headers_are_refused_cleanly() {
        let good = pvh_kernel(32);
        let with = |at: usize, bytes: &[u8]| {
            let mut v = good.clone();
            put(&mut v, at, bytes);
            v
        };
        assert_err(&with(44, &0xFFFFu16.to_le_bytes()), "65535 program headers");
        let near_end = (good.len() - 40) as u32;
        assert_err(&with(28, &near_end.to_le_bytes()), &format!("table at offset {near_end:#x} runs past the end"));
        assert_err(&with(28, &0xFFFF_FFF0u32.to_le_bytes()), "runs past the end of the file");
        assert_err(&with(42, &56u16.to_le_bytes()), "program header size 56, expected 32");
        assert_err(
            &with(18, &183u16.to_le_bytes()),
            "not a kernel: the file is an ELF32 file for machine 183 (AArch64)",
        );
        assert_err(&with(5, &[2]), "a big-endian ELF32 file");
        assert_err(&good[..30], "ends inside the ELF header");
        // Segment 0: offset past EOF, file size past EOF, address outside RAM, below 1 MiB, huge.
        let seg = 64;
        assert_err(&with(seg + 4, &0x10_0000u32.to_le_bytes()), "program header 0");
        assert_err(&with(seg + 16, &0xFFFF_FFFFu32.to_le_bytes()), "run past the end of the file");
        assert_err(&with(seg + 12, &0x3FFF_F000u32.to_le_bytes()), "ends beyond guest RAM");
        assert_err(&with(seg + 12, &0x7_0000u32.to_le_bytes()), "below 1 MiB");
        assert_err(&with(seg + 12, &0xFFFF_F000u32.to_le_bytes()), "ends beyond guest RAM");
        assert_err(&with(seg + 20, &0xFFFF_FFFFu32.to_le_bytes()), "ends beyond guest RAM");
        assert_err(&with(seg + 20, &0x10u32.to_le_bytes()), "exceeds its memory size");
        // The entry note pointing outside the image.
        assert_err(&with(0x800 + 12 + 4 + 4 + 12 + 4, &0x50_0000u32.to_le_bytes()), "outside every loaded segment");
        // A mangled note: sizes that run off its segment are no note, and then the file is no kernel.
        assert_err(
            &with(0x800, &0xFFFF_FFF0u32.to_le_bytes()),
            "ELF32 executable without a PVH entry note or a Multiboot header",
        );
        // A segment across the start of the MMIO hole of a 4 GiB guest.
        let mut v = with(seg + 12, &0xBFFF_0000u32.to_le_bytes());
        put(&mut v, seg + 20, &0x2_0000u32.to_le_bytes());
        let err = err_of(&v, 4 << 30);
        assert!(err.contains("reaches the MMIO hole at 0xc0000000"), "{err}");
    }

    #[test]
    fn multiboot_headers_the_loader_cannot_honour_are_refused() {
        let mut v = mb1_kernel();
        put(&mut v, BODY, &mb1_header(0x3 | 1 << 5));
        assert_err(&v, "requires features 0x20");
        let mut v64 = elf(64, 0x10_0000, &[segment(BODY as u64, 0x10_0000, 0x100, 0x100)]);
        put(&mut v64, BODY, &mb1_header(0x3));
        v64.resize(BODY + 0x100, 0);
        assert_err(&v64, "a Multiboot 1 kernel must be an ELF32 file");
        assert_err(&mb2_kernel(&[(7, 0, Vec::new())]), "requires EFI");
        assert_err(&mb2_kernel(&[(1, 0, 12u32.to_le_bytes().to_vec())]), "requires Multiboot2 information tag 12");
        // Optional requests and tags are fine.
        let mem = mem();
        load_bytes(&mem, &mb2_kernel(&[(1, 1, 12u32.to_le_bytes().to_vec()), (7, 1, Vec::new())]), 64 << 20).unwrap();
        let mut v = mb2_kernel(&[]);
        put(&mut v, BODY + 8, &0x7000u32.to_le_bytes()); // header_length beyond the 32 KiB searched
        let (magic, len) = (0xE852_50D6u32, 0x7000u32);
        put(&mut v, BODY + 12, &0u32.wrapping_sub(magic.wrapping_add(len)).to_le_bytes());
        assert_err(&v, "runs past the file's first 32 KiB");
        // A flat binary with a Multiboot header but no load addresses.
        let mut flat = mb1_header(0x3);
        flat.resize(4096, 0x90);
        assert_err(&flat, "gives no load addresses");
    }

    #[test]
    fn files_that_are_no_kernel_are_described() {
        let cases: [(&[u8], &str); 6] = [
            (b"", "the file is empty"),
            (b"\x1f\x8b\x08\x00rest", "gzip-compressed data"),
            (b"MZ\x90\x00", "PE/COFF executable"),
            (&[0xDE, 0xAD, 0xBE, 0xEF, 0, 1, 2], "the bytes de ad be ef 00 01 02"),
            (b"hello\nworld\n", "text beginning \"hello\""),
            (&[0u8; 4096], "the bytes 00 00"),
        ];
        for (bytes, expected) in cases {
            let err = err_of(bytes, 64 << 20);
            assert!(err.starts_with("not a kernel: the file is "), "{err}");
            assert!(err.contains(expected), "expected {expected:?} in {err:?}");
            assert!(err.ends_with(ACCEPTED), "{err}");
        }
        let mut boot_sector = vec![0u8; 512];
        boot_sector[510..].copy_from_slice(&[0x55, 0xAA]);
        assert_err(&boot_sector, "a PC boot sector");
        let mut shared = pvh_kernel(64);
        put(&mut shared, 16, &3u16.to_le_bytes());
        put(&mut shared, 0x800 + 12 + 4 + 4 + 8, &0u32.to_le_bytes()); // the Xen note becomes type 0
        assert_err(&shared, "the file is an ELF64 shared object without a PVH entry note or a Multiboot header");
    }

    /// Corrupts the headers of valid ELF32, ELF64, Multiboot and flat images byte by byte (a fixed
    /// pseudo-random sequence): every result is a kernel or an error, never a panic or a huge allocation.
    #[test]
    fn mangled_headers_never_panic() {
        let mem = mem();
        let images = [pvh_kernel(32), pvh_kernel(64), mb1_kernel(), mb2_kernel(&[])];
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..800 {
            let mut v = images[round % images.len()].clone();
            for _ in 0..1 + next() % 4 {
                let r = next();
                // Mostly the ELF header and program headers, sometimes the notes and Multiboot headers.
                let at = if r & 1 == 0 { (r >> 8) as usize % 200 } else { 0x800 + (r >> 8) as usize % 0x900 };
                if at < v.len() {
                    v[at] = (r >> 32) as u8;
                }
            }
            let _ = load_bytes(&mem, &v, 64 << 20);
        }
    }
}

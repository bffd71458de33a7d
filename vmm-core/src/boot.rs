//! Loading what a VM boots: a PVH ELF kernel or a Linux bzImage, its initrd and command line, and the
//! boot structures each protocol reads (PVH `hvm_start_info`; Linux `boot_params`, the "zero page").

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
    #[error("the bzImage has no 64-bit entry point (XLF_KERNEL_64)")]
    No64BitEntry,
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
/// ELF32 through [`elf`]), a Linux bzImage ("HdrS" at 0x202), a Multiboot 1 header in the first 8 KiB, a
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
                load_elf64_pvh(mem, files, low_ram_end)?
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
fn load_elf64_pvh(mem: &GuestMemoryMmap, files: &mut BootFiles, low_ram_end: u64) -> Result<u64, BootError> {
    let high = Some(GuestAddress(layout::HIGH_RAM_START));
    let loaded = Elf::load(mem, None, &mut files.kernel, high).map_err(BootError::Elf)?;
    if let PvhBootCapability::PvhEntryNotPresent = loaded.pvh_boot_cap {
        return Err(BootError::BadElf("linux-loader found no PVH entry note".into()));
    }
    if loaded.kernel_end > low_ram_end {
        return Err(BootError::KernelTooLarge { end: loaded.kernel_end });
    }
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
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry);
    }
    let kernel_end = loaded.kernel_end;
    if kernel_end > low_ram_end {
        return Err(BootError::KernelTooLarge { end: kernel_end });
    }
    let limit = low_ram_end.min(u64::from(header.initrd_addr_max) + 1).min(layout::INITRD_MAX_END);
    let initrd = load_initrd(mem, files, kernel_end, limit)?;
    write_zero_page(mem, header, &files.cmdline, initrd, e820, rsdp, fb)?;
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
}

//! Loading what a VM boots: a PVH ELF kernel or a Linux bzImage, its initrd and command line, and the
//! boot structures each protocol reads (PVH `hvm_start_info`; Linux `boot_params`, the "zero page").

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, E820Entry};

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode, paging off, %ebx = `hvm_start_info`.
    Pvh { rip: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, %rsi = `boot_params`.
    Linux64 { rip: u64 },
}

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {what}: {source}")]
    Read { what: &'static str, source: std::io::Error },
    #[error("the kernel is neither an ELF file with a PVH entry note nor a Linux bzImage ({0})")]
    NotAKernel(String),
    #[error("the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); only PVH ELF kernels boot directly")]
    NoPvhEntry,
    #[error("cannot load the ELF kernel: {0}")]
    Elf(linux_loader::loader::Error),
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
pub fn load(
    mem: &GuestMemoryMmap,
    files: &mut BootFiles,
    mem_bytes: u64,
    rsdp: u64,
    fb: Option<LinearFramebuffer>,
) -> Result<Entry, BootError> {
    let mut magic = [0u8; 4];
    files.kernel.seek(SeekFrom::Start(0)).map_err(read_error("the kernel"))?;
    let is_elf = files.kernel.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    files.kernel.seek(SeekFrom::Start(0)).map_err(read_error("the kernel"))?;

    let high = Some(GuestAddress(layout::HIGH_RAM_START));
    let low_ram_end = mem_bytes.min(layout::MMIO_HOLE_START);
    let e820 = layout::e820_map(mem_bytes);
    write_cmdline(mem, &files.cmdline)?;

    if is_elf {
        let loaded = Elf::load(mem, None, &mut files.kernel, high).map_err(|e| match e {
            linux_loader::loader::Error::Elf(_) => BootError::Elf(e),
            other => BootError::Elf(other),
        })?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(BootError::NoPvhEntry);
        };
        let kernel_end = loaded.kernel_end;
        if kernel_end > low_ram_end {
            return Err(BootError::KernelTooLarge { end: kernel_end });
        }
        let initrd = load_initrd(mem, files, kernel_end, low_ram_end.min(layout::INITRD_MAX_END))?;
        write_pvh_start_info(mem, initrd, &e820, rsdp)?;
        Ok(Entry::Pvh { rip: entry.raw_value() })
    } else {
        let loaded =
            BzImage::load(mem, None, &mut files.kernel, high).map_err(|e| BootError::NotAKernel(e.to_string()))?;
        let header = loaded.setup_header.ok_or_else(|| BootError::NotAKernel("no setup header".into()))?;
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
        write_zero_page(mem, header, &files.cmdline, initrd, &e820, rsdp, fb)?;
        Ok(Entry::Linux64 { rip: loaded.kernel_load.raw_value() + 0x200 })
    }
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

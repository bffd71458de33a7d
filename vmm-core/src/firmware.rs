//! Firmware boot: what a PC BIOS (SeaBIOS) needs from the machine besides the devices every VM has.
//!
//! - The BIOS image read-only at the top of 4 GiB (where the reset vector 0xFFFF_FFF0 lands in it), and its
//!   last 128 KiB also in RAM at 0xE_0000 (the "shadowed" copy real-mode code runs from; SeaBIOS enables
//!   writes to it through the host bridge's PAM registers, which cost nothing here because it is RAM).
//! - fw_cfg: the CPU counts, the boot menu switch, `etc/e820` (the RAM map), the VGA BIOS as
//!   `pci1234,1111.rom` or `pci1af4,1050.rom` (the display adapter's option ROM).
//! - The boot order, in the CMOS bytes QEMU's SeaBIOS reads (0x3D and the high nibble of 0x38: 2 hard disk,
//!   3 CD-ROM).
//!
//! - The machine's ACPI tables (the same as a direct boot's) as `etc/acpi/*` with the `etc/table-loader`
//!   commands SeaBIOS runs to place and link them.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::{BootDevice, FirmwareConfig};
use crate::devices::fw_cfg::{self, FwCfg};
use crate::devices::rtc::Rtc;
use crate::layout;

/// The BIOS area below 1 MiB that holds the copy.
pub const LOW_BIOS_BYTES: u64 = 128 << 10;
/// CMOS boot-order bytes (as QEMU sets them for SeaBIOS).
const CMOS_BOOT_FLAG1: u8 = 0x38;
const CMOS_BOOT_FLAG2: u8 = 0x3D;
/// How long SeaBIOS shows "Press ESC for boot menu", in ms.
pub const BOOT_MENU_WAIT_MS: u16 = 3000;

/// Why firmware could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("cannot read {what} {path:?}: {source}")]
    Read { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("the BIOS image is {0} bytes; SeaBIOS images are 128 or 256 KiB")]
    BiosSize(usize),
    #[error("the VGA BIOS image is {0} bytes; at most 256 KiB are accepted")]
    VgaBiosSize(usize),
    #[error("fw_cfg: {0}")]
    FwCfg(#[from] fw_cfg::FwCfgError),
    #[error("cannot copy the BIOS into guest memory")]
    Memory,
}

/// The images, read once (they stay the same across the guest's reboots).
pub struct FirmwareImages {
    pub bios: Vec<u8>,
    pub vga_bios: Vec<u8>,
    /// The fw_cfg file the VGA BIOS goes in (by the adapter's PCI ids).
    pub vga_rom_file: &'static str,
    pub log: Option<File>,
    pub boot_menu: bool,
    pub boot_order: Vec<BootDevice>,
}

fn read(what: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>, FirmwareError> {
    let err = |source| FirmwareError::Read { what, path: path.to_owned(), source };
    let mut bytes = Vec::new();
    File::open(path).map_err(err)?.take(limit + 1).read_to_end(&mut bytes).map_err(err)?;
    Ok(bytes)
}

impl FirmwareImages {
    /// The images of `config` for a VM whose display adapter is `vga`.
    pub fn load(config: &FirmwareConfig, vga: crate::config::VgaMode) -> Result<Self, FirmwareError> {
        let bios = read("the BIOS", &config.bios, 256 << 10)?;
        if !(bios.len() == 128 << 10 || bios.len() == 256 << 10) {
            return Err(FirmwareError::BiosSize(bios.len()));
        }
        let vga_bios = read("the VGA BIOS", &config.vga_bios_path(vga), 256 << 10)?;
        if vga_bios.len() > 256 << 10 {
            return Err(FirmwareError::VgaBiosSize(vga_bios.len()));
        }
        let log =
            match &config.log {
                Some(path) => {
                    Some(std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|source| {
                        FirmwareError::Read { what: "the firmware log", path: path.clone(), source }
                    })?)
                }
                None => None,
            };
        Ok(FirmwareImages {
            bios,
            vga_bios,
            vga_rom_file: vga.rom_file(),
            log,
            boot_menu: config.boot_menu,
            boot_order: config.boot_order.clone(),
        })
    }

    /// Where the image sits below 4 GiB.
    pub fn rom_address(&self) -> u64 {
        layout::RAM_ABOVE_4G - self.bios.len() as u64
    }

    /// Puts the last 128 KiB of the image at 0xE_0000 in RAM.
    pub fn copy_low(&self, mem: &GuestMemoryMmap) -> Result<(), FirmwareError> {
        let low = &self.bios[self.bios.len() - LOW_BIOS_BYTES as usize..];
        mem.write_slice(low, GuestAddress(0x10_0000 - LOW_BIOS_BYTES)).map_err(|_| FirmwareError::Memory)
    }

    /// The fw_cfg device for a machine with `mem_bytes` of RAM and `cpus` (present and possible) CPUs.
    pub fn fw_cfg(
        &self,
        mem: &GuestMemoryMmap,
        mem_bytes: u64,
        cpus: crate::acpi::Cpus,
    ) -> Result<FwCfg, FirmwareError> {
        let mut c = FwCfg::new(Some(mem.clone()));
        c.add_item(fw_cfg::NB_CPUS, u16::from(cpus.present).to_le_bytes().to_vec());
        c.add_item(fw_cfg::MAX_CPUS, u16::from(cpus.max).to_le_bytes().to_vec());
        c.add_item(fw_cfg::NOGRAPHIC, 0u16.to_le_bytes().to_vec());
        c.add_item(fw_cfg::BOOT_MENU, u16::from(self.boot_menu).to_le_bytes().to_vec());
        // IRQ0 arrives on IOAPIC pin 2 (KVM's PIT), as on every PC.
        c.add_item(fw_cfg::IRQ0_OVERRIDE, vec![1]);
        c.add_file("etc/e820", fw_cfg::e820_file(&e820(mem_bytes)))?;
        c.add_file("etc/boot-menu-wait", BOOT_MENU_WAIT_MS.to_le_bytes().to_vec())?;
        // The machine's ACPI tables, which SeaBIOS places and links (so the OS it boots can power off,
        // reboot and find every CPU and the PCI interrupts, as after a direct boot).
        let acpi = crate::acpi::firmware_tables(cpus);
        c.add_file(crate::acpi::RSDP_FILE, acpi.rsdp)?;
        c.add_file(crate::acpi::TABLES_FILE, acpi.tables)?;
        c.add_file(crate::acpi::LOADER_FILE, acpi.loader)?;
        // Named for the display's PCI id, so SeaBIOS runs it as that device's ROM and the VGA BIOS finds the
        // video memory where BAR 0 is.
        c.add_file(self.vga_rom_file, self.vga_bios.clone())?;
        Ok(c)
    }

    /// Sets the boot order in CMOS.
    pub fn set_boot_order(&self, rtc: &mut Rtc) {
        let code = |d: &BootDevice| match d {
            BootDevice::Disk => 2u8,
            BootDevice::Cdrom => 3u8,
        };
        let codes: Vec<u8> = self.boot_order.iter().map(code).take(3).collect();
        let at = |i: usize| codes.get(i).copied().unwrap_or(0);
        rtc.set_nvram(CMOS_BOOT_FLAG2, at(0) | at(1) << 4);
        // Bit 0 set: do not check the floppy's boot signature (there is no floppy).
        rtc.set_nvram(CMOS_BOOT_FLAG1, at(2) << 4 | 1);
    }
}

/// The RAM map for firmware: RAM below the hole (and above 4 GiB), and KVM's private pages reserved.
pub fn e820(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map: Vec<(u64, u64, u32)> = layout::ram_regions(mem_bytes).into_iter().map(|(a, s)| (a, s, 1)).collect();
    map.push((layout::KVM_IDENTITY_MAP, 0x4000, 2));
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ram_map_and_boot_order() {
        assert_eq!(e820(64 << 20), [(0, 64 << 20, 1), (layout::KVM_IDENTITY_MAP, 0x4000, 2)]);
        let big = e820(4 << 30);
        assert_eq!(big[1], (layout::RAM_ABOVE_4G, (4 << 30) - layout::MMIO_HOLE_START, 1));
        let images = FirmwareImages {
            bios: vec![0; 128 << 10],
            vga_bios: vec![],
            vga_rom_file: "pci1234,1111.rom",
            log: None,
            boot_menu: false,
            boot_order: vec![BootDevice::Cdrom, BootDevice::Disk],
        };
        assert_eq!(images.rom_address(), 0xFFFE_0000);
        let mut rtc = Rtc::new(64 << 20, 1);
        images.set_boot_order(&mut rtc);
        assert_eq!(rtc.nvram(CMOS_BOOT_FLAG2), 0x23);
        assert_eq!(rtc.nvram(CMOS_BOOT_FLAG1), 0x01);
    }
}

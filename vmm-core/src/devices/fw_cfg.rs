//! The firmware configuration interface QEMU defines and SeaBIOS reads ("fw_cfg"): numbered items
//! (signature, interface id, CPU counts, boot menu, …) and a directory of named files (`etc/e820`,
//! `bootorder`, `vgaroms/…`), read through a selector port and a data port, or in one go through the DMA
//! interface. Ports (as on QEMU's x86 machines): 0x510 selector (16-bit), 0x511 data (8-bit), 0x514/0x518
//! DMA address (big-endian, high then low half; writing the low half runs the transfer).
//!
//! The guest only reads: writes to the data port and DMA writes are refused, so nothing the guest does
//! changes what the host configured. A DMA request is bounded by the guest's own memory.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BusDevice;

/// First port: the selector.
pub const FW_CFG_PORT: u16 = 0x510;
/// Selector, data, (pad), DMA high, DMA low.
pub const FW_CFG_PORT_LEN: u64 = 0x0C;

const PORT_SELECTOR: u64 = 0;
const PORT_DATA: u64 = 1;
const PORT_DMA_HIGH: u64 = 4;
const PORT_DMA_LOW: u64 = 8;

/// Well-known item numbers.
pub const SIGNATURE: u16 = 0x00;
pub const ID: u16 = 0x01;
pub const NOGRAPHIC: u16 = 0x04;
pub const NB_CPUS: u16 = 0x05;
pub const BOOT_MENU: u16 = 0x0E;
pub const MAX_CPUS: u16 = 0x0F;
pub const IRQ0_OVERRIDE: u16 = 0x8002;
pub const FILE_DIR: u16 = 0x19;
/// Named files get selectors from here on.
pub const FILE_FIRST: u16 = 0x20;
/// Interface id bits: the traditional port interface and DMA.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;
/// Longest file name, NUL included (the directory's fixed field).
pub const MAX_NAME: usize = 56;

/// DMA control bits.
const DMA_ERROR: u32 = 0x01;
const DMA_READ: u32 = 0x02;
const DMA_SKIP: u32 = 0x04;
const DMA_SELECT: u32 = 0x08;
const DMA_WRITE: u32 = 0x10;

/// Why an item could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg file name {0:?} is empty or longer than {max} bytes", max = MAX_NAME - 1)]
    BadName(String),
    #[error("fw_cfg file {0:?} exists already")]
    Duplicate(String),
    #[error("fw_cfg has no selector left for another file")]
    Full,
}

/// The device: items by selector, the file directory, and the read position.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
    dma_high: u32,
    mem: Option<GuestMemoryMmap>,
}

impl FwCfg {
    /// An interface with its signature and id; `mem` enables DMA (without it only the ports work).
    pub fn new(mem: Option<GuestMemoryMmap>) -> Self {
        let mut c = FwCfg { items: BTreeMap::new(), files: Vec::new(), selected: 0, offset: 0, dma_high: 0, mem: None };
        c.items.insert(SIGNATURE, b"QEMU".to_vec());
        let id = ID_TRADITIONAL | if mem.is_some() { ID_DMA } else { 0 };
        c.items.insert(ID, id.to_le_bytes().to_vec());
        c.mem = mem;
        c.rebuild_directory();
        c
    }

    /// Sets numbered item `selector` (little-endian integers, as QEMU stores them).
    pub fn add_item(&mut self, selector: u16, bytes: Vec<u8>) {
        self.items.insert(selector, bytes);
    }

    /// Adds a named file.
    pub fn add_file(&mut self, name: &str, bytes: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() >= MAX_NAME || name.contains('\0') {
            return Err(FwCfgError::BadName(name.to_owned()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.to_owned()));
        }
        let selector =
            FILE_FIRST.checked_add(self.files.len() as u16).filter(|s| *s < 0x4000).ok_or(FwCfgError::Full)?;
        self.items.insert(selector, bytes);
        self.files.push((name.to_owned(), selector));
        self.rebuild_directory();
        Ok(selector)
    }

    /// The directory item: a big-endian count, then per file its size, selector, a reserved u16 and its
    /// name in a NUL-padded 56-byte field. Kept sorted by name, as QEMU keeps it.
    fn rebuild_directory(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (name, selector) in &files {
            let size = self.items.get(selector).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&selector.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; MAX_NAME];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
        }
        self.items.insert(FILE_DIR, dir);
    }

    fn select(&mut self, selector: u16) {
        if let Some((name, _)) = self.files.iter().find(|(_, s)| *s == selector) {
            log::debug!("fw_cfg: the guest reads {name}");
        }
        self.selected = selector;
        self.offset = 0;
    }

    /// The next byte of the selected item (0 past its end, or for an unknown item).
    fn next_byte(&mut self) -> u8 {
        let byte = self.items.get(&self.selected).and_then(|i| i.get(self.offset)).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        byte
    }

    /// Runs the DMA request whose descriptor is at `address`: control, length, address (big-endian).
    fn dma(&mut self, address: u64) {
        let Some(mem) = self.mem.clone() else { return };
        let mut descriptor = [0u8; 16];
        if mem.read_slice(&mut descriptor, GuestAddress(address)).is_err() {
            return;
        }
        let control = u32::from_be_bytes(descriptor[0..4].try_into().unwrap_or_default());
        let length = u32::from_be_bytes(descriptor[4..8].try_into().unwrap_or_default()) as usize;
        let target = u64::from_be_bytes(descriptor[8..16].try_into().unwrap_or_default());
        let mut status = 0;
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        if control & DMA_WRITE != 0 {
            status = DMA_ERROR; // nothing here is writable by the guest
        } else if control & DMA_READ != 0 {
            let item: &[u8] = self.items.get(&self.selected).map_or(&[], Vec::as_slice);
            let available = item.len().saturating_sub(self.offset).min(length);
            let ok = mem.write_slice(&item[self.offset.min(item.len())..][..available], GuestAddress(target)).is_ok();
            // Past the item's end the guest reads zeros, written in bounded chunks.
            let zeros = [0u8; 4096];
            let mut done = available;
            let mut zero_ok = true;
            while ok && zero_ok && done < length {
                let n = (length - done).min(zeros.len());
                zero_ok = mem.write_slice(&zeros[..n], GuestAddress(target.wrapping_add(done as u64))).is_ok();
                done += n;
            }
            if !ok || !zero_ok {
                status = DMA_ERROR;
            }
            self.offset = self.offset.saturating_add(length);
        } else if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(length);
        }
        let _ = mem.write_slice(&status.to_be_bytes(), GuestAddress(address));
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            PORT_DATA => {
                for b in data.iter_mut() {
                    *b = self.next_byte();
                }
            }
            // "QEMU CFG" read from the DMA port tells the guest DMA is there.
            PORT_DMA_HIGH if self.mem.is_some() && data.len() == 4 => data.copy_from_slice(b"QEMU"),
            PORT_DMA_LOW if self.mem.is_some() && data.len() == 4 => data.copy_from_slice(b" CFG"),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (PORT_SELECTOR, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (PORT_DMA_HIGH, 4) => self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            (PORT_DMA_LOW, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let address = u64::from(self.dma_high) << 32 | u64::from(low);
                self.dma_high = 0;
                self.dma(address);
            }
            _ => {} // data-port writes: nothing is writable
        }
    }
}

/// The `etc/e820` file: 20-byte entries (address, length, type; little-endian).
pub fn e820_file(entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 20);
    for (address, length, kind) in entries {
        out.extend_from_slice(&address.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
    }
    out
}

impl crate::snapshot::DeviceState for FwCfg {
    /// Where the firmware is in reading items (the items are the configuration's, made again on restore).
    fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u16(self.selected);
        w.u64(self.offset as u64);
        w.u32(self.dma_high);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let (selected, offset, dma_high) = (r.u16()?, r.u64()?, r.u32()?);
        // An offset past the item reads as the end of it, as on the device.
        (self.selected, self.offset, self.dma_high) = (selected, offset.min(u64::from(u32::MAX)) as usize, dma_high);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(c: &mut FwCfg, selector: u16, len: usize) -> Vec<u8> {
        c.write(PORT_SELECTOR, &selector.to_le_bytes());
        let mut out = vec![0u8; len];
        c.read(PORT_DATA, &mut out);
        out
    }

    #[test]
    fn signature_id_items_and_the_file_directory() {
        let mut c = FwCfg::new(None);
        assert_eq!(read_item(&mut c, SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut c, ID, 4), 1u32.to_le_bytes(), "no DMA without guest memory");
        c.add_item(NB_CPUS, 2u16.to_le_bytes().to_vec());
        assert_eq!(read_item(&mut c, NB_CPUS, 2), [2, 0]);
        c.add_file("etc/e820", e820_file(&[(0, 0x9FC00, 1)])).unwrap();
        c.add_file("bootorder", b"/pci@i0cf8/x\n".to_vec()).unwrap();
        assert_eq!(c.add_file("bootorder", vec![]), Err(FwCfgError::Duplicate("bootorder".into())));
        assert!(matches!(c.add_file(&"x".repeat(56), vec![]), Err(FwCfgError::BadName(_))));
        let dir = read_item(&mut c, FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &2u32.to_be_bytes());
        // Sorted by name: bootorder first.
        assert_eq!(&dir[4..8], &13u32.to_be_bytes());
        assert_eq!(&dir[8..10], &(FILE_FIRST + 1).to_be_bytes());
        assert_eq!(&dir[12..21], b"bootorder");
        assert_eq!(&dir[68..72], &20u32.to_be_bytes());
        assert_eq!(&dir[76..84], b"etc/e820");
        let e820 = read_item(&mut c, FILE_FIRST, 24);
        assert_eq!(&e820[8..16], &0x9FC00u64.to_le_bytes());
        assert_eq!(&e820[20..], &[0; 4], "past the end: zeros");
        assert_eq!(read_item(&mut c, 0x1234, 3), [0, 0, 0], "unknown items read as zeros");
        // Writes change nothing.
        c.write(PORT_SELECTOR, &SIGNATURE.to_le_bytes());
        c.write(PORT_DATA, b"X");
        assert_eq!(read_item(&mut c, SIGNATURE, 4), b"QEMU");
    }

    #[test]
    fn dma_reads_skips_and_refuses_writes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut c = FwCfg::new(Some(mem.clone()));
        assert_eq!(read_item(&mut c, ID, 4), 3u32.to_le_bytes());
        let sel = c.add_file("vgaroms/test.bin", (0..100u8).collect()).unwrap();
        let run = |c: &mut FwCfg, control: u32, length: u32, target: u64| -> u32 {
            let mut d = control.to_be_bytes().to_vec();
            d.extend_from_slice(&length.to_be_bytes());
            d.extend_from_slice(&target.to_be_bytes());
            mem.write_slice(&d, GuestAddress(0x1000)).unwrap();
            c.write(PORT_DMA_HIGH, &0u32.to_be_bytes());
            c.write(PORT_DMA_LOW, &0x1000u32.to_be_bytes());
            let mut status = [0u8; 4];
            mem.read_slice(&mut status, GuestAddress(0x1000)).unwrap();
            u32::from_be_bytes(status)
        };
        // Select + skip 10, then read 20: bytes 10..30.
        assert_eq!(run(&mut c, u32::from(sel) << 16 | DMA_SELECT | DMA_SKIP, 10, 0), 0);
        assert_eq!(run(&mut c, DMA_READ, 20, 0x2000), 0);
        let mut got = [0u8; 20];
        mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(got.to_vec(), (10..30u8).collect::<Vec<_>>());
        // Reading past the end gives zeros; a read outside guest memory is an error, not a crash.
        mem.write_slice(&[0xAA; 100], GuestAddress(0x3000)).unwrap();
        assert_eq!(run(&mut c, DMA_READ, 100, 0x3000), 0);
        let mut tail = [0u8; 100];
        mem.read_slice(&mut tail, GuestAddress(0x3000)).unwrap();
        assert_eq!(&tail[..70], &(30..100u8).collect::<Vec<_>>()[..]);
        assert!(tail[70..].iter().all(|&b| b == 0));
        assert_eq!(run(&mut c, DMA_READ | DMA_SELECT | u32::from(sel) << 16, 0xFFFF_FFFF, 0xF000), DMA_ERROR);
        assert_eq!(run(&mut c, DMA_WRITE, 4, 0x2000), DMA_ERROR);
        // A descriptor outside memory: ignored.
        c.write(PORT_DMA_LOW, &0xFFFF_0000u32.to_be_bytes());
    }
}

//! A PCI type 0 configuration header (256 bytes) with the behaviour every function shares: read-only
//! identification, a command register, memory BARs that answer the all-ones sizing probe, a capability
//! list and the interrupt line/pin registers. Devices embed one and add their own registers around it.

/// Command register bits the guest may set.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: a capability list is present.
const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Registers (dword indexes).
const REG_COMMAND: usize = 1;
const REG_BAR0: usize = 4;
const REG_CAPABILITIES: usize = 13;
const REG_INTERRUPT: usize = 15;
/// Number of BARs in a type 0 header.
pub const BAR_COUNT: usize = 6;
/// Where capabilities start (just past the header).
const FIRST_CAPABILITY: usize = 0x40;

/// Identification of a PCI function.
#[derive(Debug, Clone, Copy)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface, as the 24-bit value in register 2.
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// The configuration header of one function.
#[derive(Debug, Clone)]
pub struct PciConfig {
    regs: [u32; 64],
    /// Bits of each register the guest may change.
    writable: [u32; 64],
    /// Size of each memory BAR (0: not implemented).
    bar_sizes: [u64; BAR_COUNT],
    /// Where the next capability goes; the last capability's "next" byte.
    next_capability: usize,
    last_capability_next: Option<usize>,
}

impl PciConfig {
    pub fn new(id: PciId) -> Self {
        let mut c = PciConfig {
            regs: [0; 64],
            writable: [0; 64],
            bar_sizes: [0; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability_next: None,
        };
        c.regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        c.regs[2] = u32::from(id.revision) | (id.class << 8);
        c.regs[11] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        c.writable[REG_COMMAND] = u32::from(COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
        c.writable[REG_INTERRUPT] = 0xFF; // interrupt line: scratch for the OS
        c
    }

    /// Declares a 32-bit, non-prefetchable memory BAR of `size` bytes (a power of two, at least 16),
    /// placed at `address` (aligned to `size`).
    pub fn add_memory_bar(&mut self, index: usize, size: u64, address: u64) {
        debug_assert!(index < BAR_COUNT && size.is_power_of_two() && size >= 16 && address.is_multiple_of(size));
        self.bar_sizes[index] = size;
        self.writable[REG_BAR0 + index] = !(size as u32 - 1) & !0xF;
        self.regs[REG_BAR0 + index] = address as u32;
    }

    /// Declares a 32-bit prefetchable memory BAR (like [`add_memory_bar`](Self::add_memory_bar)).
    pub fn add_prefetchable_memory_bar(&mut self, index: usize, size: u64, address: u64) {
        self.add_memory_bar(index, size, address);
        self.regs[REG_BAR0 + index] |= 1 << 3;
    }

    /// Declares that the function raises INTA# on `line` (what firmware would write in the line register).
    pub fn set_interrupt(&mut self, line: u8) {
        self.regs[REG_INTERRUPT] = u32::from(line) | (1 << 8);
    }

    /// Appends a capability (`body` starts with its ID byte; the "next" byte is filled in) and returns its
    /// offset in configuration space. Capabilities are read-only to the guest.
    pub fn add_capability(&mut self, body: &[u8]) -> usize {
        let offset = self.next_capability;
        assert!(body.len() >= 2 && offset + body.len() <= 256, "PCI capability does not fit");
        let mut bytes = body.to_vec();
        bytes[1] = 0;
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(offset + i, *b);
        }
        match self.last_capability_next {
            Some(next) => self.set_byte(next, offset as u8),
            None => {
                self.regs[REG_CAPABILITIES] = offset as u32;
                self.regs[REG_COMMAND] |= u32::from(STATUS_CAPABILITIES) << 16;
            }
        }
        self.last_capability_next = Some(offset + 1);
        self.next_capability = (offset + bytes.len()).next_multiple_of(4);
        offset
    }

    /// Lets the guest change `mask` bits of dword register `reg` (a capability's control bits).
    pub fn set_writable(&mut self, reg: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(reg) {
            *w |= mask;
        }
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xFF << shift)) | (u32::from(value) << shift);
    }

    /// Reads dword register `reg` (0..64).
    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xFFFF_FFFF)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` of dword register `reg`; bits the guest may not
    /// change keep their value. A BAR written with all ones then reads back its size mask.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= 64 || offset + data.len() > 4 {
            return;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << ((offset + i) * 8);
            mask |= 0xFF << ((offset + i) * 8);
        }
        let writable = self.writable[reg] & mask;
        self.regs[reg] = (self.regs[reg] & !writable) | (value & writable);
    }

    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND] as u16
    }

    /// The address of memory BAR `index` if the BAR exists, memory decoding is on and the BAR is placed.
    pub fn memory_bar(&self, index: usize) -> Option<(u64, u64)> {
        let size = *self.bar_sizes.get(index)?;
        let address = u64::from(self.regs[REG_BAR0 + index] & !0xF);
        (size != 0
            && self.command() & COMMAND_MEMORY != 0
            && address != 0
            && address != u64::from(!(size as u32 - 1) & !0xF))
        .then_some((address, size))
    }

    /// Which memory BAR holds `address`, and the offset in it.
    pub fn find_bar(&self, address: u64) -> Option<(usize, u64)> {
        (0..BAR_COUNT).find_map(|i| {
            let (base, size) = self.memory_bar(i)?;
            (address >= base && address - base < size).then(|| (i, address - base))
        })
    }

    /// The interrupt line register.
    pub fn interrupt_line(&self) -> u8 {
        self.regs[REG_INTERRUPT] as u8
    }
}

impl PciConfig {
    /// The registers, for a machine-state file.
    pub fn save(&self, w: &mut crate::snapshot::Writer) {
        for reg in self.regs {
            w.u32(reg);
        }
    }

    /// Registers saved by [`save`](Self::save): only the bits the guest may change are taken (the identity
    /// and the BAR sizes stay this device's).
    pub fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let mut regs = [0u32; 64];
        for reg in &mut regs {
            *reg = r.u32()?;
        }
        for (i, saved) in regs.into_iter().enumerate() {
            self.regs[i] = (saved & self.writable[i]) | (self.regs[i] & !self.writable[i]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciId {
        PciId { vendor: 0x1AF4, device: 0x1042, revision: 1, class: 0x018000, subsystem_vendor: 0x1AF4, subsystem: 2 }
    }

    #[test]
    fn identification_is_read_only() {
        let mut c = PciConfig::new(id());
        c.write(0, 0, &[0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(c.read(0), 0x1042_1AF4);
        assert_eq!(c.read(2), 0x0180_0001);
    }

    #[test]
    fn bars_answer_the_sizing_probe_and_decode_only_when_enabled() {
        let mut c = PciConfig::new(id());
        c.add_memory_bar(0, 0x4000, 0xC000_0000);
        assert_eq!(c.memory_bar(0), None, "memory decoding is off after reset");
        c.write(1, 0, &[COMMAND_MEMORY as u8]);
        assert_eq!(c.memory_bar(0), Some((0xC000_0000, 0x4000)));
        assert_eq!(c.find_bar(0xC000_3FFF), Some((0, 0x3FFF)));
        assert_eq!(c.find_bar(0xC000_4000), None);
        c.write(4, 0, &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(c.read(4), 0xFFFF_C000);
        assert_eq!(c.memory_bar(0), None, "a probed BAR decodes nothing");
        c.write(4, 0, &0xD000_0000u32.to_le_bytes());
        assert_eq!(c.memory_bar(0), Some((0xD000_0000, 0x4000)));
        // Unimplemented BARs read as zero and stay zero.
        c.write(5, 0, &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(c.read(5), 0);
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = PciConfig::new(id());
        let a = c.add_capability(&[0x09, 0, 4, 1]);
        let b = c.add_capability(&[0x09, 0, 5, 2, 0xAA]);
        assert_eq!((a, b), (0x40, 0x44));
        assert_eq!(c.read(13) & 0xFF, 0x40);
        assert_ne!(c.read(1) & (1 << 20), 0, "status says there is a list");
        assert_eq!(c.read(0x40 / 4), 0x0104_4409);
        assert_eq!(c.read(0x44 / 4), 0x0205_0009);
        assert_eq!(c.read(0x48 / 4) & 0xFF, 0xAA);
    }

    #[test]
    fn interrupt_line_is_scratch_and_pin_is_fixed() {
        let mut c = PciConfig::new(id());
        c.set_interrupt(17);
        c.write(15, 0, &[0x0B, 0x07]);
        assert_eq!(c.read(15) & 0xFFFF, 0x010B);
        assert_eq!(c.interrupt_line(), 11);
    }
}

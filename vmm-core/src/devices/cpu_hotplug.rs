//! ACPI CPU hotplug: the register block through which the DSDT's `\_SB.CPUS` (see `acpi::cpu_hotplug`) learns
//! which vCPUs are present and which were just plugged in. A VM started with room for more vCPUs than it
//! has (`max_vcpus`) lists every possible CPU in the MADT (the absent ones disabled) and in the DSDT; when
//! the host adds vCPUs it creates and starts them first, then marks them *inserting* here and raises GPE
//! [`GPE_CPU_HOTPLUG`]; the guest's `_E02` walks the CPUs, notifies each inserting one (device check) and
//! acknowledges it. The guest then brings the CPU online with INIT/SIPI as at boot.
//!
//! Registers (port I/O at [`CPU_HOTPLUG_PORT`], little endian):
//! - offset 0, 32 bits, read/write: the selected CPU (its APIC id, which is its index);
//! - offset 4, read: bit 0 the selected CPU is present, bit 1 it is inserting (plugged, not yet
//!   acknowledged); write: a 1 in bit 1 acknowledges the insertion. Other bits read 0 and are ignored.
//!
//! Removal is not offered: a vCPU, once added, stays until the VM stops.

use super::BusDevice;

pub const CPU_HOTPLUG_PORT: u16 = 0x0CD8;
pub const CPU_HOTPLUG_LEN: u64 = 8;
/// The general-purpose event the device raises (its `\_GPE._Exx` method).
pub const GPE_CPU_HOTPLUG: u16 = 2;

const PRESENT: u8 = 1 << 0;
const INSERTING: u8 = 1 << 1;

/// Which CPUs are present and which are being inserted, out of `max`.
#[derive(Debug)]
pub struct CpuHotplug {
    selected: u32,
    present: u32,
    inserting: Vec<bool>,
}

impl CpuHotplug {
    /// A machine with CPUs `0..present` present out of `0..max` possible.
    pub fn new(present: u32, max: u32) -> Self {
        CpuHotplug { selected: 0, present: present.min(max), inserting: vec![false; max as usize] }
    }

    pub fn present(&self) -> u32 {
        self.present
    }

    /// Marks CPUs `present..count` present and inserting; returns how many were added (0 when `count` is not
    /// above the present count; never beyond the maximum).
    pub fn plug_up_to(&mut self, count: u32) -> u32 {
        let count = count.min(self.inserting.len() as u32);
        let added = count.saturating_sub(self.present);
        for index in self.present..count {
            self.inserting[index as usize] = true;
        }
        self.present = self.present.max(count);
        added
    }

    fn status(&self) -> u8 {
        let index = self.selected as usize;
        let mut status = 0;
        if self.selected < self.present {
            status |= PRESENT;
        }
        if self.inserting.get(index).copied().unwrap_or(false) {
            status |= INSERTING;
        }
        status
    }

    fn registers(&self) -> [u8; 8] {
        let mut r = [0; 8];
        r[0..4].copy_from_slice(&self.selected.to_le_bytes());
        r[4] = self.status();
        r
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.registers();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| regs.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut selected = self.selected.to_le_bytes();
        for (i, &byte) in data.iter().enumerate() {
            match usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) {
                Some(at @ 0..=3) => selected[at] = byte,
                Some(4) if byte & INSERTING != 0 => {
                    if let Some(flag) = self.inserting.get_mut(self.selected as usize) {
                        *flag = false;
                    }
                }
                _ => {}
            }
        }
        self.selected = u32::from_le_bytes(selected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(dev: &mut CpuHotplug, cpu: u32) -> u8 {
        dev.write(0, &cpu.to_le_bytes());
        let mut s = [0u8; 4];
        dev.read(4, &mut s);
        s[0]
    }

    #[test]
    fn plugged_cpus_are_present_and_inserting_until_acknowledged() {
        let mut dev = CpuHotplug::new(1, 4);
        assert_eq!(status(&mut dev, 0), PRESENT);
        assert_eq!(status(&mut dev, 1), 0);
        assert_eq!(dev.plug_up_to(3), 2);
        assert_eq!(status(&mut dev, 1), PRESENT | INSERTING);
        assert_eq!(status(&mut dev, 2), PRESENT | INSERTING);
        assert_eq!(status(&mut dev, 3), 0);
        // The selected CPU's insertion is acknowledged (a 32-bit write, as the DSDT's DWord field does).
        dev.write(0, &1u32.to_le_bytes());
        dev.write(4, &u32::from(INSERTING).to_le_bytes());
        assert_eq!(status(&mut dev, 1), PRESENT);
        assert_eq!(status(&mut dev, 2), PRESENT | INSERTING);
        let mut sel = [0u8; 4];
        dev.read(0, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), 2);
    }

    #[test]
    fn plugging_never_goes_past_the_maximum_or_back() {
        let mut dev = CpuHotplug::new(2, 3);
        assert_eq!(dev.plug_up_to(2), 0);
        assert_eq!(dev.plug_up_to(1), 0);
        assert_eq!(dev.present(), 2);
        assert_eq!(dev.plug_up_to(200), 1);
        assert_eq!(dev.present(), 3);
        assert_eq!(status(&mut dev, 2), PRESENT | INSERTING);
    }

    #[test]
    fn hostile_selectors_and_offsets_read_nothing_and_change_nothing() {
        let mut dev = CpuHotplug::new(1, 2);
        assert_eq!(status(&mut dev, u32::MAX), 0);
        dev.write(4, &[0xFF]); // acknowledging a CPU that does not exist
        let mut far = [0xAAu8; 4];
        dev.read(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
        dev.write(u64::MAX - 1, &[1, 2, 3]);
        assert_eq!(status(&mut dev, 0), PRESENT);
    }
}

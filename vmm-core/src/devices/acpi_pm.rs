//! ACPI fixed-hardware power management: the PM1a event block (status + enable) at 0x600 and the PM1a
//! control block at 0x604, where QEMU's PIIX4 has them. The guest powers off by writing SLP_EN with the
//! sleep type the DSDT's `\_S5` names; the host asks for a graceful stop by "pressing" the power button
//! (PWRBTN_STS, raising the SCI if the guest enabled the event). The GPE0 block at 0x620 (as on QEMU's Q35)
//! carries the general-purpose events the DSDT's `\_GPE` methods serve (CPU hotplug).

use super::{BusDevice, IrqLine, MachineControl, MachineRequest};

pub const PM1A_EVT_PORT: u16 = 0x600;
pub const PM1A_EVT_LEN: u64 = 4;
pub const PM1A_CNT_PORT: u16 = 0x604;
pub const PM1A_CNT_LEN: u64 = 2;
pub const GPE0_PORT: u16 = 0x620;
/// Two bytes of status, then two of enable: GPEs 0-15.
pub const GPE0_LEN: u64 = 4;
/// The SCI's ISA IRQ (and GSI).
pub const SCI_IRQ: u32 = 9;
/// The sleep type of S5 (soft-off) in the DSDT.
pub const SLP_TYP_S5: u16 = 0;

const PWRBTN: u16 = 1 << 8;
const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;

/// A 16-bit status register (write one to clear) beside its 16-bit enable register: the layout of the PM1a
/// event block and of a 16-event GPE block. An event sets its status bit; the SCI is raised when an enabled
/// event happens, and when the guest enables an event whose status is already set (an event that came while
/// it was disabled is delivered then).
pub struct EventBlock {
    status: u16,
    enable: u16,
    sci: IrqLine,
}

impl EventBlock {
    pub fn new(sci: IrqLine) -> Self {
        EventBlock { status: 0, enable: 0, sci }
    }

    /// Signals the events in `bits`; returns whether the guest had enabled them (whether anyone notices).
    fn signal(&mut self, bits: u16) -> bool {
        self.status |= bits;
        let noticed = bits != 0 && self.enable & bits == bits;
        if noticed {
            self.sci.trigger();
        }
        noticed
    }
}

impl BusDevice for EventBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut regs = [0u8; 4];
        regs[0..2].copy_from_slice(&self.status.to_le_bytes());
        regs[2..4].copy_from_slice(&self.enable.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = regs.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut clear = [0u8; 2];
        let mut enable = self.enable.to_le_bytes();
        for (i, &byte) in data.iter().enumerate() {
            match offset as usize + i {
                at @ 0..=1 => clear[at] = byte,
                at @ 2..=3 => enable[at - 2] = byte,
                _ => {}
            }
        }
        self.status &= !u16::from_le_bytes(clear);
        let was = self.enable;
        self.enable = u16::from_le_bytes(enable);
        if self.enable & !was & self.status != 0 {
            self.sci.trigger();
        }
    }
}

impl crate::snapshot::DeviceState for EventBlock {
    fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u16(self.status);
        w.u16(self.enable);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        (self.status, self.enable) = (r.u16()?, r.u16()?);
        Ok(())
    }
}

/// The PM1a event block (at [`PM1A_EVT_PORT`]): fixed events, of which the VM has the power button.
pub type Pm1Event = EventBlock;

impl EventBlock {
    /// Presses the power button (PM1a). Returns whether the guest has enabled the power-button event, i.e.
    /// whether anyone will notice.
    pub fn press_power_button(&mut self) -> bool {
        self.signal(PWRBTN)
    }

    /// Signals general-purpose event `gpe` (0-15, a GPE0 block). Returns whether the guest had enabled it.
    pub fn raise(&mut self, gpe: u16) -> bool {
        self.signal(1u16.checked_shl(u32::from(gpe)).unwrap_or(0))
    }
}

/// The GPE0 block (at [`GPE0_PORT`]): general-purpose events 0-15, which the DSDT's `\_GPE._Exx` methods serve.
pub type Gpe0 = EventBlock;

/// PM1a control register.
pub struct Pm1Control {
    value: u16,
    machine: MachineControl,
}

impl Pm1Control {
    pub fn new(machine: MachineControl) -> Self {
        Pm1Control { value: SCI_EN, machine }
    }
}

impl BusDevice for Pm1Control {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = regs.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut regs = self.value.to_le_bytes();
        for (i, &byte) in data.iter().enumerate() {
            if let Some(r) = regs.get_mut(offset as usize + i) {
                *r = byte;
            }
        }
        let value = u16::from_le_bytes(regs);
        // SCI_EN stays set (ACPI mode only); SLP_EN is write-only.
        self.value = (value & !SLP_EN) | SCI_EN;
        if value & SLP_EN != 0 && (value >> 10) & 7 == SLP_TYP_S5 {
            self.machine.request(MachineRequest::PowerOff);
        }
    }
}

impl crate::snapshot::DeviceState for Pm1Control {
    fn save(&self, w: &mut crate::snapshot::Writer) {
        w.u16(self.value);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        self.value = r.u16()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn slp_en_with_s5_powers_off() {
        let machine = MachineControl::new().unwrap();
        let mut cnt = Pm1Control::new(machine.clone());
        let mut v = [0; 2];
        cnt.read(0, &mut v);
        assert_eq!(u16::from_le_bytes(v) & SCI_EN, SCI_EN);
        cnt.write(0, &(5u16 << 10).to_le_bytes()); // type only, no SLP_EN
        assert_eq!(machine.take(), MachineRequest::None);
        cnt.write(0, &(3u16 << 10 | SLP_EN).to_le_bytes()); // S3: not declared, ignored
        assert_eq!(machine.take(), MachineRequest::None);
        cnt.write(0, &0x2000u16.to_le_bytes());
        assert_eq!(machine.take(), MachineRequest::PowerOff);
    }

    #[test]
    fn power_button_sets_status_and_raises_the_sci_when_enabled() {
        let sci = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut evt = Pm1Event::new(sci.clone());
        assert!(!evt.press_power_button(), "not enabled yet");
        assert!(sci.eventfd().read().is_err(), "no SCI while disabled");
        // Enabling with the status already set raises the SCI.
        evt.write(2, &PWRBTN.to_le_bytes());
        assert_eq!(sci.eventfd().read().unwrap(), 1);
        let mut status = [0; 2];
        evt.read(0, &mut status);
        assert_eq!(u16::from_le_bytes(status), PWRBTN);
        evt.write(0, &PWRBTN.to_le_bytes()); // write one to clear
        evt.read(0, &mut status);
        assert_eq!(u16::from_le_bytes(status), 0);
        assert!(evt.press_power_button());
        assert_eq!(sci.eventfd().read().unwrap(), 1);
        let mut all = [0; 4];
        evt.read(0, &mut all);
        assert_eq!(all, [0, 1, 0, 1]);
    }

    #[test]
    fn a_gpe_raises_the_sci_only_once_enabled_and_clears_by_writing_one() {
        let sci = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut gpe = Gpe0::new(sci.clone());
        assert!(!gpe.raise(2), "not enabled yet");
        assert!(sci.eventfd().read().is_err(), "no SCI while disabled");
        gpe.write(2, &[0b100, 0]); // enable GPE 2: the pending event is delivered
        assert_eq!(sci.eventfd().read().unwrap(), 1);
        let mut regs = [0; 4];
        gpe.read(0, &mut regs);
        assert_eq!(regs, [0b100, 0, 0b100, 0]);
        gpe.write(0, &[0b100]);
        gpe.read(0, &mut regs);
        assert_eq!(regs, [0, 0, 0b100, 0]);
        assert!(gpe.raise(2));
        assert_eq!(sci.eventfd().read().unwrap(), 1);
        assert!(!gpe.raise(40), "no such GPE: nothing raised");
        assert!(sci.eventfd().read().is_err());
    }
}

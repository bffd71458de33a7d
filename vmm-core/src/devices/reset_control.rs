//! The PIIX reset control register at 0xCF9: writing a value with RST_CPU (bit 2) set resets the machine.
//! The FADT names it as the ACPI reset register.

use super::{BusDevice, MachineControl, MachineRequest};

pub const RESET_PORT: u16 = 0xCF9;
/// What the FADT tells the guest to write (SYS_RST | RST_CPU).
pub const RESET_VALUE: u8 = 0x06;
const RST_CPU: u8 = 0x04;

pub struct ResetControl {
    value: u8,
    machine: MachineControl,
}

impl ResetControl {
    pub fn new(machine: MachineControl) -> Self {
        ResetControl { value: 0, machine }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.value;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        self.value = data[0] & 0x0E;
        if data[0] & RST_CPU != 0 {
            self.machine.request(MachineRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rst_cpu_resets() {
        let machine = MachineControl::new().unwrap();
        let mut dev = ResetControl::new(machine.clone());
        dev.write(0, &[0x02]);
        assert_eq!(machine.take(), MachineRequest::None);
        dev.write(0, &[RESET_VALUE]);
        assert_eq!(machine.take(), MachineRequest::Reset);
    }
}

//! The guest-facing registers of the legacy devices: the i8042 keyboard controller (with host key and
//! mouse input between the guest's accesses), fw_cfg (selector, data port and DMA from guest memory),
//! the VGA register file and the Bochs DISPI registers. `data[0]` picks the device, `data[1..65]` is
//! guest memory at 0x1000 (fw_cfg DMA descriptors), then 6-byte operations: kind (bit 0: write, bits
//! 1-2: access size 1/2/4/8, bit 3 on the i8042: host input instead), offset, four value bytes.
#![no_main]

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::devices::BusDevice;
use vmm_core::devices::dispi::Dispi;
use vmm_core::devices::fw_cfg::{FW_CFG_PORT_LEN, FwCfg};
use vmm_core::devices::i8042::I8042;
use vmm_core::devices::vga::Vga;
use vmm_core::devices::{IrqLine, MachineControl};
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let (memory, ops) = rest.split_at(rest.len().min(64));
    let which = which % 4;
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]) else { return };
    let _ = mem.write_slice(memory, GuestAddress(0x1000));
    let irq = || EventFd::new(libc::EFD_NONBLOCK).map(IrqLine::new);
    let (Ok(kbd), Ok(mouse), Ok(machine)) = (irq(), irq(), MachineControl::new()) else { return };
    let mut i8042 = I8042::new(kbd, mouse, machine);
    let (mut other, span): (Option<Box<dyn BusDevice>>, u64) = match which {
        0 => (None, 8),
        1 => {
            let mut fw = FwCfg::new(Some(mem.clone()));
            let _ = fw.add_file("etc/e820", vec![0x11; 40]);
            let _ = fw.add_file("opt/porthole/cmdline", b"console=ttyS0\0".to_vec());
            (Some(Box::new(fw)), FW_CFG_PORT_LEN)
        }
        2 => (Some(Box::new(Vga::new(Arc::new(AtomicU64::new(0))))), 0x20),
        _ => (Some(Box::new(Dispi::new(1920, 1200, 16 << 20, Arc::new(AtomicU64::new(0))))), 2),
    };
    for op in ops.chunks_exact(6) {
        let size = 1usize << ((op[0] >> 1) & 3);
        let offset = u64::from(op[1]) % span;
        let mut value = [op[2], op[3], op[4], op[5], op[2], op[3], op[4], op[5]];
        if op[0] & 8 != 0 && which == 0 {
            // Host input (keys, mouse motion) into the i8042 between the guest's accesses.
            i8042.keyboard_input(&op[2..4]);
            i8042.mouse_input(i32::from(op[2] as i8), i32::from(op[3] as i8), i32::from(op[4] as i8), op[5]);
            continue;
        }
        let device: &mut dyn BusDevice = match &mut other {
            Some(d) => d.as_mut(),
            None => &mut i8042,
        };
        if op[0] & 1 != 0 {
            device.write(offset, &value[..size]);
        } else {
            device.read(offset, &mut value[..size]);
        }
    }
});

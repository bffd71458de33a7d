//! COM1: a 16550A UART (vm-superio) at 0x3F8, IRQ 4. Output goes to the configured sink; input comes from
//! the VMM's event loop (standard input for `--serial stdio`).

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, IrqLine};

/// I/O port base of COM1.
pub const COM1_PORT: u16 = 0x3F8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Counters and the "input FIFO drained" notification shared with the event loop.
#[derive(Debug)]
pub struct SerialStats {
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub lost_out: AtomicU64,
    /// Written when the guest has emptied the input FIFO, so the loop can feed more input.
    pub input_drained: EventFd,
}

impl SerialStats {
    pub fn new() -> io::Result<Self> {
        Ok(SerialStats {
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            lost_out: AtomicU64::new(0),
            input_drained: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
}

#[derive(Clone)]
struct Events(Arc<SerialStats>);

impl SerialEvents for Events {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        self.0.bytes_out.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.0.lost_out.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {
        let _ = self.0.input_drained.write(1);
    }
}

/// Where the guest's serial output goes. Writes are line-buffered for files and flushed per write for
/// standard output, so markers appear as soon as the guest prints them.
pub enum SerialOutput {
    Stdout(io::Stdout),
    File(std::fs::File),
    Discard,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Stdout(s) => {
                let n = s.write(buf)?;
                s.flush()?;
                Ok(n)
            }
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Discard => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Stdout(s) => s.flush(),
            SerialOutput::File(f) => f.flush(),
            SerialOutput::Discard => Ok(()),
        }
    }
}

/// The UART on the port bus.
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, Events, SerialOutput>,
    stats: Arc<SerialStats>,
}

impl Serial {
    pub fn new(irq: IrqLine, output: SerialOutput, stats: Arc<SerialStats>) -> Self {
        Serial { uart: vm_superio::Serial::with_events(irq, Events(stats.clone()), output), stats }
    }

    /// Queues input for the guest; returns how many bytes fitted in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => {
                self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(_) => 0,
        }
    }

    /// Free space in the input FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A failing sink (closed stdout, full disk) must not stop the guest: the byte is counted lost.
            if self.uart.write(offset as u8, data[0]).is_err() {
                self.stats.lost_out.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl crate::snapshot::DeviceState for Serial {
    fn save(&self, w: &mut crate::snapshot::Writer) {
        let s = self.uart.state();
        for v in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            w.u8(v);
        }
        w.bytes(&s.in_buffer);
    }

    fn restore(&mut self, r: &mut crate::snapshot::Reader) -> Result<(), crate::snapshot::StateError> {
        let mut regs = [0u8; 9];
        for v in &mut regs {
            *v = r.u8()?;
        }
        // The FIFO holds at most 64 bytes (vm-superio's FIFO_SIZE).
        let in_buffer = r.bytes(64)?.to_vec();
        let [
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
        ] = regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
        };
        let irq = self.uart.interrupt_evt().clone();
        let placeholder =
            vm_superio::Serial::with_events(irq.clone(), Events(self.stats.clone()), SerialOutput::Discard);
        let output = std::mem::replace(&mut self.uart, placeholder).into_writer();
        match vm_superio::Serial::from_state(&state, irq.clone(), Events(self.stats.clone()), output) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(crate::snapshot::StateError::Damaged(format!("section serial: {e:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial() -> (Serial, Arc<SerialStats>, IrqLine) {
        let stats = Arc::new(SerialStats::new().unwrap());
        let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (Serial::new(irq.clone(), SerialOutput::Discard, stats.clone()), stats, irq)
    }

    #[test]
    fn output_is_counted_and_the_transmitter_is_always_ready() {
        let (mut s, stats, _) = serial();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), 3);
        let mut lsr = [0];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THR empty and transmitter idle");
    }

    #[test]
    fn input_reaches_the_receive_register_and_raises_the_irq() {
        let (mut s, stats, irq) = serial();
        s.write(1, &[0x01]); // IER: received data available
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        let mut byte = [0];
        s.read(0, &mut byte);
        assert_eq!(byte[0], b'a');
        s.read(0, &mut byte);
        assert_eq!(byte[0], b'b');
        assert_eq!(stats.bytes_in.load(Ordering::Relaxed), 2);
        assert_eq!(stats.input_drained.read().unwrap(), 1);
    }

    #[test]
    fn odd_sizes_and_offsets_are_ignored() {
        let (mut s, stats, _) = serial();
        s.write(0, &[1, 2]);
        s.write(9, &[1]);
        let mut wide = [0; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0xFF; 4]);
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), 0);
    }
}

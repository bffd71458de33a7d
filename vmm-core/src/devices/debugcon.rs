//! The firmware debug console: bytes written to port 0x402 go to a log (SeaBIOS prints its whole boot
//! there, as on QEMU with `-debugcon`). A read returns 0xE9, which is how firmware knows the port is
//! present. The log is bounded: past [`MAX_LOG`] bytes the rest is dropped (and counted).

use std::io::Write;

use super::BusDevice;

pub const DEBUGCON_PORT: u16 = 0x402;
/// The readback value that tells firmware a debug console is there.
const READBACK: u8 = 0xE9;
/// Most bytes written to the log.
pub const MAX_LOG: u64 = 16 << 20;

pub struct DebugCon {
    out: Option<Box<dyn Write + Send>>,
    written: u64,
    pub dropped: u64,
}

impl DebugCon {
    /// A console writing to `out` (or discarding, with None).
    pub fn new(out: Option<Box<dyn Write + Send>>) -> Self {
        DebugCon { out, written: 0, dropped: 0 }
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(READBACK);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(out) = self.out.as_mut() else { return };
        let room = MAX_LOG.saturating_sub(self.written) as usize;
        let n = data.len().min(room);
        if out.write_all(&data[..n]).is_err() {
            self.out = None; // a broken log must not stop the guest
            return;
        }
        let _ = out.flush();
        self.written += n as u64;
        self.dropped += (data.len() - n) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn logs_bytes_and_reads_back_0xe9() {
        let log = Shared::default();
        let mut d = DebugCon::new(Some(Box::new(log.clone())));
        let mut b = [0u8; 1];
        d.read(0, &mut b);
        assert_eq!(b, [0xE9]);
        for c in b"SeaBIOS\n" {
            d.write(0, &[*c]);
        }
        assert_eq!(&*log.0.lock().unwrap(), b"SeaBIOS\n");
        let mut quiet = DebugCon::new(None);
        quiet.write(0, b"x");
    }
}

//! Port 0x80, the POST code port. Linux uses it for I/O delays and firmware writes progress codes to it:
//! the last value is kept for diagnostics instead of counting every write as unhandled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::BusDevice;

pub const POST_CODE_PORT: u16 = 0x80;

pub struct PostCode {
    last: Arc<AtomicU64>,
}

impl PostCode {
    pub fn new(last: Arc<AtomicU64>) -> Self {
        PostCode { last }
    }
}

impl BusDevice for PostCode {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.last.store(u64::from(code), Ordering::Relaxed);
        }
    }
}

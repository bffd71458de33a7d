//! The ISO 9660 / El Torito reader the daemon (and the GUI) identify ISOs with
//! (`porthole_api::iso::read_facts`). The input is the image from sector 16 on (the volume descriptors);
//! sectors 0-15, the system area nobody reads, are zeros.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use porthole_api::iso::{SECTOR, read_facts};

fuzz_target!(|data: &[u8]| {
    let mut image = vec![0u8; 16 * SECTOR as usize];
    image.extend_from_slice(data);
    let _ = read_facts(&mut Cursor::new(image));
});

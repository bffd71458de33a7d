//! The RFB server as a hostile client sees it: handshake (3.3/3.7/3.8, None or VncAuth), then any client
//! messages, with the writer answering each (every encoding, pixel format and pseudo-encoding).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm_core::rfb::fuzz::server_session(data);
});

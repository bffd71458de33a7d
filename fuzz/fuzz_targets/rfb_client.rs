//! The RFB client (`porthole_api::rfb`) as a hostile server sees it: the bytes are everything the server
//! sends, from ProtocolVersion on; the client reads updates (and answers clipboard requests) until the
//! stream ends or it gives up.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use porthole_api::rfb::RfbClient;

fuzz_target!(|data: &[u8]| {
    let Some((&options, server)) = data.split_first() else { return };
    let Ok((client_end, mut server_end)) = UnixStream::pair() else { return };
    // The whole input fits the socket buffer (the runs cap inputs at 64 KiB); the client's own writes are
    // a few bytes each and stay unread in the other direction.
    let _ = server_end.set_nonblocking(true);
    if server_end.write_all(server).is_err() {
        return;
    }
    let _ = server_end.shutdown(std::net::Shutdown::Write);
    let password = (options & 1 != 0).then_some("fuzz");
    let Ok(mut client) = RfbClient::over(client_end, password) else { return };
    for _ in 0..10_000 {
        if client.read_update().is_err() {
            break;
        }
        if client.clipboard_owed() && client.answer_clipboard(Some("text")).is_err() {
            break;
        }
    }
    drop(server_end);
});

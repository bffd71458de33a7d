//! What several targets share; each includes this file as `mod common` (`#[path]`), and uses what it needs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

static SCRATCH: OnceLock<Option<PathBuf>> = OnceLock::new();

/// A 64 KiB file of 0x5a bytes named `porthole-fuzz-TAG-PID.img`, made once per process on tmpfs where
/// there is one, and removed when libFuzzer ends the process (with exit()).
pub fn scratch_image(tag: &str) -> Option<&'static PathBuf> {
    SCRATCH
        .get_or_init(|| {
            let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
            let path = dir.join(format!("porthole-fuzz-{tag}-{}.img", std::process::id()));
            std::fs::write(&path, vec![0x5a; 64 * 1024]).ok()?;
            extern "C" fn remove() {
                if let Some(Some(path)) = SCRATCH.get() {
                    let _ = std::fs::remove_file(path);
                }
            }
            // SAFETY: registers a function that takes nothing and only removes a file.
            unsafe { libc::atexit(remove) };
            Some(path)
        })
        .as_ref()
}

/// The next `n` bytes of `data`, if it has them.
pub fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, rest) = data.split_at_checked(n)?;
    *data = rest;
    Some(head)
}

/// A little-endian number of up to 8 bytes.
pub fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x))
}

/// Zeroes all of `mem` (a device kept across inputs then sees nothing an earlier input wrote: stale
/// descriptors or buffers would make an input's outcome depend on the inputs before it).
pub fn clear(mem: &vm_memory::GuestMemoryMmap) {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    const ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let end = mem.last_addr().0 + 1;
    let mut at = 0;
    while at < end {
        let n = (end - at).min(ZEROS.len() as u64);
        let _ = mem.write_slice(&ZEROS[..n as usize], GuestAddress(at));
        at += n;
    }
}

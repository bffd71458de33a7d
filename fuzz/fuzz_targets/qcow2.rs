//! Disk images as the engine opens them (`vmm_core::disk::open_image`, format detected from the bytes:
//! qcow2 or raw): the input is the image file; the target opens it read-only and reads from it, then
//! read-write and writes a cluster and flushes (allocation and refcount paths).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::VolatileSlice;
use vmm_core::disk::open_image;

/// One scratch file per process, on tmpfs where there is one.
static PATH: OnceLock<PathBuf> = OnceLock::new();

fn scratch() -> &'static PathBuf {
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let path = dir.join(format!("porthole-fuzz-qcow2-{}.img", std::process::id()));
        remove_at_exit();
        path
    })
}

/// libFuzzer ends the process with exit(): remove the scratch file then.
fn remove_at_exit() {
    extern "C" fn remove() {
        if let Some(path) = PATH.get() {
            let _ = std::fs::remove_file(path);
        }
    }
    // SAFETY: registers a function that takes nothing and only removes a file.
    unsafe { libc::atexit(remove) };
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    if let Ok(image) = open_image(path, true, None, &[]) {
        let size = image.size();
        for offset in [0, 512, size / 2, size.saturating_sub(65536), size.saturating_sub(512)] {
            let len = (size - offset.min(size)).min(buf.len() as u64) as usize;
            let _ = image.read_at(&VolatileSlice::from(&mut buf[..len]), offset);
        }
    }
    if let Ok(image) = open_image(path, false, None, &[]) {
        let size = image.size();
        let len = size.min(4096) as usize;
        buf[..len].fill(0xA5);
        let _ = image.write_at(&VolatileSlice::from(&mut buf[..len]), size / 3 / 512 * 512);
        let _ = image.flush();
        let _ = image.read_at(&VolatileSlice::from(&mut buf[..len]), 0);
    }
});

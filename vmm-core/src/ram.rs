//! Guest RAM mappings that KVM can back with 2 MiB pages.
//!
//! KVM maps a guest page with a huge host page only where the guest physical address and the host virtual
//! address agree modulo the huge page size, and only where the host memory is a huge page. A plain
//! anonymous `mmap` lands on any 4 KiB boundary, so every guest page then takes its own 4 KiB nested
//! page-table fault and entry; that is very expensive under nested virtualization (and costs TLB reach on
//! real hardware). So the RAM here starts at a 2 MiB boundary and is advised for transparent huge pages.

use std::io;

/// The huge page size KVM maps guest RAM with on x86.
pub const HUGE_PAGE: usize = 2 << 20;

/// One anonymous, private, read-write mapping of `len` bytes at a [`HUGE_PAGE`] boundary; unmapped on drop.
#[derive(Debug)]
pub struct AlignedRam {
    addr: usize,
    len: usize,
}

impl AlignedRam {
    /// Maps `len` bytes (a multiple of the page size) at a 2 MiB boundary, advised for huge pages (a kernel
    /// without transparent huge pages just ignores the advice).
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(page_size()) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("cannot map {len} bytes of RAM")));
        }
        let total = len
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "RAM size overflows"))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; nothing else is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base as usize;
        let addr = base.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (addr - base, base + total - (addr + len));
        // SAFETY: both ranges lie inside the mapping just made and outside the part kept.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((addr + len) as *mut libc::c_void, tail);
            }
            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Ok(AlignedRam { addr, len })
    }

    pub fn addr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives the memory back to the kernel: the next access reads zeros (a private anonymous mapping),
    /// as if freshly mapped. For a reboot, once nothing of the previous boot uses the memory any more.
    pub fn zero(&self) -> io::Result<()> {
        // SAFETY: the range is this mapping; afterwards it stays mapped, reading as zeros.
        let rc = unsafe { libc::madvise(self.addr as *mut libc::c_void, self.len, libc::MADV_DONTNEED) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

impl Drop for AlignedRam {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours; whoever owns this value guarantees nothing uses the memory any more.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_starts_at_a_huge_page_boundary_and_zeroes_on_request() {
        for len in [HUGE_PAGE, 3 * HUGE_PAGE + 4096, 64 << 20] {
            let ram = AlignedRam::new(len).unwrap();
            assert_eq!(ram.addr() as usize % HUGE_PAGE, 0, "{len} bytes");
            assert_eq!(ram.len(), len);
            // SAFETY: within the mapping.
            let bytes = unsafe { std::slice::from_raw_parts_mut(ram.addr(), len) };
            bytes[0] = 1;
            bytes[len - 1] = 2;
            ram.zero().unwrap();
            assert_eq!((bytes[0], bytes[len - 1]), (0, 0));
        }
        assert!(AlignedRam::new(0).is_err());
        assert!(AlignedRam::new(4097).is_err());
    }
}

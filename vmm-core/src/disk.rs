//! Disk images and drives.
//!
//! A [`DiskBackend`] reads and writes bytes of an image straight into guest memory ([`RawImage`]: a raw
//! file, with positional I/O; a qcow2 backend would implement the same trait). A [`Drive`] is what the
//! VM configuration names: a fixed disk, or a removable one whose media can be inserted and ejected while
//! the VM runs. Drives outlive reboots; the devices that serve them are rebuilt on each boot.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vm_memory::VolatileSlice;

use crate::devices::bus::lock;
use crate::virtio::VirtioInterrupt;

/// Bytes per sector, as virtio-blk counts them.
pub const SECTOR_SIZE: u64 = 512;

/// The storage behind a drive. Offsets and lengths are in bytes; callers keep them inside [`size`].
///
/// [`size`]: DiskBackend::size
pub trait DiskBackend: Send + Sync {
    /// The image's size in bytes (what the guest sees).
    fn size(&self) -> u64;
    /// Fills `buf` from the image at `offset`.
    fn read_at(&self, buf: &VolatileSlice<'_>, offset: u64) -> io::Result<()>;
    /// Writes `buf` to the image at `offset`.
    fn write_at(&self, buf: &VolatileSlice<'_>, offset: u64) -> io::Result<()>;
    /// Fills `bufs`, one after the other, from the image at `offset`: a request's buffers in one call, so a
    /// qcow2 image looks its clusters up once for the whole range.
    fn readv_at(&self, bufs: &[VolatileSlice<'_>], mut offset: u64) -> io::Result<()> {
        for buf in bufs {
            self.read_at(buf, offset)?;
            offset += buf.len() as u64;
        }
        Ok(())
    }
    /// Writes `bufs`, one after the other, to the image at `offset`: a request's buffers in one call, so a
    /// qcow2 image allocates the clusters of the whole range at once (written buffer by buffer, every new
    /// cluster would first be filled for its first buffer alone).
    fn writev_at(&self, bufs: &[VolatileSlice<'_>], mut offset: u64) -> io::Result<()> {
        for buf in bufs {
            self.write_at(buf, offset)?;
            offset += buf.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Grows the image to `size` bytes (whole sectors, above the present size) while it serves requests:
    /// the new range reads as zeros.
    fn grow(&self, size: u64) -> io::Result<()> {
        let _ = size;
        Err(io::Error::new(io::ErrorKind::Unsupported, "this image cannot grow"))
    }
    /// Tells the image that `len` bytes at `offset` are no longer needed: their space may be freed, and
    /// they read back as zeros afterwards (on a qcow2 overlay too: the backing image does not show through).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros; with `unmap`, their space may be freed as well.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// A second descriptor of the image file (a writable image's), sharing its open file and lock: a live
    /// snapshot reads it as the backing file of a new overlay without opening the file again.
    fn dup_file(&self) -> io::Result<File> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this image has no file of its own"))
    }
}

/// The on-disk formats Porthole serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl std::str::FromStr for ImageFormat {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(()),
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// The first bytes of every qcow2 image.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// The longest backing chain accepted below an image.
pub const MAX_BACKING_DEPTH: usize = 16;

/// A raw image file: sector n of the guest is bytes n*512.. of the file. Never grows the file.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    /// Grows while the VM runs ([`DiskBackend::grow`]).
    size: AtomicU64,
}

/// Why a drive or image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open disk image {path:?}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path:?} is in use by another VM (it is locked)")]
    Locked { path: PathBuf },
    #[error("disk image {path:?} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("disk image {path:?} is smaller than one sector")]
    Empty { path: PathBuf },
    #[error("cannot create disk image {path:?}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot grow drive {drive}: {source}")]
    Grow { drive: String, source: io::Error },
    #[error("drive {drive} is not removable")]
    NotRemovable { drive: String },
    #[error("no drive named {0:?}")]
    NoSuchDrive(String),
    #[error("this VM has no removable drive")]
    NoRemovableDrive,
    #[error("disk image {path:?} cannot be used as {format}: {reason}")]
    Image { path: PathBuf, format: ImageFormat, reason: String },
    #[error("disk image {path:?} is raw: a raw image has no backing file")]
    BackingOnRaw { path: PathBuf },
    #[error("the backing chain of {path:?} holds {path_again:?} twice (a loop)")]
    BackingLoop { path: PathBuf, path_again: PathBuf },
    #[error("the backing chain of {path:?} is {depth} images deep; at most {MAX_BACKING_DEPTH} are accepted")]
    BackingTooDeep { path: PathBuf, depth: usize },
    #[error("drive {drive} is read-only or removable: only a fixed writable disk moves onto an overlay")]
    NotWritable { drive: String },
    #[error("drive {drive} holds {holds:?}, but the overlay's backing chain starts with {given:?}")]
    NotOnTop { drive: String, holds: Option<PathBuf>, given: Option<PathBuf> },
    #[error("drive {drive}: requests on the old image did not finish within {SWITCH_DRAIN:?}")]
    Busy { drive: String },
    #[error("drive {drive}: flushing {path:?} before the switch: {source}")]
    Flush { drive: String, path: PathBuf, source: io::Error },
}

/// How long a live switch onto an overlay ([`Drive::switch_to_overlay`]) waits for the requests already
/// running on the old image.
pub const SWITCH_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens `path` (read-write unless `read_only`), checks it is a regular file or block device of at least
/// a sector (unless read-only) and locks it: shared when read-only, exclusive otherwise, so that two VMs
/// cannot write one image. Returns the file and its size in bytes.
fn open_locked(path: &Path, read_only: bool) -> Result<(File, u64), DiskError> {
    let open_err = |source| DiskError::Open { path: path.to_owned(), source };
    let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let size = if meta.is_file() {
        meta.len()
    } else {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_block_device() {
            return Err(DiskError::NotAFile { path: path.to_owned() });
        }
        let mut f = &file;
        io::Seek::seek(&mut f, io::SeekFrom::End(0)).map_err(open_err)?
    };
    // A writable disk must hold at least a sector; read-only media may be anything, even empty (a blank
    // or broken ISO: the guest sees no readable sector, and its firmware says so).
    if size < SECTOR_SIZE && !read_only {
        return Err(DiskError::Empty { path: path.to_owned() });
    }
    let how = if read_only { libc::LOCK_SH } else { libc::LOCK_EX };
    // A lock just released may still be held for a moment by a process this one is starting (between its
    // fork and its exec it shares the descriptor): try a few times over ~100 ms before calling it taken.
    let mut tries = 0;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
            return Ok((file, size));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(open_err(e));
        }
        tries += 1;
        if tries == LOCK_TRIES {
            return Err(DiskError::Locked { path: path.to_owned() });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// How many times a lock is tried (10 ms apart) before the image counts as in use.
const LOCK_TRIES: u32 = 10;

/// The format of an open image, from its first bytes: qcow2 when they are qcow2's magic, raw otherwise.
fn detect_format(file: &File) -> io::Result<ImageFormat> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read_at(&mut magic[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(if got == magic.len() && magic == QCOW2_MAGIC { ImageFormat::Qcow2 } else { ImageFormat::Raw })
}

/// The format of the image at `path` (qcow2 when it starts with qcow2's magic, raw otherwise).
pub fn probe_format(path: &Path) -> Result<ImageFormat, DiskError> {
    let file = File::open(path).map_err(|source| DiskError::Open { path: path.to_owned(), source })?;
    detect_format(&file).map_err(|source| DiskError::Open { path: path.to_owned(), source })
}

/// Opens the image at `path` as `format` (or the format its first bytes say), on `backing`: the backing
/// chain below it as the caller recorded it, nearest first. A backing file named inside an image is
/// never opened on the image's word: a qcow2 image whose header names one that `backing` does not give
/// is refused.
pub fn open_image(
    path: &Path,
    read_only: bool,
    format: Option<ImageFormat>,
    backing: &[PathBuf],
) -> Result<Arc<dyn DiskBackend>, DiskError> {
    let (file, size) = open_locked(path, read_only)?;
    let format = match format {
        Some(f) => f,
        None => detect_format(&file).map_err(|source| DiskError::Open { path: path.to_owned(), source })?,
    };
    Ok(match format {
        ImageFormat::Raw if !backing.is_empty() => return Err(DiskError::BackingOnRaw { path: path.to_owned() }),
        ImageFormat::Raw => Arc::new(RawImage { file, size: AtomicU64::new(size - size % SECTOR_SIZE) }),
        ImageFormat::Qcow2 => Arc::new(Qcow2Image::from_file(path, file, read_only, backing)?),
    })
}

impl RawImage {
    /// Opens `path` read-write, or read-only with `read_only`. The file is locked (shared when read-only,
    /// exclusive otherwise) so that two VMs cannot write one image.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let (file, size) = open_locked(path, read_only)?;
        Ok(RawImage { file, size: AtomicU64::new(size - size % SECTOR_SIZE) })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

impl RawImage {
    /// pread/pwrite of `len` bytes at `ptr`, retried until done.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped (and, for reads, writable) for the duration of the call.
    unsafe fn positional_io(&self, direction: Direction, ptr: *mut u8, len: usize, offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            let (fd, at, left, pos) =
                (self.file.as_raw_fd(), ptr.wrapping_add(done), len - done, (offset + done as u64) as libc::off_t);
            // SAFETY: the caller guarantees `at..at + left` is mapped; the kernel writes (pread) or reads
            // (pwrite) at most `left` bytes there.
            let n = unsafe {
                match direction {
                    Direction::Read => libc::pread(fd, at.cast(), left, pos),
                    Direction::Write => libc::pwrite(fd, at.cast(), left, pos),
                }
            };
            match n {
                0 if direction == Direction::Read => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the image file shrank"));
                }
                0 => return Err(io::Error::new(io::ErrorKind::WriteZero, "the image file took no bytes")),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n => done += n as usize,
            }
        }
        Ok(())
    }
}

impl DiskBackend for RawImage {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn grow(&self, size: u64) -> io::Result<()> {
        let now = self.size();
        check_growth(now, size)?;
        if !self.file.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "a block device cannot grow from here"));
        }
        self.file.set_len(size)?;
        self.file.sync_all()?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn read_at(&self, buf: &VolatileSlice<'_>, offset: u64) -> io::Result<()> {
        let guard = buf.ptr_guard_mut();
        // SAFETY: `guard` keeps `buf.len()` bytes of guest memory mapped at its pointer for the call.
        unsafe { self.positional_io(Direction::Read, guard.as_ptr(), buf.len(), offset) }
    }

    fn write_at(&self, buf: &VolatileSlice<'_>, offset: u64) -> io::Result<()> {
        let guard = buf.ptr_guard();
        // SAFETY: as above; pwrite only reads the memory.
        unsafe { self.positional_io(Direction::Write, guard.as_ptr().cast_mut(), buf.len(), offset) }
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn dup_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            other => return other,
        }
        // The file system zeroes no ranges: write zeros, a bounded buffer at a time.
        const CHUNK: u64 = 64 * 1024;
        let mut zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            // SAFETY: `zeros` is a live buffer of at least `n` bytes; pwrite only reads it.
            unsafe { self.positional_io(Direction::Write, zeros.as_mut_ptr(), n, offset + done)? };
            done += n as u64;
        }
        Ok(())
    }
}

impl RawImage {
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        loop {
            // SAFETY: fallocate on a descriptor we own; no memory is passed.
            if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

type ImagoFile = imago::file::File;
type ImagoAccess = imago::FormatAccess<ImagoFile>;

/// A qcow2 image (on the `imago` crate), on the backing chain its opener gave. Reads and writes go
/// between the image and guest memory directly; discards take the image for themselves (freeing clusters
/// that a concurrent request could still be using is imago's documented hazard).
pub struct Qcow2Image {
    access: RwLock<ImagoAccess>,
    /// The virtual size in whole sectors; grows while the VM runs ([`DiskBackend::grow`]).
    size: AtomicU64,
    /// The image file again (writable images), to punch holes where discarded clusters were: imago frees
    /// them for reuse but leaves the file's blocks allocated.
    punch: Option<File>,
    cluster_size: u64,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image").field("size", &self.size).finish_non_exhaustive()
    }
}

impl Qcow2Image {
    /// Opens the qcow2 image at `path` on the backing chain `backing` (nearest first; see [`open_image`]).
    pub fn open(path: &Path, read_only: bool, backing: &[PathBuf]) -> Result<Self, DiskError> {
        let (file, _) = open_locked(path, read_only)?;
        Self::from_file(path, file, read_only, backing)
    }

    fn from_file(path: &Path, file: File, read_only: bool, backing: &[PathBuf]) -> Result<Self, DiskError> {
        let cluster_size = check_qcow2_tables(path, &file)?;
        let punch = match read_only {
            true => None,
            false => Some(file.try_clone().map_err(|source| DiskError::Open { path: path.to_owned(), source })?),
        };
        if backing.len() > MAX_BACKING_DEPTH {
            return Err(DiskError::BackingTooDeep { path: path.to_owned(), depth: backing.len() });
        }
        // Every layer is a different file (device and inode), or the chain is a loop; found before any
        // backing file is opened (or locked).
        let id = |m: io::Result<std::fs::Metadata>, p: &Path| {
            use std::os::unix::fs::MetadataExt;
            m.map(|m| (m.dev(), m.ino())).map_err(|source| DiskError::Open { path: p.to_owned(), source })
        };
        let mut seen = vec![id(file.metadata(), path)?];
        for p in backing {
            let this = id(std::fs::metadata(p), p)?;
            if seen.contains(&this) {
                return Err(DiskError::BackingLoop { path: path.to_owned(), path_again: p.clone() });
            }
            seen.push(this);
        }
        let mut layers = Vec::new();
        for p in backing {
            let (f, _) = open_locked(p, true)?;
            layers.push((p.clone(), f));
        }
        Self::on_layers(path, file, read_only, punch, cluster_size, layers)
    }

    /// Opens the qcow2 image `file` (at `path`) on its backing chain, already open: `layers`, nearest first.
    fn on_layers(
        path: &Path,
        file: File,
        read_only: bool,
        punch: Option<File>,
        cluster_size: u64,
        layers: Vec<(PathBuf, File)>,
    ) -> Result<Self, DiskError> {
        // From the bottom up: each layer is opened on the one below it, and none may open anything on its
        // own (implicit opens denied).
        let mut below: Option<ImagoAccess> = None;
        for (p, f) in layers.into_iter().rev() {
            let p = p.as_path();
            let format = detect_format(&f).map_err(|source| DiskError::Open { path: p.to_owned(), source })?;
            if format == ImageFormat::Qcow2 {
                check_qcow2_tables(p, &f)?;
            }
            let storage = imago_storage(p, f, false, format)?;
            below = Some(match format {
                ImageFormat::Raw if below.is_some() => return Err(DiskError::BackingOnRaw { path: p.to_owned() }),
                ImageFormat::Raw => {
                    use imago::FormatDriverBuilder;
                    let raw =
                        imago::raw::Raw::builder(storage).write(false).open(imago::DenyImplicitOpenGate::default());
                    imago::FormatAccess::new(raw.map_err(|e| image_err(p, format, &e))?)
                }
                ImageFormat::Qcow2 => open_qcow2(p, storage, false, below.take())?,
            });
        }
        let storage = imago_storage(path, file, !read_only, ImageFormat::Qcow2)?;
        let access = open_qcow2(path, storage, !read_only, below)?;
        let size = access.size() - access.size() % SECTOR_SIZE;
        Ok(Qcow2Image { access: RwLock::new(access), size: AtomicU64::new(size), punch, cluster_size })
    }

    /// Discards `len` bytes at `offset` (they read as zeros afterwards) and gives the host the space of
    /// every whole cluster of this image in the range that only this image's current state used (clusters
    /// shared with an internal snapshot are not writable in place, and are left alone).
    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut access = self.access_mut();
        let mut freed = Vec::new();
        if self.punch.is_some() && self.cluster_size > 0 {
            let cs = self.cluster_size;
            let (mut at, end) = (offset.next_multiple_of(cs), offset.saturating_add(len) / cs * cs);
            while at < end {
                let (mapping, n) = access.get_shallow_mapping(at, end - at)?;
                if n == 0 {
                    break;
                }
                if let imago::ShallowMapping::Raw { offset: host, writable: true, .. } = mapping {
                    freed.push((host, n));
                }
                at += n;
            }
        }
        access.discard_to_zero(offset, len)?;
        if let Some(file) = &self.punch {
            for (host, n) in freed {
                let (Ok(host), Ok(n)) = (libc::off_t::try_from(host), libc::off_t::try_from(n)) else { continue };
                // SAFETY: fallocate on a descriptor we own; no memory is passed. Advisory: the clusters
                // are zero or free already, so a file system that cannot punch holes changes nothing.
                unsafe {
                    libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, host, n)
                };
            }
        }
        Ok(())
    }

    fn access(&self) -> std::sync::RwLockReadGuard<'_, ImagoAccess> {
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }

    fn access_mut(&self) -> std::sync::RwLockWriteGuard<'_, ImagoAccess> {
        self.access.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Refuses a truncated qcow2 image: its L1 or refcount table, an L2 table, or the start of a data or
/// compressed cluster past the end of the file (imago reads whatever lies past the end as zeros, so a cut
/// image would otherwise look like one whose data were zeroed). The walk reads every L2 table once (at most
/// the file's own size). Returns the cluster size (0 when the file is not qcow2 at all: imago says what is
/// wrong).
fn check_qcow2_tables(path: &Path, file: &File) -> Result<u64, DiskError> {
    use std::os::unix::fs::FileExt;
    let broken = |reason: String| DiskError::Image { path: path.to_owned(), format: ImageFormat::Qcow2, reason };
    let mut h = [0u8; 64];
    let len = file.metadata().map_err(|source| DiskError::Open { path: path.to_owned(), source })?.len();
    if len < h.len() as u64 {
        return Err(broken(format!("the file holds {len} bytes, less than a qcow2 header")));
    }
    file.read_exact_at(&mut h, 0).map_err(|source| DiskError::Open { path: path.to_owned(), source })?;
    if h[..4] != QCOW2_MAGIC {
        return Ok(0); // imago says what is wrong
    }
    let be32 = |at: usize| u64::from(u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]));
    let be64 = |at: usize| (be32(at) << 32) | be32(at + 4);
    // imago 0.2 does not look at the encryption method: an encrypted image would serve its ciphertext.
    if be32(32) != 0 {
        let method = if be32(32) == 1 { "AES" } else { "LUKS" };
        return Err(broken(format!("it is encrypted ({method}): Porthole does not read encrypted qcow2 images")));
    }
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(broken(format!("cluster_bits {cluster_bits} is out of range")));
    }
    // QEMU's own limits on the tables (32 MiB of L1, 8 MiB of refcount table): nothing larger is read.
    if be32(36) * 8 > 32 << 20 || be32(56) << cluster_bits > 8 << 20 {
        return Err(broken(format!("its L1 ({} entries) or refcount table is larger than QEMU allows", be32(36))));
    }
    let tables = [("L1 table", be64(40), be32(36) * 8), ("refcount table", be64(48), be32(56) << cluster_bits)];
    for (what, offset, size) in tables {
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(broken(format!(
                "its {what} ({size} bytes at {offset}) lies past the end of the file ({len} bytes): truncated?"
            )));
        }
    }
    let cluster_size = 1u64 << cluster_bits;
    // Version 3 headers say whether L2 entries are extended (16 bytes, subcluster bitmaps after the entry).
    let mut entry_size = 8;
    if be32(4) >= 3 {
        let mut v3 = [0u8; 8];
        file.read_exact_at(&mut v3, 72).map_err(|source| DiskError::Open { path: path.to_owned(), source })?;
        if u64::from_be_bytes(v3) & (1 << 4) != 0 {
            entry_size = 16;
        }
    }
    const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    let read = |offset: u64, size: u64| -> Result<Vec<u8>, DiskError> {
        let mut buf = vec![0u8; size as usize];
        file.read_exact_at(&mut buf, offset).map_err(|source| DiskError::Open { path: path.to_owned(), source })?;
        Ok(buf)
    };
    let entries = |buf: &[u8], stride: usize| -> Vec<u64> {
        buf.chunks_exact(stride).map(|e| u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]])).collect()
    };
    // Every cluster the header and tables use has a refcount, so the first refcount block exists in any
    // image QEMU or imago wrote. Without it, imago 0.2's allocator recursed until the stack overflowed on
    // the first write (found by fuzzing).
    let first_refblock = if be32(56) == 0 { 0 } else { entries(&read(be64(48), 8)?, 8)[0] & !0x1ff };
    if first_refblock == 0 || first_refblock.checked_add(cluster_size).is_none_or(|end| end > len) {
        return Err(broken(format!(
            "its refcount table has no refcount block for the header (entry 0 is {first_refblock}): corrupt"
        )));
    }
    let compressed_bits = 62 - (cluster_bits - 8);
    // Each L2 table once: an L1 whose entries all name one table must not make the check read it millions of
    // times.
    let mut checked = std::collections::HashSet::new();
    for (i, l1) in entries(&read(be64(40), be32(36) * 8)?, 8).into_iter().enumerate() {
        let l2 = l1 & OFFSET_MASK;
        if l2 == 0 || !checked.insert(l2) {
            continue;
        }
        if l2.checked_add(cluster_size).is_none_or(|end| end > len) {
            return Err(broken(format!(
                "L2 table {i} (at {l2}) lies past the end of the file ({len} bytes): truncated?"
            )));
        }
        for (j, e) in entries(&read(l2, cluster_size)?, entry_size).into_iter().enumerate() {
            let (what, host) = if e & (1 << 62) != 0 {
                ("compressed cluster", e & ((1 << compressed_bits) - 1))
            } else {
                ("data cluster", e & OFFSET_MASK)
            };
            if host != 0 && host >= len {
                let guest = ((i as u64 * (cluster_size / entry_size as u64)) + j as u64) * cluster_size;
                return Err(broken(format!(
                    "the {what} of guest offset {guest} (at {host}) lies past the end of the file ({len} bytes): \
                     truncated?"
                )));
            }
        }
    }
    Ok(cluster_size)
}

fn image_err(path: &Path, format: ImageFormat, e: &io::Error) -> DiskError {
    DiskError::Image { path: path.to_owned(), format, reason: e.to_string() }
}

fn imago_storage(path: &Path, file: File, writable: bool, format: ImageFormat) -> Result<ImagoFile, DiskError> {
    let opts = imago::StorageOpenOptions::new().filename(path).write(writable);
    ImagoFile::from_open_file(file, opts).map_err(|e| image_err(path, format, &e))
}

/// Opens a qcow2 layer on `backing` (when given) with every implicit open denied: a backing or data file
/// named in the header that the caller did not give makes the open fail.
fn open_qcow2(
    path: &Path,
    storage: ImagoFile,
    writable: bool,
    backing: Option<ImagoAccess>,
) -> Result<ImagoAccess, DiskError> {
    use imago::FormatDriverBuilder;
    let mut builder = imago::qcow2::Qcow2::<ImagoFile>::builder(storage).write(writable);
    if let Some(b) = backing {
        builder = builder.backing(Some(b));
    }
    let qcow2 =
        builder.open(imago::DenyImplicitOpenGate::default()).map_err(|e| image_err(path, ImageFormat::Qcow2, &e))?;
    Ok(imago::FormatAccess::new(qcow2))
}

impl DiskBackend for Qcow2Image {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn grow(&self, size: u64) -> io::Result<()> {
        // Requests wait meanwhile (the header and L1 table may move).
        let access = self.access_mut();
        check_growth(self.size(), size)?;
        access.resize_grow(size, imago::format::PreallocateMode::Zero)?;
        access.flush()?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    // imago asserts that a vector of buffers holds bytes (a guest's zero-length request reached it; found by
    // fuzzing): nothing to move is done here.
    fn read_at(&self, buf: &VolatileSlice<'_>, offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (iov, _guard) = imago::io_buffers::IoVectorMut::from_volatile_slice_one(buf);
        self.access().readv(iov, offset)
    }

    fn write_at(&self, buf: &VolatileSlice<'_>, offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (iov, _guard) = imago::io_buffers::IoVector::from_volatile_slice_one(buf);
        self.access().writev(iov, offset)
    }

    fn readv_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(());
        }
        let (iov, _guard) = imago::io_buffers::IoVectorMut::from_volatile_slice(bufs);
        self.access().readv(iov, offset)
    }

    fn writev_at(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(());
        }
        let (iov, _guard) = imago::io_buffers::IoVector::from_volatile_slice(bufs);
        self.access().writev(iov, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let access = self.access();
        access.flush()?;
        access.sync()
    }

    fn dup_file(&self) -> io::Result<File> {
        match &self.punch {
            Some(file) => file.try_clone(),
            None => Err(io::Error::new(io::ErrorKind::PermissionDenied, "the image is open read-only")),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.unmap(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap { self.unmap(offset, len) } else { self.access().write_zeroes(offset, len) }
    }
}

/// Creates a sparse raw image of `size` bytes (rounded up to whole sectors) at `path`; refuses to
/// replace an existing file.
pub fn create_raw_image(path: &Path, size: u64) -> Result<(), DiskError> {
    let create_err = |source| DiskError::Create { path: path.to_owned(), source };
    if size == 0 {
        return Err(create_err(io::Error::new(io::ErrorKind::InvalidInput, "the size is zero")));
    }
    let file = OpenOptions::new().write(true).create_new(true).open(path).map_err(create_err)?;
    let size = size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    if let Err(e) = file.set_len(size) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(create_err(e));
    }
    Ok(())
}

/// Creates a qcow2 image of `size` bytes (rounded up to whole sectors) at `path`, empty, or an overlay on
/// `backing` (whose name, as given, and format are recorded in the header: a relative name is relative to
/// the new image's folder, as QEMU reads it). Refuses to replace an existing file; a failed creation (a
/// full disk) leaves no file behind.
pub fn create_qcow2(path: &Path, size: u64, backing: Option<(&Path, ImageFormat)>) -> Result<(), DiskError> {
    create_qcow2_file(path, size, backing).map(drop)
}

/// [`create_qcow2`], returning the new file open for reading and writing (created with `O_EXCL`, so this
/// also works where only new files may be opened for writing).
fn create_qcow2_file(path: &Path, size: u64, backing: Option<(&Path, ImageFormat)>) -> Result<File, DiskError> {
    use imago::FormatCreateBuilder;
    let create_err = |source| DiskError::Create { path: path.to_owned(), source };
    if size == 0 {
        return Err(create_err(io::Error::new(io::ErrorKind::InvalidInput, "the size is zero")));
    }
    let size = size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(create_err)?;
    let made = (|| -> io::Result<File> {
        let kept = file.try_clone()?;
        let storage = ImagoFile::from_open_file(file, imago::StorageOpenOptions::new().filename(path).write(true))?;
        let mut builder = imago::qcow2::Qcow2::<ImagoFile>::create_builder(storage).size(size);
        if let Some((name, format)) = backing {
            let name = name.to_str().ok_or_else(|| io::Error::other("the backing file's name is not UTF-8"))?;
            builder = builder.backing(name.to_owned(), format.to_string());
        }
        builder.create()?;
        kept.sync_all()?;
        Ok(kept)
    })();
    made.map_err(|e| {
        let _ = std::fs::remove_file(path);
        create_err(e)
    })
}

/// Creates the qcow2 overlay `top` (its header naming `backing_name`, so qemu-img finds the chain too) on
/// the image that `below` (at `below_path`, a writable image) serves, and opens it: `below`'s own file is
/// reused, through a second descriptor, as the overlay's read-only backing layer, so the engine opens
/// nothing for writing but the new file (created with `O_EXCL`). `lower` is `below`'s own chain (nearest
/// first). Afterwards `below`'s lock is shared: it is frozen, other VMs may read it. A failure leaves no
/// file behind and `below` as it was.
pub fn overlay_on(
    top: &Path,
    backing_name: &Path,
    below: &dyn DiskBackend,
    below_path: &Path,
    lower: &[PathBuf],
) -> Result<Arc<dyn DiskBackend>, DiskError> {
    fn open_err(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
        move |source| DiskError::Open { path: path.to_owned(), source }
    }
    let below_file = below.dup_file().map_err(open_err(below_path))?;
    let lock = below.dup_file().map_err(open_err(below_path))?;
    let format = detect_format(&below_file).map_err(open_err(below_path))?;
    if lower.len() + 1 > MAX_BACKING_DEPTH {
        return Err(DiskError::BackingTooDeep { path: top.to_owned(), depth: lower.len() + 1 });
    }
    let file = create_qcow2_file(top, below.size(), Some((backing_name, format)))?;
    let opened = (|| -> Result<Qcow2Image, DiskError> {
        let cluster_size = check_qcow2_tables(top, &file)?;
        let punch = Some(file.try_clone().map_err(open_err(top))?);
        let mut layers = vec![(below_path.to_owned(), below_file)];
        for p in lower {
            let (f, _) = open_locked(p, true)?;
            layers.push((p.clone(), f));
        }
        Qcow2Image::on_layers(top, file, false, punch, cluster_size, layers)
    })();
    match opened {
        Ok(image) => {
            // SAFETY: flock on a descriptor we own; converting our own exclusive lock to a shared one.
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
            Ok(Arc::new(image))
        }
        Err(e) => {
            let _ = std::fs::remove_file(top);
            Err(e)
        }
    }
}

/// Refuses a live growth to `size` bytes from `now`: not whole sectors, not larger, or absurd.
fn check_growth(now: u64, size: u64) -> io::Result<()> {
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    if !size.is_multiple_of(SECTOR_SIZE) {
        return refuse(format!("{size} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"));
    }
    if size <= now {
        return refuse(format!("the disk is {now} bytes: it only grows (asked for {size})"));
    }
    if size > MAX_GROWN_SIZE {
        return refuse(format!("{size} bytes is more than {MAX_GROWN_SIZE}"));
    }
    Ok(())
}

/// The largest size a disk may grow to (64 TiB).
pub const MAX_GROWN_SIZE: u64 = 64 << 40;

/// Grows the image at `path` (raw, or qcow2 on its backing chain `backing`, nearest first) to `size` bytes,
/// rounded up to whole sectors: a raw file gets longer (sparse), a qcow2 image's virtual size grows (the new
/// range reads as zeros). Never shrinks: a size below the image's present one is refused.
pub fn grow_image(path: &Path, backing: &[PathBuf], size: u64) -> Result<(), DiskError> {
    let format = probe_format(path)?;
    let size = size.div_ceil(SECTOR_SIZE).checked_mul(SECTOR_SIZE).ok_or_else(|| DiskError::Image {
        path: path.to_owned(),
        format,
        reason: format!("{size} bytes is too large"),
    })?;
    let refuse = |now: u64| DiskError::Image {
        path: path.to_owned(),
        format,
        reason: format!("it is {now} bytes: a disk only grows (asked for {size})"),
    };
    match format {
        ImageFormat::Raw if !backing.is_empty() => Err(DiskError::BackingOnRaw { path: path.to_owned() }),
        ImageFormat::Raw => {
            let (file, now) = open_locked(path, false)?;
            if size < now {
                return Err(refuse(now));
            }
            let err = |source| DiskError::Open { path: path.to_owned(), source };
            file.set_len(size).map_err(err)?;
            file.sync_all().map_err(err)
        }
        ImageFormat::Qcow2 => {
            let access = open_imago(path, true, backing)?;
            let now = access.size();
            if size < now {
                return Err(refuse(now));
            }
            access.resize_grow(size, imago::format::PreallocateMode::Zero).map_err(|e| image_err(path, format, &e))?;
            access.flush().map_err(|e| image_err(path, format, &e))
        }
    }
}

/// An image opened through imago for copying and merging (see [`copy_image`] and [`commit_image`]): its
/// files stay locked as [`open_image`] locks them while it lives.
fn open_imago(path: &Path, writable: bool, backing: &[PathBuf]) -> Result<ImagoAccess, DiskError> {
    match probe_format(path)? {
        ImageFormat::Qcow2 => {
            Ok(Qcow2Image::open(path, !writable, backing)?.access.into_inner().unwrap_or_else(|p| p.into_inner()))
        }
        ImageFormat::Raw if !backing.is_empty() => Err(DiskError::BackingOnRaw { path: path.to_owned() }),
        ImageFormat::Raw => {
            use imago::FormatDriverBuilder;
            let (file, _) = open_locked(path, !writable)?;
            let storage = imago_storage(path, file, writable, ImageFormat::Raw)?;
            let raw = imago::raw::Raw::builder(storage)
                .write(writable)
                .open(imago::DenyImplicitOpenGate::default())
                .map_err(|e| image_err(path, ImageFormat::Raw, &e))?;
            Ok(imago::FormatAccess::new(raw))
        }
    }
}

/// Bytes moved at a time by copies and merges.
const COPY_CHUNK: u64 = 1 << 20;

/// How a copy or merge went wrong.
fn copy_err(path: &Path, what: &str, e: io::Error) -> DiskError {
    DiskError::Image { path: path.to_owned(), format: ImageFormat::Qcow2, reason: format!("{what}: {e}") }
}

/// Copies `data` (read from `from` at `offset`, `len` bytes, through `read`) into `to` at the same
/// offset, a chunk at a time, skipping chunks that are all zeros when `skip_zeros` (the destination reads
/// zeros there already).
fn copy_range(
    read: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    to: &ImagoAccess,
    offset: u64,
    len: u64,
    skip_zeros: bool,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let mut at = offset;
    while at < offset + len {
        let n = COPY_CHUNK.min(offset + len - at) as usize;
        buf.resize(n, 0);
        read(&mut buf[..n], at)?;
        if !(skip_zeros && buf[..n].iter().all(|&b| b == 0)) {
            to.write(&buf[..n], at)?;
        }
        at += n as u64;
    }
    Ok(())
}

/// Copies the image at `src` (on its backing chain `src_backing`, nearest first), flattened, into a new
/// image of `format` at `dst` of the same virtual size: only what the source holds is written (ranges that
/// read as zeros in every layer are left unallocated), so the copy is as sparse as the source. `progress`
/// hears (bytes of the virtual disk gone through, virtual size). A failed copy leaves no file behind.
pub fn copy_image(
    src: &Path,
    src_backing: &[PathBuf],
    dst: &Path,
    format: ImageFormat,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), DiskError> {
    let from = open_imago(src, false, src_backing)?;
    let size = from.size() - from.size() % SECTOR_SIZE;
    match format {
        ImageFormat::Raw => create_raw_image(dst, size)?,
        ImageFormat::Qcow2 => create_qcow2(dst, size, None)?,
    }
    let copied = (|| -> Result<(), DiskError> {
        let to = open_imago(dst, true, &[])?;
        let read = |buf: &mut [u8], at: u64| from.read(buf, at);
        let mut buf = Vec::new();
        let mut offset = 0;
        while offset < size {
            let (mapping, n) = from.get_mapping(offset, size - offset).map_err(|e| copy_err(src, "reading", e))?;
            if n == 0 {
                break;
            }
            let data = !matches!(mapping, imago::Mapping::Zero { .. } | imago::Mapping::Eof { .. });
            if data {
                copy_range(&read, &to, offset, n, true, &mut buf).map_err(|e| copy_err(dst, "copying", e))?;
            }
            offset += n;
            progress(offset, size);
        }
        to.flush().and_then(|()| to.sync()).map_err(|e| copy_err(dst, "flushing", e))
    })();
    copied.inspect_err(|_| {
        let _ = std::fs::remove_file(dst);
    })
}

/// Merges the qcow2 overlay `top` into its backing image `parent` (whose own backing chain is
/// `parent_backing`, nearest first): every range that `top` holds (data, and zeros it records) is written
/// into `parent`, which then reads as `top` did, so `top` can be dropped. Ranges `top` does not hold are left
/// alone, so a merge cut short (a full disk) changes nothing that `top` shows, and can simply be run again.
/// A `parent` smaller than `top` (qcow2) grows first. `progress` hears (bytes of `top` gone through, its
/// virtual size).
pub fn commit_image(
    top: &Path,
    parent: &Path,
    parent_backing: &[PathBuf],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), DiskError> {
    let to = open_imago(parent, true, parent_backing)?;
    // The overlay alone, read-only: its own clusters are all that is read, so its backing is a stand-in
    // that holds nothing (the real one is `parent`, open for writing above).
    let (file, _) = open_locked(top, true)?;
    if detect_format(&file).map_err(|source| DiskError::Open { path: top.to_owned(), source })? != ImageFormat::Qcow2 {
        return Err(DiskError::Image {
            path: top.to_owned(),
            format: ImageFormat::Raw,
            reason: "only a qcow2 overlay can be merged into its backing image".into(),
        });
    }
    check_qcow2_tables(top, &file)?;
    let nothing = {
        use imago::FormatDriverBuilder;
        use std::os::fd::FromRawFd;
        let null = Path::new("(empty stand-in)");
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"porthole-empty".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(DiskError::Open { path: null.to_owned(), source: io::Error::last_os_error() });
        }
        // SAFETY: a fresh descriptor that we own: an empty anonymous file.
        let f = unsafe { File::from_raw_fd(fd) };
        let storage = imago_storage(null, f, false, ImageFormat::Raw)?;
        let raw = imago::raw::Raw::builder(storage)
            .write(false)
            .open(imago::DenyImplicitOpenGate::default())
            .map_err(|e| image_err(null, ImageFormat::Raw, &e))?;
        imago::FormatAccess::new(raw)
    };
    let storage = imago_storage(top, file, false, ImageFormat::Qcow2)?;
    let from = open_qcow2(top, storage, false, Some(nothing))?;
    let size = from.size();
    if to.size() < size {
        to.resize_grow(size, imago::format::PreallocateMode::None)
            .map_err(|e| copy_err(parent, &format!("growing it to {size} bytes (the size of {})", top.display()), e))?;
    }
    let read = |buf: &mut [u8], at: u64| from.read(buf, at);
    let mut buf = Vec::new();
    let mut offset = 0;
    while offset < size {
        let (mapping, n) = from.get_shallow_mapping(offset, size - offset).map_err(|e| copy_err(top, "reading", e))?;
        if n == 0 {
            break;
        }
        let result = match mapping {
            imago::ShallowMapping::Indirect { .. } | imago::ShallowMapping::Eof { .. } => Ok(()),
            imago::ShallowMapping::Zero { explicit: false, .. } => Ok(()),
            imago::ShallowMapping::Zero { .. } => to.write_zeroes(offset, n),
            _ => copy_range(&read, &to, offset, n, false, &mut buf),
        };
        result.map_err(|e| copy_err(parent, "merging", e))?;
        offset += n;
        progress(offset, size);
    }
    to.flush().and_then(|()| to.sync()).map_err(|e| copy_err(parent, "flushing", e))
}

/// The virtual size of the image at `path` on its backing chain `backing` (what a guest sees).
pub fn image_size(path: &Path, backing: &[PathBuf]) -> Result<u64, DiskError> {
    Ok(open_image(path, true, None, backing)?.size())
}

/// What a drive has served (every boot together).
#[derive(Debug, Default)]
pub struct DiskStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    /// DISCARD and WRITE_ZEROES requests.
    pub discards: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
    /// The longest a request's transfer to or from the image took, in microseconds.
    pub slowest_transfer_us: AtomicU64,
    /// The longest a request waited between being taken from the queue and its transfer starting, in
    /// microseconds (for an I/O thread to pick it up).
    pub slowest_wait_us: AtomicU64,
    /// Time requests waited for the drive's rate limits, in microseconds.
    pub throttled_us: AtomicU64,
}

/// Media in a drive.
#[derive(Clone)]
pub struct Media {
    pub path: PathBuf,
    pub backend: Arc<dyn DiskBackend>,
}

/// A drive of the VM: fixed or removable, its media, and who to tell when the media changes.
pub struct Drive {
    /// "disk0", "disk1", … or "cdrom0", … (what the control socket names).
    pub id: String,
    pub read_only: bool,
    pub removable: bool,
    /// The serial number GET_ID returns (at most 20 bytes).
    pub serial: String,
    media: RwLock<Option<Media>>,
    /// Bumps on every media change.
    generation: AtomicU32,
    /// The interrupt of the device serving the drive in the current boot, once its driver is up.
    listener: Mutex<Option<Arc<VirtioInterrupt>>>,
    pub stats: DiskStats,
    /// The drive's rate limits and their buckets (taken by the device's queue thread before each request).
    pub limiter: Mutex<crate::rate_limiter::DiskLimiter>,
    /// Whether it has any limit (the queue thread skips the limiter otherwise).
    limited: std::sync::atomic::AtomicBool,
}

/// What the control socket reports about a drive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DriveStatus {
    pub id: String,
    pub read_only: bool,
    pub removable: bool,
    /// The image or ISO in the drive; none for an empty removable drive.
    pub media: Option<PathBuf>,
    pub size_bytes: u64,
    /// Its rate limits (none: unlimited).
    #[serde(default, skip_serializing_if = "crate::rate_limiter::DiskLimits::is_none")]
    pub limits: crate::rate_limiter::DiskLimits,
}

impl Drive {
    /// A drive with `media` in it (or empty: only for a removable drive).
    pub fn new(id: String, read_only: bool, removable: bool, serial: String, media: Option<Media>) -> Self {
        Drive {
            id,
            read_only: read_only || removable,
            removable,
            serial,
            media: RwLock::new(media),
            generation: AtomicU32::new(0),
            listener: Mutex::new(None),
            stats: DiskStats::default(),
            limiter: Mutex::new(crate::rate_limiter::DiskLimiter::default()),
            limited: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Replaces the drive's rate limits (the new buckets start full); they apply from the next request.
    pub fn set_limits(&self, limits: crate::rate_limiter::DiskLimits) {
        let mut limiter = lock_limiter(self);
        limiter.set(limits, std::time::Instant::now());
        self.limited.store(!limits.is_none(), std::sync::atomic::Ordering::Release);
    }

    /// Whether the drive has any rate limit.
    pub fn is_limited(&self) -> bool {
        self.limited.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The drive's rate limits.
    pub fn limits(&self) -> crate::rate_limiter::DiskLimits {
        lock_limiter(self).limits()
    }

    /// Opens the image at `path` for a drive (read-only for a removable one).
    /// The format is the one its first bytes say (raw or qcow2); a qcow2 image that names a backing file
    /// is refused (see [`Drive::open_media_on`]).
    pub fn open_media(path: &Path, read_only: bool) -> Result<Media, DiskError> {
        Self::open_media_on(path, read_only, None, &[])
    }

    /// Opens the image at `path` as `format` (or the detected one) on the backing chain `backing`
    /// (nearest first), as [`open_image`] does.
    pub fn open_media_on(
        path: &Path,
        read_only: bool,
        format: Option<ImageFormat>,
        backing: &[PathBuf],
    ) -> Result<Media, DiskError> {
        Ok(Media { path: path.to_owned(), backend: open_image(path, read_only, format, backing)? })
    }

    /// The media now in the drive.
    pub fn media(&self) -> Option<Media> {
        self.media.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The capacity the guest sees, in sectors (0 when empty).
    pub fn sectors(&self) -> u64 {
        self.media().map(|m| m.backend.size() / SECTOR_SIZE).unwrap_or(0)
    }

    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// Moves this fixed disk, live, onto `top`: a new qcow2 overlay, created here, on the image now in the
    /// drive (a disk-only snapshot of a running VM: that image is frozen from now on). `chain` is the image's
    /// path followed by its own backing chain (nearest first); `backing_name` is what the overlay's header
    /// records for it (default: its path). New requests wait meanwhile; those already running finish first,
    /// and the image is flushed; its open file then becomes the overlay's backing layer (see
    /// [`overlay_on`]). The guest sees nothing change. On any failure the drive keeps its image, untouched.
    pub fn switch_to_overlay(
        &self,
        top: &Path,
        backing_name: Option<&Path>,
        chain: &[PathBuf],
    ) -> Result<(), DiskError> {
        if self.removable || self.read_only {
            return Err(DiskError::NotWritable { drive: self.id.clone() });
        }
        let mut slot = self.media.write().unwrap_or_else(|p| p.into_inner());
        let holds = slot.as_ref().map(|m| m.path.clone());
        let Some(old) = slot.as_ref().filter(|_| holds.is_some() && chain.first() == holds.as_ref()) else {
            return Err(DiskError::NotOnTop { drive: self.id.clone(), holds, given: chain.first().cloned() });
        };
        // Every request holds its own reference to the media while it runs.
        let deadline = std::time::Instant::now() + SWITCH_DRAIN;
        while Arc::strong_count(&old.backend) > 1 {
            if std::time::Instant::now() > deadline {
                return Err(DiskError::Busy { drive: self.id.clone() });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        old.backend.flush().map_err(|source| DiskError::Flush {
            drive: self.id.clone(),
            path: old.path.clone(),
            source,
        })?;
        let name = backing_name.unwrap_or(&old.path);
        let backend = overlay_on(top, name, &*old.backend, &old.path, &chain[1..])?;
        *slot = Some(Media { path: top.to_owned(), backend });
        Ok(())
    }

    /// Inserts `media` (replacing what is there) or ejects (`None`), and tells the guest.
    pub fn change_media(&self, media: Option<Media>) -> Result<(), DiskError> {
        if !self.removable {
            return Err(DiskError::NotRemovable { drive: self.id.clone() });
        }
        *self.media.write().unwrap_or_else(|p| p.into_inner()) = media;
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(interrupt) = lock(&self.listener).as_ref() {
            interrupt.signal_config();
        }
        Ok(())
    }

    /// Grows the disk in this fixed, writable drive to `size` bytes while the VM runs: the guest gets a
    /// configuration-change interrupt and reads the new capacity (Linux's virtio_blk resizes the disk).
    pub fn grow(&self, size: u64) -> Result<(), DiskError> {
        let drive = self.id.clone();
        if self.removable || self.read_only {
            let why = "only a fixed, writable disk grows";
            return Err(DiskError::Grow { drive, source: io::Error::new(io::ErrorKind::InvalidInput, why) });
        }
        let media = self.media().ok_or_else(|| DiskError::NoSuchDrive(drive.clone()))?;
        media.backend.grow(size).map_err(|source| DiskError::Grow { drive: self.id.clone(), source })?;
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(interrupt) = lock(&self.listener).as_ref() {
            interrupt.signal_config();
        }
        Ok(())
    }

    /// Who to interrupt on a media change (the serving device, while its driver is up).
    pub fn set_listener(&self, interrupt: Option<Arc<VirtioInterrupt>>) {
        *lock(&self.listener) = interrupt;
    }

    pub fn status(&self) -> DriveStatus {
        let media = self.media();
        DriveStatus {
            id: self.id.clone(),
            read_only: self.read_only,
            removable: self.removable,
            size_bytes: media.as_ref().map(|m| m.backend.size()).unwrap_or(0),
            media: media.map(|m| m.path),
            limits: self.limits(),
        }
    }
}

/// qemu-img, the outside peer of the qcow2 tests.
#[cfg(test)]
pub(crate) mod qemu {
    use std::path::Path;
    use std::process::Command;

    /// Runs `qemu-img ARGS`, which must succeed; returns its standard output.
    pub fn img(args: &[&str]) -> String {
        run("qemu-img", args)
    }

    /// Runs `qemu-io ARGS`, which must succeed.
    pub fn io(args: &[&str]) -> String {
        run("qemu-io", args)
    }

    fn run(tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} cannot run ({e}): install qemu-utils (./x does)"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{tool} {args:?} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        text
    }

    /// Whether `qemu-img check` finds the image clean.
    pub fn check(path: &Path) {
        img(&["check", path.to_str().unwrap()]);
    }

    /// The bytes the image takes on the host (`actual-size`).
    pub fn actual_size(path: &Path) -> u64 {
        let info: serde_json::Value =
            serde_json::from_str(&img(&["info", "--output=json", "-U", path.to_str().unwrap()])).unwrap();
        info["actual-size"].as_u64().unwrap()
    }

    /// A pattern that differs in every sector, with a hole (zeros) in its second quarter.
    pub fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| if (len / 4..len / 2).contains(&i) { 0 } else { (i / 512 * 31 + i % 509) as u8 }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("porthole-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn created_images_are_sparse_whole_sectors_and_never_replace_a_file() {
        let dir = scratch("create");
        let path = dir.join("a.img");
        create_raw_image(&path, 1 << 30).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "a new image takes no space: {} blocks", meta.blocks());
        assert!(matches!(create_raw_image(&path, 4096), Err(DiskError::Create { .. })));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30, "the existing image is untouched");
        let odd = dir.join("odd.img");
        create_raw_image(&odd, 1000).unwrap();
        assert_eq!(std::fs::metadata(&odd).unwrap().len(), 1024);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A process killed right after a write that needed a new L2 table (nothing flushed, nothing dropped:
    /// what `kill -9` leaves) leaves an image `qemu-img check` finds sound: the new table's refcount reaches
    /// the file before the L1 entry that points at it. (Found by the fault matrix, tests/tests/faults.rs:
    /// imago 0.2.6 wrote the L1 entry first and kept the refcount in its cache — "ERROR cluster 4
    /// refcount=0 reference=1"; fixed in vendor/imago.)
    #[test]
    fn a_kill_after_a_write_that_made_an_l2_table_leaves_a_sound_image() {
        let dir = scratch("kill-l2");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8192)]).unwrap();
        mem.write_slice(&[0x5Au8; 4096], GuestAddress(0)).unwrap();
        for (i, offset) in [0u64, 1 << 30, (3 << 30) + 4096].into_iter().enumerate() {
            let q = dir.join(format!("k{i}.qcow2"));
            create_qcow2(&q, 4 << 30, None).unwrap();
            let img = Qcow2Image::open(&q, false, &[]).unwrap();
            img.write_at(&mem.get_slice(GuestAddress(0), 4096).unwrap(), offset).unwrap();
            // The process ends here, as under kill -9: no flush, no destructor.
            std::mem::forget(img);
            qemu::check(&q);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Raw and qcow2 images grow (whole sectors; the old bytes kept, the new range reading as zeros) and
    /// never shrink.
    #[test]
    fn images_grow_and_never_shrink() {
        let dir = scratch("grow");
        let raw = dir.join("a.img");
        create_raw_image(&raw, 1 << 20).unwrap();
        std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
        grow_image(&raw, &[], (2 << 20) + 100).unwrap();
        let bytes = std::fs::read(&raw).unwrap();
        assert_eq!(bytes.len(), (2 << 20) + 512);
        assert!(bytes[..1 << 20].iter().all(|&b| b == 7) && bytes[1 << 20..].iter().all(|&b| b == 0));
        assert!(matches!(grow_image(&raw, &[], 1 << 20), Err(DiskError::Image { .. })), "no shrink");
        assert!(grow_image(&raw, &[], u64::MAX).is_err(), "no overflow");
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), (2 << 20) + 512);

        let q = dir.join("a.qcow2");
        create_qcow2(&q, 1 << 20, None).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8192)]).unwrap();
        {
            let img = Qcow2Image::open(&q, false, &[]).unwrap();
            mem.write_slice(&[9u8; 4096], GuestAddress(0)).unwrap();
            img.write_at(&mem.get_slice(GuestAddress(0), 4096).unwrap(), 4096).unwrap();
            img.flush().unwrap();
        }
        grow_image(&q, &[], 3 << 20).unwrap();
        assert_eq!(image_size(&q, &[]).unwrap(), 3 << 20);
        let img = Qcow2Image::open(&q, true, &[]).unwrap();
        let mut buf = vec![1u8; 8192];
        img.read_at(&mem.get_slice(GuestAddress(0), 8192).unwrap(), 0).unwrap();
        mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 9));
        img.read_at(&mem.get_slice(GuestAddress(0), 8192).unwrap(), (3 << 20) - 8192).unwrap();
        mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "the new range reads as zeros");
        drop(img);
        assert!(matches!(grow_image(&q, &[], 1 << 20), Err(DiskError::Image { .. })), "no shrink");
        assert_eq!(image_size(&q, &[]).unwrap(), 3 << 20);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A request's buffers written and read in one call (`writev_at`/`readv_at`, buffers of odd sizes
    /// spanning clusters) on an empty qcow2 image and on a raw one: the same bytes come back, where they
    /// belong, and qemu-img agrees; on the qcow2 image, 1 MiB written as 256 buffers of 4 KiB takes 1 MiB
    /// of clusters plus metadata.
    #[test]
    fn vectored_requests_land_where_they_belong() {
        let dir = scratch("vectored");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let data: Vec<u8> = (0..(2 << 20) as u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        mem.write_slice(&data, GuestAddress(0)).unwrap();
        let q = dir.join("v.qcow2");
        create_qcow2(&q, 8 << 20, None).unwrap();
        let r = dir.join("v.raw");
        create_raw_image(&r, 8 << 20).unwrap();
        let sizes = [512usize, 4096, 1536, 65536, 2048];
        let total: usize = sizes.iter().sum();
        for path in [&q, &r] {
            let image = open_image(path, false, None, &[]).unwrap();
            let mut at = 0u64;
            let slices: Vec<_> = sizes
                .iter()
                .map(|&n| {
                    let s = mem.get_slice(GuestAddress(at), n).unwrap();
                    at += n as u64;
                    s
                })
                .collect();
            image.writev_at(&slices, 61_440).unwrap();
            // Read back split differently, into the second MiB of guest memory.
            let back: Vec<_> = [total - 1000, 1000]
                .iter()
                .scan(1u64 << 20, |at, &n| {
                    let s = mem.get_slice(GuestAddress(*at), n).unwrap();
                    *at += n as u64;
                    Some(s)
                })
                .collect();
            image.readv_at(&back, 61_440).unwrap();
            let mut got = vec![0u8; total];
            mem.read_slice(&mut got, GuestAddress(1 << 20)).unwrap();
            assert_eq!(got, data[..total], "{path:?}");
            image.flush().unwrap();
        }
        qemu::check(&q);
        qemu::img(&["compare", "-q", "-f", "qcow2", "-F", "raw", q.to_str().unwrap(), r.to_str().unwrap()]);
        // 1 MiB in 256 buffers of 4 KiB at 1 MiB on a fresh qcow2 image.
        let fresh = dir.join("fresh.qcow2");
        create_qcow2(&fresh, 8 << 20, None).unwrap();
        let before = std::fs::metadata(&fresh).unwrap().len();
        let image = open_image(&fresh, false, None, &[]).unwrap();
        let slices: Vec<_> = (0..256u64).map(|i| mem.get_slice(GuestAddress(i * 4096), 4096).unwrap()).collect();
        image.writev_at(&slices, 1 << 20).unwrap();
        image.flush().unwrap();
        let grown = std::fs::metadata(&fresh).unwrap().len() - before;
        assert!((1 << 20..(1 << 20) + (256 << 10)).contains(&grown), "the file grew by {grown} bytes");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Reads of a qemu-img-compressed qcow2 image (zlib clusters, a hole between them) through `readv_at`
    /// with a request's buffers as Linux sends them (page-sized, the first and last partial, starting
    /// anywhere in a cluster and spanning several): every byte is the raw image's.
    #[test]
    fn vectored_reads_of_compressed_clusters_return_the_raw_bytes() {
        let dir = scratch("compressed");
        let size = 4usize << 20;
        // Compressible but different in every sector; the second MiB is a hole.
        let mut data: Vec<u8> =
            (0..size).map(|i| if i % 512 < 16 { (i / 512) as u8 ^ (i as u8) } else { b"porthole"[i % 8] }).collect();
        data[1 << 20..2 << 20].fill(0);
        let raw = dir.join("c.raw");
        std::fs::write(&raw, &data).unwrap();
        let q = dir.join("c.qcow2");
        qemu::img(&["convert", "-c", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), q.to_str().unwrap()]);
        let image = open_image(&q, true, None, &[]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..400 {
            let offset = next((size as u64 - (1 << 20)) / 512) * 512;
            let buffers = 1 + next(64) as usize;
            let first = 512 * (1 + next(8) as usize);
            let mut lens: Vec<usize> = (0..buffers).map(|i| if i == 0 { first } else { 4096 }).collect();
            if buffers > 1 {
                *lens.last_mut().unwrap() = 512 * (1 + next(8) as usize);
            }
            let total: usize = lens.iter().sum();
            mem.write_slice(&vec![0xEE; total], GuestAddress(0)).unwrap();
            let mut at = 0u64;
            let slices: Vec<_> = lens
                .iter()
                .map(|&n| {
                    let s = mem.get_slice(GuestAddress(at), n).unwrap();
                    at += n as u64;
                    s
                })
                .collect();
            image.readv_at(&slices, offset).unwrap();
            let mut got = vec![0u8; total];
            mem.read_slice(&mut got, GuestAddress(0)).unwrap();
            let want = &data[offset as usize..offset as usize + total];
            if got != want {
                let bad = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!("round {round}: {lens:?} at {offset}: byte {bad} differs ({} != {})", got[bad], want[bad]);
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A qcow2 overlay on a compressed image (a cloud image's VM disk) written by four threads at once, each
    /// its own 4 KiB stripes of the same 64 KiB clusters (so their copy-on-write allocations race), in
    /// vectored requests of 512-byte buffers, while they also read: every byte reads back as written or as
    /// the backing image had it, and qemu-img finds the overlay clean. A read racing a write of the same
    /// sector may see part of each (Linux's page cache copies without a lock, and virtio-blk promises no
    /// atomicity either), so the concurrent reads check each byte's origin: the base image or a fill of that
    /// stripe's writer, never zeros of an unfilled cluster or another stripe's data.
    #[test]
    fn concurrent_writes_on_an_overlay_of_compressed_clusters_keep_every_byte() {
        let dir = scratch("overlay-compressed");
        let size = 2usize << 20;
        let base: Vec<u8> = (0..size).map(|i| if i % 512 < 8 { (i / 512) as u8 } else { b"cloud"[i % 5] }).collect();
        let raw = dir.join("base.raw");
        std::fs::write(&raw, &base).unwrap();
        let q = dir.join("base.qcow2");
        qemu::img(&["convert", "-c", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), q.to_str().unwrap()]);
        let top = dir.join("top.qcow2");
        create_qcow2(&top, size as u64, Some((&q, ImageFormat::Qcow2))).unwrap();
        let image = open_image(&top, false, None, std::slice::from_ref(&q)).unwrap();
        const THREADS: usize = 4;
        const STRIPE: usize = 4096;
        fn fill_of(thread: usize, round: usize) -> u8 {
            (thread * 64 + 1 + round % 63) as u8
        }
        let written: Vec<Vec<(usize, u8)>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let image = image.clone();
                    let base = &base;
                    scope.spawn(move || {
                        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
                        let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ t as u64;
                        let mut done = Vec::new();
                        for round in 0..150 {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            // This thread's stripes: t, t + 4, t + 8, …
                            let stripe = (seed as usize % (size / STRIPE / THREADS)) * THREADS + t;
                            let offset = stripe * STRIPE;
                            // Each writer's fills lie in its own quarter of the byte values, never 0.
                            let fill = fill_of(t, round);
                            mem.write_slice(&[fill; STRIPE], GuestAddress(0)).unwrap();
                            let bufs: Vec<_> =
                                (0..8).map(|i| mem.get_slice(GuestAddress(i * 512), 512).unwrap()).collect();
                            image.writev_at(&bufs, offset as u64).unwrap();
                            done.push((stripe, fill));
                            // A read across the neighbours' stripes meanwhile: each byte is the base
                            // image's or one its stripe's writer wrote.
                            let around = offset.saturating_sub(STRIPE).min(size - 3 * STRIPE);
                            let rbufs: Vec<_> = (0..3)
                                .map(|i| mem.get_slice(GuestAddress(8192 + i * STRIPE as u64), STRIPE).unwrap())
                                .collect();
                            image.readv_at(&rbufs, around as u64).unwrap();
                            let mut got = vec![0u8; 3 * STRIPE];
                            mem.read_slice(&mut got, GuestAddress(8192)).unwrap();
                            for (i, &byte) in got.iter().enumerate() {
                                let at = around + i;
                                let writer = at / STRIPE % THREADS;
                                let written = (byte as usize).wrapping_sub(writer * 64 + 1) < 63;
                                assert!(byte == base[at] || written, "byte at {at} is {byte}: from nowhere");
                            }
                        }
                        done
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        image.flush().unwrap();
        let mut want = base.clone();
        for thread in &written {
            for &(stripe, fill) in thread {
                want[stripe * STRIPE..(stripe + 1) * STRIPE].fill(fill);
            }
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        image.read_at(&mem.get_slice(GuestAddress(0), size).unwrap(), 0).unwrap();
        let mut got = vec![0u8; size];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        if let Some(bad) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("byte {bad} (stripe {}): {} != {}", bad / STRIPE, got[bad], want[bad]);
        }
        drop(image);
        qemu::check(&top);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn raw_images_move_bytes_between_the_file_and_guest_memory() {
        let dir = scratch("rw");
        let path = dir.join("d.img");
        let content: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let image = RawImage::open(&path, false).unwrap();
        assert_eq!(image.size(), 8192);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        image.read_at(&mem.get_slice(GuestAddress(0x1000), 1024).unwrap(), 512).unwrap();
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got, content[512..1536]);
        mem.write_slice(&[0xAB; 512], GuestAddress(0x2000)).unwrap();
        image.write_at(&mem.get_slice(GuestAddress(0x2000), 512).unwrap(), 4096).unwrap();
        image.flush().unwrap();
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file.len(), 8192);
        assert_eq!(&file[4096..4608], &[0xAB; 512][..]);
        assert_eq!(&file[..4096], &content[..4096]);
        // A second writer is refused; a reader of a locked image too.
        assert!(matches!(RawImage::open(&path, false), Err(DiskError::Locked { .. })));
        assert!(matches!(RawImage::open(&path, true), Err(DiskError::Locked { .. })));
        drop(image);
        let _ro1 = RawImage::open(&path, true).unwrap();
        let _ro2 = RawImage::open(&path, true).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A loop device over a file, detached when dropped.
    struct LoopDevice(PathBuf);

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    #[test]
    fn a_block_device_is_a_raw_disk_of_its_size() {
        // A block device needs a loop device: root and losetup. Without them there is nothing to open.
        let dir = scratch("blockdev");
        let path = dir.join("backing.img");
        let content: Vec<u8> = (0..3u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let attached = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&path).output();
        let Some(dev) = attached
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        else {
            eprintln!("skipped: no loop device (needs root and losetup)");
            std::fs::remove_dir_all(dir).unwrap();
            return;
        };
        let dev = LoopDevice(dev);
        let image = RawImage::open(&dev.0, false).unwrap();
        assert_eq!(image.size(), 3 << 20, "the size is the device's, found by seeking to its end");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        image.read_at(&mem.get_slice(GuestAddress(0x1000), 4096).unwrap(), 2 << 20).unwrap();
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got, content[2 << 20..(2 << 20) + 4096]);
        mem.write_slice(&[0x5A; 512], GuestAddress(0x2000)).unwrap();
        image.write_at(&mem.get_slice(GuestAddress(0x2000), 512).unwrap(), (3 << 20) - 512).unwrap();
        image.flush().unwrap();
        assert!(matches!(RawImage::open(&dev.0, false), Err(DiskError::Locked { .. })));
        drop(image);
        drop(dev);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[(3 << 20) - 512..], &[0x5A; 512][..], "the write reached the backing file");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_removable_drives_change_media() {
        let dir = scratch("media");
        let path = dir.join("x.iso");
        std::fs::write(&path, vec![1u8; 2048]).unwrap();
        let fixed = Drive::new("disk0".into(), false, false, String::new(), None);
        assert!(matches!(fixed.change_media(None), Err(DiskError::NotRemovable { .. })));
        let cd = Drive::new("cdrom0".into(), false, true, String::new(), None);
        assert!(cd.read_only, "removable drives are read-only");
        assert_eq!((cd.sectors(), cd.generation()), (0, 0));
        cd.change_media(Some(Drive::open_media(&path, true).unwrap())).unwrap();
        assert_eq!((cd.sectors(), cd.generation()), (4, 1));
        assert_eq!(cd.status().media.as_deref(), Some(path.as_path()));
        cd.change_media(None).unwrap();
        assert_eq!((cd.sectors(), cd.generation()), (0, 2));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A qcow2 image of `content` made by qemu-img (`extra` options to `convert`).
    fn qcow2_of(dir: &Path, name: &str, content: &[u8], extra: &[&str]) -> PathBuf {
        let raw = dir.join(format!("{name}.raw"));
        std::fs::write(&raw, content).unwrap();
        let path = dir.join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend([raw.to_str().unwrap(), path.to_str().unwrap()]);
        qemu::img(&args);
        path
    }

    fn read_all(image: &dyn DiskBackend) -> io::Result<Vec<u8>> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < image.size() {
            let n = (image.size() - offset).min(0x10000);
            image.read_at(&mem.get_slice(GuestAddress(0), n as usize).unwrap(), offset)?;
            let mut chunk = vec![0u8; n as usize];
            mem.read_slice(&mut chunk, GuestAddress(0)).unwrap();
            out.extend(chunk);
            offset += n;
        }
        Ok(out)
    }

    #[test]
    fn the_format_is_detected_from_the_magic_and_can_be_forced() {
        let dir = scratch("detect");
        let content = qemu::pattern(1 << 20);
        let q = qcow2_of(&dir, "d", &content, &[]);
        assert_eq!(probe_format(&q).unwrap(), ImageFormat::Qcow2);
        assert_eq!(probe_format(&dir.join("d.raw")).unwrap(), ImageFormat::Raw);
        let image = open_image(&q, true, None, &[]).unwrap();
        assert_eq!(image.size(), 1 << 20, "the virtual size, not the file's");
        assert_eq!(read_all(image.as_ref()).unwrap(), content);
        drop(image);
        let forced = open_image(&q, true, Some(ImageFormat::Raw), &[]).unwrap();
        let file_len = std::fs::metadata(&q).unwrap().len();
        assert_eq!(forced.size(), file_len - file_len % SECTOR_SIZE, "format=raw serves the file as it is");
        // A raw image given a backing file is refused; a raw file forced to qcow2 gets imago's reason.
        let raw = dir.join("d.raw");
        assert!(matches!(open_image(&raw, true, None, std::slice::from_ref(&q)), Err(DiskError::BackingOnRaw { .. })));
        let err = open_image(&raw, true, Some(ImageFormat::Qcow2), &[]).err().unwrap();
        assert!(matches!(err, DiskError::Image { .. }), "{err}");
        eprintln!("raw forced to qcow2: {err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// inotify on one file: did anyone open it?
    struct OpenWatch(std::os::fd::OwnedFd);

    impl OpenWatch {
        fn new(path: &Path) -> OpenWatch {
            use std::os::fd::FromRawFd;
            use std::os::unix::ffi::OsStrExt;
            // SAFETY: plain syscalls; the path is a NUL-terminated copy.
            unsafe {
                let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
                assert!(fd >= 0);
                let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
                assert!(libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS) >= 0);
                OpenWatch(std::os::fd::OwnedFd::from_raw_fd(fd))
            }
        }

        fn touched(&self) -> bool {
            let mut buf = [0u8; 4096];
            // SAFETY: reads into a local buffer of its length.
            unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) > 0 }
        }
    }

    #[test]
    fn a_backing_file_named_inside_an_image_is_never_opened() {
        let dir = scratch("evil");
        let secret = dir.join("secret.raw");
        std::fs::write(&secret, vec![0x77u8; 1 << 20]).unwrap();
        for target in [Path::new("/etc/shadow"), secret.as_path()] {
            let evil = dir.join("evil.qcow2");
            let _ = std::fs::remove_file(&evil);
            let t = target.to_str().unwrap();
            qemu::img(&["create", "-q", "-f", "qcow2", "-u", "-b", t, "-F", "raw", evil.to_str().unwrap(), "1M"]);
            let watch = OpenWatch::new(target);
            let err = open_image(&evil, false, None, &[]).err().expect("an image naming a backing file is refused");
            let DiskError::Image { reason, .. } = &err else { panic!("{err}") };
            assert!(reason.contains("denied") && reason.contains(t), "{err}");
            if target == secret {
                assert!(!watch.touched(), "the named backing file was opened");
            }
        }
        // Given a backing file explicitly, the header's name is ignored: the unallocated clusters read from
        // what the caller gave.
        let decoy = dir.join("decoy.raw");
        std::fs::write(&decoy, vec![0x11u8; 1 << 20]).unwrap();
        let watch = OpenWatch::new(&secret);
        let image = open_image(&dir.join("evil.qcow2"), false, None, &[decoy]).unwrap();
        assert_eq!(read_all(image.as_ref()).unwrap(), vec![0x11u8; 1 << 20]);
        assert!(!watch.touched(), "the named backing file was opened");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_truncated_or_broken_qcow2_gets_a_clear_error() {
        let dir = scratch("truncated");
        let content = qemu::pattern(4 << 20);
        let q = qcow2_of(&dir, "t", &content, &[]);
        let full = std::fs::read(&q).unwrap();
        // The header cut short, or its tables missing: refused when opened.
        std::fs::write(&q, &full[..100]).unwrap();
        let err = open_image(&q, false, None, &[]).err().expect("a 100-byte qcow2 is refused");
        assert!(matches!(err, DiskError::Empty { .. }), "{err}");
        let err = open_image(&q, true, None, &[]).err().expect("a 100-byte qcow2 is refused");
        assert!(matches!(err, DiskError::Image { format: ImageFormat::Qcow2, .. }), "{err}");
        eprintln!("100 bytes: {err}");
        // Its tables or data cut off: refused when opened (imago alone would read what is missing as zeros).
        for len in [4096, 196_612, full.len() / 2, full.len() - 65536] {
            std::fs::write(&q, &full[..len]).unwrap();
            let err = open_image(&q, false, None, &[]).err().expect("a qcow2 without its tables is refused");
            assert!(matches!(err, DiskError::Image { format: ImageFormat::Qcow2, .. }), "{err}");
            assert!(err.to_string().contains("past the end of the file"), "{err}");
            eprintln!("{len} bytes: {err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_qcow2_without_a_refcount_block_for_its_header_is_refused() {
        let dir = scratch("refblock");
        // Found by fuzzing: imago's allocator recursed until the stack overflowed on the first write.
        let found = dir.join("found.qcow2");
        std::fs::write(&found, include_bytes!("../../fuzz/corpus/qcow2/regression-no-refblock-recursion")).unwrap();
        // A real image with its refcount table's first entry cleared.
        let q = qcow2_of(&dir, "q", &qemu::pattern(1 << 20), &[]);
        let mut bytes = std::fs::read(&q).unwrap();
        let table = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
        assert!(open_image(&q, false, None, &[]).is_ok(), "the image as QEMU wrote it opens");
        bytes[table..table + 8].fill(0);
        std::fs::write(&q, &bytes).unwrap();
        for (path, read_only) in [(&found, true), (&found, false), (&q, true), (&q, false)] {
            let err = open_image(path, read_only, None, &[]).err().expect("refused");
            assert!(err.to_string().contains("no refcount block for the header"), "{err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn zero_length_requests_on_qcow2_move_nothing_and_succeed() {
        let dir = scratch("zero-length");
        let q = qcow2_of(&dir, "q", &qemu::pattern(1 << 20), &[]);
        let image = open_image(&q, false, None, &[]).unwrap();
        let mut none = [0u8; 0];
        let empty = VolatileSlice::from(&mut none[..]);
        for offset in [0, 4096, 1 << 20] {
            image.read_at(&empty, offset).unwrap();
            image.write_at(&empty, offset).unwrap();
            image.readv_at(std::slice::from_ref(&empty), offset).unwrap();
            image.writev_at(&[empty, empty], offset).unwrap();
        }
        assert_eq!(read_all(image.as_ref()).unwrap(), qemu::pattern(1 << 20));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_encrypted_qcow2_is_refused() {
        let dir = scratch("encrypted");
        let enc = dir.join("enc.qcow2");
        let e = enc.to_str().unwrap();
        let key = ["--object", "secret,id=s0,data=abc", "-o", "encrypt.format=aes,encrypt.key-secret=s0"];
        qemu::img(&[&["create", "-q", "-f", "qcow2"][..], &key, &[e, "1M"]].concat());
        let err = open_image(&enc, true, None, &[]).err().expect("an encrypted image is refused");
        assert!(err.to_string().contains("encrypted (AES)"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn backing_loops_and_overlong_chains_are_refused() {
        let dir = scratch("loops");
        let base = qcow2_of(&dir, "base", &qemu::pattern(1 << 20), &[]);
        let b = base.to_str().unwrap();
        let mid = dir.join("mid.qcow2");
        let top = dir.join("top.qcow2");
        qemu::img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", mid.to_str().unwrap()]);
        let m = mid.to_str().unwrap();
        qemu::img(&["create", "-q", "-f", "qcow2", "-b", m, "-F", "qcow2", top.to_str().unwrap()]);
        // The chain as recorded works.
        let image = open_image(&top, false, None, &[mid.clone(), base.clone()]).unwrap();
        assert_eq!(read_all(image.as_ref()).unwrap(), qemu::pattern(1 << 20));
        drop(image);
        // Only part of it: the rest would be an implicit open.
        let err = open_image(&top, false, None, std::slice::from_ref(&mid)).err().unwrap();
        assert!(matches!(err, DiskError::Image { .. }), "{err}");
        // The image itself, or a layer twice (through another name too), is a loop.
        let link = dir.join("link.qcow2");
        std::fs::hard_link(&mid, &link).unwrap();
        for chain in [vec![top.clone()], vec![mid.clone(), mid.clone()], vec![mid.clone(), link.clone(), base.clone()]]
        {
            let err = open_image(&top, false, None, &chain).err().unwrap();
            assert!(matches!(err, DiskError::BackingLoop { .. }), "{chain:?}: {err}");
        }
        let deep = vec![base.clone(); MAX_BACKING_DEPTH + 1];
        assert!(matches!(open_image(&top, false, None, &deep), Err(DiskError::BackingTooDeep { depth: 17, .. })));
        // Locks: the open overlay holds its backing files shared, so none of them can be opened for writing.
        let image = open_image(&top, false, None, &[mid.clone(), base.clone()]).unwrap();
        assert!(matches!(open_image(&top, false, None, &[mid.clone(), base.clone()]), Err(DiskError::Locked { .. })));
        assert!(matches!(open_image(&top, true, None, &[mid.clone(), base.clone()]), Err(DiskError::Locked { .. })));
        assert!(matches!(open_image(&base, false, None, &[]), Err(DiskError::Locked { .. })));
        let _reader = open_image(&base, true, None, &[]).unwrap();
        drop(image);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn created_qcow2_images_pass_qemu_img_check_and_overlays_read_their_backing() {
        let dir = scratch("create-qcow2");
        let empty = dir.join("empty.qcow2");
        create_qcow2(&empty, (1 << 30) + 1, None).unwrap();
        qemu::check(&empty);
        let info: serde_json::Value =
            serde_json::from_str(&qemu::img(&["info", "--output=json", empty.to_str().unwrap()])).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some((1 << 30) + 512), "whole sectors");
        assert!(qemu::actual_size(&empty) < 1 << 20, "a new image is small");
        assert!(matches!(create_qcow2(&empty, 4096, None), Err(DiskError::Create { .. })), "never replaced");
        // An overlay on a raw image, larger than it: the backing's name and format are in the header, the
        // backing shows through, and past its end the overlay reads zeros.
        let content = qemu::pattern(1 << 20);
        std::fs::write(dir.join("base.raw"), &content).unwrap();
        let over = dir.join("over.qcow2");
        create_qcow2(&over, 2 << 20, Some((Path::new("base.raw"), ImageFormat::Raw))).unwrap();
        qemu::check(&over);
        let info: serde_json::Value =
            serde_json::from_str(&qemu::img(&["info", "--output=json", over.to_str().unwrap()])).unwrap();
        assert_eq!(info["backing-filename"].as_str(), Some("base.raw"));
        assert_eq!(info["backing-filename-format"].as_str(), Some("raw"));
        let image = open_image(&over, false, None, &[dir.join("base.raw")]).unwrap();
        assert_eq!(image.size(), 2 << 20);
        let mut want = content.clone();
        want.resize(2 << 20, 0);
        assert_eq!(read_all(image.as_ref()).unwrap(), want);
        drop(image);
        // qemu-img reads the overlay the same way (it follows the recorded name).
        std::fs::write(dir.join("want.raw"), &want).unwrap();
        qemu::img(&["compare", "-q", over.to_str().unwrap(), dir.join("want.raw").to_str().unwrap()]);
        assert!(matches!(create_qcow2(&dir.join("zero.qcow2"), 0, None), Err(DiskError::Create { .. })));
        assert!(!dir.join("zero.qcow2").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A chain made by qemu-img: `base.qcow2` (the pattern, some clusters compressed), `mid.qcow2` on it
    /// (a write and explicit zeros), `top.qcow2` on that (another write). Returns (base, mid, top).
    fn qemu_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let base = qcow2_of(dir, "base", &qemu::pattern(4 << 20), &["-c"]);
        let (mid, top) = (dir.join("mid.qcow2"), dir.join("top.qcow2"));
        let (b, m, t) = (base.to_str().unwrap(), mid.to_str().unwrap(), top.to_str().unwrap());
        qemu::img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", m]);
        qemu::io(&["-c", "write -P 0x61 65536 200000", "-c", "write -z 1048576 131072", m]);
        qemu::img(&["create", "-q", "-f", "qcow2", "-b", m, "-F", "qcow2", t]);
        qemu::io(&[
            "-c",
            "write -P 0x62 100000 70000",
            "-c",
            "write -z 3145728 65536",
            "-c",
            "write -P 0x63 4128768 65536",
            t,
        ]);
        (base, mid, top)
    }

    fn raw_of(path: &Path) -> Vec<u8> {
        let out = path.with_extension("flat");
        let _ = std::fs::remove_file(&out);
        qemu::img(&["convert", "-O", "raw", path.to_str().unwrap(), out.to_str().unwrap()]);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    #[test]
    fn copies_flatten_the_chain_sparsely_and_qemu_img_agrees() {
        let dir = scratch("copy");
        let (base, mid, top) = qemu_chain(&dir);
        for format in [ImageFormat::Qcow2, ImageFormat::Raw] {
            let dst = dir.join(format!("copy.{format}"));
            let mut seen = Vec::new();
            copy_image(&top, &[mid.clone(), base.clone()], &dst, format, &mut |d, t| seen.push((d, t))).unwrap();
            assert_eq!(seen.last(), Some(&(4 << 20, 4 << 20)), "progress ends at the size");
            assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));
            if format == ImageFormat::Qcow2 {
                qemu::check(&dst);
            }
            assert_eq!(probe_format(&dst).unwrap(), format);
            qemu::img(&["compare", "-q", top.to_str().unwrap(), dst.to_str().unwrap()]);
            // The source's zeros (its second quarter, the zeroed ranges) take no space in the copy.
            assert!(qemu::actual_size(&dst) < (4 << 20) - (512 << 10), "{format}: {} bytes", qemu::actual_size(&dst));
            assert!(matches!(
                copy_image(&top, &[mid.clone(), base.clone()], &dst, format, &mut |_, _| {}),
                Err(DiskError::Create { .. })
            ));
        }
        // A failed copy (the source is refused) leaves nothing behind.
        let err = copy_image(&top, &[], &dir.join("no.qcow2"), ImageFormat::Qcow2, &mut |_, _| {}).err().unwrap();
        assert!(matches!(err, DiskError::Image { .. }), "{err}");
        assert!(!dir.join("no.qcow2").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_commit_makes_the_parent_read_as_the_overlay_and_leaves_the_rest_alone() {
        let dir = scratch("commit");
        let (base, mid, top) = qemu_chain(&dir);
        let (base_before, top_view) = (raw_of(&base), raw_of(&top));
        let mut last = (0, 0);
        commit_image(&top, &mid, std::slice::from_ref(&base), &mut |d, t| last = (d, t)).unwrap();
        assert_eq!(last, (4 << 20, 4 << 20));
        qemu::check(&mid);
        assert_eq!(raw_of(&mid), top_view, "the parent now reads as the overlay did");
        assert_eq!(raw_of(&top), top_view, "the overlay itself is unchanged");
        assert_eq!(raw_of(&base), base_before, "the layer below the parent is untouched");
        // Run again (as after an interrupted merge): the same result.
        commit_image(&top, &mid, std::slice::from_ref(&base), &mut |_, _| {}).unwrap();
        assert_eq!(raw_of(&mid), top_view);
        // Into a raw parent, through Porthole's own reader.
        let flat = dir.join("flat.raw");
        std::fs::write(&flat, qemu::pattern(4 << 20)).unwrap();
        let over = dir.join("over.qcow2");
        create_qcow2(&over, 4 << 20, Some((Path::new("flat.raw"), ImageFormat::Raw))).unwrap();
        qemu::io(&[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 512 1048576",
            "-c",
            "write -z 2097152 4096",
            over.to_str().unwrap(),
        ]);
        let view = raw_of(&over);
        commit_image(&over, &flat, &[], &mut |_, _| {}).unwrap();
        assert_eq!(std::fs::read(&flat).unwrap(), view);
        // A raw file is no overlay.
        assert!(commit_image(&flat, &mid, std::slice::from_ref(&base), &mut |_, _| {}).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

fn lock_limiter(d: &Drive) -> std::sync::MutexGuard<'_, crate::rate_limiter::DiskLimiter> {
    d.limiter.lock().unwrap_or_else(|p| p.into_inner())
}

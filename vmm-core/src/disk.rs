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
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
}

/// A raw image file: sector n of the guest is bytes n*512.. of the file. Never grows the file.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
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
    #[error("drive {drive} is not removable")]
    NotRemovable { drive: String },
    #[error("no drive named {0:?}")]
    NoSuchDrive(String),
    #[error("this VM has no removable drive")]
    NoRemovableDrive,
}

impl RawImage {
    /// Opens `path` read-write, or read-only with `read_only`. The file is locked (shared when read-only,
    /// exclusive otherwise) so that two VMs cannot write one image.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
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
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Locked { path: path.to_owned() }
            } else {
                open_err(e)
            });
        }
        Ok(RawImage { file, size: size - size % SECTOR_SIZE })
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
        self.size
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

/// What a drive has served (every boot together).
#[derive(Debug, Default)]
pub struct DiskStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    pub malformed: AtomicU64,
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
        }
    }

    /// Opens the image at `path` for a drive (read-only for a removable one).
    pub fn open_media(path: &Path, read_only: bool) -> Result<Media, DiskError> {
        Ok(Media { path: path.to_owned(), backend: Arc::new(RawImage::open(path, read_only)?) })
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
        }
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
}

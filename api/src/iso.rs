//! A small ISO 9660 reader: the primary volume descriptor's identifiers and the El Torito boot catalog's
//! platforms, which is what OS detection (osinfo-db) matches on. Both the GUI (for an ISO not yet uploaded)
//! and the daemon (for its library) use it.
//!
//! Facts from ECMA-119 (volume descriptors from sector 16, 2048-byte sectors, the fields' byte offsets) and
//! the El Torito specification (boot record, validation entry, default entry, section headers). It reads at
//! most [`MAX_DESCRIPTORS`] descriptors and [`CATALOG_SECTORS`] catalog sectors, whatever the image claims.

use std::io::{Read, Seek, SeekFrom};

use crate::IsoFacts;

/// Bytes in a CD sector (volume descriptors and El Torito addresses count in these).
pub const SECTOR: u64 = 2048;
/// Volume descriptors read at most, from sector 16, before giving up on finding the terminator.
pub const MAX_DESCRIPTORS: u64 = 32;
/// Sectors of the boot catalog read at most (64 entries each).
pub const CATALOG_SECTORS: usize = 2;

const DESCRIPTORS_START: u64 = 16;
const TYPE_BOOT_RECORD: u8 = 0;
const TYPE_PRIMARY: u8 = 1;
const TYPE_TERMINATOR: u8 = 255;
const EL_TORITO: &[u8] = b"EL TORITO SPECIFICATION";
const PLATFORM_BIOS: u8 = 0;
const PLATFORM_UEFI: u8 = 0xEF;

/// Why a file gave no ISO facts.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("not an ISO 9660 image (no CD001 volume descriptor at sector 16)")]
    NotIso,
    #[error("the ISO 9660 image has no primary volume descriptor")]
    NoPrimary,
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the facts of the ISO image at `path`.
pub fn read_file(path: &std::path::Path) -> Result<IsoFacts, IsoError> {
    read_facts(&mut std::fs::File::open(path)?)
}

/// Reads an ISO image's facts: the first primary volume descriptor's ids and size, and the boot catalog of
/// the first El Torito boot record, if any. A broken or missing boot catalog only makes it non-bootable.
pub fn read_facts<R: Read + Seek>(r: &mut R) -> Result<IsoFacts, IsoError> {
    let mut facts = None;
    let mut catalog_lba = None;
    for n in 0..MAX_DESCRIPTORS {
        let Some(sector) = read_sector(r, DESCRIPTORS_START + n)? else { break };
        if &sector[1..6] != b"CD001" {
            if n == 0 {
                return Err(IsoError::NotIso);
            }
            break;
        }
        match sector[0] {
            TYPE_PRIMARY if facts.is_none() => facts = Some(primary(&sector)),
            TYPE_BOOT_RECORD if catalog_lba.is_none() && sector[7..7 + EL_TORITO.len()] == *EL_TORITO => {
                catalog_lba = Some(le32(&sector[71..75]));
            }
            TYPE_TERMINATOR => break,
            _ => {}
        }
    }
    let Some(mut facts) = facts else {
        // A short file with no sector 16 at all is not an ISO either.
        return Err(if read_sector(r, DESCRIPTORS_START)?.is_some() { IsoError::NoPrimary } else { IsoError::NotIso });
    };
    if let Some(lba) = catalog_lba {
        let mut catalog = Vec::with_capacity(CATALOG_SECTORS * SECTOR as usize);
        for i in 0..CATALOG_SECTORS as u64 {
            match read_sector(r, u64::from(lba) + i)? {
                Some(s) => catalog.extend_from_slice(&s),
                None => break,
            }
        }
        let (bios, uefi) = boot_platforms(&catalog);
        facts.bios_bootable = bios;
        facts.uefi_bootable = uefi;
    }
    Ok(facts)
}

/// Sector `n`, or None past the end of the image.
fn read_sector<R: Read + Seek>(r: &mut R, n: u64) -> Result<Option<[u8; SECTOR as usize]>, IsoError> {
    let mut sector = [0u8; SECTOR as usize];
    let Some(offset) = n.checked_mul(SECTOR) else { return Ok(None) };
    r.seek(SeekFrom::Start(offset))?;
    let mut filled = 0;
    while filled < sector.len() {
        match r.read(&mut sector[filled..]) {
            Ok(0) => return Ok(None),
            Ok(k) => filled += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(sector))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// An identifier field: trailing spaces and NULs removed; None when nothing is left.
fn ident(field: &[u8]) -> Option<String> {
    let end = field.iter().rposition(|&b| b != b' ' && b != 0).map_or(0, |i| i + 1);
    (end > 0).then(|| String::from_utf8_lossy(&field[..end]).into_owned())
}

/// The primary volume descriptor's fields (ECMA-119 8.4).
fn primary(pvd: &[u8; SECTOR as usize]) -> IsoFacts {
    let blocks = u64::from(le32(&pvd[80..84]));
    let block_size = u64::from(u16::from_le_bytes([pvd[128], pvd[129]]));
    IsoFacts {
        system_id: ident(&pvd[8..40]),
        volume_id: ident(&pvd[40..72]),
        publisher_id: ident(&pvd[318..446]),
        application_id: ident(&pvd[574..702]),
        volume_bytes: blocks * block_size,
        bios_bootable: false,
        uefi_bootable: false,
    }
}

/// Which platforms the boot catalog has a bootable entry for: (PC BIOS, UEFI). A catalog whose validation
/// entry is broken (header id, key bytes, checksum) boots nothing.
fn boot_platforms(catalog: &[u8]) -> (bool, bool) {
    let mut entries = catalog.chunks_exact(32);
    let Some(validation) = entries.next() else { return (false, false) };
    let checksum = validation.chunks_exact(2).fold(0u16, |sum, w| sum.wrapping_add(u16::from_le_bytes([w[0], w[1]])));
    if validation[0] != 1 || validation[30..32] != [0x55, 0xAA] || checksum != 0 {
        return (false, false);
    }
    let (mut bios, mut uefi) = (false, false);
    let mut mark = |platform: u8, entry: &[u8]| {
        if entry[0] == 0x88 {
            bios |= platform == PLATFORM_BIOS;
            uefi |= platform == PLATFORM_UEFI;
        }
    };
    // The default entry boots on the validation entry's platform.
    let Some(default) = entries.next() else { return (false, false) };
    mark(validation[1], default);
    // Section headers (0x90: more follow, 0x91: the last), each followed by its entries; an entry may be
    // followed by extension entries (0x44).
    while let Some(header) = entries.next() {
        let last = match header[0] {
            0x90 => false,
            0x91 => true,
            0x44 => continue,
            _ => break,
        };
        let platform = header[1];
        let count = u16::from_le_bytes([header[2], header[3]]);
        let mut seen = 0;
        while seen < count {
            let Some(entry) = entries.next() else { break };
            if entry[0] == 0x44 {
                continue;
            }
            mark(platform, entry);
            seen += 1;
        }
        if last {
            break;
        }
    }
    (bios, uefi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A hand-made image: sectors 0..16 blank, then the given descriptors, a terminator, and `tail` sectors.
    struct Image {
        bytes: Vec<u8>,
    }

    fn descriptor(kind: u8) -> Vec<u8> {
        let mut s = vec![0u8; SECTOR as usize];
        s[0] = kind;
        s[1..6].copy_from_slice(b"CD001");
        s[6] = 1;
        s
    }

    fn pad(field: &mut [u8], text: &str) {
        field.fill(b' ');
        field[..text.len()].copy_from_slice(text.as_bytes());
    }

    fn pvd(volume: &str, system: &str, publisher: &str, application: &str, blocks: u32) -> Vec<u8> {
        let mut s = descriptor(TYPE_PRIMARY);
        pad(&mut s[8..40], system);
        pad(&mut s[40..72], volume);
        s[80..84].copy_from_slice(&blocks.to_le_bytes());
        s[84..88].copy_from_slice(&blocks.to_be_bytes());
        s[128..130].copy_from_slice(&2048u16.to_le_bytes());
        s[130..132].copy_from_slice(&2048u16.to_be_bytes());
        pad(&mut s[318..446], publisher);
        pad(&mut s[574..702], application);
        s
    }

    fn boot_record(catalog_lba: u32) -> Vec<u8> {
        let mut s = descriptor(TYPE_BOOT_RECORD);
        s[7..7 + EL_TORITO.len()].copy_from_slice(EL_TORITO);
        s[71..75].copy_from_slice(&catalog_lba.to_le_bytes());
        s
    }

    fn validation(platform: u8) -> Vec<u8> {
        let mut e = vec![0u8; 32];
        e[0] = 1;
        e[1] = platform;
        e[4..12].copy_from_slice(b"PORTHOLE");
        e[30] = 0x55;
        e[31] = 0xAA;
        let sum = e.chunks_exact(2).fold(0u16, |s, w| s.wrapping_add(u16::from_le_bytes([w[0], w[1]])));
        e[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
        e
    }

    fn entry(bootable: bool) -> Vec<u8> {
        let mut e = vec![0u8; 32];
        e[0] = if bootable { 0x88 } else { 0 };
        e[6] = 4;
        e[8..12].copy_from_slice(&40u32.to_le_bytes());
        e
    }

    fn section(last: bool, platform: u8, count: u16) -> Vec<u8> {
        let mut e = vec![0u8; 32];
        e[0] = if last { 0x91 } else { 0x90 };
        e[1] = platform;
        e[2..4].copy_from_slice(&count.to_le_bytes());
        e
    }

    impl Image {
        fn new(descriptors: &[Vec<u8>]) -> Image {
            let mut bytes = vec![0u8; 16 * SECTOR as usize];
            for d in descriptors {
                bytes.extend_from_slice(d);
            }
            bytes.extend_from_slice(&descriptor(TYPE_TERMINATOR));
            Image { bytes }
        }

        /// Puts the boot catalog (`entries`, 32 bytes each) at sector `lba`.
        fn catalog(mut self, lba: u32, entries: &[Vec<u8>]) -> Image {
            let at = lba as usize * SECTOR as usize;
            self.bytes.resize(self.bytes.len().max(at + SECTOR as usize), 0);
            let flat: Vec<u8> = entries.concat();
            self.bytes[at..at + flat.len()].copy_from_slice(&flat);
            self
        }

        fn facts(&self) -> Result<IsoFacts, IsoError> {
            read_facts(&mut Cursor::new(&self.bytes))
        }
    }

    #[test]
    fn reads_the_primary_descriptors_ids_trimmed_and_its_size() {
        let image = Image::new(&[pvd("Debian 11.5.0 amd64 n", "LINUX", "SUSE LINUX GmbH", "FC/5 x86_64", 1234)]);
        let f = image.facts().unwrap();
        assert_eq!(f.volume_id.as_deref(), Some("Debian 11.5.0 amd64 n"));
        assert_eq!(f.system_id.as_deref(), Some("LINUX"));
        assert_eq!(f.publisher_id.as_deref(), Some("SUSE LINUX GmbH"), "case kept");
        assert_eq!(f.application_id.as_deref(), Some("FC/5 x86_64"));
        assert_eq!(f.volume_bytes, 1234 * 2048);
        assert!(!f.bios_bootable && !f.uefi_bootable, "no boot record");
    }

    #[test]
    fn blank_and_nul_padded_ids_are_absent() {
        let mut d = pvd("X", "", "", "", 1);
        d[40..72].fill(0);
        d[40..43].copy_from_slice(b"A B");
        let f = Image::new(&[d]).facts().unwrap();
        assert_eq!(f.volume_id.as_deref(), Some("A B"), "inner blanks stay; trailing NULs go");
        assert_eq!((f.system_id, f.publisher_id, f.application_id), (None, None, None));
    }

    #[test]
    fn the_primary_descriptor_may_follow_others() {
        // A supplementary (Joliet) descriptor and a boot record before the primary one.
        let image = Image::new(&[descriptor(2), boot_record(30), pvd("LATE", "", "", "", 7)])
            .catalog(30, &[validation(PLATFORM_BIOS), entry(true)]);
        let f = image.facts().unwrap();
        assert_eq!(f.volume_id.as_deref(), Some("LATE"));
        assert!(f.bios_bootable && !f.uefi_bootable);
    }

    #[test]
    fn bios_and_uefi_entries_are_told_apart() {
        // BIOS default entry and a UEFI section (what grub-mkrescue and Debian's ISOs have).
        let both = Image::new(&[pvd("BOTH", "", "", "", 64), boot_record(33)])
            .catalog(33, &[validation(PLATFORM_BIOS), entry(true), section(true, PLATFORM_UEFI, 1), entry(true)]);
        let f = both.facts().unwrap();
        assert!(f.bios_bootable && f.uefi_bootable && !f.uefi_only());
        // UEFI only: the validation entry's platform is UEFI.
        let uefi = Image::new(&[pvd("UEFI", "", "", "", 64), boot_record(33)])
            .catalog(33, &[validation(PLATFORM_UEFI), entry(true)]);
        let f = uefi.facts().unwrap();
        assert!(!f.bios_bootable && f.uefi_bootable && f.uefi_only());
        // A non-bootable default entry, then several sections with extension entries in between.
        let mut ext = vec![0u8; 32];
        ext[0] = 0x44;
        let sections = Image::new(&[pvd("S", "", "", "", 64), boot_record(33)]).catalog(
            33,
            &[
                validation(PLATFORM_BIOS),
                entry(false),
                section(false, 2, 1),
                entry(true),
                ext,
                section(true, PLATFORM_UEFI, 2),
                entry(false),
                entry(true),
            ],
        );
        let f = sections.facts().unwrap();
        assert!(!f.bios_bootable && f.uefi_bootable, "{f:?}");
    }

    #[test]
    fn a_broken_catalog_boots_nothing() {
        let mut bad_sum = validation(PLATFORM_BIOS);
        bad_sum[28] ^= 1;
        let mut no_key = validation(PLATFORM_BIOS);
        no_key[31] = 0;
        for v in [bad_sum, no_key] {
            let f = Image::new(&[pvd("V", "", "", "", 64), boot_record(33)]).catalog(33, &[v, entry(true)]).facts();
            let f = f.unwrap();
            assert!(!f.bios_bootable && !f.uefi_bootable);
        }
        // A catalog past the end of the file, and one far past any real disc.
        for lba in [500, u32::MAX] {
            let f = Image::new(&[pvd("V", "", "", "", 64), boot_record(lba)]).facts().unwrap();
            assert_eq!((f.volume_id.as_deref(), f.bios_bootable), (Some("V"), false));
        }
        // A section header claiming 65 535 entries in a two-sector catalog.
        let f = Image::new(&[pvd("V", "", "", "", 64), boot_record(33)])
            .catalog(33, &[validation(PLATFORM_BIOS), entry(false), section(true, PLATFORM_UEFI, u16::MAX)])
            .facts()
            .unwrap();
        assert!(!f.uefi_bootable);
    }

    #[test]
    fn what_is_not_an_iso_says_so() {
        assert!(matches!(read_facts(&mut Cursor::new(vec![0u8; 100])), Err(IsoError::NotIso)));
        assert!(matches!(read_facts(&mut Cursor::new(vec![0u8; 40_000])), Err(IsoError::NotIso)));
        // Descriptors but no primary one.
        assert!(matches!(Image::new(&[descriptor(2)]).facts(), Err(IsoError::NoPrimary)));
        // A truncated primary descriptor.
        let mut image = Image::new(&[pvd("CUT", "", "", "", 1)]);
        image.bytes.truncate(16 * SECTOR as usize + 1000);
        assert!(matches!(image.facts(), Err(IsoError::NotIso)));
        // No terminator and endless descriptors: at most MAX_DESCRIPTORS are read.
        let mut endless = vec![0u8; 16 * SECTOR as usize];
        for _ in 0..100 {
            endless.extend_from_slice(&descriptor(2));
        }
        assert!(matches!(read_facts(&mut Cursor::new(endless)), Err(IsoError::NoPrimary)));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift generator: the same garbage every run.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let mut image =
                Image::new(&[pvd("R", "", "", "", 8), boot_record(33)]).catalog(33, &[validation(PLATFORM_BIOS)]);
            // Scramble the descriptors and the catalog, keeping the CD001 magic sometimes.
            let start = 16 * SECTOR as usize;
            for _ in 0..(round % 50 + 1) {
                let at = start + (next() as usize % (image.bytes.len() - start));
                image.bytes[at] = next() as u8;
            }
            if round % 3 == 0 {
                image.bytes.truncate(start + (next() as usize % (image.bytes.len() - start)));
            }
            let _ = image.facts();
        }
    }
}

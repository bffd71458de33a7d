//! The machine-state file: everything a paused VM is (RAM, every vCPU, the in-kernel interrupt controllers
//! and clocks, every device), written at one pause point and loaded into a new VMM process started with
//! the same configuration (`porthole-vmm --restore PATH`). The format is described in ARCHITECTURE.md
//! ("Machine-state files"); in short, all integers little-endian:
//!
//! ```text
//! header   magic "PHLSTATE" | format version u32 | body length u32 (<= 64 KiB) | body | crc32 of all before
//!   body   engine version (str) | memory bytes u64 | vCPUs u32 | device layout (str)
//! section  name length u8 | name (ASCII) | data length u64 | data | crc32 of name length..data
//!          ... repeated; the last section is "end" (no data)
//! str      length u16 | UTF-8 bytes
//! ```
//!
//! Memory (section `ram`, and `vram`) is stored as a page bitmap followed by the pages that are not all
//! zero, so a mostly idle guest makes a small file. Loading checks the magic, the version, every checksum
//! and every length against what the VM's configuration allows *before* anything is applied to the VM;
//! a file that fails is refused with a [`StateError`] and the VM never runs.

use std::io::Write;

use zerocopy::{FromBytes, IntoBytes};

/// The first bytes of every machine-state file.
pub const MAGIC: [u8; 8] = *b"PHLSTATE";
/// Bumped whenever the encoding of the header or of any section changes.
pub const FORMAT_VERSION: u32 = 1;
/// The engine that writes states (recorded in the header, reported in errors).
pub const ENGINE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The page size of the memory encoding.
pub const PAGE: usize = 4096;
/// Most bytes of a header body.
pub const MAX_HEADER: u32 = 64 * 1024;
/// Most bytes of any section but memory.
pub const MAX_SECTION: u64 = 1 << 20;
/// Most sections in a file.
pub const MAX_SECTIONS: usize = 1024;
/// The name of the last section.
pub const END: &str = "end";

/// Why a state could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("not a Porthole machine-state file (its first bytes are not {:?})", String::from_utf8_lossy(&MAGIC))]
    NotAState,
    #[error(
        "made by another version: state format {found} (engine {engine}); this engine ({ENGINE_VERSION}) reads format \
         {FORMAT_VERSION} only"
    )]
    Version { found: u32, engine: String },
    #[error("damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Mismatch(String),
    #[error("cannot save the machine state: {0}")]
    Unsupported(String),
    #[error("KVM failed to {what}: {source}")]
    Kvm { what: String, source: kvm_ioctls::Error },
    #[error("the VM is not paused at one point: {0}")]
    NotPaused(String),
}

impl StateError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StateError {
        let what = what.into();
        move |source| StateError::Io { what, source }
    }

    pub fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
        let what = what.into();
        move |source| StateError::Kvm { what, source }
    }
}

/// The facts of a VM's configuration a state must match to be loaded into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineFacts {
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The device layout in words (boot kind, drives, network cards), compared as a whole.
    pub layout: String,
}

impl MachineFacts {
    /// Whether a state made for `saved` may be loaded into a VM with these facts; the error says why not.
    pub fn check(&self, saved: &MachineFacts) -> Result<(), StateError> {
        if saved.vcpus != self.vcpus {
            let plural = if saved.vcpus == 1 { "" } else { "s" };
            return Err(StateError::Mismatch(format!(
                "the state is for a VM with {} vCPU{plural}, this one has {}",
                saved.vcpus, self.vcpus
            )));
        }
        if saved.memory_bytes != self.memory_bytes {
            return Err(StateError::Mismatch(format!(
                "the state is for a VM with {} MiB of memory, this one has {} MiB",
                saved.memory_bytes >> 20,
                self.memory_bytes >> 20
            )));
        }
        if saved.layout != self.layout {
            return Err(StateError::Mismatch(format!(
                "the state is for a VM with the devices [{}], this one has [{}]",
                saved.layout, self.layout
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Little-endian encoding of section contents.

/// Appends little-endian values to a section's data.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A byte string with its length (u32).
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    /// A string with its length (u16; longer strings are cut at a character boundary).
    pub fn str(&mut self, v: &str) {
        let mut end = v.len().min(u16::MAX as usize);
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.buf.extend_from_slice(&v.as_bytes()[..end]);
    }
    /// A KVM structure as its bytes (with their length, so a changed size is caught).
    pub fn pod<T: IntoBytes + zerocopy::Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
}

/// Reads little-endian values from a section's data; every read is bounded by what is left.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    section: &'a str,
}

impl<'a> Reader<'a> {
    pub fn new(section: &'a str, data: &'a [u8]) -> Self {
        Reader { data, section }
    }

    fn damaged(&self, what: &str) -> StateError {
        StateError::Damaged(format!("section {}: {what}", self.section))
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if n > self.data.len() {
            return Err(self.damaged(&format!("{n} bytes expected, {} left", self.data.len())));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }
    pub fn bool(&mut self) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.damaged(&format!("{v} is not a boolean"))),
        }
    }
    pub fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, StateError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// A byte string written by [`Writer::bytes`], at most `max` bytes long.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], StateError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.damaged(&format!("a field of {n} bytes, at most {max} allowed")));
        }
        self.take(n)
    }
    /// Exactly `N` bytes written by [`Writer::bytes`].
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let b = self.bytes(N)?;
        if b.len() != N {
            return Err(self.damaged(&format!("a field of {} bytes, {N} expected", b.len())));
        }
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
    pub fn str(&mut self) -> Result<&'a str, StateError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b).map_err(|_| self.damaged("a string is not UTF-8"))
    }
    /// A KVM structure written by [`Writer::pod`]; its size must be exactly the structure's.
    pub fn pod<T: FromBytes>(&mut self) -> Result<T, StateError> {
        let b = self.bytes(std::mem::size_of::<T>())?;
        T::read_from_bytes(b).map_err(|_| {
            self.damaged(&format!("{} is {} bytes, {} expected", std::any::type_name::<T>(), b.len(), size_of::<T>()))
        })
    }
    /// Fails unless everything was read.
    /// Whether everything has been read.
    pub fn is_at_end(&self) -> bool {
        self.data.is_empty()
    }

    pub fn finish(self) -> Result<(), StateError> {
        if self.data.is_empty() { Ok(()) } else { Err(self.damaged(&format!("{} bytes too many", self.data.len()))) }
    }
}

/// A device whose state goes into a machine-state file. `restore` decodes everything before it changes
/// the device, so a bad section leaves the device as it was.
pub trait DeviceState {
    fn save(&self, w: &mut Writer);
    fn restore(&mut self, r: &mut Reader) -> Result<(), StateError>;
}

// ---------------------------------------------------------------------------------------------------------
// Memory: a page bitmap, then the pages that are not all zero.

fn page_is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to only splits off the unaligned ends.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Which pages of `area` hold anything (bit i of byte i/8 for page i) and how many do.
pub fn page_bitmap(area: &[u8]) -> (Vec<u8>, usize) {
    let pages = area.len().div_ceil(PAGE);
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    let mut used = 0;
    for (i, page) in area.chunks(PAGE).enumerate() {
        if !page_is_zero(page) {
            bitmap[i / 8] |= 1 << (i % 8);
            used += 1;
        }
    }
    (bitmap, used)
}

/// The encoded size of a memory area of `len` bytes with `used` pages written.
pub fn encoded_area_len(len: u64, used: usize) -> u64 {
    8 + (len.div_ceil(PAGE as u64)).div_ceil(8) + used as u64 * PAGE as u64
}

/// The largest encoded size of areas of these lengths (every page written).
pub fn max_encoded_len(areas: &[u64]) -> u64 {
    4 + areas.iter().map(|&len| 8 + encoded_area_len(len, len.div_ceil(PAGE as u64) as usize)).sum::<u64>()
}

/// Writes areas (guest address, contents, bitmap from [`page_bitmap`]) as a memory section's data.
fn write_areas(out: &mut impl Write, areas: &[(u64, &[u8], &[u8])]) -> std::io::Result<()> {
    out.write_all(&(areas.len() as u32).to_le_bytes())?;
    for &(start, area, bitmap) in areas {
        out.write_all(&start.to_le_bytes())?;
        out.write_all(&(area.len() as u64).to_le_bytes())?;
        out.write_all(bitmap)?;
        for (i, page) in area.chunks(PAGE).enumerate() {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                out.write_all(page)?;
                if page.len() < PAGE {
                    out.write_all(&[0u8; PAGE][page.len()..])?;
                }
            }
        }
    }
    Ok(())
}

/// A memory section checked against the areas it must fill: (guest address, length) of each.
#[derive(Debug)]
pub struct MemoryImage<'a> {
    /// Per area: its bitmap and the written pages in order.
    areas: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> MemoryImage<'a> {
    /// Checks `data` (a memory section) against `expected` areas: same count, addresses and sizes, and
    /// exactly as many page bytes as the bitmaps say.
    pub fn parse(section: &'a str, data: &'a [u8], expected: &[(u64, u64)]) -> Result<Self, StateError> {
        let mut r = Reader::new(section, data);
        let count = r.u32()? as usize;
        if count != expected.len() {
            return Err(StateError::Damaged(format!(
                "section {section}: {count} memory areas, {} expected",
                expected.len()
            )));
        }
        let mut areas = Vec::with_capacity(count);
        for &(start, len) in expected {
            let (s, l) = (r.u64()?, r.u64()?);
            if (s, l) != (start, len) {
                return Err(StateError::Damaged(format!(
                    "section {section}: an area at {s:#x} of {l:#x} bytes, {start:#x} of {len:#x} expected"
                )));
            }
            let pages = len.div_ceil(PAGE as u64) as usize;
            let bitmap = r.take(pages.div_ceil(8))?;
            let used: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
            if !pages.is_multiple_of(8) && bitmap[bitmap.len() - 1] >> (pages % 8) != 0 {
                return Err(StateError::Damaged(format!("section {section}: bitmap bits past the area's end")));
            }
            let bytes =
                used.checked_mul(PAGE).ok_or_else(|| StateError::Damaged(format!("section {section}: size")))?;
            areas.push((bitmap, r.take(bytes)?));
        }
        r.finish()?;
        Ok(MemoryImage { areas })
    }

    /// Copies the pages into the areas' memory (each the full length given to `parse`) and zeroes the
    /// others (unless `zeroed`: the memory is known to be all zero, e.g. freshly mapped, and the pages
    /// not stored are left untouched, so they cost nothing).
    pub fn apply(&self, targets: &mut [&mut [u8]], zeroed: bool) {
        for ((bitmap, mut pages), target) in self.areas.iter().copied().zip(targets.iter_mut()) {
            for (i, page) in target.chunks_mut(PAGE).enumerate() {
                if bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) && pages.len() >= PAGE {
                    page.copy_from_slice(&pages[..page.len()]);
                    pages = &pages[PAGE..];
                } else if !zeroed && !page_is_zero(page) {
                    page.fill(0);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The file.

fn header_bytes(facts: &MachineFacts) -> Vec<u8> {
    let mut body = Writer::new();
    body.str(ENGINE_VERSION);
    body.u64(facts.memory_bytes);
    body.u32(facts.vcpus);
    body.str(&facts.layout);
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.buf.len() as u32).to_le_bytes());
    out.extend_from_slice(&body.buf);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A writer that keeps the CRC-32 of what passes through it.
struct Crc<'a, W: Write> {
    out: &'a mut W,
    hasher: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for Crc<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Writes a state file's sections in order.
pub struct StateWriter<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> StateWriter<W> {
    /// Starts a file: writes the header.
    pub fn new(mut out: W, facts: &MachineFacts) -> std::io::Result<Self> {
        let header = header_bytes(facts);
        out.write_all(&header)?;
        Ok(StateWriter { out, written: header.len() as u64 })
    }

    fn section_with(
        &mut self,
        name: &str,
        len: u64,
        body: impl FnOnce(&mut Crc<'_, W>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        if name.is_empty() || name.len() > 32 || !name.is_ascii() {
            return Err(invalid(format!("bad section name {name:?}")));
        }
        let mut crc = Crc { out: &mut self.out, hasher: crc32fast::Hasher::new(), written: 0 };
        crc.write_all(&[name.len() as u8])?;
        crc.write_all(name.as_bytes())?;
        crc.write_all(&len.to_le_bytes())?;
        let before = crc.written;
        body(&mut crc)?;
        if crc.written - before != len {
            return Err(invalid(format!("section {name}: {} bytes written, {len} announced", crc.written - before)));
        }
        let (sum, written) = (crc.hasher.finalize(), crc.written);
        self.out.write_all(&sum.to_le_bytes())?;
        self.written += written + 4;
        Ok(())
    }

    /// A section of small data.
    pub fn section(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        self.section_with(name, data.len() as u64, |out| out.write_all(data))
    }

    /// A memory section: `areas` are (guest address, contents); pages that are all zero are left out.
    pub fn memory(&mut self, name: &str, areas: &[(u64, &[u8])]) -> std::io::Result<()> {
        let bitmaps: Vec<(Vec<u8>, usize)> = areas.iter().map(|(_, a)| page_bitmap(a)).collect();
        let len = 4 + areas
            .iter()
            .zip(&bitmaps)
            .map(|((_, a), (_, used))| 8 + encoded_area_len(a.len() as u64, *used))
            .sum::<u64>();
        let with_bitmaps: Vec<(u64, &[u8], &[u8])> =
            areas.iter().zip(&bitmaps).map(|(&(s, a), (b, _))| (s, a, b.as_slice())).collect();
        self.section_with(name, len, |out| write_areas(out, &with_bitmaps))
    }

    /// Ends the file (the `end` section); returns its size and the writer.
    pub fn finish(mut self) -> std::io::Result<(u64, W)> {
        self.section(END, &[])?;
        self.out.flush()?;
        Ok((self.written, self.out))
    }
}

/// A state file read and checked: its facts and its sections (checksums verified).
#[derive(Debug)]
pub struct StateFile<'a> {
    pub facts: MachineFacts,
    pub engine: String,
    sections: Vec<(&'a str, &'a [u8])>,
}

impl<'a> StateFile<'a> {
    /// Parses and checks a whole file: magic, version, header checksum, then every section's name,
    /// length (at most `limit(name)`, which says how long a section may be, None for an unknown one) and
    /// checksum, up to the `end` section, which must be last.
    /// `expect`, when given, is checked against the header's facts before any section is looked at (a
    /// state for another configuration is refused as such, not as damaged).
    pub fn parse(
        data: &'a [u8],
        expect: Option<&MachineFacts>,
        limit: impl Fn(&str) -> Option<u64>,
    ) -> Result<Self, StateError> {
        let truncated = |what: &str| StateError::Damaged(format!("the file ends inside {what} (truncated)"));
        let word = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?)) };
        let (facts, engine, end) = parse_header(data)?;
        if let Some(expect) = expect {
            expect.check(&facts)?;
        }
        let mut at = end + 4;
        let mut sections: Vec<(&str, &[u8])> = Vec::new();
        loop {
            if sections.len() >= MAX_SECTIONS {
                return Err(StateError::Damaged(format!("more than {MAX_SECTIONS} sections")));
            }
            let start = at;
            let name_len = *data.get(at).ok_or_else(|| truncated("a section header"))? as usize;
            let name = data.get(at + 1..at + 1 + name_len).ok_or_else(|| truncated("a section name"))?;
            let name = std::str::from_utf8(name)
                .ok()
                .filter(|n| !n.is_empty() && n.is_ascii())
                .ok_or_else(|| StateError::Damaged(format!("a section name at byte {at} is not ASCII")))?;
            at += 1 + name_len;
            let len_bytes = data.get(at..at + 8).ok_or_else(|| truncated(&format!("section {name}'s header")))?;
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default());
            let max = limit(name).ok_or_else(|| StateError::Damaged(format!("an unknown section {name:?}")))?;
            if len > max {
                return Err(StateError::Damaged(format!(
                    "section {name}: {len} bytes, at most {max} for this VM's configuration"
                )));
            }
            if sections.iter().any(|(n, _)| *n == name) {
                return Err(StateError::Damaged(format!("section {name} appears twice")));
            }
            at += 8;
            let body_end = at.checked_add(len as usize).filter(|&e| e <= data.len());
            let body_end = body_end.ok_or_else(|| truncated(&format!("section {name}")))?;
            let sum = word(body_end).ok_or_else(|| truncated(&format!("section {name}'s checksum")))?;
            if crc32fast::hash(&data[start..body_end]) != sum {
                return Err(StateError::Damaged(format!("section {name} checksum")));
            }
            sections.push((name, &data[at..body_end]));
            at = body_end + 4;
            if name == END {
                break;
            }
        }
        if at != data.len() {
            return Err(StateError::Damaged(format!("{} bytes after the end section", data.len() - at)));
        }
        Ok(StateFile { facts, engine, sections })
    }

    /// A section's data; missing is an error (the VM needs every section it has devices for).
    pub fn section(&self, name: &str) -> Result<&'a [u8], StateError> {
        self.sections
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| *d)
            .ok_or_else(|| StateError::Damaged(format!("section {name} is missing")))
    }

    /// The names of the sections, in file order.
    pub fn names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.sections.iter().map(|(n, _)| *n)
    }
}

/// Checks a state file's header (magic, version, checksum) from its first bytes; returns the facts, the
/// engine that wrote it and where the sections begin.
pub fn parse_header(data: &[u8]) -> Result<(MachineFacts, String, usize), StateError> {
    let truncated = |what: &str| StateError::Damaged(format!("the file ends inside {what} (truncated)"));
    if data.len() < 8 || data[..8] != MAGIC {
        return Err(if data.len() < 8 && MAGIC.starts_with(data) {
            truncated("the header")
        } else {
            StateError::NotAState
        });
    }
    let word = |at: usize| -> Option<u32> { Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?)) };
    let version = word(8).ok_or_else(|| truncated("the header"))?;
    let body_len = word(12).ok_or_else(|| truncated("the header"))?;
    if body_len > MAX_HEADER {
        if version != FORMAT_VERSION {
            return Err(StateError::Version { found: version, engine: "unknown".into() });
        }
        return Err(StateError::Damaged(format!("a header of {body_len} bytes (at most {MAX_HEADER})")));
    }
    let end = 16 + body_len as usize;
    let crc = word(end).ok_or_else(|| truncated("the header"))?;
    let mut r = Reader::new("header", &data[16..end]);
    // The engine that wrote it, for the message, even when the version differs.
    let engine = r.str().map(str::to_owned).unwrap_or_else(|_| "unknown".into());
    if version != FORMAT_VERSION {
        return Err(StateError::Version { found: version, engine });
    }
    if crc32fast::hash(&data[..end]) != crc {
        return Err(StateError::Damaged("header checksum".into()));
    }
    let facts = MachineFacts { memory_bytes: r.u64()?, vcpus: r.u32()?, layout: r.str()?.to_owned() };
    r.finish()?;
    Ok((facts, engine, end))
}

/// Reads a whole state file, refusing one larger than `max_len` (what the VM's configuration allows)
/// before reading it.
pub fn read_file(path: &std::path::Path, max_len: u64, expect: Option<&MachineFacts>) -> Result<Vec<u8>, StateError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(StateError::io(format!("cannot open the state file {path:?}")))?;
    let len = file.metadata().map_err(StateError::io(format!("cannot read the state file {path:?}")))?.len();
    if len > max_len {
        // A state for a larger machine is refused as such when its header says so.
        let mut head = Vec::new();
        (&file)
            .take(u64::from(MAX_HEADER) + 20)
            .read_to_end(&mut head)
            .map_err(StateError::io(format!("cannot read the state file {path:?}")))?;
        let (facts, _, _) = parse_header(&head)?;
        if let Some(expect) = expect {
            expect.check(&facts)?;
        }
        return Err(StateError::Mismatch(format!(
            "the state file {path:?} has {len} bytes, more than a state of this VM can have ({max_len})"
        )));
    }
    let mut data = Vec::with_capacity(len as usize);
    file.take(max_len)
        .read_to_end(&mut data)
        .map_err(StateError::io(format!("cannot read the state file {path:?}")))?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> MachineFacts {
        MachineFacts { memory_bytes: 64 << 12, vcpus: 2, layout: "boot=kernel drives=[] nics=[]".into() }
    }

    fn limit(name: &str) -> Option<u64> {
        match name {
            "ram" => Some(max_encoded_len(&[64 << 12])),
            "a" | "b" | END => Some(MAX_SECTION),
            _ => None,
        }
    }

    /// A file with two small sections and a RAM section of 64 pages, three of them written.
    fn sample() -> (Vec<u8>, Vec<u8>) {
        let mut ram = vec![0u8; 64 << 12];
        ram[5] = 1;
        ram[(10 << 12) + 4095] = 2;
        ram[63 << 12] = 3;
        let mut w = StateWriter::new(Vec::new(), &facts()).unwrap();
        w.section("a", b"hello").unwrap();
        w.memory("ram", &[(0, &ram)]).unwrap();
        w.section("b", &[]).unwrap();
        let (len, file) = w.finish().unwrap();
        assert_eq!(len as usize, file.len());
        (file, ram)
    }

    #[test]
    fn round_trip() {
        let (file, ram) = sample();
        assert!(file.len() < 4 * PAGE + 200, "only the written pages are stored ({} bytes)", file.len());
        let state = StateFile::parse(&file, None, limit).unwrap();
        assert_eq!(state.facts, facts());
        assert_eq!(state.engine, ENGINE_VERSION);
        assert_eq!(state.names().collect::<Vec<_>>(), ["a", "ram", "b", END]);
        assert_eq!(state.section("a").unwrap(), b"hello");
        let image = MemoryImage::parse("ram", state.section("ram").unwrap(), &[(0, 64 << 12)]).unwrap();
        let mut target = vec![0xAAu8; 64 << 12];
        image.apply(&mut [&mut target], false);
        assert!(target == ram, "the memory came back as it was, every other page zeroed");
    }

    #[test]
    fn values_round_trip_and_reads_are_bounded() {
        let mut w = Writer::new();
        w.u8(7);
        w.bool(true);
        w.u16(0xBEEF);
        w.u32(0xDEAD_BEEF);
        w.u64(u64::MAX - 1);
        w.i64(-5);
        w.bytes(b"abc");
        w.str("zé");
        let regs = kvm_bindings::kvm_regs { rip: 0x1234, rax: 9, ..Default::default() };
        w.pod(&regs);
        let mut r = Reader::new("t", &w.buf);
        assert_eq!(r.u8().unwrap(), 7);
        assert!(r.bool().unwrap());
        assert_eq!(r.u16().unwrap(), 0xBEEF);
        assert_eq!(r.u32().unwrap(), 0xDEAD_BEEF);
        assert_eq!(r.u64().unwrap(), u64::MAX - 1);
        assert_eq!(r.i64().unwrap(), -5);
        assert_eq!(r.bytes(3).unwrap(), b"abc");
        assert_eq!(r.str().unwrap(), "zé");
        assert_eq!(r.pod::<kvm_bindings::kvm_regs>().unwrap(), regs);
        r.finish().unwrap();
        // A length field larger than what is left, or than allowed, is an error, not an allocation.
        let mut huge = Writer::new();
        huge.u32(u32::MAX);
        assert!(matches!(Reader::new("t", &huge.buf).bytes(usize::MAX), Err(StateError::Damaged(_))));
        assert!(matches!(Reader::new("t", &huge.buf).bytes(16), Err(StateError::Damaged(_))));
        assert!(Reader::new("t", &[1, 2]).u32().is_err());
        assert!(Reader::new("t", &[2]).bool().is_err());
    }

    /// Every section's boundaries, found by parsing the sample.
    fn boundaries(file: &[u8]) -> Vec<usize> {
        let mut at = 16 + u32::from_le_bytes(file[12..16].try_into().unwrap()) as usize + 4;
        let mut cuts = vec![0, 8, 12, 16, at];
        while at < file.len() {
            let name_len = file[at] as usize;
            let len = u64::from_le_bytes(file[at + 1 + name_len..at + 9 + name_len].try_into().unwrap()) as usize;
            cuts.extend([at + 1, at + 1 + name_len, at + 9 + name_len, at + 9 + name_len + len]);
            at += 9 + name_len + len + 4;
            cuts.push(at);
        }
        cuts
    }

    #[test]
    fn a_truncated_file_is_refused_at_every_section_boundary() {
        let (file, _) = sample();
        for cut in boundaries(&file).into_iter().filter(|&c| c < file.len()) {
            for at in [cut, cut.saturating_sub(1), cut + 1] {
                let err = StateFile::parse(&file[..at], None, limit).unwrap_err();
                assert!(matches!(err, StateError::Damaged(_) | StateError::NotAState), "cut at {at}: {err}");
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let (file, _) = sample();
        for at in 0..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 0x40;
            assert!(StateFile::parse(&bad, None, limit).is_err(), "a flipped byte at {at} went unnoticed");
        }
        // In a section body, the message names the section.
        let mut bad = file.clone();
        let at = file.windows(5).position(|w| w == b"hello").unwrap();
        bad[at] ^= 1;
        assert_eq!(StateFile::parse(&bad, None, limit).unwrap_err().to_string(), "damaged: section a checksum");
    }

    #[test]
    fn oversized_length_fields_are_refused_before_reading() {
        let (file, _) = sample();
        let cuts = boundaries(&file);
        // The first section's length field: set it to huge values (its checksum would fail too, but the
        // length check comes first and says why).
        let len_at = cuts[5] + 1; // name length byte, 1-byte name "a", then the length
        for huge in [u64::MAX, MAX_SECTION + 1, file.len() as u64] {
            let mut bad = file.clone();
            bad[len_at..len_at + 8].copy_from_slice(&huge.to_le_bytes());
            let err = StateFile::parse(&bad, None, limit).unwrap_err().to_string();
            assert!(err.starts_with("damaged: section a:") || err.contains("truncated"), "{huge}: {err}");
        }
        // A header body length beyond the limit.
        let mut bad = file.clone();
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(StateFile::parse(&bad, None, limit), Err(StateError::Damaged(_))));
        // A memory section whose bitmap claims more pages than it holds.
        let state = StateFile::parse(&file, None, limit).unwrap();
        let mut ram = state.section("ram").unwrap().to_vec();
        ram[20] |= 0x80; // a bit in the bitmap (after count u32, start u64, size u64)
        assert!(MemoryImage::parse("ram", &ram, &[(0, 64 << 12)]).is_err());
        assert!(MemoryImage::parse("ram", state.section("ram").unwrap(), &[(0, 65 << 12)]).is_err());
    }

    #[test]
    fn another_version_and_another_machine_are_refused_with_the_reason() {
        let (file, _) = sample();
        let mut bad = file.clone();
        bad[8..12].copy_from_slice(&2u32.to_le_bytes());
        let err = StateFile::parse(&bad, None, limit).unwrap_err().to_string();
        assert!(err.starts_with("made by another version: state format 2 (engine "), "{err}");
        let mut bad = file.clone();
        bad[0] = b'X';
        assert!(matches!(StateFile::parse(&bad, None, limit), Err(StateError::NotAState)));
        let state = StateFile::parse(&file, None, limit).unwrap();
        let one = MachineFacts { vcpus: 1, ..facts() };
        assert_eq!(
            one.check(&state.facts).unwrap_err().to_string(),
            "the state is for a VM with 2 vCPUs, this one has 1"
        );
        let other = MachineFacts { layout: "boot=kernel drives=[disk0] nics=[]".into(), ..facts() };
        assert!(other.check(&state.facts).is_err());
        facts().check(&state.facts).unwrap();
    }
}

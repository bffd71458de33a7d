//! Saving a running VM's machine state at one pause point, and starting a VM from one (see
//! [`crate::snapshot`] for the file format).
//!
//! Saving: the control thread ([`VmHandle::save_state`]) creates a new temporary file next to the target,
//! pauses the vCPUs and hands the file to the event loop, which owns the boot's devices: it has every
//! parked vCPU thread read its own vCPU ([`crate::vcpu::RunControl::run_job`]), reads the in-kernel
//! interrupt controllers and clocks, every device, then writes RAM and video memory straight from the
//! guest's mappings and fsyncs the file. The control thread then renames it over the target (and fsyncs
//! the folder), and resumes the guest or ends the VM as suspended.
//!
//! Restoring: [`Vm::restore_from`] reads and checks the whole file before anything runs (magic, version,
//! every checksum and length, the configuration facts, and decodes every vCPU's and the in-kernel state);
//! the first boot then loads memory and devices and sets each new vCPU's state before its thread starts.

use std::fs::File;
use std::io::BufWriter;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

use super::{Boot, BootDevices, Vm, VmHandle};
use crate::cpu_state::{VcpuState, VmKvmState};
use crate::devices::bus::lock;
use crate::display;
use crate::layout;
use crate::pci::PciBus;
use crate::snapshot::{
    self, DeviceState, MAX_SECTION, MachineFacts, MemoryImage, Reader, StateError, StateFile, StateWriter, Writer,
};
use crate::vcpu::{Vcpu, VcpuJob};

/// What to do once the state is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Then {
    /// Let the guest run on (a snapshot with RAM).
    Resume,
    /// End the VM; the process exits with status 5, reason "suspended" (suspend to disk).
    Stop,
}

/// What a save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveReport {
    /// The state file's size.
    pub bytes: u64,
    /// How long the guest was paused (from the pause to the file being in place).
    pub paused: Duration,
}

/// A save handed from the control thread to the event loop.
pub(super) struct SaveRequest {
    file: File,
    reply: mpsc::Sender<Result<u64, StateError>>,
}

/// The device sections (the vCPUs' are `vcpu0`, `vcpu1`, …).
const DEVICE_SECTIONS: [&str; 12] =
    ["kvm", "serial", "rtc", "i8042", "pm1", "dispi", "vga", "pci", "pci-ports", "fw-cfg", "drives", "nics"];

/// Longest media path a state may name.
const MAX_PATH: usize = 4096;

/// How long the vCPU threads get to read their state.
const VCPU_JOB_TIMEOUT: Duration = Duration::from_secs(10);

impl VmHandle {
    /// Whether a save is in progress (the VM stays paused until it ends).
    pub fn is_saving(&self) -> bool {
        self.saving.load(Ordering::Acquire)
    }

    /// Saves the machine state to `path` (written to a temporary file beside it, fsynced, then renamed
    /// over it), then resumes the guest (unless it was paused before) or ends the VM as suspended.
    pub fn save_state(&self, path: &Path, then: Then) -> Result<SaveReport, StateError> {
        if self.crash_report().is_some() {
            return Err(StateError::NotPaused("the guest has crashed: its vCPUs are gone".into()));
        }
        if self.saving.swap(true, Ordering::AcqRel) {
            return Err(StateError::NotPaused("another save is in progress".into()));
        }
        let result = self.save_state_locked(path, then);
        self.saving.store(false, Ordering::Release);
        result
    }

    fn save_state_locked(&self, path: &Path, then: Then) -> Result<SaveReport, StateError> {
        let name = path
            .file_name()
            .ok_or_else(|| StateError::Unsupported(format!("{path:?} is not a file path")))?
            .to_string_lossy()
            .into_owned();
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let temp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        // Created exclusively: the control threads' seccomp filter allows a writing open only with
        // O_CREAT|O_EXCL, never on an existing file.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(StateError::io(format!("cannot create {temp:?}")))?;
        let was_paused = self.run.is_paused();
        let start = Instant::now();
        if let Err(e) = self.pause_for_work() {
            let _ = std::fs::remove_file(&temp);
            if !was_paused {
                self.resume();
            }
            return Err(StateError::NotPaused(e.to_string()));
        }
        let (reply, answer) = mpsc::channel();
        *lock(&self.save_request) = Some(SaveRequest { file, reply });
        let _ = self.loop_wake.write(1);
        let saved = answer
            .recv_timeout(Duration::from_secs(600))
            .unwrap_or_else(|_| Err(StateError::NotPaused("the VM ended before its state was saved".into())))
            .and_then(|bytes| {
                std::fs::rename(&temp, path).map_err(StateError::io(format!("cannot rename {temp:?} to {path:?}")))?;
                // The rename itself is durable once the folder is synced.
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
                Ok(bytes)
            });
        let paused = start.elapsed();
        match saved {
            Ok(bytes) => {
                match then {
                    Then::Resume if !was_paused => self.resume(),
                    Then::Resume => {}
                    // The guest stays paused; the process ends once the caller has its answer
                    // ([`VmHandle::end_suspended`]): ending it here raced the reply, which a loaded host
                    // lost (the daemon read an empty answer).
                    Then::Stop => self.suspended.store(true, Ordering::Release),
                }
                log::info!("{}: state saved to {path:?} ({bytes} bytes, paused {paused:?})", self.name);
                Ok(SaveReport { bytes, paused })
            }
            Err(e) => {
                lock(&self.save_request).take();
                let _ = std::fs::remove_file(&temp);
                if !was_paused {
                    self.resume();
                }
                Err(e)
            }
        }
    }
}

/// A checked state file waiting to be loaded by the first boot.
pub(super) struct Restore {
    data: Vec<u8>,
    sections: Vec<(String, Range<usize>)>,
    vcpus: Vec<VcpuState>,
    kvm: VmKvmState,
}

impl Restore {
    fn section(&self, name: &str) -> Result<&[u8], StateError> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, r)| self.data.get(r.clone()))
            .ok_or_else(|| StateError::Damaged(format!("section {name} is missing")))
    }

    fn device(&self, name: &str, device: &mut dyn DeviceState) -> Result<(), StateError> {
        let mut r = Reader::new(name, self.section(name)?);
        device.restore(&mut r)?;
        r.finish()
    }

    /// Sets the in-kernel devices, then each new vCPU (created, CPUID set, not yet run).
    pub(super) fn apply_kvm(&self, vm: &VmFd, vcpus: &[Vcpu]) -> Result<(), StateError> {
        self.kvm.apply(vm)?;
        for (vcpu, state) in vcpus.iter().zip(&self.vcpus) {
            state.apply(&vcpu.fd, vcpu.index)?;
        }
        Ok(())
    }
}

/// A guest memory mapping as a byte slice.
///
/// # Safety
/// The mapping must stay mapped while the slice lives, and nothing may write it meanwhile unless the
/// slice is the only writer (the vCPUs are stopped or not started, no device thread touches memory).
unsafe fn mapping<'a>(addr: *mut u8, len: usize) -> &'a mut [u8] {
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts_mut(addr, len) }
}

fn vram_bytes(vram: &GuestRegionMmap) -> Result<*mut u8, StateError> {
    vram.get_host_address(MemoryRegionAddress(0)).map_err(|e| StateError::Unsupported(format!("video memory: {e}")))
}

impl Vm {
    /// The configuration facts a state must match.
    pub fn state_facts(&self) -> MachineFacts {
        // A firmware boot's ROM is mapped from the BIOS file again: it must be the same image.
        let boot = match &self.start {
            super::Start::Kernel(_) => "kernel".to_owned(),
            super::Start::Firmware(fw) => format!("firmware:{:08x}", crc32fast::hash(&fw.bios)),
        };
        let drives: Vec<String> = self
            .handle
            .drives
            .iter()
            .zip(&self.config.drives)
            .map(|(d, c)| {
                format!("{}:{}{}", d.id, if c.cdrom { "cd" } else { "disk" }, if d.read_only { ":ro" } else { "" })
            })
            .collect();
        let nics: Vec<String> =
            self.handle.nics.iter().filter(|n| n.attached()).map(|n| format!("{}:{}", n.id, n.mac)).collect();
        // Virtio input adds devices (a tablet and a keyboard); PS/2 alone adds nothing to the words.
        let input = match self.config.input {
            crate::config::InputMode::Ps2 => "",
            crate::config::InputMode::Virtio => " input=virtio",
        };
        // The agent's port is a device of its own.
        let input = match self.config.agent {
            crate::config::AgentMode::None => input.to_string(),
            crate::config::AgentMode::Spice => format!("{input} agent=spice"),
        };
        // So is the sound card.
        let input = match self.config.sound {
            crate::config::SoundMode::None => input,
            crate::config::SoundMode::Hda => format!("{input} sound=hda"),
            crate::config::SoundMode::Virtio => format!("{input} sound=virtio"),
        };
        // Room for more vCPUs shows in the ACPI tables; a VM at its maximum is one started with that many.
        let max_vcpus = match self.config.possible_vcpus() {
            max if max > self.config.vcpus => format!(" max-vcpus={max}"),
            _ => String::new(),
        };
        MachineFacts {
            memory_bytes: self.config.memory_bytes(),
            vcpus: self.config.vcpus,
            layout: format!("boot={boot} drives=[{}] nics=[{}]{input}{max_vcpus}", drives.join(","), nics.join(",")),
        }
    }

    /// Why this VM's state cannot be saved, if it cannot: devices whose state is not saved yet.
    fn unsupported(&self) -> Option<String> {
        None
    }

    /// How long each section of this VM's state may be (None: no such section).
    fn section_limit(&self, name: &str) -> Option<u64> {
        let ram: Vec<u64> = layout::ram_regions(self.config.memory_bytes()).iter().map(|&(_, len)| len).collect();
        match name {
            "ram" => Some(snapshot::max_encoded_len(&ram)),
            "vram" => Some(snapshot::max_encoded_len(&[display::VRAM_BYTES])),
            snapshot::END => Some(0),
            n if DEVICE_SECTIONS.contains(&n) => Some(MAX_SECTION),
            n => n
                .strip_prefix("vcpu")
                .and_then(|i| i.parse::<u32>().ok())
                .filter(|&i| i < self.config.vcpus && n == format!("vcpu{i}"))
                .map(|_| MAX_SECTION),
        }
    }

    /// The largest state file this VM can have.
    fn max_state_len(&self) -> u64 {
        let mut sections = vec!["ram".to_owned(), "vram".to_owned(), snapshot::END.to_owned()];
        sections.extend(DEVICE_SECTIONS.iter().map(|s| s.to_string()));
        sections.extend((0..self.config.vcpus).map(|i| format!("vcpu{i}")));
        let per_section = 1 + 255 + 8 + 4;
        u64::from(snapshot::MAX_HEADER)
            + 20
            + sections.iter().map(|s| self.section_limit(s).unwrap_or(0) + per_section).sum::<u64>()
    }

    /// Reads and checks the state file at `path`; the VM's first boot then starts from it instead of
    /// booting. Nothing is applied (and nothing runs) unless the whole file is sound and fits this VM.
    pub fn restore_from(&mut self, path: &Path) -> Result<(), StateError> {
        let facts = self.state_facts();
        let data = snapshot::read_file(path, self.max_state_len(), Some(&facts))?;
        let state = StateFile::parse(&data, Some(&facts), |name| self.section_limit(name))?;
        for name in DEVICE_SECTIONS.iter().chain(["ram", "vram"].iter()) {
            state.section(name)?;
        }
        let ram = layout::ram_regions(self.config.memory_bytes());
        MemoryImage::parse("ram", state.section("ram")?, &ram)?;
        MemoryImage::parse("vram", state.section("vram")?, &[(display::LFB_BASE, display::VRAM_BYTES)])?;
        let mut vcpus = Vec::new();
        for i in 0..self.config.vcpus {
            let name = format!("vcpu{i}");
            let mut r = Reader::new(&name, state.section(&name)?);
            vcpus.push(VcpuState::load(&mut r)?);
            r.finish()?;
        }
        let mut r = Reader::new("kvm", state.section("kvm")?);
        let kvm = VmKvmState::load(&mut r)?;
        r.finish()?;
        let media = self.saved_media(state.section("drives")?)?;
        let links = self.saved_links(state.section("nics")?)?;
        let base = data.as_ptr() as usize;
        let sections = state
            .names()
            .map(|name| {
                let body = state.section(name).unwrap_or_default();
                let at = body.as_ptr() as usize - base;
                (name.to_owned(), at..at + body.len())
            })
            .collect();
        drop(state);
        // The removable drives get the media they had when the state was saved (opened now: once the VM
        // runs, seccomp forbids it). A fixed disk is the configuration's (a snapshot's overlay may be new).
        for (drive, path) in self.handle.drives.iter().zip(media) {
            let now = drive.media().map(|m| m.path);
            if drive.removable && now != path {
                let media = match &path {
                    Some(p) => Some(crate::disk::Drive::open_media(p, true).map_err(|e| {
                        StateError::Mismatch(format!("the saved media of drive {:?} cannot be opened: {e}", drive.id))
                    })?),
                    None => None,
                };
                drive.change_media(media).map_err(|e| StateError::Mismatch(format!("drive {:?}: {e}", drive.id)))?;
            }
        }
        // Each card's cable as it was (no guest is there yet to be told).
        for (nic, up) in links {
            nic.set_link(up);
        }
        self.restore = Some(Restore { data, sections, vcpus, kvm });
        Ok(())
    }

    /// The link state of each attached card in the `nics` section (ids checked).
    fn saved_links(&self, data: &[u8]) -> Result<Vec<(Arc<crate::net::Nic>, bool)>, StateError> {
        let mut r = Reader::new("nics", data);
        let nics: Vec<_> = self.handle.nics.iter().filter(|n| n.attached()).collect();
        let n = r.u32()? as usize;
        if n != nics.len() {
            return Err(StateError::Damaged(format!("section nics: {n} cards, this VM has {}", nics.len())));
        }
        let mut links = Vec::with_capacity(n);
        for nic in nics {
            let id = r.str()?;
            if id != nic.id {
                return Err(StateError::Damaged(format!("section nics: card {id:?} where {:?} is", nic.id)));
            }
            links.push((nic.clone(), r.bool()?));
        }
        r.finish()?;
        Ok(links)
    }

    /// The media paths of the `drives` section, one per drive of this VM (in order, ids checked).
    fn saved_media(&self, data: &[u8]) -> Result<Vec<Option<PathBuf>>, StateError> {
        let mut r = Reader::new("drives", data);
        let n = r.u32()? as usize;
        if n != self.handle.drives.len() {
            return Err(StateError::Damaged(format!(
                "section drives: {n} drives, this VM has {}",
                self.handle.drives.len()
            )));
        }
        let mut media = Vec::with_capacity(n);
        for drive in &self.handle.drives {
            let id = r.str()?;
            if id != drive.id {
                return Err(StateError::Damaged(format!("section drives: drive {id:?} where {:?} is", drive.id)));
            }
            let present = r.bool()?;
            let path = r.str()?;
            if path.len() > MAX_PATH {
                return Err(StateError::Damaged("section drives: a path too long".into()));
            }
            media.push(present.then(|| PathBuf::from(path)));
        }
        r.finish()?;
        Ok(media)
    }

    /// Loads memory, video memory and every device from the state (the vCPUs are set later).
    pub(super) fn restore_devices(
        &mut self,
        restore: &Restore,
        vram: &GuestRegionMmap,
        devices: &BootDevices,
        pci: &PciBus,
    ) -> Result<(), StateError> {
        let ram = layout::ram_regions(self.config.memory_bytes());
        let image = MemoryImage::parse("ram", restore.section("ram")?, &ram)?;
        // SAFETY: the VM's RAM mappings live as long as the VM; no vCPU of this boot has started and no
        // device thread uses memory before the guest runs.
        let mut targets: Vec<&mut [u8]> = self.ram.iter().map(|r| unsafe { mapping(r.addr(), r.len()) }).collect();
        // A restore is the first boot: the RAM was just mapped, all zero.
        image.apply(&mut targets, self.handle.counters.boots.load(Ordering::Relaxed) == 0);
        let image = MemoryImage::parse("vram", restore.section("vram")?, &[(display::LFB_BASE, display::VRAM_BYTES)])?;
        // SAFETY: the video memory region lives in the boot being built; nothing else writes it yet.
        let vram = unsafe { mapping(vram_bytes(vram)?, display::VRAM_BYTES as usize) };
        // Video memory is mapped anew for each boot.
        image.apply(&mut [vram], true);
        restore.device("serial", &mut *lock(&self.serial))?;
        restore.device("rtc", &mut *lock(&self.rtc))?;
        restore.device("i8042", &mut *lock(&devices.i8042))?;
        restore.device("dispi", &mut *lock(&devices.display.dispi))?;
        restore.device("vga", &mut *lock(&devices.display.vga))?;
        restore.device("pci-ports", &mut *lock(&devices.pci_ports))?;
        let mut r = Reader::new("pm1", restore.section("pm1")?);
        lock(&devices.pm1_event).restore(&mut r)?;
        lock(&devices.pm1_control).restore(&mut r)?;
        // The GPE0 block follows (states saved before it existed end here: its events stay disabled).
        if !r.is_at_end() {
            lock(&devices.gpe0).restore(&mut r)?;
        }
        r.finish()?;
        let mut r = Reader::new("fw-cfg", restore.section("fw-cfg")?);
        let present = r.bool()?;
        match (&devices.fw_cfg, present) {
            (Some(fw_cfg), true) => lock(fw_cfg).restore(&mut r)?,
            (None, false) => {}
            _ => {
                return Err(StateError::Damaged(
                    "section fw-cfg: firmware state for a VM without, or none for one with".into(),
                ));
            }
        }
        r.finish()?;
        let mut r = Reader::new("pci", restore.section("pci")?);
        pci.restore_state(&mut r)?;
        r.finish()?;
        self.refresher.registers_version.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Carries out a save the control thread asked for and answers it.
    pub(super) fn serve_save(&self, boot: &Boot, request: SaveRequest) {
        let SaveRequest { file, reply } = request;
        let result = self.save_to(boot, file);
        if let Err(e) = &result {
            log::warn!("{}: saving the machine state failed: {e}", self.config.name);
        }
        let _ = reply.send(result);
    }

    /// Writes the paused VM's state to `file`; returns its size. The devices work again afterwards.
    fn save_to(&self, boot: &Boot, file: File) -> Result<u64, StateError> {
        let result = self.save_quiesced(boot, file);
        boot.pci.resume_after_save();
        result
    }

    fn save_quiesced(&self, boot: &Boot, file: File) -> Result<u64, StateError> {
        if let Some(why) = self.unsupported() {
            return Err(StateError::Unsupported(why));
        }
        // Every device first (small, in memory): if one cannot be saved, nothing is written.
        let msrs = self.msr_indices.clone();
        let job = VcpuJob::new(Box::new(move |index, fd| {
            let state = VcpuState::capture(fd, index, &msrs).map_err(|e| e.to_string())?;
            let mut w = Writer::new();
            state.save(&mut w);
            Ok(w.buf)
        }));
        let results = self.handle.run.run_job(job, VCPU_JOB_TIMEOUT).map_err(StateError::NotPaused)?;
        let mut sections: Vec<(String, Vec<u8>)> = Vec::new();
        for index in 0..self.config.vcpus {
            let state = results
                .get(&index)
                .cloned()
                .ok_or_else(|| StateError::NotPaused(format!("vCPU {index} did not report its state")))?
                .map_err(|e| StateError::Unsupported(format!("vCPU {index}: {e}")))?;
            sections.push((format!("vcpu{index}"), state));
        }
        let mut w = Writer::new();
        VmKvmState::capture(&boot.vm)?.save(&mut w);
        sections.push(("kvm".into(), w.buf));
        let d = &boot.devices;
        let one = |device: &dyn DeviceState| {
            let mut w = Writer::new();
            device.save(&mut w);
            w.buf
        };
        sections.push(("serial".into(), one(&*lock(&self.serial))));
        sections.push(("rtc".into(), one(&*lock(&self.rtc))));
        sections.push(("i8042".into(), one(&*lock(&d.i8042))));
        sections.push(("dispi".into(), one(&*lock(&d.display.dispi))));
        sections.push(("vga".into(), one(&*lock(&d.display.vga))));
        sections.push(("pci-ports".into(), one(&*lock(&d.pci_ports))));
        let mut w = Writer::new();
        w.bool(d.fw_cfg.is_some());
        if let Some(fw_cfg) = &d.fw_cfg {
            lock(fw_cfg).save(&mut w);
        }
        sections.push(("fw-cfg".into(), w.buf));
        // The media of each drive (a removable drive's may have changed since the VM started).
        let mut w = Writer::new();
        w.u32(self.handle.drives.len() as u32);
        for drive in &self.handle.drives {
            w.str(&drive.id);
            let media = drive.media().map(|m| m.path.to_string_lossy().into_owned());
            w.bool(media.is_some());
            w.str(media.as_deref().unwrap_or(""));
        }
        sections.push(("drives".into(), w.buf));
        // Whether each attached card's cable is plugged in.
        let mut w = Writer::new();
        let nics: Vec<_> = self.handle.nics.iter().filter(|n| n.attached()).collect();
        w.u32(nics.len() as u32);
        for nic in nics {
            w.str(&nic.id);
            w.bool(nic.link_up());
        }
        sections.push(("nics".into(), w.buf));
        let mut w = Writer::new();
        lock(&d.pm1_event).save(&mut w);
        lock(&d.pm1_control).save(&mut w);
        lock(&d.gpe0).save(&mut w);
        sections.push(("pm1".into(), w.buf));
        // Quiesces the virtio devices (no request in flight, none taken) until the file is written.
        let mut w = Writer::new();
        boot.pci.save_state(&mut w)?;
        sections.push(("pci".into(), w.buf));

        let write_err = StateError::io("cannot write the state file");
        let out = BufWriter::with_capacity(1 << 20, &file);
        let mut state =
            StateWriter::new(out, &self.state_facts()).map_err(StateError::io("cannot write the state file"))?;
        for (name, data) in &sections {
            state.section(name, data).map_err(StateError::io("cannot write the state file"))?;
        }
        let ram = layout::ram_regions(self.config.memory_bytes());
        // SAFETY: the RAM mappings live as long as the VM; every vCPU is parked (run_job checked it) and no
        // device thread touches memory (the virtio devices are quiesced, those that cannot be are refused
        // above); the console only reads.
        let areas: Vec<(u64, &[u8])> = ram
            .iter()
            .zip(&self.ram)
            .map(|(&(start, _), r)| (start, &*unsafe { mapping(r.addr(), r.len()) }))
            .collect();
        state.memory("ram", &areas).map_err(StateError::io("cannot write the state file"))?;
        // SAFETY: as above, for the boot's video memory.
        let vram = unsafe { mapping(vram_bytes(&boot.vram)?, display::VRAM_BYTES as usize) };
        state.memory("vram", &[(display::LFB_BASE, &*vram)]).map_err(StateError::io("cannot write the state file"))?;
        let (bytes, out) = state.finish().map_err(StateError::io("cannot write the state file"))?;
        drop(out);
        file.sync_all().map_err(write_err)?;
        Ok(bytes)
    }
}

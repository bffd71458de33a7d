//! The VM store: one folder per VM under `<data>/vms/<id>/` holding `vm.json` (its definition) and its
//! disk, and the image library under `<data>/images/`. Every file write is atomic (temp file, fsync,
//! rename, fsync of the folder); a file that cannot be read is reported and skipped, never deleted.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use porthole_api::{
    AgentMode, BootDevice, BootSpec, DiskFormat, DisplaySpec, InputMode, NicDefinition, SoundMode, UpdateVm, VgaMode,
};
use serde::{Deserialize, Serialize};

/// A VM's definition as stored in `vm.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    /// The most vCPUs the VM can have while it runs (hot-added up to it); none: `vcpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    pub memory_mib: u64,
    /// Size of `disk0.img` (0: the VM has no disk).
    pub disk_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// Image in the CD/DVD drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The network cards (`[]`: no network). Absent only in definitions written before networking: those
    /// get the default card when loaded (see `Host::open`).
    #[serde(default)]
    pub nics: Option<Vec<NicDefinition>>,
    /// The disk's files (see `disks.rs`). Absent in definitions written before qcow2: their disk is the raw
    /// `disk0.img` (filled in when loaded, see `Host::open`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskRecord>,
    /// The snapshot tree (each snapshot's disk layer is a file of the VM's folder).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRecord>,
    /// The snapshot the present disk layer ("Now") is an overlay of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_snapshot: Option<String>,
    /// A template: it never starts; it is cloned.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub template: bool,
    /// A linked clone: the VM whose present disk layer its own disk is an overlay of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linked_to: Option<String>,
    /// A VM from a cloud image: its NoCloud seed (`seed.iso` in its folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitRecord>,
    /// Suspended to disk: the machine-state file (in the VM's folder) that the next start resumes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<String>,
    /// Suspended by the daemon as it stopped (`--suspend-on-shutdown`): resumed when the daemon starts again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_on_start: bool,
    /// Free text about the VM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Started when the daemon starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub autostart: bool,
    /// Firmware boot order (absent: CD/DVD, then disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<Vec<BootDevice>>,
    /// Firmware boot: offer the boot menu.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub boot_menu: bool,
    /// The console's input (`porthole-vmm --input`): PS/2 only, or a virtio-input tablet and keyboard.
    /// Absent in definitions written before it: PS/2. Definitions of the tablet's time say `tablet: true`
    /// (read as `virtio`; their machine states, saved with a tablet and no keyboard, no longer load).
    #[serde(default, alias = "tablet", deserialize_with = "input_or_tablet", skip_serializing_if = "is_ps2")]
    pub input: InputMode,
    /// The display adapter (`porthole-vmm --vga`): the Bochs std VGA, or virtio-vga. Absent in
    /// definitions written before it: std (their saved machine states hold a std VGA).
    #[serde(default, skip_serializing_if = "is_std_vga")]
    pub vga: VgaMode,
    /// The guest agent channel (`porthole-vmm --agent`): none, or the SPICE agent's port. Absent in
    /// definitions written before it: none (their saved machine states have no such port).
    #[serde(default, skip_serializing_if = "is_no_agent")]
    pub agent: AgentMode,
    /// The sound card (`porthole-vmm --sound`): none, Intel HD Audio or virtio-sound. Absent in definitions written
    /// before it: none (their saved machine states have no sound card).
    #[serde(default, skip_serializing_if = "is_no_sound")]
    pub sound: SoundMode,
    /// A virtio memory balloon (`porthole-vmm --balloon`). Absent in definitions written before it: those
    /// VMs keep their devices (their saved machine states have no balloon).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub balloon: bool,
    /// CPU cap in percent of one CPU, and weight (cgroups; see `cpu_limits.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cap_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// The display's start-up resolution (absent: the engine's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<DisplaySpec>,
    /// Changes made while the VM ran, applied at its next start from power-on (see `Host::start`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "pending_with_tablet")]
    pub pending: Option<UpdateVm>,
    /// The disks after the boot disk (`disk`), in the engine's order (after the cloud-init seed, if any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<ExtraDisk>,
    /// Each disk slot's rate limits, in slot order (missing at the end: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_limits: Vec<porthole_api::DiskLimits>,
    /// The CD/DVD drives after the first one (whose image is `media`), in the engine's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_cdroms: Vec<CdromRecord>,
}

/// A disk after the boot disk: its files like the boot disk's (see `DiskRecord`) and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraDisk {
    /// The format of its bottom layer (every layer above it is qcow2).
    pub format: DiskFormat,
    /// Its present layer (a file of the VM's folder).
    pub top: String,
    /// What its bottom layer is an overlay of (a linked clone's: the same disk of the VM it was cloned from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<Below>,
    /// The size the guest sees.
    pub size_bytes: u64,
}

impl ExtraDisk {
    pub fn record(&self) -> DiskRecord {
        DiskRecord { format: self.format, top: self.top.clone(), below: self.below.clone() }
    }
}

/// A CD/DVD drive after the first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdromRecord {
    /// The library image in it (none: empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
}

/// A VM's disk: its present layer and what its bottom layer stands on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    /// The format of the VM's bottom layer (every layer above it is qcow2).
    pub format: DiskFormat,
    /// The present ("Now") layer: a file of the VM's folder, written by the running VM.
    pub top: String,
    /// What the bottom layer is an overlay of (none: it stands alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<Below>,
}

/// What a VM's bottom disk layer is an overlay of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Below {
    /// An image of the library (a cloud image), read-only while the VM exists.
    Image { name: String },
    /// The present layer of another VM (a linked clone's template), read-only while the clone exists.
    Vm { id: String },
}

/// A snapshot: the disk layer frozen when it was taken, and the machine state when it was taken running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub created_ms: u64,
    /// The snapshot whose layer this one's layer is an overlay of (none: the bottom layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The frozen layer (a file of the VM's folder).
    pub layer: String,
    /// The machine-state file (a file of the VM's folder) of a snapshot taken while the VM ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The frozen layers of the VM's other disks (`VmRecord::extra_disks`, in their order): a snapshot
    /// freezes every disk, and a VM's set of disks cannot change while it has snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_layers: Vec<String>,
}

/// What a cloud image VM's seed says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInitRecord {
    pub hostname: String,
    pub user: String,
    pub ssh_authorized_keys: Vec<String>,
    pub instance_id: String,
}

impl VmRecord {
    pub fn nics(&self) -> &[NicDefinition] {
        self.nics.as_deref().unwrap_or_default()
    }
}

/// Why the store refused something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} {path:?}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_owned(), source }
}

/// Writes `bytes` to `path` so that a crash at any point leaves the old file or the new one, never a mix:
/// a temp file in the same folder, fsync, rename over `path`, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("no parent folder"))?;
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| io::Error::other("bad file name"))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", random_hex(6)));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        crash_point("after-temp-write");
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fault injection for the power-loss test: with `PORTHOLED_CRASH_AT=<point>` in the environment the
/// daemon dies (SIGKILL, no clean-up) when it reaches that point of a write.
fn crash_point(point: &str) {
    if std::env::var_os("PORTHOLED_CRASH_AT").is_some_and(|p| p == point) {
        // SAFETY: raising a signal at ourselves.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the kernel's random source");
    hex::encode(bytes)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Whether `name` is a valid VM or image name: 1–63 of letters, digits, `-`, `_`, `.`, not starting with
/// `.` (so never `..`, never a path).
pub fn is_valid_name(name: &str) -> bool {
    vmm_core::config::is_valid_name(name)
}

/// The store on disk.
pub struct Store {
    vms_dir: PathBuf,
    images_dir: PathBuf,
}

/// What loading found.
pub struct Loaded {
    pub vms: BTreeMap<String, VmRecord>,
    /// Files that could not be used, with the reason (reported, left in place).
    pub problems: Vec<String>,
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let store = Store { vms_dir: data_dir.join("vms"), images_dir: data_dir.join("images") };
        for dir in [&store.vms_dir, &store.images_dir] {
            std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        }
        Ok(store)
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir.join(id)
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    /// Reads every VM definition; unreadable ones are reported and skipped. Temp files that a crash left
    /// behind (never the real definition, never a library image), unfinished uploads and the folders of VMs
    /// whose creation did not finish are removed.
    pub fn load(&self) -> Loaded {
        let mut loaded = Loaded { vms: BTreeMap::new(), problems: Vec::new() };
        // Uploads and sidecar writes a crash cut short (only this daemon writes them, and none runs yet).
        for f in std::fs::read_dir(&self.images_dir).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && (name.contains(".upload-") || name.contains(".tmp-")) {
                log::info!("removing {} (an unfinished upload or write)", f.path().display());
                let _ = std::fs::remove_file(f.path());
            }
        }
        let entries = match std::fs::read_dir(&self.vms_dir) {
            Ok(e) => e,
            Err(e) => {
                loaded.problems.push(format!("cannot read {}: {e}", self.vms_dir.display()));
                return loaded;
            }
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            if let Ok(files) = std::fs::read_dir(&dir) {
                for f in files.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with(".vm.json.tmp-") {
                        log::info!("removing {} (an unfinished write)", f.path().display());
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
            let file = dir.join("vm.json");
            // A folder without a definition is a VM whose creation (or clone) did not finish: its definition is
            // written last, after its disks, so what is there is half made.
            if !file.exists() && std::fs::symlink_metadata(&file).is_err() {
                log::info!("removing {} (a VM whose creation did not finish)", dir.display());
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    loaded.problems.push(format!("cannot remove the unfinished VM {}: {e}", dir.display()));
                }
                continue;
            }
            let record = std::fs::read(&file)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<VmRecord>(&b).map_err(|e| e.to_string()));
            match record {
                Ok(r) if Some(r.id.as_str()) == dir.file_name().and_then(|n| n.to_str()) && is_valid_name(&r.name) => {
                    loaded.vms.insert(r.id.clone(), r);
                }
                Ok(r) => {
                    loaded.problems.push(format!("{}: id {:?} or name {:?} does not fit", file.display(), r.id, r.name))
                }
                Err(e) => loaded.problems.push(format!("{}: {e} (skipped, left in place)", file.display())),
            }
        }
        for p in &loaded.problems {
            log::warn!("store: {p}");
        }
        loaded
    }

    /// Writes a VM's definition (creating its folder).
    pub fn save(&self, record: &VmRecord) -> Result<(), StoreError> {
        let dir = self.vm_dir(&record.id);
        std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let file = dir.join("vm.json");
        let bytes = serde_json::to_vec_pretty(record).expect("a VmRecord serializes");
        write_atomic(&file, &bytes).map_err(io_err("cannot write", &file))
    }

    /// Deletes a VM's folder: its definition and its disk.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.vm_dir(id);
        std::fs::remove_dir_all(&dir).map_err(io_err("cannot delete", &dir))
    }

    /// The library's images, by name.
    pub fn images(&self) -> Vec<(String, u64)> {
        let mut images: Vec<(String, u64)> = std::fs::read_dir(&self.images_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                let meta = e.metadata().ok()?;
                (meta.is_file() && is_valid_name(&name)).then_some((name, meta.len()))
            })
            .collect();
        images.sort();
        images
    }

    /// The path of image `name`, if it is a valid name.
    pub fn image_path(&self, name: &str) -> Option<PathBuf> {
        is_valid_name(name).then(|| self.images_dir.join(name))
    }
}

/// What a library image is, from its contents: (format, size a guest sees, bytes it takes on the host).
/// An unreadable file reads as raw with its file size.
pub fn image_facts(path: &Path) -> (porthole_api::ImageFormat, u64, u64) {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let Ok(mut file) = File::open(path) else { return (porthole_api::ImageFormat::Raw, 0, 0) };
    let (len, allocated) = file.metadata().map(|m| (m.len(), m.blocks() * 512)).unwrap_or((0, 0));
    let mut head = [0u8; 32];
    if file.read_exact(&mut head).is_ok() && head[..4] == vmm_core::disk::QCOW2_MAGIC {
        // The virtual size is the header's big-endian u64 at byte 24.
        let size = u64::from_be_bytes(head[24..32].try_into().unwrap_or_default());
        return (porthole_api::ImageFormat::Qcow2, size, allocated);
    }
    // ISO 9660: the primary volume descriptor's "CD001" at byte 32 769 (sector 16, offset 1).
    let mut id = [0u8; 5];
    let iso = file.seek(SeekFrom::Start(32_769)).is_ok() && file.read_exact(&mut id).is_ok() && &id == b"CD001";
    let format = if iso { porthole_api::ImageFormat::Iso } else { porthole_api::ImageFormat::Raw };
    (format, len, allocated)
}

fn is_ps2(mode: &InputMode) -> bool {
    *mode == InputMode::Ps2
}

fn is_std_vga(mode: &VgaMode) -> bool {
    *mode == VgaMode::Std
}

fn is_no_agent(mode: &AgentMode) -> bool {
    *mode == AgentMode::None
}

fn is_no_sound(mode: &SoundMode) -> bool {
    *mode == SoundMode::None
}

/// `"ps2"`/`"virtio"`, or the boolean of the older `tablet` field (true: the tablet, now virtio input).
fn input_or_tablet<'de, D: serde::Deserializer<'de>>(d: D) -> Result<InputMode, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Mode(InputMode),
        Tablet(bool),
    }
    Ok(match Either::deserialize(d)? {
        Either::Mode(m) => m,
        Either::Tablet(true) => InputMode::Virtio,
        Either::Tablet(false) => InputMode::Ps2,
    })
}

/// Pending changes, where a change of the older `tablet` field (true/false) becomes one of `input`.
fn pending_with_tablet<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<UpdateVm>, D::Error> {
    let Some(mut v) = Option::<serde_json::Value>::deserialize(d)? else { return Ok(None) };
    if let Some(map) = v.as_object_mut()
        && let Some(tablet) = map.remove("tablet")
    {
        let mode = if tablet.as_bool().unwrap_or(false) { InputMode::Virtio } else { InputMode::Ps2 };
        map.entry("input").or_insert_with(|| serde_json::Value::from(mode.as_str()));
    }
    serde_json::from_value(v).map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("portholed-store-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn record(id: &str, name: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 64,
            created_ms: 1,
            nics: Some(Vec::new()),
            ..VmRecord::default()
        }
    }

    /// Definitions written before the display adapter was chosen read as the std VGA (their saved machine
    /// states hold one); std is written as nothing, virtio as `"vga": "virtio"`, also as a pending change.
    #[test]
    fn definitions_without_a_display_adapter_keep_the_std_vga() {
        let v = serde_json::to_value(record("a", "old")).unwrap();
        assert!(v.get("vga").is_none(), "std is the default, not written");
        let r: VmRecord = serde_json::from_value(v).unwrap();
        assert_eq!(r.vga, VgaMode::Std);
        let mut r2 = r.clone();
        r2.vga = VgaMode::Virtio;
        r2.pending = Some(UpdateVm { vga: Some(VgaMode::Std), ..UpdateVm::default() });
        let written = serde_json::to_value(&r2).unwrap();
        assert_eq!((&written["vga"], &written["pending"]["vga"]), (&"virtio".into(), &"std".into()));
        assert_eq!(serde_json::from_value::<VmRecord>(written).unwrap(), r2);
        let mut bad = serde_json::to_value(record("b", "bad")).unwrap();
        bad["vga"] = "cirrus".into();
        assert!(serde_json::from_value::<VmRecord>(bad).is_err());
    }

    /// Definitions written in the tablet's time (`tablet: true|false`, also as a pending change) read as
    /// virtio or PS/2 input; PS/2 is written as nothing, virtio as `"input": "virtio"`.
    #[test]
    fn the_older_tablet_field_reads_as_the_input_mode() {
        let mut v = serde_json::to_value(record("a", "old")).unwrap();
        assert!(v.get("input").is_none(), "PS/2 is the default, not written");
        v["tablet"] = true.into();
        v["pending"] = serde_json::json!({"tablet": false, "vcpus": 2});
        let r: VmRecord = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(r.input, InputMode::Virtio);
        let pending = r.pending.clone().unwrap();
        assert_eq!((pending.input, pending.vcpus), (Some(InputMode::Ps2), Some(2)));
        v["tablet"] = false.into();
        v["pending"] = serde_json::json!({"tablet": true});
        let r2: VmRecord = serde_json::from_value(v).unwrap();
        assert_eq!(r2.input, InputMode::Ps2);
        assert_eq!(r2.pending.unwrap().input, Some(InputMode::Virtio));
        let written = serde_json::to_value(&r).unwrap();
        assert_eq!(written["input"], "virtio");
        assert!(written.get("tablet").is_none());
        assert_eq!(serde_json::from_value::<VmRecord>(written).unwrap(), r);
        let mut bad = serde_json::to_value(record("b", "bad")).unwrap();
        bad["input"] = "usb".into();
        assert!(serde_json::from_value::<VmRecord>(bad).is_err());
    }

    #[test]
    fn saves_loads_and_reports_broken_files_without_deleting_them() {
        let dir = scratch("load");
        let store = Store::open(&dir).unwrap();
        store.save(&record("aaaa", "web1")).unwrap();
        store.save(&record("bbbb", "db")).unwrap();
        std::fs::create_dir_all(store.vm_dir("cccc")).unwrap();
        std::fs::write(store.vm_dir("cccc").join("vm.json"), b"{ not json").unwrap();
        std::fs::write(store.vm_dir("aaaa").join(".vm.json.tmp-123"), b"half a wri").unwrap();
        // A creation cut short: its disk, no definition yet. An upload cut short.
        std::fs::create_dir_all(store.vm_dir("dddd")).unwrap();
        std::fs::write(store.vm_dir("dddd").join("disk0.qcow2"), b"QFI").unwrap();
        std::fs::create_dir_all(store.images_dir()).unwrap();
        std::fs::write(store.images_dir().join(".x.iso.upload-ab12"), b"half").unwrap();
        std::fs::write(store.images_dir().join("kept.iso"), b"whole").unwrap();
        let loaded = store.load();
        assert!(!store.vm_dir("dddd").exists(), "the unfinished VM's folder goes");
        assert!(!store.images_dir().join(".x.iso.upload-ab12").exists(), "the partial upload goes");
        assert!(store.images_dir().join("kept.iso").exists());
        assert_eq!(loaded.vms.keys().collect::<Vec<_>>(), ["aaaa", "bbbb"]);
        assert_eq!(loaded.problems.len(), 1, "{:?}", loaded.problems);
        assert!(loaded.problems[0].contains("cccc"));
        assert!(store.vm_dir("cccc").join("vm.json").exists(), "never deleted");
        assert!(!store.vm_dir("aaaa").join(".vm.json.tmp-123").exists(), "leftover temp files go");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = scratch("atomic");
        let f = dir.join("x.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two, longer");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temp file left");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

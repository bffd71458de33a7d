//! VM disks: the files of a VM's disk, its backing chain, snapshots (external qcow2 overlays), clones.
//!
//! A VM's folder holds its disk layers, flat: the bottom layer (`disk0.qcow2`, or the raw `disk0.img` of
//! VMs made before qcow2 or made raw), one `layer-<hex>.qcow2` per further layer, machine-state files
//! (`state-<snapshot>.bin`, `suspend.state`) and the cloud-init seed (`seed.iso`). The definition
//! (`vm.json`) records which file is the present layer ("Now", `DiskRecord::top`) and, per snapshot, its
//! frozen layer and the snapshot it was taken on (`SnapshotRecord::parent`): a layer is an overlay of its
//! parent snapshot's layer; the bottom layer stands alone or is an overlay of a library image (cloud images)
//! or of another VM's present layer (linked clones). Backing files named inside images are never trusted:
//! the daemon gives the engine the whole chain from these records. The names written in the headers are
//! relative (`layer-x.qcow2`, `../<vm>/disk0.qcow2`, `../../images/<name>`), so `qemu-img` reads the same
//! chains.
//!
//! Rules: taking a snapshot freezes the present layer as the snapshot's and puts a new empty overlay on it;
//! reverting puts a new empty overlay on the snapshot's layer and drops the old present layer; deleting a
//! snapshot whose layer has one child layer (a snapshot's, or Now) merges that child into it and gives the
//! merged file the child's name (so every other layer's content and backing name stay as they were); one
//! with no child layer is just removed; one with several is refused.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use porthole_api::{DiskFormat, Snapshot, SnapshotTree, VmState};
use vmm_core::disk::ImageFormat;

use crate::host::{Host, HostError};
use crate::store::{Below, DiskRecord, ExtraDisk, SnapshotRecord, VmRecord, now_ms, random_hex};

/// The bottom layer of a new qcow2 disk.
pub const QCOW2_DISK: &str = "disk0.qcow2";
/// The raw disk of VMs from before qcow2 (and of VMs made raw).
pub const RAW_DISK: &str = "disk0.img";
/// The machine state of a suspended VM.
pub const SUSPEND_STATE: &str = "suspend.state";
/// A VM's cloud-init seed.
pub const SEED: &str = "seed.iso";
/// Longest backing chain followed through linked clones.
const MAX_DEPTH: usize = vmm_core::disk::MAX_BACKING_DEPTH;

/// Reports (bytes done, bytes in all) of a long disk operation.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;
/// A disk operation whose checks passed, to be run (it ends with what it made: a snapshot or VM id).
pub type Job = Pin<Box<dyn Future<Output = Result<Option<String>, HostError>> + Send>>;

pub fn to_image_format(f: DiskFormat) -> ImageFormat {
    match f {
        DiskFormat::Qcow2 => ImageFormat::Qcow2,
        DiskFormat::Raw => ImageFormat::Raw,
    }
}

/// The disk of a definition from before qcow2: the raw `disk0.img` (none when it has no disk).
pub fn legacy_disk(r: &VmRecord) -> Option<DiskRecord> {
    (r.disk.is_none() && r.disk_bytes > 0).then(|| DiskRecord {
        format: DiskFormat::Raw,
        top: RAW_DISK.into(),
        below: None,
    })
}

/// A VM's disks in the engine's order of its own disks (the cloud-init seed aside): slot 0 the boot disk
/// (`disk`), slot n `extra_disks[n-1]`. Empty when the VM has no boot disk.
pub fn disk_slots(r: &VmRecord) -> Vec<DiskRecord> {
    let Some(d0) = r.disk.clone().or_else(|| legacy_disk(r)) else { return Vec::new() };
    let mut out = vec![d0];
    out.extend(r.extra_disks.iter().map(ExtraDisk::record));
    out
}

/// Snapshot `s`'s frozen layer of disk slot `slot`.
pub fn slot_layer(s: &SnapshotRecord, slot: usize) -> Option<&str> {
    if slot == 0 { Some(&s.layer) } else { s.extra_layers.get(slot - 1).map(String::as_str) }
}

/// Sets the present layer of disk slot `slot` (`d0`: the boot disk's record, for a legacy definition).
fn set_top(r: &mut VmRecord, slot: usize, d0: &DiskRecord, top: String) {
    if slot == 0 {
        r.disk.get_or_insert_with(|| d0.clone()).top = top;
    } else if let Some(e) = r.extra_disks.get_mut(slot - 1) {
        e.top = top;
    }
}

/// The size the guest sees of disk slot `slot`.
pub fn slot_size(r: &VmRecord, slot: usize) -> u64 {
    if slot == 0 { r.disk_bytes } else { r.extra_disks.get(slot - 1).map_or(0, |e| e.size_bytes) }
}

pub fn set_slot_size(r: &mut VmRecord, slot: usize, size: u64) {
    if slot == 0 {
        r.disk_bytes = size;
    } else if let Some(e) = r.extra_disks.get_mut(slot - 1) {
        e.size_bytes = size;
    }
}

/// The VM's own layers of disk slot `slot` that the present disk reads: Now, then its snapshots' layers.
pub fn own_layers(r: &VmRecord, slot: usize) -> Vec<String> {
    let Some(d) = disk_slots(r).into_iter().nth(slot) else { return Vec::new() };
    let mut own = vec![d.top];
    own.extend(layers_from(r, r.current_snapshot.as_deref(), slot));
    own
}

/// Whether `name` can name a snapshot: 1–63 letters, digits, spaces, `-`, `_`, `.`, not blank, not
/// starting with `.` or a space.
pub fn check_snapshot_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.chars().count())
        && !name.starts_with(['.', ' '])
        && name.chars().all(|c| c.is_alphanumeric() || " -_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "snapshot name {name:?} is invalid: use 1-63 letters, digits, spaces, '-', '_' or '.' (no '/'), not \
             starting with '.' or a space"
        ))
    }
}

/// A layer that sits on a snapshot's layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Child {
    Snapshot(String),
    Now,
}

pub fn snapshot<'a>(r: &'a VmRecord, sid: &str) -> Option<&'a SnapshotRecord> {
    r.snapshots.iter().find(|s| s.id == sid)
}

/// The layers on snapshot `sid`'s layer.
pub fn children(r: &VmRecord, sid: &str) -> Vec<Child> {
    let mut out: Vec<Child> = r
        .snapshots
        .iter()
        .filter(|s| s.parent.as_deref() == Some(sid))
        .map(|s| Child::Snapshot(s.id.clone()))
        .collect();
    if r.current_snapshot.as_deref() == Some(sid) {
        out.push(Child::Now);
    }
    out
}

/// The VM's own layers of disk slot `slot` from snapshot `sid`'s down to the bottom (file names), nearest
/// first.
pub fn layers_from(r: &VmRecord, sid: Option<&str>, slot: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = sid.map(str::to_owned);
    while let Some(id) = at {
        let Some(s) = snapshot(r, &id) else { break };
        let Some(layer) = slot_layer(s, slot) else { break };
        if out.iter().any(|l| l == layer) || out.len() > r.snapshots.len() {
            break; // a broken record: never loop
        }
        out.push(layer.to_owned());
        at = s.parent.clone();
    }
    out
}

/// Whether snapshot `sid` lies on the way from Now to the bottom (its layer is read by the present disk).
pub fn is_ancestor_of_now(r: &VmRecord, sid: &str) -> bool {
    let mut at = r.current_snapshot.clone();
    let mut steps = 0;
    while let Some(id) = at {
        if id == sid {
            return true;
        }
        steps += 1;
        if steps > r.snapshots.len() {
            return false;
        }
        at = snapshot(r, &id).and_then(|s| s.parent.clone());
    }
    false
}

/// The format of the present layer: the bottom's when Now is the bottom layer, qcow2 otherwise.
pub fn top_format(d: &DiskRecord, r: &VmRecord) -> ImageFormat {
    if r.current_snapshot.is_none() { to_image_format(d.format) } else { ImageFormat::Qcow2 }
}

/// The format of a snapshot's layer.
fn layer_format(d: &DiskRecord, s: &SnapshotRecord) -> ImageFormat {
    if s.parent.is_none() { to_image_format(d.format) } else { ImageFormat::Qcow2 }
}

/// A layer file name not used in `dir`.
fn new_layer_name(dir: &Path) -> String {
    loop {
        let name = format!("layer-{}.qcow2", random_hex(4));
        if !dir.join(&name).exists() {
            return name;
        }
    }
}

/// Bytes a file takes on the host (0 when it is missing).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Bytes the VM's own disk files take: every layer, saved state and seed (a linked clone's or cloud image's
/// base not counted).
pub fn disk_allocated(dir: &Path, r: &VmRecord) -> u64 {
    let slots = disk_slots(r);
    if slots.is_empty() {
        return 0;
    }
    let mut files: Vec<String> = slots.iter().map(|d| d.top.clone()).collect();
    for s in &r.snapshots {
        files.push(s.layer.clone());
        files.extend(s.extra_layers.iter().cloned());
        files.extend(s.state.clone());
    }
    files.extend(r.suspended.clone());
    if r.cloud_init.is_some() {
        files.push(SEED.into());
    }
    files.iter().map(|f| allocated(&dir.join(f))).sum()
}

/// The snapshot tree as the API shows it.
pub fn tree(dir: &Path, r: &VmRecord) -> SnapshotTree {
    SnapshotTree {
        snapshots: r
            .snapshots
            .iter()
            .map(|s| Snapshot {
                id: s.id.clone(),
                name: s.name.clone(),
                description: s.description.clone(),
                created_ms: s.created_ms,
                parent: s.parent.clone(),
                with_state: s.state.is_some(),
                size_bytes: std::iter::once(&s.layer)
                    .chain(&s.extra_layers)
                    .chain(&s.state)
                    .map(|f| allocated(&dir.join(f)))
                    .sum(),
            })
            .collect(),
        current: r.current_snapshot.clone(),
    }
}

/// The file of disk slot `slot`'s layer that `child` names.
fn child_layer(r: &VmRecord, child: &Child, slot: usize) -> Option<String> {
    match child {
        Child::Now => disk_slots(r).into_iter().nth(slot).map(|d| d.top),
        Child::Snapshot(c) => snapshot(r, c).and_then(|x| slot_layer(x, slot)).map(str::to_owned),
    }
}

/// Finishes what a daemon that died in the middle of a snapshot deletion left: a snapshot with a layer file
/// gone (of any of its disks) while its single child's layers are there was merged already (every disk's
/// merge ends before the first rename); the renames of its other disks' merged layers and the definition
/// were not yet done. Returns whether the record changed.
pub fn repair(dir: &Path, r: &mut VmRecord) -> bool {
    let mut changed = false;
    loop {
        let gone = r
            .snapshots
            .iter()
            .find(|s| std::iter::once(&s.layer).chain(&s.extra_layers).any(|l| !dir.join(l).exists()))
            .cloned();
        let Some(s) = gone else { return changed };
        let kids = children(r, &s.id);
        if kids.len() != 1 {
            return changed; // not a merge we can finish: reported when the VM starts
        }
        log::warn!("VM {}: finishing the deletion of snapshot {:?} (its layers were merged already)", r.name, s.name);
        for slot in 0..=s.extra_layers.len() {
            let (Some(parent), Some(child)) = (slot_layer(&s, slot), child_layer(r, &kids[0], slot)) else { continue };
            if dir.join(parent).exists()
                && let Err(e) = std::fs::rename(dir.join(parent), dir.join(&child))
            {
                log::error!("VM {}: cannot rename the merged layer {parent} to {child}: {e}", r.name);
                return changed;
            }
        }
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        drop_merged(r, &s, &kids[0]);
        if let Some(state) = &s.state {
            let _ = std::fs::remove_file(dir.join(state));
        }
        changed = true;
    }
}

/// The record after snapshot `s` was merged into by its single child `child`.
fn drop_merged(r: &mut VmRecord, s: &SnapshotRecord, child: &Child) {
    match child {
        Child::Now => r.current_snapshot = s.parent.clone(),
        Child::Snapshot(c) => {
            if let Some(c) = r.snapshots.iter_mut().find(|x| x.id == *c) {
                c.parent = s.parent.clone();
            }
        }
    }
    r.snapshots.retain(|x| x.id != s.id);
}

/// The full backing chain of disk slot `slot` below the VM's own layers `own` (file names in its folder,
/// nearest first), as absolute paths: the own layers, then what the bottom layer stands on.
pub fn chain(
    host: &Host,
    all: &BTreeMap<String, VmRecord>,
    r: &VmRecord,
    slot: usize,
    own: &[String],
) -> Result<Vec<PathBuf>, HostError> {
    let mut out: Vec<PathBuf> = own.iter().map(|f| host.store.vm_dir(&r.id).join(f)).collect();
    let mut below = disk_slots(r).into_iter().nth(slot).and_then(|d| d.below);
    let mut depth = 0;
    while let Some(b) = below {
        depth += 1;
        if depth > MAX_DEPTH {
            return Err(HostError::Internal(format!("VM {}: its disk's chain of linked clones is too deep", r.name)));
        }
        match b {
            Below::Image { name } => {
                out.push(host.store.image_path(&name).ok_or_else(|| {
                    HostError::Internal(format!("VM {}: its base image name {name:?} is invalid", r.name))
                })?);
                below = None;
            }
            Below::Vm { id } => {
                let base = all.get(&id).ok_or_else(|| {
                    HostError::Conflict(format!("VM {}: the VM its disk is a linked clone of ({id}) is gone", r.name))
                })?;
                let d = disk_slots(base).into_iter().nth(slot).ok_or_else(|| {
                    HostError::Internal(format!("VM {}: the VM it is a linked clone of lacks disk {slot}", r.name))
                })?;
                let layers = own_layers(base, slot);
                out.extend(layers.iter().map(|f| host.store.vm_dir(&id).join(f)));
                below = d.below.clone();
            }
        }
    }
    Ok(out)
}

/// The `--disk` arguments that serve the VM's present disks, one per slot (each one's whole chain given
/// explicitly).
pub fn disk_args(host: &Host, all: &BTreeMap<String, VmRecord>, r: &VmRecord) -> Result<Vec<String>, HostError> {
    let slots = disk_slots(r);
    let mut out = Vec::new();
    for (slot, d) in slots.iter().enumerate() {
        let limits = r.disk_limits.get(slot).map(|l| l.engine_options()).unwrap_or_default();
        out.push(disk_arg(host, all, r, slot, d)? + &limits);
    }
    Ok(out)
}

fn disk_arg(
    host: &Host,
    all: &BTreeMap<String, VmRecord>,
    r: &VmRecord,
    slot: usize,
    d: &DiskRecord,
) -> Result<String, HostError> {
    let paths = chain(host, all, r, slot, &own_layers(r, slot))?;
    let mut arg = String::new();
    for (i, p) in paths.iter().enumerate() {
        let s = p.to_str().filter(|s| !s.contains(',')).ok_or_else(|| {
            HostError::Conflict(format!(
                "the disk file {} has a ',' in its path: the engine cannot take it",
                p.display()
            ))
        })?;
        if i == 0 {
            arg = format!("{s},format={}", top_format(d, r));
        } else {
            arg.push_str(&format!(",backing={s}"));
        }
    }
    Ok(arg)
}

/// Grows disk slot `slot` of VM `r` to `size` bytes: its present layer ("Now": the only one a guest writes;
/// layers below keep their size, a qcow2 overlay may be larger than its backing). Never shrinks. The VM
/// must be stopped.
pub fn grow(
    host: &Host,
    all: &BTreeMap<String, VmRecord>,
    r: &VmRecord,
    slot: usize,
    size: u64,
) -> Result<(), HostError> {
    if disk_slots(r).len() <= slot {
        return Err(HostError::BadRequest("the VM has no such disk".into()));
    }
    let paths = chain(host, all, r, slot, &own_layers(r, slot))?;
    let (top, backing) = paths.split_first().ok_or_else(|| HostError::Internal("the disk has no layer".into()))?;
    vmm_core::disk::grow_image(top, backing, size).map_err(|e| match e {
        vmm_core::disk::DiskError::Locked { .. } => HostError::Conflict(format!("cannot grow the disk: {e}")),
        other => HostError::Internal(format!("cannot grow the disk: {other}")),
    })
}

fn blocking_err(e: tokio::task::JoinError) -> HostError {
    HostError::Internal(e.to_string())
}

fn disk_err(e: vmm_core::disk::DiskError) -> HostError {
    HostError::Internal(e.to_string())
}

/// The name of VMs whose disk is a linked clone of `id`'s.
pub fn clones_of(all: &BTreeMap<String, VmRecord>, id: &str) -> Vec<String> {
    all.values()
        .filter(|r| matches!(r.disk.as_ref().and_then(|d| d.below.as_ref()), Some(Below::Vm { id: b }) if b == id))
        .map(|r| r.name.clone())
        .collect()
}

/// The names of VMs whose disk stands on library image `name`.
pub fn users_of_image(all: &BTreeMap<String, VmRecord>, name: &str) -> Vec<String> {
    all.values()
        .filter(
            |r| matches!(r.disk.as_ref().and_then(|d| d.below.as_ref()), Some(Below::Image { name: n }) if n == name),
        )
        .map(|r| r.name.clone())
        .collect()
}

/// Refuses a change of a VM's disk while linked clones stand on it.
fn no_clones(all: &BTreeMap<String, VmRecord>, r: &VmRecord) -> Result<(), HostError> {
    let clones = clones_of(all, &r.id);
    if clones.is_empty() {
        Ok(())
    } else {
        Err(HostError::Conflict(format!(
            "the disk of VM {} is the base of linked clones (used by: {}): it cannot change while they exist",
            r.name,
            clones.join(", ")
        )))
    }
}

/// Every disk of the VM (see [`disk_slots`]), refused when it has none or one is raw.
fn needs_qcow2(r: &VmRecord) -> Result<Vec<DiskRecord>, HostError> {
    let slots = disk_slots(r);
    if slots.is_empty() {
        return Err(HostError::Conflict(format!("VM {} has no disk", r.name)));
    }
    if let Some(slot) = slots.iter().position(|d| d.format == DiskFormat::Raw) {
        let which = if slot == 0 { "disk".to_owned() } else { format!("disk {slot} (after the boot disk)") };
        return Err(HostError::Conflict(format!(
            "VM {}'s {which} is raw: snapshots need qcow2 disks (a full clone of the VM makes them qcow2)",
            r.name
        )));
    }
    if r.snapshots.iter().any(|s| s.extra_layers.len() != slots.len() - 1) {
        return Err(HostError::Internal(format!("VM {}: a snapshot does not hold a layer of every disk", r.name)));
    }
    Ok(slots)
}

/// What a `save-state` request to the engine answers.
#[derive(Debug, serde::Deserialize)]
struct SaveStateReply {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

/// Asks a running VM's engine to save its whole state to `path` and then end its process as suspended
/// (`{"cmd":"save-state","path":…,"then":"stop"}`).
pub fn save_state(control: &Path, path: &Path) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(control)
        .map_err(|e| format!("cannot reach the VM's control socket: {e}"))?;
    // Saving a large guest's RAM takes a while.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(600))).map_err(|e| e.to_string())?;
    let request = serde_json::json!({"cmd": "save-state", "path": path, "then": "stop"});
    let mut line = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| format!("the VM's control socket: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .take(64 * 1024)
        .read_line(&mut reply)
        .map_err(|e| format!("no answer to save-state from the VM: {e}"))?;
    let reply: SaveStateReply = serde_json::from_str(reply.trim())
        .map_err(|e| format!("the VM answered save-state with {:?}: {e}", reply.trim()))?;
    if reply.ok { Ok(()) } else { Err(format!("the VM could not save its state: {}", reply.error.unwrap_or_default())) }
}

use std::io::Read as _;

impl Host {
    /// Every VM's definition.
    pub fn records(&self) -> BTreeMap<String, VmRecord> {
        self.all_records()
    }

    /// `GET /vms/{id}/snapshots`.
    pub fn snapshot_tree(&self, id: &str) -> Result<SnapshotTree, HostError> {
        let r = self.record(id)?;
        Ok(tree(&self.store.vm_dir(id), &r))
    }

    /// Saves a running VM's state into `file` (in its folder) and waits for its process to end.
    async fn save_and_stop(&self, id: &str, file: &str) -> Result<(), HostError> {
        let control = self.run_files(id).control();
        let path = self.store.vm_dir(id).join(file);
        let before = self.get(id)?.state;
        self.set_state(id, VmState::Stopping, true);
        let saved = tokio::task::spawn_blocking(move || save_state(&control, &path)).await.map_err(blocking_err)?;
        if let Err(why) = saved {
            // The VM runs on: the engine refused before stopping.
            self.set_state(id, before, false);
            self.clear_stop_request(id);
            let _ = std::fs::remove_file(self.store.vm_dir(id).join(file));
            return Err(HostError::Conflict(why));
        }
        if !self.wait_stopped(id, std::time::Duration::from_secs(120)).await {
            return Err(HostError::Internal("the VM saved its state but its process did not end within 120 s".into()));
        }
        Ok(())
    }

    /// `POST /vms/{id}/suspend`: the running VM's state goes to `suspend.state`; its process ends.
    pub async fn suspend(self: &Arc<Self>, id: &str) -> Result<(), HostError> {
        let r = self.record(id)?;
        if self.pid(id).is_none() {
            return Err(HostError::Conflict("the VM is not running".into()));
        }
        let _busy = self.begin(id, "suspending")?;
        self.save_and_stop(id, SUSPEND_STATE).await?;
        self.update(id, |r, _| {
            r.suspended = Some(SUSPEND_STATE.into());
            Ok(())
        })
        .map(drop)
        .inspect_err(|e| log::warn!("VM {}: suspended, but its definition could not be saved: {e}", r.name))
    }

    /// `--suspend-on-shutdown`: every running VM is suspended to disk (all at once), marked to be resumed
    /// when the daemon starts again. A VM that cannot be saved is said in the log and left running.
    pub async fn suspend_all_for_shutdown(self: &Arc<Self>) {
        let running: Vec<String> = self.running().into_iter().map(|(id, _)| id).collect();
        let saves = running.iter().map(|id| async move {
            match self.suspend(id).await {
                Ok(()) => {
                    let marked = self.update(id, |r, _| {
                        r.resume_on_start = true;
                        Ok(())
                    });
                    match marked {
                        Ok(_) => {
                            log::info!("VM {id}: suspended as the daemon stops; it resumes when the daemon starts")
                        }
                        Err(e) => log::warn!("VM {id}: suspended as the daemon stops, but not marked to resume: {e}"),
                    }
                }
                Err(e) => log::error!("VM {id}: could not be suspended as the daemon stops ({e}); it keeps running"),
            }
        });
        futures_util::future::join_all(saves).await;
    }

    /// Resumes the VMs that `suspend_all_for_shutdown` suspended (when the daemon starts).
    pub async fn resume_after_shutdown(self: &Arc<Self>) {
        let marked: Vec<String> =
            self.all_records().into_iter().filter(|(_, r)| r.resume_on_start).map(|(id, _)| id).collect();
        for id in marked {
            let _ = self.update(&id, |r, _| {
                r.resume_on_start = false;
                Ok(())
            });
            match self.start(&id).await {
                Ok(_) => log::info!("VM {id}: resumed (suspended when the daemon last stopped)"),
                Err(e) => log::error!("VM {id}: suspended when the daemon last stopped, cannot resume: {e}"),
            }
        }
    }

    /// Starts the VMs marked to start with the host (`autostart`) that are not running yet (when the daemon
    /// starts, after the VMs suspended by its last stop are resumed).
    pub async fn autostart(self: &Arc<Self>) {
        let marked: Vec<(String, String)> = self
            .all_records()
            .into_iter()
            .filter(|(_, r)| r.autostart && !r.template)
            .map(|(id, r)| (id, r.name))
            .collect();
        for (id, name) in marked {
            if self.pid(&id).is_some() {
                continue;
            }
            match self.start(&id).await {
                Ok(_) => log::info!("VM {name}: started with the host (autostart)"),
                Err(e) => log::error!("VM {name}: marked to start with the host, cannot start: {e}"),
            }
        }
    }

    /// Checks a snapshot may be taken and returns the job that takes it.
    pub fn take_snapshot(
        self: &Arc<Self>,
        id: &str,
        name: String,
        description: String,
        with_state: Option<bool>,
    ) -> Result<Job, HostError> {
        check_snapshot_name(&name).map_err(HostError::BadRequest)?;
        if description.len() > 4096 {
            return Err(HostError::BadRequest("the description is longer than 4096 bytes".into()));
        }
        let all = self.records();
        let r = all.get(id).cloned().ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        let slots = needs_qcow2(&r)?;
        no_clones(&all, &r)?;
        if r.snapshots.iter().any(|s| s.name == name) {
            return Err(HostError::Conflict(format!("VM {} has a snapshot named {name:?} already", r.name)));
        }
        // A snapshot puts a new layer on every disk: the engine opens at most MAX_DEPTH images below a disk's
        // top one (a VM that could not start on its disks again would be lost to its snapshot).
        for slot in 0..slots.len() {
            let below_new_top = chain(self, &all, &r, slot, &own_layers(&r, slot))?.len();
            if below_new_top > MAX_DEPTH {
                return Err(HostError::Conflict(format!(
                    "VM {}'s disk has {below_new_top} layers (its snapshots and what they stand on); a VM runs on at \
                     most {} (each snapshot adds one): delete a snapshot first, which merges its layer",
                    r.name,
                    MAX_DEPTH + 1
                )));
            }
        }
        let running = self.pid(id).is_some();
        if running && with_state == Some(false) && slots.len() > 1 {
            // The engine moves one disk at a time: a failure half way would leave disks from different moments.
            return Err(HostError::Conflict(format!(
                "VM {} has {} disks: a running VM with several disks takes snapshots with its machine state                  (with_state: true) or while stopped",
                r.name,
                slots.len()
            )));
        }
        let busy = self.begin(id, "taking a snapshot")?;
        let host = self.clone();
        let id = id.to_owned();
        Ok(Box::pin(async move {
            let _busy = busy;
            let sid = random_hex(4);
            if running && with_state == Some(false) {
                // Disks only, live: the engine moves the running disk onto a new overlay.
                host.freeze_top(&id, &sid, name, description, None, true).await?;
                return Ok(Some(sid));
            }
            let state = running.then(|| format!("state-{sid}.bin"));
            if let Some(file) = &state {
                host.save_and_stop(&id, file).await?;
            }
            let made = host.freeze_top(&id, &sid, name, description, state.clone(), false).await;
            if let Err(e) = &made {
                if let Some(file) = &state {
                    // The machine state is no use without its snapshot; the VM resumes from it on its old disk.
                    log::warn!("VM {id}: the snapshot failed ({e}); resuming the VM on its present disk");
                    let restore = host.store.vm_dir(&id).join(file);
                    let resumed = host.start_restoring(&id, Some(restore.clone())).await;
                    let _ = std::fs::remove_file(&restore);
                    resumed?;
                }
                return made.map(|_| None);
            }
            if let Some(file) = &state {
                host.start_restoring(&id, Some(host.store.vm_dir(&id).join(file))).await?;
            }
            Ok(Some(sid))
        }))
    }

    /// The present layer of every disk of the VM becomes snapshot `sid`'s; a new empty overlay on each
    /// becomes Now. A stopped VM's overlays are made here (all of them before the definition changes; any
    /// failure removes the ones made); with `live` (a VM with one disk), the running VM's engine makes the
    /// overlay and moves the disk onto it (`switch-drive`, the vCPUs paused meanwhile).
    async fn freeze_top(
        &self,
        id: &str,
        sid: &str,
        name: String,
        description: String,
        state: Option<String>,
        live: bool,
    ) -> Result<(), HostError> {
        let all = self.records();
        let r = all.get(id).cloned().ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        let slots = needs_qcow2(&r)?;
        if live && slots.len() != 1 {
            return Err(HostError::Conflict("a live disk-only snapshot needs a VM with one disk".into()));
        }
        let dir = self.store.vm_dir(id);
        let mut news: Vec<String> = Vec::new();
        let made: Result<(), HostError> = async {
            for (slot, d) in slots.iter().enumerate() {
                let paths = chain(self, &all, &r, slot, &own_layers(&r, slot))?;
                let new = new_layer_name(&dir);
                news.push(new.clone());
                let (new_path, top, format) = (dir.join(&new), d.top.clone(), top_format(d, &r));
                if live {
                    let request = vmm_core::control::Request::SwitchDrive {
                        drive: "disk0".into(),
                        path: new_path,
                        backing_name: Some(top.into()),
                        backing: paths,
                    };
                    self.control(id, request).await.map_err(|e| match e {
                        HostError::BadRequest(why) => HostError::Conflict(format!("the running VM's disk: {why}")),
                        other => other,
                    })?;
                } else {
                    tokio::task::spawn_blocking(move || {
                        let size = vmm_core::disk::image_size(&paths[0], &paths[1..])?;
                        vmm_core::disk::create_qcow2(&new_path, size, Some((Path::new(&top), format)))
                    })
                    .await
                    .map_err(blocking_err)?
                    .map_err(disk_err)?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = made {
            if !live {
                for f in &news {
                    let _ = std::fs::remove_file(dir.join(f));
                }
            }
            return Err(e);
        }
        let frozen: Vec<String> = slots.iter().map(|d| d.top.clone()).collect();
        let saved = self.update(id, |r, _| {
            for (slot, new) in news.iter().enumerate() {
                set_top(r, slot, &slots[0], new.clone());
            }
            r.snapshots.push(SnapshotRecord {
                id: sid.to_owned(),
                name,
                description,
                created_ms: now_ms(),
                parent: r.current_snapshot.clone(),
                layer: frozen[0].clone(),
                state,
                extra_layers: frozen[1..].to_vec(),
            });
            r.current_snapshot = Some(sid.to_owned());
            Ok(())
        });
        if let Err(e) = saved {
            if live {
                // The running VM writes into the new overlay already: it must stay.
                let new = &news[0];
                log::error!("VM {id}: its disk moved onto {new}, but its definition could not be saved: {e}");
                return Err(HostError::Internal(format!(
                    "the running VM's disk moved onto a new layer ({new}) but its definition could not be saved \
                     ({e}); stop the VM and free space before starting it again"
                )));
            }
            for f in &news {
                let _ = std::fs::remove_file(dir.join(f));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Checks a revert may be made and returns the job that makes it.
    pub fn revert_snapshot(self: &Arc<Self>, id: &str, sid: &str, confirm: bool) -> Result<Job, HostError> {
        let all = self.records();
        let r = all.get(id).cloned().ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        let s = snapshot(&r, sid).cloned().ok_or_else(|| HostError::NotFound(format!("{id}/snapshots/{sid}")))?;
        needs_qcow2(&r)?;
        no_clones(&all, &r)?;
        if r.template && s.state.is_some() {
            return Err(HostError::Conflict(format!(
                "snapshot {:?} holds a running machine, and a template never runs: make the VM a VM again first",
                s.name
            )));
        }
        let running = self.pid(id).is_some();
        if (running || r.suspended.is_some()) && !confirm {
            let what = if running { "running" } else { "suspended" };
            return Err(HostError::Conflict(format!(
                "the VM is {what}: reverting to {:?} loses its present state; confirm the revert (confirm: true)",
                s.name
            )));
        }
        let busy = self.begin(id, "reverting to a snapshot")?;
        let host = self.clone();
        let (id, sid) = (id.to_owned(), sid.to_owned());
        Ok(Box::pin(async move {
            let _busy = busy;
            if host.pid(&id).is_some() {
                host.power_off(&id).await?;
            }
            let all = host.records();
            let r = all.get(&id).cloned().ok_or_else(|| HostError::NotFound(id.clone()))?;
            let slots = needs_qcow2(&r)?;
            let dir = host.store.vm_dir(&id);
            // A new overlay on the snapshot's layer of every disk, all made before the definition changes.
            let mut news: Vec<(String, u64)> = Vec::new();
            let made: Result<(), HostError> = async {
                for (slot, d) in slots.iter().enumerate() {
                    let paths = chain(&host, &all, &r, slot, &layers_from(&r, Some(&sid), slot))?;
                    let new = new_layer_name(&dir);
                    news.push((new.clone(), 0));
                    let new_path = dir.join(&new);
                    let layer = slot_layer(&s, slot)
                        .ok_or_else(|| HostError::Internal(format!("snapshot {:?} lacks disk {slot}", s.name)))?
                        .to_owned();
                    let format = layer_format(d, &s);
                    let size = tokio::task::spawn_blocking(move || {
                        let size = vmm_core::disk::image_size(&paths[0], &paths[1..])?;
                        vmm_core::disk::create_qcow2(&new_path, size, Some((Path::new(&layer), format))).map(|()| size)
                    })
                    .await
                    .map_err(blocking_err)?
                    .map_err(disk_err)?;
                    if let Some(last) = news.last_mut() {
                        last.1 = size;
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = made {
                for (f, _) in &news {
                    let _ = std::fs::remove_file(dir.join(f));
                }
                return Err(e);
            }
            let old_suspend = r.suspended.clone();
            let saved = host.update(&id, |r, _| {
                for (slot, (new, size)) in news.iter().enumerate() {
                    set_top(r, slot, &slots[0], new.clone());
                    // The disk is as big as it was when the snapshot was taken (a later grow is undone too).
                    set_slot_size(r, slot, *size);
                }
                crate::host::add_pending(r, porthole_api::UpdateVm::default());
                r.current_snapshot = Some(sid.clone());
                r.suspended = None;
                Ok(())
            });
            if let Err(e) = saved {
                for (f, _) in &news {
                    let _ = std::fs::remove_file(dir.join(f));
                }
                return Err(e);
            }
            for d in &slots {
                let _ = std::fs::remove_file(dir.join(&d.top));
            }
            if let Some(f) = old_suspend {
                let _ = std::fs::remove_file(dir.join(f));
            }
            if let Some(state) = &s.state {
                host.start_restoring(&id, Some(dir.join(state))).await?;
            }
            Ok(Some(sid))
        }))
    }

    /// Checks a snapshot may be deleted and returns the job that deletes it.
    pub fn delete_snapshot(self: &Arc<Self>, id: &str, sid: &str, progress: Progress) -> Result<Job, HostError> {
        let all = self.records();
        let r = all.get(id).cloned().ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        let s = snapshot(&r, sid).cloned().ok_or_else(|| HostError::NotFound(format!("{id}/snapshots/{sid}")))?;
        no_clones(&all, &r)?;
        let kids = children(&r, sid);
        if kids.len() > 1 {
            let names: Vec<String> = kids
                .iter()
                .map(|c| match c {
                    Child::Now => "Now (the present state)".to_owned(),
                    Child::Snapshot(c) => format!("{:?}", snapshot(&r, c).map(|x| x.name.as_str()).unwrap_or("?")),
                })
                .collect();
            return Err(HostError::Conflict(format!(
                "snapshot {:?} cannot be deleted: {} layers stand on it ({}); its layer can be merged into one \
                 child only: delete the other branches first",
                s.name,
                kids.len(),
                names.join(", ")
            )));
        }
        if (self.pid(id).is_some() || r.suspended.is_some()) && is_ancestor_of_now(&r, sid) {
            return Err(HostError::Conflict(format!(
                "the VM's present disk reads snapshot {:?}'s layer: stop the VM (or delete the snapshot later)",
                s.name
            )));
        }
        let busy = self.begin(id, "deleting a snapshot")?;
        let host = self.clone();
        let (id, sid) = (id.to_owned(), sid.to_owned());
        Ok(Box::pin(async move {
            let _busy = busy;
            let all = host.records();
            let r = all.get(&id).cloned().ok_or_else(|| HostError::NotFound(id.clone()))?;
            let dir = host.store.vm_dir(&id);
            if let Some(child) = kids.first() {
                // Every disk's child layer is merged into the snapshot's layer first; only then are the merged
                // files renamed to the children's names (see `repair` for a daemon that dies meanwhile).
                let mut merges = Vec::new();
                for slot in 0..disk_slots(&r).len() {
                    let lacks = || HostError::Internal(format!("snapshot {:?}: no layer of disk {slot}", s.name));
                    let child_file = child_layer(&r, child, slot).ok_or_else(lacks)?;
                    let parent_file = slot_layer(&s, slot).ok_or_else(lacks)?;
                    let below = chain(&host, &all, &r, slot, &layers_from(&r, s.parent.as_deref(), slot))?;
                    merges.push((dir.join(child_file), dir.join(parent_file), below));
                }
                let dir2 = dir.clone();
                tokio::task::spawn_blocking(move || -> Result<(), HostError> {
                    for (top, parent, below) in &merges {
                        vmm_core::disk::commit_image(top, parent, below, &mut |d, t| progress(d, t)).map_err(|e| {
                            HostError::Internal(format!(
                                "{e} (the merge can be run again: delete the snapshot once more; the other \
                                 snapshots and the present disks are unchanged)"
                            ))
                        })?;
                    }
                    for (top, parent, _) in &merges {
                        std::fs::rename(parent, top)
                            .map_err(|e| HostError::Internal(format!("cannot rename the merged layer: {e}")))?;
                    }
                    std::fs::File::open(&dir2)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| HostError::Internal(format!("cannot sync the VM's folder: {e}")))
                })
                .await
                .map_err(blocking_err)??;
                let child = child.clone();
                host.update(&id, |r, _| {
                    drop_merged(r, &s, &child);
                    Ok(())
                })?;
            } else {
                host.update(&id, |r, _| {
                    r.snapshots.retain(|x| x.id != s.id);
                    Ok(())
                })?;
                for layer in std::iter::once(&s.layer).chain(&s.extra_layers) {
                    let _ = std::fs::remove_file(dir.join(layer));
                }
            }
            if let Some(state) = &s.state {
                let _ = std::fs::remove_file(dir.join(state));
            }
            Ok(Some(sid))
        }))
    }

    /// Checks a clone may be made and returns the job that makes it (its result: the new VM's id).
    pub fn clone_vm(
        self: &Arc<Self>,
        id: &str,
        name: String,
        linked: bool,
        progress: Progress,
    ) -> Result<Job, HostError> {
        let all = self.records();
        let src = all.get(id).cloned().ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        if self.pid(id).is_some() {
            return Err(HostError::Conflict("the VM is running: stop it to clone it".into()));
        }
        if all.values().any(|r| r.name == name) {
            return Err(HostError::Conflict(format!("a VM named {name:?} exists already")));
        }
        let slots = disk_slots(&src);
        let busy = self.begin(id, "cloning")?;
        let host = self.clone();
        let src_id = id.to_owned();
        Ok(Box::pin(async move {
            let _busy = busy;
            let new_id = random_hex(6);
            let dir = host.store.vm_dir(&new_id);
            std::fs::create_dir_all(&dir)
                .map_err(|e| HostError::Internal(format!("cannot create {}: {e}", dir.display())))?;
            let made = async {
                // Every disk: a sparse flattened copy, or an overlay on the source's present layer.
                let mut made: Vec<DiskRecord> = Vec::new();
                for (slot, d) in slots.iter().enumerate() {
                    let paths = chain(&host, &all, &src, slot, &own_layers(&src, slot))?;
                    let file = format!("disk{slot}.qcow2");
                    let target = dir.join(&file);
                    let below = if linked {
                        let relative = format!("../{src_id}/{}", d.top);
                        let format = top_format(d, &src);
                        tokio::task::spawn_blocking(move || {
                            let size = vmm_core::disk::image_size(&paths[0], &paths[1..])?;
                            vmm_core::disk::create_qcow2(&target, size, Some((Path::new(&relative), format)))
                        })
                        .await
                        .map_err(blocking_err)?
                        .map_err(disk_err)?;
                        Some(Below::Vm { id: src_id.clone() })
                    } else {
                        let progress = progress.clone();
                        tokio::task::spawn_blocking(move || {
                            vmm_core::disk::copy_image(
                                &paths[0],
                                &paths[1..],
                                &target,
                                ImageFormat::Qcow2,
                                &mut |a, b| progress(a, b),
                            )
                        })
                        .await
                        .map_err(blocking_err)?
                        .map_err(disk_err)?;
                        None
                    };
                    made.push(DiskRecord { format: DiskFormat::Qcow2, top: file, below });
                }
                let disk = made.first().cloned();
                let extra_disks: Vec<ExtraDisk> = made
                    .iter()
                    .enumerate()
                    .skip(1)
                    .map(|(slot, d)| ExtraDisk {
                        format: d.format,
                        top: d.top.clone(),
                        below: d.below.clone(),
                        size_bytes: slot_size(&src, slot),
                    })
                    .collect();
                let others = host.others(&new_id);
                let mut nics = Vec::new();
                let mut taken = others.macs.clone();
                for n in src.nics() {
                    let mac = crate::net::new_mac(&taken);
                    taken.push((name.clone(), mac.clone()));
                    let mut also: Vec<porthole_api::PortForward> = Vec::new();
                    let mut forwards = Vec::new();
                    for f in n.forwards.iter().filter(|f| f.automatic) {
                        if let Some(port) = crate::net::pick_port(&others, &also, f, &crate::net::probe_port) {
                            let f = porthole_api::PortForward { host_port: port, ..f.clone() };
                            also.push(f.clone());
                            forwards.push(f);
                        }
                    }
                    nics.push(porthole_api::NicDefinition { mac, forwards, ..n.clone() });
                }
                let cloud_init = match &src.cloud_init {
                    Some(c) => {
                        let c = crate::store::CloudInitRecord {
                            instance_id: crate::cloud_init::new_instance_id(),
                            ..c.clone()
                        };
                        crate::cloud_init::write_seed(&dir.join(SEED), &c)
                            .map_err(|e| HostError::Internal(format!("cannot write the cloud-init seed: {e}")))?;
                        Some(c)
                    }
                    None => None,
                };
                let record = VmRecord {
                    id: new_id.clone(),
                    name: name.clone(),
                    nics: Some(nics),
                    created_ms: now_ms(),
                    disk,
                    extra_disks,
                    snapshots: Vec::new(),
                    current_snapshot: None,
                    template: false,
                    linked_to: linked.then(|| src_id.clone()),
                    cloud_init,
                    suspended: None,
                    resume_on_start: false,
                    autostart: false,
                    ..src.clone()
                };
                host.insert(record)
            }
            .await;
            match made {
                Ok(_) => Ok(Some(new_id)),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    Err(e)
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VmRecord {
        VmRecord {
            id: "v1".into(),
            name: "web".into(),
            vcpus: 1,
            memory_mib: 64,
            disk_bytes: 1 << 20,
            created_ms: 1,
            nics: Some(Vec::new()),
            disk: Some(DiskRecord { format: DiskFormat::Qcow2, top: QCOW2_DISK.into(), below: None }),
            ..VmRecord::default()
        }
    }

    fn snap(id: &str, parent: Option<&str>, layer: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            name: id.into(),
            description: String::new(),
            created_ms: 1,
            parent: parent.map(Into::into),
            layer: layer.into(),
            state: None,
            extra_layers: Vec::new(),
        }
    }

    #[test]
    fn snapshot_names_are_checked() {
        for good in ["before upgrade", "a", "v1.2_rc-3", &"x".repeat(63)] {
            assert!(check_snapshot_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "../x", ".hidden", " lead", &"x".repeat(64), "a\nb", "tab\t", "q\"uote"] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_tree_gives_chains_children_and_ancestry() {
        // a (disk0) <- b (l1) <- c (l2); a <- d (l3) <- Now (top)
        let mut r = record();
        r.snapshots = vec![
            snap("a", None, "disk0.qcow2"),
            snap("b", Some("a"), "l1"),
            snap("c", Some("b"), "l2"),
            snap("d", Some("a"), "l3"),
        ];
        r.current_snapshot = Some("d".into());
        r.disk.as_mut().unwrap().top = "top".into();
        assert_eq!(layers_from(&r, Some("c"), 0), ["l2", "l1", "disk0.qcow2"]);
        assert_eq!(layers_from(&r, r.current_snapshot.as_deref(), 0), ["l3", "disk0.qcow2"]);
        assert_eq!(children(&r, "a"), [Child::Snapshot("b".into()), Child::Snapshot("d".into())]);
        assert_eq!(children(&r, "d"), [Child::Now]);
        assert!(children(&r, "c").is_empty());
        assert!(is_ancestor_of_now(&r, "a") && is_ancestor_of_now(&r, "d"));
        assert!(!is_ancestor_of_now(&r, "b") && !is_ancestor_of_now(&r, "c"));
        let d = r.disk.clone().unwrap();
        assert_eq!(top_format(&d, &r), ImageFormat::Qcow2);
        // A record that loops never hangs.
        r.snapshots[0].parent = Some("c".into());
        assert!(layers_from(&r, Some("c"), 0).len() <= 4);
        assert!(!is_ancestor_of_now(&r, "zzz"));
    }

    #[test]
    fn an_interrupted_merge_is_finished_when_loaded() {
        let dir = std::env::temp_dir().join(format!("portholed-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // b was merged into a's layer and renamed over b's file; the definition still lists a.
        let mut r = record();
        r.snapshots = vec![snap("a", None, "disk0.qcow2"), snap("b", Some("a"), "l1")];
        r.current_snapshot = Some("b".into());
        r.disk.as_mut().unwrap().top = "top".into();
        for f in ["l1", "top"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        assert!(repair(&dir, &mut r));
        assert_eq!(r.snapshots, [snap("b", None, "l1")]);
        assert_eq!(r.current_snapshot.as_deref(), Some("b"));
        assert!(!repair(&dir, &mut r), "nothing more to do");
        // Now merged into the only snapshot.
        std::fs::remove_file(dir.join("l1")).unwrap();
        assert!(repair(&dir, &mut r));
        assert!(r.snapshots.is_empty() && r.current_snapshot.is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_disk_has_its_own_chain_and_an_interrupted_merge_of_several_disks_is_finished() {
        let dir = std::env::temp_dir().join(format!("portholed-disks-multi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Two disks; a (disk0.qcow2, d1-0) <- b (l1, d1-1) <- Now (top, d1-top).
        let mut r = record();
        r.extra_disks =
            vec![ExtraDisk { format: DiskFormat::Qcow2, top: "d1-top".into(), below: None, size_bytes: 4096 }];
        r.snapshots = vec![snap("a", None, "disk0.qcow2"), snap("b", Some("a"), "l1")];
        r.snapshots[0].extra_layers = vec!["d1-0".into()];
        r.snapshots[1].extra_layers = vec!["d1-1".into()];
        r.current_snapshot = Some("b".into());
        r.disk.as_mut().unwrap().top = "top".into();
        assert_eq!(disk_slots(&r).len(), 2);
        assert_eq!(own_layers(&r, 0), ["top", "l1", "disk0.qcow2"]);
        assert_eq!(own_layers(&r, 1), ["d1-top", "d1-1", "d1-0"]);
        assert!(own_layers(&r, 2).is_empty(), "no third disk");
        assert_eq!(slot_size(&r, 1), 4096);
        assert!(needs_qcow2(&r).is_ok());
        r.extra_disks[0].format = DiskFormat::Raw;
        assert!(needs_qcow2(&r).unwrap_err().to_string().contains("disk 1"));
        r.extra_disks[0].format = DiskFormat::Qcow2;
        // Deleting b: both disks' merges ended; disk0's merged layer was renamed over "top", disk 1's not yet.
        for f in ["disk0.qcow2", "d1-0", "top", "d1-1", "d1-top"] {
            std::fs::write(dir.join(f), f.as_bytes()).unwrap();
        }
        assert!(repair(&dir, &mut r));
        assert_eq!(r.snapshots.len(), 1);
        assert_eq!(r.current_snapshot.as_deref(), Some("a"));
        assert!(!dir.join("d1-1").exists(), "disk 1's merged layer took its child's name");
        assert_eq!(std::fs::read(dir.join("d1-top")).unwrap(), b"d1-1");
        assert_eq!(own_layers(&r, 1), ["d1-top", "d1-0"]);
        assert!(!repair(&dir, &mut r), "nothing more to do");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A stand-in engine control socket: answers one request line with `reply`; returns the request.
    fn fake_engine(path: &Path, reply: &'static str) -> std::thread::JoinHandle<String> {
        use std::io::{BufRead, Write};
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&stream).read_line(&mut line).unwrap();
            (&stream).write_all(reply.as_bytes()).unwrap();
            line
        })
    }

    #[test]
    fn save_state_speaks_the_engines_wire_form() {
        let dir = std::env::temp_dir().join(format!("portholed-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("c.sock");
        let engine = fake_engine(&sock, "{\"ok\":true,\"bytes\":123}\n");
        save_state(&sock, Path::new("/x/vms/a/state-1.bin")).unwrap();
        let sent: serde_json::Value = serde_json::from_str(&engine.join().unwrap()).unwrap();
        assert_eq!(sent, serde_json::json!({"cmd": "save-state", "path": "/x/vms/a/state-1.bin", "then": "stop"}));
        std::fs::remove_file(&sock).unwrap();
        let engine = fake_engine(&sock, "{\"ok\":false,\"error\":\"a device cannot be saved\"}\n");
        let e = save_state(&sock, Path::new("/s")).unwrap_err();
        assert!(e.contains("could not save its state: a device cannot be saved"), "{e}");
        engine.join().unwrap();
        std::fs::remove_file(&sock).unwrap();
        let engine = fake_engine(&sock, "garbage\n");
        assert!(save_state(&sock, Path::new("/s")).unwrap_err().contains("garbage"));
        engine.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn old_definitions_have_the_raw_disk() {
        let mut r = record();
        r.disk = None;
        assert_eq!(legacy_disk(&r).unwrap(), DiskRecord { format: DiskFormat::Raw, top: RAW_DISK.into(), below: None });
        r.disk_bytes = 0;
        assert!(legacy_disk(&r).is_none());
        // A vm.json from before qcow2 loads, with every new field defaulted.
        let old = r#"{"id":"ab","name":"x","vcpus":1,"memory_mib":64,"disk_bytes":1048576,"created_ms":1,"nics":[]}"#;
        let r: VmRecord = serde_json::from_str(old).unwrap();
        assert!(r.disk.is_none() && r.snapshots.is_empty() && !r.template && r.suspended.is_none());
        assert!(r.extra_disks.is_empty() && r.extra_cdroms.is_empty());
        // A definition without extra drives is written as before (no new keys).
        let written = serde_json::to_string(&r).unwrap();
        assert!(!written.contains("extra_"), "{written}");
        assert_eq!(legacy_disk(&r).unwrap().top, RAW_DISK);
    }
}

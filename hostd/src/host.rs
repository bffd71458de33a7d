//! The host: every VM's definition (from the store) and, for running ones, its `porthole-vmm` process.
//!
//! Each running VM has a folder in the runtime dir (`<runtime>/vms/<id>/`) with its control socket, its
//! console sockets (full and view-only), its serial log, its pid file and the exit record the VMM writes
//! when it ends. VM processes run in their own process group and outlive the daemon; a restarted daemon
//! re-adopts them from their pid files. A process's end is noticed through a pidfd.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use porthole_api::{
    CloudInitInfo, CrashReport, DiskFormat, DriveInfo, DriveKind, ExitInfo, MemoryBalloon, NicBackend, NicSpec,
    NicStatus, PortForward, UpdateVm, Vm, VmState,
};
use vmm_core::control::{ControlClient, Request, Response};

use crate::net::{self, Others};
use crate::store::{Store, VmRecord};

/// Why a request on the host failed; `server.rs` maps these to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no VM {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

/// The run-time side of a VM.
#[derive(Debug, Default)]
struct Runtime {
    state: Option<VmState>,
    pid: Option<u32>,
    started: Option<Instant>,
    last_exit: Option<ExitInfo>,
    /// The host asked it to stop: its end is a normal stop, not a crash.
    stop_requested: bool,
    /// Whether we spawned it (and so can collect its exit status) or adopted it.
    own_child: bool,
    /// The guest crashed and its process keeps it (see `Host::observe`).
    crash: Option<CrashReport>,
    /// Where its CPU limits are enforced, or why they are not (set when it starts).
    cpu_limits: Option<Result<String, String>>,
}

struct Entry {
    record: VmRecord,
    rt: Runtime,
}

/// Files of a running VM.
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    pub fn vnc(&self) -> PathBuf {
        self.dir.join("vnc.sock")
    }
    pub fn vnc_view_only(&self) -> PathBuf {
        self.dir.join("vnc-view.sock")
    }
    /// The firmware's debug console (firmware boots).
    pub fn firmware_log(&self) -> PathBuf {
        self.dir.join("firmware.log")
    }

    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    fn pid(&self) -> PathBuf {
        self.dir.join("pid")
    }
    fn exit(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
}

/// What a running VM's engine reports (`Host::live_status`).
#[derive(Debug, Clone)]
pub struct LiveStatus {
    pub nics: Vec<NicStatus>,
    /// The pointer goes to the tablet (its guest driver is up).
    pub absolute_pointer: bool,
    /// The keys go to the virtio keyboard (its guest driver is up).
    pub virtio_keyboard: bool,
    /// With a virtio-gpu display: its guest driver is up (the monitor follows the console's size).
    pub display_follows: Option<bool>,
    /// With an agent port: the guest's agent is connected.
    pub agent_connected: Option<bool>,
    /// Its lock lights, as the guest set them.
    pub keyboard_leds: Option<porthole_api::KeyboardLeds>,
    /// The memory balloon, when the VM has one.
    pub balloon: Option<MemoryBalloon>,
}

pub struct Host {
    pub store: Store,
    vmm: PathBuf,
    runtime_dir: PathBuf,
    vms: Mutex<BTreeMap<String, Entry>>,
    /// Bumps whenever `vms` may change (see `vms_mut`).
    generation: AtomicU64,
    /// `GET /vms` for callers who see every VM, serialized once per change (and once a second, for uptimes).
    list_cache: Mutex<Option<(u64, u64, bytes::Bytes)>>,
    started: Instant,
    pub problems: Vec<String>,
    /// VMs with a disk operation under way (snapshot, clone, suspend), and what it is.
    busy: Mutex<BTreeMap<String, &'static str>>,
    /// The host's CPU controller (cgroups) for the VMs' CPU caps and weights.
    pub cpu: vmm_core::cpu_limits::CpuLimits,
    /// User cards whose passt died, by (VM, card): see [`Host::repair_networks`].
    net_repairs: Mutex<BTreeMap<(String, String), NetRepair>>,
}

/// The new passts given to one card whose passt died.
#[derive(Debug, Default)]
struct NetRepair {
    /// The engine the repairs were for (a new one starts the count again).
    pid: u32,
    /// One is being started now.
    running: bool,
    last: Option<Instant>,
    /// Repairs in a row (each waits twice as long as the one before, up to a minute).
    count: u32,
}

/// The longest wait between two new passts for a card whose passt keeps dying.
const NET_REPAIR_MAX_WAIT: Duration = Duration::from_secs(60);

/// How long an ended VM's forwarded ports may stay open (its passts ending) before it counts as stopped.
const FORWARDS_CLOSE_WAIT: Duration = Duration::from_secs(3);

/// A VM's disk operation under way: others wait for its end (see `Host::begin`).
pub struct Busy {
    host: Arc<Host>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        lock(&self.host.busy).remove(&self.id);
    }
}

use vmm_core::devices::bus::lock;

/// The last `n` lines of a serial log (reads at most its last 64 KiB).
/// The firmware's latest line about booting in its debug log (looked for in the log's tail).
pub fn firmware_boot_status(log: &Path) -> Option<String> {
    tail_lines(log, 1000)
        .into_iter()
        .rev()
        .map(|l| l.trim().to_owned())
        .find(|l| l.starts_with("Booting from") || l.starts_with("Boot failed") || l.starts_with("No bootable device"))
}

pub fn tail_lines(path: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_owned()).collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // probably cut in the middle
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether `pid` is a porthole-vmm serving the run folder `dir`.
fn is_our_vmm(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let exe_ok = args.first().is_some_and(|a| a.ends_with(b"porthole-vmm"));
    let control = format!("unix:{}", dir.join("control.sock").display());
    exe_ok && args.contains(&control.as_bytes())
}

impl Host {
    /// Loads the store and re-adopts VM processes that outlived a previous daemon.
    pub fn open(data_dir: &Path, runtime_dir: &Path, vmm: PathBuf) -> Result<Arc<Host>, HostError> {
        let store = Store::open(data_dir).map_err(|e| HostError::Internal(e.to_string()))?;
        let loaded = store.load();
        let mut vms: BTreeMap<String, Entry> =
            loaded.vms.into_values().map(|r| (r.id.clone(), Entry { record: r, rt: Runtime::default() })).collect();
        let mut problems = loaded.problems;
        // Definitions from before networking get what a new VM gets: one user (NAT) card with an SSH forward.
        let old: Vec<String> = vms.iter().filter(|(_, e)| e.record.nics.is_none()).map(|(i, _)| i.clone()).collect();
        for id in old {
            let nics = net::default_nics(&others_of(&vms, &id), &net::probe_port);
            let Some(e) = vms.get_mut(&id) else { continue };
            e.record.nics = Some(nics);
            match store.save(&e.record) {
                Ok(()) => log::info!(
                    "VM {}: given a network card (user, NAT; {}) — it had none defined",
                    e.record.name,
                    e.record.nics().iter().flat_map(|n| &n.forwards).map(net::describe).collect::<Vec<_>>().join(", ")
                ),
                Err(err) => problems.push(format!("VM {}: cannot save its new network card: {err}", e.record.name)),
            }
        }
        // Definitions from before qcow2: their disk is the raw disk0.img. A snapshot deletion that a daemon's
        // end cut short is finished.
        for e in vms.values_mut() {
            let mut changed = false;
            if let Some(d) = crate::disks::legacy_disk(&e.record) {
                e.record.disk = Some(d);
                changed = true;
            }
            changed |= crate::disks::repair(&store.vm_dir(&e.record.id), &mut e.record);
            if changed && let Err(err) = store.save(&e.record) {
                problems.push(format!("VM {}: cannot save its definition: {err}", e.record.name));
            }
        }
        let host = Arc::new(Host {
            store,
            vmm,
            runtime_dir: runtime_dir.to_owned(),
            vms: Mutex::new(vms),
            generation: AtomicU64::new(0),
            list_cache: Mutex::new(None),
            started: Instant::now(),
            problems,
            busy: Mutex::new(BTreeMap::new()),
            cpu: vmm_core::cpu_limits::CpuLimits::detect(),
            net_repairs: Mutex::new(BTreeMap::new()),
        });
        if let Err(why) = host.cpu.describe() {
            log::info!("VM CPU caps and weights are not enforced: {why}");
        }
        host.adopt();
        Ok(host)
    }

    pub fn run_files(&self, id: &str) -> RunFiles {
        RunFiles { dir: self.runtime_dir.join("vms").join(id) }
    }

    fn adopt(self: &Arc<Self>) {
        let ids: Vec<String> = lock(&self.vms).keys().cloned().collect();
        for id in ids {
            let files = self.run_files(&id);
            let Some(pid) = std::fs::read_to_string(files.pid()).ok().and_then(|s| s.trim().parse::<u32>().ok()) else {
                continue;
            };
            if !is_our_vmm(pid, &files.dir) {
                // The process is gone (or the pid was reused): its exit record says how it ended.
                let exit = self.exit_info(&files, None, false);
                let _ = std::fs::remove_file(files.pid());
                let mut vms = self.vms_mut();
                if let Some(e) = vms.get_mut(&id) {
                    e.rt.state = Some(if exit.exit_code.is_some_and(|c| c == 0 || c == 3) {
                        VmState::Stopped
                    } else {
                        VmState::Crashed
                    });
                    e.rt.last_exit = Some(exit);
                }
                continue;
            }
            let status = control(&files.control(), &Request::Status).ok().and_then(|r| r.status);
            let state = match status.as_ref().map(|s| s.state) {
                Some(vmm_core::vm::RunState::Paused) => VmState::Paused,
                Some(vmm_core::vm::RunState::Stopping) => VmState::Stopping,
                Some(vmm_core::vm::RunState::Crashed) => VmState::Crashed,
                _ => VmState::Running,
            };
            let crash = status.and_then(|s| s.crash).map(|reason| self.crash_report(&files, reason));
            log::info!("re-adopted VM {id} (pid {pid}, {state:?})");
            {
                let mut vms = self.vms_mut();
                if let Some(e) = vms.get_mut(&id) {
                    e.rt = Runtime {
                        state: Some(state),
                        pid: Some(pid),
                        started: Some(Instant::now()),
                        own_child: false,
                        crash,
                        ..Runtime::default()
                    };
                }
            }
            self.watch(id, pid);
        }
    }

    /// The VM table for changing it: marks every cached view stale.
    fn vms_mut(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        let guard = lock(&self.vms);
        self.generation.fetch_add(1, Ordering::AcqRel);
        guard
    }

    /// Every VM as JSON (what `GET /vms` returns to a caller who sees all VMs), cached until something
    /// changes or the second (of the uptimes) turns.
    pub fn list_json(&self) -> bytes::Bytes {
        let second = self.started.elapsed().as_secs();
        let vms = lock(&self.vms);
        let generation = self.generation.load(Ordering::Acquire);
        let mut cache = lock(&self.list_cache);
        if let Some((g, s, bytes)) = cache.as_ref()
            && *g == generation
            && *s == second
        {
            return bytes.clone();
        }
        let list: Vec<Vm> = vms.values().map(|e| view(e, &self.store, &self.cpu)).collect();
        let bytes = bytes::Bytes::from(serde_json::to_vec(&list).unwrap_or_default());
        *cache = Some((generation, second, bytes.clone()));
        bytes
    }

    /// Every VM, in id order.
    pub fn list(&self) -> Vec<Vm> {
        lock(&self.vms).values().map(|e| view(e, &self.store, &self.cpu)).collect()
    }

    pub fn get(&self, id: &str) -> Result<Vm, HostError> {
        lock(&self.vms)
            .get(id)
            .map(|e| view(e, &self.store, &self.cpu))
            .ok_or_else(|| HostError::NotFound(id.to_owned()))
    }

    pub fn record(&self, id: &str) -> Result<VmRecord, HostError> {
        lock(&self.vms).get(id).map(|e| e.record.clone()).ok_or_else(|| HostError::NotFound(id.to_owned()))
    }

    /// The pid of a running VM's process.
    pub fn pid(&self, id: &str) -> Option<u32> {
        lock(&self.vms).get(id).and_then(|e| e.rt.pid)
    }

    /// Running VMs and their pids.
    pub fn running(&self) -> Vec<(String, u32)> {
        lock(&self.vms).iter().filter_map(|(id, e)| Some((id.clone(), e.rt.pid?))).collect()
    }

    /// What the VMs other than `id` hold (forwards, MACs).
    pub fn others(&self, id: &str) -> Others {
        others_of(&lock(&self.vms), id)
    }

    /// Adds a new VM (its disk must already exist when `disk_bytes` > 0).
    pub fn insert(&self, record: VmRecord) -> Result<Vm, HostError> {
        let mut vms = self.vms_mut();
        if vms.values().any(|e| e.record.name == record.name) {
            return Err(HostError::Conflict(format!("a VM named {:?} exists already", record.name)));
        }
        // Another request may have taken a port or MAC since the cards were built.
        recheck_nics(&record, &others_of(&vms, &record.id))?;
        self.store.save(&record).map_err(|e| HostError::Internal(e.to_string()))?;
        let entry = Entry { record, rt: Runtime::default() };
        let vm = view(&entry, &self.store, &self.cpu);
        vms.insert(entry.record.id.clone(), entry);
        Ok(vm)
    }

    /// Changes a VM's definition with `change` (which may refuse); saves it.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut VmRecord, bool) -> Result<(), HostError>,
    ) -> Result<Vm, HostError> {
        let mut vms = self.vms_mut();
        let names: Vec<(String, String)> = vms.iter().map(|(i, e)| (i.clone(), e.record.name.clone())).collect();
        let entry = vms.get_mut(id).ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        let mut record = entry.record.clone();
        change(&mut record, entry.rt.pid.is_some())?;
        if names.iter().any(|(i, n)| i != id && *n == record.name) {
            return Err(HostError::Conflict(format!("a VM named {:?} exists already", record.name)));
        }
        if record.nics != entry.record.nics {
            recheck_nics(&record, &others_of(&vms, id))?;
        }
        let entry = vms.get_mut(id).ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        self.store.save(&record).map_err(|e| HostError::Internal(e.to_string()))?;
        entry.record = record;
        Ok(view(entry, &self.store, &self.cpu))
    }

    pub fn delete(&self, id: &str) -> Result<(), HostError> {
        let mut vms = self.vms_mut();
        let entry = vms.get(id).ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        if entry.rt.pid.is_some() {
            return Err(HostError::Conflict("the VM is running: power it off first".into()));
        }
        if let Some(what) = lock(&self.busy).get(id) {
            return Err(HostError::Conflict(format!("the VM is busy ({what}): try again when that is done")));
        }
        let all: BTreeMap<String, VmRecord> = vms.iter().map(|(i, e)| (i.clone(), e.record.clone())).collect();
        let clones = crate::disks::clones_of(&all, id);
        if !clones.is_empty() {
            return Err(HostError::Conflict(format!(
                "the VM's disk is the base of linked clones (used by: {}): delete them first",
                clones.join(", ")
            )));
        }
        self.store.delete(id).map_err(|e| HostError::Internal(e.to_string()))?;
        vms.remove(id);
        let _ = std::fs::remove_dir_all(self.run_files(id).dir);
        Ok(())
    }

    /// Resolves an image name (or, for admins, an absolute path) to a file.
    pub fn resolve_image(&self, name: &str, allow_paths: bool) -> Result<PathBuf, HostError> {
        if name.starts_with('/') {
            if !allow_paths {
                return Err(HostError::BadRequest("only admins may boot from host paths; use an image name".into()));
            }
            return Ok(PathBuf::from(name));
        }
        let path = self
            .store
            .image_path(name)
            .ok_or_else(|| HostError::BadRequest(format!("{name:?} is not a valid image name")))?;
        if !path.is_file() {
            return Err(HostError::BadRequest(format!("no image {name:?} in the library")));
        }
        Ok(path)
    }

    /// Before a start: every forward's host port must open. An automatic one (a new VM's SSH forward) whose
    /// port another program took moves to the next free port of 2222-2299 (saved); any other is refused.
    fn ready_forwards(&self, id: &str) -> Result<VmRecord, HostError> {
        let mut vms = self.vms_mut();
        let others = others_of(&vms, id);
        let e = vms.get_mut(id).ok_or_else(|| HostError::NotFound(id.to_owned()))?;
        if e.rt.pid.is_some() {
            return Ok(e.record.clone()); // `start` says it runs already
        }
        let mut nics = e.record.nics().to_vec();
        let mut moved = Vec::new();
        for n in 0..nics.len() {
            for f in 0..nics[n].forwards.len() {
                let forward = nics[n].forwards[f].clone();
                let Err(why) = net::probe_port(&forward) else { continue };
                let also: Vec<_> = nics.iter().flat_map(|c| &c.forwards).filter(|g| **g != forward).cloned().collect();
                match forward.automatic.then(|| net::pick_port(&others, &also, &forward, &net::probe_port)).flatten() {
                    Some(port) => {
                        nics[n].forwards[f].host_port = port;
                        moved.push(format!("{} ({why})", net::describe(&nics[n].forwards[f])));
                    }
                    None => {
                        return Err(HostError::Conflict(format!(
                            "network card {}: {why}: change the VM's port forward {}",
                            nics[n].id,
                            net::describe(&forward)
                        )));
                    }
                }
            }
        }
        if !moved.is_empty() {
            let mut record = e.record.clone();
            record.nics = Some(nics);
            self.store.save(&record).map_err(|e| HostError::Internal(e.to_string()))?;
            log::info!("VM {}: moved automatic port forwards: {}", record.name, moved.join("; "));
            e.record = record;
        }
        Ok(e.record.clone())
    }

    /// What a running VM's process reports (None: the VM does not run) — its network cards, whether its
    /// pointer is absolute (the guest's tablet driver is up) and whether its keys go to the virtio keyboard
    /// — in one `status` request, or why it cannot be had.
    pub async fn live_status(&self, id: &str) -> Option<Result<LiveStatus, String>> {
        self.pid(id)?;
        let asked = self
            .engine_request(id, vmm_core::control::Request::Status)
            .await
            .and_then(|r| r.status.ok_or_else(|| "its reply has no status".to_owned()));
        Some(
            asked
                .map(|s| LiveStatus {
                    nics: s.nics.into_iter().map(net::api_status).collect(),
                    absolute_pointer: s.absolute_pointer,
                    virtio_keyboard: s.virtio_keyboard,
                    display_follows: s.display_follows,
                    agent_connected: s.agent_connected,
                    keyboard_leds: s.keyboard_leds.map(|l| porthole_api::KeyboardLeds {
                        num_lock: l.num_lock,
                        caps_lock: l.caps_lock,
                        scroll_lock: l.scroll_lock,
                    }),
                    balloon: s.balloon.map(memory_balloon),
                })
                .map_err(|e| format!("the VM process did not report its network cards: {e}")),
        )
    }

    /// Sends `request` to a running VM's engine (off the async threads): its reply, or its refusal as is.
    async fn engine_request(
        &self,
        id: &str,
        request: vmm_core::control::Request,
    ) -> Result<vmm_core::control::Response, String> {
        match ask_engine(&self.run_files(id).control(), &request).await {
            Ok(reply) => Ok(reply),
            Err(vmm_core::control::ControlError::Refused(why)) => Err(why),
            Err(e) => Err(format!("the VM process did not answer: {e}")),
        }
    }

    /// Gives a running VM's engine new rate limits for its drive `drive` (the engine's drive ids are the
    /// API's).
    pub async fn set_live_disk_limits(&self, id: &str, drive: &str, l: porthole_api::DiskLimits) -> Result<(), String> {
        let limits = vmm_core::rate_limiter::DiskLimits {
            iops: l.iops,
            riops: l.riops,
            wiops: l.wiops,
            bps: l.bps,
            rbps: l.rbps,
            wbps: l.wbps,
        };
        self.engine_request(id, vmm_core::control::Request::SetDiskLimits { drive: drive.to_owned(), limits })
            .await
            .map(drop)
    }

    /// Has a running VM's engine grow its disk `drive` to `size` bytes (the guest is told).
    pub async fn grow_live_disk(&self, id: &str, drive: &str, size: u64) -> Result<(), String> {
        self.engine_request(id, vmm_core::control::Request::GrowDrive { drive: drive.to_owned(), size }).await.map(drop)
    }

    /// Gives running VM `id`'s user card `card` (its new definition) its forwards at once, replacing `old`
    /// (see [`net::replace_forwards`]); the new passt is reaped when it ends with the VM.
    pub async fn replace_live_forwards(
        &self,
        id: &str,
        card: porthole_api::NicDefinition,
        old: Vec<porthole_api::PortForward>,
    ) -> Result<(), String> {
        let control = self.run_files(id).control();
        let name = card.id.clone();
        let passt = tokio::task::spawn_blocking(move || net::replace_forwards(&control, &card, &old))
            .await
            .map_err(|e| e.to_string())??;
        log::info!("VM {id}: card {name} has new port forwards (passt pid {})", passt.id());
        net::reap(passt);
        Ok(())
    }

    /// Gives a running VM's engine new rate limits for its card `nic`.
    pub async fn set_live_nic_limits(&self, id: &str, nic: &str, l: porthole_api::NicLimits) -> Result<(), String> {
        let limits = vmm_core::rate_limiter::NicLimits { rx_bps: l.rx_bps, tx_bps: l.tx_bps };
        self.engine_request(id, vmm_core::control::Request::SetNicLimits { nic: nic.to_owned(), limits })
            .await
            .map(drop)
    }

    /// Asks a running VM's balloon to leave the guest `target_mib` of memory; the engine's refusal as is.
    /// Gives a running VM `count` vCPUs (more than it has, up to the maximum it started with): the engine
    /// hot-adds them; returns the count it has now.
    pub async fn set_live_vcpus(&self, id: &str, count: u32) -> Result<u32, String> {
        let reply = self.engine_request(id, vmm_core::control::Request::SetVcpus { count }).await?;
        reply.vcpus.ok_or_else(|| "the VM process did not report its vCPUs".into())
    }

    pub async fn set_live_balloon(&self, id: &str, target_mib: u64) -> Result<MemoryBalloon, String> {
        let reply = self.engine_request(id, vmm_core::control::Request::SetBalloon { target_mib }).await?;
        reply.balloon.map(memory_balloon).ok_or_else(|| "the VM process did not report its balloon".into())
    }

    /// Applies a running VM's CPU limits at once (into its cgroup), and records whether they hold.
    pub fn set_cpu_limits(&self, id: &str, limits: vmm_core::cpu_limits::Limits) {
        let held = self.cpu.set(id, limits).map(|()| match self.cpu.describe() {
            Ok(how) => format!("enforced through the {how}"),
            Err(why) => why,
        });
        if let Some(e) = self.vms_mut().get_mut(id) {
            e.rt.cpu_limits = Some(held);
        }
    }

    /// Plugs in or pulls the virtual cable of a running VM's card `nic`.
    pub async fn set_link(&self, id: &str, nic: &str, up: bool) -> Result<NicStatus, HostError> {
        let record = self.record(id)?;
        if !record.nics().iter().any(|n| n.id == nic) {
            return Err(HostError::NotFound(format!("{id}/nics/{nic}")));
        }
        if self.pid(id).is_none() {
            return Err(HostError::Conflict("the VM is not running: its cards' links are up when it starts".into()));
        }
        let control = self.run_files(id).control();
        let nic = nic.to_owned();
        tokio::task::spawn_blocking(move || net::set_link(&control, &nic, up))
            .await
            .map_err(|e| HostError::Internal(e.to_string()))?
            .map_err(|e| match e {
                net::EngineError::Refused(why) => HostError::Conflict(why),
                other => HostError::Internal(other.to_string()),
            })
    }

    /// Starts a stopped VM; returns once its control socket answers. A forwarded port that another program
    /// (another daemon's VM starting at the same moment) took between the check and the VM process's own
    /// bind fails the start; an automatic forward then moves to a free port and the start is tried again.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Vm, HostError> {
        if let Some(what) = lock(&self.busy).get(id) {
            return Err(HostError::Conflict(format!("the VM is busy ({what}): start it when that is done")));
        }
        self.start_restoring(id, None).await
    }

    /// Starts VM `id`, from the machine state in `restore` when given (a snapshot's), else from its suspend
    /// state when it is suspended (deleted once the VM runs), else from power-on.
    pub async fn start_restoring(self: &Arc<Self>, id: &str, restore: Option<PathBuf>) -> Result<Vm, HostError> {
        let mut tries = 0;
        loop {
            match self.start_once(id, restore.clone()).await {
                Err(HostError::Conflict(why))
                    if why.contains("is in use")
                        && tries < 3
                        && self
                            .record(id)
                            .is_ok_and(|r| r.nics().iter().flat_map(|n| &n.forwards).any(|f| f.automatic)) =>
                {
                    tries += 1;
                    log::info!("VM {id}: {why}; trying again with the automatic forwards on free ports");
                }
                other => return other,
            }
        }
    }

    async fn start_once(self: &Arc<Self>, id: &str, restore: Option<PathBuf>) -> Result<Vm, HostError> {
        if restore.is_none() {
            self.apply_pending(id).await?;
        }
        let record = self.ready_forwards(id)?;
        if record.template {
            return Err(HostError::Conflict(format!(
                "VM {} is a template: templates never start; clone it (full or linked) and start the clone",
                record.name
            )));
        }
        let all = self.all_records();
        let clones = crate::disks::clones_of(&all, id);
        if !clones.is_empty() {
            return Err(HostError::Conflict(format!(
                "VM {}'s disk is the read-only base of linked clones (used by: {}): it cannot start while they \
                 exist",
                record.name,
                clones.join(", ")
            )));
        }
        let disk_args = crate::disks::disk_args(self, &all, &record)?;
        let suspended = record.suspended.as_ref().map(|f| self.store.vm_dir(id).join(f));
        let restore = restore.or(suspended.clone());
        // A kernel boots directly; without one the VM boots its firmware (SeaBIOS), from the CD/DVD first.
        let direct = match &record.boot {
            Some(boot) => {
                let kernel = self.resolve_image(&boot.kernel, true)?;
                let initrd = boot.initrd.as_deref().map(|i| self.resolve_image(i, true)).transpose()?;
                Some((kernel, initrd, boot.cmdline.clone()))
            }
            None => {
                if record.media.is_none() && record.disk_bytes == 0 {
                    return Err(HostError::Conflict(
                        "the VM has nothing to boot: give it a kernel, an ISO in its CD/DVD drive, or a disk".into(),
                    ));
                }
                if vmm_core::config::find_seabios().is_none() {
                    return Err(HostError::Conflict(
                        "booting from an ISO or a disk needs SeaBIOS on this host (apt-get install seabios)".into(),
                    ));
                }
                None
            }
        };
        // Every CD/DVD drive in order: the first one's image, then the others'.
        let media = std::iter::once(&record.media)
            .chain(record.extra_cdroms.iter().map(|c| &c.media))
            .map(|m| m.as_deref().map(|m| self.resolve_image(m, false)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let files = self.run_files(id);
        {
            let mut vms = self.vms_mut();
            let e = vms.get_mut(id).ok_or_else(|| HostError::NotFound(id.to_owned()))?;
            if e.rt.pid.is_some() {
                return Err(HostError::Conflict(format!(
                    "the VM is {:?} already",
                    e.rt.state.unwrap_or(VmState::Running)
                )));
            }
            e.rt = Runtime { state: Some(VmState::Starting), last_exit: e.rt.last_exit.take(), ..Runtime::default() };
        }
        let _ = std::fs::remove_dir_all(&files.dir);
        let spawned = (|| -> std::io::Result<u32> {
            std::fs::create_dir_all(&files.dir)?;
            let log = std::fs::File::create(files.log())?;
            let mut cmd = std::process::Command::new(&self.vmm);
            cmd.arg("--name").arg(&record.name);
            match &direct {
                Some((kernel, initrd, cmdline)) => {
                    cmd.arg("--kernel").arg(kernel);
                    if let Some(initrd) = initrd {
                        cmd.arg("--initrd").arg(initrd);
                    }
                    cmd.args(["--cmdline", cmdline]);
                }
                None => {
                    let order = record.boot_order.clone().unwrap_or_else(porthole_api::default_boot_order);
                    let order: Vec<&str> = order.iter().map(|d| d.as_str()).collect();
                    cmd.args(["--firmware", "bios", "--boot", &order.join(","), "--firmware-log"])
                        .arg(files.firmware_log());
                    if record.boot_menu {
                        cmd.arg("--boot-menu");
                    }
                }
            }
            if let Some(d) = record.display {
                cmd.arg("--display").arg(format!("{}x{}", d.width, d.height));
            }
            cmd.args(["--memory", &record.memory_mib.to_string(), "--cpus", &record.vcpus.to_string()]);
            if let Some(max) = record.max_vcpus.filter(|&m| m > record.vcpus) {
                cmd.args(["--max-cpus", &max.to_string()]);
            }
            cmd.arg("--serial").arg(format!("file:{}", files.serial().display()));
            cmd.arg("--control").arg(format!("unix:{}", files.control().display()));
            cmd.arg("--vnc").arg(format!("unix:{}", files.vnc().display()));
            cmd.arg("--vnc-view-only").arg(format!("unix:{}", files.vnc_view_only().display()));
            cmd.arg("--exit-file").arg(files.exit());
            cmd.args(["--stop-timeout-ms", "30000"]);
            // The boot disk, the cloud-init seed, then the other disks (the seed keeps the place it had
            // before VMs had several disks, so saved machine states still fit).
            let mut disks = disk_args.iter();
            if let Some(disk) = disks.next() {
                cmd.arg("--disk").arg(disk);
            }
            if record.cloud_init.is_some() {
                let seed = self.store.vm_dir(id).join(crate::disks::SEED);
                cmd.arg("--disk").arg(format!("{},readonly,format=raw", seed.display()));
            }
            for disk in disks {
                cmd.arg("--disk").arg(disk);
            }
            if let Some(state) = &restore {
                cmd.arg("--restore").arg(state);
            }
            cmd.args(net::net_args(record.nics()));
            cmd.arg("--input").arg(record.input.as_str());
            cmd.arg("--vga").arg(record.vga.as_str());
            cmd.arg("--agent").arg(record.agent.as_str());
            cmd.arg("--sound").arg(record.sound.as_str());
            if record.balloon {
                cmd.arg("--balloon");
            }
            for m in &media {
                match m {
                    Some(m) => cmd.arg("--cdrom").arg(m),
                    None => cmd.arg("--cdrom"),
                };
            }
            cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
            // Its own process group: signals to the daemon's group (Ctrl-C, systemd stop) do not reach it.
            cmd.process_group(0);
            let child = cmd.spawn()?;
            let pid = child.id();
            // Dropping the handle neither kills nor reaps: `ended` reaps the child with waitpid.
            crate::store::write_atomic(&files.pid(), pid.to_string().as_bytes())?;
            Ok(pid)
        })();
        let pid = match spawned {
            Ok(pid) => pid,
            Err(e) => {
                let mut vms = self.vms_mut();
                if let Some(en) = vms.get_mut(id) {
                    en.rt.state = Some(VmState::Crashed);
                    en.rt.last_exit = Some(ExitInfo {
                        exit_code: None,
                        reason: format!("cannot start porthole-vmm: {e}"),
                        serial_tail: vec![],
                    });
                }
                return Err(HostError::Internal(format!("cannot start porthole-vmm: {e}")));
            }
        };
        // Every VM goes into a cgroup of its own (when the host has one to give), so that a cap or a weight
        // set while it runs applies at once.
        let cpu = self.cpu.attach(id, pid, cpu_limits_of(&record));
        if let Err(why) = &cpu {
            log::debug!("VM {id}: CPU limits not enforced: {why}");
        }
        {
            let mut vms = self.vms_mut();
            if let Some(e) = vms.get_mut(id) {
                e.rt.pid = Some(pid);
                e.rt.own_child = true;
                e.rt.started = Some(Instant::now());
                e.rt.cpu_limits = Some(cpu);
            }
        }
        self.watch(id.to_owned(), pid);
        // Running once the control socket answers (or ended, which the watcher records).
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let up = ask_engine(&files.control(), &Request::Status).await.is_ok();
            {
                let mut vms = self.vms_mut();
                let e = vms.get_mut(id).ok_or_else(|| HostError::NotFound(id.to_owned()))?;
                if e.rt.pid != Some(pid) {
                    let why = e.rt.last_exit.as_ref().map(|x| x.reason.clone()).unwrap_or_default();
                    let why = format!("the VM ended while starting: {why}");
                    // A port that is taken is the host's state, not the daemon's fault.
                    return Err(if why.contains("is in use") {
                        HostError::Conflict(why)
                    } else {
                        HostError::Internal(why)
                    });
                }
                if up {
                    if e.rt.state == Some(VmState::Starting) {
                        e.rt.state = Some(VmState::Running);
                    }
                    let vm = view(e, &self.store, &self.cpu);
                    drop(vms);
                    if let Some(file) = &suspended {
                        // Resumed: the suspend state is spent.
                        self.update(id, |r, _| {
                            r.suspended = None;
                            Ok(())
                        })?;
                        let _ = std::fs::remove_file(file);
                    }
                    return Ok(self.get(id).unwrap_or(vm));
                }
            }
            if Instant::now() > deadline {
                return Err(HostError::Internal("the VM process did not open its control socket within 15 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Applies the changes VM `id` took while it ran (see [`add_pending`]) before it starts from power-on:
    /// grows its disk, then saves the new definition. A VM that resumes a saved state keeps them pending
    /// (its saved machine has the old hardware).
    pub async fn apply_pending(self: &Arc<Self>, id: &str) -> Result<(), HostError> {
        let r = self.record(id)?;
        let Some(pending) = r.pending.clone() else { return Ok(()) };
        // A machine state resumes on the old hardware; a linked clones' base does not start (and its disk
        // must not change): the changes stay pending.
        if r.suspended.is_some()
            || self.pid(id).is_some()
            || !crate::disks::clones_of(&self.all_records(), id).is_empty()
        {
            return Ok(());
        }
        if let Some(size) = pending.disk_bytes
            && size > r.disk_bytes
        {
            let (host, all, record) = (self.clone(), self.all_records(), r.clone());
            tokio::task::spawn_blocking(move || crate::disks::grow(&host, &all, &record, 0, size))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))??;
        }
        self.update(id, |r, _| {
            apply_hardware(r, &pending);
            r.pending = None;
            Ok(())
        })?;
        log::info!("VM {}: applied the changes made while it ran ({})", r.name, pending_names(&pending).join(", "));
        Ok(())
    }

    /// Waits (in a task) for process `pid` of VM `id` to end, then records how it ended.
    fn watch(self: &Arc<Self>, id: String, pid: u32) {
        let host = self.clone();
        tokio::spawn(async move {
            // SAFETY: the OwnedFd is a pidfd that the AsyncFd owns and keeps open for its lifetime.
            let fd = pidfd_open(pid).and_then(|fd| unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
                    .map_err(|e| e.into())
            });
            match fd {
                Ok(fd) => {
                    let _ = fd.readable().await;
                }
                Err(_) => {
                    // No pidfd (the process is already gone, or an old kernel): poll.
                    while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            host.wait_for_forwards_to_close(&id).await;
            host.ended(&id, pid);
        });
    }

    /// After VM `id`'s process ended: its passts end when their sockets close, a few milliseconds later (more
    /// on a loaded host), and free the forwarded ports. The VM counts as stopped once they have (or after
    /// [`FORWARDS_CLOSE_WAIT`]), so that a start right after a stop finds its ports free and its automatic SSH
    /// forward stays where it was.
    async fn wait_for_forwards_to_close(&self, id: &str) {
        let Ok(record) = self.record(id) else { return };
        let forwards: Vec<PortForward> = record
            .nics()
            .iter()
            .filter(|c| c.backend == NicBackend::User)
            .flat_map(|c| c.forwards.iter().cloned())
            .collect();
        let deadline = Instant::now() + FORWARDS_CLOSE_WAIT;
        while forwards.iter().any(net::port_in_use) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn ended(&self, id: &str, pid: u32) {
        let own = lock(&self.vms).get(id).is_some_and(|e| e.rt.own_child && e.rt.pid == Some(pid));
        let mut status = None;
        if own {
            let mut raw = 0;
            // SAFETY: reaping our own child; `raw` receives its status.
            if unsafe { libc::waitpid(pid as i32, &mut raw, 0) } == pid as i32 {
                status = Some(raw);
            }
        }
        let files = self.run_files(id);
        let exit = self.exit_info(&files, status, own);
        let _ = std::fs::remove_file(files.pid());
        // Its sockets go with it (an engine killed, or ended under its seccomp filter, cannot unlink them).
        for socket in [files.control(), files.vnc(), files.vnc_view_only()] {
            let _ = std::fs::remove_file(socket);
        }
        // A machine-state save the process did not finish leaves its temporary file (`.NAME.tmp-PID`).
        let unfinished = format!(".tmp-{pid}");
        for f in std::fs::read_dir(self.store.vm_dir(id)).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(&unfinished) {
                log::info!("VM {id}: removing {name}, a state save its process did not finish");
                let _ = std::fs::remove_file(f.path());
            }
        }
        let mut vms = self.vms_mut();
        let Some(e) = vms.get_mut(id) else { return };
        if e.rt.pid != Some(pid) {
            return;
        }
        let clean =
            exit.exit_code.is_some_and(|c| c == 0 || c == 3) || (e.rt.stop_requested && exit.exit_code.is_some());
        log::info!("VM {id} ended: {}", exit.reason);
        self.cpu.remove(id);
        e.rt = Runtime {
            state: Some(if clean { VmState::Stopped } else { VmState::Crashed }),
            last_exit: Some(exit),
            ..Runtime::default()
        };
    }

    fn exit_info(&self, files: &RunFiles, status: Option<i32>, own: bool) -> ExitInfo {
        let serial_tail = tail_lines(&files.serial(), 10);
        let record: Option<vmm_core::vm::ExitRecord> =
            std::fs::read(files.exit()).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(r) = record {
            return ExitInfo { exit_code: Some(r.exit_code), reason: r.reason, serial_tail };
        }
        // A process that refused its arguments (a forwarded port in use, …) said why on stderr, in its log.
        let tail = tail_lines(&files.log(), 5);
        let said = tail
            .iter()
            .rev()
            .find(|l| l.to_ascii_lowercase().contains("error"))
            .or_else(|| tail.iter().rev().find(|l| !l.trim().is_empty()))
            .cloned();
        let reason = match status {
            Some(s) if libc::WIFSIGNALED(s) => format!("the VM process was killed by signal {}", libc::WTERMSIG(s)),
            Some(s) if libc::WIFEXITED(s) => match said {
                Some(line) => format!("the VM process exited with status {}: {}", libc::WEXITSTATUS(s), line.trim()),
                None => format!("the VM process exited with status {}", libc::WEXITSTATUS(s)),
            },
            _ if own => "the VM process ended without an exit record".into(),
            _ => "the VM process ended without an exit record (killed?)".into(),
        };
        ExitInfo { exit_code: None, reason, serial_tail }
    }

    fn crash_report(&self, files: &RunFiles, reason: String) -> CrashReport {
        CrashReport { reason, serial_tail: tail_lines(&files.serial(), 10) }
    }

    /// Takes in what VM `id`'s process (`pid`) says of itself (the stats sampler asks every second): a guest
    /// that crashed makes the VM `crashed`, with the report, while its process keeps it; a crashed VM that
    /// was reset runs again. Nothing changes while a stop the host asked for is under way.
    pub fn observe(&self, id: &str, pid: u32, status: &vmm_core::control::Status) {
        use vmm_core::vm::RunState;
        let crashed = status.state == RunState::Crashed;
        let changed = |e: &Entry| {
            e.rt.pid == Some(pid)
                && !e.rt.stop_requested
                && if crashed { e.rt.crash.is_none() } else { e.rt.state == Some(VmState::Crashed) }
        };
        if !lock(&self.vms).get(id).is_some_and(changed) {
            return;
        }
        let crash = crashed.then(|| self.crash_report(&self.run_files(id), status.crash.clone().unwrap_or_default()));
        let mut vms = self.vms_mut();
        let Some(e) = vms.get_mut(id).filter(|e| changed(e)) else { return };
        if let Some(report) = &crash {
            log::warn!("VM {id}: the guest crashed: {}", report.reason);
        }
        e.rt.state = Some(match status.state {
            RunState::Crashed => VmState::Crashed,
            RunState::Paused => VmState::Paused,
            RunState::Stopping => VmState::Stopping,
            RunState::Running => VmState::Running,
        });
        e.rt.crash = crash;
    }

    /// Gives each user card of running VM `id` whose passt died (its engine's `status`: the card's back end
    /// failed) a new passt with the definition's forwards, in a thread of its own. The first comes at once;
    /// a card whose passt keeps dying waits 2 s for the next, then twice as long each time, up to a minute; a minute
    /// without a repair, or a new engine (`pid`), starts the count again.
    pub fn repair_networks(self: &Arc<Self>, id: &str, pid: u32, status: &vmm_core::control::Status) {
        let failed = |n: &&vmm_core::net::NicStatus| {
            n.attached && n.error.as_deref().is_some_and(|e| e.starts_with(vmm_core::net::BACKEND_FAILED))
        };
        for nic in status.nics.iter().filter(failed) {
            let Some(card) = self.record(id).ok().and_then(|r| r.nics().iter().find(|c| c.id == nic.id).cloned())
            else {
                continue;
            };
            {
                let mut repairs = lock(&self.net_repairs);
                let r = repairs.entry((id.to_owned(), nic.id.clone())).or_default();
                if r.pid != pid {
                    *r = NetRepair { pid, ..NetRepair::default() };
                }
                let since = r.last.map(|at| at.elapsed());
                if since.is_some_and(|s| s > NET_REPAIR_MAX_WAIT) {
                    r.count = 0;
                }
                let wait = Duration::from_secs(1 << r.count.min(6)).min(NET_REPAIR_MAX_WAIT);
                if r.running || since.is_some_and(|s| s < wait) {
                    continue;
                }
                r.running = true;
            }
            let what = match card.backend {
                NicBackend::User => "passt",
                NicBackend::Bridge { .. } | NicBackend::Tap { .. } => "TAP device",
            };
            log::warn!(
                "VM {id}: card {}'s {what} failed ({}); giving it a new one",
                card.id,
                nic.error.as_deref().unwrap_or("")
            );
            let (host, vm, control) = (self.clone(), id.to_owned(), self.run_files(id).control());
            let spawned = std::thread::Builder::new().name("net-repair".into()).spawn(move || {
                let repaired = match card.backend {
                    NicBackend::User => net::replace_forwards(&control, &card, &card.forwards).map(|passt| {
                        let pid = passt.id();
                        net::reap(passt);
                        format!("passt (pid {pid})")
                    }),
                    NicBackend::Bridge { .. } | NicBackend::Tap { .. } => {
                        net::replace_tap(&control, &card).map(|name| format!("TAP device {name}"))
                    }
                };
                match repaired {
                    Ok(new) => log::info!("VM {vm}: card {} has a new {new}", card.id),
                    Err(why) => log::warn!("VM {vm}: card {} got no new {what}: {why}", card.id),
                }
                let mut repairs = lock(&host.net_repairs);
                let r = repairs.entry((vm, card.id)).or_default();
                (r.running, r.last, r.count) = (false, Some(Instant::now()), r.count + 1);
            });
            if let Err(e) = spawned {
                log::warn!("VM {id}: cannot start a thread for a new {what}: {e}");
                lock(&self.net_repairs).entry((id.to_owned(), nic.id.clone())).or_default().running = false;
            }
        }
    }

    /// After a `reset`: a crashed VM reboots, so it runs again.
    pub fn reset_done(&self, id: &str) {
        if let Some(e) = self.vms_mut().get_mut(id)
            && e.rt.pid.is_some()
            && e.rt.state == Some(VmState::Crashed)
        {
            e.rt.state = Some(VmState::Running);
            e.rt.crash = None;
        }
    }

    /// Sends a control request to a running VM.
    pub async fn control(&self, id: &str, request: Request) -> Result<Response, HostError> {
        if self.pid(id).is_none() {
            self.record(id)?;
            return Err(HostError::Conflict("the VM is not running".into()));
        }
        ask_engine(&self.run_files(id).control(), &request).await.map_err(|e| match e {
            vmm_core::control::ControlError::Refused(why) => HostError::BadRequest(why),
            other => HostError::Internal(format!("the VM's control socket: {other}")),
        })
    }

    /// Records the state a lifecycle request leads to.
    pub fn set_state(&self, id: &str, state: VmState, stop_requested: bool) {
        if let Some(e) = self.vms_mut().get_mut(id)
            && e.rt.pid.is_some()
        {
            e.rt.state = Some(state);
            e.rt.stop_requested |= stop_requested;
        }
    }

    /// Waits until VM `id` has no process (or `limit` passes); returns whether it stopped.
    pub async fn wait_stopped(&self, id: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.pid(id).is_none() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

impl Host {
    /// Every VM's definition, by id.
    pub(crate) fn all_records(&self) -> BTreeMap<String, VmRecord> {
        lock(&self.vms).iter().map(|(i, e)| (i.clone(), e.record.clone())).collect()
    }

    /// Marks VM `id` busy with `what` (a disk operation) until the guard drops; refused while it is busy
    /// already.
    pub fn begin(self: &Arc<Self>, id: &str, what: &'static str) -> Result<Busy, HostError> {
        let mut busy = lock(&self.busy);
        if let Some(other) = busy.get(id) {
            return Err(HostError::Conflict(format!("the VM is busy ({other}): try again when that is done")));
        }
        busy.insert(id.to_owned(), what);
        Ok(Busy { host: self.clone(), id: id.to_owned() })
    }

    /// Forgets a stop request that did not happen (a refused save-state).
    pub fn clear_stop_request(&self, id: &str) {
        if let Some(e) = self.vms_mut().get_mut(id) {
            e.rt.stop_requested = false;
        }
    }

    /// Powers a running VM off and waits for its process to end.
    pub async fn power_off(&self, id: &str) -> Result<(), HostError> {
        self.set_state(id, VmState::Stopping, true);
        self.control(id, Request::Poweroff).await?;
        if self.wait_stopped(id, Duration::from_secs(30)).await {
            Ok(())
        } else {
            Err(HostError::Internal("the VM process did not end within 30 s of its power-off".into()))
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// One control request on a fresh connection, from async code: no blocking thread per request (the API's
/// `GET /vms/{id}` asks each running VM for its status, and the soak's 100 clients had tokio start and end
/// dozens of blocking threads whose cached stacks made the daemon's memory wander).
pub async fn ask_engine(path: &Path, request: &Request) -> Result<Response, vmm_core::control::ControlError> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let asked = async {
        let mut stream = tokio::net::UnixStream::connect(path).await?;
        let mut bytes = serde_json::to_vec(request)?;
        bytes.push(b'\n');
        stream.write_all(&bytes).await?;
        let mut line = Vec::new();
        tokio::io::BufReader::new(stream).take(vmm_core::control::MAX_REPLY_BYTES).read_until(b'\n', &mut line).await?;
        Response::from_line(&line)
    };
    tokio::time::timeout(CONTROL_TIMEOUT, asked).await.unwrap_or_else(|_| {
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the VM process did not answer in 10 s").into())
    })
}

/// How long a control request may take (as the blocking client's read timeout).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// One control request on a fresh connection.
pub fn control(path: &Path, request: &Request) -> Result<Response, vmm_core::control::ControlError> {
    ControlClient::connect(path)?.request(request)
}

fn view(e: &Entry, store: &Store, cpu: &vmm_core::cpu_limits::CpuLimits) -> Vm {
    let r = &e.record;
    let state = match e.rt.state {
        _ if e.rt.pid.is_none() && r.suspended.is_some() => VmState::Suspended,
        Some(s) => s,
        None => VmState::Stopped,
    };
    Vm {
        id: r.id.clone(),
        name: r.name.clone(),
        vcpus: r.vcpus,
        max_vcpus: r.max_vcpus,
        memory_mib: r.memory_mib,
        disk_bytes: r.disk_bytes,
        boot: r.boot.clone(),
        media: r.media.clone(),
        state,
        last_exit: e.rt.last_exit.clone(),
        crash: e.rt.crash.clone().filter(|_| e.rt.pid.is_some()),
        uptime_s: e.rt.started.filter(|_| e.rt.pid.is_some()).map(|s| s.elapsed().as_secs()),
        tags: r.tags.clone(),
        boot_status: None,
        nics: r.nics().to_vec(),
        nic_status: Vec::new(),
        nic_status_error: None,
        disk_format: r.disk.as_ref().map(|d| d.format),
        disk_allocated_bytes: crate::disks::disk_allocated(&store.vm_dir(&r.id), r),
        template: r.template,
        linked_to: r.linked_to.clone(),
        cloud_init: r.cloud_init.as_ref().map(|c| CloudInitInfo {
            hostname: c.hostname.clone(),
            user: c.user.clone(),
            instance_id: c.instance_id.clone(),
        }),
        description: r.description.clone(),
        autostart: r.autostart,
        boot_order: r.boot_order.clone().unwrap_or_else(porthole_api::default_boot_order),
        boot_menu: r.boot_menu,
        display: r.display,
        input: r.input,
        vga: r.vga,
        agent: r.agent,
        sound: r.sound,
        agent_connected: None,
        display_follows: None,
        absolute_pointer: None,
        virtio_keyboard: None,
        keyboard_leds: None,
        balloon: r.balloon,
        memory_balloon: None,
        cpu_cap_percent: r.cpu_cap_percent,
        cpu_weight: r.cpu_weight,
        cpu_limits: cpu_limits_text(r, e, cpu),
        drives: drives(r, store),
        pending_changes: r.pending.as_ref().map(pending_names).unwrap_or_default(),
        pending: r.pending.clone(),
    }
}

/// The API's view of an engine's balloon.
pub fn memory_balloon(b: vmm_core::virtio::balloon::BalloonStatus) -> MemoryBalloon {
    let mib = |bytes: Option<u64>| bytes.map(|b| b >> 20);
    let stats = b.stats.unwrap_or_default();
    MemoryBalloon {
        target_mib: b.target_mib,
        actual_mib: b.actual_mib,
        floor_mib: b.floor_mib,
        driver: b.driver,
        guest_total_mib: mib(stats.total_bytes),
        guest_available_mib: mib(stats.available_bytes),
        guest_free_mib: mib(stats.free_bytes),
    }
}

/// Where a drive of the API (`disk1`, `cdrom2`) is in a VM's definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveSlot {
    /// Disk slot n (see `disks::disk_slots`): 0 the boot disk, n `extra_disks[n-1]`.
    Disk(usize),
    /// The cloud-init seed.
    Seed,
    /// CD/DVD drive n: 0 the first (`media`), n `extra_cdroms[n-1]`.
    Cdrom(usize),
}

/// The drives the engine gives VM `r`, in its order (the boot disk, the cloud-init seed, the other disks,
/// then the CD/DVD drives), with their ids and where they are in the definition.
pub fn drive_slots(r: &VmRecord) -> Vec<(String, DriveSlot)> {
    let mut out = Vec::new();
    let disks = crate::disks::disk_slots(r).len();
    let mut n = 0;
    let mut disk = |slot: DriveSlot, out: &mut Vec<(String, DriveSlot)>| {
        out.push((format!("disk{n}"), slot));
        n += 1;
    };
    if disks > 0 {
        disk(DriveSlot::Disk(0), &mut out);
    }
    if r.cloud_init.is_some() {
        disk(DriveSlot::Seed, &mut out);
    }
    for slot in 1..disks {
        disk(DriveSlot::Disk(slot), &mut out);
    }
    for c in 0..=r.extra_cdroms.len() {
        out.push((format!("cdrom{c}"), DriveSlot::Cdrom(c)));
    }
    out
}

/// The drives the engine gives VM `r` (in its order: see [`drive_slots`]).
pub fn drives(r: &VmRecord, store: &Store) -> Vec<DriveInfo> {
    let disks = crate::disks::disk_slots(r);
    drive_slots(r)
        .into_iter()
        .map(|(id, slot)| match slot {
            DriveSlot::Disk(n) => DriveInfo {
                id,
                kind: DriveKind::Disk,
                bus: "virtio-blk".into(),
                format: disks.get(n).map(|d| d.format),
                size_bytes: crate::disks::slot_size(r, n),
                media: None,
                read_only: false,
                limits: r.disk_limits.get(n).copied().unwrap_or_default(),
            },
            DriveSlot::Seed => DriveInfo {
                id,
                kind: DriveKind::Disk,
                bus: "virtio-blk (cloud-init seed)".into(),
                format: Some(DiskFormat::Raw),
                size_bytes: std::fs::metadata(store.vm_dir(&r.id).join(crate::disks::SEED))
                    .map(|m| m.len())
                    .unwrap_or(0),
                media: None,
                read_only: true,
                limits: Default::default(),
            },
            DriveSlot::Cdrom(c) => DriveInfo {
                id,
                kind: DriveKind::Cdrom,
                bus: "SCSI CD-ROM (virtio-scsi)".into(),
                format: None,
                size_bytes: 0,
                media: if c == 0 { r.media.clone() } else { r.extra_cdroms.get(c - 1).and_then(|x| x.media.clone()) },
                read_only: true,
                limits: Default::default(),
            },
        })
        .collect()
}

/// The fields of `req` that change only while the VM is stopped: a running (or suspended) VM keeps them as
/// pending until its next start from power-on (network cards too, once built: see `server.rs`).
pub fn hardware_change(req: &UpdateVm) -> UpdateVm {
    UpdateVm {
        vcpus: req.vcpus,
        max_vcpus: req.max_vcpus,
        memory_mib: req.memory_mib,
        boot: req.boot.clone(),
        firmware_boot: req.firmware_boot,
        boot_order: req.boot_order.clone(),
        boot_menu: req.boot_menu,
        display: req.display,
        disk_bytes: req.disk_bytes,
        input: req.input,
        vga: req.vga,
        agent: req.agent,
        sound: req.sound,
        ..UpdateVm::default()
    }
}

/// Sets the hardware fields of `u` (see [`hardware_change`]) in definition `r` (the disk file must have
/// grown already).
pub fn apply_hardware(r: &mut VmRecord, u: &UpdateVm) {
    if let Some(v) = u.vcpus {
        r.vcpus = v;
    }
    if let Some(m) = u.max_vcpus {
        r.max_vcpus = (m != 0).then_some(m);
    }
    if let Some(m) = u.memory_mib {
        r.memory_mib = m;
    }
    if let Some(b) = &u.boot {
        r.boot = Some(b.clone());
    }
    if u.firmware_boot == Some(true) {
        r.boot = None;
    }
    if let Some(o) = &u.boot_order {
        r.boot_order = (*o != porthole_api::default_boot_order()).then(|| o.clone());
    }
    if let Some(m) = u.boot_menu {
        r.boot_menu = m;
    }
    if let Some(d) = u.display {
        r.display = Some(d);
    }
    if let Some(size) = u.disk_bytes {
        r.disk_bytes = r.disk_bytes.max(size);
    }
    if let Some(i) = u.input {
        r.input = i;
    }
    if let Some(v) = u.vga {
        r.vga = v;
    }
    if let Some(a) = u.agent {
        r.agent = a;
    }
    if let Some(s) = u.sound {
        r.sound = s;
    }
    if let Some(nics) = &u.nics {
        // Pending cards were built (ids and MACs chosen) when the change was made.
        r.nics = Some(nics.iter().enumerate().map(|(i, s)| net::definition_of(i, s)).collect());
    }
}

/// Adds the hardware changes `new` to `r`'s pending ones (a later value of a field replaces an earlier one);
/// what would change nothing any more (it equals the definition) is dropped.
pub fn add_pending(r: &mut VmRecord, new: UpdateVm) {
    let mut p = r.pending.take().unwrap_or_default();
    p.vcpus = new.vcpus.or(p.vcpus).filter(|v| *v != r.vcpus);
    p.max_vcpus = new.max_vcpus.or(p.max_vcpus).filter(|m| *m != r.max_vcpus.unwrap_or(0));
    p.memory_mib = new.memory_mib.or(p.memory_mib).filter(|m| *m != r.memory_mib);
    if new.boot.is_some() {
        p.firmware_boot = None;
    }
    if new.firmware_boot == Some(true) {
        p.boot = None;
    }
    p.boot = new.boot.or(p.boot).filter(|b| r.boot.as_ref() != Some(b));
    p.firmware_boot = new.firmware_boot.or(p.firmware_boot).filter(|f| *f && r.boot.is_some());
    let order = r.boot_order.clone().unwrap_or_else(porthole_api::default_boot_order);
    p.boot_order = new.boot_order.or(p.boot_order).filter(|o| *o != order);
    p.boot_menu = new.boot_menu.or(p.boot_menu).filter(|m| *m != r.boot_menu);
    p.display = new.display.or(p.display).filter(|d| r.display != Some(*d));
    p.disk_bytes = new.disk_bytes.or(p.disk_bytes).filter(|s| *s > r.disk_bytes);
    p.input = new.input.or(p.input).filter(|i| *i != r.input);
    p.vga = new.vga.or(p.vga).filter(|v| *v != r.vga);
    p.agent = new.agent.or(p.agent).filter(|a| *a != r.agent);
    p.sound = new.sound.or(p.sound).filter(|s| *s != r.sound);
    let cards: Vec<NicSpec> = r.nics().iter().map(NicSpec::from).collect();
    p.nics = new.nics.or(p.nics).filter(|n| *n != cards);
    r.pending = (p != UpdateVm::default()).then_some(p);
}

/// The names of the fields a pending change sets.
pub fn pending_names(p: &UpdateVm) -> Vec<String> {
    let set = [
        ("vcpus", p.vcpus.is_some()),
        ("max_vcpus", p.max_vcpus.is_some()),
        ("memory_mib", p.memory_mib.is_some()),
        ("boot", p.boot.is_some()),
        ("firmware_boot", p.firmware_boot.is_some()),
        ("boot_order", p.boot_order.is_some()),
        ("boot_menu", p.boot_menu.is_some()),
        ("display", p.display.is_some()),
        ("disk_bytes", p.disk_bytes.is_some()),
        ("input", p.input.is_some()),
        ("vga", p.vga.is_some()),
        ("agent", p.agent.is_some()),
        ("sound", p.sound.is_some()),
        ("nics", p.nics.is_some()),
    ];
    set.iter().filter(|(_, s)| *s).map(|(n, _)| (*n).to_owned()).collect()
}

/// What the VMs other than `id` of `vms` hold.
fn others_of(vms: &BTreeMap<String, Entry>, id: &str) -> Others {
    Others::of(vms.iter().filter(|(i, _)| *i != id).map(|(_, e)| (e.record.name.as_str(), e.record.nics())))
}

/// Checks a definition's cards against the other VMs (ports, MACs) once more, under the table's lock.
fn recheck_nics(record: &VmRecord, others: &Others) -> Result<(), HostError> {
    let specs: Vec<NicSpec> = record.nics().iter().map(NicSpec::from).collect();
    net::build_nics(&specs, record.nics(), others, None).map(drop).map_err(HostError::Conflict)
}

/// A VM's CPU cap and weight as the cgroup code takes them.
pub fn cpu_limits_of(r: &VmRecord) -> vmm_core::cpu_limits::Limits {
    vmm_core::cpu_limits::Limits { cap_percent: r.cpu_cap_percent, weight: r.cpu_weight }
}

/// Whether VM `r`'s CPU limits hold (none set: nothing to say): a running VM's as its start found them,
/// a stopped one's as they would be.
fn cpu_limits_text(r: &VmRecord, e: &Entry, cpu: &vmm_core::cpu_limits::CpuLimits) -> Option<String> {
    if r.cpu_cap_percent.is_none() && r.cpu_weight.is_none() {
        return None;
    }
    let state = match (&e.rt.cpu_limits, e.rt.pid) {
        (Some(running), Some(_)) => running.clone(),
        _ => cpu.describe().map(|how| format!("enforced through the {how} when it runs")),
    };
    Some(match state {
        Ok(how) => how,
        Err(why) => format!("not enforced: {why}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CdromRecord, CloudInitRecord, DiskRecord, ExtraDisk};

    #[test]
    fn drives_are_listed_in_the_engines_order() {
        let disk = |top: &str| ExtraDisk { format: DiskFormat::Raw, top: top.into(), below: None, size_bytes: 512 };
        let mut r = VmRecord {
            id: "v".into(),
            disk_bytes: 1024,
            disk: Some(DiskRecord { format: DiskFormat::Qcow2, top: "disk0.qcow2".into(), below: None }),
            extra_disks: vec![disk("a.img"), disk("b.img")],
            media: Some("x.iso".into()),
            extra_cdroms: vec![CdromRecord::default(), CdromRecord { media: Some("y.iso".into()) }],
            ..VmRecord::default()
        };
        let ids = |r: &VmRecord| drive_slots(r).into_iter().map(|(id, s)| format!("{id}={s:?}")).collect::<Vec<_>>();
        assert_eq!(
            ids(&r),
            [
                "disk0=Disk(0)",
                "disk1=Disk(1)",
                "disk2=Disk(2)",
                "cdrom0=Cdrom(0)",
                "cdrom1=Cdrom(1)",
                "cdrom2=Cdrom(2)"
            ]
        );
        // The cloud-init seed keeps its place right after the boot disk.
        r.cloud_init = Some(CloudInitRecord {
            hostname: "h".into(),
            user: "u".into(),
            ssh_authorized_keys: vec![],
            instance_id: "i".into(),
        });
        assert_eq!(ids(&r)[..4], ["disk0=Disk(0)", "disk1=Seed", "disk2=Disk(1)", "disk3=Disk(2)"]);
        let store =
            Store::open(&std::env::temp_dir().join(format!("portholed-drives-{}", std::process::id()))).unwrap();
        let d = drives(&r, &store);
        assert_eq!((d[2].size_bytes, d[2].format), (512, Some(DiskFormat::Raw)));
        assert_eq!(d[0].size_bytes, 1024);
        assert_eq!(d[4].media.as_deref(), Some("x.iso"));
        assert_eq!(d[5].media, None);
        assert_eq!(d[6].media.as_deref(), Some("y.iso"));
        // No disk at all: the CD/DVD drives only.
        r.disk = None;
        r.disk_bytes = 0;
        r.cloud_init = None;
        assert_eq!(ids(&r)[0], "cdrom0=Cdrom(0)");
    }
}

//! The host interface: what the window asks of a host, whatever kind it is. `portholed` (through
//! [`Client`], over its Unix socket or HTTPS) is one implementation; libvirt (the `porthole-libvirt` crate) is
//! another, and a cluster manager's HTTP API can be a third without the window changing.
//!
//! Every kind speaks this crate's types ([`Vm`], [`Image`], [`Task`], …): a host maps its own objects onto
//! them. What a kind of host cannot do is a [`HostError::Unsupported`] with the reason, and
//! [`Host::lacks`] says so before the user asks, so the window greys the feature with that reason.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::client::{Action, ClientError};
use crate::{
    AddDisk, CloneVm, CreateVm, DriveInfo, HostInfo, Identified, Image, IsoFacts, NicStatus, SerialOutput,
    SnapshotTree, Stats, TakeSnapshot, Task, UpdateVm, Vm,
};

/// A shared handle to a host.
pub type HostHandle = Arc<dyn Host>;

/// `upload_image`'s progress callback: bytes sent, bytes in all.
pub type Progress = Box<dyn Fn(u64, u64) + Send + Sync>;

/// The kinds of host the window knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// `portholed`, local or remote.
    Porthole,
    /// A libvirt connection (`qemu:///system`, `qemu+ssh://…`).
    Libvirt,
}

impl HostKind {
    pub fn name(self) -> &'static str {
        match self {
            HostKind::Porthole => "Porthole",
            HostKind::Libvirt => "libvirt",
        }
    }
}

/// Features some hosts lack; [`Host::lacks`] tells why for a given host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// Snapshot trees (take, revert, delete).
    Snapshots,
    /// Snapshots that keep the running machine's state.
    MemorySnapshots,
    /// Clones and templates.
    Clones,
    /// Suspend to disk (save the state and stop).
    Suspend,
    /// Adding and removing disks and CD/DVD drives.
    Drives,
    /// Per-drive and per-card rate limits, CPU caps and weights, the memory balloon.
    Limits,
    /// The serial console's lines and input.
    Serial,
    /// Small screenshots of running VMs.
    Screenshots,
    /// Long operations the host tracks (`/tasks`).
    Tasks,
    /// The host's own resource samples.
    HostStats,
    /// Identifying an ISO's OS from the host's osinfo database.
    OsDetection,
    /// Changing a VM's settings after it was created.
    Settings,
    /// Network cards' link state and forwards, and choosing a new VM's network.
    Networking,
    /// New VMs whose disk is a copy of a library image or grows from a cloud image.
    DiskImages,
    /// The VMs' graphical consoles.
    Console,
}

impl Feature {
    /// Every feature, for asking a host about each.
    pub const ALL: [Feature; 15] = [
        Feature::Snapshots,
        Feature::MemorySnapshots,
        Feature::Clones,
        Feature::Suspend,
        Feature::Drives,
        Feature::Limits,
        Feature::Serial,
        Feature::Screenshots,
        Feature::Tasks,
        Feature::HostStats,
        Feature::OsDetection,
        Feature::Settings,
        Feature::Networking,
        Feature::DiskImages,
        Feature::Console,
    ];
}

/// Why a call to a host failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A Porthole daemon's error (an API error keeps its status and refused fields).
    #[error(transparent)]
    Porthole(#[from] ClientError),
    /// The host refused or failed: its words, with what was being done.
    #[error("{0}")]
    Failed(String),
    /// This kind of host does not do that.
    #[error("{what}: not available on this host ({why})")]
    Unsupported { what: std::borrow::Cow<'static, str>, why: String },
}

impl HostError {
    /// A Porthole API error's refused fields (field name, why).
    pub fn fields(&self) -> &[crate::FieldError] {
        match self {
            HostError::Porthole(e) => e.fields(),
            _ => &[],
        }
    }

    /// The HTTP status of a Porthole API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            HostError::Porthole(e) => e.status(),
            _ => None,
        }
    }
}

fn unsupported<T>(host: &(impl Host + ?Sized), what: &'static str, feature: Feature) -> Result<T, HostError> {
    let why = host.lacks(feature).unwrap_or_else(|| format!("{} hosts do not offer it", host.kind().name()));
    Err(HostError::Unsupported { what: what.into(), why })
}

/// What the window can ask of a host. Methods a kind of host cannot serve keep their default, which refuses
/// with [`Host::lacks`]'s reason.
#[async_trait]
pub trait Host: Send + Sync {
    fn kind(&self) -> HostKind;

    /// Why this host lacks `feature` (shown as the greyed control's tooltip); `None` when it has it.
    fn lacks(&self, feature: Feature) -> Option<String>;

    /// A value that changes whenever the host reports a change of its VMs (libvirt's domain events), so the
    /// window refreshes at once instead of at its next poll; `None` for hosts that only answer polls.
    fn events(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// How often the window asks for the VM list and new samples (events still wake it at once).
    fn refresh_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }

    async fn host(&self) -> Result<HostInfo, HostError>;
    async fn list_vms(&self) -> Result<Vec<Vm>, HostError>;
    async fn vm(&self, id: &str) -> Result<Vm, HostError>;
    async fn create_vm(&self, vm: &CreateVm) -> Result<Vm, HostError>;
    async fn delete_vm(&self, id: &str) -> Result<(), HostError>;
    async fn action(&self, id: &str, action: Action) -> Result<Vm, HostError>;
    /// Asks the guest to shut down; the task ends when it did, or forces it off after `timeout_s`.
    async fn shutdown(&self, id: &str, timeout_s: u64) -> Result<Task, HostError>;
    /// Puts a library image in the VM's CD/DVD drive `drive` (`None`: the first), or ejects (`image` None).
    async fn change_drive_media(&self, id: &str, drive: Option<&str>, image: Option<&str>) -> Result<Vm, HostError>;
    async fn change_media(&self, id: &str, image: Option<&str>) -> Result<Vm, HostError> {
        self.change_drive_media(id, None, image).await
    }
    /// The VM's console: a connected stream carrying RFB.
    async fn open_console(&self, id: &str) -> Result<std::os::unix::net::UnixStream, HostError>;
    /// Resource samples of VM `id` newer than `since_ms` (one a second, or a minute with `minutes`).
    async fn stats(&self, id: &str, since_ms: u64, minutes: bool) -> Result<Stats, HostError>;
    /// The host's image library (ISOs and disk images).
    async fn images(&self) -> Result<Vec<Image>, HostError>;
    /// Uploads the file at `path` into the library as `name`.
    async fn upload_image(&self, name: &str, path: &Path, progress: Progress) -> Result<Image, HostError>;
    async fn delete_image(&self, name: &str) -> Result<(), HostError>;

    async fn task(&self, id: &str) -> Result<Task, HostError> {
        let _ = id;
        unsupported(self, "Following a task", Feature::Tasks)
    }
    async fn tasks(&self) -> Result<Vec<Task>, HostError> {
        unsupported(self, "Listing tasks", Feature::Tasks)
    }
    async fn cancel_task(&self, id: &str) -> Result<Task, HostError> {
        let _ = id;
        unsupported(self, "Cancelling a task", Feature::Tasks)
    }
    async fn update_vm(&self, id: &str, change: &UpdateVm) -> Result<Vm, HostError> {
        let _ = (id, change);
        unsupported(self, "Changing settings", Feature::Settings)
    }
    async fn snapshots(&self, id: &str) -> Result<SnapshotTree, HostError> {
        let _ = id;
        unsupported(self, "Snapshots", Feature::Snapshots)
    }
    async fn take_snapshot(&self, id: &str, take: &TakeSnapshot) -> Result<Task, HostError> {
        let _ = (id, take);
        unsupported(self, "Taking a snapshot", Feature::Snapshots)
    }
    async fn revert_snapshot(&self, id: &str, snapshot: &str, confirm: bool) -> Result<Task, HostError> {
        let _ = (id, snapshot, confirm);
        unsupported(self, "Reverting to a snapshot", Feature::Snapshots)
    }
    async fn delete_snapshot(&self, id: &str, snapshot: &str) -> Result<Task, HostError> {
        let _ = (id, snapshot);
        unsupported(self, "Deleting a snapshot", Feature::Snapshots)
    }
    async fn clone_vm(&self, id: &str, clone: &CloneVm) -> Result<Task, HostError> {
        let _ = (id, clone);
        unsupported(self, "Cloning", Feature::Clones)
    }
    async fn add_disk(&self, id: &str, disk: &AddDisk) -> Result<DriveInfo, HostError> {
        let _ = (id, disk);
        unsupported(self, "Adding a disk", Feature::Drives)
    }
    async fn remove_disk(&self, id: &str, drive: &str) -> Result<(), HostError> {
        let _ = (id, drive);
        unsupported(self, "Removing a disk", Feature::Drives)
    }
    async fn grow_disk(&self, id: &str, drive: &str, size_bytes: u64) -> Result<DriveInfo, HostError> {
        let _ = (id, drive, size_bytes);
        unsupported(self, "Growing a disk", Feature::Drives)
    }
    async fn add_cdrom(&self, id: &str, image: Option<&str>) -> Result<DriveInfo, HostError> {
        let _ = (id, image);
        unsupported(self, "Adding a CD/DVD drive", Feature::Drives)
    }
    async fn remove_cdrom(&self, id: &str, drive: &str) -> Result<(), HostError> {
        let _ = (id, drive);
        unsupported(self, "Removing a CD/DVD drive", Feature::Drives)
    }
    async fn set_disk_limits(&self, id: &str, drive: &str, limits: &crate::DiskLimits) -> Result<DriveInfo, HostError> {
        let _ = (id, drive, limits);
        unsupported(self, "Disk limits", Feature::Limits)
    }
    async fn set_nic_limits(
        &self,
        id: &str,
        nic: &str,
        limits: &crate::NicLimits,
    ) -> Result<crate::NicDefinition, HostError> {
        let _ = (id, nic, limits);
        unsupported(self, "Network limits", Feature::Limits)
    }
    async fn set_nic_link(&self, id: &str, nic: &str, up: bool) -> Result<NicStatus, HostError> {
        let _ = (id, nic, up);
        unsupported(self, "Link state", Feature::Networking)
    }
    /// The last `lines` lines the guest printed on its serial port.
    async fn serial(&self, id: &str, lines: usize) -> Result<SerialOutput, HostError> {
        let _ = (id, lines);
        unsupported(self, "The serial console", Feature::Serial)
    }
    async fn serial_input(&self, id: &str, text: &str) -> Result<(), HostError> {
        let _ = (id, text);
        unsupported(self, "Typing on the serial console", Feature::Serial)
    }
    /// A PNG of the VM's screen, `width` pixels wide.
    async fn screenshot(&self, id: &str, width: u32) -> Result<Vec<u8>, HostError> {
        let _ = (id, width);
        unsupported(self, "Screenshots", Feature::Screenshots)
    }
    async fn host_stats(&self, since_ms: u64, minutes: bool) -> Result<Stats, HostError> {
        let _ = (since_ms, minutes);
        unsupported(self, "Host samples", Feature::HostStats)
    }
    async fn identify_os(&self, facts: &IsoFacts) -> Result<Identified, HostError> {
        let _ = facts;
        unsupported(self, "OS detection", Feature::OsDetection)
    }
}

/// A Porthole daemon: every feature, each call one API request.
#[async_trait]
impl Host for crate::Client {
    fn kind(&self) -> HostKind {
        HostKind::Porthole
    }
    fn lacks(&self, _feature: Feature) -> Option<String> {
        None
    }
    async fn host(&self) -> Result<HostInfo, HostError> {
        Ok(crate::Client::host(self).await?)
    }
    async fn list_vms(&self) -> Result<Vec<Vm>, HostError> {
        Ok(crate::Client::list_vms(self).await?)
    }
    async fn vm(&self, id: &str) -> Result<Vm, HostError> {
        Ok(crate::Client::vm(self, id).await?)
    }
    async fn create_vm(&self, vm: &CreateVm) -> Result<Vm, HostError> {
        Ok(crate::Client::create_vm(self, vm).await?)
    }
    async fn delete_vm(&self, id: &str) -> Result<(), HostError> {
        Ok(crate::Client::delete_vm(self, id).await?)
    }
    async fn action(&self, id: &str, action: Action) -> Result<Vm, HostError> {
        Ok(crate::Client::action(self, id, action).await?)
    }
    async fn shutdown(&self, id: &str, timeout_s: u64) -> Result<Task, HostError> {
        Ok(crate::Client::shutdown(self, id, timeout_s).await?)
    }
    async fn change_drive_media(&self, id: &str, drive: Option<&str>, image: Option<&str>) -> Result<Vm, HostError> {
        Ok(crate::Client::change_drive_media(self, id, drive, image).await?)
    }
    async fn open_console(&self, id: &str) -> Result<std::os::unix::net::UnixStream, HostError> {
        let ticket = self.console_ticket(id).await?;
        // The local host hands out the VM's RFB socket: connect directly.
        if let Some(socket) = ticket.rfb_socket {
            return Ok(std::os::unix::net::UnixStream::connect(socket).map_err(ClientError::Io)?);
        }
        // A remote console: the WebSocket, bridged to a socket pair for a blocking RFB client.
        let mut ws = self.console_with_ticket(&ticket.path).await?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(ClientError::Io)?;
        theirs.set_nonblocking(true).map_err(ClientError::Io)?;
        let mut theirs = tokio::net::UnixStream::from_std(theirs).map_err(ClientError::Io)?;
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut ws, &mut theirs).await;
        });
        Ok(ours)
    }
    async fn stats(&self, id: &str, since_ms: u64, minutes: bool) -> Result<Stats, HostError> {
        Ok(crate::Client::stats(self, id, since_ms, minutes).await?)
    }
    async fn images(&self) -> Result<Vec<Image>, HostError> {
        Ok(crate::Client::images(self).await?)
    }
    async fn upload_image(&self, name: &str, path: &Path, progress: Progress) -> Result<Image, HostError> {
        Ok(crate::Client::upload_image(self, name, path, progress).await?)
    }
    async fn delete_image(&self, name: &str) -> Result<(), HostError> {
        Ok(crate::Client::delete_image(self, name).await?)
    }
    async fn task(&self, id: &str) -> Result<Task, HostError> {
        Ok(crate::Client::task(self, id).await?)
    }
    async fn tasks(&self) -> Result<Vec<Task>, HostError> {
        Ok(crate::Client::tasks(self).await?)
    }
    async fn cancel_task(&self, id: &str) -> Result<Task, HostError> {
        Ok(crate::Client::cancel_task(self, id).await?)
    }
    async fn update_vm(&self, id: &str, change: &UpdateVm) -> Result<Vm, HostError> {
        Ok(crate::Client::update_vm(self, id, change).await?)
    }
    async fn snapshots(&self, id: &str) -> Result<SnapshotTree, HostError> {
        Ok(crate::Client::snapshots(self, id).await?)
    }
    async fn take_snapshot(&self, id: &str, take: &TakeSnapshot) -> Result<Task, HostError> {
        Ok(crate::Client::take_snapshot(self, id, take).await?)
    }
    async fn revert_snapshot(&self, id: &str, snapshot: &str, confirm: bool) -> Result<Task, HostError> {
        Ok(crate::Client::revert_snapshot(self, id, snapshot, confirm).await?)
    }
    async fn delete_snapshot(&self, id: &str, snapshot: &str) -> Result<Task, HostError> {
        Ok(crate::Client::delete_snapshot(self, id, snapshot).await?)
    }
    async fn clone_vm(&self, id: &str, clone: &CloneVm) -> Result<Task, HostError> {
        Ok(crate::Client::clone_vm(self, id, clone).await?)
    }
    async fn add_disk(&self, id: &str, disk: &AddDisk) -> Result<DriveInfo, HostError> {
        Ok(crate::Client::add_disk(self, id, disk).await?)
    }
    async fn remove_disk(&self, id: &str, drive: &str) -> Result<(), HostError> {
        Ok(crate::Client::remove_disk(self, id, drive).await?)
    }
    async fn grow_disk(&self, id: &str, drive: &str, size_bytes: u64) -> Result<DriveInfo, HostError> {
        Ok(crate::Client::grow_disk(self, id, drive, size_bytes).await?)
    }
    async fn add_cdrom(&self, id: &str, image: Option<&str>) -> Result<DriveInfo, HostError> {
        Ok(crate::Client::add_cdrom(self, id, image).await?)
    }
    async fn remove_cdrom(&self, id: &str, drive: &str) -> Result<(), HostError> {
        Ok(crate::Client::remove_cdrom(self, id, drive).await?)
    }
    async fn set_disk_limits(&self, id: &str, drive: &str, limits: &crate::DiskLimits) -> Result<DriveInfo, HostError> {
        Ok(crate::Client::set_disk_limits(self, id, drive, limits).await?)
    }
    async fn set_nic_limits(
        &self,
        id: &str,
        nic: &str,
        limits: &crate::NicLimits,
    ) -> Result<crate::NicDefinition, HostError> {
        Ok(crate::Client::set_nic_limits(self, id, nic, limits).await?)
    }
    async fn set_nic_link(&self, id: &str, nic: &str, up: bool) -> Result<NicStatus, HostError> {
        Ok(crate::Client::set_nic_link(self, id, nic, up).await?)
    }
    async fn serial(&self, id: &str, lines: usize) -> Result<SerialOutput, HostError> {
        Ok(crate::Client::serial(self, id, lines).await?)
    }
    async fn serial_input(&self, id: &str, text: &str) -> Result<(), HostError> {
        Ok(crate::Client::serial_input(self, id, text).await?)
    }
    async fn screenshot(&self, id: &str, width: u32) -> Result<Vec<u8>, HostError> {
        Ok(crate::Client::screenshot(self, id, width).await?)
    }
    async fn host_stats(&self, since_ms: u64, minutes: bool) -> Result<Stats, HostError> {
        Ok(crate::Client::host_stats(self, since_ms, minutes).await?)
    }
    async fn identify_os(&self, facts: &IsoFacts) -> Result<Identified, HostError> {
        Ok(crate::Client::identify_os(self, facts).await?)
    }
}

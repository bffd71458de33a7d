//! Request and response bodies of the host API (`/api/v1`). Every body refuses unknown fields, so a typo in
//! a request is an error rather than a silently ignored setting.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, not running (never started, shut down, or powered off).
    Stopped,
    /// Its process is starting.
    Starting,
    Running,
    Paused,
    /// A graceful shutdown is in progress.
    Stopping,
    /// The guest crashed (triple fault, an instruction the hypervisor cannot emulate, …): its process keeps
    /// it, as QEMU does (vCPUs stopped; the console and screenshots still show its last screen), with the
    /// report in `crash`, until `poweroff` or `shutdown` ends it (then `stopped`) or `reset` reboots it.
    /// Without `crash`: its process ended on its own with an error or was killed; see `last_exit`.
    Crashed,
    /// Its running state (RAM, CPUs, devices) was saved to disk and its process ended ("suspend to disk");
    /// `start` resumes it exactly where it was.
    Suspended,
}

/// Why a VM's guest crashed, while its process keeps the crashed VM (see [`VmState::Crashed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrashReport {
    /// What the hypervisor saw, with the instruction pointer and the bytes there where known ("triple fault
    /// (the guest shut the CPU down) at rip=0x100468 … instruction bytes: 0f 0b …").
    pub reason: String,
    /// The last lines the guest printed on its serial console.
    #[serde(default)]
    pub serial_tail: Vec<String>,
}

/// How a VM's process last ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExitInfo {
    /// The process exit status, if known (a killed process has none).
    pub exit_code: Option<i32>,
    /// Why, in words ("the guest powered off", "killed by signal 9", …).
    pub reason: String,
    /// The last lines the guest printed on its serial console.
    #[serde(default)]
    pub serial_tail: Vec<String>,
}

/// A kernel the VM boots directly. Without one the VM boots its firmware (SeaBIOS) from its CD/DVD drive,
/// then its disk.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// A kernel from the image library (its name), or, for admins, an absolute path on the host.
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: String,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub vcpus: u32,
    /// The most vCPUs the VM can have: while it runs, `vcpus` can grow up to it (`UpdateVm::vcpus`; the
    /// guest is told through ACPI CPU hotplug). None: only the `vcpus` it started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    pub memory_mib: u64,
    /// Size of the VM's disk in bytes (0: none).
    pub disk_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// The image in the VM's CD/DVD drive, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<ExitInfo>,
    /// While `state` is `crashed` and the crashed VM is kept: why the guest crashed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<CrashReport>,
    /// Seconds since the VM's process started (running or paused VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<u64>,
    /// Free-form labels for grouping and search ("web", "test", …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// A VM booting its firmware: the firmware's latest word on booting ("Booting from DVD/CD...",
    /// "Boot failed: Could not read from CDROM (code 0004)", "No bootable device."). Only in
    /// `GET /vms/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_status: Option<String>,
    /// How the console's keyboard and pointer reach the guest: PS/2 only, or a virtio-input tablet and
    /// keyboard beside PS/2 (once the guest's driver is up, the pointer is absolute — the guest's cursor
    /// sits under the console's — and keys go to the virtio keyboard).
    #[serde(default)]
    pub input: InputMode,
    /// The display adapter: the Bochs std VGA (the guest picks its resolution) or virtio-vga (VGA for
    /// firmware and boot loaders, then virtio-gpu, whose monitor follows the console's size).
    #[serde(default)]
    pub vga: VgaMode,
    /// The guest agent channel: none, or the SPICE agent's port (the clipboard shared with the guest's
    /// `spice-vdagent`, and its desktop following the console's size).
    #[serde(default)]
    pub agent: AgentMode,
    /// The sound card: none, Intel HD Audio or virtio-sound (what the guest plays reaches the console).
    #[serde(default)]
    pub sound: SoundMode,
    /// A running VM with an agent port (`GET /vms/{id}`): whether the guest's agent is connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_connected: Option<bool>,
    /// A running VM with a virtio-gpu display (`GET /vms/{id}`): whether the guest's driver is up (the
    /// screen follows the console window: "Resize guest to window").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_follows: Option<bool>,
    /// A running VM with virtio input (`GET /vms/{id}`): whether the guest's tablet driver is up (the
    /// pointer is absolute) or not yet (the PS/2 mouse moves by deltas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absolute_pointer: Option<bool>,
    /// A running VM with virtio input (`GET /vms/{id}`): whether the console's keys go to the virtio
    /// keyboard (the guest's driver is up) or to the PS/2 keyboard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtio_keyboard: Option<bool>,
    /// A running VM with virtio input: the lock lights as its guest last set them on the virtio keyboard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_leds: Option<KeyboardLeds>,
    /// A virtio memory balloon (new VMs have one): the memory in use by the guest can shrink and grow while
    /// it runs (`UpdateVm::memory_target_mib`).
    #[serde(default)]
    pub balloon: bool,
    /// Only in `GET /vms/{id}` of a running VM with a balloon (and the reply to a `memory_target_mib`
    /// change): its target, what the guest has given, the guest's own view of its memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_balloon: Option<MemoryBalloon>,
    /// The most CPU the VM may use, in percent of one CPU (150: one and a half CPUs); none: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cap_percent: Option<u32>,
    /// The VM's share of CPU under contention, 1-10000 (100: the default share); none: the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// With a cap or a weight: whether the host enforces them, and how ("enforced in …"), or why not ("not
    /// enforced: …").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limits: Option<String>,
    /// The VM's network cards as defined (empty: no network).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicDefinition>,
    /// Only in `GET /vms/{id}` of a VM whose process runs: each network card as the VM process reports it
    /// (attached or why not, link, the guest's addresses, forwards in effect, counters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nic_status: Vec<NicStatus>,
    /// Only in `GET /vms/{id}` of a running VM: why `nic_status` is missing (the VM process did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic_status_error: Option<String>,
    /// The format of the VM's disk (absent: no disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_format: Option<DiskFormat>,
    /// Bytes the VM's own disk files take on the host (its image and snapshot overlays; a linked clone's
    /// base is not counted).
    #[serde(default)]
    pub disk_allocated_bytes: u64,
    /// A template: it cannot start; it is cloned (full or linked) into new VMs.
    #[serde(default)]
    pub template: bool,
    /// A linked clone: the id of the template (or VM) whose disk image this VM's disk is an overlay of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linked_to: Option<String>,
    /// A VM made from a cloud image: what its NoCloud seed says (the seed drive is read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitInfo>,
    /// Free text about the VM (at most [`MAX_DESCRIPTION`] bytes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The daemon starts the VM when it starts (with the host).
    #[serde(default)]
    pub autostart: bool,
    /// Firmware boot (no `boot` kernel): the kinds of drives tried, in order.
    #[serde(default = "default_boot_order")]
    pub boot_order: Vec<BootDevice>,
    /// Firmware boot: the firmware offers its boot menu (ESC at "Press ESC for boot menu").
    #[serde(default)]
    pub boot_menu: bool,
    /// The display's start-up resolution (absent: the engine's default, 1280x800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<DisplaySpec>,
    /// The VM's drives as the engine shows them to the guest, in its order: the boot disk `disk0`, the
    /// cloud-init seed, the other disks, then the CD/DVD drives `cdrom0`, `cdrom1`, … (see `POST
    /// /vms/{id}/disks` and `/cdroms`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drives: Vec<DriveInfo>,
    /// Changes accepted while the VM ran that apply at its next start (from power-on): their field names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_changes: Vec<String>,
    /// Those changes' values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<UpdateVm>,
}

/// How the console's keyboard and pointer reach a VM's guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InputMode {
    /// The PS/2 keyboard and mouse only (what firmware and boot loaders use).
    #[default]
    Ps2,
    /// A virtio-input tablet and keyboard beside PS/2, used once the guest's driver is up (the default for
    /// new VMs).
    Virtio,
}

impl InputMode {
    /// The word of `porthole-vmm --input`.
    pub fn as_str(self) -> &'static str {
        match self {
            InputMode::Ps2 => "ps2",
            InputMode::Virtio => "virtio",
        }
    }
}

/// The virtio-serial port name of the SPICE guest agent (`spice-vdagent`).
pub const SPICE_AGENT_PORT: &str = "com.redhat.spice.0";

/// A VM's guest agent channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    /// No agent channel.
    #[default]
    None,
    /// A virtio-serial port named `com.redhat.spice.0` for the guest's `spice-vdagent` (the default for
    /// new VMs): the clipboard (text) both ways with the console, monitor sizes for its desktop.
    Spice,
}

impl AgentMode {
    /// The word of `porthole-vmm --agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentMode::None => "none",
            AgentMode::Spice => "spice",
        }
    }
}

/// A VM's sound card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SoundMode {
    /// No sound card.
    #[default]
    None,
    /// Intel HD Audio with a line-out and line-in codec (the default for new VMs: every OS has a driver;
    /// Linux: snd_hda_intel).
    Hda,
    /// virtio-sound (Linux: snd_virtio, from 6.2): lighter, for guests that have its driver.
    Virtio,
}

impl SoundMode {
    /// The word of `porthole-vmm --sound`.
    pub fn as_str(self) -> &'static str {
        match self {
            SoundMode::None => "none",
            SoundMode::Hda => "hda",
            SoundMode::Virtio => "virtio",
        }
    }
}

/// A VM's display adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VgaMode {
    /// QEMU's "stdvga" (Bochs VBE): the guest picks its resolution.
    #[default]
    Std,
    /// virtio-vga: VGA and VBE for firmware and boot loaders, then virtio-gpu, whose monitor prefers the
    /// console's size and follows it (the default for new VMs).
    Virtio,
}

impl VgaMode {
    /// The word of `porthole-vmm --vga`.
    pub fn as_str(self) -> &'static str {
        match self {
            VgaMode::Std => "std",
            VgaMode::Virtio => "virtio",
        }
    }
}

/// The format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// QEMU's copy-on-write format: sparse, snapshots, linked clones (the default for new VMs).
    #[default]
    Qcow2,
    /// A plain byte-for-byte image.
    Raw,
}

/// `CreateVm::cloud_init`: what the NoCloud seed of a VM made from a cloud image tells cloud-init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInitSpec {
    /// The guest's hostname (a valid host name label).
    pub hostname: String,
    /// The user created in the guest (with sudo), who logs in with the keys.
    pub user: String,
    /// OpenSSH public keys (`ssh-ed25519 AAAA… comment`) authorized for `user`.
    pub ssh_authorized_keys: Vec<String>,
}

/// `Vm::cloud_init`: the seed's facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudInitInfo {
    pub hostname: String,
    pub user: String,
    /// cloud-init's instance id (new for each clone, so cloud-init runs again there).
    pub instance_id: String,
}

/// `POST /vms`. The smallest valid body is `{"name": "web1", "vcpus": 1, "memory_mib": 64}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Room for more vCPUs, added while the VM runs (see `Vm::max_vcpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Size of the disk created with the VM (sparse raw image), in GiB; 0 for none. Default 8.
    #[serde(default = "default_disk_gib")]
    pub disk_gib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// An image of the library to put in the CD/DVD drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
    /// An image of the library (raw or qcow2) for the VM's disk instead of an empty one: copied, or with
    /// `cloud_init`, used as the read-only base of a qcow2 overlay grown to `disk_gib` (when larger than the
    /// image). The library's image stays unchanged either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image: Option<String>,
    /// The format of the disk created with the VM. Default: qcow2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_format: Option<DiskFormat>,
    /// A VM from a cloud image (`disk_image` names it): a NoCloud seed (`cidata`) with this user, keys and
    /// hostname is attached as a read-only drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The VM's network cards. Absent: one `user` (NAT) card with an SSH forward from the first free host port
    /// in 2222-2299 (on 127.0.0.1) to the guest's port 22. `[]`: no network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<NicSpec>>,
    /// PS/2 input only, or a virtio-input tablet (an absolute pointer) and keyboard beside PS/2 (default:
    /// `virtio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputMode>,
    /// The display adapter (default: `virtio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vga: Option<VgaMode>,
    /// The guest agent channel (default: `spice` on Porthole hosts; none on libvirt hosts, whose QEMU cannot
    /// migrate its agent, so a running VM with one could not be snapshotted or saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentMode>,
    /// The sound card (default: `hda` on Porthole hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<SoundMode>,
    /// CPU cap in percent of one CPU (see `Vm::cpu_cap_percent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cap_percent: Option<u32>,
    /// CPU weight 1-10000 (see `Vm::cpu_weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
}

/// Default disk size of a new VM.
pub const DEFAULT_DISK_GIB: u64 = 8;

fn default_disk_gib() -> u64 {
    DEFAULT_DISK_GIB
}

impl CreateVm {
    /// The smallest request: a name, vCPUs and memory; everything else default.
    pub fn new(name: impl Into<String>, vcpus: u32, memory_mib: u64) -> Self {
        CreateVm {
            name: name.into(),
            vcpus,
            memory_mib,
            max_vcpus: None,
            disk_gib: DEFAULT_DISK_GIB,
            boot: None,
            media: None,
            disk_image: None,
            disk_format: None,
            cloud_init: None,
            tags: Vec::new(),
            nics: None,
            input: None,
            vga: None,
            agent: None,
            sound: None,
            cpu_cap_percent: None,
            cpu_weight: None,
        }
    }
}

/// A running VM's memory balloon. Sizes in MiB.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MemoryBalloon {
    /// The memory the host asks the guest to keep (the VM's memory less the balloon's target).
    pub target_mib: u64,
    /// The memory the guest keeps now (the VM's memory less what it has put in the balloon).
    pub actual_mib: u64,
    /// The least target accepted: 10% of the VM's memory, at least 128 MiB (at most all of it).
    pub floor_mib: u64,
    /// Whether the guest's balloon driver is up (until it is, a target waits).
    pub driver: bool,
    /// The guest's statistics, once its driver sent some: its total memory, what it could give to new work
    /// (Linux's MemAvailable) and what it does not use at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_total_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_available_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_free_mib: Option<u64>,
}

/// `PATCH /vms/{id}`: the fields to change. `name`, `tags`, `description` and `autostart` change at once; the
/// others change a running (or suspended) VM at its next start from power-on (`Vm::pending_changes`), except
/// the live ones: more `vcpus` up to `max_vcpus`, `disk_bytes`, `memory_target_mib` and the CPU limits.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The vCPUs. A running VM gets more at once when they fit under its `max_vcpus` (hot-added: the guest
    /// brings them online); fewer, or more than that, apply at its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// The most vCPUs the VM can have while it runs (0: no room beyond `vcpus`); applies at its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Replaces the boot source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
    /// Replaces the tags (any time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Replaces the network cards (a running VM's at its next start, but new port forwards of its user cards
    /// alone at once: each such card moves to a new passt; otherwise port forwards take effect when it
    /// starts). A card keeps its MAC address when the spec names its `id` and gives no `mac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<NicSpec>>,
    /// Marks the VM as a template (only while it is stopped) or back as a VM (refused while linked clones
    /// use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<bool>,
    /// Replaces the description (any time; at most [`MAX_DESCRIPTION`] bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Start the VM when the daemon starts (any time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// `true`: drop the kernel (`boot`) and boot the firmware (SeaBIOS) from the drives again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_boot: Option<bool>,
    /// Firmware boot order: `cdrom`, `disk` or both, each at most once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_order: Option<Vec<BootDevice>>,
    /// Offer the firmware's boot menu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_menu: Option<bool>,
    /// The display's start-up resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<DisplaySpec>,
    /// Grows the VM's disk to this many bytes (a multiple of 512; never smaller than it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Switches between PS/2 input only and the virtio-input tablet and keyboard beside PS/2 (applies at
    /// the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputMode>,
    /// Switches the display adapter between the std VGA and virtio-vga (applies at the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vga: Option<VgaMode>,
    /// Adds or removes the guest agent's port (applies at the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentMode>,
    /// Adds or removes the sound card (applies at the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<SoundMode>,
    /// The memory in use by the guest, in MiB, through its balloon: from the floor (10% of its memory, at
    /// least 128 MiB) to all of its memory. Only for a running VM with a balloon; applies at once and is not
    /// kept (a VM starts with all of its memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_target_mib: Option<u64>,
    /// The CPU cap in percent of one CPU, 1 to 100 × vCPUs; 0 removes it. Applies at once to a running VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_cap_percent: Option<u32>,
    /// The CPU weight, 1-10000; 0 goes back to the default. Applies at once to a running VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
}

// ---- VM settings (`PATCH /vms/{id}`): boot, display, drives, per-field errors ----

/// Longest VM description, in bytes.
pub const MAX_DESCRIPTION: usize = 4096;
/// The display resolutions the engine takes: widths 320-1920 in steps of 8, heights 200-1080.
pub const DISPLAY_WIDTHS: std::ops::RangeInclusive<u32> = 320..=1920;
pub const DISPLAY_HEIGHTS: std::ops::RangeInclusive<u32> = 200..=1080;

/// A kind of drive the firmware boots from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Cdrom,
    Disk,
}

impl BootDevice {
    pub fn as_str(self) -> &'static str {
        match self {
            BootDevice::Cdrom => "cdrom",
            BootDevice::Disk => "disk",
        }
    }
}

/// The firmware's boot order when none is set: the CD/DVD drive, then the disk.
pub fn default_boot_order() -> Vec<BootDevice> {
    vec![BootDevice::Cdrom, BootDevice::Disk]
}

/// The display's start-up resolution (the engine has one display model, a standard VGA with Bochs VBE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DisplaySpec {
    pub width: u32,
    pub height: u32,
}

/// What kind of drive a [`DriveInfo`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DriveKind {
    Disk,
    Cdrom,
}

/// One of a VM's drives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DriveInfo {
    /// The engine's name of the drive (`disk0`, `cdrom0`).
    pub id: String,
    pub kind: DriveKind,
    /// How the guest sees it ("virtio-blk", "SCSI CD-ROM (virtio-scsi)").
    pub bus: String,
    /// Disks: the image's format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Disks: the size the guest sees.
    #[serde(default)]
    pub size_bytes: u64,
    /// CD/DVD drives: the image in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    /// Disks: the rate limits (`PUT /vms/{id}/disks/{drive}/limits`); the engine enforces them itself, in
    /// the device, so they always hold.
    #[serde(default, skip_serializing_if = "DiskLimits::is_none")]
    pub limits: DiskLimits,
}

/// A disk's rate limits, per second (absent: none): operations and bytes, in total and per direction.
/// Requests over a limit wait in the device's queue, in order; nothing fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub riops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wiops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wbps: Option<u64>,
}

/// The most a disk limit may be.
pub const MAX_DISK_LIMIT: u64 = 1 << 40;

impl DiskLimits {
    pub fn is_none(&self) -> bool {
        *self == DiskLimits::default()
    }

    /// Each limit by its field name.
    pub fn named(&self) -> [(&'static str, Option<u64>); 6] {
        [
            ("iops", self.iops),
            ("riops", self.riops),
            ("wiops", self.wiops),
            ("bps", self.bps),
            ("rbps", self.rbps),
            ("wbps", self.wbps),
        ]
    }

    /// Why each field that cannot be is refused (0 stops the disk; above [`MAX_DISK_LIMIT`] is absurd).
    pub fn problems(&self) -> Vec<FieldError> {
        self.named()
            .into_iter()
            .filter_map(|(name, v)| match v {
                Some(0) => Some(FieldError {
                    field: name.into(),
                    message: "0 would stop the disk: give at least 1, or no limit".into(),
                }),
                Some(v) if v > MAX_DISK_LIMIT => {
                    Some(FieldError { field: name.into(), message: format!("at most {MAX_DISK_LIMIT}") })
                }
                _ => None,
            })
            .collect()
    }

    /// The engine's `--disk` options for these limits (`,iops=N,…`).
    pub fn engine_options(&self) -> String {
        self.named().into_iter().filter_map(|(n, v)| v.map(|v| format!(",{n}={v}"))).collect()
    }
}

/// Why one field of a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldError {
    /// The field's name in the request (`memory_mib`, `display`, `boot_order`).
    pub field: String,
    pub message: String,
}

// ---- end of VM settings ----

/// A snapshot of a VM: its disks at one moment, and with `with_state` its running machine too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub created_ms: u64,
    /// The snapshot this one was taken on top of (`None`: the first of its branch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The VM was running: RAM, CPUs and devices were saved too; reverting resumes it where it was.
    pub with_state: bool,
    /// Bytes this snapshot holds on the host (its disk layer and its saved state).
    pub size_bytes: u64,
}

/// `GET /vms/{id}/snapshots`: the tree, and where the VM's present ("Now") hangs in it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotTree {
    pub snapshots: Vec<Snapshot>,
    /// The snapshot the VM's present state was taken on or reverted to (`None`: no snapshot yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

/// `POST /vms/{id}/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TakeSnapshot {
    /// 1–63 letters, digits, spaces, `-`, `_`, `.` (no `/`); unique per VM.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// For a running VM: save its RAM and devices too (default true); false takes its disks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with_state: Option<bool>,
}

/// `POST /vms/{id}/snapshots/{snapshot}/revert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertSnapshot {
    /// Required for a running or paused VM, whose present state is lost: without it the revert is refused.
    #[serde(default)]
    pub confirm: bool,
}

/// `POST /vms/{id}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVm {
    pub name: String,
    /// A linked clone (a qcow2 overlay on the source's image, which becomes read-only while clones use it)
    /// rather than a full (sparse) copy.
    #[serde(default)]
    pub linked: bool,
}

/// How a network card reaches the outside.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum NicBackend {
    /// User-mode networking (NAT) through passt: the guest reaches whatever the host reaches, and port
    /// forwards bring host ports to the guest. Needs no privileges.
    User,
    /// A new TAP device attached to the host's existing bridge `bridge`: the guest is on that network (needs
    /// a daemon allowed to create TAP devices).
    Bridge { bridge: String },
    /// The host's TAP device `name` (created if missing).
    Tap { name: String },
}

impl NicBackend {
    pub fn kind(&self) -> NicBackendKind {
        match self {
            NicBackend::User => NicBackendKind::User,
            NicBackend::Bridge { .. } => NicBackendKind::Bridge,
            NicBackend::Tap { .. } => NicBackendKind::Tap,
        }
    }
}

/// The kind of a network card's back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NicBackendKind {
    User,
    Tap,
    Bridge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A host port whose traffic goes to a guest port (`user` cards only).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub protocol: Protocol,
    /// The host address the port is opened on. Default 127.0.0.1 (this computer only).
    #[serde(default = "default_host_address")]
    pub host_address: std::net::IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
    /// Chosen by the daemon (the SSH forward of a new VM): if another program holds the port when the VM
    /// starts, the daemon moves it to the next free port in 2222-2299.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub automatic: bool,
}

fn default_host_address() -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
}

impl PortForward {
    /// A TCP forward from 127.0.0.1:`host_port` to `guest_port`.
    pub fn tcp(host_port: u16, guest_port: u16) -> Self {
        PortForward {
            protocol: Protocol::Tcp,
            host_address: default_host_address(),
            host_port,
            guest_port,
            automatic: false,
        }
    }
}

/// Default MTU of a network card.
pub const DEFAULT_MTU: u32 = 1500;
/// Smallest and largest MTU.
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65520;
/// Most network cards a VM may have.
pub const MAX_NICS: usize = 8;
/// Most port forwards of one card.
pub const MAX_FORWARDS: usize = 32;
/// The host ports the daemon picks a new VM's SSH forward from.
pub const SSH_PORTS: std::ops::RangeInclusive<u16> = 2222..=2299;

fn default_mtu() -> u32 {
    DEFAULT_MTU
}

/// The lock lights of a VM's keyboard, as its guest set them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct KeyboardLeds {
    pub num_lock: bool,
    pub caps_lock: bool,
    pub scroll_lock: bool,
}

impl KeyboardLeds {
    /// From the PS/2 set-LEDs byte, which QEMU's RFB LED state pseudo-encoding carries as is: bit 0 Scroll
    /// Lock, bit 1 Num Lock, bit 2 Caps Lock (other bits ignored).
    pub fn from_led_state(bits: u8) -> Self {
        KeyboardLeds { scroll_lock: bits & 1 != 0, num_lock: bits & 2 != 0, caps_lock: bits & 4 != 0 }
    }

    /// The lights that are on, in words ("Caps Lock, Num Lock"), or "none".
    pub fn text(&self) -> String {
        let on: Vec<&str> =
            [(self.caps_lock, "Caps Lock"), (self.num_lock, "Num Lock"), (self.scroll_lock, "Scroll Lock")]
                .into_iter()
                .filter_map(|(on, name)| on.then_some(name))
                .collect();
        if on.is_empty() { "none".to_owned() } else { on.join(", ") }
    }
}

/// A network card's rate limits in bits per second (absent: none): `rx_bps` towards the guest (what it
/// downloads), `tx_bps` from it. Frames over a limit wait; TCP senders slow down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NicLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_bps: Option<u64>,
}

/// The least a card's limit may be: one full-size Ethernet frame (1514 bytes) a second.
pub const MIN_NIC_LIMIT: u64 = 8 * 1514;
/// The most a card's limit may be.
pub const MAX_NIC_LIMIT: u64 = 1 << 40;

impl NicLimits {
    pub fn is_none(&self) -> bool {
        *self == NicLimits::default()
    }

    /// Why each field that cannot be is refused.
    pub fn problems(&self) -> Vec<FieldError> {
        [("rx_bps", self.rx_bps), ("tx_bps", self.tx_bps)]
            .into_iter()
            .filter_map(|(name, v)| match v {
                Some(v) if v < MIN_NIC_LIMIT => Some(FieldError {
                    field: name.into(),
                    message: format!("at least {MIN_NIC_LIMIT} bit/s (one full-size frame a second), or no limit"),
                }),
                Some(v) if v > MAX_NIC_LIMIT => {
                    Some(FieldError { field: name.into(), message: format!("at most {MAX_NIC_LIMIT} bit/s") })
                }
                _ => None,
            })
            .collect()
    }
}

/// A network card as stored in the VM's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NicDefinition {
    /// `net0`, `net1`, …: the name the VM process and the link route use.
    pub id: String,
    pub backend: NicBackend,
    /// Generated once when the card is made (locally administered, unicast), then kept.
    pub mac: String,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<PortForward>,
    #[serde(default, skip_serializing_if = "NicLimits::is_none")]
    pub limits: NicLimits,
}

/// A network card in a request (`POST /vms`, `PATCH /vms/{id}`): what is left out is chosen by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Default: `netN`, N its position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub backend: NicBackend,
    /// `xx:xx:xx:xx:xx:xx`, unicast. Default: the card's current MAC (same `id`), else a new random
    /// locally administered one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 68-65520, default 1500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// `user` cards only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<PortForward>,
    /// Default: the card's current limits (same `id`), else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<NicLimits>,
}

impl NicSpec {
    /// A card of back end `backend`, everything else default.
    pub fn new(backend: NicBackend) -> Self {
        NicSpec { id: None, backend, mac: None, mtu: None, forwards: Vec::new(), limits: None }
    }
}

impl From<&NicDefinition> for NicSpec {
    /// The spec that keeps a card as it is (for editing it).
    fn from(d: &NicDefinition) -> Self {
        NicSpec {
            id: Some(d.id.clone()),
            backend: d.backend.clone(),
            mac: Some(d.mac.clone()),
            mtu: Some(d.mtu),
            forwards: d.forwards.clone(),
            limits: Some(d.limits),
        }
    }
}

/// A network card of a running VM as its process reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NicStatus {
    pub id: String,
    pub backend: NicBackendKind,
    pub mac: String,
    pub mtu: u32,
    /// Whether the back end runs; when not, `error` says why (the VM runs without this card's network).
    pub attached: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The virtual cable is plugged in.
    pub link_up: bool,
    /// The guest's driver has set the card up.
    #[serde(default)]
    pub driver_ready: bool,
    /// `tap`/`bridge`: the host's TAP device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The port forwards in effect.
    #[serde(default)]
    pub forwards: Vec<PortForward>,
    /// The guest's addresses, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// Towards the guest.
    #[serde(default)]
    pub rx_frames: u64,
    #[serde(default)]
    pub rx_bytes: u64,
    /// From the guest.
    #[serde(default)]
    pub tx_frames: u64,
    #[serde(default)]
    pub tx_bytes: u64,
    #[serde(default)]
    pub rx_dropped: u64,
    #[serde(default)]
    pub tx_dropped: u64,
    #[serde(default)]
    pub malformed: u64,
    /// The rate limits in effect.
    #[serde(default, skip_serializing_if = "NicLimits::is_none")]
    pub limits: NicLimits,
    /// Time frames waited for the limits, each way, in microseconds.
    #[serde(default)]
    pub rx_throttled_us: u64,
    #[serde(default)]
    pub tx_throttled_us: u64,
}

/// `POST /vms/{id}/nics/{nic}/link`: plug the running VM's virtual cable in (`up: true`) or pull it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkChange {
    pub up: bool,
}

/// Whether `mac` is `xx:xx:xx:xx:xx:xx` (hex) and unicast, not all zeros.
pub fn is_valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    let bytes: Option<Vec<u8>> = (parts.len() == 6)
        .then(|| parts.iter().map(|p| if p.len() == 2 { u8::from_str_radix(p, 16).ok() } else { None }).collect())
        .flatten();
    bytes.is_some_and(|b| b[0] & 1 == 0 && b.iter().any(|&x| x != 0))
}

/// `POST /vms/{id}/serial/input`: text typed into the VM's serial console (a running VM's COM1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SerialInput {
    /// At most 4000 bytes per request; a line ending is sent only if it is part of the text.
    pub text: String,
}

/// Longest `SerialInput::text`.
pub const SERIAL_INPUT_MAX: usize = 4000;

/// Most tags a VM may carry, and the longest tag.
pub const MAX_TAGS: usize = 16;
pub const MAX_TAG_LEN: usize = 32;

/// `POST /vms/{id}/media`: put an image of the library in a CD/DVD drive, or eject (`image: null`); live on a
/// running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MediaChange {
    pub image: Option<String>,
    /// The drive (`cdrom0`, `cdrom1`, …; absent: the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drive: Option<String>,
}

/// Most disks a VM may have (the cloud-init seed of a cloud image VM counts).
pub const MAX_DISKS: usize = 6;
/// Most CD/DVD drives a VM may have.
pub const MAX_CDROMS: usize = 4;
/// Most drives of every kind together (the engine's limit: each is a PCI device).
pub const MAX_DRIVES: usize = 8;
/// Largest disk, in GiB (64 TiB).
pub const MAX_DISK_GIB: u64 = 64 * 1024;

/// `POST /vms/{id}/disks` (a stopped VM without snapshots): a new empty disk of `size_gib` GiB, or a copy of
/// library image `image` (raw or qcow2; then `size_gib`, when given, grows the copy). The disk goes after
/// the VM's others (the first disk of a VM without one becomes its boot disk `disk0`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDisk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<u64>,
    /// The new disk's format (default qcow2; snapshots need qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// A library image to copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `POST /vms/{id}/disks/{drive}/size`: grows a disk (never shrinks it). A stopped VM's disk grows at once; a
/// running VM's boot disk at its next start (as `PATCH` `disk_bytes`); another disk of a running VM is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrowDisk {
    /// The new size in bytes (a multiple of 512).
    pub size_bytes: u64,
}

/// `POST /vms/{id}/cdroms` (a stopped VM): a new CD/DVD drive after the others, empty or with a library
/// image in it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddCdrom {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `POST /vms/{id}/console`: a one-shot ticket for `GET /api/v1/console?ticket=` (a WebSocket whose binary
/// frames carry the VM's RFB stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleTicket {
    pub ticket: String,
    /// Seconds the ticket stays valid (at most 30).
    pub expires_in_s: u64,
    /// The path to open, ticket included.
    pub path: String,
    /// Whether the console takes input (viewers get a view-only console).
    pub input: bool,
    /// On the local Unix socket only: the VM's RFB socket, for a direct connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rfb_socket: Option<String>,
}

/// `GET /vms/{id}/serial`: the last lines the guest printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SerialOutput {
    pub lines: Vec<String>,
}

/// One sample of a VM's resource use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatSample {
    /// Milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// CPU time of the VM's process over the interval, in percent of one CPU.
    pub cpu_percent: f64,
    /// Resident memory of the VM's process.
    pub memory_bytes: u64,
    pub disk_read_bps: f64,
    pub disk_write_bps: f64,
    /// Network bytes per second towards the guest (over every card).
    pub net_rx_bps: f64,
    /// Network bytes per second from the guest.
    pub net_tx_bps: f64,
}

/// `GET /vms/{id}/stats?since=T_MS&resolution=s|min`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// Seconds between samples (1: the last hour; 60: the last day).
    pub interval_s: u64,
    pub samples: Vec<StatSample>,
}

/// An image in the host's library (ISOs, kernels, initrds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub name: String,
    pub size_bytes: u64,
    pub sha256: String,
    /// What the file is, from its contents.
    #[serde(default)]
    pub format: ImageFormat,
    /// The disk size a guest sees (qcow2: from its header; otherwise the file's size).
    #[serde(default)]
    pub virtual_bytes: u64,
    /// Bytes the file takes on the host (sparse files take less than their size).
    #[serde(default)]
    pub allocated_bytes: u64,
    /// An ISO's volume identifiers and bootability (None for other formats).
    #[serde(default)]
    pub iso: Option<IsoFacts>,
    /// The OS on an ISO, as the host's osinfo-db identifies it (None: unknown, or no db).
    #[serde(default)]
    pub os: Option<DetectedOs>,
    /// The VMs that use the image (as a CD, a kernel or initrd, or the base of a disk), by name: an image in
    /// use cannot be deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}

/// The kind of a library image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// An ISO 9660 CD/DVD image.
    Iso,
    Qcow2,
    /// Anything else: a raw disk image, a kernel, an initrd.
    #[default]
    Raw,
}

/// A long operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub id: String,
    /// What it does ("upload debian.iso", "shutdown web1").
    pub what: String,
    pub state: TaskState,
    /// Bytes (or steps) done and expected, when it makes sense.
    pub done: u64,
    pub total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What a finished task made: the new snapshot's id, the clone's VM id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Whether `POST /tasks/{id}/cancel` can stop it while it runs (uploads; a shutdown's wait before the
    /// forced power-off).
    #[serde(default)]
    pub cancellable: bool,
    /// When it started, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub started_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    #[default]
    Running,
    Done,
    Failed,
    /// Stopped by `POST /tasks/{id}/cancel`.
    Cancelled,
}

/// Every error reply: a stable code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// `bad_request`, `invalid`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `too_large`,
    /// `internal`, …
    pub error: String,
    pub message: String,
    /// `invalid` (a request with fields that were refused): why each one was (nothing was changed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

/// Roles of API tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// List, stats, serial and view-only consoles.
    Viewer,
    /// Viewer + lifecycle, consoles with input, media.
    Operator,
    /// Everything: create, update, delete, images, tokens.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("role {s:?} is not admin, operator or viewer")),
        }
    }
}

/// What an ISO 9660 image says about itself: its primary volume descriptor's identifiers (trailing blanks
/// removed; blank ones absent) and whether its El Torito boot catalog boots on BIOS, UEFI or neither.
/// Read by [`crate::iso::read_facts`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IsoFacts {
    /// The volume id ("Debian 11.5.0 amd64 n"), the field OS detection mostly goes by.
    #[serde(default)]
    pub volume_id: Option<String>,
    #[serde(default)]
    pub system_id: Option<String>,
    #[serde(default)]
    pub publisher_id: Option<String>,
    #[serde(default)]
    pub application_id: Option<String>,
    /// The volume's size: its block count times its block size.
    #[serde(default)]
    pub volume_bytes: u64,
    /// The boot catalog has a bootable entry for PC BIOS (what Porthole's SeaBIOS firmware boots).
    #[serde(default)]
    pub bios_bootable: bool,
    /// The boot catalog has a bootable entry for UEFI.
    #[serde(default)]
    pub uefi_bootable: bool,
}

impl IsoFacts {
    /// Boots with UEFI but not with a PC BIOS: Porthole's firmware (SeaBIOS) cannot start it.
    pub fn uefi_only(&self) -> bool {
        self.uefi_bootable && !self.bios_bootable
    }
}

/// What an operating system needs or suggests (from osinfo-db's `<resources>`); absent where the db says
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OsResources {
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

/// The operating system an ISO holds, as libosinfo's database (osinfo-db) on the host identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DetectedOs {
    /// osinfo's entity id, a URI ("http://debian.org/debian/11").
    pub id: String,
    /// The canonical short id ("debian11").
    pub short_id: String,
    /// "Debian 11".
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub vendor: Option<String>,
    /// "linux", "winnt", "freebsd", …
    #[serde(default)]
    pub family: Option<String>,
    /// Below these the OS does not install or run well (a warning threshold).
    #[serde(default)]
    pub minimum: OsResources,
    /// What a new VM for this OS should get.
    #[serde(default)]
    pub recommended: OsResources,
}

/// `POST /osinfo/identify`'s reply: the OS the host's osinfo-db finds for the ISO facts sent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Identified {
    /// None: no entry of the db matches ("Unknown OS"), or there is no db.
    #[serde(default)]
    pub os: Option<DetectedOs>,
    /// The db's version (its `VERSION` file), None when the host has no osinfo-db.
    #[serde(default)]
    pub db_version: Option<String>,
    /// Why nothing could be detected, when that is not just an unknown ISO ("no osinfo-db on this host").
    #[serde(default)]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lights_in_words() {
        assert_eq!(KeyboardLeds::default().text(), "none");
        let l = KeyboardLeds { num_lock: true, caps_lock: true, scroll_lock: false };
        assert_eq!(l.text(), "Caps Lock, Num Lock");
    }
}

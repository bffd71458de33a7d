//! `VmConfig`: everything needed to build one VM, and its validation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::CMDLINE_MAX;

/// Fewest MiB of guest memory we accept: the kernel loads at 1 MiB and needs room above it.
pub const MIN_MEMORY_MIB: u64 = 4;
/// Most vCPUs a VM can have: xAPIC ids are 8 bits and 0xFF is the broadcast id.
pub const MAX_VCPUS: u32 = 254;

/// The description of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Name shown in logs and process titles.
    #[serde(default = "default_name")]
    pub name: String,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Most vCPUs the VM can have: above `vcpus`, the rest can be added while it runs (ACPI CPU hotplug,
    /// control socket `set-vcpus`). None: `vcpus`, nothing to add.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// A kernel booted directly (PVH or Linux boot protocol); exactly one of this and `firmware`.
    #[serde(default)]
    pub boot: Option<BootSource>,
    /// Firmware boot: SeaBIOS at the reset vector, booting from the CD/DVD drives and disks.
    #[serde(default)]
    pub firmware: Option<FirmwareConfig>,
    /// Where the guest's COM1 output goes (and, for stdio, where its input comes from).
    #[serde(default)]
    pub serial: SerialSink,
    /// Unix socket path of the control socket, if any.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// When the guest resets the machine, stop instead of rebooting it.
    #[serde(default)]
    pub no_reboot: bool,
    /// When the guest crashes (triple fault, emulation failure), end the process at once instead of keeping
    /// the crashed VM (its last screen and the crash report) until it is powered off.
    #[serde(default)]
    pub exit_on_crash: bool,
    /// How long a graceful `stop` waits for the guest before powering it off by force, in milliseconds.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// The screen: the graphics mode a Linux guest is started in (it can change it later).
    #[serde(default)]
    pub display: DisplayConfig,
    /// Where the console's RFB (VNC) server listens; none serves no console.
    #[serde(default)]
    pub vnc: Vec<crate::rfb::ListenAddress>,
    /// Where the console is served view-only: the screen, with keyboard and mouse input dropped.
    #[serde(default)]
    pub vnc_view_only: Vec<crate::rfb::ListenAddress>,
    /// A file whose first line is the VNC password (VncAuth); without it the console needs no password.
    #[serde(default)]
    pub vnc_password_file: Option<PathBuf>,
    /// Disks and removable drives (virtio-blk on PCI), in the order the guest finds them.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network cards (virtio-net on PCI), in the order the guest finds them.
    #[serde(default)]
    pub nics: Vec<crate::net::NicConfig>,
    /// The console's keyboard and pointer: PS/2 only, or virtio-input devices (a tablet and a keyboard)
    /// beside PS/2. `tablet: true|false`, from before, is read as `virtio`|`ps2`.
    #[serde(default, alias = "tablet", deserialize_with = "input_mode_or_tablet")]
    pub input: InputMode,
    /// The display adapter: the Bochs "std" VGA (resolution set by the guest), or virtio-vga (the same
    /// VGA and VBE for firmware and boot loaders, then virtio-gpu, whose monitor follows the console's
    /// size once the guest's driver is up).
    #[serde(default)]
    pub vga: VgaMode,
    /// A guest agent channel: none, or the SPICE agent's virtio-serial port (`com.redhat.spice.0`), which
    /// shares the clipboard with the console and follows the console's size on desktops whose display
    /// driver does not.
    #[serde(default)]
    pub agent: AgentMode,
    /// A sound card: none, an Intel HD Audio controller with a line-out/line-in codec (every OS has a
    /// driver; Linux: snd_hda_intel), or virtio-sound (one output and one input stream; Linux: snd_virtio,
    /// from 6.2); its output is what the console's listeners hear (QEMU's RFB audio extension).
    #[serde(default)]
    pub sound: SoundMode,
    /// A virtio memory balloon: the host can shrink and grow the guest's memory live (control socket
    /// `set-balloon`), down to [`crate::virtio::balloon::floor_mib`]; free pages the guest reports go back
    /// to the host.
    #[serde(default)]
    pub balloon: bool,
}

/// How the console's keyboard and pointer reach the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputMode {
    /// The PS/2 keyboard and mouse (i8042) only.
    #[default]
    Ps2,
    /// A virtio-input tablet and keyboard beside PS/2: once the guest's driver is up (Linux: virtio_input)
    /// the pointer is absolute (the guest's cursor sits under the console's, no grab needed) and keys go to
    /// the virtio keyboard; firmware and boot loaders keep PS/2.
    Virtio,
}

impl InputMode {
    pub fn as_str(self) -> &'static str {
        match self {
            InputMode::Ps2 => "ps2",
            InputMode::Virtio => "virtio",
        }
    }
}

impl std::fmt::Display for InputMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for InputMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ps2" => Ok(InputMode::Ps2),
            "virtio" => Ok(InputMode::Virtio),
            _ => Err(format!("input {s:?}: ps2 or virtio")),
        }
    }
}

/// Which guest agent channel the VM has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    /// No agent channel.
    #[default]
    None,
    /// A virtio-serial port named `com.redhat.spice.0` for the guest's `spice-vdagent`: the clipboard
    /// (UTF-8 text) both ways with the console, and monitor sizes for its desktop.
    Spice,
}

impl AgentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentMode::None => "none",
            AgentMode::Spice => "spice",
        }
    }
}

impl std::fmt::Display for AgentMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AgentMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(AgentMode::None),
            "spice" => Ok(AgentMode::Spice),
            _ => Err(format!("agent {s:?}: none or spice")),
        }
    }
}

/// Which sound card the VM has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SoundMode {
    /// No sound card.
    #[default]
    None,
    /// Intel HD Audio (ICH9, PCI 8086:293e) with a line-out and line-in codec: what every OS drives.
    Hda,
    /// virtio-sound: one output stream (heard on the console) and one input stream (silence).
    Virtio,
}

impl SoundMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SoundMode::None => "none",
            SoundMode::Hda => "hda",
            SoundMode::Virtio => "virtio",
        }
    }
}

impl std::fmt::Display for SoundMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SoundMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(SoundMode::None),
            "hda" => Ok(SoundMode::Hda),
            "virtio" => Ok(SoundMode::Virtio),
            _ => Err(format!("sound {s:?}: none, hda or virtio")),
        }
    }
}

/// Which display adapter the VM has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VgaMode {
    /// QEMU's "stdvga" (Bochs VBE, PCI 1234:1111): the guest picks its resolution.
    #[default]
    Std,
    /// virtio-vga (PCI 1af4:1050): VGA and Bochs VBE until the guest's virtio-gpu driver takes over; its
    /// monitor prefers the console's size and follows it (RFB SetDesktopSize).
    Virtio,
}

impl VgaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VgaMode::Std => "std",
            VgaMode::Virtio => "virtio",
        }
    }

    /// SeaBIOS's VGA BIOS for this adapter.
    pub fn vga_bios_name(self) -> &'static str {
        match self {
            VgaMode::Std => "vgabios-stdvga.bin",
            VgaMode::Virtio => "vgabios-virtio.bin",
        }
    }

    /// The fw_cfg file SeaBIOS finds the adapter's option ROM in (`pciVVVV,DDDD.rom`).
    pub fn rom_file(self) -> &'static str {
        match self {
            VgaMode::Std => "pci1234,1111.rom",
            VgaMode::Virtio => "pci1af4,1050.rom",
        }
    }
}

impl std::fmt::Display for VgaMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VgaMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "std" => Ok(VgaMode::Std),
            "virtio" => Ok(VgaMode::Virtio),
            _ => Err(format!("vga {s:?}: std or virtio")),
        }
    }
}

/// `"ps2"`/`"virtio"`, or the boolean of the older `tablet` field.
fn input_mode_or_tablet<'de, D: serde::Deserializer<'de>>(d: D) -> Result<InputMode, D::Error> {
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

/// Most drives a VM can have (each is a PCI device with its own interrupt line).
pub const MAX_DRIVES: usize = 8;
/// Longest drive serial number (virtio-blk's GET_ID answer).
pub const MAX_SERIAL: usize = 20;

/// A disk (a raw or qcow2 image on virtio-blk) or a CD/DVD drive (an ISO or nothing, on virtio-scsi; read-only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// The image; a removable drive may start empty.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub read_only: bool,
    /// Media can be attached and ejected while the VM runs (always so for a CD/DVD drive; a virtio-blk disk
    /// may be removable too: the guest is told through a configuration change).
    #[serde(default)]
    pub removable: bool,
    /// A CD/DVD-ROM drive (SCSI, on virtio-scsi) rather than a virtio-blk disk.
    #[serde(default)]
    pub cdrom: bool,
    /// What the guest reads as the serial number (up to 20 printable ASCII characters); by default the
    /// drive's id ("disk0", "cdrom0", …).
    #[serde(default)]
    pub serial: Option<String>,
    /// The image's format; by default the one its first bytes say (qcow2's magic, or raw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<crate::disk::ImageFormat>,
    /// A qcow2 image's backing chain as recorded by whoever made it, nearest first. Backing files named
    /// inside an image are never opened on the image's word.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backing: Vec<PathBuf>,
    /// Rate limits (operations and bytes a second, in total or per direction); none by default.
    #[serde(default, skip_serializing_if = "crate::rate_limiter::DiskLimits::is_none")]
    pub limits: crate::rate_limiter::DiskLimits,
}

impl std::str::FromStr for DriveConfig {
    type Err = ConfigError;

    /// Parses the `--disk` form: `PATH[,readonly][,removable][,serial=S][,format=raw|qcow2][,backing=P]…`
    /// `[,iops=N][,riops=N][,wiops=N][,bps=N][,rbps=N][,wbps=N]` (a removable disk may start empty:
    /// `,removable`; `backing=` once per layer, nearest first; limits per second).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        let mut drive = DriveConfig { path: (!path.is_empty()).then(|| PathBuf::from(path)), ..DriveConfig::default() };
        for option in parts {
            match option.split_once('=') {
                None if option == "readonly" || option == "ro" => drive.read_only = true,
                None if option == "removable" => drive.removable = true,
                Some(("serial", serial)) => drive.serial = Some(serial.to_owned()),
                Some(("format", f)) => {
                    drive.format = Some(f.parse().map_err(|()| ConfigError::DriveSpec(s.to_owned()))?)
                }
                Some(("backing", b)) if !b.is_empty() => drive.backing.push(PathBuf::from(b)),
                Some((name, value)) => match drive.limits.set_named(name, value) {
                    Ok(true) => {}
                    Ok(false) => return Err(ConfigError::DriveSpec(s.to_owned())),
                    Err(why) => return Err(ConfigError::DriveLimit { spec: s.to_owned(), why }),
                },
                _ => return Err(ConfigError::DriveSpec(s.to_owned())),
            }
        }
        if drive.path.is_none() && !drive.removable {
            return Err(ConfigError::DriveSpec(s.to_owned()));
        }
        if drive.removable {
            drive.read_only = true; // media swapped in are ISOs and other images, opened read-only
        }
        Ok(drive)
    }
}

impl DriveConfig {
    /// A CD/DVD drive holding `path` (or empty).
    pub fn cdrom(path: Option<PathBuf>) -> Self {
        DriveConfig { path, read_only: true, removable: true, cdrom: true, ..Default::default() }
    }
}

/// The ids the drives of a configuration get: "disk0", "disk1", … and "cdrom0", … for CD/DVD drives.
pub fn drive_ids(drives: &[DriveConfig]) -> Vec<String> {
    let (mut disks, mut cdroms) = (0, 0);
    drives
        .iter()
        .map(|d| {
            let (kind, n) = if d.cdrom { ("cdrom", &mut cdroms) } else { ("disk", &mut disks) };
            *n += 1;
            format!("{kind}{}", *n - 1)
        })
        .collect()
}

/// A kernel booted directly: a Linux bzImage (boot protocol 2.10 or later) or an ELF with a PVH entry note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
}

/// Firmware (BIOS) boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareConfig {
    /// The BIOS image (SeaBIOS's `bios.bin`: 128 or 256 KiB), mapped below 4 GiB with its last 128 KiB
    /// also below 1 MiB.
    pub bios: PathBuf,
    /// The VGA BIOS for the display (SeaBIOS's `vgabios-stdvga.bin`, or `vgabios-virtio.bin` for
    /// virtio-vga); by default the one next to `bios`.
    #[serde(default)]
    pub vga_bios: Option<PathBuf>,
    /// Where the firmware's debug console (port 0x402) is written.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Offer the boot menu ("Press ESC for boot menu").
    #[serde(default)]
    pub boot_menu: bool,
    /// Which kinds of drives to boot from, in order [default: CD/DVD, then disk].
    #[serde(default = "default_boot_order")]
    pub boot_order: Vec<BootDevice>,
}

/// A kind of drive the firmware may boot from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Cdrom,
    Disk,
}

fn default_boot_order() -> Vec<BootDevice> {
    vec![BootDevice::Cdrom, BootDevice::Disk]
}

impl std::str::FromStr for BootDevice {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cdrom" | "cd" | "dvd" => Ok(BootDevice::Cdrom),
            "disk" | "hd" => Ok(BootDevice::Disk),
            other => Err(ConfigError::BootDevice(other.to_owned())),
        }
    }
}

/// Where Debian's `seabios` package puts its images.
pub const SYSTEM_SEABIOS_DIR: &str = "/usr/share/seabios";

/// SeaBIOS's `bios.bin`: `PORTHOLE_SEABIOS_DIR`, else the system's (Debian's `seabios` package), else the
/// package unpacked into the cache (`~/.cache/porthole/seabios`, what `./x fetch-guests` fills).
pub fn find_seabios() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("PORTHOLE_SEABIOS_DIR") {
        dirs.push(d.into());
    }
    dirs.push(SYSTEM_SEABIOS_DIR.into());
    if let Some(home) = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
    {
        dirs.push(home.join("porthole/seabios/usr/share/seabios"));
    }
    dirs.into_iter().map(|d| d.join("bios.bin")).find(|p| p.is_file())
}

impl FirmwareConfig {
    /// SeaBIOS from `dir` (its `bios.bin` and `vgabios-stdvga.bin`).
    pub fn seabios(dir: &Path) -> Self {
        FirmwareConfig {
            bios: dir.join("bios.bin"),
            vga_bios: None,
            log: None,
            boot_menu: false,
            boot_order: default_boot_order(),
        }
    }

    /// The VGA BIOS to use for the adapter `vga`.
    pub fn vga_bios_path(&self, vga: VgaMode) -> PathBuf {
        self.vga_bios.clone().unwrap_or_else(|| self.bios.with_file_name(vga.vga_bios_name()))
    }
}

/// The screen's start-up graphics mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplayConfig {
    pub width: u32,
    pub height: u32,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        DisplayConfig { width: crate::display::DEFAULT_WIDTH, height: crate::display::DEFAULT_HEIGHT }
    }
}

/// Where COM1 output goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "path")]
pub enum SerialSink {
    /// The VMM's standard output; standard input feeds the guest.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded (still counted).
    #[default]
    None,
}

impl std::str::FromStr for SerialSink {
    type Err = ConfigError;

    /// Parses the command-line form: `stdio`, `file:PATH` or `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialSink::Stdio),
            "none" => Ok(SerialSink::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialSink::File(PathBuf::from(path))),
                _ => Err(ConfigError::SerialSink(s.to_owned())),
            },
        }
    }
}

fn default_name() -> String {
    "vm".to_owned()
}
fn default_vcpus() -> u32 {
    1
}
fn default_memory_mib() -> u64 {
    256
}
fn default_stop_timeout_ms() -> u64 {
    10_000
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("VM name {0:?} is invalid: use 1-63 letters, digits, '-', '_' or '.', not starting with '.'")]
    Name(String),
    #[error("nothing to boot: give a kernel or firmware")]
    NothingToBoot,
    #[error("a VM boots either a kernel directly or its firmware, not both")]
    KernelAndFirmware,
    #[error("the BIOS image {path:?} is {size} bytes; SeaBIOS images are 128 or 256 KiB")]
    BiosSize { path: PathBuf, size: u64 },
    #[error("boot device {0:?} is unknown: use cdrom or disk")]
    BootDevice(String),
    #[error("a VM needs at least 1 vCPU")]
    NoVcpus,
    #[error("{asked} vCPUs asked for, but at most {max} are supported here")]
    TooManyVcpus { asked: u32, max: u32 },
    #[error("a maximum of {max} vCPUs is fewer than the {vcpus} the VM starts with")]
    MaxBelowVcpus { vcpus: u32, max: u32 },
    #[error("{0} MiB of memory is too little: a VM needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("{asked} MiB of memory asked for, but this host has only {host} MiB")]
    MemoryTooLarge { asked: u64, host: u64 },
    #[error("{what} {path:?} cannot be used: {reason}")]
    File { what: &'static str, path: PathBuf, reason: String },
    #[error("the kernel command line is {0} bytes long; at most {max} fit", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("serial sink {0:?} is not one of stdio, file:PATH, none")]
    SerialSink(String),
    #[error(
        "display {width}x{height} is not supported: widths 320-{max_w} in steps of 8, heights 200-{max_h}",
        max_w = crate::display::MAX_WIDTH,
        max_h = crate::display::MAX_HEIGHT
    )]
    Display { width: u32, height: u32 },
    #[error("a VNC password was given without a VNC listen address (--vnc)")]
    PasswordWithoutVnc,
    #[error("configuration file {path:?}: {reason}")]
    ConfigFile { path: PathBuf, reason: String },
    #[error(
        "drive {0:?} is not PATH[,readonly][,removable][,serial=S][,format=raw|qcow2][,backing=PATH]...\
         [,iops=N][,riops=N][,wiops=N][,bps=N][,rbps=N][,wbps=N]"
    )]
    DriveSpec(String),
    #[error("drive {spec:?}: {why}")]
    DriveLimit { spec: String, why: String },
    #[error("network: {0}")]
    Net(#[from] crate::net::NetError),
    #[error("{0} drives asked for; at most {MAX_DRIVES} are supported")]
    TooManyDrives(usize),
    #[error("drive {0} has no image (only a removable drive may start empty)")]
    DriveWithoutImage(String),
    #[error("drive {drive}: serial {serial:?} must be at most {MAX_SERIAL} printable ASCII characters")]
    DriveSerial { drive: String, serial: String },
}

/// Whether `name` is a valid VM name (1–63 of `[A-Za-z0-9._-]`, not starting with `.`).
pub fn is_valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File { what, path: path.to_owned(), reason };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn check_image(id: &str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        what: "disk image",
        path: path.to_owned(),
        reason: format!("{id}: {reason}"),
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(err("not a regular file or block device".into()));
    }
    Ok(())
}

/// Physical memory of this host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            name: default_name(),
            vcpus: default_vcpus(),
            max_vcpus: None,
            memory_mib: default_memory_mib(),
            boot: Some(BootSource { kernel: kernel.into(), initrd: None, cmdline: String::new() }),
            firmware: None,
            serial: SerialSink::None,
            control_socket: None,
            no_reboot: false,
            exit_on_crash: false,
            stop_timeout_ms: default_stop_timeout_ms(),
            display: DisplayConfig::default(),
            vnc: Vec::new(),
            vnc_view_only: Vec::new(),
            vnc_password_file: None,
            drives: Vec::new(),
            nics: Vec::new(),
            input: InputMode::Ps2,
            vga: VgaMode::Std,
            agent: AgentMode::None,
            sound: SoundMode::None,
            balloon: false,
        }
    }

    /// Reads a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::ConfigFile { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// How many vCPUs the VM can have (`max_vcpus`, else `vcpus`).
    pub fn possible_vcpus(&self) -> u32 {
        self.max_vcpus.unwrap_or(self.vcpus).max(self.vcpus)
    }

    /// Checks everything that can be checked before touching KVM. `max_vcpus` is what KVM allows here.
    pub fn validate(&self, max_vcpus: u32) -> Result<(), ConfigError> {
        if !is_valid_name(&self.name) {
            return Err(ConfigError::Name(self.name.clone()));
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        let max = max_vcpus.min(MAX_VCPUS);
        if self.vcpus > max {
            return Err(ConfigError::TooManyVcpus { asked: self.vcpus, max });
        }
        if let Some(most) = self.max_vcpus {
            if most < self.vcpus {
                return Err(ConfigError::MaxBelowVcpus { vcpus: self.vcpus, max: most });
            }
            if most > max {
                return Err(ConfigError::TooManyVcpus { asked: most, max });
            }
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        // (A configuration file's limits come without the `--disk` parser's checks.)
        for d in &self.drives {
            d.limits.check().map_err(|why| ConfigError::DriveLimit {
                spec: d.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                why,
            })?;
        }
        if let Some(host) = host_memory_mib()
            && self.memory_mib > host
        {
            return Err(ConfigError::MemoryTooLarge { asked: self.memory_mib, host });
        }
        match (&self.boot, &self.firmware) {
            (Some(boot), None) => {
                check_file("kernel", &boot.kernel)?;
                if let Some(initrd) = &boot.initrd {
                    check_file("initrd", initrd)?;
                }
                if boot.cmdline.len() >= CMDLINE_MAX {
                    return Err(ConfigError::CmdlineTooLong(boot.cmdline.len()));
                }
                if boot.cmdline.contains('\0') {
                    return Err(ConfigError::CmdlineNul);
                }
            }
            (None, Some(fw)) => {
                check_file("BIOS image", &fw.bios)?;
                let size = std::fs::metadata(&fw.bios).map(|m| m.len()).unwrap_or(0);
                if !(size == 128 << 10 || size == 256 << 10) {
                    return Err(ConfigError::BiosSize { path: fw.bios.clone(), size });
                }
                check_file("VGA BIOS", &fw.vga_bios_path(self.vga))?;
                if fw.boot_order.is_empty() {
                    return Err(ConfigError::BootDevice(String::new()));
                }
            }
            (None, None) => return Err(ConfigError::NothingToBoot),
            (Some(_), Some(_)) => return Err(ConfigError::KernelAndFirmware),
        }
        let (w, h) = (self.display.width, self.display.height);
        if !(320..=crate::display::MAX_WIDTH).contains(&w)
            || !(200..=crate::display::MAX_HEIGHT).contains(&h)
            || w % 8 != 0
        {
            return Err(ConfigError::Display { width: w, height: h });
        }
        if let Some(path) = &self.vnc_password_file {
            if self.vnc.is_empty() && self.vnc_view_only.is_empty() {
                return Err(ConfigError::PasswordWithoutVnc);
            }
            crate::rfb::password_key(path).map_err(|e| ConfigError::File {
                what: "VNC password file",
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        if self.drives.len() > MAX_DRIVES {
            return Err(ConfigError::TooManyDrives(self.drives.len()));
        }
        crate::net::validate_nics(&self.nics)?;
        for (drive, id) in self.drives.iter().zip(drive_ids(&self.drives)) {
            match &drive.path {
                Some(path) => check_image(&id, path)?,
                None if drive.removable => {}
                None => return Err(ConfigError::DriveWithoutImage(id)),
            }
            if let Some(serial) = &drive.serial
                && (serial.len() > MAX_SERIAL || !serial.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
            {
                return Err(ConfigError::DriveSerial { drive: id, serial: serial.clone() });
            }
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_kernel() -> (VmConfig, tempfile_path::TempFile) {
        let file = tempfile_path::TempFile::new(b"kernel");
        (VmConfig::new(file.path()), file)
    }

    /// A tiny temporary file, removed on drop (no extra crate needed).
    mod tempfile_path {
        use std::path::{Path, PathBuf};
        pub struct TempFile(PathBuf);
        impl TempFile {
            pub fn new(bytes: &[u8]) -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "porthole-config-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, bytes).unwrap();
                TempFile(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults_validate() {
        let (config, _f) = config_with_kernel();
        assert_eq!(config.validate(8), Ok(()));
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        let (base, _f) = config_with_kernel();
        let mut c = base.clone();
        c.vcpus = 0;
        assert_eq!(c.validate(8), Err(ConfigError::NoVcpus));
        c.vcpus = 9;
        assert_eq!(c.validate(8), Err(ConfigError::TooManyVcpus { asked: 9, max: 8 }));
        c.vcpus = 2;
        c.max_vcpus = Some(1);
        assert_eq!(c.validate(8), Err(ConfigError::MaxBelowVcpus { vcpus: 2, max: 1 }));
        c.max_vcpus = Some(9);
        assert_eq!(c.validate(8), Err(ConfigError::TooManyVcpus { asked: 9, max: 8 }));
        c.max_vcpus = Some(8);
        assert_eq!(c.validate(8), Ok(()));
        assert_eq!(c.possible_vcpus(), 8);
        c.max_vcpus = None;
        assert_eq!(c.possible_vcpus(), 2);
        let mut c = base.clone();
        c.memory_mib = 0;
        assert_eq!(c.validate(8), Err(ConfigError::MemoryTooSmall(0)));
        c.memory_mib = u64::MAX >> 20;
        assert!(matches!(c.validate(8), Err(ConfigError::MemoryTooLarge { .. })));
        let mut c = base.clone();
        c.boot.as_mut().unwrap().kernel = "/nonexistent/kernel".into();
        let err = c.validate(8).unwrap_err();
        assert!(err.to_string().contains("No such file"), "{err}");
        let mut c = base.clone();
        c.boot.as_mut().unwrap().kernel = "/".into();
        assert!(c.validate(8).unwrap_err().to_string().contains("not a regular file"));
        let mut c = base.clone();
        c.boot.as_mut().unwrap().cmdline = "x".repeat(CMDLINE_MAX);
        assert_eq!(c.validate(8), Err(ConfigError::CmdlineTooLong(CMDLINE_MAX)));
        let mut c = base.clone();
        c.display.width = 4000;
        assert!(matches!(c.validate(8), Err(ConfigError::Display { .. })));
        c.display.width = 1021;
        assert!(matches!(c.validate(8), Err(ConfigError::Display { .. })));
        let mut c = base;
        c.name = "../etc".into();
        assert!(matches!(c.validate(8), Err(ConfigError::Name(_))));
    }

    #[test]
    fn drives_parse_and_validate() {
        let (base, f) = config_with_kernel();
        let d: DriveConfig = "/a.img,readonly,serial=XY-1".parse().unwrap();
        assert_eq!(
            d,
            DriveConfig {
                path: Some("/a.img".into()),
                read_only: true,
                removable: false,
                cdrom: false,
                serial: Some("XY-1".into()),
                ..Default::default()
            }
        );
        let d: DriveConfig = "/o.qcow2,format=qcow2,backing=/m.qcow2,backing=/b.img".parse().unwrap();
        assert_eq!(d.format, Some(crate::disk::ImageFormat::Qcow2));
        assert_eq!(d.backing, [PathBuf::from("/m.qcow2"), PathBuf::from("/b.img")]);
        assert!("/o.img,format=vmdk".parse::<DriveConfig>().is_err());
        assert!("/o.img,backing=".parse::<DriveConfig>().is_err());
        assert!("".parse::<DriveConfig>().is_err());
        let empty: DriveConfig = ",removable".parse().unwrap();
        assert_eq!((empty.path, empty.removable, empty.read_only, empty.cdrom), (None, true, true, false));
        assert!("/a.img,rw=1".parse::<DriveConfig>().is_err());
        let limited: DriveConfig = "/a.img,iops=100,wbps=1048576".parse().unwrap();
        assert_eq!(
            limited.limits,
            crate::rate_limiter::DiskLimits { iops: Some(100), wbps: Some(1 << 20), ..Default::default() }
        );
        let e = "/a.img,riops=0".parse::<DriveConfig>().unwrap_err().to_string();
        assert!(e.contains("riops=0 would stop the disk"), "{e}");
        assert!("/a.img,bps=fast".parse::<DriveConfig>().unwrap_err().to_string().contains("whole number"));
        let mut c = base.clone();
        let image = f.path().to_owned();
        c.drives = vec![DriveConfig { path: Some(image.clone()), ..Default::default() }, DriveConfig::cdrom(None)];
        assert_eq!(c.validate(8), Ok(()));
        assert_eq!(drive_ids(&c.drives), ["disk0", "cdrom0"]);
        c.drives.push(DriveConfig::default());
        assert_eq!(c.validate(8), Err(ConfigError::DriveWithoutImage("disk1".into())));
        c.drives[2] = DriveConfig { path: Some("/nonexistent.img".into()), ..Default::default() };
        assert!(c.validate(8).unwrap_err().to_string().contains("disk1: No such file"));
        c.drives[2] = DriveConfig { path: Some(image), serial: Some("x".repeat(21)), ..Default::default() };
        assert!(matches!(c.validate(8), Err(ConfigError::DriveSerial { .. })));
        c.drives = vec![DriveConfig::cdrom(None); MAX_DRIVES + 1];
        assert_eq!(c.validate(8), Err(ConfigError::TooManyDrives(MAX_DRIVES + 1)));
    }

    #[test]
    fn names() {
        for good in ["a", "web1", "db_2.prod", "A-b", &"x".repeat(63)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(64), "é"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn serial_sink_parses_the_command_line_form() {
        assert_eq!("stdio".parse(), Ok(SerialSink::Stdio));
        assert_eq!("none".parse(), Ok(SerialSink::None));
        assert_eq!("file:/tmp/x".parse(), Ok(SerialSink::File("/tmp/x".into())));
        assert!("file:".parse::<SerialSink>().is_err());
        assert!("tcp:1".parse::<SerialSink>().is_err());
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let (c, _f) = config_with_kernel();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), c);
        let minimal: VmConfig = serde_json::from_str(r#"{"boot":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(minimal.vcpus, 1);
        assert!(serde_json::from_str::<VmConfig>(r#"{"boot":{"kernel":"/k"},"bogus":1}"#).is_err());
    }

    /// `input` is `ps2` (the default) or `virtio`; the older `tablet` boolean still reads.
    #[test]
    fn the_input_mode_and_the_older_tablet_field() {
        let parse = |extra: &str| serde_json::from_str::<VmConfig>(&format!(r#"{{"boot":{{"kernel":"/k"}}{extra}}}"#));
        assert_eq!(parse("").unwrap().input, InputMode::Ps2);
        assert_eq!(parse(r#","input":"virtio""#).unwrap().input, InputMode::Virtio);
        assert_eq!(parse(r#","input":"ps2""#).unwrap().input, InputMode::Ps2);
        assert_eq!(parse(r#","tablet":true"#).unwrap().input, InputMode::Virtio);
        assert_eq!(parse(r#","tablet":false"#).unwrap().input, InputMode::Ps2);
        assert!(parse(r#","input":"usb""#).is_err());
        let mut c = parse("").unwrap();
        c.input = InputMode::Virtio;
        assert!(serde_json::to_string(&c).unwrap().contains(r#""input":"virtio""#));
        assert_eq!("virtio".parse::<InputMode>(), Ok(InputMode::Virtio));
        assert!("PS2".parse::<InputMode>().is_err());
    }
}

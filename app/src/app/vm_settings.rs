//! The *Settings* view of a VM (opened from its details): General (name, description, tags, autostart),
//! Hardware (vCPUs, memory; a running VM's memory in use by the guest, set at once through its balloon), Disks (a row per disk with its bus, format and size; the boot disk's size in the
//! form, the others grown and removed on their row; a new empty disk or a copy of a library image added), CD/DVD
//! (a row per drive: insert, eject, remove; a drive added), Boot (firmware with its boot order and menu, or a
//! kernel; the display's resolution) and Network (the details' network cards section). *Apply* sends one
//! `PATCH /vms/{id}` with what changed; the host checks every field and a refusal puts each field's reason
//! under its widget. On a running VM the hardware, boot and display changes wait for its next start, and the
//! view says which do; disks grow at once, running or not (the guest is told). Drives are added and removed
//! through their own calls, on a stopped VM only (the engine has no hot-plug); media change at once.

use std::collections::BTreeMap;

use porthole_api::{
    AddDisk, AgentMode, BootDevice, BootSpec, DiskFormat, DiskLimits, DisplaySpec, DriveKind, ImageFormat, InputMode,
    MemoryBalloon, SoundMode, UpdateVm, VgaMode, Vm, VmState,
};

use super::clones::human_bytes;
use super::theme;
use super::{PortholeApp, parse_tags, tag_problem};

const GIB: u64 = 1 << 30;

/// The form's values (text where the user types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub name: String,
    pub description: String,
    /// Comma-separated.
    pub tags: String,
    pub autostart: bool,
    pub vcpus: String,
    /// The most vCPUs the VM can have while it runs (empty: no room beyond `vcpus`).
    pub max_vcpus: String,
    pub memory_mib: String,
    /// The disk's size in GiB (empty: no disk).
    pub disk_gib: String,
    /// Boots its firmware (SeaBIOS) rather than a kernel.
    pub firmware: bool,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub boot_order: Vec<BootDevice>,
    pub boot_menu: bool,
    /// `WIDTHxHEIGHT` (empty: the engine's default).
    pub resolution: String,
    /// PS/2 input only, or a virtio-input tablet (absolute pointer) and keyboard beside PS/2.
    pub input: InputMode,
    /// The display adapter: the std VGA or virtio-vga.
    pub vga: VgaMode,
    /// The guest agent's port (the clipboard shared with spice-vdagent).
    pub agent: AgentMode,
    /// The sound card.
    pub sound: SoundMode,
    /// CPU cap in percent of one CPU (empty: none) and weight (empty: the default).
    pub cpu_cap: String,
    pub cpu_weight: String,
}

fn gib_text(bytes: u64) -> String {
    if bytes == 0 {
        String::new()
    } else if bytes.is_multiple_of(GIB) {
        (bytes / GIB).to_string()
    } else {
        format!("{:.2}", bytes as f64 / GIB as f64)
    }
}

impl Fields {
    /// The form of `vm` with its pending changes (what it will have at its next start).
    pub fn of(vm: &Vm) -> Fields {
        let p = vm.pending.clone().unwrap_or_default();
        let boot = if p.firmware_boot == Some(true) { None } else { p.boot.clone().or_else(|| vm.boot.clone()) };
        Fields {
            name: vm.name.clone(),
            description: vm.description.clone(),
            tags: vm.tags.join(", "),
            autostart: vm.autostart,
            vcpus: p.vcpus.unwrap_or(vm.vcpus).to_string(),
            max_vcpus: p.max_vcpus.or(vm.max_vcpus).filter(|&m| m != 0).map(|m| m.to_string()).unwrap_or_default(),
            memory_mib: p.memory_mib.unwrap_or(vm.memory_mib).to_string(),
            disk_gib: gib_text(p.disk_bytes.unwrap_or(vm.disk_bytes)),
            firmware: boot.is_none(),
            kernel: boot.as_ref().map(|b| b.kernel.clone()).unwrap_or_default(),
            initrd: boot.as_ref().and_then(|b| b.initrd.clone()).unwrap_or_default(),
            cmdline: boot.as_ref().map(|b| b.cmdline.clone()).unwrap_or_default(),
            boot_order: p.boot_order.unwrap_or_else(|| vm.boot_order.clone()),
            boot_menu: p.boot_menu.unwrap_or(vm.boot_menu),
            resolution: p.display.or(vm.display).map(|d| format!("{}x{}", d.width, d.height)).unwrap_or_default(),
            input: p.input.unwrap_or(vm.input),
            vga: p.vga.unwrap_or(vm.vga),
            agent: p.agent.unwrap_or(vm.agent),
            sound: p.sound.unwrap_or(vm.sound),
            cpu_cap: vm.cpu_cap_percent.map(|c| c.to_string()).unwrap_or_default(),
            cpu_weight: vm.cpu_weight.map(|w| w.to_string()).unwrap_or_default(),
        }
    }
}

/// The request that turns `base` into `new` (only what changed), or the form's own objections by field.
pub fn request(base: &Fields, new: &Fields) -> Result<UpdateVm, BTreeMap<String, String>> {
    let mut u = UpdateVm::default();
    let mut errors = BTreeMap::new();
    let mut refuse = |field: &str, why: &str| {
        errors.insert(field.to_owned(), why.to_owned());
    };
    if new.name.trim() != base.name {
        u.name = Some(new.name.trim().to_owned());
    }
    if new.description != base.description {
        u.description = Some(new.description.clone());
    }
    let tags = parse_tags(&new.tags);
    if tags != parse_tags(&base.tags) {
        match tags.iter().find_map(|t| tag_problem(t)) {
            Some(p) => refuse("tags", &p),
            None => u.tags = Some(tags),
        }
    }
    if new.autostart != base.autostart {
        u.autostart = Some(new.autostart);
    }
    if new.vcpus.trim() != base.vcpus {
        match new.vcpus.trim().parse() {
            Ok(v) => u.vcpus = Some(v),
            Err(_) => refuse("vcpus", "Give a whole number of vCPUs."),
        }
    }
    if new.max_vcpus.trim() != base.max_vcpus {
        match new.max_vcpus.trim() {
            "" => u.max_vcpus = Some(0),
            text => match text.parse() {
                Ok(m) => u.max_vcpus = Some(m),
                Err(_) => refuse("max_vcpus", "Give a whole number of vCPUs, or nothing for no room to add more."),
            },
        }
    }
    if new.memory_mib.trim() != base.memory_mib {
        match new.memory_mib.trim().parse() {
            Ok(m) => u.memory_mib = Some(m),
            Err(_) => refuse("memory_mib", "Give the memory in MiB, a whole number."),
        }
    }
    if new.disk_gib.trim() != base.disk_gib {
        match parse_gib(&new.disk_gib) {
            Some(bytes) => u.disk_bytes = Some(bytes),
            None => refuse("disk_bytes", "Give the size in GiB, e.g. 20."),
        }
    }
    let kernel_changed = new.kernel != base.kernel || new.initrd != base.initrd || new.cmdline != base.cmdline;
    if new.firmware && !base.firmware {
        u.firmware_boot = Some(true);
    } else if !new.firmware && (base.firmware || kernel_changed) {
        if new.kernel.trim().is_empty() {
            refuse("boot", "Name the kernel: an image of the host's library.");
        } else {
            u.boot = Some(BootSpec {
                kernel: new.kernel.trim().to_owned(),
                initrd: Some(new.initrd.trim().to_owned()).filter(|i| !i.is_empty()),
                cmdline: new.cmdline.clone(),
            });
        }
    }
    if new.boot_order != base.boot_order {
        u.boot_order = Some(new.boot_order.clone());
    }
    if new.boot_menu != base.boot_menu {
        u.boot_menu = Some(new.boot_menu);
    }
    if new.input != base.input {
        u.input = Some(new.input);
    }
    if new.vga != base.vga {
        u.vga = Some(new.vga);
    }
    if new.agent != base.agent {
        u.agent = Some(new.agent);
    }
    if new.sound != base.sound {
        u.sound = Some(new.sound);
    }
    // CPU limits: empty removes (0 in the request).
    for (text, old, field, slot) in [
        (&new.cpu_cap, &base.cpu_cap, "cpu_cap_percent", &mut u.cpu_cap_percent),
        (&new.cpu_weight, &base.cpu_weight, "cpu_weight", &mut u.cpu_weight),
    ] {
        if text.trim() == old.trim() {
            continue;
        }
        match text.trim() {
            "" => *slot = Some(0),
            t => match t.parse::<u32>() {
                Ok(v) if v > 0 => *slot = Some(v),
                _ => refuse(field, "Give a whole number above 0, or nothing."),
            },
        }
    }
    if new.resolution.trim() != base.resolution {
        let parsed = new
            .resolution
            .trim()
            .split_once(['x', 'X'])
            .and_then(|(w, h)| Some(DisplaySpec { width: w.trim().parse().ok()?, height: h.trim().parse().ok()? }));
        match parsed {
            Some(d) => u.display = Some(d),
            None => refuse("display", "Give WIDTHxHEIGHT, e.g. 1280x800."),
        }
    }
    if errors.is_empty() { Ok(u) } else { Err(errors) }
}

/// The memory a running VM's guest should keep, as typed (MiB): from the balloon's floor to the VM's memory.
pub fn balloon_target(text: &str, b: &MemoryBalloon, memory_mib: u64) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(t) if (b.floor_mib..=memory_mib).contains(&t) => Ok(t),
        _ => Err(format!("Give MiB from {} (the floor) to {memory_mib}.", b.floor_mib)),
    }
}

/// What the balloon row says of a running VM's memory: what the guest keeps now (and the target while it is
/// not there), then the guest's own view once its driver sends statistics.
pub fn balloon_text(b: &MemoryBalloon) -> String {
    let mut text = if !b.driver {
        format!("{} MiB; the guest has no balloon driver (virtio_balloon) up", b.actual_mib)
    } else if b.actual_mib == b.target_mib {
        format!("{} MiB in use by the guest", b.actual_mib)
    } else {
        format!("{} MiB in use by the guest, going to {} MiB", b.actual_mib, b.target_mib)
    };
    if let (Some(avail), Some(total)) = (b.guest_available_mib, b.guest_total_mib) {
        text.push_str(&format!("; the guest has {avail} MiB available of {total} MiB"));
    }
    text
}

/// Parses a disk size in GiB as the form takes it (a positive number up to 1 PiB) into whole sectors.
fn parse_gib(text: &str) -> Option<u64> {
    match text.trim().parse::<f64>() {
        // At most 1 Pi (the host refuses more than 64 TiB with its reason); the bytes then fit easily.
        Ok(g) if g.is_finite() && g > 0.0 && g <= (1u64 << 20) as f64 => {
            Some(((g * GIB as f64) as u64).div_ceil(512) * 512)
        }
        _ => None,
    }
}

/// The Disks and CD/DVD sections' own state: the new disk's values, the sizes typed for growing, the drive
/// whose removal waits for a confirmation, and the answer to the last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveForm {
    /// The new disk is a copy of a library image (else new and empty).
    pub from_image: bool,
    /// The new empty disk's size in GiB.
    pub new_gib: String,
    pub new_format: DiskFormat,
    /// The library image to copy.
    pub image: String,
    /// The sizes typed for growing, by drive id.
    pub grow: BTreeMap<String, String>,
    /// The rate limits typed, by drive id: (IOPS, read MiB/s, write MiB/s), and the limits they were made from.
    pub limits: BTreeMap<String, (LimitFields, DiskLimits)>,
    /// The drive whose *Remove* waits for a confirmation.
    pub confirm: Option<String>,
    /// The last change's outcome (what was done, or why the host refused).
    pub message: Option<Result<String, String>>,
    /// A change was sent; its answer has not come yet.
    pub waiting: bool,
}

impl Default for DriveForm {
    fn default() -> Self {
        DriveForm {
            from_image: false,
            new_gib: "10".into(),
            new_format: DiskFormat::Qcow2,
            image: String::new(),
            grow: BTreeMap::new(),
            limits: BTreeMap::new(),
            confirm: None,
            message: None,
            waiting: false,
        }
    }
}

impl DriveForm {
    /// The request that adds the disk the form describes, or the form's objection.
    pub fn add_request(&self) -> Result<AddDisk, String> {
        if self.from_image {
            if self.image.is_empty() {
                return Err("Choose a library image to copy.".into());
            }
            return Ok(AddDisk { size_gib: None, format: Some(self.new_format), image: Some(self.image.clone()) });
        }
        match self.new_gib.trim().parse::<u64>() {
            Ok(g) if g > 0 => Ok(AddDisk { size_gib: Some(g), format: Some(self.new_format), image: None }),
            _ => Err("Give the new disk's size in whole GiB, e.g. 10.".into()),
        }
    }
}

/// The icon of growing a disk.
const GROW: egui_material_icons::MaterialIcon = egui_material_icons::icons::ICON_OPEN_IN_FULL;

/// A change of the VM's drives asked for in the view.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DriveAction {
    AddDisk(AddDisk),
    RemoveDisk(String),
    Grow(String, u64),
    Limits(String, DiskLimits),
    AddCdrom,
    RemoveCdrom(String),
    Media(String, Option<String>),
}

/// A disk's limits as the Settings view edits them: operations a second, and MiB a second each way (the
/// API's other limits are kept as they are).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitFields {
    pub iops: String,
    pub read_mib: String,
    pub write_mib: String,
}

const MIB: u64 = 1 << 20;

impl LimitFields {
    pub fn of(l: &DiskLimits) -> LimitFields {
        let mib = |v: Option<u64>| {
            v.map(|b| if b % MIB == 0 { (b / MIB).to_string() } else { format!("{:.2}", b as f64 / MIB as f64) })
        };
        LimitFields {
            iops: l.iops.map(|v| v.to_string()).unwrap_or_default(),
            read_mib: mib(l.rbps).unwrap_or_default(),
            write_mib: mib(l.wbps).unwrap_or_default(),
        }
    }

    /// The limits these fields make of `old` (its other limits kept), or what is wrong.
    pub fn limits(&self, old: &DiskLimits) -> Result<DiskLimits, String> {
        let iops = match self.iops.trim() {
            "" => None,
            t => {
                Some(t.parse::<u64>().ok().filter(|&v| v > 0).ok_or("IOPS: give a whole number above 0, or nothing.")?)
            }
        };
        let mib = |t: &str, what: &str| -> Result<Option<u64>, String> {
            match t.trim() {
                "" => Ok(None),
                t => match t.parse::<f64>() {
                    Ok(v) if v.is_finite() && v > 0.0 && v <= 1048576.0 => Ok(Some(((v * MIB as f64) as u64).max(1))),
                    _ => Err(format!("{what}: give MiB a second above 0, or nothing.")),
                },
            }
        };
        Ok(DiskLimits {
            iops,
            rbps: mib(&self.read_mib, "Read MiB/s")?,
            wbps: mib(&self.write_mib, "Write MiB/s")?,
            ..*old
        })
    }
}

/// A disk's limits in words ("at most 200 IOPS, 1.0 MiB/s written").
pub fn limits_text(l: &DiskLimits) -> String {
    let parts: Vec<String> = l
        .named()
        .into_iter()
        .filter_map(|(name, v)| {
            let v = v?;
            Some(match name {
                "iops" => format!("{v} IOPS"),
                "riops" => format!("{v} reads/s"),
                "wiops" => format!("{v} writes/s"),
                "bps" => format!("{} /s", human_bytes(v)),
                "rbps" => format!("{} read/s", human_bytes(v)),
                _ => format!("{} written/s", human_bytes(v)),
            })
        })
        .collect();
    format!("at most {}", parts.join(", "))
}

fn format_text(f: Option<DiskFormat>) -> &'static str {
    match f {
        Some(DiskFormat::Qcow2) => "qcow2",
        Some(DiskFormat::Raw) => "raw",
        None => "",
    }
}

/// The words for the host's names of pending changes.
pub fn pending_text(names: &[String]) -> String {
    let words: Vec<&str> = names
        .iter()
        .map(|n| match n.as_str() {
            "vcpus" => "vCPUs",
            "max_vcpus" => "most vCPUs",
            "memory_mib" => "memory",
            "boot" => "kernel boot",
            "firmware_boot" => "firmware boot",
            "boot_order" => "boot order",
            "boot_menu" => "boot menu",
            "display" => "resolution",
            "disk_bytes" => "disk size",
            "nics" => "network cards",
            "input" => "input devices",
            "vga" => "display adapter",
            "agent" => "guest agent",
            "cpu_cap_percent" => "CPU cap",
            "cpu_weight" => "CPU weight",
            other => other,
        })
        .collect();
    words.join(", ")
}

fn order_text(order: &[BootDevice]) -> &'static str {
    match order {
        [BootDevice::Cdrom, BootDevice::Disk] => "CD/DVD, then disk",
        [BootDevice::Disk, BootDevice::Cdrom] => "Disk, then CD/DVD",
        [BootDevice::Cdrom] => "CD/DVD only",
        [BootDevice::Disk] => "Disk only",
        _ => "other",
    }
}

/// The Settings view's state: the VM it edits, the values it started from and the edited ones, and the
/// reasons the form or the host gave for refusing fields.
#[derive(Debug, Clone)]
pub struct SettingsForm {
    pub host: usize,
    pub vm: String,
    base: Fields,
    pub fields: Fields,
    /// Why each refused field was refused (by the form, or by the host on *Apply*).
    pub errors: BTreeMap<String, String>,
    /// A refusal that names no field.
    error: Option<String>,
    /// *Apply* was sent; the answer has not come yet.
    waiting: bool,
    /// The library image picked for the CD/DVD drives.
    iso: String,
    /// The Disks and CD/DVD sections' state.
    pub drives: DriveForm,
    /// A running VM's memory target as typed (empty: unchanged), and why the form refuses it.
    pub balloon_target: String,
    balloon_error: Option<String>,
}

impl SettingsForm {
    pub fn new(host: usize, vm: &Vm) -> Self {
        let fields = Fields::of(vm);
        SettingsForm {
            host,
            vm: vm.id.clone(),
            base: fields.clone(),
            fields,
            errors: BTreeMap::new(),
            error: None,
            waiting: false,
            iso: String::new(),
            drives: DriveForm::default(),
            balloon_target: String::new(),
            balloon_error: None,
        }
    }

    /// Whether the user changed anything.
    pub fn edited(&self) -> bool {
        self.fields != self.base
    }

    /// Follows `vm` as the host reports it: unedited fields take its new values.
    fn follow(&mut self, vm: &Vm) {
        let now = Fields::of(vm);
        if now != self.base && !self.edited() && !self.waiting {
            self.base = now.clone();
            self.fields = now;
        }
    }
}

/// Adds a grid row: `label`, then the widget `add` makes (labelled by it) with `field`'s error under it.
fn row(
    ui: &mut egui::Ui,
    label: &str,
    errors: &BTreeMap<String, String>,
    field: &str,
    add: impl FnOnce(&mut egui::Ui) -> egui::Response,
) {
    let l = ui.label(label);
    ui.vertical(|ui| {
        add(ui).labelled_by(l.id);
        if let Some(e) = errors.get(field) {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    });
    ui.end_row();
}

/// A grid row of a check box: `label`, then the box (named by its own text) with `field`'s error under it.
fn check_row(
    ui: &mut egui::Ui,
    label: &str,
    errors: &BTreeMap<String, String>,
    field: &str,
    value: &mut bool,
    text: &str,
) {
    ui.label(label);
    ui.vertical(|ui| {
        ui.checkbox(value, text);
        if let Some(e) = errors.get(field) {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    });
    ui.end_row();
}

fn section(ui: &mut egui::Ui, title: &str) {
    ui.add_space(8.0);
    ui.strong(title);
    ui.separator();
}

impl PortholeApp {
    /// Opens the Settings view of `vm` (in place of its details).
    pub(super) fn open_settings(&mut self, host: usize, vm: &Vm) {
        self.vm_settings = Some(SettingsForm::new(host, vm));
        self.backend.load_images(host);
    }

    /// Whether the Settings view of VM `id` of host `host` is open.
    pub(super) fn settings_open(&self, host: usize, id: &str) -> bool {
        self.vm_settings.as_ref().is_some_and(|f| f.host == host && f.vm == id)
    }

    /// The Settings view of `vm`.
    pub(super) fn settings_view(&mut self, ui: &mut egui::Ui, host: usize, vm: &Vm) {
        let outcome = {
            let mut m = self.backend.model();
            match &m.settings_outcome {
                Some((h, id, _)) if *h == host && *id == vm.id => m.settings_outcome.take().map(|o| o.2),
                _ => None,
            }
        };
        let drive_outcome = {
            let mut m = self.backend.model();
            match &m.drive_outcome {
                Some((h, id, _)) if *h == host && *id == vm.id => m.drive_outcome.take().map(|o| o.2),
                _ => None,
            }
        };
        let (images, disk_images): (Vec<String>, Vec<String>) = {
            let m = self.backend.model();
            let list = m.images.get(&host).map(Vec::as_slice).unwrap_or_default();
            let of = |f: &dyn Fn(ImageFormat) -> bool| {
                list.iter().filter(|i| f(i.format)).map(|i| i.name.clone()).collect::<Vec<_>>()
            };
            (of(&|f| f == ImageFormat::Iso), of(&|f| matches!(f, ImageFormat::Raw | ImageFormat::Qcow2)))
        };
        let running_now = matches!(vm.state, VmState::Running | VmState::Paused);
        // A running VM's balloon, from its `GET /vms/{id}`, refreshed every 2 s while the view is open.
        let balloon = running_now
            .then(|| {
                let m = self.backend.model();
                let d = m.details.as_ref().filter(|(h, id, _)| *h == host && *id == vm.id);
                d.and_then(|(_, _, d)| d.memory_balloon.clone())
            })
            .flatten();
        if running_now && vm.balloon {
            if self.details_fetched.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(2)) {
                self.backend.load_details(host, vm.id.clone());
                self.details_fetched = Some(std::time::Instant::now());
            }
            ui.ctx().request_repaint_after(std::time::Duration::from_secs(2));
        }
        let Some(form) = self.vm_settings.as_mut() else { return };
        if let Some(outcome) = drive_outcome {
            if outcome.is_ok() {
                form.drives.grow.clear();
                form.drives.confirm = None;
            }
            form.drives.message = Some(outcome);
            form.drives.waiting = false;
        }
        match outcome {
            Some(Ok(changed)) => {
                let fields = Fields::of(&changed);
                form.base = fields.clone();
                form.fields = fields;
                form.errors.clear();
                form.error = None;
                form.waiting = false;
            }
            Some(Err(refusal)) => {
                form.errors = refusal.fields.iter().map(|f| (f.field.clone(), f.message.clone())).collect();
                form.error = refusal.fields.is_empty().then_some(refusal.message);
                form.waiting = false;
            }
            None => form.follow(vm),
        }
        let running = !matches!(vm.state, VmState::Stopped) || vm.crash.is_some();
        let (mut close, mut apply, mut revert) = (false, false, false);
        let mut action: Option<DriveAction> = None;
        let mut upload = false;
        ui.horizontal(|ui| {
            ui.heading(format!("Settings of {}", vm.name));
        });
        ui.horizontal(|ui| {
            close = theme::button(ui, true, theme::CLOSE, "Back to details").clicked();
            apply = theme::button(ui, form.edited() && !form.waiting, theme::SAVE, "Apply").clicked();
            revert = theme::button(ui, form.edited(), theme::REVERT, "Revert").clicked();
            if form.waiting {
                ui.spinner();
            }
        });
        if running {
            ui.label(
                "The VM is running: name, description, tags, autostart, disk sizes and the CD/DVD change at once; \
                 hardware, boot, display and network card changes apply at next start.",
            );
        }
        if !vm.pending_changes.is_empty() {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("Pending, applies at next start: {}", pending_text(&vm.pending_changes)),
            );
        }
        if let Some(e) = &form.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        let errors = form.errors.clone();
        let (target_text, target_error) = (&mut form.balloon_target, &mut form.balloon_error);
        let mut set_target = None;
        let f = &mut form.fields;

        section(ui, "General");
        egui::Grid::new("settings-general").num_columns(2).show(ui, |ui| {
            row(ui, "Name", &errors, "name", |ui| ui.text_edit_singleline(&mut f.name));
            row(ui, "Description", &errors, "description", |ui| {
                ui.add(egui::TextEdit::multiline(&mut f.description).desired_rows(3).hint_text("what the VM is for"))
            });
            row(ui, "Tags", &errors, "tags", |ui| {
                ui.add(egui::TextEdit::singleline(&mut f.tags).hint_text("web, prod"))
            });
            check_row(ui, "Autostart", &errors, "autostart", &mut f.autostart, "Start with the host");
        });

        section(ui, "Hardware");
        egui::Grid::new("settings-hardware").num_columns(2).show(ui, |ui| {
            let live_room =
                vm.max_vcpus.filter(|&m| m > vm.vcpus && matches!(vm.state, VmState::Running | VmState::Paused));
            row(ui, "vCPUs", &errors, "vcpus", |ui| {
                let field = ui.add(egui::TextEdit::singleline(&mut f.vcpus).desired_width(80.0));
                match live_room {
                    Some(max) => {
                        ui.weak(format!("More, up to {max}, are added to the running VM at once"));
                        field.on_hover_text(format!(
                            "The guest brings added vCPUs online; fewer, or more than {max}, apply at the next start."
                        ))
                    }
                    None => field,
                }
            });
            row(ui, "Most vCPUs", &errors, "max_vcpus", |ui| {
                ui.add(egui::TextEdit::singleline(&mut f.max_vcpus).hint_text("no more").desired_width(80.0))
                    .on_hover_text(
                        "Room for vCPUs added while the VM runs (ACPI CPU hotplug): up to this many. Applies at the \
                         next start.",
                    )
            });
            row(ui, "Memory (MiB)", &errors, "memory_mib", |ui| {
                ui.add(egui::TextEdit::singleline(&mut f.memory_mib).desired_width(80.0))
            });
            if let Some(b) = &balloon {
                let l = ui.label("Memory in use by the guest (balloon)");
                ui.vertical(|ui| {
                    ui.horizontal(|ui| {
                        ui.add(
                            egui::TextEdit::singleline(target_text)
                                .hint_text(b.target_mib.to_string())
                                .desired_width(80.0),
                        )
                        .labelled_by(l.id)
                        .on_hover_text(format!(
                            "The memory the guest keeps, from {} MiB to {} MiB; the balloon takes the rest. Applies \
                             at once; the VM starts with all of its memory again.",
                            b.floor_mib, vm.memory_mib
                        ));
                        ui.label("MiB");
                        if theme::button(ui, !target_text.trim().is_empty(), theme::SAVE, "Set").clicked() {
                            match balloon_target(target_text, b, vm.memory_mib) {
                                Ok(t) => {
                                    set_target = Some(t);
                                    target_text.clear();
                                    *target_error = None;
                                }
                                Err(e) => *target_error = Some(e),
                            }
                        }
                    });
                    ui.weak(balloon_text(b));
                    if let Some(e) = target_error.as_ref().or(errors.get("memory_target_mib")) {
                        ui.colored_label(ui.visuals().error_fg_color, e);
                    }
                });
                ui.end_row();
            }
            row(ui, "CPU cap (% of one CPU)", &errors, "cpu_cap_percent", |ui| {
                ui.add(egui::TextEdit::singleline(&mut f.cpu_cap).hint_text("none").desired_width(80.0))
                    .on_hover_text("At most this share of one CPU (150: one and a half); applies at once")
            });
            row(ui, "CPU weight", &errors, "cpu_weight", |ui| {
                ui.add(egui::TextEdit::singleline(&mut f.cpu_weight).hint_text("100").desired_width(80.0))
                    .on_hover_text("Its share under contention, 1-10000 (100: as any other VM); applies at once")
            });
            if let Some(text) = &vm.cpu_limits {
                ui.label("");
                ui.weak(text);
                ui.end_row();
            }
            row(ui, "Input", &errors, "input", |ui| {
                ui.horizontal(|ui| {
                    ui.radio_value(&mut f.input, InputMode::Ps2, "PS/2 only").on_hover_text(
                        "The PS/2 keyboard and mouse: a relative pointer the guest moves by the steps it is sent",
                    );
                    ui.radio_value(&mut f.input, InputMode::Virtio, "Virtio tablet and keyboard").on_hover_text(
                        "A virtio-input tablet (absolute pointer) and keyboard beside PS/2, used once the guest's \
                         driver is up (firmware and boot loaders keep PS/2); applies at the next start",
                    )
                })
                .response
            });
            row(ui, "Display", &errors, "vga", |ui| {
                ui.horizontal(|ui| {
                    ui.radio_value(&mut f.vga, VgaMode::Std, "Standard VGA").on_hover_text(
                        "The Bochs VGA every OS drives: the guest picks its resolution; applies at the next start",
                    );
                    ui.radio_value(&mut f.vga, VgaMode::Virtio, "Virtio").on_hover_text(
                        "virtio-vga: VGA for firmware and boot loaders, then the guest's virtio-gpu driver, whose \
                         screen takes the console's size (Resize guest to window); applies at the next start",
                    )
                })
                .response
            });
            row(ui, "Clipboard", &errors, "agent", |ui| {
                let mut shared = f.agent == AgentMode::Spice;
                let r = ui.checkbox(&mut shared, "Share with the guest").on_hover_text(
                    "A port for the guest's agent (spice-vdagent, in most desktop distributions): copy and paste \
                     cross between the console and the guest, and the desktop follows the window's size; \
                     applies at the next start",
                );
                f.agent = if shared { AgentMode::Spice } else { AgentMode::None };
                r
            });
            row(ui, "Sound", &errors, "sound", |ui| {
                ui.horizontal(|ui| {
                    ui.radio_value(&mut f.sound, SoundMode::None, "None").on_hover_text("No sound card");
                    ui.radio_value(&mut f.sound, SoundMode::Hda, "HD Audio").on_hover_text(
                        "Intel HD Audio: every OS has its driver; the guest's sound plays in the console; \
                         applies at the next start",
                    );
                    ui.radio_value(&mut f.sound, SoundMode::Virtio, "Virtio").on_hover_text(
                        "virtio-sound: lighter, for guests with its driver (Linux 6.2 and newer); applies at \
                         the next start",
                    )
                })
                .response
            });
        });

        if let Some(t) = set_target {
            let (id, change) = (vm.id.clone(), UpdateVm { memory_target_mib: Some(t), ..Default::default() });
            let done = format!("{}: the guest keeps {t} MiB", vm.name);
            self.backend.act(host, format!("Memory of {}", vm.name), Some(done), move |c| async move {
                c.update_vm(&id, &change).await
            });
        }

        section(ui, "Disks");
        let disks: Vec<_> = vm.drives.iter().filter(|d| d.kind == DriveKind::Disk).collect();
        let dr = &mut form.drives;
        // A running (or paused) VM's engine grows its disks itself; a suspended one's wait.
        let grows = !running || (matches!(vm.state, VmState::Running | VmState::Paused) && vm.crash.is_none());
        if running {
            ui.label("Stop the VM to add or remove drives (the engine has no hot-plug); disks grow while it runs.");
        }
        let no_disk = disks.is_empty() && vm.disk_bytes == 0;
        if no_disk {
            ui.label("No disk.");
        }
        let grid = (!no_disk).then(|| egui::Grid::new("settings-disks").num_columns(3));
        grid.map(|g| {
            g.show(ui, |ui| {
                for d in &disks {
                    ui.label(&d.id);
                    let ro = if d.read_only { ", read-only" } else { "" };
                    ui.label(format!("{}, {}, {}{ro}", d.bus, format_text(d.format), human_bytes(d.size_bytes)));
                    ui.horizontal(|ui| {
                        // The boot disk grows in the form; the cloud-init seed does not change.
                        if d.id == "disk0" || d.read_only {
                            return;
                        }
                        let l = ui.label(format!("Size of {} (GiB)", d.id));
                        let text = dr.grow.entry(d.id.clone()).or_insert_with(|| gib_text(d.size_bytes));
                        ui.add_enabled(grows, egui::TextEdit::singleline(text).desired_width(60.0)).labelled_by(l.id);
                        let grow = theme::button(ui, grows && !dr.waiting, GROW, &format!("Grow {}", d.id));
                        if grow.on_hover_text("A disk only grows").clicked() {
                            match parse_gib(text) {
                                Some(bytes) => action = Some(DriveAction::Grow(d.id.clone(), bytes)),
                                None => dr.message = Some(Err(format!("Give the size of {} in GiB, e.g. 20.", d.id))),
                            }
                        }
                        let remove = format!("Remove {}", d.id);
                        if theme::button(ui, !running && !dr.waiting, theme::DELETE, &remove).clicked() {
                            dr.confirm = Some(d.id.clone());
                        }
                    });
                    ui.end_row();
                    if d.read_only {
                        continue;
                    }
                    // Rate limits: any time (a running VM takes them at once).
                    ui.label("");
                    let (fields, base) =
                        dr.limits.entry(d.id.clone()).or_insert_with(|| (LimitFields::of(&d.limits), d.limits));
                    if *base != d.limits {
                        // The host's limits changed (this form's or another's): start again from them.
                        (*fields, *base) = (LimitFields::of(&d.limits), d.limits);
                    }
                    ui.horizontal_wrapped(|ui| {
                        for (text, value, what) in [
                            (&mut fields.iops, "IOPS", "operations a second"),
                            (&mut fields.read_mib, "read MiB/s", "MiB read a second"),
                            (&mut fields.write_mib, "write MiB/s", "MiB written a second"),
                        ] {
                            let r = ui.add(egui::TextEdit::singleline(text).hint_text(value).desired_width(70.0));
                            let name = format!("{} limit of {}", value, d.id);
                            ui.ctx().accesskit_node_builder(r.id, |n| n.set_label(name.as_str()));
                            r.on_hover_text(format!("At most this many {what} (empty: no limit)"));
                        }
                        let parsed = fields.limits(&d.limits);
                        let changed = parsed.as_ref().is_ok_and(|l| *l != d.limits);
                        let set = theme::button(ui, changed && !dr.waiting, theme::LIMIT, &format!("Limit {}", d.id));
                        if set.clicked()
                            && let Ok(l) = parsed.clone()
                        {
                            action = Some(DriveAction::Limits(d.id.clone(), l));
                        }
                        match parsed {
                            Err(why) => {
                                ui.colored_label(ui.visuals().warn_fg_color, why);
                            }
                            Ok(_) if !d.limits.is_none() => {
                                ui.weak(limits_text(&d.limits));
                            }
                            Ok(_) => {}
                        }
                    });
                    ui.end_row();
                }
                if vm.disk_bytes > 0 {
                    row(ui, "Disk size (GiB)", &errors, "disk_bytes", |ui| {
                        ui.add(egui::TextEdit::singleline(&mut form.fields.disk_gib).desired_width(80.0))
                            .on_hover_text("A disk only grows: the guest then grows its partition and file system")
                    });
                    ui.end_row();
                }
            })
        });
        ui.horizontal(|ui| {
            ui.radio_value(&mut dr.from_image, false, "New empty disk");
            ui.radio_value(&mut dr.from_image, true, "Copy of a library image");
        });
        ui.horizontal_wrapped(|ui| {
            if dr.from_image {
                let l = ui.label("Library disk image");
                egui::ComboBox::from_id_salt("settings-disk-image")
                    .selected_text(if dr.image.is_empty() { "choose…" } else { dr.image.as_str() })
                    .show_ui(ui, |ui| {
                        for i in &disk_images {
                            ui.selectable_value(&mut dr.image, i.clone(), i);
                        }
                        if disk_images.is_empty() {
                            ui.label("No raw or qcow2 image in the host's library");
                        }
                    })
                    .response
                    .labelled_by(l.id);
            } else {
                let l = ui.label("New disk size (GiB)");
                ui.add(egui::TextEdit::singleline(&mut dr.new_gib).desired_width(60.0)).labelled_by(l.id);
            }
            let l = ui.label("New disk format");
            egui::ComboBox::from_id_salt("settings-disk-format")
                .selected_text(format_text(Some(dr.new_format)))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut dr.new_format, DiskFormat::Qcow2, "qcow2");
                    ui.selectable_value(&mut dr.new_format, DiskFormat::Raw, "raw");
                })
                .response
                .labelled_by(l.id);
            if theme::button(ui, !running && !dr.waiting, theme::ADD, "Add disk").clicked() {
                match dr.add_request() {
                    Ok(req) => action = Some(DriveAction::AddDisk(req)),
                    Err(why) => dr.message = Some(Err(why)),
                }
            }
        });

        section(ui, "CD/DVD");
        let cds: Vec<_> = vm.drives.iter().filter(|d| d.kind == DriveKind::Cdrom).collect();
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("Library image");
            egui::ComboBox::from_id_salt("settings-iso")
                .selected_text(if form.iso.is_empty() { "choose…" } else { form.iso.as_str() })
                .show_ui(ui, |ui| {
                    for i in &images {
                        ui.selectable_value(&mut form.iso, i.clone(), i);
                    }
                    if images.is_empty() {
                        ui.label("No ISO in the host's library");
                    }
                })
                .response
                .labelled_by(l.id);
            upload = theme::button(ui, true, theme::UPLOAD, "Insert ISO from this computer…")
                .on_hover_text("Into the first drive")
                .clicked();
        });
        for d in &cds {
            ui.horizontal_wrapped(|ui| {
                ui.label(format!("{}, {}: {}", d.id, d.bus, d.media.as_deref().unwrap_or("empty")));
                let insert = format!("Insert into {}", d.id);
                if theme::button(ui, !form.iso.is_empty(), theme::INSERT, &insert).clicked() {
                    action = Some(DriveAction::Media(d.id.clone(), Some(form.iso.clone())));
                }
                if theme::button(ui, d.media.is_some(), theme::EJECT, &format!("Eject {}", d.id)).clicked() {
                    action = Some(DriveAction::Media(d.id.clone(), None));
                }
                let can = !running && !dr.waiting && cds.len() > 1;
                let hint = if cds.len() > 1 { "Remove the drive" } else { "A VM keeps one CD/DVD drive" };
                let remove = theme::button(ui, can, theme::DELETE, &format!("Remove {}", d.id));
                if remove.on_hover_text(hint).clicked() {
                    dr.confirm = Some(d.id.clone());
                }
            });
        }
        if theme::button(ui, !running && !dr.waiting, theme::ADD, "Add CD/DVD drive").clicked() {
            action = Some(DriveAction::AddCdrom);
        }
        if let Some(drive) = dr.confirm.clone() {
            ui.horizontal(|ui| {
                let what = if drive.starts_with("disk") {
                    format!("Remove {drive} and delete its data?")
                } else {
                    format!("Remove {drive}?")
                };
                ui.colored_label(ui.visuals().warn_fg_color, what);
                if theme::button(ui, true, theme::CONFIRM, &format!("Yes, remove {drive}")).clicked() {
                    action = Some(if drive.starts_with("disk") {
                        DriveAction::RemoveDisk(drive.clone())
                    } else {
                        DriveAction::RemoveCdrom(drive.clone())
                    });
                    dr.confirm = None;
                }
                if theme::button(ui, true, theme::CLOSE, "Cancel").clicked() {
                    dr.confirm = None;
                }
            });
        }
        if dr.waiting {
            ui.spinner();
        }
        match &dr.message {
            Some(Ok(done)) => {
                ui.label(done);
            }
            Some(Err(why)) => {
                ui.colored_label(ui.visuals().error_fg_color, why);
            }
            None => {}
        }
        let f = &mut form.fields;

        section(ui, "Boot");
        egui::Grid::new("settings-boot").num_columns(2).show(ui, |ui| {
            ui.label("Boots");
            ui.vertical(|ui| {
                ui.radio_value(&mut f.firmware, true, "Firmware (SeaBIOS)");
                ui.radio_value(&mut f.firmware, false, "Direct kernel boot");
                if let Some(e) = errors.get("firmware_boot") {
                    ui.colored_label(ui.visuals().error_fg_color, e);
                }
            });
            ui.end_row();
            if f.firmware {
                let l = ui.label("Boot order");
                ui.vertical(|ui| {
                    egui::ComboBox::from_id_salt("settings-boot-order")
                        .selected_text(order_text(&f.boot_order))
                        .show_ui(ui, |ui| {
                            use BootDevice::{Cdrom, Disk};
                            for o in [vec![Cdrom, Disk], vec![Disk, Cdrom], vec![Cdrom], vec![Disk]] {
                                let text = order_text(&o);
                                ui.selectable_value(&mut f.boot_order, o, text);
                            }
                        })
                        .response
                        .labelled_by(l.id);
                    if let Some(e) = errors.get("boot_order") {
                        ui.colored_label(ui.visuals().error_fg_color, e);
                    }
                });
                ui.end_row();
                check_row(
                    ui,
                    "Boot menu",
                    &errors,
                    "boot_menu",
                    &mut f.boot_menu,
                    "Offer the boot menu (ESC at start)",
                );
            } else {
                row(ui, "Kernel", &errors, "boot", |ui| {
                    ui.add(egui::TextEdit::singleline(&mut f.kernel).hint_text("an image of the library"))
                });
                row(ui, "Initrd", &errors, "initrd", |ui| {
                    ui.add(egui::TextEdit::singleline(&mut f.initrd).hint_text("none"))
                });
                row(ui, "Kernel command line", &errors, "cmdline", |ui| ui.text_edit_singleline(&mut f.cmdline));
            }
            row(ui, "Resolution", &errors, "display", |ui| {
                ui.add(egui::TextEdit::singleline(&mut f.resolution).hint_text("1280x800 (default)")).on_hover_text(
                    "The display's start-up resolution (a virtio display then takes the console's size once \
                         the guest's driver is up)",
                )
            });
        });
        if let Some(e) = errors.get("nics") {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }

        if apply {
            match request(&form.base, &form.fields) {
                Ok(change) => {
                    form.errors.clear();
                    form.error = None;
                    form.waiting = true;
                    self.backend.apply_settings(host, vm.id.clone(), vm.name.clone(), change);
                }
                Err(errors) => form.errors = errors,
            }
        }
        if revert {
            form.fields = form.base.clone();
            form.errors.clear();
            form.error = None;
        }
        if let Some(action) = action {
            let id = vm.id.clone();
            let name = &vm.name;
            if !matches!(action, DriveAction::Media(..)) {
                form.drives.waiting = true;
                form.drives.message = None;
            }
            let b = &self.backend;
            match action {
                DriveAction::Media(drive, image) => {
                    let what = match &image {
                        Some(i) => format!("Insert {i} into {drive} of {name}"),
                        None => format!("Eject {drive} of {name}"),
                    };
                    b.act(host, what, None, move |c| async move {
                        c.change_drive_media(&id, Some(&drive), image.as_deref()).await
                    });
                }
                DriveAction::AddDisk(req) => {
                    let what = format!("Add a disk to {name}");
                    b.change_drives(host, id.clone(), what, move |c| async move { c.add_disk(&id, &req).await });
                }
                DriveAction::RemoveDisk(drive) => {
                    let what = format!("Remove {drive} of {name}");
                    b.change_drives(host, id.clone(), what, move |c| async move { c.remove_disk(&id, &drive).await });
                }
                DriveAction::Grow(drive, bytes) => {
                    let what = format!("Grow {drive} of {name} to {}", human_bytes(bytes));
                    b.change_drives(
                        host,
                        id.clone(),
                        what,
                        move |c| async move { c.grow_disk(&id, &drive, bytes).await },
                    );
                }
                DriveAction::Limits(drive, limits) => {
                    let what = format!("Limit {drive} of {name}");
                    b.change_drives(host, id.clone(), what, move |c| async move {
                        c.set_disk_limits(&id, &drive, &limits).await
                    });
                }
                DriveAction::AddCdrom => {
                    let what = format!("Add a CD/DVD drive to {name}");
                    b.change_drives(host, id.clone(), what, move |c| async move { c.add_cdrom(&id, None).await });
                }
                DriveAction::RemoveCdrom(drive) => {
                    let what = format!("Remove {drive} of {name}");
                    b.change_drives(host, id.clone(), what, move |c| async move { c.remove_cdrom(&id, &drive).await });
                }
            }
        }
        if upload && let Some(path) = rfd::FileDialog::new().add_filter("Disc images", &["iso", "img"]).pick_file() {
            self.attach(host, &vm.id, path);
        }
        section(ui, "Network");
        self.network_section(ui, host, vm);
        if close {
            self.vm_settings = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Vm {
        serde_json::from_value(serde_json::json!({
            "id": "a", "name": "web", "vcpus": 1, "memory_mib": 64, "disk_bytes": 8u64 << 30, "state": "stopped",
            "boot": {"kernel": "vmlinuz", "cmdline": "console=ttyS0"}
        }))
        .unwrap()
    }

    #[test]
    fn a_memory_target_is_whole_mib_from_the_floor_to_the_memory_and_the_row_says_where_the_guest_is() {
        let b = MemoryBalloon { target_mib: 512, actual_mib: 512, floor_mib: 128, driver: true, ..Default::default() };
        assert_eq!(balloon_target(" 384 ", &b, 512), Ok(384));
        assert_eq!(balloon_target("128", &b, 512), Ok(128));
        for bad in ["127", "513", "", "3.5", "-1"] {
            assert_eq!(balloon_target(bad, &b, 512), Err("Give MiB from 128 (the floor) to 512.".into()), "{bad:?}");
        }
        assert_eq!(balloon_text(&b), "512 MiB in use by the guest");
        let going = MemoryBalloon {
            target_mib: 384,
            actual_mib: 450,
            guest_available_mib: Some(300),
            guest_total_mib: Some(440),
            ..b.clone()
        };
        assert_eq!(
            balloon_text(&going),
            "450 MiB in use by the guest, going to 384 MiB; the guest has 300 MiB available of 440 MiB"
        );
        let no_driver = MemoryBalloon { driver: false, ..b };
        assert!(balloon_text(&no_driver).contains("no balloon driver"));
    }

    fn request_base_with_max(base: &Fields) -> Fields {
        Fields { max_vcpus: "4".into(), ..base.clone() }
    }

    #[test]
    fn only_what_changed_is_sent() {
        let base = Fields::of(&vm());
        assert_eq!(request(&base, &base), Ok(UpdateVm::default()));
        let mut f = base.clone();
        f.vcpus = "2".into();
        f.max_vcpus = "4".into();
        f.disk_gib = "10".into();
        f.firmware = true;
        f.boot_order = vec![BootDevice::Disk];
        f.resolution = "1024x768".into();
        f.description = "about".into();
        let u = request(&base, &f).unwrap();
        assert_eq!((u.vcpus, u.max_vcpus), (Some(2), Some(4)));
        assert_eq!(u.disk_bytes, Some(10 << 30));
        // Emptied: no room for more.
        let mut g = request_base_with_max(&base);
        g.max_vcpus.clear();
        assert_eq!(request(&request_base_with_max(&base), &g).unwrap().max_vcpus, Some(0));
        assert_eq!(u.firmware_boot, Some(true));
        assert_eq!(u.boot, None);
        assert_eq!(u.boot_order, Some(vec![BootDevice::Disk]));
        assert_eq!(u.display, Some(DisplaySpec { width: 1024, height: 768 }));
        assert_eq!(u.description.as_deref(), Some("about"));
        assert_eq!((u.name, u.memory_mib, u.tags, u.autostart), (None, None, None, None));
    }

    #[test]
    fn the_form_objects_to_what_is_not_a_value() {
        let base = Fields::of(&vm());
        let mut f = base.clone();
        f.vcpus = "two".into();
        f.max_vcpus = "many".into();
        f.memory_mib = "".into();
        f.disk_gib = "1e300".into();
        f.resolution = "big".into();
        f.tags = "has/slash".into();
        f.kernel = " ".into();
        let e = request(&base, &f).unwrap_err();
        assert_eq!(
            e.keys().map(String::as_str).collect::<Vec<_>>(),
            ["boot", "disk_bytes", "display", "max_vcpus", "memory_mib", "tags", "vcpus"]
        );
    }

    #[test]
    fn a_disk_size_is_whole_sectors_and_never_overflows() {
        let base = Fields::of(&vm());
        for (text, bytes) in
            [("8.5", Some((8 << 30) + (1 << 29))), ("0.0000001", Some(512)), ("1048576", Some(1 << 50))]
        {
            let f = Fields { disk_gib: text.into(), ..base.clone() };
            assert_eq!(request(&base, &f).map(|u| u.disk_bytes).ok().flatten(), bytes, "{text}");
        }
        for text in ["-1", "0", "1048577", "inf", "NaN"] {
            let f = Fields { disk_gib: text.into(), ..base.clone() };
            assert!(request(&base, &f).unwrap_err().contains_key("disk_bytes"), "{text}");
        }
    }

    #[test]
    fn a_new_disk_is_a_size_and_format_or_a_library_image() {
        let mut d = DriveForm::default();
        assert_eq!(d.add_request(), Ok(AddDisk { size_gib: Some(10), format: Some(DiskFormat::Qcow2), image: None }));
        d.new_format = DiskFormat::Raw;
        d.new_gib = " 3 ".into();
        assert_eq!(d.add_request().unwrap().size_gib, Some(3));
        for bad in ["0", "-1", "1.5", "", "ten"] {
            d.new_gib = bad.into();
            assert!(d.add_request().is_err(), "{bad:?}");
        }
        d.from_image = true;
        assert!(d.add_request().unwrap_err().contains("library image"));
        d.image = "base.qcow2".into();
        assert_eq!(
            d.add_request(),
            Ok(AddDisk { size_gib: None, format: Some(DiskFormat::Raw), image: Some("base.qcow2".into()) })
        );
        assert_eq!(parse_gib("2"), Some(2 << 30));
        assert_eq!(parse_gib("0"), None);
    }

    #[test]
    fn pending_changes_show_in_the_form_and_in_words() {
        let mut v = vm();
        v.pending = Some(UpdateVm { vcpus: Some(4), firmware_boot: Some(true), ..Default::default() });
        let f = Fields::of(&v);
        assert_eq!(f.vcpus, "4");
        assert!(f.firmware);
        assert_eq!(pending_text(&["vcpus".into(), "disk_bytes".into()]), "vCPUs, disk size");
    }
}

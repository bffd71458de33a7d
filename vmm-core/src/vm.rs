//! One VM: assembled step by step from a [`VmConfig`] (KVM → memory → irqchip and PIT → devices → ACPI →
//! kernel → vCPUs), run until the guest powers off, crashes or is stopped, and rebuilt on guest reset.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
    MmapRegion,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootFiles};
use crate::config::{ConfigError, SerialSink, VmConfig};
use crate::counters::{Counters, CountersSnapshot};
use crate::cpu::{self, CpuError};
use crate::devices::acpi_pm::{self, Gpe0, Pm1Control, Pm1Event};
use crate::devices::bus::{UnhandledCounts, lock};
use crate::devices::cpu_hotplug::{self, CpuHotplug};
use crate::devices::debug_port::{POST_CODE_PORT, PostCode};
use crate::devices::dispi::{DISPI_INDEX_PORT, DISPI_PORT_LEN, Dispi};
use crate::devices::i8042::{self, I8042};
use crate::devices::rtc::{RTC_PORT, Rtc};
use crate::devices::serial::{COM1_IRQ, COM1_PORT, Serial, SerialOutput, SerialStats};
use crate::devices::vga::{VGA_PORT, VGA_PORT_LEN, Vga};
use crate::devices::{Bus, BusDevice, BusError, IrqLine, MachineControl, MachineRequest};
use crate::disk::{DiskError, Drive, DriveStatus};
use crate::display::refresh::{BootView, Refresher};
use crate::display::{self, Screen};
use crate::layout;
use crate::pci::msix::GsiRouter;
use crate::pci::{self, PciBus, PciConfigPorts, PciMmioWindow};
use crate::ram::AlignedRam;
use crate::seccomp;
use crate::vcpu::{self, RunControl, Vcpu};
use crate::virtio::VirtioInterrupt;
use crate::virtio::balloon::{BalloonShared, BalloonStatus, VirtioBalloon};
use crate::virtio::block::VirtioBlock;
use crate::virtio::gpu::{GpuShared, VirtioGpu};
use crate::virtio::input::{self as virtio_input, VirtioInput};
use crate::virtio::net::VirtioNet;
use crate::virtio::pci::VirtioPci;
use crate::virtio::scsi::VirtioScsi;

#[path = "vm_state.rs"]
mod state;
pub use state::{SaveReport, Then};

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user use /dev/kvm? add it to the kvm group)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM failed to {what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error("cannot open {what} {path:?}: {source}")]
    Open { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot load the kernel: {0}")]
    Boot(#[from] BootError),
    #[error("cannot set up a vCPU: {0}")]
    Cpu(#[from] CpuError),
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("cannot install seccomp filters: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("{0}")]
    Disk(#[from] DiskError),
    #[error("PCI: {0}")]
    Pci(#[from] pci::PciError),
    #[error("the guest is not reading its serial port ({waiting} bytes of input still wait)")]
    SerialInputFull { waiting: usize },
    #[error("firmware: {0}")]
    Firmware(#[from] crate::firmware::FirmwareError),
    #[error("{0}")]
    State(#[from] crate::snapshot::StateError),
}

/// What a boot starts: a kernel loaded directly, or firmware at the reset vector.
enum Start {
    Kernel(BootFiles),
    Firmware(crate::firmware::FirmwareImages),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5, or a graceful stop it honoured).
    PowerOff,
    /// The guest crashed: triple fault, an instruction KVM cannot emulate, or a failed entry.
    GuestCrash(String),
    /// The host stopped it by force (forced power-off, or a graceful stop that timed out).
    ForcedStop,
    /// The guest reset the machine and the VM was configured not to reboot.
    Reset,
    /// The VM's state was saved (control `save-state` with `"then": "stop"`) and the process ended.
    Suspended,
}

impl ExitReason {
    /// The process exit status `porthole-vmm` uses for this outcome (1 is kept for VMM errors).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::GuestCrash(_) => 2,
            ExitReason::ForcedStop => 3,
            ExitReason::Reset => 4,
            ExitReason::Suspended => 5,
        }
    }
}

/// What `porthole-vmm --exit-file` records when the VM ends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitRecord {
    /// The process exit status (see [`ExitReason::exit_code`]; 1 for a VMM error).
    pub exit_code: i32,
    /// Why, in words.
    pub reason: String,
}

/// Written by the SIGTERM handler that [`end_on_sigterm`] installs; the event loop watches it.
static TERM: std::sync::OnceLock<EventFd> = std::sync::OnceLock::new();

extern "C" fn term_handler(_: libc::c_int) {
    if let Some(fd) = TERM.get() {
        // An eventfd write is async-signal-safe (one write(2)); a full counter (EAGAIN) is ignored.
        let _ = fd.write(1);
    }
}

/// Makes SIGTERM end the VM as a forced power-off does, so its exit record and counters are still written:
/// exit status 3 while the guest runs, 2 (with the crash report) once it has crashed. Call before the VM
/// runs (the handler is installed once per process).
pub fn end_on_sigterm() -> std::io::Result<()> {
    if TERM.get().is_some() {
        return Ok(());
    }
    let _ = TERM.set(EventFd::new(libc::EFD_NONBLOCK)?);
    // SAFETY: a zeroed sigaction with an empty mask and a handler that only writes to an eventfd.
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = term_handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGTERM, &action, std::ptr::null_mut())
    };
    if installed != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "the guest powered off"),
            ExitReason::GuestCrash(why) => write!(f, "the guest crashed: {why}"),
            ExitReason::ForcedStop => write!(f, "the VM was powered off by the host"),
            ExitReason::Reset => write!(f, "the guest reset the machine (rebooting is off)"),
            ExitReason::Suspended => write!(f, "suspended: the VM's state was saved and the VM stopped"),
        }
    }
}

/// The guest interrupt lines of the platform devices, kept across reboots (their eventfds are registered
/// with each new KVM VM).
struct Irqs {
    com1: IrqLine,
    keyboard: IrqLine,
    mouse: IrqLine,
    sci: IrqLine,
}

impl Irqs {
    fn new() -> std::io::Result<Self> {
        let line = || EventFd::new(libc::EFD_NONBLOCK).map(IrqLine::new);
        Ok(Irqs { com1: line()?, keyboard: line()?, mouse: line()?, sci: line()? })
    }

    fn register(&self, vm: &VmFd) -> Result<(), VmError> {
        for (line, gsi) in [
            (&self.com1, COM1_IRQ),
            (&self.keyboard, i8042::KEYBOARD_IRQ),
            (&self.mouse, i8042::MOUSE_IRQ),
            (&self.sci, acpi_pm::SCI_IRQ),
        ] {
            vm.register_irqfd(line.eventfd(), gsi).map_err(kvm_err("route a device interrupt (irqfd)"))?;
        }
        Ok(())
    }
}

/// What the control socket and the event loop share with a running VM. Outlives reboots.
pub struct VmHandle {
    pub name: String,
    /// The vCPUs the VM has now (more once some are added while it runs).
    vcpus: AtomicU32,
    /// The most it can have.
    pub max_vcpus: u32,
    pub memory_mib: u64,
    started: Instant,
    stop_timeout: Duration,
    run: Arc<RunControl>,
    machine: MachineControl,
    counters: Arc<Counters>,
    serial_stats: Arc<SerialStats>,
    pio_unhandled: Arc<UnhandledCounts>,
    mmio_unhandled: Arc<UnhandledCounts>,
    post_code: Arc<AtomicU64>,
    /// The power button of the current boot.
    pm1_event: Mutex<Option<Arc<Mutex<Pm1Event>>>>,
    /// The i8042 of the current boot, for keyboard and mouse input.
    i8042: Mutex<Option<Arc<Mutex<I8042>>>>,
    /// The last pointer position and buttons an RFB client sent.
    pointer: Mutex<Option<(u16, u16, u8)>>,
    /// The virtio-input tablet of the current boot (absolute pointer), when the VM has one.
    tablet: Mutex<Option<Arc<virtio_input::InputHandle>>>,
    /// The virtio-input keyboard of the current boot, when the VM has one.
    keyboard: Mutex<Option<Arc<virtio_input::InputHandle>>>,
    /// Which keyboard (virtio or PS/2) each held key went to, this boot.
    key_route: Mutex<virtio_input::KeyRoute>,
    /// The memory balloon (its target outlives reboots), when the VM has one.
    balloon: Option<Arc<BalloonShared>>,
    /// The virtio-gpu display (its monitor's size and the cursor outlive reboots), with `--vga virtio`.
    gpu: Option<Arc<GpuShared>>,
    /// The SPICE agent channel (the clipboard, monitor sizes), with `--agent spice`.
    agent: Option<Arc<crate::vdagent::Agent>>,
    /// The sound card, with `--sound virtio` (what it plays goes to the console's listeners).
    sound: crate::config::SoundMode,
    /// The console screen (its sound output's figures for the status).
    screen: Arc<Screen>,
    /// When a graceful stop turns into a forced one.
    stop_deadline: Mutex<Option<Instant>>,
    /// Wakes the event loop when `stop_deadline` changes.
    loop_wake: EventFd,
    /// The VM's drives (they outlive reboots).
    drives: Vec<Arc<Drive>>,
    /// The VM's network cards (they and their back ends outlive reboots).
    nics: Vec<Arc<crate::net::Nic>>,
    /// Serial input from the control socket, waiting for the event loop to feed it to the UART.
    serial_input: Mutex<Vec<u8>>,
    /// The crash report while the VM is kept in its crashed state (vCPUs stopped, screen still served).
    crashed: Mutex<Option<String>>,
    /// vCPUs to add, for the event loop to carry out (see [`VmHandle::set_vcpus`]).
    vcpu_request: Mutex<Option<VcpuRequest>>,
    /// A machine-state save for the event loop to carry out (see [`VmHandle::save_state`]).
    save_request: Mutex<Option<state::SaveRequest>>,
    /// Set while a save is in progress: the VM stays paused, other commands that change it are refused.
    saving: std::sync::atomic::AtomicBool,
    /// Set when a save ends the VM (`then: stop`): the VM's end is reported as suspended.
    suspended: std::sync::atomic::AtomicBool,
}

/// vCPUs to add, handed from the control thread to the event loop: the count wanted and where the answer
/// (the count now, or why not) goes.
struct VcpuRequest {
    count: u32,
    reply: std::sync::mpsc::Sender<Result<u32, String>>,
}

/// How long adding vCPUs may take before the control socket gives up waiting.
const ADD_VCPUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of serial input from the control socket that may wait for the guest to read them.
pub const SERIAL_INPUT_MAX: usize = 16 * 1024;

impl crate::rfb::Input for VmHandle {
    fn key(&self, key: crate::rfb::keymap::Key, down: bool) {
        VmHandle::key(self, key, down);
    }

    fn pointer(&self, x: u16, y: u16, buttons: u8, screen: (u32, u32)) {
        VmHandle::pointer(self, x, y, buttons, screen);
    }

    fn lock_lights(&self) -> Option<u8> {
        Some(self.lock_lights())
    }

    fn resize_screen(&self, width: u32, height: u32) -> Option<(u32, u32)> {
        self.request_display_size(width, height)
    }

    fn has_clipboard(&self) -> bool {
        self.agent.is_some()
    }

    fn set_clipboard(&self, text: String) {
        if let Some(agent) = &self.agent {
            agent.set_clipboard(text);
        }
    }

    fn has_audio(&self) -> bool {
        self.sound != crate::config::SoundMode::None
    }
}

/// The state the control socket reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
    Stopping,
    /// The guest crashed: its vCPUs are stopped, its screen and the crash report stay until it is powered
    /// off (or reset).
    Crashed,
}

impl VmHandle {
    pub fn state(&self) -> RunState {
        if lock(&self.crashed).is_some() {
            RunState::Crashed
        } else if lock(&self.stop_deadline).is_some() {
            RunState::Stopping
        } else if self.run.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// The vCPUs the VM has now.
    pub fn vcpus(&self) -> u32 {
        self.vcpus.load(Ordering::Acquire)
    }

    /// Gives the running VM `count` vCPUs, up to its maximum: the new ones are created and started (waiting
    /// for the guest's INIT/SIPI), then announced to the guest (ACPI CPU hotplug), which brings them online.
    /// vCPUs cannot be removed. Returns the count now.
    pub fn set_vcpus(&self, count: u32) -> Result<u32, String> {
        let now = self.vcpus();
        if count == now {
            return Ok(now);
        }
        if count < now {
            return Err(format!(
                "vCPUs cannot be removed from a running VM (it has {now}); fewer apply when it starts again"
            ));
        }
        if count > self.max_vcpus {
            return Err(format!(
                "{count} vCPUs asked for, but this VM was started with room for at most {} (its maximum, \
                 --max-cpus); more apply when it starts again",
                self.max_vcpus
            ));
        }
        if self.crash_report().is_some() {
            return Err("the guest has crashed: its vCPUs are stopped; reset the VM or power it off".into());
        }
        let (reply, answer) = std::sync::mpsc::channel();
        {
            // One change at a time: a second request must not replace the first's (whose caller would then
            // be told the VM ended).
            let mut pending = lock(&self.vcpu_request);
            if pending.is_some() {
                return Err("another vCPU change is in progress; try again when it ends".into());
            }
            *pending = Some(VcpuRequest { count, reply });
        }
        let _ = self.loop_wake.write(1);
        answer
            .recv_timeout(ADD_VCPUS_TIMEOUT)
            .unwrap_or_else(|_| Err("the VM ended (or rebooted) before the vCPUs were added".into()))
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops every vCPU; returns how long it took until all were stopped.
    pub fn pause(&self) -> Result<Duration, vcpu::PauseTimeout> {
        self.run.pause(Duration::from_secs(1))
    }

    /// [`VmHandle::pause`] for work that needs the whole machine still (saving its state, moving a disk):
    /// allowed longer, as a vCPU thread of a VM that is just starting (or a loaded host) may take more than a
    /// second to reach a point where it stops.
    pub fn pause_for_work(&self) -> Result<Duration, vcpu::PauseTimeout> {
        self.run.pause(Duration::from_secs(10))
    }

    pub fn resume(&self) {
        self.run.resume();
    }

    /// Resets the machine (as the reset button does); a crashed VM reboots (and is no longer reported as
    /// crashed from now on).
    pub fn reset(&self) {
        lock(&self.crashed).take();
        self.machine.request(MachineRequest::Reset);
    }

    /// Ends a VM whose state a `save-state` with `then: stop` saved (it waits paused, marked suspended): the
    /// process exits as suspended. Called once the caller has the save's answer.
    pub fn end_suspended(&self) {
        if self.suspended.load(std::sync::atomic::Ordering::Acquire) {
            self.machine.request(MachineRequest::ForceOff);
        }
    }

    /// Pulls the plug.
    pub fn power_off(&self) {
        self.machine.request(MachineRequest::ForceOff);
    }

    /// Presses the ACPI power button and powers off by force if the guest has not powered off within the
    /// stop timeout. Returns whether the guest had enabled the power-button event. A paused VM is resumed
    /// so that it can react. A crashed VM cannot react: it ends at once.
    pub fn stop(&self) -> bool {
        let noticed = lock(&self.pm1_event).as_ref().map(|pm| lock(pm).press_power_button()).unwrap_or(false);
        lock(&self.stop_deadline).get_or_insert(Instant::now() + self.stop_timeout);
        if self.crash_report().is_some() {
            self.machine.request(MachineRequest::ForceOff);
            return false;
        }
        self.run.resume();
        let _ = self.loop_wake.write(1);
        noticed
    }

    /// Why the guest crashed, while the VM is kept in its crashed state.
    pub fn crash_report(&self) -> Option<String> {
        lock(&self.crashed).clone()
    }

    /// Queues bytes for the serial port; the event loop feeds them to the UART as the guest reads. Refused
    /// when more than [`SERIAL_INPUT_MAX`] bytes would be waiting (a guest that does not read its serial port).
    pub fn serial_input(&self, bytes: &[u8]) -> Result<(), VmError> {
        {
            let mut queue = lock(&self.serial_input);
            if queue.len() + bytes.len() > SERIAL_INPUT_MAX {
                return Err(VmError::SerialInputFull { waiting: queue.len() });
            }
            queue.extend_from_slice(bytes);
        }
        let _ = self.loop_wake.write(1);
        Ok(())
    }

    /// Queues scan-code bytes from the keyboard.
    pub fn keyboard_input(&self, bytes: &[u8]) {
        if let Some(dev) = lock(&self.i8042).as_ref() {
            lock(dev).keyboard_input(bytes);
        }
    }

    /// Presses or releases a key: on the virtio keyboard once its guest driver is up, else on the PS/2
    /// keyboard; a key's release (and the console's autorepeat of it) goes where its press went.
    pub fn key(&self, key: crate::rfb::keymap::Key, down: bool) {
        let keyboard = lock(&self.keyboard).clone();
        let virtio = lock(&self.key_route).route(key, down, || keyboard.as_ref().is_some_and(|k| k.key(key, down)));
        if virtio {
            return;
        }
        if let Some(dev) = lock(&self.i8042).as_ref() {
            lock(dev).key(key, down);
        }
    }

    /// Whether the console's keys go to the virtio keyboard (its guest driver is up) rather than PS/2.
    pub fn virtio_keyboard(&self) -> bool {
        lock(&self.keyboard).as_ref().is_some_and(|k| k.driver_ready())
    }

    /// The virtio keyboard's lock LEDs as its guest driver last set them (None without the keyboard).
    pub fn keyboard_leds(&self) -> Option<virtio_input::Leds> {
        lock(&self.keyboard).as_ref().map(|k| k.leds())
    }

    /// The lock lights of the keyboard the console's keys go to — the virtio keyboard's once its guest
    /// driver is up, else the PS/2 keyboard's — as bits: 0 Scroll Lock, 1 Num Lock, 2 Caps Lock (the PS/2
    /// set-LEDs byte, and QEMU's LED state pseudo-encoding).
    pub fn lock_lights(&self) -> u8 {
        if let Some(k) = lock(&self.keyboard).as_ref().filter(|k| k.driver_ready()) {
            let l = k.leds();
            return u8::from(l.scroll_lock) | u8::from(l.num_lock) << 1 | u8::from(l.caps_lock) << 2;
        }
        lock(&self.i8042).as_ref().map(|dev| lock(dev).keyboard_leds() & 7).unwrap_or(0)
    }

    /// Whether the console's pointer goes to the tablet (its guest driver is up) rather than the PS/2
    /// mouse.
    pub fn absolute_pointer(&self) -> bool {
        lock(&self.tablet).as_ref().is_some_and(|t| t.driver_ready())
    }

    /// Moves the pointer to a console position on a screen of `screen` pixels with RFB's button mask (1
    /// left, 2 middle, 4 right, 8/16 wheel up/down): the tablet's, once its guest driver is up, else the
    /// PS/2 mouse (sent as the movement since the last position).
    pub fn pointer(&self, x: u16, y: u16, mask: u8, screen: (u32, u32)) {
        let tablet = lock(&self.tablet).clone();
        if let Some(t) = tablet
            && t.pointer(x, y, mask, screen)
        {
            *lock(&self.pointer) = Some((x, y, mask));
            return;
        }
        let mut last = lock(&self.pointer);
        let (lx, ly, lmask) = last.unwrap_or((x, y, 0));
        *last = Some((x, y, mask));
        drop(last);
        let (dx, dy) = (i32::from(x) - i32::from(lx), i32::from(y) - i32::from(ly));
        let pressed = mask & !lmask;
        let dz = if pressed & 8 != 0 {
            -1
        } else if pressed & 16 != 0 {
            1
        } else {
            0
        };
        let buttons = (mask & 1) | ((mask & 4) >> 1) | ((mask & 2) << 1);
        if dx == 0 && dy == 0 && dz == 0 && mask & 7 == lmask & 7 {
            return;
        }
        if let Some(dev) = lock(&self.i8042).as_ref() {
            lock(dev).mouse_input(dx, dy, dz, buttons);
        }
    }

    /// Asks the guest's monitor for `width × height` (clamped to what a monitor may prefer); the guest's
    /// virtio-gpu driver then switches to it. A guest agent is asked too (its desktop sets the size where
    /// the display driver does not follow). None when neither can: no virtio-gpu display, and no agent
    /// connected.
    pub fn request_display_size(&self, width: u32, height: u32) -> Option<(u32, u32)> {
        let size = self.gpu.as_ref().map(|g| g.request_size(width, height));
        let (w, h) = size.unwrap_or((width, height));
        let agent = self.agent.as_ref().is_some_and(|a| a.request_monitor(w, h));
        size.or(agent.then_some((w, h)))
    }

    /// The sound card's output, with `--sound virtio`: what plays and how much.
    pub fn sound(&self) -> Option<crate::control::SoundStatus> {
        if self.sound == crate::config::SoundMode::None {
            return None;
        }
        let audio = self.screen.audio();
        let format = audio.format();
        Some(crate::control::SoundStatus {
            playing: format.is_some(),
            rate: format.map(|f| f.rate),
            channels: format.map(|f| f.channels),
            played_frames: audio.played_frames(),
            late_frames: audio.late_frames(),
        })
    }

    /// The SPICE agent channel, with `--agent spice`.
    pub fn agent(&self) -> Option<&Arc<crate::vdagent::Agent>> {
        self.agent.as_ref()
    }

    /// The virtio-gpu display, with `--vga virtio`.
    pub fn gpu(&self) -> Option<&Arc<GpuShared>> {
        self.gpu.as_ref()
    }

    /// The balloon's target, what the guest has given and its memory statistics, when the VM has one.
    pub fn balloon(&self) -> Option<BalloonStatus> {
        self.balloon.as_ref().map(|b| b.status())
    }

    /// Asks the guest to keep `target_mib` of its memory (the balloon takes the rest); refused, changing
    /// nothing, below the floor, above the VM's memory or without a balloon.
    pub fn set_balloon_target(&self, target_mib: u64) -> Result<BalloonStatus, String> {
        let balloon = self.balloon.as_ref().ok_or("this VM has no memory balloon (porthole-vmm --balloon)")?;
        balloon.set_target_mib(target_mib).map_err(|e| e.to_string())
    }

    /// The network cards and their state.
    pub fn nics(&self) -> Vec<crate::net::NicStatus> {
        self.nics.iter().map(|n| n.status()).collect()
    }

    /// Plugs or unplugs the cable of network card `id`.
    pub fn set_link(&self, id: &str, up: bool) -> Result<crate::net::NicStatus, String> {
        let nic = self.nics.iter().find(|n| n.id == id).ok_or_else(|| format!("no network card {id:?}"))?;
        if !nic.attached() {
            return Err(format!("network card {id:?} is not attached to the VM"));
        }
        nic.set_link(up);
        Ok(nic.status())
    }

    /// Connects user card `id` to a passt started by another process (its connected `socket`, and `log`, the
    /// read end of its standard error): see [`crate::net::Nic::replace_backend`].
    pub fn connect_nic(
        &self,
        id: &str,
        socket: std::os::fd::OwnedFd,
        log: Option<std::os::fd::OwnedFd>,
        forwards: Vec<crate::net::PortForward>,
        address: Option<std::net::Ipv4Addr>,
    ) -> Result<crate::net::NicStatus, String> {
        let nic = self.nics.iter().find(|n| n.id == id).ok_or_else(|| format!("no network card {id:?}"))?;
        let passt = crate::net::Passt::connected_with_log(std::os::unix::net::UnixStream::from(socket), log, id)
            .map_err(|e| format!("network card {id:?}: the passed socket is unusable: {e}"))?;
        nic.replace_backend(Some(Box::new(passt)), forwards, address)?;
        log::info!("{id}: connected to a new passt (forwards now: {})", nic.status().forwards.len());
        Ok(nic.status())
    }

    /// Moves TAP or bridge card `id` to the TAP device `name`, whose file another process opened.
    pub fn connect_tap(
        &self,
        id: &str,
        file: std::os::fd::OwnedFd,
        name: &str,
    ) -> Result<crate::net::NicStatus, String> {
        let nic = self.nics.iter().find(|n| n.id == id).ok_or_else(|| format!("no network card {id:?}"))?;
        if !crate::net::valid_ifname(name) {
            return Err(format!("network card {id:?}: {name:?} is not an interface name"));
        }
        nic.replace_tap(crate::net::Tap::from_handed(file, name))?;
        log::info!("{id}: moved to TAP device {name}");
        Ok(nic.status())
    }

    /// Disconnects user card `id` from its passt, which ends and frees its ports.
    pub fn disconnect_nic(&self, id: &str) -> Result<crate::net::NicStatus, String> {
        let nic = self.nics.iter().find(|n| n.id == id).ok_or_else(|| format!("no network card {id:?}"))?;
        nic.replace_backend(None, Vec::new(), None)?;
        log::info!("{id}: disconnected from its passt");
        Ok(nic.status())
    }

    /// Replaces the rate limits of network card `id`.
    pub fn set_nic_limits(
        &self,
        id: &str,
        limits: crate::rate_limiter::NicLimits,
    ) -> Result<crate::net::NicStatus, String> {
        limits.check()?;
        let nic = self.nics.iter().find(|n| n.id == id).ok_or_else(|| format!("no network card {id:?}"))?;
        nic.set_limits(limits);
        Ok(nic.status())
    }

    /// Grows fixed disk `id` to `size` bytes while the VM runs.
    pub fn grow_drive(&self, id: &str, size: u64) -> Result<DriveStatus, DiskError> {
        let drive = self.drives.iter().find(|d| d.id == id).ok_or_else(|| DiskError::NoSuchDrive(id.to_owned()))?;
        drive.grow(size)?;
        Ok(drive.status())
    }

    /// Replaces the rate limits of drive `id`.
    pub fn set_disk_limits(&self, id: &str, limits: crate::rate_limiter::DiskLimits) -> Result<DriveStatus, String> {
        limits.check()?;
        let drive = self.drives.iter().find(|d| d.id == id).ok_or_else(|| format!("no drive {id:?}"))?;
        drive.set_limits(limits);
        Ok(drive.status())
    }

    /// The drives and their media.
    pub fn drives(&self) -> Vec<DriveStatus> {
        self.drives.iter().map(|d| d.status()).collect()
    }

    /// The removable drive `id`, or the first removable drive.
    fn removable_drive(&self, id: Option<&str>) -> Result<&Arc<Drive>, DiskError> {
        match id {
            Some(id) => self.drives.iter().find(|d| d.id == id).ok_or_else(|| DiskError::NoSuchDrive(id.to_owned())),
            None => self.drives.iter().find(|d| d.removable).ok_or(DiskError::NoRemovableDrive),
        }
    }

    /// Puts the image at `path` (read-only) into a removable drive, replacing its media; the guest is told.
    pub fn attach_media(&self, drive: Option<&str>, path: &std::path::Path) -> Result<DriveStatus, DiskError> {
        let drive = self.removable_drive(drive)?;
        if !drive.removable {
            return Err(DiskError::NotRemovable { drive: drive.id.clone() });
        }
        drive.change_media(Some(Drive::open_media(path, true)?))?;
        Ok(drive.status())
    }

    /// Moves fixed disk `drive` onto a new qcow2 overlay `top` on its image (see
    /// [`Drive::switch_to_overlay`]) with the vCPUs paused: a disk-only snapshot of the running VM. Returns
    /// the drive's status and how long the guest was paused.
    pub fn switch_drive_to_overlay(
        &self,
        drive: &str,
        top: &std::path::Path,
        backing_name: Option<&std::path::Path>,
        backing: &[std::path::PathBuf],
    ) -> Result<(DriveStatus, Duration), String> {
        let drive = self
            .drives
            .iter()
            .find(|d| d.id == drive)
            .ok_or_else(|| DiskError::NoSuchDrive(drive.to_owned()).to_string())?;
        let started = std::time::Instant::now();
        let was_running = self.state() == RunState::Running;
        if was_running && let Err(e) = self.pause_for_work() {
            self.resume();
            return Err(format!("cannot pause the VM for the switch: {e}"));
        }
        let switched = drive.switch_to_overlay(top, backing_name, backing);
        if was_running {
            self.resume();
        }
        switched.map_err(|e| e.to_string())?;
        Ok((drive.status(), started.elapsed()))
    }

    /// Empties a removable drive; the guest is told.
    pub fn eject_media(&self, drive: Option<&str>) -> Result<DriveStatus, DiskError> {
        let drive = self.removable_drive(drive)?;
        drive.change_media(None)?;
        Ok(drive.status())
    }

    pub fn counters(&self) -> CountersSnapshot {
        let mut s = self.counters.snapshot();
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        s.unhandled_pio_reads = l(&self.pio_unhandled.reads);
        s.unhandled_pio_writes = l(&self.pio_unhandled.writes);
        s.unhandled_mmio_reads = l(&self.mmio_unhandled.reads);
        s.unhandled_mmio_writes = l(&self.mmio_unhandled.writes);
        s.serial_bytes_out = l(&self.serial_stats.bytes_out);
        s.serial_bytes_in = l(&self.serial_stats.bytes_in);
        s.serial_bytes_lost = l(&self.serial_stats.lost_out);
        s.last_post_code = l(&self.post_code);
        s.uptime_ms = self.uptime().as_millis() as u64;
        for d in &self.drives {
            let st = &d.stats;
            s.disk_reads += l(&st.reads);
            s.disk_writes += l(&st.writes);
            s.disk_flushes += l(&st.flushes);
            s.disk_bytes_read += l(&st.bytes_read);
            s.disk_bytes_written += l(&st.bytes_written);
            s.disk_errors += l(&st.errors);
            s.disk_malformed += l(&st.malformed);
            s.disk_slowest_transfer_us = s.disk_slowest_transfer_us.max(l(&st.slowest_transfer_us));
            s.disk_slowest_wait_us = s.disk_slowest_wait_us.max(l(&st.slowest_wait_us));
            s.disk_throttled_us += l(&st.throttled_us);
        }
        if let Some(b) = &self.balloon {
            let c = &b.counters;
            s.balloon_inflated_pages = l(&c.inflated_pages);
            s.balloon_deflated_pages = l(&c.deflated_pages);
            s.balloon_reported_pages = l(&c.reported_pages);
            s.balloon_invalid_pages = l(&c.invalid_pages);
            s.balloon_malformed = l(&c.malformed);
        }
        for n in &self.nics {
            let st = &n.stats;
            s.net_rx_frames += l(&st.rx_frames);
            s.net_rx_bytes += l(&st.rx_bytes);
            s.net_tx_frames += l(&st.tx_frames);
            s.net_tx_bytes += l(&st.tx_bytes);
            s.net_dropped += l(&st.rx_dropped) + l(&st.tx_dropped);
            s.net_malformed += l(&st.malformed);
        }
        s
    }
}

/// A VM and everything that outlives its reboots.
pub struct Vm {
    config: VmConfig,
    kvm: Kvm,
    supported_cpuid: CpuId,
    start: Start,
    handle: Arc<VmHandle>,
    crash: Arc<Mutex<Option<String>>>,
    serial: Arc<Mutex<Serial>>,
    rtc: Arc<Mutex<Rtc>>,
    irqs: Irqs,
    seccomp: bool,
    /// Standard input bytes read but not yet taken by the UART.
    pending_input: Vec<u8>,
    /// Keeps the console screen up to date.
    refresher: Arc<Refresher>,
    /// A machine state to start the first boot from instead of booting (`--restore`).
    restore: Option<state::Restore>,
    /// The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST).
    msr_indices: Arc<Vec<u32>>,
    /// Guest RAM, mapped once and zeroed for each boot after the first. Last, so that it is unmapped after
    /// everything else here is gone (every boot's users of the memory end with the boot).
    ram: Vec<AlignedRam>,
}

/// The BIOS image as a read-only memory slot at `address` (guest writes to it exit and are dropped).
/// Starts a vCPU's thread: it applies the vCPU seccomp filter (if any), then runs the vCPU until its boot
/// ends.
fn spawn_vcpu(v: Vcpu, filter: Option<seccompiler::BpfProgram>) -> Result<JoinHandle<()>, VmError> {
    std::thread::Builder::new()
        .name(format!("vcpu{}", v.index))
        .spawn(move || {
            if let Some(filter) = filter
                && let Err(e) = seccompiler::apply_filter(&filter)
            {
                v.machine.request(MachineRequest::Crash);
                log::error!("vCPU {}: cannot apply its seccomp filter: {e}", v.index);
                v.run.thread_done();
                return;
            }
            v.run_loop();
        })
        .map_err(io_err("start a vCPU thread"))
}

fn map_rom(vm: &VmFd, slot: u32, address: u64, image: &[u8]) -> Result<GuestRegionMmap, VmError> {
    let kib = image.len() as u64 >> 10;
    let err = |reason: String| VmError::Memory { mib: kib.div_ceil(1024), reason: format!("BIOS image: {reason}") };
    let region = MmapRegion::new(image.len())
        .ok()
        .and_then(|m| GuestRegionMmap::new(m, GuestAddress(address)))
        .ok_or_else(|| err("cannot map it".into()))?;
    region.write_slice(image, MemoryRegionAddress(0)).map_err(|e| err(e.to_string()))?;
    let host = region.get_host_address(MemoryRegionAddress(0)).map_err(|e| err(e.to_string()))?;
    let slot_region = kvm_userspace_memory_region {
        slot,
        guest_phys_addr: address,
        memory_size: image.len() as u64,
        userspace_addr: host as u64,
        flags: kvm_bindings::KVM_MEM_READONLY,
    };
    // SAFETY: the region lives in `Boot`, dropped after the KVM VM.
    unsafe { vm.set_user_memory_region(slot_region) }.map_err(kvm_err("map the BIOS image"))?;
    Ok(region)
}

/// The display devices of one boot.
struct DisplayDevices {
    dispi: Arc<Mutex<Dispi>>,
    vga: Arc<Mutex<Vga>>,
}

/// A device as the buses hold it.
type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// The devices of one boot that keep state (besides the serial port and the RTC, which outlive boots).
struct BootDevices {
    display: DisplayDevices,
    i8042: Arc<Mutex<I8042>>,
    pm1_event: Arc<Mutex<Pm1Event>>,
    pm1_control: Arc<Mutex<Pm1Control>>,
    gpe0: Arc<Mutex<Gpe0>>,
    cpu_hotplug: Arc<Mutex<CpuHotplug>>,
    pci_ports: Arc<Mutex<PciConfigPorts>>,
    /// fw_cfg, on firmware boots.
    fw_cfg: Option<Arc<Mutex<crate::devices::fw_cfg::FwCfg>>>,
}

/// One boot of the VM: the KVM VM and its vCPU threads.
struct Boot {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    /// The buses, and the seccomp filter of vCPU threads, for vCPUs added while the VM runs.
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    vcpu_filter: Option<seccompiler::BpfProgram>,
    vram: Arc<GuestRegionMmap>,
    /// The devices whose state a machine-state file holds.
    devices: BootDevices,
    /// The BIOS image's read-only slot below 4 GiB (firmware boots).
    _rom: Option<GuestRegionMmap>,
    threads: Vec<JoinHandle<()>>,
    /// The PCI devices; dropping them stops their I/O threads.
    pci: Arc<PciBus>,
    /// Their interrupts, whose resample fds the event loop serves.
    interrupts: Vec<Arc<VirtioInterrupt>>,
}

impl Vm {
    /// Validates `config`, opens KVM and the boot files. Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        config.validate(kvm.get_max_vcpus() as u32)?;
        let supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("report its supported CPUID"))?;
        let mut msr_indices = kvm.get_msr_index_list().map_err(kvm_err("list the MSRs it saves"))?.as_slice().to_vec();
        // The MTRRs, which KVM emulates but does not list (those it cannot read are left out at save time).
        for msr in crate::cpu_state::MTRR_MSRS {
            if !msr_indices.contains(&msr) {
                msr_indices.push(msr);
            }
        }
        let open = |what, path: &std::path::Path| {
            File::open(path).map_err(|source| VmError::Open { what, path: path.to_owned(), source })
        };
        let start = match (&config.boot, &config.firmware) {
            (Some(boot), _) => Start::Kernel(BootFiles {
                kernel: open("the kernel", &boot.kernel)?,
                initrd: boot.initrd.as_deref().map(|p| open("the initrd", p)).transpose()?,
                cmdline: boot.cmdline.clone(),
            }),
            (None, Some(fw)) => Start::Firmware(crate::firmware::FirmwareImages::load(fw, config.vga)?),
            (None, None) => return Err(ConfigError::NothingToBoot.into()),
        };
        let output = match &config.serial {
            SerialSink::Stdio => SerialOutput::Stdout(std::io::stdout()),
            SerialSink::File(path) => SerialOutput::File(
                std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|source| VmError::Open {
                    what: "the serial log",
                    path: path.clone(),
                    source,
                })?,
            ),
            SerialSink::None => SerialOutput::Discard,
        };
        let mut drives = Vec::new();
        for (d, id) in config.drives.iter().zip(crate::config::drive_ids(&config.drives)) {
            let media = d
                .path
                .as_deref()
                .map(|p| Drive::open_media_on(p, d.read_only || d.removable, d.format, &d.backing))
                .transpose()?;
            let serial = d.serial.clone().unwrap_or_else(|| id.clone());
            let drive = Drive::new(id, d.read_only, d.removable, serial, media);
            drive.set_limits(d.limits);
            drives.push(Arc::new(drive));
        }
        // Back ends start now: spawning passt and opening TAP devices is impossible under the seccomp filters.
        let mut nics = Vec::new();
        for (i, (n, id)) in config.nics.iter().zip(crate::net::nic_ids(&config.nics)).enumerate() {
            nics.push(Arc::new(crate::net::Nic::open(n, id, &config.name, i).map_err(ConfigError::from)?));
        }
        let irqs = Irqs::new().map_err(io_err("create interrupt eventfds"))?;
        let serial_stats = Arc::new(SerialStats::new().map_err(io_err("create the serial eventfd"))?);
        let serial = Arc::new(Mutex::new(Serial::new(irqs.com1.clone(), output, serial_stats.clone())));
        let rtc = Arc::new(Mutex::new(Rtc::new(config.memory_bytes(), config.vcpus)));
        if let Start::Firmware(fw) = &start {
            fw.set_boot_order(&mut lock(&rtc));
        }
        let screen = Screen::new();
        let gpu = (config.vga == crate::config::VgaMode::Virtio)
            .then(|| GpuShared::new(screen.clone(), config.display.width, config.display.height));
        let agent = match config.agent {
            crate::config::AgentMode::None => None,
            crate::config::AgentMode::Spice => {
                let screen = screen.clone();
                let agent = crate::vdagent::Agent::new(Box::new(move |text: String| screen.set_clipboard(&text)))
                    .map_err(io_err("create the agent channel's eventfd"))?;
                Some(Arc::new(agent))
            }
        };
        let handle = Arc::new(VmHandle {
            name: config.name.clone(),
            vcpus: AtomicU32::new(config.vcpus),
            max_vcpus: config.possible_vcpus(),
            memory_mib: config.memory_mib,
            started: Instant::now(),
            stop_timeout: Duration::from_millis(config.stop_timeout_ms),
            run: Arc::new(RunControl::default()),
            machine: MachineControl::new().map_err(io_err("create the machine eventfd"))?,
            counters: Arc::new(Counters::default()),
            serial_stats,
            pio_unhandled: Arc::default(),
            mmio_unhandled: Arc::default(),
            post_code: Arc::default(),
            pm1_event: Mutex::new(None),
            i8042: Mutex::new(None),
            pointer: Mutex::new(None),
            tablet: Mutex::new(None),
            keyboard: Mutex::new(None),
            key_route: Mutex::new(virtio_input::KeyRoute::default()),
            balloon: config.balloon.then(|| BalloonShared::new(config.memory_mib)),
            gpu,
            agent,
            sound: config.sound,
            screen: screen.clone(),
            stop_deadline: Mutex::new(None),
            loop_wake: EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("create the loop eventfd"))?,
            drives,
            nics,
            serial_input: Mutex::new(Vec::new()),
            crashed: Mutex::new(None),
            vcpu_request: Mutex::new(None),
            save_request: Mutex::new(None),
            saving: Default::default(),
            suspended: Default::default(),
        });
        Ok(Vm {
            config,
            kvm,
            supported_cpuid,
            start,
            handle,
            crash: Arc::default(),
            serial,
            rtc,
            irqs,
            seccomp: true,
            pending_input: Vec::new(),
            refresher: Refresher::new(screen),
            restore: None,
            msr_indices: Arc::new(msr_indices),
            ram: Vec::new(),
        })
    }

    /// Turns the seccomp filters off (for debugging a VMM that a filter kills).
    pub fn disable_seccomp(&mut self) {
        self.seccomp = false;
    }

    /// The handle the control socket uses.
    pub fn handle(&self) -> Arc<VmHandle> {
        self.handle.clone()
    }

    /// The console screen (what RFB clients show).
    pub fn screen(&self) -> Arc<Screen> {
        self.refresher.screen.clone()
    }

    /// The refresher, for the benchmark frame source that writes video memory from the host.
    pub fn refresher(&self) -> Arc<Refresher> {
        self.refresher.clone()
    }

    fn create_kvm_vm(&self) -> Result<VmFd, VmError> {
        let vm = self.kvm.create_vm().map_err(kvm_err("create a VM"))?;
        vm.set_tss_address(layout::KVM_TSS as usize).map_err(kvm_err("set the TSS address"))?;
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP).map_err(kvm_err("set the identity map address"))?;
        vm.create_irq_chip().map_err(kvm_err("create the in-kernel PIC and IOAPIC"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;
        Ok(vm)
    }

    /// Guest RAM for one boot: the VM's huge-page-aligned mappings ([`crate::ram`]), fresh for the first
    /// boot and zeroed for each later one (the previous boot, and every thread that used its memory, has
    /// ended by then).
    fn create_memory(&mut self, vm: &VmFd) -> Result<GuestMemoryMmap, VmError> {
        let mib = self.config.memory_mib;
        let mem_err = |e: std::io::Error| VmError::Memory { mib, reason: e.to_string() };
        let ranges = layout::ram_regions(self.config.memory_bytes());
        if self.ram.is_empty() {
            for &(_, size) in &ranges {
                self.ram.push(AlignedRam::new(size as usize).map_err(mem_err)?);
            }
        } else {
            for ram in &self.ram {
                ram.zero().map_err(mem_err)?;
            }
        }
        let mut regions = Vec::new();
        for (&(start, _), ram) in ranges.iter().zip(&self.ram) {
            // SAFETY: `ram` is a live read-write private anonymous mapping of `ram.len()` bytes, owned by this
            // VM, which outlives every boot and so every user of this region (see the `ram` field).
            let mapping = unsafe {
                MmapRegion::build_raw(
                    ram.addr(),
                    ram.len(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .map_err(|e| VmError::Memory { mib, reason: e.to_string() })?;
            regions.push(
                GuestRegionMmap::new(mapping, GuestAddress(start))
                    .ok_or_else(|| VmError::Memory { mib, reason: "RAM region wraps around".into() })?,
            );
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| VmError::Memory { mib, reason: e.to_string() })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VmError::Memory { mib, reason: e.to_string() })?;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which outlives the KVM VM (both are
            // dropped together in `Boot`, the VM first).
            unsafe { vm.set_user_memory_region(slot_region) }.map_err(kvm_err("map guest memory"))?;
        }
        Ok(mem)
    }

    /// The PCI bus: the host bridge, a virtio-blk device per drive (each with INTA# on its own GSI), then the
    /// display (its video memory slot `vram_slot` follows BAR 0).
    fn build_pci(
        &self,
        vm: &Arc<VmFd>,
        mem: &GuestMemoryMmap,
        display: &DisplayDevices,
        vram: &Arc<GuestRegionMmap>,
        vram_slot: u32,
    ) -> Result<(PciBus, Vec<Arc<VirtioInterrupt>>), VmError> {
        let mut bus = PciBus::new(self.handle.mmio_unhandled.clone());
        let mut interrupts = Vec::new();
        // MSI-X vectors of every device get GSIs (above the IOAPIC's) routed by one table.
        let router = Arc::new(GsiRouter::new(vm.clone()));
        let msi = || Some(router.clone());
        for (drive, config) in self.handle.drives.iter().zip(&self.config.drives) {
            let slot = bus.free_slot()?;
            let gsi = pci::slot_gsi(slot);
            let interrupt = Arc::new(VirtioInterrupt::new().map_err(io_err("create a disk interrupt eventfd"))?);
            vm.register_irqfd_with_resample(interrupt.line(), interrupt.resample_fd(), gsi)
                .map_err(kvm_err("route a PCI interrupt (irqfd)"))?;
            let bar = bus.allocate_bar(crate::virtio::pci::BAR_SIZE)?;
            let device: Arc<Mutex<dyn pci::PciDevice>> = if config.cdrom {
                // A CD/DVD drive: a SCSI CD-ROM on its own virtio-scsi controller (what SeaBIOS boots ISOs from).
                let scsi =
                    VirtioScsi::new(drive.clone(), interrupt.clone()).map_err(io_err("start a CD drive's thread"))?;
                let transport =
                    VirtioPci::new(scsi, bar, gsi as u8, interrupt.clone(), mem.clone(), Some(vm.clone()), msi())
                        .map_err(io_err("give a CD drive its MSI-X vectors"))?;
                Arc::new(Mutex::new(transport))
            } else {
                let block =
                    VirtioBlock::new(drive.clone(), interrupt.clone()).map_err(io_err("start a disk's threads"))?;
                let transport =
                    VirtioPci::new(block, bar, gsi as u8, interrupt.clone(), mem.clone(), Some(vm.clone()), msi())
                        .map_err(io_err("give a disk its MSI-X vectors"))?;
                Arc::new(Mutex::new(transport))
            };
            bus.insert(slot, device)?;
            interrupts.push(interrupt);
        }
        for nic in self.handle.nics.iter().filter(|n| n.attached()) {
            let slot = bus.free_slot()?;
            let gsi = pci::slot_gsi(slot);
            let interrupt = Arc::new(VirtioInterrupt::new().map_err(io_err("create a network interrupt eventfd"))?);
            vm.register_irqfd_with_resample(interrupt.line(), interrupt.resample_fd(), gsi)
                .map_err(kvm_err("route a PCI interrupt (irqfd)"))?;
            let bar = bus.allocate_bar(crate::virtio::pci::BAR_SIZE)?;
            let net =
                VirtioNet::new(nic.clone(), interrupt.clone()).map_err(io_err("start a network card's thread"))?;
            let device = VirtioPci::new(net, bar, gsi as u8, interrupt.clone(), mem.clone(), Some(vm.clone()), msi())
                .map_err(io_err("give a network card its MSI-X vectors"))?;
            bus.insert(slot, Arc::new(Mutex::new(device)))?;
            interrupts.push(interrupt);
        }
        if self.config.input == crate::config::InputMode::Virtio {
            // A tablet, then a keyboard, each a function of its own slot.
            for profile in [virtio_input::Profile::Tablet, virtio_input::Profile::Keyboard] {
                let slot = bus.free_slot()?;
                let gsi = pci::slot_gsi(slot);
                let interrupt =
                    Arc::new(VirtioInterrupt::new().map_err(io_err("create an input device's interrupt eventfd"))?);
                vm.register_irqfd_with_resample(interrupt.line(), interrupt.resample_fd(), gsi)
                    .map_err(kvm_err("route a PCI interrupt (irqfd)"))?;
                let bar = bus.allocate_bar(crate::virtio::pci::BAR_SIZE)?;
                let device =
                    VirtioInput::new(profile, interrupt.clone()).map_err(io_err("start an input device's thread"))?;
                let handle = Some(device.input().clone());
                match profile {
                    virtio_input::Profile::Tablet => *lock(&self.handle.tablet) = handle,
                    virtio_input::Profile::Keyboard => *lock(&self.handle.keyboard) = handle,
                }
                let device =
                    VirtioPci::new(device, bar, gsi as u8, interrupt.clone(), mem.clone(), Some(vm.clone()), msi())
                        .map_err(io_err("give an input device its MSI-X vectors"))?;
                bus.insert(slot, Arc::new(Mutex::new(device)))?;
                interrupts.push(interrupt);
            }
        }
        if let Some(agent) = &self.handle.agent {
            let slot = bus.free_slot()?;
            let gsi = pci::slot_gsi(slot);
            let interrupt =
                Arc::new(VirtioInterrupt::new().map_err(io_err("create the agent port's interrupt eventfd"))?);
            vm.register_irqfd_with_resample(interrupt.line(), interrupt.resample_fd(), gsi)
                .map_err(kvm_err("route a PCI interrupt (irqfd)"))?;
            let bar = bus.allocate_bar(crate::virtio::pci::BAR_SIZE)?;
            let console = crate::virtio::console::VirtioConsole::new(agent.clone(), interrupt.clone())
                .map_err(io_err("start the agent port's thread"))?;
            let device =
                VirtioPci::new(console, bar, gsi as u8, interrupt.clone(), mem.clone(), Some(vm.clone()), msi())
                    .map_err(io_err("give the agent port its MSI-X vectors"))?;
            bus.insert(slot, Arc::new(Mutex::new(device)))?;
            interrupts.push(interrupt);
        }
        if self.handle.sound != crate::config::SoundMode::None {
            let screen = self.refresher.screen.clone();
            // A new boot plays nothing yet (listeners get the end of what the last boot played).
            screen.audio_stop();
            let slot = bus.free_slot()?;
            let gsi = pci::slot_gsi(slot);
            let interrupt =
                Arc::new(VirtioInterrupt::new().map_err(io_err("create the sound card's interrupt eventfd"))?);
            vm.register_irqfd_with_resample(interrupt.line(), interrupt.resample_fd(), gsi)
                .map_err(kvm_err("route a PCI interrupt (irqfd)"))?;
            let device: pci::SharedPciDevice = if self.handle.sound == crate::config::SoundMode::Hda {
                let bar = bus.allocate_bar(pci::hda::BAR_SIZE)?;
                let hda = pci::hda::Hda::new(screen, mem.clone(), bar, gsi as u8, interrupt.clone())
                    .map_err(io_err("start the sound card's thread"))?;
                hda.follow_pauses(&self.handle.run);
                Arc::new(Mutex::new(hda))
            } else {
                let bar = bus.allocate_bar(crate::virtio::pci::BAR_SIZE)?;
                let sound = crate::virtio::sound::VirtioSound::new(screen, interrupt.clone())
                    .map_err(io_err("start the sound card's thread"))?;
                sound.follow_pauses(&self.handle.run);
                let device =
                    VirtioPci::new(sound, bar, gsi as u8, interrupt.clone(), mem.clone(), Some(vm.clone()), msi())
                        .map_err(io_err("give the sound card its MSI-X vectors"))?;
                Arc::new(Mutex::new(device))
            };
            bus.insert(slot, device)?;
            interrupts.push(interrupt);
        }
        if let Some(shared) = &self.handle.balloon {
            let slot = bus.free_slot()?;
            let gsi = pci::slot_gsi(slot);
            let interrupt = Arc::new(VirtioInterrupt::new().map_err(io_err("create the balloon's interrupt eventfd"))?);
            vm.register_irqfd_with_resample(interrupt.line(), interrupt.resample_fd(), gsi)
                .map_err(kvm_err("route a PCI interrupt (irqfd)"))?;
            let bar = bus.allocate_bar(crate::virtio::pci::BAR_SIZE)?;
            let balloon =
                VirtioBalloon::new(shared.clone(), interrupt.clone()).map_err(io_err("start the balloon's thread"))?;
            let device =
                VirtioPci::new(balloon, bar, gsi as u8, interrupt.clone(), mem.clone(), Some(vm.clone()), msi())
                    .map_err(io_err("give the balloon its MSI-X vectors"))?;
            bus.insert(slot, Arc::new(Mutex::new(device)))?;
            interrupts.push(interrupt);
        }
        let host = vram
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory { mib: display::VRAM_BYTES >> 20, reason: e.to_string() })?
            as u64;
        let (kvm_vm, version) = (vm.clone(), self.refresher.registers_version.clone());
        let move_vram = Box::new(move |address: u64| {
            let region = kvm_userspace_memory_region {
                slot: vram_slot,
                guest_phys_addr: address,
                memory_size: display::VRAM_BYTES,
                userspace_addr: host,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
            };
            // SAFETY: the same live mapping as before (owned by `Boot`), only at another guest address.
            match unsafe { kvm_vm.set_user_memory_region(region) } {
                Ok(()) => log::debug!("video memory moved to {address:#x}"),
                Err(e) => log::warn!("cannot move video memory to {address:#x}: {e}"),
            }
            // The dirty log starts afresh: have the console compare everything once.
            version.fetch_add(1, Ordering::Release);
        });
        let slot = bus.free_slot()?;
        if let Some(shared) = &self.handle.gpu {
            // virtio-vga: the VGA ports and Bochs VBE registers stay on the I/O bus for firmware and boot
            // loaders; the video memory is BAR 0, virtio-gpu's registers BAR 2.
            let gsi = pci::slot_gsi(slot);
            let interrupt = Arc::new(VirtioInterrupt::new().map_err(io_err("create the display's interrupt eventfd"))?);
            vm.register_irqfd_with_resample(interrupt.line(), interrupt.resample_fd(), gsi)
                .map_err(kvm_err("route a PCI interrupt (irqfd)"))?;
            let bar = bus.allocate_bar(crate::virtio::pci::BAR_SIZE)?;
            let gpu =
                VirtioGpu::new(shared.clone(), interrupt.clone()).map_err(io_err("start the display's thread"))?;
            let vram = pci::std_vga::VramBar::new(display::LFB_BASE, display::VRAM_BYTES, move_vram);
            let device =
                VirtioPci::new_vga(gpu, vram, bar, gsi as u8, interrupt.clone(), mem.clone(), Some(vm.clone()), msi())
                    .map_err(io_err("give the display its MSI-X vectors"))?;
            bus.insert(slot, Arc::new(Mutex::new(device)))?;
            interrupts.push(interrupt);
        } else {
            let mmio = bus.allocate_bar(pci::std_vga::MMIO_BAR_SIZE)?;
            let vga = pci::std_vga::StdVga::new(
                display.dispi.clone(),
                display.vga.clone(),
                display::LFB_BASE,
                display::VRAM_BYTES,
                mmio,
                move_vram,
            );
            bus.insert(slot, Arc::new(Mutex::new(vga)))?;
        }
        Ok((bus, interrupts))
    }

    fn build_buses(
        &self,
        machine: &MachineControl,
        display: DisplayDevices,
        pci: &Arc<PciBus>,
    ) -> Result<(Bus, Bus, BootDevices), VmError> {
        let h = &self.handle;
        let mut pio = Bus::with_counts(h.pio_unhandled.clone());
        let mut mmio = Bus::with_counts(h.mmio_unhandled.clone());
        mmio.insert(
            Arc::new(Mutex::new(PciMmioWindow::new(pci.clone()))),
            pci::MMIO_WINDOW_START,
            pci::MMIO_WINDOW_END - pci::MMIO_WINDOW_START,
        )?;
        let i8042 =
            Arc::new(Mutex::new(I8042::new(self.irqs.keyboard.clone(), self.irqs.mouse.clone(), machine.clone())));
        let pm1_event = Arc::new(Mutex::new(Pm1Event::new(self.irqs.sci.clone())));
        let pm1_control = Arc::new(Mutex::new(Pm1Control::new(machine.clone())));
        let gpe0 = Arc::new(Mutex::new(Gpe0::new(self.irqs.sci.clone())));
        let cpu_hotplug = Arc::new(Mutex::new(CpuHotplug::new(self.config.vcpus, self.config.possible_vcpus())));
        let pci_ports = Arc::new(Mutex::new(PciConfigPorts::new(pci.clone(), machine.clone())));
        let devices: [(SharedDevice, u16, u64); 11] = [
            (display.dispi.clone(), DISPI_INDEX_PORT, DISPI_PORT_LEN),
            (display.vga.clone(), VGA_PORT, VGA_PORT_LEN),
            (self.serial.clone(), COM1_PORT, 8),
            (self.rtc.clone(), RTC_PORT, 2),
            (i8042.clone(), i8042::I8042_DATA_PORT, 5),
            (pm1_event.clone(), acpi_pm::PM1A_EVT_PORT, acpi_pm::PM1A_EVT_LEN),
            (pm1_control.clone(), acpi_pm::PM1A_CNT_PORT, acpi_pm::PM1A_CNT_LEN),
            (gpe0.clone(), acpi_pm::GPE0_PORT, acpi_pm::GPE0_LEN),
            (cpu_hotplug.clone(), cpu_hotplug::CPU_HOTPLUG_PORT, cpu_hotplug::CPU_HOTPLUG_LEN),
            (pci_ports.clone(), pci::CONFIG_ADDRESS_PORT, pci::CONFIG_PORTS_LEN),
            (Arc::new(Mutex::new(PostCode::new(h.post_code.clone()))), POST_CODE_PORT, 1),
        ];
        for (device, port, len) in devices {
            pio.insert(device, u64::from(port), len)?;
        }
        *lock(&h.pm1_event) = Some(pm1_event.clone());
        *lock(&h.i8042) = Some(i8042.clone());
        let devices =
            BootDevices { display, i8042, pm1_event, pm1_control, gpe0, cpu_hotplug, pci_ports, fw_cfg: None };
        Ok((pio, mmio, devices))
    }

    /// Video memory: its own memslot at the framebuffer address, with KVM's dirty-page log on.
    ///
    /// (See also [`map_rom`] for the firmware image.)
    fn create_vram(&self, vm: &VmFd, slot: u32) -> Result<Arc<GuestRegionMmap>, VmError> {
        let mib = display::VRAM_BYTES >> 20;
        let region = MmapRegion::new(display::VRAM_BYTES as usize)
            .ok()
            .and_then(|m| GuestRegionMmap::new(m, GuestAddress(display::LFB_BASE)))
            .ok_or_else(|| VmError::Memory { mib, reason: "cannot map video memory".into() })?;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmError::Memory { mib, reason: e.to_string() })?;
        let slot_region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: display::LFB_BASE,
            memory_size: display::VRAM_BYTES,
            userspace_addr: host as u64,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
        };
        // SAFETY: the region lives in `Boot`, dropped after the KVM VM.
        unsafe { vm.set_user_memory_region(slot_region) }.map_err(kvm_err("map video memory"))?;
        Ok(Arc::new(region))
    }

    /// Builds and starts one boot of the machine.
    fn boot(&mut self) -> Result<Boot, VmError> {
        let vm = Arc::new(self.create_kvm_vm()?);
        let mem = self.create_memory(&vm)?;
        let vram = self.create_vram(&vm, mem.num_regions() as u32)?;
        self.irqs.register(&vm)?;
        let machine = self.handle.machine.clone();
        let version = self.refresher.registers_version.clone();
        let display = DisplayDevices {
            dispi: Arc::new(Mutex::new(Dispi::new(
                display::MAX_WIDTH as u16,
                display::MAX_HEIGHT as u16,
                display::VRAM_BYTES,
                version.clone(),
            ))),
            vga: Arc::new(Mutex::new(Vga::new(version))),
        };
        let vram_slot = mem.num_regions() as u32;
        let (pci_bus, interrupts) = self.build_pci(&vm, &mem, &display, &vram, vram_slot)?;
        let pci_bus = Arc::new(pci_bus);
        let (mut pio, mmio, mut devices) = self.build_buses(&machine, display, &pci_bus)?;
        let restore = self.restore.take();
        let mut rom = None;
        let cpus = self.cpus();
        let entry = match &mut self.start {
            // Restoring: memory and registers come from the state, nothing is loaded.
            Start::Kernel(_) if restore.is_some() => None,
            Start::Kernel(files) => {
                let rsdp = crate::acpi::write_tables(&mem, cpus)?;
                let fb = boot::LinearFramebuffer {
                    base: display::LFB_BASE,
                    size: display::VRAM_BYTES,
                    width: self.config.display.width as u16,
                    height: self.config.display.height as u16,
                };
                let entry = boot::load(&mem, files, self.config.memory_bytes(), rsdp, Some(fb))?;
                if let boot::Entry::Linux64 { .. } | boot::Entry::Linux32 { .. } = entry {
                    // Linux is told about the framebuffer, so the mode is set as firmware would have set it.
                    lock(&devices.display.dispi).set_mode(fb.width, fb.height, 32);
                }
                Some(entry)
            }
            Start::Firmware(fw) => {
                fw.copy_low(&mem)?;
                rom = Some(map_rom(&vm, vram_slot + 1, fw.rom_address(), &fw.bios)?);
                let fw_cfg = Arc::new(Mutex::new(fw.fw_cfg(&mem, self.config.memory_bytes(), cpus)?));
                devices.fw_cfg = Some(fw_cfg.clone());
                pio.insert(
                    fw_cfg,
                    u64::from(crate::devices::fw_cfg::FW_CFG_PORT),
                    crate::devices::fw_cfg::FW_CFG_PORT_LEN,
                )?;
                let log = fw.log.as_ref().and_then(|f| f.try_clone().ok());
                let debugcon =
                    crate::devices::debugcon::DebugCon::new(log.map(|f| Box::new(f) as Box<dyn std::io::Write + Send>));
                pio.insert(Arc::new(Mutex::new(debugcon)), u64::from(crate::devices::debugcon::DEBUGCON_PORT), 1)?;
                None
            }
        };
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        // Before the console sees this boot: it must never show a half-restored machine.
        if let Some(restore) = &restore {
            self.restore_devices(restore, &vram, &devices, &pci_bus)?;
        }
        let display = &devices.display;
        self.refresher.attach(BootView {
            vm: vm.clone(),
            ram: mem.clone(),
            vram: vram.clone(),
            vram_slot,
            dispi: display.dispi.clone(),
            vga: display.vga.clone(),
        });
        if let Some(entry) = entry {
            cpu::write_boot_tables(&mem, entry)?;
        }

        let mut vcpus = Vec::new();
        for index in 0..self.config.vcpus {
            let v = self.create_vcpu(&vm, index, (&pio, &mmio, &mem))?;
            // Firmware starts from the reset state KVM gives a new vCPU (CS:IP F000:FFF0, the reset vector).
            if index == 0
                && let Some(entry) = entry
            {
                cpu::setup_boot_registers(&v.fd, entry)?;
            }
            vcpus.push(v);
        }
        if let Some(restore) = &restore {
            restore.apply_kvm(&vm, &vcpus)?;
            log::info!("{}: restored from its saved state", self.config.name);
        }
        vcpu::install_kick_handler().map_err(io_err("install the vCPU kick signal handler"))?;
        let vcpu_filter = if self.seccomp { Some(seccomp::vcpu_filter()?) } else { None };
        // Before any thread starts: the previous boot's stop must not reach this boot's vCPUs.
        self.handle.run.begin_boot(vcpus.len());
        let mut threads = Vec::new();
        for v in vcpus {
            threads.push(spawn_vcpu(v, vcpu_filter.clone())?);
        }
        self.handle.counters.boots.fetch_add(1, Ordering::Relaxed);
        Ok(Boot { vm, mem, pio, mmio, vcpu_filter, vram, devices, _rom: rom, threads, pci: pci_bus, interrupts })
    }

    /// The vCPUs present now and possible, as the ACPI tables and the firmware describe them.
    fn cpus(&self) -> crate::acpi::Cpus {
        crate::acpi::Cpus::new(self.config.vcpus, self.config.possible_vcpus())
    }

    /// Creates vCPU `index` of the KVM VM, set up as every vCPU starts (CPUID for the possible count).
    fn create_vcpu(
        &self,
        vm: &VmFd,
        index: u32,
        (pio, mmio, mem): (&Arc<Bus>, &Arc<Bus>, &GuestMemoryMmap),
    ) -> Result<Vcpu, VmError> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(kvm_err("create a vCPU"))?;
        cpu::setup_common(&fd, &self.supported_cpuid, index, self.config.possible_vcpus())?;
        Ok(Vcpu {
            index,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
            machine: self.handle.machine.clone(),
            counters: self.handle.counters.clone(),
            run: self.handle.run.clone(),
            crash: self.crash.clone(),
        })
    }

    /// Adds vCPUs up to `count` to the running boot: each is created and its thread started (it waits in
    /// KVM for the guest's INIT/SIPI), then the guest is told through the CPU hotplug device and its GPE.
    /// From now on the VM has `count` vCPUs, across reboots too. Returns the count now.
    fn add_vcpus(&mut self, boot: &mut Boot, count: u32) -> Result<u32, String> {
        if lock(&self.handle.crashed).is_some() {
            return Err("the guest has crashed: its vCPUs are stopped; reset the VM or power it off".into());
        }
        let max = self.config.possible_vcpus();
        if count > max {
            return Err(format!("at most {max} vCPUs"));
        }
        while self.config.vcpus < count {
            let index = self.config.vcpus;
            let v = self
                .create_vcpu(&boot.vm, index, (&boot.pio, &boot.mmio, &boot.mem))
                .map_err(|e| format!("vCPU {index}: {e}"))?;
            // Counted before it starts, so that a pause meanwhile waits for it.
            self.handle.run.add_vcpu();
            match spawn_vcpu(v, boot.vcpu_filter.clone()) {
                Ok(thread) => boot.threads.push(thread),
                Err(e) => {
                    self.handle.run.thread_done_unstarted();
                    return Err(format!("vCPU {index}: {e}"));
                }
            }
            self.config.vcpus = index + 1;
            self.handle.vcpus.store(self.config.vcpus, Ordering::Release);
            lock(&self.rtc).set_cpus(self.config.vcpus);
            log::info!("{}: vCPU {index} added", self.config.name);
        }
        if lock(&boot.devices.cpu_hotplug).plug_up_to(count) > 0
            && !lock(&boot.devices.gpe0).raise(cpu_hotplug::GPE_CPU_HOTPLUG)
        {
            log::info!(
                "{}: the guest has not enabled the CPU hotplug event yet; it sees the new vCPUs when it does",
                self.config.name
            );
        }
        Ok(self.config.vcpus)
    }

    /// Feeds buffered standard input to the UART; returns whether everything pending was taken.
    /// Moves waiting input (stdin's, then the control socket's) into the UART's FIFO; returns whether all of
    /// it fitted.
    fn feed_serial(&mut self) -> bool {
        loop {
            if self.pending_input.is_empty() {
                self.pending_input = std::mem::take(&mut *lock(&self.handle.serial_input));
                if self.pending_input.is_empty() {
                    return true;
                }
            }
            let taken = lock(&self.serial).enqueue_input(&self.pending_input);
            self.pending_input.drain(..taken);
            if !self.pending_input.is_empty() {
                return false;
            }
        }
    }

    /// Waits for the current boot to end; returns what ended it.
    fn event_loop(&mut self, boot: &mut Boot) -> Result<MachineRequest, VmError> {
        let interrupts = boot.interrupts.clone();
        const MACHINE: u64 = 1;
        const LOOP_WAKE: u64 = 2;
        const STDIN: u64 = 3;
        const SERIAL_DRAINED: u64 = 4;
        const SIGTERM: u64 = 5;
        /// Tokens from here on are the resample fds of `interrupts`.
        const RESAMPLE: u64 = 16;
        let epoll = Epoll::new().map_err(io_err("create the event loop"))?;
        let add = |fd: i32, token: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(self.handle.machine.wake_fd().as_raw_fd(), MACHINE).map_err(io_err("watch machine requests"))?;
        add(self.handle.loop_wake.as_raw_fd(), LOOP_WAKE).map_err(io_err("watch the control socket"))?;
        let serial_stats = self.handle.serial_stats.clone();
        add(serial_stats.input_drained.as_raw_fd(), SERIAL_DRAINED).map_err(io_err("watch the serial FIFO"))?;
        for (i, interrupt) in interrupts.iter().enumerate() {
            add(interrupt.resample_fd().as_raw_fd(), RESAMPLE + i as u64).map_err(io_err("watch a PCI interrupt"))?;
        }
        if let Some(term) = TERM.get() {
            add(term.as_raw_fd(), SIGTERM).map_err(io_err("watch for SIGTERM"))?;
        }
        let stdin = std::io::stdin();
        let mut stdin_watched = self.config.serial == SerialSink::Stdio && add(stdin.as_raw_fd(), STDIN).is_ok();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let timeout = match *lock(&self.handle.stop_deadline) {
                Some(deadline) => {
                    deadline.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32
                }
                None => -1,
            };
            if timeout == 0 {
                log::warn!("{}: the guest did not power off within the stop timeout; forcing it off", self.config.name);
                return Ok(MachineRequest::ForceOff);
            }
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("wait for events")(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    MACHINE => {
                        let _ = self.handle.machine.wake_fd().read();
                        let request = self.handle.machine.take();
                        if request != MachineRequest::None {
                            return Ok(request);
                        }
                    }
                    LOOP_WAKE => {
                        let _ = self.handle.loop_wake.read();
                        let vcpu_request = lock(&self.handle.vcpu_request).take();
                        if let Some(VcpuRequest { count, reply }) = vcpu_request {
                            let _ = reply.send(self.add_vcpus(boot, count));
                        }
                        if let Some(request) = lock(&self.handle.save_request).take() {
                            self.serve_save(boot, request);
                        }
                        if !self.feed_serial() && stdin_watched {
                            // The FIFO is full: stdin waits until the guest drains it.
                            let _ = epoll.ctl(ControlOperation::Delete, stdin.as_raw_fd(), EpollEvent::default());
                        }
                    }
                    SERIAL_DRAINED => {
                        let _ = serial_stats.input_drained.read();
                        if self.feed_serial() && stdin_watched {
                            let _ = epoll.ctl(
                                ControlOperation::Add,
                                stdin.as_raw_fd(),
                                EpollEvent::new(EventSet::IN, STDIN),
                            );
                        }
                    }
                    STDIN => {
                        let mut buf = [0u8; 256];
                        match stdin.lock().read(&mut buf) {
                            Ok(0) | Err(_) => {
                                let _ = epoll.ctl(ControlOperation::Delete, stdin.as_raw_fd(), EpollEvent::default());
                                stdin_watched = false;
                            }
                            Ok(n) => {
                                self.pending_input.extend_from_slice(&buf[..n]);
                                if !self.feed_serial() {
                                    // The FIFO is full: stop reading until the guest drains it.
                                    let _ =
                                        epoll.ctl(ControlOperation::Delete, stdin.as_raw_fd(), EpollEvent::default());
                                }
                            }
                        }
                    }
                    SIGTERM => {
                        log::warn!("{}: SIGTERM: powering the VM off", self.config.name);
                        return Ok(MachineRequest::ForceOff);
                    }
                    token if token >= RESAMPLE => {
                        if let Some(interrupt) = interrupts.get((token - RESAMPLE) as usize) {
                            interrupt.resample();
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Runs the VM until it ends. Guest resets rebuild the machine (unless `no_reboot`).
    pub fn run(&mut self) -> Result<ExitReason, VmError> {
        let refresher = self.refresher.clone();
        let filter = self.seccomp;
        let display_thread = std::thread::Builder::new()
            .name("display".into())
            .spawn(move || {
                if filter && let Err(e) = seccomp::apply_vmm_filter() {
                    log::error!("display: cannot apply the seccomp filter ({e}); the console stays blank");
                    return;
                }
                refresher.run();
            })
            .map_err(io_err("start the display thread"))?;
        let result = self.run_boots();
        lock(&self.handle.save_request).take();
        lock(&self.handle.vcpu_request).take();
        self.refresher.detach();
        self.refresher.stop();
        let _ = display_thread.join();
        result
    }

    fn run_boots(&mut self) -> Result<ExitReason, VmError> {
        if self.seccomp {
            seccomp::apply_vmm_filter()?;
        }
        loop {
            let mut boot = self.boot()?;
            let mut outcome = self.event_loop(&mut boot);
            // A save asked for as the boot ended is answered (its sender dropped: "the VM ended").
            lock(&self.handle.save_request).take();
            self.handle.run.stop_boot();
            for t in std::mem::take(&mut boot.threads) {
                let _ = t.join();
            }
            *lock(&self.handle.pm1_event) = None;
            *lock(&self.handle.i8042) = None;
            *lock(&self.handle.tablet) = None;
            *lock(&self.handle.keyboard) = None;
            *lock(&self.handle.key_route) = virtio_input::KeyRoute::default();
            let mut crash = None;
            if let Ok(MachineRequest::Crash) = outcome {
                let report = lock(&self.crash).take().unwrap_or_else(|| "unknown reason".into());
                if !self.config.exit_on_crash {
                    outcome = self.stay_crashed(&report, &mut boot);
                }
                crash = Some(report);
            }
            self.refresher.detach();
            let reason = match (outcome?, crash) {
                (MachineRequest::Reset, _) if !self.config.no_reboot => {
                    log::info!("{}: reset; rebooting", self.config.name);
                    *lock(&self.handle.crashed) = None;
                    // A crash that lost the race against the reset is forgotten with its boot.
                    lock(&self.crash).take();
                    // A stop in progress still applies to the next boot.
                    continue;
                }
                (MachineRequest::Reset, _) => ExitReason::Reset,
                (_, Some(report)) => ExitReason::GuestCrash(report),
                (MachineRequest::PowerOff, None) => ExitReason::PowerOff,
                (MachineRequest::ForceOff, None) if self.handle.suspended.load(Ordering::Acquire) => {
                    ExitReason::Suspended
                }
                (MachineRequest::ForceOff | MachineRequest::Crash | MachineRequest::None, None) => {
                    ExitReason::ForcedStop
                }
            };
            return Ok(reason);
        }
    }

    /// Keeps a crashed VM, as QEMU does: its vCPUs are stopped (their threads have ended), its memory and
    /// display stay, so the console keeps serving the last frame, and the control socket reports the crash,
    /// until the VM is powered off, stopped, sent SIGTERM (all end it; the crash is its exit reason) or
    /// reset (which reboots it). Returns the request that ended the wait.
    fn stay_crashed(&mut self, report: &str, boot: &mut Boot) -> Result<MachineRequest, VmError> {
        // Drop what other vCPUs asked for between the crash and their end (a reset must not reboot a crashed
        // guest behind the user's back); a forced power-off can only come from the host, and stands.
        let _ = self.handle.machine.wake_fd().read();
        if self.handle.machine.take() == MachineRequest::ForceOff {
            return Ok(MachineRequest::ForceOff);
        }
        *lock(&self.handle.crashed) = Some(report.to_owned());
        log::warn!(
            "{}: the guest crashed: {report}; its vCPUs are stopped and its screen stays until it is powered off",
            self.config.name
        );
        if lock(&self.handle.stop_deadline).is_some() {
            // A stop was in progress: the guest will never finish it.
            return Ok(MachineRequest::ForceOff);
        }
        self.event_loop(boot)
    }
}

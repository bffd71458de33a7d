//! `porthole-vmm`: runs exactly one VM on KVM.
//!
//! Exit status: 0 the guest powered off; 1 the VMM failed (bad arguments or configuration, KVM
//! unavailable, set-up error); 2 the guest crashed (triple fault, emulation failure); 3 powered off by
//! the host (forced stop, a graceful stop that timed out, or SIGTERM); 4 the guest reset the machine with
//! `--no-reboot`; 5 suspended (control `save-state` with `"then":"stop"` saved the machine state).
//!
//! A guest that crashes is kept, as QEMU keeps it: its vCPUs stop, the console keeps its last screen and the
//! control socket reports `crashed` with the reason, until the VM is powered off (control `stop` or
//! `poweroff`, or SIGTERM: exit status 2 then) or reset (it reboots). `--exit-on-crash` ends the process at
//! once instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use vmm_core::{SerialSink, Vm, VmConfig};

/// Runs one virtual machine on KVM.
#[derive(Debug, Parser)]
#[command(
    name = "porthole-vmm",
    version,
    about,
    after_help = "Exit status: 0 guest powered off, 1 VMM error, \
2 guest crashed (once powered off: a crashed guest is kept until then, unless --exit-on-crash), \
3 powered off by the host or SIGTERM, 4 guest reset with --no-reboot, 5 suspended (state saved)."
)]
struct Cli {
    /// Kernel to boot: a Linux bzImage (boot protocol 2.10+; 64- or 32-bit entry), a PVH ELF kernel (32- or 64-bit, with a Xen PHYS32_ENTRY note), or a Multiboot 1 or Multiboot2 kernel
    /// (ELF, or a flat image whose header gives load addresses). --initrd becomes the PVH or Multiboot
    /// module.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory in MiB [default: 256].
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Most vCPUs the VM can have: those above --cpus can be added while it runs (control socket
    /// `set-vcpus`; the guest brings them online) [default: --cpus].
    #[arg(long, value_name = "N")]
    max_cpus: Option<u32>,
    /// Where COM1 goes: stdio, file:PATH or none [default: stdio].
    #[arg(long, value_name = "SINK")]
    serial: Option<String>,
    /// Control socket: unix:PATH.
    #[arg(long, value_name = "unix:PATH")]
    control: Option<String>,
    /// Serve the console over RFB (VNC) on unix:PATH or tcp:ADDR:PORT; may be given more than once.
    #[arg(long, value_name = "LISTEN")]
    vnc: Vec<String>,
    /// Like --vnc, but view-only: clients see the screen, their keyboard and mouse input is dropped.
    #[arg(long, value_name = "LISTEN")]
    vnc_view_only: Vec<String>,
    /// When the VM ends, write why (JSON: exit_code, reason) to this file (for a supervisor that is not the
    /// VMM's parent, e.g. a restarted portholed).
    #[arg(long, value_name = "PATH")]
    exit_file: Option<PathBuf>,
    /// File whose first line is the VNC password (VncAuth; only its first 8 bytes count).
    #[arg(long, value_name = "FILE")]
    vnc_password: Option<PathBuf>,
    /// A JSON VM configuration (vmm_core::VmConfig); the options above override its fields.
    #[arg(long, value_name = "FILE.json")]
    config: Option<PathBuf>,
    /// VM name, for logs.
    #[arg(long)]
    name: Option<String>,
    /// Exit (status 4) when the guest resets the machine instead of rebooting it.
    #[arg(long)]
    no_reboot: bool,
    /// Exit (status 2) as soon as the guest crashes, instead of keeping the crashed VM (its last screen and
    /// the crash report) until it is powered off.
    #[arg(long)]
    exit_on_crash: bool,
    /// How long a graceful stop waits before forcing the VM off, in milliseconds [default: 10000].
    #[arg(long, value_name = "MS")]
    stop_timeout_ms: Option<u64>,
    /// The screen's start-up graphics mode for Linux guests, WIDTHxHEIGHT [default: 1280x800].
    #[arg(long, value_name = "WxH")]
    display: Option<String>,
    /// A disk: a raw or qcow2 image (detected; format=raw|qcow2 forces one), PATH[,readonly][,serial=S]
    /// [,format=F][,backing=PATH]… (a qcow2 overlay's backing chain, nearest first; never taken from the
    /// image itself); may be given more than once (disk0, disk1, …).
    #[arg(long, value_name = "PATH[,readonly]")]
    disk: Vec<String>,
    /// A removable CD/DVD drive (read-only) holding the ISO at PATH, or empty without PATH; media can be
    /// changed at run time with the control socket's attach-media / eject-media. May be repeated.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
    cdrom: Vec<String>,
    /// A network card (virtio-net): BACKEND[,id=NAME][,mac=MAC][,mtu=N][,fwd=PROTO:[ADDR:]HOSTPORT-GUESTPORT]…
    /// [,link=down] with BACKEND `user` (NAT through passt, no privileges; forwards bind loopback unless
    /// an address is given), `tap:NAME`, `bridge:BR` (a new TAP device on bridge BR; both need
    /// CAP_NET_ADMIN) or `none`. May be repeated (net0, net1, …).
    #[arg(long, value_name = "BACKEND[,…]")]
    net: Vec<String>,
    /// Boot firmware instead of a kernel: `bios` (SeaBIOS from the system, or the cache the tests fill) or
    /// the path of a SeaBIOS bios.bin. Boots from the CD/DVD drives and disks (see --boot).
    #[arg(long, value_name = "bios|PATH", conflicts_with = "kernel")]
    firmware: Option<String>,
    /// The VGA BIOS [default: vgabios-stdvga.bin next to the BIOS].
    #[arg(long, value_name = "PATH", requires = "firmware")]
    vga_bios: Option<PathBuf>,
    /// Write the firmware's debug console (port 0x402) to this file.
    #[arg(long, value_name = "PATH", requires = "firmware")]
    firmware_log: Option<PathBuf>,
    /// Boot order for firmware boot: cdrom, disk or both comma-separated [default: cdrom,disk].
    #[arg(long, value_name = "ORDER", requires = "firmware")]
    boot: Option<String>,
    /// Offer the firmware's boot menu (ESC at "Press ESC for boot menu").
    #[arg(long, requires = "firmware")]
    boot_menu: bool,
    /// The console's keyboard and pointer: `ps2` (the PS/2 keyboard and mouse only) or `virtio` (a
    /// virtio-input tablet and keyboard beside PS/2: once the guest's driver, Linux: virtio_input, is up,
    /// the pointer is absolute and keys go to the virtio keyboard; firmware and boot loaders keep PS/2)
    /// [default: ps2, or the configuration file's].
    #[arg(long, value_name = "ps2|virtio")]
    input: Option<vmm_core::config::InputMode>,
    /// The same as --input virtio (deprecated).
    #[arg(long, conflicts_with = "input")]
    tablet: bool,
    /// The display adapter: `std` (the Bochs VGA; the guest picks its resolution) or `virtio`
    /// (virtio-vga: VGA for firmware and boot loaders, then virtio-gpu, whose monitor prefers the console's
    /// size and follows SetDesktopSize) [default: std, or the configuration file's].
    #[arg(long, value_name = "std|virtio")]
    vga: Option<vmm_core::config::VgaMode>,
    /// A guest agent channel: `none`, or `spice` (a virtio-serial port named com.redhat.spice.0 for the
    /// guest's spice-vdagent: the clipboard shared with the console, the desktop following its size)
    /// [default: none, or the configuration file's].
    #[arg(long, value_name = "none|spice")]
    agent: Option<vmm_core::config::AgentMode>,
    /// A sound card: `none`, `hda` (Intel HD Audio with a line-out/line-in codec: every OS has a driver;
    /// Linux: snd_hda_intel) or `virtio` (virtio-sound, Linux's snd_virtio from 6.2); what the guest plays
    /// reaches VNC clients that take QEMU's audio extension (Porthole's console, virt-viewer, gvncviewer)
    /// [default: none, or the configuration file's].
    #[arg(long, value_name = "none|hda|virtio")]
    sound: Option<vmm_core::config::SoundMode>,
    /// At most this many CPUs' worth of time for the whole VM (e.g. 1.5), through a cgroup of its own under
    /// the caller's (cgroup v2 cpu.max or the v1 cpu controller); where none can be written, the VM runs
    /// unlimited and a warning says why.
    #[arg(long, value_name = "CPUS")]
    cpu_cap: Option<f64>,
    /// The VM's share of CPU under contention, 1-10000 (100: the default share), in the same cgroup.
    #[arg(long, value_name = "N")]
    cpu_weight: Option<u32>,
    /// A virtio memory balloon (Linux: virtio_balloon): the control socket's `set-balloon` shrinks and
    /// grows the guest's memory live, down to max(128 MiB, 10% of --memory); free pages the guest reports
    /// go back to the host.
    #[arg(long)]
    balloon: bool,
    /// When the VM ends, write its final counters (JSON) to this file.
    #[arg(long, value_name = "PATH")]
    counters_file: Option<PathBuf>,
    /// Start from a machine-state file (written by the control socket's `save-state`) instead of booting:
    /// memory, vCPUs and devices as they were. Give the same configuration as when it was saved; a state
    /// from another version, a damaged one or one for another configuration is refused (exit status 1).
    #[arg(long, value_name = "PATH")]
    restore: Option<PathBuf>,
    /// Do not install seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

fn config_from(cli: &Cli) -> anyhow::Result<VmConfig> {
    let mut config = match (&cli.config, &cli.kernel, &cli.firmware) {
        (Some(path), _, _) => VmConfig::from_file(path)?,
        (None, Some(kernel), _) => {
            let mut c = VmConfig::new(kernel);
            c.serial = SerialSink::Stdio;
            c
        }
        (None, None, Some(_)) => {
            let mut c = VmConfig::new("");
            c.boot = None;
            c.serial = SerialSink::Stdio;
            c
        }
        (None, None, None) => bail!("nothing to boot: give --kernel PATH, --firmware bios or --config FILE.json"),
    };
    if let Some(kernel) = &cli.kernel {
        config.boot.get_or_insert_with(|| vmm_core::config::BootSource {
            kernel: kernel.clone(),
            initrd: None,
            cmdline: String::new(),
        });
    }
    if let Some(boot) = config.boot.as_mut() {
        if let Some(kernel) = &cli.kernel {
            boot.kernel = kernel.clone();
        }
        if let Some(initrd) = &cli.initrd {
            boot.initrd = Some(initrd.clone());
        }
        if let Some(cmdline) = &cli.cmdline {
            boot.cmdline = cmdline.clone();
        }
    } else if cli.initrd.is_some() || cli.cmdline.is_some() {
        bail!("--initrd and --cmdline go with --kernel");
    }
    if let Some(firmware) = &cli.firmware {
        let bios = match firmware.as_str() {
            "bios" => vmm_core::config::find_seabios().context(
                "--firmware bios: no SeaBIOS found (apt-get install seabios, or give --firmware PATH/bios.bin)",
            )?,
            path => PathBuf::from(path),
        };
        let mut fw = vmm_core::config::FirmwareConfig::seabios(bios.parent().unwrap_or(std::path::Path::new(".")));
        fw.bios = bios;
        fw.vga_bios = cli.vga_bios.clone();
        fw.log = cli.firmware_log.clone();
        fw.boot_menu = cli.boot_menu;
        if let Some(order) = &cli.boot {
            fw.boot_order =
                order.split(',').map(|d| d.trim().parse()).collect::<Result<_, _>>().map_err(anyhow::Error::from)?;
        }
        config.firmware = Some(fw);
    }
    if let Some(memory) = cli.memory {
        config.memory_mib = memory;
    }
    if let Some(cpus) = cli.cpus {
        config.vcpus = cpus;
    }
    if let Some(max) = cli.max_cpus {
        config.max_vcpus = Some(max);
    }
    if let Some(serial) = &cli.serial {
        config.serial = serial.parse()?;
    }
    if let Some(control) = &cli.control {
        let path = control
            .strip_prefix("unix:")
            .filter(|p| !p.is_empty())
            .with_context(|| format!("--control {control:?}: expected unix:PATH"))?;
        config.control_socket = Some(PathBuf::from(path));
    }
    if let Some(name) = &cli.name {
        config.name = name.clone();
    }
    if cli.no_reboot {
        config.no_reboot = true;
    }
    if cli.exit_on_crash {
        config.exit_on_crash = true;
    }
    if let Some(ms) = cli.stop_timeout_ms {
        config.stop_timeout_ms = ms;
    }
    if let Some(mode) = &cli.display {
        let (w, h) = mode
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
            .with_context(|| format!("--display {mode:?}: expected WIDTHxHEIGHT, e.g. 1280x800"))?;
        config.display = vmm_core::config::DisplayConfig { width: w, height: h };
    }
    for spec in &cli.vnc {
        config.vnc.push(spec.parse().map_err(|e: String| anyhow::anyhow!("--vnc {e}"))?);
    }
    for spec in &cli.vnc_view_only {
        config.vnc_view_only.push(spec.parse().map_err(|e: String| anyhow::anyhow!("--vnc-view-only {e}"))?);
    }
    if let Some(path) = &cli.vnc_password {
        config.vnc_password_file = Some(path.clone());
    }
    for spec in &cli.disk {
        config.drives.push(spec.parse().with_context(|| format!("--disk {spec:?}"))?);
    }
    for path in &cli.cdrom {
        let media = (!path.is_empty()).then(|| PathBuf::from(path));
        config.drives.push(vmm_core::config::DriveConfig::cdrom(media));
    }
    if cli.tablet {
        log::warn!("--tablet is deprecated: it means --input virtio (a tablet and a keyboard)");
        config.input = vmm_core::config::InputMode::Virtio;
    }
    if let Some(vga) = cli.vga {
        config.vga = vga;
    }
    if let Some(agent) = cli.agent {
        config.agent = agent;
    }
    if let Some(sound) = cli.sound {
        config.sound = sound;
    }
    if let Some(input) = cli.input {
        config.input = input;
    }
    config.balloon |= cli.balloon;
    for spec in &cli.net {
        if let Some(nic) = vmm_core::net::parse_net(spec).with_context(|| format!("--net {spec:?}"))? {
            config.nics.push(nic);
        }
    }
    Ok(config)
}

/// Puts this process (every thread it has and will have) into a cgroup of its own with `--cpu-cap` and
/// `--cpu-weight`, or warns why they are not enforced.
fn apply_cpu_limits(cap: Option<f64>, weight: Option<u32>) -> anyhow::Result<()> {
    if cap.is_none() && weight.is_none() {
        return Ok(());
    }
    let cap_percent = match cap {
        Some(c) if c.is_finite() && c > 0.0 && c <= 4096.0 => Some(((c * 100.0).round() as u32).max(1)),
        Some(c) => bail!("--cpu-cap {c}: give the CPUs' worth of time, more than 0 (e.g. 0.5 or 1.5)"),
        None => None,
    };
    if let Some(w) = weight
        && !(1..=10000).contains(&w)
    {
        bail!("--cpu-weight {w}: give 1 to 10000 (100 is the default share)");
    }
    let cpu = vmm_core::cpu_limits::CpuLimits::detect();
    cpu.remove_unused("hand-");
    let pid = std::process::id();
    let limits = vmm_core::cpu_limits::Limits { cap_percent, weight };
    match cpu.attach(&format!("hand-{pid}"), pid, limits) {
        Ok(how) => log::info!("CPU limits {how}"),
        Err(why) => log::warn!("the CPU limits are not enforced: {why}"),
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<vmm_core::ExitReason> {
    let config = config_from(&cli)?;
    apply_cpu_limits(cli.cpu_cap, cli.cpu_weight)?;
    let control = config.control_socket.clone();
    let (vnc, vnc_view_only, vnc_password) =
        (config.vnc.clone(), config.vnc_view_only.clone(), config.vnc_password_file.clone());
    let mut vm = Vm::new(config)?;
    if cli.no_seccomp {
        vm.disable_seccomp();
    }
    if let Some(path) = &cli.restore {
        vm.restore_from(path).with_context(|| format!("cannot restore the machine state from {path:?}"))?;
    }
    let handle = vm.handle();
    vmm_core::vm::end_on_sigterm().context("cannot install the SIGTERM handler")?;
    // Opened now: once the VM runs, the seccomp filter forbids opening files.
    let counters_file = match &cli.counters_file {
        Some(path) => Some(std::fs::File::create(path).with_context(|| format!("cannot create {path:?}"))?),
        None => None,
    };
    if let Some(path) = control {
        let listener =
            vmm_core::control::bind(&path).with_context(|| format!("cannot listen on control socket {path:?}"))?;
        vmm_core::control::spawn_server(listener, vm.handle(), !cli.no_seccomp)
            .context("cannot start the control socket thread")?;
    }
    if !vnc.is_empty() || !vnc_view_only.is_empty() {
        let server = vmm_core::rfb::ServerConfig {
            password: vnc_password.as_deref().map(vmm_core::rfb::password_key).transpose()?,
            name: format!("Porthole: {}", handle.name),
        };
        let full: Arc<dyn vmm_core::rfb::Input> = handle.clone();
        let none: Arc<dyn vmm_core::rfb::Input> = Arc::new(vmm_core::rfb::NoInput);
        for (address, input) in vnc.iter().map(|a| (a, &full)).chain(vnc_view_only.iter().map(|a| (a, &none))) {
            let shown = String::from(address.clone());
            let listener = address.bind().with_context(|| format!("cannot listen for VNC on {shown}"))?;
            vmm_core::rfb::spawn(listener, vm.screen(), input.clone(), server.clone(), !cli.no_seccomp)
                .context("cannot start the VNC server")?;
        }
    }
    let reason = vm.run()?;
    if let Some(mut file) = counters_file {
        use std::io::Write;
        serde_json::to_writer_pretty(&mut file, &handle.counters()).context("cannot write the counters file")?;
        file.flush().context("cannot write the counters file")?;
    }
    Ok(reason)
}

/// The error and its causes, leaving out a cause whose text its parent already shows.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

fn main() -> ExitCode {
    // A fixed number of malloc arenas: glibc would otherwise size them by reading /sys when many threads
    // start (one per RFB client), which the seccomp filter does not allow. And a fixed mmap threshold: by
    // default glibc raises it to the size of each large block freed, so after the first console client
    // leaves, every later client's frame-sized buffers come from the arenas, whose freed holes are kept:
    // the process grew by megabytes per reconnecting viewer (two viewers reconnecting every 2 s: 46 -> 94
    // MiB in 5 minutes, against 25-30 MiB flat with the threshold fixed, at the same updates/s).
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 4);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Created now: once the VM runs, the seccomp filter forbids opening files.
    let exit_file = match cli.exit_file.as_ref().map(|p| std::fs::File::create(p).map(|f| (p.clone(), f))).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("porthole-vmm: error: cannot create the exit file: {e}");
            return ExitCode::from(1);
        }
    };
    let record = match run(cli) {
        Ok(reason) => {
            if reason.exit_code() != 0 {
                eprintln!("porthole-vmm: {reason}");
            }
            vmm_core::vm::ExitRecord { exit_code: reason.exit_code(), reason: reason.to_string() }
        }
        Err(e) => {
            let why = describe(&e);
            eprintln!("porthole-vmm: error: {why}");
            vmm_core::vm::ExitRecord { exit_code: 1, reason: format!("VMM error: {why}") }
        }
    };
    if let Some((path, mut file)) = exit_file {
        let written =
            serde_json::to_writer(&mut file, &record).map_err(std::io::Error::from).and_then(|()| file.sync_all());
        if let Err(e) = written {
            eprintln!("porthole-vmm: cannot write the exit file {path:?}: {e}");
        }
    }
    ExitCode::from(record.exit_code as u8)
}

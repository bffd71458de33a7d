//! The control socket: one JSON object per line in each direction over a Unix socket.
//!
//! Requests: `{"cmd":"status"}`, `pause`, `resume`, `reset`, `stop` (ACPI power button, then forced off
//! after the stop timeout), `poweroff` (forced), `counters`, `{"cmd":"attach-media","path":P}` and
//! `{"cmd":"eject-media"}` (on the first removable drive, or the one named by `"drive"`),
//! `{"cmd":"save-state","path":P,"then":"resume"|"stop"}` (the machine state to P; reply `state_bytes`,
//! `paused_ms`; with `stop` the process then exits with status 5, "suspended"; other changing commands
//! are refused while a save runs), and
//! `{"cmd":"serial-input","data":TEXT}` (typed into COM1; refused while earlier input still waits), `nics`
//! (the network cards' state and counters) and `{"cmd":"set-link","nic":ID,"up":BOOL}` (plug or unplug a
//! card's cable; the guest is told), `{"cmd":"disconnect-nic","nic":ID}` and `{"cmd":"connect-nic","nic":ID,
//! "forwards":[…],"address":A}` (a user card leaves its passt, then takes one started by the caller, whose
//! socket and standard error come with the request by `SCM_RIGHTS`: new port forwards while the VM runs),
//! `{"cmd":"set-disk-limits","drive":ID,"limits":{"iops":N,"bps":N,…}}` (a
//! drive's rate limits, live; `{}` lifts them), `{"cmd":"set-nic-limits","nic":ID,"limits":{"rx_bps":N,
//! "tx_bps":N}}` (a card's, in bit/s), `{"cmd":"grow-drive","drive":ID,"size":BYTES}` (a fixed disk grows
//! while the VM runs; the guest is told), `{"cmd":"set-balloon","target_mib":N}` (the guest memory
//! the balloon leaves the guest, live; refused below max(128 MiB, 10% of the memory), above the memory or
//! without `--balloon`; `status` reports the balloon and the guest's memory statistics). Every reply has
//! `"ok"`; failures carry `"error"`. A crashed VM (state `crashed`, its report in `status.crash`) refuses
//! `pause`, `resume` and `serial-input`; `stop` and `poweroff` end it, `reset` reboots it. A line longer than [`MAX_LINE`] closes the connection; at most [`MAX_CONNECTIONS`] clients
//! are served at once.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::counters::CountersSnapshot;
use crate::disk::DriveStatus;
use crate::net::NicStatus;
use crate::virtio::balloon::BalloonStatus;
use crate::vm::{RunState, VmHandle};

/// Longest request line accepted (a `connect-nic` with the most forwards fits).
pub const MAX_LINE: usize = 16 << 10;
/// Most descriptors a connection holds for its requests (more are closed at once).
const MAX_PASSED_FDS: usize = 4;
/// Most simultaneous control connections.
pub const MAX_CONNECTIONS: usize = 16;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Reset,
    Stop,
    Poweroff,
    Counters,
    /// Inserts an image (read-only) into a removable drive.
    #[serde(rename = "attach-media")]
    AttachMedia {
        path: std::path::PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drive: Option<String>,
    },
    /// Moves a fixed disk, live, onto a new qcow2 overlay at `path` (created by the VMM; it must not exist):
    /// a disk-only snapshot of the running VM, with the vCPUs paused meanwhile. `backing` is the drive's
    /// image followed by its own backing chain (nearest first); `backing_name` what the overlay's header
    /// records for the image (default: its path; e.g. a name relative to the overlay's folder).
    #[serde(rename = "switch-drive")]
    SwitchDrive {
        drive: String,
        path: std::path::PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backing_name: Option<std::path::PathBuf>,
        backing: Vec<std::path::PathBuf>,
    },
    /// Empties a removable drive.
    #[serde(rename = "eject-media")]
    EjectMedia {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drive: Option<String>,
    },
    /// Types text into the serial port (COM1), as if on a terminal attached to it.
    #[serde(rename = "serial-input")]
    SerialInput {
        data: String,
    },
    /// The network cards: back end, addresses, forwards, counters.
    Nics,
    /// Plugs (`up`) or unplugs a network card's cable.
    #[serde(rename = "set-link")]
    SetLink {
        nic: String,
        up: bool,
    },
    /// Replaces a drive's rate limits (absent fields: no limit); they apply from its next request.
    #[serde(rename = "set-disk-limits")]
    SetDiskLimits {
        drive: String,
        #[serde(default)]
        limits: crate::rate_limiter::DiskLimits,
    },
    /// Grows a fixed disk to `size` bytes (whole sectors, larger than now) while the VM runs; the guest is
    /// told through a configuration change.
    #[serde(rename = "grow-drive")]
    GrowDrive {
        drive: String,
        size: u64,
    },
    /// Disconnects a user (passt) card from its passt, which ends and frees its ports (the first step of
    /// new port forwards for a running VM: the next passt binds the ports the old one held).
    #[serde(rename = "disconnect-nic")]
    DisconnectNic {
        nic: String,
    },
    /// Connects a user card to a passt started by the caller: the request carries (`SCM_RIGHTS`) its connected
    /// socket and, optionally, the read end of its standard error, which the VMM logs. `forwards` are those
    /// that passt opened, `address` the one it offers the guest (for `nics`). With `tap`, a TAP or bridge
    /// card moves to the TAP device of that name instead, whose file the request carries (opened by
    /// `net::Tap::open` or `open_on_bridge`: the VMM may not create devices after start-up).
    #[serde(rename = "connect-nic")]
    ConnectNic {
        nic: String,
        #[serde(default)]
        forwards: Vec<crate::net::PortForward>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<std::net::Ipv4Addr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tap: Option<String>,
    },
    /// Replaces a network card's rate limits (absent fields: no limit); they apply from its next frame.
    #[serde(rename = "set-nic-limits")]
    SetNicLimits {
        nic: String,
        #[serde(default)]
        limits: crate::rate_limiter::NicLimits,
    },
    /// Asks the guest to keep `target_mib` of its memory, the memory balloon taking the rest (the VM needs
    /// `--balloon`); refused below the floor (max(128 MiB, 10% of the memory)) or above the memory.
    #[serde(rename = "set-balloon")]
    SetBalloon {
        target_mib: u64,
    },
    /// Gives the running VM `count` vCPUs, up to the maximum it was started with (`--max-cpus`): the new ones
    /// are hot-added (ACPI CPU hotplug) and the guest brings them online. Fewer than now is refused.
    #[serde(rename = "set-vcpus")]
    SetVcpus {
        count: u32,
    },
    /// Saves the machine state (RAM, vCPUs, devices) to `path` at one pause point, then resumes the guest
    /// or ends the VM (exit status 5, "suspended"). `porthole-vmm --restore PATH` starts from it.
    #[serde(rename = "save-state")]
    SaveState {
        path: std::path::PathBuf,
        then: crate::vm::Then,
    },
}

/// The reply to a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<CountersSnapshot>,
    /// For `pause`: microseconds until every vCPU had stopped. For `switch-drive`: microseconds the guest was
    /// paused for the switch (pause, drain, flush, open, resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_after_us: Option<u64>,
    /// For `stop`: whether the guest had enabled the ACPI power-button event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acpi_power_button_enabled: Option<bool>,
    /// For `attach-media`, `eject-media` and `set-disk-limits`: the drive afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drive: Option<DriveStatus>,
    /// For `nics` (every card) and `set-link` (that card).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<NicStatus>>,
    /// For `set-balloon`: the balloon afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonStatus>,
    /// For `set-vcpus`: the vCPUs the VM has now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// For `save-state`: the state file's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_bytes: Option<u64>,
    /// For `save-state`: how long the guest was paused, in milliseconds (pause, save, file in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_ms: Option<u64>,
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub state: RunState,
    pub vcpus: u32,
    /// The most vCPUs the VM can have (`set-vcpus` adds up to it while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    pub memory_mib: u64,
    pub uptime_ms: u64,
    pub boots: u64,
    pub pid: u32,
    #[serde(default)]
    pub drives: Vec<DriveStatus>,
    #[serde(default)]
    pub nics: Vec<NicStatus>,
    /// While the state is `crashed`: why (triple fault, emulation failure, … with RIP and instruction bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash: Option<String>,
    /// The console's pointer goes to the tablet (its guest driver is up), not the PS/2 mouse.
    #[serde(default)]
    pub absolute_pointer: bool,
    /// The console's keys go to the virtio keyboard (its guest driver is up), not the PS/2 keyboard.
    #[serde(default)]
    pub virtio_keyboard: bool,
    /// With a virtio-gpu display: its guest driver is up, so the monitor follows the console's size
    /// (SetDesktopSize); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_follows: Option<bool>,
    /// With a SPICE agent port: whether the guest's agent (spice-vdagent) is connected, so the clipboard
    /// is shared and the desktop follows the console's size; absent without the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_connected: Option<bool>,
    /// With a sound card: whether the guest plays, in what format, and how many frames it played and the
    /// console's listeners skipped (late); absent without a sound card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<SoundStatus>,
    /// The virtio keyboard's lock LEDs as the guest last set them (a VM with virtio input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_leds: Option<crate::virtio::input::Leds>,
    /// The memory balloon (target, what the guest gave, its memory statistics), when the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonStatus>,
    /// The engine's resident memory in KiB (guest RAM the host backs now, plus the engine's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_rss_kib: Option<u64>,
}

fn ok() -> Response {
    Response { ok: true, ..Response::default() }
}

fn failure(error: String) -> Response {
    Response { ok: false, error: Some(error), ..Response::default() }
}

/// Carries out one request; `passed` holds the descriptors that came with it (`connect-nic` takes them).
pub fn handle(vm: &VmHandle, request: &Request, passed: &mut VecDeque<OwnedFd>) -> Response {
    match request {
        Request::Status => status(vm),
        Request::Counters => Response { counters: Some(vm.counters()), ..ok() },
        Request::Nics => Response { nics: Some(vm.nics()), ..ok() },
        _ if vm.is_saving() => failure("the VM's state is being saved; try again when the save ends".into()),
        Request::ConnectNic { nic, tap: Some(name), .. } => {
            let Some(file) = passed.pop_front() else {
                return failure("connect-nic needs the TAP device's file passed with the request (SCM_RIGHTS)".into());
            };
            match vm.connect_tap(nic, file, name) {
                Ok(status) => Response { nics: Some(vec![status]), ..ok() },
                Err(e) => failure(e),
            }
        }
        Request::ConnectNic { nic, forwards, address, tap: None } => {
            let Some(socket) = passed.pop_front() else {
                return failure("connect-nic needs passt's socket passed with the request (SCM_RIGHTS)".into());
            };
            let log = passed.pop_front();
            match vm.connect_nic(nic, socket, log, forwards.clone(), *address) {
                Ok(status) => Response { nics: Some(vec![status]), ..ok() },
                Err(e) => failure(e),
            }
        }
        _ => handle_changing(vm, request),
    }
}

/// A sound card's output in the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoundStatus {
    pub playing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u8>,
    /// Frames the guest played since the VM started.
    pub played_frames: u64,
    /// Frames the console's listeners skipped because they fell behind (late sound is dropped).
    pub late_frames: u64,
}

fn status(vm: &VmHandle) -> Response {
    let counters = vm.counters();
    Response {
        status: Some(Status {
            name: vm.name.clone(),
            state: vm.state(),
            vcpus: vm.vcpus(),
            max_vcpus: Some(vm.max_vcpus),
            memory_mib: vm.memory_mib,
            uptime_ms: counters.uptime_ms,
            boots: counters.boots,
            pid: std::process::id(),
            drives: vm.drives(),
            nics: vm.nics(),
            crash: vm.crash_report(),
            absolute_pointer: vm.absolute_pointer(),
            virtio_keyboard: vm.virtio_keyboard(),
            display_follows: vm.gpu().map(|g| g.driver_ready()),
            agent_connected: vm.agent().map(|a| a.connected()),
            sound: vm.sound(),
            keyboard_leds: vm.keyboard_leds(),
            balloon: vm.balloon(),
            host_rss_kib: host_rss_kib(),
        }),
        ..ok()
    }
}

/// This process's resident memory (`/proc/self/statm`), in KiB.
fn host_rss_kib() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()? / 1024)
}

/// Requests that change the VM (refused while a save is in progress).
fn handle_changing(vm: &VmHandle, request: &Request) -> Response {
    match request {
        Request::Status | Request::Counters | Request::Nics | Request::ConnectNic { .. } => {
            handle(vm, request, &mut VecDeque::new())
        }
        Request::DisconnectNic { nic } => match vm.disconnect_nic(nic) {
            Ok(status) => Response { nics: Some(vec![status]), ..ok() },
            Err(e) => failure(e),
        },
        Request::SaveState { path, then } => match vm.save_state(path, *then) {
            Ok(report) => {
                Response { state_bytes: Some(report.bytes), paused_ms: Some(report.paused.as_millis() as u64), ..ok() }
            }
            Err(e) => failure(e.to_string()),
        },
        Request::Pause | Request::Resume | Request::SerialInput { .. } if vm.crash_report().is_some() => {
            failure("the guest has crashed: its vCPUs are stopped; reset the VM or power it off".into())
        }
        Request::Pause => match vm.pause() {
            Ok(took) => Response { paused_after_us: Some(took.as_micros() as u64), ..ok() },
            Err(e) => failure(format!("pause did not complete: {e}")),
        },
        Request::Resume => {
            vm.resume();
            ok()
        }
        Request::Reset => {
            vm.reset();
            ok()
        }
        Request::Stop => Response { acpi_power_button_enabled: Some(vm.stop()), ..ok() },
        Request::Poweroff => {
            vm.power_off();
            ok()
        }
        Request::AttachMedia { path, drive } => match vm.attach_media(drive.as_deref(), path) {
            Ok(status) => Response { drive: Some(status), ..ok() },
            Err(e) => failure(e.to_string()),
        },
        Request::SwitchDrive { drive, path, backing_name, backing } => {
            match vm.switch_drive_to_overlay(drive, path, backing_name.as_deref(), backing) {
                Ok((status, paused)) => {
                    Response { drive: Some(status), paused_after_us: Some(paused.as_micros() as u64), ..ok() }
                }
                Err(e) => failure(e),
            }
        }
        Request::EjectMedia { drive } => match vm.eject_media(drive.as_deref()) {
            Ok(status) => Response { drive: Some(status), ..ok() },
            Err(e) => failure(e.to_string()),
        },
        Request::SerialInput { data } => match vm.serial_input(data.as_bytes()) {
            Ok(()) => ok(),
            Err(e) => failure(e.to_string()),
        },
        Request::SetLink { nic, up } => match vm.set_link(nic, *up) {
            Ok(status) => Response { nics: Some(vec![status]), ..ok() },
            Err(e) => failure(e),
        },
        Request::SetBalloon { target_mib } => match vm.set_balloon_target(*target_mib) {
            Ok(status) => Response { balloon: Some(status), ..ok() },
            Err(e) => failure(e),
        },
        Request::SetDiskLimits { drive, limits } => match vm.set_disk_limits(drive, *limits) {
            Ok(status) => Response { drive: Some(status), ..ok() },
            Err(e) => failure(e),
        },
        Request::GrowDrive { drive, size } => match vm.grow_drive(drive, *size) {
            Ok(status) => Response { drive: Some(status), ..ok() },
            Err(e) => failure(e.to_string()),
        },
        Request::SetNicLimits { nic, limits } => match vm.set_nic_limits(nic, *limits) {
            Ok(status) => Response { nics: Some(vec![status]), ..ok() },
            Err(e) => failure(e),
        },
        Request::SetVcpus { count } => match vm.set_vcpus(*count) {
            Ok(now) => Response { vcpus: Some(now), ..ok() },
            Err(e) => failure(e),
        },
    }
}

/// A control connection's reading side: `recvmsg`, keeping the descriptors passed with the bytes (at most
/// [`MAX_PASSED_FDS`]; more, and those no request takes once its line is read, are closed).
struct PassingReader {
    stream: UnixStream,
    fds: VecDeque<OwnedFd>,
}

impl Read for PassingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Room for MAX_PASSED_FDS descriptors in one control message (u64s: cmsghdr alignment).
        let mut space = [0u64; 8];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is valid; its pointers are set to live buffers below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&space);
        let n = loop {
            // SAFETY: `msg` points at `iov` (into `buf`) and `space`, both alive for the call.
            let n = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        // SAFETY: the CMSG_* walk stays inside `space` as the kernel filled it (msg_controllen).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    let count =
                        ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                    for i in 0..count {
                        // Each passed descriptor is new in this process and owned here alone.
                        let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                        if self.fds.len() < MAX_PASSED_FDS {
                            self.fds.push_back(fd);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(n)
    }
}

fn serve_connection(vm: &VmHandle, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(PassingReader { stream, fds: VecDeque::new() });
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            let reply = failure(format!("request longer than {MAX_LINE} bytes"));
            writer.write_all(&serde_json::to_vec(&reply).unwrap_or_default())?;
            writer.write_all(b"\n")?;
            return Ok(());
        }
        let (reply, then_end) = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => {
                let reply = handle(vm, &request, &mut reader.get_mut().fds);
                // Descriptors belong to the request they came with.
                reader.get_mut().fds.clear();
                let ends = reply.ok && matches!(request, Request::SaveState { then: crate::vm::Then::Stop, .. });
                (reply, ends)
            }
            Err(e) => (failure(format!("bad request: {e}")), false),
        };
        let mut bytes = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        bytes.push(b'\n');
        let written = writer.write_all(&bytes).and_then(|()| writer.flush());
        if then_end {
            // A VM suspended to disk ends only now that its answer is on its way (whether or not the caller is
            // still there to read it).
            vm.end_suspended();
            return written;
        }
        written?;
    }
}

/// Serves the control socket on `listener` in background threads, for as long as the process lives.
/// With `filter`, each thread applies the VMM seccomp filter before serving.
pub fn spawn_server(listener: UnixListener, vm: Arc<VmHandle>, filter: bool) -> std::io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("control".into()).spawn(move || {
        if filter && let Err(e) = crate::seccomp::apply_control_filter() {
            log::error!("control socket: cannot apply the seccomp filter ({e}); not serving");
            return;
        }
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                let mut s = stream;
                let reply = failure(format!("too many control connections (at most {MAX_CONNECTIONS})"));
                let _ = s.write_all(&serde_json::to_vec(&reply).unwrap_or_default());
                let _ = s.write_all(b"\n");
                continue;
            }
            let _ = stream.set_read_timeout(Some(Duration::from_secs(600)));
            active.fetch_add(1, Ordering::AcqRel);
            let (conn_vm, conn_active) = (vm.clone(), active.clone());
            let spawned = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                let _ = serve_connection(&conn_vm, stream);
                conn_active.fetch_sub(1, Ordering::AcqRel);
            });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    })?;
    Ok(())
}

/// Binds the control socket at `path` (replacing a stale socket file, never another kind of file).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A client of the control socket (used by portholed and the tests).
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket sent an unreadable reply: {0}")]
    Reply(#[from] serde_json::Error),
    #[error("the VMM refused: {0}")]
    Refused(String),
    #[error("the VMM closed the control connection")]
    Closed,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(ControlClient { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    /// Sends a request and waits for its reply; a reply with `ok: false` becomes an error.
    pub fn request(&mut self, request: &Request) -> Result<Response, ControlError> {
        self.request_passing(request, &[])
    }

    /// Sends a request with descriptors (`SCM_RIGHTS`, with its first bytes) and waits for its reply.
    pub fn request_passing(&mut self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<Response, ControlError> {
        let mut bytes = serde_json::to_vec(request)?;
        bytes.push(b'\n');
        let mut sent = 0;
        if !fds.is_empty() {
            sent = send_with_fds(&self.writer, &bytes, fds)?;
        }
        self.writer.write_all(&bytes[sent..])?;
        let mut line = Vec::new();
        (&mut self.reader).take(MAX_REPLY_BYTES).read_until(b'\n', &mut line)?;
        Response::from_line(&line)
    }
}

/// The longest reply line a client reads: an engine that sends more (it runs a guest) is not believed.
pub const MAX_REPLY_BYTES: u64 = 1 << 20;

impl Response {
    /// The reply read as one line (with its newline, at most [`MAX_REPLY_BYTES`]); a reply with `ok: false`
    /// becomes [`ControlError::Refused`].
    pub fn from_line(line: &[u8]) -> Result<Response, ControlError> {
        if line.is_empty() {
            return Err(ControlError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(ControlError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the reply ends without a newline within {MAX_REPLY_BYTES} bytes"),
            )));
        }
        let reply: Response = serde_json::from_slice(line)?;
        if reply.ok { Ok(reply) } else { Err(ControlError::Refused(reply.error.unwrap_or_default())) }
    }
}

/// Writes (some of) `bytes` with `fds` attached; returns how many bytes went.
fn send_with_fds(socket: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    if fds.len() > MAX_PASSED_FDS {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many descriptors for one request"));
    }
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut space = [0u64; 8];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
    // SAFETY: an all-zero msghdr is valid; its pointers are set to live buffers below, and the one control
    // message written fits `space` (CMSG_SPACE of at most MAX_PASSED_FDS ints is 32 bytes of its 64).
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of_val(raw.as_slice()) as u32) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as usize;
        std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast::<libc::c_int>(), raw.len());
        libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_use_the_documented_wire_form() {
        assert_eq!(serde_json::to_string(&Request::Pause).unwrap(), r#"{"cmd":"pause"}"#);
        assert_eq!(
            serde_json::to_string(&Request::SetBalloon { target_mib: 384 }).unwrap(),
            r#"{"cmd":"set-balloon","target_mib":384}"#
        );
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"counters"}"#).unwrap(), Request::Counters);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::AttachMedia { path: "/a.iso".into(), drive: None }).unwrap(),
            r#"{"cmd":"attach-media","path":"/a.iso"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"eject-media","drive":"cdrom1"}"#).unwrap(),
            Request::EjectMedia { drive: Some("cdrom1".into()) }
        );
    }
}

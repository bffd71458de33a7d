//! The hardware-virtualization tier's machinery (`./x test-hw`, tests/tests/hw.rs): an L1 machine under
//! QEMU TCG with `-cpu max` (AMD SVM with nested paging emulated, so kvm-amd gives a real `/dev/kvm`)
//! that runs one scenario script from tests/hw/scenarios, and the host-side ends of its consoles.
//!
//! - Everything L1 and its L2 guest print arrives on L1's serial console, read here line by line with the
//!   time each line arrived: the scenarios' `HW-...` lines, the guests' `PORTHOLE-...` lines.
//! - L1's user-mode network forwards three host ports to L1 (RFB 5900, the L2 control socket 5901, the
//!   daemon's API 5902; `socat` in L1 bridges the last two to their Unix sockets). [`UnixToTcp`] turns each
//!   into a Unix socket here, so the suite's RFB, control and API clients work unchanged.
//! - `PORTHOLE_HW=direct` runs the same scenario scripts on this host (its own CPU has `vmx` or `svm` and
//!   `/dev/kvm`), without L1; `nested` forces L1; `auto` (the default) picks direct where it can.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::{Scratch, repo_root};

/// Where `tests/hw/build.sh` leaves the images.
pub fn hw_dir() -> PathBuf {
    std::env::var_os("PORTHOLE_HW_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/hw"))
}

/// The QEMU that runs L1 (the L0): `PORTHOLE_HW_L0_QEMU`, else the one tests/hw/fetch-l0-qemu.sh unpacked
/// (where the system's QEMU is older than 8.2 and so lacks the SVM XSETBV intercept), else the system's.
pub fn l0_qemu() -> PathBuf {
    if let Some(q) = std::env::var_os("PORTHOLE_HW_L0_QEMU") {
        return PathBuf::from(q);
    }
    let dir = std::env::var_os("PORTHOLE_HW_L0_QEMU_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/hw-l0-qemu"));
    let fetched = dir.join("usr/bin/qemu-system-x86_64");
    if fetched.is_file() { fetched } else { PathBuf::from("qemu-system-x86_64") }
}

/// Rounds of the benchmark scenarios' engine runs (boot-times, firmware): `PORTHOLE_HW_ROUNDS`, 1 to 10,
/// 3 when unset (`./x test` runs one, to keep CI short; `./x test-hw` three, for the README's figures).
pub fn rounds() -> usize {
    std::env::var("PORTHOLE_HW_ROUNDS").ok().and_then(|v| v.parse().ok()).filter(|n| (1..=10).contains(n)).unwrap_or(3)
}

/// How the scenarios run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On this host's own hardware virtualization.
    Direct,
    /// Inside an L1 under QEMU TCG.
    Nested,
}

/// Whether this host's CPU has VT-x or AMD-V and a usable `/dev/kvm` (not a PVM KVM, which has neither flag).
pub fn host_has_hardware_virtualization() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm"))))
        .unwrap_or(false);
    flags && std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// The mode `PORTHOLE_HW` (direct | nested | auto) asks for.
pub fn mode() -> Result<Mode, String> {
    match std::env::var("PORTHOLE_HW").unwrap_or_default().as_str() {
        "" | "auto" => Ok(if host_has_hardware_virtualization() { Mode::Direct } else { Mode::Nested }),
        "nested" => Ok(Mode::Nested),
        "direct" if host_has_hardware_virtualization() => Ok(Mode::Direct),
        "direct" => Err("PORTHOLE_HW=direct, but this CPU has neither vmx nor svm with a usable /dev/kvm".into()),
        other => Err(format!("PORTHOLE_HW={other:?}: expected direct, nested or auto")),
    }
}

/// A free TCP port on loopback (bound and released: good enough for a test).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A Unix socket here whose every connection is a TCP connection to `127.0.0.1:port` (a port QEMU forwards
/// into L1). Runs until the process ends.
pub struct UnixToTcp {
    pub path: PathBuf,
}

impl UnixToTcp {
    pub fn start(path: PathBuf, port: u16) -> UnixToTcp {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind a proxy socket");
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else { continue };
                let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else { continue };
                let (mut client, mut server) = (client, server);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client, &mut s2);
                    let _ = s2.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        UnixToTcp { path }
    }
}

/// What a scenario needs carried into L1 besides the base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// QEMU, the peer (its binary, libraries and firmware).
    Qemu,
    /// memtest86+'s ISO and the Debian installer ISO.
    Isos,
    /// The backports kernel (tests/hw/fetch-backports-kernel.sh) and its L2 initramfs: guests/vmlinuz-backports
    /// and guests/l2-initramfs-backports.cpio.gz.
    Backports,
    /// The installed Debian disk (tests/hw/make-debian-disk.sh) as L1's virtio-blk drive `/dev/vda`, with
    /// QEMU's `snapshot=on` so the cached image stays clean (direct mode: a sparse copy, `HW_DISK`).
    DebianDisk,
    /// The cloud image (tests/hw/make-cloud-image.sh, a qcow2 file) as L1's read-only virtio-blk drive
    /// `/dev/vda`, whose bytes are the file's (QEMU rounds the size up to whole sectors with zeros, which a
    /// qcow2 reader ignores); direct mode: the file itself, `HW_CLOUD_IMAGE`.
    CloudImage,
}

/// Where tests/hw/make-debian-disk.sh leaves the installed Debian disk.
pub fn debian_disk() -> PathBuf {
    std::env::var_os("PORTHOLE_HW_DISK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/hw-disk"))
        .join("debian.img")
}

/// Where tests/hw/make-cloud-image.sh leaves the cloud image.
pub fn cloud_image() -> PathBuf {
    std::env::var_os("PORTHOLE_HW_CLOUD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/hw-cloud"))
        .join("debian-cloud.qcow2")
}

/// The pieces that are drives of L1 rather than archives appended to its initrd: their QEMU `-drive` values.
fn l1_drives(pieces: &[Piece]) -> Result<Vec<String>, String> {
    let mut drives = Vec::new();
    for piece in pieces {
        if *piece == Piece::DebianDisk {
            let img = debian_disk();
            if !img.is_file() {
                return Err(format!("{}: missing (run tests/hw/make-debian-disk.sh as root)", img.display()));
            }
            // QEMU's option syntax doubles a comma inside a value.
            let file = img.display().to_string().replace(',', ",,");
            drives.push(format!("file={file},format=raw,if=virtio,snapshot=on"));
        }
        if *piece == Piece::CloudImage {
            let img = cloud_image();
            if !img.is_file() {
                return Err(format!("{}: missing (run tests/hw/make-cloud-image.sh as root)", img.display()));
            }
            // Raw, so L1 reads the qcow2 file's own bytes; read-only, so nothing in L1 can change it.
            let file = img.display().to_string().replace(',', ",,");
            drives.push(format!("file={file},format=raw,if=virtio,readonly=on"));
        }
    }
    Ok(drives)
}

/// The longest console line kept whole; longer ones arrive in pieces of this size.
const MAX_LINE: usize = 64 * 1024;

/// One line of the console, with the time it arrived.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// A running scenario: L1 (or, direct, the scenario script itself) and the host ends of its sockets.
pub struct Machine {
    child: Child,
    lines: Receiver<Line>,
    /// Every line so far (also written to `log_path`).
    pub seen: Vec<Line>,
    log: std::fs::File,
    pub log_path: PathBuf,
    pub started: Instant,
    /// The L2 VM's RFB console, its control socket and the daemon's API, as Unix sockets here.
    pub vnc: UnixToTcp,
    pub control: UnixToTcp,
    pub api: UnixToTcp,
    _scratch: Scratch,
    echo: bool,
}

impl Machine {
    /// Starts `scenario` (tests/hw/scenarios/NAME.sh) in `mode`.
    pub fn start(scenario: &str, pieces: &[Piece], mode: Mode) -> Result<Machine, String> {
        let hw = hw_dir();
        let scratch = Scratch::new(&format!("hw-{scenario}"));
        let (vnc_port, ctl_port, api_port) = (free_port(), free_port(), free_port());
        let logs = hw.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let log_path = logs.join(format!("{scenario}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;

        let mut cmd = match mode {
            Mode::Nested => {
                // The initrd is the base archive with the scenario's pieces appended (Linux unpacks them all).
                let initrd = scratch.path("l1-initrd.cpio");
                let mut out = std::fs::File::create(&initrd).map_err(|e| e.to_string())?;
                let mut parts = vec![hw.join("l1-base.cpio")];
                parts.extend(pieces.iter().filter_map(|p| match p {
                    Piece::Qemu => Some(hw.join("l1-qemu.cpio")),
                    Piece::Isos => Some(hw.join("l1-isos.cpio")),
                    Piece::Backports => Some(hw.join("l1-backports.cpio")),
                    Piece::DebianDisk | Piece::CloudImage => None,
                }));
                let drives = l1_drives(pieces)?;
                for part in &parts {
                    let mut f = std::fs::File::open(part)
                        .map_err(|e| format!("{}: {e} (run tests/hw/build.sh, or ./x test-hw)", part.display()))?;
                    std::io::copy(&mut f, &mut out).map_err(|e| e.to_string())?;
                }
                drop(out);
                let mut cmd = Command::new(l0_qemu());
                let cpus = std::env::var("PORTHOLE_HW_L1_CPUS").unwrap_or_else(|_| "2".into());
                cmd.args(["-accel", "tcg", "-cpu", "max", "-smp", &cpus, "-m", &l1_memory_mib().to_string()]);
                cmd.args(["-M", "pc", "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio"]);
                cmd.args(["-monitor", "none"]);
                cmd.arg("-kernel").arg(hw.join("l1-vmlinuz")).arg("-initrd").arg(&initrd);
                cmd.args([
                    "-append",
                    &format!("console=ttyS0 quiet loglevel=3 panic=-1 hw.scenario={scenario} hw.rounds={}", rounds()),
                    "-nic",
                    &format!(
                        "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{vnc_port}-:5900,\
                         hostfwd=tcp:127.0.0.1:{ctl_port}-:5901,hostfwd=tcp:127.0.0.1:{api_port}-:5902"
                    ),
                ]);
                for drive in &drives {
                    cmd.arg("-drive").arg(drive);
                }
                cmd
            }
            Mode::Direct => {
                let stage = stage_direct(&hw, &scratch)?;
                // The lines L1's /init prints around a scenario, so the host side is the same.
                let script = repo_root().join(format!("tests/hw/scenarios/{scenario}.sh"));
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(format!(
                    "echo 'HW-L1-KVM ok npt=direct'; echo 'HW-L1-UP scenario={scenario} direct'; \
                     sh '{}'; echo \"HW-L1-END rc=$?\"",
                    script.display()
                ));
                cmd.env("HW", &stage).env("HW_TMP", scratch.dir()).current_dir(scratch.dir());
                cmd.env("HW_ROUNDS", rounds().to_string());
                cmd.env(
                    "PATH",
                    format!("{}:{}", stage.join("bin").display(), std::env::var("PATH").unwrap_or_default()),
                );
                cmd.env("HW_VNC_LISTEN", format!("tcp:127.0.0.1:{vnc_port}"));
                cmd.env("HW_CTL_PORT", ctl_port.to_string()).env("HW_API_PORT", api_port.to_string());
                if pieces.contains(&Piece::DebianDisk) {
                    l1_drives(pieces)?;
                    // The engine writes to its disk: give it a sparse copy, not the cached image.
                    let copy = scratch.path("debian.img");
                    let ok = Command::new("cp")
                        .arg("--sparse=always")
                        .arg(debian_disk())
                        .arg(&copy)
                        .status()
                        .is_ok_and(|s| s.success());
                    if !ok {
                        return Err(format!("could not copy {} to {}", debian_disk().display(), copy.display()));
                    }
                    cmd.env("HW_DISK", &copy);
                }
                if pieces.contains(&Piece::CloudImage) {
                    l1_drives(pieces)?;
                    // The scenario only reads it (a copy goes into the daemon's library).
                    cmd.env("HW_CLOUD_IMAGE", cloud_image());
                }
                cmd
            }
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group, so that ending it ends everything it started (direct mode's daemons).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| format!("start {cmd:?}: {e}"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                let send = |line: &mut Vec<u8>| {
                    let text = String::from_utf8_lossy(line).trim_end_matches(['\r', '\n']).to_owned();
                    line.clear();
                    tx.send(Line { at: Instant::now(), text }).is_ok()
                };
                'read: loop {
                    let chunk = match reader.fill_buf() {
                        Ok([]) | Err(_) => break,
                        Ok(chunk) => chunk.to_vec(),
                    };
                    reader.consume(chunk.len());
                    for byte in chunk {
                        line.push(byte);
                        if (byte == b'\n' || line.len() >= MAX_LINE) && !send(&mut line) {
                            break 'read;
                        }
                    }
                    // A getty's prompt ("NAME login: ") waits for input without ending its line.
                    if line.ends_with(b"login: ") && !send(&mut line) {
                        break;
                    }
                }
                if !line.is_empty() {
                    send(&mut line);
                }
            });
        }
        let vnc = UnixToTcp::start(scratch.path("vnc.sock"), vnc_port);
        let echo = std::env::var_os("PORTHOLE_HW_VERBOSE").is_some();
        if echo {
            // Where to watch: `porthole vnc+unix://PATH` (or any VNC viewer) while the scenario runs.
            eprintln!("    | {scenario}: the L2 console is at vnc+unix://{}", vnc.path.display());
        }
        Ok(Machine {
            child,
            lines,
            seen: Vec::new(),
            log,
            log_path,
            started,
            vnc,
            control: UnixToTcp::start(scratch.path("control.sock"), ctl_port),
            api: UnixToTcp::start(scratch.path("api.sock"), api_port),
            _scratch: scratch,
            echo,
        })
    }

    fn record(&mut self, line: Line) {
        let _ = writeln!(self.log, "{:9.3} {}", line.at.duration_since(self.started).as_secs_f64(), line.text);
        if self.echo {
            eprintln!("    | {}", line.text);
        }
        self.seen.push(line);
    }

    /// Waits for a line containing `needle`, looking first at lines seen since index `from`. Fails when
    /// `limit` passes, when L1 ends its scenario, or when the machine exits.
    pub fn expect_from(&mut self, from: usize, needle: &str, limit: Duration) -> Result<Line, String> {
        if let Some(l) = self.seen.iter().skip(from).find(|l| l.text.contains(needle)) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(line) => {
                    let hit = line.text.contains(needle);
                    let ended = line.text.contains("HW-L1-END") || line.text.contains("Kernel panic");
                    self.record(line.clone());
                    if hit {
                        return Ok(line);
                    }
                    if ended {
                        return Err(format!("the scenario ended without {needle:?}: {:?}", line.text));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!("the machine exited without {needle:?}"));
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= deadline {
                return Err(format!("no {needle:?} within {} s", limit.as_secs()));
            }
        }
    }

    /// Waits for a line containing `needle` that arrives after every line seen so far.
    pub fn expect(&mut self, needle: &str, limit: Duration) -> Result<Line, String> {
        let from = self.seen.len();
        self.expect_from(from, needle, limit)
    }

    /// The value of `key=VALUE` in a line.
    pub fn field<'a>(line: &'a Line, key: &str) -> Option<&'a str> {
        line.text.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    }

    /// The last `n` lines seen, for a failure report.
    pub fn tail(&self, n: usize) -> String {
        let skip = self.seen.len().saturating_sub(n);
        self.seen.iter().skip(skip).map(|l| format!("      | {}\n", l.text)).collect()
    }

    /// Waits for the machine to end on its own (L1 powers off after its scenario); fails if it does not
    /// within `limit`. Either way it is ended when dropped.
    pub fn finish(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            while let Ok(line) = self.lines.try_recv() {
                self.record(line);
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.record(line);
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("did not end within {} s", limit.as_secs()))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the process group this harness created for its own child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// L1's memory: room for the base image and the QEMU piece in its tmpfs, L2 guests of up to 1 GiB and QEMU.
fn l1_memory_mib() -> u64 {
    std::env::var("PORTHOLE_HW_L1_MEMORY").ok().and_then(|m| m.parse().ok()).unwrap_or(3072)
}

/// For direct mode: a directory laid out like L1's /hw (bin/, guests/, share/, scenarios/), made of links to
/// the host's binaries and the built guests.
fn stage_direct(hw: &Path, scratch: &Scratch) -> Result<PathBuf, String> {
    let stage = scratch.path("hw");
    let link = |from: &Path, to: &Path| -> Result<(), String> {
        std::fs::create_dir_all(to.parent().unwrap()).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(from, to).map_err(|e| format!("link {}: {e}", to.display()))
    };
    let release = repo_root().join("target/release");
    link(&release.join("porthole-vmm"), &stage.join("bin/porthole-vmm"))?;
    link(&release.join("portholed"), &stage.join("bin/portholed"))?;
    link(&hw.join("busybox"), &stage.join("bin/busybox"))?;
    link(&hw.join("guests"), &stage.join("guests"))?;
    link(&repo_root().join("tests/hw/scenarios"), &stage.join("scenarios"))?;
    link(Path::new("/usr/share/qemu"), &stage.join("share/qemu"))?;
    let bios = vmm_core::config::find_seabios().ok_or("no SeaBIOS: apt-get install seabios")?;
    link(bios.parent().ok_or("SeaBIOS has no directory")?, &stage.join("share/seabios"))?;
    Ok(stage)
}

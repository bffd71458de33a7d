//! The local daemon: its socket, and starting it for this user when it is not running.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The local daemon's socket: `$XDG_RUNTIME_DIR/porthole/portholed.sock` (or `PORTHOLE_SOCKET`).
pub fn socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTHOLE_SOCKET") {
        return PathBuf::from(p);
    }
    let runtime = directories::ProjectDirs::from("", "", "porthole")
        .and_then(|p| p.runtime_dir().map(|d| d.to_owned()))
        // SAFETY: getuid cannot fail.
        .unwrap_or_else(|| std::env::temp_dir().join(format!("porthole-{}", unsafe { libc::getuid() })));
    runtime.join("portholed.sock")
}

/// Why the local host cannot be used, with the fix, if `/dev/kvm` is the problem.
pub fn kvm_problem() -> Option<String> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(
            "/dev/kvm does not exist: enable virtualization (VT-x/AMD-V) in the firmware settings and load the kvm module \
             (sudo modprobe kvm_intel or kvm_amd)"
                .into(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(
            "you may not use /dev/kvm: add yourself to the kvm group (sudo usermod -aG kvm $USER) and log in again".into(),
        ),
        Err(e) => Some(format!("cannot open /dev/kvm: {e}")),
    }
}

/// Makes sure a daemon answers on `socket`: starts `portholed` (next to this program, else on PATH) in
/// the background if nothing listens there, keeping its VMs in `data_dir` when given, and waits up to 10 s
/// for it.
pub fn ensure_running(socket: &std::path::Path, data_dir: Option<&std::path::Path>) -> Result<(), String> {
    let program = crate::sibling_program("portholed");
    let custom_socket = socket != socket_path() || std::env::var_os("PORTHOLE_SOCKET").is_some();
    ensure_running_with(&program, socket, custom_socket, data_dir).map(|_| ())
}

/// `ensure_running` with the daemon's program given; `custom_socket`: the socket is not the default one, so
/// the daemon is told its folder. Returns the process id of the daemon it started (None: one was running).
pub fn ensure_running_with(
    program: &std::path::Path,
    socket: &std::path::Path,
    custom_socket: bool,
    data_dir: Option<&std::path::Path>,
) -> Result<Option<u32>, String> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Ok(None);
    }
    let mut cmd = std::process::Command::new(program);
    if custom_socket && let Some(dir) = socket.parent() {
        cmd.arg("--runtime-dir").arg(dir);
    }
    if let Some(dir) = data_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        cmd.arg("--data-dir").arg(dir);
    }
    use std::os::unix::process::CommandExt;
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // Its own process group: it outlives the window.
    cmd.process_group(0);
    let mut child =
        cmd.spawn().map_err(|e| format!("cannot start {}: {e} (is Porthole installed?)", program.display()))?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(Some(child.id()));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("portholed exited at once ({status}); run it in a terminal to see why"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A daemon that never answered is not left behind, serving nobody.
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("portholed did not open {} within 10 s", socket.display()))
}

//! The audit's checks (SECURITY.md): the permissions of every file and socket the daemon and the engine
//! create, the seccomp state of every engine thread, and the TLS versions the HTTPS listener accepts.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use porthole_api::client::Action;
use porthole_api::{BootSpec, CreateVm, DiskFormat, VmState};
use porthole_tests::daemon::Daemon;
use porthole_tests::{Scratch, seccomp_modes, text};

const LIMIT: Duration = Duration::from_secs(120);

/// The idle micro-guest with a 1 GiB qcow2 disk and no network card.
fn idle_vm(name: &str) -> CreateVm {
    CreateVm {
        boot: Some(BootSpec {
            kernel: porthole_guests::path("idle").display().to_string(),
            initrd: None,
            cmdline: String::new(),
        }),
        disk_gib: 1,
        disk_format: Some(DiskFormat::Qcow2),
        nics: Some(Vec::new()),
        ..CreateVm::new(name, 1, 64)
    }
}

/// Every path under `root` (itself included), with its metadata (not following links).
fn walk(root: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) {
    let meta = std::fs::symlink_metadata(root).unwrap();
    let is_dir = meta.is_dir();
    out.push((root.to_owned(), meta));
    if is_dir {
        for entry in std::fs::read_dir(root).unwrap() {
            walk(&entry.unwrap().path(), out);
        }
    }
}

/// The exact mode SECURITY.md's table gives a path (relative to the data or runtime dir), if it gives one.
/// Every other path has the general rule: no permission bit for group or others.
fn required_mode(rel: &Path, meta: &std::fs::Metadata) -> Option<u32> {
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if rel.as_os_str().is_empty() {
        return Some(0o700); // the data dir and the runtime dir themselves
    }
    if meta.file_type().is_socket() {
        return Some(0o600);
    }
    match name.as_str() {
        // Secrets, and what the daemon writes atomically (a 0600 temp file renamed).
        "tokens.json" | "key.pem" | "cert.pem" | "vm.json" | "pid" => Some(0o600),
        _ => None,
    }
}

/// Checks every path under `root` against the table; returns the relative paths seen.
fn check_tree(root: &Path, problems: &mut Vec<String>) -> Vec<String> {
    let mut all = Vec::new();
    walk(root, &mut all);
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let mut seen = Vec::new();
    for (path, meta) in &all {
        let rel = path.strip_prefix(root).unwrap();
        let mode = meta.mode() & 0o7777;
        seen.push(format!("{} {mode:04o}", rel.display()));
        if meta.uid() != me {
            problems.push(format!("{}: owned by uid {}, not {me}", path.display(), meta.uid()));
        }
        if mode & 0o7000 != 0 {
            problems.push(format!("{}: setuid/setgid/sticky bits {mode:04o}", path.display()));
        }
        if meta.file_type().is_symlink() {
            continue;
        }
        match required_mode(rel, meta) {
            Some(want) if mode != want => {
                problems.push(format!("{}: mode {mode:04o}, SECURITY.md says {want:04o}", path.display()))
            }
            Some(_) => {}
            None if mode & 0o077 != 0 => {
                problems.push(format!("{}: mode {mode:04o} gives group or others access", path.display()))
            }
            None => {}
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_and_socket_has_the_documented_mode_and_every_engine_thread_is_filtered() {
    let dir = Scratch::new("security-modes");
    // The daemon's own umask must make its files private, whatever the umask it inherits: the widest.
    // SAFETY: umask changes this test process's creation mask (the other test here creates nothing that
    // depends on it); it cannot fail.
    unsafe { libc::umask(0) };
    let d = Daemon::start(&dir, true, &[]);
    let _token = d.token("auditor", "viewer", &[]);
    let c = d.local();
    let vm = c.create_vm(&idle_vm("audited")).await.unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    porthole_tests::daemon::wait_state(&c, &vm.id, VmState::Running, LIMIT).await;
    let vm_run = d.run.join("vms").join(&vm.id);
    // The engine binds its sockets before the VM runs; the ticket makes sure the console is reachable.
    c.console_ticket(&vm.id).await.unwrap();

    let mut problems = Vec::new();
    let data_seen = check_tree(&d.data, &mut problems);
    let run_seen = check_tree(&d.run, &mut problems);
    let listing = format!("data:\n  {}\nruntime:\n  {}", data_seen.join("\n  "), run_seen.join("\n  "));
    // The table's entries exist (the checks above saw them).
    let vm_dir = Path::new("vms").join(&vm.id);
    for (seen, rel) in [
        (&data_seen, PathBuf::from("tokens.json")),
        (&data_seen, PathBuf::from("tls/key.pem")),
        (&data_seen, PathBuf::from("tls/cert.pem")),
        (&data_seen, vm_dir.join("vm.json")),
        (&data_seen, vm_dir.join("disk0.qcow2")),
        (&run_seen, PathBuf::from("portholed.sock")),
        (&run_seen, vm_dir.join("control.sock")),
        (&run_seen, vm_dir.join("vnc.sock")),
        (&run_seen, vm_dir.join("vnc-view.sock")),
        (&run_seen, vm_dir.join("pid")),
        (&run_seen, vm_dir.join("serial.log")),
        (&run_seen, vm_dir.join("vmm.log")),
        (&run_seen, PathBuf::from("portholed.lock")),
    ] {
        let prefix = format!("{} ", rel.display());
        assert!(seen.iter().any(|s| s.starts_with(&prefix)), "{} is missing:\n{listing}", rel.display());
    }
    assert!(problems.is_empty(), "{}\n{listing}", problems.join("\n"));

    // Every thread of the engine (vCPU, control, RFB listeners, display, disk queue) runs under a filter.
    let pid: u32 = std::fs::read_to_string(vm_run.join("pid")).unwrap().trim().parse().unwrap();
    let names = ["vcpu0", "control", "rfb-listen", "display", "blk-queue"];
    // The machine's threads start with its first boot, after the sockets are up.
    porthole_tests::wait_until(
        LIMIT,
        || names.iter().all(|name| seccomp_modes(pid).iter().any(|(n, _)| n == name)),
        || format!("engine threads: {:?}", seccomp_modes(pid)),
    );
    let threads = seccomp_modes(pid);
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "engine thread {name} is not under a seccomp filter: {threads:?}");
    }
    eprintln!("engine threads: {threads:?}\n{listing}");
}

/// `openssl s_client` at `authority` with one protocol version flag: (handshake done, its output).
fn s_client(authority: &str, version: &str) -> (bool, String) {
    let out = Command::new("openssl")
        // SECLEVEL=0 lets OpenSSL itself offer TLS 1.0/1.1, so a refusal is the server's.
        .args(["s_client", "-connect", authority, version, "-cipher", "DEFAULT@SECLEVEL=0"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs: apt-get install openssl (./x does)");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (out.status.success() && all.contains("-----BEGIN CERTIFICATE-----"), all)
}

#[test]
fn the_https_listener_speaks_tls_1_2_and_1_3_only() {
    let dir = Scratch::new("security-tls");
    let d = Daemon::start(&dir, true, &[]);
    let (authority, fingerprint) = d.remote.clone().unwrap();
    for version in ["-tls1_2", "-tls1_3"] {
        let (ok, out) = s_client(&authority, version);
        assert!(ok, "{version}: the handshake failed:\n{out}");
        let shown = if version == "-tls1_2" { "Protocol  : TLSv1.2" } else { "TLSv1.3" };
        assert!(out.contains(shown), "{version}: not {shown}:\n{out}");
        // The certificate served is the one whose fingerprint the daemon printed.
        let pem = out.split("-----BEGIN CERTIFICATE-----").nth(1).unwrap().split("-----END").next().unwrap();
        let der = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                let pem = format!("-----BEGIN CERTIFICATE-----{pem}-----END CERTIFICATE-----\n");
                child.stdin.take().unwrap().write_all(pem.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        let printed = text(&der.stdout).rsplit('=').next().unwrap().trim().replace(':', "").to_lowercase();
        assert_eq!(printed, fingerprint, "{version}: another certificate");
    }
    for version in ["-tls1", "-tls1_1"] {
        let (ok, out) = s_client(&authority, version);
        assert!(!ok, "{version}: the handshake succeeded:\n{out}");
        assert!(!out.contains("no protocols available"), "{version}: OpenSSL did not even offer it:\n{out}");
        // The client sent its hello and the server answered with an alert record (7 bytes).
        assert!(
            out.contains("SSL handshake has read 7 bytes") && out.contains("SSL alert number"),
            "{version}: not refused by the server's alert:\n{out}"
        );
    }
}

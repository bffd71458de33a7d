//! A `portholed` for tests: its own data and runtime dirs (kept across restarts of the daemon), its log,
//! the HTTPS address and certificate fingerprint when it listens, tokens, and clean-up of the VM processes it
//! started (they outlive a daemon by design).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use porthole_api::Client;

use crate::{Scratch, text, wait_until, workspace_bin};

const LIMIT: Duration = Duration::from_secs(60);

/// A daemon on its own data and runtime dirs (kept across restarts of the daemon).
pub struct Daemon {
    pub data: PathBuf,
    pub run: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// `host:port` and certificate fingerprint of the HTTPS listener.
    pub remote: Option<(String, String)>,
}

impl Daemon {
    pub fn start(dir: &Scratch, listen: bool, extra: &[&str]) -> Daemon {
        Self::start_with_env(dir, listen, extra, &[])
    }

    pub fn start_with_env(dir: &Scratch, listen: bool, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let (data, run) = (dir.path("data"), dir.path("run"));
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = dir.path(&format!("portholed-{n}.log"));
        let mut cmd = Command::new(workspace_bin("portholed"));
        cmd.arg("--data-dir").arg(&data).arg("--runtime-dir").arg(&run);
        cmd.arg("--vmm").arg(workspace_bin("porthole-vmm"));
        if listen {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(extra).envs(env.iter().copied());
        let log_file = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file);
        let child = cmd.spawn().unwrap();
        let mut d = Daemon { data, run, log, child: Some(child), remote: None };
        wait_until(LIMIT, || d.log_text().contains("local API on"), || format!("daemon log:\n{}", d.log_text()));
        if listen {
            wait_until(LIMIT, || d.log_text().contains("remote API on"), || format!("daemon log:\n{}", d.log_text()));
            let line = d.log_text().lines().find(|l| l.contains("remote API on")).unwrap().to_owned();
            let authority = line.split("https://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
            let fp = line.split("sha256 ").nth(1).unwrap().trim_end_matches(')').to_owned();
            d.remote = Some((authority, fp));
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        self.run.join("portholed.sock")
    }

    pub fn local(&self) -> Client {
        Client::unix(&self.socket()).unwrap()
    }

    pub fn remote(&self, token: &str) -> Client {
        let (authority, fp) = self.remote.as_ref().expect("started with --listen");
        Client::https(authority, token, Some(fp)).unwrap()
    }

    pub fn token(&self, name: &str, role: &str, vms: &[&str]) -> String {
        let mut cmd = Command::new(workspace_bin("portholed"));
        cmd.arg("--data-dir").arg(&self.data).arg("--runtime-dir").arg(&self.run);
        cmd.args(["token", "create", "--name", name, "--role", role]);
        for vm in vms {
            cmd.args(["--vm", vm]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    pub fn token_command(&self, args: &[&str]) -> std::process::Output {
        Command::new(workspace_bin("portholed"))
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--runtime-dir")
            .arg(&self.run)
            .arg("token")
            .args(args)
            .output()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // VM processes outlive their daemon by design: end the ones this test's daemon started.
        for entry in std::fs::read_dir(self.run.join("vms")).into_iter().flatten().flatten() {
            let Some(pid) =
                std::fs::read_to_string(entry.path().join("pid")).ok().and_then(|p| p.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if text(&cmdline).contains(&entry.path().display().to_string()) {
                // SAFETY: kill(2) of a VM process this test's daemon started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Polls VM `id` through `c` until it is in `state` (at most `limit`), and returns it.
pub async fn wait_state(c: &Client, id: &str, state: porthole_api::VmState, limit: Duration) -> porthole_api::Vm {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let vm = c.vm(id).await.unwrap();
        if vm.state == state {
            return vm;
        }
        assert!(std::time::Instant::now() < deadline, "VM never reached {state:?}: {vm:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Boots VM `id` (through `c`) on the virtio-blk micro-guest with `words` on its command line and waits
/// (at most `limit`) for it to power off; returns its serial lines (the guest's `BLK …` results).
pub async fn run_blk_guest(c: &Client, id: &str, words: &str, limit: Duration) -> Vec<String> {
    use porthole_api::{BootSpec, UpdateVm, VmState, client::Action};
    let boot = BootSpec {
        kernel: porthole_guests::path("virtio-blk").display().to_string(),
        initrd: None,
        cmdline: words.into(),
    };
    c.update_vm(id, &UpdateVm { boot: Some(boot), ..Default::default() }).await.unwrap();
    c.action(id, Action::Start).await.unwrap();
    let vm = wait_state(c, id, VmState::Stopped, limit).await;
    let lines = c.serial(id, 200).await.unwrap().lines;
    assert!(lines.iter().any(|l| l.contains("BLK done")), "{vm:?}\n{lines:#?}");
    lines
}

/// The first of `lines` that starts with `prefix` (the test fails without one).
pub fn line_starting<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {lines:#?}"))
}

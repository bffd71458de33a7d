//! `snapshot`: saving a running VM's state to a file and starting from it, for guests of 256 MiB and 1 GiB,
//! idle (almost every page zero) and with 200 MiB written, on porthole-vmm (control `save-state` with
//! `then: stop`, then `--restore`) and on QEMU (`-M microvm`, QMP `migrate` to `exec:cat > FILE`, then
//! `-incoming exec:cat FILE`), same guest (`counter`, tests/guests/asm/counter.S) and run.
//!
//! Measured: the state file's size; the save (request sent → the VMM reports the state written: Porthole's
//! guest is paused all along, QEMU's runs until its last pass); the restore (process start → the guest's
//! next count on its serial port, which also proves it continued rather than restarted).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vmm_core::control::{ControlClient, Request};
use vmm_core::vm::Then;

const LIMIT: Duration = Duration::from_secs(120);

/// The counts in a serial log.
fn counts(path: &Path) -> Vec<u64> {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    text.lines().filter_map(|l| l.strip_prefix("PORTHOLE-COUNT ")?.trim().parse().ok()).collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > LIMIT {
            bail!("{what}: gave up after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

struct Figures {
    bytes: u64,
    save: Duration,
    restore: Duration,
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn porthole(dir: &Path, mib: u32, touch: u32) -> anyhow::Result<Figures> {
    let vmm = super::sibling("porthole-vmm")?;
    let (log, control, state) = (dir.join("p.log"), dir.join("p.sock"), dir.join("p.state"));
    let start = |serial: &Path, extra: &[&std::ffi::OsStr]| -> anyhow::Result<Child> {
        let _ = std::fs::remove_file(serial);
        let mut c = Command::new(&vmm);
        c.arg("--kernel").arg(porthole_guests::path("counter")).args(["--memory", &mib.to_string()]);
        if touch > 0 {
            c.args(["--cmdline", &touch.to_string()]);
        }
        c.arg("--serial").arg(format!("file:{}", serial.display())).args(extra);
        Ok(c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
    };
    let child = start(&log, &["--control".as_ref(), format!("unix:{}", control.display()).as_ref()])?;
    wait_for("the counter", || counts(&log).len() >= 2)?;
    let t = Instant::now();
    let reply =
        ControlClient::connect(&control)?.request(&Request::SaveState { path: state.clone(), then: Then::Stop })?;
    let save = t.elapsed();
    kill(child);
    let saved = counts(&log).last().copied().unwrap_or(0);
    let back_log = dir.join("p2.log");
    let t = Instant::now();
    let back = start(&back_log, &["--restore".as_ref(), state.as_os_str()])?;
    wait_for("the restored counter", || !counts(&back_log).is_empty())?;
    let restore = t.elapsed();
    kill(back);
    let first = counts(&back_log)[0];
    if first != saved + 1 {
        bail!("porthole-vmm: the restored count is {first}, the saved one {saved}");
    }
    Ok(Figures { bytes: reply.state_bytes.unwrap_or_default(), save, restore })
}

/// One QMP command; returns the reply line (events before it are skipped).
fn qmp(stream: &mut BufReader<UnixStream>, command: &str) -> anyhow::Result<String> {
    stream.get_mut().write_all(command.as_bytes())?;
    stream.get_mut().write_all(b"\n")?;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line)? == 0 {
            bail!("QMP closed");
        }
        if line.contains("\"return\"") || line.contains("\"error\"") {
            return Ok(line);
        }
    }
}

fn qemu(dir: &Path, mib: u32, touch: u32) -> anyhow::Result<Figures> {
    let (log, qmp_path, state) = (dir.join("q.log"), dir.join("q.qmp"), dir.join("q.state"));
    let start = |serial: &Path, extra: &[String]| -> anyhow::Result<Child> {
        let _ = std::fs::remove_file(serial);
        let _ = std::fs::remove_file(&qmp_path);
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", &mib.to_string()])
            .args(["-display", "none", "-nodefaults", "-no-reboot", "-kernel"])
            .arg(porthole_guests::path("counter"))
            .args(["-append", &touch.to_string()])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(extra);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("qemu-system-x86_64")
    };
    let connect = || -> anyhow::Result<BufReader<UnixStream>> {
        wait_for("QEMU's QMP socket", || UnixStream::connect(&qmp_path).is_ok())?;
        let mut s = BufReader::new(UnixStream::connect(&qmp_path)?);
        let mut greeting = String::new();
        s.read_line(&mut greeting)?;
        qmp(&mut s, r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(s)
    };
    let child = start(&log, &[])?;
    wait_for("the counter on QEMU", || counts(&log).len() >= 2)?;
    let mut s = connect()?;
    let t = Instant::now();
    let uri = format!("exec:cat > {}", state.display());
    qmp(&mut s, &format!(r#"{{"execute":"migrate","arguments":{{"uri":{}}}}}"#, serde_json::to_string(&uri)?))?;
    loop {
        let reply = qmp(&mut s, r#"{"execute":"query-migrate"}"#)?;
        if reply.contains("\"completed\"") {
            break;
        }
        if reply.contains("\"failed\"") || t.elapsed() > LIMIT {
            bail!("QEMU's migration to a file: {reply}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let save = t.elapsed();
    kill(child);
    let saved = counts(&log).last().copied().unwrap_or(0);
    let back_log = dir.join("q2.log");
    let t = Instant::now();
    let back = start(&back_log, &["-incoming".into(), format!("exec:cat {}", state.display())])?;
    wait_for("the restored counter on QEMU", || !counts(&back_log).is_empty())?;
    let restore = t.elapsed();
    kill(back);
    let first = counts(&back_log)[0];
    if first != saved + 1 {
        bail!("QEMU: the restored count is {first}, the saved one {saved}");
    }
    Ok(Figures { bytes: std::fs::metadata(&state)?.len(), save, restore })
}

pub fn run() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("porthole-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("snapshot: save a running `counter` VM's state to a file and start from it (QEMU: migrate to exec:cat)");
    let mut result = Ok(());
    for (mib, touch) in [(256, 0), (256, 200), (1024, 0), (1024, 200)] {
        let p = match porthole(&dir, mib, touch) {
            Ok(p) => p,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let line = |name: &str, f: &Figures| {
            format!(
                "  {name:<14} file {:9.2} MiB   save {:8.1} ms   restore {:8.1} ms",
                f.bytes as f64 / f64::from(1 << 20),
                f.save.as_secs_f64() * 1e3,
                f.restore.as_secs_f64() * 1e3
            )
        };
        println!("{mib:>5} MiB guest, {touch:>3} MiB written:");
        println!("{}", line("porthole-vmm", &p));
        match qemu(&dir, mib, touch) {
            Ok(q) => {
                println!("{}", line("QEMU", &q));
                println!(
                    "  ratio          file {:9.2}       save {:8.2}      restore {:8.2}",
                    p.bytes as f64 / q.bytes as f64,
                    p.save.as_secs_f64() / q.save.as_secs_f64(),
                    p.restore.as_secs_f64() / q.restore.as_secs_f64()
                );
            }
            Err(e) => println!("  QEMU           not measured: {e:#}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

//! The GUI under Xvfb (Mesa's software OpenGL): launch → first frame, the CPU an idle window with an open,
//! unchanging console costs, and a 1920x1080 console fed at 60 frames/s: frames shown and UI frame time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use porthole_tests::{Xvfb, wait_until};

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

pub fn run(runs: usize) -> anyhow::Result<()> {
    let porthole = crate::sibling("porthole")?;
    let dir = std::env::temp_dir().join(format!("porthole-bench-gui-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let x = Xvfb::start(1280, 800);
    let app = |args: &[&str], report: &Path| {
        Command::new(&porthole)
            .args(args)
            .env("DISPLAY", &x.display)
            .env_remove("WAYLAND_DISPLAY")
            .env("XDG_RUNTIME_DIR", &dir)
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("PORTHOLE_SOCKET", dir.join("run/portholed.sock"))
            .env("PORTHOLE_FIRST_FRAME_FILE", report)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    println!("gui: porthole under Xvfb 1280x800 (Mesa software GL), release build");
    let mut launches = Vec::new();
    for i in 0..runs {
        let report = dir.join(format!("first-frame-{i}"));
        let mut child = app(&[], &report)?;
        let start = Instant::now();
        while !report.exists() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("no first frame within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        let ms: f64 = std::fs::read_to_string(&report)?.trim().parse()?;
        launches.push(ms);
        let _ = child.kill();
        let _ = child.wait();
    }
    launches.sort_by(f64::total_cmp);
    println!(
        "  launch → first frame laid out: median {:.0} ms (min {:.0}, max {:.0}, {runs} runs)",
        launches[runs / 2],
        launches[0],
        launches[runs - 1]
    );

    // Idle: a console open on a VM whose screen does not change (fb-pattern's still picture).
    let (socket, serial) = (dir.join("idle.sock"), dir.join("idle.log"));
    let mut vm = Command::new(crate::sibling("porthole-vmm")?)
        .arg("--kernel")
        .arg(porthole_guests::path("fb-pattern"))
        .args(["--memory", "64", "--serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("--vnc")
        .arg(format!("unix:{}", socket.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_until(
        Duration::from_secs(30),
        || std::fs::read_to_string(&serial).unwrap_or_default().contains("PORTHOLE-FB-PATTERN-READY"),
        || "fb-pattern did not start".into(),
    );
    let mut child = app(&[&format!("vnc+unix://{}", socket.display())], &dir.join("idle-frame"))?;
    std::thread::sleep(Duration::from_secs(5));
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (t0, c0) = (Instant::now(), cpu_ticks(child.id())?);
    std::thread::sleep(Duration::from_secs(10));
    let used = (cpu_ticks(child.id())? - c0) as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;
    println!("  idle window with an open, unchanging console: {used:.2}% of one core over 10 s (goal ~0%)");
    let _ = child.kill();
    let _ = child.wait();
    let _ = vm.kill();
    let _ = vm.wait();

    // A 1920x1080 console fed by the console benchmark's host-side frame source (a window moving across a
    // desktop, a new frame every 16 ms) through the production RFB server; the window (1920x1200 display)
    // reports each second how many console frames it showed and its frames' CPU time.
    drop(x);
    let x = Xvfb::start(1920, 1200);
    let socket = dir.join("fed.sock");
    let (refresher, handle) = crate::console::fed_vm(&socket)?;
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let feeder = {
        let (running, refresher) = (running.clone(), refresher.clone());
        std::thread::spawn(move || {
            let mut source = crate::console::Source::new();
            refresher.host_write(0, &source.rows_bytes(0..1080));
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let rows = source.next(crate::console::Content::Desktop);
                refresher.host_write(u64::from(rows.start) * 1920 * 4, &source.rows_bytes(rows));
                std::thread::sleep(Duration::from_millis(16).saturating_sub(t.elapsed()));
            }
        })
    };
    let stats = dir.join("frame-stats");
    let mut child = Command::new(&porthole)
        .arg(format!("vnc+unix://{}", socket.display()))
        .env("DISPLAY", &x.display)
        .env_remove("WAYLAND_DISPLAY")
        .env("XDG_RUNTIME_DIR", &dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("PORTHOLE_SOCKET", dir.join("run/portholed.sock"))
        .env("PORTHOLE_FRAME_STATS", &stats)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    let _ = Command::new("xdotool")
        .args(["search", "--name", "^Porthole$", "windowmove", "0", "0", "windowsize", "1920", "1200"])
        .env("DISPLAY", &x.display)
        .output();
    std::thread::sleep(Duration::from_secs(3));
    let _ = std::fs::remove_file(&stats);
    std::thread::sleep(Duration::from_secs(10));
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = feeder.join();
    let _ = child.kill();
    let _ = child.wait();
    handle.power_off();
    // Lines: "console_frames ui_frames cpu_ms_mean cpu_ms_p95" per second.
    let lines: Vec<Vec<f64>> = std::fs::read_to_string(&stats)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .filter(|v: &Vec<f64>| v.len() == 4)
        .collect();
    if lines.len() < 3 {
        bail!("the window reported {} seconds of frame statistics", lines.len());
    }
    let n = lines.len() as f64;
    let console_fps = lines.iter().map(|v| v[0]).sum::<f64>() / n;
    let ui_fps = lines.iter().map(|v| v[1]).sum::<f64>() / n;
    let cpu_mean = lines.iter().map(|v| v[2]).sum::<f64>() / n;
    let cpu_p95 = lines.iter().map(|v| v[3]).fold(0.0, f64::max);
    println!(
        "  1920x1080 console fed at 60 frames/s (window 1920x1200, Mesa llvmpipe GL): {console_fps:.1} console frames/s \
         shown, {ui_fps:.1} UI frames/s; UI frame CPU time mean {cpu_mean:.1} ms, worst second's p95 {cpu_p95:.1} ms \
         (goal >= 60 fps, <= 8 ms)"
    );
    // The local daemon the app started for this user (found by its runtime dir).
    let marker = dir.join("run").display().to_string();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(entry.path().join("cmdline")).unwrap_or_default()).into_owned();
        if cmdline.contains("portholed") && cmdline.contains(&marker) {
            // SAFETY: kill(2) of the daemon this benchmark's app started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

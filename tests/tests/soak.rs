//! The soak (issue 20): 16 micro-guest VMs on one daemon for `PORTHOLE_SOAK_MINUTES` (`./x soak MINUTES`),
//! with 10 RFB viewers on their consoles, 100 API clients and the window open, all at once. Each minute the
//! daemon's, every engine's and the window's resident memory and open file descriptors are sampled (the
//! mean of 12 readings 5 s apart; the check compares the means of windows of 3-5 minutes, see below); after a
//! warm-up (the first 5 minutes, or the first half of a run of 10 minutes or less) none may grow by more than 5 %
//! (memory by 25 % in runs under 10 minutes, whose warm-up is shorter than 5), and no request, console update or
//! VM may fail. Ignored by `cargo test` (it runs for minutes): `./x soak`, and `./x test` runs 3 minutes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use porthole_api::client::Action;
use porthole_api::{CreateVm, VmState};
use porthole_tests::daemon::Daemon;
use porthole_tests::{Scratch, Xvfb};

/// Resident memory (KiB) and open descriptors of process `pid`, if it runs. Sockets are not counted: the
/// clients' connections in flight at the moment of a sample come and go (the daemon's moved between 173 and
/// 193 from one minute to the next in a 12-minute run); a leak shows in files, pipes and eventfds.
fn footprint(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| !t.to_string_lossy().starts_with("socket:")))
        .count() as u64;
    Some((rss, fds))
}

/// Process `pid`'s resident memory split: (anonymous, file-backed) KiB (0s if it is gone): growth in the
/// second is code and data of its binary and libraries paged in, not memory it holds.
fn rss_parts(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    };
    (field("RssAnon:").unwrap_or(0), field("RssFile:").unwrap_or(0))
}

/// The mean of `readings` per process (RSS KiB and descriptors, rounded).
fn mean_of(readings: &[Sample]) -> Sample {
    readings[0]
        .iter()
        .enumerate()
        .map(|(p, (label, _, _))| {
            let n = readings.len() as u64;
            let rss = readings.iter().map(|r| r[p].1).sum::<u64>() / n;
            let fds = (readings.iter().map(|r| r[p].2).sum::<u64>() + n / 2) / n;
            (label.clone(), rss, fds)
        })
        .collect()
}

fn pid_in(file: &Path) -> u32 {
    std::fs::read_to_string(file).unwrap().trim().parse().unwrap()
}

/// What one sample saw: (process label, RSS KiB, fds).
type Sample = Vec<(String, u64, u64)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "runs for minutes: ./x soak MINUTES"]
async fn sixteen_vms_with_viewers_clients_and_the_window_stay_flat() {
    let minutes: u64 = std::env::var("PORTHOLE_SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(3).max(2);
    // The window and the daemon fill their caches (fonts, thumbnails, an hour of samples) at first.
    let warm_up = if minutes > 10 { 5 } else { minutes / 2 };
    let dir = Scratch::new("soak");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    // 12 idle guests and 4 animating ones (their consoles always have something new for the viewers).
    let mut ids = Vec::new();
    for i in 0..16 {
        let guest = if i < 4 { "fb-anim" } else { "idle" };
        let req = CreateVm {
            boot: Some(porthole_api::BootSpec {
                kernel: porthole_guests::path(guest).display().to_string(),
                initrd: None,
                cmdline: String::new(),
            }),
            disk_gib: 0,
            nics: Some(Vec::new()),
            ..CreateVm::new(format!("soak{i:02}"), 1, 64)
        };
        let vm = c.create_vm(&req).await.unwrap();
        c.action(&vm.id, Action::Start).await.unwrap();
        ids.push(vm.id);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let updates = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let note = {
        let (errors, first_error) = (errors.clone(), first_error.clone());
        move |what: String| {
            errors.fetch_add(1, Ordering::Relaxed);
            first_error.lock().unwrap().get_or_insert(what);
        }
    };

    // 10 viewers: 2 on each animating VM's console socket, 1 on each of two idle ones; each asks for updates
    // without pause and reconnects every 30 s (as a user reopening a console would).
    let mut viewers = Vec::new();
    for v in 0..10 {
        let target = if v < 8 { v % 4 } else { v - 4 };
        let socket = d.run.join("vms").join(&ids[target]).join("vnc.sock");
        let (stop, updates, note) = (stop.clone(), updates.clone(), note.clone());
        viewers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut client = match porthole_tests::rfb::RfbClient::connect(&socket, None) {
                    Ok(c) => c,
                    Err(e) => {
                        note(format!("viewer {v}: connect: {e}"));
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                };
                let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
                let since = Instant::now();
                let mut incremental = false;
                while !stop.load(Ordering::Relaxed) && since.elapsed() < Duration::from_secs(30) {
                    let got = client.request(incremental).and_then(|()| client.read_update());
                    match got {
                        Ok(_) => {
                            updates.fetch_add(1, Ordering::Relaxed);
                            incremental = true;
                        }
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut =>
                        {
                            // An idle screen sends nothing new: ask again.
                        }
                        Err(e) => {
                            note(format!("viewer {v}: {e}"));
                            break;
                        }
                    }
                }
            }
        }));
    }

    // 100 API clients, each a request every 1-2 s: the list, one VM, its stats (the whole hour the first time,
    // then what is new, as the window asks: asking for the whole hour every time made the daemon's working
    // memory grow with the history, for the first hour, by design), the host.
    let mut clients = Vec::new();
    for k in 0..100usize {
        let c = d.local();
        let (stop, requests, note, ids) = (stop.clone(), requests.clone(), note.clone(), ids.clone());
        clients.push(tokio::spawn(async move {
            let mut n = k;
            // Each VM's newest sample this client has, so it asks only for newer ones (as the window does).
            let mut seen = std::collections::HashMap::<String, u64>::new();
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[n % ids.len()];
                let result = match n % 4 {
                    0 => c.list_vms().await.map(|_| ()),
                    1 => c.vm(id).await.map(|_| ()),
                    2 => c.stats(id, seen.get(id).copied().unwrap_or(0), false).await.map(|s| {
                        if let Some(last) = s.samples.last() {
                            seen.insert(id.clone(), last.t_ms);
                        }
                    }),
                    _ => c.host().await.map(|_| ()),
                };
                requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = result {
                    note(format!("client {k}: {e}"));
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(1000 + (k as u64 * 10) % 1000)).await;
            }
        }));
    }

    // The window, on a virtual X display, showing this daemon's VMs.
    let x = Xvfb::start(1280, 800);
    let window = porthole_tests::Killed(porthole_tests::start_window(&x, &dir, &d.socket()));

    let processes = || -> Vec<(String, u32)> {
        let mut all = vec![("daemon".to_owned(), d.pid()), ("window".to_owned(), window.0.id())];
        for (i, id) in ids.iter().enumerate() {
            all.push((format!("vm{i:02}"), pid_in(&d.run.join("vms").join(id).join("pid"))));
        }
        all
    };
    // Every reading of every minute: 12 a minute, 5 s apart (the last at the minute mark).
    let mut minutes_read: Vec<Vec<Sample>> = Vec::new();
    let started = Instant::now();
    for minute in 0..=minutes {
        let mut readings: Vec<Sample> = Vec::new();
        for reading in (0..12u64).rev() {
            let due = started + Duration::from_secs(60 * minute).saturating_sub(Duration::from_secs(5 * reading));
            tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
            readings.push(
                processes()
                    .into_iter()
                    .map(|(label, pid)| {
                        let (rss, fds) =
                            footprint(pid).unwrap_or_else(|| panic!("minute {minute}: {label} (pid {pid}) is gone"));
                        (label, rss, fds)
                    })
                    .collect(),
            );
        }
        let sample = mean_of(&readings);
        let total_rss: u64 = sample.iter().map(|s| s.1).sum();
        let get = |label: &str| sample.iter().find(|s| s.0 == label).map(|s| (s.1, s.2)).unwrap_or_default();
        println!(
            "SOAK minute {minute}: daemon {:?} (anon, file {:?}) window {:?} (RSS KiB, fds); all {} KiB; {} requests, \
             {} console updates, {} errors",
            get("daemon"),
            rss_parts(d.pid()),
            get("window"),
            total_rss,
            requests.load(Ordering::Relaxed),
            updates.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed)
        );
        // The animating engines (the busiest consoles): their means this minute, and what vm00 holds now split into
        // anonymous memory and the pages of its binary.
        let engines: Vec<String> = (0..4).map(|i| format!("vm{i:02} {}", get(&format!("vm{i:02}")).0)).collect();
        let vm00 = processes().into_iter().find(|(label, _)| label == "vm00").map(|(_, pid)| rss_parts(pid));
        println!("SOAK minute {minute}: engines {} (RSS KiB); vm00 (anon, file) {vm00:?}", engines.join(", "));
        minutes_read.push(readings);
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    for viewer in viewers {
        let _ = viewer.join();
    }
    let states: Vec<VmState> = {
        let mut s = Vec::new();
        for id in &ids {
            s.push(c.vm(id).await.unwrap().state);
        }
        s
    };
    for id in &ids {
        let _ = c.action(id, Action::Poweroff).await;
    }
    drop(window);

    // What the window said (a warning or a panic would explain a jump in its memory).
    let window_log = std::fs::read_to_string(dir.path("window.log")).unwrap_or_default();
    if !window_log.trim().is_empty() {
        let lines: Vec<&str> = window_log.lines().collect();
        println!(
            "SOAK window log (last lines of {}):\n{}",
            lines.len(),
            lines[lines.len().saturating_sub(60)..].join("\n")
        );
    }
    // Growth after the warm-up, per process: the mean of every reading of the last minutes against the mean
    // of the minutes right after the warm-up (windows of 3 minutes, 36 readings; 5 in runs of 20 minutes or
    // more). A process's working memory moves between readings both ways by more than the 5 % the check
    // allows — a screenshot's frame or a burst of clients lifted the daemon by up to 10 MiB for a reading,
    // an engine serving two viewers of an animating screen read 26.5-38.6 MiB within minutes, one raw
    // frame (4 MiB) more or less in flight or in a viewer's session — so neither one reading nor a minute's
    // floor or median is the level (a 12-minute run failed on floors that dipped at the warm-up minute of
    // an engine that was flat); a leak raises the mean of every window after it.
    let window = if minutes >= 20 { 5 } else { 3 }.min(((minutes - warm_up) / 2).max(1)) as usize;
    let flat = |from: usize, to: usize| -> Sample {
        mean_of(&minutes_read[from..to].iter().flatten().cloned().collect::<Vec<Sample>>())
    };
    let base = &flat(warm_up as usize, warm_up as usize + window);
    let end = &flat(minutes_read.len() - window, minutes_read.len());
    println!(
        "SOAK windows: minutes {warm_up}-{} against {}-{minutes} (means of {} readings each)",
        warm_up as usize + window - 1,
        minutes as usize + 1 - window,
        12 * window
    );
    // The 5 % holds after a warm-up of 5 minutes. A shorter run (CI's 3 minutes) judges its first
    // minutes, while caches still fill and an animating engine's frames in flight swing its mean by a
    // frame (4 MiB of ~35): there memory may grow by a quarter at most, which still catches a leak that
    // matters within minutes (a frame per update, a buffer per request), and descriptors by 5 %.
    let rss_limit = if warm_up >= 5 { 0.05 } else { 0.25 };
    let mut worst = (String::new(), 0.0f64);
    for ((label, rss0, fds0), (_, rss1, fds1)) in base.iter().zip(end) {
        // (A few KiB or descriptors either way is noise, not growth: a floor of 256 KiB and 2 descriptors.)
        let rss_growth = rss1.saturating_sub(*rss0).saturating_sub(256) as f64 / *rss0 as f64;
        let fd_growth = fds1.saturating_sub(*fds0).saturating_sub(2) as f64 / *fds0 as f64;
        for (what, g) in [("RSS", rss_growth), ("fds", fd_growth)] {
            if g > worst.1 {
                worst = (format!("{label} {what}"), g);
            }
        }
        println!("SOAK {label}: RSS {rss0} -> {rss1} KiB, descriptors {fds0} -> {fds1}");
        assert!(
            rss_growth <= rss_limit,
            "{label}: RSS {rss0} -> {rss1} KiB after the warm-up (> {} %)",
            rss_limit * 100.0
        );
        assert!(fd_growth <= 0.05, "{label}: {fds0} -> {fds1} open descriptors after the warm-up (> 5 %)");
    }
    let failed = errors.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "errors during the soak; the first: {:?}", first_error.lock().unwrap());
    assert!(states.iter().all(|s| *s == VmState::Running), "every VM ran throughout: {states:?}");
    assert!(updates.load(Ordering::Relaxed) > 0 && requests.load(Ordering::Relaxed) > 0);
    println!(
        "SOAK PASS: {minutes} min, 16 VMs, 10 viewers ({} updates), 100 clients ({} requests), the window; largest \
         growth after minute {warm_up}: {} {:.1} %; 0 errors",
        updates.load(Ordering::Relaxed),
        requests.load(Ordering::Relaxed),
        worst.0,
        worst.1 * 100.0
    );
}

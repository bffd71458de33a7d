//! portholed benchmarks.
//!
//! - `daemon-api`: `GET /api/v1/vms` with 200 VM definitions under 100 concurrent clients: over HTTPS with
//!   `wrk` (Debian's `wrk`; keep-alive connections, a token), and over the local Unix socket with the
//!   API client. Latency percentiles and requests per second.
//! - `console-proxy`: the `fb-anim` guest's console read as whole frames (Raw), directly on the VM's RFB
//!   socket and through the daemon's WebSocket proxy (api client, Unix socket): frames/s and the latency
//!   a frame takes, as a ratio.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use porthole_api::client::Action;
use porthole_api::{BootSpec, Client, CreateVm};
use porthole_tests::rfb::RfbClient;

pub(crate) struct Daemon {
    dir: PathBuf,
    child: Child,
    pub(crate) socket: PathBuf,
    authority: Option<String>,
}

impl Daemon {
    fn start(listen: bool) -> anyhow::Result<Daemon> {
        Self::start_named(listen, "daemon")
    }

    /// A daemon in a fresh directory of its own (`tag` tells several apart).
    pub(crate) fn start_named(listen: bool, tag: &str) -> anyhow::Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("porthole-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("portholed.log");
        let mut cmd = Command::new(crate::sibling("portholed")?);
        cmd.arg("--data-dir").arg(dir.join("data")).arg("--runtime-dir").arg(dir.join("run"));
        cmd.arg("--vmm").arg(crate::sibling("porthole-vmm")?);
        if listen {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.env("RUST_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log)?);
        let child = cmd.spawn().context("cannot start portholed")?;
        let start = Instant::now();
        let text = || std::fs::read_to_string(&log).unwrap_or_default();
        while !(text().contains("local API on") && (!listen || text().contains("remote API on"))) {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("portholed did not start: {}", text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let authority = listen.then(|| {
            let t = text();
            let line = t.lines().find(|l| l.contains("remote API on")).unwrap_or_default().to_owned();
            line.split("https://").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_default().to_owned()
        });
        Ok(Daemon { socket: dir.join("run/portholed.sock"), dir, child, authority })
    }

    fn token(&self) -> anyhow::Result<String> {
        let out = Command::new(crate::sibling("portholed")?)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--runtime-dir")
            .arg(self.dir.join("run"))
            .args(["token", "create", "--name", "bench", "--role", "admin"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

pub fn api(seconds: u64) -> anyhow::Result<()> {
    let d = Daemon::start(true)?;
    let rt = runtime()?;
    let local = Client::unix(&d.socket)?;
    rt.block_on(async {
        for i in 0..200 {
            local.create_vm(&CreateVm { disk_gib: 0, ..CreateVm::new(format!("bench{i:03}"), 1, 64) }).await?;
        }
        anyhow::Ok(())
    })?;
    println!("daemon-api: GET /api/v1/vms with 200 VMs (~{} KiB of JSON), 100 concurrent clients, {seconds} s", {
        let body = rt.block_on(local.list_vms())?;
        serde_json_len(&body) / 1024
    });
    // HTTPS with wrk.
    let token = d.token()?;
    let url = format!("https://{}/api/v1/vms", d.authority.clone().unwrap_or_default());
    match Command::new("wrk")
        .args([
            "-t2",
            "-c100",
            &format!("-d{seconds}s"),
            "--latency",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &url,
        ])
        .output()
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let pick = |prefix: &str| {
                text.lines()
                    .find(|l| l.trim_start().starts_with(prefix))
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
            };
            let errors = text.lines().find(|l| l.contains("Non-2xx") || l.contains("Socket errors")).unwrap_or("none");
            println!(
                "  HTTPS (wrk, TLS, token)          {:>9} req/s   p50 {:>8}   p99 {:>8}   errors: {errors}",
                pick("Requests/sec:").unwrap_or_default(),
                pick("50%").unwrap_or_default(),
                pick("99%").unwrap_or_default()
            );
        }
        Err(e) => println!("  HTTPS: skipped, wrk is not installed ({e}); apt-get install wrk"),
    }
    // The local socket with the API client.
    let (count, mut latencies, errors) = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let c = local.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut errors = 0u64;
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match c.list_vms().await {
                            Ok(v) if v.len() == 200 => lat.push(t.elapsed()),
                            _ => errors += 1,
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        let (mut all, mut errors) = (Vec::new(), 0);
        for t in tasks {
            let (l, e) = t.await.unwrap_or_default();
            all.extend(l);
            errors += e;
        }
        (all.len(), all, errors)
    });
    latencies.sort();
    println!(
        "  Unix socket (api::Client)        {:>9.0} req/s   p50 {:>6.2}ms   p99 {:>6.2}ms   errors: {errors}",
        count as f64 / seconds as f64,
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!("  (goal: p99 <= 5 ms and >= 5000 req/s; client and daemon share this machine's 2 cores)");
    Ok(())
}

fn serde_json_len(v: &[porthole_api::Vm]) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0)
}

/// Follows the animation for `seconds` (incremental requests, as a viewer does): updates/s, MiB/s and the
/// median time from request to update.
fn follow(client: &mut RfbClient, seconds: f64) -> anyhow::Result<(f64, f64, Duration)> {
    client.set_encodings(&[0])?;
    client.full_frame()?;
    let (start, bytes0) = (Instant::now(), client.bytes_received);
    let mut lat = Vec::new();
    while start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        client.request(true)?;
        if !client.read_update()?.is_empty() {
            lat.push(t.elapsed());
        }
    }
    let t = start.elapsed().as_secs_f64();
    let ups = lat.len() as f64 / t;
    lat.sort();
    Ok((ups, (client.bytes_received - bytes0) as f64 / t / f64::from(1u32 << 20), percentile(&lat, 0.5)))
}

/// Whole frames for `seconds` (non-incremental requests, answered at once): frames/s and per-frame latency.
pub(crate) fn frames(client: &mut RfbClient, seconds: f64) -> anyhow::Result<(f64, Duration, Duration)> {
    client.set_encodings(&[0])?;
    client.full_frame()?;
    let start = Instant::now();
    let mut lat = Vec::new();
    while start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        client.full_frame()?;
        lat.push(t.elapsed());
    }
    let fps = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    Ok((fps, percentile(&lat, 0.5), percentile(&lat, 0.99)))
}

pub fn console_proxy(seconds: f64) -> anyhow::Result<()> {
    let d = Daemon::start(false)?;
    let rt = runtime()?;
    let local = Client::unix(&d.socket)?;
    let kernel = porthole_guests::path("fb-anim").display().to_string();
    let (id, socket) = rt.block_on(async {
        let vm = local
            .create_vm(&CreateVm {
                disk_gib: 0,
                boot: Some(BootSpec { kernel, initrd: None, cmdline: String::new() }),
                ..CreateVm::new("anim", 1, 64)
            })
            .await?;
        local.action(&vm.id, Action::Start).await?;
        let ticket = local.console_ticket(&vm.id).await?;
        anyhow::Ok((vm.id, ticket.rfb_socket.unwrap_or_default()))
    })?;
    // The guest has set its graphics mode and animates.
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !local.serial(&id, 50).await?.lines.iter().any(|l| l.contains("PORTHOLE-FB-ANIM-START")) {
            if Instant::now() > deadline {
                bail!("fb-anim did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    })?;
    let connect_ws = || -> anyhow::Result<RfbClient> {
        // The WebSocket console as a byte stream, bridged to a socket pair for the same (blocking) client.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        theirs.set_nonblocking(true)?;
        let stream = rt.block_on(local.console(&id))?;
        rt.spawn(async move {
            let mut stream = stream;
            if let Ok(mut theirs) = tokio::net::UnixStream::from_std(theirs) {
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut theirs).await;
            }
        });
        RfbClient::over(ours, None).map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let connect_direct = || RfbClient::connect(Path::new(&socket), None).map_err(|e| anyhow::anyhow!("{e:?}"));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut direct = connect_direct()?;
    let (width, height) = (direct.width, direct.height);
    println!(
        "console-proxy: fb-anim ({width}x{height}), {seconds} s per path: direct RFB socket vs portholed's WebSocket (api client)"
    );
    let (d_ups, d_mibs, d_lat) = follow(&mut direct, seconds)?;
    let (d_fps, d_p50, d_p99) = frames(&mut direct, seconds)?;
    drop(direct);
    let mut proxied = connect_ws()?;
    let (w_ups, w_mibs, w_lat) = follow(&mut proxied, seconds)?;
    let (w_fps, w_p50, w_p99) = frames(&mut proxied, seconds)?;
    println!("  following the animation (incremental updates, Raw):");
    println!(
        "    direct                  {d_ups:>7.1} updates/s {d_mibs:>7.1} MiB/s   request->update p50 {:.2} ms",
        ms(d_lat)
    );
    println!(
        "    WebSocket via portholed {w_ups:>7.1} updates/s {w_mibs:>7.1} MiB/s   request->update p50 {:.2} ms   ratio {:.2} (goal >= 0.9), added latency {:.2} ms",
        ms(w_lat),
        w_ups / d_ups,
        ms(w_lat) - ms(d_lat)
    );
    println!(
        "  whole frames on demand ({:.1} MiB each; the proxy's capacity):",
        f64::from(width * height * 4) / f64::from(1u32 << 20)
    );
    println!(
        "    direct                  {d_fps:>7.1} frames/s   p50 {:>7.2} ms   p99 {:>7.2} ms",
        ms(d_p50),
        ms(d_p99)
    );
    println!(
        "    WebSocket via portholed {w_fps:>7.1} frames/s   p50 {:>7.2} ms   p99 {:>7.2} ms   ratio {:.2}; added latency p50 {:.2} ms",
        ms(w_p50),
        ms(w_p99),
        w_fps / d_fps,
        ms(w_p50) - ms(d_p50)
    );
    rt.block_on(local.action(&id, Action::Poweroff))?;
    Ok(())
}

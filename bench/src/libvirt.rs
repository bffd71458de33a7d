//! `libvirt`: a libvirt host with 200 domains (a few of them running micro-guests under QEMU's TCG) on a
//! private `libvirtd` (the test harness's: session mode as its own user, and an sshd on 127.0.0.1).
//!
//! - The window's refresh as `Backend::add_host` does it (every `REFRESH_EVERY`, 3 s, for libvirt hosts): `host()` and `list_vms()` at once,
//!   then `stats(id, since)` for each running VM; its time (median) and libvirt calls
//!   ([`LibvirtHost::calls`]): those made during the refresh, and all made over the run divided by the
//!   refreshes (the host's sampler thread included). Over the local socket (definition cache on, and off
//!   for comparison: every domain's XML re-read, as without events), over `qemu+ssh://`, and locally
//!   through the window's helper process (`porthole-libvirt`, the window's way: time only, its calls are
//!   the helper's).
//! - virt-manager 4.1's periodic tick against the same daemon, replayed from Python with python3-libvirt
//!   (`bench/virt_manager_tick.py` says what it replays and why): its time and calls per tick. Ratios
//!   window / virt-manager, per refresh (goal <= 1.0).
//! - The console of a running domain (the kbd-echo guest's text screen): whole frames (Raw, non-incremental
//!   requests) read for a few seconds through `Host::open_console` on the local URI (libvirt hands over
//!   QEMU's VNC socket: virDomainOpenGraphicsFD) and on the `qemu+ssh://` URI (an `ssh -W` tunnel to the
//!   VNC port): frames/s, ratio SSH / direct (goal >= 0.9).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use porthole_api::host_process::HostProcess;
use porthole_api::{Host, VmState};
use porthole_libvirt::LibvirtHost;
use porthole_tests::libvirt::Libvirt;
use porthole_tests::rfb::RfbClient;

use crate::daemon::{frames, runtime};
use crate::{median, ms};

/// virt-manager's tick, replayed (see the file).
const VIRT_MANAGER_TICK: &str = include_str!("../virt_manager_tick.py");

/// Refreshes not counted: the first reads every definition, the next may still look a running VM up
/// before the sampler's first reading.
const WARM_UP: usize = 2;

/// The window's poll period (app/src/backend.rs).
/// The window's refresh period of a libvirt host (virt-manager's default tick is the same 3 s).
const PERIOD: Duration = porthole_libvirt::REFRESH_EVERY;

struct Refreshes {
    median: Duration,
    /// Calls made inside the refreshes, per refresh (mean).
    calls_in: f64,
    /// Every call over the run (sampler included) per refresh.
    calls_all: f64,
    first: Duration,
    first_calls: u64,
}

/// `n` refreshes of `host` one `PERIOD` apart, as the window makes them; `counter` counts the libvirt calls
/// (none for a host in the helper process, whose calls are counted in that process).
async fn refreshes(host: &dyn Host, counter: Option<&LibvirtHost>, n: usize) -> anyhow::Result<Refreshes> {
    let calls = || counter.map_or(0, LibvirtHost::calls);
    let mut seen: std::collections::HashMap<String, u64> = Default::default();
    let mut times = Vec::new();
    let (mut calls_in, mut first, mut first_calls) = (0, Duration::ZERO, 0);
    let mut run_start = calls();
    for i in 0..n + WARM_UP {
        let (start, before) = (Instant::now(), calls());
        let (info, vms) = tokio::join!(host.host(), host.list_vms());
        let (info, vms) = (info?, vms?);
        if info.vms as usize != vms.len() {
            bail!("host() counts {} VMs, list_vms() lists {}", info.vms, vms.len());
        }
        for vm in vms.iter().filter(|v| matches!(v.state, VmState::Running | VmState::Paused)) {
            let since = seen.get(&vm.id).copied().unwrap_or(0);
            if let Some(last) = host.stats(&vm.id, since, false).await?.samples.last() {
                seen.insert(vm.id.clone(), last.t_ms);
            }
        }
        let took = start.elapsed();
        if i == 0 {
            // The first refresh of a connection reads every definition.
            (first, first_calls) = (took, calls() - before);
        }
        if i < WARM_UP {
            run_start = calls();
        } else {
            times.push(took);
            calls_in += calls() - before;
        }
        tokio::time::sleep(PERIOD.saturating_sub(start.elapsed())).await;
    }
    Ok(Refreshes {
        median: median(times),
        calls_in: calls_in as f64 / n as f64,
        calls_all: (calls() - run_start) as f64 / n as f64,
        first,
        first_calls,
    })
}

struct Tick {
    median_ms: f64,
    calls: f64,
}

/// virt-manager's tick replayed `n` times, one `PERIOD` apart, on `uri`.
fn virt_manager(lv: &Libvirt, uri: &str, n: usize) -> anyhow::Result<Tick> {
    let script = lv.dir.path("virt_manager_tick.py");
    std::fs::write(&script, VIRT_MANAGER_TICK)?;
    // Debian's python3-libvirt is for the system's interpreter (not a pyenv or venv one first on PATH).
    let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let out = Command::new(python)
        .arg(&script)
        .args([uri, &n.to_string(), &PERIOD.as_secs_f64().to_string()])
        .output()
        .context("python3 (Debian: python3, python3-libvirt)")?;
    if !out.status.success() {
        bail!("virt-manager's tick replay failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("the replay's JSON")?;
    Ok(Tick {
        median_ms: v["median_ms"].as_f64().context("median_ms")?,
        calls: v["calls_per_tick"].as_f64().context("calls_per_tick")?,
    })
}

/// Defines `count` stopped domains booting the idle micro-guest (one `virsh` per 50).
fn define_domains(lv: &Libvirt, count: usize) -> anyhow::Result<()> {
    let kernel = lv.guest_kernel("idle");
    let mut batch = Vec::new();
    for i in 0..count {
        let xml = format!(
            "<domain type='qemu'><name>d{i:03}</name><memory unit='MiB'>16</memory><vcpu>1</vcpu><os><type \
             arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel></os><devices><graphics type='vnc' \
             autoport='yes' listen='127.0.0.1'/></devices></domain>",
            kernel.display()
        );
        let file = lv.dir.path(&format!("d{i:03}.xml"));
        std::fs::write(&file, xml)?;
        batch.push(format!("define {}", file.display()));
        if batch.len() == 50 || i + 1 == count {
            let out = lv.virsh(&[&batch.join(" ; ")]);
            if !out.status.success() {
                bail!("virsh define: {}", String::from_utf8_lossy(&out.stderr));
            }
            batch.clear();
        }
    }
    Ok(())
}

fn print_refreshes(label: &str, r: &Refreshes) {
    println!(
        "  {label:<30} median {:7.2} ms   calls/refresh {:6.1} (in the refresh {:5.1})   first refresh {:8.2} ms, {} calls",
        ms(r.median),
        r.calls_all,
        r.calls_in,
        ms(r.first),
        r.first_calls
    );
}

pub fn run(domains: usize, running: usize, refresh_count: usize, seconds: f64) -> anyhow::Result<()> {
    if domains < running + 1 || running == 0 {
        bail!("need at least one running domain besides the console's, and more domains than running ones");
    }
    let lv = match Libvirt::start() {
        Ok(lv) => lv,
        Err(why) => {
            // As the libvirt tests do: say why, and let `all` go on.
            println!("libvirt: skipped (a private libvirtd cannot run here: {why})");
            return Ok(());
        }
    };
    define_domains(&lv, domains - 1)?;
    lv.define_guest("console", "kbd-echo");
    for name in (0..running - 1).map(|i| format!("d{i:03}")).chain(["console".to_string()]) {
        let out = lv.virsh(&["start", &name]);
        if !out.status.success() {
            bail!("virsh start {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let local = lv.local_uri();
    let local_uri_for_helper = local.clone();
    let ssh = lv.ssh_uri(&lv.client_key, Some(&lv.ssh_wrapper));
    println!(
        "libvirt: {domains} domains ({running} running, QEMU TCG) on a private libvirtd; the window's refresh \
         (host() + list_vms() + stats of running VMs) every {} s, {refresh_count} refreshes",
        PERIOD.as_secs()
    );
    let rt = runtime()?;
    let (cached, uncached, over_ssh, helper, console_id) = rt.block_on(async {
        let host = LibvirtHost::connect_async(&local).await?;
        if !host.events_live() {
            bail!("the local connection has no domain events");
        }
        let cached = refreshes(&host, Some(&host), refresh_count).await?;
        host.set_definition_cache(false);
        let uncached = refreshes(&host, Some(&host), refresh_count.min(5)).await?;
        host.set_definition_cache(true);
        let id = host.vm("console").await?.id;
        let remote = LibvirtHost::connect_async(&ssh).await?;
        let over_ssh = refreshes(&remote, Some(&remote), refresh_count).await?;
        // The window's way: the same host in its helper process (porthole-libvirt).
        let program = std::env::current_exe()?.with_file_name("porthole-libvirt");
        let process = tokio::task::spawn_blocking(move || HostProcess::start(&program, &[local_uri_for_helper]))
            .await?
            .map_err(|e| anyhow::anyhow!(e))?;
        let helper = refreshes(&process, None, refresh_count).await?;
        anyhow::Ok((cached, uncached, over_ssh, helper, id))
    })?;
    print_refreshes("local, definitions cached", &cached);
    print_refreshes("local, every XML re-read", &uncached);
    print_refreshes("qemu+ssh, definitions cached", &over_ssh);
    println!(
        "  {:<30} median {:7.2} ms   (calls: as the local row, made in the helper)   first refresh {:8.2} ms; \
         cost of the process hop {:.2} ms a refresh",
        "local, through porthole-libvirt",
        ms(helper.median),
        ms(helper.first),
        ms(helper.median) - ms(cached.median)
    );
    match virt_manager(&lv, &local, refresh_count) {
        Ok(vm) => {
            let vm_ssh = virt_manager(&lv, &ssh, refresh_count)?;
            println!(
                "  {:<30} median {:7.2} ms   calls/tick    {:6.1}",
                "virt-manager 4.1 tick, local", vm.median_ms, vm.calls
            );
            println!(
                "  {:<30} median {:7.2} ms   calls/tick    {:6.1}",
                "virt-manager 4.1 tick, ssh", vm_ssh.median_ms, vm_ssh.calls
            );
            println!(
                "  ratio window/virt-manager, local: time {:.2}, calls {:.2} (goal <= 1.0); over ssh: time {:.2}, \
                 calls {:.2}",
                ms(cached.median) / vm.median_ms,
                cached.calls_all / vm.calls,
                ms(over_ssh.median) / vm_ssh.median_ms,
                over_ssh.calls_all / vm_ssh.calls
            );
            println!(
                "  per second: the window (a refresh every {} s) {:.2} calls, virt-manager (its default tick of 3 s) \
                 {:.2}: {:.2}x",
                PERIOD.as_secs(),
                cached.calls_all / PERIOD.as_secs_f64(),
                vm.calls / 3.0,
                cached.calls_all / PERIOD.as_secs_f64() * 3.0 / vm.calls
            );
        }
        Err(e) => println!("  virt-manager's tick not replayed: {e:#}"),
    }

    // The console, direct and through the SSH tunnel.
    let fps = rt.block_on(async {
        let direct = LibvirtHost::connect_async(&local).await?;
        let remote = LibvirtHost::connect_async(&ssh).await?;
        let mut out = Vec::new();
        for host in [&direct, &remote] {
            let stream = host.open_console(&console_id).await?;
            let r = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, Duration, u32, u32)> {
                let mut c = RfbClient::over(stream, None).map_err(|e| anyhow::anyhow!("RFB handshake: {e:?}"))?;
                let (w, h) = (c.width, c.height);
                let (fps, p50, _) = frames(&mut c, seconds)?;
                Ok((fps, p50, w, h))
            })
            .await??;
            out.push(r);
        }
        anyhow::Ok(out)
    })?;
    let (w, h) = (fps[0].2, fps[0].3);
    println!("console: whole {w}x{h} frames (Raw, non-incremental requests) for {seconds} s");
    println!("  {:<30} {:7.1} frames/s   request->frame p50 {:.2} ms", "direct (graphics FD)", fps[0].0, ms(fps[0].1));
    println!(
        "  {:<30} {:7.1} frames/s   request->frame p50 {:.2} ms   ratio {:.2} (goal >= 0.9)",
        "qemu+ssh (ssh -W tunnel)",
        fps[1].0,
        ms(fps[1].1),
        fps[1].0 / fps[0].0
    );
    Ok(())
}

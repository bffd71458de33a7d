//! libvirt hosts through the host interface (`Arc<dyn Host>`, as the window holds them), against a private
//! libvirtd (session mode, its own user and directories) and sshd (tests/src/libvirt.rs): domains defined
//! behind Porthole's back and made by Porthole, the console (the keyboard-echo micro-guest's screen and
//! serial), uploads into the storage pool, the CD/DVD, libvirt's snapshots, shutdown with a time-out, suspend,
//! deletion, SSH (libssh and the ssh binary; console through the SSH tunnel), refused host keys and keys, and
//! a daemon killed mid-session, `qemu+tls://` with certificates made per run (accepted and refused ones).
//! Domains run QEMU's TCG. Without root or the packages each test says why and skips.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use porthole_api::host_process::HostProcess;
use porthole_api::{Action, CreateVm, DiskFormat, HostHandle, HostKind, ImageFormat, TakeSnapshot, TaskState, VmState};
use porthole_libvirt::{HostKeyCheck, LibvirtHost, check_host_key, ssh_host_key_fingerprint, trust_host_key};
use porthole_tests::libvirt::Libvirt;
use porthole_tests::rfb::{self, RfbClient};
use porthole_tests::{text, wait_until, workspace_bin};

const LIMIT: Duration = Duration::from_secs(90);

async fn connect(uri: &str) -> HostHandle {
    Arc::new(LibvirtHost::connect_async(uri).await.unwrap_or_else(|e| panic!("connect {uri}: {e}")))
}

/// The host as the window has it: libvirt in its helper process (`porthole-libvirt`).
fn through_helper(uri: &str) -> HostProcess {
    HostProcess::start(&workspace_bin("porthole-libvirt"), &[uri.to_string()])
        .unwrap_or_else(|e| panic!("helper for {uri}: {e}"))
}

async fn connect_err(uri: &str) -> String {
    match tokio::time::timeout(LIMIT, LibvirtHost::connect_async(uri)).await.expect("connecting hung") {
        Ok(_) => panic!("{uri} connected"),
        Err(e) => e.to_string(),
    }
}

fn serial_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn wait_serial(path: &Path, marker: &str) {
    wait_until(LIMIT, || serial_text(path).contains(marker), || format!("no {marker:?} in: {}", serial_text(path)));
}

/// Polls an async condition every 200 ms for at most [`LIMIT`].
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < LIMIT, "gave up after {LIMIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A VM of 1 vCPU and 64 MiB booting micro-guest `guest` (copied where the daemon's user reads it), the
/// wizard's defaults otherwise.
fn booting(lv: &Libvirt, name: &str, guest: &str) -> CreateVm {
    let kernel = lv.guest_kernel(guest).display().to_string();
    CreateVm {
        boot: Some(porthole_api::BootSpec { kernel, initrd: None, cmdline: String::new() }),
        ..CreateVm::new(name, 1, 64)
    }
}

/// Distinct colours in the top-left `w`×`h` pixels. (The first text row's glyphs sit in its scan lines 0-12;
/// the blinking cursor in lines 13-14.)
fn colours(c: &RfbClient, w: u32, h: u32) -> usize {
    let mut seen = Vec::new();
    for y in 0..h.min(c.height) {
        for x in 0..w.min(c.width) {
            let p = c.pixel(x, y);
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
    }
    seen.len()
}

/// Opens the console of the running kbd-echo domain `id`, checks its text screen is blank at the top left,
/// types `a`, and waits for the guest's echo on its serial port and on the screen (`1e 9e` in the first
/// cells).
async fn console_echoes_keys(host: &HostHandle, id: &str, serial: &Path) {
    let stream = host.open_console(id).await.unwrap();
    let serial = serial.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut c = RfbClient::over(stream, None).expect("RFB handshake with the domain's VNC server");
        assert!(c.width >= 640 && c.height >= 400, "{}x{}", c.width, c.height);
        c.set_encodings(&[rfb::RAW, rfb::DESKTOP_SIZE]).unwrap();
        c.full_frame().unwrap();
        assert_eq!(colours(&c, 54, 12), 1, "the guest's first text row should be blank before typing");
        c.key(u32::from(b'a'), true).unwrap();
        c.key(u32::from(b'a'), false).unwrap();
        wait_serial(&serial, "PORTHOLE-KEY 9e");
        assert!(serial_text(&serial).contains("PORTHOLE-KEY 1e"), "{}", serial_text(&serial));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = std::time::Instant::now();
        while colours(&c, 54, 12) < 2 {
            assert!(start.elapsed() < LIMIT, "the echo never reached the screen");
            c.request(true).unwrap();
            let _ = c.read_update();
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_defined_behind_our_back_run_show_their_screen_take_keys_and_report_samples() {
    let Some(lv) = Libvirt::start_or_skip("libvirt domains") else { return };
    let libvirt = LibvirtHost::connect_async(&lv.local_uri()).await.unwrap();
    let mut changes = libvirt.changes();
    let host: HostHandle = Arc::new(libvirt);
    assert_eq!(host.kind(), HostKind::Libvirt);
    let info = host.host().await.unwrap();
    assert!(info.cpus > 0 && info.memory_mib > 0, "{info:?}");
    assert!(info.version.starts_with("libvirt ") && info.version.contains("QEMU"), "{}", info.version);
    assert_eq!(Path::new(&info.data_dir), lv.images);
    assert!(host.list_vms().await.unwrap().is_empty());

    changes.borrow_and_update();
    let serial = lv.define_guest("echo", "kbd-echo");
    // libvirt's event for the definition reaches the host: the window refreshes on it.
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event for a domain defined").unwrap();
    let vms = host.list_vms().await.unwrap();
    assert_eq!(vms.len(), 1, "{vms:?}");
    let vm = &vms[0];
    assert_eq!((vm.name.as_str(), vm.state, vm.vcpus, vm.memory_mib), ("echo", VmState::Stopped, 1, 64));
    assert!(vm.boot.as_ref().is_some_and(|b| b.kernel.ends_with("kbd-echo.elf")), "{:?}", vm.boot);
    let id = vm.id.clone();
    assert_eq!(id.len(), 36, "the id is the domain's UUID: {id}");
    assert_eq!(host.vm("echo").await.unwrap().id, id, "a name finds the domain too");

    assert_eq!(host.action(&id, Action::Start).await.unwrap().state, VmState::Running);
    wait_serial(&serial, "PORTHOLE-KBD-READY");
    console_echoes_keys(&host, &id, &serial).await;

    let png = host.screenshot(&id, 360).await.unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!(frame.width, 360);

    let samples = eventually("two samples of the running domain", async || {
        let s = host.stats(&id, 0, false).await.unwrap();
        (s.samples.len() >= 2).then_some(s)
    })
    .await;
    assert_eq!(samples.interval_s, porthole_libvirt::REFRESH_EVERY.as_secs());
    assert!(samples.samples.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
    assert!(samples.samples.iter().all(|s| s.memory_bytes > 0 && s.cpu_percent >= 0.0), "{:?}", samples.samples);
    let last = samples.samples.last().unwrap().t_ms;
    assert!(host.stats(&id, last, false).await.unwrap().samples.iter().all(|s| s.t_ms > last));

    assert_eq!(host.action(&id, Action::Pause).await.unwrap().state, VmState::Paused);
    assert_eq!(host.action(&id, Action::Resume).await.unwrap().state, VmState::Running);

    // Destroyed behind Porthole's back: an event says something changed, and the next read says what.
    changes.borrow_and_update();
    let out = lv.virsh(&["destroy", "echo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event for a domain destroyed").unwrap();
    assert_eq!(host.vm(&id).await.unwrap().state, VmState::Stopped);
    let e = host.open_console(&id).await.unwrap_err().to_string();
    assert!(e.contains("not running"), "{e}");
}

/// Through the helper process, as the window does: uploads with progress, tasks and snapshots cross it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_made_by_porthole_take_uploaded_isos_snapshots_shutdowns_and_go_away_with_their_disks() {
    let Some(lv) = Libvirt::start_or_skip("libvirt create") else { return };
    made_vm_scenario(&lv, &(Arc::new(through_helper(&lv.local_uri())) as HostHandle)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_qemu_ssh_vms_are_made_fed_isos_snapshotted_shut_down_and_deleted_the_same_way() {
    let Some(lv) = Libvirt::start_or_skip("libvirt create over SSH") else { return };
    made_vm_scenario(&lv, &connect(&lv.ssh_uri(&lv.client_key, Some(&lv.ssh_wrapper))).await).await;
}

/// Create, upload, media, snapshots, suspend, shutdown with its time-out, delete: through `host`, checked
/// with virsh on the daemon's socket.
async fn made_vm_scenario(lv: &Libvirt, host: &HostHandle) {
    let mut spec = CreateVm::new("made", 1, 64);
    spec.disk_gib = 1;
    spec.tags = vec!["libvirt".into()];
    let vm = host.create_vm(&spec).await.unwrap();
    assert_eq!((vm.state, vm.disk_bytes, vm.disk_format), (VmState::Stopped, 1 << 30, Some(DiskFormat::Qcow2)));
    assert_eq!(vm.media, None);
    assert_eq!(vm.tags, ["libvirt"]);
    assert!(vm.drives.iter().any(|d| d.id == "cdrom0"), "{:?}", vm.drives);
    let id = vm.id.clone();
    let xml = text(&lv.virsh(&["dumpxml", "made"]).stdout);
    assert!(xml.contains("<graphics type='vnc'") && xml.contains("listen='127.0.0.1'"), "{xml}");
    assert!(xml.contains("<interface type='user'>"), "a session host gets user networking: {xml}");
    assert!(host.create_vm(&spec).await.unwrap_err().to_string().contains("exists already"));

    // An upload into the pool, byte for byte, with progress.
    let iso = lv.dir.path("tiny.iso");
    let data: Vec<u8> = (0..(3 << 20) + 123).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::File::create(&iso).unwrap().write_all(&data).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let image = host
        .upload_image("tiny.iso", &iso, Box::new(move |done, total| seen2.lock().unwrap().push((done, total))))
        .await
        .unwrap();
    let len = data.len() as u64;
    // libvirt rounds a volume's capacity up to whole KiB.
    assert_eq!(
        (image.name.as_str(), image.size_bytes, image.format),
        ("tiny.iso", len.div_ceil(1024) * 1024, ImageFormat::Iso)
    );
    {
        use sha2::Digest;
        assert_eq!(image.sha256, hex::encode(sha2::Sha256::digest(&data)));
    }
    let progress = seen.lock().unwrap().clone();
    assert!(progress.len() >= 3 && progress.last() == Some(&(len, len)), "{progress:?}");
    let images = host.images().await.unwrap();
    assert_eq!(images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["tiny.iso"], "VM disks are not images");
    let back = lv.dir.path("back.iso");
    let out = lv.virsh(&["vol-download", "--pool", "default", "tiny.iso", &back.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = std::fs::read(&back).unwrap();
    assert!(back.len() as u64 == image.size_bytes && back[..data.len()] == data[..], "other bytes than uploaded");
    assert!(back[data.len()..].iter().all(|&b| b == 0));
    assert!(host.upload_image("tiny.iso", &iso, Box::new(|_, _| {})).await.is_err(), "names are unique");

    // The CD/DVD: in the config while stopped, live while running, in both.
    assert_eq!(host.change_media(&id, Some("tiny.iso")).await.unwrap().media.as_deref(), Some("tiny.iso"));
    let e = host.delete_image("tiny.iso").await.unwrap_err().to_string();
    assert!(e.contains("made"), "an image in a drive stays: {e}");
    assert!(host.change_media(&id, Some("nope.iso")).await.is_err());
    assert_eq!(host.action(&id, Action::Start).await.unwrap().state, VmState::Running);
    assert_eq!(host.change_media(&id, None).await.unwrap().media, None);
    assert!(!text(&lv.virsh(&["dumpxml", "--inactive", "made"]).stdout).contains("tiny.iso"));
    assert_eq!(host.change_media(&id, Some("tiny.iso")).await.unwrap().media.as_deref(), Some("tiny.iso"));

    // libvirt's own snapshots: taken running (with its state), reverted after a change.
    let take = TakeSnapshot { name: "s1".into(), description: "with the ISO".into(), with_state: None };
    let task = host.take_snapshot(&id, &take).await.unwrap();
    assert_eq!((task.state, task.result.as_deref()), (TaskState::Done, Some("s1")));
    assert_eq!(host.task(&task.id).await.unwrap(), task);
    let tree = host.snapshots(&id).await.unwrap();
    assert_eq!(tree.snapshots.len(), 1);
    let s = &tree.snapshots[0];
    assert!(s.name == "s1" && s.with_state && s.description == "with the ISO" && s.created_ms > 0, "{s:?}");
    assert_eq!(tree.current.as_deref(), Some("s1"));
    assert_eq!(host.change_media(&id, None).await.unwrap().media, None);
    let e = host.revert_snapshot(&id, "s1", false).await.unwrap_err().to_string();
    assert!(e.contains("confirm"), "{e}");
    assert_eq!(host.revert_snapshot(&id, "s1", true).await.unwrap().state, TaskState::Done);
    let vm = host.vm(&id).await.unwrap();
    assert_eq!((vm.state, vm.media.as_deref()), (VmState::Running, Some("tiny.iso")), "reverted");
    assert_eq!(host.delete_snapshot(&id, "s1").await.unwrap().state, TaskState::Done);
    assert!(host.snapshots(&id).await.unwrap().snapshots.is_empty());

    // Suspend to disk (managed save) and back.
    assert_eq!(host.action(&id, Action::Suspend).await.unwrap().state, VmState::Suspended);
    assert_eq!(host.action(&id, Action::Start).await.unwrap().state, VmState::Running);

    // Firmware with nothing to boot ignores ACPI: the shutdown task forces it off after its time-out.
    let task = host.shutdown(&id, 2).await.unwrap();
    assert!(task.state == TaskState::Running && task.cancellable, "{task:?}");
    let done = eventually("the shutdown task to end", async || {
        let t = host.task(&task.id).await.unwrap();
        (t.state != TaskState::Running).then_some(t)
    })
    .await;
    assert_eq!(done.state, TaskState::Done, "{done:?}");
    assert!(done.result.as_deref().is_some_and(|r| r.contains("forced off")), "{done:?}");
    assert_eq!(host.vm(&id).await.unwrap().state, VmState::Stopped);
    assert!(host.tasks().await.unwrap().iter().any(|t| t.id == task.id));

    host.delete_vm(&id).await.unwrap();
    assert!(host.list_vms().await.unwrap().is_empty());
    let vols = text(&lv.virsh(&["vol-list", "default"]).stdout);
    assert!(!vols.contains("made-disk0") && vols.contains("tiny.iso"), "{vols}");
    host.delete_image("tiny.iso").await.unwrap();
    assert!(host.images().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_ssh_host_keys_and_keys_are_checked_and_the_console_tunnels() {
    let Some(lv) = Libvirt::start_or_skip("libvirt over SSH") else { return };

    // What the user is shown before trusting the host: the fingerprint ssh-keygen gives for its key.
    let fp = text(&std::process::Command::new("ssh-keygen").arg("-lf").arg(&lv.host_key_pub).output().unwrap().stdout);
    let fp = fp.split_whitespace().nth(1).unwrap().to_string();
    let keys = ssh_host_key_fingerprint("127.0.0.1", lv.ssh_port).unwrap();
    assert!(keys.iter().any(|k| k.fingerprint == fp && k.key_type == "ssh-ed25519"), "{keys:?} vs {fp}");

    // What the window checks before connecting: unknown, trusted, or changed (another key on record).
    match check_host_key("127.0.0.1", lv.ssh_port, &lv.no_known_hosts).unwrap() {
        HostKeyCheck::Unknown(k) => assert!(k.iter().any(|k| k.fingerprint == fp), "{k:?}"),
        other => panic!("an empty known_hosts: {other:?}"),
    }
    assert_eq!(check_host_key("127.0.0.1", lv.ssh_port, &lv.known_hosts).unwrap(), HostKeyCheck::Trusted);
    let impostor = lv.dir.path("ssh/impostor");
    let other_key = std::fs::read_to_string(lv.wrong_key.with_extension("pub")).unwrap();
    let mut fields = other_key.split_whitespace();
    let (kind, blob) = (fields.next().unwrap(), fields.next().unwrap());
    std::fs::write(&impostor, format!("[127.0.0.1]:{} {kind} {blob}\n", lv.ssh_port)).unwrap();
    assert!(matches!(check_host_key("127.0.0.1", lv.ssh_port, &impostor).unwrap(), HostKeyCheck::Changed(_)));

    // An unknown host key, a wrong key: refused, with what was tried and why.
    let e = connect_err(&lv.libssh_uri(&lv.client_key, &lv.no_known_hosts)).await;
    assert!(e.contains("cannot connect to qemu+libssh://") && e.to_lowercase().contains("host key"), "{e}");
    let e = connect_err(&lv.libssh_uri(&lv.wrong_key, &lv.known_hosts)).await;
    assert!(e.contains("cannot connect to") && e.contains("authenticate"), "{e}");
    let e = connect_err(&lv.ssh_uri(&lv.wrong_key, Some(&lv.ssh_wrapper))).await;
    assert!(e.contains("cannot connect to qemu+ssh://") && e.contains("Permission denied"), "{e}");
    let e = connect_err(&lv.ssh_uri(&lv.client_key, Some(Path::new("/bin/false")))).await;
    assert!(e.contains("cannot connect to qemu+ssh://"), "{e}");

    // The user accepts the key shown: recorded, then the connection goes through.
    let accepted = lv.dir.path("ssh/accepted");
    trust_host_key(&accepted, &keys[0]).unwrap();
    let remote = connect(&lv.libssh_uri(&lv.client_key, &accepted)).await;
    let serial = lv.define_guest("far", "kbd-echo");
    let vms = remote.list_vms().await.unwrap();
    assert_eq!(vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["far"]);
    let id = vms[0].id.clone();
    assert_eq!(remote.action(&id, Action::Start).await.unwrap().state, VmState::Running);
    wait_serial(&serial, "PORTHOLE-KBD-READY");
    // No file descriptor passing over SSH: the console comes through an `ssh -W` tunnel.
    console_echoes_keys(&remote, &id, &serial).await;

    // libvirt's ssh transport (the ssh binary; its known_hosts through the wrapper): same host, same console.
    let plain = connect(&lv.ssh_uri(&lv.client_key, Some(&lv.ssh_wrapper))).await;
    assert_eq!(plain.vm(&id).await.unwrap().state, VmState::Running);
    let stream = plain.open_console(&id).await.unwrap();
    let c = tokio::task::spawn_blocking(move || RfbClient::over(stream, None)).await.unwrap().unwrap();
    assert!(c.width >= 640, "{}", c.width);

    // An upload over SSH lands in the same pool.
    let small = lv.dir.path("small.img");
    std::fs::write(&small, vec![7u8; 70_000]).unwrap();
    let image = remote.upload_image("small.img", &small, Box::new(|_, _| {})).await.unwrap();
    assert_eq!((image.size_bytes, image.format), (70_000, ImageFormat::Raw));
    let local = connect(&lv.local_uri()).await;
    assert!(local.images().await.unwrap().iter().any(|i| i.name == "small.img"));
    assert_eq!(remote.action(&id, Action::Poweroff).await.unwrap().state, VmState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_gives_errors_without_hanging_and_the_host_reconnects_when_it_is_back() {
    let Some(mut lv) = Libvirt::start_or_skip("libvirt daemon killed") else { return };
    let host = connect(&lv.local_uri()).await;
    lv.define_guest("k", "kbd-echo");
    let id = host.list_vms().await.unwrap()[0].id.clone();
    lv.kill_daemon();
    for attempt in 0..2 {
        let r = tokio::time::timeout(LIMIT, host.list_vms()).await.expect("list_vms hung on a dead daemon");
        let e = r.expect_err("a dead daemon listed VMs").to_string();
        assert!(e.contains("cannot connect to qemu:///session") || e.contains("listing"), "attempt {attempt}: {e}");
        let r = tokio::time::timeout(LIMIT, host.vm(&id)).await.expect("vm hung on a dead daemon");
        assert!(r.is_err());
    }
    lv.start_daemon().unwrap();
    let vms = tokio::time::timeout(LIMIT, host.list_vms()).await.expect("list_vms hung").unwrap();
    assert_eq!(vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), [id.as_str()], "reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_stops_answering_is_dropped_by_keepalive_and_reopened_when_it_answers_again() {
    let Some(lv) = Libvirt::start_or_skip("libvirt daemon frozen") else { return };
    let host = connect(&lv.local_uri()).await;
    assert!(host.list_vms().await.unwrap().is_empty());
    lv.signal_daemon(libc::SIGSTOP);
    let r = tokio::time::timeout(LIMIT, host.list_vms()).await.expect("list_vms hung on a frozen daemon");
    lv.signal_daemon(libc::SIGCONT);
    let e = r.expect_err("a frozen daemon listed VMs").to_string();
    assert!(e.contains("keepalive"), "libvirt's keepalive should have closed the connection: {e}");
    let vms = tokio::time::timeout(LIMIT, host.list_vms()).await.expect("list_vms hung").unwrap();
    assert!(vms.is_empty(), "{vms:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_are_read_once_and_again_when_an_event_says_they_changed() {
    let Some(lv) = Libvirt::start_or_skip("libvirt definition cache") else { return };
    let libvirt = LibvirtHost::connect_async(&lv.local_uri()).await.unwrap();
    assert!(libvirt.events_live(), "a local connection delivers domain events");
    let mut changes = libvirt.changes();
    let host: HostHandle = Arc::new(libvirt.clone());
    for i in 0..20 {
        lv.define_guest(&format!("c{i:02}"), "kbd-echo");
    }
    assert_eq!(host.list_vms().await.unwrap().len(), 20);
    // Warm, once the definitions' events are in: a list reads the states in one call and no XML again, and
    // the sampler asks nothing while no domain runs.
    eventually("a list that makes one libvirt call", async || {
        let before = libvirt.calls();
        host.list_vms().await.unwrap();
        (libvirt.calls() == before + 1).then_some(())
    })
    .await;
    let before = libvirt.calls();
    let vms = host.list_vms().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let calls = libvirt.calls() - before;
    assert_eq!(calls, 1, "a warm list of 20 domains and 2.5 s of an idle host made {calls} libvirt calls");
    // The library's "used by" comes from the same cache: no domain's XML is read for it.
    let before = libvirt.calls();
    host.images().await.unwrap();
    let calls = libvirt.calls() - before;
    assert!(calls < 20, "listing the library beside 20 domains made {calls} libvirt calls");
    let id = vms.iter().find(|v| v.name == "c07").unwrap().id.clone();
    // Without the cache every definition is read again.
    libvirt.set_definition_cache(false);
    let before = libvirt.calls();
    host.list_vms().await.unwrap();
    assert!(libvirt.calls() - before >= 20, "uncached: {} calls", libvirt.calls() - before);
    libvirt.set_definition_cache(true);

    // Changed behind Porthole's back: the metadata (METADATA_CHANGE), the definition (lifecycle DEFINED).
    changes.borrow_and_update();
    let out = lv.virsh(&["desc", "c07", "--config", "--new-desc", "changed words"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event for a metadata change").unwrap();
    let vm = host.list_vms().await.unwrap().into_iter().find(|v| v.id == id).unwrap();
    assert_eq!(vm.description, "changed words");
    changes.borrow_and_update();
    let xml =
        text(&lv.virsh(&["dumpxml", "--inactive", "c07"]).stdout).replace("'static'>1</vcpu>", "'static'>2</vcpu>");
    assert!(xml.contains(">2</vcpu>"), "{xml}");
    let file = lv.dir.path("c07.xml");
    std::fs::write(&file, xml).unwrap();
    let out = lv.virsh(&["define", &file.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event for a redefinition").unwrap();
    let vm = host.list_vms().await.unwrap().into_iter().find(|v| v.id == id).unwrap();
    assert_eq!(vm.vcpus, 2);

    // State changes behind Porthole's back show with their event (the window refreshes on it); started,
    // the domain's live definition is read, and the sampler samples it.
    changes.borrow_and_update();
    assert!(lv.virsh(&["start", "c03"]).status.success());
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event for a start").unwrap();
    let vms = host.list_vms().await.unwrap();
    assert_eq!(vms.iter().find(|v| v.name == "c03").unwrap().state, VmState::Running);
    let c03 = vms.iter().find(|v| v.name == "c03").unwrap().id.clone();
    eventually("samples of the started domain", async || {
        (!host.stats(&c03, 0, false).await.ok()?.samples.is_empty()).then_some(())
    })
    .await;
    let info = host.host().await.unwrap();
    assert_eq!((info.vms, info.running_vms, info.vcpus_allocated), (20, 1, 1), "{info:?}");
    changes.borrow_and_update();
    assert!(lv.virsh(&["destroy", "c03"]).status.success());
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event for a destroy").unwrap();
    assert_eq!(host.list_vms().await.unwrap().iter().find(|v| v.name == "c03").unwrap().state, VmState::Stopped);
    changes.borrow_and_update();
    assert!(lv.virsh(&["undefine", "c05"]).status.success());
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event for an undefine").unwrap();
    let vms = host.list_vms().await.unwrap();
    assert!(vms.len() == 19 && vms.iter().all(|v| v.name != "c05"), "{vms:?}");
}

/// Not a pass/fail test: how long one refresh of 200 domains takes (the list, then every domain's samples),
/// over the local socket and over SSH, and how many libvirt calls it makes (`porthole-bench libvirt` is the
/// full benchmark). `cargo test -p porthole-tests --test libvirt -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn refreshing_200_domains_costs() {
    let Some(lv) = Libvirt::start_or_skip("libvirt 200 domains") else { return };
    let kernel = lv.guest_kernel("idle");
    for i in 0..200 {
        let xml = format!(
            "<domain type='qemu'><name>d{i:03}</name><memory unit='MiB'>16</memory><vcpu>1</vcpu><os><type \
             arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel></os><devices><graphics type='vnc' \
             autoport='yes' listen='127.0.0.1'/></devices></domain>",
            kernel.display()
        );
        let file = lv.dir.path("d.xml");
        std::fs::write(&file, xml).unwrap();
        assert!(lv.virsh(&["define", &file.display().to_string()]).status.success());
    }
    for (what, uri) in [
        ("local", lv.local_uri()),
        ("ssh", lv.ssh_uri(&lv.client_key, Some(&lv.ssh_wrapper))),
        // Not libssh: libvirt 9.0's libssh transport crashes on a reply this large (see porthole-libvirt).
    ] {
        let libvirt = LibvirtHost::connect_async(&uri).await.unwrap();
        let host: HostHandle = Arc::new(libvirt.clone());
        for round in 0..3 {
            let (start, calls) = (std::time::Instant::now(), libvirt.calls());
            let vms = host.list_vms().await.unwrap();
            let listed = start.elapsed();
            for vm in &vms {
                host.stats(&vm.id, 0, false).await.unwrap();
            }
            assert_eq!(vms.len(), 200);
            eprintln!(
                "{what} round {round}: list {listed:?}, list + 200 stats {:?}, {} libvirt calls",
                start.elapsed(),
                libvirt.calls() - calls
            );
        }
    }
}

/// A VM the wizard would make (a kernel to boot, the default disk and machine) runs its guest, and its
/// console shows the guest's screen and takes keys, as on domains defined by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_made_by_porthole_boots_its_kernel_and_its_console_takes_keys() {
    let Some(lv) = Libvirt::start_or_skip("libvirt console of a made VM") else { return };
    let host = connect(&lv.local_uri()).await;
    let spec = booting(&lv, "made-echo", "kbd-echo");
    let vm = host.create_vm(&spec).await.unwrap();
    host.action(&vm.id, Action::Start).await.unwrap();
    // The serial console keeps what the guest prints from its first reading on (a pty has no history, and
    // QEMU notices a reader on its pty within a second: the key is typed until it shows there).
    host.serial(&vm.id, 10).await.unwrap();
    let stream = tokio::time::timeout(LIMIT, host.open_console(&vm.id)).await.expect("opening hung").unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let typing = {
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut c = RfbClient::over(stream, None).expect("RFB handshake with the made VM's VNC server");
            c.set_encodings(&[rfb::RAW, rfb::DESKTOP_SIZE]).unwrap();
            c.full_frame().unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let start = std::time::Instant::now();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(start.elapsed() < LIMIT, "the keys never reached the serial console");
                c.key(u32::from(b'a'), true).unwrap();
                c.key(u32::from(b'a'), false).unwrap();
                c.request(true).unwrap();
                let _ = c.read_update();
            }
            // The guest's screen echoes the keys too.
            assert!(colours(&c, 64, 16) >= 2, "the echo never reached the screen");
        })
    };
    let id = vm.id.clone();
    eventually("the key on the serial console", async || {
        let out = host.serial(&id, 100).await.ok()?;
        out.lines.iter().any(|l| l.contains("PORTHOLE-KEY 9e")).then_some(())
    })
    .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    typing.await.unwrap();
    let out = host.serial(&id, 100).await.unwrap();
    assert!(out.lines.iter().any(|l| l == "PORTHOLE-KEY 1e"), "{:?}", out.lines);
    host.action(&vm.id, Action::Poweroff).await.unwrap();
    let e = host.serial(&vm.id, 10).await.unwrap_err().to_string();
    assert!(e.contains("not running"), "{e}");
    host.delete_vm(&vm.id).await.unwrap();
}

/// `qemu+tls://` (virt-manager's TLS URIs), with the certificates in `pkipath=`: the host answers, a VM made
/// through it boots its kernel and its serial console (a libvirt stream) shows the keys typed; the graphical
/// console says it needs SSH, since libvirt passes no file descriptor over TCP and nothing tunnels to the
/// host's 127.0.0.1 VNC port, and the connection stays usable after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_qemu_tls_a_made_vm_boots_its_serial_console_works_and_its_screen_needs_ssh() {
    let Some(lv) = Libvirt::start_with_tls_or_skip("libvirt over TLS") else { return };
    let tls = lv.tls().unwrap();
    let uri = lv.tls_uri("127.0.0.1", &tls.client);
    let host = connect(&uri).await;
    let info = host.host().await.unwrap();
    assert!(info.cpus > 0 && info.version.starts_with("libvirt "), "{info:?}");
    assert_eq!(Path::new(&info.data_dir), lv.images);
    // The server certificate names localhost too.
    let by_name = connect(&lv.tls_uri("localhost", &tls.client)).await;
    assert!(by_name.list_vms().await.unwrap().is_empty());
    // The window greys *Open console* with the reason before anyone tries.
    let why = host.lacks(porthole_api::Feature::Console).expect("no console over TLS");
    assert!(why.contains("qemu+ssh://"), "{why}");
    assert_eq!(connect(&lv.local_uri()).await.lacks(porthole_api::Feature::Console), None);

    let spec = booting(&lv, "tls-vm", "kbd-echo");
    let vm = host.create_vm(&spec).await.unwrap();
    let id = vm.id.clone();
    assert_eq!(host.action(&id, Action::Start).await.unwrap().state, VmState::Running);
    host.serial(&id, 10).await.unwrap();
    // Keys pressed behind Porthole's back (virsh send-key on the local socket) reach the guest, whose echo
    // comes back through the serial console over TLS.
    eventually("the key echoed on the serial console over TLS", async || {
        let out = lv.virsh(&["send-key", "tls-vm", "KEY_A"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = host.serial(&id, 100).await.ok()?;
        out.lines.iter().any(|l| l.contains("PORTHOLE-KEY 9e")).then_some(())
    })
    .await;

    let e = tokio::time::timeout(LIMIT, host.open_console(&id)).await.expect("opening hung").unwrap_err().to_string();
    assert!(e.contains("over tls") && e.contains("qemu+ssh://"), "{e}");
    // Nothing was tried that would have cost the connection: the host still answers.
    assert_eq!(host.vm(&id).await.unwrap().state, VmState::Running);
    let png = host.screenshot(&id, 320).await.unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
    assert_eq!(reader.info().width, 320);

    assert_eq!(host.action(&id, Action::Poweroff).await.unwrap().state, VmState::Stopped);
    host.delete_vm(&id).await.unwrap();
    assert!(host.list_vms().await.unwrap().is_empty());
    assert!(!text(&lv.virsh(&["list", "--all", "--name"]).stdout).contains("tls-vm"));
}

/// `qemu+tls://` with certificates the host or the client does not accept: refused at once with what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_qemu_tls_missing_and_foreign_certificates_are_refused_with_a_reason() {
    let Some(lv) = Libvirt::start_with_tls_or_skip("libvirt TLS refusals") else { return };
    let tls = lv.tls().unwrap();
    let e = connect_err(&lv.tls_uri("127.0.0.1", &tls.empty)).await;
    assert!(e.contains("cannot connect to qemu+tls://") && e.contains("cacert.pem") && e.contains("pkipath="), "{e}");
    // Another CA throughout: the host's certificate is not trusted.
    let e = connect_err(&lv.tls_uri("127.0.0.1", &tls.foreign_ca)).await;
    assert!(e.contains("Failed to verify peer's certificate") && e.contains("host's certificate"), "{e}");
    // A client certificate from another CA: libvirt checks it against cacert.pem before sending it.
    let e = connect_err(&lv.tls_uri("127.0.0.1", &tls.foreign_client)).await;
    assert!(e.contains("failed validation") && e.contains("not signed by the CA"), "{e}");
    // Signed by the host's CA, but not a client the host allows: the host hangs up after the handshake.
    let e = connect_err(&lv.tls_uri("127.0.0.1", &tls.stranger)).await;
    assert!(e.contains("TLS confirmation") && e.contains("refused this client's certificate"), "{e}");
    let log = std::fs::read_to_string(&lv.daemon_log).unwrap();
    assert!(log.contains("not on the list of allowed clients"), "{log}");
    // The daemon's own checks, without libvirt's client: a certificate from another CA, one not on its list,
    // get no confirmation; the accepted one gets libvirt's byte 1.
    let logged = std::fs::read_to_string(&lv.daemon_log).unwrap().len();
    assert_eq!(lv.tls_confirmation(&tls.foreign_client).unwrap(), None);
    let log = std::fs::read_to_string(&lv.daemon_log).unwrap();
    assert!(log[logged..].contains("hasn't got a known issuer"), "{}", &log[logged..]);
    assert_eq!(lv.tls_confirmation(&tls.stranger).unwrap(), None);
    assert_eq!(lv.tls_confirmation(&tls.client).unwrap(), Some(1));
    // The accepted client still gets in.
    let host = connect(&lv.tls_uri("127.0.0.1", &tls.client)).await;
    assert!(host.list_vms().await.unwrap().is_empty());
}

/// Typing into a made VM's serial console: the demo guest echoes it back like a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serial_console_of_a_made_vm_shows_output_and_takes_input() {
    let Some(lv) = Libvirt::start_or_skip("libvirt serial console") else { return };
    let host = connect(&lv.local_uri()).await;
    let spec = booting(&lv, "serial-demo", "demo");
    let vm = host.create_vm(&spec).await.unwrap();
    host.action(&vm.id, Action::Start).await.unwrap();
    let id = vm.id.clone();
    // Typed until the guest is up and echoes it (what is typed before its driver is up may be lost).
    eventually("the typed line echoed", async || {
        host.serial_input(&id, "hello libvirt\r").await.ok()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let out = host.serial(&id, 200).await.ok()?;
        out.lines.iter().any(|l| l.contains("hello libvirt")).then_some(())
    })
    .await;
    host.action(&vm.id, Action::Poweroff).await.unwrap();
    host.delete_vm(&vm.id).await.unwrap();
}

/// An upload whose caller stops waiting (the window's *Cancel upload* aborts its task) stops, and its
/// half-written volume leaves the storage pool: the window's giving up crosses the helper process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_upload_leaves_nothing_in_the_pool() {
    let Some(lv) = Libvirt::start_or_skip("libvirt upload cancel") else { return };
    let host: HostHandle = Arc::new(through_helper(&lv.local_uri()));
    let iso = lv.dir.path("big.iso");
    // 256 MiB of data (written, not sparse: the upload reads every byte).
    let mut f = std::fs::File::create(&iso).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..256 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Mutex::new(Some(started_tx));
    let progress = Box::new(move |done: u64, _total: u64| {
        if done > 0
            && let Some(tx) = started.lock().unwrap().take()
        {
            let _ = tx.send(());
        }
    });
    let uploading = {
        let host = host.clone();
        tokio::spawn(async move { host.upload_image("big.iso", &iso, progress).await })
    };
    tokio::time::timeout(LIMIT, started_rx).await.expect("the upload never started").unwrap();
    uploading.abort();
    assert!(uploading.await.unwrap_err().is_cancelled());
    eventually("the cancelled volume gone from the pool", async || {
        let listed = text(&lv.virsh(&["vol-list", "default"]).stdout);
        (!listed.contains("big.iso")).then_some(())
    })
    .await;
    assert!(host.images().await.unwrap().iter().all(|i| i.name != "big.iso"));
}

/// Without a libvirt daemon on this computer a local URI says so and what to install; no harness needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_uri_without_a_daemon_says_libvirt_is_not_running() {
    let dir = porthole_tests::Scratch::new("libvirt-none");
    let uri = format!("qemu:///session?socket={}", dir.path("no-such-sock").display());
    let e = connect_err(&uri).await;
    assert!(e.contains("libvirt is not running on this computer"), "{e}");
    assert!(e.contains("libvirt-daemon-system"), "{e}");
}

/// The window's libvirt host lives in a helper process: its events and consoles (a passed descriptor) cross
/// it, a helper killed mid-session costs no call after it (the next one starts another), and a refused
/// connection says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_helper_process_events_and_consoles_arrive_and_a_killed_helper_is_replaced() {
    let Some(lv) = Libvirt::start_or_skip("libvirt helper process") else { return };
    let process = Arc::new(through_helper(&lv.local_uri()));
    let first = process.pid().expect("the helper runs");
    let mut changes = porthole_api::Host::events(&*process).expect("libvirt hosts report events through the helper");
    let host: HostHandle = process.clone();
    assert_eq!(host.kind(), HostKind::Libvirt);
    assert!(host.lacks(porthole_api::Feature::Console).is_none());
    assert!(host.lacks(porthole_api::Feature::Clones).is_some_and(|why| why.contains("virt-clone")));

    changes.borrow_and_update();
    let serial = lv.define_guest("echo", "kbd-echo");
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event for a domain defined").unwrap();
    let id = host.vm("echo").await.unwrap().id;
    assert_eq!(host.action(&id, Action::Start).await.unwrap().state, VmState::Running);
    wait_serial(&serial, "PORTHOLE-KBD-READY");
    console_echoes_keys(&host, &id, &serial).await;
    let png = host.screenshot(&id, 200).await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG crosses the helper");
    let e = host.cancel_task("no-such-task").await.unwrap_err();
    assert!(matches!(e, porthole_api::HostError::Failed(_)), "{e:?}");
    let e = host.host_stats(0, false).await.unwrap_err();
    assert!(matches!(&e, porthole_api::HostError::Unsupported { why, .. } if why.contains("host samples")), "{e:?}");

    // Killed (a crash in libvirt's library): the next call starts a new helper and answers.
    let status = std::process::Command::new("kill").args(["-9", &first.to_string()]).status().unwrap();
    assert!(status.success());
    let vms = eventually("the host answering after its helper was killed", async || host.list_vms().await.ok()).await;
    assert_eq!(vms.len(), 1);
    let second = process.pid().expect("a new helper runs");
    assert_ne!(second, first);
    // Events follow the new helper.
    changes.borrow_and_update();
    let out = lv.virsh(&["destroy", "echo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    tokio::time::timeout(LIMIT, changes.changed()).await.expect("no event through the new helper").unwrap();
    eventually("the destroyed domain stopped", async || {
        (host.vm(&id).await.ok()?.state == VmState::Stopped).then_some(())
    })
    .await;

    // A connection the helper cannot open is refused with libvirt's reason, and the helper ends.
    let dir = porthole_tests::Scratch::new("libvirt-helper-none");
    let uri = format!("qemu:///session?socket={}", dir.path("no-such-sock").display());
    let e = HostProcess::start(&workspace_bin("porthole-libvirt"), &[uri]).err().expect("no daemon there");
    assert!(e.contains("libvirt is not running on this computer"), "{e}");
}

//! portholed end to end: the real daemon, real sockets (Unix and HTTPS), real `porthole-vmm` processes
//! running micro-guests, driven through `porthole_api::Client` and raw HTTP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use porthole_api::client::Action;
use porthole_api::{Client, ClientError, CreateVm, TaskState, UpdateVm, Vm, VmState};
use porthole_tests::daemon::Daemon;
use porthole_tests::{Scratch, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);

/// Powers off every VM of `client` (VM processes outlive the daemon, so tests clean up after themselves).
async fn power_off_all(client: &Client) {
    for vm in client.list_vms().await.unwrap_or_default() {
        if matches!(vm.state, VmState::Running | VmState::Paused | VmState::Starting | VmState::Stopping) {
            let _ = client.action(&vm.id, Action::Poweroff).await;
        }
    }
}

fn guest(name: &str) -> String {
    porthole_guests::path(name).display().to_string()
}

async fn wait_serial(c: &Client, id: &str, marker: &str) -> Vec<String> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let lines = c.serial(id, 100).await.unwrap().lines;
        if lines.iter().any(|l| l.contains(marker)) {
            return lines;
        }
        assert!(Instant::now() < deadline, "no {marker:?} in the serial output: {lines:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_state(c: &Client, id: &str, state: VmState) -> Vm {
    porthole_tests::daemon::wait_state(c, id, state, LIMIT).await
}

/// RFB over the console stream: version, security None, init, then one full framebuffer update (Raw).
async fn rfb_first_update(stream: &mut tokio::io::DuplexStream) -> (u16, u16, usize) {
    let mut version = [0u8; 12];
    stream.read_exact(&mut version).await.unwrap();
    assert_eq!(&version, b"RFB 003.008\n");
    stream.write_all(b"RFB 003.008\n").await.unwrap();
    let n = stream.read_u8().await.unwrap();
    let mut types = vec![0u8; n as usize];
    stream.read_exact(&mut types).await.unwrap();
    assert!(types.contains(&1), "security None offered: {types:?}");
    stream.write_all(&[1]).await.unwrap();
    assert_eq!(stream.read_u32().await.unwrap(), 0, "security result OK");
    stream.write_all(&[1]).await.unwrap(); // shared
    let (w, h) = (stream.read_u16().await.unwrap(), stream.read_u16().await.unwrap());
    let mut pf = [0u8; 16];
    stream.read_exact(&mut pf).await.unwrap();
    let name_len = stream.read_u32().await.unwrap();
    let mut name = vec![0u8; name_len as usize];
    stream.read_exact(&mut name).await.unwrap();
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w.to_be_bytes());
    req.extend_from_slice(&h.to_be_bytes());
    stream.write_all(&req).await.unwrap();
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], 0, "a FramebufferUpdate");
    let rects = u16::from_be_bytes([header[2], header[3]]);
    let mut pixels = 0usize;
    for _ in 0..rects {
        let mut r = [0u8; 12];
        stream.read_exact(&mut r).await.unwrap();
        let (rw, rh) = (u16::from_be_bytes([r[4], r[5]]) as usize, u16::from_be_bytes([r[6], r[7]]) as usize);
        assert_eq!(i32::from_be_bytes([r[8], r[9], r[10], r[11]]), 0, "Raw (no SetEncodings sent)");
        let mut data = vec![0u8; rw * rh * 4];
        stream.read_exact(&mut data).await.unwrap();
        pixels += rw * rh;
    }
    (w, h, pixels)
}

/// The whole life of a VM through one client: create, start, serial, pause/resume, a console with one
/// framebuffer update, graceful shutdown (the guest honours the ACPI power button), delete.
async fn lifecycle(c: &Client, name: &str, kernel: &str) {
    let vm = c
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec { kernel: kernel.into(), initrd: None, cmdline: String::new() }),
            ..CreateVm::new(name, 1, 64)
        })
        .await
        .unwrap();
    assert_eq!((vm.state, vm.disk_bytes), (VmState::Stopped, porthole_api::DEFAULT_DISK_GIB << 30));
    let id = vm.id.clone();
    assert_eq!(c.action(&id, Action::Start).await.unwrap().state, VmState::Running);
    wait_serial(c, &id, "PORTHOLE-ACPI-READY").await;
    assert_eq!(c.action(&id, Action::Pause).await.unwrap().state, VmState::Paused);
    assert_eq!(c.vm(&id).await.unwrap().state, VmState::Paused);
    assert_eq!(c.action(&id, Action::Resume).await.unwrap().state, VmState::Running);
    let mut console = c.console(&id).await.unwrap();
    let (w, h, pixels) = rfb_first_update(&mut console).await;
    assert_eq!(pixels, usize::from(w) * usize::from(h), "the first update covers the screen");
    drop(console);
    let task = c.shutdown(&id, 30).await.unwrap();
    let deadline = Instant::now() + LIMIT;
    while c.task(&task.id).await.unwrap().state == TaskState::Running {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vm = c.vm(&id).await.unwrap();
    assert_eq!(vm.state, VmState::Stopped, "{vm:?}");
    let exit = vm.last_exit.unwrap();
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert!(exit.serial_tail.iter().any(|l| l.contains("PORTHOLE-ACPI-POWER-BUTTON")), "{exit:?}");
    c.delete_vm(&id).await.unwrap();
    assert_eq!(c.vm(&id).await.unwrap_err().status(), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_over_the_unix_socket() {
    let dir = Scratch::new("daemon-unix");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let host = c.host().await.unwrap();
    assert_eq!(host.version, porthole_api::VERSION);
    lifecycle(&c, "local1", &guest("acpi-button")).await;
    // The local owner's ticket names the RFB socket for a direct connection.
    let vm = c
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec { kernel: guest("acpi-button"), initrd: None, cmdline: String::new() }),
            disk_gib: 0,
            ..CreateVm::new("local2", 1, 64)
        })
        .await
        .unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    let ticket = c.console_ticket(&vm.id).await.unwrap();
    assert!(ticket.input && ticket.rfb_socket.as_deref().is_some_and(|s| Path::new(s).exists()), "{ticket:?}");
    // The serial stream carries what the guest prints from now on: reset it and it boots again.
    wait_serial(&c, &vm.id, "PORTHOLE-ACPI-READY").await;
    let mut serial = c.serial_stream(&vm.id).await.unwrap();
    c.action(&vm.id, Action::Reset).await.unwrap();
    let mut seen = String::new();
    while !seen.contains("PORTHOLE-ACPI-READY") {
        let chunk = tokio::time::timeout(LIMIT, serial.recv()).await.expect("serial output").expect("stream open");
        seen.push_str(&chunk);
    }
    // Stats arrive once a second.
    let deadline = Instant::now() + LIMIT;
    let samples = loop {
        let s = c.stats(&vm.id, 0, false).await.unwrap();
        if s.samples.len() >= 2 {
            break s.samples;
        }
        assert!(Instant::now() < deadline, "no stats samples");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(samples.iter().all(|s| s.memory_bytes > 1 << 20 && s.cpu_percent >= 0.0), "{samples:?}");
    // A running VM keeps its hardware (a change waits for its next start) and cannot be deleted; a new name is
    // fine.
    let pending = c.update_vm(&vm.id, &UpdateVm { vcpus: Some(2), ..Default::default() }).await.unwrap();
    assert_eq!((pending.vcpus, pending.pending_changes.as_slice()), (1, ["vcpus".to_owned()].as_slice()));
    assert_eq!(
        c.update_vm(&vm.id, &UpdateVm { name: Some("renamed".into()), ..Default::default() }).await.unwrap().name,
        "renamed"
    );
    assert_eq!(c.delete_vm(&vm.id).await.unwrap_err().status(), Some(409));
    assert!(c.tasks().await.unwrap().iter().any(|t| t.what.starts_with("shut down") && t.state == TaskState::Done));
    power_off_all(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_lifecycle_over_https_with_a_token() {
    let dir = Scratch::new("daemon-https");
    let d = Daemon::start(&dir, true, &[]);
    let admin = d.remote(&d.token("ci-admin", "admin", &[]));
    // Remote users boot images of the library, uploaded through the API.
    let elf = porthole_guests::path("acpi-button");
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let p = progress.clone();
    let image = admin
        .upload_image("acpi-button.elf", &elf, move |sent, _| p.store(sent, std::sync::atomic::Ordering::Relaxed))
        .await
        .unwrap();
    let size = std::fs::metadata(&elf).unwrap().len();
    assert_eq!(image.size_bytes, size);
    assert_eq!(progress.load(std::sync::atomic::Ordering::Relaxed), size, "the progress callback saw every byte");
    assert_eq!(admin.images().await.unwrap(), std::slice::from_ref(&image));
    lifecycle(&admin, "remote1", "acpi-button.elf").await;
    // A host path is refused to non-admins, and an unknown image to everyone.
    let bad = admin
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec { kernel: "nope.elf".into(), initrd: None, cmdline: String::new() }),
            ..CreateVm::new("x", 1, 64)
        })
        .await
        .unwrap_err();
    assert_eq!(bad.status(), Some(400), "{bad}");
    // Media: a library image goes into a running VM's CD/DVD drive and comes out again.
    let vm = admin
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec {
                kernel: "acpi-button.elf".into(),
                initrd: None,
                cmdline: String::new(),
            }),
            disk_gib: 0,
            ..CreateVm::new("media1", 1, 64)
        })
        .await
        .unwrap();
    admin.action(&vm.id, Action::Start).await.unwrap();
    assert_eq!(
        admin.change_media(&vm.id, Some("acpi-button.elf")).await.unwrap().media.as_deref(),
        Some("acpi-button.elf")
    );
    assert_eq!(admin.change_media(&vm.id, Some("missing.iso")).await.unwrap_err().status(), Some(400));
    assert_eq!(admin.delete_image("acpi-button.elf").await.unwrap_err().status(), Some(409), "in use");
    assert_eq!(admin.change_media(&vm.id, None).await.unwrap().media, None);
    admin.action(&vm.id, Action::Poweroff).await.unwrap();
    // The OpenAPI document is served and names every route.
    let doc = admin.openapi().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/vms/{id}/console"]["post"].is_object());
}

async fn status_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
    r.expect_err("should be refused").status().expect("an API error")
}

/// Raw HTTPS without the API client: for requests the client would not send (no token at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_is_checked_for_every_caller() {
    let dir = Scratch::new("daemon-access");
    let d = Daemon::start(&dir, true, &["--console-ticket-s", "1"]);
    let local = d.local();
    let kernel = guest("acpi-button");
    let make = |name: &'static str| {
        let kernel = kernel.clone();
        let local = local.clone();
        async move {
            local
                .create_vm(&CreateVm {
                    boot: Some(porthole_api::BootSpec { kernel, initrd: None, cmdline: String::new() }),
                    disk_gib: 0,
                    ..CreateVm::new(name, 1, 64)
                })
                .await
                .unwrap()
        }
    };
    let (a, b) = (make("vm-a").await, make("vm-b").await);
    local.action(&a.id, Action::Start).await.unwrap();

    // No token, a wrong one: 401.
    assert_eq!(status_of(d.remote("").list_vms().await).await, 401);
    assert_eq!(status_of(d.remote("pht_0000").list_vms().await).await, 401);
    // A viewer reads but may not act.
    let viewer = d.remote(&d.token("viewer", "viewer", &[]));
    assert_eq!(viewer.list_vms().await.unwrap().len(), 2);
    assert_eq!(status_of(viewer.action(&a.id, Action::Pause).await).await, 403);
    assert_eq!(status_of(viewer.create_vm(&CreateVm::new("v", 1, 64)).await).await, 403);
    // Its console is view-only.
    let t = viewer.console_ticket(&a.id).await.unwrap();
    assert!(!t.input && t.rfb_socket.is_none(), "{t:?}");
    // An operator acts on its VM, not on another, and does not even see the other.
    let op = d.remote(&d.token("op-a", "operator", &[&a.id]));
    assert_eq!(op.action(&a.id, Action::Pause).await.unwrap().state, VmState::Paused);
    op.action(&a.id, Action::Resume).await.unwrap();
    assert_eq!(status_of(op.action(&b.id, Action::Start).await).await, 403);
    assert_eq!(status_of(op.vm(&b.id).await).await, 403);
    assert_eq!(
        op.list_vms().await.unwrap().iter().map(|v| v.id.clone()).collect::<Vec<_>>(),
        std::slice::from_ref(&a.id)
    );
    assert_eq!(status_of(op.update_vm(&a.id, &UpdateVm { vcpus: Some(2), ..Default::default() }).await).await, 403);
    // Revoked: 401 at once, without restarting the daemon.
    let out = d.token_command(&["revoke", "op-a"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(status_of(op.list_vms().await).await, 401);
    let listed = text(&d.token_command(&["list"]).stdout);
    assert!(listed.contains("viewer") && !listed.contains("op-a") && !listed.contains("pht_"), "{listed}");

    // Tickets: one use only; expired ones refused.
    let admin = d.remote(&d.token("admin", "admin", &[]));
    let ticket = admin.console_ticket(&a.id).await.unwrap();
    let mut s = admin.console_with_ticket(&ticket.path).await.unwrap();
    let mut v = [0u8; 12];
    s.read_exact(&mut v).await.unwrap();
    assert_eq!(&v, b"RFB 003.008\n");
    let reused = admin.console_with_ticket(&ticket.path).await;
    assert!(reused.is_err(), "a ticket works once");
    let ticket = admin.console_ticket(&a.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(admin.console_with_ticket(&ticket.path).await.is_err(), "an expired ticket is refused");

    // Plain HTTP on the TLS port: no HTTP answer, the connection is closed.
    let (authority, _) = d.remote.clone().unwrap();
    let mut tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
    tcp.write_all(b"GET /api/v1/host HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut answer)).await;
    assert!(!text(&answer).contains("HTTP/1.1 200"), "{}", text(&answer));
    // A certificate that is not the pinned one is refused.
    let wrong = Client::https(&authority, "x", Some(&"00".repeat(32))).unwrap();
    assert!(matches!(wrong.host().await, Err(ClientError::Http { .. })));

    // Another user on the Unix socket: the socket (0600) and its folder (0700) keep them out; and were
    // they opened up, the daemon checks the peer's uid itself.
    let nobody = |socket: &Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c"])
            .arg(format!(
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect({:?})\nexcept OSError as e:\n print('refused', e.errno); sys.exit(0)\ns.sendall(b'GET /api/v1/vms HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\nprint(s.recv(200).decode(errors='replace'))",
                socket.display().to_string()
            ))
            .output()
            .unwrap()
    };
    let out = nobody(&d.socket());
    assert!(text(&out.stdout).contains("refused 13"), "{} {}", text(&out.stdout), text(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d.run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(d.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = nobody(&d.socket());
    assert!(text(&out.stdout).contains("403"), "{} {}", text(&out.stdout), text(&out.stderr));
    power_off_all(&local).await;
}

/// Malformed and abusive requests get a clear 4xx JSON error and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = Scratch::new("daemon-input");
    let d = Daemon::start(&dir, false, &["--upload-limit", "4096"]);
    let c = d.local();
    c.create_vm(&CreateVm { disk_gib: 0, ..CreateVm::new("keep", 1, 64) }).await.unwrap();
    let snapshot = || {
        let mut files: Vec<String> = walk(&d.data).into_iter().map(|p| p.display().to_string()).collect();
        files.sort();
        files
    };
    let before = snapshot();
    let raw = |method: &str, path: &str, body: &str| {
        Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\nb={:?}.encode()\ns.sendall(b'{method} /api/v1{path} HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\nConnection: close\\r\\nContent-Length: '+str(len(b)).encode()+b'\\r\\n\\r\\n'+b)\nout=b''\nwhile True:\n  d=s.recv(65536)\n  if not d: break\n  out+=d\nprint(out.decode(errors='replace'))",
                d.socket().display().to_string(),
                body
            ))
            .output()
            .unwrap()
    };
    let host_mib = c.host().await.unwrap().memory_mib;
    let cases = [
        ("POST", "/vms", "{\"name\": \"a\", ".to_owned(), "400"),
        ("POST", "/vms", r#"{"name":"a","vcpus":1,"memory_mib":64,"colour":"red"}"#.to_owned(), "400"),
        ("POST", "/vms", r#"{"name":"a","vcpus":0,"memory_mib":64}"#.to_owned(), "400"),
        ("POST", "/vms", format!(r#"{{"name":"a","vcpus":1,"memory_mib":{}}}"#, host_mib + 1024), "400"),
        ("POST", "/vms", r#"{"name":"a/b","vcpus":1,"memory_mib":64}"#.to_owned(), "400"),
        ("POST", "/vms", r#"{"name":"..","vcpus":1,"memory_mib":64}"#.to_owned(), "400"),
        ("POST", "/vms", r#"{"name":"keep","vcpus":1,"memory_mib":64}"#.to_owned(), "409"),
        ("POST", "/vms", r#"{"name":"a","vcpus":1,"memory_mib":64,"disk_gib":99999999}"#.to_owned(), "400"),
        ("PATCH", "/vms/nope", r#"{"vcpus":2}"#.to_owned(), "404"),
        ("POST", "/vms/nope/start", String::new(), "404"),
        ("PUT", "/images/..%2F..%2Fetc%2Fpasswd", "x".to_owned(), "400"),
        ("GET", "/nothing", String::new(), "404"),
    ];
    for (method, path, body, status) in &cases {
        let out = text(&raw(method, path, body).stdout);
        let first = out.lines().next().unwrap_or_default();
        assert!(first.contains(status), "{method} {path} {body}: {out}");
        assert!(out.contains("\"error\":") && out.contains("\"message\":"), "a JSON error body: {out}");
    }
    // Uploads: a wrong checksum, and one over the limit.
    let file = dir.path("small.iso");
    std::fs::write(&file, vec![7u8; 1000]).unwrap();
    let bad_sum = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.sendall(b'PUT /api/v1/images/small.iso HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\nX-Porthole-Sha256: {}\\r\\nContent-Length: 1000\\r\\n\\r\\n'+bytes([7])*1000)\nprint(s.recv(4096).decode())",
            d.socket().display().to_string(),
            "ab".repeat(32)
        ))
        .output()
        .unwrap();
    assert!(
        text(&bad_sum.stdout).contains("400") && text(&bad_sum.stdout).contains("SHA-256 mismatch"),
        "{}",
        text(&bad_sum.stdout)
    );
    let big = dir.path("big.iso");
    std::fs::write(&big, vec![1u8; 5000]).unwrap();
    // The client knows the limit and does not send a doomed body; the daemon refuses one anyway (413).
    let e = c.upload_image("big.iso", &big, |_, _| {}).await.unwrap_err();
    assert!(matches!(e, ClientError::TooLarge { size: 5000, limit: 4096 }), "{e}");
    let too_big = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.sendall(b'PUT /api/v1/images/big.iso HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\nX-Porthole-Sha256: {}\\r\\nContent-Length: 5000\\r\\n\\r\\n')\nprint(s.recv(4096).decode())",
            d.socket().display().to_string(),
            "ab".repeat(32)
        ))
        .output()
        .unwrap();
    assert!(text(&too_big.stdout).contains("413"), "{}", text(&too_big.stdout));
    // An upload broken off half-way (the client went away): the partial file goes, the task says why.
    let broken = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import socket,time\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.sendall(b'PUT /api/v1/images/half.iso HTTP/1.1\\r\\nHost: x\\r\\nX-Porthole-Sha256: {}\\r\\nContent-Length: 3000\\r\\n\\r\\n'+bytes([7])*1000)\ntime.sleep(0.5)\ns.close()",
            d.socket().display().to_string(),
            "ab".repeat(32)
        ))
        .status()
        .unwrap();
    assert!(broken.success());
    let deadline = Instant::now() + LIMIT;
    while snapshot() != before {
        assert!(Instant::now() < deadline, "the partial upload stayed: {:?}", snapshot());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let task = c.tasks().await.unwrap().into_iter().find(|t| t.what == "upload half.iso").expect("the upload's task");
    assert_eq!(task.state, TaskState::Failed, "{task:?}");
    let ok = c.upload_image("small.iso", &file, |_, _| {}).await.unwrap();
    assert_eq!(ok.size_bytes, 1000);
    c.delete_image("small.iso").await.unwrap();
    assert_eq!(snapshot(), before, "nothing in the store changed");
    assert_eq!(c.list_vms().await.unwrap().len(), 1);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if !p.to_string_lossy().contains("/tls/") {
            out.push(p);
        }
    }
    out
}

/// kill -9 of the daemon while a VM runs: the VM keeps running and the restarted daemon re-adopts it.
/// kill -9 of a VM: reported crashed with the reason. A crash between the temp write and the rename of a
/// definition: the old definition, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_survived() {
    let dir = Scratch::new("daemon-faults");
    let mut d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec { kernel: guest("ticker"), initrd: None, cmdline: String::new() }),
            disk_gib: 1,
            ..CreateVm::new("survivor", 1, 64)
        })
        .await
        .unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    c.action(&vm.id, Action::Pause).await.unwrap();
    let vmm_pid =
        std::fs::read_to_string(d.run.join("vms").join(&vm.id).join("pid")).unwrap().trim().parse::<i32>().unwrap();
    d.kill9();
    assert!(Path::new(&format!("/proc/{vmm_pid}")).exists(), "the VM outlives the daemon");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let adopted = c.vm(&vm.id).await.unwrap();
    assert_eq!(adopted.state, VmState::Paused, "re-adopted with its state: {adopted:?}");
    c.action(&vm.id, Action::Resume).await.unwrap();
    wait_serial(&c, &vm.id, "PORTHOLE-TICK").await;
    // Kill the adopted VM: crashed, without an exit record.
    // SAFETY: kill(2) of the VM process this test started (through the daemon).
    unsafe { libc::kill(vmm_pid, libc::SIGKILL) };
    let crashed = wait_state(&c, &vm.id, VmState::Crashed).await;
    assert!(crashed.last_exit.as_ref().unwrap().reason.contains("without an exit record"), "{crashed:?}");
    // A VM the daemon started itself: the signal is known.
    c.action(&vm.id, Action::Start).await.unwrap();
    let pid =
        std::fs::read_to_string(d.run.join("vms").join(&vm.id).join("pid")).unwrap().trim().parse::<i32>().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let crashed = wait_state(&c, &vm.id, VmState::Crashed).await;
    assert!(crashed.last_exit.as_ref().unwrap().reason.contains("killed by signal 9"), "{crashed:?}");
    drop(c);
    drop(d);

    // Power loss in the middle of a definition write.
    let d = Daemon::start_with_env(&dir, false, &[], &[("PORTHOLED_CRASH_AT", "after-temp-write")]);
    let c = d.local();
    let renamed = c.update_vm(&vm.id, &UpdateVm { name: Some("renamed".into()), ..Default::default() }).await;
    assert!(renamed.is_err(), "the daemon died in the middle of the write");
    let mut d = d;
    let _ = d.child.take().unwrap().wait();
    let tmp_left = walk(&d.data).iter().any(|p| p.to_string_lossy().contains(".vm.json.tmp-"));
    assert!(tmp_left, "the crash left the temp file behind");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c.vm(&vm.id).await.unwrap();
    assert_eq!(vm.name, "survivor", "the old definition, whole");
    assert!(c.host().await.unwrap().problems.is_empty());
    assert!(!walk(&d.data).iter().any(|p| p.to_string_lossy().contains(".vm.json.tmp-")));
    let _ = d.pid();
}

/// 100 clients for 30 s of mixed reads against 200 VM definitions: no errors, bounded memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clients_read_for_thirty_seconds() {
    let dir = Scratch::new("daemon-load");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(
            c.create_vm(&CreateVm { disk_gib: 0, ..CreateVm::new(format!("load{i:03}"), 1, 64) }).await.unwrap().id,
        );
    }
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap()
    };
    let start_rss = rss(d.pid());
    let ids = std::sync::Arc::new(ids);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for n in 0..100 {
        let (c, ids) = (c.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, Vec::new());
            let mut i = n;
            while Instant::now() < deadline {
                let r = match i % 4 {
                    0 => c.list_vms().await.map(|v| assert_eq!(v.len(), 200)),
                    1 => c.vm(&ids[i % ids.len()]).await.map(|_| ()),
                    2 => c.host().await.map(|_| ()),
                    _ => c.stats(&ids[i % ids.len()], 0, false).await.map(|_| ()),
                };
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => errors.push(e.to_string()),
                }
                i += 7;
            }
            (ok, errors)
        }));
    }
    let (mut ok, mut errors) = (0, Vec::new());
    for t in tasks {
        let (o, e) = t.await.unwrap();
        ok += o;
        errors.extend(e);
    }
    let end_rss = rss(d.pid());
    println!("load: {ok} requests in 30 s ({:.0}/s), daemon RSS {start_rss} -> {end_rss} KiB", ok as f64 / 30.0);
    assert!(errors.is_empty(), "{} errors, first: {:?}", errors.len(), errors.first());
    assert!(ok > 1000, "{ok}");
    assert!(end_rss < start_rss + 64 * 1024, "memory grew from {start_rss} to {end_rss} KiB");
}

/// Decodes a PNG into (width, height, RGB bytes).
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// What the GUI's rows, serial tab and wizard use: screenshots (thumbnails), typing into the serial port,
/// tags, and a library image copied as a new VM's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thumbnails_serial_typing_tags_and_image_disks() {
    let dir = Scratch::new("daemon-extras");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec { kernel: guest("demo"), initrd: None, cmdline: String::new() }),
            disk_gib: 0,
            tags: vec!["web".into(), "demo".into(), "web".into()],
            ..CreateVm::new("demo", 1, 64)
        })
        .await
        .unwrap();
    assert_eq!(vm.tags, ["demo", "web"], "tags are kept sorted, without duplicates");
    // Not running: no screenshot, no serial input.
    assert_eq!(c.screenshot(&vm.id, 160).await.unwrap_err().status(), Some(409));
    assert_eq!(c.serial_input(&vm.id, "x").await.unwrap_err().status(), Some(409));
    c.action(&vm.id, Action::Start).await.unwrap();
    wait_serial(&c, &vm.id, "PORTHOLE-DEMO-READY").await;

    // A thumbnail: 640x480 scaled to 160x120, the demo's dark blue background in its corner.
    let (w, h, rgb) = decode_png(&c.screenshot(&vm.id, 160).await.unwrap());
    assert_eq!((w, h), (160, 120));
    assert_eq!(&rgb[..3], &[0x1E, 0x2A, 0x3A], "top-left pixel is the demo's background");
    // Asking for more than the screen gives the screen itself, never enlarged.
    assert_eq!(decode_png(&c.screenshot(&vm.id, 5000).await.unwrap()).0, 640);

    // Typing into the serial port: the demo echoes what it reads.
    c.serial_input(&vm.id, "hello porthole\r").await.unwrap();
    wait_serial(&c, &vm.id, "hello porthole").await;
    let e = c.serial_input(&vm.id, &"x".repeat(porthole_api::SERIAL_INPUT_MAX + 1)).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");

    // Tags change any time; bad ones are refused.
    let vm2 = c.update_vm(&vm.id, &UpdateVm { tags: Some(vec!["prod".into()]), ..Default::default() }).await.unwrap();
    assert_eq!(vm2.tags, ["prod"]);
    for bad in ["", "has space", &"t".repeat(33)] {
        let e = c.update_vm(&vm.id, &UpdateVm { tags: Some(vec![bad.into()]), ..Default::default() }).await;
        assert_eq!(e.unwrap_err().status(), Some(400), "tag {bad:?}");
    }
    assert_eq!(c.vm(&vm.id).await.unwrap().tags, ["prod"]);

    // A library image as the disk of a new VM: copied, the library's file unchanged.
    let image = dir.path("base.img");
    let content: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&image, &content).unwrap();
    c.upload_image("base.img", &image, |_, _| {}).await.unwrap();
    let from_image = c
        .create_vm(&CreateVm {
            disk_image: Some("base.img".into()),
            disk_format: Some(porthole_api::DiskFormat::Raw),
            ..CreateVm::new("cloned", 1, 64)
        })
        .await
        .unwrap();
    assert_eq!(from_image.disk_format, Some(porthole_api::DiskFormat::Raw));
    assert_eq!(from_image.disk_bytes, content.len() as u64);
    let disk = d.data.join("vms").join(&from_image.id).join("disk0.img");
    assert!(std::fs::read(&disk).unwrap() == content, "the VM's disk is a raw copy of the image (asked for)");
    std::fs::write(&disk, b"changed").unwrap();
    assert!(std::fs::read(d.data.join("images/base.img")).unwrap() == content, "the library image is unchanged");
    let e = c.create_vm(&CreateVm { disk_image: Some("missing.img".into()), ..CreateVm::new("x", 1, 64) }).await;
    assert_eq!(e.unwrap_err().status(), Some(400));
    power_off_all(&c).await;
}

/// A VM with an ISO and no kernel boots its firmware: SeaBIOS tries the CD/DVD drive and the API says how
/// far it got. A VM with nothing to boot is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iso_boots_the_firmware_and_the_api_says_how_far() {
    let dir = Scratch::new("daemon-firmware");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let iso = dir.path("plain.iso");
    let out = Command::new("bash")
        .arg(porthole_tests::repo_root().join("tests/guests/iso/make-iso.sh"))
        .arg("plain")
        .arg(&iso)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.upload_image("plain.iso", &iso, |_, _| {}).await.unwrap();
    let vm = c
        .create_vm(&CreateVm { media: Some("plain.iso".into()), disk_gib: 0, ..CreateVm::new("installer", 1, 64) })
        .await
        .unwrap();
    assert_eq!(c.action(&vm.id, Action::Start).await.unwrap().state, VmState::Running);
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        let status = c.vm(&vm.id).await.unwrap().boot_status;
        if status.as_deref().is_some_and(|s| s.starts_with("No bootable device")) {
            break status;
        }
        assert!(Instant::now() < deadline, "the firmware never gave up: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.is_some());
    let log = std::fs::read_to_string(d.run.join("vms").join(&vm.id).join("firmware.log")).unwrap();
    assert!(log.contains("Booting from DVD/CD...") && log.contains("Could not read from CDROM"), "{log}");
    assert_eq!(c.list_vms().await.unwrap()[0].boot_status, None, "lists leave it out");
    let nothing = c.create_vm(&CreateVm { disk_gib: 0, ..CreateVm::new("empty", 1, 64) }).await.unwrap();
    let e = c.action(&nothing.id, Action::Start).await.unwrap_err();
    assert!(e.status() == Some(409) && e.to_string().contains("nothing to boot"), "{e}");
    power_off_all(&c).await;
}

/// A guest that crashes keeps its last screen, as under QEMU: the VM reads `crashed` with the report and
/// the guest's last serial lines while its process lives on; its screenshot and console still show the
/// picture it drew; pause is refused; a power-off ends it: `stopped`, the crash as the last exit's reason.
/// (A reset of a crashed VM is tested on the engine: `a_crashed_guest_stays_until_sigterm_and_reset_reboots_it`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_vm_keeps_its_screen_until_powered_off() {
    const BANDS: [[u8; 3]; 8] = [
        [255, 255, 255],
        [255, 255, 0],
        [0, 255, 255],
        [0, 255, 0],
        [255, 0, 255],
        [255, 0, 0],
        [0, 0, 255],
        [0, 0, 0],
    ];
    let dir = Scratch::new("daemon-crash");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec { kernel: guest("crash-screen"), initrd: None, cmdline: String::new() }),
            disk_gib: 0,
            ..CreateVm::new("crasher", 1, 64)
        })
        .await
        .unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    let crashed = wait_state(&c, &vm.id, VmState::Crashed).await;
    let report = crashed.crash.as_ref().unwrap_or_else(|| panic!("no crash report: {crashed:?}"));
    assert!(report.reason.contains("triple fault") && report.reason.contains("instruction bytes"), "{report:?}");
    assert!(report.serial_tail.iter().any(|l| l.contains("PORTHOLE-CRASH-SCREEN-READY")), "{report:?}");
    assert!(crashed.uptime_s.is_some() && crashed.last_exit.is_none(), "the process lives on: {crashed:?}");

    // The screenshot: 640x480 box-filtered to 160x120, so each 60-row band is 15 rows of its exact colour.
    let (w, h, rgb) = decode_png(&c.screenshot(&vm.id, 160).await.unwrap());
    assert_eq!((w, h), (160, 120));
    for (band, colour) in BANDS.iter().enumerate() {
        for (x, y) in [(0, band * 15), (80, band * 15 + 7), (159, band * 15 + 14)] {
            let i = (y * 160 + x) * 3;
            assert_eq!(&rgb[i..i + 3], colour, "band {band} at ({x},{y})");
        }
    }
    // The console: a full frame of the same screen.
    let mut console = c.console(&vm.id).await.unwrap();
    assert_eq!(rfb_first_update(&mut console).await, (640, 480, 640 * 480));
    drop(console);
    let e = c.action(&vm.id, Action::Pause).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("crashed"), "{e}");

    let off = c.action(&vm.id, Action::Poweroff).await.unwrap();
    let off = if off.state == VmState::Stopped { off } else { wait_state(&c, &vm.id, VmState::Stopped).await };
    let exit = off.last_exit.as_ref().unwrap_or_else(|| panic!("{off:?}"));
    assert_eq!(exit.exit_code, Some(2), "{off:?}");
    assert!(exit.reason.starts_with("the guest crashed: triple fault"), "{off:?}");
    assert!(off.crash.is_none(), "{off:?}");
}

/// What the GUI's host page shows: the host's capacity and what is in use, its own samples, the library
/// with the VMs that use each image (deletion refused, naming them), and tasks that can be cancelled: an
/// upload held half-way (its partial file goes, the uploader gets the reason) and a shutdown's wait (the
/// guest, which ignores the power button, keeps running and is not forced off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_page_api_reports_capacity_use_and_cancels_tasks() {
    let dir = Scratch::new("daemon-host-page");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let iso = dir.path("cd.iso");
    std::fs::write(&iso, vec![7u8; 64 << 10]).unwrap();
    c.upload_image("cd.iso", &iso, |_, _| {}).await.unwrap();
    let vm = c
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec { kernel: guest("ticker"), initrd: None, cmdline: String::new() }),
            media: Some("cd.iso".into()),
            disk_gib: 0,
            ..CreateVm::new("ticking", 2, 96)
        })
        .await
        .unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    wait_serial(&c, &vm.id, "PORTHOLE-TICK").await;

    let info = c.host().await.unwrap();
    assert_eq!((info.vms, info.running_vms, info.vcpus_allocated, info.memory_allocated_mib), (1, 1, 2, 96));
    assert!(info.memory_available_mib > 0 && info.memory_available_mib <= info.memory_mib, "{info:?}");
    assert!(info.disk_total_bytes >= info.free_disk_bytes && info.disk_total_bytes > 0, "{info:?}");
    assert!(info.images_bytes >= 64 << 10, "the library's ISO is counted: {info:?}");
    assert!(!info.kernel.is_empty() && info.uptime_s > 0, "{info:?}");
    // The sampler adds one host sample a second; memory in use is MemTotal - MemAvailable.
    let deadline = Instant::now() + LIMIT;
    let samples = loop {
        let s = c.host_stats(0, false).await.unwrap();
        if s.samples.len() >= 2 {
            break s.samples;
        }
        assert!(Instant::now() < deadline, "no host samples");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let last = samples.last().unwrap();
    assert!(last.memory_bytes > 0 && last.memory_bytes <= info.memory_mib << 20, "{last:?}");
    assert!(last.cpu_percent >= 0.0 && last.cpu_percent <= 100.0 * f64::from(info.cpus) + 1.0, "{last:?}");
    assert_eq!(c.host_stats(0, true).await.unwrap().interval_s, 60);

    // The library says who uses what; deleting an image in use names the VM.
    let images = c.images().await.unwrap();
    assert_eq!(images.iter().find(|i| i.name == "cd.iso").unwrap().used_by, ["ticking"]);
    let e = c.delete_image("cd.iso").await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.to_string().contains("used by: ticking"), "{e}");

    // An upload held half-way, cancelled: 409 to the uploader, the partial file gone, the task cancelled.
    let socket = d.socket().display().to_string();
    let uploader = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({socket:?})\ns.sendall(b'PUT /api/v1/images/slow.iso HTTP/1.1\\r\\nHost: x\\r\\nX-Porthole-Sha256: {}\\r\\nContent-Length: 3000\\r\\n\\r\\n'+bytes([7])*1000)\nprint(s.recv(4096).decode())",
            "ab".repeat(32)
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    let task = loop {
        let t = c.tasks().await.unwrap().into_iter().find(|t| t.what == "upload slow.iso" && t.done == 1000);
        if let Some(t) = t {
            break t;
        }
        assert!(Instant::now() < deadline, "the upload's task never showed its first 1000 bytes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(task.cancellable && task.state == TaskState::Running && task.started_ms > 0, "{task:?}");
    c.cancel_task(&task.id).await.unwrap();
    let reply = text(&porthole_tests::wait(uploader, LIMIT).stdout);
    assert!(reply.contains("409") && reply.contains("cancelled"), "{reply}");
    let ended = c.task(&task.id).await.unwrap();
    assert_eq!((ended.state, ended.cancellable), (TaskState::Cancelled, false), "{ended:?}");
    let leftovers: Vec<_> =
        walk(&d.data.join("images")).into_iter().filter(|p| p.to_string_lossy().contains("slow")).collect();
    assert!(leftovers.is_empty(), "the partial upload stayed: {leftovers:?}");
    assert_eq!(c.cancel_task(&task.id).await.unwrap_err().status(), Some(409), "an ended task");

    // A shutdown the guest ignores, its wait cancelled: the VM runs on (never forced off).
    let shutdown = c.shutdown(&vm.id, 60).await.unwrap();
    assert!(shutdown.cancellable, "{shutdown:?}");
    let cancelled = c.cancel_task(&shutdown.id).await.unwrap();
    assert_eq!(cancelled.id, shutdown.id);
    let deadline = Instant::now() + LIMIT;
    while c.task(&shutdown.id).await.unwrap().state == TaskState::Running {
        assert!(Instant::now() < deadline, "the shutdown task did not end when cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.task(&shutdown.id).await.unwrap().state, TaskState::Cancelled);
    let after = c.vm(&vm.id).await.unwrap();
    assert_eq!(after.state, VmState::Running, "{after:?}");
    // Its ticks go on.
    let last_tick = |lines: Vec<String>| -> u64 {
        lines.iter().rev().find_map(|l| l.strip_prefix("PORTHOLE-TICK ")?.trim().parse().ok()).unwrap_or(0)
    };
    let before = last_tick(wait_serial(&c, &vm.id, "PORTHOLE-TICK").await);
    let deadline = Instant::now() + LIMIT;
    while last_tick(wait_serial(&c, &vm.id, "PORTHOLE-TICK").await) <= before {
        assert!(Instant::now() < deadline, "the guest stopped ticking after tick {before}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    power_off_all(&c).await;
}

/// A WebSocket client cannot make the daemon hold a large message: a frame whose header says it carries 8 MiB
/// (over the console's 2 MiB and the serial stream's 64 KiB, under the WebSocket library's own 16 MiB) is
/// refused at its header, and the daemon closes the connection instead of waiting for the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_past_their_limit_close_the_connection() {
    let dir = Scratch::new("daemon-websocket-limits");
    let d = Daemon::start(&dir, false, &[]);
    let c = d.local();
    let vm = c
        .create_vm(&CreateVm {
            boot: Some(porthole_api::BootSpec { kernel: guest("idle"), initrd: None, cmdline: String::new() }),
            disk_gib: 0,
            nics: Some(Vec::new()),
            ..CreateVm::new("ws", 1, 64)
        })
        .await
        .unwrap();
    c.action(&vm.id, Action::Start).await.unwrap();
    for path in [c.console_ticket(&vm.id).await.unwrap().path, format!("/api/v1/vms/{}/serial/stream", vm.id)] {
        let mut s = tokio::net::UnixStream::connect(d.socket()).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{path}: {}", text(&head));
        // A masked binary frame of 8 MiB (64-bit length), its mask, and no more.
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&(8u64 << 20).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        s.write_all(&frame).await.unwrap();
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        assert!(closed.is_ok(), "{path}: the daemon still waits for the 8 MiB (answered {} bytes)", answer.len());
    }
    c.action(&vm.id, Action::Poweroff).await.unwrap();
}

//! The daemon's WebSocket routes, frame by frame: what a console client (`GET /console?ticket=`, whose binary
//! frames the daemon carries to the VM's RFB server) or a serial reader (`GET /vms/{id}/serial/stream`) sends
//! after the upgrade — any frames, well-formed or not: opcodes, lengths (7-bit, 16-bit, 64-bit), masks,
//! fragments, control frames, closes, and RFB inside binary frames.
//!
//! Input: byte 0 picks the route (bit 0: the serial stream, else the console) and into how many writes the
//! rest is cut (bits 1-2: 1 to 4, a moment apart, so the daemon sees frames arrive in pieces); the rest is
//! what the client sends once the daemon answered 101. Then the client stops writing and reads until the
//! daemon closes (at most 500 ms).
//!
//! Everything is real: the router `portholed` serves, on a Unix socket, over a real host in a scratch
//! directory whose one VM runs the engine (`porthole-vmm` of the main workspace's debug build, booting the
//! `idle` micro-guest), so a console's frames reach the engine's RFB server through the daemon's proxy. The
//! daemon must answer the upgrade every time, and the engine must still run after every input (a VM that a
//! console client can end is a finding). A watchdog process kills the engine when the fuzzer ends, however
//! it ends.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, header};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use portholed::server::Peer;
use tower::ServiceExt;

/// The engine the daemon starts (the main workspace's `cargo build --workspace --bins`).
const VMM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/porthole-vmm");
/// The longest the client waits for the daemon to close after its last byte.
const READ_FOR: Duration = Duration::from_millis(500);

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    app: Arc<portholed::server::App>,
    socket: PathBuf,
    vm: String,
}

static FIXTURE: Mutex<Option<Fixture>> = Mutex::new(None);

fn my_uid() -> u32 {
    // SAFETY: getuid has no arguments and cannot fail.
    unsafe { libc::getuid() }
}

impl Fixture {
    fn new() -> Fixture {
        assert!(
            Path::new(VMM).exists(),
            "{VMM} is missing: build the engine first (cargo build --workspace --bins in the repository)"
        );
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("porthole-fuzz-ws-{}", std::process::id()));
        let (data, run) = (dir.join("data"), dir.join("run"));
        std::fs::create_dir_all(&data).expect("scratch data dir");
        std::fs::create_dir_all(&run).expect("scratch runtime dir");
        watchdog(&dir);
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let host = portholed::host::Host::open(&data, &run, PathBuf::from(VMM)).expect("host opens");
        let tokens = Arc::new(portholed::auth::Tokens::new(&data));
        let stats = Arc::new(portholed::stats::Stats::default());
        let app = portholed::server::App::new(host, tokens, stats, data, 64 * 1024, Duration::from_secs(5));
        let router = portholed::server::router(app.clone());
        let socket = dir.join("api.sock");
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&socket).expect("API socket")
        };
        let service = router.clone().into_make_service_with_connect_info::<Peer>();
        runtime.spawn(async move { axum::serve(listener, service).await });
        let mut f = Fixture { runtime, router, app, socket, vm: String::new() };
        let kernel = porthole_guests::path("idle").display().to_string();
        let body = format!(
            r#"{{"name":"ws","vcpus":1,"memory_mib":64,"disk_gib":0,"nics":[],"boot":{{"kernel":"{kernel}"}}}}"#
        );
        let (status, answer) = f.call(Method::POST, "/api/v1/vms", body);
        assert!(status < 300, "the VM is not made ({status}): {answer}");
        f.vm = f.app.host.list().into_iter().next().expect("the VM just made").id;
        let (status, answer) = f.call(Method::POST, &format!("/api/v1/vms/{}/start", f.vm), String::new());
        assert!(status < 300, "the VM does not start ({status}): {answer}");
        let vnc = f.app.host.run_files(&f.vm).vnc();
        let t0 = Instant::now();
        while !vnc.exists() {
            assert!(t0.elapsed() < Duration::from_secs(20), "the VM's console socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }

    /// One request through the router as the daemon's own user on its Unix socket: status and body.
    fn call(&self, method: Method, path: &str, body: String) -> (u16, String) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("a valid request");
        request.extensions_mut().insert(ConnectInfo(Peer::Unix { uid: Some(my_uid()) }));
        let router = self.router.clone();
        self.runtime.block_on(async move {
            let Ok(response) = router.oneshot(request).await;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }

    /// The path of a new console ticket for the VM.
    fn ticket(&self) -> String {
        let (status, body) = self.call(Method::POST, &format!("/api/v1/vms/{}/console", self.vm), String::new());
        assert_eq!(status, 200, "a console ticket for the running VM: {body}");
        let ticket: serde_json::Value = serde_json::from_str(&body).expect("a ticket in JSON");
        ticket["path"].as_str().expect("the ticket's path").to_owned()
    }

    /// Whether the VM's engine still runs.
    fn engine_runs(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        self.app.host.pid(&self.vm).is_some_and(|pid| unsafe { libc::kill(pid as i32, 0) } == 0)
    }
}

/// A process that outlives this one by at most a second: when the fuzzer is gone (however it ended, an
/// abort included), it kills the engines whose pid files lie under `dir` and removes `dir`.
fn watchdog(dir: &Path) {
    let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
for f in "$2"/run/vms/*/pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done
rm -rf "$2""#;
    // In a process group of its own: what ends the fuzzer's group (cargo fuzz after a crash) must not end it.
    std::process::Command::new("sh")
        .args(["-c", script, "watchdog", &std::process::id().to_string(), &dir.display().to_string()])
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("the watchdog starts");
}

/// Opens a WebSocket on `path` by hand (the client's handshake is fixed; the frames after it are the
/// input's) and returns the stream once the daemon answered 101.
fn upgrade(socket: &Path, path: &str) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("the daemon's socket");
    s.set_read_timeout(Some(READ_FOR)).expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("the handshake is sent");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            // libFuzzer's timer signal.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => panic!("the daemon did not answer the upgrade of {path}: {other:?} after {head:?}"),
        }
        assert!(head.len() < 4096, "an endless answer to the upgrade");
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "no upgrade on {path}: {}", String::from_utf8_lossy(&head));
    s
}

fuzz_target!(init: {
    *FIXTURE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Fixture::new());
}, |data: &[u8]| {
    let Some((&head, frames)) = data.split_first() else { return };
    let fixture = FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture.as_ref().expect("made at init");
    let path = if head & 1 == 0 { f.ticket() } else { format!("/api/v1/vms/{}/serial/stream", f.vm) };
    let mut s = upgrade(&f.socket, &path);
    let pieces = usize::from((head >> 1) & 3) + 1;
    for (i, piece) in frames.chunks(frames.len().div_ceil(pieces).max(1)).enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        if s.write_all(piece).is_err() {
            break; // The daemon closed: it may, on a malformed frame.
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    // Whatever the daemon (and through it the engine) answers, until it closes.
    let t0 = Instant::now();
    let mut sink = [0u8; 64 * 1024];
    while t0.elapsed() < READ_FOR {
        match s.read(&mut sink) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    drop(s);
    assert!(f.engine_runs(), "the VM's engine ended after a console client's frames");
});

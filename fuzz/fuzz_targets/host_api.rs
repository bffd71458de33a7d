//! The daemon's HTTP API: the router `portholed` serves (`portholed::server::router`), every route, with the
//! method, caller, path and query, token and body an API client controls.
//!
//! Input: byte 0 picks the method (bits 0-2: GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS, GET) and who
//! asks (bits 3-5: the daemon's own user on the Unix socket, another user there, an admin token over TCP,
//! a viewer token limited to the first VM, no token, or the token on the input's second line); bit 6 sends
//! the body as `application/octet-stream` instead of JSON. Then the path and query up to a newline (`@0` to
//! `@7` in it stand for the ids of the host's VMs, in order, and `@t` for the newest task's id, so
//! mutations reach real VMs), then that token line when bits 3-5 say so, then the body.
//!
//! The host is a real one in a scratch directory, with two VMs made through the API at the start; the engine
//! binary does not exist and `passt` is not on the PATH, so starting a VM goes as far as spawning them and
//! fails with its reason, as on a host without them. Every 1000 inputs the host is made anew (what the
//! inputs created would otherwise pile up).
#![no_main]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, header};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use porthole_api::Role;
use portholed::server::Peer;
use tower::ServiceExt;

/// Inputs served by one host before it is made anew.
const INPUTS_PER_HOST: u32 = 1000;
/// The most of a response read (a serial stream never ends by itself).
const BODY_READ_LIMIT: usize = 1 << 20;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    app: Arc<portholed::server::App>,
    admin: String,
    viewer: String,
    dir: PathBuf,
    served: u32,
}

static FIXTURE: Mutex<Option<Fixture>> = Mutex::new(None);
static GENERATION: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn scratch_root() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    base.join(format!("porthole-fuzz-api-{}", std::process::id()))
}

extern "C" fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch_root());
}

impl Fixture {
    fn new() -> Fixture {
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if generation == 0 {
            // SAFETY: registers a function that takes nothing and only removes a directory.
            unsafe { libc::atexit(remove_scratch) };
            // Nothing the inputs start may find passt: a VM's card then fails with its reason.
            // SAFETY: set once, before any other thread of ours exists.
            unsafe { std::env::set_var("PATH", "/nonexistent") };
        }
        let dir = scratch_root().join(generation.to_string());
        let (data, run) = (dir.join("data"), dir.join("run"));
        std::fs::create_dir_all(&data).expect("scratch data dir");
        std::fs::create_dir_all(&run).expect("scratch runtime dir");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let host = portholed::host::Host::open(&data, &run, dir.join("no-porthole-vmm")).expect("host opens");
        let tokens = Arc::new(portholed::auth::Tokens::new(&data));
        let admin = tokens.create("fuzz-admin", Role::Admin, BTreeSet::new()).expect("admin token");
        let stats = Arc::new(portholed::stats::Stats::default());
        let mut app = portholed::server::App::new(host, tokens.clone(), stats, data, 64 * 1024, Duration::from_secs(5));
        // libosinfo's database, parsed once for every host (a few MB of XML: seconds under AddressSanitizer).
        static OSINFO: std::sync::OnceLock<Arc<portholed::osinfo::Osinfo>> = std::sync::OnceLock::new();
        let osinfo = OSINFO.get_or_init(|| {
            let osinfo = Arc::new(portholed::osinfo::Osinfo::from_env());
            let _ = osinfo.db();
            osinfo
        });
        Arc::get_mut(&mut app).expect("a new App has one owner").osinfo = osinfo.clone();
        let router = portholed::server::router(app.clone());
        let mut f = Fixture { runtime, router, app, admin, viewer: String::new(), dir, served: 0 };
        for (name, disk) in [("fuzz0", 1), ("fuzz1", 0)] {
            let body = format!(r#"{{"name":"{name}","vcpus":1,"memory_mib":64,"disk_gib":{disk},"nics":[]}}"#);
            f.call(Method::POST, "/api/v1/vms", Caller::Owner, "", body.into_bytes(), false);
        }
        let first = f.app.host.list().into_iter().next().map(|vm| vm.id).into_iter().collect();
        f.viewer = tokens.create("fuzz-viewer", Role::Viewer, first).expect("viewer token");
        f
    }

    /// The id of the newest task the host lists, asked through the API as a client would.
    fn newest_task(&mut self) -> Option<String> {
        let request = Request::get("/api/v1/tasks").body(Body::empty()).ok()?;
        let request = with_peer(request, Peer::Unix { uid: Some(my_uid()) });
        let router = self.router.clone();
        let body = self.runtime.block_on(async move {
            let Ok(response) = router.oneshot(request).await;
            response.into_body().collect().await.ok().map(|b| b.to_bytes())
        })?;
        let tasks: Vec<porthole_api::Task> = serde_json::from_slice(&body).ok()?;
        tasks.into_iter().max_by_key(|t| t.started_ms).map(|t| t.id)
    }

    fn call(&mut self, method: Method, path: &str, caller: Caller, token: &str, body: Vec<u8>, octets: bool) {
        let mut path = path.to_owned();
        if path.contains('@') {
            let vms = self.app.host.list();
            for (i, vm) in vms.iter().enumerate().take(8) {
                path = path.replace(&format!("@{i}"), &vm.id);
            }
            if path.contains("@t")
                && let Some(task) = self.newest_task()
            {
                path = path.replace("@t", &task);
            }
        }
        let Ok(request) = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, if octets { "application/octet-stream" } else { "application/json" })
            .body(Body::from(body))
        else {
            return; // Not a URI: hyper refuses it before any route sees it.
        };
        let tcp: SocketAddr = ([127, 0, 0, 1], 40000).into();
        let (peer, bearer) = match caller {
            Caller::Owner => (Peer::Unix { uid: Some(my_uid()) }, None),
            Caller::OtherUser => (Peer::Unix { uid: Some(my_uid().wrapping_add(1)) }, None),
            Caller::Admin => (Peer::Tcp(tcp), Some(self.admin.clone())),
            Caller::Viewer => (Peer::Tcp(tcp), Some(self.viewer.clone())),
            Caller::NoToken => (Peer::Tcp(tcp), None),
            Caller::Token => (Peer::Tcp(tcp), Some(token.to_owned())),
        };
        let mut request = with_peer(request, peer);
        if let Some(bearer) = bearer
            && let Ok(value) = format!("Bearer {bearer}").parse()
        {
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let router = self.router.clone();
        self.runtime.block_on(async move {
            let Ok(response) = router.oneshot(request).await;
            // Read what comes within a moment, up to a limit: the serial stream follows the log forever.
            let mut body = response.into_body();
            let mut read = 0usize;
            let _ = tokio::time::timeout(Duration::from_millis(20), async {
                while read < BODY_READ_LIMIT {
                    match body.frame().await {
                        Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                        _ => break,
                    }
                }
            })
            .await;
        });
    }
}

fn my_uid() -> u32 {
    // SAFETY: getuid has no arguments and cannot fail.
    unsafe { libc::getuid() }
}

/// `request` as the daemon's listeners hand it to the router: with where it came from.
fn with_peer(mut request: Request<Body>, peer: Peer) -> Request<Body> {
    request.extensions_mut().insert(ConnectInfo(peer));
    request
}

#[derive(Clone, Copy)]
enum Caller {
    Owner,
    OtherUser,
    Admin,
    Viewer,
    NoToken,
    Token,
}

fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

fuzz_target!(init: {
    // The first host (and the osinfo database) before the first input, outside its time limit.
    *FIXTURE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Fixture::new());
}, |data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else { return };
    let method = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::GET,
    ][usize::from(head & 7)]
    .clone();
    let caller = [
        Caller::Owner,
        Caller::OtherUser,
        Caller::Admin,
        Caller::Viewer,
        Caller::NoToken,
        Caller::Token,
        Caller::Owner,
        Caller::Admin,
    ][usize::from((head >> 3) & 7)];
    let octets = head & 0x40 != 0;
    let (path, rest) = split_line(rest);
    let (token, body) = if matches!(caller, Caller::Token) { split_line(rest) } else { (&[][..], rest) };
    let path = String::from_utf8_lossy(path);
    let token = String::from_utf8_lossy(token);

    let mut fixture = FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    if fixture.as_ref().is_none_or(|f| f.served >= INPUTS_PER_HOST) {
        if let Some(Fixture { runtime, dir, .. }) = fixture.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
            let _ = std::fs::remove_dir_all(dir);
        }
        *fixture = Some(Fixture::new());
    }
    let f = fixture.as_mut().expect("made above");
    f.served += 1;
    f.call(method, &path, caller, &token, body.to_vec(), octets);
});

//! libvirt hosts behind Porthole's host interface ([`porthole_api::Host`]).
//!
//! A [`LibvirtHost`] is one libvirt connection (`qemu:///system`, `qemu:///session`,
//! `qemu+ssh://user@host[:port]/system`, `qemu+libssh://…`, `qemu+tls://host/system`, with libvirt's own URI
//! parameters such as `socket=`, `keyfile=`, `known_hosts=`) whose domains the window shows like Porthole VMs:
//!
//! - A VM's id is its domain's UUID; its state maps libvirt's (running, paused, shut off — `suspended` with a
//!   managed save —, crashed, being shut down). Its disk size is the first disk's capacity, its media the
//!   CD-ROM's file name (an image in the library).
//! - The library is the storage pool `default` (created as a directory pool when missing): its volumes that
//!   no domain uses as a disk are the images; uploads go through `virStorageVolUpload`.
//! - New VMs get a qcow2 (or raw) volume in that pool, a CD-ROM, VNC graphics on 127.0.0.1 (never on the
//!   network), and the `default` network when it is active (user-mode networking on session connections,
//!   none otherwise, said in the description). KVM when the host offers it, else QEMU's TCG.
//! - Consoles: `virDomainOpenGraphicsFD` on local connections (the daemon hands us a socket already
//!   connected to QEMU's VNC server); over SSH an `ssh -W 127.0.0.1:PORT` child with the connection's key and
//!   known_hosts, whose stdin/stdout is one end of a socket pair. Over `qemu+tls://` (or `tcp`) there is
//!   neither: libvirt 9.0 passes no descriptors over TCP ("Receiving file descriptors is not supported on
//!   this socket", and the daemon drops the connection after trying), and the VNC port listens on the
//!   host's 127.0.0.1, so the console says to use `qemu+ssh://` without trying.
//! - Domain events (`virConnectDomainEventRegisterAny`: lifecycle and definition changes) bump
//!   [`LibvirtHost::changes`], so the window refreshes when something happened, and mark the domain dirty:
//!   a refresh reads every domain's state in one `virConnectGetAllDomainStats` call and re-reads the XML of
//!   new, dirty or changed-state domains only (of every domain without events or after a reconnection).
//!   [`LibvirtHost::calls`] counts the libvirt calls made.
//! - Samples: one thread per host calls `virConnectGetAllDomainStats` every second and keeps an hour.
//! - Waits libvirt does not track (a shutdown with its time-out) are tasks kept in this process.
//! - Every libvirt call runs on tokio's blocking pool and is bounded in time; the connection has libvirt's
//!   keepalive, and a dead connection (the daemon stopped, the network gone) is reopened on the next call.
//!
//! Prefer `qemu+ssh://`: libvirt 9.0's `libssh` transport crashes (SIGSEGV in g_main_loop_quit under
//! virNetClientSendWithReply) or, without an event loop, hangs on large replies such as the states of 200
//! domains; small replies work.
//!
//! libvirt's `ssh` transport runs the `ssh` binary, which checks the user's `~/.ssh/known_hosts`; the
//! `libssh` transport honours `known_hosts=` and `keyfile=`. Either way an unknown host key is refused:
//! [`ssh_host_key_fingerprint`] gives what to show the user and [`trust_host_key`] records their yes.

/// Counts one call to the daemon on the host whose work this thread does, then makes it.
macro_rules! rpc {
    ($e:expr) => {{
        $crate::count();
        $e
    }};
}

mod events;
mod serial;
pub mod ssh;
mod stats;
mod xml;

use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use porthole_api::host::Progress;
use porthole_api::{
    Action, AgentMode, BootDevice, BootSpec, CreateVm, DiskFormat, DiskLimits, DriveInfo, DriveKind, Feature, Host,
    HostError, HostInfo, HostKind, Image, ImageFormat, InputMode, Snapshot, SnapshotTree, SoundMode, Stats,
    TakeSnapshot, Task, TaskState, VgaMode, Vm, VmState,
};
use sha2::Digest;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

pub use ssh::{
    ConnUri, HostKey, HostKeyCheck, check_host_key, default_known_hosts, ssh_host_key_fingerprint, trust_host_key,
};
use xml::{Node, esc};

/// The longest a libvirt call may take before the caller gets an error (the call itself is left to finish
/// or fail on its own thread).
pub const CALL_LIMIT: Duration = Duration::from_secs(60);
/// The pool holding the library and new VMs' disks.
pub const POOL: &str = "default";
/// The XML namespace of Porthole's metadata in domains it created.
pub const METADATA_NS: &str = "https://porthole.invalid/libvirt/1";
/// libvirt keepalive: a probe every 5 s, the connection dead after 3 unanswered.
const KEEPALIVE: (i32, u32) = (5, 3);
/// How long a console tunnel may take to bring the VNC server's first bytes.
const TUNNEL_WAIT: Duration = Duration::from_secs(20);
/// Upload chunk size.
const CHUNK: usize = 1 << 20;
/// Finished tasks kept for `task()`.
const KEEP_TASKS: usize = 100;

fn failed(what: impl std::fmt::Display) -> impl FnOnce(virt::error::Error) -> HostError {
    move |e| HostError::Failed(format!("{what}: {}", e.message()))
}

fn xml_failed(what: &str) -> impl FnOnce(String) -> HostError + '_ {
    move |e| HostError::Failed(format!("{what}: {e}"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// The call counter of the host this thread works for (set by [`Counting`]).
    static COUNTER: std::cell::RefCell<Option<Arc<AtomicU64>>> = const { std::cell::RefCell::new(None) };
}

/// Counts one libvirt call that may go to the daemon (everything but reading a handle's name or UUID).
pub(crate) fn count() {
    COUNTER.with(|c| {
        if let Some(c) = c.borrow().as_ref() {
            c.fetch_add(1, Ordering::Relaxed);
        }
    });
}

/// While alive, this thread's libvirt calls count on `calls`.
struct Counting(Option<Arc<AtomicU64>>);

impl Counting {
    fn on(calls: &Arc<AtomicU64>) -> Counting {
        Counting(COUNTER.with(|c| c.replace(Some(calls.clone()))))
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        let before = self.0.take();
        COUNTER.with(|c| *c.borrow_mut() = before);
    }
}

/// libvirt's default event loop, which keepalive needs: registered once, run on its own thread.
fn event_loop() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        virt::error::clear_error_callback();
        if virt::event::event_register_default_impl().is_ok() {
            let _ = std::thread::Builder::new().name("libvirt-events".into()).spawn(|| {
                loop {
                    if virt::event::event_run_default_impl().is_err() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        }
    });
}

/// The URI libvirt is given: the user's, with `no_tty=1` on the `ssh` transport so `ssh` never waits for a
/// password or a host-key answer on a terminal.
fn effective_uri(uri: &str, parsed: &ConnUri) -> String {
    if parsed.transport == "ssh" && parsed.param("no_tty").is_none() {
        let sep = if uri.contains('?') { '&' } else { '?' };
        format!("{uri}{sep}no_tty=1")
    } else {
        uri.to_string()
    }
}

/// What to do about a failed `qemu+tls://` connection, from libvirt 9.0's message.
fn tls_hint(why: &str) -> &'static str {
    if why.contains("Cannot read CA certificate") || why.contains("Cannot read certificate") {
        " — a TLS connection needs cacert.pem, clientcert.pem and clientkey.pem in the folder named by \
         pkipath= (without it: ~/.pki/libvirt, or /etc/pki for root)"
    } else if why.contains("Our own certificate") {
        " — this client's certificate is not signed by the CA in cacert.pem"
    } else if why.contains("verify peer's certificate") {
        " — the host's certificate is not signed by the CA in cacert.pem"
    } else if why.contains("TLS confirmation") {
        " — the host refused this client's certificate (not signed by its CA, or not on its tls_allowed_dn_list)"
    } else {
        ""
    }
}

fn open(uri: &str, parsed: &ConnUri) -> Result<Connect, HostError> {
    event_loop();
    let conn = rpc!(Connect::open(Some(&effective_uri(uri, parsed)))).map_err(|e| {
        let why = e.message();
        // libvirt not installed or not running here: say what to do, not only which socket was missing.
        let hint = if parsed.is_local() && why.contains("Failed to connect socket") {
            " — libvirt is not running on this computer (Debian: apt install libvirt-daemon-system; Fedora: \
             dnf install libvirt-daemon; then start libvirtd or virtqemud)"
        } else if parsed.transport == "tls" {
            tls_hint(why)
        } else {
            ""
        };
        HostError::Failed(format!("cannot connect to {uri}: {why}{hint}"))
    })?;
    if let Err(e) = rpc!(conn.set_keep_alive(KEEPALIVE.0, KEEPALIVE.1)) {
        log::debug!("{uri}: no keepalive: {}", e.message());
    }
    Ok(conn)
}

struct TaskEntry {
    task: Task,
    cancel: Arc<AtomicBool>,
}

/// What `host()` reads once per connection.
#[derive(Clone)]
struct HostStatic {
    hostname: String,
    version: String,
    cpus: u32,
    memory_mib: u64,
    cpu_model: String,
}

/// What `host()` re-reads at most every [`HOST_TTL`]: free memory and the pool's space.
#[derive(Clone, Default)]
struct HostDynamic {
    memory_available_mib: u64,
    free_disk_bytes: u64,
    disk_total_bytes: u64,
    data_dir: String,
    problems: Vec<String>,
}

/// How long `host()` keeps the host's free memory and the pool's free space before reading one of them again
/// (an event, or a change Porthole made, has both read at once).
const HOST_TTL: Duration = Duration::from_secs(30);
/// How often the window refreshes a libvirt host and its sampler reads the running domains' statistics:
/// virt-manager's default (its `stats.update-interval`, 3 s), so the window asks a libvirt daemon no more
/// than virt-manager does. Domain events still show changes at once.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3);
/// The sampler's period.
const SAMPLE_EVERY: Duration = REFRESH_EVERY;

struct Inner {
    uri: String,
    parsed: ConnUri,
    conn: Mutex<Option<Connect>>,
    /// Events: the window's change counter, dirty definitions, the state readings' generation.
    watch: Arc<events::Watch>,
    /// libvirt calls made for this host (every call that may reach the daemon).
    calls: Arc<AtomicU64>,
    history: Mutex<stats::History>,
    /// The latest reading of every domain's state and counters, with the event generation before it.
    reading: Mutex<Option<(u64, Arc<stats::Reading>)>>,
    /// Held while a reading is taken, so concurrent callers share one.
    reading_call: Mutex<()>,
    /// The sampler's latest reading of the running domains (their disks' sizes, memory).
    sample: Mutex<Option<Arc<stats::Reading>>>,
    /// Parsed definitions by domain UUID (held while `list_vms` refreshes them).
    defs: Mutex<Defs>,
    /// Off: every `list_vms` re-reads every domain's definition (as without events).
    cache_off: AtomicBool,
    host_static: Mutex<Option<HostStatic>>,
    /// When it was read, at which event generation, what.
    host_dynamic: Mutex<Option<(std::time::Instant, u64, HostDynamic)>>,
    /// Which of the host's free memory and the pool's space the next [`HOST_TTL`] re-read takes (true: the pool).
    pool_turn: AtomicBool,
    /// The library pool's handle, once found.
    pool: Mutex<Option<StoragePool>>,
    tasks: Mutex<Vec<TaskEntry>>,
    next_task: AtomicU64,
    /// The serial consoles opened so far.
    serials: serial::SerialTaps,
}

impl Inner {
    /// The open connection, reopened when it died.
    fn conn(&self) -> Result<Connect, HostError> {
        let mut slot = lock(&self.conn);
        if let Some(c) = slot.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
            log::info!("{}: the connection died; reconnecting", self.uri);
        }
        *slot = None;
        let c = open(&self.uri, &self.parsed)?;
        self.forget_cached();
        self.watch(&c);
        // Anything may have changed while the connection was down.
        self.watch.bump();
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drops everything read on an earlier connection.
    fn forget_cached(&self) {
        self.watch.touch(None);
        *lock(&self.reading) = None;
        *lock(&self.sample) = None;
        *lock(&self.host_static) = None;
        *lock(&self.host_dynamic) = None;
        *lock(&self.pool) = None;
    }

    /// Registers for `conn`'s domain events (without them the window polls and every refresh re-reads
    /// every domain, as before).
    fn watch(&self, conn: &Connect) {
        if let Err(e) = events::register(conn, &self.watch) {
            log::info!("{}: no domain events: {}", self.uri, e.message());
        }
    }

    /// Whether the last state reading (a refresh's), still current by events, has no domain running: then
    /// the sampler has nothing to ask.
    fn none_running(&self) -> bool {
        let trusted = self.watch.live() && !self.cache_off.load(Ordering::SeqCst);
        lock(&self.reading).as_ref().is_some_and(|(generation, r)| {
            trusted
                && *generation == self.watch.generation()
                && r.domains.iter().all(|d| matches!(d.state, sys::VIR_DOMAIN_SHUTOFF | sys::VIR_DOMAIN_NOSTATE))
        })
    }

    /// The open connection if it is alive (the sampler never reconnects).
    fn live_conn(&self) -> Option<Connect> {
        lock(&self.conn).as_ref().filter(|c| c.is_alive().unwrap_or(false)).cloned()
    }

    /// A reading of every domain's state answered after `asked` (one `virConnectGetAllDomainStats`): the one
    /// a concurrent caller had under way when this one asked (the window asks for `host()` and `list_vms()`
    /// at once: they share it), unless an event came meanwhile, or a new one. An older reading is never
    /// served: every refresh asks the daemon, so a daemon that went away is an error at once, not a stale
    /// list.
    fn reading(&self, conn: &Connect, asked: std::time::Instant) -> Result<Arc<stats::Reading>, HostError> {
        let _one = lock(&self.reading_call);
        if let Some((generation, r)) = lock(&self.reading).as_ref()
            && *generation == self.watch.generation()
            && r.finished >= asked
        {
            return Ok(r.clone());
        }
        let generation = self.watch.generation();
        let r =
            Arc::new(stats::read(conn, stats::Kind::States, now_ms()).map_err(failed("reading the domains' states"))?);
        *lock(&self.reading) = Some((generation, r.clone()));
        Ok(r)
    }
}

/// A libvirt connection as a Porthole host. Cheap to clone (one connection, shared).
#[derive(Clone)]
pub struct LibvirtHost {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LibvirtHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtHost").field("uri", &self.inner.uri).finish()
    }
}

impl LibvirtHost {
    /// Opens `uri` (blocking: on SSH this runs `ssh`) and starts the host's sampler. Errors say what was
    /// tried and libvirt's words ("cannot connect to qemu+ssh://u@h/system: …").
    pub fn connect(uri: &str) -> Result<LibvirtHost, HostError> {
        let parsed = ConnUri::parse(uri).map_err(HostError::Failed)?;
        if parsed.driver != "qemu" {
            return Err(HostError::Failed(format!(
                "cannot connect to {uri}: Porthole speaks to libvirt's QEMU driver only (qemu://, qemu+ssh://, …)"
            )));
        }
        let calls = Arc::new(AtomicU64::new(0));
        let conn = {
            let _counting = Counting::on(&calls);
            open(uri, &parsed)?
        };
        let inner = Arc::new(Inner {
            uri: uri.to_string(),
            parsed,
            conn: Mutex::new(None),
            watch: Arc::new(events::Watch::new()),
            calls,
            history: Mutex::new(stats::History::default()),
            reading: Mutex::new(None),
            reading_call: Mutex::new(()),
            sample: Mutex::new(None),
            defs: Mutex::new(std::collections::HashMap::new()),
            cache_off: AtomicBool::new(false),
            host_static: Mutex::new(None),
            host_dynamic: Mutex::new(None),
            pool_turn: AtomicBool::new(false),
            pool: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            next_task: AtomicU64::new(1),
            serials: serial::SerialTaps::default(),
        });
        {
            let _counting = Counting::on(&inner.calls);
            inner.watch(&conn);
        }
        *lock(&inner.conn) = Some(conn);
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("libvirt-stats".into())
            .spawn(move || sampler(weak))
            .map_err(|e| HostError::Failed(format!("cannot start the sampler thread: {e}")))?;
        Ok(LibvirtHost { inner })
    }

    /// [`LibvirtHost::connect`] off the async runtime's threads, bounded by [`CALL_LIMIT`].
    pub async fn connect_async(uri: &str) -> Result<LibvirtHost, HostError> {
        let owned = uri.to_string();
        let job = tokio::task::spawn_blocking(move || LibvirtHost::connect(&owned));
        match tokio::time::timeout(CALL_LIMIT, job).await {
            Ok(joined) => joined.map_err(|e| HostError::Failed(format!("cannot connect to {uri}: {e}")))?,
            Err(_) => {
                Err(HostError::Failed(format!("cannot connect to {uri}: no answer within {} s", CALL_LIMIT.as_secs())))
            }
        }
    }

    /// A counter bumped whenever libvirt reports a domain's lifecycle event (defined, undefined, started,
    /// stopped, paused, resumed, crashed, saved) or a change of its definition (a device added or removed,
    /// media changed, a tray opened, metadata or tunables changed), and when the connection was reopened: the
    /// window refreshes on a change instead of polling.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch.changes.subscribe()
    }

    /// How many libvirt calls that may reach the daemon this host has made so far (every call of its own
    /// and of its sampler thread; reading a handle's name or UUID is not one). A benchmark's calls per
    /// refresh are the difference over a refresh.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// Whether this connection delivers the domain events the definition cache relies on (else every
    /// refresh re-reads every domain's XML).
    pub fn events_live(&self) -> bool {
        self.inner.watch.live()
    }

    /// Turns the definition cache off (every refresh re-reads every domain's XML, as when the connection has
    /// no events) or on again: for benchmarks that compare the two.
    pub fn set_definition_cache(&self, on: bool) {
        self.inner.cache_off.store(!on, Ordering::SeqCst);
    }

    /// Porthole itself changed `uuid` (its definition or state): the cache re-reads it, and no earlier
    /// state reading is used again.
    fn touched(&self, uuid: &str) {
        self.inner.watch.touch(Some(uuid));
    }

    /// The URI as the user gave it.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// Runs `f` with the connection on the blocking pool, bounded by [`CALL_LIMIT`].
    async fn call<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Connect) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, HostError> {
        self.call_for(what, Some(CALL_LIMIT), f).await
    }

    async fn call_for<T: Send + 'static>(
        &self,
        what: &str,
        limit: Option<Duration>,
        f: impl FnOnce(&Connect) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, HostError> {
        let inner = self.inner.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _counting = Counting::on(&inner.calls);
            let c = inner.conn()?;
            f(&c)
        });
        let joined = match limit {
            Some(limit) => match tokio::time::timeout(limit, job).await {
                Ok(j) => j,
                Err(_) => {
                    return Err(HostError::Failed(format!(
                        "{what}: {} did not answer within {} s",
                        self.inner.uri,
                        limit.as_secs()
                    )));
                }
            },
            None => job.await,
        };
        joined.map_err(|e| HostError::Failed(format!("{what}: {e}")))?
    }

    fn new_task(&self, what: String, cancellable: bool) -> (String, Arc<AtomicBool>) {
        let id = format!("libvirt-{}", self.inner.next_task.fetch_add(1, Ordering::Relaxed));
        let cancel = Arc::new(AtomicBool::new(false));
        let task = Task {
            id: id.clone(),
            what,
            state: TaskState::Running,
            cancellable,
            started_ms: now_ms(),
            ..Task::default()
        };
        let mut tasks = lock(&self.inner.tasks);
        if tasks.len() >= KEEP_TASKS
            && let Some(i) = tasks.iter().position(|t| t.task.state != TaskState::Running)
        {
            tasks.remove(i);
        }
        tasks.push(TaskEntry { task, cancel: cancel.clone() });
        (id, cancel)
    }

    fn update_task(&self, id: &str, f: impl FnOnce(&mut Task)) -> Option<Task> {
        let mut tasks = lock(&self.inner.tasks);
        let entry = tasks.iter_mut().find(|t| t.task.id == id)?;
        f(&mut entry.task);
        Some(entry.task.clone())
    }

    fn task_now(&self, id: &str) -> Result<Task, HostError> {
        lock(&self.inner.tasks)
            .iter()
            .find(|t| t.task.id == id)
            .map(|t| t.task.clone())
            .ok_or_else(|| HostError::Failed(format!("no task {id} on {}", self.inner.uri)))
    }

    /// A task that is over already (libvirt's call returned when the work was done).
    fn done_task(&self, what: String, result: Option<String>) -> Task {
        let (id, _) = self.new_task(what, false);
        self.update_task(&id, |t| {
            t.state = TaskState::Done;
            t.done = 1;
            t.total = 1;
            t.result = result;
        })
        .unwrap_or_default()
    }
}

/// Reads every running domain's counters every [`SAMPLE_EVERY`] (one `virConnectGetAllDomainStats`) into
/// the history. Apart from the refreshes' state readings: asking QEMU for block and balloon figures takes
/// milliseconds per running guest, which a refresh should not wait for.
fn sampler(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(SAMPLE_EVERY);
        let Some(inner) = inner.upgrade() else { return };
        let _counting = Counting::on(&inner.calls);
        let Some(conn) = inner.live_conn() else { continue };
        if inner.none_running() {
            continue;
        }
        // Two calls a period, as virt-manager's tick: in a period whose refresh re-read the host's memory or
        // pool (one of them every HOST_TTL), the sample is skipped (the graphs then have one point 2 periods
        // apart).
        if lock(&inner.host_dynamic).as_ref().is_some_and(|(t, _, _)| t.elapsed() < SAMPLE_EVERY) {
            continue;
        }
        match stats::read(&conn, stats::Kind::Samples, now_ms()) {
            Ok(r) => {
                lock(&inner.history).record(r.counters());
                *lock(&inner.sample) = Some(Arc::new(r));
            }
            Err(e) => log::debug!("{}: stats: {}", inner.uri, e.message()),
        }
    }
}

// ---- domains ----

fn find_domain(conn: &Connect, id: &str) -> Result<Domain, HostError> {
    rpc!(conn.lookup_domain_by_uuid_string(id))
        .or_else(|_| rpc!(conn.lookup_domain_by_name(id)))
        .map_err(|e| HostError::Failed(format!("no VM {id:?} on this libvirt host: {}", e.message())))
}

fn raw_state(state: virt::domain::DomainStateEnum) -> sys::virDomainState {
    use virt::enumutil::{Enum, RawEnum};
    match state {
        Enum::Known(k) => k.to_raw(),
        Enum::Unknown(u) => u,
    }
}

fn vm_state(state: sys::virDomainState, managed_save: bool) -> VmState {
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => VmState::Running,
        sys::VIR_DOMAIN_PAUSED | sys::VIR_DOMAIN_PMSUSPENDED => VmState::Paused,
        sys::VIR_DOMAIN_SHUTDOWN => VmState::Stopping,
        sys::VIR_DOMAIN_CRASHED => VmState::Crashed,
        sys::VIR_DOMAIN_SHUTOFF if managed_save => VmState::Suspended,
        _ => VmState::Stopped,
    }
}

fn file_name(path: &str) -> String {
    Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.to_string())
}

/// The source file of a `<disk>`.
fn disk_source(disk: &Node) -> Option<&str> {
    disk.child("source").and_then(|s| s.attr("file").or_else(|| s.attr("dev")).or_else(|| s.attr("volume")))
}

fn disks<'a>(doc: &'a Node, device: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
    doc.child("devices").into_iter().flat_map(move |d| d.all("disk")).filter(move |d| d.attr("device") == Some(device))
}

/// Porthole's metadata in a domain it created: its disk volumes' paths and tags.
/// A domain's vCPUs now and, when it has room for more, its maximum: `<vcpu current="N">MAX</vcpu>` (libvirt
/// hot-adds within it).
fn vcpu_counts(doc: &Node) -> (u32, Option<u32>) {
    let vcpu = doc.child("vcpu");
    let max: Option<u32> = vcpu.and_then(|v| v.text.trim().parse().ok());
    let now = vcpu.and_then(|v| v.attr("current")).and_then(|c| c.parse().ok()).or(max).unwrap_or(1);
    (now, max.filter(|&m| m > now))
}

fn porthole_meta(doc: &Node) -> Option<&Node> {
    doc.child("metadata")?.children.iter().find(|n| n.name == "vm" && n.attrs.iter().any(|(_, v)| v == METADATA_NS))
}

fn kib_to_mib(node: Option<&Node>) -> u64 {
    let Some(n) = node else { return 0 };
    let v: u64 = n.text.trim().parse().unwrap_or(0);
    match n.attr("unit").unwrap_or("KiB") {
        "b" | "bytes" => v >> 20,
        "KiB" | "k" => v >> 10,
        "MiB" | "M" => v,
        "GiB" | "G" => v << 10,
        _ => v >> 10,
    }
}

fn vm_of(conn: &Connect, dom: &Domain) -> Result<Vm, HostError> {
    let state = raw_state(rpc!(dom.state()).map_err(failed("reading a domain's state"))?.0);
    Ok(read_def(conn, dom, state)?.vm(state, &[]))
}

/// The definition cache: domain UUID → what was read of its XML.
type Defs = std::collections::HashMap<String, Def>;

/// What the cache keeps of a domain: the VM as its XML describes it (with its disks' sizes, whether it has
/// a managed save and starts with the host), re-read only when an event says it changed.
#[derive(Clone)]
struct Def {
    vm: Vm,
    /// The target device of each disk (`drives[i]` for `i` < this length) and its allocation when read.
    disk_targets: Vec<String>,
    disk_alloc: Vec<u64>,
    managed_save: bool,
    /// The files (or volumes' paths) of its disks and of its CD/DVD drives' media, for the library's
    /// "used by" without reading every domain's XML again.
    disk_paths: Vec<String>,
    cdrom_paths: Vec<String>,
    /// The state the definition was read in (the live XML of a running domain, the inactive one of a
    /// stopped one).
    active: bool,
}

impl Def {
    /// The VM in `state`, its disks' sizes from `blocks` where the daemon reported them.
    fn vm(&self, state: u32, blocks: &[stats::Block]) -> Vm {
        let mut vm = self.vm.clone();
        vm.state = vm_state(state, self.managed_save && state == sys::VIR_DOMAIN_SHUTOFF);
        let mut allocated = 0;
        for (i, (target, def_alloc)) in self.disk_targets.iter().zip(&self.disk_alloc).enumerate() {
            let drive = &mut vm.drives[i];
            match blocks.iter().find(|b| &b.name == target && b.capacity > 0) {
                Some(b) => {
                    drive.size_bytes = b.capacity;
                    allocated += b.allocation;
                }
                None => allocated += def_alloc,
            }
            if i == 0 {
                vm.disk_bytes = drive.size_bytes;
            }
        }
        vm.disk_allocated_bytes = allocated;
        vm
    }
}

/// Reads `dom`'s definition (its XML, its disks' sizes, managed save, autostart); `state` is its present
/// state.
fn read_def(conn: &Connect, dom: &Domain, state: u32) -> Result<Def, HostError> {
    let text = rpc!(dom.xml_desc(0)).map_err(failed("reading a domain's XML"))?;
    let doc = Node::parse(&text).map_err(xml_failed("reading a domain's XML"))?;
    let managed = state == sys::VIR_DOMAIN_SHUTOFF && rpc!(dom.has_managed_save(0)).unwrap_or(false);
    let name = doc.text_at(&["name"]).unwrap_or_default().to_string();
    let id = doc.text_at(&["uuid"]).map(str::to_string).unwrap_or_else(|| dom.uuid_string().unwrap_or_default());
    let (mut disk_targets, mut disk_alloc) = (Vec::new(), Vec::new());
    let mut drives = Vec::new();
    let mut disk_bytes = 0;
    let mut disk_format = None;
    let mut disk_allocated_bytes = 0;
    for (i, d) in disks(&doc, "disk").enumerate() {
        let target = d.child("target").and_then(|t| t.attr("dev")).unwrap_or_default();
        disk_targets.push(target.to_string());
        let (mut size, mut alloc) = (0, 0);
        if let Ok(b) = rpc!(dom.block_info(target, 0)) {
            (size, alloc) = (b.capacity, b.allocation);
        } else if let Some(vol) = disk_source(d).and_then(|p| rpc!(conn.lookup_storage_vol_by_path(p)).ok())
            && let Ok(info) = rpc!(vol.info())
        {
            (size, alloc) = (info.capacity, info.allocation);
        }
        disk_alloc.push(alloc);
        let format = match d.child("driver").and_then(|x| x.attr("type")) {
            Some("qcow2") => Some(DiskFormat::Qcow2),
            Some("raw") => Some(DiskFormat::Raw),
            _ => None,
        };
        if i == 0 {
            disk_bytes = size;
            disk_format = format;
        }
        disk_allocated_bytes += alloc;
        drives.push(DriveInfo {
            id: format!("disk{i}"),
            kind: DriveKind::Disk,
            bus: d.child("target").and_then(|t| t.attr("bus")).unwrap_or_default().to_string(),
            format,
            size_bytes: size,
            media: None,
            read_only: d.child("readonly").is_some(),
            limits: DiskLimits::default(),
        });
    }
    let mut media = None;
    for (i, d) in disks(&doc, "cdrom").enumerate() {
        let m = disk_source(d).map(file_name);
        if i == 0 {
            media = m.clone();
        }
        drives.push(DriveInfo {
            id: format!("cdrom{i}"),
            kind: DriveKind::Cdrom,
            bus: d.child("target").and_then(|t| t.attr("bus")).unwrap_or_default().to_string(),
            format: None,
            size_bytes: 0,
            media: m,
            read_only: true,
            limits: DiskLimits::default(),
        });
    }
    let os = doc.child("os");
    let boot = os.and_then(|o| o.text_at(&["kernel"])).filter(|k| !k.is_empty()).map(|k| BootSpec {
        kernel: k.to_string(),
        initrd: os.and_then(|o| o.text_at(&["initrd"])).filter(|s| !s.is_empty()).map(str::to_string),
        cmdline: os.and_then(|o| o.text_at(&["cmdline"])).unwrap_or_default().to_string(),
    });
    let boot_order: Vec<BootDevice> = os
        .map(|o| {
            o.all("boot")
                .filter_map(|b| match b.attr("dev") {
                    Some("cdrom") => Some(BootDevice::Cdrom),
                    Some("hd") => Some(BootDevice::Disk),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let tags =
        porthole_meta(&doc).map(|m| m.all("tag").map(|t| t.text.trim().to_string()).collect()).unwrap_or_default();
    let (vcpus, max_vcpus) = vcpu_counts(&doc);
    let vm = Vm {
        id,
        name,
        vcpus,
        max_vcpus,
        memory_mib: kib_to_mib(doc.child("memory")),
        disk_bytes,
        boot,
        media,
        state: vm_state(state, managed),
        last_exit: None,
        crash: None,
        uptime_s: None,
        tags,
        boot_status: None,
        input: InputMode::Ps2,
        // libvirt's virtio video model is virtio-vga (with a VGA) or virtio-gpu-pci.
        vga: match doc.at(&["devices", "video", "model"]).and_then(|m| m.attr("type")) {
            Some("virtio") => VgaMode::Virtio,
            _ => VgaMode::Std,
        },
        // The SPICE agent's port: a spicevmc or qemu-vdagent channel (or any chardev) by its name.
        agent: match doc.child("devices").is_some_and(|d| {
            d.all("channel")
                .any(|c| c.child("target").and_then(|t| t.attr("name")) == Some(porthole_api::SPICE_AGENT_PORT))
        }) {
            true => AgentMode::Spice,
            false => AgentMode::None,
        },
        // The domain's first sound card: Intel HD Audio (ich6, ich7, ich9) or virtio; older models (ac97,
        // es1370, sb16...) have no Porthole name and read as none.
        sound: match doc.child("devices").and_then(|d| d.all("sound").next()).and_then(|s| s.attr("model")) {
            Some("ich6" | "ich7" | "ich9") => SoundMode::Hda,
            Some("virtio") => SoundMode::Virtio,
            _ => SoundMode::None,
        },
        agent_connected: None,
        display_follows: None,
        absolute_pointer: None,
        virtio_keyboard: None,
        keyboard_leds: None,
        balloon: doc.at(&["devices", "memballoon"]).is_some_and(|b| b.attr("model") != Some("none")),
        memory_balloon: None,
        cpu_cap_percent: None,
        cpu_weight: None,
        cpu_limits: None,
        nics: Vec::new(),
        nic_status: Vec::new(),
        nic_status_error: None,
        disk_format,
        disk_allocated_bytes,
        template: false,
        linked_to: None,
        cloud_init: None,
        description: doc.text_at(&["description"]).unwrap_or_default().to_string(),
        autostart: rpc!(dom.autostart()).unwrap_or(false),
        boot_order: if boot_order.is_empty() { porthole_api::default_boot_order() } else { boot_order },
        boot_menu: os.and_then(|o| o.child("bootmenu")).is_some_and(|b| b.attr("enable") == Some("yes")),
        display: None,
        drives,
        pending_changes: Vec::new(),
        pending: None,
    };
    let disk_paths = disks(&doc, "disk").filter_map(disk_source).map(str::to_string).collect();
    let cdrom_paths = disks(&doc, "cdrom").filter_map(disk_source).map(str::to_string).collect();
    Ok(Def {
        vm,
        disk_targets,
        disk_alloc,
        managed_save: managed,
        disk_paths,
        cdrom_paths,
        active: state != sys::VIR_DOMAIN_SHUTOFF,
    })
}

// ---- storage ----

/// The library pool, defined (a directory pool under the daemon's images directory) and started if needed.
fn pool(conn: &Connect, parsed: &ConnUri) -> Result<StoragePool, HostError> {
    let pool = match rpc!(conn.lookup_storage_pool_by_name(POOL)) {
        Ok(p) => p,
        Err(_) => {
            let dir = default_images_dir(parsed)?;
            let xml = format!("<pool type='dir'><name>{POOL}</name><target><path>{}</path></target></pool>", esc(&dir));
            let p = conn
                .define_storage_pool_xml(&xml, 0)
                .map_err(failed(format!("defining storage pool {POOL:?} at {dir}")))?;
            rpc!(p.build(0)).map_err(failed(format!("creating the directory of storage pool {POOL:?} ({dir})")))?;
            let _ = rpc!(p.set_autostart(true));
            p
        }
    };
    if !rpc!(pool.is_active()).unwrap_or(false) {
        rpc!(pool.create(0)).map_err(failed(format!("starting storage pool {POOL:?}")))?;
    }
    Ok(pool)
}

/// Where libvirt keeps images by default: `/var/lib/libvirt/images` for a system daemon; for a session
/// daemon of this machine's user, `$XDG_DATA_HOME/libvirt/images`.
fn default_images_dir(parsed: &ConnUri) -> Result<String, HostError> {
    if parsed.path == "/system" {
        return Ok("/var/lib/libvirt/images".into());
    }
    if parsed.is_local() {
        let data = std::env::var("XDG_DATA_HOME")
            .ok()
            .filter(|d| !d.is_empty())
            .or_else(|| std::env::var("HOME").ok().map(|h| format!("{h}/.local/share")));
        if let Some(d) = data {
            return Ok(format!("{d}/libvirt/images"));
        }
    }
    Err(HostError::Failed(format!(
        "this libvirt host has no storage pool {POOL:?}, and Porthole cannot tell where a remote session \
         daemon keeps its images: define one (virsh pool-define-as {POOL} dir --target DIR)"
    )))
}

fn vol_format(vol: &StorageVol) -> Option<String> {
    let text = rpc!(vol.xml_desc(0)).ok()?;
    let doc = Node::parse(&text).ok()?;
    doc.at(&["target", "format"]).and_then(|f| f.attr("type")).map(str::to_string)
}

/// Every domain's XML document.
/// What the domains use of the pool: their disks' files, and which domains hold which media.
#[derive(Default)]
struct Uses {
    disks: std::collections::HashSet<String>,
    /// (media file, domain name).
    cdroms: Vec<(String, String)>,
}

impl Uses {
    /// From every domain's XML (a connection without the definition cache).
    fn read(conn: &Connect) -> Result<Uses, HostError> {
        let doms = rpc!(conn.list_all_domains(0)).map_err(failed("listing domains"))?;
        let mut uses = Uses::default();
        for doc in doms.iter().filter_map(|d| rpc!(d.xml_desc(0)).ok()).filter_map(|t| Node::parse(&t).ok()) {
            let name = doc.text_at(&["name"]).unwrap_or_default().to_string();
            uses.disks.extend(disks(&doc, "disk").filter_map(disk_source).map(str::to_string));
            uses.cdroms.extend(disks(&doc, "cdrom").filter_map(disk_source).map(|p| (p.to_string(), name.clone())));
        }
        Ok(uses)
    }

    /// From the definition cache, brought up to date the way a refresh does it (no XML read again unless an
    /// event or a change of Porthole's says so).
    fn cached(inner: &Inner, conn: &Connect) -> Result<Uses, HostError> {
        let (_, defs) = refreshed(inner, conn, std::time::Instant::now())?;
        let mut uses = Uses::default();
        for def in defs.values() {
            uses.disks.extend(def.disk_paths.iter().cloned());
            uses.cdroms.extend(def.cdrom_paths.iter().map(|p| (p.clone(), def.vm.name.clone())));
        }
        Ok(uses)
    }
}

fn image_of(vol: &StorageVol, uses: &Uses) -> Option<Image> {
    let name = vol.name().ok()?;
    let path = rpc!(vol.path()).ok()?;
    if uses.disks.contains(&path) {
        return None; // a VM's disk, not a library image
    }
    let info = rpc!(vol.info()).ok()?;
    let fmt = vol_format(vol);
    let format = match fmt.as_deref() {
        Some("iso") => ImageFormat::Iso,
        Some("qcow2") => ImageFormat::Qcow2,
        _ if name.to_ascii_lowercase().ends_with(".iso") => ImageFormat::Iso,
        _ => ImageFormat::Raw,
    };
    let used_by = uses.cdroms.iter().filter(|(p, _)| *p == path).map(|(_, name)| name.clone()).collect();
    Some(Image {
        name,
        size_bytes: info.capacity,
        sha256: String::new(),
        format,
        virtual_bytes: info.capacity,
        allocated_bytes: info.allocation,
        iso: None,
        os: None,
        used_by,
    })
}

fn check_name(what: &str, name: &str) -> Result<(), HostError> {
    if name.is_empty() || name.len() > 200 || name.starts_with('.') || name.chars().any(|c| c == '/' || c.is_control())
    {
        return Err(HostError::Failed(format!("{what} {name:?}: not a valid name (1-200 characters, no '/')")));
    }
    Ok(())
}

// ---- new domains ----

/// What the host's capabilities offer for x86_64 guests.
struct Caps {
    kvm: bool,
    q35: bool,
}

fn caps(conn: &Connect) -> Result<Caps, HostError> {
    let text = rpc!(conn.capabilities()).map_err(failed("reading the host's capabilities"))?;
    let doc = Node::parse(&text).map_err(xml_failed("reading the host's capabilities"))?;
    let guest = doc
        .all("guest")
        .find(|g| {
            g.text_at(&["os_type"]) == Some("hvm") && g.at(&["arch"]).and_then(|a| a.attr("name")) == Some("x86_64")
        })
        .ok_or_else(|| {
            HostError::Failed("this libvirt host cannot run x86_64 guests (no qemu-system-x86_64)".into())
        })?;
    let arch = guest.child("arch");
    let kvm = arch.is_some_and(|a| a.all("domain").any(|d| d.attr("type") == Some("kvm")));
    let q35 = arch.is_some_and(|a| {
        a.all("machine").any(|m| m.text.trim() == "q35" || m.attr("canonical").is_some_and(|c| c.contains("q35")))
    });
    Ok(Caps { kvm, q35 })
}

fn domain_xml(
    vm: &CreateVm,
    caps: &Caps,
    disk: Option<(&str, DiskFormat)>,
    media: Option<&str>,
    kernel: Option<(String, Option<String>, String)>,
    nic: Option<&str>,
    description: &str,
) -> String {
    let kind = if caps.kvm { "kvm" } else { "qemu" };
    let machine = if caps.q35 { "q35" } else { "pc" };
    let cd_bus = if caps.q35 { ("sda", "sata") } else { ("hdc", "ide") };
    let mut x = format!("<domain type='{kind}'>\n  <name>{}</name>\n", esc(&vm.name));
    if !description.is_empty() {
        x += &format!("  <description>{}</description>\n", esc(description));
    }
    x += &format!("  <metadata><porthole:vm xmlns:porthole='{METADATA_NS}'>");
    if let Some((path, _)) = disk {
        x += &format!("<porthole:disk>{}</porthole:disk>", esc(path));
    }
    for t in &vm.tags {
        x += &format!("<porthole:tag>{}</porthole:tag>", esc(t));
    }
    x += "</porthole:vm></metadata>\n";
    x += &format!("  <memory unit='MiB'>{}</memory>\n", vm.memory_mib);
    // Room for more vCPUs: libvirt's `current` below the maximum (`virsh setvcpus --live` adds them).
    x += &match vm.max_vcpus.filter(|&m| m > vm.vcpus) {
        Some(max) => format!("  <vcpu current='{}'>{max}</vcpu>\n", vm.vcpus),
        None => format!("  <vcpu>{}</vcpu>\n", vm.vcpus),
    };
    x += &format!("  <os>\n    <type arch='x86_64' machine='{machine}'>hvm</type>\n");
    if let Some((k, initrd, cmdline)) = &kernel {
        x += &format!("    <kernel>{}</kernel>\n", esc(k));
        if let Some(i) = initrd {
            x += &format!("    <initrd>{}</initrd>\n", esc(i));
        }
        if !cmdline.is_empty() {
            x += &format!("    <cmdline>{}</cmdline>\n", esc(cmdline));
        }
    }
    let order: &[&str] = if media.is_some() { &["cdrom", "hd"] } else { &["hd", "cdrom"] };
    for dev in order {
        x += &format!("    <boot dev='{dev}'/>\n");
    }
    x += "  </os>\n  <features><acpi/><apic/></features>\n  <clock offset='utc'/>\n";
    x += "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n";
    x += "  <devices>\n";
    if let Some((path, fmt)) = disk {
        let t = match fmt {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        };
        x += &format!(
            "    <disk type='file' device='disk'><driver name='qemu' type='{t}'/><source file='{}'/>\
             <target dev='vda' bus='virtio'/></disk>\n",
            esc(path)
        );
    }
    x += "    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>";
    if let Some(m) = media {
        x += &format!("<source file='{}'/>", esc(m));
    }
    x += &format!("<target dev='{}' bus='{}'/><readonly/></disk>\n", cd_bus.0, cd_bus.1);
    match nic {
        Some("user") => x += "    <interface type='user'><model type='virtio'/></interface>\n",
        Some(net) => {
            x += &format!(
                "    <interface type='network'><source network='{}'/><model type='virtio'/></interface>\n",
                esc(net)
            )
        }
        None => {}
    }
    // The serial port on a pty, which libvirt's console streams (the Serial console) reach.
    x += "    <serial type='pty'><target port='0'/></serial>\n    <console type='pty'><target type='serial' port='0'/></console>\n";
    x += "    <graphics type='vnc' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>\n";
    // As virt-manager gives modern guests: virtio (virtio-vga: VGA for the firmware, then virtio-gpu).
    x += match vm.vga.unwrap_or(VgaMode::Virtio) {
        VgaMode::Virtio => "    <video><model type='virtio'/></video>\n",
        VgaMode::Std => "    <video><model type='vga'/></video>\n",
    };
    // The SPICE agent's port, served by QEMU's own agent (qemu-vdagent), which shares the guest's clipboard
    // with VNC clients: only when asked for, since QEMU 7.2 cannot migrate it, so libvirt then refuses
    // snapshots and saves of the running VM.
    if vm.agent == Some(AgentMode::Spice) {
        x += "    <channel type='qemu-vdagent'><source><clipboard copypaste='yes'/></source>";
        x += &format!("<target type='virtio' name='{}'/></channel>\n", porthole_api::SPICE_AGENT_PORT);
    }
    // A sound card only when asked for: Intel HD Audio (ICH9, as virt-manager gives q35 guests), or virtio
    // (libvirt 9.4 and QEMU 8.2 have it; older ones refuse the definition, and their message reaches the
    // user).
    match vm.sound {
        Some(SoundMode::Hda) => x += "    <sound model='ich9'/>\n",
        Some(SoundMode::Virtio) => x += "    <sound model='virtio'/>\n",
        Some(SoundMode::None) | None => {}
    }
    x += "    <memballoon model='virtio'/>\n  </devices>\n</domain>\n";
    x
}

/// The network a new VM gets: `default` when active; user-mode networking on a session connection; none
/// otherwise (with the reason).
fn pick_network(conn: &Connect, parsed: &ConnUri) -> (Option<String>, String) {
    if let Ok(net) = rpc!(conn.lookup_network_by_name("default"))
        && rpc!(net.is_active()).unwrap_or(false)
    {
        return (Some("default".into()), String::new());
    }
    // No `default`: another network the host runs (a bridge to its LAN, a routed or NAT network), the first
    // by name.
    let mut others: Vec<String> = rpc!(conn.list_all_networks(sys::VIR_CONNECT_LIST_NETWORKS_ACTIVE))
        .map(|nets| nets.iter().filter_map(|n| n.name().ok()).collect())
        .unwrap_or_default();
    others.sort();
    if let Some(name) = others.into_iter().next() {
        return (Some(name.clone()), format!("Network: the host's {name:?} network (it has no \"default\")."));
    }
    if parsed.path == "/session" {
        return (Some("user".into()), String::new());
    }
    (None, "No network: this libvirt host has no active network.".into())
}

fn create_blocking(conn: &Connect, parsed: &ConnUri, vm: &CreateVm) -> Result<Vm, HostError> {
    check_name("VM name", &vm.name)?;
    if vm.vcpus == 0 || vm.memory_mib == 0 {
        return Err(HostError::Failed("a VM needs at least one vCPU and some memory".into()));
    }
    if rpc!(conn.lookup_domain_by_name(&vm.name)).is_ok() {
        return Err(HostError::Failed(format!("a VM named {:?} exists already on this host", vm.name)));
    }
    let caps = caps(conn)?;
    let pool = pool(conn, parsed)?;
    let vol_path = |name: &str, what: &str| -> Result<String, HostError> {
        rpc!(pool.lookup_storage_vol_by_name(name))
            .and_then(|v| rpc!(v.path()))
            .map_err(failed(format!("{what} {name:?} is not in storage pool {POOL:?}")))
    };
    let media = vm.media.as_deref().map(|m| vol_path(m, "image")).transpose()?;
    let kernel = match &vm.boot {
        Some(b) => {
            let k = |s: &str| if s.starts_with('/') { Ok(s.to_string()) } else { vol_path(s, "kernel") };
            Some((k(&b.kernel)?, b.initrd.as_deref().map(k).transpose()?, b.cmdline.clone()))
        }
        None => None,
    };
    let (nic, note) = match &vm.nics {
        Some(n) if n.is_empty() => (None, String::new()),
        _ => pick_network(conn, parsed),
    };
    let format = vm.disk_format.unwrap_or_default();
    let mut created: Option<StorageVol> = None;
    let disk = if vm.disk_gib > 0 {
        let ext = match format {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "img",
        };
        let name = format!(
            "{}-disk0.{ext}",
            vm.name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "_")
        );
        let xml = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{}</capacity><allocation>0</allocation>\
             <target><format type='{ext_fmt}'/></target></volume>",
            esc(&name),
            vm.disk_gib << 30,
            ext_fmt = if ext == "img" { "raw" } else { ext },
        );
        let vol =
            rpc!(StorageVol::create_xml(&pool, &xml, 0)).map_err(failed(format!("creating disk volume {name:?}")))?;
        let path = rpc!(vol.path()).map_err(failed("reading the new disk's path"))?;
        created = Some(vol);
        Some((path, format))
    } else {
        None
    };
    let xml = domain_xml(
        vm,
        &caps,
        disk.as_ref().map(|(p, f)| (p.as_str(), *f)),
        media.as_deref(),
        kernel,
        nic.as_deref(),
        &note,
    );
    match rpc!(conn.define_domain_xml(&xml)) {
        Ok(dom) => vm_of(conn, &dom),
        Err(e) => {
            if let Some(v) = created {
                let _ = rpc!(v.delete(0));
            }
            Err(HostError::Failed(format!("defining VM {:?}: {}", vm.name, e.message())))
        }
    }
}

// ---- media ----

fn change_media_blocking(
    conn: &Connect,
    parsed: &ConnUri,
    id: &str,
    drive: Option<&str>,
    image: Option<&str>,
) -> Result<Vm, HostError> {
    let dom = find_domain(conn, id)?;
    let text = rpc!(dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)).map_err(failed("reading the domain's XML"))?;
    let doc = Node::parse(&text).map_err(xml_failed("reading the domain's XML"))?;
    let index = match drive {
        None => 0,
        Some(d) => d
            .strip_prefix("cdrom")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| HostError::Failed(format!("{d:?} is not a CD/DVD drive (cdrom0, cdrom1, …)")))?,
    };
    let cd = disks(&doc, "cdrom")
        .nth(index)
        .ok_or_else(|| HostError::Failed(format!("the VM has no CD/DVD drive cdrom{index}")))?;
    let target = cd.child("target").ok_or_else(|| HostError::Failed("the CD/DVD drive has no target".into()))?;
    let (dev, bus) = (target.attr("dev").unwrap_or("hdc"), target.attr("bus").unwrap_or("ide"));
    let source = match image {
        Some(name) => {
            let pool = pool(conn, parsed)?;
            let path = rpc!(pool.lookup_storage_vol_by_name(name))
                .and_then(|v| rpc!(v.path()))
                .map_err(failed(format!("image {name:?} is not in storage pool {POOL:?}")))?;
            format!("<source file='{}'/>", esc(&path))
        }
        None => String::new(),
    };
    let xml = format!(
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>{source}<target dev='{}' bus='{}'/>\
         <readonly/></disk>",
        esc(dev),
        esc(bus)
    );
    let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
    if rpc!(dom.is_active()).unwrap_or(false) {
        flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    if !rpc!(dom.is_persistent()).unwrap_or(true) {
        flags &= !sys::VIR_DOMAIN_AFFECT_CONFIG;
    }
    rpc!(dom.update_device_flags(&xml, flags)).map_err(failed(if image.is_some() {
        "inserting the image"
    } else {
        "ejecting the CD/DVD"
    }))?;
    vm_of(conn, &dom)
}

// ---- console ----

fn console_blocking(conn: &Connect, parsed: &ConnUri, id: &str) -> Result<UnixStream, HostError> {
    let dom = find_domain(conn, id)?;
    if !rpc!(dom.is_active()).unwrap_or(false) {
        return Err(HostError::Failed("the VM is not running: its console opens once it runs".into()));
    }
    let text = rpc!(dom.xml_desc(0)).map_err(failed("reading the domain's XML"))?;
    let doc = Node::parse(&text).map_err(xml_failed("reading the domain's XML"))?;
    let graphics = doc
        .child("devices")
        .and_then(|d| d.all("graphics").find(|g| g.attr("type") == Some("vnc")))
        .ok_or_else(|| HostError::Failed("the VM has no VNC display".into()))?;
    if parsed.is_local() {
        match rpc!(dom.open_graphics_fd(0, 0)) {
            // SAFETY: libvirt hands us a new socket descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { UnixStream::from_raw_fd(fd as i32) }),
            Err(e) => {
                if let Some(sock) = graphics.attr("socket") {
                    return UnixStream::connect(sock)
                        .map_err(|io| HostError::Failed(format!("console: {} ({sock}: {io})", e.message())));
                }
                return Err(HostError::Failed(format!("opening the console: {}", e.message())));
            }
        }
    }
    if !parsed.is_ssh() {
        return Err(HostError::Failed(format!(
            "opening the console over {}: consoles of remote libvirt hosts need an SSH connection (qemu+ssh://)",
            parsed.transport
        )));
    }
    let port: u16 = graphics
        .attr("port")
        .and_then(|p| p.parse().ok())
        .filter(|&p: &u16| p > 0)
        .ok_or_else(|| HostError::Failed("the VM's VNC display has no TCP port to tunnel to over SSH".into()))?;
    let listen = graphics.attr("listen").filter(|l| !matches!(*l, "" | "0.0.0.0" | "::")).unwrap_or("127.0.0.1");
    let target = if listen.contains(':') { format!("[{listen}]:{port}") } else { format!("{listen}:{port}") };
    ssh::tunnel(parsed, &target, TUNNEL_WAIT).map_err(HostError::Failed)
}

// ---- snapshots ----

fn snapshot_of(snap: &virt::domain_snapshot::DomainSnapshot) -> Option<Snapshot> {
    let doc = Node::parse(&rpc!(snap.xml_desc(0)).ok()?).ok()?;
    let name = doc.text_at(&["name"])?.to_string();
    let state = doc.text_at(&["state"]).unwrap_or_default();
    let memory = doc.child("memory").and_then(|m| m.attr("snapshot")).unwrap_or("no");
    Some(Snapshot {
        id: name.clone(),
        name,
        description: doc.text_at(&["description"]).unwrap_or_default().to_string(),
        created_ms: doc.text_at(&["creationTime"]).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0) * 1000,
        parent: doc.text_at(&["parent", "name"]).map(str::to_string),
        with_state: matches!(state, "running" | "paused") && memory != "no",
        size_bytes: 0,
    })
}

fn valid_snapshot_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.'))
}

// ---- screenshots ----

/// A binary PPM (P6, maxval 255): width, height, RGB bytes.
fn parse_ppm(bytes: &[u8]) -> Option<(u32, u32, &[u8])> {
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < bytes.len() && bytes[at] == b'#' {
            while at < bytes.len() && bytes[at] != b'\n' {
                at += 1;
            }
            continue;
        }
        let start = at;
        while at < bytes.len() && !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if start == at {
            return None;
        }
        fields.push(std::str::from_utf8(&bytes[start..at]).ok()?);
    }
    if fields[0] != "P6" || fields[3] != "255" {
        return None;
    }
    let (w, h): (u32, u32) = (fields[1].parse().ok()?, fields[2].parse().ok()?);
    if w == 0 || h == 0 || w > 16384 || h > 16384 {
        return None;
    }
    let data = bytes.get(at + 1..)?;
    let need = w as usize * h as usize * 3;
    (data.len() >= need).then(|| (w, h, &data[..need]))
}

/// The RGB pixels of a PNG screenshot (QEMU's `screendump` gives PNG when libvirt asks for it, PPM before):
/// 8-bit RGB or RGBA, at most 16384 pixels a side.
fn parse_png(data: &[u8]) -> Option<(u32, u32, Vec<u8>)> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(data)).read_info().ok()?;
    let (w, h) = (reader.info().width, reader.info().height);
    if w == 0 || h == 0 || w > 16384 || h > 16384 {
        return None;
    }
    let mut buf = vec![0; reader.output_buffer_size()?];
    let frame = reader.next_frame(&mut buf).ok()?;
    if frame.bit_depth != png::BitDepth::Eight {
        return None;
    }
    let data = &buf[..frame.buffer_size()];
    let rgb = match frame.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        _ => return None,
    };
    Some((w, h, rgb))
}

/// A screenshot (`mime` as libvirt names its format: PPM or PNG) as a PNG `width` pixels wide.
fn screenshot_to_png(mime: &str, data: &[u8], width: u32) -> Result<Vec<u8>, String> {
    let (w, h, rgb) = if mime.contains("png") {
        parse_png(data).ok_or("the screenshot is not a readable PNG image")?
    } else {
        let (w, h, rgb) = parse_ppm(data).ok_or("the screenshot is not a PPM image")?;
        (w, h, rgb.to_vec())
    };
    let tw = width.clamp(1, w);
    let th = ((u64::from(h) * u64::from(tw) / u64::from(w)) as u32).max(1);
    let mut out = Vec::with_capacity(tw as usize * th as usize * 3);
    for y in 0..th {
        let sy = (u64::from(y) * u64::from(h) / u64::from(th)) as usize;
        for x in 0..tw {
            let sx = (u64::from(x) * u64::from(w) / u64::from(tw)) as usize;
            let i = (sy * w as usize + sx) * 3;
            out.extend_from_slice(&rgb[i..i + 3]);
        }
    }
    let mut png_bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut png_bytes, tw, th);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&out).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(png_bytes)
}

/// Largest screenshot read from the daemon (a 16384² RGB PPM is 768 MiB; real screens are far smaller).
const MAX_SCREENSHOT: usize = 64 << 20;

fn screenshot_blocking(conn: &Connect, id: &str, width: u32) -> Result<Vec<u8>, HostError> {
    let dom = find_domain(conn, id)?;
    let stream = Stream::new(conn, 0).map_err(failed("opening a stream"))?;
    let mime = rpc!(dom.screenshot(&stream, 0, 0)).map_err(failed("taking a screenshot"))?;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.recv(&mut buf).map_err(failed("reading the screenshot"))?;
        if n <= 0 {
            break;
        }
        data.extend_from_slice(&buf[..n as usize]);
        if data.len() > MAX_SCREENSHOT {
            let _ = stream.abort();
            return Err(HostError::Failed("the screenshot is too large".into()));
        }
    }
    let _ = stream.finish();
    screenshot_to_png(&mime, &data, width).map_err(HostError::Failed)
}

// ---- uploads ----

/// Sets its flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn upload_blocking(
    conn: &Connect,
    parsed: &ConnUri,
    name: &str,
    path: &Path,
    progress: &Progress,
    cancelled: &AtomicBool,
) -> Result<Image, HostError> {
    check_name("image", name)?;
    let mut file = std::fs::File::open(path).map_err(|e| HostError::Failed(format!("{}: {e}", path.display())))?;
    let len = file.metadata().map_err(|e| HostError::Failed(format!("{}: {e}", path.display())))?.len();
    let pool = pool(conn, parsed)?;
    if rpc!(pool.lookup_storage_vol_by_name(name)).is_ok() {
        return Err(HostError::Failed(format!("the library has an image named {name:?} already")));
    }
    let format = if name.to_ascii_lowercase().ends_with(".iso") { "iso" } else { "raw" };
    let xml = format!(
        "<volume><name>{}</name><capacity unit='bytes'>{len}</capacity><allocation unit='bytes'>0</allocation>\
         <target><format type='{format}'/></target></volume>",
        esc(name)
    );
    let vol = rpc!(StorageVol::create_xml(&pool, &xml, 0)).map_err(failed(format!("creating volume {name:?}")))?;
    let sent = (|| -> Result<String, HostError> {
        let stream = Stream::new(conn, 0).map_err(failed("opening an upload stream"))?;
        rpc!(vol.upload(&stream, 0, len, 0)).map_err(failed(format!("uploading {name:?}")))?;
        let mut hash = sha2::Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0u64;
        progress(0, len);
        while done < len {
            if cancelled.load(Ordering::Relaxed) {
                let _ = stream.abort();
                return Err(HostError::Failed(format!("uploading {name:?}: cancelled")));
            }
            let n = file.read(&mut buf).map_err(|e| HostError::Failed(format!("{}: {e}", path.display())))?;
            if n == 0 {
                let _ = stream.abort();
                return Err(HostError::Failed(format!("{} shrank while it was uploaded", path.display())));
            }
            hash.update(&buf[..n]);
            let mut off = 0;
            while off < n {
                match stream.send(&buf[off..n]) {
                    Ok(k) if k > 0 => off += k as usize,
                    Ok(_) => {
                        let _ = stream.abort();
                        return Err(HostError::Failed(format!("uploading {name:?}: the stream closed")));
                    }
                    Err(e) => {
                        let _ = stream.abort();
                        return Err(HostError::Failed(format!("uploading {name:?}: {}", e.message())));
                    }
                }
            }
            done += n as u64;
            progress(done, len);
        }
        stream.finish().map_err(failed(format!("finishing the upload of {name:?}")))?;
        Ok(hex::encode(hash.finalize()))
    })();
    match sent {
        Ok(sha) => {
            let _ = rpc!(pool.refresh(0));
            let uses = Uses::read(conn)?;
            let vol =
                rpc!(pool.lookup_storage_vol_by_name(name)).map_err(failed(format!("reading volume {name:?}")))?;
            let mut image = image_of(&vol, &uses)
                .ok_or_else(|| HostError::Failed(format!("the uploaded volume {name:?} cannot be read")))?;
            image.sha256 = sha;
            Ok(image)
        }
        Err(e) => {
            let _ = rpc!(vol.delete(0));
            Err(e)
        }
    }
}

fn format_version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// Whether a domain in `state` runs (has a QEMU process).
fn is_active_state(state: u32) -> bool {
    !matches!(state, sys::VIR_DOMAIN_SHUTOFF | sys::VIR_DOMAIN_CRASHED | sys::VIR_DOMAIN_NOSTATE)
}

/// The host's name, versions and hardware, read once per connection.
fn host_static(inner: &Inner, c: &Connect) -> Result<HostStatic, HostError> {
    if let Some(h) = lock(&inner.host_static).clone() {
        return Ok(h);
    }
    let ni = rpc!(c.node_info()).map_err(failed("reading the host's node info"))?;
    let h = HostStatic {
        hostname: rpc!(c.hostname()).map_err(failed("reading the host name"))?,
        version: format!(
            "libvirt {}, {} {}",
            format_version(rpc!(c.lib_version()).unwrap_or(0)),
            rpc!(c.driver_type()).unwrap_or_default(),
            format_version(rpc!(c.hyp_version()).unwrap_or(0))
        ),
        cpus: ni.cpus,
        memory_mib: ni.memory >> 10,
        cpu_model: ni.model,
    };
    *lock(&inner.host_static) = Some(h.clone());
    Ok(h)
}

/// The host's free memory and the library pool's space and folder: both read after any event (a domain
/// started or stopped, Porthole made or deleted one), else one of them in turn after each [`HOST_TTL`] (one
/// call, which the sampler makes up for by skipping its round: see [`sampler`]).
fn host_dynamic(inner: &Inner, c: &Connect) -> HostDynamic {
    let generation = inner.watch.generation();
    let before = lock(&inner.host_dynamic).clone();
    let full = match &before {
        Some((t, g, d)) if t.elapsed() < HOST_TTL && *g == generation => return d.clone(),
        Some((_, g, _)) => *g != generation,
        None => true,
    };
    let before = before.map(|(_, _, d)| d).unwrap_or_default();
    let memory_turn = full || !inner.pool_turn.fetch_xor(true, Ordering::SeqCst);
    let mut d = HostDynamic {
        memory_available_mib: if memory_turn {
            rpc!(c.free_memory()).unwrap_or(0) >> 20
        } else {
            before.memory_available_mib
        },
        ..before.clone()
    };
    if full || !memory_turn {
        d.problems.clear();
        let known = lock(&inner.pool).clone();
        let info = match known.as_ref().map(|p| rpc!(p.info())) {
            Some(Ok(i)) if i.state == sys::VIR_STORAGE_POOL_RUNNING => Ok(i),
            // Not found yet, gone, or stopped: found (defined, started) again.
            _ => pool(c, &inner.parsed).and_then(|p| {
                let i = rpc!(p.info()).map_err(failed(format!("reading storage pool {POOL:?}")))?;
                if let Some(dir) = rpc!(p.xml_desc(0))
                    .ok()
                    .and_then(|t| Node::parse(&t).ok())
                    .and_then(|d| d.text_at(&["target", "path"]).map(str::to_string))
                {
                    d.data_dir = dir;
                }
                *lock(&inner.pool) = Some(p);
                Ok(i)
            }),
        };
        match info {
            Ok(i) => {
                d.free_disk_bytes = i.available;
                d.disk_total_bytes = i.capacity;
            }
            Err(e) => {
                *lock(&inner.pool) = None;
                d.problems.push(e.to_string());
            }
        }
    }
    *lock(&inner.host_dynamic) = Some((std::time::Instant::now(), generation, d.clone()));
    d
}

/// The VMs from one reading of every domain's state and the cached definitions, re-reading those that are
/// new, `dirty`, read in another state (stopped then, running now), or all of them when `all`.
/// The VMs, and the definition cache brought up to date for them (XML re-read only where events, Porthole's
/// own changes or a missing event stream say so).
fn refreshed<'a>(
    inner: &'a Inner,
    c: &Connect,
    asked: std::time::Instant,
) -> Result<(Vec<Vm>, MutexGuard<'a, Defs>), HostError> {
    let mut defs = lock(&inner.defs);
    let (all, dirty) = inner.watch.take_dirty();
    let fresh = all || !inner.watch.live() || inner.cache_off.load(Ordering::SeqCst);
    match list_blocking(inner, c, &mut defs, asked, fresh, &dirty) {
        Ok(vms) => Ok((vms, defs)),
        Err(e) => {
            // What was taken as dirty is read again next time.
            inner.watch.touch(None);
            Err(e)
        }
    }
}

fn list_blocking(
    inner: &Inner,
    c: &Connect,
    defs: &mut std::collections::HashMap<String, Def>,
    asked: std::time::Instant,
    all: bool,
    dirty: &std::collections::HashSet<String>,
) -> Result<Vec<Vm>, HostError> {
    let reading = inner.reading(c, asked)?;
    let sample = lock(&inner.sample).clone();
    let blocks = |uuid: &str| -> &[stats::Block] {
        sample.as_ref().and_then(|s| s.domains.iter().find(|d| d.uuid == uuid)).map_or(&[], |d| &d.blocks[..])
    };
    let mut vms = Vec::with_capacity(reading.domains.len());
    for d in &reading.domains {
        let stale = match defs.get(&d.uuid) {
            Some(def) => all || dirty.contains(&d.uuid) || def.active != (d.state != sys::VIR_DOMAIN_SHUTOFF),
            None => true,
        };
        if stale {
            match read_def(c, &d.dom, d.state) {
                Ok(def) => {
                    defs.insert(d.uuid.clone(), def);
                }
                // A domain undefined between the reading and the read is gone: skip it.
                Err(e) if rpc!(c.lookup_domain_by_uuid_string(&d.uuid)).is_err() => {
                    log::debug!("a domain vanished while listed: {e}");
                    defs.remove(&d.uuid);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(def) = defs.get(&d.uuid) {
            vms.push(def.vm(d.state, if is_active_state(d.state) { blocks(&d.uuid) } else { &[] }));
        }
    }
    let present: std::collections::HashSet<&str> = reading.domains.iter().map(|d| d.uuid.as_str()).collect();
    defs.retain(|uuid, _| present.contains(uuid.as_str()));
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vms)
}

#[async_trait]
impl Host for LibvirtHost {
    fn kind(&self) -> HostKind {
        HostKind::Libvirt
    }

    fn events(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes())
    }

    fn refresh_interval(&self) -> Duration {
        REFRESH_EVERY
    }

    fn lacks(&self, feature: Feature) -> Option<String> {
        let parsed = &self.inner.parsed;
        let why = match feature {
            Feature::Console if parsed.is_local() || parsed.is_ssh() => return None,
            Feature::Console => {
                "libvirt hosts reached over TLS or TCP: the console listens on the host's loopback only; connect \
                 with qemu+ssh:// to open it through SSH"
            }
            Feature::Snapshots | Feature::MemorySnapshots | Feature::Suspend | Feature::Tasks => return None,
            Feature::Screenshots => return None,
            Feature::Clones => "libvirt hosts: cloning is not offered here (use virt-clone on the host)",
            Feature::Drives => "libvirt hosts: adding and removing drives is not offered here yet (virsh attach-disk)",
            Feature::Limits => "libvirt hosts: rate limits, CPU caps and the balloon are not offered here yet",
            Feature::Serial => return None,
            Feature::HostStats => "libvirt hosts: host samples are not offered here yet",
            Feature::OsDetection => "libvirt hosts: no osinfo database is consulted",
            Feature::DiskImages => "libvirt hosts: new VMs get an empty disk here (virt-install --import for images)",
            Feature::Settings => "libvirt hosts: change settings with virsh edit or virt-manager for now",
            Feature::Networking => "libvirt hosts: network cards are libvirt's (virsh domiflist); not shown here yet",
        };
        Some(why.to_string())
    }

    async fn host(&self) -> Result<HostInfo, HostError> {
        let (inner, asked) = (self.inner.clone(), std::time::Instant::now());
        self.call("reading the host", move |c| {
            let fixed = host_static(&inner, c)?;
            let dynamic = host_dynamic(&inner, c);
            let reading = inner.reading(c, asked)?;
            let mut info = HostInfo {
                hostname: fixed.hostname,
                version: fixed.version,
                cpus: fixed.cpus,
                memory_mib: fixed.memory_mib,
                memory_available_mib: dynamic.memory_available_mib,
                cpu_model: fixed.cpu_model,
                vms: reading.domains.len() as u64,
                free_disk_bytes: dynamic.free_disk_bytes,
                disk_total_bytes: dynamic.disk_total_bytes,
                upload_limit_bytes: dynamic.free_disk_bytes,
                data_dir: dynamic.data_dir,
                problems: dynamic.problems,
                ..HostInfo::default()
            };
            let sample = lock(&inner.sample).clone();
            let defs = lock(&inner.defs);
            for d in reading.domains.iter().filter(|d| is_active_state(d.state)) {
                info.running_vms += 1;
                let sampled = sample.as_ref().and_then(|s| s.domains.iter().find(|s| s.uuid == d.uuid));
                match (defs.get(&d.uuid), sampled) {
                    (Some(def), Some(s)) if s.memory_kib > 0 => {
                        info.vcpus_allocated += u64::from(def.vm.vcpus);
                        info.memory_allocated_mib += s.memory_kib >> 10;
                    }
                    (Some(def), _) => {
                        info.vcpus_allocated += u64::from(def.vm.vcpus);
                        info.memory_allocated_mib += def.vm.memory_mib;
                    }
                    // Not listed yet: asked.
                    (None, _) => {
                        if let Ok(i) = rpc!(d.dom.info()) {
                            info.vcpus_allocated += u64::from(i.nr_virt_cpu);
                            info.memory_allocated_mib += i.memory >> 10;
                        }
                    }
                }
            }
            Ok(info)
        })
        .await
    }

    async fn list_vms(&self) -> Result<Vec<Vm>, HostError> {
        let (inner, asked) = (self.inner.clone(), std::time::Instant::now());
        self.call("listing VMs", move |c| refreshed(&inner, c, asked).map(|(vms, _)| vms)).await
    }

    async fn vm(&self, id: &str) -> Result<Vm, HostError> {
        let id = id.to_string();
        self.call("reading a VM", move |c| vm_of(c, &find_domain(c, &id)?)).await
    }

    async fn create_vm(&self, vm: &CreateVm) -> Result<Vm, HostError> {
        if vm.disk_image.is_some() || vm.cloud_init.is_some() {
            return Err(HostError::Unsupported {
                what: "VMs from disk or cloud images".into(),
                why: "libvirt hosts: new VMs get an empty disk here".into(),
            });
        }
        if vm.cpu_cap_percent.is_some() || vm.cpu_weight.is_some() {
            return Err(HostError::Unsupported {
                what: "CPU caps and weights".into(),
                why: self.lacks(Feature::Limits).unwrap_or_default(),
            });
        }
        let (vm, parsed) = (vm.clone(), self.inner.parsed.clone());
        let made = self.call("creating a VM", move |c| create_blocking(c, &parsed, &vm)).await?;
        self.touched(&made.id);
        Ok(made)
    }

    async fn delete_vm(&self, id: &str) -> Result<(), HostError> {
        let id = id.to_string();
        let uuid = self
            .call("deleting a VM", move |c| {
                let dom = find_domain(c, &id)?;
                let uuid = dom.uuid_string().unwrap_or_default();
                let text =
                    rpc!(dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)).map_err(failed("reading the domain's XML"))?;
                let doc = Node::parse(&text).map_err(xml_failed("reading the domain's XML"))?;
                let ours: Vec<String> = porthole_meta(&doc)
                    .map(|m| m.all("disk").map(|d| d.text.trim().to_string()).collect())
                    .unwrap_or_default();
                if rpc!(dom.is_active()).unwrap_or(false) {
                    rpc!(dom.destroy()).map_err(failed("forcing the VM off"))?;
                }
                let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
                rpc!(dom.undefine_flags(flags)).map_err(failed("undefining the VM"))?;
                for path in ours {
                    if let Ok(vol) = rpc!(c.lookup_storage_vol_by_path(&path)) {
                        rpc!(vol.delete(0)).map_err(failed(format!("deleting the VM's disk {path}")))?;
                    }
                }
                Ok(uuid)
            })
            .await?;
        self.touched(&uuid);
        lock(&self.inner.history).forget(&uuid);
        Ok(())
    }

    async fn action(&self, id: &str, action: Action) -> Result<Vm, HostError> {
        let id = id.to_string();
        self.call("changing a VM's state", move |c| {
            let dom = find_domain(c, &id)?;
            match action {
                Action::Start => rpc!(dom.create()).map(|_| ()).map_err(failed("starting the VM"))?,
                Action::Poweroff => rpc!(dom.destroy()).map_err(failed("forcing the VM off"))?,
                Action::Reset => rpc!(dom.reset()).map_err(failed("resetting the VM"))?,
                Action::Pause => rpc!(dom.suspend()).map_err(failed("pausing the VM"))?,
                Action::Resume => rpc!(dom.resume()).map_err(failed("resuming the VM"))?,
                Action::Suspend => rpc!(dom.managed_save(0)).map_err(failed("saving the VM's state"))?,
            }
            vm_of(c, &dom)
        })
        .await
        .inspect(|vm| self.touched(&vm.id))
    }

    async fn shutdown(&self, id: &str, timeout_s: u64) -> Result<Task, HostError> {
        let id_owned = id.to_string();
        let (name, uuid) = self
            .call("shutting a VM down", move |c| {
                let dom = find_domain(c, &id_owned)?;
                rpc!(dom.shutdown()).map_err(failed("asking the guest to shut down"))?;
                Ok((dom.name().unwrap_or_default(), dom.uuid_string().unwrap_or_default()))
            })
            .await?;
        self.touched(&uuid);
        let (task_id, cancel) = self.new_task(format!("shutdown {name}"), true);
        let host = self.clone();
        let (id, tid) = (id.to_string(), task_id.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_s);
            let outcome: Result<Option<String>, String> = loop {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                let idc = id.clone();
                let off = host
                    .call("reading a VM's state", move |c| {
                        Ok(!rpc!(find_domain(c, &idc)?.is_active()).map_err(failed("reading the VM's state"))?)
                    })
                    .await;
                match off {
                    Ok(true) => break Ok(None),
                    Ok(false) => {}
                    Err(e) => break Err(e.to_string()),
                }
                if tokio::time::Instant::now() >= deadline {
                    let idc = id.clone();
                    let forced = host
                        .call("forcing a VM off", move |c| {
                            let dom = find_domain(c, &idc)?;
                            match rpc!(dom.destroy()) {
                                Ok(()) => Ok(()),
                                // It went off by itself meanwhile.
                                Err(_) if !rpc!(dom.is_active()).unwrap_or(true) => Ok(()),
                                Err(e) => Err(failed("forcing the VM off")(e)),
                            }
                        })
                        .await;
                    host.touched(&uuid);
                    break forced
                        .map(|_| Some(format!("the guest did not shut down within {timeout_s} s: forced off")))
                        .map_err(|e| e.to_string());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            host.update_task(&tid, |t| match outcome {
                Ok(result) => {
                    t.state = TaskState::Done;
                    t.result = result;
                    t.done = 1;
                    t.total = 1;
                }
                Err(e) => {
                    t.state = TaskState::Failed;
                    t.error = Some(e);
                }
            });
        });
        self.task_now(&task_id)
    }

    async fn change_drive_media(&self, id: &str, drive: Option<&str>, image: Option<&str>) -> Result<Vm, HostError> {
        let (id, drive, image) = (id.to_string(), drive.map(str::to_string), image.map(str::to_string));
        let parsed = self.inner.parsed.clone();
        self.call("changing the CD/DVD", move |c| {
            change_media_blocking(c, &parsed, &id, drive.as_deref(), image.as_deref())
        })
        .await
        .inspect(|vm| self.touched(&vm.id))
    }

    async fn open_console(&self, id: &str) -> Result<UnixStream, HostError> {
        let (id, parsed) = (id.to_string(), self.inner.parsed.clone());
        self.call("opening the console", move |c| console_blocking(c, &parsed, &id)).await
    }

    async fn stats(&self, id: &str, since_ms: u64, minutes: bool) -> Result<Stats, HostError> {
        // A UUID the host knows (sampled, or listed) needs no call; a name is looked up.
        let sampled = lock(&self.inner.history).knows(id);
        let known = sampled || lock(&self.inner.defs).contains_key(id);
        let uuid = if known {
            id.to_string()
        } else {
            let id = id.to_string();
            self.call("reading a VM", move |c| find_domain(c, &id)?.uuid_string().map_err(failed("reading its UUID")))
                .await?
        };
        let samples = lock(&self.inner.history).since(&uuid, since_ms);
        Ok(if minutes {
            Stats { interval_s: 60, samples: stats::per_minute(&samples) }
        } else {
            Stats { interval_s: REFRESH_EVERY.as_secs(), samples }
        })
    }

    async fn images(&self) -> Result<Vec<Image>, HostError> {
        let (parsed, inner) = (self.inner.parsed.clone(), self.inner.clone());
        self.call("listing images", move |c| {
            let pool = pool(c, &parsed)?;
            let _ = rpc!(pool.refresh(0));
            let uses = Uses::cached(&inner, c)?;
            let vols = rpc!(pool.list_all_volumes(0)).map_err(failed("listing the pool's volumes"))?;
            let mut images: Vec<Image> = vols.iter().filter_map(|v| image_of(v, &uses)).collect();
            images.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(images)
        })
        .await
    }

    async fn upload_image(&self, name: &str, path: &Path, progress: Progress) -> Result<Image, HostError> {
        // On a connection of its own, so the host's other calls go on during a long upload.
        let (name, path, parsed, uri) =
            (name.to_string(), path.to_path_buf(), self.inner.parsed.clone(), self.inner.uri.clone());
        // A caller that stops waiting (the window's *Cancel upload* aborts its task) drops this future, and
        // with it the guard: the upload stops at its next chunk and its volume goes.
        let cancelled = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(cancelled.clone());
        let calls = self.inner.calls.clone();
        let uploaded = tokio::task::spawn_blocking(move || {
            let _counting = Counting::on(&calls);
            let c = open(&uri, &parsed)?;
            upload_blocking(&c, &parsed, &name, &path, &progress, &cancelled)
        })
        .await
        .map_err(|e| HostError::Failed(format!("uploading an image: {e}")))?;
        // The pool has less room now.
        *lock(&self.inner.host_dynamic) = None;
        uploaded
    }

    async fn delete_image(&self, name: &str) -> Result<(), HostError> {
        let (name, parsed, inner) = (name.to_string(), self.inner.parsed.clone(), self.inner.clone());
        self.call("deleting an image", move |c| {
            let pool = pool(c, &parsed)?;
            let vol = rpc!(pool.lookup_storage_vol_by_name(&name))
                .map_err(failed(format!("image {name:?} is not in storage pool {POOL:?}")))?;
            let uses = Uses::cached(&inner, c)?;
            let image = image_of(&vol, &uses)
                .ok_or_else(|| HostError::Failed(format!("{name:?} is a VM's disk, not a library image")))?;
            if !image.used_by.is_empty() {
                return Err(HostError::Failed(format!(
                    "image {name:?} is in the CD/DVD drive of {}",
                    image.used_by.join(", ")
                )));
            }
            rpc!(vol.delete(0)).map_err(failed(format!("deleting image {name:?}")))
        })
        .await?;
        // The pool has more room now.
        *lock(&self.inner.host_dynamic) = None;
        Ok(())
    }

    async fn task(&self, id: &str) -> Result<Task, HostError> {
        self.task_now(id)
    }

    async fn tasks(&self) -> Result<Vec<Task>, HostError> {
        Ok(lock(&self.inner.tasks).iter().map(|t| t.task.clone()).collect())
    }

    async fn cancel_task(&self, id: &str) -> Result<Task, HostError> {
        let mut tasks = lock(&self.inner.tasks);
        let entry = tasks
            .iter_mut()
            .find(|t| t.task.id == id)
            .ok_or_else(|| HostError::Failed(format!("no task {id} on {}", self.inner.uri)))?;
        if entry.task.state == TaskState::Running && entry.task.cancellable {
            entry.cancel.store(true, Ordering::Relaxed);
            entry.task.state = TaskState::Cancelled;
        }
        Ok(entry.task.clone())
    }

    async fn snapshots(&self, id: &str) -> Result<SnapshotTree, HostError> {
        let id = id.to_string();
        self.call("listing snapshots", move |c| {
            let dom = find_domain(c, &id)?;
            let snaps = rpc!(dom.list_all_snapshots(0)).map_err(failed("listing snapshots"))?;
            let mut snapshots: Vec<Snapshot> = snaps.iter().filter_map(snapshot_of).collect();
            snapshots.sort_by_key(|s| (s.created_ms, s.name.clone()));
            let current = rpc!(dom.current_snapshot(0)).ok().and_then(|s| s.name().ok());
            Ok(SnapshotTree { snapshots, current })
        })
        .await
    }

    async fn take_snapshot(&self, id: &str, take: &TakeSnapshot) -> Result<Task, HostError> {
        if !valid_snapshot_name(&take.name) {
            return Err(HostError::Failed(format!(
                "snapshot name {:?}: 1-63 letters, digits, spaces, '-', '_' or '.'",
                take.name
            )));
        }
        let (id, take2) = (id.to_string(), take.clone());
        let name = self
            .call_for("taking a snapshot", None, move |c| {
                let dom = find_domain(c, &id)?;
                let active = rpc!(dom.is_active()).unwrap_or(false);
                if active && take2.with_state == Some(false) {
                    return Err(HostError::Unsupported {
                        what: "Disk-only snapshots of a running VM".into(),
                        why: "libvirt's internal snapshots of a running domain always keep its memory".into(),
                    });
                }
                let xml = format!(
                    "<domainsnapshot><name>{}</name><description>{}</description></domainsnapshot>",
                    esc(&take2.name),
                    esc(&take2.description)
                );
                rpc!(dom.create_snapshot_xml(&xml, 0)).map_err(failed(format!("taking snapshot {:?}", take2.name)))?;
                Ok(dom.name().unwrap_or_default())
            })
            .await?;
        Ok(self.done_task(format!("snapshot {name}: {}", take.name), Some(take.name.clone())))
    }

    async fn revert_snapshot(&self, id: &str, snapshot: &str, confirm: bool) -> Result<Task, HostError> {
        let (id, snap) = (id.to_string(), snapshot.to_string());
        let (name, uuid) = self
            .call_for("reverting to a snapshot", None, move |c| {
                let dom = find_domain(c, &id)?;
                if rpc!(dom.is_active()).unwrap_or(false) && !confirm {
                    return Err(HostError::Failed(
                        "the VM is running: reverting loses its present state (confirm to go on)".into(),
                    ));
                }
                let s = rpc!(Domain::lookup_snapshot_by_name(&dom, &snap, 0))
                    .map_err(failed(format!("no snapshot {snap:?}")))?;
                rpc!(s.revert(0)).map_err(failed(format!("reverting to snapshot {snap:?}")))?;
                Ok((dom.name().unwrap_or_default(), dom.uuid_string().unwrap_or_default()))
            })
            .await?;
        self.touched(&uuid);
        Ok(self.done_task(format!("revert {name} to {snapshot}"), None))
    }

    async fn delete_snapshot(&self, id: &str, snapshot: &str) -> Result<Task, HostError> {
        let (id, snap) = (id.to_string(), snapshot.to_string());
        let name = self
            .call_for("deleting a snapshot", None, move |c| {
                let dom = find_domain(c, &id)?;
                let s = rpc!(Domain::lookup_snapshot_by_name(&dom, &snap, 0))
                    .map_err(failed(format!("no snapshot {snap:?}")))?;
                rpc!(s.delete(0)).map_err(failed(format!("deleting snapshot {snap:?}")))?;
                Ok(dom.name().unwrap_or_default())
            })
            .await?;
        Ok(self.done_task(format!("delete snapshot {snapshot} of {name}"), None))
    }

    async fn serial(&self, id: &str, lines: usize) -> Result<porthole_api::SerialOutput, HostError> {
        let (id, inner) = (id.to_string(), self.inner.clone());
        self.call("reading the serial console", move |c| {
            let dom = find_domain(c, &id)?;
            let uuid = dom.uuid_string().map_err(failed("reading the domain's UUID"))?;
            let lines = inner.serials.lines(c, &dom, &uuid, lines.min(1000))?;
            Ok(porthole_api::SerialOutput { lines })
        })
        .await
    }

    async fn serial_input(&self, id: &str, text: &str) -> Result<(), HostError> {
        let (id, text, inner) = (id.to_string(), text.to_string(), self.inner.clone());
        self.call("typing into the serial console", move |c| {
            let dom = find_domain(c, &id)?;
            let uuid = dom.uuid_string().map_err(failed("reading the domain's UUID"))?;
            inner.serials.send(c, &dom, &uuid, &text)
        })
        .await
    }

    async fn screenshot(&self, id: &str, width: u32) -> Result<Vec<u8>, HostError> {
        let id = id.to_string();
        self.call("taking a screenshot", move |c| screenshot_blocking(c, &id, width)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_onto_porthole_states() {
        assert_eq!(vm_state(sys::VIR_DOMAIN_RUNNING, false), VmState::Running);
        assert_eq!(vm_state(sys::VIR_DOMAIN_PAUSED, false), VmState::Paused);
        assert_eq!(vm_state(sys::VIR_DOMAIN_SHUTOFF, false), VmState::Stopped);
        assert_eq!(vm_state(sys::VIR_DOMAIN_SHUTOFF, true), VmState::Suspended);
        assert_eq!(vm_state(sys::VIR_DOMAIN_CRASHED, false), VmState::Crashed);
        assert_eq!(vm_state(sys::VIR_DOMAIN_SHUTDOWN, false), VmState::Stopping);
    }

    #[test]
    fn new_domains_keep_vnc_on_loopback_and_boot_the_cd_first() {
        let mut vm = CreateVm::new("web <1>", 2, 512);
        vm.tags = vec!["t".into()];
        let x = domain_xml(
            &vm,
            &Caps { kvm: false, q35: true },
            Some(("/p/d.qcow2", DiskFormat::Qcow2)),
            Some("/p/x.iso"),
            None,
            Some("default"),
            "",
        );
        let doc = Node::parse(&x).unwrap();
        assert_eq!(doc.attr("type"), Some("qemu"));
        assert_eq!(doc.text_at(&["name"]), Some("web <1>"));
        let boots: Vec<_> = doc.child("os").unwrap().all("boot").filter_map(|b| b.attr("dev")).collect();
        assert_eq!(boots, ["cdrom", "hd"]);
        assert_eq!(doc.at(&["devices", "graphics"]).and_then(|g| g.attr("listen")), Some("127.0.0.1"));
        assert_eq!(disks(&doc, "cdrom").next().and_then(disk_source), Some("/p/x.iso"));
        assert_eq!(porthole_meta(&doc).and_then(|m| m.text_at(&["disk"])), Some("/p/d.qcow2"));
        assert_eq!(doc.at(&["devices", "interface", "source"]).and_then(|s| s.attr("network")), Some("default"));
        let kvm = domain_xml(&vm, &Caps { kvm: true, q35: false }, None, None, None, None, "No network");
        let doc = Node::parse(&kvm).unwrap();
        assert_eq!(doc.attr("type"), Some("kvm"));
        assert!(doc.at(&["devices", "interface"]).is_none());
        assert_eq!(doc.text_at(&["description"]), Some("No network"));
        assert_eq!(vcpu_counts(&doc), (2, None));
        // Room for more vCPUs is libvirt's `current` below the maximum, read back the same way.
        let roomy = CreateVm { max_vcpus: Some(4), ..vm.clone() };
        let x = domain_xml(&roomy, &Caps { kvm: true, q35: false }, None, None, None, None, "");
        let doc = Node::parse(&x).unwrap();
        assert_eq!(doc.child("vcpu").and_then(|v| v.attr("current")), Some("2"));
        assert_eq!(vcpu_counts(&doc), (2, Some(4)));
        assert_eq!(
            disks(&doc, "cdrom").next().and_then(|d| d.child("target")).and_then(|t| t.attr("bus")),
            Some("ide")
        );
        // The agent's port only when asked for (QEMU cannot migrate qemu-vdagent: no running snapshots).
        assert!(doc.at(&["devices", "channel"]).is_none());
        let agent = CreateVm { agent: Some(AgentMode::Spice), ..vm.clone() };
        let doc =
            Node::parse(&domain_xml(&agent, &Caps { kvm: true, q35: false }, None, None, None, None, "")).unwrap();
        let channel = doc.at(&["devices", "channel"]).unwrap();
        assert_eq!(channel.attr("type"), Some("qemu-vdagent"));
        assert_eq!(channel.child("target").and_then(|t| t.attr("name")), Some("com.redhat.spice.0"));
    }

    #[test]
    fn ppm_and_png_screens_become_scaled_pngs() {
        let mut ppm = b"P6\n# c\n4 2\n255\n".to_vec();
        ppm.extend(std::iter::repeat_n([255u8, 0, 0], 8).flatten());
        let png = screenshot_to_png("image/x-portable-pixmap", &ppm, 2).unwrap();
        assert_eq!(parse_png(&png), Some((2, 1, vec![255, 0, 0, 255, 0, 0])));
        // QEMU's PNG screendump (RGBA here) is scaled the same way.
        let mut rgba = Vec::new();
        let mut enc = png::Encoder::new(&mut rgba, 4, 2);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0u8, 0, 255, 255].repeat(8)).unwrap();
        w.finish().unwrap();
        let png = screenshot_to_png("image/png", &rgba, 2).unwrap();
        assert_eq!(parse_png(&png), Some((2, 1, vec![0, 0, 255, 0, 0, 255])));
        assert!(screenshot_to_png("image/png", b"\x89PNG broken", 2).is_err());
        assert!(parse_ppm(b"P6 4 2 255\nshort").is_none());
        assert!(parse_ppm(b"P5 1 1 255\n\0").is_none());
    }

    #[test]
    fn new_vms_join_default_else_another_running_network() {
        // libvirt's test driver: its default node runs a network named "default"; a node of our own has only a
        // bridge to the LAN.
        let parsed = ConnUri::parse("qemu:///system").unwrap();
        let conn = Connect::open(Some("test:///default")).unwrap();
        assert_eq!(pick_network(&conn, &parsed), (Some("default".to_string()), String::new()));
        let dir = std::env::temp_dir().join(format!("porthole-libvirt-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let node = dir.join("node.xml");
        std::fs::write(
            &node,
            "<node><network><name>lan</name><forward mode='bridge'/><bridge name='br0'/></network></node>",
        )
        .unwrap();
        let conn = Connect::open(Some(&format!("test://{}", node.display()))).unwrap();
        let (net, why) = pick_network(&conn, &parsed);
        assert_eq!(net.as_deref(), Some("lan"));
        assert!(why.contains("no \"default\""), "{why}");
        let x = domain_xml(
            &CreateVm::new("v", 1, 64),
            &Caps { kvm: false, q35: true },
            None,
            None,
            None,
            net.as_deref(),
            "",
        );
        assert!(x.contains("<source network='lan'/>"), "{x}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn versions_read_like_libvirts() {
        assert_eq!(format_version(9_000_000), "9.0.0");
        assert_eq!(format_version(7_002_011), "7.2.11");
    }
}

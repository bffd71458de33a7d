//! The HTTP API (`/api/v1`, axum): routes, who may call them, and errors as JSON `{error, message}`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use porthole_api::{
    AddCdrom, AddDisk, CloneVm, ConsoleTicket, CreateVm, DiskFormat, DriveInfo, ErrorBody, FieldError, GrowDisk,
    HostInfo, Identified, Image, IsoFacts, LinkChange, MediaChange, NicDefinition, NicLimits, NicSpec, NicStatus,
    RevertSnapshot, Role, SerialInput, SerialOutput, SnapshotTree, Stats as StatsBody, TakeSnapshot, Task, TaskState,
    UpdateVm, Vm, VmState,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmm_core::control::Request;

use crate::auth::{Principal, Tokens};
use crate::host::{DriveSlot, Host, HostError, tail_lines};
use crate::stats::Stats;
use crate::store::{Below, CdromRecord, DiskRecord, ExtraDisk, VmRecord, is_valid_name, now_ms, random_hex};

/// Finished tasks kept for polling.
const TASKS_KEPT: usize = 200;

/// Where a connection came from.
#[derive(Debug, Clone)]
pub enum Peer {
    /// The local Unix socket, with the peer's user id.
    Unix {
        uid: Option<u32>,
    },
    Tcp(SocketAddr),
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Peer::Unix { uid: stream.io().peer_cred().ok().map(|c| c.uid()) }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        Peer::Tcp(*stream.remote_addr())
    }
}

struct Ticket {
    vm: String,
    input: bool,
    expires: Instant,
}

/// Everything the handlers share.
pub struct App {
    pub host: Arc<Host>,
    pub tokens: Arc<Tokens>,
    pub stats: Arc<Stats>,
    pub data_dir: PathBuf,
    pub upload_limit: u64,
    /// libosinfo's database, for OS detection on ISOs.
    pub osinfo: Arc<crate::osinfo::Osinfo>,
    /// How long a console ticket stays valid (at most 30 s).
    ticket_lifetime: Duration,
    tickets: Mutex<HashMap<String, Ticket>>,
    tasks: Mutex<BTreeMap<String, Task>>,
    /// The cancel switches of the running tasks that can be cancelled.
    cancels: Mutex<HashMap<String, Arc<Cancel>>>,
    /// Screenshots taken at once (each a viewer connection, a whole frame and a blocking thread).
    screenshots: tokio::sync::Semaphore,
}

/// How many screenshots the daemon takes at once; more requests wait their turn. A window showing 16
/// thumbnails asked for 16 at a time: 16 blocking threads and ~20 MiB of frames, and a resident size that
/// moved with them (the soak, issue 20).
const SCREENSHOTS_AT_ONCE: usize = 4;

/// A running task's cancel switch: `POST /tasks/{id}/cancel` sets it and wakes the task.
#[derive(Default)]
struct Cancel {
    set: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl Cancel {
    fn is_set(&self) -> bool {
        self.set.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Returns once the task is cancelled.
    async fn cancelled(&self) {
        while !self.is_set() {
            self.wake.notified().await;
        }
    }
}

type AppState = Arc<App>;

use vmm_core::devices::bus::lock;

/// An error reply.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    fields: Vec<FieldError>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), fields: Vec::new() }
    }
    /// A request whose fields were refused, each with its reason (400, `invalid`).
    fn fields(status: StatusCode, code: &'static str, fields: Vec<FieldError>) -> Self {
        let message = fields.iter().map(|f| format!("{}: {}", f.field, f.message)).collect::<Vec<_>>().join("; ");
        ApiError { status, code, message, fields }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.code.to_owned(), message: self.message, fields: self.fields };
        (self.status, Json(body)).into_response()
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::NotFound(id) => ApiError::not_found(format!("no VM {id:?}")),
            HostError::Conflict(m) => ApiError::conflict(m),
            HostError::BadRequest(m) => ApiError::bad(m),
            HostError::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, "bad_request", e.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<ConnectInfo<Peer>>().map(|c| &c.0) {
            Some(Peer::Unix { uid }) => {
                // SAFETY: getuid has no arguments and cannot fail.
                let me = unsafe { libc::getuid() };
                if *uid == Some(me) {
                    Ok(Principal::local_owner())
                } else {
                    Err(ApiError::forbidden("only the user who runs the daemon may use its Unix socket"))
                }
            }
            Some(Peer::Tcp(addr)) => {
                let header = parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
                let token = header
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .ok_or_else(|| ApiError::unauthorized("an API token is needed: Authorization: Bearer TOKEN"))?;
                app.tokens.check(token.trim()).ok_or_else(|| {
                    log::info!("{addr}: refused an unknown or revoked token");
                    ApiError::unauthorized("the token is unknown or revoked")
                })
            }
            None => Err(ApiError::unauthorized("unknown connection")),
        }
    }
}

fn require(p: &Principal, role: Role) -> ApiResult<()> {
    if p.role >= role {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            format!("this needs the {role:?} role; token {:?} is {:?}", p.name, p.role).to_lowercase(),
        ))
    }
}

fn require_vm(p: &Principal, role: Role, id: &str) -> ApiResult<()> {
    require(p, role)?;
    if p.may_see(id) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("token {:?} has no access to VM {id:?}", p.name)))
    }
}

impl App {
    pub fn new(
        host: Arc<Host>,
        tokens: Arc<Tokens>,
        stats: Arc<Stats>,
        data_dir: PathBuf,
        upload_limit: u64,
        ticket_lifetime: Duration,
    ) -> Arc<Self> {
        Arc::new(App {
            host,
            tokens,
            stats,
            data_dir,
            upload_limit,
            osinfo: Arc::new(crate::osinfo::Osinfo::from_env()),
            ticket_lifetime,
            tickets: Mutex::new(HashMap::new()),
            tasks: Mutex::new(BTreeMap::new()),
            cancels: Mutex::new(HashMap::new()),
            screenshots: tokio::sync::Semaphore::new(SCREENSHOTS_AT_ONCE),
        })
    }

    fn new_task(&self, what: String, total: u64) -> String {
        let id = random_hex(8);
        let mut tasks = lock(&self.tasks);
        if tasks.len() >= TASKS_KEPT {
            let done: Vec<String> = tasks
                .iter()
                .filter(|(_, t)| t.state != TaskState::Running)
                .map(|(k, _)| k.clone())
                .take(tasks.len() / 2)
                .collect();
            for k in done {
                tasks.remove(&k);
            }
        }
        tasks.insert(id.clone(), Task { id: id.clone(), what, total, started_ms: now_ms(), ..Task::default() });
        id
    }

    /// [`App::new_task`] for a task that `POST /tasks/{id}/cancel` can stop: returns its cancel switch too.
    /// The task calls [`App::end_task`] when it ends.
    fn new_cancellable_task(&self, what: String, total: u64) -> (String, Arc<Cancel>) {
        let id = self.new_task(what, total);
        self.update_task(&id, |t| t.cancellable = true);
        let cancel = Arc::new(Cancel::default());
        lock(&self.cancels).insert(id.clone(), cancel.clone());
        (id, cancel)
    }

    /// Ends task `id` as `f` leaves it: its cancel switch goes; it cannot be cancelled any more.
    fn end_task(&self, id: &str, f: impl FnOnce(&mut Task)) {
        lock(&self.cancels).remove(id);
        self.update_task(id, |t| {
            t.cancellable = false;
            f(t)
        });
    }

    fn update_task(&self, id: &str, f: impl FnOnce(&mut Task)) {
        if let Some(t) = lock(&self.tasks).get_mut(id) {
            f(t);
        }
    }

    fn task(&self, id: &str) -> Option<Task> {
        lock(&self.tasks).get(id).cloned()
    }
}

/// The API's routes (`/api/v1/...`), as the OpenAPI document lists them.
pub fn router(app: AppState) -> Router {
    let api = Router::new()
        .route("/host", get(host_info))
        .route("/host/stats", get(host_stats))
        .route("/openapi.json", get(openapi))
        .route("/vms", get(list_vms).post(create_vm))
        .route("/vms/{id}", get(get_vm).patch(update_vm).delete(delete_vm))
        .route("/vms/{id}/{action}", post(vm_action))
        .route("/vms/{id}/media", post(change_media))
        .route("/vms/{id}/disks", post(add_disk))
        .route("/vms/{id}/disks/{drive}", axum::routing::delete(remove_disk))
        .route("/vms/{id}/disks/{drive}/size", post(grow_disk))
        .route("/vms/{id}/disks/{drive}/limits", put(set_disk_limits))
        .route("/vms/{id}/cdroms", post(add_cdrom))
        .route("/vms/{id}/cdroms/{drive}", axum::routing::delete(remove_cdrom))
        .route("/vms/{id}/snapshots", get(list_snapshots).post(take_snapshot))
        .route("/vms/{id}/snapshots/{sid}", axum::routing::delete(delete_snapshot))
        .route("/vms/{id}/snapshots/{sid}/revert", post(revert_snapshot))
        .route("/vms/{id}/clone", post(clone_vm))
        .route("/vms/{id}/nics/{nic}/link", post(set_nic_link))
        .route("/vms/{id}/nics/{nic}/limits", put(set_nic_limits))
        .route("/vms/{id}/console", post(console_ticket))
        .route("/vms/{id}/serial", get(serial))
        .route("/vms/{id}/serial/stream", get(serial_stream))
        .route("/vms/{id}/serial/input", post(serial_input))
        .route("/vms/{id}/screenshot", get(screenshot))
        .route("/vms/{id}/stats", get(stats))
        .route("/console", get(console))
        .route("/images", get(list_images))
        .route("/images/{name}", put(upload_image).delete(delete_image))
        .route("/osinfo/identify", post(identify_os))
        .route("/tasks", get(list_tasks))
        .route("/tasks/{id}", get(get_task))
        .route("/tasks/{id}/cancel", post(cancel_task));
    Router::new()
        .nest(porthole_api::API_PREFIX, api)
        .fallback(|| async {
            ApiError::not_found("no such endpoint (the API lives under /api/v1; see /api/v1/openapi.json)")
        })
        .with_state(app)
}

async fn host_info(State(app): State<AppState>, p: Principal) -> ApiResult<Json<HostInfo>> {
    require(&p, Role::Viewer)?;
    let (free, total) = {
        let path = std::ffi::CString::new(app.data_dir.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } == 0 {
            (s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize)
        } else {
            (0, 0)
        }
    };
    let host = app.host.clone();
    let images_bytes = tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::MetadataExt;
        let dir = host.store.images_dir();
        host.store
            .images()
            .iter()
            .filter_map(|(name, _)| std::fs::metadata(dir.join(name)).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    })
    .await
    .unwrap_or(0);
    let vms = app.host.list();
    let running: Vec<&Vm> =
        vms.iter().filter(|v| !matches!(v.state, VmState::Stopped | VmState::Suspended | VmState::Crashed)).collect();
    let facts = crate::stats::host_facts();
    Ok(Json(HostInfo {
        hostname: crate::tls::hostname().unwrap_or_else(|| "localhost".into()),
        version: porthole_api::VERSION.into(),
        cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        memory_mib: facts.memory_mib,
        free_disk_bytes: free,
        vms: vms.len() as u64,
        problems: app.host.problems.clone(),
        upload_limit_bytes: app.upload_limit,
        osinfo_db: app.osinfo.version(),
        memory_available_mib: facts.memory_available_mib,
        disk_total_bytes: total,
        images_bytes,
        vm_disks_bytes: vms.iter().map(|v| v.disk_allocated_bytes).sum(),
        running_vms: running.len() as u64,
        vcpus_allocated: running.iter().map(|v| u64::from(v.vcpus)).sum(),
        memory_allocated_mib: running.iter().map(|v| v.memory_mib).sum(),
        cpu_model: facts.cpu_model,
        kernel: facts.kernel,
        uptime_s: facts.uptime_s,
        data_dir: app.host.store.images_dir().parent().map(|d| d.display().to_string()).unwrap_or_default(),
    }))
}

/// `GET /host/stats?since=T_MS&resolution=s|min`: the host's own samples (CPU of every core, memory in
/// use, and the disk and network rates of its VMs together).
async fn host_stats(
    State(app): State<AppState>,
    p: Principal,
    Query(q): Query<StatsQuery>,
) -> ApiResult<Json<StatsBody>> {
    require(&p, Role::Viewer)?;
    stats_reply(&app, crate::stats::HOST, &q)
}

fn stats_reply(app: &App, key: &str, q: &StatsQuery) -> ApiResult<Json<StatsBody>> {
    let minutes = match q.resolution.as_deref() {
        None | Some("s") => false,
        Some("min") => true,
        Some(other) => return Err(ApiError::bad(format!("resolution {other:?} is not s or min"))),
    };
    Ok(Json(StatsBody {
        interval_s: if minutes { 60 } else { 1 },
        samples: app.stats.samples(key, q.since.unwrap_or(0), minutes),
    }))
}

/// The names of the VMs that use library image `name`: as their CD, kernel or initrd, or as their disk's
/// read-only base.
fn image_users(app: &App, name: &str) -> Vec<String> {
    let mut users: Vec<String> = app
        .host
        .list()
        .into_iter()
        .filter(|v| {
            v.media.as_deref() == Some(name)
                || v.boot.as_ref().is_some_and(|b| b.kernel == name || b.initrd.as_deref() == Some(name))
        })
        .map(|v| v.name)
        .chain(
            app.host
                .records()
                .into_values()
                .filter(|r| r.extra_cdroms.iter().any(|c| c.media.as_deref() == Some(name)))
                .map(|r| r.name),
        )
        .chain(crate::disks::users_of_image(&app.host.records(), name))
        .collect();
    users.sort();
    users.dedup();
    users
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

async fn list_vms(State(app): State<AppState>, p: Principal) -> ApiResult<Response> {
    require(&p, Role::Viewer)?;
    if p.vms.is_none() {
        let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
        return Ok((json, app.host.list_json()).into_response());
    }
    Ok(Json(app.host.list().into_iter().filter(|v| p.may_see(&v.id)).collect::<Vec<Vm>>()).into_response())
}

async fn get_vm(State(app): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<Json<Vm>> {
    require_vm(&p, Role::Viewer, &id)?;
    let mut vm = app.host.get(&id)?;
    if vm.boot.is_none() && app.host.pid(&id).is_some() {
        vm.boot_status = crate::host::firmware_boot_status(&app.host.run_files(&id).firmware_log());
    }
    match app.host.live_status(&id).await {
        Some(Ok(live)) => {
            vm.nic_status = live.nics;
            let virtio = vm.input == porthole_api::InputMode::Virtio;
            vm.absolute_pointer = virtio.then_some(live.absolute_pointer);
            vm.virtio_keyboard = virtio.then_some(live.virtio_keyboard);
            vm.keyboard_leds = live.keyboard_leds.filter(|_| virtio);
            vm.display_follows = live.display_follows;
            vm.agent_connected = live.agent_connected;
            vm.memory_balloon = live.balloon;
        }
        Some(Err(why)) => vm.nic_status_error = Some(why),
        None => {}
    }
    Ok(Json(vm))
}

/// Where the host's network interfaces are listed (bridges have a `bridge` folder there).
const SYSFS_NET: &str = "/sys/class/net";

/// The cards a request asks for (`None`: the default card), checked against the host and the other VMs.
fn build_nics(
    app: &App,
    id: &str,
    specs: Option<&[NicSpec]>,
    current: &[NicDefinition],
) -> ApiResult<Vec<NicDefinition>> {
    let others = app.host.others(id);
    match specs {
        None => Ok(crate::net::default_nics(&others, &crate::net::probe_port)),
        Some(specs) => crate::net::build_nics(
            specs,
            current,
            &others,
            Some(crate::net::HostCheck { sysfs: std::path::Path::new(SYSFS_NET), probe: &crate::net::probe_port }),
        )
        .map_err(ApiError::bad),
    }
}

/// `POST /vms/{id}/nics/{nic}/link`: the running VM's virtual cable, plugged in or pulled.
async fn set_nic_link(
    State(app): State<AppState>,
    p: Principal,
    Path((id, nic)): Path<(String, String)>,
    body: Result<Json<LinkChange>, JsonRejection>,
) -> ApiResult<Json<NicStatus>> {
    require_vm(&p, Role::Operator, &id)?;
    let Json(req) = body?;
    match app.host.set_link(&id, &nic, req.up).await {
        Err(HostError::NotFound(_)) if app.host.record(&id).is_ok() => {
            Err(ApiError::not_found(format!("VM {id:?} has no network card {nic:?}")))
        }
        other => Ok(Json(other?)),
    }
}

/// `PUT /vms/{id}/nics/{nic}/limits`: a card's rate limits (both of them: an absent field is no limit). A
/// running VM's engine takes them at once; they stay in the definition for the next starts.
async fn set_nic_limits(
    State(app): State<AppState>,
    p: Principal,
    Path((id, nic)): Path<(String, String)>,
    body: Result<Json<NicLimits>, JsonRejection>,
) -> ApiResult<Json<NicDefinition>> {
    require_vm(&p, Role::Admin, &id)?;
    let Json(limits) = body?;
    let record = app.host.record(&id)?;
    if !record.nics().iter().any(|n| n.id == nic) {
        return Err(ApiError::not_found(format!("VM {} has no network card {nic:?}", record.name)));
    }
    let problems = limits.problems();
    if !problems.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, "invalid", problems));
    }
    app.host.update(&id, |r, _| {
        for card in r.nics.iter_mut().flatten().filter(|n| n.id == nic) {
            card.limits = limits;
        }
        Ok(())
    })?;
    if app.host.pid(&id).is_some() {
        app.host.set_live_nic_limits(&id, &nic, limits).await.map_err(|why| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "engine",
                format!("saved for the next start, but the running VM did not take them: {why}"),
            )
        })?;
    }
    let record = app.host.record(&id)?;
    let card = record.nics().iter().find(|n| n.id == nic).cloned();
    card.map(Json).ok_or_else(|| ApiError::not_found(format!("VM {} has no network card {nic:?}", record.name)))
}

fn check_shape(vcpus: u32, memory_mib: u64) -> ApiResult<()> {
    check_vcpus(vcpus).and_then(|()| check_memory(memory_mib)).map_err(ApiError::bad)
}

fn check_vcpus(vcpus: u32) -> Result<(), String> {
    if vcpus == 0 || vcpus > vmm_core::config::MAX_VCPUS {
        return Err(format!("vcpus must be 1-{}", vmm_core::config::MAX_VCPUS));
    }
    Ok(())
}

fn check_memory(memory_mib: u64) -> Result<(), String> {
    if memory_mib < vmm_core::config::MIN_MEMORY_MIB {
        return Err(format!("memory_mib must be at least {}", vmm_core::config::MIN_MEMORY_MIB));
    }
    if let Some(host) = vmm_core::config::host_memory_mib()
        && memory_mib > host
    {
        return Err(format!("memory_mib {memory_mib} is more than this host has ({host} MiB)"));
    }
    Ok(())
}

fn check_name(name: &str) -> ApiResult<()> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "name {name:?} is invalid: use 1-63 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// Tags in canonical form (sorted, no duplicates), or why they are refused.
fn check_tags(tags: &[String]) -> ApiResult<Vec<String>> {
    use porthole_api::{MAX_TAG_LEN, MAX_TAGS};
    let mut out: Vec<String> = Vec::new();
    for t in tags {
        if t.is_empty() || t.len() > MAX_TAG_LEN || !t.chars().all(|c| c.is_alphanumeric() || "-_.:".contains(c)) {
            return Err(ApiError::bad(format!(
                "tag {t:?} is invalid: use 1-{MAX_TAG_LEN} letters, digits, '-', '_', '.' or ':'"
            )));
        }
        if !out.contains(t) {
            out.push(t.clone());
        }
    }
    if out.len() > MAX_TAGS {
        return Err(ApiError::bad(format!("at most {MAX_TAGS} tags")));
    }
    out.sort();
    Ok(out)
}

/// Most a new disk may be (64 TiB).
const MAX_DISK_GIB: u64 = porthole_api::MAX_DISK_GIB;

async fn create_vm(
    State(app): State<AppState>,
    p: Principal,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    require(&p, Role::Admin)?;
    let Json(req) = body?;
    check_name(&req.name)?;
    check_shape(req.vcpus, req.memory_mib)?;
    let mut cpu_errors = Vec::new();
    if let Some(Err(e)) = req.max_vcpus.filter(|&m| m != 0).map(|m| check_max_vcpus(m, req.vcpus)) {
        cpu_errors.push(field("max_vcpus", e));
    }
    if let Some(Err(e)) = req.cpu_cap_percent.filter(|&c| c != 0).map(|c| check_cpu_cap(c, req.vcpus)) {
        cpu_errors.push(field("cpu_cap_percent", e));
    }
    if let Some(Err(e)) = req.cpu_weight.filter(|&w| w != 0).map(check_cpu_weight) {
        cpu_errors.push(field("cpu_weight", e));
    }
    if !cpu_errors.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, "invalid", cpu_errors));
    }
    if req.disk_gib > MAX_DISK_GIB {
        return Err(ApiError::bad(format!("disk_gib must be at most {MAX_DISK_GIB}")));
    }
    if let Some(boot) = &req.boot {
        app.host.resolve_image(&boot.kernel, p.role == Role::Admin)?;
        if let Some(initrd) = &boot.initrd {
            app.host.resolve_image(initrd, p.role == Role::Admin)?;
        }
    }
    if let Some(media) = &req.media {
        app.host.resolve_image(media, false)?;
    }
    let tags = check_tags(&req.tags)?;
    let format = req.disk_format.unwrap_or_default();
    let disk_image = req.disk_image.as_deref().map(|i| app.host.resolve_image(i, false)).transpose()?;
    if let Some(c) = &req.cloud_init {
        if req.disk_image.is_none() {
            return Err(ApiError::bad("cloud_init needs disk_image: the cloud image (raw or qcow2) from the library"));
        }
        if format == DiskFormat::Raw {
            return Err(ApiError::bad(
                "a VM from a cloud image has a qcow2 disk (an overlay on the image): disk_format raw cannot be had",
            ));
        }
        crate::cloud_init::check(&c.hostname, &c.user, &c.ssh_authorized_keys).map_err(ApiError::bad)?;
    }
    if app.host.list().iter().any(|v| v.name == req.name) {
        return Err(ApiError::conflict(format!("a VM named {:?} exists already", req.name)));
    }
    let id = random_hex(6);
    let nics = build_nics(&app, &id, req.nics.as_deref(), &[])?;
    let record = VmRecord {
        id: id.clone(),
        name: req.name,
        vcpus: req.vcpus,
        max_vcpus: req.max_vcpus.filter(|&m| m > req.vcpus),
        memory_mib: req.memory_mib,
        disk_bytes: if disk_image.is_some() { 0 } else { req.disk_gib << 30 },
        boot: req.boot,
        media: req.media,
        created_ms: now_ms(),
        tags,
        nics: Some(nics),
        input: req.input.unwrap_or(porthole_api::InputMode::Virtio),
        vga: req.vga.unwrap_or(porthole_api::VgaMode::Virtio),
        agent: req.agent.unwrap_or(porthole_api::AgentMode::Spice),
        sound: req.sound.unwrap_or(porthole_api::SoundMode::Hda),
        balloon: true,
        cpu_cap_percent: req.cpu_cap_percent.filter(|&c| c != 0),
        cpu_weight: req.cpu_weight.filter(|&w| w != 0),
        ..VmRecord::default()
    };
    let dir = app.host.store.vm_dir(&id);
    let host = app.host.clone();
    let made_dir = dir.clone();
    let (image_name, cloud_init, disk_gib) = (req.disk_image, req.cloud_init, req.disk_gib);
    let made = tokio::task::spawn_blocking(move || {
        use vmm_core::disk;
        let dir = made_dir;
        let mut record = record;
        let internal = |e: disk::DiskError| HostError::Internal(e.to_string());
        std::fs::create_dir_all(&dir)
            .map_err(|e| HostError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        let file = match format {
            DiskFormat::Qcow2 => crate::disks::QCOW2_DISK,
            DiskFormat::Raw => crate::disks::RAW_DISK,
        };
        let target = dir.join(file);
        match (disk_image, image_name, cloud_init) {
            (Some(source), Some(name), Some(c)) => {
                // The cloud image stays in the library, read-only under the VM's overlay (grown to disk_gib).
                let image_format = disk::probe_format(&source).map_err(internal)?;
                let size = disk::image_size(&source, &[])
                    .map_err(|e| HostError::BadRequest(format!("image {name:?} cannot be used as a disk: {e}")))?;
                let size = size.max(disk_gib << 30);
                let relative = format!("../../images/{name}");
                disk::create_qcow2(&target, size, Some((std::path::Path::new(&relative), image_format)))
                    .map_err(internal)?;
                let seed = crate::store::CloudInitRecord {
                    hostname: c.hostname,
                    user: c.user,
                    ssh_authorized_keys: c.ssh_authorized_keys.iter().map(|k| k.trim().to_owned()).collect(),
                    instance_id: crate::cloud_init::new_instance_id(),
                };
                crate::cloud_init::write_seed(&dir.join(crate::disks::SEED), &seed)
                    .map_err(|e| HostError::Internal(format!("cannot write the cloud-init seed: {e}")))?;
                record.cloud_init = Some(seed);
                record.disk_bytes = size;
                record.disk = Some(DiskRecord {
                    format: DiskFormat::Qcow2,
                    top: file.into(),
                    below: Some(Below::Image { name }),
                });
            }
            (Some(source), _, _) => {
                // A sparse copy in the VM's format, so the library's image stays a template that other VMs can
                // start from too.
                let wanted = crate::disks::to_image_format(format);
                disk::copy_image(&source, &[], &target, wanted, &mut |_, _| {}).map_err(|e| match e {
                    disk::DiskError::Create { .. } => internal(e),
                    other => HostError::BadRequest(format!("the image cannot be used as a disk: {other}")),
                })?;
                record.disk_bytes = disk::image_size(&target, &[]).map_err(internal)?;
                record.disk = Some(DiskRecord { format, top: file.into(), below: None });
            }
            _ if record.disk_bytes > 0 => {
                match format {
                    DiskFormat::Qcow2 => disk::create_qcow2(&target, record.disk_bytes, None),
                    DiskFormat::Raw => disk::create_raw_image(&target, record.disk_bytes),
                }
                .map_err(internal)?;
                record.disk = Some(DiskRecord { format, top: file.into(), below: None });
            }
            _ => {}
        }
        host.insert(record)
    })
    .await
    .map_err(|e| HostError::Internal(e.to_string()))
    .and_then(|r| r);
    match made {
        Ok(vm) => Ok((StatusCode::CREATED, Json(vm))),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e.into())
        }
    }
}

/// A VM's settings change (`PATCH /vms/{id}`). Every field is checked first, and when any is refused nothing
/// changes (400 `invalid`, with each refused field's reason). What can change while the VM runs (name, tags,
/// description, autostart) changes at once; the hardware, the boot settings and the disk's size of a running
/// (or suspended) VM are kept as pending and applied at its next start from power-on (see
/// [`crate::host::apply_pending`]).
async fn update_vm(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    body: Result<Json<UpdateVm>, JsonRejection>,
) -> ApiResult<Json<Vm>> {
    require_vm(&p, Role::Admin, &id)?;
    let Json(req) = body?;
    let record = app.host.record(&id)?;
    let mut errors: Vec<FieldError> = Vec::new();
    let mut refuse = |field: &str, message: String| errors.push(FieldError { field: field.into(), message });
    if let Some(name) = &req.name {
        if let Err(e) = check_name(name) {
            refuse("name", e.message);
        } else if app.host.list().iter().any(|v| v.id != id && v.name == *name) {
            refuse("name", format!("a VM named {name:?} exists already"));
        }
    }
    if let Some(Err(e)) = req.vcpus.map(check_vcpus) {
        refuse("vcpus", e);
    }
    if let Some(Err(e)) = req.max_vcpus.filter(|&m| m != 0).map(|m| check_max_vcpus(m, 1)) {
        refuse("max_vcpus", e);
    }
    if let Some(Err(e)) = req.memory_mib.map(check_memory) {
        refuse("memory_mib", e);
    }
    let vcpus = req.vcpus.unwrap_or(record.vcpus);
    if let Some(Err(e)) = req.cpu_cap_percent.filter(|&c| c != 0).map(|c| check_cpu_cap(c, vcpus)) {
        refuse("cpu_cap_percent", e);
    }
    if let Some(Err(e)) = req.cpu_weight.filter(|&w| w != 0).map(check_cpu_weight) {
        refuse("cpu_weight", e);
    }
    if let Some(boot) = &req.boot {
        if req.firmware_boot == Some(true) {
            refuse("boot", "give a kernel (boot) or firmware_boot, not both".into());
        } else if let Err(e) = app.host.resolve_image(&boot.kernel, true) {
            refuse("boot", format!("kernel: {}", e));
        } else if let Some(Err(e)) = boot.initrd.as_deref().map(|i| app.host.resolve_image(i, true)) {
            refuse("boot", format!("initrd: {}", e));
        }
    }
    let tags = match req.tags.as_deref().map(check_tags).transpose() {
        Ok(t) => t,
        Err(e) => {
            refuse("tags", e.message);
            None
        }
    };
    if let Some(d) = &req.description
        && d.len() > porthole_api::MAX_DESCRIPTION
    {
        refuse("description", format!("at most {} bytes (it is {})", porthole_api::MAX_DESCRIPTION, d.len()));
    }
    if let Some(order) = &req.boot_order {
        let dup = order.iter().enumerate().any(|(i, d)| order[..i].contains(d));
        if order.is_empty() || dup {
            refuse("boot_order", "name cdrom, disk or both, each once".into());
        }
    }
    if let Some(d) = req.display
        && (!porthole_api::DISPLAY_WIDTHS.contains(&d.width)
            || !porthole_api::DISPLAY_HEIGHTS.contains(&d.height)
            || d.width % 8 != 0)
    {
        refuse(
            "display",
            format!(
                "{}x{} is not supported: widths {}-{} in steps of 8, heights {}-{}",
                d.width,
                d.height,
                porthole_api::DISPLAY_WIDTHS.start(),
                porthole_api::DISPLAY_WIDTHS.end(),
                porthole_api::DISPLAY_HEIGHTS.start(),
                porthole_api::DISPLAY_HEIGHTS.end()
            ),
        );
    }
    let clones = crate::disks::clones_of(&app.host.records(), &id);
    if let Some(size) = req.disk_bytes
        && size != record.disk_bytes
    {
        if record.disk.is_none() && crate::disks::legacy_disk(&record).is_none() {
            refuse("disk_bytes", "the VM has no disk".into());
        } else if size < record.disk_bytes {
            refuse("disk_bytes", format!("a disk only grows: it is {} bytes", record.disk_bytes));
        } else if size % vmm_core::disk::SECTOR_SIZE != 0 {
            refuse("disk_bytes", "give a multiple of 512 bytes".into());
        } else if size > MAX_DISK_GIB << 30 {
            refuse("disk_bytes", format!("at most {MAX_DISK_GIB} GiB"));
        } else if !clones.is_empty() {
            refuse(
                "disk_bytes",
                format!("the disk is the read-only base of linked clones (used by: {})", clones.join(", ")),
            );
        }
    }
    let running = app.host.pid(&id).is_some();
    let nics = match &req.nics {
        None => None,
        Some(specs) => {
            // The VM's own forwards are bound while it runs: only new ones must open now.
            let current: Vec<porthole_api::PortForward> =
                record.nics().iter().flat_map(|n| n.forwards.iter().cloned()).collect();
            let probe = |f: &porthole_api::PortForward| {
                if running && current.contains(f) { Ok(()) } else { crate::net::probe_port(f) }
            };
            let check = crate::net::HostCheck { sysfs: std::path::Path::new(SYSFS_NET), probe: &probe };
            match crate::net::build_nics(specs, record.nics(), &app.host.others(&id), Some(check)) {
                Ok(n) => Some(n),
                Err(e) => {
                    errors.push(FieldError { field: "nics".into(), message: e });
                    None
                }
            }
        }
    };
    if let Some(target) = req.memory_target_mib {
        let floor = vmm_core::virtio::balloon::floor_mib(record.memory_mib);
        if !running {
            errors.push(field("memory_target_mib", "applies to a running VM (a VM starts with all of its memory)"));
        } else if !record.balloon {
            errors.push(field("memory_target_mib", "the VM has no memory balloon"));
        } else if target < floor || target > record.memory_mib {
            let why = format!(
                "{target} MiB is out of range: from {floor} MiB (10% of the VM's {} MiB, at least {} MiB) to {} MiB",
                record.memory_mib,
                vmm_core::virtio::balloon::FLOOR_MIN_MIB,
                record.memory_mib
            );
            errors.push(field("memory_target_mib", why));
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, "invalid", errors));
    }
    // The balloon first: when the engine refuses, nothing else has changed.
    let balloon = match req.memory_target_mib {
        Some(target) => Some(app.host.set_live_balloon(&id, target).await.map_err(|why| {
            ApiError::fields(StatusCode::BAD_REQUEST, "invalid", vec![field("memory_target_mib", why)])
        })?),
        None => None,
    };
    // The disk of a stopped VM grows now (the VM cannot start meanwhile); a running VM's engine grows it
    // live (the guest is told); a suspended VM's at its next start.
    let mut hardware = crate::host::hardware_change(&req);
    let defer = running || record.suspended.is_some();
    // More vCPUs for a running VM, up to the maximum it started with, are hot-added now.
    let live_vcpus = match req.vcpus {
        Some(n) if running && record.suspended.is_none() && n > record.vcpus && n <= record.max_vcpus.unwrap_or(0) => {
            let now = app
                .host
                .set_live_vcpus(&id, n)
                .await
                .map_err(|why| ApiError::fields(StatusCode::BAD_REQUEST, "invalid", vec![field("vcpus", why)]))?;
            hardware.vcpus = None;
            Some(now)
        }
        _ => None,
    };
    let live_grown = match req.disk_bytes {
        Some(size) if running && record.suspended.is_none() && size > record.disk_bytes => {
            app.host.grow_live_disk(&id, "disk0", size).await.map_err(|why| {
                ApiError::new(StatusCode::BAD_GATEWAY, "engine", format!("the running VM did not grow its disk: {why}"))
            })?;
            hardware.disk_bytes = None;
            Some(size)
        }
        _ => None,
    };
    let busy = match req.disk_bytes {
        Some(size) if !defer && size > record.disk_bytes => {
            let busy = app.host.begin(&id, "growing its disk")?;
            if app.host.pid(&id).is_some() {
                return Err(ApiError::conflict("the VM started meanwhile: try again"));
            }
            let (host, all, r) = (app.host.clone(), app.host.records(), record.clone());
            tokio::task::spawn_blocking(move || crate::disks::grow(&host, &all, &r, 0, size))
                .await
                .map_err(|e| HostError::Internal(e.to_string()))??;
            Some(busy)
        }
        _ => None,
    };
    let grown = busy.is_some();
    // New forwards of a running VM's user cards (nothing else of its cards changed) apply at once: each such
    // card moves to a new passt. Other card changes wait for the next start.
    let live_forwards = match &nics {
        Some(new) if running && record.suspended.is_none() && crate::net::only_forwards_differ(record.nics(), new) => {
            for (old, card) in record.nics().iter().zip(new).filter(|(o, n)| o.forwards != n.forwards) {
                app.host.replace_live_forwards(&id, card.clone(), old.forwards.clone()).await.map_err(|why| {
                    ApiError::new(StatusCode::CONFLICT, "engine", format!("the running VM's forwards: {why}"))
                })?;
            }
            true
        }
        _ => false,
    };
    let vm = app.host.update(&id, |r, running| {
        if let Some(t) = req.template
            && t != r.template
        {
            if running || r.suspended.is_some() {
                return Err(HostError::Conflict(
                    "only a stopped VM becomes a template or goes back to being a VM: power it off first".into(),
                ));
            }
            if !t && !clones.is_empty() {
                return Err(HostError::Conflict(format!(
                    "linked clones use this template (used by: {}): it stays a template while they exist",
                    clones.join(", ")
                )));
            }
            r.template = t;
        }
        let nics_change = UpdateVm { nics: nics.map(|n| n.iter().map(NicSpec::from).collect()), ..UpdateVm::default() };
        if let Some(n) = req.name {
            r.name = n;
        }
        if let Some(t) = tags {
            r.tags = t;
        }
        if let Some(d) = req.description {
            r.description = d;
        }
        if let Some(a) = req.autostart {
            r.autostart = a;
        }
        // CPU limits change at once, running or not (the cgroup's files below).
        if let Some(c) = req.cpu_cap_percent {
            r.cpu_cap_percent = (c != 0).then_some(c);
        }
        if let Some(w) = req.cpu_weight {
            r.cpu_weight = (w != 0).then_some(w);
        }
        if let Some(size) = live_grown {
            r.disk_bytes = r.disk_bytes.max(size);
        }
        if let Some(n) = live_vcpus {
            // The VM has them now, and keeps them: an earlier pending count is superseded.
            r.vcpus = r.vcpus.max(n);
            crate::host::add_pending(r, UpdateVm { vcpus: Some(r.vcpus), ..UpdateVm::default() });
        }
        if live_forwards {
            // In effect already; a pending change of the cards is superseded.
            crate::host::add_pending(r, nics_change.clone());
            crate::host::apply_hardware(r, &nics_change);
            crate::host::add_pending(r, hardware);
        } else if running || r.suspended.is_some() {
            crate::host::add_pending(r, hardware);
            crate::host::add_pending(r, nics_change);
        } else {
            crate::host::add_pending(r, nics_change.clone());
            crate::host::apply_hardware(r, &nics_change);
            // What was pending for these fields is superseded by the new values, which apply now; a disk that
            // was not grown above (the VM was running then) grows at the next start.
            let (mut now, mut later) = (hardware.clone(), UpdateVm::default());
            if !grown {
                later.disk_bytes = now.disk_bytes.take();
            }
            crate::host::add_pending(r, now.clone());
            crate::host::apply_hardware(r, &now);
            crate::host::add_pending(r, later);
        }
        Ok(())
    })?;
    if (req.cpu_cap_percent.is_some() || req.cpu_weight.is_some()) && app.host.pid(&id).is_some() {
        let record = app.host.record(&id)?;
        app.host.set_cpu_limits(&id, crate::host::cpu_limits_of(&record));
        let mut vm = app.host.get(&id)?;
        vm.memory_balloon = balloon;
        return Ok(Json(vm));
    }
    let mut vm = vm;
    vm.memory_balloon = balloon;
    Ok(Json(vm))
}

async fn delete_vm(State(app): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<StatusCode> {
    require_vm(&p, Role::Admin, &id)?;
    app.host.delete(&id)?;
    app.stats.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ShutdownQuery {
    /// Seconds to wait before forcing the VM off (default 30, at most 300).
    timeout_s: Option<u64>,
}

async fn vm_action(
    State(app): State<AppState>,
    p: Principal,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<ShutdownQuery>,
) -> ApiResult<Response> {
    require_vm(&p, Role::Operator, &id)?;
    let host = &app.host;
    match action.as_str() {
        "start" => Ok(Json(host.start(&id).await?).into_response()),
        "suspend" => {
            host.suspend(&id).await?;
            Ok(Json(host.get(&id)?).into_response())
        }
        "poweroff" if host.pid(&id).is_none() && host.record(&id)?.suspended.is_some() => {
            // A suspended VM powered off: its saved state is dropped; it starts from power-on next time.
            let file = host.record(&id)?.suspended;
            host.update(&id, |r, _| {
                r.suspended = None;
                Ok(())
            })?;
            if let Some(f) = file {
                let _ = std::fs::remove_file(host.store.vm_dir(&id).join(f));
            }
            Ok(Json(host.get(&id)?).into_response())
        }
        "pause" => {
            host.control(&id, Request::Pause).await?;
            host.set_state(&id, VmState::Paused, false);
            Ok(Json(host.get(&id)?).into_response())
        }
        "resume" => {
            host.control(&id, Request::Resume).await?;
            host.set_state(&id, VmState::Running, false);
            Ok(Json(host.get(&id)?).into_response())
        }
        "reset" => {
            host.control(&id, Request::Reset).await?;
            host.reset_done(&id);
            Ok(Json(host.get(&id)?).into_response())
        }
        "poweroff" => {
            host.set_state(&id, VmState::Stopping, true);
            host.control(&id, Request::Poweroff).await?;
            host.wait_stopped(&id, Duration::from_secs(10)).await;
            Ok(Json(host.get(&id)?).into_response())
        }
        "shutdown" => {
            let timeout = Duration::from_secs(q.timeout_s.unwrap_or(30).clamp(1, 300));
            host.set_state(&id, VmState::Stopping, true);
            host.control(&id, Request::Stop).await?;
            let (task, cancel) = app.new_cancellable_task(format!("shut down {id}"), 1);
            let (app2, task2, id2) = (app.clone(), task.clone(), id.clone());
            tokio::spawn(async move {
                // Cancelling stops the wait: the guest keeps its request to shut down but is not forced off.
                let stopped = tokio::select! {
                    stopped = app2.host.wait_stopped(&id2, timeout) => Some(stopped),
                    () = cancel.cancelled() => None,
                };
                if stopped == Some(false) {
                    // The guest ignored the power button: force it off.
                    let _ = app2.host.control(&id2, Request::Poweroff).await;
                    app2.host.wait_stopped(&id2, Duration::from_secs(10)).await;
                }
                if stopped.is_none() {
                    // Still running: no longer "stopping" (the guest may still act on the power button).
                    app2.host.set_state(&id2, VmState::Running, false);
                    app2.host.clear_stop_request(&id2);
                }
                app2.end_task(&task2, |t| match stopped {
                    None => t.state = TaskState::Cancelled,
                    Some(stopped) => {
                        t.done = 1;
                        t.state = TaskState::Done;
                        if !stopped {
                            t.error =
                                Some(format!("the guest did not shut down within {timeout:?}; it was powered off"));
                        }
                    }
                });
            });
            Ok((StatusCode::ACCEPTED, Json(app.task(&task))).into_response())
        }
        other => Err(ApiError::not_found(format!(
            "no action {other:?}: start, shutdown, poweroff, reset, pause, resume, suspend"
        ))),
    }
}

async fn change_media(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    body: Result<Json<MediaChange>, JsonRejection>,
) -> ApiResult<Json<Vm>> {
    require_vm(&p, Role::Operator, &id)?;
    let Json(req) = body?;
    let record = app.host.record(&id)?;
    let drive = req.drive.clone().unwrap_or_else(|| "cdrom0".into());
    let Some(DriveSlot::Cdrom(n)) = drive_slot(&record, &drive) else {
        return Err(ApiError::not_found(format!("VM {} has no CD/DVD drive {drive:?}", record.name)));
    };
    let path = req.image.as_deref().map(|i| app.host.resolve_image(i, false)).transpose()?;
    if app.host.pid(&id).is_some() {
        let drive = Some(drive.clone());
        let request = match path {
            Some(path) => Request::AttachMedia { path, drive },
            None => Request::EjectMedia { drive },
        };
        app.host.control(&id, request).await?;
    }
    Ok(Json(app.host.update(&id, |r, _| {
        match n {
            0 => r.media = req.image,
            n => {
                let c = r.extra_cdroms.get_mut(n - 1).ok_or_else(|| HostError::Conflict("the drive is gone".into()))?;
                c.media = req.image;
            }
        }
        Ok(())
    })?))
}

/// Where drive `drive` (`disk1`, `cdrom0`) of VM `r` is in its definition.
fn drive_slot(r: &VmRecord, drive: &str) -> Option<DriveSlot> {
    crate::host::drive_slots(r).into_iter().find(|(id, _)| id == drive).map(|(_, s)| s)
}

/// The drive of VM `id` at `slot`, as the API shows it.
fn drive_info(app: &App, id: &str, slot: DriveSlot) -> ApiResult<DriveInfo> {
    let r = app.host.record(id)?;
    let index = crate::host::drive_slots(&r).iter().position(|(_, s)| *s == slot);
    index
        .and_then(|i| crate::host::drives(&r, &app.host.store).into_iter().nth(i))
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the drive is not listed"))
}

/// A CPU cap in percent of one CPU: at least 1, at most all of the VM's vCPUs.
/// A maximum of vCPUs for a VM of `vcpus`: no fewer, and what the engine supports.
fn check_max_vcpus(max: u32, vcpus: u32) -> Result<(), String> {
    if max < vcpus {
        return Err(format!("at least the VM's {vcpus} vCPUs (0: no room for more)"));
    }
    check_vcpus(max).map_err(|_| format!("at most {}", vmm_core::config::MAX_VCPUS))
}

fn check_cpu_cap(percent: u32, vcpus: u32) -> Result<(), String> {
    if percent > 100 * vcpus {
        Err(format!("at most {} (all {vcpus} vCPUs); 0 removes the cap", 100 * vcpus))
    } else {
        Ok(())
    }
}

/// A CPU weight: 1-10000 (100 is the default share).
fn check_cpu_weight(weight: u32) -> Result<(), String> {
    if weight > 10000 {
        Err("1 to 10000 (100 is the default share); 0 goes back to the default".into())
    } else {
        Ok(())
    }
}

fn field(field: &str, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

/// Why the drives of VM `r` cannot be added or removed now (409 `conflict`, the reasons under `state`):
/// hot-plug is not supported by the engine, a saved machine state (suspended, or a snapshot's) expects the
/// drives it was saved with, and with `disks` a snapshot freezes every disk and a linked clone's base never
/// changes.
fn drive_set_frozen(app: &App, r: &VmRecord, disks: bool) -> Option<ApiError> {
    let why = if app.host.pid(&r.id).is_some() {
        "the VM is running: drives are added and removed while it is stopped (the engine has no hot-plug); power \
         it off first"
            .to_owned()
    } else if r.suspended.is_some() {
        "the VM is suspended: its saved state expects the drives it has; start it and shut it down (or power it \
         off) first"
            .to_owned()
    } else if disks && !r.snapshots.is_empty() {
        format!(
            "the VM has snapshots ({}): each one holds a layer of every disk it had; delete the VM's snapshots \
             first",
            r.snapshots.len()
        )
    } else if let Some(s) = r.snapshots.iter().find(|s| s.state.is_some()) {
        format!("snapshot {:?} holds a running machine with the drives the VM has now: delete it first", s.name)
    } else {
        return None;
    };
    Some(ApiError::fields(StatusCode::CONFLICT, "conflict", vec![field("state", why)]))
}

/// Why VM `record` cannot take one more drive of `kind` (it has the most of that kind, or of all drives).
fn no_room_for(record: &VmRecord, kind: porthole_api::DriveKind) -> Option<FieldError> {
    let (disks, cds) = drive_counts(record);
    let (have, most, what) = match kind {
        porthole_api::DriveKind::Disk => (disks, porthole_api::MAX_DISKS, "disks"),
        porthole_api::DriveKind::Cdrom => (cds, porthole_api::MAX_CDROMS, "CD/DVD drives"),
    };
    if have >= most {
        Some(field("drives", format!("the VM has {have} {what}, the most it may have")))
    } else if disks + cds >= porthole_api::MAX_DRIVES {
        Some(field("drives", format!("the VM has {} drives, the most the engine takes", disks + cds)))
    } else {
        None
    }
}

/// How many disks (the cloud-init seed counted) and CD/DVD drives VM `r` has.
fn drive_counts(r: &VmRecord) -> (usize, usize) {
    let slots = crate::host::drive_slots(r);
    let cds = slots.iter().filter(|(_, s)| matches!(s, DriveSlot::Cdrom(_))).count();
    (slots.len() - cds, cds)
}

/// `POST /vms/{id}/disks`: a new disk (empty, or a copy of a library image) after the VM's others.
async fn add_disk(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<DriveInfo>)> {
    require_vm(&p, Role::Admin, &id)?;
    let Json(mut value) = body?;
    let record = app.host.record(&id)?;
    let mut errors = Vec::new();
    // An unknown format is the `format` field's fault, said like the other fields' reasons.
    if let Some(f) = value.get("format").filter(|f| !f.is_null())
        && serde_json::from_value::<DiskFormat>(f.clone()).is_err()
    {
        errors.push(field("format", format!("{f} is not a disk format: use qcow2 (the default) or raw")));
        if let Some(o) = value.as_object_mut() {
            o.remove("format");
        }
    }
    let req: AddDisk = serde_json::from_value(value).map_err(|e| ApiError::bad(format!("the request: {e}")))?;
    let format = req.format.unwrap_or_default();
    match (req.size_gib, &req.image) {
        (None, None) => errors.push(field("size_gib", "give the new disk's size (or an image to copy)")),
        (Some(0), _) => errors.push(field("size_gib", "at least 1 GiB")),
        (Some(g), _) if g > MAX_DISK_GIB => errors.push(field("size_gib", format!("at most {MAX_DISK_GIB} GiB"))),
        _ => {}
    }
    let source = match req.image.as_deref().map(|i| app.host.resolve_image(i, false)).transpose() {
        Ok(s) => s,
        Err(e) => {
            errors.push(field("image", e.to_string()));
            None
        }
    };
    if let Some(path) = &source
        && crate::store::image_facts(path).0 == porthole_api::ImageFormat::Iso
    {
        errors.push(field("image", "it is an ISO: put it in a CD/DVD drive (POST /vms/{id}/media)"));
    }
    errors.extend(no_room_for(&record, porthole_api::DriveKind::Disk));
    if !errors.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, "invalid", errors));
    }
    if let Some(e) = drive_set_frozen(&app, &record, true) {
        return Err(e);
    }
    let busy = app.host.begin(&id, "adding a disk")?;
    if app.host.pid(&id).is_some() {
        return Err(ApiError::conflict("the VM started meanwhile: try again"));
    }
    let slot = crate::disks::disk_slots(&record).len();
    let dir = app.host.store.vm_dir(&id);
    let ext = if format == DiskFormat::Raw { "img" } else { "qcow2" };
    let file = match (slot, format) {
        (0, DiskFormat::Qcow2) => crate::disks::QCOW2_DISK.to_owned(),
        (0, DiskFormat::Raw) => crate::disks::RAW_DISK.to_owned(),
        _ => loop {
            let f = format!("disk-{}.{ext}", random_hex(4));
            if !dir.join(&f).exists() {
                break f;
            }
        },
    };
    let target = dir.join(&file);
    if target.exists() {
        return Err(ApiError::conflict(format!("{} exists already in the VM's folder", target.display())));
    }
    let size_gib = req.size_gib;
    let made = tokio::task::spawn_blocking(move || -> Result<u64, HostError> {
        use vmm_core::disk;
        let internal = |e: disk::DiskError| HostError::Internal(e.to_string());
        let wanted = size_gib.unwrap_or(0) << 30;
        match source {
            Some(source) => {
                disk::copy_image(&source, &[], &target, crate::disks::to_image_format(format), &mut |_, _| {})
                    .map_err(|e| match e {
                        disk::DiskError::Create { .. } => internal(e),
                        other => HostError::BadRequest(format!("the image cannot be used as a disk: {other}")),
                    })?;
                let size = disk::image_size(&target, &[]).map_err(internal)?;
                if wanted > size {
                    disk::grow_image(&target, &[], wanted).map_err(internal)?;
                }
                Ok(size.max(wanted))
            }
            None => {
                match format {
                    DiskFormat::Qcow2 => disk::create_qcow2(&target, wanted, None),
                    DiskFormat::Raw => disk::create_raw_image(&target, wanted),
                }
                .map_err(internal)?;
                Ok(wanted)
            }
        }
    })
    .await
    .map_err(|e| HostError::Internal(e.to_string()))
    .and_then(|r| r);
    let saved = made.and_then(|size| {
        app.host.update(&id, |r, running| {
            if running || !r.snapshots.is_empty() || crate::disks::disk_slots(r).len() != slot {
                return Err(HostError::Conflict("the VM changed meanwhile: try again".into()));
            }
            if slot == 0 {
                r.disk = Some(DiskRecord { format, top: file.clone(), below: None });
                r.disk_bytes = size;
            } else {
                r.extra_disks.push(ExtraDisk { format, top: file.clone(), below: None, size_bytes: size });
            }
            Ok(())
        })
    });
    drop(busy);
    if let Err(e) = saved {
        let _ = std::fs::remove_file(dir.join(&file));
        return Err(e.into());
    }
    Ok((StatusCode::CREATED, Json(drive_info(&app, &id, DriveSlot::Disk(slot))?)))
}

/// `DELETE /vms/{id}/disks/{drive}`: a disk other than the boot disk goes, with its file.
async fn remove_disk(
    State(app): State<AppState>,
    p: Principal,
    Path((id, drive)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require_vm(&p, Role::Admin, &id)?;
    let record = app.host.record(&id)?;
    let slot = match drive_slot(&record, &drive) {
        Some(DriveSlot::Disk(0)) => {
            return Err(ApiError::conflict(
                "disk0 is the VM's boot disk (its snapshots, clones and cloud-init stand on it): it cannot be \
                 removed; delete the VM instead",
            ));
        }
        Some(DriveSlot::Seed) => {
            return Err(ApiError::conflict("the cloud-init seed belongs to the cloud image VM: it cannot be removed"));
        }
        Some(DriveSlot::Disk(n)) => n,
        _ => return Err(ApiError::not_found(format!("VM {} has no disk {drive:?}", record.name))),
    };
    if let Some(e) = drive_set_frozen(&app, &record, true) {
        return Err(e);
    }
    let clones = crate::disks::clones_of(&app.host.records(), &id);
    if !clones.is_empty() {
        return Err(ApiError::conflict(format!(
            "the VM's disks are the read-only base of linked clones (used by: {}): delete them first",
            clones.join(", ")
        )));
    }
    let _busy = app.host.begin(&id, "removing a disk")?;
    let top = record.extra_disks.get(slot - 1).map(|e| e.top.clone());
    app.host.update(&id, |r, running| {
        if running || !r.snapshots.is_empty() || r.extra_disks.get(slot - 1).map(|e| &e.top) != top.as_ref() {
            return Err(HostError::Conflict("the VM changed meanwhile: try again".into()));
        }
        r.extra_disks.remove(slot - 1);
        if slot < r.disk_limits.len() {
            r.disk_limits.remove(slot);
        }
        Ok(())
    })?;
    if let Some(top) = top {
        let _ = std::fs::remove_file(app.host.store.vm_dir(&id).join(top));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /vms/{id}/disks/{drive}/size`: grows a disk.
async fn grow_disk(
    State(app): State<AppState>,
    p: Principal,
    Path((id, drive)): Path<(String, String)>,
    body: Result<Json<GrowDisk>, JsonRejection>,
) -> ApiResult<Json<DriveInfo>> {
    require_vm(&p, Role::Admin, &id)?;
    let Json(req) = body?;
    let record = app.host.record(&id)?;
    let Some(DriveSlot::Disk(slot)) = drive_slot(&record, &drive) else {
        return Err(ApiError::not_found(format!("VM {} has no disk {drive:?} that can grow", record.name)));
    };
    let now = crate::disks::slot_size(&record, slot);
    let size = req.size_bytes;
    let clones = crate::disks::clones_of(&app.host.records(), &id);
    let refused = if size < now {
        Some(format!("a disk only grows: it is {now} bytes"))
    } else if size % vmm_core::disk::SECTOR_SIZE != 0 {
        Some("give a multiple of 512 bytes".into())
    } else if size > MAX_DISK_GIB << 30 {
        Some(format!("at most {MAX_DISK_GIB} GiB"))
    } else if !clones.is_empty() {
        Some(format!("the disk is the read-only base of linked clones (used by: {})", clones.join(", ")))
    } else {
        None
    };
    if let Some(why) = refused {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, "invalid", vec![field("size_bytes", why)]));
    }
    if size == now {
        return drive_info(&app, &id, DriveSlot::Disk(slot)).map(Json);
    }
    if app.host.pid(&id).is_some() && record.suspended.is_none() {
        // A running VM's engine grows the disk's present layer itself (it holds the image) and tells the
        // guest, which sees the new size at once.
        app.host.grow_live_disk(&id, &drive, size).await.map_err(|why| {
            ApiError::new(StatusCode::BAD_GATEWAY, "engine", format!("the running VM did not grow the disk: {why}"))
        })?;
        app.host.update(&id, |r, _| {
            crate::disks::set_slot_size(r, slot, crate::disks::slot_size(r, slot).max(size));
            crate::host::add_pending(r, UpdateVm::default());
            Ok(())
        })?;
        return drive_info(&app, &id, DriveSlot::Disk(slot)).map(Json);
    }
    if record.suspended.is_some() {
        if slot != 0 {
            return Err(ApiError::fields(
                StatusCode::CONFLICT,
                "conflict",
                vec![field("state", "the VM is suspended: its other disks grow while it is stopped or running")],
            ));
        }
        // A suspended VM's boot disk grows at the next start, as PATCH disk_bytes does.
        app.host.update(&id, |r, _| {
            crate::host::add_pending(r, UpdateVm { disk_bytes: Some(size), ..UpdateVm::default() });
            Ok(())
        })?;
        return drive_info(&app, &id, DriveSlot::Disk(slot)).map(Json);
    }
    let _busy = app.host.begin(&id, "growing a disk")?;
    if app.host.pid(&id).is_some() {
        return Err(ApiError::conflict("the VM started meanwhile: try again"));
    }
    let (host, all, r) = (app.host.clone(), app.host.records(), record.clone());
    tokio::task::spawn_blocking(move || crate::disks::grow(&host, &all, &r, slot, size))
        .await
        .map_err(|e| HostError::Internal(e.to_string()))??;
    app.host.update(&id, |r, _| {
        if slot == 0 {
            r.disk_bytes = r.disk_bytes.max(size);
            crate::host::add_pending(r, UpdateVm::default());
        } else if let Some(e) = r.extra_disks.get_mut(slot - 1) {
            e.size_bytes = e.size_bytes.max(size);
        }
        Ok(())
    })?;
    drive_info(&app, &id, DriveSlot::Disk(slot)).map(Json)
}

/// `PUT /vms/{id}/disks/{drive}/limits`: a disk's rate limits (all of them: an absent field is no limit).
/// A running VM's engine takes them at once; they stay in the definition for the next starts.
async fn set_disk_limits(
    State(app): State<AppState>,
    p: Principal,
    Path((id, drive)): Path<(String, String)>,
    body: Result<Json<porthole_api::DiskLimits>, JsonRejection>,
) -> ApiResult<Json<DriveInfo>> {
    require_vm(&p, Role::Admin, &id)?;
    let Json(limits) = body?;
    let record = app.host.record(&id)?;
    let Some(DriveSlot::Disk(slot)) = drive_slot(&record, &drive) else {
        return Err(ApiError::not_found(format!("VM {} has no disk {drive:?}", record.name)));
    };
    let problems = limits.problems();
    if !problems.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, "invalid", problems));
    }
    app.host.update(&id, |r, _| {
        if r.disk_limits.len() <= slot {
            r.disk_limits.resize(slot + 1, porthole_api::DiskLimits::default());
        }
        r.disk_limits[slot] = limits;
        while r.disk_limits.last().is_some_and(porthole_api::DiskLimits::is_none) {
            r.disk_limits.pop();
        }
        Ok(())
    })?;
    if app.host.pid(&id).is_some() {
        app.host.set_live_disk_limits(&id, &drive, limits).await.map_err(|why| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "engine",
                format!("saved for the next start, but the running VM did not take them: {why}"),
            )
        })?;
    }
    drive_info(&app, &id, DriveSlot::Disk(slot)).map(Json)
}

/// `POST /vms/{id}/cdroms`: a CD/DVD drive after the others.
async fn add_cdrom(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    body: Result<Json<AddCdrom>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<DriveInfo>)> {
    require_vm(&p, Role::Admin, &id)?;
    let Json(req) = body?;
    let record = app.host.record(&id)?;
    let mut errors = Vec::new();
    if let Some(Err(e)) = req.image.as_deref().map(|i| app.host.resolve_image(i, false)) {
        errors.push(field("image", e.to_string()));
    }
    errors.extend(no_room_for(&record, porthole_api::DriveKind::Cdrom));
    if !errors.is_empty() {
        return Err(ApiError::fields(StatusCode::BAD_REQUEST, "invalid", errors));
    }
    if let Some(e) = drive_set_frozen(&app, &record, false) {
        return Err(e);
    }
    let _busy = app.host.begin(&id, "adding a CD/DVD drive")?;
    let n = record.extra_cdroms.len() + 1;
    app.host.update(&id, |r, running| {
        if running || r.extra_cdroms.len() + 1 != n {
            return Err(HostError::Conflict("the VM changed meanwhile: try again".into()));
        }
        r.extra_cdroms.push(CdromRecord { media: req.image });
        Ok(())
    })?;
    Ok((StatusCode::CREATED, Json(drive_info(&app, &id, DriveSlot::Cdrom(n))?)))
}

/// `DELETE /vms/{id}/cdroms/{drive}`: a CD/DVD drive goes (not the last one); the later ones move up.
async fn remove_cdrom(
    State(app): State<AppState>,
    p: Principal,
    Path((id, drive)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require_vm(&p, Role::Admin, &id)?;
    let record = app.host.record(&id)?;
    let Some(DriveSlot::Cdrom(n)) = drive_slot(&record, &drive) else {
        return Err(ApiError::not_found(format!("VM {} has no CD/DVD drive {drive:?}", record.name)));
    };
    if record.extra_cdroms.is_empty() {
        return Err(ApiError::conflict(
            "it is the VM's only CD/DVD drive: a VM keeps one (the boot order names it); eject its image instead",
        ));
    }
    if let Some(e) = drive_set_frozen(&app, &record, false) {
        return Err(e);
    }
    let _busy = app.host.begin(&id, "removing a CD/DVD drive")?;
    let count = record.extra_cdroms.len();
    app.host.update(&id, |r, running| {
        if running || r.extra_cdroms.len() != count {
            return Err(HostError::Conflict("the VM changed meanwhile: try again".into()));
        }
        if n == 0 {
            r.media = r.extra_cdroms.remove(0).media;
        } else {
            r.extra_cdroms.remove(n - 1);
        }
        Ok(())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

async fn console_ticket(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<ConsoleTicket>> {
    require_vm(&p, Role::Viewer, &id)?;
    if app.host.pid(&id).is_none() {
        app.host.get(&id)?;
        return Err(ApiError::conflict("the VM is not running"));
    }
    let input = p.role >= Role::Operator;
    let ticket = random_hex(24);
    {
        let mut tickets = lock(&app.tickets);
        let now = Instant::now();
        tickets.retain(|_, t| t.expires > now);
        tickets.insert(ticket.clone(), Ticket { vm: id.clone(), input, expires: now + app.ticket_lifetime });
    }
    let files = app.host.run_files(&id);
    let socket = if input { files.vnc() } else { files.vnc_view_only() };
    Ok(Json(ConsoleTicket {
        path: format!("{}/console?ticket={ticket}", porthole_api::API_PREFIX),
        ticket,
        expires_in_s: app.ticket_lifetime.as_secs(),
        input,
        rfb_socket: p.local.then(|| socket.display().to_string()),
    }))
}

#[derive(Deserialize)]
struct TicketQuery {
    ticket: String,
}

/// `GET /console?ticket=`: the ticket is the credential (one use, 30 s).
async fn console(
    State(app): State<AppState>,
    Query(q): Query<TicketQuery>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let ticket = lock(&app.tickets).remove(&q.ticket);
    let ticket = match ticket {
        Some(t) if t.expires > Instant::now() => t,
        Some(_) => return Err(ApiError::unauthorized("the console ticket has expired")),
        None => return Err(ApiError::unauthorized("unknown or already used console ticket")),
    };
    let files = app.host.run_files(&ticket.vm);
    let socket = if ticket.input { files.vnc() } else { files.vnc_view_only() };
    let rfb = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| ApiError::conflict(format!("cannot reach the VM's console: {e}")))?;
    Ok(ws
        .max_message_size(CONSOLE_MESSAGE_MAX)
        .max_frame_size(CONSOLE_MESSAGE_MAX)
        .on_upgrade(move |ws| proxy_rfb(ws, rfb)))
}

/// The largest WebSocket message (and frame) a console client may send: RFB's largest client message, cut text
/// of the most clipboard text an engine takes (1 MiB), with room. (The WebSocket library's default, 64 MiB,
/// would let each connection make the daemon hold that much.)
pub const CONSOLE_MESSAGE_MAX: usize = 2 << 20;
/// The largest a serial stream's reader may send (it is only listened to for its close).
pub const SERIAL_STREAM_MESSAGE_MAX: usize = 64 << 10;

/// Carries RFB between the WebSocket (binary frames) and the VM's console socket.
async fn proxy_rfb(ws: WebSocket, rfb: tokio::net::UnixStream) {
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut rfb_rx, mut rfb_tx) = rfb.into_split();
    let to_vm = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(b) if rfb_tx.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = rfb_tx.shutdown().await;
    };
    let to_client = async {
        // Whatever the VM has sent so far (up to 256 KiB) goes out as one frame.
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match rfb_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx.send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.send(Message::Close(None)).await;
    };
    tokio::select! {
        _ = to_vm => {}
        _ = to_client => {}
    }
}

#[derive(Deserialize)]
struct LinesQuery {
    lines: Option<usize>,
}

async fn serial(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    Query(q): Query<LinesQuery>,
) -> ApiResult<Json<SerialOutput>> {
    require_vm(&p, Role::Viewer, &id)?;
    app.host.get(&id)?;
    let lines = tail_lines(&app.host.run_files(&id).serial(), q.lines.unwrap_or(100).min(1000));
    Ok(Json(SerialOutput { lines }))
}

/// A WebSocket of text frames: the serial output from now on.
async fn serial_stream(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    require_vm(&p, Role::Viewer, &id)?;
    app.host.get(&id)?;
    let path = app.host.run_files(&id).serial();
    let ws = ws.max_message_size(SERIAL_STREAM_MESSAGE_MAX).max_frame_size(SERIAL_STREAM_MESSAGE_MAX);
    Ok(ws.on_upgrade(move |mut ws| async move {
        let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        loop {
            tokio::select! {
                msg = ws.recv() => {
                    if !matches!(msg, Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Text(_) | Message::Binary(_)))) {
                        return;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    if len < offset {
                        offset = 0; // truncated by the size limit
                    }
                    if len > offset {
                        let chunk = read_range(&path, offset, (len - offset).min(64 * 1024));
                        offset += chunk.len() as u64;
                        if ws.send(Message::Text(String::from_utf8_lossy(&chunk).into_owned().into())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }))
}

/// Types text into a running VM's serial port.
async fn serial_input(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    body: Result<Json<SerialInput>, JsonRejection>,
) -> ApiResult<StatusCode> {
    require_vm(&p, Role::Operator, &id)?;
    let Json(req) = body?;
    if req.text.len() > porthole_api::SERIAL_INPUT_MAX {
        return Err(ApiError::bad(format!("text is longer than {} bytes", porthole_api::SERIAL_INPUT_MAX)));
    }
    app.host.control(&id, Request::SerialInput { data: req.text }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ScreenshotQuery {
    /// Widest result in pixels (default 320, at most 1920); the screen is scaled down, never up.
    width: Option<u32>,
}

/// A PNG of a running VM's screen (for thumbnails).
async fn screenshot(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    Query(q): Query<ScreenshotQuery>,
) -> ApiResult<Response> {
    require_vm(&p, Role::Viewer, &id)?;
    if app.host.pid(&id).is_none() {
        app.host.record(&id)?;
        return Err(ApiError::conflict("the VM is not running"));
    }
    let socket = app.host.run_files(&id).vnc_view_only();
    let width = q.width.unwrap_or(320);
    let _turn = app
        .screenshots
        .acquire()
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let png = tokio::task::spawn_blocking(move || crate::screenshot::capture(&socket, width))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "image/png"), (axum::http::header::CACHE_CONTROL, "no-store")], png)
        .into_response())
}

fn read_range(path: &std::path::Path, offset: u64, len: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.take(len).read_to_end(&mut bytes);
    }
    bytes
}

#[derive(Deserialize)]
struct StatsQuery {
    /// Only samples newer than this (ms since the epoch).
    since: Option<u64>,
    /// `s` (1 s samples, the last hour) or `min` (1 min samples, the last day).
    resolution: Option<String>,
}

async fn stats(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    Query(q): Query<StatsQuery>,
) -> ApiResult<Json<StatsBody>> {
    require_vm(&p, Role::Viewer, &id)?;
    app.host.get(&id)?;
    stats_reply(&app, &id, &q)
}

fn image_sha256(path: &std::path::Path) -> String {
    // Cached next to the library in a sidecar written at upload; computed for files put there by hand.
    let sidecar =
        path.with_file_name(format!(".{}.sha256", path.file_name().and_then(|n| n.to_str()).unwrap_or_default()));
    if let Ok(s) = std::fs::read_to_string(&sidecar) {
        return s.trim().to_owned();
    }
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let mut h = Sha256::new();
    if std::io::copy(&mut f, &mut h).is_err() {
        return String::new();
    }
    let sum = hex::encode(h.finalize());
    let _ = crate::store::write_atomic(&sidecar, sum.as_bytes());
    sum
}

/// A library image's entry: its format and sizes, and for an ISO its facts and the OS detected.
fn library_image(
    osinfo: &crate::osinfo::Osinfo,
    name: String,
    size: u64,
    sha256: String,
    path: &std::path::Path,
) -> Image {
    let (format, virtual_bytes, allocated_bytes) = crate::store::image_facts(path);
    let (iso, os) = if format == porthole_api::ImageFormat::Iso { osinfo.image(path) } else { (None, None) };
    Image { name, size_bytes: size, sha256, format, virtual_bytes, allocated_bytes, iso, os, used_by: Vec::new() }
}

/// `POST /osinfo/identify`: the OS the host's osinfo-db finds for an ISO's facts (an ISO the client has
/// not uploaded yet).
async fn identify_os(
    State(app): State<AppState>,
    p: Principal,
    body: Result<Json<IsoFacts>, JsonRejection>,
) -> ApiResult<Json<Identified>> {
    require(&p, Role::Viewer)?;
    let Json(facts) = body?;
    // ISO 9660 identifiers are at most 128 bytes.
    for (what, id) in [
        ("volume_id", &facts.volume_id),
        ("system_id", &facts.system_id),
        ("publisher_id", &facts.publisher_id),
        ("application_id", &facts.application_id),
    ] {
        if id.as_ref().is_some_and(|v| v.len() > 128) {
            return Err(ApiError::bad(format!("{what} is longer than an ISO 9660 identifier (128 bytes)")));
        }
    }
    let osinfo = app.osinfo.clone();
    let (os, db_version) = tokio::task::spawn_blocking(move || osinfo.identify(&facts))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let note = db_version.is_none().then(|| crate::osinfo::NO_DB.to_owned());
    Ok(Json(Identified { os, db_version, note }))
}

async fn list_images(State(app): State<AppState>, p: Principal) -> ApiResult<Json<Vec<Image>>> {
    require(&p, Role::Viewer)?;
    let app2 = app.clone();
    let images = tokio::task::spawn_blocking(move || {
        let host = &app2.host;
        host.store
            .images()
            .into_iter()
            .map(|(name, size)| {
                let path = host.store.images_dir().join(&name);
                let sha256 = image_sha256(&path);
                let used_by = image_users(&app2, &name);
                Image { used_by, ..library_image(&app2.osinfo, name, size, sha256, &path) }
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(Json(images))
}

/// `PUT /images/{name}` with `Content-Length` and `X-Porthole-Sha256`: streamed to a temp file, checked,
/// then renamed into the library. Progress shows as a task (`GET /tasks`).
async fn upload_image(
    State(app): State<AppState>,
    p: Principal,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Image>)> {
    require(&p, Role::Admin)?;
    let path = app.host.store.image_path(&name).ok_or_else(|| {
        ApiError::bad(format!(
            "image name {name:?} is invalid: 1-63 letters, digits, '-', '_', '.', not starting with '.'"
        ))
    })?;
    let length: u64 =
        headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).ok_or_else(
            || ApiError::new(StatusCode::LENGTH_REQUIRED, "length_required", "an upload needs Content-Length"),
        )?;
    let expected = headers
        .get("x-porthole-sha256")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ApiError::bad("an upload needs X-Porthole-Sha256: the file's SHA-256 in hex"))?;
    if length > app.upload_limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{length} bytes is more than the upload limit of {} bytes", app.upload_limit),
        ));
    }
    if path.exists() {
        return Err(ApiError::conflict(format!("an image named {name:?} exists already")));
    }
    let (task, cancel) = app.new_cancellable_task(format!("upload {name}"), length);
    let tmp = app.host.store.images_dir().join(format!(".{name}.upload-{}", random_hex(4)));
    // If the client goes away mid-upload the server drops this handler: the guard still removes the partial
    // file and fails the task.
    let guard = AbandonedUpload { app: app.clone(), task: task.clone(), tmp: Some(tmp.clone()) };
    let result = receive(&app, &task, &cancel, body, &tmp, length, &expected).await;
    guard.disarm();
    let result = match result {
        Ok(()) => check_upload(tmp.clone()).await,
        Err(e) => Err(e),
    };
    let finish = match result {
        Ok(()) => std::fs::rename(&tmp, &path)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())),
        Err(e) => Err(e),
    };
    match finish {
        Ok(()) => {
            let sidecar = app.host.store.images_dir().join(format!(".{name}.sha256"));
            let _ = crate::store::write_atomic(&sidecar, expected.as_bytes());
            app.end_task(&task, |t| t.state = TaskState::Done);
            let osinfo = app.osinfo.clone();
            let image_path = app.host.store.images_dir().join(&name);
            let image =
                tokio::task::spawn_blocking(move || library_image(&osinfo, name, length, expected, &image_path))
                    .await
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
            Ok((StatusCode::CREATED, Json(image)))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            app.end_task(&task, |t| {
                if cancel.is_set() {
                    t.state = TaskState::Cancelled;
                } else {
                    t.state = TaskState::Failed;
                    t.error = Some(e.message.clone());
                }
            });
            Err(e)
        }
    }
}

/// Refuses an uploaded qcow2 image that Porthole cannot use as it is: a damaged or truncated one, or one
/// that needs other files (a backing file, an external data file) or a key (encryption). Library images
/// stand alone.
async fn check_upload(tmp: PathBuf) -> ApiResult<()> {
    use vmm_core::disk::{self, DiskError, ImageFormat};
    let checked = tokio::task::spawn_blocking(move || {
        if disk::probe_format(&tmp).map_err(|e| e.to_string())? != ImageFormat::Qcow2 {
            return Ok(());
        }
        disk::open_image(&tmp, true, Some(ImageFormat::Qcow2), &[]).map(drop).map_err(|e| match e {
            DiskError::Image { reason, .. } => reason,
            other => other.to_string(),
        })
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    checked.map_err(|why| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unusable_image",
            format!(
                "the upload is a qcow2 image that cannot be used: {why} (library images must stand alone: no backing \
                 file, no external data file, no encryption)"
            ),
        )
    })
}

/// Starts `job` as task `task` (`what`): 202 with the task; it ends `done` with the job's result, or
/// `failed` with its error.
fn spawn_job(app: &AppState, task: String, what: String, job: crate::disks::Job) -> (StatusCode, Json<Task>) {
    let t = Task { id: task.clone(), what, started_ms: now_ms(), ..Task::default() };
    lock(&app.tasks).insert(task.clone(), t);
    let app2 = app.clone();
    let task2 = task.clone();
    tokio::spawn(async move {
        let result = job.await;
        app2.update_task(&task2, |t| match result {
            Ok(made) => {
                t.state = TaskState::Done;
                t.done = t.total.max(t.done);
                t.result = made;
            }
            Err(e) => {
                t.state = TaskState::Failed;
                t.error = Some(e.to_string());
            }
        });
    });
    (StatusCode::ACCEPTED, Json(app.task(&task).unwrap_or_else(|| Task { id: task, ..Task::default() })))
}

fn progress_of(app: &AppState, task: &str) -> crate::disks::Progress {
    let (app, task) = (app.clone(), task.to_owned());
    Arc::new(move |done, total| {
        app.update_task(&task, |t| {
            t.done = done;
            t.total = total;
        })
    })
}

async fn list_snapshots(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotTree>> {
    require_vm(&p, Role::Viewer, &id)?;
    Ok(Json(app.host.snapshot_tree(&id)?))
}

async fn take_snapshot(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    body: Result<Json<TakeSnapshot>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    require_vm(&p, Role::Operator, &id)?;
    let Json(req) = body?;
    let what = format!("snapshot {id}: {}", req.name);
    let job = app.host.take_snapshot(&id, req.name, req.description, req.with_state)?;
    Ok(spawn_job(&app, random_hex(8), what, job))
}

async fn revert_snapshot(
    State(app): State<AppState>,
    p: Principal,
    Path((id, sid)): Path<(String, String)>,
    body: Result<Json<RevertSnapshot>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    require_vm(&p, Role::Operator, &id)?;
    let Json(req) = body?;
    let job = app.host.revert_snapshot(&id, &sid, req.confirm).map_err(snapshot_not_found)?;
    Ok(spawn_job(&app, random_hex(8), format!("revert {id} to {sid}"), job))
}

async fn delete_snapshot(
    State(app): State<AppState>,
    p: Principal,
    Path((id, sid)): Path<(String, String)>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    require_vm(&p, Role::Operator, &id)?;
    let task = random_hex(8);
    let job = app.host.delete_snapshot(&id, &sid, progress_of(&app, &task)).map_err(snapshot_not_found)?;
    Ok(spawn_job(&app, task, format!("delete snapshot {sid} of {id}"), job))
}

fn snapshot_not_found(e: HostError) -> ApiError {
    match e {
        HostError::NotFound(what) if what.contains("/snapshots/") => {
            ApiError::not_found(format!("no snapshot {what:?}"))
        }
        other => other.into(),
    }
}

async fn clone_vm(
    State(app): State<AppState>,
    p: Principal,
    Path(id): Path<String>,
    body: Result<Json<CloneVm>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    require(&p, Role::Admin)?;
    require_vm(&p, Role::Admin, &id)?;
    let Json(req) = body?;
    check_name(&req.name)?;
    let task = random_hex(8);
    let what = format!("{} clone of {id}: {}", if req.linked { "linked" } else { "full" }, req.name);
    let job = app.host.clone_vm(&id, req.name, req.linked, progress_of(&app, &task))?;
    Ok(spawn_job(&app, task, what, job))
}

/// Cleans up after an upload whose handler was dropped before it finished.
struct AbandonedUpload {
    app: AppState,
    task: String,
    tmp: Option<PathBuf>,
}

impl AbandonedUpload {
    fn disarm(mut self) {
        self.tmp = None;
    }
}

impl Drop for AbandonedUpload {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(&tmp);
            self.app.end_task(&self.task, |t| {
                t.state = TaskState::Failed;
                t.error = Some("the client went away before the upload was complete".into());
            });
        }
    }
}

async fn receive(
    app: &App,
    task: &str,
    cancel: &Cancel,
    body: axum::body::Body,
    tmp: &std::path::Path,
    length: u64,
    expected: &str,
) -> ApiResult<()> {
    let internal = |e: std::io::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    let mut file = tokio::fs::File::create(tmp).await.map_err(internal)?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut stream = body.into_data_stream();
    let cancelled = || ApiError::new(StatusCode::CONFLICT, "cancelled", "the upload was cancelled");
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = cancel.cancelled() => return Err(cancelled()),
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| ApiError::bad(format!("the upload broke off: {e}")))?;
        received += chunk.len() as u64;
        if received > length {
            return Err(ApiError::bad("the upload is longer than its Content-Length"));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(internal)?;
        app.update_task(task, |t| t.done = received);
    }
    if received != length {
        return Err(ApiError::bad(format!("the upload ended after {received} of {length} bytes")));
    }
    file.sync_all().await.map_err(internal)?;
    let got = hex::encode(hasher.finalize());
    if got != expected {
        return Err(ApiError::bad(format!("SHA-256 mismatch: the upload is {got}, X-Porthole-Sha256 said {expected}")));
    }
    Ok(())
}

async fn delete_image(State(app): State<AppState>, p: Principal, Path(name): Path<String>) -> ApiResult<StatusCode> {
    require(&p, Role::Admin)?;
    let path =
        app.host.store.image_path(&name).ok_or_else(|| ApiError::bad(format!("image name {name:?} is invalid")))?;
    let users = image_users(&app, &name);
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "image {name:?} is in use (used by: {}): a VM's CD, kernel, initrd or disk base",
            users.join(", ")
        )));
    }
    std::fs::remove_file(&path).map_err(|_| ApiError::not_found(format!("no image {name:?}")))?;
    let _ = std::fs::remove_file(app.host.store.images_dir().join(format!(".{name}.sha256")));
    let _ = std::fs::remove_file(crate::osinfo::sidecar_path(&app.host.store.images_dir().join(&name)));
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tasks(State(app): State<AppState>, p: Principal) -> ApiResult<Json<Vec<Task>>> {
    require(&p, Role::Viewer)?;
    Ok(Json(lock(&app.tasks).values().cloned().collect()))
}

async fn get_task(State(app): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<Json<Task>> {
    require(&p, Role::Viewer)?;
    app.task(&id).map(Json).ok_or_else(|| ApiError::not_found(format!("no task {id:?}")))
}

/// `POST /tasks/{id}/cancel`: stops a running upload (its partial file is removed) or a shutdown's wait
/// (the guest is not forced off). The task ends `cancelled` as soon as it notices; the reply is the task as
/// it is now. Other tasks, and tasks that have ended, are refused (409).
async fn cancel_task(State(app): State<AppState>, p: Principal, Path(id): Path<String>) -> ApiResult<Json<Task>> {
    require(&p, Role::Operator)?;
    let task = app.task(&id).ok_or_else(|| ApiError::not_found(format!("no task {id:?}")))?;
    let Some(cancel) = lock(&app.cancels).get(&id).cloned() else {
        return Err(ApiError::conflict(match task.state {
            TaskState::Running => format!("task {id:?} ({}) cannot be cancelled", task.what),
            _ => format!("task {id:?} ({}) has ended", task.what),
        }));
    };
    cancel.set.store(true, std::sync::atomic::Ordering::Release);
    cancel.wake.notify_waiters();
    Ok(Json(app.task(&id).unwrap_or(task)))
}

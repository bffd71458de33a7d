//! Everything that waits on the network or the disk runs here, off the UI thread: one tokio runtime, a
//! poller per host (VM list and host info once a second) and one task per user action. Results land in the
//! shared [`Model`] and the UI is woken with `request_repaint`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use porthole_api::{HostError, HostHandle, HostInfo, Vm};

/// A host in the sidebar.
pub struct HostView {
    pub name: String,
    /// "local" or the remote address.
    pub address: String,
    /// The host's interface once connected (a Porthole daemon, a libvirt connection, …).
    pub connection: Option<HostHandle>,
    pub info: Option<HostInfo>,
    pub vms: Vec<Vm>,
    /// Why the host cannot be reached (shown instead of its VMs).
    pub error: Option<String>,
    /// Whether the first answer came.
    pub connected: bool,
    /// The last minute of each running VM's CPU use (percent of one CPU, one sample a second).
    pub cpu: std::collections::HashMap<String, std::collections::VecDeque<f32>>,
}

/// A message for the user: what happened, and whether it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub text: String,
    pub error: bool,
}

/// A long action in progress (an upload): what, and how far.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub what: String,
    pub fraction: f32,
}

#[derive(Default)]
pub struct Model {
    pub hosts: Vec<HostView>,
    pub notices: Vec<Notice>,
    /// Notices given since the start (the list keeps the last 20): the window toasts the new ones.
    pub notices_total: u64,
    pub progress: Vec<Progress>,
    /// Serial lines of the VM whose details are open: (host, vm id, lines).
    pub serial: Option<(usize, String, Vec<String>)>,
    /// The firmware's boot status of the VM whose details are open (firmware-booting VMs): (host, VM id, text).
    pub boot_status: Option<(usize, String, String)>,
    /// `GET /vms/{id}` of the running VM whose details are open (its network cards' state): (host, VM id, VM).
    pub details: Option<(usize, String, Vm)>,
    /// Resource samples (1 s, the last hour) of the VM whose details are open.
    pub stats: Option<(usize, String, Vec<porthole_api::StatSample>)>,
    /// A console the UI should open (host, VM id), e.g. the demo VM's once it runs.
    pub open_console: Option<(usize, String)>,
    /// The certificate fingerprint the add-host dialog fetched, for the user to check.
    pub fetched_fingerprint: Option<String>,
    /// The SSH host keys the add-host dialog fetched for a libvirt host, or why it could not.
    pub fetched_host_keys: Option<Result<crate::ssh_keys::HostKeys, String>>,
    /// Screenshots fetched for the VM list, waiting to become textures: ((host, VM id), picture).
    pub thumbnails: Vec<((usize, String), egui::ColorImage)>,
    /// Each host's image library (fetched for the create wizard).
    pub images: std::collections::HashMap<usize, Vec<porthole_api::Image>>,
    /// Uploads in progress, by their progress text, to cancel them.
    pub uploads: std::collections::HashMap<String, tokio::task::AbortHandle>,
    /// The snapshot tree of the VM whose details are open, or why it could not be read: (host, VM id, tree).
    pub snapshots: Option<(usize, String, Result<porthole_api::SnapshotTree, String>)>,
    /// Long operations on VMs (snapshots, clones): running ones, and failed ones until the next operation on
    /// the same VM.
    pub tasks: Vec<VmTask>,
    /// The answer to the Settings view's last *Apply*: (host, VM id, the VM as changed or why not).
    pub settings_outcome: Option<(usize, String, Result<Vm, SettingsRefusal>)>,
    /// What the open host page shows besides the host's info: (host, its samples, its tasks).
    pub host_page: Option<(usize, HostPageData)>,
    /// The answer to the Settings view's last change of drives (add, remove, grow a disk or CD/DVD drive):
    /// (host, VM id, what was done or why the host refused).
    pub drive_outcome: Option<(usize, String, Result<String, String>)>,
}

/// Why a host refused a settings change: its sentence, and its reason for each refused field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsRefusal {
    pub message: String,
    pub fields: Vec<porthole_api::FieldError>,
}

/// The host page's data, fetched together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostPageData {
    /// The host's samples of the last hour (1 s).
    pub stats: Vec<porthole_api::StatSample>,
    /// Every task the host keeps, newest first.
    pub tasks: Vec<porthole_api::Task>,
}

/// A long operation on a VM, as the daemon last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTask {
    pub host: usize,
    pub vm: String,
    /// What the user asked for ("Take snapshot before-upgrade of web1").
    pub what: String,
    /// The daemon's task (a call refused before it became a task is a failed task with the refusal as error).
    pub task: porthole_api::Task,
}

/// The window of samples the graphs show (the daemon keeps an hour at one per second).
const SAMPLES_KEPT_MS: u64 = 3600 * 1000;

/// Appends the `new` samples (those later than the last of `samples`, as `since` asked) and drops those
/// older than an hour before the newest.
pub fn merge_samples(samples: &mut Vec<porthole_api::StatSample>, new: Vec<porthole_api::StatSample>) {
    let last = samples.last().map_or(0, |s| s.t_ms);
    samples.extend(new.into_iter().filter(|s| s.t_ms > last));
    let newest = samples.last().map_or(0, |s| s.t_ms);
    let keep_from = samples.partition_point(|s| s.t_ms + SAMPLES_KEPT_MS < newest);
    samples.drain(..keep_from);
}

impl Model {
    pub fn notify(&mut self, text: impl Into<String>, error: bool) {
        self.notices.push(Notice { text: text.into(), error });
        self.notices_total += 1;
        if self.notices.len() > 20 {
            self.notices.remove(0);
        }
    }
}

/// The runtime, the model and a way to wake the UI.
#[derive(Clone)]
pub struct Backend {
    runtime: Arc<tokio::runtime::Runtime>,
    model: Arc<Mutex<Model>>,
    repaint: Arc<dyn Fn() + Send + Sync>,
}

impl Backend {
    pub fn new(repaint: impl Fn() + Send + Sync + 'static) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("porthole-net")
            .build()?;
        Ok(Backend { runtime: Arc::new(runtime), model: Arc::default(), repaint: Arc::new(repaint) })
    }

    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    pub fn repaint(&self) {
        (self.repaint)();
    }

    /// Adds a host and starts polling it. `connect` makes its client (it may start the local daemon), off the
    /// UI thread.
    pub fn add_host(
        &self,
        name: String,
        address: String,
        connect: impl FnOnce() -> Result<HostHandle, String> + Send + 'static,
    ) -> usize {
        let index = {
            let mut m = self.model();
            m.hosts.push(HostView {
                name,
                address,
                connection: None,
                info: None,
                vms: Vec::new(),
                error: None,
                connected: false,
                cpu: Default::default(),
            });
            m.hosts.len() - 1
        };
        let backend = self.clone();
        self.runtime.spawn(async move {
            let client = match tokio::task::spawn_blocking(connect).await.unwrap_or_else(|e| Err(e.to_string())) {
                Ok(c) => c,
                Err(e) => {
                    if let Some(h) = backend.model().hosts.get_mut(index) {
                        h.error = Some(e);
                    }
                    backend.repaint();
                    return;
                }
            };
            if let Some(h) = backend.model().hosts.get_mut(index) {
                h.connection = Some(client.clone());
            }
            // The newest sample seen per VM, so each poll asks only for what is new.
            let mut seen: std::collections::HashMap<String, u64> = Default::default();
            // A host that reports its changes (libvirt's events) is asked again at once after one.
            let mut events = client.events();
            let period = client.refresh_interval();
            loop {
                let (info, vms) = tokio::join!(client.host(), client.list_vms());
                let running: Vec<String> = match &vms {
                    Ok(v) => v
                        .iter()
                        .filter(|v| matches!(v.state, porthole_api::VmState::Running | porthole_api::VmState::Paused))
                        .map(|v| v.id.clone())
                        .collect(),
                    Err(_) => Vec::new(),
                };
                let mut fresh = Vec::new();
                for id in running.iter().take(64) {
                    let since = seen.get(id).copied().unwrap_or(0);
                    if let Ok(stats) = client.stats(id, since, false).await
                        && let Some(last) = stats.samples.last()
                    {
                        seen.insert(id.clone(), last.t_ms);
                        fresh
                            .push((id.clone(), stats.samples.iter().map(|s| s.cpu_percent as f32).collect::<Vec<_>>()));
                    }
                }
                seen.retain(|id, _| running.contains(id));
                let changed = {
                    let mut m = backend.model();
                    let Some(h) = m.hosts.get_mut(index) else { return };
                    if h.connection.is_none() {
                        return; // removed
                    }
                    let before = (h.info.clone(), h.vms.clone(), h.error.clone(), h.cpu.clone());
                    match (info, vms) {
                        (Ok(info), Ok(vms)) => {
                            h.info = Some(info);
                            h.vms = vms;
                            h.error = None;
                            h.connected = true;
                            h.cpu.retain(|id, _| running.contains(id));
                            for (id, values) in fresh {
                                let history = h.cpu.entry(id).or_default();
                                history.extend(values);
                                while history.len() > 60 {
                                    history.pop_front();
                                }
                            }
                        }
                        (Err(e), _) | (_, Err(e)) => h.error = Some(e.to_string()),
                    }
                    // What changes every second whatever happens (uptime, memory in use) repaints only the host
                    // page, which asks for its own frames.
                    let steady = |i: &Option<HostInfo>| {
                        i.clone().map(|i| HostInfo { uptime_s: 0, memory_available_mib: 0, free_disk_bytes: 0, ..i })
                    };
                    (steady(&before.0), &before.1, &before.2, &before.3) != (steady(&h.info), &h.vms, &h.error, &h.cpu)
                };
                // An idle window stays idle: repaint only when the host's picture changed.
                if changed {
                    backend.repaint();
                }
                match events.as_mut() {
                    Some(events) => {
                        tokio::select! {
                            _ = tokio::time::sleep(period) => {}
                            changed = events.changed() => if changed.is_err() {
                                // The host dropped its sender: back to polling alone.
                                tokio::time::sleep(period).await;
                            },
                        }
                    }
                    None => tokio::time::sleep(period).await,
                }
            }
        });
        index
    }

    /// Stops polling host `index` and forgets it (its slot stays, empty, so indexes do not move).
    pub fn remove_host(&self, index: usize) {
        if let Some(h) = self.model().hosts.get_mut(index) {
            h.connection = None;
            h.vms.clear();
            h.info = None;
            h.name.clear();
        }
    }

    /// Runs `action` with host `index`'s client; its error (or `done`, if given) becomes a notice, and the host
    /// is polled again at once.
    pub fn act<F, Fut, T>(&self, index: usize, what: String, done: Option<String>, action: F)
    where
        F: FnOnce(HostHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, HostError>> + Send,
        T: Send + 'static,
    {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else {
            self.model().notify(format!("{what}: the host is not connected"), true);
            return;
        };
        let backend = self.clone();
        self.runtime.spawn(async move {
            let result = action(client.clone()).await;
            match result {
                Ok(_) => {
                    if let Some(done) = done {
                        backend.model().notify(done, false);
                    }
                }
                Err(e) => backend.model().notify(format!("{what} failed: {e}"), true),
            }
            if let Ok(vms) = client.list_vms().await
                && let Some(h) = backend.model().hosts.get_mut(index)
            {
                h.vms = vms;
            }
            backend.repaint();
        });
    }

    /// Starts a long operation on VM `vm` of host `index` (`start` returns the daemon's task), follows its
    /// progress in [`Model::tasks`] until it ends, then runs `then` with the finished task (also when it failed)
    /// and fetches the VM list and the VM's snapshot tree again. A failure becomes a notice and stays in the
    /// tasks list (for the VM's details to show) until the next operation on that VM.
    pub fn run_task<F, Fut>(
        &self,
        index: usize,
        vm: String,
        what: String,
        start: F,
        then: impl FnOnce(&Backend, &porthole_api::Task) + Send + 'static,
    ) where
        F: FnOnce(HostHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<porthole_api::Task, HostError>> + Send,
    {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else {
            self.model().notify(format!("{what}: the host is not connected"), true);
            return;
        };
        self.model().tasks.retain(|t| !(t.host == index && t.vm == vm));
        let backend = self.clone();
        self.runtime.spawn(async move {
            let set = |task: porthole_api::Task| {
                let mut m = backend.model();
                m.tasks.retain(|t| !(t.host == index && t.vm == vm));
                m.tasks.push(VmTask { host: index, vm: vm.clone(), what: what.clone(), task });
                drop(m);
                backend.repaint();
            };
            let mut task = match start(client.clone()).await {
                Ok(t) => t,
                Err(e) => porthole_api::Task {
                    what: what.clone(),
                    state: porthole_api::TaskState::Failed,
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            };
            // Followed until it ends: the daemon ends every task (done or failed); a daemon that stops answering
            // ends the following with its error.
            while task.state == porthole_api::TaskState::Running {
                set(task.clone());
                tokio::time::sleep(Duration::from_millis(250)).await;
                match client.task(&task.id).await {
                    Ok(t) => task = t,
                    Err(e) => {
                        task.state = porthole_api::TaskState::Failed;
                        task.error = Some(format!("cannot follow the task: {e}"));
                    }
                }
            }
            if task.state == porthole_api::TaskState::Failed {
                let why = task.error.clone().unwrap_or_else(|| "the host gave no reason".to_owned());
                backend.model().notify(format!("{what} failed: {why}"), true);
                set(task.clone());
            } else {
                backend.model().tasks.retain(|t| !(t.host == index && t.vm == vm));
                backend.model().notify(format!("{what}: done"), false);
            }
            then(&backend, &task);
            if let Ok(vms) = client.list_vms().await
                && let Some(h) = backend.model().hosts.get_mut(index)
            {
                h.vms = vms;
            }
            backend.load_snapshots(index, vm.clone());
            backend.repaint();
        });
    }

    /// Fetches the snapshot tree of a VM into the model.
    pub fn load_snapshots(&self, index: usize, id: String) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            let tree = client.snapshots(&id).await.map_err(|e| e.to_string());
            let changed = {
                let mut m = backend.model();
                let new = Some((index, id, tree));
                let changed = m.snapshots != new;
                m.snapshots = new;
                changed
            };
            if changed {
                backend.repaint();
            }
        });
    }

    /// Fetches a small screenshot of a running VM for its row in the list (`width` pixels wide).
    pub fn fetch_thumbnail(&self, index: usize, id: String, width: u32) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            // A VM that stopped meanwhile, or an older daemon: no thumbnail, and no message either.
            let Ok(png) = client.screenshot(&id, width).await else { return };
            if let Some(image) = decode_png(&png) {
                backend.model().thumbnails.push(((index, id), image));
                backend.repaint();
            }
        });
    }

    /// Fetches host `index`'s image library into the model.
    pub fn load_images(&self, index: usize) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            match client.images().await {
                Ok(images) => {
                    backend.model().images.insert(index, images);
                }
                Err(e) => backend.model().notify(format!("cannot list the host's images: {e}"), true),
            }
            backend.repaint();
        });
    }

    /// Fetches what host `index`'s page shows: its samples, tasks and image library.
    pub fn load_host_page(&self, index: usize) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            // Only the samples newer than those the page has: the first fetch brings the hour, later ones
            // a second or two.
            let since = match &backend.model().host_page {
                Some((i, data)) if *i == index => data.stats.last().map_or(0, |s| s.t_ms),
                _ => 0,
            };
            let (stats, tasks, images) = tokio::join!(client.host_stats(since, false), client.tasks(), client.images());
            let mut m = backend.model();
            let mut tasks = tasks.unwrap_or_default();
            tasks.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then_with(|| a.id.cmp(&b.id)));
            let new = stats.map(|s| s.samples).unwrap_or_default();
            // The new samples go onto the page's own (another host's page, or none: they start afresh).
            match &mut m.host_page {
                Some((i, data)) if *i == index => {
                    merge_samples(&mut data.stats, new);
                    data.tasks = tasks;
                }
                page => {
                    let mut stats = Vec::new();
                    merge_samples(&mut stats, new);
                    *page = Some((index, HostPageData { stats, tasks }));
                }
            }
            if let Ok(images) = images {
                m.images.insert(index, images);
            }
            drop(m);
            backend.repaint();
        });
    }

    /// Cancels task `id` of host `index` (an upload, a shutdown's wait), then refreshes the host page.
    pub fn cancel_task(&self, index: usize, id: String) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            if let Err(e) = client.cancel_task(&id).await {
                backend.model().notify(format!("cannot cancel the task: {e}"), true);
            }
            backend.load_host_page(index);
        });
    }

    /// Deletes image `name` from host `index`'s library, then refreshes the host page.
    pub fn delete_image(&self, index: usize, name: String) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            match client.delete_image(&name).await {
                Ok(()) => backend.model().notify(format!("Deleted {name} from the library"), false),
                Err(e) => backend.model().notify(format!("cannot delete {name}: {e}"), true),
            }
            backend.load_host_page(index);
        });
    }

    /// Stops an upload in progress (the daemon discards what it received).
    pub fn cancel_upload(&self, what: &str) {
        let mut m = self.model();
        if let Some(handle) = m.uploads.remove(what) {
            handle.abort();
            m.progress.retain(|p| p.what != what);
            m.notify(format!("{what}: cancelled"), false);
        }
        drop(m);
        self.repaint();
    }

    /// Fetches the serial lines of a VM into the model.
    pub fn load_serial(&self, index: usize, id: String) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            if let Ok(out) = client.serial(&id, 200).await {
                backend.model().serial = Some((index, id, out.lines));
                backend.repaint();
            }
        });
    }

    /// Fetches `GET /vms/{id}` of a running VM: how far a firmware-booting VM's firmware got (`boot_status`)
    /// and the state of its network cards.
    pub fn load_details(&self, index: usize, id: String) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            if let Ok(vm) = client.vm(&id).await {
                let changed = {
                    let mut m = backend.model();
                    let status = vm.boot_status.clone().map(|s| (index, id.clone(), s));
                    let details = Some((index, id, vm));
                    let changed = m.boot_status != status || m.details != details;
                    m.boot_status = status;
                    m.details = details;
                    changed
                };
                if changed {
                    backend.repaint();
                }
            }
        });
    }

    /// Fetches the last hour of resource samples of a VM into the model: all of it for a VM not shown yet,
    /// then only the samples newer than those the model has.
    pub fn load_stats(&self, index: usize, id: String) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let backend = self.clone();
        self.runtime.spawn(async move {
            let since = match &backend.model().stats {
                Some((i, v, s)) if *i == index && *v == id => s.last().map_or(0, |s| s.t_ms),
                _ => 0,
            };
            if let Ok(stats) = client.stats(&id, since, false).await {
                // The new samples go onto the VM's own (another VM's, or none: they start afresh).
                let mut m = backend.model();
                match &mut m.stats {
                    Some((i, v, s)) if *i == index && *v == id => merge_samples(s, stats.samples),
                    other => {
                        let mut s = Vec::new();
                        merge_samples(&mut s, stats.samples);
                        *other = Some((index, id, s));
                    }
                }
                drop(m);
                backend.repaint();
            }
        });
    }

    /// Sends the Settings view's change of VM `id` (`name`); the answer lands in [`Model::settings_outcome`] (a
    /// refusal keeps each field's reason for the view to show under its widget) and as a notice.
    pub fn apply_settings(&self, index: usize, id: String, name: String, change: porthole_api::UpdateVm) {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else {
            self.model().notify(format!("Settings of {name}: the host is not connected"), true);
            return;
        };
        let backend = self.clone();
        self.runtime.spawn(async move {
            let result = client.update_vm(&id, &change).await;
            {
                let mut m = backend.model();
                match &result {
                    Ok(vm) if vm.pending_changes.is_empty() => m.notify(format!("Settings of {name} applied"), false),
                    Ok(vm) => m.notify(
                        format!("Settings of {name} saved; {} apply at next start", vm.pending_changes.join(", ")),
                        false,
                    ),
                    Err(e) => m.notify(format!("Settings of {name} refused: {e}"), true),
                }
                let outcome =
                    result.map_err(|e| SettingsRefusal { message: e.to_string(), fields: e.fields().to_vec() });
                m.settings_outcome = Some((index, id, outcome));
            }
            if let Ok(vms) = client.list_vms().await
                && let Some(h) = backend.model().hosts.get_mut(index)
            {
                h.vms = vms;
            }
            backend.repaint();
        });
    }

    /// Runs a change of VM `id`'s drives (`what`: "Add a disk to web1"); its answer lands in
    /// [`Model::drive_outcome`] (for the Settings view to show) and as a notice, and the VM list is fetched
    /// again.
    pub fn change_drives<F, Fut, T>(&self, index: usize, id: String, what: String, action: F)
    where
        F: FnOnce(HostHandle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, HostError>> + Send,
        T: Send + 'static,
    {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else {
            self.model().drive_outcome = Some((index, id, Err(format!("{what}: the host is not connected"))));
            return;
        };
        let backend = self.clone();
        self.runtime.spawn(async move {
            let result = action(client.clone()).await;
            {
                let mut m = backend.model();
                let outcome = match result {
                    Ok(_) => {
                        m.notify(format!("{what}: done"), false);
                        Ok(format!("{what}: done"))
                    }
                    Err(e) => {
                        m.notify(format!("{what} failed: {e}"), true);
                        let why = if e.fields().is_empty() {
                            e.to_string()
                        } else {
                            e.fields().iter().map(|f| f.message.clone()).collect::<Vec<_>>().join("; ")
                        };
                        Err(format!("{what} failed: {why}"))
                    }
                };
                m.drive_outcome = Some((index, id, outcome));
            }
            if let Ok(vms) = client.list_vms().await
                && let Some(h) = backend.model().hosts.get_mut(index)
            {
                h.vms = vms;
            }
            backend.repaint();
        });
    }

    /// Uploads `path` to host `index`'s library (with a progress bar), then runs `then` with the image name.
    pub fn upload_then<F, Fut>(&self, index: usize, path: std::path::PathBuf, then: F)
    where
        F: FnOnce(HostHandle, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), HostError>> + Send,
    {
        let Some(client) = self.model().hosts.get(index).and_then(|h| h.connection.clone()) else { return };
        let name = image_name(&path);
        let backend = self.clone();
        let what = format!("Uploading {name}");
        // The model stays locked until the task's abort handle is recorded, so the task (which takes the lock
        // when it ends) cannot finish before it.
        let mut model = self.model();
        model.progress.push(Progress { what: what.clone(), fraction: 0.0 });
        let key = what.clone();
        let task = self.runtime.spawn(async move {
            let (b, w) = (backend.clone(), what.clone());
            let uploaded = match client.images().await {
                Ok(images) if images.iter().any(|i| i.name == name) => Ok(()),
                _ => client
                    .upload_image(
                        &name,
                        &path,
                        Box::new(move |sent, total| {
                            if let Some(p) = b.model().progress.iter_mut().find(|p| p.what == w) {
                                p.fraction = sent as f32 / total.max(1) as f32;
                            }
                            b.repaint();
                        }),
                    )
                    .await
                    .map(|_| ()),
            };
            {
                let mut m = backend.model();
                m.progress.retain(|p| p.what != what);
                m.uploads.remove(&what);
            }
            let result = match uploaded {
                Ok(()) => then(client, name.clone()).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                backend.model().notify(format!("{what} failed: {e}"), true);
            }
            backend.repaint();
        });
        model.uploads.insert(key, task.abort_handle());
    }
}

/// Decodes a PNG (RGB or RGBA, 8 bits) into an egui image; `None` for anything else.
pub fn decode_png(bytes: &[u8]) -> Option<egui::ColorImage> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().ok()?;
    let (w, h) = (reader.info().width as usize, reader.info().height as usize);
    if w == 0 || h == 0 || w > 4096 || h > 4096 {
        return None;
    }
    let mut buf = vec![0; reader.output_buffer_size()?];
    let info = reader.next_frame(&mut buf).ok()?;
    if info.bit_depth != png::BitDepth::Eight {
        return None;
    }
    let data = &buf[..info.buffer_size()];
    match info.color_type {
        png::ColorType::Rgb => Some(egui::ColorImage::from_rgb([w, h], data)),
        png::ColorType::Rgba => Some(egui::ColorImage::from_rgba_unmultiplied([w, h], data)),
        _ => None,
    }
}

/// The library name an uploaded file gets: its file name, with characters the daemon refuses replaced.
pub fn image_name(path: &std::path::Path) -> String {
    let raw = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image.iso".into());
    let mut name: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).take(63).collect();
    while name.starts_with('.') {
        name.remove(0);
    }
    if name.is_empty() { "image.iso".into() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t_ms: u64) -> porthole_api::StatSample {
        porthole_api::StatSample {
            t_ms,
            cpu_percent: t_ms as f64,
            memory_bytes: 0,
            disk_read_bps: 0.0,
            disk_write_bps: 0.0,
            net_rx_bps: 0.0,
            net_tx_bps: 0.0,
        }
    }

    #[test]
    fn samples_are_appended_once_and_an_hour_is_kept() {
        let mut samples = Vec::new();
        merge_samples(&mut samples, (1..=3).map(|s| at(s * 1000)).collect());
        // The next fetch brings what is newer; a sample seen already is not added twice.
        merge_samples(&mut samples, vec![at(3000), at(4000)]);
        assert_eq!(samples.iter().map(|s| s.t_ms).collect::<Vec<_>>(), [1000, 2000, 3000, 4000]);
        // An hour later, the samples older than the hour before the newest go.
        merge_samples(&mut samples, vec![at(3000 + SAMPLES_KEPT_MS)]);
        assert_eq!(samples.iter().map(|s| s.t_ms).collect::<Vec<_>>(), [3000, 4000, 3000 + SAMPLES_KEPT_MS]);
        merge_samples(&mut samples, Vec::new());
        assert_eq!(samples.len(), 3);
    }
}

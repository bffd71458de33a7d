//! A host served by a helper process: [`HostProcess`] implements [`Host`] by asking a child process that holds
//! the real host (libvirt's, through `porthole-libvirt`) and answers with [`serve`].
//!
//! Why a process: a kind of host may need a native library the window should not link (libvirt's client
//! library: without it the window must still start and serve every other host) or one that can crash (libvirt
//! 9.0's libssh transport on large replies). In a helper, a missing library is a clear error for that host
//! only, and a crash costs one call: the next call starts a new helper.
//!
//! The protocol, all on Unix sockets, nothing on the file system:
//! - The window starts the helper with one end of a socket pair as its standard input (the *broker*). The
//!   helper connects to its host and writes one line on standard output: [`Hello`] (the kind, what it lacks,
//!   whether it reports events) or why it could not connect.
//! - Each call is a new socket pair: the window passes one end to the helper over the broker (`SCM_RIGHTS`),
//!   writes one JSON [`Call`] line on the other, and reads [`Message`] lines: progress, then the answer. A
//!   console's answer carries the console's socket as a passed descriptor, so its bytes never cross the helper.
//! - Closing a call's socket cancels it (an upload stops and removes what it wrote); closing the broker ends
//!   the helper.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::client::{Action, ClientError};
use crate::host::{Feature, Host, HostError, HostHandle, HostKind, Progress};
use crate::{
    AddDisk, CloneVm, CreateVm, DiskLimits, DriveInfo, HostInfo, Identified, Image, IsoFacts, NicDefinition, NicLimits,
    NicStatus, SerialOutput, SnapshotTree, Stats, TakeSnapshot, Task, UpdateVm, Vm,
};

/// How long a helper may take to connect to its host and say hello (an SSH connection's first login).
const HELLO_LIMIT: Duration = Duration::from_secs(90);
/// How long a call may go without a word from the helper (its host's calls are bounded well below this).
const ANSWER_LIMIT: Duration = Duration::from_secs(150);
/// The longest line either side reads (a VM list of thousands of domains fits many times over).
const MAX_LINE: usize = 64 << 20;
/// The helper's last lines of standard error kept for error messages.
const STDERR_LINES: usize = 20;

fn default_refresh_ms() -> u64 {
    1000
}

/// The helper's first line on its standard output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hello {
    Ready {
        kind: HostKind,
        lacks: Vec<(Feature, String)>,
        events: bool,
        /// [`Host::refresh_interval`], in milliseconds.
        #[serde(default = "default_refresh_ms")]
        refresh_ms: u64,
    },
    Refused {
        message: String,
    },
}

/// One call of the [`Host`] interface.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    Host,
    ListVms,
    Vm {
        id: String,
    },
    CreateVm {
        vm: CreateVm,
    },
    DeleteVm {
        id: String,
    },
    Action {
        id: String,
        action: Action,
    },
    Shutdown {
        id: String,
        timeout_s: u64,
    },
    ChangeDriveMedia {
        id: String,
        drive: Option<String>,
        image: Option<String>,
    },
    OpenConsole {
        id: String,
    },
    Stats {
        id: String,
        since_ms: u64,
        minutes: bool,
    },
    Images,
    UploadImage {
        name: String,
        path: PathBuf,
    },
    DeleteImage {
        name: String,
    },
    Task {
        id: String,
    },
    Tasks,
    CancelTask {
        id: String,
    },
    UpdateVm {
        id: String,
        change: UpdateVm,
    },
    Snapshots {
        id: String,
    },
    TakeSnapshot {
        id: String,
        take: TakeSnapshot,
    },
    RevertSnapshot {
        id: String,
        snapshot: String,
        confirm: bool,
    },
    DeleteSnapshot {
        id: String,
        snapshot: String,
    },
    CloneVm {
        id: String,
        clone: CloneVm,
    },
    AddDisk {
        id: String,
        disk: AddDisk,
    },
    RemoveDisk {
        id: String,
        drive: String,
    },
    GrowDisk {
        id: String,
        drive: String,
        size_bytes: u64,
    },
    AddCdrom {
        id: String,
        image: Option<String>,
    },
    RemoveCdrom {
        id: String,
        drive: String,
    },
    SetDiskLimits {
        id: String,
        drive: String,
        limits: DiskLimits,
    },
    SetNicLimits {
        id: String,
        nic: String,
        limits: NicLimits,
    },
    SetNicLink {
        id: String,
        nic: String,
        up: bool,
    },
    Serial {
        id: String,
        lines: usize,
    },
    SerialInput {
        id: String,
        text: String,
    },
    /// Answered as the PNG's bytes in hex.
    Screenshot {
        id: String,
        width: u32,
    },
    HostStats {
        since_ms: u64,
        minutes: bool,
    },
    IdentifyOs {
        facts: IsoFacts,
    },
    /// Not answered: a [`Message::Changed`] line each time the host reports a change, until either side closes.
    Events,
}

/// A line from the helper on a call's socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Progress { sent: u64, total: u64 },
    Changed { generation: u64 },
    Answer { result: Result<Box<RawValue>, WireError> },
}

/// A [`HostError`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireError {
    Failed { message: String },
    Unsupported { what: String, why: String },
    Api { status: u16, code: String, message: String, fields: Vec<crate::FieldError> },
}

impl From<&HostError> for WireError {
    fn from(e: &HostError) -> WireError {
        match e {
            HostError::Porthole(ClientError::Api { status, code, message, fields }) => {
                WireError::Api { status: *status, code: code.clone(), message: message.clone(), fields: fields.clone() }
            }
            HostError::Unsupported { what, why } => WireError::Unsupported { what: what.to_string(), why: why.clone() },
            other => WireError::Failed { message: other.to_string() },
        }
    }
}

impl From<WireError> for HostError {
    fn from(e: WireError) -> HostError {
        match e {
            WireError::Failed { message } => HostError::Failed(message),
            WireError::Unsupported { what, why } => HostError::Unsupported { what: what.into(), why },
            WireError::Api { status, code, message, fields } => {
                HostError::Porthole(ClientError::Api { status, code, message, fields })
            }
        }
    }
}

// ---- the window's side ----

/// A host whose calls a helper process answers; see the module's documentation.
pub struct HostProcess {
    shared: Arc<Shared>,
    kind: HostKind,
    lacks: Vec<(Feature, String)>,
    events: Option<tokio::sync::watch::Receiver<u64>>,
    refresh: Duration,
}

struct Shared {
    program: PathBuf,
    args: Vec<String>,
    /// The running helper; `None` after it ended, until the next call starts another.
    live: Mutex<Option<Helper>>,
}

struct Helper {
    broker: UnixStream,
    /// Always `Some` until dropped.
    child: Option<Child>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing the broker ends the helper; reap it without holding anyone up.
        let _ = self.broker.shutdown(std::net::Shutdown::Both);
        if let Some(mut child) = self.child.take() {
            std::thread::spawn(move || {
                for _ in 0..50 {
                    if !matches!(child.try_wait(), Ok(None)) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            });
        }
    }
}

impl Helper {
    /// Starts `program args…` and waits for its hello.
    fn start(program: &Path, args: &[String]) -> Result<(Helper, Hello), String> {
        let (broker, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            let (keep, name) = (stderr.clone(), program.file_name().unwrap_or_default().to_string_lossy().into_owned());
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("{name}: {line}");
                    let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                    if k.len() == STDERR_LINES {
                        k.pop_front();
                    }
                    k.push_back(line);
                }
            });
        }
        let stdout = child.stdout.take().ok_or("the helper's standard output")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).take(MAX_LINE as u64).read_line(&mut line);
            let _ = tx.send(read.map(|_| line));
        });
        let mut helper = Helper { broker, child: Some(child), stderr };
        let hello = match rx.recv_timeout(HELLO_LIMIT) {
            Ok(Ok(line)) if !line.is_empty() => serde_json::from_str::<Hello>(&line)
                .map_err(|e| format!("{} said something else than hello ({e}): {}", program.display(), line.trim())),
            Ok(Ok(_)) | Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // It ended before a word: a missing library, a crash. Its status and last words say why.
                let status =
                    helper.child.as_mut().and_then(|c| c.wait().ok()).map(|s| s.to_string()).unwrap_or_default();
                std::thread::sleep(Duration::from_millis(50)); // its last lines of standard error
                Err(format!("{} ended before connecting ({status}): {}", program.display(), helper.last_words()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("{} did not connect within {} s", program.display(), HELLO_LIMIT.as_secs()))
            }
        }?;
        Ok((helper, hello))
    }

    fn last_words(&self) -> String {
        let k = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        if k.is_empty() { "it said nothing".to_string() } else { k.iter().cloned().collect::<Vec<_>>().join("; ") }
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl HostProcess {
    /// Starts `program args…` and waits until it connected to its host (or said why it could not).
    pub fn start(program: &Path, args: &[String]) -> Result<HostProcess, String> {
        let (helper, hello) = Helper::start(program, args)?;
        let (kind, lacks, events, refresh_ms) = match hello {
            Hello::Ready { kind, lacks, events, refresh_ms } => (kind, lacks, events, refresh_ms),
            Hello::Refused { message } => return Err(message),
        };
        let shared =
            Arc::new(Shared { program: program.to_owned(), args: args.to_vec(), live: Mutex::new(Some(helper)) });
        let events = events.then(|| {
            let (tx, rx) = tokio::sync::watch::channel(0u64);
            let weak = Arc::downgrade(&shared);
            std::thread::spawn(move || follow_events(weak, tx));
            rx
        });
        let refresh = std::time::Duration::from_millis(refresh_ms.clamp(100, 60_000));
        Ok(HostProcess { shared, kind, lacks, events, refresh })
    }

    /// The helper's process id (`None` between a helper's end and the next call).
    pub fn pid(&self) -> Option<u32> {
        let mut live = self.shared.live.lock().unwrap_or_else(|p| p.into_inner());
        let helper = live.as_mut()?;
        if !helper.running() {
            return None;
        }
        helper.child.as_ref().map(Child::id)
    }

    async fn exchange(
        &self,
        call: Call,
        progress: Option<Progress>,
    ) -> Result<(Box<RawValue>, Option<OwnedFd>), HostError> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| HostError::Failed(format!("socketpair: {e}")))?;
        // Dropping this future (the window gave up on the call) closes the socket: the helper cancels.
        let _cancel = ours.try_clone().ok().map(ShutdownOnDrop);
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.exchange(&call, ours, theirs, progress.as_ref()))
            .await
            .map_err(|e| HostError::Failed(format!("the call to the helper failed: {e}")))?
    }

    async fn call<T: DeserializeOwned>(&self, call: Call) -> Result<T, HostError> {
        let (value, _) = self.exchange(call, None).await?;
        serde_json::from_str(value.get())
            .map_err(|e| HostError::Failed(format!("the helper's answer is not understood: {e}")))
    }
}

struct ShutdownOnDrop(UnixStream);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

impl Shared {
    /// Passes `theirs` to the helper, starting one if none runs (the last one ended or crashed). A call is
    /// never sent twice: only the hand-over, which the helper had not seen, is retried.
    fn hand_over(&self, theirs: &UnixStream) -> Result<Arc<Mutex<VecDeque<String>>>, HostError> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            if !live.as_mut().is_some_and(Helper::running) {
                *live = None;
                let (helper, hello) = Helper::start(&self.program, &self.args).map_err(HostError::Failed)?;
                if let Hello::Refused { message } = hello {
                    return Err(HostError::Failed(message));
                }
                *live = Some(helper);
            }
            let helper = live.as_ref().expect("a helper was just started");
            match send_fd(&helper.broker, theirs.as_raw_fd()) {
                Ok(()) => return Ok(helper.stderr.clone()),
                Err(e) if attempt == 1 => {
                    return Err(HostError::Failed(format!("cannot reach {}: {e}", self.program.display())));
                }
                Err(_) => *live = None,
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    fn exchange(
        &self,
        call: &Call,
        ours: UnixStream,
        theirs: UnixStream,
        progress: Option<&Progress>,
    ) -> Result<(Box<RawValue>, Option<OwnedFd>), HostError> {
        let stderr = self.hand_over(&theirs)?;
        drop(theirs);
        let ended = |what: String| {
            let k = stderr.lock().unwrap_or_else(|p| p.into_inner());
            let words = if k.is_empty() {
                String::new()
            } else {
                format!(" (its last words: {})", k.back().cloned().unwrap_or_default())
            };
            HostError::Failed(format!(
                "{}: {what}{words}",
                self.program.file_name().unwrap_or_default().to_string_lossy()
            ))
        };
        send_call(&ours, call).map_err(|e| ended(format!("cannot send the call: {e}")))?;
        ours.set_read_timeout(Some(ANSWER_LIMIT)).map_err(|e| ended(e.to_string()))?;
        let mut lines = Lines::new(ours);
        loop {
            match lines.next().map_err(&ended)? {
                Message::Progress { sent, total } => {
                    if let Some(p) = progress {
                        p(sent, total)
                    }
                }
                Message::Changed { .. } => {}
                Message::Answer { result } => return result.map(|v| (v, lines.fds.pop())).map_err(HostError::from),
            }
        }
    }
}

/// Writes `call` as one JSON line.
fn send_call(stream: &UnixStream, call: &Call) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(call)?;
    line.push(b'\n');
    (&*stream).write_all(&line)
}

/// Keeps a watch bumped while the helper reports its host's changes; reconnects (starting a new helper)
/// when it ends, and stops when the [`HostProcess`] is gone.
fn follow_events(weak: Weak<Shared>, tx: tokio::sync::watch::Sender<u64>) {
    let mut pause = Duration::from_millis(200);
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let opened = (|| {
            let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
            shared.hand_over(&theirs).map_err(|e| e.to_string())?;
            send_call(&ours, &Call::Events).map_err(|e| e.to_string())?;
            Ok::<_, String>(ours)
        })();
        drop(shared); // never keep the host alive from here
        match opened {
            Ok(stream) => {
                // A new helper may have missed changes: look again.
                tx.send_modify(|g| *g += 1);
                pause = Duration::from_millis(200);
                let mut lines = Lines::new(stream);
                while let Ok(Message::Changed { .. }) = lines.next() {
                    tx.send_modify(|g| *g += 1);
                }
            }
            Err(e) => {
                log_once(&e);
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
        std::thread::sleep(pause);
    }
}

fn log_once(e: &str) {
    static LAST: Mutex<String> = Mutex::new(String::new());
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if *last != e {
        eprintln!("host helper: following events: {e}");
        *last = e.to_string();
    }
}

/// Reads [`Message`] lines, keeping descriptors passed with them.
struct Lines {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Lines {
    fn new(stream: UnixStream) -> Lines {
        Lines { stream, buf: Vec::new(), fds: Vec::new() }
    }

    fn next(&mut self) -> Result<Message, String> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line).map_err(|e| format!("an answer not understood: {e}"));
            }
            if self.buf.len() > MAX_LINE {
                return Err(format!("an answer longer than {MAX_LINE} bytes"));
            }
            let mut chunk = vec![0u8; 64 << 10];
            let (n, fds) = recv_with_fds(&self.stream, &mut chunk)?;
            self.fds.extend(fds);
            if n == 0 {
                return Err("it ended before answering".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), String> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Err("no answer within the time allowed".into()),
            Err(e) => return Err(e.to_string()),
            Ok(m) => break m,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us alone.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// Sends `fd` with one byte (a descriptor travels with data).
fn send_fd(stream: &UnixStream, fd: RawFd) -> std::io::Result<()> {
    send_with_fd(stream.as_raw_fd(), b"\0", fd).map(|_| ())
}

fn send_with_fd(socket: RawFd, bytes: &[u8], fd: RawFd) -> std::io::Result<usize> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    loop {
        match sendmsg::<()>(socket, &[IoSlice::new(bytes)], &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => return r.map_err(std::io::Error::from),
        }
    }
}

#[async_trait]
impl Host for HostProcess {
    fn kind(&self) -> HostKind {
        self.kind
    }
    fn lacks(&self, feature: Feature) -> Option<String> {
        self.lacks.iter().find(|(f, _)| *f == feature).map(|(_, why)| why.clone())
    }
    fn events(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.events.clone()
    }
    fn refresh_interval(&self) -> Duration {
        self.refresh
    }
    async fn host(&self) -> Result<HostInfo, HostError> {
        self.call(Call::Host).await
    }
    async fn list_vms(&self) -> Result<Vec<Vm>, HostError> {
        self.call(Call::ListVms).await
    }
    async fn vm(&self, id: &str) -> Result<Vm, HostError> {
        self.call(Call::Vm { id: id.into() }).await
    }
    async fn create_vm(&self, vm: &CreateVm) -> Result<Vm, HostError> {
        self.call(Call::CreateVm { vm: vm.clone() }).await
    }
    async fn delete_vm(&self, id: &str) -> Result<(), HostError> {
        self.call(Call::DeleteVm { id: id.into() }).await
    }
    async fn action(&self, id: &str, action: Action) -> Result<Vm, HostError> {
        self.call(Call::Action { id: id.into(), action }).await
    }
    async fn shutdown(&self, id: &str, timeout_s: u64) -> Result<Task, HostError> {
        self.call(Call::Shutdown { id: id.into(), timeout_s }).await
    }
    async fn change_drive_media(&self, id: &str, drive: Option<&str>, image: Option<&str>) -> Result<Vm, HostError> {
        let call = Call::ChangeDriveMedia { id: id.into(), drive: drive.map(Into::into), image: image.map(Into::into) };
        self.call(call).await
    }
    async fn open_console(&self, id: &str) -> Result<UnixStream, HostError> {
        let (_, fd) = self.exchange(Call::OpenConsole { id: id.into() }, None).await?;
        fd.map(UnixStream::from).ok_or_else(|| HostError::Failed("the helper answered without the console".into()))
    }
    async fn stats(&self, id: &str, since_ms: u64, minutes: bool) -> Result<Stats, HostError> {
        self.call(Call::Stats { id: id.into(), since_ms, minutes }).await
    }
    async fn images(&self) -> Result<Vec<Image>, HostError> {
        self.call(Call::Images).await
    }
    async fn upload_image(&self, name: &str, path: &Path, progress: Progress) -> Result<Image, HostError> {
        let path = std::path::absolute(path).map_err(|e| HostError::Failed(format!("{}: {e}", path.display())))?;
        let (value, _) = self.exchange(Call::UploadImage { name: name.into(), path }, Some(progress)).await?;
        serde_json::from_str(value.get())
            .map_err(|e| HostError::Failed(format!("the helper's answer is not understood: {e}")))
    }
    async fn delete_image(&self, name: &str) -> Result<(), HostError> {
        self.call(Call::DeleteImage { name: name.into() }).await
    }
    async fn task(&self, id: &str) -> Result<Task, HostError> {
        self.call(Call::Task { id: id.into() }).await
    }
    async fn tasks(&self) -> Result<Vec<Task>, HostError> {
        self.call(Call::Tasks).await
    }
    async fn cancel_task(&self, id: &str) -> Result<Task, HostError> {
        self.call(Call::CancelTask { id: id.into() }).await
    }
    async fn update_vm(&self, id: &str, change: &UpdateVm) -> Result<Vm, HostError> {
        self.call(Call::UpdateVm { id: id.into(), change: change.clone() }).await
    }
    async fn snapshots(&self, id: &str) -> Result<SnapshotTree, HostError> {
        self.call(Call::Snapshots { id: id.into() }).await
    }
    async fn take_snapshot(&self, id: &str, take: &TakeSnapshot) -> Result<Task, HostError> {
        self.call(Call::TakeSnapshot { id: id.into(), take: take.clone() }).await
    }
    async fn revert_snapshot(&self, id: &str, snapshot: &str, confirm: bool) -> Result<Task, HostError> {
        self.call(Call::RevertSnapshot { id: id.into(), snapshot: snapshot.into(), confirm }).await
    }
    async fn delete_snapshot(&self, id: &str, snapshot: &str) -> Result<Task, HostError> {
        self.call(Call::DeleteSnapshot { id: id.into(), snapshot: snapshot.into() }).await
    }
    async fn clone_vm(&self, id: &str, clone: &CloneVm) -> Result<Task, HostError> {
        self.call(Call::CloneVm { id: id.into(), clone: clone.clone() }).await
    }
    async fn add_disk(&self, id: &str, disk: &AddDisk) -> Result<DriveInfo, HostError> {
        self.call(Call::AddDisk { id: id.into(), disk: disk.clone() }).await
    }
    async fn remove_disk(&self, id: &str, drive: &str) -> Result<(), HostError> {
        self.call(Call::RemoveDisk { id: id.into(), drive: drive.into() }).await
    }
    async fn grow_disk(&self, id: &str, drive: &str, size_bytes: u64) -> Result<DriveInfo, HostError> {
        self.call(Call::GrowDisk { id: id.into(), drive: drive.into(), size_bytes }).await
    }
    async fn add_cdrom(&self, id: &str, image: Option<&str>) -> Result<DriveInfo, HostError> {
        self.call(Call::AddCdrom { id: id.into(), image: image.map(Into::into) }).await
    }
    async fn remove_cdrom(&self, id: &str, drive: &str) -> Result<(), HostError> {
        self.call(Call::RemoveCdrom { id: id.into(), drive: drive.into() }).await
    }
    async fn set_disk_limits(&self, id: &str, drive: &str, limits: &DiskLimits) -> Result<DriveInfo, HostError> {
        self.call(Call::SetDiskLimits { id: id.into(), drive: drive.into(), limits: *limits }).await
    }
    async fn set_nic_limits(&self, id: &str, nic: &str, limits: &NicLimits) -> Result<NicDefinition, HostError> {
        self.call(Call::SetNicLimits { id: id.into(), nic: nic.into(), limits: *limits }).await
    }
    async fn set_nic_link(&self, id: &str, nic: &str, up: bool) -> Result<NicStatus, HostError> {
        self.call(Call::SetNicLink { id: id.into(), nic: nic.into(), up }).await
    }
    async fn serial(&self, id: &str, lines: usize) -> Result<SerialOutput, HostError> {
        self.call(Call::Serial { id: id.into(), lines }).await
    }
    async fn serial_input(&self, id: &str, text: &str) -> Result<(), HostError> {
        self.call(Call::SerialInput { id: id.into(), text: text.into() }).await
    }
    async fn screenshot(&self, id: &str, width: u32) -> Result<Vec<u8>, HostError> {
        let png: String = self.call(Call::Screenshot { id: id.into(), width }).await?;
        hex::decode(png).map_err(|e| HostError::Failed(format!("the helper's screenshot is not hex: {e}")))
    }
    async fn host_stats(&self, since_ms: u64, minutes: bool) -> Result<Stats, HostError> {
        self.call(Call::HostStats { since_ms, minutes }).await
    }
    async fn identify_os(&self, facts: &IsoFacts) -> Result<Identified, HostError> {
        self.call(Call::IdentifyOs { facts: facts.clone() }).await
    }
}

// ---- the helper's side ----

/// The helper's whole life: connects with `connect`, says hello on standard output, then answers calls
/// passed over standard input (the broker) until the window closes it. Returns the process's exit status.
pub fn serve_stdio(
    runtime: &tokio::runtime::Runtime,
    connect: impl std::future::Future<Output = Result<HostHandle, String>>,
) -> std::process::ExitCode {
    use std::os::fd::AsFd;
    let broker = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("standard input: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let host = runtime.block_on(connect);
    let hello = match &host {
        Ok(h) => Hello::Ready {
            kind: h.kind(),
            lacks: Feature::ALL.iter().filter_map(|f| h.lacks(*f).map(|why| (*f, why))).collect(),
            events: h.events().is_some(),
            refresh_ms: h.refresh_interval().as_millis() as u64,
        },
        Err(message) => Hello::Refused { message: message.clone() },
    };
    let mut out = std::io::stdout().lock();
    let said = serde_json::to_string(&hello).map(|l| writeln!(out, "{l}").and_then(|_| out.flush()));
    drop(out);
    let host = match (host, said) {
        (Ok(h), Ok(Ok(()))) => h,
        (Err(_), _) => return std::process::ExitCode::FAILURE,
        (_, said) => {
            eprintln!("cannot say hello: {said:?}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match serve(runtime, host, broker) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("the broker socket: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Answers the calls whose sockets arrive on `broker` until it closes (the window went away).
pub fn serve(runtime: &tokio::runtime::Runtime, host: HostHandle, broker: UnixStream) -> std::io::Result<()> {
    loop {
        let mut byte = [0u8; 1];
        let (n, fds) = recv_with_fds(&broker, &mut byte).map_err(std::io::Error::other)?;
        if n == 0 {
            return Ok(());
        }
        for fd in fds {
            let host = host.clone();
            runtime.spawn(async move {
                if let Err(e) = answer(host, UnixStream::from(fd)).await {
                    eprintln!("a call's socket: {e}");
                }
            });
        }
    }
}

/// What a call produced: a value, or a stream to pass as a descriptor.
enum Produced {
    Value(Box<RawValue>),
    Stream(UnixStream),
}

async fn answer(host: HostHandle, stream: UnixStream) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = String::new();
    (&mut reader).take(MAX_LINE as u64).read_line(&mut line).await?;
    let call: Call = match serde_json::from_str(&line) {
        Ok(c) => c,
        Err(e) => {
            let result = Err(WireError::Failed { message: format!("a call not understood: {e}") });
            return write_message(&mut write, &Message::Answer { result }).await;
        }
    };
    // The window closing its end (it gave up on the call) ends the wait below, which drops the call.
    let closed = async move {
        let mut byte = [0u8; 1];
        let _ = reader.read(&mut byte).await;
    };
    tokio::pin!(closed);
    if let Call::Events = call {
        let Some(mut changes) = host.events() else { return Ok(()) };
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let generation = *changes.borrow_and_update();
                    write_message(&mut write, &Message::Changed { generation }).await?;
                }
                _ = &mut closed => return Ok(()),
            }
        }
    }
    let (progress_tx, mut progress_rx) = tokio::sync::watch::channel((0u64, 0u64));
    let work = run(&*host, call, progress_tx);
    tokio::pin!(work);
    let mut progress_open = true;
    let result = loop {
        tokio::select! {
            result = &mut work => break result,
            changed = progress_rx.changed(), if progress_open => match changed {
                Ok(()) => {
                    let (sent, total) = *progress_rx.borrow_and_update();
                    write_message(&mut write, &Message::Progress { sent, total }).await?;
                }
                Err(_) => progress_open = false,
            },
            _ = &mut closed => return Ok(()),
        }
    };
    match result {
        Ok(Produced::Value(v)) => write_message(&mut write, &Message::Answer { result: Ok(v) }).await,
        Ok(Produced::Stream(s)) => {
            let null = RawValue::from_string("null".into())?;
            let mut line = serde_json::to_vec(&Message::Answer { result: Ok(null) })?;
            line.push(b'\n');
            let socket = write.as_ref();
            loop {
                socket.writable().await?;
                match socket
                    .try_io(tokio::io::Interest::WRITABLE, || send_with_fd(socket.as_raw_fd(), &line, s.as_raw_fd()))
                {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                    Ok(n) if n == line.len() => return Ok(()),
                    Ok(n) => return write.write_all(&line[n..]).await,
                }
            }
        }
        Err(e) => write_message(&mut write, &Message::Answer { result: Err(WireError::from(&e)) }).await,
    }
}

async fn write_message(write: &mut tokio::net::unix::OwnedWriteHalf, message: &Message) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    write.write_all(&line).await
}

async fn run(
    host: &dyn Host,
    call: Call,
    progress: tokio::sync::watch::Sender<(u64, u64)>,
) -> Result<Produced, HostError> {
    fn value<T: Serialize>(r: Result<T, HostError>) -> Result<Produced, HostError> {
        let v = r?;
        serde_json::value::to_raw_value(&v)
            .map(Produced::Value)
            .map_err(|e| HostError::Failed(format!("cannot write the answer: {e}")))
    }
    match call {
        Call::Host => value(host.host().await),
        Call::ListVms => value(host.list_vms().await),
        Call::Vm { id } => value(host.vm(&id).await),
        Call::CreateVm { vm } => value(host.create_vm(&vm).await),
        Call::DeleteVm { id } => value(host.delete_vm(&id).await),
        Call::Action { id, action } => value(host.action(&id, action).await),
        Call::Shutdown { id, timeout_s } => value(host.shutdown(&id, timeout_s).await),
        Call::ChangeDriveMedia { id, drive, image } => {
            value(host.change_drive_media(&id, drive.as_deref(), image.as_deref()).await)
        }
        Call::OpenConsole { id } => host.open_console(&id).await.map(Produced::Stream),
        Call::Stats { id, since_ms, minutes } => value(host.stats(&id, since_ms, minutes).await),
        Call::Images => value(host.images().await),
        Call::UploadImage { name, path } => {
            let report: Progress = Box::new(move |sent, total| {
                let _ = progress.send((sent, total));
            });
            value(host.upload_image(&name, &path, report).await)
        }
        Call::DeleteImage { name } => value(host.delete_image(&name).await),
        Call::Task { id } => value(host.task(&id).await),
        Call::Tasks => value(host.tasks().await),
        Call::CancelTask { id } => value(host.cancel_task(&id).await),
        Call::UpdateVm { id, change } => value(host.update_vm(&id, &change).await),
        Call::Snapshots { id } => value(host.snapshots(&id).await),
        Call::TakeSnapshot { id, take } => value(host.take_snapshot(&id, &take).await),
        Call::RevertSnapshot { id, snapshot, confirm } => value(host.revert_snapshot(&id, &snapshot, confirm).await),
        Call::DeleteSnapshot { id, snapshot } => value(host.delete_snapshot(&id, &snapshot).await),
        Call::CloneVm { id, clone } => value(host.clone_vm(&id, &clone).await),
        Call::AddDisk { id, disk } => value(host.add_disk(&id, &disk).await),
        Call::RemoveDisk { id, drive } => value(host.remove_disk(&id, &drive).await),
        Call::GrowDisk { id, drive, size_bytes } => value(host.grow_disk(&id, &drive, size_bytes).await),
        Call::AddCdrom { id, image } => value(host.add_cdrom(&id, image.as_deref()).await),
        Call::RemoveCdrom { id, drive } => value(host.remove_cdrom(&id, &drive).await),
        Call::SetDiskLimits { id, drive, limits } => value(host.set_disk_limits(&id, &drive, &limits).await),
        Call::SetNicLimits { id, nic, limits } => value(host.set_nic_limits(&id, &nic, &limits).await),
        Call::SetNicLink { id, nic, up } => value(host.set_nic_link(&id, &nic, up).await),
        Call::Serial { id, lines } => value(host.serial(&id, lines).await),
        Call::SerialInput { id, text } => value(host.serial_input(&id, &text).await),
        Call::Screenshot { id, width } => value(host.screenshot(&id, width).await.map(hex::encode)),
        Call::HostStats { since_ms, minutes } => value(host.host_stats(since_ms, minutes).await),
        Call::IdentifyOs { facts } => value(host.identify_os(&facts).await),
        Call::Events => Err(HostError::Failed("events are a stream, not a call".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_with_their_kind_status_and_fields() {
        let api = HostError::Porthole(ClientError::Api {
            status: 422,
            code: "invalid".into(),
            message: "no".into(),
            fields: vec![crate::FieldError { field: "memory_mib".into(), message: "too small".into() }],
        });
        let back = HostError::from(
            serde_json::from_str::<WireError>(&serde_json::to_string(&WireError::from(&api)).unwrap()).unwrap(),
        );
        assert_eq!((back.status(), back.fields().len()), (Some(422), 1));
        let unsupported = HostError::Unsupported { what: "Cloning".into(), why: "not here".into() };
        match HostError::from(WireError::from(&unsupported)) {
            HostError::Unsupported { what, why } => assert_eq!((what.as_ref(), why.as_str()), ("Cloning", "not here")),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(HostError::from(WireError::from(&HostError::Failed("x".into()))), HostError::Failed(m) if m == "x")
        );
    }

    /// A line with a descriptor: the reader gets both, the descriptor close-on-exec and working; lines split
    /// across reads and several in one read come out whole.
    #[test]
    fn lines_carry_passed_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let (console, mut far) = UnixStream::pair().unwrap();
        let null = RawValue::from_string("null".into()).unwrap();
        let answer = serde_json::to_vec(&Message::Answer { result: Ok(null) }).unwrap();
        (&a).write_all(b"{\"progress\":{\"sent\":1,\"total\":2}}\n{\"changed\":{\"gen").unwrap();
        (&a).write_all(b"eration\":7}}\n").unwrap();
        send_with_fd(a.as_raw_fd(), &[answer.as_slice(), b"\n"].concat(), console.as_raw_fd()).unwrap();
        drop(console);
        let mut lines = Lines::new(b);
        assert!(matches!(lines.next().unwrap(), Message::Progress { sent: 1, total: 2 }));
        assert!(matches!(lines.next().unwrap(), Message::Changed { generation: 7 }));
        assert!(matches!(lines.next().unwrap(), Message::Answer { result: Ok(v) } if v.get() == "null"));
        let fd = lines.fds.pop().expect("the descriptor");
        // SAFETY: F_GETFD reads a flag of a descriptor we own.
        let flags = unsafe { nix::libc::fcntl(fd.as_raw_fd(), nix::libc::F_GETFD) };
        assert_ne!(flags & nix::libc::FD_CLOEXEC, 0, "received descriptors are close-on-exec");
        let mut passed = UnixStream::from(fd);
        far.write_all(b"RFB 003.008\n").unwrap();
        let mut hello = [0u8; 12];
        passed.read_exact(&mut hello).unwrap();
        assert_eq!(&hello, b"RFB 003.008\n");
        drop(a);
        assert!(lines.next().unwrap_err().contains("ended"));
    }
}

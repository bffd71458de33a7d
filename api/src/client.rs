//! `Client`: the one way to talk to a host — the local daemon over its Unix socket, or a remote one over
//! HTTPS with an API token, its certificate pinned by SHA-256 fingerprint (or checked against the
//! system's roots). Errors are typed: an API error carries the daemon's status, code and message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    API_PREFIX, AddCdrom, AddDisk, CloneVm, ConsoleTicket, CreateVm, DriveInfo, ErrorBody, GrowDisk, HostInfo,
    Identified, Image, IsoFacts, LinkChange, MediaChange, NicStatus, RevertSnapshot, SerialInput, SerialOutput,
    SnapshotTree, Stats, TakeSnapshot, Task, UpdateVm, Vm,
};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api { status: u16, code: String, message: String, fields: Vec<crate::FieldError> },
    #[error("cannot talk to {target}: {source}")]
    Http { target: String, source: reqwest::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("WebSocket: {0}")]
    WebSocket(String),
    #[error("the daemon's answer is not what the API says: {0}")]
    Decode(String),
    #[error("the file is {size} bytes; this host takes uploads of at most {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
}

impl ClientError {
    /// An API error's refused fields (field name, why).
    pub fn fields(&self) -> &[crate::FieldError] {
        match self {
            ClientError::Api { fields, .. } => fields,
            _ => &[],
        }
    }

    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Clone)]
enum Target {
    Unix(PathBuf),
    Https { authority: String, tls: Arc<rustls::ClientConfig> },
}

/// A connection to one host's daemon.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    target: Target,
}

/// A lifecycle action (`POST /vms/{id}/{action}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Start,
    Poweroff,
    Reset,
    Pause,
    Resume,
    /// Save the running VM's state to disk and end its process; `Start` resumes it.
    Suspend,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Poweroff => "poweroff",
            Action::Reset => "reset",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Suspend => "suspend",
        }
    }
}

/// What the certificate verifier does with the server's leaf certificate.
#[derive(Debug)]
enum Check {
    /// Accept exactly the certificate with this SHA-256 (self-signed daemons).
    Pinned(Vec<u8>),
    /// Accept any certificate and remember its SHA-256 (to show a new host's fingerprint to the user before
    /// it is pinned; nothing is sent over such a connection).
    Record(std::sync::Mutex<Option<String>>),
}

#[derive(Debug)]
struct CertificateCheck {
    check: Check,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for CertificateCheck {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let digest = Sha256::digest(end_entity.as_ref());
        match &self.check {
            Check::Pinned(sha256) if digest.as_slice() == sha256.as_slice() => {}
            Check::Pinned(_) => {
                return Err(rustls::Error::General(
                    "the server's certificate does not match the pinned fingerprint".into(),
                ));
            }
            Check::Record(seen) => *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(hex::encode(digest)),
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The SHA-256 fingerprint of the certificate `authority` (`host:port`) presents, for the user to compare
/// with what `portholed --listen` printed before pinning it.
pub async fn fetch_fingerprint(authority: &str) -> Result<String, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let recorder =
        Arc::new(CertificateCheck { check: Check::Record(std::sync::Mutex::new(None)), provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(10), tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| {
            ClientError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{authority}: no answer")))
        })??;
    let host = authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority).trim_matches(['[', ']']);
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| ClientError::Tls(e.to_string()))?;
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let seen = match &recorder.check {
        Check::Record(seen) => seen.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        Check::Pinned(_) => None,
    };
    seen.ok_or_else(|| ClientError::Tls("the server sent no certificate".into()))
}

/// Parses a SHA-256 fingerprint: 64 hex digits, colons and case ignored.
pub fn parse_fingerprint(s: &str) -> Option<Vec<u8>> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(hex.to_ascii_lowercase()).ok()?;
    (bytes.len() == 32).then_some(bytes)
}

fn tls_config(pinned: Option<&str>) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let config = match pinned {
        Some(fp) => {
            let sha256 = parse_fingerprint(fp)
                .ok_or_else(|| ClientError::Tls(format!("{fp:?} is not a SHA-256 fingerprint (64 hex digits)")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CertificateCheck { check: Check::Pinned(sha256), provider }))
                .with_no_client_auth()
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for path in ["/etc/ssl/certs/ca-certificates.crt"] {
                use rustls::pki_types::pem::PemObject;
                if let Ok(certs) = rustls::pki_types::CertificateDer::pem_file_iter(path) {
                    for c in certs.flatten() {
                        let _ = roots.add(c);
                    }
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(config)
}

impl Client {
    /// The local daemon on its Unix socket.
    pub fn unix(socket: &Path) -> Result<Self, ClientError> {
        // A Unix socket never speaks TLS: hand reqwest a TLS setup with no roots, so it does not go looking
        // for the system's CA certificates (a machine without them could not even reach its own daemon).
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let no_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(no_tls)
            .unix_socket(socket)
            .build()
            .map_err(|source| ClientError::Http { target: socket.display().to_string(), source })?;
        Ok(Client {
            http,
            base: format!("http://localhost{API_PREFIX}"),
            token: None,
            target: Target::Unix(socket.to_owned()),
        })
    }

    /// A remote daemon at `authority` (`host:port`) over HTTPS with `token`; `pinned_sha256` pins its
    /// certificate (as `portholed --listen` prints it), else the system's CA roots must vouch for it.
    pub fn https(authority: &str, token: &str, pinned_sha256: Option<&str>) -> Result<Self, ClientError> {
        let tls = tls_config(pinned_sha256)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .build()
            .map_err(|source| ClientError::Http { target: authority.to_owned(), source })?;
        Ok(Client {
            http,
            base: format!("https://{authority}{API_PREFIX}"),
            token: Some(token.to_owned()),
            target: Target::Https { authority: authority.to_owned(), tls: Arc::new(tls) },
        })
    }

    fn target_name(&self) -> String {
        match &self.target {
            Target::Unix(p) => p.display().to_string(),
            Target::Https { authority, .. } => authority.clone(),
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response =
            request.send().await.map_err(|source| ClientError::Http { target: self.target_name(), source })?;
        let status = response.status();
        if status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => ClientError::Api { status: status.as_u16(), code: b.error, message: b.message, fields: b.fields },
            Err(_) => {
                ClientError::Api { status: status.as_u16(), code: "unknown".into(), message: text, fields: Vec::new() }
            }
        })
    }

    async fn call<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(request).await?;
        let bytes =
            response.bytes().await.map_err(|source| ClientError::Http { target: self.target_name(), source })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn call_json<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(self.request(method, path).json(body)).await
    }

    pub async fn host(&self) -> Result<HostInfo, ClientError> {
        self.call(self.request(Method::GET, "/host")).await
    }

    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.call(self.request(Method::GET, "/openapi.json")).await
    }

    pub async fn list_vms(&self) -> Result<Vec<Vm>, ClientError> {
        self.call(self.request(Method::GET, "/vms")).await
    }

    pub async fn create_vm(&self, vm: &CreateVm) -> Result<Vm, ClientError> {
        self.call_json(Method::POST, "/vms", vm).await
    }

    pub async fn vm(&self, id: &str) -> Result<Vm, ClientError> {
        self.call(self.request(Method::GET, &format!("/vms/{id}"))).await
    }

    pub async fn update_vm(&self, id: &str, change: &UpdateVm) -> Result<Vm, ClientError> {
        self.call_json(Method::PATCH, &format!("/vms/{id}"), change).await
    }

    pub async fn delete_vm(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, &format!("/vms/{id}"))).await.map(|_| ())
    }

    pub async fn action(&self, id: &str, action: Action) -> Result<Vm, ClientError> {
        self.call(self.request(Method::POST, &format!("/vms/{id}/{}", action.path()))).await
    }

    /// Graceful shutdown (ACPI power button, forced off after `timeout_s`): a task to poll.
    pub async fn shutdown(&self, id: &str, timeout_s: u64) -> Result<Task, ClientError> {
        self.call(self.request(Method::POST, &format!("/vms/{id}/shutdown?timeout_s={timeout_s}"))).await
    }

    pub async fn snapshots(&self, id: &str) -> Result<SnapshotTree, ClientError> {
        self.call(self.request(Method::GET, &format!("/vms/{id}/snapshots"))).await
    }

    /// Takes a snapshot: a task whose `result` is the new snapshot's id.
    pub async fn take_snapshot(&self, id: &str, take: &TakeSnapshot) -> Result<Task, ClientError> {
        self.call_json(Method::POST, &format!("/vms/{id}/snapshots"), take).await
    }

    /// Reverts the VM to `snapshot` (`confirm` is required while it runs: its present state is lost).
    pub async fn revert_snapshot(&self, id: &str, snapshot: &str, confirm: bool) -> Result<Task, ClientError> {
        self.call_json(Method::POST, &format!("/vms/{id}/snapshots/{snapshot}/revert"), &RevertSnapshot { confirm })
            .await
    }

    /// Deletes `snapshot`, merging its disk layer where the tree needs it.
    pub async fn delete_snapshot(&self, id: &str, snapshot: &str) -> Result<Task, ClientError> {
        self.call(self.request(Method::DELETE, &format!("/vms/{id}/snapshots/{snapshot}"))).await
    }

    /// Clones VM (or template) `id`: a task whose `result` is the new VM's id.
    pub async fn clone_vm(&self, id: &str, clone: &CloneVm) -> Result<Task, ClientError> {
        self.call_json(Method::POST, &format!("/vms/{id}/clone"), clone).await
    }

    pub async fn task(&self, id: &str) -> Result<Task, ClientError> {
        self.call(self.request(Method::GET, &format!("/tasks/{id}"))).await
    }

    pub async fn tasks(&self) -> Result<Vec<Task>, ClientError> {
        self.call(self.request(Method::GET, "/tasks")).await
    }

    /// Puts a library image in the VM's first CD/DVD drive (`None` ejects).
    pub async fn change_media(&self, id: &str, image: Option<&str>) -> Result<Vm, ClientError> {
        self.change_drive_media(id, None, image).await
    }

    /// Puts a library image in the VM's CD/DVD drive `drive` (`cdrom1`; `None`: the first), or ejects.
    pub async fn change_drive_media(
        &self,
        id: &str,
        drive: Option<&str>,
        image: Option<&str>,
    ) -> Result<Vm, ClientError> {
        let body = MediaChange { image: image.map(str::to_owned), drive: drive.map(str::to_owned) };
        self.call_json(Method::POST, &format!("/vms/{id}/media"), &body).await
    }

    /// Adds a disk to a stopped VM: the new drive.
    pub async fn add_disk(&self, id: &str, disk: &AddDisk) -> Result<DriveInfo, ClientError> {
        self.call_json(Method::POST, &format!("/vms/{id}/disks"), disk).await
    }

    /// Removes disk `drive` (not the boot disk) of a stopped VM, and its files.
    pub async fn remove_disk(&self, id: &str, drive: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, &format!("/vms/{id}/disks/{drive}"))).await.map(|_| ())
    }

    /// Grows disk `drive` to `size_bytes`: the drive as it is now.
    pub async fn grow_disk(&self, id: &str, drive: &str, size_bytes: u64) -> Result<DriveInfo, ClientError> {
        self.call_json(Method::POST, &format!("/vms/{id}/disks/{drive}/size"), &GrowDisk { size_bytes }).await
    }

    /// Sets a disk's rate limits (all of them; a running VM takes them at once): the drive afterwards.
    pub async fn set_disk_limits(
        &self,
        id: &str,
        drive: &str,
        limits: &crate::DiskLimits,
    ) -> Result<DriveInfo, ClientError> {
        self.call_json(Method::PUT, &format!("/vms/{id}/disks/{drive}/limits"), limits).await
    }

    /// Sets a network card's rate limits (applied at once to a running VM): the card's definition.
    pub async fn set_nic_limits(
        &self,
        id: &str,
        nic: &str,
        limits: &crate::NicLimits,
    ) -> Result<crate::NicDefinition, ClientError> {
        self.call_json(Method::PUT, &format!("/vms/{id}/nics/{nic}/limits"), limits).await
    }

    /// Adds a CD/DVD drive to a stopped VM (with `image` in it, or empty): the new drive.
    pub async fn add_cdrom(&self, id: &str, image: Option<&str>) -> Result<DriveInfo, ClientError> {
        self.call_json(Method::POST, &format!("/vms/{id}/cdroms"), &AddCdrom { image: image.map(str::to_owned) }).await
    }

    /// Removes CD/DVD drive `drive` of a stopped VM (the later drives move up one place).
    pub async fn remove_cdrom(&self, id: &str, drive: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, &format!("/vms/{id}/cdroms/{drive}"))).await.map(|_| ())
    }

    /// Plugs a running VM's network card `nic` in (`up`) or pulls its virtual cable; returns the card's state.
    pub async fn set_nic_link(&self, id: &str, nic: &str, up: bool) -> Result<NicStatus, ClientError> {
        self.call_json(Method::POST, &format!("/vms/{id}/nics/{nic}/link"), &LinkChange { up }).await
    }

    pub async fn serial(&self, id: &str, lines: usize) -> Result<SerialOutput, ClientError> {
        self.call(self.request(Method::GET, &format!("/vms/{id}/serial?lines={lines}"))).await
    }

    /// Types `text` into the running VM's serial port.
    pub async fn serial_input(&self, id: &str, text: &str) -> Result<(), ClientError> {
        let body = SerialInput { text: text.to_owned() };
        self.send(self.request(Method::POST, &format!("/vms/{id}/serial/input")).json(&body)).await.map(|_| ())
    }

    /// A PNG of the running VM's screen at most `width` pixels wide.
    pub async fn screenshot(&self, id: &str, width: u32) -> Result<Vec<u8>, ClientError> {
        let response = self.send(self.request(Method::GET, &format!("/vms/{id}/screenshot?width={width}"))).await?;
        let bytes =
            response.bytes().await.map_err(|source| ClientError::Http { target: self.target_name(), source })?;
        Ok(bytes.to_vec())
    }

    pub async fn stats(&self, id: &str, since_ms: u64, minutes: bool) -> Result<Stats, ClientError> {
        let resolution = if minutes { "min" } else { "s" };
        self.call(self.request(Method::GET, &format!("/vms/{id}/stats?since={since_ms}&resolution={resolution}"))).await
    }

    pub async fn console_ticket(&self, id: &str) -> Result<ConsoleTicket, ClientError> {
        self.call(self.request(Method::POST, &format!("/vms/{id}/console"))).await
    }

    /// The host's own samples (CPU of every core, memory in use, its VMs' disk and network rates).
    pub async fn host_stats(&self, since_ms: u64, minutes: bool) -> Result<Stats, ClientError> {
        let resolution = if minutes { "min" } else { "s" };
        self.call(self.request(Method::GET, &format!("/host/stats?since={since_ms}&resolution={resolution}"))).await
    }

    /// Cancels a running upload or a shutdown's wait; returns the task as it is now (it ends `cancelled`).
    pub async fn cancel_task(&self, id: &str) -> Result<Task, ClientError> {
        self.call(self.request(Method::POST, &format!("/tasks/{id}/cancel"))).await
    }

    pub async fn images(&self) -> Result<Vec<Image>, ClientError> {
        self.call(self.request(Method::GET, "/images")).await
    }

    /// `POST /osinfo/identify`: the OS the host's osinfo-db finds for an ISO's facts (read with
    /// [`crate::iso::read_file`]), for an ISO not in the library yet.
    pub async fn identify_os(&self, facts: &IsoFacts) -> Result<Identified, ClientError> {
        self.call_json(Method::POST, "/osinfo/identify", facts).await
    }

    pub async fn delete_image(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, &format!("/images/{name}"))).await.map(|_| ())
    }

    /// Uploads the file at `path` as image `name`, streaming it; `progress(sent, total)` is called as bytes
    /// go out.
    pub async fn upload_image(
        &self,
        name: &str,
        path: &Path,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<Image, ClientError> {
        let mut file = tokio::fs::File::open(path).await?;
        let total = file.metadata().await?.len();
        let limit = self.host().await?.upload_limit_bytes;
        if total > limit {
            // The daemon would refuse it after the headers; do not send gigabytes to learn that.
            return Err(ClientError::TooLarge { size: total, limit });
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let sha256 = hex::encode(hasher.finalize());
        let file = tokio::fs::File::open(path).await?;
        let progress = Arc::new(progress);
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stream = futures_util::stream::unfold((file, vec![0u8; 256 * 1024]), |(mut file, mut buf)| async move {
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => Some((Ok::<_, std::io::Error>(bytes_of(&buf[..n])), (file, buf))),
                Err(e) => Some((Err(e), (file, buf))),
            }
        })
        .map(move |chunk| {
            if let Ok(c) = &chunk {
                let now = sent.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed) + c.len() as u64;
                progress(now, total);
            }
            chunk
        });
        let request = self
            .request(Method::PUT, &format!("/images/{name}"))
            .header(reqwest::header::CONTENT_LENGTH, total)
            .header("x-porthole-sha256", sha256)
            .body(reqwest::Body::wrap_stream(stream));
        self.call(request).await
    }

    /// Opens the console of VM `id`: a fresh ticket, the WebSocket, and a byte stream carrying RFB (the
    /// WebSocket framing is handled by a background task).
    pub async fn console(&self, id: &str) -> Result<tokio::io::DuplexStream, ClientError> {
        let ticket = self.console_ticket(id).await?;
        self.console_with_ticket(&ticket.path).await
    }

    /// Opens `GET path` (from a [`ConsoleTicket`]) as a WebSocket and returns the RFB byte stream.
    pub async fn console_with_ticket(&self, path: &str) -> Result<tokio::io::DuplexStream, ClientError> {
        let ws = self.websocket(path).await?;
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        tokio::spawn(pump(ws, theirs));
        Ok(ours)
    }

    /// The serial output of VM `id` from now on, as it arrives (a WebSocket behind a channel; the channel
    /// closes when the stream ends).
    pub async fn serial_stream(&self, id: &str) -> Result<tokio::sync::mpsc::Receiver<String>, ClientError> {
        let mut ws = self.websocket(&format!("{API_PREFIX}/vms/{id}/serial/stream")).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(t) = msg
                    && tx.send(t.to_string()).await.is_err()
                {
                    break;
                }
            }
        });
        Ok(rx)
    }

    /// A WebSocket to `path` (absolute, with the API prefix), with the token when there is one.
    async fn websocket(&self, path: &str) -> Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let ws_err = |e: tokio_tungstenite::tungstenite::Error| ClientError::WebSocket(e.to_string());
        let (stream, url): (Box<dyn Io>, String) = match &self.target {
            Target::Unix(socket) => {
                (Box::new(tokio::net::UnixStream::connect(socket).await?), format!("ws://localhost{path}"))
            }
            Target::Https { authority, tls } => {
                let tcp = tokio::net::TcpStream::connect(authority).await?;
                let host = authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority).trim_matches(['[', ']']);
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| ClientError::Tls(format!("{host:?}: {e}")))?;
                let tls_stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await?;
                (Box::new(tls_stream), format!("wss://{authority}{path}"))
            }
        };
        let mut request = url.into_client_request().map_err(ws_err)?;
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::Tls("the token is not a valid header".into()))?;
            request.headers_mut().insert(reqwest::header::AUTHORIZATION, value);
        }
        // The daemon sends console frames of at most 256 KiB and serial text in pieces of at most 64 KiB: a
        // message far past those is a hostile server's, refused before it is held.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(WEBSOCKET_MESSAGE_MAX))
            .max_frame_size(Some(WEBSOCKET_MESSAGE_MAX));
        let connected = tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await;
        let (ws, response) = connected.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => {
                let body = r.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
                match serde_json::from_str::<ErrorBody>(&body) {
                    Ok(b) => ClientError::Api {
                        status: r.status().as_u16(),
                        code: b.error,
                        message: b.message,
                        fields: b.fields,
                    },
                    Err(_) => ClientError::Api {
                        status: r.status().as_u16(),
                        code: "unknown".into(),
                        message: body,
                        fields: Vec::new(),
                    },
                }
            }
            other => ws_err(other),
        })?;
        let _ = response;
        Ok(ws)
    }
}

/// The largest WebSocket message the client takes from a daemon.
const WEBSOCKET_MESSAGE_MAX: usize = 4 << 20;

/// A byte stream a WebSocket can run over (Unix socket or TLS).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn bytes_of(b: &[u8]) -> Vec<u8> {
    b.to_vec()
}

/// Moves bytes between a WebSocket (binary frames) and one end of a duplex pipe until either side closes.
async fn pump<S>(ws: tokio_tungstenite::WebSocketStream<S>, io: tokio::io::DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(io);
    let inbound = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            match msg {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
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
        _ = inbound => {}
        _ = outbound => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A hostile "daemon" that accepts the upgrade, then announces an 8 MiB message: the client gives up at
    /// the header (its limit is 4 MiB) and its console stream ends, instead of waiting to hold the 8 MiB.
    #[tokio::test]
    async fn a_console_message_past_the_limit_ends_the_stream() {
        let dir = std::env::temp_dir().join(format!("porthole-ws-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                request.push(s.read_u8().await.unwrap());
            }
            let request = String::from_utf8_lossy(&request);
            let key = request
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: ").or_else(|| l.strip_prefix("sec-websocket-key: ")))
                .unwrap()
                .trim()
                .to_owned();
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            s.write_all(answer.as_bytes()).await.unwrap();
            let mut frame = vec![0x82, 127];
            frame.extend_from_slice(&(8u64 << 20).to_be_bytes());
            s.write_all(&frame).await.unwrap();
            // Hold the connection open: only the client's limit can end the stream.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let client = Client::unix(&socket).unwrap();
        let mut console = client.console_with_ticket("/api/v1/console?ticket=x").await.unwrap();
        let mut got = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(10), console.read_to_end(&mut got)).await;
        assert!(ended.is_ok(), "the client still waits for the 8 MiB message");
        assert!(got.is_empty());
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

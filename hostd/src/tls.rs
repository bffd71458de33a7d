//! TLS for the TCP listener (rustls): a certificate given on the command line, or a self-signed one
//! generated on first start and kept in `<data>/tls/`; its SHA-256 fingerprint is printed so that clients
//! can pin it. Handshakes run in their own tasks, so a slow or plain-HTTP client never holds up others;
//! a connection that does not speak TLS is closed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path:?}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write {path:?}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("the certificate or key is not usable: {0}")]
    Config(String),
}

/// A certificate chain and its key, with the leaf's fingerprint.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate (DER), lowercase hex.
    pub fingerprint: String,
}

fn read_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |e: rustls::pki_types::pem::Error| TlsError::Read { path, reason: e.to_string() }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(read_err(cert))?
        .collect::<Result<_, _>>()
        .map_err(read_err(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(read_err(key))?;
    let leaf =
        chain.first().ok_or_else(|| TlsError::Read { path: cert.to_owned(), reason: "no certificate in it".into() })?;
    let fingerprint = hex::encode(Sha256::digest(leaf.as_ref()));
    Ok(Identity { chain, key, fingerprint })
}

/// The identity to serve: `--tls-cert/--tls-key` if given, else `<data>/tls/{cert,key}.pem`, generated
/// (self-signed, for this host's name, localhost and the loopback addresses) when absent.
pub fn identity(data_dir: &Path, given: Option<(&Path, &Path)>) -> Result<Identity, TlsError> {
    if let Some((cert, key)) = given {
        return read_identity(cert, key);
    }
    let dir = data_dir.join("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() || !key.exists() {
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |e: std::io::Error| TlsError::Write { path, reason: e.to_string() }
        };
        std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        if let Some(h) = hostname() {
            names.push(h);
        }
        let generated = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
        use std::os::unix::fs::PermissionsExt;
        crate::store::write_atomic(&key, generated.signing_key.serialize_pem().as_bytes()).map_err(write_err(&key))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).map_err(write_err(&key))?;
        crate::store::write_atomic(&cert, generated.cert.pem().as_bytes()).map_err(write_err(&cert))?;
        log::info!("generated a self-signed TLS certificate in {}", dir.display());
    }
    read_identity(&cert, &key)
}

/// This host's name.
pub fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// A TCP listener whose connections come out TLS-wrapped (for `axum::serve`).
pub struct TlsListener {
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, identity: Identity) -> Result<Self, TlsError> {
        // TLS 1.3 and 1.2 only, said here rather than left to the library's defaults (SECURITY.md).
        let config =
            rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .with_no_client_auth()
                .with_single_cert(identity.chain, identity.key)
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let local = tcp.local_addr().map_err(|e| TlsError::Config(e.to_string()))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        log::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => log::debug!("TLS handshake with {addr} failed: {e}"),
                        Err(_) => log::debug!("TLS handshake with {addr} timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { incoming: rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(c) => c,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

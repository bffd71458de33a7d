//! Who is asking: the local owner (the Unix socket, checked by peer credentials) or the holder of an API
//! token (TCP + TLS, `Authorization: Bearer`). Tokens are stored hashed (SHA-256) in `<data>/tokens.json`;
//! the daemon rereads the file when it changes, so `portholed token revoke` takes effect at once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use porthole_api::Role;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{now_ms, random_hex, write_atomic};

/// One token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// VM ids the token may act on; empty: every VM.
    #[serde(default)]
    pub vms: BTreeSet<String>,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    pub created_ms: u64,
}

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token name, or "local" for the owner on the Unix socket.
    pub name: String,
    pub role: Role,
    /// VM ids it may act on; None: all.
    pub vms: Option<BTreeSet<String>>,
    /// Came in on the local Unix socket.
    pub local: bool,
}

impl Principal {
    pub fn local_owner() -> Self {
        Principal { name: "local".into(), role: Role::Admin, vms: None, local: true }
    }

    /// Whether it may act on VM `id` at all.
    pub fn may_see(&self, id: &str) -> bool {
        self.vms.as_ref().is_none_or(|v| v.contains(id))
    }
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token file, cached by modification time.
pub struct Tokens {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Vec<TokenRecord>)>,
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read or write {path:?}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("a token named {0:?} exists already")]
    Exists(String),
    #[error("no token named {0:?}")]
    Unknown(String),
    #[error("token name {0:?} is invalid: use 1-63 letters, digits, '-', '_' or '.'")]
    Name(String),
}

impl Tokens {
    pub fn new(data_dir: &Path) -> Self {
        Tokens { path: data_dir.join("tokens.json"), cache: Mutex::new((None, Vec::new())) }
    }

    fn read(&self) -> Result<Vec<TokenRecord>, TokenError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| TokenError::File { path: self.path.clone(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(TokenError::File { path: self.path.clone(), reason: e.to_string() }),
        }
    }

    fn write(&self, tokens: &[TokenRecord]) -> Result<(), TokenError> {
        let bytes = serde_json::to_vec_pretty(tokens).expect("tokens serialize");
        write_atomic(&self.path, &bytes)
            .map_err(|e| TokenError::File { path: self.path.clone(), reason: e.to_string() })
    }

    /// Creates a token; returns the secret (shown once).
    pub fn create(&self, name: &str, role: Role, vms: BTreeSet<String>) -> Result<String, TokenError> {
        if !crate::store::is_valid_name(name) {
            return Err(TokenError::Name(name.to_owned()));
        }
        let mut tokens = self.read()?;
        if tokens.iter().any(|t| t.name == name) {
            return Err(TokenError::Exists(name.to_owned()));
        }
        let secret = format!("pht_{}", random_hex(24));
        tokens.push(TokenRecord { name: name.to_owned(), role, vms, sha256: hash(&secret), created_ms: now_ms() });
        self.write(&tokens)?;
        Ok(secret)
    }

    pub fn revoke(&self, name: &str) -> Result<(), TokenError> {
        let mut tokens = self.read()?;
        let before = tokens.len();
        tokens.retain(|t| t.name != name);
        if tokens.len() == before {
            return Err(TokenError::Unknown(name.to_owned()));
        }
        self.write(&tokens)
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        self.read()
    }

    /// The principal a presented token stands for, if it is a current token.
    pub fn check(&self, token: &str) -> Option<Principal> {
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != mtime || mtime.is_none() {
            match self.read() {
                Ok(t) => *cache = (mtime, t),
                Err(e) => {
                    log::error!("{e}; refusing every token until it is fixed");
                    *cache = (mtime, Vec::new());
                }
            }
        }
        let h = hash(token);
        cache.1.iter().find(|t| t.sha256 == h).map(|t| Principal {
            name: t.name.clone(),
            role: t.role,
            vms: (!t.vms.is_empty()).then(|| t.vms.clone()),
            local: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_checked_and_revoked() {
        let dir = std::env::temp_dir().join(format!("portholed-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tokens = Tokens::new(&dir);
        let secret = tokens.create("ci", Role::Operator, BTreeSet::from(["vm1".to_owned()])).unwrap();
        assert!(matches!(tokens.create("ci", Role::Viewer, BTreeSet::new()), Err(TokenError::Exists(_))));
        let file = std::fs::read_to_string(dir.join("tokens.json")).unwrap();
        assert!(!file.contains(&secret), "the secret is never stored");
        let p = tokens.check(&secret).unwrap();
        assert_eq!((p.role, p.may_see("vm1"), p.may_see("vm2")), (Role::Operator, true, false));
        assert_eq!(tokens.check("pht_wrong"), None);
        // Revocation is seen without a restart (the file's mtime changes).
        std::thread::sleep(std::time::Duration::from_millis(20));
        tokens.revoke("ci").unwrap();
        assert_eq!(tokens.check(&secret), None);
        assert!(matches!(tokens.revoke("ci"), Err(TokenError::Unknown(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

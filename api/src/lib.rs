//! Types of Porthole's host API (`/api/v1`), shared by the daemon (`portholed`) and every client.
//!
//! The GUI reaches every host — the local one over a Unix socket, remote ones over HTTPS — only through
//! this crate. See ARCHITECTURE.md.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod client;
pub mod rfb;
mod types;
pub use client::{Client, ClientError};
pub use types::*;

/// The version of Porthole that built this crate; every binary reports the same one.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Path prefix of every endpoint of the host API.
pub const API_PREFIX: &str = "/api/v1";

/// `GET /api/v1/host`: what a host is and what it can hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// Host name as the host reports it.
    pub hostname: String,
    /// Porthole version of the daemon.
    pub version: String,
    /// Logical CPUs of the host.
    pub cpus: u32,
    /// Physical memory of the host in MiB.
    pub memory_mib: u64,
    /// Free space where the host keeps VM disks and images, in bytes.
    #[serde(default)]
    pub free_disk_bytes: u64,
    /// Number of VMs defined on the host.
    #[serde(default)]
    pub vms: u64,
    /// Store files the daemon could not read (reported, left in place).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Largest image upload the daemon takes, in bytes.
    #[serde(default)]
    pub upload_limit_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_info_round_trips_and_refuses_unknown_fields() {
        let info = HostInfo {
            hostname: "h".into(),
            version: VERSION.into(),
            cpus: 2,
            memory_mib: 1024,
            free_disk_bytes: 1,
            vms: 0,
            problems: vec![],
            upload_limit_bytes: 1,
        };
        let text = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<HostInfo>(&text).unwrap(), info);
        let extra = text.replace('}', ",\"x\":1}");
        assert!(serde_json::from_str::<HostInfo>(&extra).is_err());
    }
}

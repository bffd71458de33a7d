//! Types of Porthole's host API (`/api/v1`), shared by the daemon (`portholed`) and every client.
//!
//! The GUI reaches every host — the local one over a Unix socket, remote ones over HTTPS — only through
//! this crate. See ARCHITECTURE.md.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod client;
pub mod host;
pub mod host_process;
pub mod iso;
pub mod rfb;
pub mod ssh;
mod types;
pub use client::{Action, Client, ClientError};
pub use host::{Feature, Host, HostError, HostHandle, HostKind};
pub use types::*;

/// The version of Porthole that built this crate; every binary reports the same one.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Path prefix of every endpoint of the host API.
pub const API_PREFIX: &str = "/api/v1";

/// `GET /api/v1/host`: what a host is and what it can hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
    /// The version of the host's osinfo-db (libosinfo's database, used to identify ISOs); None without one.
    #[serde(default)]
    pub osinfo_db: Option<String>,
    /// Memory the host could still give out without swapping (MemAvailable), in MiB.
    #[serde(default)]
    pub memory_available_mib: u64,
    /// Size of the file system holding VM disks and images, in bytes.
    #[serde(default)]
    pub disk_total_bytes: u64,
    /// Bytes the image library takes on the host.
    #[serde(default)]
    pub images_bytes: u64,
    /// Bytes the VMs' disks take on the host.
    #[serde(default)]
    pub vm_disks_bytes: u64,
    /// VMs running now (or paused), and the vCPUs and memory they were given.
    #[serde(default)]
    pub running_vms: u64,
    #[serde(default)]
    pub vcpus_allocated: u64,
    #[serde(default)]
    pub memory_allocated_mib: u64,
    /// The host's CPU model ("AMD EPYC 7B13"), empty when unknown.
    #[serde(default)]
    pub cpu_model: String,
    /// The host's kernel release (`uname -r`).
    #[serde(default)]
    pub kernel: String,
    /// Seconds since the host booted.
    #[serde(default)]
    pub uptime_s: u64,
    /// The folder where the host keeps its VMs and image library (the daemon's data directory).
    #[serde(default)]
    pub data_dir: String,
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
            osinfo_db: Some("20221203".into()),
            cpu_model: "CPU".into(),
            ..HostInfo::default()
        };
        let text = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<HostInfo>(&text).unwrap(), info);
        let extra = text.replace('}', ",\"x\":1}");
        assert!(serde_json::from_str::<HostInfo>(&extra).is_err());
    }

    #[test]
    fn nic_backends_and_forwards_have_their_documented_json_form() {
        let nic: NicSpec = serde_json::from_str(r#"{"backend":{"type":"bridge","bridge":"br0"}}"#).unwrap();
        assert_eq!(nic.backend, NicBackend::Bridge { bridge: "br0".into() });
        let user: NicSpec = serde_json::from_str(r#"{"backend":{"type":"user"}}"#).unwrap();
        assert_eq!(user.backend, NicBackend::User);
        let e = serde_json::from_str::<NicSpec>(r#"{"backend":{"type":"vde"}}"#).unwrap_err().to_string();
        assert!(e.contains("unknown variant") && e.contains("vde"), "{e}");
        assert!(serde_json::from_str::<NicSpec>(r#"{"backend":{"type":"tap","name":"t","x":1}}"#).is_err());
        let f: PortForward = serde_json::from_str(r#"{"protocol":"tcp","host_port":2222,"guest_port":22}"#).unwrap();
        assert_eq!(f, PortForward::tcp(2222, 22), "the host address defaults to 127.0.0.1");
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"protocol":"tcp","host_address":"127.0.0.1","host_port":2222,"guest_port":22}"#
        );
        assert!(serde_json::from_str::<PortForward>(r#"{"protocol":"sctp","host_port":1,"guest_port":1}"#).is_err());
        // An old stored definition or reply without the new fields still reads.
        let d: NicDefinition =
            serde_json::from_str(r#"{"id":"net0","backend":{"type":"user"},"mac":"02:00:00:00:00:01"}"#).unwrap();
        assert_eq!((d.mtu, d.forwards.len()), (DEFAULT_MTU, 0));
    }

    #[test]
    fn macs_must_be_unicast_hex() {
        for good in ["02:8a:00:11:22:33", "52:54:00:AB:cd:ef"] {
            assert!(is_valid_mac(good), "{good}");
        }
        for bad in ["01:00:5e:00:00:01", "00:00:00:00:00:00", "02:8a:00:11:22", "02:8a:00:11:22:3g", "028a00112233", ""]
        {
            assert!(!is_valid_mac(bad), "{bad}");
        }
    }
}

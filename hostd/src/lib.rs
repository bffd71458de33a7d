//! `portholed`'s library: the host daemon's parts (the VM store, the engines it runs, the HTTP API), kept
//! apart from the binary so the fuzz targets (`fuzz/fuzz_targets/host_api.rs`) drive the same router the
//! daemon serves.

pub mod auth;
pub mod cloud_init;
pub mod disks;
pub mod host;
pub mod net;
pub mod openapi;
pub mod osinfo;
pub mod screenshot;
pub mod server;
pub mod stats;
pub mod store;
pub mod tls;

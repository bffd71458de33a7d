//! `porthole-libvirt URI`: the window's helper for one libvirt host. It links libvirt's client library so
//! the window does not have to: the window starts it per libvirt host and talks to it as
//! `porthole_api::host_process` describes (standard input is the window's socket, the first line of standard
//! output says whether the connection to `URI` opened).

use std::process::ExitCode;
use std::sync::Arc;

use porthole_api::HostHandle;
use porthole_libvirt::LibvirtHost;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let uri = match args.as_slice() {
        [flag] if flag == "--version" => {
            println!("porthole-libvirt {}", porthole_api::VERSION);
            return ExitCode::SUCCESS;
        }
        [uri] if !uri.starts_with('-') => uri.clone(),
        _ => {
            eprintln!("usage: porthole-libvirt URI (the Porthole window starts it for a libvirt host)");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    porthole_api::host_process::serve_stdio(&runtime, async move {
        let host = LibvirtHost::connect_async(&uri).await.map_err(|e| e.to_string())?;
        Ok(Arc::new(host) as HostHandle)
    })
}

//! SSH-tunnelled console streams; the connection URIs and host keys are `porthole_api::ssh`'s.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

pub use porthole_api::ssh::*;

/// The `ssh` command line that reaches the same host, as the same user, with the same key and known_hosts
/// as the libvirt connection `uri`, forwarding stdin/stdout to `target` (`host:port` on the remote side).
pub fn tunnel_command(uri: &ConnUri, target: &str) -> Result<Command, String> {
    let host = uri.host.as_deref().ok_or("the connection has no host to tunnel through")?;
    // libvirt's `ssh` transport runs `command` (default ssh); the others use libvirt's own SSH code, so we
    // run the ssh binary with their key and known_hosts.
    let program = if uri.transport == "ssh" { uri.param("command").unwrap_or("ssh") } else { "ssh" };
    let mut cmd = Command::new(program);
    cmd.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-T", "-e", "none"]);
    if let Some(kh) = uri.param("known_hosts") {
        cmd.arg("-o").arg(format!("UserKnownHostsFile={kh}"));
    }
    if let Some(key) = uri.param("keyfile") {
        cmd.args(["-o", "IdentitiesOnly=yes", "-i", key]);
    }
    if let Some(port) = uri.port {
        cmd.args(["-p", &port.to_string()]);
    }
    if let Some(user) = &uri.user {
        cmd.args(["-l", user]);
    }
    cmd.arg("-W").arg(target).arg("--").arg(host);
    Ok(cmd)
}

/// Opens `target` on the remote host through an `ssh -W` child whose stdin/stdout is one end of a socket
/// pair; returns the other end once the remote side has sent its first bytes (RFB servers speak first), so a
/// refused host key or key shows here as ssh's own message.
pub fn tunnel(uri: &ConnUri, target: &str, wait: Duration) -> Result<UnixStream, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let theirs_out: OwnedFd = theirs.try_clone().map_err(|e| format!("socketpair: {e}"))?.into();
    let theirs_in: OwnedFd = theirs.into();
    let mut cmd = tunnel_command(uri, target)?;
    cmd.stdin(Stdio::from(theirs_in)).stdout(Stdio::from(theirs_out)).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run ssh for the console tunnel: {e}"))?;
    let mut stderr = child.stderr.take();
    drop(cmd); // our copies of the child's ends
    ours.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let mut byte = [0u8; 1];
    // SAFETY: a valid socket and a one-byte buffer; MSG_PEEK leaves the byte for the RFB client.
    let n = unsafe { libc::recv(ours.as_raw_fd(), byte.as_mut_ptr().cast(), 1, libc::MSG_PEEK) };
    if n == 1 {
        ours.set_read_timeout(None).map_err(|e| e.to_string())?;
        // Reap ssh when the stream ends; drain its stderr so it never blocks on it.
        std::thread::spawn(move || {
            if let Some(mut e) = stderr.take() {
                let mut sink = Vec::new();
                let _ = e.read_to_end(&mut sink);
            }
            let _ = child.wait();
        });
        return Ok(ours);
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut msg = String::new();
    if let Some(mut e) = stderr.take() {
        let _ = e.read_to_string(&mut msg);
    }
    let why = if n == 0 { "the tunnel closed".to_string() } else { "no data within the wait".to_string() };
    Err(format!("console tunnel to {target} through ssh failed ({why}): {}", msg.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_uses_the_connections_key_user_and_known_hosts() {
        let u = ConnUri::parse("qemu+libssh://u@h:22/system?keyfile=/k&known_hosts=/kh").unwrap();
        let cmd = tunnel_command(&u, "127.0.0.1:5900").unwrap();
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert_eq!(cmd.get_program(), "ssh");
        for want in ["UserKnownHostsFile=/kh", "-i /k", "-p 22", "-l u", "-W 127.0.0.1:5900 -- h", "BatchMode=yes"] {
            assert!(joined.contains(want), "{want} missing from {joined}");
        }
    }
}

//! A private libvirt for tests: `libvirtd` in session mode as the dedicated user `porthole-libvirt-test`
//! (created when missing), with its runtime, config, cache and data directories in a scratch folder, and an
//! `sshd` on 127.0.0.1 with its own host key that lets that user in with a generated key.
//!
//! The recipe (libvirt 9.0, OpenSSH 9.2, Debian 12):
//! - `libvirtd` runs as the user with `XDG_RUNTIME_DIR`, `XDG_CONFIG_HOME`, `XDG_CACHE_HOME`,
//!   `XDG_DATA_HOME` under the scratch folder; its socket is `$XDG_RUNTIME_DIR/libvirt/libvirt-sock`, and
//!   root (the tests) connects with `qemu:///session?socket=THAT`. The user cannot open /dev/kvm, so the
//!   daemon offers QEMU's TCG only (`<domain type='qemu'>`).
//! - The storage pool `default` is defined (a directory pool under the data directory) before the tests.
//! - `sshd -D -e -f CONFIG` with `UsePAM no`, `StrictModes no`, `AuthorizedKeysFile` in the scratch folder and
//!   `SetEnv XDG_RUNTIME_DIR=…`, so `virt-ssh-helper` (which libvirt runs on the remote end) finds the same
//!   session socket for `/session`. The user's password is set to `*` (no password, but not "locked", which
//!   sshd refuses without PAM).
//! - `qemu+libssh://USER@127.0.0.1:PORT/session?keyfile=K&known_hosts=KH&sshauth=privkey` (libvirt's own SSH
//!   code honours both files); `qemu+ssh://…?keyfile=K&command=WRAPPER&no_tty=1`, where WRAPPER runs `ssh` with
//!   `-o UserKnownHostsFile=KH`, because the `ssh` transport has no known_hosts parameter.
//!
//! - TLS (`qemu+tls://`, [`Libvirt::enable_tls`]): `openssl` makes a CA, a server certificate for
//!   127.0.0.1/localhost (SAN `IP:127.0.0.1, DNS:localhost`, serverAuth) and client certificates (clientAuth),
//!   RSA keys with digitalSignature and keyEncipherment (libvirt checks its own and the peer's usages). The
//!   daemon is restarted with `--listen` (libvirtd 9.0 opens no TCP socket without it, unless socket-activated)
//!   and `-f CONFIG` (a session daemon otherwise reads `$XDG_CONFIG_HOME/libvirt/libvirtd.conf`) holding
//!   `listen_tls = 1`, `listen_tcp = 0`, `listen_addr = "127.0.0.1"`, `tls_port`, `key_file`, `cert_file`,
//!   `ca_file`, `auth_tls = "none"` and `tls_allowed_dn_list` naming the one accepted client. Clients name a
//!   folder with `pkipath=DIR` holding `cacert.pem`, `clientcert.pem` and `clientkey.pem` (libvirt 9.0's
//!   names). Over TLS `virDomainOpenGraphicsFD` fails ("Receiving file descriptors is not supported on this
//!   socket") and the daemon drops the connection after it.
//!
//! Everything started here (the daemon, the QEMU processes and virtlogd it started, sshd) is killed by PID
//! when the harness drops, and the scratch folder removed; libvirtd and sshd also die with the test's thread
//! (PR_SET_PDEATHSIG) should the test process crash.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{Scratch, text};

/// The user the private daemon runs as.
pub const USER: &str = "porthole-libvirt-test";
const LIMIT: Duration = Duration::from_secs(60);

/// What the harness needs, as (file, Debian package).
const NEEDS: &[(&str, &str)] = &[
    ("/usr/sbin/libvirtd", "libvirt-daemon"),
    ("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so", "libvirt-daemon-driver-qemu"),
    ("/usr/bin/virt-ssh-helper", "libvirt-daemon"),
    ("/usr/bin/virsh", "libvirt-clients"),
    ("/usr/sbin/sshd", "openssh-server"),
    ("/usr/bin/ssh", "openssh-client"),
    ("/usr/bin/ssh-keygen", "openssh-client"),
    ("/usr/bin/ssh-keyscan", "openssh-client"),
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/bin/qemu-img", "qemu-utils"),
    ("/usr/sbin/useradd", "passwd"),
];

/// Why the libvirt tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the libvirt tests run as root (they start libvirtd as a dedicated user)".into());
    }
    let absent: Vec<String> =
        NEEDS.iter().filter(|(f, _)| !Path::new(f).exists()).map(|(f, p)| format!("{f} (Debian: {p})")).collect();
    (!absent.is_empty()).then(|| format!("missing: {}", absent.join(", ")))
}

fn run(cmd: &mut Command) -> Output {
    crate::run(cmd, LIMIT)
}

fn id_of(flag: &str) -> Option<u32> {
    let out = Command::new("id").arg(flag).arg(USER).output().ok()?;
    if !out.status.success() {
        return None;
    }
    text(&out.stdout).trim().parse().ok()
}

/// The test user's uid and gid, creating the user (idempotently) if needed.
fn ensure_user() -> Result<(u32, u32), String> {
    if id_of("-u").is_none() {
        let out = run(Command::new("useradd").args(["--system", "--create-home", "--shell", "/bin/sh", USER]));
        // A parallel test may have created it meanwhile.
        if !out.status.success() && id_of("-u").is_none() {
            return Err(format!("useradd {USER}: {}", text(&out.stderr)));
        }
    }
    // No password, but not locked: sshd (without PAM) refuses locked accounts.
    let out = run(Command::new("usermod").args(["-p", "*", USER]));
    if !out.status.success() {
        return Err(format!("usermod -p '*' {USER}: {}", text(&out.stderr)));
    }
    match (id_of("-u"), id_of("-g")) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => Err(format!("cannot read {USER}'s ids")),
    }
}

fn home_of_user() -> String {
    let out = Command::new("getent").args(["passwd", USER]).output().map(|o| text(&o.stdout)).unwrap_or_default();
    out.trim().split(':').nth(5).unwrap_or("/").to_string()
}

/// Makes the child get SIGKILL when the thread that started it ends (a test that crashed leaves no daemon).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; run in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The certificates [`Libvirt::enable_tls`] made: `pkipath` folders (each with `cacert.pem`, `clientcert.pem`,
/// `clientkey.pem`, as libvirt expects them).
pub struct Tls {
    /// The daemon's TLS port on 127.0.0.1.
    pub port: u16,
    /// The accepted client: the daemon's CA, a client certificate it signed with the allowed name.
    pub client: PathBuf,
    /// The daemon's CA, a client certificate it signed, but a name not on the daemon's `tls_allowed_dn_list`.
    pub stranger: PathBuf,
    /// The daemon's CA, and a client certificate (with the allowed name) from another CA.
    pub foreign_client: PathBuf,
    /// Another CA throughout: the daemon's certificate is not trusted.
    pub foreign_ca: PathBuf,
    /// No certificates at all.
    pub empty: PathBuf,
    config: PathBuf,
}

/// The accepted client certificate's subject, as libvirt's `tls_allowed_dn_list` matches it.
const CLIENT_DN: &str = "O=Porthole tests,CN=porthole-client";
const OPENSSL: &str = "/usr/bin/openssl";

/// A self-signed CA: `{base}.key.pem`, `{base}.cert.pem`.
fn make_ca(base: &Path, cn: &str) -> Result<(), String> {
    let out = run(Command::new(OPENSSL)
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &format!("/CN={cn}")])
        .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(base.with_extension("key.pem"))
        .arg("-out")
        .arg(base.with_extension("cert.pem")));
    if !out.status.success() {
        return Err(format!("openssl req -x509 ({cn}): {}", text(&out.stderr)));
    }
    Ok(())
}

/// A key and a certificate signed by the CA at `ca` (see [`make_ca`]) with the extensions `ext` (openssl's
/// config syntax, one per line): `{base}.key.pem`, `{base}.cert.pem`.
fn make_leaf(base: &Path, ca: &Path, subject: &str, ext: &str, serial: u32) -> Result<(), String> {
    let (csr, ext_file) = (base.with_extension("csr"), base.with_extension("ext"));
    let out = run(Command::new(OPENSSL)
        .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout"])
        .arg(base.with_extension("key.pem"))
        .arg("-out")
        .arg(&csr));
    if !out.status.success() {
        return Err(format!("openssl req ({subject}): {}", text(&out.stderr)));
    }
    std::fs::write(&ext_file, ext).map_err(|e| e.to_string())?;
    let out = run(Command::new(OPENSSL)
        .args(["x509", "-req", "-days", "2", "-set_serial", &serial.to_string(), "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(ca.with_extension("cert.pem"))
        .arg("-CAkey")
        .arg(ca.with_extension("key.pem"))
        .arg("-extfile")
        .arg(&ext_file)
        .arg("-out")
        .arg(base.with_extension("cert.pem")));
    if !out.status.success() {
        return Err(format!("openssl x509 -req ({subject}): {}", text(&out.stderr)));
    }
    Ok(())
}

/// The first of 100 VNC ports for a new harness's QEMUs: apart for every harness of this process, and
/// moved by the process id between runs.
fn vnc_port_base() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let slot = (std::process::id() * 16 + N.fetch_add(1, Ordering::Relaxed)) % 400;
    (20000 + slot * 100) as u16
}

/// A private libvirt daemon and sshd.
pub struct Libvirt {
    pub dir: Scratch,
    /// The daemon's socket.
    pub socket: PathBuf,
    pub run_dir: PathBuf,
    pub images: PathBuf,
    /// Where domains defined by [`Libvirt::define_guest`] write their serial output.
    pub logs: PathBuf,
    daemon: Option<Child>,
    pub daemon_log: PathBuf,
    sshd: Option<Child>,
    pub ssh_port: u16,
    pub client_key: PathBuf,
    /// A key the sshd does not accept.
    pub wrong_key: PathBuf,
    /// known_hosts with the sshd's host key.
    pub known_hosts: PathBuf,
    /// An empty known_hosts.
    pub no_known_hosts: PathBuf,
    pub host_key_pub: PathBuf,
    /// `ssh` with `-o UserKnownHostsFile=known_hosts` (for the `ssh` transport's `command=`).
    pub ssh_wrapper: PathBuf,
    uid: u32,
    gid: u32,
    tls: Option<Tls>,
}

impl Libvirt {
    /// Starts the daemon and sshd, or says why not (then the test skips).
    pub fn start() -> Result<Libvirt, String> {
        if let Some(why) = missing() {
            return Err(why);
        }
        let (uid, gid) = ensure_user()?;
        let dir = Scratch::new("libvirt");
        let chmod = |p: &Path, mode: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
        chmod(dir.dir(), 0o755).map_err(|e| e.to_string())?;
        for sub in ["run", "config", "cache", "data", "logs", "data/libvirt", "data/libvirt/images"] {
            let p = dir.path(sub);
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", p.display()))?;
            chmod(&p, if sub == "run" { 0o700 } else { 0o755 }).map_err(|e| e.to_string())?;
        }
        // Each harness's QEMUs get VNC ports of their own: two private daemons (tests run in parallel) would
        // otherwise both hand out 5900 and up, and a QEMU started by one (a snapshot's revert) may find its
        // port taken by the other's.
        let conf_dir = dir.path("config/libvirt");
        std::fs::create_dir_all(&conf_dir).map_err(|e| e.to_string())?;
        std::os::unix::fs::chown(&conf_dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        let base = vnc_port_base();
        std::fs::write(
            conf_dir.join("qemu.conf"),
            format!("remote_display_port_min = {base}\nremote_display_port_max = {}\n", base + 99),
        )
        .map_err(|e| format!("writing qemu.conf: {e}"))?;
        let run_dir = dir.path("run");
        let mut lv = Libvirt {
            socket: run_dir.join("libvirt/libvirt-sock"),
            run_dir,
            images: dir.path("data/libvirt/images"),
            logs: dir.path("logs"),
            daemon: None,
            daemon_log: dir.path("libvirtd.log"),
            sshd: None,
            ssh_port: 0,
            client_key: dir.path("ssh/client_key"),
            wrong_key: dir.path("ssh/wrong_key"),
            known_hosts: dir.path("ssh/known_hosts"),
            no_known_hosts: dir.path("ssh/no_known_hosts"),
            host_key_pub: dir.path("ssh/host_key.pub"),
            ssh_wrapper: dir.path("ssh/ssh-wrapper"),
            uid,
            gid,
            tls: None,
            dir,
        };
        lv.start_daemon()?;
        let pool = lv.images.display().to_string();
        for args in [
            vec!["pool-define-as", "default", "dir", "--target", pool.as_str()],
            vec!["pool-build", "default"],
            vec!["pool-start", "default"],
        ] {
            let out = lv.virsh(&args);
            if !out.status.success() {
                return Err(format!("virsh {}: {}", args.join(" "), text(&out.stderr)));
            }
        }
        lv.start_sshd()?;
        Ok(lv)
    }

    /// [`Libvirt::start`], or `None` after printing why the test skips.
    pub fn start_or_skip(test: &str) -> Option<Libvirt> {
        match Libvirt::start() {
            Ok(lv) => Some(lv),
            Err(why) => {
                eprintln!("SKIPPED {test}: {why}");
                None
            }
        }
    }

    /// [`Libvirt::start`] then [`Libvirt::enable_tls`], or `None` after printing why the test skips.
    pub fn start_with_tls_or_skip(test: &str) -> Option<Libvirt> {
        let mut lv = Libvirt::start_or_skip(test)?;
        match lv.enable_tls() {
            Ok(()) => Some(lv),
            Err(why) => {
                eprintln!("SKIPPED {test}: {why}");
                None
            }
        }
    }

    /// Makes the certificates (see [`Tls`]) and restarts the daemon listening for TLS on 127.0.0.1 (and on
    /// its Unix socket as before); later [`Libvirt::start_daemon`]s keep TLS on.
    pub fn enable_tls(&mut self) -> Result<(), String> {
        if !Path::new(OPENSSL).exists() {
            return Err(format!("missing: {OPENSSL} (Debian: openssl)"));
        }
        let pki = self.dir.path("pki");
        std::fs::create_dir_all(&pki).map_err(|e| format!("{}: {e}", pki.display()))?;
        let p = |name: &str| pki.join(name);
        make_ca(&p("ca"), "Porthole tests CA")?;
        make_ca(&p("other-ca"), "Another CA")?;
        let server = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                      extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n";
        let client = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                      extendedKeyUsage=clientAuth\n";
        make_leaf(&p("server"), &p("ca"), "/O=Porthole tests/CN=localhost", server, 2)?;
        make_leaf(&p("client"), &p("ca"), "/O=Porthole tests/CN=porthole-client", client, 3)?;
        make_leaf(&p("stranger"), &p("ca"), "/O=Porthole tests/CN=stranger", client, 4)?;
        make_leaf(&p("foreign"), &p("other-ca"), "/O=Porthole tests/CN=porthole-client", client, 5)?;
        // The daemon's user reads its key (only it), the certificates (everyone).
        std::fs::set_permissions(&pki, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        for f in ["ca.cert.pem", "server.cert.pem"] {
            std::fs::set_permissions(p(f), std::fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())?;
        }
        std::os::unix::fs::chown(p("server.key.pem"), Some(self.uid), Some(self.gid)).map_err(|e| e.to_string())?;
        let folder = |name: &str, ca: &str, leaf: Option<&str>| -> Result<PathBuf, String> {
            let d = p(name);
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            let copy = |from: String, to: &str| {
                std::fs::copy(p(&from), d.join(to)).map(drop).map_err(|e| format!("{from}: {e}"))
            };
            if let Some(leaf) = leaf {
                copy(format!("{ca}.cert.pem"), "cacert.pem")?;
                copy(format!("{leaf}.cert.pem"), "clientcert.pem")?;
                copy(format!("{leaf}.key.pem"), "clientkey.pem")?;
            }
            Ok(d)
        };
        let port = free_port();
        let tls = Tls {
            port,
            client: folder("pki-client", "ca", Some("client"))?,
            stranger: folder("pki-stranger", "ca", Some("stranger"))?,
            foreign_client: folder("pki-foreign-client", "ca", Some("foreign"))?,
            foreign_ca: folder("pki-foreign-ca", "other-ca", Some("foreign"))?,
            empty: folder("pki-empty", "", None)?,
            config: self.dir.path("libvirtd-tls.conf"),
        };
        let config = format!(
            "listen_tls = 1\nlisten_tcp = 0\nlisten_addr = \"127.0.0.1\"\ntls_port = \"{port}\"\nauth_tls = \"none\"\n\
             key_file = \"{key}\"\ncert_file = \"{cert}\"\nca_file = \"{ca}\"\ntls_no_verify_certificate = 0\n\
             tls_allowed_dn_list = [\"{CLIENT_DN}\"]\n",
            key = p("server.key.pem").display(),
            cert = p("server.cert.pem").display(),
            ca = p("ca.cert.pem").display(),
        );
        std::fs::write(&tls.config, config).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&tls.config, std::fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())?;
        self.kill_daemon();
        self.tls = Some(tls);
        self.start_daemon()?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > LIMIT {
                return Err(format!(
                    "libvirtd did not listen on 127.0.0.1:{port} within {LIMIT:?}: {}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The certificates and port, once [`Libvirt::enable_tls`] ran.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// What the daemon sends right after the TLS handshake (`openssl s_client` with the certificates in
    /// `pkipath`): libvirt's confirmation byte, 1, when it accepts the client's certificate; nothing (it hangs
    /// up) when not. This checks the daemon's side alone, which libvirt's client does not reach with a
    /// certificate its own CA file does not vouch for.
    pub fn tls_confirmation(&self, pkipath: &Path) -> Result<Option<u8>, String> {
        use std::io::Read;
        let port = self.tls.as_ref().ok_or("TLS is not enabled")?.port;
        let mut child = Command::new(OPENSSL)
            .args(["s_client", "-quiet", "-connect", &format!("127.0.0.1:{port}"), "-CAfile"])
            .arg(pkipath.join("cacert.pem"))
            .arg("-cert")
            .arg(pkipath.join("clientcert.pem"))
            .arg("-key")
            .arg(pkipath.join("clientkey.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("openssl s_client: {e}"))?;
        let mut stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            let _ = tx.send(stdout.read(&mut byte).map(|n| (n == 1).then_some(byte[0])));
        });
        // Its stdin stays open (held by `child`) until it is killed: only the daemon ends the exchange.
        let got = rx.recv_timeout(LIMIT);
        let _ = child.kill();
        let _ = child.wait();
        match got {
            Ok(r) => r.map_err(|e| format!("reading from openssl s_client: {e}")),
            Err(_) => Err(format!("the daemon neither answered nor hung up within {LIMIT:?}")),
        }
    }

    /// The daemon over TLS on `host` (`127.0.0.1` or `localhost`), with the certificates in `pkipath`.
    pub fn tls_uri(&self, host: &str, pkipath: &Path) -> String {
        let port = self.tls.as_ref().map_or(0, |t| t.port);
        format!("qemu+tls://{host}:{port}/session?pkipath={}", pkipath.display())
    }

    /// (Re)starts libvirtd on the same directories; returns once its socket answers.
    pub fn start_daemon(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(&self.socket);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.daemon_log).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let d = self.dir.dir();
        let mut cmd = Command::new("/usr/sbin/libvirtd");
        if let Some(tls) = &self.tls {
            cmd.arg("--listen").arg("-f").arg(&tls.config);
        }
        let child = die_with_parent(&mut cmd)
            .env_clear()
            .env("HOME", home_of_user())
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C")
            .env("XDG_RUNTIME_DIR", d.join("run"))
            .env("XDG_CONFIG_HOME", d.join("config"))
            .env("XDG_CACHE_HOME", d.join("cache"))
            .env("XDG_DATA_HOME", d.join("data"))
            .current_dir(d)
            .uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot start libvirtd: {e}"))?;
        self.daemon = Some(child);
        let start = Instant::now();
        loop {
            if self.socket.exists() && self.virsh(&["uri"]).status.success() {
                return Ok(());
            }
            if let Some(c) = self.daemon.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("libvirtd exited ({status}): {}", self.log_tail()));
            }
            if start.elapsed() > LIMIT {
                return Err(format!("libvirtd did not answer within {LIMIT:?}: {}", self.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.daemon_log).unwrap_or_default();
        t.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Kills libvirtd (SIGKILL), leaving its domains' QEMU processes running, as a crash would.
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) libvirtd: a daemon that no longer answers, as behind a dead
    /// network.
    pub fn signal_daemon(&self, signal: libc::c_int) {
        if let Some(c) = &self.daemon {
            // SAFETY: the PID of our own child, not yet reaped.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    fn start_sshd(&mut self) -> Result<(), String> {
        let ssh = self.dir.path("ssh");
        std::fs::create_dir_all(&ssh).map_err(|e| e.to_string())?;
        for key in ["host_key", "client_key", "wrong_key"] {
            let out = run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"])
                .arg(ssh.join(key)));
            if !out.status.success() {
                return Err(format!("ssh-keygen: {}", text(&out.stderr)));
            }
        }
        std::fs::copy(ssh.join("client_key.pub"), ssh.join("authorized_keys")).map_err(|e| e.to_string())?;
        std::fs::set_permissions(ssh.join("authorized_keys"), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").map_err(|e| format!("/run/sshd: {e}"))?;
        self.ssh_port = free_port();
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\nStrictModes no\nAllowUsers {USER}\n\
             PidFile none\nSetEnv XDG_RUNTIME_DIR={run}\n",
            port = self.ssh_port,
            hk = ssh.join("host_key").display(),
            ak = ssh.join("authorized_keys").display(),
            run = self.run_dir.display(),
        );
        std::fs::write(ssh.join("sshd_config"), config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(ssh.join("sshd.log")).map_err(|e| e.to_string())?;
        let child = die_with_parent(&mut Command::new("/usr/sbin/sshd"))
            .args(["-D", "-e", "-f"])
            .arg(ssh.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start sshd: {e}"))?;
        self.sshd = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.ssh_port)).is_err() {
            if start.elapsed() > LIMIT {
                let log = std::fs::read_to_string(ssh.join("sshd.log")).unwrap_or_default();
                return Err(format!("sshd did not listen within {LIMIT:?}: {log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let scan = run(Command::new("ssh-keyscan").args(["-T", "10", "-p", &self.ssh_port.to_string(), "127.0.0.1"]));
        if scan.stdout.is_empty() {
            return Err(format!("ssh-keyscan: {}", text(&scan.stderr)));
        }
        std::fs::write(&self.known_hosts, &scan.stdout).map_err(|e| e.to_string())?;
        std::fs::write(&self.no_known_hosts, "").map_err(|e| e.to_string())?;
        let wrapper = format!(
            "#!/bin/sh\nexec ssh -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null \"$@\"\n",
            self.known_hosts.display()
        );
        std::fs::write(&self.ssh_wrapper, wrapper).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&self.ssh_wrapper, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The daemon's local URI.
    pub fn local_uri(&self) -> String {
        format!("qemu:///session?socket={}", self.socket.display())
    }

    /// The daemon through sshd with libvirt's libssh transport.
    pub fn libssh_uri(&self, key: &Path, known_hosts: &Path) -> String {
        format!(
            "qemu+libssh://{USER}@127.0.0.1:{}/session?keyfile={}&known_hosts={}&sshauth=privkey",
            self.ssh_port,
            key.display(),
            known_hosts.display()
        )
    }

    /// The daemon through sshd with libvirt's `ssh` transport (the ssh binary, through `command`).
    pub fn ssh_uri(&self, key: &Path, command: Option<&Path>) -> String {
        let mut uri = format!("qemu+ssh://{USER}@127.0.0.1:{}/session?keyfile={}", self.ssh_port, key.display());
        if let Some(c) = command {
            uri += &format!("&command={}", c.display());
        }
        uri
    }

    pub fn virsh(&self, args: &[&str]) -> Output {
        run(Command::new("virsh").arg("-c").arg(self.local_uri()).args(args))
    }

    /// A micro-guest's kernel, copied where the daemon's user can read it.
    pub fn guest_kernel(&self, guest: &str) -> PathBuf {
        let to = self.dir.path(&format!("{guest}.elf"));
        std::fs::copy(porthole_guests::path(guest), &to).expect("copy the guest");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).expect("chmod the guest");
        to
    }

    /// Defines (with virsh, behind Porthole's back) a TCG domain booting micro-guest `guest` with a VGA
    /// screen on VNC (127.0.0.1) and its serial port in a file; returns the serial file.
    pub fn define_guest(&self, name: &str, guest: &str) -> PathBuf {
        let kernel = self.guest_kernel(guest);
        let serial = self.logs.join(format!("{name}.serial"));
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{k}</kernel></os><features><acpi/></features>\
             <cpu mode='custom'><model>qemu64</model></cpu><on_reboot>destroy</on_reboot><devices>\
             <serial type='file'><source path='{s}'/><target port='0'/></serial>\
             <graphics type='vnc' autoport='yes' listen='127.0.0.1'/><video><model type='vga'/></video>\
             <input type='keyboard' bus='ps2'/></devices></domain>",
            k = kernel.display(),
            s = serial.display()
        );
        let file = self.dir.path(&format!("{name}.xml"));
        std::fs::write(&file, xml).expect("write the domain XML");
        let out = self.virsh(&["define", &file.display().to_string()]);
        assert!(out.status.success(), "virsh define: {}", text(&out.stderr));
        serial
    }

    /// PIDs in the daemon's pid files that still run as the test user (its QEMUs, probing QEMUs, virtlogd).
    fn daemon_children(&self) -> Vec<i32> {
        let mut files = Vec::new();
        let qemu_run = self.run_dir.join("libvirt/qemu/run");
        if let Ok(entries) = std::fs::read_dir(&qemu_run) {
            files.extend(entries.flatten().map(|e| e.path()).filter(|p| {
                p.extension().is_some_and(|x| x == "pid") && p.file_name().is_some_and(|n| n != "driver.pid")
            }));
        }
        files.push(self.run_dir.join("libvirt/virtlogd.pid"));
        // QEMUs the daemon runs to probe QEMU's capabilities (left behind when it is killed while probing).
        if let Ok(entries) = std::fs::read_dir(self.dir.path("config/libvirt/qemu/lib")) {
            files.extend(entries.flatten().map(|e| e.path().join("qmp.pid")));
        }
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .filter_map(|t| t.trim().parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                    s.lines()
                        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&self.uid.to_string()))
                })
            })
            .collect()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let children = self.daemon_children();
        self.kill_daemon();
        for pid in children {
            // SAFETY: a PID read from our daemon's pid files and checked to run as the test user.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

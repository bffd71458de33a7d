//! `portholed`: the host daemon. It owns the VMs of one host — their definitions and disks in the data
//! dir, their `porthole-vmm` processes — and serves them over the host API: HTTP on a Unix socket for the
//! local user, HTTPS with API tokens for remote users (`--listen`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use porthole_api::Role;
use portholed::{auth, host, server, stats, tls};

/// Porthole host daemon: owns this host's VMs and serves them over the host API.
#[derive(Debug, Parser)]
#[command(name = "portholed", version = porthole_api::VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Also serve remote users on ADDR:PORT over HTTPS (every request needs an API token; see `token`).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// TLS certificate chain (PEM) for --listen; without it a self-signed certificate is generated once and
    /// kept in the data dir, and its SHA-256 fingerprint is printed for clients to pin.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Where VM definitions, disks, images, tokens and the TLS identity live [default: $XDG_DATA_HOME/porthole].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Where the API socket and the running VMs' sockets and logs live [default: $XDG_RUNTIME_DIR/porthole].
    #[arg(long, value_name = "DIR")]
    runtime_dir: Option<PathBuf>,
    /// The local API socket (mode 0600) [default: RUNTIME_DIR/portholed.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The VM engine [default: porthole-vmm next to portholed, else on PATH].
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// How long a console ticket stays valid, in seconds (1-30).
    #[arg(long, value_name = "S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=30))]
    console_ticket_s: u64,
    /// When stopped (SIGTERM, as at host shutdown, or SIGINT), save every running VM's state to disk first
    /// (suspend), and resume those VMs when portholed starts again. Without it, VMs keep running when
    /// portholed stops, and are adopted again when it starts.
    #[arg(long)]
    suspend_on_shutdown: bool,
    /// Largest image upload, in bytes [default: 16 GiB].
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 30)]
    upload_limit: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage API tokens (for --listen): create, list, revoke. Changes apply to a running daemon at once.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it (it is stored only as a hash: keep it).
    Create {
        #[arg(long)]
        name: String,
        /// viewer (list, stats, view-only consoles), operator (+ lifecycle, consoles, media) or admin (all).
        #[arg(long)]
        role: Role,
        /// Limit the token to this VM (an id); repeat for several. Without: every VM.
        #[arg(long = "vm", value_name = "ID")]
        vms: Vec<String>,
    },
    /// List tokens (names, roles, VMs; never the secrets).
    List,
    /// Revoke a token by name.
    Revoke { name: String },
}

struct Dirs {
    data: PathBuf,
    runtime: PathBuf,
}

fn dirs(cli: &Cli) -> anyhow::Result<Dirs> {
    let project = directories::ProjectDirs::from("", "", "porthole");
    let data = match (&cli.data_dir, &project) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) => p.data_dir().to_owned(),
        (None, None) => bail!("no home directory: give --data-dir"),
    };
    let runtime = match (&cli.runtime_dir, project.as_ref().and_then(|p| p.runtime_dir())) {
        (Some(d), _) => d.clone(),
        (None, Some(r)) => r.to_owned(),
        // SAFETY: getuid cannot fail.
        (None, None) => std::env::temp_dir().join(format!("porthole-{}", unsafe { libc::getuid() })),
    };
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for dir in [&data, &runtime] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Sockets of VMs live here: nobody else may even look.
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", runtime.display()))?;
    Ok(Dirs { data, runtime })
}

fn vmm_path(cli: &Cli) -> PathBuf {
    if let Some(p) = &cli.vmm {
        return p.clone();
    }
    let sibling = std::env::current_exe().ok().map(|e| e.with_file_name("porthole-vmm"));
    sibling.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("porthole-vmm"))
}

fn token_command(dirs: &Dirs, command: TokenCommand) -> anyhow::Result<()> {
    let tokens = auth::Tokens::new(&dirs.data);
    match command {
        TokenCommand::Create { name, role, vms } => {
            let secret = tokens.create(&name, role, vms.into_iter().collect::<BTreeSet<_>>())?;
            println!("{secret}");
            eprintln!("token {name:?} ({role:?}) created; it is shown only now");
        }
        TokenCommand::List => {
            for t in tokens.list()? {
                let vms = if t.vms.is_empty() {
                    "all VMs".to_owned()
                } else {
                    t.vms.into_iter().collect::<Vec<_>>().join(",")
                };
                println!("{}\t{:?}\t{vms}", t.name, t.role);
            }
        }
        TokenCommand::Revoke { name } => {
            tokens.revoke(&name)?;
            eprintln!("token {name:?} revoked");
        }
    }
    Ok(())
}

fn lock_instance(dirs: &Dirs) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = dirs.runtime.join("portholed.lock");
    let f = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    // SAFETY: flock on our own descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another portholed serves {} already", dirs.runtime.display());
    }
    Ok(f)
}

async fn serve(cli: Cli, dirs: Dirs) -> anyhow::Result<()> {
    let _lock = lock_instance(&dirs)?;
    let host = host::Host::open(&dirs.data, &dirs.runtime, vmm_path(&cli)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stats = Arc::new(stats::Stats::default());
    stats.spawn(host.clone());
    {
        // The VMs the daemon's last stop suspended resume, then the VMs marked to start with the host start.
        let (host, resume) = (host.clone(), cli.suspend_on_shutdown);
        tokio::spawn(async move {
            if resume {
                host.resume_after_shutdown().await;
            }
            host.autostart().await;
        });
    }
    let stopping = {
        let host = host.clone();
        let suspend = cli.suspend_on_shutdown;
        async move {
            if !suspend {
                return std::future::pending::<anyhow::Result<()>>().await;
            }
            use tokio::signal::unix::{SignalKind, signal};
            let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("portholed: stopping; suspending the running VMs first");
            host.suspend_all_for_shutdown().await;
            Ok(())
        }
    };
    let tokens = Arc::new(auth::Tokens::new(&dirs.data));
    let app = server::App::new(
        host,
        tokens,
        stats,
        dirs.data.clone(),
        cli.upload_limit,
        std::time::Duration::from_secs(cli.console_ticket_s),
    );
    let router = server::router(app);

    let socket = cli.socket.clone().unwrap_or_else(|| dirs.runtime.join("portholed.sock"));
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(&socket).with_context(|| format!("cannot replace {}", socket.display()))?;
    }
    let unix =
        tokio::net::UnixListener::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    eprintln!("portholed {}: local API on {}", porthole_api::VERSION, socket.display());
    let local = axum::serve(unix, router.clone().into_make_service_with_connect_info::<server::Peer>());

    let remote = match &cli.listen {
        Some(addr) => {
            let identity = tls::identity(&dirs.data, cli.tls_cert.as_deref().zip(cli.tls_key.as_deref()))?;
            let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            let bound = tcp.local_addr()?;
            eprintln!("portholed: remote API on https://{bound} (certificate sha256 {})", identity.fingerprint);
            let listener = tls::TlsListener::new(tcp, identity)?;
            Some(axum::serve(listener, router.into_make_service_with_connect_info::<server::Peer>()))
        }
        None => None,
    };
    match remote {
        Some(remote) => tokio::select! {
            r = local => r.context("local API")?,
            r = remote => r.context("remote API")?,
            r = stopping => r?,
        },
        None => tokio::select! {
            r = local => r.context("local API")?,
            r = stopping => r?,
        },
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Everything the daemon and the engines it starts create (disk images, logs, sockets, the lock) is the
    // user's alone, whatever umask the daemon was started with (SECURITY.md).
    // SAFETY: umask only changes this process's file creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut cli = Cli::parse();
    let dirs = dirs(&cli)?;
    if let Some(Command::Token { command }) = cli.command.take() {
        return token_command(&dirs, command);
    }
    // Two malloc arenas, not glibc's eight per core: the blocking pool (control-socket and file requests)
    // starts and ends threads by the dozen under load, and memory an arena once held stays in it. And a
    // fixed mmap threshold: glibc's own rises to the largest block freed, after which large response
    // bodies and upload buffers come from the arenas and their holes stay (the soak's daemon swung between
    // 140 and 203 MiB with 100 clients).
    // SAFETY: mallopt only tunes the allocator; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start tokio")?;
    runtime.block_on(serve(cli, dirs))
}

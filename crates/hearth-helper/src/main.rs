//! `hearth-helper`: serves `hearthd` on a unix socket, as root. See the crate documentation.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hearth_helper::net::RealNet;
use hearth_helper::nft::RealNft;
use hearth_helper::server::{Helper, serve_connection};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::{Mode, umask};
use nix::unistd::{Gid, Group, chown, geteuid, getppid};

/// At most this many connections are served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a stop waits for requests in flight.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Hearth's privileged helper: network slots and nftables rules for hearthd.
#[derive(Debug, Parser)]
#[command(name = "hearth-helper", version)]
struct Args {
    /// The unix socket to serve. A stale socket there is replaced; one another process
    /// serves, or a file that is not a socket, is not.
    #[arg(long)]
    socket: PathBuf,
    /// Give the socket to this group (a name or a numeric gid): its members may use the
    /// helper. Without it only root may.
    #[arg(long)]
    group: Option<String>,
    /// End (SIGTERM) when the process that started the helper exits. Linux sends the signal
    /// when the parent's *thread* that spawned the helper ends, so spawn it from a thread
    /// that lives as long as the parent.
    #[arg(long)]
    die_with_parent: bool,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(
        "hearth-helper must run as root (it runs as uid {euid}): it makes network namespaces, links and nftables rules"
    )]
    NotRoot { euid: u32 },
    #[error("could not ask for a signal at the parent's exit")]
    DeathSignal(#[source] nix::Error),
    #[error("the process that started hearth-helper has already exited")]
    Orphan,
    #[error("--group {0:?}: no such group")]
    NoGroup(String),
    #[error("--group {name:?}: could not look the group up")]
    Group {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("--socket {path}: the file there is not a socket; refusing to replace it")]
    NotSocket { path: PathBuf },
    #[error("--socket {path}: another process serves it")]
    InUse { path: PathBuf },
    #[error("--socket {path}: could not replace the stale socket")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--socket {path}: could not listen")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--socket {path}: could not set its mode to 0660")]
    Chmod {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--socket {path}: could not give it to group {gid}")]
    Chgrp {
        path: PathBuf,
        gid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("could not set up the handling of SIGTERM and SIGINT")]
    Signals(#[source] nix::Error),
    #[error("could not wait for connections")]
    Poll(#[source] nix::Error),
}

/// The error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn gid(name: &str) -> Result<Gid, StartError> {
    if name.bytes().all(|b| b.is_ascii_digit())
        && let Ok(raw) = name.parse::<u32>()
    {
        return Ok(Gid::from_raw(raw));
    }
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) => Err(StartError::NoGroup(name.to_owned())),
        Err(source) => Err(StartError::Group {
            name: name.to_owned(),
            source,
        }),
    }
}

/// Binds the socket: a stale one is removed first; the result is 0660, in `group` if given.
fn listen(path: &Path, group: Option<Gid>) -> Result<UnixListener, StartError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(StartError::NotSocket {
                path: path.to_owned(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(StartError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(|source| StartError::RemoveStale {
            path: path.to_owned(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| StartError::Bind {
        path: path.to_owned(),
        source,
    })?;
    if let Some(gid) = group {
        chown(path, None, Some(gid)).map_err(|source| StartError::Chgrp {
            path: path.to_owned(),
            gid: gid.as_raw(),
            source,
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        StartError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Removes the socket if it is still the one this process made.
fn remove_socket(path: &Path, ours: (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && (meta.dev(), meta.ino()) == ours
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Decrements the connection count when a connection's thread ends.
struct Connection(Arc<AtomicUsize>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn run(args: &Args) -> Result<(), StartError> {
    if args.die_with_parent {
        let parent = getppid();
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(StartError::DeathSignal)?;
        if getppid() != parent {
            return Err(StartError::Orphan);
        }
    }
    let euid = geteuid();
    if !euid.is_root() {
        return Err(StartError::NotRoot {
            euid: euid.as_raw(),
        });
    }
    let group = args.group.as_deref().map(gid).transpose()?;

    // Blocked before any thread exists, so every thread inherits the mask and the signals
    // arrive only through the signalfd. (Spawned programs start with an empty mask.)
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(StartError::Signals)?;
    let signal_fd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(StartError::Signals)?;

    umask(Mode::from_bits_truncate(0o077));
    let listener = listen(&args.socket, group)?;
    let ours = std::fs::symlink_metadata(&args.socket)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|source| StartError::Bind {
            path: args.socket.clone(),
            source,
        })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| StartError::Bind {
            path: args.socket.clone(),
            source,
        })?;

    let helper = Arc::new(Helper::new(RealNet, RealNft));
    let connections = Arc::new(AtomicUsize::new(0));
    tracing::info!(
        socket = %args.socket.display(),
        pid = std::process::id(),
        version = env!("CARGO_PKG_VERSION"),
        "hearth-helper serving"
    );

    let result = loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => break Err(StartError::Poll(e)),
        }
        if fds[1].any().unwrap_or(false)
            && let Ok(Some(info)) = signal_fd.read_signal()
        {
            let name = Signal::try_from(i32::try_from(info.ssi_signo).unwrap_or(0))
                .map(|s| s.as_str())
                .unwrap_or("a signal");
            tracing::info!(signal = name, "stopping");
            break Ok(());
        }
        if !fds[0].any().unwrap_or(false) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // Out of descriptors, say: do not spin on it.
                tracing::warn!(error = %e, "could not accept a connection");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                max = MAX_CONNECTIONS,
                "too many connections; closing a new one"
            );
            continue;
        }
        let guard = Connection(Arc::clone(&connections));
        let helper = Arc::clone(&helper);
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .spawn(move || {
                let _guard = guard;
                // The listener is non-blocking; the connection is served blocking.
                if stream.set_nonblocking(false).is_ok() {
                    serve_connection(&helper, stream);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a thread for a connection");
        }
    };

    remove_socket(&args.socket, ours);
    drop(listener);
    let deadline = Instant::now() + STOP_GRACE;
    while helper.busy() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if helper.busy() > 0 {
        tracing::warn!(
            busy = helper.busy(),
            "stopping with requests still in flight"
        );
    }
    result
}

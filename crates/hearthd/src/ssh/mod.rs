//! The SSH front end (russh): public-key logins checked by an [`Identities`], then two kinds of
//! session, told apart by the SSH user name.
//!
//! - **The command account** (`ssh hearth@HOST <command>`, user `ssh.command_user`): the exec
//!   request's string is split into words ([`words`]), mapped onto the `hearth` CLI
//!   ([`plan`]) and run as that CLI, a child process talking to hearthd's unix socket with an API
//!   key that stands for the caller ([`command`]). Output formats, flags and exit codes are the
//!   CLI's. `ssh -t` gives the child a PTY ([`pty`]) so `top` works; a shell request is refused.
//! - **Into-VM sessions** (`ssh <vm>@HOST`): a shell, one command or the `sftp` subsystem in the
//!   VM, through `VmService::handle(Action::OpenExec)` like the REST exec ([`into_vm`]).
//!
//! Neither decides anything about VMs: the CLI's requests and the exec sessions reach
//! `VmService::handle` with the caller, where authorization is decided.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections, [`MAX_SESSIONS`] sessions (channels) per
//! connection, [`LOGIN_GRACE`] to log in. What a client sends waits in bounded queues (russh's
//! per-channel queue, then [`STDIN_QUEUE`] chunks per command); when they are full, russh stops
//! reading the connection. russh grants the client more window as it reads data, not as the
//! command takes it, so a command that neither reads its stdin nor lets its output drain holds
//! up that whole connection (not others, and nothing grows).

mod command;
mod into_vm;
mod plan;
mod pty;
#[cfg(test)]
mod tests;
mod words;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hearth_guest_proto::PtySize;
use russh::keys::{HashAlg, PrivateKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, MethodKind};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::vm::{Caller, Source, VmService};

/// What the SSH front end needs of identities. The methods that return no future are called
/// on the runtime (`refused` from a connection's drop): they must not block, so recording to
/// the store is queued, not awaited.
pub trait Identities: Send + Sync + 'static {
    /// The caller a public key (OpenSSH `type base64` form) stands for; None if unknown.
    fn caller_for_key<'a>(
        &'a self,
        key: &'a str,
        source: SocketAddr,
    ) -> BoxFuture<'a, Option<Caller>>;
    /// A bearer API key, valid until the returned value is dropped, by which a child
    /// `hearth` CLI acts as `caller` (the caller's source is kept for audit).
    fn session_key(&self, caller: &Caller) -> Box<dyn SessionKey>;
    /// Whether `source` may try to log in now (failed attempts are rate-limited per IP).
    fn attempt_allowed(&self, source: IpAddr) -> bool;
    /// A refused login (unknown key, unknown user, rate limited): counted and audited.
    fn refused(&self, source: SocketAddr, user: &str, reason: &str);
    /// One finished command of the command account, for the audit log.
    fn command_done(&self, caller: &Caller, command: &str, exit: u32, took: Duration);
}

/// An API key that is valid while this value lives.
pub trait SessionKey: Send + Sync {
    fn secret(&self) -> &str;
}

/// Connections served at once; the next is closed at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Sessions (channels: commands, shells) open at once on one connection, as OpenSSH's
/// MaxSessions; with ControlMaster all of a client's commands share one connection.
pub const MAX_SESSIONS: usize = 10;
/// How long a client has to log in before it is disconnected.
pub const LOGIN_GRACE: Duration = Duration::from_secs(30);
/// Chunks of stdin (each at most one SSH packet) waiting for a command to take them.
pub const STDIN_QUEUE: usize = 8;
/// Login attempts (keys offered) on one connection, as OpenSSH's MaxAuthTries.
const MAX_AUTH_ATTEMPTS: usize = 6;
/// Largest read from a command's output, so one SSH packet each.
const OUTPUT_CHUNK: usize = 32 * 1024;

/// Why the SSH front end cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot read the SSH host key {path}")]
    ReadHostKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the SSH host key {path} is not an OpenSSH ed25519 private key: {reason}")]
    BadHostKey { path: PathBuf, reason: String },
    #[error("cannot write the new SSH host key {path}")]
    WriteHostKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot accept SSH connections")]
    Accept(#[source] std::io::Error),
}

/// The host key's file in the data directory.
pub fn host_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ssh_host_ed25519_key")
}

/// The host key: `<data_dir>/ssh_host_ed25519_key`, made once (ed25519, OpenSSH format, mode
/// 0600, written whole under a temporary name and renamed) and read on every later start. Its
/// public half is written beside it (`.pub`) for operators to pin.
pub fn host_key(data_dir: &Path) -> Result<PrivateKey, SshError> {
    let path = host_key_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = PrivateKey::from_openssh(&text).map_err(|e| SshError::BadHostKey {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if key.algorithm() != russh::keys::Algorithm::Ed25519 {
                return Err(SshError::BadHostKey {
                    path,
                    reason: format!("it is a {} key", key.algorithm()),
                });
            }
            if key.is_encrypted() {
                return Err(SshError::BadHostKey {
                    path,
                    reason: "it is encrypted with a passphrase".into(),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_host_key(&path),
        Err(source) => Err(SshError::ReadHostKey { path, source }),
    }
}

fn new_host_key(path: &Path) -> Result<PrivateKey, SshError> {
    use std::io::{Read, Write};
    let write_err = |source| SshError::WriteHostKey {
        path: path.to_owned(),
        source,
    };
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(write_err)?;
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    seed.fill(0);
    let mut key = PrivateKey::from(pair);
    key.set_comment("hearthd host key");
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
    let tmp = path.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
    let pub_path = path.with_extension("pub");
    if let Err(e) = std::fs::write(&pub_path, format!("{public}\n")) {
        tracing::warn!(path = %pub_path.display(), error = %e, "cannot write the SSH host key's public half");
    }
    tracing::info!(path = %path.display(), "made a new SSH host key");
    Ok(key)
}

/// What every connection shares.
struct Shared {
    service: VmService,
    identities: Arc<dyn Identities>,
    command_user: String,
    cli_path: PathBuf,
    api_socket: PathBuf,
}

/// Serves SSH on `listener` until the future is dropped: the host key from the data directory
/// (made at the first start), logins checked by `identities`, the command account running
/// `config.ssh.cli_path` against hearthd's unix socket `api_socket`, into-VM sessions through
/// `service`.
pub async fn serve(
    listener: TcpListener,
    config: Arc<Config>,
    service: VmService,
    identities: Arc<dyn Identities>,
    api_socket: PathBuf,
) -> Result<(), SshError> {
    let data_dir = config.data_dir.clone();
    let key = tokio::task::spawn_blocking(move || host_key(&data_dir))
        .await
        .map_err(|e| SshError::BadHostKey {
            path: host_key_path(&config.data_dir),
            reason: format!("reading it failed: {e}"),
        })??;
    let fingerprint = key.public_key().fingerprint(HashAlg::Sha256);
    let local = listener.local_addr().map_err(SshError::Accept)?;
    tracing::info!(listen = %local, host_key = %fingerprint, "SSH front end is serving");
    let russh_config = Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard(
            format!("SSH-2.0-hearthd_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: russh::MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![key],
        max_auth_attempts: MAX_AUTH_ATTEMPTS,
        // A refusal takes a constant second (so timing tells nothing about keys), except the
        // "none" probe every OpenSSH client starts with, which reveals nothing.
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        // A followed log or an idle shell may say nothing for hours; dead peers are found by
        // keepalives instead.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        channel_buffer_size: 32,
        nodelay: true,
        ..Default::default()
    });
    let shared = Arc::new(Shared {
        service,
        identities,
        command_user: config.ssh.command_user.clone(),
        cli_path: config.ssh.cli_path.clone(),
        api_socket,
    });
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors, or a connection reset before it was accepted: keep serving.
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "SSH accept failed; going on");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(SshError::Accept(e)),
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "SSH connection refused: {MAX_CONNECTIONS} are open");
            continue;
        };
        let local = stream.local_addr().unwrap_or(local);
        let _ = stream.set_nodelay(true);
        let authenticated = Arc::new(AtomicBool::new(false));
        let handler = Connection {
            shared: shared.clone(),
            peer,
            local,
            caller: None,
            user: String::new(),
            refusal: None,
            authenticated: authenticated.clone(),
            sessions: Arc::new(Semaphore::new(MAX_SESSIONS)),
        };
        let config = russh_config.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // The grace runs from the accept: a client that never sends its version string
            // is dropped too.
            let deadline = tokio::time::Instant::now() + LOGIN_GRACE;
            let started = russh::server::run_stream(config, stream, handler);
            let session = match tokio::time::timeout_at(deadline, started).await {
                Ok(Ok(session)) => session,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "SSH connection failed before its key exchange");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "SSH client sent no version string in time");
                    return;
                }
            };
            let handle = session.handle();
            let grace = async {
                tokio::time::sleep_until(deadline).await;
                if !authenticated.load(Ordering::Acquire) {
                    let _ = handle
                        .disconnect(
                            russh::Disconnect::ByApplication,
                            format!("not logged in within {} s", LOGIN_GRACE.as_secs()),
                            String::new(),
                        )
                        .await;
                }
                std::future::pending::<()>().await;
            };
            tokio::select! {
                result = session => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "SSH connection ended");
                    }
                }
                () = grace => {}
            }
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// One client connection.
struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    /// Set by a successful login, with the user name it was for.
    caller: Option<Caller>,
    user: String,
    /// The last refusal (user, reason), reported when the connection ends without a login.
    refusal: Option<(String, String)>,
    authenticated: Arc<AtomicBool>,
    sessions: Arc<Semaphore>,
}

impl Connection {
    fn refuse(&mut self, user: &str, reason: String) -> Auth {
        tracing::debug!(peer = %self.peer, user, reason, "SSH login attempt refused");
        self.refusal = Some((user.to_owned(), reason));
        Auth::Reject {
            proceed_with_methods: Some(russh::MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        }
    }

    /// The caller `key` stands for, when this source may try now.
    async fn check_key(
        &mut self,
        user: &str,
        key: &russh::keys::PublicKey,
    ) -> Result<Caller, Auth> {
        if !self.shared.identities.attempt_allowed(self.peer.ip()) {
            return Err(self.refuse(user, "rate limited: too many failed logins".into()));
        }
        let text = openssh_key(key);
        match self
            .shared
            .identities
            .caller_for_key(&text, self.peer)
            .await
        {
            Some(caller) => Ok(caller),
            None => Err(self.refuse(
                user,
                format!("unknown key {}", key.fingerprint(HashAlg::Sha256)),
            )),
        }
    }

    /// `-p PORT HOST` (or `HOST`) as a client reaches this server, for messages.
    fn target(&self) -> String {
        // OpenSSH takes `user@::1` as it is, brackets only in URIs.
        let host = self.local.ip().to_string();
        match self.local.port() {
            22 => host,
            port => format!("-p {port} {host}"),
        }
    }
}

/// A public key in OpenSSH's `type base64` form, without a comment.
fn openssh_key(key: &russh::keys::PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    key.to_openssh().map_or_else(
        |_| key.algorithm().to_string(),
        |text| text.trim_end().to_owned(),
    )
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.authenticated.load(Ordering::Acquire) {
            return;
        }
        if let Some((user, reason)) = &self.refusal {
            self.shared.identities.refused(self.peer, user, reason);
        }
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if self.refusal.is_none() {
            self.refusal = Some((user.to_owned(), "no public key offered".into()));
        }
        Ok(Auth::Reject {
            proceed_with_methods: Some(russh::MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        })
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.refuse(
            user,
            "password logins are not accepted (public keys only)".into(),
        ))
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(match self.check_key(user, offer.public_key).await {
            Ok(_) => Auth::Accept,
            Err(refused) => refused,
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.check_key(user, key.public_key).await {
            Ok(mut caller) => {
                caller.source = Source::Ssh(self.peer);
                tracing::info!(
                    peer = %self.peer,
                    user,
                    principal = %caller.principal,
                    key = %key.public_key.fingerprint(HashAlg::Sha256),
                    "SSH login"
                );
                self.caller = Some(caller);
                user.clone_into(&mut self.user);
                Ok(Auth::Accept)
            }
            Err(refused) => Ok(refused),
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated.store(true, Ordering::Release);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(caller) = self.caller.clone() else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let Ok(permit) = self.sessions.clone().try_acquire_owned() else {
            tracing::debug!(peer = %self.peer, "SSH session refused: {MAX_SESSIONS} are open");
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        reply.accept().await;
        let user = self.user.clone();
        let target = self.target();
        let shared = self.shared.clone();
        tokio::spawn(run_channel(channel, shared, caller, user, target, permit));
        Ok(())
    }

    // Replies to requests go out here, in the order the requests came (the session task below
    // acts on them from the channel).

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Sent only when the client asked for a reply (OpenSSH does not).
        session.channel_failure(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The command account refuses it with a message and exit status 2, which needs the
        // channel: so it is accepted here in both cases.
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _command: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Accepted whatever it is: a subsystem we do not serve gets a message on stderr and
        // exit status 2 (a refusal here would close the client before it could show one).
        session.channel_success(channel)
    }
}

/// What a session channel was asked to run.
#[derive(Debug)]
enum Start {
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
}

/// The client's terminal, when it asked for a PTY.
#[derive(Debug, Clone)]
struct Terminal {
    term: String,
    size: PtySize,
}

/// What the client sends while a command runs.
#[derive(Debug)]
enum Incoming {
    Data(Bytes),
    Eof,
    Resize(PtySize),
    Signal(i32),
    /// The channel closed or the connection went away.
    Gone,
}

/// One session channel: its PTY and environment requests, then the one request that starts
/// something, which runs to its end.
async fn run_channel(
    mut channel: Channel<Msg>,
    shared: Arc<Shared>,
    caller: Caller,
    user: String,
    target: String,
    _permit: OwnedSemaphorePermit,
) {
    let mut terminal: Option<Terminal> = None;
    let start = loop {
        match channel.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                terminal = Some(Terminal {
                    term,
                    size: pty_size(col_width, row_height),
                });
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some(t) = &mut terminal {
                    t.size = pty_size(col_width, row_height);
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Start::Shell,
            Some(ChannelMsg::Exec { command, .. }) => break Start::Exec(command),
            Some(ChannelMsg::RequestSubsystem { name, .. }) => break Start::Subsystem(name),
            Some(ChannelMsg::Close) | None => return,
            // Environment, X11 and agent requests were refused by the handler; data before a
            // command is nobody's input.
            Some(_) => {}
        }
    };
    // Each command is a request of its own.
    let caller = Caller {
        request_id: crate::vm::random_id(),
        ..caller
    };
    let (read, write) = channel.split();
    let io = ChannelIo {
        read,
        write,
        crlf: terminal.is_some(),
    };
    if user == shared.command_user {
        command::run(&shared, caller, &target, start, terminal, io).await;
    } else {
        into_vm::run(&shared, caller, &user, start, terminal, io).await;
    }
}

/// The two halves of a running session's channel.
struct ChannelIo {
    read: ChannelReadHalf,
    write: ChannelWriteHalf<Msg>,
    /// The client has a terminal in raw mode: our own messages end lines with `\r\n`.
    crlf: bool,
}

impl ChannelIo {
    /// A message of ours (not a command's) on stderr.
    async fn say(&self, text: &str) {
        let text = if self.crlf {
            text.replace('\n', "\r\n")
        } else {
            text.to_owned()
        };
        let _ = self
            .write
            .extended_data_bytes(1, Bytes::from(text.into_bytes()))
            .await;
    }

    /// Our own text on stdout.
    async fn print(&self, text: &str) {
        let text = if self.crlf {
            text.replace('\n', "\r\n")
        } else {
            text.to_owned()
        };
        let _ = self.write.data_bytes(Bytes::from(text.into_bytes())).await;
    }

    /// The exit status, end of output and the channel's close.
    async fn finish(&self, status: u32) {
        let _ = self.write.exit_status(status).await;
        let _ = self.write.eof().await;
        let _ = self.write.close().await;
    }
}

/// The next thing the client sends that matters to a running command. Cancel-safe.
async fn incoming(read: &mut ChannelReadHalf) -> Incoming {
    loop {
        match read.wait().await {
            Some(ChannelMsg::Data { data }) => return Incoming::Data(data),
            Some(ChannelMsg::Eof) => return Incoming::Eof,
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => return Incoming::Resize(pty_size(col_width, row_height)),
            Some(ChannelMsg::Signal { signal }) => {
                if let Some(n) = signal_number(&signal) {
                    return Incoming::Signal(n);
                }
            }
            Some(ChannelMsg::Close) | None => return Incoming::Gone,
            Some(_) => {}
        }
    }
}

fn pty_size(cols: u32, rows: u32) -> PtySize {
    let clamp = |v: u32, default: u16| match u16::try_from(v) {
        Ok(0) => default,
        Ok(v) => v,
        Err(_) => u16::MAX,
    };
    PtySize {
        rows: clamp(rows, 24),
        cols: clamp(cols, 80),
    }
}

/// The signal number of an SSH signal name.
fn signal_number(signal: &russh::Sig) -> Option<i32> {
    use russh::Sig;
    Some(match signal {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => libc::SIGUSR2,
            "WINCH" => libc::SIGWINCH,
            _ => return None,
        },
    })
}

/// The exit status SSH reports for a process's end: its code, or 128 + the signal that ended
/// it (as a shell and `hearth exec` report it).
fn exit_status(code: Option<i32>, signal: Option<i32>) -> u32 {
    match (code, signal) {
        (_, Some(sig)) => 128 + sig.clamp(1, 127).unsigned_abs(),
        (Some(code), None) => code.rem_euclid(256).unsigned_abs(),
        (None, None) => 1,
    }
}

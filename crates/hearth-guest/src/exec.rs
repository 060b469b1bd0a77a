//! `exec`: runs a process in its own process group (a new session with a controlling terminal for
//! PTY sessions) and streams what it writes.
//!
//! One task per exec owns the child. Beside it, one pump task per output stream (one for a PTY)
//! sends `output` frames as bytes arrive, and a feeder task writes `data` payloads to its stdin,
//! giving each payload's bytes back to the host as credit once written (or dropped).
//! The task waits for the child, applies signals, resizes and the timeout, and sends `exited`
//! once the pumps have drained the output.
//!
//! A process that leaves children behind holding its stdout or PTY open would keep the pumps
//! from ever seeing the end of the output; after the process exits they get [`OUTPUT_GRACE`] to
//! finish, then take what is already buffered and stop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use hearth_guest_proto::{CHUNK_LEN, ErrorCode, Event, PtySize, RequestId, Stream};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::server::{Ctx, Inflow, InflowRx, WindowError, describe, io_error_code};
use crate::transport::Outbox;

/// The base `PATH` of every exec (and of the agent itself in a VM).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long output may keep flowing after the process exited (from children it left behind).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// After the grace, at most this many buffered chunks are still taken per stream.
const DRAIN_CHUNKS: usize = 16;

/// What a PTY session receives when the host ends its stdin: the terminal's end-of-file
/// character (`VEOF`, ^D in the default settings).
const PTY_EOF: u8 = 0x04;

/// An `exec` request.
#[derive(Debug, Clone)]
pub struct Spec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: bool,
    pub pty: Option<PtySize>,
    pub timeout_ms: Option<u64>,
}

/// Requests the dispatcher routes to a running exec.
#[derive(Debug, Clone, Copy)]
pub enum Control {
    Signal(i32),
    Resize(PtySize),
    /// `cancel`: SIGKILL the process group; `exited` still follows.
    Kill,
}

/// Why an exec could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("program not found: {0}")]
    ProgramNotFound(String),
    #[error("invalid environment variable {0:?}: names must be non-empty, without `=` or NUL")]
    BadEnvName(String),
    #[error("working directory {} is not a directory", .0.display())]
    CwdNotDirectory(PathBuf),
    #[error("cannot use working directory {}", .path.display())]
    Cwd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a pseudo-terminal")]
    Pty(#[source] io::Error),
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

impl ExecError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ExecError::EmptyArgv | ExecError::BadEnvName(_) => ErrorCode::InvalidRequest,
            ExecError::ProgramNotFound(_) | ExecError::CwdNotDirectory(_) => ErrorCode::NotFound,
            ExecError::Cwd { source, .. } | ExecError::Spawn { source, .. } => {
                io_error_code(source)
            }
            ExecError::Pty(_) => ErrorCode::Io,
        }
    }
}

/// The dispatcher's side of a running exec.
#[derive(Debug)]
pub struct Handle {
    /// `None` when the exec takes no stdin.
    stdin: Option<Inflow>,
    control: mpsc::UnboundedSender<Control>,
    /// The process group, once the process runs and until it is reaped; 0 otherwise.
    pgid: Arc<AtomicI32>,
}

impl Handle {
    /// Passes a `data` payload to stdin; an empty one closes it. With `enforce`, a payload
    /// beyond the window is refused (the exchange must end).
    pub fn stdin(&mut self, payload: Vec<u8>, enforce: bool) -> Result<(), WindowError> {
        match &mut self.stdin {
            Some(stdin) => stdin.push(payload, enforce),
            None => Ok(()),
        }
    }

    pub fn control(&self, control: Control) {
        let _ = self.control.send(control);
    }

    /// Kills the process group at once. Dropping the handle then tells the task the exchange is
    /// forgotten.
    pub fn kill_now(self) {
        let pgid = self.pgid.load(Ordering::Acquire);
        if pgid > 0 {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// The task's side of the channels in a [`Handle`].
#[derive(Debug)]
pub struct Parts {
    stdin: Option<InflowRx>,
    control: mpsc::UnboundedReceiver<Control>,
    pgid: Arc<AtomicI32>,
}

/// Makes the channels between the dispatcher and an exec task; `stdin` when it takes stdin.
pub fn channels(stdin: Option<(Inflow, InflowRx)>) -> (Handle, Parts) {
    let (stdin_tx, stdin_rx) = stdin.unzip();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let pgid = Arc::new(AtomicI32::new(0));
    (
        Handle {
            stdin: stdin_tx,
            control: control_tx,
            pgid: Arc::clone(&pgid),
        },
        Parts {
            stdin: stdin_rx,
            control: control_rx,
            pgid,
        },
    )
}

/// Runs one exec exchange to its end.
pub async fn run(ctx: Ctx, spec: Spec, parts: Parts) {
    let Parts {
        stdin,
        mut control,
        pgid,
    } = parts;
    let Process {
        mut child,
        pid,
        outputs,
        input,
        pty,
    } = match spawn(&spec) {
        Ok(process) => process,
        Err(err) => {
            debug!("exec {}: {}", ctx.id, describe(&err));
            ctx.fail(err.code(), describe(&err)).await;
            return;
        }
    };
    pgid.store(pid, Ordering::Release);
    let id = ctx.id;
    ctx.send(
        &Event::Started {
            id,
            pid: pid.unsigned_abs(),
        },
        &[],
    )
    .await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut pumps = JoinSet::new();
    for (output, stream) in outputs {
        pumps.spawn(pump(output, stream, id, ctx.outbox(), stop_rx.clone()));
    }
    let feeder = match stdin {
        Some(rx) => {
            rx.open_window().await;
            Some(tokio::spawn(feed(rx, input)))
        }
        None => None,
    };

    // A timeout too far away to represent is no timeout.
    let deadline = spec
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let mut timed_out = false;
    let mut forgotten = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            control = control.recv(), if !forgotten => match control {
                Some(Control::Signal(number)) => match Signal::try_from(number) {
                    Ok(signal) => signal_group(pid, signal),
                    Err(_) => debug!("exec {id}: ignoring unknown signal {number}"),
                },
                Some(Control::Resize(size)) => {
                    if let Some(pty) = &pty && let Err(err) = pty.resize(size) {
                        debug!("exec {id}: resize failed: {err}");
                    }
                }
                Some(Control::Kill) => signal_group(pid, Signal::SIGKILL),
                None => {
                    // The host is gone and the dispatcher forgot this exchange.
                    forgotten = true;
                    signal_group(pid, Signal::SIGKILL);
                }
            },
            () = sleep_until(deadline), if !timed_out => {
                timed_out = true;
                signal_group(pid, Signal::SIGKILL);
            }
        }
    };
    // Reaped: the pid may be reused from now on.
    pgid.store(0, Ordering::Release);

    let drained = tokio::time::timeout(OUTPUT_GRACE, async {
        while pumps.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        let _ = stop_tx.send(true);
        while pumps.join_next().await.is_some() {}
    }
    if let Some(feeder) = feeder {
        feeder.abort();
    }

    let (code, signal) = match &status {
        Ok(status) => exit_code(*status),
        Err(err) => {
            log!("exec {id}: cannot wait for process {pid}: {err}");
            (None, None)
        }
    };
    debug!("exec {id}: exited code={code:?} signal={signal:?} timed_out={timed_out}");
    let exited = Event::Exited {
        id,
        code,
        signal,
        timed_out,
    };
    ctx.finish(&exited, &[]).await;
}

fn exit_code(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), status.signal())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn signal_group(pgid: i32, signal: Signal) {
    if let Err(err) = killpg(Pid::from_raw(pgid), signal) {
        debug!("cannot send {signal} to process group {pgid}: {err}");
    }
}

/// A started process and its ends of stdio.
struct Process {
    child: Child,
    pid: i32,
    outputs: Vec<(Output, Stream)>,
    input: Input,
    pty: Option<Arc<PtyMaster>>,
}

fn spawn(spec: &Spec) -> Result<Process, ExecError> {
    let Some(arg0) = spec.argv.first() else {
        return Err(ExecError::EmptyArgv);
    };
    if let Some((name, _)) = spec
        .env
        .iter()
        .find(|(name, _)| name.is_empty() || name.contains(['=', '\0']))
    {
        return Err(ExecError::BadEnvName(name.clone()));
    }
    let env = build_env(&spec.env, spec.pty.is_some());
    let search = env
        .iter()
        .find(|(name, _)| name == "PATH")
        .map_or(DEFAULT_PATH, |(_, value)| value.as_str());
    let program =
        resolve_program(arg0, search).ok_or_else(|| ExecError::ProgramNotFound(arg0.clone()))?;
    let cwd = Path::new("/").join(spec.cwd.as_deref().unwrap_or("/"));
    match std::fs::metadata(&cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(ExecError::CwdNotDirectory(cwd)),
        Err(source) => return Err(ExecError::Cwd { path: cwd, source }),
    }

    let mut command = Command::new(&program);
    command
        .arg0(arg0)
        .args(&spec.argv[1..])
        .env_clear()
        .envs(env.iter().map(|(name, value)| (name, value)))
        .current_dir(&cwd);

    let pty = match spec.pty {
        Some(size) => {
            let (master, slave) = open_pty(size).map_err(ExecError::Pty)?;
            let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(ExecError::Pty);
            command
                .stdin(stdio(&slave)?)
                .stdout(stdio(&slave)?)
                .stderr(Stdio::from(slave));
            // SAFETY: the closure runs in the forked child before exec and only makes two
            // async-signal-safe system calls (setsid, ioctl); it touches no memory of the parent.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // fd 0 is the PTY slave: make it the controlling terminal of the new session.
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(Arc::new(PtyMaster::new(master).map_err(ExecError::Pty)?))
        }
        None => {
            command
                .stdin(if spec.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // A process group of its own (pgid = pid) is all signals and timeouts need. Unlike a
            // `pre_exec` hook it lets std spawn with posix_spawn (vfork-like) instead of fork,
            // which under emulation (TCG) is several times cheaper for an agent with threads.
            command.process_group(0);
            None
        }
    };

    let spawned = command.spawn();
    // The command holds our copies of the PTY slave; the master sees EOF only once they close.
    drop(command);
    let mut child = spawned.map_err(|source| ExecError::Spawn {
        program: arg0.clone(),
        source,
    })?;
    let pid = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .ok_or_else(|| ExecError::Spawn {
            program: arg0.clone(),
            source: io::Error::other("the process has no pid"),
        })?;

    let (outputs, input) = match &pty {
        Some(master) => (
            vec![(Output::Pty(Arc::clone(master)), Stream::Stdout)],
            Input::Pty(Arc::clone(master)),
        ),
        None => {
            let mut outputs = Vec::with_capacity(2);
            if let Some(stdout) = child.stdout.take() {
                outputs.push((Output::Stdout(stdout), Stream::Stdout));
            }
            if let Some(stderr) = child.stderr.take() {
                outputs.push((Output::Stderr(stderr), Stream::Stderr));
            }
            let input = child.stdin.take().map_or(Input::Closed, Input::Pipe);
            (outputs, input)
        }
    };
    Ok(Process {
        child,
        pid,
        outputs,
        input,
        pty,
    })
}

/// The environment of an exec: the base variables, then the request's pairs, which win.
pub fn build_env(extra: &[(String, String)], pty: bool) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), "/root".into()),
    ];
    if pty {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    for (name, value) in extra {
        match env.iter_mut().find(|(existing, _)| existing == name) {
            Some(slot) => slot.1.clone_from(value),
            None => env.push((name.clone(), value.clone())),
        }
    }
    env
}

/// Finds the program to run: a name with a slash is used as it is (relative to the working
/// directory); a bare name is looked up in the `:`-separated directories of `search`.
pub fn resolve_program(name: &str, search: &str) -> Option<PathBuf> {
    if name.is_empty() {
        return None;
    }
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    search
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Where an output pump reads from.
enum Output {
    Stdout(ChildStdout),
    Stderr(ChildStderr),
    Pty(Arc<PtyMaster>),
}

impl Output {
    /// Reads some bytes; 0 means the end of the output.
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Output::Stdout(pipe) => pipe.read(buf).await,
            Output::Stderr(pipe) => pipe.read(buf).await,
            Output::Pty(master) => master.read(buf).await,
        }
    }
}

/// Sends one stream's output as `output` frames until it ends, or until told to stop; then
/// takes what is already buffered and returns.
async fn pump(
    mut output: Output,
    stream: Stream,
    id: RequestId,
    out: Outbox,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            read = output.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    out.send(&Event::Output { id, stream }, &buf[..n]).await;
                }
            },
        }
    }
    for _ in 0..DRAIN_CHUNKS {
        match tokio::time::timeout(Duration::from_millis(10), output.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                out.send(&Event::Output { id, stream }, &buf[..n]).await;
            }
            _ => return,
        }
    }
}

/// Resolves once the exec task says stop (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Where stdin `data` goes.
enum Input {
    Pipe(ChildStdin),
    Pty(Arc<PtyMaster>),
    Closed,
}

/// Writes stdin payloads until the empty one, then closes stdin (a PTY gets its EOF character).
/// When the process stops reading, the rest is dropped. Each payload's bytes go back to the host
/// as credit once written or dropped, so the host never has more than a window in flight.
async fn feed(mut rx: InflowRx, mut input: Input) {
    while let Some(chunk) = rx.recv().await {
        if chunk.is_empty() {
            if let Input::Pty(master) = &input {
                let _ = master.write_all(&[PTY_EOF]).await;
            }
            // Dropping the pipe closes the process's stdin.
            return;
        }
        let written = match &mut input {
            Input::Pipe(pipe) => pipe.write_all(&chunk).await,
            Input::Pty(master) => master.write_all(&chunk).await,
            Input::Closed => Ok(()),
        };
        if written.is_err() {
            input = Input::Closed;
        }
        rx.consumed(chunk.len()).await;
    }
}

/// The master side of a PTY, non-blocking, driven by the runtime.
#[derive(Debug)]
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: an `OwnedFd` keeps its descriptor open and unchanged until it is dropped, which
        // happens only when the `AsyncFd` is.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(Self { fd })
    }

    /// Reads output; 0 once every slave descriptor is closed (the kernel says EIO then).
    async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => {}
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    fn resize(&self, size: PtySize) -> io::Result<()> {
        set_window_size(self.fd.get_ref(), size)
    }
}

fn set_window_size(fd: &OwnedFd, size: PtySize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which is valid for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &raw const winsize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a new PTY of the given size; returns the master (non-blocking) and the slave.
/// Both are close-on-exec; the slave reaches the child only through its stdio.
fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open("/dev/ptmx")?,
    );
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one c_int through the pointer, which is valid for the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor or -1.
    let peer = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let slave = if peer >= 0 {
        // SAFETY: the ioctl just returned this descriptor; nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(peer) }
    } else {
        // Kernels before 4.13: open the slave by its number.
        let mut number: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one c_uint through the pointer, which is valid for the call.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &raw mut number) } < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(format!("/dev/pts/{number}"))?,
        )
    };
    set_window_size(&master, size)?;
    Ok((master, slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, mode: u32) {
        std::fs::write(path, "").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn path_lookup_takes_the_first_executable() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        touch(&a.join("tool"), 0o644); // not executable: skipped
        std::fs::create_dir(b.join("tool")).unwrap(); // a directory: skipped
        touch(&c.join("tool"), 0o755);
        touch(&b.join("other"), 0o700);
        let search = format!("{}::{}:{}", a.display(), b.display(), c.display());
        assert_eq!(resolve_program("tool", &search), Some(c.join("tool")));
        assert_eq!(resolve_program("other", &search), Some(b.join("other")));
        assert_eq!(resolve_program("missing", &search), None);
        assert_eq!(resolve_program("", &search), None);
    }

    #[test]
    fn names_with_a_slash_are_not_looked_up() {
        assert_eq!(
            resolve_program("./run.sh", "/nonexistent"),
            Some(PathBuf::from("./run.sh"))
        );
        assert_eq!(
            resolve_program("/bin/true", ""),
            Some(PathBuf::from("/bin/true"))
        );
    }

    #[test]
    fn request_env_overrides_the_base() {
        let env = build_env(
            &[
                ("HOME".into(), "/home/me".into()),
                ("FOO".into(), "bar".into()),
            ],
            true,
        );
        let get = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some(DEFAULT_PATH));
        assert_eq!(get("HOME"), Some("/home/me"));
        assert_eq!(get("TERM"), Some("xterm-256color"));
        assert_eq!(get("FOO"), Some("bar"));
        assert_eq!(env.iter().filter(|(n, _)| n == "HOME").count(), 1);
        assert!(build_env(&[], false).iter().all(|(name, _)| name != "TERM"));
    }

    #[test]
    fn error_codes() {
        assert_eq!(ExecError::EmptyArgv.code(), ErrorCode::InvalidRequest);
        assert_eq!(
            ExecError::ProgramNotFound("x".into()).code(),
            ErrorCode::NotFound
        );
        let missing = ExecError::Cwd {
            path: "/nope".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(missing.code(), ErrorCode::NotFound);
        let denied = ExecError::Spawn {
            program: "x".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        assert_eq!(denied.code(), ErrorCode::PermissionDenied);
    }
}

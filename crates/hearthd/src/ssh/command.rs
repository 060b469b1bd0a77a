//! The command account: one command per session, run as the `hearth` CLI (a child process) with
//! the caller's session key, its stdin, stdout, stderr and exit status those of the channel.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::plan::{self, Plan};
use super::pty::{self, PtyMaster};
use super::{
    ChannelIo, Incoming, OUTPUT_CHUNK, STDIN_QUEUE, Shared, Start, Terminal, exit_status, incoming,
    words,
};
use crate::vm::Caller;

/// Variables of hearthd's own environment the CLI gets (all others are cleared).
const PASSED_ENV: &[&str] = &["PATH", "LANG", "NO_COLOR"];
/// How long output may still come after the CLI exited (something it started may hold its
/// stdout): then the session ends without it.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Runs what the session was asked for and reports it to the audit log.
pub(super) async fn run(
    shared: &Shared,
    caller: Caller,
    target: &str,
    start: Start,
    terminal: Option<Terminal>,
    mut io: ChannelIo,
) {
    let started = Instant::now();
    let user = &shared.command_user;
    let (command, status) = match start {
        Start::Shell => {
            let host = target.rsplit(' ').next().unwrap_or(target);
            io.say(&format!(
                "{user}@{host} runs one command: ssh {} help\n",
                plan::target_for(user, target)
            ))
            .await;
            ("(shell)".to_owned(), 2)
        }
        Start::Subsystem(name) => {
            io.say(&format!(
                "{user} runs no subsystem ({name}); sftp and scp work with a VM: sftp {}\n",
                // sftp and scp spell the port option -P.
                plan::target_for("VM", target).replacen("-p ", "-P ", 1)
            ))
            .await;
            (format!("(subsystem {name})"), 2)
        }
        Start::Exec(bytes) => {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let status = exec(shared, &caller, target, &bytes, terminal, &mut io).await;
            match status {
                Some(status) => (text, status),
                // The client went away: the child was ended.
                None => (text, 255),
            }
        }
    };
    io.finish(status).await;
    shared
        .identities
        .command_done(&caller, &command, status, started.elapsed());
}

/// Runs one command string; its exit status, or None when the client went away first.
async fn exec(
    shared: &Shared,
    caller: &Caller,
    target: &str,
    command: &[u8],
    terminal: Option<Terminal>,
    io: &mut ChannelIo,
) -> Option<u32> {
    let user = &shared.command_user;
    let hint = format!(
        "hint: `ssh {} help` lists the commands\n",
        plan::target_for(user, target)
    );
    let words = match words::split_bytes(command) {
        Ok(words) => words,
        Err(e) => {
            io.say(&format!("error: {e}\n{hint}")).await;
            return Some(2);
        }
    };
    let argv = match plan::plan(&words) {
        Ok(Plan::Help) => {
            io.print(&plan::help_text(user, target)).await;
            return Some(0);
        }
        Ok(Plan::Cli(argv)) => argv,
        // With --json, the error body on stdout, as the CLI prints its own.
        Err(e) if plan::wants_json(&words) => {
            let body = hearth_api::ErrorBody {
                error: hearth_api::ErrorCode::InvalidRequest,
                message: e.to_string(),
            };
            let text = serde_json::to_string_pretty(&body).unwrap_or_default();
            io.print(&format!("{text}\n")).await;
            return Some(2);
        }
        Err(e) => {
            io.say(&format!("error: {e}\n{hint}")).await;
            return Some(2);
        }
    };
    let key = shared.identities.session_key(caller);
    let mut cli = tokio::process::Command::new(&shared.cli_path);
    cli.args(&argv)
        .env_clear()
        .envs(
            PASSED_ENV
                .iter()
                .filter_map(|name| Some((*name, std::env::var(name).ok()?))),
        )
        .env(
            "HEARTH_URL",
            format!("unix://{}", shared.api_socket.display()),
        )
        .env("HEARTH_API_KEY", key.secret())
        .env(hearth_api::REMOTE_ENV, "1")
        .current_dir("/")
        .kill_on_drop(true);
    let spawned = match &terminal {
        Some(t) => spawn_on_pty(&mut cli, t),
        None => spawn_piped(&mut cli),
    };
    // The command holds our copies of the PTY slave: the master sees EOF once the child's close.
    drop(cli);
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            tracing::error!(cli = %shared.cli_path.display(), error = %e, "cannot run the hearth CLI for an SSH command");
            io.say(&format!(
                "error: hearthd cannot run its CLI {} ({e}); see key ssh.cli_path\n",
                shared.cli_path.display()
            ))
            .await;
            return Some(1);
        }
    };
    let status = drive(child, io).await;
    drop(key);
    status
}

/// A started CLI and its ends of stdio.
struct Child {
    process: tokio::process::Child,
    stdin: mpsc::Sender<Bytes>,
    /// Writes what `stdin` receives into the child; ends when the channel or the child does.
    writer: tokio::task::JoinHandle<()>,
    stdout: Output,
    stderr: Option<Output>,
    pty: Option<Arc<PtyMaster>>,
}

/// Where a child's output is read from.
enum Output {
    Pipe(Box<dyn AsyncRead + Send + Unpin>),
    Pty(Arc<PtyMaster>),
}

impl Output {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Output::Pipe(r) => r.read(buf).await,
            Output::Pty(m) => m.read(buf).await,
        }
    }
}

fn spawn_piped(cli: &mut tokio::process::Command) -> std::io::Result<Child> {
    let mut process = cli
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let missing = || std::io::Error::other("the child has no stdio pipes");
    let mut stdin = process.stdin.take().ok_or_else(missing)?;
    let stdout = process.stdout.take().ok_or_else(missing)?;
    let stderr = process.stderr.take().ok_or_else(missing)?;
    let (tx, mut rx) = mpsc::channel::<Bytes>(STDIN_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if stdin.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // The client's end of input: the child's stdin closes when `stdin` drops.
    });
    Ok(Child {
        process,
        stdin: tx,
        writer,
        stdout: Output::Pipe(Box::new(stdout)),
        stderr: Some(Output::Pipe(Box::new(stderr))),
        pty: None,
    })
}

fn spawn_on_pty(cli: &mut tokio::process::Command, terminal: &Terminal) -> std::io::Result<Child> {
    let (master, slave) = pty::open(terminal.size)?;
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    cli.stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(Stdio::from(slave))
        .env("TERM", &terminal.term);
    pty::controlling_terminal(cli);
    let process = cli.spawn()?;
    let master = Arc::new(master);
    let (tx, mut rx) = mpsc::channel::<Bytes>(STDIN_QUEUE);
    let input = master.clone();
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if input.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    Ok(Child {
        process,
        stdin: tx,
        writer,
        stdout: Output::Pty(master.clone()),
        stderr: None,
        pty: Some(master),
    })
}

/// Copies `output` to the channel (stderr as extended data 1) until it ends; every chunk
/// waits for the client's window, so a slow client slows the child.
async fn pump(mut output: Output, write: &russh::ChannelWriteHalf<russh::server::Msg>, ext: bool) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        let n = match output.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        let sent = if ext {
            write.extended_data_bytes(1, chunk).await
        } else {
            write.data_bytes(chunk).await
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Feeds the child what the client sends and the client what the child writes, until the child
/// has exited and its output is read; the exit status, or None when the client went away
/// first (the child is then killed by its pid).
async fn drive(mut child: Child, io: &mut ChannelIo) -> Option<u32> {
    let pid = child.process.id();
    let (read, write) = (&mut io.read, &io.write);
    let stdout = pump(child.stdout, write, false);
    let stderr_output = child.stderr;
    let stderr = async move {
        if let Some(stderr) = stderr_output {
            pump(stderr, write, true).await;
        }
    };
    let output = futures_util::future::join(stdout, stderr);
    tokio::pin!(output);
    let mut output_done = false;
    let mut stdin = Some(child.stdin);
    // A chunk of stdin waiting for room in the queue: while it waits, nothing more is read
    // from the channel.
    let mut pending: Option<Bytes> = None;
    let mut exited: Option<(u32, tokio::time::Instant)> = None;
    loop {
        if let Some((status, _)) = exited
            && output_done
        {
            return Some(status);
        }
        tokio::select! {
            status = child.process.wait(), if exited.is_none() => {
                let status = match status {
                    Ok(s) => {
                        use std::os::unix::process::ExitStatusExt;
                        exit_status(s.code(), s.signal())
                    }
                    Err(_) => 1,
                };
                exited = Some((status, tokio::time::Instant::now() + OUTPUT_GRACE));
                // Nothing reads stdin any more.
                stdin = None;
                pending = None;
            }
            _ = &mut output, if !output_done => output_done = true,
            () = sleep_until(exited.map(|(_, at)| at)), if exited.is_some() && !output_done => {
                if let Some((status, _)) = exited {
                    return Some(status);
                }
            }
            permit = reserve(stdin.clone()), if pending.is_some() => match permit {
                Some(permit) => {
                    if let Some(chunk) = pending.take() {
                        permit.send(chunk);
                    }
                }
                // The writer stopped: the child closed its stdin or exited.
                None => {
                    stdin = None;
                    pending = None;
                }
            },
            incoming = incoming(read), if pending.is_none() => match incoming {
                Incoming::Data(data) => {
                    if stdin.is_some() && !data.is_empty() {
                        pending = Some(data);
                    }
                }
                // On a PTY the client's end of input means nothing (as with sshd).
                Incoming::Eof => {
                    if child.pty.is_none() {
                        stdin = None;
                    }
                }
                Incoming::Resize(size) => {
                    if let Some(pty) = &child.pty
                        && let Err(e) = pty.resize(size)
                    {
                        tracing::debug!(error = %e, "cannot resize an SSH command's PTY");
                    }
                }
                Incoming::Signal(signal) => {
                    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok())
                        && let Ok(signal) = nix::sys::signal::Signal::try_from(signal)
                    {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
                    }
                }
                Incoming::Gone => {
                    if exited.is_none() {
                        tracing::debug!(?pid, "SSH client went away; ending its command");
                        let _ = child.process.start_kill();
                        let _ = child.process.wait().await;
                    }
                    child.writer.abort();
                    return exited.map(|(status, _)| status);
                }
            },
        }
    }
}

/// Room for one chunk in the stdin queue; None when it is closed.
async fn reserve(tx: Option<mpsc::Sender<Bytes>>) -> Option<mpsc::OwnedPermit<Bytes>> {
    tx?.reserve_owned().await.ok()
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

//! Into-VM sessions (`ssh <vm>@HOST`): a login shell, one command (`sh -c` of the string, as
//! sshd runs it) or the sftp server, in the VM, as an exec session of `VmService` — the same
//! action the REST exec endpoints hand over, with the caller, so a VM the caller may not see is
//! "not found" like one that does not exist.

use bytes::Bytes;
use hearth_api::ExecRequest;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

use super::{ChannelIo, Incoming, STDIN_QUEUE, Shared, Start, Terminal, exit_status, incoming};
use crate::vm::{Action, Caller, ExecEvent, ExecInput, ExecOpen, ExecOutput, Reply, VmError};

/// The subsystem served, and the guest program that serves it.
pub const SFTP: &str = "sftp";
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// Runs the user's login shell (from the guest's /etc/passwd), else `/bin/sh`, as a login shell.
const LOGIN_SHELL: &str = r#"s=$(sed -n "s|^$(id -un):[^:]*:[^:]*:[^:]*:[^:]*:[^:]*:||p" /etc/passwd 2>/dev/null); [ -x "$s" ] || s=/bin/sh; exec "$s" -l"#;

/// Runs what the session was asked for in VM `vm` and ends the channel with its exit status.
pub(super) async fn run(
    shared: &Shared,
    caller: Caller,
    vm: &str,
    start: Start,
    terminal: Option<Terminal>,
    mut io: ChannelIo,
) {
    let (command, pty) = match start {
        Start::Shell => (
            vec!["/bin/sh".into(), "-c".into(), LOGIN_SHELL.into()],
            terminal.as_ref().map(|t| t.size),
        ),
        Start::Exec(bytes) => match String::from_utf8(bytes) {
            Ok(text) => (
                vec!["/bin/sh".into(), "-c".into(), text],
                terminal.as_ref().map(|t| t.size),
            ),
            Err(_) => {
                io.say("error: the command is not UTF-8 text\n").await;
                io.finish(2).await;
                return;
            }
        },
        Start::Subsystem(name) if name == SFTP => (vec![SFTP_SERVER.into()], None),
        Start::Subsystem(name) => {
            io.say(&format!(
                "error: no subsystem {name:?} here; a VM serves only {SFTP}\n"
            ))
            .await;
            io.finish(2).await;
            return;
        }
    };
    let sftp = command[0] == SFTP_SERVER;
    let mut env = BTreeMap::new();
    if let (Some(t), Some(_)) = (&terminal, pty) {
        env.insert("TERM".to_owned(), t.term.clone());
    }
    let open = ExecOpen {
        request: ExecRequest {
            command,
            env,
            cwd: None,
            stdin: None,
            timeout_secs: None,
        },
        stdin: true,
        pty: pty.map(|size| hearth_guest_proto::PtySize {
            rows: size.rows,
            cols: size.cols,
        }),
    };
    let action = Action::OpenExec {
        name: vm.to_owned(),
        open,
    };
    let stream = match shared.service.handle(&caller, action).await {
        Ok(Reply::ExecStream(stream)) => stream,
        Ok(other) => {
            tracing::error!(?other, "an exec session was answered with another reply");
            io.say("error: hearthd answered the exec session unexpectedly\n")
                .await;
            io.finish(1).await;
            return;
        }
        Err(e) => {
            let message = if sftp && e.code() == hearth_api::ErrorCode::CommandNotFound {
                format!(
                    "error: VM {vm} has no sftp server ({SFTP_SERVER}); install openssh-sftp-server in it"
                )
            } else {
                format!("error: {}", e.message())
            };
            io.say(&format!("{message}\n")).await;
            io.finish(u32::from(e.code().exit_code())).await;
            return;
        }
    };
    let status = drive(stream.output, stream.input, pty.is_some(), &mut io).await;
    if let Some(status) = status {
        io.finish(status).await;
    }
}

/// Output to the client, the client's input to the process, until the process exits (its
/// status) or the client goes away (None: dropping the session ends the process in the guest).
async fn drive(
    mut output: ExecOutput,
    input: ExecInput,
    pty: bool,
    io: &mut ChannelIo,
) -> Option<u32> {
    let (read, write) = (&mut io.read, &io.write);
    let out = async {
        loop {
            let sent = match output.next().await {
                Ok(ExecEvent::Stdout(b)) => write.data_bytes(Bytes::from(b)).await,
                Ok(ExecEvent::Stderr(b)) => write.extended_data_bytes(1, Bytes::from(b)).await,
                Ok(ExecEvent::Exited { code, signal, .. }) => {
                    return Ok(exit_status(code, signal));
                }
                Err(e) => return Err(e),
            };
            if sent.is_err() {
                // The client is gone; its channel's close ends the session below.
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::pin!(out);
    // Stdin waits for the guest's credit in a task of its own, so output, resizes and the
    // client's going away are never held up by it.
    let (tx, mut rx) = mpsc::channel::<Bytes>(STDIN_QUEUE);
    let writer_input = input.clone();
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if writer_input.write(&chunk).await.is_err() {
                return;
            }
        }
        // On a PTY, the client's end of input means nothing (as with sshd).
        if !pty {
            let _ = writer_input.close().await;
        }
    });
    let mut stdin = Some(tx);
    let mut pending: Option<Bytes> = None;
    let result = loop {
        tokio::select! {
            result = &mut out => break Some(result),
            permit = reserve(stdin.clone()), if pending.is_some() => match permit {
                Some(permit) => {
                    if let Some(chunk) = pending.take() {
                        permit.send(chunk);
                    }
                }
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
                Incoming::Eof => stdin = None,
                // Not queued behind stdin that waits for credit.
                Incoming::Resize(size) => {
                    let input = input.clone();
                    tokio::spawn(async move { input.resize(size).await });
                }
                Incoming::Signal(signal) => {
                    let input = input.clone();
                    tokio::spawn(async move { input.signal(signal).await });
                }
                Incoming::Gone => break None,
            },
        }
    };
    // The process has exited (nothing reads its stdin any more) or the client is gone.
    writer.abort();
    match result? {
        Ok(status) => Some(status),
        Err(e) => {
            io.say(&format!("error: {}\n", e.message())).await;
            Some(u32::from(error_status(&e)))
        }
    }
}

fn error_status(e: &VmError) -> u8 {
    e.code().exit_code()
}

async fn reserve(tx: Option<mpsc::Sender<Bytes>>) -> Option<mpsc::OwnedPermit<Bytes>> {
    tx?.reserve_owned().await.ok()
}

//! `hearth exec NAME [-i] [-t] … -- CMD…` over the exec WebSocket. The exit code is the
//! command's own (128+n for signal n, 124 on timeout); hearth's own failures end with 125.

use std::io::{IsTerminal, Read};

use futures_util::{SinkExt, StreamExt};
use hearth_api::{
    EXIT_EXEC_FAILED, ErrorBody, TtySize, WS_STDERR, WS_STDOUT, WsClientMessage, WsServerMessage,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::ExecArgs;
use crate::client::Client;
use crate::error::{CliError, Result};
use crate::tty::{self, RawMode};

/// Exit code when the command ran out of its `--timeout` (as timeout(1) does).
pub const EXIT_TIMED_OUT: u8 = 124;
/// The size a `-t` session gets when no local terminal tells its own.
const DEFAULT_TTY: TtySize = TtySize { rows: 24, cols: 80 };
/// Interrupts forwarded to the command before hearth gives up waiting for it.
const MAX_FORWARDED_SIGNALS: u32 = 3;

/// The exit code `hearth exec` ends with for a finished command.
pub fn exit_code(code: Option<i32>, signal: Option<i32>, timed_out: bool) -> u8 {
    if timed_out {
        return EXIT_TIMED_OUT;
    }
    if let Some(sig) = signal {
        return u8::try_from(128 + sig.clamp(1, 127)).unwrap_or(u8::MAX);
    }
    match code {
        Some(code) => u8::try_from(code.rem_euclid(256)).unwrap_or(1),
        None => EXIT_EXEC_FAILED,
    }
}

pub async fn run(client: &Client, args: ExecArgs) -> Result<u8> {
    let tty = args.tty.then(|| tty::local_size().unwrap_or(DEFAULT_TTY));
    let start = WsClientMessage::Start {
        command: args.command,
        env: args.env.into_iter().collect(),
        cwd: args.workdir,
        tty,
        stdin: args.interactive,
        timeout_secs: args.timeout,
    };
    let socket = client.exec_socket(&args.name).await?;
    let (mut sink, mut stream) = socket.split();
    sink.send(json_message(&start))
        .await
        .map_err(|e| CliError::protocol(format!("exec session failed: {e}")))?;

    // Raw mode only when our keystrokes go to the command; without -i, Ctrl-C stays a local
    // signal, which is forwarded below.
    let stdin = std::io::stdin();
    let raw = if tty.is_some() && args.interactive && stdin.is_terminal() {
        Some(
            RawMode::enable(&stdin)
                .map_err(|e| CliError::io("cannot set the terminal to raw mode", &e))?,
        )
    } else {
        None
    };
    let mut input = if args.interactive {
        Some(spawn_stdin_reader()?)
    } else {
        None
    };
    let mut winch = if tty.is_some() {
        signal(SignalKind::window_change()).ok()
    } else {
        None
    };
    let mut interrupts = if raw.is_none() {
        Interrupts::new()
    } else {
        None
    };
    let mut forwarded = 0;
    let mut sink_open = true;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();

    let outcome = loop {
        let mut outgoing = None;
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    let written = match data.split_first() {
                        Some((&WS_STDOUT, bytes)) => write_out(&mut stdout, bytes).await,
                        Some((&WS_STDERR, bytes)) => write_out(&mut stderr, bytes).await,
                        _ => Ok(()),
                    };
                    match written {
                        Ok(()) => {}
                        // Our reader went away: end as a shell pipeline would (SIGPIPE).
                        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                            break Ok(128 + u8::try_from(libc::SIGPIPE).unwrap_or(13));
                        }
                        Err(e) => break Err(CliError::io("writing the command's output failed", &e)),
                    }
                }
                Some(Ok(Message::Text(text))) => break finished(&text),
                Some(Ok(Message::Close(_))) | None => break Err(CliError::protocol(
                    "hearthd closed the exec session before the command exited",
                )),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(CliError::protocol(format!("exec session failed: {e}"))),
            },
            chunk = recv(&mut input) => match chunk {
                Some(bytes) => outgoing = Some(Message::binary(bytes)),
                None => {
                    input = None;
                    outgoing = Some(json_message(&WsClientMessage::Eof));
                }
            },
            () = next_signal(&mut winch) => {
                if let Some(size) = tty::local_size() {
                    outgoing = Some(json_message(&WsClientMessage::Resize { size }));
                }
            },
            sig = next_interrupt(&mut interrupts) => {
                forwarded += 1;
                if forwarded > MAX_FORWARDED_SIGNALS {
                    break Ok(exit_code(None, Some(sig), false));
                }
                outgoing = Some(json_message(&WsClientMessage::Signal { signal: sig }));
            },
        }
        if let Some(message) = outgoing.filter(|_| sink_open)
            && sink.send(message).await.is_err()
        {
            // The command may have exited without reading its input; its exit status is
            // still on the way, so keep reading.
            sink_open = false;
            input = None;
            winch = None;
        }
    };
    drop(raw);
    if sink_open {
        let close = sink.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
    }
    outcome
}

/// The exit code in the server's final text message, or the error it reports.
fn finished(text: &str) -> Result<u8> {
    match serde_json::from_str::<WsServerMessage>(text) {
        Ok(WsServerMessage::Exit {
            exit_code: code,
            signal,
            timed_out,
        }) => Ok(exit_code(code, signal, timed_out)),
        Ok(WsServerMessage::Error { error, message }) => {
            let raw = serde_json::to_value(ErrorBody {
                error,
                message: message.clone(),
            })
            .ok();
            Err(CliError::from_body(ErrorBody { error, message }, raw))
        }
        Err(e) => Err(CliError::protocol(format!(
            "hearthd sent an unexpected exec message: {e}"
        ))),
    }
}

fn json_message(message: &WsClientMessage) -> Message {
    Message::text(serde_json::to_string(message).unwrap_or_default())
}

async fn write_out(out: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(bytes).await?;
    out.flush().await
}

/// Reads stdin on a thread of its own (a blocking read cannot be cancelled, and must not keep
/// the runtime from shutting down); `None` from the channel is end of input.
fn spawn_stdin_reader() -> Result<mpsc::Receiver<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(8);
    std::thread::Builder::new()
        .name("hearth-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0; 32 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
        .map_err(|e| CliError::io("cannot start reading stdin", &e))?;
    Ok(rx)
}

async fn recv(input: &mut Option<mpsc::Receiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match input {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_signal(signal: &mut Option<Signal>) {
    if let Some(s) = signal
        && s.recv().await.is_some()
    {
        return;
    }
    std::future::pending().await
}

/// SIGINT, SIGTERM and SIGHUP sent to hearth, to be passed on to the command.
#[derive(Debug)]
struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interrupts {
    fn new() -> Option<Interrupts> {
        Some(Interrupts {
            int: signal(SignalKind::interrupt()).ok()?,
            term: signal(SignalKind::terminate()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
        })
    }
}

async fn next_interrupt(interrupts: &mut Option<Interrupts>) -> i32 {
    let Some(i) = interrupts else {
        return std::future::pending().await;
    };
    tokio::select! {
        Some(()) = i.int.recv() => libc::SIGINT,
        Some(()) = i.term.recv() => libc::SIGTERM,
        Some(()) = i.hup.recv() => libc::SIGHUP,
        else => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use hearth_api::ErrorCode;

    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(Some(0), None, false), 0);
        assert_eq!(exit_code(Some(3), None, false), 3);
        assert_eq!(exit_code(Some(256 + 7), None, false), 7);
        assert_eq!(exit_code(Some(-1), None, false), 255);
        assert_eq!(exit_code(None, Some(9), false), 137);
        assert_eq!(exit_code(None, Some(15), false), 143);
        assert_eq!(exit_code(None, Some(9), true), 124);
        assert_eq!(exit_code(Some(1), None, true), EXIT_TIMED_OUT);
        assert_eq!(exit_code(None, None, false), EXIT_EXEC_FAILED);
    }

    #[test]
    fn final_messages() {
        assert_eq!(
            finished(r#"{"type":"exit","exit_code":3,"signal":null,"timed_out":false}"#).unwrap(),
            3
        );
        assert_eq!(
            finished(r#"{"type":"exit","exit_code":null,"signal":2,"timed_out":false}"#).unwrap(),
            130
        );
        let err = finished(
            r#"{"type":"error","error":"guest_unavailable","message":"the guest is booting"}"#,
        )
        .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::GuestUnavailable));
        assert_eq!(err.message(), "the guest is booting");
        assert_eq!(err.json()["error"], "guest_unavailable");
        assert!(finished("nonsense").is_err());
    }

    #[test]
    fn client_messages_are_tagged_json() {
        let Message::Text(text) = json_message(&WsClientMessage::Eof) else {
            panic!("not text")
        };
        assert_eq!(text.as_str(), r#"{"type":"eof"}"#);
    }
}

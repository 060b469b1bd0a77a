//! The streaming endpoints: logs, exec as NDJSON or over a WebSocket, file transfers. Each
//! turns its request into an [`Action`] for [`VmService::handle`] and the stream it gets back
//! into HTTP; the sessions themselves live in `vm`.

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, stream};
use hearth_api::{
    ErrorCode, ExecRequest, ExecStreamEvent, VmState, WS_STDERR, WS_STDOUT, WsClientMessage,
    WsServerMessage,
};
use hearth_guest_proto::PtySize;

use super::{ApiError, octal_header, unexpected};
use crate::vm::{
    Action, Caller, ExecEvent, ExecInput, ExecOpen, ExecOutput, ExecStream, LogSource, LogWindow,
    Reply, Upload, VmError, VmService,
};

pub async fn logs(
    service: &VmService,
    caller: &Caller,
    name: String,
    source: LogSource,
    window: LogWindow,
) -> Result<Response, ApiError> {
    let action = Action::Logs {
        name,
        source,
        window,
    };
    let log = match service.handle(caller, action).await? {
        Reply::Log(log) => log,
        other => return Err(unexpected(other)),
    };
    let body = stream::unfold(log, |mut log| async move {
        let chunk = log.next().await?;
        Some((chunk, log))
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response())
}

async fn open_exec(
    service: &VmService,
    caller: &Caller,
    name: String,
    open: ExecOpen,
) -> Result<ExecStream, VmError> {
    match service
        .handle(caller, Action::OpenExec { name, open })
        .await?
    {
        Reply::ExecStream(s) => Ok(s),
        other => Err(VmError::Task(format!("unexpected reply {other:?}"))),
    }
}

fn ndjson(event: &ExecStreamEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

pub async fn exec_ndjson(
    service: &VmService,
    caller: &Caller,
    name: String,
    mut request: ExecRequest,
) -> Result<Response, ApiError> {
    let stdin = request.stdin.take();
    let open = ExecOpen {
        request,
        stdin: stdin.is_some(),
        pty: None,
    };
    let ExecStream { output, input } = open_exec(service, caller, name, open).await?;
    if let Some(text) = stdin {
        input.write(text.as_bytes()).await?;
        input.close().await?;
    }
    struct Ndjson {
        output: ExecOutput,
        stdout: Utf8Carry,
        stderr: Utf8Carry,
    }
    let state = Ndjson {
        output,
        stdout: Utf8Carry::default(),
        stderr: Utf8Carry::default(),
    };
    let body = stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        let (event, more) = match st.output.next().await {
            Ok(ExecEvent::Stdout(b)) => (
                ExecStreamEvent::Stdout {
                    data: st.stdout.push(&b),
                },
                true,
            ),
            Ok(ExecEvent::Stderr(b)) => (
                ExecStreamEvent::Stderr {
                    data: st.stderr.push(&b),
                },
                true,
            ),
            Ok(ExecEvent::Exited {
                code,
                signal,
                timed_out,
            }) => {
                // Bytes of an unfinished character at the very end are flushed as they are.
                let mut out = Vec::new();
                for (rest, stdout) in [(st.stdout.finish(), true), (st.stderr.finish(), false)] {
                    if !rest.is_empty() {
                        out.push(if stdout {
                            ExecStreamEvent::Stdout { data: rest }
                        } else {
                            ExecStreamEvent::Stderr { data: rest }
                        });
                    }
                }
                out.push(ExecStreamEvent::Exit {
                    exit_code: code,
                    signal,
                    timed_out,
                });
                let bytes: Vec<u8> = out.iter().flat_map(|e| ndjson(e).to_vec()).collect();
                return Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), None));
            }
            Err(e) => (
                ExecStreamEvent::Error {
                    error: e.code(),
                    message: e.message(),
                },
                false,
            ),
        };
        if matches!(&event, ExecStreamEvent::Stdout { data } | ExecStreamEvent::Stderr { data } if data.is_empty())
        {
            // Only part of a character so far: nothing to send yet.
            return Some((Ok(Bytes::new()), Some(st)));
        }
        let next = more.then_some(st);
        Some((Ok::<_, std::io::Error>(ndjson(&event)), next))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}

/// Turns a byte stream split at arbitrary points into text, holding back the bytes of a
/// character that is not complete yet instead of replacing them.
#[derive(Debug, Default)]
struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let split = self.pending.len() - incomplete_tail(&self.pending);
        let text = String::from_utf8_lossy(&self.pending[..split]).into_owned();
        self.pending.drain(..split);
        text
    }

    fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Length of an unfinished UTF-8 sequence at the end of `b` (0 to 3 bytes).
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let byte = b[b.len() - back];
        if byte & 0xc0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
        }
        let need = match byte {
            0xf0..=0xf7 => 4,
            0xe0..=0xef => 3,
            0xc0..=0xdf => 2,
            _ => 1,
        };
        return if need > back { back } else { 0 };
    }
    0
}

pub async fn exec_ws(
    service: &VmService,
    caller: Caller,
    name: String,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // Checked before upgrading, so a missing or stopped VM gets a plain HTTP error.
    let vm = match service
        .handle(&caller, crate::vm::Action::GetVm(name.clone()))
        .await?
    {
        Reply::VmDetail(d) => d.vm,
        other => return Err(unexpected(other)),
    };
    if vm.state != VmState::Running {
        return Err(VmError::NotRunning {
            name: vm.name,
            state: vm.state,
            what: "exec",
        }
        .into());
    }
    let service = service.clone();
    Ok(ws.on_upgrade(move |socket| async move {
        if let Err(e) = ws_session(&service, &caller, name.clone(), socket).await {
            tracing::debug!(vm = %name, error = %e, "exec websocket ended");
        }
    }))
}

async fn send_text(socket: &mut WebSocket, msg: &WsServerMessage) -> Result<(), axum::Error> {
    let text = serde_json::to_string(msg).unwrap_or_default();
    socket.send(Message::Text(text.into())).await
}

async fn send_error(socket: &mut WebSocket, e: &VmError) -> Result<(), axum::Error> {
    let msg = WsServerMessage::Error {
        error: e.code(),
        message: e.message(),
    };
    send_text(socket, &msg).await
}

async fn ws_session(
    service: &VmService,
    caller: &Caller,
    name: String,
    mut socket: WebSocket,
) -> Result<(), axum::Error> {
    let start = loop {
        match socket.recv().await {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<WsClientMessage>(&t),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return Ok(()),
        }
    };
    let open = match start {
        Ok(WsClientMessage::Start {
            command,
            env,
            cwd,
            tty,
            stdin,
            timeout_secs,
        }) => ExecOpen {
            request: ExecRequest {
                command,
                env,
                cwd,
                stdin: None,
                timeout_secs,
            },
            stdin,
            pty: tty.map(|t| PtySize {
                rows: t.rows,
                cols: t.cols,
            }),
        },
        Ok(other) => {
            let msg = WsServerMessage::Error {
                error: ErrorCode::InvalidRequest,
                message: format!("the first message must be start, not {other:?}"),
            };
            return send_text(&mut socket, &msg).await;
        }
        Err(e) => {
            let msg = WsServerMessage::Error {
                error: ErrorCode::InvalidRequest,
                message: format!("invalid start message: {e}"),
            };
            return send_text(&mut socket, &msg).await;
        }
    };
    let stdin_open = open.stdin;
    let ExecStream { output, input } = match open_exec(service, caller, name, open).await {
        Ok(s) => s,
        Err(e) => return send_error(&mut socket, &e).await,
    };
    // Output and input run side by side: writing stdin waits for the guest's credit, and that
    // must never hold up output, signals or noticing that the client went away.
    let (sink, stream) = socket.split();
    tokio::select! {
        r = forward_output(output, sink) => r,
        // The client went away: `output` is dropped, which ends the process in the guest.
        () = forward_input(input, stream, stdin_open) => Ok(()),
    }
}

type WsSink = futures_util::stream::SplitSink<WebSocket, Message>;

async fn forward_output(mut output: ExecOutput, mut sink: WsSink) -> Result<(), axum::Error> {
    use futures_util::SinkExt;
    let text = |msg: &WsServerMessage| {
        Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
    };
    loop {
        let msg = match output.next().await {
            Ok(ExecEvent::Stdout(b)) => Message::Binary(prefixed(WS_STDOUT, &b)),
            Ok(ExecEvent::Stderr(b)) => Message::Binary(prefixed(WS_STDERR, &b)),
            Ok(ExecEvent::Exited {
                code,
                signal,
                timed_out,
            }) => {
                let exit = WsServerMessage::Exit {
                    exit_code: code,
                    signal,
                    timed_out,
                };
                sink.send(text(&exit)).await?;
                let _ = sink.send(Message::Close(None)).await;
                return Ok(());
            }
            Err(e) => {
                let error = WsServerMessage::Error {
                    error: e.code(),
                    message: e.message(),
                };
                sink.send(text(&error)).await?;
                let _ = sink.send(Message::Close(None)).await;
                return Ok(());
            }
        };
        sink.send(msg).await?;
    }
}

/// Feeds the client's messages to the process until the client closes or goes away.
async fn forward_input(
    input: ExecInput,
    mut stream: futures_util::stream::SplitStream<WebSocket>,
    mut stdin_open: bool,
) {
    while let Some(Ok(msg)) = stream.next().await {
        let sent = match msg {
            Message::Binary(data) if stdin_open => input.write(&data).await,
            Message::Text(t) => match serde_json::from_str::<WsClientMessage>(&t) {
                Ok(WsClientMessage::Eof) if stdin_open => {
                    stdin_open = false;
                    input.close().await
                }
                // Not queued behind stdin that waits for credit.
                Ok(WsClientMessage::Resize { size }) => {
                    let input = input.clone();
                    let size = PtySize {
                        rows: size.rows,
                        cols: size.cols,
                    };
                    tokio::spawn(async move { input.resize(size).await });
                    Ok(())
                }
                Ok(WsClientMessage::Signal { signal }) => {
                    let input = input.clone();
                    tokio::spawn(async move { input.signal(signal).await });
                    Ok(())
                }
                _ => Ok(()),
            },
            Message::Close(_) => return,
            _ => Ok(()),
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e.message(), "exec websocket: cannot forward to guest");
        }
    }
}

fn prefixed(tag: u8, data: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(tag);
    v.extend_from_slice(data);
    Bytes::from(v)
}

pub async fn put_file(
    service: &VmService,
    caller: &Caller,
    name: String,
    path: String,
    mode: u32,
    body: Body,
) -> Result<(), ApiError> {
    let data = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(|e| format!("reading the upload failed: {e}")));
    let action = Action::PutFile {
        name,
        path,
        mode,
        data: Upload(Box::pin(data)),
    };
    match service.handle(caller, action).await? {
        Reply::Written => Ok(()),
        other => Err(unexpected(other)),
    }
}

pub async fn get_file(
    service: &VmService,
    caller: &Caller,
    name: String,
    path: String,
) -> Result<Response, ApiError> {
    let download = match service
        .handle(caller, Action::GetFile { name, path })
        .await?
    {
        Reply::Download(d) => d,
        other => return Err(unexpected(other)),
    };
    // No Content-Length: files under /proc or /sys, or files that change while they are read,
    // do not have the size the guest reported, and a declared length would cut them short.
    let mut headers = octal_header(download.mode);
    headers.insert("x-hearth-file-size", download.size.into());
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    let body = stream::unfold(download, |mut d| async move {
        let item = d.next().await?;
        Some((item.map_err(|e| std::io::Error::other(e.message())), d))
    });
    Ok((headers, Body::from_stream(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_chunks_survive() {
        let text = "héllo wörld — ✓ 🦀";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut c = Utf8Carry::default();
            let mut out = c.push(&bytes[..cut]);
            out.push_str(&c.push(&bytes[cut..]));
            out.push_str(&c.finish());
            assert_eq!(out, text, "cut at {cut}");
        }
    }

    #[test]
    fn invalid_bytes_are_still_replaced() {
        let mut c = Utf8Carry::default();
        assert_eq!(c.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(c.push(b"\xe2\x82"), "");
        assert_eq!(c.finish(), "\u{fffd}");
    }
}

//! The streaming endpoints: logs, exec as NDJSON or over a WebSocket, file transfers.

use std::io::SeekFrom;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, stream};
use hearth_api::{
    ErrorCode, ExecRequest, ExecStreamEvent, WS_STDERR, WS_STDOUT, WsClientMessage, WsServerMessage,
};
use hearth_guest_proto::PtySize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::{ApiError, octal_header};
use crate::guest::{ExecEvent, ExecSession, GuestError};
use crate::vm::{LogSource, VmError, VmService, exec_spec};

fn guest_err(name: &str, source: GuestError) -> VmError {
    VmError::Guest {
        name: name.to_owned(),
        source,
    }
}

pub async fn logs(
    service: &VmService,
    name: &str,
    source: LogSource,
    follow: bool,
    tail: Option<usize>,
) -> Result<Response, ApiError> {
    let vm = service.record(name).await?;
    let path = service.log_path(&vm, source);
    let log_err = |e: std::io::Error| VmError::Log {
        name: vm.name.clone(),
        source_name: match source {
            LogSource::Serial => "serial".into(),
            LogSource::Vmm => "vmm".into(),
        },
        source: e,
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(log_err(e).into()),
    };
    // Start position: everything, or the last `tail` lines (looked for in the last 1 MiB).
    let mut start = 0u64;
    if let (Some(f), Some(n)) = (file.as_mut(), tail) {
        let len = f.metadata().await.map_err(log_err)?.len();
        let from = len.saturating_sub(1 << 20);
        f.seek(SeekFrom::Start(from)).await.map_err(log_err)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).await.map_err(log_err)?;
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let mut cut = 0;
        let mut seen = 0;
        for (i, b) in body.iter().enumerate().rev() {
            if *b == b'\n' {
                seen += 1;
                if seen == n {
                    cut = i + 1;
                    break;
                }
            }
        }
        start = if n == 0 { len } else { from + cut as u64 };
    }
    if let Some(f) = file.as_mut() {
        f.seek(SeekFrom::Start(start)).await.map_err(log_err)?;
    }
    struct Tail {
        file: Option<tokio::fs::File>,
        pos: u64,
        path: std::path::PathBuf,
        follow: bool,
        service: VmService,
        id: String,
    }
    let state = Tail {
        file,
        pos: start,
        path,
        follow,
        service: service.clone(),
        id: vm.id.clone(),
    };
    let body = stream::unfold(state, |mut t| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(f) = t.file.as_mut() {
                match f.read(&mut buf).await {
                    Ok(0) => {}
                    Ok(n) => {
                        t.pos += n as u64;
                        let chunk = Bytes::copy_from_slice(&buf[..n]);
                        return Some((Ok::<_, std::io::Error>(chunk), t));
                    }
                    Err(e) => return Some((Err(e), t)),
                }
            }
            if !t.follow || t.service.record(&t.id).await.is_err() {
                return None; // not following, or the VM was deleted
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // The log may have been capped (truncated in place) or rotated (renamed, a new file
            // begun) meanwhile: then read the current file from its start.
            if t.file.is_none() || log_replaced(&t.path, t.file.as_ref(), t.pos).await {
                t.file = tokio::fs::File::open(&t.path).await.ok();
                t.pos = 0;
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response())
}

/// True when `path` is no longer the file `open` reads, or is shorter than what was read.
async fn log_replaced(path: &std::path::Path, open: Option<&tokio::fs::File>, pos: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(now) = tokio::fs::metadata(path).await else {
        return false;
    };
    let Some(file) = open else { return true };
    match file.metadata().await {
        Ok(was) => was.ino() != now.ino() || now.len() < pos,
        Err(_) => true,
    }
}

async fn open_session(
    service: &VmService,
    name: &str,
    request: ExecRequest,
    stdin: bool,
    pty: Option<PtySize>,
) -> Result<(String, ExecSession), VmError> {
    let spec = exec_spec(request, stdin, pty)?;
    let (vm, guest) = service.guest(name, "exec").await?;
    let session = service.open_exec(&vm, &guest, spec).await?;
    Ok((vm.name, session))
}

fn ndjson(event: &ExecStreamEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

pub async fn exec_ndjson(
    service: &VmService,
    name: &str,
    request: ExecRequest,
) -> Result<Response, ApiError> {
    let stdin = request.stdin.clone();
    let (vm_name, session) = open_session(service, name, request, stdin.is_some(), None).await?;
    if let Some(text) = stdin {
        let client = session.client().clone();
        client
            .send_data(session.id, text.as_bytes())
            .await
            .map_err(|e| guest_err(&vm_name, e))?;
        client
            .send_data(session.id, &[])
            .await
            .map_err(|e| guest_err(&vm_name, e))?;
    }
    struct Ndjson {
        session: ExecSession,
        vm_name: String,
        stdout: Utf8Carry,
        stderr: Utf8Carry,
    }
    let state = Ndjson {
        session,
        vm_name,
        stdout: Utf8Carry::default(),
        stderr: Utf8Carry::default(),
    };
    let body = stream::unfold(Some(state), |state| async move {
        let mut st = state?;
        let (event, more) = match st.session.next().await {
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
            Err(e) => {
                let e = guest_err(&st.vm_name, e);
                (
                    ExecStreamEvent::Error {
                        error: e.code(),
                        message: e.message(),
                    },
                    false,
                )
            }
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
    name: &str,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // Check before upgrading, so a missing or stopped VM gets a plain HTTP error.
    service.guest(name, "exec").await?;
    let service = service.clone();
    let name = name.to_owned();
    Ok(ws.on_upgrade(move |socket| async move {
        if let Err(e) = ws_session(&service, &name, socket).await {
            tracing::debug!(vm = %name, error = %e, "exec websocket ended");
        }
    }))
}

async fn send_text(socket: &mut WebSocket, msg: &WsServerMessage) -> Result<(), axum::Error> {
    let text = serde_json::to_string(msg).unwrap_or_default();
    socket.send(Message::Text(text.into())).await
}

async fn ws_session(
    service: &VmService,
    name: &str,
    mut socket: WebSocket,
) -> Result<(), axum::Error> {
    let start = loop {
        match socket.recv().await {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<WsClientMessage>(&t),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return Ok(()),
        }
    };
    let (request, stdin, tty) = match start {
        Ok(WsClientMessage::Start {
            command,
            env,
            cwd,
            tty,
            stdin,
            timeout_secs,
        }) => (
            ExecRequest {
                command,
                env,
                cwd,
                stdin: None,
                timeout_secs,
            },
            stdin,
            tty.map(|t| PtySize {
                rows: t.rows,
                cols: t.cols,
            }),
        ),
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
    let (vm_name, mut session) = match open_session(service, name, request, stdin, tty).await {
        Ok(s) => s,
        Err(e) => {
            let msg = WsServerMessage::Error {
                error: e.code(),
                message: e.message(),
            };
            return send_text(&mut socket, &msg).await;
        }
    };
    let client = session.client().clone();
    let id = session.id;
    let mut stdin_open = stdin;
    loop {
        tokio::select! {
            event = session.next() => {
                let msg = match event {
                    Ok(ExecEvent::Stdout(b)) => Message::Binary(prefixed(WS_STDOUT, &b)),
                    Ok(ExecEvent::Stderr(b)) => Message::Binary(prefixed(WS_STDERR, &b)),
                    Ok(ExecEvent::Exited { code, signal, timed_out }) => {
                        send_text(&mut socket, &WsServerMessage::Exit { exit_code: code, signal, timed_out }).await?;
                        let _ = socket.send(Message::Close(None)).await;
                        return Ok(());
                    }
                    Err(e) => {
                        let e = guest_err(&vm_name, e);
                        send_text(&mut socket, &WsServerMessage::Error { error: e.code(), message: e.message() }).await?;
                        let _ = socket.send(Message::Close(None)).await;
                        return Ok(());
                    }
                };
                socket.send(msg).await?;
            }
            incoming = socket.recv() => {
                // The client going away drops `session`, which cancels the process in the guest.
                let Some(Ok(msg)) = incoming else { return Ok(()) };
                let sent = match msg {
                    Message::Binary(data) if stdin_open => client.send_data(id, &data).await,
                    Message::Text(t) => match serde_json::from_str::<WsClientMessage>(&t) {
                        Ok(WsClientMessage::Eof) if stdin_open => {
                            stdin_open = false;
                            client.send_data(id, &[]).await
                        }
                        Ok(WsClientMessage::Resize { size }) => {
                            client.resize(id, PtySize { rows: size.rows, cols: size.cols }).await
                        }
                        Ok(WsClientMessage::Signal { signal }) => client.signal(id, signal).await,
                        _ => Ok(()),
                    },
                    Message::Close(_) => return Ok(()),
                    _ => Ok(()),
                };
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "exec websocket: cannot forward to guest");
                }
            }
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
    name: &str,
    path: &str,
    mode: u32,
    body: Body,
) -> Result<(), ApiError> {
    let (vm, guest) = service.guest(name, "copying files").await?;
    let (tx, rx) = mpsc::channel::<Result<Vec<u8>, String>>(8);
    let mut data = body.into_data_stream();
    let feed = async move {
        while let Some(chunk) = data.next().await {
            let item = chunk
                .map(|c| c.to_vec())
                .map_err(|e| format!("reading the upload failed: {e}"));
            let failed = item.is_err();
            // A closed channel: the guest side ended early, and its answer says why.
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    };
    let ((), put) = tokio::join!(feed, guest.put_file(path, mode, rx));
    put.map_err(|source| VmError::GuestFile {
        name: vm.name.clone(),
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

pub async fn get_file(service: &VmService, name: &str, path: &str) -> Result<Response, ApiError> {
    let (vm, guest) = service.guest(name, "copying files").await?;
    let (size, mode, rx) = guest
        .get_file(path)
        .await
        .map_err(|source| VmError::GuestFile {
            name: vm.name.clone(),
            path: path.to_owned(),
            source,
        })?;
    let body = stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item.map(Bytes::from).map_err(std::io::Error::other), rx))
    });
    // No Content-Length: files under /proc or /sys, or files that change while they are read,
    // do not have the size the guest reported, and a declared length would cut them short.
    let mut headers = octal_header(mode);
    headers.insert("x-hearth-file-size", size.into());
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
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

//! Host side of the guest agent protocol (`hearth-guest-proto`): one connection per running VM,
//! multiplexing exec sessions and file transfers by request id.
//!
//! The agent is untrusted input: frames are bounded by the decoder, unknown ids are dropped, and
//! nothing it sends chooses a host path.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hearth_guest_proto::{
    self as proto, Decoder, ErrorCode as GuestCode, Event, Frame, PtySize, Request, RequestId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the guest agent is not connected")]
    Disconnected,
    #[error("the guest agent did not answer within {0} s")]
    NotReady(u64),
    #[error("{message}")]
    Agent { code: GuestCode, message: String },
    #[error("the guest agent sent an unexpected {0}")]
    Unexpected(String),
    #[error("the guest did not answer in time")]
    Timeout,
}

type Sessions = Arc<Mutex<HashMap<RequestId, mpsc::Sender<Frame<Event>>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connection to one VM's agent.
#[derive(Debug)]
pub struct GuestClient {
    writer: mpsc::Sender<Vec<u8>>,
    sessions: Sessions,
    next_id: AtomicU64,
    /// `Some(boot_id)` once the agent said hello; `None` before. Closed when the connection ends.
    hello: watch::Receiver<Option<String>>,
    connected: watch::Receiver<bool>,
}

/// What an exec session delivers, in order.
#[derive(Debug)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
}

/// A running exec: read its events, feed its stdin.
#[derive(Debug)]
pub struct ExecSession {
    pub id: RequestId,
    client: Arc<GuestClient>,
    events: mpsc::Receiver<Frame<Event>>,
    finished: bool,
}

/// Parameters of an exec.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: bool,
    pub pty: Option<PtySize>,
    pub timeout: Option<Duration>,
}

impl GuestClient {
    /// Connects to the agent socket (retrying while the VMM creates it) and starts saying hello.
    pub async fn connect(
        socket: &Path,
        deadline: Duration,
    ) -> Result<Arc<GuestClient>, GuestError> {
        let start = tokio::time::Instant::now();
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(_) if start.elapsed() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(_) => return Err(GuestError::Disconnected),
            }
        };
        let (mut read, mut write) = stream.into_split();
        let (writer, mut frames) = mpsc::channel::<Vec<u8>>(64);
        let (hello_tx, hello) = watch::channel(None);
        let (connected_tx, connected) = watch::channel(true);
        let sessions: Sessions = Arc::default();
        tokio::spawn(async move {
            while let Some(frame) = frames.recv().await {
                if write.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let reader_sessions = sessions.clone();
        tokio::spawn(async move {
            let mut decoder = Decoder::<Event>::new();
            let mut buf = vec![0u8; 256 * 1024];
            'read: loop {
                let n = match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                decoder.extend(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            if let Event::Hello {
                                protocol, boot_id, ..
                            } = &frame.message
                            {
                                if *protocol != proto::PROTOCOL_VERSION {
                                    tracing::error!(
                                        protocol,
                                        "guest agent speaks another protocol"
                                    );
                                    break 'read;
                                }
                                let boot_id = boot_id.clone();
                                hello_tx.send_if_modified(|h| {
                                    let changed = h.as_deref() != Some(boot_id.as_str());
                                    *h = Some(boot_id);
                                    changed
                                });
                                continue;
                            }
                            let Some(id) = frame.message.id() else {
                                continue;
                            };
                            let tx = lock(&reader_sessions).get(&id).cloned();
                            if let Some(tx) = tx {
                                // The last frame of an exchange: an exit, a done, an error, or
                                // the empty data frame that ends a download.
                                let last = match frame.message {
                                    Event::Exited { .. }
                                    | Event::Done { .. }
                                    | Event::Error { .. } => true,
                                    Event::Data { .. } => frame.payload.is_empty(),
                                    _ => false,
                                };
                                // A receiver that went away is fine: its exchange was abandoned.
                                let _ = tx.send(frame).await;
                                if last {
                                    lock(&reader_sessions).remove(&id);
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => tracing::warn!(error = %e, "guest agent stream"),
                    }
                }
            }
            lock(&reader_sessions).clear();
            let _ = connected_tx.send(false);
        });
        let client = Arc::new(GuestClient {
            writer,
            sessions,
            next_id: AtomicU64::new(1),
            hello,
            connected,
        });
        // Say hello until the agent answers; the first one is queued until the guest opens its
        // port, the repeats cover a frame lost to a resync.
        let weak = Arc::downgrade(&client);
        tokio::spawn(async move {
            let hello = proto::encode(
                &Request::Hello {
                    protocol: proto::PROTOCOL_VERSION,
                },
                &[],
            )
            .unwrap_or_default();
            loop {
                let Some(c) = weak.upgrade() else { return };
                if c.hello.borrow().is_some() || !*c.connected.borrow() {
                    return;
                }
                if c.writer.send(hello.clone()).await.is_err() {
                    return;
                }
                drop(c);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(client)
    }

    /// Waits until the agent said hello; returns its boot id.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<String, GuestError> {
        let mut hello = self.hello.clone();
        let mut connected = self.connected.clone();
        let wait = async {
            loop {
                if let Some(boot) = hello.borrow().clone() {
                    return Ok(boot);
                }
                if !*connected.borrow() {
                    return Err(GuestError::Disconnected);
                }
                tokio::select! {
                    r = hello.changed() => if r.is_err() { return Err(GuestError::Disconnected) },
                    r = connected.changed() => if r.is_err() { return Err(GuestError::Disconnected) },
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| GuestError::NotReady(timeout.as_secs()))?
    }

    pub fn is_ready(&self) -> bool {
        *self.connected.borrow() && self.hello.borrow().is_some()
    }

    fn open(&self) -> (RequestId, mpsc::Receiver<Frame<Event>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(64);
        lock(&self.sessions).insert(id, tx);
        (id, rx)
    }

    async fn send(&self, request: &Request, payload: &[u8]) -> Result<(), GuestError> {
        if !self.is_ready() {
            return Err(GuestError::Disconnected);
        }
        let frame = proto::encode(request, payload)
            .map_err(|e| GuestError::Unexpected(format!("frame: {e}")))?;
        self.writer
            .send(frame)
            .await
            .map_err(|_| GuestError::Disconnected)
    }

    /// Sends `data` for an exec's stdin or a file upload, split into chunks. Empty = end.
    pub async fn send_data(&self, id: RequestId, data: &[u8]) -> Result<(), GuestError> {
        if data.is_empty() {
            return self.send(&Request::Data { id }, &[]).await;
        }
        for chunk in data.chunks(proto::CHUNK_LEN) {
            self.send(&Request::Data { id }, chunk).await?;
        }
        Ok(())
    }

    pub async fn exec(self: &Arc<Self>, spec: ExecSpec) -> Result<ExecSession, GuestError> {
        let (id, mut events) = self.open();
        let request = Request::Exec {
            id,
            argv: spec.argv,
            env: spec.env,
            cwd: spec.cwd,
            stdin: spec.stdin,
            pty: spec.pty,
            timeout_ms: spec
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        };
        if let Err(e) = self.send(&request, &[]).await {
            lock(&self.sessions).remove(&id);
            return Err(e);
        }
        match events.recv().await.map(|f| f.message) {
            Some(Event::Started { .. }) => Ok(ExecSession {
                id,
                client: self.clone(),
                events,
                finished: false,
            }),
            Some(Event::Error { code, message, .. }) => Err(GuestError::Agent { code, message }),
            Some(other) => Err(GuestError::Unexpected(format!("{other:?}"))),
            None => Err(GuestError::Disconnected),
        }
    }

    pub async fn resize(&self, id: RequestId, size: PtySize) -> Result<(), GuestError> {
        self.send(&Request::Resize { id, size }, &[]).await
    }

    pub async fn signal(&self, id: RequestId, signal: i32) -> Result<(), GuestError> {
        self.send(&Request::Signal { id, signal }, &[]).await
    }

    pub async fn cancel(&self, id: RequestId) {
        let _ = self.send(&Request::Cancel { id }, &[]).await;
        lock(&self.sessions).remove(&id);
    }

    /// Writes a file in the guest from a stream of chunks.
    pub async fn put_file(
        &self,
        path: &str,
        mode: u32,
        mut chunks: mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), GuestError> {
        let (id, mut events) = self.open();
        let result = async {
            self.send(
                &Request::PutFile {
                    id,
                    path: path.to_owned(),
                    mode,
                },
                &[],
            )
            .await?;
            while let Some(chunk) = chunks.recv().await {
                if !chunk.is_empty() {
                    self.send_data(id, &chunk).await?;
                }
                // An early error (say, permission denied) ends the upload at once.
                if let Ok(frame) = events.try_recv() {
                    return done_or_error(Some(frame));
                }
            }
            self.send_data(id, &[]).await?;
            done_or_error(events.recv().await)
        }
        .await;
        if result.is_err() {
            self.cancel(id).await;
        }
        result
    }

    /// Reads a file from the guest: its size and mode, then chunks (the receiver ends after the
    /// last one; an error mid-way arrives as `Err`).
    pub async fn get_file(
        &self,
        path: &str,
    ) -> Result<(u64, u32, mpsc::Receiver<Result<Vec<u8>, GuestError>>), GuestError> {
        let (id, mut events) = self.open();
        self.send(
            &Request::GetFile {
                id,
                path: path.to_owned(),
            },
            &[],
        )
        .await?;
        let (size, mode) = match events.recv().await.map(|f| f.message) {
            Some(Event::FileInfo { size, mode, .. }) => (size, mode),
            Some(Event::Error { code, message, .. }) => {
                return Err(GuestError::Agent { code, message });
            }
            Some(other) => return Err(GuestError::Unexpected(format!("{other:?}"))),
            None => return Err(GuestError::Disconnected),
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(frame) = events.recv().await {
                let item = match frame.message {
                    Event::Data { .. } if frame.payload.is_empty() => return,
                    Event::Data { .. } => Ok(frame.payload),
                    Event::Error { code, message, .. } => Err(GuestError::Agent { code, message }),
                    other => Err(GuestError::Unexpected(format!("{other:?}"))),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
            let _ = tx.send(Err(GuestError::Disconnected)).await;
        });
        Ok((size, mode, rx))
    }

    /// Asks the guest to power off; returns once the agent acknowledged.
    pub async fn shutdown(&self, action: proto::ShutdownAction) -> Result<(), GuestError> {
        let (id, mut events) = self.open();
        self.send(&Request::Shutdown { id, action }, &[]).await?;
        let answer = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .map_err(|_| GuestError::Timeout)?;
        done_or_error(answer)
    }
}

fn done_or_error(frame: Option<Frame<Event>>) -> Result<(), GuestError> {
    match frame.map(|f| f.message) {
        Some(Event::Done { .. }) => Ok(()),
        Some(Event::Error { code, message, .. }) => Err(GuestError::Agent { code, message }),
        Some(other) => Err(GuestError::Unexpected(format!("{other:?}"))),
        None => Err(GuestError::Disconnected),
    }
}

impl ExecSession {
    /// The next output or the exit; `Err(Disconnected)` when the VM went away.
    pub async fn next(&mut self) -> Result<ExecEvent, GuestError> {
        if self.finished {
            return Err(GuestError::Unexpected("read after exit".into()));
        }
        match self.events.recv().await {
            Some(Frame {
                message: Event::Output { stream, .. },
                payload,
            }) => Ok(match stream {
                proto::Stream::Stdout => ExecEvent::Stdout(payload),
                proto::Stream::Stderr => ExecEvent::Stderr(payload),
            }),
            Some(Frame {
                message:
                    Event::Exited {
                        code,
                        signal,
                        timed_out,
                        ..
                    },
                ..
            }) => {
                self.finished = true;
                Ok(ExecEvent::Exited {
                    code,
                    signal,
                    timed_out,
                })
            }
            Some(Frame {
                message: Event::Error { code, message, .. },
                ..
            }) => {
                self.finished = true;
                Err(GuestError::Agent { code, message })
            }
            Some(other) => Err(GuestError::Unexpected(format!("{:?}", other.message))),
            None => {
                self.finished = true;
                Err(GuestError::Disconnected)
            }
        }
    }

    pub fn client(&self) -> &Arc<GuestClient> {
        &self.client
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        if !self.finished {
            // The caller went away (say, an HTTP client hung up): kill the process in the guest.
            let client = self.client.clone();
            let id = self.id;
            tokio::spawn(async move { client.cancel(id).await });
        }
    }
}

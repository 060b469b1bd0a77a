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
    #[error(
        "the guest agent speaks protocol {found}, this hearthd speaks {known}; the VM's disk holds an older or newer agent"
    )]
    Protocol { found: u32, known: u32 },
    #[error("the transfer was interrupted: {0}")]
    Aborted(String),
    #[error("the reader fell too far behind the guest's output; the exchange was cancelled")]
    Overrun,
    #[error("the guest agent restarted; what it was doing for this request is gone")]
    AgentRestarted,
}

/// Why an exchange ended before its last message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndReason {
    Overrun,
    AgentRestarted,
}

/// Frames buffered per exchange before a consumer counts as stalled (64 KiB each at most).
const SESSION_BACKLOG: usize = 1024;
/// How long the agent may take to accept an exec or a download.
const FIRST_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The agent's protocol, when it is not ours.
    mismatch: Arc<Mutex<Option<u32>>>,
    /// Why exchanges ended early, for their consumers.
    ended: Arc<Mutex<HashMap<RequestId, EndReason>>>,
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
        let mismatch: Arc<Mutex<Option<u32>>> = Arc::default();
        let reader_mismatch = mismatch.clone();
        let ended: Arc<Mutex<HashMap<RequestId, EndReason>>> = Arc::default();
        let reader_ended = ended.clone();
        let reader_writer = writer.clone();
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
            let mut agent_instance: Option<String> = None;
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
                                protocol,
                                boot_id,
                                instance,
                                ..
                            } = &frame.message
                            {
                                if *protocol != proto::PROTOCOL_VERSION {
                                    *lock(&reader_mismatch) = Some(*protocol);
                                    break 'read;
                                }
                                if agent_instance
                                    .as_ref()
                                    .is_some_and(|known| known != instance)
                                {
                                    // A new agent process: the exchanges of the old one are gone.
                                    // Reasons first, then the senders go: a consumer that
                                    // wakes up on the closed channel must find its reason.
                                    let open: Vec<RequestId> =
                                        lock(&reader_sessions).keys().copied().collect();
                                    tracing::warn!(
                                        open = open.len(),
                                        "the guest agent restarted; failing its open exchanges"
                                    );
                                    lock(&reader_ended).extend(
                                        open.iter().map(|id| (*id, EndReason::AgentRestarted)),
                                    );
                                    lock(&reader_sessions).retain(|id, _| !open.contains(id));
                                }
                                agent_instance = Some(instance.clone());
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
                                // Never wait here: one stalled consumer must not stop the other
                                // exchanges of this VM. A consumer that fell a whole backlog
                                // behind loses its exchange; one that went away abandoned it.
                                match tx.try_send(frame) {
                                    Ok(()) if !last => {}
                                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {
                                        lock(&reader_sessions).remove(&id);
                                    }
                                    Err(mpsc::error::TrySendError::Full(_)) => {
                                        tracing::warn!(
                                            id,
                                            "exchange consumer stalled; cancelling it"
                                        );
                                        lock(&reader_ended).insert(id, EndReason::Overrun);
                                        lock(&reader_sessions).remove(&id);
                                        if let Ok(cancel) =
                                            proto::encode(&Request::Cancel { id }, &[])
                                        {
                                            let _ = reader_writer.try_send(cancel);
                                        }
                                    }
                                }
                            }
                        }
                        Ok(None) => break,
                        // Debug only: a guest could otherwise flood the host's log.
                        Err(e) => tracing::debug!(error = %e, "guest agent stream"),
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
            mismatch,
            ended,
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
                    return Err(self.disconnected());
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

    fn disconnected(&self) -> GuestError {
        match *lock(&self.mismatch) {
            Some(found) => GuestError::Protocol {
                found,
                known: proto::PROTOCOL_VERSION,
            },
            None => GuestError::Disconnected,
        }
    }

    /// Why the frames of exchange `id` stopped: its consumer stalled, or the agent went away.
    fn ended(&self, id: RequestId) -> GuestError {
        match lock(&self.ended).remove(&id) {
            Some(EndReason::Overrun) => GuestError::Overrun,
            Some(EndReason::AgentRestarted) => GuestError::AgentRestarted,
            None => self.disconnected(),
        }
    }

    pub fn is_ready(&self) -> bool {
        *self.connected.borrow() && self.hello.borrow().is_some()
    }

    fn open(self: &Arc<Self>) -> (Pending, mpsc::Receiver<Frame<Event>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SESSION_BACKLOG);
        lock(&self.sessions).insert(id, tx);
        let pending = Pending {
            client: self.clone(),
            id,
            finished: false,
        };
        (pending, rx)
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
        let (mut pending, mut events) = self.open();
        let id = pending.id;
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
        self.send(&request, &[]).await?;
        match first_reply(&mut events).await? {
            Event::Started { .. } => {
                // From here the session's own drop guard takes over.
                pending.finish();
                Ok(ExecSession {
                    id,
                    client: self.clone(),
                    events,
                    finished: false,
                })
            }
            Event::Error { code, message, .. } => {
                pending.finish();
                Err(GuestError::Agent { code, message })
            }
            other => Err(GuestError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn resize(&self, id: RequestId, size: PtySize) -> Result<(), GuestError> {
        self.send(&Request::Resize { id, size }, &[]).await
    }

    pub async fn signal(&self, id: RequestId, signal: i32) -> Result<(), GuestError> {
        self.send(&Request::Signal { id, signal }, &[]).await
    }

    pub async fn cancel(&self, id: RequestId) {
        lock(&self.sessions).remove(&id);
        let _ = self.send(&Request::Cancel { id }, &[]).await;
    }

    /// Writes a file in the guest from a stream of chunks. An `Err` chunk (the upload broke)
    /// cancels it: the guest discards what it received and the old file stays.
    pub async fn put_file(
        self: &Arc<Self>,
        path: &str,
        mode: u32,
        mut chunks: mpsc::Receiver<Result<Vec<u8>, String>>,
    ) -> Result<(), GuestError> {
        let (mut pending, mut events) = self.open();
        let id = pending.id;
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
            let chunk = chunk.map_err(GuestError::Aborted)?;
            if !chunk.is_empty() {
                self.send_data(id, &chunk).await?;
            }
            // An early error (say, permission denied) ends the upload at once.
            if let Ok(frame) = events.try_recv() {
                pending.finish();
                return done_or_error(Some(frame));
            }
        }
        self.send_data(id, &[]).await?;
        let answer = events.recv().await;
        if answer.is_some() {
            pending.finish();
        }
        done_or_error(answer)
    }

    /// Reads a file from the guest: its size and mode, then chunks (the receiver ends after the
    /// last one; an error mid-way arrives as `Err`). Dropping the receiver cancels the transfer.
    pub async fn get_file(
        self: &Arc<Self>,
        path: &str,
    ) -> Result<(u64, u32, mpsc::Receiver<Result<Vec<u8>, GuestError>>), GuestError> {
        let (mut pending, mut events) = self.open();
        self.send(
            &Request::GetFile {
                id: pending.id,
                path: path.to_owned(),
            },
            &[],
        )
        .await?;
        let (size, mode) = match first_reply(&mut events).await? {
            Event::FileInfo { size, mode, .. } => (size, mode),
            Event::Error { code, message, .. } => {
                pending.finish();
                return Err(GuestError::Agent { code, message });
            }
            other => return Err(GuestError::Unexpected(format!("{other:?}"))),
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(frame) = events.recv().await {
                let item = match frame.message {
                    Event::Data { .. } if frame.payload.is_empty() => {
                        pending.finish();
                        return;
                    }
                    Event::Data { .. } => Ok(frame.payload),
                    Event::Error { code, message, .. } => {
                        pending.finish();
                        Err(GuestError::Agent { code, message })
                    }
                    other => Err(GuestError::Unexpected(format!("{other:?}"))),
                };
                let stop = item.is_err();
                // A reader that went away drops `pending`, which cancels the transfer.
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
            let _ = tx.send(Err(pending.client.ended(pending.id))).await;
        });
        Ok((size, mode, rx))
    }

    /// Asks the guest to power off; returns once the agent acknowledged.
    pub async fn shutdown(
        self: &Arc<Self>,
        action: proto::ShutdownAction,
    ) -> Result<(), GuestError> {
        let (mut pending, mut events) = self.open();
        self.send(
            &Request::Shutdown {
                id: pending.id,
                action,
            },
            &[],
        )
        .await?;
        let answer = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .map_err(|_| GuestError::Timeout)?;
        if answer.is_some() {
            pending.finish();
        }
        done_or_error(answer)
    }
}

/// An open exchange; dropped before it finished, it is cancelled in the guest and forgotten here.
#[derive(Debug)]
struct Pending {
    client: Arc<GuestClient>,
    id: RequestId,
    finished: bool,
}

impl Pending {
    /// The exchange reached its last message: nothing to cancel.
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // A finished exchange was removed by the reader at its last frame, or handed over (an
        // exec's session lives on in its ExecSession).
        if !self.finished {
            lock(&self.client.sessions).remove(&self.id);
            let client = self.client.clone();
            let id = self.id;
            tokio::spawn(async move { client.cancel(id).await });
        }
    }
}

/// The first answer of an exchange, within [`FIRST_REPLY_TIMEOUT`].
async fn first_reply(events: &mut mpsc::Receiver<Frame<Event>>) -> Result<Event, GuestError> {
    match tokio::time::timeout(FIRST_REPLY_TIMEOUT, events.recv()).await {
        Ok(Some(frame)) => Ok(frame.message),
        Ok(None) => Err(GuestError::Disconnected),
        Err(_) => Err(GuestError::Timeout),
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
                Err(self.client.ended(self.id))
            }
        }
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

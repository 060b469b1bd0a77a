//! Host side of the guest agent protocol (`hearth-guest-proto`): one connection per running VM,
//! multiplexing exec sessions and file transfers by request id.
//!
//! The agent is untrusted input: frames are bounded by the decoder, each exchange's backlog is
//! bounded in bytes ([`BACKLOG_BYTES`]), unknown ids and unknown message types are dropped, and
//! nothing it sends chooses a host path.
//!
//! `hello` negotiates: the agent's version range must meet ours (the highest common version is
//! used) and features both sides announce are used. With the `credit` feature, data for the guest
//! (stdin, uploads) is sent only within the window the agent granted for its exchange:
//! [`GuestClient::send_data`] waits for credit, so neither side buffers it without bound.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hearth_guest_proto::{
    self as proto, Decoder, ErrorCode as GuestCode, Event, Frame, NoCommonVersion, PtySize,
    Request, RequestId, VersionRange,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, watch};

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
        "the guest agent speaks protocol {agent}, this hearthd speaks {host}: no version in common; the VM runs an agent older or newer than any this hearthd supports"
    )]
    Protocol {
        agent: VersionRange,
        host: VersionRange,
    },
    #[error("the transfer was interrupted: {0}")]
    Aborted(String),
    #[error(
        "the reader fell more than {} MiB behind the guest's output; the exchange was cancelled",
        BACKLOG_BYTES >> 20
    )]
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

/// Bytes of guest frames one exchange may hold, unread by its consumer, before the consumer
/// counts as stalled and the exchange is cancelled. Each frame counts its payload plus
/// [`FRAME_COST`].
const BACKLOG_BYTES: usize = 16 * 1024 * 1024;
/// What a buffered frame costs beyond its payload, so a flood of empty frames is bounded too.
const FRAME_COST: usize = 256;
/// Most credit an exchange may hold unused; an agent granting more is not believed beyond it.
const CREDIT_CAP: usize = 64 * 1024 * 1024;
/// How long the agent may take to accept an exec or a download.
const FIRST_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

type Sessions = Arc<Mutex<HashMap<RequestId, Inbox>>>;

fn cost(frame: &Frame<Event>) -> usize {
    frame.payload.len() + FRAME_COST
}

/// The reader's end of one open exchange.
#[derive(Debug)]
struct Inbox {
    tx: mpsc::UnboundedSender<Frame<Event>>,
    /// Bytes queued and not yet taken by the consumer (see [`cost`]).
    held: Arc<AtomicUsize>,
    /// Bytes of data the agent let us send (one permit a byte); `None` when the exchange takes no
    /// data or the agent has no credit windows. Closed when the exchange ends.
    credit: Option<Arc<Semaphore>>,
}

/// Why a frame could not be queued.
enum Refused {
    /// The backlog would go over [`BACKLOG_BYTES`].
    Full,
    /// The consumer went away.
    Closed,
}

impl Inbox {
    /// Queues a frame unless that would put the backlog over its bound.
    fn push(&self, frame: Frame<Event>) -> Result<(), Refused> {
        let cost = cost(&frame);
        if self.held.fetch_add(cost, Ordering::AcqRel) + cost > BACKLOG_BYTES {
            self.held.fetch_sub(cost, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        self.tx.send(frame).map_err(|_| {
            self.held.fetch_sub(cost, Ordering::AcqRel);
            Refused::Closed
        })
    }

    /// Adds credit the agent granted, up to [`CREDIT_CAP`] unused.
    fn grant(&self, bytes: u64) {
        if let Some(credit) = &self.credit {
            let room = CREDIT_CAP.saturating_sub(credit.available_permits());
            credit.add_permits(usize::try_from(bytes).unwrap_or(usize::MAX).min(room));
        }
    }
}

impl Drop for Inbox {
    /// The exchange is over (its last frame, a cancel, an overrun, a lost connection): a sender
    /// waiting for credit stops waiting.
    fn drop(&mut self) {
        if let Some(credit) = &self.credit {
            credit.close();
        }
    }
}

/// The consumer's end of one exchange: its frames, in order.
#[derive(Debug)]
struct Backlog {
    rx: mpsc::UnboundedReceiver<Frame<Event>>,
    held: Arc<AtomicUsize>,
}

impl Backlog {
    async fn recv(&mut self) -> Option<Frame<Event>> {
        let frame = self.rx.recv().await?;
        self.held.fetch_sub(cost(&frame), Ordering::AcqRel);
        Some(frame)
    }

    fn try_recv(&mut self) -> Option<Frame<Event>> {
        let frame = self.rx.try_recv().ok()?;
        self.held.fetch_sub(cost(&frame), Ordering::AcqRel);
        Some(frame)
    }
}

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
    /// The agent's version range, when it has nothing in common with ours.
    mismatch: Arc<Mutex<Option<NoCommonVersion>>>,
    /// The optional features both sides announced, from the agent's latest `hello`.
    features: Arc<Mutex<Vec<&'static str>>>,
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
    events: Backlog,
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
        let mismatch: Arc<Mutex<Option<NoCommonVersion>>> = Arc::default();
        let reader_mismatch = mismatch.clone();
        let features: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let reader_features = features.clone();
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
                                protocol_min,
                                features,
                                agent_version,
                                boot_id,
                                instance,
                            } = &frame.message
                            {
                                let agent = VersionRange::announced(*protocol, *protocol_min);
                                let version = match proto::negotiate(VersionRange::OURS, agent) {
                                    Ok(version) => version,
                                    Err(err) => {
                                        *lock(&reader_mismatch) = Some(err);
                                        break 'read;
                                    }
                                };
                                let common = proto::common_features(features);
                                if agent_instance.as_ref() != Some(instance) {
                                    tracing::debug!(
                                        version,
                                        features = ?common,
                                        agent_version = %agent_version,
                                        "guest agent ready"
                                    );
                                }
                                *lock(&reader_features) = common;
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
                                    // The new agent has not heard our hello (our features).
                                    if let Ok(hello) = proto::encode(&Request::hello(), &[]) {
                                        let _ = reader_writer.try_send(hello);
                                    }
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
                            if let Event::Credit { bytes, .. } = frame.message {
                                if let Some(inbox) = lock(&reader_sessions).get(&id) {
                                    inbox.grant(bytes);
                                }
                                continue;
                            }
                            // The last frame of an exchange: an exit, a done, an error, or
                            // the empty data frame that ends a download.
                            let last = match frame.message {
                                Event::Exited { .. } | Event::Done { .. } | Event::Error { .. } => {
                                    true
                                }
                                Event::Data { .. } => frame.payload.is_empty(),
                                _ => false,
                            };
                            // Never wait here: one stalled consumer must not stop the other
                            // exchanges of this VM. A consumer that fell a whole backlog
                            // behind loses its exchange; one that went away abandoned it.
                            let pushed = lock(&reader_sessions).get(&id).map(|i| i.push(frame));
                            if let Some(pushed) = pushed {
                                match pushed {
                                    Ok(()) if !last => {}
                                    Ok(()) | Err(Refused::Closed) => {
                                        lock(&reader_sessions).remove(&id);
                                    }
                                    Err(Refused::Full) => {
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
            features,
            ended,
        });
        // Say hello until the agent answers; the first one is queued until the guest opens its
        // port, the repeats cover a frame lost to a resync.
        let weak = Arc::downgrade(&client);
        tokio::spawn(async move {
            let hello = proto::encode(&Request::hello(), &[]).unwrap_or_default();
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
                // A closed channel means the reader ended: say why (a protocol mismatch, say).
                tokio::select! {
                    r = hello.changed() => if r.is_err() { return Err(self.disconnected()) },
                    r = connected.changed() => if r.is_err() { return Err(self.disconnected()) },
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| GuestError::NotReady(timeout.as_secs()))?
    }

    fn disconnected(&self) -> GuestError {
        match &*lock(&self.mismatch) {
            Some(NoCommonVersion { ours, theirs }) => GuestError::Protocol {
                agent: *theirs,
                host: *ours,
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

    /// Whether both sides announced `feature` in their hellos.
    fn uses(&self, feature: &str) -> bool {
        lock(&self.features).contains(&feature)
    }

    /// Opens an exchange; `takes_data` when it will send `data` (stdin, an upload).
    fn open(self: &Arc<Self>, takes_data: bool) -> (Pending, Backlog) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(AtomicUsize::new(0));
        let credit =
            (takes_data && self.uses(proto::FEATURE_CREDIT)).then(|| Arc::new(Semaphore::new(0)));
        let inbox = Inbox {
            tx,
            held: held.clone(),
            credit,
        };
        lock(&self.sessions).insert(id, inbox);
        let pending = Pending {
            client: self.clone(),
            id,
            finished: false,
        };
        (pending, Backlog { rx, held })
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
    ///
    /// With an agent that grants credit, each chunk waits until the agent has room for it: a
    /// process that does not read its stdin makes this wait, not the agent buffer. Once the
    /// exchange has ended (the process exited, the upload failed), the rest is dropped, as a
    /// closed pipe drops it, and its events say how it ended.
    pub async fn send_data(&self, id: RequestId, data: &[u8]) -> Result<(), GuestError> {
        if data.is_empty() {
            return self.send(&Request::Data { id }, &[]).await;
        }
        let credit = lock(&self.sessions)
            .get(&id)
            .and_then(|inbox| inbox.credit.clone());
        for chunk in data.chunks(proto::CHUNK_LEN) {
            if let Some(credit) = &credit {
                // A chunk is at most CHUNK_LEN (64 KiB) bytes.
                let bytes = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                match credit.acquire_many(bytes).await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return Ok(()),
                }
            }
            self.send(&Request::Data { id }, chunk).await?;
        }
        Ok(())
    }

    pub async fn exec(self: &Arc<Self>, spec: ExecSpec) -> Result<ExecSession, GuestError> {
        let (mut pending, mut events) = self.open(spec.stdin);
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
        let (mut pending, mut events) = self.open(true);
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
            if let Some(frame) = events.try_recv() {
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
    ///
    /// With an agent that has credit windows the download is windowed: the agent sends
    /// [`proto::DOWNLOAD_WINDOW`] bytes ahead and more as the receiver takes chunks, so a slow
    /// receiver slows the transfer instead of overrunning the backlog.
    pub async fn get_file(
        self: &Arc<Self>,
        path: &str,
    ) -> Result<(u64, u32, mpsc::Receiver<Result<Vec<u8>, GuestError>>), GuestError> {
        let (mut pending, mut events) = self.open(false);
        let window = self
            .uses(proto::FEATURE_CREDIT)
            .then_some(proto::DOWNLOAD_WINDOW);
        self.send(
            &Request::GetFile {
                id: pending.id,
                path: path.to_owned(),
                window,
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
                let taken = item.as_ref().map_or(0, Vec::len);
                // A reader that went away drops `pending`, which cancels the transfer.
                if tx.send(item).await.is_err() || stop {
                    return;
                }
                if window.is_some() {
                    // The chunk left our backlog for the receiver: the agent may send another.
                    let credit = Request::Credit {
                        id: pending.id,
                        bytes: taken as u64,
                    };
                    let _ = pending.client.send(&credit, &[]).await;
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
        let (mut pending, mut events) = self.open(false);
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
async fn first_reply(events: &mut Backlog) -> Result<Event, GuestError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::net::UnixListener;

    /// A scripted agent on the other end of a unix socket: reads the host's requests, sends
    /// whatever frames the test wants, well-formed or not.
    struct FakeAgent {
        stream: UnixStream,
        decoder: Decoder<Request>,
    }

    impl FakeAgent {
        async fn recv(&mut self) -> Frame<Request> {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if let Ok(Some(frame)) = self.decoder.next_frame() {
                    return frame;
                }
                let n = self.stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the host closed the connection");
                self.decoder.extend(&buf[..n]);
            }
        }

        /// The next request that is not a (repeated) hello.
        async fn request(&mut self) -> Frame<Request> {
            loop {
                let frame = self.recv().await;
                if !matches!(frame.message, Request::Hello { .. }) {
                    return frame;
                }
            }
        }

        async fn send(&mut self, message: serde_json::Value, payload: &[u8]) {
            let frame = proto::encode(&message, payload).unwrap();
            self.stream.write_all(&frame).await.unwrap();
        }

        /// Answers the host's hello with `hello` (a JSON object, so old and odd agents can be
        /// played too).
        async fn hello(&mut self, mut hello: serde_json::Value) {
            assert!(matches!(self.recv().await.message, Request::Hello { .. }));
            hello["type"] = json!("hello");
            hello["agent_version"] = json!("test");
            hello["boot_id"] = json!("boot");
            self.send(hello, &[]).await;
        }

        /// Takes an exec request and says it started; returns its id.
        async fn accept_exec(&mut self) -> RequestId {
            let frame = self.request().await;
            let Request::Exec { id, .. } = frame.message else {
                panic!("expected exec, got {:?}", frame.message)
            };
            self.send(json!({"type": "started", "id": id, "pid": 42}), &[])
                .await;
            id
        }
    }

    /// A client connected to a fake agent that answered hello with `hello`.
    async fn pair(hello: serde_json::Value) -> (Arc<GuestClient>, FakeAgent, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let client = GuestClient::connect(&socket, Duration::from_secs(5))
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut agent = FakeAgent {
            stream,
            decoder: Decoder::new(),
        };
        agent.hello(hello).await;
        (client, agent, dir)
    }

    fn current() -> serde_json::Value {
        json!({"protocol": 1, "protocol_min": 1, "features": ["credit"], "instance": "a"})
    }

    fn exec_spec(stdin: bool) -> ExecSpec {
        ExecSpec {
            argv: vec!["cat".into()],
            stdin,
            ..ExecSpec::default()
        }
    }

    /// An agent that floods one exchange whose consumer does not read: the host holds at most
    /// the byte bound of it, cancels that exchange alone, and its consumer learns why.
    #[tokio::test]
    async fn a_flooding_agent_is_held_to_the_byte_bound() {
        let (client, mut agent, _dir) = pair(current()).await;
        client.wait_ready(Duration::from_secs(5)).await.unwrap();
        let exec = tokio::spawn({
            let client = client.clone();
            async move { client.exec(exec_spec(false)).await }
        });
        let id = agent.accept_exec().await;
        let mut session = exec.await.unwrap().unwrap();
        // 48 frames of the largest size the decoder takes: 48 MiB, three times the bound.
        let big = vec![b'x'; proto::MAX_PAYLOAD_LEN];
        for _ in 0..48 {
            agent
                .send(
                    json!({"type": "output", "id": id, "stream": "stdout"}),
                    &big,
                )
                .await;
        }
        agent.send(json!({"type": "done", "id": 999}), &[]).await;
        let cancel = tokio::time::timeout(Duration::from_secs(10), agent.request())
            .await
            .expect("the host never cancelled the flooded exchange");
        assert_eq!(cancel.message, Request::Cancel { id });
        let held = session.events.held.load(Ordering::Acquire);
        assert!(held <= BACKLOG_BYTES, "the host holds {held} bytes");
        let mut read = 0;
        let err = loop {
            match session.next().await {
                Ok(ExecEvent::Stdout(bytes)) => read += bytes.len(),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(err) => break err,
            }
        };
        assert!(matches!(err, GuestError::Overrun), "{err}");
        assert!(read <= BACKLOG_BYTES, "{read} bytes were buffered");
        assert!(read >= BACKLOG_BYTES / 2, "only {read} bytes were buffered");
        // The connection itself is fine.
        let ping = tokio::spawn({
            let client = client.clone();
            async move { client.exec(exec_spec(false)).await.map(|s| s.id) }
        });
        agent.accept_exec().await;
        assert!(ping.await.unwrap().is_ok());
    }

    /// Data for the guest goes out only within the credit the agent granted, resumes when it
    /// grants more, and stops waiting when the exchange ends.
    #[tokio::test]
    async fn send_data_keeps_to_the_credit_window() {
        let (client, mut agent, _dir) = pair(current()).await;
        client.wait_ready(Duration::from_secs(5)).await.unwrap();
        let exec = tokio::spawn({
            let client = client.clone();
            async move { client.exec(exec_spec(true)).await }
        });
        let id = agent.accept_exec().await;
        let session = exec.await.unwrap().unwrap();
        agent
            .send(json!({"type": "credit", "id": id, "bytes": 100_000}), &[])
            .await;
        let data = vec![7u8; 1 << 20];
        let send = tokio::spawn({
            let client = client.clone();
            async move { client.send_data(id, &data).await }
        });
        let mut got = 0;
        while got < proto::CHUNK_LEN {
            let frame = agent.request().await;
            assert_eq!(frame.message, Request::Data { id });
            got += frame.payload.len();
        }
        // Nothing more comes while the window is used up.
        let more = tokio::time::timeout(Duration::from_millis(300), agent.request()).await;
        assert!(
            more.is_err(),
            "sent beyond the window: {:?}",
            more.map(|f| f.message)
        );
        assert!(!send.is_finished());
        agent
            .send(json!({"type": "credit", "id": id, "bytes": 1 << 20}), &[])
            .await;
        while got < 1 << 20 {
            got += agent.request().await.payload.len();
        }
        assert_eq!(got, 1 << 20);
        send.await.unwrap().unwrap();

        // Blocked on credit when the process exits: the send ends, the data is dropped.
        let send = tokio::spawn({
            let client = client.clone();
            async move { client.send_data(id, &[1u8; 300_000]).await }
        });
        let _ = agent.request().await;
        agent
            .send(
                json!({"type": "exited", "id": id, "code": 0, "signal": null, "timed_out": false}),
                &[],
            )
            .await;
        tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .expect("send_data still waits after the exchange ended")
            .unwrap()
            .unwrap();
        drop(session);
    }

    /// A download from an agent with windows is windowed: the agent may send one window ahead,
    /// and the host gives credit back only as chunks leave its backlog for the receiver, so a
    /// receiver that does not read stops the transfer without an overrun.
    #[tokio::test]
    async fn a_download_is_windowed_and_a_slow_reader_slows_it() {
        let (client, mut agent, _dir) = pair(current()).await;
        client.wait_ready(Duration::from_secs(5)).await.unwrap();
        let get = tokio::spawn({
            let client = client.clone();
            async move { client.get_file("/big").await }
        });
        let frame = agent.request().await;
        let Request::GetFile { id, window, .. } = frame.message else {
            panic!("expected get_file, got {:?}", frame.message)
        };
        assert_eq!(window, Some(proto::DOWNLOAD_WINDOW));
        let total: usize = 8 << 20;
        agent
            .send(
                json!({"type": "file_info", "id": id, "size": total, "mode": 420}),
                &[],
            )
            .await;
        let (_, _, mut chunks) = get.await.unwrap().unwrap();
        let chunk = vec![9u8; proto::CHUNK_LEN];
        let mut credit = proto::DOWNLOAD_WINDOW;
        let mut sent = 0usize;
        // Send while there is credit, for as long as credit keeps coming: nobody reads.
        loop {
            while credit >= chunk.len() as u64 && sent < total {
                agent.send(json!({"type": "data", "id": id}), &chunk).await;
                credit -= chunk.len() as u64;
                sent += chunk.len();
            }
            match tokio::time::timeout(Duration::from_millis(300), agent.request()).await {
                Ok(frame) => match frame.message {
                    Request::Credit { bytes, .. } => credit += bytes,
                    other => panic!("unexpected {other:?}"),
                },
                Err(_) => break,
            }
        }
        // One window plus the receiver's channel (16 chunks), no more.
        let ahead = usize::try_from(proto::DOWNLOAD_WINDOW).unwrap() + 16 * proto::CHUNK_LEN;
        assert!(
            sent <= ahead,
            "{sent} bytes sent to a receiver that reads nothing"
        );
        assert!(sent < total);
        // The receiver reads: credit flows again and the whole file arrives.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            while let Some(item) = chunks.recv().await {
                got += item.unwrap().len();
            }
            got
        });
        while sent < total {
            while credit == 0 {
                match agent.request().await.message {
                    Request::Credit { bytes, .. } => credit += bytes,
                    other => panic!("unexpected {other:?}"),
                }
            }
            agent.send(json!({"type": "data", "id": id}), &chunk).await;
            credit = credit.saturating_sub(chunk.len() as u64);
            sent += chunk.len();
        }
        agent.send(json!({"type": "data", "id": id}), &[]).await;
        assert_eq!(reader.await.unwrap(), total);
    }

    /// A version-1 agent (no range, no features) is accepted, and data goes to it without waiting
    /// for credit it will never grant.
    #[tokio::test]
    async fn an_agent_without_features_is_accepted_and_sent_to_freely() {
        let (client, mut agent, _dir) = pair(json!({"protocol": 1})).await;
        client.wait_ready(Duration::from_secs(5)).await.unwrap();
        let exec = tokio::spawn({
            let client = client.clone();
            async move { client.exec(exec_spec(true)).await }
        });
        let id = agent.accept_exec().await;
        let _session = exec.await.unwrap().unwrap();
        let send = client.send_data(id, &[3u8; 1 << 20]);
        tokio::time::timeout(Duration::from_secs(5), send)
            .await
            .expect("send_data waited for credit from an agent without windows")
            .unwrap();
    }

    /// Ranges that overlap are accepted; disjoint ones are refused naming both.
    #[tokio::test]
    async fn negotiation_accepts_overlap_and_names_both_ranges_otherwise() {
        let (client, _agent, _dir) =
            pair(json!({"protocol": 3, "protocol_min": 1, "features": ["credit", "later"]})).await;
        client.wait_ready(Duration::from_secs(5)).await.unwrap();
        assert!(client.uses(proto::FEATURE_CREDIT));

        let (client, _agent, _dir) = pair(json!({"protocol": 6, "protocol_min": 5})).await;
        let err = client.wait_ready(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, GuestError::Protocol { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("protocol 5 to 6, this hearthd speaks 1:"),
            "{message}"
        );
    }

    /// A restarted agent (new `instance`) has not heard our hello: it gets one, so it learns
    /// our features (and holds us to our windows).
    #[tokio::test]
    async fn a_restarted_agent_hears_our_hello_again() {
        let (client, mut agent, _dir) = pair(current()).await;
        client.wait_ready(Duration::from_secs(5)).await.unwrap();
        let mut restarted = current();
        restarted["type"] = json!("hello");
        restarted["instance"] = json!("b");
        restarted["agent_version"] = json!("test");
        restarted["boot_id"] = json!("boot");
        agent.send(restarted, &[]).await;
        let hello = tokio::time::timeout(Duration::from_secs(5), agent.recv())
            .await
            .expect("no hello for the restarted agent");
        assert_eq!(hello.message, Request::hello());
    }

    /// Frames of a type this hearthd does not know (a newer agent's) are skipped whole and the
    /// connection goes on.
    #[tokio::test]
    async fn unknown_events_are_skipped_and_the_connection_goes_on() {
        let (client, mut agent, _dir) = pair(current()).await;
        client.wait_ready(Duration::from_secs(5)).await.unwrap();
        let exec = tokio::spawn({
            let client = client.clone();
            async move { client.exec(exec_spec(false)).await }
        });
        let Request::Exec { id, .. } = agent.request().await.message else {
            panic!("expected exec")
        };
        // Its payload holds the magic, as if a frame started inside it.
        agent
            .send(json!({"type": "telemetry", "id": id}), b"HRTH\x05\0\0\0")
            .await;
        agent
            .send(json!({"type": "started", "id": id, "pid": 1}), &[])
            .await;
        agent
            .send(
                json!({"type": "output", "id": id, "stream": "stdout"}),
                b"hi",
            )
            .await;
        let mut session = exec.await.unwrap().unwrap();
        assert!(matches!(session.next().await, Ok(ExecEvent::Stdout(b)) if b == b"hi"));
        assert!(client.is_ready());
    }
}

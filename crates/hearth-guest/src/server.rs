//! Dispatch: decodes requests and routes them to their exchanges.
//!
//! Every exchange with an id (exec, put_file, get_file) is one task, registered in the
//! [`Registry`] under its id while it is open. The dispatcher only routes (stdin and file data,
//! signals, resizes, cancels) and never waits on an exchange, so a slow one holds up nobody.
//!
//! An exchange leaves the registry *before* its last frame is queued, so a host that reuses the
//! id right after that frame never meets a stale `duplicate_id`. Removing an entry is also how an
//! exchange is abandoned: its task sees its channels close and stops without answering.
//!
//! Data the host sends for an exchange (stdin, uploads) flows through an [`Inflow`]: the agent
//! grants the host a window of [`DATA_WINDOW`] bytes and gives bytes back as the exchange writes
//! them out, so with a host that honours windows (feature `credit`) an exchange never holds more
//! than one window, however fast the host sends or however slowly the process reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hearth_guest_proto::{
    DATA_WINDOW, DecodeError, Decoder, ErrorCode, Event, FEATURE_CREDIT, FEATURES, Frame,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Request, RequestId, ShutdownAction, VersionRange,
    negotiate,
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::Role;
use crate::exec;
use crate::files;
use crate::transport::{Inbound, Link, Outbox};

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The peer closed the transport for good.
    PeerClosed,
    /// The host asked for a shutdown; `done` has been written.
    Shutdown(ShutdownAction),
}

/// Reads the kernel's boot id, or makes up a random one when it cannot be read.
pub fn boot_id() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => random_id(),
    }
}

fn random_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The protocol's error code for an OS error.
pub fn io_error_code(err: &std::io::Error) -> ErrorCode {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        ErrorKind::InvalidInput | ErrorKind::IsADirectory | ErrorKind::NotADirectory => {
            ErrorCode::InvalidRequest
        }
        _ => ErrorCode::Io,
    }
}

/// An error and its causes on one line, for the `message` of an `error` event.
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Serves requests until the peer closes the transport or asks for a shutdown.
pub async fn serve(
    mut inbound: mpsc::Receiver<Inbound>,
    link: Link,
    boot_id: String,
    role: Role,
) -> Outcome {
    let mut server = Server {
        link,
        registry: Registry::default(),
        boot_id,
        instance: random_id(),
        decoder: Decoder::new(),
        host_credit: false,
    };
    if role == Role::Init {
        // Announce this agent: a host still holding exchanges of a previous agent process (this
        // one was restarted by PID 1) learns that they are gone.
        let hello = server.hello();
        server.link.outbox().send(&hello, &[]).await;
    }
    while let Some(message) = inbound.recv().await {
        match message {
            Inbound::Bytes(bytes) => {
                server.decoder.extend(&bytes);
                loop {
                    match server.decoder.next_frame() {
                        Ok(Some(frame)) => {
                            if let Some(outcome) = server.handle(frame).await {
                                if role == Role::Standalone {
                                    // In a VM the shutdown sequence stops everything gently.
                                    server.forget_all("shutdown");
                                }
                                return outcome;
                            }
                        }
                        Ok(None) => break,
                        Err(err) => server.rejected(err).await,
                    }
                }
            }
            Inbound::Disconnected => {
                server.decoder.reset();
                server.host_credit = false;
                server.forget_all("the host disconnected");
            }
            Inbound::Closed => break,
        }
    }
    server.forget_all("the peer closed the connection");
    Outcome::PeerClosed
}

struct Server {
    link: Link,
    registry: Registry,
    boot_id: String,
    /// Random per agent process.
    instance: String,
    decoder: Decoder<Request>,
    /// The host of this connection announced credit windows in its `hello`: it must keep to them.
    host_credit: bool,
}

impl Server {
    fn hello(&self) -> Event {
        Event::Hello {
            protocol: PROTOCOL_VERSION,
            protocol_min: Some(MIN_PROTOCOL_VERSION),
            features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: self.boot_id.clone(),
            instance: self.instance.clone(),
        }
    }

    /// A frame the decoder threw away. A whole frame of an unknown type (a newer host's request)
    /// or with wrong fields is answered at once, so the host is never left waiting for it.
    async fn rejected(&mut self, err: DecodeError) {
        match err {
            DecodeError::UnknownType { kind, id: Some(id) } => {
                let message = format!("this agent does not know the request type `{kind}`");
                debug!("request {id}: {message}");
                self.fail_exchange(id, ErrorCode::UnknownRequest, message)
                    .await;
            }
            DecodeError::InvalidFields {
                kind,
                id: Some(id),
                reason,
            } => {
                let message = format!("invalid `{kind}` request: {reason}");
                debug!("request {id}: {message}");
                self.fail_exchange(id, ErrorCode::InvalidRequest, message)
                    .await;
            }
            err => log!("{err}"),
        }
    }

    /// Ends exchange `id` with an error: forgets it if it is open (killing its process), then
    /// sends the error, which is its last message.
    async fn fail_exchange(&mut self, id: RequestId, code: ErrorCode, message: String) {
        let entry = self.registry.lock().entries.remove(&id);
        if let Some(Entry {
            exchange: Exchange::Exec(handle),
            ..
        }) = entry
        {
            handle.kill_now();
        }
        let error = Event::Error { id, code, message };
        self.link.outbox().send(&error, &[]).await;
    }

    /// Handles one request; returns an outcome when serving must stop.
    async fn handle(&mut self, frame: Frame<Request>) -> Option<Outcome> {
        let Frame { message, payload } = frame;
        match message {
            Request::Hello {
                protocol,
                protocol_min,
                features,
            } => {
                let host = VersionRange::announced(protocol, protocol_min);
                match negotiate(VersionRange::OURS, host) {
                    Ok(_) => self.host_credit = features.iter().any(|f| f == FEATURE_CREDIT),
                    Err(err) => {
                        // The host refuses us too; say why on the console.
                        log!("the host's hello: {err}");
                        self.host_credit = false;
                    }
                }
                // A host repeats hello until it is answered, and a late repeat may follow its first
                // requests: so a hello only gets an answer and never closes open exchanges.
                let hello = self.hello();
                self.link.outbox().send(&hello, &[]).await;
            }
            Request::Exec {
                id,
                argv,
                env,
                cwd,
                stdin,
                pty,
                timeout_ms,
            } => {
                debug!("exec {id}: {argv:?}");
                let spec = exec::Spec {
                    argv,
                    env,
                    cwd,
                    stdin,
                    pty,
                    timeout_ms,
                };
                let (handle, parts) = exec::channels(stdin.then(|| inflow(id, self.link.outbox())));
                if let Some(ctx) = self.open(id, Exchange::Exec(handle)).await {
                    tokio::spawn(exec::run(ctx, spec, parts));
                }
            }
            Request::PutFile { id, path, mode } => {
                debug!("put_file {id}: {path}");
                let (data_tx, data_rx) = inflow(id, self.link.outbox());
                if let Some(ctx) = self.open(id, Exchange::Put(data_tx)).await {
                    tokio::spawn(files::put(ctx, path, mode, data_rx));
                }
            }
            Request::GetFile { id, path, window } => {
                debug!("get_file {id}: {path}");
                let (cancel_tx, cancel_rx) = oneshot::channel();
                let credit = window.map(|bytes| {
                    let credit = Arc::new(Semaphore::new(0));
                    add_credit(&credit, bytes);
                    credit
                });
                let get = Exchange::Get {
                    _cancel: cancel_tx,
                    credit: credit.clone(),
                };
                if let Some(ctx) = self.open(id, get).await {
                    tokio::spawn(files::get(ctx, path, cancel_rx, credit));
                }
            }
            Request::Credit { id, bytes } => {
                match self.registry.lock().entries.get(&id).map(|e| &e.exchange) {
                    Some(Exchange::Get {
                        credit: Some(credit),
                        ..
                    }) => add_credit(credit, bytes),
                    _ => debug!("credit for {id}, which is not a windowed download"),
                }
            }
            Request::Data { id } => {
                if let Err(err) = self.data(id, payload) {
                    log!("request {id}: {err}");
                    self.fail_exchange(id, ErrorCode::InvalidRequest, err.to_string())
                        .await;
                }
            }
            Request::Resize { id, size } => {
                self.control(id, exec::Control::Resize(size));
            }
            Request::Signal { id, signal } => {
                self.control(id, exec::Control::Signal(signal));
            }
            Request::Cancel { id } => self.cancel(id),
            Request::Ping { id } => {
                self.link.outbox().send(&Event::Done { id }, &[]).await;
            }
            Request::Shutdown { id, action } => {
                log!("shutdown ({action:?}) requested");
                self.link
                    .outbox()
                    .send_and_flush(&Event::Done { id }, &[])
                    .await;
                return Some(Outcome::Shutdown(action));
            }
        }
        None
    }

    /// Registers a new exchange, or answers `duplicate_id` when the id is still open.
    async fn open(&mut self, id: RequestId, exchange: Exchange) -> Option<Ctx> {
        let out = self.link.outbox();
        match self.registry.insert(id, exchange) {
            Some(serial) => Some(Ctx {
                id,
                serial,
                registry: self.registry.clone(),
                out,
            }),
            None => {
                let error = Event::Error {
                    id,
                    code: ErrorCode::DuplicateId,
                    message: format!("request id {id} is already in use"),
                };
                out.send(&error, &[]).await;
                None
            }
        }
    }

    /// Routes a `data` payload; an error when the host went beyond its window.
    fn data(&mut self, id: RequestId, payload: Vec<u8>) -> Result<(), WindowError> {
        let enforce = self.host_credit;
        let mut registry = self.registry.lock();
        match registry
            .entries
            .get_mut(&id)
            .map(|entry| &mut entry.exchange)
        {
            Some(Exchange::Exec(handle)) => handle.stdin(payload, enforce),
            Some(Exchange::Put(data)) => data.push(payload, enforce),
            Some(Exchange::Get { .. }) | None => {
                debug!("data for {id}, which takes none");
                Ok(())
            }
        }
    }

    fn control(&self, id: RequestId, control: exec::Control) {
        match self.registry.lock().entries.get(&id).map(|e| &e.exchange) {
            Some(Exchange::Exec(handle)) => handle.control(control),
            _ => debug!("{control:?} for {id}, which is not a running exec"),
        }
    }

    fn cancel(&self, id: RequestId) {
        let mut registry = self.registry.lock();
        match registry.entries.get(&id).map(|e| &e.exchange) {
            // An exec still reports how its process ended.
            Some(Exchange::Exec(handle)) => handle.control(exec::Control::Kill),
            // A transfer just stops; dropping its channel tells its task.
            Some(Exchange::Put(_) | Exchange::Get { .. }) => {
                registry.entries.remove(&id);
            }
            None => debug!("cancel for {id}, which is not open"),
        }
    }

    /// Kills every running exec and forgets every open exchange, and drops the frames still
    /// queued for them: whoever asked is gone.
    fn forget_all(&mut self, why: &str) {
        self.link.new_generation();
        let entries = self.registry.take_all();
        if !entries.is_empty() {
            log!("{why}: dropping {} open exchange(s)", entries.len());
        }
        for entry in entries {
            if let Exchange::Exec(handle) = entry.exchange {
                handle.kill_now();
            }
        }
    }
}

/// One open exchange, as the dispatcher sees it.
#[derive(Debug)]
enum Exchange {
    Exec(exec::Handle),
    /// Feeds `data` payloads to the put task.
    Put(Inflow),
    /// `_cancel` is never used to send: dropping it stops the get task. `credit`: the bytes the
    /// host still lets it send, for a windowed download.
    Get {
        _cancel: oneshot::Sender<()>,
        credit: Option<Arc<Semaphore>>,
    },
}

#[derive(Debug)]
struct Entry {
    /// Tells this exchange from a later one that reuses its id.
    serial: u64,
    exchange: Exchange,
}

#[derive(Debug, Default)]
struct Entries {
    next_serial: u64,
    entries: HashMap<RequestId, Entry>,
}

/// The open exchanges, shared by the dispatcher and the exchange tasks.
#[derive(Debug, Clone, Default)]
struct Registry(Arc<Mutex<Entries>>);

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        // No code panics while holding the lock; if some did, the map is still consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `exchange` under `id` and returns its serial, or `None` if `id` is open.
    fn insert(&self, id: RequestId, exchange: Exchange) -> Option<u64> {
        let mut registry = self.lock();
        if registry.entries.contains_key(&id) {
            return None;
        }
        registry.next_serial += 1;
        let serial = registry.next_serial;
        registry.entries.insert(id, Entry { serial, exchange });
        Some(serial)
    }

    /// Removes the exchange `(id, serial)`; false if it was already removed (forgotten).
    fn remove(&self, id: RequestId, serial: u64) -> bool {
        let mut registry = self.lock();
        match registry.entries.get(&id) {
            Some(entry) if entry.serial == serial => {
                registry.entries.remove(&id);
                true
            }
            _ => false,
        }
    }

    fn take_all(&self) -> Vec<Entry> {
        self.lock()
            .entries
            .drain()
            .map(|(_, entry)| entry)
            .collect()
    }
}

/// Most download credit an exchange may hold unused; a host granting more is not believed.
const CREDIT_CAP: usize = 64 * 1024 * 1024;

/// Adds credit the host granted to a download, up to [`CREDIT_CAP`] unused.
fn add_credit(credit: &Semaphore, bytes: u64) {
    let room = CREDIT_CAP.saturating_sub(credit.available_permits());
    credit.add_permits(usize::try_from(bytes).unwrap_or(usize::MAX).min(room));
}

/// The host sent more `data` than the window it was granted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the host sent {sent} bytes of data, beyond the {granted} bytes of credit it was granted")]
pub struct WindowError {
    pub sent: u64,
    pub granted: u64,
}

/// The dispatcher's end of an exchange's `data`: queues payloads and checks them against the
/// window the exchange granted.
#[derive(Debug)]
pub struct Inflow {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Payload bytes received so far.
    received: u64,
    /// Bytes granted so far, the first window included; raised by [`InflowRx::consumed`].
    granted: Arc<AtomicU64>,
    /// Set once the empty payload (end of data) went through.
    ended: bool,
}

impl Inflow {
    /// Queues one payload (an empty one ends the data). With `enforce` (the host announced
    /// credit windows) a payload beyond the window is refused; the exchange must then end.
    pub fn push(&mut self, payload: Vec<u8>, enforce: bool) -> Result<(), WindowError> {
        if self.ended {
            return Ok(());
        }
        self.received += payload.len() as u64;
        let granted = self.granted.load(Ordering::Acquire);
        if enforce && self.received > granted {
            return Err(WindowError {
                sent: self.received,
                granted,
            });
        }
        self.ended = payload.is_empty();
        let _ = self.tx.send(payload);
        Ok(())
    }
}

/// The exchange task's end of its `data`: takes payloads and gives their bytes back to the host
/// as credit once they were written where they go.
#[derive(Debug)]
pub struct InflowRx {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    granted: Arc<AtomicU64>,
    id: RequestId,
    out: Outbox,
}

impl InflowRx {
    /// Grants the host its first window. Sent when the exchange opens, in order with its other
    /// frames (after `started` for an exec).
    pub async fn open_window(&self) {
        let credit = Event::Credit {
            id: self.id,
            bytes: DATA_WINDOW,
        };
        self.out.send(&credit, &[]).await;
    }

    /// The next payload; `None` when the exchange was forgotten (or cancelled).
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }

    /// `bytes` of received data were written (or dropped): the host may send as many again.
    pub async fn consumed(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let bytes = bytes as u64;
        // Raised before the host learns of it, so a host that honours windows never trips it.
        self.granted.fetch_add(bytes, Ordering::AcqRel);
        let credit = Event::Credit { id: self.id, bytes };
        self.out.send(&credit, &[]).await;
    }
}

/// The two ends of the `data` of exchange `id`, with a first window of [`DATA_WINDOW`].
pub fn inflow(id: RequestId, out: Outbox) -> (Inflow, InflowRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let granted = Arc::new(AtomicU64::new(DATA_WINDOW));
    (
        Inflow {
            tx,
            received: 0,
            granted: Arc::clone(&granted),
            ended: false,
        },
        InflowRx {
            rx,
            granted,
            id,
            out,
        },
    )
}

/// What an exchange task holds: its id, and the way to answer and to close the exchange.
#[derive(Debug)]
pub struct Ctx {
    pub id: RequestId,
    serial: u64,
    registry: Registry,
    out: Outbox,
}

impl Ctx {
    /// Sends a frame that is not the last of this exchange.
    pub async fn send(&self, event: &Event, payload: &[u8]) {
        self.out.send(event, payload).await;
    }

    /// The outbox, for helper tasks (output pumps) that send frames of this exchange.
    pub fn outbox(&self) -> Outbox {
        self.out.clone()
    }

    /// Closes the exchange and sends its last frame, unless it was forgotten meanwhile.
    pub async fn finish(&self, event: &Event, payload: &[u8]) {
        if self.registry.remove(self.id, self.serial) {
            self.out.send(event, payload).await;
        }
    }

    /// Closes the exchange with an error.
    pub async fn fail(&self, code: ErrorCode, message: String) {
        let id = self.id;
        self.finish(&Event::Error { id, code, message }, &[]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put() -> Exchange {
        Exchange::Put(inflow(7, Outbox::detached()).0)
    }

    #[test]
    fn registry_refuses_open_ids_and_tells_reuses_apart() {
        let registry = Registry::default();
        let first = registry.insert(7, put()).unwrap();
        assert_eq!(registry.insert(7, put()), None);
        assert!(registry.remove(7, first));
        let second = registry.insert(7, put()).unwrap();
        // The first exchange's task finishing late must not close the second.
        assert!(!registry.remove(7, first));
        assert_eq!(registry.take_all().len(), 1);
        assert!(
            !registry.remove(7, second),
            "take_all forgets every exchange"
        );
    }

    #[tokio::test]
    async fn an_inflow_holds_the_host_to_its_window() {
        let (mut tx, rx) = inflow(3, Outbox::detached());
        let window = usize::try_from(DATA_WINDOW).unwrap();
        tx.push(vec![0; window - 1], true).unwrap();
        tx.push(vec![0; 1], true).unwrap();
        assert_eq!(
            tx.push(vec![0; 1], true),
            Err(WindowError {
                sent: DATA_WINDOW + 1,
                granted: DATA_WINDOW
            })
        );
        // Credit given back makes room again.
        rx.consumed(10).await;
        tx.push(vec![0; 9], true).unwrap();
        // A host that did not announce windows is not held to them.
        let (mut tx, _rx) = inflow(4, Outbox::detached());
        tx.push(vec![0; window * 3], false).unwrap();
    }

    #[test]
    fn random_ids_look_like_ids() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_id());
    }
}

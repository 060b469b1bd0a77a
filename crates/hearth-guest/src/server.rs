//! Dispatch: decodes requests and routes them to their exchanges.
//!
//! Every exchange with an id (exec, put_file, get_file) is one task, registered in the
//! [`Registry`] under its id while it is open. The dispatcher only routes (stdin and file data,
//! signals, resizes, cancels) and never waits on an exchange, so a slow one holds up nobody.
//!
//! An exchange leaves the registry *before* its last frame is queued, so a host that reuses the
//! id right after that frame never meets a stale `duplicate_id`. Removing an entry is also how an
//! exchange is abandoned: its task sees its channels close and stops without answering.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hearth_guest_proto::{
    Decoder, ErrorCode, Event, Frame, PROTOCOL_VERSION, Request, RequestId, ShutdownAction,
};
use tokio::sync::{mpsc, oneshot};

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
                        Err(err) => log!("{err}"),
                    }
                }
            }
            Inbound::Disconnected => {
                server.decoder.reset();
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
}

impl Server {
    fn hello(&self) -> Event {
        Event::Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: self.boot_id.clone(),
            instance: self.instance.clone(),
        }
    }

    /// Handles one request; returns an outcome when serving must stop.
    async fn handle(&mut self, frame: Frame<Request>) -> Option<Outcome> {
        let Frame { message, payload } = frame;
        match message {
            Request::Hello { protocol } => {
                if protocol != PROTOCOL_VERSION {
                    log!("the host speaks protocol {protocol}, this agent {PROTOCOL_VERSION}");
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
                let (handle, parts) = exec::channels(stdin);
                if let Some(ctx) = self.open(id, Exchange::Exec(handle)).await {
                    tokio::spawn(exec::run(ctx, spec, parts));
                }
            }
            Request::PutFile { id, path, mode } => {
                debug!("put_file {id}: {path}");
                let (data_tx, data_rx) = mpsc::unbounded_channel();
                if let Some(ctx) = self.open(id, Exchange::Put(data_tx)).await {
                    tokio::spawn(files::put(ctx, path, mode, data_rx));
                }
            }
            Request::GetFile { id, path } => {
                debug!("get_file {id}: {path}");
                let (cancel_tx, cancel_rx) = oneshot::channel();
                if let Some(ctx) = self.open(id, Exchange::Get { _cancel: cancel_tx }).await {
                    tokio::spawn(files::get(ctx, path, cancel_rx));
                }
            }
            Request::Data { id } => self.data(id, payload),
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

    fn data(&mut self, id: RequestId, payload: Vec<u8>) {
        let mut registry = self.registry.lock();
        match registry
            .entries
            .get_mut(&id)
            .map(|entry| &mut entry.exchange)
        {
            Some(Exchange::Exec(handle)) => handle.stdin(payload),
            Some(Exchange::Put(data)) => {
                let _ = data.send(payload);
            }
            Some(Exchange::Get { .. }) | None => debug!("data for {id}, which takes none"),
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
    Put(mpsc::UnboundedSender<Vec<u8>>),
    /// Never used to send: dropping it stops the get task.
    Get {
        _cancel: oneshot::Sender<()>,
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

    #[test]
    fn registry_refuses_open_ids_and_tells_reuses_apart() {
        let registry = Registry::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let first = registry.insert(7, Exchange::Put(tx.clone())).unwrap();
        assert_eq!(registry.insert(7, Exchange::Put(tx.clone())), None);
        assert!(registry.remove(7, first));
        let second = registry.insert(7, Exchange::Put(tx)).unwrap();
        // The first exchange's task finishing late must not close the second.
        assert!(!registry.remove(7, first));
        assert_eq!(registry.take_all().len(), 1);
        assert!(
            !registry.remove(7, second),
            "take_all forgets every exchange"
        );
    }

    #[test]
    fn random_ids_look_like_ids() {
        let a = random_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_id());
    }
}

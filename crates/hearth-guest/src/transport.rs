//! The byte stream to the host: the virtio-serial port in a VM, a unix socket in tests.
//!
//! Two plain threads move the bytes, so the async side never sees the device's odd readiness
//! (a virtio port whose host side is gone reports `POLLHUP` for ever, which an edge-triggered
//! reactor treats as final):
//!
//! - the reader turns reads into [`Inbound`] messages. On the virtio port a read of 0 bytes means
//!   the host is not connected; the reader reports [`Inbound::Disconnected`] once and then retries
//!   every [`RETRY`] until data flows again. On a unix socket it means the peer closed for good
//!   ([`Inbound::Closed`]).
//! - the writer takes whole frames from one channel, so frames never interleave. Each frame is
//!   stamped with the connection generation it was made for; once the server starts a new
//!   generation (the host went away), older frames are dropped instead of being written to the
//!   next host.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hearth_guest_proto::{Event, PORT_NAME};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::sync::{mpsc, oneshot};

use crate::Target;

/// How often a disconnected virtio port is polled for a new host, and how long a blocked write
/// waits before it checks whether its frame went stale.
pub const RETRY: Duration = Duration::from_millis(20);

/// How long the agent waits for its port to show up under sysfs and `/dev` at boot.
const PORT_WAIT: Duration = Duration::from_secs(10);

/// Where virtio-serial ports are listed, one directory per port with a `name` file.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// Frames queued for the writer; beyond this, senders wait (back-pressure on exec output).
const OUTBOUND_FRAMES: usize = 64;

/// Reads queued for the server.
const INBOUND_READS: usize = 64;

const READ_BUF: usize = 64 * 1024;

/// Errors opening the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no virtio-serial port named {PORT_NAME} appeared under {VIRTIO_PORTS} within {0:?}")]
    PortNotFound(Duration),
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an end of file means on this transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A virtio-serial port: EOF means "no host right now"; keep the device and retry.
    Port,
    /// A unix socket: EOF means the peer is gone for good.
    Unix,
}

/// What the reader thread reports.
#[derive(Debug)]
pub enum Inbound {
    Bytes(Vec<u8>),
    /// The host went away; a new one may connect later (virtio port only).
    Disconnected,
    /// The peer closed the transport for good (unix socket only).
    Closed,
}

/// An open transport, not yet served.
#[derive(Debug)]
pub struct Connection {
    file: Arc<File>,
    kind: Kind,
}

/// Opens the transport `target` names; for [`Target::Discover`] waits for the port to appear.
pub fn open(target: &Target) -> Result<Connection, TransportError> {
    match target {
        Target::Unix(path) => {
            let stream = UnixStream::connect(path).map_err(|source| TransportError::Connect {
                path: path.clone(),
                source,
            })?;
            stream
                .set_nonblocking(true)
                .map_err(|source| TransportError::Connect {
                    path: path.clone(),
                    source,
                })?;
            Ok(Connection {
                file: Arc::new(File::from(OwnedFd::from(stream))),
                kind: Kind::Unix,
            })
        }
        Target::Port(path) => Ok(Connection {
            file: Arc::new(open_port(path).map_err(|source| TransportError::Open {
                path: path.clone(),
                source,
            })?),
            kind: Kind::Port,
        }),
        Target::Discover => discover(),
    }
}

/// Waits for the named port under sysfs and for its node under `/dev`, then opens it.
fn discover() -> Result<Connection, TransportError> {
    let deadline = Instant::now() + PORT_WAIT;
    let mut last_error = None;
    loop {
        if let Some(device) = find_port(Path::new(VIRTIO_PORTS), PORT_NAME) {
            let path = Path::new("/dev").join(&device);
            match open_port(&path) {
                Ok(file) => {
                    debug!("serving {}", path.display());
                    return Ok(Connection {
                        file: Arc::new(file),
                        kind: Kind::Port,
                    });
                }
                // devtmpfs may not have made the node yet.
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(source) => last_error = Some(TransportError::Open { path, source }),
            }
        }
        if Instant::now() >= deadline {
            return Err(last_error.unwrap_or(TransportError::PortNotFound(PORT_WAIT)));
        }
        thread::sleep(RETRY);
    }
}

fn open_port(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Returns the device name (e.g. `vport0p1`) of the virtio-serial port called `name`, given the
/// sysfs directory that lists ports.
pub fn find_port(sysfs_ports: &Path, name: &str) -> Option<String> {
    let mut found: Vec<String> = std::fs::read_dir(sysfs_ports)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("name"))
                .is_ok_and(|content| content.trim_end_matches('\n') == name)
        })
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    // Deterministic if a misconfigured VM has two ports of that name.
    found.sort();
    found.into_iter().next()
}

impl Connection {
    /// Starts the reader and writer threads. Returns the stream of what the host sends and the
    /// [`Link`] through which frames go back.
    pub fn start(self) -> (mpsc::Receiver<Inbound>, Link) {
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_READS);
        let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_FRAMES);
        let generation = Arc::new(AtomicU64::new(0));
        let reader_file = Arc::clone(&self.file);
        let kind = self.kind;
        // Threads are detached: the process ends when the server returns.
        let spawned = thread::Builder::new()
            .name("reader".into())
            .spawn(move || read_loop(&reader_file, kind, &inbound_tx));
        if let Err(err) = spawned {
            log!("error: cannot start the reader thread: {err}");
        }
        let writer_file = self.file;
        let writer_generation = Arc::clone(&generation);
        let spawned = thread::Builder::new()
            .name("writer".into())
            .spawn(move || write_loop(&writer_file, &writer_generation, outbound_rx));
        if let Err(err) = spawned {
            log!("error: cannot start the writer thread: {err}");
        }
        (
            inbound_rx,
            Link {
                tx: outbound_tx,
                generation,
            },
        )
    }
}

fn read_loop(file: &File, kind: Kind, tx: &mpsc::Sender<Inbound>) {
    let mut buf = vec![0u8; READ_BUF];
    // Whether data came since the last EOF: a host is (or was just) there.
    let mut connected = false;
    let mut failing = false;
    loop {
        let message = match (&*file).read(&mut buf) {
            Ok(0) if kind == Kind::Unix => {
                let _ = tx.blocking_send(Inbound::Closed);
                return;
            }
            Ok(0) => {
                if connected {
                    connected = false;
                    Some(Inbound::Disconnected)
                } else {
                    thread::sleep(RETRY);
                    None
                }
            }
            Ok(n) => {
                connected = true;
                failing = false;
                Some(Inbound::Bytes(buf[..n].to_vec()))
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                wait(file, PollFlags::POLLIN, PollTimeout::NONE);
                None
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => None,
            Err(err) if kind == Kind::Unix => {
                log!("error: reading the transport: {err}");
                let _ = tx.blocking_send(Inbound::Closed);
                return;
            }
            Err(err) => {
                if !failing {
                    log!("error: reading the port: {err}; retrying");
                    failing = true;
                }
                thread::sleep(RETRY);
                None
            }
        };
        if let Some(message) = message
            && tx.blocking_send(message).is_err()
        {
            return;
        }
    }
}

/// Waits until `file` is ready for `flags`, `timeout` runs out or the peer hangs up. A hang-up
/// without readiness is reported at once by poll for as long as it lasts, so it sleeps
/// [`RETRY`] then, to keep the callers from spinning.
fn wait(file: &File, flags: PollFlags, timeout: PollTimeout) {
    let mut fds = [PollFd::new(file.as_fd(), flags)];
    match poll(&mut fds, timeout) {
        Ok(_) => {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if !revents.intersects(flags)
                && revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)
            {
                thread::sleep(RETRY);
            }
        }
        Err(nix::errno::Errno::EINTR) => {}
        Err(_) => thread::sleep(RETRY),
    }
}

/// One encoded frame on its way to the host.
#[derive(Debug)]
struct Outgoing {
    generation: u64,
    bytes: Vec<u8>,
    /// Told once the frame has been handed to the transport (or dropped).
    written: Option<oneshot::Sender<()>>,
}

fn write_loop(file: &File, generation: &AtomicU64, mut rx: mpsc::Receiver<Outgoing>) {
    let mut failing = false;
    while let Some(frame) = rx.blocking_recv() {
        match write_frame(file, &frame, generation) {
            Ok(()) => failing = false,
            Err(err) => {
                if !failing {
                    log!("error: writing to the host: {err}");
                    failing = true;
                }
            }
        }
        if let Some(written) = frame.written {
            let _ = written.send(());
        }
    }
}

/// Writes one frame, giving up on it (without error) as soon as it belongs to a connection that
/// is gone. What was already written of it is lost; the next host's decoder skips it.
fn write_frame(file: &File, frame: &Outgoing, generation: &AtomicU64) -> std::io::Result<()> {
    let mut rest = &frame.bytes[..];
    while !rest.is_empty() {
        if frame.generation != generation.load(Ordering::Acquire) {
            return Ok(());
        }
        match (&*file).write(rest) {
            Ok(0) => thread::sleep(RETRY),
            Ok(n) => rest = &rest[n..],
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                // A port with no host behind it blocks writes until one connects.
                wait(file, PollFlags::POLLOUT, PollTimeout::from(20u8));
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// The server's handle on the writer: makes [`Outbox`]es and starts new connection generations.
#[derive(Debug, Clone)]
pub struct Link {
    tx: mpsc::Sender<Outgoing>,
    generation: Arc<AtomicU64>,
}

impl Link {
    /// An outbox for frames of the current connection.
    pub fn outbox(&self) -> Outbox {
        Outbox {
            tx: self.tx.clone(),
            generation: self.generation.load(Ordering::Acquire),
        }
    }

    /// Starts a new connection generation: frames queued or made for earlier ones are dropped.
    pub fn new_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Sends frames for one connection generation.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    generation: u64,
}

impl Outbox {
    /// An outbox whose frames go nowhere (its writer is gone), for unit tests.
    #[cfg(test)]
    pub fn detached() -> Outbox {
        let (tx, _) = mpsc::channel(1);
        Outbox { tx, generation: 0 }
    }

    /// Queues one frame. Returns false when the writer is gone.
    pub async fn send(&self, event: &Event, payload: &[u8]) -> bool {
        self.queue(event, payload, None).await
    }

    /// Queues one frame and waits until the writer has written it.
    pub async fn send_and_flush(&self, event: &Event, payload: &[u8]) -> bool {
        let (written_tx, written_rx) = oneshot::channel();
        self.queue(event, payload, Some(written_tx)).await && written_rx.await.is_ok()
    }

    async fn queue(
        &self,
        event: &Event,
        payload: &[u8],
        written: Option<oneshot::Sender<()>>,
    ) -> bool {
        let bytes = match hearth_guest_proto::encode(event, payload) {
            Ok(bytes) => bytes,
            Err(err) => {
                log!("error: cannot encode an event: {err}");
                return false;
            }
        };
        self.tx
            .send(Outgoing {
                generation: self.generation,
                bytes,
                written,
            })
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_port(root: &Path, device: &str, name: &str) {
        let dir = root.join(device);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
    }

    #[test]
    fn finds_the_port_by_name() {
        let sysfs = tempfile::tempdir().unwrap();
        fake_port(sysfs.path(), "vport0p0", "org.qemu.guest_agent.0");
        fake_port(sysfs.path(), "vport0p1", PORT_NAME);
        // A port with no name file (unnamed ports have an empty one, or none at all).
        std::fs::create_dir_all(sysfs.path().join("vport0p2")).unwrap();
        assert_eq!(
            find_port(sysfs.path(), PORT_NAME).as_deref(),
            Some("vport0p1")
        );
    }

    #[test]
    fn no_port_of_that_name() {
        let sysfs = tempfile::tempdir().unwrap();
        fake_port(sysfs.path(), "vport0p0", "org.hearth.agent.00");
        assert_eq!(find_port(sysfs.path(), PORT_NAME), None);
        assert_eq!(find_port(&sysfs.path().join("missing"), PORT_NAME), None);
    }

    #[test]
    fn stale_frames_are_not_written() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let file = File::from(OwnedFd::from(theirs));
        let generation = AtomicU64::new(1);
        let stale = Outgoing {
            generation: 0,
            bytes: b"old".to_vec(),
            written: None,
        };
        let fresh = Outgoing {
            generation: 1,
            bytes: b"new".to_vec(),
            written: None,
        };
        write_frame(&file, &stale, &generation).unwrap();
        write_frame(&file, &fresh, &generation).unwrap();
        drop(file);
        let mut got = Vec::new();
        ours.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"new");
    }
}

//! Talking to `hearth-helper`: the [`Helper`] trait, the real client over its unix socket, and
//! starting a helper of hearthd's own when hearthd runs as root.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hearth_helper::proto::{ErrorKind, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("the network helper at {socket} cannot be reached: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("the network helper refused {op}: {message}")]
    Invalid { op: &'static str, message: String },
    #[error("the network helper failed {op}: {message}")]
    Failed { op: &'static str, message: String },
    #[error("the network helper answered {op} with {answer}")]
    Unexpected { op: &'static str, answer: String },
    #[error("cannot start the network helper {binary}: {reason}")]
    Start { binary: String, reason: String },
}

/// An answer, with the descriptors it carries (a [`Response::Tap`]'s, a
/// [`Response::Services`]').
#[derive(Debug)]
pub struct Reply {
    pub response: Response,
    pub fds: Vec<OwnedFd>,
}

/// Something that runs helper requests: the real helper, or a recording double in tests.
#[async_trait]
pub trait Helper: Send + Sync + std::fmt::Debug {
    /// Sends `request`; a [`Response::Error`] comes back as [`HelperError::Invalid`] or
    /// [`HelperError::Failed`].
    async fn call(&self, request: Request) -> Result<Reply, HelperError>;
}

/// Turns a helper's error answer into an error.
pub fn check(op: &'static str, reply: Reply) -> Result<Reply, HelperError> {
    match reply.response {
        Response::Error {
            kind: ErrorKind::Invalid,
            message,
        } => Err(HelperError::Invalid { op, message }),
        Response::Error {
            kind: ErrorKind::Failed,
            message,
        } => Err(HelperError::Failed { op, message }),
        _ => Ok(reply),
    }
}

/// The helper at a unix socket. Connections are pooled: a request takes an idle one (or opens a
/// new one), so independent requests (a VM's TAP and the host rules) run at once; a connection
/// that failed is dropped and the request tried once more on a new one. At most [`MAX_CALLS`]
/// requests are in flight; the rest wait their turn.
///
/// The helper serves the instance and cidr of the first `setup` it gets and refuses requests
/// before one: once a `setup` has been answered, every new connection repeats it first (cheap
/// for the helper), so a helper that was restarted is set up again before anything else.
#[derive(Debug)]
pub struct SocketHelper {
    socket: PathBuf,
    idle: Arc<Mutex<Vec<hearth_helper::client::Client>>>,
    setup: Arc<Mutex<Option<Request>>>,
    calls: tokio::sync::Semaphore,
}

/// Idle connections kept open.
const POOL: usize = 4;
/// Requests in flight at once (each holds a blocking thread while it waits).
pub const MAX_CALLS: usize = 16;

impl SocketHelper {
    pub fn new(socket: &Path) -> SocketHelper {
        SocketHelper {
            socket: socket.to_owned(),
            idle: Arc::default(),
            setup: Arc::default(),
            calls: tokio::sync::Semaphore::new(MAX_CALLS),
        }
    }
}

/// A new connection to `socket`, set up with `setup` when there is one.
fn connect(
    socket: &Path,
    setup: Option<&Request>,
) -> Result<hearth_helper::client::Client, String> {
    let mut client = hearth_helper::client::Client::connect(socket).map_err(|e| e.to_string())?;
    if let Some(setup) = setup {
        client.call_ok(setup).map_err(|e| e.to_string())?;
    }
    Ok(client)
}

#[async_trait]
impl Helper for SocketHelper {
    async fn call(&self, request: Request) -> Result<Reply, HelperError> {
        let (socket, idle, setup) = (self.socket.clone(), self.idle.clone(), self.setup.clone());
        let op = request.op();
        let unreachable = |reason: String| HelperError::Unreachable {
            socket: socket.display().to_string(),
            reason,
        };
        let _permit = self
            .calls
            .acquire()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let result = tokio::task::spawn_blocking({
            let socket = socket.clone();
            move || {
                let take = || {
                    idle.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .pop()
                };
                for attempt in 0..2 {
                    let mut client = match take() {
                        Some(c) if attempt == 0 => c,
                        _ => {
                            let setup = setup
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .clone();
                            connect(&socket, setup.as_ref())?
                        }
                    };
                    match client.call(&request) {
                        Ok((response, fds)) => {
                            if matches!(request, Request::Setup { .. })
                                && !matches!(response, Response::Error { .. })
                            {
                                *setup
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                                    Some(request.clone());
                            }
                            let mut pool = idle
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            if pool.len() < POOL {
                                pool.push(client);
                            }
                            return Ok(Reply { response, fds });
                        }
                        Err(e) if attempt == 1 => return Err(e.to_string()),
                        Err(_) => {}
                    }
                }
                Err("no answer".to_owned())
            }
        })
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .map_err(unreachable)?;
        check(op, result)
    }
}

/// A helper hearthd started itself (it runs as root). A thread of its own starts it and waits
/// for it: the kernel ends the helper when that thread ends (`--die-with-parent` is
/// `PR_SET_PDEATHSIG`, which follows the thread that forked, not the process), so it must live
/// as long as hearthd; it also starts the helper again should it die. [`OwnHelper::stop`] ends it.
#[derive(Debug)]
pub struct OwnHelper {
    pub socket: PathBuf,
    state: Arc<Mutex<Supervised>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug, Default)]
struct Supervised {
    pid: Option<u32>,
    stopping: bool,
}

impl OwnHelper {
    /// Starts `hearth-helper` (beside hearthd's own binary, else from `PATH`) on
    /// `<data_dir>/helper.sock` and waits until it answers.
    pub fn start(data_dir: &Path) -> Result<OwnHelper, HelperError> {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("hearth-helper")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("hearth-helper"));
        let socket = data_dir.join("helper.sock");
        let start_err = |reason: String| HelperError::Start {
            binary: binary.display().to_string(),
            reason,
        };
        let state = Arc::new(Mutex::new(Supervised::default()));
        let (first_tx, first_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = {
            let (binary, socket, state) = (binary.clone(), socket.clone(), state.clone());
            std::thread::Builder::new()
                .name("hearth-helper".into())
                .spawn(move || supervise(&binary, &socket, &state, first_tx))
                .map_err(|e| start_err(e.to_string()))?
        };
        let own = OwnHelper {
            socket: socket.clone(),
            state,
            thread: Mutex::new(Some(thread)),
        };
        match first_rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Ok(())) => Ok(own),
            Ok(Err(reason)) => Err(start_err(reason)),
            Err(_) => Err(start_err("its socket did not answer within 10 s".into())),
        }
    }

    /// Ends the helper (SIGTERM by its pid) and waits for it.
    pub fn stop(&self) {
        let pid = {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.stopping = true;
            state.pid
        };
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The helper's thread: starts it, reports the first start, waits, and starts it again after
/// an unexpected exit (at most once a second).
fn supervise(
    binary: &Path,
    socket: &Path,
    state: &Mutex<Supervised>,
    first: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut first = Some(first);
    loop {
        let spawned = std::process::Command::new(binary)
            .arg("--socket")
            .arg(socket)
            .arg("--die-with-parent")
            .stdin(std::process::Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                match first.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                    None => tracing::error!(error = %e, "cannot start the network helper again"),
                }
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pid = Some(child.id());
        if let Some(tx) = first.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let _ = tx.send(Err(format!("it exited at once ({status})")));
                    return;
                }
                if hearth_helper::client::Client::connect(socket).is_ok() {
                    let _ = tx.send(Ok(()));
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = tx.send(Err("its socket did not answer within 10 s".into()));
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let status = child.wait();
        let stopping = {
            let mut state = state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.pid = None;
            state.stopping
        };
        if stopping {
            return;
        }
        tracing::error!(?status, "the network helper exited; starting it again");
        std::thread::sleep(Duration::from_secs(1));
    }
}

impl Drop for OwnHelper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A helper double that records every request and answers as a helper with an empty host
/// would: slots it was asked to make exist until deleted; a TAP is a descriptor of /dev/null;
/// the service sockets are real, on loopback (`service_ip`, port 0), and their addresses kept
/// in `services` by slot.
#[cfg(test)]
#[derive(Debug)]
pub struct RecordingHelper {
    pub requests: Mutex<Vec<Request>>,
    pub slots: Mutex<std::collections::BTreeSet<hearth_helper::proto::SlotId>>,
    /// When set, requests with this op fail.
    pub fail_op: Mutex<Option<&'static str>>,
    pub service_ip: std::net::Ipv4Addr,
    pub services: Mutex<std::collections::BTreeMap<hearth_helper::proto::SlotId, ServiceAddrs>>,
}

/// Where a [`RecordingHelper`]'s service sockets of one slot listen.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub struct ServiceAddrs {
    pub dns: std::net::SocketAddr,
    pub metadata: std::net::SocketAddr,
}

#[cfg(test)]
impl Default for RecordingHelper {
    fn default() -> RecordingHelper {
        RecordingHelper {
            requests: Mutex::default(),
            slots: Mutex::default(),
            fail_op: Mutex::default(),
            service_ip: std::net::Ipv4Addr::LOCALHOST,
            services: Mutex::default(),
        }
    }
}

#[cfg(test)]
impl RecordingHelper {
    pub fn ops(&self) -> Vec<&'static str> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(Request::op)
            .collect()
    }

    /// The metadata address of the slot of VM `vm_id`.
    pub fn metadata_of(&self, vm_id: &str) -> std::net::SocketAddr {
        self.services
            .lock()
            .unwrap()
            .iter()
            .find(|(slot, _)| slot.vm == vm_id)
            .map(|(_, addrs)| addrs.metadata)
            .unwrap_or_else(|| panic!("no services were opened for {vm_id}"))
    }

    /// Sockets on loopback, as the helper would make them in a slot.
    fn open_services(&self, slot: hearth_helper::proto::SlotId) -> Vec<OwnedFd> {
        let udp = std::net::UdpSocket::bind((self.service_ip, 0)).unwrap();
        let tcp = std::net::TcpListener::bind(udp.local_addr().unwrap()).unwrap();
        let md = std::net::TcpListener::bind((self.service_ip, 0)).unwrap();
        let addrs = ServiceAddrs {
            dns: udp.local_addr().unwrap(),
            metadata: md.local_addr().unwrap(),
        };
        self.services.lock().unwrap().insert(slot, addrs);
        vec![OwnedFd::from(udp), OwnedFd::from(tcp), OwnedFd::from(md)]
    }
}

#[cfg(test)]
#[async_trait]
impl Helper for RecordingHelper {
    async fn call(&self, request: Request) -> Result<Reply, HelperError> {
        self.requests.lock().unwrap().push(request.clone());
        let op = request.op();
        if *self.fail_op.lock().unwrap() == Some(op) {
            return Err(HelperError::Failed {
                op,
                message: "failing as the test asked".into(),
            });
        }
        let mut fds = Vec::new();
        let response = match request {
            Request::Hello => Response::Hello {
                version: hearth_helper::proto::PROTOCOL_VERSION,
                pid: 1,
                helper: "test".into(),
                nftables: "test".into(),
            },
            Request::CreateSlot { spec } => {
                self.slots.lock().unwrap().insert(spec.slot);
                Response::Done
            }
            Request::DeleteSlot { slot } => {
                self.slots.lock().unwrap().remove(&slot);
                self.services.lock().unwrap().remove(&slot);
                Response::Done
            }
            Request::OpenTap { .. } => {
                fds.push(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
                Response::Tap {
                    name: hearth_helper::proto::TAP_NAME.into(),
                }
            }
            Request::OpenServices { slot } => {
                fds = self.open_services(slot);
                Response::Services
            }
            Request::ListSlots { instance } => Response::Slots {
                slots: self
                    .slots
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.instance == instance)
                    .cloned()
                    .collect(),
            },
            _ => Response::Done,
        };
        Ok(Reply { response, fds })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::{UnixListener, UnixStream};

    use hearth_helper::net::RecordingNet;
    use hearth_helper::nft::RecordingNft;
    use hearth_helper::server::serve_connection;

    use super::*;

    /// A helper on `socket` (with the recording doubles); its connections are kept so the test
    /// can break them, as a helper's restart does.
    fn serve(socket: &Path, streams: Arc<Mutex<Vec<UnixStream>>>) {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let helper = Arc::new(hearth_helper::server::Helper::new(
                RecordingNet::default(),
                RecordingNft::default(),
            ));
            for stream in listener.incoming() {
                let stream = stream.unwrap();
                streams.lock().unwrap().push(stream.try_clone().unwrap());
                let helper = helper.clone();
                std::thread::spawn(move || serve_connection(&helper, stream));
            }
        });
    }

    #[tokio::test]
    async fn a_restarted_helper_is_set_up_again_before_the_next_request() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("helper.sock");
        let streams = Arc::new(Mutex::new(Vec::new()));
        serve(&socket, streams.clone());
        let client = SocketHelper::new(&socket);
        let setup = Request::Setup {
            instance: "0123abcd".into(),
            cidr: "172.28.0.0/16".parse().unwrap(),
        };
        client.call(setup).await.unwrap();
        let list = || Request::ListSlots {
            instance: "0123abcd".into(),
        };
        client.call(list()).await.unwrap();
        // The helper goes away (its connections break) and a new one, that knows nothing,
        // takes the socket.
        for s in streams.lock().unwrap().drain(..) {
            s.shutdown(std::net::Shutdown::Both).unwrap();
        }
        std::fs::remove_file(&socket).unwrap();
        serve(&socket, streams.clone());
        let reply = client.call(list()).await.unwrap();
        assert!(
            matches!(reply.response, Response::Slots { .. }),
            "{:?}",
            reply.response
        );
    }
}

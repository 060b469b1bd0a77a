//! The metadata service: each VM's own facts over HTTP.
//!
//! The guest asks `169.254.169.254:80`. That address is on the loopback of the VM's slot, and
//! the listening socket there is made inside the slot by `hearth-helper` (`OpenServices`) and
//! handed to hearthd: one per VM, reachable only from that VM's TAP, and no process of the host
//! can bind its address in the host's place. So the listener itself says which VM is asking:
//! [`serve`] is handed the VM's id with its listener and answers only about that VM. Nothing a
//! request carries (`Host`, `X-Forwarded-For`, a path naming another id) can change that.
//!
//! # Endpoints (GET; HEAD answers the same without a body; other methods get 405)
//!
//! | Path | Answer |
//! |---|---|
//! | `/` | with `Accept: application/json`, the whole [`Instance`] as JSON; else the text index, one path per line |
//! | `/v1/instance` | JSON `{id, name, hostname}` |
//! | `/v1/instance/id`, `/v1/instance/name`, `/v1/instance/hostname` | text, no newline |
//! | `/v1/network` | JSON [`NetworkInfo`] |
//! | `/v1/ssh-keys` | text, one key per line |
//! | `/v1/user-data` | the user data's bytes, `application/octet-stream`; 404 when there is none |
//! | `/latest/meta-data/instance-id`, `…/hostname`, `…/local-ipv4`, `…/public-keys/0/openssh-key`, `/latest/user-data` | the EC2 spellings of the same (local-ipv4 is the guest's address) |
//!
//! Other paths get 404. Every answer carries `Cache-Control: no-store` (user data and keys are
//! nobody's to cache). When the [`Directory`] no longer knows the VM (it is being deleted), the
//! instance endpoints answer 503.
//!
//! # The guest is hostile
//!
//! It is root in its VM and may send anything. So:
//! - **Peer.** Only the guest's fixed inner address (`GUEST_ADDR`) is answered; a connection
//!   from any other address gets 403 for every request, whatever it asks (`expected_peer`).
//! - **Connections.** At most [`MAX_CONNECTIONS`] per VM; the next one is closed as soon as it is
//!   accepted. Each VM has its own listener, so a guest can only use up its own.
//! - **Slow clients.** A request's line and headers must arrive within [`HEADER_TIMEOUT`] of the
//!   connection being accepted or of the previous answer, and an answer must be taken within it
//!   too; else the connection is closed. This also ends idle keep-alive connections. (axum's
//!   `serve` gives hyper no timer, so hyper's own `header_read_timeout` does not apply; the
//!   connection's IO enforces this one.)
//! - **Sizes.** hyper's HTTP/1 defaults bound a request: its line and headers must fit the read
//!   buffer (`max_buf_size`, 408 KiB = 8192 + 4096 × 100 bytes; one read may run into the
//!   buffer's spare capacity past it, so the test pins "512 KiB is refused") and hold at most
//!   100 headers, else 431; its target is at most 65534 bytes, else 414. hyper answers those
//!   itself and closes the connection. HTTP/2 is not compiled in. Bodies are never read.
//! - **Stop.** When `stop` is cancelled the listener closes and every open connection is ended
//!   at once (its IO fails), so [`serve`] returns without waiting for any guest.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any};
use axum::serve::{IncomingStream, Listener};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Connections one VM may have open at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a request's line and headers (and the taking of an answer) may take.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the metadata service tells one VM about itself. Serialized as it is, this is the
/// whole document `/` answers with JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub network: NetworkInfo,
    /// OpenSSH public keys, one line each.
    pub ssh_authorized_keys: Vec<String>,
    pub user_data: Option<String>,
}

/// The VM's network as its guest sees it, and the address the host routes to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInfo {
    /// The guest's own address inside its slot.
    pub guest_addr: Ipv4Addr,
    /// Prefix length of the guest's inner network.
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    /// The guest NIC's MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The VM's routable address on the host (what other VMs and the host reach it by).
    pub vm_addr: Ipv4Addr,
    /// The private networks the VM belongs to, by name.
    pub private_networks: Vec<String>,
}

/// Where the service looks a VM up, at every request (so an answer is never staler than the
/// directory).
#[async_trait::async_trait]
pub trait Directory: Send + Sync + 'static {
    /// The VM's metadata; `None` when there is no such VM (any longer).
    async fn instance(&self, vm_id: &str) -> Option<Instance>;
}

/// The limits [`serve`] applies; tests shorten the timeout.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_connections: usize,
    header_timeout: Duration,
}

const LIMITS: Limits = Limits {
    max_connections: MAX_CONNECTIONS,
    header_timeout: HEADER_TIMEOUT,
};

/// Serves VM `vm_id`'s metadata on `listener` until `stop` resolves / is cancelled.
pub async fn serve(
    listener: TcpListener,
    vm_id: String,
    expected_peer: Ipv4Addr,
    directory: Arc<dyn Directory>,
    stop: CancellationToken,
) {
    serve_with(listener, vm_id, expected_peer, directory, stop, LIMITS).await;
}

async fn serve_with(
    listener: TcpListener,
    vm_id: String,
    expected_peer: Ipv4Addr,
    directory: Arc<dyn Directory>,
    stop: CancellationToken,
    limits: Limits,
) {
    let vm: Arc<str> = vm_id.into();
    let local = listener.local_addr().ok();
    tracing::debug!(vm = %vm, listen = ?local, "metadata service started");
    let service = Arc::new(Service {
        vm: vm.clone(),
        expected_peer,
        directory,
    });
    let app = router(service).into_make_service_with_connect_info::<ConnInfo>();
    let listener = VmListener {
        inner: listener,
        vm: vm.clone(),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        header_timeout: limits.header_timeout,
        stop: stop.clone(),
    };
    // Never fails: accept errors are retried inside `VmListener::accept`.
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    tracing::debug!(vm = %vm, "metadata service stopped");
}

/// One VM's service: who it answers about and to whom.
struct Service {
    vm: Arc<str>,
    expected_peer: Ipv4Addr,
    directory: Arc<dyn Directory>,
}

/// What a path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Index,
    Instance,
    Id,
    Name,
    Hostname,
    Network,
    SshKeys,
    FirstSshKey,
    LocalIpv4,
    UserData,
}

/// Every path served, in the order the text index lists them (after `/`).
const PATHS: &[(&str, Endpoint)] = &[
    ("/", Endpoint::Index),
    ("/v1/instance", Endpoint::Instance),
    ("/v1/instance/id", Endpoint::Id),
    ("/v1/instance/name", Endpoint::Name),
    ("/v1/instance/hostname", Endpoint::Hostname),
    ("/v1/network", Endpoint::Network),
    ("/v1/ssh-keys", Endpoint::SshKeys),
    ("/v1/user-data", Endpoint::UserData),
    ("/latest/meta-data/instance-id", Endpoint::Id),
    ("/latest/meta-data/hostname", Endpoint::Hostname),
    ("/latest/meta-data/local-ipv4", Endpoint::LocalIpv4),
    (
        "/latest/meta-data/public-keys/0/openssh-key",
        Endpoint::FirstSshKey,
    ),
    ("/latest/user-data", Endpoint::UserData),
];

fn router(service: Arc<Service>) -> Router {
    PATHS
        .iter()
        .fold(Router::new(), |router, &(path, endpoint)| {
            router.route(path, handler(endpoint))
        })
        .fallback(|| async { Reply::NoSuchPath })
        .layer(axum::middleware::from_fn_with_state(service.clone(), admit))
        .with_state(service)
}

/// The handler of one endpoint, for every method (so the 405 is ours).
fn handler(endpoint: Endpoint) -> MethodRouter<Arc<Service>> {
    any(
        move |State(service): State<Arc<Service>>, method: Method, headers: HeaderMap| async move {
            answer(&service, endpoint, &method, &headers).await
        },
    )
}

/// In front of every request: the connection's deadline is lifted while it is answered, and
/// only the expected peer gets past.
async fn admit(State(service): State<Arc<Service>>, req: Request, next: Next) -> Response {
    let Some(ConnectInfo(conn)) = req.extensions().get::<ConnectInfo<ConnInfo>>().cloned() else {
        // Only `serve` builds this router, always with connection info.
        return Reply::Forbidden.into_response();
    };
    let _answering = conn.deadline.answering();
    if conn.peer.ip() != service.expected_peer {
        if !conn.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                vm = %service.vm, peer = %conn.peer, expected = %service.expected_peer,
                "metadata request from an unexpected address refused"
            );
        }
        return Reply::Forbidden.into_response();
    }
    next.run(req).await
}

async fn answer(
    service: &Service,
    endpoint: Endpoint,
    method: &Method,
    headers: &HeaderMap,
) -> Reply {
    if method != Method::GET && method != Method::HEAD {
        return Reply::MethodNotAllowed;
    }
    if endpoint == Endpoint::Index && !wants_json(headers) {
        return Reply::Text(index());
    }
    let Some(instance) = service.directory.instance(&service.vm).await else {
        return Reply::Unavailable;
    };
    render(endpoint, instance)
}

/// The text index: every path but `/`, one per line.
fn index() -> String {
    PATHS
        .iter()
        .filter(|(_, e)| *e != Endpoint::Index)
        .map(|(path, _)| format!("{path}\n"))
        .collect()
}

/// The answer of `endpoint` for `instance`.
fn render(endpoint: Endpoint, instance: Instance) -> Reply {
    match endpoint {
        Endpoint::Index => Reply::json(&instance),
        Endpoint::Instance => Reply::json(&InstanceSummary {
            id: &instance.id,
            name: &instance.name,
            hostname: &instance.hostname,
        }),
        Endpoint::Id => Reply::Text(instance.id),
        Endpoint::Name => Reply::Text(instance.name),
        Endpoint::Hostname => Reply::Text(instance.hostname),
        Endpoint::Network => Reply::json(&instance.network),
        Endpoint::SshKeys => Reply::Text(
            instance
                .ssh_authorized_keys
                .iter()
                .map(|key| format!("{key}\n"))
                .collect(),
        ),
        Endpoint::FirstSshKey => match instance.ssh_authorized_keys.into_iter().next() {
            Some(key) => Reply::Text(format!("{key}\n")),
            None => Reply::Missing("this instance has no SSH keys"),
        },
        Endpoint::LocalIpv4 => Reply::Text(instance.network.guest_addr.to_string()),
        Endpoint::UserData => match instance.user_data {
            Some(data) => Reply::Bytes(data.into_bytes()),
            None => Reply::Missing("this instance has no user data"),
        },
    }
}

/// `/v1/instance`: who the VM is.
#[derive(Serialize)]
struct InstanceSummary<'a> {
    id: &'a str,
    name: &'a str,
    hostname: &'a str,
}

/// Whether `Accept` names `application/json` (any parameters, any position).
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            range
                .split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        })
}

/// Every answer the service gives; [`IntoResponse`] below is the one place a status is chosen.
#[derive(Debug)]
enum Reply {
    Text(String),
    Json(Vec<u8>),
    Bytes(Vec<u8>),
    /// A known path with nothing behind it for this instance.
    Missing(&'static str),
    NoSuchPath,
    MethodNotAllowed,
    Forbidden,
    Unavailable,
}

impl Reply {
    fn json<T: Serialize>(value: &T) -> Reply {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Reply::Json(body)
            }
            // Plain structs of strings and addresses always serialize.
            Err(_) => Reply::Unavailable,
        }
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let (status, content_type, body): (StatusCode, &str, Body) = match self {
            Reply::Text(text) => (StatusCode::OK, TEXT, text.into()),
            Reply::Json(body) => (StatusCode::OK, "application/json", body.into()),
            Reply::Bytes(body) => (StatusCode::OK, "application/octet-stream", body.into()),
            Reply::Missing(why) => (StatusCode::NOT_FOUND, TEXT, format!("{why}\n").into()),
            Reply::NoSuchPath => (
                StatusCode::NOT_FOUND,
                TEXT,
                "no such metadata path; GET / lists them\n".into(),
            ),
            Reply::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "the metadata service answers GET only\n".into(),
            ),
            Reply::Forbidden => (
                StatusCode::FORBIDDEN,
                TEXT,
                "this metadata service answers its own VM only\n".into(),
            ),
            Reply::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "this instance's metadata is not available\n".into(),
            ),
        };
        let mut resp = (status, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        if status == StatusCode::FORBIDDEN {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The accepting side of one VM's socket: bounds its connections and gives each its deadline.
struct VmListener {
    inner: TcpListener,
    vm: Arc<str>,
    slots: Arc<Semaphore>,
    header_timeout: Duration,
    stop: CancellationToken,
}

impl Listener for VmListener {
    type Io = VmConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (VmConn, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        tracing::debug!(vm = %self.vm, %peer, "metadata connection over the limit closed");
                        drop(stream);
                        continue;
                    };
                    return (
                        VmConn::new(stream, peer, slot, self.header_timeout, &self.stop),
                        peer,
                    );
                }
                // Out of descriptors or memory, or a connection reset before it was accepted:
                // wait a little rather than spin.
                Err(err) => {
                    tracing::debug!(vm = %self.vm, error = %err, "metadata accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// What a request learns of its connection.
#[derive(Debug, Clone)]
struct ConnInfo {
    peer: SocketAddr,
    deadline: Arc<Deadline>,
    /// Whether a refusal was logged for this connection already (one line per connection).
    warned: Arc<std::sync::atomic::AtomicBool>,
}

impl Connected<IncomingStream<'_, VmListener>> for ConnInfo {
    fn connect_info(stream: IncomingStream<'_, VmListener>) -> Self {
        stream.io().info.clone()
    }
}

/// When a connection's IO fails unless a request is being answered: `None` while one is.
#[derive(Debug)]
struct Deadline {
    at: Mutex<Option<Instant>>,
    timeout: Duration,
}

impl Deadline {
    fn get(&self) -> Option<Instant> {
        *self.at.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, at: Option<Instant>) {
        *self.at.lock().unwrap_or_else(PoisonError::into_inner) = at;
    }

    /// Lifts the deadline until the guard is dropped, which sets a new one a timeout away.
    fn answering(self: &Arc<Self>) -> Answering {
        self.set(None);
        Answering(self.clone())
    }
}

struct Answering(Arc<Deadline>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.set(Some(Instant::now() + self.0.timeout));
    }
}

/// One accepted connection: its IO fails once its deadline passes or the service stops, and
/// dropping it frees its slot.
struct VmConn {
    io: TcpStream,
    info: ConnInfo,
    timer: Pin<Box<Sleep>>,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
    _slot: OwnedSemaphorePermit,
}

impl VmConn {
    fn new(
        io: TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> VmConn {
        let at = Instant::now() + timeout;
        VmConn {
            io,
            info: ConnInfo {
                peer,
                deadline: Arc::new(Deadline {
                    at: Mutex::new(Some(at)),
                    timeout,
                }),
                warned: Arc::default(),
            },
            timer: Box::pin(tokio::time::sleep_until(at)),
            stopped: Box::pin(stop.clone().cancelled_owned()),
            _slot: slot,
        }
    }

    /// Fails once the service stopped or the deadline passed; else registers for both.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.stopped.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the metadata service stopped",
            ));
        }
        if let Some(at) = self.info.deadline.get() {
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the metadata client was too slow",
                ));
            }
        }
        Ok(())
    }
}

impl AsyncRead for VmConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(err) = this.check(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for VmConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(err) = this.check(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(err) = this.check(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
    const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

    fn instance(id: &str, keys: &[&str], user_data: Option<&str>) -> Instance {
        Instance {
            id: id.to_owned(),
            name: format!("name-{id}"),
            hostname: format!("host-{id}"),
            network: NetworkInfo {
                guest_addr: Ipv4Addr::new(10, 254, 254, 2),
                prefix: 30,
                gateway: Ipv4Addr::new(10, 254, 254, 1),
                dns: Ipv4Addr::new(10, 254, 254, 1),
                mac: "06:00:0a:fe:fe:02".to_owned(),
                vm_addr: Ipv4Addr::new(10, 200, 0, 7),
                private_networks: vec!["backend".to_owned()],
            },
            ssh_authorized_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            user_data: user_data.map(str::to_owned),
        }
    }

    /// A directory of fixed instances that records what it was asked.
    #[derive(Default)]
    struct FakeDirectory {
        instances: Mutex<HashMap<String, Instance>>,
        asked: Mutex<Vec<String>>,
    }

    impl FakeDirectory {
        fn with(instances: Vec<Instance>) -> Arc<FakeDirectory> {
            Arc::new(FakeDirectory {
                instances: Mutex::new(instances.into_iter().map(|i| (i.id.clone(), i)).collect()),
                asked: Mutex::default(),
            })
        }
    }

    #[async_trait::async_trait]
    impl Directory for FakeDirectory {
        async fn instance(&self, vm_id: &str) -> Option<Instance> {
            self.asked.lock().unwrap().push(vm_id.to_owned());
            self.instances.lock().unwrap().get(vm_id).cloned()
        }
    }

    /// A running service and the means to stop it.
    struct Running {
        addr: SocketAddr,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    /// The service as hearthd runs it ([`serve`], default limits), for `vm`, expecting `GUEST`.
    async fn start_default(directory: Arc<FakeDirectory>, vm: &str) -> Running {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            vm.to_owned(),
            GUEST,
            directory,
            stop.clone(),
        ));
        Running { addr, stop, task }
    }

    /// The service with other limits.
    async fn start(
        directory: Arc<FakeDirectory>,
        vm: &str,
        expected_peer: Ipv4Addr,
        limits: Limits,
    ) -> Running {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_with(
            listener,
            vm.to_owned(),
            expected_peer,
            directory,
            stop.clone(),
            limits,
        ));
        Running { addr, stop, task }
    }

    /// A connection from `from`.
    async fn connect(addr: SocketAddr, from: Ipv4Addr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    #[derive(Debug)]
    struct Answer {
        status: u16,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    impl Answer {
        fn header(&self, name: &str) -> &str {
            self.headers.get(name).map_or("", String::as_str)
        }
        fn text(&self) -> &str {
            std::str::from_utf8(&self.body).unwrap()
        }
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    /// Sends one request (`extra` are header lines) from `from` and reads the answer to the
    /// connection's end.
    async fn request(
        addr: SocketAddr,
        from: Ipv4Addr,
        method: &str,
        path: &str,
        extra: &[&str],
    ) -> Answer {
        let mut stream = connect(addr, from).await;
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
        for line in extra {
            head.push_str(line);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        // A server refusing an oversized request answers and closes before taking all of it.
        let wrote = stream.write_all(head.as_bytes()).await;
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("the answer came within 10 s");
        if raw.is_empty() {
            panic!("no answer: write {wrote:?}, read {read:?}");
        }
        parse_answer(&raw)
    }

    async fn get(addr: SocketAddr, path: &str) -> Answer {
        request(addr, GUEST, "GET", path, &[]).await
    }

    fn parse_answer(raw: &[u8]) -> Answer {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
        let head = std::str::from_utf8(&raw[..split]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Answer {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    /// Reads from `stream` until it ends; true when it ended (EOF or reset) within `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let end = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    fn keys() -> [&'static str; 2] {
        [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOne one@example",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQTwo two@example",
        ]
    }

    #[tokio::test]
    async fn every_endpoint_answers_about_its_own_vm() {
        let directory = FakeDirectory::with(vec![
            instance(
                "vm-a",
                &keys(),
                Some("#cloud-config\nruncmd: [\"echo hi\"]\n\u{1}\u{ff}"),
            ),
            instance("vm-b", &[], None),
        ]);
        let running = start_default(directory.clone(), "vm-a").await;
        let addr = running.addr;

        let text = |answer: &Answer| {
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_eq!(answer.header("content-type"), "text/plain; charset=utf-8");
            assert_eq!(answer.header("cache-control"), "no-store");
            answer.text().to_owned()
        };
        for path in ["/v1/instance/id", "/latest/meta-data/instance-id"] {
            assert_eq!(text(&get(addr, path).await), "vm-a", "{path}");
        }
        assert_eq!(text(&get(addr, "/v1/instance/name").await), "name-vm-a");
        for path in ["/v1/instance/hostname", "/latest/meta-data/hostname"] {
            assert_eq!(text(&get(addr, path).await), "host-vm-a", "{path}");
        }
        assert_eq!(
            text(&get(addr, "/latest/meta-data/local-ipv4").await),
            "10.254.254.2"
        );
        assert_eq!(
            text(&get(addr, "/v1/ssh-keys").await),
            format!("{}\n{}\n", keys()[0], keys()[1])
        );
        assert_eq!(
            text(&get(addr, "/latest/meta-data/public-keys/0/openssh-key").await),
            format!("{}\n", keys()[0])
        );
        for path in ["/v1/user-data", "/latest/user-data"] {
            let answer = get(addr, path).await;
            assert_eq!(answer.status, 200);
            assert_eq!(answer.header("content-type"), "application/octet-stream");
            assert_eq!(answer.header("cache-control"), "no-store");
            assert_eq!(
                answer.body,
                "#cloud-config\nruncmd: [\"echo hi\"]\n\u{1}\u{ff}".as_bytes()
            );
        }

        let json = |answer: &Answer| {
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_eq!(answer.header("content-type"), "application/json");
            assert_eq!(answer.header("cache-control"), "no-store");
            answer.json()
        };
        assert_eq!(
            json(&get(addr, "/v1/instance").await),
            serde_json::json!({"id": "vm-a", "name": "name-vm-a", "hostname": "host-vm-a"})
        );
        assert_eq!(
            json(&get(addr, "/v1/network").await),
            serde_json::json!({
                "guest_addr": "10.254.254.2",
                "prefix": 30,
                "gateway": "10.254.254.1",
                "dns": "10.254.254.1",
                "mac": "06:00:0a:fe:fe:02",
                "vm_addr": "10.200.0.7",
                "private_networks": ["backend"],
            })
        );

        // Only ever asked about its own VM, whatever the requests said.
        let asked = directory.asked.lock().unwrap().clone();
        assert!(!asked.is_empty());
        assert!(asked.iter().all(|id| id == "vm-a"), "{asked:?}");
        running.stop.cancel();
        running.task.await.unwrap();
    }

    #[tokio::test]
    async fn the_root_is_the_whole_document_in_json_and_an_index_in_text() {
        let directory = FakeDirectory::with(vec![instance("vm-a", &keys()[..1], Some("data"))]);
        let running = start_default(directory, "vm-a").await;
        let addr = running.addr;

        for accept in [
            "Accept: application/json",
            "Accept: text/html;q=0.9, APPLICATION/JSON; q=0.8",
        ] {
            let answer = request(addr, GUEST, "GET", "/", &[accept]).await;
            assert_eq!(answer.status, 200);
            assert_eq!(answer.header("content-type"), "application/json");
            assert_eq!(answer.header("cache-control"), "no-store");
            assert_eq!(
                answer.json(),
                serde_json::json!({
                    "id": "vm-a",
                    "name": "name-vm-a",
                    "hostname": "host-vm-a",
                    "network": {
                        "guest_addr": "10.254.254.2",
                        "prefix": 30,
                        "gateway": "10.254.254.1",
                        "dns": "10.254.254.1",
                        "mac": "06:00:0a:fe:fe:02",
                        "vm_addr": "10.200.0.7",
                        "private_networks": ["backend"],
                    },
                    "ssh_authorized_keys": [keys()[0]],
                    "user_data": "data",
                }),
                "{accept}"
            );
        }

        for accept in [&[][..], &["Accept: */*"], &["Accept: text/plain"]] {
            let answer = request(addr, GUEST, "GET", "/", accept).await;
            assert_eq!(answer.status, 200);
            assert_eq!(answer.header("content-type"), "text/plain; charset=utf-8");
            let listed: Vec<&str> = answer.text().lines().collect();
            assert_eq!(listed.len(), PATHS.len() - 1, "{listed:?}");
            assert!(listed.contains(&"/v1/instance") && listed.contains(&"/latest/user-data"));
            // Every path the index lists answers.
            for path in listed {
                assert_eq!(get(addr, path).await.status, 200, "{path}");
            }
        }
        running.stop.cancel();
        running.task.await.unwrap();
    }

    #[tokio::test]
    async fn what_is_not_there_is_404_and_other_methods_405() {
        let directory = FakeDirectory::with(vec![instance("vm-b", &[], None)]);
        let running = start_default(directory.clone(), "vm-b").await;
        let addr = running.addr;

        for path in [
            "/v1/user-data",
            "/latest/user-data",
            "/latest/meta-data/public-keys/0/openssh-key",
        ] {
            let answer = get(addr, path).await;
            assert_eq!(answer.status, 404, "{path}");
            assert_eq!(answer.header("cache-control"), "no-store");
        }
        assert_eq!(get(addr, "/v1/ssh-keys").await.text(), "");
        for path in [
            "/v2",
            "/v1/instance/",
            "/v1/instance/vm-a",
            "/latest/meta-data/",
            "/../v1/instance",
        ] {
            let answer = get(addr, path).await;
            assert_eq!(answer.status, 404, "{path}");
            assert!(answer.text().contains("no such metadata path"), "{path}");
        }
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let answer = request(
                addr,
                GUEST,
                method,
                "/v1/instance",
                &["Content-Length: 4", "", "body"],
            )
            .await;
            assert_eq!(answer.status, 405, "{method}");
            assert_eq!(answer.header("allow"), "GET, HEAD");
            assert_eq!(answer.header("cache-control"), "no-store");
        }
        // HEAD is GET without a body.
        let answer = request(addr, GUEST, "HEAD", "/v1/instance/id", &[]).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("content-length"), "4");
        assert!(answer.body.is_empty());

        // A VM the directory no longer knows: its instance endpoints are unavailable.
        directory.instances.lock().unwrap().clear();
        let answer = get(addr, "/v1/instance/id").await;
        assert_eq!(answer.status, 503);
        assert_eq!(answer.header("cache-control"), "no-store");
        running.stop.cancel();
        running.task.await.unwrap();
    }

    #[tokio::test]
    async fn only_the_expected_peer_is_answered() {
        let directory = FakeDirectory::with(vec![instance("vm-a", &keys(), Some("secret"))]);
        let running = start(directory.clone(), "vm-a", GUEST, LIMITS).await;
        let addr = running.addr;

        // From 127.0.0.1 (the listener is on 127.0.0.1, the expected peer is 127.0.0.2): refused,
        // whatever the path, method or headers say.
        for (method, path) in [
            ("GET", "/v1/user-data"),
            ("GET", "/"),
            ("GET", "/nope"),
            ("POST", "/v1/instance"),
        ] {
            let answer = request(
                addr,
                OTHER,
                method,
                path,
                &[
                    "X-Forwarded-For: 127.0.0.2",
                    "X-Real-IP: 127.0.0.2",
                    "Forwarded: for=127.0.0.2",
                ],
            )
            .await;
            assert_eq!(answer.status, 403, "{method} {path}");
            assert_eq!(answer.header("cache-control"), "no-store");
            assert!(!answer.text().contains("secret"));
        }
        assert!(
            directory.asked.lock().unwrap().is_empty(),
            "a refused peer costs no lookup"
        );
        // The expected peer is answered.
        assert_eq!(get(addr, "/v1/user-data").await.text(), "secret");
        running.stop.cancel();
        running.task.await.unwrap();
    }

    /// Polls `check` until it holds or `within` passes.
    async fn wait_until<F: AsyncFnMut() -> bool>(within: Duration, mut check: F) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_are_closed_at_once() {
        let directory = FakeDirectory::with(vec![instance("vm-a", &[], None)]);
        let running = start_default(directory, "vm-a").await;
        let addr = running.addr;

        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(connect(addr, GUEST).await);
        }
        let mut ninth = connect(addr, GUEST).await;
        assert!(
            closed_within(&mut ninth, Duration::from_secs(2)).await,
            "the 9th connection is closed"
        );
        for stream in &mut idle {
            assert!(
                !closed_within(stream, Duration::from_millis(50)).await,
                "the first 8 stay open"
            );
        }
        // One of the eight is served.
        let first = &mut idle[0];
        first
            .write_all(b"GET /v1/instance/id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        first.read_to_end(&mut raw).await.unwrap();
        let answer = parse_answer(&raw);
        assert_eq!((answer.status, answer.text()), (200, "vm-a"));

        // That connection's end freed its slot: a new one is served again.
        assert!(
            wait_until(Duration::from_secs(5), async || {
                let mut stream = connect(addr, GUEST).await;
                stream
                    .write_all(
                        b"GET /v1/instance/id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    )
                    .await
                    .is_ok()
                    && {
                        let mut raw = Vec::new();
                        stream.read_to_end(&mut raw).await.is_ok()
                            && raw.starts_with(b"HTTP/1.1 200")
                    }
            })
            .await
        );
        running.stop.cancel();
        running.task.await.unwrap();
    }

    #[tokio::test]
    async fn slow_clients_are_cut_off() {
        let directory = FakeDirectory::with(vec![instance("vm-a", &[], None)]);
        let timeout = Duration::from_millis(300);
        let limits = Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: timeout,
        };
        let running = start(directory, "vm-a", GUEST, limits).await;
        let addr = running.addr;

        // Headers trickling in a byte at a time never complete in time.
        let mut slow = connect(addr, GUEST).await;
        let started = Instant::now();
        slow.write_all(b"GET /v1/instance/id HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut cut = false;
        for byte in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .iter()
            .cycle()
            .take(200)
        {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if slow.write_all(&[*byte]).await.is_err()
                || closed_within(&mut slow, Duration::from_millis(1)).await
            {
                cut = true;
                break;
            }
        }
        assert!(cut, "a slow request was not cut off");
        let took = started.elapsed();
        assert!(took >= timeout && took < timeout * 10, "cut after {took:?}");

        // A keep-alive connection gets its answer, then the same time for its next request.
        let mut kept = connect(addr, GUEST).await;
        kept.write_all(b"GET /v1/instance/id HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        assert!(buf[..n].ends_with(b"vm-a"));
        let idle_since = Instant::now();
        assert!(closed_within(&mut kept, Duration::from_secs(5)).await);
        assert!(idle_since.elapsed() >= timeout - Duration::from_millis(50));

        // A prompt client is served as ever.
        assert_eq!(get(addr, "/v1/instance/id").await.text(), "vm-a");
        running.stop.cancel();
        running.task.await.unwrap();
    }

    #[tokio::test]
    async fn stop_ends_the_server_and_its_connections() {
        let directory = FakeDirectory::with(vec![instance("vm-a", &[], None)]);
        let running = start_default(directory, "vm-a").await;
        let addr = running.addr;
        assert_eq!(get(addr, "/v1/instance/id").await.text(), "vm-a");

        // An idle connection, one in the middle of its headers, and one kept alive after an
        // answer: none may hold the stop up (the header timeout is 10 s).
        let mut idle = connect(addr, GUEST).await;
        let mut partial = connect(addr, GUEST).await;
        partial
            .write_all(b"GET /v1/instance/id HTTP/1.1\r\nHost:")
            .await
            .unwrap();
        let mut kept = connect(addr, GUEST).await;
        kept.write_all(b"GET /v1/instance/id HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(kept.read(&mut buf).await.unwrap() > 0);

        let stopped_at = Instant::now();
        running.stop.cancel();
        tokio::time::timeout(Duration::from_secs(2), running.task)
            .await
            .expect("serve returned within 2 s of the stop")
            .unwrap();
        assert!(stopped_at.elapsed() < HEADER_TIMEOUT);
        for stream in [&mut idle, &mut partial, &mut kept] {
            assert!(closed_within(stream, Duration::from_secs(1)).await);
        }
        let refused = TcpSocket::new_v4().unwrap().connect(addr).await;
        assert!(refused.is_err(), "the listener is closed");
    }

    #[tokio::test]
    async fn oversized_requests_get_hyper_s_answers() {
        let directory = FakeDirectory::with(vec![instance("vm-a", &[], None)]);
        let running = start_default(directory.clone(), "vm-a").await;
        let addr = running.addr;

        let many: Vec<String> = (0..101).map(|i| format!("X-H{i}: v")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            request(addr, GUEST, "GET", "/v1/instance/id", &many)
                .await
                .status,
            431
        );
        // hyper stops reading at 408 KiB, though one read may fill the buffer's spare capacity
        // beyond it (420 KiB passes); half a MiB never does.
        for kib in [512, 1024] {
            let huge = format!("X-Big: {}", "a".repeat(kib * 1024));
            let answer = request(addr, GUEST, "GET", "/v1/instance/id", &[&huge]).await;
            assert_eq!(answer.status, 431, "{kib} KiB of headers");
        }
        let long = format!("/{}", "a".repeat(65534));
        assert_eq!(request(addr, GUEST, "GET", &long, &[]).await.status, 414);
        // Just under the limits is an ordinary request.
        let fits = format!("X-Big: {}", "a".repeat(300 * 1024));
        let answer = request(addr, GUEST, "GET", "/v1/instance/id", &[&fits, many[1]]).await;
        assert_eq!((answer.status, answer.text()), (200, "vm-a"));
        running.stop.cancel();
        running.task.await.unwrap();
    }

    #[test]
    fn accept_asks_for_json_only_when_it_names_it() {
        let accept = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
            wants_json(&headers)
        };
        assert!(accept("application/json"));
        assert!(accept("text/plain, application/json;q=0.5"));
        assert!(!accept("*/*"));
        assert!(!accept("application/*"));
        assert!(!accept("application/jsonx"));
        assert!(!wants_json(&HeaderMap::new()));
    }
}

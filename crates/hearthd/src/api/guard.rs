//! What may reach a handler at all: one middleware in front of every route, and the listeners
//! that tell it which transport a request came over.
//!
//! - **Host.** A request over TCP whose `Host` names something other than hearthd's listen
//!   address, a loopback name (`localhost`, `*.localhost`, a loopback IP) or a name in
//!   `server.allowed_hosts` is refused (`403 forbidden_host`): a web page whose DNS name was
//!   rebound to 127.0.0.1 must not reach the API. An IP literal cannot be rebound, so when hearthd
//!   listens on every address (`0.0.0.0`, `::`) any IP literal is accepted. A request without a
//!   `Host` comes from no browser and passes. The unix socket has no Host check: no browser can
//!   connect to it.
//! - **Origin.** Browsers send `Origin` with every cross-origin request, every POST and every
//!   WebSocket handshake. It must be hearthd's own origin (`http://` + the request's `Host`) or
//!   match `server.allowed_origins`; anything else is refused (`403 forbidden_origin`) before a
//!   handler runs, so a page can neither drive a VM nor open an exec WebSocket. Allowed foreign
//!   origins get CORS headers and preflight answers.
//! - **Limits.** Ordinary requests take one of `server.max_requests` slots for as long as their
//!   handler runs; up to `server.max_queued_requests` more wait for one, and beyond that a request
//!   is answered `503 overloaded` at once. Streams (exec WebSockets and NDJSON streams, followed
//!   logs, file transfers) can live for hours, so they never take those slots: each takes one of
//!   `server.max_streams`, held until its body ends (for a WebSocket: until its connection
//!   closes), and the next one over the limit gets `503 overloaded`. However many streams are
//!   open, health and list still answer.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use futures_util::StreamExt;
use hearth_api::ErrorCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::config::ServerConfig;

/// Which listener a request came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
}

/// The guard's rules and counters, shared by every request.
#[derive(Debug)]
pub struct Guard {
    listen: SocketAddr,
    allowed_hosts: Vec<String>,
    allowed_origins: Vec<String>,
    max_requests: usize,
    max_queued: usize,
    max_streams: usize,
    max_json_body_bytes: usize,
    /// Requests running or waiting: `max_requests + max_queued` permits.
    admitted: Arc<Semaphore>,
    /// Requests running: `max_requests` permits.
    running: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

impl Guard {
    pub fn new(listen: SocketAddr, server: &ServerConfig) -> Guard {
        let max_requests = server.max_requests.clamp(1, Semaphore::MAX_PERMITS / 2);
        let max_queued = server.max_queued_requests.min(Semaphore::MAX_PERMITS / 2);
        let max_streams = server.max_streams.clamp(1, Semaphore::MAX_PERMITS);
        Guard {
            listen,
            allowed_hosts: server.allowed_hosts.clone(),
            allowed_origins: server.allowed_origins.clone(),
            max_requests,
            max_queued,
            max_streams,
            max_json_body_bytes: server.max_json_body_bytes,
            admitted: Arc::new(Semaphore::new(max_requests + max_queued)),
            running: Arc::new(Semaphore::new(max_requests)),
            streams: Arc::new(Semaphore::new(max_streams)),
        }
    }

    /// The largest JSON body a handler accepts.
    pub fn max_json_body_bytes(&self) -> usize {
        self.max_json_body_bytes
    }

    /// May a TCP request carry `Host: host` (`name[:port]`)?
    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return ip.is_loopback() || ip == self.listen.ip() || self.listen.ip().is_unspecified();
        }
        name == "localhost"
            || name.ends_with(".localhost")
            || self.allowed_hosts.iter().any(|p| host_matches(p, &name))
    }

    fn origin_verdict(&self, origin: &str, host: Option<&str>) -> Origin {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        let own = origin
            .strip_prefix("http://")
            .is_some_and(|authority| host.is_some_and(|h| h.eq_ignore_ascii_case(authority)));
        if own {
            Origin::Own
        } else if self
            .allowed_origins
            .iter()
            .any(|p| origin_matches(p, &origin))
        {
            Origin::Allowed
        } else {
            Origin::Refused
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// hearthd's own pages (`/docs`).
    Own,
    /// A foreign origin the configuration allows: answered with CORS headers.
    Allowed,
    Refused,
}

/// `Host` without its port, lowercase, without a trailing dot; IPv6 literals without brackets.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// `pattern` is a lowercase name or `*.suffix` (any name below `suffix`, not `suffix` itself).
fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty()),
        None => pattern == name,
    }
}

/// `pattern` is `*`, a lowercase origin, or `scheme://*.suffix[:port]`.
fn origin_matches(pattern: &str, origin: &str) -> bool {
    if pattern == "*" || pattern == origin {
        return true;
    }
    let Some((scheme, suffix)) = pattern.split_once("*.") else {
        return false;
    };
    origin
        .strip_prefix(scheme)
        .and_then(|rest| rest.strip_suffix(suffix))
        .and_then(|head| head.strip_suffix('.'))
        .is_some_and(|label| !label.is_empty() && !label.contains([':', '/', '@']))
}

/// Streams live for as long as their client keeps them; they are counted apart from requests.
fn is_stream(req: &Request) -> bool {
    if req.headers().contains_key(header::UPGRADE) {
        return true;
    }
    let prefix = format!("{}/vms/", hearth_api::API_PREFIX);
    let Some(rest) = req.uri().path().strip_prefix(&prefix) else {
        return false;
    };
    match rest.split_once('/').map_or("", |(_, tail)| tail) {
        "exec/ws" | "exec/stream" | "files" => true,
        "logs" => req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|pair| pair == "follow=true")),
        _ => false,
    }
}

/// The middleware: Host, Origin, then a request slot or a stream slot.
pub async fn check(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let conn = req
        .extensions()
        .get::<ConnectInfo<ConnInfo>>()
        .map(|c| c.0.clone());
    let transport = conn.as_ref().map_or(Transport::Tcp, |c| c.transport);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(str::to_owned);
    if transport == Transport::Tcp
        && let Some(host) = &host
        && !guard.host_allowed(host)
    {
        return ApiError::new(
            ErrorCode::ForbiddenHost,
            format!(
                "requests for host {host:?} are refused: hearthd answers to its listen address, \
                 loopback names and the names in server.allowed_hosts only"
            ),
        )
        .into_response();
    }
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut cors = None;
    if let Some(origin) = origin {
        let text = String::from_utf8_lossy(origin.as_bytes()).into_owned();
        match guard.origin_verdict(&text, host.as_deref()) {
            Origin::Own => {}
            Origin::Allowed => cors = Some(origin),
            Origin::Refused => {
                return ApiError::new(
                    ErrorCode::ForbiddenOrigin,
                    format!(
                        "requests from web pages of {text:?} are refused; add the origin to \
                         server.allowed_origins to allow them"
                    ),
                )
                .into_response();
            }
        }
    }
    if let Some(origin) = &cors
        && req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return preflight(origin, &req);
    }
    let mut resp = if is_stream(&req) {
        let Ok(permit) = guard.streams.clone().try_acquire_owned() else {
            return ApiError::new(
                ErrorCode::Overloaded,
                format!(
                    "hearthd has {} streams open, as many as server.max_streams allows; try again when one has ended",
                    guard.max_streams
                ),
            )
            .into_response();
        };
        hold(next.run(req).await, permit, conn.as_ref())
    } else {
        let Ok(_admitted) = guard.admitted.clone().try_acquire_owned() else {
            return ApiError::new(
                ErrorCode::Overloaded,
                format!(
                    "hearthd is handling {} requests and has {} more waiting \
                     (server.max_requests, server.max_queued_requests); try again shortly",
                    guard.max_requests, guard.max_queued
                ),
            )
            .into_response();
        };
        let Ok(_running) = guard.running.clone().acquire_owned().await else {
            return ApiError::new(ErrorCode::Internal, "the request limiter is closed")
                .into_response();
        };
        next.run(req).await
    };
    if let Some(origin) = cors {
        let headers = resp.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-hearth-file-mode, x-hearth-file-size"),
        );
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
    resp
}

/// Keeps a stream's permit for as long as the stream lives: the response body, or for a
/// WebSocket (whose 101 response has no body) the connection it took over.
fn hold(resp: Response, permit: OwnedSemaphorePermit, conn: Option<&ConnInfo>) -> Response {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(conn) = conn
    {
        conn.hold(permit);
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &permit;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight(origin: &HeaderValue, req: &Request) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let headers = resp.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, DELETE"),
    );
    if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
    resp
}

/// What the guard knows of a request's connection: its transport, and the stream permits of
/// WebSockets running on it (released when the connection closes).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    transport: Transport,
    /// The peer, as callers are told (`vm::Caller::source`).
    pub source: crate::vm::Source,
    held: Arc<Mutex<Vec<OwnedSemaphorePermit>>>,
}

/// A listener's peer address, as a caller's source.
pub trait PeerSource {
    fn source(&self) -> crate::vm::Source;
}

impl PeerSource for SocketAddr {
    fn source(&self) -> crate::vm::Source {
        crate::vm::Source::Tcp(*self)
    }
}

impl PeerSource for tokio::net::unix::SocketAddr {
    fn source(&self) -> crate::vm::Source {
        crate::vm::Source::UnixSocket
    }
}

impl ConnInfo {
    fn new(transport: Transport, source: crate::vm::Source) -> ConnInfo {
        ConnInfo {
            transport,
            source,
            held: Arc::default(),
        }
    }

    fn hold(&self, permit: OwnedSemaphorePermit) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(permit);
    }
}

/// A listener whose connections carry a [`ConnInfo`]; serve it with
/// `into_make_service_with_connect_info::<ConnInfo>()`.
#[derive(Debug)]
pub struct GuardedListener<L> {
    inner: L,
    transport: Transport,
}

impl<L> GuardedListener<L> {
    pub fn new(inner: L, transport: Transport) -> GuardedListener<L> {
        GuardedListener { inner, transport }
    }
}

impl<L: Listener> Listener for GuardedListener<L>
where
    L::Addr: PeerSource,
{
    type Io = Conn<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        let info = ConnInfo::new(self.transport, addr.source());
        (Conn { io, info }, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl<L: Listener> Connected<IncomingStream<'_, GuardedListener<L>>> for ConnInfo
where
    L::Addr: PeerSource,
{
    fn connect_info(stream: IncomingStream<'_, GuardedListener<L>>) -> Self {
        stream.io().info.clone()
    }
}

/// One accepted connection; dropping it releases the permits its WebSockets held.
#[derive(Debug)]
pub struct Conn<T> {
    io: T,
    info: ConnInfo,
}

impl<T: AsyncRead + Unpin> AsyncRead for Conn<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Conn<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use axum::routing::get;
    use http_body_util::BodyExt;
    use tokio::sync::Notify;
    use tower::ServiceExt;

    use super::*;

    fn guard(f: impl FnOnce(&mut ServerConfig)) -> Arc<Guard> {
        let server = server(f);
        Arc::new(Guard::new("127.0.0.1:7070".parse().unwrap(), &server))
    }

    fn server(f: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
        let mut server = ServerConfig {
            unix_socket: None,
            unix_socket_group: None,
            allowed_hosts: vec!["hearth.lan".into(), "*.corp.example".into()],
            allowed_origins: vec![
                "https://*.example.com".into(),
                "http://localhost:3000".into(),
            ],
            max_requests: 64,
            max_queued_requests: 256,
            max_streams: 128,
            max_json_body_bytes: 1 << 20,
        };
        f(&mut server);
        server
    }

    #[test]
    fn hosts() {
        let g = guard(|_| {});
        for ok in [
            "127.0.0.1:7070",
            "127.0.0.2",
            "[::1]:7070",
            "localhost:7070",
            "LOCALHOST.",
            "api.localhost:7070",
            "hearth.lan:7070",
            "a.corp.example",
            "a.b.corp.example:1",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example:7070",
            "corp.example",
            "xcorp.example",
            "hearth.lan.evil.example",
            "localhost.evil.example",
            "10.0.0.1:7070",
            "[2001:db8::1]:7070",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        // Listening on every address: any IP literal (none can be rebound), still no names.
        let any = Guard::new("0.0.0.0:7070".parse().unwrap(), &server(|_| {}));
        assert!(any.host_allowed("10.0.0.1:7070") && any.host_allowed("[2001:db8::1]:7070"));
        assert!(!any.host_allowed("evil.example:7070"));
    }

    #[test]
    fn origins() {
        let g = guard(|_| {});
        let host = Some("127.0.0.1:7070");
        assert_eq!(g.origin_verdict("http://127.0.0.1:7070", host), Origin::Own);
        for ok in [
            "https://app.example.com",
            "https://a.b.example.com/",
            "http://localhost:3000",
            "HTTP://LOCALHOST:3000",
        ] {
            assert_eq!(g.origin_verdict(ok, host), Origin::Allowed, "{ok}");
        }
        for bad in [
            "https://evil.example",
            "http://127.0.0.1:7071",
            "https://127.0.0.1:7070",
            "http://app.example.com",
            "https://example.com",
            "https://app.example.com:8443",
            "https://evil.com/.example.com",
            "http://localhost:30000",
            "null",
        ] {
            assert_eq!(g.origin_verdict(bad, host), Origin::Refused, "{bad}");
        }
        let any = guard(|s| s.allowed_origins = vec!["*".into()]);
        assert_eq!(any.origin_verdict("https://x.test", host), Origin::Allowed);
    }

    /// A router with the guard in front of a handler that waits for `release`, a followed log
    /// whose body never ends, and a health check.
    fn app(guard: Arc<Guard>, release: Arc<Notify>) -> Router {
        let slow = move || {
            let release = release.clone();
            async move {
                release.notified().await;
                "done"
            }
        };
        let forever = || async {
            Body::from_stream(futures_util::stream::pending::<
                Result<bytes::Bytes, std::io::Error>,
            >())
        };
        Router::new()
            .route("/v1/vms/{name}/exec", axum::routing::post(slow))
            .route("/v1/vms/{name}/logs", get(forever))
            .route("/v1/health", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(guard, check))
    }

    fn req(method: &str, uri: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "127.0.0.1:7070")
            .body(Body::empty())
            .unwrap()
    }

    async fn error_code(resp: Response) -> (StatusCode, String) {
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        (status, v["error"].as_str().unwrap_or("").to_owned())
    }

    #[tokio::test]
    async fn excess_requests_get_503_at_once_and_queued_ones_are_served() {
        let release = Arc::new(Notify::new());
        let g = guard(|s| {
            s.max_requests = 1;
            s.max_queued_requests = 1;
        });
        let app = app(g, release.clone());
        let running = tokio::spawn(app.clone().oneshot(req("POST", "/v1/vms/a/exec")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = tokio::spawn(app.clone().oneshot(req("POST", "/v1/vms/a/exec")));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Neither a third request nor a health check waits: 503 with the JSON error.
        for uri in ["/v1/vms/a/exec", "/v1/health"] {
            let method = if uri.ends_with("exec") { "POST" } else { "GET" };
            let resp = tokio::time::timeout(
                Duration::from_secs(5),
                app.clone().oneshot(req(method, uri)),
            )
            .await
            .expect("an excess request is answered at once")
            .unwrap();
            let (status, code) = error_code(resp).await;
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            );
        }
        release.notify_one();
        assert_eq!(running.await.unwrap().unwrap().status(), StatusCode::OK);
        release.notify_one();
        assert_eq!(queued.await.unwrap().unwrap().status(), StatusCode::OK);
        let resp = app.oneshot(req("GET", "/v1/health")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn streams_have_their_own_limit_and_never_block_requests() {
        let g = guard(|s| {
            s.max_requests = 1;
            s.max_queued_requests = 0;
            s.max_streams = 1;
        });
        let app = app(g, Arc::new(Notify::new()));
        let follow = "/v1/vms/a/logs?tail=5&follow=true";
        let open = app.clone().oneshot(req("GET", follow)).await.unwrap();
        assert_eq!(open.status(), StatusCode::OK);
        let (status, code) =
            error_code(app.clone().oneshot(req("GET", follow)).await.unwrap()).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
        );
        // The open stream holds no request slot: health answers, twice in a row.
        for _ in 0..2 {
            let resp = app.clone().oneshot(req("GET", "/v1/health")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        // A log read without follow is an ordinary request.
        let resp = app
            .clone()
            .oneshot(req("GET", "/v1/vms/a/logs?tail=5"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        drop(resp);
        // The stream's slot comes back when its body goes.
        drop(open);
        let again = app.oneshot(req("GET", follow)).await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn allowed_origins_get_cors_answers() {
        let app = app(guard(|_| {}), Arc::new(Notify::new()));
        let mut preflight = req("OPTIONS", "/v1/vms/a/exec");
        let headers = preflight.headers_mut();
        headers.insert(
            "origin",
            HeaderValue::from_static("https://app.example.com"),
        );
        headers.insert(
            "access-control-request-method",
            HeaderValue::from_static("POST"),
        );
        headers.insert(
            "access-control-request-headers",
            HeaderValue::from_static("content-type"),
        );
        let resp = app.clone().oneshot(preflight).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let h = resp.headers();
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-allow-headers"], "content-type");
        let mut get = req("GET", "/v1/health");
        get.headers_mut().insert(
            "origin",
            HeaderValue::from_static("https://app.example.com"),
        );
        let resp = app.clone().oneshot(get).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()["access-control-allow-origin"],
            "https://app.example.com"
        );
        // Its own pages get no CORS headers (they need none).
        let mut own = req("GET", "/v1/health");
        own.headers_mut()
            .insert("origin", HeaderValue::from_static("http://127.0.0.1:7070"));
        let resp = app.oneshot(own).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.headers().contains_key("access-control-allow-origin"));
    }
}

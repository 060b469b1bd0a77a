//! hearthd's REST API over plain HTTP, on TCP (`http://host:port`) or on hearthd's unix socket
//! (`unix:///path/to/hearth.sock`): one method per endpoint, errors turned into [`CliError`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hearth_api::{
    API_PREFIX, Backup, CreateNetworkRequest, CreateVmRequest, EgressRequest, ErrorBody, ErrorCode,
    Health, Network, ResizeVmRequest, RestoreRequest, Vm, VmDetail,
};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::{WebSocketStream, tungstenite};

use crate::error::{CliError, Result};

/// Reads and other quick calls.
const QUICK_TIMEOUT: Duration = Duration::from_secs(60);
/// Create, start, stop, restart and delete wait for the VM; under emulation that takes a while.
const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Header of `GET …/files` carrying the file's mode in octal.
pub const FILE_MODE_HEADER: &str = "x-hearth-file-mode";

pub type ExecSocket = WebSocketStream<Connection>;

/// A connection to hearthd for the exec WebSocket: TCP or the unix socket.
#[derive(Debug)]
pub enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_flush(cx),
            Connection::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A decoded response together with the JSON exactly as hearthd sent it (for `--json`).
#[derive(Debug)]
pub struct Json<T> {
    pub data: T,
    pub raw: Value,
}

impl Json<Value> {
    /// A JSON value made here (not received), printed the same way.
    pub fn local(raw: Value) -> Json<Value> {
        Json {
            data: raw.clone(),
            raw,
        }
    }
}

/// Lifecycle operations that answer with the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Start,
    Stop { timeout_secs: Option<u64> },
    Restart,
    Pause,
    Resume,
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The HTTP base of every request (`http://localhost/` over a unix socket).
    base: Url,
    /// hearthd's unix socket, when the URL was `unix:///path`.
    socket: Option<PathBuf>,
    /// The URL as given, for messages.
    shown: String,
    /// `Bearer <api key>`, sent with every request when the CLI has a key.
    authorization: Option<reqwest::header::HeaderValue>,
}

impl Client {
    pub fn new(url: &str, api_key: Option<&str>) -> Result<Client> {
        let bad_url = |why: String| {
            CliError::input(
                ErrorCode::InvalidRequest,
                format!("bad hearthd URL `{url}`: {why}"),
            )
        };
        let parsed = Url::parse(url).map_err(|e| bad_url(e.to_string()))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")));
        let (base, socket) = match parsed.scheme() {
            "unix" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) || parsed.path().len() < 2 {
                    return Err(bad_url(
                        "a unix socket URL names an absolute path, e.g. unix:///var/lib/hearth/hearth.sock"
                            .into(),
                    ));
                }
                let socket = PathBuf::from(parsed.path());
                builder = builder.unix_socket(socket.clone()).no_proxy();
                let base = Url::parse("http://localhost/").map_err(|e| bad_url(e.to_string()))?;
                (base, Some(socket))
            }
            "http" => {
                if parsed.host_str().is_none() || parsed.cannot_be_a_base() {
                    return Err(bad_url("it names no host".into()));
                }
                if is_loopback(&parsed) {
                    // A proxy from the environment must not capture the local daemon's traffic.
                    builder = builder.no_proxy();
                }
                (parsed, None)
            }
            other => {
                return Err(bad_url(format!(
                    "hearth speaks plain HTTP (http://) or a unix socket (unix:///path), not {other}"
                )));
            }
        };
        let authorization = match api_key {
            Some(key) => {
                let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| {
                        CliError::input(
                            ErrorCode::InvalidRequest,
                            "the API key has characters no HTTP header may hold",
                        )
                    })?;
                value.set_sensitive(true);
                let mut headers = reqwest::header::HeaderMap::new();
                headers.insert(reqwest::header::AUTHORIZATION, value.clone());
                builder = builder.default_headers(headers);
                Some(value)
            }
            None => None,
        };
        let http = builder
            .build()
            .map_err(|e| CliError::protocol(format!("cannot set up the HTTP client: {e}")))?;
        let shown = match &socket {
            Some(path) => format!("unix://{}", path.display()),
            None => base.as_str().trim_end_matches('/').to_owned(),
        };
        Ok(Client {
            http,
            base,
            socket,
            shown,
            authorization,
        })
    }

    /// The URL hearthd is expected at, for messages.
    pub fn base_url(&self) -> &str {
        &self.shown
    }

    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty();
            path.extend(API_PREFIX.split('/').filter(|s| !s.is_empty()));
            path.extend(segments);
        }
        url.set_query(None);
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        url
    }

    pub async fn health(&self) -> Result<Json<Health>> {
        let req = self
            .http
            .get(self.url(&["health"], &[]))
            .timeout(QUICK_TIMEOUT);
        json(self.send(req).await?).await
    }

    pub async fn list_vms(&self) -> Result<Json<Vec<Vm>>> {
        let req = self
            .http
            .get(self.url(&["vms"], &[]))
            .timeout(QUICK_TIMEOUT);
        json(self.send(req).await?).await
    }

    pub async fn get_vm(&self, name: &str) -> Result<Json<VmDetail>> {
        let req = self.http.get(self.url(&["vms", name], &[]));
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    pub async fn create_vm(&self, body: &CreateVmRequest) -> Result<Json<VmDetail>> {
        let req = self.http.post(self.url(&["vms"], &[])).json(body);
        json(self.send(req.timeout(LIFECYCLE_TIMEOUT)).await?).await
    }

    pub async fn delete_vm(&self, name: &str) -> Result<()> {
        let req = self.http.delete(self.url(&["vms", name], &[]));
        self.send(req.timeout(LIFECYCLE_TIMEOUT)).await?;
        Ok(())
    }

    pub async fn lifecycle(&self, name: &str, op: Lifecycle) -> Result<Json<Vm>> {
        let (verb, query, extra) = match op {
            Lifecycle::Start => ("start", vec![], 0),
            Lifecycle::Restart => ("restart", vec![], 0),
            Lifecycle::Pause => ("pause", vec![], 0),
            Lifecycle::Resume => ("resume", vec![], 0),
            Lifecycle::Stop { timeout_secs: None } => ("stop", vec![], 0),
            Lifecycle::Stop {
                timeout_secs: Some(secs),
            } => ("stop", vec![("timeout_secs", secs.to_string())], secs),
        };
        let timeout = LIFECYCLE_TIMEOUT + Duration::from_secs(extra);
        let req = self.http.post(self.url(&["vms", name, verb], &query));
        json(self.send(req.timeout(timeout)).await?).await
    }

    /// Gives a stopped VM a new shape; answers with the VM.
    pub async fn resize_vm(&self, name: &str, body: &ResizeVmRequest) -> Result<Json<VmDetail>> {
        let req = self
            .http
            .post(self.url(&["vms", name, "resize"], &[]))
            .json(body);
        // Growing a disk checks and resizes its filesystem: lifecycle time, not a quick call.
        json(self.send(req.timeout(LIFECYCLE_TIMEOUT)).await?).await
    }

    /// Replaces the VM's egress policy; answers with the VM, its new policy in `network`.
    pub async fn set_egress(&self, name: &str, body: &EgressRequest) -> Result<Json<VmDetail>> {
        let req = self
            .http
            .put(self.url(&["vms", name, "egress"], &[]))
            .json(body);
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    /// `GET /v1/<segments>?<query>` of a quick read.
    pub async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Json<T>> {
        let req = self.http.get(self.url(segments, query));
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    /// A quick `POST` or `PUT` of a JSON body.
    pub async fn send_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        body: &B,
    ) -> Result<Json<T>> {
        let req = self
            .http
            .request(method, self.url(segments, &[]))
            .json(body);
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    /// A quick `DELETE`; its answer's body (JSON) if it has one.
    pub async fn delete(&self, segments: &[&str]) -> Result<Option<Json<Value>>> {
        let req = self.http.delete(self.url(segments, &[]));
        let resp = self.send(req.timeout(QUICK_TIMEOUT)).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        json(resp).await.map(Some)
    }

    pub async fn list_networks(&self) -> Result<Json<Vec<Network>>> {
        let req = self.http.get(self.url(&["networks"], &[]));
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    pub async fn create_network(&self, body: &CreateNetworkRequest) -> Result<Json<Network>> {
        let req = self.http.post(self.url(&["networks"], &[])).json(body);
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    /// Backs up a stopped VM's root disk.
    pub async fn create_backup(&self, name: &str) -> Result<Json<Backup>> {
        let req = self.http.post(self.url(&["vms", name, "backups"], &[]));
        // A sparse copy of a big disk takes as long as its data: lifecycle time.
        json(self.send(req.timeout(LIFECYCLE_TIMEOUT)).await?).await
    }

    pub async fn list_backups(&self, name: &str) -> Result<Json<Vec<Backup>>> {
        let req = self.http.get(self.url(&["vms", name, "backups"], &[]));
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    pub async fn delete_backup(&self, name: &str, backup: &str) -> Result<()> {
        let req = self
            .http
            .delete(self.url(&["vms", name, "backups", backup], &[]));
        self.send(req.timeout(QUICK_TIMEOUT)).await?;
        Ok(())
    }

    /// Puts backup `backup` in place of the stopped VM's root disk; answers with the VM.
    pub async fn restore(&self, name: &str, backup: &str) -> Result<Json<VmDetail>> {
        let body = RestoreRequest {
            backup: backup.to_owned(),
        };
        let req = self
            .http
            .post(self.url(&["vms", name, "restore"], &[]))
            .json(&body);
        json(self.send(req.timeout(LIFECYCLE_TIMEOUT)).await?).await
    }

    /// Every VM's state and what its VMM uses now.
    pub async fn stats(&self) -> Result<Json<Vec<hearth_api::VmStats>>> {
        let req = self.http.get(self.url(&["stats"], &[]));
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    /// Runs a command to completion in the VM and collects its output.
    pub async fn exec(
        &self,
        name: &str,
        body: &hearth_api::ExecRequest,
    ) -> Result<Json<hearth_api::ExecResponse>> {
        let req = self
            .http
            .post(self.url(&["vms", name, "exec"], &[]))
            .json(body);
        json(self.send(req.timeout(LIFECYCLE_TIMEOUT)).await?).await
    }

    /// A stopped VM's archive as a streamed response body (its length in Content-Length).
    pub async fn export(&self, name: &str) -> Result<Response> {
        let req = self.http.get(self.url(&["vms", name, "export"], &[]));
        self.send(req).await
    }

    /// Makes a VM of the archive `body` streams; answers with the new (stopped) VM.
    pub async fn import(&self, body: reqwest::Body) -> Result<Json<VmDetail>> {
        let req = self
            .http
            .post(self.url(&["imports"], &[]))
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(body);
        json(self.send(req).await?).await
    }

    pub async fn create_volume(
        &self,
        body: &hearth_api::CreateVolumeRequest,
    ) -> Result<Json<hearth_api::Volume>> {
        let req = self.http.post(self.url(&["volumes"], &[])).json(body);
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    pub async fn list_volumes(&self) -> Result<Json<Vec<hearth_api::Volume>>> {
        let req = self.http.get(self.url(&["volumes"], &[]));
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    pub async fn delete_volume(&self, volume: &str) -> Result<()> {
        let req = self.http.delete(self.url(&["volumes", volume], &[]));
        self.send(req.timeout(QUICK_TIMEOUT)).await?;
        Ok(())
    }

    /// Attaches `volume` to the stopped `vm` at `path`; answers with the VM.
    pub async fn attach_volume(
        &self,
        vm: &str,
        volume: &str,
        path: &str,
    ) -> Result<Json<VmDetail>> {
        let body = hearth_api::AttachVolumeRequest {
            path: path.to_owned(),
        };
        let req = self
            .http
            .put(self.url(&["vms", vm, "volumes", volume], &[]))
            .json(&body);
        // The first attach formats the volume: lifecycle time.
        json(self.send(req.timeout(LIFECYCLE_TIMEOUT)).await?).await
    }

    /// Detaches `volume` from the stopped `vm`; answers with the VM.
    pub async fn detach_volume(&self, vm: &str, volume: &str) -> Result<Json<VmDetail>> {
        let req = self
            .http
            .delete(self.url(&["vms", vm, "volumes", volume], &[]));
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    pub async fn delete_network(&self, network: &str) -> Result<()> {
        let req = self.http.delete(self.url(&["networks", network], &[]));
        self.send(req.timeout(QUICK_TIMEOUT)).await?;
        Ok(())
    }

    /// Makes `vm` a member of `network` (`connect: true`) or takes it out; answers with the
    /// network.
    pub async fn network_member(
        &self,
        network: &str,
        vm: &str,
        connect: bool,
    ) -> Result<Json<Network>> {
        let url = self.url(&["networks", network, "members", vm], &[]);
        let req = if connect {
            self.http.put(url)
        } else {
            self.http.delete(url)
        };
        json(self.send(req.timeout(QUICK_TIMEOUT)).await?).await
    }

    /// The log as a streamed response body.
    pub async fn logs(
        &self,
        name: &str,
        source: &str,
        follow: bool,
        tail: Option<u64>,
    ) -> Result<Response> {
        let mut query = vec![
            ("source", source.to_owned()),
            ("follow", follow.to_string()),
        ];
        if let Some(n) = tail {
            query.push(("tail", n.to_string()));
        }
        let req = self.http.get(self.url(&["vms", name, "logs"], &query));
        self.send(req).await
    }

    /// Writes `body` to `path` in the guest; `mode` is the permission bits, sent in octal.
    pub async fn put_file(
        &self,
        name: &str,
        path: &str,
        mode: Option<u32>,
        body: reqwest::Body,
    ) -> Result<()> {
        let mut query = vec![("path", path.to_owned())];
        if let Some(mode) = mode {
            query.push(("mode", format!("{mode:o}")));
        }
        let req = self
            .http
            .put(self.url(&["vms", name, "files"], &query))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send(req).await?;
        Ok(())
    }

    /// The file's mode (when hearthd sent it) and its bytes as a streamed response body.
    pub async fn get_file(&self, name: &str, path: &str) -> Result<(Option<u32>, Response)> {
        let query = [("path", path.to_owned())];
        let req = self.http.get(self.url(&["vms", name, "files"], &query));
        let resp = self.send(req).await?;
        let mode = resp
            .headers()
            .get(FILE_MODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
        Ok((mode, resp))
    }

    /// Opens the exec WebSocket of a VM.
    pub async fn exec_socket(&self, name: &str) -> Result<ExecSocket> {
        let mut url = self.url(&["vms", name, "exec", "ws"], &[]);
        if url.set_scheme("ws").is_err() {
            return Err(CliError::protocol(format!(
                "cannot make a WebSocket URL of {url}"
            )));
        }
        let connection = self.connect().await.map_err(|e| CliError::Unreachable {
            url: self.base_url().to_owned(),
            reason: e.to_string(),
        })?;
        let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
            .map_err(|e| CliError::protocol(format!("cannot make a WebSocket request: {e}")))?;
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .insert(reqwest::header::AUTHORIZATION, value.clone());
        }
        let connect = tokio_tungstenite::client_async(request, connection);
        let result = match tokio::time::timeout(QUICK_TIMEOUT, connect).await {
            Ok(result) => result,
            Err(_) => {
                return Err(CliError::protocol(
                    "hearthd did not accept the exec session in time",
                ));
            }
        };
        match result {
            Ok((socket, _)) => Ok(socket),
            Err(tungstenite::Error::Http(resp)) => {
                let status = resp.status();
                let body = resp.body().as_deref().unwrap_or_default();
                if let Some(err) = error_from_body(body) {
                    return Err(err);
                }
                // The handshake may not have read the whole body; ask plainly why.
                let vm = self.get_vm(name).await?.data.vm;
                if status.as_u16() == StatusCode::CONFLICT.as_u16()
                    && vm.state != hearth_api::VmState::Running
                {
                    // What hearthd says in that body: the VM is not running (or is paused).
                    let message =
                        format!("VM {:?} is {}: exec needs it running", vm.name, vm.state);
                    let raw =
                        serde_json::json!({"error": ErrorCode::InvalidState, "message": message});
                    return Err(CliError::Api {
                        code: Some(ErrorCode::InvalidState),
                        message,
                        raw: Some(raw),
                    });
                }
                Err(CliError::protocol(format!(
                    "hearthd refused the exec session ({status})"
                )))
            }
            Err(tungstenite::Error::Io(e)) => Err(CliError::Unreachable {
                url: self.base_url().to_owned(),
                reason: e.to_string(),
            }),
            Err(e) => Err(CliError::protocol(format!("exec session failed: {e}"))),
        }
    }

    /// A new connection to hearthd, for the WebSocket.
    async fn connect(&self) -> std::io::Result<Connection> {
        let connect = async {
            match &self.socket {
                Some(path) => UnixStream::connect(path).await.map(Connection::Unix),
                None => {
                    let host = self.base.host_str().unwrap_or("localhost");
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let port = self.base.port_or_known_default().unwrap_or(80);
                    TcpStream::connect((host, port)).await.map(Connection::Tcp)
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting timed out",
                ))
            })
    }

    /// Sends the request; any answer but a success becomes the error its body describes.
    async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        Err(error_from_body(&body).unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            let code = match status {
                StatusCode::NOT_FOUND => Some(ErrorCode::NotFound),
                StatusCode::BAD_REQUEST => Some(ErrorCode::InvalidRequest),
                _ => None,
            };
            let message = if text.is_empty() {
                format!("hearthd answered {status}")
            } else {
                format!("hearthd answered {status}: {}", truncate(text, 200))
            };
            CliError::Api {
                code,
                message,
                raw: None,
            }
        }))
    }

    pub fn transport_error(&self, err: &reqwest::Error) -> CliError {
        if err.is_connect() {
            return CliError::Unreachable {
                url: self.base_url().to_owned(),
                reason: root_cause(err),
            };
        }
        if err.is_timeout() {
            return CliError::Local {
                kind: "timeout",
                message: format!("hearthd at {} did not answer in time", self.base_url()),
                hint: Some("`hearth vm inspect NAME` shows whether the operation went on".into()),
            };
        }
        CliError::protocol(format!("talking to hearthd failed: {}", root_cause(err)))
    }
}

/// Decodes a success body as `T`, keeping the raw JSON.
async fn json<T: DeserializeOwned>(resp: Response) -> Result<Json<T>> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| CliError::protocol(format!("reading hearthd's answer failed: {e}")))?;
    let raw: Value = serde_json::from_slice(&bytes)
        .map_err(|e| CliError::protocol(format!("hearthd sent invalid JSON: {e}")))?;
    let data = serde_json::from_value(raw.clone())
        .map_err(|e| CliError::protocol(format!("hearthd sent an unexpected answer: {e}")))?;
    Ok(Json { data, raw })
}

/// The error an error response's body describes, when it is an error body.
fn error_from_body(body: &[u8]) -> Option<CliError> {
    let raw: Value = serde_json::from_slice(body).ok()?;
    if let Ok(parsed) = serde_json::from_value::<ErrorBody>(raw.clone()) {
        return Some(CliError::from_body(parsed, Some(raw)));
    }
    // A code this CLI does not know yet: keep the message, exit 1.
    let message = raw.get("message")?.as_str()?.to_owned();
    Some(CliError::Api {
        code: None,
        message,
        raw: Some(raw),
    })
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_a_base_path_and_encode_parts() {
        let client = Client::new("http://127.0.0.1:7070", None).unwrap();
        assert_eq!(
            client
                .url(&["vms", "demo", "files"], &[("path", "/a b&c".into())])
                .as_str(),
            "http://127.0.0.1:7070/v1/vms/demo/files?path=%2Fa+b%26c"
        );
        let client = Client::new("http://host:1/prefix/", None).unwrap();
        assert_eq!(
            client.url(&["health"], &[]).as_str(),
            "http://host:1/prefix/v1/health"
        );
        assert_eq!(client.base_url(), "http://host:1/prefix");
    }

    #[test]
    fn only_plain_http_urls() {
        for bad in [
            "https://x",
            "127.0.0.1:7070",
            "not a url",
            "unix://host/run/hearth.sock",
            "unix:",
        ] {
            let err = Client::new(bad, None).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            assert!(err.message().contains(bad), "{}", err.message());
        }
    }

    #[test]
    fn unix_socket_urls() {
        for url in ["unix:///run/hearth.sock", "unix:/run/hearth.sock"] {
            let client = Client::new(url, None).unwrap();
            assert_eq!(
                client.socket.as_deref(),
                Some(std::path::Path::new("/run/hearth.sock"))
            );
            assert_eq!(client.base_url(), "unix:///run/hearth.sock");
            assert_eq!(
                client.url(&["vms"], &[]).as_str(),
                "http://localhost/v1/vms"
            );
        }
    }

    #[test]
    fn loopback_detection() {
        for (url, want) in [
            ("http://127.0.0.1:7070", true),
            ("http://localhost", true),
            ("http://[::1]:7070", true),
            ("http://10.1.2.3", false),
            ("http://example.com", false),
        ] {
            assert_eq!(is_loopback(&Url::parse(url).unwrap()), want, "{url}");
        }
    }

    #[test]
    fn error_bodies_decode_known_and_unknown_codes() {
        let err = error_from_body(br#"{"error":"vm_not_found","message":"no VM demo"}"#).unwrap();
        assert_eq!(err.code(), Some(ErrorCode::VmNotFound));
        assert_eq!(err.exit_code(), 3);
        let err = error_from_body(br#"{"error":"teapot","message":"short and stout"}"#).unwrap();
        assert_eq!(
            (err.code(), err.message().as_str()),
            (None, "short and stout")
        );
        assert!(error_from_body(b"<html>").is_none());
    }
}

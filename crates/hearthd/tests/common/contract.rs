//! The API contract of the real-VM tests: the HTTP calls they make are recorded and checked
//! against the committed `openapi.json` (as Firecracker's integration tests check theirs against
//! its swagger). A response whose status the document does not give for its operation, a body
//! that breaks the documented schema, a request that breaks it (unless sent bad on purpose), a
//! missing required parameter: each fails the test, with the checker's explanation.
//!
//! The checking is `tests/openapi_check.py` (openapi-schema-validator, a JSON Schema 2020-12
//! validator with OpenAPI 3.1's dialect), spawned with an argument vector, exchanges as JSON on
//! stdin: the validator the spec test already needs, rather than a JSON Schema crate in Rust.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde_json::{Value, json};

use super::{URL, workspace};

/// The checker script.
pub fn checker_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openapi_check.py")
}

/// The committed OpenAPI document.
pub fn openapi_document() -> PathBuf {
    workspace().join("openapi.json")
}

/// Runs the checker on `exchanges` (see the script for their fields); the problems it found, or
/// `Ok` when every exchange conforms.
pub fn check_exchanges(exchanges: &[Value]) -> Result<(), String> {
    let mut child = Command::new("python3")
        .arg(checker_script())
        .arg(openapi_document())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 (scripts/install-deps.sh installs what the contract check needs): {e}")
        });
    let input = serde_json::to_vec(exchanges).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(String::from_utf8_lossy(&out.stdout).into_owned()),
        _ => panic!(
            "the contract checker failed to run ({}): {}{} (scripts/install-deps.sh installs openapi-schema-validator)",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// One exchange as the checker reads it.
#[allow(clippy::too_many_arguments)]
pub fn exchange(
    label: &str,
    method: &str,
    url: &str,
    request: Option<(&str, &[u8])>,
    request_valid: bool,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Value {
    json!({
        "label": label,
        "method": method,
        "url": url,
        "request_content_type": request.map(|r| r.0),
        "request_body": request.map(|r| String::from_utf8_lossy(r.1)),
        "request_valid": request_valid,
        "status": status,
        "content_type": content_type,
        "body": String::from_utf8_lossy(body),
    })
}

/// Checks one exchange at once; panics with the checker's findings.
#[allow(clippy::too_many_arguments)]
pub fn assert_conforms(
    label: &str,
    method: &str,
    url: &str,
    request_json: Option<&Value>,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) {
    let req = request_json.map(|v| serde_json::to_vec(v).unwrap());
    let ex = exchange(
        label,
        method,
        url,
        req.as_deref().map(|b| ("application/json", b)),
        true,
        status,
        content_type,
        body,
    );
    if let Err(problems) = check_exchanges(&[ex]) {
        panic!("the API broke its OpenAPI document:\n{problems}");
    }
}

/// Checks the answer to a request that breaks the document on purpose (only the answer counts).
pub fn assert_answer_conforms(
    label: &str,
    method: &str,
    url: &str,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) {
    let ex = exchange(label, method, url, None, false, status, content_type, body);
    if let Err(problems) = check_exchanges(&[ex]) {
        panic!("the API broke its OpenAPI document:\n{problems}");
    }
}

/// The status and `Content-Type` of a response, for [`assert_conforms`].
pub fn status_and_type(r: &reqwest::Response) -> (u16, Option<String>) {
    let ct = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (r.status().as_u16(), ct)
}

/// A request the contract tests send.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// Path and query, e.g. `/v1/vms/a/files?path=/etc/hostname`.
    pub url: String,
    pub body: Option<(String, Vec<u8>)>,
    pub headers: Vec<(String, String)>,
    /// False for a request that breaks the document on purpose (its answer is still checked).
    pub valid: bool,
}

impl Req {
    pub fn new(method: &str, url: impl Into<String>) -> Req {
        Req {
            method: method.into(),
            url: url.into(),
            body: None,
            headers: Vec::new(),
            valid: true,
        }
    }
    pub fn get(url: impl Into<String>) -> Req {
        Req::new("GET", url)
    }
    pub fn post(url: impl Into<String>) -> Req {
        Req::new("POST", url)
    }
    pub fn json(mut self, v: &Value) -> Req {
        self.body = Some(("application/json".into(), serde_json::to_vec(v).unwrap()));
        self
    }
    pub fn bytes(mut self, content_type: &str, b: Vec<u8>) -> Req {
        self.body = Some((content_type.into(), b));
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// Marks the request as breaking the document on purpose.
    pub fn bad(mut self) -> Req {
        self.valid = false;
        self
    }
}

/// An answer, read in full.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `error` code of an error body.
    pub fn code(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_owned()
    }
}

/// Sends requests to the test's hearthd and records every exchange for [`Contract::verify`].
#[derive(Debug, Default)]
pub struct Contract {
    http: reqwest::Client,
    seen: Mutex<Vec<Value>>,
}

impl Contract {
    pub fn new() -> Contract {
        Contract::default()
    }

    /// Sends `req` and records the exchange under `label`.
    pub async fn send(&self, label: &str, req: Req) -> Answer {
        self.send_cut(label, req, usize::MAX).await
    }

    /// [`Contract::send`] for archives, too large to record whole: the exchange is recorded
    /// with each body cut to its first KiB (the checker reads JSON bodies; others it checks by
    /// their media type).
    pub async fn send_large(&self, label: &str, req: Req) -> Answer {
        self.send_cut(label, req, 1024).await
    }

    async fn send_cut(&self, label: &str, req: Req, keep: usize) -> Answer {
        let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap();
        let mut b = self.http.request(method, format!("{URL}{}", req.url));
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        if let Some((ct, body)) = &req.body {
            b = b
                .header(reqwest::header::CONTENT_TYPE, ct)
                .body(body.clone());
        }
        let r = b
            .send()
            .await
            .unwrap_or_else(|e| panic!("[{label}] {} {}: {e}", req.method, req.url));
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = r.bytes().await.unwrap().to_vec();
        self.record(exchange(
            label,
            &req.method,
            &req.url,
            req.body
                .as_ref()
                .map(|(ct, b)| (ct.as_str(), &b[..b.len().min(keep)])),
            req.valid,
            status,
            content_type.as_deref(),
            &body[..body.len().min(keep)],
        ));
        Answer {
            status,
            content_type,
            headers,
            body,
        }
    }

    /// Records an exchange made some other way (a raw socket).
    pub fn record(&self, exchange: Value) {
        self.seen.lock().unwrap().push(exchange);
    }

    /// How many exchanges are recorded and not yet verified.
    pub fn pending(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Checks every recorded exchange against the document; panics with all problems found.
    pub fn verify(&self) {
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        if let Err(problems) = check_exchanges(&seen) {
            panic!(
                "the API broke its OpenAPI document in {} exchanges checked:\n{problems}",
                seen.len()
            );
        }
    }
}

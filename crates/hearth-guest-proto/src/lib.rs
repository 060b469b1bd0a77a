//! The wire protocol between `hearthd` (the host) and `hearth-guest` (the agent inside each VM).
//!
//! The transport is one virtio-serial port named [`PORT_NAME`]; on the host it is a unix socket
//! that QEMU serves. Exactly one host connection exists at a time, so every exchange is
//! multiplexed over it by a request `id` chosen by the host.
//!
//! The full document, with the frame layout and every exchange, is `PROTOCOL.md` beside this
//! crate's `Cargo.toml`; a test keeps the message list in it true.
//!
//! This crate is sans-IO: [`encode`] turns a message and its payload into bytes and [`Decoder`]
//! turns bytes back into [`Frame`]s. Both sides bring their own I/O.

use serde::{Deserialize, Serialize};

/// The highest version of this protocol this crate speaks. Each peer says in its `hello` the range
/// of versions it speaks ([`MIN_PROTOCOL_VERSION`] to this one); the host uses the highest version
/// both ranges hold and refuses an agent whose range does not meet its own ([`negotiate`]).
pub const PROTOCOL_VERSION: u32 = 1;

/// The lowest version of this protocol this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Feature: per-exchange credit windows for data. Host to guest ([`Event::Credit`]): an agent
/// that announces it grants a window for every exchange that takes `data`, and a host that
/// announces it never sends beyond that window. Guest to host ([`Request::Credit`]): a host that
/// sees it in the agent's `hello` may give a `get_file` a `window`, and the agent then sends no
/// more file bytes than it was granted.
pub const FEATURE_CREDIT: &str = "credit";

/// Every optional feature this crate implements, announced in `hello` by both peers. A feature is
/// used when both announce it; names a peer does not know are ignored.
pub const FEATURES: &[&str] = &[FEATURE_CREDIT];

/// Bytes of `data` the agent lets the host send for one exchange before it must wait for more
/// credit (with [`FEATURE_CREDIT`]). The agent grants it when the exchange opens and gives bytes
/// back as it writes them to the process or file.
pub const DATA_WINDOW: u64 = 256 * 1024;

/// The window a host gives a download ([`Request::GetFile`]'s `window`) with [`FEATURE_CREDIT`]:
/// the agent sends that many file bytes, then more as the host's consumer takes them.
pub const DOWNLOAD_WINDOW: u64 = 1024 * 1024;

/// Name of the virtio-serial port the agent listens on (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "org.hearth.agent.0";

/// Bytes that begin every frame. A decoder that meets anything else skips ahead to the next
/// occurrence, so a frame cut short by a host restart costs only that frame.
pub const MAGIC: [u8; 4] = *b"HRTH";

/// Size of the fixed frame header: magic, header length, payload length (both u32 little-endian).
pub const PREFIX_LEN: usize = 12;

/// Largest JSON header a peer accepts.
pub const MAX_HEADER_LEN: usize = 64 * 1024;

/// Largest payload a peer accepts in one frame. Senders split larger data into chunks.
pub const MAX_PAYLOAD_LEN: usize = 1024 * 1024;

/// Chunk size senders use for stream and file data.
pub const CHUNK_LEN: usize = 64 * 1024;

/// Host-chosen identifier of one exchange (an exec session, a file transfer, a shutdown).
pub type RequestId = u64;

/// Terminal size for PTY sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

/// What the guest should do on [`Request::Shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownAction {
    Poweroff,
    Reboot,
}

/// Messages from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Opens (or re-opens, after a host restart) the conversation. The agent answers
    /// [`Event::Hello`]; hosts may send it repeatedly until it does.
    Hello {
        /// The highest protocol version the host speaks (a version-1 host's only one).
        protocol: u32,
        /// The lowest version the host speaks; absent (a version-1 host) means `protocol`.
        #[serde(default)]
        protocol_min: Option<u32>,
        /// Optional features the host implements ([`FEATURES`]).
        #[serde(default)]
        features: Vec<String>,
    },
    /// Starts a process. Answered by [`Event::Started`] or [`Event::Error`], then
    /// [`Event::Output`] frames and finally exactly one [`Event::Exited`].
    Exec {
        id: RequestId,
        /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no slash.
        argv: Vec<String>,
        /// Added to (or replacing) the agent's base environment.
        #[serde(default)]
        env: Vec<(String, String)>,
        /// Working directory; the root directory when absent.
        #[serde(default)]
        cwd: Option<String>,
        /// When true the host will send [`Request::Data`] frames for stdin, ending with an empty
        /// one; when false stdin is `/dev/null`.
        #[serde(default)]
        stdin: bool,
        /// Run on a new pseudo-terminal of this size; stdout and stderr are then one stream
        /// (reported as stdout).
        #[serde(default)]
        pty: Option<PtySize>,
        /// Kill the process group after this many milliseconds.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Stdin bytes for an exec, or file bytes for a [`Request::PutFile`]; the payload carries the
    /// bytes. An empty payload means end of data.
    Data { id: RequestId },
    /// Changes the window size of a PTY session.
    Resize { id: RequestId, size: PtySize },
    /// Sends a signal (by number) to an exec's process group.
    Signal { id: RequestId, signal: i32 },
    /// Writes a file: the agent creates parent directories, then takes [`Request::Data`] frames
    /// until an empty one, writes to a temporary name and renames it into place. Answered by
    /// [`Event::Done`] or [`Event::Error`].
    PutFile {
        id: RequestId,
        path: String,
        /// Permission bits, e.g. `0o644`.
        mode: u32,
    },
    /// Reads a file. Answered by [`Event::FileInfo`], [`Event::Data`] frames, then an empty
    /// [`Event::Data`]; or by [`Event::Error`].
    GetFile {
        id: RequestId,
        path: String,
        /// With [`FEATURE_CREDIT`]: the agent sends at most this many file bytes, plus what
        /// [`Request::Credit`] adds. Absent: no limit (a host without the feature).
        #[serde(default)]
        window: Option<u64>,
    },
    /// Lets the agent send `bytes` more file bytes of a windowed [`Request::GetFile`].
    Credit { id: RequestId, bytes: u64 },
    /// Stops the guest cleanly: sync, then power off or reboot. Answered by [`Event::Done`] just
    /// before the agent acts.
    Shutdown {
        id: RequestId,
        action: ShutdownAction,
    },
    /// Liveness check, answered by [`Event::Done`].
    Ping { id: RequestId },
    /// Abandons an exchange: kills an exec's process group, stops a file transfer.
    Cancel { id: RequestId },
}

/// Output streams of an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Stable error codes the agent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The program, file or directory does not exist.
    NotFound,
    /// Permission denied.
    PermissionDenied,
    /// The request is malformed (empty argv, relative path, unknown id...).
    InvalidRequest,
    /// The id is already in use by another exchange.
    DuplicateId,
    /// The request's `type` is not one this agent knows (a newer host's request).
    UnknownRequest,
    /// Anything else the OS reported.
    Io,
    /// A code this side does not know (a newer peer's); read it as a generic failure.
    #[serde(other)]
    Other,
}

/// Messages from the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Answer to [`Request::Hello`]: the agent is ready to serve. An agent inside a VM also
    /// sends it unprompted when it starts, so the host notices an agent that was restarted.
    Hello {
        /// The highest protocol version the agent speaks (a version-1 agent's only one).
        protocol: u32,
        /// The lowest version the agent speaks; absent (a version-1 agent) means `protocol`.
        #[serde(default)]
        protocol_min: Option<u32>,
        /// Optional features the agent implements ([`FEATURES`]).
        #[serde(default)]
        features: Vec<String>,
        /// The agent's crate version.
        agent_version: String,
        /// Changes every boot; lets the host tell a reboot from a reconnect.
        boot_id: String,
        /// Changes every time the agent process starts. When it changes, every exchange the
        /// host had open is gone.
        #[serde(default)]
        instance: String,
    },
    /// The exec's process is running.
    Started { id: RequestId, pid: u32 },
    /// A chunk of an exec's output; the payload carries the bytes.
    Output { id: RequestId, stream: Stream },
    /// The exec's process has exited; the last message for this id. `code` is set when it exited
    /// normally, `signal` when a signal ended it.
    Exited {
        id: RequestId,
        code: Option<i32>,
        signal: Option<i32>,
        /// True when the agent killed it because `timeout_ms` ran out.
        timed_out: bool,
    },
    /// Metadata of a file about to be sent.
    FileInfo { id: RequestId, size: u64, mode: u32 },
    /// A chunk of a file; the payload carries the bytes, empty means end of file.
    Data { id: RequestId },
    /// The exchange finished successfully.
    Done { id: RequestId },
    /// The host may send `bytes` more bytes of `data` for this exchange ([`FEATURE_CREDIT`]).
    /// Credit adds up; the first grant ([`DATA_WINDOW`]) comes when the exchange opens.
    Credit { id: RequestId, bytes: u64 },
    /// The exchange failed; the last message for this id.
    Error {
        id: RequestId,
        code: ErrorCode,
        message: String,
    },
}

impl Event {
    /// The request id this event belongs to, if any.
    pub fn id(&self) -> Option<RequestId> {
        match self {
            Event::Hello { .. } => None,
            Event::Started { id, .. }
            | Event::Output { id, .. }
            | Event::Exited { id, .. }
            | Event::FileInfo { id, .. }
            | Event::Data { id }
            | Event::Done { id }
            | Event::Credit { id, .. }
            | Event::Error { id, .. } => Some(*id),
        }
    }
}

/// A message type a [`Decoder`] produces: it knows the `type` names of its messages, so it can
/// tell a frame of a type it does not know from a malformed one.
pub trait Message: for<'de> Deserialize<'de> {
    /// Every `type` name of this message enum.
    const TYPES: &'static [&'static str];
}

impl Message for Request {
    const TYPES: &'static [&'static str] = &[
        "hello", "exec", "data", "resize", "signal", "put_file", "get_file", "credit", "shutdown",
        "ping", "cancel",
    ];
}

impl Message for Event {
    const TYPES: &'static [&'static str] = &[
        "hello",
        "started",
        "output",
        "exited",
        "file_info",
        "data",
        "done",
        "credit",
        "error",
    ];
}

/// The versions a peer speaks, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    pub min: u32,
    pub max: u32,
}

impl VersionRange {
    /// The range of this crate.
    pub const OURS: VersionRange = VersionRange {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// The range a `hello` announces: `protocol` is the highest, `protocol_min` (absent from a
    /// version-1 peer) the lowest.
    pub fn announced(protocol: u32, protocol_min: Option<u32>) -> VersionRange {
        VersionRange {
            min: protocol_min.unwrap_or(protocol),
            max: protocol,
        }
    }
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.max)
        } else {
            write!(f, "{} to {}", self.min, self.max)
        }
    }
}

/// Two peers whose protocol versions have nothing in common.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer speaks protocol {theirs}, this side speaks {ours}: no version in common")]
pub struct NoCommonVersion {
    pub ours: VersionRange,
    pub theirs: VersionRange,
}

/// The highest version both ranges hold. A range whose `min` is above its `max` holds nothing.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u32, NoCommonVersion> {
    let low = ours.min.max(theirs.min);
    let high = ours.max.min(theirs.max);
    if low <= high && ours.min <= ours.max && theirs.min <= theirs.max {
        Ok(high)
    } else {
        Err(NoCommonVersion { ours, theirs })
    }
}

/// The features of [`FEATURES`] that a peer announced too.
pub fn common_features(theirs: &[String]) -> Vec<&'static str> {
    FEATURES
        .iter()
        .copied()
        .filter(|ours| theirs.iter().any(|t| t == ours))
        .collect()
}

impl Request {
    /// This crate's `hello`: its version range and features.
    pub fn hello() -> Request {
        Request::Hello {
            protocol: PROTOCOL_VERSION,
            protocol_min: Some(MIN_PROTOCOL_VERSION),
            features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
        }
    }
}

impl Request {
    /// The request id of this message, if any.
    pub fn id(&self) -> Option<RequestId> {
        match self {
            Request::Hello { .. } => None,
            Request::Exec { id, .. }
            | Request::Data { id }
            | Request::Resize { id, .. }
            | Request::Signal { id, .. }
            | Request::PutFile { id, .. }
            | Request::GetFile { id, .. }
            | Request::Credit { id, .. }
            | Request::Shutdown { id, .. }
            | Request::Ping { id }
            | Request::Cancel { id } => Some(*id),
        }
    }
}

/// Errors from encoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("frame header is {0} bytes, more than the {MAX_HEADER_LEN} allowed")]
    HeaderTooLarge(usize),
    #[error("frame payload is {0} bytes, more than the {MAX_PAYLOAD_LEN} allowed")]
    PayloadTooLarge(usize),
    #[error("could not serialize the frame header")]
    Json(#[from] serde_json::Error),
}

/// Serializes one frame: prefix, JSON header, payload.
pub fn encode<M: Serialize>(message: &M, payload: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let header = serde_json::to_vec(message)?;
    if header.len() > MAX_HEADER_LEN {
        return Err(EncodeError::HeaderTooLarge(header.len()));
    }
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(EncodeError::PayloadTooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len() + payload.len());
    out.extend_from_slice(&MAGIC);
    // Both lengths were bounded above, far below u32::MAX.
    out.extend_from_slice(
        &u32::try_from(header.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(out)
}

/// One decoded frame: a message and its (possibly empty) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<M> {
    pub message: M,
    pub payload: Vec<u8>,
}

/// Something the decoder had to throw away. Decoding goes on after it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("skipped {0} bytes that did not start a frame")]
    Resync(usize),
    #[error("dropped a frame whose header is not a valid message: {0}")]
    BadHeader(String),
    #[error("dropped a frame announcing a {header} byte header and {payload} byte payload")]
    Oversized { header: usize, payload: usize },
    /// A whole, well-formed frame of a `type` this side does not know (a newer peer's). It was
    /// skipped with its payload, so the frames after it decode normally.
    #[error("skipped a frame of unknown type `{kind}`")]
    UnknownType { kind: String, id: Option<RequestId> },
    /// A whole frame of a known `type` whose fields are wrong; skipped with its payload.
    #[error("skipped a `{kind}` frame with invalid fields: {reason}")]
    InvalidFields {
        kind: String,
        id: Option<RequestId>,
        reason: String,
    },
}

/// What every frame header holds, whatever its type: read when the header is not a valid message,
/// to tell a frame this side cannot take from bytes that are not a frame at all.
#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

/// Incremental frame decoder with resynchronisation on the magic bytes.
#[derive(Debug)]
pub struct Decoder<M> {
    buf: Vec<u8>,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M> Default for Decoder<M> {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            _message: std::marker::PhantomData,
        }
    }
}

impl<M: Message> Decoder<M> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the transport.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Forgets buffered bytes, e.g. when the peer disconnected mid-frame.
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    /// Number of buffered bytes not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete frame, `Ok(None)` when more bytes are needed, or an error that
    /// says what was skipped (call again to go on).
    pub fn next_frame(&mut self) -> Result<Option<Frame<M>>, DecodeError> {
        if self.buf.len() < MAGIC.len() {
            return Ok(None);
        }
        if self.buf[..MAGIC.len()] != MAGIC {
            let skip = find_magic(&self.buf[1..]).map_or_else(
                // Keep a tail that could be the start of a magic split across reads.
                || self.buf.len() - (MAGIC.len() - 1),
                |at| at + 1,
            );
            self.buf.drain(..skip);
            return Err(DecodeError::Resync(skip));
        }
        if self.buf.len() < PREFIX_LEN {
            return Ok(None);
        }
        let header_len = read_u32(&self.buf[4..8]);
        let payload_len = read_u32(&self.buf[8..12]);
        if header_len > MAX_HEADER_LEN || payload_len > MAX_PAYLOAD_LEN {
            self.buf.drain(..MAGIC.len());
            return Err(DecodeError::Oversized {
                header: header_len,
                payload: payload_len,
            });
        }
        let header_end = PREFIX_LEN + header_len;
        if self.buf.len() < header_end {
            return Ok(None);
        }
        // The header is checked as soon as it is complete, before waiting for the payload: a frame
        // cut short by a host restart is usually spliced with the next frame's bytes, which makes
        // its header invalid, so the decoder resyncs at once instead of swallowing later frames.
        let total = header_end + payload_len;
        let header = &self.buf[PREFIX_LEN..header_end];
        match serde_json::from_slice::<M>(header) {
            Ok(_) if self.buf.len() < total => Ok(None),
            Ok(message) => {
                let payload = self.buf[header_end..total].to_vec();
                self.buf.drain(..total);
                Ok(Some(Frame { message, payload }))
            }
            Err(err) => {
                // A complete JSON object naming a `type` is a real frame that this side cannot
                // take (a newer peer's message, or wrong fields): skip it whole, payload included,
                // so framing holds. Bytes spliced by a cut-short frame are not valid JSON.
                if let Ok(envelope) = serde_json::from_slice::<Envelope>(header) {
                    if self.buf.len() < total {
                        return Ok(None);
                    }
                    self.buf.drain(..total);
                    let id = envelope.id.and_then(|id| id.as_u64());
                    let kind = envelope.kind;
                    return Err(if M::TYPES.contains(&kind.as_str()) {
                        DecodeError::InvalidFields {
                            kind,
                            id,
                            reason: err.to_string(),
                        }
                    } else {
                        DecodeError::UnknownType { kind, id }
                    });
                }
                // The prefix may belong to a frame cut short; only skip its magic so a real frame
                // inside the bogus one is still found.
                self.buf.drain(..MAGIC.len());
                Err(DecodeError::BadHeader(err.to_string()))
            }
        }
    }
}

fn read_u32(bytes: &[u8]) -> usize {
    let mut le = [0u8; 4];
    le.copy_from_slice(bytes);
    u32::from_le_bytes(le) as usize
}

fn find_magic(haystack: &[u8]) -> Option<usize> {
    haystack.windows(MAGIC.len()).position(|w| w == MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain<M: Message>(d: &mut Decoder<M>) -> (Vec<Frame<M>>, usize) {
        let mut frames = Vec::new();
        let mut errors = 0;
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return (frames, errors),
                Err(_) => errors += 1,
            }
        }
    }

    #[test]
    fn round_trips_every_request() {
        let requests = all_requests();
        let mut d = Decoder::<Request>::new();
        for r in &requests {
            d.extend(&encode(r, b"xyz").unwrap());
        }
        let (frames, errors) = drain(&mut d);
        assert_eq!(errors, 0);
        let got: Vec<_> = frames.iter().map(|f| f.message.clone()).collect();
        assert_eq!(got, requests);
        assert!(frames.iter().all(|f| f.payload == b"xyz"));
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::hello(),
            Request::Hello {
                protocol: 1,
                protocol_min: None,
                features: Vec::new(),
            },
            Request::Exec {
                id: 7,
                argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                stdin: true,
                pty: Some(PtySize { rows: 24, cols: 80 }),
                timeout_ms: Some(1000),
            },
            Request::Data { id: 7 },
            Request::Resize {
                id: 7,
                size: PtySize { rows: 1, cols: 2 },
            },
            Request::Signal { id: 7, signal: 15 },
            Request::PutFile {
                id: 8,
                path: "/a".into(),
                mode: 0o644,
            },
            Request::GetFile {
                id: 9,
                path: "/a".into(),
                window: Some(DOWNLOAD_WINDOW),
            },
            Request::Credit { id: 9, bytes: 5 },
            Request::Shutdown {
                id: 10,
                action: ShutdownAction::Poweroff,
            },
            Request::Ping { id: 11 },
            Request::Cancel { id: 12 },
        ]
    }

    fn all_events() -> Vec<Event> {
        vec![
            Event::Hello {
                protocol: 1,
                protocol_min: Some(1),
                features: vec![FEATURE_CREDIT.into()],
                agent_version: "0.1.0".into(),
                boot_id: "b".into(),
                instance: "i".into(),
            },
            Event::Started { id: 1, pid: 2 },
            Event::Output {
                id: 1,
                stream: Stream::Stderr,
            },
            Event::Exited {
                id: 1,
                code: Some(0),
                signal: None,
                timed_out: false,
            },
            Event::FileInfo {
                id: 2,
                size: 3,
                mode: 0o644,
            },
            Event::Data { id: 2 },
            Event::Done { id: 2 },
            Event::Credit {
                id: 3,
                bytes: DATA_WINDOW,
            },
            Event::Error {
                id: 4,
                code: ErrorCode::UnknownRequest,
                message: "m".into(),
            },
        ]
    }

    fn type_of<M: Serialize>(message: &M) -> String {
        let value = serde_json::to_value(message).unwrap();
        value["type"].as_str().unwrap().to_owned()
    }

    /// `Message::TYPES` is what the decoder uses to tell unknown types from bad fields: it must
    /// name every variant, and nothing else.
    #[test]
    fn message_types_name_every_variant() {
        let mut requests: Vec<String> = all_requests().iter().map(type_of).collect();
        requests.dedup();
        assert_eq!(requests, Request::TYPES);
        let events: Vec<String> = all_events().iter().map(type_of).collect();
        assert_eq!(events, Event::TYPES);
        let mut d = Decoder::<Event>::new();
        for e in &all_events() {
            d.extend(&encode(e, &[]).unwrap());
        }
        let (frames, errors) = drain(&mut d);
        assert_eq!(errors, 0);
        assert_eq!(
            frames.into_iter().map(|f| f.message).collect::<Vec<_>>(),
            all_events()
        );
    }

    #[test]
    fn a_frame_of_unknown_type_is_skipped_whole() {
        // Its payload holds the magic: a decoder that only skipped the header would find a
        // bogus frame start inside it.
        let mut payload = b"HRTH".to_vec();
        payload.extend_from_slice(&[0xff; 64]);
        let mut d = Decoder::<Request>::new();
        d.extend(&encode(&serde_json::json!({"type": "teleport", "id": 41}), &payload).unwrap());
        d.extend(&encode(&Request::Ping { id: 42 }, &[]).unwrap());
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::UnknownType {
                kind: "teleport".into(),
                id: Some(41)
            })
        );
        assert_eq!(
            d.next_frame().unwrap().unwrap().message,
            Request::Ping { id: 42 }
        );
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn an_unknown_frame_waits_for_its_payload_before_it_is_skipped() {
        let unknown = encode(&serde_json::json!({"type": "later"}), &[7; 1000]).unwrap();
        let mut d = Decoder::<Event>::new();
        d.extend(&unknown[..500]);
        assert_eq!(d.next_frame(), Ok(None));
        d.extend(&unknown[500..]);
        d.extend(&encode(&Event::Done { id: 1 }, &[]).unwrap());
        assert!(matches!(
            d.next_frame(),
            Err(DecodeError::UnknownType { id: None, .. })
        ));
        assert_eq!(
            d.next_frame().unwrap().unwrap().message,
            Event::Done { id: 1 }
        );
    }

    #[test]
    fn a_known_type_with_bad_fields_is_skipped_whole() {
        let mut d = Decoder::<Request>::new();
        d.extend(&encode(&serde_json::json!({"type": "exec", "id": 5}), b"HRTHxx").unwrap());
        d.extend(&encode(&Request::Ping { id: 6 }, &[]).unwrap());
        match d.next_frame() {
            Err(DecodeError::InvalidFields { kind, id, reason }) => {
                assert_eq!((kind.as_str(), id), ("exec", Some(5)));
                assert!(reason.contains("argv"), "{reason}");
            }
            other => panic!("expected invalid fields, got {other:?}"),
        }
        assert_eq!(
            d.next_frame().unwrap().unwrap().message,
            Request::Ping { id: 6 }
        );
    }

    #[test]
    fn a_version_one_hello_still_decodes() {
        // What agents and hosts before version ranges and features send.
        let old: Event = serde_json::from_str(
            r#"{"type":"hello","protocol":1,"agent_version":"0.1.0","boot_id":"b"}"#,
        )
        .unwrap();
        let Event::Hello {
            protocol,
            protocol_min,
            features,
            ..
        } = old
        else {
            panic!("not a hello")
        };
        let range = VersionRange::announced(protocol, protocol_min);
        assert_eq!(range, VersionRange { min: 1, max: 1 });
        assert!(features.is_empty());
        assert_eq!(negotiate(VersionRange::OURS, range), Ok(1));
        let old: Request = serde_json::from_str(r#"{"type":"hello","protocol":1}"#).unwrap();
        assert!(matches!(
            old,
            Request::Hello {
                protocol_min: None,
                ..
            }
        ));
    }

    #[test]
    fn negotiation_takes_the_highest_common_version() {
        let range = |min, max| VersionRange { min, max };
        assert_eq!(negotiate(range(1, 3), range(2, 5)), Ok(3));
        assert_eq!(negotiate(range(2, 5), range(1, 3)), Ok(3));
        assert_eq!(negotiate(range(1, 1), range(1, 4)), Ok(1));
        assert_eq!(negotiate(range(3, 3), range(3, 3)), Ok(3));
        let err = negotiate(range(1, 2), range(4, 6)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the peer speaks protocol 4 to 6, this side speaks 1 to 2: no version in common"
        );
        assert!(negotiate(range(4, 6), range(1, 3)).is_err());
        // A range that holds nothing meets nothing.
        assert!(negotiate(range(1, 9), range(5, 4)).is_err());
    }

    #[test]
    fn only_features_both_sides_know_are_used() {
        assert_eq!(
            common_features(&["teleport".into(), FEATURE_CREDIT.into()]),
            vec![FEATURE_CREDIT]
        );
        assert!(common_features(&[]).is_empty());
    }

    #[test]
    fn an_error_code_from_a_newer_peer_is_read_as_other() {
        let e: Event = serde_json::from_str(
            r#"{"type":"error","id":1,"code":"quota_exceeded","message":"m"}"#,
        )
        .unwrap();
        assert!(matches!(
            e,
            Event::Error {
                code: ErrorCode::Other,
                ..
            }
        ));
    }

    #[test]
    fn decodes_byte_by_byte() {
        let bytes = encode(&Event::Done { id: 3 }, &[1, 2, 3]).unwrap();
        let mut d = Decoder::<Event>::new();
        for (i, b) in bytes.iter().enumerate() {
            d.extend(std::slice::from_ref(b));
            let got = d.next_frame().unwrap();
            assert_eq!(got.is_some(), i == bytes.len() - 1);
        }
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn resyncs_after_a_truncated_frame() {
        let first = encode(&Event::Done { id: 1 }, &[9; 100]).unwrap();
        let second = encode(&Event::Done { id: 2 }, b"ok").unwrap();
        let mut d = Decoder::<Event>::new();
        d.extend(b"garbage");
        d.extend(&first[..30]); // cut short: the header says 100 payload bytes follow
        d.extend(&second);
        d.extend(&encode(&Event::Done { id: 3 }, &[]).unwrap());
        let (frames, _) = drain(&mut d);
        let ids: Vec<_> = frames.iter().filter_map(|f| f.message.id()).collect();
        // The truncated frame swallows part of the next one; the decoder must still find id 3,
        // and must never invent a frame that was not sent.
        assert!(ids.contains(&3), "{ids:?}");
        assert!(ids.iter().all(|id| *id == 2 || *id == 3), "{ids:?}");
    }

    #[test]
    fn rejects_oversized_lengths_without_waiting_for_them() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let mut d = Decoder::<Event>::new();
        d.extend(&bytes);
        d.extend(&encode(&Event::Done { id: 5 }, &[]).unwrap());
        assert!(matches!(d.next_frame(), Err(DecodeError::Oversized { .. })));
        let (frames, _) = drain(&mut d);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].message, Event::Done { id: 5 });
    }

    #[test]
    fn encode_refuses_oversized_payloads() {
        let big = vec![0u8; MAX_PAYLOAD_LEN + 1];
        assert!(matches!(
            encode(&Event::Data { id: 1 }, &big),
            Err(EncodeError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn magic_split_across_reads_is_kept() {
        let frame = encode(&Event::Done { id: 4 }, &[]).unwrap();
        let mut d = Decoder::<Event>::new();
        d.extend(b"zzzzzz");
        d.extend(&frame[..2]);
        let _ = drain(&mut d);
        d.extend(&frame[2..]);
        let (frames, _) = drain(&mut d);
        assert_eq!(frames.len(), 1);
    }

    /// PROTOCOL.md lists every message type; this keeps it in step with the enums.
    #[test]
    fn protocol_document_lists_every_message() {
        let doc = include_str!("../PROTOCOL.md");
        for name in Request::TYPES
            .iter()
            .chain(Event::TYPES)
            .chain(FEATURES)
            .chain(&["unknown_request", "other"])
        {
            assert!(
                doc.contains(&format!("`{name}`")),
                "PROTOCOL.md does not document `{name}`"
            );
        }
        assert!(doc.contains(&format!("Protocol version: {PROTOCOL_VERSION}")));
        assert!(doc.contains(&format!("lowest version spoken: {MIN_PROTOCOL_VERSION}")));
        assert!(doc.contains(&format!("{} KiB", DATA_WINDOW / 1024)));
        assert!(doc.contains(PORT_NAME));
    }
}

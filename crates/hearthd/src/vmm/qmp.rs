//! A small QMP client: one unix-socket connection, commands with ids and their answers, and
//! the events QEMU sends.
//!
//! QMP (QEMU's machine protocol, `qapi/qmp-spec.rst` in qemu/qemu) sends one JSON object per line:
//! a greeting, then `{"return": ..., "id": ...}` / `{"error": {...}, "id": ...}` for commands, and
//! `{"event": ..., "data": ..., "timestamp": ...}` at any time, also between a command and its
//! answer. Every command has a deadline ([`Qmp::execute_within`]; [`DEFAULT_TIMEOUT`] for
//! [`Qmp::execute`]): a QEMU that does not answer is an error naming the command, never a hang.
//! Events are kept, the last [`EVENT_LOG`] of them, numbered in the order they arrived: a caller
//! takes a [`Cursor`] before it acts and waits for what it expects after it
//! ([`Qmp::wait_event`]), so an event that arrives before the command's answer is not missed.
//! The types follow the schema (`qapi/run-state.json`, `qapi/migration.json`); a value a newer
//! QEMU adds is kept as text (`Other`), never an error.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, oneshot, watch};

/// How long [`Qmp::execute`] waits for an answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many of the latest events a session keeps for waiters.
pub const EVENT_LOG: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP connection failed")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not JSON: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP connection closed (the VMM exited)")]
    Closed,
    #[error("QEMU did not answer {what} within {}", seconds(.after))]
    Timeout { what: String, after: Duration },
    #[error("QMP command {command} answered something off its schema: {answer}")]
    Unexpected { command: String, answer: String },
}

/// `10 s`, `250 ms`.
fn seconds(d: &Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A guest's run state (`RunState` of `qapi/run-state.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    /// Paused by the `stop` command.
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// A state this client does not know (a newer QEMU's).
    Other(String),
}

impl RunState {
    const NAMED: [(&'static str, RunState); 16] = [
        ("debug", RunState::Debug),
        ("inmigrate", RunState::Inmigrate),
        ("internal-error", RunState::InternalError),
        ("io-error", RunState::IoError),
        ("paused", RunState::Paused),
        ("postmigrate", RunState::Postmigrate),
        ("prelaunch", RunState::Prelaunch),
        ("finish-migrate", RunState::FinishMigrate),
        ("restore-vm", RunState::RestoreVm),
        ("running", RunState::Running),
        ("save-vm", RunState::SaveVm),
        ("shutdown", RunState::Shutdown),
        ("suspended", RunState::Suspended),
        ("watchdog", RunState::Watchdog),
        ("guest-panicked", RunState::GuestPanicked),
        ("colo", RunState::Colo),
    ];

    pub fn parse(text: &str) -> RunState {
        Self::NAMED
            .iter()
            .find(|(name, _)| *name == text)
            .map_or_else(|| RunState::Other(text.to_owned()), |(_, s)| s.clone())
    }

    pub fn as_str(&self) -> &str {
        match self {
            RunState::Other(text) => text,
            known => Self::NAMED
                .iter()
                .find(|(_, s)| s == known)
                .map_or("", |(name, _)| name),
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer of `query-status` (`StatusInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusInfo {
    /// True when all vCPUs are runnable.
    pub running: bool,
    pub status: RunState,
}

/// A migration's status (`MigrationStatus` of `qapi/migration.json`), as `MIGRATION` events
/// and `query-migrate` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyDevice,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    /// A status this client does not know (a newer QEMU's).
    Other(String),
}

impl MigrationStatus {
    const NAMED: [(&'static str, MigrationStatus); 16] = [
        ("none", MigrationStatus::None),
        ("setup", MigrationStatus::Setup),
        ("cancelling", MigrationStatus::Cancelling),
        ("cancelled", MigrationStatus::Cancelled),
        ("active", MigrationStatus::Active),
        ("postcopy-device", MigrationStatus::PostcopyDevice),
        ("postcopy-active", MigrationStatus::PostcopyActive),
        ("postcopy-paused", MigrationStatus::PostcopyPaused),
        (
            "postcopy-recover-setup",
            MigrationStatus::PostcopyRecoverSetup,
        ),
        ("postcopy-recover", MigrationStatus::PostcopyRecover),
        ("completed", MigrationStatus::Completed),
        ("failed", MigrationStatus::Failed),
        ("colo", MigrationStatus::Colo),
        ("pre-switchover", MigrationStatus::PreSwitchover),
        ("device", MigrationStatus::Device),
        ("wait-unplug", MigrationStatus::WaitUnplug),
    ];

    pub fn parse(text: &str) -> MigrationStatus {
        Self::NAMED
            .iter()
            .find(|(name, _)| *name == text)
            .map_or_else(
                || MigrationStatus::Other(text.to_owned()),
                |(_, s)| s.clone(),
            )
    }

    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "waited on by the snapshot work (MIGRATION events of `migrate file:`); tested here"
        )
    )]
    /// True for the statuses a migration ends in.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// An event QEMU sent (`qapi/run-state.json`, `qapi/migration.json`); the rest are `Other`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The guest's vCPUs stopped (`stop`, a migration's end, an I/O error, ...).
    Stop,
    /// The guest's vCPUs run again.
    Resume,
    /// The guest shut down; QEMU is about to exit. `reason` is a `ShutdownCause`.
    Shutdown { guest: bool, reason: String },
    /// The guest was asked to power down (ACPI).
    Powerdown,
    /// The guest was reset. `reason` is a `ShutdownCause`.
    Reset { guest: bool, reason: String },
    /// A migration (also a snapshot saved to or restored from a file) changed status.
    Migration { status: MigrationStatus },
    /// A migration began another pass over guest RAM.
    MigrationPass { pass: u64 },
    /// Any other event, by name, with its data.
    Other { name: String, data: Value },
}

impl Event {
    /// The event of a QMP message `{"event": name, "data": ...}`.
    fn from_message(msg: &Value) -> Event {
        let name = msg["event"].as_str().unwrap_or_default();
        let data = &msg["data"];
        let text = |key: &str| data[key].as_str().unwrap_or_default().to_owned();
        let flag = |key: &str| data[key].as_bool().unwrap_or(false);
        match name {
            "STOP" => Event::Stop,
            "RESUME" => Event::Resume,
            "POWERDOWN" => Event::Powerdown,
            "SHUTDOWN" => Event::Shutdown {
                guest: flag("guest"),
                reason: text("reason"),
            },
            "RESET" => Event::Reset {
                guest: flag("guest"),
                reason: text("reason"),
            },
            "MIGRATION" if data["status"].is_string() => Event::Migration {
                status: MigrationStatus::parse(&text("status")),
            },
            "MIGRATION_PASS" if data["pass"].is_u64() => Event::MigrationPass {
                pass: data["pass"].as_u64().unwrap_or_default(),
            },
            _ => Event::Other {
                name: name.to_owned(),
                data: data.clone(),
            },
        }
    }
}

/// An event and when it came.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Its place in this session's events, from 0.
    pub seq: u64,
    pub event: Event,
    /// QEMU's timestamp: seconds and microseconds since the epoch.
    pub timestamp: (i64, i64),
}

/// A place in a session's events: what arrives after it is what [`Qmp::wait_event`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(u64);

/// The events kept for waiters.
#[derive(Debug, Default)]
struct EventLog {
    kept: VecDeque<Received>,
    /// The seq the next event gets.
    next: u64,
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: Arc<std::sync::Mutex<EventLog>>,
    /// The number of events received; its sender goes when the connection closes.
    arrived: watch::Receiver<u64>,
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting_timeout = Duration::from_secs(10);
        let greeting = tokio::time::timeout(greeting_timeout, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout {
                what: "with its QMP greeting".into(),
                after: greeting_timeout,
            })??
            .ok_or(QmpError::Closed)?;
        let greeting: Value =
            serde_json::from_str(&greeting).map_err(|_| QmpError::Protocol(greeting.clone()))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        let pending: Pending = Arc::default();
        let events: Arc<std::sync::Mutex<EventLog>> = Arc::default();
        let (arrived_tx, arrived) = watch::channel(0);
        let reader_pending = pending.clone();
        let reader_events = events.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(line, "QMP sent a line that is not JSON");
                    continue;
                };
                if msg.get("event").is_some() {
                    tracing::debug!(event = %msg, "QMP event");
                    let count = keep_event(&reader_events, &msg);
                    arrived_tx.send_replace(count);
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let Some(tx) = lock(&reader_pending).remove(&id) else {
                    continue;
                };
                let result = if let Some(ret) = msg.get("return") {
                    Ok(ret.clone())
                } else {
                    let err = msg.get("error").cloned().unwrap_or_default();
                    Err(QmpError::Command {
                        command: String::new(),
                        class: err["class"].as_str().unwrap_or("GenericError").into(),
                        desc: err["desc"].as_str().unwrap_or("").into(),
                    })
                };
                let _ = tx.send(result);
            }
            for (_, tx) in lock(&reader_pending).drain() {
                let _ = tx.send(Err(QmpError::Closed));
            }
            // `arrived_tx` drops here: event waiters learn that no more will come.
        });
        let qmp = Qmp {
            writer: Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            arrived,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value, waiting at most [`DEFAULT_TIMEOUT`].
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, DEFAULT_TIMEOUT)
            .await
    }

    /// Runs a command and returns its `return` value; a QEMU that has not taken the command
    /// and answered it within `timeout` is [`QmpError::Timeout`] naming the command.
    pub async fn execute_within(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        let exchange = async {
            {
                let mut w = self.writer.lock().await;
                w.write_all(line.as_bytes()).await?;
            }
            rx.await.map_err(|_| QmpError::Closed)?
        };
        let answer = tokio::time::timeout(timeout, exchange).await;
        lock(&self.pending).remove(&id);
        let answer = answer.map_err(|_| QmpError::Timeout {
            what: format!("QMP command {command}"),
            after: timeout,
        })?;
        answer.map_err(|e| match e {
            QmpError::Command { class, desc, .. } => QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            },
            other => other,
        })
    }

    /// The guest's run state (`query-status`).
    pub async fn status(&self) -> Result<StatusInfo, QmpError> {
        self.status_within(DEFAULT_TIMEOUT).await
    }

    /// [`Qmp::status`] with a deadline of its own.
    pub async fn status_within(&self, timeout: Duration) -> Result<StatusInfo, QmpError> {
        let v = self.execute_within("query-status", None, timeout).await?;
        match (v["running"].as_bool(), v["status"].as_str()) {
            (Some(running), Some(status)) => Ok(StatusInfo {
                running,
                status: RunState::parse(status),
            }),
            _ => Err(QmpError::Unexpected {
                command: "query-status".into(),
                answer: v.to_string(),
            }),
        }
    }
}

/// Events.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "waited on by the snapshot work (MIGRATION events of `migrate file:`); tested here"
    )
)]
impl Qmp {
    /// Where the events received so far end: take it before acting, then wait from it.
    pub fn cursor(&self) -> Cursor {
        Cursor(lock(&self.events).next)
    }

    /// The kept events that arrived after `from`.
    pub fn events_since(&self, from: Cursor) -> Vec<Received> {
        lock(&self.events)
            .kept
            .iter()
            .filter(|r| r.seq >= from.0)
            .cloned()
            .collect()
    }

    /// The first event after `from` that `want` accepts, waiting at most `timeout` for it;
    /// `what` names it in the timeout error. Fails with [`QmpError::Closed`] when the
    /// connection ends first.
    pub async fn wait_event(
        &self,
        from: Cursor,
        what: &str,
        timeout: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Result<Received, QmpError> {
        let mut arrived = self.arrived.clone();
        let found = async {
            loop {
                arrived.borrow_and_update();
                if let Some(hit) = self.events_since(from).into_iter().find(|r| want(&r.event)) {
                    return Ok(hit);
                }
                if arrived.changed().await.is_err() {
                    // Closed; it may have sent the event just before.
                    return self
                        .events_since(from)
                        .into_iter()
                        .find(|r| want(&r.event))
                        .ok_or(QmpError::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, found)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("with the event {what}"),
                after: timeout,
            })?
    }
}

/// Records one event message; returns how many events have arrived.
fn keep_event(log: &std::sync::Mutex<EventLog>, msg: &Value) -> u64 {
    let mut log = lock(log);
    let ts = &msg["timestamp"];
    let received = Received {
        seq: log.next,
        event: Event::from_message(msg),
        timestamp: (
            ts["seconds"].as_i64().unwrap_or_default(),
            ts["microseconds"].as_i64().unwrap_or_default(),
        ),
    };
    log.next += 1;
    if log.kept.len() == EVENT_LOG {
        log.kept.pop_front();
    }
    log.kept.push_back(received);
    log.next
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU that speaks just enough QMP: answers, errors, events before an answer, and
    /// a command (`hang`) it never answers.
    async fn fake_qemu(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut running = true;
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let mut send = async |msg: Value| {
                w.write_all(format!("{msg}\r\n").as_bytes()).await.unwrap();
            };
            let event = |name: &str, data: Option<Value>| {
                let mut e = json!({"event": name, "timestamp": {"seconds": 1_700_000_000, "microseconds": 42}});
                if let Some(data) = data {
                    e["data"] = data;
                }
                e
            };
            let reply = match v["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}, "id": id}),
                "query-status" => {
                    let status = if running { "running" } else { "paused" };
                    json!({"return": {"status": status, "running": running}, "id": id})
                }
                "stop" => {
                    // QEMU emits STOP before it answers the command.
                    running = false;
                    send(event("STOP", None)).await;
                    json!({"return": {}, "id": id})
                }
                "cont" => {
                    running = true;
                    send(event("RESUME", None)).await;
                    json!({"return": {}, "id": id})
                }
                "migrate" => {
                    send(event("MIGRATION", Some(json!({"status": "setup"})))).await;
                    send(event("MIGRATION_PASS", Some(json!({"pass": 1})))).await;
                    send(event("MIGRATION", Some(json!({"status": "completed"})))).await;
                    send(event("NEW_IN_QEMU_99", Some(json!({"x": 1})))).await;
                    json!({"return": {}, "id": id})
                }
                "hang" => continue,
                "quit" => {
                    send(json!({"return": {}, "id": id})).await;
                    return;
                }
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                }
            };
            send(reply).await;
        }
    }

    async fn session() -> (tempfile::TempDir, Qmp, tokio::task::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(listener));
        let qmp = Qmp::connect(&path).await.unwrap();
        (dir, qmp, server)
    }

    #[tokio::test]
    async fn negotiates_runs_commands_and_sees_close() {
        let (_dir, qmp, server) = session().await;
        let status = qmp.status().await.unwrap();
        assert_eq!(
            status,
            StatusInfo {
                running: true,
                status: RunState::Running
            }
        );
        let err = qmp.execute("bogus", None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "QMP command bogus failed: CommandNotFound: The command bogus has not been found"
        );
        let before_quit = qmp.cursor();
        qmp.execute("quit", None).await.unwrap();
        server.await.unwrap();
        // The peer is gone: commands and event waits fail instead of hanging.
        assert!(matches!(
            qmp.status().await,
            Err(QmpError::Closed | QmpError::Io(_))
        ));
        let waited = qmp
            .wait_event(before_quit, "STOP", Duration::from_secs(10), |e| {
                *e == Event::Stop
            })
            .await;
        assert!(matches!(waited, Err(QmpError::Closed)), "{waited:?}");
    }

    #[tokio::test]
    async fn events_that_come_before_the_answer_are_kept_for_waiters() {
        let (_dir, qmp, _server) = session().await;
        let mark = qmp.cursor();
        qmp.execute("stop", None).await.unwrap();
        // STOP came before the answer: a wait that starts now still sees it.
        let stop = qmp
            .wait_event(mark, "STOP", Duration::from_secs(5), |e| *e == Event::Stop)
            .await
            .unwrap();
        assert_eq!(stop.timestamp, (1_700_000_000, 42));
        assert_eq!(qmp.status().await.unwrap().status, RunState::Paused);
        let resumed = qmp.cursor();
        assert!(resumed != mark, "the cursor moved past STOP");
        qmp.execute("cont", None).await.unwrap();
        let events: Vec<Event> = qmp
            .events_since(mark)
            .into_iter()
            .map(|r| r.event)
            .collect();
        assert_eq!(events, [Event::Stop, Event::Resume]);
        // A wait from after RESUME does not take the STOP of before.
        let err = qmp
            .wait_event(resumed, "STOP", Duration::from_millis(100), |e| {
                *e == Event::Stop
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "QEMU did not answer with the event STOP within 100 ms"
        );
        // Migration events carry their status, and unknown events their name and data.
        let mark = qmp.cursor();
        qmp.execute("migrate", None).await.unwrap();
        let done = qmp
            .wait_event(
                mark,
                "MIGRATION completed",
                Duration::from_secs(5),
                |e| matches!(e, Event::Migration { status } if status.is_final()),
            )
            .await
            .unwrap();
        assert_eq!(
            done.event,
            Event::Migration {
                status: MigrationStatus::Completed
            }
        );
        let events: Vec<Event> = qmp
            .events_since(mark)
            .into_iter()
            .map(|r| r.event)
            .collect();
        assert_eq!(
            events,
            [
                Event::Migration {
                    status: MigrationStatus::Setup
                },
                Event::MigrationPass { pass: 1 },
                Event::Migration {
                    status: MigrationStatus::Completed
                },
                Event::Other {
                    name: "NEW_IN_QEMU_99".into(),
                    data: json!({"x": 1})
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_command_that_is_never_answered_times_out_naming_it() {
        let (_dir, qmp, _server) = session().await;
        let started = std::time::Instant::now();
        let err = qmp
            .execute_within("hang", None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "QEMU did not answer QMP command hang within 200 ms"
        );
        // The session goes on: the next command is answered.
        assert_eq!(qmp.status().await.unwrap().status, RunState::Running);
        assert!(lock(&qmp.pending).is_empty(), "nothing left waiting");
    }

    #[test]
    fn states_and_statuses_parse_as_the_schema_spells_them() {
        for (name, state) in RunState::NAMED {
            assert_eq!(RunState::parse(name), state);
            assert_eq!(state.as_str(), name);
        }
        assert_eq!(RunState::parse("later"), RunState::Other("later".into()));
        assert_eq!(RunState::parse("later").to_string(), "later");
        for (name, status) in MigrationStatus::NAMED {
            assert_eq!(MigrationStatus::parse(name), status);
        }
        assert!(!MigrationStatus::parse("active").is_final());
        assert!(MigrationStatus::parse("failed").is_final());
    }
}

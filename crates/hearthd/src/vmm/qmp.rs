//! A small QMP client: one unix-socket connection, commands with ids and their answers.
//!
//! QMP (QEMU's machine protocol, `qapi/qmp-spec.rst` in qemu/qemu) sends one JSON object per line:
//! a greeting, then `{"return": ..., "id": ...}` / `{"error": {...}, "id": ...}` for commands, and
//! `{"event": ...}` at any time. This client does not deliver events: it logs each one at debug
//! level and drops it (hearthd learns that a VMM ended from its process, not from QMP). A caller
//! that needs events must add a subscription here first.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, oneshot};

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
    #[error("QMP did not answer {0} in time")]
    Timeout(String),
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
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
        // Greeting.
        let greeting = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??
            .ok_or(QmpError::Closed)?;
        let greeting: Value =
            serde_json::from_str(&greeting).map_err(|_| QmpError::Protocol(greeting.clone()))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        let pending: Pending = Arc::default();
        let reader_pending = pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(line, "QMP sent a line that is not JSON");
                    continue;
                };
                if msg.get("event").is_some() {
                    tracing::debug!(event = %msg, "QMP event");
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
        });
        let qmp = Qmp {
            writer: Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
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
        {
            let mut w = self.writer.lock().await;
            if let Err(e) = w.write_all(line.as_bytes()).await {
                lock(&self.pending).remove(&id);
                return Err(e.into());
            }
        }
        let answer = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .map_err(|_| {
                lock(&self.pending).remove(&id);
                QmpError::Timeout(command.to_owned())
            })?
            .map_err(|_| QmpError::Closed)?;
        answer.map_err(|e| match e {
            QmpError::Command { class, desc, .. } => QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            },
            other => other,
        })
    }

    /// The guest's run state (`running`, `paused`, `shutdown`, ...).
    pub async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_owned())
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU that speaks just enough QMP, including an event and an error.
    async fn fake_qemu(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let reply = match v["execute"].as_str().unwrap() {
                "qmp_capabilities" => json!({"return": {}, "id": id}),
                "query-status" => {
                    w.write_all(b"{\"event\": \"RESUME\", \"timestamp\": {}}\r\n")
                        .await
                        .unwrap();
                    json!({"return": {"status": "running", "running": true}, "id": id})
                }
                "quit" => {
                    w.write_all(format!("{}\r\n", json!({"return": {}, "id": id})).as_bytes())
                        .await
                        .unwrap();
                    return;
                }
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                }
            };
            w.write_all(format!("{reply}\r\n").as_bytes())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn negotiates_runs_commands_and_sees_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(listener));
        let qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), "running");
        let err = qmp.execute("bogus", None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "QMP command bogus failed: CommandNotFound: The command bogus has not been found"
        );
        qmp.execute("quit", None).await.unwrap();
        server.await.unwrap();
        // The peer is gone: commands fail instead of hanging.
        assert!(matches!(
            qmp.status().await,
            Err(QmpError::Closed | QmpError::Io(_))
        ));
    }
}

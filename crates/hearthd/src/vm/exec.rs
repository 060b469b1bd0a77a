//! Exec: a command run to completion with its output collected, and exec sessions (stdin,
//! output, resize, signals) that any front end drives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_api::{ErrorCode, ExecRequest, ExecResponse};
use hearth_guest_proto::{PtySize, RequestId};

use super::{VmError, VmService};
pub use crate::guest::ExecEvent;
use crate::guest::{ExecSession, ExecSpec, GuestClient, GuestError};
use crate::rules::RuleError;

/// Largest stdout or stderr a collected exec keeps; exec sessions have no such limit.
pub const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// What a front end asks for when it opens an exec session.
#[derive(Debug)]
pub struct ExecOpen {
    pub request: ExecRequest,
    /// The front end will send stdin (else the process's stdin is empty).
    pub stdin: bool,
    /// Run under a PTY of this size.
    pub pty: Option<PtySize>,
}

/// A running command in a VM, driven by one front end: output and the exit come from
/// [`ExecOutput`], stdin, resize and signals go through [`ExecInput`]. Dropped before the exit,
/// the process is ended in the guest.
#[derive(Debug)]
pub struct ExecStream {
    pub output: ExecOutput,
    pub input: ExecInput,
}

/// The output half of an [`ExecStream`].
#[derive(Debug)]
pub struct ExecOutput {
    vm_name: String,
    session: ExecSession,
}

/// The input half of an [`ExecStream`]: cheap to clone, usable while the output is read.
#[derive(Debug, Clone)]
pub struct ExecInput {
    vm_name: String,
    client: Arc<GuestClient>,
    id: RequestId,
}

impl ExecOutput {
    /// The next piece of output, or the exit (after which nothing more comes).
    pub async fn next(&mut self) -> Result<ExecEvent, VmError> {
        self.session.next().await.map_err(|source| VmError::Guest {
            name: self.vm_name.clone(),
            source,
        })
    }
}

impl ExecInput {
    fn guest_err(&self, source: GuestError) -> VmError {
        VmError::Guest {
            name: self.vm_name.clone(),
            source,
        }
    }

    /// Feeds the process's stdin; an empty `data` closes it.
    pub async fn write(&self, data: &[u8]) -> Result<(), VmError> {
        self.client
            .send_data(self.id, data)
            .await
            .map_err(|e| self.guest_err(e))
    }

    /// Closes the process's stdin.
    pub async fn close(&self) -> Result<(), VmError> {
        self.write(&[]).await
    }

    pub async fn resize(&self, size: PtySize) -> Result<(), VmError> {
        self.client
            .resize(self.id, size)
            .await
            .map_err(|e| self.guest_err(e))
    }

    pub async fn signal(&self, signal: i32) -> Result<(), VmError> {
        self.client
            .signal(self.id, signal)
            .await
            .map_err(|e| self.guest_err(e))
    }
}

impl VmService {
    /// Opens an exec session in a running VM.
    pub(super) async fn open_exec_stream(
        &self,
        name: &str,
        open: ExecOpen,
    ) -> Result<ExecStream, VmError> {
        // An unknown or stopped VM is reported before anything about the command.
        let (vm_name, guest) = self.guest(name, "exec").await?;
        let spec = exec_spec(open.request, open.stdin, open.pty)?;
        let program = spec.argv.first().cloned().unwrap_or_default();
        let session = guest.exec(spec).await.map_err(|source| match source {
            GuestError::Agent { code, message } => VmError::BadCommand {
                name: vm_name.clone(),
                program,
                code,
                message,
            },
            source => VmError::Guest {
                name: vm_name.clone(),
                source,
            },
        })?;
        Ok(ExecStream {
            input: ExecInput {
                vm_name: vm_name.clone(),
                client: guest,
                id: session.id,
            },
            output: ExecOutput { vm_name, session },
        })
    }

    /// Runs a command to completion, feeding it the request's stdin, and collects its output
    /// (up to [`EXEC_OUTPUT_LIMIT`] per stream).
    pub(super) async fn exec(
        &self,
        name: &str,
        mut req: ExecRequest,
    ) -> Result<ExecResponse, VmError> {
        let started = Instant::now();
        let stdin = req.stdin.take();
        let open = ExecOpen {
            request: req,
            stdin: stdin.is_some(),
            pty: None,
        };
        let ExecStream { mut output, input } = self.open_exec_stream(name, open).await?;
        if let Some(text) = stdin {
            input.write(text.as_bytes()).await?;
            input.close().await?;
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match output.next().await? {
                ExecEvent::Stdout(b) => append_capped(&mut stdout, &b),
                ExecEvent::Stderr(b) => append_capped(&mut stderr, &b),
                ExecEvent::Exited {
                    code,
                    signal,
                    timed_out,
                } => {
                    return Ok(ExecResponse {
                        exit_code: code,
                        signal,
                        timed_out,
                        truncated: stdout.len() >= EXEC_OUTPUT_LIMIT
                            || stderr.len() >= EXEC_OUTPUT_LIMIT,
                        stdout: String::from_utf8_lossy(&stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&stderr).into_owned(),
                        duration_ms: u64::try_from(started.elapsed().as_millis())
                            .unwrap_or(u64::MAX),
                    });
                }
            }
        }
    }
}

/// Turns an API exec request into an agent exec.
fn exec_spec(
    req: ExecRequest,
    stdin: bool,
    pty: Option<hearth_guest_proto::PtySize>,
) -> Result<ExecSpec, VmError> {
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(RuleError {
            code: ErrorCode::InvalidCommand,
            message: "invalid command: it must name a program, e.g. [\"uname\", \"-a\"]".into(),
        }
        .into());
    }
    if let Some(cwd) = &req.cwd
        && !cwd.starts_with('/')
    {
        return Err(RuleError {
            code: ErrorCode::InvalidPath,
            message: format!("invalid cwd {cwd:?}: must be an absolute path"),
        }
        .into());
    }
    if req.timeout_secs == Some(0) {
        return Err(VmError::BadRequest(
            "timeout_secs must be at least 1".into(),
        ));
    }
    Ok(ExecSpec {
        argv: req.command,
        env: req.env.into_iter().collect(),
        cwd: req.cwd,
        stdin,
        pty,
        timeout: req.timeout_secs.map(Duration::from_secs),
    })
}

fn append_capped(buf: &mut Vec<u8>, bytes: &[u8]) {
    let room = EXEC_OUTPUT_LIMIT.saturating_sub(buf.len());
    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_requests_are_checked() {
        let req = |command: &[&str], cwd: Option<&str>| ExecRequest {
            command: command.iter().map(|s| s.to_string()).collect(),
            cwd: cwd.map(str::to_owned),
            ..ExecRequest::default()
        };
        assert_eq!(
            exec_spec(req(&[], None), false, None).unwrap_err().code(),
            ErrorCode::InvalidCommand
        );
        assert_eq!(
            exec_spec(req(&["ls"], Some("tmp")), false, None)
                .unwrap_err()
                .code(),
            ErrorCode::InvalidPath
        );
        let spec = exec_spec(req(&["ls", "-l"], Some("/tmp")), true, None).unwrap();
        assert_eq!(spec.argv, ["ls", "-l"]);
        assert!(spec.stdin);
    }
}

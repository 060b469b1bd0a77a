//! Running `ip` and `nft`: always an argument vector, never a shell string, with the program
//! looked up in the system directories (not `$PATH`) and `LC_ALL=C`, so the error texts the
//! idempotency checks look for are the untranslated ones.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Where the helper looks for the programs it runs, in this order.
const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// A command that could not be run, or ran and failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

impl CommandError {
    /// True when the command ran and its error output contains `text`.
    pub fn stderr_contains(&self, text: &str) -> bool {
        match self {
            CommandError::Failed { stderr, .. } => stderr.contains(text),
            CommandError::Spawn { .. } => false,
        }
    }
}

/// The program's path in the first system directory that has it (the bare name otherwise, so
/// the spawn error names it).
pub fn program(name: &str) -> PathBuf {
    SYSTEM_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `program args…` as one line, for messages.
pub fn display(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args…` (with `stdin` fed to it when given) and returns its standard output;
/// a non-zero exit is [`CommandError::Failed`] with the error output.
pub fn run(program_name: &str, args: &[&str], stdin: Option<&str>) -> Result<String, CommandError> {
    let command = display(program_name, args);
    let spawn_error = |source| CommandError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program(program_name))
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A program that exits early closes its end; its status tells why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(CommandError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_reports_its_line_status_and_error_output() {
        let err = run("ls", &["/hearth-no-such-file"], None).unwrap_err();
        assert!(err.stderr_contains("No such file or directory"), "{err}");
        let text = err.to_string();
        assert!(text.contains("`ls /hearth-no-such-file` failed"), "{text}");
        assert!(text.contains("exit status: 2"), "{text}");
        assert_eq!(run("cat", &[], Some("in")).unwrap(), "in");
        let missing = run("hearth-no-such-program", &[], None).unwrap_err();
        assert!(matches!(missing, CommandError::Spawn { .. }), "{missing}");
        assert!(!missing.stderr_contains(""));
    }
}

//! VM logs: the serial console and the VMM's own output, kept under a size cap, and log
//! streams (the last lines, then optionally what is written next) for any front end.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use hearth_api::VmState;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use super::{VmError, VmService, lock};
use crate::store::VmRecord;

/// Which log of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    Serial,
    Vmm,
}

impl LogSource {
    pub fn name(self) -> &'static str {
        match self {
            LogSource::Serial => "serial",
            LogSource::Vmm => "vmm",
        }
    }
}

/// Which part of a log to read.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWindow {
    /// Only the last N lines (looked for in the last [`TAIL_SCAN`] bytes); all when `None`.
    pub tail: Option<usize>,
    /// Keep going: deliver what is written next, until the VM is deleted.
    pub follow: bool,
}

/// How far back from the end `tail` looks for line starts.
const TAIL_SCAN: u64 = 1 << 20;
/// How often a followed log looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// A log being read. Following it ends when the VM is deleted; it survives the log being
/// capped (truncated in place) or rotated (renamed, a new file begun).
#[derive(Debug)]
pub struct LogStream {
    file: Option<tokio::fs::File>,
    pos: u64,
    path: PathBuf,
    follow: bool,
    gone: watch::Receiver<bool>,
    buf: Vec<u8>,
}

impl LogStream {
    /// The next chunk of the log; `None` at its end (or, when following, once the VM is gone).
    pub async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            if let Some(f) = self.file.as_mut() {
                match f.read(&mut self.buf).await {
                    Ok(0) => {}
                    Ok(n) => {
                        self.pos += n as u64;
                        return Some(Ok(Bytes::copy_from_slice(&self.buf[..n])));
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
            if !self.follow || *self.gone.borrow() {
                return None;
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_POLL) => {}
                // Changed to true, or the sender went with the VM: either way it is gone.
                _ = self.gone.changed() => return None,
            }
            if self.file.is_none() || log_replaced(&self.path, self.file.as_ref(), self.pos).await {
                self.file = tokio::fs::File::open(&self.path).await.ok();
                self.pos = 0;
            }
        }
    }
}

/// True when `path` is no longer the file `open` reads, or is shorter than what was read.
async fn log_replaced(path: &Path, open: Option<&tokio::fs::File>, pos: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(now) = tokio::fs::metadata(path).await else {
        return false;
    };
    let Some(file) = open else { return true };
    match file.metadata().await {
        Ok(was) => was.ino() != now.ino() || now.len() < pos,
        Err(_) => true,
    }
}

/// Where the last `n` lines of `file` start, looking back at most [`TAIL_SCAN`] bytes.
async fn tail_start(file: &mut tokio::fs::File, n: usize) -> std::io::Result<u64> {
    let len = file.metadata().await?.len();
    if n == 0 {
        return Ok(len);
    }
    let from = len.saturating_sub(TAIL_SCAN);
    file.seek(SeekFrom::Start(from)).await?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).await?;
    Ok(from + last_lines_offset(&buf, n) as u64)
}

/// The offset in `text` where its last `n` (≥ 1) lines begin; a final newline ends the last
/// line rather than starting an empty one.
fn last_lines_offset(text: &[u8], n: usize) -> usize {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return i + 1;
            }
        }
    }
    0
}

impl VmService {
    pub(super) fn log_path(&self, vm: &VmRecord, source: LogSource) -> PathBuf {
        self.vm_dir(&vm.id).join(format!("{}.log", source.name()))
    }

    /// Tells a VM's log followers it is gone. Called when its record is removed.
    pub(super) fn signal_gone(&self, id: &str) {
        if let Some(tx) = lock(&self.inner.gone).remove(id) {
            let _ = tx.send(true);
        }
    }

    pub(super) async fn log_stream(
        &self,
        name: &str,
        source: LogSource,
        window: LogWindow,
    ) -> Result<LogStream, VmError> {
        let vm = self.record(name).await?;
        // Subscribed before the VM is looked at again, so a delete in between is not missed.
        let gone = lock(&self.inner.gone)
            .entry(vm.id.clone())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe();
        let vm = self.record(&vm.id).await?;
        if vm.state == VmState::Deleting {
            return Err(VmError::NotFound(name.to_owned()));
        }
        let path = self.log_path(&vm, source);
        let log_err = |e: std::io::Error| VmError::Log {
            name: vm.name.clone(),
            source_name: source.name().into(),
            source: e,
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(log_err(e)),
        };
        let mut pos = 0;
        if let Some(f) = file.as_mut() {
            if let Some(n) = window.tail {
                pos = tail_start(f, n).await.map_err(log_err)?;
            }
            f.seek(SeekFrom::Start(pos)).await.map_err(log_err)?;
        }
        Ok(LogStream {
            file,
            pos,
            path,
            follow: window.follow,
            gone,
            buf: vec![0; 64 * 1024],
        })
    }
}

/// Keeps at most one old copy of a log once it is larger than `max` bytes (before a start, when
/// no process writes it).
pub(super) fn rotate_log(path: &Path, max: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > max) {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
}

/// Like [`rotate_log`] for a log the VMM is writing: copy it aside, then truncate it in place.
/// The VMM opened it for appending, so its next write lands at the new end.
pub(super) fn cap_log(path: &Path, max: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > max)
        && std::fs::copy(path, path.with_extension("log.1")).is_ok()
        && let Ok(f) = std::fs::OpenOptions::new().write(true).open(path)
    {
        let _ = f.set_len(0);
    }
}

/// The last `n` non-empty lines of a file, joined, for error messages. Reads only the end of
/// the file, however large it is.
pub(super) fn tail_lines(path: &Path, n: usize) -> String {
    const SCAN: u64 = 16 * 1024;
    let mut text = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(SCAN))).is_ok() {
            let _ = f.take(SCAN).read_to_end(&mut text);
        }
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_being_written_is_capped_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writer.write_all(&[b'x'; 10_000]).unwrap();
        cap_log(&log, 20_000);
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            10_000,
            "under the cap"
        );
        cap_log(&log, 4096);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(
            std::fs::read(dir.path().join("serial.log.1"))
                .unwrap()
                .len(),
            10_000
        );
        // The writer keeps appending at the new end, not at its old offset.
        writer.write_all(b"next\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"next\n");
    }

    #[test]
    fn last_lines_are_found_from_the_end() {
        assert_eq!(last_lines_offset(b"a\nb\nc\n", 1), 4);
        assert_eq!(last_lines_offset(b"a\nb\nc\n", 2), 2);
        assert_eq!(last_lines_offset(b"a\nb\nc", 5), 0);
        assert_eq!(last_lines_offset(b"", 1), 0);
    }

    #[test]
    fn tails_of_large_files_read_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut f = std::fs::File::create(&log).unwrap();
        // A sparse 1 GiB hole, then three lines: reading it whole would take a while.
        f.seek(SeekFrom::Start(1 << 30)).unwrap();
        f.write_all(b"\none\n\ntwo\nthree\n").unwrap();
        assert_eq!(tail_lines(&log, 2), "two / three");
        assert_eq!(tail_lines(&dir.path().join("missing.log"), 2), "");
    }
}

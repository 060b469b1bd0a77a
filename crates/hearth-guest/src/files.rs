//! `put_file` and `get_file`.
//!
//! A put writes into a temporary file beside the target, syncs it, sets its mode and renames it
//! into place, so the target is never seen half written. A get sends `file_info`, the contents in
//! chunks of at most [`CHUNK_LEN`], and an empty `data`; a windowed get sends no more bytes than
//! the host granted, so a slow reader on the host slows the transfer instead of overrunning it.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hearth_guest_proto::{CHUNK_LEN, ErrorCode, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, oneshot};

use crate::server::{Ctx, InflowRx, describe, io_error_code};

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("path {0:?} does not name a file")]
    NoFileName(String),
    #[error("{} is a directory", .0.display())]
    IsDirectory(PathBuf),
    #[error("{} is not a regular file", .0.display())]
    NotRegular(PathBuf),
    #[error("cannot {op} {}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FileError::NotAbsolute(_)
            | FileError::NoFileName(_)
            | FileError::IsDirectory(_)
            | FileError::NotRegular(_) => ErrorCode::InvalidRequest,
            FileError::Io { source, .. } => io_error_code(source),
        }
    }
}

/// Wraps an OS error with what was being done to which path.
fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_owned();
    move |source| FileError::Io { op, path, source }
}

fn absolute(path: &str) -> Result<PathBuf, FileError> {
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(FileError::NotAbsolute(path.to_owned()))
    }
}

/// Runs a `put_file` exchange: grants the host its window, then takes `data` payloads until an
/// empty one, giving their bytes back as credit as they are written.
pub async fn put(ctx: Ctx, path: String, mode: u32, mut data: InflowRx) {
    data.open_window().await;
    match write_file(&path, mode, &mut data).await {
        Ok(Written::Done) => ctx.finish(&Event::Done { id: ctx.id }, &[]).await,
        Ok(Written::Cancelled) => {}
        Err(err) => {
            debug!("put_file {}: {}", ctx.id, describe(&err));
            ctx.fail(err.code(), describe(&err)).await;
        }
    }
}

enum Written {
    Done,
    /// The exchange was cancelled or forgotten before the last `data`.
    Cancelled,
}

async fn write_file(path: &str, mode: u32, data: &mut InflowRx) -> Result<Written, FileError> {
    let target = absolute(path)?;
    let (Some(dir), Some(_)) = (target.parent(), target.file_name()) else {
        return Err(FileError::NoFileName(path.to_owned()));
    };
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_err("create directory", dir))?;
    let temp = TempFile(Some(dir.join(temp_name())));
    let temp_path = temp.path().to_owned();
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp_path)
        .await
        .map_err(io_err("create", &temp_path))?;
    loop {
        let Some(chunk) = data.recv().await else {
            return Ok(Written::Cancelled);
        };
        if chunk.is_empty() {
            break;
        }
        file.write_all(&chunk)
            .await
            .map_err(io_err("write", &temp_path))?;
        data.consumed(chunk.len()).await;
    }
    file.flush().await.map_err(io_err("write", &temp_path))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .await
        .map_err(io_err("set the mode of", &temp_path))?;
    file.sync_all().await.map_err(io_err("sync", &temp_path))?;
    drop(file);
    tokio::fs::rename(&temp_path, &target)
        .await
        .map_err(io_err("replace", &target))?;
    temp.keep();
    // Make the rename itself durable; the data already is.
    if let Ok(dir) = tokio::fs::File::open(dir).await {
        let _ = dir.sync_all().await;
    }
    Ok(Written::Done)
}

/// A name for a temporary file, unique within this agent's lifetime.
fn temp_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(".hearth-put.{}.{n}", std::process::id())
}

/// Removes the temporary file unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs a `get_file` exchange; stops quietly when `cancel`'s sender is dropped. With `credit`
/// (a windowed get) each chunk waits for the host's credit.
pub async fn get(
    ctx: Ctx,
    path: String,
    cancel: oneshot::Receiver<()>,
    credit: Option<Arc<Semaphore>>,
) {
    let result = tokio::select! {
        result = send_file(&ctx, &path, credit.as_deref()) => result,
        _ = cancel => return,
    };
    // The last frame is sent outside the select: closing the exchange drops the cancel sender.
    match result {
        Ok(()) => ctx.finish(&Event::Data { id: ctx.id }, &[]).await,
        Err(err) => {
            debug!("get_file {}: {}", ctx.id, describe(&err));
            ctx.fail(err.code(), describe(&err)).await;
        }
    }
}

/// Sends `file_info` and every chunk of the file, but not the final empty `data`.
async fn send_file(ctx: &Ctx, path: &str, credit: Option<&Semaphore>) -> Result<(), FileError> {
    let path = absolute(path)?;
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(io_err("read", &path))?;
    if meta.is_dir() {
        return Err(FileError::IsDirectory(path));
    }
    // Opening a FIFO would block, and a device may never end.
    if !meta.is_file() {
        return Err(FileError::NotRegular(path));
    }
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(io_err("open", &path))?;
    let id = ctx.id;
    let info = Event::FileInfo {
        id,
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
    };
    ctx.send(&info, &[]).await;
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        let n = file.read(&mut buf).await.map_err(io_err("read", &path))?;
        if n == 0 {
            return Ok(());
        }
        if let Some(credit) = credit {
            // n is at most CHUNK_LEN (64 KiB). The semaphore is never closed; a cancel ends
            // this wait through the caller's select.
            let bytes = u32::try_from(n).unwrap_or(u32::MAX);
            if let Ok(permit) = credit.acquire_many(bytes).await {
                permit.forget();
            }
        }
        ctx.send(&Event::Data { id }, &buf[..n]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::inflow;
    use crate::transport::Outbox;

    #[test]
    fn relative_paths_are_refused() {
        assert!(matches!(
            absolute("etc/passwd"),
            Err(FileError::NotAbsolute(_))
        ));
        assert_eq!(absolute("/etc/passwd").unwrap(), Path::new("/etc/passwd"));
        assert_eq!(
            FileError::NotAbsolute(String::new()).code(),
            ErrorCode::InvalidRequest
        );
    }

    #[tokio::test]
    async fn put_writes_atomically_and_cleans_up_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/file");
        let (mut tx, mut rx) = inflow(1, Outbox::detached());
        tx.push(b"hello ".to_vec(), true).unwrap();
        tx.push(b"world".to_vec(), true).unwrap();
        tx.push(Vec::new(), true).unwrap();
        let done = write_file(target.to_str().unwrap(), 0o640, &mut rx).await;
        assert!(matches!(done, Ok(Written::Done)));
        assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640);

        // The sender goes away before the end: nothing is written, no temporary file is left.
        let (mut tx, mut rx) = inflow(2, Outbox::detached());
        tx.push(b"partial".to_vec(), true).unwrap();
        drop(tx);
        let other = dir.path().join("a/b/other");
        let cancelled = write_file(other.to_str().unwrap(), 0o600, &mut rx).await;
        assert!(matches!(cancelled, Ok(Written::Cancelled)));
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file")]);
    }
}

//! File transfers between a front end and a VM's guest, as streams of chunks.

use std::fmt;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hearth_api::ErrorCode;
use tokio::sync::mpsc;

use super::{VmError, VmService};
use crate::guest::GuestError;
use crate::rules::RuleError;

/// The bytes of an upload as the front end receives them; an `Err` aborts the transfer (the
/// guest keeps the old file) with that reason.
pub struct Upload(pub Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>);

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Upload")
    }
}

/// A file being read from a guest. Dropped before the end, the read is cancelled in the guest.
#[derive(Debug)]
pub struct Download {
    /// The size the guest reported when it opened the file; files under `/proc`, or ones that
    /// change while read, deliver another number of bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    chunks: mpsc::Receiver<Result<Vec<u8>, GuestError>>,
    vm_name: String,
    path: String,
}

impl Download {
    /// The next chunk; `None` at the end of the file.
    pub async fn next(&mut self) -> Option<Result<Bytes, VmError>> {
        let item = self.chunks.recv().await?;
        Some(item.map(Bytes::from).map_err(|source| VmError::GuestFile {
            name: self.vm_name.clone(),
            path: self.path.clone(),
            source,
        }))
    }
}

/// A path in the guest must be absolute and free of NUL bytes.
fn check_guest_path(path: &str) -> Result<(), VmError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(RuleError {
            code: ErrorCode::InvalidPath,
            message: format!("invalid path {path:?}: must be an absolute path in the guest"),
        }
        .into());
    }
    Ok(())
}

impl VmService {
    pub(super) async fn put_file(
        &self,
        name: &str,
        path: &str,
        mode: u32,
        Upload(mut data): Upload,
    ) -> Result<(), VmError> {
        check_guest_path(path)?;
        if mode > 0o7777 {
            return Err(VmError::BadRequest(format!(
                "invalid mode {mode:o}: must be permission bits, at most 7777 in octal"
            )));
        }
        let (vm_name, guest) = self.guest(name, "copying files").await?;
        let (tx, rx) = mpsc::channel::<Result<Vec<u8>, String>>(8);
        let feed = async move {
            while let Some(chunk) = data.next().await {
                let item = chunk.map(|c| c.to_vec());
                let failed = item.is_err();
                // A closed channel: the guest side ended early, and its answer says why.
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        };
        let ((), put) = tokio::join!(feed, guest.put_file(path, mode, rx));
        put.map_err(|source| VmError::GuestFile {
            name: vm_name.clone(),
            path: path.to_owned(),
            source,
        })
    }

    pub(super) async fn get_file(&self, name: &str, path: &str) -> Result<Download, VmError> {
        check_guest_path(path)?;
        let (vm_name, guest) = self.guest(name, "copying files").await?;
        let (size, mode, chunks) =
            guest
                .get_file(path)
                .await
                .map_err(|source| VmError::GuestFile {
                    name: vm_name.clone(),
                    path: path.to_owned(),
                    source,
                })?;
        Ok(Download {
            size,
            mode,
            chunks,
            vm_name,
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_checked() {
        assert!(check_guest_path("/etc/hostname").is_ok());
        for bad in ["etc/hostname", "", "/a\0b"] {
            assert_eq!(
                check_guest_path(bad).unwrap_err().code(),
                ErrorCode::InvalidPath,
                "{bad:?}"
            );
        }
    }
}

//! Export and import of stopped VMs: a VM as one tar stream (the format is `crate::archive`),
//! for moving it to another host or keeping it off the host.
//!
//! An export holds the VM's lock while it streams (the VM cannot start, change or go away
//! under it) and reads each file once; a client that goes away ends it. Nothing is written
//! on the host, so a crash during an export leaves the VM as it was.
//!
//! An import writes the files into `<data_dir>/imports/<random>/` as they arrive, checking the
//! manifest before the first file and each file's size and checksum as it ends. Only a
//! complete, checked archive becomes a VM: its record is inserted (`creating`), the directory
//! renamed to the VM's, and the VM moved to `stopped`. A crash before the rename leaves a
//! staging directory (removed at start) and at most a `creating` record (removed with its
//! directory by recovery): never a VM with a partial disk.

use std::io;
use std::os::unix::fs::DirBuilderExt;

use bytes::Bytes;
use futures_util::StreamExt;
use hearth_api::{CreateVmRequest, EgressRequest, Size, VmDetail, VmState};
use tokio::sync::{mpsc, oneshot};

use super::files::Upload;
use super::state::Input;
use super::{Caller, VmError, VmService, random_id};
use crate::archive::{self, Export, Manifest, ManifestVm, ReadError, Sources};
use crate::capacity::{self, Demand};
use crate::image::Image;
use crate::net::Network;
use crate::rules;
use crate::store::{EgressRecord, StoreError, VmRecord};

/// Chunks of an export on their way to the client.
const EXPORT_QUEUE: usize = 4;
/// Small writes (headers, padding) are gathered up to this before they are sent.
const GATHER: usize = 256 << 10;
/// An export whose client takes nothing for this long is ended (and the VM released).
const EXPORT_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// An export being streamed. Dropped before its end, the export stops and the VM is released.
#[derive(Debug)]
pub struct ExportStream {
    /// The VM's name (for a file name).
    pub vm: String,
    /// The archive's exact length.
    pub len: u64,
    chunks: mpsc::Receiver<io::Result<Bytes>>,
}

impl ExportStream {
    /// The next bytes of the archive; `None` at its end.
    pub async fn next(&mut self) -> Option<io::Result<Bytes>> {
        self.chunks.recv().await
    }
}

/// Sends an archive's bytes down a channel, from a blocking thread.
struct ChannelSink {
    tx: mpsc::Sender<io::Result<Bytes>>,
    pending: Vec<u8>,
    handle: tokio::runtime::Handle,
}

impl ChannelSink {
    fn send(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        use mpsc::error::SendTimeoutError;
        let sent = self
            .handle
            .block_on(self.tx.send_timeout(Ok(Bytes::from(bytes)), EXPORT_STALL));
        match sent {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Closed(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the client went away",
            )),
            Err(SendTimeoutError::Timeout(_)) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing for {} s", EXPORT_STALL.as_secs()),
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::replace(&mut self.pending, Vec::with_capacity(GATHER));
        self.send(bytes)
    }
}

impl archive::Sink for ChannelSink {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= GATHER {
            self.flush()?;
        }
        Ok(())
    }

    fn put_owned(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.flush()?;
        self.send(bytes)
    }
}

/// The egress policy as an export carries it: `None` for the default (allow all), which any
/// host takes, networking or not.
fn egress_of(r: &EgressRecord) -> Option<EgressRequest> {
    (*r != EgressRecord::default()).then(|| crate::net::egress::to_request(r))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VmService {
    pub(super) async fn export(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<ExportStream, VmError> {
        let vm = self.record(name).await?;
        let guard = self.vm_lock(&vm.id).lock_owned().await;
        let vm = Self::stopped(self.record(&vm.id).await?, "export")?;
        let manifest = Manifest {
            format: archive::FORMAT.into(),
            version: archive::VERSION,
            hearth_version: env!("CARGO_PKG_VERSION").into(),
            exported_at: crate::store::now(),
            exported_by: caller.principal.to_string(),
            vm: ManifestVm {
                name: vm.name.clone(),
                created_at: vm.created_at.clone(),
                created_by: vm.created_by.clone(),
                cpus: vm.cpus,
                memory_mib: vm.memory_mib,
                rootfs_mib: vm.rootfs_mib,
                egress: egress_of(&vm.egress),
                user_data: vm.metadata.user_data.clone(),
                ssh_authorized_keys: vm.metadata.ssh_authorized_keys.clone(),
            },
            files: Vec::new(),
        };
        let dir = self.vm_dir(&vm.id);
        let plan = tokio::task::spawn_blocking(move || {
            let rootfs = dir.join("rootfs.ext4");
            let logs = archive::LOGS
                .iter()
                .map(|name| (*name, dir.join(name)))
                .collect();
            let sources = Sources {
                rootfs: &rootfs,
                logs,
            };
            Export::plan(&sources, manifest, unix_now())
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))?
        .map_err(|source| VmError::Export {
            name: vm.name.clone(),
            source,
        })?;
        let len = plan.len();
        let (tx, rx) = mpsc::channel(EXPORT_QUEUE);
        let store = self.inner.store.clone();
        let handle = tokio::runtime::Handle::current();
        let (vm_id, vm_name, who) = (vm.id.clone(), vm.name.clone(), caller.principal.to_string());
        tokio::task::spawn_blocking(move || {
            // The VM stays locked until the archive is written or abandoned.
            let _guard = guard;
            let mut sink = ChannelSink {
                tx,
                pending: Vec::with_capacity(GATHER),
                handle: handle.clone(),
            };
            match plan.write(&mut sink).and_then(|()| sink.flush()) {
                Ok(()) => {
                    let message = format!("exported by {who} ({len} bytes)");
                    if let Err(e) = handle.block_on(store.note(&vm_id, "exported", &message)) {
                        tracing::warn!(vm = %vm_name, error = %e, "cannot record the export");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    tracing::info!(vm = %vm_name, "export abandoned by the client");
                }
                Err(e) => {
                    tracing::warn!(vm = %vm_name, error = %e, "export failed");
                    // The client sees the body end early (its length is declared).
                    let _ = sink.tx.try_send(Err(e));
                }
            }
        });
        Ok(ExportStream {
            vm: vm.name,
            len,
            chunks: rx,
        })
    }

    pub(super) async fn import(
        &self,
        caller: &Caller,
        Upload(body): Upload,
    ) -> Result<VmDetail, VmError> {
        let image = self.image()?;
        let staging = self.imports_dir().join(random_id());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&staging)
            .map_err(|source| VmError::Export {
                name: "(import)".into(),
                source,
            })?;
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(
            body.map(|chunk| chunk.map_err(io::Error::other)),
        ));
        let (manifest_tx, manifest_rx) = oneshot::channel::<Manifest>();
        let (verdict_tx, verdict_rx) = oneshot::channel::<Result<(), VmError>>();
        let dir = staging.clone();
        let reading = tokio::task::spawn_blocking(move || {
            let input = io::BufReader::with_capacity(1 << 20, reader);
            archive::read(input, &dir, move |m: &Manifest| {
                let _ = manifest_tx.send(m.clone());
                verdict_rx
                    .blocking_recv()
                    .unwrap_or_else(|_| Err(VmError::Task("the import was abandoned".into())))
            })
        });
        let checking = async {
            let manifest = manifest_rx.await.ok()?;
            let verdict = self.check_import(caller, &manifest, &image).await;
            let record = verdict.as_ref().ok().cloned();
            let _ = verdict_tx.send(verdict.map(drop));
            record.map(|r| (r, manifest))
        };
        let (read, checked) = tokio::join!(reading, checking);
        let read = read.map_err(|e| VmError::Task(e.to_string()));
        let result = match (read, checked) {
            (Ok(Ok(_)), Some((record, manifest))) => {
                self.finish_import(record, &manifest, &staging).await
            }
            (Ok(Err(e)), _) => Err(import_error(e)),
            (Err(e), _) => Err(e),
            (Ok(Ok(_)), None) => Err(VmError::Task(
                "the import's manifest was not checked".into(),
            )),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        result
    }

    fn imports_dir(&self) -> std::path::PathBuf {
        self.inner.config.data_dir.join("imports")
    }

    /// Whether this host takes the VM `m` describes, and the record it would get: the rules
    /// of a create, a free name, and room for its files.
    async fn check_import(
        &self,
        caller: &Caller,
        m: &Manifest,
        image: &Image,
    ) -> Result<VmRecord, VmError> {
        let vm = &m.vm;
        rules::validate_name(&vm.name)?;
        rules::validate_cpus(vm.cpus)?;
        rules::validate_ram(&Size::Mib(vm.memory_mib))?;
        rules::validate_rootfs(&Size::Mib(vm.rootfs_mib), 1)?;
        if vm.created_by.is_empty()
            || vm.created_by.len() > 128
            || vm.created_by.chars().any(char::is_control)
        {
            return Err(VmError::BadArchive(
                "manifest.json: vm.created_by must be 1-128 printable characters".into(),
            ));
        }
        let (egress, metadata) = self.validate_net_request(&CreateVmRequest {
            name: vm.name.clone(),
            egress: vm.egress.clone(),
            user_data: vm.user_data.clone(),
            ssh_authorized_keys: vm.ssh_authorized_keys.clone(),
            ..CreateVmRequest::default()
        })?;
        if self.inner.store.get_vm(&vm.name).await.is_ok() {
            return Err(VmError::NameTaken(vm.name.clone()));
        }
        let stored: u64 = m.files.iter().map(|f| f.stored).sum();
        let host = capacity::probe(self.inner.vmm.ram_dir(), &self.inner.config.data_dir)
            .map_err(VmError::HostProbe)?;
        capacity::check_copy(
            &host,
            &self.inner.config.capacity,
            "the import",
            stored.div_ceil(1 << 20),
        )
        .map_err(VmError::NoSpace)?;
        self.admit(import_demand(vm)).await?;
        tracing::info!(vm = %vm.name, principal = %caller.principal, exported_at = %m.exported_at, "importing");
        let now = crate::store::now();
        Ok(VmRecord {
            id: random_id(),
            name: vm.name.clone(),
            state: VmState::Creating,
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            rootfs_mib: vm.rootfs_mib,
            image: image.id.clone(),
            vmm: self.inner.vmm.kind().into(),
            pid: None,
            created_at: vm.created_at.clone(),
            created_by: vm.created_by.clone(),
            org: caller.owning_org()?,
            updated_at: now,
            last_error: None,
            net_index: None,
            egress,
            metadata,
        })
    }

    /// Makes a checked import a VM: record, files in place, stopped.
    async fn finish_import(
        &self,
        record: VmRecord,
        m: &Manifest,
        staging: &std::path::Path,
    ) -> Result<VmDetail, VmError> {
        let record = {
            let _admission = self.inner.admission.lock().await;
            self.admit(import_demand(&m.vm)).await?;
            let slots = self.inner.network.as_ref().map(Network::subnets);
            match self
                .inner
                .store
                .insert_vm_with(&record, slots, &[], &[])
                .await
            {
                Err(StoreError::NameTaken(n)) => return Err(VmError::NameTaken(n)),
                other => other?,
            }
        };
        let lock = self.vm_lock(&record.id);
        let _guard = lock.lock().await;
        if let Err(source) = tokio::fs::rename(staging, self.vm_dir(&record.id)).await {
            self.purge(&record).await;
            return Err(VmError::Export {
                name: record.name.clone(),
                source,
            });
        }
        let message = format!(
            "imported: exported by {} at {} (hearth {})",
            m.exported_by, m.exported_at, m.hearth_version
        );
        if let Err(e) = self
            .transition(&record, Input::Created, Some(&message), None, None)
            .await
        {
            self.purge(&record).await;
            return Err(e);
        }
        self.detail(&record.id).await
    }

    /// At start: removes what a crash left of imports (their records are removed by recovery,
    /// as every `creating` VM's).
    pub(super) async fn clean_imports(&self) {
        let dir = self.imports_dir();
        if tokio::fs::metadata(&dir).await.is_ok() {
            tracing::info!(dir = %dir.display(), "removing unfinished imports");
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                tracing::warn!(error = %e, "cannot remove unfinished imports");
            }
        }
    }
}

fn import_demand(vm: &ManifestVm) -> Demand {
    Demand {
        cpus: u64::from(vm.cpus),
        memory_mib: vm.memory_mib,
        disk_mib: vm.rootfs_mib,
        run: false,
    }
}

fn import_error(e: ReadError<VmError>) -> VmError {
    match e {
        ReadError::Invalid(message) => VmError::BadArchive(message),
        ReadError::Refused(e) => e,
        ReadError::Write { path, source } => match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => VmError::NoSpace(format!(
                "the data directory filled up during the import (writing {path}); nothing of it is kept"
            )),
            _ => VmError::Export {
                name: "(import)".into(),
                source: io::Error::new(source.kind(), format!("writing {path}: {source}")),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::{EgressMode, ErrorCode};

    #[test]
    fn a_full_disk_is_a_507_and_a_bad_archive_a_400() {
        let full = import_error(ReadError::Write {
            path: "/data/imports/x/rootfs.ext4".into(),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        });
        assert_eq!(full.code(), ErrorCode::ResourceExhausted);
        assert!(
            full.message().contains("nothing of it is kept"),
            "{}",
            full.message()
        );
        let bad = import_error(ReadError::Invalid("manifest.json: version 9".into()));
        assert_eq!(bad.code(), ErrorCode::InvalidArchive);
        let other = import_error(ReadError::Write {
            path: "/data/imports/x/rootfs.ext4".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        });
        assert_eq!(other.code(), ErrorCode::Internal);
    }

    #[test]
    fn only_a_policy_other_than_the_default_travels() {
        assert_eq!(egress_of(&EgressRecord::default()), None);
        let r = EgressRecord {
            deny_all: true,
            allow_domains: vec!["example.com".into()],
            ..EgressRecord::default()
        };
        let carried = egress_of(&r).unwrap();
        assert_eq!(carried.mode, Some(EgressMode::DenyAll));
        assert_eq!(crate::net::egress::validate(&carried).unwrap(), r);
    }
}

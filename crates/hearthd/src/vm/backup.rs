//! Backups of stopped VMs' root disks, and restoring one into its VM.
//!
//! A backup is `<data_dir>/backups/<vm id>/<backup id>.ext4`: a reflink clone of the disk where
//! the filesystem shares extents, else a sparse copy. It is written as `<id>.partial`, synced,
//! renamed and only then recorded, so a row always names a complete file; a file without a
//! row (a crash between) and every `.partial` are removed at start ([`VmService::clean_backups`]).
//! A restore writes `rootfs.ext4.restore` beside the VM's disk, syncs it and renames it over
//! the disk: the old disk stays whole until the new one is in place, and a crash leaves one or
//! the other, never a mix. Backups belong to their VM's record (a new VM of the same name has
//! none of them) and go when it is deleted.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use hearth_api::{Backup, VmState};

use super::{Caller, VmError, VmService, random_id};
use crate::capacity;
use crate::disk::{self, DiskError};
use crate::store::{BackupRecord, VmRecord};

/// A restore's new disk, until it is renamed over the old one.
const RESTORING: &str = "rootfs.ext4.restore";

impl VmService {
    /// Where VM `vm_id`'s backups live.
    fn backup_dir(&self, vm_id: &str) -> PathBuf {
        self.inner.config.data_dir.join("backups").join(vm_id)
    }

    /// `vm`, when it is stopped (read under its lock); else why `what` cannot be done.
    pub(super) fn stopped(vm: VmRecord, what: &'static str) -> Result<VmRecord, VmError> {
        if vm.state != VmState::Stopped {
            return Err(VmError::NotStopped {
                what,
                name: vm.name,
                state: vm.state,
            });
        }
        Ok(vm)
    }

    /// Refuses a copy of `path`'s data that the data filesystem cannot take.
    fn check_space(&self, what: &str, path: &Path) -> Result<(), VmError> {
        let allocated = std::fs::metadata(path).map_or(0, |m| m.blocks() * 512);
        let host = capacity::probe(self.inner.vmm.ram_dir(), &self.inner.config.data_dir)
            .map_err(VmError::HostProbe)?;
        capacity::check_copy(
            &host,
            &self.inner.config.capacity,
            what,
            allocated.div_ceil(1 << 20),
        )
        .map_err(VmError::NoSpace)
    }

    pub(super) async fn create_backup(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Backup, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = Self::stopped(self.record(&vm.id).await?, "back up")?;
        let disk_path = self.vm_dir(&vm.id).join("rootfs.ext4");
        self.check_space("the backup", &disk_path)?;
        let id = random_id();
        let dir = self.backup_dir(&vm.id);
        let file = dir.join(format!("{id}.ext4"));
        let size_bytes = {
            let (dir, file) = (dir.clone(), file.clone());
            disk_work(&vm.name, move || write_backup(&disk_path, &dir, &file)).await?
        };
        let record = BackupRecord {
            id,
            vm_id: vm.id.clone(),
            created_at: crate::store::now(),
            created_by: caller.principal.to_string(),
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            rootfs_mib: vm.rootfs_mib,
            size_bytes,
        };
        if let Err(e) = self.inner.store.insert_backup(&record).await {
            let _ = std::fs::remove_file(&file);
            return Err(e.into());
        }
        Ok(to_api(record, &vm.name))
    }

    pub(super) async fn list_backups(&self, name: &str) -> Result<Vec<Backup>, VmError> {
        let vm = self.record(name).await?;
        Ok(self
            .inner
            .store
            .list_backups(&vm.id)
            .await?
            .into_iter()
            .map(|b| to_api(b, &vm.name))
            .collect())
    }

    pub(super) async fn delete_backup(&self, name: &str, id: &str) -> Result<(), VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        self.inner.store.delete_backup(&vm.id, &vm.name, id).await?;
        // The row is gone first: a crash here leaves a file without a row, removed at start.
        let file = self.backup_dir(&vm.id).join(format!("{id}.ext4"));
        if let Err(e) = tokio::fs::remove_file(&file).await {
            tracing::warn!(vm = %vm.name, backup = id, error = %e, "cannot remove the backup's file");
        }
        Ok(())
    }

    pub(super) async fn restore(
        &self,
        name: &str,
        backup: &str,
    ) -> Result<hearth_api::VmDetail, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = Self::stopped(self.record(&vm.id).await?, "restore")?;
        let record = self
            .inner
            .store
            .get_backup(&vm.id, &vm.name, backup)
            .await?;
        let source = self.backup_dir(&vm.id).join(format!("{backup}.ext4"));
        self.check_space("the restore", &source)?;
        let vm_dir = self.vm_dir(&vm.id);
        disk_work(&vm.name, move || replace_disk(&source, &vm_dir)).await?;
        self.inner.store.restored(&vm.id, &record).await?;
        self.detail(&vm.id).await
    }

    /// At start: removes what a crash left of backups and restores (every `.partial`, files
    /// no row names, the backups of VMs that are gone, a restore's unfinished disk), and
    /// records the disk size a restore put in place just before a crash.
    pub(super) async fn clean_backups(&self) -> Result<(), VmError> {
        let rows: std::collections::HashSet<(String, String)> =
            self.inner.store.all_backups().await?.into_iter().collect();
        let list = self.inner.store.list_vms().await?.vms;
        for vm in list.iter().filter(|vm| vm.state == VmState::Stopped) {
            let disk = self.vm_dir(&vm.id).join("rootfs.ext4");
            let Ok(meta) = tokio::fs::metadata(&disk).await else {
                continue;
            };
            let mib = meta.len() >> 20;
            if mib != vm.rootfs_mib && meta.len() % (1 << 20) == 0 {
                tracing::info!(vm = %vm.name, recorded = vm.rootfs_mib, disk = mib, "recording the root disk's size (a restore ended before it was recorded)");
                let shape = (vm.cpus, vm.memory_mib, mib);
                let message = format!(
                    "rootfs {} -> {mib} MiB: the disk in place after a restore",
                    vm.rootfs_mib
                );
                self.inner.store.resize_vm(&vm.id, shape, &message).await?;
            }
        }
        let vms: std::collections::HashSet<String> = list.into_iter().map(|v| v.id).collect();
        let root = self.inner.config.data_dir.join("backups");
        let vm_root = self.inner.config.data_dir.join("vms");
        tokio::task::spawn_blocking(move || {
            for vm_id in &vms {
                let leftover = vm_root.join(vm_id).join(RESTORING);
                if leftover.exists() {
                    tracing::info!(vm = %vm_id, "removing an unfinished restore");
                    let _ = std::fs::remove_file(leftover);
                }
            }
            let Ok(dirs) = std::fs::read_dir(&root) else {
                return;
            };
            for dir in dirs.flatten() {
                let vm_id = dir.file_name().to_string_lossy().into_owned();
                if !vms.contains(&vm_id) {
                    tracing::info!(vm = %vm_id, "removing the backups of a VM that is gone");
                    let _ = std::fs::remove_dir_all(dir.path());
                    continue;
                }
                let Ok(files) = std::fs::read_dir(dir.path()) else {
                    continue;
                };
                for file in files.flatten() {
                    let name = file.file_name().to_string_lossy().into_owned();
                    let recorded = name
                        .strip_suffix(".ext4")
                        .is_some_and(|id| rows.contains(&(vm_id.clone(), id.to_owned())));
                    if !recorded {
                        tracing::info!(vm = %vm_id, file = %name, "removing an unfinished backup");
                        let _ = std::fs::remove_file(file.path());
                    }
                }
            }
        })
        .await
        .map_err(|e| VmError::Task(e.to_string()))
    }

    /// Removes VM `vm_id`'s backups (it is being deleted).
    pub(super) async fn remove_backups(&self, vm_id: &str) {
        let _ = tokio::fs::remove_dir_all(self.backup_dir(vm_id)).await;
    }
}

/// Runs disk work for VM `name` on a blocking thread.
pub(super) async fn disk_work<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> Result<T, DiskError> + Send + 'static,
) -> Result<T, VmError> {
    blocking_disk_work(work, |source| VmError::Disk {
        name: name.to_owned(),
        source,
    })
    .await
}

/// Runs disk work on a blocking thread; its error becomes `wrap`'s.
pub(super) async fn blocking_disk_work<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DiskError> + Send + 'static,
    wrap: impl FnOnce(DiskError) -> VmError,
) -> Result<T, VmError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| VmError::Task(e.to_string()))?
        .map_err(wrap)
}

fn to_api(b: BackupRecord, vm: &str) -> Backup {
    Backup {
        id: b.id,
        vm: vm.to_owned(),
        created_at: b.created_at,
        created_by: b.created_by,
        cpus: b.cpus,
        memory_mib: b.memory_mib,
        rootfs_mib: b.rootfs_mib,
        size_bytes: b.size_bytes,
    }
}

/// `path` and the directory entry naming it, on disk.
fn sync(path: &Path, dir: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()?;
    File::open(dir)?.sync_all()
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> DiskError + '_ {
    move |source| DiskError::Copy {
        from: path.display().to_string(),
        to: path.display().to_string(),
        source,
    }
}

/// Copies `disk` to `file` in `dir` by way of a `.partial` file; returns what it takes on disk.
fn write_backup(disk: &Path, dir: &Path, file: &Path) -> Result<u64, DiskError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))?;
    let partial = file.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    disk::clone_file(disk, &partial)?;
    let done = sync(&partial, dir)
        .and_then(|()| std::fs::rename(&partial, file))
        .and_then(|()| File::open(dir)?.sync_all());
    if let Err(e) = done {
        let _ = std::fs::remove_file(&partial);
        return Err(io_error(file)(e));
    }
    Ok(std::fs::metadata(file).map_or(0, |m| m.blocks() * 512))
}

/// Puts a copy of `backup` in place of the disk in `vm_dir`, atomically.
fn replace_disk(backup: &Path, vm_dir: &Path) -> Result<(), DiskError> {
    let next = vm_dir.join(RESTORING);
    let _ = std::fs::remove_file(&next);
    disk::clone_file(backup, &next)?;
    let done = sync(&next, vm_dir)
        .and_then(|()| std::fs::rename(&next, vm_dir.join("rootfs.ext4")))
        .and_then(|()| File::open(vm_dir)?.sync_all());
    if let Err(e) = done {
        let _ = std::fs::remove_file(&next);
        return Err(io_error(&next)(e));
    }
    Ok(())
}

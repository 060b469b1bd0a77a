//! Volumes: named extra disks that outlive the VMs they are attached to.
//!
//! A volume is the sparse file `<data_dir>/volumes/<id>.ext4` (mode 0600). It is made as
//! `<id>.partial`, recorded, and only then renamed to its name, so a `.partial` without a row
//! is a create a crash cut short (removed at start) and one with a row is finished at start. A
//! delete renames the file to `<id>.deleting` before the row goes, and removes it after; at
//! start a `.deleting` whose row is still there is put back, one without a row removed. A file
//! `<id>.ext4` is never removed but by `hearth volume delete`. The ext4 filesystem is made at
//! the volume's first attach (`mkfs.ext4 -F -q`), and recorded. All volume changes hold
//! `Inner::volumes`, after the VM's lock where they take one.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use hearth_api::{CreateVolumeRequest, VmDetail, VmVolume, Volume, VolumeAttachment};

use super::{Caller, VmError, VmService, random_id};
use crate::capacity;
use crate::disk::{self, DiskError};
use crate::rules;
use crate::store::{StoreError, VolumeRecord};
use crate::vmm::VolumeDisk;

/// The most volumes one VM has (each is a virtio-mmio disk of the microvm machine).
pub const MAX_VOLUMES_PER_VM: usize = 8;

impl VmService {
    fn volume_dir(&self) -> PathBuf {
        self.inner.config.data_dir.join("volumes")
    }

    fn volume_file(&self, id: &str) -> PathBuf {
        self.volume_dir().join(format!("{id}.ext4"))
    }

    fn to_api(&self, v: VolumeRecord) -> Volume {
        let allocated_bytes =
            std::fs::metadata(self.volume_file(&v.id)).map_or(0, |m| m.blocks() * 512);
        Volume {
            id: v.id,
            name: v.name,
            size_mib: v.size_mib,
            created_at: v.created_at,
            formatted: v.formatted,
            vm: v.vm_name,
            path: v.path,
            allocated_bytes,
            org: v.org,
        }
    }

    pub(super) async fn create_volume(
        &self,
        caller: &Caller,
        req: CreateVolumeRequest,
    ) -> Result<Volume, VmError> {
        rules::validate_volume_name(&req.name)?;
        let org = caller.owning_org()?;
        let limits = self.inner.config.volumes;
        let mib = rules::validate_volume_size(&req.size, limits.max_size_mib)?;
        // Admission first, as a VM create takes them: its disk counts against the host's, like
        // a VM's, from the check until the row is in.
        let _admission = self.inner.admission.lock().await;
        let _volumes = self.inner.volumes.lock().await;
        match self.inner.store.get_volume(&req.name).await {
            Ok(_) => return Err(VmError::VolumeTaken(req.name)),
            Err(StoreError::NoVolume(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let host = capacity::probe(self.inner.vmm.ram_dir(), &self.inner.config.data_dir)
            .map_err(VmError::HostProbe)?;
        capacity::check_volume(&host, limits.min_free_disk_mib, mib).map_err(VmError::NoSpace)?;
        self.admit(crate::capacity::Demand {
            cpus: 0,
            memory_mib: 0,
            disk_mib: mib,
            run: false,
        })
        .await?;
        let record = VolumeRecord {
            id: random_id(),
            name: req.name.clone(),
            size_mib: mib,
            created_at: crate::store::now(),
            formatted: false,
            vm_id: None,
            vm_name: None,
            path: None,
            org,
        };
        let dir = self.volume_dir();
        let partial = dir.join(format!("{}.partial", record.id));
        let file = self.volume_file(&record.id);
        {
            let (dir, partial) = (dir.clone(), partial.clone());
            volume_work(&record.name, move || {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|source| DiskError::Create {
                        path: dir.display().to_string(),
                        source,
                    })?;
                disk::create_sparse(&partial, mib)
            })
            .await?;
        }
        if let Err(e) = self.inner.store.insert_volume(&record).await {
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
        // Recorded: from here a crash leaves a `.partial` with a row, which the start finishes.
        if let Err(source) = std::fs::rename(&partial, &file) {
            tracing::error!(volume = %record.name, error = %source, "cannot rename the new volume's file; the next start finishes it");
        }
        Ok(self.to_api(record))
    }

    pub(super) async fn list_volumes(&self) -> Result<Vec<Volume>, VmError> {
        let list = self.inner.store.list_volumes().await?;
        Ok(list.into_iter().map(|v| self.to_api(v)).collect())
    }

    pub(super) async fn delete_volume(&self, name: &str) -> Result<(), VmError> {
        let _volumes = self.inner.volumes.lock().await;
        let volume = self.inner.store.get_volume(name).await?;
        if let Some(vm) = volume.vm_name {
            return Err(VmError::VolumeInUse {
                volume: volume.name,
                vm,
            });
        }
        let file = self.volume_file(&volume.id);
        let deleting = file.with_extension("deleting");
        let moved = std::fs::rename(&file, &deleting).is_ok();
        if let Err(e) = self.inner.store.delete_volume(name).await {
            if moved {
                let _ = std::fs::rename(&deleting, &file);
            }
            return Err(e.into());
        }
        if moved && let Err(e) = tokio::fs::remove_file(&deleting).await {
            tracing::warn!(volume = name, error = %e, "cannot remove the volume's file");
        }
        Ok(())
    }

    /// Checks a create's `volumes` by the rules (names, paths, how many, no path twice);
    /// returns (name, normal path) pairs. Whether they exist and are free is checked by
    /// [`VmService::prepare_volumes`].
    pub(super) fn validate_volumes(
        list: &[VolumeAttachment],
    ) -> Result<Vec<(String, String)>, VmError> {
        if list.len() > MAX_VOLUMES_PER_VM {
            return Err(VmError::BadRequest(format!(
                "invalid volumes: {} are given, and a VM has at most {MAX_VOLUMES_PER_VM}",
                list.len()
            )));
        }
        let mut out: Vec<(String, String)> = Vec::with_capacity(list.len());
        for v in list {
            rules::validate_volume_name(&v.name)?;
            rules::validate_mount_path(&v.path)?;
            let path = rules::normal_mount_path(&v.path);
            if out.iter().any(|(n, _)| *n == v.name) {
                return Err(VmError::BadRequest(format!(
                    "invalid volumes: volume {:?} is given twice",
                    v.name
                )));
            }
            if out.iter().any(|(_, p)| *p == path) {
                return Err(VmError::BadRequest(format!(
                    "invalid volumes: two volumes are to be mounted at {path:?}"
                )));
            }
            out.push((v.name.clone(), path));
        }
        Ok(out)
    }

    /// For a create holding `Inner::volumes`: every volume of `list` exists and is attached to
    /// no VM, and is formatted.
    pub(super) async fn prepare_volumes(&self, list: &[(String, String)]) -> Result<(), VmError> {
        let mut found = Vec::with_capacity(list.len());
        for (name, _) in list {
            let v = self.inner.store.get_volume(name).await?;
            if let Some(vm) = v.vm_name.clone().or_else(|| v.vm_id.clone()) {
                return Err(VmError::VolumeInUse { volume: v.name, vm });
            }
            found.push(v);
        }
        for v in &found {
            self.ensure_formatted(v).await?;
        }
        Ok(())
    }

    async fn ensure_formatted(&self, v: &VolumeRecord) -> Result<(), VmError> {
        if v.formatted {
            return Ok(());
        }
        let file = self.volume_file(&v.id);
        volume_work(&v.name, move || disk::format_ext4(&file)).await?;
        self.inner.store.mark_formatted(&v.id).await?;
        Ok(())
    }

    pub(super) async fn attach_volume(
        &self,
        vm: &str,
        volume: &str,
        path: &str,
    ) -> Result<VmDetail, VmError> {
        rules::validate_volume_name(volume)?;
        rules::validate_mount_path(path)?;
        let path = rules::normal_mount_path(path);
        let record = self.record(vm).await?;
        let lock = self.vm_lock(&record.id);
        let _guard = lock.lock().await;
        let record = Self::stopped(self.record(&record.id).await?, "attach a volume to")?;
        let _volumes = self.inner.volumes.lock().await;
        let v = self.inner.store.get_volume(volume).await?;
        match v.vm_id.as_deref() {
            Some(id) if id != record.id => {
                return Err(VmError::VolumeInUse {
                    volume: v.name,
                    vm: v.vm_name.unwrap_or_else(|| id.to_owned()),
                });
            }
            Some(_) => {}
            None => {
                let attached = self.inner.store.vm_volumes(&record.id).await?.len();
                if attached >= MAX_VOLUMES_PER_VM {
                    return Err(VmError::BadRequest(format!(
                        "VM {:?} has {attached} volumes, the most a VM has",
                        record.name
                    )));
                }
            }
        }
        self.ensure_formatted(&v).await?;
        match self
            .inner
            .store
            .attach_volume(&record.id, volume, &path)
            .await
        {
            // Not stopped any more cannot happen under the VM's lock; gone can.
            Err(StoreError::NotFound(_)) => return Err(VmError::NotFound(vm.to_owned())),
            other => other?,
        }
        self.detail(&record.id).await
    }

    pub(super) async fn detach_volume(&self, vm: &str, volume: &str) -> Result<VmDetail, VmError> {
        let record = self.record(vm).await?;
        let lock = self.vm_lock(&record.id);
        let _guard = lock.lock().await;
        let record = Self::stopped(self.record(&record.id).await?, "detach a volume from")?;
        let _volumes = self.inner.volumes.lock().await;
        match self.inner.store.detach_volume(&record.id, volume).await {
            Err(StoreError::NotFound(_)) => return Err(VmError::NotFound(vm.to_owned())),
            Err(StoreError::NoVolume(_)) => {
                return Err(VmError::VolumeNotAttached {
                    volume: volume.to_owned(),
                    vm: record.name,
                });
            }
            other => other?,
        }
        self.detail(&record.id).await
    }

    /// The volumes of VM `vm_id`, as its detail shows them.
    pub(super) async fn vm_volumes(&self, vm_id: &str) -> Result<Vec<VmVolume>, VmError> {
        Ok(self
            .inner
            .store
            .vm_volumes(vm_id)
            .await?
            .into_iter()
            .map(|v| VmVolume {
                name: v.name,
                path: v.path.unwrap_or_default(),
                size_mib: v.size_mib,
            })
            .collect())
    }

    /// The disks of VM `vm_id`'s volumes and the kernel command line words that tell the guest
    /// where to mount them (`hearth.volume=<serial>:<path>`; the path rule keeps them plain).
    pub(super) async fn volume_disks(
        &self,
        vm_id: &str,
    ) -> Result<(Vec<VolumeDisk>, String), VmError> {
        let mut disks = Vec::new();
        let mut words = String::new();
        for v in self.inner.store.vm_volumes(vm_id).await? {
            let path = v.path.unwrap_or_default();
            words.push_str(&format!(" hearth.volume={}:{path}", v.id));
            disks.push(VolumeDisk {
                file: self.volume_file(&v.id),
                serial: v.id,
            });
        }
        Ok((disks, words))
    }

    /// At start: finishes or removes what a crash left of volume creates and deletes. Files
    /// `<id>.ext4` are never removed here, with a row or without.
    pub(super) async fn clean_volumes(&self) -> Result<(), VmError> {
        let rows: std::collections::HashSet<String> = self
            .inner
            .store
            .all_volume_ids()
            .await?
            .into_iter()
            .collect();
        let dir = self.volume_dir();
        tokio::task::spawn_blocking(move || clean_volume_dir(&dir, &rows))
            .await
            .map_err(|e| VmError::Task(e.to_string()))
    }
}

fn clean_volume_dir(dir: &Path, rows: &std::collections::HashSet<String>) {
    let Ok(files) = std::fs::read_dir(dir) else {
        return;
    };
    for file in files.flatten() {
        let path = file.path();
        let (Some(id), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let recorded = rows.contains(id);
        let done = dir.join(format!("{id}.ext4"));
        match (ext, recorded) {
            ("partial" | "deleting", true) => {
                tracing::info!(
                    volume = id,
                    "finishing a volume's file a crash left as {ext}"
                );
                let _ = std::fs::rename(&path, &done);
            }
            ("partial" | "deleting", false) => {
                tracing::info!(volume = id, "removing a volume's unfinished {ext} file");
                let _ = std::fs::remove_file(&path);
            }
            ("ext4", false) => {
                tracing::warn!(file = %path.display(), "a volume file no volume names is kept; remove it by hand if it is not needed");
            }
            _ => {}
        }
    }
}

/// Runs disk work for volume `name` on a blocking thread.
async fn volume_work<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> Result<T, DiskError> + Send + 'static,
) -> Result<T, VmError> {
    super::backup::blocking_disk_work(work, |source| VmError::VolumeDisk {
        volume: name.to_owned(),
        source,
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_finished_or_removed_and_volumes_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "a.partial",
            "b.partial",
            "c.deleting",
            "d.deleting",
            "e.ext4",
            "f.ext4",
        ] {
            std::fs::write(d.join(f), f).unwrap();
        }
        let rows = ["a", "c", "e"].map(String::from).into_iter().collect();
        clean_volume_dir(d, &rows);
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a.ext4", "c.ext4", "e.ext4", "f.ext4"]);
        assert_eq!(std::fs::read(d.join("a.ext4")).unwrap(), b"a.partial");
    }
}

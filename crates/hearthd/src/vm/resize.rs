//! Resizing a stopped VM: cpus and memory up or down within the rules, the root disk grow-only
//! (the file, then its ext4 filesystem). The disk grows before the store records the new
//! shape, so a crash in between leaves a disk bigger than recorded (which the guest never
//! sees as less), never a record bigger than the disk.

use hearth_api::{ResizeVmRequest, VmDetail};

use super::{VmError, VmService};
use crate::capacity::Demand;
use crate::disk;
use crate::rules;

impl VmService {
    pub(super) async fn resize(
        &self,
        name: &str,
        req: ResizeVmRequest,
    ) -> Result<VmDetail, VmError> {
        if req == ResizeVmRequest::default() {
            return Err(VmError::BadRequest(
                "resize: give at least one of cpus, ram and rootfs_size".into(),
            ));
        }
        if let Some(cpus) = req.cpus {
            rules::validate_cpus(cpus)?;
        }
        let ram = req.ram.as_ref().map(rules::validate_ram).transpose()?;
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = Self::stopped(self.record(&vm.id).await?, "resize")?;
        let rootfs = req
            .rootfs_size
            .as_ref()
            .map(|size| rules::validate_rootfs_growth(size, vm.rootfs_mib))
            .transpose()?;
        let old = (vm.cpus, vm.memory_mib, vm.rootfs_mib);
        let new = (
            req.cpus.unwrap_or(vm.cpus),
            ram.unwrap_or(vm.memory_mib),
            rootfs.unwrap_or(vm.rootfs_mib),
        );
        if new == old {
            return self.detail(&vm.id).await;
        }
        {
            // The growth is refused before the disk changes, and counts from the record on.
            let _admission = self.inner.admission.lock().await;
            let growth = new.2 - old.2;
            if growth > 0 {
                self.admit(Demand {
                    cpus: 0,
                    memory_mib: 0,
                    disk_mib: growth,
                    run: false,
                })
                .await?;
                let path = self.vm_dir(&vm.id).join("rootfs.ext4");
                super::backup::disk_work(&vm.name, move || disk::grow_used_ext4(&path, new.2))
                    .await?;
            }
            self.inner
                .store
                .resize_vm(&vm.id, new, &describe(old, new))
                .await?;
        }
        self.detail(&vm.id).await
    }
}

/// The event's message: what changed, from what to what.
fn describe(old: (u32, u64, u64), new: (u32, u64, u64)) -> String {
    let mut parts = Vec::new();
    if old.0 != new.0 {
        parts.push(format!("cpus {} -> {}", old.0, new.0));
    }
    if old.1 != new.1 {
        parts.push(format!("ram {} -> {} MiB", old.1, new.1));
    }
    if old.2 != new.2 {
        parts.push(format!("rootfs {} -> {} MiB", old.2, new.2));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn the_event_names_only_what_changed() {
        assert_eq!(
            describe((1, 256, 1024), (2, 256, 2048)),
            "cpus 1 -> 2, rootfs 1024 -> 2048 MiB"
        );
        assert_eq!(
            describe((2, 512, 1024), (2, 256, 1024)),
            "ram 512 -> 256 MiB"
        );
    }
}

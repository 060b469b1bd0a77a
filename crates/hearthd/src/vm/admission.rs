//! Admission control for VMs: what they have committed, measured against the host by
//! `crate::capacity`, before a create or a start does anything.

use hearth_api::{Capacity, VmState};

use super::{VmError, VmService};
use crate::capacity::{self, Committed, Demand, Host};
use crate::store::VmRecord;

/// What `vms` hold: vCPUs and RAM while they run (or are about to, or are paused: a paused VM
/// keeps its RAM and resumes at any moment), disks always; `volume_mib` more of disk for the
/// volumes (attached or not: each may fill up to its size).
fn committed(vms: &[VmRecord], volume_mib: u64) -> Committed {
    let mut c = Committed {
        disk_mib: volume_mib,
        ..Committed::default()
    };
    for vm in vms {
        c.disk_mib += vm.rootfs_mib;
        match vm.state {
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping => {
                c.cpus += u64::from(vm.cpus);
                c.memory_mib += vm.memory_mib;
            }
            VmState::Creating | VmState::Stopped | VmState::Error | VmState::Deleting => {}
        }
    }
    c
}

impl VmService {
    fn host(&self) -> Result<Host, VmError> {
        capacity::probe(self.inner.vmm.ram_dir(), &self.inner.config.data_dir)
            .map_err(VmError::HostProbe)
    }

    /// What the VMs and volumes have committed now.
    async fn committed_now(&self) -> Result<Committed, VmError> {
        let vms = self.inner.store.list_vms().await?.vms;
        let volume_mib = self
            .inner
            .store
            .list_volumes()
            .await?
            .iter()
            .map(|v| v.size_mib)
            .sum();
        Ok(committed(&vms, volume_mib))
    }

    /// Refuses `demand` when the host cannot take it. The caller holds `inner.admission` until
    /// it has recorded what was admitted.
    pub(super) async fn admit(&self, demand: Demand) -> Result<(), VmError> {
        let committed = self.committed_now().await?;
        capacity::check(
            &self.host()?,
            &self.inner.config.capacity,
            committed,
            demand,
        )?;
        Ok(())
    }

    pub(super) async fn capacity(&self) -> Result<Capacity, VmError> {
        let committed = self.committed_now().await?;
        Ok(capacity::summary(
            &self.host()?,
            &self.inner.config.capacity,
            committed,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_vms_keep_their_cpus_and_memory_committed() {
        let vm = |state| VmRecord {
            id: "a".into(),
            name: "a".into(),
            state,
            cpus: 2,
            memory_mib: 512,
            rootfs_mib: 1024,
            image: "testimage".into(),
            vmm: "double".into(),
            pid: None,
            created_at: String::new(),
            created_by: "operator".into(),
            org: "default".into(),
            updated_at: String::new(),
            last_error: None,
            net_index: None,
            egress: Default::default(),
            metadata: Default::default(),
        };
        let c = committed(&[vm(VmState::Paused), vm(VmState::Stopped)], 0);
        assert_eq!((c.cpus, c.memory_mib, c.disk_mib), (2, 512, 2048));
        let c = committed(&[vm(VmState::Stopped)], 4096);
        assert_eq!(c.disk_mib, 1024 + 4096, "volumes count as disk");
    }
}

//! Start-up recovery: re-attach to VMs that kept running while hearthd was down, and settle
//! the ones whose VMM is gone or whose create or delete was interrupted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_api::VmState;

use super::running::Runtime;
use super::state::Input;
use super::{VmError, VmService, lock};
use crate::guest::GuestClient;
use crate::store::VmRecord;
use crate::vmm::{GuestRun, VmHandle};

impl VmService {
    /// Settles every VM of the last run. A VM whose recovery fails is marked `error` with the
    /// reason in `last_error`, and the others are recovered all the same: one bad VM never
    /// keeps hearthd from starting.
    pub async fn recover(&self) -> Result<(), VmError> {
        let list = self.inner.store.list_vms().await?;
        // A row this hearthd cannot read is put in `error` (by id) and left alone.
        for bad in list.unreadable {
            tracing::error!(vm = %bad.id, name = ?bad.name, error = %bad.error, "cannot read the stored VM; marking it error");
            if bad.state != Some(VmState::Error) {
                let why = bad.error.to_string();
                if let Err(e) = self
                    .inner
                    .store
                    .mark_error(&bad.id, "unreadable", &why)
                    .await
                {
                    tracing::error!(vm = %bad.id, error = %e, "cannot mark the VM error");
                }
            }
        }
        for vm in list.vms {
            let (id, name) = (vm.id.clone(), vm.name.clone());
            if let Err(e) = self.recover_one(vm).await {
                let why = format!("hearthd could not recover it at start: {}", e.message());
                tracing::error!(vm = %name, error = %why, "marking the VM error");
                self.mark_failed(&id, &why).await;
            }
        }
        self.clean_imports().await;
        if let Err(e) = self.clean_backups().await {
            tracing::error!(error = %e, "cannot clean up unfinished backups and restores");
        }
        if let Err(e) = self.clean_volumes().await {
            tracing::error!(error = %e, "cannot clean up unfinished volume creates and deletes");
        }
        self.reconcile_network().await;
        Ok(())
    }

    /// Network slots and rules follow the VMs as recovery left them: slots of VMs that do not
    /// run go, running VMs get theirs (and their DNS and metadata services) back.
    async fn reconcile_network(&self) {
        let Some(net) = &self.inner.network else {
            return;
        };
        let running: Vec<VmRecord> = match self.inner.store.list_vms().await {
            Ok(list) => list
                .vms
                .into_iter()
                .filter(|vm| lock(&self.inner.runtimes).contains_key(&vm.id))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot list VMs to reconcile the network");
                return;
            }
        };
        if let Err(e) = net.reconcile(&running).await {
            tracing::error!(error = %VmError::Net(e).message(), "cannot reconcile the VMs' network");
        }
    }

    pub(super) async fn recover_one(&self, vm: VmRecord) -> Result<(), VmError> {
        match vm.state {
            VmState::Creating | VmState::Deleting => {
                tracing::info!(vm = %vm.name, state = %vm.state, "removing VM whose create or delete was interrupted");
                self.purge(&vm).await;
                Ok(())
            }
            VmState::Stopped | VmState::Error => {
                // Nothing may run on its disk: a VMM left over from a lost run is ended.
                let spec = self.launch_spec(&vm, None);
                if let Some(pid) = self.inner.vmm.find(&spec) {
                    tracing::warn!(vm = %vm.name, pid, "a VMM runs for a VM recorded as {}; ending it", vm.state);
                    if let Some(handle) = self.inner.vmm.adopt(&spec, pid).await? {
                        self.teardown(&vm.id, Some(&Arc::from(handle))).await;
                    }
                }
                Ok(())
            }
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping => {
                self.readopt(vm).await
            }
        }
    }

    /// Records that hearthd gave up on VM `id`, ending whatever of its run is left.
    pub(super) async fn mark_failed(&self, id: &str, why: &str) {
        let runtime = lock(&self.inner.runtimes).remove(id);
        self.teardown(id, runtime.as_ref().map(|rt| &rt.handle))
            .await;
        let marked = match self.record(id).await {
            Ok(vm) => self
                .transition(&vm, Input::Failed, Some(why), Some(None), Some(Some(why)))
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = marked {
            tracing::error!(vm = id, error = %e.message(), "cannot mark the VM error");
        }
    }

    pub(super) async fn readopt(&self, vm: VmRecord) -> Result<(), VmError> {
        let image = self.image().ok();
        let spec = self.launch_spec(&vm, image.as_ref());
        // The recorded pid, or, when it was lost (hearthd died between the launch and recording
        // it) or names another process, the VMM found by its run directory: two VMMs must never
        // open one disk.
        let mut adopted = None;
        for pid in [vm.pid, self.inner.vmm.find(&spec)].into_iter().flatten() {
            match self.inner.vmm.adopt(&spec, pid).await {
                Ok(Some(handle)) => {
                    adopted = Some(Arc::<dyn VmHandle>::from(handle));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(vm = %vm.name, pid, error = %VmError::Vmm(e).message(), "cannot re-attach to the VMM");
                }
            }
        }
        let Some(handle) = adopted else {
            tracing::info!(vm = %vm.name, "VMM is gone; marking the VM stopped");
            let msg = "the VMM process was gone when hearthd started";
            self.teardown(&vm.id, None).await;
            self.transition(&vm, Input::Exited, Some(msg), Some(None), None)
                .await?;
            return Ok(());
        };
        // The pid is recorded again: it may have been found by the run directory.
        self.inner
            .store
            .set_pid(
                &vm.id,
                handle.pid(),
                "readopted",
                &format!("VMM pid {} re-attached after hearthd restart", handle.pid()),
            )
            .await?;
        match vm.state {
            VmState::Stopping => {
                // The stop was interrupted: finish it.
                self.teardown(&vm.id, Some(&handle)).await;
                self.transition(
                    &vm,
                    Input::Halted,
                    Some("stop finished after hearthd restart"),
                    Some(None),
                    None,
                )
                .await?;
            }
            VmState::Starting => {
                // The boot was interrupted: wait for the guest again, holding the VM's lock so
                // user requests queue behind it.
                let service = self.clone();
                tokio::spawn(async move {
                    let lock = service.vm_lock(&vm.id);
                    let _guard = lock.lock().await;
                    let started = Instant::now();
                    service.cap_logs_while_running(&vm, handle.clone());
                    let result = service.await_guest(&spec, handle).await;
                    if let Err(e) = service.finish_boot(vm, started, result).await {
                        tracing::warn!(error = %e.message(), "cannot finish an interrupted boot");
                    }
                });
            }
            _ => {
                let guest = match GuestClient::connect(&spec.agent_socket(), Duration::from_secs(2))
                    .await
                {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(vm = %vm.name, error = %e, "cannot reach the guest agent; ending the VMM");
                        self.teardown(&vm.id, Some(&handle)).await;
                        self.transition(
                            &vm,
                            Input::Exited,
                            Some("guest agent unreachable after hearthd restart"),
                            Some(None),
                            None,
                        )
                        .await?;
                        return Ok(());
                    }
                };
                self.cap_logs_while_running(&vm, handle.clone());
                let runtime = Arc::new(Runtime::new(handle, guest, vm.name.clone()));
                // Held from here on, so a recovery that fails below ends this VMM.
                lock(&self.inner.runtimes).insert(vm.id.clone(), runtime.clone());
                // The record follows what the VMM says, never the other way round: a paused
                // guest stays paused (only a user resumes it), and a pause or resume whose
                // record a crash lost is recorded now.
                let vm = match (vm.state, runtime.handle.run_state().await) {
                    (VmState::Paused, Ok(GuestRun::Paused)) => {
                        runtime.set_paused(true);
                        vm
                    }
                    (VmState::Running, Ok(GuestRun::Paused)) => {
                        runtime.set_paused(true);
                        let msg = "the VMM reports the guest paused after hearthd restart";
                        self.transition(&vm, Input::Pause, Some(msg), None, None)
                            .await?
                    }
                    (VmState::Paused, Ok(GuestRun::Running)) => {
                        let msg = "the VMM reports the guest running after hearthd restart";
                        self.transition(&vm, Input::Resume, Some(msg), None, None)
                            .await?
                    }
                    (state, found) => {
                        if let Ok(GuestRun::Other(what)) = &found {
                            tracing::warn!(vm = %vm.name, %what, "the VMM reports an unexpected run state; keeping the VM {state}");
                        }
                        if let Err(e) = found {
                            tracing::warn!(vm = %vm.name, error = %VmError::Vmm(e).message(), "cannot ask the VMM whether the guest runs; keeping the VM {state}");
                        }
                        // Commands wait for a resume in any case while it is recorded paused.
                        runtime.set_paused(state == VmState::Paused);
                        vm
                    }
                };
                self.monitor(vm, runtime);
            }
        }
        Ok(())
    }
}

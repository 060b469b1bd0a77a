//! Running VMs: their VMM handle and agent connection, and the monitor that notices a VMM
//! exiting on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hearth_api::VmState;

use super::logs::{LogSource, cap_log};
use super::state::Input;
use super::{VmError, VmService, lock};
use crate::guest::{GuestClient, GuestError};
use crate::store::VmRecord;
use crate::vmm::VmHandle;

/// How often the logs of a running VM are checked against their cap.
const LOG_CAP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) struct Runtime {
    pub(super) handle: Arc<dyn VmHandle>,
    pub(super) guest: Arc<GuestClient>,
    /// The VM's name, so commands find their VM's agent without a store lookup.
    pub(super) name: String,
    /// Its guest is paused (or being paused): set and cleared under the VM's lock by pause,
    /// resume, stop and recovery, so commands are refused without a store lookup.
    pub(super) paused: AtomicBool,
}

impl Runtime {
    pub(super) fn new(handle: Arc<dyn VmHandle>, guest: Arc<GuestClient>, name: String) -> Runtime {
        Runtime {
            handle,
            guest,
            name,
            paused: AtomicBool::new(false),
        }
    }

    pub(super) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub(super) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

impl VmService {
    /// Keeps a VM's logs under `guest.log_max_bytes` for as long as its VMM runs, from the
    /// moment it is launched (a guest that floods its console while booting is capped too).
    pub(super) fn cap_logs_while_running(&self, vm: &VmRecord, handle: Arc<dyn VmHandle>) {
        let logs = [
            self.log_path(vm, LogSource::Serial),
            self.log_path(vm, LogSource::Vmm),
        ];
        let max = self.inner.config.guest.log_max_bytes;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOG_CAP_INTERVAL);
            loop {
                tokio::select! {
                    () = handle.wait_exit() => return,
                    _ = tick.tick() => {
                        for log in &logs {
                            cap_log(log, max);
                        }
                    }
                }
            }
        });
    }

    /// Watches a running VM's VMM and records when it exits on its own.
    pub(super) fn monitor(&self, vm: VmRecord, runtime: Arc<Runtime>) {
        let service = self.clone();
        tokio::spawn(async move {
            runtime.handle.wait_exit().await;
            let current = {
                let mut runtimes = lock(&service.inner.runtimes);
                match runtimes.get(&vm.id) {
                    Some(r) if Arc::ptr_eq(r, &runtime) => runtimes.remove(&vm.id),
                    _ => None,
                }
            };
            if current.is_none() {
                return; // a stop or delete took over
            }
            // Under the VM's lock no start can slip in between the cleanup and the transition,
            // so the files removed are this run's, and `stopped` is shown only once they are
            // gone. (A stop holding the lock took the runtime first and returned above.)
            let lock = service.vm_lock(&vm.id);
            let _guard = lock.lock().await;
            let Ok(now) = service.record(&vm.id).await else {
                return;
            };
            // A paused VM whose VMM died ends as a running one does.
            if !matches!(now.state, VmState::Running | VmState::Paused) {
                return;
            }
            service.teardown(&vm.id, None).await;
            let msg = "the VMM process exited (guest powered off or crashed)";
            if let Err(e) = service
                .transition(&now, Input::Exited, Some(msg), Some(None), None)
                .await
            {
                tracing::warn!(vm = %vm.name, error = %e.message(), "cannot record exit");
            }
        });
    }

    /// The agent connection of a running VM, and the VM's name. A running VM is found among the
    /// runtimes (by name, then id: a name wins over an id that looks the same) without asking
    /// the store, which is only asked to explain why a VM is not running.
    pub(super) async fn guest(
        &self,
        name: &str,
        what: &'static str,
    ) -> Result<(String, Arc<GuestClient>), VmError> {
        let by_name = lock(&self.inner.runtimes)
            .values()
            .find(|rt| rt.name == name)
            .cloned();
        let rt = match by_name {
            Some(rt) => rt,
            None => {
                // An id, or a VM that does not run: the store says which, and why.
                let vm = self.record(name).await?;
                let runtime = lock(&self.inner.runtimes).get(&vm.id).cloned();
                match (vm.state, runtime) {
                    (VmState::Running, Some(rt)) => rt,
                    // Running, but its agent connection is not (or no longer) there.
                    (VmState::Running, None) => {
                        return Err(VmError::Guest {
                            name: vm.name,
                            source: GuestError::Disconnected,
                        });
                    }
                    (state, _) => {
                        return Err(VmError::NotRunning {
                            name: vm.name,
                            state,
                            what,
                        });
                    }
                }
            }
        };
        if rt.is_paused() {
            return Err(VmError::NotRunning {
                name: rt.name.clone(),
                state: hearth_api::VmState::Paused,
                what,
            });
        }
        // After a hearthd restart the agent may not have answered hello yet.
        rt.guest
            .wait_ready(Duration::from_secs(10))
            .await
            .map_err(|source| VmError::Guest {
                name: rt.name.clone(),
                source,
            })?;
        Ok((rt.name.clone(), rt.guest.clone()))
    }
}

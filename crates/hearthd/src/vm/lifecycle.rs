//! Create, start, stop, restart, pause, resume and delete: the work that moves a VM through its
//! states, and the one teardown of a run's resources.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_api::{CreateVmRequest, Size, Vm, VmDetail, VmState};
use hearth_guest_proto::ShutdownAction;

use super::logs::{LogSource, rotate_log, tail_lines};
use super::running::Runtime;
use super::state::{self, Input};
use super::{Caller, VmError, VmService, lock, random_id};
use crate::capacity::Demand;
use crate::disk::{self, DiskError};
use crate::guest::{GuestClient, GuestError};
use crate::image::Image;
use crate::net::Network;
use crate::rules;
use crate::store::{StoreError, VmRecord};
use crate::vmm::{LaunchSpec, VmHandle};
use hearth_helper::proto;

/// How long after a create the spare it took is made again: the copy takes a core for a moment,
/// and a new VM's first seconds (its first exec, what the guest does after boot) should not
/// share the machine with it.
const SPARE_REFILL_DELAY: Duration = Duration::from_secs(2);

impl VmService {
    pub(super) async fn create(
        &self,
        caller: &Caller,
        req: CreateVmRequest,
    ) -> Result<VmDetail, VmError> {
        let defaults = &self.inner.config.guest;
        rules::validate_name(&req.name)?;
        let cpus = req.cpus.unwrap_or(defaults.cpus);
        rules::validate_cpus(cpus)?;
        let memory_mib = match &req.ram {
            Some(size) => rules::validate_ram(size)?,
            None => defaults.memory_mib,
        };
        let image = self.image()?;
        let rootfs_mib = rules::validate_rootfs(
            req.rootfs_size
                .as_ref()
                .unwrap_or(&Size::Mib(defaults.rootfs_mib)),
            image.rootfs_mib,
        )?;
        let (egress, metadata) = self.validate_net_request(&req)?;
        let volumes = Self::validate_volumes(&req.volumes)?;
        let now = crate::store::now();
        let record = VmRecord {
            id: random_id(),
            name: req.name.clone(),
            state: VmState::Creating,
            cpus,
            memory_mib,
            rootfs_mib,
            image: image.id.clone(),
            vmm: self.inner.vmm.kind().into(),
            pid: None,
            created_at: now.clone(),
            created_by: caller.principal.to_string(),
            org: caller.owning_org()?,
            updated_at: now,
            last_error: None,
            net_index: None,
            egress,
            metadata,
        };
        let start = req.start.unwrap_or(true);
        let record = {
            // Refused before anything is made; the disk counts from the insert on.
            let _admission = self.inner.admission.lock().await;
            let demand = Demand {
                cpus: u64::from(cpus),
                memory_mib,
                disk_mib: rootfs_mib,
                run: start,
            };
            if let Err(e) = self.admit(demand).await {
                // A taken name is the better answer.
                if self.inner.store.get_vm(&req.name).await.is_ok() {
                    return Err(VmError::NameTaken(req.name));
                }
                return Err(e);
            }
            let slots = self.inner.network.as_ref().map(Network::subnets);
            // The volumes are checked (and formatted) and attached in the VM's insert: a
            // create refused from here on leaves them unattached.
            let _volumes = self.inner.volumes.lock().await;
            self.prepare_volumes(&volumes).await?;
            match self
                .inner
                .store
                .insert_vm_with(&record, slots, &req.networks, &volumes)
                .await
            {
                Err(StoreError::NameTaken(n)) => return Err(VmError::NameTaken(n)),
                other => other?,
            }
        };
        let lock = self.vm_lock(&record.id);
        let _guard = lock.lock().await;
        let mut took_spare = false;
        let prepared = match self.prepare_disk(&record, &image).await {
            Ok(took) => {
                took_spare = took;
                self.transition(&record, Input::Created, None, None, None)
                    .await
            }
            Err(e) => Err(e),
        };
        // The spare is made again only after this create is over: copying the image while the
        // guest boots would take CPU and disk from the boot (a third of it, on two cores).
        let record = match prepared {
            Ok(r) => r,
            Err(e) => {
                self.purge(&record).await;
                self.refill_if(took_spare);
                return Err(e);
            }
        };
        if start && let Err(e) = self.start_locked(record.clone()).await {
            // A create that fails leaves nothing behind.
            self.purge(&record).await;
            self.refill_if(took_spare);
            return Err(e);
        }
        drop(_guard);
        self.refill_if(took_spare);
        self.detail(&record.id).await
    }

    /// Makes a new spare, `SPARE_REFILL_DELAY` after a create that took one.
    fn refill_if(&self, took_spare: bool) {
        if took_spare {
            let service = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SPARE_REFILL_DELAY).await;
                service.refill_spare();
            });
        }
    }

    /// Gives `vm` its root disk: the spare when it fits (true), else a copy of the image.
    pub(super) async fn prepare_disk(&self, vm: &VmRecord, image: &Image) -> Result<bool, VmError> {
        let dir = self.vm_dir(&vm.id);
        let taken = tokio::fs::create_dir_all(&dir).await.is_ok()
            && self
                .inner
                .spares
                .take(&image.id, vm.rootfs_mib, &dir.join("rootfs.ext4"));
        if taken {
            return Ok(true);
        }
        let (src, mib) = (image.rootfs(), vm.rootfs_mib);
        let disk_err = |source| VmError::Disk {
            name: vm.name.clone(),
            source,
        };
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|source| DiskError::Copy {
                from: src.display().to_string(),
                to: dir.display().to_string(),
                source,
            })?;
            let dst = dir.join("rootfs.ext4");
            disk::clone_file(&src, &dst)?;
            disk::grow_ext4(&dst, mib)
        })
        .await
        .map_err(|e| VmError::Task(format!("disk preparation: {e}")))?
        .map_err(disk_err)?;
        Ok(false)
    }

    /// Removes everything of a VM: its run, files and record.
    pub(super) async fn purge(&self, vm: &VmRecord) {
        let runtime = lock(&self.inner.runtimes).remove(&vm.id);
        self.teardown(&vm.id, runtime.as_ref().map(|rt| &rt.handle))
            .await;
        let _ = tokio::fs::remove_dir_all(self.vm_dir(&vm.id)).await;
        if let Err(e) = self.inner.store.delete_vm(&vm.id).await {
            tracing::error!(vm = %vm.name, error = %e, "cannot remove VM record");
        }
        // After the record (its backup rows go with it): a crash between leaves backups of a
        // VM that is gone, which the next start removes.
        self.remove_backups(&vm.id).await;
        lock(&self.inner.locks).remove(&vm.id);
        self.signal_gone(&vm.id);
    }

    /// Ends a run of VM `id`: its VMM, when one is given and still runs, then its sockets and
    /// other per-run files. Every path that stops, fails or loses a run releases it here, so
    /// whatever a run holds (networking adds its slot) is released in one place. Never fails:
    /// a VMM that cannot be ended is logged, and the VM is not left half-stopped.
    pub(super) async fn teardown(&self, id: &str, vmm: Option<&Arc<dyn VmHandle>>) {
        if let Some(handle) = vmm
            && let Err(e) = handle.kill().await
        {
            tracing::error!(vm = id, pid = handle.pid(), error = %VmError::Vmm(e).message(), "cannot end the VMM");
        }
        let _ = tokio::fs::remove_dir_all(self.run_dir(id)).await;
        if let Some(net) = &self.inner.network {
            net.release(id).await;
        }
    }

    /// What the VMM needs to run `vm`. Without an image (re-adopting a running VM whose image is
    /// gone) the kernel paths are empty: adoption only uses the VM's own paths.
    pub(super) fn launch_spec(&self, vm: &VmRecord, image: Option<&Image>) -> LaunchSpec {
        let dir = self.vm_dir(&vm.id);
        LaunchSpec {
            id: vm.id.clone(),
            name: vm.name.clone(),
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            kernel: image.map(Image::kernel).unwrap_or_default(),
            initrd: image.map(Image::initrd).unwrap_or_default(),
            cmdline: if self.networked(vm) {
                format!(
                    "hearth.hostname={} hearth.ip={}/{} hearth.gw={} hearth.dns={}",
                    vm.name,
                    proto::GUEST_ADDR,
                    proto::INNER_PREFIX,
                    proto::GATEWAY_ADDR,
                    proto::GATEWAY_ADDR
                )
            } else {
                format!("hearth.hostname={}", vm.name)
            },
            rootfs: dir.join("rootfs.ext4"),
            run_dir: self.run_dir(&vm.id),
            serial_log: dir.join("serial.log"),
            vmm_log: dir.join("vmm.log"),
            tap: None,
            volumes: Vec::new(),
        }
    }

    /// True when `vm` gets a network slot when it runs.
    fn networked(&self, vm: &VmRecord) -> bool {
        self.inner.network.is_some() && vm.net_index.is_some()
    }

    pub(super) async fn start(&self, name: &str) -> Result<Vm, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = self.record(&vm.id).await?;
        self.start_locked(vm).await.map(Into::into)
    }

    pub(super) async fn start_locked(&self, vm: VmRecord) -> Result<VmRecord, VmError> {
        let vm = {
            let _admission = self.inner.admission.lock().await;
            // The state is checked first: starting a running VM is "already running", not
            // "not enough memory".
            state::next(vm.state, Input::Start).map_err(|reason| VmError::NotAllowed {
                name: vm.name.clone(),
                reason,
            })?;
            let demand = Demand {
                cpus: u64::from(vm.cpus),
                memory_mib: vm.memory_mib,
                disk_mib: 0,
                run: true,
            };
            self.admit(demand).await?;
            self.transition(&vm, Input::Start, None, None, None).await?
        };
        let started = Instant::now();
        let result = self.boot(&vm).await;
        self.finish_boot(vm, started, result).await
    }

    /// Records the outcome of a boot of `vm` (in `starting`): running with a monitor, or error
    /// with `last_error` and nothing left running.
    pub(super) async fn finish_boot(
        &self,
        vm: VmRecord,
        started: Instant,
        result: Result<(Arc<Runtime>, String), String>,
    ) -> Result<VmRecord, VmError> {
        match result {
            Ok((runtime, boot_id)) => {
                let pid = runtime.handle.pid();
                let message = format!(
                    "guest agent ready in {} ms (pid {pid}, boot {boot_id})",
                    started.elapsed().as_millis()
                );
                lock(&self.inner.runtimes).insert(vm.id.clone(), runtime.clone());
                let booted = self
                    .transition(
                        &vm,
                        Input::Booted,
                        Some(&message),
                        Some(Some(pid)),
                        Some(None),
                    )
                    .await;
                match booted {
                    Ok(vm) => {
                        self.monitor(vm.clone(), runtime);
                        Ok(vm)
                    }
                    Err(e) => {
                        lock(&self.inner.runtimes).remove(&vm.id);
                        self.teardown(&vm.id, Some(&runtime.handle)).await;
                        Err(e)
                    }
                }
            }
            Err(reason) => {
                let serial = self.log_path(&vm, LogSource::Serial);
                let tail = tail_lines(&serial, 3);
                let reason = if tail.is_empty() {
                    reason
                } else {
                    format!("{reason}; serial console ends with: {tail}")
                };
                self.teardown(&vm.id, None).await;
                self.transition(
                    &vm,
                    Input::BootFailed,
                    Some(&reason),
                    Some(None),
                    Some(Some(&reason)),
                )
                .await?;
                Err(VmError::StartFailed {
                    name: vm.name.clone(),
                    reason,
                })
            }
        }
    }

    /// Launches the VMM and waits for the agent. On failure nothing is left running.
    pub(super) async fn boot(&self, vm: &VmRecord) -> Result<(Arc<Runtime>, String), String> {
        // Always the current image, whatever image the disk came from: the agent travels in
        // the initramfs, so this is how every VM runs the current agent (and the kernel matches
        // the modules in that initramfs; nothing at boot uses the disk's).
        let image = self.image().map_err(|e| e.message())?;
        let mut spec = self.launch_spec(vm, Some(&image));
        let (volumes, words) = self.volume_disks(&vm.id).await.map_err(|e| e.message())?;
        spec.volumes = volumes;
        spec.cmdline.push_str(&words);
        let mut network_ms = None;
        if let Some(net) = self.inner.network.as_ref().filter(|_| self.networked(vm)) {
            let started = Instant::now();
            let tap = net
                .attach(vm)
                .await
                .map_err(|e| VmError::Net(e).message())?;
            network_ms = Some(started.elapsed().as_millis());
            spec.tap = Some(Arc::new(tap));
        }
        rotate_log(&spec.serial_log, self.inner.config.guest.log_max_bytes);
        rotate_log(&spec.vmm_log, self.inner.config.guest.log_max_bytes);
        let launched = self.inner.vmm.launch(&spec).await;
        // The VMM holds the TAP now (or failed): hearthd's descriptor goes, so the TAP lives
        // exactly as long as the VMM.
        spec.tap = None;
        let handle: Arc<dyn VmHandle> = match launched {
            Ok(h) => Arc::from(h),
            // `finish_boot` tears the run down, the slot with it.
            Err(e) => return Err(VmError::Vmm(e).message()),
        };
        self.cap_logs_while_running(vm, handle.clone());
        // The pid is part of the boot: a VMM hearthd could not record is ended (a restarted
        // hearthd also finds VMMs by their run directory, for a crash in between).
        let launched = match network_ms {
            Some(ms) => format!(
                "network slot ready in {ms} ms; VMM pid {} launched",
                handle.pid()
            ),
            None => format!("VMM pid {} launched", handle.pid()),
        };
        if let Err(e) = self
            .inner
            .store
            .set_pid(&vm.id, handle.pid(), "vmm_launched", &launched)
            .await
        {
            self.teardown(&vm.id, Some(&handle)).await;
            return Err(format!("cannot record the VMM's pid: {e}"));
        }
        self.await_guest(&spec, handle).await
    }

    /// Waits for the agent of a launched VMM; on failure ends the VMM.
    pub(super) async fn await_guest(
        &self,
        spec: &LaunchSpec,
        handle: Arc<dyn VmHandle>,
    ) -> Result<(Arc<Runtime>, String), String> {
        let timeout = self.inner.config.guest.ready_timeout;
        let ready = async {
            let guest = GuestClient::connect(&spec.agent_socket(), Duration::from_secs(10)).await?;
            let boot_id = guest.wait_ready(timeout).await?;
            Ok::<_, GuestError>((guest, boot_id))
        };
        let result = tokio::select! {
            r = ready => r.map_err(|e| e.to_string()),
            () = handle.wait_exit() => Err("the VMM exited while the guest was booting".to_owned()),
        };
        match result {
            Ok((guest, boot_id)) => {
                let name = spec.name.clone();
                Ok((Arc::new(Runtime::new(handle, guest, name)), boot_id))
            }
            Err(e) => {
                self.teardown(&spec.id, Some(&handle)).await;
                Err(e)
            }
        }
    }

    pub(super) async fn stop(&self, name: &str, timeout: Option<Duration>) -> Result<Vm, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = self.record(&vm.id).await?;
        self.stop_locked(vm, timeout).await.map(Into::into)
    }

    pub(super) async fn stop_locked(
        &self,
        vm: VmRecord,
        timeout: Option<Duration>,
    ) -> Result<VmRecord, VmError> {
        let was_paused = vm.state == VmState::Paused;
        let vm = self.transition(&vm, Input::Stop, None, None, None).await?;
        let runtime = lock(&self.inner.runtimes).remove(&vm.id);
        let timeout = timeout.unwrap_or(self.inner.config.guest.stop_timeout);
        let mut how = "no VMM process was running".to_owned();
        if let Some(rt) = runtime {
            // A paused guest cannot power off: it runs again first, so the stop is as clean
            // as from running. A VMM that cannot resume it is ended by force.
            let resumed = if was_paused {
                match rt.handle.resume().await {
                    Ok(()) => {
                        rt.set_paused(false);
                        true
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm.name, error = %VmError::Vmm(e).message(), "cannot resume the paused VM to stop it cleanly");
                        false
                    }
                }
            } else {
                true
            };
            let asked = resumed
                && if rt.guest.is_ready() {
                    rt.guest.shutdown(ShutdownAction::Poweroff).await.is_ok()
                } else {
                    rt.handle.request_poweroff().await.is_ok()
                };
            let clean = asked
                && tokio::time::timeout(timeout, rt.handle.wait_exit())
                    .await
                    .is_ok();
            how = match (clean, resumed) {
                (true, _) => "guest powered off".into(),
                (false, true) => format!(
                    "guest did not power off within {} s; VMM ended by force",
                    timeout.as_secs()
                ),
                (false, false) => {
                    "the paused guest could not be resumed; VMM ended by force".into()
                }
            };
            if was_paused && resumed {
                how = format!("resumed from pause, then {how}");
            }
            self.teardown(&vm.id, Some(&rt.handle)).await;
        } else {
            self.teardown(&vm.id, None).await;
        }
        self.transition(&vm, Input::Halted, Some(&how), Some(None), None)
            .await
    }

    /// Stops a running VM's vCPUs; it keeps its RAM, vCPUs, disk and network slot.
    pub(super) async fn pause(&self, name: &str) -> Result<Vm, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = self.record(&vm.id).await?;
        state::next(vm.state, Input::Pause).map_err(|reason| VmError::NotAllowed {
            name: vm.name.clone(),
            reason,
        })?;
        let rt = self.controllable(&vm)?;
        // Set first: no command starts against a guest that is being paused.
        rt.set_paused(true);
        if let Err(e) = rt.handle.pause().await {
            // Whatever the VMM did, the guest is let run on as recorded.
            let _ = rt.handle.resume().await;
            rt.set_paused(false);
            return Err(e.into());
        }
        let message = "vCPUs stopped; the VMM reports the guest paused";
        match self
            .transition(&vm, Input::Pause, Some(message), None, None)
            .await
        {
            Ok(vm) => Ok(vm.into()),
            Err(e) => {
                // Not recorded: the VM runs on, as the record says.
                let _ = rt.handle.resume().await;
                rt.set_paused(false);
                Err(e)
            }
        }
    }

    /// Lets a paused VM's vCPUs run again.
    pub(super) async fn resume(&self, name: &str) -> Result<Vm, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = self.record(&vm.id).await?;
        state::next(vm.state, Input::Resume).map_err(|reason| VmError::NotAllowed {
            name: vm.name.clone(),
            reason,
        })?;
        let rt = self.controllable(&vm)?;
        rt.handle.resume().await?;
        let message = "vCPUs run again; the VMM reports the guest running";
        match self
            .transition(&vm, Input::Resume, Some(message), None, None)
            .await
        {
            Ok(vm) => {
                rt.set_paused(false);
                Ok(vm.into())
            }
            Err(e) => {
                // Not recorded: the VM stays paused, as the record says.
                let _ = rt.handle.pause().await;
                Err(e)
            }
        }
    }

    /// The run of `vm` (running or paused) when its VMM can pause and resume it.
    fn controllable(&self, vm: &VmRecord) -> Result<Arc<Runtime>, VmError> {
        if !self.inner.vmm.capabilities().pause {
            return Err(VmError::Vmm(crate::vmm::VmmError::Unavailable(format!(
                "the {} VMM cannot pause and resume VMs",
                self.inner.vmm.kind()
            ))));
        }
        lock(&self.inner.runtimes)
            .get(&vm.id)
            .cloned()
            .ok_or_else(|| {
                VmError::Vmm(crate::vmm::VmmError::Unavailable(format!(
                    "the VMM of VM {:?} has exited; it is being marked stopped",
                    vm.name
                )))
            })
    }

    pub(super) async fn restart(&self, name: &str) -> Result<Vm, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let mut vm = self.record(&vm.id).await?;
        if matches!(vm.state, VmState::Running | VmState::Paused) {
            vm = self.stop_locked(vm, None).await?;
        }
        self.start_locked(vm).await.map(Into::into)
    }

    pub(super) async fn delete(&self, name: &str) -> Result<(), VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let guard = lock.lock().await;
        let mut vm = self.record(&vm.id).await?;
        if matches!(vm.state, VmState::Running | VmState::Paused) {
            vm = self.stop_locked(vm, None).await?;
        }
        self.transition(&vm, Input::Delete, None, None, None)
            .await?;
        drop(guard);
        self.purge(&vm).await;
        Ok(())
    }
}

/// Runs `work` to completion in its own task, whatever happens to the caller.
pub(super) async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, VmError>> + Send + 'static,
) -> Result<T, VmError> {
    tokio::spawn(work)
        .await
        .map_err(|e| VmError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use tokio::sync::watch;

    use super::*;
    use crate::testing;
    use crate::vm::ImageState;
    use crate::vmm::double::NoBootVmm;

    /// A VMM whose launch takes a while and then fails, noting what the spare directory held
    /// meanwhile.
    fn entries(dir: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_spare_is_refilled_after_the_boot_not_during_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = testing::config(&data);
        let mib = config.guest.rootfs_mib;
        let image = testing::image(&data, mib);
        let spare_dir = data.join("spare");
        let spare = spare_dir.join(format!("testimage-{mib}.ext4"));
        // What the spare directory holds while the guest would boot.
        let seen: Arc<Mutex<Option<Vec<PathBuf>>>> = Arc::default();
        let vmm = {
            let (seen, spare_dir) = (seen.clone(), spare_dir.clone());
            Arc::new(NoBootVmm {
                // Long enough for a refill started with the create to have made its file.
                delay: Duration::from_millis(500),
                on_launch: Some(Box::new(move || {
                    *seen.lock().unwrap() = Some(entries(&spare_dir));
                })),
            })
        };
        let store = crate::store::Store::open(&config.database_url)
            .await
            .unwrap();
        let (_tx, rx) = watch::channel(ImageState::Ready(image));
        let service = VmService::new(Arc::new(config), store, vmm, rx);
        service.refill_spare();
        wait_for("the first spare", || spare.exists()).await;

        let req = CreateVmRequest {
            name: "a".into(),
            ..Default::default()
        };
        let err = service.create(&Caller::system(), req).await.unwrap_err();
        assert!(matches!(err, VmError::StartFailed { .. }), "{err:?}");
        let seen = seen.lock().unwrap().clone().expect("the VMM was launched");
        assert!(
            seen.is_empty(),
            "the create took the spare and nothing refilled it during the boot: {seen:?}"
        );
        // Not right after the create either: its first moments are the VM's.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let early = entries(&spare_dir);
        assert!(
            early.is_empty(),
            "refilled right after the create: {early:?}"
        );
        // Then the spare comes back.
        wait_for("the spare to be refilled", || spare.exists()).await;
    }
}

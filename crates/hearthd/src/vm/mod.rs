//! VM lifecycle: every front end turns its input into an [`Action`] and hands it to
//! [`VmService::handle`]; streaming operations (exec sessions, files, logs) go through the typed
//! methods below. Only this module changes VM state, and only through [`state::next`] and
//! `Store::transition`.

pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hearth_api::{
    CreateVmRequest, ErrorCode, ExecRequest, ExecResponse, Health, Size, Vm, VmDetail, VmState,
};
use hearth_guest_proto::ShutdownAction;
use tokio::sync::watch;

use crate::config::Config;
use crate::disk::{self, DiskError};
use crate::guest::{ExecEvent, ExecSpec, GuestClient, GuestError};
use crate::image::Image;
use crate::rules::{self, RuleError};
use crate::store::{Store, StoreError, Transition, VmRecord};
use crate::vmm::{LaunchSpec, VmHandle, Vmm, VmmError};
use state::{Input, NotAllowed};

/// Largest stdout or stderr a request/response exec collects; the streaming endpoints have no
/// such limit.
pub const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

/// Errors of VM operations. [`VmError::code`] is the one place they become API codes.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("no VM named {0:?}")]
    NotFound(String),
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    #[error("cannot {verb} VM {name:?}: {reason}", verb = reason.input.verb())]
    NotAllowed { name: String, reason: NotAllowed },
    #[error("VM {name:?} is {state}: {what} needs it running")]
    NotRunning {
        name: String,
        state: VmState,
        what: &'static str,
    },
    #[error("the guest image is not ready: {0}")]
    ImageUnavailable(String),
    #[error("VM {name:?} did not start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error("cannot prepare the disk of VM {name:?}")]
    Disk {
        name: String,
        #[source]
        source: DiskError,
    },
    #[error("VMM failure")]
    Vmm(#[from] VmmError),
    #[error("guest of VM {name:?}: {source}")]
    Guest {
        name: String,
        #[source]
        source: GuestError,
    },
    #[error("file {path:?} in VM {name:?}: {source}")]
    GuestFile {
        name: String,
        path: String,
        #[source]
        source: GuestError,
    },
    #[error("program {program:?} cannot run in VM {name:?}: {message}")]
    BadCommand {
        name: String,
        program: String,
        code: hearth_guest_proto::ErrorCode,
        message: String,
    },
    #[error("cannot read the {source_name} log of VM {name:?}")]
    Log {
        name: String,
        source_name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state store failure")]
    Store(#[from] StoreError),
    #[error("an internal task failed: {0}")]
    Task(String),
}

impl VmError {
    /// The stable code of this error; the HTTP status and exit code follow from it.
    pub fn code(&self) -> ErrorCode {
        use hearth_guest_proto::ErrorCode as G;
        match self {
            VmError::Rule(r) => r.code,
            VmError::BadRequest(_) => ErrorCode::InvalidRequest,
            VmError::NotFound(_) | VmError::Store(StoreError::NotFound(_)) => ErrorCode::VmNotFound,
            VmError::NameTaken(_) | VmError::Store(StoreError::NameTaken(_)) => {
                ErrorCode::VmNameTaken
            }
            VmError::NotAllowed { .. } | VmError::NotRunning { .. } => ErrorCode::InvalidState,
            VmError::Store(StoreError::StateChanged { .. }) => ErrorCode::VmBusy,
            VmError::ImageUnavailable(_) => ErrorCode::ImageUnavailable,
            VmError::StartFailed { .. } | VmError::Vmm(_) => ErrorCode::VmmFailed,
            VmError::Disk { source, .. } => match source {
                DiskError::Copy { source, .. } | DiskError::Grow { source, .. }
                    if source.raw_os_error() == Some(libc::ENOSPC) =>
                {
                    ErrorCode::ResourceExhausted
                }
                _ => ErrorCode::Internal,
            },
            VmError::Guest { source, .. } | VmError::GuestFile { source, .. } => match source {
                GuestError::Disconnected => ErrorCode::GuestUnavailable,
                GuestError::NotReady(_) | GuestError::Timeout => ErrorCode::GuestTimeout,
                GuestError::Agent { code, .. } => match (self, code) {
                    (VmError::GuestFile { .. }, G::NotFound) => ErrorCode::GuestFileNotFound,
                    (VmError::GuestFile { .. }, G::InvalidRequest) => ErrorCode::InvalidPath,
                    _ => ErrorCode::GuestError,
                },
                GuestError::Unexpected(_)
                | GuestError::Protocol { .. }
                | GuestError::Overrun
                | GuestError::AgentRestarted => ErrorCode::GuestError,
                GuestError::Aborted(_) => ErrorCode::InvalidRequest,
            },
            VmError::BadCommand {
                code: G::NotFound, ..
            } => ErrorCode::CommandNotFound,
            VmError::BadCommand { .. } => ErrorCode::InvalidCommand,
            VmError::Log { .. } | VmError::Store(_) | VmError::Task(_) => ErrorCode::Internal,
        }
    }

    /// The message for API clients: this error and its causes, each said once.
    pub fn message(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            source = s.source();
        }
        msg
    }
}

/// Every non-streaming operation of the API and the SSH surface.
#[derive(Debug)]
pub enum Action {
    Health,
    ListVms,
    GetVm(String),
    CreateVm(CreateVmRequest),
    StartVm(String),
    StopVm {
        name: String,
        timeout: Option<Duration>,
    },
    RestartVm(String),
    DeleteVm(String),
    Exec {
        name: String,
        request: ExecRequest,
    },
}

/// The successful result of an [`Action`].
#[derive(Debug)]
pub enum Reply {
    Health(Health),
    Vms(Vec<Vm>),
    Vm(Vm),
    Created(VmDetail),
    VmDetail(VmDetail),
    Deleted,
    Exec(ExecResponse),
}

/// Which log of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    Serial,
    Vmm,
}

/// State of the guest image, shared with the background build.
#[derive(Debug, Clone)]
pub enum ImageState {
    Building(String),
    Ready(Image),
    Failed(String),
}

#[derive(Debug)]
struct Runtime {
    handle: Arc<dyn VmHandle>,
    guest: Arc<GuestClient>,
}

/// Owns VM lifecycles. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VmService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<Config>,
    store: Store,
    vmm: Arc<dyn Vmm>,
    image: watch::Receiver<ImageState>,
    runtimes: Mutex<HashMap<String, Arc<Runtime>>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// True while a spare disk is being prepared.
    refilling: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn random_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !ok {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let low = u64::try_from(nanos & u128::from(u64::MAX)).unwrap_or(0);
        bytes = (low ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl VmService {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        vmm: Arc<dyn Vmm>,
        image: watch::Receiver<ImageState>,
    ) -> VmService {
        VmService {
            inner: Arc::new(Inner {
                config,
                store,
                vmm,
                image,
                runtimes: Mutex::default(),
                locks: Mutex::default(),
                refilling: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Keeps one spare root disk of the default size, made from the current image, ready in
    /// `<data_dir>/spare`: a create that wants exactly that takes it with a rename instead of
    /// copying and growing the image on the request path. Runs in the background.
    pub fn refill_spare(&self) {
        use std::sync::atomic::Ordering;
        let Ok(image) = self.image() else { return };
        if self.inner.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let spare = self.spare_path(&image);
        let dir = self.inner.config.data_dir.join("spare");
        let service = self.clone();
        let mib = self.inner.config.guest.rootfs_mib;
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                std::fs::create_dir_all(&dir).map_err(|source| DiskError::Copy {
                    from: image.rootfs().display().to_string(),
                    to: dir.display().to_string(),
                    source,
                })?;
                // Spares of older images or sizes are of no use any more.
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if e.path() != spare {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
                if spare.exists() {
                    return Ok(());
                }
                let tmp = spare.with_extension("tmp");
                disk::clone_file(&image.rootfs(), &tmp)?;
                disk::grow_ext4(&tmp, mib)?;
                std::fs::rename(&tmp, &spare).map_err(|source| DiskError::Copy {
                    from: tmp.display().to_string(),
                    to: spare.display().to_string(),
                    source,
                })
            })();
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot prepare a spare disk; creates will copy the image");
            }
            service.inner.refilling.store(false, Ordering::Release);
        });
    }

    fn spare_path(&self, image: &Image) -> PathBuf {
        self.inner.config.data_dir.join("spare").join(format!(
            "{}-{}.ext4",
            image.id, self.inner.config.guest.rootfs_mib
        ))
    }

    /// Runs one action.
    pub async fn handle(&self, action: Action) -> Result<Reply, VmError> {
        match action {
            Action::Health => Ok(Reply::Health(self.health())),
            Action::ListVms => Ok(Reply::Vms(self.inner.store.list_vms().await?)),
            Action::GetVm(name) => Ok(Reply::VmDetail(self.detail(&name).await?)),
            // Lifecycle work runs in a task of its own: a client that hangs up or a request
            // timeout stops the waiting, never the work half-way.
            Action::CreateVm(req) => {
                let s = self.clone();
                Ok(Reply::Created(
                    detached(async move { s.create(req).await }).await?,
                ))
            }
            Action::StartVm(name) => {
                let s = self.clone();
                Ok(Reply::Vm(
                    detached(async move { s.start(&name).await }).await?,
                ))
            }
            Action::StopVm { name, timeout } => {
                let s = self.clone();
                Ok(Reply::Vm(
                    detached(async move { s.stop(&name, timeout).await }).await?,
                ))
            }
            Action::RestartVm(name) => {
                let s = self.clone();
                Ok(Reply::Vm(
                    detached(async move { s.restart(&name).await }).await?,
                ))
            }
            Action::DeleteVm(name) => {
                let s = self.clone();
                detached(async move { s.delete(&name).await }).await?;
                Ok(Reply::Deleted)
            }
            Action::Exec { name, request } => Ok(Reply::Exec(self.exec(&name, request).await?)),
        }
    }

    fn health(&self) -> Health {
        let (image, image_status) = match &*self.inner.image.borrow() {
            ImageState::Ready(i) => (Some(i.id.clone()), "ready".to_owned()),
            ImageState::Building(step) => (None, format!("building: {step}")),
            ImageState::Failed(why) => (None, format!("failed: {why}")),
        };
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            vmm: self.inner.vmm.kind().into(),
            accel: self.inner.vmm.accel().into(),
            image,
            image_status,
        }
    }

    async fn detail(&self, name: &str) -> Result<VmDetail, VmError> {
        let vm = self.record(name).await?;
        let events = self.inner.store.events(&vm.id).await?;
        Ok(VmDetail { vm, events })
    }

    pub async fn record(&self, name: &str) -> Result<VmRecord, VmError> {
        match self.inner.store.get_vm(name).await {
            Err(StoreError::NotFound(_)) => Err(VmError::NotFound(name.to_owned())),
            other => Ok(other?),
        }
    }

    fn vm_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.inner.locks)
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.inner.config.data_dir.join("vms").join(id)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.inner.config.data_dir.join("run").join(id)
    }

    /// Removes a VM's sockets and other per-run files; a VM that never ran has none.
    async fn clear_run_dir(&self, id: &str) {
        let _ = tokio::fs::remove_dir_all(self.run_dir(id)).await;
    }

    pub fn log_path(&self, vm: &VmRecord, source: LogSource) -> PathBuf {
        self.vm_dir(&vm.id).join(match source {
            LogSource::Serial => "serial.log",
            LogSource::Vmm => "vmm.log",
        })
    }

    fn image(&self) -> Result<Image, VmError> {
        match &*self.inner.image.borrow() {
            ImageState::Ready(i) => Ok(i.clone()),
            ImageState::Building(step) => Err(VmError::ImageUnavailable(format!(
                "it is being built ({step}); try again when `hearth health` shows an image"
            ))),
            ImageState::Failed(e) => {
                Err(VmError::ImageUnavailable(format!("its build failed: {e}")))
            }
        }
    }

    async fn transition(
        &self,
        vm: &VmRecord,
        input: Input,
        message: Option<&str>,
        pid: Option<Option<u32>>,
        last_error: Option<Option<&str>>,
    ) -> Result<VmRecord, VmError> {
        let to = state::next(vm.state, input).map_err(|reason| VmError::NotAllowed {
            name: vm.name.clone(),
            reason,
        })?;
        let t = Transition {
            from: vm.state,
            to,
            kind: input.event_kind(),
            message,
            pid,
            last_error,
        };
        Ok(self.inner.store.transition(&vm.id, &t).await?)
    }

    async fn create(&self, req: CreateVmRequest) -> Result<VmDetail, VmError> {
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
            updated_at: now,
            last_error: None,
        };
        match self.inner.store.insert_vm(&record).await {
            Err(StoreError::NameTaken(n)) => return Err(VmError::NameTaken(n)),
            other => other?,
        }
        let lock = self.vm_lock(&record.id);
        let _guard = lock.lock().await;
        let prepared = match self.prepare_disk(&record, &image).await {
            Ok(()) => {
                self.transition(&record, Input::Created, None, None, None)
                    .await
            }
            Err(e) => Err(e),
        };
        let record = match prepared {
            Ok(r) => r,
            Err(e) => {
                self.purge(&record).await;
                return Err(e);
            }
        };
        if req.start.unwrap_or(true)
            && let Err(e) = self.start_locked(record.clone()).await
        {
            // A create that fails leaves nothing behind.
            self.purge(&record).await;
            return Err(e);
        }
        drop(_guard);
        self.detail(&record.id).await
    }

    async fn prepare_disk(&self, vm: &VmRecord, image: &Image) -> Result<(), VmError> {
        let dir = self.vm_dir(&vm.id);
        if vm.rootfs_mib == self.inner.config.guest.rootfs_mib {
            let spare = self.spare_path(image);
            let dst = dir.join("rootfs.ext4");
            let taken = tokio::fs::create_dir_all(&dir).await.is_ok()
                && tokio::fs::rename(&spare, &dst).await.is_ok();
            if taken {
                self.refill_spare();
                return Ok(());
            }
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
        .map_err(disk_err)
    }

    /// Removes everything of a VM: files, runtime, record.
    async fn purge(&self, vm: &VmRecord) {
        let runtime = lock(&self.inner.runtimes).remove(&vm.id);
        if let Some(rt) = runtime {
            let _ = rt.handle.kill().await;
        }
        self.clear_run_dir(&vm.id).await;
        let _ = tokio::fs::remove_dir_all(self.vm_dir(&vm.id)).await;
        if let Err(e) = self.inner.store.delete_vm(&vm.id).await {
            tracing::error!(vm = %vm.name, error = %e, "cannot remove VM record");
        }
        lock(&self.inner.locks).remove(&vm.id);
    }

    /// What the VMM needs to run `vm`. Without an image (re-adopting a running VM whose image is
    /// gone) the kernel paths are empty: adoption only uses the VM's own paths.
    fn launch_spec(&self, vm: &VmRecord, image: Option<&Image>) -> LaunchSpec {
        let dir = self.vm_dir(&vm.id);
        LaunchSpec {
            id: vm.id.clone(),
            name: vm.name.clone(),
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            kernel: image.map(Image::kernel).unwrap_or_default(),
            initrd: image.map(Image::initrd).unwrap_or_default(),
            cmdline: format!("hearth.hostname={}", vm.name),
            rootfs: dir.join("rootfs.ext4"),
            run_dir: self.run_dir(&vm.id),
            serial_log: dir.join("serial.log"),
            vmm_log: dir.join("vmm.log"),
        }
    }

    /// The image a VM boots: always the current one, whatever image its disk came from. The
    /// agent travels in the initramfs, so this is how every VM runs the current agent; the
    /// kernel matches the modules in that initramfs, and nothing at boot uses the disk's.
    fn boot_image(&self, _vm: &VmRecord) -> Result<Image, VmError> {
        self.image()
    }

    async fn start(&self, name: &str) -> Result<Vm, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = self.record(&vm.id).await?;
        self.start_locked(vm).await
    }

    async fn start_locked(&self, vm: VmRecord) -> Result<VmRecord, VmError> {
        let vm = self.transition(&vm, Input::Start, None, None, None).await?;
        let started = Instant::now();
        let result = self.boot(&vm).await;
        self.finish_boot(vm, started, result).await
    }

    /// Records the outcome of a boot of `vm` (in `starting`): running with a monitor, or error
    /// with `last_error` and nothing left running.
    async fn finish_boot(
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
                        let _ = runtime.handle.kill().await;
                        self.clear_run_dir(&vm.id).await;
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
                self.clear_run_dir(&vm.id).await;
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
    async fn boot(&self, vm: &VmRecord) -> Result<(Arc<Runtime>, String), String> {
        let image = self.boot_image(vm).map_err(|e| e.message())?;
        let spec = self.launch_spec(vm, Some(&image));
        rotate_log(&spec.serial_log, self.inner.config.guest.log_max_bytes);
        rotate_log(&spec.vmm_log, self.inner.config.guest.log_max_bytes);
        let handle: Arc<dyn VmHandle> = Arc::from(
            self.inner
                .vmm
                .launch(&spec)
                .await
                .map_err(|e| VmError::Vmm(e).message())?,
        );
        let launched = format!("VMM pid {} launched", handle.pid());
        if let Err(e) = self
            .inner
            .store
            .set_pid(&vm.id, handle.pid(), &launched)
            .await
        {
            tracing::warn!(vm = %vm.name, error = %e, "cannot record the VMM pid");
        }
        self.await_guest(&spec, handle).await
    }

    /// Waits for the agent of a launched VMM; on failure ends the VMM.
    async fn await_guest(
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
            Ok((guest, boot_id)) => Ok((Arc::new(Runtime { handle, guest }), boot_id)),
            Err(e) => {
                let _ = handle.kill().await;
                Err(e)
            }
        }
    }

    /// Watches a running VM's VMM and records when it exits on its own.
    fn monitor(&self, vm: VmRecord, runtime: Arc<Runtime>) {
        let service = self.clone();
        tokio::spawn(async move {
            // While it runs, keep its logs under the configured size.
            let logs = [
                service.log_path(&vm, LogSource::Serial),
                service.log_path(&vm, LogSource::Vmm),
            ];
            let max = service.inner.config.guest.log_max_bytes;
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = runtime.handle.wait_exit() => break,
                    _ = tick.tick() => {
                        for log in &logs {
                            cap_log(log, max);
                        }
                    }
                }
            }
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
            if now.state != VmState::Running {
                return;
            }
            service.clear_run_dir(&vm.id).await;
            let msg = "the VMM process exited (guest powered off or crashed)";
            if let Err(e) = service
                .transition(&now, Input::Exited, Some(msg), Some(None), None)
                .await
            {
                tracing::warn!(vm = %vm.name, error = %e.message(), "cannot record exit");
            }
        });
    }

    async fn stop(&self, name: &str, timeout: Option<Duration>) -> Result<Vm, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let vm = self.record(&vm.id).await?;
        self.stop_locked(vm, timeout).await
    }

    async fn stop_locked(
        &self,
        vm: VmRecord,
        timeout: Option<Duration>,
    ) -> Result<VmRecord, VmError> {
        let vm = self.transition(&vm, Input::Stop, None, None, None).await?;
        let runtime = lock(&self.inner.runtimes).remove(&vm.id);
        let timeout = timeout.unwrap_or(self.inner.config.guest.stop_timeout);
        let mut how = "no VMM process was running".to_owned();
        if let Some(rt) = runtime {
            let asked = if rt.guest.is_ready() {
                rt.guest.shutdown(ShutdownAction::Poweroff).await.is_ok()
            } else {
                rt.handle.request_poweroff().await.is_ok()
            };
            let clean = asked
                && tokio::time::timeout(timeout, rt.handle.wait_exit())
                    .await
                    .is_ok();
            if clean {
                how = "guest powered off".into();
            } else {
                rt.handle.kill().await?;
                how = format!(
                    "guest did not power off within {} s; VMM ended by force",
                    timeout.as_secs()
                );
            }
        }
        self.clear_run_dir(&vm.id).await;
        self.transition(&vm, Input::Halted, Some(&how), Some(None), None)
            .await
    }

    async fn restart(&self, name: &str) -> Result<Vm, VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let _guard = lock.lock().await;
        let mut vm = self.record(&vm.id).await?;
        if vm.state == VmState::Running {
            vm = self.stop_locked(vm, None).await?;
        }
        self.start_locked(vm).await
    }

    async fn delete(&self, name: &str) -> Result<(), VmError> {
        let vm = self.record(name).await?;
        let lock = self.vm_lock(&vm.id);
        let guard = lock.lock().await;
        let mut vm = self.record(&vm.id).await?;
        if vm.state == VmState::Running {
            vm = self.stop_locked(vm, None).await?;
        }
        self.transition(&vm, Input::Delete, None, None, None)
            .await?;
        drop(guard);
        self.purge(&vm).await;
        Ok(())
    }

    /// The agent connection of a running VM.
    pub async fn guest(
        &self,
        name: &str,
        what: &'static str,
    ) -> Result<(VmRecord, Arc<GuestClient>), VmError> {
        let vm = self.record(name).await?;
        let runtime = lock(&self.inner.runtimes).get(&vm.id).cloned();
        match (vm.state, runtime) {
            (VmState::Running, Some(rt)) => {
                // After a hearthd restart the agent may not have answered hello yet.
                rt.guest
                    .wait_ready(Duration::from_secs(10))
                    .await
                    .map_err(|source| VmError::Guest {
                        name: vm.name.clone(),
                        source,
                    })?;
                Ok((vm, rt.guest.clone()))
            }
            (state, _) => Err(VmError::NotRunning {
                name: vm.name.clone(),
                state,
                what,
            }),
        }
    }

    async fn exec(&self, name: &str, req: ExecRequest) -> Result<ExecResponse, VmError> {
        let started = Instant::now();
        let (vm, guest) = self.guest(name, "exec").await?;
        let stdin = req.stdin.clone();
        let mut session = self
            .open_exec(&vm, &guest, exec_spec(req, stdin.is_some(), None)?)
            .await?;
        if let Some(text) = stdin {
            let send = async {
                guest.send_data(session.id, text.as_bytes()).await?;
                guest.send_data(session.id, &[]).await
            };
            send.await.map_err(|source| VmError::Guest {
                name: vm.name.clone(),
                source,
            })?;
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let event = session.next().await.map_err(|source| VmError::Guest {
                name: vm.name.clone(),
                source,
            })?;
            match event {
                ExecEvent::Stdout(b) => append_capped(&mut stdout, &b),
                ExecEvent::Stderr(b) => append_capped(&mut stderr, &b),
                ExecEvent::Exited {
                    code,
                    signal,
                    timed_out,
                } => {
                    return Ok(ExecResponse {
                        exit_code: code,
                        signal,
                        timed_out,
                        truncated: stdout.len() >= EXEC_OUTPUT_LIMIT
                            || stderr.len() >= EXEC_OUTPUT_LIMIT,
                        stdout: String::from_utf8_lossy(&stdout).into_owned(),
                        stderr: String::from_utf8_lossy(&stderr).into_owned(),
                        duration_ms: u64::try_from(started.elapsed().as_millis())
                            .unwrap_or(u64::MAX),
                    });
                }
            }
        }
    }

    /// Starts an exec session, mapping "program not found" to a clear error.
    pub async fn open_exec(
        &self,
        vm: &VmRecord,
        guest: &Arc<GuestClient>,
        spec: ExecSpec,
    ) -> Result<crate::guest::ExecSession, VmError> {
        let program = spec.argv.first().cloned().unwrap_or_default();
        guest.exec(spec).await.map_err(|source| match source {
            GuestError::Agent { code, message } => VmError::BadCommand {
                name: vm.name.clone(),
                program,
                code,
                message,
            },
            source => VmError::Guest {
                name: vm.name.clone(),
                source,
            },
        })
    }

    /// Re-attaches to VMs that were running when hearthd last stopped, and settles the ones
    /// whose VMM is gone or whose create or delete was interrupted.
    pub async fn recover(&self) -> Result<(), VmError> {
        for vm in self.inner.store.list_vms().await? {
            match vm.state {
                VmState::Creating | VmState::Deleting => {
                    tracing::info!(vm = %vm.name, state = %vm.state, "removing VM whose create or delete was interrupted");
                    self.purge(&vm).await;
                }
                VmState::Stopped | VmState::Error => {}
                VmState::Starting | VmState::Running | VmState::Stopping => {
                    self.readopt(vm).await?;
                }
            }
        }
        Ok(())
    }

    async fn readopt(&self, vm: VmRecord) -> Result<(), VmError> {
        let image = self.boot_image(&vm).ok();
        let spec = self.launch_spec(&vm, image.as_ref());
        let adopted = match vm.pid {
            Some(pid) => match self.inner.vmm.adopt(&spec, pid).await {
                Ok(handle) => handle.map(Arc::<dyn VmHandle>::from),
                Err(e) => {
                    tracing::warn!(vm = %vm.name, error = %VmError::Vmm(e).message(), "cannot re-attach to the VMM");
                    None
                }
            },
            None => None,
        };
        let Some(handle) = adopted else {
            tracing::info!(vm = %vm.name, "VMM is gone; marking the VM stopped");
            let msg = "the VMM process was gone when hearthd started";
            self.transition(&vm, Input::Exited, Some(msg), Some(None), None)
                .await?;
            self.clear_run_dir(&vm.id).await;
            return Ok(());
        };
        self.inner
            .store
            .record_event(
                &vm.id,
                "readopted",
                Some(&format!(
                    "VMM pid {} re-attached after hearthd restart",
                    handle.pid()
                )),
            )
            .await?;
        match vm.state {
            VmState::Stopping => {
                // The stop was interrupted: finish it.
                handle.kill().await?;
                self.transition(
                    &vm,
                    Input::Halted,
                    Some("stop finished after hearthd restart"),
                    Some(None),
                    None,
                )
                .await?;
                self.clear_run_dir(&vm.id).await;
            }
            VmState::Starting => {
                // The boot was interrupted: wait for the guest again, holding the VM's lock so
                // user requests queue behind it.
                let service = self.clone();
                tokio::spawn(async move {
                    let lock = service.vm_lock(&vm.id);
                    let _guard = lock.lock().await;
                    let started = Instant::now();
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
                        let _ = handle.kill().await;
                        self.transition(
                            &vm,
                            Input::Exited,
                            Some("guest agent unreachable after hearthd restart"),
                            Some(None),
                            None,
                        )
                        .await?;
                        self.clear_run_dir(&vm.id).await;
                        return Ok(());
                    }
                };
                let runtime = Arc::new(Runtime { handle, guest });
                lock(&self.inner.runtimes).insert(vm.id.clone(), runtime.clone());
                self.monitor(vm, runtime);
            }
        }
        Ok(())
    }
}

/// Runs `work` to completion in its own task, whatever happens to the caller.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, VmError>> + Send + 'static,
) -> Result<T, VmError> {
    tokio::spawn(work)
        .await
        .map_err(|e| VmError::Task(e.to_string()))?
}

/// Turns an API exec request into an agent exec.
pub fn exec_spec(
    req: ExecRequest,
    stdin: bool,
    pty: Option<hearth_guest_proto::PtySize>,
) -> Result<ExecSpec, VmError> {
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(RuleError {
            code: ErrorCode::InvalidCommand,
            message: "invalid command: it must name a program, e.g. [\"uname\", \"-a\"]".into(),
        }
        .into());
    }
    if let Some(cwd) = &req.cwd
        && !cwd.starts_with('/')
    {
        return Err(RuleError {
            code: ErrorCode::InvalidPath,
            message: format!("invalid cwd {cwd:?}: must be an absolute path"),
        }
        .into());
    }
    if req.timeout_secs == Some(0) {
        return Err(VmError::BadRequest(
            "timeout_secs must be at least 1".into(),
        ));
    }
    Ok(ExecSpec {
        argv: req.command,
        env: req.env.into_iter().collect(),
        cwd: req.cwd,
        stdin,
        pty,
        timeout: req.timeout_secs.map(Duration::from_secs),
    })
}

fn append_capped(buf: &mut Vec<u8>, bytes: &[u8]) {
    let room = EXEC_OUTPUT_LIMIT.saturating_sub(buf.len());
    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

/// Keeps at most one old copy of a log once it is larger than `max` bytes (before a start, when
/// no process writes it).
fn rotate_log(path: &Path, max: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > max) {
        let _ = std::fs::rename(path, path.with_extension("log.1"));
    }
}

/// Like [`rotate_log`] for a log the VMM is writing: copy it aside, then truncate it in place.
/// The VMM opened it for appending, so its next write lands at the new end.
fn cap_log(path: &Path, max: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > max)
        && std::fs::copy(path, path.with_extension("log.1")).is_ok()
        && let Ok(f) = std::fs::OpenOptions::new().write(true).open(path)
    {
        let _ = f.set_len(0);
    }
}

/// The last `n` non-empty lines of a file, joined, for error messages.
fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(16 * 1024);
    let text = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_being_written_is_capped_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writer.write_all(&[b'x'; 10_000]).unwrap();
        cap_log(&log, 20_000);
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            10_000,
            "under the cap"
        );
        cap_log(&log, 4096);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(
            std::fs::read(dir.path().join("serial.log.1"))
                .unwrap()
                .len(),
            10_000
        );
        // The writer keeps appending at the new end, not at its old offset.
        writer.write_all(b"next\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"next\n");
    }

    #[test]
    fn exec_requests_are_checked() {
        let req = |command: &[&str], cwd: Option<&str>| ExecRequest {
            command: command.iter().map(|s| s.to_string()).collect(),
            cwd: cwd.map(str::to_owned),
            ..ExecRequest::default()
        };
        assert_eq!(
            exec_spec(req(&[], None), false, None).unwrap_err().code(),
            ErrorCode::InvalidCommand
        );
        assert_eq!(
            exec_spec(req(&["ls"], Some("tmp")), false, None)
                .unwrap_err()
                .code(),
            ErrorCode::InvalidPath
        );
        let spec = exec_spec(req(&["ls", "-l"], Some("/tmp")), true, None).unwrap();
        assert_eq!(spec.argv, ["ls", "-l"]);
        assert!(spec.stdin);
    }
}

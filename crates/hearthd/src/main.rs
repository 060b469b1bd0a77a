//! hearthd: Hearth's control plane.

mod access;
mod api;
mod archive;
mod capacity;
mod config;
mod disk;
mod guest;
mod image;
mod metrics;
mod net;
mod rules;
mod secrets;
mod ssh;
mod store;
#[cfg(test)]
mod testing;
mod vm;
mod vmm;

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::api::guard::{ConnInfo, GuardedListener, Transport};
use crate::config::{AccelChoice, Config, VmmChoice};
use crate::image::ImageBuilder;
use crate::vm::{ImageState, VmService};
use crate::vmm::Vmm;
use crate::vmm::qemu::{Accel, Qemu};

#[derive(Debug, Parser)]
#[command(
    name = "hearthd",
    version,
    about = "Hearth control plane: runs microVMs and serves the REST API"
)]
struct Cli {
    /// Configuration file (TOML). Without it, built-in defaults and HEARTH_* variables apply.
    #[arg(long, short, global = true, env = "HEARTH_CONFIG")]
    config: Option<PathBuf>,
    /// Print a complete, commented default configuration and exit.
    #[arg(long)]
    generate_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (the default).
    Serve,
    /// Build (or find cached) the guest image, showing progress, and exit.
    BuildImage,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Print the OpenAPI document and exit.
    Openapi,
    /// Make an API key for a user (default: the first admin) straight in the store and print
    /// it: how a host with auth.localhost_admin off gets its first key. Run it as hearthd's user.
    AdminKey {
        /// Whose key (default: auth.bootstrap_admin).
        #[arg(long)]
        user: Option<String>,
        /// A label for the key.
        #[arg(long, default_value = "admin-key")]
        name: String,
    },
}

fn main() -> ExitCode {
    // Before anything is created: every file and directory hearthd and the programs it starts
    // (QEMU: serial logs, sockets) make is private unless it says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Before any thread exists: HEARTH_SECRET_* values leave the environment, so no program
    // hearthd starts inherits them.
    let unusable_secrets = secrets::capture_env();
    let cli = Cli::parse();
    if cli.generate_config {
        print!("{}", config::generate_default());
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(cli.config.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            eprintln!("hint: `hearthd --generate-config` prints every key with its rule");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            println!("configuration is valid");
            Ok(())
        }
        Command::Openapi => {
            print!("{}", api::openapi_json());
            Ok(())
        }
        Command::BuildImage => build_image(&config),
        Command::AdminKey { user, name } => admin_key(&config, user, &name),
        Command::Serve => serve(config, unusable_secrets),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain_anyhow(&e));
            ExitCode::FAILURE
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(&format!("\n  Caused by: {s}"));
        src = s.source();
    }
    out
}

fn chain_anyhow(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        out.push_str(&format!("\n  Caused by: {cause}"));
    }
    out
}

fn admin_key(config: &Config, user: Option<String>, name: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let store = store::Store::open(&config.database_url)
            .await
            .context("cannot open the store")?;
        let access = access::Access::new(store.clone(), config.auth.clone());
        access.bootstrap().await.context("cannot make the first admin")?;
        let user = user.unwrap_or_else(|| config.auth.bootstrap_admin.clone());
        let (key, org) = access
            .mint_key(&user, name)
            .await
            .map_err(|e| anyhow::anyhow!(e.message()))?;
        println!("{key}");
        eprintln!(
            "API key of {user} in {org}: shown this once; keep it with `hearth login` (it reads the key from stdin)"
        );
        store.close().await;
        Ok(())
    })
}

fn build_image(config: &Config) -> anyhow::Result<()> {
    let builder = ImageBuilder::new(&config.data_dir, config.image.clone());
    let started = std::time::Instant::now();
    let image = builder
        .ensure(&mut |step| eprintln!("  {step} ({:.0?})", started.elapsed()))
        .context("cannot build the guest image")?;
    eprintln!(
        "guest image {} ({}) in {}",
        image.id,
        image.kernel_version,
        image.dir.display()
    );
    Ok(())
}

#[tokio::main]
async fn serve(config: Config, unusable_secrets: Vec<String>) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log));
    // Colours only on a terminal: a log file or journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log_json {
        logs.json().init();
    } else {
        logs.with_ansi(ansi).init();
    }
    for name in unusable_secrets {
        tracing::warn!(
            variable = %name,
            "ignored environment variable {name}: a secret's is HEARTH_SECRET_ and a name of uppercase letters, digits and '_' starting with a letter, with a UTF-8 value"
        );
    }
    let config = Arc::new(config);
    for dir in ["", "vms", "run", "images"] {
        let d = config.data_dir.join(dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .with_context(|| format!("cannot create data directory {}", d.display()))?;
    }
    secure_state(&config);
    let store = store::Store::open(&config.database_url).await?;
    if let Some(db) = sqlite_path(&config.database_url) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = db.clone().into_os_string();
            path.push(suffix);
            tighten(Path::new(&path), 0o600);
        }
    }
    // The master key of secrets before anything else is touched: a missing (while secrets
    // exist), unreadable, wrong-sized, too open or foreign key file stops hearthd here, and an
    // interrupted rotation is settled. The service loads it again below.
    secrets::Secrets::new(store.clone(), config.master_key_path.clone())
        .open()
        .await
        .map_err(|e| anyhow::anyhow!(chain(&e).replace("\n  Caused by: ", ": ")))?;
    let vmm: Arc<dyn Vmm> = match config.vmm {
        VmmChoice::Firecracker => anyhow::bail!(
            "vmm (env HEARTH_VMM): firecracker is not available in this build yet; use qemu or auto"
        ),
        VmmChoice::Auto | VmmChoice::Qemu => {
            let want = match config.accel {
                AccelChoice::Auto => None,
                AccelChoice::Kvm => Some(Accel::Kvm),
                AccelChoice::Tcg => Some(Accel::Tcg),
            };
            let ram_dir = vmm::qemu::ram_dir_for(&config.data_dir);
            let run_dir = config.data_dir.join("run");
            Arc::new(Qemu::new(&config.qemu_binary, want, &run_dir, ram_dir).await?)
        }
    };
    tracing::info!(
        vmm = vmm.kind(),
        accel = vmm.accel(),
        capabilities = ?vmm.capabilities(),
        ram_dir = ?vmm.ram_dir(),
        "VMM backend ready"
    );
    match disk::probe_clone(&config.data_dir) {
        (disk::CopyMethod::Reflink, _) => tracing::info!(
            "VM disks are reflink clones (the data filesystem shares extents): a disk costs no copy"
        ),
        (disk::CopyMethod::Sparse, why) => tracing::info!(
            "VM disks are sparse copies (FICLONE: {why}): a disk costs a copy of the image's data; xfs with reflink or btrfs makes it a clone"
        ),
    }

    let builder = ImageBuilder::new(&config.data_dir, config.image.clone());
    let initial = match builder.current() {
        Some(image) => ImageState::Ready(image),
        None => ImageState::Building("starting".into()),
    };
    let (image_tx, image_rx) = watch::channel(initial);
    let image_tx = Arc::new(image_tx);
    {
        let tx = image_tx.clone();
        tokio::task::spawn_blocking(move || {
            let progress_tx = tx.clone();
            let result = builder.ensure(&mut |step| {
                tracing::info!("guest image: {step}");
                progress_tx.send_if_modified(|s| {
                    if let ImageState::Building(current) = s {
                        *current = step.to_owned();
                        true
                    } else {
                        false
                    }
                });
            });
            match result {
                Ok(image) => {
                    tx.send_replace(ImageState::Ready(image));
                }
                Err(e) => {
                    let msg = chain(&e).replace("\n  Caused by: ", ": ");
                    tracing::error!("guest image build failed: {msg}");
                    tx.send_if_modified(|s| {
                        if matches!(s, ImageState::Ready(_)) {
                            false
                        } else {
                            *s = ImageState::Failed(msg.clone());
                            true
                        }
                    });
                }
            }
        });
    }

    // With an image at hand the VMM settles what needs a guest kernel (whether KVM really runs
    // guests) before anything is served; otherwise as soon as the image is built.
    let probe_cache = config.data_dir.join("images").join("kvm-probe");
    let kernel = match &*image_rx.borrow() {
        ImageState::Ready(image) => Some(image.kernel()),
        _ => None,
    };
    if let Some(kernel) = kernel {
        vmm.prepare(&kernel, &probe_cache).await;
    }
    // Kept to tidy up at shutdown: the watcher below takes `vmm`.
    let ram_dir = vmm.ram_dir().map(std::path::Path::to_path_buf);
    let network = match &config.network {
        Some(net) => Some(
            net::Network::start(net.clone(), &config.data_dir, store.clone())
                .await
                .map_err(|e| anyhow::anyhow!(chain(&e).replace("\n  Caused by: ", ": ")))
                .context(
                    "cannot set up VM networking (key network.mode, env HEARTH_NETWORK_MODE)",
                )?,
        ),
        None => None,
    };
    let service = VmService::with_network(
        config.clone(),
        store.clone(),
        vmm.clone(),
        image_rx.clone(),
        network.clone(),
    );
    let key_id = service
        .secrets()
        .open()
        .await
        .map_err(|e| anyhow::anyhow!(chain(&e).replace("\n  Caused by: ", ": ")))?;
    tracing::info!(
        path = %service.secrets().key_path().display(),
        key_id = %key_id,
        "master key of secrets ready"
    );
    if let Some(admin) = service
        .access()
        .bootstrap()
        .await
        .context("cannot make the first admin")?
    {
        tracing::info!(
            user = %admin,
            org = crate::access::DEFAULT_ORG,
            "first start: made host admin {admin:?} in organization \"default\"; give it an SSH key with `hearth user ssh-key add {admin} ~/.ssh/id_ed25519.pub` and an API key with `hearth key create --user {admin}` (from this host, as the operator; with auth.localhost_admin off, `hearthd admin-key` prints one)"
        );
    }
    {
        // A spare disk for fast creates, whenever a (new) image is ready.
        let service = service.clone();
        let mut image_rx = image_rx;
        tokio::spawn(async move {
            loop {
                let ready = match &*image_rx.borrow_and_update() {
                    ImageState::Ready(image) => Some(image.kernel()),
                    _ => None,
                };
                if let Some(kernel) = ready {
                    vmm.prepare(&kernel, &probe_cache).await;
                    service.refill_spare();
                }
                if image_rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    service
        .recover()
        .await
        .map_err(|e| anyhow::anyhow!(e.message()))
        .context("cannot recover VMs from the last run")?;
    let app = api::router(api::AppState {
        service: service.clone(),
        request_timeout: config.request_timeout,
        guard: Arc::new(api::guard::Guard::new(config.listen, &config.server)),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (key listen, env HEARTH_LISTEN)",
                config.listen
            )
        })?;
    if !config.listen.ip().is_loopback() && config.auth.localhost_admin {
        tracing::info!(
            listen = %config.listen,
            "the API listens beyond loopback: callers from elsewhere need an API key; local ones (loopback, the unix socket) act as the operator while auth.localhost_admin is on"
        );
    }
    let unix = match &config.server.unix_socket {
        Some(path) => Some(bind_unix(path, config.server.unix_socket_group)?),
        None => None,
    };
    // The SSH front end checks logins against users and their keys.
    let identities: Option<Arc<dyn ssh::Identities>> = Some(Arc::new(service.access().clone()));
    let ssh = match (config.ssh.listen, identities, &config.server.unix_socket) {
        (Some(addr), Some(identities), Some(socket)) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} (key ssh.listen, env HEARTH_SSH_LISTEN)")
            })?;
            let serving = ssh::serve(
                listener,
                config.clone(),
                service.clone(),
                identities,
                socket.clone(),
            );
            Some(tokio::spawn(async move {
                if let Err(e) = serving.await {
                    tracing::error!(
                        "the SSH front end stopped: {}",
                        chain(&e).replace("\n  Caused by: ", ": ")
                    );
                }
            }))
        }
        (Some(addr), Some(_), None) => {
            tracing::warn!(
                ssh_listen = %addr,
                "SSH is off: its command account runs the hearth CLI over hearthd's unix socket, which server.unix_socket = \"off\" turns off"
            );
            None
        }
        (None, _, _) | (Some(_), None, _) => None,
    };
    tracing::info!(
        listen = %config.listen,
        unix_socket = %config.server.unix_socket.as_deref().map_or("off".into(), |p| p.display().to_string()),
        data_dir = %config.data_dir.display(),
        "hearthd is serving"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp = axum::serve(
        GuardedListener::new(listener, Transport::Tcp),
        app.clone()
            .into_make_service_with_connect_info::<ConnInfo>(),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let unix = unix.map(|listener| {
        axum::serve(
            GuardedListener::new(listener, Transport::Unix),
            app.into_make_service_with_connect_info::<ConnInfo>(),
        )
        .with_graceful_shutdown(stopped(stop_rx))
    });
    let server = async move {
        let unix = async move {
            match unix {
                Some(server) => server.await,
                None => Ok(()),
            }
        };
        tokio::try_join!(tcp.into_future(), unix).map(|_| ())
    };
    let mut server = std::pin::pin!(server);
    tokio::select! {
        r = &mut server => r?,
        () = shutdown_signal() => {
            tracing::info!(
                timeout_secs = config.shutdown_timeout.as_secs(),
                "shutting down; VMs keep running and are re-adopted at the next start"
            );
            let _ = stop_tx.send(true);
            if tokio::time::timeout(config.shutdown_timeout, &mut server).await.is_err() {
                tracing::warn!("requests still in flight after server.shutdown_timeout_secs; leaving them");
            }
        }
    }
    if let Some(ssh) = ssh {
        ssh.abort();
    }
    if let Some(net) = &network {
        net.shutdown().await;
    }
    // The RAM directory goes when no VM left a RAM file in it (VMs keep running across a stop).
    if let Some(dir) = ram_dir {
        let _ = std::fs::remove_dir(dir);
    }
    store.close().await;
    if let Some(path) = &config.server.unix_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// The database file of a `sqlite://PATH[?options]` URL.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Takes group and other access away from state hearthd made under an earlier, looser umask:
/// the data directory (0700, or 0710 for the group of a unix socket inside it, which may only
/// pass through), its `vms`, `run` and `spare` directories, each VM's directory and its files
/// (disk, serial and VMM logs). The image cache holds nothing private and is left as it is.
fn secure_state(config: &Config) {
    let data = &config.data_dir;
    let socket_group = match (&config.server.unix_socket, config.server.unix_socket_group) {
        (Some(socket), Some(gid)) if socket.parent() == Some(data.as_path()) => Some(gid),
        _ => None,
    };
    if let Some(gid) = socket_group
        && let Err(e) = nix::unistd::chown(data, None, Some(nix::unistd::Gid::from_raw(gid)))
    {
        tracing::warn!(path = %data.display(), gid, error = %e, "cannot give the data directory to the socket's group");
    }
    tighten(data, if socket_group.is_some() { 0o710 } else { 0o700 });
    for dir in ["vms", "run", "spare", "secrets"] {
        tighten(&data.join(dir), 0o700);
    }
    for dir in ["vms", "spare"] {
        let Ok(entries) = std::fs::read_dir(data.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            tighten(&path, 0o700);
            if let Ok(files) = std::fs::read_dir(&path) {
                for file in files.flatten() {
                    tighten(&file.path(), 0o600);
                }
            }
        }
    }
}

/// Sets `path`'s permission bits to `mode` (0600 files, 0700 directories) when it is a file or
/// directory of hearthd's own that is more open than that. Symlinks are never followed.
fn tighten(path: &Path, mode: u32) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let kind = meta.file_type();
    let mine = meta.uid() == nix::unistd::geteuid().as_raw();
    if !mine || kind.is_symlink() || kind.is_socket() || meta.mode() & 0o7777 == mode {
        return;
    }
    let mode = if kind.is_dir() { mode } else { mode & 0o666 };
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => {
            tracing::info!(path = %path.display(), mode = format!("{mode:o}"), "tightened permissions")
        }
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot tighten permissions"),
    }
}

/// Listens on the unix socket at `path`: mode 0660, given to `group` when one is configured.
fn bind_unix(path: &Path, group: Option<u32>) -> anyhow::Result<tokio::net::UnixListener> {
    let key = "key server.unix_socket, env HEARTH_SERVER_UNIX_SOCKET";
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "cannot listen on {}: another process (a running hearthd?) listens there ({key})",
                    path.display()
                );
            }
            // Left behind by a hearthd that did not shut down cleanly.
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "cannot listen on {}: something that is not a socket is there ({key})",
            path.display()
        ),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {} ({key})", path.display()))?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).with_context(
            || {
                format!(
                    "cannot give {} to group {gid} (key server.unix_socket_group)",
                    path.display()
                )
            },
        )?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

//! hearthd: Hearth's control plane.

mod api;
mod capacity;
mod config;
mod disk;
mod guest;
mod image;
mod rules;
mod store;
mod vm;
mod vmm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

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
}

fn main() -> ExitCode {
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
        Command::Serve => serve(config),
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
async fn serve(config: Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let config = Arc::new(config);
    for dir in ["", "vms", "run", "images"] {
        let d = config.data_dir.join(dir);
        std::fs::create_dir_all(&d)
            .with_context(|| format!("cannot create data directory {}", d.display()))?;
    }
    let store = store::Store::open(&config.database_url).await?;
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
            Arc::new(Qemu::new(&config.qemu_binary, want, &config.data_dir.join("run")).await?)
        }
    };
    tracing::info!(
        vmm = vmm.kind(),
        accel = vmm.accel(),
        capabilities = ?vmm.capabilities(),
        "VMM backend ready"
    );

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
    let service = VmService::new(config.clone(), store.clone(), vmm.clone(), image_rx.clone());
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
        service,
        request_timeout: config.request_timeout,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (key listen, env HEARTH_LISTEN)",
                config.listen
            )
        })?;
    if !config.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "the API listens beyond loopback and has no authentication yet: anyone who can reach it controls every VM"
        );
    }
    tracing::info!(listen = %config.listen, data_dir = %config.data_dir.display(), "hearthd is serving");

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    });
    let mut server = std::pin::pin!(server.into_future());
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
    store.close().await;
    Ok(())
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

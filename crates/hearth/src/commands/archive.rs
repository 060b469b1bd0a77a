//! `hearth export` and `hearth import`: a stopped VM as a tar stream, out of one host and into
//! another, with progress on stderr.

use std::io::IsTerminal;
use std::path::Path;

use futures_util::StreamExt;
use hearth_api::{ErrorCode, VmDetail};

use super::cp::{chunks, copy_body};
use crate::cli::{ExportArgs, ImportArgs};
use crate::client::Client;
use crate::error::{CliError, Result};
use crate::printer::{Printer, Transfer};
use crate::render::terminal_safe;

pub async fn export(client: &Client, printer: &Printer, args: ExportArgs) -> Result<()> {
    if args.output.is_none() && std::io::stdout().is_terminal() {
        return Err(CliError::input(
            ErrorCode::InvalidRequest,
            format!(
                "refusing to write a tar archive to the terminal: redirect it (`hearth export {0} > {0}.tar`) or give -o FILE",
                args.name
            ),
        ));
    }
    let resp = client.export(&args.name).await?;
    let total = resp.content_length();
    let label = format!("exporting vm {}", terminal_safe(&args.name));
    let mut progress = printer.transfer(&label, total);
    let body = resp.bytes_stream();
    match &args.output {
        None => {
            let mut out = tokio::io::stdout();
            match copy_body(client, body, &mut out, |n| progress.add(n)).await {
                Err(CliError::Local {
                    kind: "broken_pipe",
                    ..
                }) => return Ok(()),
                other => other?,
            }
        }
        Some(path) => write_file(client, body, path, &mut progress).await?,
    }
    progress.finish();
    if let Some(path) = &args.output {
        printer.note(&format!(
            "wrote vm {} to {}; `hearth import {}` makes it again on any host",
            terminal_safe(&args.name),
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Writes the archive to `path` by way of `path.partial`, renamed once complete.
async fn write_file(
    client: &Client,
    body: impl futures_util::Stream<Item = reqwest::Result<impl AsRef<[u8]>>>,
    path: &Path,
    progress: &mut Transfer,
) -> Result<()> {
    let partial = path.with_extension("partial");
    let io = |e: std::io::Error| CliError::io(format_args!("cannot write {}", path.display()), &e);
    let mut file = tokio::fs::File::create(&partial).await.map_err(io)?;
    let written = async {
        copy_body(client, body, &mut file, |n| progress.add(n)).await?;
        file.sync_all().await.map_err(io)?;
        tokio::fs::rename(&partial, path).await.map_err(io)
    };
    let result = written.await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result
}

pub async fn import(client: &Client, printer: &Printer, args: ImportArgs) -> Result<()> {
    let file = args.file.filter(|p| p.as_os_str() != "-");
    let (reader, total): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Option<u64>) = match &file {
        Some(path) => {
            let f = tokio::fs::File::open(path)
                .await
                .map_err(|e| CliError::io(format_args!("cannot open {}", path.display()), &e))?;
            let len = f.metadata().await.ok().map(|m| m.len());
            (Box::new(f), len)
        }
        None => {
            if std::io::stdin().is_terminal() {
                return Err(CliError::input(
                    ErrorCode::InvalidRequest,
                    "give the archive: `hearth import web.tar`, or `hearth import < web.tar`",
                ));
            }
            // A file on stdin has a length to show progress against; a pipe has none.
            let len = std::fs::metadata("/dev/stdin")
                .ok()
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len());
            (Box::new(tokio::io::stdin()), len)
        }
    };
    let progress = std::sync::Arc::new(std::sync::Mutex::new(printer.transfer("importing", total)));
    let counter = progress.clone();
    let body = chunks(reader).map(move |chunk| {
        if let Ok(c) = &chunk
            && let Ok(mut p) = counter.lock()
        {
            p.add(c.len() as u64);
        }
        chunk
    });
    let detail = client.import(reqwest::Body::wrap_stream(body)).await;
    if let Ok(mut p) = progress.lock() {
        p.finish();
    }
    let detail = detail?;
    printer.result(&detail, |d: &VmDetail| {
        format!(
            "imported vm {} ({}); start it with `hearth vm start {}`\n",
            terminal_safe(&d.vm.name),
            super::vm::summary(d),
            terminal_safe(&d.vm.name)
        )
    });
    Ok(())
}

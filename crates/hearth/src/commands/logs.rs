//! `hearth vm logs NAME [serial|vmm] [-f] [--tail N]`: the log's bytes to stdout as they arrive,
//! with control characters escaped when stdout is a terminal (a guest writes the serial log).

use std::io::IsTerminal;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::cli::LogsArgs;
use crate::client::Client;
use crate::error::{CliError, Result};
use crate::render::TerminalStream;

pub async fn run(client: &Client, args: &LogsArgs) -> Result<()> {
    let resp = client
        .logs(&args.name, args.source.as_str(), args.follow, args.tail)
        .await?;
    let mut body = resp.bytes_stream();
    let mut stdout = tokio::io::stdout();
    let mut terminal = std::io::stdout()
        .is_terminal()
        .then(TerminalStream::default);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| client.transport_error(&e))?;
        let open = match terminal.as_mut() {
            Some(t) => write_out(&mut stdout, t.push(&chunk).as_bytes()).await?,
            None => write_out(&mut stdout, &chunk).await?,
        };
        if !open {
            return Ok(());
        }
    }
    if let Some(t) = terminal.as_mut() {
        write_out(&mut stdout, t.finish().as_bytes()).await?;
    }
    Ok(())
}

/// Writes and flushes; `false` when the reader went away (`| head`), which is the end, not a
/// failure.
async fn write_out(stdout: &mut tokio::io::Stdout, bytes: &[u8]) -> Result<bool> {
    let written = async {
        stdout.write_all(bytes).await?;
        stdout.flush().await
    };
    match written.await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::io("writing to stdout", &e)),
    }
}

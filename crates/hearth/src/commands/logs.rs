//! `hearth vm logs NAME [serial|vmm] [-f] [--tail N]`: the log's bytes to stdout as they arrive.

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::cli::LogsArgs;
use crate::client::Client;
use crate::error::{CliError, Result};

pub async fn run(client: &Client, args: &LogsArgs) -> Result<()> {
    let resp = client
        .logs(&args.name, args.source.as_str(), args.follow, args.tail)
        .await?;
    let mut body = resp.bytes_stream();
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| client.transport_error(&e))?;
        let written = async {
            stdout.write_all(&chunk).await?;
            stdout.flush().await
        };
        match written.await {
            Ok(()) => {}
            // The reader went away (`| head`): that is the end, not a failure.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(CliError::io("writing to stdout", &e)),
        }
    }
    Ok(())
}

//! `hearth secret set|list|delete|rotate-master-key`. A value comes from stdin only, never
//! from the command line (where `ps` and shell histories would show it), and is never printed.

use std::io::{BufRead, IsTerminal, Read};

use hearth_api::{ErrorCode, MAX_SECRET_BYTES, RotatedMasterKey, SecretInfo, SetSecretRequest};
use reqwest::Method;

use crate::cli::SecretCommand;
use crate::client::{Client, Json};
use crate::error::{CliError, Result};
use crate::printer::Printer;
use crate::render::{table, terminal_safe};

pub async fn run(command: SecretCommand, client: &Client, printer: &Printer) -> Result<()> {
    match command {
        SecretCommand::Set(args) => {
            let body = SetSecretRequest {
                value: read_value(&args.name)?,
            };
            let info: Json<SecretInfo> = client
                .send_json(Method::PUT, &["secrets", &args.name], &body)
                .await?;
            printer.result(&info, |i| {
                format!(
                    "set secret {} of {}\n",
                    terminal_safe(&i.name),
                    terminal_safe(&i.org)
                )
            });
        }
        SecretCommand::List => {
            let list: Json<Vec<SecretInfo>> = client.get(&["secrets"], &[]).await?;
            printer.result(&list, |l| secrets_text(l));
        }
        SecretCommand::Delete(args) => {
            client.delete(&["secrets", &args.name]).await?;
            printer.text(&format!("deleted secret {}\n", terminal_safe(&args.name)));
        }
        SecretCommand::RotateMasterKey => {
            let done: Json<RotatedMasterKey> = client
                .send_json(
                    Method::POST,
                    &["secrets", "rotate-master-key"],
                    &serde_json::json!({}),
                )
                .await?;
            printer.result(&done, |r| {
                format!(
                    "re-encrypted {} secrets under the new master key {}; the old key decrypts none of them\n",
                    r.secrets, r.key_id
                )
            });
        }
    }
    Ok(())
}

fn secrets_text(list: &[SecretInfo]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                terminal_safe(&s.name),
                terminal_safe(&s.org),
                terminal_safe(&s.created_by),
                s.created_at.clone(),
                s.updated_at.clone(),
            ]
        })
        .collect();
    table(&["NAME", "ORG", "BY", "CREATED", "UPDATED"], &rows)
}

/// The value from stdin: on a terminal one line read without echo, else everything up to the
/// end; a trailing newline (`\n` or `\r\n`) is not part of it.
fn read_value(name: &str) -> Result<String> {
    let stdin = std::io::stdin();
    let mut raw = Vec::new();
    if stdin.is_terminal() {
        eprint!(
            "value of secret {} (input is not shown; end it with enter): ",
            terminal_safe(name)
        );
        let hidden = crate::tty::Hidden::new();
        let read = stdin.lock().read_until(b'\n', &mut raw);
        drop(hidden);
        read.map_err(|e| CliError::io("cannot read the value from the terminal", &e))?;
    } else {
        // One byte more than a value and its newline may be tells a value that is too long.
        let limit = u64::try_from(MAX_SECRET_BYTES + 3).unwrap_or(u64::MAX);
        stdin
            .lock()
            .take(limit)
            .read_to_end(&mut raw)
            .map_err(|e| CliError::io("cannot read the value from stdin", &e))?;
    }
    if raw.ends_with(b"\n") {
        raw.pop();
        if raw.ends_with(b"\r") {
            raw.pop();
        }
    }
    if raw.is_empty() {
        return Err(CliError::input(
            ErrorCode::InvalidRequest,
            format!(
                "no value for secret {}: give it on stdin (`hearth secret set {0} < file`, or type it when asked); an empty value is refused",
                terminal_safe(name)
            ),
        ));
    }
    if raw.len() > MAX_SECRET_BYTES {
        return Err(CliError::input(
            ErrorCode::InvalidRequest,
            format!(
                "the value of secret {} is more than {MAX_SECRET_BYTES} bytes (64 KiB), the most a secret holds",
                terminal_safe(name)
            ),
        ));
    }
    String::from_utf8(raw).map_err(|_| {
        CliError::input(
            ErrorCode::InvalidRequest,
            format!(
                "the value of secret {} is not UTF-8 text",
                terminal_safe(name)
            ),
        )
    })
}

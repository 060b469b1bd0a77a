//! `hearth`: the command-line client of hearthd's REST API.

mod cli;
mod client;
mod commands;
mod error;
mod printer;
mod profile;
mod remote;
mod render;
mod tty;

use std::process::ExitCode;
use std::time::Duration;

use hearth_api::{EXIT_EXEC_FAILED, ErrorCode};

use crate::cli::Cli;
use crate::client::Client;
use crate::error::CliError;
use crate::printer::Printer;

fn main() -> ExitCode {
    let mut cli = Cli::parse_checked(std::env::args_os()).unwrap_or_else(|e| e.exit());
    if remote::active()
        && let Err(message) =
            remote::restrict(&mut cli, std::env::var("HEARTH_URL").ok().as_deref())
    {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    let printer = Printer::new(cli.json);
    let context = cli.command.hint_context();
    let is_exec = cli.command.is_exec();

    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::io("cannot start the async runtime", &e))
        .and_then(|runtime| {
            let result = runtime.block_on(async {
                // Over SSH the CLI acts by the key hearthd gave it, never by a profile of the host.
                let profile = if remote::active() {
                    profile::Profile::default()
                } else {
                    profile::load(&cli.profile)?
                };
                let url = cli
                    .url
                    .or(profile.url)
                    .unwrap_or_else(|| cli::DEFAULT_URL.to_owned());
                match cli.command {
                    cli::Command::Login(args) => {
                        return commands::access::login(&url, &cli.profile, args, &printer)
                            .await
                            .map(|()| 0);
                    }
                    cli::Command::Logout => {
                        return commands::access::logout(&cli.profile, &printer).map(|()| 0);
                    }
                    _ => {}
                }
                let key = std::env::var("HEARTH_API_KEY")
                    .ok()
                    .filter(|k| !k.is_empty())
                    .or(profile.api_key);
                let client = Client::new(&url, key.as_deref())?;
                commands::run(cli.command, &client, &printer).await
            });
            // Do not wait for a read of stdin that will never finish.
            runtime.shutdown_timeout(Duration::from_millis(100));
            result
        });

    let code = match result {
        Ok(code) => code,
        Err(err) => {
            printer.error(&err, &context);
            if is_exec {
                // The one failure of hearth's that is the command's own: it does not exist.
                match err.code() {
                    Some(ErrorCode::CommandNotFound) => ErrorCode::CommandNotFound.exit_code(),
                    _ => EXIT_EXEC_FAILED,
                }
            } else {
                err.exit_code()
            }
        }
    };
    ExitCode::from(code)
}

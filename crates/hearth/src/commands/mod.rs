//! One function per command; each returns the exit code, or the error `main` prints.

pub mod access;
pub mod archive;
pub mod backup;
pub mod cp;
pub mod exec;
pub mod inputs;
pub mod logs;
pub mod network;
pub mod secret;
pub mod smoke;
pub mod top;
pub mod vm;
pub mod volume;

use crate::cli::{Command, VmCommand};
use crate::client::{Client, Lifecycle};
use crate::error::Result;
use crate::printer::Printer;

pub async fn run(command: Command, client: &Client, printer: &Printer) -> Result<u8> {
    match command {
        Command::Vm(command) => run_vm(command, client, printer).await,
        Command::Exec(args) => exec::run(client, args).await,
        Command::Cp(args) => cp::run(client, &args).await.map(success),
        Command::Network(command) => network::run(command, client, printer).await.map(success),
        Command::Backup(command) => backup::run(command, client, printer).await.map(success),
        Command::Restore(args) => backup::restore(client, printer, args).await.map(success),
        Command::Export(args) => archive::export(client, printer, args).await.map(success),
        Command::Import(args) => archive::import(client, printer, args).await.map(success),
        Command::Volume(command) => volume::run(command, client, printer).await.map(success),
        Command::Health => vm::health(client, printer).await.map(success),
        Command::Smoke(args) => smoke::run(client, printer, args).await,
        Command::Top(args) => top::run(client, printer, args).await.map(success),
        Command::Whoami => access::whoami(client, printer).await.map(success),
        Command::User(command) => access::user(command, client, printer).await.map(success),
        Command::Key(command) => access::key(command, client, printer).await.map(success),
        Command::Org(command) => access::org(command, client, printer).await.map(success),
        Command::Audit(args) => access::audit(args, client, printer).await.map(success),
        Command::Secret(command) => secret::run(command, client, printer).await.map(success),
        // Handled by main before a client exists.
        Command::Login(_) | Command::Logout => Ok(0),
    }
}

async fn run_vm(command: VmCommand, client: &Client, printer: &Printer) -> Result<u8> {
    let done = match command {
        VmCommand::Exec(args) => return exec::run(client, args).await,
        VmCommand::Cp(args) => cp::run(client, &args).await,
        VmCommand::New(args) => vm::new(client, printer, args).await,
        VmCommand::List => vm::list(client, printer).await,
        VmCommand::Inspect(args) => vm::inspect(client, printer, &args.name).await,
        VmCommand::Start(args) => {
            vm::lifecycle(client, printer, &args.name, Lifecycle::Start).await
        }
        VmCommand::Stop(args) => {
            let op = Lifecycle::Stop {
                timeout_secs: args.timeout,
            };
            vm::lifecycle(client, printer, &args.name, op).await
        }
        VmCommand::Restart(args) => {
            vm::lifecycle(client, printer, &args.name, Lifecycle::Restart).await
        }
        VmCommand::Pause(args) => {
            vm::lifecycle(client, printer, &args.name, Lifecycle::Pause).await
        }
        VmCommand::Resume(args) => {
            vm::lifecycle(client, printer, &args.name, Lifecycle::Resume).await
        }
        VmCommand::Delete(args) => vm::delete(client, printer, &args.name).await,
        VmCommand::Logs(args) => logs::run(client, &args).await,
        VmCommand::Egress(args) => vm::egress(client, printer, args).await,
        VmCommand::Resize(args) => vm::resize(client, printer, args).await,
    };
    done.map(success)
}

fn success((): ()) -> u8 {
    0
}

//! The command line: clap types only, no behaviour.

use clap::{Args, Parser, Subcommand, ValueEnum};
use hearth_api::Size;

use crate::error::{Action, HintContext};

pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// Run and manage Hearth microVMs through hearthd's REST API.
#[derive(Debug, Parser)]
#[command(
    name = "hearth",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Where hearthd listens.
    #[arg(long, global = true, env = "HEARTH_URL", default_value = DEFAULT_URL, value_name = "URL")]
    pub url: String,
    /// Print the API's JSON (and, on failure, its error body) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list and control VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Run a command in a VM (same as `hearth vm exec`).
    Exec(ExecArgs),
    /// Copy a file into or out of a VM (same as `hearth vm cp`).
    Cp(CpArgs),
    /// Show hearthd's status, version, VMM, acceleration and guest image.
    Health,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM and start it.
    New(NewArgs),
    /// List VMs.
    #[command(visible_alias = "ls")]
    List,
    /// Show a VM's details and event history.
    Inspect(NameArg),
    /// Start a stopped VM.
    Start(NameArg),
    /// Stop a running VM (graceful shutdown).
    Stop(StopArgs),
    /// Stop and start a VM.
    Restart(NameArg),
    /// Delete a VM and its disk (stops it first).
    #[command(visible_alias = "rm")]
    Delete(NameArg),
    /// Print a VM's serial console or VMM log.
    Logs(LogsArgs),
    /// Run a command in a VM.
    Exec(ExecArgs),
    /// Copy a file into or out of a VM.
    Cp(CpArgs),
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// The VM's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// Name: lowercase letters, digits and hyphens, starting with a letter.
    pub name: String,
    /// Virtual CPUs: 1 or an even number up to 32.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Memory: MiB (e.g. 512) or with a unit (512M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub ram: Option<Size>,
    /// Root disk size: MiB or with a unit (10G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub rootfs_size: Option<Size>,
    /// Create the VM without starting it.
    #[arg(long)]
    pub no_start: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The VM's name.
    pub name: String,
    /// Seconds to wait for a graceful shutdown before the VM is killed.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogSource {
    /// The guest's serial console.
    Serial,
    /// The VMM's own log.
    Vmm,
}

impl LogSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Serial => "serial",
            LogSource::Vmm => "vmm",
        }
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The VM's name.
    pub name: String,
    /// Which log.
    #[arg(value_enum, default_value_t = LogSource::Serial)]
    pub source: LogSource,
    /// Keep printing new output as it arrives.
    #[arg(short, long)]
    pub follow: bool,
    /// Start with only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The VM's name.
    pub name: String,
    /// Forward this terminal's stdin to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal of this terminal's size (raw mode with -i).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VAL", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest (absolute).
    #[arg(short, long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// The command and its arguments, after `--` or the VM name.
    #[arg(
        value_name = "CMD",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// `NAME:/abs/path` in a VM, a local path, or `-` for stdin.
    pub src: String,
    /// `NAME:/abs/path` in a VM, a local path, or `-` for stdout.
    pub dst: String,
}

/// A bare integer is MiB and goes to the server as a number; anything else goes as text for
/// the server to check (`512M`, `2G`).
pub fn parse_size(s: &str) -> Result<Size, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("a size cannot be empty; use e.g. 512M or 2G".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Size::Mib)
            .map_err(|_| format!("`{s}` is too large"));
    }
    Ok(Size::Text(s.to_owned()))
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VAL, got `{s}`")),
    }
}

impl Command {
    /// The command and VM an error hint should talk about.
    pub fn hint_context(&self) -> HintContext {
        let name = |n: &String| Some(n.clone());
        let (action, vm) = match self {
            Command::Health => (Action::Health, None),
            Command::Exec(a) => (Action::Exec, name(&a.name)),
            Command::Cp(a) => (Action::Cp, cp_vm_name(a)),
            Command::Vm(vm) => match vm {
                VmCommand::New(a) => (Action::New, name(&a.name)),
                VmCommand::List => (Action::List, None),
                VmCommand::Inspect(a) => (Action::Inspect, name(&a.name)),
                VmCommand::Start(a) => (Action::Start, name(&a.name)),
                VmCommand::Stop(a) => (Action::Stop, name(&a.name)),
                VmCommand::Restart(a) => (Action::Restart, name(&a.name)),
                VmCommand::Delete(a) => (Action::Delete, name(&a.name)),
                VmCommand::Logs(a) => (Action::Logs, name(&a.name)),
                VmCommand::Exec(a) => (Action::Exec, name(&a.name)),
                VmCommand::Cp(a) => (Action::Cp, cp_vm_name(a)),
            },
        };
        HintContext { action, vm }
    }

    pub fn is_exec(&self) -> bool {
        matches!(self, Command::Exec(_) | Command::Vm(VmCommand::Exec(_)))
    }
}

fn cp_vm_name(args: &CpArgs) -> Option<String> {
    [&args.src, &args.dst].into_iter().find_map(|s| {
        crate::commands::cp::parse_endpoint(s)
            .ok()?
            .vm()
            .map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hearth").chain(args.iter().copied()))
    }

    #[test]
    fn global_options_and_defaults() {
        let cli = parse(&["vm", "list"]).unwrap();
        assert!(!cli.json);
        assert!(matches!(cli.command, Command::Vm(VmCommand::List)));
        let cli = parse(&["vm", "ls", "--json", "--url", "http://10.0.0.1:9"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.url, "http://10.0.0.1:9");
    }

    #[test]
    fn new_takes_sizes_as_numbers_or_text() {
        let cli = parse(&[
            "vm",
            "new",
            "demo",
            "--cpus",
            "2",
            "--ram",
            "2G",
            "--rootfs-size",
            "4096",
            "--no-start",
        ])
        .unwrap();
        let Command::Vm(VmCommand::New(a)) = cli.command else {
            panic!("not vm new")
        };
        assert_eq!(a.name, "demo");
        assert_eq!(a.cpus, Some(2));
        assert_eq!(a.ram, Some(Size::Text("2G".into())));
        assert_eq!(a.rootfs_size, Some(Size::Mib(4096)));
        assert!(a.no_start);
        assert!(parse(&["vm", "new", "demo", "--cpus", "two"]).is_err());
        assert!(parse(&["vm", "new", "demo", "--ram", ""]).is_err());
        assert!(parse(&["vm", "new"]).is_err());
    }

    #[test]
    fn exec_takes_the_command_after_dashes_or_the_name() {
        for args in [
            &[
                "exec", "demo", "-i", "-e", "A=1", "-e", "B=x=y", "-w", "/tmp", "--", "ls", "-la",
            ][..],
            &[
                "vm",
                "exec",
                "-i",
                "-e",
                "A=1",
                "--env",
                "B=x=y",
                "--workdir",
                "/tmp",
                "demo",
                "ls",
                "-la",
            ],
        ] {
            let cli = parse(args).unwrap();
            let (Command::Exec(a) | Command::Vm(VmCommand::Exec(a))) = cli.command else {
                panic!("not exec: {args:?}")
            };
            assert_eq!(a.name, "demo");
            assert!(a.interactive && !a.tty);
            assert_eq!(
                a.env,
                [("A".into(), "1".into()), ("B".into(), "x=y".into())]
            );
            assert_eq!(a.workdir.as_deref(), Some("/tmp"));
            assert_eq!(a.command, ["ls", "-la"]);
        }
        let cli = parse(&[
            "exec",
            "demo",
            "-it",
            "--timeout",
            "5",
            "sh",
            "-c",
            "echo -t",
        ])
        .unwrap();
        let Command::Exec(a) = cli.command else {
            panic!()
        };
        assert!(a.interactive && a.tty);
        assert_eq!(a.timeout, Some(5));
        assert_eq!(a.command, ["sh", "-c", "echo -t"]);
    }

    #[test]
    fn exec_needs_a_command_and_good_env() {
        let err = parse(&["exec", "demo"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["exec", "demo", "-e", "NOVALUE", "true"]).unwrap_err();
        assert!(err.to_string().contains("expected KEY=VAL"), "{err}");
        assert!(parse(&["exec", "demo", "-e", "=v", "true"]).is_err());
    }

    #[test]
    fn logs_source_and_flags() {
        let cli = parse(&["vm", "logs", "demo"]).unwrap();
        let Command::Vm(VmCommand::Logs(a)) = cli.command else {
            panic!()
        };
        assert_eq!(a.source, LogSource::Serial);
        assert!(!a.follow);
        let cli = parse(&["vm", "logs", "-f", "demo", "vmm", "--tail", "20"]).unwrap();
        let Command::Vm(VmCommand::Logs(a)) = cli.command else {
            panic!()
        };
        assert_eq!(
            (a.source, a.follow, a.tail),
            (LogSource::Vmm, true, Some(20))
        );
        assert!(parse(&["vm", "logs", "demo", "kernel"]).is_err());
    }

    #[test]
    fn stop_and_aliases() {
        let cli = parse(&["vm", "stop", "demo", "--timeout", "30"]).unwrap();
        let Command::Vm(VmCommand::Stop(a)) = cli.command else {
            panic!()
        };
        assert_eq!((a.name.as_str(), a.timeout), ("demo", Some(30)));
        assert!(matches!(
            parse(&["vm", "rm", "demo"]).unwrap().command,
            Command::Vm(VmCommand::Delete(_))
        ));
        assert!(matches!(
            parse(&["cp", "a", "demo:/b"]).unwrap().command,
            Command::Cp(_)
        ));
        assert!(matches!(
            parse(&["health"]).unwrap().command,
            Command::Health
        ));
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &["vm"][..],
            &["vm", "frobnicate"],
            &["cp", "only-one"],
            &["--bogus"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn hint_context_names_the_vm() {
        let cli = parse(&["cp", "./x", "demo:/tmp/x"]).unwrap();
        assert_eq!(cli.command.hint_context().vm.as_deref(), Some("demo"));
        let cli = parse(&["vm", "start", "web"]).unwrap();
        let ctx = cli.command.hint_context();
        assert_eq!(
            (ctx.action, ctx.vm.as_deref()),
            (Action::Start, Some("web"))
        );
        assert!(parse(&["exec", "a", "true"]).unwrap().command.is_exec());
    }
}

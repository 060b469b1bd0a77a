//! `hearth-guest`: the agent inside every Hearth VM.
//!
//! # What it does
//!
//! This binary travels in the initramfs hearthd hands QEMU at every boot, not on the VM's disk:
//! the initramfs mounts the root disk, copies the agent onto a tmpfs at the disk's `/run` and
//! `switch_root`s into `/run/hearth/hearth-guest`, so in a VM this binary starts as PID 1
//! ([`init`]), whatever the disk holds: it mounts the API filesystems, remounts `/`
//! read-write, sets the hostname from `hearth.hostname=` on the kernel command line, brings up
//! loopback and configures the NIC from `hearth.ip=`, `hearth.gw=` and `hearth.dns=` ([`net`]),
//! all with plain syscalls (every fork+exec costs tens of milliseconds under TCG). It
//! then forks: the child serves the host, and PID 1 stays a small loop that reaps orphans and
//! restarts the agent if it dies.
//!
//! The agent speaks the protocol of `hearth-guest-proto` (see its `PROTOCOL.md`) on the
//! virtio-serial port named [`hearth_guest_proto::PORT_NAME`] ([`transport`]). Requests are
//! dispatched by [`server`]: processes with streamed output, PTYs, signals and timeouts
//! ([`exec`]), file transfers ([`files`]), ping and shutdown. Every exchange runs concurrently and
//! all frames leave through one writer, so one slow exchange never holds up another.
//!
//! Outside a VM (tests, debugging) the same agent runs as an ordinary process:
//!
//! ```text
//! hearth-guest                 find the port by name under /sys/class/virtio-ports and serve it
//! hearth-guest --port PATH     serve the given character device
//! hearth-guest --unix PATH     connect to a unix stream socket and serve it; exit when it closes
//! hearth-guest --version       print the agent and protocol versions
//! ```
//!
//! # Trust model
//!
//! The host is trusted: it owns the VM, and whatever it asks for is done, as root, inside the
//! guest (any command, any file). The agent does not authenticate the host; the virtio-serial port
//! is reachable only from the VMM. The isolation boundary is the VM itself. The reverse does not
//! hold: the host treats everything this agent says as untrusted input, since guest code can
//! replace it.
//!
//! Diagnostics go to stderr (the serial console in a VM), prefixed `hearth-guest:`; per-request
//! chatter only with `--debug` or `hearth.debug` on the kernel command line.

#[macro_use]
mod log;
mod exec;
mod files;
mod init;
mod net;
mod server;
mod transport;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use hearth_guest_proto::PROTOCOL_VERSION;

/// How this process came to serve the host; decides what `shutdown` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Forked by [`init`] as PID 1's child: `shutdown` stops the machine.
    Init,
    /// Started by hand or by a test: `shutdown` only ends this process.
    Standalone,
}

/// Where the host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Find the virtio-serial port by name.
    Discover,
    /// A character device to open.
    Port(PathBuf),
    /// A unix stream socket to connect to.
    Unix(PathBuf),
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Serve { target: Target, debug: bool },
    Version,
    Help,
}

/// A command line that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ArgsError {
    #[error("unknown argument `{0}`")]
    Unknown(String),
    #[error("`{0}` needs a path")]
    MissingValue(&'static str),
    #[error("`--unix` and `--port` cannot be used together")]
    TwoTargets,
}

const USAGE: &str = "usage: hearth-guest [--unix PATH | --port PATH] [--debug]
       hearth-guest --version

Serves the Hearth guest protocol. Without --unix or --port it opens the virtio-serial port named
org.hearth.agent.0. Started as PID 1 it first initialises the guest and ignores its arguments.";

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, ArgsError> {
    let mut target = Target::Discover;
    let mut debug = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let flag = arg.to_string_lossy();
        match flag.as_ref() {
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "--debug" => debug = true,
            "--unix" | "--port" => {
                let name = if flag == "--unix" { "--unix" } else { "--port" };
                let path = PathBuf::from(args.next().ok_or(ArgsError::MissingValue(name))?);
                if target != Target::Discover {
                    return Err(ArgsError::TwoTargets);
                }
                target = if name == "--unix" {
                    Target::Unix(path)
                } else {
                    Target::Port(path)
                };
            }
            _ => return Err(ArgsError::Unknown(flag.into_owned())),
        }
    }
    Ok(Command::Serve { target, debug })
}

fn main() -> ExitCode {
    if nix::unistd::getpid().as_raw() == 1 {
        // Returns only in the forked agent child; PID 1 itself stays in the reaper loop.
        init::boot();
        return serve(Target::Discover, Role::Init);
    }
    match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Version) => {
            println!(
                "hearth-guest {} (protocol {PROTOCOL_VERSION})",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::SUCCESS
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Serve { target, debug }) => {
            if debug {
                log::enable_debug();
            }
            serve(target, Role::Standalone)
        }
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "hearth-guest: error: {err}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Opens the transport and serves the host until it goes away for good or asks for a shutdown.
fn serve(target: Target, role: Role) -> ExitCode {
    let boot_id = server::boot_id();
    let conn = match transport::open(&target) {
        Ok(conn) => conn,
        Err(err) => {
            log!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            log!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        let (inbound, link) = conn.start();
        server::serve(inbound, link, boot_id, role).await
    });
    // Exec tasks and blocking file operations may still be pending; nobody waits for them now.
    runtime.shutdown_background();
    match (outcome, role) {
        (server::Outcome::Shutdown(action), Role::Init) => init::power_off(action),
        (server::Outcome::Shutdown(_), Role::Standalone) | (server::Outcome::PeerClosed, _) => {
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, ArgsError> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn no_arguments_discover_the_port() {
        assert_eq!(
            parse(&[]),
            Ok(Command::Serve {
                target: Target::Discover,
                debug: false
            })
        );
    }

    #[test]
    fn targets_and_flags_are_parsed() {
        assert_eq!(
            parse(&["--unix", "/tmp/s", "--debug"]),
            Ok(Command::Serve {
                target: Target::Unix("/tmp/s".into()),
                debug: true
            })
        );
        assert_eq!(
            parse(&["--port", "/dev/vport0p1"]),
            Ok(Command::Serve {
                target: Target::Port("/dev/vport0p1".into()),
                debug: false
            })
        );
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
        assert_eq!(parse(&["-h"]), Ok(Command::Help));
    }

    #[test]
    fn bad_command_lines_are_refused() {
        assert_eq!(parse(&["--unix"]), Err(ArgsError::MissingValue("--unix")));
        assert_eq!(
            parse(&["--unix", "a", "--port", "b"]),
            Err(ArgsError::TwoTargets)
        );
        assert_eq!(parse(&["serve"]), Err(ArgsError::Unknown("serve".into())));
    }
}

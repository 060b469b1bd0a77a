//! Remote mode: the CLI as hearthd's SSH front end runs it, for a caller on another machine
//! (environment `HEARTH_REMOTE=1`, [`hearth_api::REMOTE_ENV`]). It runs on the host with
//! hearthd's rights, so it must do nothing the caller could not do through the API: it reads
//! and writes no file of the host (stdin and stdout stand for local files), talks only to the
//! `HEARTH_URL` hearthd gave it, and `exec` forwards stdin (the SSH channel's) always.

use crate::cli::{Cli, Command, VmCommand};
use crate::commands::cp::{Endpoint, Local, parse_endpoint};

/// True when hearthd's SSH front end runs this CLI.
pub fn active() -> bool {
    std::env::var_os(hearth_api::REMOTE_ENV).is_some_and(|v| v == "1")
}

/// What a remote caller may not ask for, as a usage error (exit 2); `Ok` after making `exec`
/// interactive.
pub fn restrict(cli: &mut Cli, env_url: Option<&str>) -> Result<(), String> {
    if env_url.is_none() || cli.url.as_deref() != env_url {
        return Err(
            "--url cannot be given over SSH: this CLI talks to the hearthd that runs it".into(),
        );
    }
    let local_file = |what: &str| {
        format!("over SSH, {what} cannot name a file of the host; use - (stdin or stdout) instead")
    };
    match &mut cli.command {
        Command::Exec(args) | Command::Vm(VmCommand::Exec(args)) => args.interactive = true,
        Command::Cp(args) | Command::Vm(VmCommand::Cp(args)) => {
            for arg in [&args.src, &args.dst] {
                if let Ok(Endpoint::Local(Local::Path(_))) = parse_endpoint(arg) {
                    return Err(format!(
                        "over SSH, cp copies between a VM and stdin or stdout: `{arg}` names a \
                         file of the host; write - for it (ssh … cp VM:/path - > file)"
                    ));
                }
            }
        }
        Command::Login(_) | Command::Logout => {
            return Err(
                "over SSH you are logged in already: your SSH key is your login (`whoami` shows it)"
                    .into(),
            );
        }
        Command::User(crate::cli::UserCommand::Create(args)) if args.ssh_key.is_some() => {
            return Err(local_file("--ssh-key"));
        }
        Command::User(crate::cli::UserCommand::SshKey(crate::cli::SshKeyCommand::Add(args)))
            if args.file != std::path::Path::new("-") =>
        {
            return Err(local_file("ssh-key add"));
        }
        Command::Export(args) if args.output.is_some() => {
            return Err(local_file("export -o"));
        }
        Command::Import(args)
            if args
                .file
                .as_deref()
                .is_some_and(|f| f != std::path::Path::new("-")) =>
        {
            return Err(local_file("import"));
        }
        Command::Vm(VmCommand::New(args)) => {
            if args
                .user_data
                .as_deref()
                .is_some_and(|f| f != std::path::Path::new("-"))
            {
                return Err(local_file("--user-data"));
            }
            if !args.ssh_keys.is_empty() {
                return Err(
                    "over SSH, --ssh-key cannot read key files of the host; add keys with \
                     `hearth vm new` on your machine, or put them in --user-data -"
                        .into(),
                );
            }
        }
        Command::Smoke(_) => {
            return Err(
                "hearth smoke is not available over SSH (it writes files on the host)".into(),
            );
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restricted(args: &[&str]) -> Result<Cli, String> {
        let argv = ["hearth", "--url", "unix:///s"].iter().chain(args).copied();
        let mut cli = Cli::parse_checked(argv).unwrap();
        restrict(&mut cli, Some("unix:///s")).map(|()| cli)
    }

    #[test]
    fn remote_callers_touch_no_host_file() {
        for args in [
            &["cp", "vm:/etc/passwd", "/tmp/x"][..],
            &["cp", "./secret", "vm:/x"],
            &["vm", "cp", "/etc/shadow", "vm:/x"],
            &["export", "vm", "-o", "/tmp/vm.tar"],
            &["import", "/tmp/vm.tar"],
            &["vm", "new", "x", "--user-data", "/etc/shadow"],
            &["vm", "new", "x", "--ssh-key", "/root/.ssh/id_ed25519.pub"],
            &["smoke"],
        ] {
            let err = restricted(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} passed"));
            assert!(err.contains("SSH"), "{args:?}: {err}");
        }
        for args in [
            &["cp", "vm:/etc/passwd", "-"][..],
            &["cp", "-", "vm:/x"],
            &["export", "vm"],
            &["import"],
            &["import", "-"],
            &["vm", "new", "x", "--user-data", "-"],
            &["vm", "list"],
        ] {
            assert!(restricted(args).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn the_url_is_hearthds_and_exec_forwards_stdin() {
        let mut cli =
            Cli::parse_checked(["hearth", "--url", "http://evil:80", "vm", "list"]).unwrap();
        let err = restrict(&mut cli, Some("unix:///s")).unwrap_err();
        assert!(err.contains("--url"), "{err}");
        let cli = restricted(&["exec", "vm", "--", "cat"]).unwrap();
        match cli.command {
            Command::Exec(args) => assert!(args.interactive),
            other => panic!("{other:?}"),
        }
    }
}

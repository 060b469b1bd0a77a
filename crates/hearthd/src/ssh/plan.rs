//! What the command account makes of a command's words: the SSH surface's own help, or the
//! argument vector of the `hearth` CLI that runs it (srv's verbs mapped onto the CLI's
//! commands). No I/O.

/// srv's verbs that are `hearth vm <verb>`.
const VM_VERBS: &[&str] = &[
    "new", "list", "inspect", "logs", "start", "stop", "restart", "pause", "resume", "delete",
    "resize", "egress",
];
/// Verbs that are the CLI's top-level command of the same name.
const TOP_VERBS: &[&str] = &[
    "exec", "cp", "backup", "restore", "export", "import", "volume", "network", "top",
    // The identity commands (users, keys, organizations, the audit log).
    "whoami", "audit", "user", "key",
    "org", // Secrets: a value comes from stdin (the channel's), never from the command.
    "secret",
];

/// The SSH surface's commands, as `help` lists them.
const COMMANDS: &[(&str, &str)] = &[
    (
        "new NAME [--cpus N] [--ram SIZE] [--rootfs-size SIZE]",
        "create a VM and start it",
    ),
    ("list", "list the VMs you can see"),
    ("inspect NAME", "show a VM's details and event history"),
    (
        "logs NAME [serial|vmm] [-f] [--tail N]",
        "print (or follow) a VM's serial console or VMM log",
    ),
    (
        "top [--interval SECS]",
        "live table of the VMs (run with ssh -t; q quits)",
    ),
    ("start NAME", "start a stopped VM"),
    (
        "stop NAME [--timeout SECS]",
        "stop a running VM (graceful shutdown)",
    ),
    ("restart NAME", "stop and start a VM"),
    ("pause NAME", "pause a running VM's vCPUs"),
    ("resume NAME", "resume a paused VM"),
    ("delete NAME", "delete a VM and its disk"),
    (
        "resize NAME [--cpus N] [--ram SIZE] [--rootfs-size SIZE]",
        "change a stopped VM's shape (the disk only grows)",
    ),
    ("egress NAME FLAGS", "set what a VM may reach outside"),
    (
        "exec NAME [-t] [-e K=V] [-w DIR] -- CMD...",
        "run a command in a VM; stdin, stdout, stderr and the exit code pass through",
    ),
    (
        "cp NAME:/PATH - | cp - NAME:/PATH",
        "copy a file out of a VM to stdout, or into it from stdin",
    ),
    (
        "backup create|list|delete NAME [ID]",
        "back up a stopped VM's disk, list or delete its backups",
    ),
    (
        "restore NAME ID",
        "put a backup in place of a stopped VM's disk",
    ),
    (
        "export NAME",
        "write a stopped VM to stdout as a tar archive",
    ),
    (
        "import",
        "make a VM of an archive read from stdin (ssh A export vm | ssh B import)",
    ),
    (
        "volume create|list|delete|attach|detach ...",
        "named extra disks",
    ),
    (
        "network create|list|delete|connect|disconnect ...",
        "private networks of VMs",
    ),
    (
        "status",
        "host status: version, capacity, VMs, guest image, networking",
    ),
    ("whoami", "who you are logged in as"),
    ("audit", "read the audit log (admins)"),
    (
        "user | key | org ...",
        "users, their keys and organizations",
    ),
    (
        "secret set NAME | list | delete NAME | rotate-master-key",
        "secrets of your organization (set reads the value from stdin: ssh … secret set NAME < file)",
    ),
    ("help [COMMAND]", "this list, or a command's options"),
];

/// What to do with a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Print the SSH surface's command list; exit 0.
    Help,
    /// Run the CLI with these arguments.
    Cli(Vec<String>),
}

/// A command the surface does not take (exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown command `{0}`")]
    UnknownVerb(String),
    #[error("unknown option `{0}` before the command; the only option there is --json")]
    UnknownOption(String),
}

/// The CLI arguments (after the program name) for `words`.
pub fn plan(words: &[String]) -> Result<Plan, PlanError> {
    let mut json = false;
    let mut rest = words;
    while let Some((first, tail)) = rest.split_first() {
        match first.as_str() {
            "--json" => json = true,
            "-h" | "--help" => return Ok(Plan::Help),
            other if other.starts_with('-') => {
                return Err(PlanError::UnknownOption(other.to_owned()));
            }
            _ => break,
        }
        rest = tail;
    }
    let Some((verb, args)) = rest.split_first() else {
        return Ok(Plan::Help);
    };
    let mut argv: Vec<String> = Vec::with_capacity(words.len() + 2);
    if json {
        argv.push("--json".into());
    }
    if verb == "help" {
        return match args.first() {
            None => Ok(Plan::Help),
            Some(topic) => {
                argv.extend(command_of(topic)?);
                argv.push("--help".into());
                Ok(Plan::Cli(argv))
            }
        };
    }
    argv.extend(command_of(verb)?);
    argv.extend(args.iter().cloned());
    Ok(Plan::Cli(argv))
}

/// True when `--json` comes among the options before the command.
pub fn wants_json(words: &[String]) -> bool {
    words
        .iter()
        .take_while(|w| w.starts_with('-'))
        .any(|w| w == "--json")
}

/// The CLI command a verb stands for.
fn command_of(verb: &str) -> Result<Vec<String>, PlanError> {
    if VM_VERBS.contains(&verb) {
        Ok(vec!["vm".into(), verb.into()])
    } else if TOP_VERBS.contains(&verb) {
        Ok(vec![verb.into()])
    } else if verb == "status" {
        Ok(vec!["health".into()])
    } else {
        Err(PlanError::UnknownVerb(verb.to_owned()))
    }
}

/// The `help` text: every command with one line about it, and how to reach a VM. `user` is the
/// command account's name and `target` how a client reaches this server (`-p 2222 HOST`).
pub fn help_text(user: &str, target: &str) -> String {
    let width = COMMANDS.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    let mut out = format!(
        "Hearth over SSH: ssh {target_user} COMMAND runs one command and exits with its status.\n\
         Put --json before the command for JSON (with OpenSSH: ssh {target_user} -- --json list).\n\n\
         Commands:\n",
        target_user = target_for(user, target)
    );
    for (command, what) in COMMANDS {
        out.push_str(&format!("  {command:<width$}  {what}\n"));
    }
    out.push_str(&format!(
        "\nA shell in a VM: ssh {vm}; one command there: ssh {vm} -- CMD;\n\
         files: sftp or scp with {vm} (when the guest has an sftp server).\n",
        vm = target_for("VM", target)
    ));
    out
}

/// `USER@HOST` with the port options `target` carries, as a client types it:
/// `-p 2222 hearth@127.0.0.1`.
pub fn target_for(user: &str, target: &str) -> String {
    match target.rsplit_once(' ') {
        Some((options, host)) => format!("{options} {user}@{host}"),
        None => format!("{user}@{target}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(words: &[&str]) -> Vec<String> {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        match plan(&words) {
            Ok(Plan::Cli(argv)) => argv,
            other => panic!("{words:?}: {other:?}"),
        }
    }

    #[test]
    fn srv_verbs_map_onto_the_cli() {
        assert_eq!(cli(&["list"]), ["vm", "list"]);
        assert_eq!(
            cli(&["new", "web", "--cpus", "2"]),
            ["vm", "new", "web", "--cpus", "2"]
        );
        for verb in VM_VERBS {
            assert_eq!(cli(&[verb, "x"]), ["vm", verb, "x"]);
        }
        for verb in TOP_VERBS {
            assert_eq!(cli(&[verb, "x"]), [*verb, "x"]);
        }
        assert_eq!(
            cli(&["exec", "vm", "--", "sh", "-c", "exit 7"]),
            ["exec", "vm", "--", "sh", "-c", "exit 7"]
        );
        assert_eq!(cli(&["status"]), ["health"]);
        assert_eq!(cli(&["backup", "create", "vm"]), ["backup", "create", "vm"]);
    }

    #[test]
    fn json_goes_before_the_command() {
        assert_eq!(cli(&["--json", "list"]), ["--json", "vm", "list"]);
        assert_eq!(
            cli(&["--json", "--json", "inspect", "a"]),
            ["--json", "vm", "inspect", "a"]
        );
        // After the verb it is the command's own argument, as the CLI takes it.
        assert_eq!(cli(&["list", "--json"]), ["vm", "list", "--json"]);
    }

    #[test]
    fn help_is_ours_and_help_of_a_command_is_the_clis() {
        let none: Vec<String> = Vec::new();
        assert_eq!(plan(&none), Ok(Plan::Help));
        for words in [&["help"][..], &["--help"], &["-h"], &["--json"]] {
            let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
            assert_eq!(plan(&words), Ok(Plan::Help), "{words:?}");
        }
        assert_eq!(cli(&["help", "new"]), ["vm", "new", "--help"]);
        assert_eq!(cli(&["help", "status"]), ["health", "--help"]);
    }

    #[test]
    fn unknown_verbs_and_options_are_named() {
        let words = |w: &[&str]| w.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(
            plan(&words(&["frobnicate", "x"])),
            Err(PlanError::UnknownVerb("frobnicate".into()))
        );
        assert_eq!(
            plan(&words(&["help", "frobnicate"])),
            Err(PlanError::UnknownVerb("frobnicate".into()))
        );
        // hearth's own commands that srv does not have are not reachable either.
        for verb in ["smoke", "health", "vm"] {
            assert_eq!(
                plan(&words(&[verb])),
                Err(PlanError::UnknownVerb(verb.into()))
            );
        }
        assert_eq!(
            plan(&words(&["--url", "http://x", "list"])),
            Err(PlanError::UnknownOption("--url".into()))
        );
        let message = plan(&words(&["nope"])).unwrap_err().to_string();
        assert_eq!(message, "unknown command `nope`");
        assert!(wants_json(&words(&["--json", "nope"])));
        assert!(!wants_json(&words(&["nope", "--json"])));
    }

    #[test]
    fn help_lists_every_verb() {
        let text = help_text("hearth", "-p 2222 127.0.0.1");
        assert!(
            text.contains("ssh -p 2222 hearth@127.0.0.1 COMMAND"),
            "{text}"
        );
        assert!(text.contains("ssh -p 2222 VM@127.0.0.1"), "{text}");
        for verb in VM_VERBS.iter().chain(TOP_VERBS).chain(&["status", "help"]) {
            let listed = text
                .lines()
                .any(|l| l.trim_start().split([' ', '|']).any(|w| w == *verb));
            assert!(listed, "help does not list {verb}:\n{text}");
        }
        assert_eq!(target_for("hearth", "example.com"), "hearth@example.com");
    }
}

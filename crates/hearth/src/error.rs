//! The CLI's one error type, its exit codes and how it is rendered (`error:` then `hint:` lines,
//! the way uv prints them), with hints chosen from the error code and the command that failed.

use std::fmt;

use hearth_api::{EXIT_UNREACHABLE, ErrorBody, ErrorCode};
use serde_json::{Value, json};

/// Everything that can make a `hearth` command fail.
#[derive(Debug)]
pub enum CliError {
    /// An error body: from hearthd, or made locally for bad input so it prints the same way.
    Api {
        /// `None` when hearthd sent a code this CLI does not know (a newer server).
        code: Option<ErrorCode>,
        message: String,
        /// The body exactly as hearthd sent it, printed by `--json`.
        raw: Option<Value>,
    },
    /// hearthd could not be reached at all.
    Unreachable { url: String, reason: String },
    /// A local failure (I/O, an unexpected answer) that is not an API error.
    Local {
        /// Short machine-readable kind for `--json`, e.g. `io_error`, `protocol_error`.
        kind: &'static str,
        message: String,
        hint: Option<String>,
    },
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

impl CliError {
    /// An error for input the CLI rejects before asking hearthd (exit code 2 for these codes).
    pub fn input(code: ErrorCode, message: impl Into<String>) -> Self {
        CliError::Api {
            code: Some(code),
            message: message.into(),
            raw: None,
        }
    }

    pub fn from_body(body: ErrorBody, raw: Option<Value>) -> Self {
        CliError::Api {
            code: Some(body.error),
            message: body.message,
            raw,
        }
    }

    pub fn io(context: impl fmt::Display, err: &std::io::Error) -> Self {
        CliError::Local {
            kind: "io_error",
            message: format!("{context}: {err}"),
            hint: None,
        }
    }

    pub fn protocol(message: impl Into<String>) -> Self {
        CliError::Local {
            kind: "protocol_error",
            message: message.into(),
            hint: None,
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CliError::Api { code, .. } => *code,
            _ => None,
        }
    }

    /// The exit code of every command but `exec` (which always ends with 125 on its own failure).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { code: Some(c), .. } => c.exit_code(),
            CliError::Api { code: None, .. } | CliError::Local { .. } => 1,
            CliError::Unreachable { .. } => EXIT_UNREACHABLE,
        }
    }

    pub fn message(&self) -> String {
        match self {
            CliError::Api { message, .. } | CliError::Local { message, .. } => message.clone(),
            CliError::Unreachable { reason, .. } => format!("cannot reach hearthd: {reason}"),
        }
    }

    /// What `--json` prints: the API's error body as received, or one of the same shape.
    pub fn json(&self) -> Value {
        match self {
            CliError::Api { raw: Some(raw), .. } => raw.clone(),
            CliError::Api { code, message, .. } => json!({
                "error": code.map_or("unknown", ErrorCode::as_str),
                "message": message,
            }),
            CliError::Unreachable { url, reason } => json!({
                "error": "unreachable",
                "message": format!("cannot reach hearthd at {url}: {reason}"),
            }),
            CliError::Local { kind, message, .. } => json!({
                "error": kind,
                "message": message,
            }),
        }
    }

    /// Hints for people, most useful first.
    pub fn hints(&self, ctx: &HintContext) -> Vec<String> {
        match self {
            CliError::Api {
                code: Some(code), ..
            } => hint_for(*code, ctx).into_iter().collect(),
            CliError::Api { code: None, .. } => Vec::new(),
            CliError::Unreachable { url, .. } => vec![format!(
                "is hearthd running at {url}? Start it with `make run`, or set HEARTH_URL \
                 (or --url) to where it listens"
            )],
            CliError::Local { hint, .. } => hint.iter().cloned().collect(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

/// The command an error happened in, so hints can name the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Health,
    New,
    List,
    Inspect,
    Start,
    Stop,
    Restart,
    Pause,
    Resume,
    Delete,
    Logs,
    Exec,
    Cp,
    Egress,
    Resize,
    BackupCreate,
    BackupList,
    BackupDelete,
    Restore,
    Export,
    Import,
    Smoke,
    Top,
    NetworkCreate,
    NetworkList,
    NetworkDelete,
    NetworkConnect,
    NetworkDisconnect,
    VolumeCreate,
    VolumeList,
    VolumeDelete,
    VolumeAttach,
    VolumeDetach,
    /// Logins, users, keys, organizations and the audit log.
    Access,
    /// Secrets and the master key.
    Secret,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HintContext {
    pub action: Action,
    pub vm: Option<String>,
    /// The private network the command names, when it names one.
    pub network: Option<String>,
}

#[cfg(test)]
impl HintContext {
    pub fn new(action: Action, vm: Option<&str>) -> Self {
        HintContext {
            action,
            vm: vm.map(str::to_owned),
            network: None,
        }
    }

    pub fn with_network(mut self, network: &str) -> Self {
        self.network = Some(network.to_owned());
        self
    }
}

fn hint_for(code: ErrorCode, ctx: &HintContext) -> Option<String> {
    let vm = ctx.vm.as_deref().unwrap_or("NAME");
    let network = ctx.network.as_deref().unwrap_or("NETWORK");
    let hint = match code {
        ErrorCode::VmNotFound => "`hearth vm list` shows the VMs".to_owned(),
        ErrorCode::Unauthenticated => "keep a valid API key with `hearth login` (or set \
             HEARTH_API_KEY); an admin makes one with `hearth key create --user NAME`"
            .to_owned(),
        ErrorCode::PermissionDenied => "`hearth whoami` shows who you are and where you act".to_owned(),
        ErrorCode::RateLimited => "wait, then try again with a valid key".to_owned(),
        ErrorCode::UserNotFound => "`hearth user list` shows the users (host admins)".to_owned(),
        ErrorCode::OrgNotFound => "`hearth org list` shows your organizations".to_owned(),
        ErrorCode::KeyNotFound => match ctx.action {
            Action::Access => "`hearth key list` or `hearth user ssh-key list USER` shows the keys".to_owned(),
            _ => return None,
        },
        ErrorCode::SecretNotFound => {
            "`hearth secret list` shows the secrets of the organization you act in (`hearth whoami`)"
                .to_owned()
        }
        ErrorCode::NameTaken => "choose another name".to_owned(),
        ErrorCode::VmNameTaken if ctx.action == Action::Import => "an import keeps the VM's name: \
             delete or rename the VM of that name here first (`hearth vm list`)"
            .to_owned(),
        ErrorCode::BackupNotFound => format!("`hearth backup list {vm}` shows its backups"),
        ErrorCode::InvalidState => match ctx.action {
            Action::Start => {
                format!("it may already be running; `hearth vm inspect {vm}` shows its state")
            }
            Action::Stop => {
                format!("it may already be stopped; `hearth vm inspect {vm}` shows its state")
            }
            Action::Pause => format!(
                "only a running VM pauses; `hearth vm inspect {vm}` shows its state"
            ),
            Action::Resume => format!(
                "only a paused VM resumes; `hearth vm inspect {vm}` shows its state"
            ),
            Action::Exec | Action::Cp => format!(
                "start it with `hearth vm start {vm}`, or resume it with `hearth vm resume {vm}` when it is paused"
            ),
            Action::Resize => format!("stop it with `hearth vm stop {vm}`, then resize it"),
            Action::BackupCreate => format!("stop it with `hearth vm stop {vm}`, then back it up"),
            Action::Restore => format!("stop it with `hearth vm stop {vm}`, then restore it"),
            Action::Export => format!("stop it with `hearth vm stop {vm}`, then export it"),
            Action::VolumeAttach | Action::VolumeDetach => {
                format!("stop it with `hearth vm stop {vm}` first; volumes change only while it is stopped")
            }
            Action::Delete
            | Action::Restart
            | Action::Egress
            | Action::NetworkConnect
            | Action::NetworkDisconnect => {
                format!("`hearth vm inspect {vm}` shows its state and recent events")
            }
            _ => format!("start it with `hearth vm start {vm}`"),
        },
        ErrorCode::VmBusy => {
            format!("another operation on {vm} is in progress; try again when it has finished")
        }
        ErrorCode::GuestUnavailable => format!(
            "the VM may still be booting: try again in a few seconds, or check \
             `hearth vm logs {vm}`"
        ),
        ErrorCode::GuestTimeout => {
            format!("the guest did not answer in time; `hearth vm logs {vm}` shows its console")
        }
        ErrorCode::VmNameTaken => {
            format!("choose another name, or remove the existing VM with `hearth vm delete {vm}`")
        }
        ErrorCode::NetworkNotFound => format!(
            "list networks with `hearth network list`; create it with \
             `hearth network create {network}`"
        ),
        ErrorCode::NetworkNameTaken => "choose another name, or use the existing network \
             (`hearth network list` shows its members)"
            .to_owned(),
        ErrorCode::NetworkInUse => format!(
            "disconnect its members first (`hearth network disconnect {network} VM`); \
             `hearth network list` shows them"
        ),
        ErrorCode::NetworkFailed => "`hearth health` shows the networking helper's state; \
             hearthd's log has the details"
            .to_owned(),
        ErrorCode::InvalidCpus => "use 1 or an even number of vCPUs up to 32".to_owned(),
        ErrorCode::InvalidRootfsSize if ctx.action == Action::Resize => {
            format!(
                "a root disk only grows, and sizes are MiB or with a unit (e.g. 20G); \
                 `hearth vm inspect {vm}` shows its size now"
            )
        }
        ErrorCode::InvalidRam | ErrorCode::InvalidRootfsSize => {
            "give sizes as MiB (e.g. 512) or with a unit (e.g. 512M, 2G)".to_owned()
        }
        ErrorCode::InvalidPath
            if matches!(ctx.action, Action::New | Action::VolumeAttach) =>
        {
            "mount paths are absolute, e.g. /data".to_owned()
        }
        ErrorCode::InvalidPath => "guest paths are absolute, e.g. `demo:/root/file`".to_owned(),
        ErrorCode::InvalidArchive => "`hearth import` takes what `hearth export` wrote, whole; \
             nothing of this archive was kept"
            .to_owned(),
        ErrorCode::InvalidSize => {
            "give sizes as MiB (e.g. 512) or with a unit (e.g. 10G), within hearthd's volumes.max_size"
                .to_owned()
        }
        ErrorCode::VolumeNotFound => match ctx.action {
            Action::VolumeDetach => format!("`hearth vm inspect {vm}` shows its volumes"),
            _ => "`hearth volume list` shows the volumes; `hearth volume create NAME --size SIZE` makes one"
                .to_owned(),
        },
        ErrorCode::VolumeNameTaken => {
            "choose another name; `hearth volume list` shows the volumes".to_owned()
        }
        ErrorCode::VolumeInUse => "`hearth volume list` shows where each volume is attached; \
             detach it with `hearth volume detach VM VOLUME` while that VM is stopped"
            .to_owned(),
        ErrorCode::ImageUnavailable => {
            "the guest image may still be building; `hearth health` shows when it is ready"
                .to_owned()
        }
        ErrorCode::VmmFailed => format!("`hearth vm logs {vm} vmm` shows the VMM's log"),
        ErrorCode::ResourceExhausted => "free disk space or memory on the host".to_owned(),
        ErrorCode::InsufficientCapacity => {
            "`hearth health` shows the host's capacity and what VMs have committed".to_owned()
        }
        ErrorCode::Internal => "hearthd's log has the details".to_owned(),
        ErrorCode::NotFound => {
            "hearthd does not know this endpoint; is it the same version as this CLI?".to_owned()
        }
        ErrorCode::OperationTimeout => {
            format!("`hearth vm inspect {vm}` shows the state and events as the operation goes on")
        }
        ErrorCode::MethodNotAllowed => {
            "hearthd does not take this request here; is it the same version as this CLI?"
                .to_owned()
        }
        ErrorCode::ForbiddenHost => {
            "point HEARTH_URL (or --url) at hearthd's listen address or its unix socket, or add \
             the name to hearthd's server.allowed_hosts"
                .to_owned()
        }
        ErrorCode::ForbiddenOrigin => {
            "web pages may call hearthd only from origins in its server.allowed_origins".to_owned()
        }
        ErrorCode::RequestTooLarge => {
            "copy large inputs in with `hearth cp`, or stream them with `hearth exec -i`".to_owned()
        }
        ErrorCode::Overloaded => "hearthd is busy; try again in a moment (its server.max_requests \
             and server.max_streams set the limits)"
            .to_owned(),
        ErrorCode::CommandNotFound => {
            "check the name; the default guest is Debian bookworm minbase, without most tools"
                .to_owned()
        }
        // The server's message already states the rule.
        ErrorCode::InvalidName
        | ErrorCode::InvalidRequest
        | ErrorCode::InvalidCommand
        | ErrorCode::GuestFileNotFound
        | ErrorCode::GuestError => return None,
    };
    Some(hint)
}

/// The error as printed to stderr in human mode: `error: …` then `hint: …` lines.
pub fn render(err: &CliError, ctx: &HintContext, color: bool) -> String {
    let (red, cyan, reset) = if color {
        ("\x1b[1;31m", "\x1b[1;36m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    // Messages can quote a guest (a serial console, an agent's error): escaped for the terminal.
    let mut out = format!(
        "{red}error{reset}: {}\n",
        crate::render::terminal_safe(&err.message())
    );
    for hint in err.hints(ctx) {
        let hint = crate::render::terminal_safe(&hint);
        out.push_str(&format!("{cyan}hint{reset}: {hint}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: ErrorCode, message: &str) -> CliError {
        CliError::from_body(
            ErrorBody {
                error: code,
                message: message.into(),
            },
            None,
        )
    }

    #[test]
    fn vm_not_found_points_at_list() {
        let err = api(ErrorCode::VmNotFound, "no VM is named `demo`");
        let ctx = HintContext::new(Action::Inspect, Some("demo"));
        assert_eq!(
            render(&err, &ctx, false),
            "error: no VM is named `demo`\nhint: `hearth vm list` shows the VMs\n"
        );
        assert_eq!(err.exit_code(), 3);
    }

    #[test]
    fn invalid_state_hint_depends_on_the_command() {
        let err = api(ErrorCode::InvalidState, "vm demo is stopped");
        let exec = render(&err, &HintContext::new(Action::Exec, Some("demo")), false);
        assert!(
            exec.contains("hint: start it with `hearth vm start demo`"),
            "{exec}"
        );
        let start = render(&err, &HintContext::new(Action::Start, Some("demo")), false);
        assert!(start.contains("may already be running"), "{start}");
        let stop = render(&err, &HintContext::new(Action::Stop, Some("demo")), false);
        assert!(stop.contains("may already be stopped"), "{stop}");
        assert_eq!(err.exit_code(), 4);
    }

    #[test]
    fn guest_unavailable_says_the_vm_may_be_booting() {
        let err = api(
            ErrorCode::GuestUnavailable,
            "the guest agent is not reachable",
        );
        let text = render(&err, &HintContext::new(Action::Exec, Some("demo")), false);
        assert!(text.starts_with("error: the guest agent is not reachable\n"));
        assert!(text.contains("hint: the VM may still be booting"), "{text}");
    }

    #[test]
    fn unreachable_names_the_url_and_make_run() {
        let err = CliError::Unreachable {
            url: "http://127.0.0.1:7070".into(),
            reason: "connection refused".into(),
        };
        let text = render(&err, &HintContext::new(Action::List, None), false);
        assert_eq!(
            text,
            "error: cannot reach hearthd: connection refused\n\
             hint: is hearthd running at http://127.0.0.1:7070? Start it with `make run`, or set \
             HEARTH_URL (or --url) to where it listens\n"
        );
        assert!(text.contains("HEARTH_URL"), "{text}");
        assert_eq!(err.exit_code(), hearth_api::EXIT_UNREACHABLE);
        assert_eq!(err.json()["error"], "unreachable");
    }

    #[test]
    fn errors_without_a_hint_print_one_line() {
        let err = api(ErrorCode::GuestFileNotFound, "no file /nope in the guest");
        let text = render(&err, &HintContext::new(Action::Cp, Some("demo")), false);
        assert_eq!(text, "error: no file /nope in the guest\n");
    }

    #[test]
    fn color_wraps_only_the_labels() {
        let err = api(ErrorCode::VmNotFound, "gone");
        let text = render(&err, &HintContext::new(Action::Inspect, None), true);
        assert!(text.starts_with("\x1b[1;31merror\x1b[0m: gone\n"));
        assert!(text.contains("\x1b[1;36mhint\x1b[0m: "));
    }

    #[test]
    fn json_is_the_raw_body_when_there_is_one() {
        let raw = json!({"error": "vm_not_found", "message": "nope", "extra": 1});
        let err = CliError::from_body(
            ErrorBody {
                error: ErrorCode::VmNotFound,
                message: "nope".into(),
            },
            Some(raw.clone()),
        );
        assert_eq!(err.json(), raw);
        let local = CliError::input(ErrorCode::InvalidPath, "bad path");
        assert_eq!(
            local.json(),
            json!({"error": "invalid_path", "message": "bad path"})
        );
        assert_eq!(local.exit_code(), 2);
    }

    #[test]
    fn messages_are_escaped_for_the_terminal() {
        let err = api(
            ErrorCode::VmmFailed,
            "boot failed; serial console ends with: \x1b[2J\x1b]0;owned\x07",
        );
        let text = render(&err, &HintContext::new(Action::Start, Some("demo")), false);
        assert!(
            text.starts_with(
                "error: boot failed; serial console ends with: \\x1b[2J\\x1b]0;owned\\x07\n"
            ),
            "{text:?}"
        );
        // --json keeps the message as it came (JSON escapes it).
        assert!(err.json()["message"].as_str().unwrap().contains('\x1b'));
    }

    #[test]
    fn network_errors_name_the_next_command() {
        let ctx = HintContext::new(Action::NetworkConnect, Some("web")).with_network("backend");
        let err = api(ErrorCode::NetworkNotFound, "no network is named `backend`");
        assert_eq!(
            render(&err, &ctx, false),
            "error: no network is named `backend`\n\
             hint: list networks with `hearth network list`; create it with \
             `hearth network create backend`\n"
        );
        assert_eq!(err.exit_code(), 3);
        // `vm new --network a --network b`: which one is missing, the message says.
        let text = render(&err, &HintContext::new(Action::New, Some("web")), false);
        assert!(text.contains("`hearth network create NETWORK`"), "{text}");

        let ctx = HintContext::new(Action::NetworkDelete, None).with_network("backend");
        let err = api(ErrorCode::NetworkInUse, "network `backend` has 2 members");
        assert_eq!(
            render(&err, &ctx, false),
            "error: network `backend` has 2 members\n\
             hint: disconnect its members first (`hearth network disconnect backend VM`); \
             `hearth network list` shows them\n"
        );
        assert_eq!(err.exit_code(), 4);

        let err = api(
            ErrorCode::NetworkNameTaken,
            "a network named `backend` exists",
        );
        let text = render(&err, &ctx, false);
        assert!(text.contains("hint: choose another name"), "{text}");
        assert_eq!(err.exit_code(), 4);

        let err = api(
            ErrorCode::NetworkFailed,
            "the networking helper is not reachable",
        );
        let text = render(&err, &HintContext::new(Action::New, Some("web")), false);
        assert!(
            text.ends_with(
                "hint: `hearth health` shows the networking helper's state; hearthd's log has \
                 the details\n"
            ),
            "{text}"
        );
        assert_eq!(err.exit_code(), 5);

        let err = api(ErrorCode::InvalidState, "vm web is deleting");
        let text = render(&err, &HintContext::new(Action::Egress, Some("web")), false);
        assert!(
            text.contains("hint: `hearth vm inspect web` shows its state"),
            "{text}"
        );
    }

    /// Every code, in every command: the hints print on `hint:` lines, and each `hearth …`
    /// command a hint names is one this CLI has.
    #[test]
    fn every_hint_names_real_commands() {
        use clap::Parser;
        use clap::error::ErrorKind;

        let actions = [
            Action::Health,
            Action::New,
            Action::List,
            Action::Inspect,
            Action::Start,
            Action::Stop,
            Action::Restart,
            Action::Pause,
            Action::Resume,
            Action::Delete,
            Action::Logs,
            Action::Exec,
            Action::Cp,
            Action::Egress,
            Action::Resize,
            Action::BackupCreate,
            Action::BackupList,
            Action::BackupDelete,
            Action::Restore,
            Action::Export,
            Action::Import,
            Action::Smoke,
            Action::Top,
            Action::NetworkCreate,
            Action::NetworkList,
            Action::NetworkDelete,
            Action::NetworkConnect,
            Action::NetworkDisconnect,
            Action::VolumeCreate,
            Action::VolumeList,
            Action::VolumeDelete,
            Action::VolumeAttach,
            Action::VolumeDetach,
        ];
        let mut commands_seen = 0;
        for &code in ErrorCode::ALL {
            for action in actions {
                for ctx in [
                    HintContext::new(action, None),
                    HintContext::new(action, Some("demo")).with_network("backend"),
                ] {
                    let err = api(code, "it failed");
                    assert_ne!(err.exit_code(), 0, "{code}");
                    let text = render(&err, &ctx, false);
                    assert!(text.starts_with("error: it failed\n"), "{code}: {text}");
                    for line in text.lines().skip(1) {
                        assert!(line.starts_with("hint: "), "{code}: {text}");
                    }
                    for hint in err.hints(&ctx) {
                        for quoted in hint.split('`').skip(1).step_by(2) {
                            let Some(args) = quoted.strip_prefix("hearth ") else {
                                continue;
                            };
                            commands_seen += 1;
                            let argv = std::iter::once("hearth").chain(args.split_whitespace());
                            if let Err(e) = crate::cli::Cli::try_parse_from(argv) {
                                // A hint may leave out what the reader fills in, nothing more.
                                assert_eq!(
                                    e.kind(),
                                    ErrorKind::MissingRequiredArgument,
                                    "{code} names `{quoted}`: {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(commands_seen > 100, "{commands_seen}");
    }

    #[test]
    fn unknown_codes_exit_1() {
        let err = CliError::Api {
            code: None,
            message: "something new".into(),
            raw: Some(json!({"error": "brand_new", "message": "something new"})),
        };
        assert_eq!(err.exit_code(), 1);
        assert!(err.hints(&HintContext::new(Action::List, None)).is_empty());
    }
}

//! What a create or an egress change sends, made from flags and local files: the request
//! bodies (pure functions of the arguments), user data and SSH public keys.

use std::io::Read;
use std::path::Path;

use hearth_api::{CreateVmRequest, EgressRequest, ErrorCode};

use crate::cli::{EgressFlags, NewArgs};
use crate::error::{CliError, Result};

/// The egress policy the flags ask for; `None` when no egress flag was given (hearthd's
/// default then applies). Allow lists without `--egress-mode` go without a mode: hearthd takes
/// them as `deny_all`.
pub fn egress_request(flags: &EgressFlags) -> Option<EgressRequest> {
    if flags.is_empty() {
        return None;
    }
    Some(EgressRequest {
        mode: flags.egress_mode.map(Into::into),
        allow_cidrs: flags.egress_allow_cidr.clone(),
        deny_cidrs: flags.egress_deny_cidr.clone(),
        allow_ports: flags.egress_allow_port.clone(),
        allow_domains: flags.egress_allow_domain.clone(),
    })
}

/// The body of `POST /v1/vms` for `vm new`, given the user data and keys already read.
pub fn create_request(
    args: &NewArgs,
    user_data: Option<String>,
    ssh_authorized_keys: Vec<String>,
) -> CreateVmRequest {
    CreateVmRequest {
        name: args.name.clone(),
        cpus: args.cpus,
        ram: args.ram.clone(),
        rootfs_size: args.rootfs_size.clone(),
        start: args.no_start.then_some(false),
        networks: args.networks.clone(),
        egress: egress_request(&args.egress),
        user_data,
        ssh_authorized_keys,
        volumes: args.volumes.clone(),
    }
}

/// Reads what `vm new` sends from local files, then makes its body.
pub fn read_create_request(args: &NewArgs) -> Result<CreateVmRequest> {
    let user_data = match &args.user_data {
        Some(path) => Some(read_user_data(path)?),
        None => None,
    };
    let mut keys = Vec::new();
    for path in &args.ssh_keys {
        keys.extend(read_ssh_keys(path)?);
    }
    Ok(create_request(args, user_data, keys))
}

/// `--user-data FILE` (`-`: stdin) as text.
fn read_user_data(path: &Path) -> Result<String> {
    let (shown, bytes) = if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| CliError::io("cannot read --user-data from stdin", &e))?;
        ("stdin".to_owned(), bytes)
    } else {
        let bytes = std::fs::read(path)
            .map_err(|e| CliError::io(format!("cannot read --user-data {}", path.display()), &e))?;
        (path.display().to_string(), bytes)
    };
    user_data_text(&shown, bytes)
}

/// User data must be UTF-8: it travels as a JSON string.
pub fn user_data_text(shown: &str, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        CliError::input(
            ErrorCode::InvalidRequest,
            format!(
                "--user-data {shown} is not UTF-8 text (byte {} is not); user data is sent as \
                 text, so encode binary data first (e.g. base64)",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// The public keys of one `--ssh-key FILE`.
fn read_ssh_keys(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::io(format!("cannot read --ssh-key {}", path.display()), &e))?;
    ssh_keys_of(&path.display().to_string(), &bytes)
}

/// The `authorized_keys` lines of a key file: one key a line, blank lines and `#` comments
/// skipped. A file with no key, or with a private key, is refused.
pub fn ssh_keys_of(shown: &str, bytes: &[u8]) -> Result<Vec<String>> {
    let bad = |why: String| CliError::input(ErrorCode::InvalidRequest, why);
    let text = std::str::from_utf8(bytes).map_err(|_| {
        bad(format!(
            "--ssh-key {shown} is not a text file of public keys"
        ))
    })?;
    if text.contains("PRIVATE KEY-----") {
        return Err(bad(format!(
            "--ssh-key {shown} holds a private key; give its public half (usually \
             {shown}.pub)"
        )));
    }
    let keys = authorized_keys(text);
    if keys.is_empty() {
        return Err(bad(format!(
            "--ssh-key {shown} holds no public key (only blank lines and comments)"
        )));
    }
    Ok(keys)
}

/// The key lines of `authorized_keys` text, trimmed.
pub fn authorized_keys(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use hearth_api::{EgressMode, Size, VolumeAttachment};

    use super::*;
    use crate::cli::{Cli, Command, VmCommand};

    fn new_args(args: &[&str]) -> NewArgs {
        let argv = ["hearth", "vm", "new"]
            .into_iter()
            .chain(args.iter().copied());
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Vm(VmCommand::New(a)) => a,
            other => panic!("not vm new: {other:?}"),
        }
    }

    #[test]
    fn no_egress_flag_sends_no_policy() {
        let args = new_args(&["demo"]);
        assert_eq!(egress_request(&args.egress), None);
        assert_eq!(
            create_request(&args, None, Vec::new()),
            CreateVmRequest {
                name: "demo".into(),
                ..CreateVmRequest::default()
            }
        );
    }

    #[test]
    fn egress_flags_become_the_request() {
        let args = new_args(&[
            "demo",
            "--egress-allow-cidr",
            "10.1.0.0/16",
            "--egress-allow-cidr",
            "192.0.2.7",
            "--egress-deny-cidr",
            "10.1.2.0/24",
            "--egress-allow-port",
            "443",
            "--egress-allow-port",
            "80",
            "--egress-allow-domain",
            "*.example.com",
        ]);
        assert_eq!(
            egress_request(&args.egress),
            Some(EgressRequest {
                // Left to hearthd, which takes allow lists as deny_all.
                mode: None,
                allow_cidrs: vec!["10.1.0.0/16".into(), "192.0.2.7".into()],
                deny_cidrs: vec!["10.1.2.0/24".into()],
                allow_ports: vec![443, 80],
                allow_domains: vec!["*.example.com".into()],
            })
        );
        let args = new_args(&["demo", "--egress-mode", "deny_all"]);
        assert_eq!(
            egress_request(&args.egress),
            Some(EgressRequest {
                mode: Some(EgressMode::DenyAll),
                ..EgressRequest::default()
            })
        );
        let args = new_args(&["demo", "--egress-deny-cidr", "0.0.0.0/0"]);
        let request = egress_request(&args.egress).unwrap();
        assert_eq!(
            (request.mode, request.deny_cidrs),
            (None, vec!["0.0.0.0/0".to_owned()])
        );
    }

    #[test]
    fn create_request_carries_every_flag() {
        let args = new_args(&[
            "web",
            "--cpus",
            "2",
            "--ram",
            "1G",
            "--no-start",
            "--network",
            "backend",
            "--network",
            "db",
            "--egress-mode",
            "allow_all",
            "--egress-deny-cidr",
            "169.254.0.0/16",
            "--volume",
            "data:/data",
            "--volume",
            "logs:/var/log/app",
        ]);
        let request = create_request(
            &args,
            Some("#cloud-config\n".into()),
            vec!["ssh-ed25519 AAAA a@b".into()],
        );
        assert_eq!(
            request,
            CreateVmRequest {
                name: "web".into(),
                cpus: Some(2),
                ram: Some(Size::Text("1G".into())),
                rootfs_size: None,
                start: Some(false),
                networks: vec!["backend".into(), "db".into()],
                egress: Some(EgressRequest {
                    mode: Some(EgressMode::AllowAll),
                    deny_cidrs: vec!["169.254.0.0/16".into()],
                    ..EgressRequest::default()
                }),
                user_data: Some("#cloud-config\n".into()),
                ssh_authorized_keys: vec!["ssh-ed25519 AAAA a@b".into()],
                volumes: vec![
                    VolumeAttachment {
                        name: "data".into(),
                        path: "/data".into()
                    },
                    VolumeAttachment {
                        name: "logs".into(),
                        path: "/var/log/app".into()
                    },
                ],
            }
        );
        // The JSON hearthd gets: the fields by their API names.
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(json["networks"], serde_json::json!(["backend", "db"]));
        assert_eq!(json["egress"]["mode"], "allow_all");
        assert_eq!(json["ssh_authorized_keys"][0], "ssh-ed25519 AAAA a@b");
    }

    #[test]
    fn ssh_key_files_skip_blanks_and_comments() {
        let text = b"# laptop\nssh-ed25519 AAAAC3Nza one@laptop\n\n   \r\n\
                     \t# old key, kept for a while\n\
                     ssh-rsa AAAAB3Nza two@desk   \r\n\
                     from=\"10.0.0.0/8\" ssh-ed25519 AAAAC3Nzb three@ci\n";
        assert_eq!(
            ssh_keys_of("keys", text).unwrap(),
            [
                "ssh-ed25519 AAAAC3Nza one@laptop",
                "ssh-rsa AAAAB3Nza two@desk",
                "from=\"10.0.0.0/8\" ssh-ed25519 AAAAC3Nzb three@ci",
            ]
        );
    }

    #[test]
    fn ssh_key_files_without_a_public_key_are_refused() {
        let err = ssh_keys_of("empty.pub", b"\n# nothing here\n\n").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.message().contains("holds no public key"), "{err}");
        let private = b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1r\n\
                        -----END OPENSSH PRIVATE KEY-----\n";
        let err = ssh_keys_of("/home/a/.ssh/id_ed25519", private).unwrap_err();
        assert!(
            err.message().contains(
                "holds a private key; give its public half (usually /home/a/.ssh/id_ed25519.pub)"
            ),
            "{err}"
        );
        let err = ssh_keys_of("k", b"ssh-ed25519 \xff\xfe").unwrap_err();
        assert!(err.message().contains("is not a text file"), "{err}");
    }

    #[test]
    fn user_data_must_be_utf8() {
        assert_eq!(
            user_data_text("init.sh", b"#!/bin/sh\necho h\xc3\xa9\n".to_vec()).unwrap(),
            "#!/bin/sh\necho hé\n"
        );
        let err = user_data_text("blob.bin", b"ok\x00\xff".to_vec()).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));
        assert!(
            err.message()
                .starts_with("--user-data blob.bin is not UTF-8 text (byte 3 is not)"),
            "{err}"
        );
    }

    #[test]
    fn files_are_read_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("hearth-inputs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("user-data");
        std::fs::write(&data, "#cloud-config\n").unwrap();
        let (a, b) = (dir.join("a.pub"), dir.join("b.pub"));
        std::fs::write(&a, "ssh-ed25519 AAAA one\n").unwrap();
        std::fs::write(&b, "# two keys\nssh-ed25519 BBBB two\nssh-rsa CCCC three\n").unwrap();
        let args = new_args(&[
            "demo",
            "--user-data",
            data.to_str().unwrap(),
            "--ssh-key",
            a.to_str().unwrap(),
            "--ssh-key",
            b.to_str().unwrap(),
        ]);
        let request = read_create_request(&args).unwrap();
        assert_eq!(request.user_data.as_deref(), Some("#cloud-config\n"));
        assert_eq!(
            request.ssh_authorized_keys,
            [
                "ssh-ed25519 AAAA one",
                "ssh-ed25519 BBBB two",
                "ssh-rsa CCCC three"
            ]
        );
        let missing = dir.join("missing.pub");
        let args = new_args(&["demo", "--ssh-key", missing.to_str().unwrap()]);
        let err = read_create_request(&args).unwrap_err();
        assert!(
            err.message()
                .starts_with(&format!("cannot read --ssh-key {}: ", missing.display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

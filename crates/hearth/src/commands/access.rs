//! `hearth login|logout|whoami|user|key|org|audit`: identities and the audit log.

use std::io::Read;
use std::path::Path;

use hearth_api::{
    AddMemberRequest, AddSshKeyRequest, ApiKey, AuditEntry, CreateApiKeyRequest, CreateOrgRequest,
    CreateUserRequest, CreatedApiKey, ErrorCode, Org, Role, SshKey, SwitchOrgRequest, User, Whoami,
};
use reqwest::Method;

use crate::cli::{
    AuditArgs, KeyCommand, LoginArgs, OrgCommand, RoleArg, SshKeyCommand, UserCommand,
};
use crate::client::Client;
use crate::error::{CliError, Result};
use crate::printer::Printer;
use crate::profile;
use crate::render::{table, terminal_safe};

fn role(r: RoleArg) -> Role {
    match r {
        RoleArg::Owner => Role::Owner,
        RoleArg::Member => Role::Member,
    }
}

fn read_file(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CliError::io("cannot read stdin", &e))?;
        return Ok(text);
    }
    std::fs::read_to_string(path)
        .map_err(|e| CliError::io(format!("cannot read {}", path.display()), &e))
}

fn whoami_text(w: &Whoami) -> String {
    let org = match (&w.org, w.role) {
        (Some(org), Some(role)) => format!("{} ({})", terminal_safe(org), role.as_str()),
        (Some(org), None) => terminal_safe(org),
        (None, _) => "none".into(),
    };
    let others: Vec<String> = w.orgs.iter().map(|m| terminal_safe(&m.org)).collect();
    format!(
        "user:  {}{}\norg:   {org}\norgs:  {}\nvia:   {}\n",
        terminal_safe(&w.user),
        if w.admin { " (host admin)" } else { "" },
        if others.is_empty() {
            "-".into()
        } else {
            others.join(", ")
        },
        w.via
    )
}

/// `hearth login`: checks the key against hearthd, then keeps it (and the URL) in the profile.
pub async fn login(
    url: &str,
    profile_name: &str,
    args: LoginArgs,
    printer: &Printer,
) -> Result<()> {
    let text = match &args.key_file {
        Some(path) => read_file(path)?,
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprint!("API key (input is not shown: paste it, then press enter): ");
            }
            let mut line = String::new();
            let hidden = crate::tty::Hidden::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| CliError::io("cannot read the key from stdin", &e))?;
            drop(hidden);
            line
        }
    };
    let key = text.trim();
    if key.is_empty() {
        return Err(CliError::input(
            ErrorCode::InvalidRequest,
            "no API key given: pipe it in (`hearth login < key.txt`) or use --key-file",
        ));
    }
    let client = Client::new(url, Some(key))?;
    let who: crate::client::Json<Whoami> = client.get(&["whoami"], &[]).await?;
    let path = profile::store(
        profile_name,
        Some(profile::Profile {
            url: Some(url.to_owned()),
            api_key: Some(key.to_owned()),
        }),
    )?;
    printer.result(&who, |w| {
        format!(
            "logged in to {url} as {}; profile {profile_name} saved in {}\n",
            terminal_safe(&w.user),
            path.display()
        )
    });
    Ok(())
}

pub fn logout(profile_name: &str, printer: &Printer) -> Result<()> {
    let path = profile::store(profile_name, None)?;
    printer.text(&format!(
        "profile {profile_name} removed from {}\n",
        path.display()
    ));
    Ok(())
}

pub async fn whoami(client: &Client, printer: &Printer) -> Result<()> {
    let who: crate::client::Json<Whoami> = client.get(&["whoami"], &[]).await?;
    printer.result(&who, whoami_text);
    Ok(())
}

fn users_text(users: &[User]) -> String {
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            let orgs: Vec<String> = u
                .orgs
                .iter()
                .map(|m| format!("{}:{}", terminal_safe(&m.org), m.role.as_str()))
                .collect();
            vec![
                terminal_safe(&u.name),
                if u.admin { "yes" } else { "no" }.into(),
                orgs.join(","),
                u.ssh_keys.to_string(),
                u.created_at.clone(),
            ]
        })
        .collect();
    table(&["NAME", "ADMIN", "ORGS", "SSH KEYS", "CREATED"], &rows)
}

fn ssh_keys_text(keys: &[SshKey]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.fingerprint.clone(),
                terminal_safe(&k.kind),
                terminal_safe(&k.comment),
                k.created_at.clone(),
            ]
        })
        .collect();
    table(&["FINGERPRINT", "TYPE", "COMMENT", "ADDED"], &rows)
}

pub async fn user(command: UserCommand, client: &Client, printer: &Printer) -> Result<()> {
    match command {
        UserCommand::List => {
            let users: crate::client::Json<Vec<User>> = client.get(&["users"], &[]).await?;
            printer.result(&users, |u| users_text(u));
        }
        UserCommand::Create(args) => {
            let ssh_key = args.ssh_key.as_deref().map(read_file).transpose()?;
            let body = CreateUserRequest {
                name: args.name,
                admin: args.admin,
                org: args.org,
                role: args.role.map(role),
                ssh_key,
            };
            let user: crate::client::Json<User> =
                client.send_json(Method::POST, &["users"], &body).await?;
            printer.result(&user, |u| {
                format!(
                    "created user {}{} in {}; make its API key with `hearth key create --user {}`\n",
                    terminal_safe(&u.name),
                    if u.admin { " (host admin)" } else { "" },
                    u.active_org.as_deref().map_or("no organization".into(), terminal_safe),
                    terminal_safe(&u.name),
                )
            });
        }
        UserCommand::Delete(args) => {
            client.delete(&["users", &args.user]).await?;
            printer.text(&format!("deleted user {}\n", terminal_safe(&args.user)));
        }
        UserCommand::SshKey(SshKeyCommand::Add(args)) => {
            let body = AddSshKeyRequest {
                public_key: read_file(&args.file)?,
            };
            let key: crate::client::Json<SshKey> = client
                .send_json(Method::POST, &["users", &args.user, "ssh-keys"], &body)
                .await?;
            printer.result(&key, |k| {
                format!(
                    "added {} key {} to {}\n",
                    terminal_safe(&k.kind),
                    k.fingerprint,
                    terminal_safe(&k.user)
                )
            });
        }
        UserCommand::SshKey(SshKeyCommand::List(args)) => {
            let keys: crate::client::Json<Vec<SshKey>> =
                client.get(&["users", &args.user, "ssh-keys"], &[]).await?;
            printer.result(&keys, |k| ssh_keys_text(k));
        }
        UserCommand::SshKey(SshKeyCommand::Remove(args)) => {
            client
                .delete(&["users", &args.user, "ssh-keys", &args.fingerprint])
                .await?;
            printer.text(&format!("removed key {}\n", args.fingerprint));
        }
    }
    Ok(())
}

fn api_keys_text(keys: &[ApiKey]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                k.id.clone(),
                terminal_safe(&k.name),
                terminal_safe(&k.user),
                terminal_safe(&k.org),
                k.created_at.clone(),
            ]
        })
        .collect();
    table(&["ID", "NAME", "USER", "ORG", "CREATED"], &rows)
}

pub async fn key(command: KeyCommand, client: &Client, printer: &Printer) -> Result<()> {
    match command {
        KeyCommand::List => {
            let keys: crate::client::Json<Vec<ApiKey>> = client.get(&["api-keys"], &[]).await?;
            printer.result(&keys, |k| api_keys_text(k));
        }
        KeyCommand::Create(args) => {
            let body = CreateApiKeyRequest {
                name: args.name,
                org: args.org,
                user: args.user,
            };
            let made: crate::client::Json<CreatedApiKey> =
                client.send_json(Method::POST, &["api-keys"], &body).await?;
            printer.result(&made, |k| format!("{}\n", k.key));
            printer.note(&format!(
                "API key {} of {} in {}: shown this once; keep it with `hearth login` (it reads the key from stdin)",
                made.data.api_key.id,
                terminal_safe(&made.data.api_key.user),
                terminal_safe(&made.data.api_key.org)
            ));
        }
        KeyCommand::Revoke(args) => {
            client.delete(&["api-keys", &args.id]).await?;
            printer.text(&format!("revoked API key {}\n", terminal_safe(&args.id)));
        }
    }
    Ok(())
}

fn orgs_text(orgs: &[Org]) -> String {
    let rows: Vec<Vec<String>> = orgs
        .iter()
        .map(|o| {
            let members: Vec<String> = o
                .members
                .iter()
                .map(|m| format!("{}:{}", terminal_safe(&m.user), m.role.as_str()))
                .collect();
            vec![
                terminal_safe(&o.name),
                members.join(","),
                o.created_at.clone(),
            ]
        })
        .collect();
    table(&["NAME", "MEMBERS", "CREATED"], &rows)
}

fn org_text(o: &Org) -> String {
    orgs_text(std::slice::from_ref(o))
}

pub async fn org(command: OrgCommand, client: &Client, printer: &Printer) -> Result<()> {
    match command {
        OrgCommand::List => {
            let orgs: crate::client::Json<Vec<Org>> = client.get(&["orgs"], &[]).await?;
            printer.result(&orgs, |o| orgs_text(o));
        }
        OrgCommand::Create(args) => {
            let body = CreateOrgRequest { name: args.org };
            let org: crate::client::Json<Org> =
                client.send_json(Method::POST, &["orgs"], &body).await?;
            printer.result(&org, org_text);
        }
        OrgCommand::Switch(args) => {
            let body = SwitchOrgRequest { org: args.org };
            let who: crate::client::Json<Whoami> = client
                .send_json(Method::PUT, &["whoami", "org"], &body)
                .await?;
            printer.result(&who, whoami_text);
        }
        OrgCommand::AddMember(args) => {
            let body = AddMemberRequest {
                user: args.user,
                role: args.role.map(role),
            };
            let org: crate::client::Json<Org> = client
                .send_json(Method::POST, &["orgs", &args.org, "members"], &body)
                .await?;
            printer.result(&org, org_text);
        }
        OrgCommand::RemoveMember(args) => {
            let org = client
                .delete(&["orgs", &args.org, "members", &args.user])
                .await?;
            match org {
                Some(org) => printer.result(&org, |_| {
                    format!(
                        "removed {} from {}\n",
                        terminal_safe(&args.user),
                        terminal_safe(&args.org)
                    )
                }),
                None => printer.text("removed\n"),
            }
        }
    }
    Ok(())
}

fn audit_text(rows: &[AuditEntry]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|a| {
            vec![
                a.at.clone(),
                terminal_safe(&a.principal),
                a.org.as_deref().map_or("-".into(), terminal_safe),
                terminal_safe(&a.source),
                terminal_safe(&a.action),
                a.target.as_deref().map_or("-".into(), terminal_safe),
                a.decision.clone(),
                terminal_safe(&a.result),
                format!("{} ms", a.duration_ms),
            ]
        })
        .collect();
    table(
        &[
            "AT", "WHO", "ORG", "FROM", "ACTION", "TARGET", "DECISION", "RESULT", "TOOK",
        ],
        &rows,
    )
}

pub async fn audit(args: AuditArgs, client: &Client, printer: &Printer) -> Result<()> {
    let mut query = vec![("limit", args.limit.to_string())];
    for (key, value) in [
        ("principal", args.principal),
        ("org", args.org),
        ("action", args.action),
        ("target", args.target),
        ("decision", args.decision),
        ("since", args.since),
    ] {
        if let Some(v) = value {
            query.push((key, v));
        }
    }
    let rows: crate::client::Json<Vec<AuditEntry>> = client.get(&["audit"], &query).await?;
    printer.result(&rows, |r| audit_text(r));
    Ok(())
}

//! `hearth network create|list|delete|connect|disconnect`: private networks, whose members reach
//! each other and nothing else reaches.

use hearth_api::{CreateNetworkRequest, Network};

use crate::cli::NetworkCommand;
use crate::client::Client;
use crate::error::Result;
use crate::printer::Printer;
use crate::render::{list_or_dash, now_unix, relative_time, table, terminal_safe};

pub async fn run(command: NetworkCommand, client: &Client, printer: &Printer) -> Result<()> {
    match command {
        NetworkCommand::Create(args) => {
            let request = CreateNetworkRequest { name: args.name };
            let network = client.create_network(&request).await?;
            printer.result(&network, |n| {
                format!("created network {}\n", terminal_safe(&n.name))
            });
        }
        NetworkCommand::List => {
            let networks = client.list_networks().await?;
            if networks.data.is_empty() {
                printer.note("no networks yet; `hearth network create NAME` creates one");
            }
            printer.result(&networks, |networks| {
                if networks.is_empty() {
                    String::new()
                } else {
                    list_text(networks, now_unix())
                }
            });
        }
        NetworkCommand::Delete(args) => {
            client.delete_network(&args.name).await?;
            printer.text(&format!("deleted network {}\n", terminal_safe(&args.name)));
        }
        NetworkCommand::Connect(args) => {
            let network = client.network_member(&args.network, &args.vm, true).await?;
            printer.result(&network, |n| member_text("connected", &args.vm, "to", n));
        }
        NetworkCommand::Disconnect(args) => {
            let network = client
                .network_member(&args.network, &args.vm, false)
                .await?;
            printer.result(&network, |n| {
                member_text("disconnected", &args.vm, "from", n)
            });
        }
    }
    Ok(())
}

fn list_text(networks: &[Network], now: i64) -> String {
    let rows: Vec<Vec<String>> = networks
        .iter()
        .map(|n| {
            vec![
                terminal_safe(&n.name),
                list_or_dash(&n.members),
                terminal_safe(&relative_time(&n.created_at, now)),
            ]
        })
        .collect();
    table(&["NAME", "MEMBERS", "CREATED"], &rows)
}

/// E.g. `connected vm web to network backend (members: db, web)`.
fn member_text(done: &str, vm: &str, preposition: &str, network: &Network) -> String {
    let members = if network.members.is_empty() {
        "no members".to_owned()
    } else {
        format!("members: {}", list_or_dash(&network.members))
    };
    format!(
        "{done} vm {} {preposition} network {} ({members})\n",
        terminal_safe(vm),
        terminal_safe(&network.name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(name: &str, members: &[&str]) -> Network {
        Network {
            name: name.into(),
            org: "default".into(),
            created_at: "2024-05-01T12:00:00Z".into(),
            members: members.iter().map(|&m| m.to_owned()).collect(),
        }
    }

    #[test]
    fn list_renders_names_members_and_age() {
        let text = list_text(
            &[network("backend", &["api", "db"]), network("empty", &[])],
            1_714_564_800 + 3 * 3600,
        );
        assert_eq!(
            text,
            "NAME      MEMBERS   CREATED\n\
             backend   api, db   3 hours ago\n\
             empty     -         3 hours ago\n"
        );
    }

    #[test]
    fn server_text_cannot_drive_the_terminal() {
        let mut evil = network("evil\x1b[2J", &["web\x1b]0;owned\x07", "ok"]);
        evil.created_at = "\u{9b}31mlater".into();
        let text = list_text(&[evil.clone()], 0);
        assert!(
            !text.contains('\x1b') && !text.contains('\u{9b}'),
            "{text:?}"
        );
        assert!(text.contains("evil\\x1b[2J"), "{text}");
        assert!(text.contains("web\\x1b]0;owned\\x07, ok"), "{text}");
        assert!(text.contains("\\u{9b}31mlater"), "{text}");
        let text = member_text("connected", "web\x1b[1A", "to", &evil);
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(text.starts_with("connected vm web\\x1b[1A to network evil\\x1b[2J (members: "));
    }

    #[test]
    fn member_lines() {
        assert_eq!(
            member_text(
                "connected",
                "web",
                "to",
                &network("backend", &["db", "web"])
            ),
            "connected vm web to network backend (members: db, web)\n"
        );
        assert_eq!(
            member_text("disconnected", "web", "from", &network("backend", &[])),
            "disconnected vm web from network backend (no members)\n"
        );
    }
}

//! `hearth backup create|list|delete` and `hearth restore`: a stopped VM's root disk kept and
//! put back.

use hearth_api::{Backup, VmDetail};

use crate::cli::{BackupCommand, RestoreArgs};
use crate::client::Client;
use crate::error::Result;
use crate::printer::Printer;
use crate::render::{now_unix, relative_time, size_mib, table, terminal_safe};

pub async fn run(command: BackupCommand, client: &Client, printer: &Printer) -> Result<()> {
    match command {
        BackupCommand::Create(args) => {
            let progress =
                printer.progress(&format!("backing up vm {}", terminal_safe(&args.name)));
            let backup = client.create_backup(&args.name).await?;
            progress.finish("done");
            printer.result(&backup, |b| {
                format!(
                    "backup {} of vm {} ({} disk, {} on the host)\n",
                    terminal_safe(&b.id),
                    terminal_safe(&b.vm),
                    size_mib(b.rootfs_mib),
                    size_mib(b.size_bytes.div_ceil(1 << 20)),
                )
            });
        }
        BackupCommand::List(args) => {
            let backups = client.list_backups(&args.name).await?;
            if backups.data.is_empty() {
                printer.note(&format!(
                    "vm {} has no backups; `hearth backup create {}` makes one (it must be stopped)",
                    terminal_safe(&args.name),
                    terminal_safe(&args.name)
                ));
            }
            printer.result(&backups, |list| {
                if list.is_empty() {
                    String::new()
                } else {
                    list_text(list, now_unix())
                }
            });
        }
        BackupCommand::Delete(args) => {
            client.delete_backup(&args.name, &args.backup).await?;
            printer.text(&format!(
                "deleted backup {} of vm {}\n",
                terminal_safe(&args.backup),
                terminal_safe(&args.name)
            ));
        }
    }
    Ok(())
}

pub async fn restore(client: &Client, printer: &Printer, args: RestoreArgs) -> Result<()> {
    let progress = printer.progress(&format!(
        "restoring vm {} from backup {}",
        terminal_safe(&args.name),
        terminal_safe(&args.backup)
    ));
    let detail = client.restore(&args.name, &args.backup).await?;
    progress.finish("done");
    printer.result(&detail, |d: &VmDetail| {
        format!(
            "vm {} has the root disk of backup {} ({}); start it with `hearth vm start {}`\n",
            terminal_safe(&d.vm.name),
            terminal_safe(&args.backup),
            size_mib(d.vm.rootfs_mib),
            terminal_safe(&d.vm.name)
        )
    });
    Ok(())
}

fn list_text(backups: &[Backup], now: i64) -> String {
    let rows: Vec<Vec<String>> = backups
        .iter()
        .map(|b| {
            vec![
                terminal_safe(&b.id),
                terminal_safe(&relative_time(&b.created_at, now)),
                terminal_safe(&b.created_by),
                format!("{} cpus, {} RAM", b.cpus, size_mib(b.memory_mib)),
                size_mib(b.rootfs_mib),
                size_mib(b.size_bytes.div_ceil(1 << 20)),
            ]
        })
        .collect();
    table(&["ID", "CREATED", "BY", "SHAPE", "DISK", "ON HOST"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_shows_each_backup_and_escapes_what_the_server_says() {
        let b = Backup {
            id: "00000000000000ab".into(),
            vm: "web".into(),
            created_at: "2026-12-02T10:00:00.000Z".into(),
            created_by: "oper\x1b[2Jator".into(),
            cpus: 2,
            memory_mib: 1024,
            rootfs_mib: 10240,
            size_bytes: 300 << 20,
        };
        let text = list_text(&[b], 0);
        assert!(text.starts_with("ID"), "{text}");
        assert!(text.contains("00000000000000ab"), "{text}");
        assert!(text.contains("2 cpus, 1G RAM"), "{text}");
        assert!(text.contains("10G") && text.contains("300M"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
    }
}

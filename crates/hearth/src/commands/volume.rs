//! `hearth volume create|list|delete|attach|detach`: named extra disks that outlive the VMs
//! they are attached to.

use hearth_api::{CreateVolumeRequest, VmDetail, Volume};

use crate::cli::VolumeCommand;
use crate::client::Client;
use crate::error::Result;
use crate::printer::Printer;
use crate::render::{size_mib, table, terminal_safe};

pub async fn run(command: VolumeCommand, client: &Client, printer: &Printer) -> Result<()> {
    match command {
        VolumeCommand::Create(args) => {
            let body = CreateVolumeRequest {
                name: args.name,
                size: args.size,
            };
            let volume = client.create_volume(&body).await?;
            printer.result(&volume, |v| {
                format!(
                    "created volume {} ({}); attach it with `hearth volume attach VM {} --path /data`\n",
                    terminal_safe(&v.name),
                    size_mib(v.size_mib),
                    terminal_safe(&v.name),
                )
            });
        }
        VolumeCommand::List => {
            let volumes = client.list_volumes().await?;
            if volumes.data.is_empty() {
                printer.note("no volumes; `hearth volume create NAME --size 10G` makes one");
            }
            printer.result(&volumes, |list| {
                if list.is_empty() {
                    String::new()
                } else {
                    list_text(list)
                }
            });
        }
        VolumeCommand::Delete(args) => {
            client.delete_volume(&args.volume).await?;
            printer.text(&format!("deleted volume {}\n", terminal_safe(&args.volume)));
        }
        VolumeCommand::Attach(args) => {
            let progress = printer.progress(&format!(
                "attaching volume {} to vm {}",
                terminal_safe(&args.volume),
                terminal_safe(&args.vm)
            ));
            let detail = client
                .attach_volume(&args.vm, &args.volume, &args.path)
                .await?;
            progress.finish("done");
            printer.result(&detail, |d: &VmDetail| {
                let path = d
                    .volumes
                    .iter()
                    .find(|v| v.name == args.volume)
                    .map_or(args.path.as_str(), |v| v.path.as_str());
                format!(
                    "volume {} is attached to vm {} at {} from its next start\n",
                    terminal_safe(&args.volume),
                    terminal_safe(&d.vm.name),
                    terminal_safe(path),
                )
            });
        }
        VolumeCommand::Detach(args) => {
            let detail = client.detach_volume(&args.vm, &args.volume).await?;
            printer.result(&detail, |d: &VmDetail| {
                format!(
                    "volume {} is detached from vm {} (its data is kept)\n",
                    terminal_safe(&args.volume),
                    terminal_safe(&d.vm.name),
                )
            });
        }
    }
    Ok(())
}

fn list_text(volumes: &[Volume]) -> String {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            let attached = match (&v.vm, &v.path) {
                (Some(vm), Some(path)) => format!("{}:{}", terminal_safe(vm), terminal_safe(path)),
                _ => "-".to_owned(),
            };
            vec![
                terminal_safe(&v.name),
                size_mib(v.size_mib),
                attached,
                size_mib(v.allocated_bytes.div_ceil(1 << 20)),
                if v.formatted { "ext4" } else { "-" }.to_owned(),
            ]
        })
        .collect();
    table(&["NAME", "SIZE", "ATTACHED", "ON HOST", "FS"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_shows_each_volume_and_escapes_what_the_server_says() {
        let attached = Volume {
            id: "00000000000000ab".into(),
            name: "data".into(),
            size_mib: 10240,
            created_at: "2026-12-02T10:00:00.000Z".into(),
            formatted: true,
            vm: Some("web\x1b[2J".into()),
            path: Some("/data".into()),
            allocated_bytes: 33 << 20,
            org: "default".into(),
        };
        let free = Volume {
            name: "spare".into(),
            formatted: false,
            vm: None,
            path: None,
            ..attached.clone()
        };
        let text = list_text(&[attached, free]);
        assert!(text.starts_with("NAME"), "{text}");
        assert!(text.contains("data") && text.contains("10G"), "{text}");
        assert!(text.contains(":/data") && text.contains("33M"), "{text}");
        assert!(text.contains("ext4"), "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        let spare = text.lines().find(|l| l.starts_with("spare")).unwrap();
        assert!(spare.contains(" - "), "{spare}");
    }
}

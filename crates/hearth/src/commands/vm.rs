//! `hearth vm new|list|inspect|start|stop|restart|delete` and `hearth health`.

use hearth_api::{CreateVmRequest, Health, Resource, Vm, VmDetail, VmEvent};

use crate::cli::NewArgs;
use crate::client::{Client, Lifecycle};
use crate::error::Result;
use crate::printer::Printer;
use crate::render::{key_values, now_unix, relative_time, size_mib, table, terminal_safe};

pub async fn new(client: &Client, printer: &Printer, args: NewArgs) -> Result<()> {
    let request = CreateVmRequest {
        name: args.name,
        cpus: args.cpus,
        ram: args.ram,
        rootfs_size: args.rootfs_size,
        start: args.no_start.then_some(false),
    };
    let progress = printer.progress(&format!("creating vm {}", request.name));
    let created = client.create_vm(&request).await?;
    progress.finish(if args.no_start { "created" } else { "ready" });
    printer.result(&created, |d| created_text(&d.vm));
    Ok(())
}

pub async fn list(client: &Client, printer: &Printer) -> Result<()> {
    let vms = client.list_vms().await?;
    if vms.data.is_empty() {
        printer.note("no VMs yet; `hearth vm new NAME` creates one");
    }
    printer.result(&vms, |vms| {
        if vms.is_empty() {
            String::new()
        } else {
            list_text(vms, now_unix())
        }
    });
    Ok(())
}

pub async fn inspect(client: &Client, printer: &Printer, name: &str) -> Result<()> {
    let detail = client.get_vm(name).await?;
    printer.result(&detail, |d| inspect_text(d, |s| printer.alert(s)));
    Ok(())
}

pub async fn lifecycle(
    client: &Client,
    printer: &Printer,
    name: &str,
    op: Lifecycle,
) -> Result<()> {
    let doing = match op {
        Lifecycle::Start => "starting",
        Lifecycle::Stop { .. } => "stopping",
        Lifecycle::Restart => "restarting",
    };
    let progress = printer.progress(&format!("{doing} vm {name}"));
    let vm = client.lifecycle(name, op).await?;
    progress.finish(vm.data.state.as_str());
    printer.result(&vm, |vm| {
        format!("vm {} is {}\n", terminal_safe(&vm.name), vm.state)
    });
    Ok(())
}

pub async fn delete(client: &Client, printer: &Printer, name: &str) -> Result<()> {
    let progress = printer.progress(&format!("deleting vm {name}"));
    client.delete_vm(name).await?;
    progress.finish("deleted");
    printer.text(&format!("deleted vm {}\n", terminal_safe(name)));
    Ok(())
}

pub async fn health(client: &Client, printer: &Printer) -> Result<()> {
    let health = client.health().await?;
    printer.result(&health, health_text);
    Ok(())
}

/// What `vm new` prints, e.g. `created vm demo (running; 2 cpus, 1G RAM, 10G rootfs)`.
fn created_text(vm: &Vm) -> String {
    format!(
        "created vm {} ({}; {} {}, {} RAM, {} rootfs)\n",
        terminal_safe(&vm.name),
        vm.state,
        vm.cpus,
        if vm.cpus == 1 { "cpu" } else { "cpus" },
        size_mib(vm.memory_mib),
        size_mib(vm.rootfs_mib)
    )
}

fn list_text(vms: &[Vm], now: i64) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                terminal_safe(&vm.name),
                vm.state.to_string(),
                vm.cpus.to_string(),
                size_mib(vm.memory_mib),
                size_mib(vm.rootfs_mib),
                relative_time(&vm.created_at, now),
            ]
        })
        .collect();
    table(
        &["NAME", "STATE", "CPUS", "RAM", "ROOTFS", "CREATED"],
        &rows,
    )
}

fn inspect_text(detail: &VmDetail, alert: impl Fn(&str) -> String) -> String {
    let vm = &detail.vm;
    let mut pairs = vec![
        ("name", terminal_safe(&vm.name)),
        ("id", terminal_safe(&vm.id)),
        ("state", vm.state.to_string()),
    ];
    if let Some(error) = &vm.last_error {
        pairs.push(("last error", alert(&one_line(error))));
    }
    pairs.extend([
        ("cpus", vm.cpus.to_string()),
        ("ram", size_mib(vm.memory_mib)),
        ("rootfs", size_mib(vm.rootfs_mib)),
        ("image", terminal_safe(&vm.image)),
        ("vmm", terminal_safe(&vm.vmm)),
        (
            "pid",
            vm.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        ),
        ("created", terminal_safe(&vm.created_at)),
        ("updated", terminal_safe(&vm.updated_at)),
    ]);
    let mut out = key_values(&pairs);
    out.push('\n');
    if detail.events.is_empty() {
        out.push_str("no events\n");
    } else {
        out.push_str("EVENTS\n");
        let rows: Vec<Vec<String>> = detail.events.iter().map(event_row).collect();
        out.push_str(&table(&["TIME", "KIND", "FROM→TO", "MESSAGE"], &rows));
    }
    out
}

fn event_row(event: &VmEvent) -> Vec<String> {
    let transition = match (event.from_state, event.to_state) {
        (None, None) => String::new(),
        (from, to) => format!(
            "{}→{}",
            from.map_or("-", |s| s.as_str()),
            to.map_or("-", |s| s.as_str())
        ),
    };
    vec![
        terminal_safe(&event.at),
        terminal_safe(&event.kind),
        transition,
        event.message.as_deref().map(one_line).unwrap_or_default(),
    ]
}

/// Multi-line messages (errors with output, perhaps a guest's) on one table line, safe for a
/// terminal.
fn one_line(text: &str) -> String {
    terminal_safe(&text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn health_text(health: &Health) -> String {
    let c = &health.capacity;
    key_values(&[
        ("status", terminal_safe(&health.status)),
        ("version", terminal_safe(&health.version)),
        ("vmm", terminal_safe(&health.vmm)),
        ("accel", terminal_safe(&health.accel)),
        (
            "image",
            terminal_safe(health.image.as_deref().unwrap_or(&health.image_status)),
        ),
        ("vcpus", capacity_line(&c.vcpus, |n| n.to_string())),
        ("memory", capacity_line(&c.memory_mib, size_mib)),
        ("ram files", capacity_line(&c.ram_files_mib, size_mib)),
        ("disks", capacity_line(&c.disk_mib, size_mib)),
        ("disk free", size_mib(c.disk_free_mib)),
    ])
}

/// `3 of 8 committed, 5 available`.
fn capacity_line(r: &Resource, unit: impl Fn(u64) -> String) -> String {
    format!(
        "{} of {} committed, {} available",
        unit(r.committed),
        unit(r.total),
        unit(r.available)
    )
}

#[cfg(test)]
mod tests {
    use hearth_api::{Capacity, VmState};

    use super::*;

    fn vm(name: &str, state: VmState) -> Vm {
        Vm {
            id: format!("id-{name}"),
            name: name.into(),
            state,
            cpus: 2,
            memory_mib: 1024,
            rootfs_mib: 10 * 1024,
            image: "sha256-abc".into(),
            vmm: "qemu".into(),
            pid: None,
            created_at: "2024-05-01T12:00:00Z".into(),
            updated_at: "2024-05-01T12:00:05Z".into(),
            last_error: None,
        }
    }

    #[test]
    fn list_renders_an_aligned_table() {
        let mut big = vm("build-box", VmState::Stopped);
        big.memory_mib = 512;
        big.cpus = 16;
        let text = list_text(&[vm("demo", VmState::Running), big], 1_714_564_800 + 120);
        assert_eq!(
            text,
            "NAME        STATE     CPUS   RAM    ROOTFS   CREATED\n\
             demo        running   2      1G     10G      2 minutes ago\n\
             build-box   stopped   16     512M   10G      2 minutes ago\n"
        );
    }

    #[test]
    fn inspect_shows_fields_last_error_and_events() {
        let mut v = vm("demo", VmState::Error);
        v.last_error = Some("qemu exited:\n  bad things".into());
        let detail = VmDetail {
            vm: v,
            events: vec![
                VmEvent {
                    at: "2024-05-01T12:00:00.000Z".into(),
                    kind: "created".into(),
                    from_state: None,
                    to_state: Some(VmState::Stopped),
                    message: None,
                },
                VmEvent {
                    at: "2024-05-01T12:00:01.000Z".into(),
                    kind: "start_failed".into(),
                    from_state: Some(VmState::Starting),
                    to_state: Some(VmState::Error),
                    message: Some("qemu exited".into()),
                },
            ],
        };
        let text = inspect_text(&detail, |s| format!("!!{s}!!"));
        assert!(text.starts_with("name:       demo\nid:         id-demo\nstate:      error\n"));
        assert!(
            text.contains("last error: !!qemu exited: bad things!!\n"),
            "{text}"
        );
        assert!(text.contains("ram:        1G\n"), "{text}");
        assert!(text.contains("pid:        -\n"), "{text}");
        let events = text.split("EVENTS\n").nth(1).unwrap();
        assert_eq!(
            events,
            "TIME                       KIND           FROM→TO          MESSAGE\n\
             2024-05-01T12:00:00.000Z   created        -→stopped\n\
             2024-05-01T12:00:01.000Z   start_failed   starting→error   qemu exited\n"
        );
    }

    #[test]
    fn guest_text_cannot_drive_the_terminal() {
        let mut v = vm("demo", VmState::Error);
        v.last_error =
            Some("boot failed; serial console ends with: \x1b]0;owned\x07\x1b[2J".into());
        let detail = VmDetail {
            vm: v,
            events: vec![VmEvent {
                at: "2024-05-01T12:00:01.000Z".into(),
                kind: "start_failed".into(),
                from_state: None,
                to_state: None,
                message: Some("agent says \x1b[1A\u{9b}hidden".into()),
            }],
        };
        let text = inspect_text(&detail, str::to_owned);
        assert!(
            !text.contains('\x1b') && !text.contains('\u{9b}'),
            "{text:?}"
        );
        assert!(
            text.contains("ends with: \\x1b]0;owned\\x07\\x1b[2J"),
            "{text}"
        );
        assert!(text.contains("agent says \\x1b[1A\\u{9b}hidden"), "{text}");
    }

    #[test]
    fn health_lists_its_fields() {
        let text = health_text(&Health {
            status: "ok".into(),
            version: "0.1.0".into(),
            vmm: "qemu".into(),
            accel: "tcg".into(),
            image: None,
            image_status: "building: running debootstrap".into(),
            capacity: Capacity {
                vcpus: Resource {
                    total: 8,
                    committed: 3,
                    available: 5,
                },
                memory_mib: Resource {
                    total: 23552,
                    committed: 2048,
                    available: 21504,
                },
                ram_files_mib: Resource {
                    total: 12288,
                    committed: 2048,
                    available: 10240,
                },
                disk_mib: Resource {
                    total: 204800,
                    committed: 10240,
                    available: 194560,
                },
                disk_free_mib: 79872,
            },
        });
        assert_eq!(
            text,
            "status:    ok\nversion:   0.1.0\nvmm:       qemu\naccel:     tcg\nimage:     building: running debootstrap\n\
             vcpus:     3 of 8 committed, 5 available\n\
             memory:    2G of 23G committed, 21G available\n\
             ram files: 2G of 12G committed, 10G available\n\
             disks:     10G of 200G committed, 190G available\n\
             disk free: 78G\n"
        );
    }

    #[test]
    fn created_line() {
        assert_eq!(
            created_text(&vm("demo", VmState::Running)),
            "created vm demo (running; 2 cpus, 1G RAM, 10G rootfs)\n"
        );
    }
}

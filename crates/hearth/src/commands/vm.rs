//! `hearth vm new|list|inspect|start|stop|restart|pause|resume|delete|egress|resize` and
//! `hearth health`.

use hearth_api::{
    EgressMode, EgressPolicy, Health, NetworkHealth, Resource, Vm, VmDetail, VmEvent, VmNetwork,
};

use crate::cli::{EgressArgs, NewArgs, ResizeArgs};
use crate::client::{Client, Lifecycle};
use crate::commands::inputs;
use crate::error::Result;
use crate::printer::Printer;
use crate::render::{
    key_values, list_or_dash, now_unix, relative_time, size_mib, table, terminal_safe,
};

pub async fn new(client: &Client, printer: &Printer, args: NewArgs) -> Result<()> {
    let request = inputs::read_create_request(&args)?;
    let progress = printer.progress(&format!("creating vm {}", terminal_safe(&request.name)));
    let created = client.create_vm(&request).await?;
    progress.finish(if args.no_start { "created" } else { "ready" });
    printer.result(&created, created_text);
    Ok(())
}

pub async fn egress(client: &Client, printer: &Printer, args: EgressArgs) -> Result<()> {
    // `Cli::parse_checked` refused `vm egress` without a flag, so this is the policy asked for.
    let request = inputs::egress_request(&args.egress).unwrap_or_default();
    let detail = client.set_egress(&args.name, &request).await?;
    printer.result(&detail, egress_text);
    Ok(())
}

pub async fn resize(client: &Client, printer: &Printer, args: ResizeArgs) -> Result<()> {
    let request = hearth_api::ResizeVmRequest {
        cpus: args.cpus,
        ram: args.ram,
        rootfs_size: args.rootfs_size,
    };
    let progress = printer.progress(&format!("resizing vm {}", terminal_safe(&args.name)));
    let detail = client.resize_vm(&args.name, &request).await?;
    progress.finish("done");
    printer.result(&detail, resize_text);
    Ok(())
}

/// What `vm resize` prints: the shape the VM has from its next start.
fn resize_text(detail: &VmDetail) -> String {
    let vm = &detail.vm;
    format!(
        "vm {}: {} cpus, {} RAM, {} root disk (from its next start)\n",
        terminal_safe(&vm.name),
        vm.cpus,
        size_mib(vm.memory_mib),
        size_mib(vm.rootfs_mib)
    )
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
        Lifecycle::Pause => "pausing",
        Lifecycle::Resume => "resuming",
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
    printer.result(&health, |h| health_text(h, |s| printer.alert(s)));
    Ok(())
}

/// What `vm new` prints, e.g. `created vm demo (running; 2 cpus, 1G RAM, 10G rootfs)`, with
/// `; address 172.28.0.6` when the VM has a network.
fn created_text(detail: &VmDetail) -> String {
    format!(
        "created vm {} ({})\n",
        terminal_safe(&detail.vm.name),
        summary(detail)
    )
}

/// A VM in a few words: `running; 1 cpu, 1G RAM, 10G rootfs; address 172.28.0.2`.
pub(crate) fn summary(detail: &VmDetail) -> String {
    let vm = &detail.vm;
    let address = detail.network.as_ref().map_or_else(String::new, |n| {
        format!("; address {}", terminal_safe(&n.address))
    });
    format!(
        "{}; {} {}, {} RAM, {} rootfs{address}",
        vm.state,
        vm.cpus,
        if vm.cpus == 1 { "cpu" } else { "cpus" },
        size_mib(vm.memory_mib),
        size_mib(vm.rootfs_mib)
    )
}

/// What `vm egress` prints: the VM and the policy it has now.
fn egress_text(detail: &VmDetail) -> String {
    let name = terminal_safe(&detail.vm.name);
    match &detail.network {
        Some(network) => {
            let mut pairs = vec![("vm", name)];
            pairs.extend(egress_pairs(&network.egress));
            key_values(&pairs)
        }
        None => format!("vm {name} has no network, so no egress policy\n"),
    }
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
        ("creator", terminal_safe(&vm.created_by)),
        ("updated", terminal_safe(&vm.updated_at)),
    ]);
    let mut out = key_values(&pairs);
    out.push('\n');
    if let Some(network) = &detail.network {
        out.push_str("NETWORK\n");
        out.push_str(&network_text(network));
        out.push('\n');
    }
    if !detail.volumes.is_empty() {
        out.push_str("VOLUMES\n");
        let rows: Vec<Vec<String>> = detail
            .volumes
            .iter()
            .map(|v| {
                vec![
                    terminal_safe(&v.name),
                    terminal_safe(&v.path),
                    size_mib(v.size_mib),
                ]
            })
            .collect();
        out.push_str(&table(&["NAME", "PATH", "SIZE"], &rows));
        out.push('\n');
    }
    if detail.events.is_empty() {
        out.push_str("no events\n");
    } else {
        out.push_str("EVENTS\n");
        let rows: Vec<Vec<String>> = detail.events.iter().map(event_row).collect();
        out.push_str(&table(&["TIME", "KIND", "FROM→TO", "MESSAGE"], &rows));
    }
    out
}

/// The network block of `vm inspect`.
fn network_text(network: &VmNetwork) -> String {
    let mut pairs = vec![
        ("address", terminal_safe(&network.address)),
        ("host address", terminal_safe(&network.host_address)),
        ("subnet", terminal_safe(&network.subnet)),
        ("guest address", terminal_safe(&network.guest_address)),
        ("guest gateway", terminal_safe(&network.guest_gateway)),
        ("mac", terminal_safe(&network.mac)),
        ("networks", list_or_dash(&network.networks)),
    ];
    pairs.extend(egress_pairs(&network.egress));
    key_values(&pairs)
}

/// `egress: deny_all` and the lists that are not empty; the ports only when something is
/// allowed (they limit the allow lists), `any` when they do not limit them.
fn egress_pairs(policy: &EgressPolicy) -> Vec<(&'static str, String)> {
    let mut pairs = vec![("egress", egress_mode(policy.mode).to_owned())];
    if !policy.allow_cidrs.is_empty() {
        pairs.push(("allow cidrs", list_or_dash(&policy.allow_cidrs)));
    }
    if !policy.allow_domains.is_empty() {
        pairs.push(("allow domains", list_or_dash(&policy.allow_domains)));
    }
    if !policy.allow_cidrs.is_empty() || !policy.allow_domains.is_empty() {
        let ports = if policy.allow_ports.is_empty() {
            "any".to_owned()
        } else {
            let ports: Vec<String> = policy.allow_ports.iter().map(u16::to_string).collect();
            ports.join(", ")
        };
        pairs.push(("allow ports", ports));
    }
    if !policy.deny_cidrs.is_empty() {
        pairs.push(("deny cidrs", list_or_dash(&policy.deny_cidrs)));
    }
    pairs
}

/// The mode as the API and `--egress-mode` spell it.
fn egress_mode(mode: EgressMode) -> &'static str {
    match mode {
        EgressMode::AllowAll => "allow_all",
        EgressMode::DenyAll => "deny_all",
    }
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

fn health_text(health: &Health, alert: impl Fn(&str) -> String) -> String {
    let c = &health.capacity;
    let mut pairs = vec![
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
        ("disk copies", terminal_safe(&health.disk_copies)),
        ("disk free", size_mib(c.disk_free_mib)),
    ];
    match &health.network {
        Some(network) => pairs.extend(network_health_pairs(network, alert)),
        None => pairs.push(("networking", "off".to_owned())),
    }
    key_values(&pairs)
}

/// `networking: ok` (or why the helper cannot be used, made to stand out), the helper, the
/// CIDR and what of it is used.
fn network_health_pairs(
    network: &NetworkHealth,
    alert: impl Fn(&str) -> String,
) -> Vec<(&'static str, String)> {
    let helper = one_line(&network.helper);
    let state = if network.helper == "ok" {
        helper
    } else {
        alert(&helper)
    };
    vec![
        ("networking", state),
        (
            "helper",
            network
                .helper_detail
                .as_deref()
                .map_or_else(|| "-".to_owned(), one_line),
        ),
        ("network cidr", terminal_safe(&network.cidr)),
        (
            "subnets",
            format!("{} of {} used", network.subnets_used, network.subnets_total),
        ),
        ("slots", network.slots.to_string()),
    ]
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
            created_by: "operator".into(),
            org: "default".into(),
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
            network: None,
            volumes: vec![],
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
            network: None,
            volumes: vec![],
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

    fn health(network: Option<NetworkHealth>) -> Health {
        Health {
            status: "ok".into(),
            version: "0.1.0".into(),
            vmm: "qemu".into(),
            accel: "tcg".into(),
            image: None,
            image_status: "building: running debootstrap".into(),
            disk_copies: "reflink".into(),
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
            network,
        }
    }

    fn network_health(helper: &str) -> NetworkHealth {
        NetworkHealth {
            helper: helper.into(),
            helper_detail: Some("pid 812, hearth-helper 0.1.0".into()),
            cidr: "172.28.0.0/16".into(),
            subnets_total: 16384,
            subnets_used: 3,
            slots: 2,
        }
    }

    #[test]
    fn health_lists_its_fields() {
        let text = health_text(&health(None), |s| format!("!!{s}!!"));
        assert_eq!(
            text,
            "status:      ok\nversion:     0.1.0\nvmm:         qemu\naccel:       tcg\n\
             image:       building: running debootstrap\n\
             vcpus:       3 of 8 committed, 5 available\n\
             memory:      2G of 23G committed, 21G available\n\
             ram files:   2G of 12G committed, 10G available\n\
             disks:       10G of 200G committed, 190G available\n\
             disk copies: reflink\n\
             disk free:   78G\n\
             networking:  off\n"
        );
    }

    #[test]
    fn health_shows_networking() {
        let text = health_text(&health(Some(network_health("ok"))), |s| format!("!!{s}!!"));
        let networking = text.split("disk free:    78G\n").nth(1).unwrap();
        assert_eq!(
            networking,
            "networking:   ok\n\
             helper:       pid 812, hearth-helper 0.1.0\n\
             network cidr: 172.28.0.0/16\n\
             subnets:      3 of 16384 used\n\
             slots:        2\n"
        );
        // A helper that cannot be used stands out, and says why on one line.
        let mut down = network_health("cannot connect to /run/hearth/helper.sock:\n  refused");
        down.helper_detail = None;
        let text = health_text(&health(Some(down)), |s| format!("!!{s}!!"));
        assert!(
            text.contains(
                "networking:   !!cannot connect to /run/hearth/helper.sock: refused!!\n\
                 helper:       -\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn health_network_text_cannot_drive_the_terminal() {
        let mut evil = network_health("helper says \x1b]0;owned\x07");
        evil.helper_detail = Some("\x1b[2Jpid 1".into());
        evil.cidr = "172.28.0.0/16\u{9b}".into();
        let text = health_text(&health(Some(evil)), str::to_owned);
        assert!(
            !text.contains('\x1b') && !text.contains('\u{9b}'),
            "{text:?}"
        );
        assert!(text.contains("helper says \\x1b]0;owned\\x07"), "{text}");
        assert!(text.contains("\\x1b[2Jpid 1"), "{text}");
        assert!(text.contains("172.28.0.0/16\\u{9b}"), "{text}");
    }

    fn vm_network() -> VmNetwork {
        VmNetwork {
            address: "172.28.0.6".into(),
            host_address: "172.28.0.5".into(),
            subnet: "172.28.0.4/30".into(),
            guest_address: "10.0.2.2".into(),
            guest_gateway: "10.0.2.1".into(),
            mac: "02:00:0a:00:02:02".into(),
            networks: vec!["backend".into(), "db".into()],
            egress: EgressPolicy {
                mode: EgressMode::DenyAll,
                allow_cidrs: vec!["10.1.0.0/16".into(), "192.0.2.7/32".into()],
                deny_cidrs: vec!["10.1.2.0/24".into()],
                allow_ports: vec![443, 80],
                allow_domains: vec!["*.example.com".into()],
            },
        }
    }

    #[test]
    fn inspect_shows_the_network_when_there_is_one() {
        let mut detail = VmDetail {
            vm: vm("demo", VmState::Running),
            network: Some(vm_network()),
            volumes: vec![],
            events: vec![],
        };
        let text = inspect_text(&detail, str::to_owned);
        let network = text
            .split("\nNETWORK\n")
            .nth(1)
            .and_then(|rest| rest.split("\nno events\n").next())
            .unwrap_or_else(|| panic!("no network section: {text}"));
        assert_eq!(
            network,
            "address:       172.28.0.6\n\
             host address:  172.28.0.5\n\
             subnet:        172.28.0.4/30\n\
             guest address: 10.0.2.2\n\
             guest gateway: 10.0.2.1\n\
             mac:           02:00:0a:00:02:02\n\
             networks:      backend, db\n\
             egress:        deny_all\n\
             allow cidrs:   10.1.0.0/16, 192.0.2.7/32\n\
             allow domains: *.example.com\n\
             allow ports:   443, 80\n\
             deny cidrs:    10.1.2.0/24\n"
        );
        // The default policy, no networks: just the mode and a dash.
        let plain = detail.network.as_mut().unwrap();
        plain.networks.clear();
        plain.egress = EgressPolicy::default();
        let text = inspect_text(&detail, str::to_owned);
        assert!(
            text.contains("networks:      -\negress:        allow_all\n\nno events\n"),
            "{text}"
        );
        // Without a network, no section.
        detail.network = None;
        assert!(!inspect_text(&detail, str::to_owned).contains("NETWORK"));
    }

    #[test]
    fn inspect_network_text_cannot_drive_the_terminal() {
        let mut network = vm_network();
        network.networks = vec!["back\x1b[2Jend".into()];
        network.egress.allow_domains = vec!["evil\x1b]0;owned\x07.example.com".into()];
        network.egress.deny_cidrs = vec!["\u{202e}10.0.0.0/8".into()];
        network.mac = "\x1b[1A".into();
        let detail = VmDetail {
            vm: vm("demo", VmState::Running),
            network: Some(network),
            volumes: vec![],
            events: vec![],
        };
        for text in [inspect_text(&detail, str::to_owned), egress_text(&detail)] {
            assert!(
                !text.contains('\x1b') && !text.contains('\u{202e}'),
                "{text:?}"
            );
            assert!(
                text.contains("allow domains: evil\\x1b]0;owned\\x07.example.com\n"),
                "{text}"
            );
            assert!(text.contains("\\u{202e}10.0.0.0/8"), "{text}");
        }
        let text = inspect_text(&detail, str::to_owned);
        assert!(text.contains("networks:      back\\x1b[2Jend\n"), "{text}");
        assert!(text.contains("mac:           \\x1b[1A\n"), "{text}");
    }

    #[test]
    fn egress_prints_the_new_policy() {
        let mut detail = VmDetail {
            vm: vm("demo", VmState::Running),
            network: Some(vm_network()),
            volumes: vec![],
            events: vec![],
        };
        let network = detail.network.as_mut().unwrap();
        network.egress.allow_ports.clear();
        network.egress.allow_domains.clear();
        network.egress.deny_cidrs.clear();
        assert_eq!(
            egress_text(&detail),
            "vm:          demo\n\
             egress:      deny_all\n\
             allow cidrs: 10.1.0.0/16, 192.0.2.7/32\n\
             allow ports: any\n"
        );
        detail.network = None;
        assert_eq!(
            egress_text(&detail),
            "vm demo has no network, so no egress policy\n"
        );
    }

    #[test]
    fn created_line() {
        let mut detail = VmDetail {
            vm: vm("demo", VmState::Running),
            network: None,
            volumes: vec![],
            events: vec![],
        };
        assert_eq!(
            created_text(&detail),
            "created vm demo (running; 2 cpus, 1G RAM, 10G rootfs)\n"
        );
        detail.network = Some(vm_network());
        assert_eq!(
            created_text(&detail),
            "created vm demo (running; 2 cpus, 1G RAM, 10G rootfs; address 172.28.0.6)\n"
        );
    }
}

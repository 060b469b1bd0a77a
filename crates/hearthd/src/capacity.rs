//! Admission control: what the host has, what VMs have committed, and whether one more VM fits.
//! A request that does not fit is refused at once, naming the resource, what was asked and what
//! is free, before anything is made for it.
//!
//! Four resources are accounted. vCPUs and guest RAM are committed by VMs that are starting,
//! running or stopping; RAM-file space (the tmpfs holding guest RAM) likewise, and it is never
//! overcommitted (a full tmpfs kills guests); root disks are committed by every VM, as sparse
//! files whose provisioned size may be overcommitted, while the free space of the data directory's
//! filesystem must also stay above a reserve.

use std::path::Path;

use hearth_api::{Capacity, Resource};

use crate::config::CapacityConfig;

/// What the host has, as measured now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub cpus: u64,
    pub memory_mib: u64,
    /// Size of the filesystem holding guest RAM files.
    pub ram_files_mib: u64,
    /// Size of the data directory's filesystem, and what is free there.
    pub disk_mib: u64,
    pub disk_free_mib: u64,
}

/// What VMs have committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// vCPUs and RAM of VMs that are starting, running, paused or stopping.
    pub cpus: u64,
    pub memory_mib: u64,
    /// Provisioned root disks of all VMs.
    pub disk_mib: u64,
}

/// What one VM asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub cpus: u64,
    pub memory_mib: u64,
    /// A new root disk of this size (0: the VM has its disk already).
    pub disk_mib: u64,
    /// The VM is to run (so it commits vCPUs and RAM).
    pub run: bool,
}

/// A VM that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not enough {resource} on this host: the VM needs {asked} {unit}, {free} {unit} {are} free ({detail}); {hint}",
    are = if *free == 1 { "is" } else { "are" }
)]
pub struct CapacityError {
    pub resource: &'static str,
    pub unit: &'static str,
    pub asked: u64,
    pub free: u64,
    pub detail: String,
    pub hint: &'static str,
    /// Disk space (507) rather than compute (409).
    pub disk: bool,
}

fn percent(value: u64, pct: u64) -> u64 {
    u64::try_from(u128::from(value) * u128::from(pct) / 100).unwrap_or(u64::MAX)
}

/// The totals VMs may commit, after overcommit ratios and reserves.
fn limits(host: &Host, cfg: &CapacityConfig) -> (u64, u64, u64, u64) {
    let cpus = percent(host.cpus, cfg.cpu_overcommit_percent);
    let memory = percent(
        host.memory_mib.saturating_sub(cfg.memory_reserve_mib),
        cfg.memory_overcommit_percent,
    );
    let disk = percent(host.disk_mib, cfg.disk_overcommit_percent);
    let disk_free = host.disk_free_mib.saturating_sub(cfg.disk_reserve_mib);
    (cpus, memory, disk, disk_free)
}

/// Decides whether `demand` fits beside what is `committed`.
pub fn check(
    host: &Host,
    cfg: &CapacityConfig,
    committed: Committed,
    demand: Demand,
) -> Result<(), CapacityError> {
    let (cpus, memory, disk, disk_free) = limits(host, cfg);
    let fits = |total: u64, used: u64, asked: u64| asked <= total.saturating_sub(used);
    if demand.run {
        if !fits(cpus, committed.cpus, demand.cpus) {
            return Err(CapacityError {
                resource: "vCPUs",
                unit: "vCPUs",
                asked: demand.cpus,
                free: cpus.saturating_sub(committed.cpus),
                detail: format!(
                    "{} host CPUs at {} % make {cpus}, {} committed to running VMs",
                    host.cpus, cfg.cpu_overcommit_percent, committed.cpus
                ),
                hint: "stop a VM, or raise capacity.cpu_overcommit_percent",
                disk: false,
            });
        }
        if !fits(memory, committed.memory_mib, demand.memory_mib) {
            return Err(CapacityError {
                resource: "memory",
                unit: "MiB",
                asked: demand.memory_mib,
                free: memory.saturating_sub(committed.memory_mib),
                detail: format!(
                    "{} MiB of host memory less {} MiB reserved, at {} %, make {memory} MiB; {} MiB committed to running VMs",
                    host.memory_mib,
                    cfg.memory_reserve_mib,
                    cfg.memory_overcommit_percent,
                    committed.memory_mib
                ),
                hint: "stop a VM, ask for less RAM, or change capacity.memory_reserve / capacity.memory_overcommit_percent",
                disk: false,
            });
        }
        if !fits(host.ram_files_mib, committed.memory_mib, demand.memory_mib) {
            return Err(CapacityError {
                resource: "space for guest RAM files",
                unit: "MiB",
                asked: demand.memory_mib,
                free: host.ram_files_mib.saturating_sub(committed.memory_mib),
                detail: format!(
                    "the RAM-file filesystem holds {} MiB, {} MiB committed to running VMs",
                    host.ram_files_mib, committed.memory_mib
                ),
                hint: "stop a VM, ask for less RAM, or enlarge the tmpfs that holds guest RAM",
                disk: false,
            });
        }
    }
    if demand.disk_mib > 0 {
        if !fits(disk, committed.disk_mib, demand.disk_mib) {
            return Err(CapacityError {
                resource: "disk",
                unit: "MiB",
                asked: demand.disk_mib,
                free: disk.saturating_sub(committed.disk_mib),
                detail: format!(
                    "the data directory's filesystem has {} MiB, at {} % make {disk} MiB; {} MiB provisioned for VM disks",
                    host.disk_mib, cfg.disk_overcommit_percent, committed.disk_mib
                ),
                hint: "delete a VM, ask for a smaller disk, or raise capacity.disk_overcommit_percent",
                disk: true,
            });
        }
        if disk_free == 0 {
            return Err(CapacityError {
                resource: "free disk space",
                unit: "MiB",
                asked: cfg.disk_reserve_mib,
                free: host.disk_free_mib,
                detail: format!(
                    "capacity.disk_reserve keeps {} MiB free",
                    cfg.disk_reserve_mib
                ),
                hint: "free space in the data directory",
                disk: true,
            });
        }
    }
    Ok(())
}

/// Refuses a copy of `mib` MiB into the data directory (a backup, a restore) that would leave
/// less free than `capacity.disk_reserve`.
pub fn check_copy(host: &Host, cfg: &CapacityConfig, what: &str, mib: u64) -> Result<(), String> {
    let free = host.disk_free_mib.saturating_sub(cfg.disk_reserve_mib);
    if mib <= free {
        return Ok(());
    }
    Err(format!(
        "not enough free disk space on this host: {what} needs {mib} MiB, {free} MiB are free past the {} MiB capacity.disk_reserve keeps; delete a backup or a VM, or free space in the data directory",
        cfg.disk_reserve_mib
    ))
}

/// Refuses a new volume of `mib` MiB that, filled, would leave less free on the data
/// filesystem than `min_free_mib` (`volumes.min_free_disk`).
pub fn check_volume(host: &Host, min_free_mib: u64, mib: u64) -> Result<(), String> {
    let left = host.disk_free_mib.saturating_sub(mib);
    if host.disk_free_mib >= mib && left >= min_free_mib {
        return Ok(());
    }
    Err(format!(
        "not enough free disk space on this host for a volume of {mib} MiB: {} MiB are free, and volumes.min_free_disk keeps {min_free_mib} MiB free after it; make it smaller, or free space in the data directory",
        host.disk_free_mib
    ))
}

/// Capacity and use, as `hearth health` shows them.
pub fn summary(host: &Host, cfg: &CapacityConfig, committed: Committed) -> Capacity {
    let (cpus, memory, disk, disk_free) = limits(host, cfg);
    let resource = |total: u64, used: u64| Resource {
        total,
        committed: used,
        available: total.saturating_sub(used),
    };
    Capacity {
        vcpus: resource(cpus, committed.cpus),
        memory_mib: resource(memory, committed.memory_mib),
        ram_files_mib: resource(host.ram_files_mib, committed.memory_mib),
        disk_mib: resource(disk, committed.disk_mib),
        disk_free_mib: disk_free,
    }
}

/// Measures the host: CPUs, memory, and the filesystems of `ram_dir` and `data_dir`. A backend
/// that keeps no guest RAM in files (`ram_dir` `None`) is bounded by memory alone.
pub fn probe(ram_dir: Option<&Path>, data_dir: &Path) -> std::io::Result<Host> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let memory_mib = meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) / 1024;
    let mib = |blocks: u64, size: u64| {
        u64::try_from(u128::from(blocks) * u128::from(size) / (1 << 20)).unwrap_or(u64::MAX)
    };
    let ram_files_mib = match ram_dir {
        Some(dir) => {
            let ram = nix::sys::statvfs::statvfs(dir)?;
            mib(ram.blocks(), ram.fragment_size())
        }
        None => memory_mib,
    };
    let data = nix::sys::statvfs::statvfs(data_dir)?;
    Ok(Host {
        cpus,
        memory_mib,
        ram_files_mib,
        disk_mib: mib(data.blocks(), data.fragment_size()),
        disk_free_mib: mib(data.blocks_available(), data.fragment_size()),
    })
}

fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Host = Host {
        cpus: 2,
        memory_mib: 24 * 1024,
        ram_files_mib: 12 * 1024,
        disk_mib: 100 * 1024,
        disk_free_mib: 80 * 1024,
    };
    const CFG: CapacityConfig = CapacityConfig {
        cpu_overcommit_percent: 400,
        memory_overcommit_percent: 100,
        memory_reserve_mib: 1024,
        disk_overcommit_percent: 200,
        disk_reserve_mib: 2048,
    };

    fn vm(cpus: u64, memory_mib: u64, disk_mib: u64) -> Demand {
        Demand {
            cpus,
            memory_mib,
            disk_mib,
            run: true,
        }
    }

    #[test]
    fn a_vm_that_fits_is_admitted() {
        assert_eq!(
            check(&HOST, &CFG, Committed::default(), vm(2, 2048, 10240)),
            Ok(())
        );
    }

    #[test]
    fn a_terabyte_of_ram_is_refused_naming_resource_asked_and_free() {
        let e = check(&HOST, &CFG, Committed::default(), vm(1, 1 << 20, 10240)).unwrap_err();
        assert_eq!(
            (e.resource, e.asked, e.free, e.disk),
            ("memory", 1 << 20, 23 * 1024, false)
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "not enough memory on this host: the VM needs 1048576 MiB, 23552 MiB are free"
            ),
            "{msg}"
        );
        assert!(msg.contains("capacity.memory_reserve"), "{msg}");
    }

    #[test]
    fn committed_resources_count() {
        let busy = Committed {
            cpus: 7,
            memory_mib: 11 * 1024,
            disk_mib: 195 * 1024,
        };
        let e = check(&HOST, &CFG, busy, vm(2, 512, 0)).unwrap_err();
        assert_eq!((e.resource, e.free), ("vCPUs", 1));
        // RAM files: 12 GiB of tmpfs, 11 committed: a 2 GiB guest does not fit there.
        let e = check(&HOST, &CFG, busy, vm(1, 2048, 0)).unwrap_err();
        assert_eq!((e.resource, e.free), ("space for guest RAM files", 1024));
        let e = check(&HOST, &CFG, busy, vm(1, 512, 10240)).unwrap_err();
        assert_eq!((e.resource, e.free, e.disk), ("disk", 5 * 1024, true));
    }

    #[test]
    fn a_copy_must_leave_the_disk_reserve_free() {
        let free = HOST.disk_free_mib - CFG.disk_reserve_mib;
        assert_eq!(check_copy(&HOST, &CFG, "the backup", free), Ok(()));
        let e = check_copy(&HOST, &CFG, "the backup", free + 1).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "not enough free disk space on this host: the backup needs {} MiB, {free} MiB are free",
                free + 1
            )),
            "{e}"
        );
        assert!(e.contains("capacity.disk_reserve"), "{e}");
    }

    #[test]
    fn a_volume_must_leave_the_floor_free_when_full() {
        // 80 GiB free, a 10 GiB floor: 70 GiB fit, one MiB more does not.
        assert_eq!(check_volume(&HOST, 10 * 1024, 70 * 1024), Ok(()));
        let e = check_volume(&HOST, 10 * 1024, 70 * 1024 + 1).unwrap_err();
        assert!(
            e.contains("81920 MiB are free") && e.contains("volumes.min_free_disk keeps 10240 MiB"),
            "{e}"
        );
        assert!(check_volume(&HOST, 0, 81 * 1024).is_err());
    }

    #[test]
    fn a_stopped_vm_commits_no_compute_and_an_existing_disk_no_space() {
        let full = Committed {
            cpus: 8,
            memory_mib: 23 * 1024,
            disk_mib: 200 * 1024,
        };
        let create_stopped = Demand {
            run: false,
            ..vm(2, 4096, 0)
        };
        assert_eq!(check(&HOST, &CFG, full, create_stopped), Ok(()));
    }

    #[test]
    fn the_disk_reserve_is_kept() {
        let host = Host {
            disk_free_mib: 2000,
            ..HOST
        };
        let e = check(&host, &CFG, Committed::default(), vm(1, 512, 1024)).unwrap_err();
        assert_eq!((e.resource, e.disk), ("free disk space", true));
    }

    #[test]
    fn the_summary_applies_ratios_and_reserves() {
        let used = Committed {
            cpus: 3,
            memory_mib: 1024,
            disk_mib: 10240,
        };
        let c = summary(&HOST, &CFG, used);
        assert_eq!((c.vcpus.total, c.vcpus.available), (8, 5));
        assert_eq!(
            (c.memory_mib.total, c.memory_mib.available),
            (23 * 1024, 22 * 1024)
        );
        assert_eq!(c.ram_files_mib.available, 11 * 1024);
        assert_eq!(c.disk_mib.total, 200 * 1024);
        assert_eq!(c.disk_free_mib, 78 * 1024);
    }

    #[test]
    fn the_host_is_measured() {
        let dir = tempfile::tempdir().unwrap();
        let host = probe(Some(Path::new("/dev/shm")), dir.path()).unwrap();
        assert_eq!(
            probe(None, dir.path()).unwrap().ram_files_mib,
            host.memory_mib
        );
        assert!(host.cpus >= 1 && host.memory_mib > 0 && host.disk_mib > 0);
        assert_eq!(
            meminfo_kib("MemTotal:       24576000 kB\n", "MemTotal"),
            Some(24_576_000)
        );
    }
}

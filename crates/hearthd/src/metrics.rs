//! Prometheus metrics (`GET /metrics`, OpenMetrics text by `prometheus-client`).
//!
//! Kept as they happen: every action's duration (`hearth_action_duration_seconds{action}`), its
//! failures by error code (`hearth_action_errors_total{action,code}`) and admission refusals
//! (`hearth_admission_refusals_total{code}`). Taken at each scrape ([`Snapshot`], filled by
//! `vm` before encoding): VMs per state, the host's capacity and what VMs committed of it, and
//! each running VM's VMM process CPU time and resident memory from `/proc`.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    action: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

/// What a scrape reads of the host and its VMs at that moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Every state, with how many VMs are in it (zeros included).
    pub vms_by_state: Vec<(&'static str, u64)>,
    /// Resource name, total, committed.
    pub capacity: Vec<(&'static str, u64, u64)>,
    pub vms: Vec<VmSample>,
}

/// A running VM's VMM process, read from `/proc`.
#[derive(Debug, Clone)]
pub struct VmSample {
    pub name: String,
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// The registry and the metrics kept as things happen.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    actions: Family<ActionLabels, Histogram, fn() -> Histogram>,
    errors: Family<ErrorLabels, Counter>,
    refusals: Family<CodeLabels, Counter>,
    snapshot: Arc<Mutex<Snapshot>>,
}

fn duration_histogram() -> Histogram {
    // 1 ms to about 2 minutes: an exec round trip to a cold boot under TCG.
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let actions = Family::<ActionLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        let refusals = Family::<CodeLabels, Counter>::default();
        registry.register(
            "hearth_action_duration_seconds",
            "How long each action took, from its request to its answer (a create: until the VM runs)",
            actions.clone(),
        );
        registry.register(
            "hearth_action_errors",
            "Actions that failed, by the error code they answered",
            errors.clone(),
        );
        registry.register(
            "hearth_admission_refusals",
            "Creates and starts refused because the host could not hold them",
            refusals.clone(),
        );
        let snapshot = Arc::new(Mutex::new(Snapshot::default()));
        registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
        Metrics {
            registry,
            actions,
            errors,
            refusals,
            snapshot,
        }
    }

    /// Records one action's end.
    pub fn action(&self, action: &'static str, seconds: f64, error: Option<&'static str>) {
        self.actions
            .get_or_create(&ActionLabels { action })
            .observe(seconds);
        if let Some(code) = error {
            self.errors
                .get_or_create(&ErrorLabels { action, code })
                .inc();
            if matches!(code, "insufficient_capacity" | "resource_exhausted")
                && matches!(action, "create_vm" | "start_vm")
            {
                self.refusals.get_or_create(&CodeLabels { code }).inc();
            }
        }
    }

    /// Every metric, with `snapshot` as the scrape-time values: OpenMetrics text, or with
    /// `openmetrics` false Prometheus' classic text format (version 0.0.4).
    pub fn encode(&self, snapshot: Snapshot, openmetrics: bool) -> String {
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = snapshot;
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        if openmetrics { text } else { classic(&text) }
    }
}

/// OpenMetrics text as Prometheus' classic format reads it. The two differ here only in how a
/// counter's family is named (OpenMetrics: `x` with samples `x_total`; classic: `x_total`) and
/// in OpenMetrics' `# EOF` and `# UNIT` lines.
fn classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[derive(Debug)]
struct SnapshotCollector(Arc<Mutex<Snapshot>>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let gauge = prometheus_client::metrics::MetricType::Gauge;
        let counter = prometheus_client::metrics::MetricType::Counter;
        {
            let mut family =
                encoder.encode_descriptor("hearth_vms", "VMs in each state", None, gauge)?;
            for (state, n) in &s.vms_by_state {
                let labels = [("state", *state)];
                ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "hearth_capacity",
                "The host's capacity for VMs (vcpus; memory, ram_files and disk in MiB)",
                None,
                gauge,
            )?;
            for (resource, total, _) in &s.capacity {
                let labels = [("resource", *resource)];
                ConstGauge::new(i64::try_from(*total).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "hearth_committed",
                "What VMs have committed of the host's capacity (same units as hearth_capacity)",
                None,
                gauge,
            )?;
            for (resource, _, committed) in &s.capacity {
                let labels = [("resource", *resource)];
                ConstGauge::new(i64::try_from(*committed).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "hearth_vm_cpu_seconds",
                "CPU time of each running VM's VMM process (its vCPUs and emulation)",
                None,
                counter,
            )?;
            for vm in &s.vms {
                let labels = [("vm", vm.name.as_str())];
                ConstCounter::new(vm.cpu_seconds).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "hearth_vm_memory_bytes",
                "Resident memory of each running VM's VMM process",
                None,
                gauge,
            )?;
            for vm in &s.vms {
                let labels = [("vm", vm.name.as_str())];
                ConstGauge::new(i64::try_from(vm.rss_bytes).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A process's CPU seconds, resident bytes and age in seconds, from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcessSample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub uptime_secs: u64,
}

/// [`ProcessSample`] of `pid`, from `/proc/<pid>/stat` (read once), `statm` and `/proc/uptime`.
pub fn process(pid: u32) -> Option<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n)?.parse::<u64>().ok();
    // utime and stime are fields 14 and 15 of the whole line (12 and 13 after the name),
    // starttime field 22 (20): clock ticks after boot.
    let (ticks, start_ticks) = (field(11)? + field(12)?, field(19)?);
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    let page = u64::try_from(page).ok()?;
    // Whole seconds since boot ("12345.67 …").
    let up: u64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split(['.', ' '])
        .next()?
        .parse()
        .ok()?;
    Some(ProcessSample {
        cpu_seconds: ticks as f64 / hz as f64,
        rss_bytes: pages * page,
        uptime_secs: up.saturating_sub(start_ticks / hz),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_and_the_snapshot_are_encoded() {
        let m = Metrics::new();
        m.action("create_vm", 2.5, None);
        m.action("create_vm", 0.01, Some("insufficient_capacity"));
        m.action("exec", 0.002, Some("guest_timeout"));
        let snapshot = Snapshot {
            vms_by_state: vec![("running", 2), ("stopped", 0)],
            capacity: vec![("vcpus", 8, 2)],
            vms: vec![VmSample {
                name: "web".into(),
                cpu_seconds: 1.5,
                rss_bytes: 1 << 20,
            }],
        };
        let text = m.encode(snapshot.clone(), true);
        for line in [
            "hearth_action_duration_seconds_count{action=\"create_vm\"} 2",
            "hearth_action_errors_total{action=\"exec\",code=\"guest_timeout\"} 1",
            "hearth_admission_refusals_total{code=\"insufficient_capacity\"} 1",
            "hearth_vms{state=\"running\"} 2",
            "hearth_vms{state=\"stopped\"} 0",
            "hearth_capacity{resource=\"vcpus\"} 8",
            "hearth_committed{resource=\"vcpus\"} 2",
            "hearth_vm_cpu_seconds_total{vm=\"web\"} 1.5",
            "hearth_vm_memory_bytes{vm=\"web\"} 1048576",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        let classic = m.encode(snapshot, false);
        assert!(!classic.contains("# EOF"), "{classic}");
        assert!(
            classic.contains("# TYPE hearth_action_errors_total counter\n"),
            "{classic}"
        );
        assert!(classic.contains("# TYPE hearth_vms gauge\n"), "{classic}");
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = process(std::process::id()).unwrap();
        assert!(me.cpu_seconds >= 0.0 && me.rss_bytes > 1 << 20, "{me:?}");
        assert!(process(u32::MAX).is_none());
        assert!(me.uptime_secs < 24 * 3600, "{me:?}");
    }
}

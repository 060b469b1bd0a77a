//! `hearth top`: a live table of the VMs (state, CPU %, memory, uptime), redrawn every
//! interval on a terminal; one table (after one interval, so CPU % means something) when the
//! output is not a terminal; `--json` prints one sample of `GET /v1/stats` as it is. On a
//! terminal `q` (or Ctrl-C) quits.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use hearth_api::VmStats;

use crate::cli::TopArgs;
use crate::client::Client;
use crate::error::Result;
use crate::printer::Printer;
use crate::render::{size_bytes, size_mib, table, terminal_safe};
use crate::tty::RawMode;

pub async fn run(client: &Client, printer: &Printer, args: TopArgs) -> Result<()> {
    let first = client.stats().await?;
    if printer.is_json() {
        printer.result(&first, |_| String::new());
        return Ok(());
    }
    let interval = Duration::from_secs_f64(args.interval.max(0.2));
    let live = std::io::stdout().is_terminal();
    // On a terminal, `q` quits (keys are read one at a time, without echo, until we return).
    let stdin = std::io::stdin();
    let keys_mode = if live && stdin.is_terminal() {
        RawMode::keys(&stdin).ok()
    } else {
        None
    };
    let mut keys = keys_mode.as_ref().map(|_| key_reader());
    let (mut before, mut at) = (first.data, Instant::now());
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            key = next_key(&mut keys) => match key {
                Some(b'q' | b'Q') => return Ok(()),
                Some(_) => continue,
                None => keys = None,
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let now = client.stats().await?.data;
        let elapsed = at.elapsed().as_secs_f64();
        let frame = render(&before, &now, elapsed);
        if live {
            // Home and clear, then the frame: the table is redrawn in place.
            printer.text(&format!("\x1b[H\x1b[2J{frame}"));
        } else {
            printer.text(&frame);
            return Ok(());
        }
        (before, at) = (now, Instant::now());
    }
}

/// Keys typed on stdin, read by a thread of their own (a blocking read that may never end).
fn key_reader() -> tokio::sync::mpsc::Receiver<u8> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut byte = [0u8; 1];
        while let Ok(1) = std::io::Read::read(&mut stdin, &mut byte) {
            if tx.blocking_send(byte[0]).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next key; None at the end of input; never when there is no reader.
async fn next_key(keys: &mut Option<tokio::sync::mpsc::Receiver<u8>>) -> Option<u8> {
    match keys {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// CPU use of a VM between two samples, in % of one host CPU.
fn cpu_percent(before: Option<f64>, now: Option<f64>, elapsed: f64) -> Option<f64> {
    let (b, n) = (before?, now?);
    (elapsed > 0.0 && n >= b).then(|| (n - b) / elapsed * 100.0)
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn render(before: &[VmStats], now: &[VmStats], elapsed: f64) -> String {
    let earlier: HashMap<&str, Option<f64>> = before
        .iter()
        .map(|v| (v.name.as_str(), v.cpu_seconds))
        .collect();
    let rows: Vec<Vec<String>> = now
        .iter()
        .map(|v| {
            let cpu = cpu_percent(
                earlier.get(v.name.as_str()).copied().flatten(),
                v.cpu_seconds,
                elapsed,
            );
            vec![
                terminal_safe(&v.name),
                v.state.to_string(),
                v.cpus.to_string(),
                cpu.map_or_else(|| "-".into(), |c| format!("{c:.1}")),
                v.rss_bytes.map_or_else(|| "-".into(), size_bytes),
                size_mib(v.memory_mib),
                v.uptime_secs.map_or_else(|| "-".into(), uptime),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no VMs; `hearth vm new NAME` makes one\n".into();
    }
    table(
        &["NAME", "STATE", "CPUS", "CPU%", "MEM", "RAM", "UPTIME"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::VmState;

    fn stats(name: &str, cpu: Option<f64>) -> VmStats {
        VmStats {
            name: name.into(),
            state: VmState::Running,
            cpus: 2,
            memory_mib: 1024,
            cpu_seconds: cpu,
            rss_bytes: cpu.map(|_| 300 << 20),
            uptime_secs: cpu.map(|_| 3725),
        }
    }

    #[test]
    fn cpu_is_the_difference_over_the_interval() {
        assert_eq!(cpu_percent(Some(1.0), Some(1.5), 1.0), Some(50.0));
        assert_eq!(
            cpu_percent(Some(1.0), Some(3.0), 1.0),
            Some(200.0),
            "two vCPUs busy"
        );
        assert_eq!(cpu_percent(None, Some(1.0), 1.0), None, "no earlier sample");
        assert_eq!(
            cpu_percent(Some(5.0), Some(1.0), 1.0),
            None,
            "a new VMM process"
        );
    }

    #[test]
    fn the_table_shows_each_vm_and_dashes_for_stopped_ones() {
        let before = [stats("web", Some(10.0)), stats("db", None)];
        let mut db = stats("db", None);
        db.state = VmState::Stopped;
        let now = [
            stats("web", Some(10.25)),
            db,
            stats("new\x1b[2J", Some(1.0)),
        ];
        let text = render(&before, &now, 0.5);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{text}");
        assert!(
            lines[1].contains("web") && lines[1].contains("50.0"),
            "{text}"
        );
        assert!(
            lines[1].contains("300.0M") && lines[1].contains("1h02m"),
            "{text}"
        );
        assert!(
            lines[2].contains("stopped") && lines[2].contains(" -"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "names are escaped: {text}");
        assert_eq!(
            render(&[], &[], 1.0),
            "no VMs; `hearth vm new NAME` makes one\n"
        );
    }
}

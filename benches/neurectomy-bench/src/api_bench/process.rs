//! What `/proc` says about the API process (memory, CPU time) and about
//! this one (its open-files limit, the load average), and how much of the
//! link order the `neurectomy` binary has.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the API's RSS is sampled under load.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// Raises the soft limit on open files to the hard limit when `needed` is
/// above it (with util-linux `prlimit`: this crate forbids `unsafe`, so no
/// `setrlimit`). The API process inherits the limit. Only warns on failure:
/// the connections that cannot open are counted and reported.
pub(super) async fn raise_fd_limit(needed: u64) {
    let Some((soft, hard)) = fd_limits() else {
        return;
    };
    if soft >= needed {
        return;
    }
    let pid = std::process::id().to_string();
    let raised = tokio::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status()
        .await;
    match (raised, fd_limits()) {
        (Ok(status), Some((now, _))) if status.success() && now >= needed => {
            eprintln!("raised the open-files limit from {soft} to {now}");
        }
        (_, now) => eprintln!(
            "warning: the open-files limit is {} (hard {hard}), below the {needed} needed; `ulimit -n {needed}` first",
            now.map_or(soft, |(s, _)| s)
        ),
    }
}

/// (soft, hard) limits on open files of this process.
fn fd_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace().map(|v| {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    });
    Some((numbers.next()??, numbers.next()??))
}

/// The 1-, 5- and 15-minute load averages.
pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// A process's memory, from `/proc/<pid>/status` (KiB).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Memory {
    pub(super) rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

impl Memory {
    pub(super) fn describe(&self) -> String {
        format!(
            "anon {:.1} + file {:.1} MiB; peak (VmHWM) {:.1} MiB; {} threads",
            mib(self.anon_kib),
            mib(self.file_kib),
            mib(self.hwm_kib),
            self.threads
        )
    }
}

/// How much of the link order (`api/link/neurectomy.order`, see
/// `api/build.rs`) `binary` has: the functions it names that the binary
/// lacks (renamed by a dependency, feature or compiler change) are laid out
/// anywhere, and idle RSS grows; `scripts/link-order.sh` makes it anew.
/// `None` outside the source tree or without `nm`.
pub(super) fn link_order(binary: &Path) -> Option<String> {
    let order = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../api/link/neurectomy.order"
    ))
    .ok()?;
    let listing = std::process::Command::new("nm")
        .arg("--defined-only")
        .arg(binary)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let symbols: std::collections::HashSet<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .collect();
    let wanted: Vec<&str> = order.lines().filter(|l| !l.is_empty()).collect();
    let found = wanted.iter().filter(|name| symbols.contains(*name)).count();
    let mut note = format!(
        "link order: {found} of {} functions in the binary",
        wanted.len()
    );
    if found * 10 < wanted.len() * 9 {
        note.push_str(" (stale: run scripts/link-order.sh)");
    }
    Some(note)
}

pub(super) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(super) fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(parse_status(&status))
}

fn parse_status(status: &str) -> Memory {
    let mut memory = Memory::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let number = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match key {
            "VmRSS" => memory.rss_kib = number,
            "VmHWM" => memory.hwm_kib = number,
            "RssAnon" => memory.anon_kib = number,
            "RssFile" => memory.file_kib = number,
            "Threads" => memory.threads = number,
            _ => {}
        }
    }
    memory
}

/// Samples a process's VmRSS every [`SAMPLE_EVERY`] until `stop`; returns the largest.
pub(super) fn sample_rss(pid: u32, stop: CancellationToken) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut largest = 0;
        loop {
            if let Ok(m) = memory(pid) {
                largest = largest.max(m.rss_kib);
            }
            tokio::select! {
                () = stop.cancelled() => return largest,
                () = tokio::time::sleep(SAMPLE_EVERY) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_memory_lines_are_read() {
        let status = "Name:\tneurectomy\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nRssAnon:\t    6144 kB\nRssFile:\t    4096 kB\nThreads:\t5\n";
        let m = parse_status(status);
        assert_eq!(
            (m.rss_kib, m.hwm_kib, m.anon_kib, m.file_kib, m.threads),
            (10_240, 20_480, 6_144, 4_096, 5)
        );
    }
}

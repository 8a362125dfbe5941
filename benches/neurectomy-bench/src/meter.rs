//! What one operation costs, measured around a window of many of them:
//!
//! - **CPU time** (user + system) of the measured process and of the
//!   services it talks to (PostgreSQL, Redis, NATS, the graph server),
//!   from `/proc/<pid>/stat` — every process of a service counted, so a
//!   PostgreSQL commit's WAL writer is part of its cost;
//! - **software events** of the measured process — task-clock, context
//!   switches, CPU migrations — from `perf stat` (no hardware counters
//!   needed), or context switches from `/proc/<pid>/task/*/status` where
//!   `perf` is missing or not permitted;
//! - **instructions** under `valgrind --tool=callgrind`, when the measured
//!   process runs under it: the counters are zeroed at the start of the
//!   window and read at its end with `callgrind_control`, so start-up and
//!   set-up are not counted. Exact and repeatable whatever else the machine
//!   does; blind to the kernel (which the context switches stand in for).
//!
//! A [`Meter`] is started before a window and finished after it with the
//! number of operations done; the [`Cost`] it returns is per operation.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ: 100 on every
/// Linux ABI).
const USER_HZ: f64 = 100.0;

/// A service whose processes' CPU time is counted beside ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Peer {
    /// Every `postgres` process (backends, WAL writer, checkpointer).
    Postgres,
    /// `redis-server`.
    Redis,
    /// `nats-server`.
    Nats,
    /// The Bolt graph server (ArcadeDB's or Neo4j's JVM).
    Graph,
}

impl Peer {
    /// Its short name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "PG",
            Self::Redis => "Redis",
            Self::Nats => "NATS",
            Self::Graph => "graph",
        }
    }

    /// Whether the process `comm` (with command line `cmdline`) is one of
    /// this service's.
    fn owns(self, comm: &str, cmdline: &str) -> bool {
        match self {
            Self::Postgres => comm == "postgres",
            Self::Redis => comm.starts_with("redis-server"),
            Self::Nats => comm == "nats-server",
            Self::Graph => {
                comm == "java" && (cmdline.contains("arcadedb") || cmdline.contains("neo4j"))
            }
        }
    }

    /// The pids of this service's processes now.
    fn pids(self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
                    .unwrap_or_default();
                self.owns(comm.trim_end(), &cmdline)
            })
            .collect()
    }
}

/// CPU time of a process so far: (user, system) seconds.
pub fn cpu_times(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat(&stat).with_context(|| format!("an unreadable /proc/{pid}/stat: {stat}"))
}

/// CPU time (user + system) the process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    cpu_times(pid).map(|(user, system)| user + system)
}

/// (user, system) seconds from a `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<(f64, f64)> {
    // The fields after the command name (which may hold spaces and
    // parentheses): utime and stime are fields 14 and 15 of the line,
    // 12 and 13 after the name.
    let (_, after) = stat.rsplit_once(')')?;
    let mut fields = after.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user / USER_HZ, system / USER_HZ))
}

/// Context switches (voluntary + involuntary) of each live thread of `pid`.
fn thread_switches(pid: u32) -> HashMap<u32, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .filter_map(|task| {
            let tid: u32 = task.ok()?.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            Some((tid, parse_switches(&status)))
        })
        .collect()
}

/// `voluntary_ctxt_switches` + `nonvoluntary_ctxt_switches` of a status file.
fn parse_switches(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.ends_with("ctxt_switches")
                .then(|| value.trim().parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// Switches between two snapshots: threads alive at both ends count their
/// difference, threads born in between all of theirs (threads that ended
/// in between are lost: `perf stat` counts them).
fn switches_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, end)| end.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// The figures of a window, per operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cost {
    /// Operations in the window.
    pub ops: u64,
    /// Seconds the window lasted.
    pub seconds: f64,
    /// CPU time (user + system) of the measured process, µs per operation.
    pub cpu_us: f64,
    /// The system share of that time, 0–1.
    pub system_share: f64,
    /// Context switches of the measured process per operation (`perf
    /// stat`, else `/proc`).
    pub switches: f64,
    /// Where `switches` came from: `perf` or `/proc`.
    pub switches_from: &'static str,
    /// CPU migrations per operation (`perf stat` only).
    pub migrations: Option<f64>,
    /// Task-clock, µs per operation (`perf stat` only).
    pub task_clock_us: Option<f64>,
    /// CPU time of each peer service, µs per operation.
    pub peers: Vec<(Peer, f64)>,
    /// Instructions per operation (under callgrind only).
    pub instructions: Option<f64>,
}

impl Cost {
    /// `12.3 µs CPU/op (sys 40 %), 1.9 cs/op; PG 520 µs/op`.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "{:.1} µs CPU/op (sys {:.0} %), {:.2} cs/op",
            self.cpu_us,
            self.system_share * 100.0,
            self.switches
        );
        if let Some(migrations) = self.migrations {
            text.push_str(&format!(", {migrations:.3} migrations/op"));
        }
        if let Some(instructions) = self.instructions {
            text.push_str(&format!(", {instructions:.0} Ir/op"));
        }
        for (peer, us) in &self.peers {
            text.push_str(&format!("; {} {us:.1} µs/op", peer.name()));
        }
        text
    }

    /// The CPU time of `peer` per operation, if it was measured.
    pub fn peer(&self, peer: Peer) -> Option<f64> {
        self.peers
            .iter()
            .find_map(|(p, us)| (*p == peer).then_some(*us))
    }
}

/// A running `perf stat -p <pid>` (ended with SIGINT, which makes it print).
struct PerfStat {
    child: tokio::process::Child,
}

/// What `perf stat` counted.
#[derive(Debug, Default, PartialEq)]
struct PerfCounts {
    task_clock_ms: Option<f64>,
    switches: Option<f64>,
    migrations: Option<f64>,
}

impl PerfStat {
    /// Starts counting `pid`'s software events, if `perf` can.
    async fn start(pid: u32) -> Option<Self> {
        if std::env::var_os("NEURECTOMY_BENCH_PERF").is_some_and(|v| v == "0") {
            return None;
        }
        let child = tokio::process::Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "task-clock,context-switches,cpu-migrations",
                "-p",
                &pid.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        // perf attaches to the threads within milliseconds; a window
        // starting earlier would lose its first operations' events.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        Some(Self { child })
    }

    /// Stops counting and reads the counts (none if perf failed).
    async fn finish(self) -> Option<PerfCounts> {
        let pid = self.child.id()?;
        let _ = tokio::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await;
        let output = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.child.wait_with_output(),
        )
        .await
        .ok()?
        .ok()?;
        let counts = parse_perf(&String::from_utf8_lossy(&output.stderr));
        (counts != PerfCounts::default()).then_some(counts)
    }
}

/// The counts of `perf stat -x,` output (`value,unit,event,…` lines).
fn parse_perf(text: &str) -> PerfCounts {
    let mut counts = PerfCounts::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(value), Some(event)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        match event.trim() {
            event if event.starts_with("task-clock") => counts.task_clock_ms = Some(value),
            event if event.starts_with("context-switches") => counts.switches = Some(value),
            event if event.starts_with("cpu-migrations") => counts.migrations = Some(value),
            _ => {}
        }
    }
    counts
}

/// A process running under `valgrind --tool=callgrind`, read and reset
/// with `callgrind_control` (from valgrind).
#[derive(Debug, Clone)]
pub struct Callgrind {
    pid: u32,
}

impl Callgrind {
    /// `pid`'s callgrind, if it runs under callgrind. (Valgrind shows a
    /// program its own `exe` and command line, not valgrind's; the tool's
    /// mapping gives it away.)
    pub fn of(pid: u32) -> Option<Self> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        maps.contains("/callgrind-").then_some(Self { pid })
    }

    async fn control(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::process::Command::new("callgrind_control")
            .args(args)
            .arg(self.pid.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .await
            .context("running callgrind_control (from valgrind)")?;
        anyhow::ensure!(
            output.status.success(),
            "callgrind_control {} {} failed: {}",
            args.join(" "),
            self.pid,
            output.status
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Zeroes the counters of every thread.
    async fn zero(&self) -> anyhow::Result<()> {
        self.control(&["--zero"]).await.map(drop)
    }

    /// Instructions counted since [`Callgrind::zero`], all threads; the
    /// profile of the window is dumped as `label` too (callgrind's dump
    /// files, `<--callgrind-out-file>.<n>`, for `callgrind_annotate`).
    async fn instructions(&self, label: &str) -> anyhow::Result<u64> {
        let text = self.control(&["-e", "Ir"]).await?;
        let total = thread_totals(&text)
            .with_context(|| format!("callgrind_control -e Ir printed {text:?}"))?;
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        self.control(&[&format!("--dump={label}")]).await?;
        Ok(total)
    }
}

/// The sum of the per-thread lines (`   Th 2  1,234,567`) of
/// `callgrind_control -e Ir`.
fn thread_totals(text: &str) -> Option<u64> {
    let counts: Vec<u64> = text
        .lines()
        .filter(|line| line.trim_start().starts_with("Th "))
        .map(|line| {
            line.split_whitespace()
                .last()
                .and_then(|n| n.replace(',', "").parse().ok())
        })
        .collect::<Option<_>>()?;
    (!counts.is_empty()).then(|| counts.iter().sum())
}

/// A window being measured.
pub struct Meter {
    label: String,
    pid: u32,
    started: Instant,
    cpu: (f64, f64),
    switches: HashMap<u32, u64>,
    peers: Vec<(Peer, Vec<(u32, f64)>)>,
    perf: Option<PerfStat>,
    callgrind: Option<Callgrind>,
}

impl Meter {
    /// Starts measuring process `pid` (ours: `std::process::id()`) and the
    /// processes of `peers`, as window `label`.
    pub async fn start(label: &str, pid: u32, peers: &[Peer]) -> anyhow::Result<Self> {
        let callgrind = Callgrind::of(pid);
        tracing::debug!(
            window = label,
            pid,
            callgrind = callgrind.is_some(),
            "metering"
        );
        let perf = match callgrind {
            // perf would count valgrind's translation, not the program.
            Some(_) => None,
            None => PerfStat::start(pid).await,
        };
        let peers = peers
            .iter()
            .map(|&peer| {
                let pids = peer
                    .pids()
                    .into_iter()
                    .filter_map(|p| Some((p, cpu_seconds(p).ok()?)))
                    .collect();
                (peer, pids)
            })
            .collect();
        if let Some(callgrind) = &callgrind {
            callgrind.zero().await?;
        }
        Ok(Self {
            label: label.to_owned(),
            pid,
            started: Instant::now(),
            cpu: cpu_times(pid)?,
            switches: thread_switches(pid),
            peers,
            perf,
            callgrind,
        })
    }

    /// Ends the window after `ops` operations.
    pub async fn finish(self, ops: u64) -> anyhow::Result<Cost> {
        let seconds = self.started.elapsed().as_secs_f64();
        let (user, system) = cpu_times(self.pid)?;
        let switches = switches_between(&self.switches, &thread_switches(self.pid));
        let instructions = match &self.callgrind {
            Some(callgrind) => Some(callgrind.instructions(&self.label).await?),
            None => None,
        };
        let perf = match self.perf {
            Some(perf) => perf.finish().await,
            None => None,
        };
        let per_op = |total: f64| total / ops.max(1) as f64;
        let cpu = (user - self.cpu.0) + (system - self.cpu.1);
        let peers = self
            .peers
            .into_iter()
            .map(|(peer, pids)| {
                // Processes the service started during the window (e.g. a
                // PostgreSQL backend for a new connection) count from zero.
                let before: HashMap<u32, f64> = pids.into_iter().collect();
                let used: f64 = peer
                    .pids()
                    .into_iter()
                    .filter_map(|pid| {
                        Some(cpu_seconds(pid).ok()? - before.get(&pid).copied().unwrap_or(0.0))
                    })
                    .sum();
                (peer, per_op(used * 1e6))
            })
            .collect();
        let (switches, switches_from) = match perf.as_ref().and_then(|p| p.switches) {
            Some(counted) => (counted, "perf"),
            None => (switches as f64, "/proc"),
        };
        Ok(Cost {
            ops,
            seconds,
            cpu_us: per_op(cpu * 1e6),
            system_share: if cpu > 0.0 {
                (system - self.cpu.1) / cpu
            } else {
                0.0
            },
            switches: per_op(switches),
            switches_from,
            migrations: perf.as_ref().and_then(|p| p.migrations).map(per_op),
            task_clock_us: perf
                .as_ref()
                .and_then(|p| p.task_clock_ms)
                .map(|ms| per_op(ms * 1e3)),
            peers,
            instructions: instructions.map(|i| per_op(i as f64)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_time_come_from_fields_14_and_15() {
        let stat = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 75 0 0 20 0 9 0 100 1000 200";
        assert_eq!(parse_stat(stat), Some((2.5, 0.75)));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
    }

    #[test]
    fn our_own_cpu_time_and_switches_are_readable() {
        let pid = std::process::id();
        let (user, system) = cpu_times(pid).unwrap();
        assert!(user >= 0.0 && system >= 0.0);
        let switches = thread_switches(pid);
        assert!(switches.contains_key(&pid), "{switches:?}");
    }

    #[test]
    fn switches_count_both_kinds_and_new_threads_in_full() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), 127);
        let before = HashMap::from([(1, 100), (2, 50)]);
        let after = HashMap::from([(1, 130), (3, 5)]);
        assert_eq!(switches_between(&before, &after), 35);
    }

    #[test]
    fn perf_stat_csv_is_read_by_event_name() {
        let text = "\n1503.21,msec,task-clock,1503212000,100.00,0.750,CPUs utilized\n\
                    2410,,context-switches,1503212000,100.00,1.603,K/sec\n\
                    12,,cpu-migrations,1503212000,100.00,7.983,/sec\n";
        assert_eq!(
            parse_perf(text),
            PerfCounts {
                task_clock_ms: Some(1503.21),
                switches: Some(2410.0),
                migrations: Some(12.0),
            }
        );
        assert_eq!(
            parse_perf("<not supported>,,context-switches,0,100.00,,\n"),
            PerfCounts::default()
        );
    }

    #[test]
    fn callgrind_counters_are_summed_over_threads() {
        let text = "PID 7: ./neurectomy serve\n\n  Totals:     Ir \n   Th 1  301,298 \n   Th 2  1,000,000 \n\n";
        assert_eq!(thread_totals(text), Some(1_301_298));
        assert_eq!(
            thread_totals("PID 7: x\n\n  Totals:Ir \n   Th 1   0 \n"),
            Some(0)
        );
        assert_eq!(thread_totals("No active callgrind runs detected.\n"), None);
    }

    #[test]
    fn services_are_recognised_by_their_process_names() {
        assert!(Peer::Postgres.owns("postgres", "postgres: walwriter"));
        assert!(Peer::Redis.owns("redis-server", "/usr/bin/redis-server 127.0.0.1:6379"));
        assert!(Peer::Graph.owns("java", "java -cp arcadedb-engine.jar"));
        assert!(!Peer::Graph.owns("java", "java -jar other.jar"));
        assert!(!Peer::Nats.owns("postgres", ""));
    }
}

//! A scenario's figures: rates and latency percentiles measured inside one
//! run, what one operation cost (CPU time, context switches, instructions:
//! [`crate::meter`]), the tables they are printed in (and the JSON of
//! `--json`), and the loop that drives concurrent writers for a duration.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::meter::{Cost, Meter, Peer};

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Scenario name.
    pub scenario: String,
    /// What `rate` counts.
    pub unit: &'static str,
    /// Operations per second.
    pub rate: f64,
    /// Median latency of one operation, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Operations completed.
    pub count: u64,
    /// Version conflicts retried (command scenarios).
    pub conflicts: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// What one operation cost this process (and the services it used).
    pub cost: Option<Cost>,
}

impl Figures {
    /// The figures with what one operation cost.
    pub fn with_cost(mut self, cost: Cost) -> Self {
        self.cost = Some(cost);
        self
    }
}

/// Prints the figures of `append`, `relay` or `project` as a table, and
/// writes them to `json` as well when given.
pub fn report(results: &[Figures], json: Option<&Path>) -> anyhow::Result<()> {
    println!(
        "\n{:<44} {:>14} {:>9} {:>9} {:>10}",
        "scenario", "rate", "p50 ms", "p99 ms", "conflicts"
    );
    for f in results {
        println!(
            "{:<44} {:>9.0} {:<4} {:>9.2} {:>9.2} {:>10}",
            f.scenario, f.rate, f.unit, f.p50_ms, f.p99_ms, f.conflicts
        );
    }
    let costs: Vec<(&str, &Cost)> = results
        .iter()
        .filter_map(|f| Some((f.scenario.as_str(), f.cost.as_ref()?)))
        .collect();
    print_costs(&costs);
    if let Some(path) = json {
        let json = serde_json::to_string_pretty(results)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Prints what one operation cost, per scenario: CPU time of this process
/// (µs, with its system share), its context switches and migrations, its
/// instructions (under callgrind), and the CPU time of the services.
pub fn print_costs(costs: &[(&str, &Cost)]) {
    if costs.is_empty() {
        return;
    }
    println!(
        "\nper operation: {:<37} {:>9} {:>5} {:>7} {:>7} {:>11}  services (µs CPU)",
        "scenario", "µs CPU", "sys%", "cs", "migr", "Ir"
    );
    for (scenario, cost) in costs {
        let services: Vec<String> = cost
            .peers
            .iter()
            .map(|(peer, us)| format!("{} {us:.1}", peer.name()))
            .collect();
        println!(
            "{:<52} {:>9.1} {:>5.0} {:>7.2} {:>7} {:>11}  {}",
            scenario,
            cost.cpu_us,
            cost.system_share * 100.0,
            cost.switches,
            cost.migrations
                .map_or_else(|| "—".to_owned(), |m| format!("{m:.3}")),
            cost.instructions
                .map_or_else(|| "—".to_owned(), |i| format!("{i:.0}")),
            services.join(", ")
        );
    }
}

/// Whether `--only` selects the scenario `name` (no `--only`: every one).
pub fn wants(args: &BenchArgs, name: &str) -> bool {
    args.only.as_deref().is_none_or(|only| name.contains(only))
}

/// Keeps the median (by rate) of several runs of one scenario.
pub fn median(mut runs: Vec<Figures>) -> Option<Figures> {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let middle = runs.len() / 2;
    runs.into_iter().nth(middle)
}

/// An empty latency histogram in microseconds.
#[allow(clippy::expect_used)]
pub fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 60 s, 3 significant digits: constant, valid
    // bounds, so construction cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

/// The figures of `count` operations (of `unit`) in `seconds`, with the
/// latency percentiles of `per_op`.
pub fn figures(
    scenario: &str,
    unit: &'static str,
    count: u64,
    per_op: &Histogram<u64>,
    seconds: f64,
    conflicts: u64,
) -> Figures {
    Figures {
        scenario: scenario.to_owned(),
        unit,
        rate: count as f64 / seconds.max(1e-9),
        p50_ms: per_op.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: per_op.value_at_quantile(0.99) as f64 / 1000.0,
        count,
        conflicts,
        seconds,
        cost: None,
    }
}

/// [`drive`] in a [`Meter`] window on this process and `peers`: the figures
/// of `scenario` with what one operation cost.
pub async fn drive_metered<F, Fut>(
    scenario: &str,
    unit: &'static str,
    writers: usize,
    duration: Duration,
    peers: &[Peer],
    op: F,
) -> anyhow::Result<Figures>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let meter = Meter::start(scenario, std::process::id(), peers).await?;
    let (count, hist, secs) = drive(writers, duration, op).await?;
    let cost = meter.finish(count).await?;
    Ok(figures(scenario, unit, count, &hist, secs, 0).with_cost(cost))
}

/// Runs `writers` concurrent loops of `op` for `duration`; each `op` returns
/// how many units it completed. Returns (units, per-op latency histogram,
/// seconds measured).
pub async fn drive<F, Fut>(
    writers: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<(u64, Histogram<u64>, f64)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(writers);
    for writer in 0..writers {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = histogram();
            let mut units = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                units += op(writer, n).await?;
                let _ = hist.record(t0.elapsed().as_micros().max(1) as u64);
                n += 1;
            }
            Ok::<_, anyhow::Error>((units, hist))
        }));
    }
    let mut total = 0;
    let mut merged = histogram();
    for task in tasks {
        let (units, hist) = task.await.context("joining a bench writer")??;
        total += units;
        let _ = merged.add(&hist);
    }
    Ok((total, merged, started.elapsed().as_secs_f64()))
}

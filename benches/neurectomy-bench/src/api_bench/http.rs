//! The HTTP part of `api`: a one-shot HTTP/1.1 client, wrk (its runs and
//! its `--latency` output), `/healthz`, `{ __typename }` and `agent(id)`
//! under the same wrk load, and the document bombs.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::process::{memory, mib, sample_rss};
use super::{
    check_agent, query_body, Api, Row, Scratch, LOAD_RSS_TARGET_MIB, QUERY_P99_TARGET_MS,
    RATIO_TARGET, TYPENAME_QUERY,
};
use crate::cli::BenchApiArgs;
use crate::meter::{cpu_seconds, Cost, Meter, Peer};

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
pub(super) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(token) = token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        match body {
            Some(body) => request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            None => request.push_str("\r\n"),
        }
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 10 s"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| format!("{method} http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{method} {path}: a malformed HTTP response: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Fails with how to install wrk if it is not on the PATH.
pub(super) async fn check_wrk() -> anyhow::Result<()> {
    // `wrk --version` prints its banner and exits non-zero: only spawning matters.
    match tokio::process::Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(anyhow::anyhow!(
            "wrk is not installed (apt-get install -y wrk; scripts/bench.sh does it), or run `--only ws`"
        )),
        Err(error) => Err(error).context("running wrk"),
    }
}

/// What wrk reported.
#[derive(Debug, Clone, Default, PartialEq)]
struct WrkRun {
    requests_per_sec: f64,
    requests: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    /// `Non-2xx or 3xx responses`.
    non_2xx: u64,
    /// `Socket errors: …`, if any.
    socket_errors: Option<String>,
    /// What one request cost the API process (and Redis), when metered.
    cost: Option<Cost>,
    /// CPU time of this (the bench's) process per request meanwhile, µs:
    /// the relay and projector it runs for the API, idle unless written to.
    bench_cpu_us: Option<f64>,
}

impl WrkRun {
    fn describe(&self) -> String {
        let mut detail = format!(
            "p50 {:.2} ms, p90 {:.2} ms; {} requests",
            self.p50_ms, self.p90_ms, self.requests
        );
        if self.non_2xx > 0 {
            detail.push_str(&format!("; {} non-2xx", self.non_2xx));
        }
        if let Some(errors) = &self.socket_errors {
            detail.push_str(&format!("; socket errors: {errors}"));
        }
        if let Some(cost) = &self.cost {
            detail.push_str(&format!("; API {}", cost.describe()));
        }
        if let Some(us) = self.bench_cpu_us {
            detail.push_str(&format!("; bench process {us:.1} µs/req"));
        }
        detail
    }
}

/// A wrk duration (`312.45us`, `1.20ms`, `2.00s`, `1.50m`) in milliseconds.
fn wrk_millis(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60e3)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3_600e3)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// Parses the output of `wrk --latency`.
fn parse_wrk(output: &str) -> anyhow::Result<WrkRun> {
    let mut run = WrkRun::default();
    let mut percentiles = 0;
    for line in output.lines().map(str::trim) {
        if let Some(rate) = line.strip_prefix("Requests/sec:") {
            run.requests_per_sec = rate.trim().parse().context("wrk's Requests/sec")?;
        } else if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.non_2xx = count.trim().parse().context("wrk's non-2xx count")?;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            run.socket_errors = Some(errors.trim().to_owned());
        } else if line.contains(" requests in ") {
            run.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .context("wrk's request count")?;
        } else if let Some((percent, value)) = line.split_once('%') {
            let slot = match percent.trim() {
                "50" => &mut run.p50_ms,
                "90" => &mut run.p90_ms,
                "99" => &mut run.p99_ms,
                _ => continue,
            };
            *slot =
                wrk_millis(value.trim()).with_context(|| format!("wrk's latency line {line:?}"))?;
            percentiles += 1;
        }
    }
    anyhow::ensure!(
        run.requests_per_sec > 0.0 && percentiles == 3,
        "wrk's output has no rate or latency distribution (was --latency given?):\n{output}"
    );
    Ok(run)
}

/// Runs wrk for `seconds` against `url` (with `script`, if any).
async fn wrk(
    args: &BenchApiArgs,
    seconds: u64,
    url: &str,
    script: Option<&Path>,
) -> anyhow::Result<WrkRun> {
    wrk_with(args, args.connections, seconds, url, script).await
}

/// [`wrk`] in a [`Meter`] window on the API process (and Redis): the run
/// with what one request cost.
async fn wrk_metered(
    args: &BenchApiArgs,
    api: &Api,
    label: &str,
    seconds: u64,
    url: &str,
    script: Option<&Path>,
) -> anyhow::Result<WrkRun> {
    let meter = Meter::start(label, api.pid, &[Peer::Redis]).await?;
    let bench_before = cpu_seconds(std::process::id())?;
    let mut run = wrk(args, seconds, url, script).await?;
    let bench = cpu_seconds(std::process::id())? - bench_before;
    run.cost = Some(meter.finish(run.requests).await?);
    run.bench_cpu_us = Some(bench * 1e6 / run.requests.max(1) as f64);
    Ok(run)
}

/// [`wrk`] with `connections` of its own.
async fn wrk_with(
    args: &BenchApiArgs,
    connections: u32,
    seconds: u64,
    url: &str,
    script: Option<&Path>,
) -> anyhow::Result<WrkRun> {
    let connections = connections.max(1);
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg(format!("-t{}", args.wrk_threads.clamp(1, connections)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .args(["--timeout", "5s", "--latency"]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "wrk failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&stdout)
}

/// The Lua script that makes wrk send the `agent(id)` request.
fn wrk_script(body: &str, token: &str) -> String {
    // Long brackets: the JSON needs no escaping.
    format!(
        "wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"
    )
}

fn median(mut runs: Vec<WrkRun>) -> Option<WrkRun> {
    runs.sort_by(|a, b| a.requests_per_sec.total_cmp(&b.requests_per_sec));
    let middle = runs.len() / 2;
    runs.into_iter().nth(middle)
}

/// `/healthz` and `agent(id)` under wrk, and the RSS under that load.
pub(super) async fn http_scenarios(
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    api: &Api,
    agent: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let body = query_body(agent);
    let script = std::env::temp_dir().join(format!(
        "neurectomy-bench-api-{}.lua",
        Uuid::new_v4().simple()
    ));
    std::fs::write(&script, wrk_script(&body, &api.token))
        .with_context(|| format!("writing {}", script.display()))?;
    scratch.files.push(script.clone());
    // The same request path without the read: what GraphQL itself costs.
    let bare = script.with_extension("typename.lua");
    let bare_body = json!({"query": TYPENAME_QUERY}).to_string();
    std::fs::write(&bare, wrk_script(&bare_body, &api.token))
        .with_context(|| format!("writing {}", bare.display()))?;
    scratch.files.push(bare.clone());
    let healthz_url = format!("http://{}/healthz", api.addr);
    let graphql_url = format!("http://{}/graphql", api.addr);
    let seconds = args.seconds.max(1);

    let sampling = CancellationToken::new();
    let sampler = sample_rss(api.pid, sampling.clone());
    eprintln!("warming up with wrk (2 s per endpoint)…");
    wrk(args, 2, &healthz_url, None).await?;
    wrk(args, 2, &graphql_url, Some(&script)).await?;
    let mut healthz_runs = Vec::new();
    let mut query_runs = Vec::new();
    let mut bare_runs = Vec::new();
    let runs = args.runs.max(1);
    let mut measured = async {
        for run in 0..runs {
            eprintln!("wrk: GET /healthz for {seconds}s ({}/{runs})…", run + 1);
            healthz_runs
                .push(wrk_metered(args, api, "healthz", seconds, &healthz_url, None).await?);
            eprintln!(
                "wrk: POST /graphql {{ __typename }} for {seconds}s ({}/{runs})…",
                run + 1
            );
            bare_runs.push(
                wrk_metered(args, api, "typename", seconds, &graphql_url, Some(&bare)).await?,
            );
            eprintln!(
                "wrk: POST /graphql agent(id) for {seconds}s ({}/{runs})…",
                run + 1
            );
            query_runs
                .push(wrk_metered(args, api, "agent", seconds, &graphql_url, Some(&script)).await?);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    sampling.cancel();
    let largest = sampler.await.context("joining the RSS sampler")?;
    let after = memory(api.pid)?;
    // Still the same answer after the load (wrk cannot see GraphQL errors).
    if measured.is_ok() {
        measured = async {
            let (status, answer) =
                http(api.addr, "POST", "/graphql", Some(&api.token), Some(&body)).await?;
            check_agent(status, &answer, agent)
        }
        .await;
    }
    measured?;

    let (Some(healthz), Some(query), Some(bare)) =
        (median(healthz_runs), median(query_runs), median(bare_runs))
    else {
        anyhow::bail!("wrk made no runs");
    };
    let ratio = query.requests_per_sec / healthz.requests_per_sec.max(1e-9);
    rows.push(
        Row::new(
            "http: GET /healthz (trivial endpoint)",
            healthz.requests_per_sec,
            "req/s",
        )
        .detail(format!(
            "p99 {:.2} ms; {}",
            healthz.p99_ms,
            healthz.describe()
        )),
    );
    rows.push(
        Row::new(
            "http: { __typename } (GraphQL, no read)",
            bare.requests_per_sec,
            "req/s",
        )
        .detail(format!(
            "{:.0} % of /healthz; p99 {:.2} ms; {}",
            bare.requests_per_sec * 100.0 / healthz.requests_per_sec.max(1e-9),
            bare.p99_ms,
            bare.describe()
        )),
    );
    rows.push(
        Row::new(
            "http: agent(id) (near cache; Redis on a miss)",
            query.requests_per_sec,
            "req/s",
        )
        .detail(format!("p99 {:.2} ms; {}", query.p99_ms, query.describe())),
    );
    rows.push(
        Row::new("http: agent(id) rate / /healthz rate", ratio * 100.0, "%").target(
            format!("≥ {:.0} %", RATIO_TARGET * 100.0),
            ratio >= RATIO_TARGET && query.non_2xx == 0,
        ),
    );
    rows.push(
        Row::new("http: agent(id) p99 latency", query.p99_ms, "ms").target(
            format!("≤ {QUERY_P99_TARGET_MS:.0} ms"),
            query.p99_ms <= QUERY_P99_TARGET_MS,
        ),
    );
    for (name, run) in [
        ("http: API CPU per /healthz request", &healthz),
        ("http: API CPU per { __typename } request", &bare),
        ("http: API CPU per agent(id) request", &query),
    ] {
        if let Some(cost) = &run.cost {
            rows.push(Row::new(name, cost.cpu_us, "µs").detail(cost.describe()));
        }
    }
    let largest = largest.max(after.rss_kib);
    rows.push(
        Row::new(
            "API RSS under that load (largest sample)",
            mib(largest),
            "MiB",
        )
        .target(
            format!("≤ {LOAD_RSS_TARGET_MIB:.0} MiB"),
            mib(largest) <= LOAD_RSS_TARGET_MIB,
        )
        .detail(format!("after the runs: {}", after.describe())),
    );
    Ok(())
}

/// The 23-level doubling document: ~900 bytes, 8,388,608 fields once its
/// fragments are expanded (refused before anything walks it).
fn bomb_document() -> String {
    let mut query = "{ ...F0 }".to_owned();
    for level in 0..23 {
        let next = level + 1;
        query.push_str(&format!(
            " fragment F{level} on Query {{ ...F{next} ...F{next} }}"
        ));
    }
    query.push_str(" fragment F23 on Query { __typename }");
    query
}

/// `/healthz` while a tiny, explosive document keeps arriving: wrk on
/// `/healthz` alone, then again while 16 connections send the doubling
/// document back to back; and the API's CPU per refused document, from a
/// run of the documents alone.
pub(super) async fn bomb_scenario(
    args: &BenchApiArgs,
    scratch: &mut Scratch,
    api: &Api,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let script = std::env::temp_dir().join(format!(
        "neurectomy-bench-bombs-{}.lua",
        Uuid::new_v4().simple()
    ));
    let body = json!({ "query": bomb_document() }).to_string();
    std::fs::write(&script, wrk_script(&body, &api.token))
        .with_context(|| format!("writing {}", script.display()))?;
    scratch.files.push(script.clone());
    let (status, answer) =
        http(api.addr, "POST", "/graphql", Some(&api.token), Some(&body)).await?;
    anyhow::ensure!(
        status == 200 && answer.contains("QUERY_TOO_LARGE"),
        "the document was not refused: {status} {answer}"
    );
    let healthz_url = format!("http://{}/healthz", api.addr);
    let graphql_url = format!("http://{}/graphql", api.addr);
    let seconds = args.seconds.max(1);
    eprintln!("bombs: wrk GET /healthz alone for {seconds}s…");
    let alone = wrk(args, seconds, &healthz_url, None).await?;
    eprintln!("bombs: the document alone, 16 connections, for {seconds}s…");
    let before = cpu_seconds(api.pid)?;
    let bombs = wrk_with(args, 16, seconds, &graphql_url, Some(&script)).await?;
    let cpu = cpu_seconds(api.pid)? - before;
    let refused = bombs.requests_per_sec * seconds as f64;
    eprintln!("bombs: /healthz while the document arrives, for {seconds}s…");
    let (healthz, during) = tokio::join!(
        wrk(args, seconds, &healthz_url, None),
        wrk_with(args, 16, seconds, &graphql_url, Some(&script)),
    );
    let (healthz, during) = (healthz?, during?);
    rows.push(
        Row::new(
            "bombs: 23-level fragment document refused",
            bombs.requests_per_sec,
            "req/s",
        )
        .detail(format!(
            "API CPU {:.1} µs per document; p99 {:.2} ms; {}",
            cpu * 1e6 / refused.max(1.0),
            bombs.p99_ms,
            bombs.describe()
        )),
    );
    rows.push(
        Row::new("bombs: /healthz p99, alone", alone.p99_ms, "ms")
            .detail(format!("{:.0} req/s", alone.requests_per_sec)),
    );
    rows.push(
        Row::new(
            "bombs: /healthz p99 while they arrive",
            healthz.p99_ms,
            "ms",
        )
        .detail(format!(
            "{:.0} req/s ({:.0} % of alone) beside {:.0} refused documents/s",
            healthz.requests_per_sec,
            healthz.requests_per_sec * 100.0 / alone.requests_per_sec.max(1e-9),
            during.requests_per_sec
        )),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 10s test @ http://127.0.0.1:8080/graphql
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.53ms  412.00us   9.87ms   80.00%
    Req/Sec    20.95k     1.10k   22.40k    75.00%
  Latency Distribution
     50%  812.00us
     75%    1.61ms
     90%    1.98ms
     99%    2.50s
  208521 requests in 10.00s, 71.20MB read
  Socket errors: connect 0, read 0, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  20843.41
Transfer/sec:      7.12MB
";

    #[test]
    fn wrk_latency_output_is_parsed() {
        let run = parse_wrk(OUTPUT).unwrap();
        assert_eq!(run.requests, 208_521);
        assert!((run.requests_per_sec - 20_843.41).abs() < 1e-6);
        assert!((run.p50_ms - 0.812).abs() < 1e-9);
        assert!((run.p90_ms - 1.98).abs() < 1e-9);
        assert!((run.p99_ms - 2_500.0).abs() < 1e-9);
        assert_eq!(run.non_2xx, 7);
        assert_eq!(
            run.socket_errors.as_deref(),
            Some("connect 0, read 0, write 0, timeout 3")
        );
    }

    #[test]
    fn wrk_output_without_a_distribution_is_refused() {
        let plain = OUTPUT.replace("     99%    2.50s\n", "");
        assert!(parse_wrk(&plain).is_err());
    }

    #[test]
    fn wrk_durations_carry_their_units() {
        assert_eq!(wrk_millis("250.00us"), Some(0.25));
        assert_eq!(wrk_millis("3.00ms"), Some(3.0));
        assert_eq!(wrk_millis("1.50s"), Some(1_500.0));
        assert_eq!(wrk_millis("2.00m"), Some(120_000.0));
        assert_eq!(wrk_millis("12"), None);
    }
}

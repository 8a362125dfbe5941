//! The command line: the settings of `neurectomy` (the same flags,
//! `NEURECTOMY_*` variables and `--config` file, resolved and checked by
//! `api::settings::config::load_as`) and the benchmark to run with its options.

use api::settings::Settings;
use clap::{Args, Parser, Subcommand};

/// Benchmarks of Neurectomy's command handler, relay, projectors and API.
#[derive(Debug, Parser)]
#[command(
    name = "neurectomy-bench",
    version,
    about = "Benchmarks of Neurectomy: commands and appends, the relay, the projections, and the GraphQL API (a spawned `neurectomy serve`)",
    propagate_version = true
)]
pub struct Cli {
    /// TOML configuration file (the shape `neurectomy config` prints);
    /// flags and environment variables override what it sets. No file is
    /// read unless one is named.
    #[arg(
        long = "config",
        env = "NEURECTOMY_CONFIG",
        value_name = "FILE",
        global = true
    )]
    pub config: Option<std::path::PathBuf>,
    /// The settings of `neurectomy`: where the services are, and how the
    /// handler, relay and projectors are configured.
    #[command(flatten)]
    pub settings: Settings,
    /// The benchmark to run.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Command and append throughput and latency (load + decide + append).
    Append(BenchArgs),
    /// Relay throughput (backlog drain) and commit → JetStream ack latency.
    Relay(BenchArgs),
    /// Projection replay rates and end-to-end freshness.
    Project(BenchArgs),
    /// The GraphQL API as its own process: `agent(id)` vs `/healthz` under
    /// wrk, its RSS idle and under load, and 10,000 WebSocket subscriptions.
    Api(BenchApiArgs),
}

/// Options of `api`.
#[derive(Debug, Clone, Args)]
pub struct BenchApiArgs {
    /// Seconds each wrk run lasts.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Repeat each wrk run this many times (alternating the endpoints) and
    /// report the median run of each (the machines are shared and noisy).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// HTTP connections wrk keeps open (`wrk -c`), the same for both
    /// endpoints. The `agent(id)` ratio depends on it: more requests in
    /// flight put more commands in each write of the multiplexed Redis
    /// connection (the README's Performance section has 32, 64 and 128).
    #[arg(long, default_value_t = 64)]
    pub connections: u32,
    /// wrk threads (`wrk -t`); wrk shares the machine's cores with the API.
    #[arg(long, default_value_t = 1)]
    pub wrk_threads: u32,
    /// Agents registered before the run (the query reads one of them).
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// WebSocket subscriptions held open at once (0: skip that part).
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// WebSocket handshakes in flight at once while opening them.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// PostgreSQL connections the API process may open (its
    /// NEURECTOMY_DATABASE_POOL_SIZE; default: --database-pool-size).
    #[arg(long)]
    pub server_pool: Option<u32>,
    /// Worker threads of the API process's runtime (its TOKIO_WORKER_THREADS;
    /// default: one per core).
    #[arg(long)]
    pub server_workers: Option<usize>,
    /// The `neurectomy` binary to spawn as `<binary> serve` (default: the
    /// `neurectomy` next to this executable), e.g. another build to measure
    /// with the same load.
    #[arg(long, alias = "server-binary", value_name = "PATH")]
    pub neurectomy: Option<std::path::PathBuf>,
    /// Run the API process under `valgrind --tool=callgrind`, its dumps in
    /// this directory: each metered window then also reports the
    /// instructions per request or per delivered message (everything runs
    /// ~50× slower; raise the services' timeouts to match).
    #[arg(long, value_name = "DIR")]
    pub callgrind: Option<std::path::PathBuf>,
    /// Only run the parts whose name contains this text (`http`, `ws`, `bombs`); the
    /// idle RSS is always measured.
    #[arg(long)]
    pub only: Option<String>,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Options shared by the benchmarks.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Seconds each scenario runs.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Repeat each scenario this many times and report the median run.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Only run the scenarios whose name contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// PostgreSQL connections the benchmark's pool may open; writers beyond
    /// it queue for a connection (as they would in a deployed process).
    #[arg(long, default_value_t = 16)]
    pub pool: u32,
    /// Tenants of the simulated log `project` replays, with the simulator's
    /// skewed shares (tenant k gets 1/k of the work).
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use api::settings::config::{load_as, LoadError};

    use super::*;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Cli, LoadError> {
        let env = |name: &str| {
            env.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| OsString::from(value))
        };
        load_as(
            std::iter::once("neurectomy-bench").chain(args.iter().copied()),
            &env,
        )
    }

    #[test]
    fn settings_come_from_flags_and_the_environment_as_in_neurectomy() {
        let cli = load(
            &[
                "append",
                "--seconds",
                "2",
                "--pool",
                "4",
                "--database-url",
                "postgres://bench@127.0.0.1:5432/elsewhere",
            ],
            &[
                ("NEURECTOMY_REDIS_PREFIX", "scratch:"),
                (
                    "NEURECTOMY_DATABASE_URL",
                    "postgres://env@127.0.0.1:5432/env",
                ),
            ],
        )
        .unwrap();
        // The flag wins over the variable, and a variable sets what no flag does.
        assert_eq!(
            cli.settings.database_url,
            "postgres://bench@127.0.0.1:5432/elsewhere"
        );
        assert_eq!(cli.settings.redis_prefix, "scratch:");
        assert_eq!(cli.settings.command_attempts, 5, "a built-in default");
        match cli.command {
            BenchCommand::Append(args) => {
                assert_eq!((args.seconds, args.runs, args.pool), (2, 1, 4));
                assert!(args.only.is_none() && args.json.is_none());
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn api_names_the_neurectomy_binary_with_its_old_flag_too() {
        for flag in ["--neurectomy", "--server-binary"] {
            let cli = load(&["api", flag, "/opt/neurectomy", "--subscribers", "0"], &[]).unwrap();
            match cli.command {
                BenchCommand::Api(args) => {
                    assert_eq!(
                        args.neurectomy.as_deref(),
                        Some(std::path::Path::new("/opt/neurectomy"))
                    );
                    assert_eq!((args.subscribers, args.connections, args.runs), (0, 64, 3));
                }
                other => panic!("{flag}: parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn an_invalid_setting_is_refused_naming_where_it_came_from() {
        match load(&["relay"], &[("NEURECTOMY_API_MAX_DEPTH", "deep")]) {
            Err(LoadError::Config(error)) => {
                let message = error.to_string();
                assert!(message.contains("NEURECTOMY_API_MAX_DEPTH"), "{message}");
            }
            Err(LoadError::Cli(error)) => panic!("a command-line error: {error}"),
            Ok(cli) => panic!("loaded: {:?}", cli.command),
        }
    }
}

//! # Neurectomy benchmarks
//!
//! The `neurectomy-bench` binary: `neurectomy-bench append|relay|project|api`.
//! It is not part of the `neurectomy` binary, so no load generator is
//! compiled into (or laid out in the memory of) the production process.
//!
//! ## Contracts
//!
//! - **The same process as `neurectomy`.** The command handler, the relay
//!   and the projectors run in this process, configured from the same
//!   settings (flags, `NEURECTOMY_*` variables, `--config`), with the same
//!   allocator (mimalloc), runtime and telemetry, so one command, one
//!   relayed event and one projected batch cost what they cost in a
//!   `neurectomy` process. The API is measured as its own process: the real
//!   `neurectomy serve`, spawned from `--neurectomy` (by default the
//!   `neurectomy` next to this executable).
//! - **Everything is scratch.** Each run creates its own databases,
//!   JetStream streams, Redis prefixes and graph databases (with the test
//!   kits, [`scratch`]) and removes them at the end, also when a scenario
//!   fails. Nothing configured is written to.
//! - **Figures are compared within a run.** The machines are shared and
//!   noisy: a run reports rates and latency percentiles of its scenarios
//!   side by side (and the median of `--runs` repetitions), to be read as
//!   ratios.
//!
//! ## Layout
//!
//! - [`cli`]: the command line (the settings of `neurectomy`, the
//!   benchmarks and their options).
//! - [`figures`]: a scenario's figures, the tables they are printed in, and
//!   the loop that drives concurrent writers for a duration.
//! - [`meter`]: what one operation costs — CPU time of this process and of
//!   the services (`/proc`), context switches and migrations (`perf stat`),
//!   instructions (callgrind) — around a window of many.
//! - [`append`]: `append`, commands through the handler and raw appends;
//!   the workload the other benchmarks share (running tasks, progress
//!   events).
//! - [`relay`]: `relay`, backlog drain, throughput under load, commit →
//!   JetStream ack latency.
//! - [`project`]: `project`, replay rates of both read models and
//!   commit → visible freshness.
//! - [`api_bench`]: `api`, the GraphQL API as its own process under wrk
//!   and 10,000 WebSocket subscriptions, and its memory.
//! - [`scratch`]: the scratch resources, from `commands::testkit` and
//!   `projections::{testkit, graph_testkit}`.
//!
//! ## What it uses of the `neurectomy-api` library
//!
//! Kept to these, which follow the `api` crate's modules:
//!
//! - `api::settings::{Settings, SimulateArgs}`: the settings (and the
//!   configurations of the handler, relay, projectors and read models they
//!   describe); the simulator's options.
//! - `api::settings::config::{load_as, process_env, LoadError}`: the command line
//!   resolved with the environment and `--config`, as `neurectomy` does.
//! - `api::cli::run_to_exit`: the same telemetry, runtime and exit codes as `neurectomy`.
//! - `api::simulate::drive`: the realistic workload `project` preloads.
//! - `api::auth::{Authenticator, Role}`: the token `api` gives its clients.

pub mod api_bench;
pub mod append;
pub mod cli;
pub mod figures;
pub mod meter;
pub mod project;
pub mod relay;
pub mod scratch;

use api::settings::config;

use cli::{BenchCommand, Cli};

/// The whole program: parse the command line and the configuration,
/// initialise telemetry, run the benchmark on a multi-threaded runtime, and
/// map the result to an exit code (2: the command line or the
/// configuration is invalid).
pub fn main() -> std::process::ExitCode {
    let cli: Cli = match config::load_as(std::env::args_os(), &config::process_env) {
        Ok(cli) => cli,
        // Usage errors, --help and --version: clap prints them and exits.
        Err(config::LoadError::Cli(error)) => error.exit(),
        Err(config::LoadError::Config(error)) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let log = cli.settings.log.clone();
    api::cli::run_to_exit(&log, run(cli))
}

/// Runs the benchmark chosen on the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = &cli.settings;
    match cli.command {
        // Its figures are memory and ratios as well as rates: a table of its own.
        BenchCommand::Api(args) => api_bench::run(settings, &args).await,
        BenchCommand::Append(args) => {
            let results = append::run(settings, &args).await?;
            figures::report(&results, args.json.as_deref())
        }
        BenchCommand::Relay(args) => {
            let results = relay::run(settings, &args).await?;
            figures::report(&results, args.json.as_deref())
        }
        BenchCommand::Project(args) => {
            let results = project::run(settings, &args).await?;
            figures::report(&results, args.json.as_deref())
        }
    }
}

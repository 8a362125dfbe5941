//! # The `neurectomy` binary
//!
//! Settings, start-up and shutdown of every Neurectomy process role, the
//! workload simulator and the benchmarks. `main.rs` only parses the command
//! line, initialises telemetry and calls [`run`].
//!
//! ## Layout
//!
//! - [`settings`]: the one settings struct, from flags and `NEURECTOMY_*`
//!   environment variables, documented in `--help`.
//! - [`app`]: builds pools and clients once, runs migrations, and runs the
//!   relay (and, later, projectors and the API) under one cancellation token.
//! - [`simulate`]: a realistic orchestration workload through the real
//!   command handler.
//! - [`bench`]: `neurectomy bench append|relay`.
//! - [`telemetry`]: logs (text or JSON, with trace ids) and spans, exported
//!   over OTLP when an endpoint is configured.

pub mod app;
pub mod auth;
pub mod bench;
pub mod bench_api;
pub mod bench_project;
pub mod graphql;
pub mod health;
pub mod metrics;
pub mod replay;
pub mod server;
pub mod settings;
pub mod simulate;
pub mod telemetry;
pub mod ws;

use settings::{Cli, Command};

/// The whole program: parse the command line, initialise telemetry, run the
/// sub-command on a multi-threaded runtime, and map the result to an exit code.
pub fn main() -> std::process::ExitCode {
    use clap::Parser as _;
    let cli = Cli::parse();
    let telemetry = telemetry::init(&cli.settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Logged once, here at the boundary, with its whole cause chain.
            tracing::error!("{error:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // The spans of the last moments, before the process is gone.
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    code
}

/// Runs the sub-command chosen on the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => app::migrate(&cli.settings).await,
        Command::Relay => app::run_relay(&cli.settings).await,
        Command::All(args) => app::run_all(&cli.settings, args).await,
        Command::Simulate(args) => simulate::run(&cli.settings, args).await,
        Command::Project(args) => app::run_projectors(&cli.settings, args).await,
        Command::Replay(args) => replay::run(&cli.settings, args).await,
        Command::Status => app::status(&cli.settings).await,
        Command::Verify => app::verify(&cli.settings).await,
        Command::Serve => app::serve(&cli.settings).await,
        Command::Token(args) => app::token(&cli.settings, &args),
        Command::Bench(bench) => bench::run(&cli.settings, bench).await,
    }
}

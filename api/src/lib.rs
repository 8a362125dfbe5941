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
//! - [`telemetry`]: tracing subscriber set-up.

pub mod app;
pub mod bench;
pub mod settings;
pub mod simulate;
pub mod telemetry;

use settings::{Cli, Command};

/// Runs the sub-command chosen on the command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => app::migrate(&cli.settings).await,
        Command::Relay => app::run_relay(&cli.settings).await,
        Command::All(args) => app::run_all(&cli.settings, args).await,
        Command::Simulate(args) => simulate::run(&cli.settings, args).await,
        Command::Bench(bench) => bench::run(&cli.settings, bench).await,
    }
}

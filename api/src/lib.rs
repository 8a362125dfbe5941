//! # The `neurectomy` binary
//!
//! Settings, start-up and shutdown of every Neurectomy process role and
//! the workload simulator. `main.rs` only parses the command line,
//! initialises telemetry and calls [`run`]. The benchmarks are a binary of
//! their own, `neurectomy-bench` (`benches/neurectomy-bench`).
//!
//! ## Layout
//!
//! - [`settings`]: the one settings struct, from flags and `NEURECTOMY_*`
//!   environment variables, documented in `--help`.
//! - [`config`]: layers flags, environment variables, the TOML file of
//!   `--config` and the defaults, validates the result, and prints it
//!   (`neurectomy config`).
//! - [`app`]: builds pools and clients once, runs migrations, and runs the
//!   relay (and, later, projectors and the API) under one cancellation token.
//! - [`simulate`]: a realistic orchestration workload through the real
//!   command handler.
//! - [`telemetry`]: logs (text or JSON, with trace ids) and spans, exported
//!   over OTLP when an endpoint is configured.
//! - [`metrics`], [`probes`]: the Prometheus series and the periodic
//!   dependency probes behind `neurectomy_dependency_up`.
//! - [`shutdown`]: signals, what is in flight, the shutdown deadline.
//! - [`graphiql`]: the GraphiQL page at `/` and its assets, compiled into
//!   the binary, so it needs no network beyond this server.

pub mod app;
pub mod auth;
pub mod config;
pub mod error;
pub mod graphiql;
pub mod graphql;
pub mod metrics;
pub mod probes;
pub mod replay;
pub mod secret;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod simulate;
pub mod sync;
pub mod telemetry;
pub mod ws;

use settings::{Cli, Command};

/// The whole program: parse the command line and the configuration,
/// initialise telemetry, run the sub-command on a multi-threaded runtime,
/// and map the result to an exit code (2: the command line or the
/// configuration is invalid).
pub fn main() -> std::process::ExitCode {
    let loaded = match config::load(std::env::args_os(), &config::process_env) {
        Ok(loaded) => loaded,
        // Usage errors, --help and --version: clap prints them and exits.
        Err(config::LoadError::Cli(error)) => error.exit(),
        Err(config::LoadError::Config(error)) => {
            // Telemetry is not up yet (its settings may be the bad ones).
            eprintln!("error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Command::Config(args) = &loaded.cli.command {
        return print_config(&loaded.effective, args);
    }
    let cli = loaded.cli;
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
    let result = runtime.block_on(run(cli));
    // Tasks a passed shutdown deadline left behind must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    let code = match result {
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

/// `neurectomy config`: the configuration has been validated; print it
/// unless only a check was asked for.
fn print_config(
    effective: &config::Effective,
    args: &settings::ConfigArgs,
) -> std::process::ExitCode {
    use std::io::Write as _;
    if args.check {
        return std::process::ExitCode::SUCCESS;
    }
    match std::io::stdout()
        .lock()
        .write_all(effective.to_toml().as_bytes())
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `neurectomy config | head` is fine.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: writing the configuration: {error}");
            std::process::ExitCode::FAILURE
        }
    }
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
        // Printed by `main` before telemetry starts; nothing to run.
        Command::Config(_) => Ok(()),
    }
}

//! # The command line: the `neurectomy` binary's sub-commands
//!
//! [`main`] parses the command line and the configuration ([`load`]: flags,
//! environment, `--config` file, defaults, then the checks), starts
//! telemetry, and runs one sub-command on a multi-threaded runtime. Each
//! sub-command is a small file here; the ones that run until stopped
//! (`all`, `serve`, `relay`, `project`, `simulate`) build a
//! [`crate::startup::Application`] with their roles, the others (`migrate`,
//! `replay`, `verify`, `status`, `token`, `config`) do their one thing and
//! exit.
//!
//! | file | sub-command |
//! |---|---|
//! | `mod.rs` | the `Cli`, its arguments, `main`, `config` |
//! | [`migrate`] | `migrate` |
//! | [`roles`] | `serve`, `relay`, `project`, `all`, `simulate` |
//! | [`replay`] | `replay --projection redis\|graph` |
//! | [`verify`] | `verify` |
//! | [`status`] | `status` |
//! | [`token`] | `token` |
//! | [`audit`] | `audit verify`, `audit keygen`, `audit key` |

pub mod audit;
pub mod migrate;
pub mod replay;
pub mod roles;
pub mod status;
pub mod token;
pub mod verify;

use std::ffi::OsString;
use std::path::Path;

use clap::{Args, Parser, Subcommand};

use crate::auth::Role;
use crate::settings::config::{self, Effective, LoadError};
use crate::settings::{Projection, Settings};
use crate::simulate::SimulateArgs;

/// Neurectomy: an event-sourced CQRS backend for AI-agent orchestration.
#[derive(Debug, Parser)]
#[command(
    name = "neurectomy",
    version,
    about = "Neurectomy: an event-sourced CQRS backend for AI-agent orchestration",
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
    /// Settings shared by every sub-command.
    #[command(flatten)]
    pub settings: Settings,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if missing and run the event-store migrations.
    Migrate,
    /// Run the outbox relay (PostgreSQL → JetStream); standbys wait for the lock.
    Relay,
    /// Run everything in one process: migrations, then the relay, the
    /// projectors and the GraphQL API (with --simulate, the simulator too),
    /// until SIGINT/SIGTERM.
    All(AllArgs),
    /// Drive a realistic orchestration workload through the command handler.
    Simulate(SimulateArgs),
    /// Run the projectors (read-model builders) until SIGINT/SIGTERM.
    Project(ProjectArgs),
    /// Rebuild a projection from the event store into a fresh namespace and
    /// switch readers over atomically when it has caught up.
    Replay(ReplayArgs),
    /// Show the relay's and each projection's checkpoint and lag.
    Status,
    /// Fold every stream of the event store and diff the result against the
    /// read models; exits non-zero if they disagree.
    Verify,
    /// Run the GraphQL API alone (queries, mutations, subscriptions, audit).
    Serve,
    /// Mint a JWT for local use (HS256, with NEURECTOMY_JWT_SECRET).
    Token(TokenArgs),
    /// The sealed audit log: verify it against the store, make or show keys.
    Audit(audit::AuditArgs),
    /// Print the effective configuration as TOML (the shape `--config`
    /// reads), each value's source in a comment, secrets redacted.
    Config(ConfigArgs),
}

/// Options of `config`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Only validate the configuration: print nothing but errors; the exit
    /// code says whether it is valid.
    #[arg(long)]
    pub check: bool,
}

/// Options of `token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Roles to grant (repeat or comma-separate): viewer, operator, auditor, eraser.
    #[arg(long = "role", value_delimiter = ',', default_value = "operator")]
    pub roles: Vec<Role>,
    /// The tenant whose data the token sees.
    #[arg(long)]
    pub tenant: String,
    /// Subject (recorded as the actor of commands).
    #[arg(long, default_value = "dev")]
    pub subject: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: u64,
}

/// Options of `replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The projection to rebuild.
    #[arg(long)]
    pub projection: Projection,
    /// Events read and applied per batch.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
}

/// Options of `project`.
#[derive(Debug, Clone, Args)]
pub struct ProjectArgs {
    /// Run only this projection (default: all).
    #[arg(long)]
    pub only: Option<Projection>,
}

/// Options of `all`.
#[derive(Debug, Clone, Args)]
pub struct AllArgs {
    /// Also run the workload simulator in this process.
    #[arg(long)]
    pub simulate: bool,
    /// Simulator options (used with --simulate).
    #[command(flatten)]
    pub simulation: SimulateArgs,
}

/// The parsed command line with every setting resolved and checked.
#[derive(Debug)]
pub struct Loaded {
    /// The command line, settings included.
    pub cli: Cli,
    /// Every setting's effective value and source, for `neurectomy config`.
    pub effective: Effective,
}

/// Parses the command line `args` (program name first) with the
/// environment `env` and the configuration file they name, resolves and
/// checks every setting (the GraphQL limits' cross-check included), and
/// reads the `OTEL_*` variables from the same environment.
pub fn load<I, T>(args: I, env: &dyn Fn(&str) -> Option<OsString>) -> Result<Loaded, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    load_with(args, env, &|path| std::fs::read_to_string(path))
}

/// [`load`], reading the configuration file with `read`.
pub fn load_with<I, T>(
    args: I,
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Loaded, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let (mut cli, effective) =
        config::load_parsed::<Cli, _, _>(args, env, read, &crate::graphql::limits::settings_check)?;
    cli.settings.log.otel = crate::settings::OtelVariables::read(env);
    Ok(Loaded { cli, effective })
}

/// The whole program: parse the command line and the configuration,
/// initialise telemetry, run the sub-command on a multi-threaded runtime,
/// and map the result to an exit code (2: the command line or the
/// configuration is invalid).
pub fn main() -> std::process::ExitCode {
    let loaded = match load(std::env::args_os(), &config::process_env) {
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
    let log = cli.settings.log.clone();
    run_to_exit(&log, run(cli))
}

/// Starts telemetry with `log`, runs `work` on a multi-threaded runtime and
/// maps its result to an exit code, logging an error once, with its whole
/// cause chain; the last spans are exported before it returns. The `main`
/// of `neurectomy` and of `neurectomy-bench`.
pub fn run_to_exit(
    log: &crate::settings::LogSettings,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let telemetry = crate::telemetry::init(log);
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
    let result = runtime.block_on(work);
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
fn print_config(effective: &config::Effective, args: &ConfigArgs) -> std::process::ExitCode {
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
    let settings = cli.settings;
    match cli.command {
        Command::Migrate => migrate::run(&settings).await,
        Command::Relay => roles::relay(settings).await,
        Command::All(args) => roles::all(settings, args).await,
        Command::Simulate(args) => roles::simulate(settings, args).await,
        Command::Project(args) => roles::project(settings, args).await,
        Command::Replay(args) => replay::run(&settings, args).await,
        Command::Status => status::run(&settings).await,
        Command::Verify => verify::run(&settings).await,
        Command::Serve => roles::serve(settings).await,
        Command::Token(args) => token::run(&settings, &args),
        Command::Audit(args) => audit::run(&settings, args).await,
        // Printed by `main` before telemetry starts; nothing to run.
        Command::Config(_) => Ok(()),
    }
}

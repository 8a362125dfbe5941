//! Entry point of the `neurectomy` binary; see the library docs.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = neurectomy_api::settings::Cli::parse();
    neurectomy_api::telemetry::init(&cli.settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(neurectomy_api::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

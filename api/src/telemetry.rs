//! Tracing set-up, done once in `main`.

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber: pretty text or JSON lines on stderr,
/// filtered by `NEURECTOMY_LOG` (an `EnvFilter` directive).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_new(&settings.filter).unwrap_or_else(|error| {
        eprintln!(
            "warning: NEURECTOMY_LOG `{}` is not a valid filter ({error}); using `info`",
            settings.filter
        );
        EnvFilter::new("info")
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match settings.format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    if let Err(error) = result {
        eprintln!("warning: tracing already initialised: {error}");
    }
}

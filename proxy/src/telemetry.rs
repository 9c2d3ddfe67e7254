//! Log output: human-readable lines for people, JSON lines for machines,
//! both on standard output, filtered by `RUST_LOG` (default `info`). A
//! command whose standard output is its result logs to standard error.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(false).init(),
    }
}

/// Installs a subscriber writing human-readable lines to standard error,
/// for commands whose standard output is their result (`plugin test`).
pub fn init_on_stderr() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// Longest text a plugin chose (a pool name, a rejection message, a review
/// reason) that one log line carries, in bytes: 4 KiB, as for the plugin's
/// own log messages. Longer text is cut at a character boundary.
pub const MAX_LOGGED_TEXT_BYTES: usize = 4096;

/// `text` cut to [`MAX_LOGGED_TEXT_BYTES`] for a log line, so that one
/// plugin decision cannot write megabytes into the log.
pub fn cut_for_log(text: &str) -> &str {
    let mut end = text.len().min(MAX_LOGGED_TEXT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

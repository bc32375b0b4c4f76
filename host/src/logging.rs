//! Log setup: structured `tracing` events to stderr, as text or one JSON object a line.
//! Colours only when stderr is a terminal and `NO_COLOR` is not set (journald and log
//! files get plain text).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// The format chosen at start (a plugin's child process logs the same way).
pub(crate) fn current_format() -> LogFormat {
    FORMAT.get().copied().unwrap_or(LogFormat::Text)
}

/// Whether text logs may carry ANSI colours (pure, for the test).
pub(crate) fn colours(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The filter: `RUST_LOG`, else `default_level`; the AWS SDK's credential chain logs
/// each provider it tries at WARN with a Debug dump of the error, so it is held to ERROR
/// unless `RUST_LOG` names it.
pub(crate) fn filter_text(rust_log: Option<&str>, default_level: &str) -> String {
    let base = rust_log
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(default_level)
        .to_owned();
    if base.contains("aws_config") {
        base
    } else {
        format!("{base},aws_config=error")
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_level`.
pub(crate) fn init(format: LogFormat, default_level: &str) {
    let _ = FORMAT.set(format);
    let text = filter_text(std::env::var("RUST_LOG").ok().as_deref(), default_level);
    let filter = EnvFilter::try_new(&text).unwrap_or_else(|_| EnvFilter::new(default_level));
    let ansi = colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_credential_chain_is_held_to_errors() {
        assert_eq!(filter_text(None, "info"), "info,aws_config=error");
        assert_eq!(filter_text(Some("debug"), "info"), "debug,aws_config=error");
        assert_eq!(
            filter_text(Some("aws_config=debug"), "info"),
            "aws_config=debug"
        );
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, None));
        assert!(!colours(false, None));
        assert!(!colours(true, Some(std::ffi::OsStr::new("1"))));
        assert!(
            colours(true, Some(std::ffi::OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
    }
}

//! Telemetry shared by every mesh process: the log subscriber and request ids.
//!
//! Logs go to standard error, filtered by `RUST_LOG` (default `info`), as human-readable lines
//! or as one JSON object per line ([`LogFormat`]). Every call a mesh server handles gets a
//! request id ([`request_id`]): the caller's `x-request-id` when it is valid, a new one
//! otherwise. It is echoed in the response metadata, stored in the request's extensions for
//! downstream calls, and recorded on the call's span so that every log line of the request
//! carries it.

pub mod request_id;

use std::{fmt, str::FromStr};

use tracing_subscriber::{EnvFilter, fmt::format::FmtSpan};

pub use request_id::{REQUEST_ID_HEADER, RequestId, RequestIdLayer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event, coloured when standard error is a terminal.
    #[default]
    Text,
    /// One JSON object per line, with the span fields (such as `request_id`) as fields.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format `{other}`: use `text` or `json`"
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Installs the process-wide log subscriber.
///
/// The filter comes from `RUST_LOG` and defaults to `info`; a malformed `RUST_LOG` falls back to
/// `info` with a warning rather than silencing the process. Calling it twice keeps the first
/// subscriber (tests may race to install one).
pub fn init(format: LogFormat) {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(err) if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() => {
            (EnvFilter::new("info"), Some(err))
        }
        Err(_) => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    if installed.is_ok()
        && let Some(err) = bad_filter
    {
        tracing::warn!(error = %err, "RUST_LOG is not a valid filter; logging at `info`");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both formats parse case-insensitively and anything else is refused with a clear message.
    #[test]
    fn log_format_parses() {
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(err.contains("yaml"), "{err}");
    }
}

//! Telemetry shared by every mesh process: logs, request ids, traces and metrics.
//!
//! - Logs go to standard error, filtered by `RUST_LOG` (default `info`), as human-readable
//!   lines or as one JSON object per line ([`LogFormat`]).
//! - Every call a mesh server handles gets a request id ([`request_id`]): the caller's
//!   `x-request-id` when it is valid, a new one otherwise, echoed in the response metadata and
//!   stored in the request's extensions for downstream calls.
//! - Every call runs in a span ([`rpc`]) that carries `request_id`, `trace_id` and `span_id`,
//!   so every log line of a call leads to its trace. W3C trace context ([`context`]) is taken
//!   from callers and passed to callees.
//! - With an OTLP endpoint set, spans and RPC metrics are exported ([`export`], [`metrics`]).

pub mod context;
pub mod export;
mod json;
pub mod metrics;
pub mod request_id;
pub mod rpc;

use std::{fmt, str::FromStr};

use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

pub use context::TraceContext;
pub use export::{ExportConfig, Telemetry};
pub use request_id::{REQUEST_ID_HEADER, RequestId, RequestIdLayer};
pub use rpc::{ClientTrace, ClientTraceLayer, ServerTraceLayer, current_context};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event, coloured when standard error is a terminal.
    #[default]
    Text,
    /// One JSON object per line: the event's fields, `trace_id`, `span_id` and `request_id`
    /// of the call it belongs to as top-level fields, and the current span.
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
    // Call spans always exist, whatever the filter: they carry the trace context that outgoing
    // calls pass on and the ids every log line of the call shows.
    let filter = match format!("{}=info", rpc::SPAN_TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                    .event_format(json::JsonLines),
            )
            .try_init(),
    };
    if installed.is_ok()
        && let Some(err) = bad_filter
    {
        tracing::warn!(error = %err, "RUST_LOG is not a valid filter; logging at `info`");
    }
}

/// `error: cause: cause…` on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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

//! Telemetry shared by every mesh process: logs, request ids, traces, metrics and logs over
//! OTLP through the OpenTelemetry SDK.
//!
//! - Logs go to standard error, filtered by `RUST_LOG` (default `info`), as human-readable
//!   lines or as one JSON object per line ([`LogFormat`]).
//! - Every call a mesh server handles gets a request id ([`request_id`]): the caller's
//!   `x-request-id` when it is valid, a new one otherwise, echoed in the response metadata and
//!   stored in the request's extensions for downstream calls.
//! - Every call runs in a span ([`rpc`]) that carries `request_id`, `trace_id` and `span_id`,
//!   so every log line of a call leads to its trace. Trace context and baggage are taken from
//!   callers and passed to callees.
//! - A service started with [`Telemetry::start`] exports over OTLP what the standard
//!   `OTEL_*` variables ask for ([`pipeline`]): every `tracing` span of a request as an
//!   OpenTelemetry span (`tracing-opentelemetry`), RPC metrics and gauges ([`metrics`]), and
//!   its log records (`opentelemetry-appender-tracing`), each with its trace and span id.

mod json;
pub mod metrics;
pub mod pipeline;
pub mod request_id;
pub mod rpc;

use std::{fmt, str::FromStr};

use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::filter_fn, layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

pub use pipeline::{Export, Protocol, Signals, TlsFiles};
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

/// The log filter: `RUST_LOG`, else `info`; a malformed `RUST_LOG` falls back to `info` with
/// the error to warn about. Call spans are always on.
fn filter() -> (EnvFilter, Option<String>) {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(err) if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() => {
            (EnvFilter::new("info"), Some(err.to_string()))
        }
        Err(_) => (EnvFilter::new("info"), None),
    };
    // Call spans always exist, whatever the filter: they carry the trace context that outgoing
    // calls pass on and the ids every log line of the call shows.
    let mut filter = filter;
    for target in [rpc::SPAN_TARGET, rpc::UNTRACED_TARGET] {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    (filter, bad_filter)
}

/// Targets whose spans and events never go out over OTLP: the export's own plumbing, which
/// would otherwise trace and log its own exports (the SDK's own warnings about failed exports
/// still reach the console).
fn is_plumbing(target: &str) -> bool {
    ["opentelemetry", "tonic", "h2", "hyper", "tower"]
        .iter()
        .any(|p| target.starts_with(p))
}

/// Installs the subscriber: the filter, the console layer, and the SDK's layers of
/// `providers`. Whether it was installed (a process keeps its first subscriber).
fn install(format: LogFormat, providers: &pipeline::Providers) -> bool {
    let (filter, bad_filter) = filter();
    let traces = providers.tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("mesh"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            // Spans only: log events go out as log records, not as span events.
            // Not the plumbing's own spans either (h2's per-connection and per-frame spans at
            // debug and trace, the export's own connections among them).
            .with_filter(filter_fn(|meta| {
                meta.is_span()
                    && meta.target() != rpc::UNTRACED_TARGET
                    && !is_plumbing(meta.target())
            }))
    });
    let logs = providers.logger.as_ref().map(|provider| {
        opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(provider)
            .with_filter(filter_fn(|meta| {
                meta.is_event() && !is_plumbing(meta.target())
            }))
    });
    let registry = tracing_subscriber::registry()
        .with(traces)
        .with(logs)
        .with(filter);
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
    installed.is_ok()
}

/// Installs the process-wide log subscriber of a process that exports nothing (the
/// launcher, the benchmarks): console logs only.
///
/// The filter comes from `RUST_LOG` and defaults to `info`; a malformed `RUST_LOG` falls back to
/// `info` with a warning rather than silencing the process. Calling it twice keeps the first
/// subscriber (tests may race to install one).
pub fn init(format: LogFormat) {
    install(format, &pipeline::Providers::default());
}

/// How long [`Telemetry::shutdown`] waits for each signal's last export.
const SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How a signal is exported, for the start-up log line: `None` when it is not.
fn shown(export: Option<&Export>, on: bool) -> Option<String> {
    export.filter(|_| on).map(|e| {
        let tls = if e.tls.is_some() { " over TLS" } else { "" };
        format!("{:?}{tls}", e.protocol)
    })
}

/// The telemetry of one service process: its log subscriber and the SDK's providers;
/// [`Telemetry::shutdown`] flushes them.
#[derive(Debug)]
pub struct Telemetry {
    providers: pipeline::Providers,
}

impl Telemetry {
    /// Installs the log subscriber and starts exporting as the environment says, for the
    /// service `service` (its default `service.name`). Must run inside a Tokio runtime.
    /// Without an endpoint it exports nothing and says nothing. When the process already has a
    /// subscriber (tests), that one is kept and nothing is exported.
    pub fn start(service: &str, format: LogFormat) -> Self {
        let signals = Signals::from_env();
        let mut problems = signals.problems.clone();
        pipeline::set_propagators(&signals.propagators);
        let mut providers = pipeline::providers(service, &signals, &mut problems);
        let installed = install(format, &providers);
        if !installed {
            // Another subscriber is in place: spans could not be made OpenTelemetry spans.
            providers.logger = None;
            if let Some(tracer) = providers.tracer.take() {
                let _ = tracer.shutdown();
            }
        }
        if let Some(meter) = &providers.meter {
            opentelemetry::global::set_meter_provider(meter.clone());
            metrics::runtime_gauges();
        }
        pipeline::mark(providers.tracer.is_some(), providers.meter.is_some());
        for problem in &problems {
            tracing::warn!(problem = %problem, "telemetry configuration");
        }
        if providers.tracer.is_some() || providers.meter.is_some() || providers.logger.is_some() {
            tracing::info!(
                service,
                traces = shown(signals.traces.as_ref(), providers.tracer.is_some()),
                metrics = shown(signals.metrics.as_ref(), providers.meter.is_some()),
                logs = shown(signals.logs.as_ref(), providers.logger.is_some()),
                "exporting telemetry over OTLP"
            );
        }
        Self { providers }
    }

    /// Starts the telemetry of `service`, runs `body`, and flushes the telemetry whatever
    /// `body` returned: what a service's `run` wraps around binding and serving.
    pub async fn around<T>(
        service: &str,
        format: LogFormat,
        body: impl std::future::Future<Output = T>,
    ) -> T {
        let telemetry = Self::start(service, format);
        let out = body.await;
        telemetry.shutdown().await;
        out
    }

    /// Sends every queued span, metric and log record (within 5 s), then stops exporting.
    pub async fn shutdown(self) {
        let providers = self.providers;
        pipeline::mark(false, false);
        // The SDK's shutdown blocks until its export threads are done; they need this runtime
        // running meanwhile. The three signals flush side by side, within 5 s in all.
        let mut flushing = Vec::new();
        if let Some(tracer) = providers.tracer {
            flushing.push(tokio::task::spawn_blocking(move || {
                let _ = tracer.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            }));
        }
        if let Some(meter) = providers.meter {
            flushing.push(tokio::task::spawn_blocking(move || {
                let _ = meter.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            }));
        }
        if let Some(logger) = providers.logger {
            flushing.push(tokio::task::spawn_blocking(move || {
                let _ = logger.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
            }));
        }
        for flush in flushing {
            let _ = flush.await;
        }
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

//! OTLP/gRPC export of spans and metrics, configured only by the standard `OTEL_*` variables.
//!
//! - Nothing is exported unless an endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`, or the
//!   `…_TRACES_ENDPOINT` / `…_METRICS_ENDPOINT` one for a single signal); `OTEL_SDK_DISABLED=true`
//!   or `OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none` turn export off.
//! - Finished spans go into a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048) that one task
//!   sends in batches (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512) every `OTEL_BSP_SCHEDULE_DELAY`
//!   (5 s). A full queue drops the span and counts it: a slow or dead collector costs spans,
//!   never memory or a request's time.
//! - Metrics are exported every `OTEL_METRIC_EXPORT_INTERVAL` (60 s), cumulatively.
//! - [`Telemetry::shutdown`] sends what is queued and the last metrics before the process exits.
//!
//! The exporter is the mesh's own (the OTLP subset in `mesh_proto::otlp` on the tonic the mesh
//! already builds) rather than the OpenTelemetry SDK, whose trace support needs a second
//! version of `rand` beside the one sqlx needs; the workspace keeps one version of each crate.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::StreamExt as _;
use mesh_proto::otlp::{
    collector::{
        metrics::v1::{ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient},
        trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{ResourceMetrics, ScopeMetrics},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use tokio::sync::{mpsc, oneshot};
use tonic::{metadata::MetadataMap, transport::Channel};

use crate::context::Sampler;

/// The instrumentation scope of every span and metric the mesh makes.
pub const SCOPE: &str = "mesh";

/// Telemetry settings, read from the standard OpenTelemetry variables.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    /// `service.name`: `OTEL_SERVICE_NAME`, else `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`, else the service's own name.
    pub service_name: String,
    /// The other resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource: Vec<(String, String)>,
    /// Where spans go; `None`: spans are not exported.
    pub traces_endpoint: Option<String>,
    /// Where metrics go; `None`: metrics are not exported.
    pub metrics_endpoint: Option<String>,
    /// Metadata sent with every export (`OTEL_EXPORTER_OTLP_HEADERS`), e.g. a vendor's key.
    pub headers: Vec<(String, String)>,
    /// The bound of one export call (`OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s).
    pub export_timeout: Duration,
    /// Which traces are recorded.
    pub sampler: Sampler,
    /// Spans waiting for export at most (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048).
    pub max_queue: usize,
    /// Spans per export call at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512).
    pub max_batch: usize,
    /// How often queued spans are sent (`OTEL_BSP_SCHEDULE_DELAY`, 5 s).
    pub schedule_delay: Duration,
    /// How often metrics are sent (`OTEL_METRIC_EXPORT_INTERVAL`, 60 s).
    pub metric_interval: Duration,
    /// What was wrong with the variables (each was replaced by its default), logged at start.
    pub problems: Vec<String>,
}

impl ExportConfig {
    /// The settings from the process environment, for a service called `service` by default.
    pub fn from_env(service: &str) -> Self {
        Self::from_lookup(service, |key| std::env::var(key).ok())
    }

    /// The settings from `lookup` (a variable's value by name), so that tests need not touch
    /// the process environment.
    pub fn from_lookup(service: &str, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key: &str| {
            lookup(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut problems = Vec::new();
        let disabled = get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));

        let mut resource = Vec::new();
        let mut service_name = None;
        if let Some(attrs) = get("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in attrs.split(',').filter(|p| !p.trim().is_empty()) {
                match pair.split_once('=') {
                    Some((k, v)) if !k.trim().is_empty() => {
                        let (k, v) = (percent_decode(k.trim()), percent_decode(v.trim()));
                        if k == "service.name" {
                            service_name = Some(v);
                        } else {
                            resource.push((k, v));
                        }
                    }
                    _ => problems.push(format!(
                        "OTEL_RESOURCE_ATTRIBUTES: `{pair}` is not key=value"
                    )),
                }
            }
        }
        let service_name = get("OTEL_SERVICE_NAME")
            .or(service_name)
            .unwrap_or_else(|| service.to_owned());

        let endpoint = |signal: &str, exporter: &str, problems: &mut Vec<String>| {
            if disabled {
                return None;
            }
            match get(exporter).as_deref() {
                None | Some("otlp") => {}
                Some("none") => return None,
                Some(other) => {
                    problems.push(format!(
                        "{exporter}=`{other}`: only `otlp` and `none` are supported; not exporting"
                    ));
                    return None;
                }
            }
            let protocol = get(&format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
                .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"));
            if let Some(p) = protocol.filter(|p| p != "grpc") {
                problems.push(format!(
                    "OTLP protocol `{p}` is not supported (only `grpc`); not exporting"
                ));
                return None;
            }
            let url = get(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
                .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
            if url.starts_with("https://") {
                problems.push(format!("OTLP endpoint `{url}`: TLS is not built in; use a local collector over http:// (not exporting)"));
                return None;
            }
            if !url.starts_with("http://") {
                problems.push(format!(
                    "OTLP endpoint `{url}` is not an http:// URL; not exporting"
                ));
                return None;
            }
            Some(url)
        };
        let traces_endpoint = endpoint("TRACES", "OTEL_TRACES_EXPORTER", &mut problems);
        let metrics_endpoint = endpoint("METRICS", "OTEL_METRICS_EXPORTER", &mut problems);

        let mut headers = Vec::new();
        if let Some(list) = get("OTEL_EXPORTER_OTLP_HEADERS") {
            for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
                match pair.split_once('=') {
                    Some((k, v)) => headers.push((
                        percent_decode(k.trim()).to_ascii_lowercase(),
                        percent_decode(v.trim()),
                    )),
                    // The value may be a secret: never echo it.
                    None => problems
                        .push("OTEL_EXPORTER_OTLP_HEADERS: an entry is not key=value".into()),
                }
            }
        }

        let mut millis = |key: &str, default: u64| -> Duration {
            match get(key) {
                None => Duration::from_millis(default),
                Some(v) => match v.parse::<u64>() {
                    Ok(ms) if ms > 0 => Duration::from_millis(ms),
                    _ => {
                        problems.push(format!(
                            "{key}=`{v}` is not a positive number of milliseconds"
                        ));
                        Duration::from_millis(default)
                    }
                },
            }
        };
        let export_timeout = millis("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000);
        let schedule_delay = millis("OTEL_BSP_SCHEDULE_DELAY", 5_000);
        let metric_interval = millis("OTEL_METRIC_EXPORT_INTERVAL", 60_000);
        let mut count = |key: &str, default: usize| -> usize {
            match get(key) {
                None => default,
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        problems.push(format!("{key}=`{v}` is not a positive number"));
                        default
                    }
                },
            }
        };
        let max_queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048);
        let max_batch = count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).min(max_queue);

        let sampler = match get("OTEL_TRACES_SAMPLER") {
            None => Sampler::default(),
            Some(name) => match Sampler::parse(&name, get("OTEL_TRACES_SAMPLER_ARG").as_deref()) {
                Ok(sampler) => sampler,
                Err(err) => {
                    problems.push(format!("{err}; using parentbased_always_on"));
                    Sampler::default()
                }
            },
        };
        Self {
            service_name,
            resource,
            traces_endpoint,
            metrics_endpoint,
            headers,
            export_timeout,
            sampler,
            max_queue,
            max_batch,
            schedule_delay,
            metric_interval,
            problems,
        }
    }
}

/// `%xx` escapes of `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_EXPORTER_OTLP_HEADERS` decoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The running pipeline, once [`Telemetry::start`] has run in this process.
#[derive(Debug)]
pub(crate) struct Pipeline {
    pub(crate) sampler: Sampler,
    spans: Option<mpsc::Sender<Span>>,
    /// Spans dropped because the queue was full.
    pub(crate) dropped: AtomicU64,
    /// Whether RPC durations are recorded (metrics are exported).
    pub(crate) metrics: bool,
}

static PIPELINE: OnceLock<Pipeline> = OnceLock::new();

/// The pipeline, if this process exports anything.
pub(crate) fn pipeline() -> Option<&'static Pipeline> {
    PIPELINE.get()
}

impl Pipeline {
    /// Whether spans are made and exported (else trace context is only passed on).
    pub(crate) fn traces(&self) -> bool {
        self.spans.is_some()
    }

    /// Queues a finished span; drops it (and counts it) when the queue is full.
    pub(crate) fn submit(&self, span: Span) {
        if let Some(queue) = &self.spans
            && queue.try_send(span).is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Spans dropped so far because the export queue was full (0 without a pipeline).
pub fn dropped_spans() -> u64 {
    pipeline().map_or(0, |p| p.dropped.load(Ordering::Relaxed))
}

/// A string attribute.
pub(crate) fn kv(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

/// An integer attribute.
pub(crate) fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
    }
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The running export of one process; [`Telemetry::shutdown`] flushes it.
#[derive(Debug)]
pub struct Telemetry {
    control: Option<mpsc::Sender<oneshot::Sender<()>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How long [`Telemetry::shutdown`] waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

impl Telemetry {
    /// Starts exporting as the environment says, for the service `service` (its default
    /// `service.name`). Must run inside a Tokio runtime. Without an endpoint it does nothing
    /// and says nothing; a second call in one process leaves the first pipeline in place.
    pub fn start(service: &str) -> Self {
        Self::start_with(ExportConfig::from_env(service))
    }

    /// Starts exporting with `config`.
    pub fn start_with(config: ExportConfig) -> Self {
        for problem in &config.problems {
            tracing::warn!(problem = %problem, "telemetry configuration");
        }
        let idle = Self {
            control: None,
            task: None,
        };
        if config.traces_endpoint.is_none() && config.metrics_endpoint.is_none() {
            return idle;
        }
        let (spans_tx, spans_rx) = mpsc::channel(config.max_queue.max(1));
        let pipeline = Pipeline {
            sampler: config.sampler,
            spans: config.traces_endpoint.is_some().then_some(spans_tx),
            dropped: AtomicU64::new(0),
            metrics: config.metrics_endpoint.is_some(),
        };
        if PIPELINE.set(pipeline).is_err() {
            tracing::warn!("telemetry export already started in this process");
            return idle;
        }
        let (control_tx, control_rx) = mpsc::channel(4);
        let exporter = Exporter::new(&config);
        tracing::info!(
            service_name = %config.service_name,
            traces = config.traces_endpoint.as_deref().unwrap_or("off"),
            metrics = config.metrics_endpoint.as_deref().unwrap_or("off"),
            sampler = ?config.sampler,
            "exporting telemetry over OTLP/gRPC"
        );
        let task = tokio::spawn(exporter.run(config, spans_rx, control_rx));
        Self {
            control: Some(control_tx),
            task: Some(task),
        }
    }

    /// Sends every queued span and the last metrics (within 5 s), then stops exporting.
    pub async fn shutdown(mut self) {
        let (Some(control), Some(task)) = (self.control.take(), self.task.take()) else {
            return;
        };
        let (done_tx, done_rx) = oneshot::channel();
        if control.send(done_tx).await.is_ok() {
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, done_rx).await;
        }
        task.abort();
    }
}

/// Span export calls under way at once at most.
const MAX_EXPORTS_IN_FLIGHT: usize = 4;

/// One span export call.
type Export = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), (&'static str, tonic::Status)>> + Send>,
>;

/// The task that sends spans and metrics to the collector.
struct Exporter {
    traces: Option<TraceServiceClient<Channel>>,
    metrics: Option<MetricsServiceClient<Channel>>,
    headers: MetadataMap,
    resource: Resource,
    timeout: Duration,
    /// When the last failure was logged (failures are logged at most once a minute).
    last_complaint: Option<tokio::time::Instant>,
}

fn channel(url: &str, timeout: Duration) -> Option<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned()).ok()?;
    Some(
        endpoint
            .connect_timeout(Duration::from_secs(2).min(timeout))
            .timeout(timeout)
            .tcp_nodelay(true)
            .connect_lazy(),
    )
}

impl Exporter {
    fn new(config: &ExportConfig) -> Self {
        let mut attributes = vec![
            kv("service.name", config.service_name.clone()),
            kv("telemetry.sdk.name", "mesh-telemetry"),
            kv("telemetry.sdk.language", "rust"),
            kv("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        ];
        if !config.resource.iter().any(|(k, _)| k == "service.version") {
            attributes.push(kv("service.version", env!("CARGO_PKG_VERSION")));
        }
        attributes.extend(config.resource.iter().map(|(k, v)| kv(k, v.clone())));
        let mut headers = MetadataMap::new();
        for (k, v) in &config.headers {
            if let (Ok(k), Ok(v)) = (
                k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                v.parse(),
            ) {
                headers.insert(k, v);
            }
        }
        let timeout = config.export_timeout;
        Self {
            traces: config
                .traces_endpoint
                .as_deref()
                .and_then(|u| channel(u, timeout))
                .map(TraceServiceClient::new),
            metrics: config
                .metrics_endpoint
                .as_deref()
                .and_then(|u| channel(u, timeout))
                .map(MetricsServiceClient::new),
            headers,
            resource: Resource {
                attributes,
                dropped_attributes_count: 0,
            },
            timeout,
            last_complaint: None,
        }
    }

    fn scope() -> InstrumentationScope {
        InstrumentationScope {
            name: SCOPE.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
        }
    }

    fn complain(&mut self, what: &str, status: &tonic::Status) {
        let now = tokio::time::Instant::now();
        if self
            .last_complaint
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
        {
            self.last_complaint = Some(now);
            tracing::warn!(
                what,
                code = ?status.code(),
                message = status.message(),
                dropped_spans = dropped_spans(),
                "telemetry export failed; dropping what could not be sent"
            );
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        *request.metadata_mut() = self.headers.clone();
        request.set_timeout(self.timeout);
        request
    }

    /// One export call for `spans` (none when there is nothing to send).
    fn export_spans(&self, spans: Vec<Span>) -> Option<Export> {
        let mut client = self.traces.clone()?;
        if spans.is_empty() {
            return None;
        }
        let request = self.request(ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(Self::scope()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        });
        Some(Box::pin(async move {
            client
                .export(request)
                .await
                .map(drop)
                .map_err(|s| ("spans", s))
        }))
    }

    async fn export_metrics(&mut self) {
        let Some(mut client) = self.metrics.clone() else {
            return;
        };
        let metrics = crate::metrics::collect();
        if metrics.is_empty() {
            return;
        }
        let request = self.request(ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(Self::scope()),
                    metrics,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        });
        if let Err(status) = client.export(request).await {
            self.complain("metrics", &status);
        }
    }

    async fn run(
        mut self,
        config: ExportConfig,
        mut spans: mpsc::Receiver<Span>,
        mut control: mpsc::Receiver<oneshot::Sender<()>>,
    ) {
        let mut batch = Vec::with_capacity(config.max_batch);
        // Export calls under way: a few at once, so that one slow answer does not stop the
        // queue from draining; past that the queue (bounded) fills and drops.
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut span_tick = tokio::time::interval(config.schedule_delay);
        let mut metric_tick = tokio::time::interval(config.metric_interval);
        span_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        metric_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick of an interval is immediate.
        span_tick.tick().await;
        metric_tick.tick().await;
        // With traces off (`OTEL_TRACES_EXPORTER=none`) the span queue has no sender: closed
        // from the start, while metrics still go out.
        let mut spans_open = true;
        loop {
            tokio::select! {
                done = control.recv() => {
                    // Flush: everything queued now, in batches, then the metrics.
                    while let Ok(span) = spans.try_recv() {
                        batch.push(span);
                        if batch.len() >= config.max_batch {
                            in_flight.extend(self.export_spans(std::mem::take(&mut batch)));
                        }
                    }
                    in_flight.extend(self.export_spans(std::mem::take(&mut batch)));
                    while let Some(result) = in_flight.next().await {
                        if let Err((what, status)) = result {
                            self.complain(what, &status);
                        }
                    }
                    self.export_metrics().await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Err((what, status)) = result {
                        self.complain(what, &status);
                    }
                }
                span = spans.recv(), if spans_open && (in_flight.len() < MAX_EXPORTS_IN_FLIGHT
                    || batch.len() < config.max_batch) =>
                {
                    let Some(span) = span else {
                        spans_open = false;
                        continue;
                    };
                    batch.push(span);
                    if batch.len() >= config.max_batch && in_flight.len() < MAX_EXPORTS_IN_FLIGHT {
                        in_flight.extend(self.export_spans(std::mem::take(&mut batch)));
                    }
                }
                _ = span_tick.tick(), if in_flight.len() < MAX_EXPORTS_IN_FLIGHT => {
                    in_flight.extend(self.export_spans(std::mem::take(&mut batch)));
                }
                _ = metric_tick.tick() => {
                    self.export_metrics().await;
                }
            }
        }
    }
}

/// What [`crate::metrics`] keys its series by.
pub(crate) type Attributes = Vec<(&'static str, AttrValue)>;

/// An attribute value of a metric series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum AttrValue {
    Str(Arc<str>),
    Int(i64),
}

impl AttrValue {
    pub(crate) fn key_value(&self, key: &str) -> KeyValue {
        match self {
            Self::Str(s) => kv(key, s.to_string()),
            Self::Int(i) => kv_int(key, *i),
        }
    }
}

/// Interned attribute strings (service and method names), so recording a call allocates
/// nothing once a method has been seen.
pub(crate) fn intern(s: &str) -> Arc<str> {
    static NAMES: OnceLock<std::sync::Mutex<HashMap<String, Arc<str>>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let Ok(mut names) = names.lock() else {
        return Arc::from(s);
    };
    if let Some(found) = names.get(s) {
        return found.clone();
    }
    // Bounded: hostile paths must not grow the table without end.
    if names.len() >= 4096 {
        return Arc::from("other");
    }
    let name: Arc<str> = Arc::from(s);
    names.insert(s.to_owned(), name.clone());
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> ExportConfig {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ExportConfig::from_lookup("users", |k| vars.get(k).cloned())
    }

    /// With nothing set, nothing is exported and nothing is wrong.
    #[test]
    fn defaults() {
        let c = config(&[]);
        assert_eq!(c.service_name, "users");
        assert_eq!((c.traces_endpoint, c.metrics_endpoint), (None, None));
        assert_eq!(c.sampler, Sampler::default());
        assert_eq!((c.max_queue, c.max_batch), (2048, 512));
        assert_eq!(c.schedule_delay, Duration::from_secs(5));
        assert_eq!(c.metric_interval, Duration::from_secs(60));
        assert!(c.problems.is_empty());
    }

    /// The general endpoint serves both signals; signal-specific ones win; `none` and
    /// `OTEL_SDK_DISABLED` turn export off.
    #[test]
    fn endpoints() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")]);
        assert_eq!(c.traces_endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!(c.metrics_endpoint.as_deref(), Some("http://collector:4317"));
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://jaeger:4317"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ]);
        assert_eq!(c.traces_endpoint.as_deref(), Some("http://jaeger:4317"));
        assert_eq!(c.metrics_endpoint, None);
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ]);
        assert_eq!((c.traces_endpoint, c.metrics_endpoint), (None, None));
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(c.traces_endpoint, None);
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
    }

    /// Service name and resource attributes, with percent-escapes; the service name of
    /// `OTEL_SERVICE_NAME` wins over the one in the attributes.
    #[test]
    fn resource() {
        let c = config(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=dev,service.name=people,team=a%2Cb,broken",
        )]);
        assert_eq!(c.service_name, "people");
        assert_eq!(
            c.resource,
            vec![
                ("deployment.environment".into(), "dev".into()),
                ("team".into(), "a,b".into())
            ]
        );
        assert_eq!(c.problems.len(), 1);
        let c = config(&[
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=people"),
            ("OTEL_SERVICE_NAME", "users-eu"),
        ]);
        assert_eq!(c.service_name, "users-eu");
    }

    /// Sampler, sizes and intervals; bad values fall back to the defaults and are reported.
    #[test]
    fn tuning() {
        let c = config(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
        ]);
        assert_eq!(
            c.sampler,
            Sampler::ParentBased(crate::context::Root::Ratio(0.1))
        );
        assert_eq!((c.max_queue, c.max_batch), (100, 100));
        assert_eq!(c.schedule_delay, Duration::from_millis(200));
        assert_eq!(c.metric_interval, Duration::from_secs(1));
        let c = config(&[
            ("OTEL_TRACES_SAMPLER", "sometimes"),
            ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ]);
        assert_eq!(c.sampler, Sampler::default());
        assert_eq!(c.schedule_delay, Duration::from_secs(5));
        assert_eq!(c.max_queue, 2048);
        assert_eq!(c.problems.len(), 3, "{:?}", c.problems);
    }

    /// Export headers are parsed, but a malformed entry is reported without its text.
    #[test]
    fn headers() {
        let c = config(&[("OTEL_EXPORTER_OTLP_HEADERS", "Api-Key=s3cr%3Dt,oops")]);
        assert_eq!(c.headers, vec![("api-key".into(), "s3cr=t".into())]);
        assert_eq!(c.problems.len(), 1);
        assert!(!c.problems[0].contains("oops"));
    }
}

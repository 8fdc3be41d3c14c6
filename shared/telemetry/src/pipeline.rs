//! The OpenTelemetry SDK pipeline of a service: which signals go out over which OTLP transport,
//! the propagators, and the process's log subscriber with the SDK's layers in it.
//!
//! - Configuration is the standard variables only. The mesh reads which signals are on
//!   (`OTEL_SDK_DISABLED`, `OTEL_{TRACES,METRICS,LOGS}_EXPORTER=none`, an endpoint in
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` or the per-signal one) and their protocol
//!   (`OTEL_EXPORTER_OTLP[_<SIGNAL>]_PROTOCOL`: `http/protobuf`, the specification's default,
//!   or `grpc`), and the propagators (`OTEL_PROPAGATORS`, default `tracecontext,baggage`).
//!   The SDK and its exporter read the rest themselves: headers, timeouts, the sampler
//!   (`OTEL_TRACES_SAMPLER`/`_ARG`), the batch queue (`OTEL_BSP_*`, `OTEL_BLRP_*`), the metric
//!   interval, the resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`).
//! - No endpoint: nothing is exported and nothing complains.
//! - The SDK's batch processors run on threads of their own with queues bounded by count: a
//!   dead or slow collector costs dropped telemetry, never memory growth or a request's time.
//!   What a caller sends that ends up in every span is bounded here: `tracestate` (512
//!   bytes) and `baggage` (8,192 bytes, at most 16 entries of 256 bytes copied onto spans).
//!
//! Where the SDK falls short, the mesh fills in:
//! - OTLP over HTTP: the exporter's own HTTP clients are reqwest (a second HTTP client stack)
//!   or a hyper client that must be called inside a Tokio runtime, which the SDK's export
//!   threads are not. `RuntimeHttpClient` runs that hyper client on the service's runtime.
//! - `https://` endpoints: the exporter reads none of the TLS variables. The mesh reads
//!   `OTEL_EXPORTER_OTLP[_<SIGNAL>]_CERTIFICATE` (the collector's CA; else the system's trust
//!   store) and `…_CLIENT_CERTIFICATE`/`…_CLIENT_KEY` (mutual TLS), and gives the gRPC
//!   exporter a tonic TLS configuration and the HTTP client a rustls connector
//!   (`hyper-rustls`): the tree's one TLS stack either way.
//! - Baggage on spans: the SDK has no processor that copies it, so `BaggageAttributes` does.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry_http::{HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::{
    Resource,
    logs::SdkLoggerProvider,
    metrics::SdkMeterProvider,
    propagation::{BaggagePropagator, TraceContextPropagator},
    trace::SdkTracerProvider,
};

/// Whether call spans are OpenTelemetry spans (the process exports traces).
static TRACES: AtomicBool = AtomicBool::new(false);
/// Whether RPC durations are recorded (the process exports metrics).
static METRICS: AtomicBool = AtomicBool::new(false);

pub(crate) fn traces_on() -> bool {
    TRACES.load(Ordering::Relaxed)
}

pub(crate) fn metrics_on() -> bool {
    METRICS.load(Ordering::Relaxed)
}

/// An OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318), the specification's default.
    HttpProtobuf,
}

/// One of the propagators `OTEL_PROPAGATORS` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagator {
    /// W3C `traceparent` and `tracestate`.
    TraceContext,
    /// W3C `baggage`.
    Baggage,
}

/// How one signal goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The transport.
    pub protocol: Protocol,
    /// Set for an `https://` endpoint: the files its TLS uses.
    pub tls: Option<TlsFiles>,
}

/// The TLS files of an `https://` endpoint, from `OTEL_EXPORTER_OTLP[_<SIGNAL>]_CERTIFICATE`,
/// `…_CLIENT_CERTIFICATE` and `…_CLIENT_KEY`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates the collector's certificate must chain to; `None`: the system's
    /// trust store.
    pub ca: Option<PathBuf>,
    /// A PEM certificate (chain) and its key, for a collector that asks for a client
    /// certificate.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// What the environment asks of telemetry export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signals {
    /// How spans go out; `None`: not exported.
    pub traces: Option<Export>,
    /// How metrics go out; `None`: not exported.
    pub metrics: Option<Export>,
    /// How log records go out; `None`: not exported.
    pub logs: Option<Export>,
    /// The propagators, in order (`OTEL_PROPAGATORS`; `none` gives none).
    pub propagators: Vec<Propagator>,
    /// What was wrong with the variables, logged once the subscriber is in place.
    pub problems: Vec<String>,
}

impl Signals {
    /// The settings from the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// The settings from `lookup` (a variable's value by name), so that tests need not touch
    /// the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key: &str| {
            lookup(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut problems = Vec::new();
        let disabled = get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let mut signal = |name: &str| -> Option<Export> {
            if disabled {
                return None;
            }
            let exporter = format!("OTEL_{name}_EXPORTER");
            match get(&exporter).as_deref() {
                None | Some("otlp") => {}
                Some("none") => return None,
                Some(other) => {
                    problems.push(format!(
                        "{exporter}=`{other}`: only `otlp` and `none` are supported; not exporting"
                    ));
                    return None;
                }
            }
            let url = get(&format!("OTEL_EXPORTER_OTLP_{name}_ENDPOINT"))
                .or_else(|| get("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
            let secure = url.starts_with("https://");
            if !secure && !url.starts_with("http://") {
                problems.push(format!(
                    "OTLP endpoint `{url}` is not an http:// or https:// URL; not exporting"
                ));
                return None;
            }
            let protocol = get(&format!("OTEL_EXPORTER_OTLP_{name}_PROTOCOL"))
                .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"));
            let protocol = match protocol.as_deref() {
                None | Some("http/protobuf") => Protocol::HttpProtobuf,
                Some("grpc") => Protocol::Grpc,
                Some(other) => {
                    problems.push(format!(
                        "OTLP protocol `{other}` is not supported (`grpc` or `http/protobuf`); not exporting"
                    ));
                    return None;
                }
            };
            let file = |what: &str| {
                get(&format!("OTEL_EXPORTER_OTLP_{name}_{what}"))
                    .or_else(|| get(&format!("OTEL_EXPORTER_OTLP_{what}")))
                    .map(PathBuf::from)
            };
            let tls = if secure {
                let client = match (file("CLIENT_CERTIFICATE"), file("CLIENT_KEY")) {
                    (Some(cert), Some(key)) => Some((cert, key)),
                    (None, None) => None,
                    _ => {
                        problems.push(format!(
                            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _CLIENT_KEY go together; {name} not exported"
                        ));
                        return None;
                    }
                };
                Some(TlsFiles {
                    ca: file("CERTIFICATE"),
                    client,
                })
            } else {
                None
            };
            Some(Export { protocol, tls })
        };
        let traces = signal("TRACES");
        let metrics = signal("METRICS");
        let logs = signal("LOGS");
        let mut propagators = Vec::new();
        let list = get("OTEL_PROPAGATORS").unwrap_or_else(|| "tracecontext,baggage".into());
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let propagator = match name {
                "tracecontext" => Propagator::TraceContext,
                "baggage" => Propagator::Baggage,
                "none" => continue,
                other => {
                    problems.push(format!(
                        "OTEL_PROPAGATORS: `{other}` is not supported (`tracecontext`, `baggage`, `none`)"
                    ));
                    continue;
                }
            };
            if !propagators.contains(&propagator) {
                propagators.push(propagator);
            }
        }
        Self {
            traces,
            metrics,
            logs,
            propagators,
            problems,
        }
    }
}

/// The process's propagator, set once by [`crate::Telemetry::start`] (W3C trace context and
/// baggage until then).
fn propagator() -> &'static TextMapCompositePropagator {
    PROPAGATOR.get_or_init(|| composite(&[Propagator::TraceContext, Propagator::Baggage]))
}

static PROPAGATOR: std::sync::OnceLock<TextMapCompositePropagator> = std::sync::OnceLock::new();

fn composite(list: &[Propagator]) -> TextMapCompositePropagator {
    let propagators: Vec<Box<dyn TextMapPropagator + Send + Sync>> = list
        .iter()
        .map(|p| -> Box<dyn TextMapPropagator + Send + Sync> {
            match p {
                Propagator::TraceContext => Box::new(TraceContextPropagator::new()),
                Propagator::Baggage => Box::new(BaggagePropagator::new()),
            }
        })
        .collect();
    TextMapCompositePropagator::new(propagators)
}

/// The longest `tracestate` taken from a caller: W3C Trace Context lets a vendor drop one
/// longer than 512 characters, and the SDK would keep up to 32 entries of 512 bytes, copied
/// onto every span and every downstream call.
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// The longest `baggage` taken from a caller or passed on: W3C Baggage's limit. The SDK
/// re-encodes what it passes on, which can triple a header; one over the limit is not sent
/// (the callee would refuse the whole call for its header size).
pub const MAX_BAGGAGE_BYTES: usize = 8_192;

/// A request's metadata as the propagators read it, without a `tracestate` or `baggage`
/// beyond its bound.
struct Bounded<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Bounded<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key)?.to_str().ok()?;
        let limit = match key {
            "tracestate" => MAX_TRACESTATE_BYTES,
            "baggage" => MAX_BAGGAGE_BYTES,
            _ => usize::MAX,
        };
        (value.len() <= limit).then_some(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's trace context and baggage from a request's metadata (empty when absent or
/// malformed: the call then starts a new trace).
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    propagator().extract(&Bounded(headers))
}

/// Writes `cx` into an outgoing request's metadata.
pub fn inject(cx: &opentelemetry::Context, headers: &mut http::HeaderMap) {
    propagator().inject_context(cx, &mut HeaderInjector(headers));
    if headers
        .get("baggage")
        .is_some_and(|v| v.len() > MAX_BAGGAGE_BYTES)
    {
        headers.remove("baggage");
    }
}

/// The SDK's providers of one process, for the signals that are exported.
#[derive(Debug, Default)]
pub(crate) struct Providers {
    pub(crate) tracer: Option<SdkTracerProvider>,
    pub(crate) meter: Option<SdkMeterProvider>,
    pub(crate) logger: Option<SdkLoggerProvider>,
}

/// `service.name`: the environment's when it names one, else `service`.
fn resource(service: &str) -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|pair| pair.split('=').next().map(str::trim) == Some("service.name"))
        });
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name(service.to_owned()).build()
    }
}

/// The export timeout of the HTTP client (`OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s).
fn http_timeout() -> Duration {
    std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// opentelemetry-http's hyper client, run on the service's Tokio runtime: the SDK's export
/// threads call it from outside any runtime, where hyper cannot spawn its connections.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeHttpClient {
    runtime: tokio::runtime::Handle,
    client: HyperClient,
}

type HttpsConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// Plain HTTP, or HTTPS on rustls.
#[derive(Debug, Clone)]
enum HyperClient {
    Plain(opentelemetry_http::hyper::HyperClient),
    Tls(opentelemetry_http::hyper::HyperClient<HttpsConnector>),
}

impl RuntimeHttpClient {
    fn new(runtime: tokio::runtime::Handle, tls: Option<&TlsMaterial>) -> Result<Self, String> {
        let client = match tls {
            None => HyperClient::Plain(
                opentelemetry_http::hyper::HyperClient::with_default_connector(
                    http_timeout(),
                    None,
                ),
            ),
            Some(tls) => {
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls.rustls()?)
                    .https_only()
                    .enable_http1()
                    .build();
                HyperClient::Tls(opentelemetry_http::hyper::HyperClient::new(
                    connector,
                    http_timeout(),
                    None,
                ))
            }
        };
        Ok(Self { runtime, client })
    }
}

#[tonic::async_trait]
impl HttpClient for RuntimeHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move {
                match client {
                    HyperClient::Plain(client) => client.send_bytes(request).await,
                    HyperClient::Tls(client) => client.send_bytes(request).await,
                }
            })
            .await?
    }
}

/// The contents of an endpoint's [`TlsFiles`], read once at start.
struct TlsMaterial {
    ca: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsMaterial {
    fn read(files: &TlsFiles) -> Result<Self, String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        // Checked here: tonic would take a file without a certificate and fail every handshake.
        let certs = |path: &Path, pem: &[u8]| {
            let found = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| format!("{}: {err}", path.display()))?;
            if found.is_empty() {
                return Err(format!("{}: no PEM certificate in it", path.display()));
            }
            Ok(())
        };
        let ca = match files.ca.as_deref() {
            Some(path) => {
                let pem = read(path)?;
                certs(path, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let client = match &files.client {
            Some((cert_path, key_path)) => {
                let (cert, key) = (read(cert_path)?, read(key_path)?);
                certs(cert_path, &cert)?;
                PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|err| format!("{}: {err}", key_path.display()))?;
                Some((cert, key))
            }
            None => None,
        };
        Ok(Self { ca, client })
    }

    /// For the gRPC exporter: tonic's TLS, trusting the CA file or the system's store.
    fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let config = match &self.ca {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        match &self.client {
            Some((cert, key)) => config.identity(Identity::from_pem(cert, key)),
            None => config,
        }
    }

    /// For the HTTP exporter: a rustls client, trusting the CA file or the system's store.
    fn rustls(&self) -> Result<rustls::ClientConfig, String> {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|err| format!("the CA file: {err}"))?;
                    roots
                        .add(cert)
                        .map_err(|err| format!("the CA file: {err}"))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(
                "no trusted CA certificate (OTEL_EXPORTER_OTLP_CERTIFICATE, or the system's store)"
                    .into(),
            );
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_root_certificates(roots);
        match &self.client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| format!("the client certificate: {err}"))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|err| format!("the client key: {err}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| format!("the client certificate: {err}"))
            }
        }
    }
}

/// Copies the baggage a span starts with into its attributes (`baggage.<key>`), so that what a
/// caller set in `baggage` shows on every span of the request in every service. The caller
/// controls it, so at most [`BAGGAGE_ATTRIBUTES`] entries are copied, each value cut to
/// [`BAGGAGE_VALUE_BYTES`] (the propagator already takes at most 64 entries of a header of
/// at most [`MAX_BAGGAGE_BYTES`]).
#[derive(Debug)]
pub(crate) struct BaggageAttributes;

/// Baggage entries copied onto one span at most.
pub(crate) const BAGGAGE_ATTRIBUTES: usize = 16;
/// Bytes of one baggage value copied at most.
pub(crate) const BAGGAGE_VALUE_BYTES: usize = 256;

impl opentelemetry_sdk::trace::SpanProcessor for BaggageAttributes {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        use opentelemetry::{baggage::BaggageExt as _, trace::Span as _};
        for (key, (value, _)) in cx.baggage().iter().take(BAGGAGE_ATTRIBUTES) {
            let value = value.as_str();
            let mut end = value.len().min(BAGGAGE_VALUE_BYTES);
            while !value.is_char_boundary(end) {
                end -= 1;
            }
            span.set_attribute(opentelemetry::KeyValue::new(
                format!("baggage.{}", key.as_str()),
                value[..end].to_owned(),
            ));
        }
    }

    fn on_end(&self, _span: opentelemetry_sdk::trace::SpanData) {}

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// Builds one signal's OTLP exporter over `export`'s transport, with its TLS for an
/// `https://` endpoint.
macro_rules! exporter {
    ($builder:path, $export:expr, $runtime:expr) => {{
        let export: &Export = $export;
        match export.tls.as_ref().map(TlsMaterial::read).transpose() {
            Err(err) => Err(err),
            Ok(tls) => match export.protocol {
                Protocol::Grpc => {
                    let builder = <$builder>::builder().with_tonic();
                    match &tls {
                        Some(tls) => builder.with_tls_config(tls.tonic()).build(),
                        None => builder.build(),
                    }
                    .map_err(|err| err.to_string())
                }
                Protocol::HttpProtobuf => RuntimeHttpClient::new($runtime.clone(), tls.as_ref())
                    .and_then(|client| {
                        <$builder>::builder()
                            .with_http()
                            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                            .with_http_client(client)
                            .build()
                            .map_err(|err| err.to_string())
                    }),
            },
        }
    }};
}

/// Builds the exporters and providers `signals` asks for. Must run inside a Tokio runtime
/// (the gRPC transport's channel and the HTTP client live on it). A provider whose exporter
/// cannot be built is left out, with the reason in `problems`.
pub(crate) fn providers(service: &str, signals: &Signals, problems: &mut Vec<String>) -> Providers {
    let runtime = tokio::runtime::Handle::current();
    let resource = resource(service);
    let mut providers = Providers::default();
    if let Some(export) = &signals.traces {
        match exporter!(opentelemetry_otlp::SpanExporter, export, runtime) {
            Ok(exporter) => {
                providers.tracer = Some(
                    SdkTracerProvider::builder()
                        .with_span_processor(BaggageAttributes)
                        .with_batch_exporter(exporter)
                        .with_resource(resource.clone())
                        .build(),
                );
            }
            Err(err) => problems.push(format!("cannot export spans: {err}")),
        }
    }
    if let Some(export) = &signals.metrics {
        match exporter!(opentelemetry_otlp::MetricExporter, export, runtime) {
            Ok(exporter) => {
                providers.meter = Some(
                    SdkMeterProvider::builder()
                        .with_periodic_exporter(exporter)
                        .with_resource(resource.clone())
                        .build(),
                );
            }
            Err(err) => problems.push(format!("cannot export metrics: {err}")),
        }
    }
    if let Some(export) = &signals.logs {
        match exporter!(opentelemetry_otlp::LogExporter, export, runtime) {
            Ok(exporter) => {
                providers.logger = Some(
                    SdkLoggerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                );
            }
            Err(err) => problems.push(format!("cannot export logs: {err}")),
        }
    }
    providers
}

/// Sets the process's propagators (once; later calls keep the first).
pub(crate) fn set_propagators(list: &[Propagator]) {
    let _ = PROPAGATOR.set(composite(list));
}

/// Marks which signals the installed subscriber and meter provider carry.
pub(crate) fn mark(traces: bool, metrics: bool) {
    TRACES.store(traces, Ordering::Relaxed);
    METRICS.store(metrics, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(vars: &[(&str, &str)]) -> Signals {
        Signals::from_lookup(|key| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    /// No endpoint: nothing is exported and nothing complains.
    #[test]
    fn no_endpoint_exports_nothing() {
        let s = signals(&[]);
        assert_eq!((s.traces, s.metrics, s.logs), (None, None, None));
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(
            s.propagators,
            [Propagator::TraceContext, Propagator::Baggage]
        );
    }

    /// The protocol defaults to http/protobuf, per signal overrides apply, `none` and
    /// `OTEL_SDK_DISABLED` turn signals off, and bad values are reported, never echoing headers.
    #[test]
    fn signals_follow_the_standard_variables() {
        let s = signals(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc"),
            ("OTEL_LOGS_EXPORTER", "none"),
        ]);
        let protocol = |e: &Option<Export>| e.as_ref().map(|e| e.protocol);
        assert_eq!(protocol(&s.traces), Some(Protocol::HttpProtobuf));
        assert_eq!(protocol(&s.metrics), Some(Protocol::Grpc));
        assert_eq!(s.logs, None);
        assert!(s.traces.as_ref().is_some_and(|e| e.tls.is_none()));
        assert!(s.problems.is_empty(), "{:?}", s.problems);

        let s = signals(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ]);
        assert_eq!((s.traces, s.metrics, s.logs), (None, None, None));

        // https://: the CA and client files, per signal or for all.
        let s = signals(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://vendor.example:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "/etc/traces-ca.pem",
            ),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/etc/me.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/me-key.pem"),
            ("OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY", "/etc/other-key.pem"),
            (
                "OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE",
                "/etc/other.pem",
            ),
        ]);
        let tls = |e: &Option<Export>| e.as_ref().and_then(|e| e.tls.clone());
        assert_eq!(
            tls(&s.traces),
            Some(TlsFiles {
                ca: Some("/etc/traces-ca.pem".into()),
                client: Some(("/etc/me.pem".into(), "/etc/me-key.pem".into())),
            })
        );
        assert_eq!(
            tls(&s.metrics).and_then(|t| t.ca),
            Some("/etc/ca.pem".into())
        );
        assert_eq!(
            tls(&s.logs).and_then(|t| t.client),
            Some(("/etc/other.pem".into(), "/etc/other-key.pem".into()))
        );
        assert!(s.problems.is_empty(), "{:?}", s.problems);

        let s = signals(&[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://collector:4318",
            ),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "ftp://vendor.example",
            ),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "https://collector:4318"),
            ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY", "/etc/key.pem"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_PROPAGATORS", "b3,baggage,baggage"),
        ]);
        assert_eq!((s.traces, s.metrics, s.logs), (None, None, None));
        assert_eq!(s.propagators, [Propagator::Baggage]);
        let text = s.problems.join("\n");
        for expected in ["http/json", "ftp://", "CLIENT_KEY", "b3"] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
        assert!(
            signals(&[("OTEL_PROPAGATORS", "none")])
                .propagators
                .is_empty()
        );
    }

    /// W3C trace context and baggage come in and go out (within their bounds).
    #[test]
    fn trace_context_and_baggage_round_trip() {
        use opentelemetry::{baggage::BaggageExt as _, trace::TraceContextExt as _};
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        headers.insert("baggage", http::HeaderValue::from_static("tenant=acme"));
        let cx = extract(&headers);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            cx.baggage().get("tenant").map(|v| v.as_str().to_owned()),
            Some("acme".into())
        );
        let mut out = http::HeaderMap::new();
        inject(&cx, &mut out);
        assert_eq!(out.get("traceparent"), headers.get("traceparent"));
        assert_eq!(out.get("baggage"), headers.get("baggage"));

        // An oversized tracestate or baggage is not taken; the trace context still is.
        let mut big = headers.clone();
        big.insert(
            "tracestate",
            http::HeaderValue::from_str(&format!("v={}", "x".repeat(MAX_TRACESTATE_BYTES)))
                .expect("value"),
        );
        big.insert(
            "baggage",
            http::HeaderValue::from_str(&format!("k={}", "x".repeat(MAX_BAGGAGE_BYTES)))
                .expect("value"),
        );
        let cx = extract(&big);
        assert!(cx.span().span_context().is_valid());
        assert!(cx.span().span_context().trace_state().header().is_empty());
        assert_eq!(cx.baggage().len(), 0);
        // Baggage that re-encodes past the limit is not passed on.
        let spaces = format!("k={}", "\"".repeat(4_000));
        let mut wide = headers.clone();
        wide.insert(
            "baggage",
            http::HeaderValue::from_str(&spaces).expect("value"),
        );
        let cx = extract(&wide);
        assert_eq!(cx.baggage().len(), 1);
        let mut out = http::HeaderMap::new();
        inject(&cx, &mut out);
        assert!(out.get("traceparent").is_some());
        assert_eq!(out.get("baggage").map(http::HeaderValue::len), None);

        // A malformed traceparent starts a new trace.
        let mut bad = http::HeaderMap::new();
        bad.insert("traceparent", http::HeaderValue::from_static("00-zz-yy-01"));
        assert!(!extract(&bad).span().span_context().is_valid());
    }
}

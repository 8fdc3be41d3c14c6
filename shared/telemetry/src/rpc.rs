//! Tracing of gRPC calls, as tower layers: [`ServerTraceLayer`] on every mesh server and
//! [`ClientTraceLayer`] on every channel a mesh service calls another with.
//!
//! - The server side takes the caller's trace context and baggage (the propagators of
//!   `OTEL_PROPAGATORS`, W3C `traceparent`/`tracestate` and `baggage` by default) and opens the
//!   call's `tracing` span, which becomes the OpenTelemetry server span (through
//!   `tracing-opentelemetry`), a child of the caller's. Every log line of the call is written
//!   in it and carries `trace_id`, `span_id` and `request_id`; every span opened inside it (an
//!   `#[tracing::instrument]` on a store call) is its child in the trace.
//! - The client side opens a span for each outgoing call, a child of the span the call is made
//!   in, and sends its context as the callee's `traceparent` (and the baggage on).
//! - One span per call, streams included: it ends when the response's last frame (its
//!   trailers) has passed, and counts the messages each way. Names and attributes follow
//!   OpenTelemetry's current RPC conventions: the span is named `pkg.Service/Method`, with
//!   `rpc.system.name` (`grpc`), `rpc.method` (`pkg.Service/Method`),
//!   `rpc.response.status_code` (the code's name: `OK`, `NOT_FOUND`, …) and
//!   `server.address`/`server.port` on client spans.
//! - Each call's duration goes into `rpc.server.call.duration` / `rpc.client.call.duration`
//!   (seconds, by `rpc.method` and `rpc.response.status_code`; see [`crate::metrics`]).
//!
//! Without trace export (tests, or no endpoint set) no OpenTelemetry span is made, but the
//! caller's trace context and baggage are still passed on, so a mesh without a
//! collector does not break the traces of the services around it.
//!
//! Health checks and reflection get the log span but no trace span: probes every few seconds
//! would bury the traces that matter.
//!
//! The layers are the mesh's own. The published ones (`tonic-tracing-opentelemetry` 0.42, on
//! the same tonic and OpenTelemetry versions) end the span when the response's headers
//! arrive, so a stream's span does not cover the stream, and take a status that comes in the
//! trailers as OK; they count no messages and record no RPC metrics.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::Frame;
use opentelemetry::trace::{Status, TraceContextExt as _};
use tower::{Layer, Service};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::registry::LookupSpan as _;

use crate::{RequestId, metrics, pipeline};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The target of the call spans; the log filter always enables it, so calls keep their trace
/// context whatever `RUST_LOG` says.
pub const SPAN_TARGET: &str = "mesh_rpc";

/// The target of the call spans of health checks and reflection: logged like the others, never
/// made OpenTelemetry spans.
pub const UNTRACED_TARGET: &str = "mesh_rpc_untraced";

/// What the call span of a request knows, kept in the span's extensions: the ids its log lines
/// carry, the request id, and (without trace export) the caller's context to pass on.
#[derive(Debug, Clone)]
pub(crate) struct CallIds {
    /// `trace_id` and `span_id` of the call (the caller's, passed through, without export).
    pub(crate) ids: Option<(String, String)>,
    /// The caller's trace context and baggage, passed on as they came when no span is made.
    pub(crate) passed_on: Option<opentelemetry::Context>,
    pub(crate) request_id: Option<String>,
}

fn call_ids(span: &Span) -> Option<CallIds> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = registry.span(id)?;
        span.scope()
            .find_map(|s| s.extensions().get::<CallIds>().cloned())
    })
    .flatten()
}

fn remember(span: &Span, ids: CallIds) {
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>()
            && let Some(span) = registry.span(id)
        {
            span.extensions_mut().insert(ids);
        }
    });
}

/// The trace context an outgoing call made now is a child of: the current span's (with its
/// baggage) when spans are exported, else the caller's context passed through.
pub fn current_context() -> opentelemetry::Context {
    let span = Span::current();
    if pipeline::traces_on() {
        return span.context();
    }
    call_ids(&span)
        .and_then(|ids| ids.passed_on)
        .unwrap_or_default()
}

fn hex_ids(cx: &opentelemetry::Context) -> Option<(String, String)> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// What a method not in the mesh's contracts is recorded as (span name, `rpc.method`), as the
/// RPC conventions say: a caller sending made-up paths cannot make spans and metric series
/// of its own choosing, nor grow the metrics' attribute sets.
pub(crate) const OTHER: &str = "_OTHER";

/// A known method: `pkg.Service/Method`, `pkg.Service`, `Method`.
type Known = (Arc<str>, Box<str>, Box<str>);

/// The methods the mesh defines (its contracts, health checking, reflection) by
/// `pkg.Service/Method`, each with its service's and method's names.
fn known_methods() -> &'static HashMap<Box<str>, Known> {
    static KNOWN: OnceLock<HashMap<Box<str>, Known>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut names: Vec<(String, String)> = [
            ("grpc.health.v1.Health", "Check"),
            ("grpc.health.v1.Health", "Watch"),
            ("grpc.health.v1.Health", "List"),
            (
                "grpc.reflection.v1.ServerReflection",
                "ServerReflectionInfo",
            ),
            (
                "grpc.reflection.v1alpha.ServerReflection",
                "ServerReflectionInfo",
            ),
        ]
        .iter()
        .map(|(s, m)| ((*s).to_owned(), (*m).to_owned()))
        .collect();
        if let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(
            mesh_proto::FILE_DESCRIPTOR_SET,
        ) {
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        names.push((
                            format!("{}.{}", file.package(), service.name()),
                            method.name().to_owned(),
                        ));
                    }
                }
            }
        }
        names
            .into_iter()
            .map(|(service, method)| {
                let name = format!("{service}/{method}");
                (
                    name.clone().into_boxed_str(),
                    (
                        Arc::from(name),
                        service.into_boxed_str(),
                        method.into_boxed_str(),
                    ),
                )
            })
            .collect()
    })
}

/// `/pkg.Service/Method` → (`pkg.Service/Method`, `pkg.Service`, `Method`) for a method the
/// mesh defines; [`OTHER`] for anything else.
fn method_of(path: &str) -> (Arc<str>, &'static str, &'static str) {
    static OTHER_NAME: OnceLock<Arc<str>> = OnceLock::new();
    match path.strip_prefix('/').and_then(|p| known_methods().get(p)) {
        Some((name, service, method)) => (Arc::clone(name), service, method),
        None => (
            Arc::clone(OTHER_NAME.get_or_init(|| Arc::from(OTHER))),
            OTHER,
            OTHER,
        ),
    }
}

/// Health and reflection: not traced.
fn is_infrastructure(service: &str) -> bool {
    service.starts_with("grpc.")
}

fn status_of(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get(mesh_proto::headers::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

pub(crate) fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN_CODE",
    }
}

/// Counts the gRPC messages in a stream of body chunks (5-byte frame headers, then the
/// announced length).
#[derive(Debug, Default)]
struct MessageCounter {
    header: [u8; 5],
    header_len: usize,
    remaining: u64,
}

impl MessageCounter {
    /// The messages whose header ends in `chunk`.
    fn feed(&mut self, mut chunk: &[u8]) -> u64 {
        let mut messages = 0;
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                chunk = &chunk[skip..];
                self.remaining -= skip as u64;
                continue;
            }
            let take = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&chunk[..take]);
            self.header_len += take;
            chunk = &chunk[take..];
            if self.header_len == 5 {
                messages += 1;
                self.header_len = 0;
                self.remaining = u64::from(u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]));
            }
        }
        messages
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Server,
    Client,
}

/// One call being traced and timed, finished exactly once (when its response ends, fails or
/// is dropped).
struct Call {
    kind: Kind,
    /// The call's span, when its OpenTelemetry span is exported.
    traced: Option<Span>,
    /// `pkg.Service/Method`, the metrics' `rpc.method`.
    name: Arc<str>,
    peer: Option<(Arc<str>, u16)>,
    started: Instant,
    /// Messages of the request body (counted by its wrapper).
    request_messages: Arc<AtomicU64>,
    response_messages: u64,
    status: Option<i32>,
    done: bool,
}

impl Call {
    /// A call starting now, and its request with a body that counts its messages.
    fn start(
        kind: Kind,
        traced: Option<Span>,
        name: Arc<str>,
        peer: Option<(Arc<str>, u16)>,
        request: http::Request<tonic::body::Body>,
    ) -> (Self, http::Request<tonic::body::Body>) {
        let request_messages = Arc::new(AtomicU64::new(0));
        let counted = request_messages.clone();
        let request = request.map(|body| {
            tonic::body::Body::new(CountedBody {
                inner: body,
                counter: MessageCounter::default(),
                messages: counted,
            })
        });
        let call = Self {
            kind,
            traced,
            name,
            peer,
            started: Instant::now(),
            request_messages,
            response_messages: 0,
            status: None,
            done: false,
        };
        (call, request)
    }

    /// The response with a body that counts its messages, takes the status from it and
    /// finishes this call when it ends; `span` is entered while the body is polled.
    fn respond<B>(
        mut self,
        response: http::Response<B>,
        span: Span,
    ) -> http::Response<tonic::body::Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.status = status_of(response.headers());
        response.map(|inner| {
            tonic::body::Body::new(TracedBody {
                inner,
                counter: MessageCounter::default(),
                call: self,
                span,
            })
        })
    }

    fn finish(&mut self, code: i32) {
        if self.done {
            return;
        }
        self.done = true;
        if pipeline::metrics_on() {
            let seconds = self.started.elapsed().as_secs_f64();
            metrics::record_call(
                self.kind == Kind::Server,
                &self.name,
                code,
                self.peer.as_ref(),
                seconds,
            );
        }
        let Some(span) = self.traced.take() else {
            return;
        };
        let (sent, received) = match self.kind {
            Kind::Server => (
                self.response_messages,
                self.request_messages.load(Ordering::Relaxed),
            ),
            Kind::Client => (
                self.request_messages.load(Ordering::Relaxed),
                self.response_messages,
            ),
        };
        span.set_attribute("rpc.response.status_code", code_name(code));
        span.set_attribute(
            "mesh.rpc.messages_sent",
            i64::try_from(sent).unwrap_or(i64::MAX),
        );
        span.set_attribute(
            "mesh.rpc.messages_received",
            i64::try_from(received).unwrap_or(i64::MAX),
        );
        // Servers mark only their own faults as errors; a client any failure.
        let error = match self.kind {
            Kind::Server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
            Kind::Client => code != 0,
        };
        if error {
            span.set_status(Status::error(code_name(code)));
        }
        // The span ends when its last handle goes: this one, and the body's (dropped right
        // after its last frame).
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Dropped before its end: the caller went away (or the call was cancelled).
        let code = self.status.unwrap_or(1);
        self.finish(code);
    }
}

pin_project_lite::pin_project! {
    /// A request body that counts the gRPC messages passing through it.
    struct CountedBody {
        #[pin]
        inner: tonic::body::Body,
        counter: MessageCounter,
        messages: Arc<AtomicU64>,
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = this.counter.feed(data);
            if n > 0 {
                this.messages.fetch_add(n, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body that counts messages, takes the status from the trailers and finishes
    /// the call when the last frame has passed (or when it is dropped).
    struct TracedBody<B> {
        #[pin]
        inner: B,
        counter: MessageCounter,
        call: Call,
        // The log span the call runs in (server side), entered while the response is produced.
        span: Span,
    }
}

impl<B> http_body::Body for TracedBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        // A server stream is produced while this body is polled: its work and logs belong to
        // the call's span.
        let _entered = this.span.enter();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.call.response_messages += this.counter.feed(data);
                } else if let Some(trailers) = frame.trailers_ref() {
                    if let Some(code) = status_of(trailers) {
                        this.call.status = Some(code);
                    }
                    let code = this.call.status.unwrap_or(2);
                    this.call.finish(code);
                }
            }
            Poll::Ready(None) => {
                let code = this.call.status.unwrap_or(2);
                this.call.finish(code);
            }
            Poll::Ready(Some(Err(_))) => {
                // A body error after the headers is a broken stream.
                let code = this.call.status.unwrap_or(14);
                this.call.finish(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The server side: the call's span, trace context and duration.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerTraceLayer;

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

/// The service made by [`ServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, ResB> Service<http::Request<tonic::body::Body>> for ServerTrace<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (name, service, _) = method_of(request.uri().path());
        let infrastructure = is_infrastructure(service);
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(|id| id.as_str().to_owned());
        let remote = pipeline::extract(request.headers());
        let request_field = request_id.as_deref().unwrap_or("");
        let span = if infrastructure {
            tracing::info_span!(
                target: UNTRACED_TARGET,
                "rpc",
                rpc.method = %name,
                request_id = request_field,
            )
        } else {
            tracing::info_span!(
                target: SPAN_TARGET,
                "rpc",
                otel.name = %name,
                otel.kind = "server",
                request_id = request_field,
            )
        };
        let traced = pipeline::traces_on() && !infrastructure;
        let ids = if traced {
            // An invalid or absent parent makes the call the root of a new trace.
            let _ = span.set_parent(remote);
            // Built here, so the sampler has decided: on a span it dropped, the attributes
            // below cost nothing.
            let ids = hex_ids(&span.context());
            span.set_attribute("rpc.system.name", "grpc");
            span.set_attribute("rpc.method", Arc::clone(&name));
            CallIds {
                ids,
                passed_on: None,
                request_id,
            }
        } else {
            // No span of its own: the call runs in the caller's context, which outgoing calls
            // pass on unchanged.
            CallIds {
                ids: hex_ids(&remote),
                passed_on: Some(remote),
                request_id,
            }
        };
        remember(&span, ids);
        let (mut call, request) = Call::start(
            Kind::Server,
            traced.then(|| span.clone()),
            name,
            None,
            request,
        );
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let body_span = span.clone();
        Box::pin(tracing::Instrument::instrument(
            async move {
                match future.await {
                    Ok(response) => Ok(call.respond(response, body_span)),
                    Err(err) => {
                        call.finish(2);
                        Err(err)
                    }
                }
            },
            span,
        ))
    }
}

/// The client side: a span per outgoing call, sent as the callee's `traceparent`.
#[derive(Debug, Clone, Default)]
pub struct ClientTraceLayer {
    peer: Option<(Arc<str>, u16)>,
}

impl ClientTraceLayer {
    /// For calls to `uri` (its host and port become `server.address` and `server.port`).
    pub fn new(uri: &http::Uri) -> Self {
        let port = uri.port_u16().unwrap_or(80);
        Self {
            peer: uri.host().map(|h| (Arc::from(h), port)),
        }
    }
}

impl<S> Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientTrace {
            inner,
            peer: self.peer.clone(),
        }
    }
}

/// The service made by [`ClientTraceLayer`]: wraps a channel.
#[derive(Debug, Clone)]
pub struct ClientTrace<S> {
    inner: S,
    peer: Option<(Arc<str>, u16)>,
}

impl<S, ResB> Service<http::Request<tonic::body::Body>> for ClientTrace<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        let (name, service, _) = method_of(request.uri().path());
        let traced = if pipeline::traces_on() && !is_infrastructure(service) {
            let span = tracing::info_span!(
                target: SPAN_TARGET,
                "rpc.client",
                otel.name = %name,
                otel.kind = "client",
            );
            // Built here (the sampler decides), then attributed: free on a dropped span.
            pipeline::inject(&span.context(), request.headers_mut());
            span.set_attribute("rpc.system.name", "grpc");
            span.set_attribute("rpc.method", Arc::clone(&name));
            if let Some((host, port)) = &self.peer {
                span.set_attribute("server.address", Arc::clone(host));
                span.set_attribute("server.port", i64::from(*port));
            }
            Some(span)
        } else {
            pipeline::inject(&current_context(), request.headers_mut());
            None
        };
        let (mut call, request) =
            Call::start(Kind::Client, traced, name, self.peer.clone(), request);
        let future = self.inner.call(request);
        Box::pin(async move {
            match future.await {
                Ok(response) => Ok(call.respond(response, Span::none())),
                Err(err) => {
                    // No answer at all: the transport failed.
                    call.finish(14);
                    Err(err)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Message counting across arbitrary chunk boundaries, empty messages included.
    #[test]
    fn counts_grpc_frames() {
        let mut stream = Vec::new();
        for len in [0u32, 3, 70_000, 1] {
            stream.push(0u8);
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend(std::iter::repeat_n(7u8, len as usize));
        }
        for chunk in [1, 2, 5, 7, 4096, stream.len()] {
            let mut counter = MessageCounter::default();
            let n: u64 = stream.chunks(chunk).map(|c| counter.feed(c)).sum();
            assert_eq!(n, 4, "chunks of {chunk}");
        }
    }

    /// The mesh's methods are named as they are; any other path is `_OTHER`, however long.
    #[test]
    fn paths() {
        let (name, service, method) = method_of("/mesh.users.v1.UserService/GetUser");
        assert_eq!(
            (&*name, service, method),
            (
                "mesh.users.v1.UserService/GetUser",
                "mesh.users.v1.UserService",
                "GetUser"
            )
        );
        let (name, _, _) = method_of("/mesh.aggregator.v1.AggregatorService/WatchProfiles");
        assert_eq!(&*name, "mesh.aggregator.v1.AggregatorService/WatchProfiles");
        let (name, _, _) = method_of("/grpc.health.v1.Health/Check");
        assert_eq!(&*name, "grpc.health.v1.Health/Check");
        let long = format!("/{}/x", "a".repeat(60_000));
        for bad in [
            "",
            "/",
            "//x",
            "/svc/",
            "nosl",
            "/a/b/c",
            "/mesh.users.v1.UserService/Nope",
            "/made.up.Service/GetUser",
            long.as_str(),
        ] {
            let (name, service, method) = method_of(bad);
            assert_eq!(
                (&*name, service, method),
                (OTHER, OTHER, OTHER),
                "{bad:.40}"
            );
        }
        assert!(is_infrastructure("grpc.health.v1.Health"));
        assert!(!is_infrastructure("mesh.auth.v1.AuthService"));
        assert!(!is_infrastructure(OTHER));
    }
}

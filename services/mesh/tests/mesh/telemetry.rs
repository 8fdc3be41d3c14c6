//! End-to-end telemetry of the real `mesh up`: its three processes export through the
//! OpenTelemetry SDK over OTLP/gRPC or OTLP/HTTP to a collector in the test (tonic's server of
//! OTLP's services, or a hyper server of its HTTP paths), and the test checks that one request
//! makes one trace across all three services, with the spans a developer adds, metrics under
//! the current names and log records that link to the trace — and that a dead collector costs
//! nothing but dropped spans.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::common::MeshUp;
use mesh_proto::{
    aggregator::v1::{GetMeRequest, aggregator_service_client::AggregatorServiceClient},
    headers,
};
use mesh_testkit::{bearer, proc_status_kib, try_sign_up};
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            ExportLogsServiceRequest, ExportLogsServiceResponse,
            logs_service_server::{LogsService, LogsServiceServer},
        },
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{KeyValue, any_value},
    logs::v1::LogRecord,
    metrics::v1::{Metric, metric},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use prost::Message as _;
use tonic::{Code, Request, Response, Status, transport::Channel};

const PASSWORD: &str = "correct horse battery staple";

/// What the collector has received: spans, metrics and log records, each with its
/// `service.name`.
#[derive(Debug, Default)]
struct Received {
    spans: Vec<(String, Span)>,
    metrics: Vec<(String, Metric)>,
    logs: Vec<(String, LogRecord)>,
}

#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Received>>);

fn service_name(attributes: &[KeyValue]) -> String {
    attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(string)
        .unwrap_or_default()
}

fn string(kv: &KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn attr_str(span: &Span, key: &str) -> Option<String> {
    match attr(&span.attributes, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr_int(span: &Span, key: &str) -> Option<i64> {
    match attr(&span.attributes, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

impl Collector {
    fn take_spans(&self, request: ExportTraceServiceRequest) {
        let mut received = self.0.lock().expect("collector lock");
        for rs in request.resource_spans {
            let name = service_name(&rs.resource.unwrap_or_default().attributes);
            for ss in rs.scope_spans {
                received
                    .spans
                    .extend(ss.spans.into_iter().map(|s| (name.clone(), s)));
            }
        }
    }

    fn take_metrics(&self, request: ExportMetricsServiceRequest) {
        let mut received = self.0.lock().expect("collector lock");
        for rm in request.resource_metrics {
            let name = service_name(&rm.resource.unwrap_or_default().attributes);
            for sm in rm.scope_metrics {
                received
                    .metrics
                    .extend(sm.metrics.into_iter().map(|m| (name.clone(), m)));
            }
        }
    }

    fn take_logs(&self, request: ExportLogsServiceRequest) {
        let mut received = self.0.lock().expect("collector lock");
        for rl in request.resource_logs {
            let name = service_name(&rl.resource.unwrap_or_default().attributes);
            for sl in rl.scope_logs {
                received
                    .logs
                    .extend(sl.log_records.into_iter().map(|l| (name.clone(), l)));
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.take_spans(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.take_metrics(request.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        request: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        self.take_logs(request.into_inner());
        Ok(Response::new(ExportLogsServiceResponse::default()))
    }
}

impl Collector {
    /// An OTLP/gRPC collector on a free loopback port; its URL.
    async fn start() -> (Self, String) {
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .add_service(LogsServiceServer::new(collector.clone()))
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        (collector, format!("http://{addr}"))
    }

    /// An OTLP/gRPC collector over TLS with `pki`'s server leaf, requiring a client
    /// certificate from its CA; its URL (`https://localhost:<port>`).
    async fn start_tls(pki: &mesh_testkit::TestPki) -> (Self, String) {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let read = |path: &std::path::Path| std::fs::read(path).expect("PEM");
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(&pki.server_leaf.cert),
                read(&pki.server_leaf.key),
            ))
            .client_ca_root(Certificate::from_pem(read(&pki.ca_path)));
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("TLS")
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .add_service(LogsServiceServer::new(collector.clone()))
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        (collector, format!("https://localhost:{}", addr.port()))
    }

    /// An OTLP/HTTP collector (protobuf bodies on `/v1/traces`, `/v1/metrics`, `/v1/logs`,
    /// HTTP/1.1) on a free loopback port; its URL.
    async fn start_http() -> (Self, String) {
        Self::start_http_over(None).await
    }

    /// The same over TLS with `pki`'s server leaf (no client certificate asked); its URL
    /// (`https://localhost:<port>`).
    async fn start_https(pki: &mesh_testkit::TestPki) -> (Self, String) {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let chain = CertificateDer::pem_file_iter(&pki.server_leaf.cert)
            .expect("cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("cert");
        let key = PrivateKeyDer::from_pem_file(&pki.server_leaf.key).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        Self::start_http_over(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_http_over(tls: Option<tokio_rustls::TlsAcceptor>) -> (Self, String) {
        use http_body_util::{BodyExt as _, Full};
        let collector = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let url = match tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        };
        let serving = collector.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let collector = serving.clone();
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let collector = collector.clone();
                        async move {
                            let path = request.uri().path().to_owned();
                            let body = request.into_body().collect().await?.to_bytes();
                            let (status, reply) = match path.as_str() {
                                "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
                                    Ok(r) => {
                                        collector.take_spans(r);
                                        (200, ExportTraceServiceResponse::default().encode_to_vec())
                                    }
                                    Err(_) => (400, Vec::new()),
                                },
                                "/v1/metrics" => match ExportMetricsServiceRequest::decode(body) {
                                    Ok(r) => {
                                        collector.take_metrics(r);
                                        (
                                            200,
                                            ExportMetricsServiceResponse::default().encode_to_vec(),
                                        )
                                    }
                                    Err(_) => (400, Vec::new()),
                                },
                                "/v1/logs" => match ExportLogsServiceRequest::decode(body) {
                                    Ok(r) => {
                                        collector.take_logs(r);
                                        (200, ExportLogsServiceResponse::default().encode_to_vec())
                                    }
                                    Err(_) => (400, Vec::new()),
                                },
                                _ => (404, Vec::new()),
                            };
                            let mut response =
                                hyper::Response::new(Full::new(bytes::Bytes::from(reply)));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(status).expect("status");
                            response.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/x-protobuf"),
                            );
                            Ok::<_, hyper::Error>(response)
                        }
                    },
                );
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        (collector, url)
    }

    fn spans_of(&self, trace_id: &[u8]) -> Vec<(String, Span)> {
        let received = self.0.lock().expect("collector lock");
        received
            .spans
            .iter()
            .filter(|(_, s)| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until `done` holds for what was received (20 s at most).
    async fn wait_for(&self, what: &str, done: impl Fn(&Received) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if done(&self.0.lock().expect("collector lock")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if waited.is_err() {
            let received = self.0.lock().expect("collector lock");
            let spans: Vec<String> = received
                .spans
                .iter()
                .map(|(svc, s)| format!("{svc}: {} {:?}", s.name, s.kind))
                .collect();
            panic!(
                "timed out waiting for {what}; spans received:\n{}",
                spans.join("\n")
            );
        }
    }
}

fn exporting_env(collector: &str) -> Vec<(&'static str, String)> {
    exporting_env_over(collector, "grpc")
}

fn exporting_env_over(collector: &str, protocol: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.to_owned()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        ("OTEL_BLRP_SCHEDULE_DELAY", "100".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300".into()),
        ("MESH_LOG_FORMAT", "json".into()),
        ("RUST_LOG", "info".into()),
    ]
}

/// Metrics alone (`OTEL_TRACES_EXPORTER=none`): every service still sends its metrics, the
/// relay's gauges among them, and no span; calls to made-up methods count as `_OTHER`.
#[tokio::test]
async fn metrics_go_out_with_traces_off() {
    let _machine = crate::common::process_test().await;
    let (collector, url) = Collector::start().await;
    let mut env = exporting_env(&url);
    env.push(("OTEL_TRACES_EXPORTER", "none".into()));
    let mesh = MeshUp::start_with("5s", &env).await;
    // 200 made-up methods, each with a 4 KiB path: they count as one `_OTHER` series, not 200.
    let addr = mesh.addr("aggregator");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (h2, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.expect("ready");
    const MADE_UP: u64 = 200;
    for i in 0..MADE_UP {
        let path = format!("/made.up{i}.{}/Method", "x".repeat(4_000));
        let request = http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let (response, _) = h2.send_request(request, true).expect("send");
        let _ = response.await;
        h2 = h2.ready().await.expect("ready");
    }
    let other = |p: &opentelemetry_proto::tonic::metrics::v1::HistogramDataPoint| {
        attr(&p.attributes, "rpc.method") == Some(&any_value::Value::StringValue("_OTHER".into()))
    };
    collector
        .wait_for("the made-up calls, counted as _OTHER", |r| {
            r.metrics.iter().any(|(svc, m)| {
                svc == "aggregator"
                    && m.name == "rpc.server.call.duration"
                    && matches!(&m.data, Some(metric::Data::Histogram(h))
                        if h.data_points.iter().any(|p| other(p) && p.count == MADE_UP))
            })
        })
        .await;
    for (svc, m) in collector.0.lock().expect("lock").metrics.iter() {
        let text = format!("{m:?}");
        assert!(
            !text.contains("made.up"),
            "{svc} {}: a made-up method's series",
            m.name
        );
    }
    collector
        .wait_for("metrics from every service", |r| {
            let has =
                |svc: &str, name: &str| r.metrics.iter().any(|(s, m)| s == svc && m.name == name);
            has("aggregator", "mesh.aggregator.watch_streams")
                && has("aggregator", "mesh.aggregator.watch_events_from_ring")
                && has("aggregator", "mesh.aggregator.watch_events_from_log")
                && has("auth", "mesh.auth.hash_queue_depth")
                && has("users", "rpc.server.call.duration")
                && has("users", "tokio.runtime.alive_tasks")
        })
        .await;
    assert!(
        collector.0.lock().expect("lock").spans.is_empty(),
        "no span with traces off"
    );
    drop(mesh);
}

async fn aggregator(addr: SocketAddr) -> AggregatorServiceClient<Channel> {
    AggregatorServiceClient::new(mesh_testkit::connect(addr).await)
}

/// A client of `mesh up --tls`'s facade, trusting its development CA.
fn aggregator_tls(mesh: &MeshUp) -> AggregatorServiceClient<Channel> {
    let tls = mesh_runtime::tls::ClientTls::load(Some(&mesh.tls_dir().join("ca.pem")), None, None)
        .expect("the development CA");
    let uri = format!("https://{}", mesh.addr("aggregator"))
        .parse()
        .expect("URL");
    AggregatorServiceClient::new(
        mesh_runtime::client::endpoint(uri, &tls)
            .expect("endpoint")
            .connect_lazy(),
    )
}

fn find<'a>(spans: &'a [(String, Span)], service: &str, kind: SpanKind, name: &str) -> &'a Span {
    spans
        .iter()
        .find(|(svc, s)| svc == service && s.kind == kind as i32 && s.name == name)
        .map(|(_, s)| s)
        .unwrap_or_else(|| {
            let all: Vec<String> = spans
                .iter()
                .map(|(svc, s)| format!("{svc}: {} {:?}", s.name, s.kind))
                .collect();
            panic!(
                "no {kind:?} span {name} from {service} in:\n{}",
                all.join("\n")
            )
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SignUp (sent with the caller's `traceparent`) and GetMe through the aggregator: every span of
/// one call shares one trace id; the aggregator's server span is the child of the caller's
/// span (SignUp) or the root (GetMe); auth's and users' server spans are children of the
/// aggregator's client spans; service names and status codes are right, failures included;
/// no secret is in any attribute; RPC metrics and the two gauges arrive; and log lines carry
/// the trace id.
#[tokio::test]
async fn one_request_is_one_trace_across_all_three_services() {
    let _machine = crate::common::process_test().await;
    let (collector, url) = Collector::start().await;
    // With TLS everywhere, mutual between the services: trace context crosses every hop.
    let mut mesh = MeshUp::start_tls("5s", &exporting_env(&url)).await;
    let mut client = aggregator_tls(&mesh);

    // SignUp as the child of a caller's span.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let signed_up = try_sign_up(
        &mut client,
        "ada@example.com",
        PASSWORD,
        "Ada",
        &[(
            headers::TRACEPARENT,
            &format!("00-{caller_trace}-{caller_span}-01"),
        )],
    )
    .await
    .expect("sign up");
    let token = signed_up.tokens.expect("tokens").access_token;

    // GetMe with no trace context: the aggregator starts the trace.
    client
        .get_me(bearer(&token, GetMeRequest {}))
        .await
        .expect("get me");

    // Two failing calls: a bad token (refused by the aggregator) and an e-mail already taken
    // (refused by auth).
    let refused = client
        .get_me(bearer("not-a-token", GetMeRequest {}))
        .await
        .expect_err("bad token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let taken = try_sign_up(&mut client, "ada@example.com", PASSWORD, "Ada", &[])
        .await
        .expect_err("e-mail taken");
    assert_eq!(taken.code(), Code::AlreadyExists);

    // --- SignUp's trace.
    let trace: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&caller_trace[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    collector
        .wait_for("SignUp's spans from all three services", |r| {
            let services: std::collections::HashSet<_> = r
                .spans
                .iter()
                .filter(|(_, s)| s.trace_id == trace)
                .map(|(svc, _)| svc.as_str())
                .collect();
            ["aggregator", "auth", "users"]
                .iter()
                .all(|s| services.contains(s))
                && r.spans.iter().filter(|(_, s)| s.trace_id == trace).count() >= 6
        })
        .await;
    let spans = collector.spans_of(&trace);
    let root = find(
        &spans,
        "aggregator",
        SpanKind::Server,
        "mesh.aggregator.v1.AggregatorService/SignUp",
    );
    assert_eq!(
        hex(&root.parent_span_id),
        caller_span,
        "child of the caller's span"
    );
    // The current RPC conventions: rpc.system.name, the full method, the status code's name.
    assert_eq!(attr_str(root, "rpc.system.name").as_deref(), Some("grpc"));
    assert_eq!(
        attr_str(root, "rpc.method").as_deref(),
        Some("mesh.aggregator.v1.AggregatorService/SignUp")
    );
    assert_eq!(
        attr_str(root, "rpc.response.status_code").as_deref(),
        Some("OK")
    );
    for (service, method) in [
        ("mesh.auth.v1.AuthService", "Register"),
        ("mesh.users.v1.UserService", "CreateUser"),
    ] {
        let name = format!("{service}/{method}");
        let client_span = find(&spans, "aggregator", SpanKind::Client, &name);
        assert_eq!(
            client_span.parent_span_id, root.span_id,
            "{name} under SignUp"
        );
        assert!(attr_str(client_span, "server.address").is_some(), "{name}");
        assert!(attr_int(client_span, "server.port").is_some(), "{name}");
        let callee = if method == "Register" {
            "auth"
        } else {
            "users"
        };
        let server_span = find(&spans, callee, SpanKind::Server, &name);
        assert_eq!(
            server_span.parent_span_id, client_span.span_id,
            "{callee}'s {method} is the child of the aggregator's call"
        );
        assert_eq!(attr_int(server_span, "mesh.rpc.messages_received"), Some(1));
        assert_eq!(attr_int(server_span, "mesh.rpc.messages_sent"), Some(1));
    }

    assert_developer_span_and_logs(&collector, &trace, &spans).await;

    // --- GetMe's trace: the aggregator's server span is the root.
    collector
        .wait_for("GetMe's spans", |r| {
            let roots: Vec<_> = r
                .spans
                .iter()
                .filter(|(svc, s)| {
                    svc == "aggregator"
                        && s.name.ends_with("/GetMe")
                        && s.kind == SpanKind::Server as i32
                        && s.parent_span_id.is_empty()
                        && s.status.as_ref().is_none_or(|st| st.code == 0)
                        && attr_str(s, "rpc.response.status_code").as_deref() == Some("OK")
                })
                .collect();
            roots.first().is_some_and(|(_, root)| {
                let trace = &root.trace_id;
                let services: std::collections::HashSet<_> = r
                    .spans
                    .iter()
                    .filter(|(_, s)| &s.trace_id == trace && s.kind == SpanKind::Server as i32)
                    .map(|(svc, _)| svc.as_str())
                    .collect();
                services.len() == 3
            })
        })
        .await;
    let received = collector.0.lock().expect("lock").spans.clone();
    let root = received
        .iter()
        .find(|(svc, s)| {
            svc == "aggregator"
                && s.name.ends_with("/GetMe")
                && s.parent_span_id.is_empty()
                && attr_str(s, "rpc.response.status_code").as_deref() == Some("OK")
        })
        .map(|(_, s)| s.clone())
        .expect("GetMe root");
    let spans = collector.spans_of(&root.trace_id);
    for (callee, name) in [
        ("users", "mesh.users.v1.UserService/GetUser"),
        ("auth", "mesh.auth.v1.AuthService/ListSessions"),
    ] {
        let client_span = find(&spans, "aggregator", SpanKind::Client, name);
        assert_eq!(client_span.parent_span_id, root.span_id, "{name}");
        let server_span = find(&spans, callee, SpanKind::Server, name);
        assert_eq!(server_span.parent_span_id, client_span.span_id, "{name}");
    }
    assert!(
        spans.iter().all(|(_, s)| s.trace_id == root.trace_id),
        "one trace id"
    );

    // --- Failing calls: the codes, and error status where the conventions want it.
    let refused = |svc: &str, s: &Span| {
        svc == "aggregator"
            && s.name.ends_with("/GetMe")
            && attr_str(s, "rpc.response.status_code").as_deref() == Some("UNAUTHENTICATED")
    };
    collector
        .wait_for("the refused GetMe", |r| {
            r.spans.iter().any(|(svc, s)| refused(svc, s))
        })
        .await;
    let received = collector.0.lock().expect("lock").spans.clone();
    let unauthenticated = received
        .iter()
        .find(|(svc, s)| {
            svc == "aggregator"
                && s.name.ends_with("/GetMe")
                && attr_str(s, "rpc.response.status_code").as_deref() == Some("UNAUTHENTICATED")
        })
        .map(|(_, s)| s.clone())
        .expect("the refused GetMe has a span with code 16");
    // A client's mistake is not the server's error.
    assert_ne!(
        unauthenticated.status.map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    collector
        .wait_for("the refused Register", |r| {
            r.spans.iter().any(|(svc, s)| {
                svc == "aggregator"
                    && s.kind == SpanKind::Client as i32
                    && s.name.ends_with("/Register")
                    && attr_str(s, "rpc.response.status_code").as_deref() == Some("ALREADY_EXISTS")
            })
        })
        .await;
    let received = collector.0.lock().expect("lock").spans.clone();
    let failed_register = received
        .iter()
        .find(|(svc, s)| {
            svc == "aggregator"
                && s.kind == SpanKind::Client as i32
                && s.name.ends_with("/Register")
                && attr_str(s, "rpc.response.status_code").as_deref() == Some("ALREADY_EXISTS")
        })
        .map(|(_, s)| s.clone())
        .expect("failed Register");
    assert_eq!(
        failed_register.status.map(|s| s.code),
        Some(StatusCode::Error as i32),
        "a failed outgoing call is an error on the client span"
    );

    // --- No secret in any span attribute.
    let secrets = [PASSWORD, "ada@example.com", token.as_str()];
    for (svc, span) in &received {
        for kv in &span.attributes {
            let text = format!("{} {:?}", kv.key, kv.value);
            for secret in secrets {
                assert!(!text.contains(secret), "{svc} {}: {text}", span.name);
            }
        }
    }

    // --- Metrics: RPC durations by method and code from every service, and the gauges.
    collector
        .wait_for("metrics from every service", |r| {
            let has =
                |svc: &str, name: &str| r.metrics.iter().any(|(s, m)| s == svc && m.name == name);
            has("aggregator", "rpc.server.call.duration")
                && has("aggregator", "rpc.client.call.duration")
                && has("auth", "rpc.server.call.duration")
                && has("users", "rpc.server.call.duration")
                && has("aggregator", "mesh.aggregator.watch_streams")
                && has("auth", "mesh.auth.hash_queue_depth")
                && has("aggregator", "tokio.runtime.workers")
                && has("users", "tokio.runtime.worker.busy_time")
        })
        .await;
    // Exports are periodic: wait for one made after the refused GetMe was recorded.
    let refused_get_me = |p: &opentelemetry_proto::tonic::metrics::v1::HistogramDataPoint| {
        attr(&p.attributes, "rpc.method")
            == Some(&any_value::Value::StringValue(
                "mesh.aggregator.v1.AggregatorService/GetMe".into(),
            ))
            && attr(&p.attributes, "rpc.response.status_code")
                == Some(&any_value::Value::StringValue("UNAUTHENTICATED".into()))
            && attr(&p.attributes, "rpc.system.name")
                == Some(&any_value::Value::StringValue("grpc".into()))
    };
    let is_latest = |svc: &str, m: &Metric| {
        svc == "aggregator"
            && m.name == "rpc.server.call.duration"
            && matches!(&m.data, Some(metric::Data::Histogram(h)) if h.data_points.iter().any(refused_get_me))
    };
    collector
        .wait_for("an export with the refused GetMe", |r| {
            r.metrics.iter().any(|(svc, m)| is_latest(svc, m))
        })
        .await;
    let metrics = collector.0.lock().expect("lock").metrics.clone();
    let (_, latest) = metrics
        .iter()
        .find(|(svc, m)| is_latest(svc, m))
        .expect("aggregator durations");
    assert_eq!(latest.unit, "s", "durations in seconds");
    let Some(metric::Data::Histogram(histogram)) = &latest.data else {
        panic!("rpc.server.call.duration is a histogram: {latest:?}");
    };
    let point = histogram
        .data_points
        .iter()
        .find(|p| refused_get_me(p))
        .expect("a GetMe series with UNAUTHENTICATED");
    // Seconds: a loopback call is well under one.
    assert!(point.sum.is_some_and(|s| s > 0.0 && s < 5.0), "{point:?}");
    assert_eq!(point.count, 1);
    assert_eq!(point.bucket_counts.iter().sum::<u64>(), 1);
    for (_, m) in &metrics {
        let text = format!("{m:?}");
        for secret in secrets {
            assert!(!text.contains(secret), "{}: {text}", m.name);
        }
    }

    // --- Logs: auth's "registered" line carries SignUp's trace id and the request id.
    let line = mesh.wait_for_log("\"registered\"").await;
    let json: serde_json::Value = serde_json::from_str(
        line.get(line.find('{').expect("a JSON log line")..)
            .expect("json"),
    )
    .expect("valid JSON log line");
    assert_eq!(json["trace_id"], caller_trace, "{line}");
    assert_eq!(json["span_id"].as_str().map(str::len), Some(16), "{line}");
    assert!(
        json["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{line}"
    );
}

/// The trace id of a 32-digit hex string.
fn trace_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// The same over OTLP/HTTP with protobuf bodies, the specification's default transport:
/// SignUp sent with a caller's `traceparent` and GetMe without are each one trace across the
/// three services with the right parents, the store's own span among them; the caller's
/// baggage reaches auth and users, bounded; metrics and log records arrive too.
#[tokio::test]
async fn one_request_is_one_trace_over_otlp_http() {
    let _machine = crate::common::process_test().await;
    let (collector, url) = Collector::start_http().await;
    let mesh = MeshUp::start_with("5s", &exporting_env_over(&url, "http/protobuf")).await;
    let mut client = aggregator(mesh.addr("aggregator")).await;
    let caller_trace = "6cf92f3577b34da6a3ce929d0e0e4738";
    let caller_span = "20f067aa0ba902b9";
    // The caller's baggage rides along.
    let signed_up = try_sign_up(
        &mut client,
        "http-trace@example.com",
        PASSWORD,
        "Ada",
        &[
            (
                headers::TRACEPARENT,
                &format!("00-{caller_trace}-{caller_span}-01"),
            ),
            ("baggage", "tenant=acme%20corp,plan=free"),
        ],
    )
    .await
    .expect("sign up");
    let token = signed_up.tokens.expect("tokens").access_token;
    let trace = trace_bytes(caller_trace);
    collector
        .wait_for("SignUp's spans over OTLP/HTTP", |r| {
            let services: std::collections::HashSet<_> = r
                .spans
                .iter()
                .filter(|(_, s)| s.trace_id == trace)
                .map(|(svc, _)| svc.as_str())
                .collect();
            services.len() == 3 && r.spans.iter().filter(|(_, s)| s.trace_id == trace).count() >= 6
        })
        .await;
    let spans = collector.spans_of(&trace);
    let root = find(
        &spans,
        "aggregator",
        SpanKind::Server,
        "mesh.aggregator.v1.AggregatorService/SignUp",
    );
    assert_eq!(hex(&root.parent_span_id), caller_span);
    for (callee, name) in [
        ("auth", "mesh.auth.v1.AuthService/Register"),
        ("users", "mesh.users.v1.UserService/CreateUser"),
    ] {
        let client_span = find(&spans, "aggregator", SpanKind::Client, name);
        assert_eq!(client_span.parent_span_id, root.span_id, "{name}");
        let server_span = find(&spans, callee, SpanKind::Server, name);
        assert_eq!(server_span.parent_span_id, client_span.span_id, "{name}");
    }
    assert_developer_span_and_logs(&collector, &trace, &spans).await;

    // GetMe with no trace context: the aggregator starts the trace, and auth's and users'
    // server spans are children of its two calls.
    client
        .get_me(bearer(&token, GetMeRequest {}))
        .await
        .expect("get me");
    let get_me_root = |svc: &str, s: &Span| {
        svc == "aggregator" && s.name.ends_with("/GetMe") && s.parent_span_id.is_empty()
    };
    collector
        .wait_for("GetMe's trace over OTLP/HTTP", |r| {
            r.spans
                .iter()
                .find(|(svc, s)| get_me_root(svc, s))
                .is_some_and(|(_, root)| {
                    r.spans
                        .iter()
                        .filter(|(_, s)| {
                            s.trace_id == root.trace_id && s.kind == SpanKind::Server as i32
                        })
                        .count()
                        == 3
                })
        })
        .await;
    let root = collector
        .0
        .lock()
        .expect("lock")
        .spans
        .iter()
        .find(|(svc, s)| get_me_root(svc, s))
        .map(|(_, s)| s.clone())
        .expect("GetMe's root");
    let get_me = collector.spans_of(&root.trace_id);
    for (callee, name) in [
        ("users", "mesh.users.v1.UserService/GetUser"),
        ("auth", "mesh.auth.v1.AuthService/ListSessions"),
    ] {
        let client_span = find(&get_me, "aggregator", SpanKind::Client, name);
        assert_eq!(client_span.parent_span_id, root.span_id, "{name}");
        let server_span = find(&get_me, callee, SpanKind::Server, name);
        assert_eq!(server_span.parent_span_id, client_span.span_id, "{name}");
        assert_eq!(
            attr_str(server_span, "rpc.response.status_code").as_deref(),
            Some("OK")
        );
    }
    // The caller's baggage reached auth's and users' spans, two hops away.
    for (service, name) in [
        ("auth", "mesh.auth.v1.AuthService/Register"),
        ("users", "mesh.users.v1.UserService/CreateUser"),
        ("users", "users.store.create"),
    ] {
        let span = spans
            .iter()
            .find(|(svc, s)| svc == service && s.name == name)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no {name} span in {service}"));
        assert_eq!(
            attr_str(span, "baggage.tenant").as_deref(),
            Some("acme corp"),
            "{service} {name}"
        );
        assert_eq!(attr_str(span, "baggage.plan").as_deref(), Some("free"));
    }

    // A caller cannot make spans carry all it sends: 20 baggage entries of 300 bytes each
    // (within what the propagator accepts) give each span at most 16 of them, each value cut
    // to 256 bytes.
    let flood_trace = "7cf92f3577b34da6a3ce929d0e0e4739";
    let flood = (0..20)
        .map(|i| format!("k{i:02}={}", "x".repeat(300)))
        .collect::<Vec<_>>()
        .join(",");
    let mut request = bearer(&token, GetMeRequest {});
    request.metadata_mut().insert(
        headers::TRACEPARENT,
        format!("00-{flood_trace}-{caller_span}-01")
            .parse()
            .expect("traceparent"),
    );
    request
        .metadata_mut()
        .insert("baggage", flood.parse().expect("baggage"));
    client.get_me(request).await.expect("get me");
    let flood_trace = trace_bytes(flood_trace);
    collector
        .wait_for("GetMe's spans with the flood of baggage", |r| {
            r.spans
                .iter()
                .filter(|(_, s)| s.trace_id == flood_trace && s.kind == SpanKind::Server as i32)
                .count()
                >= 3
        })
        .await;
    for (service, span) in collector.spans_of(&flood_trace) {
        let baggage: Vec<_> = span
            .attributes
            .iter()
            .filter(|kv| kv.key.starts_with("baggage."))
            .collect();
        assert!(
            !baggage.is_empty() && baggage.len() <= 16,
            "{service} {}: {} baggage attributes",
            span.name,
            baggage.len()
        );
        assert!(
            baggage
                .iter()
                .all(|kv| string(kv).is_some_and(|v| v.len() <= 256)),
            "{service} {}: a baggage value over 256 bytes",
            span.name
        );
    }
    collector
        .wait_for("metrics over OTLP/HTTP", |r| {
            ["aggregator", "auth", "users"].iter().all(|svc| {
                r.metrics
                    .iter()
                    .any(|(s, m)| s == svc && m.name == "rpc.server.call.duration")
            })
        })
        .await;
    drop(mesh);
}

/// `https://` collectors: spans over OTLP/gRPC to a collector that requires a client
/// certificate, metrics over OTLP/HTTP to another, both trusted through
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` (the test's CA) and the client presenting
/// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`/`_KEY`.
#[tokio::test]
async fn exports_to_collectors_over_tls() {
    let _machine = crate::common::process_test().await;
    let dir = tempfile::tempdir().expect("dir");
    let pki = mesh_testkit::TestPki::new(dir.path(), "otlp-ca");
    let (traces, traces_url) = Collector::start_tls(&pki).await;
    let (metrics, metrics_url) = Collector::start_https(&pki).await;
    // Log records go to a collector whose certificate another CA signed: none may arrive.
    let stranger = mesh_testkit::TestPki::new(&dir.path().join("stranger"), "stranger-ca");
    let (logs, logs_url) = Collector::start_https(&stranger).await;
    let env = vec![
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces_url),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc".to_owned()),
        (
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            format!("{metrics_url}/v1/metrics"),
        ),
        (
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
            "http/protobuf".to_owned(),
        ),
        (
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
            format!("{logs_url}/v1/logs"),
        ),
        (
            "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
            "http/protobuf".to_owned(),
        ),
        ("OTEL_BLRP_SCHEDULE_DELAY", "100".into()),
        (
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            pki.ca_path.display().to_string(),
        ),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            pki.client_leaf.cert.display().to_string(),
        ),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            pki.client_leaf.key.display().to_string(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300".into()),
    ];
    let mesh = MeshUp::start_with("5s", &env).await;
    let mut client = aggregator(mesh.addr("aggregator")).await;
    let trace = "9cf92f3577b34da6a3ce929d0e0e473b";
    try_sign_up(
        &mut client,
        "tls-export@example.com",
        PASSWORD,
        "Ada",
        &[(
            headers::TRACEPARENT,
            &format!("00-{trace}-00f067aa0ba902b7-01"),
        )],
    )
    .await
    .expect("sign up");
    let trace = trace_bytes(trace);
    traces
        .wait_for("SignUp's server spans over gRPC with TLS", |r| {
            let services: std::collections::HashSet<_> = r
                .spans
                .iter()
                .filter(|(_, s)| s.trace_id == trace && s.kind == SpanKind::Server as i32)
                .map(|(svc, _)| svc.as_str())
                .collect();
            services.len() == 3
        })
        .await;
    metrics
        .wait_for("every service's metrics over HTTPS", |r| {
            ["aggregator", "auth", "users"].iter().all(|svc| {
                r.metrics
                    .iter()
                    .any(|(s, m)| s == svc && m.name == "rpc.server.call.duration")
            })
        })
        .await;
    // By now the services have sent log records many times over (every 100 ms): to a
    // collector they do not trust, they never arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        logs.0.lock().expect("lock").logs.is_empty(),
        "log records reached a collector whose certificate the mesh does not trust"
    );
    drop(mesh);
}

/// In SignUp's trace (`trace`, its spans so far in `spans`): the span users' store makes with
/// `#[tracing::instrument]` is the child of users' CreateUser server span, and auth's
/// "registered" log record arrives with the trace's id and the span id of auth's Register span.
async fn assert_developer_span_and_logs(
    collector: &Collector,
    trace: &[u8],
    spans: &[(String, Span)],
) {
    let create = find(
        spans,
        "users",
        SpanKind::Server,
        "mesh.users.v1.UserService/CreateUser",
    );
    let stored = spans
        .iter()
        .find(|(svc, s)| svc == "users" && s.name == "users.store.create")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no users.store.create span in SignUp's trace"));
    assert_eq!(
        stored.parent_span_id, create.span_id,
        "the store's span is the child of the call's"
    );
    assert_eq!(stored.kind, SpanKind::Internal as i32);
    let register = find(
        spans,
        "auth",
        SpanKind::Server,
        "mesh.auth.v1.AuthService/Register",
    );
    collector
        .wait_for("auth's log record of SignUp", |r| {
            r.logs.iter().any(|(svc, l)| {
                svc == "auth"
                    && l.trace_id == trace
                    && format!("{:?}", l.body).contains("registered")
            })
        })
        .await;
    let received = collector.0.lock().expect("lock");
    let (_, record) = received
        .logs
        .iter()
        .find(|(svc, l)| {
            svc == "auth" && l.trace_id == trace && format!("{:?}", l.body).contains("registered")
        })
        .expect("the record");
    assert_eq!(
        record.span_id, register.span_id,
        "logged inside Register's span"
    );
}

/// Parent-based ratio sampling across the three services
/// (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `_ARG=0.5`): the aggregator decides for
/// each new trace, auth and users follow its `traceparent`, so every trace is either whole
/// across the services or absent from all of them — and about half are kept.
#[tokio::test]
async fn ratio_sampling_keeps_each_trace_whole_or_not_at_all() {
    let _machine = crate::common::process_test().await;
    let (collector, url) = Collector::start().await;
    let mut env = exporting_env(&url);
    env.push(("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()));
    env.push(("OTEL_TRACES_SAMPLER_ARG", "0.5".into()));
    let mesh = MeshUp::start_with("5s", &env).await;
    let mut client = aggregator(mesh.addr("aggregator")).await;
    let token = try_sign_up(&mut client, "sampled@example.com", PASSWORD, "Ada", &[])
        .await
        .expect("sign up")
        .tokens
        .expect("tokens")
        .access_token;
    const CALLS: usize = 60;
    for _ in 0..CALLS {
        client
            .get_me(bearer(&token, GetMeRequest {}))
            .await
            .expect("get me");
    }
    // A last call the caller marks sampled: once its spans are in from all three services,
    // every earlier span has been exported too (each service exports in order).
    let marker = "5cf92f3577b34da6a3ce929d0e0e4735";
    let mut request = bearer(&token, GetMeRequest {});
    request.metadata_mut().insert(
        headers::TRACEPARENT,
        format!("00-{marker}-00f067aa0ba902b7-01")
            .parse()
            .expect("traceparent"),
    );
    client.get_me(request).await.expect("get me");
    let marker = trace_bytes(marker);
    collector
        .wait_for("the marked GetMe from all three services", |r| {
            let services: std::collections::HashSet<_> = r
                .spans
                .iter()
                .filter(|(_, s)| s.trace_id == marker && s.kind == SpanKind::Server as i32)
                .map(|(svc, _)| svc.as_str())
                .collect();
            services.len() == 3
        })
        .await;
    let received = collector.0.lock().expect("lock").spans.clone();
    let mut traces: std::collections::BTreeMap<Vec<u8>, Vec<(String, Span)>> =
        std::collections::BTreeMap::new();
    for (service, span) in received {
        traces
            .entry(span.trace_id.clone())
            .or_default()
            .push((service, span));
    }
    let marker_parent = trace_bytes("00f067aa0ba902b7");
    let mut kept_get_me = 0;
    for (trace, spans) in &traces {
        // The test's calls (the services' own long-lived streams end on their own time).
        if !spans
            .iter()
            .any(|(_, s)| s.name.starts_with("mesh.aggregator.v1.AggregatorService/"))
        {
            continue;
        }
        // Whole: every span's parent is in the trace too (but the marked call's, the caller's),
        // and every call a service made is answered by the callee's server span, its child.
        let ids: std::collections::HashSet<&[u8]> =
            spans.iter().map(|(_, s)| s.span_id.as_slice()).collect();
        for (service, span) in spans {
            assert!(
                span.parent_span_id.is_empty()
                    || ids.contains(span.parent_span_id.as_slice())
                    || (*trace == marker && span.parent_span_id == marker_parent),
                "trace {}: {service}'s {} lost its parent: a trace cut in two",
                hex(trace),
                span.name
            );
            if span.kind == SpanKind::Client as i32 {
                assert!(
                    spans.iter().any(|(svc, s)| svc != service
                        && s.kind == SpanKind::Server as i32
                        && s.parent_span_id == span.span_id),
                    "trace {}: {service}'s call {} has no server span downstream: a trace cut in two",
                    hex(trace),
                    span.name
                );
            }
        }
        let get_me_root = spans.iter().any(|(svc, s)| {
            svc == "aggregator" && s.name.ends_with("/GetMe") && s.parent_span_id.is_empty()
        });
        if get_me_root {
            let services: std::collections::HashSet<_> =
                spans.iter().map(|(svc, _)| svc.as_str()).collect();
            assert_eq!(
                services.len(),
                3,
                "trace {}: GetMe not across all three",
                hex(trace)
            );
            kept_get_me += 1;
        }
    }
    // Each of the 60 is kept with probability one half: between 10 and 50 of them but for a
    // chance below one in ten million. Always on keeps 60, a ratio of 0.1 about 6.
    assert!(
        (10..=50).contains(&kept_get_me),
        "{kept_get_me} of {CALLS} GetMe traces kept at a ratio of 0.5"
    );
    drop(mesh);
}

/// `mesh up --traces`: the launcher receives the services' traces itself and prints each
/// finished one as a waterfall. GetMe's two downstream calls (users' GetUser, auth's
/// ListSessions) are made at once, so their lines overlap in time; each callee's server span
/// is indented under the call; the trace is appended to `<data-dir>/traces.jsonl` as OTLP
/// JSON.
#[tokio::test]
async fn mesh_up_traces_prints_get_me_as_a_waterfall() {
    let _machine = crate::common::process_test().await;
    let mut mesh = MeshUp::start_args("5s", &[], &["--traces"]).await;
    assert!(mesh.banner.contains("traces.jsonl"), "{}", mesh.banner);
    let mut client = aggregator(mesh.addr("aggregator")).await;
    let token = try_sign_up(&mut client, "waterfall@example.com", PASSWORD, "Ada", &[])
        .await
        .expect("sign up")
        .tokens
        .expect("tokens")
        .access_token;
    let trace = "8cf92f3577b34da6a3ce929d0e0e473a";
    let mut request = bearer(&token, GetMeRequest {});
    request.metadata_mut().insert(
        headers::TRACEPARENT,
        format!("00-{trace}-00f067aa0ba902b7-01")
            .parse()
            .expect("traceparent"),
    );
    client.get_me(request).await.expect("get me");

    // The waterfall: a header line naming the trace, then one line per span, until a blank.
    let waterfall = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = mesh.stdout.recv().await.expect("mesh up's output");
            if line.starts_with(&format!("trace {trace}")) {
                let mut lines = vec![line];
                while let Some(line) = mesh.stdout.recv().await {
                    if line.trim().is_empty() {
                        return lines;
                    }
                    lines.push(line);
                }
                return lines;
            }
        }
    })
    .await
    .expect("GetMe's waterfall within 20 s");
    let text = waterfall.join("\n");
    println!("{text}");
    // start offset, duration, status, indentation of the tree column
    let row = |needle: &str| -> (f64, f64, String, usize) {
        let line = waterfall
            .iter()
            .find(|l| l.ends_with(needle))
            .unwrap_or_else(|| panic!("no line for {needle}:\n{text}"));
        let mut fields = line.split_whitespace();
        let start: f64 = fields.next().and_then(|f| f.parse().ok()).expect("start");
        let took: f64 = fields
            .next()
            .and_then(|f| f.parse().ok())
            .expect("duration");
        let status = fields.next().expect("status").to_owned();
        // The tree column starts after the bar; its indentation is the depth.
        let bar_end = line.rfind('·').max(line.rfind('█')).expect("bar");
        let tree = &line[bar_end..];
        let tree = &tree[tree.char_indices().nth(1).map_or(0, |(i, _)| i)..];
        let depth = (tree.len() - tree.trim_start().len() - 2) / 2;
        (start, took, status, depth)
    };
    let (root_start, root_took, root_status, root_depth) =
        row("aggregator mesh.aggregator.v1.AggregatorService/GetMe");
    assert_eq!(
        (root_start, root_status.as_str(), root_depth),
        (0.0, "OK", 0),
        "{text}"
    );
    let users = row("aggregator → mesh.users.v1.UserService/GetUser");
    let auth = row("aggregator → mesh.auth.v1.AuthService/ListSessions");
    for (start, took, status, depth) in [&users, &auth] {
        assert_eq!((status.as_str(), *depth), ("OK", 1), "{text}");
        assert!(*start >= 0.0 && start + took <= root_took + 0.001, "{text}");
    }
    // The two downstream calls overlap in time: each starts before the other ends.
    assert!(
        users.0 < auth.0 + auth.1 && auth.0 < users.0 + users.1,
        "GetUser and ListSessions do not overlap:\n{text}"
    );
    for server in [
        "users mesh.users.v1.UserService/GetUser",
        "auth mesh.auth.v1.AuthService/ListSessions",
    ] {
        let (_, _, status, depth) = row(server);
        assert_eq!((status.as_str(), depth), ("OK", 2), "{server}:\n{text}");
    }

    // The same trace in the data folder, in OTLP's JSON encoding.
    let file = mesh.data_dir().join("traces.jsonl");
    let lines = std::fs::read_to_string(&file).expect("traces.jsonl");
    let exported: serde_json::Value = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("one JSON object per line"))
        .find(|v| v.to_string().contains(trace))
        .expect("GetMe's trace in traces.jsonl");
    let resource_spans = exported["resourceSpans"].as_array().expect("resourceSpans");
    let services: std::collections::HashSet<String> = resource_spans
        .iter()
        .flat_map(|rs| {
            rs["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .filter(|kv| kv["key"] == "service.name")
        .filter_map(|kv| kv["value"]["stringValue"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(services.len(), 3, "{services:?}");
    let spans: Vec<&serde_json::Value> = resource_spans
        .iter()
        .flat_map(|rs| rs["scopeSpans"].as_array().into_iter().flatten())
        .flat_map(|ss| ss["spans"].as_array().into_iter().flatten())
        .collect();
    assert!(spans.iter().all(|s| s["traceId"] == trace), "{exported}");
    assert_eq!(
        spans.len(),
        waterfall.len() - 2,
        "every span of the waterfall"
    );
    drop(mesh);
}

/// A gRPC-Web call (HTTP/1.1, as a browser sends it) is one trace across the three services
/// too: the aggregator's server span is the child of the caller's `traceparent`, and auth's and
/// users' server spans are children of the aggregator's client spans.
#[tokio::test]
async fn a_grpc_web_call_is_one_trace_too() {
    let _machine = crate::common::process_test().await;
    let (collector, url) = Collector::start().await;
    let mesh = MeshUp::start_with("5s", &exporting_env(&url)).await;
    let mut web = mesh_testkit::web_aggregator(mesh.addr("aggregator"), 1);
    let caller_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    let caller_span = "10f067aa0ba902b8";
    let mut request = Request::new(mesh_proto::aggregator::v1::SignUpRequest {
        email: "web-trace@example.com".into(),
        password: mesh_testkit::PASSWORD.into(),
        display_name: "Web".into(),
    });
    request.metadata_mut().insert(
        headers::TRACEPARENT,
        format!("00-{caller_trace}-{caller_span}-01")
            .parse()
            .expect("ascii"),
    );
    web.sign_up(request).await.expect("sign up over gRPC-Web");

    let trace: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&caller_trace[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    collector
        .wait_for("the gRPC-Web SignUp's spans from all three services", |r| {
            let services: std::collections::HashSet<_> = r
                .spans
                .iter()
                .filter(|(_, s)| s.trace_id == trace)
                .map(|(svc, _)| svc.as_str())
                .collect();
            services.len() == 3 && r.spans.iter().filter(|(_, s)| s.trace_id == trace).count() >= 5
        })
        .await;
    let spans = collector.spans_of(&trace);
    let root = find(
        &spans,
        "aggregator",
        SpanKind::Server,
        "mesh.aggregator.v1.AggregatorService/SignUp",
    );
    assert_eq!(
        hex(&root.parent_span_id),
        caller_span,
        "child of the caller's span"
    );
    assert_eq!(
        attr_str(root, "rpc.response.status_code").as_deref(),
        Some("OK")
    );
    for (callee, name) in [
        ("auth", "mesh.auth.v1.AuthService/Register"),
        ("users", "mesh.users.v1.UserService/CreateUser"),
    ] {
        let client_span = find(&spans, "aggregator", SpanKind::Client, name);
        assert_eq!(
            client_span.parent_span_id, root.span_id,
            "{name} under SignUp"
        );
        let server_span = find(&spans, callee, SpanKind::Server, name);
        assert_eq!(server_span.parent_span_id, client_span.span_id, "{name}");
    }
}

/// With the collector accepting connections but never answering, calls still succeed at once
/// and the aggregator's memory stays flat however many calls it serves: spans beyond the
/// bounded queue are dropped, not kept.
#[tokio::test]
async fn a_dead_collector_costs_dropped_spans_not_memory() {
    let _machine = crate::common::process_test().await;
    // A black hole: connections are accepted and never answered, so every export waits for
    // its timeout while spans keep coming.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hole_addr = hole.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hole.incoming().flatten() {
            held.push(stream);
        }
    });
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{hole_addr}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "256".into()),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "30000".into()),
    ];
    let mesh = MeshUp::start_with("5s", &env).await;
    let pid = child_pid(&mesh, "aggregator");
    let mut client = aggregator(mesh.addr("aggregator")).await;
    let token = try_sign_up(&mut client, "grace@example.com", PASSWORD, "Ada", &[])
        .await
        .expect("sign up")
        .tokens
        .expect("tokens")
        .access_token;

    let calls = |n: usize| {
        let (addr, token) = (mesh.addr("aggregator"), token.clone());
        async move {
            let mut workers = Vec::new();
            for w in 0..8 {
                let token = token.clone();
                workers.push(tokio::spawn(async move {
                    let mut client = aggregator(addr).await;
                    let mut failed = 0;
                    for _ in (w..n).step_by(8) {
                        let mut request = bearer(&token, GetMeRequest {});
                        request.set_timeout(Duration::from_secs(10));
                        if client.get_me(request).await.is_err() {
                            failed += 1;
                        }
                    }
                    failed
                }));
            }
            let mut failed = 0;
            for w in workers {
                failed += w.await.expect("worker");
            }
            failed
        }
    };
    // Fill the queue and let the allocator settle, then measure.
    assert_eq!(
        calls(1500).await,
        0,
        "calls fail while the collector is dead"
    );
    let before = proc_status_kib(pid, "VmRSS");
    assert_eq!(
        calls(6000).await,
        0,
        "calls fail while the collector is dead"
    );
    let after = proc_status_kib(pid, "VmRSS");
    // 6,000 calls make 18,000 aggregator spans (about 1 KiB each once queued): kept, they
    // would add well over 16 MiB.
    let growth = after.saturating_sub(before);
    eprintln!("aggregator RSS {before} KiB → {after} KiB over 6000 calls with the collector dead");
    assert!(
        growth < 8 * 1024,
        "aggregator RSS grew by {growth} KiB over 6000 calls ({before} → {after} KiB)"
    );
}

/// The pid of `mesh up`'s child running `service`.
fn child_pid(mesh: &MeshUp, service: &str) -> u32 {
    let parent = mesh.child.id().expect("mesh up runs");
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if ppid == Some(parent) && args.get(1).is_some_and(|a| *a == service.as_bytes()) {
            return pid;
        }
    }
    panic!("no {service} child of mesh up ({parent})");
}

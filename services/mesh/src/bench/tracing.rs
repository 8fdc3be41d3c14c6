//! Scenario `tracing`: what tracing costs. GetMe through a real `mesh up` (three processes, as
//! deployed) three times in one run: with no exporter, exporting every trace, and exporting
//! 10 % of traces (`parentbased_traceidratio`), each to a collector in this process that
//! counts what it receives.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_proto::{
    aggregator::v1::{
        GetMeRequest, SignUpRequest, aggregator_service_client::AggregatorServiceClient,
    },
    otlp::collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
};
use tonic::{Request, Response, Status};

use super::{
    BenchError, Outcome, Settings, channels,
    fixtures::{Running, bearer, loopback, setup},
    measure::{Measurement, drive},
    on_servers,
    report::Figure,
};

/// A collector that counts the spans it is sent.
#[derive(Debug, Clone, Default)]
struct Counting {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Counting {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Counting {
    async fn export(
        &self,
        _request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn start_collector(counting: Counting) -> Result<Running, BenchError> {
    on_servers(async move {
        let (listener, addr) = loopback().await?;
        Running::spawn(addr, move |stopped| async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(counting.clone()))
                .add_service(MetricsServiceServer::new(counting))
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    stopped,
                )
                .await
                .map_err(|e| e.to_string())
        })
    })
    .await
}

fn free_port() -> Result<SocketAddr, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(setup)?;
    listener.local_addr().map_err(setup)
}

/// One `mesh up` with `env`, driven with GetMe; the spans the collector got meanwhile.
async fn measure(
    settings: &Settings,
    name: &str,
    env: &[(&str, String)],
    spans: &AtomicU64,
) -> Result<(Measurement, f64), BenchError> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let data = std::env::temp_dir().join(format!(
        "mesh-bench-tracing-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let (agg, auth, users) = (free_port()?, free_port()?, free_port()?);
    let mut command = tokio::process::Command::new(std::env::current_exe().map_err(setup)?);
    command
        .arg("up")
        .args(["--aggregator-listen", &agg.to_string()])
        .args(["--auth-listen", &auth.to_string()])
        .args(["--users-listen", &users.to_string()])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("OTEL_TRACES_SAMPLER_ARG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let before = spans.load(Ordering::Relaxed);
    let mut child = command.spawn().map_err(setup)?;
    let measured = async {
        super::aggregator::wait_serving(agg, Duration::from_secs(60)).await?;
        let channels = Arc::new(channels(agg, settings.connections).await?);
        let token = AggregatorServiceClient::new(channels[0].clone())
            .sign_up(SignUpRequest {
                email: "bench@example.com".into(),
                password: "benchmark password".into(),
                display_name: "Bench".into(),
            })
            .await
            .map_err(|e| setup(format!("sign up: {e}")))?
            .into_inner()
            .tokens
            .map(|t| t.access_token)
            .ok_or_else(|| setup("no tokens"))?;
        let call = move |worker: usize| {
            let mut client =
                AggregatorServiceClient::new(channels[worker % channels.len()].clone());
            let request = bearer(&token, GetMeRequest {});
            async move { client.get_me(request).await.is_ok() }
        };
        // Spans of the warm-up and sign-up are not counted.
        drive(
            settings.concurrency,
            settings.warmup,
            Duration::ZERO,
            call.clone(),
        )
        .await;
        let before = spans.load(Ordering::Relaxed);
        let driven = drive(
            settings.concurrency,
            Duration::ZERO,
            settings.duration,
            call,
        )
        .await;
        Ok::<_, BenchError>((driven, before))
    }
    .await;
    // SIGTERM: the services drain and flush what they queued.
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&data);
    let (driven, warm_calls) = measured?;
    // Everything exported, flushed at shutdown, per GetMe made (warm-up included).
    let exported = spans.load(Ordering::Relaxed) - before;
    let calls = (driven.latencies.len() + warm_calls).max(1);
    Ok((driven.measurement(name), exported as f64 / calls as f64))
}

/// `tracing`: GetMe with tracing off, at 100 % and at 10 % parent-based sampling.
pub(super) async fn tracing(settings: &Settings) -> Result<Outcome, BenchError> {
    let counting = Counting::default();
    let collector = start_collector(counting.clone()).await?;
    let url = format!("http://{}", collector.addr);
    let exporting = |sampler: &str, arg: Option<&str>| {
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.clone()),
            ("OTEL_TRACES_SAMPLER", sampler.to_owned()),
        ];
        if let Some(arg) = arg {
            env.push(("OTEL_TRACES_SAMPLER_ARG", arg.to_owned()));
        }
        env
    };
    let (off, _) = measure(settings, "GetMe, tracing off", &[], &counting.spans).await?;
    let (all, all_spans) = measure(
        settings,
        "GetMe, every trace exported",
        &exporting("parentbased_always_on", None),
        &counting.spans,
    )
    .await?;
    let (tenth, tenth_spans) = measure(
        settings,
        "GetMe, 10 % of traces exported (parent-based)",
        &exporting("parentbased_traceidratio", Some("0.1")),
        &counting.spans,
    )
    .await?;
    collector.stop().await;
    let overhead =
        |m: &Measurement| 100.0 * (1.0 - m.per_second / off.per_second.max(f64::MIN_POSITIVE));
    let figures = vec![
        Figure::at_most(
            "throughput cost of exporting every trace",
            overhead(&all),
            "%",
            10.0,
        ),
        Figure::at_most(
            "throughput cost at 10 % sampling",
            overhead(&tenth),
            "%",
            3.0,
        ),
        Figure::new("spans exported per GetMe, 100 %", all_spans, "spans"),
        Figure::new("spans exported per GetMe, 10 %", tenth_spans, "spans"),
    ];
    Ok(Outcome {
        measurements: vec![off, all, tenth],
        figures,
        notes: vec![
            "Each row is its own `mesh up` (three processes, SQLite) on the same two cores as the \
             load generator and the collector; a GetMe makes five spans (the aggregator's server \
             span and two client spans, users' and auth's server spans). The costs are the \
             throughput lost against the run with tracing off, and move by a few percent \
             between runs on a shared machine."
                .into(),
        ],
    })
}

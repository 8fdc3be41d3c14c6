//! Scenario `tracing`: what tracing costs. GetMe through a real `mesh up` (three processes, as
//! deployed) three times in one run: with no exporter, exporting every trace, and exporting
//! 10 % of traces (`parentbased_traceidratio`), each to a collector in this process that
//! counts what it receives.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mesh_proto::aggregator::v1::{
    GetMeRequest, SignUpRequest, aggregator_service_client::AggregatorServiceClient,
};
use mesh_testkit::{TestServer, free_addr};
use opentelemetry_proto::tonic::collector::{
    metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
};
use tonic::{Request, Response, Status};

use super::{
    BenchError, Outcome, Settings, channels,
    fixtures::{bearer, setup, start_server, stop},
    measure::{Measurement, Memory, TICKS_PER_SECOND, children, drive, memory, proc_stat},
    report::Figure,
};

/// A collector that counts the spans it is sent, in all and by service.
#[derive(Debug, Clone, Default)]
struct Counting {
    spans: Arc<AtomicU64>,
    by_service: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
}

#[tonic::async_trait]
impl TraceService for Counting {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for rs in &request.get_ref().resource_spans {
            let n: usize = rs.scope_spans.iter().map(|s| s.spans.len()).sum();
            self.spans.fetch_add(n as u64, Ordering::Relaxed);
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                        Some(s.clone())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            if let Ok(mut by) = self.by_service.lock() {
                *by.entry(service).or_default() += n as u64;
            }
        }
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

async fn start_collector(counting: Counting) -> Result<TestServer, BenchError> {
    start_server(TestServer::start(move |listener, stopped| {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(counting.clone()))
            .add_service(MetricsServiceServer::new(counting))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stopped,
            )
    }))
    .await
}

/// CPU time (user + system, in clock ticks) used so far by the children of process `parent`:
/// the three services of a `mesh up`.
fn children_cpu_ticks(parent: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Some(stat) = proc_stat(&entry.path().join("stat"))
            && stat.parent == parent
        {
            total += stat.cpu_ticks;
        }
    }
    total
}

/// One run of one mode.
#[derive(Debug)]
struct Run {
    measurement: Measurement,
    /// Spans the collector got per GetMe made (warm-up included, flushed at shutdown).
    spans_per_call: f64,
    /// CPU time the three services spent per measured GetMe.
    cpu_us_per_call: f64,
    /// Each service's memory once it served, before the first call: by name.
    idle: Vec<(String, Memory)>,
}

/// One `mesh up` with `env`, driven with GetMe.
async fn measure(
    settings: &Settings,
    name: &str,
    env: &[(&str, String)],
    spans: &AtomicU64,
) -> Result<Run, BenchError> {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let data = std::env::temp_dir().join(format!(
        "mesh-bench-tracing-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let (agg, auth, users) = (free_addr(), free_addr(), free_addr());
    let mut command = tokio::process::Command::new(std::env::current_exe().map_err(setup)?);
    command
        .arg("up")
        .args(["--aggregator-listen", &agg.to_string()])
        .args(["--auth-listen", &auth.to_string()])
        .args(["--users-listen", &users.to_string()])
        .arg("--no-console")
        .arg("--data-dir")
        .arg(&data)
        .args(super::fixtures::bench_server_args())
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
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
    let mesh_pid = child.id().unwrap_or(0);
    let measured = async {
        super::aggregator::wait_serving(agg, Duration::from_secs(60)).await?;
        // Idle: serving, no call yet (the aggregator's relay has subscribed to users).
        tokio::time::sleep(IDLE_SETTLE).await;
        let idle: Vec<(String, Memory)> = children(mesh_pid)
            .into_iter()
            .map(|(pid, name)| (name, memory(pid)))
            .collect();
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
        // The warm-up as a run of its own, so its calls (and their spans) are counted.
        let warm = drive(
            settings.concurrency,
            Duration::ZERO,
            settings.warmup,
            call.clone(),
        )
        .await;
        let cpu_before = children_cpu_ticks(mesh_pid);
        let driven = drive(
            settings.concurrency,
            Duration::ZERO,
            settings.duration,
            call,
        )
        .await;
        let cpu = children_cpu_ticks(mesh_pid).saturating_sub(cpu_before);
        Ok::<_, BenchError>((driven, warm.latencies.len(), cpu, idle))
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
    let (driven, warm_calls, cpu_ticks, idle) = measured?;
    let exported = spans.load(Ordering::Relaxed) - before;
    let calls = (driven.latencies.len() + warm_calls).max(1);
    Ok(Run {
        spans_per_call: exported as f64 / calls as f64,
        cpu_us_per_call: cpu_ticks as f64 / TICKS_PER_SECOND * 1e6
            / driven.latencies.len().max(1) as f64,
        measurement: driven.measurement(name),
        idle,
    })
}

/// How long a fresh `mesh up` is left alone before its idle memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// Rounds of the three runs; each mode is reported by its median round.
const ROUNDS: usize = 3;

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// `tracing`: GetMe with tracing off, at 100 % and at 10 % parent-based sampling, in
/// [`ROUNDS`] interleaved rounds (off, 100 %, 10 %, off, …), so that a drift of the machine over
/// the run does not read as a cost; each mode is reported by its median run.
pub(super) async fn tracing(settings: &Settings) -> Result<Outcome, BenchError> {
    let counting = Counting::default();
    let collector = start_collector(counting.clone()).await?;
    let url = format!("http://{}", collector.addr);
    let exporting = |sampler: &str, arg: Option<&str>| {
        let mut env = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
            // Spans (and metrics) only, as before the SDK: the collector takes no logs.
            ("OTEL_LOGS_EXPORTER", "none".to_owned()),
            ("OTEL_TRACES_SAMPLER", sampler.to_owned()),
        ];
        if let Some(arg) = arg {
            env.push(("OTEL_TRACES_SAMPLER_ARG", arg.to_owned()));
        }
        env
    };
    let modes: [(&str, Vec<(&str, String)>); 3] = [
        ("GetMe, tracing off", Vec::new()),
        (
            "GetMe, every trace exported",
            exporting("parentbased_always_on", None),
        ),
        (
            "GetMe, 10 % of traces exported (parent-based)",
            exporting("parentbased_traceidratio", Some("0.1")),
        ),
    ];
    let snapshot = || {
        counting
            .by_service
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    };
    let mut runs: [Vec<Run>; 3] = Default::default();
    let mut by_service = Vec::new();
    for _ in 0..ROUNDS {
        for (i, (name, env)) in modes.iter().enumerate() {
            let before = snapshot();
            runs[i].push(measure(settings, name, env, &counting.spans).await?);
            if i == 1 && by_service.is_empty() {
                by_service = snapshot()
                    .into_iter()
                    .map(|(svc, n)| format!("{svc} {}", n - before.get(&svc).copied().unwrap_or(0)))
                    .collect();
            }
        }
    }
    stop(collector).await;
    let every_run: Vec<String> = runs
        .iter()
        .zip(&modes)
        .map(|(list, (name, _))| {
            let each: Vec<String> = list
                .iter()
                .map(|r| {
                    format!(
                        "{:.0}/s at {:.0} µs",
                        r.measurement.per_second, r.cpu_us_per_call
                    )
                })
                .collect();
            format!("{name}: {}", each.join(", "))
        })
        .collect();
    // Idle memory of each service, tracing off and exporting every trace (each mode's first
    // run).
    let idle_of = |mode: usize| {
        runs[mode]
            .first()
            .map(|r| r.idle.clone())
            .unwrap_or_default()
    };
    let (idle_off, idle_on) = (idle_of(0), idle_of(1));
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut idle_figures = Vec::new();
    for (service, m) in &idle_off {
        idle_figures.push(Figure::at_most(
            format!("{service} idle RSS, tracing off"),
            mib(m.rss),
            "MiB",
            8.0,
        ));
    }
    for (service, m) in &idle_on {
        idle_figures.push(Figure::new(
            format!("{service} idle RSS, exporting"),
            mib(m.rss),
            "MiB",
        ));
    }
    let idle_note = |label: &str, idle: &[(String, Memory)]| {
        let each: Vec<String> = idle
            .iter()
            .map(|(service, m)| {
                format!(
                    "{service} {:.1} MiB ({:.1} private, {:.1} file-backed; PSS {:.1})",
                    mib(m.rss),
                    mib(m.anon),
                    mib(m.file),
                    mib(m.pss)
                )
            })
            .collect();
        format!("Idle memory, {label}: {}.", each.join(", "))
    };
    let idle_notes = vec![
        idle_note("tracing off", &idle_off),
        idle_note("exporting every trace", &idle_on),
        "Idle is read 2 s after the aggregator serves, before the first call. The \
         file-backed pages are the one `mesh` binary's, mapped by all three services: PSS \
         splits them among the processes that share them."
            .into(),
    ];
    let cpu = runs
        .each_ref()
        .map(|list| median(list.iter().map(|r| r.cpu_us_per_call).collect()));
    let [off, all, tenth] = runs.map(|mut list| {
        list.sort_by(|a, b| {
            a.measurement
                .per_second
                .total_cmp(&b.measurement.per_second)
        });
        list.swap_remove(list.len() / 2)
    });
    let lost = |m: &Measurement| {
        100.0 * (1.0 - m.per_second / off.measurement.per_second.max(f64::MIN_POSITIVE))
    };
    let figures = vec![
        Figure::at_most(
            "CPU cost of exporting every trace",
            100.0 * (cpu[1] / cpu[0] - 1.0),
            "%",
            10.0,
        ),
        Figure::at_most(
            "CPU cost at 10 % sampling",
            100.0 * (cpu[2] / cpu[0] - 1.0),
            "%",
            3.0,
        ),
        Figure::new("services' CPU per GetMe, tracing off", cpu[0], "µs"),
        Figure::new("services' CPU per GetMe, 100 %", cpu[1], "µs"),
        Figure::new("services' CPU per GetMe, 10 %", cpu[2], "µs"),
        Figure::new(
            "throughput cost of exporting every trace",
            lost(&all.measurement),
            "%",
        ),
        Figure::new(
            "throughput cost at 10 % sampling",
            lost(&tenth.measurement),
            "%",
        ),
        Figure::new(
            "spans exported per GetMe, 100 %",
            all.spans_per_call,
            "spans",
        ),
        Figure::new(
            "spans exported per GetMe, 10 %",
            tenth.spans_per_call,
            "spans",
        ),
    ];
    let figures = figures.into_iter().chain(idle_figures).collect();
    Ok(Outcome {
        measurements: vec![off.measurement, all.measurement, tenth.measurement],
        figures,
        notes: vec![
            "Each run is its own `mesh up` (three processes, SQLite) on the same two cores as the \
             load generator and the collector (which decodes every span it gets, on those cores \
             too); a GetMe makes five spans (the aggregator's server span and two client spans, \
             users' and auth's server spans). Each row is its mode's median run by throughput. \
             The CPU costs compare the median CPU time the three service processes spent per \
             GetMe (from /proc, 10 ms ticks): unlike throughput, that leaves out the load \
             generator and the collector, which share the cores."
                .into(),
            format!("Every run, by mode: {}.", every_run.join("; ")),
            format!(
                "Spans received in the first 100 % run, by service: {}.",
                by_service.join(", ")
            ),
        ]
        .into_iter()
        .chain(idle_notes)
        .collect(),
    })
}

//! Scenario `overload`: load shedding at 1×, 2× and 5× a server's concurrency limit. `mesh auth`
//! runs as a child process with `--concurrency-limit` `--limit`, and `Login` (Argon2id: tens of
//! milliseconds each, so calls really pile up) is called by limit × k callers at once. For each
//! load: accepted calls and their latency, shed calls (`RESOURCE_EXHAUSTED`) and how fast they
//! were refused, anything else (there should be nothing), and auth's resident memory.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_proto::auth::v1::{LoginRequest, RegisterRequest, auth_service_client::AuthServiceClient};
use tonic::Code;

use super::{
    BenchError, Outcome, Settings, channels,
    fixtures::{mesh_command, service_process, setup},
    measure::{Latencies, Measurement},
    report::Figure,
};

const EMAIL: &str = "overload@example.com";
const PASSWORD: &str = "benchmark password";
/// The loads, as multiples of the limit.
const LOADS: [usize; 3] = [1, 2, 5];

/// What `callers` saw over `duration`.
#[derive(Debug, Default)]
struct Seen {
    accepted: Latencies,
    shed: Latencies,
    other: u64,
    /// The codes of the other failures, with their counts.
    other_codes: std::collections::BTreeMap<String, u64>,
    elapsed: Duration,
    peak_rss_kib: u64,
}

async fn storm(
    channels: Arc<Vec<tonic::transport::Channel>>,
    callers: usize,
    duration: Duration,
    pid: u32,
) -> Seen {
    let start = Instant::now();
    let workers: Vec<_> = (0..callers)
        .map(|w| {
            let channel = channels[w % channels.len()].clone();
            tokio::spawn(async move {
                let mut client = AuthServiceClient::new(channel);
                let mut seen = Seen::default();
                while start.elapsed() < duration {
                    let began = Instant::now();
                    let reply = client
                        .login(LoginRequest {
                            email: EMAIL.into(),
                            password: PASSWORD.into(),
                        })
                        .await;
                    match reply {
                        Ok(_) => seen.accepted.record(began.elapsed()),
                        Err(s) if s.code() == Code::ResourceExhausted => {
                            seen.shed.record(began.elapsed());
                            // A client told to back off waits a moment before it asks again.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(s) => {
                            seen.other += 1;
                            *seen
                                .other_codes
                                .entry(format!(
                                    "{:?}: {}",
                                    s.code(),
                                    s.message().chars().take(80).collect::<String>()
                                ))
                                .or_default() += 1;
                        }
                    }
                }
                seen
            })
        })
        .collect();
    // Auth's memory, sampled while the storm runs.
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while start.elapsed() < duration {
            peak = peak.max(mesh_testkit::proc_status_kib(pid, "VmRSS"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    });
    let mut total = Seen::default();
    for worker in workers {
        if let Ok(seen) = worker.await {
            total.accepted.merge(&seen.accepted);
            total.shed.merge(&seen.shed);
            total.other += seen.other;
            for (code, n) in seen.other_codes {
                *total.other_codes.entry(code).or_default() += n;
            }
        }
    }
    total.elapsed = start.elapsed();
    total.peak_rss_kib = sampler.await.unwrap_or(0);
    total
}

/// `overload`: Login at 1×, 2× and 5× auth's concurrency limit.
pub(super) async fn overload(settings: &Settings) -> Result<Outcome, BenchError> {
    let limit = settings.limit.max(1);
    let data = std::env::temp_dir().join(format!("mesh-bench-overload-{}", std::process::id()));
    let addr = mesh_testkit::free_addr();
    let mut command = mesh_command(["auth", "--listen", addr.to_string().as_str(), "--data-dir"])?;
    command
        .arg(&data)
        .args(
            mesh_runtime::ServerConfig {
                concurrency_limit: u32::try_from(limit).unwrap_or(u32::MAX),
                ..super::fixtures::bench_server_config()
            }
            .to_args(),
        )
        .env("RUST_LOG", "warn");
    let mut auth = service_process(command, addr, mesh_proto::service_names::AUTH).await?;
    let pid = auth.pid();
    let channels = Arc::new(channels(addr, settings.connections).await?);
    AuthServiceClient::new(channels[0].clone())
        .register(RegisterRequest {
            email: EMAIL.into(),
            password: PASSWORD.into(),
        })
        .await
        .map_err(|e| setup(format!("register: {e}")))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = mesh_testkit::proc_status_kib(pid, "VmRSS");

    let mut measurements = Vec::new();
    let mut figures = vec![Figure::new(
        "auth RSS, idle",
        idle_rss as f64 / 1024.0,
        "MiB",
    )];
    let mut notes = Vec::new();
    for k in LOADS {
        let callers = limit * k;
        if !settings.warmup.is_zero() {
            storm(channels.clone(), callers, settings.warmup, pid).await;
        }
        let seen = storm(channels.clone(), callers, settings.duration, pid).await;
        let (accepted, shed) = (seen.accepted.len(), seen.shed.len());
        let all = (accepted + shed + seen.other).max(1);
        measurements.push(Measurement::new(
            format!("Login accepted, {callers} callers ({k}× the limit)"),
            &seen.accepted,
            seen.other,
            seen.elapsed,
        ));
        measurements.push(Measurement::new(
            format!("Login shed (RESOURCE_EXHAUSTED), {callers} callers"),
            &seen.shed,
            0,
            seen.elapsed,
        ));
        figures.push(Figure::new(
            format!("{k}× the limit: share of calls shed"),
            100.0 * shed as f64 / all as f64,
            "%",
        ));
        figures.push(Figure::new(
            format!("{k}× the limit: auth peak RSS"),
            seen.peak_rss_kib as f64 / 1024.0,
            "MiB",
        ));
        if seen.other > 0 {
            notes.push(format!(
                "{k}×: {} calls failed with another code than RESOURCE_EXHAUSTED: {:?}",
                seen.other, seen.other_codes
            ));
        }
    }
    let _ = auth.child.kill().await;
    let _ = std::fs::remove_dir_all(&data);
    notes.push(format!(
        "auth in its own process with --concurrency-limit {limit}; every caller logs in again as \
         soon as it has its answer, and waits 5 ms after being shed. Accepted logins queue for \
         the Argon2id permits (one per core), so their latency grows with the limit, not with \
         the load; shed calls are refused before any work."
    ));
    Ok(Outcome {
        measurements,
        figures,
        notes,
    })
}

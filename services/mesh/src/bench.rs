//! `mesh bench`: measurements of the mesh on this machine, side by side in one run.
//!
//! Scenario `login`: an auth server in-process on loopback (SQLite in a temporary folder),
//! driven by concurrent `Login` callers over a few HTTP/2 connections; in the same run, the raw
//! Argon2id verification rate of the machine (the ceiling for logins), the latency of health
//! checks during the login storm against idle, and the throughput of `ValidateToken`.
//! Prints a table and writes `<results>/login.json`.
//!
//! Scenarios `users` and `aggregator`: see their modules.

mod aggregator;
mod fixtures;
mod users;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_proto::auth::v1::{
    LoginRequest, RegisterRequest, ValidateTokenRequest, auth_service_client::AuthServiceClient,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Flags of `mesh bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Concurrent callers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// How long each measurement runs (after a warm-up of a tenth of it).
    #[arg(long, default_value = "10s", value_parser = mesh_runtime::parse_duration)]
    duration: Duration,
    /// Database of the users service in scenario `users` (`postgres://…`); unset: SQLite in a
    /// temporary folder.
    #[arg(long)]
    database_url: Option<String>,
    /// Scenario `aggregator`: the one-way latency put in front of both downstreams.
    #[arg(long, default_value = "20ms", value_parser = mesh_runtime::parse_duration)]
    delay: Duration,
    /// Scenario `aggregator`: WatchProfiles subscribers.
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// Folder for the JSON results.
    #[arg(long, env = "MESH_BENCH_RESULTS", default_value = "bench-results")]
    results: PathBuf,
}

/// The scenarios.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Scenario {
    /// Argon2 login throughput vs the raw hash rate, health latency during the storm, and
    /// ValidateToken throughput.
    Login,
    /// GetUser at 1/16/64 callers, BatchGetUsers of 100 ids, and the event rate and delay one
    /// WatchUsers subscriber sees under write load.
    Users,
    /// GetMe against a direct GetUser (1 and 4 downstream connections), GetMe with delayed
    /// downstreams, GetProfiles of 10,000 ids, and WatchProfiles with many subscribers.
    Aggregator,
}

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BenchError {
    /// Setting up failed.
    #[error("benchmark set-up failed: {0}")]
    Setup(String),
    /// Writing the results failed.
    #[error("cannot write results to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Latency summary of one measurement.
#[derive(Debug, Clone, Copy)]
struct Summary {
    count: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn summarize(mut latencies: Vec<Duration>, elapsed: Duration) -> Summary {
    latencies.sort_unstable();
    let pick = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[index].as_secs_f64() * 1000.0
    };
    Summary {
        count: latencies.len(),
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
    }
}

fn json(summary: &Summary) -> String {
    format!(
        r#"{{"count":{},"per_second":{:.1},"p50_ms":{:.3},"p99_ms":{:.3}}}"#,
        summary.count, summary.per_second, summary.p50_ms, summary.p99_ms
    )
}

/// Runs `call` from `concurrency` callers for `duration` and returns every latency.
async fn drive<F, Fut>(concurrency: usize, duration: Duration, call: F) -> (Vec<Duration>, Duration)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while start.elapsed() < duration {
                    let begun = Instant::now();
                    if call(worker).await {
                        latencies.push(begun.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap_or_default());
    }
    (all, start.elapsed())
}

async fn channels(addr: std::net::SocketAddr, n: usize) -> Result<Vec<Channel>, BenchError> {
    let mut list = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| BenchError::Setup(format!("connect: {e}")))?;
        list.push(channel);
    }
    Ok(list)
}

/// Health-check latencies, one probe every 20 ms, until `stop` fires.
async fn probe_health(channel: Channel, mut stop: oneshot::Receiver<()>) -> Vec<Duration> {
    let mut client = HealthClient::new(channel);
    let mut latencies = Vec::new();
    loop {
        let begun = Instant::now();
        if client.check(HealthCheckRequest::default()).await.is_ok() {
            latencies.push(begun.elapsed());
        }
        tokio::select! {
            _ = &mut stop => return latencies,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Runs the chosen scenario.
pub(crate) async fn run(args: BenchArgs) -> Result<(), BenchError> {
    match args.scenario {
        Scenario::Login => login(args).await,
        Scenario::Users => users::users(args).await,
        Scenario::Aggregator => aggregator::aggregator(args).await,
    }
}

async fn login(args: BenchArgs) -> Result<(), BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let warmup = args.duration / 10;

    // 1. The ceiling: raw Argon2id verifications on every core, nothing else running.
    let duration = args.duration;
    let raw_rate = tokio::task::spawn_blocking(move || mesh_auth::raw_verify_rate(cores, duration))
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;

    // 2. An auth server in-process on loopback.
    let data = std::env::temp_dir().join(format!("mesh-bench-{}", std::process::id()));
    let listener = mesh_runtime::bind(([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let config = mesh_auth::Config::new(addr, data.clone());
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        mesh_auth::serve(&config, listener, async {
            let _ = server_stopped.await;
        })
        .await
    });
    let channels = Arc::new(channels(addr, args.connections).await?);
    let mut client = AuthServiceClient::new(channels[0].clone());
    let password = "benchmark password";
    let registered = client
        .register(RegisterRequest {
            email: "bench@example.com".into(),
            password: password.into(),
        })
        .await
        .map_err(|e| BenchError::Setup(format!("register: {e}")))?
        .into_inner();
    let access_token = registered
        .tokens
        .map(|t| t.access_token)
        .ok_or_else(|| BenchError::Setup("no tokens".into()))?;

    // 3. Health latency while idle.
    let (stop, stopped) = oneshot::channel();
    let idle_probe = tokio::spawn(probe_health(channels[0].clone(), stopped));
    let idle_for = Duration::from_secs(2).min(args.duration);
    tokio::time::sleep(idle_for).await;
    let _ = stop.send(());
    let idle_health = idle_probe.await.unwrap_or_default();

    // 4. The login storm, with health probed throughout.
    let login_call = {
        let channels = channels.clone();
        move |worker: usize| {
            let mut client = AuthServiceClient::new(channels[worker % channels.len()].clone());
            async move {
                client
                    .login(LoginRequest {
                        email: "bench@example.com".into(),
                        password: password.into(),
                    })
                    .await
                    .is_ok()
            }
        }
    };
    drive(args.concurrency, warmup, login_call.clone()).await;
    let (stop, stopped) = oneshot::channel();
    let storm_probe = tokio::spawn(probe_health(channels[0].clone(), stopped));
    let (logins, elapsed) = drive(args.concurrency, args.duration, login_call).await;
    let _ = stop.send(());
    let storm_health = storm_probe.await.unwrap_or_default();
    let logins = summarize(logins, elapsed);

    // 5. ValidateToken (signature, claims and a session lookup).
    let validate_call = {
        let channels = channels.clone();
        let token = access_token.clone();
        move |worker: usize| {
            let mut client = AuthServiceClient::new(channels[worker % channels.len()].clone());
            let token = token.clone();
            async move {
                client
                    .validate_token(ValidateTokenRequest {
                        access_token: token,
                    })
                    .await
                    .is_ok()
            }
        }
    };
    drive(args.concurrency, warmup, validate_call.clone()).await;
    let (validations, elapsed) = drive(args.concurrency, args.duration, validate_call).await;
    let validations = summarize(validations, elapsed);

    let _ = stop_server.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&data);

    // Probes run every 20 ms: their "per second" is the probe rate, not a capacity.
    let idle = summarize(idle_health, idle_for);
    let storm = summarize(storm_health, args.duration);
    let ratio = logins.per_second / raw_rate;
    println!(
        "\nmesh bench login — {cores} cores, {} callers over {} connections, {:?} each\n",
        args.concurrency, args.connections, args.duration
    );
    println!("| measurement | per second | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| raw Argon2id verify ({cores} threads) | {raw_rate:.1} | | |");
    println!(
        "| Login (gRPC, SQLite) | {:.1} | {:.2} | {:.2} |",
        logins.per_second, logins.p50_ms, logins.p99_ms
    );
    println!(
        "| health check, idle | | {:.3} | {:.3} |",
        idle.p50_ms, idle.p99_ms
    );
    println!(
        "| health check, during the login storm | | {:.3} | {:.3} |",
        storm.p50_ms, storm.p99_ms
    );
    println!(
        "| ValidateToken | {:.1} | {:.3} | {:.3} |",
        validations.per_second, validations.p50_ms, validations.p99_ms
    );
    println!("\nlogin rate / raw hash rate: {:.1} %", ratio * 100.0);

    let report = format!(
        r#"{{"scenario":"login","cores":{cores},"concurrency":{},"connections":{},"duration_s":{},"raw_argon2_verify_per_second":{raw_rate:.1},"login":{},"login_over_raw":{ratio:.4},"health_idle":{},"health_during_storm":{},"validate_token":{}}}"#,
        args.concurrency,
        args.connections,
        args.duration.as_secs_f64(),
        json(&logins),
        json(&idle),
        json(&storm),
        json(&validations),
    );
    write_report(&args.results, "login.json", &report)
}

/// Writes `report` (one JSON document) to `<results>/<name>` and says where.
fn write_report(results: &std::path::Path, name: &str, report: &str) -> Result<(), BenchError> {
    std::fs::create_dir_all(results).map_err(|source| BenchError::Write {
        path: results.to_owned(),
        source,
    })?;
    let path = results.join(name);
    std::fs::write(&path, format!("{report}\n")).map_err(|source| BenchError::Write {
        path: path.clone(),
        source,
    })?;
    println!("results: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percentiles pick the right samples and the rate divides by the elapsed time.
    #[test]
    fn summary_percentiles() {
        let latencies: Vec<_> = (1..=100).map(Duration::from_millis).collect();
        let s = summarize(latencies, Duration::from_secs(2));
        assert_eq!(s.count, 100);
        assert!((s.per_second - 50.0).abs() < 1e-9);
        assert!((s.p50_ms - 51.0).abs() < 1e-9 || (s.p50_ms - 50.0).abs() < 1e-9);
        assert!((s.p99_ms - 99.0).abs() < 1e-9);
        let empty = summarize(Vec::new(), Duration::from_secs(1));
        assert_eq!((empty.count, empty.p50_ms), (0, 0.0));
    }

    /// The JSON of a summary parses back to the same numbers.
    #[test]
    fn summary_json() {
        let s = Summary {
            count: 3,
            per_second: 1.5,
            p50_ms: 2.0,
            p99_ms: 4.25,
        };
        assert_eq!(
            json(&s),
            r#"{"count":3,"per_second":1.5,"p50_ms":2.000,"p99_ms":4.250}"#
        );
    }
}

//! `mesh bench <scenario>`: the mesh measured on this machine, side by side with a bare RPC hop.
//!
//! Each run starts the servers it needs in-process on loopback (on a runtime of their own, with
//! `--server-threads` workers) or, for the stream-memory figures, as child processes; drives
//! them with `--concurrency` callers over `--connections` HTTP/2 connections for `--duration`
//! after a `--warmup`; records every latency in HDR histograms; and measures the `echo`
//! baseline the same way in the same run. It prints a table and writes
//! `<results>/<scenario>.json`, `.md` and `.svg` (latency by percentile). The servers,
//! processes, tokens and certificates are the test kit's (`mesh-testkit`), with the bench's own
//! server settings.
//!
//! Scenarios: `echo`, `get-user`, `get-me`, `get-me-delay`, `get-profiles`, `watch`, `login`,
//! `overload`, `tracing`, `users`, `replicas` and `abuse`; `docs/benchmarks.md` shows a run of
//! each.

mod abuse;
mod aggregator;
mod echo;
mod fan_out;
mod fixtures;
mod login;
mod measure;
mod overload;
mod report;
mod tracing;
mod users;

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use self::{
    measure::{Latencies, Measurement},
    report::{Figure, Machine, Report, SCHEMA},
};

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
    /// How long each measurement runs.
    #[arg(long, default_value = "5s", value_parser = mesh_runtime::parse_duration)]
    duration: Duration,
    /// How long each measurement warms up first (not recorded).
    #[arg(long, default_value = "1s", value_parser = mesh_runtime::parse_duration)]
    warmup: Duration,
    /// Payload bytes each way of the `echo` baseline.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Worker threads of the runtime the in-process servers run on (default: one per core).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Database of the users service (`postgres://…`); unset: SQLite in a temporary folder.
    #[arg(long)]
    database_url: Option<String>,
    /// `get-me-delay`: the one-way latency put in front of both downstreams.
    #[arg(long, default_value = "20ms", value_parser = mesh_runtime::parse_duration)]
    delay: Duration,
    /// `get-profiles`: profiles created and ids per call.
    #[arg(long, default_value_t = 10_000)]
    profiles: usize,
    /// `watch`: WatchProfiles subscribers.
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    /// `watch`: subscribers per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// `watch`: changes sent to every subscriber (each timed to all of them).
    #[arg(long, default_value_t = 5)]
    events: usize,
    /// `overload`: the server's concurrency limit (loaded at 1×, 2× and 5× it).
    #[arg(long, default_value_t = 8)]
    limit: usize,
    /// `get-me`: also measure GetMe with TLS everywhere (mutual between the services) beside
    /// plaintext in the same run, and new TLS connections per second against new plaintext
    /// ones.
    #[arg(long)]
    tls: bool,
    /// Folder for the results.
    #[arg(long, env = "MESH_BENCH_RESULTS", default_value = "bench-results")]
    results: PathBuf,
    /// `echo-server` only: where to listen.
    #[arg(long, hide = true)]
    listen: Option<SocketAddr>,
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// The baseline alone: a bare tonic echo.
    Echo,
    /// users' GetUser, called directly.
    GetUser,
    /// GetMe through the aggregator (auth and users joined) against a direct GetUser.
    GetMe,
    /// GetMe with both downstreams `--delay` away, against GetMe without.
    GetMeDelay,
    /// GetProfiles of `--profiles` ids per call.
    GetProfiles,
    /// `--subscribers` WatchProfiles streams: RSS per subscriber and the time for one change to
    /// reach them all, against bare tonic streams.
    Watch,
    /// Argon2 Login throughput vs the raw hash rate; health latency during the storm.
    Login,
    /// Login at 1×, 2× and 5× auth's concurrency limit: shed share, latencies, RSS.
    Overload,
    /// GetMe through a real `mesh up` with tracing off, exporting 100 % and 10 % of traces.
    Tracing,
    /// users in depth: GetUser at 1/16/64 callers, BatchGetUsers, UpdateUser, WatchUsers delay.
    Users,
    /// WatchUsers across two users replicas on one PostgreSQL (needs `--database-url`): a
    /// change through one, timed to the other's subscriber and to its own.
    Replicas,
    /// Every attack class of the abuse suite against a real mesh, for `--duration` each, while
    /// a well-behaved client calls Login and GetMe: its success rate and p99 against no attack,
    /// and each process's peak RSS.
    Abuse,
    /// A bare echo server in this process until killed (used by `watch`).
    #[value(hide = true)]
    EchoServer,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::GetUser => "get-user",
            Self::GetMe => "get-me",
            Self::GetMeDelay => "get-me-delay",
            Self::GetProfiles => "get-profiles",
            Self::Watch => "watch",
            Self::Login => "login",
            Self::Overload => "overload",
            Self::Tracing => "tracing",
            Self::Users => "users",
            Self::Replicas => "replicas",
            Self::Abuse => "abuse",
            Self::EchoServer => "echo-server",
        }
    }
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

/// The flags every scenario reads.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    concurrency: usize,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    payload: usize,
    server_threads: usize,
    database_url: Option<String>,
    delay: Duration,
    profiles: usize,
    subscribers: usize,
    streams_per_connection: usize,
    events: usize,
    limit: usize,
    tls: bool,
}

impl Settings {
    /// The settings as they go into the report.
    fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut map = serde_json::Map::new();
        map.insert("concurrency".into(), self.concurrency.into());
        map.insert("connections".into(), self.connections.into());
        map.insert("duration_s".into(), self.duration.as_secs_f64().into());
        map.insert("warmup_s".into(), self.warmup.as_secs_f64().into());
        map.insert("payload_bytes".into(), self.payload.into());
        map.insert("tls".into(), self.tls.into());
        map.insert(
            "database".into(),
            if self.database_url.is_some() {
                "postgresql"
            } else {
                "sqlite"
            }
            .into(),
        );
        map
    }

    /// `None` for the SQLite default, else a description.
    fn database_name(&self) -> &'static str {
        if self.database_url.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    }
}

/// The servers' runtime, when the run has one.
static SERVERS: OnceLock<tokio::runtime::Handle> = OnceLock::new();

/// Runs `work` (starting a server, say) on the servers' runtime, so that what it spawns runs
/// there and not on the load generator's threads.
async fn on_servers<T, F>(work: F) -> Result<T, BenchError>
where
    F: Future<Output = Result<T, BenchError>> + Send + 'static,
    T: Send + 'static,
{
    match SERVERS.get() {
        Some(handle) => handle
            .spawn(work)
            .await
            .map_err(|e| BenchError::Setup(format!("server start: {e}")))?,
        None => work.await,
    }
}

/// `n` HTTP/2 connections to `addr`.
async fn channels(addr: SocketAddr, n: usize) -> Result<Vec<Channel>, BenchError> {
    let mut list = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| BenchError::Setup(format!("connect to {addr}: {e}")))?;
        list.push(channel);
    }
    Ok(list)
}

/// `n` HTTP/2 connections to `addr`, over TLS (verified with the run's CA, presenting its
/// client certificate) when `tls` is given.
async fn any_channels(
    addr: SocketAddr,
    n: usize,
    tls: Option<&mesh_testkit::TestPki>,
) -> Result<Vec<Channel>, BenchError> {
    let Some(pki) = tls else {
        return channels(addr, n).await;
    };
    let client = pki.mesh_client();
    let mut list = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = mesh_runtime::client::endpoint(fixtures::url(addr, tls)?, &client)
            .map_err(|e| BenchError::Setup(e.to_string()))?
            .connect()
            .await
            .map_err(|e| BenchError::Setup(format!("connect to {addr} over TLS: {e}")))?;
        list.push(channel);
    }
    Ok(list)
}

/// Health-check latencies, one probe every 20 ms, until `stop` fires.
async fn probe_health(channel: Channel, mut stop: oneshot::Receiver<()>) -> (Latencies, Duration) {
    let mut client = HealthClient::new(channel);
    let mut latencies = Latencies::default();
    let start = Instant::now();
    loop {
        let begun = Instant::now();
        if client.check(HealthCheckRequest::default()).await.is_ok() {
            latencies.record(begun.elapsed());
        }
        tokio::select! {
            _ = &mut stop => return (latencies, start.elapsed()),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// What a scenario hands back: its measurements (after the baseline), figures and notes.
#[derive(Debug, Default)]
struct Outcome {
    measurements: Vec<Measurement>,
    figures: Vec<Figure>,
    notes: Vec<String>,
}

/// `mesh bench`: the chosen scenario on the mesh's runtime; the bare echo server on one of
/// tokio's defaults, as an application written without the mesh would run it (the mesh's
/// runtime has the LIFO slot off, see `mesh_runtime::cli::block_on`).
pub(crate) fn main(args: BenchArgs) -> std::process::ExitCode {
    if args.scenario != Scenario::EchoServer {
        return mesh_runtime::cli::block_on(run(args));
    }
    let served = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Setup(format!("runtime: {e}")))
        .and_then(|runtime| runtime.block_on(echo_server(args.listen)));
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesh bench echo-server: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the chosen scenario and writes its report.
async fn run(args: BenchArgs) -> Result<(), BenchError> {
    if cfg!(debug_assertions) {
        eprintln!("mesh bench: this is a debug build; figures are only meaningful with --release");
    }
    raise_open_file_limit();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let settings = Settings {
        concurrency: args.concurrency.max(1),
        connections: args.connections.max(1),
        duration: args.duration,
        warmup: args.warmup,
        payload: args.payload,
        server_threads: args.server_threads.unwrap_or(cores).max(1),
        database_url: args.database_url,
        delay: args.delay,
        profiles: args.profiles.max(1),
        subscribers: args.subscribers.max(1),
        streams_per_connection: args.streams_per_connection.max(1),
        events: args.events.max(1),
        limit: args.limit.max(1),
        tls: args.tls,
    };
    // The services' own runtime settings (`mesh_runtime::cli::runtime_builder`).
    let servers = mesh_runtime::cli::runtime_builder()
        .worker_threads(settings.server_threads)
        .thread_name("bench-server")
        .build()
        .map_err(|e| BenchError::Setup(format!("servers' runtime: {e}")))?;
    if SERVERS.set(servers.handle().clone()).is_err() {
        servers.shutdown_background();
        return Err(BenchError::Setup("one benchmark run per process".into()));
    }
    let started_unix_s = mesh_proto::time::unix_now_ms() / 1000;

    let baseline = echo::baseline(&settings).await?;
    let outcome = match args.scenario {
        Scenario::Echo => Ok(Outcome::default()),
        Scenario::GetUser => users::get_user(&settings, &baseline).await,
        Scenario::GetMe => aggregator::get_me(&settings, &baseline).await,
        Scenario::GetMeDelay => aggregator::get_me_delay(&settings).await,
        Scenario::GetProfiles => aggregator::get_profiles(&settings).await,
        Scenario::Watch => aggregator::watch(&settings).await,
        Scenario::Login => login::login(&settings).await,
        Scenario::Overload => overload::overload(&settings).await,
        Scenario::Tracing => tracing::tracing(&settings).await,
        Scenario::Users => users::users(&settings).await,
        Scenario::Replicas => users::replicas(&settings).await,
        Scenario::Abuse => abuse::abuse(&settings).await,
        Scenario::EchoServer => Ok(Outcome::default()),
    };
    servers.shutdown_background();
    let outcome = outcome?;
    let mut measurements = vec![baseline];
    measurements.extend(outcome.measurements);
    let report = Report {
        schema: SCHEMA,
        scenario: args.scenario.name().into(),
        started_unix_s,
        machine: Machine::here(settings.server_threads),
        settings: settings.to_json(),
        measurements,
        figures: outcome.figures,
        notes: outcome.notes,
    };
    report.write(&args.results).map(|_| ())
}

/// Raises this process's open-file limit to its hard limit (children inherit it): `watch` with
/// many subscribers opens a socket per connection on each side, past the usual soft limit of
/// 1,024.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                eprintln!("mesh bench: cannot raise the open-file limit from {soft}: {err}");
            }
        }
        Ok(_) => {}
        Err(err) => eprintln!("mesh bench: cannot read the open-file limit: {err}"),
    }
}

/// `mesh bench echo-server --listen ADDR`: the bare echo in a process of its own.
async fn echo_server(listen: Option<SocketAddr>) -> Result<(), BenchError> {
    let addr = listen.ok_or_else(|| BenchError::Setup("echo-server needs --listen".into()))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| BenchError::Setup(format!("bind {addr}: {e}")))?;
    echo::serve(listener, std::future::pending())
        .await
        .map_err(|e| BenchError::Setup(e.to_string()))
}

//! Scenarios through the aggregator: auth and users on loopback (users on SQLite unless
//! `--database-url`), one signed-up account, and an aggregator in front of them.
//!
//! - `get-me`: users' GetUser directly against GetMe through the aggregator (profile and
//!   sessions joined: five RPC halves and two token verifications to the echo's two halves);
//! - `get-me-delay`: GetMe when both downstreams are `--delay` away (a latency-injecting TCP
//!   relay in front of each) against GetMe without: the two reads run concurrently, so the
//!   delayed p50 should be the delay and at most a millisecond more (the goal);
//! - `get-profiles`: GetProfiles of `--profiles` ids per call, one caller;
//! - `watch`: `--subscribers` WatchProfiles streams against an aggregator in a process of its
//!   own: its RSS per subscriber against bare tonic streams, and the time for each of
//!   `--events` changes to reach every subscriber.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_proto::{
    aggregator::v1::{
        GetMeRequest, GetProfilesRequest, ProfileEvent, SignUpRequest, WatchProfilesRequest,
        aggregator_service_client::AggregatorServiceClient,
    },
    users::v1::{GetUserRequest, UpdateUserRequest, User, user_service_client::UserServiceClient},
};
use mesh_testkit::{ServiceProcess, TestMesh, TestPki};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    metrics::v1::{metric::Data, number_data_point::Value},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::StreamExt as _;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

use super::{
    BenchError, Outcome, Settings, any_channels, channels, echo,
    fan_out::Round,
    fixtures::{
        Caller, bearer, mesh_command, populate, service_process, setup, start_aggregator,
        start_mesh, stop, url,
    },
    measure::{Latencies, Measurement, drive},
    on_servers,
    report::Figure,
};

/// The kit's [`TestMesh`] of auth, users and an aggregator in front of them (each with the
/// bench's settings), and one account made by SignUp.
async fn set_up(settings: &Settings, name: &str) -> Result<(TestMesh, Caller), BenchError> {
    set_up_with(settings, name, None).await
}

/// [`set_up`], with TLS everywhere when `tls` is given (auth and users mutual).
async fn set_up_with(
    settings: &Settings,
    name: &str,
    tls: Option<&TestPki>,
) -> Result<(TestMesh, Caller), BenchError> {
    let mut mesh = start_mesh(name, settings.database_url.clone(), tls).await?;
    let aggregator = start_aggregator(mesh.auth.addr, mesh.users().addr, tls).await?;
    let signed_up =
        AggregatorServiceClient::new(any_channels(aggregator.addr, 1, tls).await?.remove(0))
            .sign_up(SignUpRequest {
                email: "bench@example.com".into(),
                password: "benchmark password".into(),
                display_name: "Bench".into(),
            })
            .await
            .map_err(|e| setup(format!("sign up: {e}")))?
            .into_inner();
    mesh.aggregator = Some(aggregator);
    let me = Caller {
        id: signed_up.profile.map(|p| p.user_id).unwrap_or_default(),
        token: signed_up
            .tokens
            .map(|t| t.access_token)
            .ok_or_else(|| setup("no tokens"))?,
    };
    Ok((mesh, me))
}

/// GetMe from `settings.concurrency` callers over `settings.connections` connections.
async fn drive_get_me(
    settings: &Settings,
    aggregator: SocketAddr,
    token: &str,
    name: &str,
    tls: Option<&TestPki>,
) -> Result<Measurement, BenchError> {
    let agg_channels = Arc::new(any_channels(aggregator, settings.connections, tls).await?);
    let token = token.to_owned();
    let call = move |worker: usize| {
        let mut client =
            AggregatorServiceClient::new(agg_channels[worker % agg_channels.len()].clone());
        let request = bearer(&token, GetMeRequest {});
        async move { client.get_me(request).await.is_ok() }
    };
    Ok(drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        call,
    )
    .await
    .measurement(name))
}

/// GetMe as a browser calls it: gRPC-Web over HTTP/1.1, one call at a time per connection, so
/// one connection per caller.
async fn drive_web_get_me(settings: &Settings, aggregator: SocketAddr, token: &str) -> Measurement {
    let web = mesh_testkit::web_aggregator(aggregator, settings.concurrency);
    let token = token.to_owned();
    let call = move |_worker: usize| {
        let mut client = web.clone();
        let request = bearer(&token, GetMeRequest {});
        async move { client.get_me(request).await.is_ok() }
    };
    drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        call,
    )
    .await
    .measurement("GetMe over gRPC-Web (HTTP/1.1)")
}

/// `get-me`: users' GetUser directly, then GetMe through the aggregator, over native gRPC and
/// over gRPC-Web.
pub(super) async fn get_me(
    settings: &Settings,
    baseline: &Measurement,
) -> Result<Outcome, BenchError> {
    let (mesh, me) = set_up(settings, "get-me").await?;
    let user_channels = Arc::new(channels(mesh.users().addr, settings.connections).await?);
    let direct = {
        let (token, id) = (me.token.clone(), me.id.clone());
        let call = move |worker: usize| {
            let mut client =
                UserServiceClient::new(user_channels[worker % user_channels.len()].clone());
            let request = bearer(&token, GetUserRequest { id: id.clone() });
            async move { client.get_user(request).await.is_ok() }
        };
        drive(
            settings.concurrency,
            settings.warmup,
            settings.duration,
            call,
        )
        .await
        .measurement("users GetUser, direct")
    };
    let get_me = drive_get_me(
        settings,
        mesh.aggregator().addr,
        &me.token,
        "GetMe through the aggregator",
        None,
    )
    .await?;
    let web_get_me = drive_web_get_me(settings, mesh.aggregator().addr, &me.token).await;
    let plain_connects = if settings.tls {
        Some(
            new_connections(
                settings,
                mesh.auth.addr,
                None,
                "new plaintext connections to auth",
            )
            .await?,
        )
    } else {
        None
    };
    mesh.stop().await;
    let figures = vec![
        Figure::at_least(
            "GetMe / echo throughput",
            get_me.per_second / baseline.per_second.max(f64::MIN_POSITIVE),
            "ratio",
            0.2,
        ),
        Figure::new(
            "GetMe / direct GetUser throughput",
            get_me.per_second / direct.per_second.max(f64::MIN_POSITIVE),
            "ratio",
        ),
        Figure::at_most(
            "GetMe p99 / p50",
            get_me.latency_ms.p99 / get_me.latency_ms.p50.max(0.001),
            "ratio",
            2.0,
        ),
        Figure::new(
            "GetMe gRPC-Web / native gRPC throughput",
            web_get_me.per_second / get_me.per_second.max(f64::MIN_POSITIVE),
            "ratio",
        ),
        Figure::new(
            "GetMe gRPC-Web / native gRPC p99",
            web_get_me.latency_ms.p99 / get_me.latency_ms.p99.max(0.001),
            "ratio",
        ),
    ];
    let mut measurements = vec![direct, web_get_me];
    let mut figures = figures;
    let mut notes = vec![format!(
        "All servers share the machine's cores with the load generator; users on {}. GetMe \
         verifies the caller's token, then reads the profile from users and the sessions \
         from auth concurrently (each verifying the token again).",
        settings.database_name()
    )];
    if let Some(plain_connects) = plain_connects {
        let dir = std::env::temp_dir().join(format!("mesh-bench-tls-{}", std::process::id()));
        let tls = TestPki::new(&dir, "mesh-bench-ca");
        let (secure, me) = set_up_with(settings, "get-me-tls", Some(&tls)).await?;
        let tls_get_me = drive_get_me(
            settings,
            secure.aggregator().addr,
            &me.token,
            "GetMe, TLS everywhere",
            Some(&tls),
        )
        .await?;
        let tls_connects = new_connections(
            settings,
            secure.auth.addr,
            Some(&tls),
            "new mutual-TLS connections to auth",
        )
        .await?;
        secure.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
        figures.extend([
            Figure::at_least(
                "GetMe TLS / plaintext throughput",
                tls_get_me.per_second / get_me.per_second.max(f64::MIN_POSITIVE),
                "ratio",
                0.85,
            ),
            Figure::new(
                "GetMe TLS / plaintext p99",
                tls_get_me.latency_ms.p99 / get_me.latency_ms.p99.max(0.001),
                "ratio",
            ),
            Figure::new(
                "new mutual-TLS connections per second (handshake + one health check)",
                tls_connects.per_second,
                "1/s",
            ),
            Figure::new(
                "new TLS / new plaintext connections per second",
                tls_connects.per_second / plain_connects.per_second.max(f64::MIN_POSITIVE),
                "ratio",
            ),
        ]);
        notes.push(
            "TLS run: every server with TLS 1.3 (rustls, ring, ECDSA P-256 certificates from a \
             CA made for the run), auth and users requiring the callers' client certificates; \
             the load generator keeps its connections open, as the mesh's clients do. New \
             connections: each caller opens a connection, makes one health check on it and \
             closes it, in a loop."
                .into(),
        );
        measurements.extend([get_me, tls_get_me, plain_connects, tls_connects]);
    } else {
        measurements.push(get_me);
    }
    Ok(Outcome {
        measurements,
        figures,
        notes,
    })
}

/// New connections per second to `addr` (each makes one health check and is closed), over
/// TLS when `tls` is given.
async fn new_connections(
    settings: &Settings,
    addr: SocketAddr,
    tls: Option<&TestPki>,
    name: &str,
) -> Result<Measurement, BenchError> {
    let uri = url(addr, tls)?;
    let client = tls.map(TestPki::mesh_client).unwrap_or_default();
    let call = move |_worker: usize| {
        let endpoint = mesh_runtime::client::endpoint(uri.clone(), &client);
        async move {
            let Ok(endpoint) = endpoint else {
                return false;
            };
            let Ok(channel) = endpoint.connect().await else {
                return false;
            };
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .is_ok()
        }
    };
    Ok(drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        call,
    )
    .await
    .measurement(name))
}

/// A TCP relay to `target` that holds every chunk from the client for `delay` before passing
/// it on (in order), as a link with that one-way latency would. Answers pass straight back.
async fn latency_relay(target: SocketAddr, delay: Duration) -> Result<SocketAddr, BenchError> {
    on_servers(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(setup)?;
        let addr = listener.local_addr().map_err(setup)?;
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0
                            || tx
                                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                                .is_err()
                        {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((due, chunk)) = rx.recv().await {
                        tokio::time::sleep_until(due).await;
                        if server_write.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
            }
        });
        Ok(addr)
    })
    .await
}

/// `get-me-delay`: GetMe with both downstreams `--delay` away, against GetMe without.
pub(super) async fn get_me_delay(settings: &Settings) -> Result<Outcome, BenchError> {
    let (mesh, me) = set_up(settings, "get-me-delay").await?;
    let delay = settings.delay;
    let (auth_far, users_far) = (
        latency_relay(mesh.auth.addr, delay).await?,
        latency_relay(mesh.users().addr, delay).await?,
    );
    let far = start_aggregator(auth_far, users_far, None).await?;
    let near = drive_get_me(
        settings,
        mesh.aggregator().addr,
        &me.token,
        "GetMe, downstreams on loopback",
        None,
    )
    .await?;
    let delay_ms = delay.as_secs_f64() * 1000.0;
    let delayed = drive_get_me(
        settings,
        far.addr,
        &me.token,
        &format!("GetMe, both downstreams {delay_ms} ms away"),
        None,
    )
    .await?;
    // The relays' own cost, in the same run and with the mesh still up: two echoes at once,
    // each through a relay of the same delay, as GetMe's two reads are.
    let echo = super::echo::start().await?;
    let echoes_far = [
        latency_relay(echo.addr, delay).await?,
        latency_relay(echo.addr, delay).await?,
    ];
    let relayed_echo = super::echo::drive_echoes(
        settings,
        &echoes_far,
        format!(
            "two echoes at once, {} B, each {delay_ms} ms away (the relays alone)",
            settings.payload
        ),
    )
    .await?;
    stop(echo).await;
    stop(far).await;
    mesh.stop().await;
    // The two calls overlap, and the hop itself costs at most a millisecond.
    let goal = delay_ms + 1.0;
    let figures = vec![
        Figure::at_most(
            format!("delayed GetMe p50 (goal: {delay_ms} ms + 1 ms)"),
            delayed.latency_ms.p50,
            "ms",
            goal,
        ),
        Figure::new(
            "delayed GetMe p50 / delay",
            delayed.latency_ms.p50 / delay_ms.max(0.001),
            "ratio",
        ),
        Figure::new(
            "two echoes through such relays, p50",
            relayed_echo.latency_ms.p50,
            "ms",
        ),
        Figure::at_most(
            "delayed GetMe p50 − two relayed echoes p50 (the hop and both reads)",
            delayed.latency_ms.p50 - relayed_echo.latency_ms.p50,
            "ms",
            1.0,
        ),
    ];
    Ok(Outcome {
        measurements: vec![near, delayed, relayed_echo],
        figures,
        notes: vec![
            "The relay delays the request direction only, so one downstream call takes the \
             delay once; the aggregator's two reads run concurrently, so GetMe should too. Its \
             JWKS fetch also goes through the relay, once, in the warm-up."
                .into(),
            "The relays' own cost is measured in the same run, with the mesh still up: calls \
             of two echoes at once, each through a relay of the same delay (as GetMe's two \
             reads go through two), from the same callers. The relays' timers tick in whole \
             milliseconds."
                .into(),
        ],
    })
}

/// `get-profiles`: GetProfiles of `settings.profiles` ids per call, one caller.
pub(super) async fn get_profiles(settings: &Settings) -> Result<Outcome, BenchError> {
    let (mesh, me) = set_up(settings, "get-profiles").await?;
    let user_channels = Arc::new(channels(mesh.users().addr, settings.connections).await?);
    let population = populate(&mesh.keys, &user_channels, settings.profiles).await?;
    let ids: Arc<Vec<String>> = Arc::new(population.iter().map(|c| c.id.clone()).collect());
    let channel = channels(mesh.aggregator().addr, 1).await?.remove(0);
    let seen = Arc::new(AtomicUsize::new(0));
    let call = {
        let (ids, token, seen) = (ids.clone(), me.token.clone(), seen.clone());
        move |_: usize| {
            let mut client = AggregatorServiceClient::new(channel.clone());
            let request = bearer(
                &token,
                GetProfilesRequest {
                    user_ids: ids.to_vec(),
                },
            );
            let (seen, expected) = (seen.clone(), ids.len());
            async move {
                let Ok(reply) = client.get_profiles(request).await else {
                    return false;
                };
                let mut stream = reply.into_inner();
                let mut n = 0;
                while let Some(Ok(_)) = stream.next().await {
                    n += 1;
                }
                seen.fetch_add(n, Ordering::Relaxed);
                n == expected
            }
        }
    };
    // The warm-up's profiles are not counted.
    drive(1, settings.warmup, Duration::ZERO, call.clone()).await;
    seen.store(0, Ordering::Relaxed);
    let driven = drive(1, Duration::ZERO, settings.duration, call).await;
    let profiles_per_second = seen.load(Ordering::Relaxed) as f64 / driven.elapsed.as_secs_f64();
    mesh.stop().await;
    Ok(Outcome {
        measurements: vec![driven.measurement(format!(
            "GetProfiles of {} ids, 1 caller",
            settings.profiles
        ))],
        figures: vec![Figure::new(
            "profiles streamed per second",
            profiles_per_second,
            "/s",
        )],
        notes: vec![
            "One call is already concurrent: batches of 100 ids to BatchGetUsers, 8 in flight."
                .into(),
        ],
    })
}

/// Waits until the aggregator at `addr` reports SERVING.
pub(super) async fn wait_serving(addr: SocketAddr, timeout: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(channel) = channels(addr, 1).await {
            let status = mesh_testkit::health_status(&channel[0], mesh_aggregator::SERVICE_NAME);
            if status
                .await
                .is_ok_and(|s| s == ServingStatus::Serving as i32)
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(setup(format!(
                "the aggregator at {addr} never became SERVING"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An aggregator in a process of its own (so its RSS is its own), killed on drop.
async fn aggregator_process(
    auth: SocketAddr,
    users: SocketAddr,
    max_streams: usize,
    metrics_to: Option<SocketAddr>,
) -> Result<ServiceProcess, BenchError> {
    let addr = mesh_testkit::free_addr();
    let mut command = mesh_command([
        "aggregator".into(),
        "--listen".into(),
        addr.to_string(),
        "--auth-url".into(),
        format!("http://{auth}"),
        "--users-url".into(),
        format!("http://{users}"),
        "--max-watch-streams".into(),
        max_streams.to_string(),
        // Every subscriber has the writer's identity and this machine's address.
        "--max-watch-streams-per-caller".into(),
        max_streams.to_string(),
    ])?;
    command
        .args(super::fixtures::bench_server_args())
        .env("MESH_AGGREGATOR_CLIENT_SECRET", mesh_testkit::CLIENT_SECRET)
        .env("RUST_LOG", "warn");
    if let Some(collector) = metrics_to {
        // Metrics only, twice a second: the bench reads the relay's counters from them.
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env("OTEL_TRACES_EXPORTER", "none")
            .env("OTEL_LOGS_EXPORTER", "none")
            .env("OTEL_METRIC_EXPORT_INTERVAL", "500");
    }
    service_process(command, addr, mesh_aggregator::SERVICE_NAME).await
}

/// Sets the writer's bio to `bio`: one change in users' log, for every subscriber.
async fn change_bio(
    mut users: UserServiceClient<tonic::transport::Channel>,
    writer: Caller,
    bio: String,
) -> Result<(), BenchError> {
    users
        .update_user(bearer(
            &writer.token,
            UpdateUserRequest {
                user: Some(User {
                    id: writer.id.clone(),
                    bio,
                    ..User::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 0,
            },
        ))
        .await
        .map_err(|e| setup(format!("update: {e}")))?;
    Ok(())
}

/// The latest value of each gauge an aggregator exported.
#[derive(Debug, Clone, Default)]
struct Gauges(Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>);

impl Gauges {
    fn get(&self, name: &str) -> Option<i64> {
        self.0.lock().ok()?.get(name).copied()
    }
}

#[tonic::async_trait]
impl MetricsService for Gauges {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let gauges = request
            .into_inner()
            .resource_metrics
            .into_iter()
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics);
        for metric in gauges {
            let Some(Data::Gauge(gauge)) = metric.data else {
                continue;
            };
            if let Some(Value::AsInt(value)) = gauge.data_points.last().and_then(|p| p.value)
                && let Ok(mut latest) = self.0.lock()
            {
                latest.insert(metric.name, value);
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// An OTLP metrics receiver that keeps [`Gauges`].
async fn start_gauges(gauges: Gauges) -> Result<mesh_testkit::TestServer, BenchError> {
    super::fixtures::start_server(mesh_testkit::TestServer::start(move |listener, stopped| {
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(gauges))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stopped,
            )
    }))
    .await
}

/// The longest `watch` waits for the aggregator's RSS to settle after a round: jemalloc gives
/// pages freed in a burst back within its 10 s decay time.
const SETTLE_WAIT: Duration = Duration::from_secs(15);

/// The RSS of `pid` in KiB once it has stopped falling (no fall of 1 % or more in 2 s), or
/// after `longest`.
async fn settled_rss_kib(pid: u32, longest: Duration) -> u64 {
    let started = Instant::now();
    let mut low = mesh_testkit::proc_status_kib(pid, "VmRSS");
    let mut low_since = Instant::now();
    while started.elapsed() < longest && low_since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = mesh_testkit::proc_status_kib(pid, "VmRSS");
        if now * 100 < low * 99 {
            low = now;
            low_since = Instant::now();
        }
    }
    low
}

/// How long `watch` watches the aggregator's RSS fall once every subscriber has left.
const LEAVE_WAIT: Duration = Duration::from_secs(30);

/// gRPC-Web subscribers of the `watch` scenario's second round (each its own connection).
const WEB_SUBSCRIBERS: usize = 256;

/// `count` native and `count` gRPC-Web subscribers on the aggregator at `addr`, then `events`
/// changes by `writer`, each sent once the last has reached all of them: the time from each
/// change to each subscriber, native and gRPC-Web apart.
async fn web_fan_out(
    (addr, pid): (SocketAddr, u32),
    writer: &Caller,
    users: &UserServiceClient<tonic::transport::Channel>,
    count: usize,
    per_connection: usize,
    events: usize,
) -> Result<(Latencies, Latencies), BenchError> {
    let native = channels(addr, count.div_ceil(per_connection)).await?;
    let web = mesh_testkit::web_aggregator(addr, count);
    let request = || {
        bearer(
            &writer.token,
            WatchProfilesRequest {
                after_sequence: None,
            },
        )
    };
    let mut streams = Vec::with_capacity(2 * count);
    for i in 0..count {
        let mut client = AggregatorServiceClient::new(native[i % native.len()].clone());
        let stream = client.watch_profiles(request()).await;
        streams.push((false, stream.map_err(|e| setup(format!("watch {i}: {e}")))?));
        let stream = web.clone().watch_profiles(request()).await;
        streams.push((
            true,
            stream.map_err(|e| setup(format!("web watch {i}: {e}")))?,
        ));
    }
    let round = Round::new(events, streams.len());
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|(is_web, stream)| round.follow(stream.into_inner(), is_web))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    round
        .send("for gRPC-Web and native subscribers", pid, |k| {
            change_bio(
                users.clone(),
                writer.clone(),
                format!("change {k} for gRPC-Web and native subscribers"),
            )
        })
        .await?;
    let (mut native_latencies, mut web_latencies) = (Latencies::default(), Latencies::default());
    for task in tasks {
        if let Ok((is_web, latencies, _stream)) = task.await {
            if is_web {
                web_latencies.merge(&latencies);
            } else {
                native_latencies.merge(&latencies);
            }
        }
    }
    Ok((native_latencies, web_latencies))
}

/// `watch`: idle subscribers' memory, and the time for a change to reach all of them, each
/// beside a bare tonic broadcast to as many streams over as many connections.
pub(super) async fn watch(settings: &Settings) -> Result<Outcome, BenchError> {
    let n = settings.subscribers;
    let per_connection = settings.streams_per_connection;
    let events = settings.events;

    let (mesh, _) = set_up(settings, "watch").await?;
    let user_channels = Arc::new(channels(mesh.users().addr, 1).await?);
    let writer: Caller = populate(&mesh.keys, &user_channels, 1).await?[0].clone();
    let users = UserServiceClient::new(user_channels[0].clone());
    // The bare broadcast carries messages of the size of the writer's events.
    let event_bytes = {
        let user = users
            .clone()
            .get_user(bearer(
                &writer.token,
                GetUserRequest {
                    id: writer.id.clone(),
                },
            ))
            .await
            .map_err(|e| setup(format!("get user: {e}")))?
            .into_inner();
        prost::Message::encoded_len(&ProfileEvent {
            sequence: 1_000_000,
            kind: 2,
            profile: Some(mesh_proto::aggregator::v1::Profile {
                user_id: user.id,
                display_name: user.display_name,
                bio: "change 0 for everyone".into(),
                email: String::new(),
                create_time: user.create_time,
                update_time: user.update_time,
                version: user.version,
            }),
            occur_time: user.update_time,
        })
    };
    let bare = echo::bare_fan_out(n, per_connection, events, event_bytes).await?;
    let latest = Gauges::default();
    let gauges = start_gauges(latest.clone()).await?;

    // Room for the second round (gRPC-Web beside native) while the first one's streams close.
    let web_n = n.min(WEB_SUBSCRIBERS);
    let mut aggregator = aggregator_process(
        mesh.auth.addr,
        mesh.users().addr,
        n + 1 + 2 * web_n,
        Some(gauges.addr),
    )
    .await?;
    let (pid, addr) = (aggregator.pid(), aggregator.addr);
    let rss_idle_kib = mesh_testkit::proc_status_kib(pid, "VmRSS");

    let connections = channels(addr, n.div_ceil(per_connection)).await?;
    let token = writer.token.clone();
    let subscribe = |i: usize| {
        let mut client = AggregatorServiceClient::new(connections[i % connections.len()].clone());
        let request = bearer(
            &token,
            WatchProfilesRequest {
                after_sequence: None,
            },
        );
        async move { client.watch_profiles(request).await }
    };
    // The relay connects in the background: retry the first subscription until it is live.
    let first = loop {
        match subscribe(0).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(setup(format!("watch: {status}"))),
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before_kib = mesh_testkit::proc_status_kib(pid, "VmRSS");

    let round = Round::new(events, n);
    let mut streams = vec![first];
    for i in 1..n {
        let stream = subscribe(i)
            .await
            .map_err(|e| setup(format!("watch {i}: {e}")))?
            .into_inner();
        streams.push(stream);
    }
    let subscribers: Vec<_> = streams
        .into_iter()
        .map(|stream| round.follow(stream, ()))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kib = mesh_testkit::proc_status_kib(pid, "VmRSS");

    let cpu = round
        .send("for everyone", pid, |k| {
            change_bio(
                users.clone(),
                writer.clone(),
                format!("change {k} for everyone"),
            )
        })
        .await?;
    // Once every stream has sent something, its buffers exist: what a subscriber costs that
    // has had events and waits for the next, once what the round freed has gone back.
    let rss_live_kib = settled_rss_kib(pid, SETTLE_WAIT).await;
    // The relay's counters, from an export made after the round (at least 2 s have passed).
    let from_ring = latest.get("mesh.aggregator.watch_events_from_ring");
    let from_log = latest.get("mesh.aggregator.watch_events_from_log");
    let mut fan_out = Latencies::default();
    let mut open = Vec::with_capacity(n);
    for subscriber in subscribers {
        if let Ok(((), latencies, stream)) = subscriber.await {
            fan_out.merge(&latencies);
            open.push(stream);
        }
    }
    // Every subscriber gone: what the aggregator gives back once its allocator's decay time
    // (jemalloc's 10 s for unused dirty pages) has passed.
    drop(open);
    drop(connections);
    let left = Instant::now();
    let mut rss_left_kib = mesh_testkit::proc_status_kib(pid, "VmRSS");
    while left.elapsed() < LEAVE_WAIT && rss_left_kib > 2 * rss_idle_kib {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_left_kib = mesh_testkit::proc_status_kib(pid, "VmRSS");
    }
    let left_after = left.elapsed();
    // gRPC-Web beside native gRPC: the same count of each, the same changes.
    let (native_small, web_small) =
        web_fan_out((addr, pid), &writer, &users, web_n, per_connection, events).await?;
    let _ = aggregator.child.kill().await;
    stop(gauges).await;
    mesh.stop().await;

    let per_subscriber = rss_after_kib.saturating_sub(rss_before_kib) as f64 * 1024.0 / n as f64;
    let per_live_subscriber =
        rss_live_kib.saturating_sub(rss_before_kib) as f64 * 1024.0 / n as f64;
    let delivery = Measurement::new(
        format!("one change to each of {n} subscribers (UpdateUser sent → received)"),
        &fan_out,
        0,
        Duration::ZERO,
    );
    let bare_delivery = Measurement::new(
        format!("bare tonic broadcast to each of {n} streams (Publish sent → received)"),
        &bare.latencies,
        0,
        Duration::ZERO,
    );
    let native_small = Measurement::new(
        format!("one change to each of {web_n} native gRPC subscribers, beside gRPC-Web"),
        &native_small,
        0,
        Duration::ZERO,
    );
    let web_small = Measurement::new(
        format!("one change to each of {web_n} gRPC-Web subscribers (HTTP/1.1)"),
        &web_small,
        0,
        Duration::ZERO,
    );
    let p99_goal = if n >= 100_000 { 1000.0 } else { 60.0 };
    let ratio_goal = if n >= 100_000 { 1.5 } else { 1.3 };
    let figures = vec![
        Figure::at_most(
            "change to all subscribers, p99",
            delivery.latency_ms.p99,
            "ms",
            p99_goal,
        ),
        Figure::new(
            "bare tonic broadcast to as many streams, p99",
            bare_delivery.latency_ms.p99,
            "ms",
        ),
        Figure::at_most(
            "change to all, WatchProfiles / bare broadcast, p99",
            delivery.latency_ms.p99 / bare_delivery.latency_ms.p99.max(0.001),
            "ratio",
            ratio_goal,
        ),
        Figure::new(
            "change to all subscribers, slowest",
            delivery.latency_ms.max,
            "ms",
        ),
        Figure::new(
            "aggregator CPU while the changes went out",
            cpu.server_cores(),
            "cores",
        ),
        Figure::new(
            "load generator CPU while the changes went out",
            cpu.load_cores(),
            "cores",
        ),
        Figure::new(
            "echo server CPU while the bare broadcast went out",
            bare.cpu.server_cores(),
            "cores",
        ),
        Figure::new(
            "load generator CPU while the bare broadcast went out",
            bare.cpu.load_cores(),
            "cores",
        ),
        Figure::new(
            "events sent from the relay's ring",
            from_ring.map_or(f64::NAN, |v| v as f64),
            "events",
        ),
        Figure::new(
            "events sent from users' log (catch-up)",
            from_log.map_or(f64::NAN, |v| v as f64),
            "events",
        ),
        Figure::new(
            "aggregator write calls per change",
            cpu.server_writes as f64 / events as f64,
            "calls",
        ),
        Figure::new(
            "echo server write calls per broadcast message",
            bare.cpu.server_writes as f64 / events as f64,
            "calls",
        ),
        Figure::at_most(
            "aggregator RSS per WatchProfiles subscriber",
            per_live_subscriber,
            "bytes",
            4096.0,
        ),
        Figure::new(
            "aggregator RSS per subscriber before any event",
            per_subscriber,
            "bytes",
        ),
        Figure::new(
            "bare tonic server stream, RSS per stream",
            bare.bytes_per_stream,
            "bytes",
        ),
        Figure::new(
            "WatchProfiles subscriber / bare stream",
            per_live_subscriber / bare.bytes_per_stream.max(1.0),
            "ratio",
        ),
        Figure::at_most(
            "aggregator RSS after every subscriber left / idle",
            rss_left_kib as f64 / rss_idle_kib.max(1) as f64,
            "ratio",
            2.0,
        ),
        Figure::new(
            "change to all, gRPC-Web / native gRPC subscribers, p99",
            web_small.latency_ms.p99 / native_small.latency_ms.p99.max(0.001),
            "ratio",
        ),
    ];
    Ok(Outcome {
        measurements: vec![delivery, bare_delivery, native_small, web_small],
        figures,
        notes: vec![format!(
            "{n} subscribers over {} connections ({per_connection} per connection); aggregator \
             RSS {rss_idle_kib} KiB idle, {rss_before_kib} KiB with one subscriber, \
             {rss_after_kib} KiB with all before any event, {rss_live_kib} KiB once the changes \
             had reached them all (and it had stopped falling), {rss_left_kib} KiB {:.1} s after they all left (read every \
             0.5 s until at most twice the idle RSS, for {} s at most). The bare \
             broadcast is the echo server in its own process: as many Subscribe streams over \
             as many connections, each 1 + {events} messages of {event_bytes} B (the size of the \
             WatchProfiles events) from one tokio broadcast channel, each sent after the last \
             reached everyone, as the changes are. CPU figures are each process's user + \
             system time over the round's wall time ({:.2} s for WatchProfiles, {:.2} s for the \
             bare broadcast); the load generator (this process) decodes every message on the \
             same cores. Each message reached the last subscriber after {} (WatchProfiles) and \
             {} (bare broadcast). Then {web_n} gRPC-Web subscribers (a connection each, as browsers \
             have) and {web_n} native ones beside them got 1 + {events} more changes.",
            n.div_ceil(per_connection),
            left_after.as_secs_f64(),
            LEAVE_WAIT.as_secs(),
            cpu.wall_s,
            bare.cpu.wall_s,
            cpu.all_in(),
            bare.cpu.all_in(),
        )],
    })
}

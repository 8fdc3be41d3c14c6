//! Scenario `abuse`: each attack class of the abuse suite, run for `--duration` against a real
//! mesh (three processes, the production defaults) while a well-behaved client on another
//! address calls Login and GetMe; the client's success rate and p99 during each attack beside
//! the same client with no attack, and each process's peak RSS against its pod's memory limit.
//!
//! The attacker is this machine at `127.0.0.1`; the well-behaved client connects from
//! `127.0.0.2` (another machine, as far as per-address bounds can tell).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use mesh_proto::{
    aggregator::v1::{
        GetMeRequest, GetProfilesRequest, LoginRequest, SignUpRequest, WatchProfilesRequest,
        aggregator_service_client::AggregatorServiceClient,
    },
    service_names,
};
use mesh_testkit::{CLIENT_SECRET, ServiceProcess, auth_args, free_addr, users_args};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{
    BenchError, Outcome, Settings,
    fixtures::{mesh_command, service_process},
    measure::{Driven, drive},
    report::Figure,
};

/// Where the well-behaved client connects from.
const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// The password of the bench's accounts.
const PASSWORD: &str = "benchmark password";
/// The memory limits of the pods in `deploy/k8s/base`, in KiB.
const POD_LIMITS_KIB: [(&str, u64); 3] = [
    ("auth", 256 * 1024),
    ("users", 256 * 1024),
    ("aggregator", 512 * 1024),
];

/// The attack classes, in the order they run.
const ATTACKS: [&str; 7] = [
    "login-flood",
    "throttle-race",
    "huge-requests",
    "slowloris",
    "watch-flood",
    "unread-get-profiles",
    "silent-connections",
];

fn setup(err: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(err.to_string())
}

/// `mesh <args>` with the production defaults, quiet, as the kit's [`ServiceProcess`], once
/// its service `name` reports SERVING.
async fn spawn(
    args: Vec<String>,
    addr: SocketAddr,
    name: &str,
) -> Result<ServiceProcess, BenchError> {
    let mut command = mesh_command(args)?;
    command
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    service_process(command, addr, name).await
}

/// A channel to `addr` from the source address `from` (`None`: any).
async fn channel(addr: SocketAddr, from: Option<IpAddr>) -> Result<Channel, BenchError> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(setup)?
        .tcp_nodelay(true)
        .local_address(from)
        .connect()
        .await
        .map_err(|e| setup(format!("connect to {addr}: {e}")))
}

/// The peak RSS (KiB) of each process while `until` has not fired, sampled every 50 ms.
async fn sample_rss(
    pids: Vec<(&'static str, u32)>,
    until: CancellationToken,
) -> Vec<(&'static str, u64)> {
    let mut peaks: Vec<(&'static str, u64)> = pids.iter().map(|(n, _)| (*n, 0)).collect();
    loop {
        for ((_, pid), (_, peak)) in pids.iter().zip(peaks.iter_mut()) {
            *peak = (*peak).max(mesh_testkit::proc_status_kib(*pid, "VmRSS"));
        }
        tokio::select! {
            () = until.cancelled() => return peaks,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Runs `attack` until `stop` fires.
async fn attack(
    name: &str,
    aggregator: SocketAddr,
    attacker_token: String,
    stop: CancellationToken,
) -> Result<u64, BenchError> {
    let sent = Arc::new(AtomicU64::new(0));
    let client = AggregatorServiceClient::new(channel(aggregator, None).await?)
        .max_encoding_message_size(8 * 1024 * 1024);
    let mut tasks = Vec::new();
    let until = CancellationToken::clone;
    match name {
        "login-flood" => {
            for worker in 0..32u64 {
                let (mut client, stop, sent) = (client.clone(), until(&stop), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.is_cancelled() {
                        n += 1;
                        let _ = client
                            .login(LoginRequest {
                                email: format!("made-up-{worker}-{n}@example.com"),
                                password: "wrong password".into(),
                            })
                            .await;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        "throttle-race" => {
            for _ in 0..40 {
                let (mut client, stop, sent) = (client.clone(), until(&stop), sent.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let _ = client
                            .login(LoginRequest {
                                email: "victim@example.com".into(),
                                password: "wrong password".into(),
                            })
                            .await;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        "huge-requests" => {
            let huge_email = Arc::new(format!("{}@example.com", "a".repeat(4_000_000)));
            let huge_ids: Arc<Vec<String>> =
                Arc::new((0..10_000).map(|n| format!("{n:0>400}")).collect());
            for worker in 0..10 {
                let (mut client, stop, sent) = (client.clone(), until(&stop), sent.clone());
                let (email, ids, token) =
                    (huge_email.clone(), huge_ids.clone(), attacker_token.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        if worker % 2 == 0 {
                            let _ = client
                                .login(LoginRequest {
                                    email: email.as_ref().clone(),
                                    password: "x".repeat(8),
                                })
                                .await;
                        } else {
                            let _ = client
                                .get_profiles(mesh_authn::bearer_request(
                                    &token,
                                    GetProfilesRequest {
                                        user_ids: ids.as_ref().clone(),
                                    },
                                ))
                                .await;
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        "slowloris" => {
            for _ in 0..64 {
                let (stop, sent) = (until(&stop), sent.clone());
                tasks.push(tokio::spawn(async move {
                    let Ok(tcp) = tokio::net::TcpStream::connect(aggregator).await else {
                        return;
                    };
                    let Ok((mut send, connection)) = h2::client::handshake(tcp).await else {
                        return;
                    };
                    tokio::spawn(connection);
                    let mut open = futures_util::stream::FuturesUnordered::new();
                    while !stop.is_cancelled() {
                        // Keep every stream slot busy with headers and no body.
                        while open.len() < 100 {
                            let Ok(ready) = send.clone().ready().await else {
                                return;
                            };
                            send = ready;
                            let request = http::Request::post(format!(
                                "http://{aggregator}/mesh.aggregator.v1.AggregatorService/Login"
                            ))
                            .header("content-type", "application/grpc")
                            .header("te", "trailers")
                            .body(())
                            .unwrap_or_default();
                            let Ok((response, body)) = send.send_request(request, false) else {
                                return;
                            };
                            sent.fetch_add(1, Ordering::Relaxed);
                            open.push(async move {
                                let _body = body;
                                let _ = response.await;
                            });
                        }
                        tokio::select! {
                            () = stop.cancelled() => return,
                            _ = open.next() => {}
                        }
                    }
                }));
            }
        }
        "watch-flood" => {
            let mut channels = Vec::new();
            for _ in 0..25 {
                channels.push(channel(aggregator, None).await?);
            }
            let (stop, sent, token) = (until(&stop), sent.clone(), attacker_token.clone());
            tasks.push(tokio::spawn(async move {
                let mut held = Vec::new();
                for n in 0..2_000 {
                    if stop.is_cancelled() {
                        break;
                    }
                    let mut client = AggregatorServiceClient::new(channels[n % 25].clone());
                    if let Ok(stream) = client
                        .watch_profiles(mesh_authn::bearer_request(
                            &token,
                            WatchProfilesRequest {
                                after_sequence: Some(0),
                            },
                        ))
                        .await
                    {
                        held.push(stream);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                stop.cancelled().await;
                drop(held);
            }));
        }
        "unread-get-profiles" => {
            let ids: Arc<Vec<String>> =
                Arc::new((0..10_000).map(|n| format!("bad-{n:0>40}")).collect());
            let (mut client, stop, sent, token) = (
                client.clone(),
                until(&stop),
                sent.clone(),
                attacker_token.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut held = std::collections::VecDeque::new();
                while !stop.is_cancelled() {
                    if let Ok(stream) = client
                        .get_profiles(mesh_authn::bearer_request(
                            &token,
                            GetProfilesRequest {
                                user_ids: ids.as_ref().clone(),
                            },
                        ))
                        .await
                    {
                        held.push_back(stream);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    if held.len() > 40 {
                        held.pop_front();
                    }
                }
            }));
        }
        "silent-connections" => {
            for _ in 0..64 {
                let (stop, sent) = (until(&stop), sent.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let Ok(mut tcp) = tokio::net::TcpStream::connect(aggregator).await else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        sent.fetch_add(1, Ordering::Relaxed);
                        let mut byte = [0u8; 1];
                        // Held until the server closes it (or the attack ends).
                        tokio::select! {
                            () = stop.cancelled() => return,
                            _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut byte) => {}
                        }
                    }
                }));
            }
        }
        other => return Err(setup(format!("unknown attack {other}"))),
    }
    stop.cancelled().await;
    for task in tasks {
        task.abort();
    }
    Ok(sent.load(Ordering::Relaxed))
}

/// The well-behaved client for `duration`: two callers logging in (their own account: each
/// login is a session, and an account keeps 50), two calling GetMe.
async fn honest(
    login: &AggregatorServiceClient<Channel>,
    token: &str,
    duration: Duration,
) -> (Driven, Driven) {
    let login_client = login.clone();
    let logins = drive(2, Duration::ZERO, duration, move |_| {
        let mut client = login_client.clone();
        async move {
            let mut request = tonic::Request::new(LoginRequest {
                email: "honest-login@example.com".into(),
                password: PASSWORD.into(),
            });
            request.set_timeout(Duration::from_secs(10));
            client.login(request).await.is_ok()
        }
    });
    let me_client = login.clone();
    let token = token.to_owned();
    let get_me = drive(2, Duration::ZERO, duration, move |_| {
        let (mut client, token) = (me_client.clone(), token.clone());
        async move {
            let mut request = mesh_authn::bearer_request(&token, GetMeRequest {});
            request.set_timeout(Duration::from_secs(10));
            client.get_me(request).await.is_ok()
        }
    });
    tokio::join!(logins, get_me)
}

fn success_rate(driven: &Driven) -> f64 {
    let total = driven.latencies.len() + driven.errors;
    if total == 0 {
        0.0
    } else {
        driven.latencies.len() as f64 / total as f64
    }
}

/// `abuse`: every attack class against a real mesh, the well-behaved client beside it.
pub(super) async fn abuse(settings: &Settings) -> Result<Outcome, BenchError> {
    let data = std::env::temp_dir().join(format!("mesh-bench-abuse-{}", std::process::id()));
    let (auth_addr, users_addr, aggregator_addr) = (free_addr(), free_addr(), free_addr());
    let auth = spawn(auth_args(auth_addr, &data), auth_addr, service_names::AUTH).await?;
    let users = spawn(
        users_args(users_addr, &data, auth_addr),
        users_addr,
        service_names::USERS,
    )
    .await?;
    // Not the kit's `aggregator_args`, whose dependency checks every 200 ms are for tests.
    let aggregator = spawn(
        vec![
            "aggregator".into(),
            "--listen".into(),
            aggregator_addr.to_string(),
            "--auth-url".into(),
            format!("http://{auth_addr}"),
            "--users-url".into(),
            format!("http://{users_addr}"),
            "--client-secret".into(),
            CLIENT_SECRET.into(),
        ],
        aggregator_addr,
        service_names::AGGREGATOR,
    )
    .await?;
    let pids: Vec<(&'static str, u32)> = vec![
        ("auth", auth.pid()),
        ("users", users.pid()),
        ("aggregator", aggregator.pid()),
    ];

    let honest_client = AggregatorServiceClient::new(channel(aggregator.addr, Some(HONEST)).await?);
    let sign_up = |client: &AggregatorServiceClient<Channel>, email: &'static str| {
        let mut client = client.clone();
        async move {
            client
                .sign_up(SignUpRequest {
                    email: email.into(),
                    password: PASSWORD.into(),
                    display_name: "Bench".into(),
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .tokens
                        .map(|t| t.access_token)
                        .unwrap_or_default()
                })
                .map_err(|e| setup(format!("sign up {email}: {e}")))
        }
    };
    let honest_token = sign_up(&honest_client, "honest@example.com").await?;
    sign_up(&honest_client, "honest-login@example.com").await?;
    let attacker_client = AggregatorServiceClient::new(channel(aggregator.addr, None).await?);
    let attacker_token = sign_up(&attacker_client, "attacker@example.com").await?;
    sign_up(&attacker_client, "victim@example.com").await?;

    let mut outcome = Outcome::default();
    let mut baseline: Option<(f64, f64)> = None;
    for name in std::iter::once("none").chain(ATTACKS) {
        let stop = CancellationToken::new();
        let sampler = tokio::spawn(sample_rss(pids.clone(), stop.clone()));
        let attacking = (name != "none").then(|| {
            tokio::spawn(attack(
                name,
                aggregator.addr,
                attacker_token.clone(),
                stop.clone(),
            ))
        });
        // Let the attack reach its full strength before the client is measured.
        if attacking.is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let started = Instant::now();
        let (logins, get_me) = honest(&honest_client, &honest_token, settings.duration).await;
        let measured = started.elapsed();
        stop.cancel();
        let sent = match attacking {
            Some(task) => task.await.map_err(setup)??,
            None => 0,
        };
        let peaks = sampler.await.map_err(setup)?;
        outcome
            .measurements
            .push(logins.measurement(format!("Login during {name}")));
        outcome
            .measurements
            .push(get_me.measurement(format!("GetMe during {name}")));
        let (login_p99, me_p99) = (
            logins.latencies.percentile_ms(99.0),
            get_me.latencies.percentile_ms(99.0),
        );
        let calls = logins.latencies.len() + get_me.latencies.len();
        let failed = logins.errors + get_me.errors;
        let success = if calls + failed == 0 {
            0.0
        } else {
            calls as f64 / (calls + failed) as f64
        };
        match baseline {
            None => {
                baseline = Some((login_p99.max(0.001), me_p99.max(0.001)));
                outcome.figures.push(Figure::new(
                    "well-behaved success, no attack",
                    success * 100.0,
                    "%",
                ));
            }
            Some((login_base, me_base)) => {
                outcome.figures.push(Figure::at_least(
                    format!("well-behaved success during {name}"),
                    success * 100.0,
                    "%",
                    99.0,
                ));
                outcome.figures.push(Figure::at_most(
                    format!("Login p99 during {name} ÷ no attack"),
                    login_p99 / login_base,
                    "ratio",
                    2.0,
                ));
                outcome.figures.push(Figure::at_most(
                    format!("GetMe p99 during {name} ÷ no attack"),
                    me_p99 / me_base,
                    "ratio",
                    2.0,
                ));
                outcome.notes.push(format!(
                    "{name}: the attacker sent {sent} requests/connections in {:.1} s; \
                     well-behaved: {} Login ({:.1} % ok), {} GetMe ({:.1} % ok)",
                    measured.as_secs_f64() + 1.0,
                    logins.latencies.len(),
                    success_rate(&logins) * 100.0,
                    get_me.latencies.len(),
                    success_rate(&get_me) * 100.0,
                ));
            }
        }
        for (process, peak) in peaks {
            let limit = POD_LIMITS_KIB
                .iter()
                .find(|(n, _)| *n == process)
                .map_or(u64::MAX, |(_, l)| *l);
            outcome.figures.push(Figure::at_most(
                format!("{process} peak RSS during {name}"),
                peak as f64 / 1024.0,
                "MiB",
                limit as f64 / 1024.0,
            ));
        }
        // Let connections and streams of one attack wind down, and the allocator give their
        // memory back (jemalloc's decay is 10 s), before the next.
        tokio::time::sleep(settings.duration.min(Duration::from_secs(12))).await;
    }
    outcome.notes.push(
        "The attacker connects from 127.0.0.1 and the well-behaved client from 127.0.0.2: \
         per-address bounds (failed logins, connections, request bytes) hold the attacker \
         only. The per-address failed-login window (15 min) stays closed for the attacker \
         after login-flood, so later attacks that log in are refused at once."
            .into(),
    );
    drop((auth, users, aggregator));
    let _ = std::fs::remove_dir_all(&data);
    Ok(outcome)
}

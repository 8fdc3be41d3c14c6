//! Scenario `aggregator`: auth and users in-process on loopback (users on SQLite), 10,000
//! profiles, and in one run:
//!
//! - users' `GetUser` directly against `GetMe` through the aggregator (profile and sessions
//!   joined), with 1 and with 4 connections to each downstream;
//! - `GetMe` when both downstreams are `--delay` away (a latency-injecting TCP relay in front of
//!   each): concurrent calls take about the delay, sequential ones twice it;
//! - `GetProfiles` of 10,000 ids;
//! - `WatchProfiles` with `--subscribers` streams against an aggregator in its own process:
//!   its RSS per subscriber, and the time for one change to reach every subscriber.
//!
//! Prints a table and writes `<results>/aggregator.json`.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_authn::AuthnConfig;
use mesh_proto::{
    aggregator::v1::{
        GetMeRequest, GetProfilesRequest, SignUpRequest, WatchProfilesRequest,
        aggregator_service_client::AggregatorServiceClient,
    },
    users::v1::{GetUserRequest, UpdateUserRequest, User, user_service_client::UserServiceClient},
};
use mesh_token::KeyRing;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
};
use tokio_stream::StreamExt as _;

use super::{
    BenchArgs, BenchError, Summary, channels, drive,
    fixtures::{Running, bearer, loopback, populate, setup, start_auth, start_users},
    json, summarize,
};

/// Profiles created before measuring, and ids per `GetProfiles` call.
const POPULATION: usize = 10_000;
/// The aggregator's client secret for this run.
const CLIENT_SECRET: &str = "mesh-bench-aggregator";

async fn start_aggregator(
    auth: SocketAddr,
    users: SocketAddr,
    connections: u16,
) -> Result<Running, BenchError> {
    let (listener, addr) = loopback().await?;
    let authn = AuthnConfig::new(format!("http://{auth}").parse().map_err(setup)?);
    let mut config = mesh_aggregator::Config::new(
        addr,
        authn,
        format!("http://{users}").parse().map_err(setup)?,
    );
    config.downstream_connections = connections;
    config.client_secret = Some(CLIENT_SECRET.into());
    Running::spawn(addr, move |stopped| async move {
        mesh_aggregator::serve(&config, listener, stopped)
            .await
            .map_err(|e| e.to_string())
    })
}

/// A TCP relay to `target` that holds every chunk from the client for `delay` before passing
/// it on (in order), as a link with that one-way latency would. Answers pass straight back.
async fn latency_relay(target: SocketAddr, delay: Duration) -> Result<SocketAddr, BenchError> {
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
}

/// The resident set size of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn wait_serving(addr: SocketAddr, timeout: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(setup)?
            .connect()
            .await;
        if let Ok(channel) = channel {
            let reply = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: mesh_aggregator::SERVICE_NAME.into(),
                })
                .await;
            if reply.is_ok_and(|r| r.get_ref().status == 1) {
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

/// The watch measurement's figures.
struct WatchFigures {
    subscribers: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    fan_out: Duration,
}

/// `n` WatchProfiles subscribers against an aggregator in its own process; its RSS before and
/// after, and how long one change takes to reach them all.
async fn watch(
    n: usize,
    auth: SocketAddr,
    users: SocketAddr,
    writer: (String, String),
) -> Result<WatchFigures, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(setup)?;
    let addr = listener.local_addr().map_err(setup)?;
    drop(listener);
    let exe = std::env::current_exe().map_err(setup)?;
    let mut child = tokio::process::Command::new(exe)
        .arg("aggregator")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--auth-url")
        .arg(format!("http://{auth}"))
        .arg("--users-url")
        .arg(format!("http://{users}"))
        .env("MESH_AGGREGATOR_CLIENT_SECRET", CLIENT_SECRET)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(setup)?;
    let pid = child
        .id()
        .ok_or_else(|| setup("the aggregator exited at once"))?;
    wait_serving(addr, Duration::from_secs(30)).await?;

    let (user_id, token) = writer;
    // 100 streams per connection.
    let connections = channels(addr, n.div_ceil(100)).await?;
    // The relay connects in the background: retry the first subscription until it is live.
    let mut first = AggregatorServiceClient::new(connections[0].clone());
    let first_stream = loop {
        match first
            .watch_profiles(bearer(
                &token,
                WatchProfilesRequest {
                    after_sequence: None,
                },
            ))
            .await
        {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(setup(format!("watch: {status}"))),
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before_kib = rss_kib(pid).unwrap_or(0);

    let received = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(Notify::new());
    let mut streams = vec![first_stream];
    for i in 1..n {
        let mut client = AggregatorServiceClient::new(connections[i % connections.len()].clone());
        let stream = client
            .watch_profiles(bearer(
                &token,
                WatchProfilesRequest {
                    after_sequence: None,
                },
            ))
            .await
            .map_err(|e| setup(format!("watch {i}: {e}")))?
            .into_inner();
        streams.push(stream);
    }
    for mut stream in streams {
        let (received, all_in) = (received.clone(), all_in.clone());
        tokio::spawn(async move {
            if let Some(Ok(_)) = stream.next().await
                && received.fetch_add(1, Ordering::SeqCst) + 1 == n
            {
                all_in.notify_one();
            }
            // Keep the stream open until the measurement ends.
            let _ = stream.next().await;
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kib = rss_kib(pid).unwrap_or(0);

    let users_channel = channels(users, 1).await?;
    let begun = Instant::now();
    UserServiceClient::new(users_channel[0].clone())
        .update_user(bearer(
            &token,
            UpdateUserRequest {
                user: Some(User {
                    id: user_id,
                    bio: "one change for everyone".into(),
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
    tokio::time::timeout(Duration::from_secs(60), all_in.notified())
        .await
        .map_err(|_| {
            setup(format!(
                "only {} of {n} subscribers got the change within 60 s",
                received.load(Ordering::SeqCst)
            ))
        })?;
    let fan_out = begun.elapsed();
    let _ = child.kill().await;
    Ok(WatchFigures {
        subscribers: n,
        rss_before_kib,
        rss_after_kib,
        fan_out,
    })
}

pub(super) async fn aggregator(args: BenchArgs) -> Result<(), BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let warmup = args.duration / 10;
    let data = std::env::temp_dir().join(format!("mesh-bench-aggregator-{}", std::process::id()));
    let (ring, _) = KeyRing::load_or_create_dev_key(&data.join("auth").join("dev-signing-key.pem"))
        .map_err(setup)?;
    let clients = vec![
        format!("aggregator=plain:{CLIENT_SECRET}")
            .parse()
            .map_err(|e: String| setup(e))?,
    ];
    let auth = start_auth(&data, clients).await?;
    let users = start_users(&data, auth.addr, args.database_url.clone()).await?;
    let user_channels = Arc::new(channels(users.addr, args.connections).await?);
    let population = populate(&ring, &user_channels, POPULATION).await?;
    let aggregator_4 = start_aggregator(auth.addr, users.addr, 4).await?;
    let aggregator_1 = start_aggregator(auth.addr, users.addr, 1).await?;
    let delay = args.delay;
    let (auth_far, users_far) = (
        latency_relay(auth.addr, delay).await?,
        latency_relay(users.addr, delay).await?,
    );
    let aggregator_far = start_aggregator(auth_far, users_far, 4).await?;
    for a in [&aggregator_4, &aggregator_1, &aggregator_far] {
        wait_serving(a.addr, Duration::from_secs(30)).await?;
    }

    // One real account (GetMe lists its live sessions).
    let signed_up = AggregatorServiceClient::new(channels(aggregator_4.addr, 1).await?.remove(0))
        .sign_up(SignUpRequest {
            email: "bench@example.com".into(),
            password: "benchmark password".into(),
            display_name: "Bench".into(),
        })
        .await
        .map_err(|e| setup(format!("sign up: {e}")))?
        .into_inner();
    let me_id = signed_up.profile.map(|p| p.user_id).unwrap_or_default();
    let me_token = signed_up
        .tokens
        .map(|t| t.access_token)
        .ok_or_else(|| setup("no tokens"))?;

    // Users' GetUser directly: the floor of one profile read.
    let get_user = {
        let (channels, token, id) = (user_channels.clone(), me_token.clone(), me_id.clone());
        move |worker: usize| {
            let mut client = UserServiceClient::new(channels[worker % channels.len()].clone());
            let request = bearer(&token, GetUserRequest { id: id.clone() });
            async move { client.get_user(request).await.is_ok() }
        }
    };
    drive(args.concurrency, warmup, get_user.clone()).await;
    let (latencies, elapsed) = drive(args.concurrency, args.duration, get_user).await;
    let direct = summarize(latencies, elapsed);

    let mut get_me = Vec::new();
    for (label, server) in [
        ("GetMe, 4 connections per downstream", &aggregator_4),
        ("GetMe, 1 connection per downstream", &aggregator_1),
    ] {
        let agg_channels = Arc::new(channels(server.addr, args.connections).await?);
        let call = {
            let token = me_token.clone();
            move |worker: usize| {
                let mut client =
                    AggregatorServiceClient::new(agg_channels[worker % agg_channels.len()].clone());
                let request = bearer(&token, GetMeRequest {});
                async move { client.get_me(request).await.is_ok() }
            }
        };
        drive(args.concurrency, warmup, call.clone()).await;
        let (latencies, elapsed) = drive(args.concurrency, args.duration, call).await;
        get_me.push((label, summarize(latencies, elapsed)));
    }

    // GetMe with both downstreams `delay` away, one caller at a time.
    let far_channels = Arc::new(channels(aggregator_far.addr, 1).await?);
    let far_call = {
        let token = me_token.clone();
        move |_: usize| {
            let mut client = AggregatorServiceClient::new(far_channels[0].clone());
            let request = bearer(&token, GetMeRequest {});
            async move { client.get_me(request).await.is_ok() }
        }
    };
    drive(1, warmup.max(Duration::from_millis(500)), far_call.clone()).await;
    let (latencies, elapsed) = drive(1, args.duration.min(Duration::from_secs(5)), far_call).await;
    let delayed = summarize(latencies, elapsed);

    // GetProfiles of all 10,000 ids, one caller.
    let ids: Arc<Vec<String>> = Arc::new(population.iter().map(|c| c.id.clone()).collect());
    let profile_channels = Arc::new(channels(aggregator_4.addr, 1).await?);
    let profiles_seen = Arc::new(AtomicUsize::new(0));
    let profiles_call = {
        let (ids, token, seen) = (ids.clone(), me_token.clone(), profiles_seen.clone());
        move |_: usize| {
            let mut client = AggregatorServiceClient::new(profile_channels[0].clone());
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
    drive(1, warmup, profiles_call.clone()).await;
    profiles_seen.store(0, Ordering::Relaxed);
    let (latencies, elapsed) = drive(1, args.duration, profiles_call).await;
    let profiles = summarize(latencies, elapsed);
    let profiles_per_second = profiles_seen.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64();

    let watch = watch(
        args.subscribers,
        auth.addr,
        users.addr,
        (population[0].id.clone(), population[0].token.clone()),
    )
    .await?;

    for server in [aggregator_far, aggregator_1, aggregator_4, users, auth] {
        server.stop().await;
    }
    let _ = std::fs::remove_dir_all(&data);

    let row = |label: &str, s: &Summary| {
        println!(
            "| {label} | {:.0} | {:.3} | {:.3} |",
            s.per_second, s.p50_ms, s.p99_ms
        );
    };
    println!(
        "\nmesh bench aggregator — {cores} cores, {} callers over {} connections, {:?} each, \
         {POPULATION} profiles on SQLite\n",
        args.concurrency, args.connections, args.duration
    );
    println!("| measurement | per second | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: |");
    row("users GetUser, direct", &direct);
    for (label, s) in &get_me {
        row(label, s);
    }
    row(
        &format!(
            "GetMe, both downstreams {} ms away, 1 caller",
            delay.as_millis()
        ),
        &delayed,
    );
    row("GetProfiles of 10,000 ids, 1 caller", &profiles);
    let per_subscriber = (watch.rss_after_kib.saturating_sub(watch.rss_before_kib)) as f64 * 1024.0
        / watch.subscribers as f64;
    println!(
        "\nGetMe / direct GetUser throughput: {:.2}; GetMe p50 with {} ms downstreams: {:.1} ms \
         ({:.2} × the delay)",
        get_me[0].1.per_second / direct.per_second,
        delay.as_millis(),
        delayed.p50_ms,
        delayed.p50_ms / (delay.as_secs_f64() * 1000.0)
    );
    println!("GetProfiles: {profiles_per_second:.0} profiles/s");
    println!(
        "WatchProfiles: {} subscribers; aggregator RSS {} → {} KiB ({per_subscriber:.0} bytes per \
         subscriber); one change reached all in {:.1} ms",
        watch.subscribers,
        watch.rss_before_kib,
        watch.rss_after_kib,
        watch.fan_out.as_secs_f64() * 1000.0
    );

    let get_me_json: Vec<String> = get_me
        .iter()
        .map(|(label, s)| format!(r#"{{"label":"{label}","result":{}}}"#, json(s)))
        .collect();
    let report = format!(
        r#"{{"scenario":"aggregator","cores":{cores},"concurrency":{},"connections":{},"duration_s":{},"population":{POPULATION},"get_user_direct":{},"get_me":[{}],"get_me_delayed":{{"delay_ms":{},"result":{}}},"get_profiles":{{"ids":{POPULATION},"result":{},"profiles_per_second":{profiles_per_second:.0}}},"watch":{{"subscribers":{},"rss_before_kib":{},"rss_after_kib":{},"bytes_per_subscriber":{per_subscriber:.0},"fan_out_ms":{:.1}}}}}"#,
        args.concurrency,
        args.connections,
        args.duration.as_secs_f64(),
        json(&direct),
        get_me_json.join(","),
        delay.as_millis(),
        json(&delayed),
        json(&profiles),
        watch.subscribers,
        watch.rss_before_kib,
        watch.rss_after_kib,
        watch.fan_out.as_secs_f64() * 1000.0,
    );
    super::write_report(&args.results, "aggregator.json", &report)
}

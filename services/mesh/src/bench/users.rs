//! Scenarios on the users service alone: auth and users on loopback (users on SQLite in a
//! temporary folder, or on `--database-url`) and a population of profiles with minted tokens.
//!
//! - `get-user`: GetUser by id, spread over the population, from `--concurrency` callers;
//! - `users`: GetUser at 1, 16 and 64 callers, BatchGetUsers of 100 ids, and one WatchUsers
//!   subscriber under write load: the events it sees against the writes committed, and how long
//!   an event takes to reach it (from its `occur_time`);
//! - `replicas`: two users replicas on one PostgreSQL (`--database-url`); one profile changed
//!   through the first, one change at a time, each timed from `UpdateUser` sent to its event on
//!   a WatchUsers subscriber of each replica: the other replica's against the same one's.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::users::v1::{
    BatchGetUsersRequest, GetUserRequest, UpdateUserRequest, User, WatchUsersRequest,
    user_service_client::UserServiceClient,
};
use mesh_testkit::TestMesh;
use tokio::sync::oneshot;
use tokio_stream::StreamExt as _;

use super::{
    BenchError, Outcome, Settings, channels,
    fixtures::{
        Caller, bearer, channels_one, populate, setup, start_mesh, start_server, unix_ms_now,
        users_config,
    },
    measure::{Latencies, Measurement, drive},
    report::Figure,
};

/// Profiles created before measuring.
const POPULATION: usize = 1000;
/// Ids per `BatchGetUsers` call.
const BATCH: usize = 100;
/// The `GetUser` concurrencies measured by `users`.
const GET_CONCURRENCY: [usize; 3] = [1, 16, 64];

/// The kit's [`TestMesh`] of auth and users with `POPULATION` profiles.
struct Setup {
    servers: TestMesh,
    channels: Arc<Vec<tonic::transport::Channel>>,
    population: Arc<Vec<Caller>>,
}

async fn set_up(settings: &Settings, name: &str) -> Result<Setup, BenchError> {
    let mesh = start_mesh(name, settings.database_url.clone(), None).await?;
    let channels = Arc::new(channels(mesh.users().addr, settings.connections).await?);
    let population = populate(&mesh.keys, &channels, POPULATION).await?;
    Ok(Setup {
        servers: mesh,
        channels,
        population,
    })
}

impl Setup {
    async fn tear_down(self) {
        self.servers.stop().await;
    }

    /// A GetUser call by id, each call the next id (by a stride) of the population.
    fn get_user_call(
        &self,
    ) -> impl Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
    + Clone
    + Send
    + 'static {
        let (channels, population) = (self.channels.clone(), self.population.clone());
        let token = population[0].token.clone();
        let turn = Arc::new(AtomicUsize::new(0));
        move |worker: usize| {
            let mut client = UserServiceClient::new(channels[worker % channels.len()].clone());
            let i = turn.fetch_add(7919, Ordering::Relaxed) % population.len();
            let request = bearer(
                &token,
                GetUserRequest {
                    id: population[i].id.clone(),
                },
            );
            Box::pin(async move { client.get_user(request).await.is_ok() })
        }
    }
}

/// `get-user`: users' GetUser called directly.
pub(super) async fn get_user(
    settings: &Settings,
    baseline: &Measurement,
) -> Result<Outcome, BenchError> {
    let setup = set_up(settings, "get-user").await?;
    let driven = drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        setup.get_user_call(),
    )
    .await;
    setup.tear_down().await;
    let get = driven.measurement(format!("GetUser ({})", settings.database_name()));
    let figures = vec![
        Figure::new(
            "GetUser / echo throughput",
            get.per_second / baseline.per_second.max(f64::MIN_POSITIVE),
            "ratio",
        ),
        Figure::new(
            "GetUser p99 / p50",
            get.latency_ms.p99 / get.latency_ms.p50.max(0.001),
            "ratio",
        ),
    ];
    Ok(Outcome {
        measurements: vec![get],
        figures,
        notes: vec![format!(
            "GetUser verifies the bearer token (Ed25519) and reads one row of {POPULATION}."
        )],
    })
}

pub(super) async fn users(settings: &Settings) -> Result<Outcome, BenchError> {
    let mesh = set_up(settings, "users").await?;
    let (channels, population) = (mesh.channels.clone(), mesh.population.clone());
    let reader = population[0].token.clone();
    let mut measurements = Vec::new();
    for concurrency in GET_CONCURRENCY {
        let driven = drive(
            concurrency,
            settings.warmup,
            settings.duration,
            mesh.get_user_call(),
        )
        .await;
        measurements.push(driven.measurement(format!("GetUser, {concurrency} callers")));
    }

    // BatchGetUsers of BATCH ids.
    let batch_call = {
        let (channels, population, token) = (channels.clone(), population.clone(), reader.clone());
        let turn = Arc::new(AtomicUsize::new(0));
        move |worker: usize| {
            let mut client = UserServiceClient::new(channels[worker % channels.len()].clone());
            let start = turn.fetch_add(BATCH, Ordering::Relaxed);
            let ids = (0..BATCH)
                .map(|k| population[(start + k) % population.len()].id.clone())
                .collect();
            let request = bearer(&token, BatchGetUsersRequest { ids });
            async move {
                client
                    .batch_get_users(request)
                    .await
                    .is_ok_and(|r| r.get_ref().users.len() == BATCH)
            }
        }
    };
    let batches = drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        batch_call,
    )
    .await
    .measurement(format!("BatchGetUsers of {BATCH} ids"));

    // One live WatchUsers subscriber (on its own connection) while every caller updates its
    // own profile as fast as it can.
    let watch_channel = channels_one(mesh.servers.users().addr).await?;
    let mut stream = UserServiceClient::new(watch_channel)
        .watch_users(bearer(
            &reader,
            WatchUsersRequest {
                after_sequence: None,
            },
        ))
        .await
        .map_err(|e| setup(format!("watch: {e}")))?
        .into_inner();
    let (stop_watch, mut watch_stopped) = oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut delays = Latencies::default();
        let mut received = 0usize;
        loop {
            tokio::select! {
                _ = &mut watch_stopped => break,
                next = stream.next() => match next {
                    Some(Ok(event)) => {
                        received += 1;
                        if let Some(at) = event.occur_time {
                            let committed = at.seconds * 1000 + i64::from(at.nanos) / 1_000_000;
                            let ms = (unix_ms_now() - committed).max(0);
                            delays.record(Duration::from_millis(ms.unsigned_abs()));
                        }
                    }
                    _ => break,
                },
            }
        }
        (received, delays)
    });
    let update_call = {
        let (channels, population) = (channels.clone(), population.clone());
        let turn = Arc::new(AtomicUsize::new(0));
        move |worker: usize| {
            let mut client = UserServiceClient::new(channels[worker % channels.len()].clone());
            let n = turn.fetch_add(1, Ordering::Relaxed);
            let caller = &population[worker % population.len()];
            let request = bearer(
                &caller.token,
                UpdateUserRequest {
                    user: Some(User {
                        bio: format!("update {n}"),
                        ..User::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["bio".into()],
                    }),
                    expected_version: 0,
                },
            );
            async move { client.update_user(request).await.is_ok() }
        }
    };
    let writes = drive(
        settings.concurrency,
        Duration::ZERO,
        settings.duration,
        update_call,
    )
    .await;
    let elapsed = writes.elapsed;
    let writes = writes.measurement("UpdateUser (the write load)");
    // Let the last events arrive, then stop the subscriber.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_watch.send(());
    let (received, delays) = watcher.await.map_err(setup)?;
    mesh.tear_down().await;

    let delay = Measurement::new(
        "WatchUsers: commit to receipt (from occur_time)",
        &delays,
        0,
        elapsed,
    );
    let committed = writes.calls;
    measurements.extend([batches.clone(), writes, delay]);
    Ok(Outcome {
        measurements,
        figures: vec![
            Figure::new(
                "BatchGetUsers profiles per second",
                batches.per_second * BATCH as f64,
                "/s",
            ),
            Figure::new("WatchUsers events seen", received as f64, "events"),
            Figure::new("UpdateUser calls committed", committed as f64, "writes"),
        ],
        notes: vec![format!(
            "users on {}, {POPULATION} profiles. The WatchUsers row's calls/s is the event \
             rate one subscriber saw while every caller updated its own profile; its latency \
             is from the event's occur_time (taken before the write waits for the sequence \
             row) to receipt, at millisecond resolution.",
            settings.database_name()
        )],
    })
}

/// Changes `replicas` times.
const REPLICA_CHANGES: usize = 300;
/// The longest a change may take to reach a subscriber before the run fails.
const REPLICA_WAIT: Duration = Duration::from_secs(10);

/// The next event of `stream` whose profile's bio is `bio`: when it arrived.
async fn arrival(
    stream: &mut tonic::Streaming<mesh_proto::users::v1::UserEvent>,
    bio: &str,
) -> Result<std::time::Instant, BenchError> {
    tokio::time::timeout(REPLICA_WAIT, async {
        loop {
            match stream.next().await {
                Some(Ok(event)) if event.user.as_ref().is_some_and(|u| u.bio == bio) => {
                    return Ok(std::time::Instant::now());
                }
                Some(Ok(_)) => {}
                Some(Err(status)) => return Err(setup(format!("watch: {status}"))),
                None => return Err(setup("watch ended")),
            }
        }
    })
    .await
    .map_err(|_| setup(format!("a change took over {REPLICA_WAIT:?} to arrive")))?
}

/// `replicas`: WatchUsers across two users replicas sharing one PostgreSQL.
pub(super) async fn replicas(settings: &Settings) -> Result<Outcome, BenchError> {
    let Some(url) = settings.database_url.clone() else {
        return Err(setup(
            "replicas needs --database-url postgres://… (the replicas share one PostgreSQL)",
        ));
    };
    let mesh = set_up(settings, "replicas").await?;
    let second = start_server(mesh_testkit::start_users(users_config(
        mesh.servers.data.path(),
        mesh.servers.auth.addr,
        Some(url),
        None,
    )?))
    .await?;
    let writer = mesh.population[0].token.clone();
    let watch = |addr: std::net::SocketAddr| {
        let token = writer.clone();
        async move {
            let channel = channels_one(addr).await?;
            let stream = UserServiceClient::new(channel)
                .watch_users(bearer(
                    &token,
                    WatchUsersRequest {
                        after_sequence: None,
                    },
                ))
                .await
                .map_err(|e| setup(format!("watch: {e}")))?
                .into_inner();
            Ok::<_, BenchError>(stream)
        }
    };
    let mut same = watch(mesh.servers.users().addr).await?;
    let mut other = watch(second.addr).await?;
    let mut client = UserServiceClient::new(mesh.channels[0].clone());
    let (mut same_replica, mut other_replica) = (Latencies::default(), Latencies::default());
    let started = std::time::Instant::now();
    let mut failed = Ok(());
    for n in 0..(REPLICA_CHANGES + REPLICA_CHANGES / 10) {
        let bio = format!("replica change {n}");
        let request = bearer(
            &writer,
            UpdateUserRequest {
                user: Some(User {
                    bio: bio.clone(),
                    ..User::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["bio".into()],
                }),
                expected_version: 0,
            },
        );
        let sent = std::time::Instant::now();
        if let Err(status) = client.update_user(request).await {
            failed = Err(setup(format!("update: {status}")));
            break;
        }
        let (at_same, at_other) =
            match tokio::try_join!(arrival(&mut same, &bio), arrival(&mut other, &bio)) {
                Ok(arrived) => arrived,
                Err(err) => {
                    failed = Err(err);
                    break;
                }
            };
        // The first tenth warms up both feeds and connections.
        if n >= REPLICA_CHANGES / 10 {
            same_replica.record(at_same - sent);
            other_replica.record(at_other - sent);
        }
    }
    let elapsed = started.elapsed();
    drop((same, other));
    super::fixtures::stop(second).await;
    mesh.tear_down().await;
    failed?;
    let same = Measurement::new(
        "UpdateUser sent → event on the same replica's WatchUsers",
        &same_replica,
        0,
        elapsed,
    );
    let other = Measurement::new(
        "UpdateUser sent → event on the other replica's WatchUsers",
        &other_replica,
        0,
        elapsed,
    );
    let figures = vec![
        Figure::at_most(
            "other replica: UpdateUser sent → event, p99",
            other.latency_ms.p99,
            "ms",
            20.0,
        ),
        Figure::new(
            "same replica: UpdateUser sent → event, p99",
            same.latency_ms.p99,
            "ms",
        ),
        Figure::new(
            "other − same replica, p50",
            other.latency_ms.p50 - same.latency_ms.p50,
            "ms",
        ),
    ];
    Ok(Outcome {
        measurements: vec![same, other],
        figures,
        notes: vec![format!(
            "Two users replicas on one PostgreSQL, each with a WatchUsers subscriber on a \
             connection of its own; {REPLICA_CHANGES} changes to one profile through the first \
             replica (after {} not timed), one at a time: each is sent once the last has reached \
             both subscribers. The other replica learns of a commit from PostgreSQL's NOTIFY, \
             sent in the writing transaction; its poll of the log is the fallback. The calls/s \
             column is the rate of changes.",
            REPLICA_CHANGES / 10
        )],
    })
}

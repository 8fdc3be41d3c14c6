//! Scenario `users`: auth and users in-process on loopback (users on SQLite in a temporary
//! folder, or on `--database-url`), a population of profiles, then `GetUser` at a few
//! concurrencies, `BatchGetUsers` of 100 ids, and one `WatchUsers` subscriber under write load:
//! the event rate it sees against the write rate, and how long an event takes to reach it.
//! Prints a table and writes `<results>/users.json`.

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
use mesh_token::KeyRing;
use tokio::sync::oneshot;
use tokio_stream::StreamExt as _;

use super::{
    BenchArgs, BenchError, channels, drive,
    fixtures::{bearer, channels_one, populate, setup, start_auth, start_users, unix_ms_now},
    json, summarize,
};

/// Profiles created before measuring.
const POPULATION: usize = 1000;
/// Ids per `BatchGetUsers` call.
const BATCH: usize = 100;
/// The `GetUser` concurrencies measured.
const GET_CONCURRENCY: [usize; 3] = [1, 16, 64];

pub(super) async fn users(args: BenchArgs) -> Result<(), BenchError> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let warmup = args.duration / 10;
    let data = std::env::temp_dir().join(format!("mesh-bench-users-{}", std::process::id()));
    // Auth loads the development key made here, so the benchmark can mint tokens for a
    // population of users without paying an Argon2id hash for each.
    let (ring, _) = KeyRing::load_or_create_dev_key(&data.join("auth").join("dev-signing-key.pem"))
        .map_err(setup)?;
    let auth = start_auth(&data, Vec::new()).await?;
    let users = start_users(&data, auth.addr, args.database_url.clone()).await?;
    let channels = Arc::new(channels(users.addr, args.connections).await?);

    let population = populate(&ring, &channels, POPULATION).await?;
    let reader = population[0].token.clone();

    // GetUser at a few concurrencies, ids spread over the population.
    let mut gets = Vec::new();
    for concurrency in GET_CONCURRENCY {
        let call = {
            let (channels, population, token) =
                (channels.clone(), population.clone(), reader.clone());
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
                async move { client.get_user(request).await.is_ok() }
            }
        };
        drive(concurrency, warmup, call.clone()).await;
        let (latencies, elapsed) = drive(concurrency, args.duration, call).await;
        gets.push((concurrency, summarize(latencies, elapsed)));
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
    drive(args.concurrency, warmup, batch_call.clone()).await;
    let (latencies, elapsed) = drive(args.concurrency, args.duration, batch_call).await;
    let batches = summarize(latencies, elapsed);

    // One live WatchUsers subscriber (on its own connection) while every caller updates its
    // own profile as fast as it can.
    let watch_channel = channels_one(users.addr).await?;
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
        let mut delays_ms = Vec::new();
        let mut received = 0usize;
        loop {
            tokio::select! {
                _ = &mut watch_stopped => break,
                next = stream.next() => match next {
                    Some(Ok(event)) => {
                        received += 1;
                        if let Some(at) = event.occur_time {
                            let committed = at.seconds * 1000 + i64::from(at.nanos) / 1_000_000;
                            delays_ms.push((unix_ms_now() - committed).max(0));
                        }
                    }
                    _ => break,
                },
            }
        }
        (received, delays_ms)
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
    let (latencies, elapsed) = drive(args.concurrency, args.duration, update_call).await;
    let writes = summarize(latencies, elapsed);
    // Let the last events arrive, then stop the subscriber.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_watch.send(());
    let (received, delays_ms) = watcher.await.map_err(setup)?;
    let delay = summarize(
        delays_ms
            .into_iter()
            .map(|ms| Duration::from_millis(ms as u64))
            .collect(),
        elapsed,
    );

    users.stop().await;
    auth.stop().await;
    let _ = std::fs::remove_dir_all(&data);

    let backend = if args.database_url.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!(
        "\nmesh bench users — {cores} cores, users on {backend}, {POPULATION} profiles, {} \
         connections, {:?} each\n",
        args.connections, args.duration
    );
    println!("| measurement | callers | per second | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (concurrency, s) in &gets {
        println!(
            "| GetUser | {concurrency} | {:.0} | {:.3} | {:.3} |",
            s.per_second, s.p50_ms, s.p99_ms
        );
    }
    println!(
        "| BatchGetUsers ({BATCH} ids) | {} | {:.0} ({:.0} profiles/s) | {:.3} | {:.3} |",
        args.concurrency,
        batches.per_second,
        batches.per_second * BATCH as f64,
        batches.p50_ms,
        batches.p99_ms
    );
    println!(
        "| UpdateUser (the write load) | {} | {:.0} | {:.3} | {:.3} |",
        args.concurrency, writes.per_second, writes.p50_ms, writes.p99_ms
    );
    let event_rate = received as f64 / elapsed.as_secs_f64();
    println!(
        "| WatchUsers events seen by 1 subscriber | | {event_rate:.0} | {:.0} | {:.0} |",
        delay.p50_ms, delay.p99_ms
    );
    println!(
        "\nevents seen / writes committed: {received} / {} (commit-to-receipt delay in ms, \
         from the event's occur_time)",
        writes.count
    );

    let gets_json: Vec<String> = gets
        .iter()
        .map(|(c, s)| format!(r#"{{"concurrency":{c},"result":{}}}"#, json(s)))
        .collect();
    let report = format!(
        r#"{{"scenario":"users","cores":{cores},"backend":"{backend}","population":{POPULATION},"connections":{},"duration_s":{},"get_user":[{}],"batch_get_users":{{"ids":{BATCH},"concurrency":{},"result":{}}},"update_user":{},"watch":{{"events_received":{received},"writes_committed":{},"events_per_second":{event_rate:.1},"delay_ms":{}}}}}"#,
        args.connections,
        args.duration.as_secs_f64(),
        gets_json.join(","),
        args.concurrency,
        json(&batches),
        json(&writes),
        writes.count,
        json(&delay),
    );
    super::write_report(&args.results, "users.json", &report)
}

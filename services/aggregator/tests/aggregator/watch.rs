//! WatchProfiles: the one relay's fan-out, replays from users' log, restarts, lag, limits.

use std::time::Duration;

use mesh_proto::{
    aggregator::v1::{
        ProfileEventKind, WatchProfilesRequest, aggregator_service_client::AggregatorServiceClient,
    },
    users::v1 as users,
};
use mesh_testkit::{TestMesh, assert_code, bearer, connect};
use tonic::{Code, transport::Channel};

use crate::{mesh, profile, start, take, watch_live};

/// Makes `changes` updates to a profile of its own, one at a time.
fn writer(mesh: &TestMesh, token: String, changes: usize) -> tokio::task::JoinHandle<()> {
    let mut client = mesh.users_client();
    tokio::spawn(async move {
        client
            .create_user(bearer(
                &token,
                users::CreateUserRequest {
                    user: Some(users::User {
                        display_name: "Writer".into(),
                        ..users::User::default()
                    }),
                    request_id: String::new(),
                },
            ))
            .await
            .expect("create");
        for n in 0..changes {
            client
                .update_user(bearer(
                    &token,
                    users::UpdateUserRequest {
                        user: Some(users::User {
                            bio: format!("change {n}"),
                            ..users::User::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["bio".into()],
                        }),
                        expected_version: 0,
                    },
                ))
                .await
                .expect("update");
        }
    })
}

async fn futures_join(n: usize, addr: std::net::SocketAddr) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(connect(addr).await);
    }
    channels
}

/// WatchProfiles: 1,000 subscribers on the one relay all get the same complete, ordered
/// sequence while writes run; one that starts mid-way from the beginning of the log gets the
/// replay and then the live events with no gap or duplicate; errors as in users.
#[tokio::test]
async fn watch_profiles_fans_out_without_gaps() {
    let mesh = start().await;
    let service = mesh.keys.service("test");
    // A first live subscriber (retried until the relay has connected to users) sees the
    // existing profile's event: the relay has passed it before the others subscribe.
    let mut first = watch_live(&mut mesh.aggregator_client(), &service).await;
    profile(&mesh, "Existing").await;
    assert_eq!(take(&mut first, 1).await[0].sequence, 1);
    let channels: Vec<Channel> = futures_join(10, mesh.aggregator().addr).await;
    let mut subscribers = Vec::new();
    for n in 0..1000 {
        let mut client = AggregatorServiceClient::new(channels[n % channels.len()].clone());
        let stream = client
            .watch_profiles(bearer(
                &service,
                WatchProfilesRequest {
                    after_sequence: None,
                },
            ))
            .await
            .expect("watch");
        subscribers.push(stream.into_inner());
    }
    // Let the subscriptions settle before the first change.
    tokio::time::sleep(Duration::from_millis(200)).await;
    const WRITERS: usize = 4;
    const CHANGES: usize = 25;
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let id = uuid::Uuid::now_v7().to_string();
            writer(&mesh, mesh.keys.user(&id, "w@example.com"), CHANGES)
        })
        .collect();
    // Mid-way, from the start of the log.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut from_start = mesh
        .aggregator_client()
        .watch_profiles(bearer(
            &service,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch from the start")
        .into_inner();
    let total = WRITERS * (CHANGES + 1);
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut s| tokio::spawn(async move { take(&mut s, total).await }))
        .collect();
    let replayed = take(&mut from_start, total + 1).await;
    for w in writers {
        w.await.expect("writer");
    }
    let log: Vec<i64> = replayed.iter().map(|e| e.sequence).collect();
    assert!(log.windows(2).all(|w| w[0] < w[1]), "ordered: {log:?}");
    assert_eq!(replayed[0].kind(), ProfileEventKind::Created);
    assert!(
        replayed
            .iter()
            .all(|e| e.profile.as_ref().is_some_and(|p| p.email.is_empty()))
    );
    for reader in readers {
        let events = reader.await.expect("reader");
        let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!(
            sequences,
            log[1..],
            "a live subscriber sees every change after it joined"
        );
    }

    let mut client = mesh.aggregator_client();
    assert_code(
        client
            .watch_profiles(bearer(
                &service,
                WatchProfilesRequest {
                    after_sequence: Some(-1),
                },
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        client
            .watch_profiles(bearer(
                &service,
                WatchProfilesRequest {
                    after_sequence: Some(1_000_000),
                },
            ))
            .await,
        Code::OutOfRange,
    );
    mesh.stop().await;
}

/// When users restarts, the relay reconnects and resumes from the last sequence it saw:
/// subscribers that stay connected to the aggregator miss nothing. A slow subscriber is caught
/// up from users' log.
#[tokio::test]
async fn watch_profiles_survives_a_users_restart() {
    let mut mesh = start().await;
    let service = mesh.keys.service("test");
    let mut live = watch_live(&mut mesh.aggregator_client(), &service).await;
    // A slow subscriber on its own connection, not read until the end.
    let mut slow = AggregatorServiceClient::new(connect(mesh.aggregator().addr).await)
        .watch_profiles(bearer(
            &service,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("slow")
        .into_inner();
    let id = uuid::Uuid::now_v7().to_string();
    let token = mesh.keys.user(&id, "r@example.com");
    writer(&mesh, token.clone(), 30)
        .await
        .expect("before the restart");
    let before = take(&mut live, 31).await;

    // Stop users and bring it back on its address with the same database.
    mesh.restart_users().await;

    let mut users_client = mesh.users_client();
    for n in 0..30 {
        users_client
            .update_user(bearer(
                &token,
                users::UpdateUserRequest {
                    user: Some(users::User {
                        bio: format!("after restart {n}"),
                        ..users::User::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["bio".into()],
                    }),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update after restart");
    }
    let after = take(&mut live, 30).await;
    let sequences: Vec<i64> = before.iter().chain(&after).map(|e| e.sequence).collect();
    assert_eq!(
        sequences,
        (1..=61).collect::<Vec<i64>>(),
        "no gap across the restart"
    );
    let last = after
        .last()
        .and_then(|e| e.profile.as_ref())
        .expect("profile");
    assert_eq!(last.bio, "after restart 29");

    let slow_events = take(&mut slow, 61).await;
    let slow_sequences: Vec<i64> = slow_events.iter().map(|e| e.sequence).collect();
    assert_eq!(
        slow_sequences, sequences,
        "the slow subscriber is caught up, not skipped"
    );
    mesh.stop().await;
}

/// Subscribers that read nothing while hundreds of large changes go by (far more than the
/// relay's buffer of 16 and the client connection's 5 MiB HTTP/2 window) fall behind the relay; they are caught up from
/// users' log, not skipped: each still gets every event, in order.
#[tokio::test]
async fn lagging_subscribers_are_caught_up_from_users_log() {
    let mesh = start().await;
    let service = mesh.keys.service("test");
    let watcher = connect(mesh.aggregator().addr).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut client = AggregatorServiceClient::new(watcher.clone());
        streams.push(watch_live(&mut client, &service).await);
    }
    const CHANGES: usize = 600;
    let id = uuid::Uuid::now_v7().to_string();
    let token = mesh.keys.user(&id, "l@example.com");
    let mut users_client = mesh.users_client();
    users_client
        .create_user(bearer(
            &token,
            users::CreateUserRequest {
                user: Some(users::User {
                    display_name: "Lag".into(),
                    ..users::User::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create");
    let bio = "x".repeat(500);
    for n in 0..CHANGES {
        users_client
            .update_user(bearer(
                &token,
                users::UpdateUserRequest {
                    user: Some(users::User {
                        bio: format!("{n} {bio}"),
                        ..users::User::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["bio".into()],
                    }),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
    }
    // Read them all at once now (unread streams hold back their shared connection).
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| tokio::spawn(async move { take(&mut s, CHANGES + 1).await }))
        .collect();
    for reader in readers {
        let sequences: Vec<i64> = reader
            .await
            .expect("reader")
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(sequences, (1..=(CHANGES as i64 + 1)).collect::<Vec<_>>());
    }
    mesh.stop().await;
}

/// The relay renews its service token before it expires: with 2-second tokens and no leeway at
/// users, a replay opened after the first token has expired still works.
#[tokio::test]
async fn the_relay_renews_its_service_token() {
    let mesh = mesh()
        .auth_config(|c| c.access_token_ttl = Duration::from_secs(2))
        .users_config(|c| c.authn.leeway = Duration::ZERO)
        .start()
        .await;
    let id = uuid::Uuid::now_v7().to_string();
    let token = mesh.keys.user(&id, "t@example.com");
    mesh.users_client()
        .create_user(bearer(
            &token,
            users::CreateUserRequest {
                user: Some(users::User {
                    display_name: "T".into(),
                    ..users::User::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create");
    let service = mesh.keys.service("test");
    let mut client = mesh.aggregator_client();
    let open = |client: &mut AggregatorServiceClient<Channel>| {
        let mut client = client.clone();
        let service = service.clone();
        async move {
            client
                .watch_profiles(bearer(
                    &service,
                    WatchProfilesRequest {
                        after_sequence: Some(0),
                    },
                ))
                .await
        }
    };
    let mut first = open(&mut client).await.expect("replay").into_inner();
    assert_eq!(take(&mut first, 1).await[0].sequence, 1);
    // Well past the first token's expiry.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut later = open(&mut client)
        .await
        .expect("a replay with a renewed token")
        .into_inner();
    assert_eq!(take(&mut later, 1).await[0].sequence, 1);
    mesh.stop().await;
}

/// The aggregator serves at most `--max-watch-streams` WatchProfiles streams; one more is
/// RESOURCE_EXHAUSTED, and a place that frees up can be taken again.
#[tokio::test]
async fn watch_streams_are_capped() {
    let mesh = mesh()
        .aggregator_config(|c| c.max_watch_streams = 3)
        .start()
        .await;
    let service = mesh.keys.service("test");
    let client = mesh.aggregator_client();
    let open = || {
        let mut client = client.clone();
        let service = service.clone();
        async move {
            client
                .watch_profiles(bearer(
                    &service,
                    WatchProfilesRequest {
                        after_sequence: None,
                    },
                ))
                .await
        }
    };
    let mut streams = Vec::new();
    while streams.len() < 3 {
        match open().await {
            Ok(stream) => streams.push(stream.into_inner()),
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("watch: {status:?}"),
        }
    }
    let refused = assert_code(open().await, Code::ResourceExhausted);
    assert!(refused.message().contains("maximum of 3"), "{refused:?}");
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match open().await {
            Ok(stream) => {
                streams.push(stream.into_inner());
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the place never freed up"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("watch: {status:?}"),
        }
    }
    mesh.stop().await;
}

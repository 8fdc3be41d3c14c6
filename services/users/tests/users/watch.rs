//! WatchUsers: replay, live edge, the seam under concurrent writers, stalled subscribers, long
//! replays, and streams ended by a shutdown.

use std::time::Duration;

use mesh_proto::users::v1::{
    CreateUserRequest, EventKind, UpdateUserRequest, WatchUsersRequest,
    user_service_client::UserServiceClient,
};
use mesh_testkit::{Database, TestMesh, assert_code_contains, bearer, connect, databases};
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::{create, mask, profile, service_token, start, start_with, take, user};

/// WatchUsers: negative positions are INVALID_ARGUMENT, positions beyond the log OUT_OF_RANGE;
/// a service token may subscribe; events carry no e-mail; without a position the stream starts
/// at the live edge.
#[tokio::test]
async fn watch_users_rules() {
    for database in databases() {
        let mesh = start(database).await;
        let mut client = mesh.users_client();
        let service = service_token(&mesh);
        let alice = user(&mesh);
        create(&mesh, &alice, "Alice").await;
        assert_code_contains(
            client
                .watch_users(bearer(
                    &service,
                    WatchUsersRequest {
                        after_sequence: Some(-1),
                    },
                ))
                .await,
            Code::InvalidArgument,
            "after_sequence",
        );
        assert_code_contains(
            client
                .watch_users(bearer(
                    &service,
                    WatchUsersRequest {
                        after_sequence: Some(2),
                    },
                ))
                .await,
            Code::OutOfRange,
            "newest stored sequence 1",
        );
        let live = client
            .watch_users(bearer(
                &service,
                WatchUsersRequest {
                    after_sequence: None,
                },
            ))
            .await
            .expect("live");
        assert_eq!(
            live.metadata()
                .get(mesh_users::LOG_HEAD_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("1"),
            "the stream names the log position it starts after"
        );
        let mut live = live.into_inner();
        let mut replay = client
            .watch_users(bearer(
                &alice.token,
                WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("replay")
            .into_inner();
        // Give the live subscription time to be in place before the next change.
        tokio::time::sleep(Duration::from_millis(100)).await;
        client
            .update_user(bearer(
                &alice.token,
                UpdateUserRequest {
                    user: profile("", "hi"),
                    update_mask: mask(&["bio"]),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
        let live_events = take(&mut live, 1).await;
        assert_eq!(
            live_events[0].sequence, 2,
            "the live edge starts after the existing event"
        );
        assert_eq!(live_events[0].kind(), EventKind::Updated);
        let replayed = take(&mut replay, 2).await;
        assert_eq!(
            replayed.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(replayed[0].kind(), EventKind::Created);
        for event in live_events.iter().chain(&replayed) {
            let user = event.user.as_ref().expect("user");
            assert!(user.email.is_empty(), "events carry no e-mail");
            assert_eq!(user.id, alice.id);
            assert!(event.occur_time.is_some());
        }
        mesh.stop().await;
    }
}

/// The seam under load: writers keep changing profiles while one subscriber starts mid-way
/// from the beginning of the log, and another reads a while, disconnects, and resumes from the
/// last sequence it saw. Each ends with exactly the whole log, in order: no gap, no duplicate.
#[tokio::test]
async fn watch_has_no_gap_or_duplicate_under_concurrent_writers() {
    for database in databases() {
        let mesh = start(database).await;
        const WRITERS: usize = 4;
        const CHANGES: usize = 40;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let caller = user(&mesh);
                let client = mesh.users_client();
                tokio::spawn(async move {
                    let mut client = client;
                    client
                        .create_user(bearer(
                            &caller.token,
                            CreateUserRequest {
                                user: profile(&format!("W{w}"), ""),
                                request_id: String::new(),
                            },
                        ))
                        .await
                        .expect("create");
                    for n in 0..CHANGES {
                        client
                            .update_user(bearer(
                                &caller.token,
                                UpdateUserRequest {
                                    user: profile("", &format!("change {n}")),
                                    update_mask: mask(&["bio"]),
                                    expected_version: 0,
                                },
                            ))
                            .await
                            .expect("update");
                    }
                })
            })
            .collect();
        let total = WRITERS * (CHANGES + 1);
        let service = service_token(&mesh);
        let mut client = mesh.users_client();

        // The resuming subscriber: a few events, then gone.
        let mut first_part = client
            .watch_users(bearer(
                &service,
                WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("watch")
            .into_inner();
        let mut resumed: Vec<i64> = take(&mut first_part, 10)
            .await
            .iter()
            .map(|e| e.sequence)
            .collect();
        drop(first_part);

        // Mid-way: both start while the writers are busy.
        let mut from_start = client
            .watch_users(bearer(
                &service,
                WatchUsersRequest {
                    after_sequence: Some(0),
                },
            ))
            .await
            .expect("watch from start")
            .into_inner();
        let mut second_part = client
            .watch_users(bearer(
                &service,
                WatchUsersRequest {
                    after_sequence: resumed.last().copied(),
                },
            ))
            .await
            .expect("resume")
            .into_inner();
        let from_start: Vec<i64> = take(&mut from_start, total)
            .await
            .iter()
            .map(|e| e.sequence)
            .collect();
        resumed.extend(
            take(&mut second_part, total - 10)
                .await
                .iter()
                .map(|e| e.sequence),
        );
        for writer in writers {
            writer.await.expect("writer");
        }

        // The reference: the whole stored log.
        let log: Vec<i64> = {
            let mut all = client
                .watch_users(bearer(
                    &service,
                    WatchUsersRequest {
                        after_sequence: Some(0),
                    },
                ))
                .await
                .expect("watch")
                .into_inner();
            take(&mut all, total)
                .await
                .iter()
                .map(|e| e.sequence)
                .collect()
        };
        assert!(log.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(from_start, log, "subscriber from the start");
        assert_eq!(resumed, log, "subscriber that resumed");
        mesh.stop().await;
    }
}

/// Many subscribers share the one feed and each gets every change; one that does not read
/// while thousands of large events go by (far more than its buffer and HTTP/2 window) is
/// caught up from the log, not dropped: it still gets every event, in order.
#[tokio::test]
async fn slow_subscribers_are_caught_up_from_the_log() {
    let mesh = start_with(Database::Sqlite, |c| c.watch_buffer = 8).await;
    let mut client = mesh.users_client();
    // The subscribers on their own connection: unread streams use up its HTTP/2 window, which
    // would hold back the writers' replies too if they shared it.
    let mut watcher = UserServiceClient::new(connect(mesh.users().addr).await);
    let service = service_token(&mesh);
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(
            watcher
                .watch_users(bearer(
                    &service,
                    WatchUsersRequest {
                        after_sequence: Some(0),
                    },
                ))
                .await
                .expect("watch")
                .into_inner(),
        );
    }
    let alice = user(&mesh);
    create(&mesh, &alice, "Alice").await;
    const CHANGES: usize = 600;
    let bio = "x".repeat(500);
    for n in 0..CHANGES {
        client
            .update_user(bearer(
                &alice.token,
                UpdateUserRequest {
                    user: profile("", &format!("{n} {bio}")),
                    update_mask: mask(&["bio"]),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
    }
    // Now read them all at once (each stream's unread data holds back the shared connection).
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| tokio::spawn(async move { take(&mut stream, CHANGES + 1).await }))
        .collect();
    for reader in readers {
        let events = reader.await.expect("reader");
        let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, (1..=(CHANGES as i64 + 1)).collect::<Vec<_>>());
        let last = events.last().and_then(|e| e.user.as_ref()).expect("user");
        assert_eq!(last.version, CHANGES as i64 + 1);
    }
    mesh.stop().await;
}

/// A replay of a log many pages long, started after the log was written, sends every event in
/// order: replays read the table a page at a time until it is caught up.
#[tokio::test]
async fn long_replays_send_the_whole_log() {
    let mesh = start(Database::Sqlite).await;
    let mut client = mesh.users_client();
    let alice = user(&mesh);
    create(&mesh, &alice, "Alice").await;
    const CHANGES: usize = 700;
    for n in 0..CHANGES {
        client
            .update_user(bearer(
                &alice.token,
                UpdateUserRequest {
                    user: profile("", &format!("change {n}")),
                    update_mask: mask(&["bio"]),
                    expected_version: 0,
                },
            ))
            .await
            .expect("update");
    }
    let mut stream = client
        .watch_users(bearer(
            &service_token(&mesh),
            WatchUsersRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let events = take(&mut stream, CHANGES + 1).await;
    let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=(CHANGES as i64 + 1)).collect::<Vec<_>>());
    mesh.stop().await;
}

/// A graceful shutdown ends open WatchUsers streams with UNAVAILABLE (retryable), naming the
/// position to resume from.
#[tokio::test]
async fn shutdown_ends_watch_streams_with_unavailable() {
    let mut mesh = start(Database::Sqlite).await;
    let alice = user(&mesh);
    create(&mesh, &alice, "Alice").await;
    let mut stream = mesh
        .users_client()
        .watch_users(bearer(
            &alice.token,
            WatchUsersRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    take(&mut stream, 1).await;
    mesh.users.as_mut().expect("users").begin_shutdown();
    let end = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("the stream ends within the grace period");
    let status = end
        .expect("a final status")
        .expect_err("ends with an error status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("after_sequence = 1"),
        "{status:?}"
    );
    let TestMesh { users, auth, .. } = mesh;
    let users = users.expect("users");
    users.join().await.expect("users stops cleanly");
    auth.shutdown().await.expect("auth stops");
}

/// Replicas sharing one PostgreSQL learn of each other's commits as they happen (PostgreSQL's
/// `NOTIFY`), not at their next poll: with the poll a minute apart, a change written through
/// one replica reaches a WatchUsers subscriber of the other within seconds — also after the
/// listening connection was cut and made again.
#[tokio::test]
async fn replicas_learn_of_each_others_commits_at_once() {
    let Some(admin_url) = crate::postgres_admin_url() else {
        return;
    };
    let url =
        mesh_store::testing::fresh_database(&admin_url, "usersnotify", "replicas_learn").await;
    let slow_poll = Duration::from_secs(60);
    let shared = url.clone();
    let mesh = start_with(Database::Sqlite, move |config| {
        config.database_url = Some(shared.as_str().into());
        config.watch_poll_interval = slow_poll;
    })
    .await;
    let mut second = mesh_testkit::users_config(mesh.data.path(), mesh.auth.addr);
    second.database_url = Some(url.as_str().into());
    second.watch_poll_interval = slow_poll;
    let second = mesh_testkit::start_users(second).await;

    let mut subscriber = UserServiceClient::new(connect(second.addr).await)
        .watch_users(bearer(
            &service_token(&mesh),
            WatchUsersRequest {
                after_sequence: None,
            },
        ))
        .await
        .expect("watch the second replica")
        .into_inner();
    let within = Duration::from_secs(10);
    let next_name = async |stream: &mut tonic::Streaming<mesh_proto::users::v1::UserEvent>| {
        tokio::time::timeout(within, stream.next())
            .await
            .expect("the other replica's commit arrives long before the next poll")
            .expect("stream open")
            .expect("event")
            .user
            .map(|u| u.display_name)
            .unwrap_or_default()
    };

    // Written through the first replica, seen on the second.
    let alice = user(&mesh);
    create(&mesh, &alice, "Alice").await;
    assert_eq!(next_name(&mut subscriber).await, "Alice");

    // The second replica's listening connection is cut: it listens again and goes on.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .expect("admin connection");
    let (cut,): (i64,) = sqlx::query_as(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE query LIKE 'LISTEN%' AND datname = $1",
    )
    .bind(url.rsplit('/').next().and_then(|t| t.split('?').next()))
    .fetch_one(&mut admin)
    .await
    .expect("cut the listening connections");
    assert!(cut >= 1, "both replicas listen on their own connection");
    let bob = user(&mesh);
    // Announcements made while the listener reconnects may be lost; the reconnect itself reads
    // the log again, so Bob's profile arrives either way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    create(&mesh, &bob, "Bob").await;
    assert_eq!(next_name(&mut subscriber).await, "Bob");

    drop(subscriber);
    second.shutdown().await.expect("second replica stops");
    mesh.stop().await;
}

//! The small ones: private files, erasure of deleted profiles from the log, retention and
//! pruning, unknown health names, tokens from the future or for ever.

use std::time::Duration;

use mesh_proto::{
    aggregator::v1::{self as aggregator, aggregator_service_client::AggregatorServiceClient},
    headers,
    users::v1::{self as users, user_service_client::UserServiceClient},
};
use mesh_testkit::{TestMesh, assert_code, bearer, health_status, unix_now};
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Channel};

/// Database files and the service folders are private to the service's user.
#[cfg(unix)]
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let mesh = TestMesh::builder().users().start().await;
    let (_, token) = mesh.keys.new_user();
    create(&mut mesh.users_client(), &token, "Private").await;
    let mode = |path: std::path::PathBuf| {
        std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let data = mesh.data.path();
    for (file, want) in [
        (data.join("auth"), 0o700),
        (data.join("auth").join("auth.db"), 0o600),
        (data.join("auth").join("auth.db-wal"), 0o600),
        (data.join("auth").join("dev-signing-key.pem"), 0o600),
        (data.join("users"), 0o700),
        (data.join("users").join("users.db"), 0o600),
        (data.join("users").join("users.db-wal"), 0o600),
    ] {
        assert_eq!(mode(file.clone()), want, "{}", file.display());
    }
    mesh.stop().await;
}

async fn create(client: &mut UserServiceClient<Channel>, token: &str, name: &str) -> users::User {
    client
        .create_user(bearer(
            token,
            users::CreateUserRequest {
                user: Some(users::User {
                    display_name: name.into(),
                    bio: format!("bio of {name}"),
                    ..users::User::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create")
        .into_inner()
}

/// All of a log's events, read by a replay from its start until `until` is seen.
async fn replay(
    client: &mut UserServiceClient<Channel>,
    token: &str,
    until: i64,
) -> Vec<users::UserEvent> {
    let mut stream = client
        .watch_users(bearer(
            token,
            users::WatchUsersRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    while events
        .last()
        .is_none_or(|e: &users::UserEvent| e.sequence < until)
    {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("replayed in time")
            .expect("open")
            .expect("event");
        events.push(event);
    }
    events
}

/// Once a profile is deleted, no replay returns its display name or bio in any of its events —
/// neither users' WatchUsers nor the aggregator's WatchProfiles (from its ring) — while the
/// subscriber that was live when it happened gets the DELETED event with the last state.
#[tokio::test]
async fn deleted_profiles_are_erased_from_replays() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let mut client = mesh.users_client();
    let (id, token) = mesh.keys.new_user();
    let (_, watcher) = mesh.keys.new_user();
    create(&mut client, &token, "Gone Soon").await;
    let mut live = client
        .watch_users(bearer(&watcher, users::WatchUsersRequest::default()))
        .await
        .expect("watch")
        .into_inner();
    let mut relay = AggregatorServiceClient::new(mesh.aggregator().channel.clone());
    // The aggregator's relay has seen the profile once a replay through it shows the event.
    let mut aggregator_live = loop {
        match relay
            .watch_profiles(bearer(
                &watcher,
                aggregator::WatchProfilesRequest::default(),
            ))
            .await
        {
            Ok(stream) => break stream.into_inner(),
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    client
        .delete_user(bearer(&token, users::DeleteUserRequest { id: id.clone() }))
        .await
        .expect("delete");
    let deleted = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .expect("live event")
        .expect("open")
        .expect("event");
    assert_eq!(deleted.kind(), users::EventKind::Deleted);
    assert_eq!(
        deleted.user.as_ref().map(|u| u.display_name.as_str()),
        Some("Gone Soon"),
        "the live DELETED event carries the last state"
    );
    let relayed = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), aggregator_live.next())
            .await
            .expect("relayed")
            .expect("open")
            .expect("event");
        if event.sequence == deleted.sequence {
            break event;
        }
    };
    assert_eq!(
        relayed.profile.as_ref().map(|p| p.display_name.as_str()),
        Some("Gone Soon"),
        "the relayed live DELETED event carries the last state"
    );

    let replayed = replay(&mut client, &watcher, deleted.sequence).await;
    for event in &replayed {
        let user = event.user.as_ref().expect("user");
        assert!(
            user.display_name.is_empty() && user.bio.is_empty(),
            "users' replay shows {event:?}"
        );
    }
    let mut through_relay = relay
        .watch_profiles(bearer(
            &watcher,
            aggregator::WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch")
        .into_inner();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), through_relay.next())
            .await
            .expect("replayed")
            .expect("open")
            .expect("event");
        let profile = event.profile.as_ref().expect("profile");
        assert!(
            profile.display_name.is_empty() && profile.bio.is_empty(),
            "the aggregator's replay shows {event:?}"
        );
        if event.sequence >= deleted.sequence {
            break;
        }
    }
    mesh.stop().await;
}

/// Events older than the retention are removed; a WatchUsers (or WatchProfiles) from before
/// the retained start is OUT_OF_RANGE naming the first available sequence.
#[tokio::test]
async fn retention_answers_out_of_range_before_the_retained_start() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let mut client = mesh.users_client();
    // More events than the aggregator's relay keeps (16 in tests), so it must ask users.
    for n in 0..20 {
        let (_, token) = mesh.keys.new_user();
        create(&mut client, &token, &format!("Old {n}")).await;
    }
    // Prune as the service's task does, with a retention that covers none of them.
    let store = mesh_users::store::open(None, mesh.data.path())
        .await
        .expect("the same database");
    let through = store
        .prune(
            mesh_proto::time::unix_now_ms(),
            Some(mesh_proto::time::unix_now_ms() + 1),
        )
        .await
        .expect("prune");
    assert_eq!(through, 20);
    let (_, watcher) = mesh.keys.new_user();
    let refused = assert_code(
        client
            .watch_users(bearer(
                &watcher,
                users::WatchUsersRequest {
                    after_sequence: Some(1),
                },
            ))
            .await,
        Code::OutOfRange,
    );
    assert!(
        refused.message().contains("first available sequence is 21"),
        "{refused:?}"
    );
    client
        .watch_users(bearer(
            &watcher,
            users::WatchUsersRequest {
                after_sequence: Some(20),
            },
        ))
        .await
        .expect("from the retained start");
    let mut relay = mesh.aggregator_client();
    // Once the relay has moved past the pruned events, it sends the old position to users.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let answer = relay
            .watch_profiles(bearer(
                &watcher,
                aggregator::WatchProfilesRequest {
                    after_sequence: Some(0),
                },
            ))
            .await;
        match answer {
            Err(s) if s.code() == Code::OutOfRange => break Err::<(), _>(s),
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("the relay never refused the pruned position: {other:?}"),
        }
    };
    let refused = assert_code(refused, Code::OutOfRange);
    assert!(
        refused.message().contains("first available sequence is 21"),
        "{refused:?}"
    );
    mesh.stop().await;
}

/// Pruning removes expired sessions and revocations whose tokens have all expired.
#[tokio::test]
async fn expired_sessions_are_pruned() {
    let mesh = TestMesh::builder().start().await;
    let mut client = mesh.auth_client();
    let tokens = client
        .register(mesh_proto::auth::v1::RegisterRequest {
            email: "short@example.com".into(),
            password: mesh_testkit::PASSWORD.into(),
        })
        .await
        .expect("register")
        .into_inner()
        .tokens
        .expect("tokens");
    client
        .logout(mesh_proto::auth::v1::LogoutRequest {
            refresh_token: tokens.refresh_token,
        })
        .await
        .expect("logout");
    let store = mesh_auth::store::open(None, mesh.data.path())
        .await
        .expect("the same database");
    assert_eq!(
        store.revocations_after(0, 0, 10).await.expect("read").len(),
        1
    );
    let now = mesh_proto::time::unix_now_ms();
    let pruned = store
        .prune(now + 31 * 86_400_000, now + 31 * 86_400_000)
        .await
        .expect("prune");
    assert_eq!((pruned.sessions, pruned.revocations), (1, 1));
    mesh.stop().await;
}

/// An unknown health name is not echoed whole (at most 64 characters), and one beyond the
/// health request limit is RESOURCE_EXHAUSTED.
#[tokio::test]
async fn unknown_health_names_are_not_echoed() {
    let mesh = TestMesh::builder().start().await;
    let long = "n".repeat(900);
    let refused = health_status(&mesh.auth.channel, &long)
        .await
        .expect_err("unknown");
    assert_eq!(refused.code(), Code::NotFound);
    assert!(
        refused.message().len() < 200,
        "{} bytes",
        refused.message().len()
    );
    let huge = "n".repeat(20_000);
    let refused = health_status(&mesh.auth.channel, &huge)
        .await
        .expect_err("too big");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    mesh.stop().await;
}

/// A well-signed token issued in the future, or living far beyond the accepted lifetime, is
/// refused by every local verifier.
#[tokio::test]
async fn tokens_from_the_future_or_for_ever_are_refused() {
    let mesh = TestMesh::builder().users().start().await;
    let mut client = mesh.users_client();
    let id = uuid::Uuid::now_v7().to_string();
    let now = unix_now();
    let mut ahead = mesh.keys.user_claims(&id, "x@example.com");
    ahead.iat = now + 5 * 365 * 86_400;
    ahead.exp = ahead.iat + 900;
    let mut eternal = mesh.keys.user_claims(&id, "x@example.com");
    eternal.exp = now + 300 * 365 * 86_400;
    for claims in [ahead, eternal] {
        let token = mesh.keys.sign(&claims);
        assert_code(
            client
                .list_users(bearer(&token, users::ListUsersRequest::default()))
                .await,
            Code::Unauthenticated,
        );
    }
    mesh.stop().await;
}

/// One account cannot fill the change log: changes to one profile are limited to a burst and
/// a rate (RESOURCE_EXHAUSTED with `retry-after` beyond), and another account is unaffected.
#[tokio::test]
async fn one_profile_cannot_fill_the_log() {
    let mesh = TestMesh::builder().users().start().await;
    let mut client = mesh.users_client();
    let (_, token) = mesh.keys.new_user();
    create(&mut client, &token, "Busy").await;
    let mut refused = None;
    for n in 0..100 {
        let changed = client
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
            .await;
        if let Err(status) = changed {
            refused = Some((n, status));
            break;
        }
    }
    let (n, status) = refused.expect("a burst of 100 changes is cut short");
    assert!(n < 30, "{n} changes went through");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.metadata().get(headers::RETRY_AFTER).is_some());
    let (_, other) = mesh.keys.new_user();
    create(&mut client, &other, "Calm").await;
    mesh.stop().await;
}

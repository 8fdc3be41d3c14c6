//! WatchProfiles: the one relay's fan-out, replays from users' log, restarts, lag, limits.

use std::time::Duration;

use prost::{
    Message as _,
    bytes::{Buf as _, Bytes},
};

use mesh_proto::{
    aggregator::v1::{
        ProfileEvent, ProfileEventKind, WatchProfilesRequest,
        aggregator_service_client::AggregatorServiceClient,
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

/// A client of WatchProfiles that keeps each event's bytes as they came off the wire.
#[derive(Debug, Clone, Copy, Default)]
struct RawEvents;

impl tonic::codec::Codec for RawEvents {
    type Encode = WatchProfilesRequest;
    type Decode = Bytes;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self
    }

    fn decoder(&mut self) -> Self {
        Self
    }
}

impl tonic::codec::Encoder for RawEvents {
    type Item = WatchProfilesRequest;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: WatchProfilesRequest,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Decoder for RawEvents {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// WatchProfiles on `channel`, after `after`, as raw bytes per event.
async fn watch_raw(channel: Channel, token: &str, after: Option<i64>) -> tonic::Streaming<Bytes> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc.server_streaming(
        bearer(
            token,
            WatchProfilesRequest {
                after_sequence: after,
            },
        ),
        tonic::codegen::http::uri::PathAndQuery::from_static(
            "/mesh.aggregator.v1.AggregatorService/WatchProfiles",
        ),
        RawEvents,
    )
    .await
    .expect("watch")
    .into_inner()
}

/// The next `n` events of a raw watch.
async fn take_raw(stream: &mut tonic::Streaming<Bytes>, n: usize) -> Vec<Bytes> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} events", events.len()))
            .expect("event")
            .expect("stream open");
        events.push(event);
    }
    events
}

/// Every subscriber the relay serves gets byte-identical events — over one connection or
/// many, live or replaying — each the protobuf encoding of the event it decodes to; once a
/// profile is deleted, every replay shows its events erased alike, and its DELETED event
/// carries the last state only to those who were live.
#[tokio::test]
async fn watch_profiles_sends_every_subscriber_the_same_bytes() {
    let mesh = start().await;
    let service = mesh.keys.service("test");
    let mut first = watch_live(&mut mesh.aggregator_client(), &service).await;
    let (gone, gone_token) = profile(&mesh, "Gone").await;
    let (kept, kept_token) = profile(&mesh, "Kept").await;
    take(&mut first, 2).await;
    let channels = futures_join(4, mesh.aggregator().addr).await;
    let mut live = Vec::new();
    for n in 0..40 {
        live.push(watch_raw(channels[n % channels.len()].clone(), &service, None).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut users = mesh.users_client();
    for (token, bio) in [
        (&gone_token, "one"),
        (&kept_token, "two"),
        (&gone_token, "three"),
    ] {
        users
            .update_user(bearer(
                token,
                users::UpdateUserRequest {
                    user: Some(users::User {
                        bio: bio.into(),
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
    users
        .delete_user(bearer(
            &gone_token,
            users::DeleteUserRequest { id: gone.clone() },
        ))
        .await
        .expect("delete");
    let mut seen = Vec::new();
    for stream in &mut live {
        seen.push(take_raw(stream, 4).await);
    }
    assert!(
        seen.iter().all(|other| *other == seen[0]),
        "every live subscriber got the same bytes"
    );
    let events: Vec<ProfileEvent> = seen[0]
        .iter()
        .map(|bytes| ProfileEvent::decode(bytes.clone()).expect("decodes"))
        .collect();
    for (bytes, event) in seen[0].iter().zip(&events) {
        assert_eq!(bytes[..], event.encode_to_vec()[..], "canonical encoding");
    }
    let shown = |event: &ProfileEvent| {
        event
            .profile
            .as_ref()
            .map(|p| (p.user_id.clone(), p.display_name.clone(), p.bio.clone()))
    };
    let full = |id: &str, name: &str, bio: &str| Some((id.to_owned(), name.into(), bio.into()));
    let erased = |id: &str| Some((id.to_owned(), String::new(), String::new()));
    assert_eq!(shown(&events[1]), full(&kept, "Kept", "two"));
    assert_eq!(events[3].kind(), ProfileEventKind::Deleted);
    assert_eq!(
        shown(&events[3]),
        full(&gone, "Gone", "three"),
        "a live deletion shows the last state"
    );

    // Subscribers that replay the same stretch after the deletion, on a shared connection
    // and on connections of their own: the same bytes as each other; the kept profile's the
    // same as the live subscribers'; every event of the deleted profile erased.
    let after = events[0].sequence - 1;
    let shared = connect(mesh.aggregator().addr).await;
    let mut replays = Vec::new();
    for n in 0..6 {
        let channel = if n % 2 == 0 {
            shared.clone()
        } else {
            connect(mesh.aggregator().addr).await
        };
        let mut stream = watch_raw(channel, &service, Some(after)).await;
        replays.push(take_raw(&mut stream, 4).await);
    }
    assert!(replays.iter().all(|other| *other == replays[0]));
    assert_eq!(replays[0][1], seen[0][1]);
    for n in [0, 2, 3] {
        let replayed = ProfileEvent::decode(replays[0][n].clone()).expect("decodes");
        assert_eq!(shown(&replayed), erased(&gone), "event {n} replayed erased");
        assert_eq!(replayed.sequence, events[n].sequence);
    }
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

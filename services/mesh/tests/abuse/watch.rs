//! Replays and live subscriptions cannot starve the facade.

use std::time::Duration;

use mesh_proto::{
    aggregator::v1::{
        self as aggregator, GetMeRequest, GetProfilesRequest, WatchProfilesRequest,
        aggregator_service_client::AggregatorServiceClient,
    },
    users::v1 as users,
};
use mesh_testkit::{TestMesh, assert_code, bearer, connect};
use tokio_stream::StreamExt as _;
use tonic::{Code, transport::Channel};

/// Makes `n` profiles directly on users (minted tokens, no Argon2id): `n` events in the log.
/// Returns their ids and tokens.
async fn profiles(mesh: &TestMesh, n: usize, bio: &str) -> Vec<(String, String)> {
    let mut made = Vec::new();
    let mut client = mesh.users_client();
    for _ in 0..n {
        let (id, token) = mesh.keys.new_user();
        client
            .create_user(bearer(
                &token,
                users::CreateUserRequest {
                    user: Some(users::User {
                        display_name: "Someone".into(),
                        bio: bio.into(),
                        ..users::User::default()
                    }),
                    request_id: String::new(),
                },
            ))
            .await
            .expect("create");
        made.push((id, token));
    }
    made
}

/// A WatchProfiles stream, retried while the relay is still connecting to users.
async fn watch(
    client: &mut AggregatorServiceClient<Channel>,
    token: &str,
    after: Option<i64>,
) -> Result<tonic::Streaming<aggregator::ProfileEvent>, tonic::Status> {
    loop {
        match client
            .watch_profiles(bearer(
                token,
                WatchProfilesRequest {
                    after_sequence: after,
                },
            ))
            .await
        {
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other.map(tonic::Response::into_inner),
        }
    }
}

/// One account opens 2,000 WatchProfiles replaying the log from its start and reads none of
/// them: GetMe and GetProfiles keep working for everyone else. (Each replay used to hold its
/// own upstream stream on the connections every call shares; 2,000 filled them.)
#[tokio::test]
async fn thousands_of_replays_leave_the_facade_working() {
    let mesh = TestMesh::builder()
        .aggregator()
        .aggregator_config(|c| c.max_watch_streams_per_caller = 5_000)
        .start()
        .await;
    let made = profiles(&mesh, 50, "").await;
    let (_, attacker) = mesh.keys.new_user();
    let mut streams = Vec::new();
    let addr = mesh.aggregator().addr;
    // 25 connections of 80 streams (the server takes 100 per connection).
    let mut channels = Vec::new();
    for _ in 0..25 {
        channels.push(connect(addr).await);
    }
    for n in 0..2_000 {
        let mut client = AggregatorServiceClient::new(channels[n % channels.len()].clone());
        streams.push(watch(&mut client, &attacker, Some(0)).await.expect("watch"));
    }
    let mut client = mesh.aggregator_client();
    // GetMe needs a real session at auth.
    let (_, tokens) = mesh_testkit::sign_up(&mut client, "honest@example.com", "Someone").await;
    let honest = &tokens.access_token;
    let ids: Vec<String> = made.iter().take(10).map(|(id, _)| id.clone()).collect();
    for _ in 0..20 {
        let mut request = bearer(honest, GetMeRequest {});
        request.set_timeout(Duration::from_secs(5));
        client.get_me(request).await.expect("GetMe is served");
        let mut results = client
            .get_profiles(bearer(
                honest,
                GetProfilesRequest {
                    user_ids: ids.clone(),
                },
            ))
            .await
            .expect("GetProfiles is served")
            .into_inner();
        let mut found = 0;
        while let Some(result) = results.next().await {
            if matches!(
                result.expect("result").result,
                Some(aggregator::profile_result::Result::Profile(_))
            ) {
                found += 1;
            }
        }
        assert_eq!(found, 10, "every profile found");
    }
    drop(streams);
    mesh.stop().await;
}

/// One caller may hold at most 100 WatchProfiles streams at once (by default); another caller
/// still gets one.
#[tokio::test]
async fn one_caller_cannot_take_every_watch() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let (_, greedy) = mesh.keys.new_user();
    let (_, other) = mesh.keys.new_user();
    let addr = mesh.aggregator().addr;
    // Two connections of 50 streams each (a connection takes 100), and a third for the rest.
    let crowded = [connect(addr).await, connect(addr).await];
    let mut client = AggregatorServiceClient::new(connect(addr).await);
    let mut held = Vec::new();
    for n in 0..100 {
        let mut on = AggregatorServiceClient::new(crowded[n % 2].clone());
        held.push(
            watch(&mut on, &greedy, None)
                .await
                .expect("within the bound"),
        );
    }
    let refused = watch(&mut client, &greedy, None).await;
    assert_code(refused, Code::ResourceExhausted);
    watch(&mut client, &other, None)
        .await
        .expect("another caller is served");
    drop(held);
    // The streams count down when they end.
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if watch(&mut client, &greedy, None).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(again.is_ok(), "ended streams give their places back");
    mesh.stop().await;
}

/// Catch-up pages are bounded in all: with one page to share, a replaying subscriber whose
/// client reads nothing does not stall the next one for ever — its page is taken back after
/// the idle timeout, and the reading subscriber gets the whole log, in order.
#[tokio::test]
async fn idle_replays_give_their_pages_back() {
    let mesh = TestMesh::builder()
        .aggregator()
        .aggregator_config(|c| {
            c.catch_up_pages = 1;
            c.replay_idle_timeout = Duration::from_secs(1);
        })
        .start()
        .await;
    // Enough events (with long bios) that a client that reads nothing stops the server at its
    // flow-control window, mid-replay.
    let bio = "b".repeat(500);
    profiles(&mesh, 300, &bio).await;
    let (_, token) = mesh.keys.new_user();
    let mut idle_client = AggregatorServiceClient::new(connect(mesh.aggregator().addr).await);
    let _idle = watch(&mut idle_client, &token, Some(0))
        .await
        .expect("watch");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut reader = watch(&mut mesh.aggregator_client(), &token, Some(0))
        .await
        .expect("watch");
    let mut last = 0;
    for _ in 0..300 {
        let event = tokio::time::timeout(Duration::from_secs(20), reader.next())
            .await
            .expect("the reader is not stalled by the idle one")
            .expect("open")
            .expect("event");
        assert!(event.sequence > last, "in order, no duplicate");
        last = event.sequence;
    }
    assert_eq!(last, 300);
    mesh.stop().await;
}

/// One caller may hold at most 16 LookupProfiles streams at once.
#[tokio::test]
async fn one_caller_cannot_take_every_lookup() {
    let mesh = TestMesh::builder().aggregator().start().await;
    let (_, greedy) = mesh.keys.new_user();
    let (_, other) = mesh.keys.new_user();
    let mut client = mesh.aggregator_client();
    let lookup = |token: &str| {
        let (tx, rx) = tokio::sync::mpsc::channel::<aggregator::LookupProfilesRequest>(1);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        mesh_testkit::set_bearer(&mut request, token);
        (tx, request)
    };
    let mut held = Vec::new();
    for _ in 0..mesh_aggregator::MAX_LOOKUP_STREAMS_PER_CALLER {
        let (tx, request) = lookup(&greedy);
        let stream = client
            .lookup_profiles(request)
            .await
            .expect("within the bound");
        held.push((tx, stream));
    }
    let (_tx, request) = lookup(&greedy);
    assert_code(
        client.lookup_profiles(request).await,
        Code::ResourceExhausted,
    );
    let (_tx2, request) = lookup(&other);
    client
        .lookup_profiles(request)
        .await
        .expect("another caller is served");
    mesh.stop().await;
}

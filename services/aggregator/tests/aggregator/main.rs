//! The aggregator in-process, through the generated client: against real auth and users (on
//! SQLite) for the happy paths, and against test doubles of auth or users where a test needs a
//! barrier, a delay or a failure. One test binary, a module per capability.

mod accounts;
mod get_me;
mod health;
mod lookup;
mod profiles;
mod properties;
mod watch;
mod web;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_proto::{
    aggregator::v1::{
        Profile, ProfileEvent, ProfileResult, SignUpRequest, WatchProfilesRequest,
        aggregator_service_client::AggregatorServiceClient,
    },
    users::v1 as users,
};
use mesh_testkit::{
    MeshBuilder, TestMesh, TestServer, UsersDouble, aggregator_config, bearer, start_aggregator,
};
use tokio_stream::StreamExt as _;
use tonic::{Code, Status, Streaming, metadata::MetadataMap, transport::Channel};

/// Writers here change one profile many times in a row.
fn fast_writes(config: &mut mesh_users::Config) {
    config.profile_writes_burst = u32::MAX;
    config.profile_writes_per_second = 1e9;
}

/// These tests open many streams with one service token; the per-caller bound has tests of its
/// own (the abuse suite).
fn many_streams(config: &mut mesh_aggregator::Config) {
    config.max_watch_streams_per_caller = 10_000;
}

/// Real auth, users and the aggregator, sharing a data folder and a signing key.
fn mesh() -> MeshBuilder {
    TestMesh::builder()
        .aggregator()
        .users_config(fast_writes)
        .aggregator_config(many_streams)
}

/// [`mesh`], started.
async fn start() -> TestMesh {
    mesh().start().await
}

/// The aggregator in front of `auth` and `users` (real servers or doubles).
async fn aggregator_for(auth: SocketAddr, users: SocketAddr) -> TestServer {
    let mut config = aggregator_config(auth, users);
    many_streams(&mut config);
    start_aggregator(config).await
}

/// Signs up through the facade: the profile and the access and refresh tokens.
async fn sign_up(mesh: &TestMesh, email: &str, name: &str) -> (Profile, String, String) {
    let reply = mesh
        .aggregator_client()
        .sign_up(SignUpRequest {
            email: email.into(),
            password: "correct horse battery".into(),
            display_name: name.into(),
        })
        .await
        .expect("sign up")
        .into_inner();
    let tokens = reply.tokens.expect("tokens");
    (
        reply.profile.expect("profile"),
        tokens.access_token,
        tokens.refresh_token,
    )
}

/// A profile made directly on users for a minted user (no Argon2id), and its token.
async fn profile(mesh: &TestMesh, name: &str) -> (String, String) {
    let (id, token) = mesh.keys.new_user();
    mesh.users_client()
        .create_user(bearer(
            &token,
            users::CreateUserRequest {
                user: Some(users::User {
                    display_name: name.into(),
                    ..users::User::default()
                }),
                request_id: String::new(),
            },
        ))
        .await
        .expect("create");
    (id, token)
}

/// Stops the aggregator, users and auth of a test without a [`TestMesh`].
async fn stop(aggregator: TestServer, users: TestServer, auth: TestServer) {
    aggregator.shutdown().await.expect("stops");
    users.shutdown().await.expect("stops");
    auth.shutdown().await.expect("stops");
}

/// Every result of a GetProfiles stream.
async fn collect(mut stream: Streaming<ProfileResult>) -> Vec<ProfileResult> {
    let mut results = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("stream makes progress")
    {
        results.push(item.expect("result"));
    }
    results
}

/// The next `n` events of a watch.
async fn take(stream: &mut Streaming<ProfileEvent>, n: usize) -> Vec<ProfileEvent> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} events", events.len()))
            .expect("stream open")
            .expect("event");
        events.push(event);
    }
    events
}

/// A live watch (`after_sequence` unset) with `token`, retried while the relay has not yet
/// connected to users (UNAVAILABLE).
async fn watch_live(
    client: &mut AggregatorServiceClient<Channel>,
    token: &str,
) -> Streaming<ProfileEvent> {
    loop {
        match client
            .watch_profiles(bearer(
                token,
                WatchProfilesRequest {
                    after_sequence: None,
                },
            ))
            .await
        {
            Ok(stream) => break stream.into_inner(),
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("watch: {status:?}"),
        }
    }
}

/// The deadline a downstream call carried (its `grpc-timeout`).
fn grpc_timeout(metadata: &MetadataMap) -> Duration {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (n, unit) = v.split_at(v.len() - 1);
            let n: u64 = n.parse().ok()?;
            Some(match unit {
                "S" => Duration::from_secs(n),
                "m" => Duration::from_millis(n),
                "u" => Duration::from_micros(n),
                "n" => Duration::from_nanos(n),
                _ => return None,
            })
        })
        .expect("a grpc-timeout")
}

// ---- what the users doubles answer and count ------------------------------------------------

/// The user a users double answers for `id`.
fn double_user(id: &str) -> users::User {
    users::User {
        id: id.into(),
        display_name: format!("double {id}"),
        version: 1,
        ..users::User::default()
    }
}

/// What a users double's handlers saw: calls, calls in flight (and the most at once), the
/// metadata of the calls it records.
#[derive(Clone, Default)]
struct Probe {
    calls: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<MetadataMap>>>,
}

/// Counts a call in flight while it lives.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Probe {
    /// Counts a call.
    fn call(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }

    /// Keeps the metadata of a call.
    fn record(&self, metadata: &MetadataMap) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(metadata.clone());
        }
    }

    /// Counts a call in flight until the guard is dropped.
    fn enter(&self) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self.in_flight.clone())
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// The metadata recorded so far.
    fn seen(&self) -> Vec<MetadataMap> {
        self.seen.lock().expect("seen").clone()
    }
}

/// A users double answering BatchGetUsers with a [`double_user`] for every id, each call
/// counted on `probe` and taking `delay` first; a batch whose first id starts with
/// `fail_prefix` fails with UNAVAILABLE.
fn batch_double(
    probe: &Probe,
    delay: Option<Duration>,
    fail_prefix: Option<&'static str>,
) -> UsersDouble {
    let probe = probe.clone();
    UsersDouble::new().batch_get_users(move |request| {
        let probe = probe.clone();
        async move {
            probe.call();
            let _guard = probe.enter();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let ids = request.into_inner().ids;
            if let Some(prefix) = fail_prefix
                && ids.first().is_some_and(|id| id.starts_with(prefix))
            {
                return Err(Status::unavailable("users double: down for this batch"));
            }
            Ok(users::BatchGetUsersResponse {
                users: ids.iter().map(|id| double_user(id)).collect(),
                not_found_ids: Vec::new(),
            })
        }
    })
}

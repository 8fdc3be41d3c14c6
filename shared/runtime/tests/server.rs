//! The server runtime through real gRPC on loopback: health, reflection, the request size
//! limit and graceful shutdown, with a test implementation of the users contract standing in
//! for a service (its `GetUser` holds until the test lets it go).

use std::{sync::Arc, time::Duration};

use mesh_proto::users::v1::{
    CreateUserRequest, GetUserRequest, User, WatchUsersRequest,
    user_service_client::UserServiceClient, user_service_server::UserServiceServer,
};
use mesh_runtime::{Lifecycle, ServerConfig, ServiceSpec};
use mesh_testkit::{
    OTHER_PEER, TestServer, UsersDouble, assert_standard_server, connect, connect_from,
    health_status,
};
use tokio::sync::{Notify, mpsc};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const NAME: &str = "mesh.users.v1.UserService";
const SERVING: i32 = ServingStatus::Serving as i32;
const NOT_SERVING: i32 = ServingStatus::NotServing as i32;

struct Harness {
    server: TestServer,
    lifecycle: Lifecycle,
    started: mpsc::UnboundedReceiver<()>,
    release: Arc<Notify>,
}

/// A users service whose `GetUser` reports on `started` that it started and then waits to be
/// released, and whose `CreateUser` echoes the user back.
fn slow() -> (UsersDouble, mpsc::UnboundedReceiver<()>, Arc<Notify>) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let svc = UsersDouble::new()
        .create_user(|request: tonic::Request<CreateUserRequest>| async move {
            Ok(request.into_inner().user.unwrap_or_default())
        })
        .get_user({
            let release = release.clone();
            move |request: tonic::Request<GetUserRequest>| {
                let _ = started_tx.send(());
                let release = release.clone();
                async move {
                    release.notified().await;
                    Ok(User {
                        id: request.into_inner().id,
                        ..User::default()
                    })
                }
            }
        });
    (svc, started, release)
}

async fn start(config: ServerConfig, ready: bool) -> Harness {
    let lifecycle = Lifecycle::new(NAME);
    let (svc, started, release) = slow();
    if ready {
        lifecycle.health().set_ready(true);
    }
    let server = {
        let lifecycle = lifecycle.clone();
        TestServer::start(move |listener, shutdown| async move {
            let service =
                UserServiceServer::new(svc).max_decoding_message_size(config.max_request_bytes);
            let spec = ServiceSpec::new(service, mesh_proto::descriptor_sets::USERS)
                .long_lived(&["WatchUsers"]);
            mesh_runtime::serve(listener, spec, &lifecycle, &config, shutdown).await
        })
        .await
    };
    Harness {
        server,
        lifecycle,
        started,
        release,
    }
}

fn config(grace: Duration, max_request_bytes: usize) -> ServerConfig {
    ServerConfig {
        max_request_bytes,
        grace_period: grace,
        // These tests call from one address; the per-address share has tests of its own (the
        // abuse suite).
        peer_share_percent: 100,
        ..ServerConfig::default()
    }
}

/// Health and reflection are complete on any service the runtime serves.
#[tokio::test]
async fn serves_health_and_reflection() {
    let h = start(ServerConfig::default(), true).await;
    assert_standard_server(&h.server.channel, NAME).await;
    h.server.shutdown().await.expect("clean shutdown");
}

/// Until the service says it is ready, `""` and its name are NOT_SERVING while `liveness` is
/// SERVING; a health `Watch` sees the flip to SERVING.
#[tokio::test]
async fn not_serving_until_ready() {
    let h = start(ServerConfig::default(), false).await;
    let ch = &h.server.channel;
    assert_eq!(health_status(ch, "").await.expect("check"), NOT_SERVING);
    assert_eq!(health_status(ch, NAME).await.expect("check"), NOT_SERVING);
    assert_eq!(health_status(ch, "liveness").await.expect("check"), SERVING);

    let mut watch = HealthClient::new(ch.clone())
        .watch(HealthCheckRequest {
            service: NAME.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        watch.message().await.expect("first").expect("some").status,
        NOT_SERVING
    );
    h.lifecycle.health().set_ready(true);
    assert_eq!(
        watch.message().await.expect("second").expect("some").status,
        SERVING
    );
    assert_eq!(health_status(ch, "").await.expect("check"), SERVING);
    h.server.shutdown().await.expect("clean shutdown");
}

/// `Watch` of an unknown name answers SERVICE_UNKNOWN on an open stream, which ends at the
/// drain instead of holding the server open.
#[tokio::test]
async fn watch_unknown_name_is_service_unknown() {
    let mut h = start(ServerConfig::default(), true).await;
    let mut watch = HealthClient::new(h.server.channel.clone())
        .watch(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("first").expect("some");
    assert_eq!(first.status, ServingStatus::ServiceUnknown as i32);
    h.server.begin_shutdown();
    assert!(watch.message().await.expect("clean end").is_none());
    h.server.join().await.expect("clean shutdown");
}

/// A request over the limit is RESOURCE_EXHAUSTED (not OUT_OF_RANGE), one at the limit passes,
/// and the same connection goes on serving.
#[tokio::test]
async fn oversized_request_is_resource_exhausted() {
    let limit = 64 * 1024;
    let h = start(config(Duration::from_secs(5), limit), true).await;
    let mut client = UserServiceClient::new(h.server.channel.clone());
    let request = |bio_len: usize| CreateUserRequest {
        user: Some(User {
            bio: "x".repeat(bio_len),
            ..User::default()
        }),
        request_id: String::new(),
    };
    // A User with only a bio of n < 16 KiB bytes encodes as 3 + n bytes inside a 3-byte
    // CreateUserRequest field header: size the payload to land just over and at the limit.
    let over = client
        .create_user(request(limit))
        .await
        .expect_err("over the limit");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(over.message().contains("limit"), "{over:?}");

    let at_limit = limit - 8;
    let ok = client
        .create_user(request(at_limit))
        .await
        .expect("under the limit");
    assert_eq!(ok.into_inner().bio.len(), at_limit);
    assert_eq!(
        health_status(&h.server.channel, "").await.expect("check"),
        SERVING
    );
    h.server.shutdown().await.expect("clean shutdown");
}

/// On shutdown an in-flight call finishes, health answers NOT_SERVING (liveness still
/// SERVING) while it does, and the server returns once it is done, within the grace period.
#[tokio::test]
async fn drain_lets_in_flight_call_finish() {
    let mut h = start(config(Duration::from_secs(30), 4 << 20), true).await;
    let mut client = UserServiceClient::new(h.server.channel.clone());
    let call = tokio::spawn(async move {
        client
            .get_user(GetUserRequest {
                id: "in-flight".into(),
            })
            .await
    });
    h.started.recv().await.expect("call reached the handler");

    h.server.begin_shutdown();
    // A new connection during the drain is still answered, and says NOT_SERVING.
    let probe = connect(h.server.addr).await;
    let status = loop {
        let status = health_status(&probe, "")
            .await
            .expect("health during drain");
        if status == NOT_SERVING {
            break status;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(status, NOT_SERVING);
    assert_eq!(
        health_status(&probe, NAME).await.expect("check"),
        NOT_SERVING
    );
    assert_eq!(
        health_status(&probe, "liveness").await.expect("check"),
        SERVING
    );
    // Readiness cannot come back once draining.
    h.lifecycle.health().set_ready(true);
    assert_eq!(health_status(&probe, "").await.expect("check"), NOT_SERVING);
    assert!(h.lifecycle.drain().is_draining());

    h.release.notify_one();
    let user = call
        .await
        .expect("task")
        .expect("the in-flight call succeeds");
    assert_eq!(user.into_inner().id, "in-flight");
    tokio::time::timeout(Duration::from_secs(10), h.server.join())
        .await
        .expect("returns long before the 30 s grace period")
        .expect("clean shutdown");
}

/// A call still running when the grace period ends is cut off and the server returns.
#[tokio::test]
async fn grace_period_bounds_the_drain() {
    let mut h = start(config(Duration::from_millis(300), 4 << 20), true).await;
    let mut client = UserServiceClient::new(h.server.channel.clone());
    let call =
        tokio::spawn(async move { client.get_user(GetUserRequest { id: "stuck".into() }).await });
    h.started.recv().await.expect("call reached the handler");
    h.server.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), h.server.join())
        .await
        .expect("the drain is bounded by the grace period")
        .expect("clean shutdown");
    let cut = call
        .await
        .expect("task")
        .expect_err("the stuck call was cut off");
    assert_eq!(cut.code(), Code::Unavailable, "{cut:?}");
}

/// A server stream that does not end when the drain begins (this one sends one event and then
/// nothing) is cut off when the grace period ends: its client gets the event, then retryable
/// trailers, and the server returns.
#[tokio::test]
async fn grace_period_cuts_off_a_stream_that_ignores_the_drain() {
    let lifecycle = Lifecycle::new(NAME);
    lifecycle.health().set_ready(true);
    let svc = UsersDouble::new().watch_users(|_request| async {
        let first = futures_util::stream::once(async {
            Ok(mesh_proto::users::v1::UserEvent {
                sequence: 1,
                ..Default::default()
            })
        });
        let stream: mesh_testkit::BoxStream<mesh_proto::users::v1::UserEvent> = Box::pin(
            futures_util::StreamExt::chain(first, futures_util::stream::pending()),
        );
        Ok(stream)
    });
    let config = config(Duration::from_millis(300), 4 << 20);
    let mut server = {
        let lifecycle = lifecycle.clone();
        TestServer::start(move |listener, shutdown| async move {
            let spec = ServiceSpec::new(
                UserServiceServer::new(svc),
                mesh_proto::descriptor_sets::USERS,
            )
            .long_lived(&["WatchUsers"]);
            mesh_runtime::serve(listener, spec, &lifecycle, &config, shutdown).await
        })
        .await
    };
    let mut stream = UserServiceClient::new(server.channel.clone())
        .watch_users(WatchUsersRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("first event");
    assert_eq!(first.map(|e| e.sequence), Some(1));
    server.begin_shutdown();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends at the grace period")
        .expect_err("with a status");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert_eq!(ended.message(), "the server is shutting down; retry");
    tokio::time::timeout(Duration::from_secs(10), server.join())
        .await
        .expect("the drain is bounded by the grace period")
        .expect("clean shutdown");
}

/// A connection older than the maximum age is sent away (GOAWAY) and closed, so clients
/// reconnect — and spread over new pods; a younger one stays open.
#[tokio::test]
async fn old_connections_are_sent_away() {
    let mut aging = config(Duration::from_secs(5), 4 * 1024 * 1024);
    aging.max_connection_age = Duration::from_millis(200);
    aging.max_connection_age_grace = Duration::from_millis(200);
    for (config, closes) in [
        (aging, true),
        (config(Duration::from_secs(5), 4 * 1024 * 1024), false),
    ] {
        let harness = start(config, true).await;
        let tcp = tokio::net::TcpStream::connect(harness.server.addr)
            .await
            .expect("connect");
        let (_send, connection) = h2::client::handshake(tcp).await.expect("handshake");
        let wait = if closes { 20 } else { 1 };
        let ended = tokio::time::timeout(Duration::from_secs(wait), connection).await;
        assert_eq!(ended.is_ok(), closes, "closed by the server: {ended:?}");
        harness.server.shutdown().await.expect("stops");
    }
}

/// Beyond the concurrency limit, calls are refused at once with RESOURCE_EXHAUSTED instead of
/// queueing; the accepted ones complete; health and long-lived streams are never refused; and
/// once calls finish, new ones are accepted again.
#[tokio::test]
async fn excess_calls_are_shed_at_once() {
    let mut limited = config(Duration::from_secs(5), 4 * 1024 * 1024);
    limited.concurrency_limit = 4;
    let mut harness = start(limited, true).await;
    let client = UserServiceClient::new(harness.server.channel.clone());
    let calls: Vec<_> = (0..20)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .get_user(GetUserRequest {
                        id: format!("user-{n}"),
                    })
                    .await
            })
        })
        .collect();
    // Four start and hold; the other sixteen are answered while those four still hold.
    for _ in 0..4 {
        harness.started.recv().await.expect("started");
    }
    let mut shed = 0;
    let mut held = Vec::new();
    for call in calls {
        if call.is_finished() {
            let status = call.await.expect("task").expect_err("shed");
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            shed += 1;
        } else {
            held.push(call);
        }
    }
    // Calls still on their way are shed too, without waiting for the held ones.
    let mut still = Vec::new();
    for mut call in held {
        match tokio::time::timeout(Duration::from_millis(500), &mut call).await {
            Ok(result) => {
                let status = result.expect("task").expect_err("shed");
                assert_eq!(status.code(), Code::ResourceExhausted);
                shed += 1;
            }
            Err(_) => still.push(call),
        }
    }
    assert_eq!((shed, still.len()), (16, 4), "4 held, 16 shed");
    assert_eq!(
        health_status(&harness.server.channel, NAME).await.ok(),
        Some(SERVING),
        "health is answered at the limit"
    );
    let stream = client
        .clone()
        .watch_users(WatchUsersRequest::default())
        .await
        .expect_err("the test service does not stream");
    assert_eq!(
        stream.code(),
        Code::Unimplemented,
        "long-lived streams are not shed"
    );
    harness.release.notify_waiters();
    for call in still {
        call.await
            .expect("task")
            .expect("an accepted call completes");
    }
    let mut client = client.clone();
    let again =
        tokio::spawn(async move { client.get_user(GetUserRequest { id: "again".into() }).await });
    harness.started.recv().await.expect("accepted again");
    harness.release.notify_waiters();
    again.await.expect("task").expect("completes");
    harness.server.shutdown().await.expect("stops");
}

/// Shedding does not cost a connection: on one HTTP/2 connection, a call is accepted and held,
/// then 400 more arrive whose bodies follow their headers a moment later (as they do over a
/// real network). They are refused with RESOURCE_EXHAUSTED, and the held call still completes:
/// answering before a request has arrived would reset its stream, and HTTP/2's reset bound
/// (the rapid-reset defence) would then send the whole connection away.
#[tokio::test]
async fn shedding_on_one_connection_keeps_its_accepted_call() {
    let mut limited = config(Duration::from_secs(5), 4 * 1024 * 1024);
    limited.concurrency_limit = 1;
    let mut harness = start(limited, true).await;
    let tcp = tokio::net::TcpStream::connect(harness.server.addr)
        .await
        .expect("connect");
    let (mut send, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let held = raw_get_user(&mut send, None).expect("held call sent");
    harness.started.recv().await.expect("the held call started");

    let mut refused = 0;
    for _ in 0..4 {
        let mut pending = Vec::new();
        for _ in 0..100 {
            let request = http::Request::post("http://localhost/mesh.users.v1.UserService/GetUser")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .expect("request");
            send = send.ready().await.expect("connection open");
            let (response, body) = send.send_request(request, false).expect("sent");
            pending.push((response, body));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (_, body) in &mut pending {
            body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
                .expect("body sent");
        }
        for (response, _) in pending {
            let response = tokio::time::timeout(Duration::from_secs(10), response)
                .await
                .expect("answered")
                .expect("a response, not a broken connection");
            let status = response.headers().get("grpc-status").cloned();
            assert_eq!(
                status.as_ref().map(|v| v.as_bytes()),
                Some(&b"8"[..]),
                "RESOURCE_EXHAUSTED"
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 400);
    harness.release.notify_waiters();
    let response = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("answered")
        .expect("the held call's response arrives on its connection");
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.expect("body");
    }
    let trailers = body.trailers().await.expect("trailers").expect("present");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    harness.server.shutdown().await.expect("stops");
}

/// A raw HTTP/2 request for `GetUser` on `send`, with `extra` metadata.
fn raw_get_user(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    extra: Option<(&str, String)>,
) -> Result<h2::client::ResponseFuture, h2::Error> {
    let mut request = http::Request::post("http://localhost/mesh.users.v1.UserService/GetUser")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some((name, value)) = extra {
        request = request.header(name, value);
    }
    let request = request.body(()).expect("request");
    let (response, mut body) = send.send_request(request, false)?;
    // An empty GetUserRequest: one uncompressed frame of length 0.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    Ok(response)
}

async fn still_serves(harness: &Harness) {
    // A well-behaved client on another machine (the abuser's own address has its own bounds).
    let fresh = connect_from(harness.server.addr, OTHER_PEER);
    let status = tokio::time::timeout(Duration::from_secs(10), health_status(&fresh, NAME))
        .await
        .expect("a well-behaved client is answered");
    assert_eq!(status.ok(), Some(SERVING));
}

/// HTTP/2 abuse seen in the wild does not stop the server serving well-behaved clients: a
/// header list beyond the bound is refused; a client that resets every stream it opens
/// ("rapid reset") is sent away; hundreds of idle connections change nothing.
#[tokio::test]
async fn http2_abuse_leaves_others_served() {
    let harness = start(config(Duration::from_secs(5), 4 * 1024 * 1024), true).await;
    let addr = harness.server.addr;

    // A header list of 64 KiB.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let huge = "x".repeat(4 * mesh_runtime::MAX_HEADER_LIST_BYTES as usize);
    let refused = match raw_get_user(&mut send, Some(("x-padding", huge))) {
        Ok(response) => match tokio::time::timeout(Duration::from_secs(10), response).await {
            Ok(Ok(response)) => response.status() != http::StatusCode::OK,
            Ok(Err(_)) => true,
            Err(_) => panic!("no answer to an oversized header list"),
        },
        Err(_) => true,
    };
    assert!(refused, "an oversized header list is refused");
    still_serves(&harness).await;

    // Rapid reset: open a stream and reset it at once, thousands of times.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, connection) = h2::client::handshake(tcp).await.expect("handshake");
    let connection = tokio::spawn(connection);
    let mut sent = 0;
    for _ in 0..5_000 {
        let Ok(ready) = send.clone().ready().await else {
            break;
        };
        send = ready;
        match raw_get_user(&mut send, None) {
            Ok(response) => {
                drop(response);
                sent += 1;
            }
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), connection).await;
    eprintln!("rapid reset: {sent} streams before the server ended the connection ({ended:?})");
    assert!(
        ended.is_ok() || sent < 5_000,
        "the resetting client is sent away (it got {sent} streams in)"
    );
    still_serves(&harness).await;

    // Many idle connections (beyond the per-peer bound, the rest are closed at once).
    let mut idle = Vec::new();
    for _ in 0..300 {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        if let Ok((send, connection)) = h2::client::handshake(tcp).await {
            tokio::spawn(connection);
            idle.push(send);
        }
    }
    still_serves(&harness).await;
    drop(idle);
    harness.server.shutdown().await.expect("stops");
}

/// Every method name a service declares (long-lived, public, with a request limit) must be in
/// its contract: a misspelt one stops the server before it serves anything.
#[tokio::test]
async fn unknown_method_names_stop_the_server() {
    type Spec = fn(ServiceSpec) -> ServiceSpec;
    let cases: [(&str, Spec); 3] = [
        ("WatchUser", |spec| spec.long_lived(&["WatchUser"])),
        ("ListUser", |spec| spec.public(&["ListUser"])),
        ("GetUsers", |spec| {
            spec.request_limits(&[("GetUsers", 1024)])
        }),
    ];
    for (name, declare) in cases {
        let (svc, _started, _release) = slow();
        let spec = declare(ServiceSpec::new(
            UserServiceServer::new(svc),
            mesh_proto::descriptor_sets::USERS,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let lifecycle = Lifecycle::new(NAME);
        let config = config(Duration::from_secs(1), 4096);
        let served = tokio::time::timeout(
            Duration::from_secs(10),
            mesh_runtime::serve(listener, spec, &lifecycle, &config, std::future::pending()),
        )
        .await
        .expect("refused at once, not served");
        let err = served.expect_err(name).to_string();
        assert!(err.contains(name), "{err}");
    }
}

//! gRPC-Web on the facade's port: the same methods, tokens, errors and deadlines as native
//! gRPC, over HTTP/1.1, with CORS preflights answered for the named origins only.

use std::time::Duration;

use mesh_proto::aggregator::v1::{
    GetMeRequest, GetProfilesRequest, LoginRequest, SignUpRequest, UpdateProfileRequest,
    WatchProfilesRequest,
};
use mesh_testkit::{TestMesh, bearer, web_aggregator};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_stream::StreamExt as _;
use tonic::Code;

use crate::{fast_writes, many_streams};

/// The origin these tests' aggregator allows.
const CONSOLE: &str = "http://console.test:8080";

async fn start() -> TestMesh {
    TestMesh::builder()
        .aggregator()
        .users_config(fast_writes)
        .aggregator_config(|config| {
            many_streams(config);
            config.cors_origins =
                vec![mesh_runtime::web::parse_origin(CONSOLE).expect("an origin")];
        })
        .start()
        .await
}

/// Sends `request` on a new connection and reads the answer to its end (the request asks the
/// server to close): the status line and headers, lower-cased.
async fn http1(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // A server that refuses a request may close before reading all of it: what it answered
    // is what counts.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            answer.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered or closed in time");
    let text = String::from_utf8_lossy(&answer).to_lowercase();
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

fn preflight(origin: &str) -> String {
    format!(
        "OPTIONS /mesh.aggregator.v1.AggregatorService/GetMe HTTP/1.1\r\nHost: aggregator\r\n\
         Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\
         Access-Control-Request-Headers: authorization,content-type,x-grpc-web,grpc-timeout\r\n\
         Connection: close\r\n\r\n"
    )
}

/// A gRPC-Web GetMe with no token (an empty message), as a page of `origin` sends it.
fn get_me_from(origin: &str) -> String {
    format!(
        "POST /mesh.aggregator.v1.AggregatorService/GetMe HTTP/1.1\r\nHost: aggregator\r\n\
         Origin: {origin}\r\nContent-Type: application/grpc-web+proto\r\nX-Grpc-Web: 1\r\n\
         Content-Length: 5\r\nConnection: close\r\n\r\n\0\0\0\0\0"
    )
}

#[tokio::test]
async fn grpc_web_calls_work_as_native_ones_do() {
    let mesh = start().await;
    let mut web = web_aggregator(mesh.aggregator().addr, 2);

    // Unary, no token needed.
    let signed_up = web
        .sign_up(SignUpRequest {
            email: "web@example.com".into(),
            password: "correct horse battery".into(),
            display_name: "Web".into(),
        })
        .await
        .expect("sign up over gRPC-Web")
        .into_inner();
    let profile = signed_up.profile.expect("profile");
    let token = signed_up.tokens.expect("tokens").access_token;

    // Unary with the bearer token; the request id comes back in the headers.
    let mut get_me = bearer(&token, GetMeRequest {});
    get_me
        .metadata_mut()
        .insert("x-request-id", "web-test-1".parse().expect("ascii"));
    let me = web.get_me(get_me).await.expect("get me over gRPC-Web");
    assert_eq!(
        me.metadata().get("x-request-id").map(|v| v.to_str().ok()),
        Some(Some("web-test-1"))
    );
    let me = me.into_inner();
    assert_eq!(me.profile.expect("profile").user_id, profile.user_id);
    assert_eq!(me.sessions.len(), 1);

    // An error status in the trailers (no token), and one from auth (a wrong password).
    let refused = web.get_me(GetMeRequest {}).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let wrong = web
        .login(LoginRequest {
            email: "web@example.com".into(),
            password: "not the password".into(),
        })
        .await
        .expect_err("wrong password");
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");

    // Server streaming: every id answered once, the stream ends with OK in the trailers.
    let results: Vec<_> = web
        .get_profiles(bearer(
            &token,
            GetProfilesRequest {
                user_ids: vec![profile.user_id.clone(), "not-an-id".into()],
            },
        ))
        .await
        .expect("get profiles")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("the stream ends OK");
    assert_eq!(results.len(), 2);

    // A long-lived stream: a change made over native gRPC arrives over gRPC-Web...
    let mut watch = web
        .watch_profiles(bearer(
            &token,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch over gRPC-Web")
        .into_inner();
    mesh.aggregator_client()
        .update_profile(bearer(
            &token,
            UpdateProfileRequest {
                profile: Some(mesh_proto::aggregator::v1::Profile {
                    display_name: "Web, renamed".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
                expected_version: 0,
            },
        ))
        .await
        .expect("update over native gRPC");
    let mut names = Vec::new();
    while names.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("events in time")
            .expect("stream open")
            .expect("event");
        names.push(event.profile.map(|p| p.display_name).unwrap_or_default());
    }
    assert_eq!(names, ["Web", "Web, renamed"]);

    // ...and the caller's deadline ends it DEADLINE_EXCEEDED, as it ends a native one.
    let web_watch = web.watch_profiles(deadline_watch(&token)).await;
    let outcome = stream_outcome(web_watch).await;
    assert_eq!(outcome.code(), Code::DeadlineExceeded, "{outcome:?}");
    let native_watch = mesh
        .aggregator_client()
        .watch_profiles(deadline_watch(&token))
        .await;
    let outcome = stream_outcome(native_watch).await;
    assert_eq!(outcome.code(), Code::DeadlineExceeded, "{outcome:?}");
    mesh.stop().await;
}

/// A live WatchProfiles (it stays open) with a 300 ms deadline.
fn deadline_watch(token: &str) -> tonic::Request<WatchProfilesRequest> {
    let mut timed = bearer(
        token,
        WatchProfilesRequest {
            after_sequence: None,
        },
    );
    timed.set_timeout(Duration::from_millis(300));
    timed
}

/// How a stream that must fail ends: its status, within 10 s.
async fn stream_outcome<T>(
    opened: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> tonic::Status {
    let mut stream = match opened {
        Err(status) => return status,
        Ok(stream) => stream.into_inner(),
    };
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream ends in time")
        {
            Some(Ok(_)) => {}
            Some(Err(status)) => return status,
            None => panic!("the stream ended OK past its deadline"),
        }
    }
}

#[tokio::test]
async fn cors_preflights_allow_only_the_named_origins() {
    let mesh = start().await;
    let addr = mesh.aggregator().addr;

    let allowed = http1(addr, &preflight(CONSOLE)).await;
    assert!(allowed.starts_with("http/1.1 200"), "{allowed}");
    assert!(
        allowed.contains(&format!("access-control-allow-origin: {CONSOLE}")),
        "{allowed}"
    );
    assert!(
        allowed.contains("access-control-allow-methods: post"),
        "{allowed}"
    );
    for header in ["authorization", "x-grpc-web", "grpc-timeout"] {
        assert!(
            allowed
                .lines()
                .any(|l| l.starts_with("access-control-allow-headers:") && l.contains(header)),
            "{header} allowed: {allowed}"
        );
    }

    for other in ["https://evil.example", "http://console.test:8081", "null"] {
        let refused = http1(addr, &preflight(other)).await;
        assert!(
            refused.starts_with("http/1.1 403"),
            "{other} is refused: {refused}"
        );
        assert!(
            !refused.contains("access-control-allow-origin"),
            "{other} is not allowed: {refused}"
        );
        // Nor may a page of that origin send a call without asking first (a `no-cors` fetch,
        // or a DNS-rebinding page that is the server's origin as far as the browser knows).
        let sent = http1(addr, &get_me_from(other)).await;
        assert!(
            sent.starts_with("http/1.1 403"),
            "{other} cannot call: {sent}"
        );
    }
    // The named origin's call goes through (and is answered by the aggregator: no token).
    let named = http1(addr, &get_me_from(CONSOLE)).await;
    assert!(named.starts_with("http/1.1 200"), "{named}");
    assert!(named.contains("grpc-status: 16"), "{named}");
    assert!(
        named.contains(&format!("access-control-allow-origin: {CONSOLE}")),
        "{named}"
    );

    // A server that names no origin allows none (the default).
    let strict = TestMesh::builder().aggregator().start().await;
    let refused = http1(strict.aggregator().addr, &preflight(CONSOLE)).await;
    assert!(refused.starts_with("http/1.1 403"), "{refused}");
    let sent = http1(strict.aggregator().addr, &get_me_from(CONSOLE)).await;
    assert!(sent.starts_with("http/1.1 403"), "{sent}");
    strict.stop().await;

    // Plain HTTP/1.1 that is not gRPC-Web is refused, and auth and users speak no HTTP/1.1.
    let plain = http1(
        addr,
        "POST /mesh.aggregator.v1.AggregatorService/GetMe HTTP/1.1\r\nHost: a\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert!(plain.starts_with("http/1.1 400"), "{plain}");
    let users = http1(mesh.users().addr, &preflight(CONSOLE)).await;
    assert!(
        !users.starts_with("http/1.1"),
        "users answered HTTP/1.1: {users}"
    );
    mesh.stop().await;
}

/// HTTP/1.1 headers are bounded as HTTP/2's are (16 KiB): a request whose header block is
/// beyond it is refused with 431 before it reaches gRPC (hyper alone would take ≈ 400 KiB),
/// one far beyond hyper's buffer is never served, and the server goes on serving.
#[tokio::test]
async fn oversized_http1_headers_are_refused() {
    let mesh = start().await;
    let addr = mesh.aggregator().addr;
    let padded = |bytes: usize| {
        format!(
            "POST /mesh.aggregator.v1.AggregatorService/GetMe HTTP/1.1\r\nHost: a\r\n\
             X-Padding: {}\r\nContent-Type: application/grpc-web\r\nContent-Length: 5\r\n\
             Connection: close\r\n\r\n\0\0\0\0\0",
            "a".repeat(bytes)
        )
    };
    let over = http1(addr, &padded(20 * 1024)).await;
    assert!(over.starts_with("http/1.1 431"), "{over:.200}");
    let within = http1(addr, &padded(8 * 1024)).await;
    assert!(within.starts_with("http/1.1 200"), "{within:.200}");
    let huge = "a".repeat(1024 * 1024);
    let answer = http1(
        addr,
        &format!(
            "POST /mesh.aggregator.v1.AggregatorService/GetMe HTTP/1.1\r\nHost: a\r\n\
             X-Padding: {huge}\r\nContent-Type: application/grpc-web\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    // hyper answers 431 (or the connection is reset before the answer is read): never served.
    assert!(
        answer.is_empty() || answer.starts_with("http/1.1 431"),
        "{answer:.200}"
    );
    let mut web = web_aggregator(addr, 1);
    let refused = web.get_me(GetMeRequest {}).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    mesh.stop().await;
}

/// On shutdown a gRPC-Web WatchProfiles ends as a native one does: UNAVAILABLE in its trailer
/// frame, naming the sequence to resume from, not a dropped connection.
#[tokio::test]
async fn a_draining_server_ends_grpc_web_streams_with_unavailable() {
    let mut mesh = start().await;
    let mut web = web_aggregator(mesh.aggregator().addr, 1);
    let token = mesh.keys.service("web-test");
    let mut watch = web
        .watch_profiles(bearer(
            &token,
            WatchProfilesRequest {
                after_sequence: Some(0),
            },
        ))
        .await
        .expect("watch over gRPC-Web")
        .into_inner();
    let mut aggregator = mesh.aggregator.take().expect("an aggregator");
    aggregator.begin_shutdown();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("the stream ends within the grace period")
        {
            Some(Ok(_)) => {}
            Some(Err(status)) => break status,
            None => panic!("the stream ended OK on shutdown"),
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("after_sequence"), "{ended:?}");
    aggregator.join().await.expect("drains");
    mesh.stop().await;
}

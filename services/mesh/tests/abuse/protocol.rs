//! Two defects the contract rules out: reflection ending its stream on an unknown symbol, and
//! a call whose deadline passes inside the server ending CANCELLED.

use std::time::Duration;

use futures_util::StreamExt as _;
use mesh_proto::auth::v1::RegisterRequest;
use mesh_testkit::TestMesh;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic_reflection::pb::v1alpha::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::support::{grpc_frame, grpc_headers, grpc_status, raw_h2};

/// An unknown symbol is an `error_response` (NOT_FOUND) on the open stream, and the next
/// request on the same stream is answered.
#[tokio::test]
async fn reflection_answers_unknown_symbols_on_the_open_stream() {
    let mesh = TestMesh::builder().start().await;
    let (tx, rx) = mpsc::channel(4);
    let mut replies = ServerReflectionClient::new(mesh.auth.channel.clone())
        .server_reflection_info(ReceiverStream::new(rx))
        .await
        .expect("reflection")
        .into_inner();
    let ask = |request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    tx.send(ask(MessageRequest::FileContainingSymbol(
        "no.such.Symbol".into(),
    )))
    .await
    .expect("send");
    let reply = replies
        .next()
        .await
        .expect("a reply")
        .expect("no stream error");
    match reply.message_response {
        Some(MessageResponse::ErrorResponse(error)) => {
            assert_eq!(error.error_code, tonic::Code::NotFound as i32, "{error:?}");
        }
        other => panic!("expected an error_response, got {other:?}"),
    }
    tx.send(ask(MessageRequest::ListServices(String::new())))
        .await
        .expect("send on the same stream");
    let reply = replies.next().await.expect("a second reply").expect("ok");
    assert!(matches!(
        reply.message_response,
        Some(MessageResponse::ListServicesResponse(_))
    ));
    mesh.stop().await;
}

/// 100 Register calls with a 1 ms deadline all end DEADLINE_EXCEEDED — never CANCELLED
/// ("Timeout expired", tonic's own timeout winning the race). Sent by hand, so that no client
/// timer answers first.
#[tokio::test]
async fn expired_deadlines_are_deadline_exceeded() {
    let mesh = TestMesh::builder().start().await;
    let mut send = raw_h2(mesh.auth.addr).await;
    let body = grpc_frame(&RegisterRequest {
        email: "late@example.com".into(),
        password: "correct horse battery".into(),
    });
    let mut codes = Vec::new();
    for _ in 0..100 {
        send = send.ready().await.expect("ready");
        let (response, mut stream) = send
            .send_request(
                grpc_headers(
                    "/mesh.auth.v1.AuthService/Register",
                    &[(mesh_proto::headers::GRPC_TIMEOUT, "1m")],
                ),
                false,
            )
            .expect("send");
        stream.send_data(body.clone(), true).expect("body");
        let code = tokio::time::timeout(Duration::from_secs(10), grpc_status(response))
            .await
            .expect("answered");
        codes.push(code);
    }
    assert!(
        codes
            .iter()
            .all(|c| *c == Some(tonic::Code::DeadlineExceeded as i32)),
        "{codes:?}"
    );
    mesh.stop().await;
}

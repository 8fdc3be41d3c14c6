//! A call holds a permit only while it is really being served; connections are bounded per
//! peer, and silent or idle ones are closed within seconds.

use std::time::Duration;

use mesh_proto::auth::v1::{GetJwksRequest, auth_service_client::AuthServiceClient};
use mesh_testkit::{OTHER_PEER, TestMesh, connect_from};
use tokio::io::AsyncReadExt as _;

use crate::support::{grpc_headers, grpc_status, raw_h2};

/// 1,000 streams that send headers and never a body (HTTP/2 slowloris) leave other clients
/// served at once, and each is answered DEADLINE_EXCEEDED when the request timeout passes.
#[tokio::test]
async fn headers_only_streams_hold_no_permits() {
    let mesh = TestMesh::builder()
        .auth_config(|c| {
            c.server.request_timeout = Duration::from_secs(2);
            c.server.concurrency_limit = 64;
        })
        .start()
        .await;
    let addr = mesh.auth.addr;
    let mut held = Vec::new();
    // 100 streams per connection: the server's bound.
    for _ in 0..10 {
        let mut send = raw_h2(addr).await;
        for _ in 0..100 {
            send = send.ready().await.expect("stream slot");
            let (response, body) = send
                .send_request(
                    grpc_headers("/mesh.auth.v1.AuthService/GetJwks", &[]),
                    false,
                )
                .expect("headers sent");
            held.push((response, body));
        }
    }
    // Let the server see every stream.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut honest = AuthServiceClient::new(connect_from(addr, OTHER_PEER));
    for _ in 0..20 {
        let mut request = tonic::Request::new(GetJwksRequest {});
        request.set_timeout(Duration::from_secs(5));
        honest
            .get_jwks(request)
            .await
            .expect("a well-behaved client is served while 1,000 streams wait for their bodies");
    }

    // The request timeout answers the waiting streams themselves.
    let (response, _body) = held.pop().expect("a stream");
    let code = tokio::time::timeout(Duration::from_secs(10), grpc_status(response))
        .await
        .expect("answered within the request timeout");
    assert_eq!(code, Some(tonic::Code::DeadlineExceeded as i32));
    drop(held);
    mesh.stop().await;
}

/// A TCP connection that never speaks is closed within the handshake timeout, and an HTTP/2
/// connection with no call is closed within the idle timeout: neither is kept for minutes.
#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let mesh = TestMesh::builder()
        .auth_config(|c| {
            c.server.handshake_timeout = Duration::from_secs(1);
            c.server.max_connection_idle = Duration::from_secs(1);
        })
        .start()
        .await;
    let addr = mesh.auth.addr;

    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte))
        .await
        .expect("the server closes a silent connection within seconds");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (_send, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the server closes an idle HTTP/2 connection within seconds")
        .ok();
    mesh.stop().await;
}

/// One address may hold only so many connections: one more is closed at once, while another
/// address is served.
#[tokio::test]
async fn connections_per_peer_are_bounded() {
    let mesh = TestMesh::builder()
        .auth_config(|c| c.server.max_connections_per_peer = 8)
        .start()
        .await;
    let addr = mesh.auth.addr;
    let mut kept = Vec::new();
    for _ in 0..8 {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, connection) = h2::client::handshake(tcp).await.expect("handshake");
        tokio::spawn(connection);
        kept.push(send);
    }
    // The ninth: accepted by the kernel, closed by the server before HTTP/2 begins.
    let mut ninth = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), ninth.read(&mut byte))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let mut other = AuthServiceClient::new(connect_from(addr, OTHER_PEER));
    other
        .get_jwks(GetJwksRequest {})
        .await
        .expect("another address is served");
    drop(kept);
    mesh.stop().await;
}

/// A client that never reads its answers (a zero HTTP/2 window) keeps no concurrency permit
/// once its unary calls have been answered: other clients are served.
#[tokio::test]
async fn unread_answers_hold_no_permits() {
    let mesh = TestMesh::builder()
        .auth_config(|c| {
            c.server.concurrency_limit = 16;
            c.server.peer_share_percent = 100;
        })
        .start()
        .await;
    let addr = mesh.auth.addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let body = crate::support::grpc_frame(&GetJwksRequest {});
    let mut unread = Vec::new();
    for _ in 0..64 {
        send = send.ready().await.expect("ready");
        let (response, mut stream) = send
            .send_request(
                grpc_headers("/mesh.auth.v1.AuthService/GetJwks", &[]),
                false,
            )
            .expect("send");
        stream.send_data(body.clone(), true).expect("body");
        unread.push(response);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut honest = AuthServiceClient::new(connect_from(addr, OTHER_PEER));
    for _ in 0..10 {
        honest
            .get_jwks(GetJwksRequest {})
            .await
            .expect("served while 64 answers wait unread");
    }
    drop(unread);
    mesh.stop().await;
}

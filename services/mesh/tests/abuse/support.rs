//! What the abuse tests share: raw HTTP/2 requests, waiting for a condition (sign-ups are the
//! test kit's).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;

/// The real `mesh` binary.
pub(crate) fn mesh_exe() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_mesh"))
}

/// An HTTP/2 connection made by hand (no gRPC client), for requests no well-behaved client
/// would send.
pub(crate) async fn raw_h2(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    send
}

/// A gRPC request's headers for `path`, with `extra` metadata.
pub(crate) fn grpc_headers(path: &str, extra: &[(&str, &str)]) -> http::Request<()> {
    let mut request = http::Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(()).expect("request")
}

/// One uncompressed gRPC frame around `message`.
pub(crate) fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&body);
    frame.into()
}

/// The grpc-status of a response, from its headers (a trailers-only answer) or its trailers.
pub(crate) async fn grpc_status(response: h2::client::ResponseFuture) -> Option<i32> {
    let response = response.await.ok()?;
    let status = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    if let Some(code) = status(response.headers()) {
        return Some(code);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    status(&body.trailers().await.ok()??)
}

/// Polls `check` every 20 ms until it is true, for at most `limit`; how long that took, or
/// `None` if it never became true.
pub(crate) async fn within<F, Fut>(limit: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if check().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

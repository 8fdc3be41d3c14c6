//! The browser console `mesh up` serves: one page and its script, built from `console/` and
//! embedded in the binary, so `cargo build` needs no Node.js.
//!
//! The page calls the aggregator itself over gRPC-Web (the aggregator allows this server's
//! origin through CORS); this server only hands out two static files. It is hyper's HTTP/1.1
//! server (already in tonic's tree), not a framework: two paths need no router.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

/// The page, as `console/build.mjs` writes it.
const INDEX_HTML: &str = include_str!("../../../console/dist/index.html");
/// The page's script: the generated clients, Connect's gRPC-Web transport and the page.
const CONSOLE_JS: &str = include_str!("../../../console/dist/console.js");
/// What the page's `<meta name="mesh-aggregator">` holds until it is served.
const AGGREGATOR_PLACEHOLDER: &str = "{{MESH_AGGREGATOR_URL}}";

/// Connections served at once: the console is for the developer's own browser.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The two responses, made once.
struct Files {
    index: Bytes,
    script: Bytes,
    /// The page may talk to itself and to the aggregator, nothing else.
    policy: String,
}

/// Serves the console on `listener` until the task is dropped; the page calls `aggregator_url`.
pub(crate) async fn serve(listener: TcpListener, aggregator_url: String) {
    let files = Arc::new(Files {
        index: Bytes::from(INDEX_HTML.replace(AGGREGATOR_PLACEHOLDER, &aggregator_url)),
        script: Bytes::from_static(CONSOLE_JS.as_bytes()),
        policy: format!(
            "default-src 'self'; connect-src 'self' {aggregator_url}; img-src 'self' data:; \
             style-src 'self' 'unsafe-inline'; frame-ancestors 'none'"
        ),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: wait a moment rather than spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let _ = stream.set_nodelay(true);
        let files = files.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let files = files.clone();
                async move { Ok::<_, Infallible>(answer(&files, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// Binds the console's address.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn answer(files: &Files, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let (body, kind) = match req.uri().path() {
        "/" | "/index.html" => (files.index.clone(), "text/html; charset=utf-8"),
        "/console.js" => (files.script.clone(), "text/javascript; charset=utf-8"),
        _ => return plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    let body = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    Response::builder()
        .header(header::CONTENT_TYPE, kind)
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CONTENT_SECURITY_POLICY, files.policy.as_str())
        .body(Full::new(body))
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "\n"))
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

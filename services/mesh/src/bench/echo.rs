//! The baseline: a bare tonic echo server (no layers, no health, no authentication) and the
//! client calls against it. Every scenario measures it beside its own calls, with the same
//! callers and connections, so each figure has a bare RPC hop on this machine to be read
//! against.

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use futures_util::StreamExt as _;
use mesh_proto::bench::v1::{
    EchoRequest, EchoResponse, SubscribeRequest, SubscribeResponse,
    echo_service_client::EchoServiceClient,
    echo_service_server::{EchoService, EchoServiceServer},
};
use mesh_testkit::TestServer;
use tonic::{Request, Response, Status};

use super::{
    BenchError, Settings,
    fixtures::{setup, start_server, stop},
    measure::{Measurement, drive},
};

/// The echo service.
#[derive(Debug, Clone, Copy)]
pub(super) struct Echo;

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            payload: request.into_inner().payload,
        }))
    }

    type SubscribeStream = SubscribeStream;

    /// One message, then an open stream with nothing in it: no task, no channel.
    async fn subscribe(
        &self,
        _request: Request<SubscribeRequest>,
    ) -> Result<Response<SubscribeStream>, Status> {
        let first = futures_util::stream::once(async { Ok(SubscribeResponse { sequence: 1 }) });
        Ok(Response::new(Box::pin(
            first.chain(futures_util::stream::pending()),
        )))
    }
}

/// Serves the echo on `listener` until `stopped` resolves.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    stopped: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    // The incoming stream sets TCP_NODELAY itself: the builder's setting does not reach a
    // listener handed in, and without it replies wait on delayed ACKs (40 ms stalls).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(EchoServiceServer::new(Echo))
        .serve_with_incoming_shutdown(incoming, stopped)
        .await
}

/// An echo server on a loopback port of the servers' runtime.
pub(super) async fn start() -> Result<TestServer, BenchError> {
    start_server(TestServer::start(serve)).await
}

/// The baseline measurement: `Echo` with `settings.payload` bytes each way, from the same
/// callers over the same number of connections as the scenario's own calls.
pub(super) async fn baseline(settings: &Settings) -> Result<Measurement, BenchError> {
    let server = start().await?;
    let channels = Arc::new(super::channels(server.addr, settings.connections).await?);
    let payload = bytes::Bytes::from(vec![0x5a; settings.payload]);
    let call = move |worker: usize| {
        let mut client = EchoServiceClient::new(channels[worker % channels.len()].clone());
        let request = EchoRequest {
            payload: payload.to_vec(),
        };
        async move { client.echo(request).await.is_ok() }
    };
    let driven = drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        call,
    )
    .await;
    stop(server).await;
    Ok(driven.measurement(format!("echo, {} B (baseline)", settings.payload)))
}

/// `n` idle `Subscribe` streams against an echo server in a process of its own (`mesh bench
/// echo-server`): its RSS per stream, the bare cost the WatchProfiles figure is read against.
pub(super) async fn idle_stream_bytes(n: usize, per_connection: usize) -> Result<f64, BenchError> {
    let exe = std::env::current_exe().map_err(setup)?;
    let addr: SocketAddr = mesh_testkit::free_addr();
    let mut child = tokio::process::Command::new(exe)
        .args(["bench", "echo-server", "--listen", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(setup)?;
    let pid = child
        .id()
        .ok_or_else(|| setup("the echo server exited at once"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Ok(channel) = super::channels(addr, 1).await {
            break channel;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(setup("the echo server never listened"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut connections = first;
    connections.extend(super::channels(addr, n.div_ceil(per_connection).saturating_sub(1)).await?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = mesh_testkit::proc_status_kib(pid, "VmRSS");
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut client = EchoServiceClient::new(connections[i % connections.len()].clone());
        let mut stream = client
            .subscribe(SubscribeRequest {})
            .await
            .map_err(|e| setup(format!("subscribe {i}: {e}")))?
            .into_inner();
        stream
            .message()
            .await
            .map_err(|e| setup(format!("subscribe {i}: {e}")))?;
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = mesh_testkit::proc_status_kib(pid, "VmRSS");
    drop(streams);
    let _ = child.kill().await;
    Ok(after.saturating_sub(before) as f64 * 1024.0 / n.max(1) as f64)
}

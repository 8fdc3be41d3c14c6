//! The baseline: a bare tonic echo server (no layers, no health, no authentication) and the
//! client calls against it. Every scenario measures it beside its own calls, with the same
//! callers and connections, so each figure has a bare RPC hop on this machine to be read
//! against.

use std::{net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use futures_util::StreamExt as _;
use mesh_proto::bench::v1::{
    EchoRequest, EchoResponse, PublishRequest, PublishResponse, SubscribeRequest,
    SubscribeResponse,
    echo_service_client::EchoServiceClient,
    echo_service_server::{EchoService, EchoServiceServer},
};
use mesh_testkit::TestServer;
use tonic::{Request, Response, Status};

use super::{
    BenchError, Settings,
    fan_out::{CpuShare, Round},
    fixtures::{setup, start_server, stop},
    measure::{Latencies, Measurement, drive},
};

/// The echo service, and the one broadcast its `Subscribe` streams follow.
#[derive(Debug, Clone)]
pub(super) struct Echo {
    published: tokio::sync::broadcast::Sender<SubscribeResponse>,
}

impl Echo {
    fn new() -> Self {
        // Every subscriber reads each message before the next is published (the bench waits
        // for all of them), so a short buffer never lags.
        Self {
            published: tokio::sync::broadcast::channel(16).0,
        }
    }
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            payload: request.into_inner().payload,
        }))
    }

    type SubscribeStream = SubscribeStream;

    /// One message, then whatever is published: no task of its own, only a receiver.
    async fn subscribe(
        &self,
        _request: Request<SubscribeRequest>,
    ) -> Result<Response<SubscribeStream>, Status> {
        let first = futures_util::stream::once(async {
            Ok(SubscribeResponse {
                sequence: 1,
                payload: Vec::new(),
            })
        });
        let published = futures_util::stream::unfold(self.published.subscribe(), |mut rx| async {
            loop {
                match rx.recv().await {
                    Ok(message) => return Some((Ok(message), rx)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(first.chain(published))))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let request = request.into_inner();
        let subscribers = self
            .published
            .send(SubscribeResponse {
                sequence: request.sequence,
                payload: request.payload,
            })
            .unwrap_or(0);
        Ok(Response::new(PublishResponse {
            subscribers: subscribers as u64,
        }))
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
        .add_service(EchoServiceServer::new(Echo::new()))
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
    let measured = drive_echo(
        settings,
        server.addr,
        format!("echo, {} B (baseline)", settings.payload),
    )
    .await;
    stop(server).await;
    measured
}

/// `Echo` calls as in [`baseline`], to the echo server (or a relay in front of one) at `addr`.
pub(super) async fn drive_echo(
    settings: &Settings,
    addr: SocketAddr,
    name: String,
) -> Result<Measurement, BenchError> {
    drive_echoes(settings, &[addr], name).await
}

/// Calls of one `Echo` to each of `addrs` at once, as in [`baseline`]: each call ends when the
/// last of its echoes has.
pub(super) async fn drive_echoes(
    settings: &Settings,
    addrs: &[SocketAddr],
    name: String,
) -> Result<Measurement, BenchError> {
    let mut each = Vec::with_capacity(addrs.len());
    for addr in addrs {
        each.push(super::channels(*addr, settings.connections).await?);
    }
    let each = Arc::new(each);
    let payload = bytes::Bytes::from(vec![0x5a; settings.payload]);
    let call = move |worker: usize| {
        let echoes: Vec<_> = each
            .iter()
            .map(|channels| {
                let mut client = EchoServiceClient::new(channels[worker % channels.len()].clone());
                let request = EchoRequest {
                    payload: payload.to_vec(),
                };
                async move { client.echo(request).await.is_ok() }
            })
            .collect();
        async move {
            futures_util::future::join_all(echoes)
                .await
                .into_iter()
                .all(|ok| ok)
        }
    };
    let driven = drive(
        settings.concurrency,
        settings.warmup,
        settings.duration,
        call,
    )
    .await;
    Ok(driven.measurement(name))
}

/// What the bare broadcast measured: the baseline of `watch`.
#[derive(Debug, Default)]
pub(super) struct BareFanOut {
    /// Server RSS per idle stream, in bytes.
    pub(super) bytes_per_stream: f64,
    /// From each message published to its arrival at each stream.
    pub(super) latencies: Latencies,
    /// CPU of the server and of this process while the messages went out.
    pub(super) cpu: CpuShare,
}

/// `n` `Subscribe` streams against an echo server in a process of its own (`mesh bench
/// echo-server`), `per_connection` to a connection: its RSS per idle stream, then `events`
/// messages of `payload` bytes published, each once the last reached every stream — the bare
/// tonic costs the WatchProfiles figures are read against.
pub(super) async fn bare_fan_out(
    n: usize,
    per_connection: usize,
    events: usize,
    payload: usize,
) -> Result<BareFanOut, BenchError> {
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
    let publisher = EchoServiceClient::new(first[0].clone());
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

    let round = Round::new(events, n);
    let followers: Vec<_> = streams
        .into_iter()
        .map(|stream| round.follow(stream, ()))
        .collect();
    // As for WatchProfiles: every follower waiting on its stream before the first message.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let payload = vec![0x5a; payload];
    let cpu = round
        .send("of the bare broadcast", pid, |k| {
            let mut publisher = publisher.clone();
            let request = PublishRequest {
                sequence: k as u64 + 2,
                payload: payload.clone(),
            };
            async move {
                let reached = publisher
                    .publish(request)
                    .await
                    .map_err(|e| setup(format!("publish: {e}")))?
                    .into_inner()
                    .subscribers;
                if reached < n as u64 {
                    return Err(setup(format!("published to {reached} of {n} streams")));
                }
                Ok(())
            }
        })
        .await?;
    let mut latencies = Latencies::default();
    for follower in followers {
        if let Ok(((), each, _stream)) = follower.await {
            latencies.merge(&each);
        }
    }
    let _ = child.kill().await;
    Ok(BareFanOut {
        bytes_per_stream: after.saturating_sub(before) as f64 * 1024.0 / n.max(1) as f64,
        latencies,
        cpu,
    })
}

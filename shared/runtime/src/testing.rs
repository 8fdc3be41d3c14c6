//! Helpers for tests of mesh servers (feature `test-util`): start a server in-process on
//! `127.0.0.1:0`, ask its health, list and describe its services through reflection v1 and
//! v1alpha.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Whatever error a service's `serve` returns.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A server running in-process on a loopback port chosen by the OS.
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// A channel to it.
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), BoxError>>,
}

impl TestServer {
    /// Binds `127.0.0.1:0` and runs `serve(listener, shutdown)` on it.
    pub async fn start<F, Fut, E>(serve: F) -> Self
    where
        F: FnOnce(TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        Self::start_on(([127, 0, 0, 1], 0).into(), serve).await
    }

    /// Binds `addr` (e.g. the address of a server that was just stopped, to restart it) and
    /// runs `serve(listener, shutdown)` on it.
    pub async fn start_on<F, Fut, E>(addr: SocketAddr, serve: F) -> Self
    where
        F: FnOnce(TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let served = serve(listener, shutdown);
        let handle = tokio::spawn(async move { served.await.map_err(BoxError::from) });
        let channel = connect(addr).await;
        Self {
            addr,
            channel,
            stop: Some(stop),
            handle,
        }
    }

    /// Sends the shutdown signal without waiting for the server to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts the server down and waits for `serve` to return.
    pub async fn shutdown(mut self) -> Result<(), BoxError> {
        self.begin_shutdown();
        self.handle.await?
    }

    /// Waits for `serve` to return (after [`TestServer::begin_shutdown`]).
    pub async fn join(self) -> Result<(), BoxError> {
        self.handle.await?
    }
}

/// A channel to `addr` (connected lazily, so it also works before the server accepts).
pub async fn connect(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Another loopback source address than the default `127.0.0.1`: a second client machine, as
/// far as a server's per-peer bounds can tell.
pub const OTHER_PEER: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A channel to `addr` whose connections come from the source address `from` (e.g.
/// [`OTHER_PEER`]).
pub fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid endpoint")
        .connect_timeout(Duration::from_secs(5))
        .local_address(Some(from))
        .connect_lazy()
}

/// The health status (as the protocol's number) the server reports for `name`.
pub async fn health_status(channel: &Channel, name: &str) -> Result<i32, Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: name.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status)
}

macro_rules! reflection_helpers {
    ($version:ident, $list:ident, $describe:ident) => {
        /// The services reflection lists, sorted.
        pub async fn $list(channel: &Channel) -> Vec<String> {
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut replies = ServerReflectionClient::new(channel.clone())
                .server_reflection_info(tokio_stream::once(request))
                .await
                .expect("reflection call")
                .into_inner();
            let reply = replies.message().await.expect("reflection reply").expect("one reply");
            match reply.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
                    names.sort();
                    names
                }
                other => panic!("unexpected reflection reply {other:?}"),
            }
        }

        /// Whether reflection can describe `symbol` (it returns the file that defines it).
        pub async fn $describe(channel: &Channel, symbol: &str) -> bool {
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
            };
            let mut replies = ServerReflectionClient::new(channel.clone())
                .server_reflection_info(tokio_stream::once(request))
                .await
                .expect("reflection call")
                .into_inner();
            let reply = replies.message().await.expect("reflection reply").expect("one reply");
            matches!(
                reply.message_response,
                Some(MessageResponse::FileDescriptorResponse(files))
                    if !files.file_descriptor_proto.is_empty()
            )
        }
    };
}

reflection_helpers!(v1, list_services_v1, describes_v1);
reflection_helpers!(v1alpha, list_services_v1alpha, describes_v1alpha);

/// The services every mesh server lists besides its own, sorted with it.
pub fn expected_services(own: &str) -> Vec<String> {
    let mut names = vec![
        own.to_owned(),
        "grpc.health.v1.Health".to_owned(),
        "grpc.reflection.v1.ServerReflection".to_owned(),
        "grpc.reflection.v1alpha.ServerReflection".to_owned(),
    ];
    names.sort();
    names
}

/// Checks what every mesh server must do once started: `""` and its own name `SERVING`,
/// `liveness` `SERVING`, an unknown name `NOT_FOUND`, and reflection v1 and v1alpha listing
/// the same four services and describing each of them.
pub async fn assert_standard_server(channel: &Channel, own: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let serving = ServingStatus::Serving as i32;
    assert_eq!(health_status(channel, "").await.expect("\"\""), serving);
    assert_eq!(
        health_status(channel, own).await.expect("own name"),
        serving
    );
    assert_eq!(
        health_status(channel, "liveness").await.expect("liveness"),
        serving
    );
    let unknown = health_status(channel, "no.such.Service")
        .await
        .expect_err("unknown name");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let expected = expected_services(own);
    assert_eq!(list_services_v1(channel).await, expected);
    assert_eq!(list_services_v1alpha(channel).await, expected);
    for symbol in &expected {
        assert!(
            describes_v1(channel, symbol).await,
            "v1 cannot describe {symbol}"
        );
        assert!(
            describes_v1alpha(channel, symbol).await,
            "v1alpha cannot describe {symbol}"
        );
    }
}

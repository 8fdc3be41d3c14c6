//! Binding, assembling and running one mesh server, and its graceful shutdown.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use prost::Message as _;
use tokio::net::TcpListener;
use tonic::{server::NamedService, service::Routes};

use crate::{
    ServerConfig,
    admission::{Admission, AdmissionLayer, MethodLimits, MethodPolicy, Quota},
    conn::{self, ConnLimits},
    drain::{Drain, InFlight},
    health::Health,
    reflection::{ReflectionV1, ReflectionV1Alpha},
    tls::{ServerTls, ServerTlsFiles, TLS_RELOAD_INTERVAL},
    web::WebAccess,
};

/// The shortest drain: how long a draining server keeps serving even with nothing in flight
/// (never longer than the grace period).
pub const DRAIN_SETTLE: Duration = Duration::from_millis(500);

/// Why a server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed (in use, not permitted, …).
        #[source]
        source: io::Error,
    },
    /// The reflection service could not be built from the descriptor sets.
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed while serving.
    #[error("the server failed")]
    Transport(#[from] tonic::transport::Error),
    /// The serving task panicked.
    #[error("the server task failed")]
    Task(#[from] tokio::task::JoinError),
    /// The TLS certificate, key or CA could not be loaded.
    #[error("TLS")]
    Tls(#[from] crate::tls::TlsError),
    /// A channel to another service could not be made (e.g. an `https://` URL without a CA).
    #[error("cannot reach another service")]
    Channel(#[from] crate::client::ChannelError),
    /// The service's declaration does not match its contract (a bug caught at start-up).
    #[error("the service declaration does not match its descriptors: {0}")]
    Spec(String),
}

/// Binds a TCP listener on `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// The health and drain state of one server, made before the service so that the service can
/// report readiness and end its long-lived streams.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    health: Health,
    drain: Drain,
}

impl Lifecycle {
    /// A starting server for `service_name`: `NOT_SERVING` until it says it is ready.
    pub fn new(service_name: &'static str) -> Self {
        let drain = Drain::new();
        Self {
            health: Health::new(service_name, drain.clone()),
            drain,
        }
    }

    /// The server's health state.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The drain signal for long-lived streams.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }
}

/// The largest header list (all of a request's metadata) a server accepts: room for the
/// longest token a verifier looks at (8 KiB; a few hundred bytes in practice), trace context
/// and request id, so an over-long token is still answered UNAUTHENTICATED.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// What one client connection may send before the server reads it (HTTP/2 flow control): the
/// memory a connection can make the server hold in unread request data.
pub const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;
/// The same per stream.
pub const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
/// The largest health request: a service name.
pub const MAX_HEALTH_REQUEST_BYTES: usize = 1024;
/// The largest reflection request message: a symbol or file name.
pub const MAX_REFLECTION_REQUEST_BYTES: usize = 16 * 1024;

/// What a service hands to [`serve`]: its tonic service and its contract's descriptors.
#[derive(Debug)]
pub struct ServiceSpec {
    name: &'static str,
    descriptor_set: &'static [u8],
    routes: Routes,
    long_lived: &'static [&'static str],
    public: &'static [&'static str],
    limits: &'static [(&'static str, usize)],
    web: Option<WebAccess>,
}

impl ServiceSpec {
    /// The service `svc` (a generated `…Server`), described by `descriptor_set` (the encoded
    /// `FileDescriptorSet` of its package).
    pub fn new<S>(svc: S, descriptor_set: &'static [u8]) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self {
            name: S::NAME,
            descriptor_set,
            routes: Routes::new(svc),
            long_lived: &[],
            public: &[],
            limits: &[],
            web: None,
        }
    }

    /// Serves browsers too: HTTP/1.1 beside HTTP/2 on the same port, and CORS preflights
    /// answered for the origins `access` names (see [`crate::web`]).
    pub fn grpc_web(mut self, access: WebAccess) -> Self {
        self.web = Some(access);
        self
    }

    /// Declares the service's long-lived streaming methods (by name, e.g. `WatchUsers`): they
    /// are not counted against the concurrency limit.
    pub fn long_lived(mut self, methods: &'static [&'static str]) -> Self {
        self.long_lived = methods;
        self
    }

    /// Names the methods the service's authentication layer lets through without a token
    /// (the same list it was built with), so that a misspelt or removed name stops the server
    /// at start-up instead of silently guarding nothing — or everything.
    pub fn public(mut self, methods: &'static [&'static str]) -> Self {
        self.public = methods;
        self
    }

    /// Declares the largest request message of each method (by name), where the server-wide
    /// `--max-request-bytes` is far more than the method needs. A method not listed takes the
    /// server-wide limit; a method's limit is never above it.
    pub fn request_limits(mut self, limits: &'static [(&'static str, usize)]) -> Self {
        self.limits = limits;
        self
    }

    /// The service's methods as its descriptor set declares them: `(name, client_streaming,
    /// server_streaming)`.
    pub fn methods(&self) -> Result<Vec<(String, bool, bool)>, ServeError> {
        let set = prost_types::FileDescriptorSet::decode(self.descriptor_set)
            .map_err(|e| ServeError::Spec(format!("descriptor set: {e}")))?;
        let service = set
            .file
            .iter()
            .flat_map(|file| {
                file.service
                    .iter()
                    .map(move |service| (file.package(), service))
            })
            .find(|(package, service)| format!("{package}.{}", service.name()) == self.name)
            .map(|(_, service)| service)
            .ok_or_else(|| ServeError::Spec(format!("no service {} in it", self.name)))?;
        Ok(service
            .method
            .iter()
            .map(|m| {
                (
                    m.name().to_owned(),
                    m.client_streaming(),
                    m.server_streaming(),
                )
            })
            .collect())
    }

    /// Checks that every method the declaration names exists, and builds the per-method
    /// policies of the service, health and reflection.
    fn policies(&self, config: &ServerConfig) -> Result<MethodLimits, ServeError> {
        let methods = self.methods()?;
        let known = |name: &str| methods.iter().any(|(m, _, _)| m == name);
        for name in self
            .long_lived
            .iter()
            .chain(self.public)
            .chain(self.limits.iter().map(|(name, _)| name))
        {
            if !known(name) {
                return Err(ServeError::Spec(format!(
                    "{} has no method {name}",
                    self.name
                )));
            }
        }
        let mut policies = MethodLimits::default();
        for (name, client_streaming, server_streaming) in methods {
            let limit = self
                .limits
                .iter()
                .find(|(m, _)| *m == name)
                .map_or(config.max_request_bytes, |(_, limit)| {
                    (*limit).min(config.max_request_bytes)
                });
            let long_lived = self.long_lived.contains(&name.as_str());
            policies.insert(
                format!("/{}/{name}", self.name),
                MethodPolicy {
                    max_request_bytes: limit,
                    client_streaming,
                    server_streaming,
                    shed: !long_lived && !client_streaming,
                    counted: true,
                },
            );
        }
        let infrastructure = |max_request_bytes, client_streaming| MethodPolicy {
            max_request_bytes,
            client_streaming,
            server_streaming: true,
            shed: false,
            counted: false,
        };
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
        ] {
            policies.insert(
                path.to_owned(),
                infrastructure(MAX_HEALTH_REQUEST_BYTES, false),
            );
        }
        for version in ["v1", "v1alpha"] {
            policies.insert(
                format!("/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"),
                infrastructure(MAX_REFLECTION_REQUEST_BYTES, true),
            );
        }
        Ok(policies)
    }
}

/// Reflection v1 and v1alpha list exactly the same services and describe each of them.
fn reflection_builder(spec: &ServiceSpec) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(spec.descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .with_service_name(spec.name)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
}

/// Serves `spec` with health, reflection, limits and request ids on `listener` until
/// `shutdown` completes, then drains gracefully. Health's `readiness` turns `SERVING` once the
/// server listens.
///
/// The drain: health turns `NOT_SERVING` (`liveness` stays `SERVING`), the [`Drain`] fires so
/// long-lived streams end, and the server keeps serving for at least [`DRAIN_SETTLE`] and then
/// until no call of the service is in flight or `config.grace_period` has passed; then it stops accepting, closes its connections
/// (what is still running then is answered `UNAVAILABLE`) and returns.
pub async fn serve(
    listener: TcpListener,
    spec: ServiceSpec,
    lifecycle: &Lifecycle,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let policies = Arc::new(spec.policies(config)?);
    let reflection_v1 =
        tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer::new(
            ReflectionV1::new(reflection_builder(&spec).build_v1()?),
        )
        .max_decoding_message_size(MAX_REFLECTION_REQUEST_BYTES);
    let reflection_v1alpha =
        tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer::new(
            ReflectionV1Alpha::new(reflection_builder(&spec).build_v1alpha()?),
        )
        .max_decoding_message_size(MAX_REFLECTION_REQUEST_BYTES);
    let routes = spec
        .routes
        .add_service(
            lifecycle
                .health
                .service()
                .max_decoding_message_size(MAX_HEALTH_REQUEST_BYTES),
        )
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let tls = config
        .tls_files()
        .map(|files| {
            ServerTls::load(ServerTlsFiles {
                accept_http1: spec.web.is_some(),
                ..files
            })
        })
        .transpose()?;
    let reloading = match &tls {
        None => {
            tracing::warn!(
                service = spec.name,
                "serving plaintext: no --tls-cert, so calls to this server are not encrypted"
            );
            None
        }
        Some(tls) => {
            tracing::info!(service = spec.name, mutual = tls.mutual(), "serving TLS");
            Some(AbortOnDrop(tokio::spawn(
                tls.clone().watch(TLS_RELOAD_INTERVAL),
            )))
        }
    };
    let probes = match config.health_listen {
        None => None,
        Some(addr) => Some(serve_probes(
            bind(addr).await?,
            lifecycle,
            config,
            spec.name,
        )),
    };
    let in_flight = InFlight::new();
    let local_addr = listener.local_addr().ok();
    let incoming = conn::incoming(
        listener,
        ConnLimits {
            max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
            max_per_peer: usize::try_from(config.max_connections_per_peer).unwrap_or(usize::MAX),
            handshake_timeout: config.handshake_timeout,
            idle_timeout: config.max_connection_idle,
            tls_handshakes_per_second: config.tls_handshakes_per_peer,
        },
        tls,
    );
    let admission = Admission {
        methods: policies,
        permits: Quota::new(
            usize::try_from(config.concurrency_limit).unwrap_or(usize::MAX),
            config.peer_share_percent,
        ),
        budget: Quota::new(
            config.max_request_bytes_in_flight,
            config.peer_share_percent,
        ),
        request_timeout: config.request_timeout,
        in_flight: in_flight.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(web) = &spec.web {
        tracing::info!(
            service = spec.name,
            cors_origins = ?web.origins().collect::<Vec<_>>(),
            "serving gRPC-Web (HTTP/1.1 and HTTP/2) beside gRPC"
        );
    }
    let web = spec.web.clone().unwrap_or_default();
    let (guard, cors) = (
        web.guard(usize::try_from(MAX_HEADER_LIST_BYTES).unwrap_or(usize::MAX)),
        web.cors(),
    );

    let server = tonic::transport::Server::builder()
        // HTTP/1.1 only where browsers are served (gRPC-Web); HTTP/2 everywhere.
        .accept_http1(spec.web.is_some())
        .max_connection_age(config.max_connection_age)
        .max_connection_age_grace(config.max_connection_age_grace)
        .max_concurrent_streams(Some(config.max_concurrent_streams))
        // Pings idle connections, so dead peers are noticed and their streams freed.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Bounds against HTTP/2 abuse: a header list beyond 16 KiB is refused, and a client
        // that resets streams as fast as it opens them ("rapid reset") or makes the server reset
        // many is sent away.
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        // Unread request data one connection (and one stream) can make the server buffer.
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .http2_max_pending_accept_reset_streams(Some(20))
        .http2_max_local_error_reset_streams(Some(256))
        // Outermost: a request from a browser page of an origin not named is refused (a
        // server with no origins named takes none), as is a header block beyond the HTTP/2
        // bound (HTTP/1.1 has no such bound of its own); CORS preflights are answered; a
        // gRPC-Web call becomes a gRPC call for every layer below.
        .layer(guard)
        .layer(cors)
        .layer(tonic_web::GrpcWebLayer::new())
        // Every call, even one refused by a later layer, gets a request id...
        .layer(mesh_telemetry::RequestIdLayer)
        // ...and a span carrying it and the caller's trace context, timed and exported (a shed
        // call shows as RESOURCE_EXHAUSTED).
        .layer(mesh_telemetry::ServerTraceLayer)
        // Innermost, right before tonic decodes: reads each request within its size limit, the
        // byte budget and the request timeout, then takes a concurrency permit (or sheds), holds
        // the caller's deadline, and counts the call for the drain. Health and reflection are
        // only size-limited.
        .layer(AdmissionLayer::new(admission))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);
    lifecycle.health.mark_started();
    tracing::info!(service = spec.name, addr = ?local_addr, "serving");

    tokio::select! {
        () = shutdown => {}
        result = &mut server => {
            // The server stopped on its own: that is a failure, not a shutdown.
            lifecycle.health.begin_draining();
            lifecycle.drain.begin();
            result??;
            return Ok(());
        }
    }

    let grace = config.grace_period;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(
        service = spec.name,
        in_flight = in_flight.current(),
        grace_period = ?grace,
        "draining"
    );
    lifecycle.health.begin_draining();
    lifecycle.drain.begin();

    // Keep serving for a moment even when nothing is counted in flight: a request whose
    // headers were already read may not have reached the counting layer yet (its task has not
    // run), and health watchers need a chance to receive NOT_SERVING before connections close.
    let settle = tokio::time::Instant::now() + DRAIN_SETTLE.min(grace);
    let finished = tokio::time::timeout_at(deadline, async {
        tokio::time::sleep_until(settle).await;
        in_flight.idle().await;
    })
    .await
    .is_ok();
    let cut_off = in_flight.current();
    if !finished {
        // Answer what is left with a retryable status rather than a broken connection.
        in_flight.cut_off();
        let _ = tokio::time::timeout(Duration::from_millis(250), in_flight.idle()).await;
    }
    let _ = stop_tx.send(());
    // Closing connections needs a moment even when nothing is in flight any more.
    let close_by = deadline.max(tokio::time::Instant::now() + Duration::from_millis(250));
    match tokio::time::timeout_at(close_by, &mut server).await {
        Ok(result) => result??,
        Err(_) => {
            server.abort();
            tracing::warn!(
                service = spec.name,
                "connections still open after the grace period; closed"
            );
        }
    }
    drop((reloading, probes));
    if finished {
        tracing::info!(service = spec.name, "drained");
    } else {
        tracing::warn!(
            service = spec.name,
            cut_off,
            "grace period over: calls still in flight were cut off"
        );
    }
    Ok(())
}

/// The plaintext health-only port (`--health-listen`): `grpc.health.v1.Health` with the same
/// states as the main port, a few connections and streams, nothing else. It serves until the
/// main server has finished its drain, so probes see `NOT_SERVING` meanwhile.
fn serve_probes(
    listener: TcpListener,
    lifecycle: &Lifecycle,
    config: &ServerConfig,
    service: &'static str,
) -> AbortOnDrop<Result<(), tonic::transport::Error>> {
    let addr = listener.local_addr().ok();
    let incoming = conn::incoming(
        listener,
        ConnLimits {
            max_connections: 64,
            // Probes come from the node's address, a connection at a time: one other client
            // cannot take every slot.
            max_per_peer: 8,
            handshake_timeout: config.handshake_timeout,
            // The kubelet connects for each probe; nothing need stay open long.
            idle_timeout: config.max_connection_idle.min(Duration::from_secs(5)),
            tls_handshakes_per_second: 0,
        },
        None,
    );
    let health = lifecycle
        .health
        .service()
        .max_decoding_message_size(MAX_HEALTH_REQUEST_BYTES);
    tracing::info!(service, ?addr, "serving health in plaintext for probes");
    AbortOnDrop(tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(8))
            .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .add_service(health)
            .serve_with_incoming(incoming),
    ))
}

/// Aborts a background task when the server that started it stops.
struct AbortOnDrop<T = ()>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

//! Binding, assembling and running one mesh server, and its graceful shutdown.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tonic::{server::NamedService, service::Routes, transport::server::TcpIncoming};

use crate::{
    ServerConfig,
    drain::{Drain, InFlight, InFlightLayer, Shed},
    health::Health,
    limits::RequestSizeLimitLayer,
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

/// The largest header list (all of a request's metadata) a server accepts.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// What a service hands to [`serve`]: its tonic service and its contract's descriptors.
#[derive(Debug)]
pub struct ServiceSpec {
    name: &'static str,
    descriptor_set: &'static [u8],
    routes: Routes,
    long_lived: &'static [&'static str],
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
        }
    }

    /// Declares the service's long-lived streaming methods (by name, e.g. `WatchUsers`): they
    /// are not counted against the concurrency limit.
    pub fn long_lived(mut self, methods: &'static [&'static str]) -> Self {
        self.long_lived = methods;
        self
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
/// `shutdown` completes, then drains gracefully.
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
    let reflection_v1 = reflection_builder(&spec).build_v1()?;
    let reflection_v1alpha = reflection_builder(&spec).build_v1alpha()?;
    let max = config.max_request_bytes;
    let routes = spec
        .routes
        .add_service(lifecycle.health.service().max_decoding_message_size(max))
        .add_service(reflection_v1.max_decoding_message_size(max))
        .add_service(reflection_v1alpha.max_decoding_message_size(max));

    let in_flight = InFlight::new();
    let local_addr = listener.local_addr().ok();
    // Accepted sockets get TCP_NODELAY: without it small stream messages wait on Nagle's
    // algorithm and delayed ACKs (tens of milliseconds per message on loopback).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();

    let server = tonic::transport::Server::builder()
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
        .http2_max_pending_accept_reset_streams(Some(20))
        .http2_max_local_error_reset_streams(Some(256))
        // Outermost: every call, even one refused by a later layer, gets a request id...
        .layer(mesh_telemetry::RequestIdLayer)
        // ...and a span carrying it and the caller's trace context, timed and exported (a shed
        // call shows as RESOURCE_EXHAUSTED).
        .layer(mesh_telemetry::ServerTraceLayer)
        // Counts the service's calls, so the drain knows when the last one has finished.
        .layer(InFlightLayer::new(
            in_flight.clone(),
            Some(Shed::new(
                usize::try_from(config.concurrency_limit).unwrap_or(usize::MAX),
                spec.long_lived
                    .iter()
                    .map(|method| format!("/{}/{method}", spec.name))
                    .collect(),
            )),
        ))
        // Innermost: refuses oversized messages before tonic decodes them.
        .layer(RequestSizeLimitLayer::new(max))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);
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

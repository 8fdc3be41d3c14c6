//! The aggregator (`mesh.aggregator.v1.AggregatorService`): the mesh's public facade, which
//! calls auth and users concurrently and streams their joined results.
//!
//! The crate is the whole service; its binary and `mesh aggregator` only parse [`Config`] and
//! call [`run`]. Tests call [`serve`] with a listener bound on port 0.
//!
//! Layers, top-down: [`Config`] → [`mesh_authn::AuthLayer`] (bearer tokens verified locally;
//! `SignUp`, `Login`, `Refresh` and `Logout` are public) → `server` (the handlers: parse, call
//! the downstreams, join or stream; undo half-done work), with `edge` (per-address limits) and
//! `slots` (places for long-lived streams) → `downstream` (one typed method per call to auth
//! or users, the deadline, token, request id and trace context each carries, retries of reads)
//! and `watch` (the one upstream `WatchUsers` subscription, fanned out). `error` is the one
//! table from the aggregator's errors, and the downstreams', to what a caller sees. Health is
//! `NOT_SERVING` while auth or users is unreachable.

mod config;
mod downstream;
mod edge;
mod error;
mod server;
mod slots;
mod watch;

use std::{future::Future, sync::Arc, time::Duration};

use mesh_authn::AuthLayer;
use mesh_runtime::{Health, Lifecycle, ServeError, ServiceSpec, client::Pool, web::WebAccess};
use tokio::net::TcpListener;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tower::Layer as _;

pub use config::{Config, DEFAULT_LISTEN, DEFAULT_USERS_URL};
pub use downstream::retry::{MAX_ATTEMPTS, RETRY_RATIO, RETRY_RESERVE};
pub use server::{
    AggregatorServer, LOOKUPS_IN_FLIGHT, LOOKUPS_IN_FLIGHT_IN_ALL, MAX_LOOKUP_STREAMS,
    MAX_LOOKUP_STREAMS_PER_CALLER, MAX_PROFILE_IDS, PROFILE_BATCH, PROFILE_BATCHES_IN_FLIGHT,
    REQUEST_LIMITS,
};

/// The service's fully qualified name, as health checking and reflection spell it.
pub const SERVICE_NAME: &str = mesh_proto::service_names::AGGREGATOR;

/// The methods that need no bearer token.
const PUBLIC_METHODS: &[&str] = &["SignUp", "Login", "Refresh", "Logout"];

/// Whether `service` behind `channel` answers SERVING within a second.
async fn serving(channel: mesh_runtime::client::Traced, service: &str) -> bool {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    request.set_timeout(Duration::from_secs(1));
    let mut client = HealthClient::new(channel);
    let check = client.check(request);
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Ok(reply)) if reply.get_ref().status() == ServingStatus::Serving
    )
}

/// Keeps health in step with the reachability of auth and users.
async fn watch_dependencies(
    downstream: Arc<downstream::Downstreams>,
    health: Health,
    interval: Duration,
) {
    mesh_runtime::health::follow(health, interval, "auth and users", move || {
        let downstream = downstream.clone();
        async move {
            let (auth, users) = tokio::join!(
                serving(downstream.auth_channel(), mesh_proto::service_names::AUTH),
                serving(downstream.users_channel(), mesh_proto::service_names::USERS),
            );
            auth && users
        }
    })
    .await;
}

/// Serves the aggregator on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let lifecycle = Lifecycle::new(SERVICE_NAME);
    let connections = usize::from(config.downstream_connections);
    let tls = config.authn.tls.load()?;
    let downstream = Arc::new(downstream::Downstreams::new(
        Pool::new(&config.authn.auth_url, connections, &tls)?,
        Pool::new(&config.users_url, connections, &tls)?,
    ));
    let credentials = config
        .client_secret
        .clone()
        .map(|client_secret| watch::ServiceCredentials {
            client_id: config.client_id.clone(),
            client_secret,
        });
    if credentials.is_none() {
        tracing::warn!("no --client-secret: WatchProfiles is unavailable");
    }
    let token = Arc::new(watch::ServiceToken::new(credentials, downstream.clone()));
    let count = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
    let (fanout, fanout_task) = watch::Fanout::start(
        downstream.clone(),
        Pool::new(
            &config.users_url,
            usize::from(config.replay_connections),
            &tls,
        )?,
        token,
        watch::WatchLimits {
            ring: count(config.watch_buffer),
            max_subscribers: count(config.max_watch_streams),
            per_caller: count(config.max_watch_streams_per_caller),
            catch_up_pages: count(config.catch_up_pages),
            page_events: watch::PAGE_EVENTS,
            page_reads: count(config.replay_reads),
            replay_idle: config.replay_idle_timeout,
        },
        lifecycle.drain().clone(),
    );
    let open = Arc::downgrade(&fanout);
    mesh_telemetry::metrics::gauge(
        "mesh.aggregator.watch_streams",
        "WatchProfiles streams open",
        "{stream}",
        move || {
            open.upgrade()
                .map_or(0, |f| i64::try_from(f.subscribers()).unwrap_or(i64::MAX))
        },
    );
    // Cumulative counts, read as gauges: where subscribers' events came from (the ring, or
    // catch-up pages of users' log).
    for (name, description, from_log) in [
        (
            "mesh.aggregator.watch_events_from_ring",
            "WatchProfiles events sent from the relay's ring since the process started",
            false,
        ),
        (
            "mesh.aggregator.watch_events_from_log",
            "WatchProfiles events sent from pages of users' log since the process started",
            true,
        ),
    ] {
        let fanout = Arc::downgrade(&fanout);
        mesh_telemetry::metrics::gauge(name, description, "{event}", move || {
            fanout.upgrade().map_or(0, |f| {
                let sent = f.sent();
                let counter = if from_log {
                    &sent.from_log
                } else {
                    &sent.from_ring
                };
                i64::try_from(counter.load(std::sync::atomic::Ordering::Relaxed))
                    .unwrap_or(i64::MAX)
            })
        });
    }
    let keys = Arc::new(config.authn.jwks_cache(&tls)?);
    // Revoked sessions and withdrawn keys reach this verifier within moments.
    let following = tokio::spawn(keys.clone().follow());
    let edge = Arc::new(edge::EdgeLimits::new(
        config.login_failures_per_address,
        config.signups_per_address,
    ));
    let handlers = AggregatorServer::new(downstream.clone(), fanout, edge, config.default_deadline);
    let service = AuthLayer::new(keys, PUBLIC_METHODS).layer(handlers.into_service(&config.server));
    let dependencies = tokio::spawn(watch_dependencies(
        downstream,
        lifecycle.health().clone(),
        config.dependency_check_interval,
    ));
    let spec = ServiceSpec::new(service, mesh_proto::descriptor_sets::AGGREGATOR)
        .long_lived(&["WatchProfiles", "LookupProfiles"])
        .public(PUBLIC_METHODS)
        .request_limits(server::REQUEST_LIMITS)
        // The facade is the one server browsers call.
        .grpc_web(WebAccess::new(config.cors_origins.iter().cloned()));
    let served = mesh_runtime::serve(listener, spec, &lifecycle, &config.server, shutdown).await;
    dependencies.abort();
    following.abort();
    fanout_task.abort();
    served
}

/// Binds `config.listen` and serves until SIGTERM or SIGINT.
pub async fn run(config: Config, log: mesh_telemetry::LogFormat) -> Result<(), ServeError> {
    // Logs, and traces, metrics and log records to the OTLP endpoint the environment names
    // (none: not exported); what is still queued is sent before the process exits.
    mesh_telemetry::Telemetry::around("aggregator", log, async {
        let listener = mesh_runtime::bind(config.listen).await?;
        serve(&config, listener, mesh_runtime::shutdown_signal()).await
    })
    .await
}

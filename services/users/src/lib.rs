//! The users service (`mesh.users.v1.UserService`): user profiles and the durable, ordered log
//! of their changes.
//!
//! The crate is the whole service; its binary and `mesh users` only parse [`Config`] and call
//! [`run`]. Tests call [`serve`] with a listener bound on port 0.
//!
//! Layers, top-down: [`Config`] → [`mesh_authn::AuthLayer`] (bearer tokens verified locally
//! against auth's cached JWKS) → `server` (the tonic handlers: check the caller, parse and
//! validate, map errors) → [`domain`] (input rules, page tokens) and `feed` (the one live feed
//! of the change log that every `WatchUsers` stream shares) → [`store`] (SQLite or
//! PostgreSQL). Health, reflection, limits and graceful shutdown come from [`mesh_runtime`].

mod config;
pub mod domain;
mod error;
mod feed;
mod server;
pub mod store;

use std::{future::Future, sync::Arc};

use mesh_authn::AuthLayer;
use mesh_runtime::{Lifecycle, ServeError, ServiceSpec};
use secrecy::ExposeSecret as _;
use tokio::net::TcpListener;
use tower::Layer as _;

pub use config::{Config, DEFAULT_LISTEN};
pub use server::{
    DEFAULT_PAGE_SIZE, LOG_HEAD_HEADER, MAX_BATCH_IDS, MAX_PAGE_SIZE, MAX_REQUEST_ID_BYTES,
    REQUEST_LIMITS, UsersServer,
};

/// The service's fully qualified name, as health checking and reflection spell it.
pub const SERVICE_NAME: &str = mesh_proto::service_names::USERS;

/// The name under which the page-token key is kept in the database.
const PAGE_TOKEN_KEY: &str = "page_token_key";

/// Why the users service could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened, migrated or read.
    #[error("cannot open the database")]
    Store(#[from] store::StoreError),
    /// The page-token key could not be made or is unusable.
    #[error("cannot set up page tokens: {0}")]
    PageTokens(String),
    /// The server could not run.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The key that MACs page tokens: made once (32 random bytes) and kept in the database, so
/// every replica and every restart accepts the tokens of the others.
async fn page_tokens(store: &dyn store::UsersStore) -> Result<domain::PageTokens, Error> {
    let mut fresh = [0u8; 32];
    getrandom::getrandom(&mut fresh).map_err(|e| Error::PageTokens(e.to_string()))?;
    let proposed: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
    let stored = store.setting_or_insert(PAGE_TOKEN_KEY, &proposed).await?;
    let key = (0..stored.len())
        .step_by(2)
        .map(|i| {
            stored
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .filter(|k| k.len() >= 32)
        .ok_or_else(|| {
            Error::PageTokens("the stored page-token key is not 32+ hex bytes".into())
        })?;
    domain::PageTokens::new(&key).map_err(|e| Error::PageTokens(e.to_string()))
}

/// Serves the users service on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let lifecycle = Lifecycle::new(SERVICE_NAME);
    let store = store::open(
        config.database_url.as_ref().map(|url| url.expose_secret()),
        &config.data_dir,
    )
    .await?;
    let page_tokens = page_tokens(store.as_ref()).await?;
    let (feed, feed_task) = feed::Feed::start(
        store.clone(),
        store.last_sequence().await?,
        usize::try_from(config.watch_buffer).unwrap_or(usize::MAX),
        config.watch_poll_interval,
        lifecycle.drain().clone(),
    );
    let tls = config.authn.tls.load().map_err(ServeError::from)?;
    let keys = Arc::new(config.authn.jwks_cache(&tls).map_err(ServeError::from)?);
    // Revoked sessions and withdrawn keys reach this verifier within moments.
    let following = tokio::spawn(keys.clone().follow());
    let handlers = UsersServer::new(
        store.clone(),
        page_tokens,
        feed,
        lifecycle.drain().clone(),
        usize::try_from(config.max_watch_streams).unwrap_or(usize::MAX),
        (
            config.profile_writes_burst,
            config.profile_writes_per_second,
        ),
    );
    let service = AuthLayer::new(keys, &[]).layer(handlers.into_service(&config.server));
    // Ready while the database answers. Tokens are verified with auth's keys, fetched on first
    // use: a call that arrives while auth is unreachable is UNAVAILABLE, not a reason to leave
    // the endpoints.
    // The database was just migrated: ready now, then as the checks find it.
    lifecycle.health().set_ready(true);
    let database = tokio::spawn({
        let store = store.clone();
        mesh_runtime::health::follow_database(lifecycle.health().clone(), move || {
            let store = store.clone();
            async move { store.ping().await }
        })
    });
    let pruning = tokio::spawn(prune(store.clone(), config.event_retention));
    let spec = ServiceSpec::new(service, mesh_proto::descriptor_sets::USERS)
        .long_lived(&["WatchUsers"])
        .request_limits(REQUEST_LIMITS);
    let served = mesh_runtime::serve(listener, spec, &lifecycle, &config.server, shutdown).await;
    feed_task.abort();
    database.abort();
    following.abort();
    pruning.abort();
    Ok(served?)
}

/// How often the change log is pruned.
pub const PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Every [`PRUNE_INTERVAL`]: removes deleted profiles' kept last states once the live feeds
/// have shown them, and events older than `retention` (unless it is zero).
async fn prune(store: Arc<dyn store::UsersStore>, retention: std::time::Duration) {
    let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let mut pruned = None;
    loop {
        let now = mesh_proto::time::unix_now_ms();
        let cutoff = (retention > 0).then(|| now.saturating_sub(retention));
        match store.prune(now, cutoff).await {
            Ok(through) => {
                if pruned.is_some_and(|p| p != through) {
                    tracing::info!(through, "change log pruned by retention");
                }
                pruned = Some(through);
            }
            Err(err) => {
                tracing::warn!(error = %mesh_telemetry::error_chain(&err), "cannot prune");
            }
        }
        tokio::time::sleep(PRUNE_INTERVAL).await;
    }
}

/// Binds `config.listen` and serves until SIGTERM or SIGINT.
pub async fn run(config: Config, log: mesh_telemetry::LogFormat) -> Result<(), Error> {
    // Logs, and traces, metrics and log records to the OTLP endpoint the environment names
    // (none: not exported); what is still queued is sent before the process exits.
    mesh_telemetry::Telemetry::around("users", log, async {
        let listener = mesh_runtime::bind(config.listen).await?;
        serve(&config, listener, mesh_runtime::shutdown_signal()).await
    })
    .await
}

//! The auth service (`mesh.auth.v1.AuthService`): credentials, sessions, signing keys and
//! tokens.
//!
//! The crate is the whole service; its binary and `mesh auth` only parse [`Config`] and call
//! [`run`]. Tests call [`serve`] with a listener bound on port 0.
//!
//! Layers, top-down: [`Config`] → `server` (the tonic handlers: parse, validate, map errors) →
//! `domain` (e-mail and password rules, Argon2id on its own threads, refresh tokens,
//! throttling) and `tokens` (JWT issuing) → [`store`] (SQLite or PostgreSQL). Health,
//! reflection, limits and graceful shutdown come from [`mesh_runtime`].

mod clients;
mod config;
mod domain;
mod error;
mod revocations;
mod server;
pub mod store;
mod tokens;

use std::future::Future;

use mesh_runtime::{Lifecycle, ServeError, ServiceSpec};
use mesh_token::{KeyError, KeyRing};
use secrecy::ExposeSecret as _;
use tokio::net::TcpListener;

pub use clients::ServiceClientSpec;
pub use config::{Config, DEFAULT_LISTEN};
pub use domain::argon2_params;
pub use server::{AuthServer, MAX_REVOCATION_FOLLOWERS, MAX_SESSIONS_PER_ACCOUNT, REQUEST_LIMITS};

/// How often expired sessions and revocations are pruned.
pub const PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a revoked session is kept (for reuse detection and the log) before it is pruned;
/// its revocation is published on its own until its tokens have expired.
pub const REVOKED_SESSION_KEEP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Why the auth service could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The signing keys could not be loaded or created.
    #[error("cannot load the signing keys")]
    Keys(#[from] KeyError),
    /// The database could not be opened or migrated.
    #[error("cannot open the database")]
    Store(#[from] store::StoreError),
    /// The password hasher could not start.
    #[error("cannot start the password hasher: {0}")]
    Hasher(String),
    /// The server could not run.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The signing keys of `config`: its PEM files, or else the development key in the data
/// folder (created on first use, with a warning).
fn load_keys(config: &Config) -> Result<KeyRing, KeyError> {
    if !config.signing_keys.is_empty() {
        let ring = KeyRing::load_pem_files(&config.signing_keys)?;
        tracing::info!(
            signing_kid = ring.signing_kid(),
            keys = config.signing_keys.len(),
            "signing keys loaded"
        );
        return Ok(ring);
    }
    let path = config.data_dir.join("auth").join("dev-signing-key.pem");
    let (ring, created) = KeyRing::load_or_create_dev_key(&path)?;
    tracing::warn!(
        path = %path.display(),
        created,
        signing_kid = ring.signing_kid(),
        "no --signing-key configured: using a development key; configure real keys in production"
    );
    Ok(ring)
}

/// The service's fully qualified name, as health checking and reflection spell it.
pub const SERVICE_NAME: &str = mesh_proto::service_names::AUTH;

/// Serves the auth service on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let lifecycle = Lifecycle::new(SERVICE_NAME);
    let issuer = tokens::TokenIssuer::new(
        load_keys(config)?,
        config.issuer.clone(),
        config.audience.clone(),
        config.access_token_ttl,
    )?;
    let clients = clients::ServiceClients::new(config.service_clients.clone());
    let store = store::open(
        config.database_url.as_ref().map(|url| url.expose_secret()),
        &config.data_dir,
    )
    .await?;
    let (revocations, revocation_task) = revocations::RevocationFeed::start(
        store.clone(),
        store.last_revocation().await?,
        lifecycle.drain().clone(),
    );
    let parallelism = std::thread::available_parallelism().map_or(1, usize::from);
    let hasher = domain::PasswordHasher::new(parallelism)
        .await
        .map_err(|e| Error::Hasher(e.to_string()))?;
    let queue = hasher.clone();
    mesh_telemetry::metrics::gauge(
        "mesh.auth.hash_queue_depth",
        "Argon2id operations waiting for or running on the hashing threads",
        "{operation}",
        move || i64::try_from(queue.queued()).unwrap_or(i64::MAX),
    );
    let service = AuthServer::new(issuer, clients, store.clone(), hasher, revocations)
        .into_service(&config.server);
    let pruning = tokio::spawn(prune(store.clone()));
    // Ready once the keys are loaded and the database is migrated, and while it answers.
    // The database was just migrated: ready now, then as the checks find it.
    lifecycle.health().set_ready(true);
    let database = tokio::spawn({
        let store = store.clone();
        mesh_runtime::health::follow_database(lifecycle.health().clone(), move || {
            let store = store.clone();
            async move { store.ping().await }
        })
    });
    let spec = ServiceSpec::new(service, mesh_proto::descriptor_sets::AUTH)
        .long_lived(&["WatchRevocations"])
        .request_limits(REQUEST_LIMITS);
    let served = mesh_runtime::serve(listener, spec, &lifecycle, &config.server, shutdown).await;
    database.abort();
    pruning.abort();
    revocation_task.abort();
    Ok(served?)
}

/// Removes expired sessions (with their used refresh tokens), sessions revoked more than
/// [`REVOKED_SESSION_KEEP`] ago and revocations whose tokens have all expired, every
/// [`PRUNE_INTERVAL`]: nothing an account does grows the tables for ever.
async fn prune(store: std::sync::Arc<dyn store::AuthStore>) {
    let keep = i64::try_from(REVOKED_SESSION_KEEP.as_millis()).unwrap_or(i64::MAX);
    loop {
        let now = mesh_proto::time::unix_now_ms();
        match store.prune(now, now.saturating_sub(keep)).await {
            Ok(pruned) if pruned != store::Pruned::default() => {
                tracing::info!(
                    sessions = pruned.sessions,
                    revocations = pruned.revocations,
                    "pruned"
                );
            }
            Ok(_) => {}
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
    mesh_telemetry::Telemetry::around("auth", log, async {
        let listener = mesh_runtime::bind(config.listen).await?;
        serve(&config, listener, mesh_runtime::shutdown_signal()).await
    })
    .await
}

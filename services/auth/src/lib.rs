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
mod server;
pub mod store;
mod tokens;

use std::future::Future;

use mesh_runtime::{Lifecycle, ServeError, ServiceSpec};
use mesh_token::{KeyError, KeyRing};
use tokio::net::TcpListener;

pub use clients::ServiceClientSpec;
pub use config::{Config, DEFAULT_LISTEN};
pub use server::AuthServer;

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
    let store = store::open(config.database_url.as_deref(), &config.data_dir).await?;
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
    let service =
        AuthServer::new(issuer, clients, store.clone(), hasher).into_service(&config.server);
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
    let spec = ServiceSpec::new(service, mesh_proto::descriptor_sets::AUTH);
    let served = mesh_runtime::serve(listener, spec, &lifecycle, &config.server, shutdown).await;
    database.abort();
    Ok(served?)
}

/// Binds `config.listen` and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), Error> {
    let listener = mesh_runtime::bind(config.listen).await?;
    // Traces and metrics go to the OTLP endpoint the environment names (none: not exported);
    // what is still queued is sent before the process exits.
    let telemetry = mesh_telemetry::Telemetry::start("auth");
    let served = serve(&config, listener, mesh_runtime::shutdown_signal()).await;
    telemetry.shutdown().await;
    served
}

/// Measures the raw Argon2id verification rate (verifications per second) of this machine at
/// the service's parameters, with `threads` threads for `duration`: the ceiling the login
/// throughput of `mesh bench login` is compared with. Blocks the calling thread.
pub fn raw_verify_rate(threads: usize, duration: std::time::Duration) -> f64 {
    use argon2::{
        Algorithm, Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, Version,
    };
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, domain::argon2_params());
    let phc = match argon2::password_hash::SaltString::encode_b64(b"benchmark-salt!!") {
        Ok(salt) => argon2
            .hash_password(b"benchmark password", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let start = std::time::Instant::now();
    let counts: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let (argon2, phc) = (argon2.clone(), phc.as_str());
                scope.spawn(move || {
                    let mut n = 0u64;
                    while start.elapsed() < duration {
                        if let Ok(parsed) = PasswordHash::new(phc) {
                            let _ = argon2.verify_password(b"benchmark password", &parsed);
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).collect()
    });
    counts.iter().sum::<u64>() as f64 / start.elapsed().as_secs_f64()
}

//! The auth service's configuration: flags with environment-variable fallbacks.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use mesh_runtime::{ServerConfig, parse_duration};
use secrecy::SecretString;

use crate::clients::ServiceClientSpec;

/// The auth service's default address: loopback, port 50052.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50052";

/// Configuration of the auth service.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on (use `0.0.0.0:50052` in a container).
    #[arg(long = "listen", env = "MESH_AUTH_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Folder for local state. With no `--signing-key`, a development signing key is
    /// generated once and kept at `<data-dir>/auth/dev-signing-key.pem`.
    #[arg(long, env = "MESH_DATA_DIR", default_value = ".mesh")]
    pub data_dir: PathBuf,

    /// Database URL: `postgres://…` for PostgreSQL, `sqlite://…` for another SQLite file.
    /// Unset: the embedded SQLite file `<data-dir>/auth/auth.db`.
    #[arg(long, env = "MESH_AUTH_DATABASE_URL", hide_env_values = true,
          value_parser = mesh_runtime::parse_secret)]
    pub database_url: Option<SecretString>,

    /// Ed25519 PKCS#8 PEM private key files, oldest first (comma-separated in the environment).
    /// The last one signs new tokens; all are published in the JWKS, so rotating keys logs
    /// nobody out.
    #[arg(
        long = "signing-key",
        env = "MESH_AUTH_SIGNING_KEYS",
        value_delimiter = ','
    )]
    pub signing_keys: Vec<PathBuf>,

    /// The `iss` claim of issued tokens.
    #[arg(long, env = "MESH_AUTH_ISSUER", default_value = mesh_token::DEFAULT_ISSUER)]
    pub issuer: String,

    /// The `aud` claim of issued tokens.
    #[arg(long, env = "MESH_AUTH_AUDIENCE", default_value = mesh_token::DEFAULT_AUDIENCE)]
    pub audience: String,

    /// Lifetime of access tokens, users' and services' alike.
    #[arg(long, env = "MESH_AUTH_ACCESS_TOKEN_TTL", default_value = "15m",
          value_parser = parse_duration)]
    pub access_token_ttl: Duration,

    /// Service clients for IssueServiceToken, as `client_id=sha256:<hex of SHA-256 of the
    /// secret>` or, for development only, `client_id=plain:<secret>` (comma-separated in the
    /// environment).
    #[arg(
        long = "service-client",
        env = "MESH_AUTH_SERVICE_CLIENTS",
        value_delimiter = ','
    )]
    pub service_clients: Vec<ServiceClientSpec>,

    /// Settings shared by every mesh server.
    #[command(flatten)]
    pub server: ServerConfig,
}

impl Default for Config {
    fn default() -> Self {
        mesh_runtime::cli::defaults()
    }
}

impl Config {
    /// The defaults, listening on `listen` and keeping state under `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            ..Self::default()
        }
    }
}

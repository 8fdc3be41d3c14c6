//! The users service's configuration: flags with environment-variable fallbacks.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use mesh_authn::AuthnConfig;
use mesh_runtime::{ServerConfig, parse_duration};

/// The users service's default address: loopback, port 50053.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50053";

/// Configuration of the users service.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on (use `0.0.0.0:50053` in a container).
    #[arg(long = "listen", env = "MESH_USERS_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Folder for local state: the embedded database is `<data-dir>/users/users.db`.
    #[arg(long, env = "MESH_DATA_DIR", default_value = ".mesh")]
    pub data_dir: PathBuf,

    /// Database URL: `postgres://…` for PostgreSQL, `sqlite://…` for another SQLite file.
    /// Unset: the embedded SQLite file `<data-dir>/users/users.db`.
    #[arg(long, env = "MESH_USERS_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Where auth's signing keys come from and which tokens are accepted.
    #[command(flatten)]
    pub authn: AuthnConfig,

    /// Events each `WatchUsers` subscriber may fall behind the live feed before it is caught
    /// up from the database instead.
    #[arg(long, env = "MESH_USERS_WATCH_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_buffer: u32,

    /// How often the live feed looks for changes committed by other replicas (changes made by
    /// this process are sent at once).
    #[arg(long, env = "MESH_USERS_WATCH_POLL_INTERVAL", default_value = "250ms",
          value_parser = parse_duration)]
    pub watch_poll_interval: Duration,

    /// Settings shared by every mesh server.
    #[command(flatten)]
    pub server: ServerConfig,
}

impl Config {
    /// The defaults, listening on `listen`, keeping state under `data_dir` and fetching keys
    /// from `authn`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, authn: AuthnConfig) -> Self {
        Self {
            listen,
            data_dir,
            database_url: None,
            authn,
            watch_buffer: 1024,
            watch_poll_interval: Duration::from_millis(250),
            server: ServerConfig::default(),
        }
    }
}

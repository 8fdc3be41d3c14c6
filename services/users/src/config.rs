//! The users service's configuration: flags with environment-variable fallbacks.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use mesh_authn::AuthnConfig;
use mesh_runtime::{ServerConfig, parse_duration};
use secrecy::SecretString;

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
    #[arg(long, env = "MESH_USERS_DATABASE_URL", hide_env_values = true,
          value_parser = mesh_runtime::parse_secret)]
    pub database_url: Option<SecretString>,

    /// Where auth's signing keys come from and which tokens are accepted.
    #[command(flatten)]
    pub authn: AuthnConfig,

    /// Events each `WatchUsers` subscriber may fall behind the live feed before it is caught
    /// up from the database instead.
    #[arg(long, env = "MESH_USERS_WATCH_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_buffer: u32,

    /// How often the live feed reads the log in case it missed a commit: changes made by this
    /// process, and on PostgreSQL by other replicas (announced with `NOTIFY`), are sent at once;
    /// the poll only catches announcements lost while the listening connection was down.
    #[arg(long, env = "MESH_USERS_WATCH_POLL_INTERVAL", default_value = "5s",
          value_parser = parse_duration)]
    pub watch_poll_interval: Duration,

    /// `WatchUsers` streams served at once (its callers are the aggregators' relays: one
    /// subscription and a few short page reads each); one more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "MESH_USERS_MAX_WATCH_STREAMS", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_watch_streams: u32,

    /// Changes (create, update, delete) the owner of one profile may make at once…
    #[arg(long, env = "MESH_USERS_PROFILE_WRITES_BURST", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub profile_writes_burst: u32,

    /// …and per second after that; one more is RESOURCE_EXHAUSTED with `retry-after`.
    #[arg(
        long,
        env = "MESH_USERS_PROFILE_WRITES_PER_SECOND",
        default_value_t = 2.0
    )]
    pub profile_writes_per_second: f64,

    /// How long change-log events are kept (`0`: for ever). Older ones are removed, and a
    /// `WatchUsers` from before the retained start is OUT_OF_RANGE naming the first available
    /// sequence.
    #[arg(long, env = "MESH_USERS_EVENT_RETENTION", default_value = "30d",
          value_parser = parse_duration)]
    pub event_retention: Duration,

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
    /// The defaults, listening on `listen`, keeping state under `data_dir` and fetching keys
    /// from `authn`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, authn: AuthnConfig) -> Self {
        Self {
            listen,
            data_dir,
            authn,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database URL (which carries its password) is never printed with the configuration.
    #[test]
    fn debug_hides_the_database_url() {
        let config = Config {
            database_url: Some("postgres://mesh:pa55word@db/users".into()),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("pa55word"), "{shown}");
    }
}

//! The aggregator's configuration: flags with environment-variable fallbacks.

use std::{net::SocketAddr, time::Duration};

use http::Uri;
use mesh_authn::{AuthnConfig, parse_url};
use mesh_runtime::{ServerConfig, parse_duration};

/// The aggregator's default address: loopback, port 50051.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Users' default address, as `mesh up` runs it.
pub const DEFAULT_USERS_URL: &str = "http://127.0.0.1:50053";

/// Configuration of the aggregator.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on (use `0.0.0.0:50051` in a container).
    #[arg(long = "listen", env = "MESH_AGGREGATOR_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Where auth is (for its keys and its methods) and which tokens are accepted.
    #[command(flatten)]
    pub authn: AuthnConfig,

    /// The users service's URL (`http://host:port`).
    #[arg(long = "users-url", env = "MESH_USERS_URL", default_value = DEFAULT_USERS_URL,
          value_parser = parse_url)]
    pub users_url: Uri,

    /// HTTP/2 connections to each downstream service, shared by all calls.
    #[arg(long, env = "MESH_AGGREGATOR_DOWNSTREAM_CONNECTIONS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub downstream_connections: u16,

    /// The deadline of a call whose caller set none (bounds all its downstream work).
    #[arg(long, env = "MESH_AGGREGATOR_DEFAULT_DEADLINE", default_value = "10s",
          value_parser = parse_duration)]
    pub default_deadline: Duration,

    /// The aggregator's own client id at auth (`IssueServiceToken`), for its upstream
    /// `WatchUsers` subscription.
    #[arg(long, env = "MESH_AGGREGATOR_CLIENT_ID", default_value = "aggregator")]
    pub client_id: String,

    /// The secret of `--client-id` (prefer the environment variable: command lines are
    /// visible to other local users). Unset: `WatchProfiles` is FAILED_PRECONDITION.
    #[arg(long, env = "MESH_AGGREGATOR_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,

    /// Events a `WatchProfiles` stream may fall behind the live relay before it is caught up
    /// from users' log instead.
    #[arg(long, env = "MESH_AGGREGATOR_WATCH_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_buffer: u32,

    /// `WatchProfiles` streams one aggregator process serves at once; one more is
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "MESH_AGGREGATOR_MAX_WATCH_STREAMS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_watch_streams: u32,

    /// How often the reachability of auth and users is checked (the aggregator is
    /// NOT_SERVING while either is unreachable).
    #[arg(long, env = "MESH_AGGREGATOR_DEPENDENCY_CHECK_INTERVAL", default_value = "1s",
          value_parser = parse_duration)]
    pub dependency_check_interval: Duration,

    /// Settings shared by every mesh server.
    #[command(flatten)]
    pub server: ServerConfig,
}

impl Config {
    /// The defaults, listening on `listen`, with auth per `authn` and users at `users_url`.
    pub fn new(listen: SocketAddr, authn: AuthnConfig, users_url: Uri) -> Self {
        Self {
            listen,
            authn,
            users_url,
            downstream_connections: 2,
            default_deadline: Duration::from_secs(10),
            dependency_check_interval: Duration::from_secs(1),
            client_id: "aggregator".to_owned(),
            client_secret: None,
            watch_buffer: 1024,
            max_watch_streams: 20_000,
            server: ServerConfig::default(),
        }
    }
}

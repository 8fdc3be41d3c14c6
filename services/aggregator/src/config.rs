//! The aggregator's configuration: flags with environment-variable fallbacks.

use std::{net::SocketAddr, time::Duration};

use http::Uri;
use mesh_authn::{AuthnConfig, parse_url};
use mesh_runtime::{ServerConfig, parse_duration, web::Origin};
use secrecy::SecretString;

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
    #[arg(long, env = "MESH_AGGREGATOR_CLIENT_SECRET", hide_env_values = true,
          value_parser = mesh_runtime::parse_secret)]
    pub client_secret: Option<SecretString>,

    /// Events the relay keeps for `WatchProfiles` subscribers (a subscriber further behind is
    /// caught up from users' log instead).
    #[arg(long, env = "MESH_AGGREGATOR_WATCH_BUFFER", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub watch_buffer: u32,

    /// `WatchProfiles` streams one aggregator process serves at once; one more is
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "MESH_AGGREGATOR_MAX_WATCH_STREAMS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_watch_streams: u32,

    /// `WatchProfiles` streams one caller (one token subject) may have open at once.
    #[arg(long, env = "MESH_AGGREGATOR_MAX_WATCH_STREAMS_PER_CALLER", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_watch_streams_per_caller: u32,

    /// Pages of users' log (64 events each) that replaying `WatchProfiles` subscribers may hold
    /// at once; a subscriber beyond it waits for one.
    #[arg(long, env = "MESH_AGGREGATOR_CATCH_UP_PAGES", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub catch_up_pages: u32,

    /// HTTP/2 connections to users for replays and catch-up reads, apart from the ones every
    /// other call shares.
    #[arg(long, env = "MESH_AGGREGATOR_REPLAY_CONNECTIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub replay_connections: u16,

    /// Reads of users' log for replays at once.
    #[arg(long, env = "MESH_AGGREGATOR_REPLAY_READS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub replay_reads: u32,

    /// How long a replaying subscriber's page may wait for its client to read it before it is
    /// dropped (and read again if the client comes back).
    #[arg(long, env = "MESH_AGGREGATOR_REPLAY_IDLE_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    pub replay_idle_timeout: Duration,

    /// Failed password checks (Login, DeleteAccount) one client address may cause per 15
    /// minutes before its logins are RESOURCE_EXHAUSTED (0: no limit, e.g. behind a proxy
    /// that hides client addresses).
    #[arg(
        long,
        env = "MESH_AGGREGATOR_LOGIN_FAILURES_PER_ADDRESS",
        default_value_t = 100
    )]
    pub login_failures_per_address: u32,

    /// Sign-ups one client address may make per minute (0: no limit).
    #[arg(
        long,
        env = "MESH_AGGREGATOR_SIGNUPS_PER_ADDRESS",
        default_value_t = 60
    )]
    pub signups_per_address: u32,

    /// A web origin (`scheme://host[:port]`) whose pages may call this server over gRPC-Web;
    /// repeat the flag, or separate origins with commas in the variable. None by default: a
    /// request that carries any `Origin` (a browser page's) is refused with HTTP 403.
    #[arg(long = "cors-origin", env = "MESH_AGGREGATOR_CORS_ORIGINS", value_delimiter = ',',
          value_parser = mesh_runtime::web::parse_origin)]
    pub cors_origins: Vec<Origin>,

    /// How often the reachability of auth and users is checked (the aggregator is
    /// NOT_SERVING while either is unreachable).
    #[arg(long, env = "MESH_AGGREGATOR_DEPENDENCY_CHECK_INTERVAL", default_value = "1s",
          value_parser = parse_duration)]
    pub dependency_check_interval: Duration,

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
    /// The defaults, listening on `listen`, with auth per `authn` and users at `users_url`.
    pub fn new(listen: SocketAddr, authn: AuthnConfig, users_url: Uri) -> Self {
        Self {
            listen,
            authn,
            users_url,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client secret is never printed with the configuration (which is logged on errors).
    #[test]
    fn debug_hides_the_client_secret() {
        let config = Config {
            client_secret: Some(mesh_runtime::parse_secret("s3cret-value").expect("any")),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret-value"), "{shown}");
        assert!(shown.contains("client_secret"), "{shown}");
    }
}

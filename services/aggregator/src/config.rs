//! The aggregator's configuration: flags with environment-variable fallbacks.

use std::net::SocketAddr;

use mesh_runtime::ServerConfig;

/// The aggregator's default address: loopback, port 50051.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Configuration of the aggregator.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address to listen on (use `0.0.0.0:50051` in a container).
    #[arg(long = "listen", env = "MESH_AGGREGATOR_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Settings shared by every mesh server.
    #[command(flatten)]
    pub server: ServerConfig,
}

impl Config {
    /// The defaults, listening on `listen`.
    pub fn with_listen(listen: SocketAddr) -> Self {
        Self {
            listen,
            server: ServerConfig::default(),
        }
    }
}

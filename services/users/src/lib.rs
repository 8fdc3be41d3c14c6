//! The users service (`mesh.users.v1.UserService`): user profiles and the durable, ordered log
//! of their changes.
//!
//! The crate is the whole service; its binary and `mesh users` only parse [`Config`] and call
//! [`run`]. Tests call [`serve`] with a listener bound on port 0.
//!
//! Every method answers `UNIMPLEMENTED` for now; health, reflection, limits and graceful
//! shutdown come from [`mesh_runtime`].

mod config;
pub mod domain;
mod server;
pub mod store;

use std::future::Future;

use mesh_runtime::{Lifecycle, ServeError, ServiceSpec};
use tokio::net::TcpListener;

pub use config::{Config, DEFAULT_LISTEN};
pub use server::UsersServer;

/// The service's fully qualified name, as health checking and reflection spell it.
pub const SERVICE_NAME: &str = mesh_proto::service_names::USERS;

/// Serves the users service on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let lifecycle = Lifecycle::new(SERVICE_NAME);
    let service = UsersServer::new().into_service(config.server.max_request_bytes);
    // Nothing to wait for before taking calls yet: ready as soon as the service exists.
    lifecycle.health().set_ready(true);
    let spec = ServiceSpec::new(service, mesh_proto::descriptor_sets::USERS);
    mesh_runtime::serve(listener, spec, &lifecycle, &config.server, shutdown).await
}

/// Binds `config.listen` and serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let listener = mesh_runtime::bind(config.listen).await?;
    serve(&config, listener, mesh_runtime::shutdown_signal()).await
}

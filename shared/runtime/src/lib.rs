//! The server runtime every mesh service runs on.
//!
//! A service crate builds its tonic service and hands it to [`serve`], which adds what every
//! server of the mesh must have and nothing service-specific:
//!
//! - `grpc.health.v1.Health` ([`health`]) with the contract's names: `""`, the service's own
//!   name, and `liveness`;
//! - server reflection v1 **and** v1alpha, listing the same four services;
//! - a request size limit that answers `RESOURCE_EXHAUSTED` ([`limits`]);
//! - request ids on every call ([`mesh_telemetry::RequestIdLayer`]);
//! - graceful shutdown ([`drain`]): health goes `NOT_SERVING`, long-lived streams are told to
//!   end, in-flight calls finish within a grace period, then the server stops.
//!
//! The listener is injected, so tests bind `127.0.0.1:0` and production binds its port.

pub mod cli;
pub mod config;
pub mod drain;
pub mod health;
pub mod limits;
mod server;
pub mod signal;
#[cfg(feature = "test-util")]
pub mod testing;

pub use config::{ServerConfig, parse_duration};
pub use drain::{Drain, InFlight, Shed};
pub use health::Health;
pub use server::{
    DRAIN_SETTLE, Lifecycle, MAX_HEADER_LIST_BYTES, ServeError, ServiceSpec, bind, serve,
};
pub use signal::shutdown_signal;

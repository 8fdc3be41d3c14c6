//! The server runtime every mesh service runs on.
//!
//! A service crate builds its tonic service and hands it to [`serve`], which adds what every
//! server of the mesh must have and nothing service-specific:
//!
//! - `grpc.health.v1.Health` ([`health`]) with the contract's names: `""`, the service's own
//!   name, and `liveness`;
//! - server reflection v1 **and** v1alpha, listing the same four services, answering unknown
//!   names on the open stream ([`reflection`]);
//! - bounded connections: per peer and in all, a handshake timeout, an idle timeout ([`conn`]);
//! - admission ([`admission`]): each request read in full within its method's size limit, a
//!   budget of request bytes and a request timeout before it takes a concurrency permit; the
//!   caller's deadline answered `DEADLINE_EXCEEDED`; load shedding;
//! - TLS when given a certificate, mutual TLS when given a client CA, both re-read when their
//!   files change ([`tls`]);
//! - request ids on every call ([`mesh_telemetry::RequestIdLayer`]);
//! - gRPC-Web for browsers where a service asks for it, behind strict CORS ([`web`]);
//! - graceful shutdown ([`drain`]): health goes `NOT_SERVING`, long-lived streams are told to
//!   end, in-flight calls finish within a grace period, then the server stops.
//!
//! Outgoing calls go through [`client`]: shared endpoint settings, client-side balancing over
//! every address a name resolves to, and a client span per call.
//!
//! The listener is injected, so tests bind `127.0.0.1:0` and production binds its port.

pub mod admission;
pub mod bounded;
pub mod cli;
pub mod client;
pub mod config;
pub mod conn;
pub mod drain;
pub mod health;
pub mod limits;
pub mod reflection;
mod server;
pub mod signal;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tls;
pub mod web;

pub use config::{ClientTlsConfig, ServerConfig, parse_duration, parse_secret};
pub use conn::peer_addr;
pub use drain::{Drain, InFlight};
pub use health::Health;
pub use server::{
    CONNECTION_WINDOW_BYTES, DRAIN_SETTLE, Lifecycle, MAX_HEADER_LIST_BYTES,
    MAX_HEALTH_REQUEST_BYTES, MAX_REFLECTION_REQUEST_BYTES, STREAM_WINDOW_BYTES, ServeError,
    ServiceSpec, bind, serve,
};
pub use signal::shutdown_signal;

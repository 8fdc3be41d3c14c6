//! The launcher's tests, one binary: the real `mesh up` and the three services as processes
//! (`e2e`, `faults`, `telemetry`), TLS over loopback (`tls`) and browsers (`web`). The abuse suite floods the
//! machine on purpose and is a binary of its own (`tests/abuse/`), as are the `mesh bench`
//! smoke tests (`tests/bench.rs`), which need the `bench` feature.
//!
//! Tests that start the real binaries take one of [`common::PROCESS_TESTS`] permits, so no
//! more of them share the machine's cores at once than when each file was a binary of its own.

mod common;
mod e2e;
mod faults;
mod telemetry;
mod tls;
mod web;

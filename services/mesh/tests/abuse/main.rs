//! Abuse resistance: for each attack an anonymous client or a single free account can make from
//! one machine, the bound that holds — proven against in-process servers over real loopback
//! gRPC, or against the real binaries where only a process shows it (its memory, its exit).
//! Every test is bounded in count and time, and stays on loopback.

mod connections;
mod login;
mod memory;
mod orphans;
mod protocol;
mod readiness;
mod revocation;
mod small;
mod support;
mod watch;

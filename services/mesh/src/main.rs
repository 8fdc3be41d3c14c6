//! `mesh`: the one command of the mesh.
//!
//! - `mesh up` runs all three services locally, each as its own child process;
//! - `mesh auth`, `mesh users` and `mesh aggregator` run one service each (what a container
//!   runs);
//! - `mesh bench <scenario>` measures the mesh on this machine.
//!
//! Every flag has an environment-variable fallback; `--help` shows both.

#[cfg(feature = "bench")]
mod bench;
mod console;
mod traces;
mod up;

/// jemalloc gives memory back to the system once a burst is over (its background thread
/// purges unused pages after a decay time); glibc's allocator kept most of a flood's peak for
/// the life of the process.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_runtime::cli::{LogArgs, block_on, parse_or_exit};

/// The mesh: auth, users and the aggregator, three async gRPC services.
#[derive(Debug, Parser)]
#[command(name = "mesh", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run all three services locally, each as its own process, until Ctrl-C or SIGTERM.
    Up(up::UpArgs),
    /// Run the auth service (credentials, sessions, tokens).
    Auth(mesh_auth::Config),
    /// Run the users service (profiles and their change log).
    Users(mesh_users::Config),
    /// Run the aggregator (the public facade).
    Aggregator(mesh_aggregator::Config),
    /// Measure the mesh on this machine (build with --release).
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    let log = cli.log.log_format;
    match cli.command {
        Command::Up(args) => {
            mesh_telemetry::init(log);
            block_on(up::run(args, log))
        }
        // Each service installs its own subscriber, with the OpenTelemetry SDK's layers in it.
        Command::Auth(config) => {
            up::die_with_supervisor();
            block_on(mesh_auth::run(config, log))
        }
        Command::Users(config) => {
            up::die_with_supervisor();
            block_on(mesh_users::run(config, log))
        }
        Command::Aggregator(config) => {
            up::die_with_supervisor();
            block_on(mesh_aggregator::run(config, log))
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => {
            mesh_telemetry::init(log);
            bench::main(args)
        }
    }
}

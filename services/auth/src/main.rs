//! `mesh-auth`: runs the auth service alone (the same as `mesh auth`).

use std::process::ExitCode;

use clap::Parser;

/// Runs the mesh's auth service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: mesh_auth::Config,
    #[command(flatten)]
    log: mesh_runtime::cli::LogArgs,
}

fn main() -> ExitCode {
    let cli: Cli = mesh_runtime::cli::parse_or_exit();
    mesh_runtime::cli::block_on(mesh_auth::run(cli.config, cli.log.log_format))
}

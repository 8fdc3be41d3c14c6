//! `mesh-users`: runs the users service alone (the same as `mesh users`).

use std::process::ExitCode;

use clap::Parser;

/// Runs the mesh's users service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: mesh_users::Config,
    #[command(flatten)]
    log: mesh_runtime::cli::LogArgs,
}

fn main() -> ExitCode {
    let cli: Cli = mesh_runtime::cli::parse_or_exit();
    mesh_runtime::cli::block_on(mesh_users::run(cli.config, cli.log.log_format))
}

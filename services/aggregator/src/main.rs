//! `mesh-aggregator`: runs the aggregator alone (the same as `mesh aggregator`).

use std::process::ExitCode;

use clap::Parser;

/// Runs the mesh's aggregator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: mesh_aggregator::Config,
    #[command(flatten)]
    log: mesh_runtime::cli::LogArgs,
}

fn main() -> ExitCode {
    let cli: Cli = mesh_runtime::cli::parse_or_exit();
    mesh_runtime::cli::block_on(mesh_aggregator::run(cli.config, cli.log.log_format))
}

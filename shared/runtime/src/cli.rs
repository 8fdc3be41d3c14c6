//! What every mesh binary does the same way: parse flags, install logging, run, exit.

use std::{error::Error as StdError, future::Future, process::ExitCode};

use mesh_telemetry::LogFormat;

/// The exit code for bad configuration (`EX_USAGE` of sysexits.h).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// Logging flags every binary has.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format: `text` (human-readable) or `json` (one object per line). The filter is
    /// `RUST_LOG` (default `info`).
    #[arg(long, env = "MESH_LOG_FORMAT", default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Parses the command line (flags, then environment fallbacks); on bad configuration prints
/// one clear message and exits with [`EXIT_BAD_CONFIG`]; `--help` and `--version` exit 0.
pub fn parse_or_exit<P: clap::Parser>() -> P {
    match P::try_parse() {
        Ok(parsed) => parsed,
        Err(err) => {
            let code = if err.use_stderr() {
                i32::from(EXIT_BAD_CONFIG)
            } else {
                0
            };
            let _ = err.print();
            std::process::exit(code);
        }
    }
}

/// The defaults of a flag group: what an empty command line parses to, environment
/// variables ignored. A config's [`Default`] is this, so each default is written once, in its
/// flag's attribute.
///
/// # Panics
///
/// If a flag of `T` is required or its default does not parse: a bug that every test using
/// the config's `Default` finds.
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None));
    let parsed = command
        .try_get_matches_from(["defaults"])
        .and_then(|matches| T::from_arg_matches(&matches));
    match parsed {
        Ok(config) => config,
        Err(err) => panic!("the flag defaults do not parse: {err}"),
    }
}

/// The builder of the mesh's runtime: multi-threaded, IO and time on, and no LIFO slot.
///
/// Without the LIFO slot a task woken by another runs after the tasks already queued, not at
/// once. In a fan-out (one change waking thousands of stream tasks), each stream's send wakes
/// its connection's task: in the LIFO slot that task ran after every single stream and wrote
/// one frame per system call; behind the queue it writes the frames of all the streams woken
/// before it in one. See docs/benchmarks.md (`watch`). The option needs `--cfg
/// tokio_unstable` (set in `.cargo/config.toml`); a build without it keeps the slot.
pub fn runtime_builder() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
}

/// Runs `main` on a multi-threaded runtime ([`runtime_builder`]); logs the error's whole cause
/// chain and returns exit code 1 if it fails.
pub fn block_on<E, F>(main: F) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: StdError,
{
    let runtime = match runtime_builder().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %mesh_telemetry::error_chain(&err), "exiting on error");
            ExitCode::FAILURE
        }
    }
}

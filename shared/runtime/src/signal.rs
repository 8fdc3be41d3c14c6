//! The process's shutdown signal.

/// Completes on the first SIGTERM or SIGINT (Ctrl-C).
///
/// If the signal handlers cannot be installed (which only happens when the process is already
/// in a broken state) the error is logged and the future never completes, so the server keeps
/// serving rather than stopping at once.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(err), _) | (_, Err(err)) => {
            tracing::error!(error = %err, "cannot install signal handlers; shutdown only by kill");
            return std::future::pending().await;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
}

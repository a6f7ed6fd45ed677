//! The shutdown signal every Ferry daemon stops on.

/// Resolves on the first SIGTERM or SIGINT, logging which one came.
///
/// Daemons pass it as the `shutdown` future of their `serve`/`run` functions; tests
/// pass their own future instead.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

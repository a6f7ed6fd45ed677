//! Tracing set-up shared by every Ferry binary.

use tracing_subscriber::EnvFilter;

/// Installs a `tracing` subscriber writing to stderr.
///
/// The level comes from `RUST_LOG` (e.g. `RUST_LOG=fs_server=debug`), defaulting to
/// `info`. Each line carries the binary's `role` (e.g. `fs-server`) so that the logs of
/// several daemons of one node can be interleaved in one file and still read.
/// Calling it twice is harmless (the second call does nothing).
pub fn init(role: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
    tracing::debug!(role, "logging initialised");
}

//! Crash points for fault tests.
//!
//! A daemon started with `FERRY_FAULT=<name>` in its environment dies at the point
//! `name` as if killed there (SIGABRT: no clean-up runs). The fault tests use them
//! for the crash windows a `kill -9` from outside cannot hit on purpose (between two
//! steps of a commit). Nothing else sets the variable.
//!
//! The points (daemon: where it dies):
//!
//! - `after-commit` (migd, destination): its restorer has the commit, `committed`
//!   is not answered yet.
//! - `proxy-before-commit` (home-proxy): the source decided (`decided` taken), the
//!   original is not the shadow yet.
//! - `source-after-offer` (migd, source): the destination accepted the offer
//!   (its restorer started), nothing was held or restored yet.
//! - `mover-after-commit` (migd, host of a process moving on): the destination
//!   answered `committed`, the old copy here is still held by our keeper.
//! - `home-before-commit-home`, `home-after-commit-home` (migd, home of a process
//!   coming home): `committed` came, before / after home-proxy was told
//!   `commit_home`; not answered yet.
//! - `home-after-restore-into` (migd, home of a process coming home): home-proxy
//!   restored the process into its shadow, `restore` is not answered yet.

/// Dies here if `FERRY_FAULT` names this point.
pub fn point(name: &str) {
    if std::env::var("FERRY_FAULT").is_ok_and(|v| v == name) {
        tracing::error!(
            point = name,
            "FERRY_FAULT: dying here as a fault test asked"
        );
        std::process::abort();
    }
}

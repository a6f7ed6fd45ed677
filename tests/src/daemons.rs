//! The daemons a node runs, in start order: the one place that lists them.

use common::config::NodeConfig;

/// When a started daemon counts as ready.
#[derive(Debug, Clone, Copy)]
pub enum Ready {
    /// Its TCP port (from the node config) accepts connections.
    Port(fn(&NodeConfig) -> u16),
    /// The super-root is mounted in its mount namespace.
    Mounted,
    /// Right after start (it did not exit within a short grace period).
    Started,
}

/// One Ferry daemon.
#[derive(Debug, Clone, Copy)]
pub struct DaemonSpec {
    /// Binary name, next to `cluster`; also the log file's name (`DIR/<node>/<name>.log`).
    pub name: &'static str,
    /// A required daemon that fails to start (or is still a stub) fails `up`. An
    /// optional one only warns; an optional stub that logs "not implemented yet" is
    /// recorded as such (and `Cluster::has_daemon` says false).
    pub required: bool,
    pub ready: Ready,
}

/// The log line by which a stub daemon says it does not exist yet.
pub const STUB_MARKER: &str = "not implemented yet";

/// Every daemon, in start order. Each phase (one entry) is started on every node and
/// waited for before the next: fuse-client needs every fs-server up.
pub const DAEMONS: &[DaemonSpec] = &[
    DaemonSpec {
        name: "fs-server",
        required: true,
        ready: Ready::Port(|c| c.ports.fs),
    },
    DaemonSpec {
        name: "fuse-client",
        required: true,
        ready: Ready::Mounted,
    },
    DaemonSpec {
        name: "migd",
        required: false,
        ready: Ready::Port(|c| c.ports.migd),
    },
    DaemonSpec {
        name: "home-proxy",
        required: false,
        ready: Ready::Port(|c| c.ports.proxy),
    },
];

/// The spec of a daemon by name.
pub fn spec(name: &str) -> Option<&'static DaemonSpec> {
    DAEMONS.iter().find(|d| d.name == name)
}

//! Ferry's local-cluster harness: several Ferry nodes on one machine.
//!
//! Each node `ws<i>` is a set of namespaces held by a small pid 1 (`cluster
//! node-init`): its own network (a veth on the bridge `ferrybr<k>`, address
//! 10.99.k.i), its own mounts (private propagation, a private /tmp from
//! `DIR/ws<i>/tmp`, its own /proc and its own `/...`), its own hostname and its own
//! pids. In each node run fs-server, fuse-client, migd and home-proxy, found next to
//! the `cluster` binary, each with `DIR/ws<i>/ferry.toml` and logging to
//! `DIR/ws<i>/<daemon>.log`; `DIR/cluster.state` records what runs.
//!
//! Two faces: the `cluster` binary (`up`, `exec`, `down`) and [`Cluster`] for
//! tests, benchmarks and the demo. This crate owns no Ferry logic; it reads and
//! writes `common::config::NodeConfig` and runs the other crates' binaries.

pub mod cluster;
pub mod daemons;
pub mod down;
pub mod exec;
pub mod net;
pub mod node;
pub mod state;
mod sys;
pub mod up;
pub mod work;

pub use cluster::{Builder, Cluster};
pub use down::{down, DownError, DownReport};
pub use exec::{exec_in_node, ExecError, ExecRequest};
pub use state::ClusterState;
pub use up::{up, UpError, UpOptions};

/// Re-exported for [`Cluster::kill_daemon`] callers.
pub use nix::sys::signal::Signal;

//! `DIR/cluster.state`: what `up` started, so that `exec`, `down` and the test API find
//! it again from another process.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the state file inside a cluster directory.
pub const STATE_FILE: &str = "cluster.state";

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no cluster is recorded in {dir}: {path} is missing (start one with `cluster up --dir {dir}`)")]
    Missing { dir: PathBuf, path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid cluster state file: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no node {node:?} in the cluster at {dir} (nodes: {known})")]
    NoSuchNode {
        node: String,
        dir: PathBuf,
        known: String,
    },
}

/// Everything `up` made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// The cluster directory (absolute).
    pub dir: PathBuf,
    /// Cluster slot: picks the bridge name and the subnet `10.99.<index>.0/24`.
    pub index: u8,
    /// The bridge in the root network namespace.
    pub bridge: String,
    /// Where Ferry's binaries (and `cluster`) are.
    pub bin_dir: PathBuf,
    /// Pid of the process that ran `up` (for diagnostics).
    pub up_pid: u32,
    pub nodes: Vec<NodeState>,
}

/// One node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub addr: Ipv4Addr,
    /// The host end of the node's veth pair (on the bridge).
    pub veth: String,
    /// Host pid of the node's pid 1 (`cluster node-init`).
    pub holder: i32,
    /// The node's config file.
    pub config: PathBuf,
    /// The node's namespaces as the kernel names them (`net:[4026532...]`, ...), for
    /// diagnostics; `exec` enters them through `/proc/<holder>/ns/*`.
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub daemons: Vec<DaemonState>,
}

/// One daemon of a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonState {
    pub name: String,
    /// Host pid while it runs; `None` when it is not running.
    pub pid: Option<i32>,
    /// Why it is not running, when it is not ("not implemented yet", ...).
    pub absent: Option<String>,
}

impl ClusterState {
    /// Path of the state file of `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads `DIR/cluster.state`.
    pub fn load(dir: &Path) -> Result<ClusterState, StateError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::Missing {
                    dir: dir.to_owned(),
                    path,
                })
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        toml::from_str(&text).map_err(|source| StateError::Parse { path, source })
    }

    /// Writes `DIR/cluster.state` atomically (temp file + rename).
    pub fn save(&self) -> Result<(), StateError> {
        let path = Self::path(&self.dir);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let text = toml::to_string_pretty(self).expect("the state serializes to TOML");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| StateError::Write { path, source })
    }

    /// The named node.
    pub fn node(&self, name: &str) -> Result<&NodeState, StateError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| self.no_such_node(name))
    }

    /// The named node, mutably.
    pub fn node_mut(&mut self, name: &str) -> Result<&mut NodeState, StateError> {
        let err = self.no_such_node(name);
        self.nodes.iter_mut().find(|n| n.name == name).ok_or(err)
    }

    fn no_such_node(&self, name: &str) -> StateError {
        StateError::NoSuchNode {
            node: name.to_owned(),
            dir: self.dir.clone(),
            known: self
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

impl NodeState {
    /// The named daemon's record, if `up` knows it.
    pub fn daemon(&self, name: &str) -> Option<&DaemonState> {
        self.daemons.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_toml() {
        let s = ClusterState {
            dir: "/var/tmp/x".into(),
            index: 3,
            bridge: "ferrybr3".into(),
            bin_dir: "/t/debug".into(),
            up_pid: 42,
            nodes: vec![NodeState {
                name: "ws1".into(),
                addr: Ipv4Addr::new(10, 99, 3, 1),
                veth: "fv3-1".into(),
                holder: 100,
                config: "/var/tmp/x/ws1/ferry.toml".into(),
                namespaces: vec!["net:[4026532000]".into()],
                daemons: vec![
                    DaemonState {
                        name: "fs-server".into(),
                        pid: Some(101),
                        absent: None,
                    },
                    DaemonState {
                        name: "migd".into(),
                        pid: None,
                        absent: Some("not implemented yet".into()),
                    },
                ],
            }],
        };
        let text = toml::to_string_pretty(&s).unwrap();
        let back: ClusterState = toml::from_str(&text).unwrap();
        assert_eq!(back.nodes[0].daemons, s.nodes[0].daemons, "{text}");
        assert_eq!(back.nodes[0].addr, s.nodes[0].addr);
        assert!(matches!(
            back.node("ws9"),
            Err(StateError::NoSuchNode { .. })
        ));
    }
}

//! The node configuration file (TOML), read by every Ferry daemon of a node.
//!
//! One file describes one node and the cluster it belongs to. A minimal one:
//!
//! ```toml
//! node = "ws1"
//! key_file = "/etc/ferry/cluster.key"
//!
//! [[nodes]]
//! name = "ws1"
//! addr = "10.77.0.1"
//!
//! [[nodes]]
//! name = "ws2"
//! addr = "10.77.0.2"
//! ```
//!
//! Everything else has a default; `docs/config.md` documents every key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config file {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// TCP ports of the node's services; every node of a cluster uses the same ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Ports {
    /// fs-server's file service.
    pub fs: u16,
    /// migd's migration service.
    pub migd: u16,
    /// home-proxy's service (shadows, signals, host-specific calls).
    pub proxy: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            fs: 7101,
            migd: 7102,
            proxy: 7103,
        }
    }
}

/// One member of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node's name, unique in the cluster (`ws1`); it is also the name of the
    /// volume that exports the node's root.
    pub name: String,
    /// The address the node's daemons listen on.
    pub addr: IpAddr,
}

/// One exported tree.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Name under the super-root: `/.../<name>/`.
    pub name: String,
    /// Directory exported as the volume's root.
    pub path: PathBuf,
}

/// fs-server's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FsConfig {
    /// Export this node's `/` as the volume named after the node.
    pub export_root: bool,
    /// Further volumes (the file server adds the store here).
    pub volumes: Vec<VolumeConfig>,
    /// Map root (uid 0) of client nodes to `nobody`.
    pub squash_root: bool,
    /// Follow lookups into other mounts below a volume (e.g. a node's private /tmp).
    /// FUSE mounts, /proc, /sys and /dev are never entered, whatever this says.
    pub cross_mounts: bool,
    /// Largest RPC frame accepted, in bytes (protects against oversized frames).
    pub max_frame_bytes: usize,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            export_root: true,
            volumes: Vec::new(),
            squash_root: false,
            cross_mounts: true,
            max_frame_bytes: crate::transport::DEFAULT_MAX_FRAME,
        }
    }
}

/// fuse-client's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FuseConfig {
    /// Where the super-root is mounted.
    pub mountpoint: PathBuf,
    /// How long a call waits for an unreachable or restarting fs-server before it
    /// fails with EIO, in seconds.
    pub reconnect_timeout_secs: u64,
    /// Attribute and entry cache lifetime, in milliseconds, for files that are not
    /// write-shared (write-shared files are never cached).
    pub attr_ttl_ms: u64,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            mountpoint: PathBuf::from("/..."),
            reconnect_timeout_secs: 60,
            attr_ttl_ms: 1000,
        }
    }
}

/// migd's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MigdConfig {
    /// Unix socket the `migrate` command talks to.
    pub socket: PathBuf,
    /// Volume holding migration images and flushed pages.
    pub store_volume: String,
    /// Directory for local state (images under way, uffd bookkeeping).
    pub state_dir: PathBuf,
    /// Pre-copy: at most this many rounds while the process runs.
    pub precopy_max_rounds: u32,
    /// Pre-copy: freeze once a round wrote fewer bytes than this.
    pub precopy_stop_below_bytes: u64,
    /// Pre-copy: when the rounds stop shrinking (the process writes its memory
    /// about as fast as the store takes it), hold it frozen up to this share of
    /// the time, in percent, so that they shrink again; 0: never.
    pub precopy_throttle_max_percent: u32,
    /// Lazy: how long reading pages from the store may keep failing while the
    /// process waits on them; past it the process is killed and the loss reported.
    pub lazy_store_bound_secs: u64,
    /// Lazy: cap on background prefetch from the store, in MiB/s (0: none). Faults
    /// are always served at once.
    pub lazy_prefetch_mib_per_sec: u64,
    /// Destination of a pre-copy with lazy fault-in: read the rounds' pages from
    /// the store while the source writes the next ones, at most this many MiB
    /// (and no more than a quarter of the node's available memory); 0: off.
    pub precopy_warm_mib: u64,
    /// Lazy modes: start the destination right after the freeze and write the pages
    /// it serves on demand afterwards (late.img, see docs/lazy.md "Late pages").
    /// On by default.
    pub lazy_late_pages: bool,
    /// How long a destination keeps a migration in flight waiting for its source's
    /// next word, in seconds: an accepted offer (its restorer started, the home
    /// view built) until `restore`, a restored copy (held before its first
    /// instruction) until `committed`, a process restored into its shadow until
    /// the commit. Past it the destination drops it (the copy never ran) and says
    /// so in its log. Must exceed the longest pre-copy and dump of a process.
    pub offer_bound_secs: u64,
}

impl Default for MigdConfig {
    fn default() -> Self {
        MigdConfig {
            socket: PathBuf::from("/run/ferry/migd.sock"),
            store_volume: "store".to_string(),
            state_dir: PathBuf::from("/var/lib/ferry"),
            precopy_max_rounds: 8,
            precopy_stop_below_bytes: 8 << 20,
            precopy_throttle_max_percent: 0,
            lazy_store_bound_secs: 60,
            lazy_prefetch_mib_per_sec: 0,
            precopy_warm_mib: 4096,
            lazy_late_pages: true,
            offer_bound_secs: 600,
        }
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; must appear in `nodes`.
    pub node: String,
    /// File holding the cluster key (any bytes, at least 16; keep it mode 0600).
    pub key_file: PathBuf,
    /// Every member of the cluster, this node included.
    pub nodes: Vec<NodeEntry>,
    #[serde(default)]
    pub ports: Ports,
    #[serde(default)]
    pub fs: FsConfig,
    #[serde(default)]
    pub fuse: FuseConfig,
    #[serde(default)]
    pub migd: MigdConfig,
}

impl NodeConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: NodeConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate().map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        Ok(config)
    }

    /// Checks what serde cannot: names unique and well-formed, this node listed.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for n in &self.nodes {
            check_name(&n.name).map_err(|e| format!("node name {:?}: {e}", n.name))?;
            if !names.insert(n.name.as_str()) {
                return Err(format!("node {:?} is listed twice in [[nodes]]", n.name));
            }
        }
        if !names.contains(self.node.as_str()) {
            return Err(format!(
                "this node {:?} is not listed in [[nodes]]; add it with its address",
                self.node
            ));
        }
        for v in &self.fs.volumes {
            check_name(&v.name).map_err(|e| format!("volume name {:?}: {e}", v.name))?;
            if self.fs.export_root && v.name == self.node {
                return Err(format!(
                    "volume {:?} has the node's own name, which the root export uses",
                    v.name
                ));
            }
            if !v.path.is_absolute() {
                return Err(format!("volume {:?}: path must be absolute", v.name));
            }
        }
        if self.fs.max_frame_bytes < 2 << 20 {
            return Err("fs.max_frame_bytes must be at least 2 MiB (writes are 1 MiB)".into());
        }
        Ok(())
    }

    /// The entry of a named node.
    pub fn node_entry(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// This node's own entry.
    pub fn me(&self) -> &NodeEntry {
        self.node_entry(&self.node)
            .expect("validate() checked this node is listed")
    }

    /// Address of a node's fs-server.
    pub fn fs_addr(&self, node: &NodeEntry) -> SocketAddr {
        SocketAddr::new(node.addr, self.ports.fs)
    }

    /// Address of a node's migd.
    pub fn migd_addr(&self, node: &NodeEntry) -> SocketAddr {
        SocketAddr::new(node.addr, self.ports.migd)
    }

    /// Address of a node's home-proxy.
    pub fn proxy_addr(&self, node: &NodeEntry) -> SocketAddr {
        SocketAddr::new(node.addr, self.ports.proxy)
    }

    /// Volumes this node's fs-server exports, the root export first.
    pub fn exported_volumes(&self) -> Vec<VolumeConfig> {
        let mut v = Vec::new();
        if self.fs.export_root {
            v.push(VolumeConfig {
                name: self.node.clone(),
                path: PathBuf::from("/"),
            });
        }
        v.extend(self.fs.volumes.iter().cloned());
        v
    }

    /// Reads the cluster key.
    pub fn load_key(&self) -> Result<crate::auth::ClusterKey, crate::auth::KeyError> {
        crate::auth::ClusterKey::load(&self.key_file)
    }

    /// How long fuse-client waits for a restarting server.
    pub fn reconnect_timeout(&self) -> Duration {
        Duration::from_secs(self.fuse.reconnect_timeout_secs)
    }
}

/// Node and volume names: what may stand as one path component under `/...`.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("may hold only letters, digits, '-' and '_'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
node = "ws1"
key_file = "/k"
[[nodes]]
name = "ws1"
addr = "10.77.0.1"
[[nodes]]
name = "ws2"
addr = "10.77.0.2"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c: NodeConfig = toml::from_str(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.ports.fs, 7101);
        assert_eq!(c.fuse.mountpoint, PathBuf::from("/..."));
        assert_eq!(c.exported_volumes()[0].name, "ws1");
        assert_eq!(c.fs_addr(c.me()).to_string(), "10.77.0.1:7101");
    }

    #[test]
    fn unlisted_node_is_refused() {
        let text = MINIMAL.replace("node = \"ws1\"", "node = \"ws9\"");
        let c: NodeConfig = toml::from_str(&text).unwrap();
        assert!(c.validate().unwrap_err().contains("not listed"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!("{MINIMAL}\n[fs]\nsquash_rot = true\n");
        assert!(toml::from_str::<NodeConfig>(&text).is_err());
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(check_name("..").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("ws-1_b").is_ok());
    }
}

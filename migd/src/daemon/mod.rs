//! The migd daemon: the migration service between nodes ([`common::migproto`]) on
//! `ports.migd`, and the local socket the `migrate` command talks to.
//!
//! - [`local`]: the unix socket (`migd.socket`), the caller's credentials
//!   (SO_PEERCRED), and migrations started here: from home ([`source`]) or, for a
//!   process whose shadow is here, by asking its host to move it on.
//! - [`host`]: the destination side: offers, restores under the home's file view,
//!   watching foreign processes and reporting their end to their home; moving them on
//!   (going home included: the home's home-proxy restores into the shadow).
//! - [`helpers`]: the single-threaded helper processes that hold a frozen process
//!   (the keeper; at home it keeps the shadow) and restore one (the restorer), run as
//!   `migrate internal-keep` / `migrate internal-restore`; [`keeper`] starts one.
//! - [`settle`]: a commit whose answer may be lost, settled by asking the
//!   destination; the decision of a move onward, kept for a restarted migd.
//!
//! At home the original is held by home-proxy (`common::migproto::ProxyService`),
//! which keeps the shadows; migd keeps the foreign processes running here (a record
//! each in `<state_dir>/foreign/`, taken back by a restarted migd), and the decision
//! of a move onward until it is settled. Migrations in flight to this node (offers,
//! copies not committed yet) are in memory only, and dropped past
//! `migd.offer_bound_secs` ([`host::drop_stale`]).

pub mod client;
pub mod helpers;
pub mod host;
pub mod keeper;
pub mod local;
pub mod relay;
pub mod settle;
pub mod source;
pub mod sys;

use common::auth::ClusterKey;
use common::config::NodeConfig;
use common::migproto::{
    MigError, MigdService, MigdServiceClient, ProcessEntry, ProxyServiceClient,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tarpc::server::Channel;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] common::config::ConfigError),
    #[error(transparent)]
    Key(#[from] common::auth::KeyError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Deadline of calls that wait for a restore.
pub const LONG_CALL: Duration = Duration::from_secs(300);

/// A foreign process running here.
pub struct ForeignRec {
    pub entry: ProcessEntry,
    /// Set when it is moving on: its end (killed here) is then not reported home.
    pub departing: bool,
    /// Lines to its restorer (`commit`, `abort`) until the commit; `None` after.
    pub restorer: Option<tokio::process::ChildStdin>,
    /// Its restorer took the commit (or it was taken back after a restart, which
    /// only a committed copy can be): it runs and outlives this migd.
    pub committed: bool,
    /// Restored lazily: its image stays in the store until its restorer says every
    /// page is in (`paged`), not only until the commit.
    pub lazy: bool,
    /// Its move's image directory (under the store's `migrations/`).
    pub image: String,
    /// When it was restored here (until its commit it is dropped past
    /// `migd.offer_bound_secs` from then).
    pub restored_at: Instant,
}

/// A process restored into its shadow here (going home), until its commit or abort.
pub struct Homing {
    /// Its move's image directory.
    pub image: String,
    /// When it was restored into the shadow.
    pub since: Instant,
}

/// Everything the daemon's tasks share.
pub struct Daemon {
    pub config: NodeConfig,
    pub key: ClusterKey,
    /// The `migrate` binary, whose hidden subcommands are the helpers.
    pub helper_exe: PathBuf,
    next: AtomicU64,
    pub foreign: Mutex<HashMap<String, ForeignRec>>,
    pub offers: Mutex<HashMap<String, host::Offered>>,
    /// Migrations coming home whose image was restored into the shadow, until their
    /// commit or abort.
    pub homing: Mutex<HashMap<String, Homing>>,
    /// The images of moves committed here whose copy has since ended or moved on:
    /// `runs` still answers true for them (a source settling late must not thaw
    /// its original). In memory, one short string per move.
    pub committed_gone: Mutex<std::collections::HashSet<String>>,
    /// Held by a homecoming's commit (across `commit_home`) and by `runs_at_home`
    /// (across its look and its `abort_home`), so that neither acts on what the
    /// other is changing.
    pub home_gate: tokio::sync::Mutex<()>,
    /// The relayed pipes of foreign processes running here, by id (see [`relay`]).
    pub relays: Mutex<HashMap<String, std::sync::Arc<relay::RelaySet>>>,
}

impl Daemon {
    /// A fresh cluster-unique migration id.
    pub fn new_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("{}-{t}-{n}", self.config.node)
    }

    /// Records and sockets of the foreign processes running here.
    pub fn foreign_dir(&self) -> PathBuf {
        self.config.migd.state_dir.join("foreign")
    }

    /// The super-root mount point.
    pub fn superroot(&self) -> &Path {
        &self.config.fuse.mountpoint
    }

    /// Where migration `id`'s image lives in the store.
    pub fn image_dir(&self, id: &str) -> PathBuf {
        self.superroot()
            .join(&self.config.migd.store_volume)
            .join("migrations")
            .join(id)
    }

    /// Connects to a node's migd.
    pub async fn peer(&self, node: &str) -> Result<MigdServiceClient, MigError> {
        let t = self.connect(node, |c, e| c.migd_addr(e), "migd").await?;
        Ok(MigdServiceClient::new(tarpc::client::Config::default(), t).spawn())
    }

    /// Connects to a node's home-proxy.
    pub async fn proxy(&self, node: &str) -> Result<ProxyServiceClient, MigError> {
        let t = self
            .connect(node, |c, e| c.proxy_addr(e), "home-proxy")
            .await?;
        Ok(ProxyServiceClient::new(tarpc::client::Config::default(), t).spawn())
    }

    async fn connect<In, Out>(
        &self,
        node: &str,
        addr: impl Fn(&NodeConfig, &common::config::NodeEntry) -> std::net::SocketAddr,
        daemon: &str,
    ) -> Result<common::transport::RpcTransport<In, Out>, MigError>
    where
        In: for<'de> serde::Deserialize<'de>,
        Out: serde::Serialize,
    {
        let entry = self
            .config
            .node_entry(node)
            .ok_or_else(|| MigError::Refused {
                node: self.config.node.clone(),
                why: format!(
                    "unknown node {node:?}; the cluster's nodes are {}",
                    self.node_names()
                ),
            })?;
        let (t, _) = common::transport::connect(
            addr(&self.config, entry),
            &self.key,
            &self.config.node,
            common::transport::DEFAULT_MAX_FRAME,
        )
        .await
        .map_err(|e| MigError::Failed {
            node: node.to_string(),
            why: format!("its {daemon} cannot be reached: {e}"),
        })?;
        Ok(t)
    }

    /// The cluster's node names, for messages.
    pub fn node_names(&self) -> String {
        self.config
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A context whose deadline allows a restore.
pub fn long_ctx() -> tarpc::context::Context {
    let mut c = tarpc::context::current();
    c.deadline = std::time::Instant::now() + LONG_CALL;
    c
}

/// The real uid owning `pid` (as this node sees it).
pub fn owner(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    crate::engine::procfs::id_triple(&status, "Uid").map(|ids| ids[0])
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Flattens a tarpc call's two error layers into a [`MigError`] naming `node`.
pub fn flat<T>(
    node: &str,
    r: Result<Result<T, MigError>, tarpc::client::RpcError>,
) -> Result<T, MigError> {
    match r {
        Ok(r) => r,
        Err(e) => Err(MigError::Failed {
            node: node.to_string(),
            why: format!("the call failed: {e}"),
        }),
    }
}

/// Runs the daemon for the config file at `path` until SIGTERM or SIGINT.
pub fn run(path: &Path) -> Result<(), StartError> {
    let config = NodeConfig::load(path)?;
    let rt = tokio::runtime::Runtime::new().map_err(|source| StartError::Io {
        what: "starting the tokio runtime".into(),
        source,
    })?;
    rt.block_on(serve(config, common::shutdown::signal()))
}

/// Serves the migration service and the local socket until `shutdown` completes.
pub async fn serve(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let key = config.load_key()?;
    let helper_exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("migrate")))
        .unwrap_or_else(|| PathBuf::from("migrate"));
    let addr = config.migd_addr(config.me());
    let listener = common::transport::bind(addr)
        .await
        .map_err(|source| StartError::Io {
            what: format!("migd of node {}", config.node),
            source,
        })?;
    let sock_path = config.migd.socket.clone();
    let local = local::bind(&sock_path)?;
    let d = Arc::new(Daemon {
        config,
        key,
        helper_exe,
        next: AtomicU64::new(1),
        foreign: Mutex::new(HashMap::new()),
        offers: Mutex::new(HashMap::new()),
        homing: Mutex::new(HashMap::new()),
        committed_gone: Mutex::new(Default::default()),
        home_gate: tokio::sync::Mutex::new(()),
        relays: Mutex::new(HashMap::new()),
    });
    tracing::info!(%addr, socket = %sock_path.display(), node = %d.config.node, "migd listening");
    host::adopt_foreign(&d).await;
    host::give_up_homecomings(&d).await;
    tokio::spawn(host::drop_stale(d.clone()));
    let conn_d = d.clone();
    let remote = common::transport::serve_authenticated(
        listener,
        d.key.clone(),
        d.config.node.clone(),
        |peer_addr| tracing::info_span!("migd_conn", peer = %peer_addr),
        move |channel, peer| {
            let d = conn_d.clone();
            channel.execute(host::Conn { d, peer }.serve())
        },
        shutdown,
    );
    let local_clients = async {
        loop {
            match local.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(local::client(d.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "local accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    // The local socket is served until the migration service stops (on `shutdown`).
    tokio::select! {
        _ = remote => {}
        _ = local_clients => {}
    }
    let _ = std::fs::remove_file(&sock_path);
    tracing::info!("migd stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use common::migproto::{LocalReply, LocalRequest, Mode};

    #[test]
    fn local_messages_are_json_lines() {
        let r = LocalRequest::Migrate {
            pid: 42,
            dest: "ws2".into(),
            mode: Mode::StopCopy,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains('\n'), "not one line: {s}");
        assert_eq!(serde_json::from_str::<LocalRequest>(&s).unwrap(), r);
        let e = LocalReply::Error {
            message: "no".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<LocalReply>(&s).unwrap(), e);
    }
}

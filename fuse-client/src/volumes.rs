//! The super-root's contents: which volumes the cluster has and which node serves
//! each, learnt by asking every node's fs-server for `volumes()`.
//!
//! The list is refreshed when a lookup in the super-root misses (at most once a
//! second) and when the super-root is listed and the list is older than
//! [`LIST_MAX_AGE`]. A node that does not answer within [`ASK_PATIENCE`] keeps the
//! volumes it had: it may be restarting, and calls to it wait for it as any other.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::ServerConn;

/// Longest we wait for one node's list during a refresh.
pub const ASK_PATIENCE: Duration = Duration::from_secs(2);
/// A listing of the super-root refreshes a list older than this.
pub const LIST_MAX_AGE: Duration = Duration::from_secs(5);
/// A lookup miss refreshes a list older than this.
pub const MISS_MAX_AGE: Duration = Duration::from_secs(1);

/// Volume name -> serving node.
#[derive(Debug, Default)]
pub struct Volumes {
    map: BTreeMap<String, String>,
    refreshed: Option<Instant>,
}

impl Volumes {
    /// The node serving `volume`.
    pub fn node_of(&self, volume: &str) -> Option<&str> {
        self.map.get(volume).map(String::as_str)
    }

    /// Every (volume, node), sorted by volume.
    pub fn list(&self) -> Vec<(String, String)> {
        self.map
            .iter()
            .map(|(v, n)| (v.clone(), n.clone()))
            .collect()
    }

    /// Whether the list is older than `max_age` (or was never fetched).
    pub fn stale(&self, max_age: Duration) -> bool {
        self.refreshed.is_none_or(|t| t.elapsed() >= max_age)
    }

    /// Asks every server for its volumes and merges the answers.
    pub async fn refresh(&mut self, servers: &HashMap<String, Arc<ServerConn>>) {
        let asks = servers.values().map(|conn| {
            let conn = conn.clone();
            async move {
                let r = conn
                    .call_with("volumes", ASK_PATIENCE, ASK_PATIENCE, |c, ctx| async move {
                        c.volumes(ctx).await.map(Ok)
                    })
                    .await;
                (conn.node().to_string(), r)
            }
        });
        let answers = futures::future::join_all(asks).await;
        for (node, answer) in answers {
            match answer {
                Ok(volumes) => {
                    self.map.retain(|_, n| *n != node);
                    for v in volumes {
                        if let Err(e) = common::config::check_name(&v.name) {
                            tracing::warn!(%node, volume = %v.name, "ignoring volume with a bad name: {e}");
                            continue;
                        }
                        if v.node != node {
                            tracing::debug!(%node, volume = %v.name, claimed = %v.node, "volume names another node; using the one that served it");
                        }
                        if let Some(other) = self.map.get(&v.name) {
                            if *other != node {
                                tracing::warn!(volume = %v.name, first = %other, second = %node, "two nodes export the same volume name; keeping the first");
                                continue;
                            }
                        }
                        self.map.insert(v.name, node.clone());
                    }
                }
                Err(e) => {
                    tracing::debug!(%node, error = %e, "node did not list its volumes; keeping what it had");
                }
            }
        }
        self.refreshed = Some(Instant::now());
    }
}

//! The client's inode table: FUSE inode numbers <-> (fs-server, [`FileHandle`]).
//!
//! Inode 1 is the super-root and is not in the table. Every other number is handed
//! out once, counting up, and never reused (so no generation numbers are needed: the
//! kernel never sees one number name two files). Each entry counts the kernel's
//! lookups (+1 per entry reply, readdirplus entry and create; `forget` subtracts) and
//! leaves the table when the count reaches zero. The same file seen again through
//! another name or after a `forget` gets its existing number, or a fresh one.
//!
//! The server's callbacks name files by the server's own inode number
//! ([`common::fsproto::Attr::ino`]); a second index maps those back.

use std::collections::HashMap;
use std::sync::Arc;

use common::fsproto::{FileHandle, FileKind};

use crate::conn::ServerConn;

/// The super-root's inode number.
pub const ROOT_INO: u64 = 1;

/// One file the kernel knows.
#[derive(Debug, Clone)]
pub struct Node {
    pub server: Arc<ServerConn>,
    pub handle: FileHandle,
    /// The server's inode number (what its callbacks name).
    pub server_ino: u64,
    pub kind: FileKind,
    /// The file is write-shared: no attribute or page caching.
    pub uncached: bool,
    lookups: u64,
}

/// The table.
#[derive(Debug)]
pub struct InodeTable {
    next: u64,
    nodes: HashMap<u64, Node>,
    by_handle: HashMap<(String, FileHandle), u64>,
    by_server_ino: HashMap<(String, u64), Vec<u64>>,
}

impl Default for InodeTable {
    fn default() -> Self {
        InodeTable {
            next: ROOT_INO + 1,
            nodes: HashMap::new(),
            by_handle: HashMap::new(),
            by_server_ino: HashMap::new(),
        }
    }
}

impl InodeTable {
    /// The node of `ino`, cloned out of the lock.
    pub fn get(&self, ino: u64) -> Option<Node> {
        self.nodes.get(&ino).cloned()
    }

    /// Records one kernel lookup of the file `handle` on `server`; returns its number.
    pub fn remember(
        &mut self,
        server: &Arc<ServerConn>,
        handle: &FileHandle,
        server_ino: u64,
        kind: FileKind,
    ) -> u64 {
        let key = (server.node().to_string(), handle.clone());
        if let Some(&ino) = self.by_handle.get(&key) {
            let node = self.nodes.get_mut(&ino).expect("indexes agree");
            node.lookups += 1;
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                server: server.clone(),
                handle: handle.clone(),
                server_ino,
                kind,
                uncached: false,
                lookups: 1,
            },
        );
        self.by_server_ino
            .entry((key.0.clone(), server_ino))
            .or_default()
            .push(ino);
        self.by_handle.insert(key, ino);
        ino
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 {
            return;
        }
        let node = self.nodes.remove(&ino).expect("present");
        let server = node.server.node().to_string();
        let skey = (server.clone(), node.server_ino);
        if let Some(list) = self.by_server_ino.get_mut(&skey) {
            list.retain(|&i| i != ino);
            if list.is_empty() {
                self.by_server_ino.remove(&skey);
            }
        }
        self.by_handle.remove(&(server, node.handle));
    }

    /// Our numbers for the server's inode `server_ino`.
    pub fn by_server_ino(&self, server: &str, server_ino: u64) -> Vec<u64> {
        self.by_server_ino
            .get(&(server.to_string(), server_ino))
            .cloned()
            .unwrap_or_default()
    }

    /// Every number of files on `server`.
    pub fn of_server(&self, server: &str) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.server.node() == server)
            .map(|(&i, _)| i)
            .collect()
    }

    /// Marks `ino` write-shared (uncached) or not.
    pub fn set_uncached(&mut self, ino: u64, uncached: bool) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.uncached = uncached;
        }
    }

    /// Number of files in the table (for tests and logs).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

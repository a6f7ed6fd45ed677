//! The client's inode table: FUSE inode numbers <-> (fs-server, [`FileHandle`]).
//!
//! Inode 1 is the super-root and is not in the table. A file's number is the
//! server's own inode number for it ([`common::fsproto::Attr::ino`], a hash of the
//! volume, device and inode, never 0 or 1), so `st_ino` is the same on every node and
//! across restarts of this client — a migrated process sees the numbers it saw at
//! home. Only when that number is already held for a *different* file (the server
//! reused an inode number while the kernel still holds the old file) is a fresh number
//! taken from a private range; a number is never given to a second file while the
//! kernel may still know the first, so no generation numbers are needed. Each entry
//! counts the kernel's lookups (+1 per entry reply, readdirplus entry and create;
//! `forget` subtracts) and leaves the table when the count reaches zero.
//!
//! The server's callbacks name files by the server's own inode number
//! ([`common::fsproto::Attr::ino`]); a second index maps those back.

use std::collections::HashMap;
use std::sync::Arc;

use common::fsproto::{FileHandle, FileKind};

use crate::conn::ServerConn;

/// The super-root's inode number.
pub const ROOT_INO: u64 = 1;

/// Where numbers for files whose server number is taken start.
const FRESH_BASE: u64 = 1 << 63;

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
            next: FRESH_BASE,
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
            tracing::trace!(ino, server_ino, lookups = node.lookups, "remember: known");
            return ino;
        }
        let ino = if server_ino > ROOT_INO && !self.nodes.contains_key(&server_ino) {
            server_ino
        } else {
            loop {
                let i = self.next;
                self.next = self.next.checked_add(1).unwrap_or(FRESH_BASE);
                if !self.nodes.contains_key(&i) {
                    break i;
                }
            }
        };
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
        tracing::trace!(ino, server_ino, handle = ?handle.0, "remember: new");
        ino
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        tracing::trace!(ino, n, left = node.lookups, "forget");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::CallbackSink;

    struct NoSink;
    impl CallbackSink for NoSink {
        fn invalidate(&self, _: &str, _: u64, _: bool) -> futures::future::BoxFuture<'static, ()> {
            Box::pin(async {})
        }
        fn invalidate_entry(&self, _: &str, _: u64, _: Vec<u8>) {}
        fn reconnected(&self, _: &str) {}
    }

    fn server(name: &str) -> Arc<ServerConn> {
        let sink: std::sync::Weak<dyn CallbackSink> = std::sync::Weak::<NoSink>::new();
        ServerConn::new(
            name.into(),
            "127.0.0.1:1".parse().unwrap(),
            common::auth::ClusterKey::from_bytes(b"0123456789abcdef"),
            "me".into(),
            1 << 23,
            std::time::Duration::from_secs(1),
            sink,
        )
    }

    fn fh(b: u8) -> FileHandle {
        FileHandle(vec![b; 8])
    }

    #[test]
    fn a_file_keeps_the_servers_number_and_counts_lookups() {
        let s = server("ws1");
        let mut t = InodeTable::default();
        let a = t.remember(&s, &fh(1), 1000, FileKind::File);
        assert_eq!(a, 1000, "the server's inode number is used");
        assert_eq!(
            t.remember(&s, &fh(1), 1000, FileKind::File),
            a,
            "same handle, same number"
        );
        t.forget(a, 1);
        assert!(t.get(a).is_some(), "one lookup left: still known");
        t.forget(a, 1);
        assert!(t.get(a).is_none(), "all lookups forgotten: gone");
        assert!(
            t.by_server_ino("ws1", 1000).is_empty(),
            "callback index cleaned"
        );
    }

    #[test]
    fn a_reused_server_number_gets_a_fresh_one_while_the_old_file_is_known() {
        let s = server("ws1");
        let mut t = InodeTable::default();
        let old = t.remember(&s, &fh(1), 2000, FileKind::File);
        let new = t.remember(&s, &fh(2), 2000, FileKind::File);
        assert_ne!(old, new, "two files must not share a number");
        assert!(
            new >= FRESH_BASE,
            "fresh numbers come from the private range"
        );
        let mut both = t.by_server_ino("ws1", 2000);
        both.sort();
        assert_eq!(both, vec![old, new], "callbacks for 2000 reach both");
        t.forget(old, 1);
        t.forget(new, 1);
        let third = t.remember(&s, &fh(3), 2000, FileKind::File);
        assert_eq!(third, 2000, "once forgotten, the number is free again");
    }

    #[test]
    fn the_super_roots_number_is_never_given_out() {
        let s = server("ws1");
        let mut t = InodeTable::default();
        let i = t.remember(&s, &fh(9), ROOT_INO, FileKind::Dir);
        assert_ne!(i, ROOT_INO);
        assert_ne!(t.remember(&s, &fh(8), 0, FileKind::Dir), 0);
    }
}

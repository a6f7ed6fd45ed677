//! Per-client state: sessions, their open files, Sprite write-sharing, lock descriptors.
//!
//! A session is one requests connection. Opens are counted per (file, session); a file
//! is write-shared while two or more sessions hold it open and at least one of them for
//! writing. Opens of a write-shared file are answered `Uncached`; when a file becomes
//! write-shared the other holders are called back to drop their cached pages, and while
//! it stays write-shared every write calls them back again before it is acknowledged.
//!
//! `keep` (for `Cached` opens) is true when the session already holds the file open, or
//! when the file's (mtime, ctime, size) is what the session saw at its last open or
//! close: nobody changed it since, so the client's cached pages are still good.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use common::fsproto::{CacheCallbackClient, CacheMode, Time};

use crate::server::FileKey;

/// One client connection carrying requests.
pub struct Session {
    pub id: u64,
    /// The peer's proven node name.
    pub peer: String,
    pub addr: SocketAddr,
}

/// A file opened for a client.
pub struct OpenEntry {
    pub id: u64,
    pub session: u64,
    pub fd: OwnedFd,
    pub key: FileKey,
    pub ino: u64,
    /// The open(2) flags the server opened it with.
    pub flags: i32,
}

impl OpenEntry {
    pub fn writer(&self) -> bool {
        self.flags & libc::O_ACCMODE != libc::O_RDONLY
    }
}

/// What version of a file a session saw.
pub type Version = (Time, Time, u64);

pub fn version_of(st: &libc::statx) -> Version {
    let t = |t: &libc::statx_timestamp| Time {
        secs: t.tv_sec,
        nanos: t.tv_nsec,
    };
    (t(&st.stx_mtime), t(&st.stx_ctime), st.stx_size)
}

#[derive(Default)]
struct FileState {
    /// session -> (readers, writers)
    holders: HashMap<u64, (u32, u32)>,
}

impl FileState {
    fn write_shared(&self) -> bool {
        self.holders.len() >= 2 && self.holders.values().any(|h| h.1 > 0)
    }
}

/// Which lock descriptor: per session, lock owner, file, and flock vs POSIX.
pub type LockKey = (u64, u64, FileKey, bool);

#[derive(Default)]
struct Inner {
    sessions: HashMap<u64, Arc<Session>>,
    /// callback token -> session id
    tokens: HashMap<u64, u64>,
    /// session id -> its callback client
    callbacks: HashMap<u64, CacheCallbackClient>,
    /// callback channels that arrived before their session registered
    pending: HashMap<u64, CacheCallbackClient>,
    opens: HashMap<u64, Arc<OpenEntry>>,
    files: HashMap<FileKey, FileState>,
    seen: HashMap<(u64, FileKey), Version>,
    locks: HashMap<LockKey, Arc<OwnedFd>>,
}

/// What an open must do before it is answered.
pub struct OpenOutcome {
    pub cache: CacheMode,
    /// Other holders to call back (`invalidate(ino, true)`) before answering.
    pub notify: Vec<CacheCallbackClient>,
}

#[derive(Default)]
pub struct State {
    inner: Mutex<Inner>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_session(&self, s: Arc<Session>) {
        self.lock().sessions.insert(s.id, s);
    }

    /// Ends a session: its opens are closed, its locks released, its callback dropped.
    pub fn remove_session(&self, id: u64) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.sessions.remove(&id);
        inner.tokens.retain(|_, s| *s != id);
        inner.callbacks.remove(&id);
        let ids: Vec<u64> = inner
            .opens
            .values()
            .filter(|o| o.session == id)
            .map(|o| o.id)
            .collect();
        for oid in ids {
            if let Some(o) = inner.opens.remove(&oid) {
                drop_holder(&mut inner.files, &o);
            }
        }
        inner.seen.retain(|(s, _), _| *s != id);
        inner.locks.retain(|(s, _, _, _), _| *s != id);
    }

    /// Pairs a session with its callback token.
    pub fn register(&self, session: u64, token: u64) {
        let mut g = self.lock();
        g.tokens.insert(token, session);
        if let Some(c) = g.pending.remove(&token) {
            g.callbacks.insert(session, c);
        }
    }

    /// A callback channel arrived for `token` (before or after `register`).
    pub fn attach_callback(&self, token: u64, client: CacheCallbackClient) {
        let mut g = self.lock();
        match g.tokens.get(&token).copied() {
            Some(s) => {
                g.callbacks.insert(s, client);
            }
            None => {
                g.pending.insert(token, client);
            }
        }
    }

    /// Forgets the callback channel of `token` once its connection ended.
    pub fn detach_callback(&self, token: u64) {
        let mut g = self.lock();
        g.pending.remove(&token);
        if let Some(s) = g.tokens.get(&token).copied() {
            g.callbacks.remove(&s);
        }
    }

    /// Records an open and decides how the client may cache it. `None` if the session
    /// has ended meanwhile (the open is then dropped, not leaked).
    pub fn add_open(
        &self,
        o: Arc<OpenEntry>,
        version: Version,
        truncating: bool,
    ) -> Option<OpenOutcome> {
        let mut g = self.lock();
        let inner = &mut *g;
        if !inner.sessions.contains_key(&o.session) {
            return None;
        }
        let fs = inner.files.entry(o.key).or_default();
        let was_shared = fs.write_shared();
        let was_holding = fs.holders.contains_key(&o.session);
        let h = fs.holders.entry(o.session).or_default();
        if o.writer() {
            h.1 += 1;
        } else {
            h.0 += 1;
        }
        let now_shared = fs.write_shared();
        let others: Vec<u64> = fs
            .holders
            .keys()
            .copied()
            .filter(|s| *s != o.session)
            .collect();
        let cache = if now_shared {
            CacheMode::Uncached
        } else {
            let keep = was_holding || inner.seen.get(&(o.session, o.key)) == Some(&version);
            CacheMode::Cached { keep }
        };
        inner.seen.insert((o.session, o.key), version);
        let notify = if now_shared && (!was_shared || truncating) {
            others
                .iter()
                .filter_map(|s| inner.callbacks.get(s).cloned())
                .collect()
        } else {
            Vec::new()
        };
        inner.opens.insert(o.id, o);
        Some(OpenOutcome { cache, notify })
    }

    /// The open `id` of `session`, if this server knows it.
    pub fn get_open(&self, id: u64, session: u64) -> Option<Arc<OpenEntry>> {
        self.lock()
            .opens
            .get(&id)
            .filter(|o| o.session == session)
            .cloned()
    }

    /// Drops an open; `version` is what the session saw last.
    pub fn remove_open(
        &self,
        id: u64,
        session: u64,
        version: Option<Version>,
    ) -> Option<Arc<OpenEntry>> {
        let mut g = self.lock();
        let inner = &mut *g;
        match inner.opens.get(&id) {
            Some(o) if o.session == session => {}
            _ => return None,
        }
        let o = inner.opens.remove(&id)?;
        drop_holder(&mut inner.files, &o);
        if let Some(v) = version {
            inner.seen.insert((session, o.key), v);
        }
        Some(o)
    }

    /// After `session` wrote to a file: the other holders to call back before the write
    /// is acknowledged (none unless the file is write-shared).
    pub fn after_write(&self, key: FileKey, session: u64) -> Vec<CacheCallbackClient> {
        let g = self.lock();
        let Some(fs) = g.files.get(&key) else {
            return Vec::new();
        };
        if !fs.write_shared() {
            return Vec::new();
        }
        fs.holders
            .keys()
            .filter(|s| **s != session)
            .filter_map(|s| g.callbacks.get(s).cloned())
            .collect()
    }

    /// The callback clients of every session but `session` (for namespace changes,
    /// which any client may have cached).
    pub fn other_callbacks(&self, session: u64) -> Vec<CacheCallbackClient> {
        self.lock()
            .callbacks
            .iter()
            .filter(|(s, _)| **s != session)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// The callback clients of the other sessions holding a file open (for changes of
    /// its data made outside a write, e.g. truncation).
    pub fn holders_except(&self, key: FileKey, session: u64) -> Vec<CacheCallbackClient> {
        let g = self.lock();
        let Some(fs) = g.files.get(&key) else {
            return Vec::new();
        };
        fs.holders
            .keys()
            .filter(|s| **s != session)
            .filter_map(|s| g.callbacks.get(s).cloned())
            .collect()
    }

    /// Whether a file is write-shared now.
    pub fn is_write_shared(&self, key: FileKey) -> bool {
        self.lock()
            .files
            .get(&key)
            .map(|f| f.write_shared())
            .unwrap_or(false)
    }

    pub fn lock_fd(&self, k: &LockKey) -> Option<Arc<OwnedFd>> {
        self.lock().locks.get(k).cloned()
    }

    /// Stores a lock descriptor unless one raced in first; returns the one to use.
    /// `None` if the session has ended meanwhile (so no lock can outlive it).
    pub fn insert_lock_fd(&self, k: LockKey, fd: OwnedFd) -> Option<Arc<OwnedFd>> {
        let mut g = self.lock();
        if !g.sessions.contains_key(&k.0) {
            return None;
        }
        Some(g.locks.entry(k).or_insert_with(|| Arc::new(fd)).clone())
    }

    /// Closes the lock descriptor(s) of an owner on a file, releasing its locks.
    pub fn drop_locks(&self, session: u64, owner: u64, key: FileKey, flock: Option<bool>) {
        let mut g = self.lock();
        for f in [false, true] {
            if flock.is_none() || flock == Some(f) {
                g.locks.remove(&(session, owner, key, f));
            }
        }
    }
}

fn drop_holder(files: &mut HashMap<FileKey, FileState>, o: &OpenEntry) {
    if let Some(fs) = files.get_mut(&o.key) {
        if let Some(h) = fs.holders.get_mut(&o.session) {
            if o.writer() {
                h.1 = h.1.saturating_sub(1);
            } else {
                h.0 = h.0.saturating_sub(1);
            }
            if h.0 == 0 && h.1 == 0 {
                fs.holders.remove(&o.session);
            }
        }
        if fs.holders.is_empty() {
            files.remove(&o.key);
        }
    }
}

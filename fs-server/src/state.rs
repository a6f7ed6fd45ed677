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

use common::fsproto::{CacheCallbackClient, CacheMode, FileHandle, Time};

use crate::server::{FileKey, Volume};

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
    /// The handle the client opened (to find the open again when the name is gone).
    pub handle: FileHandle,
    pub volume: Arc<Volume>,
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
    /// (session, open id) -> open; ids are per session, so a reconnected client's
    /// reopen never collides with its old session's entry.
    opens: HashMap<(u64, u64), Arc<OpenEntry>>,
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
        let ids: Vec<(u64, u64)> = inner
            .opens
            .keys()
            .filter(|(s, _)| *s == id)
            .copied()
            .collect();
        for k in ids {
            if let Some(o) = inner.opens.remove(&k) {
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
        if inner.opens.contains_key(&(o.session, o.id)) {
            // Two requests reopened the same unknown open at once: the first one
            // counts; this descriptor serves its one request and goes.
            let shared = inner
                .files
                .get(&o.key)
                .map(|f| f.write_shared())
                .unwrap_or(false);
            return Some(OpenOutcome {
                cache: if shared {
                    CacheMode::Uncached
                } else {
                    CacheMode::Cached { keep: true }
                },
                notify: Vec::new(),
            });
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
        inner.opens.insert((o.session, o.id), o);
        Some(OpenOutcome { cache, notify })
    }

    /// The open `id` of `session`, if this server knows it.
    pub fn get_open(&self, id: u64, session: u64) -> Option<Arc<OpenEntry>> {
        self.lock().opens.get(&(session, id)).cloned()
    }

    /// An open of `session` made through handle `h` (for an unlinked file, whose
    /// handle no longer resolves, the open descriptor is the only way to it).
    pub fn open_of_handle(&self, session: u64, h: &FileHandle) -> Option<Arc<OpenEntry>> {
        self.lock()
            .opens
            .iter()
            .find(|((s, _), o)| *s == session && o.handle == *h)
            .map(|(_, o)| o.clone())
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
        let o = inner.opens.remove(&(session, id))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn session(st: &State, id: u64) {
        st.add_session(Arc::new(Session {
            id,
            peer: format!("ws{id}"),
            addr: "127.0.0.1:1".parse().unwrap(),
        }));
    }

    fn open(id: u64, session: u64, flags: i32) -> Arc<OpenEntry> {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let root: OwnedFd = std::fs::File::open("/").unwrap().into();
        Arc::new(OpenEntry {
            id,
            session,
            handle: FileHandle(vec![1, 2, 3]),
            volume: Arc::new(Volume {
                name: "v".into(),
                path: "/".into(),
                root,
                root_mount: 1,
                root_handle: FileHandle(vec![]),
                beneath: None,
            }),
            fd,
            key: (1, 42),
            ino: 4242,
            flags,
        })
    }

    fn callback() -> CacheCallbackClient {
        let (tx, _rx) = tarpc::transport::channel::unbounded();
        CacheCallbackClient::new(tarpc::client::Config::default(), tx).spawn()
    }

    const V1: Version = (Time { secs: 1, nanos: 0 }, Time { secs: 1, nanos: 0 }, 10);
    const V2: Version = (Time { secs: 2, nanos: 0 }, Time { secs: 2, nanos: 0 }, 10);

    #[tokio::test]
    async fn a_second_session_opening_a_written_file_makes_it_write_shared() {
        let st = State::default();
        session(&st, 1);
        session(&st, 2);
        st.register(1, 11);
        st.attach_callback(11, callback());
        st.attach_callback(22, callback()); // before its register
        st.register(2, 22);

        let a = st.add_open(open(100, 1, libc::O_RDWR), V1, false).unwrap();
        assert_eq!(a.cache, CacheMode::Cached { keep: false });
        assert!(a.notify.is_empty());
        let b = st
            .add_open(open(200, 2, libc::O_RDONLY), V1, false)
            .unwrap();
        assert_eq!(b.cache, CacheMode::Uncached);
        assert_eq!(b.notify.len(), 1, "the writer must be called back");
        assert!(st.is_write_shared((1, 42)));
        assert_eq!(
            st.after_write((1, 42), 1).len(),
            1,
            "writes call the reader back"
        );

        // A third open while shared calls nobody again.
        let b2 = st
            .add_open(open(201, 2, libc::O_RDONLY), V1, false)
            .unwrap();
        assert_eq!(b2.cache, CacheMode::Uncached);
        assert!(b2.notify.is_empty());

        st.remove_open(200, 2, Some(V1)).unwrap();
        st.remove_open(201, 2, Some(V1)).unwrap();
        assert!(!st.is_write_shared((1, 42)));
        assert!(st.after_write((1, 42), 1).is_empty());
    }

    #[tokio::test]
    async fn readers_alone_never_share_and_keep_follows_versions() {
        let st = State::default();
        session(&st, 1);
        session(&st, 2);
        let a = st.add_open(open(1, 1, libc::O_RDONLY), V1, false).unwrap();
        let b = st.add_open(open(2, 2, libc::O_RDONLY), V1, false).unwrap();
        assert_eq!(a.cache, CacheMode::Cached { keep: false });
        assert_eq!(b.cache, CacheMode::Cached { keep: false });
        // Session 1 opens again while holding it: its pages are good.
        let a2 = st.add_open(open(3, 1, libc::O_RDONLY), V2, false).unwrap();
        assert_eq!(a2.cache, CacheMode::Cached { keep: true });
        st.remove_open(1, 1, Some(V2)).unwrap();
        st.remove_open(3, 1, Some(V2)).unwrap();
        let a3 = st.add_open(open(4, 1, libc::O_RDONLY), V2, false).unwrap();
        assert_eq!(a3.cache, CacheMode::Cached { keep: true }, "same version");
        st.remove_open(4, 1, Some(V2)).unwrap();
        let a4 = st.add_open(open(5, 1, libc::O_RDONLY), V1, false).unwrap();
        assert_eq!(a4.cache, CacheMode::Cached { keep: false }, "other version");
    }

    #[tokio::test]
    async fn an_ended_session_leaves_nothing_behind() {
        let st = State::default();
        session(&st, 1);
        session(&st, 2);
        st.add_open(open(1, 1, libc::O_RDWR), V1, false).unwrap();
        st.add_open(open(2, 2, libc::O_RDONLY), V1, false).unwrap();
        let lk: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        st.insert_lock_fd((1, 7, (1, 42), false), lk).unwrap();
        assert!(st.is_write_shared((1, 42)));
        st.remove_session(1);
        assert!(!st.is_write_shared((1, 42)));
        assert!(st.get_open(1, 1).is_none());
        assert!(st.lock_fd(&(1, 7, (1, 42), false)).is_none());
        // Late arrivals for the ended session are refused, not leaked.
        assert!(st.add_open(open(3, 1, libc::O_RDWR), V1, false).is_none());
        let lk: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        assert!(st.insert_lock_fd((1, 7, (1, 42), false), lk).is_none());
        // Someone else's open id is not ours.
        assert!(st.get_open(2, 1).is_none());
        assert!(st.get_open(2, 2).is_some());
    }

    #[tokio::test]
    async fn a_reconnected_client_reopening_an_old_id_does_not_inherit_or_leak_counts() {
        let st = State::default();
        session(&st, 1);
        session(&st, 2);
        session(&st, 3);
        // Old session 1 holds open id 7 for writing; session 3 reads the file.
        st.add_open(open(7, 1, libc::O_RDWR), V1, false).unwrap();
        st.add_open(open(9, 3, libc::O_RDONLY), V1, false).unwrap();
        // The client reconnected as session 2 and reopens id 7 (twice, racing).
        st.add_open(open(7, 2, libc::O_RDWR), V1, false).unwrap();
        st.add_open(open(7, 2, libc::O_RDWR), V1, false).unwrap();
        st.remove_session(1);
        assert!(
            st.get_open(7, 2).is_some(),
            "the new session's reopen was lost"
        );
        st.remove_open(7, 2, None).unwrap();
        assert!(
            !st.is_write_shared((1, 42)),
            "a writer count leaked: the file stays write-shared with one reader left"
        );
    }
}

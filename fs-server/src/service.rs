//! The `FileService` implementation: one value per requests connection (session). Each
//! request runs its file system calls on the blocking pool, then does whatever
//! callbacks Sprite caching asks for before it answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fsproto::{
    Attr, CacheCallbackClient, Creds, DirEntry, Entry, FileHandle, FileService, FsError, FsResult,
    Lock, OpenFile, Opened, SetAttr, StatFs, VolumeInfo,
};
use tarpc::context::Context;

use crate::ops::{data, dir, meta};
use crate::server::Server;
use crate::state::Session;

/// How long a callback may take before the server goes on without its answer.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs blocking file system work off the tokio workers.
///
/// Work cancelled because the server is shutting down is never answered: an error
/// reply would reach the client as a failed call, while no reply makes it reconnect
/// and send the call again to the server that comes next.
pub async fn blocking<T, F>(f: F) -> FsResult<T>
where
    F: FnOnce() -> FsResult<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_cancelled() => std::future::pending().await,
        Err(e) => Err(FsError::new(
            libc::EIO,
            format!("server worker failed: {e}"),
        )),
    }
}

/// Calls `invalidate(ino, true)` on each client and waits for all answers (each
/// bounded by [`CALLBACK_TIMEOUT`]).
pub async fn invalidate_all(clients: Vec<CacheCallbackClient>, ino: u64) {
    if clients.is_empty() {
        return;
    }
    let calls = clients.into_iter().map(|c| async move {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + CALLBACK_TIMEOUT;
        if let Err(e) = c.invalidate(ctx, ino, true).await {
            tracing::warn!(ino, error = %e, "invalidate callback failed; going on without it");
        }
    });
    futures::future::join_all(calls).await;
}

/// Tells clients to drop cached directory entries (`(parent ino, name)`), waiting for
/// their answers (each bounded by [`CALLBACK_TIMEOUT`]).
pub async fn invalidate_entries(clients: Vec<CacheCallbackClient>, entries: Vec<(u64, Vec<u8>)>) {
    if clients.is_empty() || entries.is_empty() {
        return;
    }
    let calls = clients.into_iter().map(|c| {
        let entries = entries.clone();
        async move {
            for (parent, name) in entries {
                let mut ctx = tarpc::context::current();
                ctx.deadline = Instant::now() + CALLBACK_TIMEOUT;
                if let Err(e) = c.invalidate_entry(ctx, parent, name).await {
                    tracing::warn!(parent, error = %e, "invalidate_entry callback failed; going on without it");
                    return;
                }
            }
        }
    });
    futures::future::join_all(calls).await;
}

/// One session's view of the server.
#[derive(Clone)]
pub struct Conn {
    pub srv: Arc<Server>,
    pub session: Arc<Session>,
}

fn log_err<T>(op: &'static str, node: &str, r: &FsResult<T>) {
    if let Err(e) = r {
        match e.errno {
            libc::ENOENT | libc::EEXIST | libc::EAGAIN | libc::ENOTEMPTY => {
                tracing::debug!(op, node, error = %e, "refused")
            }
            _ => tracing::info!(op, node, error = %e, "request failed"),
        }
    }
}

macro_rules! run {
    ($self:ident, $op:literal, $body:expr) => {{
        tracing::debug!(op = $op, node = %$self.session.peer, session = $self.session.id);
        let srv = $self.srv.clone();
        let r = blocking(move || {
            let srv = &*srv;
            $body(srv)
        })
        .await;
        log_err($op, &$self.session.peer, &r);
        r
    }};
}

impl Conn {
    /// A name appeared: other clients may hold a negative entry for it. Told in the
    /// background (a create does not wait for every other client).
    fn entry_added(&self, session: u64, parent: Option<u64>, name: Vec<u8>) {
        let Some(parent) = parent else { return };
        let clients = self.srv.state.other_callbacks(session);
        if !clients.is_empty() {
            tokio::spawn(invalidate_entries(clients, vec![(parent, name)]));
        }
    }

    /// Names changed in directories other clients may have cached.
    async fn entry_changed(&self, session: u64, entries: Vec<(u64, Vec<u8>)>) {
        let clients = self.srv.state.other_callbacks(session);
        invalidate_entries(clients, entries).await;
    }

    async fn finish_open(&self, n: data::NewOpen) -> Opened {
        tracing::debug!(id = n.open.id, ino = n.open.ino, cache = ?n.outcome.cache,
            callbacks = n.outcome.notify.len(), "opened");
        invalidate_all(n.outcome.notify, n.open.ino).await;
        Opened {
            id: n.open.id,
            cache: n.outcome.cache,
            attr: n.attr,
        }
    }
}

#[allow(clippy::too_many_arguments)]
impl FileService for Conn {
    async fn volumes(self, _: Context) -> Vec<VolumeInfo> {
        self.srv
            .volumes
            .iter()
            .map(|v| VolumeInfo {
                name: v.name.clone(),
                node: self.srv.config.node.clone(),
            })
            .collect()
    }

    async fn root(self, _: Context, volume: String) -> FsResult<Entry> {
        run!(self, "root", |srv| meta::root(srv, &volume))
    }

    async fn register(self, _: Context, client_node: String, callback_token: u64) -> FsResult<()> {
        tracing::info!(session = self.session.id, peer = %self.session.peer, %client_node,
            "client session registered");
        self.srv.state.register(self.session.id, callback_token);
        Ok(())
    }

    async fn lookup(
        self,
        _: Context,
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
    ) -> FsResult<Entry> {
        run!(self, "lookup", |srv| meta::lookup(
            srv, &creds, &parent, &name
        ))
    }

    async fn getattr(self, _: Context, handle: FileHandle) -> FsResult<Attr> {
        let session = self.session.id;
        run!(self, "getattr", |srv| meta::getattr(srv, session, &handle))
    }

    async fn setattr(
        self,
        _: Context,
        creds: Creds,
        handle: FileHandle,
        set: SetAttr,
        open: Option<OpenFile>,
    ) -> FsResult<Attr> {
        let session = self.session.id;
        let truncating = set.size.is_some();
        let r = run!(self, "setattr", |srv: &Server| {
            let o = match &open {
                Some(f) if set.size.is_some() => Some(data::open_of(srv, session, &creds, f)?.0),
                _ => None,
            };
            let attr = meta::setattr(
                srv,
                session,
                &creds,
                &handle,
                &set,
                o.as_ref().map(|o| &o.fd),
            )?;
            // A size change alters the data every other holder may have cached.
            let notify = if truncating {
                srv.resolve_in(session, &handle)
                    .ok()
                    .and_then(|r| crate::sys::fstatx(std::os::fd::AsFd::as_fd(&r.fd), false).ok())
                    .map(|st| {
                        srv.state
                            .holders_except(crate::server::file_key(&st), session)
                    })
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            Ok((attr, notify))
        })?;
        let (attr, notify) = r;
        invalidate_all(notify, attr.ino).await;
        Ok(attr)
    }

    async fn readlink(self, _: Context, creds: Creds, handle: FileHandle) -> FsResult<Vec<u8>> {
        run!(self, "readlink", |srv| meta::readlink(srv, &creds, &handle))
    }

    async fn readdir(
        self,
        _: Context,
        creds: Creds,
        d: FileHandle,
        cookie: u64,
        max: u32,
        plus: bool,
    ) -> FsResult<Vec<DirEntry>> {
        run!(self, "readdir", |srv| dir::readdir(
            srv, &creds, &d, cookie, max, plus
        ))
    }

    async fn mknod(
        self,
        _: Context,
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Entry> {
        let session = self.session.id;
        let (e, pino, name) = run!(self, "mknod", |srv: &Server| {
            let e = dir::mknod(srv, &creds, &parent, &name, mode, umask, rdev)?;
            Ok((e, srv.ino_of_handle(&parent), name))
        })?;
        self.entry_added(session, pino, name);
        Ok(e)
    }

    async fn mkdir(
        self,
        _: Context,
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
    ) -> FsResult<Entry> {
        let session = self.session.id;
        let (e, pino, name) = run!(self, "mkdir", |srv: &Server| {
            let e = dir::mkdir(srv, &creds, &parent, &name, mode, umask)?;
            Ok((e, srv.ino_of_handle(&parent), name))
        })?;
        self.entry_added(session, pino, name);
        Ok(e)
    }

    async fn symlink(
        self,
        _: Context,
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        target: Vec<u8>,
    ) -> FsResult<Entry> {
        let session = self.session.id;
        let (e, pino, name) = run!(self, "symlink", |srv: &Server| {
            let e = dir::symlink(srv, &creds, &parent, &name, &target)?;
            Ok((e, srv.ino_of_handle(&parent), name))
        })?;
        self.entry_added(session, pino, name);
        Ok(e)
    }

    async fn link(
        self,
        _: Context,
        creds: Creds,
        target: FileHandle,
        new_parent: FileHandle,
        new_name: Vec<u8>,
    ) -> FsResult<Entry> {
        let session = self.session.id;
        let (e, pino, name) = run!(self, "link", |srv: &Server| {
            let e = dir::link(srv, &creds, &target, &new_parent, &new_name)?;
            Ok((e, srv.ino_of_handle(&new_parent), new_name))
        })?;
        self.entry_added(session, pino, name);
        Ok(e)
    }

    async fn unlink(
        self,
        _: Context,
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
    ) -> FsResult<()> {
        let session = self.session.id;
        let (pino, name) = run!(self, "unlink", |srv: &Server| {
            dir::unlink(srv, &creds, &parent, &name)?;
            Ok((srv.ino_of_handle(&parent), name))
        })?;
        self.entry_changed(session, pino.map(|p| (p, name)).into_iter().collect())
            .await;
        Ok(())
    }

    async fn rmdir(
        self,
        _: Context,
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
    ) -> FsResult<()> {
        let session = self.session.id;
        let (pino, name) = run!(self, "rmdir", |srv: &Server| {
            dir::rmdir(srv, &creds, &parent, &name)?;
            Ok((srv.ino_of_handle(&parent), name))
        })?;
        self.entry_changed(session, pino.map(|p| (p, name)).into_iter().collect())
            .await;
        Ok(())
    }

    async fn rename(
        self,
        _: Context,
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        new_parent: FileHandle,
        new_name: Vec<u8>,
        flags: u32,
    ) -> FsResult<()> {
        let session = self.session.id;
        let changed = run!(self, "rename", |srv: &Server| {
            dir::rename(srv, &creds, &parent, &name, &new_parent, &new_name, flags)?;
            let mut changed = Vec::new();
            if let Some(p) = srv.ino_of_handle(&parent) {
                changed.push((p, name));
            }
            if let Some(p) = srv.ino_of_handle(&new_parent) {
                changed.push((p, new_name));
            }
            Ok(changed)
        })?;
        self.entry_changed(session, changed).await;
        Ok(())
    }

    async fn open(
        self,
        _: Context,
        creds: Creds,
        handle: FileHandle,
        flags: i32,
    ) -> FsResult<Opened> {
        let session = self.session.id;
        let n = run!(self, "open", |srv| data::open(
            srv, session, &creds, &handle, flags, None
        ))?;
        Ok(self.finish_open(n).await)
    }

    async fn create(
        self,
        _: Context,
        creds: Creds,
        parent: FileHandle,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(Entry, Opened)> {
        let session = self.session.id;
        let (mut n, pino, name) = run!(self, "create", |srv: &Server| {
            let n = data::create(srv, session, &creds, &parent, &name, mode, umask, flags)?;
            Ok((n, srv.ino_of_handle(&parent), name))
        })?;
        self.entry_added(session, pino, name);
        let entry = n.entry.take().expect("create returns the entry");
        Ok((entry, self.finish_open(n).await))
    }

    async fn read(
        self,
        _: Context,
        creds: Creds,
        file: OpenFile,
        offset: u64,
        size: u32,
    ) -> FsResult<serde_bytes::ByteBuf> {
        let session = self.session.id;
        let cap = (self.srv.config.fs.max_frame_bytes.saturating_sub(64 << 10)) as u32;
        let size = size.min(cap);
        let (data, o, outcome) = run!(self, "read", |srv| {
            let (o, outcome) = data::open_of(srv, session, &creds, &file)?;
            Ok((data::read(&o, offset, size)?, o, outcome))
        })?;
        if let Some(out) = outcome {
            invalidate_all(out.notify, o.ino).await;
        }
        Ok(serde_bytes::ByteBuf::from(data))
    }

    async fn write(
        self,
        _: Context,
        creds: Creds,
        file: OpenFile,
        offset: u64,
        buf: serde_bytes::ByteBuf,
    ) -> FsResult<u32> {
        let session = self.session.id;
        let (n, o, outcome, notify) = run!(self, "write", |srv: &Server| {
            let (o, outcome) = data::open_of(srv, session, &creds, &file)?;
            let n = data::write(&o, offset, &buf)?;
            let notify = srv.state.after_write(o.key, session);
            Ok((n, o, outcome, notify))
        })?;
        if let Some(out) = outcome {
            invalidate_all(out.notify, o.ino).await;
        }
        // One-copy semantics under write-sharing: the other holders have dropped their
        // pages before this write is acknowledged.
        invalidate_all(notify, o.ino).await;
        Ok(n)
    }

    async fn fsync(self, _: Context, file: OpenFile, datasync: bool) -> FsResult<()> {
        let session = self.session.id;
        run!(self, "fsync", |srv: &Server| {
            match srv.state.get_open(file.id, session) {
                Some(o) => data::fsync(&o, datasync),
                None => {
                    let (fd, _) = data::temp_fd(srv, session, &file, libc::O_RDONLY)?;
                    crate::sys::fsync(std::os::fd::AsFd::as_fd(&fd), datasync)
                        .map_err(|e| crate::server::fs_err(e, "fsync"))
                }
            }
        })
    }

    async fn release(self, _: Context, file: OpenFile, lock_owner: Option<u64>) -> FsResult<()> {
        let session = self.session.id;
        run!(self, "release", |srv: &Server| {
            let key = match srv.state.get_open(file.id, session) {
                Some(o) => {
                    let v = data::version(&o);
                    srv.state.remove_open(file.id, session, v);
                    Some(o.key)
                }
                None => crate::locks::key_of(srv, session, &file),
            };
            if let (Some(owner), Some(key)) = (lock_owner, key) {
                srv.state.drop_locks(session, owner, key, None);
            }
            Ok(())
        })
    }

    async fn flush(self, _: Context, file: OpenFile, lock_owner: u64) -> FsResult<()> {
        let session = self.session.id;
        run!(self, "flush", |srv: &Server| {
            if let Some(key) = crate::locks::key_of(srv, session, &file) {
                srv.state.drop_locks(session, lock_owner, key, Some(false));
            }
            Ok(())
        })
    }

    async fn statfs(self, _: Context, handle: FileHandle) -> FsResult<StatFs> {
        run!(self, "statfs", |srv| meta::statfs(srv, &handle))
    }

    async fn getlk(
        self,
        _: Context,
        file: OpenFile,
        lock_owner: u64,
        lock: Lock,
    ) -> FsResult<Lock> {
        let session = self.session.id;
        run!(self, "getlk", |srv| crate::locks::getlk(
            srv, session, &file, lock_owner, &lock
        ))
    }

    async fn setlk(
        self,
        ctx: Context,
        file: OpenFile,
        lock_owner: u64,
        lock: Lock,
        wait: bool,
        flock: bool,
    ) -> FsResult<()> {
        tracing::debug!(op = "setlk", node = %self.session.peer, session = self.session.id, wait, flock);
        let r = crate::locks::setlk(
            self.srv.clone(),
            self.session.id,
            crate::locks::SetLk {
                file,
                owner: lock_owner,
                lock,
                wait,
                flock,
            },
            ctx.deadline,
        )
        .await;
        log_err("setlk", &self.session.peer, &r);
        r
    }
}

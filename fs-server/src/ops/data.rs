//! Opening files and moving their data. Blocking: called from `spawn_blocking`.
//!
//! Data descriptors are opened as the caller (the /proc magic link of the O_PATH
//! descriptor re-checks permissions with the caller's fsuid), so a caller gets exactly
//! the access its own open(2) would get. Writes go straight to the file (no buffering in
//! the server), so what fsync acknowledged survives a crash of fs-server.

use std::os::fd::AsFd;
use std::sync::Arc;

use common::fsproto::{Creds, Entry, FileHandle, FsError, FsResult, OpenFile};

use crate::server::{attr_of, component, file_key, fs_err, Server};
use crate::state::{version_of, OpenEntry, OpenOutcome};
use crate::sys;

/// The open(2) flags fs-server honours; the rest (O_CREAT, O_EXCL, O_NOCTTY,
/// O_NONBLOCK, O_DIRECT, O_NOATIME, O_PATH, ...) are dropped.
pub fn data_flags(flags: i32) -> i32 {
    flags & (libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC)
}

/// An open just made, before the sharing state has been updated.
pub struct NewOpen {
    pub entry: Option<Entry>,
    pub open: Arc<OpenEntry>,
    pub attr: common::fsproto::Attr,
    pub outcome: OpenOutcome,
}

#[allow(clippy::too_many_arguments)]
fn register(
    srv: &Server,
    session: u64,
    id: u64,
    volume: &Arc<crate::server::Volume>,
    handle: &FileHandle,
    fd: std::os::fd::OwnedFd,
    flags: i32,
    truncating: bool,
) -> FsResult<(Arc<OpenEntry>, common::fsproto::Attr, OpenOutcome)> {
    let st = sys::fstatx(fd.as_fd(), false).map_err(|e| fs_err(e, "open: stat"))?;
    let attr = attr_of(&volume.name, &st);
    let open = Arc::new(OpenEntry {
        id,
        session,
        handle: handle.clone(),
        volume: volume.clone(),
        fd,
        key: file_key(&st),
        ino: attr.ino,
        flags,
    });
    let outcome = srv
        .state
        .add_open(open.clone(), version_of(&st), truncating)
        .ok_or_else(|| FsError::new(libc::ENOTCONN, "the client session ended during open"))?;
    Ok((open, attr, outcome))
}

/// Opens a regular file for a session, as the caller.
pub fn open(
    srv: &Server,
    session: u64,
    creds: &Creds,
    h: &FileHandle,
    flags: i32,
    id: Option<u64>,
) -> FsResult<NewOpen> {
    let r = srv.resolve(h)?;
    let st = sys::fstatx(r.fd.as_fd(), false).map_err(|e| fs_err(e, "open: stat"))?;
    match st.stx_mode as u32 & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(FsError::new(libc::EISDIR, "open of a directory")),
        libc::S_IFLNK => return Err(FsError::new(libc::ELOOP, "open of a symlink")),
        _ => {
            return Err(FsError::new(
                libc::ENXIO,
                "open of a special file (the client opens those locally)",
            ))
        }
    }
    let truncating = id.is_none() && flags & libc::O_TRUNC != 0;
    let mut oflags = data_flags(flags);
    if truncating {
        oflags |= libc::O_TRUNC;
    }
    let fd = {
        let _as = srv.as_user(creds)?;
        sys::reopen(r.fd.as_fd(), oflags | libc::O_NOCTTY)
            .map_err(|e| fs_err(e, format!("open in volume {}", r.volume.name)))?
    };
    let id = id.unwrap_or_else(|| srv.next_id());
    let (open, attr, outcome) = register(
        srv,
        session,
        id,
        &r.volume,
        h,
        fd,
        data_flags(flags),
        truncating,
    )?;
    Ok(NewOpen {
        entry: None,
        open,
        attr,
        outcome,
    })
}

/// Creates (or, without O_EXCL, opens) a regular file, as the caller.
#[allow(clippy::too_many_arguments)]
pub fn create(
    srv: &Server,
    session: u64,
    creds: &Creds,
    parent: &FileHandle,
    name: &[u8],
    mode: u32,
    umask: u32,
    flags: i32,
) -> FsResult<NewOpen> {
    let cname = component(name)?;
    let p = srv.resolve(parent)?;
    let oflags = data_flags(flags)
        | (flags & (libc::O_EXCL | libc::O_TRUNC))
        | libc::O_CREAT
        | libc::O_NOFOLLOW
        | libc::O_NOCTTY;
    let fd = {
        let _as = srv.as_user(creds)?;
        sys::openat(p.fd.as_fd(), &cname, oflags, mode & 0o7777 & !umask).map_err(|e| {
            fs_err(
                e,
                format!(
                    "create {:?} in volume {}",
                    String::from_utf8_lossy(name),
                    p.volume.name
                ),
            )
        })?
    };
    let st = sys::fstatx(fd.as_fd(), false).map_err(|e| fs_err(e, "create: stat"))?;
    if st.stx_mode as u32 & libc::S_IFMT != libc::S_IFREG {
        return Err(FsError::new(libc::EINVAL, "create: not a regular file"));
    }
    let (kh, mid) = sys::name_to_handle(fd.as_fd()).map_err(|e| fs_err(e, "create: handle"))?;
    let handle = crate::handle::encode(&srv.key, &p.volume.name, mid, &kh);
    let id = srv.next_id();
    let (open, attr, outcome) = register(
        srv,
        session,
        id,
        &p.volume,
        &handle,
        fd,
        data_flags(flags),
        flags & libc::O_TRUNC != 0,
    )?;
    Ok(NewOpen {
        entry: Some(Entry {
            handle,
            attr: attr.clone(),
        }),
        open,
        attr,
        outcome,
    })
}

/// The server's open for a client's `OpenFile`: known, or (after a restart, or from a
/// session that reconnected) reopened from its handle and flags with the caller's
/// credentials, under the same id.
pub fn open_of(
    srv: &Server,
    session: u64,
    creds: &Creds,
    f: &OpenFile,
) -> FsResult<(Arc<OpenEntry>, Option<OpenOutcome>)> {
    if let Some(o) = srv.state.get_open(f.id, session) {
        return Ok((o, None));
    }
    tracing::debug!(
        id = f.id,
        session,
        "reopening an open this server does not know"
    );
    let n = open(
        srv,
        session,
        creds,
        &f.handle,
        f.flags & !libc::O_TRUNC,
        Some(f.id),
    )?;
    Ok((n.open, Some(n.outcome)))
}

/// A descriptor for a request that carries no credentials (fsync, locks): the known
/// open's, or a temporary one opened by handle with the server's credentials and the
/// access mode `accmode`. Not registered as an open.
pub fn temp_fd(
    srv: &Server,
    session: u64,
    f: &OpenFile,
    accmode: i32,
) -> FsResult<(std::os::fd::OwnedFd, crate::server::FileKey)> {
    if let Some(o) = srv.state.get_open(f.id, session) {
        let fd = sys::reopen(o.fd.as_fd(), accmode | libc::O_NOCTTY)
            .map_err(|e| fs_err(e, "reopen an open file"))?;
        return Ok((fd, o.key));
    }
    let r = srv.resolve(&f.handle)?;
    let st = sys::fstatx(r.fd.as_fd(), false).map_err(|e| fs_err(e, "stat"))?;
    if st.stx_mode as u32 & libc::S_IFMT != libc::S_IFREG {
        return Err(FsError::new(libc::EBADF, "not an open regular file"));
    }
    let fd = sys::reopen(r.fd.as_fd(), accmode | libc::O_NOCTTY)
        .map_err(|e| fs_err(e, format!("reopen in volume {}", r.volume.name)))?;
    Ok((fd, file_key(&st)))
}

/// Reads up to `size` bytes at `offset`.
pub fn read(o: &OpenEntry, offset: u64, size: u32) -> FsResult<Vec<u8>> {
    let size = size as usize;
    let mut buf = Vec::with_capacity(size);
    while buf.len() < size {
        let done = buf.len();
        match sys::pread_append(o.fd.as_fd(), &mut buf, size - done, offset + done as u64) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(fs_err(e, format!("read {size} bytes at {offset}"))),
        }
    }
    Ok(buf)
}

/// Writes all of `data` at `offset` (at the real end of file for O_APPEND opens:
/// pwrite on an O_APPEND descriptor appends on Linux).
pub fn write(o: &OpenEntry, offset: u64, data: &[u8]) -> FsResult<u32> {
    let mut done = 0;
    while done < data.len() {
        match sys::pwrite(o.fd.as_fd(), &data[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if done > 0 => {
                tracing::debug!(error = %e, "short write");
                break;
            }
            Err(e) => return Err(fs_err(e, format!("write {} bytes at {offset}", data.len()))),
        }
    }
    Ok(done as u32)
}

pub fn fsync(o: &OpenEntry, datasync: bool) -> FsResult<()> {
    sys::fsync(o.fd.as_fd(), datasync).map_err(|e| fs_err(e, "fsync"))
}

/// The version of the file an open refers to now (for `keep` at the next open).
pub fn version(o: &OpenEntry) -> Option<crate::state::Version> {
    sys::fstatx(o.fd.as_fd(), false)
        .ok()
        .map(|st| version_of(&st))
}

//! Lookups and attributes. Blocking: called from `spawn_blocking`.

use std::os::fd::AsFd;

use common::fsproto::{
    Attr, Creds, Entry, FileHandle, FileKind, FsError, FsResult, SetAttr, SetTime, StatFs,
};

use crate::server::{attr_of, component, fs_err, Server};
use crate::sys::{self, UTime};

/// The root entry of a volume.
pub fn root(srv: &Server, volume: &str) -> FsResult<Entry> {
    let v = srv.volume(volume).ok_or_else(|| {
        FsError::new(
            libc::ENOENT,
            format!(
                "volume {volume:?} is not exported by node {}",
                srv.config.node
            ),
        )
    })?;
    let st = sys::fstatx(v.root.as_fd(), false)
        .map_err(|e| fs_err(e, format!("stat root of volume {volume}")))?;
    Ok(Entry {
        handle: v.root_handle.clone(),
        attr: attr_of(&v.name, &st),
    })
}

/// One name in a directory, with the caller's search permission.
pub fn lookup(srv: &Server, creds: &Creds, parent: &FileHandle, name: &[u8]) -> FsResult<Entry> {
    let cname = component(name)?;
    let p = srv.resolve(parent)?;
    let fd = {
        let _as = srv.as_user(creds)?;
        sys::openat(p.fd.as_fd(), &cname, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(|e| {
            fs_err(
                e,
                format!(
                    "lookup {:?} in volume {}",
                    String::from_utf8_lossy(name),
                    p.volume.name
                ),
            )
        })?
    };
    srv.entry_of(&p.volume, fd.as_fd(), p.mount_id, name)
}

pub fn getattr(srv: &Server, session: u64, h: &FileHandle) -> FsResult<Attr> {
    let r = srv.resolve_in(session, h)?;
    let st = sys::fstatx(r.fd.as_fd(), false).map_err(|e| fs_err(e, "getattr"))?;
    Ok(attr_of(&r.volume.name, &st))
}

fn utime(t: Option<SetTime>) -> UTime {
    match t {
        None => UTime::Omit,
        Some(SetTime::Now) => UTime::Now,
        Some(SetTime::At(t)) => UTime::At(t.secs, t.nanos),
    }
}

/// chmod / chown / truncate / utimes, each checked by the kernel against the caller's
/// fsuid (the thread's file-system capabilities are dropped while it acts as a
/// non-root caller). A size change through an open file uses that open's descriptor,
/// as ftruncate(2) on the client's fd would.
pub fn setattr(
    srv: &Server,
    session: u64,
    creds: &Creds,
    h: &FileHandle,
    set: &SetAttr,
    open_fd: Option<&std::os::fd::OwnedFd>,
) -> FsResult<Attr> {
    let r = srv.resolve_in(session, h)?;
    let fd = r.fd.as_fd();
    let _as = srv.as_user(creds)?;
    let st = sys::fstatx(fd, false).map_err(|e| fs_err(e, "setattr: stat"))?;
    let kind = crate::server::kind_of(st.stx_mode as u32);
    // Refuse what cannot be done before changing anything.
    if set.mode.is_some() && kind == FileKind::Symlink {
        return Err(FsError::new(
            libc::EOPNOTSUPP,
            "setattr: chmod of a symlink",
        ));
    }
    if set.size.is_some() {
        match kind {
            FileKind::File => {}
            FileKind::Dir => {
                return Err(FsError::new(libc::EISDIR, "setattr: truncate a directory"))
            }
            _ => {
                return Err(FsError::new(
                    libc::EINVAL,
                    "setattr: truncate a non-regular file",
                ))
            }
        }
    }
    // Size first, then owner, then mode (a chown by a non-root caller clears set-id
    // bits the mode may set again), times last (they must win over the truncation).
    if let Some(size) = set.size {
        match open_fd {
            Some(ofd) => sys::ftruncate(ofd.as_fd(), size),
            None => sys::truncate_fd_path(fd, size),
        }
        .map_err(|e| fs_err(e, format!("setattr: truncate to {size}")))?;
    }
    if set.uid.is_some() || set.gid.is_some() {
        sys::fchown_empty(fd, set.uid, set.gid).map_err(|e| fs_err(e, "setattr: chown"))?;
    }
    if let Some(mode) = set.mode {
        sys::chmod_fd(fd, mode & 0o7777).map_err(|e| fs_err(e, "setattr: chmod"))?;
    }
    if set.atime.is_some() || set.mtime.is_some() {
        sys::utimens_fd(fd, utime(set.atime), utime(set.mtime))
            .map_err(|e| fs_err(e, "setattr: utimes"))?;
    }
    let st = sys::fstatx(fd, false).map_err(|e| fs_err(e, "setattr: stat"))?;
    Ok(attr_of(&r.volume.name, &st))
}

/// The text of a symlink; the server never follows it.
pub fn readlink(srv: &Server, creds: &Creds, h: &FileHandle) -> FsResult<Vec<u8>> {
    let r = srv.resolve(h)?;
    let _as = srv.as_user(creds)?;
    sys::readlink_fd(r.fd.as_fd()).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOENT) {
            FsError::new(libc::EINVAL, "readlink: not a symlink")
        } else {
            fs_err(e, "readlink")
        }
    })
}

pub fn statfs(srv: &Server, h: &FileHandle) -> FsResult<StatFs> {
    let r = srv.resolve(h)?;
    let s = sys::fstatfs(r.fd.as_fd()).map_err(|e| fs_err(e, "statfs"))?;
    Ok(StatFs {
        blocks: s.f_blocks,
        bfree: s.f_bfree,
        bavail: s.f_bavail,
        files: s.f_files,
        ffree: s.f_ffree,
        bsize: s.f_bsize as u32,
        namelen: s.f_namelen as u32,
        frsize: s.f_frsize as u32,
    })
}

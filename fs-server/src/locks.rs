//! Byte-range (POSIX) and whole-file (flock) locks across clients.
//!
//! Each (session, lock owner, file) gets its own open file description on the server,
//! and locks are taken on it as real OFD locks (or flock locks), so the kernel enforces
//! conflicts between clients and against local processes alike. Closing that
//! descriptor (flush of that owner, release, end of the session) releases the locks.
//! Waiting never blocks a thread: the server retries a non-blocking attempt until the
//! lock is granted or the request's deadline comes.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fsproto::{FsError, FsResult, Lock, OpenFile};

use crate::ops::data::temp_fd;
use crate::server::{fs_err, FileKey, Server};
use crate::state::LockKey;
use crate::sys::{self, OfdLock};

fn range(l: &Lock) -> FsResult<(i64, i64)> {
    if l.start > i64::MAX as u64 || (l.end != u64::MAX && l.end < l.start) {
        return Err(FsError::new(
            libc::EINVAL,
            format!("lock range {}..={} is not valid", l.start, l.end),
        ));
    }
    let len = if l.end == u64::MAX || l.end > i64::MAX as u64 {
        0
    } else {
        (l.end - l.start + 1) as i64
    };
    Ok((l.start as i64, len))
}

fn accmode(srv: &Server, session: u64, f: &OpenFile) -> i32 {
    srv.state
        .get_open(f.id, session)
        .map(|o| o.flags)
        .unwrap_or(f.flags)
        & libc::O_ACCMODE
}

/// The lock descriptor of (session, owner, file), opened on first use.
fn lock_fd(
    srv: &Server,
    session: u64,
    owner: u64,
    f: &OpenFile,
    flock: bool,
) -> FsResult<(Arc<std::os::fd::OwnedFd>, FileKey)> {
    if let Some(key) = temp_key(srv, session, f) {
        if let Some(existing) = srv.state.lock_fd(&(session, owner, key, flock)) {
            return Ok((existing, key));
        }
    }
    // Lock descriptors are opened for reading and writing where the server can: the
    // client's kernel has already checked the caller's descriptor for POSIX locks
    // (F_WRLCK needs one open for writing), and a flock(2), which reaches us as a
    // whole-file lock of one open file description, needs no access mode at all.
    // Where read-write is refused (read-only mount, squashed root), the open's own
    // access mode is used.
    let (fd, key) = match temp_fd(srv, session, f, libc::O_RDWR) {
        Ok(opened) => opened,
        Err(_) => temp_fd(srv, session, f, accmode(srv, session, f))?,
    };
    let k: LockKey = (session, owner, key, flock);
    let fd = srv.state.insert_lock_fd(k, fd).ok_or_else(|| {
        FsError::new(
            libc::ENOTCONN,
            "the client session ended; its locks are gone",
        )
    })?;
    Ok((fd, key))
}

/// F_OFD_GETLK: the lock that would block `lock`, or F_UNLCK.
pub fn getlk(srv: &Server, session: u64, f: &OpenFile, owner: u64, lock: &Lock) -> FsResult<Lock> {
    let (start, len) = range(lock)?;
    let (fd, _) = lock_fd(srv, session, owner, f, false)?;
    let typ = if lock.typ == libc::F_UNLCK {
        libc::F_WRLCK
    } else {
        lock.typ
    };
    let r = sys::ofd_getlk(
        fd.as_fd(),
        &OfdLock {
            typ,
            start,
            len,
            pid: 0,
        },
    )
    .map_err(|e| fs_err(e, "getlk"))?;
    if r.typ == libc::F_UNLCK {
        return Ok(Lock {
            typ: libc::F_UNLCK,
            ..*lock
        });
    }
    Ok(Lock {
        start: r.start as u64,
        end: if r.len == 0 {
            u64::MAX
        } else {
            (r.start + r.len - 1) as u64
        },
        typ: r.typ,
        pid: r.pid.max(0) as u32,
    })
}

/// One non-blocking attempt. `Ok(false)`: a conflicting lock is held.
pub fn try_setlk(
    srv: &Server,
    session: u64,
    f: &OpenFile,
    owner: u64,
    lock: &Lock,
    flock: bool,
) -> FsResult<bool> {
    if lock.typ == libc::F_UNLCK {
        let Some(key) = temp_key(srv, session, f) else {
            return Ok(true);
        };
        if let Some(fd) = srv.state.lock_fd(&(session, owner, key, flock)) {
            if flock {
                sys::flock_nb(fd.as_fd(), libc::LOCK_UN).map_err(|e| fs_err(e, "unlock"))?;
            } else {
                let (start, len) = range(lock)?;
                sys::ofd_setlk(
                    fd.as_fd(),
                    &OfdLock {
                        typ: libc::F_UNLCK,
                        start,
                        len,
                        pid: 0,
                    },
                )
                .map_err(|e| fs_err(e, "unlock"))?;
            }
        }
        return Ok(true);
    }
    let (fd, _) = lock_fd(srv, session, owner, f, flock)?;
    let r = if flock {
        let op = if lock.typ == libc::F_WRLCK {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        sys::flock_nb(fd.as_fd(), op)
    } else {
        let (start, len) = range(lock)?;
        sys::ofd_setlk(
            fd.as_fd(),
            &OfdLock {
                typ: lock.typ,
                start,
                len,
                pid: 0,
            },
        )
    };
    match r {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(fs_err(e, "setlk")),
    }
}

fn temp_key(srv: &Server, session: u64, f: &OpenFile) -> Option<FileKey> {
    if let Some(o) = srv.state.get_open(f.id, session) {
        return Some(o.key);
    }
    let r = srv.resolve(&f.handle).ok()?;
    let st = sys::fstatx(r.fd.as_fd(), false).ok()?;
    Some(crate::server::file_key(&st))
}

/// The file key of an open (known or by handle), for releasing locks.
pub fn key_of(srv: &Server, session: u64, f: &OpenFile) -> Option<FileKey> {
    temp_key(srv, session, f)
}

/// A setlk request as the client sent it.
pub struct SetLk {
    pub file: OpenFile,
    pub owner: u64,
    pub lock: Lock,
    pub wait: bool,
    pub flock: bool,
}

/// Waits for a lock without holding a thread: retries until granted or `deadline`.
pub async fn setlk(srv: Arc<Server>, session: u64, req: SetLk, deadline: Instant) -> FsResult<()> {
    let SetLk {
        file: f,
        owner,
        lock,
        wait,
        flock,
    } = req;
    let mut pause = Duration::from_millis(2);
    loop {
        let (s, ff) = (srv.clone(), f.clone());
        let got =
            crate::service::blocking(move || try_setlk(&s, session, &ff, owner, &lock, flock))
                .await?;
        if got {
            return Ok(());
        }
        // Leave a margin so the answer reaches the client before its deadline.
        let now = Instant::now();
        if !wait || now + pause + Duration::from_millis(200) >= deadline {
            return Err(FsError::new(
                libc::EAGAIN,
                if wait {
                    "lock still held by another owner when the request's deadline came; retry"
                } else {
                    "conflicting lock held by another owner"
                },
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

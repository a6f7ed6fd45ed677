//! Directory reading and namespace changes. Blocking: called from `spawn_blocking`.
//! Every name is one component ([`component`]) made relative to a directory
//! descriptor, so nothing resolves outside a volume and no symlink is followed.

use std::os::fd::AsFd;

use common::fsproto::{Creds, DirEntry, Entry, FileHandle, FileKind, FsError, FsResult};

use crate::server::{component, fs_err, kind_of, Resolved, Server};
use crate::sys;

/// Most entries one readdir answer carries (keeps a readdirplus frame well below the
/// frame cap).
pub const MAX_ENTRIES: u32 = 4096;

fn dtype_kind(t: u8) -> Option<FileKind> {
    Some(match t {
        libc::DT_REG => FileKind::File,
        libc::DT_DIR => FileKind::Dir,
        libc::DT_LNK => FileKind::Symlink,
        libc::DT_FIFO => FileKind::Fifo,
        libc::DT_SOCK => FileKind::Socket,
        libc::DT_CHR => FileKind::CharDev,
        libc::DT_BLK => FileKind::BlockDev,
        _ => return None,
    })
}

/// Entries after `cookie`. "." and ".." are not listed (the client adds them); mount
/// points fs-server does not enter are left out. Cookies are the file system's own
/// directory offsets (d_off), stable across calls.
pub fn readdir(
    srv: &Server,
    creds: &Creds,
    dir: &FileHandle,
    cookie: u64,
    max: u32,
    plus: bool,
) -> FsResult<Vec<DirEntry>> {
    let d = srv.resolve(dir)?;
    let _as = srv.as_user(creds)?;
    let dfd = sys::reopen(d.fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
        .map_err(|e| fs_err(e, format!("readdir in volume {}", d.volume.name)))?;
    let max = max.clamp(1, MAX_ENTRIES) as usize;
    // Keep the answer well inside one frame whatever the names' lengths.
    let budget = srv.config.fs.max_frame_bytes / 2;
    let mut used = 0usize;
    let mut out = Vec::with_capacity(max.min(256));
    let mut pos = cookie as i64;
    while out.len() < max && used < budget {
        let raw = sys::read_dir_at(dfd.as_fd(), pos, max - out.len())
            .map_err(|e| fs_err(e, "readdir: getdents"))?;
        if raw.is_empty() {
            break;
        }
        for e in raw {
            pos = e.off;
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let known = dtype_kind(e.typ);
            // Directories may be mount points: check those (and unknown types) the way
            // lookup would, so that refused mounts never show.
            let (kind, entry) = if plus || known.is_none() {
                let Ok(cname) = component(&e.name) else {
                    continue;
                };
                let Ok(fd) = sys::openat(d.fd.as_fd(), &cname, libc::O_PATH | libc::O_NOFOLLOW, 0)
                else {
                    continue; // gone since getdents
                };
                match srv.entry_of(&d.volume, fd.as_fd(), d.mount_id, &e.name) {
                    Ok(ent) => (ent.attr.kind, plus.then_some(ent)),
                    Err(err) if err.errno == libc::ENOENT => continue,
                    // One odd entry (no handle support, no permission) must not hide
                    // the rest: list it bare; the client's lookup will say what fails.
                    Err(err) => {
                        tracing::debug!(name = %String::from_utf8_lossy(&e.name), error = %err,
                            "readdir: entry without attributes");
                        match known {
                            Some(k) => (k, None),
                            None => continue,
                        }
                    }
                }
            } else if known == Some(FileKind::Dir) {
                // Directories may be mount points fs-server does not enter: leave
                // those out, as lookup answers ENOENT for them.
                let Ok(cname) = component(&e.name) else {
                    continue;
                };
                let Ok(fd) = sys::openat(d.fd.as_fd(), &cname, libc::O_PATH | libc::O_NOFOLLOW, 0)
                else {
                    continue;
                };
                if !srv.may_enter(fd.as_fd(), d.mount_id).unwrap_or(false) {
                    continue;
                }
                (FileKind::Dir, None)
            } else {
                (known.unwrap_or(FileKind::File), None)
            };
            used += e.name.len() + 48 + entry.as_ref().map_or(0, |x| x.handle.0.len() + 128);
            if used > budget && !out.is_empty() {
                break;
            }
            out.push(DirEntry {
                name: e.name,
                kind,
                cookie: e.off as u64,
                entry,
            });
        }
    }
    Ok(out)
}

/// Resolves the parent, checks the name, then runs `make` as the caller and answers
/// the new object's entry.
fn create_with<F>(
    srv: &Server,
    creds: &Creds,
    parent: &FileHandle,
    name: &[u8],
    what: &str,
    make: F,
) -> FsResult<Entry>
where
    F: FnOnce(&Resolved, &std::ffi::CStr) -> std::io::Result<()>,
{
    let cname = component(name)?;
    let p = srv.resolve(parent)?;
    let fd = {
        let _as = srv.as_user(creds)?;
        make(&p, &cname).map_err(|e| {
            fs_err(
                e,
                format!(
                    "{what} {:?} in volume {}",
                    String::from_utf8_lossy(name),
                    p.volume.name
                ),
            )
        })?;
        sys::openat(p.fd.as_fd(), &cname, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(|e| fs_err(e, format!("{what}: reopen new object")))?
    };
    srv.entry_of(&p.volume, fd.as_fd(), p.mount_id, name)
}

pub fn mknod(
    srv: &Server,
    creds: &Creds,
    parent: &FileHandle,
    name: &[u8],
    mode: u32,
    umask: u32,
    rdev: u32,
) -> FsResult<Entry> {
    let mode = (mode & libc::S_IFMT) | (mode & 0o7777 & !umask);
    create_with(srv, creds, parent, name, "mknod", |p, n| {
        sys::mknodat(p.fd.as_fd(), n, mode, sys::decode_dev(rdev))
    })
}

pub fn mkdir(
    srv: &Server,
    creds: &Creds,
    parent: &FileHandle,
    name: &[u8],
    mode: u32,
    umask: u32,
) -> FsResult<Entry> {
    let mode = mode & 0o7777 & !umask;
    create_with(srv, creds, parent, name, "mkdir", |p, n| {
        sys::mkdirat(p.fd.as_fd(), n, mode)
    })
}

/// Creates a symlink; its text is stored as given and never followed by the server.
pub fn symlink(
    srv: &Server,
    creds: &Creds,
    parent: &FileHandle,
    name: &[u8],
    target: &[u8],
) -> FsResult<Entry> {
    if target.is_empty() || target.contains(&0) || target.len() >= libc::PATH_MAX as usize {
        return Err(FsError::new(libc::EINVAL, "symlink: bad target text"));
    }
    let t = std::ffi::CString::new(target).expect("checked for NUL");
    create_with(srv, creds, parent, name, "symlink", |p, n| {
        sys::symlinkat(&t, p.fd.as_fd(), n)
    })
}

fn same_volume(a: &Resolved, b: &Resolved, what: &str) -> FsResult<()> {
    if a.volume.name != b.volume.name {
        return Err(FsError::new(
            libc::EXDEV,
            format!(
                "{what} across volumes {} and {}",
                a.volume.name, b.volume.name
            ),
        ));
    }
    Ok(())
}

pub fn link(
    srv: &Server,
    creds: &Creds,
    target: &FileHandle,
    new_parent: &FileHandle,
    new_name: &[u8],
) -> FsResult<Entry> {
    let t = srv.resolve(target)?;
    let np = srv.resolve(new_parent)?;
    same_volume(&t, &np, "link")?;
    let st = sys::fstatx(t.fd.as_fd(), false).map_err(|e| fs_err(e, "link: stat"))?;
    if kind_of(st.stx_mode as u32) == FileKind::Dir {
        return Err(FsError::new(libc::EPERM, "link: hard link to a directory"));
    }
    create_with(srv, creds, new_parent, new_name, "link", |p, n| {
        sys::link_fd(t.fd.as_fd(), p.fd.as_fd(), n)
    })
}

fn remove(
    srv: &Server,
    creds: &Creds,
    parent: &FileHandle,
    name: &[u8],
    flags: i32,
    what: &str,
) -> FsResult<()> {
    let cname = component(name)?;
    let p = srv.resolve(parent)?;
    let _as = srv.as_user(creds)?;
    sys::unlinkat(p.fd.as_fd(), &cname, flags).map_err(|e| {
        fs_err(
            e,
            format!(
                "{what} {:?} in volume {}",
                String::from_utf8_lossy(name),
                p.volume.name
            ),
        )
    })
}

pub fn unlink(srv: &Server, creds: &Creds, parent: &FileHandle, name: &[u8]) -> FsResult<()> {
    remove(srv, creds, parent, name, 0, "unlink")
}

pub fn rmdir(srv: &Server, creds: &Creds, parent: &FileHandle, name: &[u8]) -> FsResult<()> {
    remove(srv, creds, parent, name, libc::AT_REMOVEDIR, "rmdir")
}

pub fn rename(
    srv: &Server,
    creds: &Creds,
    parent: &FileHandle,
    name: &[u8],
    new_parent: &FileHandle,
    new_name: &[u8],
    flags: u32,
) -> FsResult<()> {
    if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
        return Err(FsError::new(
            libc::EINVAL,
            format!("rename: unsupported flags {flags:#x}"),
        ));
    }
    let a = component(name)?;
    let b = component(new_name)?;
    let p = srv.resolve(parent)?;
    let np = srv.resolve(new_parent)?;
    same_volume(&p, &np, "rename")?;
    let _as = srv.as_user(creds)?;
    sys::renameat2(p.fd.as_fd(), &a, np.fd.as_fd(), &b, flags).map_err(|e| {
        fs_err(
            e,
            format!(
                "rename {:?} to {:?} in volume {}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(new_name),
                p.volume.name
            ),
        )
    })
}

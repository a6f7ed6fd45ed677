//! Reinstalling file descriptors. Each open file description is created once, parked
//! at a number above every fd of the image, then dup3'd to each fd that shares it
//! (shared descriptions stay shared), and the parked copies are closed.

use super::{Ctx, RestoreError};
use crate::engine::image::{FdKind, Manifest};
use crate::sys;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

const OPEN_MASK: i32 = !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC);

pub fn restore_fds(ctx: &Ctx, m: &Manifest, pages: &[u8]) -> Result<(), RestoreError> {
    let t = &ctx.leader;
    let max_fd = m.fds.iter().map(|f| f.fd).max().unwrap_or(2);
    let mut next_park = max_fd + 1;
    let mut parks: Vec<i32> = Vec::new();
    let mut park_of_fd: BTreeMap<i32, i32> = BTreeMap::new();
    let mut pipes: BTreeMap<u64, (i32, i32)> = BTreeMap::new();
    let pidfd = sys::pidfd_open(ctx.pid).map_err(|e| RestoreError::Other {
        what: format!("pidfd_open({}): {e}", ctx.pid),
    })?;
    let mut park = |ctx: &Ctx, tmp: i32, parks: &mut Vec<i32>| -> Result<i32, RestoreError> {
        let p = next_park;
        next_park += 1;
        ctx.ok(
            t,
            libc::SYS_dup3,
            &[tmp as u64, p as u64, libc::O_CLOEXEC as u64],
            "dup3(park)",
        )?;
        ctx.ok(t, libc::SYS_close, &[tmp as u64], "close")?;
        parks.push(p);
        Ok(p)
    };
    for f in &m.fds {
        if let Some(d) = f.dup_of {
            let p = *park_of_fd.get(&d).ok_or_else(|| RestoreError::Other {
                what: format!("fd {}: shares fd {d}, which is missing", f.fd),
            })?;
            park_of_fd.insert(f.fd, p);
            continue;
        }
        let p = match &f.kind {
            FdKind::File { path, pos } => {
                let tmp =
                    ctx.open(t, path, f.flags & OPEN_MASK, 0)
                        .map_err(|e| RestoreError::Other {
                            what: format!("fd {}: {e}", f.fd),
                        })?;
                let p = park(ctx, tmp, &mut parks)?;
                if *pos != 0 {
                    // Devices without a position answer ESPIPE; nothing to restore then.
                    let _ =
                        ctx.inj
                            .call(t, libc::SYS_lseek, &[p as u64, *pos, libc::SEEK_SET as u64]);
                }
                p
            }
            FdKind::Fifo { path } => {
                // Opening a FIFO blocks until the other side exists: hold a reader
                // ourselves meanwhile and open non-blocking, then restore the flags.
                let _reader = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
                    .map_err(|source| RestoreError::Io {
                        path: path.clone(),
                        source,
                    })?;
                let tmp = ctx
                    .open(t, path, (f.flags & OPEN_MASK) | libc::O_NONBLOCK, 0)
                    .map_err(|e| RestoreError::Other {
                        what: format!("fd {}: {e}", f.fd),
                    })?;
                ctx.ok(
                    t,
                    libc::SYS_fcntl,
                    &[
                        tmp as u64,
                        libc::F_SETFL as u64,
                        (f.flags & OPEN_MASK) as u64,
                    ],
                    "fcntl(F_SETFL)",
                )?;
                park(ctx, tmp, &mut parks)?
            }
            FdKind::Pipe {
                inode,
                write_end,
                size,
                data,
            } => {
                let key = format!("pipe:[{inode}]");
                let inherited = ctx
                    .inherit
                    .iter()
                    .find(|(_, k)| *k == key)
                    .map(|(fd, _)| *fd);
                let (r, w) = match (pipes.get(inode), inherited) {
                    (Some(&ends), _) => ends,
                    (None, Some(ours)) => {
                        // The caller's fd stands for this pipe; its data never left it.
                        let p = park(ctx, ours, &mut parks)?;
                        pipes.insert(*inode, (p, p));
                        (p, p)
                    }
                    (None, None) => {
                        let addr = ctx.put(0, &[0u8; 8])?;
                        ctx.ok(t, libc::SYS_pipe2, &[addr, libc::O_CLOEXEC as u64], "pipe2")?;
                        let mut b = [0u8; 8];
                        sys::vm_read(ctx.pid, addr, &mut b).map_err(|e| RestoreError::Other {
                            what: format!("reading pipe fds: {e}"),
                        })?;
                        let (r0, w0) = (
                            i32::from_ne_bytes(b[..4].try_into().unwrap()),
                            i32::from_ne_bytes(b[4..].try_into().unwrap()),
                        );
                        let r = park(ctx, r0, &mut parks)?;
                        let w = park(ctx, w0, &mut parks)?;
                        let _ = ctx.inj.call(
                            t,
                            libc::SYS_fcntl,
                            &[w as u64, libc::F_SETPIPE_SZ as u64, *size as u64],
                        );
                        if !data.is_empty() {
                            let ours = sys::pidfd_getfd(pidfd.as_raw_fd(), w).map_err(|e| {
                                RestoreError::Other {
                                    what: format!("fd {}: pidfd_getfd: {e}", f.fd),
                                }
                            })?;
                            let n = sys::write_raw(ours.as_raw_fd(), data);
                            if n != data.len() as isize {
                                return Err(RestoreError::Other {
                                    what: format!(
                                        "fd {}: refilling pipe: wrote {n} of {} bytes",
                                        f.fd,
                                        data.len()
                                    ),
                                });
                            }
                        }
                        pipes.insert(*inode, (r, w));
                        (r, w)
                    }
                };
                let p = if *write_end { w } else { r };
                let fl = f.flags & (libc::O_NONBLOCK | libc::O_DIRECT);
                if fl != 0 {
                    ctx.ok(
                        t,
                        libc::SYS_fcntl,
                        &[p as u64, libc::F_SETFL as u64, fl as u64],
                        "fcntl(F_SETFL)",
                    )?;
                }
                p
            }
            FdKind::Deleted {
                path,
                pos,
                data_off,
                len,
                mode,
            } => {
                let orig = path.trim_end_matches(" (deleted)");
                let dir = std::path::Path::new(orig)
                    .parent()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "/tmp".into());
                let fl = libc::O_TMPFILE | libc::O_RDWR;
                let tmp = match ctx.open(t, &dir, fl, *mode) {
                    Ok(fd) => fd,
                    Err(_) => ctx
                        .open(t, "/tmp", fl, *mode)
                        .map_err(|e| RestoreError::Other {
                            what: format!("fd {}: O_TMPFILE: {e}", f.fd),
                        })?,
                };
                let p = park(ctx, tmp, &mut parks)?;
                let ours =
                    sys::pidfd_getfd(pidfd.as_raw_fd(), p).map_err(|e| RestoreError::Other {
                        what: format!("fd {}: pidfd_getfd: {e}", f.fd),
                    })?;
                let file = std::fs::File::from(ours);
                let data = pages
                    .get(*data_off as usize..(*data_off + *len) as usize)
                    .ok_or_else(|| RestoreError::Other {
                        what: format!("fd {}: data beyond pages.img", f.fd),
                    })?;
                file.write_all_at(data, 0)
                    .map_err(|source| RestoreError::Io {
                        path: path.clone(),
                        source,
                    })?;
                let extra = f.flags & (libc::O_APPEND | libc::O_NONBLOCK);
                if extra != 0 {
                    ctx.ok(
                        t,
                        libc::SYS_fcntl,
                        &[p as u64, libc::F_SETFL as u64, extra as u64],
                        "fcntl(F_SETFL)",
                    )?;
                }
                ctx.ok(
                    t,
                    libc::SYS_lseek,
                    &[p as u64, *pos, libc::SEEK_SET as u64],
                    "lseek",
                )?;
                p
            }
        };
        park_of_fd.insert(f.fd, p);
    }
    for f in &m.fds {
        let p = park_of_fd[&f.fd];
        let fl = if f.cloexec { libc::O_CLOEXEC } else { 0 };
        ctx.ok(
            t,
            libc::SYS_dup3,
            &[p as u64, f.fd as u64, fl as u64],
            &format!("dup3(fd {})", f.fd),
        )?;
    }
    for p in parks {
        ctx.ok(t, libc::SYS_close, &[p as u64], "close(park)")?;
    }
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt;

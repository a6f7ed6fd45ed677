//! Reinstalling file descriptors. Each open file description is created once, parked
//! at a number above every fd of the image, then dup3'd to each fd that shares it
//! (shared descriptions stay shared), and the parked copies are closed.

use super::{Ctx, RestoreError};
use crate::engine::image::{FdKind, Manifest};
use crate::sys::{self, kabi};
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// (target fd, events, data) of one epoll registration.
type EpollTarget = (i32, u32, u64);

const OPEN_MASK: i32 = !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC);

pub fn restore_fds(ctx: &Ctx, m: &Manifest, pages: &[u8]) -> Result<(), RestoreError> {
    let t = &ctx.leader;
    let max_fd = m.fds.iter().map(|f| f.fd).max().unwrap_or(2);
    let mut next_park = max_fd + 1;
    let mut parks: Vec<i32> = Vec::new();
    let mut park_of_fd: BTreeMap<i32, i32> = BTreeMap::new();
    let mut pipes: BTreeMap<u64, (i32, i32)> = BTreeMap::new();
    let mut epolls: Vec<(i32, Vec<EpollTarget>)> = Vec::new();
    let pidfd = sys::pidfd_open(ctx.pid).map_err(|e| RestoreError::Other {
        what: format!("pidfd_open({}): {e}", ctx.pid),
    })?;
    // Fds handed in stay where they are until parked themselves: no park lands on
    // one (it would replace it, or be it: dup3 onto itself fails).
    let handed: Vec<i32> = ctx.inherit.iter().map(|(fd, _)| *fd).collect();
    let mut park = |ctx: &Ctx, tmp: i32, parks: &mut Vec<i32>| -> Result<i32, RestoreError> {
        while handed.contains(&next_park) {
            next_park += 1;
        }
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
            FdKind::Fifo { path, data } => {
                // Opening a FIFO blocks until the other side exists: hold a reader
                // ourselves meanwhile and open non-blocking, then restore the flags.
                // With data to put back, our holder is also a writer (O_RDWR never
                // blocks on a FIFO).
                let holder = std::fs::OpenOptions::new()
                    .read(true)
                    .write(!data.is_empty())
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
                let p = park(ctx, tmp, &mut parks)?;
                // Written only now that the process holds the FIFO open, so the
                // bytes outlive our holder.
                refill_fifo(holder.as_raw_fd(), path, data).map_err(|what| {
                    RestoreError::Other {
                        what: format!("fd {} ({path}): {what}", f.fd),
                    }
                })?;
                p
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
            FdKind::Memfd { ino, pos, .. } => {
                let src = *ctx
                    .memfds
                    .borrow()
                    .get(ino)
                    .ok_or_else(|| RestoreError::Other {
                        what: format!("fd {}: memfd {ino} missing", f.fd),
                    })?;
                let tmp = ctx.ok(
                    t,
                    libc::SYS_fcntl,
                    &[src as u64, libc::F_DUPFD_CLOEXEC as u64, 0],
                    "fcntl(F_DUPFD)",
                )? as i32;
                let p = park(ctx, tmp, &mut parks)?;
                ctx.ok(
                    t,
                    libc::SYS_lseek,
                    &[p as u64, *pos, libc::SEEK_SET as u64],
                    "lseek",
                )?;
                p
            }
            FdKind::Tty { path, state } => {
                let tmp = ctx
                    .open(t, path, (f.flags & OPEN_MASK) | libc::O_NOCTTY, 0)
                    .map_err(|e| RestoreError::Other {
                        what: format!("fd {}: {e}", f.fd),
                    })?;
                let p = park(ctx, tmp, &mut parks)?;
                let ours =
                    sys::pidfd_getfd(pidfd.as_raw_fd(), p).map_err(|e| RestoreError::Other {
                        what: format!("fd {}: pidfd_getfd: {e}", f.fd),
                    })?;
                sys::tty_set(ours.as_raw_fd(), state).map_err(|e| RestoreError::Other {
                    what: format!("fd {} ({path}): restoring terminal modes: {e}", f.fd),
                })?;
                p
            }
            FdKind::EventFd { count, semaphore } => {
                let fl = (f.flags & libc::O_NONBLOCK) as u64 | if *semaphore { 1 } else { 0 };
                let tmp = ctx.ok(t, libc::SYS_eventfd2, &[0, fl], "eventfd2")? as i32;
                let p = park(ctx, tmp, &mut parks)?;
                if *count > 0 {
                    let ours = sys::pidfd_getfd(pidfd.as_raw_fd(), p).map_err(|e| {
                        RestoreError::Other {
                            what: format!("fd {}: pidfd_getfd: {e}", f.fd),
                        }
                    })?;
                    if sys::write_raw(ours.as_raw_fd(), &count.to_ne_bytes()) != 8 {
                        return Err(RestoreError::Other {
                            what: format!("fd {}: setting the eventfd count failed", f.fd),
                        });
                    }
                }
                p
            }
            FdKind::SignalFd { mask } => {
                let a = ctx.put(0, &mask.to_ne_bytes())?;
                let tmp = ctx.ok(
                    t,
                    libc::SYS_signalfd4,
                    &[u64::MAX, a, 8, (f.flags & libc::O_NONBLOCK) as u64],
                    "signalfd4",
                )? as i32;
                park(ctx, tmp, &mut parks)?
            }
            FdKind::TimerFd {
                clockid,
                ticks,
                value,
                interval,
            } => {
                let tmp = ctx.ok(
                    t,
                    libc::SYS_timerfd_create,
                    &[*clockid as u64, (f.flags & libc::O_NONBLOCK) as u64],
                    "timerfd_create",
                )? as i32;
                let p = park(ctx, tmp, &mut parks)?;
                // Expired with a tick pending: the kernel re-arms it at the next read.
                let value = if *value == (0, 0) { *interval } else { *value };
                if value != (0, 0) {
                    let b: Vec<u8> = [interval.0, interval.1, value.0, value.1]
                        .iter()
                        .flat_map(|w| w.to_ne_bytes())
                        .collect();
                    let a = ctx.put(0, &b)?;
                    ctx.ok(
                        t,
                        libc::SYS_timerfd_settime,
                        &[p as u64, 0, a, 0],
                        "timerfd_settime",
                    )?;
                }
                if *ticks > 0 {
                    let a = ctx.put(64, &ticks.to_ne_bytes())?;
                    ctx.ok(
                        t,
                        libc::SYS_ioctl,
                        &[p as u64, kabi::TFD_IOC_SET_TICKS, a],
                        "ioctl(TFD_IOC_SET_TICKS)",
                    )?;
                }
                p
            }
            FdKind::Epoll { targets } => {
                let tmp = ctx.ok(t, libc::SYS_epoll_create1, &[0], "epoll_create1")? as i32;
                let p = park(ctx, tmp, &mut parks)?;
                epolls.push((f.fd, targets.clone()));
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
    // Epoll interest lists name fds, so they come once every fd is in place.
    for (efd, targets) in &epolls {
        for &(tfd, events, data) in targets {
            let mut b = events.to_ne_bytes().to_vec();
            b.extend_from_slice(&data.to_ne_bytes());
            let a = ctx.put(0, &b)?;
            ctx.ok(
                t,
                libc::SYS_epoll_ctl,
                &[*efd as u64, libc::EPOLL_CTL_ADD as u64, tfd as u64, a],
                &format!("epoll_ctl(fd {efd}, add {tfd})"),
            )?;
        }
    }
    for p in parks {
        ctx.ok(t, libc::SYS_close, &[p as u64], "close(park)")?;
    }
    Ok(())
}

use std::os::unix::fs::OpenOptionsExt;

/// Puts a FIFO's dumped bytes back, through `fd` (our own O_RDWR open of it).
///
/// The rule: write `data` only if the FIFO is empty now (FIONREAD == 0). When the
/// dumped process was the FIFO's last user, the kernel pipe object and its buffer
/// were freed as it died, so the bytes exist only in the image and must be put back.
/// When another process kept the FIFO open, the same kernel object survived with its
/// data still buffered; writing the image's copy would duplicate it, so nothing is
/// written. (A survivor that drained the FIFO in between is indistinguishable from a
/// freed one; the bytes are then written back.)
fn refill_fifo(fd: i32, path: &str, data: &[u8]) -> Result<(), String> {
    if data.is_empty() {
        return Ok(());
    }
    let queued = sys::fionread(fd).map_err(|e| format!("FIONREAD: {e}"))?;
    if queued != 0 {
        tracing::debug!(
            "{path}: FIFO still holds {queued} bytes; not writing the dumped {}",
            data.len()
        );
        return Ok(());
    }
    // A FIFO recreated by the kernel has the default size; grow it if the dump
    // held more (F_SETPIPE_SZ rounds up to a power-of-two number of pages).
    let size = sys::pipe_size(fd).map_err(|e| format!("F_GETPIPE_SZ: {e}"))?;
    if data.len() > size as usize {
        sys::set_pipe_size(fd, data.len() as i32)
            .map_err(|e| format!("F_SETPIPE_SZ({}): {e}", data.len()))?;
    }
    let n = sys::write_raw(fd, data);
    if n != data.len() as isize {
        return Err(format!("refilling FIFO: wrote {n} of {} bytes", data.len()));
    }
    Ok(())
}

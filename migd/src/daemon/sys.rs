//! The kernel calls of the daemon's helpers: mount namespaces and roots, through
//! nix's safe wrappers (no `unsafe` here); the restorer's socket.

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::{Path, PathBuf};

/// A step of building or entering a file view that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct ViewError {
    pub what: String,
    pub source: std::io::Error,
}

fn ctx(what: impl Into<String>) -> impl FnOnce(Errno) -> ViewError {
    let what = what.into();
    move |e| ViewError {
        what,
        source: e.into(),
    }
}

fn ioctx(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ViewError {
    let what = what.into();
    move |source| ViewError { what, source }
}

/// Top-level names of a home's tree that the host provides instead.
const HOST_OWN: &[&str] = &["proc", "dev", "sys"];

/// Builds, in a new mount namespace of the calling (single-threaded) process, a root
/// at `stage` whose entries are those of `/.../<home>/` (bind-mounted from there) plus
/// the host's /proc, /dev, /sys and super-root, and makes it the process's root.
pub fn enter_home_view(superroot: &Path, home: &str, stage: &Path) -> Result<(), ViewError> {
    let home_root = &superroot.join(home);
    let entries = std::fs::read_dir(home_root).map_err(ioctx(format!(
        "listing the home's tree {} (is the super-root mounted and the home's fs-server up?)",
        home_root.display()
    )))?;
    std::fs::create_dir_all(stage).map_err(ioctx(format!("creating {}", stage.display())))?;
    unshare(CloneFlags::CLONE_NEWNS).map_err(ctx("unshare(CLONE_NEWNS)"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(ctx("making / private"))?;
    mount(
        Some("tmpfs"),
        stage,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(ctx(format!("mounting a tmpfs on {}", stage.display())))?;
    for e in entries {
        let e = e.map_err(ioctx(format!("listing {}", home_root.display())))?;
        let name = e.file_name();
        if HOST_OWN.iter().any(|h| name == *h) {
            continue;
        }
        let src = e.path();
        let dst = stage.join(&name);
        let md =
            std::fs::symlink_metadata(&src).map_err(ioctx(format!("stat {}", src.display())))?;
        if md.file_type().is_symlink() {
            let target =
                std::fs::read_link(&src).map_err(ioctx(format!("readlink {}", src.display())))?;
            std::os::unix::fs::symlink(&target, &dst)
                .map_err(ioctx(format!("symlink {}", dst.display())))?;
            continue;
        }
        if md.is_dir() {
            std::fs::create_dir(&dst).map_err(ioctx(format!("mkdir {}", dst.display())))?;
        } else {
            std::fs::write(&dst, b"").map_err(ioctx(format!("creating {}", dst.display())))?;
        }
        mount(
            Some(&src),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(ctx(format!(
            "bind-mounting {} on {}",
            src.display(),
            dst.display()
        )))?;
    }
    // The host's own /proc, /dev, /sys, and the super-root, so that `/...` names the
    // same files for the process as it did at home.
    let superroot_rel = superroot.strip_prefix("/").unwrap_or(superroot);
    let own = HOST_OWN.iter().map(Path::new).chain([superroot_rel]);
    for h in own {
        let dst = stage.join(h);
        std::fs::create_dir_all(&dst).map_err(ioctx(format!("mkdir {}", dst.display())))?;
        let src = Path::new("/").join(h);
        mount(
            Some(&src),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(ctx(format!(
            "bind-mounting {} on {}",
            src.display(),
            dst.display()
        )))?;
    }
    std::env::set_current_dir(stage).map_err(ioctx(format!("chdir {}", stage.display())))?;
    nix::unistd::chroot(".").map_err(ctx(format!("chroot {}", stage.display())))?;
    std::env::set_current_dir("/").map_err(ioctx("chdir /"))?;
    Ok(())
}

/// Enters the mount namespace and root of `pid` (a foreign process moving on), keeping
/// the image directory `images` (created first) reachable; returns its path from there.
pub fn enter_root_of(pid: i32, images: &Path) -> Result<PathBuf, ViewError> {
    std::fs::create_dir_all(images).map_err(ioctx(format!("creating {}", images.display())))?;
    let dir =
        std::fs::File::open(images).map_err(ioctx(format!("opening {}", images.display())))?;
    let root = std::fs::File::open(format!("/proc/{pid}/root"))
        .map_err(ioctx(format!("opening /proc/{pid}/root")))?;
    let mnt = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(ioctx(format!("opening /proc/{pid}/ns/mnt")))?;
    setns(&mnt, CloneFlags::CLONE_NEWNS)
        .map_err(ctx(format!("entering the mount namespace of pid {pid}")))?;
    nix::unistd::fchdir(&root).map_err(ctx(format!("fchdir to the root of pid {pid}")))?;
    nix::unistd::chroot(".").map_err(ctx(format!("chroot to the root of pid {pid}")))?;
    std::env::set_current_dir("/").map_err(ioctx("chdir /"))?;
    // The directory stays open for the rest of this helper's life.
    let fd = dir.into_raw_fd();
    Ok(PathBuf::from(format!("/proc/self/fd/{fd}")))
}

/// If our tracee `pid` has ended, its raw wait status (without waiting otherwise).
pub fn exited(pid: i32) -> Option<i32> {
    match waitpid(
        Pid::from_raw(pid),
        Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
    ) {
        Ok(WaitStatus::Exited(_, code)) => Some((code & 0xff) << 8),
        Ok(WaitStatus::Signaled(_, sig, core)) => Some(sig as i32 | if core { 0x80 } else { 0 }),
        Err(Errno::ECHILD) => Some(libc::SIGKILL),
        _ => None,
    }
}

/// A unix socket bound at `path` (a stale one replaced) that does not listen yet:
/// a peer's connect(2) is refused until [`listen_now`]. The restorer binds its
/// socket before it leaves the host's root (the path is the host's) but listens
/// only once its copy is committed, so that a restarted migd never takes back a
/// copy that is about to be killed.
pub fn bind_unlistened(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let _ = std::fs::remove_file(path);
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// Starts listening on a socket from [`bind_unlistened`].
pub fn listen_now(fd: std::os::fd::OwnedFd) -> std::io::Result<std::os::unix::net::UnixListener> {
    use nix::sys::socket::{listen, Backlog};
    listen(&fd, Backlog::new(8)?)?;
    Ok(std::os::unix::net::UnixListener::from(fd))
}

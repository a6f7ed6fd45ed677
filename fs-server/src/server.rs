//! The server's shared state and the helpers every operation uses: volumes, handle
//! resolution, the caller's credentials, attributes.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::auth::ClusterKey;
use common::config::NodeConfig;
use common::fsproto::{Attr, Creds, Entry, FileHandle, FileKind, FsError, FsResult, Time};

use crate::handle;
use crate::mounts::{self, Mounts};
use crate::state::State;
use crate::sys::{self, CredGuard};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "volume {name:?}: cannot open its root {path}: {source} (check fs.volumes in the config)"
    )]
    VolumeRoot {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume {name:?} at {path}: the file system cannot make file handles: {source} (fs-server needs name_to_handle_at support)")]
    NoHandles {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] common::auth::KeyError),
}

/// One exported tree.
pub struct Volume {
    pub name: String,
    pub path: PathBuf,
    /// O_PATH descriptor of the root directory.
    pub root: OwnedFd,
    pub root_mount: i32,
    pub root_handle: FileHandle,
    /// The root's path as the kernel names it, for volumes that are a subtree (not
    /// "/"): objects reached by handle must still lie beneath it.
    pub beneath: Option<Vec<u8>>,
}

impl Volume {
    /// Whether the object `fd` refers to still lies beneath this volume's root (a
    /// handle minted inside may name a file that was moved out since).
    fn contains(&self, fd: BorrowedFd<'_>) -> bool {
        let Some(prefix) = &self.beneath else {
            return true;
        };
        match sys::fd_path(fd) {
            Ok(p) => p.starts_with(prefix) && (p.len() == prefix.len() || p[prefix.len()] == b'/'),
            Err(_) => false,
        }
    }
}

/// The identity of a file on this server: (device, inode).
pub type FileKey = (u64, u64);

/// Everything the connections of one fs-server share.
pub struct Server {
    pub config: NodeConfig,
    pub key: ClusterKey,
    pub volumes: Vec<Arc<Volume>>,
    pub mounts: Mounts,
    pub state: State,
    next_id: AtomicU64,
}

/// An object a handle resolved to.
pub struct Resolved {
    pub volume: Arc<Volume>,
    pub mount_id: i32,
    /// O_PATH descriptor, opened with the server's credentials.
    pub fd: OwnedFd,
}

/// Maps an errno-carrying I/O error to the protocol's error, naming what failed.
pub fn fs_err(e: std::io::Error, what: impl std::fmt::Display) -> FsError {
    FsError::new(
        e.raw_os_error().unwrap_or(libc::EIO),
        format!("{what}: {e}"),
    )
}

/// A path component from a client: one name, never "", ".", ".." or with a '/' or NUL.
/// ".." is refused (EPERM) everywhere: the client kernel resolves ".." itself, and
/// refusing it means no name can lead above a volume root.
pub fn component(name: &[u8]) -> FsResult<CString> {
    let shown = String::from_utf8_lossy(name);
    if name == b".." {
        return Err(FsError::new(
            libc::EPERM,
            "name \"..\" refused: parents are resolved by the client, never by the server",
        ));
    }
    if name.is_empty() || name == b"." || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::new(
            libc::EINVAL,
            format!("name {shown:?} refused: a name must be one path component"),
        ));
    }
    if name.len() > 255 {
        return Err(FsError::new(libc::ENAMETOOLONG, format!("name {shown:?}")));
    }
    Ok(CString::new(name).expect("checked for NUL"))
}

/// A stable 64-bit inode number for a file of a volume: FNV-1a of volume, dev, ino;
/// never 0 or 1 (FUSE's "none" and root ids).
pub fn ino_of(volume: &str, dev: u64, ino: u64) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    eat(volume.as_bytes());
    eat(&[0]);
    eat(&dev.to_le_bytes());
    eat(&ino.to_le_bytes());
    if h < 2 {
        h += 2
    }
    h
}

pub fn file_key(st: &libc::statx) -> FileKey {
    (
        libc::makedev(st.stx_dev_major, st.stx_dev_minor),
        st.stx_ino,
    )
}

pub fn kind_of(mode: u32) -> FileKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDev,
        libc::S_IFBLK => FileKind::BlockDev,
        _ => FileKind::File,
    }
}

fn time(t: &libc::statx_timestamp) -> Time {
    Time {
        secs: t.tv_sec,
        nanos: t.tv_nsec,
    }
}

/// The protocol's attributes of a file of `volume`.
pub fn attr_of(volume: &str, st: &libc::statx) -> Attr {
    let (dev, ino) = file_key(st);
    Attr {
        ino: ino_of(volume, dev, ino),
        size: st.stx_size,
        blocks: st.stx_blocks,
        atime: time(&st.stx_atime),
        mtime: time(&st.stx_mtime),
        ctime: time(&st.stx_ctime),
        kind: kind_of(st.stx_mode as u32),
        perm: (st.stx_mode as u32 & 0o7777) as u16,
        nlink: st.stx_nlink,
        uid: st.stx_uid,
        gid: st.stx_gid,
        rdev: sys::encode_dev(st.stx_rdev_major, st.stx_rdev_minor),
        blksize: st.stx_blksize,
    }
}

impl Server {
    /// Opens every exported volume. Needs root (CAP_DAC_READ_SEARCH for handles).
    pub fn new(config: NodeConfig, key: ClusterKey) -> Result<Arc<Server>, StartError> {
        // Each client's umask is applied by hand; the process one must not interfere.
        sys::set_umask(0);
        match sys::raise_nofile() {
            Ok(n) => tracing::debug!(limit = n, "open file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
        }
        let mounts = Mounts::default();
        let mut volumes = Vec::new();
        for v in config.exported_volumes() {
            let root = mounts::open_dir_path(&v.path).map_err(|source| StartError::VolumeRoot {
                name: v.name.clone(),
                path: v.path.clone(),
                source,
            })?;
            let (kh, mount_id) =
                sys::name_to_handle(root.as_fd()).map_err(|source| StartError::NoHandles {
                    name: v.name.clone(),
                    path: v.path.clone(),
                    source,
                })?;
            let mfd = mounts::open_mount_fd(&v.path).map_err(|source| StartError::VolumeRoot {
                name: v.name.clone(),
                path: v.path.clone(),
                source,
            })?;
            mounts.register(mount_id, mfd);
            let root_handle = handle::encode(&key, &v.name, mount_id, &kh);
            let beneath = match sys::fd_path(root.as_fd()) {
                Ok(p) if p == b"/" => None,
                Ok(p) => Some(p),
                Err(source) => {
                    return Err(StartError::VolumeRoot {
                        name: v.name.clone(),
                        path: v.path.clone(),
                        source,
                    })
                }
            };
            tracing::info!(volume = %v.name, path = %v.path.display(), mount_id, "exporting volume");
            volumes.push(Arc::new(Volume {
                name: v.name,
                path: v.path,
                root,
                root_mount: mount_id,
                root_handle,
                beneath,
            }));
        }
        let mut seed = [0u8; 4];
        getrandom::fill(&mut seed).expect("the kernel's random source works");
        // Open ids start at a random 32-bit prefix, so ids a predecessor handed out are
        // (almost surely) unknown here and get reopened from their handle.
        let first = (u32::from_le_bytes(seed) as u64 | 1) << 32;
        Ok(Arc::new(Server {
            config,
            key,
            volumes,
            mounts,
            state: State::default(),
            next_id: AtomicU64::new(first),
        }))
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn volume(&self, name: &str) -> Option<&Arc<Volume>> {
        self.volumes.iter().find(|v| v.name == name)
    }

    /// Verifies a handle and opens what it names (O_PATH, server credentials).
    pub fn resolve(&self, h: &FileHandle) -> FsResult<Resolved> {
        let d = handle::decode(&self.key, h)?;
        let volume = self.volume(&d.volume).cloned().ok_or_else(|| {
            FsError::new(
                libc::ESTALE,
                format!(
                    "handle names volume {:?}, which this server no longer exports",
                    d.volume
                ),
            )
        })?;
        let mfd = self.mounts.fd(d.mount_id).map_err(|e| {
            FsError::new(
                libc::ESTALE,
                format!(
                    "handle of volume {}: mount {}: {e}",
                    volume.name, d.mount_id
                ),
            )
        })?;
        let fd = sys::open_by_handle(mfd.as_fd(), &d.kernel, libc::O_PATH | libc::O_NOFOLLOW)
            .map_err(|e| fs_err(e, format!("open by handle in volume {}", volume.name)))?;
        if !volume.contains(fd.as_fd()) {
            return Err(FsError::new(
                libc::ESTALE,
                format!(
                    "the file this handle names was moved out of volume {}",
                    volume.name
                ),
            ));
        }
        Ok(Resolved {
            volume,
            mount_id: d.mount_id,
            fd,
        })
    }

    /// Like [`Server::resolve`], but a handle that no longer resolves (its file was
    /// unlinked) still reaches the file through an open of `session` made with it, as
    /// fstat(2) on an open descriptor would.
    pub fn resolve_in(&self, session: u64, h: &FileHandle) -> FsResult<Resolved> {
        match self.resolve(h) {
            Err(e) if e.errno == libc::ESTALE => {
                let Some(o) = self.state.open_of_handle(session, h) else {
                    return Err(e);
                };
                let mount_id = handle::decode(&self.key, h)?.mount_id;
                let fd = sys::reopen(o.fd.as_fd(), libc::O_PATH)
                    .map_err(|e| fs_err(e, "reach an open, unlinked file"))?;
                Ok(Resolved {
                    volume: o.volume.clone(),
                    mount_id,
                    fd,
                })
            }
            r => r,
        }
    }

    /// The ino of what a handle names, if it still exists (for callbacks).
    pub fn ino_of_handle(&self, h: &FileHandle) -> Option<u64> {
        let r = self.resolve(h).ok()?;
        let st = sys::fstatx(r.fd.as_fd(), false).ok()?;
        Some(attr_of(&r.volume.name, &st).ino)
    }

    /// Switches this (blocking) thread to the caller's credentials until the guard
    /// drops. uid 0 is root unless `fs.squash_root`, then nobody.
    pub fn as_user(&self, c: &Creds) -> FsResult<CredGuard> {
        let (uid, gid, groups): (u32, u32, &[u32]) = if c.uid == 0 && self.config.fs.squash_root {
            (65534, 65534, &[])
        } else {
            (c.uid, c.gid, &c.groups)
        };
        CredGuard::enter(uid, gid, groups).map_err(|e| {
            fs_err(
                e,
                format!("cannot act as uid {uid} gid {gid} (is fs-server running as root?)"),
            )
        })
    }

    /// Whether an object reached from a parent on mount `parent_mount` may be shown:
    /// same mount, or a mount the policy lets lookups enter ([`mounts::may_enter`]).
    pub fn may_enter(&self, fd: BorrowedFd<'_>, parent_mount: i32) -> FsResult<bool> {
        let mount = sys::mount_id(fd).map_err(|e| fs_err(e, "stat (mount id)"))? as i32;
        if mount == parent_mount {
            return Ok(true);
        }
        Ok(self
            .mounts
            .info(mount)
            .map(|i| mounts::may_enter(&i, self.config.fs.cross_mounts))
            .unwrap_or(false))
    }

    /// The entry of an object just reached through `fd` (O_PATH) from a parent on mount
    /// `parent_mount`. Crossing into another mount obeys the mount policy: a refused
    /// mount point answers ENOENT.
    pub fn entry_of(
        &self,
        volume: &Volume,
        fd: BorrowedFd<'_>,
        parent_mount: i32,
        name: &[u8],
    ) -> FsResult<Entry> {
        // The mount first, without asking its file system anything: a FUSE mount may
        // refuse or hang a real stat.
        if !self.may_enter(fd, parent_mount)? {
            tracing::debug!(volume = %volume.name, name = %String::from_utf8_lossy(name),
                "not entering mount");
            return Err(FsError::new(
                libc::ENOENT,
                format!(
                    "{:?} is a mount point fs-server does not enter",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        let st = sys::fstatx(fd, true).map_err(|e| fs_err(e, "stat"))?;
        let (kh, mid) = sys::name_to_handle(fd).map_err(|e| {
            fs_err(
                e,
                format!("make a handle for {:?}", String::from_utf8_lossy(name)),
            )
        })?;
        Ok(Entry {
            handle: handle::encode(&self.key, &volume.name, mid, &kh),
            attr: attr_of(&volume.name, &st),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_components_are_names() {
        assert!(component(b"file.txt").is_ok());
        assert!(component(b"...").is_ok(), "\"...\" is an ordinary name");
        assert_eq!(component(b"..").unwrap_err().errno, libc::EPERM);
        for bad in [&b""[..], b".", b"a/b", b"/", b"a\0"] {
            assert_eq!(component(bad).unwrap_err().errno, libc::EINVAL, "{bad:?}");
        }
        assert_eq!(
            component(&[b'x'; 256]).unwrap_err().errno,
            libc::ENAMETOOLONG
        );
    }

    #[test]
    fn inos_are_stable_distinct_and_never_0_or_1() {
        assert_eq!(ino_of("ws1", 2049, 12), ino_of("ws1", 2049, 12));
        assert_ne!(ino_of("ws1", 2049, 12), ino_of("ws2", 2049, 12));
        assert_ne!(ino_of("ws1", 2049, 12), ino_of("ws1", 2049, 13));
        assert_ne!(ino_of("ws1", 2049, 12), ino_of("ws1", 2050, 12));
        for i in 0..10_000 {
            assert!(ino_of("v", 1, i) > 1);
        }
    }
}

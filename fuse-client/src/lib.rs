//! fuse-client: the super-root `/...` of a Ferry cluster, mounted with FUSE.
//!
//! This crate owns the client side of the file service: the FUSE mount, the inode
//! table mapping kernel inode numbers to fs-server file handles, the connections to
//! every node's fs-server (with reconnect across server restarts) and the callback
//! service through which a server tells us to drop cached pages (Sprite-style cache
//! consistency). The super-root lists every volume of the cluster; `/.../X/...` is
//! served by the fs-server exporting volume `X`.
//!
//! It does not own the protocol (`common::fsproto`), the handshake or transport
//! (`common::auth`, `common::transport`), nor what a file is on the server
//! (`fs-server`). It talks only to fs-servers.
//!
//! Entry points: [`mount`] (tests and embedding) returns a [`Mounted`] that unmounts
//! on drop; [`run`] mounts, waits for a shutdown signal, and unmounts (the binary).

mod conn;
mod convert;
mod fs;
mod inodes;
mod notify;
mod sys;
mod tuning;
mod volumes;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::auth::ClusterKey;
use common::config::NodeConfig;
use fuser::{BackgroundSession, MountOption, Session, SessionACL};

pub use conn::CALL_DEADLINE;

/// How the mount is made.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Where to mount; `None` takes `config.fuse.mountpoint`.
    pub mountpoint: Option<PathBuf>,
    /// Fork the watcher that detaches the mount if this process dies without
    /// unmounting (see `sys.rs`).
    pub unmount_watcher: bool,
    /// FUSE request threads (each with its own /dev/fuse clone).
    pub threads: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            mountpoint: None,
            unmount_watcher: true,
            threads: 2,
        }
    }
}

/// Why the super-root could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot create mountpoint {path}: {source}")]
    Mountpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the unmount watcher for {path}: {source}")]
    Watcher {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot mount FUSE at {path}: {source} (needs root and /dev/fuse)")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum UnmountError {
    #[error("cannot unmount {path}: {source}; it was detached lazily instead and goes away when no process uses it")]
    Busy {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why [`run`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Key(#[from] common::auth::KeyError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Unmount(#[from] UnmountError),
}

/// A mounted super-root. Dropping it unmounts.
pub struct Mounted {
    session: Option<BackgroundSession>,
    watcher: Option<sys::UnmountWatcher>,
    mountpoint: PathBuf,
    inner: Arc<fs::Inner>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

impl Mounted {
    /// Where the super-root is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Number of files the kernel currently holds inode numbers for.
    pub fn known_inodes(&self) -> usize {
        self.inner.inodes.lock().expect("inode lock").len()
    }

    /// Unmounts (blocking: call from a plain thread or `spawn_blocking`). If the
    /// mount is busy it is detached lazily and the error says so.
    pub fn unmount(mut self) -> Result<(), UnmountError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), UnmountError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let result = match session.umount_and_join() {
            Ok(()) => {
                tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
                Ok(())
            }
            Err(source) => {
                let _ = sys::umount_detach(&self.mountpoint);
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %source, "unmount failed; detached lazily");
                Err(UnmountError::Busy {
                    path: self.mountpoint.clone(),
                    source,
                })
            }
        };
        if let Some(w) = self.watcher.take() {
            w.disarm();
        }
        result
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.unmount_inner();
    }
}

/// A dead FUSE mount left by a killed predecessor answers ENOTCONN: detach it.
fn clear_dead_mount(path: &Path) {
    if let Err(e) = std::fs::metadata(path) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            tracing::warn!(mountpoint = %path.display(), "detaching a dead mount left by an earlier fuse-client");
            let _ = sys::umount_detach(path);
        }
    }
}

/// Mounts the super-root. Must be called within a tokio runtime, whose handle runs
/// every FUSE request's work.
pub async fn mount(
    config: &NodeConfig,
    key: ClusterKey,
    options: MountOptions,
) -> Result<Mounted, MountError> {
    let mountpoint = options
        .mountpoint
        .clone()
        .unwrap_or_else(|| config.fuse.mountpoint.clone());
    clear_dead_mount(&mountpoint);
    std::fs::create_dir_all(&mountpoint).map_err(|source| MountError::Mountpoint {
        path: mountpoint.clone(),
        source,
    })?;
    tuning::raise_max_pages_limit();

    let watcher = if options.unmount_watcher {
        Some(
            sys::UnmountWatcher::spawn(&mountpoint).map_err(|source| MountError::Watcher {
                path: mountpoint.clone(),
                source,
            })?,
        )
    } else {
        None
    };

    let notify = notify::NotifyQueue::start();
    let inner = fs::Inner::new(
        config,
        key,
        tokio::runtime::Handle::current(),
        notify.clone(),
    );
    let fs = fs::FerryFs::new(inner.clone());

    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName("ferry".into()),
        MountOption::Subtype("ferry".into()),
        MountOption::DefaultPermissions,
    ];
    fuse_config.acl = SessionACL::All;
    fuse_config.n_threads = Some(options.threads.max(1));
    fuse_config.clone_fd = true;

    let mp = mountpoint.clone();
    let session = tokio::task::spawn_blocking(move || Session::new(fs, &mp, &fuse_config))
        .await
        .expect("mount task does not panic");
    let session = match session {
        Ok(s) => s,
        Err(source) => {
            if let Some(w) = watcher {
                w.disarm();
            }
            return Err(MountError::Mount {
                path: mountpoint,
                source,
            });
        }
    };
    notify.attach(session.notifier());
    let session = match session.spawn() {
        Ok(s) => s,
        Err(source) => {
            let _ = sys::umount_detach(&mountpoint);
            if let Some(w) = watcher {
                w.disarm();
            }
            return Err(MountError::Mount {
                path: mountpoint,
                source,
            });
        }
    };
    if let Some(w) = &watcher {
        w.arm();
    }
    if let Some(dev) = tuning::mount_device(&mountpoint) {
        tuning::raise_read_ahead(&dev);
    }
    tracing::info!(mountpoint = %mountpoint.display(), node = %config.node, "super-root mounted");
    Ok(Mounted {
        session: Some(session),
        watcher,
        mountpoint,
        inner,
    })
}

/// Mounts the super-root described by `config`, serves it until `shutdown`
/// completes, then unmounts.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let key = config.load_key()?;
    let mounted = mount(&config, key, MountOptions::default()).await?;
    shutdown.await;
    tracing::info!("shutting down");
    tokio::task::spawn_blocking(move || mounted.unmount())
        .await
        .expect("unmount task does not panic")?;
    Ok(())
}

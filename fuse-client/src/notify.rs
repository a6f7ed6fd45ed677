//! Kernel cache invalidations, sent from one dedicated thread.
//!
//! A notification written to /dev/fuse can block until the kernel has dropped the
//! pages, which may wait on a request we are still to answer. So notifications are
//! never sent from a request's handler or from a tokio worker: they are queued here and
//! a thread of their own sends them, one after another.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use fuser::{INodeNo, Notifier};

enum Note {
    Inode(u64, Option<tokio::sync::oneshot::Sender<()>>),
    Entry(u64, Vec<u8>),
}

/// The queue of notifications; cheap to clone.
#[derive(Clone)]
pub struct NotifyQueue {
    tx: mpsc::Sender<Note>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl std::fmt::Debug for NotifyQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyQueue")
    }
}

impl NotifyQueue {
    /// Starts the sending thread. Notifications queued before [`NotifyQueue::attach`]
    /// are dropped (nothing can be cached before the mount exists).
    pub fn start() -> NotifyQueue {
        let (tx, rx) = mpsc::channel::<Note>();
        let notifier: Arc<OnceLock<Notifier>> = Arc::new(OnceLock::new());
        let n = notifier.clone();
        std::thread::Builder::new()
            .name("ferry-notify".into())
            .spawn(move || {
                for note in rx {
                    let Some(notifier) = n.get() else { continue };
                    match note {
                        Note::Inode(ino, done) => {
                            if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, 0) {
                                // ENOENT: the kernel no longer caches this inode.
                                tracing::debug!(ino, error = %e, "inval_inode");
                            }
                            if let Some(done) = done {
                                let _ = done.send(());
                            }
                        }
                        Note::Entry(parent, name) => {
                            if let Err(e) =
                                notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name))
                            {
                                tracing::debug!(parent, error = %e, "inval_entry");
                            }
                        }
                    }
                }
            })
            .expect("can start the notification thread");
        NotifyQueue { tx, notifier }
    }

    /// Connects the queue to the mounted session.
    pub fn attach(&self, notifier: Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// Queues dropping the cached pages and attributes of `ino`.
    pub fn inval_inode(&self, ino: u64) {
        let _ = self.tx.send(Note::Inode(ino, None));
    }

    /// Queues dropping `ino`'s cache; the receiver fires once the kernel has done it.
    pub fn inval_inode_wait(&self, ino: u64) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.send(Note::Inode(ino, Some(tx)));
        rx
    }

    /// Queues dropping the cached entry `name` of directory `parent`.
    pub fn inval_entry(&self, parent: u64, name: Vec<u8>) {
        let _ = self.tx.send(Note::Entry(parent, name));
    }
}

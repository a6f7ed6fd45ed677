//! The local socket: one JSON line in ([`LocalRequest`]), JSON lines out
//! ([`LocalReply`]: progress, then one final line). The caller's uid comes from
//! SO_PEERCRED: root may move any process, others only their own.

use super::{flat, long_ctx, Daemon, StartError};
use common::migproto::{LocalReply, LocalRequest, MigError, Mode, ProcessEntry};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// Binds the socket (its directory created, a stale socket replaced), open to every
/// local user: the check is per request.
pub fn bind(path: &Path) -> Result<UnixListener, StartError> {
    let io = |what: String| move |source| StartError::Io { what, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(io(format!("listening on {}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(io(format!("chmod {}", path.display())))?;
    Ok(l)
}

/// Progress and the final answer, on their way to the `migrate` command.
pub type Replies = mpsc::UnboundedSender<LocalReply>;

/// Serves one `migrate` command.
pub async fn client(d: Arc<Daemon>, stream: UnixStream) {
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "local client without credentials; refused");
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    if BufReader::new(rd).read_line(&mut line).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let mut s = serde_json::to_string(&r).unwrap_or_default();
            s.push('\n');
            if wr.write_all(s.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let reply = match serde_json::from_str::<LocalRequest>(line.trim()) {
        Err(e) => LocalReply::Error {
            message: format!("malformed request: {e}"),
        },
        Ok(LocalRequest::List) => list(&d).await,
        Ok(LocalRequest::Migrate { pid, dest, mode }) => {
            match migrate(&d, uid, pid, &dest, mode, &tx).await {
                Ok(o) => LocalReply::Done(o),
                Err(message) => LocalReply::Error { message },
            }
        }
    };
    let _ = tx.send(reply);
    drop(tx);
    let _ = writer.await;
}

/// The shadows home-proxy holds here (empty, with a warning, if it cannot be asked).
async fn shadows(d: &Daemon) -> Vec<ProcessEntry> {
    match d.proxy(&d.config.node).await {
        Ok(p) => p
            .shadows(tarpc::context::current())
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "asking home-proxy for its shadows");
                Vec::new()
            }),
        Err(e) => {
            tracing::warn!(error = %e, "asking home-proxy for its shadows");
            Vec::new()
        }
    }
}

async fn list(d: &Daemon) -> LocalReply {
    let mut home = shadows(d).await;
    let mut foreign: Vec<_> = d
        .foreign
        .lock()
        .unwrap()
        .values()
        .map(|f| f.entry.clone())
        .collect();
    home.sort_by_key(|e| e.pid);
    foreign.sort_by_key(|e| e.host_pid);
    LocalReply::List { home, foreign }
}

async fn migrate(
    d: &Arc<Daemon>,
    uid: u32,
    pid: i32,
    dest: &str,
    mode: Mode,
    tx: &Replies,
) -> Result<common::migproto::MigrateOutcome, String> {
    let span = tracing::info_span!("migrate", pid, dest, %mode, caller_uid = uid);
    let _e = span.enter();
    let Some(owner) = super::owner(pid) else {
        return Err(format!("no process {pid} on {}", d.config.node));
    };
    if uid != 0 && uid != owner {
        tracing::warn!(owner, "refused: not the owner");
        return Err(format!(
            "pid {pid} belongs to uid {owner}; you are uid {uid} (only its owner or root may move it); nothing was changed"
        ));
    }
    if dest != "home" && d.config.node_entry(dest).is_none() {
        return Err(format!(
            "unknown node {dest:?}; the cluster's nodes are {}; nothing was changed",
            d.node_names()
        ));
    }
    drop(_e);
    let me = d.config.node.clone();
    let shadow = shadows(d).await.into_iter().find(|s| s.pid == pid);
    let homeward = dest == "home" || dest == me;
    // Into the shadow every page goes at once, from a stop-copy image (a lazy
    // restore into it is not built; pre-copy from the host is not tried yet).
    let mode = if homeward { Mode::StopCopy } else { mode };
    match shadow {
        None if dest == "home" => {
            // Run on the host: the pid is the foreign process's pid here.
            let foreign = d
                .foreign
                .lock()
                .unwrap()
                .values()
                .find(|f| f.entry.host_pid == pid && f.restorer.is_none())
                .map(|f| f.entry.clone());
            let Some(f) = foreign else {
                return Err(format!(
                    "pid {pid} is neither a shadow nor a migrated process here; it already runs at its home {me}; nothing was changed"
                ));
            };
            let _ = tx.send(LocalReply::Progress {
                phase: format!("bringing it home to {} (pid {} there)", f.home, f.pid),
                bytes: 0,
            });
            super::host::move_on(d, &f.id, &f.home, mode, Some(tx))
                .await
                .map_err(|e| e.to_string())
        }
        None if dest == me => Err(format!(
            "pid {pid} already runs at its home {me}; nothing was changed"
        )),
        None => super::source::migrate_from_home(d, pid, dest, mode, tx)
            .await
            .map_err(|e| e.to_string()),
        Some(e) if e.host == dest => Err(format!(
            "pid {pid} already runs on {dest}; nothing was changed"
        )),
        Some(e) => {
            let to = if homeward {
                me.clone()
            } else {
                dest.to_string()
            };
            let _ = tx.send(LocalReply::Progress {
                phase: if homeward {
                    format!("asking {} to bring it home into its shadow", e.host)
                } else {
                    format!("asking {} to move it to {dest}", e.host)
                },
                bytes: 0,
            });
            let host = d.peer(&e.host).await.map_err(|e| e.to_string())?;
            // The host tells home-proxy where the process runs now (or, if its
            // migd dies during the commit, the restarted one does once it settled).
            flat(
                &e.host,
                host.move_to(long_ctx(), e.id.clone(), to.clone(), mode)
                    .await,
            )
            .map_err(|err: MigError| match err {
                MigError::Failed { ref why, .. } if why.starts_with("the call failed") => format!(
                    "{err} (if {}'s migd died during the move, it settles the move when it \
                     restarts: `migrate --list` shows where the process runs)",
                    e.host
                ),
                err => err.to_string(),
            })
        }
    }
}

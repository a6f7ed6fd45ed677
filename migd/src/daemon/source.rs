//! The source side of a migration (stop-copy): offer, freeze and dump into the store
//! (the keeper holds the original frozen), restore at the destination, then commit —
//! or, on any failure before commit, thaw the original where it was.

use super::local::Replies;
use super::{flat, long_ctx, now_secs, Daemon, ShadowRec};
use common::migproto::{
    LocalReply, MigError, MigdServiceClient, MigrateOutcome, MigrationOffer, Mode, ProcessEntry,
    Running,
};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use tokio::sync::mpsc;
use tracing::Instrument;

/// A keeper process: it holds the dumped original frozen until told how to end it.
pub struct Keeper {
    pub child: Child,
    pub to: mpsc::UnboundedSender<String>,
    pub lines: Lines<BufReader<ChildStdout>>,
}

/// A migration that reached the point of commit: the copy runs at the destination,
/// the original is still frozen here.
pub struct Ready {
    pub keeper: Keeper,
    pub dest: MigdServiceClient,
    pub running: Running,
    pub bytes: u64,
    pub freeze_ms: f64,
}

fn progress(tx: Option<&Replies>, phase: impl Into<String>, bytes: u64) {
    if let Some(tx) = tx {
        let _ = tx.send(LocalReply::Progress {
            phase: phase.into(),
            bytes,
        });
    }
}

/// Offer, dump (keeping the original frozen), restore at `dest`. On failure nothing
/// runs at `dest` and the original was thawed where it was.
pub async fn prepare(
    d: &Arc<Daemon>,
    local_pid: i32,
    offer: MigrationOffer,
    dest: &str,
    enter: bool,
    tx: Option<&Replies>,
) -> Result<Ready, MigError> {
    let me = d.config.node.clone();
    let fail = |why: String| MigError::Failed {
        node: me.clone(),
        why,
    };
    let peer = d.peer(dest).await?;
    progress(tx, format!("asking {dest}"), 0);
    flat(dest, peer.offer(long_ctx(), offer.clone()).await)?;
    let images = d.image_dir(&offer.id);
    if !enter {
        std::fs::create_dir_all(&images).map_err(|e| {
            fail(format!(
                "cannot create the image directory {} in the store: {e}",
                images.display()
            ))
        })?;
    }
    progress(tx, "freezing and writing the image to the store", 0);
    let mut child = tokio::process::Command::new(&d.helper_exe)
        .arg("internal-keep")
        .arg("--pid")
        .arg(local_pid.to_string())
        .arg("--images")
        .arg(&images)
        .args(if enter { &["--enter"][..] } else { &[][..] })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", d.helper_exe.display())))?;
    let mut stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let (to, mut to_rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(l) = to_rx.recv().await {
            if stdin.write_all(format!("{l}\n").as_bytes()).await.is_err() {
                break;
            }
            let _ = stdin.flush().await;
        }
    });
    let mut keeper = Keeper {
        child,
        to,
        lines: BufReader::new(stdout).lines(),
    };
    let first = keeper.lines.next_line().await.ok().flatten();
    let frozen_at = Instant::now();
    let (bytes, dump_ms) = match first.as_deref().and_then(|l| l.strip_prefix("dumped ")) {
        Some(rest) => {
            let mut it = rest.split_whitespace();
            let b: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let ms: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            (b, ms)
        }
        None => {
            let why = first
                .as_deref()
                .and_then(|l| l.strip_prefix("error "))
                .unwrap_or("the keeper ended without a word")
                .to_string();
            let _ = peer.abort(long_ctx(), offer.id.clone()).await;
            let _ = std::fs::remove_dir_all(&images);
            let _ = keeper.child.wait().await;
            return Err(fail(format!("{why} (pid {local_pid} runs on here)")));
        }
    };
    progress(tx, format!("image written; restoring on {dest}"), bytes);
    match flat(dest, peer.restore(long_ctx(), offer.id.clone()).await) {
        Ok(running) => {
            let freeze_ms = dump_ms + frozen_at.elapsed().as_secs_f64() * 1e3;
            Ok(Ready {
                keeper,
                dest: peer,
                running,
                bytes,
                freeze_ms,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "restore failed; thawing the original");
            let _ = peer.abort(long_ctx(), offer.id.clone()).await;
            let _ = keeper.to.send("abort".into());
            let _ = keeper.child.wait().await;
            let _ = std::fs::remove_dir_all(&images);
            Err(MigError::Failed {
                node: dest.to_string(),
                why: format!(
                    "{e}; the process was thawed and runs on at {}, unchanged",
                    d.config.node
                ),
            })
        }
    }
}

/// The offer for a process of this node.
pub fn offer_for(
    d: &Daemon,
    id: &str,
    home: &str,
    pid: i32,
    comm: &str,
    uid: u32,
    mode: Mode,
) -> MigrationOffer {
    let u = nix::sys::utsname::uname().ok();
    MigrationOffer {
        id: id.to_string(),
        home: home.to_string(),
        pid,
        comm: comm.to_string(),
        source: d.config.node.clone(),
        uid,
        mode,
        kernel: u
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        machine: u
            .as_ref()
            .map(|u| u.machine().to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn comm_uid(pid: i32) -> (String, u32) {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    (comm, uid)
}

/// Moves a process of this node (its home) to `dest`; the original becomes its shadow.
pub async fn migrate_from_home(
    d: &Arc<Daemon>,
    pid: i32,
    dest: &str,
    mode: Mode,
    tx: &Replies,
) -> Result<MigrateOutcome, MigError> {
    let id = d.new_id();
    let span = tracing::info_span!("migration", id = %id, pid, from = %d.config.node, to = dest);
    async {
        // Refusals that need no freeze come before anyone else is asked.
        let me = d.config.node.clone();
        tokio::task::spawn_blocking(move || crate::engine::dump::precheck(pid))
            .await
            .map_err(|e| MigError::Failed {
                node: me.clone(),
                why: format!("pre-check task: {e}"),
            })?
            .map_err(|e| MigError::Refused {
                node: me.clone(),
                why: e.to_string(),
            })?;
        let (comm, uid) = comm_uid(pid);
        let offer = offer_for(d, &id, &d.config.node, pid, &comm, uid, mode);
        let ready = prepare(d, pid, offer, dest, false, Some(tx)).await?;
        // Commit: the copy runs at `dest`; the original becomes the shadow.
        let Ready {
            keeper,
            dest: peer,
            running,
            bytes,
            freeze_ms,
        } = ready;
        let _ = keeper.to.send("commit-shadow".into());
        d.shadows.lock().unwrap().insert(
            id.clone(),
            ShadowRec {
                entry: ProcessEntry {
                    id: id.clone(),
                    pid,
                    host_pid: running.host_pid,
                    comm,
                    home: d.config.node.clone(),
                    host: dest.to_string(),
                    since: now_secs(),
                },
                keeper: keeper.to.clone(),
            },
        );
        tokio::spawn(watch_keeper(d.clone(), id.clone(), keeper).in_current_span());
        if let Err(e) = flat(dest, peer.committed(long_ctx(), id.clone()).await) {
            tracing::warn!(error = %e, "telling the destination about the commit");
        }
        tracing::info!(host_pid = running.host_pid, bytes, freeze_ms, "migrated");
        Ok(MigrateOutcome {
            id: id.clone(),
            host: dest.to_string(),
            host_pid: running.host_pid,
            bytes,
            freeze_ms,
        })
    }
    .instrument(span)
    .await
}

/// Follows a shadow's keeper: forwards the signals sent to the shadow to wherever the
/// process runs; forgets the shadow when the keeper ends.
async fn watch_keeper(d: Arc<Daemon>, id: String, mut keeper: Keeper) {
    while let Ok(Some(line)) = keeper.lines.next_line().await {
        let sig = if let Some(s) = line.strip_prefix("signal ") {
            s.trim().parse::<i32>().ok()
        } else if line.starts_with("gone ") {
            // The shadow was killed at home (SIGKILL): the process goes too.
            Some(libc::SIGKILL)
        } else {
            tracing::warn!(%line, "keeper");
            None
        };
        let Some(sig) = sig else { continue };
        let host = d
            .shadows
            .lock()
            .unwrap()
            .get(&id)
            .map(|s| s.entry.host.clone());
        let Some(host) = host else { break };
        tracing::info!(sig, %host, "forwarding a signal sent to the shadow");
        let r = match d.peer(&host).await {
            Ok(p) => flat(&host, p.signal(long_ctx(), id.clone(), sig).await),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::warn!(sig, %host, error = %e, "signal not forwarded");
        }
    }
    let _ = keeper.child.wait().await;
    d.shadows.lock().unwrap().remove(&id);
    tracing::info!("shadow ended");
}

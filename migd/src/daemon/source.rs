//! The source side of a migration (stop-copy): offer, freeze and dump into the store
//! (the keeper holds the original frozen), restore at the destination, then commit —
//! or, on any failure before commit, thaw the original where it was.

use super::keeper::{Dumped, Keeper};
use super::local::Replies;
use super::settle::{self, Decision};
use super::{flat, long_ctx, now_secs, Daemon};
use common::migproto::{
    HoldPlan, LocalReply, MigError, MigrateOutcome, MigrationOffer, Mode, PrecopyPlan,
    ProcessEntry, ProxyServiceClient, Running,
};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// Who holds the frozen original until commit.
pub enum Holder {
    /// A keeper of this migd (a foreign process moving on); killed at commit.
    Keeper(Box<Keeper>),
    /// This node's home-proxy (a process leaving home); the shadow after commit.
    Proxy(ProxyServiceClient),
}

/// Where to hold the original.
pub enum HoldAt {
    /// A keeper of ours, inside the process's own root.
    Keeper,
    /// This node's home-proxy.
    Proxy,
}

impl Holder {
    /// The commit is about to be sent to the destination: from now on the
    /// original must not thaw on its own (see `ProxyService::decided`). Our own
    /// keeper (a process moving on) is told `decided` once the decision is recorded
    /// where a restarted migd finds it: if this migd dies, the keeper holds the old
    /// copy frozen until the restarted migd has asked the destination whether its
    /// copy runs (`settle`).
    async fn decided(
        &mut self,
        d: &Daemon,
        entry: &ProcessEntry,
        image: &str,
    ) -> Result<(), MigError> {
        match self {
            Holder::Keeper(k) => {
                let dec = Decision {
                    id: entry.id.clone(),
                    home: entry.home.clone(),
                    dest: entry.host.clone(),
                    host_pid: entry.host_pid,
                    image: image.to_string(),
                };
                let failed = |why: String| MigError::Failed {
                    node: d.config.node.clone(),
                    why,
                };
                // The image must be known faithful first (home-proxy waits for it too).
                k.checked().await.map_err(failed)?;
                settle::record(d, &dec).map_err(|e| {
                    failed(format!(
                        "cannot record the decision in {}: {e}",
                        settle::record_path(d, &dec.id).display()
                    ))
                })?;
                k.decided().await.map_err(failed)
            }
            Holder::Proxy(p) => {
                let me = entry.home.clone();
                flat(
                    &me,
                    p.decided(long_ctx(), entry.id.clone(), entry.clone()).await,
                )
            }
        }
    }

    async fn abort(self, d: &Daemon, id: &str) {
        match self {
            Holder::Keeper(k) => {
                k.end("abort").await;
                settle::forget(d, id);
            }
            Holder::Proxy(p) => {
                if let Err(e) = p.abort(long_ctx(), id.to_string()).await {
                    tracing::error!(error = %e, "home-proxy did not take the abort");
                }
            }
        }
    }
}

/// A migration that reached the point of commit: the copy runs at the destination,
/// the original is still frozen here.
pub struct Ready {
    pub holder: Holder,
    pub running: Running,
    /// The listing entry of the process where it runs now.
    pub entry: ProcessEntry,
    /// Page bytes written by the freeze (pre-copy rounds included).
    pub bytes: u64,
    pub freeze_ms: f64,
    /// Page bytes being written after the freeze (lazy), see [`wait_flushed`].
    pub late_bytes: u64,
    pub images: std::path::PathBuf,
}

/// After commit in a lazy move: waits until the holder has written the late pages
/// (late.ready lists every chunk) or they are no longer needed (the destination
/// removed the image once every page was in), showing progress every second. Until
/// then the process at the destination depends on the frozen original here. Gives
/// up waiting (the holder goes on) if nothing moves for the store bound
/// (`migd.lazy_store_bound_secs`) plus a margin.
pub async fn wait_flushed(
    d: &Daemon,
    images: &std::path::Path,
    late_bytes: u64,
    tx: Option<&Replies>,
) -> u64 {
    use crate::engine::image::{CHUNK, LATE_READY_FILE};
    if late_bytes == 0 {
        return 0;
    }
    let bound = std::time::Duration::from_secs(d.config.migd.lazy_store_bound_secs);
    let chunks = late_bytes.div_ceil(CHUNK);
    let ready = images.join(LATE_READY_FILE);
    progress(
        tx,
        "running there; writing the rest of its pages to the store in the background",
        0,
    );
    let mut last = (0u64, Instant::now());
    let mut shown = Instant::now();
    loop {
        let n = match tokio::fs::metadata(&ready).await {
            Ok(m) => (m.len() / 8).min(chunks),
            // Removed: the destination has every page it needs.
            Err(_) => return (last.0 * CHUNK).min(late_bytes),
        };
        let bytes = (n * CHUNK).min(late_bytes);
        if n >= chunks {
            progress(tx, "every page written to the store", late_bytes);
            return late_bytes;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > bound + std::time::Duration::from_secs(5) {
            tracing::warn!(
                bytes,
                "the late flush makes no progress; not waiting for it"
            );
            return bytes;
        }
        if shown.elapsed() >= std::time::Duration::from_secs(1) {
            progress(tx, "pages written to the store after the freeze", bytes);
            shown = Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub(super) fn progress(tx: Option<&Replies>, phase: impl Into<String>, bytes: u64) {
    if let Some(tx) = tx {
        let _ = tx.send(LocalReply::Progress {
            phase: phase.into(),
            bytes,
        });
    }
}

/// Runs `hold` (a dump into `images`) and meanwhile tells `tx` every second how
/// many page bytes are in the store (pre-copy rounds can take a while).
async fn with_page_progress<T>(
    hold: impl std::future::Future<Output = T>,
    images: &std::path::Path,
    tx: Option<&Replies>,
) -> T {
    let pages = images.join(crate::engine::image::PAGES_FILE);
    tokio::pin!(hold);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tokio::select! {
            r = &mut hold => return r,
            _ = tick.tick() => {
                let n = tokio::fs::metadata(&pages).await.map(|m| m.len()).unwrap_or(0);
                if n != last {
                    last = n;
                    progress(tx, "pages written to the store", n);
                }
            }
        }
    }
}

/// How long a move from a host waits, the process frozen, for its relayed pipes to
/// reach home (see [`super::relay`]).
const RELAY_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Offer, dump (keeping the original frozen), restore at `dest`, commit there. On
/// failure nothing runs at `dest` and the original was thawed where it was; on
/// success the caller ends the original (shadow or kill): the copy at `dest` is the
/// process now.
pub async fn prepare(
    d: &Arc<Daemon>,
    local_pid: i32,
    offer: MigrationOffer,
    dest: &str,
    at: HoldAt,
    tx: Option<&Replies>,
) -> Result<Ready, MigError> {
    let me = d.config.node.clone();
    let fail = |why: String| MigError::Failed {
        node: me.clone(),
        why,
    };
    let id = offer.id.clone();
    let mode = offer.mode;
    let image = offer.image.clone();
    let images = d.image_dir(&image);
    // The listing entry once it runs at `dest` (its host pid and time filled in
    // after the restore), for `Holder::decided` and the commit.
    let mut entry = ProcessEntry {
        id: id.clone(),
        pid: offer.pid,
        host_pid: 0,
        comm: offer.comm.clone(),
        home: offer.home.clone(),
        host: dest.to_string(),
        since: 0,
    };
    let peer = d.peer(dest).await?;
    progress(tx, format!("asking {dest}"), 0);
    // The image directory exists before the offer: the destination's restorer
    // opens it then, so that no lookup of it is left for the freeze.
    tokio::fs::create_dir_all(&images)
        .await
        .map_err(|e| fail(format!("cannot create {}: {e}", images.display())))?;
    let offered = flat(dest, peer.offer(long_ctx(), offer).await);
    if offered.is_err() {
        let _ = std::fs::remove_dir_all(&images);
    }
    offered?;
    common::fault::point("source-after-offer");
    let plan = HoldPlan {
        precopy: mode.precopies().then_some(PrecopyPlan {
            max_rounds: d.config.migd.precopy_max_rounds,
            stop_below_bytes: d.config.migd.precopy_stop_below_bytes,
            throttle_max_percent: d.config.migd.precopy_throttle_max_percent,
        }),
        late_bound_secs: (mode.lazy() && d.config.migd.lazy_late_pages)
            .then_some(d.config.migd.lazy_store_bound_secs),
    };
    progress(
        tx,
        if plan.precopy.is_some() {
            "pre-copy: writing pages to the store while it runs"
        } else {
            "freezing and writing the image to the store"
        },
        0,
    );
    let hold = async {
        match at {
            HoldAt::Keeper => Keeper::start(
                &d.helper_exe,
                local_pid,
                &images,
                true,
                None,
                Some(&settle::keeper_socket(d, &id)),
                plan,
            )
            .await
            .map(|(k, dumped)| (Holder::Keeper(Box::new(k)), dumped))
            .map_err(fail),
            HoldAt::Proxy => match d.proxy(&me).await {
                Ok(p) => flat(
                    &me,
                    p.hold(
                        long_ctx(),
                        id.clone(),
                        local_pid,
                        images.display().to_string(),
                        plan,
                    )
                    .await,
                )
                .map(|h| {
                    (
                        Holder::Proxy(p),
                        Dumped {
                            bytes: h.bytes,
                            dump_ms: h.dump_ms,
                            rounds: h.rounds,
                            late_bytes: h.late_bytes,
                            handover: h.handover,
                        },
                    )
                }),
                Err(e) => Err(e),
            },
        }
    };
    let held = with_page_progress(hold, &images, tx).await;
    let frozen_at = Instant::now();
    let (
        mut holder,
        Dumped {
            bytes,
            dump_ms,
            rounds,
            late_bytes,
            handover,
        },
    ) = match held {
        Ok(h) => h,
        Err(e) => {
            let _ = peer.abort(long_ctx(), id.clone()).await;
            let _ = std::fs::remove_dir_all(&images);
            if let HoldAt::Keeper = at {
                // The keeper bound its settle socket before it failed.
                settle::forget(d, &id);
            }
            return Err(e);
        }
    };
    // A process moving on from here may have written into pipes relayed home: all
    // of it reaches home before the copy at `dest` may write more (its image's
    // pipes do not carry those bytes).
    if let Some(relays) = super::relay::of(d, &id) {
        if let Err(left) = relays.drained(RELAY_DRAIN).await {
            let _ = peer.abort(long_ctx(), id.clone()).await;
            holder.abort(d, &id).await;
            let _ = std::fs::remove_dir_all(&images);
            let left: Vec<String> = left
                .iter()
                .map(|(fd, n)| format!("fd {fd}: {n} bytes"))
                .collect();
            return Err(fail(format!(
                "what it wrote into pipes read at home did not get there within {} s ({}): is the reader there stopped? The process was thawed and runs on at {me}, unchanged",
                RELAY_DRAIN.as_secs(),
                left.join(", ")
            )));
        }
    }
    if rounds > 0 {
        progress(
            tx,
            format!(
                "pre-copy: {rounds} rounds while it ran, then frozen {dump_ms:.1} ms for the rest"
            ),
            bytes,
        );
    }
    progress(
        tx,
        format!(
            "image written; restoring on {dest}{}",
            if late_bytes > 0 {
                " at once (its other pages are written meanwhile and fault in from the store)"
            } else if mode.lazy() {
                " (pages fault in from the store)"
            } else {
                ""
            }
        ),
        bytes,
    );
    // The destination's copy is held before its first instruction until told
    // `committed`; until then any failure kills it there and thaws the original
    // here. A `committed` that went unanswered is settled by asking (see below).
    // Once home-proxy knows the decision (`decided`), the original never thaws on
    // its own: a dying home-proxy cannot leave two copies running.
    let mut ph = crate::phases::Phases::new("after_dump");
    let restored = match flat(dest, peer.restore(long_ctx(), id.clone(), handover).await) {
        Ok(running) => {
            ph.mark("restore rpc");
            entry.host_pid = running.host_pid;
            entry.since = now_secs();
            match holder.decided(d, &entry, &image).await {
                Ok(()) => {
                    ph.mark("decided");
                    let r = match flat(dest, peer.committed(long_ctx(), id.clone()).await) {
                        Ok(()) => Ok(running),
                        Err(e) => settle_commit(d, &entry, &image, e, tx)
                            .await
                            .map(|()| running),
                    };
                    ph.mark("committed rpc");
                    r
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    match restored {
        Ok(running) => {
            let freeze_ms = dump_ms + frozen_at.elapsed().as_secs_f64() * 1e3;
            tracing::debug!(
                dump_ms,
                restore_ms = running.restore_ms,
                freeze_ms,
                "phases: {}",
                ph.summary()
            );
            Ok(Ready {
                holder,
                running,
                entry,
                bytes,
                freeze_ms,
                late_bytes,
                images,
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "restore failed; thawing the original");
            let _ = peer.abort(long_ctx(), id.clone()).await;
            holder.abort(d, &id).await;
            let _ = std::fs::remove_dir_all(&images);
            // The destination's own error names it already.
            let why = match e {
                MigError::Failed { node, why } | MigError::Refused { node, why }
                    if node == dest =>
                {
                    why
                }
                e => e.to_string(),
            };
            Err(MigError::Failed {
                node: dest.to_string(),
                why: format!(
                    "{why}; the process was thawed and runs on at {}, unchanged",
                    d.config.node
                ),
            })
        }
    }
}

/// `committed` failed without an answer we can trust (the destination's migd may
/// have died after passing the commit on, or before): the copy there may run, so
/// the original must not thaw on a guess. Asks the destination (going home: the
/// home) whether the copy runs until it answers (`settle::copy_runs`): Ok if it
/// runs (the commit goes on), the original error if it does not (the original
/// thaws). Waits as long as it takes, the original frozen meanwhile: two copies
/// running would be worse.
async fn settle_commit(
    d: &Arc<Daemon>,
    entry: &ProcessEntry,
    image: &str,
    e: MigError,
    tx: Option<&Replies>,
) -> Result<(), MigError> {
    // An answer naming a copy that is gone or was never known settles it too.
    if let MigError::Refused { .. } = e {
        return Err(e);
    }
    tracing::warn!(error = %e, "the commit went unanswered; asking whether the copy runs");
    let dest = &entry.host;
    let why = format!("{dest} did not answer the commit ({e})");
    if settle::copy_runs(d, dest, &entry.home, &entry.id, image, &why, tx).await {
        Ok(())
    } else {
        Err(e)
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
        image: d.new_id(),
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
        files: mapped_files(pid),
    }
}

/// The files `pid` maps (regular paths, each once; none for pid 0 or a process gone).
fn mapped_files(pid: i32) -> Vec<String> {
    if pid <= 0 {
        return Vec::new();
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let areas = crate::engine::maps::parse_smaps(&maps).unwrap_or_default();
    let mut files: Vec<String> = areas
        .into_iter()
        .filter(|a| a.is_file() && !a.name.ends_with(" (deleted)") && a.name.starts_with('/'))
        .map(|a| a.name)
        .collect();
    files.sort();
    files.dedup();
    files
}

fn comm_uid(pid: i32) -> (String, u32) {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string();
    (comm, super::owner(pid).unwrap_or(0))
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
        let Ready {
            holder,
            running,
            entry,
            bytes,
            freeze_ms,
            late_bytes,
            images,
        } = prepare(d, pid, offer, dest, HoldAt::Proxy, Some(tx)).await?;
        // Commit: the copy runs at `dest`; the original becomes the shadow.
        if let Holder::Proxy(p) = &holder {
            if let Err(e) = flat(
                &d.config.node,
                p.commit(long_ctx(), id.clone(), entry).await,
            ) {
                // The copy at `dest` runs; the original must not: it stays frozen.
                tracing::error!(error = %e, "home-proxy did not take the commit");
            }
        }
        let bytes = bytes + wait_flushed(d, &images, late_bytes, Some(tx)).await;
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

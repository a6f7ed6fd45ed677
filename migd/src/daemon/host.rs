//! The migration service ([`MigdService`]) as one node's migd answers it: the
//! destination of a migration (offer, restore, commit, abort), the host of foreign
//! processes (signals, moving on, reporting their end home), and the home of shadows
//! (their process's end).

use super::keeper::{connect_lines, line_source, LineSource};
use super::source::{offer_for, prepare, HoldAt, Holder, Ready};
use super::{flat, long_ctx, now_secs, Daemon, ForeignRec};
use common::migproto::{
    Handover, MigError, MigResult, MigdService, MigrateOutcome, MigrationOffer, Mode, ProcessEntry,
    Running,
};
use std::process::Stdio;
use std::sync::Arc;
use tarpc::context::Context;
use tokio::io::AsyncWriteExt;
use tokio::process::Child;
use tracing::Instrument;

/// An accepted offer, until its restore (or abort).
pub struct Offered {
    pub offer: MigrationOffer,
    /// The restorer started at once (building the home's file view while the
    /// source writes the image); `Err` says why it could not be started. `None`
    /// going home (home-proxy restores into the shadow).
    pub restorer: Option<Result<Restorer, String>>,
    /// When it was accepted (it is dropped past `migd.offer_bound_secs` from then).
    pub since: std::time::Instant,
}

/// A restorer helper started for an offer (see `helpers::restorer_main`): it builds
/// the home's file view, says `ready`, and waits for `restore`.
pub struct Restorer {
    child: Child,
    stdin: Option<tokio::process::ChildStdin>,
    lines: LineSource,
    stage: std::path::PathBuf,
    socket: std::path::PathBuf,
    started: std::time::Instant,
}

impl Restorer {
    /// Starts the restorer of `offer` (the image not written yet).
    fn start(d: &Daemon, offer: &MigrationOffer) -> Result<Restorer, String> {
        let stage = d.config.migd.state_dir.join("roots").join(&offer.id);
        let records = d.foreign_dir();
        std::fs::create_dir_all(&records)
            .map_err(|e| format!("cannot create {}: {e}", records.display()))?;
        let socket = records.join(format!("{}.sock", offer.id));
        let mut child = tokio::process::Command::new(&d.helper_exe)
            .arg("internal-restore")
            .arg("--images")
            .arg(d.image_dir(&offer.image))
            .arg("--home")
            .arg(&offer.home)
            .arg("--superroot")
            .arg(d.superroot())
            .arg("--stage")
            .arg(&stage)
            .arg("--socket")
            .arg(&socket)
            .args(offer.files.iter().flat_map(|f| ["--warm", f.as_str()]))
            .arg("--warm-pages-mib")
            .arg(if offer.mode.precopies() {
                d.config.migd.precopy_warm_mib.to_string()
            } else {
                "0".to_string()
            })
            .args((offer.source != offer.home).then_some("--refill-input"))
            .args(if offer.mode.lazy() {
                vec![
                    "--lazy".to_string(),
                    "--store-bound".to_string(),
                    d.config.migd.lazy_store_bound_secs.to_string(),
                    "--prefetch-mib-per-sec".to_string(),
                    d.config.migd.lazy_prefetch_mib_per_sec.to_string(),
                ]
            } else {
                Vec::new()
            })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", d.helper_exe.display()))?;
        Ok(Restorer {
            stdin: child.stdin.take(),
            lines: line_source(child.stdout.take().expect("piped")),
            child,
            stage,
            socket,
            started: std::time::Instant::now(),
        })
    }

    /// Ends a restorer that restored nothing (the migration was given up before
    /// its restore): its input closes, it exits; its stage and socket are removed.
    fn dismiss(mut self) {
        drop(self.stdin.take());
        tokio::spawn(async move {
            let _ = self.child.wait().await;
            let _ = std::fs::remove_dir(&self.stage);
            let _ = std::fs::remove_file(&self.socket);
        });
    }
}

/// One authenticated connection from another node's migd.
#[derive(Clone)]
pub struct Conn {
    pub d: Arc<Daemon>,
    /// The peer's proven node name.
    pub peer: String,
}

impl Conn {
    fn me(&self) -> String {
        self.d.config.node.clone()
    }
    fn unknown(&self, id: &str) -> MigError {
        MigError::Unknown {
            node: self.me(),
            id: id.to_string(),
        }
    }
}

impl MigdService for Conn {
    async fn offer(self, _: Context, offer: MigrationOffer) -> MigResult<()> {
        // Going home: only into the shadow it left here.
        let going_home_refusal = if offer.home == self.me() {
            match self.d.proxy(&offer.home).await {
                Ok(p) => {
                    let shadows = p.shadows(long_ctx()).await.unwrap_or_default();
                    (!shadows
                        .iter()
                        .any(|s| s.id == offer.id && s.pid == offer.pid))
                    .then(|| {
                        format!(
                            "no shadow of migration {} (pid {}) is held here",
                            offer.id, offer.pid
                        )
                    })
                }
                Err(e) => Some(format!("its shadow cannot be reached: {e}")),
            }
        } else {
            None
        };
        let _s = tracing::info_span!("offer", id = %offer.id, pid = offer.pid, home = %offer.home, from = %offer.source).entered();
        let refuse = |why: String| {
            tracing::info!(%why, "offer refused");
            Err(MigError::Refused {
                node: self.me(),
                why,
            })
        };
        let here = offer_for(&self.d, "", "", 0, "", 0, Mode::StopCopy);
        if offer.kernel != here.kernel || offer.machine != here.machine {
            return refuse(format!(
                "unlike host: kernel {} {} here, {} {} at {}",
                here.kernel, here.machine, offer.kernel, offer.machine, offer.source
            ));
        }
        if self.d.config.node_entry(&offer.home).is_none() {
            return refuse(format!(
                "its home {:?} is not a node of this cluster",
                offer.home
            ));
        }
        if let Some(why) = going_home_refusal {
            return refuse(why);
        }
        // Not going home: the restorer starts now and builds the home's file view
        // while the source writes the image.
        let restorer = (offer.home != self.me()).then(|| Restorer::start(&self.d, &offer));
        tracing::info!("offer accepted");
        let old = self.d.offers.lock().unwrap().insert(
            offer.id.clone(),
            Offered {
                offer,
                restorer,
                since: std::time::Instant::now(),
            },
        );
        if let Some(Ok(r)) = old.and_then(|o| o.restorer) {
            r.dismiss();
        }
        Ok(())
    }

    async fn restore(
        self,
        _: Context,
        id: String,
        handover: Option<Handover>,
    ) -> MigResult<Running> {
        let Some(Offered {
            offer, restorer, ..
        }) = self.d.offers.lock().unwrap().remove(&id)
        else {
            return Err(self.unknown(&id));
        };
        if offer.home == self.me() {
            // home-proxy's keeper reads the image from the store.
            let span =
                tracing::info_span!("going_home", id = %id, pid = offer.pid, from = %offer.source);
            let manifest = handover.map(|h| h.manifest);
            return restore_home(self.d.clone(), offer, manifest)
                .instrument(span)
                .await;
        }
        let span = tracing::info_span!("restore", id = %id, pid = offer.pid, home = %offer.home, from = %offer.source);
        let restorer = restorer.unwrap_or_else(|| Err("no restorer was started".into()));
        restore(self.d.clone(), offer, restorer, handover)
            .instrument(span)
            .await
    }

    async fn committed(self, _: Context, id: String) -> MigResult<()> {
        let gate = self.d.home_gate.lock().await;
        let homing = self.d.homing.lock().unwrap().remove(&id);
        if let Some(super::Homing { image, .. }) = homing {
            let span = tracing::info_span!("going_home", id = %id);
            let p = self.d.proxy(&self.me()).await?;
            common::fault::point("home-before-commit-home");
            flat(&self.me(), p.commit_home(long_ctx(), id.clone()).await)?;
            common::fault::point("home-after-commit-home");
            span.in_scope(|| tracing::info!("committed: the process runs at home again"));
            remove_image(&self.d, &image);
            return Ok(());
        }
        drop(gate);
        let (restorer, lazy, image, host_pid) = {
            let mut foreign = self.d.foreign.lock().unwrap();
            let rec = foreign.get_mut(&id).ok_or_else(|| self.unknown(&id))?;
            if rec.departing && !rec.committed {
                // Aborted, or dropped past the bound: the copy never ran and is gone.
                return Err(self.unknown(&id));
            }
            (
                rec.restorer.take(),
                rec.lazy,
                rec.image.clone(),
                rec.entry.host_pid,
            )
        };
        if let Some(mut r) = restorer {
            let sent = async {
                r.write_all(b"commit\n").await?;
                r.flush().await
            };
            sent.await.map_err(|e| MigError::Failed {
                node: self.me(),
                why: format!("the copy here did not take the commit (its restorer is gone: {e})"),
            })?;
            if let Some(rec) = self.d.foreign.lock().unwrap().get_mut(&id) {
                rec.committed = true;
            }
            common::fault::point("after-commit");
        }
        released(host_pid).await;
        tracing::info!(id = %id, lazy, "committed");
        if !lazy {
            remove_image(&self.d, &image);
        }
        Ok(())
    }

    async fn abort(self, _: Context, id: String) -> MigResult<()> {
        let offered = self.d.offers.lock().unwrap().remove(&id);
        if let Some(Ok(r)) = offered.and_then(|o| o.restorer) {
            tracing::info!(id = %id, "abort: the restorer ends, nothing was restored");
            r.dismiss();
        }
        if self.d.homing.lock().unwrap().remove(&id).is_some() {
            tracing::warn!(id = %id, "abort: the process goes back to being a shadow");
            let p = self.d.proxy(&self.me()).await?;
            return flat(&self.me(), p.abort_home(long_ctx(), id.clone()).await);
        }
        // Dropping the restorer's input before commit kills the copy's pid namespace.
        let pid = self.d.foreign.lock().unwrap().get_mut(&id).map(|f| {
            f.departing = true;
            f.restorer = None;
            f.entry.host_pid
        });
        if let Some(pid) = pid {
            tracing::info!(id = %id, pid, "abort: killing the restored copy");
            let _ = crate::sys::kill(pid, libc::SIGKILL);
        }
        Ok(())
    }

    async fn runs(self, _: Context, id: String, image: String) -> MigResult<bool> {
        // Committed: it runs here, or ran and has since ended or moved on (the
        // process is past that move either way).
        let here = self
            .d
            .foreign
            .lock()
            .unwrap()
            .get(&id)
            .is_some_and(|f| f.committed && f.image == image);
        let runs = here || self.d.committed_gone.lock().unwrap().contains(&image);
        tracing::info!(id = %id, image = %image, runs, "asked whether the committed copy runs here");
        Ok(runs)
    }

    async fn runs_at_home(self, _: Context, id: String) -> MigResult<bool> {
        let span = tracing::info_span!("going_home", id = %id);
        runs_at_home(&self.d, &id).instrument(span).await
    }

    async fn signal(self, _: Context, id: String, sig: i32) -> MigResult<()> {
        let pid = self
            .d
            .foreign
            .lock()
            .unwrap()
            .get(&id)
            .map(|f| f.entry.host_pid)
            .ok_or_else(|| self.unknown(&id))?;
        tracing::info!(id = %id, pid, sig, "signal from home");
        crate::sys::kill(pid, sig).map_err(|e| MigError::Failed {
            node: self.me(),
            why: format!("kill({pid}, {sig}): {e}"),
        })
    }

    async fn move_to(
        self,
        _: Context,
        id: String,
        dest: String,
        mode: Mode,
    ) -> MigResult<MigrateOutcome> {
        move_on(&self.d, &id, &dest, mode, None).await
    }
}

/// How long a move from here waits for home to count what the process's input
/// pipes hold here (see [`super::relay::RelaySet::pause_input`]).
const RELAY_PAUSE: std::time::Duration = std::time::Duration::from_secs(10);

/// Moves the foreign process of migration `id` running here on to `dest` (its home
/// included: it then goes back into its shadow). On success the copy here is killed
/// without a report home; on failure it runs on here.
pub async fn move_on(
    d: &Arc<Daemon>,
    id: &str,
    dest: &str,
    mode: Mode,
    tx: Option<&super::local::Replies>,
) -> MigResult<MigrateOutcome> {
    let me = d.config.node.clone();
    let Some(entry) = d.foreign.lock().unwrap().get(id).map(|f| f.entry.clone()) else {
        return Err(MigError::Unknown {
            node: me,
            id: id.to_string(),
        });
    };
    if super::settle::pending(d, id) {
        return Err(MigError::Refused {
            node: me,
            why: format!(
                "pid {} is held here until its last move (decided before this migd restarted) is settled; nothing was changed",
                entry.host_pid
            ),
        });
    }
    let span = tracing::info_span!("migration", id = %id, pid = entry.pid, from = %me, to = %dest);
    async {
        let uid = super::owner(entry.host_pid).unwrap_or(0);
        let offer = offer_for(d, id, &entry.home, entry.pid, &entry.comm, uid, mode);
        // No more input from home from now on: what the process has not read yet
        // travels in its image (see `relay`).
        let relays = super::relay::of(d, id);
        if let Some(r) = &relays {
            if let Err(fds) = r.pause_input(RELAY_PAUSE).await {
                r.resume_input();
                return Err(MigError::Failed {
                    node: me.clone(),
                    why: format!(
                        "its home could not be told within {} s how much of its input (fds {fds:?}) it has here; nothing was changed",
                        RELAY_PAUSE.as_secs()
                    ),
                });
            }
        }
        let ready = prepare(d, entry.host_pid, offer, dest, HoldAt::Keeper, tx).await;
        if let (Err(_), Some(r)) = (&ready, &relays) {
            r.resume_input();
        }
        let Ready {
            holder,
            running,
            bytes,
            freeze_ms,
            late_bytes,
            images,
            ..
        } = ready?;
        common::fault::point("mover-after-commit");
        // Commit: the copy here ends without a report home.
        if let Some(f) = d.foreign.lock().unwrap().get_mut(id) {
            f.departing = true;
        }
        let home = dest == entry.home;
        if !home {
            super::settle::tell_moved(d, &entry.home, id, dest, running.host_pid).await;
        }
        let bytes = bytes + super::source::wait_flushed(d, &images, late_bytes, tx).await;
        if let Holder::Keeper(k) = holder {
            k.end("commit-kill").await;
        }
        super::settle::forget(d, id);
        if home {
            // Restored into the shadow at once; the home removes it too, unless
            // its migd died before it could.
            let _ = std::fs::remove_dir_all(&images);
        }
        if let Some(f) = d.foreign.lock().unwrap().remove(id) {
            d.committed_gone.lock().unwrap().insert(f.image);
        }
        tracing::info!(host_pid = running.host_pid, bytes, freeze_ms, "moved on");
        Ok(MigrateOutcome {
            id: id.to_string(),
            host: dest.to_string(),
            host_pid: running.host_pid,
            bytes,
            freeze_ms,
        })
    }
    .instrument(span)
    .await
}

/// Going home: home-proxy restores the image into the shadow (still stopped until
/// `committed`).
async fn restore_home(
    d: Arc<Daemon>,
    offer: MigrationOffer,
    manifest: Option<Vec<u8>>,
) -> MigResult<Running> {
    let me = d.config.node.clone();
    let p = d.proxy(&me).await?;
    let images = d.image_dir(&offer.image).display().to_string();
    let running = flat(
        &me,
        p.restore_into(long_ctx(), offer.id.clone(), images, manifest)
            .await,
    )?;
    common::fault::point("home-after-restore-into");
    tracing::info!(
        pid = running.host_pid,
        restore_ms = running.restore_ms,
        "restored into the shadow"
    );
    d.homing.lock().unwrap().insert(
        offer.id,
        super::Homing {
            image: offer.image,
            since: std::time::Instant::now(),
        },
    );
    Ok(running)
}

/// Restores an offered process under its home's file view (built by `restorer`
/// since the offer) and watches it; `handover` (the source's copy of the manifest
/// and eager pages) goes to the restorer with `restore`.
async fn restore(
    d: Arc<Daemon>,
    offer: MigrationOffer,
    restorer: Result<Restorer, String>,
    handover: Option<Handover>,
) -> MigResult<Running> {
    let me = d.config.node.clone();
    let fail = |why: String| MigError::Failed {
        node: me.clone(),
        why,
    };
    let id = offer.id.clone();
    let mut ph = crate::phases::Phases::new("restore_rpc");
    let records = d.foreign_dir();
    let Restorer {
        mut child,
        stdin: mut restorer,
        mut lines,
        stage,
        socket,
        started,
    } = restorer.map_err(&fail)?;
    let ended = |why: String| {
        let _ = std::fs::remove_dir(&stage);
        let _ = std::fs::remove_file(&socket);
        tracing::warn!(%why, "restore failed");
        fail(why)
    };
    // `ready` (the home's file view is built), normally long before the image.
    // What a restorer that did not say what was expected said instead.
    let why = |line: &str| {
        line.strip_prefix("error ")
            .unwrap_or("the restorer ended without a word")
            .to_string()
    };
    let first = lines.next_line().await.ok().flatten().unwrap_or_default();
    if first != "ready" {
        let _ = child.wait().await;
        return Err(ended(why(&first)));
    }
    ph.mark("restorer ready");
    let go = async {
        let w = restorer.as_mut().ok_or(std::io::ErrorKind::BrokenPipe)?;
        match &handover {
            Some(Handover { manifest, eager }) => {
                let e = eager.as_deref().unwrap_or_default();
                let line = match eager {
                    Some(e) => format!("restore {} {}\n", manifest.len(), e.len()),
                    None => format!("restore {}\n", manifest.len()),
                };
                w.write_all(line.as_bytes()).await?;
                w.write_all(manifest).await?;
                w.write_all(e).await?;
            }
            None => w.write_all(b"restore\n").await?,
        }
        w.flush().await
    };
    if let Err(e) = go.await {
        let _ = child.wait().await;
        return Err(ended(format!("the restorer went away: {e}")));
    }
    let mut first = lines.next_line().await.ok().flatten().unwrap_or_default();
    // The pipes the process writes into whose reader is at home, if any.
    let relays = first.starts_with("relays ").then(|| first.clone());
    if relays.is_some() {
        first = lines.next_line().await.ok().flatten().unwrap_or_default();
    }
    ph.mark("until running");
    let Some(rest) = first.strip_prefix("running ") else {
        let _ = child.wait().await;
        return Err(ended(why(&first)));
    };
    tracing::debug!(
        view_ready_before_ms = started.elapsed().as_secs_f64() * 1e3,
        "restorer started at the offer"
    );
    let mut it = rest.split_whitespace();
    let host_pid: i32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let restore_ms: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    tracing::info!(
        host_pid,
        restore_ms,
        "restored here; held before its first instruction until the source commits"
    );
    let entry = ProcessEntry {
        id: id.clone(),
        pid: offer.pid,
        host_pid,
        comm: offer.comm.clone(),
        home: offer.home.clone(),
        host: me.clone(),
        since: now_secs(),
    };
    let json = serde_json::to_string(&entry).expect("entries serialize");
    // The move's image name, for a restarted migd to remove it once every page is in.
    let _ = std::fs::write(records.join(format!("{id}.image")), &offer.image);
    // Where its relayed pipes are, for a restarted migd to take them again.
    if let Some(r) = &relays {
        let _ = std::fs::write(records.join(format!("{id}.relays")), r);
    }
    if let Err(e) = std::fs::write(records.join(format!("{id}.json")), json) {
        tracing::warn!(error = %e, "cannot record the foreign process; a restarted migd will not know it");
    }
    d.foreign.lock().unwrap().insert(
        id.clone(),
        ForeignRec {
            entry,
            departing: false,
            restorer,
            lazy: offer.mode.lazy(),
            image: offer.image.clone(),
            committed: false,
            restored_at: std::time::Instant::now(),
        },
    );
    tokio::spawn(watch(d.clone(), id, lines, Some(child), relays).in_current_span());
    ph.mark("records");
    ph.log();
    Ok(Running {
        host_pid,
        restore_ms,
    })
}

/// Waits (at most 2 s) until the restorer has let the committed copy `pid` run: its
/// threads leave the restorer's ptrace (the leader last), so that once `committed`
/// returns the copy runs and can be moved on (a keeper's PTRACE_SEIZE of a copy
/// still held fails with EPERM). A copy gone (killed) ends the wait too.
async fn released(pid: i32) {
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(2) {
        let traced = tokio::fs::read_to_string(format!("/proc/{pid}/status"))
            .await
            .ok()
            .and_then(|s| {
                crate::engine::procfs::status_field(&s, "TracerPid").map(|v| v.trim() != "0")
            })
            .unwrap_or(false);
        if !traced {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    tracing::warn!(
        pid,
        "the restorer has not let the committed copy run after 2 s"
    );
}

/// Removes a move's image directory from the store (if still there; "" names none:
/// a foreign process taken back after a restart, whose image name was not kept).
pub(super) fn remove_image(d: &Daemon, image: &str) {
    if image.is_empty() {
        return;
    }
    let dir = d.image_dir(image);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(image, dir = %dir.display(), error = %e, "removing the image from the store")
        }
    }
}

/// The image directory of the foreign process `id`'s move here ("" if unknown).
fn image_of(d: &Daemon, id: &str) -> String {
    d.foreign
        .lock()
        .unwrap()
        .get(id)
        .map(|r| r.image.clone())
        .unwrap_or_default()
}

/// Follows a foreign process's restorer until the process ends, then reports the
/// end home (unless it moved on) and forgets it. `relays`: the restorer's line
/// naming the pipes to relay home (see [`super::relay`]); the end is reported once
/// they are all relayed.
async fn watch(
    d: Arc<Daemon>,
    id: String,
    mut lines: LineSource,
    child: Option<Child>,
    relays: Option<String>,
) {
    if let Some(line) = relays {
        if let Err(e) = super::relay::start(&d, &id, &line) {
            tracing::error!(error = %e, "its pipes to home cannot be relayed; what it writes into them stays at this host");
        }
    }
    let mut status = None;
    while let Ok(Some(l)) = lines.next_line().await {
        if let Some(s) = l.strip_prefix("exit ") {
            status = s.trim().parse::<i32>().ok();
        } else if let Some(p) = l.strip_prefix("paged ") {
            let mut it = p.split_whitespace();
            let bytes: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let ms: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            tracing::info!(
                bytes,
                ms,
                mb_per_s = bytes as f64 / 1e3 / ms.max(0.001),
                "every page is in; nothing depends on the store any more"
            );
            remove_image(&d, &image_of(&d, &id));
        } else if let Some(why) = l.strip_prefix("lost ") {
            tracing::error!(%why, "pages lost: the store stayed away past the bound; the process was killed");
        } else {
            tracing::warn!(line = %l, "restorer");
        }
    }
    // Every byte it wrote reaches home before its end is reported (the relays end
    // once the process and its pid namespace are gone).
    let relayed = d.relays.lock().unwrap().remove(&id);
    if let Some(r) = relayed {
        r.finish().await;
    }
    // A lazily restored process that ended before all its pages were in.
    remove_image(&d, &image_of(&d, &id));
    if let Some(mut c) = child {
        let _ = c.wait().await;
    }
    let _ = std::fs::remove_dir(d.config.migd.state_dir.join("roots").join(&id));
    let records = d.foreign_dir();
    let _ = std::fs::remove_file(records.join(format!("{id}.json")));
    let _ = std::fs::remove_file(records.join(format!("{id}.image")));
    let _ = std::fs::remove_file(records.join(format!("{id}.relays")));
    let _ = std::fs::remove_file(super::helpers::relay_control_path(
        &records.join(format!("{id}.sock")),
    ));
    let _ = std::fs::remove_file(records.join(format!("{id}.sock")));
    let rec = d.foreign.lock().unwrap().remove(&id);
    if let Some(r) = rec.as_ref().filter(|r| r.committed) {
        d.committed_gone.lock().unwrap().insert(r.image.clone());
    }
    let departing = rec.as_ref().map(|r| r.departing).unwrap_or(true);
    match (status, rec) {
        (_, Some(r)) if r.departing => {
            tracing::info!("the copy here ended; it lives on elsewhere")
        }
        (None, _) => tracing::error!("the restorer ended without the process's status"),
        (Some(st), Some(r)) => {
            tracing::info!(status = st, home = %r.entry.home, "the process ended; telling its home");
            report_exit(&d, &r.entry.home, &id, st).await;
        }
        (Some(_), None) => tracing::warn!(departing, "an unknown process ended"),
    }
}

/// Takes back the foreign processes a previous migd of this node was hosting: each
/// restorer waits on its socket for a new peer.
pub async fn adopt_foreign(d: &Arc<Daemon>) {
    let dir = d.foreign_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    // Moves onward a previous migd decided, settled once the copies are back.
    let decisions = super::settle::unsettled(d);
    for e in rd.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let entry: Option<ProcessEntry> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let Some(entry) = entry else { continue };
        let sock = path.with_extension("sock");
        let span =
            tracing::info_span!("foreign", id = %entry.id, pid = entry.pid, home = %entry.home);
        match connect_lines(&sock).await {
            Ok((to, lines)) => {
                span.in_scope(|| {
                    tracing::info!(host_pid = entry.host_pid, "taken back after a restart")
                });
                let id = entry.id.clone();
                // A move onward decided but not settled: its end here is not
                // reported home unless the move is settled as not committed.
                let departing = super::settle::pending(d, &id);
                d.foreign.lock().unwrap().insert(
                    id.clone(),
                    ForeignRec {
                        entry,
                        departing,
                        restorer: None,
                        lazy: false,
                        image: std::fs::read_to_string(path.with_extension("image"))
                            .unwrap_or_default(),
                        committed: true,
                        restored_at: std::time::Instant::now(),
                    },
                );
                let relays = std::fs::read_to_string(path.with_extension("relays")).ok();
                let d = d.clone();
                tokio::spawn(
                    async move {
                        // Our end stays open: the restorer takes a closed one for a
                        // peer gone again.
                        let _to = to;
                        watch(d, id, lines, None, relays).await
                    }
                    .instrument(span),
                );
            }
            Err(err) => {
                span.in_scope(|| tracing::error!(error = %err, "its restorer is gone; its end cannot be reported home"));
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(&sock);
            }
        }
    }
    super::settle::after_restart(d, decisions);
}

/// Gives up the homecomings a previous migd of this node left in flight: a process
/// restored into its shadow (or being restored) waits for a commit that only that
/// migd knew of. Its host's `restore` went unanswered, so it thawed its copy; a
/// host whose `committed` went unanswered asks `runs_at_home`, which gives it up
/// too. A committed homecoming has no shadow left, so nothing committed is
/// touched; home-proxy passes `abort_home` only to shadows on their way home. If
/// home-proxy cannot be asked, its keepers gave their homecomings up themselves
/// when it went away.
pub async fn give_up_homecomings(d: &Daemon) {
    let me = d.config.node.clone();
    let Ok(p) = d.proxy(&me).await else {
        return;
    };
    let shadows = match p.shadows(long_ctx()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "asking home-proxy for its shadows after a restart");
            return;
        }
    };
    for s in shadows {
        if let Err(e) = flat(&me, p.abort_home(long_ctx(), s.id.clone()).await) {
            tracing::warn!(id = %s.id, error = %e, "giving up a homecoming left by a previous migd");
        }
    }
}

/// Going home: whether the process of migration `id` runs here again, for a host
/// whose `committed` went unanswered. home-proxy forgets the shadow at
/// `commit_home`, so a shadow still held means the homecoming was not committed:
/// it is given up now (a process restored into the shadow is made a shadow again,
/// never having run), so that the host may thaw its copy. No shadow: it runs here
/// (or ran, and ended). Errors (home-proxy unreachable) leave the question open.
async fn runs_at_home(d: &Daemon, id: &str) -> MigResult<bool> {
    let me = d.config.node.clone();
    let p = d.proxy(&me).await?;
    let _gate = d.home_gate.lock().await;
    let restored = d.homing.lock().unwrap().remove(id);
    let shadow = restored.is_some()
        || p.shadows(long_ctx())
            .await
            .map_err(|e| MigError::Failed {
                node: me.clone(),
                why: format!("asking home-proxy for its shadows: {e}"),
            })?
            .iter()
            .any(|s| s.id == id);
    if shadow {
        tracing::warn!("asked whether it runs here: not committed; the homecoming is given up");
        flat(&me, p.abort_home(long_ctx(), id.to_string()).await)?;
    } else {
        tracing::info!("asked whether it runs here: no shadow is left, it does");
    }
    Ok(!shadow)
}

/// Drops migrations in flight to this node that their source left waiting past
/// `migd.offer_bound_secs` (the source's migd died, or never came back): accepted
/// offers (their restorer ends, nothing was restored), copies restored but not
/// committed (killed: they never ran), processes restored into their shadow but
/// not committed (shadows again). A committed copy is never touched. Runs for the
/// daemon's life, checking every second.
pub async fn drop_stale(d: Arc<Daemon>) {
    let bound = std::time::Duration::from_secs(d.config.migd.offer_bound_secs);
    let why = format!(
        "its source said nothing more within migd.offer_bound_secs ({} s)",
        bound.as_secs()
    );
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let offers: Vec<(String, Offered)> = d
            .offers
            .lock()
            .unwrap()
            .extract_if(|_, o| o.since.elapsed() > bound)
            .collect();
        for (_, o) in offers {
            tracing::warn!(id = %o.offer.id, from = %o.offer.source, %why, "offer dropped: nothing was restored");
            if let Some(Ok(r)) = o.restorer {
                r.dismiss();
            }
        }
        let copies: Vec<(String, i32)> = d
            .foreign
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|(_, f)| {
                f.restorer.is_some() && !f.departing && f.restored_at.elapsed() > bound
            })
            .map(|(id, f)| {
                // The restorer's input closes: it kills the copy, held before its
                // first instruction (`committed` now finds it departing).
                f.departing = true;
                f.restorer = None;
                (id.clone(), f.entry.host_pid)
            })
            .collect();
        for (id, pid) in copies {
            tracing::warn!(id = %id, pid, %why, "restored copy dropped before its commit: killed, it never ran");
            let _ = crate::sys::kill(pid, libc::SIGKILL);
        }
        let homing: Vec<(String, super::Homing)> = d
            .homing
            .lock()
            .unwrap()
            .extract_if(|_, h| h.since.elapsed() > bound)
            .collect();
        for (id, super::Homing { image, .. }) in homing {
            tracing::warn!(id = %id, %why, "homecoming dropped before its commit: the process is a shadow again");
            match d.proxy(&d.config.node).await {
                Ok(p) => {
                    if let Err(e) = flat(&d.config.node, p.abort_home(long_ctx(), id.clone()).await)
                    {
                        tracing::error!(id = %id, error = %e, "home-proxy did not take the abort of the homecoming");
                    }
                }
                Err(e) => {
                    tracing::error!(id = %id, error = %e, "home-proxy did not take the abort of the homecoming")
                }
            }
            remove_image(&d, &image);
        }
    }
}

async fn report_exit(d: &Daemon, home: &str, id: &str, status: i32) {
    for attempt in 0..30 {
        let r = match d.proxy(home).await {
            Ok(p) => flat(home, p.exited(long_ctx(), id.to_string(), status).await),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(attempt, error = %e, "reporting the exit home");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
    tracing::error!(%home, id, status, "the exit status could not be reported home");
}

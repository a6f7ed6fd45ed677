//! Settling a commit whose answer may be lost: a source that told the destination
//! `committed` does not know whether the destination took it if no answer came (the
//! destination's migd died), or if the source's own migd died meanwhile. Either way
//! the original stays frozen — thawing it on a guess could leave two copies
//! running, killing it could leave none — until the destination says whether its
//! copy runs ([`copy_runs`], asked as long as it takes).
//!
//! A foreign process moving on is held by a keeper of this migd, so a dead migd must
//! find the decision again: before `committed` goes out it writes a [`Decision`]
//! (`<state_dir>/foreign/<id>.decided`, fsynced) and tells its keeper `decided`
//! (the keeper then holds the old copy at the end of its input and waits on
//! `<id>.keeper.sock`). A restarted migd ([`after_restart`]) asks the destination,
//! then tells the keeper `commit-kill` (and home-proxy where the process runs now)
//! or `abort` (the old copy thaws).

use super::keeper::Keeper;
use super::local::Replies;
use super::{flat, long_ctx, Daemon};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// How often a source whose `committed` went unanswered asks the destination again.
const ASK_EVERY: Duration = Duration::from_millis(500);

/// A move onward decided here: kept until the old copy here is killed or thawed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The migration id (the process's, for its whole life away from home).
    pub id: String,
    /// Its home (told where it runs once the move is settled as committed).
    pub home: String,
    /// Where the new copy was restored (the home itself: going home).
    pub dest: String,
    /// The new copy's pid at `dest`.
    pub host_pid: i32,
    /// The move's image directory under the store's `migrations/`.
    pub image: String,
}

/// Where the decision of migration `id`'s move is recorded.
pub fn record_path(d: &Daemon, id: &str) -> PathBuf {
    d.foreign_dir().join(format!("{id}.decided"))
}

/// Where the keeper holding migration `id`'s old copy waits for a restarted migd.
pub fn keeper_socket(d: &Daemon, id: &str) -> PathBuf {
    d.foreign_dir().join(format!("{id}.keeper.sock"))
}

/// Whether a move of migration `id` from here is decided but not settled yet.
pub fn pending(d: &Daemon, id: &str) -> bool {
    record_path(d, id).exists()
}

/// Records `dec` durably (written, fsynced, renamed into place, the directory
/// fsynced): it must survive this migd, and the node, before `committed` goes out.
pub fn record(d: &Daemon, dec: &Decision) -> std::io::Result<()> {
    let path = record_path(d, &dec.id);
    let tmp = path.with_extension("decided-tmp");
    let json = serde_json::to_vec(dec).expect("decisions serialize");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(d.foreign_dir())?.sync_all()
}

/// Forgets the decision of migration `id` (its record and the keeper's socket).
pub fn forget(d: &Daemon, id: &str) {
    let _ = std::fs::remove_file(record_path(d, id));
    let _ = std::fs::remove_file(keeper_socket(d, id));
}

/// Asks `dest` whether the copy of migration `id` (this move's `image`) runs there
/// — going home (`dest` is `home`), whether it runs at home again — until it
/// answers, every 500 ms; says every 10 s that the process stays frozen meanwhile
/// (`why`: what left the commit unsettled).
pub async fn copy_runs(
    d: &Daemon,
    dest: &str,
    home: &str,
    id: &str,
    image: &str,
    why: &str,
    tx: Option<&Replies>,
) -> bool {
    let t0 = Instant::now();
    let mut said = Duration::ZERO;
    loop {
        let answer = match d.peer(dest).await {
            Ok(p) if dest == home => flat(dest, p.runs_at_home(long_ctx(), id.to_string()).await),
            Ok(p) => flat(
                dest,
                p.runs(long_ctx(), id.to_string(), image.to_string()).await,
            ),
            Err(e) => Err(e),
        };
        match answer {
            Ok(runs) => {
                tracing::info!(runs, "{dest} said whether its copy runs");
                return runs;
            }
            Err(ask) => {
                if t0.elapsed() >= said {
                    said += Duration::from_secs(10);
                    let msg = format!(
                        "{why}; the process stays frozen here until {dest} says whether its \
                         copy runs ({ask})"
                    );
                    tracing::warn!(%msg, "waiting for the destination");
                    super::source::progress(tx, msg, 0);
                }
                tokio::time::sleep(ASK_EVERY).await;
            }
        }
    }
}

/// Tells the process's home (home-proxy) that it runs at `host` now, trying for
/// about 30 s.
pub async fn tell_moved(d: &Daemon, home: &str, id: &str, host: &str, host_pid: i32) {
    for attempt in 0..30 {
        let r = match d.proxy(home).await {
            Ok(p) => flat(
                home,
                p.moved(long_ctx(), id.to_string(), host.to_string(), host_pid)
                    .await,
            ),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(attempt, error = %e, "telling home-proxy where the process went");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    tracing::error!(%home, id, %host, "home-proxy could not be told where the process runs now; signals sent at home will not reach it");
}

/// The decisions a previous migd of this node recorded and did not settle.
pub fn unsettled(d: &Daemon) -> Vec<Decision> {
    let Ok(rd) = std::fs::read_dir(d.foreign_dir()) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "decided"))
        .filter_map(|p| {
            let dec = std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| serde_json::from_str::<Decision>(&t).ok());
            if dec.is_none() {
                tracing::error!(record = %p.display(), "an unreadable decision record; left in place");
            }
            dec
        })
        .collect()
}

/// Settles each decision a previous migd left (one task each: it may take as
/// long as the destination takes to answer).
pub fn after_restart(d: &Arc<Daemon>, decisions: Vec<Decision>) {
    for dec in decisions {
        let span = tracing::info_span!("settle", id = %dec.id, to = %dec.dest, home = %dec.home);
        tokio::spawn(settle(d.clone(), dec).instrument(span));
    }
}

/// Settles one move a previous migd decided: asks the destination, then has the
/// keeper kill the old copy (and tells home-proxy where the process runs) or thaw
/// it (and the destination aborts).
async fn settle(d: Arc<Daemon>, dec: Decision) {
    let keeper = match Keeper::adopt(&keeper_socket(&d, &dec.id)).await {
        Ok(k) => Some(k),
        Err(e) => {
            // It ended the old copy (commit-kill) before we died, or thawed it
            // because `decided` never reached it (then nothing was committed).
            tracing::warn!(error = %e, "the old copy's keeper is gone");
            None
        }
    };
    tracing::info!("a move decided before this migd restarted: asking the destination");
    let runs = copy_runs(
        &d,
        &dec.dest,
        &dec.home,
        &dec.id,
        &dec.image,
        "this migd restarted during the commit of a move",
        None,
    )
    .await;
    if runs {
        tracing::info!("committed: the old copy here is killed");
        if let Some(f) = d.foreign.lock().unwrap().get_mut(&dec.id) {
            f.departing = true;
        }
        if let Some(k) = keeper {
            k.send("commit-kill");
            let mut k = k;
            k.wait().await;
        }
        if dec.dest == dec.home {
            // Home again: its image was restored into the shadow at once.
            super::host::remove_image(&d, &dec.image);
        } else {
            tell_moved(&d, &dec.home, &dec.id, &dec.dest, dec.host_pid).await;
        }
    } else {
        tracing::warn!("not committed: the old copy here thaws");
        if let Ok(p) = d.peer(&dec.dest).await {
            let _ = p.abort(long_ctx(), dec.id.clone()).await;
        }
        if let Some(k) = keeper {
            k.send("abort");
            let mut k = k;
            k.wait().await;
        }
        if let Some(f) = d.foreign.lock().unwrap().get_mut(&dec.id) {
            f.departing = false;
        }
        super::host::remove_image(&d, &dec.image);
    }
    forget(&d, &dec.id);
}

#[cfg(test)]
mod tests {
    use super::Decision;

    #[test]
    fn a_decision_record_reads_back() {
        let dec = Decision {
            id: "ws1-1-1".into(),
            home: "ws1".into(),
            dest: "ws3".into(),
            host_pid: 42,
            image: "ws2-2-1".into(),
        };
        let json = serde_json::to_string(&dec).unwrap();
        assert_eq!(serde_json::from_str::<Decision>(&json).unwrap(), dec);
    }
}

//! home-proxy: the home side of migrated processes.
//!
//! It owns the shadows: when a process leaves its home, migd asks home-proxy to
//! `hold` it (a keeper process, `migrate internal-keep`, freezes it and writes its
//! image into the store), then to `commit` (the frozen original becomes the shadow:
//! same pid, parent and fds) or `abort` (thaw it where it was). Signals sent to a
//! shadow are taken out of its queue by the keeper and forwarded here to the host's
//! migd ([`common::migproto::MigdService::signal`]); when the host reports the
//! process's end (`exited`), the keeper makes the shadow exit with the same status or
//! die of the same signal, so the parent's wait() sees the truth.
//!
//! Pipes whose other end is here stay here: the host relays what the process
//! writes into them (`output`) and reads from them (`input`), and [`pipes`] writes
//! into and reads from the shadow's own pipes.
//!
//! Going home (`restore_into`, `commit_home`, `abort_home`, asked by this node's
//! migd): the shadow's keeper restores the image into the shadow itself (same pid,
//! same parent), holds it stopped until the commit, then lets it run and exits;
//! the shadow is forgotten (record and listing). On failure it stays a shadow.
//!
//! It serves `common::migproto::ProxyService` on `ports.proxy`; it talks to migd
//! (its own node's and the hosts') over `common::migproto::MigdService`. State is in
//! files: each shadow has `<migd.state_dir>/shadows/<id>.json` (its listing entry) and
//! its keeper's socket `<id>.sock`. The keepers are separate processes: if home-proxy
//! dies, each shadow stays frozen (signals sent to it wait queued in it), and a
//! restarted home-proxy takes the keepers back through their sockets.

use common::auth::ClusterKey;
use common::config::NodeConfig;
use common::migproto::{
    HeldImage, HoldPlan, Input, InputAsk, MigError, MigResult, MigdServiceClient, Output,
    OutputChunk, ProcessEntry, ProxyService, Running,
};
use migd::daemon::keeper::Keeper;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tarpc::context::Context;
use tarpc::server::Channel;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

mod pipes;

/// Why home-proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Key(#[from] common::auth::KeyError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A shadow: the frozen original of a process running elsewhere.
struct Shadow {
    entry: ProcessEntry,
    keeper: mpsc::UnboundedSender<String>,
    /// Going home: where the keeper's answer to `restore` goes.
    reply: Option<oneshot::Sender<String>>,
    /// On its way home: from `restore_into` until its commit or abort (or a
    /// failed restore); only then does `abort_home` reach the keeper.
    homing: bool,
}

/// Everything the connections share.
pub struct Proxy {
    config: NodeConfig,
    key: ClusterKey,
    helper_exe: PathBuf,
    /// Held before commit.
    held: Mutex<HashMap<String, Keeper>>,
    /// Held originals whose move is decided: (pid, host), for output relayed from
    /// the host before the commit reaches us.
    decided: Mutex<HashMap<String, (i32, String)>>,
    shadows: Mutex<HashMap<String, Shadow>>,
    /// How far the relayed pipes got (see [`pipes`]).
    streams: pipes::Streams,
}

impl Proxy {
    /// Where the shadows' records and keeper sockets are.
    fn dir(&self) -> PathBuf {
        self.config.migd.state_dir.join("shadows")
    }

    /// Writes a shadow's record (what a restarted home-proxy starts from).
    fn record(&self, entry: &ProcessEntry) {
        let path = self.dir().join(format!("{}.json", entry.id));
        let json = serde_json::to_string(entry).expect("entries serialize");
        if let Err(e) = std::fs::write(&path, json) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record a shadow; a restarted home-proxy will not find it");
        }
    }

    /// Takes back the shadows of a previous home-proxy through their keepers' sockets.
    async fn adopt(self: &Arc<Self>) {
        let Ok(rd) = std::fs::read_dir(self.dir()) else {
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let entry: Option<ProcessEntry> = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            let Some(entry) = entry else { continue };
            let span =
                tracing::info_span!("shadow", id = %entry.id, pid = entry.pid, host = %entry.host);
            match Keeper::adopt(&path.with_extension("sock")).await {
                Ok(keeper) => {
                    span.in_scope(|| tracing::info!("taken back after a restart"));
                    let id = entry.id.clone();
                    self.shadows.lock().unwrap().insert(
                        id.clone(),
                        Shadow {
                            entry,
                            keeper: keeper.to.clone(),
                            reply: None,
                            // A keeper whose peer went away gave any homecoming up.
                            homing: false,
                        },
                    );
                    tokio::spawn(watch(self.clone(), id, keeper).instrument(span));
                }
                Err(err) => {
                    span.in_scope(|| tracing::error!(error = %err, "its keeper is gone; forgetting the shadow"));
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(path.with_extension("sock"));
                }
            }
        }
    }
}

/// Runs home-proxy for `config` until SIGTERM or SIGINT.
pub async fn run(config: NodeConfig) -> Result<(), StartError> {
    let addr = config.proxy_addr(config.me());
    let listener = common::transport::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    serve(config, listener, common::shutdown::signal()).await
}

/// Serves [`ProxyService`] on `listener` until `shutdown` completes. Shadows stay
/// frozen in their keepers after home-proxy stops.
pub async fn serve(
    config: NodeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let key = config.load_key()?;
    let helper_exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("migrate")))
        .unwrap_or_else(|| PathBuf::from("migrate"));
    let p = Arc::new(Proxy {
        config,
        key,
        helper_exe,
        held: Mutex::new(HashMap::new()),
        shadows: Mutex::new(HashMap::new()),
        decided: Mutex::new(HashMap::new()),
        streams: Default::default(),
    });
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, node = %p.config.node, "home-proxy listening");
    }
    p.adopt().await;
    let conn_p = p.clone();
    common::transport::serve_authenticated(
        listener,
        p.key.clone(),
        p.config.node.clone(),
        |peer_addr| tracing::info_span!("proxy_conn", peer = %peer_addr),
        move |channel, peer| {
            let p = conn_p.clone();
            channel.execute(Conn { p, peer }.serve())
        },
        shutdown,
    )
    .await;
    tracing::info!(
        shadows = p.shadows.lock().unwrap().len(),
        "home-proxy stopped; shadows stay frozen in their keepers"
    );
    Ok(())
}

/// One authenticated connection.
#[derive(Clone)]
struct Conn {
    p: Arc<Proxy>,
    peer: String,
}

impl Conn {
    fn unknown(&self, id: &str) -> MigError {
        MigError::Unknown {
            node: self.p.config.node.clone(),
            id: id.to_string(),
        }
    }
}

impl Conn {
    /// The pid here of migration `id`'s process (its shadow, or before the commit
    /// reached us, the original held for it), if the caller is the node it runs
    /// at now: only that node may relay its pipes.
    fn pid_for_its_host(&self, id: &str) -> MigResult<i32> {
        let shadow = self
            .p
            .shadows
            .lock()
            .unwrap()
            .get(id)
            .map(|s| (s.entry.pid, s.entry.host.clone()));
        let (pid, host) = shadow
            .or_else(|| self.p.decided.lock().unwrap().get(id).cloned())
            .ok_or_else(|| self.unknown(id))?;
        if host != self.peer {
            return Err(MigError::Refused {
                node: self.p.config.node.clone(),
                why: format!(
                    "{id} runs at {host}, not at {}: its pipes are relayed from there only",
                    self.peer
                ),
            });
        }
        Ok(pid)
    }
}

impl ProxyService for Conn {
    async fn hold(
        self,
        _: Context,
        id: String,
        pid: i32,
        images: String,
        plan: HoldPlan,
    ) -> MigResult<HeldImage> {
        if self.peer != self.p.config.node {
            return Err(MigError::Refused {
                node: self.p.config.node.clone(),
                why: format!(
                    "only this node's migd may ask to hold a process, not {}",
                    self.peer
                ),
            });
        }
        let dir = self.p.dir();
        std::fs::create_dir_all(&dir).map_err(|e| MigError::Failed {
            node: self.p.config.node.clone(),
            why: format!("cannot create {}: {e}", dir.display()),
        })?;
        let sock = dir.join(format!("{id}.sock"));
        let (keeper, dumped) = Keeper::start(
            &self.p.helper_exe,
            pid,
            Path::new(&images),
            false,
            Some(&sock),
            None,
            plan,
        )
        .await
        .map_err(|why| MigError::Refused {
            node: self.p.config.node.clone(),
            why,
        })?;
        tracing::info!(id = %id, pid, bytes = dumped.bytes, dump_ms = dumped.dump_ms, rounds = dumped.rounds, "held frozen");
        self.p.held.lock().unwrap().insert(id, keeper);
        Ok(HeldImage {
            bytes: dumped.bytes,
            dump_ms: dumped.dump_ms,
            rounds: dumped.rounds,
            late_bytes: dumped.late_bytes,
            handover: dumped.handover,
        })
    }

    async fn decided(self, _: Context, id: String, entry: ProcessEntry) -> MigResult<()> {
        // Out of the map while it answers (the lock is not held across the wait).
        // The keeper's word that the image is faithful comes first (see
        // `Keeper::checked`); the source aborts if it does not.
        let mut keeper = self
            .p
            .held
            .lock()
            .unwrap()
            .remove(&id)
            .ok_or_else(|| self.unknown(&id))?;
        let took = match keeper.checked().await {
            Ok(()) => keeper.decided().await,
            Err(e) => Err(e),
        };
        self.p.held.lock().unwrap().insert(id.clone(), keeper);
        took.map_err(|why| MigError::Failed {
            node: self.p.config.node.clone(),
            why,
        })?;
        self.p.record(&entry);
        self.p
            .decided
            .lock()
            .unwrap()
            .insert(id.clone(), (entry.pid, entry.host.clone()));
        tracing::info!(id = %id, host = %entry.host, "decided: the original never thaws on its own now");
        Ok(())
    }

    async fn commit(self, _: Context, id: String, entry: ProcessEntry) -> MigResult<()> {
        common::fault::point("proxy-before-commit");
        let keeper = self
            .p
            .held
            .lock()
            .unwrap()
            .remove(&id)
            .ok_or_else(|| self.unknown(&id))?;
        let span = tracing::info_span!("shadow", id = %id, pid = entry.pid, host = %entry.host);
        span.in_scope(|| tracing::info!("committed: the original is the shadow now"));
        keeper.send("commit-shadow");
        self.p.decided.lock().unwrap().remove(&id);
        self.p.record(&entry);
        self.p.shadows.lock().unwrap().insert(
            id.clone(),
            Shadow {
                entry,
                keeper: keeper.to.clone(),
                reply: None,
                homing: false,
            },
        );
        tokio::spawn(watch(self.p.clone(), id, keeper).instrument(span));
        Ok(())
    }

    async fn abort(self, _: Context, id: String) -> MigResult<()> {
        let keeper = self.p.held.lock().unwrap().remove(&id);
        match keeper {
            Some(k) => {
                tracing::info!(id = %id, "abort: thawing the original");
                self.p.decided.lock().unwrap().remove(&id);
                // The record `decided` may have written goes with it.
                let _ = std::fs::remove_file(self.p.dir().join(format!("{id}.json")));
                k.end("abort").await;
                Ok(())
            }
            None => Err(self.unknown(&id)),
        }
    }

    async fn moved(self, _: Context, id: String, host: String, host_pid: i32) -> MigResult<()> {
        let mut s = self.p.shadows.lock().unwrap();
        let rec = s.get_mut(&id).ok_or_else(|| self.unknown(&id))?;
        tracing::info!(id = %id, from = %rec.entry.host, to = %host, "the process moved on");
        rec.entry.host = host;
        rec.entry.host_pid = host_pid;
        rec.entry.since = migd::daemon::now_secs();
        self.p.record(&rec.entry);
        Ok(())
    }

    async fn output(self, _: Context, chunk: OutputChunk) -> MigResult<Output> {
        let me = self.p.config.node.clone();
        let pid = self.pid_for_its_host(&chunk.id)?;
        let p = self.p.clone();
        let fd = chunk.fd;
        let r = tokio::task::spawn_blocking(move || p.streams.write(pid, &chunk))
            .await
            .map_err(|e| format!("the writer panicked: {e}"))
            .and_then(|r| r);
        if let Ok(Output::ReaderGone) = r {
            tracing::info!(pid, fd, from = %self.peer, "relayed output: nobody reads that pipe here any more");
        }
        r.map_err(|why| MigError::Failed { node: me, why })
    }

    async fn input(self, _: Context, ask: InputAsk) -> MigResult<Input> {
        let me = self.p.config.node.clone();
        let pid = self.pid_for_its_host(&ask.id)?;
        let p = self.p.clone();
        tokio::task::spawn_blocking(move || p.streams.read(pid, &ask))
            .await
            .map_err(|e| format!("the reader panicked: {e}"))
            .and_then(|r| r)
            .map_err(|why| MigError::Failed { node: me, why })
    }

    async fn exited(self, _: Context, id: String, status: i32) -> MigResult<()> {
        let line = format!("exit {status}");
        if let Some(s) = self.p.shadows.lock().unwrap().get(&id) {
            tracing::info!(id = %id, status, from = %self.peer, "the process ended; ending its shadow alike");
            let _ = s.keeper.send(line);
            return Ok(());
        }
        // It ended before the commit reached us: the keeper commits and ends it.
        if let Some(k) = self.p.held.lock().unwrap().get(&id) {
            tracing::info!(id = %id, status, "the process ended before commit; ending its shadow alike");
            k.send(&line);
            return Ok(());
        }
        Err(self.unknown(&id))
    }

    async fn shadows(self, _: Context) -> Vec<ProcessEntry> {
        self.p
            .shadows
            .lock()
            .unwrap()
            .values()
            .map(|s| s.entry.clone())
            .collect()
    }

    async fn restore_into(
        self,
        _: Context,
        id: String,
        images: String,
        manifest: Option<Vec<u8>>,
    ) -> MigResult<Running> {
        let me = self.p.config.node.clone();
        if self.peer != me {
            return Err(MigError::Refused {
                node: me,
                why: format!(
                    "only this node's migd may bring a process home, not {}",
                    self.peer
                ),
            });
        }
        let (tx, rx) = oneshot::channel();
        let pid = {
            let mut s = self.p.shadows.lock().unwrap();
            let rec = s.get_mut(&id).ok_or_else(|| self.unknown(&id))?;
            if rec.reply.is_some() {
                return Err(MigError::Refused {
                    node: me,
                    why: format!("pid {} is already on its way home", rec.entry.pid),
                });
            }
            rec.reply = Some(tx);
            rec.homing = true;
            // `restore <manifest hex, or -> <dir>`.
            let hex = manifest
                .as_deref()
                .map_or("-".into(), migd::daemon::keeper::to_hex);
            let _ = rec.keeper.send(format!("restore {hex} {images}"));
            rec.entry.pid
        };
        let span = tracing::info_span!("going_home", id = %id, pid);
        span.in_scope(|| tracing::info!(%images, "restoring into the shadow"));
        let line = tokio::time::timeout(migd::daemon::LONG_CALL, rx).await;
        if let Some(rec) = self.p.shadows.lock().unwrap().get_mut(&id) {
            rec.reply = None;
        }
        let failed = |why: String| MigError::Failed {
            node: me.clone(),
            why,
        };
        let line = match line {
            Ok(Ok(l)) => l,
            Ok(Err(_)) => {
                return Err(failed(format!(
                    "the keeper of shadow pid {pid} ended without an answer"
                )))
            }
            Err(_) => {
                return Err(failed(format!(
                    "the keeper of shadow pid {pid} did not answer in time"
                )))
            }
        };
        if let Some(rest) = line.strip_prefix("running ") {
            let mut it = rest.split_whitespace();
            let host_pid = it.next().and_then(|v| v.parse().ok()).unwrap_or(pid);
            let restore_ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            span.in_scope(|| tracing::info!(restore_ms, "restored into the shadow"));
            return Ok(Running {
                host_pid,
                restore_ms,
            });
        }
        let why = line
            .strip_prefix("restore-failed ")
            .unwrap_or(&line)
            .to_string();
        if let Some(rec) = self.p.shadows.lock().unwrap().get_mut(&id) {
            rec.homing = false;
        }
        span.in_scope(|| tracing::warn!(%why, "restore into the shadow failed"));
        Err(failed(why))
    }

    async fn commit_home(self, _: Context, id: String) -> MigResult<()> {
        let rec = {
            let mut s = self.p.shadows.lock().unwrap();
            let rec = s.get(&id).ok_or_else(|| self.unknown(&id))?;
            if !rec.homing {
                // Not restored into, or given up meanwhile: a home-proxy restarted
                // since `restore_into` (its keeper, left alone, made the process a
                // shadow again). Committing would end a shadow that is no process.
                return Err(MigError::Failed {
                    node: self.p.config.node.clone(),
                    why: format!(
                        "pid {} is not on its way home (its homecoming was given up); it is still a shadow",
                        rec.entry.pid
                    ),
                });
            }
            s.remove(&id).expect("looked up above")
        };
        tracing::info!(id = %id, pid = rec.entry.pid, "home again: the shadow is the process now");
        rec.keeper
            .send("commit-home".into())
            .map_err(|_| MigError::Failed {
                node: self.p.config.node.clone(),
                why: format!("the keeper of pid {} is gone", rec.entry.pid),
            })?;
        let _ = std::fs::remove_file(self.p.dir().join(format!("{id}.json")));
        Ok(())
    }

    async fn abort_home(self, _: Context, id: String) -> MigResult<()> {
        let mut s = self.p.shadows.lock().unwrap();
        let rec = s.get_mut(&id).ok_or_else(|| self.unknown(&id))?;
        if !rec.homing {
            tracing::debug!(id = %id, "abort_home: not on its way home; nothing to give up");
            return Ok(());
        }
        rec.homing = false;
        tracing::warn!(id = %id, pid = rec.entry.pid, "going home given up; back to a shadow");
        let _ = rec.keeper.send("abort-home".into());
        Ok(())
    }
}

/// Follows a shadow's keeper: forwards the signals sent to the shadow to wherever the
/// process runs; forgets the shadow when the keeper ends.
async fn watch(p: Arc<Proxy>, id: String, mut keeper: Keeper) {
    while let Ok(Some(line)) = keeper.lines.next_line().await {
        if line.starts_with("running ") || line.starts_with("restore-failed ") {
            let reply = p
                .shadows
                .lock()
                .unwrap()
                .get_mut(&id)
                .and_then(|s| s.reply.take());
            match reply {
                Some(r) => {
                    let _ = r.send(line);
                }
                None => tracing::warn!(%line, "keeper answered a restore nobody waits for"),
            }
            continue;
        }
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
        let host = p
            .shadows
            .lock()
            .unwrap()
            .get(&id)
            .map(|s| s.entry.host.clone());
        let Some(host) = host else { break };
        tracing::info!(sig, %host, "forwarding a signal sent to the shadow");
        if let Err(e) = signal_host(&p, &host, &id, sig).await {
            tracing::warn!(sig, %host, error = %e, "signal not forwarded");
        }
    }
    keeper.wait().await;
    p.shadows.lock().unwrap().remove(&id);
    p.streams.forget(&id);
    let _ = std::fs::remove_file(p.dir().join(format!("{id}.json")));
    tracing::info!("shadow ended");
}

async fn signal_host(p: &Proxy, host: &str, id: &str, sig: i32) -> Result<(), MigError> {
    let failed = |why: String| MigError::Failed {
        node: host.to_string(),
        why,
    };
    let entry = p
        .config
        .node_entry(host)
        .ok_or_else(|| failed("not a node of this cluster".into()))?;
    let (t, _) = common::transport::connect(
        p.config.migd_addr(entry),
        &p.key,
        &p.config.node,
        common::transport::DEFAULT_MAX_FRAME,
    )
    .await
    .map_err(|e| failed(format!("its migd cannot be reached: {e}")))?;
    let c = MigdServiceClient::new(tarpc::client::Config::default(), t).spawn();
    match c
        .signal(tarpc::context::current(), id.to_string(), sig)
        .await
    {
        Ok(r) => r,
        Err(e) => Err(failed(format!("the call failed: {e}"))),
    }
}

//! The migration protocol: what migd asks of another node's migd, what it asks of its
//! own node's home-proxy, and what the host of a migrated process tells its home.
//!
//! Two services over [`crate::transport`] (cluster-key handshake, capped bincode
//! frames): [`MigdService`] on `ports.migd` and [`ProxyService`] (home-proxy) on
//! `ports.proxy`. Calls a migration from home makes, in order (stop-copy):
//!
//! ```text
//! home migd              home-proxy            destination migd
//!   offer(MigrationOffer) ------------------->  accept or refuse
//!   hold(id, pid, dir) ->  freeze, dump into /.../store/migrations/<id>/, keep frozen
//!   restore(id) ----------------------------->  restore under /.../<home>/, runs
//!   commit(id, entry)  ->  the original becomes the shadow
//!   committed(id) --------------------------->  forget the store image
//!                          ...
//!                          signal(id, sig) -->  deliver to the process (MigdService)
//!                          output(chunk) <--  what it wrote to a pipe at home (ProxyService)
//!                          input(ask) <------  what home wrote to a pipe it reads
//!                          exited(id, st) <---  the process ended (ProxyService)
//! ```
//!
//! A pipe whose reader stayed at home is relayed: the process writes into a pipe at
//! its host, the host's migd reads it and sends the bytes home ([`OutputChunk`]),
//! and home-proxy writes them into the shadow's own fd (docs/migration.md, "Pipes").
//!
//! Any failure before commit: `abort` to both; the original is thawed where it was.
//! A move onward (`move_to`, asked by home's migd of the host) runs the same steps
//! with the host's migd holding the copy, which it kills at commit. Going home is a
//! move onward whose destination is the home: home's migd answers `restore` by asking
//! home-proxy to `restore_into` the shadow, `committed` with `commit_home` and
//! `abort` with `abort_home`.
//!
//! The local `migrate` command speaks [`LocalRequest`]/[`LocalReply`] to its node's
//! migd as JSON lines on the unix socket `migd.socket`; migd checks the caller's
//! credentials with SO_PEERCRED.

use serde::{Deserialize, Serialize};

/// How pages move (docs/migration.md, "Modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Freeze, flush every page, restore every page, run.
    StopCopy,
    /// Pre-copy rounds while the process runs, then a short freeze that flushes the
    /// rest; the destination restores every page before the process runs.
    Precopy,
    /// Freeze and flush; the destination runs the process at once and its pages
    /// fault in from the store (with read-ahead and background prefetch).
    Lazy,
    /// The default: pre-copy rounds, a short freeze, then lazy fault-in.
    PrecopyLazy,
}

impl Mode {
    /// Whether the source writes pages in rounds while the process runs.
    pub fn precopies(self) -> bool {
        matches!(self, Mode::Precopy | Mode::PrecopyLazy)
    }

    /// Whether the destination runs the process before its pages are in.
    pub fn lazy(self) -> bool {
        matches!(self, Mode::Lazy | Mode::PrecopyLazy)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::StopCopy => "stop-copy",
            Mode::Precopy => "precopy",
            Mode::Lazy => "lazy",
            Mode::PrecopyLazy => "precopy+lazy",
        })
    }
}

/// When pre-copy stops its rounds (from the source node's `[migd]` config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrecopyPlan {
    pub max_rounds: u32,
    pub stop_below_bytes: u64,
    pub throttle_max_percent: u32,
}

/// How a held process's image is written (from the mode and the source node's
/// `[migd]` config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldPlan {
    /// Pre-copy rounds while the process runs.
    pub precopy: Option<PrecopyPlan>,
    /// Lazy: pages served on demand are written after the freeze, the destination
    /// running meanwhile; the store may stay unwritable this many seconds.
    pub late_bound_secs: Option<u64>,
}

/// What the source proposes to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationOffer {
    /// Cluster-unique id of the migrated process (`<home>-<ms>-<n>`), kept for its
    /// whole life away from home.
    pub id: String,
    /// This move's image directory under the store's `migrations/`, unique per move
    /// (a process moving on quickly must not share it with its previous move, whose
    /// destination removes its own image once every page is in).
    pub image: String,
    /// The process's home node (where its shadow is).
    pub home: String,
    /// Its pid at home (the pid it sees).
    pub pid: i32,
    /// Its command name (for listings).
    pub comm: String,
    /// The node it leaves.
    pub source: String,
    /// Its owner's uid.
    pub uid: u32,
    pub mode: Mode,
    /// `uname -r` and machine of the source, to refuse unlike hosts.
    pub kernel: String,
    pub machine: String,
    /// The files the process maps, as it names them (its home's paths), when it was
    /// offered: the destination reads them into its page cache while the image is
    /// written, so that the restore in the freeze does not wait for them.
    pub files: Vec<String>,
}

/// The destination's answer once the process runs there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Running {
    /// The process's pid as the destination node sees it.
    pub host_pid: i32,
    /// Restore time at the destination, in milliseconds.
    pub restore_ms: f64,
}

/// A migration error: what failed, for the person who asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MigError {
    /// The other side declined; nothing changed.
    #[error("{node} refused: {why}")]
    Refused { node: String, why: String },
    /// The other side tried and failed; nothing runs there.
    #[error("{node} failed: {why}")]
    Failed { node: String, why: String },
    /// No migration with this id is known there.
    #[error("{node} knows no migration {id}")]
    Unknown { node: String, id: String },
}

/// Shorthand for results of the migration service.
pub type MigResult<T> = Result<T, MigError>;

/// One process in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub id: String,
    /// Pid at home (the shadow's pid).
    pub pid: i32,
    /// Pid on the host as the host sees it (0 if unknown here).
    pub host_pid: i32,
    pub comm: String,
    pub home: String,
    pub host: String,
    /// Unix time (seconds) when it arrived on its host.
    pub since: u64,
}

/// The service every migd offers on `ports.migd`.
#[tarpc::service]
pub trait MigdService {
    /// Would this node take the process? A refusal changes nothing anywhere.
    async fn offer(offer: MigrationOffer) -> MigResult<()>;
    /// Restore the offered process from `/.../store/migrations/<id>/` under its home's
    /// tree; answers once it runs. `manifest`: the image's manifest as the source
    /// wrote it (checked like the file; `None`: read from the store), so that the
    /// freeze does not wait for the store to give it back.
    async fn restore(id: String, handover: Option<Handover>) -> MigResult<Running>;
    /// The source committed: the restored copy is now the only one. Forget the image.
    async fn committed(id: String) -> MigResult<()>;
    /// The source gave up before commit: kill the restored copy if there is one.
    async fn abort(id: String) -> MigResult<()>;
    /// Whether the copy of migration `id` restored here from the move whose image
    /// directory is `image` was committed (it runs, or ran and has since ended or
    /// moved on): asked by a source whose `committed` went unanswered (this migd
    /// died meanwhile, or the source's own migd restarted), to learn whether the
    /// commit was taken (the original must never run again) or not (the copy was
    /// killed with this migd or never let run; the original thaws).
    async fn runs(id: String, image: String) -> MigResult<bool>;
    /// Going home: whether the process of migration `id` runs here at home again
    /// (its homecoming committed: home-proxy holds no shadow of it any more). Asked
    /// by its host when `committed` went unanswered. A homecoming not committed is
    /// given up by this question (the process is made a shadow again if it was
    /// restored into it), so that a `false` stays true.
    async fn runs_at_home(id: String) -> MigResult<bool>;
    /// Deliver `sig` to the migrated process running here.
    async fn signal(id: String, sig: i32) -> MigResult<()>;
    /// Move the process running here on to `dest` (asked by its home).
    async fn move_to(id: String, dest: String, mode: Mode) -> MigResult<MigrateOutcome>;
}

/// What `migrate` asks its node's migd (one JSON line on the unix socket).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalRequest {
    /// Move `pid` (as seen on this node) to `dest` (a node name, or "home").
    Migrate { pid: i32, dest: String, mode: Mode },
    /// Migrated processes whose home is here, and foreign processes running here.
    List,
}

/// What migd answers: progress lines, then one final line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalReply {
    Progress {
        phase: String,
        bytes: u64,
    },
    Done(MigrateOutcome),
    List {
        home: Vec<ProcessEntry>,
        foreign: Vec<ProcessEntry>,
    },
    Error {
        message: String,
    },
}

/// How a migration ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateOutcome {
    pub id: String,
    /// Where the process runs now.
    pub host: String,
    /// Its pid there.
    pub host_pid: i32,
    pub bytes: u64,
    /// From the last source thread stopping to the destination running, in ms.
    pub freeze_ms: f64,
}

/// What a hold wrote into the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldImage {
    /// Bytes of page data written.
    pub bytes: u64,
    /// Time from the freeze to the image written, in milliseconds.
    pub dump_ms: f64,
    /// Pre-copy rounds written while the process ran (0: none).
    pub rounds: u32,
    /// Bytes of page data written after the freeze, in the background (late.img).
    pub late_bytes: u64,
    /// What the destination's restore needs of the image at once (passed on with
    /// `MigdService::restore`).
    pub handover: Option<Handover>,
}

/// What a source hands the destination with `MigdService::restore`, so that the
/// restore need not read it back from the store in the freeze: the manifest's bytes
/// as written and, for a lazy restore, the pages it fills before the process runs
/// (migd's `image::EagerPages`, encoded). Each is checked as its file would be
/// (length, CRC-32C); without them the restore reads the files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    // As bytes, not a sequence of u8 (one copy instead of a call per byte).
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub eager: Option<Vec<u8>>,
}

/// Bytes a migrated process wrote into a relayed pipe at its host, for the pipe the
/// shadow holds at fd `fd` at home. `offset` is the position of `data`'s first byte
/// in what this move's host relayed for that fd (`stream` names the move: its image
/// directory), so that a chunk sent again after a lost answer is not written twice;
/// `None` (a relay started again by a restarted migd, which does not know it):
/// where home is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    pub id: String,
    pub stream: String,
    pub fd: i32,
    pub offset: Option<u64>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// What became of an [`OutputChunk`] at home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// The first `bytes` bytes of the chunk are in the pipe at home (fewer than
    /// all: the pipe was full; send the rest again); the stream is at `end` now.
    Taken { bytes: u64, end: u64 },
    /// Nobody reads that pipe at home any more (the process would get SIGPIPE).
    ReaderGone,
}

/// A host's request for what the writer at home put into a pipe the migrated
/// process reads (its fd `fd` at home). `taken`: how many bytes of this stream the
/// host has put into the process's pipe so far; home takes those out of its pipe
/// (until then it only copied them, so nothing is lost if the host goes away).
/// `None` (a restarted migd, which does not know): what home took out already.
/// `skip`: bytes after those the host holds already, not in the process's pipe yet
/// (they are not sent again). `max`: how many more it wants (0: only take out what
/// was taken).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputAsk {
    pub id: String,
    pub stream: String,
    pub fd: i32,
    pub taken: Option<u64>,
    pub skip: u32,
    pub max: u32,
}

/// Home's answer to an [`InputAsk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// The next bytes (none if nothing came: within a second if the host held
    /// none), the first of them at position `at` of the stream.
    Data {
        at: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Every writer at home has closed the pipe and it is empty: the process reads
    /// the end.
    End,
}

/// The service home-proxy offers on `ports.proxy`: the home side of migrated
/// processes. migd of the same node asks it to hold a process leaving home (freeze,
/// dump, keep frozen), then to commit (the original becomes the shadow) or abort
/// (thaw it); hosts report the process's end to it; it forwards signals sent to the
/// shadow to the host's migd ([`MigdService::signal`]).
#[tarpc::service]
pub trait ProxyService {
    /// Freezes `pid`, writes its image into `images` (a path under the super-root),
    /// and keeps it frozen; with `precopy`, pages are written in rounds while it
    /// still runs, then the freeze writes the rest. A refusal leaves it running
    /// untouched.
    async fn hold(id: String, pid: i32, images: String, plan: HoldPlan) -> MigResult<HeldImage>;
    /// The source is about to tell the destination `committed`: from now on a copy
    /// may run at `entry.host`, so the held original must never thaw on its own
    /// (if home-proxy dies, its keeper makes it the shadow, and a restarted
    /// home-proxy takes the shadow back from the record written now).
    async fn decided(id: String, entry: ProcessEntry) -> MigResult<()>;
    /// The process runs at `entry.host`: the held original becomes its shadow.
    async fn commit(id: String, entry: ProcessEntry) -> MigResult<()>;
    /// The migration failed before commit: thaw the original where it was.
    async fn abort(id: String) -> MigResult<()>;
    /// The process moved on to another host.
    async fn moved(id: String, host: String, host_pid: i32) -> MigResult<()>;
    /// Bytes the process wrote at its host into a pipe whose reader is at home:
    /// written into the shadow's fd, as much as fits without waiting long.
    async fn output(chunk: OutputChunk) -> MigResult<Output>;
    /// What the writer at home put into a pipe the process reads at its host: read
    /// from the shadow's fd (see [`InputAsk`]).
    async fn input(ask: InputAsk) -> MigResult<Input>;
    /// The process ended on its host with this raw wait status: end the shadow alike.
    async fn exited(id: String, status: i32) -> MigResult<()>;
    /// The shadows held here.
    async fn shadows() -> Vec<ProcessEntry>;
    /// Going home: restore the image at `images` (a path under the super-root) into
    /// the shadow of migration `id`; answers once the process is rebuilt (still
    /// stopped until [`ProxyService::commit_home`]). On failure it is a shadow still.
    /// `manifest`: the manifest's bytes as the source handed them over (see
    /// [`Handover`]; the file may not be written yet), else the file is read.
    async fn restore_into(
        id: String,
        images: String,
        manifest: Option<Vec<u8>>,
    ) -> MigResult<Running>;
    /// Going home committed: the restored process runs; the shadow is no more.
    async fn commit_home(id: String) -> MigResult<()>;
    /// Going home given up after the restore: the process becomes a shadow again.
    async fn abort_home(id: String) -> MigResult<()>;
}

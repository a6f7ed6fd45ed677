//! The two helper processes of a migration (`migrate internal-keep`, started by
//! home-proxy or migd, and `migrate internal-restore`, started by migd). Each is
//! single-threaded where it matters, as ptrace, setns and the engine's restore need,
//! and speaks one line at a time on stdin/stdout with the daemon that started it; once
//! that daemon is gone, with the next peer on the helper's own unix socket.
//!
//! keeper (source side), lines out: `dumped <bytes> <ms> <late bytes> <manifest
//! in hex>` | `error <why>`, then
//! `checked` (the flags taken before the freeze still hold) | `error <why>` (thawed),
//! `decided` (it took the decision), later `signal <n>` (a signal sent to the shadow) | `gone
//! <status>` (the shadow was killed at home); lines in: `decided` (optional, first),
//! then `commit-shadow` | `commit-kill` | `abort` | `exit <status>`. End of input
//! before commit thaws the process where it was, unless `decided` came (a copy may
//! run elsewhere; the original must never run too): then it means the shadow
//! (home-proxy's keepers), or, with a settle socket (migd's keepers), that the
//! process stays frozen until a new peer on that socket says `commit-kill` or
//! `abort` (a restarted migd that asked the destination). Going home, a shadow's
//! keeper takes `restore <images dir>` (out: `running <pid> <ms>` | `restore-failed
//! <why>`), then `commit-home` (the process runs, the keeper exits) or `abort-home`
//! (a shadow again; also if its peer goes away before the commit).
//!
//! restorer (destination side), started when the offer is accepted: it builds the
//! home's file view and says `ready` (or `error <why>`), then waits for `restore`
//! (the image is written; end of input or anything else: it exits, nothing was
//! restored); lines out: `running <pid> <ms>` | `error <why>`, then (lazy) `paged
//! <bytes> <ms>` once every page is in or `lost <why>` if the store stayed away past
//! the bound, and `exit <status>` when the process ends; lines in (after `running`):
//! `commit` | `abort`. Until `commit` the copy is held before its first instruction
//! and dies with its migd (end of input) or on `abort`; its socket lets a new peer
//! (a restarted migd) in only after `commit`.

use super::sys;
use crate::engine::handoff::{dump_frozen, dump_frozen_precopy, Held, Shadow};
use crate::engine::late::LateOptions;
use crate::engine::restore::into::restore_into;
use crate::engine::restore::lazy::LazyOptions;
use crate::engine::restore::warm::{self, PageWarmer};
use crate::engine::restore::{restore_lazy_paused, restore_paused, RestoreError, RestoreOptions};
use crate::engine::track::PrecopyOptions;
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

fn say(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").is_ok() && out.flush().is_ok()
}

/// A helper's line link: stdin/stdout while the daemon that started it lives; once it
/// is gone, the next connection on the helper's own socket (a restarted daemon).
struct Link {
    rx: mpsc::Receiver<Option<String>>,
    out: Option<Box<dyn Write + Send>>,
    listener: Option<UnixListener>,
    /// Bound but not listening yet (see [`sys::bind_unlistened`]).
    unlistened: Option<std::os::fd::OwnedFd>,
    /// Whether lines are read from a new peer (a thread each). The restorer only
    /// writes: it reads its input in its own poll loop (see [`StdinLines`]).
    reads: bool,
    /// Keeps a write-only link's (empty) input open.
    _quiet: Option<mpsc::Sender<Option<String>>>,
    /// The restorer's relay control socket, until its thread takes it (see
    /// [`relay_control`]).
    relay_control: Option<std::os::unix::net::UnixDatagram>,
}

enum Heard {
    Line(String),
    Nothing,
    /// The peer is gone and no new one has come yet.
    Alone,
}

impl Link {
    fn stdio(rx: mpsc::Receiver<Option<String>>) -> Link {
        Link {
            rx,
            out: Some(Box::new(std::io::stdout())),
            listener: None,
            unlistened: None,
            reads: true,
            _quiet: None,
            relay_control: None,
        }
    }

    /// A link with no peer yet (stdin is someone else's): peers come through the
    /// socket only.
    fn unconnected() -> Link {
        let (_, rx) = mpsc::channel();
        Link {
            rx,
            out: None,
            listener: None,
            unlistened: None,
            reads: true,
            _quiet: None,
            relay_control: None,
        }
    }

    /// A link that only writes (to stdout, then to new peers).
    fn write_only() -> Link {
        let (tx, rx) = mpsc::channel();
        Link {
            rx,
            out: Some(Box::new(std::io::stdout())),
            listener: None,
            unlistened: None,
            reads: false,
            _quiet: Some(tx),
            relay_control: None,
        }
    }

    /// Listens at `path` (a stale socket replaced) for the next peer.
    fn listen(&mut self, path: &Path) {
        let _ = std::fs::remove_file(path);
        match UnixListener::bind(path) {
            Ok(l) => {
                let _ = l.set_nonblocking(true);
                self.listener = Some(l);
            }
            Err(e) => tracing::warn!(socket = %path.display(), error = %e, "cannot listen"),
        }
    }

    /// Binds `path` now (while it is reachable) but lets peers in only after
    /// [`open_for_peers`](Self::open_for_peers).
    fn bind_for_later(&mut self, path: &Path) {
        match sys::bind_unlistened(path) {
            Ok(fd) => self.unlistened = Some(fd),
            Err(e) => tracing::warn!(socket = %path.display(), error = %e, "cannot bind"),
        }
    }

    /// Starts listening on the socket bound by [`bind_for_later`](Self::bind_for_later).
    fn open_for_peers(&mut self) {
        if let Some(fd) = self.unlistened.take() {
            match sys::listen_now(fd) {
                Ok(l) => self.listener = Some(l),
                Err(e) => tracing::warn!(error = %e, "cannot listen"),
            }
        }
    }

    fn connected(&self) -> bool {
        self.out.is_some()
    }

    /// Sends a line; false if the peer is gone (the link then waits for a new one).
    fn say(&mut self, line: &str) -> bool {
        let ok = match self.out.as_mut() {
            Some(o) => writeln!(o, "{line}").is_ok() && o.flush().is_ok(),
            None => false,
        };
        if !ok {
            self.out = None;
        }
        ok
    }

    /// Waits up to `d` for a line; accepts a new peer if the old one is gone.
    fn hear(&mut self, d: Duration) -> Heard {
        if self.out.is_none() {
            if let Some(Ok((s, _))) = self.listener.as_ref().map(|l| l.accept()) {
                let _ = s.set_nonblocking(false);
                if !self.reads {
                    self.out = Some(Box::new(s));
                } else if let Ok(r) = s.try_clone() {
                    self.rx = lines_of(r);
                    self.out = Some(Box::new(s));
                }
            }
        }
        match self.rx.recv_timeout(d) {
            Ok(Some(l)) => Heard::Line(l),
            Err(mpsc::RecvTimeoutError::Timeout) => Heard::Nothing,
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.out = None;
                std::thread::sleep(d);
                Heard::Alone
            }
        }
    }
}

/// Lines read from `r` on a thread of their own (`None` at the end).
fn lines_of(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<Option<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    rx
}

fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().replace('\n', "; ")
}

/// Lines from stdin, read on a thread of their own (`None` at end of input).
fn stdin_lines() -> mpsc::Receiver<Option<String>> {
    lines_of(std::io::stdin())
}

/// `migrate internal-keep`: dumps `pid` into `images`, keeps it frozen, and ends it
/// as migd says. With `enter`, the dump runs in the process's own mount namespace and
/// root (a foreign process moving on), so that paths are recorded as it sees them.
/// After commit it keeps the shadow; if migd or home-proxy (its peer) goes away, it
/// listens at `socket` for a restarted one, and signals wait queued in the shadow.
/// With `precopy`, pages are written in rounds while the process runs (a line
/// `round <n> <bytes> <ms> <throttle%>` each) before the freeze writes the rest. With `late`
/// (the store bound), pages served on demand are written after the freeze, while
/// the copy already runs; the original is killed or made the shadow only once they
/// are all in (see `engine::late`). With `settle_socket` (migd's keepers), the end
/// of input after `decided` keeps the process frozen until a new peer there settles
/// the commit.
pub fn keeper_main(
    pid: i32,
    images: &Path,
    enter: bool,
    socket: Option<&Path>,
    settle_socket: Option<&Path>,
    precopy: Option<PrecopyOptions>,
    late: Option<Duration>,
) -> i32 {
    // Bound now, while the path is the host's (`enter` changes the root), but
    // listened on only once `decided` came: before that, the end of our input
    // thaws the process and nobody may take it over.
    let mut settle = settle_socket.map(|p| {
        let mut link = Link::unconnected();
        link.bind_for_later(p);
        link
    });
    let images = if enter {
        match sys::enter_root_of(pid, images) {
            Ok(p) => p,
            Err(e) => {
                say(&format!("error {}", one_line(e)));
                return 1;
            }
        }
    } else {
        images.to_path_buf()
    };
    // Lines are read on another thread; ptrace stays on this one.
    let rx = stdin_lines();
    // Late pages nobody asked for wait until the freeze is over (the commit, when
    // `held` is killed or made the shadow): the restore and the commit get the
    // CPU first.
    let late = late.map(|bound| LateOptions {
        held: true,
        ..LateOptions::bound(bound)
    });
    let dumped = match &precopy {
        None => dump_frozen(pid, &images, late),
        Some(opts) => dump_frozen_precopy(pid, &images, opts, late, |r| {
            if !r.frozen {
                say(&format!(
                    "round {} {} {:.3} {}",
                    r.round, r.bytes, r.ms, r.throttle_percent
                ));
            }
        }),
    };
    let mut held = match dumped {
        Ok(h) => h,
        Err(e) => {
            say(&format!("error {}", one_line(e)));
            return 1;
        }
    };
    say(&format!(
        "dumped {} {:.3} {} {}{}",
        held.page_bytes,
        held.dump_ms,
        held.late_bytes,
        held.manifest
            .as_deref()
            .map_or("-".into(), super::keeper::to_hex),
        held.eager
            .as_ref()
            .map(|e| format!(" {}", super::keeper::to_hex(e)))
            .unwrap_or_default()
    ));
    // While the destination restores: is the image faithful (flags read before
    // the freeze still true)? Nothing runs from it until we say so.
    if let Err(e) = held.checked() {
        say(&format!("error {}", one_line(e)));
        held.thaw();
        return 1;
    }
    say("checked");
    // `decided`: the source is about to send the destination its commit, so a copy
    // may run from now on: the end of our input then never means a thaw. For
    // home-proxy (it died) it means the commit (the shadow); for migd it means
    // "hold and wait": a restarted migd asks the destination and settles it.
    let mut decided = false;
    let first = loop {
        match rx.recv().ok().flatten() {
            Some(l) if l.trim() == "decided" => {
                tracing::info!("decided: the original never thaws on its own now");
                decided = true;
                if let Some(link) = settle.as_mut() {
                    link.open_for_peers();
                }
                say("decided");
            }
            None if decided => match settle.as_mut() {
                Some(link) => {
                    // The copy may run already: its pages come at full speed while
                    // we wait to learn whether it does.
                    held.release_late();
                    break Some(settled_by_new_peer(link, pid));
                }
                None => break Some("commit-shadow".to_string()),
            },
            l => break l,
        }
    };
    match first.as_deref().map(str::trim) {
        Some("commit-kill") => {
            held.kill();
            0
        }
        Some("commit-shadow") => shadow_loop(held, rx, socket, None),
        Some(l) if l.starts_with("exit ") => shadow_loop(held, rx, socket, Some(l.to_string())),
        _ => {
            held.thaw();
            0
        }
    }
}

/// After `decided`, our peer (migd) went away: the commit may or may not have
/// reached the destination, so the process stays frozen (neither thawed nor
/// killed) until a new peer on the settle socket — the restarted migd, which asks
/// the destination — says `commit-kill` or `abort`. Waits as long as it takes.
fn settled_by_new_peer(link: &mut Link, pid: i32) -> String {
    if link.listener.is_none() {
        tracing::error!(
            pid,
            "the settle socket is not open: the process stays frozen for good (it may run elsewhere)"
        );
    }
    tracing::warn!(
        pid,
        "migd went away after `decided`: held frozen until a restarted migd settles the commit"
    );
    loop {
        if let Heard::Line(l) = link.hear(Duration::from_millis(100)) {
            match l.trim() {
                "commit-kill" | "abort" => {
                    tracing::info!(pid, line = %l.trim(), "settled by a new peer");
                    return l.trim().to_string();
                }
                other => tracing::warn!(pid, line = other, "ignored while waiting to be settled"),
            }
        }
    }
}

/// The original was killed at home (SIGKILL): says `gone <status>` (home-proxy
/// then kills the process where it runs), once a peer listens.
fn say_gone(link: &mut Link, status: i32) {
    while !link.say(&format!("gone {status}")) {
        if let Heard::Alone = link.hear(Duration::from_millis(50)) {
            if link.listener.is_none() {
                break;
            }
        }
    }
}

fn shadow_loop(
    held: Held,
    rx: mpsc::Receiver<Option<String>>,
    socket: Option<&Path>,
    first: Option<String>,
) -> i32 {
    let pid = held.pid();
    let mut link = Link::stdio(rx);
    if let Some(p) = socket {
        link.listen(p);
    }
    let mut shadow: Shadow = match held.into_shadow() {
        Ok(s) => s,
        Err(e) => {
            // Killed at home while its last pages were still being written (before
            // it could be made the shadow): the process goes too, as when the
            // shadow is killed (seen: `kill -9` right after `migrate` returned).
            let t0 = std::time::Instant::now();
            while t0.elapsed() < Duration::from_secs(1) {
                if let Some(status) = sys::exited(pid) {
                    tracing::info!(pid, status, error = %e, "the original was killed before it became the shadow");
                    say_gone(&mut link, status);
                    return 0;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            link.say(&format!("error {}", one_line(e)));
            // Never let the original run on: a copy runs elsewhere.
            let _ = crate::sys::kill(pid, libc::SIGKILL);
            return 1;
        }
    };
    let mut next = first;
    // A SIGSTOP stays queued until a SIGCONT removes it: forward it once.
    let mut stop_sent = false;
    // Signals sent between the freeze and the shadow's making (not in the image).
    let mut late = std::mem::take(&mut shadow.late);
    let code = loop {
        if let Some(line) = next.take() {
            // `restore <manifest hex, or -> <image dir>`.
            if let Some((hex, dir)) = line
                .trim()
                .strip_prefix("restore ")
                .and_then(|r| r.split_once(' '))
            {
                let manifest = super::keeper::from_hex(hex);
                match going_home(shadow, Path::new(dir), manifest.as_deref(), &mut link) {
                    Home::Done => break 0,
                    Home::Shadow(s) => {
                        shadow = *s;
                        continue;
                    }
                    Home::Lost => {
                        let _ = crate::sys::kill(pid, libc::SIGKILL);
                        break 1;
                    }
                }
            }
            if let Some(st) = line.trim().strip_prefix("exit ") {
                let status: i32 = st.trim().parse().unwrap_or(0);
                break match shadow.end_like(status) {
                    Ok(()) => 0,
                    Err(e) => {
                        link.say(&format!("error {}", one_line(e)));
                        let _ = crate::sys::kill(pid, libc::SIGKILL);
                        1
                    }
                };
            }
        }
        if let Some(status) = sys::exited(pid) {
            say_gone(&mut link, status);
            break 0;
        }
        // Signals are taken only while someone can forward them; else they wait
        // queued in the shadow.
        if link.connected() {
            match (shadow.stop_pending(), stop_sent) {
                (true, false) => {
                    stop_sent = link.say(&format!("signal {}", libc::SIGSTOP));
                    // Forwarded: the shadow stops too, for its parent to see.
                    if stop_sent {
                        match shadow.take_stop() {
                            Ok(stopped) => tracing::info!(pid, stopped, "SIGSTOP at home"),
                            Err(e) => {
                                tracing::warn!(pid, error = %e, "the shadow could not take a SIGSTOP")
                            }
                        }
                    }
                }
                (false, true) => stop_sent = false,
                _ => {}
            }
            for s in std::mem::take(&mut late) {
                tracing::info!(pid, sig = s, "a signal sent during the migration");
                link.say(&format!("signal {s}"));
            }
            match shadow.take_signals() {
                Ok(sigs) => {
                    for s in sigs {
                        if !link.say(&format!("signal {s}")) {
                            tracing::error!(
                                pid,
                                sig = s,
                                "a signal for the shadow was lost: its forwarder went away"
                            );
                        }
                    }
                }
                Err(e) => tracing::warn!(pid, error = %e, "taking the shadow's signals"),
            }
        }
        if let Heard::Line(l) = link.hear(Duration::from_millis(50)) {
            next = Some(l);
        }
    };
    if let Some(p) = socket {
        let _ = std::fs::remove_file(p);
    }
    code
}

/// How a restore into the shadow ended for the keeper.
enum Home {
    /// Committed: the process runs at home again; the keeper's work is done.
    Done,
    /// It is (again) a shadow.
    Shadow(Box<Shadow>),
    /// It could not be made a shadow again.
    Lost,
}

/// Going home: restores the image at `images` (`manifest`: its bytes as the source
/// handed them over) into the shadow, says `running <pid> <ms>` (or
/// `restore-failed <why>`), then waits for `commit-home` (let it run, the shadow is
/// no more) or `abort-home` / the peer gone (it becomes a shadow again).
fn going_home(shadow: Shadow, images: &Path, manifest: Option<&[u8]>, link: &mut Link) -> Home {
    let pid = shadow.pid();
    let _span = tracing::info_span!("going_home", pid).entered();
    let restored = match restore_into(shadow, images, manifest) {
        Ok(r) => r,
        Err(f) => {
            let f = *f;
            let state = match (&f.shadow, f.untouched) {
                (Some(_), true) => "the shadow is unchanged",
                (Some(_), false) => {
                    "the process was made a shadow again (its regular files closed)"
                }
                (None, _) => "the shadow is lost",
            };
            tracing::warn!(error = %f.error, state, "restore into the shadow failed");
            // A refusal's own "nothing was created" does not fit here: say the state.
            let why = match &f.error {
                RestoreError::Refused { what } => what.clone(),
                e => e.to_string(),
            };
            link.say(&format!(
                "restore-failed restoring into shadow pid {pid}: {}; {state}",
                one_line(why)
            ));
            return match f.shadow {
                Some(s) => Home::Shadow(Box::new(s)),
                None => Home::Lost,
            };
        }
    };
    tracing::info!(restore_ms = restored.restore_ms, kept_fds = ?restored.kept_fds, "restored into the shadow");
    link.say(&format!("running {pid} {:.3}", restored.restore_ms));
    let commit = loop {
        match link.hear(Duration::from_millis(50)) {
            Heard::Line(l) if l.trim() == "commit-home" => break true,
            Heard::Line(l) if l.trim() == "abort-home" => break false,
            Heard::Line(l) => tracing::warn!(line = %l, "ignored while going home"),
            Heard::Nothing => {}
            Heard::Alone => break false,
        }
    };
    if commit {
        match restored.commit() {
            Ok(()) => {
                tracing::info!("committed: the process runs at home again");
                Home::Done
            }
            Err(e) => {
                tracing::error!(error = %e, "letting the restored process run");
                Home::Lost
            }
        }
    } else {
        tracing::warn!("going home given up after the restore; back to a shadow");
        match restored.give_back() {
            Ok(s) => Home::Shadow(Box::new(s)),
            Err(e) => {
                tracing::error!(error = %e, "the process could not be made a shadow again");
                Home::Lost
            }
        }
    }
}

/// Most bytes of mapped files read ahead of the restore.
const WARM_BOUND: u64 = 64 << 20;

/// Reads the files the process maps (paths in the home view) once, up to
/// [`WARM_BOUND`] bytes in all, so that the restore finds their pages in this node's
/// page cache: writing the image's copy of a page of a private file mapping (a
/// copy-on-write) reads the file's page first, over the network from its home.
/// A file that cannot be read is skipped (the restore says what is wrong with it).
fn warm_files(files: &[PathBuf]) {
    use std::io::Read;
    let mut left = WARM_BOUND;
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let Ok(mut file) = std::fs::File::open(f) else {
            continue;
        };
        while left > 0 {
            let n = (left as usize).min(buf.len());
            match file.read(&mut buf[..n]) {
                Ok(0) | Err(_) => break,
                Ok(k) => left -= k as u64,
            }
        }
    }
}

/// How often [`KeepFresh`] stats the mapped files: well inside the attribute and
/// entry lifetime of `/...` (`fuse.attr_ttl_ms`, 1 s by default).
const FRESH_EVERY: Duration = Duration::from_millis(250);

/// Keeps this node's cached attributes and entries of the mapped files fresh (a
/// stat of each every [`FRESH_EVERY`]) while the restorer waits, so that the
/// restore's check of them (size and mtime against the image, in the freeze) is
/// answered by the kernel's cache instead of a lookup per path component through
/// `/...` (2-22 ms measured in the freeze). The check's answer is as fresh as any
/// reader's of `/...`: at most `fuse.attr_ttl_ms` old, and fs-server drops entries
/// changed through it. Dropping it stops and joins the thread.
struct KeepFresh {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeepFresh {
    fn start(files: Vec<PathBuf>) -> KeepFresh {
        let (stop, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || loop {
            for f in &files {
                if let Err(mpsc::TryRecvError::Disconnected) = rx.try_recv() {
                    return;
                }
                let _ = std::fs::metadata(f);
            }
            if let Err(mpsc::RecvTimeoutError::Disconnected) = rx.recv_timeout(FRESH_EVERY) {
                return;
            }
        });
        KeepFresh {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for KeepFresh {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One line from stdin, read a byte at a time without buffering (so that nothing
/// meant for the later readers of fd 0 is taken); `None` at the end of input.
fn raw_line() -> Option<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match crate::sys::read_raw(0, &mut b) {
            n if n <= 0 => return None,
            _ if b[0] == b'\n' => return Some(String::from_utf8_lossy(&line).trim().to_string()),
            _ => line.push(b[0]),
        }
    }
}

/// Exactly `n` bytes from stdin (after a line that announced them); `None` if it
/// ends first.
fn raw_bytes(n: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match crate::sys::read_raw(0, &mut buf[got..]) {
            r if r < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            r if r <= 0 => return None,
            r => got += r as usize,
        }
    }
    Some(buf)
}

/// How a restorer restores (besides where from and into what).
pub struct Restoring {
    pub warm: Warming,
    /// The image was dumped at a host: the bytes it holds of pipes the process
    /// reads from home were taken out of home's pipes already and go into its
    /// new pipes here (`RestoreOptions::refill_relayed_input`).
    pub refill_input: bool,
    /// Lazily (pages fault in from the store).
    pub lazy: Option<LazyOptions>,
}

/// What a restorer reads while the source writes the image.
pub struct Warming {
    /// Files the process maps (home paths), read into the page cache.
    pub files: Vec<PathBuf>,
    /// Lazy, after pre-copy: bytes of the rounds' pages read at most (0: none).
    pub pages: u64,
}

/// `migrate internal-restore`: builds the home's file view in a new mount namespace
/// (`/` from `/.../<home>/`, the host's /proc, /dev, /sys) at `stage` and enters it,
/// says `ready`, and once told `restore` (the image at `images`, under `superroot`,
/// is written; `restore <n> [<e>]` is followed by the manifest's n bytes and the
/// eager pages' e bytes, see `common::migproto::Handover`) restores the
/// image there; waits for the process and reports its end.
/// The view is built while the source still writes the image (pre-copy, or the
/// freeze's dump), so that the freeze only waits for the process to be made.
/// If migd goes away meanwhile, the end is told to the next peer on `socket`.
pub fn restorer_main(
    images: &Path,
    home: &str,
    superroot: &Path,
    stage: &Path,
    socket: Option<&Path>,
    how: Restoring,
) -> i32 {
    let Restoring {
        warm,
        refill_input,
        lazy,
    } = how;
    let mut ph = crate::phases::Phases::new("restorer");
    // Bound before the root changes (the path is the host's); a new peer (a
    // restarted migd) is let in only once the copy is committed: before that, the
    // copy dies with this migd and must not be taken back.
    let mut link = Link::write_only();
    if let Some(p) = socket {
        link.bind_for_later(p);
        link.relay_control = bind_relay_control(&relay_control_path(p));
    }
    // The image is reached through the super-root opened here, with the host's view
    // (it does not exist yet: the source writes it while the view is built).
    let Ok(rel) = images.strip_prefix(superroot) else {
        say(&format!(
            "error the image directory {} is not under the super-root {}",
            images.display(),
            superroot.display()
        ));
        return 1;
    };
    let superroot_fd = match std::fs::File::open(superroot) {
        Ok(f) => f,
        Err(e) => {
            say(&format!(
                "error cannot open the super-root {}: {e}",
                superroot.display()
            ));
            return 1;
        }
    };
    ph.mark("socket+super-root");
    if let Err(e) = sys::enter_home_view(superroot, home, stage) {
        say(&format!("error {}", one_line(e)));
        return 1;
    }
    ph.mark("home view");
    // The source made the image directory before its offer: opened now, so that
    // no lookup of it is left for the freeze (again at `restore` if this fails).
    let image_path = PathBuf::from(format!("/proc/self/fd/{}", superroot_fd.as_raw_fd())).join(rel);
    let early = std::fs::File::open(&image_path).ok();
    ph.mark("image dir opened");
    if !say("ready") {
        return 1;
    }
    warm_files(&warm.files);
    ph.mark("mapped files read");
    ph.log();
    let fresh = KeepFresh::start(warm.files.clone());
    // A lazy restore after pre-copy: pages.img's finished rounds are read now,
    // while the source writes the next ones (`engine::restore::warm`).
    let warmer = (warm.pages > 0 && lazy.is_some())
        .then(|| PageWarmer::start(image_path.clone(), warm::cap(warm.pages)))
        .and_then(|w| {
            w.map_err(|e| tracing::warn!("pages are not read during pre-copy: {e}"))
                .ok()
        });
    // `restore`, or `restore <n> [<e>]` followed by the manifest's n bytes and the
    // eager pages' e bytes.
    let (manifest, eager) = match raw_line()
        .as_deref()
        .map(|l| l.split_once(' ').unwrap_or((l, "")))
    {
        Some(("restore", "")) => (None, None),
        Some(("restore", lens)) => {
            let mut it = lens.split(' ').map(|n| n.parse().ok());
            let manifest = it.next().flatten().and_then(raw_bytes);
            let eager = match it.next() {
                None => Some(None),
                Some(e) => e.and_then(raw_bytes).map(Some),
            };
            match (manifest, eager) {
                (Some(m), Some(e)) => (Some(m), e),
                _ => {
                    say(&format!(
                        "error the manifest or eager pages after `restore {lens}` did not come whole"
                    ));
                    return 1;
                }
            }
        }
        // Given up before the image was written (abort, or migd gone): nothing was
        // restored.
        _ => return 1,
    };
    // Ended before the restore forks (its clone3 bypasses libc's fork handlers).
    drop(fresh);
    ph = crate::phases::Phases::new("restorer_go");
    let warm = warmer
        .and_then(PageWarmer::finish)
        .filter(|w| !w.is_empty())
        .map(warm::Handed::new)
        .unwrap_or_default();
    ph.mark("page warmer stopped");
    let images_fd = match early.map_or_else(|| std::fs::File::open(&image_path), Ok) {
        Ok(f) => f,
        Err(e) => {
            say(&format!(
                "error cannot open image {}: {e}",
                superroot.join(rel).display()
            ));
            return 1;
        }
    };
    drop(superroot_fd);
    ph.mark("image dir ready");
    ph.log();
    let images = PathBuf::from(format!("/proc/self/fd/{}", images_fd.as_raw_fd()));
    let opts = RestoreOptions {
        images,
        detach: false,
        manifest,
        eager,
        warm,
        relay_pipes: true,
        refill_relayed_input: refill_input,
    };
    if let Some(lazy) = lazy {
        return restorer_lazy(&opts, &lazy, &mut link);
    }
    let mut committed = false;
    let result = restore_paused(&opts, |r| {
        say_running(&mut link, r);
        // The copy is shaped but kept stopped: it runs only once the source
        // commits (the original there is then frozen for good). `abort`, or the end
        // of input (migd died), kills it before it ever ran.
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.trim() == "commit" {
                committed = true;
                link.open_for_peers();
                return true;
            }
            if line.trim() == "abort" {
                break;
            }
            line.clear();
        }
        false
    });
    match result {
        Ok(_) if !committed => {
            tracing::info!("not committed: the copy here was killed");
            1
        }
        Ok((_, Some(status))) => tell(&mut link, &format!("exit {status}")),
        Ok((_, None)) => 0,
        Err(e) => {
            say(&format!("error {}", one_line(e)));
            1
        }
    }
}

/// Says that the copy is restored (held until the commit): `relays <our pid>
/// <fd>:<our end>:<w|r>...` first if the process has pipes whose other end is at
/// home (`w`: it writes; migd reads our read end through pidfd_getfd and sends the
/// bytes home; `r`: it reads; migd writes what home sends into our write end), then
/// `running <host pid> <ms>`. We keep those ends open, so that a restarted migd can
/// take them again, until migd tells us to close one (see [`relay_control`]).
fn say_running(link: &mut Link, r: &crate::engine::restore::RestoreReport) {
    if !r.relays.is_empty() {
        let ends: Vec<String> = r
            .relays
            .iter()
            .map(|x| {
                let dir = if x.pipe.writes { 'w' } else { 'r' };
                format!("{}:{}:{dir}", x.pipe.fd, x.end)
            })
            .collect();
        link.say(&format!("relays {} {}", std::process::id(), ends.join(" ")));
        if let Some(ctl) = link.relay_control.take() {
            let ends: Vec<i32> = r.relays.iter().map(|x| x.end).collect();
            // After the restore's fork: this process may have threads now.
            std::thread::spawn(move || relay_control(ctl, ends));
        }
    }
    link.say(&format!("running {} {:.3}", r.outer_pid, r.restore_ms));
}

/// The restorer's relay control socket: `<socket>.relayctl` beside its line socket.
pub fn relay_control_path(socket: &Path) -> PathBuf {
    socket.with_extension("relayctl")
}

fn bind_relay_control(path: &Path) -> Option<std::os::unix::net::UnixDatagram> {
    let _ = std::fs::remove_file(path);
    std::os::unix::net::UnixDatagram::bind(path)
        .map_err(|e| tracing::warn!(socket = %path.display(), error = %e, "cannot bind the relay control socket"))
        .ok()
}

/// Closes our end of a relayed pipe when migd says `close <fd>` (a datagram on
/// the relay control socket; any migd of this node, the one that started us or a
/// restarted one): the reader at home is gone (the process then gets EPIPE, as it
/// would have there) or the writer at home is (the process then reads the end).
/// Only our relay ends are closed, each once.
fn relay_control(ctl: std::os::unix::net::UnixDatagram, mut ends: Vec<i32>) {
    let mut b = [0u8; 64];
    while !ends.is_empty() {
        let Ok(n) = ctl.recv(&mut b) else { return };
        let fd = std::str::from_utf8(&b[..n])
            .ok()
            .and_then(|l| l.trim().strip_prefix("close "))
            .and_then(|v| v.parse::<i32>().ok());
        if let Some(i) = fd.and_then(|fd| ends.iter().position(|&e| e == fd)) {
            let fd = ends.swap_remove(i);
            // A relay end this process keeps for this purpose only
            // (RestoreReport::relays): nothing else here uses or closes it.
            crate::sys::close_kept(fd);
            tracing::info!(fd, "relay end closed, as migd said");
        }
    }
}

/// Says `line` to the peer, waiting for a new one (a restarted migd) if it is gone.
/// 0 once said; 1 if nobody can be told.
fn tell(link: &mut Link, line: &str) -> i32 {
    while !link.say(line) {
        if link.listener.is_none() {
            tracing::error!(line, "nobody is told");
            return 1;
        }
        link.hear(Duration::from_millis(100));
    }
    0
}

/// Lines from stdin without a thread, read when poll says stdin is readable: the
/// restorer's one loop polls them with the userfaultfd and the stub's status.
struct StdinLines {
    buf: Vec<u8>,
    open: bool,
}

impl StdinLines {
    /// Reads what is there (one read) and returns the complete lines.
    fn read_ready(&mut self) -> Vec<String> {
        let mut b = [0u8; 512];
        let n = crate::sys::read_raw(0, &mut b);
        if n <= 0 {
            self.open = false;
        } else {
            self.buf.extend_from_slice(&b[..n as usize]);
        }
        let mut lines = Vec::new();
        while let Some(i) = self.buf.iter().position(|&c| c == b'\n') {
            let l: Vec<u8> = self.buf.drain(..=i).collect();
            lines.push(String::from_utf8_lossy(&l).trim().to_string());
        }
        lines
    }
}

/// The lazy restorer: the process runs at once and its pages fault in from the
/// store while this loop serves them (and prefetches the rest), reads `commit` /
/// `abort` from migd, and watches for the process's end. Lines out: `running`, then
/// `paged <bytes> <ms>` once nothing depends on the store, `lost <why>` if the store
/// stayed away past the bound (the process was killed), and `exit <status>`.
fn restorer_lazy(opts: &RestoreOptions, lazy: &LazyOptions, link: &mut Link) -> i32 {
    // The copy is shaped but kept stopped until the source commits (the original
    // there is then frozen for good): exactly one copy ever runs.
    let (lr, paused) = match restore_lazy_paused(opts, lazy) {
        Ok(l) => l,
        Err(e) => {
            say(&format!("error {}", one_line(e)));
            return 1;
        }
    };
    let mut paused = Some(paused);
    let r = lr.report;
    let mut pager = lr.pager;
    let total = r.lazy_bytes.unwrap_or(0);
    say_running(link, &r);
    tracing::info!(
        pid = r.pid,
        lazy_bytes = total,
        "restored; held until the source commits, then pages fault in from the store"
    );
    let mut stdin = StdinLines {
        buf: Vec::new(),
        open: true,
    };
    let mut committed = false;
    let mut stub = None;
    let mut paged = pager.done();
    // Lines for migd that must not be lost if it is away (said once a peer is back).
    let mut pending: Vec<String> = Vec::new();
    let status = loop {
        flush(link, &mut pending);
        // While the copy is held (before the commit) the pager rests: nothing can
        // fault, and a prefetch step (tens of ms on a loaded store) would delay the
        // release the source's `committed` waits for.
        let held = paused.is_some();
        let mut fds = if paged || held {
            Vec::new()
        } else {
            pager.fds()
        };
        let link_fd = stub
            .as_ref()
            .map(crate::engine::restore::spawn::StubLink::raw_fd)
            .or_else(|| pager.link_mut().map(|l| l.raw_fd()));
        fds.extend(link_fd);
        let stdin_at = (!committed && stdin.open).then(|| {
            fds.push(0);
            fds.len() - 1
        });
        let wait = pager
            .next_timeout()
            .filter(|_| !paged && !held)
            .map_or(500, |d| crate::engine::restore::lazy::poll_ms(d).min(500));
        let ready = crate::sys::uffd::poll_readable(&fds, wait).unwrap_or_default();
        if stdin_at.is_some_and(|i| ready.get(i).copied().unwrap_or(false)) {
            for l in stdin.read_ready() {
                match l.as_str() {
                    "commit" if !committed => {
                        committed = true;
                        link.open_for_peers();
                        if let Some(p) = paused.take() {
                            if let Err(e) = p.release() {
                                // Ptrace failed on a thread: the process cannot be
                                // let run as restored; it dies (no copy runs here).
                                tracing::error!(error = %e, "letting the copy run");
                                let _ = crate::sys::kill(r.stub_pid, libc::SIGKILL);
                            }
                        }
                    }
                    "abort" => stdin.open = false,
                    _ => {}
                }
            }
            if !committed && !stdin.open {
                // Until the source commits, this copy may not run (it never did).
                tracing::info!("not committed: killing the copy here, which never ran");
                match paused.take() {
                    Some(p) => p.kill(r.stub_pid),
                    None => {
                        let _ = crate::sys::kill(r.stub_pid, libc::SIGKILL);
                        let _ = crate::sys::wait_child(r.stub_pid);
                    }
                }
                return 1;
            }
        }
        if !paged && paused.is_none() {
            if let Err(e) = pager.step(Duration::ZERO) {
                // The store stayed away past the bound: the process was killed.
                tracing::error!(error = %e, "pages lost; the process was killed");
                pending.push(format!("lost {}", one_line(e)));
                paged = true;
            } else if pager.done() {
                let ms = pager.finished_after().unwrap_or_default().as_secs_f64() * 1e3;
                tracing::info!(
                    bytes = total,
                    ms,
                    "every page is in; nothing depends on the store"
                );
                pending.push(format!("paged {total} {ms:.1}"));
                paged = true;
            }
            if paged {
                stub = pager.take_link();
            }
        }
        let mut from_link = || match stub.as_mut() {
            Some(l) => l.try_status(),
            None => pager.link_mut().and_then(|l| l.try_status()),
        };
        if let Some(st) = from_link() {
            let _ = crate::sys::wait_child(r.stub_pid);
            break st;
        }
        // The stub itself ended (killed with its namespace, or it lost its link):
        // the process's status is then whatever it sent, else the stub's own.
        if let Some(st) = sys::exited(r.stub_pid) {
            break from_link().unwrap_or(st);
        }
    };
    if !committed {
        return 1;
    }
    if !paged {
        tracing::info!(
            left = pager.progress().remaining_bytes,
            "the process ended before all its pages were in"
        );
    }
    flush(link, &mut pending);
    for l in pending {
        tell(link, &l);
    }
    tell(link, &format!("exit {status}"))
}

/// Says the pending lines while a peer listens (accepting a new peer if the old one
/// went away); what cannot be said yet stays pending.
fn flush(link: &mut Link, pending: &mut Vec<String>) {
    if pending.is_empty() {
        return;
    }
    if !link.connected() {
        link.hear(Duration::ZERO);
    }
    while !pending.is_empty() && link.connected() {
        if link.say(&pending[0]) {
            pending.remove(0);
        }
    }
}

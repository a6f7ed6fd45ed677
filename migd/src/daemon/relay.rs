//! Pipes relayed to and from home. A foreign process whose pipe has its other end
//! at its home (`prog | sort` or `cat f | prog` started there) holds, at its host,
//! a new pipe whose other end its restorer keeps
//! (`engine::restore::RestoreOptions::relay_pipes`). migd takes a copy of that end
//! (pidfd_getfd of the restorer, which keeps its own open so that a restarted migd
//! can take it again) and relays:
//!
//! - Output (the process writes): what it writes is copied out of the pipe (tee),
//!   sent to home-proxy ([`common::migproto::ProxyService::output`]), which writes
//!   it into the pipe the shadow holds at the same fd, and only then taken out of
//!   the pipe here. The next bytes are read only once home took the last ones, so a
//!   slow reader at home slows the writer here, as a pipe does. Each chunk carries
//!   its offset in the relayed stream: a chunk sent again after a lost answer is
//!   not written twice.
//! - Input (the process reads): home is asked for what the writer there put into
//!   the shadow's pipe ([`common::migproto::ProxyService::input`]), up to 1 MiB
//!   ahead of what the process's pipe takes; home copies it, and takes it out of
//!   its pipe once told it is in the process's pipe here (the next ask says how
//!   much is).
//! - Order: the host reports the process's end home only after every output relay
//!   has reached the end of its pipe ([`RelaySet::finish`]), so the reader at home
//!   gets every byte before the shadow's end closes the pipe. A move onward (or
//!   home) stops asking for input first ([`RelaySet::pause_input`]: what the
//!   process has not read yet travels in its image) and waits, the process frozen,
//!   until the output relays are empty ([`RelaySet::drained`]).
//! - Ends: the reader at home quits, or the writer at home closes its end: migd
//!   closes its copy and tells the restorer to close its own (a datagram `close
//!   <fd>` on `<id>.relayctl`), so the process gets EPIPE (and SIGPIPE) or reads
//!   the end, as it would have at home.
//! - A restarted migd does not know the streams' offsets and asks "where home is";
//!   only a chunk whose answer was lost to the restart can come twice.

use super::Daemon;
use common::migproto::{Input, InputAsk, Output, OutputChunk, ProxyServiceClient};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Bytes moved per call home.
const CHUNK: usize = 256 * 1024;

/// How long output is tried again while home cannot be reached (one try a
/// second), as the process's end is (`host::report_exit`); then it is dropped.
const TRIES: u32 = 30;

/// The relayed pipes of one foreign process.
pub struct RelaySet {
    outs: Vec<Arc<OutRelay>>,
    ins: Vec<Arc<InRelay>>,
    out_tasks: Mutex<Vec<JoinHandle<()>>>,
    in_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Input relays stop asking home while true (see [`RelaySet::pause_input`]).
    paused: watch::Sender<bool>,
}

/// A pipe the process writes into.
struct OutRelay {
    /// The process's fd (the shadow's at home).
    fd: i32,
    /// A copy of the read end, to see what is buffered (`None` once closed).
    peek: Mutex<Option<OwnedFd>>,
    /// Between taking bytes out of the pipe and home having them all.
    busy: AtomicBool,
}

/// A pipe the process reads.
struct InRelay {
    fd: i32,
    /// Stopped asking home, all it put in the pipe counted there (or ended).
    parked: AtomicBool,
}

/// One relayed pipe as the restorer names it: `<fd>:<its end>:<w|r>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct End {
    fd: i32,
    end: i32,
    writes: bool,
}

/// What the restorer said: `relays <its pid> <fd>:<end>:<w|r>...`.
fn parse(line: &str) -> Option<(i32, Vec<End>)> {
    let mut it = line.strip_prefix("relays ")?.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let ends = it
        .map(|e| {
            let mut p = e.split(':');
            let fd = p.next()?.parse().ok()?;
            let end = p.next()?.parse().ok()?;
            let writes = match p.next()? {
                "w" => true,
                "r" => false,
                _ => return None,
            };
            p.next().is_none().then_some(End { fd, end, writes })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((pid, ends))
}

/// Where a relay's bytes come from and go.
#[derive(Clone)]
struct Target {
    id: String,
    home: String,
    /// The move's image name: names this host's streams at home.
    stream: String,
    /// The restorer's relay control socket.
    control: PathBuf,
}

impl Target {
    /// Tells the restorer to close its end `end`: with ours closed too, the
    /// process sees the pipe as its home would have (no reader, or no writer).
    fn close_theirs(&self, end: i32) {
        let s = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to(format!("close {end}").as_bytes(), &self.control));
        if let Err(e) = s {
            tracing::warn!(end, control = %self.control.display(), error = %e, "telling the restorer to close its end");
        }
    }
}

/// Starts relaying the pipes the restorer named in `line` for foreign process `id`
/// (it must be in `d.foreign`), and registers them for [`of`].
pub fn start(d: &Arc<Daemon>, id: &str, line: &str) -> Result<(), String> {
    let (pid, ends) = parse(line).ok_or_else(|| format!("a garbled relay line: {line:?}"))?;
    let target = {
        let f = d.foreign.lock().unwrap();
        let r = f.get(id).ok_or("the process is not known here")?;
        Target {
            id: id.to_string(),
            home: r.entry.home.clone(),
            stream: r.image.clone(),
            control: super::helpers::relay_control_path(
                &d.foreign_dir().join(format!("{id}.sock")),
            ),
        }
    };
    let pidfd = crate::sys::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    let (paused, _) = watch::channel(false);
    let (mut outs, mut ins, mut out_tasks, mut in_tasks) = (vec![], vec![], vec![], vec![]);
    for e in ends {
        let fd = e.fd;
        // An end closed since (see `Target::close_theirs`) is not there any more,
        // or its number is something else's now.
        let ours = match crate::sys::pidfd_getfd(pidfd.as_raw_fd(), e.end) {
            Ok(o) => o,
            Err(err) => {
                tracing::info!(fd, end = e.end, error = %err, "a relay end the restorer no longer has: that relay has ended");
                continue;
            }
        };
        let span = tracing::info_span!("relay", fd);
        if e.writes {
            let peek = ours.try_clone().map_err(|e| format!("fd {fd}: dup: {e}"))?;
            // Made non-blocking: the restorer's copy shares the flag, and never reads.
            let Ok(pipe) = pipe::Receiver::from_owned_fd(ours) else {
                no_pipe(e);
                continue;
            };
            let relay = Arc::new(OutRelay {
                fd,
                peek: Mutex::new(Some(peek)),
                busy: AtomicBool::new(false),
            });
            let pump = pump_out(d.clone(), target.clone(), relay.clone(), pipe, e.end);
            out_tasks.push(tokio::spawn(pump.instrument(span)));
            outs.push(relay);
        } else {
            let Ok(pipe) = pipe::Sender::from_owned_fd(ours) else {
                no_pipe(e);
                continue;
            };
            let relay = Arc::new(InRelay {
                fd,
                parked: AtomicBool::new(false),
            });
            let pump = pump_in(
                d.clone(),
                target.clone(),
                relay.clone(),
                pipe,
                e.end,
                paused.subscribe(),
            );
            in_tasks.push(tokio::spawn(pump.instrument(span)));
            ins.push(relay);
        }
    }
    tracing::info!(
        written = ?outs.iter().map(|r| r.fd).collect::<Vec<_>>(),
        read = ?ins.iter().map(|r| r.fd).collect::<Vec<_>>(),
        "relaying its pipes to and from home"
    );
    d.relays.lock().unwrap().insert(
        id.to_string(),
        Arc::new(RelaySet {
            outs,
            ins,
            out_tasks: Mutex::new(out_tasks),
            in_tasks: Mutex::new(in_tasks),
            paused,
        }),
    );
    Ok(())
}

/// Logs that relay end `e` of the restorer is no pipe any more: closed since (see
/// `Target::close_theirs`) and its number reused, so that relay has ended.
fn no_pipe(e: End) {
    tracing::info!(
        fd = e.fd,
        end = e.end,
        "a relay end that is no pipe (closed, its number reused): that relay has ended"
    );
}

/// The relays of foreign process `id`, if it has any.
pub fn of(d: &Daemon, id: &str) -> Option<Arc<RelaySet>> {
    d.relays.lock().unwrap().get(id).cloned()
}

impl RelaySet {
    /// Waits up to `bound` until nothing is buffered in the pipes the process
    /// writes and home has every byte taken out of them (the process must be
    /// frozen, or more may come). On time out, returns the fds still holding bytes
    /// and how many.
    pub async fn drained(&self, bound: Duration) -> Result<(), Vec<(i32, usize)>> {
        let t = std::time::Instant::now();
        loop {
            // Buffered bytes first: a relay sets `busy` before it copies.
            let left: Vec<(i32, usize)> = self
                .outs
                .iter()
                .filter_map(|r| {
                    let n = r
                        .peek
                        .lock()
                        .unwrap()
                        .as_ref()
                        .map(|p| crate::sys::fionread(p.as_raw_fd()).unwrap_or(0))
                        .unwrap_or(0);
                    (n > 0 || r.busy.load(Ordering::SeqCst)).then_some((r.fd, n))
                })
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if t.elapsed() >= bound {
                return Err(left);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops asking home for input, waiting up to `bound` until home has taken
    /// out of its pipes all that was put into the process's: what the process has
    /// not read yet is then in its pipes only (and in its image, if it moves).
    /// On time out (home unreachable), says which fds.
    pub async fn pause_input(&self, bound: Duration) -> Result<(), Vec<i32>> {
        self.paused.send_replace(true);
        let t = std::time::Instant::now();
        loop {
            let left: Vec<i32> = self
                .ins
                .iter()
                .filter(|r| !r.parked.load(Ordering::SeqCst))
                .map(|r| r.fd)
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if t.elapsed() >= bound {
                return Err(left);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Asks home for input again (a move given up).
    pub fn resume_input(&self) {
        self.paused.send_replace(false);
    }

    /// Waits until every output relay has reached the end of its pipe (every
    /// writer gone: the process ended, or was killed) and home has what was in it;
    /// input relays stop (nobody will read what they would bring).
    pub async fn finish(&self) {
        let outs: Vec<JoinHandle<()>> = std::mem::take(&mut *self.out_tasks.lock().unwrap());
        for t in outs {
            let _ = t.await;
        }
        for t in std::mem::take(&mut *self.in_tasks.lock().unwrap()) {
            t.abort();
        }
    }
}

/// Relays one pipe the process writes until its end (see the module's doc).
async fn pump_out(
    d: Arc<Daemon>,
    to: Target,
    relay: Arc<OutRelay>,
    pipe: pipe::Receiver,
    end: i32,
) {
    let (peek_r, peek_w) = match crate::sys::pipe() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "a pipe to copy into; its bytes stay at this host");
            return;
        }
    };
    let _ = crate::sys::set_pipe_size(peek_w.as_raw_fd(), CHUNK as i32);
    let mut buf = vec![0u8; CHUNK];
    // Unknown until home answers the first chunk (see `OutputChunk::offset`).
    let mut offset: Option<u64> = None;
    let mut client: Option<ProxyServiceClient> = None;
    // Home could not be reached for long: bytes are dropped.
    let mut dropping = false;
    let mut dropped = 0u64;
    loop {
        if let Err(e) = pipe.readable().await {
            tracing::error!(error = %e, "polling the relayed pipe failed; its bytes stay at this host");
            return;
        }
        relay.busy.store(true, Ordering::SeqCst);
        let rfd = pipe.as_raw_fd();
        let copied = pipe.try_io(|| {
            crate::sys::tee(rfd, peek_w.as_raw_fd(), CHUNK).map_err(std::io::Error::from)
        });
        let n = match copied {
            Ok(0) => {
                relay.busy.store(false, Ordering::SeqCst);
                tracing::debug!(?offset, dropped, "the relayed pipe ended");
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                relay.busy.store(false, Ordering::SeqCst);
                continue;
            }
            Err(e) => {
                relay.busy.store(false, Ordering::SeqCst);
                tracing::error!(error = %e, "reading the relayed pipe; its bytes stay at this host");
                return;
            }
        };
        let got = read_exactly(peek_r.as_raw_fd(), &mut buf[..n]);
        let mut data = &buf[..got];
        let mut tries = 0;
        while !data.is_empty() {
            if dropping {
                dropped += consume(rfd, data.len()) as u64;
                break;
            }
            let chunk = OutputChunk {
                id: to.id.clone(),
                stream: to.stream.clone(),
                fd: relay.fd,
                offset,
                data: data.to_vec(),
            };
            match send(&d, &to.home, &mut client, chunk).await {
                Ok(Output::Taken { bytes, end }) => {
                    let k = consume(rfd, (bytes as usize).min(data.len()));
                    data = &data[k..];
                    offset = Some(end);
                    tries = 0;
                }
                Ok(Output::ReaderGone) => {
                    tracing::info!(
                        "nobody reads this pipe at home any more: the process gets EPIPE, as there"
                    );
                    relay.peek.lock().unwrap().take();
                    relay.busy.store(false, Ordering::SeqCst);
                    to.close_theirs(end);
                    return;
                }
                Err(e) => {
                    tries += 1;
                    client = None;
                    if tries >= TRIES {
                        tracing::error!(error = %e, home = %to.home, "home could not take the process's output for {TRIES} s; dropping what it writes into this pipe");
                        dropping = true;
                    } else {
                        tracing::warn!(error = %e, tries, "sending output home; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        relay.busy.store(false, Ordering::SeqCst);
    }
}

/// How much a relay of input holds beyond what the process's pipe holds.
const INPUT_AHEAD: usize = 1 << 20;

/// Relays one pipe the process reads until the writer at home closes it (see the
/// module's doc). Up to [`INPUT_AHEAD`] bytes are held here beyond what the
/// process's pipe takes (home still has them: it takes bytes out of its pipe only
/// once they are in the process's). Runs until the end, or until
/// [`RelaySet::finish`] stops it.
async fn pump_in(
    d: Arc<Daemon>,
    to: Target,
    relay: Arc<InRelay>,
    pipe: pipe::Sender,
    end: i32,
    mut paused: watch::Receiver<bool>,
) {
    // Bytes of the stream put into the process's pipe (unknown after a restart
    // until home answers), whether home was told so, and the bytes after those.
    let mut taken: Option<u64> = None;
    let mut told = true;
    let mut held: Vec<u8> = Vec::new();
    let mut client: Option<ProxyServiceClient> = None;
    let mut tries = 0u32;
    loop {
        if *paused.borrow_and_update() {
            // What is held here stays at home (not taken out there).
            held.clear();
            if !told {
                let a = ask(&to, relay.fd, taken, 0, 0);
                if let Err(e) = ask_home(&d, &to.home, &mut client, a).await {
                    client = None;
                    tracing::warn!(error = %e, "telling home what the process's pipe holds; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                told = true;
            }
            relay.parked.store(true, Ordering::SeqCst);
            while *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    return;
                }
            }
            relay.parked.store(false, Ordering::SeqCst);
            continue;
        }
        // Into the process's pipe, what fits now.
        if !held.is_empty() {
            match pipe.try_write(&held) {
                Ok(k) => {
                    held.drain(..k);
                    taken = taken.map(|t| t + k as u64);
                    told = false;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // The process closed its end: nobody here reads any more.
                    tracing::debug!(error = %e, "the process's pipe is closed");
                    return;
                }
            }
        }
        if held.len() >= INPUT_AHEAD {
            // Home learns at once what went in (a restarted migd would not know),
            // then the process's pipe is waited on.
            if !told {
                let a = ask(&to, relay.fd, taken, held.len() as u32, 0);
                match ask_home(&d, &to.home, &mut client, a).await {
                    Ok(_) => told = true,
                    Err(_) => client = None,
                }
            }
            tokio::select! {
                r = pipe.writable() => if r.is_err() { return },
                _ = paused.changed() => {}
            }
            continue;
        }
        // More from home.
        let a = ask(
            &to,
            relay.fd,
            taken,
            held.len() as u32,
            (INPUT_AHEAD - held.len()).min(CHUNK) as u32,
        );
        let answer = tokio::select! {
            a = ask_home(&d, &to.home, &mut client, a) => a,
            _ = paused.changed() => continue,
        };
        match answer {
            Ok(Input::Data { at, data }) => {
                tries = 0;
                // `at` follows what is held here.
                taken = Some(at - held.len() as u64);
                told = true;
                if data.is_empty() && !held.is_empty() {
                    // Nothing new, and the process's pipe was full: wait for room.
                    tokio::select! {
                        r = pipe.writable() => if r.is_err() { return },
                        _ = paused.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                held.extend_from_slice(&data);
            }
            Ok(Input::End) => {
                if let Err(e) = put(&pipe, &held).await {
                    tracing::debug!(error = %e, "the process's pipe is closed");
                    return;
                }
                tracing::info!("the writer at home closed the pipe: the process reads its end");
                drop(pipe);
                to.close_theirs(end);
                relay.parked.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                tries += 1;
                client = None;
                if tries % TRIES == 1 {
                    tracing::warn!(error = %e, tries, "asking home for the process's input; trying again every second");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn ask(to: &Target, fd: i32, taken: Option<u64>, skip: u32, max: u32) -> InputAsk {
    InputAsk {
        id: to.id.clone(),
        stream: to.stream.clone(),
        fd,
        taken,
        skip,
        max,
    }
}

/// Writes all of `data` into the process's pipe.
async fn put(pipe: &pipe::Sender, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        pipe.writable().await?;
        match pipe.try_write(data) {
            Ok(k) => data = &data[k..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what tee just copied into our pipe (it is all there).
fn read_exactly(fd: i32, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        let k = crate::sys::read_raw(fd, &mut buf[got..]);
        if k <= 0 {
            break;
        }
        got += k as usize;
    }
    got
}

/// Takes `n` bytes home has (or that are dropped) out of the relayed pipe.
fn consume(fd: i32, n: usize) -> usize {
    let mut scratch = vec![0u8; n];
    read_exactly(fd, &mut scratch)
}

/// The relay's connection to home-proxy (made again after an error).
async fn connect<'a>(
    d: &Daemon,
    home: &str,
    client: &'a mut Option<ProxyServiceClient>,
) -> Result<&'a ProxyServiceClient, String> {
    if client.is_none() {
        *client = Some(d.proxy(home).await.map_err(|e| e.to_string())?);
    }
    Ok(client.as_ref().expect("connected above"))
}

/// One chunk of output to home-proxy.
async fn send(
    d: &Daemon,
    home: &str,
    client: &mut Option<ProxyServiceClient>,
    chunk: OutputChunk,
) -> Result<Output, String> {
    let c = connect(d, home, client).await?;
    super::flat(home, c.output(super::long_ctx(), chunk).await).map_err(|e| e.to_string())
}

/// One ask for input to home-proxy.
async fn ask_home(
    d: &Daemon,
    home: &str,
    client: &mut Option<ProxyServiceClient>,
    ask: InputAsk,
) -> Result<Input, String> {
    let c = connect(d, home, client).await?;
    super::flat(home, c.input(super::long_ctx(), ask).await).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::{parse, End};

    #[test]
    fn relay_lines_parse_and_garbage_does_not() {
        let e = |fd, end, writes| End { fd, end, writes };
        assert_eq!(
            parse("relays 812 1:5:w 0:6:r"),
            Some((812, vec![e(1, 5, true), e(0, 6, false)]))
        );
        assert_eq!(parse("relays 812 1:5"), None);
        assert_eq!(parse("relays 812 1:5:x"), None);
        assert_eq!(parse("relays 812 1:5:w:9"), None);
        assert_eq!(parse("relays 812 1:x:w"), None);
        assert_eq!(parse("relays"), None);
        assert_eq!(parse("running 3 4"), None);
    }
}

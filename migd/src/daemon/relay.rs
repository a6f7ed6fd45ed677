//! Pipes relayed home: a foreign process that writes into a pipe whose reader is at
//! its home (`prog | sort` started there) writes, at its host, into a pipe whose
//! read end its restorer holds (`engine::restore::RestoreOptions::relay_pipes`).
//! migd takes a copy of that read end (pidfd_getfd of the restorer, which keeps
//! its own open for the process's life, so that a restarted migd can take it
//! again), reads what the process writes and sends it to home-proxy
//! ([`common::migproto::ProxyService::output`]), which writes it into the pipe the
//! shadow holds at the same fd number.
//!
//! - Back-pressure: the next bytes are read only once home took the last ones, so a
//!   slow reader at home slows the writer here, as a pipe does.
//! - Order: the host reports the process's end home only after every relay has
//!   reached the end of its pipe ([`RelaySet::finish`]), so the reader at home gets
//!   every byte before the shadow's end closes the pipe. A move onward (or home)
//!   waits until the relays are empty ([`RelaySet::drained`]) before the copy at
//!   the destination may run.
//! - Bytes leave the pipe only once home has them (they are copied out with tee),
//!   and each chunk carries its offset in the relayed stream, so a chunk sent again
//!   after a lost answer is not written twice. A restarted migd does not know the
//!   offset and sends its first chunk "where home is"; only a chunk home wrote whose
//!   answer was lost to the restart comes twice.
//! - Nobody reads at home any more: the process gets SIGPIPE, as it would there;
//!   what it writes after that is dropped (it does not get EPIPE: the restorer's
//!   copy of the read end keeps the pipe open at the host).

use super::Daemon;
use common::migproto::{Output, OutputChunk, ProxyServiceClient};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Bytes read from a relayed pipe per call home.
const CHUNK: usize = 256 * 1024;

/// How long a chunk is tried again while home cannot be reached (one try a second),
/// as the process's end is (`host::report_exit`); then it is dropped.
const TRIES: u32 = 30;

/// The relayed pipes of one foreign process.
pub struct RelaySet {
    relays: Vec<Arc<Relay>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// One relayed pipe.
struct Relay {
    /// The process's fd (the shadow's at home).
    fd: i32,
    /// A copy of the read end, to see what is buffered.
    peek: OwnedFd,
    /// Between taking bytes out of the pipe and home having them all.
    busy: AtomicBool,
}

/// What the restorer said: `relays <its pid> <fd>:<read end>...`.
fn parse(line: &str) -> Option<(i32, Vec<(i32, i32)>)> {
    let mut it = line.strip_prefix("relays ")?.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let ends = it
        .map(|e| {
            let (fd, rfd) = e.split_once(':')?;
            Some((fd.parse().ok()?, rfd.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((pid, ends))
}

/// Where the relayed bytes go.
#[derive(Clone)]
struct Target {
    id: String,
    home: String,
    /// The move's image name: names this host's stream at home.
    stream: String,
    /// The process, as this node sees it (for SIGPIPE).
    host_pid: i32,
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
            host_pid: r.entry.host_pid,
        }
    };
    let pidfd = crate::sys::pidfd_open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    let mut relays = Vec::new();
    let mut tasks = Vec::new();
    for (fd, rfd) in ends {
        let ours = crate::sys::pidfd_getfd(pidfd.as_raw_fd(), rfd)
            .map_err(|e| format!("fd {fd}: taking read end {rfd} of restorer {pid}: {e}"))?;
        let peek = ours.try_clone().map_err(|e| format!("fd {fd}: dup: {e}"))?;
        // Made non-blocking: the restorer's copy shares the flag, and never reads.
        let pipe = pipe::Receiver::from_owned_fd(ours).map_err(|e| format!("fd {fd}: {e}"))?;
        let relay = Arc::new(Relay {
            fd,
            peek,
            busy: AtomicBool::new(false),
        });
        let span = tracing::info_span!("relay", fd);
        tasks.push(tokio::spawn(
            pump(d.clone(), target.clone(), relay.clone(), pipe).instrument(span),
        ));
        relays.push(relay);
    }
    tracing::info!(
        fds = ?relays.iter().map(|r| r.fd).collect::<Vec<_>>(),
        "relaying its pipes home"
    );
    d.relays.lock().unwrap().insert(
        id.to_string(),
        Arc::new(RelaySet {
            relays,
            tasks: Mutex::new(tasks),
        }),
    );
    Ok(())
}

/// The relays of foreign process `id`, if it has any.
pub fn of(d: &Daemon, id: &str) -> Option<Arc<RelaySet>> {
    d.relays.lock().unwrap().get(id).cloned()
}

impl RelaySet {
    /// Waits up to `bound` until nothing is buffered in the relayed pipes and home
    /// has every byte taken out of them (the process must be frozen, or more may
    /// come). On time out, returns the fds still holding bytes and how many.
    pub async fn drained(&self, bound: Duration) -> Result<(), Vec<(i32, usize)>> {
        let t = std::time::Instant::now();
        loop {
            // Buffered bytes first: a relay sets `busy` before it reads.
            let left: Vec<(i32, usize)> = self
                .relays
                .iter()
                .filter_map(|r| {
                    let n = crate::sys::fionread(r.peek.as_raw_fd()).unwrap_or(0);
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

    /// Waits until every relay has reached the end of its pipe (every writer gone:
    /// the process ended, or was killed) and home has what was in it.
    pub async fn finish(&self) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Relays one pipe until its end. Bytes are copied out of the pipe (tee) and taken
/// out of it only once home has them: a migd killed meanwhile leaves them there for
/// the next one.
async fn pump(d: Arc<Daemon>, to: Target, relay: Arc<Relay>, pipe: pipe::Receiver) {
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
    // Nobody reads at home any more, or home could not be reached: bytes are dropped.
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
                        pid = to.host_pid,
                        "nobody reads this pipe at home any more: SIGPIPE, as there"
                    );
                    let _ = crate::sys::kill(to.host_pid, libc::SIGPIPE);
                    dropping = true;
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

/// One chunk to home-proxy, on the relay's own connection (made again after an
/// error).
async fn send(
    d: &Daemon,
    home: &str,
    client: &mut Option<ProxyServiceClient>,
    chunk: OutputChunk,
) -> Result<Output, String> {
    if client.is_none() {
        *client = Some(d.proxy(home).await.map_err(|e| e.to_string())?);
    }
    let c = client.as_ref().expect("connected above");
    match c.output(super::long_ctx(), chunk).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("home-proxy at {home}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn relay_lines_parse_and_garbage_does_not() {
        assert_eq!(
            parse("relays 812 1:5 7:6"),
            Some((812, vec![(1, 5), (7, 6)]))
        );
        assert_eq!(parse("relays 812 1:x"), None);
        assert_eq!(parse("relays"), None);
        assert_eq!(parse("running 3 4"), None);
    }
}

//! Relayed pipes: a migrated process's pipes whose other end is here stay here
//! (migd's `daemon::relay` at its host relays them).
//!
//! - Output (it writes, the reader is here): what it writes at its host is written
//!   into the pipe the shadow holds at the same fd number.
//! - Input (it reads, the writer is here): what the writer puts into the pipe the
//!   shadow holds is copied to the host, and taken out of the pipe here once the
//!   host says it has put it into the process's pipe there.
//!
//! The pipe is opened again through `/proc/<shadow>/fd/<fd>` (a pipe opened so is
//! the same pipe, with an open file description of our own), non-blocking, so that
//! the shadow's own flags stay as they are and a call never waits long. How far
//! each stream got is counted here, so a chunk sent twice (its answer lost) is
//! written once, and one asked for twice is taken out once.

use common::migproto::{Input, InputAsk, Output, OutputChunk};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one call waits for room in a full pipe.
const WAIT: Duration = Duration::from_millis(200);

/// How long one call waits for input to come (if the host holds none).
const INPUT_WAIT: Duration = Duration::from_secs(1);

/// The capacity given to a pipe at home that a migrated process reads: how far
/// its writer can get ahead of the relay (each ask takes what the pipe holds).
const INPUT_PIPE: i32 = 1 << 20;

/// A relayed stream: (migration id, the host's stream name, fd).
type StreamKey = (String, String, i32);

/// Bytes written so far into each relayed stream.
#[derive(Default)]
pub struct Streams {
    at: Mutex<HashMap<StreamKey, Arc<Mutex<u64>>>>,
}

impl Streams {
    /// Writes `chunk` into fd `chunk.fd` of process `pid` (a shadow, or an original
    /// held frozen). Blocks for at most [`WAIT`]; call it off the async threads.
    pub fn write(&self, pid: i32, chunk: &OutputChunk) -> Result<Output, String> {
        let pos = self.stream(&chunk.id, &chunk.stream, chunk.fd, chunk.offset);
        // One writer per stream at a time (a chunk sent again while the first try
        // still writes waits for it, then finds its bytes counted).
        let mut pos = pos.lock().unwrap();
        let start = chunk.offset.unwrap_or(*pos);
        if start > *pos {
            return Err(format!(
                "fd {}: bytes {}..{start} of this stream never came",
                chunk.fd, *pos
            ));
        }
        let len = chunk.data.len();
        let skip = ((*pos - start) as usize).min(len);
        if skip == len {
            return Ok(Output::Taken {
                bytes: len as u64,
                end: *pos,
            });
        }
        let path = format!("/proc/{pid}/fd/{}", chunk.fd);
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            // A pipe with no reader left.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(Output::ReaderGone),
            Err(e) => return Err(format!("opening {path}: {e}")),
        };
        let is_pipe = f
            .metadata()
            .map(|m| m.file_type().is_fifo())
            .unwrap_or(false);
        if !is_pipe {
            return Err(format!(
                "fd {} of pid {pid} is not a pipe (nothing written)",
                chunk.fd
            ));
        }
        let deadline = Instant::now() + WAIT;
        let mut done = skip;
        let mut gone = false;
        while done < len {
            match f.write(&chunk.data[done..]) {
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    wait_writable(&f, left);
                }
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    gone = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("writing into {path}: {e}")),
            }
        }
        *pos += (done - skip) as u64;
        if gone {
            return Ok(Output::ReaderGone);
        }
        Ok(Output::Taken {
            bytes: done as u64,
            end: *pos,
        })
    }

    /// How far a stream got. One not seen yet (its first chunk, or home-proxy
    /// restarted since) starts at `start` (what the host says), else at 0.
    fn stream(&self, id: &str, stream: &str, fd: i32, start: Option<u64>) -> Arc<Mutex<u64>> {
        self.at
            .lock()
            .unwrap()
            .entry((id.to_string(), stream.to_string(), fd))
            .or_insert_with(|| Arc::new(Mutex::new(start.unwrap_or(0))))
            .clone()
    }

    /// Forgets the streams of migration `id` (it ended, or came home).
    pub fn forget(&self, id: &str) {
        self.at.lock().unwrap().retain(|(i, _, _), _| i != id);
    }

    /// Answers `ask` from fd `ask.fd` of process `pid` (see [`InputAsk`]): takes out
    /// what the host has taken, then copies (tee) up to `max` bytes after the
    /// `skip` the host holds, waiting for them up to [`INPUT_WAIT`] if it holds
    /// none. Call it off the async threads.
    pub fn read(&self, pid: i32, ask: &InputAsk) -> Result<Input, String> {
        // After a restart of home-proxy, a chunk copied but not counted as taken
        // comes again.
        let pos = self.stream(&ask.id, &ask.stream, ask.fd, ask.taken);
        let mut pos = pos.lock().unwrap();
        let taken = ask.taken.unwrap_or(*pos);
        if taken < *pos {
            return Err(format!(
                "fd {}: the host has {taken} bytes of this stream, fewer than the {} taken out here",
                ask.fd, *pos
            ));
        }
        let path = format!("/proc/{pid}/fd/{}", ask.fd);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("opening {path}: {e}"))?;
        if !f
            .metadata()
            .map(|m| m.file_type().is_fifo())
            .unwrap_or(false)
        {
            return Err(format!("fd {} of pid {pid} is not a pipe", ask.fd));
        }
        let mut f = f;
        let mut left = (taken - *pos) as usize;
        let mut scratch = vec![0u8; left.min(1 << 20)];
        while left > 0 {
            let want = left.min(scratch.len());
            match f.read(&mut scratch[..want]) {
                Ok(0) => break,
                Ok(k) => left -= k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        *pos = taken - left as u64;
        if left > 0 {
            return Err(format!(
                "fd {}: {left} bytes the host has were no longer in the pipe here (read by another reader?)",
                ask.fd
            ));
        }
        let skip = ask.skip as usize;
        let at = *pos + skip as u64;
        if ask.max == 0 {
            return Ok(Input::Data {
                at,
                data: Vec::new(),
            });
        }
        // Room for the writer to get ahead (the pipe only grows).
        if migd::sys::pipe_size(f.as_raw_fd()).is_ok_and(|n| n < INPUT_PIPE) {
            let _ = migd::sys::set_pipe_size(f.as_raw_fd(), INPUT_PIPE);
        }
        if skip == 0 {
            wait_readable(&f, INPUT_WAIT);
        }
        let (r, w) = migd::sys::pipe().map_err(|e| format!("pipe: {e}"))?;
        let want = skip + ask.max as usize;
        let _ =
            migd::sys::set_pipe_size(w.as_raw_fd(), want.clamp(4096, INPUT_PIPE as usize) as i32);
        match migd::sys::tee(f.as_raw_fd(), w.as_raw_fd(), want) {
            Ok(0) => Ok(Input::End),
            Ok(k) => {
                let mut data = vec![0u8; k];
                std::fs::File::from(r)
                    .read_exact(&mut data)
                    .map_err(|e| format!("reading what tee copied: {e}"))?;
                data.drain(..skip.min(k));
                Ok(Input::Data { at, data })
            }
            Err(nix::errno::Errno::EAGAIN) => Ok(Input::Data {
                at,
                data: Vec::new(),
            }),
            Err(e) => Err(format!("tee from {path}: {e}")),
        }
    }
}

/// Waits up to `d` for bytes (or the end) in a pipe.
fn wait_readable(f: &std::fs::File, d: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = d.as_millis().clamp(1, 10_000) as u16;
    let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// Waits up to `d` for room in a pipe.
fn wait_writable(f: &std::fs::File, d: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = d.as_millis().clamp(1, 1000) as u16;
    let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLOUT)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    fn chunk(offset: Option<u64>, data: &[u8]) -> OutputChunk {
        OutputChunk {
            id: "ws1-1-0".into(),
            stream: "img".into(),
            fd: 0,
            offset,
            data: data.to_vec(),
        }
    }

    /// Our own pipe, written through /proc/self/fd as home-proxy writes a shadow's.
    #[test]
    fn chunks_are_written_once_in_order_and_a_lost_reader_is_told() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let s = Streams::default();
        let mut c = chunk(Some(0), b"hello ");
        c.fd = w.as_raw_fd();
        let pid = std::process::id() as i32;
        assert_eq!(
            s.write(pid, &c).unwrap(),
            Output::Taken { bytes: 6, end: 6 }
        );
        // Sent again (its answer lost): counted, not written.
        assert_eq!(
            s.write(pid, &c).unwrap(),
            Output::Taken { bytes: 6, end: 6 }
        );
        // Overlapping: only the new part is written.
        c.offset = Some(3);
        c.data = b"lo world".to_vec();
        assert_eq!(
            s.write(pid, &c).unwrap(),
            Output::Taken { bytes: 8, end: 11 }
        );
        // A restarted relay: where home is.
        c.offset = None;
        c.data = b"!".to_vec();
        assert_eq!(
            s.write(pid, &c).unwrap(),
            Output::Taken { bytes: 1, end: 12 }
        );
        // A gap is an error, and nothing is written.
        c.offset = Some(20);
        assert!(s.write(pid, &c).is_err());
        let mut got = vec![0u8; 12];
        std::fs::File::from(r).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello world!");
        // The reader is gone now.
        c.offset = None;
        assert_eq!(s.write(pid, &c).unwrap(), Output::ReaderGone);
    }

    /// After a restart of home-proxy (nothing counted) a relay goes on at its offset.
    #[test]
    fn a_stream_not_seen_yet_starts_where_its_chunk_says() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let s = Streams::default();
        let mut c = chunk(Some(1000), b"abc");
        c.fd = w.as_raw_fd();
        let pid = std::process::id() as i32;
        assert_eq!(
            s.write(pid, &c).unwrap(),
            Output::Taken {
                bytes: 3,
                end: 1003
            }
        );
        let mut got = [0u8; 3];
        std::fs::File::from(r).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
    }

    #[test]
    fn a_full_pipe_takes_what_fits_and_says_so() {
        let (_r, w) = nix::unistd::pipe().unwrap();
        let s = Streams::default();
        let mut c = chunk(Some(0), &vec![7u8; 1 << 20]);
        c.fd = w.as_raw_fd();
        let t = Instant::now();
        let Output::Taken { bytes, end } = s.write(std::process::id() as i32, &c).unwrap() else {
            panic!("the reader is there");
        };
        assert!(bytes > 0 && bytes < 1 << 20, "took {bytes}");
        assert_eq!(bytes, end);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    fn ask(taken: Option<u64>, max: u32, fd: i32) -> InputAsk {
        InputAsk {
            id: "ws1-1-0".into(),
            stream: "img".into(),
            fd,
            taken,
            skip: 0,
            max,
        }
    }

    /// Copied, not taken, until the host says it has the bytes; taken once; then
    /// the end once the writer is gone and the pipe is empty.
    #[test]
    fn input_is_taken_out_only_once_the_host_has_it() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"abcdef").unwrap();
        let s = Streams::default();
        let pid = std::process::id() as i32;
        let fd = r.as_raw_fd();
        let data = |i: Input| match i {
            Input::Data { data, .. } => data,
            Input::End => panic!("not the end yet"),
        };
        assert_eq!(data(s.read(pid, &ask(Some(0), 4, fd)).unwrap()), b"abcd");
        // The answer was lost: asked again, the same bytes.
        assert_eq!(data(s.read(pid, &ask(Some(0), 4, fd)).unwrap()), b"abcd");
        // The host put 4 in: they go, the rest comes.
        assert_eq!(data(s.read(pid, &ask(Some(4), 100, fd)).unwrap()), b"ef");
        // The host holds 1 more byte than it put in (skip): from the one after.
        let mut a = ask(Some(4), 100, fd);
        a.skip = 1;
        assert_eq!(
            s.read(pid, &a).unwrap(),
            Input::Data {
                at: 5,
                data: b"f".to_vec()
            }
        );
        // The host says it has fewer than were taken out: refused.
        assert!(s.read(pid, &ask(Some(2), 100, fd)).is_err());
        // Only taking out (max 0), then the end.
        assert!(data(s.read(pid, &ask(Some(6), 0, fd)).unwrap()).is_empty());
        drop(w);
        assert_eq!(s.read(pid, &ask(None, 100, fd)).unwrap(), Input::End);
    }

    #[test]
    fn an_fd_that_is_not_a_pipe_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let mut c = chunk(Some(0), b"x");
        c.fd = f.as_raw_fd();
        let e = Streams::default()
            .write(std::process::id() as i32, &c)
            .unwrap_err();
        assert!(e.contains("not a pipe"), "{e}");
    }
}

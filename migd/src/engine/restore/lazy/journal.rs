//! The pager's journal: the layout changes it was told of (remove, unmap, remap), the
//! children it serves (fork, with the stub's fd number of their userfaultfd) and the
//! address spaces it finished. It lives in a memfd that the pid-namespace stub holds
//! beside the userfaultfds, so that a server started after the first one died
//! ([`super::Pager::resume`]) knows what the kernel told the first one: without it, a
//! range dropped with MADV_DONTNEED would get its image data back (a stale page), and
//! a range moved by mremap would be served at its old address.
//!
//! Records are 48 bytes (six native-endian u64: kind, then its fields), appended with
//! one write each. A change is written before the pager acts on it; what is lost if
//! the server dies between reading an event and writing it is that one event.

use super::ranges::Ranges;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

const NAME: &str = "ferry-lazy-journal";
const REC: usize = 48;

/// A change of an address space's layout, as the userfaultfd reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// MADV_DONTNEED/REMOVE: zeros now, never filled from the image.
    Remove { start: u64, end: u64 },
    /// munmap: gone.
    Unmap { start: u64, end: u64 },
    /// mremap: the pages of `[from, from+len)` are at `to` now.
    Remap { from: u64, to: u64, len: u64 },
}

/// What one address space still needs: image pages missing, ranges registered.
#[derive(Debug, Clone, Default)]
pub(super) struct Layout {
    pub(super) missing: Ranges,
    pub(super) registered: Ranges,
}

impl Layout {
    pub(super) fn apply(&mut self, c: &Change) {
        match *c {
            Change::Remove { start, end } => {
                self.missing.cut(start, end);
            }
            Change::Unmap { start, end } => {
                self.missing.cut(start, end);
                self.registered.cut(start, end);
            }
            Change::Remap { from, to, len } => {
                for (s, e, o) in self.missing.cut(from, from + len) {
                    self.missing.insert(s - from + to, e - from + to, o);
                }
                for (s, e, _) in self.registered.cut(from, from + len) {
                    self.registered.insert(s - from + to, e - from + to, 0);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Record {
    /// Space 0 (the restored process) is served through the stub's fd `fd`.
    Root {
        fd: i32,
    },
    Change {
        space: u64,
        change: Change,
    },
    /// `child` was forked from `parent` (with its layout then); the stub holds its
    /// userfaultfd as `fd`.
    Fork {
        parent: u64,
        child: u64,
        fd: i32,
    },
    /// `space` needs nothing any more (every page in, or its process gone).
    Done {
        space: u64,
    },
}

impl Record {
    fn encode(&self) -> [u8; REC] {
        let w: [u64; 6] = match *self {
            Record::Root { fd } => [1, fd as u64, 0, 0, 0, 0],
            Record::Change { space, change } => match change {
                Change::Remove { start, end } => [2, space, start, end, 0, 0],
                Change::Unmap { start, end } => [3, space, start, end, 0, 0],
                Change::Remap { from, to, len } => [4, space, from, to, len, 0],
            },
            Record::Fork { parent, child, fd } => [5, parent, child, fd as u64, 0, 0],
            Record::Done { space } => [6, space, 0, 0, 0, 0],
        };
        let mut b = [0u8; REC];
        for (i, v) in w.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Option<Record> {
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        let change = |c| Record::Change {
            space: w(1),
            change: c,
        };
        Some(match w(0) {
            1 => Record::Root { fd: w(1) as i32 },
            2 => change(Change::Remove {
                start: w(2),
                end: w(3),
            }),
            3 => change(Change::Unmap {
                start: w(2),
                end: w(3),
            }),
            4 => change(Change::Remap {
                from: w(2),
                to: w(3),
                len: w(4),
            }),
            5 => Record::Fork {
                parent: w(1),
                child: w(2),
                fd: w(3) as i32,
            },
            6 => Record::Done { space: w(1) },
            _ => return None,
        })
    }
}

pub(super) struct Journal {
    file: std::fs::File,
    len: u64,
}

impl Journal {
    pub(super) fn create() -> Result<Journal, nix::errno::Errno> {
        let fd = nix::sys::memfd::memfd_create(NAME, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        Ok(Journal {
            file: std::fs::File::from(fd),
            len: 0,
        })
    }

    pub(super) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Takes the journal held by the stub `stub` (found by its name among the
    /// stub's fds), if there is one.
    pub(super) fn take_from(stub: i32) -> Result<Option<Journal>, String> {
        let dir = format!("/proc/{stub}/fd");
        let rd = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
        for e in rd.flatten() {
            let is_journal = std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with(&format!("/memfd:{NAME}")));
            let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if is_journal {
                let pidfd =
                    crate::sys::pidfd_open(stub).map_err(|e| format!("pidfd_open({stub}): {e}"))?;
                let fd = crate::sys::pidfd_getfd(pidfd.as_raw_fd(), n)
                    .map_err(|e| format!("pidfd_getfd(stub {stub}, fd {n}): {e}"))?;
                let file = std::fs::File::from(fd);
                let len = file.metadata().map(|m| m.len()).unwrap_or(0) / REC as u64 * REC as u64;
                return Ok(Some(Journal { file, len }));
            }
        }
        Ok(None)
    }

    pub(super) fn append(&mut self, r: &Record) {
        match self.file.write_all_at(&r.encode(), self.len) {
            Ok(()) => self.len += REC as u64,
            Err(e) => tracing::warn!(error = %e, record = ?r, "writing the lazy journal"),
        }
    }

    pub(super) fn records(&self) -> Vec<Record> {
        let mut b = vec![0u8; self.len as usize];
        if self.file.read_exact_at(&mut b, 0).is_err() {
            return Vec::new();
        }
        b.chunks_exact(REC).map_while(Record::decode).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written() {
        let mut j = Journal::create().unwrap();
        let rs = [
            Record::Root { fd: 3 },
            Record::Change {
                space: 0,
                change: Change::Remap {
                    from: 0x1000,
                    to: 0x9000,
                    len: 0x2000,
                },
            },
            Record::Fork {
                parent: 0,
                child: 1,
                fd: 7,
            },
            Record::Change {
                space: 1,
                change: Change::Remove {
                    start: 0x9000,
                    end: 0xa000,
                },
            },
            Record::Done { space: 1 },
        ];
        for r in &rs {
            j.append(r);
        }
        assert_eq!(j.records(), rs);
    }

    #[test]
    fn a_remap_moves_missing_pages_with_their_offsets() {
        let mut l = Layout::default();
        l.missing.insert(0x1000, 0x4000, 0);
        l.registered.insert(0x1000, 0x4000, 0);
        l.apply(&Change::Remap {
            from: 0x2000,
            to: 0x10000,
            len: 0x1000,
        });
        l.apply(&Change::Remove {
            start: 0x3000,
            end: 0x4000,
        });
        assert_eq!(l.missing.find(0x10000), Some((0x10000, 0x11000, 0x1000)));
        assert_eq!(l.missing.find(0x2000), None);
        assert_eq!(l.missing.find(0x3000), None);
        assert_eq!(l.registered.find(0x3000), Some((0x3000, 0x4000, 0x2000)));
    }
}

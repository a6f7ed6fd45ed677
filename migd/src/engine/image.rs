//! The image: a versioned JSON manifest (`manifest.json`, with a checksummed header
//! line) plus one page file (`pages.img`) whose 1 MiB chunks each carry a crc32c in
//! the manifest. See docs/image-format.md.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const IMAGE_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const PAGES_FILE: &str = "pages.img";
pub const CHUNK: u64 = 1 << 20;
/// Pages flushed after the process left (a lazy migration's source writes them while
/// the destination already runs), in CHUNK-sized pieces like pages.img.
pub const LATE_FILE: &str = "late.img";
/// The flusher's readiness records: (chunk + 1: u32, crc32c: u32), little-endian,
/// one per chunk of late.img written (zero: not written yet).
pub const LATE_READY_FILE: &str = "late.ready";
/// The destination's wants: chunk numbers + 1 (u32, little-endian) it faults on,
/// served first; [`LATE_DONE`] when it needs nothing more (zero: not written yet).
pub const LATE_WANT_FILE: &str = "late.want";
/// The want record saying "every page is in: stop flushing".
pub const LATE_DONE: u32 = u32::MAX;
/// Pre-copy's progress records, written while the rounds go on (every 64 MiB of a
/// round, and each round's end once the next round starts): pages.img's length
/// then (u64: the bytes below it are on the store's server), the number of ranges
/// (u64), and that many `(start, end)` byte ranges of pages.img (u64 each) whose
/// page copies were replaced since the record before; little-endian. pages.img is
/// only appended to, so the bytes below a listed length never change. The
/// destination reads them while later rounds run (`engine::restore::warm`),
/// skipping what was replaced.
pub const PAGES_READY_FILE: &str = "pages.ready";
/// Replaced ranges one pages.ready record lists at most (the largest are kept: the
/// list only saves the destination reads).
pub const PAGES_READY_MAX_RANGES: usize = 1 << 16;
/// A run offset with this bit set lies in late.img (the bit cleared), not pages.img.
pub const LATE: u64 = 1 << 62;
const MAGIC: &str = "FERRY-IMAGE";

/// Everything about one process except its page contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The pid as the process saw it (innermost pid namespace).
    pub pid: i32,
    pub comm: String,
    pub exe: String,
    pub threads: Vec<ThreadImage>,
    pub shared_pending: Vec<Vec<u8>>,
    pub sigactions: Vec<SigAction>,
    /// ITIMER_REAL, VIRTUAL, PROF: [interval_sec, interval_usec, value_sec, value_usec].
    pub itimers: [[i64; 4]; 3],
    pub areas: Vec<Area>,
    pub mm: MmFields,
    pub rlimits: Vec<(i32, u64, u64)>,
    pub cwd: String,
    /// The process's root directory (chroot), as the dumper saw it; "/" when the
    /// process is not chrooted (images without the field are).
    #[serde(default = "slash")]
    pub root: String,
    pub umask: u32,
    pub personality: u64,
    pub creds: Creds,
    pub fds: Vec<FdImage>,
    /// Size of pages.img and the crc32c of each CHUNK-sized piece of it.
    pub pages_len: u64,
    pub chunk_crcs: Vec<u32>,
    /// Size of late.img: pages written after the freeze (run offsets with the
    /// [`LATE`] bit). Their checksums arrive in late.ready as they are written; an
    /// image with late pages restores only lazily.
    #[serde(default)]
    pub late_len: u64,
    /// Size of the XSAVE buffers (must match at restore).
    pub xsave_len: usize,
    /// The process was stopped by job control (SIGSTOP/SIGTSTP) when dumped; it is
    /// stopped again after restore.
    #[serde(default)]
    pub stopped: bool,
    /// Process attributes set with prctl.
    #[serde(default)]
    pub prctl: PrctlState,
    /// POSIX timers (timer_create), recreated with their ids.
    #[serde(default)]
    pub posix_timers: Vec<PosixTimer>,
}

/// A pipe with one end in the process and the other outside it (see
/// [`Manifest::outside_pipes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutsidePipe {
    /// The lowest fd of the process naming this end.
    pub fd: i32,
    pub inode: u64,
    /// The process holds the write end (it writes, someone outside reads); else the
    /// read end (someone outside writes).
    pub writes: bool,
}

impl Manifest {
    /// The pipes with one end in the process and the other outside it: a parent's
    /// or a shell's pipe, say `prog | sort` (prog writes) or `cat f | prog` (prog
    /// reads); one per pipe, by the lowest fd naming it. A migration relays them
    /// from and to home instead of giving the process pipes nobody else holds
    /// (docs/migration.md, "Pipes").
    pub fn outside_pipes(&self) -> Vec<OutsidePipe> {
        outside_pipes(&self.fds)
    }
}

/// See [`Manifest::outside_pipes`].
fn outside_pipes(fds: &[FdImage]) -> Vec<OutsidePipe> {
    let held = |inode: u64, write_end: bool| {
        fds.iter().any(|f| {
            matches!(f.kind, FdKind::Pipe { inode: i, write_end: w, .. } if i == inode && w == write_end)
        })
    };
    let mut sorted: Vec<&FdImage> = fds.iter().collect();
    sorted.sort_by_key(|f| f.fd);
    let mut out: Vec<OutsidePipe> = Vec::new();
    for f in sorted {
        if let FdKind::Pipe {
            inode, write_end, ..
        } = f.kind
        {
            if !held(inode, !write_end) && !out.iter().any(|p| p.inode == inode) {
                out.push(OutsidePipe {
                    fd: f.fd,
                    inode,
                    writes: write_end,
                });
            }
        }
    }
    out
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThreadImage {
    /// The tid as the process saw it.
    pub tid: i32,
    /// user_regs_struct as 27 words, in the kernel's order.
    pub regs: Vec<u64>,
    #[serde(with = "hex_bytes")]
    pub xsave: Vec<u8>,
    pub sigmask: u64,
    pub pending: Vec<Vec<u8>>,
    pub clear_tid: u64,
    pub robust_list: (u64, u64),
    pub rseq: Option<Rseq>,
    /// sigaltstack: (ss_sp, ss_flags, ss_size).
    pub altstack: (u64, i32, u64),
    pub name: String,
}

/// prctl-settable attributes (restored after the credentials, which reset some).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrctlState {
    pub dumpable: i64,
    pub no_new_privs: i64,
    pub pdeath_sig: i64,
    pub child_subreaper: i64,
    pub thp_disable: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PosixTimer {
    pub id: i32,
    pub clockid: i32,
    pub signo: i32,
    pub sival: u64,
    /// SIGEV_* (with SIGEV_THREAD_ID when a thread is notified).
    pub notify: i32,
    /// The tid to notify (as the process sees it) with SIGEV_THREAD_ID.
    pub tid: i32,
    /// [interval_sec, interval_nsec, value_sec, value_nsec]; value is time left.
    pub setting: [i64; 4],
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Rseq {
    pub ptr: u64,
    pub len: u32,
    pub sig: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SigAction {
    pub sig: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Creds {
    pub uid: [u32; 3],
    pub gid: [u32; 3],
    pub groups: Vec<u32>,
    /// Capability sets of the leader (/proc/PID/status CapInh, CapPrm, CapEff, CapBnd,
    /// CapAmb); absent in older images, which restore with root's full sets.
    #[serde(default)]
    pub caps: Option<Caps>,
}

/// Capability sets, one bit per capability.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Caps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum AreaKind {
    Anon,
    /// A file mapping; `size`/`mtime` are checked at restore when private.
    File {
        path: String,
        size: u64,
        mtime: i64,
        mtime_nsec: i64,
    },
    /// A file mapping whose file was deleted: its contents travel as pages.
    DeletedFile {
        path: String,
    },
    /// Shared anonymous memory ("/dev/zero (deleted)", "/SYSV…"): contents travel.
    SharedMem {
        name: String,
    },
    /// A shared mapping of a memfd; the memfd (by inode) is recreated once and shared
    /// with the fds naming the same inode. Contents travel as pages.
    Memfd {
        name: String,
        ino: u64,
        size: u64,
    },
    Vvar,
    VvarVclock,
    Vdso,
}

/// Whether an area's pages can come in on demand (and so be written after the
/// freeze): private anonymous memory, but not wipe-on-fork areas (a forked child must
/// see zeros there, not the image). MISSING-mode userfaultfd takes no other kind.
pub fn lazy_kind(kind: &AreaKind, shared: bool, madv: &[String]) -> bool {
    *kind == AreaKind::Anon && !shared && !madv.iter().any(|f| f == "wf")
}

/// Bytes filled before the process runs on each side of a thread's stack pointer
/// (the kernel writes signal frames there before anyone could serve a fault).
pub const STACK_WINDOW: u64 = 64 * 1024;

/// The address ranges inside lazy areas that a lazy restore fills before the process
/// runs (so a lazy dump writes them at the freeze): around each thread's stack
/// pointer and each thread's rseq area (the kernel writes it at registration).
/// Page-aligned, sorted, overlapping ranges merged.
pub fn eager_windows(threads: &[ThreadImage], page: u64) -> Vec<(u64, u64)> {
    let mut w = Vec::new();
    for t in threads {
        if let Some(&sp) = t.regs.get(19) {
            let lo = sp.saturating_sub(STACK_WINDOW) & !(page - 1);
            let hi = (sp + STACK_WINDOW + page - 1) & !(page - 1);
            w.push((lo, hi));
        }
        if let Some(rs) = t.rseq {
            let lo = rs.ptr & !(page - 1);
            let hi = (rs.ptr + rs.len as u64 + page - 1) & !(page - 1);
            w.push((lo, hi));
        }
    }
    w.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (lo, hi) in w {
        match out.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// One area of the address space.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Area {
    pub start: u64,
    pub end: u64,
    pub prot: i32,
    pub shared: bool,
    pub offset: u64,
    pub growsdown: bool,
    pub name: String,
    pub kind: AreaKind,
    pub madv: Vec<String>,
    /// Runs of saved pages: (first address, page count, offset in pages.img).
    pub runs: Vec<(u64, u64, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FdKind {
    /// A file reopened by path at its offset.
    File {
        path: String,
        pos: u64,
    },
    /// A file with no name left: its contents travel (`data` is a page-file range).
    Deleted {
        path: String,
        pos: u64,
        data_off: u64,
        len: u64,
        mode: u32,
    },
    /// One end of a pipe; both ends inside the process share `inode`.
    Pipe {
        inode: u64,
        write_end: bool,
        size: i32,
        data: Vec<u8>,
    },
    /// A FIFO reopened by path. `data` holds the bytes buffered in it at the dump
    /// (read with tee, not consumed), carried by the first fd naming the FIFO; it is
    /// written back at restore only if the FIFO is then empty (see restore/files.rs).
    /// Absent in images written before FIFO data was carried (read as empty).
    Fifo {
        path: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        data: Vec<u8>,
    },
    /// A memfd: contents at `pages.img[data_off..+len]` (empty for a dup), seals
    /// re-added after filling; shared with mappings of the same inode.
    Memfd {
        name: String,
        ino: u64,
        pos: u64,
        data_off: u64,
        len: u64,
        seals: i32,
    },
    /// A terminal reopened by path, with its modes and window size put back.
    Tty {
        path: String,
        state: crate::sys::TtyState,
    },
    EventFd {
        count: u64,
        semaphore: bool,
    },
    SignalFd {
        mask: u64,
    },
    /// it_value is the time left (relative), as fdinfo shows it.
    TimerFd {
        clockid: i32,
        ticks: u64,
        value: (u64, u64),
        interval: (u64, u64),
    },
    /// Registered targets: (fd, events, data), re-added once every fd is in place.
    Epoll {
        targets: Vec<(i32, u32, u64)>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdImage {
    pub fd: i32,
    pub flags: i32,
    pub cloexec: bool,
    /// A lower fd sharing the same open file description.
    pub dup_of: Option<i32>,
    pub kind: FdKind,
}

/// Errors reading or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {path}: not a Ferry image (bad header line); was it written by `migd dump`?")]
    BadHeader { path: PathBuf },
    #[error("image {path}: version {found}, this migd reads version {IMAGE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("image {path}: manifest is {found} bytes, header says {expected} (truncated?)")]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("image {path}: checksum mismatch in {what}; the image is corrupt, dump again")]
    Checksum { path: PathBuf, what: String },
    #[error("image {path}: {late} bytes of its pages are written after the freeze (late.img); only a lazy restore reads such an image")]
    Late { path: PathBuf, late: u64 },
    #[error("image {path}: cannot decode manifest: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the manifest with its header line `FERRY-IMAGE v1 len=N crc32c=X`.
pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), ImageError> {
    write_manifest_bytes(dir, &manifest_bytes(dir, m)?, true)
}

/// The bytes [`write_manifest`] writes for `m` in `dir` (header line and body): a
/// source hands them to the destination with `restore` so that the freeze need not
/// wait for the store to give them back ([`manifest_from`]).
pub fn manifest_bytes(dir: &Path, m: &Manifest) -> Result<Vec<u8>, ImageError> {
    let body = serde_json::to_vec(m).map_err(|source| ImageError::Decode {
        path: dir.join(MANIFEST_FILE),
        source,
    })?;
    let header = format!(
        "{MAGIC} v{} len={} crc32c={:08x}\n",
        m.version,
        body.len(),
        crc32c::crc32c(&body)
    );
    let mut bytes = header.into_bytes();
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Writes the manifest's bytes ([`manifest_bytes`]) into `dir`; without `sync` it is
/// only closed (close(2) answers whether it reached the store's server, so that
/// another node can read it), and [`sync_image`] makes the image durable later.
pub fn write_manifest_bytes(dir: &Path, bytes: &[u8], sync: bool) -> Result<(), ImageError> {
    let path = dir.join(MANIFEST_FILE);
    let mut f = std::fs::File::create(&path).map_err(io_err(&path))?;
    f.write_all(bytes).map_err(io_err(&path))?;
    if sync {
        f.sync_all().map_err(io_err(&path))?;
    }
    crate::sys::close_checked(f).map_err(io_err(&path))
}

/// Makes an image written without syncing ([`PageWriter::without_sync`],
/// [`write_manifest_bytes`]) durable: pages.img and the manifest are synced.
pub fn sync_image(dir: &Path) -> Result<(), ImageError> {
    for name in [PAGES_FILE, MANIFEST_FILE] {
        let path = dir.join(name);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&path))?;
    }
    Ok(())
}

/// Reads and checks the manifest, then checks every chunk of pages.img.
pub fn read_image(dir: &Path) -> Result<Manifest, ImageError> {
    read_image_given(dir, None)
}

/// [`read_image`], with the manifest's bytes as handed over (see [`manifest_from`]).
pub fn read_image_given(dir: &Path, given: Option<&[u8]>) -> Result<Manifest, ImageError> {
    let m = manifest_from(dir, given)?;
    if m.late_len > 0 {
        return Err(ImageError::Late {
            path: dir.to_path_buf(),
            late: m.late_len,
        });
    }
    check_pages(dir, &m)?;
    Ok(m)
}

/// Reads and checks the manifest only; pages.img is not read (a lazy restore checks
/// each chunk's CRC-32C when it reads the chunk).
pub fn read_manifest(dir: &Path) -> Result<Manifest, ImageError> {
    manifest_from(dir, None)
}

/// The manifest of the image in `dir`: `given` (its bytes as the source wrote them,
/// handed over with `restore`: a 1 GiB process's is ~45 KB, whose read through the
/// store costs the freeze 3-12 ms of round trips), else read from `dir`. Checked
/// the same either way (header, length, CRC-32C), and errors name the file.
pub fn manifest_from(dir: &Path, given: Option<&[u8]>) -> Result<Manifest, ImageError> {
    let path = dir.join(MANIFEST_FILE);
    match given {
        Some(data) => {
            tracing::debug!(bytes = data.len(), "manifest handed over");
            parse_manifest(path, data)
        }
        None => {
            let data = std::fs::read(&path).map_err(io_err(&path))?;
            tracing::debug!(bytes = data.len(), "manifest read");
            parse_manifest(path, &data)
        }
    }
}

/// Checks and decodes a manifest's bytes (`path` names it in errors).
fn parse_manifest(path: PathBuf, data: &[u8]) -> Result<Manifest, ImageError> {
    let nl = data
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| ImageError::BadHeader { path: path.clone() })?;
    let header = std::str::from_utf8(&data[..nl])
        .map_err(|_| ImageError::BadHeader { path: path.clone() })?;
    let parts: Vec<&str> = header.split(' ').collect();
    if parts.len() != 4 || parts[0] != MAGIC {
        return Err(ImageError::BadHeader { path });
    }
    let version: u32 = parts[1]
        .strip_prefix('v')
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ImageError::BadHeader { path: path.clone() })?;
    if version != IMAGE_VERSION {
        return Err(ImageError::Version {
            path,
            found: version,
        });
    }
    let len: u64 = parts[2]
        .strip_prefix("len=")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ImageError::BadHeader { path: path.clone() })?;
    let crc = parts[3]
        .strip_prefix("crc32c=")
        .and_then(|v| u32::from_str_radix(v, 16).ok())
        .ok_or_else(|| ImageError::BadHeader { path: path.clone() })?;
    let body = &data[nl + 1..];
    if body.len() as u64 != len {
        return Err(ImageError::Truncated {
            path,
            expected: len,
            found: body.len() as u64,
        });
    }
    if crc32c::crc32c(body) != crc {
        return Err(ImageError::Checksum {
            path,
            what: "manifest".into(),
        });
    }
    let m: Manifest = serde_json::from_slice(body).map_err(|source| ImageError::Decode {
        path: path.clone(),
        source,
    })?;
    Ok(m)
}

/// The pages a lazy restore fills before the process runs (the runs of its shaping
/// manifest, see `restore::lazy::plan`), as the source read them from the frozen
/// process: handed to the destination with `restore` beside the manifest, so that
/// the freeze need not read their chunks of pages.img back from the store (a few
/// MiB of round trips). The bytes are the same as pages.img's at those offsets: the
/// process has not run since they were written.
///
/// Encoded as [`EAGER_MAGIC`], the range count and the CRC-32C of what follows
/// (two u32), then each range's pages.img offset and length (two u64), then the
/// ranges' bytes in that order; all little-endian.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EagerPages {
    /// (offset in pages.img, length), in the order of `data`.
    pub ranges: Vec<(u64, u64)>,
    /// The bytes of every range, one after the other.
    pub data: Vec<u8>,
}

/// The first bytes of an encoded [`EagerPages`].
pub const EAGER_MAGIC: &[u8; 8] = b"FERRYEP1";

impl EagerPages {
    /// Adds a range: `bytes` are pages.img's at `off`.
    pub fn push(&mut self, off: u64, bytes: &[u8]) {
        self.ranges.push((off, bytes.len() as u64));
        self.data.extend_from_slice(bytes);
    }

    /// Every range with its bytes.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let mut at = 0usize;
        self.ranges.iter().map(move |&(off, len)| {
            let b = &self.data[at..at + len as usize];
            at += len as usize;
            (off, b)
        })
    }

    /// The encoding described on the type.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut rest = Vec::with_capacity(self.ranges.len() * 16 + self.data.len());
        for &(off, len) in &self.ranges {
            rest.extend_from_slice(&off.to_le_bytes());
            rest.extend_from_slice(&len.to_le_bytes());
        }
        rest.extend_from_slice(&self.data);
        let mut out = Vec::with_capacity(16 + rest.len());
        out.extend_from_slice(EAGER_MAGIC);
        out.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&rest).to_le_bytes());
        out.extend_from_slice(&rest);
        out
    }

    /// Decodes and checks (magic, lengths, CRC-32C) what [`EagerPages::to_bytes`]
    /// made; `path` names the image in errors.
    pub fn from_bytes(path: &Path, b: &[u8]) -> Result<EagerPages, ImageError> {
        let bad = |what: &str| ImageError::Checksum {
            path: path.to_path_buf(),
            what: format!("the eager pages handed over ({what})"),
        };
        let (head, rest) = b.split_at_checked(16).ok_or_else(|| bad("too short"))?;
        if &head[..8] != EAGER_MAGIC {
            return Err(bad("bad magic"));
        }
        let n = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        if crc32c::crc32c(rest) != crc {
            return Err(bad("CRC-32C differs"));
        }
        let (table, data) = rest
            .split_at_checked(n.checked_mul(16).ok_or_else(|| bad("range count"))?)
            .ok_or_else(|| bad("range table cut short"))?;
        let ranges: Vec<(u64, u64)> = table
            .chunks_exact(16)
            .map(|r| {
                (
                    u64::from_le_bytes(r[..8].try_into().expect("8 bytes")),
                    u64::from_le_bytes(r[8..].try_into().expect("8 bytes")),
                )
            })
            .collect();
        let total = ranges
            .iter()
            .try_fold(0u64, |t, &(_, len)| t.checked_add(len));
        if total != Some(data.len() as u64) {
            return Err(bad("lengths do not add up to its data"));
        }
        Ok(EagerPages {
            ranges,
            data: data.to_vec(),
        })
    }
}

fn check_pages(dir: &Path, m: &Manifest) -> Result<(), ImageError> {
    let path = dir.join(PAGES_FILE);
    let f = std::fs::File::open(&path).map_err(io_err(&path))?;
    let len = f.metadata().map_err(io_err(&path))?.len();
    if len != m.pages_len {
        return Err(ImageError::Truncated {
            path,
            expected: m.pages_len,
            found: len,
        });
    }
    let expected_chunks = m.pages_len.div_ceil(CHUNK) as usize;
    if m.chunk_crcs.len() != expected_chunks {
        return Err(ImageError::Checksum {
            path,
            what: "chunk table".into(),
        });
    }
    let map = crate::sys::FileMap::map(std::os::fd::AsRawFd::as_raw_fd(&f), len as usize).map_err(
        |e| ImageError::Io {
            path: path.clone(),
            source: e.into(),
        },
    )?;
    for (i, chunk) in map.bytes().chunks(CHUNK as usize).enumerate() {
        if crc32c::crc32c(chunk) != m.chunk_crcs[i] {
            return Err(ImageError::Checksum {
                path,
                what: format!("page chunk {i} (bytes {}..)", i as u64 * CHUNK),
            });
        }
    }
    Ok(())
}

/// Appends a record to pages.ready (see [`PAGES_READY_FILE`]): the first `len`
/// bytes of pages.img are on the store's server; the copies in `replaced` (byte
/// ranges of pages.img, sorted and disjoint) were replaced since the last record.
/// The file is opened for the record and closed again (close(2) says whether it
/// reached the store's server), like late.ready's records; the record is one write.
pub fn note_pages_ready(
    dir: &Path,
    len: u64,
    mut joined: Vec<(u64, u64)>,
) -> Result<(), ImageError> {
    if joined.len() > PAGES_READY_MAX_RANGES {
        joined.sort_unstable_by_key(|r| std::cmp::Reverse(r.1 - r.0));
        joined.truncate(PAGES_READY_MAX_RANGES);
        joined.sort_unstable();
    }
    let mut rec = Vec::with_capacity(16 + 16 * joined.len());
    rec.extend_from_slice(&len.to_le_bytes());
    rec.extend_from_slice(&(joined.len() as u64).to_le_bytes());
    for (lo, hi) in joined {
        rec.extend_from_slice(&lo.to_le_bytes());
        rec.extend_from_slice(&hi.to_le_bytes());
    }
    let path = dir.join(PAGES_READY_FILE);
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(&rec)?;
            crate::sys::close_checked(f)
        })
        .map_err(io_err(&path))
}

/// One record of pages.ready (see [`PAGES_READY_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagesReady {
    /// pages.img's first `len` bytes are on the store.
    pub len: u64,
    /// Byte ranges of pages.img whose copies were replaced since the last record.
    pub replaced: Vec<(u64, u64)>,
    /// The record's own size in pages.ready.
    pub size: usize,
}

/// The first whole record of pages.ready in `buf`; `None` if `buf` does not hold
/// one whole (yet), or it makes no sense.
pub fn parse_pages_ready(buf: &[u8]) -> Option<PagesReady> {
    let word = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            buf.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let (len, n) = (word(0)?, word(1)?);
    if n > PAGES_READY_MAX_RANGES as u64 {
        return None;
    }
    let n = n as usize;
    let ranges = (0..n)
        .map(|k| Some((word(2 + 2 * k)?, word(3 + 2 * k)?)))
        .collect::<Option<Vec<_>>>()?;
    Some(PagesReady {
        len,
        replaced: ranges,
        size: 16 + 16 * n,
    })
}

/// Appends page data to pages.img, computing chunk checksums as it goes.
pub struct PageWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    len: u64,
    crcs: Vec<u32>,
    cur: u32,
    /// Synced at [`finish`](Self::finish) (else only closed).
    sync: bool,
}

impl PageWriter {
    pub fn create(dir: &Path) -> Result<PageWriter, ImageError> {
        let path = dir.join(PAGES_FILE);
        let f = crate::sys::create_write(&path, crate::sys::on_fuse(dir)).map_err(io_err(&path))?;
        Ok(PageWriter {
            path,
            file: std::io::BufWriter::with_capacity(4 << 20, f),
            len: 0,
            crcs: Vec::new(),
            cur: 0,
            sync: true,
        })
    }

    /// [`finish`](Self::finish) closes pages.img without syncing it (close(2) still
    /// answers whether the data reached the store's server, so that another node
    /// reads it); [`sync_image`] makes it durable later.
    pub fn without_sync(&mut self) {
        self.sync = false;
    }
    pub fn offset(&self) -> u64 {
        self.len
    }
    pub fn write(&mut self, mut data: &[u8]) -> Result<u64, ImageError> {
        let at = self.len;
        self.file.write_all(data).map_err(io_err(&self.path))?;
        while !data.is_empty() {
            let room = (CHUNK - self.len % CHUNK) as usize;
            let n = room.min(data.len());
            self.cur = crc32c::crc32c_append(self.cur, &data[..n]);
            self.len += n as u64;
            data = &data[n..];
            if self.len.is_multiple_of(CHUNK) {
                self.crcs.push(self.cur);
                self.cur = 0;
            }
        }
        Ok(at)
    }
    /// Writes out what is buffered (the file stays open for more).
    pub fn flush(&mut self) -> Result<(), ImageError> {
        self.file.flush().map_err(io_err(&self.path))
    }

    /// Flushes, syncs (unless [`without_sync`](Self::without_sync)) and closes;
    /// returns (length, chunk checksums).
    pub fn finish(mut self) -> Result<(u64, Vec<u32>), ImageError> {
        if !self.len.is_multiple_of(CHUNK) {
            self.crcs.push(self.cur);
        }
        let path = self.path;
        let f = self
            .file
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        if self.sync {
            f.sync_all().map_err(io_err(&path))?;
        }
        crate::sys::close_checked(f).map_err(io_err(&path))?;
        Ok((self.len, self.crcs))
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(b.len() * 2);
        for x in b {
            out.push_str(&format!("{x:02x}"));
        }
        s.serialize_str(&out)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd hex length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// The root directory of images that do not name one.
fn slash() -> String {
    "/".to_string()
}

#[cfg(test)]
mod tests {
    use super::{outside_pipes, EagerPages, FdImage, FdKind, OutsidePipe};
    use std::path::Path;

    fn pipe_fd(fd: i32, inode: u64, write_end: bool) -> FdImage {
        FdImage {
            fd,
            flags: if write_end { libc::O_WRONLY } else { 0 },
            cloexec: false,
            dup_of: None,
            kind: FdKind::Pipe {
                inode,
                write_end,
                size: 65536,
                data: Vec::new(),
            },
        }
    }

    /// Relayed: ends whose other end is elsewhere, once per pipe, by the lowest fd
    /// naming it. Not relayed: pipes with both ends in the process, files.
    #[test]
    fn only_pipes_with_one_end_outside_are_relayed() {
        let fds = vec![
            pipe_fd(7, 100, true), // stdout's pipe again, by a higher fd
            pipe_fd(1, 100, true),
            pipe_fd(2, 100, true),
            pipe_fd(0, 200, false), // stdin: written outside
            pipe_fd(4, 300, true),  // a pipe to itself
            pipe_fd(3, 300, false),
            pipe_fd(9, 400, true), // another pipe read elsewhere
            FdImage {
                fd: 5,
                flags: 0,
                cloexec: false,
                dup_of: None,
                kind: FdKind::File {
                    path: "/tmp/x".into(),
                    pos: 0,
                },
            },
        ];
        let p = |fd, inode, writes| OutsidePipe { fd, inode, writes };
        assert_eq!(
            outside_pipes(&fds),
            vec![p(0, 200, false), p(1, 100, true), p(9, 400, true)]
        );
        assert!(outside_pipes(&[]).is_empty());
    }

    #[test]
    fn eager_pages_come_back_as_they_went_and_any_damage_is_refused() {
        let mut e = EagerPages::default();
        e.push(0, &[1u8; 4096]);
        e.push(3 << 20, &[7u8; 8192]);
        let b = e.to_bytes();
        let back = EagerPages::from_bytes(Path::new("img"), &b).expect("decodes");
        assert_eq!(back, e);
        let got: Vec<(u64, usize)> = back.iter().map(|(o, d)| (o, d.len())).collect();
        assert_eq!(got, vec![(0, 4096), (3 << 20, 8192)]);
        for (what, bad) in [
            ("short", b[..b.len() - 1].to_vec()),
            ("flipped", {
                let mut x = b.clone();
                x[40] ^= 1;
                x
            }),
            ("magic", {
                let mut x = b.clone();
                x[0] = b'X';
                x
            }),
            ("nothing", Vec::new()),
        ] {
            let err = EagerPages::from_bytes(Path::new("img"), &bad)
                .expect_err(what)
                .to_string();
            assert!(err.contains("eager pages handed over"), "{what}: {err}");
        }
        // A range table claiming more than there is must not panic.
        let mut huge = b.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(EagerPages::from_bytes(Path::new("img"), &huge).is_err());
    }
}

//! Setting a lazy restore up: which pages are lazy ([`plan`]), the userfaultfd made
//! inside the target ([`create_uffd`]), and the areas registered once the process is
//! shaped ([`arm`]), which returns the [`Pager`].

use super::journal::{Journal, Layout, Record};
use super::ranges::Ranges;
use super::{LazyOptions, Pager, Space, PAGE};
use crate::engine::image::{self, Area, FdKind, Manifest};
use crate::engine::restore::spawn::StubLink;
use crate::engine::restore::{Ctx, RestoreError};
use crate::sys::uffd::{self, Uffd};
use crate::sys::{self, kabi};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// Whether an area is served lazily (see [`image::lazy_kind`]); an area without
/// saved pages needs no server.
fn is_lazy(a: &Area) -> bool {
    image::lazy_kind(&a.kind, a.shared, &a.madv) && !a.runs.is_empty()
}

/// The ranges filled eagerly inside lazy areas (see [`image::eager_windows`]).
fn eager_windows(m: &Manifest) -> Ranges {
    let mut w = Ranges::default();
    for (lo, hi) in image::eager_windows(&m.threads, PAGE) {
        w.insert(lo, hi, 0);
    }
    w
}

/// The image split for a lazy restore.
pub struct Plan {
    /// The manifest the ordinary restore path shapes with: lazy areas keep only the
    /// runs inside the eager windows.
    pub shaping: Manifest,
    /// Lazy areas: (start, end).
    pub areas: Vec<(u64, u64)>,
    /// Image pages of lazy areas not filled eagerly: address -> pages.img offset.
    pub(super) missing: Ranges,
    /// Ranges filled eagerly inside lazy areas.
    pub(super) eager: Ranges,
}

impl Plan {
    /// Bytes that will come in lazily.
    pub fn lazy_bytes(&self) -> u64 {
        self.missing.bytes()
    }
}

/// Splits the image into what is filled before the process runs and what is served
/// on demand.
pub fn plan(m: &Manifest) -> Plan {
    let windows = eager_windows(m);
    let mut shaping = m.clone();
    let mut missing = Ranges::default();
    let mut eager = Ranges::default();
    let mut areas = Vec::new();
    for a in shaping.areas.iter_mut() {
        if !is_lazy(a) {
            continue;
        }
        areas.push((a.start, a.end));
        let mut keep = Vec::new();
        for &(addr, n, off) in &a.runs {
            let mut run = Ranges::default();
            run.insert(addr, addr + n * PAGE, off);
            for (ws, we, _) in windows.0.iter().map(|(&s, &(e, o))| (s, e, o)) {
                for (s, e, o) in run.cut(ws, we) {
                    keep.push((s, (e - s) / PAGE, o));
                    eager.insert(s, e, 0);
                }
            }
            for (&s, &(e, o)) in &run.0 {
                missing.insert(s, e, o);
            }
        }
        keep.sort();
        a.runs = keep;
    }
    Plan {
        shaping,
        areas,
        missing,
        eager,
    }
}

/// Returns pages.img as the eager part of the restore sees it, in memory: the runs
/// `plan.shaping` fills and the fd contents at their offsets, zeros elsewhere (which
/// it never reads: those are the only parts of pages.img the restore's shaping
/// reads). The runs `given` holds (the source's [`image::EagerPages`], handed over
/// with `restore`) are taken from it; for the rest, every chunk holding them is read
/// with one read(2) (one request to the store, not one per page fault of a mapping
/// of pages.img) and checked (CRC-32C; the lazy part checks each chunk when it
/// reads it).
pub fn read_eager_chunks(
    images: &Path,
    m: &Manifest,
    plan: &Plan,
    given: Option<&image::EagerPages>,
) -> Result<sys::AnonMap, RestoreError> {
    let path = images.join(image::PAGES_FILE);
    let mut pages = sys::AnonMap::new(m.pages_len as usize).map_err(|e| RestoreError::Other {
        what: format!(
            "mapping {} bytes for pages.img's eager chunks: {e}",
            m.pages_len
        ),
    })?;
    let beyond = |what: String| image::ImageError::Checksum {
        path: path.clone(),
        what: format!("{what} lies beyond pages.img's {} bytes", m.pages_len),
    };
    let mut handed = std::collections::HashMap::new();
    for (off, b) in given.into_iter().flat_map(|e| e.iter()) {
        let slot = pages
            .bytes_mut()
            .get_mut(off as usize..off as usize + b.len())
            .ok_or_else(|| beyond(format!("an eager range handed over at {off}")))?;
        slot.copy_from_slice(b);
        handed.insert(off, b.len() as u64);
    }
    let mut chunks = std::collections::BTreeSet::new();
    let mut add = |off: u64, len: u64| {
        if len > 0 {
            for c in off / image::CHUNK..=(off + len - 1) / image::CHUNK {
                chunks.insert(c);
            }
        }
    };
    for a in &plan.shaping.areas {
        for &(_, n, off) in &a.runs {
            if handed.get(&off) != Some(&(n * PAGE)) {
                add(off, n * PAGE);
            }
        }
    }
    for f in &m.fds {
        match &f.kind {
            FdKind::Deleted { data_off, len, .. } | FdKind::Memfd { data_off, len, .. } => {
                add(*data_off, *len)
            }
            _ => {}
        }
    }
    let n = chunks.len();
    if n > 0 {
        let f = std::fs::File::open(&path).map_err(|source| RestoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        for c in chunks {
            let lo = c * image::CHUNK;
            let hi = (lo + image::CHUNK).min(m.pages_len);
            let b = pages
                .bytes_mut()
                .get_mut(lo as usize..hi as usize)
                .ok_or_else(|| beyond(format!("page chunk {c}")))?;
            std::os::unix::fs::FileExt::read_exact_at(&f, b, lo).map_err(|source| {
                RestoreError::Io {
                    path: format!("{} (page chunk {c})", path.display()),
                    source,
                }
            })?;
            let ok = m
                .chunk_crcs
                .get(c as usize)
                .is_some_and(|&crc| crc32c::crc32c(b) == crc);
            if !ok {
                return Err(image::ImageError::Checksum {
                    path,
                    what: format!("page chunk {c} (bytes {lo}..)"),
                }
                .into());
            }
        }
    }
    tracing::debug!(
        handed_over = handed.len(),
        chunks = n,
        "eager pages: ranges handed over, chunks of pages.img read and checked"
    );
    Ok(pages)
}

/// Creates the userfaultfd inside the target (it binds to the caller's mm) while the
/// target is still root and stopped; returns our reference, API done.
pub fn create_uffd(ctx: &Ctx) -> Result<Uffd, RestoreError> {
    let t = &ctx.leader;
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = ctx.ok(t, kabi::SYS_USERFAULTFD, &[flags], "userfaultfd")?;
    let other = |what: String| RestoreError::Other { what };
    let pidfd = sys::pidfd_open(ctx.pid).map_err(|e| other(format!("pidfd_open: {e}")))?;
    let ours = sys::pidfd_getfd(pidfd.as_raw_fd(), fd as i32)
        .map_err(|e| other(format!("pidfd_getfd(userfaultfd): {e}")))?;
    ctx.ok(t, libc::SYS_close, &[fd as u64], "close(userfaultfd)")?;
    let u = Uffd::from_fd(ours);
    let want = kabi::UFFD_FEATURE_EVENT_FORK
        | kabi::UFFD_FEATURE_EVENT_REMAP
        | kabi::UFFD_FEATURE_EVENT_REMOVE
        | kabi::UFFD_FEATURE_EVENT_UNMAP;
    let got = u.api(want).map_err(|e| other(format!("UFFDIO_API: {e}")))?;
    if got & want != want {
        return Err(RestoreError::Refused {
            what: format!(
                "this kernel's userfaultfd lacks event features {:#x} a lazy restore needs",
                want & !got
            ),
        });
    }
    Ok(u)
}

/// Registers the lazy areas, fills the lazy pages the restore touched, and hands a
/// second reference to the stub. The process is shaped and still stopped. `warm`:
/// chunks of pages.img read before (see `restore::warm`), served from memory.
#[allow(clippy::too_many_arguments)] // each is a different part of the restore's state
pub fn arm(
    ctx: &Ctx,
    uffd: Uffd,
    plan: Plan,
    images: &Path,
    m: &Manifest,
    mut link: StubLink,
    opts: &LazyOptions,
    warm: Option<crate::engine::restore::warm::WarmPages>,
) -> Result<Pager, RestoreError> {
    let other = |what: String| RestoreError::Other { what };
    let mut registered = Ranges::default();
    for &(s, e) in &plan.areas {
        uffd.register(s, e - s, kabi::UFFDIO_REGISTER_MODE_MISSING)
            .map_err(|e2| other(format!("UFFDIO_REGISTER {s:#x}-{e:#x}: {e2}")))?;
        registered.insert(s, e, 0);
    }
    let mut missing = plan.missing;
    let mut pager = Pager::new(images, m, opts.clone(), Some(link.pid), warm);
    // Pages present now were touched during the restore (or are eager): they will
    // never fault, so any not filled eagerly gets its image data now (late pages:
    // once the source has written them).
    let pm_path = format!("/proc/{}/pagemap", ctx.pid);
    let pm = std::fs::File::open(&pm_path).map_err(|source| RestoreError::Io {
        path: pm_path.clone(),
        source,
    })?;
    let mut touched = 0u64;
    for &(s, e) in &plan.areas {
        let ranges = present(pm.as_raw_fd(), s, e)
            .map_err(|e2| other(format!("PAGEMAP_SCAN {pm_path}: {e2}")))?;
        for (rs, re) in ranges {
            for (a, b, off) in missing.cut(rs, re) {
                let buf = pager
                    .source
                    .read_waiting(off, b - a, opts.store_bound)
                    .map_err(|e2| other(format!("image pages for {a:#x}-{b:#x}: {e2}")))?;
                sys::vm_write(ctx.pid, a, &buf)
                    .map_err(|e2| other(format!("filling touched pages at {a:#x}: {e2}")))?;
                touched += b - a;
            }
        }
    }
    if touched > 0 {
        tracing::debug!(
            bytes = touched,
            "lazy pages touched by the restore, filled now"
        );
    }
    drop(plan.eager);
    let stub_fd = link
        .hold(uffd.fd())
        .map_err(|e| other(format!("handing the userfaultfd to the stub: {e}")))?;
    let mut journal =
        Journal::create().map_err(|e| other(format!("memfd_create(lazy journal): {e}")))?;
    link.hold(journal.fd())
        .map_err(|e| other(format!("handing the lazy journal to the stub: {e}")))?;
    journal.append(&Record::Root { fd: stub_fd });
    pager.link = Some(link);
    pager.journal = Some(journal);
    pager.spaces.push(Space::new(
        0,
        uffd,
        Some(stub_fd),
        Layout {
            missing,
            registered,
        },
    ));
    pager.spaces[0].pid = Some(ctx.pid);
    pager.first_stub_fd = Some(stub_fd);
    Ok(pager)
}

/// The present (or swapped) parts of `[start, end)` in `pm` (an open
/// /proc/PID/pagemap).
pub(super) fn present(
    pm: RawFd,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, u64)>, nix::errno::Errno> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let mut regions = Vec::new();
        let next = uffd::pagemap_scan(
            pm,
            at,
            end,
            0,
            0,
            0,
            kabi::PAGE_IS_PRESENT | kabi::PAGE_IS_SWAPPED,
            0,
            0,
            &mut regions,
        )?;
        out.extend(regions.iter().map(|r| (r.start, r.end)));
        if next <= at {
            break;
        }
        at = next;
    }
    Ok(out)
}

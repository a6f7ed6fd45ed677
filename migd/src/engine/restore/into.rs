//! Going home: restoring an image into the process's own shadow (same pid, same
//! parent), instead of into a new process.
//!
//! The shadow (see [`crate::engine::handoff::Shadow`]) is the original process, frozen
//! under our ptrace with its memory released but for a gadget page. It is reshaped
//! with the same steps as a new process ([`super::shape`]): memory, fds, sigactions,
//! threads with their old tids, registers.
//!
//! Two phases, so that a failure leaves a working shadow:
//! 1. Checks, with the shadow untouched: the image is this process's, every file it
//!    names exists at home, mapped files are unchanged, credentials allow it, the pages
//!    can be read. Then a fresh gadget area and the vDSO are mapped into the shadow
//!    (harmless to a shadow; taken back if this fails).
//! 2. The point of no return: the shadow's other threads end, and `shape` rebuilds the
//!    process. Should that fail, the process is made a shadow again
//!    ([`Shadow::reshadow`]): gadget, signals blocked, memory released. Its regular
//!    files and any fd the image did not keep are closed by then.
//!
//! Fds: where the image has a pipe, FIFO or tty at an fd number at which the shadow
//! holds a pipe, FIFO or character device, the shadow's own fd stays (the image's was a
//! disconnected copy made at the host); every other fd comes from the image (regular
//! files reopened by path at their offsets: they may have been written meanwhile).

use super::{free_hole, precheck, shape, Ctx, RestoreError, GADGET_LEN};
use crate::engine::freeze::Stopped;
use crate::engine::handoff::Shadow;
use crate::engine::image::{self, AreaKind, FdKind, Manifest};
use crate::engine::inject::{Injector, GADGET};
use crate::engine::maps::parse_smaps;
use crate::sys;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Instant;

/// `ARCH_MAP_VDSO_64` — arch/x86/include/uapi/asm/prctl.h: maps the vDSO block of a
/// process that has none (the shadow's was released) near the given address.
const ARCH_MAP_VDSO_64: u64 = 0x2003;

/// Inherit keys of the shadow's own fds kept in place of the image's: `pipe:[N]`
/// with N above any real pipe inode.
const KEPT_BASE: u64 = 1 << 62;

/// The process restored into its shadow, still stopped under our trace until
/// [`Restored::commit`] (or [`Restored::give_back`] makes it a shadow again).
pub struct Restored {
    shadow: Shadow,
    others: Vec<Stopped>,
    stopped: bool,
    pub pid: i32,
    pub restore_ms: f64,
    /// The shadow's fds kept in place of the image's.
    pub kept_fds: Vec<i32>,
}

/// A restore into the shadow that failed, and the shadow as it is now.
pub struct IntoFailure {
    pub error: RestoreError,
    /// The shadow, working as a shadow; `None` if it could not be made one again.
    pub shadow: Option<Shadow>,
    /// Whether the shadow is exactly as before (the failure came before the point of
    /// no return).
    pub untouched: bool,
}

fn other(what: impl Into<String>) -> RestoreError {
    RestoreError::Other { what: what.into() }
}

fn refuse(what: impl Into<String>) -> RestoreError {
    RestoreError::Refused { what: what.into() }
}

/// The shadow's fds (numbers) that stand in for the image's pipes, FIFOs and ttys.
fn kept_fds(pid: i32, m: &Manifest) -> Vec<i32> {
    m.fds
        .iter()
        .filter(|f| {
            matches!(
                f.kind,
                FdKind::Pipe { .. } | FdKind::Fifo { .. } | FdKind::Tty { .. }
            )
        })
        .filter(|f| {
            std::fs::metadata(format!("/proc/{pid}/fd/{}", f.fd))
                .map(|md| md.file_type().is_fifo() || md.file_type().is_char_device())
                .unwrap_or(false)
        })
        .map(|f| f.fd)
        .collect()
}

/// Everything that can be checked without touching the shadow.
fn check(pid: i32, m: &Manifest, kept: &[i32]) -> Result<(), RestoreError> {
    if m.pid != pid {
        return Err(refuse(format!(
            "the image is of pid {}, the shadow is pid {pid}",
            m.pid
        )));
    }
    precheck(m)?;
    let exists = |what: String, path: &str| {
        std::fs::metadata(path).map(drop).map_err(|e| {
            refuse(format!(
                "{what} {path} is not there at home (removed while the process was away?): {e}"
            ))
        })
    };
    for f in &m.fds {
        if kept.contains(&f.fd) {
            // A pipe it reads from home: the bytes its host had put into its pipe
            // there (taken out of the pipe here already) and it had not read yet
            // cannot go back in front of what the writer here wrote since.
            if let FdKind::Pipe {
                write_end: false,
                data,
                ..
            } = &f.kind
            {
                if !data.is_empty() {
                    return Err(refuse(format!(
                        "fd {}: {} bytes of its input from the pipe here are at its host and not read yet; they would be lost going home (try again once it has read them)",
                        f.fd,
                        data.len()
                    )));
                }
            }
            continue;
        }
        match &f.kind {
            FdKind::File { path, .. } => {
                exists(format!("fd {}:", f.fd), path)?;
                // Opened here as it will be in the process (same file view), without
                // blocking: a directory where a file was, say, is caught now.
                use std::os::unix::fs::OpenOptionsExt;
                let acc = f.flags & libc::O_ACCMODE;
                std::fs::OpenOptions::new()
                    .read(acc != libc::O_WRONLY)
                    .write(acc != libc::O_RDONLY)
                    .custom_flags(
                        (f.flags & (libc::O_DIRECTORY | libc::O_PATH))
                            | libc::O_NONBLOCK
                            | libc::O_NOCTTY,
                    )
                    .open(path)
                    .map_err(|e| {
                        refuse(format!(
                            "fd {}: {path} cannot be opened at home as it was: {e}",
                            f.fd
                        ))
                    })?;
            }
            FdKind::Fifo { path, .. } | FdKind::Tty { path, .. } => {
                exists(format!("fd {}:", f.fd), path)?
            }
            _ => {}
        }
    }
    exists("its working directory".into(), &m.cwd)?;
    if m.root != "/" {
        exists("its root directory".into(), &m.root)?;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| other(format!("reading /proc/{pid}/status: {e}")))?;
    let uid = crate::engine::procfs::id_triple(&status, "Uid").unwrap_or([0; 3]);
    let gid = crate::engine::procfs::id_triple(&status, "Gid").unwrap_or([0; 3]);
    if uid[1] != 0 {
        if uid != m.creds.uid || gid != m.creds.gid {
            return Err(refuse(format!(
                "its credentials changed while away (uid {:?} gid {:?}, the shadow's {uid:?} {gid:?}) and the shadow may not take them",
                m.creds.uid, m.creds.gid
            )));
        }
        if m.threads.len() > 1 {
            return Err(refuse(format!(
                "it has {} threads; recreating them with their tids needs privilege its uid {} lacks",
                m.threads.len(),
                uid[1]
            )));
        }
    }
    // Threads come back with their tids (clone3 set_tid): each must be free at home
    // or one of the shadow's own threads (they end first). A thread made while away
    // has a tid of its host's namespace, which home may have given to another process.
    for t in &m.threads[1..] {
        let status = std::fs::read_to_string(format!("/proc/{}/status", t.tid));
        if let Ok(st) = status {
            let tgid = crate::engine::procfs::status_field(&st, "Tgid").unwrap_or("?");
            if tgid.trim() != pid.to_string() {
                return Err(refuse(format!(
                    "its thread {} (made while away) cannot keep its tid at home: pid {} there is process {}",
                    t.tid,
                    t.tid,
                    tgid.trim()
                )));
            }
        }
    }
    Ok(())
}

/// What the shadow's own state makes unnecessary or impossible to redo: its exe link
/// is already the image's (and cannot be replaced while the binary is mapped), and a
/// non-root process already has its credentials (checked) but may not set them.
fn adapt(pid: i32, m: &Manifest, kept: &[i32]) -> (Manifest, Vec<(i32, String)>) {
    let mut m2 = m.clone();
    m2.exe = String::new();
    let euid = super::super::procfs::id_triple(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
        "Uid",
    )
    .map(|u| u[1])
    .unwrap_or(0);
    if euid != 0 {
        m2.creds = image::Creds::default();
    }
    let mut inherit = Vec::new();
    for f in m2.fds.iter_mut() {
        if kept.contains(&f.fd) {
            let key = KEPT_BASE + f.fd as u64;
            f.kind = FdKind::Pipe {
                inode: key,
                write_end: false,
                size: 0,
                data: Vec::new(),
            };
            f.dup_of = None;
            inherit.push((f.fd, format!("pipe:[{key}]")));
        }
    }
    (m2, inherit)
}

/// The areas of `pid` as (start, end).
fn areas_of(pid: i32) -> Vec<(u64, u64)> {
    parse_smaps(&std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default())
        .unwrap_or_default()
        .iter()
        .map(|a| (a.start, a.end))
        .collect()
}

/// Restores the image at `images` into `shadow` (`manifest`: its bytes as handed
/// over, see `image::manifest_from`). On success the process is shaped and still
/// stopped; on failure the shadow is a shadow still (see [`IntoFailure`]).
pub fn restore_into(
    mut shadow: Shadow,
    images: &Path,
    manifest: Option<&[u8]>,
) -> Result<Restored, Box<IntoFailure>> {
    let pid = shadow.pid();
    let _span = tracing::info_span!("restore_into", pid).entered();
    let untouched = |shadow: Shadow, error: RestoreError| {
        Box::new(IntoFailure {
            error,
            shadow: Some(shadow),
            untouched: true,
        })
    };
    // Phase 1: checks; the shadow is not touched.
    let m = match image::read_image_given(images, manifest) {
        Ok(m) => m,
        Err(e) => return Err(untouched(shadow, e.into())),
    };
    let kept = kept_fds(pid, &m);
    if let Err(e) = check(pid, &m, &kept) {
        return Err(untouched(shadow, e));
    }
    let pages_path = images.join(image::PAGES_FILE);
    let pages = std::fs::File::open(&pages_path)
        .map_err(|source| RestoreError::Io {
            path: pages_path.display().to_string(),
            source,
        })
        .and_then(|f| {
            sys::FileMap::map(f.as_raw_fd(), m.pages_len as usize).map_err(|e| RestoreError::Io {
                path: pages_path.display().to_string(),
                source: e.into(),
            })
        });
    let pages = match pages {
        Ok(p) => p,
        Err(e) => return Err(untouched(shadow, e)),
    };
    let (m2, inherit) = adapt(pid, &m, &kept);
    let t0 = Instant::now();
    // A gadget area of our own (the shadow's gadget page lies where the image's code
    // goes) and a vDSO, placed through the shadow's gadget.
    let gadget = match prepare(&shadow, &m) {
        Ok(g) => g,
        Err(e) => return Err(untouched(shadow, e)),
    };
    // Phase 2: the point of no return.
    let shaped = shadow
        .end_other_threads()
        .map_err(|e| other(format!("ending the shadow's other threads: {e}")))
        .and_then(|()| {
            let ctx = Ctx {
                pid,
                leader: Stopped { tid: pid },
                inj: Injector { gadget },
                gadget,
                gadget_len: GADGET_LEN,
                inherit,
                memfds: Default::default(),
            };
            shape(&ctx, &m2, pages.bytes())
        });
    match shaped {
        Ok(others) => Ok(Restored {
            shadow,
            others,
            stopped: m.stopped,
            pid,
            restore_ms: t0.elapsed().as_secs_f64() * 1e3,
            kept_fds: kept,
        }),
        Err(error) => {
            tracing::error!(%error, "restore into the shadow failed past the point of no return; making it a shadow again");
            match shadow.reshadow() {
                Ok(()) => Err(Box::new(IntoFailure {
                    error,
                    shadow: Some(shadow),
                    untouched: false,
                })),
                Err(e) => Err(Box::new(IntoFailure {
                    error: other(format!(
                        "{error}; and it could not be made a shadow again: {e}"
                    )),
                    shadow: None,
                    untouched: false,
                })),
            }
        }
    }
}

/// Maps a fresh gadget area and the vDSO block into the shadow; on failure unmaps
/// what it mapped, leaving the shadow as it was.
fn prepare(shadow: &Shadow, m: &Manifest) -> Result<u64, RestoreError> {
    let pid = shadow.pid();
    let leader = shadow.leader();
    let inj = Injector {
        gadget: shadow.gadget(),
    };
    // Threads are recreated by an injected clone3: we must see their clone events.
    {
        use nix::sys::ptrace::Options;
        nix::sys::ptrace::setoptions(
            nix::unistd::Pid::from_raw(leader.tid),
            Options::PTRACE_O_TRACECLONE | Options::PTRACE_O_TRACESYSGOOD,
        )
        .map_err(|e| other(format!("PTRACE_SETOPTIONS on the shadow pid {pid}: {e}")))?;
    }
    let saved = leader.regs()?;
    let vdso: Vec<(u64, u64)> = m
        .areas
        .iter()
        .filter(|a| {
            matches!(
                a.kind,
                AreaKind::Vvar | AreaKind::VvarVclock | AreaKind::Vdso
            )
        })
        .map(|a| (a.start, a.end))
        .collect();
    let mut busy = areas_of(pid);
    busy.extend_from_slice(&vdso);
    let gadget = free_hole(&m.areas, GADGET_LEN, &busy)?;
    let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let got = inj.ok(
        leader,
        libc::SYS_mmap,
        &[gadget, GADGET_LEN, prot, flags, u64::MAX, 0],
        || format!("mmap(gadget {gadget:#x}) in the shadow"),
    )?;
    let undo = |e: RestoreError| {
        let _ = inj.call(leader, libc::SYS_munmap, &[gadget, GADGET_LEN]);
        let _ = leader.set_regs(&saved);
        e
    };
    if got as u64 != gadget {
        return Err(undo(other(format!(
            "the gadget landed at {got:#x}, not {gadget:#x}"
        ))));
    }
    sys::vm_write(pid, gadget, &GADGET)
        .map_err(|e| undo(other(format!("writing the gadget at {gadget:#x}: {e}"))))?;
    if let Some(&(start, _)) = vdso.iter().min() {
        let has_vdso =
            parse_smaps(&std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default())
                .unwrap_or_default()
                .iter()
                .any(|a| a.name == "[vdso]");
        if !has_vdso {
            inj.ok(
                leader,
                libc::SYS_arch_prctl,
                &[ARCH_MAP_VDSO_64, start],
                || "arch_prctl(ARCH_MAP_VDSO_64) in the shadow".into(),
            )
            .map_err(|e| undo(e.into()))?;
        }
    }
    leader.set_regs(&saved)?;
    Ok(gadget)
}

impl Restored {
    /// Lets the process run at home (the migration committed).
    pub fn commit(self) -> Result<(), RestoreError> {
        for t in self.others {
            t.detach()?;
        }
        self.shadow.let_go();
        if self.stopped {
            let _ = sys::kill(self.pid, libc::SIGSTOP);
        }
        Ok(())
    }

    /// The migration was given up after the restore: the process becomes a shadow
    /// again (the copy at the host runs on).
    pub fn give_back(self) -> Result<Shadow, RestoreError> {
        let mut shadow = self.shadow;
        drop(self.others);
        shadow
            .reshadow()
            .map_err(|e| other(format!("making pid {} a shadow again: {e}", self.pid)))?;
        Ok(shadow)
    }
}

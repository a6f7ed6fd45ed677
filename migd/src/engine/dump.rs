//! `migd dump`: freeze a process, extract its state into an image directory, then
//! kill it or let it run on.

use super::areawatch::AreaWatch;
use super::fdinfo::{classify_link, parse_fdinfo, LinkKind};
use super::freeze::{FreezeError, Frozen, Stopped};
use super::image::{
    self, Area, AreaKind, Creds, FdImage, FdKind, Manifest, PageWriter, PosixTimer, Rseq,
    SigAction, ThreadImage,
};
use super::inject::{InjectError, Injector, BATCH, GADGET};
use super::late::Deferral;
use super::maps::{parse_smaps, MapArea};
use super::{procfs, regs};
use crate::sys::{self, kabi};
use nix::errno::Errno;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub pid: i32,
    pub images: PathBuf,
    pub leave_running: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DumpReport {
    pub pid: i32,
    pub threads: usize,
    pub areas: usize,
    pub page_bytes: u64,
    pub fds: usize,
    pub frozen_ms: f64,
    pub left_running: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("refusing to dump pid {pid}: {what}; the process was left running untouched")]
    Refused { pid: i32, what: String },
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("reading {path}: {source}")]
    Proc {
        path: String,
        source: std::io::Error,
    },
    #[error("pid {pid}: reading memory at {addr:#x} ({len} bytes): {errno}")]
    Memory {
        pid: i32,
        addr: u64,
        len: usize,
        errno: nix::errno::Errno,
    },
    #[error("pid {pid}: {what}")]
    Other { pid: i32, what: String },
}

pub(crate) fn read_proc(path: String) -> Result<String, DumpError> {
    std::fs::read_to_string(&path).map_err(|source| DumpError::Proc { path, source })
}

fn read_link(path: String) -> Result<String, DumpError> {
    std::fs::read_link(&path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| DumpError::Proc { path, source })
}

/// Dumps `opts.pid` into `opts.images`.
pub fn dump(opts: &DumpOptions) -> Result<DumpReport, DumpError> {
    let pid = opts.pid;
    let _span = tracing::info_span!("dump", pid).entered();
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(FreezeError::NoProcess { pid }.into());
    }
    // Refusals that need no freeze, so that the process is not even interrupted.
    precheck(pid)?;
    std::fs::create_dir_all(&opts.images).map_err(|source| DumpError::Proc {
        path: opts.images.display().to_string(),
        source,
    })?;
    let was_stopped = read_proc(format!("/proc/{pid}/status"))
        .map(|s| procfs::status_field(&s, "State").is_some_and(|v| v.starts_with('T')))
        .unwrap_or(false);
    let frozen = Frozen::freeze(pid)?;
    let t0 = Instant::now();
    // Check again now that nothing can change under us (the areas: in `collect`).
    precheck_process(pid)?;
    let mut manifest = match collect(pid, &frozen, &opts.images) {
        Ok(m) => m,
        Err(e) => {
            // Leave no half image behind (the process thaws when `frozen` drops).
            let _ = std::fs::remove_file(opts.images.join(image::PAGES_FILE));
            return Err(e);
        }
    };
    manifest.stopped = was_stopped;
    let report = DumpReport {
        pid,
        threads: manifest.threads.len(),
        areas: manifest.areas.len(),
        page_bytes: manifest.pages_len,
        fds: manifest.fds.len(),
        frozen_ms: 0.0,
        left_running: opts.leave_running,
    };
    image::write_manifest(&opts.images, &manifest)?;
    let frozen_ms = t0.elapsed().as_secs_f64() * 1e3;
    if opts.leave_running {
        frozen.thaw();
    } else {
        frozen.kill();
    }
    Ok(DumpReport {
        frozen_ms,
        ..report
    })
}

fn refuse(pid: i32, what: impl Into<String>) -> DumpError {
    DumpError::Refused {
        pid,
        what: what.into(),
    }
}

/// What a dump that keeps the process frozen does first: the process exists, passes
/// [`precheck`] (nothing is touched if it does not), and `images` exists.
pub fn prepare(pid: i32, images: &Path) -> Result<(), DumpError> {
    prepare_then(pid, images, |pid| precheck_areas(pid, &read_smaps(pid)?))
}

/// [`prepare`] whose check of the areas reads the [`EarlyLayout`] (watched from
/// now on), for a freeze that follows at once.
pub fn prepare_early(pid: i32, images: &Path) -> Result<EarlyLayout, DumpError> {
    prepare_then(pid, images, |pid| {
        let early = EarlyLayout::read(pid)?;
        precheck_areas(pid, &early.areas)?;
        Ok(early)
    })
}

fn prepare_then<T>(
    pid: i32,
    images: &Path,
    areas: impl FnOnce(i32) -> Result<T, DumpError>,
) -> Result<T, DumpError> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(FreezeError::NoProcess { pid }.into());
    }
    precheck_process(pid)?;
    let checked = areas(pid)?;
    std::fs::create_dir_all(images).map_err(|source| DumpError::Proc {
        path: images.display().to_string(),
        source,
    })?;
    Ok(checked)
}

/// Refuses a process the engine cannot move (see [`precheck_process`] and
/// [`precheck_areas`]).
pub fn precheck(pid: i32) -> Result<(), DumpError> {
    precheck_process(pid)?;
    precheck_areas(pid, &read_smaps(pid)?)
}

/// The refusals of [`precheck`] that do not need the address space (children,
/// timers, seccomp, capabilities, fds).
pub(crate) fn precheck_process(pid: i32) -> Result<(), DumpError> {
    let kids = procfs::children_of(pid);
    if !kids.is_empty() {
        return Err(refuse(
            pid,
            format!("it has child processes {kids:?} that would be left outside the image"),
        ));
    }
    if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/timers")) {
        if procfs::parse_timers(&t).is_none() {
            return Err(refuse(
                pid,
                "a POSIX timer with a notification kind this engine does not know",
            ));
        }
    }
    if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        if procfs::status_field(&st, "Seccomp").is_some_and(|v| v != "0") {
            return Err(refuse(
                pid,
                "it runs under a seccomp filter (not supported yet)",
            ));
        }
        // Restore sets the credentials of a process that is not root with the raw
        // setresuid, which clears its capabilities; only root's are put back.
        let uid = procfs::id_triple(&st, "Uid").unwrap_or_default();
        if let Some(c) = caps_of(&st) {
            if uid != [0, 0, 0] && (c.permitted | c.effective | c.inheritable | c.ambient) != 0 {
                return Err(refuse(
                    pid,
                    format!(
                        "it is not root but holds capabilities (CapPrm {:016x}, CapEff {:016x}); \
                         they are not carried yet",
                        c.permitted, c.effective
                    ),
                ));
            }
        }
    }
    for (fd, link) in list_fds(pid)? {
        match classify_link(&link) {
            LinkKind::Path(_) | LinkKind::Pipe(_) => {}
            LinkKind::Socket(ino) => {
                return Err(refuse(
                    pid,
                    format!(
                        "fd {fd}: {} (sockets cannot be moved)",
                        socket_kind(pid, ino)
                    ),
                ))
            }
            LinkKind::AnonInode(name) if SUPPORTED_ANON.contains(&name.as_str()) => {}
            LinkKind::AnonInode(name) => {
                return Err(refuse(pid, format!("fd {fd}: {name} (not supported yet)")))
            }
            LinkKind::Other(o) => {
                return Err(refuse(pid, format!("fd {fd}: {o} (unsupported kind)")))
            }
        }
    }
    Ok(())
}

/// The refusal of [`precheck`] that needs the address space (`smaps`, with VmFlags):
/// device (I/O or PFN) mappings.
pub(crate) fn precheck_areas(pid: i32, smaps: &[MapArea]) -> Result<(), DumpError> {
    for a in smaps {
        let special = a.name.starts_with("[vvar") || a.name == "[vdso]" || a.name == "[vsyscall]";
        if !special && (a.has_flag("io") || a.has_flag("pf")) {
            return Err(refuse(
                pid,
                format!(
                    "area {:#x}-{:#x} {}: device (I/O or PFN) mapping",
                    a.start, a.end, a.name
                ),
            ));
        }
    }
    Ok(())
}

const SUPPORTED_ANON: [&str; 4] = ["eventfd", "signalfd", "timerfd", "eventpoll"];

fn anon_kind(
    pid: i32,
    fd: i32,
    name: &str,
    text: &str,
    info: &super::fdinfo::FdInfo,
) -> Result<FdKind, DumpError> {
    let bad = |what: &str| DumpError::Other {
        pid,
        what: format!("fd {fd}: {name}: cannot read {what} from fdinfo"),
    };
    let x = |k: &str| info.extra.get(k).map(|s| s.trim().to_string());
    Ok(match name {
        "eventfd" => FdKind::EventFd {
            count: x("eventfd-count")
                .and_then(|v| u64::from_str_radix(&v, 16).ok())
                .ok_or_else(|| bad("eventfd-count"))?,
            semaphore: x("eventfd-semaphore").as_deref() == Some("1"),
        },
        "signalfd" => FdKind::SignalFd {
            mask: x("sigmask")
                .and_then(|v| u64::from_str_radix(&v, 16).ok())
                .ok_or_else(|| bad("sigmask"))?,
        },
        "timerfd" => FdKind::TimerFd {
            clockid: x("clockid")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("clockid"))?,
            ticks: x("ticks")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("ticks"))?,
            value: x("it_value")
                .and_then(|v| super::fdinfo::parse_pair(&v))
                .ok_or_else(|| bad("it_value"))?,
            interval: x("it_interval")
                .and_then(|v| super::fdinfo::parse_pair(&v))
                .ok_or_else(|| bad("it_interval"))?,
        },
        "eventpoll" => FdKind::Epoll {
            targets: super::fdinfo::parse_epoll_targets(text),
        },
        _ => return Err(refuse(pid, format!("fd {fd}: {name} (not supported yet)"))),
    })
}

fn socket_kind(pid: i32, ino: u64) -> String {
    let needle = format!(" {ino} ");
    for (file, kind) in [
        ("tcp", "TCP socket"),
        ("tcp6", "TCP socket (IPv6)"),
        ("udp", "UDP socket"),
        ("udp6", "UDP socket (IPv6)"),
        ("unix", "UNIX socket"),
        ("raw", "raw socket"),
        ("raw6", "raw socket (IPv6)"),
        ("netlink", "netlink socket"),
        ("packet", "packet socket"),
    ] {
        if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            if t.lines().any(|l| format!("{l} ").contains(&needle)) {
                return kind.to_string();
            }
        }
    }
    format!("socket:[{ino}]")
}

fn list_fds(pid: i32) -> Result<Vec<(i32, String)>, DumpError> {
    let dir = format!("/proc/{pid}/fd");
    let rd = std::fs::read_dir(&dir).map_err(|source| DumpError::Proc {
        path: dir.clone(),
        source,
    })?;
    let mut fds: Vec<i32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    let mut out = Vec::new();
    for fd in fds {
        match read_link(format!("{dir}/{fd}")) {
            Ok(l) => out.push((fd, l)),
            Err(DumpError::Proc { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Per-thread state read with ptrace alone.
fn thread_basics(pid: i32, t: &Stopped) -> Result<ThreadImage, DumpError> {
    let status = read_proc(format!("/proc/{pid}/task/{}/status", t.tid))?;
    let vtid = procfs::innermost_id(&status, "NSpid").unwrap_or(t.tid);
    let r = t.regs()?;
    let conf = t.rseq()?;
    let rseq = (conf.rseq_abi_pointer != 0).then_some(Rseq {
        ptr: conf.rseq_abi_pointer,
        len: conf.rseq_abi_size,
        sig: conf.signature,
    });
    let robust_list = sys::get_robust_list(t.tid).map_err(|e| DumpError::Other {
        pid,
        what: format!("get_robust_list({}): {e}", t.tid),
    })?;
    let name = read_proc(format!("/proc/{pid}/task/{}/comm", t.tid))?
        .trim_end_matches('\n')
        .to_string();
    Ok(ThreadImage {
        tid: vtid,
        regs: regs::to_words(&r),
        xsave: t.xsave()?,
        sigmask: t.sigmask()?,
        pending: t.pending(false)?.iter().map(|s| s.to_vec()).collect(),
        clear_tid: 0,
        robust_list,
        rseq,
        altstack: (0, libc::SS_DISABLE, 0),
        name,
    })
}

struct Injected {
    sigactions: Vec<SigAction>,
    brk: u64,
    itimers: [[i64; 4]; 3],
    per_thread: Vec<(u64, (u64, i32, u64))>,
    timers: Vec<PosixTimer>,
    prctl: super::image::PrctlState,
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

/// Runs `f` with a `syscall; int3` gadget planted at the start of an executable area of
/// the frozen process (program text, preferably where the leader is) and every
/// thread's signals blocked; the text word, every thread's registers and signal masks
/// are put back whatever happens. Used by [`collect`] and by `engine::track`.
pub(crate) fn with_gadget<T>(
    pid: i32,
    frozen: &Frozen,
    smaps: &[MapArea],
    f: impl FnOnce(&Injector, Option<u64>) -> Result<T, DumpError>,
) -> Result<T, DumpError> {
    let leader = &frozen.threads[0];
    let lr = leader.regs()?;
    // Plant the gadget in program text (not the vDSO), preferably where the leader is.
    let usable = |a: &&MapArea| a.prot & libc::PROT_EXEC != 0 && a.is_file();
    let area = smaps
        .iter()
        .filter(usable)
        .find(|a| a.start <= lr.rip && lr.rip < a.end)
        .or_else(|| smaps.iter().find(usable))
        .or_else(|| {
            smaps
                .iter()
                .find(|a| a.prot & libc::PROT_EXEC != 0 && a.name != "[vsyscall]")
        })
        .ok_or_else(|| DumpError::Other {
            pid,
            what: "no executable area to run injected syscalls from".into(),
        })?;
    let gaddr = area.start;
    // The gadget in the first word and, where the area is long enough (it always is
    // in program text), the batch code in the next eight.
    let mut code = GADGET.to_vec();
    code.resize(8, 0);
    let batch = (area.end >= gaddr + 8 + BATCH.len() as u64).then_some(gaddr + 8);
    if batch.is_some() {
        code.extend_from_slice(&BATCH);
    }
    let mem_err = |addr, e| DumpError::Memory {
        pid,
        addr,
        len: 8,
        errno: e,
    };
    let orig: Vec<u64> = (0..code.len() as u64 / 8)
        .map(|i| {
            let at = gaddr + 8 * i;
            sys::ptrace_peekdata(leader.tid, at).map_err(|e| mem_err(at, e))
        })
        .collect::<Result<_, _>>()?;
    let mut first = orig[0].to_ne_bytes();
    first[..GADGET.len()].copy_from_slice(&GADGET);
    code[..8].copy_from_slice(&first);
    let saved: Vec<(sys::Regs, u64)> = frozen
        .threads
        .iter()
        .map(|t| Ok((t.regs()?, t.sigmask()?)))
        .collect::<Result<_, FreezeError>>()?;
    let put_back = || {
        for (i, w) in orig.iter().enumerate() {
            let _ = sys::ptrace_pokedata(leader.tid, gaddr + 8 * i as u64, *w);
        }
    };
    for (i, w) in code.chunks_exact(8).enumerate() {
        let at = gaddr + 8 * i as u64;
        let word = u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        if let Err(e) = sys::ptrace_pokedata(leader.tid, at, word) {
            put_back();
            return Err(mem_err(at, e));
        }
    }
    let result = (|| -> Result<T, DumpError> {
        for t in &frozen.threads {
            t.set_sigmask(!0)?;
        }
        f(&Injector { gadget: gaddr }, batch)
    })();
    // Put everything back whatever happened.
    put_back();
    for (t, (r, m)) in frozen.threads.iter().zip(&saved) {
        let _ = t.set_regs(r);
        let _ = t.set_sigmask(*m);
    }
    result
}

/// Maps 8 KiB of anonymous read-write memory in the stopped `leader`'s process, for
/// injected calls to write their answers into (the caller unmaps it).
fn map_scratch(inj: &Injector, leader: &Stopped) -> Result<u64, DumpError> {
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let addr = inj.ok(
        leader,
        libc::SYS_mmap,
        &[0, 8192, prot, flags, u64::MAX, 0],
        || "mmap(scratch)".into(),
    )?;
    Ok(addr as u64)
}

/// `len` bytes at `addr` of process `pid`, all of them.
fn read_mem(pid: i32, addr: u64, len: usize) -> Result<Vec<u8>, DumpError> {
    let mut b = vec![0u8; len];
    sys::vm_read_exact(pid, addr, &mut b).map_err(|errno| DumpError::Memory {
        pid,
        addr,
        len,
        errno,
    })?;
    Ok(b)
}

/// The `struct sigaction`s (32 bytes each) of `sigs`, read in the stopped `leader`
/// through the 8 KiB `scratch`: in one stop with the batch code at `batch`, else one
/// stop per signal.
fn read_sigactions(
    pid: i32,
    inj: &Injector,
    leader: &Stopped,
    batch: Option<u64>,
    scratch: u64,
    sigs: &[i32],
) -> Result<Vec<u8>, DumpError> {
    let rd = |at, len| read_mem(pid, at, len);
    // The table (64 bytes a call) in the first page, the answers in the second.
    let answers = scratch + 4096;
    let Some(code) = batch.filter(|_| sigs.len() * 64 <= 4096 && sigs.len() * 32 <= 4096) else {
        let mut out = Vec::with_capacity(sigs.len() * 32);
        for &sig in sigs {
            inj.ok(
                leader,
                libc::SYS_rt_sigaction,
                &[sig as u64, 0, scratch, 8],
                || format!("rt_sigaction({sig})"),
            )?;
            out.extend(rd(scratch, 32)?);
        }
        return Ok(out);
    };
    let calls: Vec<(i64, [u64; 6])> = sigs
        .iter()
        .enumerate()
        .map(|(i, &sig)| {
            let at = answers + 32 * i as u64;
            (libc::SYS_rt_sigaction, [sig as u64, 0, at, 8, 0, 0])
        })
        .collect();
    let rets = inj.batch(leader, pid, code, scratch, &calls)?;
    if let Some((i, &r)) = rets.iter().enumerate().find(|(_, &r)| r < 0) {
        return Err(InjectError::Failed {
            tid: leader.tid,
            what: format!("rt_sigaction({})", sigs[i]),
            errno: Errno::from_raw(-r as i32),
        }
        .into());
    }
    if rets.len() != calls.len() {
        return Err(DumpError::Other {
            pid,
            what: format!("a batch of {} rt_sigaction ran {}", calls.len(), rets.len()),
        });
    }
    rd(answers, sigs.len() * 32)
}

/// State only the process can tell: read by running syscalls inside it.
fn inject_reads(
    pid: i32,
    frozen: &Frozen,
    smaps: &[MapArea],
    vtids: &[i32],
) -> Result<Injected, DumpError> {
    let leader = &frozen.threads[0];
    with_gadget(pid, frozen, smaps, |inj, batch| {
        let scratch = map_scratch(inj, leader)?;
        let rd = |len| read_mem(pid, scratch, len);
        let mut sigactions = Vec::new();
        let sigs: Vec<i32> = (1..=64)
            .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
            .collect();
        let acts = read_sigactions(pid, inj, leader, batch, scratch, &sigs)?;
        for (&sig, b) in sigs.iter().zip(acts.chunks_exact(32)) {
            let (handler, flags, restorer, mask) =
                (u64_at(b, 0), u64_at(b, 8), u64_at(b, 16), u64_at(b, 24));
            if handler != 0 || flags != 0 || mask != 0 {
                sigactions.push(SigAction {
                    sig,
                    handler,
                    flags,
                    restorer,
                    mask,
                });
            }
        }
        let brk = inj.call(leader, libc::SYS_brk, &[0])?.ret as u64;
        let get = |opt: i32| -> Result<i64, DumpError> {
            Ok(inj.call(leader, libc::SYS_prctl, &[opt as u64])?.ret)
        };
        let get_into = |opt: i32| -> Result<i64, DumpError> {
            inj.ok(leader, libc::SYS_prctl, &[opt as u64, scratch], || {
                format!("prctl({opt})")
            })?;
            Ok(u64_at(&rd(8)?, 0) as i32 as i64)
        };
        let prctl = super::image::PrctlState {
            dumpable: get(libc::PR_GET_DUMPABLE)?,
            no_new_privs: get(libc::PR_GET_NO_NEW_PRIVS)?,
            pdeath_sig: get_into(libc::PR_GET_PDEATHSIG)?,
            child_subreaper: get_into(libc::PR_GET_CHILD_SUBREAPER)?,
            thp_disable: get(libc::PR_GET_THP_DISABLE)?,
        };
        let mut itimers = [[0i64; 4]; 3];
        for (which, it) in itimers.iter_mut().enumerate() {
            inj.ok(
                leader,
                libc::SYS_getitimer,
                &[which as u64, scratch],
                || format!("getitimer({which})"),
            )?;
            let b = rd(32)?;
            for (i, v) in it.iter_mut().enumerate() {
                *v = u64_at(&b, i * 8) as i64;
            }
        }
        let mut per_thread = Vec::new();
        for t in &frozen.threads {
            inj.ok(
                t,
                libc::SYS_prctl,
                &[sys::kabi::PR_GET_TID_ADDRESS as u64, scratch],
                || "prctl(PR_GET_TID_ADDRESS)".into(),
            )?;
            let ctid = u64_at(&rd(8)?, 0);
            inj.ok(t, libc::SYS_sigaltstack, &[0, scratch], || {
                "sigaltstack".into()
            })?;
            let b = rd(24)?;
            per_thread.push((ctid, (u64_at(&b, 0), u64_at(&b, 8) as i32, u64_at(&b, 16))));
        }
        let mut timers = Vec::new();
        let listed = std::fs::read_to_string(format!("/proc/{pid}/timers"))
            .ok()
            .and_then(|t| procfs::parse_timers(&t))
            .unwrap_or_default();
        for pt in listed {
            inj.ok(
                leader,
                libc::SYS_timer_gettime,
                &[pt.id as u64, scratch],
                || format!("timer_gettime({})", pt.id),
            )?;
            let b = rd(32)?;
            let setting = [
                u64_at(&b, 0) as i64,
                u64_at(&b, 8) as i64,
                u64_at(&b, 16) as i64,
                u64_at(&b, 24) as i64,
            ];
            // The notified thread, as the process sees it.
            let tid = frozen
                .threads
                .iter()
                .position(|t| t.tid == pt.target)
                .and_then(|i| vtids.get(i).copied())
                .unwrap_or(pt.target);
            timers.push(PosixTimer {
                id: pt.id,
                clockid: pt.clockid,
                signo: pt.signo,
                sival: pt.sival,
                notify: pt.notify,
                tid,
                setting,
            });
        }
        inj.ok(leader, libc::SYS_munmap, &[scratch, 8192], || {
            "munmap(scratch)".into()
        })?;
        Ok(Injected {
            sigactions,
            brk,
            itimers,
            per_thread,
            timers,
            prctl,
        })
    })
}

/// Extracts the state of the frozen process into `dir` (used by [`dump`] and by
/// `engine::handoff`, which keeps the process frozen afterwards).
pub fn collect(pid: i32, frozen: &Frozen, dir: &Path) -> Result<Manifest, DumpError> {
    collect_deferring(pid, frozen, dir, false, true, None).map(|(m, _, _)| m)
}

/// [`collect`] (which refuses device mappings, see [`precheck_areas`]); with `late`, the pages of areas a lazy restore serves on demand are
/// not written but left for a [`super::late::Flusher`] (but for those near each
/// thread's stack pointer and rseq area): the manifest's `late_len` says how many
/// bytes (the caller made the late files before the freeze:
/// `late::create_files`). Without `sync`, pages.img
/// is only closed, not synced (see [`PageWriter::without_sync`]). With `early`, the
/// VmFlags come from there where the layout is the same, and the [`FlagsCheck`]
/// returned must pass before anything runs from the image.
pub fn collect_deferring(
    pid: i32,
    frozen: &Frozen,
    dir: &Path,
    late: bool,
    sync: bool,
    early: Option<&EarlyLayout>,
) -> Result<(Manifest, Option<Deferral>, Option<FlagsCheck>), DumpError> {
    let mut pw = PageWriter::create(dir)?;
    if !sync {
        pw.without_sync();
    }
    let mut src = MemSource::open(pid)?;
    let mut deferral = None;
    let (mut m, check) = collect_into(pid, frozen, pw, early, &mut |smaps, threads, pw| {
        // The device-mapping refusal, on the layout read here (one smaps walk less
        // in the freeze); the caller checked the rest (`precheck_process`).
        precheck_areas(pid, smaps)?;
        let mut d = late.then(|| Deferral::new(threads));
        let mut out = Vec::new();
        for a in smaps {
            let Some(kind) = area_kind(pid, a)? else {
                continue;
            };
            let defer = d.as_mut().filter(|_| Deferral::applies(a, &kind));
            let runs = src.save_area(a, &kind, pw, defer)?;
            out.push(area_record(a, kind, runs));
        }
        deferral = d;
        Ok(out)
    })?;
    super::late::seal(&mut m, deferral.as_ref());
    Ok((m, deferral, check))
}

/// The address space with its VmFlags (smaps), read before the freeze while the
/// process still runs. Reading smaps walks every page table (some 15 ms per GiB
/// resident), so the freeze reads only /proc/PID/maps and takes each area's flags
/// from here when its line there is the same. A flag can change without the line
/// changing (madvise or mlock of a whole area, or an area unmapped and mapped again
/// alike, which loses a pre-copy's write tracking): an [`AreaWatch`] started just
/// before the read counts the system calls that could do it, and if it saw any (or
/// could not start), the dump's choice is checked against smaps read again once the
/// freeze's critical path is over ([`FlagsCheck`]), and the migration fails if they
/// differ.
pub struct EarlyLayout {
    areas: Vec<MapArea>,
    /// Counting since just before `areas` were read; `None` if it could not start.
    watch: Option<AreaWatch>,
}

impl EarlyLayout {
    pub fn read(pid: i32) -> Result<EarlyLayout, DumpError> {
        let watch = AreaWatch::start(pid)
            .map_err(|e| tracing::debug!(pid, "memory-area calls not watched: {e}"))
            .ok();
        Ok(EarlyLayout {
            areas: read_smaps(pid)?,
            watch,
        })
    }

    /// With the process frozen, before anything runs in it: `Ok` if the flags read
    /// then are sure to hold now; otherwise why not.
    fn quiet(&self, frozen: &Frozen) -> Result<(), String> {
        let tids: Vec<i32> = frozen.threads.iter().map(|t| t.tid).collect();
        match &self.watch {
            Some(w) => w.quiet(&tids),
            None => Err("the memory-area calls were not watched".into()),
        }
    }
}

fn read_smaps(pid: i32) -> Result<Vec<MapArea>, DumpError> {
    parse_smaps(&read_proc(format!("/proc/{pid}/smaps"))?).map_err(|e| DumpError::Other {
        pid,
        what: e.to_string(),
    })
}

/// The areas a dump went by, with VmFlags taken from an [`EarlyLayout`], to be
/// compared with smaps read while the process is still frozen, before anything runs
/// from the image ([`FlagsCheck::run`]), unless the layout's [`AreaWatch`] saw no
/// call that could change them. The read (a page-table walk: ~40 ms at 4 GiB)
/// starts on a thread of its own as soon as the layout is settled, beside the rest
/// of the dump, so that the freeze's commit does not wait for all of it.
#[derive(Debug)]
pub struct FlagsCheck {
    pid: i32,
    used: Vec<MapArea>,
    /// The read of smaps, `None` when the watch proved the flags unchanged.
    now: Option<std::thread::JoinHandle<Result<Vec<MapArea>, DumpError>>>,
}

impl FlagsCheck {
    /// Starts reading smaps unless `quiet` (the watch's answer) is `Ok`: the process
    /// must be frozen, the dump's injected reads over (they map and unmap a scratch
    /// area), and a pre-copy's tracking still on (ending it clears the `uw` flags);
    /// all stay so until [`FlagsCheck::run`].
    fn start(pid: i32, used: Vec<MapArea>, quiet: Result<(), String>) -> FlagsCheck {
        let now = match quiet {
            Ok(()) => {
                tracing::debug!("flags check: no call could change them since the early read");
                None
            }
            Err(why) => {
                tracing::debug!("flags check: reading smaps again ({why})");
                let span = tracing::Span::current();
                Some(std::thread::spawn(move || {
                    let _span = span.entered();
                    read_smaps(pid)
                }))
            }
        };
        FlagsCheck { pid, used, now }
    }

    /// True if the check reads smaps again (the watch could not prove the flags).
    pub fn reads_smaps(&self) -> bool {
        self.now.is_some()
    }

    /// Waits for the read and compares: an error names the first difference.
    pub fn run(self) -> Result<(), DumpError> {
        let Some(now) = self.now else {
            return Ok(());
        };
        let now = now.join().unwrap_or_else(|_| {
            Err(DumpError::Other {
                pid: self.pid,
                what: "the read of its smaps for the flags check panicked".into(),
            })
        })?;
        match super::maps::first_difference(&self.used, &now) {
            None => Ok(()),
            Some(d) => Err(DumpError::Other {
                pid: self.pid,
                what: format!(
                    "its memory areas changed while it was being frozen ({d}; madvise or \
                     mlock?), so the image may not be faithful; it was not moved, try again"
                ),
            }),
        }
    }
}

/// The memory step of [`collect_into`]: given the layout (read after the injected
/// reads), the threads and the page writer, saves the pages and returns the areas.
pub(crate) type MemoryStep<'a> =
    dyn FnMut(&[MapArea], &[ThreadImage], &mut PageWriter) -> Result<Vec<Area>, DumpError> + 'a;

/// [`collect`] with the page writer given (it may already hold pages, as after
/// pre-copy rounds) and the memory step chosen by the caller.
/// With `early`, the areas' VmFlags come from there if the layout is the same (see
/// [`EarlyLayout`]); the [`FlagsCheck`] returned then must pass before anything runs
/// from the image.
pub(crate) fn collect_into(
    pid: i32,
    frozen: &Frozen,
    mut pw: PageWriter,
    early: Option<&EarlyLayout>,
    memory: &mut MemoryStep,
) -> Result<(Manifest, Option<FlagsCheck>), DumpError> {
    let mut ph = crate::phases::Phases::new("collect");
    // Whether the early flags still hold, asked before the injected reads (which
    // make such calls themselves).
    let quiet = early.map_or_else(|| Err("no early layout".into()), |e| e.quiet(frozen));
    let status = read_proc(format!("/proc/{pid}/status"))?;
    // Where to plant the gadget: /proc/PID/maps is enough (smaps costs a page-table
    // walk of the whole address space).
    let smaps0 =
        parse_smaps(&read_proc(format!("/proc/{pid}/maps"))?).map_err(|e| DumpError::Other {
            pid,
            what: e.to_string(),
        })?;
    let mut threads = frozen
        .threads
        .iter()
        .map(|t| thread_basics(pid, t))
        .collect::<Result<Vec<_>, _>>()?;
    let shared_pending: Vec<Vec<u8>> = frozen.threads[0]
        .pending(true)?
        .iter()
        .map(|s| s.to_vec())
        .collect();
    let vtids: Vec<i32> = threads.iter().map(|t| t.tid).collect();
    ph.mark("status+maps+threads");
    let inj = inject_reads(pid, frozen, &smaps0, &vtids)?;
    for (ti, (ctid, alt)) in threads.iter_mut().zip(&inj.per_thread) {
        ti.clear_tid = *ctid;
        ti.altstack = *alt;
    }
    let shared_sigs: Vec<i32> = shared_pending_sigs(&shared_pending);
    for (ti, t) in threads.iter_mut().zip(&frozen.threads) {
        undo_spurious_eintr(t, ti, &shared_sigs)?;
    }
    ph.mark("injected reads");
    let mut mm =
        procfs::parse_stat_mm(&read_proc(format!("/proc/{pid}/stat"))?).ok_or_else(|| {
            DumpError::Other {
                pid,
                what: "cannot parse /proc/PID/stat".into(),
            }
        })?;
    mm.brk = inj.brk;
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).map_err(|source| DumpError::Proc {
        path: format!("/proc/{pid}/auxv"),
        source,
    })?;
    mm.auxv = procfs::parse_auxv(&auxv);
    ph.mark("stat+auxv");
    // The layout after the injected reads (which map and unmap a scratch area).
    let from_early = match early {
        Some(e) => {
            let layout = parse_smaps(&read_proc(format!("/proc/{pid}/maps"))?).map_err(|e| {
                DumpError::Other {
                    pid,
                    what: e.to_string(),
                }
            })?;
            let with = super::maps::flags_from(&layout, &e.areas);
            if with.is_none() {
                tracing::debug!("the layout changed since the early read; reading smaps");
            }
            with
        }
        None => None,
    };
    let (smaps, check) = match from_early {
        Some(used) => (used.clone(), Some(FlagsCheck::start(pid, used, quiet))),
        None => (read_smaps(pid)?, None),
    };
    ph.mark("layout");
    let areas = memory(&smaps, &threads, &mut pw)?;
    ph.mark("memory");
    let fds = dump_fds(pid, &mut pw)?;
    ph.mark("fds");
    let (pages_len, chunk_crcs) = pw.finish()?;
    ph.mark("pages.img closed");

    let mut rlimits = Vec::new();
    // prlimit on another user's process needs CAP_SYS_RESOURCE; /proc/PID/limits not.
    let from_file = procfs::parse_limits(&read_proc(format!("/proc/{pid}/limits"))?);
    for res in 0..16 {
        let (cur, max) = match sys::prlimit_get(pid, res) {
            Ok(v) => v,
            Err(e) => *from_file
                .get(res as usize)
                .ok_or_else(|| DumpError::Other {
                    pid,
                    what: format!("prlimit({res}): {e}"),
                })?,
        };
        rlimits.push((res, cur, max));
    }
    let personality =
        u64::from_str_radix(read_proc(format!("/proc/{pid}/personality"))?.trim(), 16).unwrap_or(0);
    let groups = procfs::status_field(&status, "Groups")
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    let xsave_len = threads[0].xsave.len();
    let comm = read_proc(format!("/proc/{pid}/comm"))?
        .trim_end()
        .to_string();
    let exe = read_link(format!("/proc/{pid}/exe"))?;
    let cwd = read_link(format!("/proc/{pid}/cwd"))?;
    let root = read_link(format!("/proc/{pid}/root"))?;
    ph.mark("limits+links");
    ph.log();
    let m = Manifest {
        version: image::IMAGE_VERSION,
        pid: procfs::innermost_id(&status, "NSpid").unwrap_or(pid),
        comm,
        exe,
        threads,
        shared_pending,
        sigactions: inj.sigactions,
        itimers: inj.itimers,
        areas,
        mm,
        rlimits,
        cwd,
        root,
        umask: u32::from_str_radix(procfs::status_field(&status, "Umask").unwrap_or("022"), 8)
            .unwrap_or(0o022),
        personality,
        creds: Creds {
            uid: procfs::id_triple(&status, "Uid").unwrap_or_default(),
            gid: procfs::id_triple(&status, "Gid").unwrap_or_default(),
            groups,
            caps: caps_of(&status),
        },
        fds,
        pages_len,
        chunk_crcs,
        late_len: 0,
        xsave_len,
        stopped: false,
        posix_timers: inj.timers,
        prctl: inj.prctl,
    };
    Ok((m, check))
}

/// "/memfd:NAME (deleted)" -> "NAME".
fn memfd_name(n: &str) -> String {
    n.trim_start_matches("/memfd:")
        .trim_end_matches(" (deleted)")
        .to_string()
}

fn shared_pending_sigs(infos: &[Vec<u8>]) -> Vec<i32> {
    infos
        .iter()
        .map(|i| i32::from_ne_bytes(i[..4].try_into().unwrap()))
        .collect()
}

/// epoll_wait answers -EINTR to the freeze itself (PTRACE_INTERRUPT makes a signal
/// pending). Unless a real signal is waiting, make it restart instead, both in the
/// image and in the live thread (for --leave-running or a thaw).
fn undo_spurious_eintr(t: &Stopped, ti: &mut ThreadImage, shared: &[i32]) -> Result<(), DumpError> {
    const EPOLL_WAITS: [u64; 3] = [
        libc::SYS_epoll_wait as u64,
        libc::SYS_epoll_pwait as u64,
        441,
    ];
    const ERESTARTNOHAND: i64 = -514;
    let mut r = t.regs()?;
    if !EPOLL_WAITS.contains(&r.orig_rax) || r.rax as i64 != -(libc::EINTR as i64) {
        return Ok(());
    }
    let own: Vec<i32> = shared_pending_sigs(&ti.pending);
    let real = own
        .iter()
        .chain(shared)
        .any(|&s| s > 0 && ti.sigmask & (1u64 << (s - 1)) == 0);
    if real {
        return Ok(());
    }
    r.rax = ERESTARTNOHAND as u64;
    t.set_regs(&r)?;
    ti.regs = regs::to_words(&r);
    Ok(())
}

pub(crate) fn area_kind(pid: i32, a: &MapArea) -> Result<Option<AreaKind>, DumpError> {
    Ok(Some(match a.name.as_str() {
        "[vsyscall]" => return Ok(None),
        "[vvar]" => AreaKind::Vvar,
        "[vvar_vclock]" => AreaKind::VvarVclock,
        "[vdso]" => AreaKind::Vdso,
        n if a.shared && n.starts_with("/memfd:") => {
            let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", a.start, a.end);
            let md =
                std::fs::metadata(&mf).map_err(|source| DumpError::Proc { path: mf, source })?;
            AreaKind::Memfd {
                name: memfd_name(n),
                ino: a.inode,
                size: md.size(),
            }
        }
        n if a.shared && (n.starts_with("/dev/zero") || n.starts_with("/SYSV")) => {
            AreaKind::SharedMem {
                name: n.to_string(),
            }
        }
        n if a.is_file() && (n.ends_with(" (deleted)") || n.starts_with("/memfd:")) => {
            if a.shared {
                return Err(refuse(
                    pid,
                    format!(
                        "area {:#x}-{:#x}: shared mapping of deleted file {n}",
                        a.start, a.end
                    ),
                ));
            }
            AreaKind::DeletedFile {
                path: n.to_string(),
            }
        }
        n if a.is_file() => {
            let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", a.start, a.end);
            let md =
                std::fs::metadata(&mf).map_err(|source| DumpError::Proc { path: mf, source })?;
            AreaKind::File {
                path: n.to_string(),
                size: md.size(),
                mtime: md.mtime(),
                mtime_nsec: md.mtime_nsec(),
            }
        }
        _ => AreaKind::Anon,
    }))
}

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Pages of an area examined at a time, so that huge sparse reservations cost little
/// memory.
pub(crate) const WINDOW: u64 = 1 << 18;

/// Address ranges `[start, end)`, sorted and disjoint.
pub type Spans = Vec<(u64, u64)>;

/// `ranges` (sorted by start) with overlapping and adjacent ones joined.
pub(crate) fn joined(ranges: impl IntoIterator<Item = (u64, u64)>) -> Spans {
    let mut out: Spans = Vec::new();
    for (s, e) in ranges {
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `ranges` in any order, as [`Spans`]: sorted, overlapping and adjacent ones
/// joined.
pub(crate) fn sorted_joined(mut ranges: Vec<(u64, u64)>) -> Spans {
    ranges.sort_unstable();
    joined(ranges)
}

/// Appends `[s, e)` to `out` (sorted, disjoint), joined to the last range if they
/// touch.
fn push_joined(out: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    match out.last_mut() {
        Some(last) if last.1 == s => last.1 = e,
        _ => out.push((s, e)),
    }
}

/// Page categories for PAGEMAP_SCAN: populated (present or swapped) and not a file
/// page, i.e. the pages the dump saves of a private area (the same test as on
/// `/proc/PID/pagemap`'s PM_PRESENT, PM_SWAP and PM_FILE bits).
pub(crate) const SAVED_ANYOF: u64 = kabi::PAGE_IS_PRESENT | kabi::PAGE_IS_SWAPPED;
pub(crate) const SAVED_NOT: u64 = kabi::PAGE_IS_FILE;

/// A process's memory as the dump reads it: PAGEMAP_SCAN (or, on kernels without
/// it, `/proc/PID/pagemap`) to choose the pages, process_vm_readv to read them
/// (`/proc/PID/mem` for protections it cannot read).
pub(crate) struct MemSource {
    pub pid: i32,
    pub pagemap: std::fs::File,
    pm_path: String,
    mem: std::fs::File,
    buf: Vec<u8>,
}

impl MemSource {
    pub fn open(pid: i32) -> Result<MemSource, DumpError> {
        let open = |path: String| {
            std::fs::File::open(&path).map_err(|source| DumpError::Proc { path, source })
        };
        Ok(MemSource {
            pid,
            pagemap: open(format!("/proc/{pid}/pagemap"))?,
            pm_path: format!("/proc/{pid}/pagemap"),
            mem: open(format!("/proc/{pid}/mem"))?,
            buf: vec![0u8; 8 << 20],
        })
    }

    /// PAGEMAP_SCAN over `[start, end)` (see `sys::uffd::pagemap_scan`); the regions
    /// found, adjacent ones joined.
    pub fn scan(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        required: u64,
        inverted: u64,
        anyof: u64,
    ) -> Result<Vec<(u64, u64)>, Errno> {
        let mut out = Vec::new();
        self.walk(start, end, flags, [required, inverted, anyof, 0], |r| {
            push_joined(&mut out, r.start, r.end)
        })?;
        // Joined again: see `walk` on pages reported twice.
        Ok(sorted_joined(out))
    }

    /// PAGEMAP_SCAN over `[start, end)` in as many calls as it takes; `each` sees
    /// every region found, with the categories `[required, inverted, anyof, also]`
    /// chose and reported (see `sys::uffd::pagemap_scan`). A call whose output
    /// filled up may stop (walk_end) before the end of regions it reported, and
    /// the next call reports those pages again: callers keep the union (sorted and
    /// joined, [`sorted_joined`]); seen as runs listed twice in a pre-copy's
    /// manifest once an area had more regions than one call takes. (Cutting the
    /// second report off at the first's end lost written pages instead.)
    fn walk(
        &self,
        start: u64,
        end: u64,
        flags: u64,
        [required, inverted, anyof, also]: [u64; 4],
        mut each: impl FnMut(&kabi::PageRegion),
    ) -> Result<(), Errno> {
        let mut v = Vec::new();
        let mut at = start;
        while at < end {
            v.clear();
            let walked = sys::uffd::pagemap_scan(
                self.pagemap.as_raw_fd(),
                at,
                end,
                flags,
                required,
                inverted,
                anyof,
                also,
                0,
                &mut v,
            )?;
            v.iter().for_each(&mut each);
            if walked <= at {
                return Err(Errno::EIO);
            }
            at = walked;
        }
        Ok(())
    }

    /// For an area a pre-copy tracks (private anonymous or private file memory,
    /// registered for asynchronous write-protect): the ranges the dump saves (as
    /// [`saved_runs`](Self::saved_runs) chooses them) and, of those, the ones
    /// written since the last round, in one walk of its page tables.
    pub fn saved_and_written(&self, a: &MapArea, kind: &AreaKind) -> Result<(Spans, Spans), Errno> {
        let not = match kind {
            AreaKind::Anon => 0,
            _ => SAVED_NOT,
        };
        let (mut saved, mut written) = (Vec::new(), Vec::new());
        let cats = [0, not, SAVED_ANYOF, kabi::PAGE_IS_WRITTEN];
        self.walk(a.start, a.end, kabi::PM_SCAN_CHECK_WPASYNC, cats, |r| {
            push_joined(&mut saved, r.start, r.end);
            if r.categories & kabi::PAGE_IS_WRITTEN != 0 {
                push_joined(&mut written, r.start, r.end);
            }
        })?;
        // Joined again: see `walk` on pages reported twice.
        Ok((sorted_joined(saved), sorted_joined(written)))
    }

    /// The address ranges `[start, end)` of `a` the dump saves, in order: for private
    /// anonymous and private file areas, the pages present or swapped and not
    /// file-backed (one PAGEMAP_SCAN walk; `/proc/PID/pagemap` read in windows where
    /// the kernel lacks it); for deleted files and shared memory, all; for shared
    /// files and the vDSO, none.
    pub fn saved_runs(&self, a: &MapArea, kind: &AreaKind) -> Result<Vec<(u64, u64)>, DumpError> {
        if !matches!(kind, AreaKind::Anon | AreaKind::File { .. }) || a.shared {
            return self.pagemap_runs(a, kind);
        }
        // In private anonymous memory no page is a file page: without the FILE
        // category the kernel need not look at each page's struct page, which makes
        // the walk of a large area several times faster.
        let not = match kind {
            AreaKind::Anon => 0,
            _ => SAVED_NOT,
        };
        match self.scan(a.start, a.end, 0, 0, not, SAVED_ANYOF) {
            Ok(r) => Ok(r),
            // Before Linux 6.7.
            Err(Errno::ENOTTY | Errno::EINVAL) => self.pagemap_runs(a, kind),
            Err(e) => Err(DumpError::Other {
                pid: self.pid,
                what: format!(
                    "PAGEMAP_SCAN of {:#x}-{:#x} {}: {e}",
                    a.start, a.end, a.name
                ),
            }),
        }
    }

    /// [`saved_runs`](Self::saved_runs) from `/proc/PID/pagemap`, read in windows.
    pub(crate) fn pagemap_runs(
        &self,
        a: &MapArea,
        kind: &AreaKind,
    ) -> Result<Vec<(u64, u64)>, DumpError> {
        let page = sys::page_size();
        let npages = a.len() / page;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut w0 = 0u64;
        while w0 < npages {
            let wn = WINDOW.min(npages - w0);
            for (s, e) in true_runs(&self.saveable(a, kind, w0, wn)?) {
                let rs = a.start + (w0 + s as u64) * page;
                let re = a.start + (w0 + e as u64) * page;
                push_joined(&mut runs, rs, re);
            }
            w0 += wn;
        }
        Ok(runs)
    }

    /// Which pages of `a` (pages `w0..w0+wn` of it) the dump saves, from
    /// `/proc/PID/pagemap` (see [`saved_runs`](Self::saved_runs)).
    fn saveable(
        &self,
        a: &MapArea,
        kind: &AreaKind,
        w0: u64,
        wn: u64,
    ) -> Result<Vec<bool>, DumpError> {
        let page = sys::page_size();
        Ok(match kind {
            AreaKind::Vvar | AreaKind::VvarVclock | AreaKind::Vdso => vec![false; wn as usize],
            AreaKind::File { .. } if a.shared => vec![false; wn as usize],
            AreaKind::SharedMem { .. } | AreaKind::DeletedFile { .. } | AreaKind::Memfd { .. } => {
                vec![true; wn as usize]
            }
            AreaKind::Anon | AreaKind::File { .. } => {
                let mut raw = vec![0u8; wn as usize * 8];
                self.pagemap
                    .read_exact_at(&mut raw, (a.start / page + w0) * 8)
                    .map_err(|source| DumpError::Proc {
                        path: self.pm_path.clone(),
                        source,
                    })?;
                raw.chunks_exact(8)
                    .map(|e| {
                        let v = u64::from_ne_bytes(e.try_into().unwrap());
                        v & (PM_PRESENT | PM_SWAP) != 0 && v & PM_FILE == 0
                    })
                    .collect()
            }
        })
    }

    /// Appends `len` bytes of the process's memory at `addr` to `pw`, in big reads;
    /// returns the offset in pages.img where they start.
    pub fn copy_run(&mut self, addr: u64, len: u64, pw: &mut PageWriter) -> Result<u64, DumpError> {
        let pid = self.pid;
        let off = pw.offset();
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(self.buf.len());
            let at = addr + done;
            let chunk = &mut self.buf[..n];
            let ok = sys::vm_read_exact(pid, at, chunk).is_ok();
            if !ok {
                // Unreadable protections (PROT_NONE etc.): /proc/PID/mem reads with force.
                self.mem
                    .read_exact_at(chunk, at)
                    .map_err(|e| DumpError::Memory {
                        pid,
                        addr: at,
                        len: n,
                        errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                    })?;
            }
            pw.write(chunk)?;
            done += n as u64;
        }
        Ok(off)
    }

    /// Reads `/proc/PID/mem` at `addr` into `buf` (for what process_vm_readv refuses).
    pub fn read_forced(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem.read_exact_at(buf, addr)
    }

    /// Saves the pages of `a` the dump saves (see [`saved_runs`](Self::saved_runs));
    /// returns its runs `(address, pages, offset)`. With `defer`, pages outside its
    /// windows are not written but reserved in late.img.
    pub fn save_area(
        &mut self,
        a: &MapArea,
        kind: &AreaKind,
        pw: &mut PageWriter,
        mut defer: Option<&mut Deferral>,
    ) -> Result<Vec<(u64, u64, u64)>, DumpError> {
        let page = sys::page_size();
        let mut runs = Vec::new();
        for (addr, end) in self.saved_runs(a, kind)? {
            match defer.as_deref_mut() {
                None => {
                    let off = self.copy_run(addr, end - addr, pw)?;
                    runs.push((addr, (end - addr) / page, off));
                }
                Some(d) => {
                    for (ps, pe, late) in d.split(addr, end) {
                        let off = match late {
                            true => d.defer(ps, pe),
                            false => self.copy_run(ps, pe - ps, pw)?,
                        };
                        runs.push((ps, (pe - ps) / page, off));
                    }
                }
            }
        }
        Ok(runs)
    }
}

/// The maximal runs `[s, e)` of `true` in `v`.
pub(crate) fn true_runs(v: &[bool]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if !v[i] {
            i += 1;
            continue;
        }
        let s = i;
        while i < v.len() && v[i] {
            i += 1;
        }
        out.push((s, i));
    }
    out
}

/// The image's record of area `a` with its saved `runs`.
pub(crate) fn area_record(a: &MapArea, kind: AreaKind, runs: Vec<(u64, u64, u64)>) -> Area {
    let madv = a
        .vmflags
        .iter()
        .filter(|f| matches!(f.as_str(), "dc" | "dd" | "wf" | "hg" | "nh" | "lo"))
        .cloned()
        .collect();
    Area {
        start: a.start,
        end: a.end,
        prot: a.prot,
        shared: a.shared,
        offset: a.offset,
        growsdown: a.has_flag("gd"),
        name: a.name.clone(),
        kind,
        madv,
        runs,
    }
}

fn dump_fds(pid: i32, pw: &mut PageWriter) -> Result<Vec<FdImage>, DumpError> {
    let fds = list_fds(pid)?;
    let pidfd = sys::pidfd_open(pid).map_err(|e| DumpError::Other {
        pid,
        what: format!("pidfd_open: {e}"),
    })?;
    let mut out: Vec<FdImage> = Vec::new();
    let mut fifos_seen = std::collections::BTreeSet::new();
    for (fd, link) in &fds {
        let fd = *fd;
        let info_text = read_proc(format!("/proc/{pid}/fdinfo/{fd}"))?;
        let info = parse_fdinfo(&info_text).map_err(|e| DumpError::Other {
            pid,
            what: format!("fd {fd}: {e}"),
        })?;
        let dup_of = fds
            .iter()
            .take_while(|(f, _)| *f < fd)
            .filter(|(_, l)| l == link)
            .find(|(f, _)| sys::kcmp_file(pid, pid, *f, fd) == Ok(0))
            .map(|(f, _)| *f);
        let proc_path = format!("/proc/{pid}/fd/{fd}");
        let kind = match classify_link(link) {
            LinkKind::Path(path) => {
                let md = std::fs::metadata(&proc_path).map_err(|source| DumpError::Proc {
                    path: proc_path.clone(),
                    source,
                })?;
                let ft = md.file_type();
                use std::os::unix::fs::FileTypeExt;
                if ft.is_fifo() {
                    // Buffered bytes travel once per FIFO, with the first fd naming
                    // it (dups and other opens of the same FIFO carry none).
                    let data = if dup_of.is_none() && fifos_seen.insert((md.dev(), md.ino())) {
                        pipe_contents(pid, pidfd.as_raw_fd(), fd, &proc_path)?.1
                    } else {
                        Vec::new()
                    };
                    FdKind::Fifo { path, data }
                } else if ft.is_file() && path.starts_with("/memfd:") {
                    let (data_off, len) = if dup_of.is_none() {
                        let data = std::fs::read(&proc_path).map_err(|source| DumpError::Proc {
                            path: proc_path.clone(),
                            source,
                        })?;
                        (pw.write(&data)?, data.len() as u64)
                    } else {
                        (0, 0)
                    };
                    let theirs =
                        sys::pidfd_getfd(pidfd.as_raw_fd(), fd).map_err(|e| DumpError::Other {
                            pid,
                            what: format!("fd {fd}: pidfd_getfd: {e}"),
                        })?;
                    let seals = sys::get_seals(theirs.as_raw_fd()).unwrap_or(0);
                    FdKind::Memfd {
                        name: memfd_name(&path),
                        ino: md.ino(),
                        pos: info.pos,
                        data_off,
                        len,
                        seals,
                    }
                } else if ft.is_file() && md.nlink() == 0 {
                    let (data_off, len) = if dup_of.is_none() {
                        let data = std::fs::read(&proc_path).map_err(|source| DumpError::Proc {
                            path: proc_path.clone(),
                            source,
                        })?;
                        (pw.write(&data)?, data.len() as u64)
                    } else {
                        (0, 0)
                    };
                    FdKind::Deleted {
                        path,
                        pos: info.pos,
                        data_off,
                        len,
                        mode: md.mode() & 0o7777,
                    }
                } else if let Some(state) = ft
                    .is_char_device()
                    .then(|| sys::pidfd_getfd(pidfd.as_raw_fd(), fd).ok())
                    .flatten()
                    .and_then(|theirs| sys::tty_get(theirs.as_raw_fd()).ok())
                {
                    FdKind::Tty { path, state }
                } else {
                    FdKind::File {
                        path,
                        pos: info.pos,
                    }
                }
            }
            LinkKind::Pipe(inode) => {
                let (size, data) = pipe_contents(pid, pidfd.as_raw_fd(), fd, &proc_path)?;
                FdKind::Pipe {
                    inode,
                    write_end: info.flags & libc::O_ACCMODE == libc::O_WRONLY,
                    size,
                    data,
                }
            }
            LinkKind::Socket(ino) => {
                return Err(refuse(pid, format!("fd {fd}: {}", socket_kind(pid, ino))))
            }
            LinkKind::AnonInode(n) => anon_kind(pid, fd, &n, &info_text, &info)?,
            LinkKind::Other(o) => {
                return Err(refuse(pid, format!("fd {fd}: {o} (unsupported kind)")))
            }
        };
        out.push(FdImage {
            fd,
            flags: info.flags,
            cloexec: info.flags & libc::O_CLOEXEC != 0,
            dup_of,
            kind,
        });
    }
    // Data buffered in a pipe is carried once, by the first fd naming it.
    let mut seen = std::collections::BTreeSet::new();
    for f in &mut out {
        if let FdKind::Pipe { inode, data, .. } = &mut f.kind {
            if !seen.insert(*inode) {
                data.clear();
            }
        }
    }
    Ok(out)
}

/// Size and buffered bytes of a pipe or FIFO, read without consuming them.
fn pipe_contents(
    pid: i32,
    pidfd: i32,
    fd: i32,
    proc_path: &str,
) -> Result<(i32, Vec<u8>), DumpError> {
    let err = |what: String| DumpError::Other { pid, what };
    let theirs =
        sys::pidfd_getfd(pidfd, fd).map_err(|e| err(format!("fd {fd}: pidfd_getfd: {e}")))?;
    let size = sys::pipe_size(theirs.as_raw_fd())
        .map_err(|e| err(format!("fd {fd}: F_GETPIPE_SZ: {e}")))?;
    let rd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(proc_path)
        .map_err(|source| DumpError::Proc {
            path: proc_path.to_string(),
            source,
        })?;
    let (r, w) = sys::pipe().map_err(|e| err(format!("pipe: {e}")))?;
    let _ = sys::set_pipe_size(w.as_raw_fd(), size.max(4096));
    let n = match sys::tee(rd.as_raw_fd(), w.as_raw_fd(), size as usize) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => return Err(err(format!("fd {fd}: tee: {e}"))),
    };
    let mut data = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let k = sys::read_raw(r.as_raw_fd(), &mut data[got..]);
        if k <= 0 {
            break;
        }
        got += k as usize;
    }
    data.truncate(got);
    Ok((size, data))
}

use std::os::unix::fs::OpenOptionsExt;

/// The capability sets of /proc/PID/status.
fn caps_of(status: &str) -> Option<crate::engine::image::Caps> {
    let field = |name: &str| {
        procfs::status_field(status, name).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some(crate::engine::image::Caps {
        inheritable: field("CapInh")?,
        permitted: field("CapPrm")?,
        effective: field("CapEff")?,
        bounding: field("CapBnd")?,
        ambient: field("CapAmb").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testproc::Py;

    /// The pages PAGEMAP_SCAN picks are exactly those `/proc/PID/pagemap` picks, in
    /// every area of a stopped python3 whose private anonymous memory holds written
    /// pages, pages only read (the zero page) and pages never touched, beside its
    /// libraries' file pages and copied-on-write data.
    #[test]
    fn pagemap_scan_and_pagemap_choose_the_same_pages_to_save() {
        let p = Py::start(
            "import mmap\n\
             m=mmap.mmap(-1,64<<20,flags=mmap.MAP_PRIVATE)\n\
             for i in range(0,64<<20,3*4096): m[i]=1\n\
             x=sum(m[i] for i in range(4096,64<<20,5*4096))",
            " pass",
        );
        let pid = p.pid();
        crate::sys::kill(pid, libc::SIGSTOP).unwrap();
        let src = MemSource::open(pid).unwrap();
        let smaps = parse_smaps(&read_proc(format!("/proc/{pid}/smaps")).unwrap()).unwrap();
        let mut compared = 0;
        let mut pages = 0;
        for a in &smaps {
            let Some(kind) = area_kind(pid, a).unwrap() else {
                continue;
            };
            let by_scan = src.saved_runs(a, &kind).unwrap();
            let by_pagemap = src.pagemap_runs(a, &kind).unwrap();
            assert_eq!(
                by_scan, by_pagemap,
                "area {:#x}-{:#x} {}",
                a.start, a.end, a.name
            );
            compared += 1;
            pages += by_scan.iter().map(|(s, e)| (e - s) / 4096).sum::<u64>();
        }
        drop(p);
        assert!(compared > 5, "only {compared} areas");
        // 64 MiB / 3 pages written, 1/5 read (zero page, saved as present), at least.
        assert!(pages > (64 << 20) / 4096 / 3, "{pages} pages");
    }

    /// A python3 that maps an area, then on each line of input changes its memory
    /// as told (`dontfork`: madvise the whole area, which leaves /proc/PID/maps as
    /// it was; `map`: a new area; `nothing`).
    fn changer() -> Py {
        Py::start(
            "import mmap\n\
             m=mmap.mmap(-1,1<<20,flags=mmap.MAP_SHARED)\n\
             m[0]=1\n\
             keep=[]",
            " if l=='dontfork': m.madvise(mmap.MADV_DONTFORK)\n\
             \x20if l=='map': keep.append(mmap.mmap(-1,3<<20,flags=mmap.MAP_PRIVATE))",
        )
    }

    /// Reads the early layout (watched unless `unwatched`), lets `change` happen,
    /// then freezes and collects: whether the flags check read smaps again, and its
    /// answer (None if the dump read smaps itself).
    fn dump_after(
        p: &mut Py,
        change: Option<&str>,
        unwatched: bool,
    ) -> Option<(bool, Result<(), DumpError>)> {
        let pid = p.pid();
        let mut early = EarlyLayout::read(pid).unwrap();
        assert!(early.watch.is_some(), "syscall tracepoints on this machine");
        if unwatched {
            early.watch = None;
        }
        if let Some(c) = change {
            p.tell(c);
        }
        let dir = tempfile::tempdir().unwrap();
        let frozen = Frozen::freeze(pid).unwrap();
        let (_, _, check) =
            collect_deferring(pid, &frozen, dir.path(), false, false, Some(&early)).unwrap();
        check.map(|c| (c.reads_smaps(), c.run()))
    }

    /// The flags the freeze takes from before it are checked: nothing changed
    /// passes, with no second smaps read when the watch saw no call that could
    /// change them (and with one when there is no watch); a whole area madvised in
    /// between (its line in /proc/PID/maps unchanged) is seen by the watch and fails
    /// the check, naming the area and the flag; a layout that changed makes the dump
    /// read smaps itself (nothing left to check).
    #[test]
    fn flags_taken_from_before_the_freeze_are_checked() {
        let mut p = changer();
        // The interpreter's own allocations settle first (a heap that grows while
        // it answers would change the layout).
        for _ in 0..3 {
            p.tell("nothing");
        }
        assert!(matches!(
            dump_after(&mut p, None, false),
            Some((false, Ok(())))
        ));
        assert!(matches!(
            dump_after(&mut p, None, true),
            Some((true, Ok(())))
        ));
        match dump_after(&mut p, Some("dontfork"), false) {
            Some((true, Err(e))) => {
                let e = e.to_string();
                assert!(e.contains("dc") && e.contains("try again"), "{e}");
            }
            other => panic!("a flag changed unseen: {other:?}"),
        }
        assert!(dump_after(&mut p, Some("map"), false).is_none());
        // The process ran on unharmed after each dump.
        p.tell("nothing");
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use crate::engine::testproc::Py;

    fn all_sigs() -> Vec<i32> {
        (1..=64)
            .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
            .collect()
    }

    /// A batch runs its calls in order in one stop and stops after the first that
    /// fails; the signal actions read in one batch are those read one call at a
    /// time; the process runs on unharmed (its text put back).
    #[test]
    fn a_batch_runs_calls_in_order_and_stops_at_the_first_failure() {
        // A handler for SIGUSR1 and SIGTERM ignored, so that some actions are set.
        let mut p = Py::start(
            "import signal\n\
             signal.signal(signal.SIGUSR1, lambda *a: None)\n\
             signal.signal(signal.SIGTERM, signal.SIG_IGN)",
            " pass",
        );
        let pid = p.pid();
        let smaps = read_smaps(pid).unwrap();
        let frozen = Frozen::freeze(pid).unwrap();
        let leader = &frozen.threads[0];
        let (rets, one, batched) = with_gadget(pid, &frozen, &smaps, |inj, batch| {
            let code = batch.expect("room for the batch code in program text");
            let scratch = map_scratch(inj, leader)?;
            let calls = [
                (libc::SYS_getpid, [0; 6]),
                (libc::SYS_getppid, [0; 6]),
                (libc::SYS_close, [9999, 0, 0, 0, 0, 0]),
                (libc::SYS_getpid, [0; 6]),
            ];
            let rets = inj.batch(leader, pid, code, scratch, &calls)?;
            let sigs = all_sigs();
            let one = read_sigactions(pid, inj, leader, None, scratch, &sigs)?;
            let batched = read_sigactions(pid, inj, leader, batch, scratch, &sigs)?;
            inj.ok(leader, libc::SYS_munmap, &[scratch, 8192], || {
                "munmap".into()
            })?;
            Ok((rets, one, batched))
        })
        .unwrap();
        drop(frozen);
        let ppid = std::process::id() as i64;
        assert_eq!(rets, vec![pid as i64, ppid, -(libc::EBADF as i64)]);
        assert_eq!(one, batched);
        let handler = |sig: i32| {
            let i = all_sigs().iter().position(|&s| s == sig).unwrap();
            u64_at(&one, 32 * i)
        };
        assert!(handler(libc::SIGUSR1) > 1, "SIGUSR1 has a handler");
        assert_eq!(handler(libc::SIGTERM), 1, "SIGTERM ignored (SIG_IGN)");
        p.tell("still there?");
    }
}

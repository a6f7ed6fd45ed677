//! Handing a process over to another node (added for migration, on top of the engine's
//! pub API): dump it and *keep it frozen*, so that the migration can still thaw it
//! where it was if the destination fails; then end the frozen original the way the
//! migration decided: thaw it (abort), kill it (it moved on from a foreign host), or
//! keep it as the shadow at home until the remote process ends, then make it exit with
//! the same status or die of the same signal, so that its parent's wait() sees the
//! truth.

use super::dump::{collect_deferring, precheck_process, DumpError, FlagsCheck};
use super::freeze::{FreezeError, Frozen};
use super::image;
use super::inject::{InjectError, Injector, GADGET};
use super::late::{Deferral, FlushEnd, Flusher, LateOptions};
use super::maps::parse_smaps;
use super::track::{self, PrecopyOptions, RoundReport, Tracker};
use crate::sys;
use std::path::Path;
use std::time::Instant;

/// Why the frozen original could not be ended as asked.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("pid {pid}: {what}")]
    Other { pid: i32, what: String },
}

/// A process dumped and still frozen under our ptrace. Dropping it thaws it.
pub struct Held {
    /// Writes the late pages (a lazy dump), declared first: dropped (stopped) before
    /// the process thaws.
    flusher: Option<Flusher>,
    /// What the dump leaves for after its critical path (the image synced, a
    /// pre-copy's tracking ended), on a thread of its own; waited for before the
    /// process is thawed, killed or made the shadow (declared before `frozen`: a
    /// drop waits for it too before the process thaws).
    after: After,
    frozen: Frozen,
    /// Bytes of page data written at the freeze.
    pub page_bytes: u64,
    /// Bytes of page data left for the flusher (late.img).
    pub late_bytes: u64,
    /// Time from the freeze to the manifest written, in ms.
    pub dump_ms: f64,
    /// The process's command name.
    pub comm: String,
    /// The manifest's bytes to hand over (see `image::manifest_from`); its file is
    /// then written off the freeze's critical path (see [`Held::checked`]). `None`
    /// if they are more than [`HANDOVER_MAX`]: the file was written in the freeze.
    pub manifest: Option<Vec<u8>>,
    /// A lazy dump's eager pages, encoded ([`image::EagerPages`]; `None` if the dump
    /// is not lazy or a page could not be read: the restore then reads their chunks).
    pub eager: Option<Vec<u8>>,
    /// Signal numbers pending at the freeze (they travel in the image).
    in_image: Vec<i32>,
}

/// The signal numbers of the siginfo records queued in the image (si_signo is the
/// first 32-bit field of a siginfo).
fn pending_signals(m: &image::Manifest) -> Vec<i32> {
    m.shared_pending
        .iter()
        .chain(m.threads.iter().flat_map(|t| t.pending.iter()))
        .filter_map(|si| {
            si.get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        })
        .collect()
}

/// Freezes `pid`, writes its image into `images`, and keeps it frozen. A refusal
/// (unsupported fd, children, device mapping) leaves it running untouched. With
/// `late`, the pages a lazy restore serves on demand are written
/// after the freeze by a [`Flusher`] (see `engine::late`), which starts at once.
pub fn dump_frozen(pid: i32, images: &Path, late: Option<LateOptions>) -> Result<Held, DumpError> {
    let _span = tracing::info_span!("dump_frozen", pid).entered();
    let early = super::dump::prepare_early(pid, images)?;
    if late.is_some() {
        super::late::create_files(images)?;
    }
    let frozen = Frozen::freeze(pid)?;
    let t0 = Instant::now();
    let mut ph = crate::phases::Phases::new("dump_frozen");
    // The areas are checked by the collect, on the layout it reads anyway.
    precheck_process(pid)?;
    ph.mark("precheck");
    let (manifest, deferral, check) =
        collect_deferring(pid, &frozen, images, late.is_some(), false, Some(&early))?;
    ph.mark("collect+late files");
    let written = hand_over(images, image::manifest_bytes(images, &manifest)?)?;
    ph.mark("manifest");
    ph.log();
    let after = after_dump(images, written.clone(), check, None);
    Ok(Held::new(
        frozen,
        &manifest,
        written,
        t0.elapsed().as_secs_f64() * 1e3,
        deferral.zip(late),
        images,
        after,
    ))
}

/// At most this many bytes of manifest and eager pages travel with `restore` (the
/// RPC's frames are capped, 8 MiB by default: `transport::DEFAULT_MAX_FRAME`); a
/// larger manifest is written in the freeze and read from the store, larger eager
/// pages are read from pages.img.
pub const HANDOVER_MAX: usize = 4 << 20;

/// The manifest's bytes to hand over, or `None` after writing its file now if they
/// are more than [`HANDOVER_MAX`] (the destination then reads the file).
fn hand_over(images: &Path, manifest: Vec<u8>) -> Result<Option<Vec<u8>>, DumpError> {
    if manifest.len() <= HANDOVER_MAX {
        return Ok(Some(manifest));
    }
    tracing::debug!(
        bytes = manifest.len(),
        "the manifest is too large to hand over; written in the freeze"
    );
    image::write_manifest_bytes(images, &manifest, false)?;
    Ok(None)
}

/// The pages a lazy restore of `m` fills before the process runs (see
/// [`image::EagerPages`]), read from the frozen process: what its chunks of pages.img
/// hold at those offsets. `None` (the restore reads the chunks) if one cannot be read
/// or their encoding would be more than `budget` bytes.
fn eager_pages(pid: i32, m: &image::Manifest, budget: usize) -> Option<image::EagerPages> {
    let t0 = Instant::now();
    let plan = crate::engine::restore::lazy::plan(m);
    let runs = plan.shaping.areas.iter().flat_map(|a| &a.runs);
    let (count, bytes) = runs.fold((0u64, 0u64), |(c, b), &(_, n, _)| {
        (c + 1, b + n * sys::page_size())
    });
    if 16 + 16 * count + bytes > budget as u64 {
        tracing::debug!(bytes, "the eager pages are too many to hand over");
        return None;
    }
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok();
    let mut out = image::EagerPages::default();
    let mut buf = Vec::new();
    for a in &plan.shaping.areas {
        for &(addr, n, off) in &a.runs {
            buf.resize((n * sys::page_size()) as usize, 0);
            if off & image::LATE != 0
                || !super::late::read_frozen(pid, mem.as_ref(), addr, &mut buf)
            {
                tracing::debug!(addr, n, "an eager page is not readable; not handed over");
                return None;
            }
            out.push(off, &buf);
        }
    }
    tracing::debug!(
        ranges = out.ranges.len(),
        bytes = out.data.len(),
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "eager pages read for the handover"
    );
    Some(out)
}

/// The thread of [`after_dump`]; dropping it waits for it.
struct After {
    thread: Option<std::thread::JoinHandle<()>>,
    /// Tells the thread the freeze is over (dropped: the same).
    go: Option<std::sync::mpsc::Sender<()>>,
    /// The flags check's answer (see [`Held::checked`]), until taken.
    checked: Option<std::sync::mpsc::Receiver<Result<(), DumpError>>>,
    /// Why the check failed, once taken.
    check_failed: Option<String>,
}

impl After {
    fn wait(&mut self) {
        drop(self.go.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the work after the dump panicked");
            }
        }
    }
}

impl Drop for After {
    fn drop(&mut self) {
        self.wait();
    }
}

/// Starts what the dump leaves for after the freeze's critical path: the manifest
/// is written (its bytes travel to the destination with `restore`, so the freeze
/// need not wait for the store: 2-3 ms), the VmFlags the dump took from before the
/// freeze are checked (see `dump::EarlyLayout`), the image is synced (the freeze
/// only closed pages.img: another node reads it all the same), and a pre-copy's
/// tracking ends (`untrack` dropped, see `Tracker::freeze_and_finish`; after the
/// check, which sees the tracking's flags). [`Held::checked`] answers once the
/// manifest is written and the flags checked; the sync and the tracking's end wait
/// until the freeze is over ([`Held::release_late`], or any end of the held
/// process): they would take the CPU and the store's disk from the restore.
fn after_dump(
    images: &Path,
    manifest: Option<Vec<u8>>,
    check: Option<FlagsCheck>,
    untrack: Option<sys::uffd::Uffd>,
) -> After {
    let images = images.to_path_buf();
    let span = tracing::Span::current();
    let (tx, rx) = std::sync::mpsc::channel();
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let _span = span.entered();
        let mut ph = crate::phases::Phases::new("after_dump");
        // The write (round trips to the store) beside the check (CPU).
        let writer = manifest.map(|m| {
            let dir = images.clone();
            std::thread::spawn(move || image::write_manifest_bytes(&dir, &m, false))
        });
        let checked = check.map_or(Ok(()), FlagsCheck::run);
        ph.mark("flags checked");
        let written = writer.map_or(Ok(()), |w| {
            w.join().unwrap_or_else(|_| {
                Err(image::ImageError::Io {
                    path: images.join(image::MANIFEST_FILE),
                    source: std::io::Error::other("the manifest's writer panicked"),
                })
            })
        });
        ph.mark("manifest written");
        let _ = tx.send(written.map_err(DumpError::from).and(checked));
        // The rest waits until the freeze is over (a message, or the sender
        // dropped), and is waited for only once the migration is decided: it must
        // not take the CPU or the store's disk from the restore meanwhile (on one
        // machine, or the store's: measured, with a sync of pages.img beside it the
        // restore's fds and cwd, opened through `/...`, took 16 ms instead of 2-3).
        let _ = wait_go.recv();
        ph.mark("freeze over");
        if let Err(e) = sys::background_thread() {
            tracing::debug!(error = %e, "cannot lower the priority of the work after the dump");
        }
        drop(untrack);
        ph.mark("tracking ended");
        if let Err(e) = image::sync_image(&images) {
            // The copy elsewhere reads the image all the same (it was closed, so it
            // reached the store's server); only its durability is not known.
            tracing::warn!(error = %e, "syncing the image after the freeze");
        }
        ph.mark("image synced");
        ph.log();
    });
    After {
        thread: Some(thread),
        go: Some(go),
        checked: Some(rx),
        check_failed: None,
    }
}

/// Like [`dump_frozen`], but pre-copy: the pages are written in rounds while the
/// process runs (see `engine::track`), then it is frozen and the rest is written
/// (with `late`, left for the flusher). `progress` sees each round and, last, the
/// freeze (whose `ms` is the time from the freeze to the manifest written, the same
/// figure as [`Held::dump_ms`]). On error the process runs on as it was (a refusal
/// comes before anything is injected); on success it is held frozen, and the
/// tracking is ended on a thread of its own (see [`Held::settle`]): nothing of it is
/// left in the process once it is thawed, killed or made the shadow.
pub fn dump_frozen_precopy(
    pid: i32,
    images: &Path,
    opts: &PrecopyOptions,
    late: Option<LateOptions>,
    mut progress: impl FnMut(&RoundReport),
) -> Result<Held, DumpError> {
    let _span = tracing::info_span!("dump_frozen_precopy", pid).entered();
    let mut tracker = Tracker::start(pid, images)?;
    tracker.defer_sync();
    track::run_rounds(&mut tracker, opts, &mut progress)?;
    let f = tracker.freeze_and_finish(late.is_some())?;
    let written = hand_over(images, f.written)?;
    progress(&f.report);
    let after = after_dump(images, written.clone(), f.check, Some(f.uffd));
    Ok(Held::new(
        f.frozen,
        &f.manifest,
        written,
        f.report.ms,
        f.deferral.zip(late),
        images,
        after,
    ))
}

impl Held {
    fn new(
        frozen: Frozen,
        m: &image::Manifest,
        written: Option<Vec<u8>>,
        dump_ms: f64,
        late: Option<(Deferral, LateOptions)>,
        images: &Path,
        after: After,
    ) -> Held {
        let eager = match (&written, &late) {
            (Some(w), Some(_)) => eager_pages(frozen.pid, m, HANDOVER_MAX - w.len()),
            _ => None,
        };
        let flusher = late
            .filter(|(d, _)| !d.is_empty())
            .map(|(d, o)| Flusher::start(frozen.pid, images, d.into_runs(), o));
        Held {
            flusher,
            after,
            page_bytes: m.pages_len,
            late_bytes: m.late_len,
            dump_ms,
            in_image: pending_signals(m),
            comm: m.comm.clone(),
            manifest: written,
            eager: eager.map(|e| e.to_bytes()),
            frozen,
        }
    }

    /// Waits until the late pages are written (or no longer needed): until then the
    /// copy elsewhere depends on this frozen original. `None` without late pages.
    /// The work left after the dump (see `after_dump`) is waited for too.
    pub fn wait_flushed(&mut self) -> Option<FlushEnd> {
        self.release_late();
        let end = self.flusher.take().map(Flusher::wait);
        self.settle();
        end
    }

    /// Whether the image is whole and faithful to the frozen process: its manifest
    /// written (its bytes, [`Held::manifest`], may be handed over before), and the
    /// areas' flags the dump took from before the freeze (see
    /// `dump::EarlyLayout`) checked, both on a thread of their own meanwhile; this
    /// waits for the answer. Nothing may read the manifest's file or run from the
    /// image before it is Ok; on an error the original must thaw.
    pub fn checked(&mut self) -> Result<(), DumpError> {
        let pid = self.frozen.pid;
        if let Some(rx) = self.after.checked.take() {
            let answer = rx.recv().unwrap_or_else(|_| {
                Err(DumpError::Other {
                    pid,
                    what: "the check of its memory areas' flags did not answer".into(),
                })
            });
            self.after.check_failed = answer.err().map(|e| e.to_string());
        }
        match &self.after.check_failed {
            None => Ok(()),
            Some(why) => Err(DumpError::Other {
                pid,
                what: why.clone(),
            }),
        }
    }

    /// Waits for the work the dump left for after the freeze's critical path: the
    /// flags checked, the image synced, a pre-copy's tracking ended (every way of
    /// ending the held process waits for it first).
    pub fn settle(&mut self) {
        self.after.wait();
    }

    /// Lets a flush started with [`LateOptions::held`] write every late page, not
    /// only those the destination asks for, and the work after the dump sync the
    /// image and end a pre-copy's tracking (the freeze is over: the copy runs);
    /// [`Held::wait_flushed`], and so every end but a thaw, does so first.
    pub fn release_late(&self) {
        if let Some(f) = &self.flusher {
            f.release();
        }
        if let Some(go) = &self.after.go {
            let _ = go.send(());
        }
    }

    /// The pid (as the caller sees it).
    pub fn pid(&self) -> i32 {
        self.frozen.pid
    }

    /// Lets the process run on where it was (the migration was abandoned); a flush
    /// of late pages stops first.
    pub fn thaw(mut self) {
        if let Some(f) = self.flusher.take() {
            f.stop();
        }
        // A pre-copy's tracking ends before the process runs again.
        self.settle();
        self.frozen.thaw();
    }

    /// Kills the frozen copy (another copy runs elsewhere now), once its late pages
    /// are written.
    pub fn kill(mut self) {
        self.wait_flushed();
        self.frozen.kill();
    }

    /// Turns the frozen original into the shadow at home (after commit): every signal
    /// blocked, so that signals sent to it stay queued until [`Shadow::take_signals`]
    /// takes them; signals already queued were carried in the image and are dropped.
    /// Late pages are written first (the shadow's memory is released).
    pub fn into_shadow(mut self) -> Result<Shadow, HandoffError> {
        self.wait_flushed();
        let pid = self.frozen.pid;
        for t in &self.frozen.threads {
            t.set_sigmask(!0)?;
        }
        let gadget = exec_area(pid)?;
        let leader = self.frozen.threads[0].tid;
        let poke = |addr: u64, word: u64| {
            sys::ptrace_pokedata(leader, addr, word).map_err(|e| HandoffError::Other {
                pid,
                what: format!("writing the shadow's gadget at {addr:#x}: {e}"),
            })
        };
        poke(gadget, gadget_word(leader, gadget)?)?;
        // gadget+8: a sigset or a zeroed struct sigaction; gadget+40: a zero timespec.
        for i in 0..6 {
            poke(gadget + 8 + 8 * i, 0)?;
        }
        let mut shadow = Shadow {
            held: self,
            gadget,
            late: Vec::new(),
        };
        // Signals queued now were either in the image (pending at the freeze: the
        // copy gets them there) or sent since the freeze: those are forwarded.
        let mut in_image = shadow.held.in_image.clone();
        for sig in shadow.take_signals()? {
            match in_image.iter().position(|&s| s == sig) {
                Some(i) => {
                    in_image.remove(i);
                }
                None => shadow.late.push(sig),
            }
        }
        shadow.release_memory()?;
        Ok(shadow)
    }
}

/// The original process at home after commit: frozen, every signal blocked; signals
/// sent to it are taken out of its queue and forwarded, and it ends as the migrated
/// process ends.
pub struct Shadow {
    held: Held,
    gadget: u64,
    /// Signals sent between the freeze and the shadow's making, to forward first.
    pub late: Vec<i32>,
}

/// `RSEQ_FLAG_UNREGISTER` — include/uapi/linux/rseq.h.
const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// SIGKILL and SIGSTOP cannot be blocked or waited for.
const UNTAKEABLE: u64 = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));

impl Shadow {
    /// The shadow's pid.
    pub fn pid(&self) -> i32 {
        self.held.pid()
    }

    /// Signals pending for the process (bit `n-1` for signal `n`), private and shared.
    fn pending(&self) -> u64 {
        self.pending_raw() & !UNTAKEABLE
    }

    fn pending_raw(&self) -> u64 {
        let pid = self.held.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let mut bits = 0;
        for key in ["SigPnd:", "ShdPnd:"] {
            if let Some(v) = status.lines().find_map(|l| l.strip_prefix(key)) {
                bits |= u64::from_str_radix(v.trim(), 16).unwrap_or(0);
            }
        }
        bits
    }

    /// Whether a SIGSTOP is queued for the shadow (it cannot be taken out of the
    /// queue; a SIGCONT removes it).
    pub fn stop_pending(&self) -> bool {
        self.pending_raw() & (1 << (libc::SIGSTOP - 1)) != 0
    }

    /// Lets a queued SIGSTOP stop the shadow for real, so that its parent sees it
    /// stopped (`waitpid(WUNTRACED)`, SIGCHLD with CLD_STOPPED) as it would see the
    /// process itself: the leader, aimed at the gadget's harmless call, is resumed;
    /// the SIGSTOP is delivered before it runs any instruction (a delivery stop),
    /// is let through, and the shadow enters group-stop, which the kernel reports to
    /// the real parent (we are not it) and to us as a ptrace stop, where we keep it.
    /// Should the SIGSTOP be gone meanwhile (a SIGCONT removed it), the gadget's call
    /// runs and traps, and nothing else happens. Its registers are put back either
    /// way. Returns whether it stopped. Its injected calls work from that stop as
    /// from any other; a later SIGCONT is taken and forwarded as any signal, and
    /// the parent hears of it (CLD_CONTINUED) the next time the shadow passes
    /// through the kernel's signal delivery.
    pub fn take_stop(&self) -> Result<bool, HandoffError> {
        use super::freeze::StopKind;
        let leader = &self.held.frozen.threads[0];
        let saved = leader.regs()?;
        let inj = Injector {
            gadget: self.gadget,
        };
        inj.aim(leader, libc::SYS_getpid, &[])?;
        let mut sig = 0;
        let stopped = loop {
            match leader.cont_and_wait(sig, false)? {
                // The delivery stop: let it through.
                StopKind::Signal(libc::SIGSTOP) => sig = libc::SIGSTOP,
                // The group-stop it entered (or a stop of ours before that).
                StopKind::Event if sig == libc::SIGSTOP => break true,
                StopKind::Signal(libc::SIGTRAP) => break false,
                StopKind::Event | StopKind::Syscall | StopKind::PtraceEvent(_) => sig = 0,
                StopKind::Signal(s) => {
                    leader.set_regs(&saved)?;
                    return Err(HandoffError::Other {
                        pid: self.held.pid(),
                        what: format!("letting a SIGSTOP stop the shadow: signal {s} came"),
                    });
                }
            }
        };
        leader.set_regs(&saved)?;
        Ok(stopped)
    }

    /// Takes every signal queued for the shadow (rt_sigtimedwait with a zero timeout,
    /// run inside it) and returns their numbers, in the order taken.
    pub fn take_signals(&self) -> Result<Vec<i32>, HandoffError> {
        let mut out = Vec::new();
        let pid = self.held.pid();
        let leader = &self.held.frozen.threads[0];
        let saved = leader.regs()?;
        let inj = Injector {
            gadget: self.gadget,
        };
        loop {
            let bits = self.pending();
            if bits == 0 {
                break;
            }
            sys::ptrace_pokedata(leader.tid, self.gadget + 8, bits).map_err(|e| {
                HandoffError::Other {
                    pid,
                    what: format!("writing a sigset: {e}"),
                }
            })?;
            let o = inj.call(
                leader,
                libc::SYS_rt_sigtimedwait,
                &[self.gadget + 8, 0, self.gadget + 40, 8],
            )?;
            sys::ptrace_pokedata(leader.tid, self.gadget + 8, 0).map_err(|e| {
                HandoffError::Other {
                    pid,
                    what: format!("clearing a sigset: {e}"),
                }
            })?;
            if o.ret <= 0 {
                break;
            }
            out.push(o.ret as i32);
        }
        leader.set_regs(&saved)?;
        Ok(out)
    }

    /// Releases the shadow's memory: every area but the one holding the gadget is
    /// unmapped (its code never runs again). rseq is unregistered first in every
    /// thread: the kernel writes into the rseq area whenever a thread returns to user
    /// mode, as it does for each injected call.
    fn release_memory(&self) -> Result<(), HandoffError> {
        let pid = self.held.pid();
        let inj = Injector {
            gadget: self.gadget,
        };
        for t in &self.held.frozen.threads {
            let saved = t.regs()?;
            let conf = t.rseq()?;
            if conf.rseq_abi_pointer != 0 {
                inj.ok(
                    t,
                    libc::SYS_rseq,
                    &[
                        conf.rseq_abi_pointer,
                        conf.rseq_abi_size as u64,
                        RSEQ_FLAG_UNREGISTER,
                        conf.signature as u64,
                    ],
                    || format!("rseq(unregister) in tid {}", t.tid),
                )?;
            }
            t.set_regs(&saved)?;
        }
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| {
            HandoffError::Other {
                pid,
                what: format!("reading /proc/{pid}/maps: {e}"),
            }
        })?;
        let areas = parse_smaps(&text).map_err(|e| HandoffError::Other {
            pid,
            what: e.to_string(),
        })?;
        let leader = &self.held.frozen.threads[0];
        let saved = leader.regs()?;
        for a in areas {
            if a.name == "[vsyscall]" || (a.start <= self.gadget && self.gadget < a.end) {
                continue;
            }
            inj.ok(
                leader,
                libc::SYS_munmap,
                &[a.start, a.end - a.start],
                || format!("munmap({:#x}-{:#x} {})", a.start, a.end, a.name),
            )?;
        }
        leader.set_regs(&saved)?;
        Ok(())
    }

    /// Ends the shadow as `status` (a raw wait status) says: exit with the same code,
    /// or die of the same signal. Nothing of its own code runs again.
    pub fn end_like(self, status: i32) -> Result<(), HandoffError> {
        let pid = self.held.pid();
        let leader = &self.held.frozen.threads[0];
        let gadget = self.gadget;
        let inj = Injector { gadget };
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            if sig == libc::SIGKILL {
                // No handler to reset (rt_sigaction would refuse): kill it outright.
                self.held.frozen.kill();
                return Ok(());
            }
            // Any failure below kills the shadow rather than letting it run: its own
            // code is gone (a thaw would end it by SIGSEGV, a lie to its parent).
            let prepared = (|| -> Result<(), HandoffError> {
                // gadget+8 holds a zeroed struct sigaction: SIG_DFL.
                inj.ok(
                    leader,
                    libc::SYS_rt_sigaction,
                    &[sig as u64, gadget + 8, 0, 8],
                    || format!("rt_sigaction({sig}, SIG_DFL)"),
                )?;
                let own = inj.ok(leader, libc::SYS_getpid, &[], || "getpid".into())?;
                inj.ok(leader, libc::SYS_kill, &[own as u64, sig as u64], || {
                    format!("kill(self, {sig})")
                })?;
                // If the signal somehow does not kill it, it exits 128+sig from the gadget.
                let mut r = leader.regs()?;
                r.rip = gadget;
                r.rax = libc::SYS_exit_group as u64;
                r.rdi = 128 + sig as u64;
                r.orig_rax = u64::MAX;
                leader.set_regs(&r)?;
                leader.set_sigmask(!(1u64 << (sig - 1)))?;
                // The other threads wait in pause() at the gadget (their own code is gone)
                // until the signal takes the whole process.
                for t in &self.held.frozen.threads[1..] {
                    let mut r = t.regs()?;
                    r.rip = gadget;
                    r.rax = libc::SYS_pause as u64;
                    r.orig_rax = u64::MAX;
                    t.set_regs(&r)?;
                }
                Ok(())
            })();
            match prepared {
                Ok(()) => {
                    self.held.frozen.thaw();
                    Ok(())
                }
                Err(e) => {
                    self.held.frozen.kill();
                    Err(e)
                }
            }
        } else {
            let code = libc::WEXITSTATUS(status);
            match inj.call(leader, libc::SYS_exit_group, &[code as u64]) {
                Ok(_) => {
                    self.held.frozen.kill();
                    Err(HandoffError::Other {
                        pid,
                        what: "exit_group returned".into(),
                    })
                }
                // The process is gone: that is what we asked for.
                Err(InjectError::Ptrace {
                    source: FreezeError::Gone { .. },
                    ..
                }) => {
                    self.held.frozen.kill();
                    Ok(())
                }
                Err(e) => {
                    // Never thaw a shadow whose code is gone.
                    self.held.frozen.kill();
                    Err(e.into())
                }
            }
        }
    }
}

/// The start of an executable area of `pid` (where injected syscalls run from).
fn exec_area(pid: i32) -> Result<u64, HandoffError> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| HandoffError::Other {
            pid,
            what: format!("reading /proc/{pid}/smaps: {e}"),
        })?;
    let areas = parse_smaps(&text).map_err(|e| HandoffError::Other {
        pid,
        what: e.to_string(),
    })?;
    areas
        .iter()
        .find(|a| a.prot & libc::PROT_EXEC != 0 && a.name != "[vsyscall]")
        .map(|a| a.start)
        .ok_or_else(|| HandoffError::Other {
            pid,
            what: "no executable area to run the exit from".into(),
        })
}

/// The word at `addr` with its first bytes replaced by the gadget.
fn gadget_word(tid: i32, addr: u64) -> Result<u64, HandoffError> {
    let orig = sys::ptrace_peekdata(tid, addr).map_err(|e| HandoffError::Other {
        pid: tid,
        what: format!("reading {addr:#x}: {e}"),
    })?;
    let mut w = orig.to_ne_bytes();
    w[..GADGET.len()].copy_from_slice(&GADGET);
    Ok(u64::from_ne_bytes(w))
}

/// What going home (restore into the shadow, `restore::into`) needs of the shadow.
impl Shadow {
    /// The address of the shadow's `syscall; int3` gadget.
    pub fn gadget(&self) -> u64 {
        self.gadget
    }

    /// The shadow's leader thread (in a ptrace-stop under us).
    pub fn leader(&self) -> &super::freeze::Stopped {
        &self.held.frozen.threads[0]
    }

    /// Ends every thread but the leader (an injected `exit`; their tids become free
    /// again), threads created inside the shadow since it was frozen included. The
    /// shadow stays a working shadow: signals and its end only need the leader.
    pub fn end_other_threads(&mut self) -> Result<(), HandoffError> {
        let pid = self.held.pid();
        let inj = Injector {
            gadget: self.gadget,
        };
        let tids = super::freeze::list_tids(pid)?;
        for tid in tids.into_iter().filter(|&t| t != pid) {
            let t = super::freeze::Stopped { tid };
            match inj.call(&t, libc::SYS_exit, &[0]) {
                Err(InjectError::Ptrace {
                    source: FreezeError::Gone { .. },
                    ..
                }) => {}
                Ok(_) => {
                    return Err(HandoffError::Other {
                        pid,
                        what: format!("exit returned in tid {tid}"),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.held.frozen.threads.truncate(1);
        Ok(())
    }

    /// Makes the process a shadow again after a restore into it was given up (it may
    /// hold any memory and threads by then): a gadget in its first executable area,
    /// only the leader left, every signal blocked, its memory released.
    pub fn reshadow(&mut self) -> Result<(), HandoffError> {
        let pid = self.held.pid();
        let gadget = exec_area(pid)?;
        let leader = self.held.frozen.threads[0].tid;
        let poke = |addr: u64, word: u64| {
            sys::ptrace_pokedata(leader, addr, word).map_err(|e| HandoffError::Other {
                pid,
                what: format!("writing the shadow's gadget at {addr:#x}: {e}"),
            })
        };
        poke(gadget, gadget_word(leader, gadget)?)?;
        for i in 0..6 {
            poke(gadget + 8 + 8 * i, 0)?;
        }
        self.gadget = gadget;
        self.end_other_threads()?;
        self.held.frozen.threads[0].set_sigmask(!0)?;
        self.release_memory()
    }

    /// Lets the process run (it was restored into; its other threads are the
    /// caller's to detach first).
    pub fn let_go(self) {
        self.held.thaw();
    }
}

#[cfg(test)]
mod tests {
    use super::{hand_over, HANDOVER_MAX};
    use crate::engine::image::MANIFEST_FILE;

    #[test]
    fn a_manifest_too_large_to_hand_over_is_written_at_once_and_a_small_one_later() {
        let dir = tempfile::tempdir().unwrap();
        let small = vec![b's'; 1000];
        assert_eq!(hand_over(dir.path(), small.clone()).unwrap(), Some(small));
        assert!(
            !dir.path().join(MANIFEST_FILE).exists(),
            "a manifest handed over is written later, off the freeze"
        );
        let large = vec![b'l'; HANDOVER_MAX + 1];
        assert_eq!(hand_over(dir.path(), large.clone()).unwrap(), None);
        assert_eq!(
            std::fs::read(dir.path().join(MANIFEST_FILE)).unwrap(),
            large,
            "one too large for the RPC is in the store before the restore reads it"
        );
    }
}

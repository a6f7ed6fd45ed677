//! The `migd` command line: argument types (clap derive) and the functions the thin
//! `main` calls.

use crate::engine::dump::{dump, DumpOptions};
use crate::engine::restore::lazy::{LazyOptions, Pager, Progress};
use crate::engine::restore::{restore_inheriting, restore_lazy, RestoreOptions, RestoreReport};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "migd",
    about = "Ferry migration daemon and checkpoint/restore engine"
)]
pub struct Cli {
    /// Node config file (daemon mode).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Freeze a process and write its image; then kill it (default) or let it go on.
    Dump {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        images: PathBuf,
        /// Let the process run on unchanged after the dump.
        #[arg(long)]
        leave_running: bool,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// Pre-copy: write the pages in rounds while the process runs (each round
        /// only those written since the previous one), then freeze briefly for the
        /// rest. Prints one line per round.
        #[arg(long)]
        precopy: bool,
        /// With --precopy: at most this many rounds before the freeze.
        #[arg(long, default_value_t = 10, requires = "precopy")]
        precopy_rounds: u32,
        /// With --precopy: freeze once a round wrote at most this many bytes.
        #[arg(long, default_value_t = 4 << 20, requires = "precopy")]
        precopy_stop_below: u64,
        /// With --precopy: when rounds stop shrinking, hold the process frozen up
        /// to this share of the time, in percent (0: never).
        #[arg(long, default_value_t = 0, requires = "precopy")]
        precopy_throttle: u32,
    },
    /// Rebuild a process from an image and let it run.
    Restore {
        #[arg(long)]
        images: PathBuf,
        /// Do not wait for the process; exit once it runs.
        #[arg(long)]
        detach: bool,
        /// Hand a resource outside the image to the restored process: `FD:KEY`,
        /// where FD is one of our fds and KEY names the resource as the dump saw it
        /// (e.g. `0:pipe:[12345]`: our stdin replaces that pipe). Repeatable.
        #[arg(long = "inherit-fd", value_parser = parse_inherit)]
        inherit_fd: Vec<(i32, String)>,
        /// Print the summary as one JSON object (when the process runs).
        #[arg(long)]
        json: bool,
        /// Let the process run at once and fault its private anonymous pages in
        /// from pages.img (with read-ahead and background prefetch) while this
        /// command serves them; with --detach, exit once every page is in.
        #[arg(long)]
        lazy: bool,
        /// With --lazy: seconds to keep retrying a failing pages.img read before
        /// killing the process and reporting the loss.
        #[arg(long, default_value_t = 60, requires = "lazy")]
        store_bound: u64,
        /// With --lazy: start the background prefetch this many ms after the process
        /// runs (tests use it so that the process meets missing pages).
        #[arg(long, default_value_t = 0, hide = true, requires = "lazy")]
        prefetch_delay_ms: u64,
        /// With --lazy: no background prefetch; pages come in only on faults.
        #[arg(long, hide = true, requires = "lazy")]
        no_prefetch: bool,
        /// With --lazy: bytes filled per fault (read-ahead).
        #[arg(long, default_value_t = 1 << 20, hide = true, requires = "lazy")]
        readahead: u64,
        /// With --lazy: cap on the background prefetch, MiB/s (0: none); faults
        /// are served at once whatever the cap.
        #[arg(long, default_value_t = 0, requires = "lazy")]
        prefetch_mib_per_sec: u64,
        /// With --lazy: the eager pages as a source hands them over with `restore`
        /// (an encoded `image::EagerPages`); the runs it holds are not read from
        /// pages.img.
        #[arg(long, hide = true, requires = "lazy")]
        eager: Option<PathBuf>,
        /// With --lazy: read pages.img's whole chunks in its first N MiB into memory
        /// before the restore, as a migration's destination does during pre-copy
        /// (docs/lazy.md "Warm pages"); the pager takes them from there.
        #[arg(long, default_value_t = 0, hide = true, requires = "lazy")]
        warm_mib: u64,
    },
    /// Serve the missing pages of a lazily restored process again, after the
    /// `migd restore --lazy` serving it died: the userfaultfd is taken back from the
    /// process's pid-namespace stub.
    #[command(hide = true)]
    InternalLazyResume {
        /// The stub's pid (`init stub` in `migd restore`'s first line).
        #[arg(long)]
        stub: i32,
        /// The stub's fd number of the userfaultfd (`uffd_stub_fd`).
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        images: PathBuf,
        #[arg(long, default_value_t = 60)]
        store_bound: u64,
    },
}

/// `migd restore --lazy` settings (see [`Cmd::Restore`]).
#[derive(Debug, Clone)]
pub struct LazyArgs {
    pub store_bound: u64,
    pub prefetch_delay_ms: u64,
    pub no_prefetch: bool,
    pub readahead: u64,
    pub prefetch_mib_per_sec: u64,
    /// See `--eager`.
    pub eager: Option<PathBuf>,
    /// See `--warm-mib`.
    pub warm_mib: u64,
}

impl LazyArgs {
    pub fn options(&self) -> LazyOptions {
        LazyOptions {
            store_bound: std::time::Duration::from_secs(self.store_bound),
            prefetch: !self.no_prefetch,
            prefetch_delay: std::time::Duration::from_millis(self.prefetch_delay_ms),
            readahead: self.readahead,
            prefetch_rate: self.prefetch_mib_per_sec << 20,
            ..LazyOptions::default()
        }
    }
}

/// Runs `migd dump`; prints one summary line.
pub fn run_dump(pid: i32, images: PathBuf, leave_running: bool) -> anyhow::Result<()> {
    run_dump_opts(pid, images, leave_running, false)
}

/// Runs `migd dump`; prints one summary line (or one JSON object with `json`).
pub fn run_dump_opts(
    pid: i32,
    images: PathBuf,
    leave_running: bool,
    json: bool,
) -> anyhow::Result<()> {
    let r = dump(&DumpOptions {
        pid,
        images: images.clone(),
        leave_running,
    })?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "dumped pid {}: {} threads, {} areas, {} fds, {} bytes of pages, frozen {:.1} ms; process {}",
        r.pid,
        r.threads,
        r.areas,
        r.fds,
        r.page_bytes,
        r.frozen_ms,
        if r.left_running { "left running" } else { "killed" }
    );
    Ok(())
}

/// Runs `migd dump --precopy`: one line per round and one for the freeze, then the
/// summary (with `json`, only one JSON object holding the rounds).
pub fn run_dump_precopy(
    pid: i32,
    images: PathBuf,
    leave_running: bool,
    json: bool,
    opts: &crate::engine::track::PrecopyOptions,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut rounds = Vec::new();
    let mut held = crate::engine::handoff::dump_frozen_precopy(pid, &images, opts, None, |r| {
        if !json {
            if r.frozen {
                println!(
                    "precopy freeze: {} pages ({} bytes) written, {} pages kept from earlier rounds, {} areas saved in full, frozen {:.1} ms",
                    r.pages, r.bytes, r.reused_pages, r.untracked_areas, r.ms
                );
            } else {
                let held = match r.throttle_percent {
                    0 => String::new(),
                    p => format!(", held frozen {p}% of the time"),
                };
                println!(
                    "precopy round {}: {} pages ({} bytes) written in {:.1} ms, process running{held}",
                    r.round, r.pages, r.bytes, r.ms
                );
            }
            let _ = std::io::stdout().flush();
        }
        rounds.push(r.clone());
    })?;
    let (page_bytes, frozen_ms) = (held.page_bytes, held.dump_ms);
    // The manifest written and the flags the dump took before the freeze
    // confirmed; else the image is not to be trusted: say so, the process runs on.
    if let Err(e) = held.checked() {
        held.thaw();
        return Err(e.into());
    }
    if leave_running {
        held.thaw();
    } else {
        held.kill();
    }
    if json {
        let v = serde_json::json!({
            "pid": pid,
            "rounds": rounds,
            "page_bytes": page_bytes,
            "frozen_ms": frozen_ms,
            "left_running": leave_running,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "dumped pid {pid} with pre-copy ({} rounds): {page_bytes} bytes in pages.img, frozen {frozen_ms:.1} ms; process {}",
        rounds.len().saturating_sub(1),
        if leave_running { "left running" } else { "killed" }
    );
    Ok(())
}

/// Runs `migd restore`. Returns the exit code to use (or dies of the process's signal).
fn parse_inherit(s: &str) -> Result<(i32, String), String> {
    let (fd, key) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected FD:KEY, e.g. 0:pipe:[123]"))?;
    let fd = fd
        .parse()
        .map_err(|_| format!("{s:?}: {fd:?} is not an fd number"))?;
    Ok((fd, key.to_string()))
}

/// Runs `migd restore`. Returns the exit code to use (or dies of the process's signal).
pub fn run_restore_inheriting(
    images: PathBuf,
    detach: bool,
    inherit: &[(i32, String)],
) -> anyhow::Result<i32> {
    run_restore_with(images, detach, inherit, false)
}

pub fn run_restore(images: PathBuf, detach: bool) -> anyhow::Result<i32> {
    run_restore_with(images, detach, &[], false)
}

/// Runs `migd restore` with every option; `json` prints the summary as JSON.
pub fn run_restore_full(
    images: PathBuf,
    detach: bool,
    inherit: &[(i32, String)],
    json: bool,
) -> anyhow::Result<i32> {
    run_restore_with(images, detach, inherit, json)
}

fn run_restore_with(
    images: PathBuf,
    detach: bool,
    inherit: &[(i32, String)],
    json: bool,
) -> anyhow::Result<i32> {
    let (_, status) = restore_inheriting(
        &RestoreOptions {
            images,
            detach,
            manifest: None,
            eager: None,
            warm: Default::default(),
            relay_pipes: false,
            refill_relayed_input: false,
        },
        inherit,
        |r| {
            if !detach {
                // While we wait, signals meant for the process go to it.
                crate::sys::forward_signals_to(r.outer_pid);
            }
            say_restored(r, json);
        },
    )?;
    exit_code(status)
}

fn say_restored(r: &RestoreReport, json: bool) {
    use std::io::Write;
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
    } else {
        let lazy = match (r.lazy_bytes, r.uffd_stub_fd) {
            (Some(b), Some(fd)) => format!("; lazy: {b} bytes to fault in, uffd {fd} in the stub"),
            _ => String::new(),
        };
        println!(
            "restored pid {} (pid {} here, init stub {}): {} threads, {} areas, {} fds, {} bytes of pages, {:.1} ms{lazy}",
            r.pid, r.outer_pid, r.stub_pid, r.threads, r.areas, r.fds, r.page_bytes, r.restore_ms
        );
    }
    let _ = std::io::stdout().flush();
}

/// The line printed when every page of a lazy restore is in.
fn say_all_in(p: &Progress, total: u64, secs: f64, json: bool) {
    use std::io::Write;
    if json {
        println!("{}", serde_json::to_string(p).unwrap_or_default());
    } else {
        println!(
            "all pages in: {total} bytes in {:.1} ms ({:.0} MB/s); {} bytes by {} faults, {} bytes prefetched, {} zero pages, {} bytes read before the restore",
            secs * 1e3,
            total as f64 / secs.max(1e-9) / 1e6,
            p.faulted_bytes,
            p.faults,
            p.prefetched_bytes,
            p.zero_pages,
            p.warm_bytes
        );
    }
    let _ = std::io::stdout().flush();
}

/// Runs `migd restore --lazy`: restores, serves the pages until all are in (saying
/// so) while waiting for the process, and ends as it ends. With `detach`, returns
/// once every page is in.
pub fn run_restore_lazy(
    images: PathBuf,
    detach: bool,
    inherit: &[(i32, String)],
    json: bool,
    lazy: &LazyArgs,
) -> anyhow::Result<i32> {
    let lr = restore_lazy(
        &RestoreOptions {
            images: images.clone(),
            detach,
            manifest: None,
            eager: match &lazy.eager {
                Some(p) => Some(
                    std::fs::read(p)
                        .map_err(|e| anyhow::anyhow!("reading eager pages {}: {e}", p.display()))?,
                ),
                None => None,
            },
            warm: match lazy.warm_mib {
                0 => Default::default(),
                n => crate::engine::restore::warm::Handed::new(
                    crate::engine::restore::warm::read_now(&images, n << 20)
                        .map_err(|e| anyhow::anyhow!("reading pages.img ahead: {e}"))?,
                ),
            },
            relay_pipes: false,
            refill_relayed_input: false,
        },
        &lazy.options(),
        inherit,
    )?;
    let r = lr.report;
    let mut pager = lr.pager;
    if !detach {
        crate::sys::forward_signals_to(r.outer_pid);
    }
    say_restored(&r, json);
    let total = r.lazy_bytes.unwrap_or(0);
    let mut link = None;
    let status = loop {
        if !pager.done() {
            let mut fds = pager.fds();
            let link_fd = pager.link_mut().map(|l| l.raw_fd());
            fds.extend(link_fd);
            let wait = pager
                .next_timeout()
                .map_or(1000, |d| crate::engine::restore::lazy::poll_ms(d).min(1000));
            let _ = crate::sys::uffd::poll_readable(&fds, wait);
            if let Err(e) = pager.step(std::time::Duration::ZERO) {
                // The process was killed: reap the stub, then report the loss.
                let _ = crate::sys::wait_child(r.stub_pid);
                return Err(e.into());
            }
            if let Some(st) = pager.link_mut().and_then(|l| l.try_status()) {
                break Some(st);
            }
            if pager.done() {
                let secs = pager.finished_after().unwrap_or_default().as_secs_f64();
                say_all_in(pager.progress(), total, secs, json);
                link = pager.take_link();
                if detach {
                    return Ok(0);
                }
            }
        } else {
            break link.as_mut().and_then(|l| l.wait_status());
        }
    };
    let st = crate::sys::wait_child(r.stub_pid).unwrap_or(0);
    if !pager.done() {
        let p = pager.progress();
        eprintln!(
            "the process ended before all pages were in ({} bytes never faulted in)",
            p.remaining_bytes
        );
    }
    exit_code(Some(status.unwrap_or(st)))
}

/// `migd internal-lazy-resume`: serves a lazily restored process again, until every
/// page is in or its stub ends.
pub fn run_lazy_resume(
    stub: i32,
    fd: i32,
    images: PathBuf,
    store_bound: u64,
) -> anyhow::Result<i32> {
    let opts = LazyOptions {
        store_bound: std::time::Duration::from_secs(store_bound),
        ..LazyOptions::default()
    };
    let mut pager = Pager::resume(stub, fd, &images, &opts)?;
    let t0 = std::time::Instant::now();
    let total = pager.progress().remaining_bytes;
    println!("serving pid namespace of stub {stub} again: up to {total} bytes to fill");
    while !pager.done() {
        pager.step(std::time::Duration::from_millis(100))?;
        if crate::sys::kill(stub, 0).is_err() {
            eprintln!("the stub {stub} ended before all pages were in");
            return Ok(1);
        }
    }
    say_all_in(pager.progress(), total, t0.elapsed().as_secs_f64(), false);
    Ok(0)
}

fn exit_code(status: Option<i32>) -> anyhow::Result<i32> {
    match status {
        None => Ok(0),
        Some(st) if libc::WIFEXITED(st) => Ok(libc::WEXITSTATUS(st)),
        Some(st) if libc::WIFSIGNALED(st) => {
            eprintln!("restored process died of signal {}", libc::WTERMSIG(st));
            crate::sys::die_of_signal(libc::WTERMSIG(st))
        }
        Some(st) => Ok(128 + (st & 0x7f)),
    }
}

/// Daemon mode: serves migrations until SIGTERM.
pub fn run_daemon(config: PathBuf) -> anyhow::Result<()> {
    crate::daemon::run(&config)?;
    Ok(())
}

//! The `migd` command line: argument types (clap derive) and the functions the thin
//! `main` calls.

use crate::engine::dump::{dump, DumpOptions};
use crate::engine::restore::{restore_inheriting, RestoreOptions};
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
    },
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
    let held = crate::engine::handoff::dump_frozen_precopy(pid, &images, opts, |r| {
        if !json {
            if r.frozen {
                println!(
                    "precopy freeze: {} pages ({} bytes) written, {} pages kept from earlier rounds, {} areas saved in full, frozen {:.1} ms",
                    r.pages, r.bytes, r.reused_pages, r.untracked_areas, r.ms
                );
            } else {
                println!(
                    "precopy round {}: {} pages ({} bytes) written in {:.1} ms, process running",
                    r.round, r.pages, r.bytes, r.ms
                );
            }
            let _ = std::io::stdout().flush();
        }
        rounds.push(r.clone());
    })?;
    let (page_bytes, frozen_ms) = (held.page_bytes, held.dump_ms);
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
    use std::io::Write;
    let (_, status) = restore_inheriting(&RestoreOptions { images, detach }, inherit, |r| {
        if !detach {
            // While we wait, signals meant for the process go to it.
            crate::sys::forward_signals_to(r.outer_pid);
        }
        if json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
            let _ = std::io::stdout().flush();
            return;
        }
        println!(
            "restored pid {} (pid {} here, init stub {}): {} threads, {} areas, {} fds, {} bytes of pages, {:.1} ms",
            r.pid, r.outer_pid, r.stub_pid, r.threads, r.areas, r.fds, r.page_bytes, r.restore_ms
        );
        let _ = std::io::stdout().flush();
    })?;
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

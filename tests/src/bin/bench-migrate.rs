//! Benchmark of migration between two nodes of a local cluster, per mode and size.
//!
//! For each RSS (default 64 MiB, 1 GiB, 4 GiB) and each mode, a C program at ws1
//! fills its memory and keeps rewriting 10% of it per second; `migrate PID ws2
//! --mode M` moves it. Printed per run: the freeze time `migrate` reports, the
//! command's total time, the time until the store holds nothing of it any more (lazy
//! modes keep paging in after the command returns), bytes moved, and the slowdown of
//! a full memory scan right after the move against the same scan just before it
//! (pages faulting in from the store; in the lazy modes the scan starts as soon as
//! `migrate` says the process runs at ws2, while the source may still be writing
//! its last pages); then the ratios that matter: freeze at each
//! size against 64 MiB (flat is the aim), and each mode against stop-copy.
//! No pass/fail thresholds: the machines are shared and noisy.
//!
//! Usage: `bench-migrate [--mib 64,1024,4096] [--modes stop-copy,precopy,lazy,default]`
//! (root; `scripts/bench.sh migrate` builds and runs it).

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_tests::work::{compile_c, images_left, spawn_shell, wait_for, wait_up_to, BUSY_C};
use ferry_tests::Cluster;

#[derive(Parser)]
#[command(about = "Measure migration freeze and total time per mode and RSS")]
struct Args {
    /// Resident sizes to measure, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,1024,4096")]
    mib: Vec<u64>,
    /// Modes (`default` is migrate's own default).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "stop-copy,precopy,lazy,default"
    )]
    modes: Vec<String>,
}

struct Run {
    mib: u64,
    mode: String,
    freeze_ms: f64,
    command_ms: f64,
    until_free_ms: f64,
    bytes: u64,
    scan_before_ms: f64,
    scan_after_ms: f64,
}

fn scans(c: &Cluster) -> Vec<f64> {
    let out = c.sh_ok("ws1", "cat /tmp/busy.out");
    out.lines()
        .filter_map(|l| l.strip_prefix("scan "))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

/// How long a scan may take before the row is given up: a scan right after a lazy
/// move waits for pages the source may still be writing (at 4 GiB, tens of seconds
/// on a busy machine), and a slow figure is still a figure.
const SCAN_LIMIT: Duration = Duration::from_secs(300);

/// Sends SIGUSR1 at home and waits for the scan's line.
fn scan(c: &Cluster, pid: i32) -> Result<f64> {
    scan_by(c, "ws1", &format!("kill -USR1 {pid}"))
}

/// Has `signal` (a shell command at `node`) send the scan's SIGUSR1 and waits for
/// its line.
fn scan_by(c: &Cluster, node: &str, signal: &str) -> Result<f64> {
    let before = scans(c).len();
    c.sh_ok(node, signal);
    wait_up_to(SCAN_LIMIT, || scans(c).get(before).copied()).with_context(|| {
        format!(
            "the program did not report its scan within {} s",
            SCAN_LIMIT.as_secs()
        )
    })
}

/// "… B bytes moved, frozen X ms" → (B, X).
fn parse_final(line: &str) -> Option<(u64, f64)> {
    let bytes = line
        .split(" bytes moved")
        .next()?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()?;
    let frozen = line
        .split("frozen ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((bytes, frozen))
}

fn one(c: &Cluster, busy: &str, mib: u64, mode: &str) -> Result<Run> {
    // The last run's "ready" must not pass for this one's: a 4 GiB program still
    // filling its memory had no SIGUSR1 handler yet and died of the scan's signal
    // (the "did not report its scan" rows of earlier runs).
    c.sh_ok("ws1", "rm -f /tmp/busy.out");
    let mut child = spawn_shell(c, "ws1", &format!("{busy} /tmp/busy.out {mib}"));
    match measure(c, mib, mode) {
        Ok((run, pid)) => {
            c.sh_ok("ws1", &format!("kill -TERM {pid}"));
            let shell = ferry_tests::work::finish_shell(c, child);
            let end = c.sh_ok("ws1", "tail -n1 /tmp/busy.out");
            if end.trim() != "ok" || shell != "status=0" {
                bail!("the moved program's memory check said {end:?} (shell: {shell})");
            }
            Ok(run)
        }
        Err(e) => {
            let _ = c.sh("ws1", "pkill -KILL -x busy");
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Measures one migration of the running `busy`; returns the figures and its pid.
fn measure(c: &Cluster, mib: u64, mode: &str) -> Result<(Run, i32)> {
    let pid: i32 = wait_for(|| {
        let o = c.sh("ws1", "grep -q ready /tmp/busy.out && pgrep -xn busy");
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    })
    .context("busy did not start")?;
    std::thread::sleep(Duration::from_millis(1500));
    let scan_before_ms = scan(c, pid)?;
    let mut args = vec!["migrate".to_string(), pid.to_string(), "ws2".to_string()];
    if mode != "default" {
        args.extend(["--mode".to_string(), mode.to_string()]);
    }
    let t = Instant::now();
    let mut child = c
        .command("ws1", &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start migrate")?;
    // In the lazy modes the process runs at ws2 while its last pages are still
    // being written, and `migrate` waits for that: the scan goes as soon as it says
    // so ("running there; ..."), else once it ends.
    let (runs_tx, runs_rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    let errs = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if line.contains("running there;") {
                let _ = runs_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let early_scan = match runs_rx.recv() {
        // Signalled there: at home the original becomes the shadow, which forwards
        // signals, only once the source has written every page.
        Ok(()) => Some(scan_by(c, "ws2", "pkill -USR1 -xn busy")?),
        Err(_) => None, // it ended without saying so
    };
    let out = child.wait_with_output().context("waiting for migrate")?;
    let command_ms = t.elapsed().as_secs_f64() * 1e3;
    let stderr = errs.join().unwrap_or_default();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!("migrate --mode {mode} failed: {stderr}");
    }
    let scan_after_ms = match early_scan {
        Some(ms) => ms,
        None => scan(c, pid)?,
    };
    wait_for(|| images_left(c).is_empty().then_some(()))
        .context("the image stayed in the store")?;
    let until_free_ms = t.elapsed().as_secs_f64() * 1e3;
    let (bytes, freeze_ms) =
        parse_final(said.trim()).with_context(|| format!("migrate said {said:?}"))?;
    let run = Run {
        mib,
        mode: mode.to_string(),
        freeze_ms,
        command_ms,
        until_free_ms,
        bytes,
        scan_before_ms,
        scan_after_ms,
    };
    Ok((run, pid))
}

fn main() -> Result<()> {
    common::logging::init("bench-migrate");
    let args = Args::parse();
    let c = Cluster::start(2);
    c.require(&["fs-server", "fuse-client", "migd", "home-proxy"]);
    let bin = c.dir().join("busy");
    compile_c(BUSY_C, &bin, &[]);
    let busy = bin.display().to_string();
    let mut runs = Vec::new();
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>11} {:>10} {:>9} {:>9} {:>8}",
        "MiB",
        "mode",
        "freeze ms",
        "cmd ms",
        "store ms",
        "MB moved",
        "scan ms",
        "after ms",
        "slowdown"
    );
    for &mib in &args.mib {
        for mode in &args.modes {
            match one(&c, &busy, mib, mode) {
                Ok(r) => {
                    println!(
                        "{:>6} {:>10} {:>10.1} {:>10.0} {:>11.0} {:>10.1} {:>9.1} {:>9.1} {:>7.2}x",
                        r.mib,
                        r.mode,
                        r.freeze_ms,
                        r.command_ms,
                        r.until_free_ms,
                        r.bytes as f64 / 1e6,
                        r.scan_before_ms,
                        r.scan_after_ms,
                        r.scan_after_ms / r.scan_before_ms.max(0.001)
                    );
                    runs.push(r);
                }
                Err(e) => println!("{mib:>6} {mode:>10} failed: {e:#}"),
            }
        }
    }
    println!();
    println!("freeze against the same mode at the smallest size (flat = 1.0):");
    let smallest = args.mib.iter().copied().min().unwrap_or(64);
    for r in &runs {
        if let Some(base) = runs.iter().find(|b| b.mib == smallest && b.mode == r.mode) {
            if r.mib != smallest {
                println!(
                    "  {:>10} {:>5} MiB: {:.2}x",
                    r.mode,
                    r.mib,
                    r.freeze_ms / base.freeze_ms.max(0.001)
                );
            }
        }
    }
    println!("freeze against stop-copy at the same size:");
    for r in runs.iter().filter(|r| r.mode != "stop-copy") {
        if let Some(base) = runs
            .iter()
            .find(|b| b.mib == r.mib && b.mode == "stop-copy")
        {
            println!(
                "  {:>10} {:>5} MiB: {:.3}x",
                r.mode,
                r.mib,
                r.freeze_ms / base.freeze_ms.max(0.001)
            );
        }
    }
    println!("memory scan right after the move, every page touched (lazy modes: pages fault in):");
    for r in &runs {
        println!(
            "  {:>10} {:>5} MiB: {:.2} GB/s",
            r.mode,
            r.mib,
            (r.mib << 20) as f64 / (r.scan_after_ms.max(0.001) * 1e6)
        );
    }
    c.down().context("cluster down")?;
    Ok(())
}

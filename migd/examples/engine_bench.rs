//! Dump/restore timing against RSS, and dump bandwidth as a fraction of writing the
//! same bytes from memory to the same disk (write + fsync), measured in one run.
//!
//! Then the freeze of a stop-copy dump against a pre-copy dump (`engine::track`) of
//! the same process while it writes about 10% of its memory a second.
//!
//! `cargo run -p migd --example engine_bench [-- SIZES_MIB...]` (as root; default
//! sizes 64 512 2048). Restore runs the `migd` binary next to this example's
//! directory, so build it first (`cargo build -p migd`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const PROG: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) << 20;
    uint64_t *p = malloc(n);
    for (size_t i = 0; i < n / 8; i++) p[i] = i * 0x9E3779B97F4A7C15ull;
    printf("filled\n"); fflush(stdout);
    for (;;) pause();
}
"#;

/// Fills `argv[1]` MiB, then writes random pages, about 10% of them a second.
const WRITER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) << 20, np = n / 4096;
    uint64_t *p = malloc(n);
    for (size_t i = 0; i < n / 8; i++) p[i] = i * 0x9E3779B97F4A7C15ull;
    printf("filled\n"); fflush(stdout);
    size_t per_tick = np / 1000 ? np / 1000 : 1;
    uint64_t x = 88172645463325252ull;
    for (;;) {
        for (size_t k = 0; k < per_tick; k++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            p[(x % np) * 512 + (x >> 55)] += x;
        }
        usleep(10000);
    }
}
"#;

fn migd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("migd"))
        .expect("target dir")
}

fn baseline_write(dir: &Path, bytes: usize) -> f64 {
    let buf: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let path = dir.join("baseline.bin");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
    let s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    s
}

fn main() -> anyhow::Result<()> {
    common::logging::init("engine_bench");
    let sizes: Vec<u64> = {
        let a: Vec<u64> = std::env::args()
            .skip(1)
            .filter_map(|s| s.parse().ok())
            .collect();
        if a.is_empty() {
            vec![64, 512, 2048]
        } else {
            a
        }
    };
    let dir = std::env::temp_dir().join(format!("engine-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("big.c"), PROG)?;
    let st = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(dir.join("big"))
        .arg(dir.join("big.c"))
        .status()?;
    anyhow::ensure!(st.success(), "cc failed");
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "RSS MiB", "dump ms", "frozen ms", "restore ms", "image MiB", "baseline ms", "dump/base"
    );
    for &mib in &sizes {
        let mut child = Command::new(dir.join("big"))
            .arg(mib.to_string())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line)?;
        let images = dir.join(format!("img{mib}"));
        let t = Instant::now();
        let r = migd::engine::dump::dump(&migd::engine::dump::DumpOptions {
            pid: child.id() as i32,
            images: images.clone(),
            leave_running: false,
        })?;
        let dump_s = t.elapsed().as_secs_f64();
        let _ = child.wait();
        let base_s = baseline_write(&dir, r.page_bytes as usize);
        let out = Command::new(migd_bin())
            .args(["restore", "--detach", "--images"])
            .arg(&images)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let restore_ms: f64 = text
            .rsplit(", ")
            .next()
            .and_then(|s| s.trim().trim_end_matches(" ms").parse().ok())
            .unwrap_or(f64::NAN);
        if let Some(pid) = text
            .split("(pid ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse::<i32>().ok())
        {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        println!(
            "{:>8} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>10.2}",
            mib,
            dump_s * 1e3,
            r.frozen_ms,
            restore_ms,
            r.page_bytes as f64 / (1 << 20) as f64,
            base_s * 1e3,
            base_s / dump_s
        );
        let _ = std::fs::remove_dir_all(&images);
    }
    precopy_vs_stop_copy(&dir, &sizes)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Freeze time of a stop-copy dump and of a pre-copy dump of the same process, which
/// writes about 10% of its memory a second.
fn precopy_vs_stop_copy(dir: &Path, sizes: &[u64]) -> anyhow::Result<()> {
    std::fs::write(dir.join("writer.c"), WRITER)?;
    let st = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(dir.join("writer"))
        .arg(dir.join("writer.c"))
        .status()?;
    anyhow::ensure!(st.success(), "cc failed");
    println!();
    println!("process writing ~10% of its memory a second: freeze of stop-copy vs pre-copy");
    println!(
        "{:>8} {:>14} {:>14} {:>8} {:>7} {:>12} {:>12}",
        "RSS MiB", "stop-copy ms", "pre-copy ms", "ratio", "rounds", "round1 MiB", "freeze MiB"
    );
    for &mib in sizes {
        let mut child = Command::new(dir.join("writer"))
            .arg(mib.to_string())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line)?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        let pid = child.id() as i32;
        let images = dir.join(format!("stop{mib}"));
        let stop = migd::engine::dump::dump(&migd::engine::dump::DumpOptions {
            pid,
            images: images.clone(),
            leave_running: true,
        })?;
        let _ = std::fs::remove_dir_all(&images);
        std::thread::sleep(std::time::Duration::from_millis(500));
        let images = dir.join(format!("pre{mib}"));
        let mut rounds = Vec::new();
        let held = migd::engine::handoff::dump_frozen_precopy(
            pid,
            &images,
            &migd::engine::track::PrecopyOptions::default(),
            None,
            |r| rounds.push(r.clone()),
        )?;
        held.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&images);
        let fin = rounds.last().cloned().unwrap_or_default();
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        println!(
            "{:>8} {:>14.1} {:>14.1} {:>8.2} {:>7} {:>12.1} {:>12.1}",
            mib,
            stop.frozen_ms,
            fin.ms,
            fin.ms / stop.frozen_ms,
            rounds.len().saturating_sub(1),
            mb(rounds.first().map(|r| r.bytes).unwrap_or(0)),
            mb(fin.bytes)
        );
    }
    Ok(())
}

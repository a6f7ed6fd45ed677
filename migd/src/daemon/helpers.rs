//! The two helper processes migd starts for each migration (as `migrate internal-keep`
//! and `migrate internal-restore`). Each is single-threaded, as ptrace, setns and the
//! engine's restore need, and speaks one line at a time on stdin/stdout with migd.
//!
//! keeper (source side), lines out: `dumped <bytes> <ms>` | `error <why>`, later
//! `signal <n>` (a signal sent to the shadow) | `gone <status>` (the shadow was killed
//! at home); lines in: `commit-shadow` | `commit-kill` | `abort` | `exit <status>`.
//! End of input before commit thaws the process where it was.
//!
//! restorer (destination side), lines out: `running <pid> <ms>` | `error <why>`, then
//! `exit <status>` when the process ends.

use super::sys;
use crate::engine::handoff::{dump_frozen, Held, Shadow};
use crate::engine::restore::{restore, RestoreOptions};
use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().replace('\n', "; ")
}

/// Lines from stdin, read on a thread of their own (`None` at end of input).
fn stdin_lines() -> mpsc::Receiver<Option<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    rx
}

/// `migrate internal-keep`: dumps `pid` into `images`, keeps it frozen, and ends it
/// as migd says. With `enter`, the dump runs in the process's own mount namespace and
/// root (a foreign process moving on), so that paths are recorded as it sees them.
pub fn keeper_main(pid: i32, images: &Path, enter: bool) -> i32 {
    let images = if enter {
        match sys::enter_root_of(pid, images) {
            Ok(p) => p,
            Err(e) => {
                say(&format!("error {}", one_line(e)));
                return 1;
            }
        }
    } else {
        images.to_path_buf()
    };
    // Lines are read on another thread; ptrace stays on this one.
    let rx = stdin_lines();
    let held = match dump_frozen(pid, &images) {
        Ok(h) => h,
        Err(e) => {
            say(&format!("error {}", one_line(e)));
            return 1;
        }
    };
    say(&format!("dumped {} {:.3}", held.page_bytes, held.dump_ms));
    let first = rx.recv().ok().flatten();
    match first.as_deref().map(str::trim) {
        Some("commit-kill") => {
            held.kill();
            0
        }
        Some("commit-shadow") => shadow_loop(held, &rx, None),
        Some(l) if l.starts_with("exit ") => shadow_loop(held, &rx, Some(l.to_string())),
        _ => {
            held.thaw();
            0
        }
    }
}

fn shadow_loop(held: Held, rx: &mpsc::Receiver<Option<String>>, first: Option<String>) -> i32 {
    let pid = held.pid();
    let shadow: Shadow = match held.into_shadow() {
        Ok(s) => s,
        Err(e) => {
            say(&format!("error {}", one_line(e)));
            // Never let the original run on: a copy runs elsewhere.
            let _ = crate::sys::kill(pid, libc::SIGKILL);
            return 1;
        }
    };
    let mut next = first;
    // A SIGSTOP stays queued until a SIGCONT removes it: forward it once.
    let mut stop_sent = false;
    loop {
        if let Some(line) = next.take() {
            if let Some(st) = line.trim().strip_prefix("exit ") {
                let status: i32 = st.trim().parse().unwrap_or(0);
                return match shadow.end_like(status) {
                    Ok(()) => 0,
                    Err(e) => {
                        say(&format!("error {}", one_line(e)));
                        let _ = crate::sys::kill(pid, libc::SIGKILL);
                        1
                    }
                };
            }
        }
        if let Some(status) = sys::exited(pid) {
            say(&format!("gone {status}"));
            return 0;
        }
        match (shadow.stop_pending(), stop_sent) {
            (true, false) => {
                say(&format!("signal {}", libc::SIGSTOP));
                stop_sent = true;
            }
            (false, true) => stop_sent = false,
            _ => {}
        }
        match shadow.take_signals() {
            Ok(sigs) => sigs.iter().for_each(|s| say(&format!("signal {s}"))),
            Err(e) => tracing::warn!(pid, error = %e, "taking the shadow's signals"),
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Some(l)) => next = Some(l),
            // migd is gone: keep the shadow as it is (it must not run on).
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

/// `migrate internal-restore`: builds the home's file view in a new mount namespace
/// (`/` from `/.../<home>/`, the host's /proc, /dev, /sys) at `stage`, enters it, and
/// restores the image there; waits for the process and reports its end.
pub fn restorer_main(images: &Path, home: &str, superroot: &Path, stage: &Path) -> i32 {
    let images_fd = match std::fs::File::open(images) {
        Ok(f) => f,
        Err(e) => {
            say(&format!(
                "error cannot open image {}: {e}",
                images.display()
            ));
            return 1;
        }
    };
    if let Err(e) = sys::enter_home_view(&superroot.join(home), stage) {
        say(&format!("error {}", one_line(e)));
        return 1;
    }
    let images = PathBuf::from(format!("/proc/self/fd/{}", images_fd.as_raw_fd()));
    let opts = RestoreOptions {
        images,
        detach: false,
    };
    match restore(&opts, |r| {
        say(&format!("running {} {:.3}", r.outer_pid, r.restore_ms))
    }) {
        Ok((_, Some(status))) => {
            say(&format!("exit {status}"));
            0
        }
        Ok((_, None)) => 0,
        Err(e) => {
            say(&format!("error {}", one_line(e)));
            1
        }
    }
}

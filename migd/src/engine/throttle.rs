//! Throttling during pre-copy (what QEMU calls auto-converge): a process that writes
//! its memory faster than the store takes its pages never lets the rounds shrink,
//! and a lazy move then leaves nearly all of it to be faulted in after the freeze, at
//! the speed of the source's late writing. Holding the process frozen for a share of
//! every short period lowers its write rate below what the store takes, so that the
//! rounds shrink and the freeze leaves little behind.
//!
//! The hold is a ptrace freeze ([`Frozen`]), as the dump's own: the process sees no
//! signal, its parent no stop, and a system call it was blocked in restarts. The
//! throttling thread is the tracer, so it both freezes and thaws; dropping the
//! [`Throttle`] stops it with the process running.

use super::freeze::Frozen;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One hold and one run make a period this long: short enough that the process
/// keeps answering (pipes, terminals, timers late by at most a hold), long enough
/// that the freeze's own cost (a ptrace seize and interrupt per thread) stays small.
const PERIOD: Duration = Duration::from_millis(20);

/// A process held frozen for a share of each [`PERIOD`] by a thread of its own.
pub struct Throttle {
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Duration>>,
}

impl Throttle {
    /// Starts holding `pid` frozen `percent` of the time.
    pub fn start(pid: i32, percent: u32) -> Throttle {
        let share = Arc::new(AtomicU32::new(percent.min(100)));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (share.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || hold_loop(pid, &s, &st))
            .expect("spawning the throttle thread");
        Throttle {
            percent: share,
            stop,
            thread: Some(thread),
        }
    }

    /// Holds the process `percent` of the time from the next period on.
    pub fn set(&self, percent: u32) {
        self.percent.store(percent.min(100), Ordering::SeqCst);
    }

    /// The share it is held now, in percent.
    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::SeqCst)
    }

    /// Stops throttling (the process runs when this returns); the time it was held.
    pub fn stop(mut self) -> Duration {
        self.join()
    }

    fn join(&mut self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.join();
    }
}

fn hold_loop(pid: i32, percent: &AtomicU32, stop: &AtomicBool) -> Duration {
    let mut held = Duration::ZERO;
    while !stop.load(Ordering::SeqCst) {
        let hold = PERIOD.mul_f64(f64::from(percent.load(Ordering::SeqCst)) / 100.0);
        let t = Instant::now();
        if !hold.is_zero() {
            match Frozen::freeze(pid) {
                Ok(f) => {
                    std::thread::sleep(hold.saturating_sub(t.elapsed()));
                    f.thaw();
                }
                // Gone (the rounds notice), or not ours to hold: stop throttling.
                Err(e) => {
                    tracing::debug!(error = %e, "throttle: cannot hold the process; stopping");
                    break;
                }
            }
            held += t.elapsed();
        }
        std::thread::sleep(PERIOD.saturating_sub(t.elapsed()));
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// The state letter of `pid` in /proc/PID/stat (`t`: stopped by its tracer).
    fn state(pid: i32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .unwrap_or('?')
    }

    /// Share of `n` looks, 2 ms apart, that find `pid` held by its tracer.
    fn held_share(pid: i32, n: usize) -> f64 {
        let held = (0..n)
            .filter(|_| {
                std::thread::sleep(Duration::from_millis(2));
                state(pid) == 't'
            })
            .count();
        held as f64 / n as f64
    }

    /// A busy process is held about the share asked for, runs free once the
    /// throttle stops, and its parent never sees it stop.
    #[test]
    fn a_throttled_process_is_held_its_share_and_runs_free_after() {
        let mut child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .spawn()
            .expect("sh");
        let pid = child.id() as i32;
        assert!(held_share(pid, 50) < 0.05, "held before any throttle");
        let th = Throttle::start(pid, 75);
        let share = held_share(pid, 300);
        assert!(share > 0.4, "held {:.0}% of the time at 75%", share * 100.0);
        th.set(0);
        std::thread::sleep(2 * PERIOD);
        let none = held_share(pid, 50);
        th.set(50);
        let half = held_share(pid, 300);
        let held = th.stop();
        assert!(none < 0.05, "held {:.0}% of the time at 0%", none * 100.0);
        assert!(
            half > 0.2 && half < share,
            "held {:.0}% at 50% vs {:.0}% at 75%",
            half * 100.0,
            share * 100.0
        );
        assert!(held > Duration::from_millis(300), "held only {held:?}");
        assert!(
            held_share(pid, 50) < 0.05,
            "still held after the throttle stopped"
        );
        // The parent saw no stop: waitpid with WUNTRACED reports nothing.
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::WUNTRACED) };
        assert_eq!(r, 0, "the parent saw a state change: status {status:#x}");
        let _ = child.kill();
        let _ = child.wait();
    }
}

//! Phase timings for the freeze of a migration: a step records how long each of its
//! phases took and logs them as one debug line (`RUST_LOG=migd=debug`), e.g.
//! `collect: status+maps 0.2 ms, threads 0.1 ms, ... (total 41.3 ms)`. Grep a node's
//! log for the step's name to see where a freeze's milliseconds went.

use std::time::Instant;

/// The phases of one step, timed one after the other.
pub struct Phases {
    step: &'static str,
    start: Instant,
    last: Instant,
    done: Vec<(&'static str, f64)>,
}

impl Phases {
    /// Starts timing `step` now.
    pub fn new(step: &'static str) -> Phases {
        let now = Instant::now();
        Phases {
            step,
            start: now,
            last: now,
            done: Vec::new(),
        }
    }

    /// Ends the phase `name` (it began at the previous mark, or at the start).
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done
            .push((name, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }

    /// Milliseconds since the start.
    pub fn total_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    /// One line: each phase's milliseconds and the total.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (i, (name, ms)) in self.done.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push_str(&format!("{name} {ms:.1} ms"));
        }
        format!("{s} (total {:.1} ms)", self.total_ms())
    }

    /// Logs the phases at debug level.
    pub fn log(&self) {
        tracing::debug!(step = self.step, "phases: {}", self.summary());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_every_phase_in_order_with_the_total() {
        let mut p = Phases::new("t");
        p.mark("a");
        p.mark("b");
        let s = p.summary();
        assert!(s.starts_with("a "), "{s}");
        assert!(s.contains(", b ") && s.contains("(total "), "{s}");
    }
}

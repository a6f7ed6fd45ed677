//! When the pager tries a failed read again.
//!
//! Two kinds of failure keep a fault waiting: the store failed (an error from
//! pages.img or late.img: retried after a backoff growing from 50 ms to 1 s), or a
//! late chunk is not written by the source yet (retried after 1 ms; the wait for it
//! in `LateReader::wait_ready` paces the tries). Either way the time since the
//! first failure counts against the store bound until a read succeeds.
//!
//! Asking whether a retry is [`due`](Retry::due) changes nothing. The pager's
//! drivers wake it whenever they like (every 100 ms, at a timeout rounded to whole
//! milliseconds, at any event); an early wake-up that counted as a new failure
//! pushed the retry time out by the backoff each time, so with wake-ups more often
//! than the backoff a fault was never tried again and the process was lost at the
//! store bound with the source's pages long written.

use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How soon a late chunk not written yet is asked for again.
const NOT_YET_RETRY: Duration = Duration::from_millis(1);
/// A wait for late pages this long is worth a warning (a normal one takes ms).
const LONG_WAIT: Duration = Duration::from_secs(1);

/// The retry state of one pager.
#[derive(Debug)]
pub(super) struct Retry {
    /// Since when reads fail, and the latest cause.
    stall: Option<(Instant, String)>,
    at: Option<Instant>,
    backoff: Duration,
    said_waiting: bool,
}

impl Retry {
    pub fn new() -> Retry {
        Retry {
            stall: None,
            at: None,
            backoff: FIRST_BACKOFF,
            said_waiting: false,
        }
    }

    /// Whether reads may be tried at `now`: nothing failed, or the retry time came.
    pub fn due(&self, now: Instant) -> bool {
        self.at.is_none_or(|r| now >= r)
    }

    /// When the next retry is due, if one waits.
    pub fn at(&self) -> Option<Instant> {
        self.at
    }

    /// A read failed at `now` (the store): try again after the backoff, which doubles
    /// up to 1 s. Returns true for the first failure of a stall (worth a warning).
    pub fn failed(&mut self, cause: String, now: Instant) -> bool {
        let first = self.stall.is_none();
        match self.stall.as_mut() {
            None => self.stall = Some((now, cause)),
            Some(s) => s.1 = cause,
        }
        self.at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        first
    }

    /// A late chunk was not written yet at `now`: try again soon. Returns true once
    /// per stall when the wait has grown long (worth a warning).
    pub fn not_yet(&mut self, cause: String, now: Instant) -> bool {
        let since = self.stall.get_or_insert_with(|| (now, String::new())).0;
        if let Some(s) = self.stall.as_mut() {
            s.1 = cause;
        }
        self.at = Some(now + NOT_YET_RETRY);
        let warn = now.duration_since(since) > LONG_WAIT && !self.said_waiting;
        self.said_waiting |= warn;
        warn
    }

    /// A read succeeded: the stall (if any) is over. Returns how long it lasted.
    pub fn ok(&mut self, now: Instant) -> Option<Duration> {
        self.at = None;
        self.backoff = FIRST_BACKOFF;
        self.said_waiting = false;
        self.stall
            .take()
            .map(|(since, _)| now.duration_since(since))
    }

    /// How long reads have failed at `now`, and the latest cause.
    pub fn stalled(&self, now: Instant) -> Option<(Duration, &str)> {
        self.stall
            .as_ref()
            .map(|(since, cause)| (now.duration_since(*since), cause.as_str()))
    }
}

/// A poll(2) timeout in milliseconds for `d`, rounded up: a wake-up before the time
/// asked for only costs a turn of the loop, but rounding down would spin.
pub fn poll_ms(d: Duration) -> i32 {
    d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn asking_before_the_retry_time_changes_nothing() {
        let t0 = Instant::now();
        let mut r = Retry::new();
        assert!(r.due(t0));
        assert!(r.failed("store away".into(), t0));
        let at = r.at().unwrap();
        assert_eq!(at, t0 + FIRST_BACKOFF);
        for k in 0..1000 {
            assert!(!r.due(t0 + k * MS / 100));
        }
        assert_eq!(r.at(), Some(at), "asking moved the retry time");
        assert!(r.due(at));
    }

    /// A driver waking every 100 ms (as `internal-lazy-resume` does) while the
    /// store fails for 5 s: once it is back, the fault is tried again within the
    /// longest backoff, and the stall ends.
    #[test]
    fn a_driver_waking_often_still_retries_once_the_store_is_back() {
        let t0 = Instant::now();
        let back = t0 + Duration::from_secs(5);
        let mut r = Retry::new();
        let mut now = t0;
        let mut served_at = None;
        while now < t0 + Duration::from_secs(60) {
            if r.due(now) {
                if now >= back {
                    r.ok(now);
                    served_at = Some(now);
                    break;
                }
                r.failed("store away".into(), now);
            }
            now += 100 * MS;
        }
        let served_at = served_at.expect("the fault was never tried again");
        assert!(
            served_at <= back + MAX_BACKOFF + 100 * MS,
            "tried again {:?} after the store came back",
            served_at - back
        );
        assert!(r.stalled(now).is_none());
    }

    #[test]
    fn late_chunks_are_asked_for_again_soon_and_a_long_wait_is_said_once() {
        let t0 = Instant::now();
        let mut r = Retry::new();
        assert!(!r.not_yet("chunk 3".into(), t0));
        assert_eq!(r.at(), Some(t0 + NOT_YET_RETRY));
        let later = t0 + 2 * LONG_WAIT;
        assert!(r.not_yet("chunk 3".into(), later));
        assert!(!r.not_yet("chunk 3".into(), later + MS), "said twice");
        let (d, cause) = r.stalled(later).unwrap();
        assert_eq!((d, cause), (2 * LONG_WAIT, "chunk 3"));
        assert_eq!(r.ok(later), Some(2 * LONG_WAIT));
        assert!(r.due(later) && r.stalled(later).is_none());
    }

    #[test]
    fn poll_timeouts_round_up() {
        assert_eq!(poll_ms(Duration::ZERO), 0);
        assert_eq!(poll_ms(Duration::from_micros(1)), 1);
        assert_eq!(poll_ms(Duration::from_micros(1999)), 2);
        assert_eq!(poll_ms(Duration::from_millis(500)), 500);
    }
}

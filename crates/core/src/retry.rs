//! Retrying a failing operation without flooding the log: exponential
//! backoff, and one error line per interval for a run of failures (used by
//! dedup's partitions, the JobDB writers and ingest's log appends).
//!
//! A full disk fails every attempt the same way; logging each one (or
//! retrying at once) fills what is left of the disk with log lines and burns
//! a core. So the first failure of a run is logged with its error, later
//! ones are counted and summarized at most once per [`ErrorStreak`]
//! interval, and the first success after a run says how long it lasted.

use std::time::{Duration, Instant};

/// Delay before retry `failures` (1 = after the first failure): doubling
/// from `initial`, capped at `max`.
pub fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    initial.saturating_mul(1 << shift).min(max)
}

/// What to log for one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The first failure of a run: log it in full.
    First,
    /// The interval passed: log a summary of `failures` since the last line.
    Summary { failures: u64, failing_for: Duration },
    /// Counted, not logged.
    Quiet,
}

/// The end of a run of failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub failures: u64,
    pub failing_for: Duration,
}

/// A run of consecutive failures, for rate-limited logging.
#[derive(Debug)]
pub struct ErrorStreak {
    every: Duration,
    since: Option<Instant>,
    last_line: Option<Instant>,
    total: u64,
    unlogged: u64,
}

impl ErrorStreak {
    pub fn new(every: Duration) -> Self {
        Self { every, since: None, last_line: None, total: 0, unlogged: 0 }
    }

    /// Failures in the current run (0 when not failing).
    pub fn failures(&self) -> u64 {
        self.total
    }

    /// Count a failure at `now`; says whether and how to log it.
    pub fn failure(&mut self, now: Instant) -> Report {
        self.total += 1;
        let Some(since) = self.since else {
            self.since = Some(now);
            self.last_line = Some(now);
            return Report::First;
        };
        self.unlogged += 1;
        match self.last_line {
            Some(t) if now.saturating_duration_since(t) < self.every => Report::Quiet,
            _ => {
                self.last_line = Some(now);
                let failures = std::mem::take(&mut self.unlogged);
                Report::Summary { failures, failing_for: now.saturating_duration_since(since) }
            }
        }
    }

    /// A success at `now`: ends the run, if there was one.
    pub fn success(&mut self, now: Instant) -> Option<Recovered> {
        let since = self.since.take()?;
        let r = Recovered { failures: self.total, failing_for: now.saturating_duration_since(since) };
        self.total = 0;
        self.unlogged = 0;
        self.last_line = None;
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let d: Vec<u64> = (1..=8).map(|n| backoff(initial, max, n).as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(initial, max, u32::MAX), max);
        assert_eq!(backoff(initial, max, 0), initial);
    }

    #[test]
    fn a_run_of_failures_logs_the_first_then_one_summary_per_interval() {
        let t0 = Instant::now();
        let mut s = ErrorStreak::new(Duration::from_secs(30));
        // 10,000 failures a second for 65 s (what the hot loop produced).
        let mut lines = Vec::new();
        for i in 0..650_000u64 {
            let now = t0 + Duration::from_micros(i * 100);
            match s.failure(now) {
                Report::Quiet => {}
                r => lines.push(r),
            }
        }
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0], Report::First);
        assert_eq!(lines[1], Report::Summary { failures: 300_000, failing_for: Duration::from_secs(30) });
        assert_eq!(lines[2], Report::Summary { failures: 300_000, failing_for: Duration::from_secs(60) });
        let r = s.success(t0 + Duration::from_secs(70)).expect("a run ended");
        assert_eq!(r, Recovered { failures: 650_000, failing_for: Duration::from_secs(70) });
        assert_eq!(s.success(t0 + Duration::from_secs(71)), None, "no run to end");
        assert_eq!(s.failure(t0 + Duration::from_secs(72)), Report::First, "a new run is logged in full again");
    }
}

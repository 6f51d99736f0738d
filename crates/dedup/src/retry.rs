//! Retrying a failing partition: this stage's backoff and log interval for
//! [`sluice_core::retry`] (exponential backoff, one error line per interval
//! for a run of failures).

use std::time::Duration;

pub use sluice_core::retry::{backoff, ErrorStreak, Recovered, Report};

/// First retry delay after a failure.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// At most one error line per this interval while a partition keeps failing.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_stages_backoff_schedule() {
        let d: Vec<u64> = (1..=8).map(|n| backoff(INITIAL_BACKOFF, MAX_BACKOFF, n).as_millis() as u64).collect();
        assert_eq!(d, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
    }
}

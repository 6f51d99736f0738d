//! The wall clock every stage stamps records, jobs and heartbeats with.
//!
//! One definition so that every stage agrees on the unit (milliseconds since
//! the Unix epoch, as `i64`: the width SQL columns and Kafka timestamps use)
//! and on what a clock before 1970 reads (0, never a panic).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 when the clock reads before it.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_ms_is_the_unix_time_in_milliseconds() {
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let now = super::now_ms();
        let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!(before <= now && now <= after, "{before} <= {now} <= {after}");
    }
}

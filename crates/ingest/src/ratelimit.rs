//! A token bucket per source: `rate` events per second, bursts up to `burst`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = burst.max(1) as f64;
        Self { rate: rate.max(1) as f64, burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// Take `n` tokens, or say how long until they would be there. A request
    /// larger than the bucket passes when the bucket is full (and leaves it
    /// in debt), so a big batch is slowed, never refused forever.
    pub fn try_take(&self, n: u32) -> Result<(), Duration> {
        self.try_take_at(n, Instant::now())
    }

    pub fn try_take_at(&self, n: u32, now: Instant) -> Result<(), Duration> {
        let mut st = self.state.lock().expect("bucket");
        let elapsed = now.saturating_duration_since(st.1).as_secs_f64();
        st.0 = (st.0 + elapsed * self.rate).min(self.burst);
        st.1 = now;
        let need = (n as f64).min(self.burst);
        if st.0 >= need {
            st.0 -= n as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - st.0) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_burst_and_refills_at_the_rate() {
        let b = TokenBucket::new(100, 100);
        let t0 = Instant::now();
        assert!(b.try_take_at(60, t0).is_ok());
        assert!(b.try_take_at(40, t0).is_ok());
        let wait = b.try_take_at(10, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(b.try_take_at(10, t0 + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn an_oversized_request_passes_only_on_a_full_bucket() {
        let b = TokenBucket::new(10, 10);
        let t0 = Instant::now();
        assert!(b.try_take_at(50, t0).is_ok());
        assert!(b.try_take_at(1, t0 + Duration::from_secs(1)).is_err(), "still in debt");
        assert!(b.try_take_at(1, t0 + Duration::from_secs(5)).is_ok());
    }
}

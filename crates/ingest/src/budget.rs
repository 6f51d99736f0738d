//! The client error budget: a client address that keeps sending requests
//! the server refuses (4xx: malformed, oversize, unauthenticated, too deep)
//! is slowed down, so a few hostile clients cannot spend the server's CPU
//! on refusals at the expense of everyone else's events.
//!
//! Invariants:
//! - Each client key (see `server::client_key`) has a token bucket of
//!   `rate` refused requests per second, bursts up to `burst`. Every
//!   answer in 400..=499 except 429 takes a token; nothing else does (a
//!   client that only sends valid events is never slowed, whatever its rate).
//! - While a key's bucket is empty, its next request is held for
//!   [`PENALTY`] without being read or parsed, then answered `429`
//!   `client_error_budget` (with `Retry-After`) and its connection closed.
//!   Holding costs a timer, not CPU: a closed-loop attacker sends one
//!   request per penalty per connection, and its connections are bounded by
//!   `max_connections_per_client`.
//! - Memory is bounded: at most [`MAX_TRACKED`] keys are tracked; keys whose
//!   bucket has refilled are forgotten by a sweep that runs at most once a
//!   second (amortized O(1) per request). When the table is full, new keys
//!   are not tracked (they are not slowed) rather than evicting a key that
//!   is over its budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};

use sluice_core::metrics::Counter;
use std::time::{Duration, Instant};

/// Requests held and refused by an error budget, in this process (every
/// server loop: the Tracking API and the admin port);
/// `sluice_ingest_client_error_budget_held_total`.
pub fn held_total() -> &'static Counter {
    static HELD: OnceLock<Counter> = OnceLock::new();
    HELD.get_or_init(Counter::default)
}

/// How long a request over its client's budget is held before its 429.
pub const PENALTY: Duration = Duration::from_secs(1);
/// Client keys tracked at once.
pub const MAX_TRACKED: usize = 65_536;

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The error budgets of every client key; shared by a server's connections.
pub struct ErrorBudget {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

struct State {
    buckets: HashMap<IpAddr, Bucket>,
    swept: Instant,
}

impl ErrorBudget {
    /// `rate` refused requests per second per client (0: no budget, never
    /// slows anyone), bursts up to `burst`.
    pub fn new(rate: u32, burst: u32) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            state: Mutex::new(State { buckets: HashMap::new(), swept: Instant::now() }),
        })
    }

    /// Whether `key` has spent its budget (its next request is held and refused).
    pub fn exhausted(&self, key: IpAddr) -> bool {
        self.exhausted_at(key, Instant::now())
    }

    pub fn exhausted_at(&self, key: IpAddr, now: Instant) -> bool {
        let mut st = self.state.lock().expect("error budget");
        match st.buckets.get_mut(&key) {
            None => false,
            Some(b) => {
                Self::refill(b, now, self.rate, self.burst);
                b.tokens < 1.0
            }
        }
    }

    /// Record the answer `status` given to `key`.
    pub fn record(&self, key: IpAddr, status: u16) {
        self.record_at(key, status, Instant::now())
    }

    pub fn record_at(&self, key: IpAddr, status: u16, now: Instant) {
        if !counts(status) {
            return;
        }
        let mut st = self.state.lock().expect("error budget");
        if now.saturating_duration_since(st.swept) >= Duration::from_secs(1) {
            st.swept = now;
            let (rate, burst) = (self.rate, self.burst);
            st.buckets.retain(|_, b| {
                Self::refill(b, now, rate, burst);
                b.tokens < burst
            });
        }
        let full = st.buckets.len() >= MAX_TRACKED;
        let b = match st.buckets.get_mut(&key) {
            Some(b) => b,
            None if full => return,
            None => st.buckets.entry(key).or_insert(Bucket { tokens: self.burst, at: now }),
        };
        Self::refill(b, now, self.rate, self.burst);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    fn refill(b: &mut Bucket, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
    }

    /// Keys tracked now (for tests and the gauge).
    pub fn tracked(&self) -> usize {
        self.state.lock().expect("error budget").buckets.len()
    }
}

/// Whether an answer with `status` spends budget: client errors, except a
/// 429 (a rate limit is the server's choice, not the client's fault).
pub fn counts(status: u16) -> bool {
    (400..500).contains(&status) && status != 429
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refusals_past_the_burst_exhaust_the_budget_and_it_refills_at_the_rate() {
        let b = ErrorBudget::new(10, 20).unwrap();
        let (t0, a) = (Instant::now(), ip("10.0.0.1"));
        for _ in 0..19 {
            b.record_at(a, 400, t0);
        }
        assert!(!b.exhausted_at(a, t0), "19 of 20");
        b.record_at(a, 401, t0);
        assert!(b.exhausted_at(a, t0));
        assert!(!b.exhausted_at(ip("10.0.0.2"), t0), "another client is not touched");
        assert!(!b.exhausted_at(a, t0 + Duration::from_millis(100)), "one token back after 1/rate");
    }

    #[test]
    fn successes_server_errors_and_rate_limits_cost_nothing() {
        let b = ErrorBudget::new(1, 1).unwrap();
        let (t0, a) = (Instant::now(), ip("::1"));
        for status in [200, 204, 301, 429, 500, 503] {
            b.record_at(a, status, t0);
        }
        assert!(!b.exhausted_at(a, t0));
        assert_eq!(b.tracked(), 0);
        b.record_at(a, 413, t0);
        assert!(b.exhausted_at(a, t0));
    }

    #[test]
    fn no_budget_when_the_rate_is_zero() {
        assert!(ErrorBudget::new(0, 10).is_none());
    }

    #[test]
    fn refilled_keys_are_swept_and_the_table_is_bounded() {
        let b = ErrorBudget::new(100, 100).unwrap();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            b.record_at(IpAddr::from(i.to_be_bytes()), 400, t0);
        }
        assert_eq!(b.tracked(), MAX_TRACKED, "new keys past the bound are not tracked");
        // Two seconds on every bucket is full again: the next record sweeps them all.
        b.record_at(ip("192.0.2.1"), 400, t0 + Duration::from_secs(2));
        assert_eq!(b.tracked(), 1);
    }
}

//! Per-destination admission, shared by every director in the process:
//! in-flight limit, rate limit, pause, priority, and the circuit breaker.
//!
//! Invariants:
//! - A request is sent only while holding a [`Permit`]; a permit counts
//!   against `max_in_flight` until dropped.
//! - An open circuit sends nothing until its cooldown ends, then exactly
//!   one probe; the probe's outcome closes it or reopens it with a doubled
//!   cooldown (capped). Jobs held back by an open circuit or a pause keep
//!   their place and their attempt count: no attempt is spent on them.
//! - A change of where a destination sends (URL, `kafka`/`postgres`/`s3`
//!   target, secret, private-network setting) closes its circuit.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::executor::{Target, Verdict};

/// Live settings of a destination (from the control database).
#[derive(Debug, Clone)]
pub struct DestinationSettings {
    pub target: Target,
    pub policy: sluice_core::config::RetryPolicy,
    /// Configured defaults; `destination_qos` may override them.
    pub max_in_flight: usize,
    pub rate_limit: u32,
    /// The destination function its jobs pass through before they are sent.
    pub function: Option<crate::function::Attached>,
    /// A `batch_webhook` or `kafka` destination: how its jobs are grouped
    /// into requests (a `kafka` one's: messages sent together).
    pub batch: Option<sluice_core::config::BatchLimits>,
    /// A `kafka`, `postgres` or `s3` destination's target (`target.url` is
    /// its URL); `None`: a webhook.
    pub native: Option<sluice_core::config::NativeTarget>,
}

#[derive(Debug)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant, cooldown: Duration },
    HalfOpen { probing: bool, cooldown: Duration },
}

struct Bucket {
    rate: u32,
    tokens: f64,
    last: Instant,
}

/// One destination's runtime state.
pub struct Destination {
    pub id: String,
    pub settings: Mutex<Arc<DestinationSettings>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    paused: AtomicBool,
    priority: AtomicU32,
    bucket: Mutex<Bucket>,
    circuit: Mutex<Circuit>,
    circuit_failures: u32,
    circuit_cooldown: Duration,
    circuit_max_cooldown: Duration,
    /// Woken whenever a permit is released or settings change.
    pub wake: Arc<Notify>,
    metrics: std::sync::OnceLock<crate::metrics::DestMetrics>,
}

/// Why a destination cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Paused, waiting for a probe, or at its in-flight limit: wait for a wake-up.
    Wait,
    /// Rate limited or circuit open until then.
    Until(Instant),
}

/// The right to send one request to a destination.
pub struct Permit {
    pub destination: Arc<Destination>,
    pub probe: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.destination.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.probe {
            let mut c = self.destination.circuit.lock().expect("circuit lock");
            // A probe dropped without an outcome (shutdown) lets the next one go.
            if let Circuit::HalfOpen { probing, .. } = &mut *c {
                *probing = false;
            }
        }
        self.destination.wake.notify_waiters();
    }
}

impl Destination {
    pub fn new(id: String, settings: DestinationSettings, circuit_failures: u32, circuit_cooldown: Duration, wake: Arc<Notify>) -> Arc<Destination> {
        let max = settings.max_in_flight;
        let rate = settings.rate_limit;
        let circuit_max_cooldown = settings.policy.max_backoff.max(circuit_cooldown);
        Arc::new(Destination {
            id,
            settings: Mutex::new(Arc::new(settings)),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(max),
            paused: AtomicBool::new(false),
            priority: AtomicU32::new(1),
            bucket: Mutex::new(Bucket { rate, tokens: rate as f64, last: Instant::now() }),
            circuit: Mutex::new(Circuit::Closed { failures: 0 }),
            circuit_failures,
            circuit_cooldown,
            circuit_max_cooldown,
            wake,
            metrics: std::sync::OnceLock::new(),
        })
    }

    pub fn settings(&self) -> Arc<DestinationSettings> {
        self.settings.lock().expect("settings lock").clone()
    }

    /// Apply settings and QoS (from the control database).
    pub fn update(&self, settings: DestinationSettings, qos: &Qos) {
        let max = qos.max_in_flight.unwrap_or(settings.max_in_flight).max(1);
        let rate = qos.rate_per_sec.unwrap_or(settings.rate_limit);
        self.max_in_flight.store(max, Ordering::Release);
        self.paused.store(qos.paused, Ordering::Release);
        self.priority.store(qos.priority.clamp(1, 100), Ordering::Release);
        {
            let mut b = self.bucket.lock().expect("bucket lock");
            if b.rate != rate {
                *b = Bucket { rate, tokens: rate as f64, last: Instant::now() };
            }
        }
        let mut current = self.settings.lock().expect("settings lock");
        // Another server, or other credentials: what opened the circuit said nothing about
        // them, so it closes and the next attempt goes at once.
        let moved = current.target.url != settings.target.url
            || current.target.secret != settings.target.secret
            || current.target.allow_private_network != settings.target.allow_private_network
            || current.native != settings.native;
        *current = Arc::new(settings);
        drop(current);
        if moved {
            let mut c = self.circuit.lock().expect("circuit lock");
            if !matches!(*c, Circuit::Closed { .. }) {
                tracing::info!(destination = %self.id, "circuit closed: the destination's server or credentials changed");
            }
            *c = Circuit::Closed { failures: 0 };
        }
        self.wake.notify_waiters();
    }

    /// This destination's metric series (made on first use).
    pub fn metrics(&self, all: &crate::metrics::DeliverMetrics) -> &crate::metrics::DestMetrics {
        self.metrics.get_or_init(|| all.for_destination(&self.id))
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    pub fn priority(&self) -> u32 {
        self.priority.load(Ordering::Acquire)
    }

    pub fn circuit_state(&self) -> &'static str {
        match *self.circuit.lock().expect("circuit lock") {
            Circuit::Closed { .. } => "closed",
            Circuit::Open { .. } => "open",
            Circuit::HalfOpen { .. } => "half_open",
        }
    }

    /// Take a permit, or say why not.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Result<Permit, Blocked> {
        if self.is_paused() {
            return Err(Blocked::Wait);
        }
        let mut probe = false;
        {
            let mut c = self.circuit.lock().expect("circuit lock");
            match *c {
                Circuit::Closed { .. } => {}
                Circuit::Open { until, cooldown } => {
                    if now < until {
                        return Err(Blocked::Until(until));
                    }
                    *c = Circuit::HalfOpen { probing: false, cooldown };
                    probe = true;
                }
                Circuit::HalfOpen { probing: true, .. } => return Err(Blocked::Wait),
                Circuit::HalfOpen { probing: false, .. } => probe = true,
            }
            if self.in_flight.load(Ordering::Acquire) >= self.max_in_flight.load(Ordering::Acquire) {
                return Err(Blocked::Wait);
            }
            {
                let mut b = self.bucket.lock().expect("bucket lock");
                if b.rate > 0 {
                    let rate = b.rate as f64;
                    let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
                    b.tokens = (b.tokens + elapsed * rate).min(rate.max(1.0));
                    b.last = now;
                    if b.tokens < 1.0 {
                        let wait = Duration::from_secs_f64((1.0 - b.tokens) / rate);
                        return Err(Blocked::Until(now + wait));
                    }
                    b.tokens -= 1.0;
                }
            }
            if probe {
                if let Circuit::HalfOpen { probing, .. } = &mut *c {
                    *probing = true;
                }
            }
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Permit { destination: self.clone(), probe })
    }

    /// Feed an attempt's verdict to the circuit. A discard means the
    /// endpoint answered: it counts as healthy.
    pub fn record(&self, verdict: Verdict, probe: bool, now: Instant) {
        let mut c = self.circuit.lock().expect("circuit lock");
        let failed = verdict == Verdict::Retry;
        match &mut *c {
            Circuit::Closed { failures } => {
                if !failed {
                    *failures = 0;
                } else {
                    *failures += 1;
                    if *failures >= self.circuit_failures {
                        tracing::warn!(destination = %self.id, failures = *failures, cooldown = ?self.circuit_cooldown, "circuit opened");
                        *c = Circuit::Open { until: later(now, self.circuit_cooldown), cooldown: self.circuit_cooldown };
                    }
                }
            }
            Circuit::HalfOpen { cooldown, .. } if probe => {
                if failed {
                    let next = cooldown.saturating_mul(2).min(self.circuit_max_cooldown);
                    *c = Circuit::Open { until: later(now, next), cooldown: next };
                } else {
                    tracing::info!(destination = %self.id, "circuit closed: the probe succeeded");
                    *c = Circuit::Closed { failures: 0 };
                }
            }
            // Late answers from before the circuit opened change nothing.
            _ => {}
        }
    }
}

/// A row of `destination_qos`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Qos {
    pub paused: bool,
    pub max_in_flight: Option<usize>,
    pub rate_per_sec: Option<u32>,
    pub priority: u32,
}

impl Default for Qos {
    fn default() -> Self {
        Qos { paused: false, max_in_flight: None, rate_per_sec: None, priority: 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::config::RetryPolicy;

    fn dest(max: usize, rate: u32) -> Arc<Destination> {
        let settings = DestinationSettings {
            target: Target { url: "http://x".into(), secret: None, allow_private_network: true, request_timeout: Duration::from_secs(1) },
            policy: RetryPolicy::DEFAULT,
            max_in_flight: max,
            rate_limit: rate,
            function: None,
            batch: None,
            native: None,
        };
        Destination::new("d".into(), settings, 3, Duration::from_secs(10), Arc::new(Notify::new()))
    }

    #[test]
    fn in_flight_limit_and_release() {
        let d = dest(2, 0);
        let now = Instant::now();
        let a = d.try_acquire(now).unwrap();
        let _b = d.try_acquire(now).unwrap();
        assert_eq!(d.try_acquire(now).err(), Some(Blocked::Wait));
        drop(a);
        assert!(d.try_acquire(now).is_ok());
    }

    #[test]
    fn rate_limit_refills_over_time() {
        let d = dest(100, 10);
        let now = Instant::now();
        let mut n = 0;
        while let Ok(p) = d.try_acquire(now) {
            std::mem::forget(p);
            n += 1;
        }
        assert_eq!(n, 10, "a full bucket is one second's worth");
        assert!(matches!(d.try_acquire(now).err(), Some(Blocked::Until(_))));
        assert!(d.try_acquire(now + Duration::from_millis(150)).is_ok(), "0.15 s refills one token at 10/s");
    }

    #[test]
    fn circuit_opens_probes_and_closes() {
        let d = dest(100, 0);
        let t0 = Instant::now();
        for _ in 0..3 {
            d.record(Verdict::Retry, false, t0);
        }
        assert_eq!(d.circuit_state(), "open");
        assert!(matches!(d.try_acquire(t0 + Duration::from_secs(1)).err(), Some(Blocked::Until(_))));
        let probe = d.try_acquire(t0 + Duration::from_secs(11)).unwrap();
        assert!(probe.probe);
        assert_eq!(d.try_acquire(t0 + Duration::from_secs(11)).err(), Some(Blocked::Wait), "one probe at a time");
        d.record(Verdict::Retry, true, t0 + Duration::from_secs(11));
        drop(probe);
        assert_eq!(d.circuit_state(), "open");
        assert!(d.try_acquire(t0 + Duration::from_secs(25)).is_err(), "cooldown doubled to 20 s");
        let probe = d.try_acquire(t0 + Duration::from_secs(32)).unwrap();
        d.record(Verdict::Succeeded, true, t0 + Duration::from_secs(32));
        drop(probe);
        assert_eq!(d.circuit_state(), "closed");
    }

    #[test]
    fn a_new_server_closes_the_circuit_and_a_qos_change_does_not() {
        let d = dest(100, 0);
        let t0 = Instant::now();
        let open = |d: &Destination| {
            for _ in 0..3 {
                d.record(Verdict::Retry, false, t0);
            }
            assert_eq!(d.circuit_state(), "open");
        };
        open(&d);
        let same = (*d.settings()).clone();
        d.update(same.clone(), &Qos { priority: 5, ..Qos::default() });
        assert_eq!(d.circuit_state(), "open", "the same server: still open");
        let mut moved = same;
        moved.target.url = "http://elsewhere.example/hook".into();
        d.update(moved.clone(), &Qos::default());
        assert_eq!(d.circuit_state(), "closed");
        assert!(d.try_acquire(t0).is_ok(), "the next attempt goes at once");
        open(&d);
        moved.target.secret = Some("another".into());
        d.update(moved, &Qos::default());
        assert_eq!(d.circuit_state(), "closed", "new credentials");
    }

    #[test]
    fn pause_blocks_everything() {
        let d = dest(10, 0);
        let s = (*d.settings()).clone();
        d.update(s.clone(), &Qos { paused: true, ..Qos::default() });
        assert_eq!(d.try_acquire(Instant::now()).err(), Some(Blocked::Wait));
        d.update(s, &Qos::default());
        assert!(d.try_acquire(Instant::now()).is_ok());
    }
}

/// `now + d`, capped at a year ahead (`Instant` cannot hold any sum).
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d.min(Duration::from_secs(365 * 86_400))).unwrap_or(now)
}

#[cfg(test)]
mod later_tests {
    use super::*;

    #[test]
    fn later_never_overflows() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert_eq!(later(now, Duration::MAX), now + Duration::from_secs(365 * 86_400));
    }
}

//! [`Shutdown`]: the one signal that tells a stage to stop.
//!
//! Every stage is told to stop the same way, whether it runs on its own
//! thread (dedup's workers and supervisor) or as a tokio task (route,
//! directors, the director RPC server): a cloneable latch.
//!
//! Invariants:
//! - It only goes one way: once triggered it stays triggered; triggering
//!   again does nothing.
//! - Every waiter wakes: those waiting when it is triggered, and those that
//!   start waiting afterwards (they return at once). No wake-up is lost to a
//!   race between checking and waiting.
//! - Waiting never blocks an async thread: [`Shutdown::wait`] is a future;
//!   [`Shutdown::sleep_blocking`] is for threads of their own only.
//!
//! What stopping means (drain what is in flight, or abort) is each stage's
//! own business; the signal only says "stop".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// A cloneable stop signal; clones share it. See the module docs.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<Inner>);

#[derive(Default)]
struct Inner {
    triggered: AtomicBool,
    /// Wakes async waiters.
    notify: Notify,
    /// Wakes threads in [`Shutdown::sleep_blocking`]; the mutex orders the
    /// flag's check against the notification.
    lock: Mutex<()>,
    cv: Condvar,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown").field("triggered", &self.is_triggered()).finish()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tell every holder to stop.
    pub fn trigger(&self) {
        self.0.triggered.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
        let _guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.0.cv.notify_all();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.triggered.load(Ordering::SeqCst)
    }

    /// Resolves once triggered (at once if it already was).
    pub async fn wait(&self) {
        loop {
            // Registered before the flag is checked, so a trigger in between
            // still wakes this waiter.
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }

    /// Block the calling thread for `d` or until triggered, whichever comes
    /// first; whether it was triggered. Never call it from async code.
    pub fn sleep_blocking(&self, d: Duration) -> bool {
        let guard = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _unused = self.0.cv.wait_timeout_while(guard, d, |_| !self.is_triggered()).unwrap_or_else(|e| e.into_inner());
        self.is_triggered()
    }
}

#[cfg(test)]
mod tests {
    use super::Shutdown;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trigger_wakes_every_async_waiter() {
        let s = Shutdown::new();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn({
                    let s = s.clone();
                    async move { s.wait().await }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "nobody returns before the trigger");
        assert!(!s.is_triggered());
        s.trigger();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w).await.expect("every waiter wakes").unwrap();
        }
        assert!(s.is_triggered());
    }

    #[tokio::test]
    async fn a_waiter_that_arrives_after_the_trigger_returns_at_once() {
        let s = Shutdown::new();
        s.clone().trigger();
        s.trigger(); // a second trigger changes nothing
        tokio::time::timeout(Duration::from_millis(100), s.wait()).await.expect("returns at once");
        tokio::time::timeout(Duration::from_millis(100), s.clone().wait()).await.expect("clones see it too");
    }

    #[test]
    fn sleep_blocking_sleeps_the_full_time_unless_triggered() {
        let s = Shutdown::new();
        let started = Instant::now();
        assert!(!s.sleep_blocking(Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        let t = std::thread::spawn({
            let s = s.clone();
            move || {
                let started = Instant::now();
                (s.sleep_blocking(Duration::from_secs(30)), started.elapsed())
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        s.trigger();
        let (triggered, slept) = t.join().unwrap();
        assert!(triggered && slept < Duration::from_secs(10), "woken by the trigger after {slept:?}");
        let started = Instant::now();
        assert!(s.sleep_blocking(Duration::from_secs(30)), "already triggered: returns at once");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}

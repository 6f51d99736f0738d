//! Named crash points (and panic and pause points), for the crash-matrix
//! tests only.
//!
//! A crash point is a place between two steps of a commit protocol where a
//! test may make the process die at once: `std::process::abort()` — no
//! unwinding, no destructors, no flush, the same as `kill -9` from inside.
//!
//! The switch is hidden and off by default: the environment variable
//! `SLUICE_CRASH_AT=<point>[:<n>]` arms one point, which aborts the n-th
//! time it is reached (default 1). Nothing else can reach it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a crash point.
pub const CRASH_ENV: &str = "SLUICE_CRASH_AT";

struct Armed {
    point: String,
    remaining: AtomicU64,
}

/// The point and count `<point>[:<n>]` in environment variable `var`.
fn armed_by(var: &str) -> Option<Armed> {
    let spec = std::env::var(var).ok()?;
    let (point, n) = match spec.split_once(':') {
        Some((p, n)) => (p.to_owned(), n.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    Some(Armed { point, remaining: AtomicU64::new(n.max(1)) })
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| armed_by(CRASH_ENV)).as_ref()
}

/// Abort the process here if this point is armed and its count is reached.
pub fn crash_point(point: &str) {
    if let Some(a) = armed() {
        if a.point == point && a.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            eprintln!("crash point {point} reached: aborting");
            std::process::abort();
        }
    }
}

/// The environment variable that arms a panic point:
/// `SLUICE_PANIC_AT=<point>[:<n>]` panics the first n times (default 1)
/// that point is reached. Tests use it to prove a panic in a stage is
/// contained (nothing stuck, nothing lost).
pub const PANIC_ENV: &str = "SLUICE_PANIC_AT";

/// Panic here if this point is armed by [`PANIC_ENV`] and has panics left.
pub fn panic_point(point: &str) {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| armed_by(PANIC_ENV));
    if let Some(a) = armed {
        if a.point == point && a.remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            panic!("panic point {point} reached");
        }
    }
}

/// The environment variable naming a *pause file* for tests: while the
/// file exists, every [`pause_point`] waits (checking every 20 ms). Unset,
/// a pause point costs one relaxed check of a cached `None`.
pub const PAUSE_ENV: &str = "SLUICE_TEST_PAUSE_FILE";

/// Wait here while the test's pause file exists (see [`PAUSE_ENV`]): a test
/// holds a stage between two steps to make an interleaving happen every
/// time (e.g. dedup not yet reading an event ingest has acknowledged).
pub fn pause_point(point: &str) {
    static FILE: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let Some(file) = FILE.get_or_init(|| std::env::var_os(PAUSE_ENV).map(Into::into)).as_ref() else { return };
    let mut said = false;
    while file.exists() {
        if !said {
            eprintln!("pause point {point}: waiting while {} exists", file.display());
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

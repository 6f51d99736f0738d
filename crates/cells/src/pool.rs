//! A few handles on one global store (each its own connection) shared by
//! async code: a call takes an idle one, runs on a blocking thread, and
//! gives it back. One slow statement holds one connection, not every caller.
//!
//! Invariant: the idle handles and the semaphore's permits stay equal
//! whatever happens to a call. The blocking task owns both the handle and
//! the permit, and returns the handle before it releases the permit, so a
//! caller that stops waiting (a client gone, a timeout) or a call that
//! panics loses nothing (red team: a cancelled call kept its permit's
//! count but dropped its handle, and the next call panicked with the lock
//! held, poisoning the pool for good).

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Semaphore;

use crate::GlobalStore;

/// Handles on one store, lent one per call.
pub struct StorePool {
    stores: Arc<Mutex<Vec<GlobalStore>>>,
    /// Counts the idle entries of `stores`.
    idle: Arc<Semaphore>,
    size: usize,
}

/// Why a pooled call did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the store pool is closed")]
    Closed,
    /// The call panicked (its handle is back in the pool).
    #[error("a global store call failed unexpectedly")]
    Panicked,
}

impl StorePool {
    pub fn new(stores: Vec<GlobalStore>) -> StorePool {
        StorePool { idle: Arc::new(Semaphore::new(stores.len())), size: stores.len(), stores: Arc::new(Mutex::new(stores)) }
    }

    /// Handles idle now, and in all.
    pub fn idle(&self) -> (usize, usize) {
        (self.idle.available_permits(), self.size)
    }

    /// Run `f` on an idle handle, on a blocking thread. Dropping the
    /// returned future early leaves the call to finish on its thread, and
    /// its handle comes back to the pool then.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce(&GlobalStore) -> T + Send + 'static) -> Result<T, PoolError> {
        let permit = self.idle.clone().acquire_owned().await.map_err(|_| PoolError::Closed)?;
        let stores = self.stores.clone();
        let task = tokio::task::spawn_blocking(move || {
            let store = stores.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let Some(store) = store else {
                // Cannot happen while the invariant holds; refuse rather than panic.
                return Err(PoolError::Closed);
            };
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&store)));
            stores.lock().unwrap_or_else(PoisonError::into_inner).push(store);
            drop(permit);
            out.map_err(|_| PoolError::Panicked)
        });
        task.await.map_err(|_| PoolError::Panicked)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool(dir: &std::path::Path, n: usize) -> StorePool {
        let path = dir.join("g.sqlite").display().to_string();
        StorePool::new((0..n).map(|_| GlobalStore::open(&path).unwrap()).collect())
    }

    /// Red team: callers that stop waiting, and calls that panic, leave the pool whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_and_panicking_calls_give_their_handle_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(pool(dir.path(), 2));
        for _ in 0..6 {
            let slow = p.run(|s| {
                std::thread::sleep(Duration::from_millis(150));
                s.mapping_version().is_ok()
            });
            // The caller gives up long before the call ends.
            assert!(tokio::time::timeout(Duration::from_millis(10), slow).await.is_err());
        }
        assert!(matches!(p.run(|_| -> bool { panic!("a bug in a store call") }).await, Err(PoolError::Panicked)));
        // Every handle comes back; calls work as before.
        for _ in 0..50 {
            if p.idle() == (2, 2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(p.idle(), (2, 2));
        let calls: Vec<_> = (0..8).map(|_| p.run(|s| s.mapping_version().unwrap())).collect();
        for c in calls {
            assert_eq!(c.await.unwrap(), 0);
        }
    }
}

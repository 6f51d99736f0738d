//! A few handles on one global store (each its own connection) shared by
//! async code: a call takes an idle one, runs on a blocking thread, and
//! gives it back. One slow statement holds one connection, not every caller.

use std::sync::Mutex;

use tokio::sync::Semaphore;

use crate::GlobalStore;

/// Handles on one store, lent one per call.
pub struct StorePool {
    stores: Mutex<Vec<GlobalStore>>,
    /// Counts the idle entries of `stores`.
    idle: Semaphore,
}

/// Why a pooled call did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the store pool is closed")]
    Closed,
    /// The call panicked; its handle is gone with it (the pool has one less).
    #[error("a global store call failed unexpectedly")]
    Panicked,
}

impl StorePool {
    pub fn new(stores: Vec<GlobalStore>) -> StorePool {
        StorePool { idle: Semaphore::new(stores.len()), stores: Mutex::new(stores) }
    }

    /// Handles idle now.
    pub fn idle(&self) -> usize {
        self.idle.available_permits()
    }

    /// Run `f` on an idle handle, on a blocking thread.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce(&GlobalStore) -> T + Send + 'static) -> Result<T, PoolError> {
        let permit = self.idle.acquire().await.map_err(|_| PoolError::Closed)?;
        let store = self.stores.lock().expect("stores lock").pop().expect("an idle store per permit");
        match tokio::task::spawn_blocking(move || {
            let out = f(&store);
            (store, out)
        })
        .await
        {
            Ok((store, out)) => {
                self.stores.lock().expect("stores lock").push(store);
                drop(permit);
                Ok(out)
            }
            Err(_) => {
                permit.forget();
                Err(PoolError::Panicked)
            }
        }
    }
}

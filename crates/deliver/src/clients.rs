//! The clients a process keeps for destinations reached outside HTTP (a
//! Kafka cluster's producer, a database's pool, an S3 store), one per key
//! (the settings they were made with), shared by every request.
//!
//! Invariants:
//! - A client no destination of the catalog uses any more (a URL or a
//!   credential changed, a destination deleted) is taken out by the
//!   executor's sweep within [`SWEEP_EVERY`](crate::executor::SWEEP_EVERY):
//!   it does not keep connecting, with the old credentials, to a server
//!   no one configured now.
//! - A client unused for `idle` is dropped when another is looked up.
//! - With `max_age`, a client is made again once that old (its server's
//!   address is then checked again).
//! - Two requests that make a client for one key at once keep the first.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Kept<V> {
    client: V,
    made: Instant,
    used: Instant,
}

pub(crate) struct Clients<K, V> {
    by_key: Arc<Mutex<HashMap<K, Kept<V>>>>,
    idle: Duration,
    max_age: Option<Duration>,
}

impl<K, V> Clone for Clients<K, V> {
    fn clone(&self) -> Self {
        Clients { by_key: self.by_key.clone(), idle: self.idle, max_age: self.max_age }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Clients<K, V> {
    pub(crate) fn new(idle: Duration, max_age: Option<Duration>) -> Self {
        Clients { by_key: Arc::default(), idle, max_age }
    }

    /// The client kept for `key`, if any (and not too old); drops idle others.
    pub(crate) fn get(&self, key: &K) -> Option<V> {
        let mut by_key = self.by_key.lock().expect("clients lock");
        by_key.retain(|k, c| (k == key || c.used.elapsed() < self.idle) && self.max_age.is_none_or(|age| c.made.elapsed() < age));
        let kept = by_key.get_mut(key)?;
        kept.used = Instant::now();
        Some(kept.client.clone())
    }

    /// Keep `client` for `key`, unless another request made one meanwhile;
    /// the one kept.
    pub(crate) fn keep(&self, key: K, client: V) -> V {
        let now = Instant::now();
        let mut by_key = self.by_key.lock().expect("clients lock");
        by_key.entry(key).or_insert(Kept { client, made: now, used: now }).client.clone()
    }

    /// Take out every client whose key `live` refuses; they are returned so
    /// the caller drops them where blocking is allowed (a producer's drop
    /// waits for its threads).
    pub(crate) fn take_unless(&self, live: impl Fn(&K) -> bool) -> Vec<V> {
        let mut by_key = self.by_key.lock().expect("clients lock");
        let gone: Vec<K> = by_key.keys().filter(|k| !live(k)).cloned().collect();
        gone.iter().filter_map(|k| by_key.remove(k)).map(|c| c.client).collect()
    }

    /// Drop the client kept for `key` if `is` says it is the one (not one made since).
    pub(crate) fn drop_if(&self, key: &K, is: impl Fn(&V) -> bool) {
        let mut by_key = self.by_key.lock().expect("clients lock");
        if by_key.get(key).is_some_and(|c| is(&c.client)) {
            by_key.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_kept_shared_and_dropped_when_idle_or_old() {
        let c: Clients<&str, u32> = Clients::new(Duration::from_millis(50), None);
        assert_eq!(c.get(&"a"), None);
        assert_eq!(c.keep("a", 1), 1);
        assert_eq!(c.keep("a", 2), 1, "the first made is kept");
        assert_eq!(c.get(&"a"), Some(1));
        c.keep("b", 3);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(c.get(&"a"), Some(1), "the one looked up stays");
        assert_eq!(c.get(&"b"), None, "an idle one is dropped");
        c.drop_if(&"a", |v| *v == 9);
        assert_eq!(c.get(&"a"), Some(1));
        c.drop_if(&"a", |v| *v == 1);
        assert_eq!(c.get(&"a"), None);
        c.keep("a", 1);
        c.keep("c", 4);
        assert_eq!(c.take_unless(|k| *k == "a"), vec![4], "a client no one uses is taken out");
        assert_eq!((c.get(&"a"), c.get(&"c")), (Some(1), None));
        let aging: Clients<&str, u32> = Clients::new(Duration::from_secs(60), Some(Duration::from_millis(30)));
        aging.keep("a", 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(aging.get(&"a"), None, "made again once too old");
    }
}

//! The bucket gate: which of a moving workspace's events this cell accepts
//! (docs/plans/MIGRATION.md).
//!
//! Invariants:
//! - A workspace without an entry is accepted whole (nothing is moving).
//! - Each workspace has its own hold: a fence waits only for that
//!   workspace's requests in flight, and holds up no other workspace's.
//! - A request is checked and appended under a shared hold of the gate
//!   ([`BucketGate::admit`] returns the hold; ingest keeps it until the
//!   request's appends are durable). [`BucketGate::set`] takes the gate
//!   alone: when it returns, every request admitted under the old entry has
//!   finished appending, so the cell's `input` holds every event it will
//!   ever acknowledge of the buckets it just closed. That is the source's
//!   fence.
//! - A request with any event the entry does not accept is refused whole
//!   (`421 moved`, nothing stored): the router splits requests by bucket,
//!   so only a router with a stale mapping sends one, and it routes again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sluice_core::BucketSet;
use tokio::sync::{OwnedRwLockReadGuard, RwLock as AsyncRwLock};

/// What a cell accepts of one moving workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateEntry {
    /// Events whose (client's) messageId falls in these buckets.
    pub buckets: BucketSet,
    /// Events without a messageId of the client's (ingest assigns one):
    /// accepted by one side at a time (`sluice_router::split::free_side`).
    pub free: bool,
}

/// The events of one request, as the gate sees them.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestBuckets {
    /// Buckets of the client's messageIds.
    pub buckets: BucketSet,
    /// Some event had no messageId of the client's.
    pub free: bool,
}

/// The gate (see the module docs).
#[derive(Default)]
pub struct BucketGate {
    entries: RwLock<HashMap<String, GateEntry>>,
    /// Per workspace: held shared by its requests from check to durable
    /// append, alone by [`BucketGate::set`] (one workspace's fence never
    /// waits for, or stalls, another's requests). One per workspace that
    /// sent a request (known sources only reach the gate).
    holds: std::sync::Mutex<HashMap<String, Arc<AsyncRwLock<()>>>>,
}

/// A request's shared hold on the gate: keep it until the appends are durable.
pub struct Admitted(#[allow(dead_code)] OwnedRwLockReadGuard<()>);

impl BucketGate {
    /// Admit a request of `workspace` holding `events`, or say which buckets were refused.
    pub async fn admit(&self, workspace: &str, events: RequestBuckets) -> Result<Admitted, BucketSet> {
        // Always held, migration or not (review: a request admitted without it before the first
        // entry was set could still be appending when a fence read where `input` ends).
        let hold = self.hold_of(workspace).read_owned().await;
        let entry = self.entries.read().expect("gate lock").get(workspace).copied();
        match entry {
            None => Ok(Admitted(hold)),
            Some(e) => {
                let refused = events.buckets.minus(e.buckets);
                if refused.is_empty() && (!events.free || e.free) {
                    Ok(Admitted(hold))
                } else {
                    Err(refused)
                }
            }
        }
    }

    /// Set (or with `None` remove) `workspace`'s entry; returns once no
    /// request admitted before is still appending.
    pub async fn set(&self, workspace: &str, entry: Option<GateEntry>) {
        let hold = self.hold_of(workspace);
        let _alone = hold.write().await;
        let mut entries = self.entries.write().expect("gate lock");
        match entry {
            Some(e) => entries.insert(workspace.to_owned(), e),
            None => entries.remove(workspace),
        };
    }

    fn hold_of(&self, workspace: &str) -> Arc<AsyncRwLock<()>> {
        let mut holds = self.holds.lock().expect("gate holds lock");
        if let Some(h) = holds.get(workspace) {
            return h.clone();
        }
        holds.entry(workspace.to_owned()).or_default().clone()
    }

    /// Every entry now.
    pub fn entries(&self) -> HashMap<String, GateEntry> {
        self.entries.read().expect("gate lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn closing_buckets_waits_for_requests_admitted_before() {
        let gate = Arc::new(BucketGate::default());
        let some = RequestBuckets { buckets: BucketSet::first(20), free: false };
        // Admitted before any entry existed, still appending: the first fence waits for it too.
        let early = gate.admit("w", some).await.unwrap();
        let first = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.set("w", Some(GateEntry { buckets: BucketSet::first(50), free: true })).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished(), "the first entry waits for the request admitted before it");
        // Another workspace is not held up by this one's fence.
        let other = tokio::time::timeout(Duration::from_secs(1), gate.admit("other", some)).await;
        assert!(other.is_ok_and(|a| a.is_ok()));
        drop(early);
        first.await.unwrap();
        let held = gate.admit("w", some).await.unwrap();
        assert!(gate.admit("other", some).await.is_ok(), "other workspaces pass");
        assert_eq!(
            gate.admit("w", RequestBuckets { buckets: BucketSet::first(60), free: false }).await.err(),
            Some(BucketSet::first(60).minus(BucketSet::first(50)))
        );
        // Closing waits for the request admitted under the old entry.
        let closer = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.set("w", Some(GateEntry { buckets: BucketSet::NONE, free: false })).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!closer.is_finished(), "the fence must wait for the request in flight");
        drop(held);
        closer.await.unwrap();
        assert!(gate.admit("w", some).await.is_err());
        assert!(gate.admit("w", RequestBuckets { buckets: BucketSet::NONE, free: true }).await.is_err(), "free events follow the entry");
        assert!(gate.admit("w", RequestBuckets::default()).await.is_ok(), "an empty request passes");
        gate.set("w", None).await;
        assert!(gate.admit("w", some).await.is_ok());
    }
}

//! `batch_webhook` requests (docs/DESTINATIONS.md): many jobs in one POST.
//!
//! Invariants:
//! - The body is `{"batch": [<event>, …]}`, each event exactly the bytes
//!   its job would have sent alone (after the destination function), in
//!   the order the director took the jobs; signed like a single event's
//!   body (`X-Signature`, `X-Sluice-Signature` over the whole body).
//! - A request holds at most `batch_max_events` jobs (the director forms
//!   it) and at most `batch_max_bytes` of events (split here, in order); an
//!   event larger than `batch_max_bytes` goes alone.
//! - Its `Idempotency-Key` is derived from its jobs' keys (messageIds), in
//!   order: the same jobs sent again in the same batch carry the same key.
//!   A batch is formed afresh on each attempt, so an endpoint that must
//!   drop repeats does so by each event's `messageId` (at-least-once).

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

/// Split `items` (with their bodies) into runs of at most `max_bytes` of bodies, in order.
pub(crate) fn chunks<T: HasBody>(items: Vec<T>, max_bytes: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = item.body().len() + 1;
        match out.last_mut() {
            Some(run) if bytes + n <= max_bytes => run.push(item),
            _ => {
                bytes = 0;
                out.push(vec![item]);
            }
        }
        bytes += n;
    }
    out
}

/// What [`chunks`] measures.
pub(crate) trait HasBody {
    fn body(&self) -> &Bytes;
}

/// The `Idempotency-Key` and body of one batch request of `jobs` (key, body).
pub(crate) fn request<'a>(jobs: impl Iterator<Item = (&'a str, &'a Bytes)>) -> (String, Bytes) {
    let mut key = Sha256::new();
    let mut body = BytesMut::with_capacity(4096);
    body.put_slice(b"{\"batch\":[");
    for (i, (k, b)) in jobs.enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(b);
        key.update(k.as_bytes());
        key.update(b"\n");
    }
    body.put_slice(b"]}");
    (format!("batch-{}", &hex::encode(key.finalize())[..32]), body.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    impl HasBody for Bytes {
        fn body(&self) -> &Bytes {
            self
        }
    }

    #[test]
    fn chunks_keep_order_and_the_byte_limit_and_a_big_event_goes_alone() {
        let b = |n: usize| Bytes::from(vec![b'x'; n]);
        let runs = chunks(vec![b(10), b(10), b(10), b(50), b(5)], 25);
        let sizes: Vec<Vec<usize>> = runs.iter().map(|r| r.iter().map(Bytes::len).collect()).collect();
        assert_eq!(sizes, vec![vec![10, 10], vec![10], vec![50], vec![5]]);
        assert!(chunks(Vec::<Bytes>::new(), 10).is_empty());
    }

    #[test]
    fn a_request_is_a_json_batch_with_a_key_of_its_jobs() {
        let (a, b) = (Bytes::from_static(br#"{"messageId":"a"}"#), Bytes::from_static(br#"{"messageId":"b"}"#));
        let (key, body) = request([("a", &a), ("b", &b)].into_iter());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!({"batch": [{"messageId": "a"}, {"messageId": "b"}]}));
        assert_eq!(key, request([("a", &a), ("b", &b)].into_iter()).0, "same jobs, same key");
        assert_ne!(key, request([("b", &b), ("a", &a)].into_iter()).0);
        assert!(key.starts_with("batch-") && key.len() == 38);
    }
}

//! The JSON shapes the admin API answers with, shared with the CLI's
//! `--json` output (`sluice jobs inspect`, `sluice dead-letters`), so the
//! two never drift apart.
//!
//! Invariant: no view shows a credential back. A destination URL's password
//! is replaced by `***` ([`without_password`]); a destination's `secret` is
//! write-only (see the destination listing in the crate root).

use base64::Engine;
use serde_json::{json, Value};
use sluice_deliver::control::{DeadLetter, DEAD_LETTER_EXCERPT_BYTES};
use sluice_deliver::inspect::Found;

/// `url` with the password of its user info (`https://user:pw@host/`)
/// replaced by `***`, for showing: a destination's URL may carry a
/// credential, and answers never show one back (as `secret`, which is
/// write-only).
pub fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A job and its whole history (`jobs inspect --json`, `GET /api/jobs/{key}`).
pub fn job_json(f: &Found) -> Value {
    let j = &f.job;
    json!({
        "id": j.id.to_string(), "jobdb": f.jobdb, "message_id": j.job.message_id,
        "source": j.job.source, "destination": j.job.destination,
        "generation": j.job.generation, "endpoint": without_password(&j.job.endpoint),
        "state": j.state.as_str(), "created_at": j.job.created_at, "expires_at": j.job.expires_at,
        "received_at": j.job.received_at,
        "transitions": std::iter::once(json!({"seq": 0, "state": "awaiting_scheduling", "at": j.job.created_at, "attempt": 0}))
            .chain(f.history.iter().map(|t| json!({
                "seq": t.seq, "state": t.state.as_str(), "at": t.at, "attempt": t.attempt,
                "status": t.status, "error": t.error, "retry_at": t.retry_at})))
            .collect::<Vec<_>>(),
    })
}

/// A dead letter (`dead-letters list|show --json`, `/api/dead-letters`): key
/// and payload as (lossy) UTF-8 text, and, `whole`, the exact bytes in
/// base64; otherwise a payload excerpt of at most
/// [`DEAD_LETTER_EXCERPT_BYTES`].
pub fn dead_letter_json(d: &DeadLetter, whole: bool) -> Value {
    let mut v = json!({
        "id": d.id,
        "created_at_ms": d.created_at_ms,
        "stage": d.stage,
        "state": d.state(),
        "topic": d.topic,
        "partition": d.partition,
        "offset": d.offset,
        "generation": d.generation,
        "destination": d.destination,
        "record_ms": d.record_ms,
        "key": String::from_utf8_lossy(&d.key),
        "reason": d.reason,
        "payload_size": d.payload_size,
        "truncated": d.truncated,
        "replay_requested_at_ms": d.replay_requested_at_ms,
        "replayed_at_ms": d.replayed_at_ms,
        "replayed_jobs": d.replayed_jobs,
        "discarded_at_ms": d.discarded_at_ms,
        "attempts": d.attempts,
        "last_error": d.last_error,
    });
    let o = v.as_object_mut().expect("an object");
    if whole {
        let b64 = base64::engine::general_purpose::STANDARD;
        o.insert("payload".into(), Value::String(String::from_utf8_lossy(&d.payload).into_owned()));
        o.insert("payload_base64".into(), Value::String(b64.encode(&d.payload)));
        o.insert("key_base64".into(), Value::String(b64.encode(&d.key)));
    } else {
        let excerpt = &d.payload[..d.payload.len().min(DEAD_LETTER_EXCERPT_BYTES)];
        o.insert("payload_excerpt".into(), Value::String(String::from_utf8_lossy(excerpt).into_owned()));
    }
    v
}

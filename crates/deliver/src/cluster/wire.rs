//! What travels between a route and a director: the wire types of
//! `POST /rpc/v1/jobs`, its signature (`director.rpc_secret`), its limits,
//! and the encoding of a route's jobs into requests under the size limit.
//! The protocol's rules are in the [module doc](super).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sluice_core::Config;

use crate::{DeliverError, NewJob};

/// One job on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireJob {
    pub message_id: String,
    pub source: String,
    pub destination: String,
    pub generation: i64,
    pub endpoint: String,
    /// The event JSON (UTF-8).
    pub payload: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub received_at: i64,
}

impl From<NewJob> for WireJob {
    fn from(j: NewJob) -> Self {
        WireJob {
            message_id: j.message_id,
            source: j.source,
            destination: j.destination,
            generation: j.generation,
            endpoint: j.endpoint,
            payload: String::from_utf8_lossy(&j.payload).into_owned(),
            created_at: j.created_at,
            expires_at: j.expires_at,
            received_at: j.received_at,
        }
    }
}

impl From<WireJob> for NewJob {
    fn from(j: WireJob) -> Self {
        NewJob {
            message_id: j.message_id,
            source: j.source,
            destination: j.destination,
            generation: j.generation,
            endpoint: j.endpoint,
            payload: Bytes::from(j.payload),
            created_at: j.created_at,
            expires_at: j.expires_at,
            received_at: j.received_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InsertRequest {
    pub oldest_event_ms: i64,
    pub jobs: Vec<WireJob>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InsertReply {
    /// Jobs new to the director's JobDBs (repeats are dropped).
    pub inserted: u64,
}

/// A refusal's body: `{"code", "message"}`, and for `unknown_destination`
/// the ids at fault (at most [`MAX_IDS_REPORTED`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
}

pub const INSERT_PATH: &str = "/rpc/v1/jobs";

/// The request header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "x-sluice-rpc-signature";

/// The largest request body a director reads. A route batch is 1,000
/// events; at Segment's 32 KB per event (`ingest.max_event_bytes`) one
/// destination's jobs take ~32 MB with JSON escaping, so the route splits
/// larger hand-overs into several requests; a single job needs an event
/// under ~16 MB.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// How far a request's timestamp may be from the director's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A director re-reads its control database for an unknown destination at
/// most this often.
pub const UNKNOWN_REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Unknown destination ids named in one refusal.
pub const MAX_IDS_REPORTED: usize = 20;

/// A director is live while its heartbeat is younger than this.
pub const LIVE_AFTER: Duration = Duration::from_secs(10);

/// Separates the RPC's HMAC key from every other use of the same string.
const KEY_DOMAIN: &[u8] = b"sluice route-director rpc v1\0";

/// `director.rpc_secret`, as the HMAC key of the RPC's signatures. Its
/// `Debug` does not show it.
#[derive(Clone)]
pub struct RpcSecret(Arc<[u8]>);

impl std::fmt::Debug for RpcSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RpcSecret(…)")
    }
}

impl RpcSecret {
    pub fn new(secret: &str) -> RpcSecret {
        RpcSecret([KEY_DOMAIN, secret.as_bytes()].concat().into())
    }

    /// The signature header's value for `body` sent at `unix` seconds.
    pub fn sign(&self, body: &[u8], unix: i64) -> String {
        // `t=<unix>,v1=<hex HMAC-SHA256 of "<unix>." + body>`: the webhook
        // signature's construction (one implementation of it), another key.
        crate::executor::signatures(&self.0, body, unix).1
    }

    /// Whether `header` is our signature of `body`, compared in constant
    /// time (the expected value's length depends only on `t`, which the
    /// caller chose).
    pub fn verify(&self, header: &str, body: &[u8]) -> bool {
        let Some(t) = signature_time(header) else { return false };
        constant_time_eq(self.sign(body, t).as_bytes(), header.as_bytes())
    }
}

/// The `t` of a signature header, if the header has the right shape.
pub(crate) fn signature_time(header: &str) -> Option<i64> {
    let (t, v1) = header.strip_prefix("t=")?.split_once(",v1=")?;
    if t.is_empty() || t.len() > 12 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if v1.len() != 64 || !v1.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    t.parse().ok()
}

/// Equal lengths and bytes, without an early exit on the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// `jobs` as request bodies of at most `max` bytes each, in order. A single
/// job larger than that is an error (it could never be handed over).
pub fn encode_requests(jobs: Vec<WireJob>, oldest_event_ms: i64, max: usize) -> Result<Vec<Vec<u8>>, DeliverError> {
    let head = format!("{{\"oldest_event_ms\":{oldest_event_ms},\"jobs\":[");
    const TAIL: &[u8] = b"]}";
    let mut bodies = Vec::new();
    let mut current = head.clone().into_bytes();
    let mut in_current = 0usize;
    for job in jobs {
        let encoded = serde_json::to_vec(&job).map_err(|e| DeliverError::Rpc(format!("encoding a job: {e}")))?;
        if head.len() + encoded.len() + TAIL.len() > max {
            return Err(DeliverError::Rpc(format!(
                "the job of messageId {:?} for {:?} is {} bytes encoded, over the RPC limit of {max} bytes",
                job.message_id,
                job.destination,
                encoded.len()
            )));
        }
        if in_current > 0 && current.len() + 1 + encoded.len() + TAIL.len() > max {
            current.extend_from_slice(TAIL);
            bodies.push(std::mem::replace(&mut current, head.clone().into_bytes()));
            in_current = 0;
        }
        if in_current > 0 {
            current.push(b',');
        }
        current.extend_from_slice(&encoded);
        in_current += 1;
    }
    if in_current > 0 {
        current.extend_from_slice(TAIL);
        bodies.push(current);
    }
    Ok(bodies)
}

/// `director.rpc_secret`, required when route and directors are separate
/// processes (`sluice route`, `sluice director`).
pub fn rpc_secret(config: &Config) -> Result<RpcSecret, DeliverError> {
    match config.director.rpc_secret.as_deref() {
        Some(s) if !s.is_empty() => Ok(RpcSecret::new(s)),
        _ => Err(DeliverError::Cluster(format!(
            "separate route and director processes authenticate each other with a shared secret: set director.rpc_secret \
             (or SLUICE_DIRECTOR__RPC_SECRET), the same on every route and director, at least {} characters (e.g. `openssl rand -hex 32`)",
            sluice_core::config::MIN_RPC_SECRET_LEN
        ))),
    }
}

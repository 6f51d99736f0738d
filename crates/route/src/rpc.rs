//! Route → director RPC: JSON over HTTP/2 (cleartext, prior knowledge).
//!
//! `POST /rpc/v1/jobs` with an [`InsertRequest`] answers `200` with an
//! [`InsertReply`] only once the director has committed the jobs to a JobDB
//! (`Centrifuge::insert`), so the route commits its `output` offset after
//! every director it sent jobs to has answered.
//!
//! Which director: the live ones (heartbeat in the SQL directory,
//! [`sluice_deliver::directory`]) sorted by name; a job goes to
//! `murmur2(messageId) mod n`. While the set is unchanged a replayed batch
//! reaches the same directors, whose JobDBs drop the repeats (unique on
//! messageId, destination, generation). If the set changes inside a route
//! crash window, a replayed job may reach another director and be delivered
//! twice: counted as a director-crash-window duplicate.
//!
//! # Authentication
//!
//! A director delivers whatever it is handed, signed with the destination's
//! secret, so only routes may hand it jobs. Every request carries
//! `X-Sluice-Rpc-Signature: t=<unix seconds>,v1=<hex>`, where `v1` is
//! HMAC-SHA256 over `"<t>." + body` keyed with `director.rpc_secret` (behind
//! a fixed domain prefix, so the key differs from any destination secret
//! that happens to equal it). The director refuses with `401`:
//! - a missing or malformed header, and a `t` more than [`MAX_CLOCK_SKEW`]
//!   away from its clock — both before it reads the body;
//! - a `v1` that does not match, compared in constant time.
//!
//! Why an HMAC and not `Authorization: Bearer <secret>`: the secret never
//! travels (the RPC is cleartext until TLS, issue 12), a captured request
//! cannot be altered (the body is signed), and it can only be replayed
//! within the skew window — where a replay is harmless, because inserts are
//! idempotent on (messageId, destination, generation). The cost is one
//! HMAC of the body on each side, done off the async threads.
//!
//! # Limits
//!
//! A body is at most [`MAX_REQUEST_BYTES`]: a larger declared length gets
//! `413` before the body is read, a larger streamed one `413` once the
//! limit is crossed (never buffered whole). The route splits its jobs into
//! requests under the limit ([`encode_requests`]).
//!
//! # Unknown destinations
//!
//! A job for a destination the director's control database does not have is
//! refused — the whole request, with nothing inserted — so no JobDB row,
//! gate or metric series exists for ids nobody configured. Before refusing,
//! the director re-reads its control database (at most once per
//! [`UNKNOWN_REFRESH_EVERY`]): a route that saw a new destination before
//! the director's periodic refresh gets it accepted. Otherwise the answer is
//! `409 {"code":"unknown_destination"}`; like every error it fails the
//! route's batch, which is retried from the uncommitted offset, so no job is
//! lost (a deleted destination drops out of the route's plan within a
//! catalog refresh).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sluice_deliver::directory::{DirectorEntry, Directory};
use sluice_deliver::{Centrifuge, NewJob};
use tokio::sync::Mutex;

use crate::{JobSink, RouteError};

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
        sluice_deliver::executor::signatures(&self.0, body, unix).1
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
fn signature_time(header: &str) -> Option<i64> {
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

/// A refused request: its status and `{"code", "message"}` body.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct Rejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For `unknown_destination`: the ids at fault.
    pub destinations: Vec<String>,
}

impl Rejection {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Rejection {
        Rejection { status, code, message: message.into(), destinations: Vec::new() }
    }

    pub fn unauthorized(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn too_large() -> Rejection {
        Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is larger than {MAX_REQUEST_BYTES} bytes (the route splits its jobs under that)"),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> Vec<u8> {
        let reply = ErrorReply { code: self.code.to_owned(), message: self.message.clone(), destinations: self.destinations.clone() };
        serde_json::to_vec(&reply).expect("serializes")
    }
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The server side of `POST /rpc/v1/jobs`, without its HTTP framework: the
/// binary reads the body (bounded) between [`RpcServer::admit`] and
/// [`RpcServer::insert`].
pub struct RpcServer {
    /// The director process's JobDBs; replaced when they are reopened
    /// ([`RpcServer::replace`]).
    centrifuge: std::sync::RwLock<Arc<Centrifuge>>,
    secret: RpcSecret,
    /// The last re-read of the control database caused by an unknown id.
    last_refresh: Mutex<Option<Instant>>,
}

impl RpcServer {
    pub fn new(centrifuge: Arc<Centrifuge>, secret: RpcSecret) -> Arc<RpcServer> {
        Arc::new(RpcServer { centrifuge: std::sync::RwLock::new(centrifuge), secret, last_refresh: Mutex::new(None) })
    }

    /// The JobDBs requests go to now.
    pub fn centrifuge(&self) -> Arc<Centrifuge> {
        self.centrifuge.read().expect("centrifuge lock").clone()
    }

    /// Send later requests to `centrifuge`; the previous one is returned.
    pub fn replace(&self, centrifuge: Arc<Centrifuge>) -> Arc<Centrifuge> {
        std::mem::replace(&mut *self.centrifuge.write().expect("centrifuge lock"), centrifuge)
    }

    /// What can be checked before the body is read: a well-formed, fresh
    /// signature header and a declared length within [`MAX_REQUEST_BYTES`].
    pub fn admit(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        const HOW: &str = "sign requests with director.rpc_secret (X-Sluice-Rpc-Signature: t=<unix>,v1=<HMAC-SHA256>)";
        let Some(value) = headers.get(SIGNATURE_HEADER) else {
            return Err(Rejection::unauthorized(format!("no signature: {HOW}")));
        };
        let Some(t) = value.to_str().ok().and_then(signature_time) else {
            return Err(Rejection::unauthorized(format!("malformed signature: {HOW}")));
        };
        let skew = now_unix().abs_diff(t);
        if skew > MAX_CLOCK_SKEW.as_secs() {
            return Err(Rejection::unauthorized(format!(
                "the signature's time is {skew} s away from the director's clock (at most {} s): check the clocks",
                MAX_CLOCK_SKEW.as_secs()
            )));
        }
        let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BYTES as u64) {
            return Err(Rejection::too_large());
        }
        Ok(())
    }

    /// Check the signature over `body`, then the destinations, then insert.
    pub async fn insert(&self, headers: &HeaderMap, body: Bytes) -> Result<InsertReply, Rejection> {
        self.admit(headers)?;
        if body.len() > MAX_REQUEST_BYTES {
            return Err(Rejection::too_large());
        }
        let header = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let secret = self.secret.clone();
        // Hashing and parsing up to 32 MB: off the async threads.
        let request = tokio::task::spawn_blocking(move || {
            if !secret.verify(&header, &body) {
                return Err(Rejection::unauthorized("wrong signature: routes and directors must share director.rpc_secret"));
            }
            serde_json::from_slice::<InsertRequest>(&body).map_err(|e| Rejection::bad_request(format!("not an insert request: {e}")))
        })
        .await
        .map_err(|e| Rejection::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
        let unknown = self.unknown_destinations(&request.jobs).await;
        if !unknown.is_empty() {
            let mut r = Rejection::new(
                StatusCode::CONFLICT,
                "unknown_destination",
                format!(
                    "{} destination(s) not in this director's control database, e.g. {:?}; nothing was inserted (retry once the catalogs agree)",
                    unknown.len(),
                    unknown[0]
                ),
            );
            r.destinations = unknown.into_iter().take(MAX_IDS_REPORTED).collect();
            return Err(r);
        }
        // The director delivers to the URL *it* has for the destination, never
        // to one a request names: a caller holding the secret still cannot
        // point a destination's signed deliveries elsewhere.
        let centrifuge = self.centrifuge();
        let snap = centrifuge.catalog().snapshot();
        let jobs = request
            .jobs
            .into_iter()
            .map(|mut j| {
                if let Some(d) = snap.destinations.get(&j.destination) {
                    j.endpoint.clone_from(&d.url);
                }
                j.into()
            })
            .collect();
        match centrifuge.insert(jobs, request.oldest_event_ms).await {
            Ok(inserted) => Ok(InsertReply { inserted }),
            Err(e) => {
                tracing::error!(error = %e, "inserting jobs from a route failed");
                Err(Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()))
            }
        }
    }

    /// The destinations of `jobs` the catalog does not have, after one
    /// re-read of the control database (rate-limited) if there are any.
    async fn unknown_destinations(&self, jobs: &[WireJob]) -> Vec<String> {
        let catalog = self.centrifuge().catalog().clone();
        let missing = || {
            let snap = catalog.snapshot();
            let ids: BTreeSet<&str> = jobs.iter().map(|j| j.destination.as_str()).filter(|d| !snap.destinations.contains_key(*d)).collect();
            ids.into_iter().map(str::to_owned).collect::<Vec<_>>()
        };
        let unknown = missing();
        if unknown.is_empty() {
            return unknown;
        }
        {
            // Held across the refresh: concurrent requests wait for it, then look again.
            let mut last = self.last_refresh.lock().await;
            if last.is_none_or(|at| at.elapsed() >= UNKNOWN_REFRESH_EVERY) {
                let c = catalog.clone();
                match tokio::task::spawn_blocking(move || c.refresh()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot re-read the control database"),
                    Err(e) => tracing::warn!(error = %e, "control database refresh task failed"),
                }
                *last = Some(Instant::now());
            }
        }
        let unknown = missing();
        if !unknown.is_empty() {
            tracing::warn!(destinations = ?unknown.iter().take(MAX_IDS_REPORTED).collect::<Vec<_>>(), "refused jobs for destinations not in the control database");
        }
        unknown
    }
}

/// `jobs` as request bodies of at most `max` bytes each, in order. A single
/// job larger than that is an error (it could never be handed over).
pub fn encode_requests(jobs: Vec<WireJob>, oldest_event_ms: i64, max: usize) -> Result<Vec<Vec<u8>>, RouteError> {
    let head = format!("{{\"oldest_event_ms\":{oldest_event_ms},\"jobs\":[");
    const TAIL: &[u8] = b"]}";
    let mut bodies = Vec::new();
    let mut current = head.clone().into_bytes();
    let mut in_current = 0usize;
    for job in jobs {
        let encoded = serde_json::to_vec(&job).map_err(|e| RouteError::Director(format!("encoding a job: {e}")))?;
        if head.len() + encoded.len() + TAIL.len() > max {
            return Err(RouteError::Director(format!(
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

/// TLS to the directors: the CA their certificates are checked against
/// (the system's CAs are not trusted for this link), and a client
/// certificate and key (PEM, concatenated) for directors that require one.
#[derive(Clone)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    pub identity_pem: Option<Vec<u8>>,
}

/// An error and its causes, one after the other (reqwest's own text says
/// only "error sending request").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Hands jobs to the live directors over RPC.
pub struct DirectorClient {
    http: reqwest::Client,
    /// TLS is on: a director announcing an `http://` address is refused.
    tls: bool,
    directory: Directory,
    secret: RpcSecret,
    /// The live directors, re-read at most every second.
    live: Mutex<(Option<Instant>, Vec<DirectorEntry>)>,
}

impl DirectorClient {
    /// With `tls`, directors are reached over HTTPS only, their
    /// certificates checked against `tls.ca_pem`.
    pub fn new(directory: Directory, secret: RpcSecret, tls: Option<ClientTls>) -> Result<Arc<DirectorClient>, RouteError> {
        let setup = |e: &dyn std::error::Error| RouteError::Director(format!("director rpc: TLS setup: {}", with_causes(e)));
        let mut builder =
            reqwest::Client::builder().http2_prior_knowledge().connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(60)).no_proxy();
        if let Some(t) = &tls {
            let cas = reqwest::Certificate::from_pem_bundle(&t.ca_pem).map_err(|e| setup(&e))?;
            if cas.is_empty() {
                return Err(RouteError::Director("director rpc: director.tls_ca_file holds no PEM certificate".into()));
            }
            builder = builder.use_rustls_tls().tls_built_in_root_certs(false).https_only(true);
            for ca in cas {
                builder = builder.add_root_certificate(ca);
            }
            if let Some(pem) = &t.identity_pem {
                builder = builder.identity(reqwest::Identity::from_pem(pem).map_err(|e| setup(&e))?);
            }
        }
        let http = builder.build().map_err(|e| RouteError::Director(format!("http client: {}", with_causes(&e))))?;
        Ok(Arc::new(DirectorClient { http, tls: tls.is_some(), directory, secret, live: Mutex::new((None, Vec::new())) }))
    }

    async fn live_directors(&self, fresh: bool) -> Result<Vec<DirectorEntry>, RouteError> {
        let mut live = self.live.lock().await;
        let stale = live.0.is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if fresh || stale {
            // A director announced without an address is still starting.
            live.1 = self.directory.live(LIVE_AFTER).await?.into_iter().filter(|d| !d.rpc_url.is_empty()).collect();
            live.0 = Some(Instant::now());
        }
        Ok(live.1.clone())
    }

    /// Encode and sign `jobs` (off the async threads), then send each request.
    async fn send(&self, director: &DirectorEntry, jobs: Vec<WireJob>, oldest_event_ms: i64) -> Result<u64, RouteError> {
        let url = format!("{}{INSERT_PATH}", director.rpc_url.trim_end_matches('/'));
        let fail = |e: String| RouteError::Director(format!("director rpc {} ({url}): {e}", director.name));
        if self.tls && !url.starts_with("https://") {
            return Err(fail("refused: a plain-text address while director TLS is on (director.tls_ca_file)".into()));
        }
        let secret = self.secret.clone();
        let signed = tokio::task::spawn_blocking(move || -> Result<Vec<(String, Vec<u8>)>, RouteError> {
            let t = now_unix();
            Ok(encode_requests(jobs, oldest_event_ms, MAX_REQUEST_BYTES)?.into_iter().map(|b| (secret.sign(&b, t), b)).collect())
        })
        .await
        .map_err(|e| fail(e.to_string()))??;
        let mut inserted = 0;
        for (signature, body) in signed {
            let resp = self
                .http
                .post(&url)
                .header(CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, signature)
                .body(body)
                .send()
                .await
                .map_err(|e| fail(with_causes(&e)))?;
            let status = resp.status();
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                let detail = match serde_json::from_str::<ErrorReply>(&text) {
                    Ok(e) if status == StatusCode::UNAUTHORIZED => {
                        format!("{}: {} (is director.rpc_secret the same here and on the director?)", e.code, e.message)
                    }
                    Ok(e) => format!("{}: {}", e.code, e.message),
                    Err(_) => text.chars().take(300).collect(),
                };
                return Err(fail(format!("{status} {detail}")));
            }
            inserted += resp.json::<InsertReply>().await.map_err(|e| fail(e.to_string()))?.inserted;
        }
        Ok(inserted)
    }
}

#[async_trait::async_trait]
impl JobSink for DirectorClient {
    async fn insert_jobs(&self, jobs: Vec<NewJob>, oldest_event_ms: i64) -> Result<(), RouteError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut directors = self.live_directors(false).await?;
        if directors.is_empty() {
            directors = self.live_directors(true).await?;
        }
        if directors.is_empty() {
            return Err(RouteError::Director("no live director in the directory (is a `sluice director` running?)".into()));
        }
        let n = directors.len() as u32;
        let mut by_director: BTreeMap<u32, Vec<WireJob>> = BTreeMap::new();
        for job in jobs {
            let d = sluice_core::partition::partition_for(&job.message_id, n);
            by_director.entry(d).or_default().push(job.into());
        }
        let sends = by_director.into_iter().map(|(d, jobs)| {
            let director = directors[d as usize].clone();
            async move { self.send(&director, jobs, oldest_event_ms).await }
        });
        // Any failure (unreachable, refused, unknown destination) fails the
        // batch: the route retries it from its uncommitted offset.
        for result in futures_util::future::join_all(sends).await {
            if let Err(e) = result {
                // Re-read the directory before the batch is retried.
                let _ = self.live_directors(true).await;
                return Err(e);
            }
        }
        Ok(())
    }
}

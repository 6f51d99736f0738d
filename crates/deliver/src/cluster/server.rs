//! The director's side of `POST /rpc/v1/jobs`: [`RpcServer`] checks a
//! request (signature, size, destinations — the [module doc](super)'s
//! rules) and inserts its jobs; [`serve`] runs it on `director.rpc_listen`
//! (axum, HTTP/2 and HTTP/1, TLS when `director.tls_*` is set) beside this
//! director's heartbeat in the directory.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, StatusCode};
use sluice_core::{Config, Shutdown};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::adoption::open_own_jobdbs;
use super::directory::Directory;
use super::wire::{
    now_unix, signature_time, ErrorReply, InsertReply, InsertRequest, RpcSecret, WireJob, INSERT_PATH, MAX_CLOCK_SKEW, MAX_IDS_REPORTED,
    MAX_REQUEST_BYTES, SIGNATURE_HEADER, UNKNOWN_REFRESH_EVERY,
};
use crate::{Catalog, Centrifuge, DeliverError, DeliverMetrics};

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

    /// The bodies being read already fill [`MAX_UNVERIFIED_BYTES`].
    pub fn busy() -> Rejection {
        Rejection::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{MAX_UNVERIFIED_BYTES} bytes of request bodies are being read or inserted already; try again"),
        )
    }

    /// The JSON body of the answer.
    pub fn body(&self) -> Vec<u8> {
        let reply = ErrorReply { code: self.code.to_owned(), message: self.message.clone(), destinations: self.destinations.clone() };
        serde_json::to_vec(&reply).expect("serializes")
    }
}

/// The server side of `POST /rpc/v1/jobs`, without its HTTP framework: the
/// HTTP handler ([`serve`]) reads the body (bounded) between [`RpcServer::admit`] and
/// [`RpcServer::insert`].
pub struct RpcServer {
    /// The director process's JobDBs; replaced when they are reopened
    /// ([`RpcServer::replace`]).
    centrifuge: std::sync::RwLock<Arc<Centrifuge>>,
    secret: RpcSecret,
    /// The last re-read of the control database caused by an unknown id.
    last_refresh: Mutex<Option<Instant>>,
    /// KiB of request bodies held (read, verified, inserted) at once, at
    /// most [`MAX_UNVERIFIED_BYTES`]: a body is read before its signature
    /// can be checked, so a client without the secret could otherwise make
    /// the director hold any number of 32 MiB bodies.
    body_budget: Arc<tokio::sync::Semaphore>,
}

/// The room a body of `declared` bytes takes, in KiB (unknown: the largest allowed).
fn body_kib(declared: Option<u64>) -> u32 {
    let bytes = declared.map_or(MAX_REQUEST_BYTES as u64, |n| n.min(MAX_REQUEST_BYTES as u64));
    u32::try_from(bytes.div_ceil(1024).max(1)).expect("at most MAX_REQUEST_BYTES")
}

/// Bytes of request bodies a director holds at once (four of the largest
/// requests; a route's requests are usually far smaller).
pub const MAX_UNVERIFIED_BYTES: usize = 4 * MAX_REQUEST_BYTES;

impl RpcServer {
    pub fn new(centrifuge: Arc<Centrifuge>, secret: RpcSecret) -> Arc<RpcServer> {
        Arc::new(RpcServer {
            centrifuge: std::sync::RwLock::new(centrifuge),
            secret,
            last_refresh: Mutex::new(None),
            body_budget: Arc::new(tokio::sync::Semaphore::new(MAX_UNVERIFIED_BYTES / 1024)),
        })
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

    /// Reserve room for a body of `declared` bytes (unknown: the largest
    /// allowed) before reading it, waiting up to `RPC_BODY_TIMEOUT`;
    /// the room is freed when the permit is dropped.
    pub async fn reserve_body(&self, declared: Option<u64>) -> Result<tokio::sync::OwnedSemaphorePermit, Rejection> {
        match tokio::time::timeout(RPC_BODY_TIMEOUT, self.body_budget.clone().acquire_many_owned(body_kib(declared))).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Rejection::busy()),
        }
    }

    /// [`RpcServer::reserve_body`] without waiting.
    pub fn try_reserve_body(&self, declared: Option<u64>) -> Result<tokio::sync::OwnedSemaphorePermit, Rejection> {
        self.body_budget.clone().try_acquire_many_owned(body_kib(declared)).map_err(|_| Rejection::busy())
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

/// Serve `POST /rpc/v1/jobs` on `director.rpc_listen` (HTTP/2 and HTTP/1)
/// and keep this director's heartbeat in the directory. Requests are
/// checked by [`RpcServer`]: signature, size, destinations.
///
/// The heartbeat loop also watches this director's JobDBs: when another
/// director took their locks (it adopted them while this one could not
/// reach the database, whose restart ended this one's lock sessions), they
/// are closed, this director announces itself without an RPC address (so
/// routes skip it and the adopter hands them back), opens them again, and
/// serves again. Without that it would answer `503 the JobDB is closed`
/// until restarted.
pub async fn serve(
    config: &Config,
    rpc: Arc<RpcServer>,
    catalog: Arc<Catalog>,
    metrics: DeliverMetrics,
    directory: Directory,
    stop: Shutdown,
) -> Result<JoinHandle<()>, DeliverError> {
    let d = &config.director;
    let listen = |source| DeliverError::Listen { addr: d.rpc_listen.to_string(), source };
    let listener = tokio::net::TcpListener::bind(&d.rpc_listen).await.map_err(listen)?;
    let addr = listener.local_addr().map_err(listen)?;
    let tls = match (&d.tls_cert_file, &d.tls_key_file) {
        (Some(cert), Some(key)) => {
            let client_ca = d.tls_client_auth.then_some(d.tls_ca_file.as_deref()).flatten();
            Some(sluice_ingest::tls::ServerTls::new("director rpc", cert, key, client_ca, &[b"h2", b"http/1.1"])?)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let rpc_url = d.rpc_url.as_ref().map_or_else(|| format!("{scheme}://{addr}"), |u| u.as_str().to_owned());
    directory.heartbeat(&d.name, &rpc_url).await?;
    tracing::info!(name = %d.name, rpc = %rpc_url, "director registered; serving route RPC");
    let app = axum::Router::new().route(INSERT_PATH, axum::routing::post(insert_jobs)).with_state(rpc.clone());
    let (name, dir2, config) = (d.name.clone(), directory.clone(), config.clone());
    let task = tokio::spawn(async move {
        let stopped = {
            let stop = stop.clone();
            async move { stop.wait().await }
        };
        let server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match tls {
            Some(tls) => {
                let reloader = tls.spawn_reloader(sluice_ingest::tls::RELOAD_EVERY);
                let listener = match sluice_ingest::tls::TlsListener::new(listener, tls) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "director RPC listener failed"),
                };
                Box::pin(async move {
                    let served = axum::serve(listener, app).with_graceful_shutdown(stopped).await;
                    reloader.abort();
                    served
                })
            }
            None => Box::pin(std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(stopped))),
        };
        let heartbeat = async {
            let mut housekeeping = rpc.centrifuge().spawn_housekeeping();
            let mut reopening = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.wait() => break,
                }
                if !reopening && rpc.centrifuge().lock_lost() {
                    tracing::error!(
                        director = %name,
                        "another director took this director's JobDB locks (it adopted them while this one could not reach \
                         the database); closing them, and opening them again once they are handed back"
                    );
                    housekeeping.abort();
                    rpc.centrifuge().close().await;
                    reopening = true;
                }
                if reopening {
                    let reopened = tokio::select! {
                        r = open_own_jobdbs(&config, &catalog, &metrics, &dir2, None) => r,
                        _ = stop.wait() => break,
                    };
                    match reopened {
                        Ok(c) => {
                            housekeeping = c.spawn_housekeeping();
                            rpc.replace(c);
                            reopening = false;
                            tracing::warn!(director = %name, "this director's JobDBs are open again; serving route RPC");
                        }
                        Err(e) => {
                            // The next round tries again (the old, closed JobDBs still answer 503).
                            tracing::error!(director = %name, error = %e, "cannot open this director's JobDBs again");
                            continue;
                        }
                    }
                }
                if let Err(e) = dir2.heartbeat(&name, &rpc_url).await {
                    tracing::warn!(error = %e, "director heartbeat failed");
                }
            }
            housekeeping.abort();
        };
        let (served, ()) = tokio::join!(server, heartbeat);
        if let Err(e) = served {
            tracing::error!(error = %e, "director RPC server failed");
        }
    });
    Ok(task)
}

/// How long a route has to send one RPC request's body (32 MiB at most).
const RPC_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// `POST /rpc/v1/jobs`: the headers are checked before the body is read,
/// and the body is read up to [`MAX_REQUEST_BYTES`].
async fn insert_jobs(
    axum::extract::State(server): axum::extract::State<Arc<RpcServer>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let refuse = |r: Rejection| (r.status, [(http::header::CONTENT_TYPE, "application/json")], r.body()).into_response();
    if let Err(r) = server.admit(&headers) {
        return refuse(r);
    }
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    // Held until the answer: the body's bytes stay in memory until then.
    let _room = match server.reserve_body(declared).await {
        Ok(permit) => permit,
        Err(r) => return refuse(r),
    };
    // A body longer than it declared would overrun the room reserved for it.
    let limit = declared.map_or(MAX_REQUEST_BYTES, |n| (n as usize).min(MAX_REQUEST_BYTES));
    let limited = http_body_util::Limited::new(body, limit);
    // A sender that stalls mid-body does not hold the connection for ever.
    let body = match tokio::time::timeout(RPC_BODY_TIMEOUT, http_body_util::BodyExt::collect(limited)).await {
        Err(_) => return refuse(Rejection::bad_request(format!("body not received within {RPC_BODY_TIMEOUT:?}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return refuse(Rejection::too_large()),
        Ok(Err(e)) => return refuse(Rejection::bad_request(format!("cannot read the body: {e}"))),
    };
    match server.insert(&headers, body).await {
        Ok(reply) => axum::Json(reply).into_response(),
        Err(r) => refuse(r),
    }
}

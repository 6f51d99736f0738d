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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_deliver::directory::{DirectorEntry, Directory};
use sluice_deliver::NewJob;
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
            payload: bytes::Bytes::from(j.payload),
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

pub const INSERT_PATH: &str = "/rpc/v1/jobs";

/// A director is live while its heartbeat is younger than this.
pub const LIVE_AFTER: Duration = Duration::from_secs(10);

/// Hands jobs to the live directors over RPC.
pub struct DirectorClient {
    http: reqwest::Client,
    directory: Directory,
    /// The live directors, re-read at most every second.
    live: Mutex<(Option<Instant>, Vec<DirectorEntry>)>,
}

impl DirectorClient {
    pub fn new(directory: Directory) -> Result<Arc<DirectorClient>, RouteError> {
        let http = reqwest::Client::builder()
            .http2_prior_knowledge()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .map_err(|e| RouteError::Director(format!("http client: {e}")))?;
        Ok(Arc::new(DirectorClient { http, directory, live: Mutex::new((None, Vec::new())) }))
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

    async fn send(&self, director: &DirectorEntry, request: &InsertRequest) -> Result<u64, RouteError> {
        let url = format!("{}{INSERT_PATH}", director.rpc_url.trim_end_matches('/'));
        let fail = |e: String| RouteError::Director(format!("{} ({url}): {e}", director.name));
        let resp = self.http.post(&url).json(request).send().await.map_err(|e| fail(e.to_string()))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(fail(format!("{status}: {}", body.chars().take(300).collect::<String>())));
        }
        Ok(resp.json::<InsertReply>().await.map_err(|e| fail(e.to_string()))?.inserted)
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
            async move { self.send(&director, &InsertRequest { oldest_event_ms, jobs }).await }
        });
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

//! The route's side of `POST /rpc/v1/jobs`: [`DirectorClient`] reads the
//! live directors from the directory, picks one per job
//! (`murmur2(messageId) mod n`, over the directors sorted by name), encodes
//! and signs the requests, and returns once every director has committed
//! its jobs (the [module doc](super)'s rules).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::CONTENT_TYPE;
use http::StatusCode;
use sluice_core::Config;
use tokio::sync::Mutex;

use super::directory::{DirectorEntry, Directory};
use super::wire::{
    encode_requests, now_unix, ErrorReply, InsertReply, RpcSecret, WireJob, INSERT_PATH, LIVE_AFTER, MAX_REQUEST_BYTES, SIGNATURE_HEADER,
};
use crate::{DeliverError, NewJob};

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
    pub fn new(directory: Directory, secret: RpcSecret, tls: Option<ClientTls>) -> Result<Arc<DirectorClient>, DeliverError> {
        let setup = |e: &dyn std::error::Error| DeliverError::Rpc(format!("director rpc: TLS setup: {}", with_causes(e)));
        let mut builder =
            reqwest::Client::builder().http2_prior_knowledge().connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(60)).no_proxy();
        if let Some(t) = &tls {
            let cas = reqwest::Certificate::from_pem_bundle(&t.ca_pem).map_err(|e| setup(&e))?;
            if cas.is_empty() {
                return Err(DeliverError::Rpc("director rpc: director.tls_ca_file holds no PEM certificate".into()));
            }
            builder = builder.use_rustls_tls().tls_built_in_root_certs(false).https_only(true);
            for ca in cas {
                builder = builder.add_root_certificate(ca);
            }
            if let Some(pem) = &t.identity_pem {
                builder = builder.identity(reqwest::Identity::from_pem(pem).map_err(|e| setup(&e))?);
            }
        }
        let http = builder.build().map_err(|e| DeliverError::Rpc(format!("http client: {}", with_causes(&e))))?;
        Ok(Arc::new(DirectorClient { http, tls: tls.is_some(), directory, secret, live: Mutex::new((None, Vec::new())) }))
    }

    async fn live_directors(&self, fresh: bool) -> Result<Vec<DirectorEntry>, DeliverError> {
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
    async fn send(&self, director: &DirectorEntry, jobs: Vec<WireJob>, oldest_event_ms: i64) -> Result<u64, DeliverError> {
        let url = format!("{}{INSERT_PATH}", director.rpc_url.trim_end_matches('/'));
        let fail = |e: String| DeliverError::Rpc(format!("director rpc {} ({url}): {e}", director.name));
        if self.tls && !url.starts_with("https://") {
            return Err(fail("refused: a plain-text address while director TLS is on (director.tls_ca_file)".into()));
        }
        let secret = self.secret.clone();
        let signed = tokio::task::spawn_blocking(move || -> Result<Vec<(String, Vec<u8>)>, DeliverError> {
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

    /// Hand `jobs` to the live directors; returns once every director they
    /// went to has committed them to a JobDB. The route's `JobSink`.
    pub async fn insert(&self, jobs: Vec<NewJob>, oldest_event_ms: i64) -> Result<(), DeliverError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut directors = self.live_directors(false).await?;
        if directors.is_empty() {
            directors = self.live_directors(true).await?;
        }
        if directors.is_empty() {
            return Err(DeliverError::Rpc("no live director in the directory (is a `sluice director` running?)".into()));
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

/// The route's TLS to directors (`director.tls_ca_file`, and its client
/// certificate when set); `None` keeps the RPC in plain text.
pub fn client_tls(config: &Config) -> Result<Option<ClientTls>, DeliverError> {
    let d = &config.director;
    let Some(ca) = &d.tls_ca_file else {
        if d.tls_cert_file.is_some() {
            tracing::warn!(
                "director.tls_cert_file is set but director.tls_ca_file is not: this route talks to directors in plain text \
                 (set tls_ca_file to the CA of the directors' certificates to turn its TLS on)"
            );
        }
        return Ok(None);
    };
    let read = |p: &std::path::Path| {
        sluice_ingest::tls::read_pem(p).map_err(|e| DeliverError::Cluster(format!("director rpc: cannot read {}: {e}", p.display())))
    };
    let identity = match (&d.tls_cert_file, &d.tls_key_file) {
        (Some(cert), Some(key)) => {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            Some(pem)
        }
        _ => None,
    };
    Ok(Some(ClientTls { ca_pem: read(ca)?, identity_pem: identity }))
}

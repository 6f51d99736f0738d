//! Archive: a job past its retry window is written, with its whole history,
//! to object storage (the `object_store` crate: a local directory by
//! default, or S3 / an S3-compatible server) *before* its `archived`
//! transition is recorded. A crash between the two archives it again on
//! restart (same object path: an overwrite). A failed write leaves the job
//! unfinished; its director tries again later.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::prefix::PrefixStore;
use object_store::{local::LocalFileSystem, path::Path as ObjectPath, BackoffConfig, ObjectStore, PutPayload, RetryConfig};
use serde_json::json;
use sluice_core::config::ArchiveTarget;

use crate::store::Transition;
use crate::DeliverError;

#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    pub location: String,
}

/// What the archive holds for one job.
pub struct ArchivedJob<'a> {
    pub id: crate::ksuid::Ksuid,
    pub message_id: &'a str,
    pub source: &'a str,
    pub destination: &'a str,
    pub generation: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub payload: &'a [u8],
    pub history: &'a [Transition],
}

/// The bytes of `path`, a regular file of at most `max` bytes (a CA file:
/// never a FIFO or device to block on, nor a huge file to read into memory).
fn read_small_file(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    if !std::fs::metadata(path).map_err(|e| e.to_string())?.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(max + 1).read_to_end(&mut bytes)).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than {max} bytes: not a CA file"));
    }
    Ok(bytes)
}

/// S3 bucket `bucket` (objects under `prefix`, which may be empty), or a
/// bucket of the S3-compatible server at `endpoint` (`http://` allowed;
/// path-style requests). Credentials, and the region and endpoint when
/// not given, come from the standard `AWS_*` environment variables; the
/// region defaults to `us-east-1`. `ca_file`: a CA (PEM) trusted besides
/// the system's. Nothing is sent until the first request. The archive and
/// `s3` destinations use it.
pub fn s3_store(
    bucket: &str,
    prefix: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
    ca_file: Option<&Path>,
    credentials: Option<(&str, &str)>,
) -> Result<Arc<dyn ObjectStore>, String> {
    // A write is retried briefly here; the director retries a failed one later anyway.
    let retry = RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(10), backoff: BackoffConfig::default() };
    let mut builder = AmazonS3Builder::new();
    if let Some(path) = ca_file {
        let link = |e: &dyn std::fmt::Display| format!("CA file {}: {e}", path.display());
        let pem = read_small_file(path, 1 << 20).map_err(|e| link(&e))?;
        let certs = object_store::Certificate::from_pem_bundle(&pem).map_err(|e| link(&e))?;
        if certs.is_empty() {
            return Err(link(&"no PEM certificate in it"));
        }
        let options = certs.into_iter().fold(object_store::ClientOptions::new(), |o, cert| o.with_root_certificate(cert));
        builder = builder.with_client_options(options);
    }
    match credentials {
        // A destination's own: nothing of the process's environment (its credentials, role or endpoint).
        Some((id, secret)) => builder = builder.with_access_key_id(id).with_secret_access_key(secret),
        // `AmazonS3Builder::from_env`'s reading of `AWS_*`, after the client
        // options it would otherwise replace.
        None => {
            for (name, value) in std::env::vars() {
                if let Some(key) = name.starts_with("AWS_").then(|| name.to_ascii_lowercase().parse().ok()).flatten() {
                    builder = builder.with_config(key, value);
                }
            }
        }
    }
    builder = builder.with_bucket_name(bucket).with_retry(retry);
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(region) = region {
        builder = builder.with_region(region);
    }
    let store = builder.build().map_err(|e| format!("S3 bucket {bucket}: {e}"))?;
    Ok(match prefix.trim_matches('/') {
        "" => Arc::new(store),
        p => Arc::new(PrefixStore::new(store, p)),
    })
}

impl Archive {
    /// A local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Archive, DeliverError> {
        std::fs::create_dir_all(dir).map_err(|source| DeliverError::Io { path: dir.display().to_string(), source })?;
        let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| DeliverError::Archive(e.to_string()))?;
        Ok(Archive { store: Arc::new(store), location: dir.display().to_string() })
    }

    /// S3 bucket `bucket` (objects under `prefix`, which may be empty), or a
    /// bucket of the S3-compatible server at `endpoint` (`http://` allowed;
    /// path-style requests). Credentials, and the region and endpoint when
    /// not given, come from the standard `AWS_*` environment variables
    /// (`AmazonS3Builder::from_env`); the region defaults to `us-east-1`.
    /// `ca_file`: a CA (PEM, one or more certificates) trusted besides the
    /// system's, for an S3-compatible server with its own CA. An `https://`
    /// endpoint is never reached over plain HTTP.
    /// Nothing is sent until the first write.
    pub fn s3(bucket: &str, prefix: &str, endpoint: Option<&str>, region: Option<&str>, ca_file: Option<&Path>) -> Result<Archive, DeliverError> {
        let store = s3_store(bucket, prefix, endpoint, region, ca_file, None).map_err(|e| DeliverError::Archive(format!("s3 archive: {e}")))?;
        let mut location = format!("s3://{bucket}/{}", prefix.trim_matches('/'));
        if let Some(e) = endpoint {
            location.push_str(&format!(" (at {e})"));
        }
        Ok(Archive { store, location })
    }

    /// The archive `target` names (see `deliver.archive_url`).
    pub fn open(target: &ArchiveTarget) -> Result<Archive, DeliverError> {
        match target {
            ArchiveTarget::Local(dir) => Self::local(dir),
            ArchiveTarget::S3 { bucket, prefix, endpoint, region, ca_file } => {
                Self::s3(bucket, prefix, endpoint.as_deref(), region.as_deref(), ca_file.as_deref())
            }
        }
    }

    /// The archive a (validated) configuration names.
    pub fn from_config(config: &sluice_core::Config) -> Result<Archive, DeliverError> {
        Self::open(&config.archive_target())
    }

    /// `<destination>/<YYYY-MM-DD of created_at>/<ksuid>.json` (under the S3 prefix, if any).
    pub fn object_path(destination: &str, created_at: i64, id: crate::ksuid::Ksuid) -> String {
        let day = chrono::DateTime::from_timestamp_millis(created_at).map(|d| d.format("%Y-%m-%d").to_string()).unwrap_or_default();
        format!("{destination}/{day}/{id}.json")
    }

    pub async fn put(&self, job: &ArchivedJob<'_>) -> Result<String, DeliverError> {
        let payload: serde_json::Value = serde_json::from_slice(job.payload).unwrap_or_else(|_| json!(String::from_utf8_lossy(job.payload)));
        let history: Vec<_> = job
            .history
            .iter()
            .map(|t| {
                json!({"seq": t.seq, "state": t.state.as_str(), "at": t.at, "attempt": t.attempt,
                       "status": t.status, "error": t.error, "retry_at": t.retry_at})
            })
            .collect();
        let doc = json!({
            "id": job.id.to_string(), "message_id": job.message_id, "source": job.source,
            "destination": job.destination, "generation": job.generation,
            "created_at": job.created_at, "expires_at": job.expires_at,
            "payload": payload, "transitions": history,
        });
        let path = Self::object_path(job.destination, job.created_at, job.id);
        let bytes = serde_json::to_vec_pretty(&doc).expect("JSON serializes");
        self.store.put(&ObjectPath::from(path.as_str()), PutPayload::from(bytes)).await.map_err(|e| {
            // The causes too: a refused certificate is only named in them.
            let mut text = format!("{}: {e}", self.location);
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                let c_text = c.to_string();
                if !text.contains(&c_text) {
                    text.push_str(&format!(": {c_text}"));
                }
                cause = c.source();
            }
            DeliverError::Archive(text)
        })?;
        Ok(path)
    }
}

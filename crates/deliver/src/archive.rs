//! Archive: a job past its retry window is written, with its whole history,
//! to object storage (the `object_store` crate; a local directory by
//! default) *before* its `archived` transition is recorded. A crash between
//! the two archives it again on restart (same object path: an overwrite).

use std::path::Path;
use std::sync::Arc;

use object_store::{local::LocalFileSystem, path::Path as ObjectPath, ObjectStore, PutPayload};
use serde_json::json;

use crate::jobdb::Transition;
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

impl Archive {
    /// A local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Archive, DeliverError> {
        std::fs::create_dir_all(dir).map_err(|source| DeliverError::Io { path: dir.display().to_string(), source })?;
        let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| DeliverError::Archive(e.to_string()))?;
        Ok(Archive { store: Arc::new(store), location: dir.display().to_string() })
    }

    /// `<destination>/<YYYY-MM-DD of created_at>/<ksuid>.json`.
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
        self.store
            .put(&ObjectPath::from(path.as_str()), PutPayload::from(bytes))
            .await
            .map_err(|e| DeliverError::Archive(e.to_string()))?;
        Ok(path)
    }
}

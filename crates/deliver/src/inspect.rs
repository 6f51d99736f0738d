//! Read-only views of the JobDBs for `sluice jobs inspect|stats`. They open
//! each JobDB read-only, so they work while `sluice serve` runs (WAL mode
//! lets readers see the last commit without blocking the writer).

use std::collections::BTreeMap;
use std::path::Path;

use crate::jobdb::{list_jobdbs, JobDb, JobState, StoredJob, Transition};
use crate::DeliverError;

/// A job found by `inspect`, with the JobDB it lives in and its history.
pub struct Found {
    pub jobdb: String,
    pub job: StoredJob,
    pub history: Vec<Transition>,
}

/// Every job whose KSUID or messageId is `key`, across the JobDBs in `dir`.
pub fn find(dir: &Path, key: &str) -> Result<Vec<Found>, DeliverError> {
    let mut out = Vec::new();
    for (_, path) in list_jobdbs(dir)? {
        let db = match JobDb::open_read_only(&path) {
            Ok(db) => db,
            Err(e) => {
                tracing::warn!(jobdb = %path.display(), error = %e, "skipping a JobDB that cannot be opened (dropped meanwhile?)");
                continue;
            }
        };
        let found = db.find(key).and_then(|jobs| {
            jobs.into_iter()
                .map(|job| Ok(Found { jobdb: path.display().to_string(), history: db.history(job.id)?, job }))
                .collect::<Result<Vec<_>, DeliverError>>()
        });
        match found {
            Ok(f) => out.extend(f),
            // Deleted while we read it: every job in it had finished.
            Err(_) if !path.exists() => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Counts per destination and state, across the JobDBs in `dir`; plus the number of JobDBs.
pub fn stats(dir: &Path) -> Result<(usize, BTreeMap<String, BTreeMap<&'static str, u64>>), DeliverError> {
    let dbs = list_jobdbs(dir)?;
    let mut out: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for (_, path) in &dbs {
        let Ok(db) = JobDb::open_read_only(path) else { continue };
        match db.stats() {
            Ok(rows) => {
                for (dest, state, n) in rows {
                    *out.entry(dest).or_default().entry(state.as_str()).or_default() += n;
                }
            }
            Err(_) if !path.exists() => continue, // dropped while we read it
            Err(e) => return Err(e),
        }
    }
    Ok((dbs.len(), out))
}

pub fn state_names() -> impl Iterator<Item = &'static str> {
    JobState::ALL.into_iter().map(JobState::as_str)
}

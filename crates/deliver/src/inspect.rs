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
        for job in db.find(key)? {
            let history = db.history(job.id)?;
            out.push(Found { jobdb: path.display().to_string(), job, history });
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
        for (dest, state, n) in db.stats()? {
            *out.entry(dest).or_default().entry(state.as_str()).or_default() += n;
        }
    }
    Ok((dbs.len(), out))
}

pub fn state_names() -> impl Iterator<Item = &'static str> {
    JobState::ALL.into_iter().map(JobState::as_str)
}

//! Read-only views of the JobDBs for `sluice jobs inspect|stats` and the
//! admin API's job inspector (`GET /api/jobs/{key}`), both through
//! [`find_in`] / [`stats_in`] on the process's [`JobDbs`]. They open
//! each JobDB read-only (no lock, nothing created), so they work while
//! `sluice serve` runs: SQLite's WAL lets readers see the last commit
//! without blocking the writer, and the SQL servers do the same. A JobDB
//! dropped while it is read (every job in it finished) is skipped. In a
//! database server they read every scope: `sluice serve`'s JobDBs and each
//! `sluice director`'s (`<name>_jobs_NNNNNN`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::JobDbs;
use crate::store::{JobState, StoredJob, Transition};
use crate::DeliverError;

/// Job counts: destination → state → jobs.
pub type StateCounts = BTreeMap<String, BTreeMap<&'static str, u64>>;

/// A job found by `inspect`, with the JobDB it lives in and its history.
pub struct Found {
    pub jobdb: String,
    pub job: StoredJob,
    pub history: Vec<Transition>,
}

/// Every job whose KSUID or messageId is `key`, across the JobDB files in
/// `dir` ([`find_in`] for files only; tests use it).
pub fn find(dir: &Path, key: &str) -> Result<Vec<Found>, DeliverError> {
    find_in(&JobDbs::Files(dir.to_owned()), key)
}

/// Every job whose KSUID or messageId is `key`, across `jobdbs`.
pub fn find_in(jobdbs: &JobDbs, key: &str) -> Result<Vec<Found>, DeliverError> {
    let mut out = Vec::new();
    for (scope, seqs) in listed_scopes(jobdbs)? {
        out.extend(find_in_scope(&scope, seqs, key)?);
    }
    Ok(out)
}

/// Every scope of `jobdbs` with its JobDBs. In a database, a director's
/// scope whose registry cannot be read is skipped with a warning (red
/// team: a table of another application named `*_jobdb_registry` made
/// every lookup fail); `jobdbs`' own scope's error is the answer.
fn listed_scopes(jobdbs: &JobDbs) -> Result<Vec<(JobDbs, Vec<u64>)>, DeliverError> {
    let mut out = Vec::new();
    for scope in jobdbs.every_scope()? {
        let own = scope.describe() == jobdbs.describe() && scope.name(1) == jobdbs.name(1);
        match scope.list_blocking() {
            Ok(seqs) => out.push((scope, seqs)),
            Err(e) if !own => tracing::warn!(error = %e, "skipping a JobDB registry that cannot be read (another application's table?)"),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn find_in_scope(jobdbs: &JobDbs, seqs: Vec<u64>, key: &str) -> Result<Vec<Found>, DeliverError> {
    let mut out = Vec::new();
    for seq in seqs {
        let name = jobdbs.name(seq);
        let mut db = match jobdbs.open_read_only(seq) {
            Ok(db) => db,
            Err(e) => {
                tracing::warn!(jobdb = %name, error = %e, "skipping a JobDB that cannot be opened (dropped meanwhile?)");
                continue;
            }
        };
        let found = db.find(key).and_then(|jobs| {
            jobs.into_iter().map(|job| Ok(Found { jobdb: name.clone(), history: db.history(job.id)?, job })).collect::<Result<Vec<_>, DeliverError>>()
        });
        match found {
            Ok(f) => out.extend(f),
            // Deleted while we read it: every job in it had finished.
            Err(_) if !jobdbs.exists_blocking(seq) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Counts per destination and state, across the JobDB files in `dir`; plus the number of JobDBs.
pub fn stats(dir: &Path) -> Result<(usize, StateCounts), DeliverError> {
    stats_in(&JobDbs::Files(dir.to_owned()))
}

/// Counts per destination and state, across `jobdbs`; plus the number of JobDBs.
pub fn stats_in(jobdbs: &JobDbs) -> Result<(usize, StateCounts), DeliverError> {
    let mut out = StateCounts::new();
    let mut count = 0;
    for (scope, seqs) in listed_scopes(jobdbs)? {
        count += stats_in_scope(&scope, seqs, &mut out)?;
    }
    Ok((count, out))
}

fn stats_in_scope(jobdbs: &JobDbs, seqs: Vec<u64>, out: &mut StateCounts) -> Result<usize, DeliverError> {
    for &seq in &seqs {
        let Ok(mut db) = jobdbs.open_read_only(seq) else { continue };
        match db.stats() {
            Ok(rows) => {
                for (dest, state, n) in rows {
                    *out.entry(dest).or_default().entry(state.as_str()).or_default() += n;
                }
            }
            Err(_) if !jobdbs.exists_blocking(seq) => continue, // dropped while we read it
            Err(e) => return Err(e),
        }
    }
    Ok(seqs.len())
}

pub fn state_names() -> impl Iterator<Item = &'static str> {
    JobState::ALL.into_iter().map(JobState::as_str)
}

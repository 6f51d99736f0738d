//! Scopes, adoption and hand-back: each director's JobDBs are its own
//! scope of `deliver.jobdb_url` (`CentrifugeOptions::scope` = its
//! `director.name`), held through the director locks; a director whose
//! heartbeat went stale has its scope opened by another one
//! ([`adopt_dead_directors`]), which closes it again — releasing the locks —
//! once the owner announces itself ([`open_own_jobdbs`]). The rules are in
//! the [module doc](super).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::{Config, Shutdown};
use tokio::task::JoinHandle;

use super::directory::Directory;
use super::wire::LIVE_AFTER;
use crate::{Catalog, Centrifuge, CentrifugeOptions, DeliverError, DeliverMetrics};

/// This director's scope of `deliver.jobdb_url`. While another director
/// holds it (it adopted our JobDBs while we were down), keep announcing
/// ourselves without an RPC address, so it hands them back, and retry, for
/// `give_up_after` at most (`None`: until it works). At startup (a bound
/// is given) a live director of the same name is refused.
pub async fn open_own_jobdbs(
    config: &Config,
    catalog: &Arc<Catalog>,
    metrics: &DeliverMetrics,
    directory: &Directory,
    give_up_after: Option<Duration>,
) -> Result<Arc<Centrifuge>, DeliverError> {
    let name = &config.director.name;
    if give_up_after.is_some() {
        if let Some(other) = directory.live(LIVE_AFTER).await?.into_iter().find(|d| &d.name == name && !d.rpc_url.is_empty()) {
            return Err(DeliverError::Cluster(format!(
                "a director named {name:?} is already running at {} (director.name must be unique)",
                other.rpc_url
            )));
        }
    }
    let mut options = CentrifugeOptions::from_config(config);
    options.scope = name.clone();
    let mut waited = Duration::ZERO;
    loop {
        let announced = directory.heartbeat(name, "").await;
        if give_up_after.is_some() {
            announced?;
        }
        match Centrifuge::open(options.clone(), catalog.clone(), metrics.clone()).await {
            Ok(c) => return Ok(c),
            Err(DeliverError::SqlLocked { .. }) if give_up_after.is_none_or(|bound| waited < bound) => {
                if waited.is_zero() || waited.as_secs() % 60 == 0 {
                    tracing::warn!(director = %name, "this director's JobDBs are held by another director (adopted while we were down); waiting for it to hand them back");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                waited += Duration::from_secs(2);
            }
            Err(e) => return Err(DeliverError::OwnJobDbs(Box::new(e))),
        }
    }
}

/// Serve the JobDBs of directors that died: when a director's heartbeat is
/// older than [`LIVE_AFTER`] and its JobDB locks can be
/// taken (its database sessions are gone), open its scope here; its
/// directors reload the unfinished jobs and send them (jobs that were
/// `executing` at its death are sent again: the crash window). When its
/// owner announces itself again, close the scope, which releases the locks.
pub async fn adopt_dead_directors(config: Config, catalog: Arc<Catalog>, metrics: DeliverMetrics, directory: Directory, stop: Shutdown) {
    let me = config.director.name.clone();
    let mut adopted: BTreeMap<String, (Arc<Centrifuge>, JoinHandle<()>)> = Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait() => break,
        }
        let entries = match directory.all().await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the directory of directors");
                continue;
            }
        };
        let now = chrono::Utc::now().timestamp_millis();
        for entry in entries.into_iter().filter(|e| e.name != me) {
            let alive = now - entry.heartbeat_ms < LIVE_AFTER.as_millis() as i64;
            match (alive, adopted.contains_key(&entry.name)) {
                (false, false) => {
                    let mut options = CentrifugeOptions::from_config(&config);
                    options.scope = entry.name.clone();
                    match Centrifuge::open(options, catalog.clone(), metrics.clone()).await {
                        Ok(c) => {
                            tracing::warn!(director = %entry.name, "director is gone: serving its JobDBs here");
                            let housekeeping = c.spawn_housekeeping();
                            adopted.insert(entry.name.clone(), (c, housekeeping));
                        }
                        Err(e) => tracing::debug!(director = %entry.name, error = %e, "cannot adopt (yet)"),
                    }
                }
                (true, true) => {
                    if let Some((c, housekeeping)) = adopted.remove(&entry.name) {
                        housekeeping.abort();
                        c.close().await;
                        tracing::info!(director = %entry.name, "director is back: handed its JobDBs back");
                    }
                }
                _ => {}
            }
        }
    }
    for (_, (c, housekeeping)) in adopted {
        housekeeping.abort();
        c.close().await;
    }
}

//! Keeping the live catalog and the Tracking API's source table in step
//! with the control database.
//!
//! Invariant: the Tracking API accepts exactly the catalog's enabled
//! sources; every refresh of the catalog (the timer here, or an admin API
//! change) is followed by [`apply_sources`].

use std::sync::Arc;

use sluice_core::config::SourceConfig;
use sluice_deliver::control::REFRESH_INTERVAL;
use tokio::task::JoinHandle;

use crate::AdminState;

/// Give the Tracking API the catalog's enabled sources (unchanged sources
/// keep their rate-limit buckets: `Ingest::set_sources`).
pub fn apply_sources(s: &AdminState) {
    let enabled: Vec<SourceConfig> = s.catalog.snapshot().sources.iter().filter(|(_, disabled)| !disabled).map(|(src, _)| src.clone()).collect();
    if let Some(ingest) = &s.ingest {
        ingest.set_sources(&enabled, s.default_rate_limit);
    }
}

/// Re-read the control database every [`REFRESH_INTERVAL`] so changes made
/// by SQL (QoS, connections, sources) or by another process apply within
/// seconds; the admin API refreshes at once after its own changes.
pub fn spawn_catalog_refresher(admin: Arc<AdminState>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH_INTERVAL).await;
            let a = admin.clone();
            match tokio::task::spawn_blocking(move || a.catalog.refresh().map(|()| apply_sources(&a))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot re-read the control database"),
                Err(e) => tracing::error!(error = %e, "control database refresh task failed"),
            }
        }
    })
}

//! A replay's earlier part: the events a workspace left in the cells it was
//! moved out of (issue 15: "replays after a migration cover events from
//! both cells' logs").
//!
//! The cell that serves a workspace asks its control plane where the
//! workspace was before (`GET /api/cells/{id}/history/{workspace}`: one
//! migration per earlier cell, with that migration's token), then reads
//! each earlier cell's `output` through that cell's
//! `/cell/migrations/{id}/history` (`mover.rs`), partition by partition, in
//! pages. The earlier cell serves only the workspace's sources' records,
//! and only to the migration's token, which it checks against its control
//! plane (the migration may have ended long ago).
//!
//! Invariants:
//! - Each earlier cell is read once per replay, whatever number of moves
//!   left from it: its `output` holds the workspace's events of every stay.
//! - Dedup put each event of the workspace in exactly one cell's `output`
//!   (the moves carried the keys), so the parts never overlap.
//! - A page is read at most [`TRIES`] times; then the stream ends with the
//!   error, and the replay says which cell could not be read.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sluice_log::StoredRecord;
use sluice_route::{EarlierBatch, History};
use tokio::sync::mpsc;

use crate::agent::CellAgent;

/// Attempts per page before the replay's earlier part fails.
pub const TRIES: u32 = 5;

/// The control plane's answer: where the workspace was.
#[derive(Debug, Deserialize)]
struct Whereabouts {
    earlier: Vec<Earlier>,
}

#[derive(Debug, Deserialize)]
struct Earlier {
    migration: String,
    cell: String,
    admin_url: String,
    token: String,
}

/// One page of an earlier cell's `output`.
#[derive(Debug, Deserialize)]
pub struct Page {
    pub partitions: u32,
    pub records: Vec<PageRecord>,
    /// Where the next page starts.
    pub next: u64,
    /// Where the partition ended when this page was read.
    pub end: u64,
}

#[derive(Debug, Deserialize, serde::Serialize)]
pub struct PageRecord {
    pub offset: u64,
    pub key: String,
    pub value: String,
    pub ts: i64,
}

/// The history a cell with a control plane reads.
pub struct CellHistory {
    agent: Arc<CellAgent>,
}

impl CellHistory {
    pub fn new(agent: Arc<CellAgent>) -> CellHistory {
        CellHistory { agent }
    }
}

impl History for CellHistory {
    fn earlier(&self, workspace: &str, since_ms: i64) -> mpsc::Receiver<Result<EarlierBatch, String>> {
        let (tx, rx) = mpsc::channel(2);
        let (agent, workspace) = (self.agent.clone(), workspace.to_owned());
        tokio::spawn(async move {
            if let Err(e) = read_all(&agent, &workspace, since_ms, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }
}

async fn read_all(agent: &CellAgent, workspace: &str, since_ms: i64, tx: &mpsc::Sender<Result<EarlierBatch, String>>) -> Result<(), String> {
    let url = agent.url(&format!("history/{workspace}"));
    let resp = agent.http.get(&url).bearer_auth(&agent.token).send().await.map_err(|e| format!("the control plane did not answer: {e}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(format!("the control plane answered {status}: {}", text.chars().take(300).collect::<String>()));
    }
    let whereabouts: Whereabouts = resp.json().await.map_err(|e| format!("the control plane's history answer: {e}"))?;
    for e in whereabouts.earlier {
        let mut partitions = 1;
        let mut p = 0;
        while p < partitions {
            let mut from = 0;
            let mut end = None;
            loop {
                let page = page(agent, &e, p, from, since_ms).await.map_err(|why| format!("cell {}'s log: {why}", e.cell))?;
                partitions = page.partitions;
                let stop_at = *end.get_or_insert(page.end);
                let records: Vec<StoredRecord> = page
                    .records
                    .into_iter()
                    .filter(|r| r.offset < stop_at)
                    .map(|r| StoredRecord {
                        offset: r.offset,
                        timestamp_ms: r.ts,
                        key: r.key.into_bytes().into(),
                        value: r.value.into_bytes().into(),
                    })
                    .collect();
                if !records.is_empty() && tx.send(Ok(EarlierBatch { cell: e.cell.clone(), partition: p, records })).await.is_err() {
                    return Ok(());
                }
                if page.next >= stop_at || page.next <= from {
                    break;
                }
                from = page.next;
            }
            p += 1;
        }
        tracing::info!(workspace, cell = %e.cell, migration = %e.migration, "an earlier cell's part of a replay was read");
    }
    Ok(())
}

/// One page, tried up to [`TRIES`] times.
async fn page(agent: &CellAgent, e: &Earlier, partition: u32, from: u64, since_ms: i64) -> Result<Page, String> {
    let url = format!("{}/cell/migrations/{}/history", e.admin_url.trim_end_matches('/'), e.migration);
    let mut wait = Duration::from_millis(200);
    let mut last = String::new();
    for _ in 0..TRIES {
        let sent = agent
            .http
            .get(&url)
            .bearer_auth(&e.token)
            .query(&[("partition", partition as i64), ("from", from as i64), ("since_ms", since_ms)])
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return r.json::<Page>().await.map_err(|e| format!("not a history page: {e}")),
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                return Err(format!("{status}: {}", r.text().await.unwrap_or_default().chars().take(300).collect::<String>()));
            }
            Ok(r) => last = format!("answered {}", r.status()),
            Err(err) => last = format!("did not answer: {err}"),
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    Err(last)
}

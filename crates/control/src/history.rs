//! A replay's earlier part: the events a workspace left in the cells it was
//! moved out of (issue 15: "replays after a migration cover events from
//! both cells' logs").
//!
//! The cell that serves a workspace asks its control plane where the
//! workspace was before (`GET /api/cells/{id}/history/{workspace}`: one
//! ended migration per earlier cell, the workspace's sources, and for each
//! earlier cell a *history token*), then reads each earlier cell's `output`
//! through that cell's `/cell/migrations/{id}/history` (`mover.rs`),
//! partition by partition, in pages. The earlier cell serves only the
//! named sources' records, and only to a token it computes itself:
//! HMAC-SHA256 keyed by the SHA-256 of its own cell token (which the
//! control plane keeps) over the migration, the workspace and the sources
//! ([`history_token`]). So it needs no call to the control plane to check
//! one (nothing an outsider sends makes it call out), and the token reads
//! that cell's history of that workspace, nothing else.
//!
//! Invariants:
//! - Each earlier cell is read once per replay, whatever number of moves
//!   left from it: its `output` holds the workspace's events of every stay.
//! - Dedup put each event of the workspace in exactly one cell's `output`
//!   (the moves carried the keys), so the parts never overlap.
//! - A page is read at most [`TRIES`] times, each within [`PAGE_TIMEOUT`];
//!   then the stream ends with the error, and the replay says which cell
//!   could not be read. The control plane's answer comes first, so a
//!   replay it refuses (the workspace is moving) fails before it routes
//!   anything.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use sluice_log::StoredRecord;
use sluice_route::{EarlierBatch, History};
use tokio::sync::mpsc;

use crate::agent::CellAgent;

/// Attempts per page before the replay's earlier part fails.
pub const TRIES: u32 = 3;
/// How long one page may take.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The token that reads `workspace`'s `sources` in the history of the cell
/// whose token hashes to `cell_key`, for migration `migration`.
pub fn history_token(cell_key: &[u8], migration: &str, workspace: &str, sources: &[String]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(cell_key).expect("HMAC takes any key length");
    mac.update(format!("sluice history\n{migration}\n{workspace}\n{}", sources.join(",")).as_bytes());
    format!("hist_{}", hex::encode(mac.finalize().into_bytes()))
}

/// The control plane's answer: where the workspace was.
#[derive(Debug, Deserialize)]
struct Whereabouts {
    sources: Vec<String>,
    earlier: Vec<Earlier>,
    #[serde(default)]
    retired: Vec<String>,
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
    for cell in &whereabouts.retired {
        tracing::warn!(workspace, %cell, "a replay skips a retired cell the workspace left: its log went with it");
    }
    let sources = whereabouts.sources.join(",");
    for e in whereabouts.earlier {
        let mut partitions = 1;
        let mut p = 0;
        while p < partitions {
            let mut from = 0;
            let mut end = None;
            loop {
                let page = page(agent, &e, workspace, &sources, p, from, since_ms).await.map_err(|why| format!("cell {}'s log: {why}", e.cell))?;
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
#[allow(clippy::too_many_arguments)]
async fn page(agent: &CellAgent, e: &Earlier, workspace: &str, sources: &str, partition: u32, from: u64, since_ms: i64) -> Result<Page, String> {
    let url = format!("{}/cell/migrations/{}/history", e.admin_url.trim_end_matches('/'), e.migration);
    let mut wait = Duration::from_millis(200);
    let mut last = String::new();
    for _ in 0..TRIES {
        let sent = agent
            .http
            .get(&url)
            .bearer_auth(&e.token)
            .timeout(PAGE_TIMEOUT)
            .query(&[("partition", partition.to_string()), ("from", from.to_string()), ("since_ms", since_ms.to_string())])
            .query(&[("workspace", workspace), ("sources", sources)])
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return r.json::<Page>().await.map_err(|e| format!("not a history page: {e}")),
            Ok(r) if r.status().is_client_error() && !matches!(r.status().as_u16(), 408 | 409 | 429) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_token_reads_one_cells_history_of_one_workspace_and_its_sources() {
        let s1 = vec!["s1".to_owned()];
        let t = history_token(b"cell-a-key", "m1", "ws", &s1);
        assert!(t.starts_with("hist_") && t.len() == 5 + 64, "{t}");
        assert_eq!(t, history_token(b"cell-a-key", "m1", "ws", &s1));
        let others = [
            history_token(b"cell-b-key", "m1", "ws", &s1),
            history_token(b"cell-a-key", "m2", "ws", &s1),
            history_token(b"cell-a-key", "m1", "ws2", &s1),
            history_token(b"cell-a-key", "m1", "ws", &["s1".to_owned(), "s2".to_owned()]),
        ];
        for other in others {
            assert_ne!(t, other);
        }
    }
}

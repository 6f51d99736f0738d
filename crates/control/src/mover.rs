//! The cell's side of moving a workspace between cells
//! (docs/plans/MIGRATION.md): as the *source*, copy the workspace's dedup
//! keys to the target (a snapshot of the indexes, then the tail of `input`),
//! fence a step's buckets and open them on the target; as the *target*,
//! take keys into its own log and open buckets when told. Both keep
//! ingest's bucket gate as their role requires.
//!
//! Invariants:
//! - The gate is written to `data_dir/migrations/gate.json` (whole, then
//!   renamed) on every change and read back before ingest listens, so a
//!   restarted cell never accepts a bucket its gate had closed.
//! - The source opens a step on the target only after: its gate closed the
//!   step's buckets (so nothing more of them is appended), ingest's spool
//!   (a Kafka cell's) is empty, every key of
//!   `input` up to the end it read *after* closing was sent, and the target
//!   answered each send once its key records were durable. So every event
//!   the source ever acknowledged in those buckets is known to the target
//!   before the target accepts one of them.
//! - Keys are read from the indexes through RocksDB secondary instances
//!   (`sluice_dedup::index::export_ids`) after dedup has consumed `input`
//!   up to where the tail starts: snapshot and tail overlap, never leave a
//!   gap. Sending a key twice is harmless (dedup drops the repeat).
//! - The key and open endpoints on the admin port take the migration's own
//!   token (the control plane gives it to the two cells only).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_core::bucket::{free_side, Side};
use sluice_core::topics::{DEDUP_GROUP, FORGET_RECORD, INPUT, KEY_RECORD, OUTPUT, ROUTE_GROUP};
use sluice_core::{bucket_for, partition_for, BucketSet, Shutdown};
use sluice_ingest::gate::GateEntry;
use sluice_ingest::request::ApiError;
use sluice_ingest::tokens::{bearer, token_matches};
use sluice_ingest::Ingest;
use sluice_log::{Log, Record};
use tokio::sync::watch;

use crate::agent::CellAgent;

/// How often the task list is read.
pub const POLL_EVERY: Duration = Duration::from_millis(200);
/// How long the drain must look complete before it is reported so.
const DRAINED_FOR: Duration = Duration::from_secs(3);
/// Keys per send to the target.
const KEYS_PER_SEND: usize = 20_000;
/// Input records read per partition per tail pass.
const TAIL_BATCH: usize = 5_000;
/// The largest key upload the target takes.
const MAX_KEYS_BODY: usize = 8 << 20;

/// What the mover needs of its cell.
pub struct CellParts {
    /// The cell's log (the target appends key records to `input`; the source tails it).
    pub log: Arc<dyn Log>,
    pub ingest: Arc<Ingest>,
    /// Where this process's dedup indexes are (`<dir>/<partition>`); `None`
    /// when dedup runs in another process (a Kafka cell's roles).
    pub index_dir: Option<PathBuf>,
    /// Dedup's window: older ids are not taken along.
    pub window: Duration,
    /// `data_dir/migrations`: the gate's file, scratch space for snapshots.
    pub state_dir: PathBuf,
    /// Ingest's spool (a Kafka cell): events it acknowledged may wait there
    /// before they reach `input`; a fence waits until it is empty.
    pub spool: Option<Arc<sluice_ingest::spool::Spool>>,
    /// The workspace of a source, as this cell's configuration has it now
    /// (a source added during a move may reach ingest before the task list shows it).
    pub workspace_of_source: Box<dyn Fn(&str) -> Option<String> + Send + Sync>,
    /// Whether the cell still has a source of the workspace (its configuration not yet caught up with a move).
    pub has_workspace: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// The QoS rows of a workspace's destinations here: destination id → row (as `/api/qos` shows it).
    pub workspace_qos: Box<dyn Fn(&str) -> serde_json::Map<String, serde_json::Value> + Send + Sync>,
    /// Apply QoS rows a source sent for a workspace (blocking: a control-database write).
    pub apply_qos: Arc<dyn Fn(&str, serde_json::Map<String, serde_json::Value>) -> Result<(), QosRefused> + Send + Sync>,
    /// Unfinished jobs of a workspace's destinations (pending and spilled), for the drain:
    /// this process's gauges (cheap, about a second behind; none when directors run elsewhere).
    pub unfinished_jobs: Box<dyn Fn(&str) -> u64 + Send + Sync>,
    /// The same counted in the cell's JobDBs (every director's; blocking: it reads them all),
    /// the drain's last word.
    pub unfinished_in_jobdbs: Arc<dyn Fn(&str) -> Result<u64, String> + Send + Sync>,
}

/// Why QoS rows were not applied.
#[derive(Debug)]
pub enum QosRefused {
    /// A destination this cell does not have (yet: its feed may be behind); the source retries.
    NotYet(String),
    /// Not a QoS row, or a destination of another workspace.
    Invalid(String),
}

/// One migration as the control plane hands it to this cell.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Task {
    pub id: String,
    pub workspace: String,
    pub role: String,
    pub phase: String,
    pub step: usize,
    pub moved: BucketSet,
    pub fenced: BucketSet,
    pub token: String,
    pub peer: String,
    pub peer_admin_url: String,
    pub sources: Vec<String>,
    /// The most keys per second the snapshot sends (none: no limit).
    #[serde(default)]
    pub copy_rate: Option<u64>,
}

/// The source's progress, reported to the control plane.
#[derive(Debug, Clone, Default, Serialize)]
struct SourceProgress {
    /// When this report was made (the driver acts on fresh ones only).
    at_ms: i64,
    snapshot_done: bool,
    keys_sent: u64,
    /// `input` records past the tail's position (of every workspace).
    tail_lag: Option<u64>,
    cutover_done_step: Option<usize>,
    drained: bool,
    pending_jobs: Option<u64>,
    cleanup: serde_json::Value,
    error: String,
}

/// The target's progress.
#[derive(Debug, Clone, Default, Serialize)]
struct TargetProgress {
    ready: bool,
    keys_imported: u64,
    opened_step: Option<usize>,
}

#[derive(Default)]
struct Book {
    tasks: HashMap<String, Task>,
    /// Exporters running (source role), with the channel that tells them the task's changes.
    exporters: HashMap<String, (watch::Sender<Task>, tokio::task::JoinHandle<()>)>,
    sources: HashMap<String, SourceProgress>,
    targets: HashMap<String, TargetProgress>,
    /// Buckets the target opened ahead of the store (a step its source finished): migration → (step, buckets).
    opened: HashMap<String, (usize, BucketSet)>,
    /// Where the drain started: `input`'s and `output`'s ends when the source's last step was cut over.
    drain_from: HashMap<String, (Vec<u64>, Vec<u64>)>,
    /// Since when the drain has looked complete, without a break.
    drained_since: HashMap<String, std::time::Instant>,
    /// Cleanups running (source role).
    cleanups: HashMap<String, tokio::task::JoinHandle<()>>,
}

/// The mover of one cell.
pub struct Mover {
    agent: Arc<CellAgent>,
    parts: CellParts,
    state: Mutex<Book>,
    /// One gate change at a time (each is persisted).
    gate_writes: tokio::sync::Mutex<()>,
    /// When the task list was last read on a request's behalf.
    refreshed: Mutex<Option<std::time::Instant>>,
}

/// Output records read per history page.
const HISTORY_PAGE: usize = 2_000;
/// The most event bytes in one history page (the page ends early past it).
const HISTORY_PAGE_BYTES: usize = 4 << 20;

#[derive(Serialize, Deserialize, Default)]
struct GateFile {
    entries: HashMap<String, (BucketSet, bool)>,
}

impl Mover {
    /// The mover, with the gate its file kept (set before ingest serves).
    pub async fn new(agent: Arc<CellAgent>, parts: CellParts) -> Result<Arc<Mover>, String> {
        tokio::fs::create_dir_all(&parts.state_dir).await.map_err(|e| format!("{}: {e}", parts.state_dir.display()))?;
        let file = parts.state_dir.join("gate.json");
        match tokio::fs::read(&file).await {
            Ok(bytes) => {
                let kept: GateFile = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
                for (workspace, (buckets, free)) in kept.entries {
                    tracing::info!(%workspace, %buckets, free, "a migration's gate, as it was when this cell stopped");
                    parts.ingest.gate.set(&workspace, Some(GateEntry { buckets, free })).await;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", file.display())),
        }
        Ok(Arc::new(Mover { agent, parts, state: Mutex::default(), gate_writes: tokio::sync::Mutex::new(()), refreshed: Mutex::default() }))
    }

    /// Set `workspace`'s gate entry (`None`: remove it) and keep it on
    /// disk. When it returns, no request admitted under the old entry is
    /// still appending.
    async fn apply_gate(&self, workspace: &str, entry: Option<GateEntry>) -> Result<(), String> {
        let _one = self.gate_writes.lock().await;
        let gate = &self.parts.ingest.gate;
        if gate.entries().get(workspace).copied() == entry {
            return Ok(());
        }
        // On disk first: a crash after closing must not reopen on restart.
        let mut entries: HashMap<String, (BucketSet, bool)> = gate.entries().into_iter().map(|(w, e)| (w, (e.buckets, e.free))).collect();
        match entry {
            Some(e) => entries.insert(workspace.to_owned(), (e.buckets, e.free)),
            None => entries.remove(workspace),
        };
        let file = self.parts.state_dir.join("gate.json");
        let body = serde_json::to_vec(&GateFile { entries }).map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || write_whole(&file, &body)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        gate.set(workspace, entry).await;
        tracing::info!(%workspace, entry = ?entry, "migration gate set");
        Ok(())
    }

    /// Follow this cell's migrations until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: Shutdown) -> tokio::task::JoinHandle<()> {
        let mover = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                match mover.tick().await {
                    Ok(()) if failing => {
                        tracing::info!("migration tasks are read again");
                        failing = false;
                    }
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "cannot read or report this cell's migrations; trying again");
                        failing = true;
                    }
                    _ => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(POLL_EVERY) => {}
                    _ = stop.wait() => break,
                }
            }
            let exporters: Vec<_> = mover.state.lock().expect("mover lock").exporters.drain().map(|(_, (_, h))| h).collect();
            for h in exporters {
                h.abort();
            }
        })
    }

    async fn fetch_tasks(&self) -> Result<Vec<Task>, String> {
        let a = &self.agent;
        let resp =
            a.http.get(a.url("migrations")).bearer_auth(&a.token).send().await.map_err(|e| format!("the control plane did not answer: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("the control plane answered {}", resp.status()));
        }
        #[derive(Deserialize)]
        struct Tasks {
            migrations: Vec<Task>,
        }
        Ok(resp.json::<Tasks>().await.map_err(|e| format!("the control plane's migration list: {e}"))?.migrations)
    }

    /// One look: apply every task, report, forget ended ones.
    async fn tick(self: &Arc<Self>) -> Result<(), String> {
        let tasks = self.fetch_tasks().await?;
        let ended: Vec<Task> = {
            let mut st = self.state.lock().expect("mover lock");
            let ids: std::collections::HashSet<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
            let ended: Vec<Task> = st.tasks.values().filter(|t| !ids.contains(t.id.as_str())).cloned().collect();
            for t in &ended {
                st.tasks.remove(&t.id);
                st.opened.remove(&t.id);
                st.sources.remove(&t.id);
                st.targets.remove(&t.id);
                st.drain_from.remove(&t.id);
                st.drained_since.remove(&t.id);
                st.cleanups.remove(&t.id);
                if let Some((_, h)) = st.exporters.remove(&t.id) {
                    h.abort();
                }
            }
            for t in &tasks {
                st.tasks.insert(t.id.clone(), t.clone());
            }
            ended
        };
        // A workspace may have an ended migration and a new one listed (moved here, then on):
        // only the one in progress decides its gate.
        let moving: std::collections::HashSet<String> =
            tasks.iter().filter(|t| !matches!(t.phase.as_str(), "done" | "aborted")).map(|t| t.workspace.clone()).collect();
        for t in ended.into_iter().filter(|t| !moving.contains(&t.workspace)) {
            // Gone from the list minutes after it ended: the configuration caught up long ago.
            tracing::info!(migration = %t.id, workspace = %t.workspace, role = %t.role, "migration forgotten here");
            self.apply_gate(&t.workspace, None).await?;
        }
        // Entries no task explains (kept in gate.json by a run before a restart, their migration
        // long over): the workspace is this cell's whole, or not this cell's at all.
        let listed: std::collections::HashSet<&str> = tasks.iter().map(|t| t.workspace.as_str()).collect();
        let leftovers: Vec<String> = self.parts.ingest.gate.entries().into_keys().filter(|w| !listed.contains(w.as_str())).collect();
        for w in leftovers {
            tracing::info!(workspace = %w, "a migration gate no migration explains now; removed");
            self.apply_gate(&w, None).await?;
        }
        for t in tasks {
            if matches!(t.phase.as_str(), "done" | "aborted") {
                if moving.contains(&t.workspace) {
                    continue;
                }
                // The side that keeps the workspace opens it whole; the side that lost it keeps it
                // closed (421: routers route again) until its configuration no longer has it
                // (red team: removing the gate at once let the old side accept events meanwhile).
                let keeps = (t.phase == "done") == (t.role == "target");
                let entry = (!keeps && (self.parts.has_workspace)(&t.workspace)).then_some(GateEntry { buckets: BucketSet::NONE, free: false });
                self.apply_gate(&t.workspace, entry).await?;
                if let Some((_, h)) = self.state.lock().expect("mover lock").exporters.remove(&t.id) {
                    h.abort();
                }
                continue;
            }
            let report = if t.role == "target" { self.as_target(&t).await? } else { self.as_source(&t).await? };
            self.report(&t.id, report).await?;
        }
        Ok(())
    }

    async fn report(&self, id: &str, report: serde_json::Value) -> Result<(), String> {
        let a = &self.agent;
        let resp = a
            .http
            .post(a.url(&format!("migrations/{id}/report")))
            .bearer_auth(&a.token)
            .json(&report)
            .send()
            .await
            .map_err(|e| format!("the control plane did not answer: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("the control plane answered {} to a migration report", resp.status()));
        }
        Ok(())
    }

    /// The target's gate: the moved buckets, and a step its source opened ahead of the store.
    fn target_entry(&self, t: &Task) -> GateEntry {
        let opened = self.state.lock().expect("mover lock").opened.get(&t.id).filter(|(step, _)| *step == t.step).map(|(_, b)| *b);
        let moved = t.moved.union(opened.unwrap_or_default().intersect(t.fenced));
        let fenced = t.fenced.minus(moved);
        GateEntry { buckets: moved, free: free_side(moved, fenced) == Some(Side::Target) }
    }

    async fn as_target(&self, t: &Task) -> Result<serde_json::Value, String> {
        self.apply_gate(&t.workspace, Some(self.target_entry(t))).await?;
        let mut st = self.state.lock().expect("mover lock");
        let p = st.targets.entry(t.id.clone()).or_default();
        p.ready = true;
        Ok(serde_json::to_value(&*p).expect("plain data"))
    }

    async fn as_source(self: &Arc<Self>, t: &Task) -> Result<serde_json::Value, String> {
        match t.phase.as_str() {
            "copying" => {
                self.apply_gate(&t.workspace, Some(source_entry(t.moved, BucketSet::NONE))).await?;
                self.ensure_exporter(t);
            }
            // The exporter closes the fenced buckets itself (then reads where `input` ends).
            "cutover" => self.ensure_exporter(t),
            "draining" | "cleanup" => {
                self.apply_gate(&t.workspace, Some(GateEntry { buckets: BucketSet::NONE, free: false })).await?;
                if let Some((tx, _)) = self.state.lock().expect("mover lock").exporters.get(&t.id) {
                    let _ = tx.send(t.clone());
                }
                let drained = self.drained(t).await?;
                let cleaned = {
                    let mut st = self.state.lock().expect("mover lock");
                    let p = st.sources.entry(t.id.clone()).or_default();
                    p.drained = drained.0;
                    p.pending_jobs = Some(drained.1);
                    p.cleanup["done"] == true
                };
                if t.phase == "cleanup" && drained.0 && !cleaned {
                    // On a task of its own: counting and waiting for dedup must not hold up this
                    // cell's other migrations (review). One at a time per migration.
                    let mut st = self.state.lock().expect("mover lock");
                    if st.cleanups.get(&t.id).is_none_or(|h| h.is_finished()) {
                        let (mover, task) = (self.clone(), t.clone());
                        st.cleanups.insert(
                            t.id.clone(),
                            tokio::spawn(async move {
                                let report = match mover.clean_up(&task).await {
                                    Ok(r) => r,
                                    Err(e) => json!({ "done": false, "error": e }),
                                };
                                mover.progress(&task.id, |p| p.cleanup = report);
                            }),
                        );
                    }
                }
            }
            _ => {}
        }
        let mut p = self.state.lock().expect("mover lock").sources.get(&t.id).cloned().unwrap_or_default();
        p.at_ms = sluice_core::clock::now_ms();
        Ok(serde_json::to_value(p).expect("plain data"))
    }

    /// Whether the source has delivered what it holds of the workspace:
    /// dedup and route have read `input` and `output` to where they ended
    /// when the drain began, and no job of its destinations is unfinished.
    async fn drained(&self, t: &Task) -> Result<(bool, u64), String> {
        let log = &self.parts.log;
        let known = self.state.lock().expect("mover lock").drain_from.get(&t.id).cloned();
        let (input, output) = match known {
            Some(f) => f,
            None => {
                let ends = (topic_ends(log.as_ref(), INPUT).await?, topic_ends(log.as_ref(), OUTPUT).await?);
                self.state.lock().expect("mover lock").drain_from.insert(t.id.clone(), ends.clone());
                ends
            }
        };
        let caught_up = read_past(log.as_ref(), DEDUP_GROUP, INPUT, &input).await? && read_past(log.as_ref(), ROUTE_GROUP, OUTPUT, &output).await?;
        let mut pending = (self.parts.unfinished_jobs)(&t.workspace);
        // The job gauges are refreshed about once a second: drained only when every look for
        // DRAINED_FOR said so (review: a job just inserted could read as none yet).
        let now = std::time::Instant::now();
        let since = {
            let mut st = self.state.lock().expect("mover lock");
            if caught_up && pending == 0 {
                *st.drained_since.entry(t.id.clone()).or_insert(now)
            } else {
                st.drained_since.remove(&t.id);
                now
            }
        };
        if !(caught_up && pending == 0 && now.duration_since(since) >= DRAINED_FOR) {
            return Ok((false, pending));
        }
        // The gauges say drained: the JobDBs must say so too (directors in other processes,
        // jobs waiting for a retry). At most one count per DRAINED_FOR.
        let (count, workspace) = (self.parts.unfinished_in_jobdbs.clone(), t.workspace.clone());
        let in_jobdbs = tokio::task::spawn_blocking(move || count(&workspace)).await.map_err(|e| e.to_string())?;
        match in_jobdbs {
            Ok(0) => return Ok((true, 0)),
            Ok(n) => pending = n,
            Err(e) => tracing::warn!(migration = %t.id, error = %e, "cannot count the workspace's unfinished jobs in the JobDBs; the drain waits"),
        }
        self.state.lock().expect("mover lock").drained_since.remove(&t.id);
        Ok((false, pending))
    }

    /// Remove what this cell (the source) holds of a workspace that moved:
    /// its sources' dedup ids (forget records through `input`, so the
    /// dedup worker that owns each index deletes them), and say what went.
    async fn clean_up(&self, t: &Task) -> Result<serde_json::Value, String> {
        let log = &self.parts.log;
        let parts = log.partitions(INPUT).map_err(|e| e.to_string())?;
        let prefixes: Vec<Vec<u8>> = t.sources.iter().map(|s| format!("{s}/").into_bytes()).collect();
        // Counted first (through secondaries: the workers keep going), for the report.
        let counted = match self.parts.index_dir.clone() {
            Some(dir) => {
                let (scratch, window, prefixes) = (self.parts.state_dir.join(format!("scratch-{}", t.id)), self.parts.window, prefixes.clone());
                tokio::task::spawn_blocking(move || -> Result<u64, String> {
                    let mut n = 0;
                    for p in 0..parts {
                        n += sluice_dedup::index::export_ids(&dir.join(p.to_string()), &scratch.join(p.to_string()), &prefixes, window, |_, _| true)
                            .map_err(|e| e.to_string())?;
                    }
                    let _ = std::fs::remove_dir_all(&scratch);
                    Ok(n)
                })
                .await
                .map_err(|e| e.to_string())??
            }
            None => 0,
        };
        for p in 0..parts {
            let forget: Vec<Record> =
                prefixes.iter().map(|k| Record { key: Bytes::from(k.clone()), value: Bytes::from_static(FORGET_RECORD) }).collect();
            log.append(INPUT, p, forget).await.map_err(|e| e.to_string())?;
        }
        // Done when dedup has read past them on every partition.
        let ends = topic_ends(log.as_ref(), INPUT).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !read_past(log.as_ref(), DEDUP_GROUP, INPUT, &ends).await? {
            if tokio::time::Instant::now() > deadline {
                return Err("dedup has not read the forget records within 2 minutes".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(migration = %t.id, workspace = %t.workspace, dedup_ids = counted, "cleanup: the workspace's dedup ids are deleted here");
        Ok(json!({
            "done": true,
            "dedup_ids_deleted": counted,
            "log_records": "left to the log's retention (neither the embedded log nor Kafka deletes single records)",
            "jobs": "all finished (the drain); their rows go when their JobDB is dropped whole (JobDBs are append-only)",
        }))
    }

    fn ensure_exporter(self: &Arc<Self>, t: &Task) {
        let mut st = self.state.lock().expect("mover lock");
        if let Some((tx, h)) = st.exporters.get(&t.id) {
            if !h.is_finished() {
                let _ = tx.send(t.clone());
                return;
            }
        }
        let (tx, rx) = watch::channel(t.clone());
        let mover = self.clone();
        let id = t.id.clone();
        let handle = tokio::spawn(async move {
            loop {
                match mover.export(rx.clone()).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(migration = %id, error = %e, "copying a workspace's keys failed; starting over in 2 s");
                        mover.state.lock().expect("mover lock").sources.entry(id.clone()).or_default().error = e;
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        });
        st.exporters.insert(t.id.clone(), (tx, handle));
    }

    fn progress(&self, id: &str, f: impl FnOnce(&mut SourceProgress)) {
        f(self.state.lock().expect("mover lock").sources.entry(id.to_owned()).or_default());
    }

    /// The source's copy: snapshot, tail, and each step's fence. Returns once every bucket moved.
    async fn export(self: &Arc<Self>, mut task: watch::Receiver<Task>) -> Result<(), String> {
        let t = task.borrow().clone();
        let Some(index_dir) = self.parts.index_dir.clone() else {
            return Err("this cell's dedup runs in another process (a Kafka cell's roles): moving a workspace out of it is not built yet".into());
        };
        let log = self.parts.log.clone();
        if !log.extra_inputs().is_empty() {
            return Err("this cell's dedup also reads a secondary Kafka cluster's input: moving a workspace out of it is not built yet".into());
        }
        // A fresh start: what an earlier run reported says nothing about this one.
        self.progress(&t.id, |p| {
            p.snapshot_done = false;
            p.tail_lag = None;
        });
        let parts = log.partitions(INPUT).map_err(|e| e.to_string())?;
        let sources: Vec<Vec<u8>> = t.sources.iter().map(|s| format!("{s}/").into_bytes()).collect();
        // 1. Where `input` ends (E0), and dedup past it. With Kafka, the ids of dedup's last
        //    transaction may be held in memory until its next one (`resume_point`, read once dedup
        //    is past E0): the tail starts there, so it carries them. Everything before the tail's
        //    start is in the index by then, and the snapshot (taken after) holds it.
        let mut pos = Vec::new();
        for p in 0..parts {
            let range = log.offsets(INPUT, p).await.map_err(|e| e.to_string())?;
            // Every partition with events must have its index here (a cell whose dedup is split over processes is not supported yet).
            let here = tokio::fs::try_exists(index_dir.join(p.to_string()).join("CURRENT")).await.unwrap_or(false);
            if range.end > range.start && !here {
                return Err(format!("partition {p}'s dedup index is not in this process: moving a workspace out of a cell whose dedup runs in several processes is not built yet"));
            }
            pos.push(range.end);
        }
        while !read_past(log.as_ref(), DEDUP_GROUP, INPUT, &pos).await? {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (p, at) in pos.iter_mut().enumerate() {
            if let Some(unconfirmed) = log.resume_point(DEDUP_GROUP, INPUT, p as u32).await.map_err(|e| e.to_string())? {
                *at = (*at).min(unconfirmed);
            }
        }
        // 2. The snapshot, partition by partition, through a bounded channel to the sender.
        // Chunks go as ready request bodies (`<key>\t<ms>` lines): the runtime that serves
        // this cell's ingest only sends them.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<u8>, u64)>(4);
        let (window, scratch, moved, id) = (self.parts.window, self.parts.state_dir.join(format!("scratch-{}", t.id)), t.moved, t.id.clone());
        let reader = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let _ = std::fs::remove_dir_all(&scratch);
            let mut chunk = KeyLines::default();
            let mut total = 0;
            for p in 0..parts {
                let mut closed = false;
                sluice_dedup::index::export_ids(&index_dir.join(p.to_string()), &scratch.join(p.to_string()), &sources, window, |key, ts| {
                    let Ok(key) = std::str::from_utf8(key) else { return true };
                    if key.split_once('/').is_some_and(|(_, m)| moved.contains(bucket_for(m))) {
                        return true;
                    }
                    chunk.push(key, ts);
                    total += 1;
                    if chunk.keys >= KEYS_PER_SEND as u64 {
                        closed = tx.blocking_send(std::mem::take(&mut chunk).into_body()).is_err();
                    }
                    !closed
                })
                .map_err(|e| e.to_string())?;
                if closed {
                    return Err("the sender stopped".into());
                }
            }
            if chunk.keys > 0 {
                tx.blocking_send(chunk.into_body()).map_err(|_| "the sender stopped".to_owned())?;
            }
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(total)
        });
        let (began, mut sent) = (tokio::time::Instant::now(), 0u64);
        while let Some((body, n)) = rx.recv().await {
            self.post_to_target(&t, "keys", "keys", body).await?;
            self.progress(&id, |p| p.keys_sent += n);
            sent += n;
            // An operator's limit (`copy_rate`) spares the two cells' other workspaces the copy's load.
            if let Some(rate) = t.copy_rate.filter(|r| *r > 0) {
                tokio::time::sleep_until(began + Duration::from_secs_f64(sent as f64 / rate as f64)).await;
            }
        }
        let snapshot = reader.await.map_err(|e| e.to_string())??;
        tracing::info!(migration = %t.id, workspace = %t.workspace, keys = snapshot, "snapshot of the workspace's keys sent");
        self.send_qos(&t).await?;
        self.progress(&id, |p| p.snapshot_done = true);
        // 3. The tail, and each step's fence.
        let mut fenced_step: Option<usize> = None;
        loop {
            let t = task.borrow_and_update().clone();
            if !matches!(t.phase.as_str(), "copying" | "cutover") {
                return Ok(());
            }
            let read = self.tail(&t, &mut pos).await?;
            if t.phase == "cutover" && fenced_step != Some(t.step) {
                // Close the step's buckets; when this returns, nothing more of them is being appended.
                self.apply_gate(&t.workspace, Some(source_entry(t.moved, t.fenced))).await?;
                // Acknowledged into the spool counts as acknowledged: those events must reach `input` first.
                if let Some(spool) = &self.parts.spool {
                    // Only what was spooled before the gate closed (other workspaces keep spooling meanwhile).
                    let marks = spool.ends().await.map_err(|e| e.to_string())?;
                    while !spool.drained_past(&marks).await.map_err(|e| e.to_string())? {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                let ends = topic_ends(log.as_ref(), INPUT).await?;
                while pos.iter().zip(&ends).any(|(at, end)| at < end) {
                    self.tail(&t, &mut pos).await?;
                }
                // Again: an operator may have paused a destination here since the snapshot.
                self.send_qos(&t).await?;
                self.open_on_target(&t).await?;
                fenced_step = Some(t.step);
                self.progress(&t.id, |p| p.cutover_done_step = Some(t.step));
                tracing::info!(migration = %t.id, step = t.step, buckets = %t.fenced, "step fenced here, keys sent, opened on the target");
                continue;
            }
            if read == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = task.changed() => {}
                }
            }
        }
    }

    /// One pass over `input` from `pos`: send the workspace's keys of buckets not moved. Returns records read.
    async fn tail(&self, t: &Task, pos: &mut [u64]) -> Result<usize, String> {
        let log = &self.parts.log;
        let mut keys = Vec::new();
        let mut read = 0;
        let mut lag = 0;
        for (p, at) in pos.iter_mut().enumerate() {
            let batch = log.read_batch(INPUT, p as u32, *at, TAIL_BATCH).await.map_err(|e| e.to_string())?;
            read += batch.records.len();
            for r in &batch.records {
                let Ok(key) = std::str::from_utf8(&r.key) else { continue };
                let Some((source, message_id)) = key.split_once('/') else { continue };
                if sluice_core::topics::is_internal_record(&r.value)
                    || !t.sources.iter().any(|s| s == source)
                    || t.moved.contains(bucket_for(message_id))
                {
                    continue;
                }
                keys.push((key.to_owned(), r.timestamp_ms.max(0) as u64));
            }
            *at = batch.next.max(*at);
            lag += log.offsets(INPUT, p as u32).await.map_err(|e| e.to_string())?.end.saturating_sub(*at);
        }
        for chunk in keys.chunks(KEYS_PER_SEND) {
            let mut lines = KeyLines::default();
            for (key, ms) in chunk {
                lines.push(key, *ms);
            }
            let (body, n) = lines.into_body();
            self.post_to_target(t, "keys", "keys", body).await?;
            self.progress(&t.id, |p| p.keys_sent += n);
        }
        self.progress(&t.id, |p| p.tail_lag = Some(lag));
        Ok(read)
    }

    async fn open_on_target(&self, t: &Task) -> Result<(), String> {
        let body = json!({ "step": t.step, "buckets": t.fenced }).to_string().into_bytes();
        self.post_to_target(t, "open", &format!("to open step {}", t.step), body).await
    }

    /// Send the workspace's destination QoS rows (pause, in-flight and rate
    /// limits, priority) as this cell has them: the target applies them
    /// before it opens any bucket.
    async fn send_qos(&self, t: &Task) -> Result<(), String> {
        let rows = (self.parts.workspace_qos)(&t.workspace);
        self.post_to_target(t, "qos", "QoS", serde_json::Value::Object(rows).to_string().into_bytes()).await
    }

    /// POST `body` to the target's `/cell/migrations/{id}/{path}` until it
    /// answers 2xx; a 4xx other than 409 ("not yet") is final.
    async fn post_to_target(&self, t: &Task, path: &str, what: &str, body: Vec<u8>) -> Result<(), String> {
        let mut wait = Duration::from_millis(50);
        loop {
            // The target's address as the task list has it now: a target restarted elsewhere is found again.
            let peer = self.state.lock().expect("mover lock").tasks.get(&t.id).map_or_else(|| t.peer_admin_url.clone(), |t| t.peer_admin_url.clone());
            let url = format!("{}/cell/migrations/{}/{path}", peer.trim_end_matches('/'), t.id);
            match self.agent.http.post(&url).bearer_auth(&t.token).body(body.clone()).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if r.status().is_client_error() && r.status() != StatusCode::CONFLICT => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    return Err(format!("the target refused {what}: {status} {}", text.chars().take(300).collect::<String>()));
                }
                Ok(r) => tracing::debug!(status = %r.status(), "the target cannot take {what} yet; retrying"),
                Err(e) => tracing::debug!(error = %e, "the target did not answer; retrying"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    /// Read the task list now, unless it was read within the last 100 ms
    /// (requests from outside cannot make this cell call the control plane at will).
    async fn refresh(&self) {
        {
            let mut last = self.refreshed.lock().expect("refresh lock");
            if last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        if let Ok(tasks) = self.fetch_tasks().await {
            let mut st = self.state.lock().expect("mover lock");
            for t in tasks {
                st.tasks.insert(t.id.clone(), t);
            }
        }
    }

    /// The task `id`, if this cell plays `role` in it and `headers` carry
    /// its token. `fresh`: read the task list again first (for its phase),
    /// once the token matched what this cell knows.
    async fn authorized(&self, id: &str, role: &str, headers: &HeaderMap, fresh: bool) -> Result<Task, ApiError> {
        let find = || self.state.lock().expect("mover lock").tasks.get(id).cloned();
        let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <the migration's token>");
        // A token is needed before anything else happens.
        let Some(token) = bearer(headers).map(str::to_owned) else { return Err(refused()) };
        let mut task = find();
        if task.is_none() {
            // A task newer than the last poll (the source may be a poll ahead of this cell).
            self.refresh().await;
            task = find();
        }
        let Some(mut task) = task else {
            // Not known here (yet): the sender retries on 409.
            return Err(ApiError::new(StatusCode::CONFLICT, "unknown_migration", "this cell does not know that migration (yet); retry"));
        };
        if !token_matches(&token, &task.token) {
            return Err(refused());
        }
        if fresh {
            self.refresh().await;
            task = find().unwrap_or(task);
        }
        if task.role != role {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("this cell is the {} of that migration", task.role)));
        }
        Ok(task)
    }

    /// The task `id` for a source's keys or QoS rows: this cell its target,
    /// `headers` its token, and the migration still copying or fenced (after
    /// the last cutover nothing may change them: 410).
    async fn copying_target(&self, id: &str, headers: &HeaderMap) -> Result<Task, ApiError> {
        let task = self.authorized(id, "target", headers, false).await?;
        if !matches!(task.phase.as_str(), "copying" | "cutover") {
            return Err(ApiError::new(StatusCode::GONE, "moved", format!("the migration is {}: it takes nothing more", task.phase)));
        }
        Ok(task)
    }

    /// The cell-to-cell endpoints, for the admin port (outside its `/api` guard: the migration's token is their authentication).
    pub fn routes(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/cell/migrations/{id}/keys", post(take_keys))
            .route("/cell/migrations/{id}/open", post(open_step))
            .route("/cell/migrations/{id}/qos", post(take_qos))
            .route("/cell/migrations/{id}/history", axum::routing::get(history_page))
            .with_state(self.clone())
    }
}

/// Where each partition of `topic` ends now.
async fn topic_ends(log: &dyn Log, topic: &str) -> Result<Vec<u64>, String> {
    let mut ends = Vec::new();
    for p in 0..log.partitions(topic).map_err(|e| e.to_string())? {
        ends.push(log.offsets(topic, p).await.map_err(|e| e.to_string())?.end);
    }
    Ok(ends)
}

/// Whether `group` has read every partition of `topic` up to `ends` (a
/// partition it never committed counts from its start).
async fn read_past(log: &dyn Log, group: &str, topic: &str, ends: &[u64]) -> Result<bool, String> {
    for (p, end) in ends.iter().enumerate() {
        let at = match log.committed(group, topic, p as u32).await.map_err(|e| e.to_string())? {
            Some(c) => c,
            None => log.offsets(topic, p as u32).await.map_err(|e| e.to_string())?.start,
        };
        if at < *end {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The source's gate: what is neither moved nor fenced.
/// A `/keys` request body being built: `<source>/<messageId>\t<ms>` lines.
#[derive(Default)]
struct KeyLines {
    body: Vec<u8>,
    keys: u64,
}

impl KeyLines {
    fn push(&mut self, key: &str, ms: u64) {
        use std::io::Write;
        if self.keys > 0 {
            self.body.push(b'\n');
        }
        let _ = write!(self.body, "{key}\t{ms}");
        self.keys += 1;
    }

    fn into_body(self) -> (Vec<u8>, u64) {
        (self.body, self.keys)
    }
}

fn source_entry(moved: BucketSet, fenced: BucketSet) -> GateEntry {
    GateEntry { buckets: BucketSet::ALL.minus(moved).minus(fenced), free: free_side(moved, fenced) == Some(Side::Source) }
}

/// `POST /cell/migrations/{id}/keys`: lines of `<source>/<messageId>\t<ms>`, appended as key records.
async fn take_keys(State(mover): State<Arc<Mover>>, Path(id): Path<String>, headers: HeaderMap, body: axum::body::Body) -> Response {
    let task = match mover.copying_target(&id, &headers).await {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let body = match read_limited(body, MAX_KEYS_BODY).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // Parsing 20,000 lines is CPU work: off the runtime that answers this cell's ingest.
    let parse = {
        let mover = mover.clone();
        tokio::task::spawn_blocking(move || key_records(&mover, &task, &body))
    };
    let (by_partition, n) = match parse.await {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(e)) => return e.into_response(),
        Err(_) => return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "keys could not be read; retry").into_response(),
    };
    let log = &mover.parts.log;
    let appends = by_partition.into_iter().map(|(p, recs)| log.append(INPUT, p, recs));
    for r in futures_util::future::join_all(appends).await {
        if let Err(e) = r {
            tracing::warn!(migration = %id, error = %e, "cannot append imported keys; the source sends them again");
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "keys could not be stored; retry").into_response();
        }
    }
    mover.state.lock().expect("mover lock").targets.entry(id).or_default().keys_imported += n;
    axum::Json(json!({ "imported": n })).into_response()
}

/// The key records of a `/keys` body, by `input` partition, and their number.
fn key_records(mover: &Mover, task: &Task, body: &[u8]) -> Result<(HashMap<u32, Vec<Record>>, u64), ApiError> {
    let Ok(text) = std::str::from_utf8(body) else { return Err(ApiError::bad_request("invalid", "keys are UTF-8 lines")) };
    let partitions = mover.parts.log.partitions(INPUT).map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()))?;
    let mut by_partition: HashMap<u32, Vec<Record>> = HashMap::new();
    let mut n = 0u64;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let (key, ms) = line.split_once('\t').unwrap_or((line, ""));
        let mut known = false;
        if let Some((source, _)) = key.split_once('/') {
            known = task.sources.iter().any(|s| s == source) || (mover.parts.workspace_of_source)(source).as_deref() == Some(task.workspace.as_str());
            if !known && sluice_core::config::valid_id(source) {
                // A source added during the move that this cell's task list does not show yet: the sender retries.
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "unknown_source",
                    format!("line {}: source {source:?} is not known here yet; retry", i + 1),
                ));
            }
        }
        let ok = key.split_once('/').filter(|(_, m)| known && !m.is_empty() && m.chars().count() <= 100 && !m.chars().any(char::is_control));
        let (Some((_, message_id)), Ok(ms)) = (ok, ms.parse::<u64>()) else {
            return Err(ApiError::bad_request("invalid", format!("line {}: not <source of the workspace>/<messageId>\\t<ms>", i + 1)));
        };
        let value = [KEY_RECORD, ms.to_string().as_bytes()].concat();
        by_partition
            .entry(partition_for(message_id, partitions))
            .or_default()
            .push(Record { key: Bytes::copy_from_slice(key.as_bytes()), value: Bytes::from(value) });
        n += 1;
    }
    Ok((by_partition, n))
}

/// `POST /cell/migrations/{id}/qos`: the source's QoS rows of the workspace's destinations.
async fn take_qos(State(mover): State<Arc<Mover>>, Path(id): Path<String>, headers: HeaderMap, body: axum::body::Body) -> Response {
    let task = match mover.copying_target(&id, &headers).await {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let body = match read_limited(body, 1 << 20).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let Ok(rows) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body) else {
        return ApiError::bad_request("invalid_json", "{\"<destination>\": {QoS row}, ...}").into_response();
    };
    let (apply, workspace, n) = (mover.parts.apply_qos.clone(), task.workspace.clone(), rows.len());
    match tokio::task::spawn_blocking(move || apply(&workspace, rows)).await {
        Ok(Ok(())) => axum::Json(json!({ "applied": n })).into_response(),
        Ok(Err(QosRefused::NotYet(why))) => ApiError::new(StatusCode::CONFLICT, "unknown_destination", why).into_response(),
        Ok(Err(QosRefused::Invalid(why))) => ApiError::bad_request("invalid", why).into_response(),
        Err(e) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    partition: u32,
    #[serde(default)]
    from: u64,
    #[serde(default)]
    since_ms: i64,
    workspace: String,
    /// The workspace's source ids, comma-separated (as the token was made for them).
    sources: String,
}

/// `GET /cell/migrations/{id}/history?partition=&from=&since_ms=`: a page
/// of this cell's `output` holding the moved workspace's events (its
/// sources' records at or after `since_ms`; key records and other
/// workspaces' events skipped), for a replay on the cell it moved to.
async fn history_page(
    State(mover): State<Arc<Mover>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    // The token first (checked here, from this cell's own token: no call out), then the query.
    let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <the history token the control plane gave>");
    let Some(token) = bearer(&headers).map(str::to_owned) else { return refused().into_response() };
    let Ok(axum::extract::Query(q)) = query else {
        return ApiError::bad_request("invalid", "?partition=<n>&from=<offset>&since_ms=<ms>&workspace=<id>&sources=<ids>").into_response();
    };
    let sources: Vec<String> = q.sources.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect();
    let own_key = sluice_cells::store::key_hash(&mover.agent.token);
    if !token_matches(&token, &crate::history::history_token(&own_key, &id, &q.workspace, &sources)) {
        return refused().into_response();
    }
    let log = &mover.parts.log;
    let unavailable = |e: sluice_log::LogError| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()).into_response();
    let partitions = match log.partitions(OUTPUT) {
        Ok(n) => n,
        Err(e) => return unavailable(e),
    };
    if q.partition >= partitions {
        return ApiError::bad_request("invalid", format!("output has {partitions} partitions")).into_response();
    }
    let range = match log.offsets(OUTPUT, q.partition).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let from = q.from.max(range.start);
    let (mut records, mut next) = (Vec::new(), from);
    if from < range.end {
        let batch = match log.read_batch(OUTPUT, q.partition, from, HISTORY_PAGE).await {
            Ok(b) => b,
            Err(e) => return unavailable(e),
        };
        next = batch.next.max(from);
        let mut bytes = 0;
        for r in batch.records {
            if bytes >= HISTORY_PAGE_BYTES {
                next = r.offset; // the rest in the next page
                break;
            }
            let ours = std::str::from_utf8(&r.key).ok().and_then(|k| k.split_once('/')).is_some_and(|(s, _)| sources.iter().any(|g| g == s));
            if !ours || r.timestamp_ms < q.since_ms || sluice_core::topics::is_internal_record(&r.value) {
                continue;
            }
            // Events are JSON text; anything else is not one of them.
            let (Ok(key), Ok(value)) = (String::from_utf8(r.key.to_vec()), String::from_utf8(r.value.to_vec())) else { continue };
            bytes += key.len() + value.len();
            records.push(crate::history::PageRecord { offset: r.offset, key, value, ts: r.timestamp_ms });
        }
    }
    axum::Json(json!({ "partitions": partitions, "records": records, "next": next, "end": range.end })).into_response()
}

#[derive(Deserialize)]
struct Open {
    step: usize,
    buckets: BucketSet,
}

/// `POST /cell/migrations/{id}/open`: the source fenced this step and sent its keys; accept its buckets now.
async fn open_step(State(mover): State<Arc<Mover>>, Path(id): Path<String>, headers: HeaderMap, body: axum::body::Body) -> Response {
    let task = match mover.authorized(&id, "target", &headers, true).await {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let body = match read_limited(body, 4096).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let Ok(open) = serde_json::from_slice::<Open>(&body) else {
        return ApiError::bad_request("invalid_json", "{\"step\": n, \"buckets\": \"a-b\"}").into_response();
    };
    if task.phase != "cutover" || task.step != open.step || task.fenced != open.buckets {
        // The store says otherwise (yet): the source retries on 409.
        return ApiError::new(StatusCode::CONFLICT, "not_in_cutover", format!("this cell sees step {} in phase {}; retry", task.step, task.phase))
            .into_response();
    }
    mover.state.lock().expect("mover lock").opened.insert(id.clone(), (open.step, open.buckets));
    if let Err(e) = mover.apply_gate(&task.workspace, Some(mover.target_entry(&task))).await {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e).into_response();
    }
    mover.state.lock().expect("mover lock").targets.entry(id).or_default().opened_step = Some(open.step);
    axum::Json(json!({ "opened": open.buckets })).into_response()
}

/// A request body of at most `limit` bytes, read within 30 s (after the caller authenticated it).
async fn read_limited(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(Duration::from_secs(30), axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", "request body not received in time")),
        Ok(Err(_)) => Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("request body over {limit} bytes"))),
        Ok(Ok(b)) => Ok(b),
    }
}

/// Write `body` to `path` whole: a temporary file, fsynced, renamed.
fn write_whole(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

//! The cell's side of the control plane (`[cell]` with `control_url`): it
//! fetches the configuration of the workspaces this cell serves and hands
//! it to the cell to apply, answers ingest's question about a write key it
//! does not know, and reports usage.
//!
//! Invariants:
//! - The cell keeps serving whatever the control plane does: a failed
//!   fetch keeps the last configuration applied (it lives in the cell's
//!   control tables), and usage waits on disk (`data_dir/usage-outbox/`)
//!   until the control plane takes it.
//! - A report is a file written whole (temporary name, then renamed) before
//!   it is sent, and removed only once the control plane answered; its id
//!   is in its name, so a report sent twice (a crash after sending) counts
//!   once.
//! - Asking about an unknown key is bounded: at most [`MAX_ASKING`] at
//!   once (more wait up to [`ASK_TIMEOUT`] for a turn, then are refused),
//!   each within [`ASK_TIMEOUT`], and a key
//!   the control plane did not know is not asked about again for
//!   [`FORGET_UNKNOWN_AFTER`] (at most [`MAX_UNKNOWN`] remembered).
//! - Counters are read from the process's own metrics (rendered and
//!   parsed) and reported as differences: the first report after a start
//!   counts from zero, as the counters do.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_cells::{CellFeed, UsageRow};
use sluice_core::metrics::{parse_text, Registry, Sample};
use sluice_core::Shutdown;
use sluice_ingest::{KeyResolver, Resolution};

/// Unknown keys asked about at once.
pub const MAX_ASKING: usize = 16;
/// How long one question may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a key the control plane did not know is answered from memory.
pub const FORGET_UNKNOWN_AFTER: Duration = Duration::from_secs(5);
/// Keys remembered as unknown (past it, the memory is emptied).
pub const MAX_UNKNOWN: usize = 10_000;

/// Applies a feed to the cell (blocking): the rows skipped, named.
pub type ApplyFeed = Arc<dyn Fn(&CellFeed) -> Result<Vec<String>, String> + Send + Sync>;
/// The workspace of a source (`"source"`) or destination (`"destination"`), per the cell's catalog.
pub type WorkspaceOf = Box<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// The cell's link to the control plane.
pub struct CellAgent {
    cell: String,
    control_url: String,
    pub(crate) token: String,
    pub(crate) http: reqwest::Client,
    apply: ApplyFeed,
    /// The ETag of the feed applied last.
    etag: Mutex<Option<String>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    asking: tokio::sync::Semaphore,
    unknown: Mutex<HashMap<String, Instant>>,
}

impl CellAgent {
    pub fn new(cell: String, control_url: String, token: String, apply: ApplyFeed) -> Result<Arc<CellAgent>, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(CellAgent {
            cell,
            control_url: control_url.trim_end_matches('/').to_owned(),
            token,
            http,
            apply,
            etag: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            asking: tokio::sync::Semaphore::new(MAX_ASKING),
            unknown: Mutex::default(),
        }))
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}/api/cells/{}/{path}", self.control_url, self.cell)
    }

    /// Fetch the feed and apply it if it changed; true when it did.
    pub async fn sync(&self) -> Result<bool, String> {
        let _one = self.fetching.lock().await;
        let mut req = self.http.get(self.url("config")).bearer_auth(&self.token);
        if let Some(etag) = self.etag.lock().expect("etag lock").clone() {
            req = req.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let resp = req.send().await.map_err(|e| format!("the control plane did not answer: {e}"))?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(false);
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            return Err(format!("the control plane answered {status}: {}", text.chars().take(300).collect::<String>()));
        }
        let etag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let feed: CellFeed = resp.json().await.map_err(|e| format!("the control plane's configuration is not a feed: {e}"))?;
        if feed.cell != self.cell {
            return Err(format!("the control plane sent cell {:?}'s configuration", feed.cell));
        }
        let apply = self.apply.clone();
        let skipped = tokio::task::spawn_blocking(move || apply(&feed).map(|s| (s, feed)))
            .await
            .map_err(|_| "applying the configuration failed unexpectedly".to_owned())??;
        let (skipped, feed) = skipped;
        for s in &skipped {
            tracing::warn!(cell = %self.cell, skipped = %s, "a row of the control plane's configuration was not applied");
        }
        tracing::info!(
            workspaces = feed.workspaces.len(),
            sources = feed.sources.len(),
            destinations = feed.destinations.len(),
            connections = feed.connections.len(),
            "applied the control plane's configuration"
        );
        *self.etag.lock().expect("etag lock") = etag;
        // What was unknown may be known now.
        self.unknown.lock().expect("unknown lock").clear();
        Ok(true)
    }

    /// Fetch every `every` until `stop`; failures are logged once per streak.
    pub fn spawn_sync(self: &Arc<Self>, every: Duration, stop: Shutdown) -> tokio::task::JoinHandle<()> {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                match agent.sync().await {
                    Ok(_) if failing => {
                        tracing::info!("the control plane answers again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        tracing::warn!(error = %e, "cannot fetch this cell's configuration; serving with the last one applied");
                        failing = true;
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait() => return,
                }
            }
        })
    }

    /// Report usage every `every` until `stop` (and once more then): the
    /// counters of `registry` since the last report, by workspace.
    pub fn spawn_reporter(
        self: &Arc<Self>,
        registry: Arc<Registry>,
        workspace_of: WorkspaceOf,
        outbox: PathBuf,
        every: Duration,
        stop: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut meter = Meter::default();
            loop {
                let stopping = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    _ = stop.wait() => true,
                };
                let rows = meter.rows(&parse_text(&sluice_core::metrics::render(&registry)), &workspace_of, sluice_core::clock::now_ms() / 1000);
                if !rows.is_empty() {
                    let dir = outbox.clone();
                    match tokio::task::spawn_blocking(move || write_report(&dir, &rows)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "cannot keep a usage report; its counts are lost"),
                        Err(_) => tracing::error!("keeping a usage report failed unexpectedly"),
                    }
                }
                if let Err(e) = agent.send_reports(&outbox).await {
                    tracing::debug!(error = %e, "usage reports wait for the control plane");
                }
                if stopping {
                    return;
                }
            }
        })
    }

    /// Send the reports waiting in `outbox`, oldest first; each removed once taken.
    pub async fn send_reports(&self, outbox: &std::path::Path) -> Result<usize, String> {
        let dir = outbox.to_owned();
        let mut files: Vec<PathBuf> = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<PathBuf>> {
            match std::fs::read_dir(&dir) {
                Ok(entries) => Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "json")).collect()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        files.sort();
        let mut sent = 0;
        for path in files {
            let report_id = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            let text = match std::fs::read(&path) {
                Ok(t) => t,
                Err(e) => return Err(format!("{}: {e}", path.display())),
            };
            let rows: Vec<UsageRow> = match serde_json::from_slice(&text) {
                Ok(r) => r,
                Err(e) => {
                    // Half-written files cannot exist (rename); a foreign one is set aside, not resent forever.
                    tracing::error!(file = %path.display(), error = %e, "a usage report cannot be read; set aside as .bad");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    continue;
                }
            };
            let resp = self
                .http
                .post(self.url("usage"))
                .bearer_auth(&self.token)
                .json(&json!({ "report_id": report_id, "rows": rows }))
                .send()
                .await
                .map_err(|e| format!("the control plane did not answer: {e}"))?;
            let status = resp.status();
            if status.is_client_error() && status != reqwest::StatusCode::UNAUTHORIZED && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
                // The control plane will never take it (a bug, or rows it refuses): set aside, not resent forever ahead of the rest.
                let text = resp.text().await.unwrap_or_default();
                tracing::error!(file = %path.display(), %status, answer = %text.chars().take(300).collect::<String>(), "the control plane refused a usage report; set aside as .refused");
                let _ = std::fs::rename(&path, path.with_extension("refused"));
                continue;
            }
            if !status.is_success() {
                return Err(format!("the control plane answered {status}"));
            }
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            sent += 1;
        }
        Ok(sent)
    }
}

#[async_trait::async_trait]
impl KeyResolver for CellAgent {
    async fn resolve(&self, key: &str) -> Resolution {
        let hash = hex::encode(sluice_cells::store::key_hash(key));
        if self.unknown.lock().expect("unknown lock").get(&hash).is_some_and(|t| t.elapsed() < FORGET_UNKNOWN_AFTER) {
            return Resolution::Unknown;
        }
        // A burst of new workspaces' first requests waits its turn (briefly); past that, "cannot tell now" (503).
        let Ok(Ok(_permit)) = tokio::time::timeout(ASK_TIMEOUT, self.asking.acquire()).await else { return Resolution::Unavailable };
        let ask = self.http.get(self.url(&format!("keys/{hash}"))).bearer_auth(&self.token).timeout(ASK_TIMEOUT).send();
        match ask.await.map(|r| r.status()) {
            Ok(s) if s.is_success() => {
                // Ours: the configuration that names it, now (bounded like the question).
                match tokio::time::timeout(ASK_TIMEOUT, self.sync()).await {
                    Ok(Ok(_)) => Resolution::Known,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "a key the control plane knows, but its configuration could not be fetched");
                        Resolution::Unavailable
                    }
                    Err(_) => Resolution::Unavailable,
                }
            }
            Ok(s) if s == reqwest::StatusCode::CONFLICT => Resolution::Elsewhere,
            Ok(s) if s == reqwest::StatusCode::NOT_FOUND => {
                let mut unknown = self.unknown.lock().expect("unknown lock");
                if unknown.len() >= MAX_UNKNOWN {
                    unknown.clear();
                }
                unknown.insert(hash, Instant::now());
                Resolution::Unknown
            }
            // The control plane is down or refuses this cell: nothing to tell, nothing remembered.
            _ => Resolution::Unavailable,
        }
    }
}

/// Counter values at the last report, by series, to report differences.
#[derive(Default)]
struct Meter {
    last: HashMap<(String, String, String), f64>,
    /// The workspace each source and destination had when last seen: a
    /// source removed since the last report still counts for its workspace.
    workspaces: HashMap<(&'static str, String), String>,
}

impl Meter {
    /// The usage since the last call: accepted and duplicate events per
    /// source, deliveries per destination, as rows of their workspaces in
    /// the hour `now_s` falls in.
    fn rows(&mut self, samples: &[Sample], workspace_of: &WorkspaceOf, now_s: i64) -> Vec<UsageRow> {
        let hour = now_s - now_s.rem_euclid(3600);
        let mut out: BTreeMap<(String, String, String), i64> = BTreeMap::new();
        for s in samples {
            let (kind, id, metric) = match s.name.as_str() {
                "sluice_ingest_events_accepted_total" => ("source", s.label("source"), "accepted"),
                "sluice_dedup_source_duplicates_dropped_total" => ("source", s.label("source"), "duplicates"),
                "sluice_deliver_outcomes_total" => (
                    "destination",
                    s.label("destination"),
                    match s.label("outcome") {
                        Some("succeeded") => "delivered",
                        Some("discarded" | "archived") => "failed",
                        Some("retry") => "retried",
                        _ => continue,
                    },
                ),
                _ => continue,
            };
            let Some(id) = id else { continue };
            let series = (s.name.clone(), id.to_owned(), s.label("outcome").unwrap_or_default().to_owned());
            let before = self.last.insert(series, s.value).unwrap_or(0.0);
            let delta = (s.value - before).max(0.0) as i64;
            if delta == 0 {
                continue;
            }
            let workspace = match workspace_of(kind, id) {
                Some(w) => {
                    self.workspaces.insert((kind, id.to_owned()), w.clone());
                    w
                }
                None => match self.workspaces.get(&(kind, id.to_owned())) {
                    Some(w) => w.clone(),
                    None => continue,
                },
            };
            let destination = if kind == "destination" { id.to_owned() } else { String::new() };
            *out.entry((workspace, destination, metric.to_owned())).or_default() += delta;
        }
        out.into_iter().map(|((workspace, destination, metric), value)| UsageRow { workspace, hour, destination, metric, value }).collect()
    }
}

/// Keep `rows` as one report file in `dir` (written whole, then renamed);
/// its name (the report id) sorts by time.
fn write_report(dir: &std::path::Path, rows: &[UsageRow]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let id = format!("{:013}-{}", sluice_core::clock::now_ms(), hex::encode(rand::random::<[u8; 8]>()));
    let tmp = dir.join(format!("{id}.tmp"));
    let body = serde_json::to_vec(rows).map_err(std::io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(format!("{id}.json")))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

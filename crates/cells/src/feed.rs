//! A workspace's configuration in the global store (destinations and
//! connections; its sources are its write keys), the tokens cells use
//! with the control plane, and the **cell feed**: everything one cell must
//! know of the workspaces it serves, which the control plane hands it
//! (`GET /api/cells/{id}/config`) and the cell writes into its control
//! tables (rows of origin `global`).
//!
//! Invariants:
//! - A source is known to its cell by its key's SHA-256 (`write_key =
//!   "sha256:<hex>"`): the key itself is never stored, here or in a cell.
//! - The feed of a cell holds exactly the workspaces it serves now (their
//!   override, else their assignment), minus disabled ones (their keys are
//!   then unknown to the cell, as they are refused at the router).
//! - The feed is a whole snapshot, not a delta: its ETag is the SHA-256 of
//!   its body, so a cell that missed changes (it was down, the control
//!   plane was) is right again after one successful fetch.
//! - Source, destination and workspace ids follow the config's id rule.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_core::clock::now_ms;
use sluice_core::config::{valid_id, DestinationConfig, SourceConfig};
use sluice_sql::conn::Arg;

use crate::placement::check_id;
use crate::schema::PREFIX;
use crate::store::key_hash;
use crate::{CellsError, GlobalStore};

/// Where a write key's workspace is served, from one cell's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPlace {
    /// By this cell (or it is the target of the workspace's move).
    Here,
    /// By another cell (a workspace that moved away; a stale router).
    Elsewhere,
    /// By nobody: no such key, a disabled or removed workspace, or one not placed yet.
    Unknown,
}

/// A random secret: `<prefix>_` and 48 hex digits (a write key, a cell token).
pub fn new_token(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 24]>()))
}

/// What one cell must know of the workspaces it serves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CellFeed {
    pub cell: String,
    /// The workspaces served (enabled ones), by id.
    pub workspaces: Vec<String>,
    /// Their sources; `write_key` is `sha256:<hex>`, `workspace` set.
    pub sources: Vec<SourceConfig>,
    pub destinations: Vec<FeedDestination>,
    pub connections: Vec<FeedConnection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedDestination {
    pub workspace: String,
    /// The destination's settings (docs/CONFIG.md's keys), as JSON.
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedConnection {
    pub workspace: String,
    pub source: String,
    pub destination: String,
}

impl CellFeed {
    /// The body the control plane serves, and its ETag (SHA-256 of the body, hex).
    pub fn body_and_etag(&self) -> (String, String) {
        let body = serde_json::to_string(self).expect("a feed serializes");
        let etag = hex::encode(Sha256::digest(body.as_bytes()));
        (body, etag)
    }
}

/// A destination's settings, checked as the config checks them (the id
/// inside must be `id`); the checked JSON.
fn checked_destination(id: &str, config: &serde_json::Value) -> Result<serde_json::Value, CellsError> {
    let invalid = |why: String| CellsError::Invalid { what: "destination", why };
    let d: DestinationConfig = serde_json::from_value(config.clone()).map_err(|e| invalid(e.to_string()))?;
    if d.id != id {
        return Err(invalid(format!("its id {:?} is not {id:?}", d.id)));
    }
    // The cell checks it against its own [deliver] retry policy again; the defaults' here.
    d.validate("destination", sluice_core::config::DeliverConfig::default().retry_policy()).map_err(|e| invalid(e.to_string()))?;
    Ok(config.clone())
}

/// The ids of the workspaces the cell `?` serves: its overrides, and its
/// assignments without an override elsewhere.
const SERVED: &str = "SELECT w.id FROM {p}workspaces w
               LEFT JOIN {p}overrides o ON o.workspace = w.id
               LEFT JOIN {p}assignments a ON a.workspace = w.id
              WHERE ? IN (COALESCE(o.cell, a.cell),
                          (SELECT g.target_cell FROM {p}active_migrations am JOIN {p}migrations g ON g.id = am.migration WHERE am.workspace = w.id),
                          (SELECT g.source_cell FROM {p}active_migrations am JOIN {p}migrations g ON g.id = am.migration WHERE am.workspace = w.id))";

impl GlobalStore {
    // ---- a workspace's destinations and connections ----

    /// Create or replace destination `id` of `workspace` (`config`: the
    /// destination's settings as JSON, docs/CONFIG.md's keys, `id` included).
    /// A destination id is unique across workspaces.
    pub fn put_destination(&self, workspace: &str, id: &str, config: &serde_json::Value) -> Result<(), CellsError> {
        check_id("destination id", id)?;
        let config = checked_destination(id, config)?;
        if self.workspace(workspace)?.is_none() {
            return Err(CellsError::NoWorkspace(workspace.to_owned()));
        }
        let owner = self.q("SELECT workspace FROM {p}destinations WHERE id = ?");
        let upsert = self.q(&self.dialect().upsert(&format!("{PREFIX}destinations"), &["id", "workspace", "config", "updated_at"], &["id"]));
        let text = config.to_string();
        let now = now_ms();
        self.write("writing a destination", |c| {
            if let Some(other) = c.query_one(&owner, &[Arg::Text(id)], |r| r.text(0))?.filter(|o| o != workspace) {
                return Ok(Err(other));
            }
            c.execute(&upsert, &[Arg::Text(id), Arg::Text(workspace), Arg::Text(&text), Arg::Int(now)])?;
            Ok(Ok(()))
        })?
        .map_err(|other| CellsError::Invalid { what: "destination id", why: format!("{id:?} belongs to workspace {other:?}") })
    }

    /// Remove destination `id` of `workspace` and its connections; false when there was none.
    pub fn delete_destination(&self, workspace: &str, id: &str) -> Result<bool, CellsError> {
        let conns = self.q("DELETE FROM {p}connections WHERE workspace = ? AND destination = ?");
        let dest = self.q("DELETE FROM {p}destinations WHERE workspace = ? AND id = ?");
        Ok(self.write("deleting a destination", |c| {
            c.execute(&conns, &[Arg::Text(workspace), Arg::Text(id)])?;
            c.execute(&dest, &[Arg::Text(workspace), Arg::Text(id)])
        })? == 1)
    }

    /// Connect `source` to `destination`, both of `workspace`.
    pub fn put_connection(&self, workspace: &str, source: &str, destination: &str) -> Result<(), CellsError> {
        if self.source_workspace(source)?.as_deref() != Some(workspace) {
            return Err(CellsError::Invalid { what: "connection", why: format!("workspace {workspace:?} has no source {source:?}") });
        }
        let owner = self.q("SELECT workspace FROM {p}destinations WHERE id = ?");
        let insert = self.q(&self.dialect().insert_missing(
            &format!("{PREFIX}connections"),
            "source, destination, workspace",
            "?, ?, ?",
            "source, destination",
        ));
        self.write("writing a connection", |c| {
            if c.query_one(&owner, &[Arg::Text(destination)], |r| r.text(0))?.as_deref() != Some(workspace) {
                return Ok(false);
            }
            c.execute(&insert, &[Arg::Text(source), Arg::Text(destination), Arg::Text(workspace)])?;
            Ok(true)
        })?
        .then_some(())
        .ok_or_else(|| CellsError::Invalid { what: "connection", why: format!("workspace {workspace:?} has no destination {destination:?}") })
    }

    /// Remove `source` of `workspace`: its write key (refused from then on)
    /// and its connections; false when the workspace has no such source.
    pub fn remove_source(&self, workspace: &str, source: &str) -> Result<bool, CellsError> {
        let conns = self.q("DELETE FROM {p}connections WHERE workspace = ? AND source = ?");
        let key = self.q("DELETE FROM {p}write_keys WHERE workspace = ? AND source = ?");
        let tombstone =
            self.q(&self.dialect().insert_missing(&format!("{PREFIX}removed_sources"), "source, workspace, removed_at", "?, ?, ?", "source"));
        let now = now_ms();
        Ok(self.write("removing a source", |c| {
            c.execute(&conns, &[Arg::Text(workspace), Arg::Text(source)])?;
            let n = c.execute(&key, &[Arg::Text(workspace), Arg::Text(source)])?;
            if n == 1 {
                c.execute(&tombstone, &[Arg::Text(source), Arg::Text(workspace), Arg::Int(now)])?;
            }
            self.bump(c, n)
        })? == 1)
    }

    /// Disconnect `source` from `destination`; false when they were not connected.
    pub fn delete_connection(&self, workspace: &str, source: &str, destination: &str) -> Result<bool, CellsError> {
        let sql = self.q("DELETE FROM {p}connections WHERE workspace = ? AND source = ? AND destination = ?");
        Ok(self.write("deleting a connection", |c| c.execute(&sql, &[Arg::Text(workspace), Arg::Text(source), Arg::Text(destination)]))? == 1)
    }

    // ---- the feed ----

    /// The workspaces `cell` serves now (override first, else assignment), by id.
    pub fn served_by(&self, cell: &str) -> Result<Vec<String>, CellsError> {
        let sql = self.q(&format!("{SERVED} ORDER BY w.id"));
        self.read("reading a cell's workspaces", |c| c.query(&sql, &[Arg::Text(cell)], |r| r.text(0)))
    }

    /// The feed of `cell` (see the module's invariants).
    pub fn cell_feed(&self, cell: &str) -> Result<CellFeed, CellsError> {
        // One statement per kind, each filtered by "served by this cell and enabled".
        let served = format!("{SERVED} AND w.disabled = 0");
        let workspaces_sql = self.q(&format!("{served} ORDER BY w.id"));
        let keys_sql = self.q(&format!("SELECT source, workspace, key_hash FROM {{p}}write_keys WHERE workspace IN ({served}) ORDER BY source"));
        let dests_sql = self.q(&format!("SELECT id, workspace, config FROM {{p}}destinations WHERE workspace IN ({served}) ORDER BY id"));
        let conns_sql = self
            .q(&format!("SELECT workspace, source, destination FROM {{p}}connections WHERE workspace IN ({served}) ORDER BY source, destination"));
        let (workspaces, keys, dests, connections) = self.read("reading a cell's feed", |c| {
            let arg = [Arg::Text(cell)];
            Ok((
                c.query(&workspaces_sql, &arg, |r| r.text(0))?,
                c.query(&keys_sql, &arg, |r| Ok((r.text(0)?, r.text(1)?, r.bytes(2)?)))?,
                c.query(&dests_sql, &arg, |r| Ok((r.text(0)?, r.text(1)?, r.text(2)?)))?,
                c.query(&conns_sql, &arg, |r| Ok(FeedConnection { workspace: r.text(0)?, source: r.text(1)?, destination: r.text(2)? }))?,
            ))
        })?;
        let sources = keys
            .into_iter()
            // A source id written before ids were checked cannot reach a cell (its config would refuse it).
            .filter(|(id, _, _)| valid_id(id))
            .map(|(id, workspace, hash)| SourceConfig {
                id,
                write_key: format!("{}{}", sluice_core::config::HASHED_WRITE_KEY, hex::encode(hash)),
                rate_limit: None,
                rate_burst: None,
                workspace: Some(workspace),
                function: None,
            })
            .collect();
        let destinations = dests
            .into_iter()
            .filter_map(|(id, workspace, text)| match serde_json::from_str(&text) {
                Ok(config) => Some(FeedDestination { workspace, config }),
                Err(e) => {
                    tracing::error!(destination = %id, error = %e, "a destination's stored config is not JSON; left out of the cell's feed");
                    None
                }
            })
            .collect();
        Ok(CellFeed { cell: cell.to_owned(), workspaces, sources, destinations, connections })
    }

    /// The ids of `workspace`'s sources (those with a key).
    pub fn workspace_sources(&self, workspace: &str) -> Result<Vec<String>, CellsError> {
        let sql = self.q("SELECT source FROM {p}write_keys WHERE workspace = ? ORDER BY source");
        self.read("reading a workspace's sources", |c| c.query(&sql, &[Arg::Text(workspace)], |r| r.text(0)))
    }

    /// Whether the key with SHA-256 `hash` belongs to an enabled workspace served by `cell`.
    pub fn key_served_by(&self, cell: &str, hash: &[u8; 32]) -> Result<bool, CellsError> {
        Ok(self.key_place(cell, hash)? == KeyPlace::Here)
    }

    /// Where the key with SHA-256 `hash` is served, as `cell` asks about it (one read).
    pub fn key_place(&self, cell: &str, hash: &[u8; 32]) -> Result<KeyPlace, CellsError> {
        let Some(r) = self.route_hash(hash)? else { return Ok(KeyPlace::Unknown) };
        if r.workspace.is_none_or(|w| w.disabled) {
            return Ok(KeyPlace::Unknown);
        }
        let by_this = r.served.as_ref().is_some_and(|(placed, _)| placed.cell == cell) || r.split.is_some_and(|s| s.target_cell == cell);
        Ok(match (by_this, r.served.is_some()) {
            (true, _) => KeyPlace::Here,
            (false, true) => KeyPlace::Elsewhere,
            (false, false) => KeyPlace::Unknown,
        })
    }

    // ---- cell tokens ----

    /// A new token for `cell` (replacing any before): returned once, kept as its SHA-256.
    pub fn new_cell_token(&self, cell: &str) -> Result<String, CellsError> {
        if self.cell(cell)?.is_none() {
            return Err(CellsError::NoCell(cell.to_owned()));
        }
        let token = new_token("ct");
        self.set_cell_token(cell, &token)?;
        Ok(token)
    }

    /// Make `token` `cell`'s (replacing any before); kept as its SHA-256.
    pub fn set_cell_token(&self, cell: &str, token: &str) -> Result<(), CellsError> {
        let hash = key_hash(token);
        let sql = self.q(&self.dialect().upsert(&format!("{PREFIX}cell_tokens"), &["cell", "token_hash", "created_at"], &["cell"]));
        let now = now_ms();
        self.write("writing a cell token", |c| c.execute(&sql, &[Arg::Text(cell), Arg::Bytes(&hash), Arg::Int(now)]))?;
        Ok(())
    }

    /// Whether `token` is `cell`'s (compared as SHA-256 digests by the database).
    pub fn cell_token_matches(&self, cell: &str, token: &str) -> Result<bool, CellsError> {
        let hash = key_hash(token);
        let sql = self.q("SELECT 1 FROM {p}cell_tokens WHERE cell = ? AND token_hash = ?");
        Ok(self.read("checking a cell token", |c| c.query_one(&sql, &[Arg::Text(cell), Arg::Bytes(&hash)], |r| r.int(0)))?.is_some())
    }

    /// The SHA-256 of `cell`'s token (the key of the history tokens the control plane signs for it).
    pub fn cell_token_hash(&self, cell: &str) -> Result<Option<Vec<u8>>, CellsError> {
        let sql = self.q("SELECT token_hash FROM {p}cell_tokens WHERE cell = ?");
        self.read("reading a cell token", |c| c.query_one(&sql, &[Arg::Text(cell)], |r| r.bytes(0)))
    }

    /// `workspace`'s sources, destinations and connections, for the control plane's API.
    pub fn workspace_config(&self, workspace: &str) -> Result<WorkspaceConfig, CellsError> {
        check_id("workspace id", workspace)?;
        let dests = self.q("SELECT config FROM {p}destinations WHERE workspace = ? ORDER BY id");
        let conns = self.q("SELECT source, destination FROM {p}connections WHERE workspace = ? ORDER BY source, destination");
        let sources = self.q("SELECT source FROM {p}write_keys WHERE workspace = ? ORDER BY source");
        self.read("reading a workspace's config", |c| {
            let arg = [Arg::Text(workspace)];
            Ok(WorkspaceConfig {
                sources: c.query(&sources, &arg, |r| r.text(0))?,
                destinations: c.query(&dests, &arg, |r| Ok(serde_json::from_str(&r.text(0)?).unwrap_or(serde_json::Value::Null)))?,
                connections: c
                    .query(&conns, &arg, |r| Ok(FeedConnection { workspace: workspace.to_owned(), source: r.text(0)?, destination: r.text(1)? }))?,
            })
        })
    }
}

/// A workspace's configuration as the control plane's API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkspaceConfig {
    /// Source ids (each has one write key, known only by its hash).
    pub sources: Vec<String>,
    pub destinations: Vec<serde_json::Value>,
    pub connections: Vec<FeedConnection>,
}

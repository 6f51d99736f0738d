//! The global store: workspaces, write keys, cells, placement, overrides,
//! the mapping version and metering, in one database shared by the routers
//! and the control plane (an SQLite file for one machine; MySQL/MariaDB or
//! PostgreSQL otherwise), through `sluice-sql`.
//!
//! Invariants (besides the crate's):
//! - Methods block (one shared connection, reconnected after an error):
//!   call them from a blocking thread.
//! - Placement is a conditional insert (`INSERT … ON CONFLICT DO NOTHING`,
//!   MySQL `ON DUPLICATE KEY UPDATE` of the key to itself) followed by a
//!   read: two routers placing one workspace at once both read the row
//!   the first insert wrote, whichever cell each had chosen.
//! - Writes that change what a router resolves bump `mapping_version` in
//!   their transaction; a deadlock or serialization failure between two
//!   writers is retried (a few times, briefly). A workspace's first
//!   placement does not bump it: no router can have cached anything it
//!   changes (a key is only cached once its workspace is placed), and a
//!   bump empties every router's cache — with new workspaces arriving
//!   steadily, the hit ratio would collapse (`sluice bench router`).
//! - A usage report is counted once: its `(cell, report_id)` is inserted
//!   in the same transaction that adds its rows; a report sent again
//!   inserts nothing and adds nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};
use sluice_core::clock::now_ms;
use sluice_core::config::HttpUrl;
use sluice_core::BucketSet;
use sluice_sql::conn::{Arg, Connection, Connector, SharedConnection, SqlError, SqlRow};
use sluice_sql::{Dialect, SqlLink};

use crate::migration::RouteSplit;
use crate::placement::{check_id, choose, Cell, CellState, Placement, Tier, Workspace};
use crate::schema::{ddl, PREFIX};
use crate::CellsError;

/// Attempts of a write that lost a deadlock or serialization race.
const WRITE_ATTEMPTS: usize = 4;

/// What a router needs to know of a write key, read in one statement
/// ([`GlobalStore::route_key`]).
#[derive(Debug, Clone)]
pub struct KeyRoute {
    /// The workspace the key names.
    pub workspace_id: String,
    pub source: String,
    /// The key's workspace; `None` when the key names one that is gone
    /// (its requests are refused as a disabled workspace's).
    pub workspace: Option<Workspace>,
    /// Where the workspace is served (its override, else its assignment)
    /// and that cell's row (`None` if the store does not list it); `None`
    /// when it has no cell yet.
    pub served: Option<(Placement, Option<Cell>)>,
    /// The split while the workspace moves to another cell (`served` is the source then).
    pub split: Option<RouteSplit>,
}

/// One counter of one workspace in one hour (`destination` empty for the
/// counters that are not per destination).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct UsageRow {
    pub workspace: String,
    /// Unix seconds of the hour's start.
    pub hour: i64,
    #[serde(default)]
    pub destination: String,
    /// `accepted`, `duplicates`, `delivered`, `failed`, …
    pub metric: String,
    pub value: i64,
}

/// The most one usage row may add (a trillion events in an hour is no
/// cell's): sums stay far from `i64::MAX` for millions of reports.
pub const MAX_USAGE_VALUE: i64 = 1_000_000_000_000;

/// Usage rows written per statement (5 parameters each: well under every engine's limit).
const USAGE_ROWS_PER_STATEMENT: usize = 200;

/// What a usage report added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportOutcome {
    /// False when the report (its `(cell, report_id)`) was counted before: it added nothing.
    pub counted: bool,
    /// Workspaces whose rows were left out: the cell does not serve them.
    pub refused: Vec<String>,
}

/// The global store (see the module docs).
pub struct GlobalStore {
    session: SharedConnection,
    dialect: Dialect,
    /// The statement that bumps the mapping version.
    bump: String,
}

/// Where a workspace is served cannot change under a migration (abort or finish it first).
fn moving_error(workspace: &str) -> CellsError {
    CellsError::Invalid { what: "override", why: format!("workspace {workspace:?} is being moved: abort or finish the migration first") }
}

/// SHA-256 of a write key: what the store keeps and looks up.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn json_map(text: &str, index: usize) -> Result<BTreeMap<String, String>, SqlError> {
    serde_json::from_str(text).map_err(|e| SqlError::Decode { index, problem: e.to_string() })
}

fn parse_err(index: usize) -> impl Fn(CellsError) -> SqlError {
    move |e| SqlError::Decode { index, problem: e.to_string() }
}

const WORKSPACE_COLUMNS: &str = "id, name, tier, constraints, disabled";

/// `columns` (`"a, b"`) as columns of table `alias` (`"t.a, t.b"`).
pub(crate) fn of_table(alias: &str, columns: &str) -> String {
    columns.split(", ").map(|c| format!("{alias}.{c}")).collect::<Vec<_>>().join(", ")
}

fn workspace_row(r: &dyn SqlRow) -> Result<Workspace, SqlError> {
    workspace_at(r, 0)
}

/// The workspace in [`WORKSPACE_COLUMNS`] from column `i` on.
fn workspace_at(r: &dyn SqlRow, i: usize) -> Result<Workspace, SqlError> {
    Ok(Workspace {
        id: r.text(i)?,
        name: r.text(i + 1)?,
        tier: Tier::parse(&r.text(i + 2)?).map_err(parse_err(i + 2))?,
        constraints: json_map(&r.text(i + 3)?, i + 3)?,
        disabled: r.int(i + 4)? != 0,
    })
}

const CELL_COLUMNS: &str = "id, tier, ingest_url, admin_url, state, attributes";

fn cell_row(r: &dyn SqlRow) -> Result<Cell, SqlError> {
    cell_at(r, 0)
}

/// The cell in [`CELL_COLUMNS`] from column `i` on.
fn cell_at(r: &dyn SqlRow, i: usize) -> Result<Cell, SqlError> {
    Ok(Cell {
        id: r.text(i)?,
        tier: Tier::parse(&r.text(i + 1)?).map_err(parse_err(i + 1))?,
        ingest_url: r.text(i + 2)?,
        admin_url: r.text(i + 3)?,
        state: CellState::parse(&r.text(i + 4)?).map_err(parse_err(i + 4))?,
        attributes: json_map(&r.text(i + 5)?, i + 5)?,
    })
}

/// A cell's URL: `http://` or `https://` with a host, no query or fragment
/// (the router appends `/v1/<call>`), no spaces; `optional` allows empty.
fn check_cell_url(what: &'static str, url: &str, optional: bool) -> Result<(), CellsError> {
    if optional && url.is_empty() {
        return Ok(());
    }
    // The config's own URL check (scheme, host, no spaces), and what the router's `/v1/<call>` suffix needs.
    let ok = HttpUrl::parse(url).is_ok() && url.len() <= 2048 && !url.contains(['?', '#']) && !url.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(CellsError::Invalid { what, why: format!("{url:?}: an http:// or https:// URL with a host, without query or fragment") })
    }
}

impl GlobalStore {
    /// The store at `location`: a `mysql://`, `mariadb://`, `postgres://`
    /// or `postgresql://` URL, else an SQLite file path (created). Its
    /// tables are created if missing. Blocks.
    pub fn open(location: &str) -> Result<GlobalStore, CellsError> {
        let connector = if location.contains("://") {
            Connector::Server(Box::new(SqlLink::new(location)?))
        } else {
            let path = Path::new(location);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| sluice_sql::Error::Io { path: dir.display().to_string(), source })?;
            }
            Connector::SqliteFile(path.to_owned())
        };
        let dialect = connector.dialect();
        let bump = dialect.placeholders(&format!("UPDATE {PREFIX}mapping_version SET version = version + 1 WHERE id = 1"));
        let store = GlobalStore { session: SharedConnection::new(connector, "global store"), dialect, bump };
        let ddl = ddl(dialect);
        store.session.run("creating the global store's tables", |c| c.create_schema(&ddl))?;
        Ok(store)
    }

    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The file, or the URL without password.
    pub fn location(&self) -> String {
        self.session.connector().describe()
    }

    /// `sql` with `{p}` the table prefix and `?` placeholders, in this engine's dialect.
    pub(crate) fn q(&self, sql: &str) -> String {
        self.dialect.placeholders(&sql.replace("{p}", PREFIX))
    }

    pub(crate) fn read<T: Send>(&self, what: &str, f: impl FnOnce(&mut Connection) -> Result<T, SqlError> + Send) -> Result<T, CellsError> {
        Ok(self.session.run(what, f)?)
    }

    /// Run `body` in a transaction, retried after a deadlock. A body that
    /// changes what routers resolve bumps the version in it
    /// ([`GlobalStore::bump`]).
    pub(crate) fn write<T: Send>(&self, what: &str, body: impl Fn(&mut Connection) -> Result<T, SqlError> + Send + Sync) -> Result<T, CellsError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut lost_race = false;
            let result = self.session.run(what, |c| c.transaction(&body).inspect_err(|e| lost_race = e.is_retryable()));
            match result {
                Err(e) if lost_race && attempt < WRITE_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "global store write lost a race; trying again");
                    std::thread::sleep(std::time::Duration::from_millis(10 << attempt));
                }
                other => return Ok(other?),
            }
        }
    }

    /// Bump the mapping version when `changed` rows changed; returns `changed`.
    pub(crate) fn bump(&self, c: &mut Connection, changed: u64) -> Result<u64, SqlError> {
        if changed > 0 {
            c.execute(&self.bump, &[])?;
        }
        Ok(changed)
    }

    /// The mapping version: it changes whenever anything a router resolves does.
    pub fn mapping_version(&self) -> Result<i64, CellsError> {
        let sql = self.q("SELECT version FROM {p}mapping_version WHERE id = 1");
        self.read("reading the mapping version", |c| Ok(c.query_one(&sql, &[], |r| r.int(0))?.unwrap_or(0)))
    }

    // ---- workspaces ----

    /// Create or replace a workspace.
    pub fn put_workspace(&self, ws: &Workspace) -> Result<(), CellsError> {
        check_id("workspace id", &ws.id)?;
        let sql =
            self.q(&self.dialect.upsert(&format!("{PREFIX}workspaces"), &["id", "name", "tier", "constraints", "disabled", "created_at"], &["id"]));
        // (The upsert replaces created_at too; nothing reads it as a creation time yet.)
        let constraints = serde_json::to_string(&ws.constraints).expect("a map of strings");
        let now = now_ms();
        self.write("writing a workspace", |c| {
            let args = [
                Arg::Text(&ws.id),
                Arg::Text(&ws.name),
                Arg::Text(ws.tier.as_str()),
                Arg::Text(&constraints),
                Arg::Int(ws.disabled as i64),
                Arg::Int(now),
            ];
            let n = c.execute(&sql, &args)?;
            self.bump(c, n)
        })?;
        Ok(())
    }

    pub fn workspace(&self, id: &str) -> Result<Option<Workspace>, CellsError> {
        let sql = self.q(&format!("SELECT {WORKSPACE_COLUMNS} FROM {{p}}workspaces WHERE id = ?"));
        self.read("reading a workspace", |c| c.query_one(&sql, &[Arg::Text(id)], workspace_row))
    }

    pub fn workspaces(&self) -> Result<Vec<Workspace>, CellsError> {
        let sql = self.q(&format!("SELECT {WORKSPACE_COLUMNS} FROM {{p}}workspaces ORDER BY id"));
        self.read("reading the workspaces", |c| c.query(&sql, &[], workspace_row))
    }

    // ---- write keys ----

    /// Register `key` for `source` of `workspace`; false when the key is
    /// registered already (to anyone: a key names one source).
    pub fn add_write_key(&self, key: &str, workspace: &str, source: &str) -> Result<bool, CellsError> {
        if key.is_empty() || key.len() > 1024 {
            return Err(CellsError::Invalid { what: "write key", why: "1 to 1024 bytes".into() });
        }
        check_id("source id", source)?;
        if self.workspace(workspace)?.is_none() {
            return Err(CellsError::NoWorkspace(workspace.to_owned()));
        }
        if let Some(owner) = self.source_workspace(source)? {
            return Err(CellsError::Invalid {
                what: "write key",
                why: format!("source {source:?} (of workspace {owner:?}) has a key already: a source has one key (rotate it)"),
            });
        }
        // A removed source's id stays its workspace's: its events are still in the cells' logs, found by that id.
        let removed = self.q("SELECT workspace FROM {p}removed_sources WHERE source = ?");
        if let Some(owner) = self.read("reading removed sources", |c| c.query_one(&removed, &[Arg::Text(source)], |r| r.text(0)))? {
            if owner != workspace {
                return Err(CellsError::Invalid {
                    what: "source id",
                    why: format!("{source:?} was workspace {owner:?}'s: a source id is never given to another workspace (its events stay in the logs under it)"),
                });
            }
        }
        let hash = key_hash(key);
        let sql =
            self.q(&self.dialect.insert_new(&format!("{PREFIX}write_keys"), "key_hash, workspace, source, created_at", "?, ?, ?, ?", "key_hash"));
        let now = now_ms();
        let added = self.write("adding a write key", |c| {
            let n = c.execute(&sql, &[Arg::Bytes(&hash), Arg::Text(workspace), Arg::Text(source), Arg::Int(now)])?;
            self.bump(c, n)
        })?;
        Ok(added == 1)
    }

    /// The workspace of `source`, if it has a key.
    pub fn source_workspace(&self, source: &str) -> Result<Option<String>, CellsError> {
        let sql = self.q("SELECT workspace FROM {p}write_keys WHERE source = ?");
        self.read("reading a source", |c| c.query_one(&sql, &[Arg::Text(source)], |r| r.text(0)))
    }

    /// Replace the key of `source` (of `workspace`) by `key`: the old one
    /// stops working as routers and the cell follow (within seconds).
    /// False when the source has no key.
    pub fn rotate_write_key(&self, workspace: &str, source: &str, key: &str) -> Result<bool, CellsError> {
        if key.is_empty() || key.len() > 1024 {
            return Err(CellsError::Invalid { what: "write key", why: "1 to 1024 bytes".into() });
        }
        let hash = key_hash(key);
        let sql = self.q("UPDATE {p}write_keys SET key_hash = ?, created_at = ? WHERE workspace = ? AND source = ?");
        let now = now_ms();
        Ok(self.write("rotating a write key", |c| {
            let n = c.execute(&sql, &[Arg::Bytes(&hash), Arg::Int(now), Arg::Text(workspace), Arg::Text(source)])?;
            self.bump(c, n)
        })? == 1)
    }

    /// Forget `key`; false when it was not registered.
    pub fn remove_write_key(&self, key: &str) -> Result<bool, CellsError> {
        let hash = key_hash(key);
        let sql = self.q("DELETE FROM {p}write_keys WHERE key_hash = ?");
        Ok(self.write("removing a write key", |c| {
            let n = c.execute(&sql, &[Arg::Bytes(&hash)])?;
            self.bump(c, n)
        })? == 1)
    }

    /// Where `key`'s requests go, in one statement (a router's cache miss):
    /// its workspace, and the cell serving it. `None`: no such key.
    pub fn route_key(&self, key: &str) -> Result<Option<KeyRoute>, CellsError> {
        self.route_hash(&key_hash(key))
    }

    /// [`GlobalStore::route_key`] of a key known by its SHA-256.
    pub fn route_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRoute>, CellsError> {
        let sql = self.q(&format!(
            "SELECT k.source, o.cell, o.reason, a.cell, a.reason, w.id, {}, c.id, {}, k.workspace,
                    g.id, g.target_cell, g.moved, g.fenced, t.id, {}, sc.id, {}
               FROM {{p}}write_keys k
               LEFT JOIN {{p}}workspaces w ON w.id = k.workspace
               LEFT JOIN {{p}}overrides o ON o.workspace = k.workspace
               LEFT JOIN {{p}}assignments a ON a.workspace = k.workspace
               LEFT JOIN {{p}}cells c ON c.id = COALESCE(o.cell, a.cell)
               LEFT JOIN {{p}}active_migrations am ON am.workspace = k.workspace
               LEFT JOIN {{p}}migrations g ON g.id = am.migration
               LEFT JOIN {{p}}cells t ON t.id = g.target_cell
               LEFT JOIN {{p}}cells sc ON sc.id = g.source_cell
              WHERE k.key_hash = ?",
            of_table("w", WORKSPACE_COLUMNS),
            of_table("c", CELL_COLUMNS),
            of_table("t", CELL_COLUMNS),
            of_table("sc", CELL_COLUMNS)
        ));
        // Columns: 0 source, 1-2 override, 3-4 assignment, 5 w.id (NULL: gone), 6-10 workspace, 11 c.id (NULL: none), 12-17 cell,
        // 18 the key's workspace id, 19-22 the migration in progress (NULL: none), 23 t.id (NULL: none), 24-29 its target cell,
        // 30 sc.id (NULL: none), 31-36 its source cell.
        self.read("routing a write key", |c| {
            c.query_one(&sql, &[Arg::Bytes(hash)], |r| {
                let served = match (r.opt_text(1)?, r.opt_text(3)?) {
                    (Some(cell), _) => Some(Placement { cell, reason: format!("override: {}", r.text(2)?), new: false }),
                    (None, Some(cell)) => Some(Placement { cell, reason: r.text(4)?, new: false }),
                    (None, None) => None,
                };
                let cell = if r.opt_text(11)?.is_some() { Some(cell_at(r, 12)?) } else { None };
                let workspace = if r.opt_text(5)?.is_some() { Some(workspace_at(r, 6)?) } else { None };
                let mut served = served.map(|p| (p, cell));
                let split = match r.opt_text(19)? {
                    None => None,
                    Some(migration) => {
                        // While it moves, the workspace's source side is the migration's source, whatever
                        // an override or assignment says (red team: a cleared override sent it to a third cell).
                        let all_moved = r.text(21)? == BucketSet::ALL.to_string();
                        if r.opt_text(30)?.is_some() && !all_moved {
                            let source = cell_at(r, 31)?;
                            let reason = format!("moving to {} ({migration})", r.text(20)?);
                            served = Some((Placement { cell: source.id.clone(), reason, new: false }, Some(source)));
                        }
                        let set = |i: usize| BucketSet::parse(&r.text(i)?).map_err(|problem| SqlError::Decode { index: i, problem });
                        Some(RouteSplit {
                            migration,
                            target_cell: r.text(20)?,
                            moved: set(21)?,
                            fenced: set(22)?,
                            target: if r.opt_text(23)?.is_some() { Some(cell_at(r, 24)?) } else { None },
                        })
                    }
                };
                Ok(KeyRoute { workspace_id: r.text(18)?, source: r.text(0)?, workspace, served, split })
            })
        })
    }

    // ---- cells ----

    /// Create or replace a cell.
    pub fn put_cell(&self, cell: &Cell) -> Result<(), CellsError> {
        check_id("cell id", &cell.id)?;
        check_cell_url("ingest_url", &cell.ingest_url, false)?;
        check_cell_url("admin_url", &cell.admin_url, true)?;
        let sql = self.q(&self.dialect.upsert(
            &format!("{PREFIX}cells"),
            &["id", "tier", "ingest_url", "admin_url", "state", "attributes", "updated_at"],
            &["id"],
        ));
        let attributes = serde_json::to_string(&cell.attributes).expect("a map of strings");
        let now = now_ms();
        self.write("writing a cell", |c| {
            let args = [
                Arg::Text(&cell.id),
                Arg::Text(cell.tier.as_str()),
                Arg::Text(&cell.ingest_url),
                Arg::Text(&cell.admin_url),
                Arg::Text(cell.state.as_str()),
                Arg::Text(&attributes),
                Arg::Int(now),
            ];
            let n = c.execute(&sql, &args)?;
            self.bump(c, n)
        })?;
        Ok(())
    }

    /// Move a cell to `state`.
    pub fn set_cell_state(&self, id: &str, state: CellState) -> Result<(), CellsError> {
        let sql = self.q("UPDATE {p}cells SET state = ?, updated_at = ? WHERE id = ?");
        let now = now_ms();
        let changed = self.write("changing a cell's state", |c| {
            let n = c.execute(&sql, &[Arg::Text(state.as_str()), Arg::Int(now), Arg::Text(id)])?;
            self.bump(c, n)
        })?;
        match changed {
            0 => Err(CellsError::NoCell(id.to_owned())),
            _ => Ok(()),
        }
    }

    pub fn cell(&self, id: &str) -> Result<Option<Cell>, CellsError> {
        let sql = self.q(&format!("SELECT {CELL_COLUMNS} FROM {{p}}cells WHERE id = ?"));
        self.read("reading a cell", |c| c.query_one(&sql, &[Arg::Text(id)], cell_row))
    }

    pub fn cells(&self) -> Result<Vec<Cell>, CellsError> {
        let sql = self.q(&format!("SELECT {CELL_COLUMNS} FROM {{p}}cells ORDER BY id"));
        self.read("reading the cells", |c| c.query(&sql, &[], cell_row))
    }

    /// Workspaces assigned to each cell (cells without any are absent).
    pub fn workspace_counts(&self) -> Result<HashMap<String, u64>, CellsError> {
        let sql = self.q("SELECT cell, COUNT(*) FROM {p}assignments GROUP BY cell");
        let rows = self.read("counting workspaces per cell", |c| c.query(&sql, &[], |r| Ok((r.text(0)?, r.int(1)? as u64))))?;
        Ok(rows.into_iter().collect())
    }

    // ---- where workspaces are served ----

    /// Pin `workspace` to `cell` (quarantine, a heavy tenant, testing),
    /// whatever its assignment says.
    pub fn set_override(&self, workspace: &str, cell: &str, reason: &str) -> Result<(), CellsError> {
        if self.workspace(workspace)?.is_none() {
            return Err(CellsError::NoWorkspace(workspace.to_owned()));
        }
        match self.cell(cell)? {
            None => return Err(CellsError::NoCell(cell.to_owned())),
            Some(c) if matches!(c.state, CellState::Provisioning | CellState::Retired) => {
                return Err(CellsError::Invalid { what: "override", why: format!("cell {cell:?} is {}: it serves nobody", c.state.as_str()) });
            }
            Some(_) => {}
        }
        let sql = self.q(&self.dialect.upsert(&format!("{PREFIX}overrides"), &["workspace", "cell", "reason", "created_at"], &["workspace"]));
        let now = now_ms();
        // Checked in the write's transaction: a migration starting meanwhile re-checks its source in its own.
        let moving = self.write("setting an override", |c| {
            if self.moving(c, workspace)? {
                return Ok(true);
            }
            let n = c.execute(&sql, &[Arg::Text(workspace), Arg::Text(cell), Arg::Text(reason), Arg::Int(now)])?;
            self.bump(c, n)?;
            Ok(false)
        })?;
        if moving {
            return Err(moving_error(workspace));
        }
        Ok(())
    }

    /// Remove `workspace`'s override; false when it had none.
    pub fn clear_override(&self, workspace: &str) -> Result<bool, CellsError> {
        let sql = self.q("DELETE FROM {p}overrides WHERE workspace = ?");
        match self.write("clearing an override", |c| {
            if self.moving(c, workspace)? {
                return Ok(None);
            }
            let n = c.execute(&sql, &[Arg::Text(workspace)])?;
            Ok(Some(self.bump(c, n)?))
        })? {
            None => Err(moving_error(workspace)),
            Some(n) => Ok(n == 1),
        }
    }

    /// Whether `workspace` has a migration in progress (read in the caller's transaction).
    fn moving(&self, c: &mut Connection, workspace: &str) -> Result<bool, SqlError> {
        let sql = self.q("SELECT 1 FROM {p}active_migrations WHERE workspace = ?");
        Ok(c.query_one(&sql, &[Arg::Text(workspace)], |r| r.int(0))?.is_some())
    }

    /// Where `workspace` is served now: its override, else its assignment;
    /// `None` when it has neither (not placed yet).
    pub fn resolve(&self, workspace: &str) -> Result<Option<Placement>, CellsError> {
        let sql = self.q("SELECT cell, reason, 1 FROM {p}overrides WHERE workspace = ?
             UNION ALL SELECT cell, reason, 0 FROM {p}assignments WHERE workspace = ?");
        let rows = self.read("resolving a workspace", |c| {
            c.query(&sql, &[Arg::Text(workspace), Arg::Text(workspace)], |r| Ok((r.text(0)?, r.text(1)?, r.int(2)? == 1)))
        })?;
        // The override wins over the assignment.
        let best = rows.into_iter().max_by_key(|(_, _, is_override)| *is_override);
        Ok(best.map(|(cell, reason, is_override)| Placement {
            cell,
            reason: if is_override { format!("override: {reason}") } else { reason },
            new: false,
        }))
    }

    /// Every workspace with where it is served (override first, else its
    /// assignment; `None`: not placed), in one statement.
    pub fn placements(&self) -> Result<Vec<(Workspace, Option<Placement>)>, CellsError> {
        let columns = of_table("w", WORKSPACE_COLUMNS);
        let sql = self.q(&format!(
            "SELECT {columns}, o.cell, o.reason, a.cell, a.reason FROM {{p}}workspaces w
               LEFT JOIN {{p}}overrides o ON o.workspace = w.id
               LEFT JOIN {{p}}assignments a ON a.workspace = w.id
              ORDER BY w.id"
        ));
        self.read("reading the placements", |c| {
            c.query(&sql, &[], |r| {
                let served = match (r.opt_text(5)?, r.opt_text(7)?) {
                    (Some(cell), _) => Some(Placement { cell, reason: format!("override: {}", r.text(6)?), new: false }),
                    (None, Some(cell)) => Some(Placement { cell, reason: r.text(8)?, new: false }),
                    (None, None) => None,
                };
                Ok((workspace_row(r)?, served))
            })
        })
    }

    /// Where `workspace` is served, placing it first if it has no cell yet
    /// (see [`GlobalStore::place_new`]).
    pub fn place(&self, workspace: &str) -> Result<Placement, CellsError> {
        if let Some(p) = self.resolve(workspace)? {
            return Ok(p);
        }
        let ws = self.workspace(workspace)?.ok_or_else(|| CellsError::NoWorkspace(workspace.to_owned()))?;
        Ok(self.place_new(&ws)?.0)
    }

    /// Place `ws`, which had no cell when the caller looked:
    /// [`crate::placement::choose`] picks a cell from one read of the cells
    /// and their loads, a conditional insert records it, and the row that
    /// won (this call's, or a racing router's, read back) is the answer,
    /// with that cell's row. Three statements when this call wins.
    pub fn place_new(&self, ws: &Workspace) -> Result<(Placement, Option<Cell>), CellsError> {
        let workspace = ws.id.as_str();
        let (cells, load) = self.cells_and_loads()?;
        let (cell, reason) = choose(ws, &cells, &load).map_err(|reason| CellsError::Unplaceable { workspace: workspace.to_owned(), reason })?;
        let insert =
            self.q(&self.dialect.insert_new(&format!("{PREFIX}assignments"), "workspace, cell, assigned_at, reason", "?, ?, ?, ?", "workspace"));
        let now = now_ms();
        // One statement, atomic on its own; no version bump (see the module's invariants).
        let inserted = self
            .read("placing a workspace", |c| c.execute(&insert, &[Arg::Text(workspace), Arg::Text(&cell), Arg::Int(now), Arg::Text(&reason)]))?
            == 1;
        if inserted {
            tracing::info!(workspace, %cell, %reason, "workspace placed");
            let row = cells.into_iter().find(|c| c.id == cell);
            return Ok((Placement { cell, reason, new: true }, row));
        }
        // Lost the race (or an override appeared): what the store says now.
        let placed = self.resolve(workspace)?.ok_or_else(|| CellsError::NoWorkspace(workspace.to_owned()))?;
        let row = self.cell(&placed.cell)?;
        Ok((placed, row))
    }

    /// Every cell with the number of workspaces assigned to it, in one statement.
    fn cells_and_loads(&self) -> Result<(Vec<Cell>, HashMap<String, u64>), CellsError> {
        let sql =
            self.q(&format!("SELECT {CELL_COLUMNS}, (SELECT COUNT(*) FROM {{p}}assignments a WHERE a.cell = c.id) FROM {{p}}cells c ORDER BY id"));
        let rows = self.read("reading the cells and their loads", |c| c.query(&sql, &[], |r| Ok((cell_row(r)?, r.int(6)? as u64))))?;
        let load = rows.iter().map(|(c, n)| (c.id.clone(), *n)).collect();
        Ok((rows.into_iter().map(|(c, _)| c).collect(), load))
    }

    // ---- metering ----

    /// Add a cell's usage report, once: a report with a `(cell, report_id)`
    /// seen before adds nothing. True when it was counted now.
    pub fn record_usage(&self, cell: &str, report_id: &str, rows: &[UsageRow]) -> Result<ReportOutcome, CellsError> {
        check_id("cell id", cell)?;
        if report_id.is_empty() || report_id.len() > 128 {
            return Err(CellsError::Invalid { what: "report id", why: "1 to 128 bytes".into() });
        }
        let latest_hour = now_ms() / 1000 + 2 * 86_400;
        for row in rows {
            check_id("workspace id", &row.workspace)?;
            let bad = row.metric.is_empty()
                || row.metric.len() > 32
                || row.destination.len() > 255
                || !(0..=MAX_USAGE_VALUE).contains(&row.value)
                || !(0..=latest_hour).contains(&row.hour)
                || row.hour % 3600 != 0;
            if bad {
                let why =
                    format!("{row:?}: a value of 0 to {MAX_USAGE_VALUE}, an hour's start (unix seconds, a multiple of 3600, not in the future)");
                return Err(CellsError::Invalid { what: "usage row", why });
            }
        }
        // A cell counts only what it serves: rows of other workspaces are left out (and said).
        let served: std::collections::HashSet<String> = self.served_by(cell)?.into_iter().collect();
        let (rows, refused): (Vec<&UsageRow>, Vec<&UsageRow>) = rows.iter().partition(|r| served.contains(&r.workspace));
        let mut refused: Vec<String> = refused.into_iter().map(|r| r.workspace.clone()).collect();
        refused.sort();
        refused.dedup();
        // Rows of one key add up first (red team: 23,500 copies of one row were 23,500 updates of it).
        let mut merged: BTreeMap<(&str, i64, &str, &str), i64> = BTreeMap::new();
        for r in rows {
            let v = merged.entry((&r.workspace, r.hour, &r.destination, &r.metric)).or_default();
            *v = v.saturating_add(r.value);
        }
        let report =
            self.q(&self.dialect.insert_new(&format!("{PREFIX}usage_reports"), "cell, report_id, received_at", "?, ?, ?", "cell, report_id"));
        // Many rows per statement (distinct keys: merged above).
        let add = |n: usize| {
            let values = vec!["(?, ?, ?, ?, ?)"; n].join(", ");
            self.q(&match self.dialect {
                Dialect::MySql => format!(
                    "INSERT INTO {{p}}usage_hourly (workspace, hour, destination, metric, value) VALUES {values}
                     ON DUPLICATE KEY UPDATE value = value + VALUES(value)"
                ),
                Dialect::Sqlite | Dialect::Postgres => format!(
                    "INSERT INTO {{p}}usage_hourly (workspace, hour, destination, metric, value) VALUES {values}
                     ON CONFLICT (workspace, hour, destination, metric) DO UPDATE SET value = {{p}}usage_hourly.value + excluded.value"
                ),
            })
        };
        let merged: Vec<_> = merged.into_iter().collect();
        let now = now_ms();
        let counted = self.write("recording a usage report", |c| {
            if c.execute(&report, &[Arg::Text(cell), Arg::Text(report_id), Arg::Int(now)])? != 1 {
                return Ok(false);
            }
            for chunk in merged.chunks(USAGE_ROWS_PER_STATEMENT) {
                let args: Vec<Arg> =
                    chunk.iter().flat_map(|((w, h, d, m), v)| [Arg::Text(w), Arg::Int(*h), Arg::Text(d), Arg::Text(m), Arg::Int(*v)]).collect();
                c.execute(&add(chunk.len()), &args)?;
            }
            Ok(true)
        })?;
        Ok(ReportOutcome { counted, refused })
    }

    /// `workspace`'s usage rows with `from <= hour < to` (unix seconds).
    pub fn usage(&self, workspace: &str, from: i64, to: i64) -> Result<Vec<UsageRow>, CellsError> {
        let sql = self.q("SELECT workspace, hour, destination, metric, value FROM {p}usage_hourly
              WHERE workspace = ? AND hour >= ? AND hour < ? ORDER BY hour, metric, destination");
        self.read("reading usage", |c| {
            c.query(&sql, &[Arg::Text(workspace), Arg::Int(from), Arg::Int(to)], |r| {
                Ok(UsageRow { workspace: r.text(0)?, hour: r.int(1)?, destination: r.text(2)?, metric: r.text(3)?, value: r.int(4)? })
            })
        })
    }
}

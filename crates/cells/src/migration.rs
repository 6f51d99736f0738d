//! Migrations of a workspace between cells: the state machine's rows in
//! the global store (docs/plans/MIGRATION.md).
//!
//! Invariants:
//! - A workspace has at most one migration in progress: starting one is a
//!   conditional insert into `active_migrations`, so two starts cannot both
//!   win; the row goes when the migration ends (done or aborted).
//! - Every bucket has exactly one owner or is fenced: the target owns
//!   `moved`, nobody accepts `fenced`, the source owns the rest. `moved`
//!   only grows, by one step's buckets, and only out of `fenced`.
//! - Every transition is one conditional `UPDATE … WHERE id = ? AND phase =
//!   ? AND step = ?` in a transaction that bumps `mapping_version` when
//!   routing changes: a transition replayed after a crash (of the control
//!   plane, which drives it) changes nothing, and two drivers cannot both
//!   make it.
//! - The last step's cutover flips the assignment to the target (and drops
//!   an override) in the same transaction that moves the last buckets.

use serde::Serialize;
use sluice_core::clock::now_ms;
use sluice_core::BucketSet;
use sluice_sql::conn::{Arg, Connection, SqlError, SqlRow};

use crate::feed::new_token;
use crate::placement::{check_id, CellState};
use crate::schema::PREFIX;
use crate::{CellsError, GlobalStore};

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Keys of the next step's buckets are copied (snapshot, then delta).
    Copying,
    /// The step's buckets are fenced: the source stops, its last keys reach the target, the target opens.
    Cutover,
    /// Every bucket is the target's; the source delivers what it accepted.
    Draining,
    /// The source deletes what it held of the workspace.
    Cleanup,
    Done,
    Aborted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Cutover => "cutover",
            Phase::Draining => "draining",
            Phase::Cleanup => "cleanup",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Result<Phase, CellsError> {
        Ok(match s {
            "copying" => Phase::Copying,
            "cutover" => Phase::Cutover,
            "draining" => Phase::Draining,
            "cleanup" => Phase::Cleanup,
            "done" => Phase::Done,
            "aborted" => Phase::Aborted,
            other => return Err(CellsError::Invalid { what: "migration phase", why: format!("{other:?}") }),
        })
    }

    /// Still in progress (holds the workspace's `active_migrations` row).
    pub fn active(self) -> bool {
        !matches!(self, Phase::Done | Phase::Aborted)
    }
}

/// One migration's row.
#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    pub id: String,
    pub workspace: String,
    pub source_cell: String,
    pub target_cell: String,
    /// Cumulative percentages of the buckets moved after each step; the last is 100.
    pub steps: Vec<u8>,
    /// Index into `steps` of the next cutover (`steps.len()` once all are done).
    pub step: usize,
    pub phase: Phase,
    pub moved: BucketSet,
    pub fenced: BucketSet,
    pub paused: bool,
    /// The two cells' shared secret for the key stream; never shown to operators.
    #[serde(skip)]
    pub token: String,
    pub progress: serde_json::Value,
    pub error: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Migration {
    /// The buckets step `k` moves.
    pub fn step_buckets(&self, k: usize) -> BucketSet {
        let upto = |i: usize| BucketSet::first(self.steps[i]);
        match k {
            0 => upto(0),
            k if k < self.steps.len() => upto(k).minus(upto(k - 1)),
            _ => BucketSet::NONE,
        }
    }

    /// The buckets `cell` accepts for the workspace now (`None`: the cell is neither side).
    pub fn accepted_by(&self, cell: &str) -> Option<BucketSet> {
        if !self.phase.active() {
            return None;
        }
        if cell == self.source_cell {
            Some(BucketSet::ALL.minus(self.moved).minus(self.fenced))
        } else if cell == self.target_cell {
            Some(self.moved)
        } else {
            None
        }
    }
}

/// The split a router applies to a workspace under migration.
#[derive(Debug, Clone)]
pub struct RouteSplit {
    pub migration: String,
    pub target_cell: String,
    /// The target's row (`None` if the store does not list it).
    pub target: Option<crate::Cell>,
    pub moved: BucketSet,
    pub fenced: BucketSet,
}

pub(crate) const MIGRATION_COLUMNS: &str =
    "id, workspace, source_cell, target_cell, steps, step, phase, moved, fenced, paused, token, progress, error, created_at, updated_at";

fn decode<T>(index: usize, r: Result<T, String>) -> Result<T, SqlError> {
    r.map_err(|problem| SqlError::Decode { index, problem })
}

fn migration_row(r: &dyn SqlRow) -> Result<Migration, SqlError> {
    Ok(Migration {
        id: r.text(0)?,
        workspace: r.text(1)?,
        source_cell: r.text(2)?,
        target_cell: r.text(3)?,
        steps: decode(4, serde_json::from_str(&r.text(4)?).map_err(|e| e.to_string()))?,
        step: r.int(5)?.max(0) as usize,
        phase: decode(6, Phase::parse(&r.text(6)?).map_err(|e| e.to_string()))?,
        moved: decode(7, BucketSet::parse(&r.text(7)?))?,
        fenced: decode(8, BucketSet::parse(&r.text(8)?))?,
        paused: r.int(9)? != 0,
        token: r.text(10)?,
        progress: serde_json::from_str(&r.text(11)?).unwrap_or(serde_json::Value::Null),
        error: r.text(12)?,
        created_at: r.int(13)?,
        updated_at: r.int(14)?,
    })
}

/// How long after a workspace left a cell it may move back there (the old
/// side's cleanup, and its configuration, have caught up by then).
pub const RETURN_AFTER_MS: i64 = 10 * 60 * 1000;

/// Steps as given by an operator: cumulative percentages, rising, ending at 100.
pub fn check_steps(steps: &[u8]) -> Result<(), CellsError> {
    let rising = steps.windows(2).all(|w| w[0] < w[1]);
    if steps.is_empty() || steps.len() > 10 || !rising || steps.first() == Some(&0) || steps.last() != Some(&100) {
        return Err(CellsError::Invalid {
            what: "migration steps",
            why: format!("{steps:?}: 1 to 10 rising percentages ending at 100, e.g. [100] or [10, 50, 100]"),
        });
    }
    Ok(())
}

impl GlobalStore {
    /// Start moving `workspace` to `target` in `steps` (`paused`: copy keys
    /// but cut nothing over until resumed). Refused when the
    /// workspace is not placed, is moving already, or the target is not an
    /// active cell other than its own.
    pub fn start_migration(&self, workspace: &str, target: &str, steps: &[u8], paused: bool) -> Result<Migration, CellsError> {
        check_steps(steps)?;
        let placed = self.resolve(workspace)?.ok_or_else(|| CellsError::Invalid {
            what: "migration",
            why: format!("workspace {workspace:?} is not placed in any cell yet: nothing to move"),
        })?;
        let source = placed.cell;
        match self.cell(target)? {
            None => return Err(CellsError::NoCell(target.to_owned())),
            Some(c) if c.state != CellState::Active => {
                return Err(CellsError::Invalid {
                    what: "migration",
                    why: format!("cell {target:?} is {}: only an active cell takes workspaces", c.state.as_str()),
                })
            }
            Some(_) if source == target => {
                return Err(CellsError::Invalid { what: "migration", why: format!("workspace {workspace:?} is in cell {target:?} already") })
            }
            Some(_) => {}
        }
        // The target must not be a cell whose cleanup of this workspace may still be running: its forget
        // records would delete the keys this migration brings in.
        let recent =
            self.q("SELECT id FROM {p}migrations WHERE workspace = ? AND source_cell = ? AND phase IN ('cleanup', 'done') AND updated_at > ?");
        let since = now_ms() - RETURN_AFTER_MS;
        if let Some(prev) = self
            .read("reading recent migrations", |c| c.query_one(&recent, &[Arg::Text(workspace), Arg::Text(target), Arg::Int(since)], |r| r.text(0)))?
        {
            return Err(CellsError::Invalid {
                what: "migration",
                why: format!(
                    "workspace {workspace:?} left cell {target:?} minutes ago ({prev}); it can move back {} minutes after that move ended",
                    RETURN_AFTER_MS / 60_000
                ),
            });
        }
        let id = format!("m{}", &new_token("")[1..17]);
        check_id("migration id", &id)?;
        let token = new_token("mig");
        let steps_json = serde_json::to_string(steps).expect("numbers");
        let claim = self.q(&self.dialect().insert_new(&format!("{PREFIX}active_migrations"), "workspace, migration", "?, ?", "workspace"));
        let insert = self
            .q(&format!("INSERT INTO {{p}}migrations ({MIGRATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, 'copying', '', '', ?, ?, '{{}}', '', ?, ?)"));
        let now = now_ms();
        let placed_now =
            self.q("SELECT cell, 1 FROM {p}overrides WHERE workspace = ? UNION ALL SELECT cell, 0 FROM {p}assignments WHERE workspace = ?");
        let started = self.write("starting a migration", |c| {
            if c.execute(&claim, &[Arg::Text(workspace), Arg::Text(&id)])? != 1 {
                return Ok(false);
            }
            // An override set since `resolve` above: the source would be stale. Roll back (an error does).
            let cells = c.query(&placed_now, &[Arg::Text(workspace), Arg::Text(workspace)], |r| Ok((r.text(0)?, r.int(1)?)))?;
            // The override wins over the assignment.
            if cells.into_iter().max_by_key(|(_, o)| *o).map(|(cell, _)| cell).as_ref() != Some(&source) {
                return Err(SqlError::Decode { index: 0, problem: "the workspace's cell changed as the migration started; start it again".into() });
            }
            let args = [
                Arg::Text(&id),
                Arg::Text(workspace),
                Arg::Text(&source),
                Arg::Text(target),
                Arg::Text(&steps_json),
                Arg::Int(paused as i64),
                Arg::Text(&token),
                Arg::Int(now),
                Arg::Int(now),
            ];
            c.execute(&insert, &args)?;
            // The target's feed now carries the workspace: routers must see the split.
            self.bump(c, 1)?;
            Ok(true)
        })?;
        if !started {
            return Err(CellsError::Invalid { what: "migration", why: format!("workspace {workspace:?} is being moved already") });
        }
        tracing::info!(migration = %id, workspace, from = %source, to = target, ?steps, "migration started");
        self.migration(&id)?.ok_or_else(|| CellsError::Invalid { what: "migration", why: "vanished as it started".into() })
    }

    pub fn migration(&self, id: &str) -> Result<Option<Migration>, CellsError> {
        let sql = self.q(&format!("SELECT {MIGRATION_COLUMNS} FROM {{p}}migrations WHERE id = ?"));
        self.read("reading a migration", |c| c.query_one(&sql, &[Arg::Text(id)], migration_row))
    }

    /// Every migration, newest first (at most `limit`).
    pub fn migrations(&self, limit: usize) -> Result<Vec<Migration>, CellsError> {
        let sql = self.q(&format!("SELECT {MIGRATION_COLUMNS} FROM {{p}}migrations ORDER BY created_at DESC, id LIMIT {}", limit.min(10_000)));
        self.read("reading the migrations", |c| c.query(&sql, &[], migration_row))
    }

    /// A workspace's migrations, oldest first.
    pub fn migrations_of_workspace(&self, workspace: &str) -> Result<Vec<Migration>, CellsError> {
        let sql = self.q(&format!("SELECT {MIGRATION_COLUMNS} FROM {{p}}migrations WHERE workspace = ? ORDER BY created_at, id"));
        self.read("reading a workspace's migrations", |c| c.query(&sql, &[Arg::Text(workspace)], migration_row))
    }

    /// The migrations in progress, oldest first.
    pub fn active_migrations(&self) -> Result<Vec<Migration>, CellsError> {
        let sql = self.q(&format!(
            "SELECT {} FROM {{p}}active_migrations am JOIN {{p}}migrations g ON g.id = am.migration ORDER BY g.created_at, g.id",
            crate::store::of_table("g", MIGRATION_COLUMNS)
        ));
        self.read("reading the migrations in progress", |c| c.query(&sql, &[], migration_row))
    }

    /// The migrations `cell` takes part in: those in progress, and those
    /// that ended within `ended_within_ms` (a cell keeps a workspace it lost
    /// closed until its configuration has caught up).
    pub fn migrations_of_cell(&self, cell: &str, ended_within_ms: i64) -> Result<Vec<Migration>, CellsError> {
        let sql = self.q(&format!(
            "SELECT {MIGRATION_COLUMNS} FROM {{p}}migrations
              WHERE (source_cell = ? OR target_cell = ?) AND (phase NOT IN ('done', 'aborted') OR updated_at > ?)
              ORDER BY created_at, id"
        ));
        let since = now_ms() - ended_within_ms;
        self.read("reading a cell's migrations", |c| c.query(&sql, &[Arg::Text(cell), Arg::Text(cell), Arg::Int(since)], migration_row))
    }

    /// Fence step `step`'s buckets (phase copying → cutover). False when
    /// the migration is not at that step in that phase, or is paused.
    pub fn begin_cutover(&self, id: &str, step: usize) -> Result<bool, CellsError> {
        let Some(m) = self.migration(id)? else { return Err(CellsError::Invalid { what: "migration", why: format!("no migration {id:?}") }) };
        if m.phase != Phase::Copying || m.step != step || m.paused || step >= m.steps.len() {
            return Ok(false);
        }
        let fenced = m.step_buckets(step).to_string();
        let sql = self.q(
            "UPDATE {p}migrations SET phase = 'cutover', fenced = ?, updated_at = ? WHERE id = ? AND phase = 'copying' AND step = ? AND paused = 0",
        );
        let now = now_ms();
        let changed = self.write("fencing a migration step", |c| {
            let n = c.execute(&sql, &[Arg::Text(&fenced), Arg::Int(now), Arg::Text(id), Arg::Int(step as i64)])?;
            self.bump(c, n)
        })?;
        Ok(changed == 1)
    }

    /// The fenced buckets become the target's (cutover → copying for the
    /// next step, or → draining after the last, with the assignment
    /// flipped). Called once the target has opened them.
    pub fn finish_cutover(&self, id: &str, step: usize) -> Result<bool, CellsError> {
        let Some(m) = self.migration(id)? else { return Err(CellsError::Invalid { what: "migration", why: format!("no migration {id:?}") }) };
        if m.phase != Phase::Cutover || m.step != step {
            return Ok(false);
        }
        let last = step + 1 == m.steps.len();
        let moved = m.moved.union(m.fenced).to_string();
        let next = if last { Phase::Draining } else { Phase::Copying };
        let sql = self.q(
            "UPDATE {p}migrations SET phase = ?, moved = ?, fenced = '', step = ?, updated_at = ? WHERE id = ? AND phase = 'cutover' AND step = ?",
        );
        // An upsert: a workspace pinned by an override may have no assignment row.
        let assign = self.q(&self.dialect().upsert(&format!("{PREFIX}assignments"), &["workspace", "cell", "assigned_at", "reason"], &["workspace"]));
        let unpin = self.q("DELETE FROM {p}overrides WHERE workspace = ?");
        let reason = format!("migrated from {} ({id})", m.source_cell);
        let now = now_ms();
        let changed = self.write("finishing a migration step", |c: &mut Connection| {
            let args = [Arg::Text(next.as_str()), Arg::Text(&moved), Arg::Int(step as i64 + 1), Arg::Int(now), Arg::Text(id), Arg::Int(step as i64)];
            let n = c.execute(&sql, &args)?;
            if n == 1 && last {
                c.execute(&assign, &[Arg::Text(&m.workspace), Arg::Text(&m.target_cell), Arg::Int(now), Arg::Text(&reason)])?;
                c.execute(&unpin, &[Arg::Text(&m.workspace)])?;
            }
            self.bump(c, n)
        })?;
        if changed == 1 {
            tracing::info!(migration = id, step, moved = %moved, next = next.as_str(), "migration step cut over");
        }
        Ok(changed == 1)
    }

    /// Draining → cleanup: the source delivered what it held.
    pub fn begin_cleanup(&self, id: &str) -> Result<bool, CellsError> {
        let sql = self.q("UPDATE {p}migrations SET phase = 'cleanup', updated_at = ? WHERE id = ? AND phase = 'draining'");
        let now = now_ms();
        Ok(self.write("starting a migration's cleanup", |c| c.execute(&sql, &[Arg::Int(now), Arg::Text(id)]))? == 1)
    }

    /// Cleanup → done: the source removed the workspace; it leaves the source's feed.
    pub fn finish_migration(&self, id: &str) -> Result<bool, CellsError> {
        self.end(id, "cleanup", Phase::Done)
    }

    /// Abort a migration whose target owns nothing yet (phase copying, no
    /// bucket moved). Later, the way back is a migration the other way.
    pub fn abort_migration(&self, id: &str) -> Result<(), CellsError> {
        let Some(m) = self.migration(id)? else { return Err(CellsError::Invalid { what: "migration", why: format!("no migration {id:?}") }) };
        let refuse = |why: String| Err(CellsError::Invalid { what: "abort", why });
        match m.phase {
            Phase::Copying if m.moved.is_empty() => {}
            Phase::Copying | Phase::Draining | Phase::Cleanup => {
                return refuse(format!(
                    "{} of the buckets are the target's already: move the workspace back with a migration the other way",
                    m.moved.len()
                ))
            }
            Phase::Cutover => {
                return refuse(
                    "a cutover is under way: it ends once the target has opened the step (it waits for a target that is down); \
                     pause to start no further step"
                        .into(),
                )
            }
            Phase::Done | Phase::Aborted => return refuse(format!("the migration is {} already", m.phase.as_str())),
        }
        if self.end(id, "copying", Phase::Aborted)? {
            Ok(())
        } else {
            refuse("the migration moved on meanwhile; look at it again".into())
        }
    }

    /// `from` → `to` (done or aborted), releasing the workspace's active row.
    fn end(&self, id: &str, from: &str, to: Phase) -> Result<bool, CellsError> {
        let moved_guard = if to == Phase::Aborted { " AND moved = ''" } else { "" };
        let sql = self.q(&format!("UPDATE {{p}}migrations SET phase = ?, fenced = '', updated_at = ? WHERE id = ? AND phase = ?{moved_guard}"));
        let release = self.q("DELETE FROM {p}active_migrations WHERE migration = ?");
        let now = now_ms();
        let changed = self.write("ending a migration", |c| {
            let n = c.execute(&sql, &[Arg::Text(to.as_str()), Arg::Int(now), Arg::Text(id), Arg::Text(from)])?;
            if n == 1 {
                c.execute(&release, &[Arg::Text(id)])?;
            }
            self.bump(c, n)
        })?;
        if changed == 1 {
            tracing::info!(migration = id, phase = to.as_str(), "migration ended");
        }
        Ok(changed == 1)
    }

    /// Pause or resume: a paused migration starts no cutover (one under way finishes).
    pub fn set_migration_paused(&self, id: &str, paused: bool) -> Result<bool, CellsError> {
        let sql =
            self.q("UPDATE {p}migrations SET paused = ?, updated_at = ? WHERE id = ? AND phase IN ('copying', 'cutover', 'draining', 'cleanup')");
        let now = now_ms();
        Ok(self.write("pausing a migration", |c| c.execute(&sql, &[Arg::Int(paused as i64), Arg::Int(now), Arg::Text(id)]))? == 1)
    }

    /// Record what `role` (`"source"`, `"target"`, `"driver"`) reports of a
    /// migration: `progress[role] = report` (bounded: 16 KiB of JSON).
    pub fn report_migration(&self, id: &str, role: &str, report: &serde_json::Value) -> Result<bool, CellsError> {
        if !matches!(role, "source" | "target" | "driver" | "settings") {
            return Err(CellsError::Invalid { what: "migration report", why: format!("role {role:?}") });
        }
        let text = report.to_string();
        if text.len() > 16 * 1024 {
            return Err(CellsError::Invalid { what: "migration report", why: "at most 16 KiB of JSON".into() });
        }
        // Locked (PostgreSQL, MariaDB): the source's, the target's and the driver's reports must not overwrite each other.
        let lock = if self.dialect() == sluice_sql::Dialect::Sqlite { "" } else { " FOR UPDATE" };
        let read = self.q(&format!("SELECT progress FROM {{p}}migrations WHERE id = ?{lock}"));
        let write = self.q("UPDATE {p}migrations SET progress = ?, updated_at = ? WHERE id = ?");
        let now = now_ms();
        self.write("recording a migration's progress", |c| {
            let Some(current) = c.query_one(&read, &[Arg::Text(id)], |r| r.text(0))? else { return Ok(false) };
            let mut progress: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&current).unwrap_or_default();
            progress.insert(role.to_owned(), report.clone());
            let text = serde_json::Value::Object(progress).to_string();
            Ok(c.execute(&write, &[Arg::Text(&text), Arg::Int(now), Arg::Text(id)])? == 1)
        })
    }

    /// Note an error on a migration (shown to operators; empty clears it).
    pub fn set_migration_error(&self, id: &str, error: &str) -> Result<(), CellsError> {
        let error: String = error.chars().take(2000).collect();
        let sql = self.q("UPDATE {p}migrations SET error = ?, updated_at = ? WHERE id = ?");
        let now = now_ms();
        self.write("noting a migration's error", |c| c.execute(&sql, &[Arg::Text(&error), Arg::Int(now), Arg::Text(id)]))?;
        Ok(())
    }
}

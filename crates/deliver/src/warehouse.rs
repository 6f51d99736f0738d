//! `postgres` destinations (docs/DESTINATIONS.md): a warehouse in the
//! user's own PostgreSQL, laid out as Segment's warehouses are.
//!
//! Invariants:
//! - A source's events land in the schema named after the source (its id
//!   in snake case; `pg_…` gets the prefix `src_`, which PostgreSQL
//!   reserves): tables `tracks`, `identifies`, `pages`, `screens`,
//!   `groups`, `aliases`, and one per track event name (snake case; a name
//!   that is one of those tables gets the prefix `event_`). Every table's
//!   `id` (the messageId) is its primary key; `uuid_ts` is when the row
//!   was loaded.
//! - Columns come from the events: `context`, `properties` and `traits`
//!   flattened (`context.page.url` → `context_page_url`), keys in snake
//!   case, arrays and objects deeper than [`FLATTEN_DEPTH`] as JSON text.
//!   A new key adds a column (`ALTER TABLE … ADD COLUMN IF NOT EXISTS`, in
//!   a transaction of its own under an advisory lock per schema, so
//!   concurrent loads and processes do not race); its type is the first
//!   value's (boolean, bigint, double precision, text, timestamptz for the
//!   event's own timestamps).
//! - A value that does not fit its column (a string for a bigint column, a
//!   duplicate column name, a table or column over the limits) is left out
//!   of the row and recorded in the schema's `sluice_type_conflicts` with
//!   the value as JSON text: never fatal, never silent.
//! - A request's jobs load in one transaction: `COPY` into staging tables,
//!   then `INSERT … SELECT … ON CONFLICT (id) DO NOTHING`. A job loaded
//!   again (a retry after a lost answer, a crash between the commit and
//!   the `succeeded` row, a replay) adds no row: exactly once on
//!   messageId, per table.
//! - Bounded for hostile input: at most [`MAX_COLUMNS`] columns per table
//!   and [`MAX_EVENT_TABLES`] event tables per schema; beyond, conflicts.
//! - Errors: a connection lost or refused, a server away, a lock or
//!   resource shortage, a schema changed underneath (the cache is dropped)
//!   → every job retried; a data error in a batch → each job loaded alone,
//!   and one that fails alone is discarded with the server's message.
//! - The SSRF guard checks the server's address when a pool is made (a
//!   Unix socket counts as local).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection as _, Executor as _, Row as _};

use crate::clients::Clients;
use crate::executor::{check_public, Attempt, Verdict};

/// Levels of objects flattened into columns; deeper values are JSON text.
pub const FLATTEN_DEPTH: usize = 4;
/// Most columns a table gets from events.
pub const MAX_COLUMNS: usize = 1000;
/// Most per-event tables in a schema.
pub const MAX_EVENT_TABLES: usize = 500;
/// PostgreSQL's identifier length.
const MAX_NAME: usize = 63;
/// Connections per warehouse (requests in flight beyond it wait for one).
const POOL_SIZE: u32 = 8;
/// Schema changes (`CREATE TABLE`, `ADD COLUMN`) one load makes at most:
/// events needing more wait for the next load (retried), so a flood of new
/// keys cannot hold a load past its timeout. Committed in groups of
/// [`DDL_PER_TRANSACTION`], so what a timed-out load made stays made.
pub const MAX_DDL_PER_LOAD: usize = 200;
const DDL_PER_TRANSACTION: usize = 25;
/// Loads one request may make while splitting a failing batch.
const MAX_LOADS_PER_REQUEST: usize = 64;
/// How long a schema change waits for a table's lock (readers of the
/// table queue behind a waiting `ALTER TABLE`): then the load is retried.
const DDL_LOCK_TIMEOUT: &str = "2s";
/// A pool unused this long is closed when another is made.
const IDLE: Duration = Duration::from_secs(600);
/// The tables every source's schema may have besides event tables.
const FIXED_TABLES: &[&str] = &["tracks", "identifies", "pages", "screens", "groups", "aliases", "users", CONFLICTS];
const CONFLICTS: &str = "sluice_type_conflicts";

/// One job to load.
pub struct Load<'a> {
    pub message_id: &'a str,
    /// The source's id: its schema.
    pub source: &'a str,
    pub body: &'a Bytes,
}

/// Check a destination's URL as it will be used where the config's own
/// checks cannot (a `postgres` one's TLS mode and parameters; others
/// pass): the config loader and the admin API call this.
pub fn check_destination(d: &sluice_core::config::DestinationConfig) -> Result<(), String> {
    if d.is_postgres() {
        check_url(&d.url)
    } else {
        Ok(())
    }
}

/// The `postgres` URL parameters that name a file on the server (sqlx
/// reads them: a CA, a client certificate and key).
const SERVER_FILE_PARAMETERS: [&str; 7] = ["sslrootcert", "ssl-root-cert", "ssl-ca", "sslcert", "ssl-cert", "sslkey", "ssl-key"];

/// For destinations given through an API (not the config file): a
/// `postgres` URL may not name the server's files — a caller would pick
/// the server's own keys, or learn which files exist. Such a destination
/// belongs in the config file, which the operator writes.
pub fn check_no_server_files(d: &sluice_core::config::DestinationConfig) -> Result<(), String> {
    let Some(url) = url::Url::parse(&d.url).ok().filter(|_| d.is_postgres()) else { return Ok(()) };
    match url.query_pairs().find(|(k, _)| SERVER_FILE_PARAMETERS.contains(&k.as_ref())) {
        Some((k, _)) => Err(format!(
            "?{k}= names a file on the server, which a destination given through the admin API may not do; \
             give this destination in the config file (or use a CA the system trusts)"
        )),
        None => Ok(()),
    }
}

/// Check a `postgres` destination's URL as it will be used (TLS mode and parameters).
pub fn check_url(url: &str) -> Result<(), String> {
    let link = sluice_sql::SqlLink::for_role(url, "postgres destination").map_err(|e| e.to_string())?;
    if link.engine() != sluice_sql::SqlEngine::Postgres {
        return Err(format!("{}: not a postgres:// URL", link.display()));
    }
    // Shown back (the admin API, `jobs inspect`) with the user info's password hidden, not the query's.
    if url::Url::parse(url).is_ok_and(|u| u.query_pairs().any(|(k, _)| k.eq_ignore_ascii_case("password"))) {
        return Err(format!(
            "{}: put the password in the user info (postgres://user:password@host/db) or PGPASSWORD, not in ?password=",
            link.display()
        ));
    }
    Ok(())
}

/// A value for a column.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    /// One of the event's own timestamps (RFC 3339).
    Time(String),
    /// An array, or an object deeper than [`FLATTEN_DEPTH`]: its JSON.
    Json(String),
}

impl Cell {
    /// The type of a column this value makes.
    fn natural_type(&self) -> &'static str {
        match self {
            Cell::Bool(_) => "boolean",
            Cell::Int(_) => "bigint",
            Cell::Float(_) => "double precision",
            Cell::Text(_) | Cell::Json(_) => "text",
            Cell::Time(_) => "timestamp with time zone",
        }
    }

    /// Whether this value goes into a column of `column_type` (as
    /// PostgreSQL's `format_type` spells it).
    fn fits(&self, column_type: &str) -> bool {
        match column_type {
            "text" | "json" | "jsonb" => true,
            t if t.starts_with("character varying") => true,
            "bigint" => matches!(self, Cell::Int(_)),
            "integer" => matches!(self, Cell::Int(i) if i32::try_from(*i).is_ok()),
            "smallint" => matches!(self, Cell::Int(i) if i16::try_from(*i).is_ok()),
            "double precision" | "real" => matches!(self, Cell::Int(_) | Cell::Float(_)),
            t if t.starts_with("numeric") => matches!(self, Cell::Int(_) | Cell::Float(_)),
            "boolean" => matches!(self, Cell::Bool(_)),
            "timestamp with time zone" | "timestamp without time zone" => match self {
                Cell::Time(_) => true,
                Cell::Text(s) => is_timestamp(s),
                _ => false,
            },
            _ => false,
        }
    }

    /// The value as text for a column of `column_type`.
    fn render(&self, column_type: &str) -> String {
        let json = matches!(column_type, "json" | "jsonb");
        match self {
            Cell::Bool(b) => b.to_string(),
            Cell::Int(i) => i.to_string(),
            // `{:?}` keeps an exponent short (1e300), which PostgreSQL reads.
            Cell::Float(f) => format!("{f:?}"),
            Cell::Text(s) | Cell::Time(s) if json => Value::String(s.clone()).to_string(),
            Cell::Text(s) | Cell::Time(s) | Cell::Json(s) => s.clone(),
        }
    }

    /// The value as JSON text, for the conflicts table.
    fn as_json(&self) -> String {
        match self {
            Cell::Text(s) | Cell::Time(s) => Value::String(s.clone()).to_string(),
            Cell::Json(s) => s.clone(),
            other => other.render("text"),
        }
    }
}

/// An RFC 3339 time PostgreSQL takes: years 1–9999 (it has no year 0),
/// and an offset under 16 hours (RFC 3339 allows up to ±23:59; PostgreSQL
/// refuses a "time zone displacement" beyond ±15:59).
fn is_timestamp(s: &str) -> bool {
    use chrono::Datelike;
    chrono::DateTime::parse_from_rfc3339(s)
        .is_ok_and(|t| (1..=9999).contains(&t.with_timezone(&chrono::Utc).year()) && t.offset().local_minus_utc().abs() < 16 * 3600)
}

/// One row for one table.
#[derive(Debug)]
struct Row {
    table: String,
    cells: Vec<(String, Cell)>,
}

/// A value left out of its row.
#[derive(Debug, Clone, PartialEq)]
struct Conflict {
    table: String,
    /// The column, or the key path when it makes no column name.
    column: String,
    reason: String,
    /// JSON text.
    value: Option<String>,
}

/// What one event loads: its rows, and what was left out at once.
#[derive(Debug)]
struct EventRows {
    schema: String,
    message_id: String,
    rows: Vec<Row>,
    conflicts: Vec<Conflict>,
}

/// `key` in snake case as a column or table name: ASCII letters and
/// digits, `_` between words and for everything else, lower case, at most
/// 63 bytes, never starting with a digit. Empty when nothing is left.
pub fn snake(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut prev: Option<char> = None;
    for c in key.chars() {
        if c.is_ascii_alphanumeric() {
            if c.is_ascii_uppercase() && prev.is_some_and(|p| p.is_ascii_lowercase() || p.is_ascii_digit()) && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
        prev = Some(c);
    }
    while out.ends_with('_') {
        out.pop();
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out.truncate(MAX_NAME);
    out
}

/// The schema of source `source`.
pub fn schema_name(source: &str) -> String {
    let name = snake(source);
    let name = if name.is_empty() { "source".to_owned() } else { name };
    if name.starts_with("pg_") {
        let mut prefixed = format!("src_{name}");
        prefixed.truncate(MAX_NAME);
        prefixed
    } else {
        name
    }
}

/// The table of track event `event` (`None`: the name has no letters or digits).
fn event_table(event: &str) -> Option<String> {
    let name = snake(event);
    if name.is_empty() {
        return None;
    }
    if FIXED_TABLES.contains(&name.as_str()) {
        let mut prefixed = format!("event_{name}");
        prefixed.truncate(MAX_NAME);
        return Some(prefixed);
    }
    Some(name)
}

/// Builds one row's cells: names checked, duplicates recorded.
struct RowBuilder<'a> {
    table: &'a str,
    cells: Vec<(String, Cell)>,
    names: HashSet<String>,
    conflicts: &'a mut Vec<Conflict>,
}

impl RowBuilder<'_> {
    fn push(&mut self, name: String, path: &str, cell: Cell) {
        if name == "uuid_ts" {
            self.conflicts.push(Conflict {
                table: self.table.to_owned(),
                column: name,
                reason: "uuid_ts is the load time, set by the warehouse".into(),
                value: Some(cell.as_json()),
            });
        } else if name.is_empty() {
            self.conflicts.push(Conflict {
                table: self.table.to_owned(),
                column: path.to_owned(),
                reason: "the key makes no column name (no ASCII letters or digits)".into(),
                value: Some(cell.as_json()),
            });
        } else if !self.names.insert(name.clone()) {
            self.conflicts.push(Conflict {
                table: self.table.to_owned(),
                column: name,
                reason: format!("a second value for this column in the event (from {path:?})"),
                value: Some(cell.as_json()),
            });
        } else {
            self.cells.push((name, cell));
        }
    }

    /// A scalar value at `path` (`None` for null: no column).
    fn scalar(&mut self, name: String, path: &str, v: &Value) {
        let cell = match v {
            Value::Null => return,
            Value::Bool(b) => Cell::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Cell::Int(i),
                None => Cell::Float(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => Cell::Text(s.clone()),
            Value::Array(_) | Value::Object(_) => Cell::Json(v.to_string()),
        };
        self.push(name, path, cell);
    }

    /// `object` flattened under `prefix` (empty: no prefix).
    fn flatten(&mut self, prefix: &str, path: &str, object: &Map<String, Value>, depth: usize) {
        for (k, v) in object {
            let part = snake(k);
            let path = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            let name = if part.is_empty() {
                String::new()
            } else if prefix.is_empty() {
                part
            } else {
                let mut joined = format!("{prefix}_{part}");
                joined.truncate(MAX_NAME);
                joined
            };
            match v {
                Value::Object(inner) if depth + 1 < FLATTEN_DEPTH && !name.is_empty() => self.flatten(&name, &path, inner, depth + 1),
                _ => self.scalar(name, &path, v),
            }
        }
    }

    fn finish(self) -> Row {
        Row { table: self.table.to_owned(), cells: self.cells }
    }
}

/// A row of event `obj` for `table` with the columns every row of it has.
fn common_row<'a>(obj: &Map<String, Value>, message_id: &str, table: &'a str, conflicts: &'a mut Vec<Conflict>) -> RowBuilder<'a> {
    let mut b = RowBuilder { table, cells: Vec::new(), names: HashSet::new(), conflicts };
    b.push("id".into(), "messageId", Cell::Text(message_id.to_owned()));
    for (key, column) in
        [("receivedAt", "received_at"), ("sentAt", "sent_at"), ("timestamp", "timestamp"), ("originalTimestamp", "original_timestamp")]
    {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if is_timestamp(s) => b.push(column.into(), key, Cell::Time(s.clone())),
            Some(other) => b.conflicts.push(Conflict {
                table: table.to_owned(),
                column: column.into(),
                reason: "not an RFC 3339 timestamp PostgreSQL takes".into(),
                value: Some(other.to_string()),
            }),
        }
    }
    for (key, column) in [("userId", "user_id"), ("anonymousId", "anonymous_id")] {
        match obj.get(key) {
            Some(Value::String(s)) => b.push(column.into(), key, Cell::Text(s.clone())),
            Some(Value::Number(n)) => b.push(column.into(), key, Cell::Text(n.to_string())),
            _ => {}
        }
    }
    if let Some(Value::Object(context)) = obj.get("context") {
        b.flatten("context", "context", context, 0);
    }
    b
}

/// The rows event `body` of source `source` loads, with `id` the job's
/// messageId (a destination function may have changed the body's; the
/// body must still have one); `Err`: it cannot load at all (not a JSON
/// object, no messageId, a type with no table).
fn rows_of(source: &str, id: &str, body: &[u8]) -> Result<EventRows, String> {
    let event: Value = serde_json::from_slice(body).map_err(|e| format!("the event is not JSON: {e}"))?;
    let obj = event.as_object().ok_or("the event is not a JSON object")?;
    if !matches!(obj.get("messageId"), Some(Value::String(s)) if !s.is_empty()) {
        return Err("the event has no messageId".into());
    }
    let message_id = id.to_owned();
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
    let table = match kind {
        "track" => "tracks",
        "identify" => "identifies",
        "page" => "pages",
        "screen" => "screens",
        "group" => "groups",
        "alias" => "aliases",
        other => return Err(format!("events of type {other:?} have no table")),
    };
    let mut conflicts = Vec::new();
    let text = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_owned);
    let object = |key: &str| obj.get(key).and_then(Value::as_object);
    let mut rows = Vec::new();
    let mut b = common_row(obj, &message_id, table, &mut conflicts);
    match kind {
        "track" => {
            let event = text("event").ok_or("the track event has no event name")?;
            b.push("event".into(), "event", Cell::Text(snake(&event)));
            b.push("event_text".into(), "event", Cell::Text(event.clone()));
            rows.push(b.finish());
            if let Some(event_table) = event_table(&event) {
                let mut e = common_row(obj, &message_id, &event_table, &mut conflicts);
                e.push("event".into(), "event", Cell::Text(snake(&event)));
                e.push("event_text".into(), "event", Cell::Text(event.clone()));
                if let Some(p) = object("properties") {
                    e.flatten("", "properties", p, 0);
                }
                rows.push(e.finish());
            }
        }
        "identify" | "group" => {
            if kind == "group" {
                if let Some(v) = obj.get("groupId") {
                    b.scalar("group_id".into(), "groupId", v);
                }
            }
            if let Some(t) = object("traits") {
                b.flatten("", "traits", t, 0);
            }
            rows.push(b.finish());
        }
        "page" | "screen" => {
            for (key, column) in [("name", "name"), ("category", "category")] {
                if let Some(v) = obj.get(key) {
                    b.scalar(column.into(), key, v);
                }
            }
            if let Some(p) = object("properties") {
                b.flatten("", "properties", p, 0);
            }
            rows.push(b.finish());
        }
        _ => {
            if let Some(v) = obj.get("previousId") {
                b.scalar("previous_id".into(), "previousId", v);
            }
            rows.push(b.finish());
        }
    }
    Ok(EventRows { schema: schema_name(source), message_id, rows, conflicts })
}

/// Column name → type (`format_type`), per table, per schema.
type Tables = HashMap<String, HashMap<String, String>>;

/// One database's pool and what it knows of the schemas there.
pub(crate) struct Warehouse {
    pool: PgPool,
    /// The URL without password or query.
    display: String,
    /// Schemas read from the catalog (dropped on an error).
    /// Shared, not copied, by each load that reads one.
    schemas: Mutex<HashMap<String, Arc<Tables>>>,
    /// Conflicts recorded since the last log line, and when it was.
    conflicts_logged: Mutex<(u64, Option<Instant>)>,
}

/// What identifies a pool.
#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    url: String,
    allow_private_network: bool,
    timeout: Duration,
}

/// The pools of every `postgres` destination of this process: one per
/// database (and settings).
#[derive(Clone)]
pub struct Warehouses {
    by_key: Clients<PoolKey, Arc<Warehouse>>,
}

impl Default for Warehouses {
    fn default() -> Self {
        Warehouses { by_key: Clients::new(IDLE, None) }
    }
}

/// Why a load failed.
enum LoadError {
    /// The server, the connection, a lock or a timeout: every job is
    /// retried as it is, without splitting the batch.
    Whole(String),
    /// Something about some rows (a value the server refuses, a table it
    /// cannot insert into): the batch is split to find the jobs; a job
    /// alone with it is discarded (`discard`: the data) or retried (the
    /// table, which an operator can mend).
    Rows { why: String, discard: bool },
}

fn classify(e: &sqlx::Error) -> LoadError {
    let why = describe(e);
    match e {
        sqlx::Error::Database(d) => match d.code().as_deref().map(|c| &c[..2.min(c.len())]) {
            // Connection, authentication, database missing, deadlock, resources, lock not available, shutdown, system.
            Some("08" | "28" | "3D" | "40" | "53" | "55" | "57" | "58" | "XX") | None => LoadError::Whole(why),
            // Data exceptions, integrity violations, program limits (a row too large).
            Some("22" | "23" | "54") => LoadError::Rows { why, discard: true },
            _ => LoadError::Rows { why, discard: false },
        },
        _ => LoadError::Whole(why),
    }
}

fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => format!("PostgreSQL: {} (SQLSTATE {})", d.message(), d.code().unwrap_or_default()),
        other => format!("PostgreSQL: {other}"),
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `s` in COPY's text format (PostgreSQL text holds no NUL: U+FFFD instead).
fn copy_escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// Rows of text fields (`None`: NULL) in COPY's text format.
fn copy_rows<'a>(rows: impl Iterator<Item = Vec<Option<&'a str>>>) -> String {
    let mut out = String::new();
    for fields in rows {
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                out.push('\t');
            }
            match f {
                Some(text) => copy_escape(text, &mut out),
                None => out.push_str("\\N"),
            }
        }
        out.push('\n');
    }
    out
}

impl Warehouses {
    /// Take out the pools of databases no `postgres` destination's URL in `live` names.
    pub(crate) fn take_unused(&self, live: &[&str]) -> Vec<Arc<Warehouse>> {
        self.by_key.take_unless(|k| live.contains(&k.url.as_str()))
    }
}

impl Warehouses {
    /// Load `jobs` into the database at `url`; one [`Attempt`] per job, in
    /// order. Never fails.
    pub async fn load(&self, url: &str, allow_private_network: bool, timeout: Duration, jobs: &[Load<'_>]) -> Vec<Attempt> {
        let started = Instant::now();
        let attempt =
            |verdict: Verdict, error: Option<String>| Attempt { verdict, status: None, error, retry_after: None, elapsed: started.elapsed() };
        let warehouse = match self.warehouse(url, allow_private_network, timeout).await {
            Ok(w) => w,
            Err((verdict, error)) => return jobs.iter().map(|_| attempt(verdict, Some(error.clone()))).collect(),
        };
        // Parsing thousands of events is CPU work: off the async workers.
        let owned: Vec<(String, String, Bytes)> = jobs.iter().map(|j| (j.source.to_owned(), j.message_id.to_owned(), j.body.clone())).collect();
        let parsed =
            match tokio::task::spawn_blocking(move || owned.iter().map(|(source, id, body)| rows_of(source, id, body)).collect::<Vec<_>>()).await {
                Ok(p) => p,
                Err(e) => return jobs.iter().map(|_| attempt(Verdict::Retry, Some(format!("parsing the events failed: {e}")))).collect(),
            };
        let mut out: Vec<Option<Attempt>> = Vec::with_capacity(jobs.len());
        let mut events = Vec::new();
        for (i, parsed) in parsed.into_iter().enumerate() {
            match parsed {
                Ok(rows) => {
                    events.push((i, rows));
                    out.push(None);
                }
                Err(why) => out.push(Some(attempt(Verdict::Discard, Some(why)))),
            }
        }
        // Parts of the batch to load, split in halves while some rows fail
        // (one bad event or table must not hold the others back), within a
        // budget of loads and time; what is left is retried.
        let deadline = started + timeout.saturating_mul(3);
        let mut budget = MAX_LOADS_PER_REQUEST;
        let mut parts: Vec<Vec<usize>> = if events.is_empty() { Vec::new() } else { vec![(0..events.len()).collect()] };
        while let Some(part) = parts.pop() {
            let mut set = |verdict: Verdict, why: Option<&str>| {
                for &p in &part {
                    out[events[p].0] = Some(attempt(verdict, why.map(str::to_owned)));
                }
            };
            if budget == 0 || Instant::now() >= deadline {
                set(Verdict::Retry, Some("not loaded: this request's loads were spent finding a failing event (it is retried)"));
                continue;
            }
            budget -= 1;
            let these: Vec<&EventRows> = part.iter().map(|&p| &events[p].1).collect();
            let result = match tokio::time::timeout(timeout, warehouse.load(&these)).await {
                Ok(r) => r,
                Err(_) => Err(LoadError::Whole(format!("the load did not finish within {timeout:?}"))),
            };
            match result {
                Ok(deferred) => {
                    set(Verdict::Succeeded, None);
                    for i in deferred {
                        out[events[part[i]].0] = Some(attempt(
                            Verdict::Retry,
                            Some(format!("waiting for schema changes (at most {MAX_DDL_PER_LOAD} per load; the next load makes more)")),
                        ));
                    }
                }
                Err(LoadError::Whole(why)) => set(Verdict::Retry, Some(&why)),
                Err(LoadError::Rows { why, discard }) if part.len() == 1 => set(if discard { Verdict::Discard } else { Verdict::Retry }, Some(&why)),
                Err(LoadError::Rows { .. }) => {
                    let (first, second) = part.split_at(part.len() / 2);
                    parts.push(second.to_vec());
                    parts.push(first.to_vec());
                }
            }
        }
        out.into_iter().map(|a| a.expect("every job has an outcome")).collect()
    }

    async fn warehouse(&self, url: &str, allow_private_network: bool, timeout: Duration) -> Result<Arc<Warehouse>, (Verdict, String)> {
        let key = PoolKey { url: url.to_owned(), allow_private_network, timeout };
        if let Some(kept) = self.by_key.get(&key) {
            return Ok(kept);
        }
        let link = sluice_sql::SqlLink::for_role(url, "postgres destination").map_err(|e| (Verdict::Discard, e.to_string()))?;
        let options: PgConnectOptions = link.postgres_options().cloned().ok_or((Verdict::Discard, "not a postgres:// URL".to_owned()))?;
        if !allow_private_network {
            check_server(&options).await?;
        }
        // A statement past the load's time is stopped by the server too (the client
        // gave up on it), and a transaction a timed-out load left open is ended.
        let ms = timeout.as_millis().max(1000);
        let options = options
            .application_name("sluice")
            .options([("statement_timeout", ms.to_string()), ("idle_in_transaction_session_timeout", (ms * 2).to_string())]);
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            .connect_lazy_with(options);
        let warehouse = Arc::new(Warehouse {
            pool,
            display: link.display().to_owned(),
            schemas: Mutex::new(HashMap::new()),
            conflicts_logged: Mutex::new((0, None)),
        });
        Ok(self.by_key.keep(key, warehouse))
    }
}

/// Resolve the server and refuse a non-public address.
async fn check_server(options: &PgConnectOptions) -> Result<(), (Verdict, String)> {
    let local = |what: String| {
        (Verdict::Discard, format!("refused by the SSRF guard: {what} is a Unix socket, a local address (set allow_private_network to allow it)"))
    };
    // A socket (`?host=/dir`, a percent-encoded path as the host) is what sqlx connects to
    // whatever the host name says: refuse it first.
    if let Some(socket) = options.get_socket() {
        return Err(local(socket.display().to_string()));
    }
    let host = options.get_host();
    if host.starts_with('/') {
        return Err(local(host.to_owned()));
    }
    check_public("PostgreSQL server", host, options.get_port()).await
}

/// A table's rows ready to load: the columns, their types, the values.
struct Staged {
    schema: String,
    table: String,
    columns: Vec<(String, String)>,
    /// Where each column is in `columns` (a table may have 1,000).
    position: HashMap<String, usize>,
    rows: Vec<Vec<Option<String>>>,
}

/// A conflict ready to record.
struct Recorded {
    schema: String,
    message_id: String,
    /// Its place among the event's conflicts (part of the key: two
    /// conflicts of one column are both kept).
    ordinal: usize,
    conflict: Conflict,
}

impl Warehouse {
    /// Load `events` in one transaction (after any DDL they need); the
    /// positions of the events not loaded because the schema changes they
    /// need are beyond this load's share ([`MAX_DDL_PER_LOAD`]).
    async fn load(&self, events: &[&EventRows]) -> Result<Vec<usize>, LoadError> {
        let schemas: Vec<&str> = {
            let mut seen = Vec::new();
            for e in events {
                if !seen.contains(&e.schema.as_str()) {
                    seen.push(e.schema.as_str());
                }
            }
            seen
        };
        let result = self.load_inner(events, &schemas).await;
        if result.is_err() {
            // The catalog may have changed (a column dropped, a table made by someone else).
            let mut cached = self.schemas.lock().expect("schemas lock");
            for s in &schemas {
                cached.remove(*s);
            }
        }
        result
    }

    async fn load_inner(&self, events: &[&EventRows], schemas: &[&str]) -> Result<Vec<usize>, LoadError> {
        let mut conn = self.pool.acquire().await.map_err(|e| classify(&e))?;
        let mut ddl_left = MAX_DDL_PER_LOAD;
        for schema in schemas {
            let of_schema: Vec<&EventRows> = events.iter().copied().filter(|e| e.schema == *schema).collect();
            ddl_left -= self.prepare(&mut conn, schema, &of_schema, ddl_left).await.map_err(|e| classify(&e))?;
        }
        let (staged, recorded, deferred) = self.stage(events);
        if staged.is_empty() && recorded.is_empty() {
            return Ok(deferred);
        }
        let steps = load_steps(&staged, &recorded, schemas);
        let mut tx = conn.begin().await.map_err(|e| classify(&e))?;
        for step in steps {
            run_step(&mut tx, step).await.map_err(|e| classify(&e))?;
        }
        tx.commit().await.map_err(|e| classify(&e))?;
        if !recorded.is_empty() {
            self.note_conflicts(recorded.len() as u64);
        }
        Ok(deferred)
    }

    /// Say how many values were set aside, at most once a minute.
    fn note_conflicts(&self, n: u64) {
        let mut logged = self.conflicts_logged.lock().expect("conflicts lock");
        logged.0 += n;
        if logged.1.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            tracing::warn!(
                database = %self.display,
                "postgres destination: {} values did not fit their columns and were recorded in {CONFLICTS} (said at most once a minute)",
                logged.0
            );
            *logged = (0, Some(Instant::now()));
        }
    }

    /// Make the schema, tables and columns `events` need that the catalog
    /// does not have (within the limits, at most `budget` statements), then
    /// read the catalog again; the statements made.
    async fn prepare(&self, conn: &mut sqlx::PgConnection, schema: &str, events: &[&EventRows], budget: usize) -> Result<usize, sqlx::Error> {
        let known = self.schemas.lock().expect("schemas lock").get(schema).cloned();
        let known = match known {
            Some(k) => k,
            None => {
                let read = Arc::new(read_schema(conn, schema).await?);
                self.schemas.lock().expect("schemas lock").insert(schema.to_owned(), read.clone());
                read
            }
        };
        let Some(ddl) = plan_ddl(schema, &known, events, budget) else { return Ok(0) };
        // Not counted: the schema and the conflicts table.
        let made = ddl.len() - 2;
        // In groups, each its own transaction: what a load that times out made stays made.
        for group in ddl.chunks(DDL_PER_TRANSACTION) {
            match run_ddl(conn, schema, group).await {
                Ok(()) => {}
                // A table's lock is held (an analyst's long query): the events needing its
                // change wait for a later load; the others load now.
                Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("55P03") => {
                    tracing::debug!(schema, "postgres destination: a table is locked; its schema change waits for a later load");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let read = Arc::new(read_schema(conn, schema).await?);
        self.schemas.lock().expect("schemas lock").insert(schema.to_owned(), read);
        Ok(made)
    }

    /// Each table's rows with the catalog's column types; values that do
    /// not fit, and rows for tables or columns over the limits, as
    /// conflicts; the positions of events needing a table or column not
    /// made yet (within the limits: a later load makes it), left out.
    fn stage(&self, events: &[&EventRows]) -> (Vec<Staged>, Vec<Recorded>, Vec<usize>) {
        let schemas = self.schemas.lock().expect("schemas lock");
        let mut staged: Vec<Staged> = Vec::new();
        let mut index: HashMap<(&str, &str), usize> = HashMap::new();
        let mut recorded = Vec::new();
        let mut deferred = Vec::new();
        // Per schema, not per event: a schema may have hundreds of tables.
        let mut event_tables_of: HashMap<&str, usize> = HashMap::new();
        for (position, e) in events.iter().enumerate() {
            let tables = schemas.get(&e.schema);
            let event_tables = *event_tables_of.entry(e.schema.as_str()).or_insert_with(|| tables.map_or(0, |t| event_table_count(t)));
            let waits = e.rows.iter().any(|row| match tables.and_then(|t| t.get(&row.table)) {
                None => FIXED_TABLES.contains(&row.table.as_str()) || event_tables < MAX_EVENT_TABLES,
                Some(columns) => columns.len() < MAX_COLUMNS && row.cells.iter().any(|(c, _)| !columns.contains_key(c)),
            });
            if waits {
                deferred.push(position);
                continue;
            }
            let mut ordinal = 0;
            let mut record = |recorded: &mut Vec<Recorded>, conflict: Conflict| {
                recorded.push(Recorded { schema: e.schema.clone(), message_id: e.message_id.clone(), ordinal, conflict });
                ordinal += 1;
            };
            for c in &e.conflicts {
                record(&mut recorded, c.clone());
            }
            for row in &e.rows {
                let Some(columns) = tables.and_then(|t| t.get(&row.table)) else {
                    record(
                        &mut recorded,
                        Conflict {
                            table: row.table.clone(),
                            column: String::new(),
                            reason: format!("not loaded: the schema has {MAX_EVENT_TABLES} event tables (the limit)"),
                            value: None,
                        },
                    );
                    continue;
                };
                let mut values: Vec<(&str, &str, String)> = Vec::with_capacity(row.cells.len());
                for (column, cell) in &row.cells {
                    match columns.get(column) {
                        Some(ty) if cell.fits(ty) => values.push((column, ty, cell.render(ty))),
                        Some(ty) => record(
                            &mut recorded,
                            Conflict {
                                table: row.table.clone(),
                                column: column.clone(),
                                reason: format!("the column is {ty}; the value is {}", cell.natural_type()),
                                value: Some(cell.as_json()),
                            },
                        ),
                        None => record(
                            &mut recorded,
                            Conflict {
                                table: row.table.clone(),
                                column: column.clone(),
                                reason: format!("not added: the table has {MAX_COLUMNS} columns (the limit)"),
                                value: Some(cell.as_json()),
                            },
                        ),
                    }
                }
                let at = *index.entry((e.schema.as_str(), row.table.as_str())).or_insert_with(|| {
                    staged.push(Staged {
                        schema: e.schema.clone(),
                        table: row.table.clone(),
                        columns: Vec::new(),
                        position: HashMap::new(),
                        rows: Vec::new(),
                    });
                    staged.len() - 1
                });
                let t = &mut staged[at];
                let mut fields = vec![None; t.columns.len()];
                for (column, ty, text) in values {
                    let i = match t.position.get(column) {
                        Some(&i) => i,
                        None => {
                            t.position.insert(column.to_owned(), t.columns.len());
                            t.columns.push((column.to_owned(), ty.to_owned()));
                            for r in &mut t.rows {
                                r.push(None);
                            }
                            fields.push(None);
                            t.columns.len() - 1
                        }
                    };
                    fields[i] = Some(text);
                }
                t.rows.push(fields);
            }
        }
        (staged, recorded, deferred)
    }
}

/// One transaction of schema changes in `schema`.
async fn run_ddl(conn: &mut sqlx::PgConnection, schema: &str, statements: &[String]) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    // A table's lock behind a long query: give up soon rather than queue
    // every reader of the table behind this `ALTER TABLE`.
    (&mut *tx).execute(format!("SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'").as_str()).await?;
    // One schema's DDL at a time, across processes: concurrent `CREATE TABLE IF NOT EXISTS` can fail.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1)::bigint)").bind(format!("sluice-warehouse:{schema}")).execute(&mut *tx).await?;
    for statement in statements {
        (&mut *tx).execute(statement.as_str()).await?;
    }
    tx.commit().await
}

/// One statement of a load's transaction.
enum Step {
    Execute(String),
    /// `COPY … FROM STDIN` and its data.
    Copy(String, String),
}

async fn run_step(conn: &mut sqlx::PgConnection, step: Step) -> Result<(), sqlx::Error> {
    match step {
        Step::Execute(sql) => {
            conn.execute(sql.as_str()).await?;
        }
        Step::Copy(sql, data) => {
            let mut copy = conn.copy_in_raw(&sql).await?;
            copy.send(data.as_bytes()).await?;
            copy.finish().await?;
        }
    }
    Ok(())
}

/// The statements that load `staged` and record `recorded`: each table's
/// rows copied into a staging table, then inserted unless their id is there.
fn load_steps(staged: &[Staged], recorded: &[Recorded], schemas: &[&str]) -> Vec<Step> {
    let mut steps = Vec::new();
    for (n, t) in staged.iter().enumerate() {
        let stage = format!("sluice_stage_{n}");
        let columns: Vec<String> = t.columns.iter().map(|(c, _)| quote(c)).collect();
        let defs: Vec<String> = columns.iter().map(|c| format!("{c} text")).collect();
        steps.push(Step::Execute(format!("CREATE TEMP TABLE {stage} ({}) ON COMMIT DROP", defs.join(", "))));
        let data = copy_rows(t.rows.iter().map(|r| r.iter().map(Option::as_deref).collect()));
        steps.push(Step::Copy(format!("COPY {stage} ({}) FROM STDIN", columns.join(", ")), data));
        // No cast to text types: an explicit cast to varchar(n) would cut a
        // longer value short; the insert's own assignment refuses it instead.
        let casts: Vec<String> = t
            .columns
            .iter()
            .map(|(c, ty)| if ty == "text" || ty.starts_with("character") { quote(c) } else { format!("{}::{ty}", quote(c)) })
            .collect();
        steps.push(Step::Execute(format!(
            "INSERT INTO {}.{} ({}) SELECT {} FROM {stage} ON CONFLICT (id) DO NOTHING",
            quote(&t.schema),
            quote(&t.table),
            columns.join(", "),
            casts.join(", ")
        )));
    }
    if !recorded.is_empty() {
        let ordinals: Vec<String> = recorded.iter().map(|r| r.ordinal.to_string()).collect();
        let data = copy_rows(recorded.iter().zip(&ordinals).map(|(r, ordinal)| {
            vec![
                Some(r.schema.as_str()),
                Some(r.message_id.as_str()),
                Some(ordinal.as_str()),
                Some(r.conflict.table.as_str()),
                Some(r.conflict.column.as_str()),
                Some(r.conflict.reason.as_str()),
                r.conflict.value.as_deref(),
            ]
        }));
        steps.push(Step::Execute(
            "CREATE TEMP TABLE sluice_stage_conflicts (schema_name text, message_id text, ordinal int, table_name text, column_name text, reason text, value text) \
             ON COMMIT DROP"
                .into(),
        ));
        steps.push(Step::Copy("COPY sluice_stage_conflicts FROM STDIN".into(), data));
        for schema in schemas {
            // Schema names are snake case ([a-z0-9_]): safe as a literal.
            steps.push(Step::Execute(format!(
                "INSERT INTO {}.{CONFLICTS} (message_id, ordinal, table_name, column_name, reason, value) \
                 SELECT message_id, ordinal, table_name, column_name, reason, value FROM sluice_stage_conflicts WHERE schema_name = '{schema}' \
                 ON CONFLICT DO NOTHING",
                quote(schema)
            )));
        }
    }
    steps
}

/// The DDL `events` need in `schema` beyond what the catalog has
/// (`known`), within the limits, at most `budget` tables and columns, in
/// the order the events need them (a table before its columns); `None`:
/// nothing to make.
fn plan_ddl(schema: &str, known: &Tables, events: &[&EventRows], budget: usize) -> Option<Vec<String>> {
    let s = quote(schema);
    let mut made: Vec<String> = Vec::new();
    let mut new_tables: HashSet<&str> = HashSet::new();
    let mut event_tables = event_table_count(known);
    let mut columns_of: HashMap<&str, usize> = known.iter().map(|(t, c)| (t.as_str(), c.len())).collect();
    let mut planned: HashSet<(&str, &str)> = HashSet::new();
    'events: for e in events {
        for row in &e.rows {
            let table = row.table.as_str();
            if !known.contains_key(table) && !new_tables.contains(table) {
                if !FIXED_TABLES.contains(&table) && event_tables >= MAX_EVENT_TABLES {
                    continue;
                }
                if made.len() >= budget {
                    break 'events;
                }
                if !FIXED_TABLES.contains(&table) {
                    event_tables += 1;
                }
                new_tables.insert(table);
                // `id` and `uuid_ts`.
                columns_of.insert(table, 2);
                made.push(format!(
                    "CREATE TABLE IF NOT EXISTS {s}.{} (id text PRIMARY KEY, uuid_ts timestamptz NOT NULL DEFAULT now())",
                    quote(table)
                ));
            }
            for (column, cell) in &row.cells {
                if known.get(table).is_some_and(|c| c.contains_key(column)) || column == "id" || planned.contains(&(table, column.as_str())) {
                    continue;
                }
                let count = columns_of.entry(table).or_insert(2);
                if *count >= MAX_COLUMNS {
                    continue;
                }
                if made.len() >= budget {
                    break 'events;
                }
                planned.insert((table, column.as_str()));
                *count += 1;
                made.push(format!("ALTER TABLE {s}.{} ADD COLUMN IF NOT EXISTS {} {}", quote(table), quote(column), cell.natural_type()));
            }
        }
    }
    if made.is_empty() && known.contains_key(CONFLICTS) {
        return None;
    }
    let mut ddl = vec![
        format!("CREATE SCHEMA IF NOT EXISTS {s}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {s}.{CONFLICTS} (message_id text NOT NULL, ordinal int NOT NULL, table_name text NOT NULL, \
             column_name text NOT NULL, reason text NOT NULL, value text, recorded_at timestamptz NOT NULL DEFAULT now(), \
             PRIMARY KEY (message_id, ordinal))"
        ),
    ];
    ddl.extend(made);
    Some(ddl)
}

/// The per-event tables among `tables`.
fn event_table_count(tables: &Tables) -> usize {
    tables.keys().filter(|t| !FIXED_TABLES.contains(&t.as_str())).count()
}

/// The tables of `schema` and their columns' types.
async fn read_schema(conn: &mut sqlx::PgConnection, schema: &str) -> Result<Tables, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await?;
    let mut tables = Tables::new();
    for r in rows {
        let (table, column, ty): (String, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        tables.entry(table).or_default().insert(column, ty);
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_snake_case_ascii_and_bounded() {
        assert_eq!(snake("productId"), "product_id");
        assert_eq!(snake("Order Completed"), "order_completed");
        assert_eq!(snake("URL"), "url");
        assert_eq!(snake("pageURL2x"), "page_url2x");
        assert_eq!(snake("  --a--b--  "), "a_b");
        assert_eq!(snake("3d view"), "_3d_view");
        assert_eq!(snake("émoji 🙂"), "moji");
        assert_eq!(snake("🙂"), "");
        assert_eq!(snake("x\"; DROP TABLE t; --"), "x_drop_table_t");
        assert_eq!(snake(&"a".repeat(100)).len(), 63);
        assert_eq!(schema_name("web-App"), "web_app");
        assert_eq!(schema_name("pg_catalog"), "src_pg_catalog");
        assert_eq!(event_table("Tracks").as_deref(), Some("event_tracks"));
        assert_eq!(event_table("sluice_type_conflicts").as_deref(), Some("event_sluice_type_conflicts"));
        assert_eq!(event_table("!!!"), None);
    }

    #[test]
    fn a_track_event_makes_a_tracks_row_and_an_event_table_row() {
        let body = br#"{"type":"track","messageId":"m1","event":"Order Completed","userId":"u1","timestamp":"2026-01-02T03:04:05.678Z",
            "sentAt":"yesterday","context":{"library":{"name":"analytics-python"},"ip":"1.2.3.4"},
            "properties":{"total":12.5,"count":3,"paid":true,"items":[1,2],"shipping":{"city":"Oslo","geo":{"lat":1,"lon":2,"deep":{"x":{"y":1}}}},
            "productId":"p","product_id":"q","id":"not the id","none":null}}"#;
        let e = rows_of("web", "m1", body).unwrap();
        assert_eq!((e.schema.as_str(), e.message_id.as_str()), ("web", "m1"));
        let tracks = &e.rows[0];
        assert_eq!(tracks.table, "tracks");
        let get = |row: &Row, c: &str| row.cells.iter().find(|(n, _)| n == c).map(|(_, v)| v.clone());
        assert_eq!(get(tracks, "id"), Some(Cell::Text("m1".into())));
        assert_eq!(get(tracks, "event"), Some(Cell::Text("order_completed".into())));
        assert_eq!(get(tracks, "event_text"), Some(Cell::Text("Order Completed".into())));
        assert_eq!(get(tracks, "context_library_name"), Some(Cell::Text("analytics-python".into())));
        assert_eq!(get(tracks, "timestamp"), Some(Cell::Time("2026-01-02T03:04:05.678Z".into())));
        assert_eq!(get(tracks, "total"), None, "properties only in the event table");
        let order = &e.rows[1];
        assert_eq!(order.table, "order_completed");
        assert_eq!(get(order, "total"), Some(Cell::Float(12.5)));
        assert_eq!(get(order, "count"), Some(Cell::Int(3)));
        assert_eq!(get(order, "paid"), Some(Cell::Bool(true)));
        assert_eq!(get(order, "items"), Some(Cell::Json("[1,2]".into())));
        assert_eq!(get(order, "shipping_city"), Some(Cell::Text("Oslo".into())));
        assert_eq!(get(order, "shipping_geo_lat"), Some(Cell::Int(1)));
        // Depth 4: the object at the fourth level is kept whole.
        assert_eq!(get(order, "shipping_geo_deep_x"), Some(Cell::Json(r#"{"y":1}"#.into())));
        assert_eq!(get(order, "none"), None);
        assert_eq!(get(order, "id"), Some(Cell::Text("m1".into())), "a property named id does not replace the messageId");
        // `sentAt` that is no timestamp, the second `product_id`, the property `id`: recorded, per table.
        let reasons: Vec<(&str, &str)> = e.conflicts.iter().map(|c| (c.table.as_str(), c.column.as_str())).collect();
        assert!(reasons.contains(&("tracks", "sent_at")) && reasons.contains(&("order_completed", "sent_at")), "{reasons:?}");
        assert!(reasons.contains(&("order_completed", "product_id")), "{reasons:?}");
        assert!(reasons.contains(&("order_completed", "id")), "{reasons:?}");
    }

    #[test]
    fn events_that_cannot_load_say_why() {
        for (body, why) in [
            (&b"[1]"[..], "not a JSON object"),
            (b"{", "not JSON"),
            (br#"{"type":"track","event":"x"}"#, "no messageId"),
            (br#"{"type":"track","messageId":"m"}"#, "no event name"),
            (br#"{"type":"batch","messageId":"m"}"#, "have no table"),
        ] {
            let err = rows_of("s", "m", body).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        let alias = rows_of("s", "m", br#"{"type":"alias","messageId":"m","previousId":"old","userId":"new"}"#).unwrap();
        assert_eq!(alias.rows[0].table, "aliases");
        let group = rows_of("s", "m", br#"{"type":"group","messageId":"m","groupId":"g","traits":{"plan":"pro"}}"#).unwrap();
        assert_eq!(group.rows[0].cells.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), ["id", "group_id", "plan"]);
    }

    #[test]
    fn urls_are_checked_as_the_jobdb_links_are() {
        assert!(check_url("postgres://u:p@h:5432/db").is_ok());
        assert!(check_url("postgres://u:p@h/db?sslmode=verify-full").is_ok());
        for (url, why) in [
            ("postgres://h/db?sslmode=prefer", "plain text"),
            ("postgres://u:p/ss@h/db", "URL"),
            ("mysql://h/db", "not a postgres"),
            ("postgres://h/db?user=u&password=s3cret", "user info"),
        ] {
            let err = check_url(url).map(|_| ()).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("ss@h") && !err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn the_ssrf_guard_refuses_sockets_and_private_servers_however_named() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for url in [
            "postgres://u@8.8.8.8:5432/db?host=/tmp",
            "postgres://u@8.8.8.8:5432/db?host=%2Ftmp%2Fpg",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/db",
            "postgres://u@127.0.0.1/db",
            "postgres://u@[::1]:5432/db",
            "postgres://u@[::ffff:127.0.0.1]:5432/db",
        ] {
            let options: PgConnectOptions = url.parse().unwrap();
            let (verdict, why) = rt.block_on(check_server(&options)).unwrap_err();
            assert_eq!(verdict, Verdict::Discard, "{url}: {why}");
            assert!(why.contains("SSRF guard"), "{url}: {why}");
        }
        let public: PgConnectOptions = "postgres://u@[2001:4860:4860::8888]:5432/db".parse().unwrap();
        assert!(rt.block_on(check_server(&public)).is_ok());
    }

    #[test]
    fn timestamps_postgres_cannot_hold_and_the_load_time_are_conflicts() {
        let e = rows_of(
            "s",
            "m",
            br#"{"type":"track","messageId":"m","event":"E","timestamp":"0000-01-01T00:00:00Z","sentAt":"2020-01-01T00:00:00+23:59","properties":{"uuid_ts":"1999-01-01T00:00:00Z"}}"#,
        )
        .unwrap();
        let columns: Vec<(&str, &str)> = e.conflicts.iter().map(|c| (c.table.as_str(), c.column.as_str())).collect();
        assert!(columns.contains(&("tracks", "timestamp")) && columns.contains(&("e", "uuid_ts")), "{columns:?}");
        // RFC 3339 allows offsets to ±23:59, PostgreSQL to ±15:59: a conflict, not a discarded event.
        assert!(columns.contains(&("tracks", "sent_at")), "{columns:?}");
        assert!(e.rows.iter().all(|r| r.cells.iter().all(|(c, _)| c != "uuid_ts" && c != "timestamp" && c != "sent_at")));
        assert!(is_timestamp("2020-01-01T00:00:00+15:59") && !is_timestamp("2020-01-01T00:00:00-16:00"));
    }

    #[test]
    fn values_fit_their_columns_or_are_conflicts() {
        assert!(Cell::Int(1).fits("double precision") && Cell::Int(1).fits("text") && Cell::Int(1).fits("numeric(10,2)"));
        assert!(!Cell::Float(1.5).fits("bigint") && !Cell::Text("1".into()).fits("bigint") && !Cell::Bool(true).fits("bigint"));
        assert!(!Cell::Int(1 << 40).fits("integer") && Cell::Int(7).fits("smallint"));
        assert!(Cell::Text("2026-01-01T00:00:00Z".into()).fits("timestamp with time zone"));
        assert!(!Cell::Text("soon".into()).fits("timestamp with time zone"));
        assert!(!Cell::Text("x".into()).fits("bytea") && !Cell::Text("x".into()).fits("USER-DEFINED"));
        assert_eq!(Cell::Text("a\"b".into()).render("jsonb"), r#""a\"b""#);
        assert_eq!(Cell::Float(1e300).render("double precision"), "1e300");
        let mut out = String::new();
        copy_escape("a\tb\nc\\d\re\0", &mut out);
        assert_eq!(out, "a\\tb\\nc\\\\d\\re\u{FFFD}");
        assert_eq!(copy_rows([vec![Some("x"), None]].into_iter()), "x\t\\N\n");
    }
}

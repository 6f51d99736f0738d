//! A link to a MySQL/MariaDB or PostgreSQL database (sqlx): the URL and
//! its TLS mode, connections, the schema lock, and locks held by a session.
//!
//! Invariants:
//! - A URL's TLS mode is explicit: named nowhere, the link is plain text;
//!   modes that may fall back to plain text are refused ([`SqlLink::new`]).
//! - URLs are shown redacted ([`redact`]): no password, no query.
//! - Schema is created under a database lock ([`CreateSchema`]): PostgreSQL
//!   `pg_advisory_xact_lock` in one transaction, MySQL `GET_LOCK`, taken by
//!   every creator of Sluice tables, since concurrent `CREATE TABLE IF NOT
//!   EXISTS` can fail on PostgreSQL; a creator that still loses a race (a
//!   process without the lock) retries a few times.
//! - Durability is the server's: PostgreSQL sessions set
//!   `synchronous_commit = on`; MySQL needs `innodb_flush_log_at_trx_commit
//!   = 1` (its default).
//! - A [`SessionLock`] lives as long as the session that took it: the
//!   server releases it when the connection dies. Lock names carry the
//!   database as the server sees it, so two spellings of one database take
//!   the same locks.

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlSslMode};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use sqlx::{ConnectOptions, Row};

use crate::conn::{Connection, SqlError, SqlRow};
use crate::Error;

/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The database server kind a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlEngine {
    /// MySQL or MariaDB (`mysql://` or `mariadb://`).
    MySql,
    /// PostgreSQL (`postgres://` or `postgresql://`).
    Postgres,
}

#[derive(Clone)]
enum Options {
    MySql(MySqlConnectOptions),
    Postgres(PgConnectOptions),
}

/// A database named by its URL: how to connect to it, and what it is called.
#[derive(Clone)]
pub struct SqlLink {
    engine: SqlEngine,
    options: Options,
    /// Whether the link is encrypted (the URL named a TLS mode other than disable).
    tls: bool,
    /// The URL without password or query, for logs.
    display: String,
    /// The database as the server sees it (see [`SqlLink::database`]).
    database: String,
}

impl std::fmt::Debug for SqlLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlLink").field("engine", &self.engine).field("url", &self.display).finish()
    }
}

/// One open connection and the runtime that drives it (inside a
/// [`crate::Connection`]).
pub struct Session {
    pub(crate) rt: SessionRuntime,
    pub(crate) conn: Conn,
}

/// A current-thread runtime that may be dropped anywhere, even on an async
/// thread (a plain `Runtime` panics there): it shuts down in the background.
pub(crate) struct SessionRuntime(Option<tokio::runtime::Runtime>);

impl SessionRuntime {
    pub(crate) fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        match &self.0 {
            Some(rt) => rt.block_on(future),
            None => unreachable!("the runtime is only taken when the session is dropped"),
        }
    }
}

impl Drop for SessionRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub(crate) enum Conn {
    MySql(MySqlConnection),
    Postgres(PgConnection),
}

/// Run `f` here, or on a scoped thread when this thread is inside a tokio
/// runtime (a session's own runtime cannot block there: tests and
/// benchmarks open the Catalog from async code).
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|scope| match scope.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// `?` placeholders to PostgreSQL's `$1, $2, ...` (our statements have no `?` in literals).
pub fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for ch in sql.chars() {
        if ch == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(ch);
        }
    }
    out
}

/// The advisory lock key that serializes Sluice's schema changes in a PostgreSQL database.
pub const PG_SCHEMA_LOCK: i64 = 0x736C_7569_6365; // "sluice" in ASCII
/// How long a creator waits for another's schema change (MySQL `GET_LOCK`, s).
const SCHEMA_LOCK_WAIT_SECS: i64 = 60;
/// Attempts of a schema creation that lost a race all the same.
const SCHEMA_ATTEMPTS: u32 = 5;

/// What [`CreateSchema::create_schema`] returns.
pub type SchemaFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), sqlx::Error>> + 'a>>;

/// Creating Sluice's tables in the shared database, safe when processes do
/// it at the same moment: the one helper every creator of schema goes
/// through (JobDBs, their registry, the control tables, the directory).
///
/// `ddl` runs under a lock held by this connection: PostgreSQL
/// `pg_advisory_xact_lock(PG_SCHEMA_LOCK)` (per database) inside one
/// transaction, so the statements also commit together; MySQL/MariaDB
/// `GET_LOCK('sluice_schema.<database>')` (DDL commits by itself there),
/// released after. A database error (a race lost to a process that does
/// not take the lock, a deadlock) is retried up to `SCHEMA_ATTEMPTS` (5) times
/// with a short backoff; `ddl` must be idempotent.
pub trait CreateSchema {
    fn create_schema<'a>(&'a mut self, ddl: &'a [String]) -> SchemaFuture<'a>;
}

impl CreateSchema for PgConnection {
    fn create_schema<'a>(&'a mut self, ddl: &'a [String]) -> SchemaFuture<'a> {
        Box::pin(async move {
            let mut attempt = 1;
            loop {
                sqlx::raw_sql("BEGIN").execute(&mut *self).await?;
                let once = async {
                    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_SCHEMA_LOCK).execute(&mut *self).await?;
                    for statement in ddl {
                        sqlx::raw_sql(statement).execute(&mut *self).await?;
                    }
                    sqlx::raw_sql("COMMIT").execute(&mut *self).await.map(drop)
                }
                .await;
                let Err(e) = once else { return Ok(()) };
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *self).await;
                if !schema_retry(&e, &mut attempt).await {
                    return Err(e);
                }
            }
        })
    }
}

impl CreateSchema for MySqlConnection {
    fn create_schema<'a>(&'a mut self, ddl: &'a [String]) -> SchemaFuture<'a> {
        Box::pin(async move {
            let mut attempt = 1;
            loop {
                // GET_LOCK is server-wide: the name carries the database (64 characters at most).
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(LEFT(CONCAT('sluice_schema.', COALESCE(DATABASE(), '')), 64), ?)")
                    .bind(SCHEMA_LOCK_WAIT_SECS)
                    .fetch_one(&mut *self)
                    .await?;
                if got != Some(1) {
                    return Err(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the schema lock (GET_LOCK) was not granted within {SCHEMA_LOCK_WAIT_SECS} s"),
                    )));
                }
                let once = async {
                    for statement in ddl {
                        sqlx::raw_sql(statement).execute(&mut *self).await?;
                    }
                    Ok::<_, sqlx::Error>(())
                }
                .await;
                let released =
                    sqlx::query("SELECT RELEASE_LOCK(LEFT(CONCAT('sluice_schema.', COALESCE(DATABASE(), '')), 64))").execute(&mut *self).await;
                let Err(e) = once else { return released.map(drop) };
                if !schema_retry(&e, &mut attempt).await {
                    return Err(e);
                }
            }
        })
    }
}

/// After a failed schema creation: wait and say whether to try again (a
/// database error, attempts left).
async fn schema_retry(e: &sqlx::Error, attempt: &mut u32) -> bool {
    if !matches!(e, sqlx::Error::Database(_)) || *attempt >= SCHEMA_ATTEMPTS {
        return false;
    }
    let wait = Duration::from_millis(50 << *attempt) + Duration::from_millis(rand::random::<u64>() % 50);
    tracing::warn!(error = %e, attempt = *attempt, ?wait, "creating Sluice's tables lost a race with another process; trying again");
    *attempt += 1;
    tokio::time::sleep(wait).await;
    true
}

/// The PostgreSQL URL parameters sqlx reads besides the TLS ones (it
/// ignores others, and logs their values: its log target is silenced).
const PG_OTHER_PARAMS: [&str; 9] =
    ["statement-cache-capacity", "host", "hostaddr", "port", "dbname", "user", "password", "application_name", "options"];

/// The URL query parameters that configure TLS, besides the mode.
const TLS_FILE_PARAMS: [&str; 8] = ["sslrootcert", "ssl-root-cert", "ssl-ca", "sslca", "sslcert", "ssl-cert", "sslkey", "ssl-key"];

/// Log `message` about `link` (its redacted URL) once per process: the URL
/// is parsed by every user of the link (JobDBs, control tables, directory).
fn log_once(link: &str, level: tracing::Level, message: &str) {
    static LOGGED: std::sync::Mutex<Option<HashSet<String>>> = std::sync::Mutex::new(None);
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    if !logged.get_or_insert_with(HashSet::new).insert(format!("{link} {message}")) {
        return;
    }
    if level == tracing::Level::WARN {
        tracing::warn!(url = %link, "{message}");
    } else {
        tracing::info!(url = %link, "{message}");
    }
}

impl SqlLink {
    /// The database at `url` (`mysql://`, `mariadb://`,
    /// `postgres://` or `postgresql://`). Nothing is connected yet.
    ///
    /// TLS: the URL's `sslmode` / `ssl-mode` (PostgreSQL also `PGSSLMODE`)
    /// decides. Named nowhere: plain text, set explicitly (sqlx's default
    /// would try TLS without verifying the certificate and fall back to
    /// plain text). `allow`, `prefer` and `preferred` may fall back to plain
    /// text and are refused; `require` / `required` encrypt without
    /// verifying the server's certificate (a warning); `verify-ca`,
    /// `verify-full`, `VERIFY_CA` and `VERIFY_IDENTITY` verify it. A
    /// certificate or key parameter without a mode is refused: it would be
    /// unused.
    pub fn new(url: &str) -> Result<SqlLink, Error> {
        SqlLink::for_role(url, "jobdb")
    }

    /// [`SqlLink::new`] for a link of another role (`role` names it in the
    /// log line that says whether it is encrypted).
    pub fn for_role(url: &str, role: &str) -> Result<SqlLink, Error> {
        let display = redact(url);
        let bad = |why: &str| Error::Url(format!("{display}: {why}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if split_password(&parsed) {
            return Err(bad("percent-encode the user name and password ('@' as %40, '/' as %2F, '#' as %23, ':' as %3A)"));
        }
        let engine = match parsed.scheme() {
            "mysql" | "mariadb" => SqlEngine::MySql,
            "postgres" | "postgresql" => SqlEngine::Postgres,
            other => return Err(bad(&format!("unknown scheme {other:?} (mysql, mariadb, postgres)"))),
        };
        // Where the TLS mode comes from (sqlx cannot tell an unnamed mode from `prefer`).
        let mut named: Option<(String, String)> = None;
        let mut files = Vec::new();
        for (k, v) in parsed.query_pairs() {
            if k == "sslmode" || k == "ssl-mode" {
                // The driver takes the last: `verify-full&…&sslmode=disable` would be plain text.
                if let Some((first, value)) = &named {
                    return Err(bad(&format!("the TLS mode is given twice ({first}={value} and {k}={v}): give it once")));
                }
                named = Some((k.into_owned(), v.into_owned()));
            } else if TLS_FILE_PARAMS.contains(&&*k) {
                files.push((k.into_owned(), v.into_owned()));
            } else if k.to_ascii_lowercase().contains("ssl") || k.to_ascii_lowercase().contains("tls") {
                // `SSLMODE=`, `ssl_mode=`: the driver ignores them, leaving the link in plain text.
                return Err(bad(&format!("{k:?} is not a TLS parameter (sslmode / ssl-mode, {})", TLS_FILE_PARAMS.join(", "))));
            } else if engine == SqlEngine::Postgres && !PG_OTHER_PARAMS.contains(&&*k) {
                // By name only: sqlx's own warning prints the value (a mistyped `password`).
                log_once(&display, tracing::Level::WARN, &format!("the URL parameter {k:?} is not one PostgreSQL links take; it is ignored"));
            }
        }
        if named.is_none() && engine == SqlEngine::Postgres {
            if let Ok(v) = std::env::var("PGSSLMODE") {
                if v.parse::<PgSslMode>().is_err() {
                    return Err(bad(&format!("the environment's PGSSLMODE={v:?} is not a TLS mode")));
                }
                named = Some(("PGSSLMODE".to_owned(), v));
            }
        }
        if named.is_none() {
            if let Some((k, _)) = files.first() {
                let mode = if engine == SqlEngine::Postgres { "sslmode=verify-full" } else { "ssl-mode=VERIFY_IDENTITY" };
                return Err(bad(&format!("{k} is given but no TLS mode, so the link would be plain text: add {mode}")));
            }
        }
        for (k, path) in &files {
            std::fs::File::open(path).map_err(|e| bad(&format!("{k}: cannot read {path}: {e}")))?;
        }
        let setting = named.as_ref().map(|(k, v)| format!("{k}={v}"));
        let fallback = |setting: &Option<String>| {
            let s = setting.as_deref().unwrap_or_default();
            bad(&format!(
                "{s} may fall back to plain text: use disable, require, verify-ca or verify-full (PostgreSQL), \
                 or DISABLED, REQUIRED, VERIFY_CA or VERIFY_IDENTITY (MySQL)"
            ))
        };
        // What the mode checks of the server. (sqlx with rustls checks the
        // host name at verify-ca too, so the two verify modes are one here.)
        #[derive(PartialEq)]
        enum Link {
            Plain,
            Unverified,
            Verified,
        }
        let (options, link, verify) = match engine {
            SqlEngine::MySql => {
                let mut mysql_url = parsed.clone();
                mysql_url.set_scheme("mysql").map_err(|()| bad("cannot use it as a mysql:// URL"))?;
                let mut o = MySqlConnectOptions::from_str(mysql_url.as_str()).map_err(|e| bad(&e.to_string()))?;
                if o.get_database().unwrap_or_default().is_empty() {
                    return Err(bad("name the database in the URL (mysql://user:password@host:port/database)"));
                }
                if named.is_none() {
                    o = o.ssl_mode(MySqlSslMode::Disabled);
                }
                let link = match o.get_ssl_mode() {
                    MySqlSslMode::Preferred => return Err(fallback(&setting)),
                    MySqlSslMode::Disabled => Link::Plain,
                    MySqlSslMode::Required => Link::Unverified,
                    MySqlSslMode::VerifyCa | MySqlSslMode::VerifyIdentity => Link::Verified,
                };
                (Options::MySql(o.disable_statement_logging()), link, "ssl-mode=VERIFY_IDENTITY&ssl-ca=…")
            }
            SqlEngine::Postgres => {
                let mut o = PgConnectOptions::from_str(url).map_err(|e| bad(&e.to_string()))?;
                if named.is_none() {
                    o = o.ssl_mode(PgSslMode::Disable);
                }
                let link = match o.get_ssl_mode() {
                    PgSslMode::Allow | PgSslMode::Prefer => return Err(fallback(&setting)),
                    PgSslMode::Disable => Link::Plain,
                    PgSslMode::Require => Link::Unverified,
                    PgSslMode::VerifyCa | PgSslMode::VerifyFull => Link::Verified,
                };
                // `IF NOT EXISTS` answers with a NOTICE that sqlx would log at INFO on every start.
                let o = o.options([("client_min_messages", "warning")]);
                (Options::Postgres(o.disable_statement_logging()), link, "sslmode=verify-full&sslrootcert=…")
            }
        };
        // The database as the server will see it, not as the URL spells it
        // (percent-encoded, or PostgreSQL's `?dbname=`, `PGDATABASE` or the
        // user's name): lock names carry it, and two spellings of one
        // database must take the same locks.
        let database = match &options {
            Options::MySql(o) => o.get_database().unwrap_or_default().to_owned(),
            Options::Postgres(o) => o.get_database().unwrap_or(o.get_username()).to_owned(),
        };
        let (level, message) = match (&setting, &link) {
            (None, _) => (tracing::Level::INFO, format!("{role} link: plain text (set {verify} to encrypt)")),
            (Some(s), Link::Plain) => (tracing::Level::INFO, format!("{role} link: plain text ({s})")),
            (Some(s), Link::Unverified) => (
                tracing::Level::WARN,
                format!(
                    "{role} link: TLS without verifying the server's certificate ({s}): anyone on the path can pose as the database; set {verify}"
                ),
            ),
            (Some(s), Link::Verified) => (tracing::Level::INFO, format!("{role} link: TLS, verifying the server's certificate and host name ({s})")),
        };
        log_once(&display, level, &message);
        Ok(SqlLink { engine, options, tls: link != Link::Plain, display, database })
    }

    /// Whether the link is encrypted with TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The MySQL connection options (`None`: a PostgreSQL link).
    #[cfg(test)]
    fn mysql_options(&self) -> Option<&MySqlConnectOptions> {
        match &self.options {
            Options::MySql(o) => Some(o),
            Options::Postgres(_) => None,
        }
    }

    /// The PostgreSQL connection options (`None`: a MySQL link).
    pub fn postgres_options(&self) -> Option<&PgConnectOptions> {
        match &self.options {
            Options::Postgres(o) => Some(o),
            Options::MySql(_) => None,
        }
    }

    /// The step of opening a connection that `e` says failed: the TLS
    /// handshake, authentication or the server's refusal (`None`: none of
    /// those, or not known).
    fn connect_step(&self, e: &sqlx::Error) -> Option<&'static str> {
        match e {
            sqlx::Error::Tls(_) => Some("TLS handshake failed"),
            // rustls's handshake errors reach sqlx as I/O errors of this kind.
            sqlx::Error::Io(io) if self.tls && io.kind() == std::io::ErrorKind::InvalidData => Some("TLS handshake failed"),
            sqlx::Error::Database(d) => match self.engine {
                SqlEngine::Postgres => match d.code().as_deref() {
                    Some("28P01") => Some("authentication failed"),
                    // pg_hba.conf: e.g. "no encryption" for a plain-text client of a TLS-only server.
                    Some("28000") => Some("refused by the server"),
                    _ => None,
                },
                SqlEngine::MySql => match d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|m| m.number()) {
                    Some(1045) if !self.tls => Some("authentication failed; a server that requires TLS answers a plain-text client this way too"),
                    Some(1045) => Some("authentication failed"),
                    // ER_SECURE_TRANSPORT_REQUIRED (MySQL)
                    Some(3159) => Some("refused by the server (it requires TLS)"),
                    _ => None,
                },
            },
            _ => None,
        }
    }

    /// The error of a connection to this link that could not be opened
    /// (`what`: for whom), naming the step that failed.
    pub fn connect_failed(&self, what: &str, e: sqlx::Error) -> Error {
        let what = match self.connect_step(&e) {
            Some(step) => format!("{} ({what}: {step})", self.display),
            None => format!("{} ({what})", self.display),
        };
        Error::Server { what, source: e }
    }

    pub fn engine(&self) -> SqlEngine {
        self.engine
    }

    /// The URL without password or query.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The database's name as the server sees it (decoded; PostgreSQL's
    /// default resolved as the server would: `dbname`, else the user).
    pub fn database(&self) -> &str {
        &self.database
    }

    /// A statement layer error of `what`, naming this database.
    pub fn failed(&self, what: &str) -> impl FnOnce(SqlError) -> Error {
        let name = format!("{} ({what})", self.display);
        move |e| e.named(name)
    }

    /// Every table in the database's (PostgreSQL: current schema's) namespace.
    pub fn all_tables(&self) -> Result<Vec<String>, Error> {
        let query = match self.engine {
            SqlEngine::MySql => "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE()",
            SqlEngine::Postgres => "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()",
        };
        Connection::Server(Box::new(self.connect()?)).query(query, &[], |r| r.text(0)).map_err(self.failed("listing tables"))
    }

    fn err(&self, what: impl Into<String>) -> impl Fn(sqlx::Error) -> Error {
        let what = format!("{} ({})", self.display, what.into());
        move |source| Error::Server { what: what.clone(), source }
    }

    /// A new connection on a new current-thread runtime.
    pub fn connect(&self) -> Result<Session, Error> {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|source| Error::Io { path: self.display.clone(), source })?;
        let rt = SessionRuntime(Some(rt));
        let conn = self.connect_on(&rt)?;
        Ok(Session { rt, conn })
    }

    fn connect_on(&self, rt: &SessionRuntime) -> Result<Conn, Error> {
        let connect = async {
            match &self.options {
                Options::MySql(o) => o.connect().await.map(Conn::MySql),
                Options::Postgres(o) => {
                    let mut c = o.connect().await?;
                    sqlx::raw_sql("SET synchronous_commit = on").execute(&mut c).await?;
                    Ok(Conn::Postgres(c))
                }
            }
        };
        match rt.block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, connect).await }) {
            Ok(conn) => conn.map_err(|e| self.connect_failed("connect", e)),
            Err(_) => Err(Error::Io {
                path: self.display.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no connection within {CONNECT_TIMEOUT:?}")),
            }),
        }
    }

    /// Run `ddl` (idempotent) through [`CreateSchema`] on a connection of its
    /// own. Blocks; `what` names the tables in errors.
    pub fn create_schema(&self, what: &str, ddl: &[String]) -> Result<(), Error> {
        let session = self.connect()?;
        Connection::Server(Box::new(session)).create_schema(ddl).map_err(self.failed(&format!("creating {what}")))
    }

    /// How many of the tables `names` exist in the database.
    pub fn present(&self, c: &mut Connection, names: &[&str]) -> Result<i64, SqlError> {
        let list = vec!["?"; names.len()].join(", ");
        let sql = crate::Dialect::from(self.engine).placeholders(&match self.engine {
            SqlEngine::MySql => format!("SELECT count(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name IN ({list})"),
            SqlEngine::Postgres => format!("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename IN ({list})"),
        });
        let args: Vec<crate::Arg<'_>> = names.iter().map(|n| crate::Arg::Text(n)).collect();
        Ok(c.query_one(&sql, &args, |r| r.int(0))?.unwrap_or(0))
    }

    /// `sluice-<kind>-<database>.<name>`: the name of a lock of `kind`
    /// (e.g. `director`) in this database.
    pub fn lock_name(&self, kind: &str, name: &str) -> String {
        format!("sluice-{kind}-{}.{name}", self.database)
    }

    /// Take the lock named `full` (see [`SqlLink::lock_name`]) on a
    /// connection of its own, made on the caller's runtime (async: a
    /// holder is a tokio task). Refused at once ([`Error::Locked`]) while
    /// any other connection holds it;
    /// released when the returned lock is released or dropped, or when its
    /// connection dies (the server ends the session).
    ///
    /// MySQL/MariaDB: `GET_LOCK(name, 0)` (server-wide, hence the database
    /// in the name; names over 64 characters are hashed). PostgreSQL:
    /// `pg_try_advisory_lock(key)` (per database), `key` the first 8 bytes
    /// of SHA-256 of the name.
    pub async fn lock(&self, full: &str) -> Result<SessionLock, Error> {
        let lock_name = mysql_lock_name(full);
        let key = postgres_lock_key(full);
        let what = format!("lock {full}");
        let on_error = self.err(what.clone());
        let not_connected = |e| self.connect_failed(&what, e);
        // (`sqlx::query` with owned binds, not `raw_sql` or a borrowed `&String`:
        // rustc cannot prove those futures `Send` for every lifetime once they
        // are nested in a spawned task.)
        let taken = async {
            match &self.options {
                Options::MySql(o) => {
                    let mut c = o.connect().await.map_err(not_connected)?;
                    let taken = async {
                        // An idle session would be ended after wait_timeout (8 h by default), and its lock with it.
                        sqlx::query("SET SESSION wait_timeout = 31536000").execute(&mut c).await?;
                        let row = sqlx::query("SELECT GET_LOCK(?, 0), CONNECTION_ID()").bind(lock_name.clone()).fetch_one(&mut c).await?;
                        let got: Option<i64> = row.try_get(0)?;
                        let session: i64 = row.try_get::<u64, _>(1)? as i64;
                        Ok::<_, sqlx::Error>((got == Some(1), session))
                    };
                    let (got, session) = taken.await.map_err(on_error)?;
                    Ok((got, session, LockConn::MySql(c)))
                }
                Options::Postgres(o) => {
                    let mut c = o.connect().await.map_err(not_connected)?;
                    let taken = async {
                        let row = sqlx::query("SELECT pg_try_advisory_lock($1), pg_backend_pid()").bind(key).fetch_one(&mut c).await?;
                        let got: bool = row.try_get(0)?;
                        let session: i32 = row.try_get(1)?;
                        Ok::<_, sqlx::Error>((got, i64::from(session)))
                    };
                    let (got, session) = taken.await.map_err(on_error)?;
                    Ok::<_, Error>((got, session, LockConn::Postgres(c)))
                }
            }
        };
        let (got, session, conn) = match tokio::time::timeout(CONNECT_TIMEOUT, taken).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Io {
                    path: self.display.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no director lock answer within {CONNECT_TIMEOUT:?}")),
                })
            }
        };
        if !got {
            return Err(Error::Locked { lock: full.to_owned(), database: self.display.clone() });
        }
        Ok(SessionLock { name: full.to_owned(), lock_name, key, session, conn: Some(conn) })
    }

    /// The server's id of the session holding the lock named `full` (see
    /// [`SessionLock::session_id`]), asked on a connection of its own;
    /// `None` when nobody holds it.
    pub async fn lock_holder(&self, full: &str) -> Result<Option<i64>, Error> {
        let (lock_name, key) = (mysql_lock_name(full), postgres_lock_key(full));
        let what = format!("asking who holds the lock {full}");
        let on_error = self.err(what.clone());
        let not_connected = |e| self.connect_failed(&what, e);
        let asked = async {
            match &self.options {
                Options::MySql(o) => {
                    let mut c = o.connect().await.map_err(not_connected)?;
                    let asked = async {
                        let row = sqlx::query("SELECT IS_USED_LOCK(?)").bind(lock_name).fetch_one(&mut c).await?;
                        row.try_get::<Option<i64>, _>(0)
                    };
                    let holder = asked.await.map_err(on_error)?;
                    let _ = sqlx::Connection::close(c).await;
                    Ok(holder)
                }
                Options::Postgres(o) => {
                    let mut c = o.connect().await.map_err(not_connected)?;
                    let asked = async {
                        let row = sqlx::query(
                            "SELECT max(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted
                               AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1",
                        )
                        .bind(key)
                        .fetch_one(&mut c)
                        .await?;
                        Ok::<_, sqlx::Error>(row.try_get::<Option<i32>, _>(0)?.map(i64::from))
                    };
                    let holder = asked.await.map_err(on_error)?;
                    let _ = sqlx::Connection::close(c).await;
                    Ok::<_, Error>(holder)
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, asked).await {
            Ok(result) => result,
            Err(_) => Err(Error::Io {
                path: self.display.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no director lock answer within {CONNECT_TIMEOUT:?}")),
            }),
        }
    }
}

enum LockConn {
    MySql(MySqlConnection),
    Postgres(PgConnection),
}

/// The MySQL name of the lock named `full` (`GET_LOCK` takes 64
/// characters at most: a longer name is hashed).
/// `(connections open, max_connections)` of the server `c` is connected to
/// (a cell's `sluice_db_connections_used_ratio`). Needs no privilege:
/// PostgreSQL's `pg_stat_activity` counts every backend for any user;
/// MySQL's and MariaDB's `Threads_connected` status likewise.
pub fn connection_use(c: &mut Connection, engine: SqlEngine) -> Result<(i64, i64), SqlError> {
    let read = |r: &dyn SqlRow| Ok((r.int(0)?, r.int(1)?));
    let row = match engine {
        SqlEngine::Postgres => {
            c.query_one("SELECT (SELECT count(*) FROM pg_stat_activity)::bigint, current_setting('max_connections')::bigint", &[], read)?
        }
        SqlEngine::MySql => {
            // MariaDB keeps the status in information_schema; MySQL 8 in performance_schema.
            let status = "SELECT CAST(VARIABLE_VALUE AS SIGNED), CAST(@@max_connections AS SIGNED) FROM {} WHERE VARIABLE_NAME = 'Threads_connected'";
            c.query_one(&status.replace("{}", "information_schema.GLOBAL_STATUS"), &[], read)
                .or_else(|_| c.query_one(&status.replace("{}", "performance_schema.global_status"), &[], read))?
        }
    };
    row.ok_or_else(|| SqlError::Decode { index: 0, problem: "the server reported no connection count".into() })
}

pub fn mysql_lock_name(full: &str) -> String {
    if full.chars().count() <= 64 {
        full.to_owned()
    } else {
        let kind = full.split('-').take(2).collect::<Vec<_>>().join("-");
        format!("{kind}-{}", hex::encode(&Sha256::digest(full.as_bytes())[..16]))
    }
}

/// The PostgreSQL advisory lock key of the lock named `full`: the first 8
/// bytes of its SHA-256.
pub fn postgres_lock_key(full: &str) -> i64 {
    let digest = Sha256::digest(full.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// A lock held by a database session (see [`SqlLink::lock`]).
pub struct SessionLock {
    name: String,
    lock_name: String,
    key: i64,
    session: i64,
    conn: Option<LockConn>,
}

impl std::fmt::Debug for SessionLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLock").field("name", &self.name).field("session", &self.session).finish()
    }
}

impl SessionLock {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's id of the session that holds the lock (MySQL
    /// `CONNECTION_ID()`, PostgreSQL `pg_backend_pid()`).
    pub fn session_id(&self) -> i64 {
        self.session
    }

    /// Whether the lock is still ours: its session answers and holds it.
    /// False once the connection is lost (another director may then take it).
    pub async fn is_held(&mut self) -> bool {
        let check = async {
            match self.conn.as_mut() {
                Some(LockConn::MySql(c)) => {
                    let row = sqlx::query("SELECT IS_USED_LOCK(?) = CONNECTION_ID()").bind(&self.lock_name).fetch_one(&mut *c).await?;
                    Ok::<_, sqlx::Error>(row.try_get::<Option<i64>, _>(0)? == Some(1))
                }
                Some(LockConn::Postgres(c)) => {
                    let row = sqlx::query(
                        "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                           AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1",
                    )
                    .bind(self.key)
                    .fetch_one(&mut *c)
                    .await?;
                    row.try_get::<bool, _>(0)
                }
                None => Ok(false),
            }
        };
        matches!(tokio::time::timeout(CONNECT_TIMEOUT, check).await, Ok(Ok(true)))
    }

    /// Release the lock and close its connection.
    pub async fn release(mut self) {
        match self.conn.take() {
            Some(LockConn::MySql(mut c)) => {
                let _ = sqlx::query("SELECT RELEASE_LOCK(?)").bind(&self.lock_name).execute(&mut c).await;
                let _ = sqlx::Connection::close(c).await;
            }
            Some(LockConn::Postgres(mut c)) => {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(self.key).execute(&mut c).await;
                let _ = sqlx::Connection::close(c).await;
            }
            None => {}
        }
    }
}

/// `url` without its password and query, for logs and errors.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        // An unencoded '@' (or '/', '#') in a password splits the URL elsewhere: what
        // parses as the host or path may be the rest of the password.
        Ok(u) if split_password(&u) => format!("{}://{MANGLED}", u.scheme()),
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "<an unparsable URL>".to_owned(),
    }
}

/// What [`redact`] shows of a URL whose credentials hold unencoded characters.
const MANGLED: &str = "<credentials with an unencoded '@', '/' or '#'>";

/// Whether `u` looks like credentials with an unencoded `@`, `/` or `#`
/// split it (an `@` after the host, or a fragment).
fn split_password(u: &url::Url) -> bool {
    u.path().contains('@') || u.query().is_some_and(|q| q.contains('@')) || u.fragment().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(numbered("a = ? AND b = ? LIMIT ?"), "a = $1 AND b = $2 LIMIT $3");
    }

    #[test]
    fn urls_are_parsed_and_redacted() {
        let m = SqlLink::new("mysql://u:secret@127.0.0.1:3306/sluice").unwrap();
        assert_eq!(m.engine(), SqlEngine::MySql);
        assert!(!m.display().contains("secret"), "{}", m.display());
        assert_eq!(m.database(), "sluice");
        assert_eq!(SqlLink::new("mariadb://u@h/db").unwrap().engine(), SqlEngine::MySql);
        assert_eq!(SqlLink::new("postgres://u:p@h:5432/db").unwrap().engine(), SqlEngine::Postgres);
        assert!(matches!(SqlLink::new("mysql://u@h/"), Err(Error::Url(_))), "MySQL needs a database");
        assert!(matches!(SqlLink::new("sqlite://x"), Err(Error::Url(_))));
        // Red team: an unencoded '@' or '/' in the password put part of it in the logged URL.
        for url in ["mysql://sluice:p@ss/w0rd@127.0.0.1:33307/rt1", "postgres://u:ab#cd@h/db"] {
            let e = SqlLink::new(url).expect_err("refused").to_string();
            assert!(!e.contains("w0rd") && !e.contains("cd@"), "{e}");
            assert!(!redact(url).contains("w0rd") && !redact(url).contains("cd@"), "{}", redact(url));
        }
        let e = SqlLink::new("mysql://sluice:p@ss/w0rd@127.0.0.1:33307/rt1").unwrap_err().to_string();
        assert!(e.contains("percent-encode the user name and password"), "{e}");
        assert!(SqlLink::new("mysql://sluice:p%40ss%2Fw0rd@127.0.0.1:33307/rt1").is_ok(), "encoded, it is fine");
        assert!(!redact("postgres://u:a@b@h/db").contains("a@b"), "(the last @ ends the credentials)");
    }

    /// Red team (issue 12, session 10): links other than `deliver.jobdb_url`
    /// (the cells' global store) skipped the config's TLS-mode checks. A
    /// mode given twice (the driver takes the last, plain text), or a TLS
    /// parameter misspelled (the driver ignores it), is refused by the link.
    #[test]
    fn a_tls_mode_given_twice_or_misspelled_is_refused() {
        for url in [
            "postgres://u@h/db?sslmode=verify-full&sslmode=disable",
            "postgres://u@h/db?sslmode=verify-full&ssl-mode=disable",
            "postgres://u@h/db?SSLMODE=verify-full",
            "postgres://u@h/db?ssl_mode=verify-full",
            "mysql://u@h/db?ssl-mode=VERIFY_IDENTITY&ssl-mode=DISABLED",
            "mysql://u@h/db?ssl_ca=/ca.pem&ssl-mode=DISABLED",
        ] {
            let e = SqlLink::new(url).expect_err(url).to_string();
            assert!(e.contains("given twice") || e.contains("is not a TLS parameter"), "{url}: {e}");
        }
        // Other parameters the driver takes (or ignores, warned by name) still pass.
        assert!(SqlLink::new("postgres://u@h/db?application_name=sluice&passwrd=secret").is_ok());
    }

    /// Red team (issue 13, F3): lock names carried the database as the URL
    /// spelled it, so `/%72t2a` and `/rt2a` (or PostgreSQL's `?dbname=`)
    /// took different locks on one database: two `sluice serve` ran on it.
    #[test]
    fn the_database_is_named_as_the_server_sees_it() {
        let plain = SqlLink::new("postgres://u@h/rt2a").unwrap();
        for alias in ["postgres://u@h/%72t2a", "postgres://u@h/other?dbname=rt2a", "postgresql://u@h/?dbname=rt2a"] {
            let a = SqlLink::new(alias).unwrap();
            assert_eq!(a.database(), "rt2a", "{alias}");
            assert_eq!(a.lock_name("director", "serve"), plain.lock_name("director", "serve"), "{alias}");
        }
        assert_eq!(SqlLink::new("postgres://sluice@h").unwrap().database(), "sluice", "no name: the server uses the user's");
        let mysql = SqlLink::new("mysql://u@h/rt2a").unwrap();
        let encoded = SqlLink::new("mariadb://u@h/%72t2a").unwrap();
        assert_eq!(encoded.database(), "rt2a");
        assert_eq!(encoded.lock_name("director", "serve"), mysql.lock_name("director", "serve"));
    }

    /// Issue 12: the TLS mode is explicit. Unnamed: plain text, set as
    /// `disable` (sqlx's default `prefer` would try unverified TLS and fall
    /// back to plain text); modes that may fall back are refused with the
    /// parameter named; certificate files without a mode are refused, and
    /// unreadable ones are named. (`PGSSLMODE` is tested through the binary,
    /// tests/sql_tls.rs: setting it here would race with the other tests.)
    #[test]
    fn the_tls_mode_is_explicit_and_never_falls_back() {
        let pg = SqlLink::new("postgres://u:p@127.0.0.1:5432/db").unwrap();
        assert!(!pg.tls());
        assert!(matches!(pg.postgres_options().unwrap().get_ssl_mode(), PgSslMode::Disable), "not sqlx's Prefer");
        let my = SqlLink::new("mysql://u:p@127.0.0.1:3306/db").unwrap();
        assert!(!my.tls());
        assert!(matches!(my.mysql_options().unwrap().get_ssl_mode(), MySqlSslMode::Disabled), "not sqlx's Preferred");
        assert!(!SqlLink::new("postgres://u:p@h/db?sslmode=disable").unwrap().tls());
        assert!(!SqlLink::new("mysql://u:p@h/db?ssl-mode=DISABLED").unwrap().tls());

        for url in [
            "postgres://u:secret@h/db?sslmode=prefer",
            "postgres://u:secret@h/db?ssl-mode=allow",
            "postgresql://u:secret@h/db?sslmode=PREFER",
            "mysql://u:secret@h/db?ssl-mode=PREFERRED",
            "mariadb://u:secret@h/db?sslmode=preferred",
        ] {
            let e = SqlLink::new(url).unwrap_err().to_string();
            let (key, value) = url.split_once('?').unwrap().1.split_once('=').unwrap();
            assert!(e.contains(&format!("{key}={value}")) && e.contains("fall back to plain text"), "{url}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not read until a connection").unwrap();
        let ca = ca.display();
        let pg = SqlLink::new(&format!("postgres://u:p@h/db?sslmode=verify-full&sslrootcert={ca}")).unwrap();
        assert!(pg.tls());
        assert!(matches!(pg.postgres_options().unwrap().get_ssl_mode(), PgSslMode::VerifyFull));
        assert!(SqlLink::new("postgres://u:p@h/db?sslmode=require").unwrap().tls());
        let my = SqlLink::new(&format!("mysql://u:p@h/db?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}")).unwrap();
        assert!(my.tls());
        assert!(matches!(my.mysql_options().unwrap().get_ssl_mode(), MySqlSslMode::VerifyIdentity));
        assert!(SqlLink::new("mysql://u:p@h/db?ssl-mode=required").unwrap().tls());

        let e = SqlLink::new(&format!("postgres://u:p@h/db?sslrootcert={ca}")).unwrap_err().to_string();
        assert!(e.contains("sslrootcert is given but no TLS mode") && e.contains("sslmode=verify-full"), "{e}");
        let e = SqlLink::new(&format!("mysql://u:p@h/db?ssl-ca={ca}")).unwrap_err().to_string();
        assert!(e.contains("ssl-ca is given but no TLS mode") && e.contains("ssl-mode=VERIFY_IDENTITY"), "{e}");
        let e = SqlLink::new("postgres://u:p@h/db?sslmode=verify-full&sslrootcert=/no/such/ca.pem").unwrap_err().to_string();
        assert!(e.contains("sslrootcert: cannot read /no/such/ca.pem"), "{e}");
        let e = SqlLink::new("postgres://u:p@h/db?sslmode=sometimes").unwrap_err().to_string();
        assert!(e.contains("sometimes"), "{e}");
    }

    /// The server URL in `var`, or `None` (skipped) unless `SLUICE_REQUIRE_SQL=1`.
    fn server(var: &str) -> Option<String> {
        match std::env::var(var) {
            Ok(url) if !url.is_empty() => Some(url),
            _ if std::env::var("SLUICE_REQUIRE_SQL").is_ok_and(|v| v == "1") => panic!("{var} is not set and SLUICE_REQUIRE_SQL=1"),
            _ => {
                eprintln!("SKIPPED: {var} is not set (scripts/sql.sh starts a server)");
                None
            }
        }
    }

    /// A cell's `db_connections` threshold reads this: at least our own
    /// connection, at most the server's limit.
    #[test]
    fn connection_use_counts_the_servers_connections() {
        for var in ["SLUICE_TEST_POSTGRES_URL", "SLUICE_TEST_MYSQL_URL"] {
            let Some(mut url) = server(var) else { continue };
            if var.contains("MYSQL") && !url.trim_start_matches("mysql://").contains('/') {
                // Any database will do: every user can use information_schema.
                url.push_str("/information_schema");
            }
            let link = SqlLink::new(&url).unwrap();
            let shared = crate::conn::SharedConnection::new(crate::conn::Connector::Server(Box::new(link.clone())), "test");
            let (open, max) = shared.run("counting", |c| connection_use(c, link.engine())).unwrap();
            assert!(open >= 1 && max >= open, "{var}: {open} of {max}");
        }
    }

    /// Issue 11 (12): a schema creation that fails with a database error (as
    /// one that lost a race to a process without the lock would) is tried
    /// again, not given up. The first attempt's DDL fails on purpose: a
    /// counter outside the transaction (a sequence; a row, MySQL's DDL is not
    /// transactional) makes only the first attempt divide by zero or return
    /// two rows.
    #[test]
    fn schema_creation_retries_after_a_database_error() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let tag = format!("sluice_t_schema_retry_{}", std::process::id());
        if let Some(url) = server("SLUICE_TEST_POSTGRES_URL") {
            rt.block_on(async {
                let mut c = <PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
                let seq = format!("{tag}_seq");
                sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {tag}; DROP SEQUENCE IF EXISTS {seq}; CREATE SEQUENCE {seq}"))
                    .execute(&mut c)
                    .await
                    .unwrap();
                let ddl = [format!("CREATE TABLE IF NOT EXISTS {tag} (x BIGINT)"), format!("SELECT 1 / (nextval('{seq}') - 1)")];
                c.create_schema(&ddl).await.expect("created on the second attempt");
                let attempts: i64 = sqlx::query_scalar(&format!("SELECT last_value FROM {seq}")).fetch_one(&mut c).await.unwrap();
                assert_eq!(attempts, 2);
                // Every attempt failing: the error comes back after SCHEMA_ATTEMPTS tries.
                let always = [format!("SELECT 1 / (nextval('{seq}') * 0)")];
                assert!(c.create_schema(&always).await.is_err());
                let after: i64 = sqlx::query_scalar(&format!("SELECT last_value FROM {seq}")).fetch_one(&mut c).await.unwrap();
                assert_eq!(after, 2 + i64::from(SCHEMA_ATTEMPTS));
                sqlx::raw_sql(&format!("DROP TABLE {tag}; DROP SEQUENCE {seq}")).execute(&mut c).await.unwrap();
            });
        }
        if let Some(url) = server("SLUICE_TEST_MYSQL_URL") {
            rt.block_on(async {
                let mut c = <MySqlConnection as sqlx::Connection>::connect(&url).await.unwrap();
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {tag}")).execute(&mut c).await.unwrap();
                sqlx::raw_sql(&format!("CREATE DATABASE {tag}")).execute(&mut c).await.unwrap();
                sqlx::raw_sql(&format!("USE {tag}")).execute(&mut c).await.unwrap();
                sqlx::raw_sql("CREATE TABLE attempts (n INT)").execute(&mut c).await.unwrap();
                let ddl = [
                    "CREATE TABLE IF NOT EXISTS t (x BIGINT)".to_owned(),
                    "INSERT INTO attempts VALUES (1)".to_owned(),
                    "SELECT IF((SELECT COUNT(*) FROM attempts) = 1, (SELECT 1 UNION SELECT 2), 1)".to_owned(),
                ];
                c.create_schema(&ddl).await.expect("created on the second attempt");
                let attempts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM attempts").fetch_one(&mut c).await.unwrap();
                assert_eq!(attempts, 2);
                // The lock was released: another connection takes it at once.
                let mut other = <MySqlConnection as sqlx::Connection>::connect(&url).await.unwrap();
                sqlx::raw_sql(&format!("USE {tag}")).execute(&mut other).await.unwrap();
                let free: Option<i64> =
                    sqlx::query_scalar("SELECT IS_FREE_LOCK(LEFT(CONCAT('sluice_schema.', DATABASE()), 64))").fetch_one(&mut other).await.unwrap();
                assert_eq!(free, Some(1));
                sqlx::raw_sql(&format!("DROP DATABASE {tag}")).execute(&mut c).await.unwrap();
            });
        }
    }
}

//! The directory of live directors, in the shared SQL database
//! (`deliver.jobdb_url`): each `sluice director` process registers its RPC
//! address and refreshes a heartbeat; `sluice route` processes read the live
//! ones and hand each job to one of them. Its invariants (liveness, one
//! order, one session per process used from `spawn_blocking`) are in the
//! [module doc](super).

use std::sync::Arc;
use std::time::Duration;

use sluice_core::Config;

use crate::schema::{Dialect, DIRECTORS};
use crate::{now_ms, DeliverError};
use sluice_sql::conn::{Arg, Connection, Connector, SharedConnection, SqlError};

/// `deliver.jobdb_url`, required when route and directors are separate
/// processes: the directory and every director's JobDBs live there.
pub fn jobdb_url(config: &Config) -> Result<&str, DeliverError> {
    match &config.deliver.jobdb_url {
        Some(u) => Ok(u.as_str()),
        None => Err(DeliverError::Cluster(
            "separate route and director processes share a SQL database: set deliver.jobdb_url (mysql://… or postgres://…)".into(),
        )),
    }
}

/// One live director.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectorEntry {
    pub name: String,
    pub rpc_url: String,
    pub heartbeat_ms: i64,
}

/// The `sluice_directors` table.
#[derive(Clone)]
pub struct Directory {
    session: Arc<SharedConnection>,
    /// The statements, in the engine's placeholder style.
    upsert: Arc<str>,
    stop: Arc<str>,
    live: Arc<str>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").field("database", &self.session.connector().describe()).finish()
    }
}

/// A directory error: what was being done, and the cause (its chain).
fn directory_error(doing: &'static str) -> impl Fn(DeliverError) -> DeliverError {
    move |e| match e {
        DeliverError::Sql { source, .. } => DeliverError::Directory(format!("{doing}: {source}")),
        other => other,
    }
}

impl Directory {
    /// Connect to `url` (`mysql://…` or `postgres://…`) and create the table
    /// if missing, under the schema lock (`sluice_sql::link::CreateSchema`: roles
    /// started at once on a fresh PostgreSQL database failed here). The URL
    /// is parsed and checked by `SqlLink::new` (TLS mode included), as
    /// for the JobDBs and the control tables: one set of options per link.
    pub async fn connect(url: &str) -> Result<Directory, DeliverError> {
        if !["mysql://", "mariadb://", "postgres://", "postgresql://"].iter().any(|s| url.starts_with(s)) {
            return Err(DeliverError::Directory("the directory of directors needs deliver.jobdb_url = mysql://… or postgres://…".into()));
        }
        let link = sluice_sql::SqlLink::new(url)?;
        let dialect = Dialect::from(link.engine());
        let placeholders = |sql: String| dialect.placeholders(&sql);
        let directory = Directory {
            upsert: placeholders(dialect.upsert("sluice_directors", &["name", "rpc_url", "heartbeat_ms"], &["name"])).into(),
            stop: placeholders("UPDATE sluice_directors SET rpc_url = '', heartbeat_ms = ? WHERE name = ?".into()).into(),
            live: placeholders("SELECT name, rpc_url, heartbeat_ms FROM sluice_directors WHERE heartbeat_ms >= ? ORDER BY name".into()).into(),
            session: Arc::new(SharedConnection::new(Connector::Server(Box::new(link.clone())), "directory of directors")),
        };
        let ddl = dialect.create_table("sluice_directors", &DIRECTORS);
        // The shared helper drives its own connection and blocks: off the async threads.
        let create = |e: &dyn std::fmt::Display| DeliverError::Directory(format!("create sluice_directors: {e}"));
        tokio::task::spawn_blocking(move || link.create_schema("sluice_directors", &ddl)).await.map_err(|e| create(&e))?.map_err(|e| create(&e))?;
        Ok(directory)
    }

    /// Run `f` on the directory's session, on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        doing: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<T, SqlError> + Send + 'static,
    ) -> Result<T, DeliverError> {
        let session = self.session.clone();
        tokio::task::spawn_blocking(move || session.run(doing, f))
            .await
            .map_err(|e| DeliverError::Directory(format!("{doing}: {e}")))?
            .map_err(|e| directory_error(doing)(e.into()))
    }

    /// Register `name` at `rpc_url`, or refresh its heartbeat.
    pub async fn heartbeat(&self, name: &str, rpc_url: &str) -> Result<(), DeliverError> {
        let (sql, name, rpc_url, now) = (self.upsert.clone(), name.to_owned(), rpc_url.to_owned(), now_ms());
        self.run("director heartbeat", move |c| c.execute(&sql, &[Arg::Text(&name), Arg::Text(&rpc_url), Arg::Int(now)]).map(drop)).await
    }

    /// Mark `name` stopped: no address, and a heartbeat old enough that it
    /// is no longer live (other directors may adopt its JobDBs).
    pub async fn heartbeat_stopped(&self, name: &str) -> Result<(), DeliverError> {
        let (sql, name, long_ago) = (self.stop.clone(), name.to_owned(), 0i64);
        self.run("mark director stopped", move |c| c.execute(&sql, &[Arg::Int(long_ago), Arg::Text(&name)]).map(drop)).await
    }

    /// Directors whose heartbeat is younger than `max_age`, by name.
    pub async fn live(&self, max_age: Duration) -> Result<Vec<DirectorEntry>, DeliverError> {
        let (sql, since) = (self.live.clone(), now_ms() - max_age.as_millis() as i64);
        self.run("list directors", move |c| {
            c.query(&sql, &[Arg::Int(since)], |r| Ok(DirectorEntry { name: r.text(0)?, rpc_url: r.text(1)?, heartbeat_ms: r.int(2)? }))
        })
        .await
    }

    /// Every registered director, live or not, by name.
    pub async fn all(&self) -> Result<Vec<DirectorEntry>, DeliverError> {
        self.live(Duration::from_millis(now_ms().max(0) as u64)).await
    }
}

//! The directory of live directors, in the shared SQL database
//! (`deliver.jobdb_url`): each `sluice director` process registers its RPC
//! address and refreshes a heartbeat; `sluice route` processes read the live
//! ones and hand each job to one of them.
//!
//! Invariants:
//! - A director is live while its heartbeat is younger than the caller's
//!   `max_age`; a stopped director marks its row stale at once (no address),
//!   a crashed one ages out. Either way its JobDBs can then be adopted.
//! - The list is ordered by name, so every route process maps a messageId
//!   to the same director while the set of live directors is the same.

use std::time::Duration;

use sqlx::{MySqlPool, PgPool};

use crate::sqljobdb::SqlJobDbs;
use crate::{now_ms, DeliverError};

/// One live director.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectorEntry {
    pub name: String,
    pub rpc_url: String,
    pub heartbeat_ms: i64,
}

#[derive(Clone, Debug)]
enum Pool {
    MySql(MySqlPool),
    Postgres(PgPool),
}

/// The `sluice_directors` table.
#[derive(Clone, Debug)]
pub struct Directory {
    pool: Pool,
}

fn sql_error(doing: &'static str) -> impl Fn(sqlx::Error) -> DeliverError {
    move |e| DeliverError::Directory(format!("{doing}: {e}"))
}

impl Directory {
    /// Connect to `url` (`mysql://…` or `postgres://…`) and create the table
    /// if missing, under the schema lock (`sqljobdb::CreateSchema`: roles
    /// started at once on a fresh PostgreSQL database failed here). The URL
    /// is parsed and checked by [`SqlJobDbs::new`] (TLS mode included), as
    /// for the JobDBs and the control tables: one set of options per link.
    pub async fn connect(url: &str) -> Result<Directory, DeliverError> {
        if !["mysql://", "mariadb://", "postgres://", "postgresql://"].iter().any(|s| url.starts_with(s)) {
            return Err(DeliverError::Directory("the directory of directors needs deliver.jobdb_url = mysql://… or postgres://…".into()));
        }
        let dbs = SqlJobDbs::new(url)?;
        let ddl = crate::schema::Dialect::from(dbs.engine()).create_table("sluice_directors", &crate::schema::DIRECTORS);
        let connect = |e| dbs.connect_failed("directory of directors: connect", e);
        let pool = match (dbs.mysql_options(), dbs.postgres_options()) {
            (Some(o), _) => Pool::MySql(
                sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(o.clone())
                    .await
                    .map_err(connect)?,
            ),
            (None, Some(o)) => Pool::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(o.clone())
                    .await
                    .map_err(connect)?,
            ),
            (None, None) => unreachable!("a SQL link is MySQL or PostgreSQL"),
        };
        // The shared helper drives its own connection and blocks: off the async threads.
        let create = |e: &dyn std::fmt::Display| DeliverError::Directory(format!("create sluice_directors: {e}"));
        tokio::task::spawn_blocking(move || dbs.create_schema("sluice_directors", &ddl)).await.map_err(|e| create(&e))?.map_err(|e| create(&e))?;
        Ok(Directory { pool })
    }

    /// Register `name` at `rpc_url`, or refresh its heartbeat.
    pub async fn heartbeat(&self, name: &str, rpc_url: &str) -> Result<(), DeliverError> {
        let now = now_ms();
        match &self.pool {
            Pool::MySql(p) => sqlx::query(
                "INSERT INTO sluice_directors (name, rpc_url, heartbeat_ms) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE rpc_url = VALUES(rpc_url), heartbeat_ms = VALUES(heartbeat_ms)",
            )
            .bind(name)
            .bind(rpc_url)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()),
            Pool::Postgres(p) => sqlx::query(
                "INSERT INTO sluice_directors (name, rpc_url, heartbeat_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET rpc_url = EXCLUDED.rpc_url, heartbeat_ms = EXCLUDED.heartbeat_ms",
            )
            .bind(name)
            .bind(rpc_url)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()),
        }
        .map_err(sql_error("director heartbeat"))
    }

    /// Mark `name` stopped: no address, and a heartbeat old enough that it
    /// is no longer live (other directors may adopt its JobDBs).
    pub async fn heartbeat_stopped(&self, name: &str) -> Result<(), DeliverError> {
        let long_ago = 0i64;
        match &self.pool {
            Pool::MySql(p) => sqlx::query("UPDATE sluice_directors SET rpc_url = '', heartbeat_ms = ? WHERE name = ?")
                .bind(long_ago)
                .bind(name)
                .execute(p)
                .await
                .map(|_| ()),
            Pool::Postgres(p) => sqlx::query("UPDATE sluice_directors SET rpc_url = '', heartbeat_ms = $1 WHERE name = $2")
                .bind(long_ago)
                .bind(name)
                .execute(p)
                .await
                .map(|_| ()),
        }
        .map_err(sql_error("mark director stopped"))
    }

    /// Directors whose heartbeat is younger than `max_age`, by name.
    pub async fn live(&self, max_age: Duration) -> Result<Vec<DirectorEntry>, DeliverError> {
        let since = now_ms() - max_age.as_millis() as i64;
        let rows: Vec<(String, String, i64)> = match &self.pool {
            Pool::MySql(p) => {
                sqlx::query_as("SELECT name, rpc_url, heartbeat_ms FROM sluice_directors WHERE heartbeat_ms >= ? ORDER BY name")
                    .bind(since)
                    .fetch_all(p)
                    .await
            }
            Pool::Postgres(p) => {
                sqlx::query_as("SELECT name, rpc_url, heartbeat_ms FROM sluice_directors WHERE heartbeat_ms >= $1 ORDER BY name")
                    .bind(since)
                    .fetch_all(p)
                    .await
            }
        }
        .map_err(sql_error("list directors"))?;
        Ok(rows.into_iter().map(|(name, rpc_url, heartbeat_ms)| DirectorEntry { name, rpc_url, heartbeat_ms }).collect())
    }

    /// Every registered director, live or not, by name.
    pub async fn all(&self) -> Result<Vec<DirectorEntry>, DeliverError> {
        self.live(Duration::from_millis(now_ms().max(0) as u64)).await
    }
}

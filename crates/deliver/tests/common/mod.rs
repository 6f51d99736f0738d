//! Throwaway databases for the JobDB tests: a temp dir for SQLite, and a
//! fresh database per test on the MariaDB and PostgreSQL servers named by
//! `SLUICE_TEST_MYSQL_URL` and `SLUICE_TEST_POSTGRES_URL`
//! (`scripts/sql.sh` starts them; `scripts/test.sh` does it for the suite).
//! Without a URL a test is skipped with a printed reason, unless
//! `SLUICE_REQUIRE_SQL=1` (set by `scripts/test.sh`): then it fails.
#![allow(dead_code, unused_macros)] // each test file uses its own part

/// `every_engine!(test_a, test_b)`: a module per test holding one `#[test]`
/// per engine (`sqlite`, `mariadb`, `postgres`), each calling the test
/// file's `run(engine, name, test)`. (`#[macro_use] mod common;`)
macro_rules! every_engine {
    ($($test:ident),* $(,)?) => {$( engine_tests!($test: sqlite Sqlite, mariadb MariaDb, postgres Postgres); )*};
}

/// [`every_engine!`] for what only a database server has (MariaDB, PostgreSQL).
macro_rules! server_engines {
    ($($test:ident),* $(,)?) => {$( engine_tests!($test: mariadb MariaDb, postgres Postgres); )*};
}

/// The module of one test: a `#[test]` named `$name` per `Engine::$engine`.
macro_rules! engine_tests {
    ($test:ident: $($name:ident $engine:ident),*) => {
        mod $test {
            $(
                #[test]
                fn $name() {
                    super::run(super::Engine::$engine, stringify!($test), super::$test);
                }
            )*
        }
    };
}

use std::path::PathBuf;

use bytes::Bytes;
use sluice_deliver::NewJob;

use sluice_deliver::jobdb::{jobdb_path, remove_jobdb_files, JobDb};
use sluice_deliver::sqljobdb::SqlJobDbs;
use sluice_deliver::store::JobStore;
use sqlx::Connection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    MariaDb,
    Postgres,
}

impl Engine {
    fn env(self) -> &'static str {
        match self {
            Engine::Sqlite => "",
            Engine::MariaDb => "SLUICE_TEST_MYSQL_URL",
            Engine::Postgres => "SLUICE_TEST_POSTGRES_URL",
        }
    }
}

/// The server URL for `engine`, or `None` (printed) when the test must be skipped.
pub fn server_url(engine: Engine, test: &str) -> Option<String> {
    match std::env::var(engine.env()) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("SLUICE_REQUIRE_SQL").is_ok_and(|v| v == "1") => {
            panic!("{test}: {} is not set and SLUICE_REQUIRE_SQL=1 (scripts/test.sh starts the servers)", engine.env())
        }
        _ => {
            eprintln!("SKIPPED {test} on {engine:?}: {} is not set (start a server with scripts/sql.sh)", engine.env());
            None
        }
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

/// A database (or directory) of JobDBs that only this test uses, removed on drop.
pub struct Backend {
    pub engine: Engine,
    dir: tempfile::TempDir,
    /// SQL engines: the JobDBs' database, and the server URL and name to drop it at the end.
    pub sql: Option<SqlJobDbs>,
    pub database_url: Option<String>,
    server: Option<(String, String)>,
}

impl Backend {
    /// A fresh backend for `test` on `engine`; `None` when skipped.
    pub fn new(engine: Engine, test: &str) -> Option<Backend> {
        let dir = tempfile::tempdir().expect("a temp dir");
        if engine == Engine::Sqlite {
            return Some(Backend { engine, dir, sql: None, database_url: None, server: None });
        }
        let server = server_url(engine, test)?;
        let name: String =
            format!("sluice_t_{test}").chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(60).collect();
        let (drop_sql, create_sql) = match engine {
            Engine::MariaDb => (format!("DROP DATABASE IF EXISTS {name}"), format!("CREATE DATABASE {name}")),
            _ => (format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), format!("CREATE DATABASE {name}")),
        };
        admin(engine, &server, &[&drop_sql, &create_sql]);
        let mut url = url::Url::parse(&server).expect("a server URL");
        url.set_path(&format!("/{name}"));
        let sql = SqlJobDbs::new(url.as_str()).expect("a JobDB database URL");
        Some(Backend { engine, dir, sql: Some(sql), database_url: Some(url.to_string()), server: Some((server, drop_sql)) })
    }

    fn sqlite_path(&self, seq: u64) -> PathBuf {
        jobdb_path(self.dir.path(), seq)
    }

    /// Open (creating) JobDB `seq`.
    pub fn open(&self, seq: u64) -> Box<dyn JobStore> {
        match &self.sql {
            None => Box::new(JobDb::open(&self.sqlite_path(seq)).expect("open an SQLite JobDB")),
            Some(sql) => Box::new(sql.open(seq).expect("open an SQL JobDB")),
        }
    }

    /// The tables of JobDB `seq`: (jobs, job_state_transitions).
    pub fn tables_of(&self, seq: u64) -> (String, String) {
        match self.engine {
            Engine::Sqlite => ("jobs".into(), "job_state_transitions".into()),
            _ => sluice_deliver::sqljobdb::table_names(seq),
        }
    }

    /// Run `sql` on JobDB `seq` as another client would (a new connection);
    /// the error text if the database refused it.
    pub fn execute_as_another_client(&self, seq: u64, sql: &str) -> Result<(), String> {
        match self.engine {
            Engine::Sqlite => {
                let conn = rusqlite::Connection::open(self.sqlite_path(seq)).map_err(|e| e.to_string())?;
                conn.execute(sql, []).map(drop).map_err(|e| e.to_string())
            }
            Engine::MariaDb => runtime().block_on(async {
                let url = self.database_url.as_deref().expect("SQL");
                let mut c = sqlx::MySqlConnection::connect(url).await.map_err(|e| e.to_string())?;
                sqlx::raw_sql(sql).execute(&mut c).await.map(drop).map_err(|e| e.to_string())
            }),
            Engine::Postgres => runtime().block_on(async {
                let url = self.database_url.as_deref().expect("SQL");
                let mut c = sqlx::PgConnection::connect(url).await.map_err(|e| e.to_string())?;
                sqlx::raw_sql(sql).execute(&mut c).await.map(drop).map_err(|e| e.to_string())
            }),
        }
    }

    /// Delete JobDB `seq` whole, as rotation does.
    pub fn drop_jobdb(&self, seq: u64) {
        match &self.sql {
            None => remove_jobdb_files(&self.sqlite_path(seq)).expect("remove the files"),
            Some(sql) => sql.drop_jobdb(seq).expect("drop the tables"),
        }
    }

    /// Whether anything of JobDB `seq` is left (files; tables or registry row).
    pub fn exists(&self, seq: u64) -> bool {
        match &self.sql {
            None => {
                let path = self.sqlite_path(seq);
                ["", "-wal", "-shm"].iter().any(|s| PathBuf::from(format!("{}{s}", path.display())).exists())
            }
            Some(sql) => {
                let (jobs, tr) = sluice_deliver::sqljobdb::table_names(seq);
                let tables = sql.tables().expect("list tables");
                let registered = sql.list().expect("list the registry").iter().any(|(s, _)| *s == seq);
                tables.contains(&jobs) || tables.contains(&tr) || registered
            }
        }
    }
}

/// Run `statements` on the server (not in a test database).
fn admin(engine: Engine, server: &str, statements: &[&str]) {
    runtime().block_on(async {
        match engine {
            Engine::MariaDb => {
                let mut c = sqlx::MySqlConnection::connect(server).await.unwrap_or_else(|e| panic!("connect to {server}: {e}"));
                for s in statements {
                    sqlx::raw_sql(s).execute(&mut c).await.unwrap_or_else(|e| panic!("{s}: {e}"));
                }
            }
            _ => {
                let mut c = sqlx::PgConnection::connect(server).await.unwrap_or_else(|e| panic!("connect to {server}: {e}"));
                for s in statements {
                    sqlx::raw_sql(s).execute(&mut c).await.unwrap_or_else(|e| panic!("{s}: {e}"));
                }
            }
        }
    });
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some((server, drop_sql)) = &self.server {
            if !std::thread::panicking() {
                admin(self.engine, server, &[drop_sql]);
            }
        }
    }
}

/// A track event's job for `destination`, made now, expiring in an hour.
pub fn job(message_id: &str, source: &str, destination: &str) -> NewJob {
    let now = sluice_deliver::now_ms();
    NewJob {
        message_id: message_id.into(),
        source: source.into(),
        destination: destination.into(),
        generation: 0,
        endpoint: String::new(),
        payload: Bytes::from(format!("{{\"type\":\"track\",\"messageId\":\"{message_id}\",\"event\":\"E\"}}")),
        created_at: now,
        expires_at: now + 3_600_000,
        received_at: now,
    }
}

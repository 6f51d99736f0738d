//! Issue 11 (12): starting the roles at once on a fresh PostgreSQL database
//! killed a director with `create sluice_directors: duplicate key value
//! violates unique constraint "pg_type_typname_nsp_index"`: concurrent
//! `CREATE TABLE IF NOT EXISTS` is not safe there. Every place that creates
//! schema in the shared database (the directory of directors, the control
//! tables, a scope's JobDB and its registry) now does it under a database
//! lock, and retries if it still loses a race.
//!
//! Each round makes a fresh database and starts, at the same moment,
//! OPENERS of each kind (all on the same tables); every one must succeed.
//! MariaDB and PostgreSQL from `SLUICE_TEST_MYSQL_URL` /
//! `SLUICE_TEST_POSTGRES_URL` (skipped without them unless
//! `SLUICE_REQUIRE_SQL=1`).

mod common;

use std::sync::{Arc, Barrier};

use common::{Backend, Engine};
use sluice_deliver::cluster::Directory;
use sluice_deliver::control::ControlDb;
use sluice_deliver::sqljobdb::SqlJobDbs;

const ROUNDS: usize = 20;
const OPENERS: usize = 8;

fn concurrent_openers_all_succeed(engine: Engine) {
    for round in 0..ROUNDS {
        let Some(backend) = Backend::new(engine, &format!("schema_race_{round}_{engine:?}")) else { return };
        let url = backend.database_url.clone().expect("SQL");
        let data = tempfile::tempdir().unwrap();
        let barrier = Arc::new(Barrier::new(3 * OPENERS));
        let mut threads = Vec::new();
        for i in 0..3 * OPENERS {
            let (url, barrier, data_dir) = (url.clone(), barrier.clone(), data.path().join(format!("p{i}")));
            threads.push(std::thread::spawn(move || -> Result<(), String> {
                let what = ["directory", "control tables", "JobDB"][i % 3];
                barrier.wait();
                let result = match i % 3 {
                    0 => common::runtime().block_on(Directory::connect(&url)).map(drop),
                    1 => ControlDb::open_url(&url, &data_dir).map(drop),
                    _ => SqlJobDbs::new(&url).and_then(|dbs| {
                        let dbs = dbs.scoped("director_a");
                        dbs.list()?;
                        dbs.open(1).map(drop)
                    }),
                };
                result.map_err(|e| format!("round {round}, opener {i} ({what}): {e}"))
            }));
        }
        let failures: Vec<String> = threads.into_iter().filter_map(|t| t.join().expect("opener thread").err()).collect();
        assert!(failures.is_empty(), "{engine:?}: {} of {} openers failed:\n{}", failures.len(), 3 * OPENERS, failures.join("\n"));
        drop(backend);
    }
}

#[test]
fn postgres_concurrent_schema_creation() {
    concurrent_openers_all_succeed(Engine::Postgres);
}

#[test]
fn mariadb_concurrent_schema_creation() {
    concurrent_openers_all_succeed(Engine::MariaDb);
}

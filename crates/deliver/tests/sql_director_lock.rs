//! The director lock of a JobDB in MySQL/MariaDB (`GET_LOCK`) and
//! PostgreSQL (`pg_try_advisory_lock`): held by one database session for
//! the director's life; a second director is refused; when the holding
//! session ends (released, dropped, or killed by the server) another can
//! take it. (The SQLite JobDBs' file lock is tested in `centrifuge_suite.rs`.)

#[macro_use]
mod common;

use std::time::Duration;

use common::{Backend, Engine};
use sluice_deliver::DeliverError;

server_engines!(a_second_director_is_refused_until_the_first_releases, a_killed_session_frees_the_lock_for_another_director);

fn run(engine: Engine, name: &str, test: fn(&Backend)) {
    if let Some(backend) = Backend::new(engine, &format!("{name}_{engine:?}")) {
        test(&backend);
    }
}

fn a_second_director_is_refused_until_the_first_releases(b: &Backend) {
    let sql = b.sql.as_ref().expect("an SQL backend");
    common::runtime().block_on(async {
        let mut first = sql.lock_jobdb(1).await.expect("the first director takes the lock");
        assert!(first.is_held().await);
        let refused = sql.lock_jobdb(1).await.expect_err("a second director is refused");
        assert!(matches!(&refused, DeliverError::SqlLocked { lock, .. } if lock.ends_with("jobs_000001")), "{refused}");
        assert!(refused.to_string().contains("held by another director"), "{refused}");
        // Another JobDB's lock is independent.
        let other = sql.lock_jobdb(2).await.expect("JobDB 2 has its own lock");
        first.release().await;
        let mut second = sql.lock_jobdb(1).await.expect("free once released");
        assert!(second.is_held().await);
        // Dropping the lock (as a crashed process would) frees it too, once the server sees the session end.
        drop(second);
        let third = retry_lock(sql, 1).await;
        drop((third, other));
    });
}

fn a_killed_session_frees_the_lock_for_another_director(b: &Backend) {
    let sql = b.sql.as_ref().expect("an SQL backend");
    let rt = common::runtime();
    let mut held = rt.block_on(sql.lock_jobdb(7)).expect("lock");
    assert!(rt.block_on(held.is_held()));
    // The server ends the holder's session (a lost connection, a failover, an operator's KILL).
    let kill = match b.engine {
        Engine::MariaDb => format!("KILL {}", held.session_id()),
        _ => format!("SELECT pg_terminate_backend({})", held.session_id()),
    };
    b.execute_as_another_client(7, &kill).expect("kill the session");
    rt.block_on(async {
        let taken = retry_lock(sql, 7).await;
        assert!(!held.is_held().await, "the old holder can tell it lost the lock");
        drop(taken);
    });
}

/// Take JobDB `seq`'s lock, retrying for a few seconds while the server notices an ended session.
async fn retry_lock(sql: &sluice_deliver::sqljobdb::SqlJobDbs, seq: u64) -> sluice_deliver::sqljobdb::DirectorLock {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match sql.lock_jobdb(seq).await {
            Ok(lock) => return lock,
            Err(DeliverError::SqlLocked { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("lock {seq}: {e}"),
        }
    }
}

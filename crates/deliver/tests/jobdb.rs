//! The JobDB's immutability: every operation the writer thread performs is
//! watched by SQLite's authorizer, which sees each statement's actions when
//! it is prepared; none may UPDATE or DELETE `jobs` or
//! `job_state_transitions`. The triggers refuse anyone who tries.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use sluice_deliver::jobdb::JobDb;
use sluice_deliver::ksuid::KsuidGenerator;
use sluice_deliver::store::{JobState, JobStore, NewJob, Transition};

fn new_job(m: &str) -> NewJob {
    NewJob {
        message_id: m.into(),
        source: "web".into(),
        destination: "hook".into(),
        generation: 0,
        endpoint: "http://x".into(),
        payload: Bytes::from_static(b"{\"type\":\"track\"}"),
        created_at: 1,
        expires_at: 2,
        received_at: 1,
    }
}

#[test]
fn no_operation_updates_or_deletes_job_rows_and_the_triggers_refuse_anyone_who_tries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobdb-000001.sqlite");
    let mut db = JobDb::open(&path).unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    db.sqlite_connection().expect("an SQLite JobDB").authorizer(Some(move |ctx: AuthContext<'_>| {
        let what = match ctx.action {
            AuthAction::Update { table_name, column_name } => Some(format!("UPDATE {table_name}.{column_name}")),
            AuthAction::Delete { table_name } => Some(format!("DELETE {table_name}")),
            AuthAction::Insert { table_name } => Some(format!("INSERT {table_name}")),
            _ => None,
        };
        if let Some(w) = what {
            log.lock().unwrap().push(w);
        }
        Authorization::Allow
    }));

    // Every operation the writer and the tools use, through a whole lifecycle.
    let mut ids = KsuidGenerator::default();
    let mut made = Vec::new();
    db.begin().unwrap();
    for m in ["a", "b", "c"] {
        let id = ids.next(1_800_000_000);
        assert!(db.insert_job(id, &new_job(m)).unwrap());
        made.push(id);
    }
    assert!(!db.insert_job(ids.next(1_800_000_000), &new_job("a")).unwrap(), "idempotent");
    db.commit().unwrap();
    for (i, state) in [JobState::Executing, JobState::AwaitingRetry, JobState::Executing, JobState::Succeeded].into_iter().enumerate() {
        let seq = i as i64 + 1;
        let t = Transition { job_id: made[0], seq, state, at: i as i64, attempt: 1, status: Some(500), error: None, retry_at: None };
        db.append_transition(&t).unwrap();
    }
    for (id, state) in [(made[1], JobState::Discarded), (made[2], JobState::Archived)] {
        db.append_transition(&Transition { job_id: id, seq: 1, state, at: 9, attempt: 1, status: None, error: None, retry_at: None }).unwrap();
    }
    assert!(db.page(None, 10).unwrap().iter().all(|j| j.state.is_terminal()));
    assert_eq!(db.count_unfinished().unwrap(), 0);
    assert_eq!(db.history(made[0]).unwrap().len(), 4);
    assert_eq!(db.find("a").unwrap().len(), 1);
    assert_eq!(db.find(&made[0].to_string()).unwrap()[0].job.message_id, "a");
    assert!(db.payload(made[0]).unwrap().is_some());
    assert!(db.job_exists("a", "hook", 0).unwrap());
    assert_eq!(db.stats().unwrap().len(), 3);

    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|s| s == "INSERT jobs") && seen.iter().any(|s| s == "INSERT job_state_transitions"), "{seen:?}");
    let writes_other_than_insert: Vec<_> =
        seen.iter().filter(|s| !s.starts_with("INSERT") && (s.contains("jobs") || s.contains("job_state_transitions"))).collect();
    assert!(writes_other_than_insert.is_empty(), "UPDATE/DELETE of job rows: {writes_other_than_insert:?}");
    drop(db);

    // Anyone else who tries is refused by the triggers.
    let conn = rusqlite::Connection::open(&path).unwrap();
    for sql in [
        "UPDATE jobs SET payload = x'00'",
        "DELETE FROM jobs",
        "UPDATE job_state_transitions SET state = 'succeeded'",
        "DELETE FROM job_state_transitions",
    ] {
        let err = conn.execute(sql, []).unwrap_err().to_string();
        assert!(err.contains("immutable") || err.contains("append-only"), "{sql}: {err}");
    }
    let rows: i64 = conn.query_row("SELECT count(*) FROM job_state_transitions", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 6);
}

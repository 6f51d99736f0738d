//! The JobDB contract ([`JobStore`]), run against every backend: SQLite
//! files, MariaDB and PostgreSQL. Each test is one function; `suite!` makes
//! a `sqlite`, `mariadb` and `postgres` test of it, each on a database of
//! its own (see `common/mod.rs` for the servers and when a test skips).

#[macro_use]
mod common;

use std::collections::HashMap;

use bytes::Bytes;
use common::{Backend, Engine};
use sluice_deliver::ksuid::{Ksuid, KsuidGenerator};
use sluice_deliver::store::JobStore;
use sluice_deliver::store::{JobState, NewJob, Transition};
use sluice_deliver::writer::{FromWriter, WriterHandle};

every_engine!(
    inserts_are_idempotent_on_message_destination_and_generation,
    the_database_refuses_update_and_delete_of_job_rows,
    pages_come_in_id_order_with_each_jobs_latest_state,
    history_is_every_transition_oldest_first,
    stats_count_jobs_by_destination_and_latest_state,
    payloads_and_texts_round_trip_exactly,
    a_rolled_back_transaction_leaves_nothing,
    a_reopened_jobdb_keeps_its_jobs_ids_and_creation_time,
    rotation_drops_a_jobdb_whole_and_leaves_the_others,
    the_writer_thread_groups_commands_into_commits,
    batched_inserts_and_transitions_keep_the_same_rules,
);

fn run(engine: Engine, name: &str, test: fn(&Backend)) {
    if let Some(backend) = Backend::new(engine, &format!("{name}_{engine:?}")) {
        test(&backend);
    }
}

fn job(message_id: &str, destination: &str) -> NewJob {
    NewJob {
        message_id: message_id.into(),
        source: "web".into(),
        destination: destination.into(),
        generation: 0,
        endpoint: "https://example.com/hook".into(),
        payload: Bytes::from(format!("{{\"messageId\":\"{message_id}\"}}")),
        created_at: 1_700_000_000_000,
        expires_at: 1_700_014_400_000,
        received_at: 1_699_999_999_000,
    }
}

fn transition(job_id: Ksuid, seq: i64, state: JobState) -> Transition {
    Transition { job_id, seq, state, at: 1_700_000_000_000 + seq, attempt: seq, status: None, error: None, retry_at: None }
}

/// Insert `jobs` in one transaction; the ids given (None = a repeat, not stored).
fn insert_all(db: &mut dyn JobStore, ids: &mut KsuidGenerator, jobs: &[NewJob]) -> Vec<Option<Ksuid>> {
    db.begin().unwrap();
    let out = jobs
        .iter()
        .map(|j| {
            let id = ids.next(1_800_000_000);
            db.insert_job(id, j).unwrap().then_some(id)
        })
        .collect();
    db.commit().unwrap();
    out
}

fn append(db: &mut dyn JobStore, rows: &[Transition]) {
    db.begin().unwrap();
    for t in rows {
        db.append_transition(t).unwrap();
    }
    db.commit().unwrap();
}

fn inserts_are_idempotent_on_message_destination_and_generation(b: &Backend) {
    let mut db = b.open(1);
    let mut ids = KsuidGenerator::default();
    let long = "m".repeat(10_000);
    let replay = NewJob { generation: 1, ..job("a", "hook") };
    let made = insert_all(
        db.as_mut(),
        &mut ids,
        &[job("a", "hook"), job("b", "hook"), job("a", "hook"), job("a", "other"), replay.clone(), job(&long, "hook"), job("A", "hook")],
    );
    let stored: Vec<bool> = made.iter().map(Option::is_some).collect();
    assert_eq!(stored, [true, true, false, true, true, true, true], "a repeat in the same transaction is skipped; case matters");
    // Again, in later transactions: nothing new, and the transaction stays usable after a repeat.
    let again = insert_all(db.as_mut(), &mut ids, &[job("a", "hook"), job(&long, "hook"), replay, job("c", "hook")]);
    assert_eq!(again.iter().map(Option::is_some).collect::<Vec<_>>(), [false, false, false, true]);
    assert_eq!(db.job_count().unwrap(), 7);
    assert!(db.job_exists("a", "hook", 0).unwrap());
    assert!(db.job_exists("a", "hook", 1).unwrap());
    assert!(db.job_exists(&long, "hook", 0).unwrap());
    assert!(!db.job_exists("a", "hook", 2).unwrap());
    assert!(!db.job_exists("b", "other", 0).unwrap());
    assert!(!db.job_exists(&long[1..], "hook", 0).unwrap(), "a prefix of a long id is another id");
}

fn the_database_refuses_update_and_delete_of_job_rows(b: &Backend) {
    let mut db = b.open(1);
    let mut ids = KsuidGenerator::default();
    let id = insert_all(db.as_mut(), &mut ids, &[job("a", "hook")])[0].unwrap();
    append(db.as_mut(), &[transition(id, 1, JobState::Executing), transition(id, 2, JobState::Succeeded)]);
    drop(db);

    let (jobs, tr) = b.tables_of(1);
    for sql in [
        format!("UPDATE {jobs} SET generation = 5"),
        format!("DELETE FROM {jobs}"),
        format!("UPDATE {tr} SET state = 'discarded'"),
        format!("DELETE FROM {tr}"),
        format!("DELETE FROM {tr} WHERE seq = 2"),
    ] {
        let err = b.execute_as_another_client(1, &sql).expect_err(&sql);
        assert!(err.contains("immutable") || err.contains("append-only"), "{sql}: {err}");
    }
    if b.engine == Engine::Postgres {
        for table in [&jobs, &tr] {
            let err = b.execute_as_another_client(1, &format!("TRUNCATE {table}")).expect_err("TRUNCATE");
            assert!(err.contains("immutable") || err.contains("append-only"), "TRUNCATE {table}: {err}");
        }
    }
    let mut db = b.open(1);
    assert_eq!(db.job_count().unwrap(), 1);
    let h = db.history(id).unwrap();
    assert_eq!(h.iter().map(|t| t.state).collect::<Vec<_>>(), [JobState::Executing, JobState::Succeeded]);
    assert_eq!(db.get(id).unwrap().unwrap().job.generation, 0);
}

fn pages_come_in_id_order_with_each_jobs_latest_state(b: &Backend) {
    let mut db = b.open(1);
    let mut ids = KsuidGenerator::default();
    let jobs: Vec<NewJob> = (0..25).map(|i| job(&format!("m{i:02}"), if i % 2 == 0 { "even" } else { "odd" })).collect();
    let made: Vec<Ksuid> = insert_all(db.as_mut(), &mut ids, &jobs).into_iter().map(Option::unwrap).collect();
    // Job 3: executing then awaiting_retry (retry_at set); job 4: succeeded; job 5: executing.
    let retry = Transition { retry_at: Some(1_700_000_060_000), status: Some(503), ..transition(made[3], 2, JobState::AwaitingRetry) };
    append(
        db.as_mut(),
        &[
            transition(made[3], 1, JobState::Executing),
            retry,
            transition(made[4], 1, JobState::Succeeded),
            transition(made[5], 1, JobState::Executing),
        ],
    );

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = db.page(after, 10).unwrap();
        assert!(page.len() <= 10);
        let done = page.len() < 10;
        after = page.last().map(|j| j.id).or(after);
        seen.extend(page);
        if done {
            break;
        }
    }
    assert_eq!(seen.iter().map(|j| j.id).collect::<Vec<_>>(), made, "every job once, in id order");
    assert_eq!(seen.iter().map(|j| j.job.message_id.clone()).collect::<Vec<_>>(), jobs.iter().map(|j| j.message_id.clone()).collect::<Vec<_>>());
    let by_id: HashMap<Ksuid, _> = seen.iter().map(|j| (j.id, j)).collect();
    let j3 = by_id[&made[3]];
    assert_eq!((j3.state, j3.seq, j3.attempt, j3.retry_at), (JobState::AwaitingRetry, 2, 2, Some(1_700_000_060_000)));
    assert_eq!((by_id[&made[4]].state, by_id[&made[4]].seq), (JobState::Succeeded, 1));
    assert_eq!(by_id[&made[5]].state, JobState::Executing);
    let j0 = by_id[&made[0]];
    assert_eq!((j0.state, j0.seq, j0.attempt, j0.retry_at), (JobState::AwaitingScheduling, 0, 0, None));
    assert_eq!(db.page(Some(made[24]), 10).unwrap().len(), 0);
    assert_eq!(db.page(Some(made[20]), 10).unwrap().iter().map(|j| j.id).collect::<Vec<_>>(), made[21..]);
    assert_eq!(db.count_unfinished().unwrap(), 24, "only the succeeded job is finished");
    assert_eq!(db.max_id().unwrap(), Some(made[24]));
}

fn history_is_every_transition_oldest_first(b: &Backend) {
    let mut db = b.open(1);
    let mut ids = KsuidGenerator::default();
    let made = insert_all(db.as_mut(), &mut ids, &[job("a", "hook"), job("b", "hook")]);
    let (a, other) = (made[0].unwrap(), made[1].unwrap());
    let rows = vec![
        transition(a, 1, JobState::Executing),
        Transition {
            status: Some(503),
            error: Some("HTTP 503: ünïcødé ✓ 🙂 \"quoted\" 'single'".into()),
            retry_at: Some(1_700_000_001_000),
            ..transition(a, 2, JobState::AwaitingRetry)
        },
        transition(a, 3, JobState::Executing),
        Transition { status: Some(200), ..transition(a, 4, JobState::Succeeded) },
    ];
    // Appended over two transactions, interleaved with another job's rows.
    append(db.as_mut(), &[rows[0].clone(), rows[1].clone(), transition(other, 1, JobState::Executing)]);
    append(db.as_mut(), &[rows[2].clone(), transition(other, 2, JobState::Discarded), rows[3].clone()]);
    assert_eq!(db.history(a).unwrap(), rows);
    assert_eq!(db.history(other).unwrap().len(), 2);
    assert!(db.history(ids.next(1_800_000_001)).unwrap().is_empty(), "an unknown id has no history");
    assert_eq!(db.count_unfinished().unwrap(), 0);
}

fn stats_count_jobs_by_destination_and_latest_state(b: &Backend) {
    let mut db = b.open(1);
    let mut ids = KsuidGenerator::default();
    let made: Vec<Ksuid> =
        insert_all(db.as_mut(), &mut ids, &[job("a", "crm"), job("b", "crm"), job("c", "crm"), job("d", "warehouse"), job("e", "warehouse")])
            .into_iter()
            .map(Option::unwrap)
            .collect();
    append(
        db.as_mut(),
        &[
            transition(made[0], 1, JobState::Executing),
            transition(made[0], 2, JobState::Succeeded),
            transition(made[1], 1, JobState::Executing),
            transition(made[3], 1, JobState::Archived),
        ],
    );
    let stats = db.stats().unwrap();
    let expected = vec![
        ("crm".to_string(), JobState::AwaitingScheduling, 1),
        ("crm".to_string(), JobState::Executing, 1),
        ("crm".to_string(), JobState::Succeeded, 1),
        ("warehouse".to_string(), JobState::Archived, 1),
        ("warehouse".to_string(), JobState::AwaitingScheduling, 1),
    ];
    assert_eq!(stats, expected);
}

fn payloads_and_texts_round_trip_exactly(b: &Backend) {
    let mut db = b.open(1);
    let mut ids = KsuidGenerator::default();
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    let odd = NewJob {
        message_id: "ünïcødé/🙂 'quoted' \"double\" \\ %_".into(),
        source: "src-é".into(),
        endpoint: "https://example.com/hook?a=1&b='2'".into(),
        payload: Bytes::from(every_byte.clone()),
        created_at: i64::MAX - 1,
        expires_at: -1,
        received_at: 0,
        ..job("x", "hook")
    };
    let made = insert_all(db.as_mut(), &mut ids, &[odd.clone(), job("plain", "hook")]);
    let id = made[0].unwrap();
    assert_eq!(db.payload(id).unwrap().as_deref(), Some(&every_byte[..]), "1 MiB of every byte value");
    assert_eq!(db.payload(ids.next(1_800_000_002)).unwrap(), None);
    let got = db.get(id).unwrap().expect("stored");
    assert_eq!(
        (got.job.message_id.as_str(), got.job.source.as_str(), got.job.endpoint.as_str(), got.job.destination.as_str()),
        (odd.message_id.as_str(), odd.source.as_str(), odd.endpoint.as_str(), "hook")
    );
    assert_eq!((got.job.created_at, got.job.expires_at, got.job.received_at, got.job.generation), (i64::MAX - 1, -1, 0, 0));
    assert_eq!(got.job.payload.len(), 1 << 20);
    let found = db.find(&odd.message_id).unwrap();
    assert_eq!(found.iter().map(|j| j.id).collect::<Vec<_>>(), [id], "by messageId");
    assert_eq!(db.find(&id.to_string()).unwrap()[0].job.message_id, odd.message_id, "by KSUID");
    assert!(db.find("no-such-message").unwrap().is_empty());
    assert!(db.find(&odd.message_id.to_uppercase()).unwrap().is_empty(), "messageIds compare exactly");
}

fn a_rolled_back_transaction_leaves_nothing(b: &Backend) {
    let mut db = b.open(1);
    let mut ids = KsuidGenerator::default();
    let kept = insert_all(db.as_mut(), &mut ids, &[job("kept", "hook")])[0].unwrap();
    db.begin().unwrap();
    let id = ids.next(1_800_000_000);
    assert!(db.insert_job(id, &job("gone", "hook")).unwrap());
    db.append_transition(&transition(kept, 1, JobState::Executing)).unwrap();
    db.rollback();
    assert_eq!(db.job_count().unwrap(), 1);
    assert!(!db.job_exists("gone", "hook", 0).unwrap());
    assert!(db.history(kept).unwrap().is_empty());
    // The connection is usable afterwards, and the key can be inserted now.
    assert!(insert_all(db.as_mut(), &mut ids, &[job("gone", "hook")])[0].is_some());
}

fn a_reopened_jobdb_keeps_its_jobs_ids_and_creation_time(b: &Backend) {
    let mut db = b.open(3);
    let created = db.created_at().unwrap();
    assert!((sluice_deliver::now_ms() - created).abs() < 60_000, "created now: {created}");
    assert_eq!(db.max_id().unwrap(), None);
    let mut ids = KsuidGenerator::default();
    let made = insert_all(db.as_mut(), &mut ids, &[job("a", "hook"), job("b", "hook")]);
    drop(db);
    let mut db = b.open(3);
    assert_eq!(db.created_at().unwrap(), created);
    assert_eq!(db.max_id().unwrap(), made[1]);
    assert_eq!(db.job_count().unwrap(), 2);
    let mut ids = KsuidGenerator::above(db.max_id().unwrap());
    assert!(insert_all(db.as_mut(), &mut ids, &[job("a", "hook")])[0].is_none(), "still a repeat");
}

fn rotation_drops_a_jobdb_whole_and_leaves_the_others(b: &Backend) {
    let mut ids = KsuidGenerator::default();
    let mut old = b.open(1);
    let mut new = b.open(2);
    let finished = insert_all(old.as_mut(), &mut ids, &[job("a", "hook"), job("b", "hook")]);
    append(old.as_mut(), &finished.iter().map(|id| transition(id.unwrap(), 1, JobState::Succeeded)).collect::<Vec<_>>());
    assert_eq!(old.count_unfinished().unwrap(), 0);
    insert_all(new.as_mut(), &mut ids, &[job("c", "hook")]);
    drop(old);
    assert!(b.exists(1) && b.exists(2));

    b.drop_jobdb(1);
    assert!(!b.exists(1), "tables (or files) and registry row gone");
    assert!(b.exists(2));
    assert_eq!(new.job_count().unwrap(), 1, "the newest JobDB is untouched");
    if let Some(sql) = &b.sql {
        assert_eq!(sql.list().unwrap().iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2]);
        assert_eq!(sql.tables().unwrap(), ["job_state_transitions_000002", "jobs_000002"]);
    }
    b.drop_jobdb(1); // dropping again is a no-op
                     // A JobDB number used again starts empty.
    let mut reused = b.open(1);
    assert_eq!(reused.job_count().unwrap(), 0);
    assert!(insert_all(reused.as_mut(), &mut ids, &[job("a", "hook")])[0].is_some());
}

fn the_writer_thread_groups_commands_into_commits(b: &Backend) {
    let mut db = b.open(1);
    let max_id = db.max_id().unwrap();
    let (tx, mut from_writer) = tokio::sync::mpsc::unbounded_channel();
    let (writer, thread) = WriterHandle::spawn(db, "jobdb-test".into(), max_id, tx).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // Many concurrent inserts (grouped by the writer), with repeats.
        let tasks: Vec<_> = (0..20)
            .map(|t| {
                let w = writer.clone();
                tokio::spawn(async move { w.insert((0..50).map(|i| job(&format!("m{}", (t * 50 + i) % 600), "hook")).collect()).await })
            })
            .collect();
        let mut new = 0;
        for t in tasks {
            new += t.await.unwrap().unwrap();
        }
        assert_eq!(new, 600, "1,000 offered, 600 distinct");
        let mut inserted = Vec::new();
        while inserted.len() < 600 {
            match from_writer.recv().await.unwrap() {
                FromWriter::Inserted(jobs) => inserted.extend(jobs),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(inserted.windows(2).all(|w| w[0].id < w[1].id), "the director hears of jobs in id order");
        let exists = writer.exists(vec![("m1".into(), "hook".into(), 0), ("m999".into(), "hook".into(), 0)]).await.unwrap();
        assert_eq!(exists, [true, false]);
        let first = inserted[0].id;
        let payloads = writer.execute(vec![transition(first, 1, JobState::Executing)], vec![first]).await.unwrap();
        assert_eq!(payloads[&first], inserted[0].job.payload);
        writer.transitions_nowait(vec![transition(first, 2, JobState::Succeeded)]).unwrap();
        assert_eq!(writer.history(first).await.unwrap().len(), 2);
        assert_eq!(writer.count_unfinished().await.unwrap(), 599);
        writer.load_page(None, 1000).unwrap();
        match from_writer.recv().await.unwrap() {
            FromWriter::Loaded { jobs, complete } => assert!(complete && jobs.len() == 600),
            other => panic!("unexpected {other:?}"),
        }
    });
    writer.close();
    thread.join().unwrap();
    assert!(matches!(rt.block_on(writer.count_unfinished()), Err(sluice_deliver::DeliverError::Closed)));
}

fn batched_inserts_and_transitions_keep_the_same_rules(b: &Backend) {
    let mut db = b.open(1);
    let mut ids = KsuidGenerator::default();
    // 2,500 jobs (several statements), 500 of them repeats of keys earlier in the batch,
    // and some 300 KB payloads so statements are also split by size.
    let big = Bytes::from(vec![b'p'; 300_000]);
    let jobs: Vec<NewJob> = (0..2500)
        .map(|i| NewJob { payload: if i % 100 == 7 { big.clone() } else { job("x", "hook").payload }, ..job(&format!("m{}", i % 2000), "hook") })
        .collect();
    let with_ids: Vec<(Ksuid, &NewJob)> = jobs.iter().map(|j| (ids.next(1_800_000_000), j)).collect();
    db.begin().unwrap();
    let stored = db.insert_jobs(&with_ids).unwrap();
    db.commit().unwrap();
    assert!(stored[..2000].iter().all(|s| *s) && stored[2000..].iter().all(|s| !*s), "repeats within the batch are skipped");
    assert_eq!(db.job_count().unwrap(), 2000);
    assert_eq!(db.payload(with_ids[107].0).unwrap().map(|p| p.len()), Some(300_000));
    // The same batch again, plus one new job: only that one is stored.
    let extra = job("new", "hook");
    let again: Vec<(Ksuid, &NewJob)> = jobs.iter().chain([&extra]).map(|j| (ids.next(1_800_000_000), j)).collect();
    db.begin().unwrap();
    let stored = db.insert_jobs(&again).unwrap();
    db.commit().unwrap();
    assert_eq!(stored.iter().filter(|s| **s).count(), 1);
    assert!(stored[2500]);
    assert!(db.insert_jobs(&[]).unwrap().is_empty());

    // 4,000 transitions in one call, two per job for 2,000 jobs.
    let rows: Vec<Transition> = with_ids[..2000]
        .iter()
        .flat_map(|(id, _)| {
            [transition(*id, 1, JobState::Executing), Transition { error: Some("timeout".into()), ..transition(*id, 2, JobState::AwaitingRetry) }]
        })
        .collect();
    db.begin().unwrap();
    db.append_transitions(&rows).unwrap();
    db.commit().unwrap();
    assert_eq!(db.count_unfinished().unwrap(), 2001);
    assert_eq!(db.history(with_ids[1999].0).unwrap(), rows[3998..4000]);
    assert_eq!(db.stats().unwrap(), [("hook".to_string(), JobState::AwaitingRetry, 2000), ("hook".to_string(), JobState::AwaitingScheduling, 1)]);
    if b.engine != Engine::Sqlite {
        // The SQL backends skip a row whose (job_id, seq) exists: the writer sends rows again after a
        // commit whose outcome was lost with the connection (SQLite refuses it: its commits do not get lost).
        db.begin().unwrap();
        db.append_transitions(&[rows[0].clone(), transition(with_ids[0].0, 3, JobState::Succeeded)]).unwrap();
        db.commit().unwrap();
        assert_eq!(db.history(with_ids[0].0).unwrap().len(), 3);
    }
}

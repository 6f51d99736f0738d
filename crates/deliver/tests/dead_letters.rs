//! The dead-letter store of the control database, on SQLite
//! (`control.sqlite`) and on MariaDB and PostgreSQL (`deliver.jobdb_url`,
//! table `sluice_control_dead_letters`): one row per (topic, partition,
//! offset, generation) however often it is stored, bounded key, payload and
//! reason, the row and byte caps (finished rows make room, else nothing is
//! stored), listing newest first with excerpts, replay requests, claims by
//! one process, outcomes, and discards.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{Backend, Engine};
use sluice_core::Config;
use sluice_deliver::control::{
    ControlDb, DeadLetterInsert, DeadLetterLimits, NewDeadLetter, DEAD_LETTER_EXCERPT_BYTES, DEAD_LETTER_MAX_KEY_BYTES, DEAD_LETTER_MAX_REASON_CHARS,
};

every_engine!(
    a_record_is_stored_once_per_generation_and_bounded,
    lists_are_newest_first_with_excerpts_and_pages,
    at_the_cap_finished_rows_make_room_else_nothing_is_stored,
    the_byte_cap_holds_too,
    replay_requests_claims_and_outcomes,
    discarding_closes_open_rows_only,
    a_requested_replay_is_claimed_by_one_process,
);

/// The store under test: "processes" open it with their own data_dir.
struct Store<'a> {
    backend: &'a Backend,
    /// SQLite: the one data_dir every "process" shares (one control.sqlite).
    shared_dir: tempfile::TempDir,
}

impl Store<'_> {
    /// A process's connection to the control database, with its own data_dir
    /// (SQL) or the shared one (SQLite).
    fn open(&self) -> (Option<tempfile::TempDir>, ControlDb) {
        match &self.backend.database_url {
            Some(url) => {
                let dir = tempfile::tempdir().expect("a temp dir");
                let db = ControlDb::open_for(&config(dir.path(), Some(url))).expect("open the control database");
                (Some(dir), db)
            }
            None => (None, ControlDb::open_for(&config(self.shared_dir.path(), None)).expect("open control.sqlite")),
        }
    }

    fn open_in(&self, dir: &Path) -> ControlDb {
        ControlDb::open_for(&config(dir, self.backend.database_url.as_deref())).expect("open the control database")
    }
}

fn config(data_dir: &Path, url: Option<&str>) -> Config {
    let mut text = format!("[server]\ndata_dir = \"{}\"\n", data_dir.display());
    if let Some(url) = url {
        text.push_str(&format!("[deliver]\njobdb_url = \"{url}\"\n"));
    }
    Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn run(engine: Engine, name: &str, test: fn(&Store<'_>)) {
    if let Some(backend) = Backend::new(engine, &format!("dl_{name}_{engine:?}")) {
        test(&Store { backend: &backend, shared_dir: tempfile::tempdir().expect("a temp dir") });
    }
}

fn letter(partition: u32, offset: u64, payload: &[u8]) -> NewDeadLetter {
    NewDeadLetter {
        stage: "route",
        topic: "output".into(),
        partition,
        offset,
        generation: 0,
        destination: None,
        record_ms: 1_700_000_000_000 + offset as i64,
        key: format!("web/m-{partition}-{offset}").into_bytes(),
        payload: payload.to_vec(),
        reason: "event is not JSON: expected value at line 1 column 1".into(),
    }
}

fn stored(outcome: DeadLetterInsert) -> (u64, u64) {
    match outcome {
        DeadLetterInsert::Stored { new, existing } => (new, existing),
        full => panic!("expected the letters stored, got {full:?}"),
    }
}

fn a_record_is_stored_once_per_generation_and_bounded(store: &Store<'_>) {
    let (_dir, db) = store.open();
    let max_payload = db.dead_letter_limits().max_payload;
    assert_eq!(max_payload, 32 * 1024, "bounded by ingest.max_event_bytes");
    let mut odd = letter(1, 7, &[0xff, 0x00, b'{', 0xfe]);
    odd.key = vec![0xc3, 0x28, b'/', 0x00];
    odd.reason = format!("nul \0 here and long: {}", "x".repeat(5000));
    let mut big = letter(2, 9, &vec![b'a'; max_payload + 10]);
    big.key = vec![b'k'; DEAD_LETTER_MAX_KEY_BYTES + 1];
    assert_eq!(stored(db.insert_dead_letters(&[letter(0, 5, b"not json"), odd.clone(), big]).unwrap()), (3, 0));
    // The same batch again (a route batch replayed after a crash), plus one new record.
    assert_eq!(stored(db.insert_dead_letters(&[letter(0, 5, b"not json"), odd.clone(), letter(0, 6, b"x")]).unwrap()), (1, 2));
    // Twice inside one batch: once.
    assert_eq!(stored(db.insert_dead_letters(&[letter(3, 1, b"a"), letter(3, 1, b"a")]).unwrap()), (1, 1));
    // The same record under a replay's generation is a row of its own.
    let mut replayed = letter(0, 5, b"not json");
    replayed.stage = "replay";
    replayed.generation = 12;
    replayed.destination = Some("d1".into());
    assert_eq!(stored(db.insert_dead_letters(&[replayed.clone()]).unwrap()), (1, 0));
    assert_eq!(stored(db.insert_dead_letters(&[replayed]).unwrap()), (0, 1));

    let all = db.dead_letters(None, 100).unwrap();
    assert_eq!(all.len(), 6);
    let counts = db.dead_letter_counts().unwrap();
    assert_eq!((counts.open, counts.rows, counts.replayed, counts.discarded), (6, 6, 0, 0));

    let find = |p: u32, o: u64, g: i64| all.iter().find(|d| d.partition == p && d.offset == o && d.generation == g).expect("stored").id;
    let d = db.dead_letter(find(1, 7, 0)).unwrap().expect("by id");
    assert_eq!((d.key.as_slice(), d.payload.as_slice()), (&[0xc3, 0x28, b'/', 0x00][..], &[0xff, 0x00, b'{', 0xfe][..]), "bytes kept as they were");
    assert!(!d.truncated);
    assert_eq!((d.stage.as_str(), d.topic.as_str(), d.record_ms, d.state()), ("route", "output", 1_700_000_000_007, "new"));
    assert!(!d.reason.contains('\0'));
    assert_eq!(d.reason.chars().count(), DEAD_LETTER_MAX_REASON_CHARS + 1, "clipped, with an ellipsis");
    let d = db.dead_letter(find(2, 9, 0)).unwrap().unwrap();
    assert!(d.truncated);
    assert_eq!((d.payload.len(), d.payload_size, d.key.len()), (max_payload, max_payload as i64 + 10, DEAD_LETTER_MAX_KEY_BYTES));
    let d = db.dead_letter(find(0, 5, 12)).unwrap().unwrap();
    assert_eq!((d.stage.as_str(), d.destination.as_deref()), ("replay", Some("d1")));
    assert!(db.dead_letter(i64::MAX).unwrap().is_none());
    let now = sluice_deliver::now_ms();
    assert!(all.iter().all(|d| d.created_at_ms > now - 600_000 && d.created_at_ms <= now));
}

fn lists_are_newest_first_with_excerpts_and_pages(store: &Store<'_>) {
    let (_dir, db) = store.open();
    let long = vec![b'z'; 2000];
    for o in 0..5 {
        db.insert_dead_letters(&[letter(0, o, &long)]).unwrap();
    }
    let page = db.dead_letters(None, 2).unwrap();
    assert_eq!(page.iter().map(|d| d.offset).collect::<Vec<_>>(), [4, 3]);
    assert!(page.iter().all(|d| d.payload.len() == DEAD_LETTER_EXCERPT_BYTES && d.payload_size == 2000));
    let next = db.dead_letters(Some(page[1].id), 2).unwrap();
    assert_eq!(next.iter().map(|d| d.offset).collect::<Vec<_>>(), [2, 1]);
    let last = db.dead_letters(Some(next[1].id), 2).unwrap();
    assert_eq!(last.iter().map(|d| d.offset).collect::<Vec<_>>(), [0]);
    assert!(db.dead_letters(Some(last[0].id), 2).unwrap().is_empty());
    assert_eq!(db.dead_letter(page[0].id).unwrap().unwrap().payload.len(), 2000, "whole by id");
}

fn at_the_cap_finished_rows_make_room_else_nothing_is_stored(store: &Store<'_>) {
    let (_dir, db) = store.open();
    db.set_dead_letter_limits(DeadLetterLimits { max_rows: 3, ..db.dead_letter_limits() });
    assert_eq!(stored(db.insert_dead_letters(&[letter(0, 0, b"a"), letter(0, 1, b"b")]).unwrap()), (2, 0));
    // Two more do not fit in one free row: neither is stored.
    match db.insert_dead_letters(&[letter(0, 2, b"c"), letter(0, 3, b"d")]).unwrap() {
        DeadLetterInsert::Full { rows, .. } => assert_eq!(rows, 2),
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(db.dead_letter_counts().unwrap().rows, 2);
    assert_eq!(stored(db.insert_dead_letters(&[letter(0, 2, b"c")]).unwrap()), (1, 0));
    assert!(matches!(db.insert_dead_letters(&[letter(0, 3, b"d")]).unwrap(), DeadLetterInsert::Full { rows: 3, .. }));
    // Storing again what is stored needs no room.
    assert_eq!(stored(db.insert_dead_letters(&[letter(0, 0, b"a")]).unwrap()), (0, 1));
    // A finished row (discarded, or replayed) is deleted to make room.
    let first = db.dead_letters(None, 10).unwrap().into_iter().find(|d| d.offset == 0).unwrap();
    assert_eq!(db.discard_dead_letters(Some(first.id)).unwrap(), 1);
    let second = db.dead_letters(None, 10).unwrap().into_iter().find(|d| d.offset == 1).unwrap();
    assert_eq!(db.request_dead_letter_replay(Some(second.id)).unwrap(), 1);
    db.finish_dead_letter_replay(second.id, Ok(1)).unwrap();
    assert_eq!(stored(db.insert_dead_letters(&[letter(0, 3, b"d"), letter(0, 4, b"e")]).unwrap()), (2, 0));
    let offsets: Vec<u64> = db.dead_letters(None, 10).unwrap().iter().map(|d| d.offset).collect();
    assert_eq!(offsets, [4, 3, 2]);
    assert!(db.dead_letter(first.id).unwrap().is_none());
    assert!(matches!(db.insert_dead_letters(&[letter(0, 5, b"f")]).unwrap(), DeadLetterInsert::Full { rows: 3, .. }));
}

fn the_byte_cap_holds_too(store: &Store<'_>) {
    let (_dir, db) = store.open();
    db.set_dead_letter_limits(DeadLetterLimits { max_bytes: 110, ..db.dead_letter_limits() });
    // Key "web/m-0-N" (9 bytes) + 40 bytes of payload: two fit in 110, three do not; a key alone does.
    let payload = vec![b'p'; 40];
    assert_eq!(stored(db.insert_dead_letters(&[letter(0, 1, &payload), letter(0, 2, &payload)]).unwrap()), (2, 0));
    assert_eq!(db.dead_letter_counts().unwrap().bytes, 98);
    assert!(matches!(db.insert_dead_letters(&[letter(0, 3, &payload)]).unwrap(), DeadLetterInsert::Full { rows: 2, bytes: 98 }));
    assert_eq!(stored(db.insert_dead_letters(&[letter(0, 3, b"")]).unwrap()), (1, 0));
}

fn replay_requests_claims_and_outcomes(store: &Store<'_>) {
    let (_dir, db) = store.open();
    db.insert_dead_letters(&[letter(0, 0, b"a"), letter(0, 1, b"b"), letter(0, 2, b"c")]).unwrap();
    let ids: Vec<i64> = db.dead_letters(None, 10).unwrap().iter().rev().map(|d| d.id).collect();
    assert!(db.claim_dead_letter_replays(10).unwrap().is_empty(), "nothing requested yet");
    assert_eq!(db.request_dead_letter_replay(Some(ids[1])).unwrap(), 1);
    assert_eq!(db.request_dead_letter_replay(Some(i64::MAX)).unwrap(), 0);
    let claimed = db.claim_dead_letter_replays(10).unwrap();
    assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), [ids[1]]);
    assert_eq!(claimed[0].payload, b"b", "claimed whole, for the replay");
    assert_eq!(claimed[0].state(), "replay_requested");
    // A failed replay keeps the row open with its error; it is not retried by itself.
    db.finish_dead_letter_replay(ids[1], Err("event is not JSON: still")).unwrap();
    let d = db.dead_letter(ids[1]).unwrap().unwrap();
    assert_eq!((d.state(), d.last_error.as_deref(), d.attempts, d.replayed_at_ms), ("replay_failed", Some("event is not JSON: still"), 1, None));
    assert!(db.claim_dead_letter_replays(10).unwrap().is_empty());
    let counts = db.dead_letter_counts().unwrap();
    assert_eq!((counts.open, counts.replay_failed, counts.replay_requested), (3, 1, 0));
    // Every open row.
    assert_eq!(db.request_dead_letter_replay(None).unwrap(), 3);
    assert_eq!(db.dead_letter_counts().unwrap().replay_requested, 3);
    let claimed = db.claim_dead_letter_replays(2).unwrap();
    assert_eq!(claimed.iter().map(|d| d.id).collect::<Vec<_>>(), ids[..2], "oldest first, up to the limit");
    for d in &claimed {
        db.finish_dead_letter_replay(d.id, Ok(2)).unwrap();
    }
    let d = db.dead_letter(ids[1]).unwrap().unwrap();
    assert_eq!((d.state(), d.replayed_jobs, d.attempts, d.last_error.as_deref()), ("replayed", Some(2), 2, None));
    assert!(!d.is_open());
    assert_eq!(db.claim_dead_letter_replays(10).unwrap().iter().map(|d| d.id).collect::<Vec<_>>(), [ids[2]]);
    // A replayed row is not requested again.
    assert_eq!(db.request_dead_letter_replay(Some(ids[0])).unwrap(), 0);
    let counts = db.dead_letter_counts().unwrap();
    assert_eq!((counts.open, counts.replayed, counts.replay_requested), (1, 2, 1));
}

fn discarding_closes_open_rows_only(store: &Store<'_>) {
    let (_dir, db) = store.open();
    db.insert_dead_letters(&[letter(0, 0, b"a"), letter(0, 1, b"b"), letter(0, 2, b"c")]).unwrap();
    let ids: Vec<i64> = db.dead_letters(None, 10).unwrap().iter().rev().map(|d| d.id).collect();
    db.request_dead_letter_replay(Some(ids[0])).unwrap();
    db.finish_dead_letter_replay(ids[0], Ok(0)).unwrap();
    db.request_dead_letter_replay(Some(ids[1])).unwrap();
    assert_eq!(db.discard_dead_letters(Some(ids[0])).unwrap(), 0, "replayed: not open");
    assert_eq!(db.discard_dead_letters(Some(ids[1])).unwrap(), 1);
    let d = db.dead_letter(ids[1]).unwrap().unwrap();
    assert_eq!((d.state(), d.replay_requested_at_ms), ("discarded", None), "a discard withdraws the replay request");
    assert!(db.claim_dead_letter_replays(10).unwrap().is_empty());
    assert_eq!(db.discard_dead_letters(None).unwrap(), 1);
    let counts = db.dead_letter_counts().unwrap();
    assert_eq!((counts.open, counts.discarded, counts.replayed, counts.rows), (0, 2, 1, 3));
}

fn a_requested_replay_is_claimed_by_one_process(store: &Store<'_>) {
    if store.backend.database_url.is_none() {
        return; // One process writes a data_dir's control.sqlite: nothing to share.
    }
    let (_a_dir, a) = store.open();
    let b_dir = tempfile::tempdir().unwrap();
    let b = store.open_in(b_dir.path());
    a.insert_dead_letters(&[letter(0, 0, b"a"), letter(0, 1, b"b")]).unwrap();
    let ids: Vec<i64> = a.dead_letters(None, 10).unwrap().iter().rev().map(|d| d.id).collect();
    assert_eq!(a.request_dead_letter_replay(None).unwrap(), 2);
    assert_eq!(b.claim_dead_letter_replays(10).unwrap().len(), 2, "B asks first: both are B's");
    assert!(a.claim_dead_letter_replays(10).unwrap().is_empty());
    b.finish_dead_letter_replay(ids[0], Ok(1)).unwrap();
    // B restarted on its data_dir resumes the one it had not finished.
    drop(b);
    let b = store.open_in(b_dir.path());
    assert_eq!(b.claim_dead_letter_replays(10).unwrap().iter().map(|d| d.id).collect::<Vec<_>>(), [ids[1]]);
    // A new request (B's data_dir lost, say) lets whoever asks first claim it again.
    assert_eq!(a.request_dead_letter_replay(Some(ids[1])).unwrap(), 1);
    assert_eq!(a.claim_dead_letter_replays(10).unwrap().iter().map(|d| d.id).collect::<Vec<_>>(), [ids[1]]);
    assert!(b.claim_dead_letter_replays(10).unwrap().is_empty());
    a.finish_dead_letter_replay(ids[1], Err("boom")).unwrap();
    assert_eq!(b.dead_letter(ids[1]).unwrap().unwrap().last_error.as_deref(), Some("boom"));
}

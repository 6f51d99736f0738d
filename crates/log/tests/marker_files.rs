//! What the embedded log does with a `durable` marker path that is not a
//! marker it wrote (module docs of `sluice_log::embedded`, invariant 7):
//! something that is not a regular file, or is too long, is a corrupt marker
//! (warned without its contents, taken for missing); and how a marker that
//! cannot be written is logged (first failure, summaries, recovery).

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use sluice_log::{EmbeddedLog, Log, Record};
use tracing::field::{Field, Visit};

/// Every event logged by this test binary, as "LEVEL field=value ...".
fn captured() -> Arc<Mutex<Vec<String>>> {
    static LINES: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    LINES
        .get_or_init(|| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            tracing::subscriber::set_global_default(Capture(lines.clone())).expect("one subscriber");
            lines
        })
        .clone()
}

/// The captured lines containing all of `needles`.
fn lines_with(needles: &[&str]) -> Vec<String> {
    captured().lock().unwrap().iter().filter(|l| needles.iter().all(|n| l.contains(n))).cloned().collect()
}

struct Capture(Arc<Mutex<Vec<String>>>);

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = Line(event.metadata().level().to_string());
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Append `count` records to partition 0 of `topic` (fsync on), close.
async fn populate(root: &Path, topic: &str, count: u64) -> Vec<Record> {
    let log = open(root, &options(&[(topic, 1)], 1 << 20));
    let records: Vec<Record> = (0..count).map(|o| numbered(0, o, 50)).collect();
    assert_eq!(log.append(topic, 0, records.clone()).await.unwrap(), 0);
    log.close();
    records
}

/// Run `f` on its own thread; fail (instead of hanging) after 20 s.
fn within_20s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{what} hung"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_marker_that_is_not_a_regular_file_is_ignored_not_read() {
    captured();
    const SECRET: &str = "SECRET-CONTENTS-OF-ANOTHER-FILE";
    for case in ["symlink to /dev/zero", "FIFO", "symlink to another file", "directory", "too long"] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let topic = "m";
        let expected = populate(root, topic, 50).await;
        let marker = marker_path(root, topic, 0);
        let other = root.join("other-file");
        std::fs::write(&other, SECRET).unwrap();
        std::fs::remove_file(&marker).unwrap();
        match case {
            "symlink to /dev/zero" => std::os::unix::fs::symlink("/dev/zero", &marker).unwrap(),
            "FIFO" => {
                let status = std::process::Command::new("mkfifo").arg(&marker).status().unwrap();
                assert!(status.success(), "mkfifo");
            }
            "symlink to another file" => std::os::unix::fs::symlink(&other, &marker).unwrap(),
            "directory" => std::fs::create_dir(&marker).unwrap(),
            _ => std::fs::write(&marker, marker_line(0, 50, 100).repeat(100)).unwrap(),
        }
        let marker_shown = marker.display().to_string();

        // Read-only: opens and reads everything, at once.
        let r = root.to_owned();
        let ro = within_20s("a read-only open", move || EmbeddedLog::open_read_only(&r)).unwrap();
        assert_records(&read_all(&ro, topic, 0, 0, 1000).await, 0, &expected);
        drop(ro);
        let warned = lines_with(&[&marker_shown, "unreadable durable-through marker ignored"]);
        assert_eq!(warned.len(), 1, "{case}: one warning: {warned:?}");
        assert!(warned[0].starts_with("WARN"), "{case}: {warned:?}");
        assert!(!warned[0].contains(SECRET), "{case}: the warning shows another file's contents: {warned:?}");
        if case == "too long" {
            assert!(warned[0].contains("longer than 512 bytes"), "{warned:?}");
        } else {
            assert!(warned[0].contains("not a regular file"), "{case}: {warned:?}");
            assert!(warned[0].contains("(not shown)"), "{case}: {warned:?}");
        }

        // For writing: opens (the fallback of a missing marker), reads
        // everything, appends, and writes a real marker in its place.
        let (r, opts) = (root.to_owned(), options(&[(topic, 1)], 1 << 20));
        let opened = within_20s("an open for writing", move || EmbeddedLog::open(&r, opts));
        if case == "directory" {
            // A directory cannot be replaced by a file: the open fails with
            // an error naming it, rather than hanging or losing anything.
            let e = opened.err().expect("a directory named durable cannot be replaced").to_string();
            assert!(e.contains(&marker_shown), "{e}");
            continue;
        }
        let log = opened.unwrap();
        assert_records(&read_all(&log, topic, 0, 0, 1000).await, 0, &expected);
        assert_eq!(log.append(topic, 0, vec![numbered(0, 50, 20)]).await.unwrap(), 50);
        log.close();
        assert!(std::fs::symlink_metadata(&marker).unwrap().file_type().is_file(), "{case}: a real marker replaced it");
        assert!(std::fs::read_to_string(&marker).unwrap().starts_with("segment=0 end=51 "), "{case}");
        assert_eq!(std::fs::read_to_string(&other).unwrap(), SECRET, "{case}: the symlink's target is untouched");
        assert!(lines_with(&[SECRET]).is_empty(), "{case}: another file's contents were logged");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_marker_that_cannot_be_written_is_logged_once_then_once_when_it_works_again() {
    captured();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let topic = "flaky";
    let log = open(root, &options(&[(topic, 1)], 1 << 20));
    assert_eq!(log.append(topic, 0, vec![numbered(0, 0, 20)]).await.unwrap(), 0);
    // Fault injection: the marker's temporary file cannot be created while
    // a directory has its name (as it cannot while the disk is full).
    let tmp = marker_path(root, topic, 0).with_extension("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // Appends for 4.5 s: the writer tries the marker about once a second.
    let started = Instant::now();
    let mut n = 1;
    while started.elapsed() < Duration::from_millis(4500) {
        assert_eq!(log.append(topic, 0, vec![numbered(0, n, 20)]).await.unwrap(), n, "appends go on");
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = lines_with(&["topic=flaky", "could not update the log's durable-through marker"]);
    assert_eq!(failed.len(), 1, "the first failure only, not one a second: {failed:?}");
    assert!(failed[0].starts_with("WARN") && !failed[0].contains("still"), "{failed:?}");
    assert!(lines_with(&["topic=flaky", "written again"]).is_empty());

    // The space comes back: the idle writer's next try works, and says so once.
    std::fs::remove_dir(&tmp).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let recovered = loop {
        let r = lines_with(&["topic=flaky", "the log's durable-through marker is written again"]);
        if !r.is_empty() || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    let failures: u64 = recovered[0].split(" failures=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(failures >= 4, "about one failed try a second for 4.5 s: {recovered:?}");
    assert!(std::fs::read_to_string(marker_path(root, topic, 0)).unwrap().starts_with(&format!("segment=0 end={n} ")));
    log.close();
    assert_eq!(lines_with(&["topic=flaky", "durable-through marker"]).len(), 2, "nothing else was logged about it");
}

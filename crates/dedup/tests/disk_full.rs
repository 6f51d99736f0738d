//! Dedup on a full disk: the index's writes fail, the process lives, the
//! partition holds its input offset, retries with backoff, and resumes by
//! itself once writes succeed again, losing and duplicating nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_dedup::index::{faults, now_ms, DedupIndex, IndexOptions};
use sluice_dedup::{DedupMetrics, DedupSettings, DedupWorker, GROUP, INPUT_TOPIC, OUTPUT_TOPIC};
use sluice_log::{EmbeddedLog, Log, LogOptions, Record};

fn rec(id: &str) -> Record {
    Record { key: Bytes::from(format!("web/{id}")), value: Bytes::from(format!("{{\"messageId\":\"{id}\"}}")) }
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?}: {}", what());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn failing_index_writes_hold_the_partition_back_and_it_resumes_by_itself_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let options = LogOptions { topics: vec![(INPUT_TOPIC.into(), 1), (OUTPUT_TOPIC.into(), 1)], ..LogOptions::default() };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(&dir.path().join("log"), options).unwrap());
    let settings = DedupSettings {
        index_dir: dir.path().join("dedup"),
        index: IndexOptions::new(10.0, Duration::from_secs(3600), 8 << 20).unwrap(),
        batch_size: 100,
        poll_interval: Duration::from_millis(1),
        stop: Default::default(),
    };
    let metrics = DedupMetrics::default();
    let labels = metrics.partition(0);
    let worker = DedupWorker::open(log.clone(), 0, settings.clone(), metrics.clone(), rt.handle(), &mut |_| {}).unwrap();
    let handle = rt.handle().clone();
    let thread = std::thread::spawn(move || worker.run(handle));
    let committed = || rt.block_on(log.committed(GROUP, INPUT_TOPIC, 0)).unwrap().unwrap_or(0);

    rt.block_on(log.append(INPUT_TOPIC, 0, (0..10).map(|i| rec(&format!("a{i}"))).collect())).unwrap();
    wait_until(Duration::from_secs(20), || committed() == 10, || format!("committed {}", committed()));

    // The disk "fills": every index write (and reopen) fails from now on.
    faults::fail_writes(&settings.index_dir, true);
    // New events, and repeats of acknowledged ones.
    let batch: Vec<Record> = (0..10).map(|i| rec(&format!("b{i}"))).chain((0..5).map(|i| rec(&format!("a{i}")))).collect();
    rt.block_on(log.append(INPUT_TOPIC, 0, batch)).unwrap();
    wait_until(
        Duration::from_secs(30),
        || metrics.errors.get_or_create(&labels).get() >= 3,
        || format!("errors {}", metrics.errors.get_or_create(&labels).get()),
    );
    assert_eq!(metrics.failing.get_or_create(&labels).get(), 1, "the partition says it is failing");
    assert_eq!(committed(), 10, "the input offset does not pass events that were not indexed");
    assert!(!thread.is_finished(), "the worker keeps retrying");

    // Space returns: the worker resumes by itself.
    faults::fail_writes(&settings.index_dir, false);
    wait_until(Duration::from_secs(30), || committed() == 25, || format!("committed {}", committed()));
    wait_until(Duration::from_secs(10), || metrics.failing.get_or_create(&labels).get() == 0, || "failing gauge still 1".into());
    // One more batch goes through the recovered index.
    rt.block_on(log.append(INPUT_TOPIC, 0, vec![rec("c0"), rec("b0")])).unwrap();
    wait_until(Duration::from_secs(20), || committed() == 27, || format!("committed {}", committed()));

    settings.stop.trigger();
    thread.join().unwrap();
    let out = rt.block_on(log.read(OUTPUT_TOPIC, 0, 0, 1000)).unwrap();
    let mut keys: Vec<String> = out.iter().map(|r| String::from_utf8_lossy(&r.key).into_owned()).collect();
    keys.sort();
    let mut want: Vec<String> =
        (0..10).map(|i| format!("web/a{i}")).chain((0..10).map(|i| format!("web/b{i}"))).chain(["web/c0".to_owned()]).collect();
    want.sort();
    assert_eq!(keys, want, "every new event published exactly once, no repeat published");
    assert!(metrics.errors.get_or_create(&labels).get() >= 3);
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop; `None`
/// (with the reason printed) when this process cannot mount (not root, no
/// mount command, a container without CAP_SYS_ADMIN).
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Tmpfs> {
        if unsafe_geteuid() != 0 {
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).ok()?;
        match Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&path).output() {
            Ok(o) if o.status.success() => Some(Tmpfs { path, _dir: dir }),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn unsafe_geteuid() -> u32 {
    // No libc dependency: the effective uid from /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)?.parse().ok()))
        .unwrap_or(u32::MAX)
}

fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    let _ = f.write_all(&[0u8; 512]);
}

/// The red-team's #3: RocksDB's info log write fails on the full disk and
/// the next line it logs (its error handler reporting the failure) aborted
/// the process (an assertion kept in Debian's librocksdb 7.8).
#[test]
fn on_a_real_full_disk_index_writes_fail_without_aborting_and_the_index_reopens_once_space_returns() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let path = fs.path.join("index");
    let opts = IndexOptions::new(10.0, Duration::from_secs(3600), 8 << 20).unwrap();
    let index = DedupIndex::open(&path, &opts).unwrap();
    let spare = fs.path.join("spare");
    std::fs::write(&spare, vec![0u8; 2 << 20]).unwrap();
    fill(&fs.path.join("filler"));
    let key = |i: u64, k: u64| format!("web/{i}-{k}-{}", "x".repeat(40)).into_bytes();
    let mut written = 0;
    let err = loop {
        let keys: Vec<Vec<u8>> = (0..100).map(|k| key(written, k)).collect();
        match index.record(keys.iter().map(|k| (&k[..], now_ms())), written + 1) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 1_000_000, "the disk never filled");
    };
    assert!(err.to_string().contains("No space left"), "{err}");
    // More writes, a read, a flush, close and reopen, all on the full disk.
    for _ in 0..3 {
        assert!(index.record([(&b"web/more"[..], now_ms())], written + 1).is_err());
        if written > 0 {
            assert_eq!(index.contains(&[&key(0, 0)], now_ms()).unwrap(), [true]);
        }
    }
    let _ = index.flush();
    drop(index);
    for _ in 0..3 {
        if let Ok(i) = DedupIndex::open(&path, &opts) {
            let _ = i.record([(&b"web/more"[..], now_ms())], written + 1);
        }
    }
    // Space returns.
    std::fs::remove_file(&spare).unwrap();
    let index = DedupIndex::open(&path, &opts).expect("the index opens once there is space");
    index.record([(&b"web/after"[..], now_ms())], written + 2).expect("writes succeed again");
    assert_eq!(index.contains(&[b"web/after"], now_ms()).unwrap(), [true]);
    if written > 0 {
        assert_eq!(index.contains(&[&key(0, 0)], now_ms()).unwrap(), [true], "ids written before the disk filled are kept");
    }
    assert_eq!(index.checkpoint().unwrap(), Some(written + 2));
}

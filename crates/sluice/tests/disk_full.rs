//! `sluice serve` with its dedup indexes and JobDBs on a disk that fills up
//! (a small tmpfs; the log stays on the test's disk, so what is tested is
//! dedup's RocksDB and the JobDB writes): the process lives (red-team #3:
//! RocksDB aborted it), the log is not flooded (#4: ~11,000 ERROR lines a
//! second from the JobDB retry loop), and once space is freed every
//! acknowledged event is delivered without a restart.
//!
//! Needs root (to mount the tmpfs); skipped with a message otherwise.

mod util;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_deliver::sink::Behaviour;
use util::*;

struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)?.parse::<u32>().ok()));
        if uid != Some(0) {
            return Err("mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("cannot mount a tmpfs: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs { path: at.to_owned() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Write zeros to `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create filler");
    let block = vec![0u8; 256 << 10];
    while f.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

fn error_lines(server: &Server) -> usize {
    server.json_log().iter().filter(|v| v["level"] == "ERROR").count()
}

fn metric(sink: &TestSink, server: &Server, name: &str) -> f64 {
    let url = format!("http://{}/metrics", server.admin);
    let text = sink.block_on(async { sink.http.get(&url).send().await?.text().await }).unwrap_or_default();
    text.lines().filter(|l| l.starts_with(name) && !l.starts_with('#')).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[test]
fn a_full_disk_under_dedup_and_the_jobdbs_neither_kills_nor_floods_and_everything_acknowledged_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let fs = match Tmpfs::mount(&dir.path().join("small"), "48m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED a_full_disk_under_dedup_and_the_jobdbs_...: {why}");
            return;
        }
    };
    let sink = TestSink::start();
    // Failing at first, so the director keeps writing retry transitions.
    sink.sink.set("/hook", Behaviour::status(503));
    let extra =
        hook_toml(&sink.sink.url("/hook"), "initial_backoff = \"100ms\"\nmax_backoff = \"300ms\"") + "\n[deliver]\ncircuit_failures = 1000000\n";
    let config = write_config(dir.path(), &extra);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for sub in ["dedup", "jobs"] {
        std::fs::create_dir_all(fs.path.join(sub)).unwrap();
        std::os::unix::fs::symlink(fs.path.join(sub), data.join(sub)).unwrap();
    }
    let mut server = Server::start(&config);

    let mut acked: Vec<String> = Vec::new();
    let post = |acked: &mut Vec<String>, prefix: &str, n: usize| {
        for b in 0..n / 10 {
            let events: Vec<_> = (0..10).map(|i| track_event(&format!("{prefix}-{b}-{i}"), i)).collect();
            if sink.post_batch(&server.addr, &events).is_ok() {
                acked.extend(events.iter().map(|e| e["messageId"].as_str().unwrap().to_owned()));
            }
        }
    };
    post(&mut acked, "before", 40);
    assert_eq!(acked.len(), 40, "the disk is not full yet");
    // Wait until the director is retrying them (jobs in the JobDB, 503s).
    wait_for(
        Duration::from_secs(60),
        || {
            (sink.sink.received_on("/hook").iter().map(|r| r.header("idempotency-key").unwrap_or("").to_owned()).collect::<HashSet<_>>().len() >= 40)
                .then_some(())
        },
        || format!("jobs not attempted yet; stderr:\n{}", server.stderr_tail(30)),
    );

    fill(&fs.path.join("filler"));
    let errors_before = error_lines(&server);
    let started = Instant::now();
    // Events arriving while the disk is full: acknowledged into the log (not on the tmpfs).
    post(&mut acked, "during", 100);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(started.elapsed()));
    assert!(server.wait_exit(Duration::ZERO).is_none(), "sluice died on the full disk; stderr:\n{}", server.stderr_tail(40));
    let flood = error_lines(&server) - errors_before;
    eprintln!("ERROR lines in ~10 s of full disk: {flood}");
    assert!(flood < 200, "{flood} ERROR lines in ~10 s of full disk; last lines:\n{}", server.stderr_tail(20));
    let dedup_errors = metric(&sink, &server, "sluice_dedup_errors_total");
    let jobdb_failures = metric(&sink, &server, "sluice_deliver_jobdb_write_failures_total");
    eprintln!("acknowledged: {}, sluice_dedup_errors_total {dedup_errors}, sluice_deliver_jobdb_write_failures_total {jobdb_failures}", acked.len());
    assert!(acked.len() > 40, "events were acknowledged while the disk was full");
    assert!(dedup_errors + jobdb_failures > 0.0, "the failures are counted");

    // Space returns, the destination recovers: no restart.
    std::fs::remove_file(fs.path.join("filler")).unwrap();
    sink.sink.set("/hook", Behaviour::default());
    let want: HashSet<String> = acked.iter().cloned().collect();
    let delivered = || -> HashSet<String> {
        sink.by_message_id("/hook").into_iter().filter(|(_, rs)| rs.iter().any(|r| r.answered == Some(200))).map(|(id, _)| id).collect()
    };
    wait_for(
        Duration::from_secs(120),
        || want.is_subset(&delivered()).then_some(()),
        || {
            let missing: Vec<_> = want.difference(&delivered()).take(5).cloned().collect();
            format!(
                "{} acknowledged events not delivered (e.g. {missing:?}); stderr:\n{}",
                want.difference(&delivered()).count(),
                server.stderr_tail(30)
            )
        },
    );
    let log = server.stderr_text();
    assert!(!log.contains("panicked"), "a panic was logged");
    assert_eq!(metric(&sink, &server, "sluice_dedup_failing"), 0.0, "no dedup partition left failing");
    server.stop();
}

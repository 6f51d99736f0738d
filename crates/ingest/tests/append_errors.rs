//! A log that fails every append (a full disk, a lost broker) must not
//! flood ingest's own log: every request is answered 503, but the failure
//! is logged once, then summarized every 10 s, and its end is logged.
//! (Its own test binary: the run of failures is process-wide.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::http::StatusCode;
use sluice_ingest::{router, Ingest};
use sluice_log::{Checkpoint, Log, LogError, OffsetRange, Record, StoredRecord};

use common::*;

/// A log whose appends fail while `failing` is set.
struct SwitchedLog {
    failing: AtomicBool,
}

#[async_trait]
impl Log for SwitchedLog {
    fn partitions(&self, _topic: &str) -> Result<u32, LogError> {
        Ok(4)
    }
    async fn append(&self, _topic: &str, _partition: u32, _records: Vec<Record>) -> Result<u64, LogError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(LogError::Io { path: "/dev/full".into(), source: std::io::Error::other("no space left on device") });
        }
        Ok(0)
    }
    async fn read(&self, _: &str, _: u32, _: u64, _: usize) -> Result<Vec<StoredRecord>, LogError> {
        Ok(Vec::new())
    }
    async fn offsets(&self, _: &str, _: u32) -> Result<OffsetRange, LogError> {
        Ok(OffsetRange { start: 0, end: 0 })
    }
    async fn commit(&self, _: Checkpoint<'_>) -> Result<(), LogError> {
        Ok(())
    }
    async fn committed(&self, _: &str, _: &str, _: u32) -> Result<Option<u64>, LogError> {
        Ok(None)
    }
}

/// Log lines written by the subscriber, shared with the test.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_log_is_logged_once_per_run_not_once_per_request() {
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let log = Arc::new(SwitchedLog { failing: AtomicBool::new(true) });
            let dyn_log: Arc<dyn Log> = log.clone();
            let app = router(Arc::new(Ingest::new(dyn_log, settings(), &sources(), 0).unwrap()));
            for i in 0..500 {
                let resp = send(&app, post_json("/v1/track", Some(WEB_KEY), &event("track", &format!("m{i}")))).await;
                assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
            }
            // The log works again: requests succeed, and the end of the run is logged once.
            log.failing.store(false, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
            for i in 0..5 {
                send(&app, post_json("/v1/track", Some(WEB_KEY), &event("track", &format!("ok{i}")))).await.assert_success();
            }
        });
    });
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count("log append failed; answering 503"), 1, "{text}");
    assert_eq!(count("log appends still failing"), 0, "no summary within 10 s: {text}");
    assert_eq!(count("log appends work again"), 1, "{text}");
    assert!(text.contains("no space left on device"), "the first failure carries its cause: {text}");
}

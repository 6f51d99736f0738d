//! Destination functions at delivery time (docs/FUNCTIONS.md).
//!
//! A job keeps the payload the route made; a destination with a function
//! runs it on every attempt, just before the request, and what it returns
//! is the body sent. Invariants:
//! - The function's outcome decides the attempt as a response would:
//!   `RetryError` or a timeout is a retry (backoff, the retry window, the
//!   circuit); `DropEvent` or `null` ends the job `discarded` with the
//!   reason (nothing is sent); `ValidationError`, any other error, running
//!   out of memory or code that does not load end it `discarded` with the
//!   error. Each is visible in the job's history (`sluice inspect`).
//! - A destination naming a function that is not deployed holds its jobs
//!   (retried with backoff, "not deployed"), it never sends them
//!   untransformed.
//! - After a crash a job may run again, and so may its function: at least
//!   once, as the request itself. What the function returned is not
//!   stored; the next attempt runs the live version.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;
use sluice_core::config::FunctionRef;
use sluice_transform::fetch::{FetchFailure, FetchRequest, FetchResponse};
use sluice_transform::function::FunctionOutcome;
use sluice_transform::pool::{FunctionCode, FunctionPool, Stage};

use crate::control::LiveFunction;
use crate::executor::{Attempt, Executor, Verdict};

/// A destination's function as its jobs run it.
#[derive(Debug, Clone)]
pub struct Attached {
    pub id: String,
    /// The live version's code; `None`: not deployed.
    pub code: Option<FunctionCode>,
    pub settings: Arc<Value>,
}

impl Attached {
    pub fn new(r: &FunctionRef, live: &HashMap<String, LiveFunction>) -> Attached {
        Attached {
            id: r.id.clone(),
            code: live.get(&r.id).map(|l| FunctionCode { id: r.id.clone(), version: l.version, code: l.code.clone() }),
            settings: Arc::new(Value::Object(r.settings.clone())),
        }
    }

    /// The body to send for `payload`, or the attempt's end without a request.
    pub async fn apply(&self, payload: Bytes) -> Result<Bytes, Attempt> {
        let started = Instant::now();
        let end = |verdict, error: String| Attempt { verdict, status: None, error: Some(error), retry_after: None, elapsed: started.elapsed() };
        let Some(code) = &self.code else {
            return Err(end(Verdict::Retry, format!("function {:?} is not deployed: the job waits for it", self.id)));
        };
        let event: Value = match serde_json::from_slice(&payload) {
            Ok(v) => v,
            Err(e) => return Err(end(Verdict::Discard, format!("function {:?}: the job's payload is not JSON: {e}", self.id))),
        };
        let pool = FunctionPool::global();
        let outcome = pool.call(Stage::Destination, code, vec![event], self.settings.clone()).await.pop();
        let name = format!("function {:?} version {}", self.id, code.version);
        match outcome {
            Some(FunctionOutcome::Event(v)) => Ok(Bytes::from(serde_json::to_vec(&v).expect("JSON serializes"))),
            Some(FunctionOutcome::Drop { reason }) => Err(end(Verdict::Discard, format!("dropped by {name}: {reason}"))),
            Some(FunctionOutcome::Error { class, message }) => {
                let verdict = if class.retried() { Verdict::Retry } else { Verdict::Discard };
                Err(end(verdict, format!("{name}: {}: {message}", class.as_str())))
            }
            None => Err(end(Verdict::Retry, format!("{name}: no answer from the function threads"))),
        }
    }
}

/// The pipeline's `fetch` for functions: the delivery executor's clients
/// (the SSRF guard, no redirects, no proxy), allowing private networks only
/// where `[deliver] allow_private_network` does for every destination.
pub struct GuardedFetch {
    executor: Executor,
    runtime: tokio::runtime::Handle,
    allow_private_network: bool,
}

impl GuardedFetch {
    /// Call from inside the runtime whose I/O the requests use.
    pub fn new(allow_private_network: bool, connect_timeout: std::time::Duration) -> Result<Arc<GuardedFetch>, reqwest::Error> {
        Ok(Arc::new(GuardedFetch { executor: Executor::new(connect_timeout)?, runtime: tokio::runtime::Handle::current(), allow_private_network }))
    }
}

impl sluice_transform::fetch::Fetch for GuardedFetch {
    fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, FetchFailure> {
        // A function thread is not a runtime thread: it may wait here.
        self.runtime.block_on(self.executor.fetch(request, self.allow_private_network))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_transform::function::{ErrorClass, Limits};

    const CODE: &str = r#"
async function onTrack(e) {
  const r = await fetch(e.properties.url, {method: "POST", body: "hello"});
  if (!r.ok) throw new RetryError("upstream answered " + r.status);
  e.properties.status = r.status;
  return e;
}"#;

    async fn run(pool: &FunctionPool, url: String) -> FunctionOutcome {
        let code = FunctionCode { id: "f".into(), version: 1, code: CODE.into() };
        let event = json!({"type": "track", "messageId": "m", "properties": {"url": url}});
        pool.call(Stage::Test, &code, vec![event], Arc::new(json!({}))).await.pop().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_goes_through_the_ssrf_guard_to_a_real_endpoint() {
        let sink = crate::sink::Sink::start().await.unwrap();
        let limits = Limits::default();
        // Private networks allowed (as `[deliver] allow_private_network`): the request is made.
        let open = FunctionPool::start(1, limits, Some(GuardedFetch::new(true, std::time::Duration::from_secs(2)).unwrap()));
        let out = run(&open, sink.url("/enrich")).await;
        assert!(matches!(&out, FunctionOutcome::Event(e) if e["properties"]["status"] == 200), "{out:?}");
        let got = sink.received_on("/enrich");
        assert_eq!((got.len(), &got[0].body[..]), (1, &b"hello"[..]));
        let out = run(&open, sink.url("/busy?status=503")).await;
        assert!(matches!(&out, FunctionOutcome::Error { class: ErrorClass::Retry, message } if message.contains("503")), "{out:?}");
        // The default: the guard refuses loopback, whatever the function asks; nothing reaches the sink.
        let guarded = FunctionPool::start(1, limits, Some(GuardedFetch::new(false, std::time::Duration::from_secs(2)).unwrap()));
        for url in [sink.url("/private"), "file:///etc/passwd".into(), "http://169.254.169.254/latest/meta-data".into()] {
            let out = run(&guarded, url.clone()).await;
            assert!(matches!(&out, FunctionOutcome::Error { class: ErrorClass::Failed, .. }), "{url}: {out:?}");
        }
        assert!(sink.received_on("/private").is_empty());
        // Headers the client sets are refused, not sent.
        let host = FunctionCode {
            id: "h".into(),
            version: 1,
            code: "async function onTrack(e) { await fetch(e.properties.url, {headers: {Host: 'other'}}); return e; }".into(),
        };
        let event = json!({"type": "track", "properties": {"url": sink.url("/host")}});
        let out = open.call(Stage::Test, &host, vec![event], Arc::new(json!({}))).await.pop().unwrap();
        assert!(matches!(&out, FunctionOutcome::Error { class: ErrorClass::Failed, message } if message.contains("\"host\"")), "{out:?}");
        assert!(sink.received_on("/host").is_empty());
    }
}

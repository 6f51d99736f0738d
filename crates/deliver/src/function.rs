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
use sluice_transform::function::FunctionOutcome;
use sluice_transform::pool::{FunctionCode, FunctionPool, Stage};

use crate::control::LiveFunction;
use crate::executor::{Attempt, Verdict};

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

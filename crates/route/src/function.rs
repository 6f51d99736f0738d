//! Source functions in the route (docs/FUNCTIONS.md): a source's function
//! runs on each of its events before the tracking plan and the routing,
//! and routing sees what it returned.
//!
//! Invariants:
//! - A batch's events of one source go to the function threads in one
//!   request; the route never runs JavaScript on its own thread.
//! - `RetryError` and timeouts are tried again in place, twice (after
//!   100 ms, then 1 s); what still fails, and every `ValidationError`,
//!   other error, out-of-memory or a function not deployed, becomes a dead
//!   letter of the batch (committed before its offset, replayable once the
//!   function is fixed: the replay runs the function again). A drop
//!   (`null`, `DropEvent`) makes no job and is counted
//!   (`sluice_function_calls_total{outcome="dropped"}`).
//! - Crash row: as the plan's. A batch replayed after a crash runs its
//!   functions again; its jobs are unique per (messageId, destination,
//!   generation) whatever the function returned, so no event becomes two
//!   deliveries. A function that is not deterministic may make the replayed
//!   batch's jobs differ from the first pass's in payload, never in number
//!   per destination.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use sluice_transform::function::FunctionOutcome;
use sluice_transform::pool::{FunctionCode, FunctionPool, Stage};

use crate::{Planner, RouteDecision};

/// Waits before the in-place retries of a `RetryError` or a timeout.
const RETRY_WAITS: [Duration; 2] = [Duration::from_millis(100), Duration::from_secs(1)];

/// What the source function made of one event.
enum Step {
    /// No function, or a value that is not JSON (the planner says why).
    Unchanged,
    Changed(Bytes),
    Dropped,
    Failed(String),
}

impl Planner {
    /// Plan records (`(key, value)`) as [`Planner::plan`] does, each after
    /// its source's function. An `Err` is a dead letter's reason.
    pub async fn plan_batch(&self, records: &[(&[u8], &Bytes)], generation: i64, only: Option<&str>) -> Vec<Result<RouteDecision, String>> {
        let steps = self.run_source_functions(records).await;
        records
            .iter()
            .zip(steps)
            .map(|((key, value), step)| match step {
                Step::Unchanged => self.plan(key, value, generation, only),
                Step::Changed(v) => self.plan(key, &v, generation, only),
                Step::Dropped => Ok(RouteDecision { dropped_by_function: true, ..RouteDecision::default() }),
                Step::Failed(reason) => Err(reason),
            })
            .collect()
    }

    async fn run_source_functions(&self, records: &[(&[u8], &Bytes)]) -> Vec<Step> {
        let mut steps: Vec<Step> = records.iter().map(|_| Step::Unchanged).collect();
        let snap = self.catalog().snapshot();
        let attached: HashMap<&str, _> = snap.sources.iter().filter_map(|(s, _)| s.function.as_ref().map(|f| (s.id.as_str(), f))).collect();
        if attached.is_empty() {
            return steps;
        }
        // Per source: the indexes of its events, and the events.
        let mut groups: HashMap<&str, (Vec<usize>, Vec<Value>, Vec<&Bytes>)> = HashMap::new();
        for (i, (key, value)) in records.iter().enumerate() {
            let Some(source) = std::str::from_utf8(key).ok().and_then(|k| k.split_once('/')).map(|(s, _)| s) else { continue };
            let Some(f) = attached.get(source) else { continue };
            let Ok(event) = serde_json::from_slice::<Value>(value) else { continue };
            if snap.functions.contains_key(&f.id) {
                let g = groups.entry(source).or_default();
                g.0.push(i);
                g.1.push(event);
                g.2.push(value);
            } else {
                steps[i] = Step::Failed(format!("source function {:?} is not deployed (deploy it, then replay this dead letter)", f.id));
            }
        }
        let pool = FunctionPool::global();
        for (source, (indexes, events, raw)) in groups {
            let f = attached[source];
            let live = &snap.functions[&f.id];
            let code = FunctionCode { id: f.id.clone(), version: live.version, code: live.code.clone() };
            let settings = Arc::new(Value::Object(f.settings.clone()));
            let outcomes = call_with_retries(&pool, &code, events, &raw, settings).await;
            let name = format!("source function {:?} version {}", f.id, live.version);
            for (i, outcome) in indexes.into_iter().zip(outcomes) {
                steps[i] = match outcome {
                    FunctionOutcome::Event(v) => Step::Changed(Bytes::from(serde_json::to_vec(&v).expect("JSON serializes"))),
                    FunctionOutcome::Drop { .. } => Step::Dropped,
                    FunctionOutcome::Error { class, message } => Step::Failed(format!("{name}: {}: {message}", class.as_str())),
                };
            }
        }
        steps
    }
}

/// Call `code` on `events` (parsed from `raw`); the events that ended in a
/// retried class are tried again (parsed again) after each of [`RETRY_WAITS`].
async fn call_with_retries(
    pool: &FunctionPool,
    code: &FunctionCode,
    events: Vec<Value>,
    raw: &[&Bytes],
    settings: Arc<Value>,
) -> Vec<FunctionOutcome> {
    let mut outcomes = pool.call(Stage::Source, code, events, settings.clone()).await;
    for wait in RETRY_WAITS {
        let again: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, FunctionOutcome::Error { class, .. } if class.retried()))
            .map(|(i, _)| i)
            .collect();
        if again.is_empty() {
            break;
        }
        tokio::time::sleep(wait).await;
        let events = again.iter().map(|&i| serde_json::from_slice(raw[i]).expect("parsed before")).collect();
        let retried = pool.call(Stage::Source, code, events, settings.clone()).await;
        for (i, o) in again.into_iter().zip(retried) {
            outcomes[i] = o;
        }
    }
    outcomes
}

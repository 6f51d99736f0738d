//! Source functions in the route (docs/FUNCTIONS.md): a source's function
//! runs on each of its events before the tracking plan and the routing,
//! and routing sees what it returned.
//!
//! Invariants:
//! - A batch's events of one source go to the function threads in one
//!   request; the route never runs JavaScript on its own thread.
//! - `RetryError` is tried again in place, twice (after 100 ms, then
//!   1 s), unless the call was slow; what still fails, timeouts, and every
//!   `ValidationError`,
//!   other error, out-of-memory or a function not deployed, becomes a dead
//!   letter of the batch (committed before its offset, replayable once the
//!   function is fixed: the replay runs the function again). A drop
//!   (`null`, `DropEvent`) makes no job and is counted
//!   (`sluice_function_calls_total{outcome="dropped"}`).
//! - A slow function parks its source's events instead of holding the
//!   route: a request at least [`SLOW`] long with events ending `Timeout`
//!   or `RetryError` (a `fetch` upstream that did not answer in time), or
//!   taking [`SLOW_PER_EVENT`] or more per event, opens the function's
//!   circuit, and so does a request the route stopped waiting for after
//!   [`ROUTE_WAIT`] (its events are parked); while open,
//!   the route calls it no more and makes its events dead letters whose
//!   reason starts [`PARKED`] (so other sources' events in the same
//!   partitions wait for nothing). Parked letters are replayed by
//!   `dead_letter::sweep_parked` (their jobs are those routing would have
//!   made: generation 0, the same idempotency keys): once the circuit's wait is over, the first replay is
//!   the probe (the route never probes); an answer in time closes the
//!   circuit and the rest follow. Nothing is parked when the dead-letter
//!   store is half full: the route then waits for the function as before,
//!   so a slow function cannot fill the store and stop every source.
//! - Crash row: as the plan's. A batch replayed after a crash runs its
//!   functions again; its jobs are unique per (messageId, destination,
//!   generation) whatever the function returned, so no event becomes two
//!   deliveries. A function that is not deterministic may make the replayed
//!   batch's jobs differ from the first pass's in payload, never in number
//!   per destination.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use sluice_transform::function::{ErrorClass, FunctionOutcome};
use sluice_transform::pool::{FunctionCode, FunctionPool, Stage};

use crate::{Planner, RouteDecision};

/// Waits before the in-place retries of a `RetryError`.
const RETRY_WAITS: [Duration; 2] = [Duration::from_millis(100), Duration::from_secs(1)];

/// A request at least this long, with events ending `Timeout` or `RetryError`, is slow.
pub const SLOW: Duration = Duration::from_secs(1);
/// The longest a route batch waits for a source function's request when
/// it may park: past it, the function is slow and its events are parked.
pub const ROUTE_WAIT: Duration = Duration::from_secs(2);
/// A request at least [`SLOW`] long whose events took this long each on
/// average is slow even when every event was answered (a `fetch` that
/// takes most of a second holds the route as surely as one that times out).
const SLOW_PER_EVENT: Duration = Duration::from_millis(20);
/// The reason of a parked event's dead letter starts with this.
pub const PARKED: &str = "parked: ";
/// The first wait of an opened circuit before a probe; doubled on each
/// failed probe up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(10);
const MAX_WAIT: Duration = Duration::from_secs(300);

/// Who asks for a function call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A route batch (or a log replay): never waits on an open circuit.
    Route,
    /// A dead letter's replay: may be the probe of an open circuit.
    Replay,
}

/// A slow function's circuit: open until `until`, then one probe.
#[derive(Debug, Clone)]
struct Circuit {
    until: Instant,
    wait: Duration,
    probing: bool,
}

/// Open circuits by function id (closed ones are not kept).
fn circuits() -> &'static Mutex<HashMap<String, Circuit>> {
    static CIRCUITS: OnceLock<Mutex<HashMap<String, Circuit>>> = OnceLock::new();
    CIRCUITS.get_or_init(Mutex::default)
}

/// Whether `lane` may call function `id` now; `false`: park its events.
fn admit(id: &str, lane: Lane) -> bool {
    let mut open = circuits().lock().expect("circuits lock");
    let Some(c) = open.get_mut(id) else { return true };
    if lane == Lane::Replay && c.probe_due() {
        c.probing = true;
        c.until = Instant::now();
        return true;
    }
    false
}

impl Circuit {
    /// Its wait is over and no probe is under way (a probe that never
    /// reported, e.g. its letter no longer reaches the function, is
    /// forgotten after [`PROBE_LIMIT`]).
    fn probe_due(&self) -> bool {
        let now = Instant::now();
        now >= self.until && (!self.probing || now >= self.until + PROBE_LIMIT)
    }
}

/// How long a probe may go without reporting before another is allowed.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

/// Forget function `id`'s circuit (no source runs it any more).
pub fn close(id: &str) {
    circuits().lock().expect("circuits lock").remove(id);
}

/// Record how a call of function `id` went.
fn record(id: &str, slow: bool) {
    let mut open = circuits().lock().expect("circuits lock");
    match (slow, open.get_mut(id)) {
        (false, Some(_)) => {
            open.remove(id);
            tracing::info!(function = %id, "a source function answers in time again: its parked events are replayed");
        }
        (false, None) => {}
        (true, Some(c)) => {
            // A failed probe, or a call that was already under way when the circuit opened.
            if c.probing {
                c.wait = (c.wait * 2).min(MAX_WAIT);
                c.probing = false;
            }
            c.until = Instant::now() + c.wait;
        }
        (true, None) => {
            tracing::warn!(function = %id, "a source function is slow (a request ran past its time): its events are parked as dead letters and replayed when it answers in time");
            open.insert(id.to_owned(), Circuit { until: Instant::now() + FIRST_WAIT, wait: FIRST_WAIT, probing: false });
        }
    }
}

/// Whether function `id`'s circuit is open.
pub fn is_open(id: &str) -> bool {
    circuits().lock().expect("circuits lock").contains_key(id)
}

/// Whether function `id`'s parked letters may be replayed now: its circuit
/// is closed, or open with its wait over and no probe under way.
pub fn replay_due(id: &str) -> bool {
    circuits().lock().expect("circuits lock").get(id).is_none_or(Circuit::probe_due)
}

/// The reason of an event of function `id` parked by an open circuit.
fn parked_reason(id: &str) -> String {
    format!("{PARKED}source function {id:?} is slow (a request ran past its time); replayed automatically once it answers in time")
}

/// The function id in a [`parked_reason`]; `None` for other reasons.
pub fn parked_function(reason: &str) -> Option<String> {
    let rest = reason.strip_prefix(PARKED)?.strip_prefix("source function ")?;
    let mut de = serde_json::Deserializer::from_str(rest).into_iter::<String>();
    de.next()?.ok()
}

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
        self.plan_batch_in(Lane::Route, records, generation, only).await
    }

    /// [`Planner::plan_batch`] for `lane`.
    pub async fn plan_batch_in(
        &self,
        lane: Lane,
        records: &[(&[u8], &Bytes)],
        generation: i64,
        only: Option<&str>,
    ) -> Vec<Result<RouteDecision, String>> {
        let steps = self.run_source_functions(lane, records).await;
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

    async fn run_source_functions(&self, lane: Lane, records: &[(&[u8], &Bytes)]) -> Vec<Step> {
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
        // Parking needs room in the dead-letter store.
        let room = lane == Lane::Route && !groups.is_empty() && self.dead_letter_room().await;
        let mut calls = Vec::new();
        for (source, (indexes, events, raw)) in groups {
            let f = attached[source];
            let parks = match lane {
                // Without room the route waits, as it would without circuits.
                Lane::Route => room && !admit(&f.id, lane),
                Lane::Replay => !admit(&f.id, lane),
            };
            if parks {
                crate::dead_letter::parked_some();
                for i in indexes {
                    steps[i] = Step::Failed(parked_reason(&f.id));
                }
                continue;
            }
            let live = &snap.functions[&f.id];
            let code = FunctionCode { id: f.id.clone(), version: live.version, code: live.code.clone() };
            let settings = Arc::new(Value::Object(f.settings.clone()));
            let pool = pool.clone();
            // The route waits at most `ROUTE_WAIT` when it may park: a function that takes longer
            // is slow for every source on these partitions. Its request runs on; its answers are
            // not used (the parked events run through the function again when replayed).
            let wait = (lane == Lane::Route && room).then_some(ROUTE_WAIT);
            // The sources' requests go together: a batch waits for the slowest, not the sum.
            calls.push(async move {
                let n = events.len();
                // A task of its own: when the route stops waiting, the request still ends in the
                // pool (which then knows the function is slow), its answers unused.
                let raw: Vec<Bytes> = raw.into_iter().cloned().collect();
                let task_code = code.clone();
                let called = tokio::spawn(async move { call_with_retries(&pool, &task_code, events, &raw, settings).await });
                let unanswered = |why: &str| {
                    let outcomes = (0..n).map(|_| FunctionOutcome::Error { class: ErrorClass::Timeout, message: why.to_owned() }).collect();
                    (outcomes, true)
                };
                let (outcomes, slow) = match wait {
                    None => called.await.unwrap_or_else(|e| unanswered(&format!("the call failed: {e}"))),
                    Some(wait) => match tokio::time::timeout(wait, called).await {
                        Ok(answered) => answered.unwrap_or_else(|e| unanswered(&format!("the call failed: {e}"))),
                        Err(_) => unanswered("the route stopped waiting"),
                    },
                };
                record(&code.id, slow);
                (indexes, outcomes, slow, code)
            });
        }
        for (indexes, outcomes, slow, code) in futures_util::future::join_all(calls).await {
            let name = format!("source function {:?} version {}", code.id, code.version);
            for (i, outcome) in indexes.into_iter().zip(outcomes) {
                steps[i] = match outcome {
                    FunctionOutcome::Event(v) => Step::Changed(Bytes::from(serde_json::to_vec(&v).expect("JSON serializes"))),
                    FunctionOutcome::Drop { .. } => Step::Dropped,
                    // The slow call's own unanswered events are parked too (replayed with the rest).
                    FunctionOutcome::Error { class: ErrorClass::Timeout | ErrorClass::Retry, .. } if slow => {
                        crate::dead_letter::parked_some();
                        Step::Failed(parked_reason(&code.id))
                    }
                    FunctionOutcome::Error { class, message } => Step::Failed(format!("{name}: {}: {message}", class.as_str())),
                };
            }
        }
        steps
    }

    /// Whether the dead-letter store is under half its rows (parking may
    /// add to it); asked of the store at most once a second.
    async fn dead_letter_room(&self) -> bool {
        static KNOWN: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
        if let Some((at, room)) = *KNOWN.lock().expect("room lock") {
            if at.elapsed() < Duration::from_secs(1) {
                return room;
            }
        }
        let catalog = self.catalog().clone();
        let counts = tokio::task::spawn_blocking(move || catalog.with_control(|db| Ok((db.dead_letter_counts()?, db.dead_letter_limits())))).await;
        let room = match counts {
            Ok(Ok((counts, limits))) => (counts.open.max(0) as u64) < limits.max_rows / 2,
            _ => false,
        };
        *KNOWN.lock().expect("room lock") = Some((Instant::now(), room));
        room
    }
}

/// Call `code` on `events` (parsed from `raw`); the events that ended
/// `RetryError` are tried again (parsed again) after each of
/// [`RETRY_WAITS`], unless a call was slow. Also whether it was: a call
/// at least [`SLOW`] long with events ending `Timeout` or `RetryError`
/// (a `fetch` upstream that did not answer in time).
async fn call_with_retries(
    pool: &Arc<FunctionPool>,
    code: &FunctionCode,
    events: Vec<Value>,
    raw: &[Bytes],
    settings: Arc<Value>,
) -> (Vec<FunctionOutcome>, bool) {
    let timed = |started: Instant, outcomes: &[FunctionOutcome]| {
        let took = started.elapsed();
        took >= SLOW
            && (took / outcomes.len().max(1) as u32 >= SLOW_PER_EVENT
                || outcomes.iter().any(|o| matches!(o, FunctionOutcome::Error { class: ErrorClass::Timeout | ErrorClass::Retry, .. })))
    };
    let started = Instant::now();
    let mut outcomes = pool.call(Stage::Source, code, events, settings.clone()).await;
    if timed(started, &outcomes) {
        return (outcomes, true);
    }
    for wait in RETRY_WAITS {
        let again: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, FunctionOutcome::Error { class: ErrorClass::Retry, .. }))
            .map(|(i, _)| i)
            .collect();
        if again.is_empty() {
            break;
        }
        tokio::time::sleep(wait).await;
        let events = again.iter().map(|&i| serde_json::from_slice(&raw[i]).expect("parsed before")).collect();
        let started = Instant::now();
        let retried = pool.call(Stage::Source, code, events, settings.clone()).await;
        let slow = timed(started, &retried);
        for (i, o) in again.into_iter().zip(retried) {
            outcomes[i] = o;
        }
        if slow {
            return (outcomes, true);
        }
    }
    (outcomes, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// End `id`'s circuit wait now.
    fn wait_over(id: &str) {
        circuits().lock().unwrap().get_mut(id).unwrap().until = Instant::now();
    }

    #[test]
    fn a_slow_function_opens_its_circuit_and_only_a_replay_probes_it() {
        let id = "circuit-test";
        assert!(admit(id, Lane::Route) && replay_due(id), "closed");
        record(id, false);
        assert!(!is_open(id), "an answer in time opens nothing");
        record(id, true);
        assert!(!admit(id, Lane::Route) && !admit(id, Lane::Replay) && !replay_due(id), "open: nothing calls it during the wait");
        wait_over(id);
        assert!(replay_due(id) && !admit(id, Lane::Route), "the route never probes");
        assert!(admit(id, Lane::Replay), "a replay probes");
        assert!(!admit(id, Lane::Replay) && !replay_due(id), "one probe at a time");
        record(id, true);
        assert_eq!(circuits().lock().unwrap()[id].wait, FIRST_WAIT * 2, "a failed probe doubles the wait");
        assert!(!replay_due(id));
        wait_over(id);
        assert!(admit(id, Lane::Replay));
        record(id, false);
        assert!(!is_open(id) && admit(id, Lane::Route), "an answer in time closes it");
        // A probe that never reports is forgotten after a while.
        record(id, true);
        wait_over(id);
        assert!(admit(id, Lane::Replay));
        circuits().lock().unwrap().get_mut(id).unwrap().until = Instant::now() - PROBE_LIMIT;
        assert!(replay_due(id) && admit(id, Lane::Replay));
        close(id);
        assert!(!is_open(id));
    }

    #[test]
    fn a_parked_reason_names_its_function() {
        assert_eq!(parked_function(&parked_reason("enrich \"v2\"")).as_deref(), Some("enrich \"v2\""));
        assert_eq!(parked_function("source function \"x\" version 1: Timeout: no answer"), None);
        assert_eq!(parked_function("parked: something else"), None);
    }
}

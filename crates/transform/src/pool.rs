//! The function threads: where functions run in a process (route and
//! directors call them through [`FunctionPool::call`]).
//!
//! Invariants:
//! - No function runs on an async runtime's thread: QuickJS engines are not
//!   `Send`, and a call may take its whole time budget. Each pool thread
//!   owns its engines, keyed by function id and holding one version; a
//!   request names the version it wants and carries its code, so a deploy
//!   or a restore takes effect on the next call without any cache to clear.
//! - Requests queue in bounded channels (a full queue makes the caller
//!   wait: back-pressure, not memory growth).
//! - A function that cannot load (its code changed under a smaller memory
//!   limit, say) answers every event with class `Error`; a function that
//!   throws, loops or runs out of memory affects only the events of that
//!   call ([`JsFunction`] rebuilds its engine after a stopped call).
//! - Calls are counted per function, stage and outcome
//!   (`sluice_function_calls_total`); function ids are chosen by operators
//!   (the admin API), never by clients, so the labels stay bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::fetch::Fetch;
use crate::function::{ErrorClass, FunctionOutcome, JsFunction, Limits};

/// Requests waiting per thread before callers wait.
const QUEUE: usize = 256;
/// Engines one thread keeps (one per function id); past it, all are dropped and rebuilt on use.
const MAX_ENGINES: usize = 512;

/// Which function, which version, with what code.
#[derive(Debug, Clone)]
pub struct FunctionCode {
    pub id: String,
    pub version: i64,
    pub code: Arc<str>,
}

/// Where a function runs, for its metrics.
#[derive(Debug, Clone, Copy)]
pub enum Stage {
    Source,
    Destination,
    Test,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Source => "source",
            Stage::Destination => "destination",
            Stage::Test => "test",
        }
    }
}

struct Request {
    function: FunctionCode,
    events: Vec<Value>,
    settings: Arc<Value>,
    reply: oneshot::Sender<Vec<FunctionOutcome>>,
}

/// The function threads of this process.
pub struct FunctionPool {
    queues: Vec<mpsc::Sender<Request>>,
    next: AtomicUsize,
    limits: Limits,
    calls: Family<Vec<(&'static str, String)>, Counter>,
    seconds: Family<Vec<(&'static str, &'static str)>, Histogram>,
}

static GLOBAL: OnceLock<Arc<FunctionPool>> = OnceLock::new();

impl FunctionPool {
    /// Start `threads` function threads with `limits` for every call, and
    /// `fetch` defined over `fetcher` (when given).
    pub fn start(threads: usize, limits: Limits, fetcher: Option<Arc<dyn Fetch>>) -> Arc<FunctionPool> {
        let mut queues = Vec::new();
        for i in 0..threads.max(1) {
            let (tx, rx) = mpsc::channel(QUEUE);
            let fetcher = fetcher.clone();
            std::thread::Builder::new().name(format!("sluice-fn-{i}")).spawn(move || serve(rx, limits, fetcher)).expect("spawn a function thread");
            queues.push(tx);
        }
        Arc::new(FunctionPool {
            queues,
            next: AtomicUsize::new(0),
            limits,
            calls: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new([0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])),
        })
    }

    /// Set the process's pool (once, at start; later calls change nothing and say so).
    pub fn configure(threads: usize, limits: Limits, fetcher: Option<Arc<dyn Fetch>>) -> Arc<FunctionPool> {
        let mut fresh = false;
        let pool = GLOBAL.get_or_init(|| {
            fresh = true;
            FunctionPool::start(threads, limits, fetcher)
        });
        if !fresh && (pool.queues.len() != threads.max(1) || pool.limits.time_per_call != limits.time_per_call) {
            tracing::debug!("the function pool was configured before; its first settings stay");
        }
        pool.clone()
    }

    /// The process's pool (started with the default settings if nobody configured it).
    pub fn global() -> Arc<FunctionPool> {
        GLOBAL.get_or_init(|| FunctionPool::start(2, Limits::default(), None)).clone()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Run `function` on each of `events` (one outcome per event, in order).
    pub async fn call(&self, stage: Stage, function: &FunctionCode, events: Vec<Value>, settings: Arc<Value>) -> Vec<FunctionOutcome> {
        let n = events.len();
        if n == 0 {
            return Vec::new();
        }
        let started = Instant::now();
        let queue = &self.queues[self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len()];
        let (reply, answer) = oneshot::channel();
        let request = Request { function: function.clone(), events, settings, reply };
        let outcomes = match queue.send(request).await {
            Ok(()) => answer.await.unwrap_or_else(|_| stopped(n)),
            Err(_) => stopped(n),
        };
        self.seconds.get_or_create(&vec![("stage", stage.as_str())]).observe(started.elapsed().as_secs_f64());
        for o in &outcomes {
            let outcome = match o {
                FunctionOutcome::Event(_) => "event",
                FunctionOutcome::Drop { .. } => "dropped",
                FunctionOutcome::Error { class, .. } => class.as_str(),
            };
            self.calls
                .get_or_create(&vec![("function", function.id.clone()), ("stage", stage.as_str().to_owned()), ("outcome", outcome.to_owned())])
                .inc();
        }
        outcomes
    }

    pub fn register(&self, r: &mut Registry) {
        r.register("sluice_function_calls", "Events passed through a function, per function, stage and outcome", self.calls.clone());
        r.register(
            "sluice_function_call_seconds",
            "One request to the function threads (a route batch's events, or one job), per stage",
            self.seconds.clone(),
        );
    }
}

fn stopped(n: usize) -> Vec<FunctionOutcome> {
    (0..n).map(|_| FunctionOutcome::Error { class: ErrorClass::Retry, message: "the function threads are stopping".into() }).collect()
}

/// One function thread: engines by function id, each at one version.
fn serve(mut queue: mpsc::Receiver<Request>, limits: Limits, fetcher: Option<Arc<dyn Fetch>>) {
    let mut engines: HashMap<String, (i64, Arc<str>, Result<JsFunction, String>)> = HashMap::new();
    while let Some(req) = queue.blocking_recv() {
        let f = &req.function;
        // Versions are never changed, but a deleted function's id may come back with other code.
        let current = match engines.get_mut(&f.id) {
            Some((v, code, _)) if *v == f.version && (Arc::ptr_eq(code, &f.code) || **code == *f.code) => {
                *code = f.code.clone(); // the next snapshot's copy: compared by address from now on
                true
            }
            _ => false,
        };
        if !current {
            if engines.len() >= MAX_ENGINES {
                engines.clear();
            }
            let loaded = JsFunction::load_with_fetch(&f.code, limits, fetcher.clone()).map_err(|e| e.to_string());
            engines.insert(f.id.clone(), (f.version, f.code.clone(), loaded));
        }
        let (_, _, engine) = engines.get_mut(&f.id).expect("inserted above");
        let outcomes = match engine {
            Ok(js) => req.events.iter().map(|e| js.call(e, &req.settings)).collect(),
            Err(problem) => req
                .events
                .iter()
                .map(|_| FunctionOutcome::Error { class: ErrorClass::Failed, message: format!("version {}: {problem}", f.version) })
                .collect(),
        };
        let _ = req.reply.send(outcomes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(id: &str, version: i64, src: &str) -> FunctionCode {
        FunctionCode { id: id.into(), version, code: src.into() }
    }

    #[tokio::test]
    async fn a_new_version_is_used_on_the_next_call_and_errors_stay_with_their_event() {
        let pool = FunctionPool::start(2, Limits::default(), None);
        let settings = Arc::new(json!({"tag": "t"}));
        let v1 = code("f", 1, "async function onTrack(e, s) { e.properties.v = 1; e.properties.tag = s.tag; return e; }");
        let v2 = code("f", 2, "async function onTrack(e) { if (e.properties.bad) throw new ValidationError('bad'); e.properties.v = 2; return e; }");
        let ev = |bad: bool| json!({"type": "track", "messageId": "m", "properties": {"bad": bad}});
        for _ in 0..4 {
            let out = pool.call(Stage::Test, &v1, vec![ev(false)], settings.clone()).await;
            let FunctionOutcome::Event(e) = &out[0] else { panic!("{out:?}") };
            assert_eq!((e["properties"]["v"].as_i64(), e["properties"]["tag"].as_str()), (Some(1), Some("t")));
        }
        let out = pool.call(Stage::Test, &v2, vec![ev(true), ev(false)], settings.clone()).await;
        assert!(matches!(&out[0], FunctionOutcome::Error { class: ErrorClass::Validation, .. }), "{out:?}");
        let FunctionOutcome::Event(e) = &out[1] else { panic!("{out:?}") };
        assert_eq!(e["properties"]["v"], 2);
        // Back to version 1 (a restore).
        let out = pool.call(Stage::Test, &v1, vec![ev(false)], settings).await;
        let FunctionOutcome::Event(e) = &out[0] else { panic!("{out:?}") };
        assert_eq!(e["properties"]["v"], 1);
    }

    #[tokio::test]
    async fn code_that_does_not_load_fails_its_events() {
        let pool = FunctionPool::start(1, Limits::default(), None);
        let out = pool.call(Stage::Test, &code("g", 1, "this is not javascript"), vec![json!({"type": "track"})], Arc::new(json!({}))).await;
        assert!(matches!(&out[0], FunctionOutcome::Error { class: ErrorClass::Failed, message } if message.starts_with("version 1:")), "{out:?}");
    }
}

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
//! - A request goes to the thread with the fewest requests, and a slow
//!   function (its last request took [`SLOW_REQUEST`] or more: a `fetch`
//!   upstream that takes seconds) has requests on at most all threads but
//!   one (with two or more): it waits on its own share and leaves a thread
//!   to the others. Fast functions are not limited.
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

/// How long a version that got a thread stuck stays stopped (unless another is deployed first).
pub const STOPPED_FOR: std::time::Duration = std::time::Duration::from_secs(600);
/// A function whose last request took this long is held to its share of the threads.
pub const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_secs(1);
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

/// One function thread slot, as the pool reaches it.
struct Worker {
    name: String,
    /// Requests sent to it and not yet answered.
    outstanding: AtomicUsize,
    /// Replaced, with a new thread, when its thread is stuck.
    current: std::sync::Mutex<WorkerThread>,
}

/// The thread in a slot: its queue, what it runs (function id and version), its Linux thread id.
struct WorkerThread {
    queue: mpsc::Sender<Request>,
    running: Arc<std::sync::Mutex<Option<(String, i64, Instant)>>>,
    tid: Arc<std::sync::atomic::AtomicI32>,
}

impl WorkerThread {
    fn start(name: &str, limits: Limits, fetcher: Option<Arc<dyn Fetch>>) -> WorkerThread {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (running, tid) = (Arc::new(std::sync::Mutex::new(None)), Arc::new(std::sync::atomic::AtomicI32::new(0)));
        let thread = Thread { running: running.clone(), tid: tid.clone() };
        std::thread::Builder::new().name(name.to_owned()).spawn(move || serve(rx, limits, fetcher, thread)).expect("spawn a function thread");
        WorkerThread { queue: tx, running, tid }
    }
}

/// What a function thread tells the pool about itself.
struct Thread {
    running: Arc<std::sync::Mutex<Option<(String, i64, Instant)>>>,
    tid: Arc<std::sync::atomic::AtomicI32>,
}

/// The function threads of this process.
///
/// A thread stuck in the engine's native code (QuickJS's `indexOf` is
/// quadratic and does not look at the interrupt: a call can hold a thread
/// for hours) is given up: when a thread has run one request for longer
/// than [`FunctionPool::stuck_after`], the requests waiting on it end
/// `Timeout`, the version it was running
/// is stopped in this process (its calls end `Timeout` at once until
/// another version is deployed, or for [`STOPPED_FOR`]: a thread can also
/// look stuck on a machine too loaded to run it), the stuck thread is set to the lowest CPU
/// priority and left to finish, and a new thread takes its place.
pub struct FunctionPool {
    workers: Vec<Worker>,
    fetcher: Option<Arc<dyn Fetch>>,
    /// Versions that got a thread stuck.
    stopped: std::sync::Mutex<HashMap<(String, i64), Instant>>,
    next: AtomicUsize,
    /// Per function id, when each of its requests in the threads (sent,
    /// not answered) was sent.
    busy: std::sync::Mutex<HashMap<String, Vec<Instant>>>,
    /// Woken when a function's request is answered.
    freed: tokio::sync::Notify,
    /// Functions whose last request was slow (held to their share).
    slow: std::sync::Mutex<std::collections::HashSet<String>>,
    limits: Limits,
    calls: Family<Vec<(&'static str, String)>, Counter>,
    seconds: Family<Vec<(&'static str, &'static str)>, Histogram>,
}

static GLOBAL: OnceLock<Arc<FunctionPool>> = OnceLock::new();

impl FunctionPool {
    /// Start `threads` function threads with `limits` for every call, and
    /// `fetch` defined over `fetcher` (when given).
    pub fn start(threads: usize, limits: Limits, fetcher: Option<Arc<dyn Fetch>>) -> Arc<FunctionPool> {
        let workers = (0..threads.max(1))
            .map(|i| {
                let name = format!("sluice-fn-{i}");
                Worker { current: std::sync::Mutex::new(WorkerThread::start(&name, limits, fetcher.clone())), name, outstanding: AtomicUsize::new(0) }
            })
            .collect();
        Arc::new(FunctionPool {
            workers,
            fetcher,
            stopped: std::sync::Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            busy: std::sync::Mutex::new(HashMap::new()),
            freed: tokio::sync::Notify::new(),
            slow: std::sync::Mutex::new(std::collections::HashSet::new()),
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
        if !fresh && (pool.workers.len() != threads.max(1) || pool.limits.time_per_call != limits.time_per_call) {
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
        let stopped_now = {
            let mut stopped = self.stopped.lock().expect("stopped lock");
            stopped.retain(|_, at| at.elapsed() < STOPPED_FOR);
            stopped.contains_key(&(function.id.clone(), function.version))
        };
        if stopped_now {
            return (0..n)
                .map(|_| FunctionOutcome::Error {
                    class: ErrorClass::Timeout,
                    message: format!("not called: version {} got a function thread stuck; deploy another version", function.version),
                })
                .collect();
        }
        let held = self.slow.lock().expect("slow lock").contains(&function.id);
        let _share = self.function_share(&function.id, held).await;
        let sent_at = Instant::now();
        let worker = self.least_loaded();
        worker.outstanding.fetch_add(1, Ordering::Relaxed);
        let _sent = Outstanding(&worker.outstanding);
        let queue = worker.current.lock().expect("worker lock").queue.clone();
        let (reply, answer) = oneshot::channel();
        let request = Request { function: function.clone(), events, settings, reply };
        let outcomes = match queue.send(request).await {
            Ok(()) => self.answer_of(worker, &queue, answer, n).await,
            Err(_) => stopped(n),
        };
        {
            let mut slow = self.slow.lock().expect("slow lock");
            if sent_at.elapsed() >= SLOW_REQUEST {
                slow.insert(function.id.clone());
            } else if held {
                slow.remove(&function.id);
            }
        }
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

    /// Most requests of one function in the threads at once.
    fn share(&self) -> usize {
        (self.workers.len() - 1).max(1)
    }

    /// Wait until function `id` has fewer than [`FunctionPool::share`]
    /// requests in the threads (when `held`, or when it has had requests
    /// in them for [`SLOW_REQUEST`] already; at once otherwise); counts
    /// this one until the guard drops.
    async fn function_share(&self, id: &str, held: bool) -> Share<'_> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a release between check and wait is not missed.
            freed.as_mut().enable();
            {
                let mut busy = self.busy.lock().expect("busy lock");
                let sent = busy.entry(id.to_owned()).or_default();
                // A request of it has been in the threads for a while already (stuck, or slow): as slow.
                let held = held || sent.iter().any(|at| at.elapsed() >= SLOW_REQUEST);
                if !held || sent.len() < self.share() {
                    let at = Instant::now();
                    sent.push(at);
                    return Share { pool: self, id: id.to_owned(), at };
                }
            }
            freed.await;
        }
    }

    /// The thread slot with the fewest unanswered requests (ties: in turn).
    fn least_loaded(&self) -> &Worker {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.workers.len();
        (0..n).map(|k| &self.workers[(start + k) % n]).min_by_key(|w| w.outstanding.load(Ordering::Relaxed)).expect("at least one thread")
    }

    /// The answer to a request sent to `worker`; its thread is given up
    /// when the request it is running (this one or one queued before it)
    /// has run past [`FunctionPool::stuck_after`]. Waiting in the queue
    /// behind requests that are merely slow gives up nothing.
    async fn answer_of(
        &self,
        worker: &Worker,
        queue: &mpsc::Sender<Request>,
        mut answer: oneshot::Receiver<Vec<FunctionOutcome>>,
        n: usize,
    ) -> Vec<FunctionOutcome> {
        let stuck_after = self.stuck_after();
        loop {
            match tokio::time::timeout(stuck_after / 4, &mut answer).await {
                Ok(answer) => return answer.unwrap_or_else(|_| stopped(n)),
                Err(_) => {
                    let stuck = {
                        let current = worker.current.lock().expect("worker lock");
                        if !current.queue.same_channel(queue) {
                            // Its thread was given up by another caller: this request is lost with it.
                            true
                        } else {
                            let running = current.running.lock().expect("running lock").clone();
                            running.is_some_and(|(_, _, since)| since.elapsed() >= stuck_after)
                        }
                    };
                    if stuck {
                        self.give_up(worker, queue);
                        return (0..n)
                            .map(|_| FunctionOutcome::Error {
                                class: ErrorClass::Timeout,
                                message: format!("no answer: the function thread ran one request for over {} s", stuck_after.as_secs()),
                            })
                            .collect();
                    }
                }
            }
        }
    }

    /// How long a request may go unanswered before its thread is given up:
    /// longer than any request can take when the interrupt works (its
    /// budget, one more call, and that call's `fetch` waiting).
    pub fn stuck_after(&self) -> std::time::Duration {
        self.limits.time_per_request + self.limits.time_per_call + crate::fetch::FETCH_TIMEOUT + std::time::Duration::from_secs(2)
    }

    /// Give up `worker`'s thread (once: a caller whose request queued
    /// behind the stuck one finds the thread already replaced).
    fn give_up(&self, worker: &Worker, queue: &mpsc::Sender<Request>) {
        let mut current = worker.current.lock().expect("worker lock");
        if !current.queue.same_channel(queue) {
            return;
        }
        let running = current.running.lock().expect("running lock").clone().map(|(id, version, _)| (id, version));
        if let Some(key) = &running {
            self.stopped.lock().expect("stopped lock").insert(key.clone(), Instant::now());
        }
        lowest_priority(current.tid.load(Ordering::Relaxed));
        tracing::error!(thread = %worker.name, function = ?running, "a function thread is stuck in native code: that version is stopped in this process, the thread is replaced");
        *current = WorkerThread::start(&worker.name, self.limits, self.fetcher.clone());
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

/// One request of a function counted in [`FunctionPool::busy`].
struct Share<'a> {
    pool: &'a FunctionPool,
    id: String,
    at: Instant,
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        let mut busy = self.pool.busy.lock().expect("busy lock");
        if let Some(sent) = busy.get_mut(&self.id) {
            if let Some(i) = sent.iter().position(|at| *at == self.at) {
                sent.swap_remove(i);
            }
            if sent.is_empty() {
                busy.remove(&self.id);
            }
        }
        drop(busy);
        self.pool.freed.notify_waiters();
    }
}

/// One request counted in a worker's `outstanding`.
struct Outstanding<'a>(&'a AtomicUsize);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn stopped(n: usize) -> Vec<FunctionOutcome> {
    (0..n).map(|_| FunctionOutcome::Error { class: ErrorClass::Retry, message: "the function threads are stopping".into() }).collect()
}

/// One function's engine on one thread, and its time-out breaker.
struct Loaded {
    id: String,
    version: i64,
    code: Arc<str>,
    engine: Result<JsFunction, String>,
    timeouts_in_a_row: u32,
    stopped_until: Option<Instant>,
}

impl Loaded {
    fn call(&mut self, event: &Value, settings: &Value) -> FunctionOutcome {
        if let Some(until) = self.stopped_until {
            if Instant::now() < until {
                return FunctionOutcome::Error {
                    class: ErrorClass::Timeout,
                    message: format!(
                        "not called: {TIMEOUTS_BEFORE_PAUSE} calls in a row ran past their time, so the function is paused for {} s",
                        PAUSE_AFTER_TIMEOUTS.as_secs()
                    ),
                };
            }
            self.stopped_until = None;
        }
        let outcome = match &mut self.engine {
            Ok(js) => js.call(event, settings),
            Err(problem) => return FunctionOutcome::Error { class: ErrorClass::Failed, message: format!("version {}: {problem}", self.version) },
        };
        if matches!(outcome, FunctionOutcome::Error { class: ErrorClass::Timeout, .. }) {
            self.timeouts_in_a_row += 1;
            if self.timeouts_in_a_row >= TIMEOUTS_BEFORE_PAUSE {
                self.timeouts_in_a_row = 0;
                self.stopped_until = Some(Instant::now() + PAUSE_AFTER_TIMEOUTS);
                tracing::warn!(function = %self.id, version = self.version, "a function ran past its time {TIMEOUTS_BEFORE_PAUSE} times in a row: paused for {PAUSE_AFTER_TIMEOUTS:?} on this thread");
            }
        } else {
            self.timeouts_in_a_row = 0;
        }
        outcome
    }
}

/// Calls in a row that ran past their time before a function is paused...
const TIMEOUTS_BEFORE_PAUSE: u32 = 5;
/// ...for this long: its events end `Timeout` at once (retried later by
/// their stage), so a function that always loops costs its thread at most
/// five budgets per pause instead of one per event, and the other
/// functions on the thread keep running.
const PAUSE_AFTER_TIMEOUTS: std::time::Duration = std::time::Duration::from_secs(10);

/// This thread's Linux id.
#[allow(unsafe_code)] // one libc call, SAFETY below
fn thread_id() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Set thread `tid` to the lowest CPU priority (a stuck thread left to finish its native loop).
#[allow(unsafe_code)] // one libc call, SAFETY below
fn lowest_priority(tid: i32) {
    if tid > 0 {
        // SAFETY: setpriority only reads its arguments; a thread that is gone makes it fail, harmlessly.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        }
    }
}

/// One function thread: engines by function id, each at one version.
fn serve(mut queue: mpsc::Receiver<Request>, limits: Limits, fetcher: Option<Arc<dyn Fetch>>, thread: Thread) {
    thread.tid.store(thread_id(), Ordering::Relaxed);
    let mut engines: HashMap<String, Loaded> = HashMap::new();
    while let Some(req) = queue.blocking_recv() {
        let f = &req.function;
        *thread.running.lock().expect("running lock") = Some((f.id.clone(), f.version, Instant::now()));
        // Versions are never changed, but a deleted function's id may come back with other code.
        let current = match engines.get_mut(&f.id) {
            Some(l) if l.version == f.version && (Arc::ptr_eq(&l.code, &f.code) || *l.code == *f.code) => {
                l.code = f.code.clone(); // the next snapshot's copy: compared by address from now on
                true
            }
            _ => false,
        };
        if !current {
            if engines.len() >= MAX_ENGINES {
                engines.clear();
            }
            let engine = JsFunction::load_with_fetch(&f.code, limits, fetcher.clone()).map_err(|e| e.to_string());
            engines.insert(
                f.id.clone(),
                Loaded { id: f.id.clone(), version: f.version, code: f.code.clone(), engine, timeouts_in_a_row: 0, stopped_until: None },
            );
        }
        let loaded = engines.get_mut(&f.id).expect("inserted above");
        let started = Instant::now();
        let outcomes = req
            .events
            .iter()
            .map(|e| {
                if started.elapsed() < limits.time_per_request {
                    loaded.call(e, &req.settings)
                } else {
                    FunctionOutcome::Error {
                        class: ErrorClass::Timeout,
                        message: format!("not called: the request's earlier events took its {} ms", limits.time_per_request.as_millis()),
                    }
                }
            })
            .collect();
        *thread.running.lock().expect("running lock") = None;
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
    async fn a_function_that_keeps_running_past_its_time_is_paused_not_called() {
        let limits = Limits { time_per_call: std::time::Duration::from_millis(20), ..Limits::default() };
        let pool = FunctionPool::start(1, limits, None);
        let looping = code("loop", 1, "async function onTrack(e) { while (true) {} }");
        let out = pool.call(Stage::Test, &looping, vec![json!({"type": "track"}); 50], Arc::new(json!({}))).await;
        assert!(out.iter().all(|o| matches!(o, FunctionOutcome::Error { class: ErrorClass::Timeout, .. })), "{out:?}");
        let paused = out.iter().filter(|o| matches!(o, FunctionOutcome::Error { message, .. } if message.starts_with("not called"))).count();
        assert_eq!(paused, 45, "five calls ran, the other 45 events were answered without one");
        // Another function on the same thread is not paused; a new version of the looping one starts afresh.
        let fine = code("fine", 1, "async function onTrack(e) { return e; }");
        assert!(matches!(pool.call(Stage::Test, &fine, vec![json!({"type": "track"})], Arc::new(json!({}))).await[0], FunctionOutcome::Event(_)));
        let fixed = code("loop", 2, "async function onTrack(e) { return e; }");
        assert!(matches!(pool.call(Stage::Test, &fixed, vec![json!({"type": "track"})], Arc::new(json!({}))).await[0], FunctionOutcome::Event(_)));
    }

    /// Sleeps its time, answers 200.
    struct FetchAfter(std::time::Duration);

    impl Fetch for FetchAfter {
        fn fetch(&self, _: crate::fetch::FetchRequest) -> Result<crate::fetch::FetchResponse, crate::fetch::FetchFailure> {
            std::thread::sleep(self.0);
            Ok(crate::fetch::FetchResponse { status: 200, headers: Vec::new(), body: String::new() })
        }
    }

    #[tokio::test]
    async fn a_slow_function_leaves_a_thread_to_the_others() {
        let pool = FunctionPool::start(2, Limits::default(), Some(Arc::new(FetchAfter(std::time::Duration::from_millis(300)))));
        let slow = code("slow", 1, "async function onTrack(e) { await fetch('http://upstream.example/'); return e; }");
        let fast = code("fast", 1, "async function onTrack(e) { return e; }");
        let done: Arc<std::sync::Mutex<Vec<&'static str>>> = Arc::default();
        let mut tasks = Vec::new();
        // Its first request shows it slow (until then it is not held back).
        pool.call(Stage::Test, &slow, vec![json!({"type": "track"}); 4], Arc::new(json!({}))).await;
        assert!(pool.slow.lock().unwrap().contains("slow"));
        // Three requests of five slow events (1.5 s each) from three callers (three route partitions)...
        for _ in 0..3 {
            let (pool, slow, done) = (pool.clone(), slow.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                pool.call(Stage::Test, &slow, vec![json!({"type": "track"}); 5], Arc::new(json!({}))).await;
                done.lock().unwrap().push("slow");
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // ...and the fast function is answered first: a thread was left to it.
        let out = pool.call(Stage::Test, &fast, vec![json!({"type": "track"})], Arc::new(json!({}))).await;
        assert!(matches!(out[0], FunctionOutcome::Event(_)), "{out:?}");
        done.lock().unwrap().push("fast");
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(done.lock().unwrap().clone(), ["fast", "slow", "slow", "slow"]);
        assert!(pool.busy.lock().unwrap().is_empty(), "every share given back");
        assert!(!pool.slow.lock().unwrap().contains("fast"));
    }

    /// Sleeps 50 ms, answers 200.
    struct SlowFetch;

    impl Fetch for SlowFetch {
        fn fetch(&self, _: crate::fetch::FetchRequest) -> Result<crate::fetch::FetchResponse, crate::fetch::FetchFailure> {
            std::thread::sleep(std::time::Duration::from_millis(50));
            Ok(crate::fetch::FetchResponse { status: 200, headers: Vec::new(), body: String::new() })
        }
    }

    #[tokio::test]
    async fn a_request_stops_calling_once_its_time_is_spent() {
        let limits = Limits { time_per_request: std::time::Duration::from_millis(200), ..Limits::default() };
        let pool = FunctionPool::start(1, limits, Some(Arc::new(SlowFetch)));
        let slow = code("slow", 1, "async function onTrack(e) { await fetch('http://upstream/'); return e; }");
        let out = pool.call(Stage::Test, &slow, vec![json!({"type": "track"}); 40], Arc::new(json!({}))).await;
        let called = out.iter().filter(|o| matches!(o, FunctionOutcome::Event(_))).count();
        let skipped = out
            .iter()
            .filter(|o| matches!(o, FunctionOutcome::Error { class: ErrorClass::Timeout, message } if message.starts_with("not called")))
            .count();
        assert_eq!(called + skipped, 40, "{out:?}");
        assert!(called >= 1 && skipped >= 1, "some were called before the 200 ms were spent, the rest not: {called} / {skipped}");
    }

    #[tokio::test]
    async fn a_thread_stuck_in_native_code_is_replaced_and_its_version_stopped() {
        // QuickJS's indexOf is quadratic and never looks at the interrupt: ~40 s here at n = 300,000.
        let limits = Limits {
            time_per_call: std::time::Duration::from_millis(20),
            time_per_request: std::time::Duration::from_millis(20),
            ..Limits::default()
        };
        let pool = FunctionPool::start(1, limits, None);
        let stuck =
            code("stuck", 1, "async function onTrack(e) { const h = 'a'.repeat(300000); e.i = h.indexOf('a'.repeat(150000) + 'b'); return e; }");
        let out = pool.call(Stage::Test, &stuck, vec![json!({"type": "track"})], Arc::new(json!({}))).await;
        assert!(matches!(&out[0], FunctionOutcome::Error { class: ErrorClass::Timeout, message } if message.starts_with("no answer")), "{out:?}");
        // The version is stopped without calling it; the replacement thread runs the others.
        let again = pool.call(Stage::Test, &stuck, vec![json!({"type": "track"})], Arc::new(json!({}))).await;
        assert!(
            matches!(&again[0], FunctionOutcome::Error { class: ErrorClass::Timeout, message } if message.starts_with("not called")),
            "{again:?}"
        );
        let fine = code("fine", 1, "async function onTrack(e) { e.ok = true; return e; }");
        assert!(
            matches!(&pool.call(Stage::Test, &fine, vec![json!({"type": "track"})], Arc::new(json!({}))).await[0], FunctionOutcome::Event(e) if e["ok"] == true)
        );
    }

    #[tokio::test]
    async fn code_that_does_not_load_fails_its_events() {
        let pool = FunctionPool::start(1, Limits::default(), None);
        let out = pool.call(Stage::Test, &code("g", 1, "this is not javascript"), vec![json!({"type": "track"})], Arc::new(json!({}))).await;
        assert!(matches!(&out[0], FunctionOutcome::Error { class: ErrorClass::Failed, message } if message.starts_with("version 1:")), "{out:?}");
    }
}

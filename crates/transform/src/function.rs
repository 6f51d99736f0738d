//! Functions: custom transforms in JavaScript with Segment's handler
//! signatures (`async function onTrack(event, settings)`, `onIdentify`,
//! `onPage`, `onScreen`, `onGroup`, `onAlias`, `onBatch`), run in an
//! embedded QuickJS (`rquickjs`).
//!
//! Invariants:
//! - A function sees nothing but its event and settings: the engine has no
//!   file system, no timers and no modules (QuickJS's core only), and no
//!   network but `fetch` where its process gives one ([`crate::fetch`]:
//!   the pipeline's goes through the delivery SSRF guard).
//! - Every call is bounded: a CPU-time budget per call (the interrupt
//!   handler stops the code, even in `while (true) {}`), a memory limit per
//!   function (the runtime's allocator refuses past it) and a stack limit.
//!   A call stopped by either ends with [`FunctionOutcome::Error`] of class
//!   `Timeout` or `OutOfMemory`, and the function's engine is built afresh
//!   before its next call: what one call did cannot leak into the next.
//! - Events cross as JSON text, parsed and serialized by the `JSON` the
//!   engine had before the function's code ran (a function that replaces
//!   `JSON` changes nothing but its own globals).
//! - A handler returns the event (changed or not) to keep it, `null` or
//!   nothing to drop it, or throws: `DropEvent` drops, `RetryError` asks
//!   for a retry, `ValidationError` and any other error fail the event (see
//!   [`ErrorClass`]). An event whose type has no handler passes unchanged.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rquickjs::{CatchResultExt, CaughtError, Context, Function, Persistent, Promise, Runtime};
use serde_json::Value;

use crate::fetch::{Fetch, FetchFailure, FetchRequest, FETCH_TIMEOUT, MAX_FETCHES_PER_CALL, MAX_FETCH_BODY};

/// What a function may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// CPU (wall) time one call may take.
    pub time_per_call: Duration,
    /// Memory the function's engine may hold, its code and data included.
    pub memory_bytes: usize,
    pub stack_bytes: usize,
    /// Wall time one request to a function thread (a route batch's events
    /// of one source) may take: its events not called by then end
    /// `Timeout` (retried by their stage), so a slow `fetch` upstream holds
    /// a route partition for seconds, not for events × the fetch timeout.
    pub time_per_request: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { time_per_call: Duration::from_millis(100), memory_bytes: 32 << 20, stack_bytes: 512 << 10, time_per_request: Duration::from_secs(5) }
    }
}

/// How a call that did not return an event ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// `throw new RetryError(…)`: try the event again later.
    Retry,
    /// `throw new ValidationError(…)`: the event is wrong; not retried.
    Validation,
    /// The call ran past its time budget.
    Timeout,
    /// The function's engine ran out of its memory.
    OutOfMemory,
    /// Any other exception (a bug in the function): not retried.
    Failed,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retry => "RetryError",
            ErrorClass::Validation => "ValidationError",
            ErrorClass::Timeout => "Timeout",
            ErrorClass::OutOfMemory => "OutOfMemory",
            ErrorClass::Failed => "Error",
        }
    }

    /// Whether the event is tried again (later) rather than set aside: a
    /// `RetryError`, or a call that ran out of time (the machine may have
    /// been busy; a function that always loops runs out its retry window).
    pub fn retried(self) -> bool {
        matches!(self, ErrorClass::Retry | ErrorClass::Timeout)
    }
}

/// The end of one call for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum FunctionOutcome {
    /// Keep this event (the handler's return value, or the event unchanged without a handler).
    Event(Value),
    /// Dropped: the handler returned `null` or nothing, or threw `DropEvent`.
    Drop {
        reason: String,
    },
    Error {
        class: ErrorClass,
        message: String,
    },
}

impl FunctionOutcome {
    /// What became of one event, as `sluice function test` and the admin API show it.
    pub fn to_json(&self) -> Value {
        match self {
            FunctionOutcome::Event(e) => serde_json::json!({"outcome": "event", "event": e}),
            FunctionOutcome::Drop { reason } => serde_json::json!({"outcome": "dropped", "reason": reason}),
            FunctionOutcome::Error { class, message } => {
                serde_json::json!({"outcome": "error", "class": class.as_str(), "message": message, "retried": class.retried()})
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    #[error("the function does not load: {0}")]
    Load(String),
    #[error("the function's engine could not start: {0}")]
    Engine(String),
}

/// Longest error message kept from a function (characters).
const MAX_MESSAGE: usize = 500;

/// Evaluated before the function's code: Segment's error classes (frozen,
/// and non-writable globals), and the runner and handler test, which are
/// returned to the host, not left on the globals, and keep their own
/// references to `JSON` and `Object`'s functions: whatever the function's
/// code does to its globals, it cannot replace them or fake an outcome
/// (`Symbol.hasInstance` on a class or `Error` changes nothing: classes are
/// told by walking the prototype chain).
const PRELUDE: &str = r#"
(() => {
  const G = globalThis, parse = JSON.parse, stringify = JSON.stringify, getProto = Object.getPrototypeOf,
    freeze = Object.freeze, own = Object.getOwnPropertyDescriptor, define = Object.defineProperty, toText = String,
    hasOwn = Object.hasOwn;
  class DropEvent extends Error { constructor(m) { super(m); this.name = "DropEvent"; } }
  class RetryError extends Error { constructor(m) { super(m); this.name = "RetryError"; } }
  class ValidationError extends Error { constructor(m) { super(m); this.name = "ValidationError"; } }
  class EventNotSupported extends Error { constructor(m) { super(m); this.name = "EventNotSupported"; } }
  const classes = [["DropEvent", DropEvent], ["RetryError", RetryError], ["ValidationError", ValidationError], ["EventNotSupported", EventNotSupported]];
  for (const [name, C] of classes) {
    freeze(C.prototype); freeze(C);
    define(G, name, { value: C, writable: false, enumerable: false, configurable: false });
  }
  const isA = (e, C) => {
    const target = C.prototype;
    let p = e;
    for (let i = 0; i < 100 && p !== null && (typeof p === "object" || typeof p === "function"); i++) {
      p = getProto(p);
      if (p === target) return true;
    }
    return false;
  };
  const classOf = (e) => {
    try {
      return isA(e, DropEvent) || isA(e, EventNotSupported) ? "drop" : isA(e, RetryError) ? "retry" : isA(e, ValidationError) ? "validation" : "failed";
    } catch (_) { return "failed"; }
  };
  const messageOf = (e) => { try { return toText(e && e.message !== undefined ? e.message : e); } catch (_) { return "(unprintable)"; } };
  const runner = async (handler, eventJson, settingsJson) => {
    const h = G[handler];
    if (typeof h !== "function") return "P";
    try {
      const out = await h(parse(eventJson), parse(settingsJson));
      if (out === null || out === undefined) return "D";
      return "E" + stringify(out);
    } catch (e) {
      return "X" + stringify({ class: classOf(e), message: messageOf(e) });
    }
  };
  const defined = (name) => { const d = own(G, name); return d !== undefined && hasOwn(d, "value") && typeof d.value === "function"; };
  return [runner, defined];
})()
"#;

/// Defined after [`PRELUDE`] when the engine may fetch: a WHATWG-like
/// `fetch` over the host's `__sluice_fetch` (removed from the globals).
/// A refused request throws `Error` (the event fails), an unanswered one
/// `RetryError` (the event is retried).
const FETCH_PRELUDE: &str = r#"
globalThis.fetch = (() => {
  const host = globalThis.__sluice_fetch, parse = JSON.parse, stringify = JSON.stringify;
  delete globalThis.__sluice_fetch;
  class FetchHeaders {
    constructor(list) { this.list = list; }
    get(name) { const n = String(name).toLowerCase(); const h = this.list.find((p) => p[0] === n); return h ? h[1] : null; }
    has(name) { return this.get(name) !== null; }
  }
  return async (url, init) => {
    init = init || {};
    const given = init.headers || {};
    const headers = Object.keys(given).map((k) => [String(k), String(given[k])]);
    const body = init.body === undefined || init.body === null ? null : String(init.body);
    const answer = parse(host(String(url), String(init.method || "GET"), stringify(headers), body));
    if (answer.refused !== undefined) throw new Error("fetch " + url + ": " + answer.refused);
    if (answer.unanswered !== undefined) throw new RetryError("fetch " + url + ": " + answer.unanswered);
    const text = answer.body;
    return { ok: answer.status >= 200 && answer.status < 300, status: answer.status, statusText: "", url: String(url),
             headers: new FetchHeaders(answer.headers), text: async () => text, json: async () => parse(text) };
  };
})();
"#;

const HANDLERS: [(&str, &str); 6] =
    [("track", "onTrack"), ("identify", "onIdentify"), ("page", "onPage"), ("screen", "onScreen"), ("group", "onGroup"), ("alias", "onAlias")];

/// One engine with the function's code loaded.
struct Engine {
    /// The prelude's runner and handler test (declared first: dropped before the runtime).
    runner: Persistent<Function<'static>>,
    defined: Persistent<Function<'static>>,
    context: Context,
    /// Held for the engine's life: its memory limit and interrupt handler live there.
    _runtime: Runtime,
    deadline: Deadline,
}

/// When the running call must stop, and what it has used.
#[derive(Clone)]
struct Deadline {
    /// ms since `epoch`; 0: no call running.
    at_ms: Arc<AtomicU64>,
    epoch: Instant,
    /// Requests made by the running call, and how long they waited (ms).
    fetches: Arc<AtomicU32>,
    fetch_waited_ms: Arc<AtomicU64>,
}

impl Deadline {
    fn new() -> Deadline {
        Deadline {
            at_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            fetches: Arc::new(AtomicU32::new(0)),
            fetch_waited_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn arm(&self, budget: Duration) {
        self.fetches.store(0, Ordering::Relaxed);
        self.fetch_waited_ms.store(0, Ordering::Relaxed);
        let at = self.epoch.elapsed() + budget;
        self.at_ms.store((at.as_millis() as u64).max(1), Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.at_ms.store(0, Ordering::Relaxed);
    }

    fn timed_out(&self) -> bool {
        let d = self.at_ms.load(Ordering::Relaxed);
        d != 0 && self.epoch.elapsed().as_millis() as u64 >= d
    }
}

/// The host side of `fetch`: bounded, and its wait moves the call's deadline.
fn host_fetch(fetcher: &Arc<dyn Fetch>, deadline: &Deadline, request: FetchRequest) -> String {
    let answer = |v: Value| v.to_string();
    if deadline.fetches.fetch_add(1, Ordering::Relaxed) >= MAX_FETCHES_PER_CALL {
        return answer(serde_json::json!({"refused": format!("more than {MAX_FETCHES_PER_CALL} requests in one call")}));
    }
    if request.body.as_ref().is_some_and(|b| b.len() > MAX_FETCH_BODY) {
        return answer(serde_json::json!({"refused": format!("a request body over {MAX_FETCH_BODY} bytes")}));
    }
    let left = FETCH_TIMEOUT.saturating_sub(Duration::from_millis(deadline.fetch_waited_ms.load(Ordering::Relaxed)));
    if left.is_zero() {
        return answer(serde_json::json!({"unanswered": format!("the call's requests waited {} s together already", FETCH_TIMEOUT.as_secs())}));
    }
    let started = Instant::now();
    let result = fetcher.fetch(FetchRequest { timeout: left, ..request });
    // The wait is not the function's CPU: it does not count against the call's budget.
    let waited = started.elapsed().as_millis() as u64;
    deadline.fetch_waited_ms.fetch_add(waited, Ordering::Relaxed);
    let _ = deadline.at_ms.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| (d != 0).then(|| d.saturating_add(waited)));
    match result {
        Ok(r) => answer(
            serde_json::json!({"status": r.status, "headers": r.headers.iter().map(|(k, v)| [k.to_ascii_lowercase(), v.clone()]).collect::<Vec<_>>(), "body": r.body}),
        ),
        Err(FetchFailure::Refused(why)) => answer(serde_json::json!({"refused": why})),
        Err(FetchFailure::Unanswered(why)) => answer(serde_json::json!({"unanswered": why})),
    }
}

impl Engine {
    fn build(code: &str, limits: &Limits, fetcher: Option<&Arc<dyn Fetch>>) -> Result<Engine, FunctionError> {
        let runtime = Runtime::new().map_err(|e| FunctionError::Engine(e.to_string()))?;
        runtime.set_memory_limit(limits.memory_bytes);
        runtime.set_max_stack_size(limits.stack_bytes);
        let deadline = Deadline::new();
        {
            let deadline = deadline.clone();
            runtime.set_interrupt_handler(Some(Box::new(move || deadline.timed_out())));
        }
        let context = Context::full(&runtime).map_err(|e| FunctionError::Engine(e.to_string()))?;
        // Loading the code is a call like any other: bounded in time (its handlers are then
        // looked up by their descriptors: no getter of the code runs outside a call).
        deadline.arm(limits.time_per_call);
        let loaded = context.with(|ctx| -> Result<(Persistent<Function<'static>>, Persistent<Function<'static>>), String> {
            let parts: rquickjs::Array = ctx.eval(PRELUDE).catch(&ctx).map_err(|e| format!("prelude: {e}"))?;
            let runner: Function = parts.get(0).map_err(|e| format!("prelude: {e}"))?;
            let defined: Function = parts.get(1).map_err(|e| format!("prelude: {e}"))?;
            if let Some(fetcher) = fetcher {
                let (fetcher, deadline) = (fetcher.clone(), deadline.clone());
                let host = Function::new(ctx.clone(), move |url: String, method: String, headers: String, body: Option<String>| {
                    let headers: Vec<(String, String)> = serde_json::from_str(&headers).unwrap_or_default();
                    host_fetch(&fetcher, &deadline, FetchRequest { url, method, headers, body, timeout: FETCH_TIMEOUT })
                })
                .map_err(|e| format!("prelude: {e}"))?;
                ctx.globals().set("__sluice_fetch", host).map_err(|e| format!("prelude: {e}"))?;
                ctx.eval::<(), _>(FETCH_PRELUDE).catch(&ctx).map_err(|e| format!("prelude: {e}"))?;
            }
            ctx.eval::<(), _>(code).catch(&ctx).map_err(|e| describe(&e))?;
            Ok((Persistent::save(&ctx, runner), Persistent::save(&ctx, defined)))
        });
        let timed_out = deadline.timed_out();
        deadline.disarm();
        let (runner, defined) = match loaded {
            Ok(parts) => parts,
            Err(_) if timed_out => return Err(FunctionError::Load(format!("loading ran past its {} ms", limits.time_per_call.as_millis()))),
            Err(e) => return Err(FunctionError::Load(e)),
        };
        Ok(Engine { runner, defined, context, _runtime: runtime, deadline })
    }

    /// Whether the code defines a handler `name` (an own data property of
    /// the globals holding a function: no getter runs).
    fn defines(&self, name: &str, limits: &Limits) -> bool {
        // Bounded like a call: the code may have changed what the lookup touches.
        self.deadline.arm(limits.time_per_call);
        let defined = self
            .context
            .with(|ctx| {
                let defined = self.defined.clone().restore(&ctx).ok()?;
                defined.call::<_, bool>((name,)).ok()
            })
            .unwrap_or(false);
        self.deadline.disarm();
        defined
    }

    /// Run `handler` on one JSON argument; the runner's answer (see PRELUDE), or how it broke.
    fn run(&self, handler: &str, arg_json: &str, settings_json: &str, limits: &Limits) -> Result<String, (ErrorClass, String)> {
        self.deadline.arm(limits.time_per_call);
        let out = self.context.with(|ctx| -> Result<String, (ErrorClass, String)> {
            let runner = self.runner.clone().restore(&ctx).map_err(|e| (ErrorClass::Failed, e.to_string()))?;
            let promise: Promise = runner.call((handler, arg_json, settings_json)).catch(&ctx).map_err(|e| (ErrorClass::Failed, describe(&e)))?;
            // The promise's jobs are run here, one at a time, until it settles or the time is up:
            // the interrupt stops only the job running, and a job that queued its successor
            // first would outlive it (a chain of promise jobs that never ends).
            loop {
                if let Some(settled) = promise.result::<String>() {
                    return settled.catch(&ctx).map_err(|e| (ErrorClass::Failed, describe(&e)));
                }
                if self.deadline.timed_out() {
                    return Err((ErrorClass::Timeout, String::new()));
                }
                if !ctx.execute_pending_job() {
                    return Err((ErrorClass::Failed, "WouldBlock".into()));
                }
            }
        });
        let timed_out = self.deadline.timed_out();
        self.deadline.disarm();
        match out {
            Err(_) if timed_out => Err((ErrorClass::Timeout, format!("ran past its {} ms", limits.time_per_call.as_millis()))),
            Err((_, m)) if m.contains("out of memory") => Err((ErrorClass::OutOfMemory, format!("ran out of its {} MiB", limits.memory_bytes >> 20))),
            Err((class, m)) if m.contains("WouldBlock") || m.contains("would block") => {
                Err((class, "the handler waited on something that never came (no timers or network here)".into()))
            }
            other => other,
        }
    }
}

fn describe(e: &CaughtError<'_>) -> String {
    cut(&e.to_string())
}

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_MESSAGE {
        s.to_owned()
    } else {
        s.chars().take(MAX_MESSAGE).collect::<String>() + "…"
    }
}

/// A function: its code, limits and engine (rebuilt after a call it had to stop).
pub struct JsFunction {
    code: String,
    limits: Limits,
    fetcher: Option<Arc<dyn Fetch>>,
    engine: Option<Engine>,
    has_batch: bool,
}

impl JsFunction {
    /// Load `code` (it must define at least one handler); `fetch` is not defined.
    pub fn load(code: &str, limits: Limits) -> Result<JsFunction, FunctionError> {
        JsFunction::load_with_fetch(code, limits, None)
    }

    /// Load `code` with `fetch` defined over `fetcher` (when given).
    pub fn load_with_fetch(code: &str, limits: Limits, fetcher: Option<Arc<dyn Fetch>>) -> Result<JsFunction, FunctionError> {
        let engine = Engine::build(code, &limits, fetcher.as_ref())?;
        let has_batch = engine.defines("onBatch", &limits);
        if !has_batch && !HANDLERS.iter().any(|(_, h)| engine.defines(h, &limits)) {
            return Err(FunctionError::Load("no handler: define onTrack, onIdentify, onPage, onScreen, onGroup, onAlias or onBatch".into()));
        }
        Ok(JsFunction { code: code.to_owned(), limits, fetcher, engine: Some(engine), has_batch })
    }

    /// Whether the function defines `onBatch`.
    pub fn has_batch(&self) -> bool {
        self.has_batch
    }

    fn engine(&mut self) -> Result<&Engine, (ErrorClass, String)> {
        if self.engine.is_none() {
            self.engine = Some(Engine::build(&self.code, &self.limits, self.fetcher.as_ref()).map_err(|e| (ErrorClass::Failed, e.to_string()))?);
        }
        Ok(self.engine.as_ref().expect("built above"))
    }

    fn call_runner(&mut self, handler: &str, arg: &str, settings: &str) -> Result<String, (ErrorClass, String)> {
        let limits = self.limits;
        let out = self.engine()?.run(handler, arg, settings, &limits);
        if let Err((ErrorClass::Timeout | ErrorClass::OutOfMemory, _)) = &out {
            // Whatever the stopped call left behind goes with its engine.
            self.engine = None;
        }
        out
    }

    /// Run the handler of `event`'s type.
    pub fn call(&mut self, event: &Value, settings: &Value) -> FunctionOutcome {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let Some((_, handler)) = HANDLERS.iter().find(|(t, _)| *t == kind) else { return FunctionOutcome::Event(event.clone()) };
        match self.call_runner(handler, &event.to_string(), &settings.to_string()) {
            // An array is what `onBatch` returns, not an event.
            Ok(answer) => match decode(&answer, event) {
                FunctionOutcome::Event(Value::Array(_)) => {
                    FunctionOutcome::Error { class: ErrorClass::Failed, message: "the handler returned an array, not an event object".into() }
                }
                other => other,
            },
            Err((class, message)) => FunctionOutcome::Error { class, message },
        }
    }

    /// Run `onBatch` on `events` (it must be defined): the events it returns
    /// are kept, the others dropped. Outcomes are per input event, matched by
    /// `messageId`; a returned event without a known `messageId` fails the batch.
    pub fn call_batch(&mut self, events: &[Value], settings: &Value) -> Vec<FunctionOutcome> {
        let arg = Value::Array(events.to_vec()).to_string();
        let fail = |class, message: String| events.iter().map(|_| FunctionOutcome::Error { class, message: message.clone() }).collect();
        let answer = match self.call_runner("onBatch", &arg, &settings.to_string()) {
            Ok(a) => a,
            Err((class, message)) => return fail(class, message),
        };
        let kept = match decode(&answer, &Value::Null) {
            FunctionOutcome::Event(Value::Array(kept)) => kept,
            FunctionOutcome::Event(_) => return fail(ErrorClass::Failed, "onBatch must return an array of events".into()),
            FunctionOutcome::Drop { reason } => return events.iter().map(|_| FunctionOutcome::Drop { reason: reason.clone() }).collect(),
            FunctionOutcome::Error { class, message } => return fail(class, message),
        };
        let mut by_id: std::collections::HashMap<&str, Value> = std::collections::HashMap::new();
        for e in &kept {
            match e.get("messageId").and_then(Value::as_str) {
                Some(id) if events.iter().any(|x| x.get("messageId").and_then(Value::as_str) == Some(id)) => {
                    by_id.insert(id, e.clone());
                }
                _ => return fail(ErrorClass::Failed, "onBatch returned an event whose messageId is not one of the batch's".into()),
            }
        }
        events
            .iter()
            .map(|e| match e.get("messageId").and_then(Value::as_str).and_then(|id| by_id.remove(id)) {
                Some(kept) => FunctionOutcome::Event(kept),
                None => FunctionOutcome::Drop { reason: "not returned by onBatch".into() },
            })
            .collect()
    }
}

/// The runner's answer: `P` (no handler), `D` (dropped), `E<json>` (an event), `X<json>` (thrown).
fn decode(answer: &str, event: &Value) -> FunctionOutcome {
    let (tag, rest) = answer.split_at(answer.len().min(1));
    match tag {
        "P" => FunctionOutcome::Event(event.clone()),
        "D" => FunctionOutcome::Drop { reason: "the handler returned null".into() },
        "E" => match serde_json::from_str::<Value>(rest) {
            Ok(v) if v.is_object() || v.is_array() => FunctionOutcome::Event(v),
            Ok(_) => {
                FunctionOutcome::Error { class: ErrorClass::Failed, message: "the handler returned something that is not an event object".into() }
            }
            Err(e) => FunctionOutcome::Error { class: ErrorClass::Failed, message: format!("the handler's result is not JSON: {e}") },
        },
        "X" => {
            let v: Value = serde_json::from_str(rest).unwrap_or(Value::Null);
            let message = cut(v["message"].as_str().unwrap_or(""));
            match v["class"].as_str() {
                Some("drop") => FunctionOutcome::Drop { reason: message },
                Some("retry") => FunctionOutcome::Error { class: ErrorClass::Retry, message },
                Some("validation") => FunctionOutcome::Error { class: ErrorClass::Validation, message },
                _ if message.contains("out of memory") => FunctionOutcome::Error { class: ErrorClass::OutOfMemory, message },
                _ => FunctionOutcome::Error { class: ErrorClass::Failed, message },
            }
        }
        _ => FunctionOutcome::Error { class: ErrorClass::Failed, message: "the function's runner was replaced".into() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn load(code: &str) -> JsFunction {
        JsFunction::load(code, Limits::default()).unwrap()
    }

    /// Answers by URL: `/slow` after 150 ms, `/refused` and `/down` fail, anything else echoes the request.
    struct FakeFetch;

    impl Fetch for FakeFetch {
        fn fetch(&self, r: FetchRequest) -> Result<crate::fetch::FetchResponse, FetchFailure> {
            match r.url.as_str() {
                "http://x/refused" => Err(FetchFailure::Refused("refused by the SSRF guard".into())),
                "http://x/down" => Err(FetchFailure::Unanswered("connection refused".into())),
                url => {
                    if url == "http://x/slow" {
                        std::thread::sleep(Duration::from_millis(150));
                    }
                    let body = json!({"method": r.method, "headers": r.headers, "body": r.body}).to_string();
                    Ok(crate::fetch::FetchResponse { status: 201, headers: vec![("X-Echo".into(), "yes".into())], body })
                }
            }
        }
    }

    /// The red team's ways around the sandbox's bounds (session 15), each ending in its class.
    #[test]
    fn promise_floods_getters_and_replaced_globals_do_not_escape_the_bounds() {
        let limits = Limits { time_per_call: Duration::from_millis(50), ..Limits::default() };
        // A chain of promise jobs, each queueing the next before the interrupt can stop it.
        let flood = r#"
async function onTrack(e) {
  let tick = 0; const N = 8, beat = new Array(N).fill(0), jobs = [];
  for (let i = 0; i < N; i++) jobs[i] = () => {
    queueMicrotask(jobs[i]); beat[i] = ++tick;
    for (let j = 0; j < N; j++) if (tick - beat[j] > 200) { beat[j] = tick; queueMicrotask(jobs[j]); }
    for (let k = 0; k < 2000; k++) {}
  };
  for (let i = 0; i < N; i++) queueMicrotask(jobs[i]);
  await new Promise(() => {});
}
async function onIdentify(e) { return e; }"#;
        let mut f = JsFunction::load(flood, limits).unwrap();
        for _ in 0..3 {
            let out = f.call(&json!({"type": "track"}), &json!({}));
            assert!(matches!(&out, FunctionOutcome::Error { class: ErrorClass::Timeout, .. }), "{out:?}");
            assert!(matches!(f.call(&json!({"type": "identify"}), &json!({})), FunctionOutcome::Event(_)), "the next call is fine");
        }
        // A getter on a handler's name runs only inside a call, never unbounded while loading.
        let getter = r#"Object.defineProperty(globalThis, "onBatch", { get() { while (true) {} } }); async function onTrack(e) { return e; }"#;
        let mut g = JsFunction::load(getter, limits).unwrap();
        assert!(matches!(g.call(&json!({"type": "track"}), &json!({})), FunctionOutcome::Event(_)));
        // A getter on Object.prototype's `value` does not run in the handler lookup (and would be bounded).
        let proto = r#"Object.defineProperty(globalThis, "onBatch", { get() { return undefined; } });
Object.defineProperty(Object.prototype, "value", { get() { while (true) {} } });
async function onTrack(e) { return e; }"#;
        let p = JsFunction::load(proto, limits);
        assert!(p.as_ref().is_ok_and(|p| !p.has_batch()), "{:?}", p.as_ref().err());
        // Code that loops while loading (only where `fetch` exists) fails to load, in time.
        let stealth = r#"if (typeof fetch === "function") { while (true) {} } async function onTrack(e) { return e; }"#;
        let e = JsFunction::load_with_fetch(stealth, limits, Some(Arc::new(FakeFetch))).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("ran past"), "{e}");
        // Replacing the runner, the classes or instanceof changes no outcome.
        let tamper = r#"
globalThis.__sluice_runner = async () => "E[1]";
try { RetryError = class {}; } catch (_) {}
Object.defineProperty(Error, Symbol.hasInstance, { value: () => true });
async function onTrack(e) { if (e.properties.fail) throw new Error("plain"); return [1, 2]; }
async function onIdentify(e) { throw new RetryError("later"); }"#;
        let mut t = JsFunction::load(tamper, limits).unwrap();
        let failed = t.call(&json!({"type": "track", "properties": {"fail": true}}), &json!({}));
        assert!(matches!(&failed, FunctionOutcome::Error { class: ErrorClass::Failed, message } if message == "plain"), "{failed:?}");
        let array = t.call(&json!({"type": "track", "properties": {}}), &json!({}));
        assert!(matches!(&array, FunctionOutcome::Error { class: ErrorClass::Failed, message } if message.contains("array")), "{array:?}");
        assert!(matches!(t.call(&json!({"type": "identify"}), &json!({})), FunctionOutcome::Error { class: ErrorClass::Retry, .. }));
    }

    #[test]
    fn fetch_answers_refuses_retries_and_is_bounded() {
        let code = r#"
async function onTrack(e) {
  const p = e.properties;
  const r = await fetch(p.url, {method: "POST", headers: {"X-Key": "k"}, body: JSON.stringify({sku: p.sku})});
  const echo = await r.json();
  p.status = r.status; p.ok = r.ok; p.echo = r.headers.get("x-echo"); p.seen = echo;
  for (let i = 0; i < (p.more || 0); i++) await fetch("http://x/again");
  return e;
}"#;
        let limits = Limits { time_per_call: Duration::from_millis(100), ..Limits::default() };
        let mut f = JsFunction::load_with_fetch(code, limits, Some(Arc::new(FakeFetch))).unwrap();
        let event = |url: &str, more: u32| json!({"type": "track", "properties": {"url": url, "sku": "a", "more": more}});
        let FunctionOutcome::Event(out) = f.call(&event("http://x/echo", 0), &json!({})) else { panic!() };
        let p = &out["properties"];
        assert_eq!((p["status"].as_u64(), p["ok"].as_bool(), p["echo"].as_str()), (Some(201), Some(true), Some("yes")), "{p}");
        assert_eq!(p["seen"], json!({"method": "POST", "headers": [["X-Key", "k"]], "body": "{\"sku\":\"a\"}"}));
        // Waiting for an answer is not the function's CPU time: 150 ms against a 100 ms budget is no timeout.
        assert!(matches!(f.call(&event("http://x/slow", 0), &json!({})), FunctionOutcome::Event(_)));
        let refused = f.call(&event("http://x/refused", 0), &json!({}));
        assert!(matches!(&refused, FunctionOutcome::Error { class: ErrorClass::Failed, message } if message.contains("SSRF")), "{refused:?}");
        let down = f.call(&event("http://x/down", 0), &json!({}));
        assert!(matches!(&down, FunctionOutcome::Error { class: ErrorClass::Retry, .. }), "{down:?}");
        // Five requests per call; the count starts again with each call.
        assert!(matches!(f.call(&event("http://x/echo", 4), &json!({})), FunctionOutcome::Event(_)));
        let sixth = f.call(&event("http://x/echo", 5), &json!({}));
        assert!(matches!(&sixth, FunctionOutcome::Error { class: ErrorClass::Failed, message } if message.contains("more than 5")), "{sixth:?}");
        // Without a fetcher, `fetch` is not defined.
        let mut bare = load(code);
        assert!(matches!(bare.call(&event("http://x/echo", 0), &json!({})), FunctionOutcome::Error { class: ErrorClass::Failed, .. }));
    }

    fn track() -> Value {
        json!({"type": "track", "event": "Order Completed", "messageId": "m1", "properties": {"price": 9, "sku": "a"}})
    }

    #[test]
    fn a_handler_changes_the_event() {
        let mut f = load("async function onTrack(event, settings) { event.properties.cost = event.properties.price; delete event.properties.price; event.properties.tag = settings.tag; return event; }");
        let FunctionOutcome::Event(out) = f.call(&track(), &json!({"tag": "x"})) else { panic!() };
        assert_eq!(out["properties"], json!({"cost": 9, "sku": "a", "tag": "x"}));
    }

    #[test]
    fn every_handler_is_called_for_its_type_and_a_missing_one_passes_the_event() {
        let code = ["onTrack", "onIdentify", "onPage", "onScreen", "onGroup", "onAlias"]
            .iter()
            .map(|h| format!("async function {h}(e) {{ e.handled = \"{h}\"; return e; }}"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut f = load(&code);
        for (t, h) in HANDLERS {
            let FunctionOutcome::Event(out) = f.call(&json!({"type": t, "messageId": "m"}), &json!({})) else { panic!("{t}") };
            assert_eq!(out["handled"], h);
        }
        let mut only_track = load("async function onTrack(e) { return null; }");
        let identify = json!({"type": "identify", "userId": "u"});
        assert_eq!(only_track.call(&identify, &json!({})), FunctionOutcome::Event(identify));
    }

    #[test]
    fn null_nothing_and_drop_event_drop_and_the_error_classes_are_told_apart() {
        for code in [
            "async function onTrack(e) { return null; }",
            "async function onTrack(e) { }",
            "async function onTrack(e) { throw new DropEvent('no'); }",
        ] {
            assert!(matches!(load(code).call(&track(), &json!({})), FunctionOutcome::Drop { .. }), "{code}");
        }
        for (code, class) in [
            ("async function onTrack(e) { throw new RetryError('later'); }", ErrorClass::Retry),
            ("async function onTrack(e) { throw new ValidationError('bad sku'); }", ErrorClass::Validation),
            ("async function onTrack(e) { throw new Error('bug'); }", ErrorClass::Failed),
            ("async function onTrack(e) { return e.no.such; }", ErrorClass::Failed),
            ("async function onTrack(e) { return 5; }", ErrorClass::Failed),
        ] {
            match load(code).call(&track(), &json!({})) {
                FunctionOutcome::Error { class: c, message } => {
                    assert_eq!(c, class, "{code}: {message}");
                    assert!(!message.is_empty());
                }
                other => panic!("{code}: {other:?}"),
            }
        }
        assert!(
            ErrorClass::Retry.retried() && !ErrorClass::Validation.retried() && ErrorClass::Timeout.retried() && !ErrorClass::OutOfMemory.retried()
        );
    }

    #[test]
    fn an_endless_loop_and_a_memory_hog_are_cut_off_and_the_next_call_works() {
        let mut f = load(
            "async function onTrack(e) { if (e.properties.mode === 'loop') { while (true) {} } \
             if (e.properties.mode === 'hog') { const a = []; while (true) { a.push('x'.repeat(1e5)); } } return e; }",
        );
        let call = |f: &mut JsFunction, mode: &str| f.call(&json!({"type": "track", "messageId": "m", "properties": {"mode": mode}}), &json!({}));
        assert!(matches!(call(&mut f, "loop"), FunctionOutcome::Error { class: ErrorClass::Timeout, .. }));
        assert!(matches!(call(&mut f, "ok"), FunctionOutcome::Event(_)), "the next event is not harmed");
        // The hog runs under a generous time budget, so a loaded machine
        // cannot turn its out-of-memory into a timeout (CI saw exactly that).
        let mut hog = JsFunction::load(
            "async function onTrack(e) { if (e.properties.mode === 'hog') { const a = []; while (true) { a.push('x'.repeat(4e6)); } } return e; }",
            Limits { time_per_call: Duration::from_secs(30), ..Limits::default() },
        )
        .unwrap();
        let outcome = call(&mut hog, "hog");
        assert!(matches!(outcome, FunctionOutcome::Error { class: ErrorClass::OutOfMemory, .. }), "{outcome:?}");
        assert!(matches!(call(&mut hog, "ok"), FunctionOutcome::Event(_)));
        assert!(matches!(call(&mut f, "ok"), FunctionOutcome::Event(_)));
        // Loading is bounded too.
        assert!(matches!(JsFunction::load("while (true) {}", Limits::default()), Err(FunctionError::Load(_))));
        // A handler that waits on a promise nothing will settle fails, it does not hang.
        let mut waits = load("async function onTrack(e) { await new Promise(() => {}); return e; }");
        assert!(matches!(waits.call(&track(), &json!({})), FunctionOutcome::Error { class: ErrorClass::Failed, .. }));
    }

    #[test]
    fn the_sandbox_has_no_io_and_globals_do_not_break_the_runner() {
        let mut f = load(
            "async function onTrack(e) { e.seen = [typeof fetch, typeof require, typeof process, typeof setTimeout, typeof std, typeof os]; \
             JSON = null; return e; }",
        );
        let FunctionOutcome::Event(out) = f.call(&track(), &json!({})) else { panic!() };
        assert_eq!(out["seen"], json!(["undefined", "undefined", "undefined", "undefined", "undefined", "undefined"]));
        assert!(matches!(f.call(&track(), &json!({})), FunctionOutcome::Event(_)), "the function broke its own JSON, not the runner's");
        assert!(matches!(JsFunction::load("let x = 1;", Limits::default()), Err(FunctionError::Load(_))), "no handler");
        assert!(matches!(JsFunction::load("function (", Limits::default()), Err(FunctionError::Load(_))), "a syntax error");
    }

    #[test]
    fn on_batch_keeps_what_it_returns() {
        let mut f = load(
            "async function onBatch(events, settings) { return events.filter(e => e.properties.keep).map(e => { e.batched = true; return e; }); }",
        );
        assert!(f.has_batch());
        let events = vec![
            json!({"type": "track", "messageId": "a", "properties": {"keep": true}}),
            json!({"type": "track", "messageId": "b", "properties": {"keep": false}}),
        ];
        let out = f.call_batch(&events, &json!({}));
        assert!(matches!(&out[0], FunctionOutcome::Event(e) if e["batched"] == true));
        assert!(matches!(&out[1], FunctionOutcome::Drop { .. }));
        let mut liar = load("async function onBatch(events) { return [{messageId: 'zzz'}]; }");
        assert!(liar.call_batch(&events, &json!({})).iter().all(|o| matches!(o, FunctionOutcome::Error { .. })));
    }
}

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

use rquickjs::{CatchResultExt, CaughtError, Context, Function, Promise, Runtime};
use serde_json::Value;

use crate::fetch::{Fetch, FetchFailure, FetchRequest, MAX_FETCHES_PER_CALL, MAX_FETCH_BODY};

/// What a function may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// CPU (wall) time one call may take.
    pub time_per_call: Duration,
    /// Memory the function's engine may hold, its code and data included.
    pub memory_bytes: usize,
    pub stack_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { time_per_call: Duration::from_millis(100), memory_bytes: 32 << 20, stack_bytes: 512 << 10 }
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

/// Defined before the function's code: Segment's error classes, and the
/// runner, which keeps its own references to `JSON` and the handlers' names.
const PRELUDE: &str = r#"
class DropEvent extends Error { constructor(m) { super(m); this.name = "DropEvent"; } }
class RetryError extends Error { constructor(m) { super(m); this.name = "RetryError"; } }
class ValidationError extends Error { constructor(m) { super(m); this.name = "ValidationError"; } }
class EventNotSupported extends Error { constructor(m) { super(m); this.name = "EventNotSupported"; } }
globalThis.DropEvent = DropEvent; globalThis.RetryError = RetryError;
globalThis.ValidationError = ValidationError; globalThis.EventNotSupported = EventNotSupported;
globalThis.__sluice_runner = (() => {
  const parse = JSON.parse, stringify = JSON.stringify, G = globalThis;
  const classOf = (e) => (e instanceof DropEvent || e instanceof EventNotSupported) ? "drop"
    : e instanceof RetryError ? "retry" : e instanceof ValidationError ? "validation" : "failed";
  const messageOf = (e) => { try { return String(e && e.message !== undefined ? e.message : e); } catch (_) { return "(unprintable)"; } };
  return async (handler, eventJson, settingsJson) => {
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
})();
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
    /// Held for the engine's life: its memory limit and interrupt handler live there.
    _runtime: Runtime,
    context: Context,
    /// When the running call must stop (ms since `epoch`; 0: no call running).
    deadline_ms: Arc<AtomicU64>,
    epoch: Instant,
    /// Requests made by the running call.
    fetches: Arc<AtomicU32>,
}

/// The host side of `fetch`: bounded, and its wait moves the call's deadline.
fn host_fetch(fetcher: &Arc<dyn Fetch>, deadline: &AtomicU64, fetches: &AtomicU32, request: FetchRequest) -> String {
    let answer = |v: Value| v.to_string();
    if fetches.fetch_add(1, Ordering::Relaxed) >= MAX_FETCHES_PER_CALL {
        return answer(serde_json::json!({"refused": format!("more than {MAX_FETCHES_PER_CALL} requests in one call")}));
    }
    if request.body.as_ref().is_some_and(|b| b.len() > MAX_FETCH_BODY) {
        return answer(serde_json::json!({"refused": format!("a request body over {MAX_FETCH_BODY} bytes")}));
    }
    let started = Instant::now();
    let result = fetcher.fetch(request);
    // The wait is not the function's CPU: it does not count against the call's budget.
    let waited = started.elapsed().as_millis() as u64;
    let _ = deadline.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| (d != 0).then(|| d.saturating_add(waited)));
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
        let (deadline_ms, epoch) = (Arc::new(AtomicU64::new(0)), Instant::now());
        {
            let (deadline, epoch) = (deadline_ms.clone(), epoch);
            runtime.set_interrupt_handler(Some(Box::new(move || {
                let d = deadline.load(Ordering::Relaxed);
                d != 0 && epoch.elapsed().as_millis() as u64 >= d
            })));
        }
        let context = Context::full(&runtime).map_err(|e| FunctionError::Engine(e.to_string()))?;
        let engine = Engine { _runtime: runtime, context, deadline_ms, epoch, fetches: Arc::new(AtomicU32::new(0)) };
        // Loading the code is a call like any other: bounded in time.
        engine.arm(limits.time_per_call);
        let loaded = engine.context.with(|ctx| -> Result<(), String> {
            ctx.eval::<(), _>(PRELUDE).catch(&ctx).map_err(|e| format!("prelude: {e}"))?;
            if let Some(fetcher) = fetcher {
                let (fetcher, deadline, fetches) = (fetcher.clone(), engine.deadline_ms.clone(), engine.fetches.clone());
                let host = Function::new(ctx.clone(), move |url: String, method: String, headers: String, body: Option<String>| {
                    let headers: Vec<(String, String)> = serde_json::from_str(&headers).unwrap_or_default();
                    host_fetch(&fetcher, &deadline, &fetches, FetchRequest { url, method, headers, body })
                })
                .map_err(|e| format!("prelude: {e}"))?;
                ctx.globals().set("__sluice_fetch", host).map_err(|e| format!("prelude: {e}"))?;
                ctx.eval::<(), _>(FETCH_PRELUDE).catch(&ctx).map_err(|e| format!("prelude: {e}"))?;
            }
            ctx.eval::<(), _>(code).catch(&ctx).map_err(|e| describe(&e))?;
            Ok(())
        });
        engine.disarm();
        loaded.map_err(FunctionError::Load)?;
        Ok(engine)
    }

    fn arm(&self, budget: Duration) {
        self.fetches.store(0, Ordering::Relaxed);
        let at = self.epoch.elapsed() + budget;
        self.deadline_ms.store((at.as_millis() as u64).max(1), Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.deadline_ms.store(0, Ordering::Relaxed);
    }

    fn timed_out(&self) -> bool {
        let d = self.deadline_ms.load(Ordering::Relaxed);
        d != 0 && self.epoch.elapsed().as_millis() as u64 >= d
    }

    /// Run `handler` on one JSON argument; the runner's answer (see PRELUDE), or how it broke.
    fn run(&self, handler: &str, arg_json: &str, settings_json: &str, limits: &Limits) -> Result<String, (ErrorClass, String)> {
        self.arm(limits.time_per_call);
        let out = self.context.with(|ctx| -> Result<String, (ErrorClass, String)> {
            let runner: Function = ctx.globals().get("__sluice_runner").map_err(|e| (ErrorClass::Failed, e.to_string()))?;
            let promise: Promise = runner.call((handler, arg_json, settings_json)).catch(&ctx).map_err(|e| (ErrorClass::Failed, describe(&e)))?;
            promise.finish::<String>().catch(&ctx).map_err(|e| (ErrorClass::Failed, describe(&e)))
        });
        let timed_out = self.timed_out();
        self.disarm();
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
        let defined = |name: &str| engine.context.with(|ctx| ctx.globals().get::<_, Function>(name).is_ok());
        let has_batch = defined("onBatch");
        if !has_batch && !HANDLERS.iter().any(|(_, h)| defined(h)) {
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
            Ok(answer) => decode(&answer, event),
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
        assert!(matches!(call(&mut f, "hog"), FunctionOutcome::Error { class: ErrorClass::OutOfMemory, .. }), "{:?}", call(&mut f, "hog"));
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

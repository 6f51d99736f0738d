//! Filter conditions (`sluice_core::filter`): `Condition::parse` on any
//! text, then evaluation on a fixed Segment event and on an event made of
//! the rest of the input.
//!
//! Input: the condition's text, a NUL byte, then JSON for the second event
//! (ignored unless it parses). Everything runs on one worker thread with a
//! 256 KiB stack (the module's own tests use the same), so recursion that
//! parsing does not bound shows as a stack overflow. Checked: no panic, no
//! overflow; a parsed condition is at most `2 * MAX_DEPTH + 3` levels deep
//! (the bound the module documents); `Debug`, `Clone` and `PartialEq` of it
//! work and a clone evaluates the same.

#![no_main]

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use sluice_core::filter::{Condition, MAX_DEPTH};

type Job = (Vec<u8>, mpsc::SyncSender<()>);

fn worker() -> &'static Mutex<mpsc::SyncSender<Job>> {
    static W: OnceLock<Mutex<mpsc::SyncSender<Job>>> = OnceLock::new();
    W.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<Job>(0);
        std::thread::Builder::new()
            .name("filter-fuzz".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let fixed = fixed_event();
                for (data, done) in rx {
                    check(&data, &fixed);
                    let _ = done.send(());
                }
            })
            .expect("worker thread");
        Mutex::new(tx)
    })
}

fn fixed_event() -> Value {
    json!({
        "type": "track",
        "event": "Order Completed",
        "userId": "user-1",
        "anonymousId": null,
        "messageId": "m-1",
        "properties": {"plan": "pro", "revenue": 12.5, "count": 3, "tags": ["a", "b", 1, 2.0, true, null], "nested": {"deep": {"x": "y"}}},
        "context": {"library": {"name": "analytics.js", "version": "4.1.0"}, "ip": "1.2.3.4"},
        "integrations": {"All": true, "Mixpanel": false},
        "timestamp": "2024-05-01T12:00:00.000Z"
    })
}

fn depth(c: &Condition) -> usize {
    1 + match c {
        Condition::And(v) | Condition::Or(v) => v.iter().map(depth).max().unwrap_or(0),
        Condition::Not(c) => depth(c),
        _ => 0,
    }
}

fn check(data: &[u8], fixed: &Value) {
    let (text, rest) = sluice_fuzz::split(data, 0);
    let text = String::from_utf8_lossy(text);
    let Ok(cond) = Condition::parse(&text) else { return };
    assert!(depth(&cond) <= 2 * MAX_DEPTH + 3, "parsed condition is {} levels deep", depth(&cond));
    let copy = cond.clone();
    assert_eq!(copy, cond);
    let _ = format!("{cond:?}");
    let a = cond.matches(fixed);
    assert_eq!(copy.matches(fixed), a);
    if let Ok(event) = serde_json::from_slice::<Value>(rest) {
        let b = cond.matches(&event);
        assert_eq!(copy.matches(&event), b);
    }
}

fuzz_target!(|data: &[u8]| {
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    worker().lock().unwrap_or_else(|e| e.into_inner()).send((data.to_vec(), done_tx)).expect("worker alive");
    done_rx.recv().expect("worker finished the input");
});

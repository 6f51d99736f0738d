//! `sluice bench migrate`: moving a big workspace between cells under live
//! traffic (issue 15's benchmark).
//!
//! Real processes, as an operator runs them: a control plane (`sluice
//! control`, SQLite global store), two embedded cells (`sluice serve` with
//! `[cell]`, durable acks) and a `sluice router`. This process is the load
//! generator and the operator:
//! 1. *Fill*: `--keys` events with unique messageIds go straight to cell a
//!    for workspace `big` (small events, batches of 500), and the bench waits
//!    until a's dedup has indexed them: `big` then holds that many dedup keys.
//! 2. *Before*: through the router, `big` gets `--rate` events/s and two
//!    other workspaces (`calm-a` on cell a, `calm-b` on cell b) `--calm-rate`
//!    each, for `--baseline` seconds: their request latencies are the
//!    "before" figures.
//! 3. *Move*: the same traffic goes on while `big` moves from a to b in one
//!    step (`POST /api/migrations`). Reported: keys copied per second (the
//!    snapshot: keys durable on the target, from the start to the snapshot's
//!    end), the phases' times, the pause `big`'s clients saw (latency of its
//!    requests during the move, and of those in flight across the cutover:
//!    they wait at the router, they must not fail), and the calm workspaces'
//!    p99 during the move against before.
//!
//! `big` has no destination: the benchmark measures the move, not delivery
//! (the calm workspaces neither; their acks are what is measured).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::bench::machine_description;
use crate::bench_deliver::spawn_ready;

#[derive(Args, Clone)]
pub struct MigrateBench {
    /// Dedup keys the moving workspace holds before the move (the issue's figure is 10 million).
    #[arg(long, default_value_t = 10_000_000)]
    keys: u64,
    /// Events/s the moving workspace sends during the move, through the router.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Events/s of each of the two other workspaces.
    #[arg(long, default_value_t = 500)]
    calm_rate: u64,
    /// Seconds of traffic measured before the move starts.
    #[arg(long, default_value_t = 20)]
    baseline: u64,
    /// The migration's `copy_rate`: the most keys per second its snapshot copies (default: no limit).
    #[arg(long)]
    copy_rate: Option<u64>,
    /// Seconds of a second window without a move, after the baseline: the
    /// others' p99 in it against before is the measure's own noise.
    #[arg(long, default_value_t = 0)]
    quiet: u64,
    /// Give up on the move after this many seconds.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
}

/// The control plane's operator token in the run.
const TOKEN: &str = "bench-migrate-token";

/// A running process of the run, stopped (TERM, then KILL) when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn addr(ready: &Value, field: &str) -> Result<SocketAddr> {
    ready[field].as_str().unwrap_or("").parse().with_context(|| format!("the ready line's {field}: {ready}"))
}

struct Control {
    base: String,
    http: reqwest::blocking::Client,
}

impl Control {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self.http.request(method.parse()?, format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let v: Value = resp.json().unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{method} {path}: {status} {v}");
        }
        Ok(v)
    }
}

/// One request's outcome: when it was sent (since the run's start), how long it took, whether it was acknowledged.
#[derive(Clone, Copy)]
struct Sample {
    sent: Duration,
    took: Duration,
    ok: bool,
}

/// Paced traffic of one workspace: `connections` keep-alive connections,
/// each sending a batch of `batch` new events every `every`; samples kept.
struct Paced {
    samples: Arc<Mutex<Vec<Sample>>>,
}

fn auth(key: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{key}:")))
}

fn track(id: &str) -> String {
    format!(r#"{{"type":"track","event":"Bench Move","userId":"u","messageId":"{id}","properties":{{"n":1}}}}"#)
}

fn body(ids: impl Iterator<Item = String>) -> Bytes {
    let events: Vec<String> = ids.map(|id| track(&id)).collect();
    Bytes::from(format!(r#"{{"batch":[{}]}}"#, events.join(",")))
}

/// POST `body` as `/v1/batch`; true on 200.
async fn post(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, auth: &str, body: Bytes) -> Result<bool> {
    let req = Request::post("/v1/batch")
        .header(header::HOST, "127.0.0.1")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, auth)
        .body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status() == StatusCode::OK;
    resp.into_body().collect().await?;
    Ok(ok)
}

async fn connect(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

impl Paced {
    #[allow(clippy::too_many_arguments)]
    fn start(rt: &tokio::runtime::Runtime, addr: SocketAddr, key: &str, prefix: &str, rate: u64, start: Instant, stop: Arc<AtomicBool>) -> Paced {
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        // Batches of 50 (the SDKs' size under load), 10 connections; fewer, smaller batches for small rates.
        let batch = (rate / 100).clamp(1, 50);
        let connections = 10u64;
        let every = Duration::from_secs_f64(batch as f64 * connections as f64 / rate.max(1) as f64);
        for c in 0..connections {
            let (samples, stop, auth, prefix) = (samples.clone(), stop.clone(), auth(key), format!("{prefix}-{c}"));
            rt.spawn(async move {
                let mut sender = None;
                let mut n = 0u64;
                let mut next = Instant::now() + every.mul_f64(c as f64 / connections as f64);
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(next.into()).await;
                    next += every;
                    let b = body((0..batch).map(|i| format!("{prefix}-{}", n * batch + i)));
                    n += 1;
                    let sent = Instant::now();
                    let ok = async {
                        if sender.is_none() {
                            sender = Some(connect(addr).await?);
                        }
                        post(sender.as_mut().expect("connected"), &auth, b).await
                    }
                    .await;
                    let ok = match ok {
                        Ok(ok) => ok,
                        Err(_) => {
                            sender = None;
                            false
                        }
                    };
                    samples.lock().expect("samples").push(Sample { sent: sent - start, took: sent.elapsed(), ok });
                }
            });
        }
        Paced { samples }
    }

    fn between(&self, from: Duration, to: Duration) -> Vec<Sample> {
        self.samples.lock().expect("samples").iter().filter(|s| s.sent >= from && s.sent < to).copied().collect()
    }
}

fn percentile_ms(samples: &[Sample], p: f64) -> f64 {
    let mut v: Vec<Duration> = samples.iter().filter(|s| s.ok).map(|s| s.took).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

/// A counter or gauge's value summed over its series, from a `/metrics` page.
fn metric(http: &reqwest::blocking::Client, admin: SocketAddr, name: &str) -> Result<f64> {
    let text = http.get(format!("http://{admin}/metrics")).send()?.text()?;
    Ok(sluice_core::metrics::parse_text(&text).iter().filter(|s| s.name == name).map(|s| s.value).sum())
}

/// Fill: `keys` unique events straight to the cell at `addr`, as fast as it takes them.
async fn fill(addr: SocketAddr, key: &str, keys: u64) -> Result<()> {
    const BATCH: u64 = 500;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (next, auth) = (next.clone(), auth(key));
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await?;
            loop {
                let from = next.fetch_add(BATCH, Ordering::Relaxed);
                if from >= keys {
                    return anyhow::Ok(());
                }
                let b = body((from..(from + BATCH).min(keys)).map(|i| format!("fill-{i}")));
                let mut tries = 0;
                while !post(&mut sender, &auth, b.clone()).await? {
                    tries += 1;
                    if tries > 50 {
                        bail!("the cell keeps refusing the fill");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

pub fn bench_migrate(args: MigrateBench) -> Result<()> {
    if args.keys == 0 || args.rate == 0 || args.calm_rate == 0 {
        bail!("--keys, --rate and --calm-rate must be at least 1");
    }
    println!("{}", machine_description());
    println!(
        "workload: a control plane, two embedded cells and a router (real processes); workspace `big` holds {} dedup keys and sends {} events/s \
         through the router while it moves from cell a to cell b in one step; `calm-a` (cell a) and `calm-b` (cell b) send {} events/s each",
        args.keys, args.rate, args.calm_rate
    );
    let dir = tempfile::Builder::new().prefix("sluice-bench-migrate-").tempdir()?;
    let store = dir.path().join("global.sqlite").display().to_string();
    let store_env = [("SLUICE_GLOBAL_STORE", store.as_str())];
    let control_config = dir.path().join("control.toml");
    std::fs::write(
        &control_config,
        format!(
            "[control]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\nscrape_interval = \"2s\"\n\
             [control.thresholds.smb]\nworkspaces = 100\ncpu = 1.0\nconsumer_lag = \"1h\"\ndb_connections = 1.0\ningest_p99 = \"1h\"\n"
        ),
    )?;
    let (child, ready) = spawn_ready(&["control".as_ref(), "--config".as_ref(), control_config.as_os_str()], &store_env)?;
    let _control = Proc(child);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let cp = Control { base: format!("http://{}", addr(&ready, "listen")?), http: http.clone() };

    // The cells: registered, given their tokens, started, then given their real addresses.
    let mut cells = Vec::new();
    for id in ["a", "b"] {
        cp.call("PUT", &format!("/api/cells/{id}"), Some(json!({"tier": "smb", "ingest_url": "http://127.0.0.1:9", "state": "provisioning"})))?;
        let token = cp.call("POST", &format!("/api/cells/{id}/token"), None)?["token"].as_str().unwrap_or_default().to_owned();
        let config = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ntrusted_proxies = [\"127.0.0.1\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [cell]\nid = \"{id}\"\ncontrol_url = \"{}\"\ntoken = \"{token}\"\n",
                dir.path().join(id).display(),
                cp.base
            ),
        )?;
        let (child, ready) = spawn_ready(&["serve".as_ref(), "--config".as_ref(), config.as_os_str()], &[])?;
        let (ingest, admin) = (addr(&ready, "listen")?, addr(&ready, "admin")?);
        cp.call(
            "PUT",
            &format!("/api/cells/{id}"),
            Some(json!({"tier": "smb", "ingest_url": format!("http://{ingest}"), "admin_url": format!("http://{admin}")})),
        )?;
        cells.push((Proc(child), ingest, admin));
    }
    let (a_ingest, a_admin, b_admin) = (cells[0].1, cells[0].2, cells[1].2);
    let router_config = dir.path().join("router.toml");
    std::fs::write(&router_config, "[router]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n")?;
    let (child, ready) = spawn_ready(&["router".as_ref(), "--config".as_ref(), router_config.as_os_str()], &store_env)?;
    let _router = Proc(child);
    let router = addr(&ready, "listen")?;

    let mut keys = std::collections::HashMap::new();
    for (ws, cell) in [("big", "a"), ("calm-a", "a"), ("calm-b", "b")] {
        cp.call("PUT", &format!("/api/workspaces/{ws}"), Some(json!({"tier": "smb"})))?;
        cp.call("PUT", &format!("/api/workspaces/{ws}/override"), Some(json!({"cell": cell})))?;
        let made = cp.call("POST", &format!("/api/workspaces/{ws}/sources"), Some(json!({"id": format!("{ws}-web")})))?;
        keys.insert(ws, made["write_key"].as_str().unwrap_or_default().to_owned());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The cells learn their workspaces from their feed: wait until a takes big's key.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rt.block_on(async {
        let mut s = connect(a_ingest).await?;
        post(&mut s, &auth(&keys["big"]), body(std::iter::once("probe-0".to_owned()))).await
    })? {
        if Instant::now() > deadline {
            bail!("cell a did not take workspace big's key within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // 1. Fill.
    let t = Instant::now();
    rt.block_on(fill(a_ingest, &keys["big"], args.keys))?;
    let fill_secs = t.elapsed().as_secs_f64();
    println!("fill: {} events into cell a in {fill_secs:.1} s ({:.0} events/s)", args.keys, args.keys as f64 / fill_secs);
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while metric(&http, a_admin, "sluice_dedup_messages_in_total")? < (args.keys + 1) as f64 {
        if Instant::now() > deadline {
            bail!("cell a's dedup did not index the fill within --timeout");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let indexed_secs = t.elapsed().as_secs_f64();
    println!("fill indexed by cell a's dedup after {indexed_secs:.1} s");

    // 2. Before.
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let big = Paced::start(&rt, router, &keys["big"], "live", args.rate, start, stop.clone());
    let calm_a = Paced::start(&rt, router, &keys["calm-a"], "calm-a", args.calm_rate, start, stop.clone());
    let calm_b = Paced::start(&rt, router, &keys["calm-b"], "calm-b", args.calm_rate, start, stop.clone());
    std::thread::sleep(Duration::from_secs(2 + args.baseline));
    let (before_from, before_to) = (Duration::from_secs(2), start.elapsed());
    if args.quiet > 0 {
        std::thread::sleep(Duration::from_secs(args.quiet));
        let quiet_to = start.elapsed();
        for (name, p) in [("calm-a (cell a)", &calm_a), ("calm-b (cell b)", &calm_b)] {
            let (before, quiet) = (p.between(before_from, before_to), p.between(before_to, quiet_to));
            let (b99, q99) = (percentile_ms(&before, 0.99), percentile_ms(&quiet, 0.99));
            println!(
                "{name}: p99 before {b99:.2} ms, in {}s more without a move {q99:.2} ms: ratio {:.2} (the measure's noise)",
                args.quiet,
                q99 / b99
            );
        }
    }

    // 3. The move.
    let moved_at = start.elapsed();
    let mut start_body = json!({"workspace": "big", "to": "b"});
    if let Some(rate) = args.copy_rate {
        start_body["copy_rate"] = json!(rate);
    }
    let m = cp.call("POST", "/api/migrations", Some(start_body))?;
    let id = m["id"].as_str().context("the migration's id")?.to_owned();
    let mut phases: Vec<(String, Duration)> = vec![("copying".into(), moved_at)];
    let mut snapshot: Option<(Duration, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let last = loop {
        let m = cp.call("GET", &format!("/api/migrations/{id}"), None)?;
        let now = start.elapsed();
        let phase = m["phase"].as_str().unwrap_or("").to_owned();
        if phases.last().is_some_and(|(p, _)| *p != phase) {
            phases.push((phase.clone(), now));
        }
        if snapshot.is_none() && m["progress"]["source"]["snapshot_done"] == true {
            snapshot = Some((now, m["keys_copied"].as_u64().unwrap_or(0)));
        }
        if phase == "done" || phase == "aborted" {
            break m;
        }
        if Instant::now() > deadline {
            bail!("the move did not finish within --timeout: {m}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let done_at = start.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    if last["phase"] != "done" {
        bail!("the migration ended {}: {last}", last["phase"]);
    }
    // When b's dedup had indexed the keys (they ride its input like events).
    let b_in = metric(&http, b_admin, "sluice_dedup_messages_in_total")?;

    let (snap_at, snap_keys) = snapshot.context("the snapshot's end was not seen")?;
    let copy_secs = (snap_at - moved_at).as_secs_f64();
    let keys_per_sec = snap_keys as f64 / copy_secs;
    let at = |p: &str| phases.iter().find(|(q, _)| q == p).map(|(_, t)| *t);
    let cutover = (at("cutover"), at("draining").or(at("cleanup")).or(at("done")));
    println!();
    println!("phases (seconds since the move started):");
    for (p, t) in &phases {
        println!("  {p:<10} at {:>8.2}", (*t - moved_at).as_secs_f64());
    }
    println!(
        "snapshot: {snap_keys} keys durable on cell b in {copy_secs:.1} s: {keys_per_sec:.0} keys/s (goal >= 200000); \
         keys copied in all (snapshot + tail): {}; cell b's dedup took in {b_in:.0} records",
        last["keys_copied"]
    );
    let moving = big.between(moved_at, done_at);
    let failed = moving.iter().filter(|s| !s.ok).count();
    let in_cutover: Vec<Sample> = match cutover {
        (Some(from), Some(to)) => moving.iter().filter(|s| s.sent + s.took >= from && s.sent <= to).copied().collect(),
        _ => Vec::new(),
    };
    let pause_p99 = percentile_ms(&moving, 0.99);
    let pause_max = moving.iter().map(|s| s.took).max().unwrap_or_default().as_secs_f64() * 1000.0;
    println!(
        "big's requests during the move: {} ({} failed); p50 {:.1} ms, p99 {pause_p99:.1} ms (goal < 1000), max {pause_max:.1} ms; \
         {} in flight across the cutover, their max {:.1} ms",
        moving.len(),
        failed,
        percentile_ms(&moving, 0.5),
        in_cutover.len(),
        in_cutover.iter().map(|s| s.took).max().unwrap_or_default().as_secs_f64() * 1000.0
    );
    // The others' figure is taken while the keys are copied: from the cutover on, `big`'s own traffic
    // goes to cell b, which then carries more load whatever the move costs.
    let copy_end = cutover.0.unwrap_or(done_at);
    let mut others = Vec::new();
    for (name, p) in [("calm-a (cell a)", &calm_a), ("calm-b (cell b)", &calm_b)] {
        let (before, during, after) = (p.between(before_from, before_to), p.between(moved_at, copy_end), p.between(copy_end, done_at));
        let (b99, d99) = (percentile_ms(&before, 0.99), percentile_ms(&during, 0.99));
        let bad = before.iter().chain(&during).chain(&after).filter(|s| !s.ok).count();
        println!(
            "{name}: p99 before {b99:.2} ms ({} requests), during the copy {d99:.2} ms ({} requests): ratio {:.2} (goal <= 1.10); \
             from the cutover to the end {:.2} ms ({} requests); {bad} failed",
            before.len(),
            during.len(),
            d99 / b99,
            percentile_ms(&after, 0.99),
            after.len()
        );
        others.push((d99 / b99, bad));
    }
    let worst = others.iter().map(|(r, _)| *r).fold(0.0, f64::max);
    println!(
        "RESULT bench=migrate keys={} keys_per_sec={keys_per_sec:.0} big_p99_ms={pause_p99:.1} big_max_ms={pause_max:.1} big_failed={failed} \
         others_p99_ratio={worst:.2} move_secs={:.1} copy_rate={}",
        args.keys,
        (done_at - moved_at).as_secs_f64(),
        args.copy_rate.map_or_else(|| "unlimited".to_owned(), |r| r.to_string())
    );
    let other_failed: usize = others.iter().map(|(_, b)| b).sum();
    if failed > 0 || other_failed > 0 {
        bail!("requests failed during the benchmark: {failed} of the moving workspace's, {other_failed} of the others'");
    }
    Ok(())
}

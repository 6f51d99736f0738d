//! `sluice bench router`: the cost of the cell router (issue 14, point 8).
//!
//! Real processes, as users run them: one cell (`sluice serve`, embedded
//! log, durable acks) and one `sluice router` in front of it, with the
//! global store given by `--store` (a fresh SQLite file by default;
//! PostgreSQL or MySQL for the decision-latency targets). This process is
//! the load generator: `bench ingest`'s load (keep-alive connections,
//! `/v1/batch`, batches of ~300-byte events, HTTP Basic auth as the SDKs
//! send it), alternately straight to the cell and through the router, in
//! the same run. Reported:
//! - events/s of both paths and their ratio (the target is ≥ 0.8);
//! - the router's decision latency by path, read from its own histogram
//!   (`sluice_router_decision_seconds`, buckets 25% apart; a p99 is the
//!   upper bound of the bucket that holds it): cache hits during the load,
//!   then `--probes` new workspaces placed one request each (`new`), then
//!   the same workspaces again after a mapping change emptied the cache
//!   (`miss`);
//! - the cache hit ratio during the load (steady state).
//!
//! The store rows are the run's own (ids carry a nonce; the cell carries
//! the attribute `bench_run = <nonce>` and every workspace the same
//! constraint), so a shared store's other cells take none of them. The
//! write key `wk_bench` is re-pointed at the run's workspace: give a
//! store of its own, never a production one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::http::{header, Request, StatusCode};
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use sluice_cells::{Cell, CellState, GlobalStore, Tier, Workspace};
use sluice_core::metrics::{parse_text, Buckets, Sample};

use crate::bench::{load, machine_description, make_bodies, LoadArgs, Stats, WRITE_KEY};
use crate::bench_deliver::spawn_ready;

#[derive(Args, Clone)]
pub struct RouterBench {
    #[command(flatten)]
    load: LoadArgs,
    /// Phases per path (direct, router, direct, router, …); the medians are compared.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// New workspaces placed (and then looked up again after a mapping
    /// change): a p99 from 1,000 is the 10th worst, steadier than from a few hundred.
    #[arg(long, default_value_t = 1000)]
    probes: usize,
    /// Requests at once for the probes (each a workspace's first request, then a cache miss).
    #[arg(long, default_value_t = 4)]
    probe_concurrency: usize,
    /// The global store (default: a fresh SQLite file); a PostgreSQL or
    /// MySQL URL of a database of its own, for the latency targets.
    #[arg(long, env = "SLUICE_BENCH_STORE")]
    store: Option<String>,
}

pub fn bench_router(args: RouterBench) -> Result<()> {
    if args.rounds == 0 || args.probes == 0 || args.probe_concurrency == 0 {
        bail!("--rounds, --probes and --probe-concurrency must be at least 1");
    }
    println!("{}", machine_description());
    let dir = tempfile::Builder::new().prefix("sluice-bench-router-").tempdir()?;
    let store_location = args.store.clone().unwrap_or_else(|| dir.path().join("global.sqlite").display().to_string());
    let nonce = format!("{}x{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() % 1_000_000_000);
    let probe_key = |i: usize| format!("wk_probe_{nonce}_{i}");

    // The cell: every key of the run is one of its sources; the router's address is trusted;
    // its id confirms it to the router (an answer without it is not relayed).
    let cell_config = dir.path().join("cell.toml");
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ntrusted_proxies = [\"127.0.0.1\"]\n[admin]\nlisten = \"\"\n\
         [cell]\nid = \"bench-{nonce}\"\n[[sources]]\nid = \"bench\"\nwrite_key = \"{WRITE_KEY}\"\n",
        dir.path().join("cell").display()
    );
    for i in 0..args.probes {
        toml.push_str(&format!("[[sources]]\nid = \"probe-{nonce}-{i}\"\nwrite_key = \"{}\"\n", probe_key(i)));
    }
    std::fs::write(&cell_config, toml)?;
    let (mut cell, ready) = spawn_ready(&["serve".as_ref(), "--config".as_ref(), cell_config.as_os_str()], &[])?;
    let cell_addr: SocketAddr = ready["listen"].as_str().unwrap_or("").parse().context("the cell's address")?;

    let outcome = (|| -> Result<Outcome> {
        let store = GlobalStore::open(&store_location).with_context(|| format!("cannot open the store {}", sluice_sql::redact(&store_location)))?;
        let cell_id = format!("bench-{nonce}");
        let run = BTreeMap::from([("bench_run".to_owned(), nonce.clone())]);
        store.put_cell(&Cell {
            id: cell_id.clone(),
            tier: Tier::Smb,
            ingest_url: format!("http://{cell_addr}"),
            admin_url: String::new(),
            state: CellState::Active,
            attributes: run.clone(),
        })?;
        let workspace = |id: String| Workspace { id, name: String::new(), tier: Tier::Smb, constraints: run.clone(), disabled: false };
        store.put_workspace(&workspace(format!("bench-{nonce}")))?;
        store.remove_write_key(WRITE_KEY)?;
        store.add_write_key(WRITE_KEY, &format!("bench-{nonce}"), "bench")?;
        for i in 0..args.probes {
            store.put_workspace(&workspace(format!("bench-{nonce}-p{i}")))?;
            // Source ids are unique in a store: the run's own.
            store.add_write_key(&probe_key(i), &format!("bench-{nonce}-p{i}"), &format!("probe-{nonce}-{i}"))?;
        }
        let router_config = dir.path().join("router.toml");
        std::fs::write(&router_config, "[router]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n")?;
        let (mut router, ready) =
            spawn_ready(&["router".as_ref(), "--config".as_ref(), router_config.as_os_str()], &[("SLUICE_GLOBAL_STORE", store_location.as_str())])?;
        let router_addr: SocketAddr = ready["listen"].as_str().unwrap_or("").parse().context("the router's address")?;
        let admin_addr: SocketAddr = ready["admin"].as_str().unwrap_or("").parse().context("the router's admin address")?;
        let result = measure(&args, &store, cell_addr, router_addr, admin_addr, &probe_key, &format!("bench-{nonce}-p0"), &cell_id);
        let _ = std::process::Command::new("kill").args(["-TERM", &router.id().to_string()]).status();
        let _ = router.wait();
        // Out of the way of later runs on the same store.
        let _ = store.set_cell_state(&cell_id, CellState::Retired);
        result
    })();
    let _ = std::process::Command::new("kill").args(["-TERM", &cell.id().to_string()]).status();
    let _ = cell.wait();
    let mut o = outcome?;

    let median = |v: &[Stats]| -> f64 {
        let mut r: Vec<f64> = v.iter().map(Stats::events_per_sec).collect();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    let (direct, routed) = (median(&o.direct), median(&o.routed));
    if direct == 0.0 || routed == 0.0 {
        bail!("a phase completed no request in its measured window; is the machine overloaded?");
    }
    let ratio = routed / direct;
    println!();
    println!("{:<40} {:>12} {:>10} {:>10} {:>8}", "phase", "events/s", "p50 ms", "p99 ms", "errors");
    for (i, (d, r)) in o.direct.iter_mut().zip(o.routed.iter_mut()).enumerate() {
        for (name, s) in [(format!("round {}: straight to the cell", i + 1), d), (format!("round {}: through the router", i + 1), r)] {
            let (p50, p99) = (s.percentile_ms(0.5), s.percentile_ms(0.99));
            println!("{:<40} {:>12.0} {:>10.2} {:>10.2} {:>8}", name, s.events_per_sec(), p50, p99, s.errors);
        }
    }
    println!();
    println!("ratio router/direct (medians): {ratio:.3}  (target >= 0.8)");
    println!("cache hit ratio under load: {:.4} ({} hits of {} decisions; target >= 0.99)", o.hit_ratio, o.load_hits, o.load_decisions);
    println!("routing decision p99 (bucket upper bound), store {}:", store_kind(&store_location));
    for (path, target_us, d) in [("hit", 50.0, &o.hit), ("miss", 2000.0, &o.miss), ("new", 5000.0, &o.new)] {
        println!(
            "  {path:<5} p50 <= {:>9.1} us  p99 <= {:>9.1} us  ({} decisions; target p99 <= {target_us} us)",
            quantile_us(d, 0.5),
            quantile_us(d, 0.99),
            d.count()
        );
    }
    println!(
        "RESULT bench=router direct_events_per_sec={direct:.0} routed_events_per_sec={routed:.0} ratio={ratio:.3} hit_ratio={:.4} \
         hit_p99_us={:.1} miss_p99_us={:.1} new_p99_us={:.1} store={}",
        o.hit_ratio,
        quantile_us(&o.hit, 0.99),
        quantile_us(&o.miss, 0.99),
        quantile_us(&o.new, 0.99),
        store_kind(&store_location)
    );
    let errors: u64 = o.direct.iter().chain(&o.routed).map(|s| s.errors).sum();
    if errors > 0 || o.probe_failures > 0 {
        bail!("requests failed during the benchmark: {errors} in the load, {} probes", o.probe_failures);
    }
    Ok(())
}

fn store_kind(location: &str) -> &'static str {
    match location.split_once("://").map(|(s, _)| s) {
        Some("postgres" | "postgresql") => "postgresql",
        Some("mysql" | "mariadb") => "mysql",
        _ => "sqlite",
    }
}

struct Outcome {
    direct: Vec<Stats>,
    routed: Vec<Stats>,
    load_hits: u64,
    load_decisions: u64,
    hit_ratio: f64,
    hit: Buckets,
    miss: Buckets,
    new: Buckets,
    probe_failures: u64,
}

#[allow(clippy::too_many_arguments)]
fn measure(
    args: &RouterBench,
    store: &GlobalStore,
    cell: SocketAddr,
    router: SocketAddr,
    admin: SocketAddr,
    probe_key: &dyn Fn(usize) -> String,
    probe_workspace: &str,
    cell_id: &str,
) -> Result<Outcome> {
    let load_args = args.load.standard();
    let bodies = Arc::new(make_bodies(&load_args));
    println!(
        "workload: one cell (`sluice serve`, embedded log, fsync) and one `sluice router` (store: {}); {} connections, batches of 100 x ~300 B, \
         HTTP Basic auth; {} round(s) of {}s measured per path after {}s warm-up; then {} new workspaces, {} at once",
        store_kind(&store.location()),
        args.load.connections,
        args.rounds,
        args.load.seconds,
        args.load.warmup,
        args.probes,
        args.probe_concurrency
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (mut direct, mut routed) = (Vec::new(), Vec::new());
    let (mut load_hits, mut load_decisions) = (0, 0);
    let mut hit = Buckets::default();
    for _ in 0..args.rounds {
        direct.push(rt.block_on(load(cell, &load_args, &bodies))?);
        let before = rt.block_on(scrape(admin))?;
        routed.push(rt.block_on(load(router, &load_args, &bodies))?);
        let after = rt.block_on(scrape(admin))?;
        let decided = |path: &str| after.decisions(path) - before.decisions(path);
        load_hits += decided("hit");
        load_decisions += ["hit", "miss", "new", "unknown", "busy"].iter().map(|p| decided(p)).sum::<u64>();
        add(&mut hit, &after.histogram("hit").minus(&before.histogram("hit")));
    }

    // New workspaces: each probe key's first request places its workspace.
    let body = Bytes::from(r#"{"batch":[{"type":"track","event":"Probe","userId":"u"}]}"#);
    let before = rt.block_on(scrape(admin))?;
    let mut probe_failures = rt.block_on(probe(router, args, probe_key, &body))?;
    let after_new = rt.block_on(scrape(admin))?;
    let new = after_new.histogram("new").minus(&before.histogram("new"));

    // A mapping change empties the cache; the same keys again are misses.
    let version = {
        store.set_override(probe_workspace, cell_id, "bench: a mapping change")?;
        store.clear_override(probe_workspace)?;
        store.mapping_version()?
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.block_on(health_version(admin))? < version as u64 {
        if Instant::now() > deadline {
            bail!("the router did not follow the mapping change within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = rt.block_on(scrape(admin))?;
    probe_failures += rt.block_on(probe(router, args, probe_key, &body))?;
    let after = rt.block_on(scrape(admin))?;
    let miss = after.histogram("miss").minus(&before.histogram("miss"));
    Ok(Outcome {
        direct,
        routed,
        load_hits,
        load_decisions,
        hit_ratio: if load_decisions == 0 { 0.0 } else { load_hits as f64 / load_decisions as f64 },
        hit,
        miss,
        new,
        probe_failures,
    })
}

/// One request per probe key through the router, `probe_concurrency` at
/// once; the requests not answered 200.
async fn probe(router: SocketAddr, args: &RouterBench, probe_key: &dyn Fn(usize) -> String, body: &Bytes) -> Result<u64> {
    let keys: Vec<String> = (0..args.probes).map(probe_key).collect();
    let chunks: Vec<Vec<String>> = keys.chunks(args.probes.div_ceil(args.probe_concurrency)).map(<[String]>::to_vec).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(router).await?;
            let mut failed = 0;
            for key in chunk {
                let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{key}:")));
                let req = Request::post("/v1/batch")
                    .header(header::HOST, "127.0.0.1")
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::AUTHORIZATION, auth)
                    .body(Full::new(body.clone()))?;
                let resp = sender.send_request(req).await?;
                if resp.status() != StatusCode::OK {
                    failed += 1;
                }
                resp.into_body().collect().await?;
            }
            anyhow::Ok(failed)
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await??;
    }
    Ok(failed)
}

async fn connect<B>(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut sender = connect::<Empty<Bytes>>(addr).await?;
    let resp = sender.send_request(Request::get(path).header(header::HOST, "127.0.0.1").body(Empty::new())?).await?;
    let status = resp.status();
    let text = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    if status != StatusCode::OK {
        bail!("GET {path} on the router's admin port: {status}: {text}");
    }
    Ok(text)
}

async fn health_version(admin: SocketAddr) -> Result<u64> {
    let health: serde_json::Value = serde_json::from_str(&get(admin, "/healthz").await?)?;
    health["mapping_version"].as_u64().context("/healthz without mapping_version")
}

async fn scrape(admin: SocketAddr) -> Result<Scrape> {
    Ok(Scrape::parse(&get(admin, "/metrics").await?))
}

/// The router's decision metrics, from one `/metrics` text.
struct Scrape(Vec<Sample>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        Scrape(parse_text(text))
    }

    fn decisions(&self, path: &str) -> u64 {
        self.0.iter().find(|s| s.name == "sluice_router_decisions_total" && s.label("path") == Some(path)).map_or(0, |s| s.value as u64)
    }

    fn histogram(&self, path: &str) -> Buckets {
        Buckets::of(&self.0, "sluice_router_decision_seconds", &[("path", path)])
    }
}

/// The upper bound (µs) of the bucket holding quantile `q`; NaN when empty.
fn quantile_us(b: &Buckets, q: f64) -> f64 {
    b.quantile(q).map_or(f64::NAN, |s| s * 1e6)
}

/// `a` + `b`, bucket by bucket (the same histogram scraped in two windows).
fn add(a: &mut Buckets, b: &Buckets) {
    if a.0.is_empty() {
        *a = b.clone();
        return;
    }
    for (mine, theirs) in a.0.iter_mut().zip(&b.0) {
        mine.1 += theirs.1;
    }
}

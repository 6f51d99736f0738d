//! `sluice bench ingest`: the Tracking API under load, against a floor.
//!
//! The load generator speaks `/v1/batch` over keep-alive HTTP/1.1
//! connections with ~300-byte events in batches of 100, like a fleet of
//! server-side SDKs. In the same run it measures a floor: a null server on
//! the same HTTP stack (same accept loop, hyper, axum) that reads the body
//! and answers 200 without parsing or writing. The ratio of the two is the
//! cost of Sluice's own work (parse, validate, normalize, durable append).
//! Server and load generator run in separate runtimes of one process and
//! share the machine's cores, in both phases alike.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sluice_core::config::SourceConfig;
use sluice_ingest::server::{serve, ServeOptions};
use sluice_ingest::{Ingest, IngestSettings, INPUT_TOPIC};
use sluice_log::{EmbeddedLog, Log, LogOptions};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Tracking API throughput and ack latency, with a null-server floor.
    Ingest(IngestBench),
    /// The dedup stage on a pre-filled input, with a raw-RocksDB floor.
    Dedup(crate::bench_dedup::DedupBench),
    /// Centrifuge deliveries/s to a local sink across many pairs, with a bare-HTTP-client floor.
    Deliver(crate::bench_deliver::DeliverBench),
    /// `sluice serve` end to end: events/s and ack → sink latency; destinations down on demand.
    E2e(Box<crate::bench_deliver::E2eBench>),
    /// Dropping a JobDB file against DELETE of the same rows.
    Cleanup(crate::bench_deliver::CleanupBench),
    /// A `sluice serve` process under legitimate load, clean and then with
    /// 50 clients sending hostile requests at full speed.
    Hostile(crate::bench_hostile::HostileBench),
    /// The cell router: the ingest load through a `sluice router` against straight to the cell, and its decision latencies.
    Router(crate::bench_router::RouterBench),
    /// Moving a workspace holding millions of dedup keys between cells under live traffic.
    Migrate(crate::bench_migrate::MigrateBench),
}

#[derive(Args, Clone)]
pub struct IngestBench {
    #[command(flatten)]
    pub(crate) load: LoadArgs,
    #[arg(long, default_value_t = 100)]
    pub(crate) batch_size: usize,
    /// Approximate size of one event's JSON.
    #[arg(long, default_value_t = 300)]
    pub(crate) event_bytes: usize,
    #[arg(long, default_value_t = 8)]
    pub(crate) partitions: u32,
    /// Where the log goes (a fresh temporary directory when absent).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Skip fsync (acks are then not durable; for comparison only).
    #[arg(long)]
    pub(crate) no_fsync: bool,
    /// Load an already running server at this address (host:port) with
    /// write key `wk_bench` instead of the in-process phases; no floor.
    #[arg(long)]
    pub(crate) target: Option<String>,
}

pub(crate) const WRITE_KEY: &str = "wk_bench";

/// How long and how wide a load runs: `bench ingest`'s, and that of the
/// benchmarks that aim it at real processes (`bench hostile`, `bench router`).
#[derive(Args, Clone)]
pub struct LoadArgs {
    /// Measured seconds per phase (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Warm-up seconds per phase, not measured.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: u64,
    /// Keep-alive connections (of the legitimate load, under `bench hostile`).
    #[arg(long, default_value_t = 32)]
    pub(crate) connections: usize,
}

impl LoadArgs {
    /// `bench ingest`'s load with its defaults (batches of 100 events of ~300 bytes).
    pub(crate) fn standard(&self) -> IngestBench {
        IngestBench { load: self.clone(), batch_size: 100, event_bytes: 300, partitions: 8, data_dir: None, no_fsync: false, target: None }
    }
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Ingest(args) => bench_ingest(args),
        BenchCommand::Dedup(args) => crate::bench_dedup::bench_dedup(args),
        BenchCommand::Deliver(args) => crate::bench_deliver::bench_deliver(args),
        BenchCommand::E2e(args) => crate::bench_deliver::bench_e2e(*args),
        BenchCommand::Cleanup(args) => crate::bench_deliver::bench_cleanup(args),
        BenchCommand::Hostile(args) => crate::bench_hostile::bench_hostile(args),
        BenchCommand::Router(args) => crate::bench_router::bench_router(args),
        BenchCommand::Migrate(args) => crate::bench_migrate::bench_migrate(args),
    }
}

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) requests: u64,
    pub(crate) events: u64,
    /// Events acknowledged over the whole run, warm-up included.
    pub(crate) events_acked_all: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
    latencies_us: Vec<u32>,
}

impl Stats {
    pub(crate) fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

fn bench_ingest(args: IngestBench) -> Result<()> {
    let bodies = Arc::new(make_bodies(&args));
    let body_bytes: usize = bodies.iter().map(Bytes::len).sum::<usize>() / bodies.len();
    println!("{}", machine_description());
    println!(
        "workload: {} connections, batches of {} events of ~{} bytes ({} bytes per request), {}s measured after {}s warm-up",
        args.load.connections, args.batch_size, args.event_bytes, body_bytes, args.load.seconds, args.load.warmup
    );

    let server_rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("server").build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("client").build()?;
    if let Some(target) = &args.target {
        let addr = tokio::net::lookup_host(target.as_str());
        let addr = client_rt.block_on(addr)?.next().context("--target does not resolve")?;
        let mut s = client_rt.block_on(load(addr, &args, &bodies))?;
        let (p50, p99) = (s.percentile_ms(0.5), s.percentile_ms(0.99));
        println!("RESULT bench=ingest target={target} events_per_sec={:.0} p50_ms={p50:.2} p99_ms={p99:.2} errors={}", s.events_per_sec(), s.errors);
        return Ok(());
    }

    // Floor: the same server stack, reading the body and answering 200.
    let floor_bytes = Arc::new(AtomicU64::new(0));
    let counter = floor_bytes.clone();
    let null_app = Router::new().fallback(move |body: Body| {
        let counter = counter.clone();
        async move {
            let n = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
            counter.fetch_add(n as u64, Ordering::Relaxed);
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"success":true}"#)
        }
    });
    let mut floor = phase(&server_rt, &client_rt, null_app, &args, &bodies)?;
    let floor_read = floor_bytes.load(Ordering::Relaxed);

    // Sluice: the Tracking API with durable appends to the embedded log.
    let tmp;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("sluice-bench-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let options = LogOptions { topics: vec![(INPUT_TOPIC.into(), args.partitions)], fsync: !args.no_fsync, ..LogOptions::default() };
    let log = Arc::new(EmbeddedLog::open(&data_dir.join("log"), options).context("opening the benchmark log")?);
    let settings = IngestSettings::from_config(&sluice_core::Config::default());
    let source =
        SourceConfig { id: "bench".into(), write_key: WRITE_KEY.into(), rate_limit: None, rate_burst: None, workspace: None, function: None };
    let ingest = Arc::new(Ingest::new(log.clone() as Arc<dyn Log>, settings, &[source], 0)?);
    let mut sluice = phase(&server_rt, &client_rt, sluice_ingest::router(ingest.clone()), &args, &bodies)?;
    let stored: u64 = (0..args.partitions).map(|p| log.offsets_blocking(INPUT_TOPIC, p).map(|r| r.end - r.start)).sum::<Result<u64, _>>()?;

    if floor.events == 0 || sluice.events == 0 {
        bail!(
            "a phase completed no request in its measured window (floor {} events, sluice {}); is the machine overloaded?",
            floor.events,
            sluice.events
        );
    }
    let ratio = sluice.events_per_sec() / floor.events_per_sec();
    println!();
    println!("{:<34} {:>12} {:>10} {:>10} {:>8}", "phase", "events/s", "p50 ms", "p99 ms", "errors");
    for (name, s) in [("floor (null server, same stack)", &mut floor), (durability_label(&args), &mut sluice)] {
        let (p50, p99) = (s.percentile_ms(0.5), s.percentile_ms(0.99));
        println!("{:<34} {:>12.0} {:>10.2} {:>10.2} {:>8}", name, s.events_per_sec(), p50, p99, s.errors);
    }
    println!();
    println!("ratio sluice/floor: {ratio:.3}");
    println!("events stored in the log (warm-up included): {stored}");
    println!(
        "floor server read {:.0} MB of request bodies (warm-up included): {:.0} MB/s",
        floor_read as f64 / 1e6,
        floor_read as f64 / 1e6 / (args.load.seconds + args.load.warmup) as f64
    );
    println!(
        "RESULT bench=ingest events_per_sec={:.0} p50_ms={:.2} p99_ms={:.2} floor_events_per_sec={:.0} ratio={:.3} fsync={}",
        sluice.events_per_sec(),
        sluice.percentile_ms(0.5),
        sluice.percentile_ms(0.99),
        floor.events_per_sec(),
        ratio,
        !args.no_fsync
    );
    if sluice.errors > 0 || floor.errors > 0 {
        bail!("requests failed during the benchmark: sluice {}, floor {}", sluice.errors, floor.errors);
    }
    Ok(())
}

fn durability_label(args: &IngestBench) -> &'static str {
    if args.no_fsync {
        "sluice (no fsync)"
    } else {
        "sluice (durable acks, fsync)"
    }
}

/// Distinct request bodies; each event carries a unique messageId.
pub(crate) fn make_bodies(args: &IngestBench) -> Vec<Bytes> {
    let nonce = std::process::id();
    (0..64)
        .map(|b| {
            let events: Vec<serde_json::Value> = (0..args.batch_size)
                .map(|i| {
                    let mut ev = serde_json::json!({
                        "type": "track",
                        "event": "Order Completed",
                        "userId": format!("user-{}", (b * 7919 + i) % 100_000),
                        "messageId": format!("bench-{nonce}-{b}-{i}"),
                        "timestamp": "2026-11-26T10:00:00.000Z",
                        "context": {"library": {"name": "sluice-bench", "version": "1"}},
                        "properties": {"orderId": format!("o-{b}-{i}"), "total": 42.5, "currency": "EUR"},
                    });
                    let len = ev.to_string().len();
                    if len < args.event_bytes {
                        ev["properties"]["pad"] = serde_json::Value::String("x".repeat(args.event_bytes - len - 9));
                    }
                    ev
                })
                .collect();
            Bytes::from(serde_json::json!({"batch": events, "sentAt": "2026-11-26T10:00:01.000Z"}).to_string())
        })
        .collect()
}

fn phase(
    server_rt: &tokio::runtime::Runtime,
    client_rt: &tokio::runtime::Runtime,
    app: Router,
    args: &IngestBench,
    bodies: &Arc<Vec<Bytes>>,
) -> Result<Stats> {
    let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server_rt.spawn(serve(listener, app, ServeOptions::default(), async {
        let _ = stop_rx.await;
    }));
    let stats = client_rt.block_on(load(addr, args, bodies))?;
    let _ = stop_tx.send(());
    server_rt.block_on(server)?;
    Ok(stats)
}

/// Drive `addr` with keep-alive connections for warm-up + measured time.
pub(crate) async fn load(addr: std::net::SocketAddr, args: &IngestBench, bodies: &Arc<Vec<Bytes>>) -> Result<Stats> {
    let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:")));
    let warmup = Duration::from_secs(args.load.warmup);
    let measured = Duration::from_secs(args.load.seconds);
    {
        let start = Instant::now();
        let measure_from = start + warmup;
        let deadline = measure_from + measured;
        let mut tasks = Vec::new();
        for c in 0..args.load.connections {
            let bodies = Arc::clone(bodies);
            let auth = auth.clone();
            let batch = args.batch_size as u64;
            tasks.push(tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                let mut s = Stats::default();
                let mut i = c;
                loop {
                    let sent = Instant::now();
                    if sent >= deadline {
                        break;
                    }
                    let req = Request::post("/v1/batch")
                        .header(header::HOST, "127.0.0.1")
                        .header(header::CONTENT_TYPE, "application/json")
                        .header(header::AUTHORIZATION, &auth)
                        .body(Full::new(bodies[i % bodies.len()].clone()))?;
                    i += 1;
                    let resp = sender.send_request(req).await?;
                    let ok = resp.status() == StatusCode::OK;
                    resp.into_body().collect().await?;
                    if ok {
                        s.events_acked_all += batch;
                    }
                    if sent >= measure_from {
                        s.requests += 1;
                        if ok {
                            s.events += batch;
                            s.latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        } else {
                            s.errors += 1;
                        }
                    }
                }
                anyhow::Ok(s)
            }));
        }
        let mut total = Stats { elapsed: measured, ..Stats::default() };
        for t in tasks {
            let s = t.await??;
            total.requests += s.requests;
            total.events += s.events;
            total.events_acked_all += s.events_acked_all;
            total.errors += s.errors;
            total.latencies_us.extend(s.latencies_us);
        }
        Ok(total)
    }
}

pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kb| kb as f64 / 1048576.0)
        .unwrap_or(0.0);
    format!("machine: {cpu}, {cores} cores, {mem_gib:.0} GiB")
}

//! Delivery benchmarks (docs/BENCHMARKS.md):
//!
//! - `sluice bench deliver`: deliveries/s from the Centrifuge (JobDB
//!   inserts, directors, `executing` + outcome rows, HTTP) to a local
//!   keep-alive sink across many (source, destination) pairs, against a
//!   floor: the same HTTP client sending the same requests at the same
//!   concurrency with no JobDB.
//! - `sluice bench e2e`: a `sluice serve` child process fed over HTTP
//!   (batches of 100) and delivering to an in-process sink: events/s, and
//!   p50/p99 from ingest ack to sink receipt; optionally with destinations
//!   down (the noisy-neighbour run) and their recovery.
//! - `sluice bench cleanup`: dropping a JobDB file against DELETE of the same rows.
//!
//! Sink, client and server share the machine's cores in every phase alike.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use sluice_core::Config;
use sluice_deliver::executor::{Executor, Target};
use sluice_deliver::jobdb::JobDb;
use sluice_deliver::ksuid::KsuidGenerator;
use sluice_deliver::sink::{Behaviour, Sink};
use sluice_deliver::store::{JobState, JobStore, NewJob, Transition};
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverMetrics};

use crate::bench::machine_description;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn payload(i: u64, bytes: usize) -> Bytes {
    let pad = "x".repeat(bytes.saturating_sub(220));
    Bytes::from(format!(
        r#"{{"type":"track","event":"Order Completed","messageId":"m-{i}","userId":"user-{u}","properties":{{"total":{i},"pad":"{pad}"}},"timestamp":"2026-11-26T09:00:00.000Z","receivedAt":"2026-11-26T09:00:00.000Z"}}"#,
        u = i % 1000
    ))
}

#[derive(Args, Clone)]
pub struct DeliverBench {
    /// Measured seconds per phase (after the warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// (source, destination) pairs: `destinations` destinations × pairs/destinations sources.
    #[arg(long, default_value_t = 1000)]
    pairs: usize,
    #[arg(long, default_value_t = 10)]
    destinations: usize,
    /// Requests in flight per destination (the floor uses the same total).
    #[arg(long, default_value_t = 32)]
    max_in_flight: usize,
    #[arg(long, default_value_t = 300)]
    event_bytes: usize,
}

pub fn bench_deliver(args: DeliverBench) -> Result<()> {
    println!("{}", machine_description());
    if args.destinations == 0 || args.pairs < args.destinations {
        bail!("--pairs must be at least --destinations (≥ 1)");
    }
    let rt = runtime()?;
    let sink = rt.block_on(Sink::start_on("127.0.0.1:0".parse()?, false, false))?;
    let window = Duration::from_secs(args.seconds);
    let warmup = Duration::from_secs(args.warmup);
    let concurrency = args.destinations * args.max_in_flight;
    println!(
        "{} pairs ({} destinations × {} sources), {} requests in flight per destination, ~{}-byte events",
        args.pairs,
        args.destinations,
        args.pairs / args.destinations,
        args.max_in_flight,
        args.event_bytes
    );

    // Floor: the executor alone, same requests, same concurrency.
    let floor = rt.block_on(async {
        let executor = Executor::new(Duration::from_secs(5))?;
        let sent = Arc::new(AtomicU64::new(0));
        let stop_at = Instant::now() + warmup + window;
        let mut tasks = Vec::new();
        for c in 0..concurrency {
            let (executor, sent) = (executor.clone(), sent.clone());
            let target = Target {
                url: sink.url(&format!("/d{}", c % args.destinations)),
                secret: Some("bench-secret".into()),
                allow_private_network: true,
                request_timeout: Duration::from_secs(10),
            };
            let bytes = args.event_bytes;
            tasks.push(tokio::spawn(async move {
                let mut i = c as u64;
                while Instant::now() < stop_at {
                    let a = executor.send(&target, &format!("m-{i}"), payload(i, bytes)).await;
                    if a.status == Some(200) {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    i += concurrency as u64;
                }
            }));
        }
        tokio::time::sleep(warmup).await;
        let before = sink.count();
        tokio::time::sleep(window).await;
        let n = sink.count() - before;
        for t in tasks {
            let _ = t.await;
        }
        anyhow::Ok(n as f64 / window.as_secs_f64())
    })?;
    println!("floor  (HTTP client alone):       {floor:>10.0} requests/s");

    // Sluice: jobs inserted into the Centrifuge as fast as it drains them.
    let dir = tempfile::tempdir()?;
    let sources = args.pairs / args.destinations;
    let mut toml = format!("[server]\ndata_dir = \"{}\"\n[deliver]\nmax_in_flight = {}\n", dir.path().display(), args.max_in_flight);
    for s in 0..sources {
        toml.push_str(&format!("[[sources]]\nid = \"s{s}\"\nwrite_key = \"k{s}\"\n"));
    }
    for d in 0..args.destinations {
        toml.push_str(&format!(
            "[[destinations]]\nid = \"d{d}\"\nurl = \"{}\"\nsecret = \"bench-secret\"\nallow_private_network = true\n",
            sink.url(&format!("/d{d}"))
        ));
    }
    let config = Config::from_toml_with_env(&toml, "", &HashMap::new())?;
    let (rate, jobdb_bytes) = rt.block_on(async {
        let catalog = Catalog::open(&config)?;
        let metrics = DeliverMetrics::default();
        let centrifuge = Centrifuge::open(CentrifugeOptions::from_config(&config), catalog, metrics.clone()).await?;
        let stop_at = Instant::now() + warmup + window;
        let producer = {
            let (centrifuge, bytes) = (centrifuge.clone(), args.event_bytes);
            let destinations = args.destinations;
            let sink_state = sink.state.clone();
            let _ = sink_state;
            let inserted = metrics.jobs_inserted.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < stop_at {
                    // Keep a backlog of ~20K jobs ahead of the deliveries.
                    let succeeded: u64 = (0..destinations)
                        .map(|d| metrics.outcomes.get_or_create(&vec![("destination", format!("d{d}")), ("outcome", "succeeded".into())]).get())
                        .sum();
                    if inserted.get().saturating_sub(succeeded) > 20_000 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                    let now = sluice_deliver::now_ms();
                    let jobs: Vec<NewJob> = (0..1000)
                        .map(|_| {
                            i += 1;
                            NewJob {
                                message_id: format!("m-{i}"),
                                source: format!("s{}", (i / destinations as u64) % sources as u64),
                                destination: format!("d{}", i % destinations as u64),
                                generation: 0,
                                endpoint: String::new(),
                                payload: payload(i, bytes),
                                created_at: now,
                                expires_at: now + 4 * 3_600_000,
                                received_at: now,
                            }
                        })
                        .collect();
                    centrifuge.insert(jobs, now).await?;
                }
                anyhow::Ok(())
            })
        };
        tokio::time::sleep(warmup).await;
        let before = sink.count();
        tokio::time::sleep(window).await;
        let n = sink.count() - before;
        producer.await??;
        let size: u64 = std::fs::read_dir(dir.path().join("jobs"))?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
        centrifuge.close().await;
        anyhow::Ok((n as f64 / window.as_secs_f64(), size))
    })?;
    println!("sluice (JobDB + directors + HTTP): {rate:>10.0} deliveries/s   (JobDB files at the end: {:.0} MiB)", jobdb_bytes as f64 / 1048576.0);
    println!("ratio sluice/floor: {:.2}   (targets: ≥ 50000 deliveries/s, ratio ≥ 0.5)", rate / floor);
    Ok(())
}

#[derive(Args, Clone)]
pub struct E2eBench {
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Events per second offered; 0 = as fast as the pipeline delivers (closed loop:
    /// senders wait while more than `max_backlog` acked events are not yet delivered).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Closed-loop bound on acked-but-undelivered events (with `--rate 0`).
    #[arg(long, default_value_t = 20_000)]
    max_backlog: u64,
    /// Destinations.
    #[arg(long, default_value_t = 1)]
    destinations: usize,
    /// Connect each source to one destination (source i → destination i mod D)
    /// instead of to every destination.
    #[arg(long)]
    one_each: bool,
    /// How many of them answer 503 during the run (the noisy-neighbour case).
    #[arg(long, default_value_t = 0)]
    down: usize,
    /// After the run, bring the down ones back and time the backlog's drain (seconds allowed).
    #[arg(long, default_value_t = 0)]
    recover_seconds: u64,
    /// The types of the down destinations, in order (`d0`, `d1`, …): a
    /// down `webhook` or `batch_webhook` answers 503, a down `kafka`
    /// names a broker nobody listens on (issue 17: `--down 3 --down-types
    /// webhook,batch_webhook,kafka`). The healthy ones are of
    /// `--destination-type`.
    #[arg(long, value_delimiter = ',', value_name = "TYPE,…", conflicts_with = "recover_seconds", requires = "down")]
    down_types: Vec<String>,
    #[arg(long, default_value_t = 10)]
    sources: usize,
    #[arg(long, default_value_t = 8)]
    connections: usize,
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    #[arg(long, default_value_t = 300)]
    event_bytes: usize,
    /// Keep the log on this Kafka cluster (`host:port`; a fresh one, e.g.
    /// `scripts/kafka.sh start`) instead of the embedded log.
    #[arg(long)]
    kafka: Option<String>,
    /// Keep the JobDBs in this database (`mysql://…` or `postgres://…`, an
    /// empty database) instead of SQLite files.
    #[arg(long)]
    jobdb_url: Option<String>,
    /// A `[log.kafka.primary]` key for the Kafka link, `KEY=VALUE`
    /// (repeatable), e.g. `security_protocol=sasl_ssl`. A SASL password comes
    /// from `SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD`, passed to the server.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    kafka_options: Vec<String>,
    /// Serve the Tracking API over HTTPS with this certificate (PEM; with
    /// `--tls-key` and `--tls-ca`): the load generator speaks TLS to it.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
    /// The CA the load generator checks the server's certificate with.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Run twice in this invocation: without a tracking plan, then with one
    /// of this many track-event schemas on every source (the bench's events
    /// meet theirs); report the ratio of delivered events/s (issue 16).
    #[arg(long, default_value_t = 0)]
    plan_schemas: usize,
    /// Run twice in this invocation: without a function, then with this
    /// destination function on every destination (`rename`: a built-in that
    /// renames two properties; or a JavaScript file); report the ratio of
    /// delivered events/s (issue 16).
    #[arg(long, value_name = "rename|FILE", conflicts_with = "plan_schemas")]
    function: Option<String>,
    /// The destinations' type; several (comma-separated) run one after the
    /// other in this invocation, each reported against the first (issue 17:
    /// `webhook,batch_webhook`).
    #[arg(long, value_delimiter = ',', default_value = "webhook", value_name = "TYPE,…")]
    destination_type: Vec<String>,
    /// `batch_webhook`, `kafka` and `postgres`: events per request
    /// (absent: the type's default, 100, 500 and 5000).
    #[arg(long)]
    batch_max_events: Option<usize>,
    /// `--destination-type kafka`: the Kafka cluster (`host:port`, e.g. from
    /// `scripts/kafka.sh start`) the destinations publish to; a reader in
    /// this process counts what lands in their topics.
    #[arg(long, value_name = "HOST:PORT")]
    kafka_destination: Option<String>,
    /// `--destination-type postgres`: a PostgreSQL server
    /// (`postgres://user@host:port/postgres`, a user that may create
    /// databases, e.g. from `scripts/sql.sh start-postgres`); each
    /// destination loads into a fresh database of its own there.
    #[arg(long, value_name = "URL")]
    postgres_destination: Option<String>,
    /// `--destination-type s3`: an S3-compatible server
    /// (`http://host:port`, e.g. moto: `moto_server -H 127.0.0.1 -p 5000`
    /// from scripts/setup-s3.sh's venv) where this bench makes a bucket;
    /// each destination writes under a prefix of its own there.
    #[arg(long, value_name = "URL")]
    s3_destination: Option<String>,
    /// `--destination-type s3`: the objects' format (`s3_format`).
    #[arg(long, value_name = "FORMAT", default_value = "ndjson", value_parser = ["ndjson", "parquet"])]
    s3_format: String,
}

/// The built-in bench function: renames two properties of every track event.
const RENAME_FUNCTION: &str = r#"async function onTrack(event, settings) {
  const p = event.properties;
  p.amount = p.total; delete p.total;
  p.padding = p.pad; delete p.pad;
  return event;
}"#;

/// What the bench puts on every source or destination before the load.
enum Setup {
    Nothing,
    Plan(serde_json::Value),
    Function(String),
}

/// The admin token of a bench server whose tracking plans the bench sets.
const BENCH_ADMIN_TOKEN: &str = "bench-admin-token-not-secret";

/// A tracking plan of `n` track-event schemas; "Order Completed" (the bench's event) is one of them.
fn bench_plan(n: usize) -> serde_json::Value {
    let mut track = serde_json::Map::new();
    for i in 0..n {
        let name = if i == 0 { "Order Completed".to_owned() } else { format!("Bench Event {i}") };
        track.insert(
            name,
            serde_json::json!({
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "required": ["userId", "messageId"],
                "properties": {
                    "userId": {"type": "string", "maxLength": 200},
                    "properties": {"type": "object", "required": ["pad"], "properties": {"pad": {"type": "string", "pattern": "^x*$"}}}
                }
            }),
        );
    }
    serde_json::json!({"name": "bench", "unplanned": "block", "invalid": "block", "track": track})
}

/// A TOML basic string of `s` (a JSON string is one).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string")
}

/// The load generator's TLS client (it trusts `ca` only), when the server speaks HTTPS.
fn load_tls(args: &E2eBench) -> Result<Option<tokio_rustls::TlsConnector>> {
    let Some(ca) = &args.tls_ca else { return Ok(None) };
    let roots = sluice_ingest::tls::load_roots("--tls-ca", ca)?;
    let config = rustls::ClientConfig::builder_with_provider(sluice_ingest::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}

pub fn bench_e2e(args: E2eBench) -> Result<()> {
    println!("{}", machine_description());
    if let Some(function) = &args.function {
        let code = match function.as_str() {
            "rename" => RENAME_FUNCTION.to_owned(),
            file => std::fs::read_to_string(file).with_context(|| format!("--function {file}"))?,
        };
        println!("--- without a function (the floor) ---");
        let without = e2e_once(&args, Setup::Nothing)?;
        println!("--- with destination function {function:?} on every destination ---");
        let with = e2e_once(&args, Setup::Function(code))?;
        let ratio = with / without.max(1.0);
        println!("destination function: {with:.0} events/s delivered against {without:.0} without: ratio {ratio:.2} (goal >= 0.5)");
        println!("RESULT bench=e2e_function function={function} with={with:.0} without={without:.0} ratio={ratio:.3}");
        return Ok(());
    }
    if args.destination_type.len() > 1 {
        let mut figures = Vec::new();
        for kind in &args.destination_type {
            println!("--- destinations of type {kind} ---");
            let one = E2eBench { destination_type: vec![kind.clone()], ..args.clone() };
            figures.push((kind.clone(), e2e_once(&one, Setup::Nothing)?));
        }
        let (first, floor) = figures[0].clone();
        for (kind, rate) in &figures[1..] {
            let ratio = rate / floor.max(1.0);
            println!("{kind}: {rate:.0} events/s delivered against {first}'s {floor:.0}: ratio {ratio:.2}");
            println!("RESULT bench=e2e_type type={kind} rate={rate:.0} {first}={floor:.0} ratio={ratio:.3}");
        }
        return Ok(());
    }
    if args.plan_schemas == 0 {
        return e2e_once(&args, Setup::Nothing).map(drop);
    }
    println!("--- without a tracking plan (the floor) ---");
    let without = e2e_once(&args, Setup::Nothing)?;
    println!("--- with a tracking plan of {} schemas on every source ---", args.plan_schemas);
    let with = e2e_once(&args, Setup::Plan(bench_plan(args.plan_schemas)))?;
    println!("tracking plan: {with:.0} events/s delivered against {without:.0} without: ratio {:.2} (goal >= 0.8)", with / without.max(1.0));
    println!("RESULT bench=e2e_plan schemas={} with={with:.0} without={without:.0} ratio={:.3}", args.plan_schemas, with / without.max(1.0));
    Ok(())
}

/// One `sluice serve` loaded as `args` say, with `setup` on every source or destination; delivered events/s to a healthy destination.
fn e2e_once(args: &E2eBench, setup: Setup) -> Result<f64> {
    if args.down >= args.destinations {
        bail!("--down must leave at least one healthy destination");
    }
    if args.one_each && args.sources % args.destinations != 0 {
        bail!("--one-each needs --sources to be a multiple of --destinations");
    }
    let rt = runtime()?;
    let sink = rt.block_on(Sink::start_on("127.0.0.1:0".parse()?, false, true))?;
    for d in 0..args.down {
        sink.set(&format!("/d{d}"), Behaviour::status(503));
    }
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("sluice.toml");
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{}[deliver]\nallow_private_network = true\ninitial_backoff = \"1s\"\nmax_backoff = \"30s\"\n",
        dir.path().join("data").display(),
        if !matches!(setup, Setup::Nothing) || args.destination_type.first().is_some_and(|k| k == "postgres" || k == "s3") { format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{BENCH_ADMIN_TOKEN}\"\n") } else { "[admin]\nlisten = \"\"\n".to_owned() }
    );
    if let Some(url) = &args.jobdb_url {
        toml.push_str(&format!("jobdb_url = \"{url}\"\n"));
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        toml = toml.replacen(
            "[server]\n",
            &format!(
                "[server]\ntls_cert_file = {}\ntls_key_file = {}\n",
                toml_string(&cert.display().to_string()),
                toml_string(&key.display().to_string())
            ),
            1,
        );
    }
    if let Some(bootstrap) = &args.kafka {
        toml.push_str(&format!("[log]\nbackend = \"kafka\"\n[log.kafka.primary]\nbootstrap_servers = \"{bootstrap}\"\n"));
        for option in &args.kafka_options {
            let Some((key, value)) = option.split_once('=') else { bail!("--kafka-option {option:?}: use KEY=VALUE") };
            let value = match value {
                "true" | "false" => value.to_owned(),
                _ => toml_string(value),
            };
            toml.push_str(&format!("{} = {value}\n", key.trim()));
        }
    } else if !args.kafka_options.is_empty() {
        bail!("--kafka-option needs --kafka");
    }
    println!(
        "mode: log {}{}, JobDBs {}, Tracking API {}, destinations {}{}",
        args.kafka.as_deref().map_or("embedded".to_owned(), |b| format!("Kafka at {b}")),
        if args.kafka_options.is_empty() { String::new() } else { format!(" ({})", args.kafka_options.join(", ")) },
        args.jobdb_url.as_deref().map_or("SQLite".to_owned(), |u| u.split('@').next_back().unwrap_or(u).to_owned()),
        if args.tls_cert.is_some() { "over HTTPS" } else { "over HTTP" },
        args.destination_type.first().map_or("webhook", String::as_str),
        if args.down_types.is_empty() { String::new() } else { format!(" (down: {})", args.down_types.join(", ")) }
    );
    for s in 0..args.sources {
        toml.push_str(&format!("[[sources]]\nid = \"s{s}\"\nwrite_key = \"wk{s}\"\n"));
    }
    let dests: Vec<String> = (0..args.destinations).map(|d| format!("d{d}")).collect();
    let kind = args.destination_type.first().map_or("webhook", String::as_str);
    // `kafka`: topics of this run's own, read back into the sink's counts.
    let kafka_reader = match (kind, &args.kafka_destination) {
        ("kafka", Some(bootstrap)) => Some(crate::bench_kafka::TopicReader::start(&rt, bootstrap, &dests, &sink)?),
        ("kafka", None) => bail!("--destination-type kafka needs --kafka-destination HOST:PORT (a broker, e.g. from scripts/kafka.sh start)"),
        _ => None,
    };
    // `postgres`: databases of this run's own; loads counted from the server's metrics.
    let healthy: Vec<String> = dests[args.down..].to_vec();
    let mut warehouses = match (kind, &args.postgres_destination) {
        ("postgres", Some(server)) => Some(crate::bench_postgres::Warehouses::create(&rt, server, &healthy)?),
        ("postgres", None) => {
            bail!("--destination-type postgres needs --postgres-destination URL (a server, e.g. from scripts/sql.sh start-postgres)")
        }
        _ => None,
    };
    // `s3`: a bucket of this run's own; writes counted from the server's metrics.
    let mut lake = match (kind, &args.s3_destination) {
        ("s3", Some(endpoint)) => Some(crate::bench_lake::Lake::create(&rt, endpoint, &args.s3_format)?),
        ("s3", None) => bail!("--destination-type s3 needs --s3-destination URL (an S3-compatible server such as moto)"),
        _ => None,
    };
    if args.down_types.len() > args.down {
        bail!("--down-types names {} types for {} down destinations", args.down_types.len(), args.down);
    }
    for (i, d) in dests.iter().enumerate() {
        if let Some(down_kind) = args.down_types.get(i) {
            let url = match down_kind.as_str() {
                "webhook" | "batch_webhook" => sink.url(&format!("/{d}")),
                // Port 9 (discard): nothing listens; the producer retries until `request_timeout`.
                "kafka" => "kafka://127.0.0.1:9/sluice-bench-down".to_owned(),
                // Likewise: the connection is refused, the loads retried.
                "postgres" => "postgres://sluice@127.0.0.1:9/down".to_owned(),
                "s3" => "s3://down/x\"\ns3_endpoint = \"http://127.0.0.1:9".to_owned(),
                other => bail!("--down-types: unknown type {other:?} (webhook, batch_webhook, kafka, postgres, s3)"),
            };
            toml.push_str(&format!("[[destinations]]\nid = \"{d}\"\ntype = \"{down_kind}\"\nurl = \"{url}\"\n"));
            continue;
        }
        match (&kafka_reader, &warehouses) {
            (None, None) if lake.is_some() => {
                let keys = lake.as_ref().map(|l| l.destination_keys(d)).unwrap_or_default();
                toml.push_str(&format!("[[destinations]]\nid = \"{d}\"\ntype = \"s3\"\n{keys}"));
            }
            (Some(reader), _) => toml.push_str(&format!("[[destinations]]\nid = \"{d}\"\ntype = \"kafka\"\nurl = \"{}\"\n", reader.url(d))),
            (None, Some(w)) => toml.push_str(&format!("[[destinations]]\nid = \"{d}\"\ntype = \"postgres\"\nurl = \"{}\"\n", w.url(d))),
            (None, None) => toml.push_str(&format!(
                "[[destinations]]\nid = \"{d}\"\ntype = \"{kind}\"\nurl = \"{}\"\nsecret = \"bench\"\n",
                sink.url(&format!("/{d}"))
            )),
        }
        if kind == "batch_webhook" {
            toml.push_str("batch_max_age = \"100ms\"\n");
        }
        if let Some(n) = args.batch_max_events.filter(|_| kind != "webhook") {
            toml.push_str(&format!("batch_max_events = {n}\n"));
        }
    }
    for s in 0..args.sources {
        let to: Vec<&String> = if args.one_each { vec![&dests[s % dests.len()]] } else { dests.iter().collect() };
        toml.push_str(&format!("[[connections]]\nsource = \"s{s}\"\ndestinations = {to:?}\n"));
    }
    std::fs::write(&config_path, toml)?;
    let env = lake.as_ref().map(|l| l.server_env()).unwrap_or_default();
    let (mut child, ready) = spawn_ready(&["serve".as_ref(), "--config".as_ref(), config_path.as_os_str()], &env)?;
    let addr = ready["listen"].as_str().unwrap_or("").to_owned();
    let pid = child.id();
    let admin = ready["admin"].as_str().unwrap_or("");
    let http = reqwest::blocking::Client::new();
    let put = |path: String, body: &serde_json::Value| -> Result<()> {
        let r = http.put(format!("http://{admin}{path}")).bearer_auth(BENCH_ADMIN_TOKEN).json(body).send()?;
        if !r.status().is_success() {
            bail!("PUT {path}: {} {}", r.status(), r.text().unwrap_or_default());
        }
        Ok(())
    };
    match &setup {
        Setup::Nothing => {}
        Setup::Plan(plan) => {
            for s in 0..args.sources {
                put(format!("/api/sources/s{s}/tracking-plan"), plan)?;
            }
        }
        Setup::Function(code) => {
            put("/api/functions/bench".into(), &serde_json::json!({"code": code}))?;
            for d in &dests {
                put(format!("/api/destinations/{d}"), &serde_json::json!({"url": sink.url(&format!("/{d}")), "function": {"id": "bench"}}))?;
            }
        }
    }
    if let Some(w) = &mut warehouses {
        w.watch(admin, BENCH_ADMIN_TOKEN, &sink);
    }
    if let Some(l) = &mut lake {
        l.watch(admin, BENCH_ADMIN_TOKEN, healthy.clone(), &sink);
    }
    let result = rt.block_on(e2e_load(args, addr.parse()?, &sink, pid));
    if let Some(w) = &warehouses {
        let loaded: u64 = healthy.iter().map(|d| sink.state.event_count(&format!("/{d}"))).sum();
        if let Ok(rate) = &result {
            println!("rows loaded in window: {:.0} rows/s (each event a row in tracks and one in order_completed)", 2.0 * rate);
        }
        match w.verify(&rt, loaded) {
            Ok(line) => println!("{line}"),
            Err(e) => println!("rows in the warehouses: cannot count them: {e:#}"),
        }
    }
    if let Some(l) = &lake {
        let written: u64 = healthy.iter().map(|d| sink.state.event_count(&format!("/{d}"))).sum();
        match l.verify(&rt, written) {
            Ok(line) => println!("{line}"),
            Err(e) => println!("objects in the lake: cannot read them: {e:#}"),
        }
    }
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    drop(kafka_reader);
    if let Some(w) = warehouses {
        w.drop_databases(&rt);
    }
    result
}

/// Start `sluice serve --config <config_path>` (this executable) as a child
/// process; returns it and its Tracking API address once it is ready.
pub(crate) fn spawn_serve(config_path: &Path) -> Result<(std::process::Child, String)> {
    let (child, ready) = spawn_ready(&["serve".as_ref(), "--config".as_ref(), config_path.as_os_str()], &[])?;
    Ok((child, ready["listen"].as_str().unwrap_or("").to_owned()))
}

/// Start this executable with `args` (JSON logs) and wait for its
/// "Sluice is ready" line; the line's fields (`listen`, `admin`, …).
pub(crate) fn spawn_ready(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Result<(std::process::Child, serde_json::Value)> {
    let what = args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--log-format", "json"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn,sluice=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start sluice {what}"))?;
    let fields = {
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let name = what.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) => {
                        if v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("Sluice is ready")) {
                            let _ = tx.send(v["fields"].clone());
                        }
                        if v["level"] == "ERROR" {
                            eprintln!("{name}: {line}");
                        }
                    }
                    // Not a log line: the error the command exits with (a bad config).
                    Err(_) => eprintln!("{name}: {line}"),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60)).with_context(|| format!("sluice {what} did not become ready"))?
    };
    Ok((child, fields))
}

/// Deliveries the healthy destinations owe for `acked` events.
fn expected_healthy(args: &E2eBench, acked: u64) -> u64 {
    let healthy = (args.destinations - args.down) as u64;
    if args.one_each {
        acked * healthy / args.destinations as u64
    } else {
        acked * healthy
    }
}

fn expected_down(args: &E2eBench, acked: u64) -> u64 {
    if args.one_each {
        acked * args.down as u64 / args.destinations as u64
    } else {
        acked * args.down as u64
    }
}

pub(crate) fn rss_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU time (user + system, in clock ticks) of process `pid`, and of the
/// whole machine (busy, all CPUs), from /proc; zeros where unreadable.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let process = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
            Some(f.iter().take(8).sum::<u64>() - f.get(3)? - f.get(4)?)
        })
        .unwrap_or(0);
    (process, machine)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn e2e_load(args: &E2eBench, addr: std::net::SocketAddr, sink: &Sink, pid: u32) -> Result<f64> {
    let tls = load_tls(args)?;
    let warmup = Duration::from_secs(args.warmup);
    let window = Duration::from_secs(args.seconds);
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + window;
    let acks: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    // Acked events per source, to know exactly what each destination is owed.
    let acked_by_source: Arc<Vec<AtomicU64>> = Arc::new((0..args.sources).map(|_| AtomicU64::new(0)).collect());
    let per_conn_rate = (args.rate as f64 / args.connections as f64).max(0.0);
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (acks, acked, acked_by_source) = (acks.clone(), acked.clone(), acked_by_source.clone());
        let args = args.clone();
        let sink_state = sink.state.clone();
        let healthy_paths: Vec<String> = (args.down..args.destinations).map(|d| format!("/d{d}")).collect();
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let mut sender = match tls {
                None => {
                    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                    tokio::spawn(conn);
                    sender
                }
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                    let stream = tls.connect(name, stream).await?;
                    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                    tokio::spawn(conn);
                    sender
                }
            };
            let mut seq = 0u64;
            let began = Instant::now();
            while Instant::now() < stop_at {
                if per_conn_rate > 0.0 {
                    let due = began + Duration::from_secs_f64(seq as f64 / per_conn_rate);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                } else {
                    // Closed loop: wait while the healthy destinations lag too far behind.
                    let behind = || {
                        let delivered: u64 = healthy_paths.iter().map(|p| sink_state.event_count(p)).sum();
                        expected_healthy(&args, acked.load(Ordering::Relaxed)).saturating_sub(delivered)
                    };
                    while behind() > args.max_backlog && Instant::now() < stop_at {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                let source = (c + (seq as usize / args.batch_size)) % args.sources;
                let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("wk{source}:")));
                let ids: Vec<String> = (0..args.batch_size).map(|k| format!("c{c}-{}", seq + k as u64)).collect();
                let pad = "x".repeat(args.event_bytes.saturating_sub(150));
                let batch: Vec<String> = ids
                    .iter()
                    .map(|id| {
                        format!(r#"{{"type":"track","event":"Order Completed","userId":"u-{id}","messageId":"{id}","properties":{{"total":1,"pad":"{pad}"}}}}"#)
                    })
                    .collect();
                let body = format!(r#"{{"batch":[{}]}}"#, batch.join(","));
                let req = Request::post("/v1/batch")
                    .header(header::HOST, "127.0.0.1")
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::AUTHORIZATION, auth)
                    .body(Full::new(Bytes::from(body)))?;
                let resp = sender.send_request(req).await?;
                let ok = resp.status() == StatusCode::OK;
                resp.into_body().collect().await?;
                let now = Instant::now();
                if ok {
                    acked.fetch_add(ids.len() as u64, Ordering::Relaxed);
                    acked_by_source[source].fetch_add(ids.len() as u64, Ordering::Relaxed);
                    let mut a = acks.lock().expect("acks");
                    for id in ids {
                        a.insert(id, now);
                    }
                }
                seq += args.batch_size as u64;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(measure_from)).await;
    let acked_before = acked.load(Ordering::Relaxed);
    let sink_before = sink.count();
    let healthy_path = format!("/d{}", args.down);
    let healthy_before = sink.state.event_count(&healthy_path);
    let healthy_paths: Vec<String> = (args.down..args.destinations).map(|d| format!("/d{d}")).collect();
    let per_path_before: Vec<u64> = healthy_paths.iter().map(|p| sink.state.event_count(p)).collect();
    let mut rss_peak: f64 = 0.0;
    let cpu_before = cpu_ticks(pid);
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_peak = rss_peak.max(rss_mib(pid, "VmRSS:"));
    }
    let cpu_after = cpu_ticks(pid);
    let acked_in_window = acked.load(Ordering::Relaxed) - acked_before;
    let delivered_in_window = sink.count() - sink_before;
    let healthy_in_window = sink.state.event_count(&healthy_path) - healthy_before;
    let per_path: Vec<f64> =
        healthy_paths.iter().zip(&per_path_before).map(|(p, before)| (sink.state.event_count(p) - before) as f64 / window.as_secs_f64()).collect();
    for t in tasks {
        t.await??;
    }
    let total_acked = acked.load(Ordering::Relaxed);
    // Let deliveries of the last acks land (healthy destinations).
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    let mut arrivals: Vec<(String, Instant)> = Vec::new();
    loop {
        arrivals.extend(sink.take_arrivals());
        let n_healthy = arrivals.len() as u64;
        if n_healthy >= expected_healthy(args, total_acked) || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window_s = window.as_secs_f64();
    println!(
        "offered: {}  acked in window: {:.0} events/s  delivered in window (all destinations, incl. retries): {:.0} requests/s",
        if args.rate == 0 { "max".to_owned() } else { format!("{} events/s", args.rate) },
        acked_in_window as f64 / window_s,
        delivered_in_window as f64 / window_s
    );
    println!("delivered to {healthy_path} (a healthy destination) in window: {:.0} events/s", healthy_in_window as f64 / window_s);
    if healthy_paths.len() > 1 {
        let min = per_path.iter().copied().fold(f64::INFINITY, f64::min);
        let max = per_path.iter().copied().fold(0.0, f64::max);
        println!("per healthy destination in window: min {min:.0}  max {max:.0} events/s ({} destinations)", per_path.len());
    }
    // Latency per healthy destination: first arrival of each messageId after its ack.
    // (Taken out of the mutex: the run is over, and no guard may be held across the awaits below.)
    let acks = std::mem::take(&mut *acks.lock().expect("acks"));
    let mut lat: Vec<f64> = Vec::new();
    let mut per_dest_first: HashMap<&str, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (id, at) in &arrivals {
        if !seen.insert(id.as_str()) {
            *per_dest_first.entry("repeat").or_default() += 1;
            continue;
        }
        if let Some(ack) = acks.get(id) {
            if *ack >= measure_from && *ack < stop_at {
                lat.push(at.saturating_duration_since(*ack).as_secs_f64() * 1000.0);
            }
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    println!(
        "ack → sink receipt ({} events acked in the window, first destination to receive each): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    println!("server RSS: peak sampled {:.0} MiB, high-water mark {:.0} MiB", rss_peak, rss_mib(pid, "VmHWM:"));
    // Clock ticks are 1/100 s on Linux (USER_HZ).
    let (server_s, machine_s) = ((cpu_after.0 - cpu_before.0) as f64 / 100.0, (cpu_after.1 - cpu_before.1) as f64 / 100.0);
    let per_k = |cpu_s: f64| cpu_s * 1e6 / (acked_in_window.max(1) as f64);
    println!(
        "CPU in window: server {server_s:.1} s ({:.1} ms per 1,000 events), whole machine {machine_s:.1} s ({:.1} ms per 1,000 events; {:.0}% of {} cores)",
        per_k(server_s),
        per_k(machine_s),
        100.0 * machine_s / window_s / std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("deliveries to healthy destinations: {} of {} expected", arrivals.len(), expected_healthy(args, total_acked));
    if args.down > 0 && args.recover_seconds > 0 {
        // What the down destinations are owed, exactly.
        let owed: u64 = if args.one_each {
            (0..args.sources).filter(|s| s % args.destinations < args.down).map(|s| acked_by_source[s].load(Ordering::Relaxed)).sum()
        } else {
            expected_down(args, total_acked)
        };
        let down_before = sink.count();
        for d in 0..args.down {
            sink.set(&format!("/d{d}"), Behaviour::default());
        }
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(args.recover_seconds);
        let mut got = 0u64;
        let mut last = t0;
        while Instant::now() < deadline && got < owed {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let batch = sink.take_arrivals();
            if let Some(at) = batch.iter().map(|(_, at)| *at).max() {
                last = last.max(at);
            }
            got += batch.len() as u64;
        }
        let secs = last.saturating_duration_since(t0).as_secs_f64();
        println!(
            "recovery: {got} of {owed} backlogged deliveries landed; the last {secs:.1} s after the endpoint came back ({:.0}/s; {} requests incl. retries)",
            got as f64 / secs.max(1e-3),
            sink.count() - down_before
        );
    }
    Ok(healthy_in_window as f64 / window_s)
}

#[derive(Args, Clone)]
pub struct CleanupBench {
    /// JobDB sizes (jobs) to compare, each with 2 transitions per job.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    jobs: Vec<u64>,
    #[arg(long, default_value_t = 300)]
    event_bytes: usize,
}

fn fill(path: &Path, n: u64, bytes: usize) -> Result<()> {
    let mut db = JobDb::open(path)?;
    let mut ids = KsuidGenerator::default();
    let mut i = 0;
    while i < n {
        db.begin()?;
        for _ in 0..10_000.min(n - i) {
            i += 1;
            let id = ids.next(1_800_000_000);
            let job = NewJob {
                message_id: format!("m-{i}"),
                source: "s".into(),
                destination: "d".into(),
                generation: 0,
                endpoint: String::new(),
                payload: payload(i, bytes),
                created_at: 0,
                expires_at: 0,
                received_at: 0,
            };
            db.insert_job(id, &job)?;
            for (seq, state) in [(1, JobState::Executing), (2, JobState::Succeeded)] {
                db.append_transition(&Transition { job_id: id, seq, state, at: 0, attempt: 1, status: Some(200), error: None, retry_at: None })?;
            }
        }
        db.commit()?;
    }
    db.sqlite_connection().expect("an SQLite JobDB").execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(())
}

pub fn bench_cleanup(args: CleanupBench) -> Result<()> {
    println!("{}", machine_description());
    println!("{:>10}  {:>10}  {:>14}  {:>16}  {:>8}", "jobs", "file MiB", "drop (delete file)", "DELETE rows", "ratio");
    for &n in &args.jobs {
        let dir = tempfile::tempdir()?;
        let a = dir.path().join("jobdb-000001.sqlite");
        let b = dir.path().join("jobdb-000002.sqlite");
        fill(&a, n, args.event_bytes)?;
        std::fs::copy(&a, &b)?;
        let mib = std::fs::metadata(&a)?.len() as f64 / 1048576.0;
        let t = Instant::now();
        sluice_deliver::jobdb::remove_jobdb_files(&a)?;
        let drop_s = t.elapsed().as_secs_f64();
        // The DELETE path: the immutability triggers must go first (they forbid exactly this).
        let conn = rusqlite::Connection::open(&b)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch("DROP TRIGGER jobs_immutable_delete; DROP TRIGGER transitions_append_only_delete; PRAGMA wal_checkpoint(TRUNCATE);")?;
        let t = Instant::now();
        // With a WHERE clause, as a row-by-row cleanup of finished jobs would run (without one,
        // SQLite truncates the tables wholesale, which is the drop in disguise).
        conn.execute_batch(
            "BEGIN; DELETE FROM job_state_transitions WHERE seq > 0; DELETE FROM jobs WHERE created_at >= 0; COMMIT;
             PRAGMA wal_checkpoint(TRUNCATE);",
        )?;
        let delete_s = t.elapsed().as_secs_f64();
        println!("{n:>10}  {mib:>10.0}  {:>14.2} ms  {:>13.0} ms  {:>7.0}×", drop_s * 1000.0, delete_s * 1000.0, delete_s / drop_s.max(1e-9));
    }
    Ok(())
}

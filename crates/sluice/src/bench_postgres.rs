//! `sluice bench e2e --destination-type postgres`: a fresh database per
//! destination on the given PostgreSQL server, and a reader that counts
//! each destination's loaded jobs (the server's `succeeded` outcomes, from
//! its metrics) into the bench's sink, so the bench's pacing and counts
//! work as for webhooks. Counting rows in the warehouse while it loads
//! would cost the server a scan per poll; instead the rows are counted
//! once at the end and checked against those outcomes ([`Warehouses::verify`]).
//! Per-event latency is not measured for this type.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sluice_deliver::sink::{Sink, SinkState};
use sqlx::Row;

/// The run's databases and the thread counting loads (stopped on drop).
pub struct Warehouses {
    server: String,
    /// (destination id, database name)
    databases: Vec<(String, String)>,
    counter: Option<LoadCounter>,
}

/// A thread counting destinations' `succeeded` outcomes from the server's
/// metrics into the bench's sink (stopped on drop). For destination types
/// whose deliveries the bench cannot see arrive (`postgres`, `s3`).
pub struct LoadCounter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoadCounter {
    /// Count the `succeeded` outcomes of destinations `ids` from the
    /// server's metrics at `admin` into the sink (path `/<id>`), every 100 ms.
    pub fn start(admin: &str, token: &str, ids: Vec<String>, sink: &Sink) -> LoadCounter {
        let (state, stop) = (sink.state.clone(), Arc::new(AtomicBool::new(false)));
        let (url, token, stopped) = (format!("http://{admin}/metrics"), token.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || count_loads(&url, &token, &ids, &state, &stopped));
        LoadCounter { stop, thread: Some(thread) }
    }
}

impl Drop for LoadCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Warehouses {
    /// Make one database per destination on `server` (a `postgres://` URL
    /// of a user that may create databases).
    pub fn create(rt: &tokio::runtime::Runtime, server: &str, destinations: &[String]) -> Result<Warehouses> {
        let databases: Vec<(String, String)> = destinations.iter().map(|d| (d.clone(), format!("sluice_bench_{}_{d}", std::process::id()))).collect();
        rt.block_on(async {
            let mut c = connect(server).await.with_context(|| format!("connect to {}", sluice_sql::redact(server)))?;
            for (_, db) in &databases {
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&mut c).await?;
                sqlx::raw_sql(&format!("CREATE DATABASE {db}")).execute(&mut c).await.with_context(|| format!("create database {db}"))?;
            }
            anyhow::Ok(())
        })?;
        Ok(Warehouses { server: server.to_owned(), databases, counter: None })
    }

    /// The `url` of destination `id`.
    pub fn url(&self, id: &str) -> String {
        let db = &self.databases.iter().find(|(d, _)| d == id).expect("a destination of the run").1;
        let mut url = url::Url::parse(&self.server).expect("a URL");
        url.set_path(&format!("/{db}"));
        url.to_string()
    }

    /// Count each destination's `succeeded` outcomes from the server's
    /// metrics at `admin` into the sink (path `/<id>`), every 100 ms.
    pub fn watch(&mut self, admin: &str, token: &str, sink: &Sink) {
        let ids = self.databases.iter().map(|(d, _)| d.clone()).collect();
        self.counter = Some(LoadCounter::start(admin, token, ids, sink));
    }

    /// The rows in every destination's `tracks` and event tables, checked
    /// against `loaded` (jobs the sink counted); a line for the report.
    pub fn verify(&self, rt: &tokio::runtime::Runtime, loaded: u64) -> Result<String> {
        let (mut tracks, mut events) = (0i64, 0i64);
        for (_, db) in &self.databases {
            let mut url = url::Url::parse(&self.server)?;
            url.set_path(&format!("/{db}"));
            let (t, e) = rt.block_on(async {
                let mut c = connect(url.as_str()).await?;
                let schemas: Vec<String> = sqlx::query("SELECT table_schema::text FROM information_schema.tables WHERE table_name = 'tracks'")
                    .fetch_all(&mut c)
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let (mut t, mut e) = (0i64, 0i64);
                for s in schemas {
                    t += sqlx::query(&format!("SELECT count(*) FROM \"{s}\".tracks")).fetch_one(&mut c).await?.get::<i64, _>(0);
                    e += sqlx::query(&format!("SELECT count(*) FROM \"{s}\".order_completed")).fetch_one(&mut c).await?.get::<i64, _>(0);
                }
                anyhow::Ok((t, e))
            })?;
            tracks += t;
            events += e;
        }
        let check = if tracks as u64 == loaded && events as u64 == loaded { "= the loads counted" } else { "≠ the loads counted: CHECK FAILED" };
        Ok(format!("rows in the warehouses: {tracks} in tracks + {events} in order_completed {check} ({loaded})"))
    }

    /// Drop the run's databases.
    pub fn drop_databases(&self, rt: &tokio::runtime::Runtime) {
        let _ = rt.block_on(async {
            let mut c = connect(&self.server).await?;
            for (_, db) in &self.databases {
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&mut c).await?;
            }
            anyhow::Ok(())
        });
    }
}

/// A connection to `url`, without the server's notices (`… does not exist, skipping`).
async fn connect(url: &str) -> Result<sqlx::PgConnection> {
    use sqlx::ConnectOptions;
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    Ok(options.options([("client_min_messages", "warning")]).connect().await?)
}

fn count_loads(url: &str, token: &str, ids: &[String], state: &SinkState, stop: &AtomicBool) {
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().expect("an HTTP client");
    let mut counted = vec![0u64; ids.len()];
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(text) = http.get(url).bearer_auth(token).send().and_then(|r| r.text()) else { continue };
        let at = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let label = format!("destination=\"{id}\"");
            let now = text
                .lines()
                .filter(|l| l.starts_with("sluice_deliver_outcomes_total{") && l.contains(&label) && l.contains("outcome=\"succeeded\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64;
            if now > counted[i] {
                // One key per load, unique, matching no ack: the count is what matters here.
                let keys = (counted[i]..now).map(|n| format!("pg:{id}:{n}")).collect();
                state.record_delivered(&format!("/{id}"), keys, at);
                counted[i] = now;
            }
        }
    }
}

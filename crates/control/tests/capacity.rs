//! Capacity rounds against fake cells serving `/metrics` (the real-process
//! test is `crates/sluice/tests/control.rs`): what is read, and what the
//! control plane decides from it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_cells::{Cell, CellState, GlobalStore, Tier};
use sluice_control::{capacity, ControlPlane, ControlSettings};

/// A fake cell's admin port: `/metrics` with a CPU counter that grows by `cpu_per_read` seconds per read.
async fn fake_admin(cpu_per_read: f64, lag_seconds: f64) -> String {
    let reads = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let n = reads.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                format!(
                    "# TYPE sluice_process_cpu_seconds_total gauge\nsluice_process_cpu_seconds_total {}\n\
                     sluice_process_cpus 2\nsluice_consumer_lag_seconds{{group=\"route\"}} {lag_seconds}\n\
                     sluice_ingest_ack_seconds_bucket{{le=\"0.005\"}} {}\nsluice_ingest_ack_seconds_bucket{{le=\"+Inf\"}} {}\n",
                    n as f64 * cpu_per_read,
                    n * 10,
                    n * 10
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn plane(dir: &std::path::Path) -> (Arc<ControlPlane>, GlobalStore) {
    let path = dir.join("global.sqlite").display().to_string();
    let settings = ControlSettings {
        token: "control-token-0123456789".into(),
        metrics_token: None,
        cell_metrics_token: None,
        scrape_every: Duration::from_secs(1),
        provision_command: Vec::new(),
        provision_timeout: Duration::from_secs(10),
        allow_private_network: false,
        thresholds: Default::default(),
        public_url: "http://127.0.0.1:1".into(),
    };
    (ControlPlane::new(vec![GlobalStore::open(&path).unwrap()], settings).unwrap(), GlobalStore::open(&path).unwrap())
}

fn cell(id: &str, admin_url: &str) -> Cell {
    Cell {
        id: id.into(),
        tier: Tier::Smb,
        ingest_url: "http://127.0.0.1:9".into(),
        admin_url: admin_url.into(),
        state: CellState::Active,
        attributes: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_reads_cpu_lag_and_latency_and_marks_an_overloaded_cell_full() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, store) = plane(dir.path());
    // 1.6 CPU-seconds per read, a read every ~1 s, 2 cores: ~80% against SMB's 70%.
    let busy = fake_admin(1.6, 0.0).await;
    let idle = fake_admin(0.01, 30.0).await;
    store.put_cell(&cell("busy", &busy)).unwrap();
    store.put_cell(&cell("idle", &idle)).unwrap();
    capacity::round(&cp).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    capacity::round(&cp).await.unwrap();
    let loads = cp.loads();
    let b = &loads["busy"];
    assert!(b.metrics["cpu"].value > 0.7, "{b:?}");
    assert!(b.metrics["ingest_p99"].value <= 0.005, "{b:?}");
    let i = &loads["idle"];
    assert!(i.metrics["cpu"].value < 0.1, "{i:?}");
    assert_eq!(i.metrics["consumer_lag"].value, 30.0);
    assert_eq!(store.cell("busy").unwrap().unwrap().state, CellState::Full, "over its CPU threshold");
    assert_eq!(store.cell("idle").unwrap().unwrap().state, CellState::Active);
    let decisions = cp.decisions();
    assert!(decisions.iter().any(|d| d.kind == "full" && d.reason.contains("cpu")), "{decisions:?}");
}

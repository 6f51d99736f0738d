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

/// Settings for these tests: the seed's thresholds, `provision_command`, 2 s to provision.
fn settings(provision_command: Vec<String>) -> ControlSettings {
    ControlSettings {
        token: "control-token-0123456789".into(),
        metrics_token: None,
        cell_metrics_token: None,
        scrape_every: Duration::from_secs(1),
        provision_command,
        provision_timeout: Duration::from_secs(2),
        allow_private_network: false,
        thresholds: Default::default(),
        public_url: "http://127.0.0.1:1".into(),
    }
}

fn plane(dir: &std::path::Path) -> (Arc<ControlPlane>, GlobalStore) {
    let path = dir.join("global.sqlite").display().to_string();
    (ControlPlane::new(vec![GlobalStore::open(&path).unwrap()], settings(Vec::new())).unwrap(), GlobalStore::open(&path).unwrap())
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

/// A plane whose provisioner is `sh -c <script>`, given 2 s, with one busy smb cell (so it provisions).
async fn provisioning_plane(dir: &std::path::Path, script: &str) -> (Arc<ControlPlane>, GlobalStore) {
    let path = dir.join("global.sqlite").display().to_string();
    let settings = settings(vec!["sh".into(), "-c".into(), script.into()]);
    let cp = ControlPlane::new(vec![GlobalStore::open(&path).unwrap()], settings).unwrap();
    let store = GlobalStore::open(&path).unwrap();
    store.put_cell(&cell("busy", &fake_admin(1.6, 0.0).await)).unwrap();
    (cp, store)
}

/// Rounds until a decision of `kind` appears (up to 15 s).
async fn decision(cp: &Arc<ControlPlane>, kind: &str) -> sluice_control::Decision {
    for _ in 0..30 {
        capacity::round(cp).await.unwrap();
        if let Some(d) = cp.decisions().into_iter().find(|d| d.kind == kind) {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("no {kind} decision: {:?}", cp.decisions());
}

/// Red team: a provisioned cell that never became healthy stayed
/// `provisioning`, and the tier never provisioned again. It is retired, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioned_cell_that_never_answers_is_retired_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, store) = provisioning_plane(dir.path(), r#"echo '{"ingest_url":"http://127.0.0.1:1","admin_url":"http://127.0.0.1:1"}'"#).await;
    let failed = decision(&cp, "provision_failed").await;
    assert!(failed.reason.contains("did not answer") && failed.reason.contains("retired it"), "{failed:?}");
    assert_eq!(store.cell("smb-1").unwrap().unwrap().state, CellState::Retired);
    assert!(cp.decisions().iter().any(|d| d.kind == "provisioned"), "it was registered first: {:?}", cp.decisions());
}

/// Red team: a provisioner printing megabytes blocked on a full pipe until
/// its timeout, which was then the reason given. The output is drained and
/// the reason says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioner_printing_too_much_is_refused_for_that() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, store) = provisioning_plane(dir.path(), "head -c 1000000 /dev/zero | tr '\\0' x").await;
    let failed = decision(&cp, "provision_failed").await;
    assert!(failed.reason.contains("more than 65536 bytes"), "{failed:?}");
    assert!(store.cell("smb-1").unwrap().is_none(), "nothing registered");
}

/// A provisioner that hangs is killed with its children at the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_provisioner_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("child.pid");
    let script = format!("sleep 600 & echo $! > {}; wait", marker.display());
    let (cp, _store) = provisioning_plane(dir.path(), &script).await;
    let failed = decision(&cp, "provision_failed").await;
    assert!(failed.reason.contains("took longer"), "{failed:?}");
    let pid = std::fs::read_to_string(&marker).unwrap().trim().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ");
    assert!(!alive, "the provisioner's child {pid} was killed too");
}

//! The router against fake cells (an axum server standing in for a cell's
//! Tracking API), for what a real cell would never do: answer too much,
//! redirect. With real cells: `crates/sluice/tests/cells.rs`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use sluice_cells::{Cell, CellState, GlobalStore, Tier, Workspace};
use sluice_ingest::IngestSettings;
use sluice_router::{app, CellRouter, RouterSettings};
use tower::ServiceExt;

/// A fake cell answering every POST with `answer`; its base URL.
async fn fake_cell(answer: fn() -> axum::response::Response) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = axum::Router::new().fallback(move || async move { answer() });
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    format!("http://{addr}")
}

/// A router whose store has one workspace (key `wk`) on one cell at `url`.
fn router(dir: &std::path::Path, url: &str) -> Arc<CellRouter> {
    let path = dir.join("global.sqlite").display().to_string();
    let store = GlobalStore::open(&path).unwrap();
    store
        .put_cell(&Cell {
            id: "fake".into(),
            tier: Tier::Smb,
            ingest_url: url.into(),
            admin_url: String::new(),
            state: CellState::Active,
            attributes: Default::default(),
        })
        .unwrap();
    store
        .put_workspace(&Workspace { id: "w".into(), name: String::new(), tier: Tier::Smb, constraints: Default::default(), disabled: false })
        .unwrap();
    store.add_write_key("wk", "w", "web").unwrap();
    let settings = RouterSettings::new(IngestSettings::from_config(&sluice_core::Config::load(None).unwrap()));
    CellRouter::new(vec![store], GlobalStore::open(&path).unwrap(), settings).unwrap()
}

fn track() -> Request<Body> {
    Request::post("/v1/track")
        .header("authorization", "Basic d2s6") // "wk:"
        .header("content-type", "application/json")
        .body(Body::from(r#"{"type":"track","event":"E","userId":"u"}"#))
        .unwrap()
}

/// Red team: the router read a cell's whole answer into memory (400 MB
/// from a URL pointing at something else). It relays at most 64 KiB and
/// answers 503 past that, without reading the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_too_large_for_a_cell_is_not_relayed() {
    let url = fake_cell(|| axum::response::Response::new(Body::from(vec![b'x'; 8 * 1024 * 1024]))).await;
    let dir = tempfile::tempdir().unwrap();
    let resp = app(router(dir.path(), &url)).oneshot(track()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("cell fake is unavailable"), "{body:?}");
}

/// A cell's redirect keeps its `Location` (red team: it was dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cells_redirect_keeps_its_location() {
    let url = fake_cell(|| axum::response::Redirect::temporary("https://elsewhere.example/v1/track").into_response()).await;
    let dir = tempfile::tempdir().unwrap();
    let resp = app(router(dir.path(), &url)).oneshot(track()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(resp.headers()["location"], "https://elsewhere.example/v1/track");
    assert_eq!(resp.headers()["x-sluice-cell"], "fake");
}

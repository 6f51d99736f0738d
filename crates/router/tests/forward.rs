//! The router against fake cells (an axum server standing in for a cell's
//! Tracking API), for what a real cell would never do: answer too much,
//! redirect. With real cells: `crates/sluice/tests/cells.rs`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use sluice_cells::{Cell, CellState, GlobalStore, Tier, Workspace};
use sluice_router::{app, CellRouter, RouterSettings};
use tower::ServiceExt;

/// A fake cell answering every POST with `answer`, confirming itself as a
/// Sluice cell does (echoing `X-Sluice-Cell`); its base URL.
async fn fake_cell(answer: fn() -> axum::response::Response) -> String {
    fake_server(answer, true).await
}

/// A server answering every POST with `answer`; `confirm`: echo `X-Sluice-Cell` as a cell does.
async fn fake_server(answer: fn() -> axum::response::Response, confirm: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = axum::Router::new().fallback(move |headers: http::HeaderMap| async move {
        let mut resp = answer();
        if let (true, Some(cell)) = (confirm, headers.get("x-sluice-cell")) {
            resp.headers_mut().insert("x-sluice-cell", cell.clone());
        }
        resp
    });
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    format!("http://{addr}")
}

/// A router whose store has one workspace (key `wk`) on one cell at `url`.
fn router(dir: &std::path::Path, url: &str) -> Arc<CellRouter> {
    router_with(dir, url, sluice_core::Config::load(None).unwrap())
}

fn router_with(dir: &std::path::Path, url: &str, config: sluice_core::Config) -> Arc<CellRouter> {
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
    let settings = RouterSettings::from_config(&config);
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

fn request(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut r = Request::post("/v1/track").header("content-type", "application/json");
    if let Some(k) = key {
        use base64::Engine;
        r = r.header("authorization", format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{k}:"))));
    }
    r.body(Body::from(body)).unwrap()
}

/// `ingest.unknown_write_key = "accept_and_drop"` holds at the router as
/// at ingest: unknown and missing keys get 200 and nothing is forwarded;
/// a known key is still forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_and_drop_answers_unknown_keys_200_without_forwarding() {
    let url = fake_cell(|| (StatusCode::ACCEPTED, "from the cell").into_response()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = sluice_core::Config::from_toml_with_env("[ingest]\nunknown_write_key = \"accept_and_drop\"\n", "test", &Default::default()).unwrap();
    let r = router_with(dir.path(), &url, config);
    let event = r#"{"type":"track","event":"E","userId":"u"}"#;
    for req in [request(Some("nope"), event), request(None, event), request(None, r#"{"writeKey":"nope","event":"E","userId":"u"}"#)] {
        let resp = app(r.clone()).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.headers().contains_key("x-sluice-cell"), "not forwarded");
    }
    assert_eq!(r.metrics.unknown_key_dropped.get(), 3);
    let resp = app(r.clone()).oneshot(request(Some("wk"), event)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED, "a known key still reaches its cell");
    // Under the default, the same requests are 401 (tested with real cells in crates/sluice/tests/cells.rs).
    let resp = app(router(tempfile::tempdir().unwrap().path(), &url)).oneshot(request(Some("nope"), event)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// The admin port: `/metrics` shows the decisions, behind the metrics
/// token when one is set; `/healthz` names the mapping version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_serves_metrics_and_health() {
    let url = fake_cell(|| (StatusCode::OK, "{}").into_response()).await;
    let dir = tempfile::tempdir().unwrap();
    let r = router(dir.path(), &url);
    for _ in 0..3 {
        assert_eq!(app(r.clone()).oneshot(track()).await.unwrap().status(), StatusCode::OK);
    }
    let mut registry = sluice_core::metrics::Registry::default();
    r.metrics.register(&mut registry);
    let admin = sluice_router::admin_app(r.clone(), Arc::new(registry), Some("metrics-token-0123".into()), None);
    let get = |path: &str, token: Option<&str>| {
        let mut req = Request::get(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        admin.clone().oneshot(req.body(Body::empty()).unwrap())
    };
    assert_eq!(get("/metrics", None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(get("/metrics", Some("wrong-token-0123456")).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let resp = get("/metrics", Some("metrics-token-0123")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(axum::body::to_bytes(resp.into_body(), 1 << 22).await.unwrap().to_vec()).unwrap();
    assert!(text.contains(r#"sluice_router_decisions_total{path="new"} 1"#), "{text}");
    assert!(text.contains(r#"sluice_router_decisions_total{path="hit"} 2"#), "{text}");
    assert!(text.contains(r#"sluice_router_forwarded_total{cell="fake",status="200"} 3"#), "{text}");
    let resp = get("/healthz", None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let health: serde_json::Value = serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap()).unwrap();
    assert_eq!(health["store"], "ok");
    assert_eq!(health["cache_entries"], 1);
    assert_eq!(get("/api/anything", None).await.unwrap().status(), StatusCode::NOT_FOUND);
}

/// Red team: a cell URL pointing at something that is not a Sluice cell
/// answered 200 (or 400), which reached the client as Sluice's: events
/// acknowledged and stored nowhere. An answer that does not confirm the
/// cell is a 503 (the SDK retries); the status is counted as `not_a_cell`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_not_from_a_sluice_cell_is_not_relayed() {
    for answer in [(|| (StatusCode::OK, r#"{"success":true}"#).into_response()) as fn() -> axum::response::Response, || {
        (StatusCode::BAD_REQUEST, "no").into_response()
    }] {
        let url = fake_server(answer, false).await;
        let dir = tempfile::tempdir().unwrap();
        let r = router(dir.path(), &url);
        let resp = app(r.clone()).oneshot(track()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key("retry-after"));
        assert_eq!(r.metrics.forwarded.get_or_create(&vec![("cell", "fake".to_owned()), ("status", "not_a_cell".to_owned())]).get(), 1);
    }
}

/// Red team: a retired cell kept receiving its workspaces' traffic. Its
/// workspaces are answered 503 (they must be moved), and nothing is sent there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_cells_workspaces_are_answered_503() {
    let url = fake_cell(|| (StatusCode::OK, r#"{"success":true}"#).into_response()).await;
    let dir = tempfile::tempdir().unwrap();
    let r = router(dir.path(), &url);
    assert_eq!(app(r.clone()).oneshot(track()).await.unwrap().status(), StatusCode::OK);
    let store = GlobalStore::open(&dir.path().join("global.sqlite").display().to_string()).unwrap();
    store.set_cell_state("fake", CellState::Retired).unwrap();
    // A fresh router (no cache): the state is read with the route.
    let fresh = CellRouter::new(
        vec![store],
        GlobalStore::open(&dir.path().join("global.sqlite").display().to_string()).unwrap(),
        RouterSettings::from_config(&sluice_core::Config::load(None).unwrap()),
    )
    .unwrap();
    let resp = app(fresh.clone()).oneshot(track()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("retired"), "{body:?}");
    assert_eq!(fresh.metrics.forwarded.get_or_create(&vec![("cell", "fake".to_owned()), ("status", "200".to_owned())]).get(), 0);
}

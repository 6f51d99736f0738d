//! The server loop's shutdown: after the grace period, connections still
//! busy are closed, and `serve` returns only when their tasks are gone.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use sluice_ingest::server::{serve, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_busy_connections_after_the_grace_period() {
    let held = Arc::new(());
    let in_handler = held.clone();
    let app = Router::new().route(
        "/",
        get(move || {
            let _keep = in_handler.clone();
            async move {
                std::future::pending::<()>().await;
                let _still = _keep;
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions { shutdown_grace: Duration::from_millis(200), ..ServeOptions::default() };
    let server = tokio::spawn(serve(listener, app, options, async {
        let _ = stop_rx.await;
    }));

    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // Wait until the handler runs (it holds a second reference).
    for _ in 0..200 {
        if Arc::strong_count(&held) > 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(Arc::strong_count(&held) > 2, "the request reached the handler");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), server).await.expect("serve returned after the grace period").unwrap();
    assert_eq!(Arc::strong_count(&held), 1, "no connection task (nor the router) still holds the state");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await.expect("connection closed").unwrap_or(0);
    assert_eq!(n, 0, "the busy connection was closed, not answered");
}

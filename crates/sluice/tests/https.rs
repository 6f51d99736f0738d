//! HTTPS on the Tracking API and the admin port, certificate reload, and
//! the route → director RPC over (mutual) TLS, through real processes with
//! certificates from `scripts/certs.sh`:
//! - an SDK-style client that trusts the test CA gets its 200 over HTTPS;
//!   plain HTTP to the TLS port gets no answer it could take for one; a
//!   client that never starts a handshake is cut off after
//!   `server.header_read_timeout`;
//! - replacing the certificate files is picked up without a restart; a
//!   broken new pair leaves the old certificate serving and is reported;
//! - routes reach directors over TLS (the director requiring a client
//!   certificate); a route with the wrong CA, without a client certificate,
//!   facing an expired director certificate, or given a plain-text director
//!   while its TLS is on hands nothing over and says why, naming the link.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use util::*;

/// The test certificates (`scripts/certs.sh`, run once per test binary).
fn certs() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("SLUICE_TEST_CERT_DIR") {
            return PathBuf::from(d);
        }
        let dir = std::env::temp_dir().join(format!("sluice-https-certs-{}", std::process::id()));
        let out = Command::new("bash").arg(repo_root().join("scripts/certs.sh")).arg(&dir).output().expect("run scripts/certs.sh");
        assert!(out.status.success(), "scripts/certs.sh: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
    .clone()
}

fn pem(name: &str) -> String {
    certs().join(name).display().to_string()
}

/// An HTTP client that trusts only the test CA.
fn https_client() -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs().join("ca.pem")).unwrap()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The SHA-256 fingerprint of the certificate a TLS server at `addr`
/// presents (or of a PEM file, with `file`).
fn fingerprint(addr: Option<&str>, file: Option<&Path>) -> String {
    let script = match (addr, file) {
        (Some(a), _) => format!("openssl s_client -connect {a} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"),
        (_, Some(f)) => format!("openssl x509 -in {} -noout -fingerprint -sha256", f.display()),
        _ => unreachable!(),
    };
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A plain `sluice serve` with HTTPS on both ports, its certificate files
/// copied into `dir` (so the test can replace them).
fn https_server(dir: &Path, sink: &TestSink) -> Server {
    for f in ["server.pem", "server.key"] {
        std::fs::copy(certs().join(f), dir.join(f)).unwrap();
    }
    let tls = format!("tls_cert_file = \"{0}/server.pem\"\ntls_key_file = \"{0}/server.key\"\n", dir.display());
    let config = write_config(dir, &hook_destination_toml(&sink.sink.url("/hook")));
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replacen("[server]\n", &format!("[server]\nheader_read_timeout = \"2s\"\n{tls}"), 1)
        .replacen("[admin]\n", &format!("[admin]\n{tls}"), 1);
    std::fs::write(&config, text).unwrap();
    Server::start(&config)
}

#[test]
fn the_tracking_api_and_the_admin_port_serve_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let server = https_server(dir.path(), &sink);
    let client = https_client();

    // An event over HTTPS (by the host name the certificate names, and by IP).
    for (i, host) in ["localhost", "127.0.0.1"].into_iter().enumerate() {
        let port = server.addr.rsplit(':').next().unwrap();
        let event = track_event(&format!("tls-{i}"), i);
        let status = sink.block_on(async {
            client.post(format!("https://{host}:{port}/v1/track")).basic_auth(WRITE_KEY, Some("")).json(&event).send().await.unwrap().status()
        });
        assert_eq!(status, 200);
    }
    wait_for(Duration::from_secs(30), || (sink.by_message_id("/hook").len() >= 2).then_some(()), || server.stderr_tail(20));
    let metrics = sink.block_on(async { client.get(format!("https://{}/metrics", server.admin)).send().await.unwrap().text().await.unwrap() });
    assert!(metrics.contains("sluice_ingest_events_accepted"), "{metrics}");

    // Plain HTTP to either TLS port: no HTTP answer at all.
    for addr in [&server.addr, &server.admin] {
        let answer = sink.block_on(async { sink.http.get(format!("http://{addr}/healthz")).send().await });
        assert!(answer.is_err(), "plain HTTP to a TLS port got an HTTP answer: {answer:?}");
    }
    // A client trusting another CA refuses the server.
    let wrong = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(certs().join("wrongca.pem")).unwrap()).unwrap())
        .build()
        .unwrap();
    assert!(sink.block_on(async { wrong.get(format!("https://{}/healthz", server.addr)).send().await }).is_err());

    // A client that connects and sends nothing is closed after the
    // header read timeout (2 s here), not held forever.
    let mut silent = std::net::TcpStream::connect(&server.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 16];
    let read = std::io::Read::read(&mut silent, &mut buf);
    assert!(matches!(read, Ok(0)) || read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset), "closed: {read:?}");
    assert!(server.stderr_text().contains(&format!("https://{}", server.addr)), "the ready line says https");
    server.stop();
}

#[test]
fn a_replaced_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let server = https_server(dir.path(), &sink);
    let first = fingerprint(None, Some(&certs().join("server.pem")));
    let second = fingerprint(None, Some(&certs().join("server2.pem")));
    assert_ne!(first, second);
    assert_eq!(fingerprint(Some(&server.addr), None), first);

    // Replace both files (key first: for a moment they do not match).
    std::fs::copy(certs().join("server2.key"), dir.path().join("server.key")).unwrap();
    std::fs::copy(certs().join("server2.pem"), dir.path().join("server.pem")).unwrap();
    wait_for(
        Duration::from_secs(40),
        || (fingerprint(Some(&server.addr), None) == second).then_some(()),
        || format!("the new certificate served; server:\n{}", server.stderr_tail(20)),
    );
    assert_eq!(fingerprint(Some(&server.admin), None), second, "the admin port reloads too");

    // A certificate that does not match its key: the old pair keeps serving.
    std::fs::copy(certs().join("server.pem"), dir.path().join("server.pem")).unwrap();
    wait_for(
        Duration::from_secs(40),
        || server.stderr_text().contains("reload failed").then_some(()),
        || format!("a failed reload reported; server:\n{}", server.stderr_tail(20)),
    );
    assert_eq!(fingerprint(Some(&server.addr), None), second);
    let metrics =
        sink.block_on(async { https_client().get(format!("https://{}/metrics", server.admin)).send().await.unwrap().text().await.unwrap() });
    assert!(metrics.lines().any(|l| l.starts_with("sluice_tls_reloads_total{") && l.contains("result=\"error\"")), "{metrics}");
    // And the service still works.
    let event = track_event("after-reload", 0);
    let status = sink.block_on(async {
        https_client().post(format!("https://{}/v1/track", server.addr)).basic_auth(WRITE_KEY, Some("")).json(&event).send().await.unwrap().status()
    });
    assert_eq!(status, 200);
    server.stop();
}

// ---- the director RPC over TLS (Kafka and PostgreSQL, as in rpc_auth) ----

#[test]
fn routes_reach_directors_over_mutual_tls_and_refuse_what_they_cannot_trust() {
    let Some(db) = fresh_database("postgres", "rpctls") else { return };
    let root = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(&root.path().join("kafka"), "sluice-test-rpctls") else { return };
    let sink = TestSink::start();
    let hook = sink.sink.url("/hook");
    let cfg = |name: &str, director: &str| role_config(root.path(), name, &broker, &db, &hook, "d1", director);
    let director_tls = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_ca_file = \"{}\"\ntls_client_auth = true\n",
        pem("server.pem"),
        pem("server.key"),
        pem("ca.pem")
    );
    let route_tls = |ca: &str, with_cert: bool| {
        let mut t = format!("tls_ca_file = \"{}\"\n", pem(ca));
        if with_cert {
            t += &format!("tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n", pem("client.pem"), pem("client.key"));
        }
        t
    };

    let director = Server::start_role("director", &cfg("director", &director_tls), &[]);
    assert!(director.stderr_text().contains("\"rpc\":\"https://"), "the director announces an https address:\n{}", director.stderr_tail(10));
    let dedup = Server::start_role("dedup", &cfg("dedup", ""), &[]);
    let ingest = Server::start_role("ingest", &cfg("ingest", ""), &[]);
    let events: Vec<_> = (0..30).map(|i| track_event(&format!("m-{i}"), i)).collect();
    sink.post_batch(&ingest.addr, &events).unwrap();
    let delivered = || sink.by_message_id("/hook").into_iter().filter(|(k, _)| k.starts_with("m-")).count();

    // Routes that cannot make the link hand nothing over, and say why.
    let refused = [
        ("wrong CA", route_tls("wrongca.pem", true), "invalid peer certificate"),
        ("no client certificate", route_tls("ca.pem", false), "director rpc d1 (https://"),
    ];
    for (case, tls, says) in refused {
        let route = Server::start_role("route", &cfg("route", &tls), &[]);
        wait_for(
            Duration::from_secs(60),
            || route.stderr_text().contains(says).then_some(()),
            || format!("{case}: the route says {says:?}; route:\n{}", route.stderr_tail(20)),
        );
        assert_eq!(delivered(), 0, "{case}: nothing handed over");
        route.stop();
    }

    // The route with the CA and its client certificate hands every event over, once.
    let route = Server::start_role("route", &cfg("route", &route_tls("ca.pem", true)), &[]);
    wait_for(
        Duration::from_secs(120),
        || (delivered() >= 30).then_some(()),
        || format!("{} of 30 delivered\nroute:\n{}\ndirector:\n{}", delivered(), route.stderr_tail(20), director.stderr_tail(20)),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(sink.by_message_id("/hook").iter().filter(|(k, _)| k.starts_with("m-")).all(|(_, v)| v.len() == 1), "each event once");
    route.stop();

    // A director whose certificate has expired: the route refuses it.
    director.stop();
    let expired_tls = director_tls.replace(&pem("server.pem"), &pem("expired.pem"));
    let expired = Server::start_role("director", &cfg("director", &expired_tls), &[]);
    let more: Vec<_> = (0..5).map(|i| track_event(&format!("e-{i}"), i)).collect();
    sink.post_batch(&ingest.addr, &more).unwrap();
    let route = Server::start_role("route", &cfg("route", &route_tls("ca.pem", true)), &[]);
    wait_for(
        Duration::from_secs(60),
        || route.stderr_text().contains("certificate expired").then_some(()),
        || format!("the route refuses an expired certificate; route:\n{}", route.stderr_tail(20)),
    );
    assert!(!sink.by_message_id("/hook").keys().any(|k| k.starts_with("e-")), "nothing handed to an expired director");
    route.stop();
    expired.stop();

    // A director without TLS while the route's is on: refused, not sent in plain text.
    let plain_director = Server::start_role("director", &cfg("director", ""), &[]);
    let more: Vec<_> = (0..5).map(|i| track_event(&format!("p-{i}"), i)).collect();
    sink.post_batch(&ingest.addr, &more).unwrap();
    let route = Server::start_role("route", &cfg("route", &route_tls("ca.pem", true)), &[]);
    wait_for(
        Duration::from_secs(60),
        || route.stderr_text().contains("refused: a plain-text address").then_some(()),
        || format!("the route refuses a plain-text director; route:\n{}", route.stderr_tail(20)),
    );
    assert!(!sink.by_message_id("/hook").keys().any(|k| k.starts_with("p-")), "nothing sent in plain text");
    for s in [route, plain_director, ingest, dedup] {
        s.stop();
    }
}

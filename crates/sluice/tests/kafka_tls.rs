//! `log.backend = "kafka"` over protected links, against the real broker
//! `scripts/test.sh` starts with `scripts/kafka.sh start-secure`: an SSL
//! listener that requires a client certificate (mutual TLS) and a SASL_SSL
//! listener (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN), with certificates from
//! `scripts/certs.sh`. Events go through ingest, dedup's transactions and
//! delivery over each kind of link; a link that cannot be made (wrong CA,
//! expired certificate, wrong password, missing client certificate, a
//! plain-text client on a TLS port) stops Sluice with an error naming the
//! link, and never falls back to plain text.
//!
//! Without the secure broker (`SLUICE_TEST_KAFKA_SASL_SSL_BOOTSTRAP` unset)
//! the tests are skipped with a message, unless `SLUICE_REQUIRE_KAFKA=1`.
//! The broker is shared by the tests here (its topics too): they run one
//! at a time, and each checks only the events it sent.

mod util;

use std::path::{Path, PathBuf};
use std::time::Duration;

use util::*;

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The secure broker and certificates `scripts/test.sh` exported.
struct Secure {
    ssl: String,
    sasl_ssl: String,
    /// The broker's PLAINTEXT listener.
    plain: Option<String>,
    user: String,
    password: String,
    certs: PathBuf,
}

fn secure() -> Option<Secure> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("SLUICE_TEST_KAFKA_SSL_BOOTSTRAP"), var("SLUICE_TEST_KAFKA_SASL_SSL_BOOTSTRAP"), var("SLUICE_TEST_CERT_DIR")) {
        (Some(ssl), Some(sasl_ssl), Some(certs)) => Some(Secure {
            ssl,
            sasl_ssl,
            plain: var("SLUICE_TEST_KAFKA_SECURE_PLAIN_BOOTSTRAP"),
            user: var("SLUICE_TEST_KAFKA_SCRAM_USER").unwrap_or_else(|| "sluice".into()),
            password: var("SLUICE_TEST_KAFKA_SCRAM_PASSWORD").unwrap_or_else(|| "sluice-secret".into()),
            certs: PathBuf::from(certs),
        }),
        _ if std::env::var("SLUICE_REQUIRE_KAFKA").as_deref() == Ok("1") => {
            panic!("SLUICE_REQUIRE_KAFKA=1 but the secure broker is not set up (SLUICE_TEST_KAFKA_SASL_SSL_BOOTSTRAP, SLUICE_TEST_CERT_DIR; scripts/test.sh)")
        }
        _ => {
            eprintln!("skipped: no secure Kafka broker (scripts/test.sh starts one with scripts/kafka.sh start-secure)");
            None
        }
    }
}

/// A kafka-mode config in `dir` whose `[log.kafka.primary]` is `primary`
/// (TOML lines after `bootstrap_servers`), delivering to `hook`.
fn config(dir: &Path, bootstrap: &str, primary: &str, hook: &str) -> PathBuf {
    let config = write_config(
        dir,
        &format!(
            "{}\n[log.kafka]\nrequest_timeout = \"5s\"\nproduce_timeout = \"5s\"\n[log.kafka.primary]\nbootstrap_servers = \"{bootstrap}\"\n{primary}\n",
            hook_destination_toml(hook)
        ),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace("[log]\n", "[log]\nbackend = \"kafka\"\n");
    std::fs::write(&config, text).unwrap();
    config
}

fn pem(s: &Secure, name: &str) -> String {
    s.certs.join(name).display().to_string()
}

/// Send `n` events with ids `<prefix>-<i>` (and the first three again) and
/// wait until each has been delivered; then stop the server and check that
/// none was delivered twice.
fn round_trip(sink: &TestSink, server: Server, prefix: &str, n: usize) {
    let events: Vec<_> = (0..n).map(|i| track_event(&format!("{prefix}-{i}"), i)).collect();
    sink.post_batch(&server.addr, &events).expect("acknowledged");
    sink.post_batch(&server.addr, &events[..3]).expect("resend acknowledged");
    let mine = || sink.by_message_id("/hook").into_iter().filter(|(id, _)| id.starts_with(&format!("{prefix}-"))).collect::<Vec<_>>();
    wait_for(
        Duration::from_secs(90),
        || (mine().len() >= n).then_some(()),
        || format!("{n} deliveries of {prefix}-*; got {}; server:\n{}", mine().len(), server.stderr_tail(30)),
    );
    std::thread::sleep(Duration::from_secs(1));
    server.stop();
    let twice: Vec<_> = mine().into_iter().filter(|(_, v)| v.len() > 1).map(|(id, _)| id).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(mine().len(), n);
}

/// SCRAM-SHA-512 over TLS, the password from the environment (nested
/// override): every event is deduplicated and delivered once; dedup's
/// transactions and the group offsets all go over the link.
#[test]
fn sasl_ssl_scram_sha_512_carries_events_end_to_end() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = secure() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let primary = format!(
        "security_protocol = \"sasl_ssl\"\ntls_ca_file = \"{}\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"{}\"\n",
        pem(&s, "ca.pem"),
        s.user
    );
    let config = config(dir.path(), &s.sasl_ssl, &primary, &sink.sink.url("/hook"));
    assert!(!std::fs::read_to_string(&config).unwrap().contains(&s.password), "the password is not in the file");
    let server = Server::start_with_env(&config, &[("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD", &s.password)]);
    round_trip(&sink, server, "scram512", 60);
}

/// SCRAM-SHA-256 and PLAIN over SASL_SSL, and SSL with a client
/// certificate on the listener that requires one.
#[test]
fn scram_sha_256_plain_and_mutual_tls_each_carry_events() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = secure() else { return };
    let sink = TestSink::start();
    let ca = pem(&s, "ca.pem");
    let cases = [
        (
            "scram256",
            &s.sasl_ssl,
            format!("security_protocol = \"sasl_ssl\"\ntls_ca_file = \"{ca}\"\nsasl_mechanism = \"SCRAM-SHA-256\"\nsasl_username = \"{}\"\n", s.user),
            s.password.clone(),
        ),
        (
            "plain",
            &s.sasl_ssl,
            format!("security_protocol = \"sasl_ssl\"\ntls_ca_file = \"{ca}\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"plainuser\"\n"),
            "plain-secret".to_owned(),
        ),
        (
            "mtls",
            &s.ssl,
            format!(
                "security_protocol = \"ssl\"\ntls_ca_file = \"{ca}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
                pem(&s, "client.pem"),
                pem(&s, "client.key")
            ),
            String::new(),
        ),
    ];
    for (name, bootstrap, primary, password) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), bootstrap, &primary, &sink.sink.url("/hook"));
        let env: Vec<(&str, &str)> =
            if password.is_empty() { vec![] } else { vec![("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD", password.as_str())] };
        let server = Server::try_start_role("serve", &config, &env).unwrap_or_else(|e| panic!("{name}: {e}"));
        round_trip(&sink, server, name, 20);
    }
}

/// Start `sluice serve` with a link that cannot be made: it must exit with
/// an error naming the link and containing each of `expect`.
fn refused(name: &str, bootstrap: &str, primary: &str, password: Option<&str>, expect: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), bootstrap, primary, "http://127.0.0.1:9/hook");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_BACKTRACE", "0")
        .envs(password.map(|p| ("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD", p)))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run sluice");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}: sluice started over a link that should fail:\n{err}");
    assert!(!err.contains("Sluice is ready"), "{name}: became ready:\n{err}");
    let last = err.lines().rev().take(8).collect::<Vec<_>>().join("\n");
    assert!(last.contains("kafka primary"), "{name}: the error names the link:\n{last}");
    for e in expect {
        assert!(last.contains(e), "{name}: the error says {e:?}:\n{last}");
    }
}

#[test]
fn a_link_that_cannot_be_made_stops_sluice_naming_it() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = secure() else { return };
    let sasl = |ca: &str, mech: &str| {
        format!("security_protocol = \"sasl_ssl\"\ntls_ca_file = \"{}\"\nsasl_mechanism = \"{mech}\"\nsasl_username = \"{}\"\n", pem(&s, ca), s.user)
    };
    let pw = Some(s.password.as_str());
    // A CA that did not sign the broker's certificate.
    refused("wrong CA", &s.sasl_ssl, &sasl("wrongca.pem", "SCRAM-SHA-512"), pw, &["TLS failed", "certificate verify failed"]);
    // The right CA, the wrong password (both SCRAM flavours).
    for mech in ["SCRAM-SHA-512", "SCRAM-SHA-256"] {
        refused(
            "wrong password",
            &s.sasl_ssl,
            &sasl("ca.pem", mech),
            Some("not-the-password"),
            &["SASL authentication failed", "invalid credentials"],
        );
    }
    // The mutual-TLS listener without a client certificate.
    let ssl_no_cert = format!("security_protocol = \"ssl\"\ntls_ca_file = \"{}\"\n", pem(&s, "ca.pem"));
    refused("no client certificate", &s.ssl, &ssl_no_cert, None, &["TLS failed"]);
    // A plain-text client on the TLS listener: no answer, no fallback.
    refused("plain text to a TLS port", &s.sasl_ssl, "", None, &["no answer"]);
    // A TLS client on a plain-text listener.
    if let Some(plain) = &s.plain {
        refused("TLS to a plain-text port", plain, &ssl_no_cert, None, &["TLS failed"]);
    }
}

/// A broker whose certificate has expired (an `openssl s_server` with the
/// expired certificate the CA signed: the handshake is all that is tried).
#[test]
fn an_expired_broker_certificate_is_refused() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(s) = secure() else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-cert", &pem(&s, "expired.pem"), "-key", &pem(&s, "server.key")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop), || "openssl s_server to listen".into());
    let ssl = format!("security_protocol = \"ssl\"\ntls_ca_file = \"{}\"\n", pem(&s, "ca.pem"));
    refused("expired certificate", &format!("127.0.0.1:{port}"), &ssl, None, &["TLS failed", "certificate verify failed"]);
    let _ = server.kill();
    let _ = server.wait();
}

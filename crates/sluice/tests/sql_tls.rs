//! `deliver.jobdb_url` over TLS (issue 12), against the TLS-only PostgreSQL
//! (`sslmode=verify-full`) and MariaDB (`ssl-mode=VERIFY_IDENTITY`) servers
//! `scripts/test.sh` starts with `scripts/sql.sh start-postgres|start-mariadb
//! <dir> <port> <cert-dir>` (`SLUICE_TEST_POSTGRES_TLS_URL`,
//! `SLUICE_TEST_MYSQL_TLS_URL`; certificates from `scripts/certs.sh`). Every
//! link to the database goes over TLS: the JobDBs, the control tables and the
//! directory of directors. Both servers refuse plain-text clients, so a
//! working link is an encrypted one. A link that cannot be made (wrong CA,
//! expired server certificate, wrong password, plain text) stops Sluice with
//! an error naming the link and the step that failed; a TLS mode that may
//! fall back to plain text is refused before anything is connected.
//!
//! Without the servers the tests are skipped with a message, unless
//! `SLUICE_REQUIRE_SQL=1`.

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::*;

/// The TLS server's URL in `var`, or `None` (skipped) unless `SLUICE_REQUIRE_SQL=1`.
fn tls_server(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("SLUICE_REQUIRE_SQL").as_deref() == Ok("1") => panic!("{var} is not set and SLUICE_REQUIRE_SQL=1"),
        _ => {
            eprintln!("skipped: {var} is not set (scripts/sql.sh start-postgres|start-mariadb <dir> <port> <cert-dir> starts one)");
            None
        }
    }
}

/// `url` with query parameter `key` set to `value` (`None`: removed).
fn with_param(url: &str, key: &str, value: Option<&str>) -> String {
    let mut u = url::Url::parse(url).unwrap();
    let mut pairs: Vec<(String, String)> = u.query_pairs().filter(|(k, _)| k != key).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    if let Some(v) = value {
        pairs.push((key.to_owned(), v.to_owned()));
    }
    u.set_query(None);
    if !pairs.is_empty() {
        u.query_pairs_mut().extend_pairs(&pairs);
    }
    u.to_string()
}

/// The directory of the certificates `url`'s CA parameter names (scripts/certs.sh's output).
fn cert_dir(url: &str) -> PathBuf {
    let u = url::Url::parse(url).unwrap();
    let ca = u.query_pairs().find(|(k, _)| k == "sslrootcert" || k == "ssl-ca").map(|(_, v)| v.into_owned()).expect("a CA in the TLS URL");
    Path::new(&ca).parent().unwrap().to_owned()
}

/// The TLS server `engine` (`postgres` or `mysql`) and a database of its own
/// there for test `test`: (server URL, database URL).
fn fresh_tls_database(engine: &str, test: &str) -> Option<(String, String)> {
    let server = tls_server(if engine == "mysql" { "SLUICE_TEST_MYSQL_TLS_URL" } else { "SLUICE_TEST_POSTGRES_TLS_URL" })?;
    let db = create_database(engine, &server, test);
    Some((server, db))
}

/// Drop the database of [`fresh_tls_database`].
fn drop_database(server: &str, db_url: &str) {
    use sqlx::Connection;
    let name = url::Url::parse(db_url).unwrap().path().trim_start_matches('/').to_owned();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        if server.starts_with("mysql") {
            let mut c = sqlx::MySqlConnection::connect(server).await.unwrap();
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}")).execute(&mut c).await.unwrap();
        } else {
            let mut c = sqlx::PgConnection::connect(server).await.unwrap();
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await.unwrap();
        }
    });
}

fn jobdb_config(dir: &Path, jobdb_url: &str, hook: &str) -> PathBuf {
    write_config(dir, &format!("[deliver]\njobdb_url = \"{jobdb_url}\"\n{}", hook_destination_toml(hook)))
}

/// `url` without password and query, as Sluice names the link in errors.
fn link(url: &str) -> String {
    let mut u = url::Url::parse(url).unwrap();
    let _ = u.set_password(None);
    u.set_query(None);
    u.to_string()
}

/// Run `sluice serve` with `jobdb_url`, which must not start: its stderr.
/// (Killed after 60 s: a link that hangs is a failure too.)
fn serve_refused(what: &str, jobdb_url: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = jobdb_config(dir.path(), jobdb_url, "http://127.0.0.1:9/hook");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_BACKTRACE", "0")
        .env_remove("PGSSLMODE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sluice");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: sluice neither started nor stopped within 60 s:\n{}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().unwrap();
    assert!(!status.success(), "{what}: sluice started over a link that should fail:\n{err}");
    assert!(!err.contains("Sluice is ready"), "{what}: became ready:\n{err}");
    err
}

/// Each of `expect` is in the error (the last lines of `err`), which names
/// the link and holds no password.
fn check_error(what: &str, err: &str, url: &str, expect: &[&str]) {
    let last = err.lines().rev().take(8).collect::<Vec<_>>().join("\n");
    assert!(last.contains(&link(url)), "{what}: the error names the link {}:\n{last}", link(url));
    if let Some(pw) = url::Url::parse(url).unwrap().password() {
        assert!(!err.contains(&format!(":{pw}@")), "{what}: no password in the output:\n{err}");
    }
    for e in expect {
        assert!(last.contains(e), "{what}: the error says {e:?}:\n{last}");
    }
}

/// Events through a `sluice serve` whose JobDBs and control tables are in
/// the TLS database, then the directory of directors on the same link.
fn delivers_over_tls(engine: &str) {
    let Some((server, db)) = fresh_tls_database(engine, "tls_ok") else { return };
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let config = jobdb_config(dir.path(), &db, &sink.sink.url("/hook"));
    let sluice = Server::start(&config);
    let n = 20;
    let events: Vec<_> = (0..n).map(|i| track_event(&format!("tls-{engine}-{i}"), i)).collect();
    sink.post_batch(&sluice.addr, &events).expect("acknowledged");
    wait_for(
        Duration::from_secs(60),
        || (sink.by_message_id("/hook").len() >= n).then_some(()),
        || format!("{n} deliveries, got {}; sluice:\n{}", sink.by_message_id("/hook").len(), sluice.stderr_tail(30)),
    );
    let log = sluice.stderr_text();
    assert!(log.contains("jobdb link: TLS, verifying the server's certificate and host name"), "the link is logged as verified TLS:\n{log}");
    assert!(!log.contains("plain text"), "{log}");
    sluice.stop();
    assert!(sink.by_message_id("/hook").values().all(|v| v.len() == 1), "each event delivered once");

    // The directory of directors (the scaled-out roles) on the same link.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let directory = sluice_deliver::cluster::Directory::connect(&db).await.unwrap_or_else(|e| panic!("directory over TLS: {e}"));
        directory.heartbeat("d-tls", "http://127.0.0.1:1").await.unwrap();
        let live = directory.live(Duration::from_secs(60)).await.unwrap();
        assert_eq!(live.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["d-tls"]);
    });
    drop_database(&server, &db);
}

#[test]
fn postgres_verify_full_carries_jobdbs_control_tables_and_directory() {
    delivers_over_tls("postgres");
}

#[test]
fn mariadb_verify_identity_carries_jobdbs_control_tables_and_directory() {
    delivers_over_tls("mysql");
}

/// Links that cannot be made stop `sluice serve`, naming the link and the
/// step: a CA that did not sign the server's certificate, a wrong
/// password, and plain text to the TLS-only server (refused by the server;
/// nothing falls back).
fn refused_links(engine: &str) {
    let Some((server, db)) = fresh_tls_database(engine, "tls_refused") else { return };
    let certs = cert_dir(&server);
    let wrong_ca = certs.join("wrongca.pem").display().to_string();
    let (ca_key, mode_key, plain) = if engine == "mysql" { ("ssl-ca", "ssl-mode", "DISABLED") } else { ("sslrootcert", "sslmode", "disable") };

    let url = with_param(&db, ca_key, Some(&wrong_ca));
    let err = serve_refused("wrong CA", &url, &[]);
    check_error("wrong CA", &err, &url, &["TLS handshake failed", "certificate", "UnknownIssuer"]);

    let mut url = url::Url::parse(&db).unwrap();
    url.set_password(Some("not-the-password")).unwrap();
    let url = url.to_string();
    let err = serve_refused("wrong password", &url, &[]);
    check_error("wrong password", &err, &url, &["authentication failed"]);

    let url = with_param(&with_param(&db, ca_key, None), mode_key, Some(plain));
    let err = serve_refused("plain text", &url, &[]);
    let expect: &[&str] = if engine == "mysql" {
        // MariaDB answers a plain-text client of a REQUIRE SSL user with 1045.
        &["authentication failed", "requires TLS"]
    } else {
        &["refused by the server", "no encryption"]
    };
    check_error("plain text", &err, &url, expect);
    assert!(err.contains(&format!("jobdb link: plain text ({mode_key}={plain})")), "{err}");
    drop_database(&server, &db);
}

#[test]
fn postgres_links_that_cannot_be_made_stop_sluice_naming_them() {
    refused_links("postgres");
}

#[test]
fn mariadb_links_that_cannot_be_made_stop_sluice_naming_them() {
    refused_links("mysql");
}

/// Modes that may fall back to plain text are refused before anything is
/// connected: by `config check` with the key named, and (`PGSSLMODE`, which
/// sqlx reads too) when the URL is used. No server needed.
#[test]
fn modes_that_may_fall_back_to_plain_text_are_refused() {
    for (url, setting) in [
        ("postgres://u:secret@127.0.0.1:9/db?sslmode=prefer", "sslmode=prefer"),
        ("postgres://u:secret@127.0.0.1:9/db?sslmode=allow", "sslmode=allow"),
        ("mysql://u:secret@127.0.0.1:9/db?ssl-mode=PREFERRED", "ssl-mode=PREFERRED"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = jobdb_config(dir.path(), url, "http://127.0.0.1:9/hook");
        let out = sluice_cmd(&["config", "check", "--config", config.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: config check passed");
        assert!(err.contains("deliver.jobdb_url") && err.contains(setting) && err.contains("plain text"), "{url}:\n{err}");
        assert!(!err.contains("secret"), "{err}");
    }
    // The mode from PGSSLMODE: the URL names none, so config check cannot see it.
    let url = "postgres://u:secret@127.0.0.1:9/db";
    let err = serve_refused("PGSSLMODE=prefer", url, &[("PGSSLMODE", "prefer")]);
    check_error("PGSSLMODE=prefer", &err, url, &["PGSSLMODE=prefer", "may fall back to plain text"]);
    // A CA without a mode would go unused (plain text): refused.
    let err = serve_refused("a CA without a mode", "postgres://u:secret@127.0.0.1:9/db?sslrootcert=/etc/hostname", &[]);
    assert!(err.contains("sslrootcert is given but no TLS mode"), "{err}");
}

/// Relay one client at a time: the protocol's plain-text preamble (the
/// PostgreSQL SSLRequest, or MySQL's greeting and SSL request) with the
/// real server at `real`, then the client's TLS handshake to `tls` (an
/// `openssl s_server`). The listener's address.
fn tls_relay(engine: &'static str, real: String, tls: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let real = real.clone();
            let tls = tls.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                if engine == "postgres" {
                    let mut request = [0u8; 8];
                    client.read_exact(&mut request)?;
                    client.write_all(b"S")?;
                } else {
                    // The real server's greeting (it offers TLS), then the client's SSL request.
                    let mut server = TcpStream::connect(&real)?;
                    client.write_all(&read_mysql_packet(&mut server)?)?;
                    read_mysql_packet(&mut client)?;
                }
                let to = TcpStream::connect(&tls)?;
                let (mut a, mut b) = (client.try_clone()?, to.try_clone()?);
                let up = std::thread::spawn(move || std::io::copy(&mut a, &mut b));
                let (mut a, mut b) = (to, client);
                let _ = std::io::copy(&mut a, &mut b);
                let _ = up.join();
                Ok(())
            });
        }
    });
    addr
}

fn read_mysql_packet(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
    let mut packet = head.to_vec();
    packet.resize(4 + len, 0);
    s.read_exact(&mut packet[4..])?;
    Ok(packet)
}

/// A server whose certificate has expired (signed by the right CA, with the
/// right host name): an `openssl s_server` with `expired.pem`, behind a
/// relay that speaks the protocol's plain-text preamble. Only the handshake
/// is tried; it fails naming the link.
fn expired_certificate(engine: &'static str) {
    let Some(server) = tls_server(if engine == "mysql" { "SLUICE_TEST_MYSQL_TLS_URL" } else { "SLUICE_TEST_POSTGRES_TLS_URL" }) else { return };
    let certs = cert_dir(&server);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pem = |f: &str| certs.join(f).display().to_string();
    let s_server = Command::new("openssl")
        .args(["s_server", "-quiet", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-cert", &pem("expired.pem"), "-key", &pem("server.key")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let _s_server = KillOnDrop(s_server);
    wait_for(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).ok().map(drop), || "openssl s_server to listen".into());
    let real = url::Url::parse(&server).unwrap();
    let real = format!("{}:{}", real.host_str().unwrap(), real.port().unwrap());
    let relay = tls_relay(engine, real, format!("127.0.0.1:{port}"));
    let mut url = url::Url::parse(&server).unwrap();
    url.set_port(Some(relay.rsplit(':').next().unwrap().parse().unwrap())).unwrap();
    url.set_path("/sluice_never_created");
    let url = url.to_string();
    let err = serve_refused("expired certificate", &url, &[]);
    check_error("expired certificate", &err, &url, &["TLS handshake failed", "certificate expired"]);
}

/// A child process killed when the test ends, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn postgres_refuses_an_expired_server_certificate() {
    expired_certificate("postgres");
}

#[test]
fn mariadb_refuses_an_expired_server_certificate() {
    expired_certificate("mysql");
}

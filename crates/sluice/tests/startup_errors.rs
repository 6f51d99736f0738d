//! A start that fails half-way (a corrupt control database, a port taken)
//! ends the process cleanly: exit code 1, never a signal, a message naming
//! what failed, and nothing it had started (dedup's RocksDB threads, the
//! log's writers) still running while the process exits. Before, `serve`
//! returned the error with dedup's threads still running: they logged
//! "the log is shut down" once the runtime was gone, and the process could
//! die of SIGSEGV/SIGABRT in exit() (RocksDB torn down under them).

mod util;

use std::process::{Command, Output};

use util::*;

fn serve(config: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(config)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run sluice")
}

/// Exit code 1 (not a signal), the message names `needle`, and no stage
/// started before the failure was still at work after it.
fn check_clean_failure(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), None, "killed by a signal: {:?}\n{err}", out.status);
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "the error does not name {needle:?}:\n{err}");
    for outlived in ["the log is shut down", "dedup batch failed", "panicked"] {
        assert!(!err.contains(outlived), "something outlived the failed start ({outlived:?}):\n{err}");
    }
    assert!(err.contains("start failed; stopping what was started"), "{err}");
}

#[test]
fn corrupt_control_database_exits_1_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(data.join("control.sqlite"), garbage).unwrap();
    // Several runs: the crash at exit was a race.
    for _ in 0..5 {
        let out = serve(&config, &["--admin-listen", ""]);
        check_clean_failure(&out, "control.sqlite");
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open the control database"));
    }
}

#[test]
fn admin_port_taken_exits_1_after_stopping_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    // Taken after the log, dedup, the control database and delivery are up.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for _ in 0..3 {
        let out = serve(&config, &["--admin-listen", &addr]);
        check_clean_failure(&out, "admin.listen");
    }
}

#[test]
fn a_bad_environment_override_is_named_not_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    for (var, value) in [("SLUICE_LOG__PARTITIONS", "lots"), ("SLUICE_LOG__PARTITIONS", "0"), ("SLUICE_LOG__PARTITONS", "3")] {
        for args in [&["config", "check", "--config"][..], &["serve", "--config"][..]] {
            let out = Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).arg(&config).env(var, value).env("RUST_BACKTRACE", "0").output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains(var), "{var}={value}: the variable is not named: {err}");
            assert!(!err.contains(config.to_str().unwrap()), "{var}={value}: the file is named: {err}");
        }
    }
}

/// A SIGTERM that arrives while the stages are still starting stops the
/// process cleanly once they have started (exit 0), never by the default
/// action of the signal. The handler used to be installed only after the
/// ready line, so a supervisor (or a test) that stopped a process the moment
/// it logged "ready" could kill it with status "signal 15".
#[test]
fn a_sigterm_during_startup_stops_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // The first line comes from the first stage to start, well before "ready".
    let first = lines.next().expect("a first log line").expect("stderr");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    let log = format!("{first}\n{}", rest.join("\n"));
    assert!(status.success(), "sluice exited with {status} after a SIGTERM during startup:\n{log}");
    assert!(log.contains("shutting down"), "{log}");
}

/// SIGHUP (a closed terminal) stops `serve` gracefully, like SIGTERM: it
/// used to end the process by the signal's default action (exit 129, no
/// shutdown).
#[test]
fn a_sighup_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut server = Server::start(&config);
    Command::new("kill").args(["-HUP", &server.pid().to_string()]).status().expect("kill -HUP");
    let status = server.wait_exit(std::time::Duration::from_secs(60)).expect("exits");
    assert!(status.success(), "sluice exited with {status}:\n{}", server.stderr_tail(10));
    assert!(server.stderr_text().contains("\"stopped\""), "{}", server.stderr_tail(10));
}

/// A second `sluice serve` on the database another one is using is refused
/// before it changes anything shared: its config's sources and destinations
/// must not replace the running server's in the control tables (they would
/// be live within a refresh: the running server's write key refused, its
/// destination pointed elsewhere).
#[test]
fn a_second_serve_on_the_same_database_is_refused_before_it_seeds_the_control_tables() {
    let Some(db) = fresh_database("postgres", "scopelock") else { return };
    let first_dir = tempfile::tempdir().unwrap();
    let first_config = write_config(first_dir.path(), &format!("[deliver]\njobdb_url = \"{db}\"\n"));
    let first = Server::start(&first_config);

    let second_dir = tempfile::tempdir().unwrap();
    let second_config = second_dir.path().join("sluice.toml");
    let text =
        std::fs::read_to_string(&first_config).unwrap().replace(&first_dir.path().display().to_string(), &second_dir.path().display().to_string());
    let text = text.replace(WRITE_KEY, "wk_the_other_config");
    std::fs::write(&second_config, &text).unwrap();
    let out = serve(&second_config, &[]);
    check_clean_failure(&out, "another `sluice serve` is using this database");
    // Red team (issue 13): with delivery off it took no lock and seeded (F1);
    // the database spelled another way took other locks (F3).
    let mut alias = url::Url::parse(&db).unwrap();
    let name = alias.path().trim_start_matches('/').to_owned();
    alias.set_path("/postgres");
    alias.query_pairs_mut().append_pair("dbname", &name);
    let variants = [
        text.replace("[deliver]\n", "[deliver]\nenabled = false\n"),
        text.replace(&db, alias.as_str()),
        text.replace(&format!("/{name}"), &format!("/%{:02X}{}", name.as_bytes()[0], &name[1..])),
    ];
    for variant in variants {
        assert_ne!(variant, text, "the variant differs");
        std::fs::write(&second_config, &variant).unwrap();
        check_clean_failure(&serve(&second_config, &[]), "another `sluice serve` is using this database");
    }

    let control = sluice_deliver::control::ControlDb::open_url(&db, &first_dir.path().join("data")).unwrap();
    let keys: Vec<String> = control.read().unwrap().sources.into_iter().map(|(s, _)| s.write_key).collect();
    assert_eq!(keys, [WRITE_KEY], "the refused process left the sources as they were");
    first.stop();
}

/// Red team (issue 13, F2): the scope lock lives in one database session.
/// When that session ends under a running serve, (a) a second serve that
/// starts meanwhile is refused before it seeds (the first one's JobDB locks
/// are still held), (b) the first one takes its lock again, (d) a check
/// that fails while the session lives is not a loss, and (c) if another
/// session holds the lock for good, the first one stops with an error
/// rather than deliver beside another process.
#[test]
fn a_serve_whose_scope_session_ends_takes_it_again_or_stops() {
    use sqlx::{Connection, Row};
    let Some(db) = fresh_database("postgres", "scopewatch") else { return };
    let first_dir = tempfile::tempdir().unwrap();
    let first_config = write_config(first_dir.path(), &format!("[deliver]\njobdb_url = \"{db}\"\n"));
    let mut first = Server::start(&first_config);
    let key = sluice_deliver::sqljobdb::SqlJobDbs::new(&db).unwrap().postgres_lock_key("serve");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut sql = rt.block_on(sqlx::PgConnection::connect(&db)).unwrap();
    let holder = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND ((classid::bigint << 32) | objid::bigint) = $1";
    let end_scope_session = |sql: &mut sqlx::PgConnection| {
        rt.block_on(async {
            let pid: i32 = sqlx::query(holder).bind(key).fetch_one(&mut *sql).await.expect("the scope lock is held").get(0);
            sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&mut *sql).await.unwrap();
            pid
        })
    };

    // (a)
    let ended = end_scope_session(&mut sql);
    let second_dir = tempfile::tempdir().unwrap();
    let second_config = second_dir.path().join("sluice.toml");
    let text =
        std::fs::read_to_string(&first_config).unwrap().replace(&first_dir.path().display().to_string(), &second_dir.path().display().to_string());
    std::fs::write(&second_config, text.replace(WRITE_KEY, "wk_the_other_config")).unwrap();
    // Refused by the JobDB lock still held ("holds the director lock of
    // JobDB …"), or by the scope lock if the first took it again already.
    check_clean_failure(&serve(&second_config, &[]), "another `sluice serve` is using this database");
    let control = sluice_deliver::control::ControlDb::open_url(&db, &first_dir.path().join("data")).unwrap();
    let keys: Vec<String> = control.read().unwrap().sources.into_iter().map(|(s, _)| s.write_key).collect();
    assert_eq!(keys, [WRITE_KEY], "the refused process left the sources as they were");

    // (b)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !first.stderr_text().contains("scope lock taken again") {
        assert!(std::time::Instant::now() < deadline, "not taken again:\n{}", first.stderr_tail(20));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let now: i32 = rt.block_on(sqlx::query(holder).bind(key).fetch_one(&mut sql)).unwrap().get(0);
    assert_ne!(now, ended, "a new session holds it");

    // (d) A check that fails while the session lives on (an operator's
    // pg_cancel_backend, a stall) is not a lost lock: the serve carries on
    // (red team: it stopped, blaming "another process").
    let holder_pid = now;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !first.stderr_text().contains("this process's session still holds the lock") {
        assert!(std::time::Instant::now() < deadline, "no check was cancelled:\n{}", first.stderr_tail(20));
        let cancel = format!(
            "DO $$ DECLARE t timestamptz := clock_timestamp() + interval '3 seconds'; BEGIN
               WHILE clock_timestamp() < t LOOP PERFORM pg_cancel_backend({holder_pid}); END LOOP; END $$"
        );
        rt.block_on(sqlx::raw_sql(&cancel).execute(&mut sql)).unwrap();
    }
    assert!(first.wait_exit(std::time::Duration::from_secs(6)).is_none(), "a cancelled check stopped the serve:\n{}", first.stderr_tail(20));

    // (c)
    end_scope_session(&mut sql);
    let mut thief = rt.block_on(sqlx::PgConnection::connect(&db)).unwrap();
    let took: bool = rt.block_on(sqlx::query("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut thief)).unwrap().get(0);
    assert!(took, "the test takes the free scope lock");
    let status = first.wait_exit(std::time::Duration::from_secs(60)).expect("the first serve stops");
    assert!(!status.success(), "it stops with an error");
    let said = first.stderr_text();
    assert!(said.contains("took this process's JobDB scope"), "{said}");
    drop(thief);
}

/// Switching to `deliver.jobdb_url` moves nothing: JobDB files left in
/// `data_dir/jobs` are not read while it is set, and the start says so.
#[test]
fn jobdb_files_left_from_before_jobdb_url_are_named_at_start() {
    let Some(db) = fresh_database("postgres", "leftfiles") else { return };
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("data").join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    drop(sluice_deliver::jobdb::JobDb::open(&jobs.join("jobdb-000001.sqlite")).unwrap());
    let config = write_config(dir.path(), &format!("[deliver]\njobdb_url = \"{db}\"\n"));
    let server = Server::start(&config);
    let said = server.stderr_text();
    assert!(said.contains("JobDB files from before deliver.jobdb_url was set are not read while it is"), "{said}");
    server.stop();
}

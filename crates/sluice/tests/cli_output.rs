//! CLI output: a closed stdout (`sluice jobs inspect … | head -1`) ends a
//! tool quietly, never with a panic; a stdout that fails otherwise
//! (`> /dev/full`) is an error the tool names, with status 1; and `sluice
//! sink` keeps bounded memory however many requests it receives.

mod util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_deliver::sink::{Keep, Sink, LONG_PATHS, MAX_COUNTED_PATH, MAX_KEPT_PATH, MAX_PATHS};
use util::*;

fn sluice() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env_remove("SLUICE_CONFIG").env_remove("SLUICE_CRASH_AT").env("RUST_BACKTRACE", "0");
    c
}

/// POST `body` to `http://addr{path}` and read the answer (plain HTTP/1.1, one connection).
fn post(addr: &str, path: &str, key: &str, body: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "POST {path} HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {key}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// A pipe whose reader is gone: every write to it fails with EPIPE.
fn broken_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    writer
}

/// Ended by SIGPIPE (as `head` expects of a Unix tool) or with status 0;
/// no panic message, no "Broken pipe" error.
fn check_quiet_end(what: &str, status: std::process::ExitStatus, stderr: &str) {
    #[cfg(unix)]
    let by_sigpipe = {
        use std::os::unix::process::ExitStatusExt;
        status.signal() == Some(13)
    };
    #[cfg(not(unix))]
    let by_sigpipe = false;
    assert!(status.success() || by_sigpipe || status.code() == Some(141), "{what}: ended with {status:?}\n{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{what}: {stderr}");
}

/// A config and a data dir with a log, a delivered job (message "m-pipe")
/// and a control database: something for every tool to print.
fn tool_fixture() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let config = write_config(dir.path(), &hook_destination_toml(&sink.sink.url("/hook")));
    let server = Server::start(&config);
    sink.post_batch(&server.addr, &[track_event("m-pipe", 0)]).unwrap();
    wait_for(Duration::from_secs(30), || (sink.sink.count() > 0).then_some(()), || "the event delivered".into());
    server.stop();
    let config = config.to_str().unwrap().to_owned();
    let data = dir.path().join("data").to_str().unwrap().to_owned();
    (dir, config, data)
}

fn tool_commands<'a>(config: &'a str, data: &'a str) -> Vec<Vec<&'a str>> {
    vec![
        vec!["config", "check", "--config", config],
        vec!["jobs", "stats", "--config", config],
        vec!["jobs", "inspect", "--config", config, "m-pipe"],
        vec!["dead-letters", "list", "--config", config],
        vec!["log", "tail", "--data-dir", data],
    ]
}

#[test]
fn tools_end_quietly_when_stdout_is_closed() {
    let (_dir, config, data) = tool_fixture();
    let mut commands = tool_commands(&config, &data);
    commands.push(vec!["--help"]);
    for args in commands {
        let out = sluice().args(&args).stdin(Stdio::null()).stdout(broken_pipe()).output().unwrap();
        check_quiet_end(&args.join(" "), out.status, &String::from_utf8_lossy(&out.stderr));
    }
}

/// A stdout that fails otherwise (`> /dev/full`) is an error the tool
/// names, with status 1: it was a panic ("failed printing to stdout",
/// status 101).
#[cfg(target_os = "linux")]
#[test]
fn tools_report_a_failing_stdout() {
    let (_dir, config, data) = tool_fixture();
    for args in tool_commands(&config, &data) {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let out = sluice().args(&args).stdin(Stdio::null()).stdout(Stdio::from(full)).output().unwrap();
        let what = args.join(" ");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: ended with {:?}\n{stderr}", out.status);
        assert!(stderr.contains("cannot write to stdout: No space left on device"), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
}

#[test]
fn sink_ends_quietly_when_stdout_is_closed() {
    let mut child =
        sluice().args(["sink", "--listen", "127.0.0.1:0"]).stdin(Stdio::null()).stdout(broken_pipe()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let addr = first.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).expect("sink address").to_owned();
    post(&addr, "/hook", "m0", "{}").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sink still running 20 s after its stdout was closed");
        }
        // Keep it printing.
        let _ = post(&addr, "/hook", "m1", "{}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    check_quiet_end("sink", status, &rest);
}

#[test]
fn sink_prints_what_it_receives() {
    let mut child =
        sluice().args(["sink", "--listen", "127.0.0.1:0"]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let addr = first.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).expect("sink address").to_owned();
    for i in 0..3 {
        let answer = post(&addr, "/hook?status=202", &format!("m{i}"), &format!("{{\"n\":{i}}}")).unwrap();
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        stdout.read_line(&mut l).unwrap();
        lines.push(l);
    }
    let _ = child.kill();
    let _ = child.wait();
    for (i, l) in lines.iter().enumerate() {
        assert!(l.starts_with("202 /hook idempotency-key=") && l.contains(&format!("{{\"n\":{i}}}")), "{lines:?}");
    }
}

/// `sluice sink`'s memory is bounded: it keeps the newest requests only
/// (by count and by body bytes), counts the rest, and a reader asking for
/// what is new gets only that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_keeps_a_bounded_ring_of_recent_requests() {
    let sink = Sink::start_bounded("127.0.0.1:0".parse().unwrap(), Keep { requests: 100, bytes: 64 << 10 }).await.unwrap();
    let client = reqwest::Client::new();
    for i in 0..300 {
        client.post(sink.url("/a")).body(format!("{i:04}")).send().await.unwrap();
    }
    assert_eq!(sink.count(), 300);
    assert_eq!(sink.state.path_count("/a"), 300);
    let kept = sink.received();
    assert_eq!(kept.len(), 100, "only the newest 100 are kept");
    assert_eq!(&kept[0].body[..], b"0200");
    assert_eq!(&kept[99].body[..], b"0299");

    let since = sink.received_since(0);
    assert_eq!((since.received.len(), since.missed, since.next), (100, 200, 300));
    let since = sink.received_since(290);
    assert_eq!((since.received.len(), since.missed, since.next), (10, 0, 300));
    assert_eq!(&since.received[0].body[..], b"0290");
    let since = sink.received_since(300);
    assert_eq!((since.received.len(), since.missed, since.next), (0, 0, 300));

    // Bodies: at most 64 KiB kept in all (with paths and headers); one larger body is kept cut.
    for _ in 0..4 {
        client.post(sink.url("/big")).body(vec![b'x'; 40 << 10]).send().await.unwrap();
    }
    let kept = sink.received();
    let bytes: usize = kept.iter().map(|r| r.body.len()).sum();
    assert!(bytes <= 64 << 10, "{bytes} body bytes kept");
    assert_eq!(kept.last().unwrap().body.len(), 40 << 10, "the newest is kept whole");
    client.post(sink.url("/huge")).body(vec![b'y'; 1 << 20]).send().await.unwrap();
    let kept = sink.received();
    assert_eq!(kept.len(), 1, "a body over the byte bound is kept cut");
    assert!(kept[0].body.len() > 63 << 10 && kept[0].body.len() < 64 << 10, "cut to the bound less its path and headers: {}", kept[0].body.len());
    assert!(sink.state.kept_bytes() <= 64 << 10, "{}", sink.state.kept_bytes());
    assert_eq!(sink.count(), 305);

    // Per-path counters stop at MAX_PATHS distinct paths.
    let quiet = Sink::start_bounded("127.0.0.1:0".parse().unwrap(), Keep { requests: 0, bytes: 0 }).await.unwrap();
    for i in 0..MAX_PATHS + 10 {
        client.get(quiet.url(&format!("/p{i}"))).send().await.unwrap();
    }
    assert_eq!(quiet.count(), (MAX_PATHS + 10) as u64);
    assert!(quiet.received().is_empty(), "keep 0 keeps nothing");
    assert_eq!(quiet.state.path_count("/p0"), 1);
    assert_eq!(quiet.state.path_count(&format!("/p{}", MAX_PATHS + 5)), 0, "paths past MAX_PATHS are not counted one by one");
}

/// Paths and headers count against `--keep-bytes` too, kept paths are cut,
/// and long paths share one per-path counter: keep-alive POSTs to long,
/// distinct paths took `sluice sink` from 31 MB to 834 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_memory_is_bounded_with_long_paths() {
    let bound = 256 << 10;
    let sink = Sink::start_bounded("127.0.0.1:0".parse().unwrap(), Keep { requests: 10_000, bytes: bound }).await.unwrap();
    let client = reqwest::Client::new();
    let long = "a".repeat(60_000);
    let n = 400;
    for i in 0..n {
        let answer = client.post(sink.url(&format!("/{i}{long}"))).header("x-pad", "b".repeat(2000)).body("{}").send().await.unwrap();
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(sink.count(), n);
    // Kept: within the bound, counting paths and headers; paths cut.
    let kept = sink.received();
    assert!(!kept.is_empty() && kept.len() < n as usize, "{} kept", kept.len());
    assert!(sink.state.kept_bytes() <= bound, "{} bytes kept", sink.state.kept_bytes());
    let held: usize =
        kept.iter().map(|r| r.path.len() + r.body.len() + r.headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum::<usize>()).sum();
    assert!(held <= bound, "{held} bytes of paths, headers and bodies kept");
    assert!(kept.iter().all(|r| r.path.len() <= MAX_KEPT_PATH), "kept paths are cut");
    let last = kept.last().unwrap();
    assert!(last.path.starts_with(&format!("/{}a", n - 1)), "the newest is kept");
    let since = sink.received_since(0);
    assert_eq!(since.missed + since.received.len() as u64, n);
    // Counted: every long path under one key.
    assert_eq!(sink.state.path_count(LONG_PATHS), n);
    assert_eq!(sink.state.path_count(&format!("/7{long}")), n, "a long path reads the shared counter");
    assert!(sink.state.counter_key_bytes() <= 2 * MAX_COUNTED_PATH, "{} bytes of counter keys", sink.state.counter_key_bytes());
    // Short paths are still counted one by one.
    client.post(sink.url("/short")).body("{}").send().await.unwrap();
    assert_eq!(sink.state.path_count("/short"), 1);

    // A request whose path and headers alone exceed the bound is not kept.
    let tiny = Sink::start_bounded("127.0.0.1:0".parse().unwrap(), Keep { requests: 10, bytes: 512 }).await.unwrap();
    client.post(tiny.url(&format!("/{long}"))).header("x-pad", "b".repeat(2000)).body("{}").send().await.unwrap();
    assert_eq!(tiny.count(), 1);
    assert!(tiny.received().is_empty() && tiny.state.kept_bytes() == 0);
    assert_eq!(tiny.received_since(0).missed, 1);
}

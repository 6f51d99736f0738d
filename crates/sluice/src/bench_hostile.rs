//! `sluice bench hostile`: legitimate ingest throughput while attackers
//! send the worst inputs of the hostile-input suite at full speed.
//!
//! A real `sluice serve` process (this executable, embedded log, durable
//! acks) is loaded from this process in two phases of equal length:
//! 1. clean: the `bench ingest` load (keep-alive connections, batches of
//!    ~300-byte events) alone;
//! 2. hostile: the same load, plus `--hostile-clients` clients from another
//!    address (127.0.0.2, or `--attacker-addresses` of them) cycling through amplification, gzip bombs,
//!    oversize bodies, 40,000-key objects, deep nesting, invalid values,
//!    unknown keys and slow-loris connections, each as fast as answers come.
//!
//! Reported: legitimate events/s of both phases and their ratio (the target
//! is >= 0.7), the server's peak RSS (target < 1 GiB), the hostile requests
//! answered by status, and "nothing lost": after the server stopped, the
//! legitimate events in `input` are counted against those acknowledged.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::{header, Request};
use hyper_util::rt::TokioIo;
use sluice_log::EmbeddedLog;
use tokio::io::AsyncWriteExt;

use crate::bench::{load, machine_description, make_bodies, LoadArgs, WRITE_KEY};
use crate::bench_deliver::{rss_mib, spawn_serve};

#[derive(Args, Clone)]
pub struct HostileBench {
    #[command(flatten)]
    load: LoadArgs,
    /// Hostile clients in the second phase (one in five holds slow-loris connections).
    #[arg(long, default_value_t = 50)]
    hostile_clients: usize,
    /// Only the hostile requests whose name contains this (to see what each costs).
    #[arg(long)]
    only: Option<String>,
    /// Client addresses the hostile clients are spread over: 127.0.0.2,
    /// 127.0.0.3, … (per-address defences are weaker the more there are).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=250))]
    attacker_addresses: u8,
}

const HOSTILE_KEY: &str = "wk_hostile";

/// One hostile request: what it is, and its bytes.
struct Attack {
    name: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

fn basic(key: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{key}:")))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip to memory");
    enc.finish().expect("gzip to memory")
}

/// The worst inputs of docs/SECURITY.md, as requests with a valid source's
/// key (write keys are public: an attacker has one) unless said otherwise.
fn attacks() -> Vec<Attack> {
    let key = || ("authorization", basic(HOSTILE_KEY));
    let tiny = vec![r#"{"type":"identify","userId":"u"}"#; 2500].join(",");
    let amplification = format!(r#"{{"context":{{"p":"{}"}},"batch":[{tiny}]}}"#, "c".repeat(410 * 1024));
    let wide = {
        let mut s = String::from(r#"{"type":"track","userId":"u","event":"E","#);
        for i in 0..40_000 {
            s.push_str(&format!("\"k{i}\":1,"));
        }
        s.push_str(r#""z":1}"#);
        s
    };
    let deep = format!(r#"{{"type":"track","userId":"u","event":"E","properties":{{"a":{}1{}}}}}"#, "[".repeat(15_000), "]".repeat(15_000));
    let surrogates =
        format!("{{\"batch\":[{}]}}", vec![r#"{"type":"track","userId":"u","event":"E","properties":{"s":"\ud800","n":1e400}}"#; 2500].join(","));
    let far_apart = format!(
        "{{\"batch\":[{}]}}",
        vec![r#"{"type":"track","userId":"u","event":"E","timestamp":"-260000-01-01T00:00:00","sentAt":"+260000-01-01T00:00:00"}"#; 100].join(",")
    );
    let oversize = format!(r#"{{"batch":[{{"type":"track","userId":"u","event":"E","properties":{{"p":"{}"}}}}]}}"#, "x".repeat(540 * 1024));
    vec![
        Attack {
            name: "amplification (gzip, 410 KB batch context)",
            headers: vec![key(), ("content-encoding", "gzip".into())],
            body: gzip(amplification.as_bytes()).into(),
        },
        Attack {
            name: "gzip bomb (50 MB of spaces)",
            headers: vec![key(), ("content-encoding", "gzip".into())],
            body: gzip(&vec![b' '; 50 << 20]).into(),
        },
        Attack { name: "oversize body (540 KB)", headers: vec![key()], body: oversize.into() },
        Attack { name: "40,000 keys, valid key", headers: vec![key()], body: wide.clone().into() },
        Attack { name: "40,000 keys, unknown key", headers: vec![("authorization", basic("wk_guess"))], body: wide.into() },
        Attack { name: "15,000-deep nesting", headers: vec![key()], body: deep.into() },
        Attack { name: "2,500 items of 1e400 and lone surrogates", headers: vec![key()], body: surrogates.into() },
        Attack { name: "timestamps 520,000 years apart (stored)", headers: vec![key()], body: far_apart.into() },
    ]
}

struct Tally {
    by_attack: Vec<[AtomicU64; 5]>, // 2xx, 4xx but 429, 429, 5xx, connection errors
}

pub fn bench_hostile(args: HostileBench) -> Result<()> {
    println!("{}", machine_description());
    let dir = tempfile::Builder::new().prefix("sluice-bench-hostile-").tempdir()?;
    let data_dir = dir.path().join("data");
    let config_path = dir.path().join("sluice.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[admin]\nlisten = \"\"\n\
             [[sources]]\nid = \"bench\"\nwrite_key = \"{WRITE_KEY}\"\n[[sources]]\nid = \"hostile\"\nwrite_key = \"{HOSTILE_KEY}\"\n",
            data_dir.display()
        ),
    )?;
    let ingest_args = args.load.standard();
    let bodies = Arc::new(make_bodies(&ingest_args));
    let mut attacks = attacks();
    if let Some(only) = &args.only {
        attacks.retain(|a| a.name.contains(only.as_str()));
        if attacks.is_empty() {
            bail!("no hostile request's name contains {only:?}");
        }
    }
    let attacks = Arc::new(attacks);
    let loris = args.hostile_clients / 5;
    println!(
        "workload: a `sluice serve` process (embedded log, fsync); {} legitimate connections, batches of 100 x ~300 B; \
         then the same with {} hostile clients from {} ({} sending {} kinds of hostile request in turn, {} holding slow-loris connections); \
         {}s measured per phase after {}s warm-up",
        args.load.connections,
        args.hostile_clients,
        if args.attacker_addresses == 1 {
            "127.0.0.2".to_string()
        } else {
            format!("{} addresses (127.0.0.2-{})", args.attacker_addresses, 1 + args.attacker_addresses as u16)
        },
        args.hostile_clients - loris,
        attacks.len(),
        loris,
        args.load.seconds,
        args.load.warmup
    );
    let (mut child, addr) = spawn_serve(&config_path)?;
    let pid = child.id();
    let addr: std::net::SocketAddr = addr.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    // RSS sampled every 100 ms for the whole run: all of it, and the
    // anonymous part (the process's own memory; the rest is log segment
    // pages mapped from the page cache, which the kernel can take back).
    let peak_rss = Arc::new(AtomicU64::new(0));
    let peak_anon = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, anon, on) = (peak_rss.clone(), peak_anon.clone(), sampling.clone());
        std::thread::spawn(move || {
            while on.load(Ordering::Relaxed) {
                peak.fetch_max((rss_mib(pid, "VmRSS:") * 1024.0) as u64, Ordering::Relaxed);
                anon.fetch_max((rss_mib(pid, "RssAnon:") * 1024.0) as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let outcome = (|| -> Result<_> {
        let clean = rt.block_on(load(addr, &ingest_args, &bodies))?;
        let clean_rss_kib = (peak_rss.load(Ordering::Relaxed), peak_anon.load(Ordering::Relaxed));
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally { by_attack: (0..attacks.len()).map(|_| Default::default()).collect() });
        let loris_conns = Arc::new(AtomicU64::new(0));
        let mut hostile = Vec::new();
        for c in 0..args.hostile_clients {
            let (stop, tally, attacks, loris_conns) = (stop.clone(), tally.clone(), attacks.clone(), loris_conns.clone());
            let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + (c % args.attacker_addresses as usize) as u8);
            hostile.push(rt.spawn(async move {
                if c < loris {
                    slow_loris(addr, from, &stop, &loris_conns).await
                } else {
                    attacker(addr, from, c, &stop, &attacks, &tally).await
                }
            }));
        }
        let under_attack = rt.block_on(load(addr, &ingest_args, &bodies))?;
        stop.store(true, Ordering::Relaxed);
        for h in hostile {
            let _ = rt.block_on(h);
        }
        Ok((clean, clean_rss_kib, under_attack, tally, loris_conns.load(Ordering::Relaxed)))
    })();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let (mut clean, clean_rss_kib, mut under_attack, tally, loris_conns) = outcome?;
    let peak_rss_mib = peak_rss.load(Ordering::Relaxed) as f64 / 1024.0;
    let peak_anon_mib = peak_anon.load(Ordering::Relaxed) as f64 / 1024.0;

    let (legit_stored, hostile_stored) = count_stored(&data_dir.join("log"))?;
    let acked = clean.events_acked_all + under_attack.events_acked_all;

    println!();
    println!("{:<52} {:>8} {:>8} {:>8} {:>8} {:>10}", "hostile request (phase 2)", "2xx", "4xx", "429", "5xx", "conn err");
    for (a, t) in attacks.iter().zip(&tally.by_attack) {
        let [ok, client, limited, server, conn] = t.each_ref().map(|n| n.load(Ordering::Relaxed));
        println!("{:<52} {ok:>8} {client:>8} {limited:>8} {server:>8} {conn:>10}", a.name);
    }
    println!("slow-loris connections opened: {loris_conns}");
    println!();
    println!("{:<34} {:>12} {:>10} {:>10} {:>8}", "phase (legitimate load)", "events/s", "p50 ms", "p99 ms", "errors");
    for (name, s) in [("clean", &mut clean), ("under attack", &mut under_attack)] {
        let (p50, p99) = (s.percentile_ms(0.5), s.percentile_ms(0.99));
        println!("{:<34} {:>12.0} {:>10.2} {:>10.2} {:>8}", name, s.events_per_sec(), p50, p99, s.errors);
    }
    if clean.events == 0 {
        bail!("the clean phase completed no request; is the machine overloaded?");
    }
    let ratio = under_attack.events_per_sec() / clean.events_per_sec();
    println!();
    println!("ratio under attack / clean: {ratio:.3} (target >= 0.7)");
    println!(
        "server peak RSS: {peak_rss_mib:.0} MiB, of which anonymous {peak_anon_mib:.0} MiB (clean phase {:.0} / {:.0} MiB; target < 1024)",
        clean_rss_kib.0 as f64 / 1024.0,
        clean_rss_kib.1 as f64 / 1024.0
    );
    println!("legitimate events acknowledged {acked}, in the log {legit_stored}; hostile events stored {hostile_stored}");
    println!(
        "RESULT bench=hostile clean_events_per_sec={:.0} attacked_events_per_sec={:.0} ratio={ratio:.3} peak_rss_mib={peak_rss_mib:.0} peak_anon_rss_mib={peak_anon_mib:.0} acked={acked} stored={legit_stored} lost={}",
        clean.events_per_sec(),
        under_attack.events_per_sec(),
        acked.saturating_sub(legit_stored)
    );
    if legit_stored < acked {
        bail!("{} acknowledged events are missing from the log", acked - legit_stored);
    }
    Ok(())
}

/// Records in `input` by source: (bench, hostile).
fn count_stored(log_dir: &Path) -> Result<(u64, u64)> {
    let log = EmbeddedLog::open_read_only(log_dir).context("open the log read-only")?;
    let (mut legit, mut hostile) = (0, 0);
    for p in 0..sluice_log::Log::partitions(&log, sluice_core::topics::INPUT)? {
        let range = log.offsets_blocking(sluice_core::topics::INPUT, p)?;
        let mut next = range.start;
        while next < range.end {
            let batch = log.read_blocking(sluice_core::topics::INPUT, p, next, 10_000)?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            for r in batch {
                if r.key.starts_with(b"bench/") {
                    legit += 1;
                } else if r.key.starts_with(b"hostile/") {
                    hostile += 1;
                }
            }
        }
    }
    Ok((legit, hostile))
}

async fn connect_from(addr: std::net::SocketAddr, from: std::net::Ipv4Addr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((from, 0)))?;
    socket.connect(addr).await
}

/// Send hostile requests in turn (starting at `offset`), as fast as they
/// are answered; reconnect whenever the server closes the connection.
async fn attacker(addr: std::net::SocketAddr, from: std::net::Ipv4Addr, offset: usize, stop: &AtomicBool, attacks: &[Attack], tally: &Tally) {
    let mut i = offset;
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = connect_from(addr, from).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else { continue };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            let k = i % attacks.len();
            i += 1;
            let a = &attacks[k];
            let mut req = Request::post("/v1/batch").header(header::HOST, "127.0.0.1").header(header::CONTENT_TYPE, "application/json");
            for (name, value) in &a.headers {
                req = req.header(*name, value);
            }
            let req = req.body(Full::new(a.body.clone())).expect("request");
            let answered = async {
                let resp = sender.send_request(req).await?;
                let status = resp.status().as_u16();
                resp.into_body().collect().await?;
                Ok::<u16, hyper::Error>(status)
            };
            match answered.await {
                Ok(status) => {
                    let class = match status {
                        200..=299 => 0,
                        429 => 2,
                        400..=499 => 1,
                        _ => 3,
                    };
                    tally.by_attack[k][class].fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tally.by_attack[k][4].fetch_add(1, Ordering::Relaxed);
                    break; // closed under us: reconnect
                }
            }
        }
    }
}

/// Hold connections that send a request head one byte at a time; a new one
/// as soon as the server drops one.
async fn slow_loris(addr: std::net::SocketAddr, from: std::net::Ipv4Addr, stop: &AtomicBool, opened: &AtomicU64) {
    let head = b"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = connect_from(addr, from).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        if stream.write_all(head).await.is_err() {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if stream.write_all(b"a").await.is_err() {
                break;
            }
        }
    }
}

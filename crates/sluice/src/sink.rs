//! `sluice sink`: a local webhook endpoint for trying Sluice out. It answers
//! 200 (or what the URL's query asks: `?status=500`, `?delay_ms=2000`,
//! `?retry_after=3`) and prints what it receives.
//!
//! Memory is bounded however long it runs: it keeps counts and the newest
//! `--keep` requests (bodies cut to `--keep-bytes` all together), and each
//! 200 ms tick copies only the requests that arrived since the last one.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use sluice_deliver::sink::{Keep, Received, Sink};

#[derive(Args)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9099")]
    listen: SocketAddr,
    /// Print nothing per request.
    #[arg(long)]
    quiet: bool,
    /// Requests kept for printing (the newest); older ones not printed yet are counted as missed.
    #[arg(long, default_value_t = 10_000)]
    keep: usize,
    /// Body bytes kept for printing, all kept requests together.
    #[arg(long, default_value_t = 64 << 20)]
    keep_bytes: usize,
}

pub async fn sink(args: SinkArgs) -> Result<()> {
    let keep = Keep { requests: if args.quiet { 0 } else { args.keep }, bytes: args.keep_bytes };
    let sink = Sink::start_bounded(args.listen, keep).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("sink listening on http://{} (try a destination url = \"http://{}/hook\")", sink.addr, sink.addr);
    let mut next = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let since = sink.received_since(next);
        next = since.next;
        if args.quiet {
            continue;
        }
        let mut out = std::io::stdout().lock();
        let printed = (|| {
            if since.missed > 0 {
                writeln!(out, "... {} request(s) not printed (more than --keep arrived in 200 ms)", since.missed)?;
            }
            for r in &since.received {
                writeln!(out, "{}", line(r))?;
            }
            out.flush()
        })();
        match printed {
            Ok(()) => {}
            // The reader went away (`sluice sink | head`): end quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(crate::stdout_error(e)),
        }
    }
}

/// One request as printed: status answered, path, headers of interest, body.
pub fn line(r: &Received) -> String {
    format!(
        "{} {} idempotency-key={} x-signature={} {}",
        r.answered.map(|s| s.to_string()).unwrap_or_else(|| "---".into()),
        r.path,
        r.header("idempotency-key").unwrap_or("-"),
        r.header("x-signature").unwrap_or("-"),
        String::from_utf8_lossy(&r.body)
    )
}

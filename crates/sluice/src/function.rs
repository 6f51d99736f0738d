//! `sluice function test FILE --event EVENT.json`: run one function on one
//! event locally, with the limits the pipeline will use, and print what
//! became of it (the event it returned, a drop, or the error and its class).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use sluice_transform::function::{FunctionOutcome, JsFunction, Limits};

#[derive(Subcommand)]
pub enum FunctionCommand {
    /// Run FILE's handler for one event (`onTrack` for a track event, …; `onBatch` with `--batch`).
    Test(TestArgs),
}

#[derive(Args)]
pub struct TestArgs {
    /// The function's JavaScript (Segment's handler signatures).
    file: PathBuf,
    /// The event as JSON (a file; `-` reads stdin). With `--batch`, a JSON array of events.
    #[arg(long)]
    event: PathBuf,
    /// The function's settings, as a JSON object.
    #[arg(long, default_value = "{}")]
    settings: String,
    /// Call `onBatch` with the array given as `--event`.
    #[arg(long)]
    batch: bool,
    /// The CPU-time budget of the call, in milliseconds.
    #[arg(long, default_value_t = 100)]
    timeout_ms: u64,
    /// The engine's memory limit, in MiB.
    #[arg(long, default_value_t = 32)]
    memory_mib: usize,
    /// Call it this many times and report the mean time per call (the function's overhead).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
}

pub fn run(cmd: FunctionCommand) -> Result<()> {
    match cmd {
        FunctionCommand::Test(args) => test(args),
    }
}

fn test(args: TestArgs) -> Result<()> {
    let code = std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let text = if args.event.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the event from stdin")?
    } else {
        std::fs::read_to_string(&args.event).with_context(|| format!("reading {}", args.event.display()))?
    };
    let event: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", args.event.display()))?;
    let settings: Value = serde_json::from_str(&args.settings).context("--settings is not JSON")?;
    if !settings.is_object() {
        bail!("--settings must be a JSON object");
    }
    let limits =
        Limits { time_per_call: Duration::from_millis(args.timeout_ms.max(1)), memory_bytes: args.memory_mib.max(1) << 20, ..Limits::default() };
    let mut function = JsFunction::load(&code, limits).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    if args.batch {
        let Value::Array(_) = &event else { bail!("--batch needs a JSON array of events") };
        if !function.has_batch() {
            bail!("{} defines no onBatch", args.file.display());
        }
    } else if !event.is_object() {
        bail!("the event must be a JSON object");
    }
    let repeat = args.repeat.max(1);
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for _ in 0..repeat {
        outcomes = match &event {
            Value::Array(events) if args.batch => function.call_batch(events, &settings),
            _ => vec![function.call(&event, &settings)],
        };
    }
    let took_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(repeat);
    let failed = outcomes.iter().any(|o| matches!(o, FunctionOutcome::Error { .. }));
    let out = if args.batch {
        json!({"outcomes": outcomes.iter().map(FunctionOutcome::to_json).collect::<Vec<_>>(), "took_us": (took_us * 10.0).round() / 10.0, "calls": repeat})
    } else {
        let mut one = FunctionOutcome::to_json(&outcomes[0]);
        one["took_us"] = json!((took_us * 10.0).round() / 10.0);
        one["calls"] = json!(repeat);
        one
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    if failed {
        // A script sees the failure in the exit status too.
        std::process::exit(3);
    }
    Ok(())
}

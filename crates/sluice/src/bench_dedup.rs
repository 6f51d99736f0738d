//! `sluice bench dedup`: the dedup stage on a pre-filled `input`, against
//! a floor of the same RocksDB operations without the pipeline.
//!
//! Workload: `--events` track events of ~300 bytes; a `--dup-rate` share of
//! them repeat an earlier messageId chosen uniformly from everything sent
//! so far, so copies are spread over the whole run, not adjacent.
//!
//! 1. Pre-fill `input` (not measured).
//! 2. Pipeline: one `DedupWorker` per partition, each on its own thread,
//!    until `input` is drained: read, look up, publish to `output`, index,
//!    commit — the real code path of `sluice serve`.
//! 3. Floor: the same key sequence per partition, the same batch size, the
//!    same `DedupIndex::select_new` (batched multi-get) and `DedupIndex::record`
//!    (one WriteBatch) calls on fresh indexes, without the log around them.
//! 4. Rebuild every partition's index from `output` (ids/s), and report the
//!    index size on disk per million keys.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use sluice_core::partition_for;
use sluice_dedup::index::{now_ms, DedupIndex, IndexOptions, IndexStats};
use sluice_dedup::{rebuild_partition, DedupMetrics, DedupSettings, DedupWorker, INPUT_TOPIC, OUTPUT_TOPIC};
use sluice_log::{EmbeddedLog, Log, LogOptions, Record};

/// Never-seen ids looked up after the run to measure the steady state.
const PROBE_IDS: u64 = 200_000;

#[derive(Args, Clone)]
pub struct DedupBench {
    /// Events in `input`, duplicates included.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Share of events that repeat an earlier messageId.
    #[arg(long, default_value_t = 0.006)]
    dup_rate: f64,
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    #[arg(long, default_value_t = 300)]
    event_bytes: usize,
    /// Records per dedup batch.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    #[arg(long, default_value_t = 10.0)]
    bloom_bits_per_key: f64,
    #[arg(long, default_value_t = 256)]
    block_cache_mb: usize,
    /// Where the log and indexes go (a fresh temporary directory when absent).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// RNG seed of the workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// SplitMix64: a small deterministic generator for the workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn message_id(n: u64) -> String {
    let mut r = Rng(n ^ 0x5EED);
    let (a, b) = (r.next(), r.next());
    format!("{:08x}-{:04x}-{:04x}-{:04x}-{:012x}", a >> 32, (a >> 16) & 0xffff, a & 0xffff, b >> 48, b & 0xffff_ffff_ffff)
}

/// The workload: per partition, the ordered keys, and how many are unique.
struct Workload {
    keys: Vec<Vec<Bytes>>,
    unique: u64,
}

fn workload(args: &DedupBench) -> Workload {
    let mut rng = Rng(args.seed);
    let mut keys: Vec<Vec<Bytes>> = vec![Vec::new(); args.partitions as usize];
    let mut issued = 0u64;
    let threshold = (args.dup_rate * u64::MAX as f64) as u64;
    for _ in 0..args.events {
        let n = if issued > 0 && rng.next() < threshold {
            rng.next() % issued // a copy of any earlier message
        } else {
            issued += 1;
            issued - 1
        };
        let id = message_id(n);
        let p = partition_for(&id, args.partitions) as usize;
        keys[p].push(Bytes::from(format!("bench/{id}")));
    }
    Workload { keys, unique: issued }
}

fn event_json(key: &[u8], size: usize) -> Bytes {
    let id = std::str::from_utf8(&key[6..]).expect("ascii id");
    let mut s = format!(
        r#"{{"type":"track","event":"Order Completed","userId":"user-{}","messageId":"{id}","properties":{{"total":42.5,"currency":"EUR","pad":""#,
        &id[..6]
    );
    let tail = r#""},"timestamp":"2026-11-26T10:00:00.000Z","receivedAt":"2026-11-26T10:00:00.010Z"}"#;
    let pad = size.saturating_sub(s.len() + tail.len());
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str(tail);
    Bytes::from(s)
}

fn index_options(args: &DedupBench) -> Result<IndexOptions> {
    Ok(IndexOptions::new(args.bloom_bits_per_key, Duration::from_secs(28 * 86400), args.block_cache_mb << 20)?)
}

pub fn bench_dedup(args: DedupBench) -> Result<()> {
    println!("{}", crate::bench::machine_description());
    let tmp;
    let root = match &args.data_dir {
        // A reused directory would measure the all-duplicates path.
        Some(d) if d.exists() && std::fs::read_dir(d)?.next().is_some() => {
            bail!("--data-dir {} is not empty; the benchmark needs a fresh directory", d.display())
        }
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("sluice-bench-dedup-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let started = Instant::now();
    let work = workload(&args);
    let total: u64 = work.keys.iter().map(|k| k.len() as u64).sum();
    println!(
        "workload: {} events, {} unique, {} duplicates ({:.3}%), {} partitions, batches of {}, ~{} bytes per event, bloom {} bits/key, block cache {} MiB (generated in {:.1}s)",
        total,
        work.unique,
        total - work.unique,
        100.0 * (total - work.unique) as f64 / total as f64,
        args.partitions,
        args.batch_size,
        args.event_bytes,
        args.bloom_bits_per_key,
        args.block_cache_mb,
        started.elapsed().as_secs_f64()
    );

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let options = LogOptions { topics: vec![(INPUT_TOPIC.into(), args.partitions), (OUTPUT_TOPIC.into(), args.partitions)], ..LogOptions::default() };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(&root.join("log"), options).context("opening the benchmark log")?);

    // 1. Pre-fill input.
    let fill = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = work
            .keys
            .iter()
            .enumerate()
            .map(|(p, keys)| {
                let log = log.clone();
                let recs: Vec<Record> = keys.iter().map(|k| Record { key: k.clone(), value: event_json(k, args.event_bytes) }).collect();
                tokio::spawn(async move {
                    let mut it = recs.into_iter().peekable();
                    while it.peek().is_some() {
                        let chunk: Vec<Record> = it.by_ref().take(5000).collect();
                        log.append(INPUT_TOPIC, p as u32, chunk).await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })?;
    println!("pre-filled input in {:.1}s", fill.elapsed().as_secs_f64());

    // 2. The pipeline.
    let settings = DedupSettings {
        index_dir: root.join("dedup"),
        index: index_options(&args)?,
        batch_size: args.batch_size,
        poll_interval: Duration::from_millis(1),
        stop: Default::default(),
    };
    let t = Instant::now();
    let probe_per_partition = PROBE_IDS / args.partitions as u64;
    let results: Vec<(IndexStats, u64, IndexStats, IndexStats)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.partitions)
            .map(|p| {
                let (log, settings, rt) = (log.clone(), settings.clone(), rt.handle().clone());
                s.spawn(move || -> Result<(IndexStats, u64, IndexStats, IndexStats)> {
                    let mut w = DedupWorker::open(log, p, settings, DedupMetrics::default(), &rt, &mut |_| {})?;
                    let before = w.refresh_metrics();
                    while w.process_batch(&rt)? > 0 {}
                    let after = w.refresh_metrics();
                    // Steady state: ids never seen, spread over the same key
                    // space (same source prefix, so SST key ranges cannot rule
                    // them out), against the full index with a warm cache.
                    let fresh: Vec<Bytes> = (0..probe_per_partition)
                        .map(|i| Bytes::from(format!("bench/{}", message_id(u64::MAX - (p as u64) * 1_000_000_000 - i))))
                        .collect();
                    let index = w.index()?;
                    let probe_before = index.stats();
                    for chunk in fresh.chunks(args.batch_size) {
                        let refs: Vec<&[u8]> = chunk.iter().map(|k| &k[..]).collect();
                        let seen = index.contains(&refs, now_ms())?;
                        if seen.iter().any(|s| *s) {
                            bail!("a never-seen id was reported as seen");
                        }
                    }
                    let probe = index.stats() - probe_before;
                    let (_, size) = w.flush_and_measure()?;
                    Ok((after - before, size, after, probe))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker thread")).collect::<Result<Vec<_>>>()
    })?;
    let pipeline_secs = t.elapsed().as_secs_f64();
    let probe = results.iter().fold(IndexStats::default(), |a, r| a + r.3);
    let probed = probe_per_partition * args.partitions as u64;
    let published: u64 = (0..args.partitions).map(|p| rt.block_on(log.offsets(OUTPUT_TOPIC, p)).map(|r| r.end)).sum::<Result<u64, _>>()?;
    if published != work.unique {
        bail!("output holds {published} messages but the workload has {} unique ones", work.unique);
    }
    let stats = results.iter().fold(IndexStats::default(), |a, r| a + r.0);
    let index_bytes: u64 = results.iter().map(|r| r.1).sum();
    let keys_estimated: u64 = results.iter().map(|r| r.2.estimated_keys).sum();

    // 3. The floor: the same RocksDB operations, no log.
    let floor_dir = root.join("floor");
    let floor_options = index_options(&args)?;
    let t = Instant::now();
    let floor_stats: Vec<IndexStats> = std::thread::scope(|s| {
        let handles: Vec<_> = work
            .keys
            .iter()
            .enumerate()
            .map(|(p, keys)| {
                let (dir, opts) = (floor_dir.join(p.to_string()), floor_options.clone());
                s.spawn(move || -> Result<IndexStats> {
                    let index = DedupIndex::open(&dir, &opts)?;
                    let before = index.stats();
                    let mut checkpoint = 0u64;
                    for chunk in keys.chunks(args.batch_size) {
                        let now = now_ms();
                        let refs: Vec<&[u8]> = chunk.iter().map(|k| &k[..]).collect();
                        let fresh: Vec<&[u8]> = index.select_new(&refs, now)?.into_iter().map(|i| refs[i]).collect();
                        checkpoint += fresh.len() as u64;
                        index.record(fresh.into_iter().map(|k| (k, now)), checkpoint)?;
                    }
                    Ok(index.stats() - before)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("floor thread")).collect::<Result<Vec<_>>>()
    })?;
    let floor_secs = t.elapsed().as_secs_f64();
    let floor = floor_stats.into_iter().fold(IndexStats::default(), |a, b| a + b);

    // 4. Rebuild from output.
    let t = Instant::now();
    for p in 0..args.partitions {
        rebuild_partition(log.clone(), p, settings.clone(), rt.handle(), &mut |_| {})?;
    }
    let rebuild_secs = t.elapsed().as_secs_f64();

    let rate = total as f64 / pipeline_secs;
    let floor_rate = total as f64 / floor_secs;
    let new_msgs = work.unique as f64;
    println!();
    println!("{:<44} {:>12} {:>10}", "phase", "messages/s", "seconds");
    println!("{:<44} {:>12.0} {:>10.2}", "pipeline (read input, publish output, index)", rate, pipeline_secs);
    println!("{:<44} {:>12.0} {:>10.2}", "floor (same RocksDB multi-get + WriteBatch)", floor_rate, floor_secs);
    println!("ratio pipeline/floor: {:.3}", rate / floor_rate);
    println!();
    println!("RocksDB statistics over the pipeline run (all partitions):");
    println!("  bloom useful (answered 'absent' without reading data): {}", stats.bloom_useful);
    println!("  bloom full positive (passed on to data blocks):        {}", stats.bloom_full_positive);
    println!("  block cache misses (blocks read from disk), all types:  {}", stats.block_cache_miss);
    println!(
        "    data / filter / index block misses:                  {} / {} / {}",
        stats.block_cache_data_miss, stats.block_cache_filter_miss, stats.block_cache_index_miss
    );
    println!("  block reads per new message:                           {:.5}", stats.block_cache_miss as f64 / new_msgs);
    println!("  data block reads per new message:                      {:.5}", stats.block_cache_data_miss as f64 / new_msgs);
    println!("  floor block reads per new message:                     {:.5}", floor.block_cache_miss as f64 / new_msgs);
    println!("  (these include the data reads of true duplicates and of bloom false positives)");
    println!(
        "steady-state probe, {probed} never-seen ids against the full indexes: {} block reads ({} data, {} filter, {} index) = {:.5} per new id; bloom answered {} of them",
        probe.block_cache_miss,
        probe.block_cache_data_miss,
        probe.block_cache_filter_miss,
        probe.block_cache_index_miss,
        probe.block_cache_miss as f64 / probed as f64,
        probe.bloom_useful
    );
    println!();
    println!("rebuild from output: {} ids in {:.2}s = {:.0} ids/s", work.unique, rebuild_secs, work.unique as f64 / rebuild_secs);
    println!(
        "index size on disk: {:.1} MiB for {} keys (RocksDB estimates {}) = {:.1} MiB per million keys",
        index_bytes as f64 / 1048576.0,
        work.unique,
        keys_estimated,
        index_bytes as f64 / 1048576.0 / (work.unique as f64 / 1e6)
    );
    println!(
        "RESULT bench=dedup messages_per_sec={rate:.0} floor_messages_per_sec={floor_rate:.0} ratio={:.3} block_reads_per_new={:.5} data_block_reads_per_new={:.5} steady_state_reads_per_new_id={:.5} rebuild_ids_per_sec={:.0} index_mib_per_million_keys={:.1}",
        rate / floor_rate,
        stats.block_cache_miss as f64 / new_msgs,
        stats.block_cache_data_miss as f64 / new_msgs,
        probe.block_cache_miss as f64 / probed as f64,
        work.unique as f64 / rebuild_secs,
        index_bytes as f64 / 1048576.0 / (work.unique as f64 / 1e6)
    );
    Ok(())
}

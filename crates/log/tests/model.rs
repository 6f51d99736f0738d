//! Property test: random sequences of appends, reads, commits, reopens and
//! torn tails, checked against a simple in-memory model after every step.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use proptest::prelude::*;
use sluice_log::{Checkpoint, EmbeddedLog, Log, LogOptions, OffsetRange, Record};

const TOPIC: &str = "events";
const GROUPS: [&str; 3] = ["g0", "g.1", "consumer_2"];

#[derive(Debug, Clone)]
enum Tear {
    /// Random bytes after the last frame.
    Garbage(Vec<u8>),
    /// The first `keep_permille`‰ of a well-formed frame for the next offset
    /// (a write cut short by a crash).
    PartialFrame { key_len: usize, value_len: usize, keep_permille: u32 },
    /// A complete frame for the next offset whose checksum does not match.
    BadChecksum { value_len: usize, bit: u32 },
}

#[derive(Debug, Clone)]
enum Op {
    /// Append records with these (key length, value length) to a partition.
    Append {
        partition: usize,
        sizes: Vec<(usize, usize)>,
    },
    Read {
        partition: usize,
        from: usize,
        max: usize,
    },
    Commit {
        group: usize,
        partition: usize,
        offset: u64,
    },
    Reopen,
    /// Close, damage the active segment's tail (an unacknowledged write),
    /// reopen.
    TearTail {
        partition: usize,
        tear: Tear,
    },
}

fn tear() -> impl Strategy<Value = Tear> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..300).prop_map(Tear::Garbage),
        (0usize..40, 0usize..2000, 1u32..1000).prop_map(|(key_len, value_len, keep_permille)| Tear::PartialFrame {
            key_len,
            value_len,
            keep_permille
        }),
        (0usize..500, 0u32..32).prop_map(|(value_len, bit)| Tear::BadChecksum { value_len, bit }),
    ]
}

fn op(max_value: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..3, proptest::collection::vec((0usize..40, 0usize..max_value), 1..8))
            .prop_map(|(partition, sizes)| Op::Append { partition, sizes }),
        3 => (0usize..3, any::<usize>(), 1usize..40).prop_map(|(partition, from, max)| Op::Read { partition, from, max }),
        2 => (0usize..GROUPS.len(), 0usize..3, 0u64..5000)
            .prop_map(|(group, partition, offset)| Op::Commit { group, partition, offset }),
        1 => Just(Op::Reopen),
        1 => (0usize..3, tear()).prop_map(|(partition, tear)| Op::TearTail { partition, tear }),
    ]
}

/// The record the model stores at `offset` of `partition`.
fn model_record(partition: u32, offset: u64, key_len: usize, value_len: usize) -> Record {
    let seed = ((partition as u64) << 48) ^ offset;
    rec(pattern(seed ^ 0xABCD, key_len), pattern(seed, value_len))
}

/// A frame as the format docs describe it.
fn encode_frame(offset: u64, r: &Record) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&offset.to_le_bytes());
    body.extend_from_slice(&1_700_000_000_000i64.to_le_bytes());
    body.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
    body.extend_from_slice(&r.key);
    body.extend_from_slice(&r.value);
    let mut frame = Vec::new();
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

struct Model {
    partitions: Vec<Vec<Record>>,
    committed: HashMap<(usize, u32), u64>,
}

struct Harness {
    rt: tokio::runtime::Runtime,
    opts: LogOptions,
    root: tempfile::TempDir,
    log: Option<EmbeddedLog>,
    model: Model,
}

impl Harness {
    fn log(&self) -> &EmbeddedLog {
        self.log.as_ref().expect("log open")
    }

    fn reopen(&mut self) {
        drop(self.log.take());
        self.log = Some(open(self.root.path(), &self.opts));
    }

    fn apply(&mut self, op: &Op) {
        let nparts = self.model.partitions.len();
        match op {
            Op::Append { partition, sizes } => {
                let p = (*partition % nparts) as u32;
                let start = self.model.partitions[p as usize].len() as u64;
                let batch: Vec<Record> = sizes.iter().enumerate().map(|(i, &(k, v))| model_record(p, start + i as u64, k, v)).collect();
                let first = self.rt.block_on(self.log().append(TOPIC, p, batch.clone())).unwrap();
                assert_eq!(first, start, "append to partition {p} must start at the model's end");
                self.model.partitions[p as usize].extend(batch);
            }
            Op::Read { partition, from, max } => {
                let p = (*partition % nparts) as u32;
                let recs = &self.model.partitions[p as usize];
                let from = (*from % (recs.len() + 4)) as u64;
                let got = self.rt.block_on(self.log().read(TOPIC, p, from, *max)).unwrap();
                let lo = (from as usize).min(recs.len());
                let hi = (lo + max).min(recs.len());
                assert_records(&got, from, &recs[lo..hi]);
            }
            Op::Commit { group, partition, offset } => {
                let p = (*partition % nparts) as u32;
                self.rt.block_on(self.log().commit(Checkpoint { group: GROUPS[*group], topic: TOPIC, partition: p, next_offset: *offset })).unwrap();
                self.model.committed.insert((*group, p), *offset);
            }
            Op::Reopen => {
                let cut_before = self.opts.metrics.truncated_records.get();
                self.reopen();
                assert_eq!(self.opts.metrics.truncated_records.get(), cut_before, "a clean reopen cuts nothing");
            }
            Op::TearTail { partition, tear } => {
                let p = (*partition % nparts) as u32;
                drop(self.log.take());
                let (_, seg) = last_segment(self.root.path(), TOPIC, p);
                let len = file_len(&seg);
                let next = self.model.partitions[p as usize].len() as u64;
                let bytes = match tear {
                    Tear::Garbage(bytes) => bytes.clone(),
                    Tear::PartialFrame { key_len, value_len, keep_permille } => {
                        let frame = encode_frame(next, &model_record(p, next, *key_len, *value_len));
                        let keep = (frame.len() * *keep_permille as usize / 1000).clamp(1, frame.len() - 1);
                        frame[..keep].to_vec()
                    }
                    Tear::BadChecksum { value_len, bit } => {
                        let mut frame = encode_frame(next, &model_record(p, next, 3, *value_len));
                        frame[4 + (*bit as usize / 8)] ^= 1 << (bit % 8);
                        frame
                    }
                };
                append_bytes(&seg, &bytes);
                let cut_before = self.opts.metrics.truncated_records.get();
                self.reopen();
                assert!(self.opts.metrics.truncated_records.get() > cut_before, "the torn tail must be counted");
                assert_eq!(file_len(&seg), len, "the torn tail must be cut back to the last whole record");
            }
        }
    }

    /// The whole log must agree with the model.
    fn check(&self) {
        let log = self.log();
        for (p, recs) in self.model.partitions.iter().enumerate() {
            let p = p as u32;
            let n = recs.len() as u64;
            assert_eq!(self.rt.block_on(log.offsets(TOPIC, p)).unwrap(), OffsetRange { start: 0, end: n }, "partition {p}");
            let all = self.rt.block_on(read_all(log, TOPIC, p, 0, 1 + (n as usize % 29)));
            assert_records(&all, 0, recs);
            assert!(self.rt.block_on(log.read(TOPIC, p, n, 5)).unwrap().is_empty());
            for (g, name) in GROUPS.iter().enumerate() {
                let got = self.rt.block_on(log.committed(name, TOPIC, p)).unwrap();
                assert_eq!(got, self.model.committed.get(&(g, p)).copied(), "group {name} partition {p}");
            }
        }
    }
}

fn check_segments_are_consistent(root: &Path, partitions: u32, model: &Model) {
    // Invariant 1 on disk: each segment is named by its first offset and
    // holds exactly the frames up to the next one's base.
    for p in 0..partitions {
        let segs = segments(root, TOPIC, p);
        let recs = &model.partitions[p as usize];
        assert_eq!(segs[0].0, 0);
        let mut bounds: Vec<u64> = segs.iter().map(|s| s.0).collect();
        bounds.push(recs.len() as u64);
        for (i, (base, path)) in segs.iter().enumerate() {
            let (lo, hi) = (*base as usize, bounds[i + 1] as usize);
            assert!(lo <= hi, "segment bases must not pass the end");
            let size = HEADER_LEN + recs[lo..hi].iter().map(frame_len).sum::<u64>();
            assert_eq!(file_len(path), size, "segment {} must hold exactly offsets {lo}..{hi}", path.display());
        }
    }
}

fn run(partitions: u32, segment_bytes: u64, ops: &[Op]) {
    let root = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, partitions)], segment_bytes);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let log = open(root.path(), &opts);
    let mut h =
        Harness { rt, opts, root, log: Some(log), model: Model { partitions: vec![Vec::new(); partitions as usize], committed: HashMap::new() } };
    h.check();
    for op in ops {
        h.apply(op);
        h.check();
    }
    drop(h.log.take());
    check_segments_are_consistent(h.root.path(), partitions, &h.model);
    h.reopen();
    h.check();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Small segments: many rolls, sealed segments read after reopens.
    #[test]
    fn the_log_agrees_with_a_model(
        partitions in 2u32..=3,
        segment_bytes in 4096u64..=16384,
        ops in proptest::collection::vec(op(2000), 1..50),
    ) {
        run(partitions, segment_bytes, &ops);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Segments of several index intervals with bigger records, so reads
    /// from the middle go through the sparse index (active and sealed).
    #[test]
    fn the_log_agrees_with_a_model_with_large_segments(
        partitions in 2u32..=3,
        segment_bytes in 150_000u64..=300_000,
        ops in proptest::collection::vec(op(16_000), 1..50),
    ) {
        run(partitions, segment_bytes, &ops);
    }
}

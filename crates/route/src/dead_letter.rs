//! The route's dead letters: `output` records it cannot plan (key not
//! `<source>/<messageId>` or not UTF-8, value not JSON) go to the control
//! database's dead-letter store ([`sluice_deliver::control::DeadLetter`])
//! instead of nowhere, and come back when an operator asks for a replay.
//!
//! Invariants:
//! - A batch's dead letters are committed to the store before the batch's
//!   `output` offset is (commit point 3): a crash in between replays the
//!   batch, and the store keeps one row per (topic, partition, offset,
//!   generation), so nothing is stored twice.
//! - A full store is an error, not a skip: the batch fails, the partition
//!   retries from its committed offset (with backoff) and
//!   `sluice_route_dead_letters_full_total` counts it, until an operator
//!   replays or discards dead letters. Nothing is dropped.
//! - A replay re-plans the stored record with the current planner and
//!   catalog, with the generation and destination of the stage that failed
//!   (the route: 0 and every connected destination), so its jobs have the
//!   same idempotency key as normal routing would have given them.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use sluice_core::metrics::{Counter, Gauge, Registry};
use sluice_deliver::control::{DeadLetter, DeadLetterInsert, NewDeadLetter};
use sluice_deliver::Catalog;
use sluice_log::StoredRecord;

use crate::function::{parked_function, replay_due, Lane};
use crate::{JobSink, Planner, RouteError};

/// Dead letters claimed per round of [`replay_requested`].
const REPLAY_BATCH: usize = 100;

/// The dead-letter metrics of this process (one set, shared by the route
/// tasks and the replay runner).
struct DeadLetterMetrics {
    open: Gauge,
    stored: Counter,
    full: Counter,
}

fn metrics() -> &'static DeadLetterMetrics {
    static METRICS: OnceLock<DeadLetterMetrics> = OnceLock::new();
    METRICS.get_or_init(|| DeadLetterMetrics { open: Gauge::default(), stored: Counter::default(), full: Counter::default() })
}

pub(crate) fn register(r: &mut Registry) {
    let m = metrics();
    r.register(
        "sluice_route_dead_letters",
        "Dead letters (output records the route could not plan) neither replayed nor discarded, in the control database",
        m.open.clone(),
    );
    r.register("sluice_route_dead_lettered", "Output records this process stored as new dead letters", m.stored.clone());
    r.register(
        "sluice_route_dead_letters_full",
        "Route batches refused because the dead-letter store is full (the partition waits; replay or discard dead letters)",
        m.full.clone(),
    );
}

/// A dead letter of `stage` for record `rec` of `topic`/`partition`.
pub(crate) fn letter(
    stage: &'static str,
    topic: &str,
    partition: u32,
    rec: &StoredRecord,
    generation: i64,
    destination: Option<&str>,
    reason: String,
) -> NewDeadLetter {
    NewDeadLetter {
        stage,
        topic: topic.to_owned(),
        partition,
        offset: rec.offset,
        generation,
        destination: destination.map(str::to_owned),
        record_ms: rec.timestamp_ms,
        key: rec.key.to_vec(),
        payload: rec.value.to_vec(),
        reason,
    }
}

/// Store `letters` durably; an error (the store full or unreachable) when
/// they are not all stored.
pub(crate) async fn store(catalog: &Arc<Catalog>, letters: Vec<NewDeadLetter>) -> Result<(), RouteError> {
    if letters.is_empty() {
        return Ok(());
    }
    let c = catalog.clone();
    let outcome = tokio::task::spawn_blocking(move || c.with_control(|db| db.insert_dead_letters(&letters)))
        .await
        .map_err(|e| RouteError::DeadLetters(format!("the store task failed: {e}")))??;
    match outcome {
        DeadLetterInsert::Stored { new, .. } => {
            metrics().stored.inc_by(new);
            if new > 0 {
                // Read back, not added: the periodic refresh may have counted these rows already.
                refresh_gauge(catalog).await;
            }
            Ok(())
        }
        DeadLetterInsert::Full { rows, bytes } => {
            metrics().full.inc();
            Err(RouteError::DeadLetters(format!(
                "the dead-letter store is full ({rows} rows, {bytes} bytes): records are held back, not dropped; \
                 replay or discard dead letters (sluice dead-letters list | replay | discard)"
            )))
        }
    }
}

/// Set `sluice_route_dead_letters` from the store. Refreshes are serialized
/// so that a count read before an insert cannot overwrite one read after it.
pub(crate) async fn refresh_gauge(catalog: &Arc<Catalog>) {
    static REFRESH: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _serial = REFRESH.lock().await;
    let c = catalog.clone();
    match tokio::task::spawn_blocking(move || c.with_control(|db| db.dead_letter_counts())).await {
        Ok(Ok(counts)) => {
            metrics().open.set(counts.open);
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot count dead letters"),
        Err(e) => tracing::warn!(error = %e, "dead-letter count task failed"),
    }
}

/// Run the dead-letter replays operators asked for (claimed by this
/// process); the number run.
pub(crate) async fn replay_requested(sink: &dyn JobSink, catalog: &Arc<Catalog>, planner: &Planner) -> usize {
    let mut done = 0;
    loop {
        let c = catalog.clone();
        let claimed = match tokio::task::spawn_blocking(move || c.with_control(|db| db.claim_dead_letter_replays(REPLAY_BATCH))).await {
            Ok(Ok(claimed)) => claimed,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read dead-letter replay requests");
                return done;
            }
            Err(e) => {
                tracing::error!(error = %e, "dead-letter replay poll task failed");
                return done;
            }
        };
        let full_round = claimed.len() == REPLAY_BATCH;
        for letter in claimed {
            let outcome = replay_one(sink, planner, &letter).await;
            match &outcome {
                Ok(jobs) => tracing::info!(dead_letter = letter.id, jobs, "dead letter replayed"),
                Err(e) => tracing::warn!(dead_letter = letter.id, error = %e, "dead letter replay failed; it stays in the store"),
            }
            let (c, id) = (catalog.clone(), letter.id);
            let recorded = tokio::task::spawn_blocking(move || {
                c.with_control(|db| db.finish_dead_letter_replay(id, outcome.as_ref().map(|j| *j).map_err(String::as_str)))
            })
            .await;
            match recorded {
                Ok(Ok(())) => done += 1,
                // Still requested: tried again next round (its jobs, if any, are idempotent).
                Ok(Err(e)) => {
                    tracing::error!(dead_letter = id, error = %e, "cannot record a dead-letter replay");
                    return done;
                }
                Err(e) => {
                    tracing::error!(dead_letter = id, error = %e, "dead-letter replay record task failed");
                    return done;
                }
            }
        }
        if !full_round {
            return done;
        }
    }
}

/// Whether parked letters (a slow source function's events) may be in the
/// store: at start (an earlier process may have parked some), and after
/// this process parks one; cleared by a sweep that finds none.
static PARKED_PENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Pages of dead letters one sweep reads (newest first, from where the
/// last sweep stopped: a store larger than one sweep is read in turns).
const SWEEP_PAGES: usize = 20;
const SWEEP_PAGE: usize = 1000;
/// The id below which the next sweep reads (0: from the newest).
static SWEEP_FROM: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
/// Whether the sweeps of the current pass over the store (newest to oldest) found parked letters.
static PASS_FOUND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Note that this process parked events (a sweep will replay them).
pub(crate) fn parked_some() {
    PARKED_PENDING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Ask for the replay of parked letters whose function may be called
/// again (`crate::function`): all of them (up to a page) when its circuit
/// is closed, the oldest only (the probe) when its wait is over. The
/// replays run in [`replay_requested`]. Returns the number requested.
pub(crate) async fn sweep_parked(catalog: &Arc<Catalog>) -> usize {
    use std::sync::atomic::Ordering;
    if !PARKED_PENDING.swap(false, Ordering::Relaxed) {
        return 0;
    }
    // A function no source runs any more has no circuit to wait for.
    let attached: std::collections::HashSet<String> =
        catalog.snapshot().sources.iter().filter_map(|(s, _)| s.function.as_ref().map(|f| f.id.clone())).collect();
    let c = catalog.clone();
    let found = tokio::task::spawn_blocking(move || {
        c.with_control(|db| {
            // (function, letter ids oldest first) of open parked letters not yet requested.
            let mut by_function: std::collections::BTreeMap<String, Vec<i64>> = std::collections::BTreeMap::new();
            let from = SWEEP_FROM.load(Ordering::Relaxed);
            let (mut any, mut before) = (false, (from > 0).then_some(from));
            let mut at_end = false;
            for _ in 0..SWEEP_PAGES {
                let page = db.dead_letters(before, SWEEP_PAGE)?;
                before = page.last().map(|l| l.id).or(before);
                for l in &page {
                    if l.replayed_at_ms.is_some() || l.discarded_at_ms.is_some() {
                        continue;
                    }
                    if let Some(f) = parked_function(&l.reason) {
                        any = true;
                        if l.replay_requested_at_ms.is_none() {
                            by_function.entry(f).or_default().push(l.id);
                        }
                    }
                }
                if page.len() < SWEEP_PAGE {
                    at_end = true;
                    break;
                }
            }
            // The next sweep reads on from here, or from the newest again once this one reached the oldest.
            SWEEP_FROM.store(if at_end { 0 } else { before.unwrap_or(0) }, Ordering::Relaxed);
            // A pass over the whole store may take several sweeps: parked letters may remain
            // until a whole pass found none.
            if from == 0 {
                PASS_FOUND.store(false, Ordering::Relaxed);
            }
            let found_in_pass = PASS_FOUND.fetch_or(any, Ordering::Relaxed) || any;
            let any = if at_end { found_in_pass } else { true };
            let mut requested = 0;
            for (function, mut ids) in by_function {
                ids.reverse(); // oldest first: the probe is the oldest
                if !attached.contains(&function) {
                    crate::function::close(&function);
                }
                if !replay_due(&function) {
                    continue;
                }
                // An open circuit gets one probe; a closed one its letters.
                let take = if crate::function::is_open(&function) { 1 } else { ids.len() };
                for id in ids.into_iter().take(take) {
                    requested += db.request_dead_letter_replay(Some(id))? as usize;
                }
            }
            Ok((any, requested))
        })
    })
    .await;
    match found {
        Ok(Ok((any, requested))) => {
            if any {
                PARKED_PENDING.store(true, Ordering::Relaxed);
            }
            if requested > 0 {
                tracing::info!(dead_letters = requested, "replaying parked events of source functions");
            }
            requested
        }
        Ok(Err(e)) => {
            PARKED_PENDING.store(true, Ordering::Relaxed);
            tracing::warn!(error = %e, "cannot look for parked dead letters");
            0
        }
        Err(e) => {
            PARKED_PENDING.store(true, Ordering::Relaxed);
            tracing::warn!(error = %e, "parked dead-letter sweep task failed");
            0
        }
    }
}

/// Re-plan one dead letter and hand its jobs over; the jobs made.
async fn replay_one(sink: &dyn JobSink, planner: &Planner, letter: &DeadLetter) -> Result<i64, String> {
    if letter.truncated {
        return Err(format!(
            "stored cut to the store's limit ({} bytes of {}); the whole record is {} partition {} offset {} while retention keeps it",
            letter.payload.len(),
            letter.payload_size,
            letter.topic,
            letter.partition,
            letter.offset
        ));
    }
    let value = Bytes::from(letter.payload.clone());
    let decision = planner
        .plan_batch_in(Lane::Replay, &[(&letter.key[..], &value)], letter.generation, letter.destination.as_deref())
        .await
        .pop()
        .expect("one per record")?;
    let jobs = decision.jobs.len() as i64;
    sink.insert_jobs(decision.jobs, letter.record_ms).await.map_err(|e| e.to_string())?;
    Ok(jobs)
}

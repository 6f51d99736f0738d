//! `s3` destinations (docs/DESTINATIONS.md): a data lake of
//! newline-delimited JSON, gzip-compressed, in an S3 bucket (or an
//! S3-compatible server's), written through `object_store`.
//!
//! Invariants:
//! - A batch's jobs are grouped by source and by the UTC hour of each
//!   event's `receivedAt` (the write time when it has none); a group is one
//!   object, `<prefix>/source=<id>/dt=<YYYY-MM-DD>/hour=<HH>/<first job
//!   id>.ndjson.gz`, one line per job: its body (after the destination
//!   function) as one line of JSON.
//! - An object is written with one PUT: a reader sees it whole or not at
//!   all. Each job's outcome is its group's PUT.
//! - An object is named by its first job's id (a KSUID): a group sent
//!   again with the same first job — after a failed or lost answer, or a
//!   crash between the PUT and the `succeeded` rows — lands on the same
//!   object, replacing it. A job regrouped behind another first job lands
//!   in another object: at least once; readers drop repeats by messageId.
//!   A job recorded `succeeded` is never in a group sent again, so no
//!   replacement loses one.
//! - A body that is not JSON is discarded with the reason (a function's output).
//! - The SSRF guard checks an `s3_endpoint`'s address when the store is
//!   made, and a store is made again every minute; between, object_store
//!   resolves the name itself (a DNS answer that changes within the minute
//!   is not checked), and it uses the environment's `HTTP(S)_PROXY`.
//!   AWS itself (no endpoint) is public.
//! - Credentials: the destination's own (`s3_access_key_id`,
//!   `s3_secret_access_key`), else the process's `AWS_*` environment.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{path::Path as ObjectPath, ObjectStore, PutPayload};
use sluice_core::config::S3Target;

use crate::clients::Clients;
use crate::executor::{check_public, Attempt, Verdict};
use crate::ksuid::Ksuid;

/// One job to write.
pub struct Entry<'a> {
    pub id: Ksuid,
    pub source: &'a str,
    pub body: &'a Bytes,
}

/// A store unused this long is dropped when another is made.
const IDLE: Duration = Duration::from_secs(600);

/// How long a store is used before it is made (and its endpoint checked) again.
const RECHECK: Duration = Duration::from_secs(60);

/// The stores of every `s3` destination of this process: one per bucket,
/// prefix, server, credentials and private-network setting.
#[derive(Clone)]
pub struct Lakes {
    by_key: Clients<(S3Target, bool), Arc<dyn ObjectStore>>,
}

impl Default for Lakes {
    fn default() -> Self {
        // Made again every minute: the guard checks an address when the store is
        // made, and object_store resolves on its own after.
        Lakes { by_key: Clients::new(IDLE, Some(RECHECK)) }
    }
}

/// The UTC hour (hours since the epoch) of an RFC 3339 time. A time
/// outside years 1–9999 (a function's doing) is not a Hive date: the write
/// time's then.
fn partition_of(received_at: Option<&str>, now: chrono::DateTime<chrono::Utc>) -> i64 {
    use chrono::Datelike;
    let at = received_at
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .filter(|t| (1..=9999).contains(&t.year()))
        .unwrap_or(now);
    at.timestamp().div_euclid(3600)
}

/// The event's `receivedAt` and its one line of JSON; `Err`: not JSON.
/// The line is the body's own bytes: a raw line break in valid JSON can
/// only be whitespace between tokens (inside a string it must be
/// escaped), so dropping it changes nothing else — no number rounded, no
/// key reordered or merged.
fn line_of(body: &Bytes) -> Result<(Option<String>, Bytes), String> {
    #[derive(serde::Deserialize)]
    struct Stamp {
        #[serde(rename = "receivedAt")]
        received_at: Option<serde_json::Value>,
    }
    let stamp: Stamp = serde_json::from_slice(body).map_err(|e| format!("the event is not JSON: {e}"))?;
    let received_at = match stamp.received_at {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let line = if body.iter().any(|&b| b == b'\n' || b == b'\r') {
        Bytes::from(body.iter().copied().filter(|&b| b != b'\n' && b != b'\r').collect::<Vec<u8>>())
    } else {
        body.clone()
    };
    Ok((received_at, line))
}

/// One object to write: its path and the indexes of its jobs.
struct Group {
    path: String,
    jobs: Vec<usize>,
    lines: Vec<Bytes>,
}

/// The objects `entries` make (in the order their groups first appear),
/// and the jobs that cannot be written, with why.
fn group(entries: &[Entry<'_>], now: chrono::DateTime<chrono::Utc>) -> (Vec<Group>, Vec<(usize, String)>) {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<(&str, i64), usize> = HashMap::new();
    let mut refused = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let (received_at, line) = match line_of(e.body) {
            Ok(x) => x,
            Err(why) => {
                refused.push((i, why));
                continue;
            }
        };
        let hour = partition_of(received_at.as_deref(), now);
        let at = *index.entry((e.source, hour)).or_insert_with(|| {
            let at = chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or(now);
            let path = format!("source={}/{}/{}.ndjson.gz", e.source, at.format("dt=%Y-%m-%d/hour=%H"), e.id);
            groups.push(Group { path, jobs: Vec::new(), lines: Vec::new() });
            groups.len() - 1
        });
        groups[at].jobs.push(i);
        groups[at].lines.push(line);
    }
    (groups, refused)
}

/// `lines`, one per line, gzip-compressed (fast: a lake write is CPU-bound).
fn gzip(lines: &[Bytes]) -> std::io::Result<Vec<u8>> {
    let raw: usize = lines.iter().map(|l| l.len() + 1).sum();
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(raw / 4), flate2::Compression::fast());
    for line in lines {
        gz.write_all(line)?;
        gz.write_all(b"\n")?;
    }
    gz.finish()
}

impl Lakes {
    /// Write `entries` to `target`; one [`Attempt`] per entry, in order. Never fails.
    pub async fn write(&self, target: &S3Target, allow_private_network: bool, timeout: Duration, entries: &[Entry<'_>]) -> Vec<Attempt> {
        let started = Instant::now();
        let attempt =
            |verdict: Verdict, error: Option<String>| Attempt { verdict, status: None, error, retry_after: None, elapsed: started.elapsed() };
        let store = match self.store(target, allow_private_network).await {
            Ok(s) => s,
            Err((verdict, error)) => return entries.iter().map(|_| attempt(verdict, Some(error.clone()))).collect(),
        };
        // Reading and compressing thousands of events is CPU work: off the async workers.
        let owned: Vec<(Ksuid, String, Bytes)> = entries.iter().map(|e| (e.id, e.source.to_owned(), e.body.clone())).collect();
        let prepared = tokio::task::spawn_blocking(move || {
            let entries: Vec<Entry> = owned.iter().map(|(id, source, body)| Entry { id: *id, source, body }).collect();
            let (groups, refused) = group(&entries, chrono::Utc::now());
            let bodies: Vec<std::io::Result<Vec<u8>>> = groups.iter().map(|g| gzip(&g.lines)).collect();
            (groups, bodies, refused)
        })
        .await;
        let (groups, bodies, refused) = match prepared {
            Ok(p) => p,
            Err(e) => return entries.iter().map(|_| attempt(Verdict::Retry, Some(format!("reading the events failed: {e}")))).collect(),
        };
        let mut out: Vec<Option<Attempt>> = (0..entries.len()).map(|_| None).collect();
        for (i, why) in refused {
            out[i] = Some(attempt(Verdict::Discard, Some(why)));
        }
        let puts = groups.iter().zip(bodies).map(|(g, body)| {
            let store = store.clone();
            async move {
                let body = body.map_err(|e| format!("gzip: {e}"))?;
                let path = ObjectPath::from(g.path.as_str());
                match tokio::time::timeout(timeout, store.put(&path, PutPayload::from(body))).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("S3 PUT {}: {e}", g.path)),
                    Err(_) => Err(format!("S3 PUT {}: no answer within {timeout:?}", g.path)),
                }
            }
        });
        let results = futures_util::future::join_all(puts).await;
        for (g, result) in groups.iter().zip(results) {
            let a = match result {
                Ok(()) => attempt(Verdict::Succeeded, None),
                // The bucket away, refused, or missing: retried until the window ends (an operator can fix it).
                Err(why) => attempt(Verdict::Retry, Some(why)),
            };
            for &i in &g.jobs {
                out[i] = Some(a.clone());
            }
        }
        out.into_iter().map(|a| a.expect("every entry has an outcome")).collect()
    }

    async fn store(&self, target: &S3Target, allow_private_network: bool) -> Result<Arc<dyn ObjectStore>, (Verdict, String)> {
        let key = (target.clone(), allow_private_network);
        if let Some(kept) = self.by_key.get(&key) {
            return Ok(kept);
        }
        if let (Some(endpoint), false) = (&target.endpoint, allow_private_network) {
            check_endpoint(endpoint).await?;
        }
        let credentials = target.credentials.as_ref().map(|(id, secret)| (id.as_str(), secret.as_str()));
        let store = crate::archive::s3_store(&target.bucket, &target.prefix, target.endpoint.as_deref(), target.region.as_deref(), None, credentials)
            .map_err(|e| (Verdict::Discard, e))?;
        Ok(self.by_key.keep(key, store))
    }
}

/// Resolve an S3-compatible server and refuse a non-public address.
async fn check_endpoint(endpoint: &str) -> Result<(), (Verdict, String)> {
    let url = url::Url::parse(endpoint).map_err(|e| (Verdict::Discard, format!("s3_endpoint {endpoint}: {e}")))?;
    check_public("S3 endpoint", url.host_str().unwrap_or_default(), url.port_or_known_default().unwrap_or(443)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_are_grouped_by_source_and_hour_and_named_by_their_first_job() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-02T16:30:00Z").unwrap().with_timezone(&chrono::Utc);
        let mut next = crate::ksuid::KsuidGenerator::above(None);
        let ids: Vec<Ksuid> = (0..5).map(|_| next.next(1_700_000_000)).collect();
        let bodies: Vec<Bytes> = [
            r#"{"messageId":"a","receivedAt":"2026-12-01T10:59:59.999Z"}"#,
            r#"{"messageId":"b","receivedAt":"2026-12-01T11:00:00Z"}"#,
            "{\n  \"messageId\": \"c\",\n  \"receivedAt\": \"2026-12-01T12:00:00+01:00\"\n}",
            r#"{"messageId":"d"}"#,
            "not json",
        ]
        .into_iter()
        .map(Bytes::from)
        .collect();
        let entries: Vec<Entry> = (0..5).map(|i| Entry { id: ids[i], source: if i == 3 { "app" } else { "web" }, body: &bodies[i] }).collect();
        let (groups, refused) = group(&entries, now);
        let paths: Vec<(&str, &[usize])> = groups.iter().map(|g| (g.path.as_str(), g.jobs.as_slice())).collect();
        assert_eq!(
            paths,
            [
                (format!("source=web/dt=2026-12-01/hour=10/{}.ndjson.gz", ids[0]).as_str(), &[0][..]),
                (format!("source=web/dt=2026-12-01/hour=11/{}.ndjson.gz", ids[1]).as_str(), &[1, 2][..]),
                (format!("source=app/dt=2026-12-02/hour=16/{}.ndjson.gz", ids[3]).as_str(), &[3][..]),
            ]
        );
        assert_eq!(groups[1].lines[1], &br#"{  "messageId": "c",  "receivedAt": "2026-12-01T12:00:00+01:00"}"#[..], "one line each, its bytes kept");
        assert_eq!(refused.len(), 1);
        assert!(refused[0].1.contains("not JSON"), "{refused:?}");
        let gz = gzip(&groups[1].lines).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn a_pretty_printed_event_keeps_its_numbers_and_keys() {
        let body = Bytes::from_static(b"{\"n\":123456789012345678901234567890,\r\n \"p\":19.999999999999999999,\"a\":1,\"a\":2,\"s\":\"x\\ny\"}");
        let (_, line) = line_of(&body).unwrap();
        assert_eq!(&line[..], &b"{\"n\":123456789012345678901234567890, \"p\":19.999999999999999999,\"a\":1,\"a\":2,\"s\":\"x\\ny\"}"[..]);
        let now = chrono::Utc::now();
        assert_eq!(partition_of(Some("0000-01-01T00:00:00+01:00"), now), partition_of(None, now), "not a Hive date: the write time");
    }
}

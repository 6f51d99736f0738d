//! `s3` destinations (docs/DESTINATIONS.md): a data lake in an S3 bucket
//! (or an S3-compatible server's), written through `object_store`, of
//! newline-delimited JSON, gzip-compressed, or of Apache Parquet.
//!
//! Invariants:
//! - A batch's jobs are grouped by source and by the UTC hour of each
//!   event's `receivedAt` (the write time when it has none); a group is one
//!   object, `<prefix>/source=<id>/dt=<YYYY-MM-DD>/hour=<HH>/<first job
//!   id>.ndjson.gz` (or `.parquet`). NDJSON: one line per job, its body
//!   (after the destination function) as one line of JSON. Parquet: one row
//!   per job, in one row group, with the fixed schema of [`PARQUET_COLUMNS`]:
//!   the event's identity and times typed, and the whole line in `json` —
//!   every object has the same schema, so no event's types can conflict
//!   with another's, and nothing of an event is left out.
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
use sluice_core::config::{LakeFormat, S3Target};

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
        .filter(|t| (1..=9999).contains(&t.year()) && (FIRST_MICROS..=LAST_MICROS).contains(&t.timestamp_micros()))
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
fn group(entries: &[Entry<'_>], format: LakeFormat, now: chrono::DateTime<chrono::Utc>) -> (Vec<Group>, Vec<(usize, String)>) {
    let extension = match format {
        LakeFormat::Ndjson => "ndjson.gz",
        LakeFormat::Parquet => "parquet",
    };
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
            let path = format!("source={}/{}/{}.{extension}", e.source, at.format("dt=%Y-%m-%d/hour=%H"), e.id);
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

/// An object's bytes: `lines` in `format`.
fn encode(format: LakeFormat, lines: &[Bytes]) -> Result<Vec<u8>, String> {
    match format {
        LakeFormat::Ndjson => gzip(lines).map_err(|e| format!("gzip: {e}")),
        LakeFormat::Parquet => parquet(lines).map_err(|e| format!("parquet: {e}")),
    }
}

/// A Parquet object's columns, in order: the event's keys (camelCase in
/// the event) as text, or as UTC timestamps (µs) for its times, then the
/// whole event. A key that is absent, of another JSON type (an id may be a
/// number: its text), or a time that does not parse is null there; `json`
/// still holds it.
pub const PARQUET_COLUMNS: [(&str, &str, ParquetColumn); 13] = [
    ("message_id", "messageId", ParquetColumn::Text),
    ("type", "type", ParquetColumn::Text),
    ("event", "event", ParquetColumn::Text),
    ("name", "name", ParquetColumn::Text),
    ("user_id", "userId", ParquetColumn::Text),
    ("anonymous_id", "anonymousId", ParquetColumn::Text),
    ("group_id", "groupId", ParquetColumn::Text),
    ("previous_id", "previousId", ParquetColumn::Text),
    ("timestamp", "timestamp", ParquetColumn::Time),
    ("original_timestamp", "originalTimestamp", ParquetColumn::Time),
    ("sent_at", "sentAt", ParquetColumn::Time),
    ("received_at", "receivedAt", ParquetColumn::Time),
    ("json", "", ParquetColumn::Json),
];

/// The kinds of [`PARQUET_COLUMNS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParquetColumn {
    /// UTF-8, nullable.
    Text,
    /// Timestamp (microseconds, UTC), nullable.
    Time,
    /// The whole event as JSON text, never null.
    Json,
}

/// The values of an event's top-level keys [`PARQUET_COLUMNS`] names (all
/// but `json`), in their order; other keys are skipped unread. A key given
/// twice is an error, as for any struct serde reads.
struct TopLevel([Option<serde_json::Value>; 12]);

impl<'de> serde::Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = TopLevel;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
                let mut values: [Option<serde_json::Value>; 12] = Default::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match PARQUET_COLUMNS[..12].iter().position(|c| c.1 == key) {
                        Some(i) if values[i].is_some() => return Err(serde::de::Error::custom(format!("duplicate field `{key}`"))),
                        Some(i) => values[i] = Some(map.next_value()?),
                        None => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(TopLevel(values))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// A text column's value: a string, or a number's or boolean's text.
fn text_of(v: &Option<serde_json::Value>) -> Option<String> {
    match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    }
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z in microseconds since the epoch.
const FIRST_MICROS: i64 = -62_135_596_800_000_000;
const LAST_MICROS: i64 = 253_402_300_799_999_999;

/// A time column's value: an RFC 3339 time as microseconds since the epoch, UTC.
fn micros_of(v: &Option<serde_json::Value>) -> Option<i64> {
    match v {
        // Years 1–9999 only: the dates readers (Python's, Java's) hold. Checked on the
        // instant itself: a leap second (…23:59:60) of 9999-12-31 is in year 10000.
        Some(serde_json::Value::String(s)) => {
            chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_micros()).filter(|m| (FIRST_MICROS..=LAST_MICROS).contains(m))
        }
        _ => None,
    }
}

/// `lines` as one Parquet file, Snappy-compressed (one row group: a batch
/// holds ≤ 10,000 events, a row group by default up to 1M rows).
fn parquet(lines: &[Bytes]) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    use arrow_array::builder::{StringBuilder, TimestampMicrosecondBuilder};
    use arrow_array::ArrayRef;
    use arrow_schema::{DataType, Field, Schema, TimeUnit};
    use parquet::file::properties::{EnabledStatistics, WriterProperties};
    use parquet::schema::types::ColumnPath;

    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let fields: Vec<Field> = PARQUET_COLUMNS
        .iter()
        .map(|(name, _, kind)| match kind {
            ParquetColumn::Text => Field::new(*name, DataType::Utf8, true),
            ParquetColumn::Time => Field::new(*name, time.clone(), true),
            ParquetColumn::Json => Field::new(*name, DataType::Utf8, false),
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    enum Builder {
        Text(StringBuilder),
        Time(TimestampMicrosecondBuilder),
    }
    let mut builders: Vec<Builder> = PARQUET_COLUMNS[..12]
        .iter()
        .map(|(_, _, kind)| match kind {
            ParquetColumn::Time => Builder::Time(TimestampMicrosecondBuilder::with_capacity(lines.len()).with_timezone("UTC")),
            _ => Builder::Text(StringBuilder::with_capacity(lines.len(), lines.len() * 16)),
        })
        .collect();
    let mut json = StringBuilder::with_capacity(lines.len(), lines.iter().map(|l| l.len()).sum());
    for line in lines {
        // A line that passed `line_of` is JSON; one these keys cannot be read from
        // (a key given twice) still has its row, with only `json`.
        let top = serde_json::from_slice(line).unwrap_or(TopLevel(Default::default()));
        for (builder, value) in builders.iter_mut().zip(&top.0) {
            match builder {
                Builder::Text(b) => b.append_option(text_of(value)),
                Builder::Time(b) => b.append_option(micros_of(value)),
            }
        }
        json.append_value(String::from_utf8_lossy(line));
    }
    let mut columns: Vec<ArrayRef> = builders
        .into_iter()
        .map(|b| match b {
            Builder::Text(mut b) => Arc::new(b.finish()) as ArrayRef,
            Builder::Time(mut b) => Arc::new(b.finish()) as ArrayRef,
        })
        .collect();
    columns.push(Arc::new(json.finish()));
    let batch = arrow_array::RecordBatch::try_new(schema.clone(), columns)?;
    // The whole event is unique per row: no dictionary, no min/max kept for it.
    let json_column = ColumnPath::from("json");
    let properties = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_column_dictionary_enabled(json_column.clone(), false)
        .set_column_statistics_enabled(json_column, EnabledStatistics::None)
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(Vec::with_capacity(lines.len() * 64), schema, Some(properties))?;
    writer.write(&batch)?;
    writer.into_inner()
}

impl Lakes {
    /// Take out the stores no target in `live` uses.
    pub(crate) fn take_unused(&self, live: &[&S3Target]) -> Vec<Arc<dyn ObjectStore>> {
        self.by_key.take_unless(|(t, _)| live.contains(&t))
    }

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
        let format = target.format;
        let owned: Vec<(Ksuid, String, Bytes)> = entries.iter().map(|e| (e.id, e.source.to_owned(), e.body.clone())).collect();
        let prepared = tokio::task::spawn_blocking(move || {
            let entries: Vec<Entry> = owned.iter().map(|(id, source, body)| Entry { id: *id, source, body }).collect();
            let (groups, refused) = group(&entries, format, chrono::Utc::now());
            let bodies: Vec<Result<Vec<u8>, String>> = groups.iter().map(|g| encode(format, &g.lines)).collect();
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
                let body = body?;
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
        let (groups, refused) = group(&entries, LakeFormat::Ndjson, now);
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
    fn parquet_rows_hold_typed_keys_and_the_whole_event() {
        use arrow_array::{Array, StringArray, TimestampMicrosecondArray};
        let lines: Vec<Bytes> = [
            r#"{"type":"track","event":"Order Completed","messageId":"m1","userId":42,"properties":{"total":9.5},"receivedAt":"2026-12-01T10:00:00.123456Z","extra":[1,2]}"#,
            r#"{"type":"identify","messageId":"m2","anonymousId":"a","timestamp":"not a time","sentAt":"10000-01-01T00:00:00Z","originalTimestamp":"9999-12-31T23:59:60Z"}"#,
            r#"{"messageId":"m3","userId":"u","userId":"v"}"#,
        ]
        .into_iter()
        .map(Bytes::from)
        .collect();
        let file = Bytes::from(parquet(&lines).unwrap());
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
        let batches: Vec<_> = reader.map(|b| b.unwrap()).collect();
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        let schema = b.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, PARQUET_COLUMNS.map(|c| c.0));
        let text = |name: &str| b.column_by_name(name).unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
        let (ids, users, events, json) = (text("message_id"), text("user_id"), text("event"), text("json"));
        assert_eq!((ids.value(0), ids.value(1)), ("m1", "m2"));
        assert_eq!(users.value(0), "42", "a numeric id as its text");
        assert!(users.is_null(1) && events.is_null(1));
        assert_eq!(events.value(0), "Order Completed");
        // A key given twice: the row is kept with only the whole event.
        assert!(ids.is_null(2));
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(json.value(i).as_bytes(), &line[..], "row {i} keeps the event's bytes");
        }
        let time = |name: &str| b.column_by_name(name).unwrap().as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap().clone();
        let received = time("received_at");
        assert_eq!(received.value(0), 1_796_119_200_123_456);
        assert!(received.is_null(1));
        assert!(time("timestamp").is_null(1) && time("sent_at").is_null(1), "unparsable or out-of-range times are null");
        assert!(time("original_timestamp").is_null(1), "a leap second into year 10000 is out of range");
        assert_eq!(micros_of(&Some("0001-01-01T00:00:00Z".into())), Some(FIRST_MICROS));
        assert_eq!(micros_of(&Some("9999-12-31T23:59:59.999999Z".into())), Some(LAST_MICROS));
        assert_eq!(parquet(&[]).map(|f| f.is_empty()).ok(), Some(false), "an empty group is still a file");
    }

    /// A store no destination uses any more (deleted, or another endpoint
    /// or credentials) is dropped by the executor's sweep; the others stay.
    #[tokio::test]
    async fn stores_no_destination_uses_are_dropped() {
        let toml = "[[destinations]]\nid = \"a\"\ntype = \"s3\"\nurl = \"s3://lake-a/x\"\ns3_endpoint = \"http://s3.example:9000\"\n\
                    [[destinations]]\nid = \"b\"\ntype = \"s3\"\nurl = \"s3://lake-b/x\"\ns3_endpoint = \"http://s3.example:9000\"\n";
        let config = sluice_core::config::Config::from_toml_with_env(toml, "", &HashMap::new()).unwrap();
        let executor = crate::executor::Executor::new(Duration::from_secs(1)).unwrap();
        let targets: Vec<S3Target> = config.destinations.iter().map(|d| d.s3_target().unwrap()).collect();
        for t in &targets {
            let store = crate::archive::s3_store(&t.bucket, &t.prefix, t.endpoint.as_deref(), None, None, None).unwrap();
            executor.lakes.by_key.keep((t.clone(), false), store);
        }
        executor.drop_unused_clients(config.destinations.iter().filter(|d| d.id == "a")).await;
        assert!(executor.lakes.by_key.get(&(targets[0].clone(), false)).is_some(), "a's store stays");
        assert!(executor.lakes.by_key.get(&(targets[1].clone(), false)).is_none(), "b's is dropped");
    }

    #[test]
    fn a_pretty_printed_event_keeps_its_numbers_and_keys() {
        let body = Bytes::from_static(b"{\"n\":123456789012345678901234567890,\r\n \"p\":19.999999999999999999,\"a\":1,\"a\":2,\"s\":\"x\\ny\"}");
        let (_, line) = line_of(&body).unwrap();
        assert_eq!(&line[..], &b"{\"n\":123456789012345678901234567890, \"p\":19.999999999999999999,\"a\":1,\"a\":2,\"s\":\"x\\ny\"}"[..]);
        let now = chrono::Utc::now();
        assert_eq!(partition_of(Some("0000-01-01T00:00:00+01:00"), now), partition_of(None, now), "not a Hive date: the write time");
        assert_eq!(partition_of(Some("9999-12-31T23:59:60Z"), now), partition_of(None, now), "a leap second into year 10000");
    }
}

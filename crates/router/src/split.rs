//! Splitting a request of a workspace that is moving between cells
//! (docs/plans/MIGRATION.md): each event goes to the cell that owns its
//! messageId's bucket now.
//!
//! Invariants:
//! - The messageId is read with ingest's own parsers (the last `messageId`
//!   wins, escapes decoded), so the router buckets exactly the id ingest
//!   will deduplicate on.
//! - An event without a usable messageId (absent, null, empty: ingest
//!   assigns a random one, so no copy of it can be recognised anyway) is
//!   *free*: it goes to the source while the source owns any bucket, else
//!   to the target ([`free_side`]); the cells' gates apply the same rule.
//! - A request holding any event of a fenced bucket waits whole: no part
//!   of it is sent until the fence lifts (the caller polls).
//! - Parts are rebuilt from the raw JSON of the fields and items (nothing
//!   re-serialized), and sent uncompressed.

use bytes::Bytes;
use serde_json::value::RawValue;
use sluice_core::{bucket_for, BucketSet};
use sluice_ingest::event::{BatchBody, RawObject};
use sluice_ingest::request::{ApiError, Call};

pub use sluice_core::bucket::{free_side, Side};

/// What to do with a request of a moving workspace.
#[derive(Debug)]
pub enum SplitPlan {
    /// Every event goes to one side: forward the request as it came.
    Whole(Side),
    /// Some event's bucket is fenced (a cutover): wait and route again.
    Wait,
    /// A batch spanning both sides: one body per side.
    Parts { source: Bytes, target: Bytes },
}

/// The side of one event (`None`: fenced). An id ingest would refuse is
/// free (ingest refuses it wherever it goes).
fn side_of(item: &RawObject<'_>, moved: BucketSet, fenced: BucketSet) -> Option<Side> {
    let id = match item.get_str("messageId") {
        Some(id) if !id.is_empty() => id,
        _ => return free_side(moved, fenced),
    };
    let bucket = bucket_for(&id);
    if fenced.contains(bucket) {
        None
    } else if moved.contains(bucket) {
        Some(Side::Target)
    } else {
        Some(Side::Source)
    }
}

/// Plan a request whose decoded body is `body` (already within ingest's
/// limits). A body ingest could not parse goes whole to the source (or
/// wherever free events go): ingest answers it there, with its own error.
pub fn plan(kind: Call, body: &[u8], moved: BucketSet, fenced: BucketSet) -> Result<SplitPlan, ApiError> {
    let unparsed = || match free_side(moved, fenced) {
        Some(side) => Ok(SplitPlan::Whole(side)),
        None => Ok(SplitPlan::Wait),
    };
    let Ok(text) = std::str::from_utf8(body) else { return unparsed() };
    match kind {
        Call::Single(_) => {
            let Ok(item) = RawObject::parse(text) else { return unparsed() };
            Ok(side_of(&item, moved, fenced).map_or(SplitPlan::Wait, SplitPlan::Whole))
        }
        Call::Batch => {
            let Ok(parsed) = BatchBody::parse(text) else { return unparsed() };
            let Some(Ok(items)) = &parsed.batch else { return unparsed() };
            let mut sides: Vec<Side> = Vec::with_capacity(items.len());
            for raw in items {
                // A batch item ingest cannot read as an object is refused by ingest wherever it goes: free.
                let side = match RawObject::parse(raw.get()) {
                    Ok(item) => side_of(&item, moved, fenced),
                    Err(_) => free_side(moved, fenced),
                };
                match side {
                    Some(s) => sides.push(s),
                    None => return Ok(SplitPlan::Wait),
                }
            }
            let to_target = sides.iter().filter(|s| **s == Side::Target).count();
            if to_target == 0 {
                return Ok(SplitPlan::Whole(Side::Source));
            }
            if to_target == sides.len() {
                return Ok(SplitPlan::Whole(Side::Target));
            }
            let part = |side: Side| {
                let chosen = items.iter().zip(&sides).filter(|(_, s)| **s == side).map(|(item, _)| *item);
                batch_body(&parsed.fields, chosen)
            };
            Ok(SplitPlan::Parts { source: part(Side::Source), target: part(Side::Target) })
        }
    }
}

/// `{<fields>, "batch": [<items>]}` from raw JSON.
fn batch_body<'a>(fields: &RawObject<'_>, items: impl Iterator<Item = &'a RawValue>) -> Bytes {
    let mut out = String::from("{");
    for (name, value) in &fields.fields {
        out.push_str(&serde_json::to_string(name.as_ref()).expect("a string"));
        out.push(':');
        out.push_str(value.get());
        out.push(',');
    }
    out.push_str("\"batch\":[");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item.get());
    }
    out.push_str("]}");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_in(set: BucketSet, want: bool) -> String {
        (0..).map(|i| format!("id-{i}")).find(|m| set.holds(m) == want).unwrap()
    }

    #[test]
    fn a_batch_is_split_by_bucket_and_waits_on_a_fenced_one() {
        let moved = BucketSet::first(10);
        let fenced = BucketSet::first(50).minus(moved);
        let (to_target, fenced_id, to_source) = (id_in(moved, true), id_in(fenced, true), id_in(BucketSet::first(50), false));
        let batch = |ids: &[&str]| {
            let items: Vec<String> = ids.iter().map(|m| format!(r#"{{"type":"track","event":"e","userId":"u","messageId":"{m}"}}"#)).collect();
            format!(r#"{{"writeKey":"wk","context":{{"a":1}},"batch":[{}]}}"#, items.join(","))
        };
        let p = |body: String| plan(Call::Batch, body.as_bytes(), moved, fenced).unwrap();
        assert!(matches!(p(batch(&[&to_source, &to_source])), SplitPlan::Whole(Side::Source)));
        assert!(matches!(p(batch(&[&to_target])), SplitPlan::Whole(Side::Target)));
        assert!(matches!(p(batch(&[&to_source, &fenced_id, &to_target])), SplitPlan::Wait));
        let SplitPlan::Parts { source, target } = p(batch(&[&to_source, &to_target, &to_source, &to_source])) else { panic!("split") };
        let (source, target): (serde_json::Value, serde_json::Value) =
            (serde_json::from_slice(&source).unwrap(), serde_json::from_slice(&target).unwrap());
        assert_eq!(source["batch"].as_array().unwrap().len(), 3, "{source}");
        assert_eq!(target["batch"][0]["messageId"], serde_json::json!(to_target));
        for part in [&source, &target] {
            assert_eq!((part["writeKey"].as_str(), part["context"]["a"].as_i64()), (Some("wk"), Some(1)), "the batch's fields go with each part");
        }
        // An item ingest cannot read is free: it goes with the source's part, and ingest refuses it there.
        let odd = format!(r#"{{"batch":[5,{{"type":"track","event":"e","userId":"u","messageId":"{to_target}"}}]}}"#);
        let SplitPlan::Parts { source, .. } = p(odd) else { panic!("split") };
        assert_eq!(&source[..], br#"{"batch":[5]}"#);
        // Free events (no id) go to the source while it owns a bucket, then to the target.
        let free = r#"{"type":"track","event":"e","userId":"u"}"#.as_bytes();
        assert!(matches!(plan(Call::Single(sluice_ingest::event::EventType::Track), free, moved, fenced).unwrap(), SplitPlan::Whole(Side::Source)));
        assert!(matches!(plan(Call::Batch, b"not json", BucketSet::ALL, BucketSet::NONE).unwrap(), SplitPlan::Whole(Side::Target)));
        assert!(matches!(plan(Call::Batch, b"not json", BucketSet::NONE, BucketSet::ALL).unwrap(), SplitPlan::Wait));
        // The last messageId wins, as in ingest.
        let twice = format!(r#"{{"type":"track","event":"e","userId":"u","messageId":"{to_source}","messageId":"{to_target}"}}"#);
        assert!(matches!(
            plan(Call::Single(sluice_ingest::event::EventType::Track), twice.as_bytes(), moved, fenced).unwrap(),
            SplitPlan::Whole(Side::Target)
        ));
    }
}

//! Segment message validation and normalization.
//!
//! Rules (the Tracking API spec, as Segment applies it):
//! - `type` is one of identify, track, page, screen, group, alias; a single
//!   call without one takes it from the path.
//! - `userId` or `anonymousId` must be present (a JSON `null` beside the
//!   other is fine); alias needs `previousId` and `userId`; track needs
//!   `event`; group needs `groupId`.
//! - `messageId` is assigned when missing; at most 100 characters.
//! - `receivedAt` is the server's clock. `timestamp` is corrected for client
//!   clock skew: `timestamp = receivedAt − (sentAt − originalTimestamp)`,
//!   and the client's value is kept as `originalTimestamp`. Without a
//!   timestamp (or with one that does not parse) `timestamp = receivedAt`.
//! - Batch-level `context` and `integrations` are merged into each item,
//!   key by key, the item's keys winning.
//! - Every other field is preserved byte for byte; `writeKey` is removed
//!   (it is a credential, not event data).
//! - What is accepted can be read by every later stage: the event *as
//!   stored* (batch `context`/`integrations` merged in) is at most
//!   `max_event_bytes`, nests arrays and objects at most [`MAX_DEPTH`]
//!   deep, and holds only finite numbers and valid Unicode strings (no lone
//!   surrogate escapes), so route's full parse (`serde_json::Value`) cannot
//!   fail on it ([`check_stored`]).
//! - Work is linear in the input: objects with many keys are indexed
//!   ([`RawObject`]), so repeated or merged keys never cost a scan each.
//! - No input reaches a panic: date arithmetic is checked (a skew
//!   correction out of range falls back to `receivedAt`).
//!
//! For speed the item is never turned into a `serde_json::Value`: its
//! top-level keys are read as borrowed raw JSON slices, and the output is
//! written by copying those slices.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The six Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl EventType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "identify" => Self::Identify,
            "track" => Self::Track,
            "page" => Self::Page,
            "screen" => Self::Screen,
            "group" => Self::Group,
            "alias" => Self::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identify => "identify",
            Self::Track => "track",
            Self::Page => "page",
            Self::Screen => "screen",
            Self::Group => "group",
            Self::Alias => "alias",
        }
    }
}

/// Why an event was refused. `code()` is the stable machine-readable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event is not a JSON object")]
    NotAnObject,
    #[error("missing `type` (one of identify, track, page, screen, group, alias)")]
    MissingType,
    #[error("unknown type {0:?} (expected identify, track, page, screen, group or alias)")]
    UnknownType(String),
    #[error("`type` is {body:?} but the call was made to /v1/{path}")]
    TypeMismatch { body: String, path: &'static str },
    #[error("either `userId` or `anonymousId` is required")]
    MissingIdentity,
    #[error("`{0}` is required for {1} calls")]
    MissingField(&'static str, &'static str),
    #[error("`messageId` must be a string of at most 100 characters, without control characters")]
    InvalidMessageId,
    /// `size` is the event as stored, or as much of it as was written when
    /// the limit was passed.
    #[error("event is {size} bytes or more as stored; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("event nests arrays or objects deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("event holds a value later stages cannot read: {0}")]
    InvalidValue(String),
    /// A bug, caught: the item is refused, its neighbours are kept.
    #[error("internal error while reading this event")]
    Internal,
}

impl EventError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotAnObject => "invalid_event",
            Self::MissingType | Self::UnknownType(_) | Self::TypeMismatch { .. } => "invalid_type",
            Self::MissingIdentity => "missing_user_id",
            Self::MissingField(..) => "missing_field",
            Self::InvalidMessageId => "invalid_message_id",
            Self::TooLarge { .. } => "event_too_large",
            Self::TooDeep => "too_deep",
            Self::InvalidValue(_) => "invalid_value",
            Self::Internal => "internal_error",
        }
    }
}

/// A key of a JSON object, borrowed from the input unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A JSON object read shallowly: each top-level value stays raw JSON.
/// Keys keep their first position; a repeated key takes the last value.
///
/// Small objects (the usual event) are searched linearly; past
/// [`INDEX_AFTER`] keys a hash index is kept, so building or merging an
/// object of n keys is O(n), whatever a client sends.
#[derive(Debug, Default)]
pub struct RawObject<'a> {
    pub fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    index: Option<HashMap<Cow<'a, str>, usize>>,
}

/// Keys an object holds before lookups go through a hash index.
const INDEX_AFTER: usize = 16;

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let fields = Vec::with_capacity(map.size_hint().unwrap_or(12).min(64));
                let mut obj = RawObject { fields, index: None };
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    obj.insert(k, map.next_value()?);
                }
                Ok(obj)
            }
        }
        d.deserialize_map(V)
    }
}

/// A `/v1/batch` body read in one pass: `batch` split into raw items (each
/// still unparsed), every other top-level field kept raw in `fields`.
#[derive(Debug, Default)]
pub struct BatchBody<'a> {
    pub fields: RawObject<'a>,
    /// `None` when `batch` is absent; `Some(Err(()))` when it is not an array.
    pub batch: Option<Result<Vec<&'a RawValue>, ()>>,
}

impl<'a> BatchBody<'a> {
    pub fn parse(json: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}

impl<'de> Deserialize<'de> for BatchBody<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BatchBody<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut body = BatchBody::default();
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    if k == "batch" {
                        body.batch = Some(map.next_value::<MaybeArray<'de>>()?.0);
                    } else {
                        body.fields.insert(k, map.next_value()?);
                    }
                }
                Ok(body)
            }
        }
        d.deserialize_map(V)
    }
}

/// An array's raw elements, or `Err(())` for any other JSON value.
struct MaybeArray<'a>(Result<Vec<&'a RawValue>, ()>);

impl<'de> Deserialize<'de> for MaybeArray<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::IgnoredAny;
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeArray<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(100).min(4096));
                while let Some(item) = seq.next_element::<&'de RawValue>()? {
                    items.push(item);
                }
                Ok(MaybeArray(Ok(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MaybeArray(Err(())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeArray(Err(())))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeArray(Err(())))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeArray(Err(())))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeArray(Err(())))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MaybeArray(Err(())))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MaybeArray(Err(())))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'a> RawObject<'a> {
    pub fn parse(json: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// Set `key`; a repeated key keeps its first position and the last value.
    fn insert(&mut self, key: Cow<'a, str>, value: &'a RawValue) {
        match self.position(&key) {
            Some(i) => self.fields[i].1 = value,
            None => {
                if let Some(index) = &mut self.index {
                    index.insert(key.clone(), self.fields.len());
                }
                self.fields.push((key, value));
                if self.index.is_none() && self.fields.len() > INDEX_AFTER {
                    self.index = Some(self.fields.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect());
                }
            }
        }
    }

    fn position(&self, key: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => self.fields.iter().position(|(k, _)| k == key),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.position(key).map(|i| self.fields[i].1)
    }

    /// The value of `key` when it is a JSON string (unescaped).
    pub fn get_str(&self, key: &str) -> Option<Cow<'a, str>> {
        let raw = self.get(key)?;
        if !raw.get().starts_with('"') {
            return None;
        }
        serde_json::from_str::<Cow<'a, str>>(raw.get()).ok()
    }
}

fn is_null(v: &RawValue) -> bool {
    v.get() == "null"
}

/// A present identifier: a non-empty string or a number.
fn is_present_id(v: Option<&RawValue>) -> bool {
    match v.map(|v| v.get()) {
        None | Some("null") | Some("\"\"") => false,
        Some(s) => s.starts_with('"') || s.starts_with(|c: char| c == '-' || c.is_ascii_digit()),
    }
}

/// The batch-level fields that apply to every item of a request.
#[derive(Debug, Default)]
pub struct BatchContext<'a> {
    pub context: Option<RawObject<'a>>,
    pub integrations: Option<RawObject<'a>>,
    pub sent_at: Option<DateTime<Utc>>,
}

impl<'a> BatchContext<'a> {
    /// Read the batch-level fields of a `/v1/batch` body.
    pub fn from_body(body: &RawObject<'a>) -> Self {
        let obj = |k: &str| body.get(k).and_then(|v| RawObject::parse(v.get()).ok());
        Self { context: obj("context"), integrations: obj("integrations"), sent_at: body.get_str("sentAt").and_then(|s| parse_timestamp(&s)) }
    }
}

/// Limits applied to one event.
#[derive(Debug, Clone, Copy)]
pub struct EventLimits {
    pub max_event_bytes: usize,
}

/// A validated event, ready for the log.
#[derive(Debug)]
pub struct NormalizedEvent {
    pub message_id: String,
    /// The client gave `message_id` (else ingest assigned it).
    pub client_id: bool,
    pub event_type: EventType,
    pub json: Vec<u8>,
}

/// Parse an RFC 3339 / ISO 8601 timestamp: offsets (`Z`, `+02:00`) and
/// fractional seconds to nanoseconds; a timestamp without an offset is UTC.
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc());
        }
    }
    None
}

pub fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Fields the normalizer writes itself rather than copying.
const REWRITTEN: [&str; 8] = ["type", "messageId", "timestamp", "originalTimestamp", "receivedAt", "context", "integrations", "writeKey"];

/// Validate and normalize one item. `path_type` is the type the URL names
/// (single calls); `raw_len` is the item's size as the client sent it.
pub fn normalize(
    item: &RawObject<'_>,
    raw_len: usize,
    path_type: Option<EventType>,
    batch: &BatchContext<'_>,
    received_at: DateTime<Utc>,
    limits: EventLimits,
) -> Result<NormalizedEvent, EventError> {
    if raw_len > limits.max_event_bytes {
        return Err(EventError::TooLarge { size: raw_len, limit: limits.max_event_bytes });
    }
    let event_type = match (item.get("type"), path_type) {
        (None, Some(p)) => p,
        (Some(v), p) if is_null(v) && p.is_some() => p.expect("checked"),
        (None, None) => return Err(EventError::MissingType),
        (Some(_), p) => {
            let s = item.get_str("type").ok_or(EventError::MissingType)?;
            let t = EventType::parse(&s).ok_or_else(|| EventError::UnknownType(s.clone().into_owned()))?;
            if let Some(p) = p.filter(|p| *p != t) {
                return Err(EventError::TypeMismatch { body: s.into_owned(), path: p.as_str() });
            }
            t
        }
    };
    let name = event_type.as_str();
    match event_type {
        EventType::Alias => {
            if !is_present_id(item.get("previousId")) {
                return Err(EventError::MissingField("previousId", name));
            }
            if !is_present_id(item.get("userId")) {
                return Err(EventError::MissingField("userId", name));
            }
        }
        _ => {
            if !is_present_id(item.get("userId")) && !is_present_id(item.get("anonymousId")) {
                return Err(EventError::MissingIdentity);
            }
        }
    }
    match event_type {
        EventType::Track if item.get("event").is_some_and(|v| v.get().starts_with('"')) && item.get_str("event").is_none() => {
            return Err(EventError::InvalidValue("`event` is not a valid string (a lone surrogate escape?)".into()));
        }
        EventType::Track if item.get_str("event").is_none_or(|e| e.is_empty()) => {
            return Err(EventError::MissingField("event", name));
        }
        EventType::Group if !is_present_id(item.get("groupId")) => {
            return Err(EventError::MissingField("groupId", name));
        }
        _ => {}
    }
    let message_id = match item.get("messageId") {
        None => None,
        Some(v) if is_null(v) || v.get() == "\"\"" => None,
        Some(_) => {
            let id = item.get_str("messageId").ok_or(EventError::InvalidMessageId)?;
            // It travels as the Idempotency-Key header of every delivery:
            // control characters cannot (and would retry until archived).
            if id.chars().count() > 100 || id.chars().any(char::is_control) {
                return Err(EventError::InvalidMessageId);
            }
            Some(id.into_owned())
        }
    };
    let client_id = message_id.is_some();
    let message_id = message_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());

    let original = item.get("timestamp").filter(|v| !is_null(v));
    let sent_at = item.get_str("sentAt").and_then(|s| parse_timestamp(&s)).or(batch.sent_at);
    let timestamp = match original.and_then(|_| item.get_str("timestamp")).and_then(|s| parse_timestamp(&s)) {
        // Checked: a far-apart pair (years -260000 and +260000 parse) would
        // overflow; such a correction is meaningless, so receivedAt stands.
        Some(ts) => match sent_at {
            Some(sent) => received_at.checked_sub_signed(sent.signed_duration_since(ts)).unwrap_or(received_at),
            None => ts,
        },
        None => received_at,
    };

    let mut out = Vec::with_capacity(raw_len + 160);
    out.push(b'{');
    let mut first = true;
    let mut field = |out: &mut Vec<u8>, key: &str| {
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut *out, key).expect("writing to a Vec");
        out.push(b':');
    };
    // Each copy is checked against the limit before it is made, so a large
    // shared `context` costs at most one event's worth of copying per item.
    let limit = limits.max_event_bytes;
    let fits = |out: &Vec<u8>, extra: usize| {
        let size = out.len() + extra;
        if size > limit {
            Err(EventError::TooLarge { size, limit })
        } else {
            Ok(())
        }
    };
    for (k, v) in &item.fields {
        if !REWRITTEN.contains(&k.as_ref()) {
            fits(&out, k.len() + v.get().len())?;
            field(&mut out, k);
            out.extend_from_slice(v.get().as_bytes());
        }
    }
    for (key, batch_obj) in [("context", &batch.context), ("integrations", &batch.integrations)] {
        match (item.get(key), batch_obj) {
            (Some(own), Some(shared)) => match RawObject::parse(own.get()) {
                Ok(own_obj) => {
                    field(&mut out, key);
                    write_merged(&mut out, &own_obj, shared, limit)?;
                }
                Err(_) => {
                    fits(&out, own.get().len())?;
                    field(&mut out, key);
                    out.extend_from_slice(own.get().as_bytes());
                }
            },
            (Some(own), None) => {
                fits(&out, own.get().len())?;
                field(&mut out, key);
                out.extend_from_slice(own.get().as_bytes());
            }
            (None, Some(shared)) => {
                field(&mut out, key);
                write_merged(&mut out, &RawObject::default(), shared, limit)?;
            }
            (None, None) => {}
        }
    }
    field(&mut out, "type");
    serde_json::to_writer(&mut out, name).expect("writing to a Vec");
    field(&mut out, "messageId");
    serde_json::to_writer(&mut out, &message_id).expect("writing to a Vec");
    if let Some(orig) = original {
        field(&mut out, "originalTimestamp");
        out.extend_from_slice(orig.get().as_bytes());
    }
    field(&mut out, "timestamp");
    serde_json::to_writer(&mut out, &format_timestamp(timestamp)).expect("writing to a Vec");
    field(&mut out, "receivedAt");
    serde_json::to_writer(&mut out, &format_timestamp(received_at)).expect("writing to a Vec");
    out.push(b'}');
    if out.len() > limits.max_event_bytes {
        return Err(EventError::TooLarge { size: out.len(), limit: limits.max_event_bytes });
    }
    check_stored(&out)?;
    Ok(NormalizedEvent { message_id, client_id, event_type, json: out })
}

/// Deepest nesting of arrays and objects in a stored event; the event
/// object itself is level 1. Below serde_json's own limit (128), which
/// route's parse would otherwise hit.
pub const MAX_DEPTH: usize = 64;

/// Check that `json` parses as a `serde_json::Value` would (finite numbers,
/// valid strings and keys) and nests at most [`MAX_DEPTH`] levels, without
/// building the value. serde_json skims raw values without these checks, so
/// this pass is what makes "accepted" mean "every stage can read it".
pub fn check_stored(json: &[u8]) -> Result<(), EventError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    match (Checked { depth: 0 }).deserialize(&mut de).and_then(|()| de.end()) {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().starts_with(TOO_DEEP) => Err(EventError::TooDeep),
        Err(e) => Err(EventError::InvalidValue(e.to_string())),
    }
}

const TOO_DEEP: &str = "nested too deep";

/// A visitor that reads every value fully (as `Value` would) and keeps
/// nothing; `depth` is the nesting of the value it is about to read.
#[derive(Clone, Copy)]
struct Checked {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Checked {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("number out of range"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested::<A::Error>()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested::<A::Error>()?;
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

impl Checked {
    fn nested<E: serde::de::Error>(self) -> Result<Checked, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(TOO_DEEP));
        }
        Ok(Checked { depth: self.depth + 1 })
    }
}

/// `{...}` holding `shared`'s keys that `own` lacks, then all of `own`'s;
/// `TooLarge` as soon as `out` would pass `limit`.
fn write_merged(out: &mut Vec<u8>, own: &RawObject<'_>, shared: &RawObject<'_>, limit: usize) -> Result<(), EventError> {
    out.push(b'{');
    let mut first = true;
    let inherited = shared.fields.iter().filter(|(k, _)| own.get(k).is_none());
    for (k, v) in inherited.chain(own.fields.iter()) {
        let size = out.len() + k.len() + v.get().len();
        if size > limit {
            return Err(EventError::TooLarge { size, limit });
        }
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut *out, k.as_ref()).expect("writing to a Vec");
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const LIMITS: EventLimits = EventLimits { max_event_bytes: 32 * 1024 };

    fn received() -> DateTime<Utc> {
        parse_timestamp("2024-05-01T12:00:10.000Z").unwrap()
    }

    fn run(item: Value, path: Option<EventType>, batch: &BatchContext) -> Result<Value, EventError> {
        let text = item.to_string();
        let obj = RawObject::parse(&text).unwrap();
        let ev = normalize(&obj, text.len(), path, batch, received(), LIMITS)?;
        let v: Value = serde_json::from_slice(&ev.json).expect("output is valid JSON");
        assert_eq!(v["messageId"], json!(ev.message_id));
        Ok(v)
    }

    fn ok(item: Value) -> Value {
        run(item, None, &BatchContext::default()).expect("valid")
    }

    fn err(item: Value) -> EventError {
        run(item, None, &BatchContext::default()).expect_err("invalid")
    }

    #[test]
    fn every_type_with_its_required_fields_is_accepted() {
        ok(json!({"type":"identify","userId":"u1"}));
        ok(json!({"type":"track","anonymousId":"a1","event":"Clicked"}));
        ok(json!({"type":"page","userId":"u1"}));
        ok(json!({"type":"screen","userId":"u1"}));
        ok(json!({"type":"group","userId":"u1","groupId":"g1"}));
        ok(json!({"type":"alias","userId":"u1","previousId":"p1"}));
    }

    #[test]
    fn identity_is_required_but_null_beside_the_other_is_fine() {
        assert_eq!(err(json!({"type":"identify"})), EventError::MissingIdentity);
        assert_eq!(err(json!({"type":"identify","userId":null,"anonymousId":null})), EventError::MissingIdentity);
        assert_eq!(err(json!({"type":"identify","userId":""})), EventError::MissingIdentity);
        ok(json!({"type":"identify","userId":null,"anonymousId":"a"}));
        ok(json!({"type":"identify","userId":"u","anonymousId":null}));
        ok(json!({"type":"identify","userId":42}));
    }

    #[test]
    fn per_type_required_fields() {
        assert_eq!(err(json!({"type":"track","userId":"u"})), EventError::MissingField("event", "track"));
        assert_eq!(err(json!({"type":"track","userId":"u","event":""})), EventError::MissingField("event", "track"));
        assert_eq!(err(json!({"type":"group","userId":"u"})), EventError::MissingField("groupId", "group"));
        assert_eq!(err(json!({"type":"alias","userId":"u"})), EventError::MissingField("previousId", "alias"));
        assert_eq!(err(json!({"type":"alias","anonymousId":"a","previousId":"p"})), EventError::MissingField("userId", "alias"));
    }

    #[test]
    fn type_comes_from_the_path_when_missing_and_must_agree() {
        let v = run(json!({"userId":"u","event":"E"}), Some(EventType::Track), &BatchContext::default()).unwrap();
        assert_eq!(v["type"], "track");
        assert_eq!(err(json!({"userId":"u"})), EventError::MissingType);
        assert_eq!(err(json!({"type":"purchase","userId":"u"})), EventError::UnknownType("purchase".into()));
        let e = run(json!({"type":"page","userId":"u"}), Some(EventType::Track), &BatchContext::default()).unwrap_err();
        assert_eq!(e.code(), "invalid_type");
    }

    #[test]
    fn message_id_is_assigned_when_missing_and_bounded() {
        let v = ok(json!({"type":"identify","userId":"u"}));
        assert_eq!(v["messageId"].as_str().unwrap().len(), 36);
        let v = ok(json!({"type":"identify","userId":"u","messageId":null}));
        assert_eq!(v["messageId"].as_str().unwrap().len(), 36);
        let v = ok(json!({"type":"identify","userId":"u","messageId":"m-1"}));
        assert_eq!(v["messageId"], "m-1");
        let hundred = "x".repeat(100);
        assert_eq!(ok(json!({"type":"identify","userId":"u","messageId":hundred}))["messageId"], json!(hundred));
        assert_eq!(err(json!({"type":"identify","userId":"u","messageId":"x".repeat(101)})), EventError::InvalidMessageId);
        assert_eq!(err(json!({"type":"identify","userId":"u","messageId":7})), EventError::InvalidMessageId);
    }

    #[test]
    fn received_at_is_server_time_and_timestamp_is_skew_corrected() {
        // The client's clock is 1 hour fast: it sent at 13:00:05 (its time)
        // an event from 13:00:00 (its time); the server received at 12:00:10.
        let batch = BatchContext { sent_at: parse_timestamp("2024-05-01T13:00:05Z"), ..Default::default() };
        let v = run(json!({"type":"track","userId":"u","event":"E","timestamp":"2024-05-01T15:00:00.000+02:00"}), None, &batch).unwrap();
        assert_eq!(v["receivedAt"], "2024-05-01T12:00:10.000Z");
        assert_eq!(v["timestamp"], "2024-05-01T12:00:05.000Z");
        assert_eq!(v["originalTimestamp"], "2024-05-01T15:00:00.000+02:00");
    }

    #[test]
    fn item_sent_at_wins_and_microseconds_parse() {
        let batch = BatchContext { sent_at: parse_timestamp("2030-01-01T00:00:00Z"), ..Default::default() };
        let v = run(
            json!({"type":"track","userId":"u","event":"E","timestamp":"2024-05-01T12:00:00.250000Z","sentAt":"2024-05-01T12:00:01.250000Z"}),
            None,
            &batch,
        )
        .unwrap();
        assert_eq!(v["timestamp"], "2024-05-01T12:00:09.000Z");
        assert_eq!(v["originalTimestamp"], "2024-05-01T12:00:00.250000Z");
    }

    #[test]
    fn timestamp_without_sent_at_is_kept_and_missing_one_is_received_at() {
        let v = ok(json!({"type":"track","userId":"u","event":"E","timestamp":"2024-04-30T00:00:00Z"}));
        assert_eq!(v["timestamp"], "2024-04-30T00:00:00.000Z");
        let v = ok(json!({"type":"track","userId":"u","event":"E"}));
        assert_eq!(v["timestamp"], v["receivedAt"]);
        assert!(v.get("originalTimestamp").is_none());
        let v = ok(json!({"type":"track","userId":"u","event":"E","timestamp":"yesterday"}));
        assert_eq!(v["timestamp"], v["receivedAt"]);
        assert_eq!(v["originalTimestamp"], "yesterday");
    }

    #[test]
    fn batch_context_and_integrations_merge_with_item_keys_winning() {
        let body_text = json!({
            "batch": [],
            "context": {"library": {"name": "batch-lib"}, "ip": "1.2.3.4"},
            "integrations": {"All": false, "Mixpanel": true},
        })
        .to_string();
        let body = RawObject::parse(&body_text).unwrap();
        let batch = BatchContext::from_body(&body);
        let v =
            run(json!({"type":"track","userId":"u","event":"E","context":{"ip":"5.6.7.8","locale":"fr"},"integrations":{"All":true}}), None, &batch)
                .unwrap();
        assert_eq!(v["context"], json!({"library":{"name":"batch-lib"},"ip":"5.6.7.8","locale":"fr"}));
        assert_eq!(v["integrations"], json!({"All":true,"Mixpanel":true}));
        let v = run(json!({"type":"track","userId":"u","event":"E"}), None, &batch).unwrap();
        assert_eq!(v["context"]["ip"], "1.2.3.4");
    }

    #[test]
    fn unknown_fields_are_preserved_and_write_key_removed() {
        let v = ok(json!({
            "type":"track","userId":"u","event":"E","writeKey":"secret",
            "properties":{"price":9.99,"nested":{"a":[1,2,{"b":null}]}},
            "customTopLevel": "kept", "escaped\"key": "\u{e9}\n"
        }));
        assert_eq!(v["properties"]["nested"]["a"][2]["b"], Value::Null);
        assert_eq!(v["customTopLevel"], "kept");
        assert_eq!(v["escaped\"key"], "\u{e9}\n");
        assert!(v.get("writeKey").is_none());
    }

    #[test]
    fn oversize_event_is_refused() {
        let big = "x".repeat(33 * 1024);
        let e = err(json!({"type":"track","userId":"u","event":"E","properties":{"big":big}}));
        assert_eq!(e.code(), "event_too_large");
    }

    #[test]
    fn duplicate_keys_take_the_last_value() {
        let text = r#"{"type":"track","userId":"u","event":"first","event":"second"}"#;
        let obj = RawObject::parse(text).unwrap();
        let ev = normalize(&obj, text.len(), None, &BatchContext::default(), received(), LIMITS).unwrap();
        let v: Value = serde_json::from_slice(&ev.json).unwrap();
        assert_eq!(v["event"], "second");
    }

    #[test]
    fn large_objects_are_indexed_and_keep_first_position_last_value() {
        let mut text = String::from("{");
        for i in 0..40_000 {
            text.push_str(&format!("\"k{i}\":{i},"));
        }
        text.push_str("\"k7\":\"last\"}");
        let obj = RawObject::parse(&text).unwrap();
        assert!(obj.index.is_some(), "an object of 40,000 keys must be indexed (linear, not quadratic)");
        assert_eq!(obj.fields.len(), 40_000);
        assert_eq!(obj.fields[7].0, "k7");
        assert_eq!(obj.get("k7").unwrap().get(), "\"last\"");
        assert_eq!(obj.get("k39999").unwrap().get(), "39999");
        assert!(obj.get("k40000").is_none());
        let small = RawObject::parse(r#"{"a":1,"b":2,"a":3}"#).unwrap();
        assert!(small.index.is_none());
        assert_eq!(small.fields.len(), 2);
        assert_eq!(small.get("a").unwrap().get(), "3");
    }

    #[test]
    fn stored_json_is_checked_as_route_would_read_it() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check_stored(deep(MAX_DEPTH).as_bytes()), Ok(()));
        assert_eq!(check_stored(deep(MAX_DEPTH + 1).as_bytes()), Err(EventError::TooDeep));
        assert_eq!(check_stored(deep(100_000).as_bytes()), Err(EventError::TooDeep));
        for bad in [r#"{"n":1e400}"#, r#"{"n":-1e309}"#, r#"{"s":"\ud800"}"#, r#"{"s":"\udc00x"}"#, r#"{"\ud800":1}"#, r#"{"a":1} x"#] {
            assert!(matches!(check_stored(bad.as_bytes()), Err(EventError::InvalidValue(_))), "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}: route would read it");
        }
        for good in [r#"{"n":1e308,"m":-0.0,"i":18446744073709551615,"j":-9223372036854775808}"#, r#"{"s":"\ud83d\ude00"}"#, "{}"] {
            assert_eq!(check_stored(good.as_bytes()), Ok(()), "{good}");
        }
    }

    #[test]
    fn a_skew_correction_out_of_range_keeps_received_at() {
        let batch = BatchContext { sent_at: parse_timestamp("+262142-12-31T23:59:59"), ..Default::default() };
        let v = run(json!({"type":"track","userId":"u","event":"E","timestamp":"-262143-01-01T00:00:00"}), None, &batch).unwrap();
        assert_eq!(v["timestamp"], v["receivedAt"]);
        let batch = BatchContext { sent_at: parse_timestamp("-262143-01-01T00:00:00"), ..Default::default() };
        let v = run(json!({"type":"track","userId":"u","event":"E","timestamp":"+262142-12-31T23:59:59"}), None, &batch).unwrap();
        assert_eq!(v["timestamp"], v["receivedAt"]);
    }

    #[test]
    fn batch_body_splits_items_and_keeps_other_fields() {
        let text = r#"{"writeKey":"k","batch":[{"a":1}, "x", {"b":[2]}],"sentAt":"2024-01-01T00:00:00Z","writeKey":"k2"}"#;
        let body = BatchBody::parse(text).unwrap();
        let items = body.batch.unwrap().unwrap();
        assert_eq!(items.iter().map(|r| r.get()).collect::<Vec<_>>(), [r#"{"a":1}"#, r#""x""#, r#"{"b":[2]}"#]);
        assert_eq!(body.fields.get_str("writeKey").unwrap(), "k2");
        assert!(body.fields.get("batch").is_none());
        for not_array in [r#"{"batch":{"a":[1]}}"#, r#"{"batch":"s"}"#, r#"{"batch":null}"#, r#"{"batch":1.5}"#] {
            assert!(matches!(BatchBody::parse(not_array).unwrap().batch, Some(Err(()))), "{not_array}");
        }
        assert!(BatchBody::parse(r#"{"other":1}"#).unwrap().batch.is_none());
        assert!(BatchBody::parse(r#"{"batch":[1,}"#).is_err());
    }
}

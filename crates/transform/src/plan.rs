//! A tracking plan: its document (what the admin API stores), and the
//! compiled form the route checks events with.

use std::collections::BTreeMap;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{PatternOptions, Validator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Most violations listed for one event (the rest are not looked for).
pub const MAX_VIOLATIONS: usize = 20;
/// Longest violation description kept (characters).
pub const MAX_DESCRIPTION: usize = 200;
/// Most schemas in one plan (track events plus the other calls).
pub const MAX_SCHEMAS: usize = 2000;
/// Longest event name a plan may list (characters).
const MAX_EVENT_NAME: usize = 200;
/// The compiled size of one `pattern` (bytes of the regex program).
const PATTERN_SIZE_LIMIT: usize = 64 << 10;
/// Most `pattern`s (and `patternProperties` keys) in one plan: each may
/// scan every string it applies to (see [`PATTERN_CACHE_LIMIT`]).
pub const MAX_PATTERNS: usize = 200;
/// The lazy DFA cache of one pattern (per thread): past it the engine
/// falls back to slower search rather than growing (a red team's 1,000
/// Unicode-class patterns held ~2 MB each, 7 GB across threads).
const PATTERN_CACHE_LIMIT: usize = 128 << 10;
/// A pattern whose whole (dense) DFA is at most this size is *light*: the
/// lazy DFA that searches it never fills its cache (see
/// [`PATTERN_CACHE_LIMIT`]; a lazy DFA state takes ~4× a dense one's
/// row, so a quarter of the cache), and it runs in linear time at DFA
/// speed. (The second red team's `a[ab]{10}c`, a 32 KiB dense DFA, thrashed
/// a 128 KiB cache: 1 s for 199 copies on a 30 KB string.)
const LIGHT_PATTERN_DFA: usize = PATTERN_CACHE_LIMIT / 4;
/// A *heavy* pattern (a larger DFA: `a[ab]{10}c`, `\w*a\w{20}`, `^.{1,255}$`)
/// may thrash the cache and be searched by the NFA simulation, whose work
/// per byte grows with the pattern's *positions* (its literal characters and
/// classes, a counted repetition counting its count, a class one whatever
/// its size): ~13 ns per position per byte here. Its weight is its positions
/// times the bytes it may scan in one string: [`MAX_STRING_BYTES`], or its
/// longest match when anchored at the start and bounded (`^.{1,255}$`:
/// ~1 KB). A plan's heavy patterns may weigh this much together: about
/// 100 ms for a 32 KB event, 6 ms for a 2 KB one, at worst.
pub const MAX_HEAVY_PATTERN_WEIGHT: usize = 250 * MAX_STRING_BYTES;
/// The longest string an event can hold (ingest stores events of at most 32 KB).
const MAX_STRING_BYTES: usize = 32 << 10;
/// Most schema nodes one schema may amount to with every `$ref` followed
/// in place: bounds the work of a check (a chain of `$ref`s that each
/// doubles would otherwise cost 2^n per event).
pub const MAX_EXPANDED_NODES: usize = 5_000;
/// The values one event can hold, at most (32 KB stored, two bytes each):
/// what a schema under `items`, `additionalProperties`, `patternProperties`
/// and the like may be applied to.
const MAX_EVENT_VALUES: usize = 16 << 10;
/// The work one schema's check may amount to: its nodes (and each `enum`
/// or `const` value), a node that applies to an array's items or an
/// object's other properties counting [`MAX_EVENT_VALUES`] times. ~20 ns a
/// unit here: about 40 ms per check at worst. (The second red team's
/// `items: {anyOf: [4000 consts]}` took 8-16 s and ~18 GB per 30 KB event.)
pub const MAX_CHECK_WORK: usize = 2_000_000;
/// Nodes under repeating keywords beyond which a check reports only the
/// first violation: every failing node of every value makes an error
/// (an `anyOf` keeps each branch's), all held at once by the validator.
const MAX_REPEATED_NODES_FOR_ALL_ERRORS: usize = 4;

/// What happens to an event with a kind of violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Delivered unchanged (the violation is counted and shown in the debugger).
    #[default]
    Allow,
    /// Delivered with the violations at `context.violations`.
    Flag,
    /// Not delivered; sent to `forward_blocked_to` if set.
    Block,
}

/// The document of a plan, as `PUT /api/sources/{id}/tracking-plan` takes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanDoc {
    #[serde(default)]
    pub name: String,
    /// A `track` event whose name the plan does not list.
    #[serde(default)]
    pub unplanned: Action,
    /// An event that does not meet its schema (or the common one).
    #[serde(default)]
    pub invalid: Action,
    /// A destination that receives blocked events (with their violations), for review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_blocked_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common: Option<Value>,
    /// Event name → schema of the whole `track` event.
    #[serde(default)]
    pub track: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identify: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screen: Option<Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the plan is not valid JSON of the expected shape: {0}")]
    Shape(String),
    #[error("schema {at}: {problem}")]
    Schema { at: String, problem: String },
    #[error("{0}")]
    Limit(String),
    #[error("not a Segment tracking plan export: {0}")]
    Import(String),
}

/// The kind of a violation; each kind has its own [`Action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    UnplannedEvent,
    Invalid,
}

impl ViolationKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::UnplannedEvent => "unplanned_event",
            ViolationKind::Invalid => "invalid",
        }
    }
}

/// One violation, as `context.violations` carries it (Segment's names:
/// `Required`, `Invalid Type`, …).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    #[serde(skip)]
    pub kind: ViolationKind,
    #[serde(rename = "type")]
    pub violation_type: String,
    /// Dotted path in the event (`properties.price`).
    pub field: String,
    pub description: String,
}

/// What the plan made of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Flagged,
    Blocked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Flagged => "flagged",
            Outcome::Blocked => "blocked",
        }
    }
}

/// The check of one event.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    pub outcome: Outcome,
    /// The event's metric label: its planned name, `(unplanned)`, or its call type.
    pub label: String,
}

impl Verdict {
    /// Add the violations at `context.violations`. A `context` that is not
    /// an object becomes one (the value it had is kept at `context.value`):
    /// a client cannot dodge a flag by sending `"context": "x"`.
    pub fn flag(&self, event: &mut Value) {
        let Some(obj) = event.as_object_mut() else { return };
        let context = obj.entry("context").or_insert_with(|| Value::Object(Map::new()));
        if !context.is_object() {
            let value = context.take();
            let mut wrapped = Map::new();
            if !value.is_null() {
                wrapped.insert("value".into(), value);
            }
            *context = Value::Object(wrapped);
        }
        if let Some(context) = context.as_object_mut() {
            context.insert("violations".into(), serde_json::to_value(&self.violations).expect("violations serialize"));
        }
    }

    /// Remove a `context.violations` the client sent (only a plan's flag
    /// may put one there); true when there was one.
    pub fn strip_client_violations(event: &mut Value) -> bool {
        event.get_mut("context").and_then(Value::as_object_mut).is_some_and(|c| c.remove("violations").is_some())
    }
}

/// A compiled plan.
pub struct TrackingPlan {
    pub doc: PlanDoc,
    common: Option<Schema>,
    track: BTreeMap<String, Schema>,
    identify: Option<Schema>,
    group: Option<Schema>,
    page: Option<Schema>,
    screen: Option<Schema>,
}

impl std::fmt::Debug for TrackingPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackingPlan").field("name", &self.doc.name).field("track", &self.track.len()).finish()
    }
}

/// What a schema amounts to with its `$ref`s followed in place: its nodes
/// and its patterns. Refused: a `$ref` that leads back into itself (a
/// recursive schema can make a check's work grow exponentially with the
/// event's depth), `$dynamicRef`/`$recursiveRef`, a local `$ref` that is
/// not a JSON pointer, and more than [`MAX_EXPANDED_NODES`] nodes.
struct Cost<'a> {
    nodes: usize,
    /// Nodes (and enum/const values) that apply once, and those under a repeating keyword.
    work_once: usize,
    work_repeated: usize,
    /// Every `pattern` and `patternProperties` key, once per place it applies.
    patterns: Vec<&'a str>,
}

/// What a pattern may cost (see [`MAX_HEAVY_PATTERN_WEIGHT`]): 0 for a
/// light pattern; built from the same translation the validator compiles.
/// A pattern that does not translate or compile weighs 0 here: the
/// validator refuses it.
fn pattern_weight(pattern: &str) -> usize {
    use regex_automata::dfa::dense;
    let Ok(translated) = jsonschema_regex::to_rust_regex(pattern) else { return 0 };
    let dfa = dense::Builder::new()
        .configure(dense::Config::new().dfa_size_limit(Some(LIGHT_PATTERN_DFA)).determinize_size_limit(Some(4 * LIGHT_PATTERN_DFA)))
        .thompson(regex_automata::nfa::thompson::Config::new().nfa_size_limit(Some(PATTERN_SIZE_LIMIT)))
        .build(&translated);
    if dfa.is_ok() {
        return 0;
    }
    let Ok(hir) = regex_automata::util::syntax::parse(&translated) else { return 0 };
    let props = hir.properties();
    let scanned = match props.maximum_len() {
        Some(longest) if props.look_set_prefix().contains(regex_syntax::hir::Look::Start) => longest.min(MAX_STRING_BYTES),
        _ => MAX_STRING_BYTES,
    };
    positions(&hir).saturating_mul(scanned.max(1))
}

/// A regex's positions: its characters and classes, each counted once per
/// copy a counted repetition makes (`a{5}` is five, `a*` one).
fn positions(hir: &regex_syntax::hir::Hir) -> usize {
    use regex_syntax::hir::HirKind;
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => 0,
        HirKind::Literal(lit) => String::from_utf8_lossy(&lit.0).chars().count(),
        HirKind::Class(_) => 1,
        HirKind::Repetition(r) => positions(&r.sub).saturating_mul(r.max.unwrap_or(r.min).max(1) as usize),
        HirKind::Capture(c) => positions(&c.sub),
        HirKind::Concat(parts) | HirKind::Alternation(parts) => parts.iter().fold(0, |n, p| n.saturating_add(positions(p))),
    }
}

fn expanded_cost(root: &Value) -> Result<Cost<'_>, String> {
    /// Keywords whose value maps names to schemas (each value is a schema, whatever its name).
    const SCHEMA_MAPS: &[&str] = &["properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"];
    /// Keywords whose schemas apply to many values of one event (each item, each other property, each name).
    const REPEATING: &[&str] = &[
        "items",
        "additionalItems",
        "contains",
        "additionalProperties",
        "patternProperties",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
    ];
    /// Keywords whose value is data, never a schema (only a `$ref` can make a schema of it).
    const DATA: &[&str] = &["const", "enum", "examples", "default", "required", "$comment", "title", "description"];

    struct Walk<'a> {
        root: &'a Value,
        /// The `$ref` targets being expanded (by address: two spellings of one place are one place).
        refs: Vec<*const Value>,
        cost: Cost<'a>,
        /// How many repeating keywords the walk is under.
        repeated: usize,
    }

    impl<'a> Walk<'a> {
        /// A value in a schema position: a schema, or an array of them (`allOf`, `items` of old drafts).
        fn any(&mut self, node: &'a Value, depth: usize) -> Result<(), String> {
            match node {
                Value::Array(items) => items.iter().try_for_each(|v| self.any(v, depth + 1)),
                Value::Object(_) => self.schema(node, depth),
                _ => Ok(()),
            }
        }

        fn schema(&mut self, node: &'a Value, depth: usize) -> Result<(), String> {
            if depth > 128 {
                return Err("nested more than 128 levels".into());
            }
            let Value::Object(obj) = node else { return Ok(()) };
            self.cost.nodes += 1;
            let data = obj.get("enum").and_then(Value::as_array).map_or(0, Vec::len) + usize::from(obj.contains_key("const"));
            if self.repeated > 0 {
                self.cost.work_repeated += 1 + data;
            } else {
                self.cost.work_once += 1 + data;
            }
            if self.cost.nodes > MAX_EXPANDED_NODES {
                return Err(format!("more than {MAX_EXPANDED_NODES} schema nodes once its $refs are followed: a check of it would be slow"));
            }
            for key in ["$dynamicRef", "$recursiveRef"] {
                if obj.contains_key(key) {
                    return Err(format!("{key} is not supported (recursive schemas can make a check exponentially slow)"));
                }
            }
            // A base URI would make a `$ref` resolve somewhere this walk cannot follow.
            for key in ["$id", "id"] {
                if obj.get(key).is_some_and(Value::is_string) {
                    return Err(format!("{key} is not supported in a plan's schemas: every $ref is a JSON pointer into the schema itself"));
                }
            }
            if let Some(Value::String(p)) = obj.get("pattern") {
                self.cost.patterns.push(p);
            }
            if let Some(Value::Object(pp)) = obj.get("patternProperties") {
                self.cost.patterns.extend(pp.keys().map(String::as_str));
            }
            if let Some(r) = obj.get("$ref") {
                let Value::String(r) = r else { return Err("$ref: a string".into()) };
                let Some(pointer) = r.strip_prefix('#').filter(|p| p.is_empty() || p.starts_with('/')) else {
                    return Err(format!("$ref {r:?}: only a JSON pointer into the schema itself (\"#/$defs/name\") is supported"));
                };
                let pointer = percent_decoded(pointer).ok_or_else(|| format!("$ref {r:?}: not a valid URI fragment"))?;
                // A pointer this walk cannot resolve (`#/allOf/00`, `#/a/`) is refused, not skipped:
                // the validator may resolve it where this walk would not look.
                let target = self.root.pointer(&pointer).ok_or_else(|| format!("$ref {r:?} does not point at a part of this schema"))?;
                if self.refs.contains(&(target as *const Value)) {
                    return Err(format!(
                        "$ref {r:?} leads back into itself: recursive schemas are not supported (a check could take exponential time)"
                    ));
                }
                self.refs.push(target);
                self.any(target, depth + 1)?;
                self.refs.pop();
            }
            for (key, v) in obj {
                let repeats = REPEATING.contains(&key.as_str());
                self.repeated += usize::from(repeats);
                let walked = match key.as_str() {
                    "$ref" => Ok(()),
                    k if SCHEMA_MAPS.contains(&k) => match v {
                        Value::Object(map) => map.values().try_for_each(|s| self.any(s, depth + 1)),
                        _ => Ok(()),
                    },
                    k if DATA.contains(&k) => Ok(()),
                    // Every other keyword's value is walked as (possibly) schemas: counting too much is safe.
                    _ => self.any(v, depth + 1),
                };
                self.repeated -= usize::from(repeats);
                walked?;
            }
            Ok(())
        }
    }

    let mut walk = Walk { root, refs: Vec::new(), cost: Cost { nodes: 0, work_once: 0, work_repeated: 0, patterns: Vec::new() }, repeated: 0 };
    walk.any(root, 0)?;
    Ok(walk.cost)
}

/// A URI fragment with its `%XX` escapes decoded (as the validator resolves it).
fn percent_decoded(fragment: &str) -> Option<String> {
    let bytes = fragment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Compile one schema of a plan; `patterns` counts the plan's patterns so
/// far, `heavy` its heavy patterns' NFA states (and the first heavy one).
fn compile_schema(at: &str, schema: &Value, patterns: &mut usize, heavy: &mut (usize, Option<String>)) -> Result<Schema, PlanError> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(PlanError::Schema { at: at.to_owned(), problem: "a schema is a JSON object (or true/false)".into() });
    }
    let cost = expanded_cost(schema).map_err(|problem| PlanError::Schema { at: at.to_owned(), problem })?;
    let work = cost.work_once.saturating_add(cost.work_repeated.saturating_mul(MAX_EVENT_VALUES));
    if work > MAX_CHECK_WORK {
        return Err(PlanError::Schema {
            at: at.to_owned(),
            problem: format!(
                "a check of it could cost {work} units of work, at most {MAX_CHECK_WORK}: each node (and enum value) under items, \
                 additionalProperties or patternProperties counts once per value an event may hold ({MAX_EVENT_VALUES}); \
                 {} such nodes here",
                cost.work_repeated
            ),
        });
    }
    let all_errors = cost.work_repeated <= MAX_REPEATED_NODES_FOR_ALL_ERRORS;
    *patterns += cost.patterns.len();
    if *patterns > MAX_PATTERNS {
        return Err(PlanError::Limit(format!("a plan holds at most {MAX_PATTERNS} patterns")));
    }
    for p in cost.patterns {
        let weight = pattern_weight(p);
        heavy.0 = heavy.0.saturating_add(weight);
        if weight > 0 && heavy.1.is_none() {
            heavy.1 = Some(p.to_owned());
        }
        if heavy.0 > MAX_HEAVY_PATTERN_WEIGHT {
            return Err(PlanError::Limit(format!(
                "the plan's patterns would make a check slow: {} (at {at}) {} — patterns whose automaton is over {} KiB (counted \
                 repetitions of broad classes, such as .{{30}} or \\w{{20}} after a literal, unless anchored with ^ and bounded) \
                 may weigh {MAX_HEAVY_PATTERN_WEIGHT} together (NFA states × bytes scanned); this one brings the plan to {} (use maxLength for lengths)",
                cut(p),
                if heavy.1.as_deref() == Some(p) { "is heavy".to_owned() } else { format!("adds to {}", cut(heavy.1.as_deref().unwrap_or(""))) },
                LIGHT_PATTERN_DFA >> 10,
                heavy.0
            )));
        }
    }
    jsonschema::options()
        .offline()
        .with_pattern_options(PatternOptions::regex().size_limit(PATTERN_SIZE_LIMIT).dfa_size_limit(PATTERN_CACHE_LIMIT))
        .build(schema)
        .map(|validator| Schema { validator, all_errors })
        .map_err(|e| PlanError::Schema { at: at.to_owned(), problem: cut(&e.to_string()) })
}

/// A compiled schema of a plan.
struct Schema {
    validator: Validator,
    /// Whether a check lists every violation (up to [`MAX_VIOLATIONS`]) or
    /// only the first (see [`MAX_REPEATED_NODES_FOR_ALL_ERRORS`]).
    all_errors: bool,
}

impl Schema {
    /// Up to `room` violations of `event`; none (and no allocation) when it is valid.
    fn errors<'a>(&'a self, event: &'a Value, room: usize) -> Vec<jsonschema::ValidationError<'a>> {
        if room == 0 || self.validator.is_valid(event) {
            return Vec::new();
        }
        if self.all_errors {
            self.validator.iter_errors(event).take(room).collect()
        } else {
            self.validator.validate(event).err().into_iter().collect()
        }
    }
}

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_DESCRIPTION {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(MAX_DESCRIPTION).collect();
    out.push('…');
    out
}

/// `/properties/price` → `properties.price`.
fn dotted(pointer: &str) -> String {
    pointer.trim_start_matches('/').split('/').map(|s| s.replace("~1", "/").replace("~0", "~")).collect::<Vec<_>>().join(".")
}

impl TrackingPlan {
    /// Parse and compile a plan document.
    pub fn from_json(doc: &Value) -> Result<TrackingPlan, PlanError> {
        let doc: PlanDoc = serde_json::from_value(doc.clone()).map_err(|e| PlanError::Shape(e.to_string()))?;
        TrackingPlan::compile(doc)
    }

    pub fn compile(doc: PlanDoc) -> Result<TrackingPlan, PlanError> {
        let others = [&doc.common, &doc.identify, &doc.group, &doc.page, &doc.screen].iter().filter(|s| s.is_some()).count();
        if doc.track.len() + others > MAX_SCHEMAS {
            return Err(PlanError::Limit(format!("a plan holds at most {MAX_SCHEMAS} schemas")));
        }
        if let Some(name) = doc.track.keys().find(|n| n.is_empty() || n.chars().count() > MAX_EVENT_NAME) {
            return Err(PlanError::Limit(format!("event name {name:?}: 1 to {MAX_EVENT_NAME} characters")));
        }
        if doc.forward_blocked_to.as_deref().is_some_and(str::is_empty) {
            return Err(PlanError::Shape("forward_blocked_to: a destination id, or leave it out".into()));
        }
        let (mut patterns, mut heavy) = (0, (0, None));
        let mut one = |at: &str, s: &Option<Value>| s.as_ref().map(|s| compile_schema(at, s, &mut patterns, &mut heavy)).transpose();
        let (common, identify, group, page, screen) = (
            one("common", &doc.common)?,
            one("identify", &doc.identify)?,
            one("group", &doc.group)?,
            one("page", &doc.page)?,
            one("screen", &doc.screen)?,
        );
        let mut track = BTreeMap::new();
        for (name, schema) in &doc.track {
            track.insert(name.clone(), compile_schema(&format!("track {name:?}"), schema, &mut patterns, &mut heavy)?);
        }
        Ok(TrackingPlan { common, identify, group, page, screen, track, doc })
    }

    /// Check one event against the plan.
    pub fn check(&self, event: &Value) -> Verdict {
        let call = event.get("type").and_then(Value::as_str).unwrap_or("");
        let mut violations = Vec::new();
        let mut label = call.to_owned();
        let specific = match call {
            "track" => {
                let name = event.get("event").and_then(Value::as_str).unwrap_or("");
                match self.track.get_key_value(name) {
                    Some((planned, v)) => {
                        label = planned.clone();
                        Some(v)
                    }
                    None => {
                        label = "(unplanned)".into();
                        violations.push(Violation {
                            kind: ViolationKind::UnplannedEvent,
                            violation_type: "Unplanned Event".into(),
                            field: "event".into(),
                            description: cut(&format!("{name:?} is not in the tracking plan")),
                        });
                        None
                    }
                }
            }
            "identify" => self.identify.as_ref(),
            "group" => self.group.as_ref(),
            "page" => self.page.as_ref(),
            "screen" => self.screen.as_ref(),
            _ => None,
        };
        if !matches!(call, "track" | "identify" | "group" | "page" | "screen" | "alias") {
            label = "(other)".into();
        }
        for v in [specific, self.common.as_ref()].into_iter().flatten() {
            let room = MAX_VIOLATIONS.saturating_sub(violations.len());
            for e in v.errors(event, room) {
                let at = dotted(e.instance_path().as_str());
                let (violation_type, field, description) = match e.kind() {
                    ValidationErrorKind::Required { property } => {
                        let property = property.as_str().map_or_else(|| property.to_string(), str::to_owned);
                        let field = if at.is_empty() { property } else { format!("{at}.{property}") };
                        ("Required", field.clone(), format!("{field} is required"))
                    }
                    ValidationErrorKind::Type { .. } => ("Invalid Type", at, e.to_string()),
                    _ => ("Invalid Value", at, e.to_string()),
                };
                violations.push(Violation {
                    kind: ViolationKind::Invalid,
                    violation_type: violation_type.into(),
                    field: cut(&field),
                    description: cut(&description),
                });
            }
        }
        let action = |k: ViolationKind| match k {
            ViolationKind::UnplannedEvent => self.doc.unplanned,
            ViolationKind::Invalid => self.doc.invalid,
        };
        let strongest = violations.iter().map(|v| action(v.kind)).max_by_key(|a| match a {
            Action::Allow => 0,
            Action::Flag => 1,
            Action::Block => 2,
        });
        let outcome = match strongest {
            None | Some(Action::Allow) => Outcome::Allowed,
            Some(Action::Flag) => Outcome::Flagged,
            Some(Action::Block) => Outcome::Blocked,
        };
        Verdict { violations, outcome, label }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn order_plan(unplanned: &str, invalid: &str) -> TrackingPlan {
        TrackingPlan::from_json(&json!({
            "name": "shop",
            "unplanned": unplanned,
            "invalid": invalid,
            "track": {
                "Order Completed": {
                    "$schema": "http://json-schema.org/draft-07/schema#",
                    "type": "object",
                    "properties": {"properties": {
                        "type": "object",
                        "required": ["order_id", "total"],
                        "properties": {"order_id": {"type": "string"}, "total": {"type": "number"}, "currency": {"enum": ["EUR", "USD"]}}
                    }}
                }
            },
            "identify": {"properties": {"traits": {"required": ["email"]}}},
            "common": {"properties": {"context": {"properties": {"app": {"type": "object"}}}}}
        }))
        .unwrap()
    }

    fn track(name: &str, props: Value) -> Value {
        json!({"type": "track", "event": name, "messageId": "m1", "userId": "u", "properties": props})
    }

    #[test]
    fn a_valid_planned_event_has_no_violation_and_is_allowed() {
        let v = order_plan("block", "block").check(&track("Order Completed", json!({"order_id": "o1", "total": 9.5, "currency": "EUR"})));
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!(v.outcome, Outcome::Allowed);
        assert_eq!(v.label, "Order Completed");
    }

    #[test]
    fn invalid_properties_are_named_as_segment_names_them() {
        let v = order_plan("allow", "flag").check(&track("Order Completed", json!({"order_id": 7, "currency": "GBP"})));
        let seen: Vec<(&str, &str)> = v.violations.iter().map(|v| (v.violation_type.as_str(), v.field.as_str())).collect();
        assert!(seen.contains(&("Required", "properties.total")), "{seen:?}");
        assert!(seen.contains(&("Invalid Type", "properties.order_id")), "{seen:?}");
        assert!(seen.contains(&("Invalid Value", "properties.currency")), "{seen:?}");
        assert_eq!(v.outcome, Outcome::Flagged);
        assert!(v.violations.iter().all(|v| v.kind == ViolationKind::Invalid));
    }

    #[test]
    fn every_action_on_every_kind() {
        let unplanned = track("Page Scrolled", json!({}));
        let invalid = track("Order Completed", json!({"order_id": "o1"}));
        for (action, expected) in [("allow", Outcome::Allowed), ("flag", Outcome::Flagged), ("block", Outcome::Blocked)] {
            let plan = order_plan(action, "allow");
            let v = plan.check(&unplanned);
            assert_eq!(v.outcome, expected, "unplanned with {action}");
            assert_eq!(v.violations[0].violation_type, "Unplanned Event");
            assert_eq!(v.label, "(unplanned)", "an unplanned name is not a metric label");
            assert_eq!(plan.check(&invalid).outcome, Outcome::Allowed, "invalid is allowed in this plan");

            let plan = order_plan("allow", action);
            assert_eq!(plan.check(&invalid).outcome, expected, "invalid with {action}");
            assert_eq!(plan.check(&unplanned).outcome, Outcome::Allowed, "unplanned is allowed in this plan");
        }
        // Both kinds at once: the stronger action wins.
        let plan = order_plan("flag", "block");
        let both = json!({"type": "track", "event": "Nope", "context": {"app": "not an object"}});
        let v = plan.check(&both);
        assert_eq!(v.violations.len(), 2, "{:?}", v.violations);
        assert_eq!(v.outcome, Outcome::Blocked);
    }

    #[test]
    fn identify_traits_and_the_common_schema_are_checked() {
        let plan = order_plan("allow", "flag");
        let v = plan.check(&json!({"type": "identify", "userId": "u", "traits": {"name": "x"}}));
        assert_eq!(v.violations.len(), 1);
        assert_eq!((v.violations[0].violation_type.as_str(), v.violations[0].field.as_str()), ("Required", "traits.email"));
        assert_eq!(v.label, "identify");
        // No schema for page: only the common one applies.
        assert!(plan.check(&json!({"type": "page", "name": "Home"})).violations.is_empty());
        let v = plan.check(&json!({"type": "page", "name": "Home", "context": {"app": 1}}));
        assert_eq!(v.violations[0].field, "context.app");
    }

    #[test]
    fn flagging_adds_context_violations() {
        let plan = order_plan("flag", "flag");
        let mut event = track("Order Completed", json!({"order_id": "o1"}));
        let v = plan.check(&event);
        v.flag(&mut event);
        assert_eq!(
            event["context"]["violations"],
            json!([{"type": "Required", "field": "properties.total", "description": "properties.total is required"}])
        );
        // An existing context keeps its fields.
        let mut event = json!({"type": "track", "event": "X", "context": {"ip": "1.2.3.4"}});
        plan.check(&event).flag(&mut event);
        assert_eq!(event["context"]["ip"], "1.2.3.4");
        assert_eq!(event["context"]["violations"][0]["type"], "Unplanned Event");
    }

    #[test]
    fn violations_and_descriptions_are_bounded() {
        let mut props = Map::new();
        let mut required = Vec::new();
        for i in 0..100 {
            required.push(json!(format!("p{i}")));
            props.insert(format!("q{i}"), json!("x".repeat(10_000)));
        }
        let plan = TrackingPlan::from_json(&json!({
            "track": {"Big": {"properties": {"properties": {"required": required, "additionalProperties": {"type": "number"}}}}}
        }))
        .unwrap();
        let v = plan.check(&track("Big", Value::Object(props)));
        assert_eq!(v.violations.len(), MAX_VIOLATIONS);
        assert!(v.violations.iter().all(|v| v.description.chars().count() <= MAX_DESCRIPTION + 1));
    }

    #[test]
    fn plans_that_reach_outside_or_backtrack_are_refused() {
        let remote = json!({"track": {"A": {"$ref": "https://example.com/schema.json"}}});
        assert!(matches!(TrackingPlan::from_json(&remote), Err(PlanError::Schema { .. })));
        let file = json!({"track": {"A": {"$ref": "file:///etc/passwd"}}});
        assert!(matches!(TrackingPlan::from_json(&file), Err(PlanError::Schema { .. })));
        // Look-around and back-references need a backtracking engine: refused, so no pattern can.
        let backref = json!({"track": {"A": {"properties": {"properties": {"properties": {"x": {"pattern": "(a)\\1"}}}}}}});
        assert!(matches!(TrackingPlan::from_json(&backref), Err(PlanError::Schema { .. })));
        let unknown_key = json!({"track": {}, "blocking": "yes"});
        assert!(matches!(TrackingPlan::from_json(&unknown_key), Err(PlanError::Shape(_))));
        let not_a_schema = json!({"track": {"A": "string"}});
        assert!(matches!(TrackingPlan::from_json(&not_a_schema), Err(PlanError::Schema { .. })));
        // A local $ref is fine.
        let local = json!({"track": {"A": {"$defs": {"id": {"type": "string"}}, "properties": {"userId": {"$ref": "#/$defs/id"}}}}});
        let plan = TrackingPlan::from_json(&local).unwrap();
        assert_eq!(plan.check(&json!({"type": "track", "event": "A", "userId": 5})).violations.len(), 1);
    }

    #[test]
    fn schemas_whose_checks_could_explode_are_refused() {
        // A $ref that comes back into itself under allOf: exponential in the event's depth (red team).
        let recursive = json!({"track": {"A": {"$defs": {"n": {"allOf": [{"items": {"$ref": "#/$defs/n"}}, {"items": {"$ref": "#/$defs/n"}}]}},
            "properties": {"properties": {"properties": {"x": {"$ref": "#/$defs/n"}}}}}}});
        let e = TrackingPlan::from_json(&recursive).unwrap_err().to_string();
        assert!(e.contains("leads back into itself"), "{e}");
        // A chain of $defs each doubling: 2^30 nodes from a small plan.
        let mut defs = Map::new();
        for k in 0..30 {
            defs.insert(format!("d{k}"), json!({"allOf": [{"$ref": format!("#/$defs/d{}", k + 1)}, {"$ref": format!("#/$defs/d{}", k + 1)}]}));
        }
        defs.insert("d30".into(), json!({"type": "object"}));
        let chain = json!({"track": {"A": {"$defs": defs, "$ref": "#/$defs/d0"}}});
        let e = TrackingPlan::from_json(&chain).unwrap_err().to_string();
        assert!(e.contains("schema nodes"), "{e}");
        for (schema, why) in [
            (json!({"$dynamicRef": "#x"}), "$dynamicRef"),
            (json!({"$recursiveRef": "#"}), "$recursiveRef"),
            (json!({"$ref": "#anchor", "$defs": {"a": {"$anchor": "anchor"}}}), "JSON pointer"),
            // The same recursion spelled with a percent-escaped pointer, or through the schema's own $id.
            (json!({"$defs": {"n": {"allOf": [{"items": {"$ref": "#/%24defs/n"}}]}}, "$ref": "#/%24defs/n"}), "leads back into itself"),
            (json!({"$id": "https://x.example/s", "$defs": {"n": {"items": {"$ref": "https://x.example/s#/$defs/n"}}}}), "$id"),
            (json!({"$defs": {"n": {"items": {"$ref": "s.json#/$defs/n"}}}}), "JSON pointer"),
            (json!({"id": "http://x.example/s", "properties": {"id": {"type": "string"}}}), "id"),
            // Second red team: non-canonical array indexes the validator resolves and serde does not,
            // targets hidden under data keywords, and schemas under properties named like data keywords.
            (
                json!({"$ref": "#/examples/00", "examples": [{"allOf": [{"$ref": "#/examples/01"}, {"$ref": "#/examples/01"}]}, {"required": ["z"]}]}),
                "does not point",
            ),
            (json!({"allOf": [{"properties": {"a": {"allOf": [{"$ref": "#/allOf/+0"}]}}}]}), "does not point"),
            (json!({"allOf": [{"properties": {"a": {"allOf": [{"$ref": "#/allOf/0"}, {"$ref": "#/allOf/0"}]}}}]}), "leads back into itself"),
            (
                json!({"properties": {"default": {"$defs": {"d": {"allOf": [{"$ref": "#/properties/default"}]}}, "$ref": "#/properties/default/$defs/d"}}}),
                "leads back into itself",
            ),
        ] {
            let e = TrackingPlan::from_json(&json!({"track": {"A": schema}})).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
        // Too many patterns in one plan.
        let many: Map<String, Value> = (0..=MAX_PATTERNS).map(|i| (format!("p{i}"), json!({"pattern": "^a"}))).collect();
        let e = TrackingPlan::from_json(&json!({"track": {"A": {"properties": many}}})).unwrap_err().to_string();
        assert!(e.contains("patterns"), "{e}");
        let hidden = json!({"track": {"A": {"properties": {"default": {"properties": many.clone()}}}}});
        let e = TrackingPlan::from_json(&hidden).unwrap_err().to_string();
        assert!(e.contains("patterns"), "a schema under a property named default is walked too: {e}");
        // Shared, non-recursive $defs are fine.
        let shared = json!({"track": {"A": {"$defs": {"id": {"type": "string"}}, "properties": {"userId": {"$ref": "#/$defs/id"}, "anonymousId": {"$ref": "#/$defs/id"}}}}});
        assert!(TrackingPlan::from_json(&shared).is_ok());
    }

    #[test]
    fn a_flag_cannot_be_dodged_or_faked_by_the_client() {
        let plan = order_plan("flag", "flag");
        for context in [json!("str"), json!(null), json!(5)] {
            let mut event = json!({"type": "track", "event": "Nope", "context": context.clone()});
            plan.check(&event).flag(&mut event);
            assert_eq!(event["context"]["violations"][0]["type"], "Unplanned Event", "context {context}");
            if !context.is_null() {
                assert_eq!(event["context"]["value"], context);
            }
        }
        let mut event = json!({"type": "track", "event": "Order Completed", "context": {"violations": ["fake"], "ip": "1"}});
        assert!(Verdict::strip_client_violations(&mut event));
        assert_eq!(event["context"], json!({"ip": "1"}));
        assert!(!Verdict::strip_client_violations(&mut event));
    }

    #[test]
    fn a_pathological_pattern_runs_in_linear_time() {
        // `(a+)+$` against "aaaa…!" takes exponential time with a backtracking engine.
        let plan =
            TrackingPlan::from_json(&json!({"track": {"A": {"properties": {"properties": {"properties": {"x": {"pattern": "^(a+)+$"}}}}}}})).unwrap();
        let v = plan.check(&track("A", json!({"x": format!("{}!", "a".repeat(50_000))})));
        assert_eq!(v.violations.len(), 1);
        assert_eq!(v.violations[0].field, "properties.x");
    }

    #[test]
    fn the_work_of_a_check_is_bounded_and_big_repeated_schemas_report_one_violation() {
        // The second red team's: 4000 branches applied to every item of an array.
        let branches: Vec<Value> = (0..4000).map(|i| json!({"const": format!("zz{i}")})).collect();
        let e =
            TrackingPlan::from_json(&json!({"track": {"A": {"properties": {"properties": {"properties": {"a": {"items": {"anyOf": branches}}}}}}}}))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        assert!(e.contains("units of work"), "{e}");
        // So is a long enum under additionalProperties; the same enum on one property is fine.
        let values: Vec<Value> = (0..500).map(|i| json!(format!("v{i}"))).collect();
        assert!(TrackingPlan::from_json(&json!({"track": {"A": {"additionalProperties": {"enum": values.clone()}}}})).is_err());
        assert!(TrackingPlan::from_json(&json!({"track": {"A": {"properties": {"plan": {"enum": values}}}}})).is_ok());
        // An array of products (Segment's e-commerce spec) fits; a small repeated schema lists every violation, a larger one the first.
        let product = json!({"type": "object", "required": ["product_id"], "properties": {
            "product_id": {"type": "string"}, "sku": {"type": "string"}, "name": {"type": "string"}, "price": {"type": "number"},
            "quantity": {"type": "integer"}, "category": {"type": "string"}, "url": {"type": "string"}}});
        let plan = TrackingPlan::from_json(&json!({"invalid": "flag", "track": {"Order Completed": {"properties": {"properties": {"properties": {
            "products": {"items": product}, "tags": {"items": {"type": "string"}}}}}}}}))
        .unwrap();
        let event = json!({"type": "track", "event": "Order Completed", "properties": {"products": [{}, {}, {}], "tags": [1, 2, 3]}});
        let v = plan.check(&event);
        assert_eq!(v.violations.len(), 1, "the products schema is large: its first violation only: {:?}", v.violations);
        let tags = TrackingPlan::from_json(&json!({"invalid": "flag", "track": {"Order Completed": {"properties": {"properties": {"properties": {
            "tags": {"items": {"type": "string"}}}}}}}}))
        .unwrap();
        assert_eq!(tags.check(&event).violations.len(), 3, "a small repeated schema lists each item's violation");
    }

    /// A plan of `n` copies of `pattern` (each on its own property).
    fn patterned(pattern: &str, n: usize) -> Result<TrackingPlan, PlanError> {
        let props: Map<String, Value> = (0..n).map(|i| (format!("p{i}"), json!({"pattern": pattern}))).collect();
        TrackingPlan::from_json(&json!({"track": {"A": {"properties": {"properties": {"properties": props}}}}}))
    }

    #[test]
    fn heavy_patterns_are_weighed_and_light_ones_are_not() {
        // The third red team's plan: 200 patterns whose DFA explodes (a\w{20}: 2^20 states).
        let Err(e) = patterned("\\w*a\\w{20}\\W{1,50}", 200) else { panic!("200 heavy patterns are refused") };
        let e = e.to_string();
        assert!(e.contains("would make a check slow") && e.contains("maxLength"), "{e}");
        // Ten lighter copies fit the weight, eleven do not.
        assert!(patterned("\\w*a\\w{20}\\W", 10).is_ok());
        assert!(patterned("\\w*a\\w{20}\\W", 11).is_err());
        // The second red team's: a DFA that fits the dense limit four times over but not the lazy cache is heavy.
        assert!(patterned("a[ab]{10}c", 20).is_ok());
        assert!(patterned("a[ab]{10}c", 21).is_err());
        // Anchored and bounded: weighed by its longest match, not the longest string.
        assert!(patterned("^.{1,255}$", 5).is_ok());
        // Light patterns (small DFAs) cost nothing against the weight, up to the count limit.
        assert!(patterned("^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}$", MAX_PATTERNS).is_ok());
        assert!(patterned("^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", MAX_PATTERNS).is_ok());
        assert!(patterned("a[ab]{8}c", MAX_PATTERNS).is_ok());
        // A heavy pattern weighs once per place it applies, $refs followed (and once where it is defined).
        let refs = |n: usize| {
            let all: Vec<Value> = (0..n).map(|_| json!({"$ref": "#/$defs/s"})).collect();
            TrackingPlan::from_json(&json!({"track": {"A": {"$defs": {"s": {"pattern": "a.{30}b"}}, "allOf": all}}}))
        };
        assert!(refs(6).is_ok());
        assert!(refs(7).is_err(), "eight places of 32 positions × 32 KiB each are over the weight");
    }
}

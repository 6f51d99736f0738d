//! `sluice-transform`: the transformation stage's parts: tracking plans
//! (Segment Protocols), checked by the route on every event before it
//! makes jobs (see ARCHITECTURE.md, "Transformation"), and functions
//! (`function`: JavaScript handlers in a sandboxed QuickJS, run on the
//! process's function threads, `pool`: by the route for source functions,
//! by the directors for destination functions; docs/FUNCTIONS.md).
//!
//! A tracking plan belongs to one source. For each kind of call it may
//! hold a JSON Schema (draft 7 or 2020-12, named by `$schema`; 2020-12
//! without one): one per `track` event name, one each for `identify`,
//! `group`, `page` and `screen`, and a `common` one every event must meet.
//! Each schema describes the **whole event**, as Segment's export does:
//! a track event's properties are under `properties.properties`, an
//! identify call's traits under `properties.traits`.
//!
//! Invariants:
//! - Checking is deterministic: the same event and plan give the same
//!   violations, in the same order (the route's crash replay decides the
//!   same, and job inserts are idempotent on (messageId, destination)).
//! - No schema reaches outside the plan: external `$ref`s are refused when
//!   the plan is compiled (no network, no files), and `pattern` uses the
//!   `regex` crate (linear time: no pattern of the plan and no value of an
//!   event can make a check backtrack).
//! - A check costs at most [`MAX_VIOLATIONS`] violations and descriptions
//!   of at most [`MAX_DESCRIPTION`] characters, whatever the event holds.
//! - Metric labels stay bounded: an event is labelled with its planned name
//!   or its call type, never with a name only the client chose
//!   ([`Verdict::label`]).

pub mod fetch;
pub mod function;
mod plan;
pub mod pool;
mod segment;

pub use plan::{
    Action, Outcome, PlanDoc, PlanError, TrackingPlan, Verdict, Violation, ViolationKind, MAX_DESCRIPTION, MAX_EXPANDED_NODES, MAX_PATTERNS,
    MAX_SCHEMAS, MAX_VIOLATIONS,
};
pub use segment::{import_segment, ImportReport};

//! Sluice's cells (issue 14; DESIGN.md §5): a cell is one whole Sluice, and
//! each workspace (a customer: its sources, destinations and connections)
//! lives in exactly one cell. This crate is what the cells' shared parts
//! agree on:
//!
//! - [`store`]: the global store — workspaces, write keys (hashed),
//!   cells, which cell serves each workspace (placement by a conditional
//!   insert, so racing routers agree), overrides, the mapping version
//!   routers' caches follow, and metering (idempotent usage reports,
//!   hourly rows). SQLite for one machine; MySQL/MariaDB or PostgreSQL
//!   when several routers and the control plane share it.
//! - [`placement`]: which cell a new workspace goes to, and why (or why
//!   none can take it): a pure function of the workspace and the cells.
//!
//! Invariants:
//! - A workspace is served by one cell at a time: its override if it has
//!   one, else its assignment. An assignment is written once, by the first
//!   placement that inserts it; later placements read it. Nothing here
//!   re-routes a workspace whose cell is down (that would break
//!   deduplication, which is per cell).
//! - Every change to what a router resolves (assignments, overrides, write
//!   keys, cells, workspaces) bumps `mapping_version` in the same
//!   transaction, so a router that sees the version unchanged may keep its
//!   cache.
//! - A write key is stored as its SHA-256 only; lookups hash the key given.

pub mod feed;
pub mod migration;
pub mod placement;
pub mod pool;
mod schema;
pub mod store;

pub use feed::{CellFeed, FeedConnection, FeedDestination, WorkspaceConfig};
pub use migration::{Migration, Phase, RouteSplit};
pub use placement::{Cell, CellState, Placement, Tier, Workspace};
pub use pool::{PoolError, StorePool};
pub use store::{GlobalStore, KeyRoute, ReportOutcome, UsageRow};

/// What the global store fails with.
#[derive(Debug, thiserror::Error)]
pub enum CellsError {
    #[error(transparent)]
    Sql(#[from] sluice_sql::Error),
    #[error("no such workspace {0:?}")]
    NoWorkspace(String),
    #[error("no such cell {0:?}")]
    NoCell(String),
    /// No cell can take the workspace; the reason names each cell's refusal.
    #[error("workspace {workspace:?} cannot be placed: {reason}")]
    Unplaceable { workspace: String, reason: String },
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
}

//! The director cluster: separate `sluice route` and `sluice director`
//! processes sharing one SQL database (`deliver.jobdb_url`). Routes hand
//! jobs to directors over an RPC — JSON over HTTP/2 (prior knowledge;
//! cleartext, or TLS when `director.tls_*` is set) — and directors find
//! each other, and adopt each other's JobDBs, through a directory of
//! heartbeats in that database.
//!
//! # Invariants
//!
//! - **A job is committed before the route moves on.** `POST /rpc/v1/jobs`
//!   with an [`InsertRequest`] answers `200` with an [`InsertReply`] only
//!   once the director has committed the jobs to a JobDB
//!   (`Centrifuge::insert`), so the route commits its `output` offset after
//!   every director it sent jobs to has answered. Any failure (unreachable,
//!   refused, unknown destination) fails the route's batch, which is retried
//!   from the uncommitted offset: no job is lost.
//! - **Which director.** The live ones (heartbeat in the SQL directory,
//!   [`directory`]) sorted by name; a job goes to `murmur2(messageId) mod n`.
//!   While the set is unchanged a replayed batch reaches the same directors,
//!   whose JobDBs drop the repeats (unique on messageId, destination,
//!   generation). If the set changes inside a route crash window, a replayed
//!   job may reach another director and be delivered twice: counted as a
//!   director-crash-window duplicate.
//! - **Liveness.** A director is live while its heartbeat is younger than
//!   the caller's `max_age` ([`LIVE_AFTER`] for routes and adopters); a
//!   stopped director marks its row stale at once (no address), a crashed one
//!   ages out. Either way its JobDBs can then be adopted. A director
//!   announced without an address is starting (or waiting for its JobDBs to
//!   be handed back): routes skip it.
//! - **One order everywhere.** The directory's list is ordered by name, so
//!   every route process maps a messageId to the same director while the set
//!   of live directors is the same.
//! - **Only routes hand a director jobs.** Every request is signed with
//!   `director.rpc_secret` (see *Authentication*); a director delivers to the
//!   URL *it* has for a destination, never to one a request names.
//! - **One holder per JobDB scope.** Each director's JobDBs are its own
//!   scope of `deliver.jobdb_url` (its `director.name`), held through the
//!   director locks by one process at a time: its owner, or — once the owner
//!   is no longer live and its locks are free — one adopter, which hands the
//!   scope back when the owner announces itself again (see *Scopes, adoption
//!   and hand-back*).
//! - **Async never blocks.** The directory has one session per process
//!   (`sql::SharedConnection`, as the control tables have), used from
//!   `spawn_blocking`: async callers never block a
//!   runtime thread, and a lost connection is opened again at the next call.
//!   Hashing and parsing request bodies (up to 32 MB) happen off the async
//!   threads on both sides.
//!
//! # Authentication
//!
//! A director delivers whatever it is handed, signed with the destination's
//! secret, so only routes may hand it jobs. Every request carries
//! `X-Sluice-Rpc-Signature: t=<unix seconds>,v1=<hex>`, where `v1` is
//! HMAC-SHA256 over `"<t>." + body` keyed with `director.rpc_secret` (behind
//! a fixed domain prefix, so the key differs from any destination secret
//! that happens to equal it). The director refuses with `401`:
//! - a missing or malformed header, and a `t` more than [`MAX_CLOCK_SKEW`]
//!   away from its clock — both before it reads the body;
//! - a `v1` that does not match, compared in constant time.
//!
//! Why an HMAC and not `Authorization: Bearer <secret>`: the secret never
//! travels (the RPC is cleartext until TLS, issue 12), a captured request
//! cannot be altered (the body is signed), and it can only be replayed
//! within the skew window — where a replay is harmless, because inserts are
//! idempotent on (messageId, destination, generation). The cost is one
//! HMAC of the body on each side, done off the async threads.
//!
//! # Limits
//!
//! A body is at most [`MAX_REQUEST_BYTES`]: a larger declared length gets
//! `413` before the body is read, a larger streamed one `413` once the
//! limit is crossed (never buffered whole). The route splits its jobs into
//! requests under the limit ([`encode_requests`]).
//!
//! # Unknown destinations
//!
//! A job for a destination the director's control database does not have is
//! refused — the whole request, with nothing inserted — so no JobDB row,
//! gate or metric series exists for ids nobody configured. Before refusing,
//! the director re-reads its control database (at most once per
//! [`UNKNOWN_REFRESH_EVERY`]): a route that saw a new destination before
//! the director's periodic refresh gets it accepted. Otherwise the answer is
//! `409 {"code":"unknown_destination"}`; like every error it fails the
//! route's batch, which is retried from the uncommitted offset, so no job is
//! lost (a deleted destination drops out of the route's plan within a
//! catalog refresh).
//!
//! # The directory
//!
//! The directory of live directors, in the shared SQL database
//! (`deliver.jobdb_url`, table `sluice_directors`): each `sluice director`
//! process registers its RPC address and refreshes a heartbeat every 2 s;
//! `sluice route` processes read the live ones and hand each job to one of
//! them.
//!
//! # Scopes, adoption and hand-back
//!
//! - At startup a director refuses to run if a live director of the same
//!   name has an address (`director.name` must be unique); it then announces
//!   itself without an address and opens its scope, waiting (up to 5
//!   minutes) while another director still holds it ([`open_own_jobdbs`]).
//! - Every 2 s each director looks at the directory
//!   ([`adopt_dead_directors`]): a director whose heartbeat is older than
//!   [`LIVE_AFTER`] and whose JobDB locks can be taken (its database
//!   sessions are gone) has its scope opened here; its unfinished jobs are
//!   reloaded and sent (jobs that were `executing` at its death are sent
//!   again: the crash window). When the owner announces itself again, the
//!   scope is closed, which releases the locks, and the owner opens it.
//! - A director that loses its own locks (another director adopted its
//!   JobDBs while it could not reach the database) closes them, announces
//!   itself without an address, opens them again once they are handed back,
//!   and serves again ([`server::serve`]).
//! - A stopping director closes its JobDBs and stays in the directory
//!   without an address ([`DirectorNode::stop`]): routes stop sending at
//!   once, and once the heartbeat is stale another director adopts the
//!   unfinished jobs.
//!
//! # Layout
//!
//! [`wire`]: wire types, signing, limits, request encoding. [`client`]: the
//! route's [`DirectorClient`]. [`server`]: the director's [`RpcServer`] and
//! its HTTP server. [`directory`]: the `sluice_directors` table.
//! [`adoption`]: scopes, adoption, hand-back. [`DirectorNode`] puts the
//! director's side together for `sluice director`.

pub mod adoption;
pub mod client;
pub mod directory;
pub mod server;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use sluice_core::{Config, Shutdown};
use tokio::task::JoinHandle;

pub use adoption::{adopt_dead_directors, open_own_jobdbs};
pub use client::{client_tls, ClientTls, DirectorClient};
pub use directory::{jobdb_url, DirectorEntry, Directory};
pub use server::{Rejection, RpcServer, MAX_UNVERIFIED_BYTES};
pub use wire::{
    encode_requests, rpc_secret, ErrorReply, InsertReply, InsertRequest, RpcSecret, WireJob, INSERT_PATH, LIVE_AFTER, MAX_CLOCK_SKEW,
    MAX_IDS_REPORTED, MAX_REQUEST_BYTES, SIGNATURE_HEADER, UNKNOWN_REFRESH_EVERY,
};

use crate::{Catalog, DeliverError, DeliverMetrics};

/// A separate director's part of the cluster (`sluice director`): its own
/// JobDBs behind the RPC server, its heartbeat, and the adoption of dead
/// directors' JobDBs.
pub struct DirectorNode {
    /// The RPC server, which holds this director's current JobDBs.
    rpc: Arc<RpcServer>,
    directory: Directory,
    name: String,
}

impl DirectorNode {
    /// Open this director's JobDBs ([`open_own_jobdbs`], waiting up to 5
    /// minutes for a hand-back), serve the RPC and the heartbeat
    /// ([`server::serve`]), and adopt dead directors
    /// ([`adopt_dead_directors`]). The returned tasks end on `stop`.
    pub async fn start(
        config: &Config,
        catalog: Arc<Catalog>,
        metrics: DeliverMetrics,
        directory: Directory,
        secret: RpcSecret,
        stop: Shutdown,
    ) -> Result<(DirectorNode, Vec<JoinHandle<()>>), DeliverError> {
        let name = config.director.name.clone();
        let centrifuge = open_own_jobdbs(config, &catalog, &metrics, &directory, Some(Duration::from_secs(300))).await?;
        let rpc = RpcServer::new(centrifuge, secret);
        let served = server::serve(config, rpc.clone(), catalog.clone(), metrics.clone(), directory.clone(), stop.clone()).await?;
        let adopting = tokio::spawn(adopt_dead_directors(config.clone(), catalog, metrics, directory.clone(), stop));
        Ok((DirectorNode { rpc, directory, name }, vec![served, adopting]))
    }

    /// After the tasks of [`DirectorNode::start`] ended: close this
    /// director's JobDBs, and stay in the directory without an address:
    /// routes stop sending at once, and once the heartbeat is stale another
    /// director adopts the unfinished jobs (a director that is not coming
    /// back leaves none behind).
    pub async fn stop(&self) {
        self.rpc.centrifuge().close().await;
        if let Err(e) = self.directory.heartbeat_stopped(&self.name).await {
            tracing::warn!(error = %e, "could not mark this director stopped in the directory");
        }
    }
}

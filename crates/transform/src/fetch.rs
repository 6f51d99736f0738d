//! `fetch` for functions: the one way out of the sandbox. The engine only
//! defines `fetch` when its process gives it a [`Fetch`] (the pipeline's is
//! `sluice_deliver::function::GuardedFetch`, through the delivery SSRF
//! guard); `sluice function test` has none.
//!
//! Invariants:
//! - At most [`MAX_FETCHES_PER_CALL`] requests per call, each with a body of
//!   at most [`MAX_FETCH_BODY`] bytes each way, all of them together
//!   waiting at most [`FETCH_TIMEOUT`] (each request's timeout is what is
//!   left of it); the wait does not count against the call's CPU budget
//!   (the deadline moves by the wait), but it holds the function thread,
//!   so a call lasts at most its CPU budget plus [`FETCH_TIMEOUT`].
//! - Nothing about the request is trusted: the URL, method and headers are
//!   checked by the implementation (schemes http/https only, no redirects).

use std::time::Duration;

/// Requests one call may make.
pub const MAX_FETCHES_PER_CALL: u32 = 5;
/// Largest request or response body (bytes; a longer response is an error).
pub const MAX_FETCH_BODY: usize = 1 << 20;
/// How long one call's requests may wait, together.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One request a function makes.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub url: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<String>,
    /// What is left of the call's [`FETCH_TIMEOUT`].
    pub timeout: Duration,
}

/// Its answer.
#[derive(Debug, Clone)]
pub struct FetchResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Why a request got no answer.
#[derive(Debug, Clone)]
pub enum FetchFailure {
    /// Refused before it was sent (the SSRF guard, a bad URL or method, a limit): not retried.
    Refused(String),
    /// Sent, but no answer (timeout, connection error): the function's event is retried.
    Unanswered(String),
}

/// Makes a function's requests; blocking (it runs on a function thread).
pub trait Fetch: Send + Sync {
    fn fetch(&self, request: FetchRequest) -> Result<FetchResponse, FetchFailure>;
}

/// The `fetch` of a function being checked before a deploy: defined (so
/// the code sees the globals it will run with) but refusing every request.
pub struct NoNetwork;

impl Fetch for NoNetwork {
    fn fetch(&self, _: FetchRequest) -> Result<FetchResponse, FetchFailure> {
        Err(FetchFailure::Refused("no requests while a deploy is checked".into()))
    }
}

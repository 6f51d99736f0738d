//! CORS for the Tracking API, so web pages on any origin can send (this is
//! how analytics.js reaches Segment's API from a browser).
//!
//! - `OPTIONS` on `/v1/...` (a preflight) answers `204` with
//!   `Access-Control-Allow-Methods: POST, OPTIONS`, the requested headers
//!   echoed in `Access-Control-Allow-Headers` (analytics.js asks for
//!   `authorization` and `content-type`, sometimes `x-retry-count`), and
//!   `Access-Control-Max-Age`. It never reaches the routes or auth.
//! - Every answer to a request carrying `Origin` (success or error: 400,
//!   401, 404, 429, 503) echoes that origin in `Access-Control-Allow-Origin`
//!   with `Vary: Origin`, and exposes `Retry-After` so a browser client can
//!   honour a 429 or 503.
//! - Never `Access-Control-Allow-Credentials`: write keys are public and
//!   travel in the body or in `Authorization`, not in cookies.
//!
//! Only the Tracking API router takes this layer; the admin port stays
//! same-origin.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Methods a browser may use on the Tracking API.
pub const ALLOW_METHODS: &str = "POST, OPTIONS";
/// Headers allowed when a preflight does not list any.
pub const DEFAULT_ALLOW_HEADERS: &str = "Content-Type, Authorization, Content-Encoding, X-Retry-Count";
/// How long a browser may cache a preflight, in seconds (Chromium caps this at 7200).
pub const MAX_AGE_SECS: u32 = 86_400;

/// The middleware (`axum::middleware::from_fn(cors::middleware)`).
pub async fn middleware(req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    if req.method() == Method::OPTIONS && req.uri().path().starts_with("/v1/") {
        return preflight(origin, req.headers());
    }
    let mut resp = next.run(req).await;
    if let Some(origin) = origin {
        allow_origin(resp.headers_mut(), origin);
    }
    resp
}

fn allow_origin(h: &mut HeaderMap, origin: HeaderValue) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("Retry-After"));
}

fn preflight(origin: Option<HeaderValue>, req: &HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    // Without an Origin this is no CORS preflight; any origin may send.
    allow_origin(h, origin.unwrap_or(HeaderValue::from_static("*")));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
    let requested = req.get(header::ACCESS_CONTROL_REQUEST_HEADERS).filter(|v| !v.as_bytes().trim_ascii().is_empty());
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested.cloned().unwrap_or(HeaderValue::from_static(DEFAULT_ALLOW_HEADERS)));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(MAX_AGE_SECS));
    h.append(header::VARY, HeaderValue::from_static("Access-Control-Request-Method, Access-Control-Request-Headers"));
    h.insert(header::ALLOW, HeaderValue::from_static(ALLOW_METHODS));
    resp
}

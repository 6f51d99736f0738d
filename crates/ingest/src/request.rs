//! The front of a Tracking API request, shared by ingest and the cell
//! router (which must answer exactly as ingest does): the call a path
//! names, the error answer, the body read within its limits, its
//! encoding, and the write key from HTTP Basic auth.

use std::io::Read;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::event::EventType;
use crate::IngestSettings;

/// The request kinds of the Tracking API, by URL path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Single(EventType),
    Batch,
}

pub fn call_for_path(segment: &str) -> Option<Call> {
    Some(match segment {
        "identify" | "i" => Call::Single(EventType::Identify),
        "track" | "t" => Call::Single(EventType::Track),
        "page" | "p" => Call::Single(EventType::Page),
        "screen" | "s" => Call::Single(EventType::Screen),
        "group" | "g" => Call::Single(EventType::Group),
        "alias" | "a" => Call::Single(EventType::Alias),
        "batch" | "import" | "b" => Call::Batch,
        _ => return None,
    })
}

/// An error answer: status, stable `code`, human `message`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The same answer with `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.code, "message": self.message }).to_string();
        let mut resp = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

pub fn success() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"success":true}"#).into_response()
}

/// How the body is encoded (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

pub fn encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase()) {
        None => Ok(Encoding::Identity),
        Some(enc) if enc.is_empty() || enc == "identity" => Ok(Encoding::Identity),
        Some(enc) if enc == "gzip" || enc == "x-gzip" => Ok(Encoding::Gzip),
        Some(enc) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!("Content-Encoding {enc:?} is not supported; use gzip or none"),
        )),
    }
}

pub fn too_large(settings: &IngestSettings) -> ApiError {
    ApiError::bad_request("request_too_large", format!("request body exceeds {} bytes", settings.max_request_bytes))
}

/// Decode the body as sent; a gzip body is inflated to at most the limit
/// (+1 to notice), whatever its ratio. CPU work: run off the async threads
/// for large or compressed bodies.
pub fn decode_body(settings: &IngestSettings, encoding: Encoding, raw: Bytes) -> Result<Bytes, ApiError> {
    let limit = settings.max_request_bytes;
    match encoding {
        Encoding::Identity => Ok(raw),
        Encoding::Gzip => {
            let mut out = Vec::with_capacity((raw.len() * 4).min(limit + 1));
            flate2::read::MultiGzDecoder::new(&raw[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| ApiError::bad_request("invalid_gzip", format!("body is not valid gzip: {e}")))?;
            if out.len() > limit {
                return Err(too_large(settings));
            }
            Ok(out.into())
        }
    }
}

/// The most an oversize body is read (and thrown away) before its `400` is
/// sent, so the client is not reset mid-upload and can read the answer.
/// Past this the connection is closed after the answer.
pub const DRAIN_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Read the body as sent (not decoded): `Some(bytes)` within
/// `max_request_bytes`, `None` when it is larger. A larger body is still
/// read and discarded up to [`DRAIN_MAX_BYTES`], within the body timeout,
/// so the early answer reaches the client instead of a connection reset.
pub async fn collect_body(settings: &IngestSettings, headers: &HeaderMap, mut body: Body) -> Result<Option<Bytes>, ApiError> {
    let limit = settings.max_request_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64 && len > DRAIN_MAX_BYTES as u64) {
        return Ok(None); // over the limit and not worth reading: answer now, the connection closes
    }
    let mut over = declared.is_some_and(|len| len > limit as u64);
    let mut kept = bytes::BytesMut::with_capacity(declared.map_or(8 * 1024, |len| len as usize).min(limit));
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + settings.body_read_timeout;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if over => return Ok(None),
            Err(_) => return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", "request body not received in time")),
            Ok(None) => break,
            Ok(Some(Err(_))) if over => return Ok(None),
            Ok(Some(Err(e))) => return Err(ApiError::bad_request("body_read_error", format!("could not read the request body: {e}"))),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                seen = seen.saturating_add(data.len());
                if seen > limit {
                    over = true;
                    kept = bytes::BytesMut::new();
                }
                if over {
                    if seen > DRAIN_MAX_BYTES {
                        return Ok(None);
                    }
                } else {
                    kept.extend_from_slice(&data);
                }
            }
        }
    }
    Ok((!over).then(|| kept.freeze()))
}

/// The write key from HTTP Basic auth (user name, with or without the
/// trailing colon).
pub fn basic_auth_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map(|(u, _)| u).unwrap_or(&text);
    (!user.is_empty()).then(|| user.to_owned())
}

/// The answer to a path that names no endpoint (`call`: the `/v1/{call}`
/// segment, when there is one).
pub fn not_found(call: Option<&str>) -> ApiError {
    match call {
        Some(call) => ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("unknown endpoint /v1/{call}")),
        None => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see /v1/batch"),
    }
}

/// The answer to a method other than POST on an endpoint.
pub fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "the Tracking API takes POST")
}

/// The answer to a request whose write key is unknown (`present`) or missing.
pub fn unknown_write_key(present: bool) -> ApiError {
    let message = if present { "unknown write key" } else { "no write key: send it as the HTTP Basic user name or as `writeKey` in the body" };
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_write_key", message)
}

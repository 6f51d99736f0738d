//! Bearer tokens of the admin ports (a cell's and a router's), checked
//! without telling an attacker anything through timing.

use axum::http::{header, HeaderMap};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    // The scheme is case-insensitive (RFC 9110 11.1).
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Whether `given` is `expected`, in a time that shows neither `expected`'s
/// bytes nor its length: both are reduced to HMAC-SHA256 under a random key
/// of this process (fixed-size digests; an attacker cannot aim at the
/// digest's bytes without the key), and the digests are compared without an
/// early exit. Comparing the tokens themselves, even byte by byte without
/// an early exit, would stop at a length mismatch and tell the length.
pub fn token_matches(given: &str, expected: &str) -> bool {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    let digest = |token: &str| {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any size");
        mac.update(token.as_bytes());
        mac.finalize().into_bytes()
    };
    let (a, b) = (digest(given), digest(expected));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a `GET /metrics` with `headers` may read the metrics: always
/// when no `metrics_token` is set; else with that token or the admin `token`.
pub fn metrics_allowed(headers: &HeaderMap, metrics_token: Option<&str>, token: Option<&str>) -> bool {
    let Some(metrics_token) = metrics_token else { return true };
    // Both compared every time (`|`, not `||`): which one matched does not show either.
    bearer(headers).is_some_and(|g| token_matches(g, metrics_token) | token.is_some_and(|t| token_matches(g, t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves() {
        assert!(token_matches("a-long-admin-token", "a-long-admin-token"));
        assert!(!token_matches("a-long-admin-token", "a-long-admin-tokeN"));
        assert!(!token_matches("", "a-long-admin-token"));
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(metrics_allowed(&HeaderMap::new(), None, Some("admin")));
        assert!(!metrics_allowed(&HeaderMap::new(), Some("metrics-token-1"), Some("admin-token-1")));
        assert!(metrics_allowed(&h("Bearer metrics-token-1"), Some("metrics-token-1"), Some("admin-token-1")));
        assert!(metrics_allowed(&h("bearer admin-token-1"), Some("metrics-token-1"), Some("admin-token-1")));
        assert!(!metrics_allowed(&h("Basic metrics-token-1"), Some("metrics-token-1"), None));
    }
}

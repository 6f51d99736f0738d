//! The route → director RPC's wire format (`sluice_deliver::cluster`): bytes
//! decoded as the director's server decodes a body
//! (`serde_json::from_slice::<InsertRequest>`), each job turned into a
//! `NewJob` as the server hands it to `Centrifuge::insert`; and the
//! signature check on an arbitrary header.
//!
//! Input: the `X-Sluice-Rpc-Signature` header value, a NUL byte, then the
//! body (no NUL: all of it is the body). Checked: no panic; a decoded
//! request's jobs survive `NewJob` and back unchanged; the route's
//! `encode_requests` splits them into bodies under its limit that decode to
//! the same jobs in order; `RpcSecret::verify` never panics, accepts our own
//! signature of the body and refuses it for another body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_deliver::NewJob;
use sluice_deliver::cluster::{encode_requests, InsertRequest, RpcSecret, WireJob};

fn same(a: &WireJob, b: &WireJob) -> bool {
    serde_json::to_value(a).unwrap() == serde_json::to_value(b).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let (header, body) = if data.contains(&0) { sluice_fuzz::split(data, 0) } else { (&[][..], data) };

    let secret = RpcSecret::new("fuzz-secret-0123456789abcdef0123456789");
    if let Ok(header) = std::str::from_utf8(header) {
        let _ = secret.verify(header, body);
    }
    let signed = secret.sign(body, 1_700_000_000);
    assert!(secret.verify(&signed, body), "our own signature is refused: {signed}");
    let mut other = body.to_vec();
    other.push(b' ');
    assert!(!secret.verify(&signed, &other), "a signature verifies another body");

    let Ok(request) = serde_json::from_slice::<InsertRequest>(body) else { return };
    let jobs: Vec<NewJob> = request.jobs.iter().cloned().map(NewJob::from).collect();
    for (wire, job) in request.jobs.iter().zip(jobs) {
        assert_eq!(job.payload.as_ref(), wire.payload.as_bytes());
        let back = WireJob::from(job);
        assert!(same(&back, wire), "a job changes through NewJob: {wire:?} -> {back:?}");
    }

    // The route's side: re-encode under a limit from the input.
    let max = 64 + (body.len() % 4096);
    match encode_requests(request.jobs.clone(), request.oldest_event_ms, max) {
        Ok(bodies) => {
            let mut decoded = Vec::new();
            for b in &bodies {
                assert!(b.len() <= max, "an encoded request of {} bytes > {max}", b.len());
                let r: InsertRequest = serde_json::from_slice(b).expect("an encoded request decodes");
                assert_eq!(r.oldest_event_ms, request.oldest_event_ms);
                assert!(!r.jobs.is_empty(), "an empty request body");
                decoded.extend(r.jobs);
            }
            assert_eq!(decoded.len(), request.jobs.len(), "jobs lost or added by encode_requests");
            for (a, b) in decoded.iter().zip(&request.jobs) {
                assert!(same(a, b), "a job changes through encode_requests");
            }
        }
        Err(_) => {
            let head = format!("{{\"oldest_event_ms\":{},\"jobs\":[", request.oldest_event_ms).len();
            assert!(
                request.jobs.iter().any(|j| head + serde_json::to_vec(j).unwrap().len() + 2 > max),
                "encode_requests refused jobs that each fit in {max} bytes"
            );
        }
    }
});

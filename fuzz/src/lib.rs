//! Helpers shared by the fuzz targets (`fuzz_targets/*.rs`).
//!
//! - [`segment`]: an independent model of the embedded log's on-disk format
//!   (written from the module docs of `sluice_log::embedded`, not from its
//!   code), to encode valid segments and to predict what a reader must
//!   return for any bytes.
//! - [`runtime`]: one current-thread tokio runtime per process.
//! - [`split`]: cutting one fuzz input into parts.

use std::sync::OnceLock;

/// The process's tokio runtime (current-thread, timers and I/O on), made
/// once: building one per input would dominate the cost of an execution.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime"))
}

/// `data` cut at the first `sep`: (before, after); all of it and nothing
/// when `sep` does not occur.
pub fn split(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

pub mod segment {
    //! The segment format, as `crates/log/src/embedded.rs` documents it:
    //! a 16-byte header (`b"SLUICEL1"`, base offset u64 LE), then frames
    //! `u32 LE body length | u32 LE CRC-32C(body) | body`, with body
    //! `u64 LE offset | i64 LE timestamp ms | u32 LE key length | key | value`.
    //! A frame is valid when its length is within `20..=20 + MAX_RECORD_BYTES`,
    //! the body is complete, the CRC matches, the key fits, and its offset
    //! is the next one expected (dense from the segment's base).

    pub use sluice_log::embedded::MAX_RECORD_BYTES;

    pub const MAGIC: &[u8; 8] = b"SLUICEL1";
    pub const HEADER_LEN: usize = 16;
    const BODY_FIXED: usize = 20;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ModelRecord {
        pub offset: u64,
        pub timestamp_ms: i64,
        pub key: Vec<u8>,
        pub value: Vec<u8>,
    }

    /// What a verifying scan of one segment finds.
    #[derive(Debug, Clone)]
    pub struct ModelScan {
        /// The header is complete and names the expected base.
        pub header_ok: bool,
        /// The valid frames from the start, in order.
        pub records: Vec<ModelRecord>,
        /// Bytes of header + valid frames (0 when the header is bad).
        pub valid_len: usize,
        /// The valid frames end exactly at the end of the file.
        pub clean_end: bool,
    }

    pub fn header(base: u64) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..].copy_from_slice(&base.to_le_bytes());
        h
    }

    pub fn encode_frame(out: &mut Vec<u8>, offset: u64, timestamp_ms: i64, key: &[u8], value: &[u8]) {
        let mut body = Vec::with_capacity(BODY_FIXED + key.len() + value.len());
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&timestamp_ms.to_le_bytes());
        body.extend_from_slice(&(key.len() as u32).to_le_bytes());
        body.extend_from_slice(key);
        body.extend_from_slice(value);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
    }

    /// A deterministic valid record for offset `o` (small, varied sizes).
    pub fn sample_record(o: u64, salt: u8) -> ModelRecord {
        let n = (o as usize * 7 + salt as usize) % 41;
        ModelRecord {
            offset: o,
            timestamp_ms: 1_700_000_000_000 + o as i64 * 1000 + salt as i64,
            key: format!("k{o}").into_bytes(),
            value: (0..n).map(|i| (i as u8).wrapping_mul(31) ^ salt).collect(),
        }
    }

    /// `header(base)` and `count` sample records from `base`.
    pub fn valid_segment(base: u64, count: u64, salt: u8) -> Vec<u8> {
        let mut out = header(base).to_vec();
        for o in base..base + count {
            let r = sample_record(o, salt);
            encode_frame(&mut out, r.offset, r.timestamp_ms, &r.key, &r.value);
        }
        out
    }

    pub fn scan(bytes: &[u8], base: u64) -> ModelScan {
        let mut s = ModelScan { header_ok: false, records: Vec::new(), valid_len: 0, clean_end: false };
        if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != header(base) {
            return s;
        }
        s.header_ok = true;
        let mut pos = HEADER_LEN;
        loop {
            let rest = &bytes[pos..];
            if rest.is_empty() {
                s.clean_end = true;
                break;
            }
            if rest.len() < 8 {
                break;
            }
            let len = u32::from_le_bytes(rest[0..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
            if len < BODY_FIXED || len > BODY_FIXED + MAX_RECORD_BYTES || rest.len() - 8 < len {
                break;
            }
            let body = &rest[8..8 + len];
            if crc32c::crc32c(body) != crc {
                break;
            }
            let offset = u64::from_le_bytes(body[0..8].try_into().unwrap());
            let timestamp_ms = i64::from_le_bytes(body[8..16].try_into().unwrap());
            let key_len = u32::from_le_bytes(body[16..20].try_into().unwrap()) as usize;
            if key_len > len - BODY_FIXED || offset != base + s.records.len() as u64 {
                break;
            }
            s.records.push(ModelRecord {
                offset,
                timestamp_ms,
                key: body[BODY_FIXED..BODY_FIXED + key_len].to_vec(),
                value: body[BODY_FIXED + key_len..].to_vec(),
            });
            pos += 8 + len;
        }
        s.valid_len = pos;
        s
    }
}

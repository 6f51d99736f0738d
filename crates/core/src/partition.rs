//! The stable partitioner.
//!
//! Invariant: the partition of a message depends only on its `messageId`
//! bytes and the partition count, on every machine, build and version. That
//! is what lets every copy of a message (client retries) reach the same
//! dedup worker. So it is never `std`'s `DefaultHasher` (randomly seeded and
//! allowed to change between releases); it is Kafka's murmur2 with Kafka's
//! `toPositive`, the same function Kafka's Java `DefaultPartitioner` applies
//! to a record key, so the embedded log and a Kafka topic place a message
//! identically.

/// Kafka's `Utils.murmur2`: 32-bit MurmurHash2, seed `0x9747b28c`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a message: `toPositive(murmur2(messageId)) % partitions`.
pub fn partition_for(message_id: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    let positive = (murmur2(message_id.as_bytes()) & 0x7fff_ffff) as u32;
    positive % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors produced by Kafka's own `Utils.murmur2` (as published in the
    /// Akka and Kafka test suites).
    #[test]
    fn murmur2_matches_kafka() {
        let cases = [("1", -1_993_445_489), ("12", 126_087_238), ("123", -267_702_483), ("1234", -1_614_185_708), ("12345", -1_188_365_604)];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()), expected, "murmur2({input:?})");
        }
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        for n in [1, 3, 8, 64] {
            for i in 0..1000 {
                let id = format!("msg-{i}");
                let p = partition_for(&id, n);
                assert!(p < n);
                assert_eq!(p, partition_for(&id, n));
            }
        }
    }

    #[test]
    fn partitions_are_roughly_balanced() {
        let mut counts = [0u32; 8];
        for i in 0..80_000 {
            counts[partition_for(&format!("{i:x}-{i}"), 8) as usize] += 1;
        }
        for c in counts {
            assert!((8_000..12_000).contains(&c), "unbalanced: {counts:?}");
        }
    }
}

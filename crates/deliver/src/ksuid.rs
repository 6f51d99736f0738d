//! KSUIDs: 20 bytes, a 4-byte big-endian timestamp (seconds since
//! 2014-05-13, the KSUID epoch) and a 16-byte payload, shown as 27 base62
//! characters. Byte order is time order, so `jobs`' primary key grows at the
//! end of the B-tree.
//!
//! Invariant: ids from one [`KsuidGenerator`] strictly increase. Within one
//! second the payload is the previous one plus one (like monotonic ULIDs),
//! so a JobDB's writer hands out ids in commit order — the director's
//! "everything up to id X is loaded" cursor relies on it.

use std::fmt;

/// Seconds between the Unix epoch and the KSUID epoch.
const EPOCH: u64 = 1_400_000_000;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ksuid(pub [u8; 20]);

impl Ksuid {
    pub fn from_slice(b: &[u8]) -> Option<Ksuid> {
        <[u8; 20]>::try_from(b).ok().map(Ksuid)
    }

    /// Unix seconds the id was made at.
    pub fn unix_seconds(&self) -> u64 {
        u32::from_be_bytes(self.0[..4].try_into().expect("4 bytes")) as u64 + EPOCH
    }

    /// Parse the 27-character base62 form.
    pub fn parse(s: &str) -> Option<Ksuid> {
        if s.len() != 27 {
            return None;
        }
        // 160-bit big number as five u32 limbs, most significant first.
        let mut n = [0u32; 5];
        for c in s.bytes() {
            let d = BASE62.iter().position(|&b| b == c)? as u64;
            let mut carry = d;
            for limb in n.iter_mut().rev() {
                let v = *limb as u64 * 62 + carry;
                *limb = v as u32;
                carry = v >> 32;
            }
            if carry != 0 {
                return None;
            }
        }
        let mut out = [0u8; 20];
        for (i, limb) in n.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&limb.to_be_bytes());
        }
        Some(Ksuid(out))
    }
}

impl fmt::Display for Ksuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut n: Vec<u32> = self.0.chunks(4).map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes"))).collect();
        let mut digits = [b'0'; 27];
        for slot in digits.iter_mut().rev() {
            let mut rem = 0u64;
            for limb in n.iter_mut() {
                let v = (rem << 32) | *limb as u64;
                *limb = (v / 62) as u32;
                rem = v % 62;
            }
            *slot = BASE62[rem as usize];
        }
        f.write_str(std::str::from_utf8(&digits).expect("ascii"))
    }
}

impl fmt::Debug for Ksuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ksuid({self})")
    }
}

/// Makes strictly increasing KSUIDs (see the module docs).
#[derive(Default)]
pub struct KsuidGenerator {
    last: [u8; 20],
}

impl KsuidGenerator {
    /// Start above `floor` (the largest id already stored), so ids keep
    /// increasing across restarts even if the clock stepped back.
    pub fn above(floor: Option<Ksuid>) -> Self {
        Self { last: floor.map(|k| k.0).unwrap_or([0; 20]) }
    }

    pub fn next(&mut self, unix_seconds: u64) -> Ksuid {
        let ts = (unix_seconds.saturating_sub(EPOCH) as u32).to_be_bytes();
        let mut id = [0u8; 20];
        id[..4].copy_from_slice(&ts);
        rand::Rng::fill(&mut rand::thread_rng(), &mut id[4..]);
        if id <= self.last {
            // Same second (or the clock went back): previous + 1.
            id = self.last;
            for b in id.iter_mut().rev() {
                let (v, overflow) = b.overflowing_add(1);
                *b = v;
                if !overflow {
                    break;
                }
            }
        }
        self.last = id;
        Ksuid(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_round_trips() {
        // From segmentio/ksuid's README.
        let s = "0ujtsYcgvSTl8PAuAdqWYSMnLOv";
        let k = Ksuid::parse(s).unwrap();
        assert_eq!(k.to_string(), s);
        assert_eq!(k.unix_seconds(), 1_507_608_047);
        assert_eq!(hex::encode(&k.0[4..]), "b5a1cd34b5f99d1154fb6853345c9735");
    }

    #[test]
    fn strictly_increasing_within_a_second_and_when_the_clock_steps_back() {
        let mut g = KsuidGenerator::default();
        let mut prev = g.next(1_700_000_000);
        for t in [1_700_000_000, 1_700_000_000, 1_699_999_000, 1_700_000_001] {
            for _ in 0..1000 {
                let k = g.next(t);
                assert!(k > prev);
                assert_eq!(Ksuid::parse(&k.to_string()), Some(k));
                prev = k;
            }
        }
    }

    #[test]
    fn rejects_bad_text() {
        assert_eq!(Ksuid::parse("short"), None);
        assert_eq!(Ksuid::parse("0ujtsYcgvSTl8PAuAdqWYSMnLO!"), None);
        assert_eq!(Ksuid::parse("zzzzzzzzzzzzzzzzzzzzzzzzzzz"), None, "larger than 160 bits");
    }
}

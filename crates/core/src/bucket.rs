//! Migration buckets: how a workspace's traffic is split between two cells
//! while it moves (docs/plans/MIGRATION.md).
//!
//! Invariants:
//! - The bucket of a message depends only on its `messageId` bytes, on every
//!   machine, build and version (the same murmur2 as the partitioner), so
//!   every copy of an event (client retries) falls in the same bucket and
//!   reaches the same cell at any one moment.
//! - It is a different slice of the hash than the partition (bits 8.. rather
//!   than the whole), so one bucket spreads over every partition.
//! - There are [`BUCKETS`] buckets: a step of a gradual move is a percentage.

use std::fmt;

use crate::partition::murmur2;

/// Buckets per workspace.
pub const BUCKETS: u8 = 100;

/// The bucket of a message: `(toPositive(murmur2(messageId)) >> 8) % 100`.
pub fn bucket_for(message_id: &str) -> u8 {
    let positive = (murmur2(message_id.as_bytes()) & 0x7fff_ffff) as u32;
    ((positive >> 8) % BUCKETS as u32) as u8
}

/// The two cells of a workspace that is moving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

/// Where an event without a client's messageId goes while its workspace
/// moves (`moved`: the target's buckets; `fenced`: nobody's): the source
/// while it owns any bucket, else the target; `None` while everything left
/// is fenced. Routers and both cells' gates apply this one rule.
pub fn free_side(moved: BucketSet, fenced: BucketSet) -> Option<Side> {
    if !BucketSet::ALL.minus(moved).minus(fenced).is_empty() {
        Some(Side::Source)
    } else if !moved.is_empty() {
        Some(Side::Target)
    } else {
        None
    }
}

/// A set of buckets, as bits of a `u128`. Written as ranges: `"0-9,50"`,
/// `""` for none, `"0-99"` for all.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BucketSet(u128);

impl BucketSet {
    pub const NONE: BucketSet = BucketSet(0);
    pub const ALL: BucketSet = BucketSet((1u128 << BUCKETS) - 1);

    /// Buckets `0..n` (`n` capped at [`BUCKETS`]): the first `n` percent.
    pub fn first(n: u8) -> BucketSet {
        let n = n.min(BUCKETS);
        BucketSet(if n == 0 { 0 } else { (1u128 << n) - 1 })
    }

    /// The one bucket `bucket` (none when out of range).
    pub fn of(bucket: u8) -> BucketSet {
        if bucket < BUCKETS {
            BucketSet(1u128 << bucket)
        } else {
            BucketSet::NONE
        }
    }

    pub fn contains(self, bucket: u8) -> bool {
        bucket < BUCKETS && self.0 & (1u128 << bucket) != 0
    }

    /// Does it hold the bucket of `message_id`?
    pub fn holds(self, message_id: &str) -> bool {
        self.contains(bucket_for(message_id))
    }

    pub fn union(self, other: BucketSet) -> BucketSet {
        BucketSet(self.0 | other.0)
    }

    pub fn minus(self, other: BucketSet) -> BucketSet {
        BucketSet(self.0 & !other.0)
    }

    pub fn intersect(self, other: BucketSet) -> BucketSet {
        BucketSet(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> u32 {
        self.0.count_ones()
    }

    /// Parse the range form ([`fmt::Display`]'s output). Bounded work: the
    /// text is at most a few hundred bytes of ranges within `0..100`.
    pub fn parse(text: &str) -> Result<BucketSet, String> {
        let text = text.trim();
        if text.len() > 512 {
            return Err("a bucket set is at most 512 characters".into());
        }
        let mut set = BucketSet::NONE;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let number = |s: &str| s.parse::<u8>().ok().filter(|n| *n < BUCKETS).ok_or_else(|| format!("{s:?} is not a bucket (0-{})", BUCKETS - 1));
            let (lo, hi) = (number(lo)?, number(hi)?);
            if lo > hi {
                return Err(format!("bucket range {part:?} runs backwards"));
            }
            for b in lo..=hi {
                set.0 |= 1u128 << b;
            }
        }
        Ok(set)
    }
}

impl fmt::Display for BucketSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut b = 0u8;
        while b < BUCKETS {
            if !self.contains(b) {
                b += 1;
                continue;
            }
            let start = b;
            while b + 1 < BUCKETS && self.contains(b + 1) {
                b += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == b {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{b}")?;
            }
            b += 1;
        }
        Ok(())
    }
}

impl fmt::Debug for BucketSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BucketSet({self})")
    }
}

impl serde::Serialize for BucketSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BucketSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        BucketSet::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        // Pinned: a bucket must never change between builds (a migration
        // in progress across an upgrade relies on it).
        let pinned: Vec<u8> = ["1", "12", "123", "a-message-id", "550e8400-e29b-41d4-a716-446655440000"].iter().map(|m| bucket_for(m)).collect();
        // Computed independently (a Python murmur2): (toPositive(h) >> 8) % 100.
        assert_eq!(pinned, vec![11, 28, 95, 90, 81]);
        let mut counts = [0u32; BUCKETS as usize];
        for i in 0..100_000 {
            counts[bucket_for(&format!("msg-{i}")) as usize] += 1;
        }
        // 1,000 expected per bucket; a skewed hash would leave some far off.
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    #[test]
    fn a_bucket_set_round_trips_as_ranges() {
        for text in ["", "0-99", "0-9", "0-9,50-59", "3", "0,2,4-6,99"] {
            let set = BucketSet::parse(text).unwrap();
            assert_eq!(set.to_string(), text);
        }
        assert_eq!(BucketSet::parse("0-99").unwrap(), BucketSet::ALL);
        assert_eq!(BucketSet::first(10).len(), 10);
        assert_eq!(BucketSet::first(100), BucketSet::ALL);
        assert_eq!(BucketSet::first(0), BucketSet::NONE);
        assert_eq!(BucketSet::first(50).minus(BucketSet::first(10)).to_string(), "10-49");
        for bad in ["100", "5-2", "x", "-1", "0-100", &"1,".repeat(300)] {
            assert!(BucketSet::parse(bad).is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&BucketSet::first(10)).unwrap();
        assert_eq!(json, "\"0-9\"");
        assert_eq!(serde_json::from_str::<BucketSet>(&json).unwrap(), BucketSet::first(10));
    }
}

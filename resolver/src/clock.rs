//! Node identities and hybrid logical clocks.
//!
//! An HLC timestamp (Kulkarni et al., 2014) is a wall-clock millisecond plus a logical counter.
//! It never runs backwards on a node, it is greater than every timestamp the node has observed
//! (so it respects causality), and it stays close to wall time. It only arbitrates writes that
//! the version vectors call concurrent; causality itself is decided by [`crate::VersionVector`].

use serde::{Deserialize, Serialize};

/// A replication node, by its small numeric id (configured; stable for the node's life).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u16);

/// A hybrid logical clock reading. Ordered by wall time, then the logical counter; a
/// [`Stamp`](crate::Stamp) adds the node id as the final tie-break, making the order total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
}

/// A remote timestamp too far ahead of this node's clock: accepting it would drag every later
/// local timestamp into the future.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("remote clock reading {remote_ms} ms is {ahead_ms} ms ahead of the local clock (limit {limit_ms} ms)")]
pub struct ClockSkew {
    pub remote_ms: u64,
    pub ahead_ms: u64,
    pub limit_ms: u64,
}

/// One node's HLC. Pure: the caller passes the physical time in, so tests and models control it.
#[derive(Clone, Debug)]
pub struct HlcClock {
    last: Hlc,
    max_skew_ms: u64,
}

impl HlcClock {
    /// `max_skew_ms`: how far ahead of local wall time a remote reading may be.
    pub fn new(max_skew_ms: u64) -> Self {
        HlcClock { last: Hlc::default(), max_skew_ms }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A timestamp for a local write at physical time `phys_ms`.
    pub fn now(&mut self, phys_ms: u64) -> Hlc {
        self.last = if phys_ms > self.last.wall_ms {
            Hlc { wall_ms: phys_ms, logical: 0 }
        } else {
            Hlc { wall_ms: self.last.wall_ms, logical: self.last.logical.saturating_add(1) }
        };
        self.last
    }

    /// Takes in a remote timestamp (a replicated write) at physical time `phys_ms`; the clock
    /// moves past it. Rejects readings more than the allowed skew ahead.
    pub fn observe(&mut self, remote: Hlc, phys_ms: u64) -> Result<Hlc, ClockSkew> {
        if remote.wall_ms > phys_ms.saturating_add(self.max_skew_ms) {
            return Err(ClockSkew {
                remote_ms: remote.wall_ms,
                ahead_ms: remote.wall_ms - phys_ms,
                limit_ms: self.max_skew_ms,
            });
        }
        let wall = phys_ms.max(self.last.wall_ms).max(remote.wall_ms);
        let logical = if wall == self.last.wall_ms && wall == remote.wall_ms {
            self.last.logical.max(remote.logical).saturating_add(1)
        } else if wall == self.last.wall_ms {
            self.last.logical.saturating_add(1)
        } else if wall == remote.wall_ms {
            remote.logical.saturating_add(1)
        } else {
            0
        };
        self.last = Hlc { wall_ms: wall, logical };
        Ok(self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Local(u64),
        Receive(u64, u64, u32),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..10_000).prop_map(Step::Local),
            (0u64..10_000, 0u64..10_000, 0u32..5).prop_map(|(p, w, l)| Step::Receive(p, w, l)),
        ]
    }

    proptest! {
        /// Monotonic whatever the physical clock does; past every observed reading; never
        /// further from wall time than the largest reading seen.
        #[test]
        fn monotonic_and_causal(steps in proptest::collection::vec(step(), 1..200)) {
            let mut c = HlcClock::new(u64::MAX / 2);
            let mut prev = Hlc::default();
            let mut max_seen = 0u64;
            for s in steps {
                let t = match s {
                    Step::Local(p) => { max_seen = max_seen.max(p); c.now(p) }
                    Step::Receive(p, w, l) => {
                        let remote = Hlc { wall_ms: w, logical: l };
                        max_seen = max_seen.max(p).max(w);
                        let t = c.observe(remote, p).unwrap();
                        prop_assert!(t > remote);
                        t
                    }
                };
                prop_assert!(t > prev, "{t:?} after {prev:?}");
                prop_assert!(t.wall_ms <= max_seen);
                prev = t;
            }
        }
    }

    #[test]
    fn rejects_readings_from_the_future() {
        let mut c = HlcClock::new(500);
        let e = c.observe(Hlc { wall_ms: 10_000, logical: 0 }, 1_000).unwrap_err();
        assert_eq!(e.ahead_ms, 9_000);
        assert!(e.to_string().contains("limit 500 ms"));
        assert_eq!(c.last(), Hlc::default(), "a rejected reading leaves the clock alone");
        assert_eq!(c.now(1_000), Hlc { wall_ms: 1_000, logical: 0 });
        assert_eq!(c.now(900), Hlc { wall_ms: 1_000, logical: 1 }, "the wall clock went back");
    }
}

//! Version vectors: which writes of which node a row version has seen.

use crate::clock::{Hlc, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How two versions relate causally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// The first has seen less than the second: the second supersedes it.
    Before,
    /// The first has seen more: it supersedes the second.
    After,
    /// Neither has seen all of the other: a conflict to resolve.
    Concurrent,
}

/// Per node, the number of that node's writes seen. A `BTreeMap`, so the encoding is canonical.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<NodeId, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, node: NodeId) -> u64 {
        self.0.get(&node).copied().unwrap_or(0)
    }

    /// Records one more write of `node`; returns its sequence number (the write's dot).
    pub fn increment(&mut self, node: NodeId) -> u64 {
        let n = self.0.entry(node).or_insert(0);
        *n += 1;
        *n
    }

    /// Everything either has seen (pointwise maximum).
    pub fn merge(&mut self, other: &VersionVector) {
        for (node, n) in &other.0 {
            let e = self.0.entry(*node).or_insert(0);
            *e = (*e).max(*n);
        }
    }

    /// Whether this has seen everything `other` has.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(node, n)| self.get(*node) >= *n)
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        match (self.dominates(other), other.dominates(self)) {
            (true, true) => Causality::Equal,
            (true, false) => Causality::After,
            (false, true) => Causality::Before,
            (false, false) => Causality::Concurrent,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.0.iter().map(|(k, v)| (*k, *v))
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    /// Entries with a zero count are left out (they say nothing); repeated nodes keep the maximum.
    fn from_iter<I: IntoIterator<Item = (NodeId, u64)>>(iter: I) -> Self {
        let mut v = VersionVector::new();
        for (node, n) in iter.into_iter().filter(|(_, n)| *n > 0) {
            let e = v.0.entry(node).or_insert(0);
            *e = (*e).max(n);
        }
        v
    }
}

/// The identity of one row version: its causal history, the HLC of the write that made it and
/// the node that wrote it. Ordered for last-writer-wins by (HLC, node): total and the same on
/// every node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub vv: VersionVector,
    pub hlc: Hlc,
    pub node: NodeId,
}

impl Stamp {
    /// The last-writer-wins key.
    pub fn lww_key(&self) -> (Hlc, NodeId) {
        (self.hlc, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::btree_map((0u16..4).prop_map(NodeId), 0u64..5, 0..4).prop_map(VersionVector)
    }

    fn merged(a: &VersionVector, b: &VersionVector) -> VersionVector {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    fn canon(v: &VersionVector) -> BTreeMap<NodeId, u64> {
        v.0.iter().filter(|(_, n)| **n > 0).map(|(k, n)| (*k, *n)).collect()
    }

    proptest! {
        #[test]
        fn merge_is_a_join(a in vv(), b in vv(), c in vv()) {
            prop_assert_eq!(canon(&merged(&a, &b)), canon(&merged(&b, &a)));
            prop_assert_eq!(canon(&merged(&merged(&a, &b), &c)), canon(&merged(&a, &merged(&b, &c))));
            prop_assert_eq!(canon(&merged(&a, &a)), canon(&a));
            let m = merged(&a, &b);
            prop_assert!(m.dominates(&a) && m.dominates(&b));
        }

        #[test]
        fn compare_is_consistent(a in vv(), b in vv()) {
            let flip = |c| match c {
                Causality::Before => Causality::After,
                Causality::After => Causality::Before,
                x => x,
            };
            prop_assert_eq!(a.compare(&b), flip(b.compare(&a)));
            prop_assert_eq!(a.compare(&b) == Causality::Equal, canon(&a) == canon(&b));
        }
    }

    #[test]
    fn concurrent_writes() {
        let (x, y) = (NodeId(1), NodeId(2));
        let mut base = VersionVector::new();
        base.increment(x);
        let (mut a, mut b) = (base.clone(), base.clone());
        a.increment(x);
        b.increment(y);
        assert_eq!(a.compare(&b), Causality::Concurrent);
        assert_eq!(base.compare(&a), Causality::Before);
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.compare(&a), Causality::After);
        assert_eq!(m.get(x), 2);
    }
}

//! Row-level resolution: incoming version vs local version.

use crate::column::{merge_cells, Cell, Strategy};
use crate::vv::{Causality, Stamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A row's replicated state on one node: its stamp, whether it exists, and its cells. A
/// tombstone (`live: false`) keeps its cells so a concurrent update that outlives the delete
/// merges with everything written before it: no acknowledged increment or set element is lost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RowVersion {
    pub stamp: Stamp,
    pub live: bool,
    pub cells: BTreeMap<String, Cell>,
}

/// Per-column strategies of a table; unnamed columns are `lww`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablePolicy {
    pub columns: BTreeMap<String, Strategy>,
    /// A SQL function `(older jsonb, newer jsonb) → jsonb` that decides the `lww` columns of two
    /// concurrent live versions. The resolver only carries its name (it does no I/O): the
    /// applier calls it on the target, with the versions in (HLC, node) order so that every
    /// node passes the same arguments.
    #[serde(default)]
    pub merge_function: Option<String>,
}

impl TablePolicy {
    pub fn strategy(&self, column: &str) -> Strategy {
        self.columns.get(column).copied().unwrap_or_default()
    }
}

/// What the applier does with an incoming version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The row does not exist locally: write the incoming version.
    Insert,
    /// Already seen (a duplicate or an older version): change nothing.
    Skip,
    /// The incoming version has seen the local one: write it.
    Apply,
    /// Concurrent: write the merge (and record the conflict).
    Merge,
}

/// Resolves `remote` against the local version; returns the decision and the row to keep.
pub fn resolve(policy: &TablePolicy, local: Option<&RowVersion>, remote: &RowVersion) -> (Decision, RowVersion) {
    let Some(local) = local else { return (Decision::Insert, remote.clone()) };
    match remote.stamp.vv.compare(&local.stamp.vv) {
        Causality::Before | Causality::Equal => (Decision::Skip, local.clone()),
        Causality::After => (Decision::Apply, remote.clone()),
        Causality::Concurrent => (Decision::Merge, merge_rows(policy, local, remote)),
    }
}

/// Merges two row versions: version vectors joined, existence decided by the later (HLC, node)
/// write, each column by its strategy. Commutative, associative and idempotent.
pub fn merge_rows(policy: &TablePolicy, a: &RowVersion, b: &RowVersion) -> RowVersion {
    let (winner, _) = if a.stamp.lww_key() >= b.stamp.lww_key() { (a, b) } else { (b, a) };
    let mut vv = a.stamp.vv.clone();
    vv.merge(&b.stamp.vv);
    let mut cells = a.cells.clone();
    for (name, cell) in &b.cells {
        let merged = match cells.get(name) {
            Some(mine) => merge_cells(policy.strategy(name), mine, cell),
            None => cell.clone(),
        };
        cells.insert(name.clone(), merged);
    }
    RowVersion { stamp: Stamp { vv, hlc: winner.stamp.hlc, node: winner.stamp.node }, live: winner.live, cells }
}

/// Two live rows with different primary keys claim one unique value (two regions inserted the
/// same e-mail concurrently). Every node must keep the same row whatever order it learns of them
/// in, so the choice depends only on the two versions: the row whose latest write has the
/// greater (HLC, node) stamp stays, the primary key breaks a tie. Returns true when `a` stays.
/// The caller turns the other row into a tombstone and logs it.
pub fn unique_key_winner(a: (&Stamp, &[String]), b: (&Stamp, &[String])) -> bool {
    (a.0.lww_key(), a.1) >= (b.0.lww_key(), b.1)
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use crate::clock::{Hlc, NodeId};
    use crate::column::{Counter, OrSet};
    use crate::vv::VersionVector;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// A replica's version built from local writes of node `node` at distinct HLCs.
    fn version(node: u16, writes: &[(u8, i64, bool)], base_t: u64) -> RowVersion {
        let n = NodeId(node);
        let mut vv = VersionVector::new();
        let mut cells: BTreeMap<String, Cell> = BTreeMap::new();
        let mut live = true;
        let mut hlc = Hlc::default();
        for (i, (col, v, delete)) in writes.iter().enumerate() {
            vv.increment(n);
            hlc = Hlc { wall_ms: base_t + i as u64, logical: 0 };
            if *delete {
                live = false;
                continue;
            }
            live = true;
            match col % 3 {
                0 => {
                    cells.insert("name".into(), Cell::Value { value: json!(v), at: (hlc, n) });
                }
                1 => {
                    let mut c = match cells.remove("hits") {
                        Some(Cell::Counter(c)) => c,
                        _ => Counter::default(),
                    };
                    let cur = c.value();
                    c.local_write(n, cur, cur + v);
                    cells.insert("hits".into(), Cell::Counter(c));
                }
                _ => {
                    let mut s = match cells.remove("tags") {
                        Some(Cell::Set(s)) => s,
                        _ => OrSet::default(),
                    };
                    s.add(n, &json!(v % 4));
                    cells.insert("tags".into(), Cell::Set(s));
                }
            }
        }
        RowVersion { stamp: Stamp { vv, hlc, node: n }, live, cells }
    }

    fn policy() -> TablePolicy {
        TablePolicy {
            columns: [("hits".to_string(), Strategy::Counter), ("tags".to_string(), Strategy::Set)].into(),
            ..Default::default()
        }
    }

    /// What an observer can compare: existence, causal history, LWW key, visible values.
    type View = (bool, Vec<(u16, u64)>, (Hlc, NodeId), BTreeMap<String, Value>);

    fn view(r: &RowVersion) -> View {
        (
            r.live,
            r.stamp.vv.iter().map(|(n, c)| (n.0, c)).collect(),
            r.stamp.lww_key(),
            r.cells.iter().map(|(k, c)| (k.clone(), c.visible())).collect(),
        )
    }

    fn writes() -> impl proptest::strategy::Strategy<Value = Vec<(u8, i64, bool)>> {
        proptest::collection::vec((0u8..3, -20i64..20, proptest::bool::weighted(0.15)), 1..8)
    }

    fn stamp(ms: u64, node: u16) -> Stamp {
        Stamp { vv: VersionVector::new(), hlc: Hlc { wall_ms: ms, logical: 0 }, node: NodeId(node) }
    }

    proptest! {
        /// Exactly one of two distinct rows stays, whichever node compares them in which order.
        #[test]
        fn one_row_of_a_unique_collision_stays_everywhere(
            a in (0u64..4, 0u16..3, proptest::collection::vec("[a-c]", 1..3)),
            b in (0u64..4, 0u16..3, proptest::collection::vec("[a-c]", 1..3)),
        ) {
            prop_assume!(a.2 != b.2);
            let (sa, sb) = (stamp(a.0, a.1), stamp(b.0, b.1));
            let a_stays = unique_key_winner((&sa, &a.2), (&sb, &b.2));
            let b_stays = unique_key_winner((&sb, &b.2), (&sa, &a.2));
            prop_assert!(a_stays != b_stays);
            prop_assert_eq!(a_stays, (sa.lww_key(), &a.2) > (sb.lww_key(), &b.2));
        }

        /// Three nodes write the same row concurrently: every merge order gives one result.
        #[test]
        fn row_merge_is_a_join(a in writes(), b in writes(), c in writes(), ta in 0u64..50, tb in 0u64..50, tc in 0u64..50) {
            let p = policy();
            let (a, b, c) = (version(1, &a, ta), version(2, &b, tb), version(3, &c, tc));
            let m = |x: &RowVersion, y: &RowVersion| merge_rows(&p, x, y);
            prop_assert_eq!(view(&m(&a, &b)), view(&m(&b, &a)));
            prop_assert_eq!(view(&m(&m(&a, &b), &c)), view(&m(&a, &m(&b, &c))));
            prop_assert_eq!(view(&m(&a, &a)), view(&a));
        }

        /// Delivering versions in any order, with duplicates, converges to the same row; the
        /// counter holds every node's increments.
        #[test]
        fn any_delivery_order_converges(a in writes(), b in writes(), order in proptest::collection::vec(0usize..2, 1..6)) {
            let p = policy();
            let (va, vb) = (version(1, &a, 10), version(2, &b, 20));
            let mut on_a = va.clone();
            let mut on_b = vb.clone();
            for i in order {
                let incoming = if i == 0 { &va } else { &vb };
                on_a = resolve(&p, Some(&on_a), incoming).1;
                on_b = resolve(&p, Some(&on_b), incoming).1;
            }
            on_a = resolve(&p, Some(&on_a), &vb).1;
            on_b = resolve(&p, Some(&on_b), &va).1;
            prop_assert_eq!(view(&on_a), view(&on_b));
            let sum = |w: &[(u8, i64, bool)]| w.iter().filter(|(c, _, d)| c % 3 == 1 && !d).map(|(_, v, _)| v).sum::<i64>();
            if let Some(Cell::Counter(c)) = on_a.cells.get("hits") {
                prop_assert_eq!(c.value(), sum(&a) + sum(&b));
            }
        }
    }

    #[test]
    fn decisions() {
        let p = policy();
        let v1 = version(1, &[(0, 5, false)], 10);
        assert_eq!(resolve(&p, None, &v1).0, Decision::Insert);
        assert_eq!(resolve(&p, Some(&v1), &v1).0, Decision::Skip, "a duplicate delivery is a no-op");
        let mut later = v1.clone();
        later.stamp.vv.increment(NodeId(2));
        later.stamp.hlc = Hlc { wall_ms: 99, logical: 0 };
        assert_eq!(resolve(&p, Some(&v1), &later).0, Decision::Apply);
        assert_eq!(resolve(&p, Some(&later), &v1).0, Decision::Skip, "an older version is dominated");
        let other = version(2, &[(0, 7, false)], 50);
        let (d, merged) = resolve(&p, Some(&v1), &other);
        assert_eq!(d, Decision::Merge);
        assert_eq!(merged.cells["name"].visible(), json!(7), "the later HLC wins the column");
    }
}

//! Column strategies and their replicated states.
//!
//! | strategy | what the application reads | how concurrent writes combine |
//! |---|---|---|
//! | `lww` (default) | the value | the write with the greater (HLC, node) wins |
//! | `counter` | an integer | each node's increments and decrements add up (PN-counter) |
//! | `set` | a sorted JSON array | add-wins observed-remove set (an element removed on one node and re-added concurrently on another stays) |
//! | `multi_value` | the sibling with the greatest (HLC, node) | every concurrent value is kept as a sibling until a later write supersedes them all |
//! | `max` / `min` | the value | the greatest / least value wins (numbers numerically) |
//!
//! Counter, set and multi-value states come from the `crdts` crate; they are stored as
//! versioned postcard bytes ([`Cell::encode`]), never as JSON (its Orswot cannot round-trip
//! through serde_json) and never hashed (its maps iterate in random order).

use crate::clock::{Hlc, NodeId};
use crate::ResolverError;
use crdts::{CmRDT, CvRDT, MVReg, Orswot, PNCounter, VClock};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// Encoding version of stored cells; bumped on any incompatible change.
const CELL_FORMAT: u8 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    Lww,
    Counter,
    Set,
    MultiValue,
    Max,
    Min,
}

/// An integer column made of per-node increments: merging adds every node's contribution once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter(PNCounter<NodeId>);

impl Counter {
    /// Records that the application on `node` changed the visible value from `old` to `new`.
    pub fn local_write(&mut self, node: NodeId, old: i64, new: i64) {
        let delta = i128::from(new) - i128::from(old);
        let steps = delta.unsigned_abs().min(u128::from(u64::MAX)) as u64;
        let op = match delta.cmp(&0) {
            Ordering::Greater => self.0.inc_many(node, steps),
            Ordering::Less => self.0.dec_many(node, steps),
            Ordering::Equal => return,
        };
        self.0.apply(op);
    }

    /// The value the application reads (saturating at the i64 range).
    pub fn value(&self) -> i64 {
        let v = self.0.read().to_string();
        v.parse().unwrap_or(if v.starts_with('-') { i64::MIN } else { i64::MAX })
    }

    pub fn merge(&mut self, other: &Counter) {
        self.0.merge(other.0.clone());
    }

    /// A counter from per-node totals of increments and decrements: the form SQL triggers
    /// maintain (`{"<node>": [p, n]}`), since they cannot write this crate's bytes.
    pub fn from_contributions(totals: impl IntoIterator<Item = (NodeId, u64, u64)>) -> Counter {
        let mut c = PNCounter::new();
        for (node, p, n) in totals {
            // A dot's counter is the node's running total, so applying the totals as single
            // ops reproduces exactly the state a replica holding them would have.
            if p > 0 {
                let op = c.inc_many(node, p);
                c.apply(op);
            }
            if n > 0 {
                let op = c.dec_many(node, n);
                c.apply(op);
            }
        }
        Counter(c)
    }

    /// Per node, the totals of increments and decrements (the inverse of
    /// [`Counter::from_contributions`]). `PNCounter` keeps its clocks private; its serde form is
    /// read back through a mirror of the same layout, checked by a round-trip test.
    pub fn contributions(&self) -> BTreeMap<NodeId, (u64, u64)> {
        #[derive(Deserialize)]
        struct Pn {
            p: G,
            n: G,
        }
        #[derive(Deserialize)]
        struct G {
            inner: V,
        }
        #[derive(Deserialize)]
        struct V {
            dots: BTreeMap<NodeId, u64>,
        }
        let bytes = postcard::to_allocvec(&self.0).unwrap_or_default();
        let Ok(pn) = postcard::from_bytes::<Pn>(&bytes) else { return BTreeMap::new() };
        let mut out: BTreeMap<NodeId, (u64, u64)> = BTreeMap::new();
        for (node, p) in pn.p.inner.dots {
            out.entry(node).or_default().0 = p;
        }
        for (node, n) in pn.n.inner.dots {
            out.entry(node).or_default().1 = n;
        }
        out
    }
}

/// An add-wins observed-remove set of JSON values (kept as canonical JSON text).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrSet(Orswot<String, NodeId>);

impl OrSet {
    pub fn add(&mut self, node: NodeId, member: &Value) {
        let ctx = self.0.read_ctx().derive_add_ctx(node);
        let op = self.0.add(member.to_string(), ctx);
        self.0.apply(op);
    }

    pub fn remove(&mut self, member: &Value) {
        let m = member.to_string();
        let ctx = self.0.contains(&m).derive_rm_ctx();
        let op = self.0.rm(m, ctx);
        self.0.apply(op);
    }

    /// Records that the application on `node` replaced the visible array `old` with `new`.
    pub fn local_write(&mut self, node: NodeId, old: &[Value], new: &[Value]) {
        let (old, new): (BTreeSet<String>, BTreeSet<String>) =
            (old.iter().map(Value::to_string).collect(), new.iter().map(Value::to_string).collect());
        for gone in old.difference(&new) {
            let ctx = self.0.contains(gone).derive_rm_ctx();
            let op = self.0.rm(gone.clone(), ctx);
            self.0.apply(op);
        }
        for added in new.difference(&old) {
            let ctx = self.0.read_ctx().derive_add_ctx(node);
            let op = self.0.add(added.clone(), ctx);
            self.0.apply(op);
        }
    }

    /// The members in canonical order.
    pub fn members(&self) -> Vec<Value> {
        let sorted: BTreeSet<String> = self.0.read().val.into_iter().collect();
        sorted.iter().filter_map(|s| serde_json::from_str(s).ok()).collect()
    }

    pub fn merge(&mut self, other: &OrSet) {
        self.0.merge(other.0.clone());
    }

    /// A set from its parts: the clock (per node, how many adds it has seen) and each member
    /// with the dots of the adds that keep it. The form SQL triggers maintain, since they cannot
    /// write this crate's bytes; [`OrSet::parts`] is the inverse.
    pub fn from_parts(clock: Dots, entries: impl IntoIterator<Item = (Value, Dots)>) -> OrSet {
        let mirror = OrswotParts {
            clock: VClock { dots: clock },
            entries: entries.into_iter().map(|(m, d)| (m.to_string(), VClock { dots: d })).collect(),
            deferred: Vec::new(),
        };
        // `Orswot` keeps its fields private; its serde form is built through a mirror of the
        // same layout (postcard encodes a map and a sequence of pairs alike), checked by a
        // round-trip test.
        let bytes = postcard::to_allocvec(&mirror).unwrap_or_default();
        OrSet(postcard::from_bytes(&bytes).unwrap_or_default())
    }

    /// The clock and each member with its dots, members in canonical order.
    pub fn parts(&self) -> (Dots, Vec<(Value, Dots)>) {
        let bytes = postcard::to_allocvec(&self.0).unwrap_or_default();
        let Ok(p) = postcard::from_bytes::<OrswotParts>(&bytes) else { return Default::default() };
        let entries: BTreeMap<String, Dots> = p.entries.into_iter().map(|(m, c)| (m, c.dots)).collect();
        let entries = entries.into_iter().filter_map(|(m, d)| Some((serde_json::from_str(&m).ok()?, d))).collect();
        (p.clock.dots, entries)
    }
}

/// Per node, a count of its operations (a version vector in plain form).
pub type Dots = BTreeMap<NodeId, u64>;

/// The serde layout of `Orswot<String, NodeId>`. `deferred` holds removes that arrived ahead
/// of their adds, which only operation-based delivery produces: always empty here.
#[derive(Serialize, Deserialize)]
struct OrswotParts {
    clock: VClock<NodeId>,
    entries: Vec<(String, VClock<NodeId>)>,
    deferred: Vec<(VClock<NodeId>, Vec<String>)>,
}

/// The serde layout of `MVReg<(Hlc, NodeId, String), NodeId>`.
#[derive(Serialize, Deserialize)]
struct MvRegParts {
    vals: Vec<(VClock<NodeId>, (Hlc, NodeId, String))>,
}

/// A multi-value register: concurrent writes are all kept (siblings) until one write that has
/// seen them all replaces them. The visible value is the sibling with the greatest (HLC, node).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MultiValue(MVReg<(Hlc, NodeId, String), NodeId>);

impl MultiValue {
    pub fn local_write(&mut self, node: NodeId, hlc: Hlc, value: &Value) {
        let ctx = self.0.read_ctx().derive_add_ctx(node);
        let op = self.0.write((hlc, node, value.to_string()), ctx);
        self.0.apply(op);
    }

    /// Every sibling, greatest (HLC, node) first; more than one means unresolved concurrency.
    pub fn siblings(&self) -> Vec<(Hlc, NodeId, Value)> {
        let mut v: Vec<(Hlc, NodeId, String)> = self.0.read().val;
        v.sort();
        v.dedup();
        v.into_iter().rev().filter_map(|(h, n, s)| serde_json::from_str(&s).ok().map(|j| (h, n, j))).collect()
    }

    pub fn value(&self) -> Value {
        self.siblings().into_iter().next().map(|(_, _, v)| v).unwrap_or(Value::Null)
    }

    pub fn merge(&mut self, other: &MultiValue) {
        self.0.merge(other.0.clone());
    }

    /// A register from its siblings, each with the clock of its write: the form SQL triggers
    /// maintain. Replaying them as writes keeps exactly the ones no other dominates.
    pub fn from_siblings(siblings: impl IntoIterator<Item = (Dots, Hlc, NodeId, Value)>) -> MultiValue {
        let mut reg = MVReg::new();
        for (clock, hlc, node, value) in siblings {
            reg.apply(crdts::mvreg::Op::Put { clock: VClock { dots: clock }, val: (hlc, node, value.to_string()) });
        }
        MultiValue(reg)
    }

    /// Every sibling with its clock, greatest (HLC, node) first (the inverse of
    /// [`MultiValue::from_siblings`]; `MVReg` keeps its values private, read through a mirror).
    pub fn siblings_with_clocks(&self) -> Vec<(Dots, Hlc, NodeId, Value)> {
        let bytes = postcard::to_allocvec(&self.0).unwrap_or_default();
        let Ok(p) = postcard::from_bytes::<MvRegParts>(&bytes) else { return Vec::new() };
        let mut v: Vec<(Hlc, NodeId, String, Dots)> =
            p.vals.into_iter().map(|(c, (h, n, s))| (h, n, s, c.dots)).collect();
        v.sort();
        v.into_iter().rev().filter_map(|(h, n, s, c)| Some((c, h, n, serde_json::from_str(&s).ok()?))).collect()
    }
}

/// One column's replicated state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Cell {
    /// A plain value (`lww`, `max`, `min`) and the (HLC, node) of the write that set it: each
    /// column carries its own last-writer key, so concurrent updates of different columns of a
    /// row both survive.
    Value {
        #[serde(with = "json_text")]
        value: Value,
        at: (Hlc, NodeId),
    },
    Counter(Counter),
    Set(OrSet),
    MultiValue(MultiValue),
}

impl Cell {
    /// What the application reads in the table's column.
    pub fn visible(&self) -> Value {
        match self {
            Cell::Value { value, .. } => value.clone(),
            Cell::Counter(c) => Value::from(c.value()),
            Cell::Set(s) => Value::Array(s.members()),
            Cell::MultiValue(m) => m.value(),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Cell::Value { .. } => 0,
            Cell::Counter(_) => 1,
            Cell::Set(_) => 2,
            Cell::MultiValue(_) => 3,
        }
    }

    /// `[format version][postcard]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![CELL_FORMAT];
        // postcard cannot fail on these types (no maps with non-serialisable keys).
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Cell, ResolverError> {
        match bytes.split_first() {
            Some((&CELL_FORMAT, rest)) => postcard::from_bytes(rest).map_err(ResolverError::Decode),
            Some((v, _)) => Err(ResolverError::Format { found: *v, supported: CELL_FORMAT }),
            None => Err(ResolverError::Format { found: 0, supported: CELL_FORMAT }),
        }
    }
}

/// JSON values travel inside postcard as their text: postcard is not self-describing, so it
/// cannot carry `serde_json::Value` directly.
mod json_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(v: &Value, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}

/// A total order on JSON values for `max`/`min`: numbers (and numeric strings, as numeric and
/// money columns arrive) by value, then everything by its canonical text, so the order is the
/// same on every node.
pub fn value_order(a: &Value, b: &Value) -> Ordering {
    let num = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.total_cmp(&y).then_with(|| a.to_string().cmp(&b.to_string())),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.to_string().cmp(&b.to_string()),
    }
}

/// Merges two states of one column from concurrent row versions. Commutative, associative
/// and idempotent for every strategy.
pub fn merge_cells(strategy: Strategy, a: &Cell, b: &Cell) -> Cell {
    match (strategy, a, b) {
        // Same kinds merge by their own law, whatever the strategy says now.
        (_, Cell::Counter(x), Cell::Counter(y)) => {
            let mut m = x.clone();
            m.merge(y);
            Cell::Counter(m)
        }
        (_, Cell::Set(x), Cell::Set(y)) => {
            let mut m = x.clone();
            m.merge(y);
            Cell::Set(m)
        }
        (_, Cell::MultiValue(x), Cell::MultiValue(y)) => {
            let mut m = x.clone();
            m.merge(y);
            Cell::MultiValue(m)
        }
        (Strategy::Max | Strategy::Min, Cell::Value { value: x, at: ax }, Cell::Value { value: y, at: ay }) => {
            // SQL NULL is no value: any value beats it, as in greatest()/least(), which keep
            // these columns monotonic on local writes.
            let o = match (x.is_null(), y.is_null()) {
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
                _ if strategy == Strategy::Min => value_order(x, y).reverse(),
                _ => value_order(x, y),
            };

            if o.then(ax.cmp(ay)) == Ordering::Less {
                b.clone()
            } else {
                a.clone()
            }
        }
        (_, Cell::Value { value: x, at: ax }, Cell::Value { value: y, at: ay }) => {
            // One write has one stamp; the value text only breaks ties between corrupt twins.
            if (ax, x.to_string()) >= (ay, y.to_string()) {
                a.clone()
            } else {
                b.clone()
            }
        }
        // The two sides disagree on the kind (the strategy changed while writes were in
        // flight): the state matching the strategy wins, else a fixed order of kinds.
        _ => {
            let fits = |c: &Cell| {
                matches!(
                    (strategy, c),
                    (Strategy::Counter, Cell::Counter(_))
                        | (Strategy::Set, Cell::Set(_))
                        | (Strategy::MultiValue, Cell::MultiValue(_))
                        | (Strategy::Lww | Strategy::Max | Strategy::Min, Cell::Value { .. })
                )
            };
            if (fits(a), a.kind()) >= (fits(b), b.kind()) {
                a.clone()
            } else {
                b.clone()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::Strategy as _;
    use serde_json::json;

    proptest! {
        /// The SQL-side form of a counter converts to the crdts state and back unchanged.
        #[test]
        fn counter_contributions_round_trip(totals in proptest::collection::btree_map(0u16..5, (0u64..1_000_000, 0u64..1_000_000), 0..5)) {
            let c = Counter::from_contributions(totals.iter().map(|(n, (p, m))| (NodeId(*n), *p, *m)));
            let back: BTreeMap<u16, (u64, u64)> = c.contributions().into_iter().map(|(n, t)| (n.0, t)).collect();
            let expected: BTreeMap<u16, (u64, u64)> = totals.iter().filter(|(_, (p, m))| *p > 0 || *m > 0).map(|(n, t)| (*n, *t)).collect();
            prop_assert_eq!(back, expected);
            let sum: i64 = totals.values().map(|(p, m)| *p as i64 - *m as i64).sum();
            prop_assert_eq!(c.value(), sum);
        }
    }

    /// Operations on one node's copy of a column; states are built by replaying them, so the
    /// tests exercise states that replication can actually produce.
    #[derive(Clone, Debug)]
    enum Op {
        Add(i64),
        Remove(i64),
        Count(i64),
        Write(u64, i64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        prop_oneof![
            (0i64..6).prop_map(Op::Add),
            (0i64..6).prop_map(Op::Remove),
            (-50i64..50).prop_map(Op::Count),
            (0u64..20, 0i64..6).prop_map(|(t, v)| Op::Write(t, v)),
        ]
    }

    /// Replica `node`'s state after `ops` on a copy of `from` (each replica writes as itself:
    /// an actor id belongs to one replica, which the CRDTs assume).
    fn replica_from(from: &(Counter, OrSet, MultiValue), node: u16, ops: &[Op]) -> (Counter, OrSet, MultiValue) {
        let (mut c, mut s, mut m) = from.clone();
        let n = NodeId(node);
        for (i, o) in ops.iter().enumerate() {
            match o {
                Op::Add(v) => s.add(n, &json!(v)),
                Op::Remove(v) => s.remove(&json!(v)),
                Op::Count(d) => {
                    let cur = c.value();
                    c.local_write(n, cur, cur + d)
                }
                Op::Write(t, v) => m.local_write(n, Hlc { wall_ms: *t, logical: i as u32 }, &json!(v)),
            }
        }
        (c, s, m)
    }

    fn replica(node: u16, ops: &[Op]) -> (Counter, OrSet, MultiValue) {
        replica_from(&Default::default(), node, ops)
    }

    fn ops() -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
        proptest::collection::vec(op(), 0..12)
    }

    fn views(cells: &(Counter, OrSet, MultiValue)) -> (i64, Vec<Value>, Vec<(Hlc, NodeId, Value)>) {
        (cells.0.value(), cells.1.members(), cells.2.siblings())
    }

    fn merge3(a: &(Counter, OrSet, MultiValue), b: &(Counter, OrSet, MultiValue)) -> (Counter, OrSet, MultiValue) {
        let pick = merge_cells;
        let c = match pick(Strategy::Counter, &Cell::Counter(a.0.clone()), &Cell::Counter(b.0.clone())) {
            Cell::Counter(c) => c,
            _ => unreachable!(),
        };
        let s = match pick(Strategy::Set, &Cell::Set(a.1.clone()), &Cell::Set(b.1.clone())) {
            Cell::Set(s) => s,
            _ => unreachable!(),
        };
        let m = match pick(Strategy::MultiValue, &Cell::MultiValue(a.2.clone()), &Cell::MultiValue(b.2.clone())) {
            Cell::MultiValue(m) => m,
            _ => unreachable!(),
        };
        (c, s, m)
    }

    proptest! {
        /// Merge laws for the CRDT columns over reachable states of three replicas.
        #[test]
        fn crdt_merges_are_joins(shared in ops(), a in ops(), b in ops(), c in ops()) {
            // A common history, then three replicas diverge.
            let base = replica(0, &shared);
            let (a, b, c) = (replica_from(&base, 1, &a), replica_from(&base, 2, &b), replica_from(&base, 3, &c));
            prop_assert_eq!(views(&merge3(&a, &b)), views(&merge3(&b, &a)));
            prop_assert_eq!(views(&merge3(&merge3(&a, &b), &c)), views(&merge3(&a, &merge3(&b, &c))));
            prop_assert_eq!(views(&merge3(&a, &a)), views(&a));
        }

        /// Counters: independent replicas' increments all count, once, however often merged.
        #[test]
        fn counters_add_up(deltas in proptest::collection::vec((0u16..3, -1000i64..1000), 0..30)) {
            let mut replicas = [Counter::default(), Counter::default(), Counter::default()];
            let mut total = 0;
            for (n, d) in &deltas {
                let r = &mut replicas[usize::from(*n)];
                let cur = r.value();
                r.local_write(NodeId(*n), cur, cur + d);
                total += d;
            }
            let mut m = Counter::default();
            for r in replicas.iter().chain(replicas.iter()) {
                m.merge(r);
            }
            prop_assert_eq!(m.value(), total);
        }

        /// LWW, max and min are joins over their orders, and those orders are total.
        #[test]
        fn value_merges_are_joins(x in any::<i32>(), y in "[a-c0-9.]{0,4}", z in any::<bool>(), t in proptest::collection::vec((0u64..4, 0u16..3), 3)) {
            let at = |i: usize| (Hlc { wall_ms: t[i].0, logical: 0 }, NodeId(t[i].1));
            let vals = [
                Cell::Value { value: json!(x), at: at(0) },
                Cell::Value { value: json!(y), at: at(1) },
                Cell::Value { value: json!(z), at: at(2) },
                Cell::Value { value: json!(x), at: at(1) },
                Cell::Value { value: Value::Null, at: at(2) },
            ];
            let key = |c: &Cell| match c { Cell::Value { value, at } => (value.to_string(), *at), _ => unreachable!() };
            for s in [Strategy::Lww, Strategy::Max, Strategy::Min] {
                for a in &vals { for b in &vals { for c in &vals {
                    let m = |p: &Cell, q: &Cell| merge_cells(s, p, q);
                    prop_assert_eq!(key(&m(a, b)), key(&m(b, a)));
                    prop_assert_eq!(key(&m(&m(a, b), c)), key(&m(a, &m(b, c))));
                    prop_assert_eq!(key(&m(a, a)), key(a));
                }}}
            }
        }

        /// Stored bytes decode to the same state; garbage is an error, never a panic.
        #[test]
        fn encoding_roundtrips(a in ops(), junk in proptest::collection::vec(any::<u8>(), 0..64)) {
            let (c, s, m) = replica(1, &a);
            let v = Cell::Value { value: json!({"k": [1, "x"]}), at: (Hlc::default(), NodeId(1)) };
            for cell in [Cell::Counter(c), Cell::Set(s), Cell::MultiValue(m), v] {
                let back = Cell::decode(&cell.encode()).unwrap();
                prop_assert_eq!(back.visible(), cell.visible());
            }
            let _ = Cell::decode(&junk);
        }
    }

    proptest! {
        /// The SQL-side forms of sets and registers convert to the crdts states and back, and
        /// the rebuilt states merge exactly as the originals do.
        #[test]
        fn set_and_register_parts_round_trip(shared in ops(), a in ops(), b in ops()) {
            let base = replica(0, &shared);
            let (a, b) = (replica_from(&base, 1, &a), replica_from(&base, 2, &b));
            let rebuilt = |x: &(Counter, OrSet, MultiValue)| {
                let (clock, entries) = x.1.parts();
                (x.0.clone(), OrSet::from_parts(clock, entries), MultiValue::from_siblings(x.2.siblings_with_clocks()))
            };
            let (ra, rb) = (rebuilt(&a), rebuilt(&b));
            prop_assert_eq!(&ra.1, &a.1);
            prop_assert_eq!(ra.1.parts(), a.1.parts());
            prop_assert_eq!(ra.2.siblings_with_clocks(), a.2.siblings_with_clocks());
            prop_assert_eq!(views(&merge3(&ra, &rb)), views(&merge3(&a, &b)));
            prop_assert_eq!(views(&merge3(&ra, &b)), views(&merge3(&a, &rb)));
        }
    }

    #[test]
    fn set_is_add_wins_and_multi_value_keeps_siblings() {
        let (x, y) = (NodeId(1), NodeId(2));
        let mut a = OrSet::default();
        a.add(x, &json!("red"));
        let mut b = a.clone();
        a.remove(&json!("red"));
        b.add(y, &json!("red")); // concurrent re-add
        b.add(y, &json!("blue"));
        a.merge(&b);
        assert_eq!(a.members(), [json!("blue"), json!("red")]);

        let mut m1 = MultiValue::default();
        m1.local_write(x, Hlc { wall_ms: 10, logical: 0 }, &json!("draft"));
        let mut m2 = m1.clone();
        m1.local_write(x, Hlc { wall_ms: 20, logical: 0 }, &json!("final-x"));
        m2.local_write(y, Hlc { wall_ms: 15, logical: 0 }, &json!("final-y"));
        m1.merge(&m2);
        assert_eq!(m1.siblings().len(), 2);
        assert_eq!(m1.value(), json!("final-x"));
        // A write that has seen both siblings replaces them.
        m1.local_write(y, Hlc { wall_ms: 30, logical: 0 }, &json!("agreed"));
        assert_eq!(m1.siblings().len(), 1);
        assert_eq!(value_order(&json!("10.5"), &json!(9)), Ordering::Greater);
        // NULL is no value for max/min, as for greatest()/least().
        let (null, seven) = (
            Cell::Value { value: Value::Null, at: (Hlc { wall_ms: 9, logical: 0 }, x) },
            Cell::Value { value: json!(7), at: (Hlc::default(), y) },
        );
        assert_eq!(merge_cells(Strategy::Max, &null, &seven).visible(), json!(7));
        assert_eq!(merge_cells(Strategy::Min, &seven, &null).visible(), json!(7));
        assert_eq!(
            Cell::decode(&[9, 1, 2]).unwrap_err().to_string(),
            "stored cell format 9 is not supported (this build reads 1)"
        );
    }
}
